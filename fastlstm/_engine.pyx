# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Thin Cython layer over the C engine (csrc/include/fastlstm.h).

Layering: the Python layer (fastlstm/model.py) validates every argument and
allocates outputs and the workspace; this module only turns arrays into
pointers and calls C with the GIL released.  It trusts its caller: every
array it receives has already been checked for dtype, shape and layout.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t
from libc.stdlib cimport calloc, free

cnp.import_array()

cdef extern from "fastlstm.h" nogil:
    cdef enum:
        FL_F32
        FL_F64
    ctypedef struct fl_cell:
        pass
    ctypedef struct fl_cell_opts:
        int act[3]
        double alpha[3]
        double beta[3]
        double clip
        double cell_clip
        int input_forget
    ctypedef struct fl_io:
        int T, N
        const void *x
        Py_ssize_t x_st, x_sn
        void *y
        Py_ssize_t y_st, y_sn
        const void *h0
        const void *c0
        void *hn
        void *cn
        const int32_t *lengths
        int eager_threads
    void fl_cell_opts_default(fl_cell_opts *opts)
    fl_cell *fl_cell_create(int dtype, int input_size, int hidden_size, int proj_size,
                            const void *w_ih, const void *w_hh, const void *bias,
                            const void *w_hr, const void *peep, const fl_cell_opts *opts)
    void fl_cell_free(fl_cell *cell)
    int fl_cell_set_whh_reduced(fl_cell *cell, int wtype, const void *w, const float *scale)
    int fl_cell_set_wih_reduced(fl_cell *cell, int wtype, const void *w, const float *scale)
    int fl_cell_set_act_bits(fl_cell *cell, int bits)
    size_t fl_cell_packed_bytes(const fl_cell *cell)
    size_t fl_workspace_bytes(fl_cell **cells, int layers, int dirs, int T, int N)
    int fl_forward(fl_cell **cells, int layers, int dirs, const fl_io *io, void *ws, int nthreads)
    int fl_isa_detected()
    int fl_isa_active()
    int fl_isa_set(int isa)
    const char *fl_isa_name(int isa)
    int fl_int8_vnni_set(int on)
    int fl_bf16_dot_set(int on)
    int fl_tune_set(int knob, int value)
    double fl_fma_peak_gflops(double seconds) nogil
    double fl_read_bw_gbps(size_t nbytes, int nthreads, double seconds, int *used) nogil
    double fl_core_roundtrip_ns(double seconds) nogil
    int fl_num_threads_get()
    void fl_num_threads_set(int n)
    int fl_num_cpus()
    unsigned fl_pool_congested_calls()

ISA_NAMES = ("portable", "avx2", "avx512")

# CPU detection (which also chooses the per-CPU cache tuning), once, at import
# (single-threaded under the import lock), so concurrent first calls never
# race on it.
fl_isa_detected()


def isa_detected():
    return ISA_NAMES[fl_isa_detected()]


def isa_active():
    return ISA_NAMES[fl_isa_active()]


def isa_set(int isa):
    return ISA_NAMES[fl_isa_set(isa)]


def int8_vnni_set(int on):
    """AVX-512 int8 kernel: 1 uses vpdpbusd (h split into bytes) if the CPU has AVX512_VNNI, 0
    forces vpmaddwd + vpaddd (same results), -1 only asks.  Returns whether
    VNNI is used."""
    return bool(fl_int8_vnni_set(on))


def bf16_dot_set(int on):
    """AVX-512 kernel of bfloat16 weights x bfloat16 h: 1 uses vdpbf16ps if the
    CPU has AVX512_BF16, 0 forces float32 FMAs of the widened values (same
    results), -1 only asks.  Returns whether vdpbf16ps is used."""
    return bool(fl_bf16_dot_set(on))


def fma_peak_gflops(double seconds=0.2):
    """Measured float32 FMA throughput of one core on the active ISA path,
    GFLOP/s (best of 5 runs; ~`seconds` in all).  The benchmarks' "fraction
    of peak" divides by it."""
    cdef double g
    if not (0 < seconds <= 10):
        raise ValueError(f"seconds must be in (0, 10], got {seconds!r}")
    with nogil:
        g = fl_fma_peak_gflops(seconds)
    return g


def read_bandwidth_gbps(nbytes, int threads=1, double seconds=0.2):
    """Measured read bandwidth, GB/s, of a working set of `nbytes` read over
    and over by `threads` threads of fastlstm's pool, each its own slice, the
    slices walked in 64 KB chunks whose order reverses each pass (as a
    step walks W_hh's panels), with the active ISA path's vector loads; best
    of 5 runs, ~`seconds` in all.  The ceiling of a batch-1 step that reads
    those bytes: the benchmarks' "% of read bandwidth" divides by it.
    Returns (GB/s, threads the pool ran): fewer threads when another call
    holds the pool or after a congested call."""
    cdef double g
    cdef int used = 0
    cdef size_t n
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if not (512 <= nbytes <= (1 << 34)):
        raise ValueError(f"nbytes must be in [512, 2**34], got {nbytes!r}")
    if not (1 <= threads <= 64):
        raise ValueError(f"threads must be in [1, 64], got {threads!r}")
    if not (0 < seconds <= 10):
        raise ValueError(f"seconds must be in (0, 10], got {seconds!r}")
    n = <size_t>nbytes
    with nogil:
        g = fl_read_bw_gbps(n, threads, seconds, &used)
    if g < 0:
        raise MemoryError(f"cannot allocate {nbytes} bytes for the bandwidth probe")
    return g, used


def core_roundtrip_ns(double seconds=0.05):
    """The round trip of a cache line between the calling thread and the
    pool's first worker, ns (median of 5 runs, ~`seconds` in all): each
    writes a line of its own and spins until the other's changes.  What a
    two-thread step pays per hop (its barrier, the exchange of h); on a VM
    it tells where the host has put the two vCPUs right now (roughly: SMT
    siblings of one core, sharing its L2 ~40 ns; two cores ~100-130 ns;
    two core complexes ~500 ns on the EPYC guests we measure on).  None when
    the pool cannot run two threads (one CPU, another call holding it, or
    right after a congested call)."""
    cdef double r
    if not (0 < seconds <= 10):
        raise ValueError(f"seconds must be in (0, 10], got {seconds!r}")
    with nogil:
        r = fl_core_roundtrip_ns(seconds)
    if r == -3:
        raise MemoryError("cannot allocate the round-trip probe's lines")
    return None if r < 0 else r


_TUNE_KNOBS = {"kc": 0, "prefetch": 1, "gchunk": 2}


def tune(str knob, int value=-1):
    """Cache-tuning knobs chosen for this CPU at import (csrc/engine.c,
    fl_tune_init); results never depend on them.  "kc": the GEMMs' K chunk
    in floats; "prefetch": 1/0, the next W_hh panel prefetched into L2 during
    compute-bound steps; "gchunk" (read-only, it sizes workspaces): bytes of
    input projection computed ahead of the steps.  value < 0 only asks;
    returns the value now used.
    For benchmarks and tests: do not change them while calls run."""
    if knob not in _TUNE_KNOBS:
        raise ValueError(f"knob must be one of {sorted(_TUNE_KNOBS)}, got {knob!r}")
    if knob == "gchunk" and value >= 0:
        raise ValueError("knob 'gchunk' is read-only (it sizes workspaces already allocated)")
    return fl_tune_set(_TUNE_KNOBS[knob], value)


def num_threads_get():
    return fl_num_threads_get()


def num_threads_set(int n):
    fl_num_threads_set(n)


def num_cpus():
    return fl_num_cpus()


def congested_calls():
    return fl_pool_congested_calls()


cdef inline const void *_ptr(object a):
    if a is None:
        return NULL
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef class Stack:
    """Packed weights of a stack of LSTM cells, cells[layer * dirs + dir]."""
    cdef fl_cell **cells
    cdef readonly int layers, dirs, dtype_code, input_size, hidden_size, proj_size

    def __cinit__(self, int layers, int dirs, int dtype_code, int input_size,
                  int hidden_size, int proj_size):
        self.cells = <fl_cell **>calloc(layers * dirs, sizeof(fl_cell *))
        if self.cells == NULL:
            raise MemoryError()
        self.layers = layers
        self.dirs = dirs
        self.dtype_code = dtype_code
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size

    def __dealloc__(self):
        cdef int i
        if self.cells != NULL:
            for i in range(self.layers * self.dirs):
                fl_cell_free(self.cells[i])
            free(self.cells)

    def set_cell(self, int index, int input_size, w_ih, w_hh, bias, w_hr, peep, opts):
        """Pack one cell.  Arrays: C-contiguous, the stack's dtype, shapes
        checked by the caller.  opts: (acts[3], alpha[3], beta[3], clip,
        cell_clip, input_forget) or None for the default cell."""
        cdef fl_cell_opts o
        cdef int k
        fl_cell_opts_default(&o)
        if opts is not None:
            acts, alpha, beta, clip, cell_clip, input_forget = opts
            for k in range(3):
                o.act[k] = acts[k]
                o.alpha[k] = alpha[k]
                o.beta[k] = beta[k]
            o.clip = clip
            o.cell_clip = cell_clip
            o.input_forget = 1 if input_forget else 0
        cdef fl_cell *cell = fl_cell_create(self.dtype_code, input_size, self.hidden_size,
                                            self.proj_size, _ptr(w_ih), _ptr(w_hh), _ptr(bias),
                                            _ptr(w_hr), _ptr(peep), &o)
        if cell == NULL:
            raise MemoryError("fastlstm: could not allocate packed weights")
        fl_cell_free(self.cells[index])
        self.cells[index] = cell

    def set_whh_reduced(self, int index, int wtype, w, scale):
        """Store cell `index`'s W_hh as wtype (1 float16, 2 bfloat16, 3 int8,
        4 bfloat16 with bfloat16 dot products):
        w (4H, Hout) uint16 bit patterns or int8, C-contiguous; scale (4H,)
        float32 for int8, else None."""
        cdef int rc = fl_cell_set_whh_reduced(self.cells[index], wtype, _ptr(w), <const float *>_ptr(scale))
        if rc != 0:
            raise MemoryError(f"fastlstm: could not store reduced weights (code {rc})")

    def set_act_bits(self, int index, int bits):
        """Bits (16 or 8) of cell `index`'s quantized h and inputs (int8 weights)."""
        if fl_cell_set_act_bits(self.cells[index], bits) != 0:
            raise ValueError(f"activation_bits: expected 16 or 8, got {bits}")

    def set_wih_reduced(self, int index, int wtype, w, scale):
        """Store cell `index`'s W_ih as int8 (wtype 3): w (4H, input) int8,
        C-contiguous; scale (4H,) float32."""
        cdef int rc = fl_cell_set_wih_reduced(self.cells[index], wtype, _ptr(w), <const float *>_ptr(scale))
        if rc != 0:
            raise MemoryError(f"fastlstm: could not store reduced weights (code {rc})")

    def packed_bytes(self):
        cdef size_t total = 0
        cdef int i
        for i in range(self.layers * self.dirs):
            if self.cells[i] != NULL:
                total += fl_cell_packed_bytes(self.cells[i])
        return total

    def workspace_bytes(self, int T, int N):
        return fl_workspace_bytes(self.cells, self.layers, self.dirs, T, N)

    def forward(self, cnp.ndarray x, cnp.ndarray y, h0, c0, cnp.ndarray hn,
                cnp.ndarray cn, cnp.ndarray ws, int nthreads, lengths=None):
        """x: (T, N, In) view, y: (T, N, D*Hout) view, any strides that are
        multiples of the itemsize and unit stride on the last axis.
        lengths: None or int32 (N,) sorted descending, values in [0, T]."""
        cdef fl_io io
        cdef Py_ssize_t isz = x.itemsize
        io.T = <int>x.shape[0]
        io.N = <int>x.shape[1]
        io.x = cnp.PyArray_DATA(x)
        io.x_st = x.strides[0] // isz
        io.x_sn = x.strides[1] // isz
        io.y = cnp.PyArray_DATA(y)
        io.y_st = y.strides[0] // isz
        io.y_sn = y.strides[1] // isz
        io.h0 = _ptr(h0)
        io.c0 = _ptr(c0)
        io.hn = cnp.PyArray_DATA(hn)
        io.cn = cnp.PyArray_DATA(cn)
        io.lengths = <const int32_t *>_ptr(lengths)
        io.eager_threads = 0
        self._run(&io, cnp.PyArray_DATA(ws), nthreads)

    cdef int _run(self, const fl_io *io, void *wsp, int nthreads) except -1:
        """The engine call, without the GIL (the caller keeps every array
        behind io and wsp alive)."""
        cdef int rc
        with nogil:
            rc = fl_forward(self.cells, self.layers, self.dirs, io, wsp, nthreads)
        if rc != 0:
            raise RuntimeError(f"fastlstm: internal error {rc} in fl_forward")
        return 0

    def call_fast(self, x, hx, int nthreads, bint batch_first):
        """LSTM.__call__'s short path (model._call_fast) without Python-level
        checks: x an exact ndarray of the stack's dtype in native byte order,
        3-D, C-contiguous and aligned, of the input size; hx None (the caller
        has checked that W_hh is finite) or a tuple or list of two such
        arrays of exactly the state shapes.  Returns (out, (h_n, c_n)), the
        same engine call as the general path makes for these inputs (the same
        bits), or None for anything else (the general path converts or raises
        the clear error).  out has the caller's layout (batch_first or not)."""
        cdef int tn = cnp.NPY_FLOAT32 if self.dtype_code == FL_F32 else cnp.NPY_FLOAT64
        cdef Py_ssize_t isz = 4 if self.dtype_code == FL_F32 else 8
        cdef Py_ssize_t T, N, In = self.input_size, H = self.hidden_size
        cdef Py_ssize_t Hout = self.proj_size if self.proj_size else self.hidden_size
        cdef Py_ssize_t LD = <Py_ssize_t>self.layers * self.dirs, DH = self.dirs * Hout
        cdef cnp.ndarray a, h0 = None, c0 = None
        if not cnp.PyArray_CheckExact(x):
            return None
        a = <cnp.ndarray>x
        if (cnp.PyArray_TYPE(a) != tn or cnp.PyArray_NDIM(a) != 3 or not cnp.PyArray_IS_C_CONTIGUOUS(a)
                or not cnp.PyArray_ISALIGNED(a) or not cnp.PyArray_ISNOTSWAPPED(a)
                or a.shape[2] != In):
            return None
        if batch_first:
            N, T = a.shape[0], a.shape[1]
        else:
            T, N = a.shape[0], a.shape[1]
        # the general path's bounds (_INT_MAX, _call_bytes < 2**62), with a
        # margin: it makes the exact checks and raises
        if (T >= 2147483647 or N >= 2147483647
                or (<double>(T if T > 1 else 1) * <double>(N if N > 1 else 1)
                    * <double>(4 * H + 64 + 3 * LD * Hout) + <double>(N * H + T + 1)) * isz >= 2.0 ** 61):
            return None
        if hx is not None:
            if (type(hx) is not tuple and type(hx) is not list) or len(hx) != 2:
                return None
            if not (cnp.PyArray_CheckExact(hx[0]) and cnp.PyArray_CheckExact(hx[1])):
                return None
            h0 = <cnp.ndarray>hx[0]
            c0 = <cnp.ndarray>hx[1]
            if (cnp.PyArray_TYPE(h0) != tn or cnp.PyArray_TYPE(c0) != tn
                    or not cnp.PyArray_ISNOTSWAPPED(h0) or not cnp.PyArray_ISNOTSWAPPED(c0)
                    or cnp.PyArray_NDIM(h0) != 3 or cnp.PyArray_NDIM(c0) != 3
                    or h0.shape[0] != LD or h0.shape[1] != N or h0.shape[2] != Hout
                    or c0.shape[0] != LD or c0.shape[1] != N or c0.shape[2] != H
                    or not cnp.PyArray_IS_C_CONTIGUOUS(h0) or not cnp.PyArray_ISALIGNED(h0)
                    or not cnp.PyArray_IS_C_CONTIGUOUS(c0) or not cnp.PyArray_ISALIGNED(c0)):
                return None
        cdef cnp.npy_intp dims[3]
        if batch_first:
            dims[0] = N
            dims[1] = T
        else:
            dims[0] = T
            dims[1] = N
        dims[2] = DH
        cdef cnp.ndarray out = cnp.PyArray_EMPTY(3, dims, tn, 0)
        dims[0] = LD
        dims[1] = N
        dims[2] = Hout
        cdef cnp.ndarray hn = cnp.PyArray_EMPTY(3, dims, tn, 0)
        dims[2] = H
        cdef cnp.ndarray cn = cnp.PyArray_EMPTY(3, dims, tn, 0)
        dims[0] = <cnp.npy_intp>fl_workspace_bytes(self.cells, self.layers, self.dirs, <int>T, <int>N)
        cdef cnp.ndarray ws = cnp.PyArray_EMPTY(1, dims, cnp.NPY_UINT8, 0)
        cdef fl_io io
        io.T = <int>T
        io.N = <int>N
        io.x = cnp.PyArray_DATA(a)
        io.y = cnp.PyArray_DATA(out)
        if batch_first:  # row (t, n) of x at n*T*In + t*In, of out at n*T*DH + t*DH
            io.x_st = In
            io.x_sn = T * In
            io.y_st = DH
            io.y_sn = T * DH
        else:
            io.x_st = N * In
            io.x_sn = In
            io.y_st = N * DH
            io.y_sn = DH
        io.h0 = _ptr(h0)
        io.c0 = _ptr(c0)
        io.hn = cnp.PyArray_DATA(hn)
        io.cn = cnp.PyArray_DATA(cn)
        io.lengths = NULL
        io.eager_threads = 0
        self._run(&io, cnp.PyArray_DATA(ws), nthreads)
        return out, (hn, cn)


def _stream_busy(what):
    return (f"{what}: another thread is running this stream; a stream holds one "
            "sequence's state and workspace, so use one stream per thread (or a lock)")


cdef class StreamStep:
    """The fast path of ``Stream.step``: one time step of a unidirectional
    stack with the state kept in place (h and c arrays of the stream).

    ``step(x, out=None)`` accepts only what needs no conversion -- an exact
    ndarray of the model's dtype, C-contiguous and aligned, of shape (N, In)
    (or (In,) when N == 1), and an ``out`` that is exactly the array it would
    return -- and returns the output (a new array, or ``out``), or None when
    either is anything else (the Python layer then converts x or raises a
    clear error, and calls again).  It reads ``model._stack`` on every call, so a weight swap
    on the model (copy-on-write) is seen by the next step."""
    cdef object model
    cdef Stack stack
    cdef cnp.ndarray h, c, ws
    cdef int N, In, Hout, nthreads, type_num, eager
    # 1 while a step or chunk of this stream runs (set and tested with the
    # GIL held, so a test-and-set between Python threads): a second thread
    # would share the state and the workspace, so it gets an error instead.
    cdef int busy

    def __cinit__(self, model, cnp.ndarray h, cnp.ndarray c, int N, int nthreads,
                  bint eager=False):
        self.model = model
        self.eager = 1 if eager else 0
        self.h = h
        self.c = c
        self.N = N
        self.nthreads = nthreads
        self.type_num = cnp.PyArray_TYPE(h)
        self.stack = None

    cdef int _bind(self, Stack stack) except -1:
        self.ws = np.empty(stack.workspace_bytes(1, self.N), np.uint8)
        self.In = stack.input_size
        self.Hout = stack.proj_size if stack.proj_size else stack.hidden_size
        self.stack = stack
        return 0

    def enter(self, str what):
        """Mark the stream busy for `what` (Stream.__call__, reset, state),
        or raise if another thread is running it; pair with leave()."""
        if self.busy:
            raise RuntimeError(_stream_busy(what))
        self.busy = 1

    def leave(self):
        self.busy = 0

    cdef void _fill_io(self, fl_io *io, void *x, void *y):
        """One step of the stream: input x, output y, the state in place."""
        io.T = 1
        io.N = self.N
        io.x = x
        io.x_st = <Py_ssize_t>self.N * self.In
        io.x_sn = self.In
        io.y = y
        io.y_st = <Py_ssize_t>self.N * self.Hout
        io.y_sn = self.Hout
        io.h0 = cnp.PyArray_DATA(self.h)
        io.hn = cnp.PyArray_DATA(self.h)
        io.c0 = cnp.PyArray_DATA(self.c)
        io.cn = cnp.PyArray_DATA(self.c)
        io.lengths = NULL
        io.eager_threads = self.eager

    def step(self, x, out=None):
        cdef cnp.ndarray a, y
        cdef cnp.npy_intp dims[2]
        cdef fl_io io
        cdef int nd
        cdef char *lo
        cdef char *hi
        if not cnp.PyArray_CheckExact(x):
            return None
        a = <cnp.ndarray>x
        stack = self.model._stack
        if stack is not self.stack:
            self._bind(<Stack?>stack)
        if (cnp.PyArray_TYPE(a) != self.type_num or not cnp.PyArray_IS_C_CONTIGUOUS(a)
                or not cnp.PyArray_ISALIGNED(a) or not cnp.PyArray_ISNOTSWAPPED(a)):
            return None  # the slow path converts (a byte-swapped array too)
        nd = cnp.PyArray_NDIM(a)
        if nd == 1:
            if self.N != 1 or a.shape[0] != self.In:
                return None
            dims[0] = self.Hout
        elif nd == 2:
            if a.shape[0] != self.N or a.shape[1] != self.In:
                return None
            dims[0] = self.N
            dims[1] = self.Hout
        else:
            return None
        if out is None:
            y = cnp.PyArray_EMPTY(nd, dims, self.type_num, 0)
        else:
            # out: exactly the array the step would return (dtype, shape, C
            # order, aligned, writeable), overlapping neither x nor the state
            # (the kernel reads all of x and h while it writes y block by
            # block); anything else goes to the slow path, which says why.
            if not cnp.PyArray_CheckExact(out):
                return None
            y = <cnp.ndarray>out
            if (cnp.PyArray_TYPE(y) != self.type_num or not cnp.PyArray_IS_C_CONTIGUOUS(y)
                    or not cnp.PyArray_ISALIGNED(y) or not cnp.PyArray_ISNOTSWAPPED(y)
                    or not cnp.PyArray_ISWRITEABLE(y) or cnp.PyArray_NDIM(y) != nd
                    or y.shape[0] != dims[0] or (nd == 2 and y.shape[1] != dims[1])):
                return None
            lo = <char *>cnp.PyArray_DATA(y)
            hi = lo + cnp.PyArray_NBYTES(y)
            if (_overlaps(lo, hi, a) or _overlaps(lo, hi, self.h) or _overlaps(lo, hi, self.c)):
                return None
        self._fill_io(&io, cnp.PyArray_DATA(a), cnp.PyArray_DATA(y))
        # Local references keep the stack and workspace alive while C runs
        # without the GIL, even if another thread rebinds them meanwhile.
        cdef Stack stk = self.stack
        cdef cnp.ndarray ws = self.ws
        if self.busy:
            raise RuntimeError(_stream_busy("step"))
        self.busy = 1
        try:
            stk._run(&io, cnp.PyArray_DATA(ws), self.nthreads)
        finally:
            self.busy = 0
        return y


def stream_loop_ns(StreamStep ss, x, y, int n):
    """Benchmark helper (benchmarks/stream_breakdown.py): n steps of the
    stream ``ss`` on input x into y, back to back inside C (one GIL release
    for all of them), as ``ss.step(x, y)`` would run them; returns the mean
    ns per step.  x and y must be what the fast path of step takes (checked
    by running one step through it first)."""
    if n < 1:
        raise ValueError("n: expected a positive count")
    if ss.step(x, y) is None:
        raise ValueError("x, y: expected the arrays Stream.step(x, out=y) takes without conversion")
    cdef cnp.ndarray a = <cnp.ndarray>x, b = <cnp.ndarray>y
    cdef fl_io io
    ss._fill_io(&io, cnp.PyArray_DATA(a), cnp.PyArray_DATA(b))
    cdef Stack stk = ss.stack
    cdef cnp.ndarray ws = ss.ws
    cdef void *wsp = cnp.PyArray_DATA(ws)
    cdef fl_cell **cells = stk.cells
    cdef int L = stk.layers, nt = ss.nthreads, i, rc = 0
    import time
    t0 = time.perf_counter_ns()
    with nogil:
        for i in range(n):
            rc = fl_forward(cells, L, 1, &io, wsp, nt)
            if rc != 0:
                break
    t1 = time.perf_counter_ns()
    if rc != 0:
        raise RuntimeError(f"fastlstm: internal error {rc} in fl_forward")
    return (t1 - t0) / n


cdef inline bint _overlaps(char *lo, char *hi, cnp.ndarray b):
    """Whether [lo, hi) meets the bytes of the C-contiguous array b."""
    cdef char *blo = <char *>cnp.PyArray_DATA(b)
    return lo < blo + cnp.PyArray_NBYTES(b) and blo < hi


# ======================================================================
# Output heads and generation (csrc/generate.c, csrc/include/fastlstm_generate.h)
# Used by fastlstm/network.py, which validates every argument first.
# ======================================================================
from libc.stdint cimport uint32_t, uint64_t

cdef extern from "fastlstm_generate.h" nogil:
    ctypedef struct fl_head:
        pass
    ctypedef struct fl_gen_stage:
        fl_cell **cells
        int layers
        void *h
        void *c
    ctypedef struct fl_gen_net:
        int dtype
        const void *embedding
        int vocab_in, in_features
        int nstages
        const fl_gen_stage *stages
        const fl_head *head
    ctypedef struct fl_gen_io:
        int N, T
        const int32_t *prompt
        const int32_t *lengths
        int steps
        int32_t *tokens
        double temperature
        int top_k
        const uint64_t *seeds
        const uint64_t *streams
    fl_head *fl_head_create(int dtype, int in_features, int out_features, const void *w,
                            const void *b)
    void fl_head_free(fl_head *head)
    size_t fl_head_packed_bytes(const fl_head *head)
    int fl_head_apply(const fl_head *head, int N, const void *x, Py_ssize_t ldx, void *y,
                      Py_ssize_t ldy, int nthreads)
    size_t fl_generate_workspace_bytes(const fl_gen_net *net, int T, int N)
    int fl_generate(const fl_gen_net *net, const fl_gen_io *io, void *workspace, int nthreads)
    void fl_philox4x32_10(const uint32_t *ctr, const uint32_t *key, uint32_t *out)
    double fl_gen_uniform(uint64_t seed, uint64_t stream, uint64_t step)


cdef class Head:
    """Packed dense head: y = x W^T + b, W (out_features, in_features)."""
    cdef fl_head *head
    cdef readonly int dtype_code, in_features, out_features

    def __cinit__(self, int dtype_code, cnp.ndarray w, b):
        """w: C-contiguous (out, in) of the dtype; b: (out,) or None."""
        self.dtype_code = dtype_code
        self.out_features = <int>w.shape[0]
        self.in_features = <int>w.shape[1]
        self.head = fl_head_create(dtype_code, self.in_features, self.out_features,
                                   cnp.PyArray_DATA(w), _ptr(b))
        if self.head == NULL:
            raise MemoryError("fastlstm: could not allocate the packed head")

    def __dealloc__(self):
        fl_head_free(self.head)

    def packed_bytes(self):
        return fl_head_packed_bytes(self.head)

    def apply(self, cnp.ndarray x, cnp.ndarray y, int nthreads):
        """x (N, in) and y (N, out): unit stride on the last axis."""
        cdef int rc
        cdef Py_ssize_t isz = x.itemsize
        cdef int N = <int>x.shape[0]
        cdef Py_ssize_t ldx = x.strides[0] // isz if N > 1 else self.in_features
        cdef Py_ssize_t ldy = y.strides[0] // isz if N > 1 else self.out_features
        cdef const void *xp = cnp.PyArray_DATA(x)
        cdef void *yp = cnp.PyArray_DATA(y)
        with nogil:
            rc = fl_head_apply(self.head, N, xp, ldx, yp, ldy, nthreads)
        if rc != 0:
            raise RuntimeError(f"fastlstm: internal error {rc} in fl_head_apply")


cdef int _gen_fill(fl_gen_net *net, fl_gen_stage *st, list stacks, list hs, list cs, Head head,
                   embedding, int vocab_in, int in_features) except -1:
    cdef int s
    cdef Stack stack
    for s in range(len(stacks)):
        stack = <Stack>stacks[s]
        if stack.dirs != 1:
            raise ValueError("generation needs unidirectional stacks")
        st[s].cells = stack.cells
        st[s].layers = stack.layers
        st[s].h = NULL if hs is None else cnp.PyArray_DATA(<cnp.ndarray>hs[s])
        st[s].c = NULL if cs is None else cnp.PyArray_DATA(<cnp.ndarray>cs[s])
    net.dtype = head.dtype_code
    net.embedding = _ptr(embedding)
    net.vocab_in = vocab_in
    net.in_features = in_features
    net.nstages = len(stacks)
    net.stages = st
    net.head = head.head
    return 0


def generate_workspace_bytes(list stacks, Head head, embedding, int vocab_in,
                             int in_features, int T, int N):
    cdef fl_gen_net net
    cdef fl_gen_stage *st = <fl_gen_stage *>calloc(len(stacks), sizeof(fl_gen_stage))
    if st == NULL:
        raise MemoryError()
    try:
        _gen_fill(&net, st, stacks, None, None, head, embedding, vocab_in, in_features)
        return fl_generate_workspace_bytes(&net, T, N)
    finally:
        free(st)


def generate(list stacks, list hs, list cs, Head head, embedding, int vocab_in,
             int in_features, cnp.ndarray prompt, lengths, int steps, cnp.ndarray tokens,
             double temperature, int top_k, seeds, streams, cnp.ndarray ws, int nthreads):
    """The whole autoregressive loop in C with the GIL released.
    prompt int32 (N, T) C-contiguous; lengths None or int32 (N,) sorted
    descending; tokens int32 (N, steps); hs/cs per stage (layers, N, Hout) /
    (layers, N, H) C-contiguous, updated in place; seeds/streams uint64 (N,)."""
    cdef fl_gen_net net
    cdef fl_gen_io io
    cdef int rc = 0
    cdef void *wsp
    cdef fl_gen_stage *st = <fl_gen_stage *>calloc(len(stacks), sizeof(fl_gen_stage))
    if st == NULL:
        raise MemoryError()
    try:
        _gen_fill(&net, st, stacks, hs, cs, head, embedding, vocab_in, in_features)
        io.N = <int>prompt.shape[0]
        io.T = <int>prompt.shape[1]
        io.prompt = <const int32_t *>cnp.PyArray_DATA(prompt)
        io.lengths = <const int32_t *>_ptr(lengths)
        io.steps = steps
        io.tokens = <int32_t *>cnp.PyArray_DATA(tokens)
        io.temperature = temperature
        io.top_k = top_k
        io.seeds = <const uint64_t *>_ptr(seeds)
        io.streams = <const uint64_t *>_ptr(streams)
        wsp = cnp.PyArray_DATA(ws)
        with nogil:
            rc = fl_generate(&net, &io, wsp, nthreads)
    finally:
        free(st)
    if rc == -3:
        raise ValueError("prompt: token out of range")
    if rc != 0:
        raise RuntimeError(f"fastlstm: internal error {rc} in fl_generate")


def philox4x32_10(ctr, key):
    """One Philox4x32-10 block: ctr 4 and key 2 uint32 -> 4 uint32 (for tests)."""
    cdef uint32_t c[4]
    cdef uint32_t k[2]
    cdef uint32_t o[4]
    cdef int i
    for i in range(4):
        c[i] = ctr[i]
    for i in range(2):
        k[i] = key[i]
    fl_philox4x32_10(c, k, o)
    return (o[0], o[1], o[2], o[3])


def gen_uniform(uint64_t seed, uint64_t stream, uint64_t step):
    """The uniform in [0, 1) the sampler draws for (seed, stream, step)."""
    return fl_gen_uniform(seed, stream, step)

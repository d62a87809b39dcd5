"""Streaming: feed a sequence step by step or chunk by chunk.

A Stream holds h and c for every layer and a preallocated workspace, so a
step costs one small validation and one call into C.  The engine reads the
initial state from, and writes the final state to, the same arrays.
Feeding a sequence in chunks of any sizes gives exactly (bitwise, for the
same thread count) the outputs of one call on the whole sequence.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .errors import ShapeError
from . import _engine
from .model import _as_real, _check_mask, _engine_layout, _positive_int, _to_numpy

__all__ = ["Stream"]


class Stream:
    """Stateful runner of a unidirectional model; see ``LSTM.stream``.

    One stream is one sequence's state: a stream used by two threads at once
    raises RuntimeError in the second (step, chunk, reset and state alike)
    instead of mixing their steps.  Use one stream per thread; the model
    itself may be shared."""

    def __init__(self, model, batch=1, num_threads=None):
        if model.bidirectional:
            raise ValueError(
                "stream: a bidirectional model needs the whole sequence (its reverse direction "
                "starts at the end); run it with model(x) instead")
        self.model = model
        self.batch = _positive_int(batch, "batch", 1)
        nt = num_threads if num_threads is not None else model.num_threads
        self.num_threads = 0 if nt is None else _positive_int(nt, "num_threads", 1)
        L, N, dt = model.num_layers, self.batch, model.dtype
        self._h = np.zeros((L, N, model.output_size), dt)
        self._c = np.zeros((L, N, model.hidden_size), dt)
        self._ws = {}
        # step(): checks and the call into C in one Cython method (_engine.StreamStep).
        # An explicit thread count > 1 splits every step, however short: steps
        # fed back to back find the workers still spinning (~70 us after a
        # call), so a step of a few microseconds gains from the split.  With
        # the default the engine keeps short steps on one thread (waking
        # sleeping workers costs more than such a step).
        self._fast = _engine.StreamStep(model, self._h, self._c, N, self.num_threads,
                                        eager=self.num_threads > 1)

    @contextlib.contextmanager
    def _alone(self, what):
        """This thread runs the stream (others get the busy error meanwhile)."""
        self._fast.enter(what)
        try:
            yield
        finally:
            self._fast.leave()

    def _workspace(self, T):
        ws = self._ws.get(T)
        if ws is None:
            if len(self._ws) > 8:
                self._ws.clear()
            ws = self._ws[T] = np.empty(self.model._stack.workspace_bytes(T, self.batch), np.uint8)
        return ws

    # ----------------------------------------------------------------- state
    @property
    def state(self):
        """Copies of (h, c): shapes (num_layers, batch, output_size) and
        (num_layers, batch, hidden_size)."""
        with self._alone("state"):
            return self._h.copy(), self._c.copy()

    @state.setter
    def state(self, hc):
        with self._alone("state"):
            self._set_state(hc)

    def _set_state(self, hc):
        if not isinstance(hc, (tuple, list)) or len(hc) != 2:
            raise ShapeError("state: expected a tuple (h, c)")
        h = _as_real(hc[0], "state[0] (h)", self.model.dtype)
        c = _as_real(hc[1], "state[1] (c)", self.model.dtype)
        if h.shape != self._h.shape:
            raise ShapeError(f"state[0] (h): expected shape {self._h.shape}, got {h.shape}")
        if c.shape != self._c.shape:
            raise ShapeError(f"state[1] (c): expected shape {self._c.shape}, got {c.shape}")
        self._h[...] = h
        self._c[...] = c

    def reset(self, rows=None):
        """Zero the state of every batch row, or of the given rows (ints or a
        boolean mask of length batch)."""
        with self._alone("reset"):
            self._reset(rows)

    def _reset(self, rows):
        if rows is None:
            self._h.fill(0)
            self._c.fill(0)
            return
        idx = np.asarray(rows)
        if idx.size == 0 and isinstance(rows, (list, tuple)):
            idx = idx.astype(np.intp)  # [] is float64 to NumPy
        if idx.dtype == bool:
            if idx.shape != (self.batch,):
                raise ShapeError(f"rows: a boolean mask must have shape ({self.batch},)")
        elif idx.dtype.kind not in "iu" or idx.ndim > 1:
            raise ShapeError("rows: expected row indices (ints) or a boolean mask")
        elif idx.size and (idx.min() < -self.batch or idx.max() >= self.batch):
            raise ShapeError(f"rows: indices must be in [0, {self.batch})")
        self._h[:, idx] = 0
        self._c[:, idx] = 0

    # ------------------------------------------------------------------ run
    def step(self, x_t, out=None, *, mask=None, padding=None):
        """One time step: x_t (batch, input_size) -> y_t (batch, output_size).
        A batch-1 stream also takes x_t of shape (input_size,) and then
        returns (output_size,).

        y_t is a new array, or ``out`` when given: an array exactly like the
        one step would return (the model's dtype, that shape, C-contiguous,
        writeable), not overlapping x_t; the step then allocates nothing.

        mask: None, or (batch,) booleans (a bool for a batch-1 stream fed
        (input_size,)): rows where it is False have no step now (a Keras
        masked step): their state stays as it is (bitwise) and their output
        is zeros (``padding="zeros"``, or None: the default), or with
        ``padding="repeat"`` their last output (h of the last layer: zeros
        for a fresh stream).  The other rows get bitwise what an unmasked
        step gives them: every row is computed, the masked ones then put back."""
        if mask is None and padding is None:  # the real-time path: two identity tests
            y = self._fast.step(x_t, out)  # None unless x_t and out are ready for the engine as they are
            if y is None:
                y = self._step_slow(x_t, out)
            return y
        padding = "zeros" if padding is None else padding
        _check_padding(padding)
        if mask is None:
            return self.step(x_t, out)
        return self._step_masked(x_t, out, mask, padding)

    def _step_args(self, x_t, out):
        """The checked (x_t, out, squeeze) of a step; x_t C-contiguous."""
        m = self.model
        x_t = _as_real(x_t, "x_t", m.dtype)
        squeeze = x_t.ndim == 1 and self.batch == 1
        want = (m.input_size,) if squeeze else (self.batch, m.input_size)
        if x_t.shape != want:
            raise ShapeError(
                f"x_t: expected shape ({self.batch}, {m.input_size}), got {x_t.shape}")
        x_t = np.require(x_t, requirements=["C", "A"])
        if out is not None:
            want_y = (m.output_size,) if squeeze else (self.batch, m.output_size)
            if type(out) is not np.ndarray:
                raise TypeError(f"out: expected a numpy.ndarray, got {type(out).__name__}")
            if out.dtype != m.dtype:
                raise TypeError(f"out: expected dtype {m.dtype}, got {out.dtype}")
            if out.shape != want_y:
                raise ShapeError(f"out: expected shape {want_y}, got {out.shape}")
            if not (out.flags.c_contiguous and out.flags.aligned and out.flags.writeable
                    and out.dtype.isnative):
                raise ValueError("out: must be C-contiguous, aligned, writeable and in native byte order")
            if np.may_share_memory(out, x_t):
                raise ValueError("out: must not overlap x_t (the step reads all of x_t while it writes out)")
            if np.may_share_memory(out, self._h) or np.may_share_memory(out, self._c):
                raise ValueError("out: must not overlap the stream's state")
        return x_t, out, squeeze

    def _step_slow(self, x_t, out):
        x_t, out, _ = self._step_args(x_t, out)
        y = self._fast.step(x_t, out)
        if y is None:  # pragma: no cover - the checks above are the fast path's
            raise RuntimeError("fastlstm: internal error in Stream.step")
        return y

    def _step_masked(self, x_t, out, mask, padding):
        m = self.model
        x_t, out, squeeze = self._step_args(x_t, out)
        arr = _to_numpy(mask, "mask")
        N, Hout = self.batch, m.output_size
        if squeeze and arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.shape != (N,):
            raise ShapeError(f"mask: expected shape ({N},), a bool per batch row, got shape "
                             f"{arr.shape}")
        valid = _check_mask(arr, (N,), True, False)[:, 0]  # its dtype checks
        y = np.empty((N, Hout), m.dtype) if out is None else out.reshape(N, Hout)
        with self._alone("step"):
            off = ~valid
            h_off, c_off = self._h[:, off], self._c[:, off]  # copies (boolean indexing)
            m._stack.forward(x_t.reshape(1, N, m.input_size), y.reshape(1, N, Hout), self._h,
                             self._c, self._h, self._c, self._workspace(1), self.num_threads)
            self._h[:, off] = h_off
            self._c[:, off] = c_off
            y[off] = h_off[-1] if padding == "repeat" else 0
        if out is not None:
            return out
        return y[0] if squeeze else y

    def __call__(self, chunk, *, mask=None, padding="zeros"):
        """A chunk of steps: (T, batch, input_size) ((batch, T, input_size)
        if the model is batch_first) -> outputs of the same layout.

        mask: None, or booleans (T, batch) ((batch, T) if batch_first), True
        at valid steps: LSTM's ``mask=`` over the chunk, starting from the
        stream's state (a masked step is skipped, the state carries over it).
        A masked step outputs zeros, or with ``padding="repeat"`` the row's
        last output, from an earlier chunk too (zeros for a fresh stream):
        fed in chunks and steps with their masks, a sequence gives the
        outputs of one ``m(x, mask=, padding=)`` call (to float32 rounding:
        other batches of valid rows per step run other kernels)."""
        m = self.model
        x = _as_real(chunk, "chunk", m.dtype)
        if x.ndim != 3:
            raise ShapeError(f"chunk: expected a 3-D array, got shape {x.shape}")
        xt = x.transpose(1, 0, 2) if m.batch_first else x
        if xt.shape[1:] != (self.batch, m.input_size):
            want = ("(batch, T, input_size)" if m.batch_first else "(T, batch, input_size)")
            raise ShapeError(
                f"chunk: expected {want} with batch={self.batch} and "
                f"input_size={m.input_size}, got shape {x.shape}")
        xt = _engine_layout(xt)
        T = xt.shape[0]
        if T >= 2 ** 31 - 1:
            raise ShapeError(f"chunk: at most 2**31 - 2 time steps per call, got {T}")
        if m.batch_first:
            out = np.empty((self.batch, T, m.output_size), m.dtype)
            yt = out.transpose(1, 0, 2)
        else:
            out = yt = np.empty((T, self.batch, m.output_size), m.dtype)
        _check_padding(padding)
        if mask is not None:
            return self._chunk_masked(x, mask, padding)
        with self._alone("stream(chunk)"):
            m._stack.forward(xt, yt, self._h, self._c, self._h, self._c, self._workspace(T),
                             self.num_threads)
        return out

    def _chunk_masked(self, x, mask, padding):
        m = self.model
        mtn = _check_mask(mask, x.shape[:-1], False, m.batch_first)  # (T, N)
        T = mtn.shape[0]
        with self._alone("stream(chunk)"):
            h0, c0 = self._h.copy(), self._c.copy()
            out, (hn, cn) = m(x, (h0, c0), mask=mtn.T if m.batch_first else mtn,
                              padding=padding, num_threads=self.num_threads or None)
            if padding == "repeat":
                # before a row's first valid step of this chunk: its last output
                first = np.where(mtn.any(axis=0), np.argmax(mtn, axis=0), T)
                before = np.arange(T)[:, None] < first[None, :]
                yt = out.transpose(1, 0, 2) if m.batch_first else out
                yt[before] = np.broadcast_to(h0[-1], yt.shape)[before]
            self._h[...] = hn
            self._c[...] = cn
        return out


def _check_padding(padding):
    if padding not in ("zeros", "repeat"):
        raise ValueError(f"padding: expected 'zeros' or 'repeat', got {padding!r}")

"""fastlstm.LSTM: a NumPy drop-in for torch.nn.LSTM at inference.

This is the validation-and-allocation layer: it checks every argument,
converts or refuses with a message that names the argument, allocates the
outputs and the workspace, and then makes one call into the C engine with
the GIL released.  Weights live here in PyTorch's canonical layout (the
single source of truth) and are packed into the kernel layout once, whenever
they are set; nothing is packed per call.
"""
from __future__ import annotations

import math
import re
import threading

import numpy as np

from . import _engine
from .errors import DTypeError, ShapeError, WeightsError

__all__ = ["LSTM"]

_DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float64): 1}
_INT_MAX = 2 ** 31 - 1  # the C engine's int (T, N, thread counts)
# Bits of the per-row codes of h_{t-1} and of the input rows in an int8 model
# made by astype("int8") (activation_bits=None).  8, the arithmetic torch's and
# ONNX Runtime's int8 LSTMs run: half the integer work of 16-bit codes (one
# vpdpbusd per 64 weights, not two), and on random and trained models the
# rounding of the int8 weights, not of the codes, dominates the error
# (benchmarks/precision_accuracy.py: max |h - h_f32| 0.137 with 8-bit codes,
# 0.105 with 16-bit, 0.698 for torch's qint8 LSTM on the same trained model).
# Files and pickles say their own bits (old ones, without the field, are 16).
DEFAULT_ACTIVATION_BITS = 8
# bfloat16 weights: 16 rounds h_{t-1} to bfloat16 for the recurrent dot
# products (vdpbf16ps with AVX512_BF16: twice the multiply-adds of a float32
# FMA, no widening), 32 keeps h float32.  16 is the default: see README,
# "Reduced precision", for the speed and error each gives.
DEFAULT_BF16_ACTIVATION_BITS = 16
# activation_bits each precision allows, and its default; float32 and float16
# models multiply float32 activations only.
_ACT_BITS = {"int8": (8, 16), "bfloat16": (16, 32), "float16": (32,), "float32": (32,)}
_DEFAULT_BITS = {"int8": DEFAULT_ACTIVATION_BITS, "bfloat16": DEFAULT_BF16_ACTIVATION_BITS,
                 "float16": 32, "float32": 32}

# Activation names (ONNX's LSTM set, lower case) -> (engine code, default alpha, beta).
ACTIVATIONS = {
    "sigmoid": (0, 0.0, 0.0),
    "tanh": (1, 0.0, 0.0),
    "relu": (2, 0.0, 0.0),
    "hardsigmoid": (3, 0.2, 0.5),
    "affine": (4, 1.0, 0.0),
    "leakyrelu": (5, 0.01, 0.0),
    "thresholdedrelu": (6, 1.0, 0.0),
    "scaledtanh": (7, 1.0, 1.0),
    "elu": (8, 1.0, 0.0),
    "softsign": (9, 0.0, 0.0),
    "softplus": (10, 0.0, 0.0),
}
_DEFAULT_ACTS = ("sigmoid", "tanh", "tanh")


def _dtype_of(dtype):
    if dtype is None:  # torch's meaning: the default dtype, float32
        return np.dtype(np.float32)
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise DTypeError(f"dtype: expected float32 or float64, got {dtype!r}") from exc
    if dt not in _DTYPES:
        raise DTypeError(f"dtype: expected float32 or float64, got {dt}")
    return dt


def _to_numpy(value, name):
    """Array-like (NumPy, torch tensor, list) to a NumPy array, no copy if possible."""
    if type(value).__name__ == "PackedSequence" and hasattr(value, "batch_sizes"):
        raise DTypeError(
            f"{name}: a torch PackedSequence; the NumPy API takes a padded array with "
            "lengths= (torch.nn.utils.rnn.pad_packed_sequence gives both), or use "
            "fastlstm.torch.LSTM, which takes PackedSequences")
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise DTypeError(f"{name}: cannot be converted to a numeric array ({exc})") from exc
    return arr


def _as_real(value, name, dtype):
    """Convert to `dtype` (float32/float64); refuse non-numeric input.

    Integers, unsigned integers and floats of any width are converted to the
    model's dtype (like numpy would); bool, complex, object, str and other
    kinds are refused with a DTypeError naming the argument.
    """
    arr = _to_numpy(value, name)
    if arr.dtype.kind not in "iuf":
        raise DTypeError(
            f"{name}: expected a real numeric array (float or int), got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def _positive_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)



def _call_bytes(T, N, H, LD, Hout, dt):
    """About how many bytes a call's output and workspace take (a bound the
    engine's size_t arithmetic must stay far from)."""
    return (max(T, 1) * max(N, 1) * (4 * H + 64 + 3 * LD * Hout) + N * H + T + 1) * dt.itemsize


def _new_outputs(T, N, D, LD, H, Hout, dt, batch_first, unbatched, alloc):
    """A call's out (the user's layout), yt (its (T, N, ...) view), h_n, c_n."""
    if unbatched:
        out = alloc((T, D * Hout), dt)
        yt = out[:, None, :]
    elif batch_first:
        out = alloc((N, T, D * Hout), dt)
        yt = out.transpose(1, 0, 2)
    else:
        out = yt = alloc((T, N, D * Hout), dt)
    return out, yt, np.empty((LD, N, Hout), dt), np.empty((LD, N, H), dt)

class LSTM:
    """A multi-layer LSTM with torch.nn.LSTM's constructor and call.

    Parameters mirror ``torch.nn.LSTM``: ``input_size, hidden_size,
    num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0`` plus ``dtype`` (float32 or float64)
    and ``seed`` for the random initialisation (PyTorch's
    U(-1/sqrt(H), 1/sqrt(H))).  ``dropout`` is accepted and ignored: this is
    an inference engine.

    Cell variants (all run in C; the float64 reference covers each):
      ``peepholes=True``: Graves 2013 peephole weights ``peephole_l{k}``
        of shape (3, hidden_size) for the i, f, o gates (i and f see
        c_{t-1}, o sees c_t), initialised to zero.
      ``activations=(f, g, h)``: ONNX LSTM activation names (sigmoid, tanh,
        relu, hardsigmoid, affine, leakyrelu, thresholdedrelu, scaledtanh,
        elu, softsign, softplus) with ``activation_alpha`` /
        ``activation_beta`` (3 values each; None takes ONNX's defaults).
      ``clip``: clamp gate pre-activations to [-clip, clip] (ONNX Runtime).
      ``cell_clip``: clamp c_t to [-cell_clip, cell_clip] (TF1 LSTMCell).
      ``input_forget=True``: f = 1 - i (ONNX's coupled gates).

    Call: ``out, (h_n, c_n) = m(x, hx=None)``; see ``__call__``.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, dtype=np.float32, *,
                 seed=None, num_threads=None, peepholes=False, activations=None,
                 activation_alpha=None, activation_beta=None, clip=None, cell_clip=None,
                 input_forget=False):
        self.input_size = _positive_int(input_size, "input_size", 0)
        self.hidden_size = _positive_int(hidden_size, "hidden_size", 1)
        self.num_layers = _positive_int(num_layers, "num_layers", 1)
        self.proj_size = _positive_int(proj_size, "proj_size", 0)
        if self.proj_size >= self.hidden_size:
            raise ValueError(
                f"proj_size: must be smaller than hidden_size ({self.hidden_size}), "
                f"got {self.proj_size}")
        self.bias = _flag(bias, "bias")
        self.batch_first = _flag(batch_first, "batch_first")
        self.bidirectional = _flag(bidirectional, "bidirectional")
        dropout = _float_arg(dropout, "dropout")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
        self.dropout = dropout  # kept for torch compatibility; no effect at inference
        self.dtype = _dtype_of(dtype)
        if num_threads is not None:
            num_threads = _positive_int(num_threads, "num_threads", 1)
        self.num_threads = num_threads
        sizes = (self.input_size, self.hidden_size, self.proj_size)
        if (max(sizes) >= 2 ** 24
                or (4 * self.hidden_size) * max(self.input_size, self.hidden_size) >= 2 ** 40
                or self.num_layers * self.num_directions >= 2 ** 31):
            raise ShapeError(
                f"sizes too large: input_size, hidden_size, proj_size = {sizes}, num_layers = "
                f"{self.num_layers}; expected each size < 2**24, 4*hidden_size*max(input_size, "
                f"hidden_size) < 2**40 and num_layers*num_directions < 2**31")
        self.peepholes = _flag(peepholes, "peepholes")
        self.activations, self.activation_alpha, self.activation_beta = _parse_activations(
            activations, activation_alpha, activation_beta)
        self.clip = _nonneg_float(clip, "clip")
        self.cell_clip = _nonneg_float(cell_clip, "cell_clip")
        self.input_forget = _flag(input_forget, "input_forget")
        self.weights_precision = "float32"
        self.input_weights_precision = "float32"
        self.activation_bits = 32
        self._qforms = {}
        self._stack = _engine.Stack(self.num_layers, self.num_directions, _DTYPES[self.dtype],
                                    self.input_size, self.hidden_size, self.proj_size)
        self._params = {}
        self._lock = threading.Lock()
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or seed < 0):
            raise ValueError(f"seed: expected None or an int >= 0, got {seed!r}")
        rng = np.random.default_rng(seed)
        k = 1.0 / math.sqrt(self.hidden_size)
        for name, shape in self._param_shapes().items():
            if name.startswith("peephole_"):
                self._params[name] = np.zeros(shape, self.dtype)
            else:
                self._params[name] = rng.uniform(-k, k, size=shape).astype(self.dtype)
        for layer in range(self.num_layers):
            for d in range(self.num_directions):
                self._pack(layer, d)

    # The configuration baked into the packed engine when the model is built:
    # assigning one afterwards would run the old engine on arrays sized for the
    # new value (reads out of bounds) or silently keep the old cell, so it is
    # refused.  batch_first, num_threads and dropout stay assignable.
    _FIXED = frozenset({
        "input_size", "hidden_size", "num_layers", "proj_size", "bias", "bidirectional",
        "dtype", "peepholes", "activations", "activation_alpha", "activation_beta", "clip",
        "cell_clip", "input_forget", "weights_precision", "input_weights_precision",
        "activation_bits"})

    def __setattr__(self, name, value):
        if name in LSTM._FIXED and "_stack" in self.__dict__:
            raise AttributeError(
                f"{name}: fixed when the model is built; make a new model (LSTM(...), "
                f"astype(), load_state_dict() for new weights)")
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------ properties
    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def output_size(self):
        """Features of h: proj_size if projecting, else hidden_size."""
        return self.proj_size or self.hidden_size

    def __repr__(self):
        extra = []
        if self.num_layers != 1:
            extra.append(f"num_layers={self.num_layers}")
        if not self.bias:
            extra.append("bias=False")
        if self.batch_first:
            extra.append("batch_first=True")
        if self.bidirectional:
            extra.append("bidirectional=True")
        if self.proj_size:
            extra.append(f"proj_size={self.proj_size}")
        if self.dtype != np.float32:
            extra.append(f"dtype={self.dtype.name}")
        return f"fastlstm.LSTM({', '.join([str(self.input_size), str(self.hidden_size)] + extra)})"

    # --------------------------------------------------------------- weights
    def _param_shapes(self):
        H, P, Hout = self.hidden_size, self.proj_size, self.output_size
        shapes = {}
        for layer in range(self.num_layers):
            In = self.input_size if layer == 0 else self.num_directions * Hout
            for d in range(self.num_directions):
                s = f"l{layer}" + ("_reverse" if d else "")
                shapes["weight_ih_" + s] = (4 * H, In)
                shapes["weight_hh_" + s] = (4 * H, Hout)
                if self.bias:
                    shapes["bias_ih_" + s] = (4 * H,)
                    shapes["bias_hh_" + s] = (4 * H,)
                if P:
                    shapes["weight_hr_" + s] = (P, H)
                if self.peepholes:
                    shapes["peephole_" + s] = (3, H)
        return shapes

    @property
    def is_default_cell(self):
        """True for the plain torch.nn.LSTM cell (no variant options)."""
        return (not self.peepholes and self.activations == _DEFAULT_ACTS and not self.clip
                and not self.cell_clip and not self.input_forget)

    def cell_options(self):
        """The cell variant options as keyword arguments of the constructor."""
        return {"peepholes": self.peepholes, "activations": self.activations,
                "activation_alpha": self.activation_alpha,
                "activation_beta": self.activation_beta, "clip": self.clip,
                "cell_clip": self.cell_clip, "input_forget": self.input_forget}

    def _engine_opts(self):
        if self.is_default_cell:
            return None
        return (tuple(ACTIVATIONS[a][0] for a in self.activations), self.activation_alpha,
                self.activation_beta, self.clip, self.cell_clip, self.input_forget)

    def _pack(self, layer, d, stack=None, params=None, qforms=None):
        s = f"l{layer}" + ("_reverse" if d else "")
        p = self._params if params is None else params
        c = np.ascontiguousarray
        bias = None
        if self.bias:
            bias = c((p["bias_ih_" + s].astype(np.float64) + p["bias_hh_" + s]).astype(self.dtype))
        in_size = p["weight_ih_" + s].shape[1]
        stack = self._stack if stack is None else stack
        stack.set_cell(layer * self.num_directions + d, in_size, c(p["weight_ih_" + s]),
                       c(p["weight_hh_" + s]), bias,
                       c(p["weight_hr_" + s]) if self.proj_size else None,
                       c(p["peephole_" + s]) if self.peepholes else None,
                       self._engine_opts())
        qforms = self._qforms if qforms is None else qforms
        qf = qforms.get("weight_hh_" + s)
        if qf is not None:
            code = _PRECISIONS[qf[0]]
            if qf[0] == "bfloat16" and self.activation_bits == 16:
                code = _BF16_DOT  # bfloat16 dot products (h rounded too)
            stack.set_whh_reduced(layer * self.num_directions + d, code, qf[1],
                                  qf[2] if len(qf) > 2 else None)
        qf = qforms.get("weight_ih_" + s)
        if qf is not None and qf[0] == "int8":
            stack.set_wih_reduced(layer * self.num_directions + d, _PRECISIONS["int8"], qf[1], qf[2])
        elif qf is not None and self.activation_bits == 16:
            # bfloat16 W_ih times the input rows rounded to bfloat16; with
            # float32 activations the float32 panels hold the rounded values
            stack.set_wih_reduced(layer * self.num_directions + d, _BF16_DOT, qf[1], None)
        if self.weights_precision == "int8" and self.activation_bits != 16:
            stack.set_act_bits(layer * self.num_directions + d, self.activation_bits)

    def _new_stack(self, params, qforms=None):
        """A new engine Stack with every cell packed from ``params`` (and the
        reduced-precision W_hh of ``qforms``, default: the model's)."""
        stack = _engine.Stack(self.num_layers, self.num_directions, _DTYPES[self.dtype],
                              self.input_size, self.hidden_size, self.proj_size)
        for layer in range(self.num_layers):
            for d in range(self.num_directions):
                self._pack(layer, d, stack, params, qforms)
        return stack

    # ------------------------------------------------------ weight precision
    def astype(self, weights, *, input_weights=None, activation_bits=None):
        """A copy of this model whose weights are stored in ``weights``
        precision: "float32", "float16", "bfloat16" or "int8" (per-row
        scales).

        float16 stores the recurrent weights W_hh, widened exactly; the
        arithmetic is float32.  bfloat16 stores W_hh and, by default, W_ih,
        and by default rounds the vectors they multiply -- h_{t-1} and each
        input row (x_t, or the layer below's output) -- to bfloat16 too
        (``activation_bits=16``): every product is then exact, the sums
        float32 (vdpbf16ps with AVX512_BF16: twice the float32 FMA rate).
        ``activation_bits=32`` keeps h and the inputs float32 (the weights
        still bfloat16).  int8 stores W_hh and, by default, W_ih too, as
        torch's and ONNX Runtime's dynamic quantization do, and quantizes the
        vectors they multiply per row for integer dot products: by default
        to 8 bits (q = rne(h * 127 / max|h|)), the arithmetic of torch's and
        ONNX Runtime's int8 LSTMs (one vpdpbusd per 64 weights);
        ``activation_bits=16`` to int16 codes instead (~250x finer, two
        vpdpbusd per 64 weights).  See README, "Reduced precision", for what
        each form costs and its error.

        ``input_weights="float32"`` keeps W_ih (and the input projection,
        inputs included) float32 with int8 or bfloat16 W_hh: exact in the
        inputs, e.g. for inputs whose features differ in scale by more than
        a code can resolve.  Left as None, ``input_weights`` and
        ``activation_bits`` keep the model's own choices when it is made the
        same precision again (so a loaded file's stored form is kept), else
        W_ih in the weights' precision and 8 bits (int8) or 16 (bfloat16).
        State, biases and the projection stay float32.  The copy's
        state_dict() returns the dequantized weights, so ``reference()``
        checks exactly what the engine runs.  float64 models stay
        float32-only."""
        prec = _check_precision(weights)
        same = prec == self.weights_precision
        if activation_bits is None:
            activation_bits = self.activation_bits if same else _DEFAULT_BITS[prec]
        if input_weights is None:
            in_prec = (self.input_weights_precision if same
                       else prec if prec in ("int8", "bfloat16") else "float32")
        else:
            try:
                in_prec = _check_precision(input_weights)
            except ValueError:
                in_prec = None
            allowed = ("float32", prec) if prec in ("int8", "bfloat16") else ("float32",)
            if in_prec not in allowed:
                raise ValueError(f"input_weights: expected one of {list(allowed)} with "
                                 f"weights={prec!r}, got {input_weights!r}")
        if (not isinstance(activation_bits, (int, np.integer)) or isinstance(activation_bits, bool)
                or activation_bits not in _ACT_BITS[prec]):
            raise ValueError(f"activation_bits: expected one of {sorted(_ACT_BITS[prec])} with "
                             f"weights={prec!r}, got {activation_bits!r}")
        if prec != "float32" and self.dtype != np.float32:
            raise DTypeError(f"weights: {prec} storage needs a float32 model, this one is {self.dtype}")
        state = self.__getstate__()  # takes the lock itself
        new = LSTM.__new__(LSTM)
        new.__dict__.update({k: v for k, v in state.items()
                             if k not in ("_stack", "_lock", "activation_bits_v2")})
        new._lock = threading.Lock()
        params = {k: v.copy() for k, v in self._params.items()}
        qforms = {}
        for k in params:
            p = _stored_precision(k, params[k].shape, prec, in_prec)
            if p == "float32":
                continue
            src = self._qforms.get(k)
            if src is not None and src[0] == p:
                qforms[k] = src
                continue
            qforms[k], params[k] = _quantize(params[k], p, _matrix_name(k))
        new.weights_precision = prec
        new.input_weights_precision = in_prec
        new.activation_bits = int(activation_bits)
        new._qforms = qforms
        new._params = params
        new._stack = new._new_stack(params, qforms)
        return new

    def quantized_weights(self):
        """The stored reduced-precision weights (W_hh, and W_ih with int8 or
        bfloat16 inputs): name -> (precision, data[, scale]), data as uint16
        bit patterns (float16/bfloat16) or int8 with float32 per-row scales;
        copies (editing them changes nothing: load_state_dict sets weights).
        Empty for a float32 model."""
        with self._lock:
            return {k: (v[0],) + tuple(a.copy() for a in v[1:]) for k, v in self._qforms.items()}

    def state_dict(self):
        """A copy of the weights under torch.nn.LSTM's names."""
        return {k: v.copy() for k, v in self._params.items()}

    def save(self, path):
        """Write configuration and weights to ``path`` (fastlstm.load reads it)."""
        from .io import save_model
        save_model(self, path)

    def load_state_dict(self, state_dict, strict=True):
        """Set weights from a mapping in torch.nn.LSTM's names and shapes.

        Values may be NumPy arrays or torch tensors; they are converted to the
        model's dtype and copied.  With strict=True (default) every weight must
        be present and no other key may be; otherwise missing keys keep their
        current values (unknown keys are still refused).
        """
        shapes = self._param_shapes()
        unknown = sorted(set(state_dict) - set(shapes))
        if unknown:
            raise WeightsError(f"state_dict: unexpected keys {unknown} for {self!r}")
        missing = sorted(set(shapes) - set(state_dict))
        if strict and missing:
            raise WeightsError(f"state_dict: missing keys {missing} for {self!r}")
        new = {}
        for k, v in state_dict.items():
            arr = _as_real(v, f"state_dict[{k!r}]", self.dtype)
            if arr.shape != shapes[k]:
                raise WeightsError(
                    f"state_dict[{k!r}]: expected shape {shapes[k]}, got {arr.shape}")
            new[k] = np.array(arr, dtype=self.dtype, order="C", copy=True)
        with self._lock:
            # Copy on write: pack a new Stack and swap it in.  A call running on
            # the old one in another thread (GIL released) keeps it alive and
            # never sees a freed or half-packed cell.
            params = dict(self._params)
            qforms = dict(self._qforms)
            for k in new:
                p = _stored_precision(k, new[k].shape, self.weights_precision,
                                      self.input_weights_precision)
                if p != "float32":
                    qforms[k], new[k] = _quantize(new[k], p, _matrix_name(k))
            params.update(new)
            self._stack = self._new_stack(params, qforms)
            self._params = params
            self._qforms = qforms

    def set_weights(self, layer, direction=0, *, w_ih=None, w_hh=None, b_ih=None, b_hh=None,
                    w_hr=None, peephole=None):
        """Set one layer/direction's weights in PyTorch's layout (gate order
        i, f, g, o): w_ih (4H, In), w_hh (4H, Hout), b_ih and b_hh (4H),
        w_hr (P, H), peephole (3, H) for i, f, o.  Arguments left as None
        keep their current value."""
        layer = _positive_int(layer, "layer", 0)
        if layer >= self.num_layers:
            raise ValueError(f"layer: expected 0..{self.num_layers - 1}, got {layer}")
        if direction not in range(self.num_directions):
            raise ValueError(f"direction: expected 0..{self.num_directions - 1}, got {direction}")
        s = f"l{layer}" + ("_reverse" if direction else "")
        given = {"weight_ih_": w_ih, "weight_hh_": w_hh, "bias_ih_": b_ih, "bias_hh_": b_hh,
                 "weight_hr_": w_hr, "peephole_": peephole}
        sd = {k + s: v for k, v in given.items() if v is not None}
        self.load_state_dict(sd, strict=False)

    def get_weights(self, layer, direction=0):
        """Copies of one layer/direction's weights: a dict with w_ih, w_hh,
        b_ih, b_hh (None without bias), w_hr (None without projection) and
        peephole (None without peepholes)."""
        s = f"l{layer}" + ("_reverse" if direction else "")
        if "weight_ih_" + s not in self._params:
            raise ValueError(f"layer/direction: no cell {s!r} in {self!r}")
        g = lambda k: self._params[k + s].copy() if (k + s) in self._params else None  # noqa: E731
        return {"w_ih": g("weight_ih_"), "w_hh": g("weight_hh_"), "b_ih": g("bias_ih_"),
                "b_hh": g("bias_hh_"), "w_hr": g("weight_hr_"), "peephole": g("peephole_")}

    @property
    def packed_nbytes(self):
        """Bytes of the packed (kernel layout) weights."""
        return self._stack.packed_bytes()

    # -------------------------------------------------------------- pickling
    def __getstate__(self):
        """Pickle the configuration and the canonical weights (state_dict
        arrays) only: never the packed layout nor the engine's Stack, which
        __setstate__ rebuilds.  The pickle is about the weights' size."""
        with self._lock:
            state = {k: v for k, v in self.__dict__.items()
                     if k not in ("_stack", "_lock", "_finite_cache")}
            state["_params"] = dict(self._params)
        state["activation_bits_v2"] = True  # activation_bits 32: float32 (see __setstate__)
        return state

    def __setstate__(self, state):
        state = dict(state)
        _check_pickled_config(state)
        state.setdefault("input_weights_precision", "float32")  # pickles before int8 W_ih
        int8 = state.get("weights_precision", "float32") == "int8"
        if not state.pop("activation_bits_v2", False) and not int8:
            # Pickles before bfloat16 dot products: 16 meant float32
            # activations for every precision but int8.
            state["activation_bits"] = 32
        state.setdefault("activation_bits", 16 if int8 else 32)
        self.__dict__.update(state)
        self._lock = threading.Lock()
        shapes = self._param_shapes()
        params = self._params
        if set(params) != set(shapes) or any(
                np.shape(params[k]) != shapes[k] or np.asarray(params[k]).dtype != self.dtype
                for k in shapes):
            raise WeightsError(f"pickle: weights do not match the configuration of {self!r}")
        self._qforms = _check_pickled_qforms(state.get("_qforms", {}), params,
                                             self.weights_precision,
                                             self.input_weights_precision, repr(self))
        self._stack = self._new_stack(params)

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_state_dict(cls, state_dict, *, batch_first=False, dtype=None, prefix="",
                        num_threads=None, **cell_options):
        """Build a model from a torch.nn.LSTM state dict.

        The configuration (input_size, hidden_size, num_layers, bias,
        bidirectional, proj_size) is inferred from the keys and shapes.
        ``prefix`` selects an LSTM inside a larger model's state dict (e.g.
        ``"encoder.lstm."``); keys outside the prefix are ignored.  ``dtype``
        defaults to the weights' dtype if float64, else float32.  Keys
        ``peephole_l{k}`` (3, hidden) turn peepholes on; other cell variant
        options (activations, clip, ...) are passed as keywords.
        """
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if "weight_ih_l0" not in sd:
            raise WeightsError(
                f"state_dict: missing key {prefix + 'weight_ih_l0'!r} (found keys: "
                f"{sorted(state_dict)[:8]}{' ...' if len(state_dict) > 8 else ''})")
        for key in ("weight_hh_l0",):
            if key not in sd:
                raise WeightsError(f"state_dict: missing key {prefix + key!r}")
        arrays = {k: _to_numpy(v, f"state_dict[{prefix + k!r}]") for k, v in sd.items()}
        w_ih, w_hh = arrays["weight_ih_l0"], arrays["weight_hh_l0"]
        if w_ih.ndim != 2 or w_hh.ndim != 2 or w_hh.shape[0] % 4 or w_ih.shape[0] != w_hh.shape[0]:
            raise WeightsError(
                f"state_dict: {prefix}weight_ih_l0 {w_ih.shape} and {prefix}weight_hh_l0 "
                f"{w_hh.shape} are not (4*hidden, input) and (4*hidden, hidden_or_proj)")
        hidden = w_hh.shape[0] // 4
        layers = 0
        while f"weight_ih_l{layers}" in arrays:
            layers += 1
        proj = arrays["weight_hr_l0"].shape[0] if "weight_hr_l0" in arrays else 0
        if dtype is None:
            dtype = (np.float64 if w_ih.dtype.kind == "f" and w_ih.dtype.itemsize == 8
                     else np.float32)  # either byte order
        model = cls(w_ih.shape[1], hidden, num_layers=layers, bias="bias_ih_l0" in arrays,
                    batch_first=batch_first, bidirectional="weight_ih_l0_reverse" in arrays,
                    proj_size=proj, dtype=dtype, num_threads=num_threads,
                    peepholes=cell_options.pop("peepholes", "peephole_l0" in arrays),
                    **cell_options)
        model.load_state_dict(arrays, strict=True)
        return model

    @classmethod
    def from_torch(cls, module, *, dtype=None, num_threads=None):
        """Build a model from a live torch.nn.LSTM (weights are copied)."""
        cls_name = type(module).__name__
        if not hasattr(module, "state_dict") or not hasattr(module, "hidden_size"):
            raise TypeError(f"module: expected a torch.nn.LSTM, got {cls_name}")
        if getattr(module, "mode", "LSTM") != "LSTM":
            raise TypeError(f"module: expected a torch.nn.LSTM, got {cls_name} ({module.mode})")
        if not hasattr(module, "num_layers") or not hasattr(module, "batch_first"):
            # nn.LSTMCell (live or scripted): no layers, no sequence layout
            hint = ("; a cell loads with fastlstm.io.from_torch_cell(cell)"
                    if hasattr(module, "weight_ih") else "")
            raise TypeError(f"module: expected a torch.nn.LSTM, got {cls_name} (no num_layers "
                            f"or batch_first){hint}")
        sd = {k: v for k, v in module.state_dict().items()}
        model = cls.from_state_dict(sd, batch_first=bool(module.batch_first), dtype=dtype,
                                    num_threads=num_threads)
        model.dropout = float(getattr(module, "dropout", 0.0))
        return model

    # ------------------------------------------------------------------ call
    def __call__(self, x, hx=None, *, lengths=None, mask=None, padding="zeros", num_threads=None):
        """Run the model: ``out, (h_n, c_n) = m(x, hx=None)``.

        x: (T, N, input_size), or (N, T, input_size) with batch_first, or
        unbatched (T, input_size).  Any real dtype is accepted and converted
        to the model's dtype (float32 by default); bool, complex, object and
        string arrays are refused.  Any memory layout works (non-contiguous
        and Fortran-ordered inputs are read through their strides or copied).
        hx: None (zeros) or (h_0, c_0) shaped (D*num_layers, N, output_size)
        and (D*num_layers, N, hidden_size); unbatched input takes 2-D states.
        lengths: None, or N integers in [0, T] (one int for unbatched input):
        sequence n has lengths[n] valid steps (PyTorch PackedSequence and ONNX
        sequence_lens semantics): steps past its end are not computed (no work
        is spent on them), h_n and c_n hold the state after its last valid step
        (the initial state for length 0), the reverse direction runs over the
        valid prefix only, and the batch may be in any order.
        mask: None, or booleans of x's shape without its last axis ((T, N),
        (N, T) with batch_first, (T,) unbatched; integer 0/1 also taken):
        True marks a valid step, in any pattern (Keras masks: a ``Masking``
        layer or ``Embedding(mask_zero=True)``, holes inside a sequence
        included).  A masked step is skipped as Keras skips it: the state
        carries over it unchanged and no work is spent on it; the reverse
        direction runs over the valid steps in reverse order; h_n and c_n are
        the state after each sequence's last valid step.  Its output is set by
        ``padding`` (below) as past a sequence's end.  A mask whose valid steps
        form each row's prefix is the same call as ``lengths=mask.sum(time)``
        (bitwise); one with holes costs a copy of x and of the output on top.
        Give lengths or mask, not both.
        padding: what `out` holds past a sequence's end (and at masked steps): "zeros" (PyTorch,
        ONNX Runtime, and Keras 3's Bidirectional, which forces zero outputs
        for masked steps) or "repeat" (a unidirectional Keras LSTM with a mask:
        the output repeats the last valid one, zeros before the first; on a
        bidirectional model only the forward half repeats and the reverse half
        is zero).
        Returns NumPy arrays of the model's dtype with torch.nn.LSTM's shapes:
        out (T, N, D*output_size) (batch_first: (N, T, ...)), h_n, c_n.
        """
        if lengths is None and mask is None and padding == "zeros":
            res = self._call_fast(x, hx, num_threads)
            if res is not None:
                return res
        dt = self.dtype
        x = _as_real(x, "x", dt)
        want = (f"(T, {self.input_size}) unbatched or "
                f"{'(N, T' if self.batch_first else '(T, N'}, {self.input_size})")
        if x.ndim not in (2, 3):
            raise ShapeError(
                f"x: expected a 2-D (unbatched) or 3-D array of shape {want}, got {x.ndim}-D "
                f"with shape {x.shape}")
        if x.shape[-1] != self.input_size:
            raise ShapeError(
                f"x: expected input_size {self.input_size} in the last dimension, shape {want}, "
                f"got shape {x.shape}")
        unbatched = x.ndim == 2
        if unbatched:
            xt = x[:, None, :]
        elif self.batch_first:
            xt = x.transpose(1, 0, 2)
        else:
            xt = x
        T, N = xt.shape[0], xt.shape[1]
        LD, H, Hout = self.num_layers * self.num_directions, self.hidden_size, self.output_size
        # The engine counts steps and rows in C ints; its buffers (output, inter-layer
        # outputs, gate chunk) must stay far from size_t overflow.
        if T >= _INT_MAX or N >= _INT_MAX:
            raise ShapeError(f"x: T and N must each be below 2**31 - 1, got T={T}, N={N} "
                             f"from shape {x.shape} (expected {want})")
        need = _call_bytes(T, N, H, LD, Hout, dt)
        if need >= 2 ** 62:
            raise ShapeError(f"x: shape {x.shape} too large: the output and workspace would "
                             f"need about {need} bytes")
        if padding not in ("zeros", "repeat"):
            raise ValueError(f"padding: expected 'zeros' or 'repeat', got {padding!r}")
        if mask is not None:
            if lengths is not None:
                raise ValueError("lengths, mask: give one of them, not both")
            mtn = _check_mask(mask, x.shape[:-1], unbatched, self.batch_first)
            cnt = mtn.sum(axis=0, dtype=np.int32)
            if np.array_equal(mtn, np.arange(T)[:, None] < cnt[None, :]):
                lengths = cnt[0] if unbatched else cnt  # valid steps are prefixes: lengths
            else:
                return self._call_masked(xt, hx, mtn, cnt, padding, num_threads, unbatched)
        xt = _engine_layout(xt)
        h0 = c0 = None
        if hx is not None:
            hshape = (LD, Hout) if unbatched else (LD, N, Hout)
            cshape = (LD, H) if unbatched else (LD, N, H)
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ShapeError(f"hx: expected a tuple (h_0, c_0) of shapes {hshape} and "
                                 f"{cshape}, or None, got {type(hx).__name__}"
                                 + (f" of length {len(hx)}" if isinstance(hx, (tuple, list))
                                    else ""))
            h0 = np.require(_as_real(hx[0], "hx[0] (h_0)", dt), requirements=["C", "A"])
            c0 = np.require(_as_real(hx[1], "hx[1] (c_0)", dt), requirements=["C", "A"])
            if h0.shape != hshape:
                raise ShapeError(f"hx[0] (h_0): expected shape {hshape}, got {h0.shape}")
            if c0.shape != cshape:
                raise ShapeError(f"hx[1] (c_0): expected shape {cshape}, got {c0.shape}")
        elif not self._whh_finite():
            # The engine skips h_{t-1} W_hh^T while h is zero; with an Inf or
            # NaN in W_hh that product is NaN (0 * Inf), as torch computes it.
            h0 = np.zeros((LD, N, Hout), dt)
            c0 = np.zeros((LD, N, H), dt)
            if unbatched:
                h0, c0 = h0[:, 0], c0[:, 0]
        D = self.num_directions
        lens = order = None
        if lengths is not None:
            lens = _check_lengths(lengths, N, T, unbatched)
            order = np.argsort(-lens, kind="stable")
            if np.array_equal(order, np.arange(N)):
                order = None
            else:
                lens = np.ascontiguousarray(lens[order])
                xt = np.ascontiguousarray(xt[:, order])
                if h0 is not None:
                    h0 = np.ascontiguousarray(h0[:, order]) if not unbatched else h0
                    c0 = np.ascontiguousarray(c0[:, order]) if not unbatched else c0
        out, yt, hn, cn = _new_outputs(T, N, D, LD, H, Hout, dt, self.batch_first, unbatched,
                                       np.empty if lens is None else np.zeros)
        nt = num_threads if num_threads is not None else self.num_threads
        nt = 0 if nt is None else _positive_int(nt, "num_threads", 1)
        nt = min(nt, _INT_MAX)  # the engine clamps to the CPU count anyway
        stack = self._stack  # one snapshot per call (load_state_dict swaps it)
        ws = np.empty(stack.workspace_bytes(T, N), np.uint8)
        if order is None:
            stack.forward(xt, yt, h0, c0, hn, cn, ws, nt, lens)
        else:  # run on the batch sorted by length, then put rows back
            ys = np.zeros((T, N, D * Hout), dt)
            hs, cs = np.empty_like(hn), np.empty_like(cn)
            stack.forward(xt, ys, h0, c0, hs, cs, ws, nt, lens)
            yt[:, order] = ys
            hn[:, order] = hs
            cn[:, order] = cs
            lens = lens[np.argsort(order)]
        if lens is not None and padding == "repeat":
            for n in np.nonzero((lens > 0) & (lens < T))[0]:
                yt[lens[n]:, n, :Hout] = yt[lens[n] - 1, n, :Hout]
        if unbatched:
            return out, (hn[:, 0, :], cn[:, 0, :])
        return out, (hn, cn)

    forward = __call__

    def _call_masked(self, xt, hx, mtn, cnt, padding, num_threads, unbatched):
        """__call__ with a mask that has holes: each sequence's valid steps
        are gathered to the front (in order), run as sequences of cnt[n]
        steps (the lengths path: nothing computed past them), and the outputs
        put back at the valid steps; masked steps get zeros, or with "repeat"
        the forward half of the last valid output before them.
        xt: (T, N, input_size) time-major; mtn: (T, N) bool; cnt: (N,) int32."""
        T, N = mtn.shape
        # valid steps first, in their order (a stable sort of "is masked")
        src = np.argsort(~mtn, axis=0, kind="stable")
        xc = np.take_along_axis(xt, src[:, :, None], axis=0)
        if unbatched:
            xin, lens = xc[:, 0], cnt[0]
        else:
            xin, lens = (xc.transpose(1, 0, 2) if self.batch_first else xc), cnt
        out, (hn, cn) = self(xin, hx, lengths=lens, padding="zeros", num_threads=num_threads)
        yc = out[:, None] if unbatched else (out.transpose(1, 0, 2) if self.batch_first else out)
        # k[t, n]: valid steps of sequence n up to t inclusive, so a valid step
        # t's output is yc[k - 1]: gathered from [zeros; yc] at k (0: zeros)
        k = np.cumsum(mtn, axis=0, dtype=np.intp)
        y0 = np.concatenate([np.zeros((1,) + yc.shape[1:], yc.dtype), yc])
        Hout = self.output_size
        if self.batch_first and not unbatched:  # gather straight into (N, T, F)
            y0, k, mtn = y0.transpose(1, 0, 2), k.T, mtn.T
            ax = 1
        else:
            ax = 0
        repeat, D = padding == "repeat", self.num_directions
        # one gather: at k (repeat: every step's last valid output so far) or
        # at k where valid and 0 (zeros) elsewhere; a bidirectional repeat
        # fills its forward half at k after
        y = np.take_along_axis(y0, (k if repeat and D == 1 else np.where(mtn, k, 0))[..., None],
                               axis=ax)
        if repeat and D == 2:
            y[..., :Hout] = np.take_along_axis(y0[..., :Hout], k[..., None], axis=ax)
        y = y[:, 0] if unbatched else np.ascontiguousarray(y)  # the layout of other calls' out
        return y, (hn, cn)

    def _call_fast(self, x, hx, num_threads):
        """__call__ for what needs no conversion and no check beyond a few
        comparisons -- a 3-D ndarray of the model's dtype, C-contiguous and
        aligned, of the right input size; hx None (with finite W_hh) or two
        such arrays of exactly the state shapes; no lengths -- or None, and
        __call__ takes its general path (which converts, or raises the
        clear error).  The checks, the allocations and the engine call are in
        Cython (Stack.call_fast): the same engine call with the same
        arguments as the general path makes for such inputs, so the same
        bits (a one-step call in a loop, as nn.LSTM is used: ~1.0 us in all
        at hidden 16 on Zen 4 against 3.3 with these checks in Python and
        ~20 on the general path)."""
        if num_threads is None:
            nt = self.num_threads
            nt = 0 if nt is None else nt
        elif type(num_threads) is int and 1 <= num_threads < _INT_MAX:
            nt = num_threads  # the common case without _positive_int's checks
        else:
            nt = min(_positive_int(num_threads, "num_threads", 1), _INT_MAX)
        if hx is None and not self._whh_finite():
            return None
        # one snapshot of the stack per call (load_state_dict swaps it)
        return self._stack.call_fast(x, hx, nt, self.batch_first)

    def _whh_finite(self):
        """Whether every W_hh is finite (cached per weights dict)."""
        p = self._params
        cached = self.__dict__.get("_finite_cache")
        if cached is None or cached[0] is not p:
            ok = all(bool(np.isfinite(v).all()) for k, v in p.items() if k.startswith("weight_hh_"))
            self.__dict__["_finite_cache"] = cached = (p, ok)
        return cached[1]

    def stream(self, batch=1, *, num_threads=None):
        """A stateful runner for real-time use: ``s = m.stream(batch=1)``;
        ``y_t = s.step(x_t)`` for one step, ``s(chunk)`` for several, ``s.reset()``,
        ``s.state``.  Unidirectional models only.  See fastlstm.stream.Stream."""
        from .stream import Stream
        return Stream(self, batch, num_threads=num_threads)

    def reference(self, x, hx=None):
        """The float64 NumPy reference (fastlstm.reference) run on this model's
        weights and configuration: the oracle the C engine is tested against.
        With int8 weights it also quantizes h_{t-1} (and, with int8 W_ih, each
        input row) per row to the model's activation_bits (8 or 16), as the
        engine does (reference.quantize_h_int16)."""
        from .reference import lstm_forward
        q = "int8" if self.activation_bits == 8 else "int16"
        bf = self.weights_precision == "bfloat16" and self.activation_bits == 16
        qh = q if self.weights_precision == "int8" else "bfloat16" if bf else None
        qx = (q if self.input_weights_precision == "int8" else "bfloat16"
              if bf and self.input_weights_precision == "bfloat16" else None)
        peep = {k[len("peephole_"):]: v for k, v in self._params.items()
                if k.startswith("peephole_")}
        cell = {"activations": self.activations, "alpha": self.activation_alpha,
                "beta": self.activation_beta, "clip": self.clip, "cell_clip": self.cell_clip,
                "input_forget": self.input_forget}
        return lstm_forward(self._params, x, hx, num_layers=self.num_layers,
                            bidirectional=self.bidirectional, batch_first=self.batch_first,
                            cell=cell, peepholes=peep or None,
                            quantize_h=qh,
                            quantize_x=qx)


_PRECISIONS = {"float32": 0, "float16": 1, "bfloat16": 2, "int8": 3}
_BF16_DOT = 4  # the engine's bfloat16 W_hh with bfloat16 dot products (FL_W_BF16D)


def _check_precision(weights):
    name = getattr(weights, "name", weights)  # np.float16 / np.dtype work too
    if isinstance(weights, type) and issubclass(weights, np.generic):
        name = np.dtype(weights).name
    if name not in _PRECISIONS:
        raise ValueError(f"weights: expected one of {sorted(_PRECISIONS)}, got {weights!r}")
    return name


def _stored_precision(name, shape, prec, in_prec):
    """The precision a weight is stored in: W_hh in ``prec``, W_ih (when it
    has columns) in ``in_prec``, everything else float32."""
    if name.startswith("weight_hh_"):
        return prec
    if name.startswith("weight_ih_") and shape[1] > 0:
        return in_prec
    return "float32"


def _matrix_name(key):
    """'weight_hh_l0' -> 'W_hh (weight_hh_l0)' for messages."""
    return ("W_hh" if key.startswith("weight_hh_") else "W_ih") + f" ({key})"


def _dequantize(qf):
    """A stored form (precision, data[, scale]) -> its float32 values, as the
    kernels widen them."""
    if qf[0] == "float16":
        return qf[1].view(np.float16).astype(np.float32)
    if qf[0] == "bfloat16":
        return (qf[1].astype(np.uint32) << 16).view(np.float32)
    return (qf[1].astype(np.float32) * qf[2][:, None]).astype(np.float32)


def _quantize(w, prec, name="W_hh"):
    """float32 (4H, K) -> (qform, dequantized float32 values).

    float16: IEEE round to nearest even (values beyond its range refused).
    bfloat16: the upper 16 bits of float32, rounded to nearest even (finite
    values that would round to Inf refused).
    int8: symmetric, one scale per output row: scale = max|row| / 127,
    q = round(w / scale) in [-127, 127]; W = q * scale.
    """
    w = np.ascontiguousarray(w, dtype=np.float32)
    if prec == "float16":
        with np.errstate(over="ignore"):
            h = w.astype(np.float16)
        if np.isinf(h).any() and not np.isinf(w[np.isinf(h)]).all():
            raise WeightsError(f"weights: {name} has values beyond float16's range (65504)")
        qf = ("float16", h.view(np.uint16))
        return qf, _dequantize(qf)
    if prec == "bfloat16":
        bits = w.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded = np.where(np.isnan(w), np.uint16(0x7FC0), rounded)
        # A bfloat16 denormal is a float32 denormal, which every kernel reads as
        # zero (denormals are flushed): stored as the signed zero it acts as, so
        # state_dict() and reference() hold exactly what the engine multiplies.
        qf = ("bfloat16", np.where((rounded & 0x7F80) == 0, rounded & 0x8000,
                                   rounded).astype(np.uint16))
        deq = _dequantize(qf)
        if (np.isinf(deq) & np.isfinite(w)).any():  # as float16 refuses its range
            raise WeightsError(f"weights: {name} has values beyond bfloat16's range "
                               f"(~3.39e38): they would round to Inf")
        return qf, deq
    if not np.isfinite(w).all():
        raise WeightsError(f"weights: int8 storage needs finite {name}")
    amax = np.abs(w).max(axis=1)
    # A row whose largest |w| is below float32's smallest normal is zero to the
    # engine (it flushes denormals) and its scale would underflow: stored as
    # zeros with scale 1, as an all-zero row.
    tiny = amax < np.finfo(np.float32).tiny
    w = np.where(tiny[:, None], np.float32(0), w)
    scale = np.where(tiny, 1.0, amax / 127.0).astype(np.float32)
    qf = ("int8", np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale)
    return qf, _dequantize(qf)


def _engine_layout(a):
    """``a`` itself if the engine can read it through its strides, else an
    aligned C-contiguous copy.  The engine reads rows through their
    (time, batch) strides: the last axis must be unit-stride, the other strides
    whole elements, and the data aligned (a view of a byte buffer at an odd
    offset is not)."""
    isz = a.dtype.itemsize
    if (a.strides[-1] != isz or any(s % isz for s in a.strides[:-1])
            or not a.flags.aligned):
        return np.require(a, requirements=["C", "A"])
    return a


def _check_mask(mask, shape, unbatched, batch_first):
    """mask -> (T, N) bool, time-major, or a clear error naming the argument.
    shape: x's shape without its last axis, which the mask must have."""
    arr = _to_numpy(mask, "mask")
    if arr.dtype != bool:
        if arr.dtype.kind not in "iu" or (arr.size and not np.isin(arr, (0, 1)).all()):
            raise DTypeError(f"mask: expected booleans (True = a valid step), or integers 0 "
                             f"and 1, got dtype {arr.dtype}"
                             + (" with other values" if arr.dtype.kind in "iu" else ""))
        arr = arr.astype(bool)
    if arr.shape != tuple(shape):
        what = "(T,)" if unbatched else ("(N, T)" if batch_first else "(T, N)")
        raise ShapeError(f"mask: expected x's shape without its last axis, {what} = "
                         f"{tuple(shape)}, got shape {arr.shape}")
    if unbatched:
        return arr[:, None]
    return arr.T if batch_first else arr


def _valid_ends(mask):
    """(N, T) bool -> int32 (N,): one past each row's last True (0 for none)."""
    T = mask.shape[1]
    return np.where(mask.any(axis=1), T - np.argmax(mask[:, ::-1], axis=1), 0).astype(np.int32)


def _check_lengths(lengths, N, T, unbatched):
    """lengths -> int32 (N,), or a clear error naming the argument."""
    arr = _to_numpy(lengths, "lengths")
    if arr.size == 0 and arr.dtype.kind == "f" and isinstance(lengths, (list, tuple)):
        arr = arr.astype(np.int64)  # [] is float64 to NumPy
    if arr.dtype.kind not in "iu":
        raise DTypeError(f"lengths: expected integers, got dtype {arr.dtype}")
    if unbatched and arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.shape != (N,):
        want = "one int (unbatched input)" if unbatched else f"shape ({N},), one per sequence"
        raise ShapeError(f"lengths: expected {want}, got shape {arr.shape}")
    if N and (arr.min() < 0 or arr.max() > T):
        raise ShapeError(
            f"lengths: values must be in [0, T={T}], got min {arr.min()} and max {arr.max()}")
    return arr.astype(np.int32)


def _check_pickled_config(state):
    """The configuration of a pickled LSTM, checked as the constructor checks
    it (a bad one would fail at the first call, or worse)."""
    try:
        In = _positive_int(state["input_size"], "input_size", 0)
        H = _positive_int(state["hidden_size"], "hidden_size", 1)
        L = _positive_int(state["num_layers"], "num_layers", 1)
        P = _positive_int(state["proj_size"], "proj_size", 0)
        D = 2 if _flag(state["bidirectional"], "bidirectional") else 1
        if P >= H or max(In, H) >= 2 ** 24 or 4 * H * max(In, H) >= 2 ** 40 or L * D >= 2 ** 31:
            raise ValueError(f"sizes input {In}, hidden {H}, proj {P}, layers {L} out of range")
        _dtype_of(state["dtype"])
        for key in ("bias", "batch_first", "peepholes", "input_forget"):
            _flag(state[key], key)
        _parse_activations(state["activations"], state["activation_alpha"],
                           state["activation_beta"])
        _nonneg_float(state["clip"], "clip")
        _nonneg_float(state["cell_clip"], "cell_clip")
        prec = state.get("weights_precision", "float32")
        if prec not in _ACT_BITS:
            raise ValueError(f"weights_precision {prec!r}")
        in_prec = state.get("input_weights_precision", "float32")
        if in_prec not in ("float32", prec):
            raise ValueError(f"input_weights_precision {in_prec!r} with {prec}")
        if not isinstance(state["_params"], dict) or not isinstance(state.get("_qforms", {}), dict):
            raise TypeError("weights are not dicts")
    except (KeyError, TypeError, ValueError, DTypeError) as exc:
        raise WeightsError(f"pickle: not a valid fastlstm.LSTM configuration ({exc})") from exc


def _check_pickled_qforms(qforms, params, prec, in_prec, what):
    """The reduced-precision weights of a pickle, checked before the engine
    packs them: exactly the stored matrices the precisions imply, each of its
    weight's shape and type (the packers read 4H x K elements), and each
    dequantizing to the pickled float32 weight bit for bit -- what
    state_dict() and reference() give is what the engine runs."""
    def bad(why):
        return WeightsError(f"pickle: reduced-precision weights do not match {what}: {why}")
    want = {k for k in params
            if _stored_precision(k, params[k].shape, prec, in_prec) != "float32"}
    if set(qforms) != want:
        raise bad(f"stored matrices {sorted(qforms)}, expected {sorted(want)}")
    out = {}
    for k in sorted(want):
        qf, w = qforms[k], params[k]
        p = _stored_precision(k, w.shape, prec, in_prec)
        n = 3 if p == "int8" else 2
        if not isinstance(qf, tuple) or len(qf) != n or qf[0] != p:
            raise bad(f"{k}: expected a {p} form")
        data = qf[1]
        dt = np.int8 if p == "int8" else np.uint16
        if not isinstance(data, np.ndarray) or data.dtype != dt or data.shape != w.shape:
            raise bad(f"{k}: expected {np.dtype(dt).name} data of shape {w.shape}")
        if p == "int8":
            scale = qf[2]
            if (not isinstance(scale, np.ndarray) or scale.dtype != np.float32
                    or scale.shape != (w.shape[0],)):
                raise bad(f"{k}: expected float32 scales of shape ({w.shape[0]},)")
            qf = (p, np.ascontiguousarray(data), np.ascontiguousarray(scale))
        else:
            qf = (p, np.ascontiguousarray(data))
        if _dequantize(qf).tobytes() != np.ascontiguousarray(w).tobytes():
            raise bad(f"{k}: the {p} values differ from the float32 weights")
        out[k] = qf
    return out


def _flag(value, name):
    """A bool argument: bools, NumPy bools and the ints 0 and 1."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer))
                                               and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool, got {value!r}"[:200])


def _float_arg(value, name):
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"{name}: expected a number, got {value!r}"[:200]) from None


def _nonneg_float(value, name):
    if value is None:
        return 0.0
    v = _float_arg(value, name)
    if not v >= 0.0 or math.isinf(v):
        raise ValueError(f"{name}: expected a finite value >= 0 (0 or None: off), got {value!r}")
    return v


def _parse_activations(activations, alpha, beta):
    acts = _DEFAULT_ACTS if activations is None else tuple(activations)
    if len(acts) != 3:
        raise ValueError(f"activations: expected 3 names (f, g, h), got {activations!r}")
    acts = tuple(str(a).lower().replace("_", "") for a in acts)
    for a in acts:
        if a not in ACTIVATIONS:
            raise ValueError(f"activations: unknown activation {a!r}; known: {sorted(ACTIVATIONS)}")
    def fill(values, idx, name):
        out = []
        for k, a in enumerate(acts):
            v = None if values is None else values[k]
            out.append(float(ACTIVATIONS[a][idx]) if v is None else _float_arg(v, name))
        return tuple(out)
    for values, name in ((alpha, "activation_alpha"), (beta, "activation_beta")):
        if values is not None and len(values) != 3:
            raise ValueError(f"{name}: expected 3 values (None for a default), got {values!r}")
    return acts, fill(alpha, 1, "activation_alpha"), fill(beta, 2, "activation_beta")


_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr|peephole)_l(\d+)(_reverse)?$")


def _cell_of(key):
    m = _KEY.match(key)
    return int(m.group(2)), 1 if m.group(3) else 0

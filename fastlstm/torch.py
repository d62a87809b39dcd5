"""A PyTorch drop-in: ``torch.nn.LSTM``'s interface, fastlstm's engine underneath.

    import fastlstm.torch

    model.eval().requires_grad_(False)
    fastlstm.torch.convert(model)        # every nn.LSTM and nn.LSTMCell inside swapped, in place
    out = model(tokens, lengths)         # tensors and PackedSequences as before

    lstm = fastlstm.torch.LSTM.from_lstm(torch_lstm.eval().requires_grad_(False))
    lstm = fastlstm.torch.LSTM(8, 16, num_layers=2)   # nn.LSTM's constructor
    fastlstm.torch.convert(model, weights="int8")      # or stored in int8 (bfloat16, float16)

``fastlstm.torch.LSTMCell`` does the same for ``torch.nn.LSTMCell``
(``h, c = cell(x, (h, c))``, one engine step a call); what follows about
LSTM holds for it too.

``fastlstm.torch.LSTM`` is a subclass of ``torch.nn.LSTM`` whose ``forward``
runs fastlstm: same arguments (tensor or ``PackedSequence`` input,
``hx=(h_0, c_0)``, ``batch_first``, unbatched 2-D input), same outputs (a
``PackedSequence`` in gives a ``PackedSequence`` out with the same
``batch_sizes``, ``sorted_indices`` and ``unsorted_indices``; ``hx`` is
permuted by ``sorted_indices`` and ``h_n``/``c_n`` come back in the caller's
order, as torch does).

Inference only.  fastlstm computes no gradients, so:

* ``forward`` has ``torch.no_grad`` semantics: its outputs never require grad.
* Where autograd would need a gradient through the LSTM, it refuses
  (``UnsupportedError``) rather than cut the graph silently:
  ``convert``/``from_lstm`` refuse a module in training mode, and parameters
  that require grad while grad mode is on (call ``model.requires_grad_(False)``
  first, or convert under ``torch.no_grad()``/``torch.inference_mode()``);
  ``forward`` refuses a module in training mode, and inputs (``input``,
  ``h_0``, ``c_0``) that require grad while grad mode is on (call it under
  ``torch.no_grad()``/``torch.inference_mode()``, or freeze what feeds it).
  ``detach=True`` (constructor, ``from_lstm``, ``convert``) turns the two
  gradient refusals off: gradients then stop at this module, silently.
* CPU only, float32 or float64 weights (``fastlstm.DTypeError`` otherwise);
  other real input dtypes are converted to the weights' dtype (torch raises).

Weights: the module's parameters keep nn.LSTM's names (its ``state_dict`` is
unchanged by ``convert``) and share storage with the original ``nn.LSTM``'s
parameters, with ``requires_grad=False``.  fastlstm works on its own copy,
packed into the kernel's layout; before each call the parameters' version
counters, storage pointers, dtype and device are compared with the packed
copy's, so ``load_state_dict``, in-place updates and ``.double()`` repack
automatically.  Writes through ``.data``, and to inference tensors, bypass
version counters: call ``refresh()`` after those.  ``.fastlstm`` is the underlying ``fastlstm.LSTM``
(NumPy API, ``stream()``).

Zero-copy: CPU tensors of the weights' dtype are read through ``.numpy()``
(any strides) and the outputs are ``torch.from_numpy`` views of fastlstm's
arrays.  Packed inputs are scattered into a padded (T, N, In) array and the
output gathered back, which copies.

Not supported (each refused with ``UnsupportedError``): TorchScript
(``torch.jit.script``), tracing (``torch.jit.trace``, ``torch.export``, ONNX
export of a converted model: export the original), GPUs.  ``torch.compile``
works with a graph break around the call (forward is excluded from Dynamo).
"""
from __future__ import annotations

try:
    import torch
    from torch import nn
    from torch.nn.utils.rnn import PackedSequence
except ImportError as _exc:  # pragma: no cover - tested in a subprocess
    raise ImportError(
        "fastlstm.torch needs PyTorch, which could not be imported "
        f"({type(_exc).__name__}: {_exc}); install torch to use it (the rest of "
        "fastlstm does not need it)") from _exc

import warnings

import numpy as np

from .errors import DTypeError, FastLSTMError, ShapeError
from .model import LSTM as _NumpyLSTM

__all__ = ["LSTM", "LSTMCell", "convert", "UnsupportedError"]

_NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}


class UnsupportedError(FastLSTMError, ValueError):
    """The torch module or call needs what fastlstm does not do: training,
    gradients, a device other than the CPU, a customised nn.LSTM."""


# ------------------------------------------------------------------- checks
def _weights_arg(weights):
    """None or a precision name (fastlstm.LSTM.astype's) -> the name."""
    from .model import _check_precision
    return "float32" if weights is None else _check_precision(weights)


def _check_weights_dtype(weights, dtype, where):
    if weights != "float32" and dtype != torch.float32:
        raise DTypeError(f"{where}: weights={weights!r} needs float32 parameters, they are "
                         f"{dtype}")


def _param_names(module):
    """The weight names of an nn.LSTM or nn.LSTMCell, in fastlstm's order."""
    if isinstance(module, nn.LSTM):
        return list(module._flat_weights_names)
    return ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else [])


def _check_lstm(lstm, where, detach, base=None):
    """Refuse, with a message naming ``where``, an nn.LSTM (or with
    ``base=nn.LSTMCell`` an nn.LSTMCell) fastlstm cannot run."""
    base = base or nn.LSTM
    kind = base.__name__
    if not isinstance(lstm, base):
        raise TypeError(f"{where}: expected a torch.nn.{kind}, got {type(lstm).__name__}")
    if type(lstm).forward is not base.forward:
        raise UnsupportedError(
            f"{where}: {type(lstm).__name__} subclasses nn.{kind} and overrides forward; "
            "fastlstm would not run that code")
    try:
        from torch.nn.utils import parametrize
        parametrized = parametrize.is_parametrized(lstm)
    except ImportError:  # pragma: no cover
        parametrized = False
    hooks = [n for n in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
                         "_backward_pre_hooks") if getattr(lstm, n, None)]
    if parametrized or hooks:
        what = "parametrizations" if parametrized else "hooks (" + ", ".join(hooks) + ")"
        raise UnsupportedError(
            f"{where}: the nn.{kind} has {what} (weight_norm, pruning, ...); fastlstm would "
            "not run them.  Remove them (e.g. torch.nn.utils.remove_weight_norm) first")
    if lstm.training:
        raise UnsupportedError(
            f"{where}: the nn.{kind} is in training mode; fastlstm is inference-only "
            "(call model.eval() first)")
    params = [getattr(lstm, n) for n in _param_names(lstm)]
    _check_weights(params, where)
    if not detach and torch.is_grad_enabled() and any(p.requires_grad for p in params):
        raise UnsupportedError(
            f"{where}: parameters require grad and autograd is on; fastlstm computes no "
            "gradients.  Call model.requires_grad_(False) first, convert under "
            f"torch.no_grad() / torch.inference_mode(), or pass detach=True to let "
            f"gradients stop at the {kind}")


def _check_weights(params, where):
    devices = sorted({str(p.device) for p in params})
    if devices != ["cpu"]:
        raise UnsupportedError(
            f"{where}: weights are on {', '.join(devices)}; fastlstm runs on the CPU only "
            "(move the model with .cpu() first)")
    dtypes = sorted({str(p.dtype) for p in params})
    if len(dtypes) != 1 or params[0].dtype not in _NP_DTYPE:
        raise DTypeError(
            f"{where}: weights have dtype {', '.join(dtypes)}; fastlstm runs float32 or "
            "float64 (convert with .float() or .double() first)")


_FAST_DTYPES = frozenset((torch.float32, torch.float64))
_is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)


def _array(t, name, grad_check):
    """A CPU tensor -> a NumPy view of it (no copy)."""
    # the common case in a few attribute reads (a step of a small cell is a
    # few microseconds: each of the checks below costs ~0.1-0.4 us)
    if (type(t) is torch.Tensor and t.is_cpu and not t.requires_grad
            and t.dtype in _FAST_DTYPES):
        try:
            return t.numpy()
        except RuntimeError:  # e.g. a conjugate or negative view: the checks below say
            pass
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise UnsupportedError(f"{name}: tensor is on {t.device}; fastlstm runs on the CPU only")
    if grad_check and t.requires_grad:
        raise UnsupportedError(
            f"{name}: requires grad and autograd is on; fastlstm computes no gradients.  "
            "Call the model under torch.no_grad() / torch.inference_mode(), freeze what "
            "feeds the LSTM (requires_grad_(False)), or build the LSTM with detach=True")
    t = t.detach()
    if t.dtype == torch.bfloat16 or t.is_complex() or t.dtype == torch.bool:
        if t.dtype == torch.bfloat16:
            t = t.float()
        else:
            raise DTypeError(f"{name}: expected a real tensor, got dtype {t.dtype}")
    return t.numpy()


def _params_key(params, inference):
    """What tells whether the packed copy of ``params`` is current: each
    one's storage pointer (a change of dtype or device, .double(), .to(),
    gives new storage) and version counter (bumped by in-place writes).
    Inference tensors (``inference[k]``) have no version counter (reading it
    raises, at ~10 us): only a write inside inference mode can change them,
    and refresh() is needed after one."""
    if not any(inference):
        return tuple([v for p in params for v in (p.data_ptr(), p._version)])
    return tuple([v for p, inf in zip(params, inference)
                  for v in ((p.data_ptr(),) if inf else (p.data_ptr(), p._version))])


# ------------------------------------------------------------------- module
class _Engine:
    """What fastlstm.torch.LSTM and LSTMCell share: the packed fastlstm copy
    of the parameters, repacked when they change, and the checks of a call."""

    _kind = "LSTM"

    def _fastlstm_init(self, num_threads, detach, weights="float32"):
        self.num_threads = num_threads
        self.detach = bool(detach)
        self.weights = weights
        self._fl = None
        self._fl_key = None

    def _adopt(self, module, num_threads, detach, weights):
        """Finish from_lstm / from_cell: take ``module``'s parameters (shared
        storage, requires_grad=False), eval mode, packed once."""
        for name in _param_names(module):
            setattr(self, name, nn.Parameter(getattr(module, name).detach(),
                                             requires_grad=False))
        if isinstance(self, nn.LSTM):
            self._init_flat_weights()
        self._fastlstm_init(num_threads, detach, weights)
        self.train(False)
        self._sync()
        return self

    def _hx_arrays(self, hx, grad_check):
        """hx = (h_0, c_0) as the engine's arrays (see _state_array)."""
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ShapeError("hx: expected a tuple (h_0, c_0) or None")
        return (self._state_array(hx[0], 0, "hx[0] (h_0)", grad_check),
                self._state_array(hx[1], 1, "hx[1] (c_0)", grad_check))

    def _get_name(self):
        return "fastlstm.torch." + self._kind

    def __getstate__(self):
        state = dict(super().__getstate__())  # RNNBase drops its weakrefs there
        state["_fl"] = None  # the packed engine state is rebuilt on first use
        state["_fl_key"] = None
        state.pop("_last", None)  # LSTMCell: the last call's outputs
        return state

    # ---------------------------------------------------------- the engine
    @property
    def fastlstm(self):
        """The underlying ``fastlstm.LSTM`` (NumPy API), packed from the
        current parameters."""
        return self._sync()

    def refresh(self):
        """Repack the weights from the parameters (needed only after writes
        through ``.data``, which autograd's version counters do not see)."""
        self._fl_key = None
        return self._sync()

    def _names(self):
        """The weight names (fixed by the constructor's arguments: computed once)."""
        names = self.__dict__.get("_fl_names")
        if names is None:
            names = self.__dict__["_fl_names"] = _param_names(self)
        return names

    def _sync(self):
        names = self._names()
        params = [self._parameters[n] for n in names]
        inference = self.__dict__.get("_fl_inference")
        key = None
        if inference is not None and len(inference) == len(params):
            try:
                key = _params_key(params, inference)
            except RuntimeError:  # a parameter became an inference tensor: repack
                key = None
        if key is None or key != self._fl_key or self._fl is None:
            _check_weights(params, f"fastlstm.torch.{self._kind} weights")
            sd = {n if self._kind == "LSTM" else n + "_l0": p.detach().numpy()
                  for n, p in zip(names, params)}
            fl = _NumpyLSTM.from_state_dict(
                sd, batch_first=self.__dict__.get("batch_first", False),
                dtype=_NP_DTYPE[params[0].dtype], num_threads=self.num_threads)
            weights = getattr(self, "weights", "float32")  # pickles from before weights=
            if weights != "float32":
                _check_weights_dtype(weights, params[0].dtype, f"fastlstm.torch.{self._kind}")
                fl = fl.astype(weights)
            self._fl = fl
            self.__dict__["_fl_inference"] = inference = [p.is_inference() for p in params]
            self._fl_key = _params_key(params, inference)
        # (__dict__: a missing attribute costs nn.Module.__getattr__ ~1 us)
        elif self._fl.batch_first != self.__dict__.get("batch_first", False):
            self._fl.batch_first = self.batch_first
        return self._fl

    def __prepare_scriptable__(self):  # torch.jit.script calls it on every submodule
        raise UnsupportedError(
            f"fastlstm.torch.{self._kind}: TorchScript (torch.jit.script) is not supported: "
            f"the module runs NumPy and C code; script the original nn.{self._kind}, or "
            "leave this module unscripted")

    def _state_array(self, t, k, name, grad_check):
        """hx[k] as the engine takes it: the array behind a state tensor the
        last call returned (the same memory: a decoder loop feeding h_n, c_n
        back is not converted again), else a view of the tensor (LSTMCell:
        with a leading axis of 1, the one-step sequence's layer axis)."""
        last = self.__dict__.get("_last")
        if (last is not None and t is last[4 * k] and t.data_ptr() == last[4 * k + 1]
                and t.shape == last[4 * k + 2] and not t.requires_grad):
            return last[4 * k + 3]
        a = _array(t, name, grad_check)
        return a[None] if self._kind == "LSTMCell" else a

    def _remember(self, h, h_arr, c, c_arr):
        """Note the state tensors returned (views of h_arr, c_arr); in
        __dict__ directly: nn.Module.__setattr__ costs ~1 us."""
        self.__dict__["_last"] = (h, h.data_ptr(), h.shape, h_arr, c, c.data_ptr(), c.shape,
                                  c_arr)

    def _check_call(self):
        """The refusals of forward; returns whether inputs must not require grad."""
        if torch.jit.is_tracing() or (_is_exporting is not None and _is_exporting()):
            raise UnsupportedError(
                f"fastlstm.torch.{self._kind}: tracing (torch.jit.trace, torch.export, "
                "torch.onnx.export) cannot see into fastlstm's C code (the old tracer would "
                "record this call's outputs as constants); trace or export the original "
                f"nn.{self._kind}")
        if self.training:
            raise UnsupportedError(
                f"fastlstm.torch.{self._kind}: the module is in training mode (model.train() was "
                "called?); fastlstm is inference-only: call .eval()")
        grad_check = torch.is_grad_enabled() and not self.detach
        if grad_check and any(self._parameters[n].requires_grad for n in self._names()):
            raise UnsupportedError(
                f"fastlstm.torch.{self._kind}: its parameters require grad (requires_grad_(True) "
                "after conversion?) while grad mode is on; fastlstm computes no gradients: "
                "call requires_grad_(False), run under torch.no_grad()/inference_mode(), "
                "or build the module with detach=True")
        return grad_check


class LSTM(_Engine, nn.LSTM):
    """``torch.nn.LSTM`` running fastlstm (inference only; see the module doc).

    ``LSTM(input_size, hidden_size, ..., *, num_threads=None, detach=False,
    weights=None)`` takes nn.LSTM's constructor arguments (weights initialised
    by torch, with ``requires_grad=False``; the module starts in eval mode);
    ``LSTM.from_lstm(module)`` wraps an existing eval-mode ``nn.LSTM`` (its
    parameters are shared, not copied).  ``num_threads``: fastlstm threads per
    call (None: fastlstm's default, see ``fastlstm.set_num_threads``; torch's
    own thread setting does not apply).  ``weights``: the precision fastlstm
    stores the weights in ("float16", "bfloat16", "int8": see
    ``fastlstm.LSTM.astype``; None or "float32": exact), float32 parameters
    only; the parameters themselves stay float32.
    """

    def __init__(self, *args, num_threads=None, detach=False, weights=None, **kwargs):
        weights = _weights_arg(weights)
        super().__init__(*args, **kwargs)
        for p in self._flat_weights:
            p.requires_grad_(False)
        _check_weights_dtype(weights, getattr(self, self._flat_weights_names[0]).dtype, "weights")
        self._fastlstm_init(num_threads, detach, weights)
        self.eval()

    @classmethod
    def from_lstm(cls, lstm, *, num_threads=None, detach=False, weights=None):
        """Wrap an eval-mode ``torch.nn.LSTM``: the new module's parameters
        share storage with ``lstm``'s (``requires_grad=False``); fastlstm
        packs its own copy (in ``weights`` precision, see the class)."""
        weights = _weights_arg(weights)
        _check_lstm(lstm, "lstm", detach)
        _check_weights_dtype(weights, getattr(lstm, lstm._flat_weights_names[0]).dtype, "lstm")
        self = cls.__new__(cls)
        with warnings.catch_warnings():  # nn.LSTM's dropout warning was given already
            warnings.simplefilter("ignore")
            nn.LSTM.__init__(
                self, lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers,
                bias=lstm.bias, batch_first=lstm.batch_first, dropout=lstm.dropout,
                bidirectional=lstm.bidirectional, proj_size=getattr(lstm, "proj_size", 0),
                device="meta", dtype=getattr(lstm, lstm._flat_weights_names[0]).dtype)
        return self._adopt(lstm, num_threads, detach, weights)

    # -------------------------------------------------------------- forward
    def forward(self, input, hx=None):  # noqa: A002 - nn.LSTM's argument name
        grad_check = self._check_call()
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        x = _array(data, "input.data" if packed else "input", grad_check)
        if hx is not None:
            h0, c0 = self._hx_arrays(hx, grad_check)
        fl = self._sync()
        nt = self.num_threads
        if packed:
            return self._forward_packed(fl, input, x, None if hx is None else (h0, c0), nt)
        if x.ndim not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {x.ndim}D instead")
        if hx is not None:
            want = x.ndim
            if h0.ndim != want or c0.ndim != want:
                kind = "batched 3-D" if want == 3 else "unbatched 2-D"
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {want}-D but got "
                    f"({h0.ndim}-D, {c0.ndim}-D) tensors")
        out, (hn, cn) = fl(x, None if hx is None else (h0, c0), num_threads=nt)
        h, c = torch.from_numpy(hn), torch.from_numpy(cn)
        self._remember(h, hn, c, cn)  # fed back as the next hx: read through hn, cn
        return torch.from_numpy(out), (h, c)

    def _forward_packed(self, fl, input, x, hx, nt):
        batch_sizes = input.batch_sizes
        sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
        bs = batch_sizes.numpy()
        T = len(bs)
        N = int(bs[0]) if T else 0
        # valid[t, j]: sorted sequence j has step t.  Packed data is
        # time-major over the valid entries, so boolean indexing in C order
        # scatters and gathers it.
        valid = np.arange(N)[None, :] < bs[:, None]
        if x.ndim != 2 or x.shape[0] != int(bs.sum()) or x.shape[1] != self.input_size:
            raise ShapeError(
                f"input.data: expected shape ({int(bs.sum())}, {self.input_size}) for "
                f"batch_sizes summing to {int(bs.sum())}, got {tuple(x.shape)}")
        xp = np.zeros((T, N, self.input_size), fl.dtype)
        xp[valid] = x
        lens = valid.sum(axis=0)
        if hx is not None:
            h0, c0 = hx
            if h0.ndim != 3 or c0.ndim != 3:
                raise RuntimeError(
                    "For batched 3-D input, hx and cx should also be 3-D but got "
                    f"({h0.ndim}-D, {c0.ndim}-D) tensors")
            if sorted_indices is not None:
                si = sorted_indices.numpy()
                h0, c0 = h0[:, si], c0[:, si]
            hx = (h0, c0)
        xin = xp.transpose(1, 0, 2) if fl.batch_first else xp
        out, (hn, cn) = fl(xin, hx, lengths=lens, num_threads=nt)
        yt = out.transpose(1, 0, 2) if fl.batch_first else out
        y = yt[valid]
        if unsorted_indices is not None:
            ui = unsorted_indices.numpy()
            hn, cn = hn[:, ui], cn[:, ui]
        return (PackedSequence(torch.from_numpy(y), batch_sizes, sorted_indices,
                               unsorted_indices),
                (torch.from_numpy(hn), torch.from_numpy(cn)))


class LSTMCell(_Engine, nn.LSTMCell):
    """``torch.nn.LSTMCell`` running fastlstm (inference only, as LSTM: see
    the module doc): ``cell(input, hx=None) -> (h_1, c_1)``, input (N, In)
    or unbatched (In,), hx ``(h_0, c_0)`` each (N, H) or (H,).  One call is
    one step of fastlstm's engine (the fast path of ``fastlstm.LSTM``'s call:
    a decoder loop pays microseconds a step, not torch's dispatch).

    ``LSTMCell(input_size, hidden_size, bias=True, *, num_threads=None,
    detach=False, weights=None)`` takes nn.LSTMCell's constructor arguments;
    ``LSTMCell.from_cell(cell)`` wraps an eval-mode ``nn.LSTMCell`` (shared
    parameters); ``convert`` swaps them too.
    """

    _kind = "LSTMCell"

    def __init__(self, *args, num_threads=None, detach=False, weights=None, **kwargs):
        weights = _weights_arg(weights)
        super().__init__(*args, **kwargs)
        for p in self.parameters():
            p.requires_grad_(False)
        _check_weights_dtype(weights, self.weight_ih.dtype, "weights")
        self._fastlstm_init(num_threads, detach, weights)
        self.eval()

    @classmethod
    def from_cell(cls, cell, *, num_threads=None, detach=False, weights=None):
        """Wrap an eval-mode ``torch.nn.LSTMCell`` (parameters shared, with
        ``requires_grad=False``; fastlstm packs its own copy)."""
        weights = _weights_arg(weights)
        _check_lstm(cell, "cell", detach, base=nn.LSTMCell)
        _check_weights_dtype(weights, cell.weight_ih.dtype, "cell")
        self = cls.__new__(cls)
        nn.LSTMCell.__init__(self, cell.input_size, cell.hidden_size, bias=cell.bias,
                             device="meta", dtype=cell.weight_ih.dtype)
        return self._adopt(cell, num_threads, detach, weights)

    def forward(self, input, hx=None):  # noqa: A002 - nn.LSTMCell's argument name
        grad_check = self._check_call()
        x = _array(input, "input", grad_check)
        if x.ndim not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {x.ndim}D instead")
        hxs = None
        if hx is not None:
            h0, c0 = self._hx_arrays(hx, grad_check)
            if h0.ndim != x.ndim + 1 or c0.ndim != x.ndim + 1:
                raise RuntimeError(
                    f"LSTMCell: Expected hx[0] and hx[1] to be {x.ndim}D for {x.ndim}D "
                    f"input, got ({h0.ndim - 1}D, {c0.ndim - 1}D)")
            hxs = (h0, c0)
        # one step: (N, In) -> a (1, N, In) sequence; (In,) -> an unbatched (1, In) one
        fl = self._sync()
        nt = self.num_threads
        res = fl._call_fast(x[None], hxs, nt) if x.ndim == 2 else None  # None: not as it is
        _, (hn, cn) = res if res is not None else fl(x[None], hxs, num_threads=nt)
        h1, c1 = torch.from_numpy(hn[0]), torch.from_numpy(cn[0])
        self._remember(h1, hn, c1, cn)  # fed back as the next hx: read through hn, cn
        return h1, c1


# torch.compile: Dynamo must not trace into forward (it would follow the
# tensors into NumPy and C); a graph break runs the call eagerly instead.
# The disabled copy is entered only while Dynamo compiles: its wrapper costs
# ~2-3 us a call, as much as a whole step of a small cell.
def _eager_only(forward):
    compiler = getattr(torch, "compiler", None)
    if not hasattr(compiler, "disable") or not hasattr(compiler, "is_compiling"):
        return forward  # pragma: no cover - old torch
    disabled = compiler.disable(forward)
    is_compiling = compiler.is_compiling

    def dispatch(self, *args, **kwargs):
        if is_compiling():
            return disabled(self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    dispatch.__name__, dispatch.__doc__ = forward.__name__, forward.__doc__
    dispatch.__wrapped__ = forward
    return dispatch


LSTM.forward = _eager_only(LSTM.forward)
LSTMCell.forward = _eager_only(LSTMCell.forward)


# ------------------------------------------------------------------ convert
def convert(model, *, num_threads=None, detach=False, weights=None):
    """Swap every ``torch.nn.LSTM`` inside ``model`` for a
    ``fastlstm.torch.LSTM`` (and every ``nn.LSTMCell`` for a
    ``fastlstm.torch.LSTMCell``) in place, under the same attribute names, and
    return ``model``.  ``model`` itself may be an ``nn.LSTM`` or
    ``nn.LSTMCell``: the new module is returned (it cannot be swapped in
    place).  An LSTM reachable under several names becomes one module;
    already converted ones are kept.

    Checks every LSTM before swapping any (so a refusal leaves ``model``
    untouched) and refuses, naming the module: a model or LSTM in training
    mode, parameters requiring grad while grad mode is on (unless
    ``detach=True``), weights not on the CPU or not float32/float64, nn.LSTM
    subclasses that override forward, LSTMs with hooks or parametrizations,
    and ``weights`` other than float32 on float64 LSTMs.  ``weights``: the
    precision fastlstm stores the weights in ("float16", "bfloat16",
    "int8"; see ``fastlstm.LSTM.astype``), like torch's ``quantize_dynamic``
    but on fastlstm's kernels; None keeps them exact.
    """
    weights = _weights_arg(weights)
    if isinstance(model, (LSTM, LSTMCell)):
        return model
    wrap = dict(num_threads=num_threads, detach=detach, weights=weights)
    if isinstance(model, nn.LSTM):
        return LSTM.from_lstm(model, **wrap)
    if isinstance(model, nn.LSTMCell):
        return LSTMCell.from_cell(model, **wrap)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise UnsupportedError(
            "model: is in training mode; fastlstm is inference-only (call model.eval() "
            "before convert)")
    slots = []
    for parent_name, parent in model.named_modules():
        for name, child in parent._modules.items():
            cell = isinstance(child, nn.LSTMCell) and not isinstance(child, LSTMCell)
            if cell or (isinstance(child, nn.LSTM) and not isinstance(child, LSTM)):
                where = f"model.{parent_name + '.' if parent_name else ''}{name}"
                _check_lstm(child, where, detach, base=nn.LSTMCell if cell else nn.LSTM)
                _check_weights_dtype(weights, getattr(child, _param_names(child)[0]).dtype,
                                     where)
                slots.append((parent, name, child, where,
                              LSTMCell.from_cell if cell else LSTM.from_lstm))
    done = {}
    # build every module first: a refusal swaps none
    for parent, name, child, where, make in slots:
        if id(child) not in done:
            try:
                done[id(child)] = make(child, **wrap)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{where}: {exc}") from exc
    for parent, name, child, _, _ in slots:
        setattr(parent, name, done[id(child)])
    return model

"""Find LSTM stacks in a flat mapping of named tensors and build models.

Works on metadata only (name -> shape and dtype), so listing a file never
reads its tensor data.  A stack is either

* a ``torch.nn.LSTM`` under some prefix: ``<prefix>weight_ih_l0``,
  ``weight_hh_l0``, optional ``bias_ih_l0``/``bias_hh_l0``,
  ``weight_hr_l0`` (proj_size), ``peephole_l0`` (fastlstm's peepholes), the
  same for every layer ``l{k}`` and, if bidirectional, ``..._reverse``; or
* a ``torch.nn.LSTMCell``: ``<prefix>weight_ih``, ``weight_hh``, optional
  ``bias_ih``/``bias_hh``, loaded as a one-layer LSTM.

Candidates whose shapes are not an LSTM's (a GRU's 3H rows, an RNN's H rows,
inconsistent layers) are not stacks; the reasons are kept for the error
message when nothing is found.
"""
from __future__ import annotations

import math
import re

import numpy as np

from ..errors import FormatError, WeightsError

__all__ = ["Stack", "find_stacks", "select_stack", "build_model", "flatten"]

_LAYER_KEY = re.compile(
    r"(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr|peephole)_l(0|[1-9][0-9]{0,5})(_reverse)?")
_CELL_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class Stack:
    """One LSTM found in a file.

    ``name``: how to ask for it (the prefix without a trailing '.'; '' for a
    state dict's root); ``prefix``: the key prefix; ``kind``: 'LSTM' or
    'LSTMCell'; ``keys``: torch.nn.LSTM parameter name -> source key;
    ``info``: dict describing it (see :func:`fastlstm.io.list_stacks`).
    """

    __slots__ = ("name", "prefix", "kind", "keys", "info")

    def __init__(self, name, prefix, kind, keys, info):
        self.name, self.prefix, self.kind, self.keys, self.info = name, prefix, kind, keys, info

    def __repr__(self):
        return f"Stack({self.name!r}, {self.kind}, {self.info})"


def _name_of(prefix):
    return prefix[:-1] if prefix.endswith(".") else prefix


class _Reject(Exception):
    pass


def _check_lstm(prefix, metas):
    """metas: param name (without prefix) -> (shape, dtype). Returns (keys, info)."""
    def shape(k):
        return metas[k][0]

    if "weight_hh_l0" not in metas:
        raise _Reject("no weight_hh_l0")
    for k, (shp, dt) in metas.items():
        if dt not in FLOAT_DTYPES:
            raise _Reject(f"{k} has dtype {dt}, not a float type")
        want = 1 if k.startswith("bias") else 2
        if len(shp) != want:
            raise _Reject(f"{k} has shape {shp}, expected {want}-D")
    w_ih, w_hh = shape("weight_ih_l0"), shape("weight_hh_l0")
    has_proj = "weight_hr_l0" in metas
    if has_proj:
        proj, hidden = shape("weight_hr_l0")
    else:
        proj, hidden = 0, w_hh[1]
    if hidden < 1 or w_hh[0] != 4 * hidden:
        raise _Reject(f"weight_hh_l0 {w_hh} is not (4*hidden, hidden): not an LSTM")
    if has_proj and not 0 < proj < hidden:
        raise _Reject(f"weight_hr_l0 {shape('weight_hr_l0')} is not (proj_size, hidden) with "
                      f"0 < proj_size < hidden")
    hout = proj or hidden
    layers = 0
    while f"weight_ih_l{layers}" in metas:
        layers += 1
    bidir = "weight_ih_l0_reverse" in metas
    dirs = 2 if bidir else 1
    has_bias = "bias_ih_l0" in metas
    has_peep = "peephole_l0" in metas
    expected = {}
    for layer in range(layers):
        in_size = w_ih[1] if layer == 0 else dirs * hout
        for d in range(dirs):
            s = f"l{layer}" + ("_reverse" if d else "")
            expected["weight_ih_" + s] = (4 * hidden, in_size)
            expected["weight_hh_" + s] = (4 * hidden, hout)
            if has_bias:
                expected["bias_ih_" + s] = (4 * hidden,)
                expected["bias_hh_" + s] = (4 * hidden,)
            if has_proj:
                expected["weight_hr_" + s] = (proj, hidden)
            if has_peep:
                expected["peephole_" + s] = (3, hidden)
    missing = sorted(set(expected) - set(metas))
    extra = sorted(set(metas) - set(expected))
    if missing or extra:
        raise _Reject(f"inconsistent layers: missing {missing[:6]}, unexpected {extra[:6]}")
    for k, want in expected.items():
        if tuple(shape(k)) != want:
            raise _Reject(f"{k} has shape {tuple(shape(k))}, expected {want}")
    dtypes = sorted({dt for _, dt in metas.values()})
    info = {"kind": "LSTM", "input_size": int(w_ih[1]), "hidden_size": int(hidden),
            "proj_size": int(proj), "num_layers": layers, "num_directions": dirs,
            "bidirectional": bidir, "bias": has_bias,
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "variant": "peepholes" if has_peep else "standard"}
    return {k: prefix + k for k in expected}, info


def _check_cell(prefix, metas):
    for k, (shp, dt) in metas.items():
        if dt not in FLOAT_DTYPES:
            raise _Reject(f"{k} has dtype {dt}, not a float type")
    if "weight_hh" not in metas:
        raise _Reject("no weight_hh")
    w_ih, w_hh = metas["weight_ih"][0], metas["weight_hh"][0]
    if len(w_ih) != 2 or len(w_hh) != 2:
        raise _Reject("weight_ih/weight_hh are not 2-D")
    hidden = w_hh[1]
    if hidden < 1 or tuple(w_hh) != (4 * hidden, hidden) or w_ih[0] != 4 * hidden:
        raise _Reject(f"weight_ih {tuple(w_ih)}, weight_hh {tuple(w_hh)} are not an LSTM cell's")
    has_bias = "bias_ih" in metas or "bias_hh" in metas
    if has_bias:
        for k in ("bias_ih", "bias_hh"):
            if k not in metas or tuple(metas[k][0]) != (4 * hidden,):
                raise _Reject(f"{k} missing or not of shape ({4 * hidden},)")
    dtypes = sorted({dt for _, dt in metas.values()})
    keys = {p + "_l0": prefix + p for p in _CELL_PARAMS if p in metas}
    info = {"kind": "LSTMCell", "input_size": int(w_ih[1]), "hidden_size": int(hidden),
            "proj_size": 0, "num_layers": 1, "num_directions": 1, "bidirectional": False,
            "bias": has_bias, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "variant": "standard"}
    return keys, info


def find_stacks(metas, fmt=None):
    """Find every LSTM in ``metas``: a mapping key -> (shape tuple, dtype name).

    Returns ``(stacks, rejected)``: Stack objects sorted by name, and a list of
    ``(prefix, reason)`` for candidates that are not LSTMs.
    """
    stacks, rejected = [], []
    for key in metas:
        if key.endswith("weight_ih_l0"):
            prefix, kind = key[: -len("weight_ih_l0")], "LSTM"
        elif key.endswith("weight_ih"):
            prefix, kind = key[: -len("weight_ih")], "LSTMCell"
        else:
            continue
        n = len(prefix)
        try:
            if kind == "LSTM":
                group = {k[n:]: metas[k] for k in metas
                         if k.startswith(prefix) and _LAYER_KEY.fullmatch(k, n)}
                keys, info = _check_lstm(prefix, group)
            else:
                group = {p: metas[prefix + p] for p in _CELL_PARAMS if prefix + p in metas}
                keys, info = _check_cell(prefix, group)
        except _Reject as exc:
            rejected.append((prefix, str(exc)))
            continue
        if fmt is not None:
            info = {"format": fmt, **info}
        stacks.append(Stack(_name_of(prefix), prefix, kind, keys, info))
    # Two prefixes that differ only by a trailing '.' would share a name.
    names = [s.name for s in stacks]
    for s in stacks:
        if names.count(s.name) > 1:
            s.name = s.prefix
    stacks.sort(key=lambda s: s.name)
    return stacks, rejected


def select_stack(stacks, name, where, rejected=()):
    """Pick the stack called ``name`` (exact name or prefix, else a unique
    dotted suffix), or the only stack when name is None."""
    names = [s.name for s in stacks]
    if name is None:
        if len(stacks) == 1:
            return stacks[0]
        if not stacks:
            msg = f"{where}: no LSTM weights found"
            if rejected:
                msg += "; candidates that are not an LSTM: " + "; ".join(
                    f"{_name_of(p) or '<root>'}: {r}" for p, r in list(rejected)[:8])
            raise FormatError(msg)
        raise FormatError(f"{where}: holds {len(stacks)} LSTM stacks, pass name= one of {names}")
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str or None, got {type(name).__name__}")
    for s in stacks:
        if name in (s.name, s.prefix):
            return s
    suffix = [s for s in stacks if s.name.endswith("." + name)]
    if len(suffix) == 1:
        return suffix[0]
    if len(suffix) > 1:
        raise FormatError(f"{where}: name {name!r} is ambiguous: {[s.name for s in suffix]}")
    raise FormatError(f"{where}: no LSTM stack named {name!r}; available: {names}")


def check_sizes(info, where):
    """Refuse sizes the LSTM constructor would refuse (as FormatError)."""
    sizes = (info["input_size"], info["hidden_size"], info["proj_size"])
    h = info["hidden_size"]
    if max(sizes) >= 2 ** 24 or 4 * h * max(info["input_size"], h) >= 2 ** 40:
        raise FormatError(f"{where}: LSTM sizes too large: input, hidden, proj = "
                          f"{str(sizes)[:120]}")


def build_model(stack, get, where, nbytes=None, budget=None, *, batch_first=None, dtype=None,
                num_threads=None, **cell_options):
    """Build a fastlstm.LSTM from a stack.

    ``batch_first``: None takes the stack's ``info["batch_first"]`` where the
    file records it (TorchScript, torch.export), else False.

    ``get(key)`` returns the NumPy array of a source key.  ``nbytes(key)``:
    the bytes a source tensor claims; ``budget``: the most bytes the stack's
    tensors may claim together (the file size).  A file whose views claim
    more than it holds is refused before anything is allocated.
    """
    from ..model import LSTM

    check_sizes(stack.info, where)
    if budget is not None and nbytes is not None:
        claimed = sum(nbytes(k) for k in stack.keys.values())
        if claimed > budget:
            raise FormatError(f"{where}: the weights of {stack.name or '<root>'!r} claim "
                              f"{claimed} bytes, more than the file's {budget}")
    arrays = {}
    for param, key in stack.keys.items():
        arr = get(key)
        if arr.dtype.kind != "f":
            raise FormatError(f"{where}: tensor {key!r} has dtype {arr.dtype}, not float")
        arrays[param] = arr
    if dtype is None:
        dtype = np.float64 if all(a.dtype == np.float64 for a in arrays.values()) else np.float32
    if batch_first is None:
        batch_first = stack.info.get("batch_first", False)
    try:
        return LSTM.from_state_dict(arrays, batch_first=batch_first, dtype=dtype,
                                    num_threads=num_threads, **cell_options)
    except WeightsError as exc:
        raise FormatError(f"{where}: {exc}") from exc


def flatten(obj, is_leaf, max_depth=64):
    """Flatten nested mappings/lists into {'a.b.0.c': leaf}.  Cycles and
    nesting deeper than max_depth are skipped; non str/int keys are skipped."""
    out = {}
    seen = set()

    def walk(node, path, depth):
        if is_leaf(node):
            out.setdefault(path, node)
            return
        if depth >= max_depth or id(node) in seen:
            return
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, (list, tuple)):
            items = list(enumerate(node))
        else:
            return
        seen.add(id(node))  # each container once: no cycles, no exponential DAGs
        for k, v in items:
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                continue
            walk(v, f"{path}.{k}" if path else str(k), depth + 1)

    walk(obj, "", 0)
    return out


def numel(shape):
    return math.prod(shape)

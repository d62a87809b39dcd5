"""Keras LSTMs on fastlstm: ``.keras`` archives, legacy ``.h5`` files and live layers.

What is read
    * ``.keras`` (Keras 3 and tf.keras >= 2.13): a zip of ``config.json``,
      ``metadata.json`` (``keras_version``) and ``model.weights.h5``, whose
      datasets sit at ``layers/<snake_case class name + counter>/cell/vars/0..2``
      (Bidirectional: ``.../forward_layer/cell/vars`` and ``backward_layer``).
    * Legacy full-model ``.h5`` (``model.save("x.h5")`` in Keras 2, tf.keras
      and Keras 3): root attrs ``keras_version``, ``backend``, ``model_config``
      (JSON) and a ``model_weights`` group whose ``layer_names`` /
      ``weight_names`` attrs give the order of the weights.
    * Weights-only ``.h5``: the legacy layout (``save_weights("x.h5")`` in
      Keras 2: the same groups at the root) and the Keras 3 layout
      (``save_weights("x.weights.h5")``: the ``.keras`` weights file alone).
      These hold no architecture: pass ``config=`` (the model's config dict
      or JSON) to get go_backwards, merge modes and activations right;
      without it the Keras defaults are assumed (see ``load_keras``).
    * Live Keras objects (``keras.Model``, ``keras.layers.LSTM`` /
      ``Bidirectional``; Keras 3, tf.keras and tf_keras) via ``from_keras``.

Nothing in a file is executed: ``config.json`` and ``model_config`` are parsed
as JSON only, no Lambda layer, custom object or pickle is ever loaded, and
every malformed or truncated file raises ``fastlstm.FormatError``.  h5py is
imported only when an HDF5 file is read.  Each weight's shape and dtype are
checked from its HDF5 header before it is read, listing reads no weight
data, and no more than 100x a file's size (+1 MiB) of weights is read from
it (HDF5 fill values and compressed chunks can declare gigabytes in a few
KB).  A damaged HDF5 file can still crash libhdf5 itself (h5py included):
read untrusted .h5 files in a separate process.

Semantics (checked against Keras itself in tests/test_io_keras.py)
    Keras LSTM weights are ``kernel`` (In, 4U), ``recurrent_kernel`` (U, 4U)
    and ``bias`` (4U) with gate order i, f, c, o, used as x·W; PyTorch's
    order i, f, g, o is the same, so W_ih = kernelᵀ, W_hh = recurrent_kernelᵀ
    and b_ih = bias (b_hh = 0).  ``unit_forget_bias`` only initialises: it is
    already in the saved bias.  ``recurrent_activation`` drives i, f, o and
    ``activation`` drives the candidate and the output; hard_sigmoid is
    clip(0.2x + 0.5, 0, 1) in Keras <= 2 / tf.keras but clip(x/6 + 0.5, 0, 1)
    in Keras 3, so the Keras version is read from the file.  ``go_backwards``
    returns its sequence in processing (reversed) order; Bidirectional flips
    the backward sequence back to time order before merging (concat, sum,
    mul, ave, or None for a list).  Keras 2 ``CuDNNLSTM`` stores two biases
    (8U, input | recurrent), which are summed.  Activations are function
    names (hard_sigmoid, sigmoid, tanh, relu, linear, elu, softsign,
    softplus, leaky_relu) or the layers Activation, LeakyReLU, ReLU (no
    max_value / threshold) and ELU (with its alpha recorded), their
    settings read from the config (never their names: ELU(alpha=0.5) is
    saved named "elu"); any other layer or object raises FormatError
    naming it.

Calling a stack
    ``KerasStack(x)`` takes batch-major input (N, T, In) (time-major for
    tf.keras ``time_major=True`` layers) and returns what the last Keras layer
    returns: its last output (N, U) or its sequence (N, T, U) per
    ``return_sequences``, a list [y, y_rev] for ``merge_mode=None`` and the
    states appended ([out, h, c], Bidirectional [out, h_f, c_f, h_b, c_b]) with
    ``return_state``.  Masks (Masking layers, ``mask_zero`` embeddings) are
    applied when given: ``stack(x, mask=m)``, m (N, T) True at valid steps,
    with Keras' semantics (a masked step is skipped, the state carries over;
    it outputs the last output, or zeros in a Bidirectional layer or with
    ``zero_output_for_mask``).  A file cannot say what the mask of a call is:
    without ``mask=`` a masked stack computes as if every step were valid (a
    warning at load time says so).  ``stateful=True`` is not honoured either: every call
    starts from zero state, as Keras after ``reset_states()`` (a warning
    says so); carry the state yourself with ``return_state=True`` and
    ``initial_state=``, or stream with ``m.stream(batch)`` on a
    fastlstm.LSTM (``stack.to_lstm()`` or a layer's ``.lstm``).
    ``load_keras(..., batch_first=)`` overrides the time layout;
    ``stack.astype(weights)`` stores every LSTM's weights in reduced
    precision (``fastlstm.load(path, weights="int8")`` calls it).
"""
from __future__ import annotations

import copy
import io
import json
import os
import re
import sys
import warnings
import zipfile

import numpy as np

from ..errors import FastLSTMError, FormatError, ShapeError
from ..model import LSTM, _to_numpy

__all__ = [
    "KerasStack", "KerasLayer", "load_keras", "list_keras_stacks", "from_keras",
    "is_keras_archive", "is_hdf5",
]

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_MAX_JSON = 64 << 20  # config.json / metadata.json larger than this are refused

_RECURRENT = ("LSTM", "CuDNNLSTM", "Bidirectional")
# Layers that are the identity at inference: a chain of LSTMs may pass through them.
_IDENTITY = ("Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout",
             "AlphaDropout", "ActivityRegularization")
_MODELS = ("Sequential", "Functional", "Model")
_MERGE_MODES = ("concat", "sum", "mul", "ave", None)


# ------------------------------------------------------------------ sniffing
def is_hdf5(head):
    """True if `head` (the first bytes of a file, >= 8) starts an HDF5 file.

    HDF5 allows a user block before the superblock (at 512, 1024, ...); pass
    enough bytes to see those too."""
    head = bytes(head)
    if head[:8] == HDF5_MAGIC:
        return True
    off = 512
    while off + 8 <= len(head):
        if head[off:off + 8] == HDF5_MAGIC:
            return True
        off *= 2
    return False


def is_keras_archive(path_or_file):
    """True if the file is a zip holding ``config.json`` and ``model.weights.h5``."""
    try:
        with zipfile.ZipFile(path_or_file) as zf:
            names = set(zf.namelist())
    except Exception:  # noqa: BLE001 - anything that is not a readable zip
        return False
    finally:
        if hasattr(path_or_file, "seek"):
            try:
                path_or_file.seek(0)
            except Exception:  # noqa: BLE001
                pass
    return "config.json" in names and "model.weights.h5" in names


def _h5py():
    try:
        import h5py
    except ImportError as exc:
        raise FastLSTMError(
            "reading Keras .h5 / .keras files needs h5py (pip install h5py)") from exc
    return h5py


# ------------------------------------------------------------- small helpers
def _text(value):
    """An HDF5 attribute (bytes, numpy bytes/str, 0-d array) as str."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8")
    if isinstance(value, (str, np.str_)):
        return str(value)
    raise FormatError(f"expected a string attribute, got {type(value).__name__}")


def _attr(node, name, default=None):
    """Attribute ``name`` of an HDF5 node, its type class checked before libhdf5
    converts it: Keras writes strings, floats (an empty list) and integers only,
    and libhdf5 crashes converting some damaged type records (a variable-length
    string turned into a variable-length sequence by a few flipped bytes)."""
    attrs = node.attrs
    if name not in attrs:
        return default
    h5t = _h5py().h5t
    try:
        cls = attrs.get_id(name).get_type().get_class()
    except Exception as exc:  # noqa: BLE001 - h5py raises several kinds here
        raise FormatError(f"attribute {name!r} of {node.name!r}: unreadable ({exc})") from exc
    if cls not in (h5t.STRING, h5t.FLOAT, h5t.INTEGER):
        raise FormatError(f"attribute {name!r} of {node.name!r}: HDF5 type class {cls}, not a "
                          f"string or number as Keras writes (a damaged file?)")
    try:
        return attrs[name]
    except Exception as exc:  # noqa: BLE001
        raise FormatError(f"attribute {name!r} of {node.name!r}: unreadable ({exc})") from exc


def _str_list_attr(node, name):
    """A list-of-strings attr, re-joining the chunks Keras writes for big lists
    (``name0``, ``name1``, ... when one attr would exceed HDF5's 64 KB)."""
    attrs = node.attrs
    if name in attrs:
        chunks = [_attr(node, name)]
    elif f"{name}0" in attrs:
        chunks, k = [], 0
        while f"{name}{k}" in attrs:
            chunks.append(_attr(node, f"{name}{k}"))
            k += 1
    else:
        return None
    out = []
    for chunk in chunks:
        arr = np.asarray(chunk)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.size == 0:  # Keras writes [] (a float64 array) for layers without weights
            continue
        if arr.ndim != 1 or arr.dtype.kind not in "SUO":
            raise FormatError(f"attribute {name!r}: expected a list of strings")
        out.extend(_text(v) for v in arr)
    return out


def _json(data, what):
    if isinstance(data, (bytes, bytearray, np.bytes_)):
        if len(data) > _MAX_JSON:
            raise FormatError(f"{what}: larger than {_MAX_JSON} bytes")
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{what}: not UTF-8 ({exc})") from exc
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{what}: not valid JSON ({exc})") from exc


def _keras_major(version):
    """Major version from a version string (None if unknown)."""
    if version is None:
        return None
    m = re.match(r"\s*(\d+)", str(version))
    return int(m.group(1)) if m else None


def _snake(name):
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _unique(name, used):
    if name in used:
        used[name] += 1
        return f"{name}_{used[name]}"
    used[name] = 0
    return name


def _activation(spec, keras_major, what):
    """Keras activation -> (fastlstm name, alpha, beta).

    `spec` is a function name ("tanh"), a serialised function
    ({"class_name": "function", "config": "tanh"}) or a serialised activation
    layer ({"class_name": "LeakyReLU", "config": {...}}), whose settings are
    read where fastlstm has the same function and refused otherwise."""
    name = spec
    if isinstance(spec, dict):
        cls, cfg = spec.get("class_name"), spec.get("config")
        if cls in ("function", None) and isinstance(cfg, str):
            name = cfg  # Keras 3: a function by its (registered) name
        else:
            return _layer_activation(cls, cfg, keras_major, what)
    if name is None:
        name = "linear"
    if not isinstance(name, str):
        raise FormatError(f"{what}: cannot read activation {spec!r}")
    key = name.lower()
    if key == "hard_sigmoid":
        # Keras <= 2 and tf.keras: clip(0.2x + 0.5); Keras 3: relu6(x + 3) / 6.
        slope = 0.2 if (keras_major or 3) < 3 else 1.0 / 6.0
        return "hardsigmoid", slope, 0.5
    if key in _SIMPLE_ACTIVATIONS:
        return _SIMPLE_ACTIVATIONS[key]
    raise FormatError(f"{what}: activation {name!r} has no fastlstm equivalent "
                      f"(supported: hard_sigmoid, {', '.join(sorted(_SIMPLE_ACTIVATIONS))}, "
                      "and the layers Activation, ELU, LeakyReLU, ReLU)")


_SIMPLE_ACTIVATIONS = {
    "sigmoid": ("sigmoid", None, None), "tanh": ("tanh", None, None),
    "relu": ("relu", None, None), "linear": ("affine", 1.0, 0.0),
    "elu": ("elu", 1.0, None), "softsign": ("softsign", None, None),
    "softplus": ("softplus", None, None),
    "leaky_relu": ("leakyrelu", 0.2, None)}  # keras.activations.leaky_relu: slope 0.2


def _layer_activation(cls, cfg, keras_major, what):
    """A serialised Keras layer used as an activation -> (name, alpha, beta).

    Only layers whose every setting fastlstm reproduces are accepted; their
    settings are read from the config (never their names: ELU(alpha=0.5) is
    saved with the name "elu")."""
    label = f"a serialised {cls!r} layer" if isinstance(cls, str) else "a serialised object"
    if not isinstance(cfg, dict):
        raise FormatError(f"{what}: {label} without a readable config")
    lname = cfg.get("name")
    label += f" (named {lname!r})" if isinstance(lname, str) else ""

    def number(key, default):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise FormatError(f"{what}: {label} with {key}={v!r}, "
                              "expected a finite number")
        return float(v)

    if cls == "Activation":  # keras.layers.Activation("tanh"): the function it wraps
        inner = cfg.get("activation")
        if isinstance(inner, dict) and inner.get("class_name") not in ("function", None):
            raise FormatError(f"{what}: {label} wrapping another layer")
        return _activation(inner, keras_major, f"{what} ({cls} layer)")
    if cls == "LeakyReLU":  # negative_slope (Keras 3) or alpha (Keras 2), default 0.3
        slope = number("negative_slope", cfg.get("alpha", 0.3))
        return "leakyrelu", slope, None
    if cls == "ReLU":
        max_value = cfg.get("max_value")
        threshold = number("threshold", 0.0)
        slope = number("negative_slope", 0.0)
        if max_value is not None or threshold != 0.0:
            raise FormatError(f"{what}: {label} with max_value={max_value!r}, "
                              f"threshold={threshold!r}: fastlstm has no capped or "
                              "thresholded ReLU")
        return ("relu", None, None) if slope == 0.0 else ("leakyrelu", slope, None)
    if cls == "ELU":
        if "alpha" not in cfg:  # Keras 2 and 3 record it; refuse rather than guess
            raise FormatError(f"{what}: {label} whose config does not record its alpha")
        return "elu", number("alpha", 1.0), None
    raise FormatError(f"{what}: {label}, which fastlstm cannot run "
                      "(supported layers: Activation, ELU, LeakyReLU, ReLU without "
                      "max_value/threshold; functions: hard_sigmoid, "
                      f"{', '.join(sorted(_SIMPLE_ACTIVATIONS))})")


def _as_float_array(value, what):
    try:
        arr = np.asarray(value)
    except Exception as exc:  # noqa: BLE001
        raise FormatError(f"{what}: unreadable array ({exc})") from exc
    if arr.dtype.kind != "f":
        raise FormatError(f"{what}: expected floating-point weights, got dtype {arr.dtype}")
    return arr


class _Ref:
    """A weight array not read yet: ``shape`` and ``dtype`` come from the
    HDF5 header (checking them reads no data); ``read()`` reads it."""

    __slots__ = ("shape", "dtype", "what", "_get")

    def __init__(self, shape, dtype, what, get):
        self.shape, self.dtype, self.what, self._get = shape, dtype, what, get

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def nbytes(self):
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    def read(self):
        arr = _as_float_array(self._get(), self.what)
        if arr.shape != self.shape:
            raise FormatError(f"{self.what}: read shape {arr.shape}, header says {self.shape}")
        return arr


def _dataset_ref(node, what):
    """A _Ref to an HDF5 dataset, after checking what its header declares."""
    if not isinstance(node, _h5py().Dataset):
        raise FormatError(f"{what}: not an HDF5 dataset")
    shape = node.shape
    if shape is None:
        raise FormatError(f"{what}: a dataset without a shape (null dataspace)")
    dtype = node.dtype
    if dtype.kind != "f":
        raise FormatError(f"{what}: expected floating-point weights, got dtype {dtype}")
    return _Ref(tuple(int(d) for d in shape), dtype, what, lambda: node[()])


def _array_ref(value, what):
    arr = _as_float_array(value, what)
    return _Ref(arr.shape, arr.dtype, what, lambda: arr)


class _ReadBudget:
    """Bytes of weights a file may have read from it: _MAX_INFLATE_RATIO
    times its size (a .keras archive: the compressed size of its weights
    file) plus 1 MiB.  HDF5 fill values and compressed chunks let a small
    file declare huge datasets; each is charged here before it is read.
    ``size=None`` (live Keras objects): no limit."""

    def __init__(self, size):
        self.size = size
        self.limit = None if size is None else _MAX_INFLATE_RATIO * size + (1 << 20)
        self.used = 0

    def read(self, ref):
        n = ref.nbytes
        if self.limit is not None and self.used + n > self.limit:
            before = f" after {self.used} bytes of other weights" if self.used else ""
            raise FormatError(
                f"{ref.what}: declares shape {ref.shape} {ref.dtype} ({n} bytes){before}: "
                f"more than the {self.limit} bytes a {self.size}-byte file may expand to "
                f"({_MAX_INFLATE_RATIO}x its size + 1 MiB): refused before reading")
        self.used += n
        return ref.read()


# ------------------------------------------------------------- layer configs
class _Spec:
    """One recurrent layer found in a model config (no weights yet)."""

    def __init__(self, name, class_name, config, h5path, legacy_path):
        self.name = name
        self.class_name = class_name
        self.config = config
        self.h5path = h5path            # new-format weights: path of the layer's group
        self.legacy_path = legacy_path  # legacy weights: [top-level layer name, inner names...]
        self.input_index = 0            # which output of the previous layer is read
        self.extra_inputs = False       # initial_state / constants / mask tensors in the graph
        self.masked = False

    # The Keras layer config of each direction: [(class_name, config), ...]
    def directions(self):
        cfg = self.config
        if self.class_name != "Bidirectional":
            return [(self.class_name, cfg)]
        inner = cfg.get("layer")
        if not isinstance(inner, dict) or not isinstance(inner.get("config"), dict):
            raise FormatError(f"layer {self.name!r}: Bidirectional without a layer config")
        fwd = (inner.get("class_name"), inner["config"])
        back = cfg.get("backward_layer")
        if isinstance(back, dict) and isinstance(back.get("config"), dict):
            bwd = (back.get("class_name"), back["config"])
        else:  # Keras builds the backward layer as a copy going the other way
            bcfg = dict(inner["config"])
            bcfg["go_backwards"] = not bool(bcfg.get("go_backwards", False))
            bwd = (inner.get("class_name"), bcfg)
        for cls, _ in (fwd, bwd):
            if cls not in ("LSTM", "CuDNNLSTM"):
                raise FormatError(f"layer {self.name!r}: Bidirectional({cls}) is not an LSTM")
        return [fwd, bwd]

    @property
    def return_sequences(self):
        return bool(self.directions()[0][1].get("return_sequences", False))

    @property
    def return_state(self):
        return bool(self.directions()[0][1].get("return_state", False))


def _layer_list(model_cfg, what):
    if not isinstance(model_cfg, dict):
        raise FormatError(f"{what}: expected a JSON object")
    cls = model_cfg.get("class_name")
    cfg = model_cfg.get("config")
    if isinstance(cfg, list):  # Keras <= 2.2 Sequential: the config is the list of layers
        layers = cfg
    elif isinstance(cfg, dict):
        layers = cfg.get("layers")
    else:
        layers = None
    if not isinstance(layers, list) or not all(isinstance(l, dict) for l in layers):
        raise FormatError(f"{what}: model config of {cls!r} has no list of layers")
    return cls, cfg, layers


def _layer_name(layer):
    name = layer.get("name")
    if name is None and isinstance(layer.get("config"), dict):
        name = layer["config"].get("name")
    if not isinstance(name, str):
        raise FormatError(f"layer config without a name: {str(layer)[:120]}")
    return name


def _history(obj, out):
    """Collect every keras_history [layer, node, tensor] found in a Keras 3 node arg."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            hist = (obj.get("config") or {}).get("keras_history")
            if isinstance(hist, list) and len(hist) >= 3:
                out.append((hist[0], hist[1], hist[2]))
            return
        for v in obj.values():
            _history(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _history(v, out)


def _inbound(layer):
    """Parse a functional layer's inbound nodes: a list of (main, extras), main a
    (layer, node, tensor) tuple or None, extras the other tensors (initial
    states, constants).  A ``mask`` keyword (Keras 3 writes the mask a
    Masking layer or mask_zero embedding makes as one) is not an extra: the
    layer computes as before, on the mask the call is given (_has_mask_kwarg)."""
    nodes = layer.get("inbound_nodes") or []
    if not isinstance(nodes, list):
        raise FormatError(f"layer {_layer_name(layer)!r}: inbound_nodes is not a list")
    parsed = []
    for node in nodes:
        if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
            args, kwargs = [], []
            _history(node.get("args", []), args)
            kw = node.get("kwargs") or {}
            if isinstance(kw, dict):
                kw = {k: v for k, v in kw.items() if k != "mask"}
            _history(kw, kwargs)
            main = args[0] if args else None
            parsed.append((main, args[1:] + kwargs))
        elif isinstance(node, list):  # Keras 2: [[layer, node, tensor, kwargs], ...]
            refs = []
            for ref in node:
                if isinstance(ref, list) and len(ref) >= 3 and isinstance(ref[0], str):
                    refs.append((ref[0], ref[1], ref[2]))
                    if len(ref) > 3 and isinstance(ref[3], dict):
                        extra = []
                        for k, v in ref[3].items():  # tensors passed as keyword arguments
                            if k == "mask":
                                continue
                            if isinstance(v, list) and v and isinstance(v[0], (list, str)):
                                vs = v if isinstance(v[0], list) else [v]
                                extra.extend(tuple(e[:3]) for e in vs
                                             if isinstance(e, list) and len(e) >= 3)
                        refs.extend(extra)
            parsed.append((refs[0] if refs else None, refs[1:]))
        else:
            raise FormatError(f"layer {_layer_name(layer)!r}: unreadable inbound node")
    return parsed


def _masked_call(layer, upstream):
    """Whether Keras applies a mask to a functional layer's call.  Keras 3
    writes the mask a call gets as its ``mask=`` keyword (and gives none to
    a call with ``initial_state=``, even behind a Masking layer): that is the
    answer.  Keras 2 does not write it: a Masking layer or mask_zero
    embedding upstream (``upstream()``) is."""
    nodes = layer.get("inbound_nodes") or []
    if nodes and all(isinstance(n, dict) for n in nodes):
        return _has_mask_kwarg(layer)
    return _has_mask_kwarg(layer) or upstream()


def _has_mask_kwarg(layer):
    """Whether a functional layer is called with a mask tensor (``mask=``)."""
    for node in layer.get("inbound_nodes") or []:
        if isinstance(node, dict) and isinstance(node.get("kwargs"), dict):
            if node["kwargs"].get("mask") is not None:
                return True
        elif isinstance(node, list):
            if any(isinstance(r, list) and len(r) > 3 and isinstance(r[3], dict)
                   and r[3].get("mask") is not None for r in node):
                return True
    return False


def _walk_model(model_cfg, what, h5prefix="", legacy_prefix=()):
    """Find the chains ("stacks") of recurrent layers in a model config.

    Returns a list of stacks, each a list of _Spec in call order."""
    cls, cfg, layers = _layer_list(model_cfg, what)
    sequential = cls == "Sequential" or isinstance(cfg, list)
    used = {}
    entries = []  # (layer dict, name, class, h5path, legacy_path)
    for layer in layers:
        lcls = layer.get("class_name")
        name = _layer_name(layer)
        if sequential and lcls == "InputLayer":
            h5 = None  # Sequential.layers leaves the InputLayer out
        else:
            h5 = f"{h5prefix}layers/{_unique(_snake(str(lcls)), used)}"
        legacy = legacy_prefix + (name,) if legacy_prefix else (name,)
        entries.append((layer, name, lcls, h5, legacy))

    stacks = []
    nested = []
    if sequential:
        current, prev_masking = [], False
        for layer, name, lcls, h5, legacy in entries:
            if lcls in _RECURRENT:
                spec = _Spec(name, lcls, layer.get("config") or {}, h5, legacy)
                spec.masked = prev_masking
                if current and not current[-1].return_sequences:
                    current = []
                if not current:
                    stacks.append(current)
                current.append(spec)
            elif lcls in _IDENTITY or lcls == "InputLayer":
                continue
            else:
                current = []
                if lcls in _MODELS:
                    nested.extend(_walk_model(layer, what, h5 + "/", legacy))
            prev_masking = prev_masking or _is_masking(layer)
        return stacks + nested

    # Functional: follow the graph.
    by_name = {}
    for layer, name, lcls, h5, legacy in entries:
        by_name[name] = (layer, lcls, _inbound(layer))
    masking = {name for name, (layer, _, _) in by_name.items() if _is_masking(layer)}

    def resolve(ref):
        """Skip identity layers back to the tensor they pass through."""
        seen = 0
        while ref is not None and ref[0] in by_name and by_name[ref[0]][1] in _IDENTITY:
            nodes = by_name[ref[0]][2]
            if len(nodes) != 1 or seen > len(by_name):
                break
            ref = nodes[0][0]
            seen += 1
        return ref

    def upstream_masked(ref, depth=0):
        if ref is None or depth > len(by_name) or ref[0] not in by_name:
            return False
        if ref[0] in masking:
            return True
        return any(upstream_masked(n[0], depth + 1) for n in by_name[ref[0]][2])

    spec_of = {}
    has_successor = set()
    for layer, name, lcls, h5, legacy in entries:
        if lcls in _MODELS:
            nested.extend(_walk_model(layer, what, h5 + "/", legacy))
            continue
        if lcls not in _RECURRENT:
            continue
        spec = _Spec(name, lcls, layer.get("config") or {}, h5, legacy)
        nodes = by_name[name][2]
        if len(nodes) != 1:  # shared layer (or never called): a stack of its own
            spec.extra_inputs = any(n[1] for n in nodes)
            spec.masked = _masked_call(layer, lambda: any(upstream_masked(n[0]) for n in nodes))
            stacks.append([spec])
            spec_of[name] = (spec, stacks[-1])
            continue
        main, extras = nodes[0]
        spec.extra_inputs = bool(extras)
        src = resolve(main)
        spec.masked = _masked_call(layer, lambda: upstream_masked(main))
        prev = spec_of.get(src[0]) if src is not None else None
        if (prev is not None and not extras and src[0] not in has_successor
                and prev[0] is prev[1][-1] and _produces_sequence(prev[0], src[2])):
            spec.input_index = int(src[2])
            prev[1].append(spec)
            has_successor.add(src[0])
            spec_of[name] = (spec, prev[1])
        else:
            stacks.append([spec])
            spec_of[name] = (spec, stacks[-1])
    return stacks + nested


def _is_masking(layer):
    cls = layer.get("class_name")
    cfg = layer.get("config") or {}
    return cls == "Masking" or (cls == "Embedding" and bool(cfg.get("mask_zero")))


def _produces_sequence(spec, tensor_index):
    """Whether output `tensor_index` of `spec` is a (N, T, ·) sequence."""
    if not spec.return_sequences:
        return False
    n_out = 2 if (spec.class_name == "Bidirectional"
                  and spec.config.get("merge_mode", "concat") is None) else 1
    return 0 <= int(tensor_index) < n_out


# ------------------------------------------------------------ weight sources
# Every source's get(spec) returns [[kernel, recurrent_kernel, bias?], ...]
# per direction as _Refs: shapes are checked before anything is read.
class _NewFormatWeights:
    """Keras 3 / tf.keras >= 2.13 weights file (``layers/<path>/cell/vars/<k>``)."""

    def __init__(self, h5):
        self.h5 = h5

    def _vars(self, path, what):
        h5 = self.h5
        if path not in h5:
            raise FormatError(f"{what}: weights group {path!r} missing")
        grp = h5[path]
        if "cell" in grp and "vars" in grp["cell"]:
            grp = grp["cell"]["vars"]
        elif "vars" in grp:
            grp = grp["vars"]
        else:
            raise FormatError(f"{what}: no cell/vars in weights group {path!r}")
        keys = sorted((k for k in grp.keys() if k.isdigit()), key=int)
        if [int(k) for k in keys] != list(range(len(keys))):
            raise FormatError(f"{what}: weights {path!r}/vars are not numbered 0..n-1")
        return [_dataset_ref(grp[k], f"{what}: {path}/vars/{k}") for k in keys]

    def _find(self, spec):
        """The layer's group: its computed path, or the sibling whose vars
        carry the layer's name (attr written by recent Keras 3)."""
        path = spec.h5path
        h5 = self.h5
        if path in h5:
            named = h5[path].get("vars")
            got = None if named is None else _attr(named, "name")
            if got is None or _text(got) == spec.name:
                return path
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent in h5:
            for key in h5[parent].keys():
                v = h5[parent][key].get("vars")
                if v is not None and "name" in v.attrs and _text(_attr(v, "name")) == spec.name:
                    return f"{parent}/{key}"
        return path

    def get(self, spec):
        what = f"layer {spec.name!r}"
        path = self._find(spec)
        if spec.class_name == "Bidirectional":
            return [self._vars(f"{path}/forward_layer", what),
                    self._vars(f"{path}/backward_layer", what)]
        return [self._vars(path, what)]


class _LegacyWeights:
    """Legacy HDF5 weights (``model_weights`` group, or the root of a
    ``save_weights("x.h5")`` file): ``layer_names`` and ``weight_names`` attrs."""

    def __init__(self, group):
        self.group = group

    def names_of(self, layer_name):
        if layer_name not in self.group:
            return None, []
        grp = self.group[layer_name]
        names = _str_list_attr(grp, "weight_names")
        if names is None:
            raise FormatError(f"layer {layer_name!r}: no weight_names attribute")
        return grp, names

    def get(self, spec):
        what = f"layer {spec.name!r}"
        grp, names = self.names_of(spec.legacy_path[0])
        if grp is None:
            raise FormatError(f"{what}: no weights group {spec.legacy_path[0]!r}")
        if len(spec.legacy_path) > 1:  # a layer of a nested model: pick its weights by name
            inner = spec.legacy_path[-1]
            names = [n for n in names if inner in n.split("/")]
        arrays = []
        for n in names:
            if n not in grp:
                raise FormatError(f"{what}: weight {n!r} listed but missing")
            arrays.append((n, _dataset_ref(grp[n], f"{what}: {n}")))
        if spec.class_name != "Bidirectional":
            return [[a for _, a in arrays]]
        fwd = [a for n, a in arrays if any(p.startswith("forward_") for p in n.split("/"))]
        bwd = [a for n, a in arrays if any(p.startswith("backward_") for p in n.split("/"))]
        if not fwd or not bwd or len(fwd) + len(bwd) != len(arrays):
            half = len(arrays) // 2  # Keras lists the forward weights first
            fwd, bwd = [a for _, a in arrays[:half]], [a for _, a in arrays[half:]]
        return [fwd, bwd]


class _LiveWeights:
    """Weights of a live Keras model, by layer name."""

    def __init__(self, model):
        self.model = model

    def get(self, spec):
        obj = self.model
        for name in spec.legacy_path:  # (layer,) or (nested model, ..., layer)
            try:
                obj = obj.get_layer(name)
            except Exception as exc:  # noqa: BLE001
                raise FormatError(f"layer {name!r}: not found in the Keras model ({exc})") from exc
        return _live_layer_weights(obj)


def _live_layer_weights(layer):
    if type(layer).__name__ == "Bidirectional":
        return [_np_weights(layer.forward_layer), _np_weights(layer.backward_layer)]
    return [_np_weights(layer)]


def _np_weights(layer):
    return [_array_ref(w, f"layer {getattr(layer, 'name', '?')!r}")
            for w in layer.get_weights()]


# --------------------------------------------------------------- conversion
def _check_lstm_shapes(arrays, cls, cfg, what):
    """Validate the shapes of [kernel, recurrent_kernel, (bias)] (arrays or
    _Refs: nothing is read) and return the units."""
    if len(arrays) not in (2, 3):
        raise FormatError(f"{what}: expected kernel, recurrent_kernel[, bias], got "
                          f"{len(arrays)} arrays")
    kernel, rk = arrays[0], arrays[1]
    bias = arrays[2] if len(arrays) == 3 else None
    if rk.ndim != 2 or rk.shape[1] != 4 * rk.shape[0] or rk.shape[0] == 0:
        raise FormatError(f"{what}: recurrent_kernel has shape {rk.shape}, expected (U, 4U)")
    units = rk.shape[0]
    if "units" in cfg and cfg["units"] != units:
        raise FormatError(f"{what}: config says units={cfg['units']!r} but the "
                          f"recurrent_kernel is {rk.shape}")
    if kernel.ndim != 2 or kernel.shape[1] != 4 * units:
        raise FormatError(f"{what}: kernel has shape {kernel.shape}, expected (In, {4 * units})")
    use_bias = bool(cfg.get("use_bias", True)) if cls != "CuDNNLSTM" else True
    if bias is not None:
        if bias.shape != (4 * units,) and not (cls == "CuDNNLSTM"
                                               and bias.shape == (8 * units,)):
            raise FormatError(f"{what}: bias has shape {bias.shape}, expected ({4 * units},)")
        if not use_bias:
            raise FormatError(f"{what}: use_bias=False but a bias is stored")
    elif use_bias and "use_bias" in cfg:
        raise FormatError(f"{what}: use_bias=True but no bias is stored")
    return units


def _check_lstm_weights(arrays, cls, cfg, what):
    """Validate [kernel, recurrent_kernel, (bias)] and return (kernel, rk, bias|None, units)."""
    units = _check_lstm_shapes(arrays, cls, cfg, what)
    kernel, rk = arrays[0], arrays[1]
    bias = arrays[2] if len(arrays) == 3 else None
    if bias is not None and bias.shape == (8 * units,):  # CuDNNLSTM: input | recurrent
        bias = bias[:4 * units].astype(np.float64) + bias[4 * units:]
    return kernel, rk, bias, units


def _cell_options(cls, cfg, keras_major, what):
    if cls == "CuDNNLSTM":
        return {"activations": None, "activation_alpha": None, "activation_beta": None}
    rec = _activation(cfg.get("recurrent_activation", "sigmoid"), keras_major,
                      f"{what}: recurrent_activation")
    act = _activation(cfg.get("activation", "tanh"), keras_major, f"{what}: activation")
    if (rec[0], act[0]) == ("sigmoid", "tanh"):
        return {"activations": None, "activation_alpha": None, "activation_beta": None}
    return {"activations": (rec[0], act[0], act[0]),
            "activation_alpha": (rec[1], act[1], act[1]),
            "activation_beta": (rec[2], act[2], act[2])}


def _build(spec, weights, keras_major, dtype, num_threads, read=None, batch_first=None):
    """A KerasLayer from a spec and its weights [[k, rk, b?], ...per direction]
    (_Refs, read with `read` once every shape and option is checked)."""
    what = f"layer {spec.name!r}"
    dirs = spec.directions()
    if len(weights) != len(dirs):
        raise FormatError(f"{what}: expected weights for {len(dirs)} direction(s)")
    checked = []
    for (cls, cfg), refs in zip(dirs, weights):
        if cfg.get("time_major", False) != dirs[0][1].get("time_major", False):
            raise FormatError(f"{what}: directions disagree on time_major")
        _check_lstm_shapes(refs, cls, cfg, what)
        checked.append((cls, cfg, refs, _cell_options(cls, cfg, keras_major, what)))
    if len(checked) == 2 and checked[0][2][0].shape[0] != checked[1][2][0].shape[0]:
        raise FormatError(f"{what}: forward and backward kernels disagree on the input size")
    cfg0 = dirs[0][1]
    merge_mode = spec.config.get("merge_mode", "concat") if spec.class_name == "Bidirectional" else None
    if merge_mode not in _MERGE_MODES:
        raise FormatError(f"{what}: unknown merge_mode {merge_mode!r}")
    read = read or _Ref.read
    cells = []
    for cls, cfg, refs, opts in checked:
        k, rk, b, units = _check_lstm_weights([read(r) for r in refs], cls, cfg, what)
        cells.append({"kernel": k, "rk": rk, "bias": b, "units": units, "opts": opts,
                      "go_backwards": bool(cfg.get("go_backwards", False))})
    layer = KerasLayer.__new__(KerasLayer)
    layer.name = spec.name
    layer.class_name = spec.class_name
    layer.return_sequences = bool(cfg0.get("return_sequences", False))
    layer.return_state = bool(cfg0.get("return_state", False))
    layer.time_major = (bool(cfg0.get("time_major", False)) if batch_first is None
                        else not batch_first)
    layer.merge_mode = merge_mode
    layer.input_index = spec.input_index
    layer.stateful = bool(cfg0.get("stateful", False))
    layer.masked = spec.masked
    # Keras: what a masked step outputs -- a lone layer's zero_output_for_mask
    # (default False: the last output repeated); Bidirectional forces it to
    # return_sequences on both halves (zeros)
    layer.zero_output_for_mask = (spec.class_name == "Bidirectional"
                                  or bool(cfg0.get("zero_output_for_mask", False)))
    layer.input_size = int(cells[0]["kernel"].shape[0])
    layer.units = [c["units"] for c in cells]

    def make(cells_, bidirectional):
        c0 = cells_[0]
        sd = {}
        for d, c in enumerate(cells_):
            s = "l0" + ("_reverse" if d else "")
            sd["weight_ih_" + s] = np.ascontiguousarray(c["kernel"].T)
            sd["weight_hh_" + s] = np.ascontiguousarray(c["rk"].T)
            if c["bias"] is not None:
                sd["bias_ih_" + s] = c["bias"]
                sd["bias_hh_" + s] = np.zeros_like(c["bias"])
        m = LSTM(layer.input_size, c0["units"], bias=c0["bias"] is not None,
                 batch_first=not layer.time_major, bidirectional=bidirectional,
                 dtype=dtype, num_threads=num_threads, **c0["opts"])
        m.load_state_dict(sd)
        return m

    if len(cells) == 1:
        layer.kind = "uni"
        layer.go_backwards = cells[0]["go_backwards"]
        layer.lstms = [make(cells, False)]
        layer.directions_go_backwards = [layer.go_backwards]
    else:
        f, b = cells
        fusable = (not f["go_backwards"] and b["go_backwards"] and f["units"] == b["units"]
                   and (f["bias"] is None) == (b["bias"] is None) and f["opts"] == b["opts"])
        layer.go_backwards = False
        layer.directions_go_backwards = [f["go_backwards"], b["go_backwards"]]
        if fusable:  # the engine's reverse direction is Keras' flipped backward layer
            layer.kind = "bi"
            layer.lstms = [make(cells, True)]
        else:
            layer.kind = "bi_split"
            layer.lstms = [make([f], False), make([b], False)]
    return layer


class KerasLayer:
    """One Keras LSTM, CuDNNLSTM or Bidirectional(LSTM) layer running on fastlstm.

    Attributes: ``name``, ``class_name``, ``units`` (per direction),
    ``input_size``, ``return_sequences``, ``return_state``, ``go_backwards``,
    ``merge_mode`` (Bidirectional), ``time_major``, ``lstms`` (the
    fastlstm.LSTM objects: one, or for a Bidirectional whose two halves differ
    one per direction) and ``lstm`` (the single one, if there is one).
    """

    @property
    def lstm(self):
        if len(self.lstms) != 1:
            raise AttributeError(f"layer {self.name!r} runs {len(self.lstms)} fastlstm.LSTM "
                                 "objects; use .lstms")
        return self.lstms[0]

    @property
    def output_size(self):
        if self.class_name == "Bidirectional" and self.merge_mode == "concat":
            return sum(self.units)
        return self.units[0]

    def __repr__(self):
        extra = []
        if self.class_name == "Bidirectional":
            extra.append(f"merge_mode={self.merge_mode!r}")
        if self.go_backwards:
            extra.append("go_backwards=True")
        if self.return_sequences:
            extra.append("return_sequences=True")
        if self.return_state:
            extra.append("return_state=True")
        return (f"KerasLayer({self.name!r}, {self.class_name}, units={self.units[0]}"
                + "".join(", " + e for e in extra) + ")")

    def _flip(self, a):
        return np.flip(a, axis=0 if self.time_major else 1)

    def _run(self, lstm, go_backwards, x, state, mask, padding):
        xin = self._flip(x) if go_backwards else x
        if mask is not None and go_backwards:
            mask = self._flip(mask)
        hx = None
        if state is not None:
            h0, c0 = state
            hx = (np.asarray(h0)[None], np.asarray(c0)[None])
        out, (h, c) = lstm(xin, hx, mask=mask, padding=padding)
        return out, h[0], c[0]

    def __call__(self, x, initial_state=None, mask=None):
        """Run the layer like Keras: x (N, T, In) (time-major: (T, N, In)).

        initial_state: None or [h, c] (Bidirectional: [h_f, c_f, h_b, c_b]),
        each (N, units).  mask: None or booleans (N, T) ((T, N) time-major),
        True at valid steps, as Keras' mask (fastlstm.LSTM's ``mask=``)."""
        x = np.asarray(x) if not hasattr(x, "detach") else x.detach().cpu().numpy()
        if x.ndim != 3:
            raise ShapeError(f"x: expected a 3-D array ({'T, N' if self.time_major else 'N, T'}, "
                             f"features), got shape {x.shape}")
        n_states = 2 * len(self.directions_go_backwards)
        if initial_state is not None and len(initial_state) != n_states:
            raise ShapeError(f"initial_state: expected {n_states} arrays for layer "
                             f"{self.name!r}, got {len(initial_state)}")
        if mask is not None:
            mask = _to_numpy(mask, "mask")
            if mask.shape != x.shape[:2]:
                raise ShapeError(f"mask: expected x's first two dimensions "
                                 f"({'T, N' if self.time_major else 'N, T'}) = {x.shape[:2]}, "
                                 f"got shape {mask.shape}")
        padding = "zeros" if getattr(self, "zero_output_for_mask", False) else "repeat"
        if self.kind == "uni":
            out, h, c = self._run(self.lstms[0], self.go_backwards, x, initial_state, mask,
                                  padding)
            y = out if self.return_sequences else h
            return [y, h, c] if self.return_state else y
        if self.kind == "bi":
            hx = None
            if initial_state is not None:
                hx = (np.stack([np.asarray(s) for s in initial_state[0::2]]),
                      np.stack([np.asarray(s) for s in initial_state[1::2]]))
            out, (hn, cn) = self.lstms[0](x, hx, mask=mask, padding="zeros")
            U = self.units[0]
            states = [hn[0], cn[0], hn[1], cn[1]]
            if self.return_sequences:
                y, y_rev = out[..., :U], out[..., U:]
            else:
                y, y_rev = hn[0], hn[1]
        else:
            fs = None if initial_state is None else initial_state[:2]
            bs = None if initial_state is None else initial_state[2:]
            fwd, hf, cf = self._run(self.lstms[0], self.directions_go_backwards[0], x, fs, mask,
                                    "zeros")
            bwd, hb, cb = self._run(self.lstms[1], self.directions_go_backwards[1], x, bs, mask,
                                    "zeros")
            states = [hf, cf, hb, cb]
            if self.return_sequences:
                y, y_rev = fwd, self._flip(bwd)
            else:
                y, y_rev = hf, hb
        mode = self.merge_mode
        if mode == "concat":
            merged = [np.concatenate([y, y_rev], axis=-1)]
        elif mode == "sum":
            merged = [y + y_rev]
        elif mode == "ave":
            merged = [(y + y_rev) / y.dtype.type(2)]
        elif mode == "mul":
            merged = [y * y_rev]
        else:
            merged = [np.ascontiguousarray(y), np.ascontiguousarray(y_rev)]
        if self.return_state:
            return merged + states
        return merged[0] if mode is not None else merged


class KerasStack:
    """A chain of Keras recurrent layers, run with Keras semantics on fastlstm.

    ``stack(x, initial_state=None)`` with x (N, T, In) (time-major layers:
    (T, N, In)) returns what the last layer returns in Keras (see the module
    docstring).  ``initial_state`` is None or a list with one entry per layer,
    each None or that layer's state list ([h, c], Bidirectional
    [h_f, c_f, h_b, c_b]).

    Attributes: ``layers`` (KerasLayer), ``lstms`` (every fastlstm.LSTM, in
    order), ``keras_version`` (as read from the source, or None),
    ``input_size``, ``name``.  ``to_lstm()`` fuses the stack into one
    multi-layer fastlstm.LSTM when the layers allow it; ``astype(weights)``
    is a copy in reduced precision.
    """

    def __init__(self, layers, keras_version=None, source=None):
        if not layers:
            raise FormatError("a Keras stack needs at least one layer")
        self.layers = list(layers)
        self.keras_version = keras_version
        self.source = source
        for prev, nxt in zip(self.layers, self.layers[1:]):
            size = prev.output_size
            if prev.class_name == "Bidirectional" and prev.merge_mode is None:
                size = prev.units[min(nxt.input_index, 1)]
            if size != nxt.input_size:
                raise FormatError(f"layer {nxt.name!r} takes {nxt.input_size} features but "
                                  f"{prev.name!r} gives {size} (for a weights-only file, "
                                  "pass config=)")
        if any(layer.masked for layer in self.layers):
            warnings.warn("the Keras model masks the input of this LSTM stack; pass that mask "
                          "as stack(x, mask=m) (m: True at valid steps, e.g. "
                          "np.any(x != mask_value, axis=-1) for a Masking layer): without it "
                          "every step counts as valid", stacklevel=3)
        stateful = [layer.name for layer in self.layers if layer.stateful]
        if stateful:
            warnings.warn(f"Keras layer(s) {', '.join(map(repr, stateful))} are stateful=True; "
                          "fastlstm does not carry h and c from one call to the next (every "
                          "call starts from zero state): pass the states returned with "
                          "return_state=True as initial_state= (a fastlstm.LSTM: hx=), or "
                          "stream with m.stream(batch) (m = stack.to_lstm() or a layer's "
                          ".lstm)", stacklevel=3)

    @property
    def name(self):
        return self.layers[0].name if len(self.layers) == 1 else \
            f"{self.layers[0].name}..{self.layers[-1].name}"

    @property
    def input_size(self):
        return self.layers[0].input_size

    @property
    def lstms(self):
        return [m for layer in self.layers for m in layer.lstms]

    def __len__(self):
        return len(self.layers)

    def __repr__(self):
        inner = ", ".join(repr(layer) for layer in self.layers)
        return f"KerasStack([{inner}])"

    def __call__(self, x, initial_state=None, mask=None):
        """mask: None or booleans (N, T) ((T, N) time-major), True at valid
        steps: the Keras mask of the stack's input (a Masking layer's or a
        mask_zero embedding's), which Keras passes on to every layer."""
        if initial_state is not None and len(initial_state) != len(self.layers):
            raise ShapeError(f"initial_state: expected one entry per layer "
                             f"({len(self.layers)}), got {len(initial_state)}")
        result = x
        for k, layer in enumerate(self.layers):
            if k:
                if isinstance(result, list):
                    result = result[layer.input_index]
                elif layer.input_index != 0:
                    raise FormatError(f"layer {layer.name!r} reads output "
                                      f"{layer.input_index} of a single output")
            result = layer(result, None if initial_state is None else initial_state[k], mask)
        return result

    predict = __call__

    def astype(self, weights, **kwargs):
        """A copy of this stack whose fastlstm.LSTM objects store their
        weights in ``weights`` precision (``fastlstm.LSTM.astype``, same
        keyword arguments); ``fastlstm.load(path, weights=...)`` calls it."""
        layers = []
        for layer in self.layers:
            new = copy.copy(layer)
            new.lstms = [m.astype(weights, **kwargs) for m in layer.lstms]
            layers.append(new)
        out = KerasStack.__new__(KerasStack)  # the checks and warnings were done
        out.layers, out.keras_version, out.source = layers, self.keras_version, self.source
        return out

    def to_lstm(self):
        """The whole stack as one fastlstm.LSTM (torch semantics), when every
        layer is a plain LSTM going forward, or every layer a Bidirectional
        with merge_mode="concat", all with the same units, bias and
        activations and the same time layout.  Its ``out`` equals the last
        Keras layer's sequence output (``return_sequences=True``); the
        Keras last output is ``h_n[-1]`` (Bidirectional: concat of
        ``h_n[-2]`` and ``h_n[-1]``).  Raises FormatError otherwise."""
        first = self.layers[0]
        m0 = first.lstms[0]
        for layer in self.layers:
            ok = (len(layer.lstms) == 1 and layer.kind == first.kind and not layer.go_backwards
                  and layer.units[0] == first.units[0] and layer.time_major == first.time_major
                  and layer.input_index == 0
                  and (layer.kind == "uni" or layer.merge_mode == "concat")
                  and layer.lstms[0].bias == m0.bias
                  and layer.lstms[0].cell_options() == m0.cell_options()
                  and layer.lstms[0].dtype == m0.dtype)
            if not ok:
                raise FormatError(f"layer {layer.name!r} cannot join a single fastlstm.LSTM "
                                  "(needs same units/bias/activations, no go_backwards, "
                                  "Bidirectional only with merge_mode='concat')")
        for layer in self.layers[:-1]:
            if not layer.return_sequences:
                raise FormatError(f"layer {layer.name!r} does not return sequences")
        sd = {}
        for k, layer in enumerate(self.layers):
            for key, v in layer.lstms[0].state_dict().items():
                sd[key.replace("_l0", f"_l{k}")] = v
        opts = m0.cell_options()
        opts.pop("peepholes")
        return LSTM.from_state_dict(sd, batch_first=m0.batch_first, dtype=m0.dtype,
                                    num_threads=m0.num_threads, **opts)


# ------------------------------------------------------------------ sources
class _Source:
    """A parsed Keras source: stacks of specs, weights, version.

    ``weights.get(spec)`` gives _Refs (nothing read); ``read(ref)`` reads one,
    within the budget of a file of ``size`` bytes (None: a live object)."""

    def __init__(self, stacks, weights, keras_version, closer=None, size=None):
        self.stacks = stacks
        self.weights = weights
        self.keras_version = keras_version
        self.closer = closer
        self.read = _ReadBudget(size).read

    def close(self):
        if self.closer is not None:
            self.closer()


def _open_h5(fileobj_or_path):
    h5py = _h5py()
    try:
        return h5py.File(fileobj_or_path, "r")
    except Exception as exc:  # noqa: BLE001 - h5py raises OSError and others
        raise FormatError(f"not a readable HDF5 file ({exc})") from exc


def _coerce_config(config):
    if config is None:
        return None
    if isinstance(config, (str, bytes, bytearray)):
        config = _json(config, "config")
    elif isinstance(config, dict):
        config = _jsonable(config)
    if not isinstance(config, dict):
        raise FormatError("config: expected a model config dict or its JSON")
    if "class_name" not in config and "layers" in config:
        config = {"class_name": "Functional" if any(
            "inbound_nodes" in l for l in config["layers"] if isinstance(l, dict))
            else "Sequential", "config": config}
    return config


def _jsonable(obj):
    """A live get_config() result as plain JSON types (tuples become lists)."""
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError, RecursionError) as exc:
        raise FormatError(f"config: not JSON-serialisable ({exc})") from exc


def _stacks_from_config(config, what):
    cls = config.get("class_name")
    if cls in _RECURRENT:  # a config of a single layer
        name = (config.get("config") or {}).get("name", _snake(cls))
        return [[_Spec(name, cls, config.get("config") or {}, f"layers/{_snake(cls)}", (name,))]]
    return _walk_model(config, what)


def _infer_legacy(group, layer_names):
    """Stacks guessed from a legacy weights-only file (no config)."""
    specs = []
    for name in layer_names:
        if name not in group:
            continue
        grp = group[name]
        wn = _str_list_attr(grp, "weight_names") or []
        shapes = []
        for n in wn:
            if n not in grp or not hasattr(grp[n], "shape"):
                raise FormatError(f"layer {name!r}: weight {n!r} listed but missing")
            shapes.append((n, grp[n].shape))
        bi = any(p.startswith(("forward_", "backward_")) for n, _ in shapes for p in n.split("/"))
        per = [s for _, s in shapes]
        cudnn = any("cu_dnnlstm" in n or "cudnnlstm" in n.lower() for n, _ in shapes)
        if bi:
            half = len(per) // 2
            if len(per) % 2 or not _looks_lstm(per[:half]) or not _looks_lstm(per[half:]):
                specs.append(None)
                continue
            inner = {"class_name": "CuDNNLSTM" if cudnn else "LSTM",
                     "config": {"return_sequences": True}}
            specs.append(_Spec(name, "Bidirectional", {"layer": inner, "merge_mode": "concat"},
                               None, (name,)))
        elif _looks_lstm(per):
            specs.append(_Spec(name, "CuDNNLSTM" if cudnn else "LSTM",
                               {"return_sequences": True}, None, (name,)))
        else:
            specs.append(None)
    return _chain_guess(specs)


def _looks_lstm(shapes):
    if len(shapes) not in (2, 3) or len(shapes[0]) != 2 or len(shapes[1]) != 2:
        return False
    u = shapes[1][0]
    ok = shapes[1][1] == 4 * u and shapes[0][1] == 4 * u
    if len(shapes) == 3:
        ok = ok and tuple(shapes[2]) in ((4 * u,), (8 * u,))
    return ok


def _chain_guess(specs):
    """Consecutive recurrent specs form a stack; the last of each returns its
    last output (Keras' default), the others their sequences."""
    stacks, current = [], []
    for spec in specs + [None]:
        if spec is None:
            if current:
                stacks.append(current)
            current = []
            continue
        current.append(spec)
    for stack in stacks:
        _set_return_sequences(stack[-1], False)
    return stacks


def _set_return_sequences(spec, value):
    if spec.class_name == "Bidirectional":
        spec.config["layer"]["config"]["return_sequences"] = value
    else:
        spec.config["return_sequences"] = value


def _infer_new_format(h5):
    """Stacks guessed from a Keras 3 weights-only file (no config)."""
    if "layers" not in h5:
        raise FormatError("weights file has no 'layers' group")
    groups = h5["layers"]
    found = []
    for key in groups.keys():
        g = groups[key]
        base = re.sub(r"_\d+$", "", key)
        count = int(key[len(base) + 1:]) if key != base else 0
        if base == "bidirectional" and "forward_layer" in g and "backward_layer" in g:
            inner = {"class_name": "LSTM", "config": {"return_sequences": True}}
            spec = _Spec(key, "Bidirectional", {"layer": inner, "merge_mode": "concat"},
                         f"layers/{key}", (key,))
        elif base in ("lstm", "cu_dnnlstm") and "cell" in g:
            spec = _Spec(key, "LSTM" if base == "lstm" else "CuDNNLSTM",
                         {"return_sequences": True}, f"layers/{key}", (key,))
        else:
            continue
        v = g.get("vars")
        if v is not None and "name" in v.attrs:
            spec.name = _text(_attr(v, "name"))
        found.append((base, count, spec))
    if len({b for b, _, _ in found}) > 1:
        raise FormatError("this weights-only file mixes LSTM and Bidirectional layers, whose "
                          "order it does not record: pass config= (the model's config)")
    found.sort(key=lambda t: t[1])
    return _chain_guess([s for _, _, s in found]) if found else []


def _open_source(source, config=None, keras_version=None):
    """Parse any supported source into a _Source (caller closes it)."""
    if _is_live_keras(source):
        return _live_source(source)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(bytes(source))
    what = str(source) if not hasattr(source, "read") else "Keras file"
    config = _coerce_config(config)
    head = _read_head(source, what)
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return _keras_archive(source, what, config, keras_version)
    if is_hdf5(head):
        size = _source_size(source, what)
        return _h5_source(_open_h5(source), what, config, keras_version, close=True, size=size)
    raise FormatError(f"{what}: neither a .keras archive nor an HDF5 file")


_MAX_INFLATE_RATIO = 100


def _source_size(source, what):
    """Size in bytes of a path or a seekable file object (left at 0)."""
    try:
        if hasattr(source, "read"):
            source.seek(0, os.SEEK_END)
            size = source.tell()
            source.seek(0)
            return int(size)
        return os.path.getsize(source)
    except (OSError, TypeError, ValueError) as exc:
        raise FormatError(f"{what}: cannot tell the file's size ({exc})") from exc


def _read_head(source, what, n=4096):
    """The first bytes of a path or a seekable file object (left at 0)."""
    try:
        if hasattr(source, "read"):
            source.seek(0)
            head = source.read(n)
            source.seek(0)
            return head
        with open(source, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise FormatError(f"{what}: cannot read ({exc})") from exc


def _keras_archive(source, what, config, keras_version):
    try:
        zf = zipfile.ZipFile(source)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, OSError, ...
        raise FormatError(f"{what}: not a readable zip archive ({exc})") from exc
    try:
        with zf:
            def read(name, limit=None):
                try:
                    info = zf.getinfo(name)
                except KeyError:
                    return None
                if limit is not None and info.file_size > limit:
                    raise FormatError(f"{what}: {name} is larger than {limit} bytes")
                return zf.read(info)
            names = set(zf.namelist())
            if "model.weights.h5" not in names:
                if "model.weights.json" in names or "model.weights.npz" in names:
                    raise FormatError(f"{what}: sharded or .npz Keras weights are not supported")
                raise FormatError(f"{what}: no model.weights.h5 in the archive")
            cfg_bytes = read("config.json", _MAX_JSON)
            if cfg_bytes is None and config is None:
                raise FormatError(f"{what}: no config.json in the archive")
            meta_bytes = read("metadata.json", _MAX_JSON)
            # Zip bombs: the member's declared size bounds what zipfile
            # inflates; allow real weights (which barely compress) but refuse
            # a ratio no weight file reaches.
            winfo = zf.getinfo("model.weights.h5")
            weights = read("model.weights.h5", _MAX_INFLATE_RATIO * winfo.compress_size + (1 << 20))
    except FastLSTMError:
        raise
    except Exception as exc:  # noqa: BLE001 - zlib.error, BadZipFile, EOFError, ...
        raise FormatError(f"{what}: corrupt zip archive ({exc})") from exc
    if config is None:
        config = _json(cfg_bytes, f"{what}: config.json")
    meta = _json(meta_bytes, f"{what}: metadata.json") if meta_bytes is not None else {}
    if keras_version is None and isinstance(meta, dict):
        keras_version = meta.get("keras_version")
    h5 = _open_h5(io.BytesIO(weights))
    try:
        stacks = _stacks_from_config(_coerce_config(config), f"{what}: config.json")
    except BaseException:
        h5.close()
        raise
    # The weights may expand (HDF5 compression, fill values) as the zip may:
    # the budget is relative to the bytes the member takes in the archive.
    return _Source(stacks, _NewFormatWeights(h5), keras_version, h5.close,
                   size=winfo.compress_size)


def _h5_source(h5, what, config, keras_version, close, size):
    closer = h5.close if close else None
    try:
        attrs = h5.attrs
        if keras_version is None:
            for node in (h5, h5.get("model_weights")):
                if node is not None and "keras_version" in node.attrs:
                    keras_version = _text(_attr(node, "keras_version"))
                    break
        if config is None and "model_config" in attrs:
            config = _coerce_config(_json(_text(_attr(h5, "model_config")),
                                          f"{what}: model_config"))
        if "model_weights" in h5 and isinstance(h5["model_weights"], _h5py().Group):
            wgroup = h5["model_weights"]
        elif _str_list_attr(h5, "layer_names") is not None:
            wgroup = h5
        elif "layers" in h5:  # Keras 3 .weights.h5 (the .keras weights file alone)
            weights = _NewFormatWeights(h5)
            stacks = (_stacks_from_config(config, what) if config is not None
                      else _infer_new_format(h5))
            return _Source(stacks, weights, keras_version, closer, size)
        else:
            raise FormatError(f"{what}: HDF5 file without Keras weights "
                              "(no model_weights, layer_names or layers)")
        layer_names = _str_list_attr(wgroup, "layer_names")
        if layer_names is None:
            raise FormatError(f"{what}: legacy Keras weights without a layer_names attribute")
        if config is not None:
            stacks = _stacks_from_config(config, what)
        else:
            stacks = _infer_legacy(wgroup, layer_names)
        return _Source(stacks, _LegacyWeights(wgroup), keras_version, closer, size)
    except BaseException:
        if closer is not None:
            closer()
        raise


def _is_live_keras(obj):
    mod = type(obj).__module__ or ""
    return (mod.split(".")[0] in ("keras", "tf_keras", "tensorflow")
            and hasattr(obj, "get_config"))


def _live_version(obj):
    root = (type(obj).__module__ or "").split(".")[0]
    if root == "tf_keras" or root == "tensorflow":
        return "2"  # tf.keras 2 (TF >= 2.16 uses Keras 3, whose modules are keras.src)
    mod = sys.modules.get(root)
    return getattr(mod, "__version__", None)


def _live_source(obj):
    version = _live_version(obj)
    cls = type(obj).__name__
    if cls in _RECURRENT:
        cfg = _jsonable(obj.get_config())
        spec = _Spec(obj.name, cls, cfg, None, (obj.name,))
        weights = _LiveLayer(obj)
        return _Source([[spec]], weights, version)
    if not hasattr(obj, "layers"):
        raise FormatError(f"from_keras: expected a Keras model, LSTM or Bidirectional layer, "
                          f"got {cls}")
    try:
        cfg = obj.get_config()
    except Exception as exc:  # noqa: BLE001 - subclassed models may not serialise
        raise FormatError(f"from_keras: {cls}.get_config() failed ({exc})") from exc
    is_seq = any(c.__name__ == "Sequential" for c in type(obj).__mro__)
    config = {"class_name": "Sequential" if is_seq else "Functional", "config": _jsonable(cfg)}
    return _Source(_walk_model(config, cls), _LiveWeights(obj), version)


class _LiveLayer:
    def __init__(self, layer):
        self.layer = layer

    def get(self, spec):
        return _live_layer_weights(self.layer)


# --------------------------------------------------------------- public API
def _describe(src, stack, index):
    """The listing of one stack, from the config and the weights' HDF5
    headers only (no weight is read)."""
    layers = []
    for s in stack:
        dirs = s.directions()
        what = f"layer {s.name!r}"
        w = src.weights.get(s)
        if len(w) != len(dirs):
            raise FormatError(f"{what}: expected weights for {len(dirs)} direction(s)")
        units = [_check_lstm_shapes(refs, cls, cfg, what) for (cls, cfg), refs in zip(dirs, w)]
        layers.append({
            "name": s.name, "class_name": s.class_name,
            "input_size": int(w[0][0].shape[0]), "units": int(units[0]),
            "bidirectional": s.class_name == "Bidirectional",
            "merge_mode": s.config.get("merge_mode", "concat") if s.class_name == "Bidirectional" else None,
            "go_backwards": bool(dirs[0][1].get("go_backwards", False)),
            "return_sequences": s.return_sequences, "return_state": s.return_state,
            "stateful": bool(dirs[0][1].get("stateful", False)),
            "activation": dirs[0][1].get("activation", "tanh"),
            "recurrent_activation": dirs[0][1].get("recurrent_activation", "sigmoid"),
        })
    return {"name": _stack_name(stack), "format": "keras", "kind": "KerasStack",
            "index": index, "keras_version": src.keras_version, "num_layers": len(stack),
            "input_size": layers[0]["input_size"], "hidden_size": layers[0]["units"],
            "bidirectional": layers[0]["bidirectional"], "layers": layers,
            "external_inputs": stack[0].extra_inputs,
            "masked": any(s.masked for s in stack)}


def list_keras_stacks(source, *, config=None):
    """Describe the LSTM stacks found in a Keras file or live model.

    Returns a list of dicts: ``name`` (the first layer's name: pass it to
    load_keras), ``format`` ('keras'), ``index``, ``keras_version``,
    ``num_layers``, ``input_size``, ``layers`` (each with name, class_name,
    input_size, units, bidirectional, merge_mode, go_backwards,
    return_sequences, return_state, stateful, activation,
    recurrent_activation), ``external_inputs`` (the first layer also takes
    tensors such as an initial state from elsewhere in the graph) and
    ``masked`` (a Masking layer or mask_zero embedding feeds it: pass its
    mask to the stack's call, ``mask=``).
    Only the configuration and the weights' HDF5 headers are read (shapes
    are checked, no weight data is read); inconsistent shapes raise
    FormatError."""
    src = _guarded(lambda: _open_source(source, config))
    try:
        return _guarded(lambda: [_describe(src, st, k) for k, st in enumerate(src.stacks)])
    finally:
        src.close()


def _pick(stacks, name):
    if not stacks:
        raise FormatError("no LSTM layer found in this Keras model")
    if name is None:
        if len(stacks) > 1:
            raise FormatError(f"this Keras model holds {len(stacks)} LSTM stacks: pass name= "
                              f"one of {[_stack_name(s) for s in stacks]} (or an index)")
        return stacks[0]
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if not 0 <= name < len(stacks):
            raise FormatError(f"name: stack index {name} out of range 0..{len(stacks) - 1}")
        return stacks[name]
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, an int or None, got {type(name).__name__}")
    for st in stacks:
        if name == _stack_name(st) or any(s.name == name for s in st):
            return st
    raise FormatError(f"no LSTM stack or layer named {name!r}; available: "
                      f"{[_stack_name(s) for s in stacks]}")


def _stack_name(stack):
    return stack[0].name


def _guarded(fn):
    """Run fn, turning anything unexpected a malformed file triggers into FormatError."""
    try:
        return fn()
    except FastLSTMError:
        raise
    except (MemoryError, RecursionError) as exc:
        raise FormatError(f"Keras file too large or too deeply nested ({exc!r})") from exc
    except Exception as exc:  # noqa: BLE001 - h5py/zip/JSON oddities of a damaged file
        raise FormatError(f"malformed Keras file ({type(exc).__name__}: {exc})") from exc


def load_keras(source, name=None, *, config=None, keras_version=None, dtype=np.float32,
               num_threads=None, batch_first=None):
    """Load the LSTM stack of a Keras file or live Keras object.

    source: a path or file object (.keras archive, legacy full-model .h5,
    weights-only .h5 / .weights.h5), bytes, or a live Keras model or
    LSTM / Bidirectional layer.
    name: which chain of LSTM layers (see ``list_keras_stacks``): its name
    (the name of its first layer), the name of any of its layers, or its
    index; needed when the model holds several.
    config: the model config (dict or JSON) for weights-only files; without it
    the layers are assumed to use Keras' defaults (tanh, sigmoid, no
    go_backwards, merge_mode="concat", return_sequences on every layer but the
    last of a chain).  A weights-only file made by Keras < 2.3 used
    hard_sigmoid by default: pass the config.
    keras_version: override the version read from the file (it decides the
    slope of hard_sigmoid: 0.2 before Keras 3, 1/6 from Keras 3 on).
    dtype: float32 (default) or float64 for the fastlstm.LSTM objects.
    batch_first: the time layout of the stack's inputs and sequence outputs.
    None (default): as in Keras, (N, T, ...), or (T, N, ...) for tf.keras
    ``time_major=True`` layers; True: (N, T, ...); False: (T, N, ...),
    whatever the layers say.
    Returns a KerasStack.

    Each weight's shape and dtype are checked against the layer's from the
    HDF5 headers before anything is read, and a file may not have more
    bytes of weights read from it than _MAX_INFLATE_RATIO (100) times its
    size plus 1 MiB (a .keras archive: its weights member's compressed
    size), so a small file declaring huge datasets raises FormatError.
    """
    if batch_first is not None and not isinstance(batch_first, (bool, np.bool_)):
        raise TypeError(f"batch_first: expected True, False or None, got {batch_first!r}")
    src = _guarded(lambda: _open_source(source, config, keras_version))
    try:
        chosen = _pick(src.stacks, name)
        version = keras_version if keras_version is not None else src.keras_version
        major = _keras_major(version)

        def build():
            return [_build(spec, src.weights.get(spec), major, dtype, num_threads,
                           read=src.read, batch_first=batch_first)
                    for spec in chosen]
        layers = _guarded(build)
    finally:
        src.close()
    return KerasStack(layers, keras_version=version,
                      source=None if _is_live_keras(source) else str(source))


def from_keras(obj, name=None, *, dtype=np.float32, num_threads=None, batch_first=None):
    """A KerasStack from a live Keras model or LSTM / Bidirectional layer
    (weights are copied)."""
    if not _is_live_keras(obj):
        raise TypeError(f"from_keras: expected a Keras model or layer, got {type(obj).__name__}")
    return load_keras(obj, name, dtype=dtype, num_threads=num_threads, batch_first=batch_first)


# ------------------------------------------------ fastlstm.io format registry
def sniff(head, path=None):
    """True if a file whose first bytes are `head` looks like a Keras file:
    an HDF5 file, or (given `path`) a zip holding config.json and
    model.weights.h5."""
    head = bytes(head)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return path is not None and is_keras_archive(path)
    return is_hdf5(head)


def _probe_sniff(probe):
    if probe.is_dir:
        return False
    if probe.is_zip:
        names = probe.zip_names()
        return names is not None and "config.json" in names and "model.weights.h5" in names
    return is_hdf5(probe.head)


def list_stacks(path, **kwargs):
    """``[(name, info), ...]`` for fastlstm.list_stacks (info as in list_keras_stacks)."""
    return [(d["name"], d) for d in list_keras_stacks(path, **kwargs)]


_LOAD_ARGS = ("config", "keras_version", "dtype", "num_threads", "batch_first")


def load(path, name=None, **kwargs):
    """fastlstm.load for Keras files: a KerasStack (see load_keras).

    Takes load_keras' keyword arguments (config, keras_version, dtype,
    num_threads, batch_first); fastlstm.load's ``weights=`` is
    ``KerasStack.astype``.  The cell options of fastlstm.LSTM
    (activations, clip, ...) come from the Keras config and are refused."""
    for key in kwargs:
        if key not in _LOAD_ARGS:
            raise TypeError(f"{key}: not an argument for Keras files (their cell options "
                            f"come from the Keras config); they take {', '.join(_LOAD_ARGS)}")
    return load_keras(path, name, **kwargs)


def _register():
    try:
        from . import register_format
    except ImportError:  # fastlstm.io without a registry: use load_keras directly
        return
    register_format("keras", _probe_sniff, list_stacks, load)


_register()

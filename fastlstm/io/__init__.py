"""Loaders for the weight files training frameworks write, with NumPy alone.

    import fastlstm
    fastlstm.list_stacks("model.pt")     # [(name, info), ...] for every LSTM
    m = fastlstm.load("model.pt", name="encoder.lstm")
    m.save("encoder.safetensors")        # fastlstm's own format
    m2 = fastlstm.load("encoder.safetensors")

Formats are recognised by content, not by extension:

* ``fastlstm``: LSTM.save's safetensors file with a configuration in its
  metadata (:mod:`fastlstm.io.native`);
* ``safetensors``: any safetensors file holding torch.nn.LSTM / LSTMCell
  state dicts (:mod:`fastlstm.io.safetensors`);
* ``torch``: torch.save zip archives, read by a restricted unpickler that
  never runs code from the file (:mod:`fastlstm.io.torchfile`);
* ``torch-export``: torch.export.save archives (.pt2): JSON and raw weight
  records, with ``batch_first`` from the graph (:mod:`fastlstm.io.pt2`);
* more formats plug in with :func:`register_format` (the ``onnx`` and
  ``keras`` modules of this package register themselves when present).

A *stack* is one LSTM (all its layers and directions) in a file; its name is
the key prefix without the trailing dot (``'encoder.lstm'``; ``''`` for a
state dict's root).  ``load(path, name=...)`` accepts the full name or a
unique dotted suffix of it (``'lstm'`` finds ``'model_state_dict.lstm'``).
"""
from __future__ import annotations

import importlib
import inspect
import os
import re

import numpy as np

from ..errors import FormatError
from . import native, pt2, safetensors, stacks, torchfile
from .native import load_model, save_model
from .safetensors import SafetensorsFile
from .torchfile import TorchFile, TensorRef, load_torch

__all__ = ["load", "list_stacks", "detect_format", "register_format", "unregister_format",
           "formats", "Probe", "save_model", "load_model", "load_torch", "from_state_dict",
           "from_torch_cell", "SafetensorsFile", "TorchFile", "TensorRef"]

_HEAD_BYTES = 4096


class Probe:
    """What a format's ``sniff`` sees of a file.

    ``path`` (str), ``size`` (bytes), ``head`` (the first 4 KiB, b'' for a
    directory), ``is_dir``; ``zip_names()`` (member names if the file is a
    readable zip, else None) and ``safetensors_metadata()`` (the
    ``__metadata__`` dict of a valid safetensors file, {} when it has none,
    None if the file is not valid safetensors) are computed once on demand.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self.is_dir = os.path.isdir(self.path)
        if self.is_dir:
            self.size, self.head = 0, b""
        else:
            with open(self.path, "rb") as f:
                self.head = f.read(_HEAD_BYTES)
                f.seek(0, os.SEEK_END)
                self.size = f.tell()
        self._zip = self._st = ...

    @property
    def is_zip(self):
        return self.head[:4] in (b"PK\x03\x04", b"PK\x05\x06")

    @property
    def is_hdf5(self):
        return self.head[:8] == b"\x89HDF\r\n\x1a\n"

    @property
    def looks_safetensors(self):
        """The safetensors heuristic: a plausible u64 header size then '{'."""
        if len(self.head) < 9 or self.head[8:9] != b"{":
            return False
        n = int.from_bytes(self.head[:8], "little")
        return 2 <= n <= min(safetensors.MAX_HEADER_SIZE, self.size - 8)

    @property
    def is_pickle(self):
        return self.head[:1] == b"\x80" and self.head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                              b"\x05")

    def zip_names(self):
        if self._zip is ...:
            self._zip = None
            if self.is_zip:
                import zipfile
                try:
                    with zipfile.ZipFile(self.path) as z:
                        self._zip = z.namelist()
                except Exception:  # any corruption: not a readable zip
                    self._zip = None
        return self._zip

    def safetensors_metadata(self):
        if self._st is ...:
            self._st = None
            if self.looks_safetensors:
                try:
                    with SafetensorsFile(self.path) as f:
                        self._st = dict(f.metadata or {})
                except FormatError:
                    self._st = None
        return self._st


class _Format:
    __slots__ = ("name", "sniff", "list_stacks", "load", "priority", "order")

    def __init__(self, name, sniff, list_stacks, load, priority, order):
        self.name, self.sniff, self.list_stacks, self.load = name, sniff, list_stacks, load
        self.priority, self.order = priority, order


_FORMATS = {}
_PLUGIN_ERRORS = {}  # plugin module name -> why it could not be imported


def register_format(name, sniff, list_stacks, load, *, priority=0):
    """Add (or replace) a file format.

    ``sniff(probe) -> bool`` says whether a file is in this format (see
    :class:`Probe`; it must be cheap and must not raise for foreign files);
    ``list_stacks(path) -> [(name, info), ...]``; ``load(path, name=None,
    **kwargs) -> fastlstm.LSTM``.  Formats are tried by decreasing
    ``priority``, then in registration order; the first whose sniff returns
    True handles the file.  Loaders raise fastlstm.FormatError for files
    they cannot read.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("name: expected a non-empty str")
    for fn, what in ((sniff, "sniff"), (list_stacks, "list_stacks"), (load, "load")):
        if not callable(fn):
            raise TypeError(f"{what}: expected a callable")
    order = _FORMATS[name].order if name in _FORMATS else len(_FORMATS)
    _FORMATS[name] = _Format(name, sniff, list_stacks, load, int(priority), order)


def unregister_format(name):
    """Remove a registered format (KeyError if unknown)."""
    del _FORMATS[name]


def formats():
    """Names of the registered formats, in the order they are tried."""
    return [f.name for f in _ordered()]


def _ordered():
    return sorted(_FORMATS.values(), key=lambda f: (-f.priority, f.order))


def _unsupported(probe):
    """Message for a file no registered format claims."""
    where = probe.path
    if probe.is_dir:
        return f"{where}: is a directory, not a weights file"
    if probe.size == 0:
        return f"{where}: empty file"
    names = probe.zip_names() if probe.is_zip else None
    if names is not None and ("config.json" in names or "model.weights.h5" in names):
        return f"{where}: a Keras .keras archive: keras support not available" + _why("keras")
    if probe.is_hdf5:
        return f"{where}: an HDF5 (Keras .h5) file: keras support not available" + _why("keras")
    if names and any(n.count("/") == 1 and n.endswith("/archive_format") for n in names):
        return (f"{where}: a PT2 archive without an ExportedProgram (models/*.json under one "
                f"top-level folder), e.g. an AOTInductor package: not supported")
    if probe.is_zip:
        return f"{where}: a zip archive that is not a torch.save file (no data.pkl)"
    if probe.is_pickle:
        return (f"{where}: a pickle, not a zip archive: legacy torch.save files (PyTorch < 1.6 "
                f"or _use_new_zipfile_serialization=False) and plain pickles are not "
                f"supported; re-save with a recent PyTorch: "
                f"torch.save(torch.load(old, weights_only=True), new)")
    if probe.looks_safetensors:
        return f"{where}: looks like safetensors but its header is invalid"
    if probe.path.lower().endswith(".onnx"):
        return f"{where}: an ONNX model: onnx support not available" + _why("onnx")
    return f"{where}: unrecognised file format (first bytes {probe.head[:8]!r})"


def _why(plugin):
    err = _PLUGIN_ERRORS.get(plugin)
    return f" ({err})" if err else ""


def detect_format(path):
    """Name of the registered format that claims ``path`` (FormatError if none)."""
    probe = Probe(path)
    for fmt in _ordered():
        try:
            if fmt.sniff(probe):
                return fmt.name
        except FormatError:
            continue
    # Let the matching reader explain what is wrong with a damaged file.
    if probe.looks_safetensors and probe.safetensors_metadata() is None:
        with SafetensorsFile(path):
            pass
    if probe.is_zip and probe.zip_names() is None:
        with TorchFile(path):
            pass
    raise FormatError(_unsupported(probe))


def _format(path, format):
    if format is None:
        format = detect_format(path)
    elif format not in _FORMATS:
        raise ValueError(f"format: unknown format {format!r}; known: {formats()}")
    return _FORMATS[format]


def list_stacks(path, *, format=None):
    """Every LSTM stack in a file: a list of ``(name, info)``.

    ``info`` is a dict: ``format``, ``kind`` ('LSTM' or 'LSTMCell'),
    ``input_size``, ``hidden_size``, ``proj_size``, ``num_layers``,
    ``num_directions``, ``bidirectional``, ``bias``, ``dtype`` (of the stored
    weights), ``variant`` ('standard', or the cell options in use such as
    'peepholes'); where the file records them, ``batch_first`` and the
    module's class (``torchscript``: a TorchScript archive's).  Only headers
    and metadata are read, not the weights.
    """
    return list(_format(path, format).list_stacks(os.fspath(path)))


def load(path, name=None, *, format=None, weights=None, **kwargs):
    """Load an LSTM from a weights file as a fastlstm.LSTM.

    The format is recognised by content (see :func:`formats`).  ``name``
    picks one stack when the file holds several (see :func:`list_stacks`).
    ``weights`` ("float32", "float16", "bfloat16" or "int8") returns
    ``model.astype(weights)``: the weights stored in that precision (a
    fastlstm file already in that precision keeps its stored weights, and
    for int8 its input weights and activation bits).
    Other keyword arguments go to the format's loader; the built-in loaders
    of framework files take ``batch_first``, ``dtype``, ``num_threads`` and
    the cell options of ``fastlstm.LSTM``; a fastlstm file takes
    ``batch_first``, ``dtype`` and ``num_threads``; a Keras file (which
    loads as a ``fastlstm.io.keras.KerasStack``, ``weights`` applying to
    each of its LSTMs) ``batch_first``, ``dtype``, ``num_threads``,
    ``config`` and ``keras_version``.
    """
    if weights is not None:
        from ..model import _check_precision
        weights = _check_precision(weights)  # ValueError before reading the file
    fmt = _format(path, format)
    model = fmt.load(os.fspath(path), name, **kwargs)
    if weights is None:
        return model
    if not callable(getattr(model, "astype", None)):
        raise TypeError(f"weights: the {fmt.name!r} format loads a {type(model).__name__}, "
                        f"which cannot change its weights' precision")
    return model.astype(weights)


# ------------------------------------------------------------------ built-ins
def _native_sniff(probe):
    meta = probe.safetensors_metadata()
    return meta is not None and native.METADATA_KEY in meta


def _native_load(path, name=None, **kwargs):
    return native.load_model(path, name, **kwargs)


def _st_sniff(probe):
    return probe.looks_safetensors and probe.safetensors_metadata() is not None


def _st_stacks(f):
    metas = {k: (i.shape, i.logical_dtype) for k, i in f.infos.items()}
    return stacks.find_stacks(metas, "safetensors")


def _st_list(path):
    with SafetensorsFile(path) as f:
        found, _ = _st_stacks(f)
    return [(s.name, s.info) for s in found]


def _st_load(path, name=None, **kwargs):
    with SafetensorsFile(path) as f:
        found, rejected = _st_stacks(f)
        stack = stacks.select_stack(found, name, f.where, rejected)
        return stacks.build_model(stack, f.get, f.where, lambda k: f.infos[k].nbytes, f.size,
                                  **kwargs)


def _torch_sniff(probe):
    names = probe.zip_names()
    return names is not None and any(
        n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1) for n in names)


def _torch_stacks(f):
    flat = stacks.flatten(f.obj, lambda x: isinstance(x, TensorRef))
    metas = {k: (t.shape, t.dtype) for k, t in flat.items()}
    found, rejected = stacks.find_stacks(metas, "torch")
    if f.torchscript:
        for s in found:
            _script_config(f, s)
    return flat, found, rejected


# TorchScript constants that must agree with what the weights' shapes say
_SCRIPT_CHECKED = ("input_size", "hidden_size", "proj_size", "num_layers", "bidirectional",
                   "bias")


def _script_config(f, stack):
    """A TorchScript archive's module: what its code records (a scripted
    module's Final constants, a traced LSTM's torch.lstm call) must agree
    with the shapes; its batch_first goes into the stack's info."""
    consts = f.script_constants(stack.name)
    # the module's TorchScript class, without torch's ___torch_mangle_<n> parts
    stack.info["torchscript"] = re.sub(r"\.___torch_mangle_[0-9]+", "",
                                       f.script_paths.get(stack.name, "?"))
    mode = consts.get("mode")
    if mode is not None and mode != "LSTM":
        raise FormatError(f"{f.where}: module {stack.name or '<root>'!r} is a TorchScript "
                          f"{mode}, not an LSTM")
    for key in _SCRIPT_CHECKED:
        if key in consts and consts[key] != stack.info[key]:
            raise FormatError(
                f"{f.where}: module {stack.name or '<root>'!r}: its TorchScript code says "
                f"{key}={consts[key]!r}, its weights' shapes {key}={stack.info[key]!r}")
    if stack.kind == "LSTM" and type(consts.get("batch_first")) is bool:
        stack.info["batch_first"] = consts["batch_first"]


def _torch_list(path):
    with TorchFile(path) as f:
        _, found, _ = _torch_stacks(f)
    return [(s.name, s.info) for s in found]


def _torch_load(path, name=None, **kwargs):
    with TorchFile(path) as f:
        flat, found, rejected = _torch_stacks(f)
        stack = stacks.select_stack(found, name, f.where, rejected)
        return stacks.build_model(stack, lambda k: f.array(flat[k]), f.where,
                                  lambda k: flat[k].nbytes, f.size, **kwargs)


def _pt2_sniff(probe):
    names = probe.zip_names()
    return names is not None and pt2.is_export_archive(names)


register_format("fastlstm", _native_sniff, native.list_stacks, _native_load, priority=10)
register_format("safetensors", _st_sniff, _st_list, _st_load)
register_format("torch", _torch_sniff, _torch_list, _torch_load)
register_format(pt2.FORMAT_NAME, _pt2_sniff, pt2.list_stacks, pt2.load)


# -------------------------------------------------------------- in-memory
def _is_tensor_like(x):
    return isinstance(x, np.ndarray) or (hasattr(x, "shape") and hasattr(x, "dtype")
                                         and hasattr(x, "detach"))


def _dtype_name(x):
    name = str(x.dtype)
    return name[len("torch."):] if name.startswith("torch.") else name


def from_state_dict(state_dict, name=None, **kwargs):
    """Build a fastlstm.LSTM from an in-memory state dict (torch tensors or
    NumPy arrays; nested dicts allowed) holding a torch.nn.LSTM or
    nn.LSTMCell anywhere: the same discovery as :func:`load`."""
    flat = stacks.flatten(state_dict, _is_tensor_like)
    metas = {k: (tuple(v.shape), _dtype_name(v)) for k, v in flat.items()}
    found, rejected = stacks.find_stacks(metas, "state_dict")
    stack = stacks.select_stack(found, name, "state_dict", rejected)

    def get(key):
        v = flat[key]
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if str(v.dtype) == "torch.bfloat16":
                v = v.float()
            v = v.numpy()
        return np.asarray(v)

    return stacks.build_model(stack, get, "state_dict", **kwargs)


def from_torch_cell(cell, *, dtype=None, num_threads=None):
    """A one-layer fastlstm.LSTM from a live torch.nn.LSTMCell (weights are
    copied).  One step of the cell is ``m(x[None])`` (T = 1)."""
    if not hasattr(cell, "state_dict") or not hasattr(cell, "hidden_size") or \
            not hasattr(cell, "weight_ih"):
        raise TypeError(f"cell: expected a torch.nn.LSTMCell, got {type(cell).__name__}")
    sd = dict(cell.state_dict())
    if set(sd) - {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}:
        raise TypeError(f"cell: expected a torch.nn.LSTMCell, got {type(cell).__name__} with "
                        f"parameters {sorted(sd)}")
    w_hh = sd["weight_hh"]
    if tuple(w_hh.shape) != (4 * cell.hidden_size, cell.hidden_size):
        raise TypeError(f"cell: {type(cell).__name__} has weight_hh {tuple(w_hh.shape)}: not "
                        f"an LSTM cell")
    return from_state_dict(sd, dtype=dtype, num_threads=num_threads)


# ------------------------------------------------------------------ plugins
def _adapt_plugin(name, mod):
    """Register a plugin module that exposes module-level ``sniff``,
    ``list_stacks`` and ``load`` (or ``load_stack``) instead of calling
    register_format itself.  ``sniff`` may take ``(head)``, ``(head, path)``
    or a Probe; ``list_stacks`` may return dicts with a 'name' key."""
    sniff_fn = getattr(mod, "sniff", None)
    list_fn = getattr(mod, "list_stacks", None)
    load_fn = getattr(mod, "load", None) or getattr(mod, "load_stack", None)
    if not (callable(sniff_fn) and callable(list_fn) and callable(load_fn)):
        _PLUGIN_ERRORS[name] = f"fastlstm.io.{name} registers no format"
        return
    try:
        nparams = len(inspect.signature(sniff_fn).parameters)
    except (TypeError, ValueError):
        nparams = 1

    def sniff(probe):
        if probe.is_dir:
            return False
        try:
            return bool(sniff_fn(probe.head, probe.path) if nparams >= 2 else sniff_fn(probe.head))
        except Exception:  # a sniffer must not break detection of other formats
            return False

    def list_stacks(path):
        out = []
        for item in list_fn(path):
            if isinstance(item, tuple) and len(item) == 2:
                out.append(item)
            elif isinstance(item, dict):
                out.append((item.get("name"), item))
            else:
                out.append((str(item), item))
        return out

    def load(path, name=None, **kwargs):
        return load_fn(path, name, **kwargs)

    register_format(name, sniff, list_stacks, load)


def _load_plugins():
    for plugin in ("onnx", "keras"):
        try:
            mod = importlib.import_module(f"{__name__}.{plugin}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{plugin}":
                _PLUGIN_ERRORS[plugin] = "no fastlstm.io." + plugin + " module"
            else:
                _PLUGIN_ERRORS[plugin] = f"{type(exc).__name__}: {exc}"
            continue
        except Exception as exc:  # a broken plugin must not break `import fastlstm`
            _PLUGIN_ERRORS[plugin] = f"{type(exc).__name__}: {exc}"
            continue
        if plugin not in _FORMATS:
            _adapt_plugin(plugin, mod)


_load_plugins()

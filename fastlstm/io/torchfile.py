"""PyTorch files (``torch.save``, .pt/.pth) read without torch and without
running code from the file.

A ``torch.save`` file is an uncompressed ZIP archive: ``<name>/data.pkl``
(the pickled object, tensors reduced to ``torch._utils._rebuild_tensor_v2(
storage, offset, size, stride, ...)``, storages as persistent ids
``('storage', <torch.XStorage>, key, location, numel)``), ``<name>/data/<key>``
(raw little-endian storage bytes) and ``<name>/byteorder``.

The pickle is read by a restricted unpickler: ``find_class`` resolves only a
fixed allowlist (tensor and parameter rebuild functions, storage types,
torch dtypes, ``collections.OrderedDict``, ``torch.Size``, a few harmless
builtins, NumPy scalars) to fastlstm's own stand-ins, never to the real
objects, so nothing from the file is executed; any other global raises
FormatError naming it.  Before unpickling, the opcode stream is scanned so
that no length or memo index in it can make the unpickler allocate more than
the file holds.  Tensors are recorded as :class:`TensorRef` (storage,
offset, shape, stride, dtype) and only read when needed, as read-only NumPy
views of their storage (offset, size and stride honoured; tensors may share
a storage).

TorchScript archives (``torch.jit.save`` of a scripted or traced module) are
the same zip with a ``code/`` folder: their ``data.pkl`` pickles the module
tree as objects of ``__torch__.<path>.<Class>`` (NEWOBJ, then BUILD with the
attribute dict).  Such globals resolve to :class:`ScriptObject`, a record of
the class's name and the attributes (nothing of the class is looked up, let
alone run), and the tree is turned into nested dicts, so that an LSTM module
is found under its attribute path like a state dict's prefix.  The archive's
code is never executed or compiled: :meth:`TorchFile.script_constants` only
matches two fixed line patterns in a class's source text (a scripted module's
``name : Final[int] = 3`` constants, a traced module's single literal
``torch.lstm(...)`` call) and reads their values with ``ast.literal_eval``.
"""
from __future__ import annotations

import ast
import io
import math
import os
import pickle
import pickletools
import re
import zipfile
from collections import OrderedDict

import numpy as np

from ..errors import FormatError
from .safetensors import bf16_to_f32

__all__ = ["TorchFile", "TensorRef", "ScriptObject", "load_torch"]

_MAX_NDIM = 64

# torch dtype name -> (little-endian numpy dtype or None, item size)
_DTYPES = {
    "float32": ("<f4", 4), "float64": ("<f8", 8), "float16": ("<f2", 2),
    "bfloat16": ("<u2", 2), "int64": ("<i8", 8), "int32": ("<i4", 4), "int16": ("<i2", 2),
    "int8": ("|i1", 1), "uint8": ("|u1", 1), "bool": ("|b1", 1), "complex64": ("<c8", 8),
    "complex128": ("<c16", 16), "uint16": ("<u2", 2), "uint32": ("<u4", 4),
    "uint64": ("<u8", 8), "float8_e4m3fn": (None, 1), "float8_e5m2": (None, 1),
    "float8_e4m3fnuz": (None, 1), "float8_e5m2fnuz": (None, 1), "float8_e8m0fnu": (None, 1),
}
_STORAGE_TYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": None,
}
_TORCH_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16",
                        "long": "int64", "int": "int32", "short": "int16",
                        "cfloat": "complex64", "cdouble": "complex128"}
_NUMPY_SCALAR_CODES = {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4",
                       "f8", "c8", "c16"}
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class _Frozen:
    """Objects the pickle may hold but never modify (BUILD/setattr fail)."""

    __slots__ = ()

    def __setattr__(self, key, value):
        raise AttributeError(f"{type(self).__name__} objects are read-only")

    __delattr__ = __setattr__

    def _set(self, **kw):
        for k, v in kw.items():
            object.__setattr__(self, k, v)


class _Callable(_Frozen):
    __slots__ = ("_fn", "_qualname")

    def __init__(self, fn, qualname):
        self._set(_fn=fn, _qualname=qualname)

    def __call__(self, *args):
        return self._fn(*args)

    def __repr__(self):
        return f"<restricted {self._qualname}>"


class _StorageType(_Frozen):
    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self._set(name=name, dtype=dtype)


class _TorchDType(_Frozen):
    __slots__ = ("name",)

    def __init__(self, name):
        self._set(name=name)


class _NumpyDType(_Frozen):
    __slots__ = ("code", "order")

    def __init__(self, code, order="="):
        self._set(code=code, order=order)

    def __setstate__(self, state):
        # numpy's dtype state: (version, byteorder, subarray, names, fields, ...)
        if (not isinstance(state, tuple) or len(state) < 5 or not isinstance(state[1], str)
                or len(state[1]) != 1 or state[1] not in "<>|="
                or any(x is not None for x in state[2:5])):
            raise FormatError("unsupported numpy dtype state in the pickle")
        object.__setattr__(self, "order", state[1])

    def numpy(self):
        order = self.order if self.order in "<>" else "<" if self.code[1:] != "1" else "|"
        if self.order == "=":
            return np.dtype(self.code)
        return np.dtype(order + self.code)


class _Storage(_Frozen):
    __slots__ = ("key", "dtype", "numel", "location")

    def __init__(self, key, dtype, numel, location):
        self._set(key=key, dtype=dtype, numel=numel, location=location)


class TensorRef(_Frozen):
    """A tensor found in a torch file: a view of a storage, not yet read.

    ``shape``, ``stride`` (in elements), ``offset`` (elements from the start
    of the storage), ``dtype`` (torch's name: 'float32', 'bfloat16', ...),
    ``itemsize``, ``numel``, ``nbytes``."""

    __slots__ = ("storage", "offset", "shape", "stride", "dtype", "itemsize")

    def __init__(self, storage, offset, shape, stride, dtype):
        self._set(storage=storage, offset=offset, shape=shape, stride=stride, dtype=dtype,
                  itemsize=_DTYPES[dtype][1])

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return self.numel * self.itemsize

    @property
    def ndim(self):
        return len(self.shape)

    def __repr__(self):
        return (f"TensorRef({self.dtype}, shape={self.shape}, stride={self.stride}, "
                f"offset={self.offset}, storage={self.storage.key!r})")


class ScriptObject(_Frozen):
    """An object of a TorchScript class in a TorchScript archive's data.pkl:
    ``qualname`` (e.g. ``'__torch__.torch.nn.modules.rnn.LSTM'``, mangled
    names included) and ``attrs``, the attribute dict the archive saved (a
    state that is not a dict is kept under ``'__state__'``).  Each qualname
    gets a subclass of its own (pickle's NEWOBJ needs a class); the class is
    only a name."""

    __slots__ = ("attrs",)
    _qualname = "?"

    def __new__(cls, *args):
        if cls is ScriptObject or args:
            raise FormatError(f"TorchScript object {cls._qualname}: built with arguments")
        obj = super().__new__(cls)
        object.__setattr__(obj, "attrs", None)
        return obj

    def __init__(self, *args):  # REDUCE on the class (never written by torch)
        raise FormatError(f"TorchScript object {self._qualname}: called like a function")

    @property
    def qualname(self):
        return type(self)._qualname

    def __setstate__(self, state):
        if self.attrs is not None:
            raise FormatError(f"TorchScript object {self.qualname}: state set twice")
        if isinstance(state, dict) and all(isinstance(k, str) for k in state):
            object.__setattr__(self, "attrs", dict(state))
        else:
            object.__setattr__(self, "attrs", {"__state__": state})

    def __repr__(self):
        return f"<ScriptObject {self.qualname}>"


_MAX_SCRIPT_CLASSES = 4096
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Final constants of a scripted module's class: "  hidden_size : Final[int] = 3"
_FINAL_LINE = re.compile(
    r"  ([A-Za-z_][A-Za-z0-9_]{0,63}) : Final\[(int|bool|float|str)\] = (.{1,200})")
# A traced nn.LSTM's one call: torch.lstm(input, hx, params, has_biases,
# num_layers, dropout, train, bidirectional, batch_first), all literals.
_TRACED_LSTM = re.compile(
    r"torch\.lstm\([A-Za-z_][A-Za-z0-9_]*, [A-Za-z_][A-Za-z0-9_]*, [A-Za-z_][A-Za-z0-9_]*, "
    r"(True|False), ([0-9]{1,6}), [0-9.e+-]{1,24}, (True|False), (True|False), (True|False)\)")
_CONSTANT_TYPES = {"int": int, "bool": bool, "float": float, "str": str}


def _is_int(v):
    return type(v) is int


def _int_tuple(v, what):
    if isinstance(v, (tuple, list)) and len(v) <= _MAX_NDIM and all(
            _is_int(x) and x >= 0 for x in v):
        return tuple(v)
    raise FormatError(f"{what}: expected a tuple of at most {_MAX_NDIM} non-negative ints, "
                      f"got {str(v)[:80]}")


def tensor_view(storage, offset, size, stride, dtype, where):
    """A TensorRef of a view of ``storage``, checked: offset, sizes and
    strides inside the storage (``dtype`` None: the storage's own; else a
    byte storage reinterpreted), and a bounded size.  FormatError (prefixed
    with ``where``) otherwise.  torch.save's rebuild functions and the
    torch.export reader both build their tensors here."""
    if not isinstance(storage, _Storage):
        raise FormatError(f"{where}: tensor rebuilt from a non-storage")
    if not _is_int(offset) or offset < 0:
        raise FormatError(f"{where}: bad storage offset {str(offset)[:40]}")
    size = _int_tuple(size, "tensor size")
    stride = _int_tuple(stride, "tensor stride")
    if len(size) != len(stride):
        raise FormatError(f"{where}: tensor size {size} and stride {stride} differ "
                          f"in length")
    if dtype is None:
        dtype = storage.dtype
        elems = storage.numel
    else:
        if storage.dtype != "uint8":
            raise FormatError(f"{where}: typed storage for a {dtype} tensor")
        elems = storage.numel // _DTYPES[dtype][1]
    n = math.prod(size)
    if n and offset + sum((d - 1) * s for d, s in zip(size, stride)) >= elems:
        raise FormatError(f"{where}: tensor view (offset {offset}, size {size}, "
                          f"stride {stride}) exceeds its storage of {elems} elements")
    if math.prod(max(d, 1) for d in size) * _DTYPES[dtype][1] >= 2 ** 48:
        raise FormatError(f"{where}: tensor size {size} too large")
    return TensorRef(storage, offset, size, stride, dtype)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come from a fixed allowlist of stand-ins."""

    def __init__(self, file, where, script=False):
        super().__init__(file, encoding="utf-8")
        self._where = where
        self._storages = {}
        self._script = script
        self._script_classes = {}
        c = _Callable
        g = {
            "collections.OrderedDict": c(self._ordered_dict, "collections.OrderedDict"),
            "torch._utils._rebuild_tensor": c(self._rebuild_v1, "_rebuild_tensor"),
            "torch._utils._rebuild_tensor_v2": c(self._rebuild_v2, "_rebuild_tensor_v2"),
            "torch._utils._rebuild_tensor_v3": c(self._rebuild_v3, "_rebuild_tensor_v3"),
            "torch._utils._rebuild_parameter": c(self._rebuild_param, "_rebuild_parameter"),
            "torch._utils._rebuild_parameter_with_state":
                c(self._rebuild_param, "_rebuild_parameter_with_state"),
            "torch.Size": c(self._size, "torch.Size"),
            "torch.device": c(self._device, "torch.device"),
            "builtins.set": c(self._set_of, "set"),
            "builtins.frozenset": c(self._frozenset_of, "frozenset"),
            "builtins.complex": c(self._complex, "complex"),
            "builtins.bytes": c(self._bytes, "bytes"),
            "builtins.bytearray": c(self._bytearray, "bytearray"),
            "_codecs.encode": c(self._encode, "_codecs.encode"),
            "numpy.dtype": c(self._np_dtype, "numpy.dtype"),
            "numpy.core.multiarray.scalar": c(self._np_scalar, "numpy scalar"),
            "numpy._core.multiarray.scalar": c(self._np_scalar, "numpy scalar"),
        }
        for name, dtype in _STORAGE_TYPES.items():
            g[f"torch.{name}"] = _StorageType(name, dtype)
        g["torch.storage.UntypedStorage"] = g["torch.UntypedStorage"]
        for name in list(_DTYPES) + list(_TORCH_DTYPE_ALIASES):
            g[f"torch.{name}"] = _TorchDType(_TORCH_DTYPE_ALIASES.get(name, name))
        if script:  # TorchScript's list helpers return their argument
            for fn in ("build_intlist", "build_tensorlist", "build_doublelist",
                       "build_boollist", "restore_type_tag"):
                g[f"torch.jit._pickle.{fn}"] = c(self._passthrough, fn)
        self._globals = g

    # -- the only ways the pickle can reach a Python object
    def find_class(self, module, name):
        if module == "__builtin__":
            module = "builtins"
        obj = self._globals.get(f"{module}.{name}") if isinstance(module, str) and isinstance(
            name, str) else None
        if obj is None and self._script:
            obj = self._script_class(module, name)
        if obj is None and f"{module}.{name}" == "torch._utils._rebuild_qtensor":
            raise FormatError(
                f"{self._where}: holds quantized tensors (torch.ao quantization), which "
                f"fastlstm does not read (refused to load global {module}.{name}); save the "
                f"float model and load it with weights='int8' for int8 weights")
        if obj is None:
            raise FormatError(
                f"{self._where}: refused to load global {module}.{name}: fastlstm reads only "
                f"tensors, storages and plain containers from torch files (no code is run)")
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise FormatError(f"{self._where}: unsupported persistent id {str(pid)[:80]}")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType):
            raise FormatError(f"{self._where}: persistent id names no storage type")
        if not isinstance(key, str) or not 0 < len(key) <= 256:
            raise FormatError(f"{self._where}: bad storage key {str(key)[:80]!r}")
        if not _is_int(numel) or numel < 0:
            raise FormatError(f"{self._where}: bad storage size {str(numel)[:80]}")
        dtype = stype.dtype or "uint8"
        st = self._storages.get(key)
        if st is None:
            st = self._storages[key] = _Storage(key, dtype, numel, str(location)[:64])
        elif st.dtype != dtype or st.numel != numel:
            raise FormatError(f"{self._where}: storage {key!r} is used as both {st.dtype}"
                              f"[{st.numel}] and {dtype}[{numel}]")
        return st

    def _script_class(self, module, name):
        """A ScriptObject subclass for ``__torch__.<path>.<Class>``, or None."""
        if not (isinstance(module, str) and isinstance(name, str)):
            return None
        parts = module.split(".")
        if (parts[0] != "__torch__" or len(module) > 512 or not _IDENT.fullmatch(name)
                or not all(_IDENT.fullmatch(p) for p in parts)):
            return None
        qualname = f"{module}.{name}"
        cls = self._script_classes.get(qualname)
        if cls is None:
            if len(self._script_classes) >= _MAX_SCRIPT_CLASSES:
                raise FormatError(f"{self._where}: more than {_MAX_SCRIPT_CLASSES} TorchScript "
                                  f"classes")
            cls = type("ScriptObject", (ScriptObject,), {"__slots__": (), "_qualname": qualname})
            self._script_classes[qualname] = cls
        return cls

    @staticmethod
    def _passthrough(value, *rest):
        if len(rest) > 1:
            raise FormatError("torch.jit._pickle helper: too many arguments")
        return value

    # -- stand-ins
    @staticmethod
    def _ordered_dict(*args):
        if len(args) > 1:
            raise FormatError("OrderedDict: too many arguments")
        return OrderedDict(*args)

    def _tensor(self, storage, offset, size, stride, dtype=None):
        return tensor_view(storage, offset, size, stride, dtype, self._where)

    def _rebuild_v1(self, storage, offset, size, stride):
        return self._tensor(storage, offset, size, stride)

    def _rebuild_v2(self, storage, offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
        return self._tensor(storage, offset, size, stride)

    def _rebuild_v3(self, storage, offset, size, stride, requires_grad, backward_hooks, dtype,
                    metadata=None):
        if not isinstance(dtype, _TorchDType):
            raise FormatError(f"{self._where}: _rebuild_tensor_v3 without a dtype")
        return self._tensor(storage, offset, size, stride, dtype.name)

    @staticmethod
    def _rebuild_param(data, *rest):
        if not isinstance(data, TensorRef) or len(rest) > 3:
            raise FormatError("Parameter rebuilt from something other than a tensor")
        return data

    @staticmethod
    def _size(*args):
        if len(args) > 1:
            raise FormatError("torch.Size: too many arguments")
        return _int_tuple(args[0] if args else (), "torch.Size")

    @staticmethod
    def _device(*args):
        if not 1 <= len(args) <= 2 or not isinstance(args[0], str):
            raise FormatError("torch.device: bad arguments")
        return ":".join(str(a) for a in args)[:64]

    @staticmethod
    def _check_elements(items, what):
        if not isinstance(items, (list, tuple)):
            raise FormatError(f"{what}: expected a list")
        return items

    def _set_of(self, *args):
        return set(self._check_elements(args[0], "set") if args else ())

    def _frozenset_of(self, *args):
        return frozenset(self._check_elements(args[0], "frozenset") if args else ())

    @staticmethod
    def _complex(*args):
        if len(args) > 2 or not all(isinstance(a, (int, float)) for a in args):
            raise FormatError("complex: bad arguments")
        return complex(*args)

    @staticmethod
    def _encode(text, encoding="utf-8"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8",
                                                         "ascii"):
            raise FormatError("_codecs.encode: bad arguments")
        return text.encode(encoding)

    def _bytes(self, *args):  # never bytes(n): that would allocate n bytes
        if not args:
            return b""
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            return bytes(args[0])
        if len(args) == 2 and isinstance(args[0], str):
            return self._encode(*args)
        raise FormatError("bytes: bad arguments")

    def _bytearray(self, *args):
        return bytearray(self._bytes(*args))

    @staticmethod
    def _np_dtype(code, align=False, copy=False, *rest):
        if not isinstance(code, str) or code.lstrip("<>|=") not in _NUMPY_SCALAR_CODES:
            raise FormatError(f"numpy.dtype: unsupported type {str(code)[:20]!r}")
        return _NumpyDType(code.lstrip("<>|="))

    @staticmethod
    def _np_scalar(dtype, data=None):
        if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
            raise FormatError("numpy scalar: bad arguments")
        dt = dtype.numpy()
        if len(data) != dt.itemsize:
            raise FormatError("numpy scalar: wrong number of bytes")
        return np.frombuffer(data, dt)[0]


def _prescan(data, where):
    """Walk the opcodes: every length must fit in the data (pickletools reads
    lengths as it goes, so nothing is allocated beyond the data), memo
    indices must be small (the C unpickler sizes its memo table by index)."""
    limit = len(data) + 16
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (
                    _is_int(arg) and 0 <= arg <= limit):
                raise FormatError(f"{where}: pickle memo index {arg} out of range")
            if op.name == "FRAME" and not (_is_int(arg) and 0 <= arg <= len(data) - _pos):
                raise FormatError(f"{where}: corrupt pickle in data.pkl (frame of {arg} bytes "
                                  f"at {_pos} runs past the end)")
            if op.name in ("NEXT_BUFFER", "READONLY_BUFFER"):
                raise FormatError(f"{where}: pickle uses out-of-band buffers")
    except FormatError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise FormatError(f"{where}: corrupt pickle in data.pkl ({type(exc).__name__}: "
                          f"{exc})") from exc


class TorchFile:
    """An open torch.save archive.

    ``obj``: the unpickled object with tensors as :class:`TensorRef`;
    ``array(ref)`` reads one tensor.  ``source``: a path or bytes.
    Use as a context manager.
    """

    def __init__(self, source):
        self._fp = None
        self._zf = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.where = "<bytes>"
            self._fp = io.BytesIO(bytes(source))
            self.size = len(self._fp.getbuffer())
        else:
            self.where = os.fspath(source)
            self._fp = open(self.where, "rb")
            self.size = os.fstat(self._fp.fileno()).st_size
        self._arrays = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self):
        head = self._fp.read(len(_LEGACY_MAGIC))
        self._fp.seek(0)
        if head[:2] in (b"PK",) and head[2:4] in (b"\x03\x04", b"\x05\x06"):
            pass
        elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            kind = ("a legacy torch.save file (PyTorch < 1.6, or "
                    "_use_new_zipfile_serialization=False)" if head == _LEGACY_MAGIC
                    else "a plain pickle")
            raise FormatError(
                f"{self.where}: {kind} is not supported: it is not a zip archive.  Re-save it "
                f"with a recent PyTorch: torch.save(torch.load(old, weights_only=True), new)")
        else:
            raise FormatError(f"{self.where}: not a torch.save zip archive (starts with "
                              f"{head[:8]!r})")
        names = self._open_zip()
        pkls = [n for n in names if n == "data.pkl" or (
            n.endswith("/data.pkl") and n.count("/") == 1)]
        if not pkls:
            if any(n.endswith("model.json") for n in names) and any("code/" in n for n in names):
                raise FormatError(f"{self.where}: a TorchScript archive of PyTorch < 1.4 "
                                  f"(model.json) is not supported; load it with torch and "
                                  f"save it again with a recent PyTorch")
            if "config.json" in names:
                raise FormatError(f"{self.where}: a zip with config.json (a Keras file?), not "
                                  f"a torch.save archive")
            raise FormatError(f"{self.where}: zip archive without data.pkl: not a torch.save "
                              f"file")
        if len(pkls) > 1:
            raise FormatError(f"{self.where}: several data.pkl records: {pkls[:4]}")
        self.prefix = pkls[0][: -len("data.pkl")]
        # TorchScript: the archive's code (never run; see the module docstring)
        self.torchscript = any(n.startswith(self.prefix + "code/") for n in names) or (
            self.prefix + "constants.pkl") in self._infos
        self.script_paths = {}
        self._constants = {}
        order = self.prefix + "byteorder"
        self.byteorder = "little"
        if order in self._infos:
            value = self._read_member(order, limit=16).decode("ascii", "replace").strip()
            if value not in ("little", "big"):
                raise FormatError(f"{self.where}: byteorder record is {value!r}")
            self.byteorder = value
        data = self._read_member(pkls[0])
        _prescan(data, self.where)
        try:
            self.obj = _RestrictedUnpickler(io.BytesIO(data), self.where,
                                            script=self.torchscript).load()
        except (FormatError, MemoryError):
            raise
        except Exception as exc:
            raise FormatError(f"{self.where}: cannot unpickle data.pkl ({type(exc).__name__}: "
                              f"{exc})") from exc
        if self.torchscript:
            self.obj = self._rebuild(self.obj, lambda v: v)

    def _rebuild(self, obj, leaf, path="", depth=0, memo=None):
        """obj with its dicts, lists and tuples rebuilt, every other value
        passed through ``leaf``, and each ScriptObject turned into a dict of
        its attributes, its dotted attribute path (the first one) recorded in
        ``script_paths``.  Shared containers stay shared; cycles are kept."""
        memo = {} if memo is None else memo
        if not isinstance(obj, (ScriptObject, dict, list, tuple)):
            return leaf(obj)
        if id(obj) in memo:
            return memo[id(obj)]
        if depth > 200:
            raise FormatError(f"{self.where}: objects nested too deeply")
        if isinstance(obj, ScriptObject):
            self.script_paths.setdefault(path, obj.qualname)
            items, new = (obj.attrs or {}).items(), {}
        elif isinstance(obj, dict):
            items, new = obj.items(), OrderedDict() if isinstance(obj, OrderedDict) else {}
        else:
            items, new = enumerate(obj), []

        def sub(k, v):
            return self._rebuild(v, leaf, f"{path}.{k}" if path else str(k), depth + 1, memo)

        if isinstance(obj, tuple):
            new = memo[id(obj)] = tuple(sub(k, v) for k, v in items)
            return new
        memo[id(obj)] = new
        for k, v in items:
            if isinstance(new, list):
                new.append(sub(k, v))
            else:
                new[k] = sub(k, v)
        return new

    def script_constants(self, path):
        """What a TorchScript archive's code says of the module at attribute
        path ``path`` ('' for the root; see ``script_paths``): a dict of its
        class's ``Final`` constants (a scripted module: ``batch_first``,
        ``hidden_size``, ...), or for a traced ``nn.LSTM`` the arguments of its
        one ``torch.lstm`` call (``bias``, ``num_layers``, ``bidirectional``,
        ``batch_first``); {} when neither is found.  Text matching only:
        nothing is executed or compiled."""
        qualname = self.script_paths.get(path)
        if qualname is None:
            return {}
        if qualname in self._constants:
            return self._constants[qualname]
        module, _, cls = qualname.rpartition(".")
        record = self.prefix + "code/" + module.replace(".", "/") + ".py"
        found = {}
        zi = self._infos.get(record)
        if zi is not None:
            # the text of a class is small; a bound keeps a deflate bomb out
            limit = min(16 << 20, 8 * self.size + (1 << 20))
            text = self._read_member(record, limit, deflated=True).decode("utf-8", "replace")
            block = []
            for line in text.splitlines():
                if block:
                    if line[:1] not in ("", " "):
                        break
                    block.append(line)
                elif line.startswith(f"class {cls}("):
                    block.append(line)
            for line in block:
                m = _FINAL_LINE.fullmatch(line)
                if m is None:
                    continue
                try:
                    value = ast.literal_eval(m.group(3))
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    continue
                want = _CONSTANT_TYPES[m.group(2)]
                if want is float and type(value) is int:
                    value = float(value)
                if type(value) is want:
                    found[m.group(1)] = value
            if not found:
                calls = _TRACED_LSTM.findall("\n".join(block))
                if len(calls) == 1:
                    bias, layers, _train, bidir, bf = calls[0]
                    found = {"bias": bias == "True", "num_layers": int(layers),
                             "bidirectional": bidir == "True", "batch_first": bf == "True"}
        self._constants[qualname] = found
        return found

    def _open_zip(self):
        """Open the zip directory: ``_zf``, ``_infos`` (name -> ZipInfo);
        returns the record names."""
        try:
            self._zf = zipfile.ZipFile(self._fp)
            infos = self._zf.infolist()
        except MemoryError:
            raise
        except Exception as exc:
            raise FormatError(f"{self.where}: corrupt zip archive ({type(exc).__name__}: "
                              f"{exc})") from exc
        self._infos = {zi.filename: zi for zi in infos}
        return list(self._infos)

    _KIND = "torch.save"  # in messages: whose archives store records uncompressed

    def _member(self, name, what=None, deflated=False):
        """The ZipInfo of record ``name``, checked: present, stored (or,
        with ``deflated``, deflate-compressed), not encrypted, and inside
        the archive.  ``what`` prefixes the messages, which name the record
        under the archive's root folder."""
        at = f"{self.where}: {what}: " if what else f"{self.where}: "
        zi = self._infos.get(name)
        root = getattr(self, "prefix", "")
        name = name[len(root):] if root and name.startswith(root) else name
        if zi is None:
            raise FormatError(f"{at}record {name!r} missing from the archive")
        packed = deflated and zi.compress_type == zipfile.ZIP_DEFLATED
        if zi.compress_type != zipfile.ZIP_STORED and not packed:
            raise FormatError(f"{at}record {name!r} is compressed; {self._KIND} archives store "
                              f"records uncompressed")
        if zi.flag_bits & 0x1:
            raise FormatError(f"{at}record {name!r} is encrypted")
        stored = zi.compress_size if packed else zi.file_size
        if (not packed and zi.file_size != zi.compress_size) or (
                zi.header_offset + stored > self.size):
            raise FormatError(f"{at}record {name!r} claims {stored} bytes, beyond the "
                              f"archive's {self.size}")
        return zi

    def _read_member(self, name, limit=None, deflated=False):
        """A record's bytes.  ``deflated``: a deflate-compressed record is
        accepted too (TorchScript's code text; ``limit`` then bounds what is
        decompressed)."""
        zi = self._member(name, deflated=deflated)
        if zi.compress_type != zipfile.ZIP_STORED and limit is None:
            raise ValueError("limit: required for a compressed record")
        if limit is not None and zi.file_size > limit:
            raise FormatError(f"{self.where}: record {name!r} too large ({zi.file_size} bytes)")
        try:
            with self._zf.open(zi) as f:
                data = f.read(zi.file_size + 1)
        except MemoryError:
            raise
        except Exception as exc:
            raise FormatError(f"{self.where}: cannot read record {name!r} ({type(exc).__name__}"
                              f": {exc})") from exc
        if len(data) != zi.file_size:
            raise FormatError(f"{self.where}: record {name!r} is truncated")
        return data

    def member_size(self, storage):
        zi = self._infos.get(f"{self.prefix}data/{storage.key}")
        return None if zi is None else zi.file_size

    def _storage_array(self, storage, dtype):
        """The storage as a 1-D array of `dtype` (cached per storage and dtype)."""
        cache_key = (storage.key, dtype)
        arr = self._arrays.get(cache_key)
        if arr is not None:
            return arr
        np_code, itemsize = _DTYPES[dtype]
        if np_code is None:
            raise FormatError(f"{self.where}: dtype {dtype} has no NumPy equivalent")
        st_itemsize = _DTYPES[storage.dtype][1]
        nbytes = storage.numel * st_itemsize
        name = f"{self.prefix}data/{storage.key}"
        zi = self._infos.get(name)
        if zi is None:
            raise FormatError(f"{self.where}: record {name!r} missing from the archive")
        if zi.file_size < nbytes:
            raise FormatError(f"{self.where}: storage {storage.key!r} holds {zi.file_size} "
                              f"bytes, its tensors need {nbytes}")
        raw = memoryview(self._read_member(name))[:nbytes]
        if self.byteorder == "big" and np_code[0] == "<":
            np_code = ">" + np_code[1:]
        count = nbytes // itemsize
        if dtype == "bool":
            arr = np.frombuffer(raw, np.uint8, count) != 0
        else:
            arr = np.frombuffer(raw, np.dtype(np_code), count)
            if dtype == "bfloat16":
                arr = bf16_to_f32(arr.astype(np.uint16))
            elif not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
        arr.flags.writeable = False
        self._arrays[cache_key] = arr
        return arr

    def array(self, ref):
        """A tensor's values as a read-only NumPy array (a view of its
        storage; bfloat16 is widened to float32)."""
        base = self._storage_array(ref.storage, ref.dtype)
        if ref.numel == 0:
            out = np.empty(ref.shape, base.dtype)
        else:
            out = np.lib.stride_tricks.as_strided(
                base[ref.offset:], shape=ref.shape,
                strides=tuple(s * base.itemsize for s in ref.stride), writeable=False)
        return out

    def materialize(self, obj=None):
        """``obj`` (default: the whole file) with every TensorRef replaced by
        its array; dicts, lists and tuples are rebuilt."""
        return self._rebuild(self.obj if obj is None else obj,
                             lambda v: self.array(v) if isinstance(v, TensorRef) else v)

    def close(self):
        if self._zf is not None:
            self._zf.close()
            self._zf = None
        if self._fp is not None:
            self._fp.close()
            self._fp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_torch(source):
    """Read a torch.save file without torch: the saved object with tensors as
    read-only NumPy arrays (bfloat16 widened to float32).  Only tensors,
    plain containers and scalars are accepted (see the module docstring)."""
    with TorchFile(source) as f:
        return f.materialize()

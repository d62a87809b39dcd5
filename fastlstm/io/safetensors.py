"""safetensors, read and written with NumPy alone.

Layout: ``[u64 little-endian N][N bytes of JSON header][data]``.  The header
maps each tensor name to ``{"dtype": "F32", "shape": [...], "data_offsets":
[begin, end]}`` (offsets relative to the data section) and may hold
``"__metadata__"``: a str -> str map.

Every number in a file is untrusted.  The reader checks, before it allocates
anything that depends on them: the header size (at most 100 MB and inside the
file), that the header is UTF-8 JSON without duplicate keys, each dtype and
shape (non-negative integer dimensions, at most 32 of them, product times
item size equal to the byte range), and that the byte ranges tile the data
section exactly (no gap, no overlap, ending at the end of the file).  Any
violation raises :class:`fastlstm.FormatError`.  Memory stays bounded by the
file size: the header is read once, tensors are read one at a time on demand.

API (mirrors the ``safetensors.numpy`` module):
  ``load_file(path) -> dict``, ``save_file(tensors, path, metadata=None)``,
  ``load(data: bytes) -> dict``, ``save(tensors, metadata=None) -> bytes``,
  ``read_metadata(path)``, and :class:`SafetensorsFile` for lazy access.

BF16 tensors are returned as float32 (exact widening); F8_* and other dtypes
without a NumPy equivalent are listed but refused when read.
"""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from ..errors import FormatError

__all__ = ["SafetensorsFile", "load_file", "save_file", "load", "save", "read_metadata",
           "MAX_HEADER_SIZE", "DTYPES"]

MAX_HEADER_SIZE = 100 * 1024 * 1024
_MAX_NDIM = 32

# safetensors dtype -> (little-endian numpy dtype or None if NumPy has none, item size).
DTYPES = {
    "BOOL": ("|b1", 1), "U8": ("|u1", 1), "I8": ("|i1", 1),
    "I16": ("<i2", 2), "U16": ("<u2", 2), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "I32": ("<i4", 4), "U32": ("<u4", 4), "F32": ("<f4", 4),
    "I64": ("<i8", 8), "U64": ("<u8", 8), "F64": ("<f8", 8), "C64": ("<c8", 8),
    "F8_E4M3": (None, 1), "F8_E5M2": (None, 1), "F8_E4M3FNUZ": (None, 1),
    "F8_E5M2FNUZ": (None, 1), "F8_E8M0": (None, 1),
}
# numpy dtype (native or any byte order) -> safetensors dtype, for writing.
_FROM_NUMPY = {"b1": "BOOL", "u1": "U8", "i1": "I8", "i2": "I16", "u2": "U16", "f2": "F16",
               "i4": "I32", "u4": "U32", "f4": "F32", "i8": "I64", "u8": "U64", "f8": "F64",
               "c8": "C64"}
# Name a reader reports for each dtype (what NumPy calls the returned array's dtype).
_LOGICAL = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
            "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
            "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
            "C64": "complex64"}


def bf16_to_f32(raw):
    """bfloat16 bit patterns (uint16 array) -> float32, exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class TensorInfo:
    """Header entry of one tensor: dtype (safetensors name), shape, byte range."""

    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name, dtype, shape, begin, end):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end

    @property
    def nbytes(self):
        return self.end - self.begin

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def itemsize(self):
        return DTYPES[self.dtype][1]

    @property
    def logical_dtype(self):
        """NumPy-style name of the stored type ('float32', 'bfloat16', ...)."""
        return _LOGICAL.get(self.dtype, self.dtype.lower())

    def __repr__(self):
        return f"TensorInfo({self.name!r}, {self.dtype}, {self.shape}, [{self.begin}, {self.end}])"


def _fail(where, msg):
    raise FormatError(f"{where}: not a valid safetensors file: {msg}")


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicate key {k!r} in the JSON header")
        out[k] = v
    return out


def _reject_constant(name):
    raise FormatError(f"non-finite number {name} in the JSON header")


def _is_int(v):
    return type(v) is int  # bool and float refused


def parse_header(raw, data_len, where="<bytes>"):
    """Validate a header (bytes) against the data section length.

    Returns ``(infos, metadata)``: a dict name -> TensorInfo in header order and
    the metadata dict (or None).
    """
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(where, f"the header is not UTF-8 ({exc})")
    if not text.startswith("{"):
        _fail(where, "the header does not start with '{'")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except FormatError as exc:
        _fail(where, str(exc))
    except (ValueError, RecursionError) as exc:
        _fail(where, f"the header is not valid JSON ({exc})")
    if not isinstance(obj, dict):
        _fail(where, "the header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            _fail(where, "__metadata__ must map strings to strings")
    infos = {}
    for name, entry in obj.items():
        if not isinstance(entry, dict):
            _fail(where, f"entry {name!r} is not an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                _fail(where, f"entry {name!r} has no {key!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            _fail(where, f"entry {name!r}: unknown dtype {dtype!r} (known: {sorted(DTYPES)})")
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(
                _is_int(d) and d >= 0 for d in shape):
            _fail(where, f"entry {name!r}: shape must be a list of at most {_MAX_NDIM} "
                         f"non-negative integers, got {_short(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(
                _is_int(o) for o in offsets)):
            _fail(where, f"entry {name!r}: data_offsets must be [begin, end] integers, "
                         f"got {_short(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            _fail(where, f"entry {name!r}: data_offsets [{begin}, {end}] outside the data "
                         f"section of {data_len} bytes")
        itemsize = DTYPES[dtype][1]
        numel = math.prod(shape)
        if numel * itemsize != end - begin:
            _fail(where, f"entry {name!r}: shape {shape} of {dtype} needs {numel * itemsize} "
                         f"bytes but data_offsets span {end - begin}")
        # Empty tensors may carry other large dimensions; NumPy must still
        # be able to describe them.
        if math.prod(max(d, 1) for d in shape) * itemsize >= 2 ** 48:
            _fail(where, f"entry {name!r}: dimensions {shape} too large")
        infos[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
    # The byte ranges must tile the data section: no gap, no overlap.
    pos = 0
    for info in sorted(infos.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != pos:
            what = "overlaps the previous tensor" if info.begin < pos else "leaves a gap"
            _fail(where, f"entry {info.name!r} at [{info.begin}, {info.end}] {what} "
                         f"(expected it to start at {pos})")
        pos = info.end
    if pos != data_len:
        _fail(where, f"tensors cover {pos} bytes of a {data_len}-byte data section "
                     f"(trailing bytes not described by the header)")
    return infos, metadata


def _short(value, limit=80):
    s = repr(value)
    return s if len(s) <= limit else s[:limit] + "..."


class SafetensorsFile:
    """A parsed safetensors header with lazy tensor reads.

    ``source`` is a path or a bytes-like object.  ``keys()``, ``info(name)``,
    ``metadata`` cost nothing; ``get(name)`` reads one tensor.  Use as a
    context manager (or call ``close()``) to release the file handle.
    """

    def __init__(self, source):
        self._file = None
        self._buf = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._buf = memoryview(source).cast("B")
            self.where = "<bytes>"
            self.size = len(self._buf)
            head = bytes(self._buf[:8])
        else:
            self.where = os.fspath(source)
            self._file = open(self.where, "rb")
            try:
                self._file.seek(0, os.SEEK_END)
                self.size = self._file.tell()
                self._file.seek(0)
                head = self._file.read(8)
            except BaseException:
                self._file.close()
                raise
        try:
            self._parse(head)
        except BaseException:
            self.close()
            raise

    def _parse(self, head):
        if len(head) < 8:
            _fail(self.where, f"file of {self.size} bytes is shorter than the 8-byte header size")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_SIZE:
            _fail(self.where, f"header size {n} exceeds the 100 MB limit")
        if 8 + n > self.size:
            _fail(self.where, f"header size {n} exceeds the file size {self.size}")
        if n < 2:
            _fail(self.where, f"header size {n} is too small for a JSON object")
        raw = self._read(8, n)
        self.header_size = n
        self.data_start = 8 + n
        self.infos, self.metadata = parse_header(raw, self.size - self.data_start, self.where)

    def _read(self, offset, n):
        if self._buf is not None:
            data = bytearray(self._buf[offset:offset + n])
        else:
            self._file.seek(offset)
            data = bytearray(n)
            got = self._file.readinto(data)
            if got != n:
                raise FormatError(f"{self.where}: file changed or truncated while reading "
                                  f"({got} of {n} bytes at offset {offset})")
        return data

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def keys(self):
        return list(self.infos)

    def __contains__(self, name):
        return name in self.infos

    def info(self, name):
        return self.infos[name]

    def get(self, name):
        """Read one tensor as a NumPy array (native byte order, writable).

        BF16 comes back as float32; BOOL as numpy bool (any non-zero byte is
        True).  F8_* and other types without a NumPy equivalent raise
        FormatError."""
        info = self.infos[name]
        np_dtype = DTYPES[info.dtype][0]
        if np_dtype is None:
            raise FormatError(f"{self.where}: tensor {name!r} has dtype {info.dtype}, which "
                              f"NumPy cannot represent")
        if self._buf is None and self._file is None:
            raise ValueError("I/O operation on a closed SafetensorsFile")
        raw = self._read(self.data_start + info.begin, info.nbytes)
        if info.dtype == "BOOL":
            arr = np.frombuffer(raw, np.uint8) != 0
        else:
            arr = np.frombuffer(raw, np.dtype(np_dtype))
            if info.dtype == "BF16":
                arr = bf16_to_f32(arr)
            elif not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
        return arr.reshape(info.shape)

    def tensors(self):
        """Every tensor, as a dict name -> array (header order)."""
        return {name: self.get(name) for name in self.infos}


def load_file(path):
    """Read every tensor of a safetensors file into a dict name -> ndarray."""
    with SafetensorsFile(path) as f:
        return f.tensors()


def load(data):
    """Read every tensor of safetensors bytes into a dict name -> ndarray."""
    return SafetensorsFile(data).tensors()


def read_metadata(path):
    """The ``__metadata__`` dict of a safetensors file (None if absent)."""
    with SafetensorsFile(path) as f:
        return None if f.metadata is None else dict(f.metadata)


def _prepare(tensors, metadata, dtypes=None):
    dtypes = dict(dtypes or {})
    for name, code in dtypes.items():
        if code != "BF16":
            raise ValueError(f"dtypes[{name!r}]: only 'BF16' (uint16 bit patterns) may be "
                             f"named explicitly, got {code!r}")
    if not hasattr(tensors, "items"):
        raise TypeError(f"tensors: expected a mapping name -> array, got {type(tensors).__name__}")
    entries = []
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: names must be str, got {name!r}")
        if name == "__metadata__":
            raise ValueError("tensors: the name '__metadata__' is reserved")
        arr = np.asarray(value)
        code = _FROM_NUMPY.get(f"{arr.dtype.kind}{arr.dtype.itemsize}")
        if code is None or arr.dtype.kind not in "biufc":
            raise TypeError(f"tensors[{name!r}]: dtype {arr.dtype} cannot be stored in "
                            f"safetensors")
        if arr.dtype.kind == "b":
            arr = arr.view(np.uint8)
        if dtypes.pop(name, None) == "BF16":
            if arr.dtype.kind not in "ui" or arr.dtype.itemsize != 2:
                raise TypeError(f"tensors[{name!r}]: BF16 needs 16-bit integer bit "
                                f"patterns, got dtype {arr.dtype}")
            code, arr = "BF16", arr.view(np.uint16)
        arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")
        entries.append((name, code, arr))
    if dtypes:
        raise ValueError(f"dtypes: names not among the tensors: {sorted(dtypes)[:6]}")
    if metadata is not None:
        if not hasattr(metadata, "items") or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata: expected a mapping str -> str")
    # Largest items first, then by name: every tensor stays aligned to its
    # item size once the header is padded to a multiple of 8.
    entries.sort(key=lambda e: (-e[2].dtype.itemsize, e[0]))
    header = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for name, code, arr in entries:
        header[name] = {"dtype": code, "shape": list(arr.shape),
                        "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    if len(raw) > MAX_HEADER_SIZE:
        raise ValueError(f"header of {len(raw)} bytes exceeds the 100 MB limit")
    return struct.pack("<Q", len(raw)) + raw, [e[2] for e in entries]


def save(tensors, metadata=None, *, dtypes=None):
    """Serialise a mapping name -> array to safetensors bytes (``dtypes``:
    see :func:`save_file`)."""
    head, arrays = _prepare(tensors, metadata, dtypes)
    return b"".join([head] + [a.tobytes() for a in arrays])


def save_file(tensors, path, metadata=None, *, dtypes=None):
    """Write a mapping name -> array (bool, int, float16/32/64, complex64)
    to a safetensors file.  ``metadata``: optional str -> str mapping.
    ``dtypes``: optional name -> "BF16" for uint16 arrays holding bfloat16
    bit patterns (NumPy has no bfloat16), stored as BF16 tensors.

    The file is written next to ``path`` and renamed into place, so a crash
    never leaves a half-written file under ``path``."""
    head, arrays = _prepare(tensors, metadata, dtypes)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for a in arrays:
                if a.size:
                    f.write(a.reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

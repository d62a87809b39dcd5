"""Load the LSTM nodes of an ONNX model into fastlstm models (NumPy only).

    from fastlstm.io.onnx import list_stacks, load_onnx, load_stack
    for info in list_stacks("model.onnx"):        # one dict per LSTM node
        print(info["name"], info["input_size"], info["hidden_size"], info["direction"])
    node = load_onnx("model.onnx", name=None)      # one node, ONNX semantics
    Y, Y_h, Y_c = node(X, initial_h=None, initial_c=None, sequence_lens=None)
    node.lstm                                      # the fastlstm.LSTM (torch semantics)
    m = load_stack("model.onnx")                   # a torch.onnx.export of nn.LSTM,
    out, (h_n, c_n) = m(x)                         # its LSTM nodes merged into one stack

The file is read with a small protobuf wire-format reader written here, so
loading needs NumPy only (the `onnx` package is a test dependency).  The file
is untrusted input: every length, dimension and offset is checked against
the bytes actually present before anything is allocated, nothing recurses
deeper than ModelProto -> GraphProto -> NodeProto -> AttributeProto ->
TensorProto (subgraphs are walked from a work list, at most 16 levels deep),
and anything malformed raises fastlstm.FormatError.

What is read (ONNX facts, from onnx.proto and the LSTM operator spec):
  ModelProto: ir_version (1), graph (7), opset_import (8).
  GraphProto: node (1), initializer (5), input (11), output (12), value_info
    (13), sparse_initializer (15, only to name it in an error).
  ValueInfoProto (graph inputs, outputs, value_info): name (1), and the dims
    of type (2) -> tensor_type (1) -> shape (2) -> dim (1): dim_value (1),
    dim_param (2); read only to prove a layer link (see below).
  NodeProto: input (1), output (2), name (3), op_type (4), attribute (5),
    domain (7).
  AttributeProto: name (1), f (2), i (3), s (4), t (5), g (6), floats (7),
    ints (8), strings (9), graphs (11), type (20).  Subgraphs (g, graphs: If
    branches, Loop and Scan bodies) are read as graphs: their LSTM nodes are
    listed as "<owner node>/<attribute>/<node>" (the owner's name, or its op
    type and index), and a name a subgraph does not define (an initializer,
    a Constant's output, a subgraph input) resolves in its enclosing graphs,
    as ONNX scopes names.  A stack never spans two graphs.  Subgraphs nested
    deeper than 16 levels, and ones that do not parse, are not searched (the
    other graphs' nodes load as usual).
  TensorProto: dims (1), data_type (2), float_data (4), int32_data (5),
    int64_data (7), name (8), raw_data (9), double_data (10), uint64_data
    (11), external_data (13), data_location (14); segment (3) is refused.
  Weights W, R, B, P come from initializers (also when the same name is a
  graph input: the initializer is its value), from Constant nodes (`value`,
  `value_float(s)`, `value_int(s)`), possibly through Identity nodes.
  External data is read only from files inside the model's directory, at
  the offset and length the tensor names, checked against the file's size.

ONNX LSTM -> fastlstm:
  W [D, 4H, In], R [D, 4H, H] rows i, o, f, c -> weight_ih / weight_hh rows
  i, f, g(=c), o; B [D, 8H] = [Wb | Rb] -> bias_ih, bias_hh; P [D, 3H]
  in order i, o, f -> peephole (3, H) in order i, f, o.  Attributes:
  direction, hidden_size (or inferred from R), activations /
  activation_alpha / activation_beta (consumed in order across the 3 * D
  activations; a missing alpha/beta takes onnxruntime's default: LeakyRelu
  0.01, HardSigmoid 0.2/0.5, Elu 1.0, and 0.0 for every other activation,
  which is what onnxruntime runs even where the ONNX text suggests 1.0),
  clip (gate pre-activations, onnxruntime's reading), input_forget, layout.

Directions:
  forward: one fastlstm.LSTM.
  bidirectional: one bidirectional fastlstm.LSTM when both directions use
    the same activations; if they differ (a fastlstm.LSTM has one set of
    cell options) the node runs as two single-direction models, exposed in
    `.parts`, and `.lstm` raises FastLSTMError explaining this.
  reverse: a single-direction fastlstm.LSTM run on the time-reversed input
    (with sequence_lens: only each sequence's valid prefix is reversed) and
    its output reversed back, so Y is in time order as in ONNX.  There is no
    torch.nn.LSTM equivalent, so `.lstm` raises as above; `.parts` has it.

fastlstm.load(path) / fastlstm.list_stacks(path): this module registers the
format "onnx" with fastlstm.io (recognised by content, see sniff).  There a
stack is a torch-export chain of LSTM nodes (or one node), listed as
(name of its first node, info) and loaded with load_stack; nodes with no
torch.nn.LSTM equivalent are listed but raise FormatError pointing here.
Every function here also takes the model as bytes instead of a path
(external data then cannot be found).

Chains: node k's Y [T, D, N, H] becomes node k+1's X [T, N, D*H] through
  * Squeeze(axes=[1]) (one direction; torch's TorchScript exporter), or
  * Transpose(perm=[0, 2, 1, 3]) then Reshape to a target proven to be
    [T, N, D*H] (both exporters, any D): a constant such as [0, 0, -1], or
    one computed from constants and Shape / Slice / Concat / Mul / Reshape
    of the layer's own tensors (the dynamo exporter with dynamic shapes),
    followed symbolically here, nothing executed.  A fixed size in the
    target (the dynamo exporter writes [T, N, D*H] as numbers) must equal
    the T or N the graph declares for the node's X, Y, Y_h or Y_c (or the
    tensor X is a Transpose of), all declarations agreeing; otherwise the
    nodes stay separate stacks, never merged on a guess.
  The nodes must share direction and cell options, and node k+1's
  input_size must be D*H.  LSTM nodes that feed each other in a cycle
  (a malformed graph) raise FormatError naming the cycle.
What a stack cannot carry: a fastlstm.LSTM takes the initial state (and
lengths) at each call, so load_stack / fastlstm.load refuse (FormatError,
pointing to load_onnx) a node whose initial_h / initial_c / sequence_lens
are constants in the file, unless ignoring them is exact: states all zero
(as the dynamo exporter writes torch's default state), lengths all equal
to the declared sequence length.  Run-time values (graph inputs) are the
caller's to pass.
A node whose attributes or inputs are not understood is listed with
loadable False and its problem, and raises FormatError when loaded; the
file's other nodes load as usual.

sequence_lens goes to the engine's `lengths=` argument (PackedSequence
semantics, the same as onnxruntime's: Y is zero past each length, Y_h/Y_c
are the state at each sequence's last valid step, and zero for a length of
0, as onnxruntime gives); where the installed fastlstm.LSTM lacks
`lengths=`, lengths that are not all T raise SequenceLensUnsupported.
"""
from __future__ import annotations

import array
import inspect
import math
import os
import stat
import struct

import numpy as np

from ..errors import DTypeError, FastLSTMError, FormatError, ShapeError

__all__ = [
    "list_stacks", "load_onnx", "load_stack", "OnnxLSTM", "SequenceLensUnsupported",
    "is_onnx", "sniff",
]


class SequenceLensUnsupported(FastLSTMError, NotImplementedError):
    """sequence_lens with lengths < T, and the engine has no `lengths=`."""


# --------------------------------------------------------------------------
# protobuf wire format
# --------------------------------------------------------------------------
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_DIMS = 32


def _varint(buf, pos, end):
    """Decode one varint at buf[pos:end]; return (value, new_pos)."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise FormatError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift >= 70:
            raise FormatError("varint longer than 10 bytes")
    if result >= 1 << 64:
        raise FormatError("varint out of 64-bit range")
    return result, pos


def _signed(v):
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf, start, end):
    """Yield (field_number, wire_type, value) for the message buf[start:end].

    value: an int for varints, (s, e) byte offsets for length-delimited
    fields, the raw bytes (4 or 8) for fixed32/fixed64.
    """
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if field == 0 or field >= 1 << 29:
            raise FormatError(f"invalid protobuf field number {field}")
        if wt == _VARINT:
            v, pos = _varint(buf, pos, end)
            yield field, wt, v
        elif wt == _LEN:
            n, pos = _varint(buf, pos, end)
            if n > end - pos:
                raise FormatError(
                    f"length-delimited field {field} of {n} bytes overruns its message "
                    f"({end - pos} bytes left)")
            yield field, wt, (pos, pos + n)
            pos += n
        elif wt == _I32:
            if pos + 4 > end:
                raise FormatError(f"truncated fixed32 field {field}")
            yield field, wt, bytes(buf[pos:pos + 4])
            pos += 4
        elif wt == _I64:
            if pos + 8 > end:
                raise FormatError(f"truncated fixed64 field {field}")
            yield field, wt, bytes(buf[pos:pos + 8])
            pos += 8
        else:
            raise FormatError(f"unsupported protobuf wire type {wt} (field {field})")


def _want(field, wt, expected, what):
    if wt != expected:
        raise FormatError(f"{what}: field {field} has wire type {wt}, expected {expected}")


def _str(buf, span, what):
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{what}: not valid UTF-8") from exc


_CHUNK = 1 << 18  # bytes of packed varints decoded at a time (bounds temporaries)


def _decode_varints(a):
    """Varints filling the uint8 array `a` exactly -> uint64 array."""
    ends = np.flatnonzero(a < 0x80)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    if int((ends - starts).max()) >= 10:
        raise FormatError("varint longer than 10 bytes in a packed field")
    pos = np.arange(a.size) - np.repeat(starts, ends - starts + 1)
    parts = (a & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64)
    return np.add.reduceat(parts, starts)


def _packed_spans(buf, s, e):
    """Split the packed varints in buf[s:e] into (uint8 array, count) chunks
    of at most ~_CHUNK bytes, each ending on a varint's last byte."""
    a = np.frombuffer(buf, np.uint8, e - s, s)
    if a.size and a[-1] >= 0x80:
        raise FormatError("truncated packed varint")
    p = 0
    while p < a.size:
        q = min(p + _CHUNK, a.size)
        if q < a.size:
            term = np.flatnonzero(a[q - 10:q] < 0x80)
            if term.size == 0:
                raise FormatError("varint longer than 10 bytes in a packed field")
            q = q - 10 + int(term[-1]) + 1
        yield a[p:q]
        p = q


class _Repeated:
    """One repeated scalar field, packed or not.  Unpacked elements are kept
    as compact arrays (8 bytes per varint, their raw bytes for fixed-size
    ones), never as Python objects, so memory stays within a small multiple
    of the file's size."""
    __slots__ = ("packed", "ints", "raw")

    def __init__(self):
        self.packed = []              # (s, e) spans
        self.ints = array.array("Q")  # unpacked varints
        self.raw = bytearray()        # unpacked fixed32/fixed64 bytes

    def add(self, wt, v, scalar_wt):
        if wt == _LEN:
            self.packed.append(v)
        elif wt == scalar_wt:
            if wt == _VARINT:
                self.ints.append(v)
            else:
                self.raw += v
        else:
            raise FormatError(f"repeated field has wire type {wt}, expected {scalar_wt} or 2")

    def __bool__(self):
        return bool(self.packed or self.ints or self.raw)

    def count_varints(self, buf):
        n = len(self.ints)
        for s, e in self.packed:
            n += int(np.count_nonzero(np.frombuffer(buf, np.uint8, e - s, s) < 0x80))
        return n

    def varints(self, buf, dtype=np.uint64, convert=None):
        """All values, converted chunk by chunk with `convert` (uint64 array
        -> array of `dtype`; default: astype)."""
        convert = convert or (lambda v: v.astype(dtype))
        out = np.empty(self.count_varints(buf), dtype)
        k = 0
        for s, e in self.packed:
            for a in _packed_spans(buf, s, e):
                v = _decode_varints(a)
                out[k:k + v.size] = convert(v)
                k += v.size
        if self.ints:
            out[k:] = convert(np.frombuffer(self.ints, np.uint64))
        return out

    def fixed(self, buf, dtype):
        dt = np.dtype(dtype)
        chunks = []
        for s, e in self.packed:
            if (e - s) % dt.itemsize:
                raise FormatError(
                    f"packed field of {e - s} bytes is not a multiple of {dt.itemsize}")
            chunks.append(np.frombuffer(buf, dt, (e - s) // dt.itemsize, s))
        if self.raw:
            chunks.append(np.frombuffer(bytes(self.raw), dt))
        return np.concatenate(chunks) if chunks else np.zeros(0, dt)


# --------------------------------------------------------------------------
# ONNX messages
# --------------------------------------------------------------------------
# data_type -> (numpy dtype of one stored element, typed field holding it)
_DTYPES = {
    1: ("<f4", 4), 2: ("u1", 5), 3: ("i1", 5), 4: ("<u2", 5), 5: ("<i2", 5), 6: ("<i4", 5),
    7: ("<i8", 7), 9: ("u1", 5), 10: ("<f2", 5), 11: ("<f8", 10), 12: ("<u4", 11),
    13: ("<u8", 11), 16: ("<u2", 5),
}
_DTYPE_NAMES = {0: "UNDEFINED", 8: "STRING", 14: "COMPLEX64", 15: "COMPLEX128", 17: "FLOAT8E4M3FN",
                18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ", 21: "UINT4",
                22: "INT4", 23: "FLOAT4E2M1"}


class _Tensor:
    """A TensorProto's header; its data is decoded only on demand."""

    def __init__(self, buf, s, e, what):
        self.buf = buf
        self.what = what
        self.name = ""
        dims = _Repeated()
        self.data_type = 0
        self.raw = None
        self.typed = {4: _Repeated(), 5: _Repeated(), 7: _Repeated(), 10: _Repeated(),
                      11: _Repeated()}
        self.external = {}
        self.location = 0
        for f, wt, v in _fields(buf, s, e):
            if f == 1:
                dims.add(wt, v, _VARINT)
            elif f == 2:
                _want(f, wt, _VARINT, what)
                self.data_type = _signed(v)
            elif f == 3:
                raise FormatError(f"{what}: segmented tensors are not supported")
            elif f in (4, 10):
                self.typed[f].add(wt, v, _I32 if f == 4 else _I64)
            elif f in (5, 7, 11):
                self.typed[f].add(wt, v, _VARINT)
            elif f == 8:
                _want(f, wt, _LEN, what)
                self.name = _str(buf, v, what + " name")
            elif f == 9:
                _want(f, wt, _LEN, what)
                self.raw = v
            elif f == 13:
                _want(f, wt, _LEN, what)
                key = value = None
                for f2, wt2, v2 in _fields(buf, *v):
                    if f2 in (1, 2):
                        _want(f2, wt2, _LEN, what + " external_data")
                        if f2 == 1:
                            key = bytes(buf[v2[0]:v2[1]])
                        else:
                            value = v2
                if key in (b"location", b"offset", b"length"):  # others: not used
                    self.external[key.decode()] = \
                        "" if value is None else _str(buf, value, what + " external_data")
            elif f == 14:
                _want(f, wt, _VARINT, what)
                self.location = _signed(v)
        if self.name:
            self.what = f"{what} {self.name!r}"
        if dims.count_varints(buf) > _MAX_DIMS:
            raise FormatError(f"{what}: more than {_MAX_DIMS} dimensions")
        dv = dims.varints(buf, np.int64)  # two's complement: negative stays negative
        if (dv < 0).any():
            raise FormatError(f"{self.what}: negative dimension in {dv.tolist()}")
        self.dims = tuple(int(d) for d in dv)
        self.size = math.prod(self.dims)
        if self.data_type not in _DTYPES:
            name = _DTYPE_NAMES.get(self.data_type, str(self.data_type))
            raise FormatError(f"{self.what}: unsupported data type {name}")
        # Empty tensors may carry other large dimensions; NumPy must still
        # be able to describe them (the other readers' bound).
        if math.prod(max(d, 1) for d in self.dims) * \
                np.dtype(_DTYPES[self.data_type][0]).itemsize >= 2 ** 48:
            raise FormatError(f"{self.what}: dimensions {list(self.dims)} too large")

    @property
    def dtype_name(self):
        return {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}.get(
            self.data_type, np.dtype(_DTYPES[self.data_type][0]).name)

    def array(self, base_dir):
        """The tensor's values as a NumPy array of shape dims (float16 and
        bfloat16 are widened to float32, bool to bool)."""
        store, field = _DTYPES[self.data_type]
        dt = np.dtype(store)
        n = self.size
        if self.location == 1:
            data = _read_external(self, base_dir, n * dt.itemsize)
            flat = np.frombuffer(data, dt, n)
        elif self.location != 0:
            raise FormatError(f"{self.what}: unknown data_location {self.location}")
        elif self.raw is not None:
            s, e = self.raw
            if e - s != n * dt.itemsize:
                raise FormatError(
                    f"{self.what}: raw_data holds {e - s} bytes, dims {list(self.dims)} of "
                    f"{dt.itemsize}-byte elements need {n * dt.itemsize}")
            flat = np.frombuffer(self.buf, dt, n, s)
        else:
            rep = self.typed[field]
            for f, other in self.typed.items():
                if f != field and other:
                    raise FormatError(f"{self.what}: data in field {f}, expected field {field} "
                                      f"for its data type")
            if field in (5, 7, 11) and rep.count_varints(self.buf) != n:
                raise FormatError(f"{self.what}: holds {rep.count_varints(self.buf)} values, "
                                  f"dims {list(self.dims)} need {n}")
            if field == 4:
                flat = rep.fixed(self.buf, "<f4")
            elif field == 10:
                flat = rep.fixed(self.buf, "<f8")
            elif field == 5:  # int32_data: two's complement, then narrow to the stored type
                narrow = np.uint16 if self.data_type in (10, 16) else dt
                flat = rep.varints(self.buf, dt, lambda v: v.astype(np.int64).astype(
                    np.int32).astype(narrow).view(dt))
            else:  # int64_data, uint64_data (two's complement wrap for int64)
                flat = rep.varints(self.buf, dt)
            if flat.size != n:
                raise FormatError(f"{self.what}: holds {flat.size} values, dims "
                                  f"{list(self.dims)} need {n}")
        if self.data_type == 10:
            flat = flat.astype(np.float32)
        elif self.data_type == 16:
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        elif self.data_type == 9:
            flat = flat.astype(bool)
        return flat.reshape(self.dims)


def _read_external(t, base_dir, nbytes):
    if base_dir is None:
        raise FormatError(f"{t.what}: stored as external data, which needs the model's file "
                          f"path (not bytes) to be found")
    loc = t.external.get("location", "")
    if not loc or "\x00" in loc or os.path.isabs(loc) or loc.startswith(("/", "\\")):
        raise FormatError(f"{t.what}: external data location {loc!r} is not a relative path")
    base = os.path.realpath(base_dir)
    full = os.path.realpath(os.path.join(base, loc))
    if os.path.commonpath([base, full]) != base:
        raise FormatError(f"{t.what}: external data location {loc!r} is outside the model's "
                          f"directory")

    def number(key, default):
        v = t.external.get(key)
        if v is None:
            return default
        if not (v.isascii() and v.isdigit()) or len(v) > 20:
            raise FormatError(f"{t.what}: external data {key} {v!r} is not a non-negative integer")
        return int(v)

    offset = number("offset", 0)
    length = number("length", None)
    if length is not None and length != nbytes:
        raise FormatError(f"{t.what}: external data length {length} but dims "
                          f"{list(t.dims)} need {nbytes} bytes")
    try:
        st = os.stat(full)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{t.what}: external data {loc!r} is not a regular file")
        if offset + nbytes > st.st_size:
            raise FormatError(f"{t.what}: external data [{offset}, {offset + nbytes}) is past "
                              f"the end of {loc!r} ({st.st_size} bytes)")
        with open(full, "rb") as fh:
            fh.seek(offset)
            data = fh.read(nbytes)
    except OSError as exc:
        raise FormatError(f"{t.what}: cannot read external data {loc!r}: {exc}") from exc
    if len(data) != nbytes:
        raise FormatError(f"{t.what}: external data {loc!r} is truncated")
    return data


# AttributeProto.type values
_A_FLOAT, _A_INT, _A_STRING, _A_TENSOR, _A_FLOATS, _A_INTS, _A_STRINGS = 1, 2, 3, 4, 6, 7, 8
_MAX_LIST = 4096  # longest list attribute turned into Python objects
_MAX_SUBGRAPH_DEPTH = 16  # If/Loop/Scan bodies nested deeper are not searched


class _Attr:
    __slots__ = ("name", "type", "f", "i", "s", "t", "floats", "ints", "strings", "other")

    def __init__(self, buf, s, e, what):
        self.name = ""
        self.type = 0
        self.f = self.i = self.s = self.t = None
        floats, ints, self.strings = _Repeated(), _Repeated(), array.array("q")
        self.other = False  # a graph, sparse tensor or type proto (not used here)
        for f, wt, v in _fields(buf, s, e):
            if f == 1:
                _want(f, wt, _LEN, what)
                self.name = _str(buf, v, what + " attribute name")
            elif f == 20:
                _want(f, wt, _VARINT, what)
                self.type = _signed(v)
            elif f == 2:
                _want(f, wt, _I32, what)
                self.f = struct.unpack("<f", v)[0]
            elif f == 3:
                _want(f, wt, _VARINT, what)
                self.i = _signed(v)
            elif f == 4:
                _want(f, wt, _LEN, what)
                self.s = v
            elif f == 5:
                _want(f, wt, _LEN, what)
                self.t = v
            elif f == 7:
                floats.add(wt, v, _I32)
            elif f == 8:
                ints.add(wt, v, _VARINT)
            elif f == 9:
                _want(f, wt, _LEN, what)
                self.strings.extend(v)
            elif f in (6, 10, 11, 14, 15, 22, 23):
                self.other = True
        self.floats = floats
        self.ints = ints

    def get(self, buf, kind, what):
        """The value as `kind` (one of the _A_* constants), checked."""
        if self.type not in (0, kind):
            raise FormatError(f"{what}: attribute {self.name!r} has type {self.type}, "
                              f"expected {kind}")
        if kind == _A_FLOAT:
            if self.f is None:
                raise FormatError(f"{what}: attribute {self.name!r} has no float value")
            return self.f
        if kind == _A_INT:
            if self.i is None:
                raise FormatError(f"{what}: attribute {self.name!r} has no int value")
            return self.i
        if kind == _A_STRING:
            if self.s is None:
                raise FormatError(f"{what}: attribute {self.name!r} has no string value")
            return _str(buf, self.s, f"{what} attribute {self.name!r}")
        if kind in (_A_FLOATS, _A_INTS, _A_STRINGS):
            arr = self.array(buf, kind, what)
            if len(arr) > _MAX_LIST:
                raise FormatError(f"{what}: attribute {self.name!r} has {len(arr)} values, "
                                  f"more than the {_MAX_LIST} this loader reads")
            if kind == _A_STRINGS:
                return [_str(buf, arr[k:k + 2], f"{what} attribute {self.name!r}")
                        for k in range(0, len(arr), 2)]
            return arr.tolist()
        if kind == _A_TENSOR:
            if self.t is None:
                raise FormatError(f"{what}: attribute {self.name!r} has no tensor value")
            return _Tensor(buf, *self.t, f"{what} attribute {self.name!r}")
        raise AssertionError(kind)

    def array(self, buf, kind, what):
        """A list attribute as a NumPy array (float32 / int64), or the flat
        (start, end) spans of its strings."""
        if self.type not in (0, kind):
            raise FormatError(f"{what}: attribute {self.name!r} has type {self.type}, "
                              f"expected {kind}")
        if kind == _A_FLOATS:
            return self.floats.fixed(buf, "<f4")
        if kind == _A_INTS:
            return self.ints.varints(buf, np.int64)
        if kind == _A_STRINGS:
            return self.strings
        raise AssertionError(kind)



class _Node:
    __slots__ = ("index", "name", "op_type", "domain", "inputs", "outputs", "attrs", "label",
                 "unknown_attr")

    def __init__(self, buf, s, e, index):
        self.index = index
        self.name = self.op_type = self.domain = ""
        self.inputs, self.outputs, attr_spans = [], [], []
        what = f"node #{index}"
        for f, wt, v in _fields(buf, s, e):
            if f in (1, 2, 3, 4, 5, 7):
                _want(f, wt, _LEN, what)
            if f == 1:
                self.inputs.append(_str(buf, v, what + " input"))
            elif f == 2:
                self.outputs.append(_str(buf, v, what + " output"))
            elif f == 3:
                self.name = _str(buf, v, what + " name")
            elif f == 4:
                self.op_type = _str(buf, v, what + " op_type")
            elif f == 5:
                attr_spans.append(v)
            elif f == 7:
                self.domain = _str(buf, v, what + " domain")
        self.label = f"{self.op_type or '?'} node " + (
            repr(self.name) if self.name else f"#{index}")
        self.attrs = {}
        self.unknown_attr = None
        # Attributes are parsed only for the ops this loader interprets, and
        # only those it reads (others are named, the first one kept).
        wanted = _INTERPRETED.get(self.op_type) if self.domain in ("", "ai.onnx") else None
        if wanted is None:
            return
        for sp in attr_spans:
            nsp = _name_field(buf, sp, 1, self.label + " attribute")
            key = bytes(buf[nsp[0]:nsp[1]]) if nsp else b""
            if key not in wanted:
                if self.unknown_attr is None:
                    self.unknown_attr = _str(buf, nsp or (0, 0), self.label + " attribute")
                continue
            a = _Attr(buf, *sp, self.label)
            if a.name in self.attrs:
                raise FormatError(f"{self.label}: attribute {a.name!r} given twice")
            self.attrs[a.name] = a


_LSTM_ATTRS = {"direction", "hidden_size", "activations", "activation_alpha", "activation_beta",
               "clip", "input_forget", "layout", "output_sequence"}
# op type -> the attributes read
_INTERPRETED = {
    "LSTM": {a.encode() for a in _LSTM_ATTRS},
    "Constant": {b"value", b"value_float", b"value_floats", b"value_int", b"value_ints",
                 b"value_string", b"value_strings", b"sparse_value"},
    "Identity": set(), "Squeeze": {b"axes"}, "Transpose": {b"perm"},
    "Reshape": {b"allowzero"}, "Shape": {b"start", b"end"}, "Slice": {b"starts", b"ends", b"axes"},
    "Concat": {b"axis"}, "Mul": set(),
}


class _Index:
    """name -> ints, kept as hashes in flat arrays (a few bytes per entry,
    no Python object per name); callers verify candidates, so a hash
    collision costs a re-check, never a wrong answer."""

    def __init__(self):
        self._rows = array.array("q")  # hash, a, b per entry
        self._keys = None

    def add(self, key, a, b=0):
        self._rows.extend((hash(key), a, b))

    def _ready(self):
        if self._keys is None:
            rows = np.frombuffer(self._rows, np.int64).reshape(-1, 3) if self._rows else \
                np.zeros((0, 3), np.int64)
            order = np.argsort(rows[:, 0], kind="stable")
            self._keys = rows[order, 0]
            self._vals = rows[order, 1:]
            self._rows = None

    def get(self, key):
        """Candidate (a, b) pairs for `key`, in insertion order."""
        self._ready()
        h = hash(key)
        lo = int(np.searchsorted(self._keys, h, "left"))
        hi = int(np.searchsorted(self._keys, h, "right"))
        return [tuple(int(x) for x in self._vals[k]) for k in range(lo, hi)]


def _name_field(buf, span, field, what):
    """(s, e) of the string field `field` of the message at span, or None."""
    found = None
    for f, wt, v in _fields(buf, *span):
        if f == field:
            _want(f, wt, _LEN, what)
            found = v
    return found


class _Graph:
    """A GraphProto, indexed without materialising its nodes: only the LSTM
    nodes and the nodes a lookup reaches become _Node objects."""

    def __init__(self, buf, s, e, parent=None, depth=0):
        self.buf = buf
        # A subgraph (an If/Loop/Scan body) sees the names of its enclosing
        # graphs (ONNX's lexical scoping): constant() looks there too.
        self.parent = parent
        self.depth = depth
        self.subgraphs = []  # (node index, attribute name, (s, e) of the GraphProto)
        self._node_spans = array.array("q")
        self._inits = _Index()     # name -> initializer span
        self._inputs = _Index()    # name -> (name span)
        self._sparse = _Index()
        self._vinfos = _Index()    # name -> ValueInfoProto span (inputs, outputs, value_info)
        self._producers = _Index()  # output name -> node index
        self._consumers = _Index()  # input name -> node index
        self._nodes = {}
        self._tensors = {}
        for f, wt, v in _fields(buf, s, e):
            if f in (1, 5, 11, 12, 13, 15):
                _want(f, wt, _LEN, "graph")
            if f == 1:
                self._node_spans.extend(v)
            elif f == 5:
                sp = _name_field(buf, v, 8, "initializer")
                self._inits.add(bytes(buf[sp[0]:sp[1]]) if sp else b"", *v)
            elif f == 11:
                sp = _name_field(buf, v, 1, "graph input")
                if sp:
                    self._inputs.add(bytes(buf[sp[0]:sp[1]]), *sp)
                    self._vinfos.add(bytes(buf[sp[0]:sp[1]]), *v)
            elif f in (12, 13):
                sp = _name_field(buf, v, 1, "graph value_info")
                if sp:
                    self._vinfos.add(bytes(buf[sp[0]:sp[1]]), *v)
            elif f == 15:
                for f2, wt2, v2 in _fields(buf, *v):
                    if f2 == 1 and wt2 == _LEN:
                        sp = _name_field(buf, v2, 8, "sparse initializer")
                        if sp:
                            self._sparse.add(bytes(buf[sp[0]:sp[1]]), *sp)
        self.lstm_indices = []
        for k in range(len(self._node_spans) // 2):
            op = dom = b""
            what = f"node #{k}"
            for f, wt, v in _fields(buf, self._node_spans[2 * k], self._node_spans[2 * k + 1]):
                if f in (1, 2, 3, 4, 5, 7):
                    _want(f, wt, _LEN, what)
                if f == 1 and v[1] > v[0]:
                    self._consumers.add(bytes(buf[v[0]:v[1]]), k)
                elif f == 2 and v[1] > v[0]:
                    self._producers.add(bytes(buf[v[0]:v[1]]), k)
                elif f == 4:
                    op = bytes(buf[v[0]:v[1]])
                elif f == 5:  # an attribute: a graph (6) or graphs (11) is a subgraph
                    self._scan_attribute(k, v)
                elif f == 7:
                    dom = bytes(buf[v[0]:v[1]])
            if op == b"LSTM" and dom in (b"", b"ai.onnx"):
                self.lstm_indices.append(k)

    def _scan_attribute(self, k, span):
        """Note the subgraphs of node k's attribute at `span`.  An attribute
        that does not parse is not searched (the node's op is not one this
        loader reads, or it fails when read)."""
        aname, graphs = b"", []
        try:
            for f, wt, v in _fields(self.buf, *span):
                if f == 1 and wt == _LEN:
                    aname = bytes(self.buf[v[0]:v[1]])
                elif f in (6, 11) and wt == _LEN:
                    graphs.append(v)
        except FormatError:
            return
        name = aname.decode("utf-8", "replace")
        self.subgraphs.extend((k, name, g) for g in graphs)

    def node(self, k):
        if k not in self._nodes:
            self._nodes[k] = _Node(self.buf, self._node_spans[2 * k],
                                   self._node_spans[2 * k + 1], k)
        return self._nodes[k]

    def producer(self, name):
        """The node whose output is `name` (the last one, if several), or None."""
        found = None
        for k, _ in self._producers.get(name.encode()):
            node = self.node(k)
            if name in node.outputs:
                found = node
        return found

    def consumers(self, name):
        nodes = []
        for k, _ in self._consumers.get(name.encode()):
            node = self.node(k)
            if name in node.inputs and node not in nodes:
                nodes.append(node)
        return nodes

    def initializer(self, name):
        """The _Tensor of initializer `name` (the last one, if several), or None."""
        if name not in self._tensors:
            t = None
            for a, b in self._inits.get(name.encode()):
                cand = _Tensor(self.buf, a, b, "initializer")
                if cand.name == name:
                    t = cand
            if t is None:
                return None
            self._tensors[name] = t
        return self._tensors[name]

    def _named(self, index, name):
        key = name.encode()
        return any(bytes(self.buf[a:b]) == key for a, b in index.get(key))

    def is_graph_input(self, name):
        return self._named(self._inputs, name)

    def declared_shape(self, name):
        """The shape the graph declares for tensor `name` (graph input,
        output or value_info: ValueInfoProto.type.tensor_type.shape) as a
        tuple with an int per fixed dimension and None per symbolic or
        unknown one; None if no declaration gives one, or declarations
        disagree.  Only read to prove a fact, so anything unexpected counts
        as undeclared."""
        found = set()
        key = name.encode()
        for a, b in self._vinfos.get(key):
            try:
                sp = _name_field(self.buf, (a, b), 1, "value_info")
                if sp is None or bytes(self.buf[sp[0]:sp[1]]) != key:
                    continue
                shape = self._vinfo_shape(a, b)
            except FormatError:
                return None
            if shape is not None:
                found.add(shape)
        return found.pop() if len(found) == 1 else None

    def _vinfo_shape(self, a, b):
        def sub(span, field):
            got = None
            for f, wt, v in _fields(self.buf, *span):
                if f == field and wt == _LEN:
                    got = v
            return got
        tp = sub((a, b), 2)                     # ValueInfoProto.type
        tt = tp and sub(tp, 1)                  # TypeProto.tensor_type
        shp = tt and sub(tt, 2)                 # TypeProto.Tensor.shape
        if not shp:
            return None
        dims = []
        for f, wt, v in _fields(self.buf, *shp):
            if f != 1:
                continue
            if wt != _LEN or len(dims) >= _MAX_DIMS:
                return None
            d = None
            for f2, wt2, v2 in _fields(self.buf, *v):
                if f2 == 1 and wt2 == _VARINT:  # dim_value
                    d = _signed(v2)
                elif f2 == 2:                   # dim_param: symbolic
                    d = None
            dims.append(d if d is not None and d >= 0 else None)
        return tuple(dims)

    def constant(self, name, what, base_dir=None, *, tensor=False):
        """The constant value named `name` (an initializer, a Constant node's
        output, through Identity nodes) as an array, or the _Tensor header
        with tensor=True.  FormatError naming it if it is a run-time value."""
        seen = set()
        cur, g = name, self
        while True:
            t = g.initializer(cur)
            if t is not None:
                return t if tensor else t.array(base_dir)
            node = g.producer(cur)
            if node is not None and node.domain in ("", "ai.onnx"):
                if node.op_type == "Identity" and node.inputs and (g.depth, node.index) not in seen:
                    seen.add((g.depth, node.index))
                    cur = node.inputs[0]
                    continue
                if node.op_type == "Constant":
                    return _constant_value(g.buf, node, base_dir, tensor)
            if (node is None and g.parent is not None and not g.is_graph_input(cur)
                    and not g._named(g._sparse, cur)):
                g = g.parent  # not defined in this subgraph: a name of an enclosing graph
                continue
            break
        if g._named(g._sparse, cur):
            raise FormatError(f"{what} {name!r} is a sparse initializer, which is not supported")
        if g.is_graph_input(cur):
            raise FormatError(f"{what} {name!r} is a graph input without an initializer (a "
                              f"run-time value); fastlstm needs it to be a constant")
        if node is not None:
            raise FormatError(f"{what} {name!r} is computed at run time by {node.label}; "
                              f"fastlstm needs it to be a constant")
        raise FormatError(f"{what} {name!r} is not defined in the graph")

    def is_constant(self, name):
        try:
            self.constant(name, "", tensor=True)
            return True
        except FormatError:
            return False


class _ScalarTensor:
    """Stand-in for a _Tensor built from value_float(s) / value_int(s)."""

    def __init__(self, arr):
        self.arr = arr
        self.dims = arr.shape
        self.size = arr.size
        self.dtype_name = arr.dtype.name

    def array(self, base_dir):
        return self.arr


def _constant_value(buf, node, base_dir, tensor):
    a = node.attrs
    if len(a) != 1:
        raise FormatError(f"{node.label}: expected exactly one value attribute, got {sorted(a)}")
    (key, attr), = a.items()
    if key == "value":
        t = attr.get(buf, _A_TENSOR, node.label)
    elif key == "value_float":
        t = _ScalarTensor(np.array(attr.get(buf, _A_FLOAT, node.label), np.float32))
    elif key == "value_floats":
        t = _ScalarTensor(attr.array(buf, _A_FLOATS, node.label).astype(np.float32))
    elif key == "value_int":
        t = _ScalarTensor(np.array(attr.get(buf, _A_INT, node.label), np.int64))
    elif key == "value_ints":
        t = _ScalarTensor(attr.array(buf, _A_INTS, node.label))
    else:
        raise FormatError(f"{node.label}: Constant attribute {key!r} is not supported")
    return t if tensor else t.array(base_dir)


def _parse_model(buf):
    """(ir_version, default-domain opset version, _Graph) of a ModelProto."""
    ir_version = opset = None
    graph_span = None
    for f, wt, v in _fields(buf, 0, len(buf)):
        if f == 1:
            _want(f, wt, _VARINT, "model")
            ir_version = _signed(v)
        elif f == 7:
            _want(f, wt, _LEN, "model")
            if graph_span is not None:
                raise FormatError("model: more than one graph field")
            graph_span = v
        elif f == 8:
            _want(f, wt, _LEN, "model")
            domain, version = b"", 0
            for f2, wt2, v2 in _fields(buf, *v):
                if f2 == 1:
                    _want(f2, wt2, _LEN, "opset_import")
                    domain = bytes(buf[v2[0]:v2[1]])
                elif f2 == 2:
                    _want(f2, wt2, _VARINT, "opset_import")
                    version = _signed(v2)
            if domain in (b"", b"ai.onnx"):
                opset = version
        elif f in _MODEL_FIELDS:
            _want(f, wt, _MODEL_FIELDS[f], "model")
        # other fields: skipped, as protobuf readers do (their framing was checked)
    if graph_span is None:
        raise FormatError("model: no graph (is this an ONNX ModelProto?)")
    return ir_version, opset, _Graph(buf, *graph_span)


# ModelProto fields and their wire types (besides 1, 7, 8 read above).
_MODEL_FIELDS = {2: _LEN, 3: _LEN, 4: _LEN, 5: _VARINT, 6: _LEN, 14: _LEN, 20: _LEN, 25: _LEN}
_MODEL_TAGS = {(f << 3) | wt for f, wt in
               {**_MODEL_FIELDS, 1: _VARINT, 7: _LEN, 8: _LEN}.items()}


def sniff(head):
    """True if `head` (the first bytes of a file) looks like an ONNX
    ModelProto: field 1 (ir_version, a varint) first, as every protobuf
    writer puts it, then only ModelProto fields with their wire types as far
    as the bytes go."""
    head = bytes(head[:4096])
    if len(head) < 3 or head[0] != 0x08:
        return False
    pos, n = 0, 0
    try:
        while pos < len(head):
            key, pos = _varint(head, pos, len(head))
            if key not in _MODEL_TAGS:
                return False
            if key & 7 == _VARINT:
                _, pos = _varint(head, pos, len(head))
            else:
                length, pos = _varint(head, pos, len(head))
                pos += length
            n += 1
    except FormatError:  # the head ends inside a field
        pass
    return n >= 2 or pos == len(head)


def is_onnx(path):
    """True if the file at `path` starts like an ONNX model (see sniff)."""
    try:
        with open(path, "rb") as fh:
            return sniff(fh.read(16))
    except OSError:
        return False


# --------------------------------------------------------------------------
# LSTM nodes
# --------------------------------------------------------------------------
# onnxruntime's table (rnn_helpers.cc): which activations read alpha / beta,
# and the defaults when the attribute lists run out (others: 0.0).
_ACT_USES = {"affine": (1, 1), "relu": (0, 0), "leakyrelu": (1, 0), "thresholdedrelu": (1, 0),
             "tanh": (0, 0), "scaledtanh": (1, 1), "sigmoid": (0, 0), "hardsigmoid": (1, 1),
             "elu": (1, 0), "softsign": (0, 0), "softplus": (0, 0)}
_ACT_DEFAULTS = {"leakyrelu": (0.01, 0.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, 0.0)}
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}
_INPUT_ROLES = ("X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P")


def _f32(x):
    return float(np.float32(x))


def _cells(names, alphas, betas, D, what):
    """Per direction: (activations, alpha, beta) as fastlstm options."""
    if not names:
        names = ["Sigmoid", "Tanh", "Tanh"] * D
    if len(names) != 3 * D:
        raise FormatError(f"{what}: 'activations' has {len(names)} names, expected {3 * D} "
                          f"(f, g, h per direction)")
    ai = bi = 0
    acts, al, be = [], [], []
    for nm in names:
        key = nm.lower()
        if key not in _ACT_USES:
            raise FormatError(f"{what}: unknown activation {nm!r} (known: Sigmoid, Tanh, Relu, "
                              f"Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, Elu, "
                              f"Softsign, Softplus)")
        use_a, use_b = _ACT_USES[key]
        da, db = _ACT_DEFAULTS.get(key, (0.0, 0.0))
        a = b = 0.0
        if use_a:
            a = alphas[ai] if ai < len(alphas) else da
            ai += ai < len(alphas)
        if use_b:
            b = betas[bi] if bi < len(betas) else db
            bi += bi < len(betas)
        if not (math.isfinite(a) and math.isfinite(b)):
            raise FormatError(f"{what}: activation {nm!r} has a non-finite alpha/beta")
        acts.append(key)
        al.append(_f32(a))
        be.append(_f32(b))
    return [(tuple(acts[3 * d:3 * d + 3]), tuple(al[3 * d:3 * d + 3]), tuple(be[3 * d:3 * d + 3]))
            for d in range(D)]


class _Spec:
    """An LSTM node's attributes and input names, checked; no weight data."""

    broken = False

    def __init__(self, graph, node, name):
        buf = graph.buf
        self.graph = graph  # the graph holding the node (a subgraph's names resolve upwards)
        self.node = node
        self.name = name
        what = f"LSTM node {name!r}"
        self.what = what
        a = node.attrs
        if node.unknown_attr is not None:
            raise FormatError(f"{what}: unknown attribute {node.unknown_attr!r}")
        self.direction = a["direction"].get(buf, _A_STRING, what) if "direction" in a else "forward"
        if self.direction not in _DIRECTIONS:
            raise FormatError(f"{what}: direction {self.direction!r} is not forward, reverse or "
                              f"bidirectional")
        D = self.num_directions = _DIRECTIONS[self.direction]
        self.hidden_attr = a["hidden_size"].get(buf, _A_INT, what) if "hidden_size" in a else None
        if self.hidden_attr is not None and self.hidden_attr <= 0:
            raise FormatError(f"{what}: hidden_size {self.hidden_attr} is not positive")
        self.layout = a["layout"].get(buf, _A_INT, what) if "layout" in a else 0
        if self.layout not in (0, 1):
            raise FormatError(f"{what}: layout {self.layout} is not 0 or 1")
        clip = a["clip"].get(buf, _A_FLOAT, what) if "clip" in a else None
        if clip is not None:
            if math.isnan(clip) or clip <= 0:
                raise FormatError(f"{what}: clip {clip} is not positive")
            if math.isinf(clip) or clip >= np.finfo(np.float32).max:
                clip = None  # onnxruntime's "no clip"
        self.clip = clip
        self.input_forget = bool(a["input_forget"].get(buf, _A_INT, what)) \
            if "input_forget" in a else False
        names = a["activations"].get(buf, _A_STRINGS, what) if "activations" in a else []
        alphas = a["activation_alpha"].get(buf, _A_FLOATS, what) if "activation_alpha" in a else []
        betas = a["activation_beta"].get(buf, _A_FLOATS, what) if "activation_beta" in a else []
        self.cells = _cells(names, alphas, betas, D, what)
        ins = list(node.inputs) + [""] * (len(_INPUT_ROLES) - len(node.inputs))
        if len(ins) > len(_INPUT_ROLES):
            raise FormatError(f"{what}: {len(node.inputs)} inputs, at most 8")
        self.inputs = dict(zip(_INPUT_ROLES, ins))
        for role in ("X", "W", "R"):
            if not self.inputs[role]:
                raise FormatError(f"{what}: required input {role} is missing")
        self.outputs = list(node.outputs) + [""] * (3 - len(node.outputs))
        # Shapes from the tensors' headers (no data decoded).
        self.problem = None
        self.input_size = None
        self.hidden_size = self.hidden_attr
        self.dtype = None
        try:
            W = graph.constant(self.inputs["W"], f"{what}: weight W", tensor=True)
            R = graph.constant(self.inputs["R"], f"{what}: weight R", tensor=True)
            for role in ("B", "P"):
                if self.inputs[role]:
                    graph.constant(self.inputs[role], f"{what}: weight {role}", tensor=True)
            if len(R.dims) == 3:
                self.hidden_size = self.hidden_attr or R.dims[2]
            if len(W.dims) == 3:
                self.input_size = W.dims[2]
            self.dtype = W.dtype_name
        except FormatError as exc:
            self.problem = str(exc)

    @property
    def same_cells(self):
        return all(c == self.cells[0] for c in self.cells)

    def info(self):
        c0 = self.cells[0]
        return {
            "name": self.name, "format": "onnx", "op_type": "LSTM", "node_index": self.node.index,
            "input_size": self.input_size, "hidden_size": self.hidden_size, "num_layers": 1,
            "direction": self.direction, "bidirectional": self.num_directions == 2,
            "num_directions": self.num_directions, "layout": self.layout,
            "batch_first": self.layout == 1, "dtype": self.dtype,
            "peepholes": bool(self.inputs["P"]), "bias": bool(self.inputs["B"]),
            "activations": [c[0] for c in self.cells],
            "activation_alpha": [c[1] for c in self.cells],
            "activation_beta": [c[2] for c in self.cells],
            "clip": self.clip, "input_forget": self.input_forget,
            "default_cell": (self.same_cells and c0[0] == ("sigmoid", "tanh", "tanh")
                             and not self.inputs["P"] and self.clip is None
                             and not self.input_forget),
            "inputs": {k: v for k, v in self.inputs.items() if v},
            "outputs": dict(zip(("Y", "Y_h", "Y_c"), self.outputs)),
            "loadable": self.problem is None, "problem": self.problem,
        }


class _BadSpec:
    """An LSTM node whose attributes or inputs are not understood: listed
    (loadable False, problem the reason), never linked into a chain, and
    loading it raises FormatError with that reason.  Other nodes of the
    file stay loadable."""

    broken = True
    direction = layout = num_directions = hidden_size = input_size = dtype = None

    def __init__(self, graph, node, name, exc):
        self.graph = graph
        self.node = node
        self.name = name
        self.what = f"LSTM node {name!r}"
        self.problem = str(exc)
        self.inputs = {r: v for r, v in zip(_INPUT_ROLES, node.inputs) if v}
        self.outputs = list(node.outputs)

    def fail(self):
        raise FormatError(self.problem)

    def info(self):
        keys = ("input_size", "hidden_size", "direction", "bidirectional", "num_directions",
                "layout", "batch_first", "dtype", "peepholes", "bias", "activations",
                "activation_alpha", "activation_beta", "clip", "input_forget")
        return {"name": self.name, "format": "onnx", "op_type": "LSTM",
                "node_index": self.node.index, "num_layers": 1, **dict.fromkeys(keys),
                "default_cell": False, "inputs": dict(self.inputs),
                "outputs": dict(zip(("Y", "Y_h", "Y_c"), self.outputs)),
                "loadable": False, "problem": self.problem}


def _read(source):
    """(buffer, base_dir) of a path or bytes-like."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None
    try:
        path = os.fspath(source)
    except TypeError:
        raise TypeError(f"path: expected a file path or bytes, got {type(source).__name__}") \
            from None
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc}") from exc
    return data, os.path.dirname(os.path.abspath(path))


class _Model:
    """A parsed file: its graph and the LSTM nodes' specs."""

    def __init__(self, source):
        self.buf, self.base_dir = _read(source)
        try:
            self.ir_version, self.opset, self.graph = _parse_model(self.buf)
        except RecursionError as exc:  # not expected (no recursion), belt and braces
            raise FormatError("model nesting too deep") from exc
        # The main graph, then its subgraphs (If/Loop/Scan bodies) breadth
        # first, each with the prefix its LSTM nodes are named under; a
        # work list, not recursion, and nesting bounded.
        graphs, qi = [(self.graph, "")], 0
        while qi < len(graphs):
            g, prefix = graphs[qi]
            qi += 1
            if g.depth >= _MAX_SUBGRAPH_DEPTH:
                continue  # deeper subgraphs are not searched (documented)
            for k, aname, span in g.subgraphs:
                try:
                    owner = g.node(k)
                    child = _Graph(self.buf, *span, parent=g, depth=g.depth + 1)
                except FormatError:
                    continue  # a subgraph that does not parse is not searched
                label = owner.name or f"{owner.op_type or 'node'}_{k}"
                graphs.append((child, f"{prefix}{label}/{aname}/"))
        self.specs = []
        self.chains = []
        used = set()
        for g, prefix in graphs:
            specs = []
            lstm_nodes = [g.node(k) for k in g.lstm_indices]
            for k, node in enumerate(lstm_nodes):
                name = prefix + (node.name or f"LSTM_{k}")
                while name in used:
                    name += "_"
                used.add(name)
                try:
                    spec = _Spec(g, node, name)
                except FormatError as exc:  # this node only: the others stay loadable
                    spec = _BadSpec(g, node, name, exc)
                specs.append(spec)
            self.specs.extend(specs)
            self.chains.extend(_find_chains(g, specs))  # stacks never cross graphs

    def spec(self, name):
        if not self.specs:
            raise FormatError("the model has no LSTM node")
        if name is None:
            if len(self.specs) > 1:
                raise FormatError(f"the model has {len(self.specs)} LSTM nodes; pass name= one "
                                  f"of {[s.name for s in self.specs]}")
            return self.specs[0]
        for s in self.specs:
            if s.name == name:
                return s
        raise FormatError(f"no LSTM node named {name!r}; nodes: {[s.name for s in self.specs]}")


# --------------------------------------------------------------------------
# building fastlstm models
# --------------------------------------------------------------------------
_ONNX_TO_OURS = (0, 2, 3, 1)  # our gate k (i, f, g, o) is ONNX block _ONNX_TO_OURS[k] (i, o, f, c)


def _gates(a, H):
    """Reorder the leading 4H axis from ONNX's i, o, f, c to ours i, f, g, o."""
    return np.concatenate([a[b * H:(b + 1) * H] for b in _ONNX_TO_OURS], axis=0)


def _node_weights(model, spec):
    """{'W','R','B','P'}: arrays checked against the node's sizes."""
    g, what = spec.graph, spec.what
    D = spec.num_directions
    get = lambda role: g.constant(spec.inputs[role], f"{what}: weight {role}",  # noqa: E731
                                  model.base_dir) if spec.inputs[role] else None
    W, R, B, P = get("W"), get("R"), get("B"), get("P")
    for role, arr in (("W", W), ("R", R), ("B", B), ("P", P)):
        if arr is not None and arr.dtype.kind not in "fiub":
            raise FormatError(f"{what}: weight {role} has unsupported dtype {arr.dtype}")
    if W.ndim != 3 or R.ndim != 3:
        raise FormatError(f"{what}: W {W.shape} and R {R.shape} must be 3-D")
    H = spec.hidden_attr if spec.hidden_attr is not None else R.shape[2]
    In = W.shape[2]
    if H <= 0 or W.shape[:2] != (D, 4 * H):
        raise FormatError(f"{what}: W has shape {W.shape}, expected ({D}, {4 * H}, input_size)")
    if R.shape != (D, 4 * H, H):
        raise FormatError(f"{what}: R has shape {R.shape}, expected ({D}, {4 * H}, {H})")
    if B is not None and B.shape != (D, 8 * H):
        raise FormatError(f"{what}: B has shape {B.shape}, expected ({D}, {8 * H})")
    if P is not None and P.shape != (D, 3 * H):
        raise FormatError(f"{what}: P has shape {P.shape}, expected ({D}, {3 * H})")
    dtype = np.float64 if W.dtype == np.float64 else np.float32
    return W, R, B, P, H, In, dtype


def _direction_sd(W, R, B, P, d, H, suffix):
    sd = {"weight_ih_l" + suffix: _gates(W[d], H), "weight_hh_l" + suffix: _gates(R[d], H)}
    if B is not None:
        sd["bias_ih_l" + suffix] = _gates(B[d, :4 * H], H)
        sd["bias_hh_l" + suffix] = _gates(B[d, 4 * H:], H)
    if P is not None:
        # ONNX P rows i, o, f -> ours i, f, o
        sd["peephole_l" + suffix] = np.stack([P[d, :H], P[d, 2 * H:], P[d, H:2 * H]])
    return sd


def _new_lstm(what, In, H, *, num_layers=1, bias, batch_first, bidirectional, dtype, peepholes,
              cell, clip, input_forget, state_dict, num_threads=None):
    from ..model import LSTM
    acts, alpha, beta = cell
    try:
        m = LSTM(In, H, num_layers=num_layers, bias=bias, batch_first=batch_first,
                 bidirectional=bidirectional, dtype=dtype, peepholes=peepholes, activations=acts,
                 activation_alpha=alpha, activation_beta=beta, clip=clip,
                 input_forget=input_forget, num_threads=num_threads)
        m.load_state_dict(state_dict, strict=True)
    except FormatError:
        raise
    except (ValueError, TypeError, FastLSTMError, MemoryError) as exc:
        raise FormatError(f"{what}: cannot build the model: {exc}") from exc
    return m


def _supports_lengths():
    from ..model import LSTM
    try:
        return "lengths" in inspect.signature(LSTM.__call__).parameters
    except (TypeError, ValueError):
        return False


def _real(value, name, dtype):
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        raise DTypeError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def _reverse_time(a, lengths):
    """Time-major (T, N, ...) -> each sequence's valid prefix reversed; rows
    past a sequence's length stay where they are.  Its own inverse."""
    if lengths is None:
        return a[::-1]
    T, N = a.shape[0], a.shape[1]
    t = np.arange(T)[:, None]
    L = lengths[None, :]
    idx = np.where(t < L, L - 1 - t, t)
    return a[idx, np.arange(N)[None, :]]


class OnnxLSTM:
    """One ONNX LSTM node, callable with ONNX's inputs and outputs.

    ``Y, Y_h, Y_c = node(X, initial_h=None, initial_c=None, sequence_lens=None)``
    with layout 0: X [T, N, In], Y [T, D, N, H], states [D, N, H];
    layout 1: X [N, T, In], Y [N, T, D, H], states [N, D, H].
    Arrays are NumPy of the model's dtype (float32, or float64 when the
    node's weights are double).  If the graph feeds the node a constant
    initial_h / initial_c / sequence_lens, that constant is the default.

    Attributes: ``name``, ``direction`` ('forward', 'reverse',
    'bidirectional'), ``layout``, ``input_size``, ``hidden_size``,
    ``num_directions``, ``dtype``, ``info`` (the list_stacks entry),
    ``parts`` (tuple of (fastlstm.LSTM, reversed_in_time) covering the
    directions in order) and ``lstm``: the equivalent fastlstm.LSTM with
    torch.nn.LSTM semantics (batch_first = layout 1), for forward nodes and
    bidirectional nodes whose two directions share their activations.
    """

    def __init__(self, model, spec):
        if spec.broken:
            spec.fail()
        W, R, B, P, H, In, dtype = _node_weights(model, spec)
        self._spec = spec
        self.name = spec.name
        self.direction = spec.direction
        self.layout = spec.layout
        self.input_size, self.hidden_size = In, H
        self.num_directions = D = spec.num_directions
        self.dtype = np.dtype(dtype)
        self.info = spec.info()
        self.info.update(input_size=In, hidden_size=H)
        common = dict(bias=B is not None, batch_first=spec.layout == 1, dtype=dtype,
                      peepholes=P is not None, clip=spec.clip, input_forget=spec.input_forget)
        if D == 2 and spec.same_cells:
            sd = {**_direction_sd(W, R, B, P, 0, H, "0"),
                  **_direction_sd(W, R, B, P, 1, H, "0_reverse")}
            m = _new_lstm(spec.what, In, H, bidirectional=True, cell=spec.cells[0],
                          state_dict=sd, **common)
            self.parts = ((m, False),)
        else:
            parts = []
            for d in range(D):
                rev = spec.direction == "reverse" or d == 1
                m = _new_lstm(spec.what, In, H, bidirectional=False, cell=spec.cells[d],
                              state_dict=_direction_sd(W, R, B, P, d, H, "0"), **common)
                parts.append((m, rev))
            self.parts = tuple(parts)
        self.defaults = {}
        g = spec.graph
        for role in ("initial_h", "initial_c", "sequence_lens"):
            nm = spec.inputs[role]
            if nm and g.is_constant(nm):
                self.defaults[role] = g.constant(nm, f"{spec.what}: {role}", model.base_dir)

    @property
    def lstm(self):
        if len(self.parts) == 1 and not self.parts[0][1]:
            return self.parts[0][0]
        raise FastLSTMError(_no_torch_equivalent(self._spec))

    def __repr__(self):
        return (f"OnnxLSTM(name={self.name!r}, input_size={self.input_size}, "
                f"hidden_size={self.hidden_size}, direction={self.direction!r}, "
                f"layout={self.layout}, dtype={self.dtype.name})")

    def __call__(self, X, initial_h=None, initial_c=None, sequence_lens=None, *,
                 num_threads=None):
        dt, D, H = self.dtype, self.num_directions, self.hidden_size
        initial_h = self.defaults.get("initial_h") if initial_h is None else initial_h
        initial_c = self.defaults.get("initial_c") if initial_c is None else initial_c
        sequence_lens = self.defaults.get("sequence_lens") if sequence_lens is None \
            else sequence_lens
        X = _real(X, "X", dt)
        if X.ndim != 3 or X.shape[2] != self.input_size:
            want = "[seq, batch, input]" if self.layout == 0 else "[batch, seq, input]"
            raise ShapeError(f"X: expected {want} with input {self.input_size}, got {X.shape}")
        xt = X if self.layout == 0 else X.transpose(1, 0, 2)   # time-major view
        T, N = xt.shape[0], xt.shape[1]
        sshape = (D, N, H) if self.layout == 0 else (N, D, H)

        def state(v, name):
            if v is None:
                return None
            v = _real(v, name, dt)
            if v.shape != sshape:
                raise ShapeError(f"{name}: expected shape {sshape}, got {v.shape}")
            return v if self.layout == 0 else v.transpose(1, 0, 2)
        h0, c0 = state(initial_h, "initial_h"), state(initial_c, "initial_c")
        if (h0 is None) != (c0 is None):
            h0 = np.zeros((D, N, H), dt) if h0 is None else h0
            c0 = np.zeros((D, N, H), dt) if c0 is None else c0
        lengths = None
        if sequence_lens is not None:
            sl = np.asarray(sequence_lens)
            if sl.dtype.kind not in "iu" or sl.shape != (N,):
                raise ShapeError(f"sequence_lens: expected an integer array of shape ({N},), "
                                 f"got {sl.dtype} {sl.shape}")
            if N and (sl.min() < 0 or sl.max() > T):
                raise ShapeError(f"sequence_lens: values must be in [0, {T}], got {sl.tolist()}")
            if not (sl == T).all():
                if not _supports_lengths():
                    raise SequenceLensUnsupported(
                        "sequence_lens with lengths shorter than the sequence needs "
                        "fastlstm.LSTM(...)(x, hx, lengths=...), which this build lacks")
                lengths = sl.astype(np.int64)
        kw = {} if num_threads is None else {"num_threads": num_threads}
        if lengths is not None:
            kw["lengths"] = lengths
        ys, hs, cs = [], [], []
        d0 = 0
        for m, rev in self.parts:
            nd = m.num_directions
            x_in = _reverse_time(xt, lengths) if rev else xt
            hx = None if h0 is None else (h0[d0:d0 + nd], c0[d0:d0 + nd])
            out, (hn, cn) = m(x_in.transpose(1, 0, 2) if m.batch_first else x_in, hx, **kw)
            if m.batch_first:
                y = out.reshape(N, T, nd, H).transpose(1, 0, 2, 3)
            else:
                y = out.reshape(T, N, nd, H)
            if rev:
                y = _reverse_time(y, lengths)
            ys.append(y)
            hs.append(hn)
            cs.append(cn)
            d0 += nd
        y = ys[0] if len(ys) == 1 else np.concatenate(ys, axis=2)   # (T, N, D, H)
        hn = hs[0] if len(hs) == 1 else np.concatenate(hs, axis=0)  # (D, N, H)
        cn = cs[0] if len(cs) == 1 else np.concatenate(cs, axis=0)
        if lengths is not None and not lengths.all():
            # onnxruntime gives zeros, not the initial state, for length 0
            empty = lengths == 0
            hn[:, empty] = 0
            cn[:, empty] = 0
        if self.layout == 0:
            return (np.ascontiguousarray(y.transpose(0, 2, 1, 3)), np.ascontiguousarray(hn),
                    np.ascontiguousarray(cn))
        return (np.ascontiguousarray(y.transpose(1, 0, 2, 3)),
                np.ascontiguousarray(hn.transpose(1, 0, 2)),
                np.ascontiguousarray(cn.transpose(1, 0, 2)))


# --------------------------------------------------------------------------
# torch.onnx.export chains: LSTM -> (Squeeze | Transpose+Reshape) -> LSTM
# --------------------------------------------------------------------------
def _const_vec(graph, name):
    """The integer constant `name` (at most 64 values) as a flat list, or None."""
    try:
        v = graph.constant(name, "", tensor=True)
        if v.size > 64:
            return None
        arr = v.array(None)
    except FormatError:
        return None
    if arr.dtype.kind not in "iu":
        return None
    return [int(x) for x in arr.reshape(-1)]


def _const_ints(graph, node, k, attr):
    """A node's integer parameter: input k if present, else attribute `attr`."""
    if len(node.inputs) > k and node.inputs[k]:
        return _const_vec(graph, node.inputs[k])
    if attr in node.attrs:
        try:
            return node.attrs[attr].get(graph.buf, _A_INTS, node.label)
        except FormatError:
            return None
    return None


def _int_attr(graph, node, name, default):
    """A node's INT attribute (`default` if absent); None if malformed."""
    if name not in node.attrs:
        return default
    try:
        return node.attrs[name].get(graph.buf, _A_INT, node.label)
    except FormatError:
        return None


def _only(graph, name, op):
    """The nodes of type `op` consuming `name` as their first input."""
    return [n for n in graph.consumers(name)
            if n.op_type == op and n.domain in ("", "ai.onnx") and n.inputs[0] == name]


def _made_by(graph, name, op):
    """The default-domain `op` node whose first output is `name`, or None."""
    node = graph.producer(name)
    if node is None or node.op_type != op or node.domain not in ("", "ai.onnx") or \
            node.outputs[0] != name or not node.inputs or not node.inputs[0]:
        return None
    return node


def _perm(graph, tr, rank):
    """A Transpose node's perm if it is a permutation of range(rank), else None."""
    perm = _const_ints(graph, tr, 99, "perm")
    return perm if perm is not None and sorted(perm) == list(range(rank)) else None


# Shapes of a layer's tensors, as the LSTM operator fixes them (layout 0):
# "T" and "N" stand for the node's sequence and batch sizes, None for unknown.
def _node_dims(spec):
    D, H = spec.num_directions, spec.hidden_size
    known = {spec.inputs["X"]: ("T", "N", spec.input_size)}
    for name, dims in zip(spec.outputs, (("T", D, "N", H), (D, "N", H), (D, "N", H))):
        if name:
            known[name] = dims
    return known


def _dims_of(graph, known, name, depth=0):
    """Dims of `name`: one of `known`, or a Transpose (of a Transpose ...) of one."""
    if name in known:
        return known[name]
    tr = _made_by(graph, name, "Transpose")
    if tr is None or depth >= 4:
        return None
    src = _dims_of(graph, known, tr.inputs[0], depth + 1)
    perm = src and _perm(graph, tr, len(src))
    return None if not perm else tuple(src[p] for p in perm)


def _declared_TN(graph, spec, known):
    """(T, N) of the node as ints where the graph declares them (shapes of
    its X, Y, Y_h, Y_c, or of the tensor X is a Transpose of, e.g. a
    batch_first graph input), else None.  A declaration that contradicts
    another, or the node's own sizes, leaves both None."""
    seen = {"T": set(), "N": set()}
    bad = False

    def add(decl, dims):
        nonlocal bad
        if decl is None:
            return
        if len(decl) != len(dims):
            bad = True
            return
        for got, want in zip(decl, dims):
            if got is None or want is None:
                continue
            if isinstance(want, str):
                seen[want].add(got)
            elif got != want:
                bad = True
    for name, dims in known.items():
        add(graph.declared_shape(name), dims)
    tr = _made_by(graph, spec.inputs["X"], "Transpose")
    if tr is not None:
        src = graph.declared_shape(tr.inputs[0])
        perm = src and _perm(graph, tr, len(src))
        if perm:
            add(tuple(src[p] for p in perm), known[spec.inputs["X"]])
    if bad:
        return None, None
    return tuple(next(iter(v)) if len(v) == 1 else None for v in (seen["T"], seen["N"]))


def _shape_vector(graph, known, name, depth=0):
    """The 1-D integer tensor `name` as a list (per element an int, "T",
    "N" or None), when it is a constant or computed from constants and the
    Shape of tensors whose dims are known, by the ops exporters write a
    reshape target with (Shape, Slice, Concat, Mul, Reshape to 1-D,
    Identity); None otherwise.  Nothing is executed: each op's effect on
    the list is spelled out here."""
    if depth > 24:
        return None
    try:
        t = graph.constant(name, "", tensor=True)
    except FormatError:
        t = None
    if t is not None:
        return _const_vec(graph, name) if len(t.dims) == 1 else None
    node = graph.producer(name)
    if node is None or node.domain not in ("", "ai.onnx") or node.outputs[0] != name or \
            not node.inputs or not node.inputs[0]:
        return None
    op = node.op_type
    rec = lambda n: _shape_vector(graph, known, n, depth + 1) if n else None  # noqa: E731

    def clamp(i, n):
        return min(max(i + n if i < 0 else i, 0), n)
    if op == "Identity":
        return rec(node.inputs[0])
    if op == "Shape":
        dims = _dims_of(graph, known, node.inputs[0])
        start, end = _int_attr(graph, node, "start", 0), _int_attr(graph, node, "end", None)
        if dims is None or start is None or ("end" in node.attrs and end is None):
            return None
        n = len(dims)
        return list(dims[clamp(start, n):n if end is None else clamp(end, n)])
    if op == "Slice":
        v = rec(node.inputs[0])
        starts, ends = _const_ints(graph, node, 1, "starts"), _const_ints(graph, node, 2, "ends")
        def given(k, attr):
            return bool(len(node.inputs) > k and node.inputs[k]) or attr in node.attrs
        if v is None or starts is None or ends is None or len(starts) != 1 or len(ends) != 1 \
                or (given(3, "axes") and _const_ints(graph, node, 3, "axes") not in ([0], [-1])) \
                or (given(4, "steps") and _const_ints(graph, node, 4, "steps") != [1]):
            return None
        return v[clamp(starts[0], len(v)):clamp(ends[0], len(v))]
    if op == "Concat":
        parts = [rec(i) for i in node.inputs]
        if _int_attr(graph, node, "axis", None) not in (0, -1) or None in parts:
            return None
        return [d for p in parts for d in p]
    if op == "Mul" and len(node.inputs) == 2:
        a, b = rec(node.inputs[0]), rec(node.inputs[1])
        if a is None or b is None or len(a) != 1 or len(b) != 1:
            return None
        return [a[0] * b[0] if isinstance(a[0], int) and isinstance(b[0], int) else None]
    if op == "Reshape" and len(node.inputs) == 2:
        v = rec(node.inputs[0])
        if v is None or _const_ints(graph, node, 1, "shape") not in ([-1], [len(v)]):
            return None
        return v
    return None


def _is_link_target(v, DH, allowzero, T, N):
    """True if Reshape to `v` makes [T, N, D*H] of a [T, N, D, H] tensor:
    the last entry D*H (or -1), the first T (the symbol, a 0 copying it when
    allowzero is 0, or the declared fixed size) and the second N likewise;
    with the last entry D*H one of the first two may be -1 (the count of
    elements then fixes it)."""
    if v is None or len(v) != 3:
        return False
    e0, e1, e2 = v
    ok0 = e0 == "T" or (e0 == 0 and not allowzero) or (T is not None and T > 0 and e0 == T)
    ok1 = e1 == "N" or (e1 == 0 and not allowzero) or (N is not None and N > 0 and e1 == N)
    if e2 == DH:
        return (ok0 and (ok1 or e1 == -1)) or (ok1 and e0 == -1)
    return e2 == -1 and ok0 and ok1


def _next_in_chain(graph, spec, by_node):
    """The spec fed by `spec`'s Y reshaped to [T, N, D*H] the way the torch
    exporters do: a Squeeze of axis 1 (one direction), or a Transpose
    (perm 0, 2, 1, 3) then a Reshape whose target is proven to be [T, N,
    D*H] (see _shape_vector, _is_link_target)."""
    y = spec.outputs[0]
    if not y or spec.layout != 0 or not spec.hidden_size:
        return None
    D, H = spec.num_directions, spec.hidden_size
    mids = []
    if D == 1:
        for sq in _only(graph, y, "Squeeze"):
            if _const_ints(graph, sq, 1, "axes") == [1]:
                mids.append(sq.outputs[0] if sq.outputs else "")
    known = T = N = None
    for tr in _only(graph, y, "Transpose"):
        if not tr.outputs or not tr.outputs[0] or \
                _const_ints(graph, tr, 99, "perm") != [0, 2, 1, 3]:
            continue
        for rs in _only(graph, tr.outputs[0], "Reshape"):
            allowzero = _int_attr(graph, rs, "allowzero", 0)
            if len(rs.inputs) != 2 or not rs.outputs or allowzero is None:
                continue
            if known is None:
                known = _node_dims(spec)
                T, N = _declared_TN(graph, spec, known)
            if _is_link_target(_shape_vector(graph, known, rs.inputs[1]), D * H, allowzero,
                               T, N):
                mids.append(rs.outputs[0])
    for mid in mids:
        for n in graph.consumers(mid) if mid else ():
            nxt = by_node.get(n.index)
            if nxt is not None and nxt.inputs["X"] == mid:
                return nxt
    return None


def _compatible(a, b):
    return (a.direction == b.direction and a.direction != "reverse" and a.layout == b.layout == 0
            and a.cells == b.cells and a.same_cells and a.clip == b.clip
            and a.input_forget == b.input_forget and bool(a.inputs["P"]) == bool(b.inputs["P"])
            and not a.inputs["sequence_lens"] and not b.inputs["sequence_lens"]
            and a.hidden_size == b.hidden_size and a.problem is None and b.problem is None
            and b.input_size == a.num_directions * a.hidden_size)


def _find_chains(graph, specs):
    """Lists of specs forming torch-export style stacks (each spec in one)."""
    by_node = {s.node.index: s for s in specs if not s.broken}
    nxt, has_prev = {}, set()
    for s in by_node.values():
        n = _next_in_chain(graph, s, by_node)
        if n is not None and n is not s and n.name not in has_prev and _compatible(s, n):
            nxt[s.name] = n
            has_prev.add(n.name)
    chains = []
    for s in specs:
        if s.name in has_prev:
            continue
        chain, cur, seen = [s], s, {s.name}
        while cur.name in nxt and nxt[cur.name].name not in seen:
            cur = nxt[cur.name]
            seen.add(cur.name)
            chain.append(cur)
        chains.append(chain)
    # Each node has at most one successor and one predecessor, so the nodes
    # no chain start reaches are exactly those on cycles.
    placed = {s.name for c in chains for s in c}
    left = [s for s in specs if s.name not in placed]
    if left:
        cycle, cur = [left[0]], nxt[left[0].name]
        while cur is not left[0]:
            cycle.append(cur)
            cur = nxt[cur.name]
        path = " -> ".join(repr(s.name) for s in cycle + cycle[:1])
        raise FormatError(f"malformed graph: LSTM nodes feed each other in a cycle ({path}); "
                          f"an ONNX graph must be acyclic")
    return chains


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def list_stacks(path):
    """One dict per LSTM node of the ONNX model at `path` (or bytes).

    Keys: name, format ('onnx'), op_type, node_index, input_size,
    hidden_size, num_layers (1), direction, bidirectional, num_directions,
    layout, batch_first, dtype, peepholes, bias, activations /
    activation_alpha / activation_beta (one entry per direction), clip,
    input_forget, default_cell, inputs / outputs (tensor names by role),
    loadable and problem (why not, e.g. weights that are run-time inputs,
    or attributes not understood: then the keys describing the cell are
    None), stack (name of the first node of the torch-export chain holding
    this node, see load_stack) and layer (its index in that chain).
    """
    model = _Model(path)
    out = {}
    for chain in model.chains:
        for k, s in enumerate(chain):
            info = s.info()
            info.update(stack=chain[0].name, layer=k, stack_layers=len(chain))
            out[s.name] = info
    return [out[s.name] for s in model.specs]


def load_onnx(path, name=None):
    """The LSTM node `name` (None: the only one) of the ONNX model at `path`
    (or bytes) as an OnnxLSTM: callable with ONNX's inputs and outputs,
    ``.lstm`` the fastlstm.LSTM.  Raises FormatError if the file is malformed
    or the node's weights are not constants."""
    model = _Model(path)
    return OnnxLSTM(model, model.spec(name))


def load_stack(path, name=None, *, batch_first=None, dtype=None, num_threads=None):
    """A fastlstm.LSTM (torch.nn.LSTM semantics) for a chain of LSTM nodes as
    torch.onnx.export writes a multi-layer nn.LSTM (either exporter): node
    k's Y reshaped to [T, N, D*H] (Squeeze, or Transpose + Reshape, see the
    module docstring) is node k+1's X, with the same direction and cell
    options.  `name`: any node of the chain (None:
    the model must hold exactly one chain).  A single node is a one-layer
    stack.  batch_first (None: detected) is set when the first node has
    layout 1 or its X is a Transpose (perm 1, 0, 2) of a graph input, as
    torch exports batch_first LSTMs.  dtype: None keeps the weights' (float64
    if they are double, else float32).  Reverse-only nodes and bidirectional
    nodes with different activations per direction have no torch
    equivalent: use load_onnx for those (FastLSTMError here).  So do nodes
    with constant initial states or sequence_lens in the file, unless all
    zero / all the declared sequence length (FormatError here)."""
    if dtype is not None and np.dtype(dtype) not in (np.float32, np.float64):
        raise DTypeError(f"dtype: expected float32 or float64, got {np.dtype(dtype)}")
    model = _Model(path)
    chain = _chain(model, name)
    first = chain[0]
    for s in chain:
        if s.broken:
            s.fail()
        if s.direction == "reverse" or not s.same_cells:
            raise FastLSTMError(_no_torch_equivalent(s))
        _check_constant_inputs(model, s)
    if batch_first is None:
        g = first.graph
        prod = g.producer(first.inputs["X"])
        batch_first = first.layout == 1 or bool(
            prod is not None and prod.op_type == "Transpose" and prod.inputs
            and g.is_graph_input(prod.inputs[0])
            and _const_ints(g, prod, 99, "perm") == [1, 0, 2])
    sd, dtypes, has_bias = {}, set(), any(s.inputs["B"] for s in chain)
    In = H = None
    for k, s in enumerate(chain):
        W, R, B, P, Hk, Ink, dt = _node_weights(model, s)
        if k == 0:
            In, H = Ink, Hk
        dtypes.add(np.dtype(dt))
        if has_bias and B is None:
            B = np.zeros((s.num_directions, 8 * Hk), np.float32)
        for d in range(s.num_directions):
            sd.update(_direction_sd(W, R, B, P, d, Hk, f"{k}" + ("_reverse" if d else "")))
    if dtype is None:
        dtype = np.float64 if dtypes == {np.dtype(np.float64)} else np.float32
    return _new_lstm(f"LSTM stack {first.name!r}", In, H, num_layers=len(chain), bias=has_bias,
                     batch_first=bool(batch_first), bidirectional=first.num_directions == 2,
                     dtype=dtype, peepholes=bool(first.inputs["P"]), cell=first.cells[0],
                     clip=first.clip, input_forget=first.input_forget, state_dict=sd,
                     num_threads=num_threads)


def _check_constant_inputs(model, spec):
    """FormatError if the graph gives `spec` a constant initial_h / initial_c
    / sequence_lens that a fastlstm.LSTM cannot carry (it takes the states
    and lengths at each call).  Ignoring them is exact, and allowed, when the
    states are all zeros and the lengths all equal the sequence length the
    graph declares for the node's input."""
    g, kept = spec.graph, []
    for role in ("initial_h", "initial_c", "sequence_lens"):
        name = spec.inputs[role]
        if not name or not g.is_constant(name):
            continue  # none, or a run-time value: the caller passes it at each call
        v = g.constant(name, f"{spec.what}: {role}", model.base_dir)
        if role == "sequence_lens":
            T = _declared_TN(g, spec, _node_dims(spec))[0]
            exact = T is not None and v.dtype.kind in "iu" and v.ndim == 1 and bool((v == T).all())
        else:
            exact = v.dtype.kind in "fiub" and not np.any(v)
        if not exact:
            kept.append(f"{role} {name!r}")
    if kept:
        raise FormatError(
            f"{spec.what} has constant {' and '.join(kept)} in the file, which a fastlstm.LSTM "
            f"cannot carry (it takes the initial state and lengths at each call), so loading it "
            f"as one would silently change the results. Use fastlstm.io.onnx.load_onnx(path, "
            f"name={spec.name!r}): the node it returns applies them by default.")


def _no_torch_equivalent(spec):
    why = ("its direction is 'reverse'" if spec.direction == "reverse" else
           "its two directions use different activations")
    return (f"LSTM node {spec.name!r} has no torch.nn.LSTM equivalent: {why}. Load it with "
            f"fastlstm.io.onnx.load_onnx(path, name) and call the node (ONNX semantics), or "
            f"use its .parts, (fastlstm.LSTM, reversed_in_time) pairs.")


def _chain(model, name):
    if not model.chains:
        raise FormatError("the model has no LSTM node")
    if name is None:
        if len(model.chains) > 1:
            raise FormatError(
                f"the model has {len(model.chains)} separate LSTM stacks; pass name= one of "
                f"{[c[0].name for c in model.chains]}")
        return model.chains[0]
    spec = model.spec(name)
    return next(c for c in model.chains if spec in c)


# --------------------------------------------------------------------------
# fastlstm.load / fastlstm.list_stacks (the fastlstm.io format registry)
# --------------------------------------------------------------------------
def _variant(chain):
    s = chain[0]
    if s.direction == "reverse":
        return "reverse direction only (no torch equivalent: fastlstm.io.onnx.load_onnx)"
    if not s.same_cells:
        return ("different activations per direction (no torch equivalent: "
                "fastlstm.io.onnx.load_onnx)")
    parts = []
    if s.inputs["P"]:
        parts.append("peepholes")
    acts, alpha, beta = s.cells[0]
    if acts != ("sigmoid", "tanh", "tanh"):
        parts.append("activations=" + ",".join(acts))
    if s.clip is not None:
        parts.append(f"clip={s.clip:g}")
    if s.input_forget:
        parts.append("input_forget")
    return ", ".join(parts) or "standard"


def _registry_list(path):
    model = _Model(path)
    out = []
    for chain in model.chains:
        s = chain[0]
        if s.broken:
            out.append((s.name, {"format": "onnx", "kind": "LSTM", "input_size": None,
                                 "hidden_size": None, "proj_size": 0, "num_layers": 1,
                                 "num_directions": None, "bidirectional": None, "bias": None,
                                 "dtype": None, "variant": "not loadable", "nodes": [s.name],
                                 "problem": s.problem}))
            continue
        info = {"format": "onnx", "kind": "LSTM", "input_size": s.input_size,
                "hidden_size": s.hidden_size, "proj_size": 0, "num_layers": len(chain),
                "num_directions": s.num_directions, "bidirectional": s.num_directions == 2,
                "bias": any(c.inputs["B"] for c in chain), "dtype": s.dtype,
                "variant": _variant(chain), "nodes": [c.name for c in chain]}
        if s.problem:
            info["problem"] = s.problem
        out.append((s.name, info))
    return out


def _registry_load(path, name=None, **kwargs):
    unknown = sorted(set(kwargs) - {"batch_first", "dtype", "num_threads"})
    if unknown:
        raise TypeError(f"ONNX files carry their own cell options; unexpected keyword arguments "
                        f"{unknown} (accepted: batch_first, dtype, num_threads)")
    try:
        return load_stack(path, name, **kwargs)
    except FormatError:
        raise
    except FastLSTMError as exc:
        raise FormatError(f"{path}: {exc}") from exc


def _registry_sniff(probe):
    return not getattr(probe, "is_dir", False) and sniff(getattr(probe, "head", b""))


def _register():
    try:
        from . import register_format
    except ImportError:  # no registry: this module still works on its own
        return
    register_format("onnx", _registry_sniff, _registry_list, _registry_load)


_register()

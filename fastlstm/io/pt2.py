"""torch.export archives (``torch.export.save``, .pt2) read without torch.

A .pt2 file is a zip archive of uncompressed records under one top-level
folder ``<root>/``:

* ``archive_format`` (``pt2``), ``archive_version`` (``0``), ``byteorder``;
* ``models/<model>.json``: a serialized ExportedProgram (``torch.export.save``
  writes one, ``model``): its graph signature (placeholder -> parameter,
  buffer or constant FQN such as ``lstm.weight_ih_l0``) and its graph, whose
  ``torch.ops.aten.lstm.input`` nodes carry ``has_biases``, ``num_layers``,
  ``bidirectional`` and ``batch_first`` (``aten.lstm.data``, packed input,
  has no ``batch_first``);
* ``data/weights/<model>_weights_config.json`` (and
  ``data/constants/<model>_constants_config.json`` for lifted constants):
  FQN -> record (``path_name``), dtype (torch's ScalarType number), sizes,
  strides and storage offset; each record holds the raw bytes of one storage
  (tensors that share a storage share its record);
* ``data/sample_inputs/<model>.pt`` (a pickle) and other records, never read.

Only the JSON records (parsed with the json module) and the weight records
(read with NumPy) are read; nothing in the file is executed or unpickled.
Every dtype, size, stride, offset and record name is checked before anything
is allocated: a tensor's view must lie inside its record (records are
uncompressed and inside the archive), JSON records are at most
:data:`MAX_JSON_BYTES` and :data:`MAX_JSON_DEPTH` levels deep, and a stack's
tensors may claim no more bytes than the file holds.  Damaged files raise
:class:`fastlstm.FormatError`.

LSTM parameters are found by name (:mod:`fastlstm.io.stacks`).  A stack
that an ``aten.lstm`` node of the graph runs takes ``batch_first`` from that
node, unless the caller passes one (it is the caller's array layout); the
node's ``num_layers``, ``bidirectional``, ``has_biases`` and weights must
agree with the stack found, or the file is refused.  ``dropout`` and
``train`` are not read (fastlstm runs inference).  Parameters no
``aten.lstm`` node uses (an ``nn.LSTMCell``, which exports as
``aten.lstm_cell``; a graph after ``run_decompositions()``) load with
``batch_first=False``, as from a state dict.  Graphs nested in
higher-order ops (``torch.no_grad()`` regions, ...) are searched, at most
:data:`MAX_GRAPH_DEPTH` levels deep.  An archive holding several
ExportedPrograms (``package_pt2``) names its stacks ``"<model>.<fqn>"``.
"""
from __future__ import annotations

import json
import re
import zipfile

from ..errors import FormatError
from . import stacks
from .torchfile import _DTYPES, TensorRef, TorchFile, _int_tuple, _Storage, tensor_view

__all__ = ["ExportFile", "list_stacks", "load", "is_export_archive", "FORMAT_NAME",
           "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_GRAPH_DEPTH"]

FORMAT_NAME = "torch-export"
MAX_JSON_BYTES = 256 << 20
MAX_JSON_DEPTH = 200
MAX_GRAPH_DEPTH = 16

# torch._export.serde.schema.ScalarType -> torch dtype name (fastlstm.io.torchfile's)
_SCALAR_TYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16",
                 7: "float32", 8: "float64", 10: "complex64", 11: "complex128", 12: "bool",
                 13: "bfloat16", 28: "uint16", 29: "float8_e4m3fn", 30: "float8_e5m2",
                 31: "float8_e4m3fnuz", 32: "float8_e5m2fnuz", 33: "float8_e8m0fnu",
                 34: "uint32", 35: "uint64"}
_STRIDED = 7  # schema.Layout.Strided
_SPEC_KINDS = ("parameter", "buffer", "tensor_constant")
_LSTM_TARGETS = ("torch.ops.aten.lstm.input", "torch.ops.aten.lstm.data")
_RECORD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_MODEL_JSON = re.compile(r"models/([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})\.json")


def is_export_archive(names):
    """True if zip member ``names`` are a torch.export archive's: all under
    one top-level folder holding ``archive_format`` and ``models/*.json``."""
    if not names:
        return False
    root = names[0].split("/", 1)[0] + "/"
    return (all(n.startswith(root) for n in names) and root + "archive_format" in names
            and any(_MODEL_JSON.fullmatch(n, len(root)) for n in names))


def _short(value, limit=80):
    s = repr(value)
    return s if len(s) <= limit else s[:limit] + "..."


class _Node:
    """An aten.lstm node: its name, target, flags and weights (source keys,
    None where a weight is not a stored tensor)."""

    __slots__ = ("name", "target", "keys", "has_biases", "num_layers", "bidirectional",
                 "batch_first")

    def describe(self):
        return (f"graph node {self.name!r} ({self.target[len('torch.ops.'):]}: "
                f"num_layers={self.num_layers}, bidirectional={self.bidirectional}, "
                f"has_biases={self.has_biases}, {len(self.keys)} weights)")


class ExportFile(TorchFile):
    """An open torch.export archive.

    ``obj``: source key (the FQN; ``"<model>.<fqn>"`` when the archive holds
    several programs) -> :class:`fastlstm.io.TensorRef`; ``nodes``: the
    graphs' aten.lstm nodes; ``array(ref)`` reads one tensor; ``find_stacks()``
    the LSTMs with the graph's configuration.  ``source``: a path or bytes.
    Use as a context manager.
    """

    _KIND = "torch.export"

    def _fail(self, msg):
        raise FormatError(f"{self.where}: {msg}")

    def _open(self):
        names = self._open_zip()
        if not is_export_archive(names):
            self._fail("not a torch.export archive (expected archive_format and "
                       "models/*.json under one top-level folder)")
        self.prefix = names[0].split("/", 1)[0] + "/"
        self._storages, self._pickled, self._batch_first = {}, set(), {}
        if self._text("archive_format") != "pt2":
            self._fail("archive_format is not 'pt2'")
        if self.prefix + "archive_version" in self._infos and self._text("archive_version") != "0":
            self._fail(f"archive_version {self._text('archive_version')!r} is not supported "
                       f"(fastlstm reads version 0, torch.export.save's)")
        self.byteorder = "little"
        if self.prefix + "byteorder" in self._infos:
            self.byteorder = self._text("byteorder")
            if self.byteorder not in ("little", "big"):
                self._fail(f"byteorder record is {self.byteorder!r}")
        models = sorted(m.group(1) for m in (_MODEL_JSON.fullmatch(n, len(self.prefix))
                                             for n in names) if m)
        self.obj, self.nodes = {}, []
        for model in models:
            scope = self._read_tensors(model, "" if len(models) == 1 else model + ".")
            self._read_graph(model, scope)

    # -- records
    def _record(self, name, what):
        """The zip entry of record ``name`` (a path under the root), checked
        to be stored uncompressed inside the archive."""
        return self._member(self.prefix + name, what)

    def _read(self, name, limit):
        return self._read_member(self.prefix + name, limit=limit)

    def _text(self, name):
        return self._read(name, 64).decode("ascii", "replace").strip()

    def _json(self, name):
        data = self._read(name, MAX_JSON_BYTES)
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            self._fail(f"{name} is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})")
        todo = [(obj, 1)]
        while todo:  # no recursion: a work list
            node, depth = todo.pop()
            if depth > MAX_JSON_DEPTH:
                self._fail(f"{name} is nested deeper than {MAX_JSON_DEPTH} levels")
            items = node.values() if isinstance(node, dict) else node
            todo.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
        if not isinstance(obj, dict):
            self._fail(f"{name} is not a JSON object")
        return obj

    def _field(self, obj, key, kind, what):
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self._fail(f"{what}: expected {key!r} of type {kind.__name__}, got {_short(value)}")
        return value

    def _ints(self, values, what):
        if not isinstance(values, list):
            self._fail(f"{what}: expected a list, got {_short(values)}")
        out = [self._field(v, "as_int", int, what) for v in values]
        try:
            return _int_tuple(out, what)
        except FormatError as exc:
            self._fail(str(exc))

    # -- tensors
    def _read_tensors(self, model, key_prefix):
        """Read the weights and constants configs into self.obj; returns the
        model's FQN -> source key."""
        weights = f"data/weights/{model}_weights_config.json"
        if self.prefix + weights not in self._infos:
            if self.prefix + f"data/weights/{model}.pt" in self._infos:
                self._fail(f"a legacy PT2 archive (weights pickled in data/weights/{model}.pt) "
                           f"is not supported: re-save it with torch.export.save")
            self._fail(f"record {weights!r} missing from the archive")
        scope = {}
        for folder, config in (("weights", weights),
                               ("constants", f"data/constants/{model}_constants_config.json")):
            if self.prefix + config not in self._infos:
                continue
            entries = self._field(self._json(config), "config", dict, config)
            for fqn, entry in entries.items():
                if not isinstance(entry, dict):
                    self._fail(f"{config}: entry {_short(fqn)} is not an object")
                if folder == "constants" and entry.get("tensor_meta") is None:
                    continue  # a custom object, not a tensor
                scope[fqn] = key = key_prefix + fqn
                if key in self.obj:
                    self._fail(f"{config}: two tensors named {_short(key)}")
                self.obj[key] = self._tensor(folder, entry, f"{config}: {fqn!r}")
        return scope

    def _tensor(self, folder, entry, what):
        path_name = self._field(entry, "path_name", str, what)
        pickled = self._field(entry, "use_pickle", bool, what)
        meta = self._field(entry, "tensor_meta", dict, what)
        code = self._field(meta, "dtype", int, what)
        if code not in _SCALAR_TYPES:
            self._fail(f"{what}: unknown dtype {code}")
        dtype = _SCALAR_TYPES[code]
        if meta.get("layout", _STRIDED) != _STRIDED:
            self._fail(f"{what}: layout {_short(meta.get('layout'))} is not strided (sparse "
                       f"tensors are not supported)")
        shape = self._ints(meta.get("sizes"), f"{what}: sizes")
        stride = self._ints(meta.get("strides"), f"{what}: strides")
        offset = self._field(meta.get("storage_offset"), "as_int", int, f"{what}: storage_offset")
        if not _RECORD_NAME.fullmatch(path_name) or path_name in (".", ".."):
            self._fail(f"{what}: bad record name {_short(path_name)}")
        key = f"{folder}/{path_name}"
        name = f"data/{key}"
        zi = self._record(name, what)
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, "uint8", zi.file_size, "cpu")
        if pickled:  # a tensor subclass: listed, refused when read
            self._pickled.add(key)
            if len(shape) != len(stride):
                self._fail(f"{what}: sizes {shape} and strides {stride} differ in length")
            return TensorRef(storage, offset, shape, stride, dtype)
        if zi.file_size % _DTYPES[dtype][1]:
            self._fail(f"{what}: record {name!r} holds {zi.file_size} bytes, not a whole "
                       f"number of {dtype} elements")
        # torch.save's view checks: offset, sizes and strides inside the record
        return tensor_view(storage, offset, shape, stride, dtype, f"{self.where}: {what}")

    def array(self, ref):
        """A tensor's values as a read-only NumPy array (bfloat16 widened)."""
        if ref.storage.key in self._pickled:
            self._fail(f"record {ref.storage.key!r} is a pickled tensor (a tensor subclass): "
                       f"not supported")
        return super().array(ref)

    # -- graphs
    def _read_graph(self, model, scope):
        name = f"models/{model}.json"
        gm = self._field(self._json(name), "graph_module", dict, name)
        sig = self._field(gm, "signature", dict, f"{name}: graph_module")
        top = {}
        for spec in self._field(sig, "input_specs", list, f"{name}: signature"):
            if not isinstance(spec, dict) or len(spec) != 1:
                self._fail(f"{name}: bad input spec {_short(spec)}")
            (kind, body), = spec.items()
            if kind in _SPEC_KINDS:
                arg = self._field(self._field(body, "arg", dict, f"{name}: {kind} spec"),
                                  "name", str, f"{name}: {kind} spec")
                fqn = self._field(body, kind + "_name", str, f"{name}: {kind} spec")
                if fqn in scope:
                    top[arg] = scope[fqn]
        todo = [(self._field(gm, "graph", dict, name), top, 0)]
        while todo:
            graph, names, depth = todo.pop()
            for node in self._field(graph, "nodes", list, f"{name}: graph"):
                target = self._field(node, "target", str, f"{name}: node")
                inputs = self._field(node, "inputs", list, f"{name}: node {target}")
                if target in _LSTM_TARGETS:
                    self.nodes.append(self._lstm_node(node, target, inputs, names, name))
                elif depth < MAX_GRAPH_DEPTH:
                    todo.extend((g, s, depth + 1) for g, s in self._subgraphs(inputs, names))

    def _lstm_node(self, node, target, inputs, names, where):
        what = f"{where}: {target} node {_short(node.get('name'))}"
        args = {i.get("name"): i.get("arg") for i in inputs if isinstance(i, dict)}
        n = _Node()
        n.name, n.target = node.get("name"), target
        params = self._field(args.get("params"), "as_tensors", list, what + " params")
        n.keys = [names.get(self._field(p, "name", str, what + " params")) for p in params]
        for arg, kind in (("has_biases", "as_bool"), ("num_layers", "as_int"),
                          ("bidirectional", "as_bool"), ("batch_first", "as_bool")):
            value = None
            if arg != "batch_first" or target.endswith(".input"):  # .data: packed input
                value = self._field(args.get(arg), kind, bool if kind == "as_bool" else int,
                                    f"{what} {arg}")
            setattr(n, arg, value)
        return n

    @staticmethod
    def _subgraphs(inputs, names):
        """Graphs a higher-order op runs, each with its inputs mapped to the
        source keys of the op's tensor operands (those after its last graph)."""
        args = [i.get("arg") for i in inputs if isinstance(i, dict) and isinstance(
            i.get("arg"), dict)]
        graphs = [j for j, a in enumerate(args) if isinstance(a.get("as_graph"), dict)]
        if not graphs:
            return []
        operands = []
        for a in args[graphs[-1] + 1:]:
            ts = [a["as_tensor"]] if "as_tensor" in a else a.get("as_tensors")
            operands += [t.get("name") if isinstance(t, dict) else None
                         for t in (ts if isinstance(ts, list) else [None])]
        out = []
        for j in graphs:
            graph = args[j]["as_graph"].get("graph")
            ins = graph.get("inputs") if isinstance(graph, dict) else None
            if not isinstance(ins, list):
                continue
            inner = {}
            if len(ins) == len(operands):
                for i, outer in zip(ins, operands):
                    t = i.get("as_tensor") if isinstance(i, dict) else None
                    if isinstance(t, dict) and isinstance(t.get("name"), str) and outer in names:
                        inner[t["name"]] = names[outer]
            out.append((graph, inner))
        return out

    # -- stacks
    def find_stacks(self):
        """``(flat, found, rejected)`` as for state dicts (flat: source key
        -> TensorRef), with the graph's ``batch_first`` in each info it is
        known for; FormatError if an lstm node contradicts its weights."""
        metas = {k: (t.shape, t.dtype) for k, t in self.obj.items()}
        found, rejected = stacks.find_stacks(metas, FORMAT_NAME)
        self._batch_first.clear()
        ident = {k: (t.storage.key, t.offset, t.shape, t.stride, t.dtype)
                 for k, t in self.obj.items()}
        lstms = [(s, [ident[k] for k in _torch_order(s)]) for s in found if s.kind == "LSTM"]
        for node in self.nodes:
            ids = [ident.get(k) for k in node.keys]
            if not ids or ids[0] is None:
                continue  # its weights are not stored tensors: not a stack of the file
            candidates = [(s, want) for s, want in lstms if ids[0] in want]
            matched = [s for s, want in candidates if ids == want and (
                node.num_layers, node.bidirectional, node.has_biases) == (
                s.info["num_layers"], s.info["bidirectional"], s.info["bias"])]
            if candidates and not matched:
                s, want = candidates[0]
                i = s.info
                why = "" if len(ids) != len(want) or ids == want else (
                    ": it passes other tensors, or in another order, than torch.nn.LSTM's")
                self._fail(f"{node.describe()} contradicts the weights of "
                           f"{s.name or '<root>'!r} ({i['num_layers']} layers, "
                           f"bidirectional={i['bidirectional']}, bias={i['bias']}, "
                           f"proj_size={i['proj_size']}, {len(want)} weights){why}")
            for s in matched:
                if node.batch_first is not None:
                    self._batch_first.setdefault(s.prefix, set()).add(node.batch_first)
        for s in found:
            values = self._batch_first.get(s.prefix, ())
            if len(values) == 1:
                s.info["batch_first"] = next(iter(values))
        return self.obj, found, rejected

    def check_batch_first(self, stack):
        """FormatError if lstm nodes run ``stack`` with both batch_first
        values (its info then has none to default to)."""
        if len(self._batch_first.get(stack.prefix, ())) > 1:
            self._fail(f"the graph runs {stack.name or '<root>'!r} with batch_first both True "
                       f"and False: pass batch_first=")


def _torch_order(stack):
    """A stack's source keys in the order of torch.nn.LSTM's flat weights
    (aten.lstm's params): per layer and direction w_ih, w_hh[, b_ih, b_hh][, w_hr]."""
    info, out = stack.info, []
    names = ["weight_ih", "weight_hh"] + ["bias_ih", "bias_hh"] * info["bias"] + [
        "weight_hr"] * bool(info["proj_size"])
    for layer in range(info["num_layers"]):
        for sfx in ("", "_reverse")[:info["num_directions"]]:
            out += [stack.keys[f"{n}_l{layer}{sfx}"] for n in names]
    return out if len(out) == len(stack.keys) else []


def list_stacks(path):
    """Every LSTM in a torch.export archive: ``[(name, info), ...]``; info
    has ``batch_first`` where the graph gives it."""
    with ExportFile(path) as f:
        _, found, _ = f.find_stacks()
    return [(s.name, s.info) for s in found]


def load(path, name=None, *, batch_first=None, **kwargs):
    """A fastlstm.LSTM from a torch.export archive.  ``batch_first=None``
    takes the graph's (False for a stack no lstm node runs); an explicit
    value is the caller's array layout and wins.  Other keywords as
    :func:`fastlstm.io.stacks.build_model`."""
    with ExportFile(path) as f:
        flat, found, rejected = f.find_stacks()
        stack = stacks.select_stack(found, name, f.where, rejected)
        if batch_first is None:
            f.check_batch_first(stack)
        return stacks.build_model(stack, lambda k: f.array(flat[k]), f.where,
                                  lambda k: flat[k].nbytes, f.size, batch_first=batch_first,
                                  **kwargs)

"""torch.export archives (.pt2) read without torch (fastlstm.io.pt2): LSTMs
exported and saved by torch itself, compared with the torch module and the
ExportedProgram; batch_first and the configuration taken from the graph;
crafted and fuzzed archives (JSON, sizes, offsets, records)."""
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch  # a test dependency: the files under test are torch's own

import fastlstm
from fastlstm.io import Probe, _pt2_sniff, _torch_sniff, detect_format, pt2
from io_fuzzing import Fuzzer, flip_bytes, huge_int, iters, truncate, SEED
from tolerances import PRECISION_TOL, TOL, assert_close, max_rel_err

pytestmark = pytest.mark.filterwarnings("ignore:The tensor attributes:UserWarning")


class _WithHead(torch.nn.Module):
    """An LSTM and a Linear head: returns the LSTM's outputs and the head's."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm
        out = lstm.hidden_size if lstm.proj_size == 0 else lstm.proj_size
        self.head = torch.nn.Linear(out * (2 if lstm.bidirectional else 1), 2).to(
            lstm.weight_hh_l0.dtype)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        return y, h, c, self.head(y)


def _export(mod, x, path, dynamic_shapes=None):
    ep = torch.export.export(mod.eval(), (torch.from_numpy(x),), dynamic_shapes=dynamic_shapes)
    torch.export.save(ep, str(path))
    return ep


def _input(lstm, N=3, T=4, dtype=np.float32, seed=5):
    shape = (N, T, lstm.input_size) if lstm.batch_first else (T, N, lstm.input_size)
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _check(m, want, x, dtype, what):
    """fastlstm's (out, (h, c)) against torch's (out, h, c)."""
    out, (h, c) = m(x)
    for got, ref, part in zip((out, h, c), want, ("out", "h_n", "c_n")):
        err = max_rel_err(got, ref.detach().numpy())
        assert err <= TOL[np.dtype(dtype)], f"{what} {part}: error {err:.3e}"


def _torch_run(mod, x):
    with torch.no_grad():
        return mod(torch.from_numpy(x))


def _flat(result):
    out, (h, c) = result
    return out, h, c


# ------------------------------------------------------- torch's own files
CONFIGS = [dict(num_layers=2, bidirectional=True, batch_first=True), dict(),
           dict(num_layers=2, proj_size=2), dict(bias=False, batch_first=True),
           dict(bidirectional=True, proj_size=3, batch_first=True)]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("wdtype", ["float32", "float64"])
def test_matches_torch_and_exported_program(tmp_path, cfg, wdtype):
    torch.manual_seed(0)
    dt = np.dtype(wdtype)
    net = _WithHead(torch.nn.LSTM(4, 5, **cfg).to(getattr(torch, wdtype)))
    x = _input(net.lstm, dtype=dt)
    path = tmp_path / "m.pt2"
    ep = _export(net, x, path)
    assert detect_format(path) == "torch-export"
    [(name, info)] = fastlstm.list_stacks(path)
    assert name == "lstm" and info["format"] == "torch-export" and info["kind"] == "LSTM"
    assert info["batch_first"] == cfg.get("batch_first", False)
    assert (info["num_layers"], info["bidirectional"], info["proj_size"], info["bias"]) == (
        cfg.get("num_layers", 1), cfg.get("bidirectional", False), cfg.get("proj_size", 0),
        cfg.get("bias", True))
    assert info["dtype"] == wdtype and info["input_size"] == 4 and info["hidden_size"] == 5
    m = fastlstm.load(path)  # batch_first from the graph
    assert m.batch_first == cfg.get("batch_first", False) and m.dtype == dt
    _check(m, _flat(_torch_run(net.lstm, x)), x, dt, f"{cfg} {wdtype} module")
    with torch.no_grad():
        got = ep.module()(torch.from_numpy(x))
    _check(m, got[:3], x, dt, f"{cfg} {wdtype} ExportedProgram")
    for k, v in m.state_dict().items():  # the same weights as torch's
        assert np.array_equal(v, net.lstm.state_dict()[k].numpy()), k


@pytest.mark.parametrize("wdtype", ["float16", "bfloat16"])
def test_reduced_precision_weights(tmp_path, wdtype):
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(3, 4, batch_first=True).to(getattr(torch, wdtype))
    path = tmp_path / "h.pt2"
    ep = torch.export.export(lstm.eval(), (torch.randn(2, 5, 3).to(getattr(torch, wdtype)),))
    torch.export.save(ep, str(path))
    [(_, info)] = fastlstm.list_stacks(path)
    assert info["dtype"] == wdtype and info["batch_first"] is True
    m = fastlstm.load(path)
    assert m.dtype == np.float32 and m.batch_first
    ref = lstm.float()  # the stored weights, widened exactly
    x = _input(ref)
    _check(m, _flat(_torch_run(ref, x)), x, np.float32, wdtype)


def test_batch_first_override_and_weights(tmp_path):
    """An explicit batch_first is the caller's layout; weights= and dtype= as
    for other formats."""
    torch.manual_seed(2)
    lstm = torch.nn.LSTM(3, 6, num_layers=2, batch_first=True)
    path = tmp_path / "bf.pt2"
    _export(lstm, _input(lstm), path)
    x_tn = _input(torch.nn.LSTM(3, 6))  # (T, N, In)
    m = fastlstm.load(path, batch_first=False)
    assert not m.batch_first
    want = _flat(_torch_run(lstm, np.ascontiguousarray(x_tn.transpose(1, 0, 2))))
    out, (h, c) = m(x_tn)
    assert_close(out, want[0].numpy().transpose(1, 0, 2), np.float32, "override out")
    assert_close(h, want[1].numpy(), np.float32, "override h_n")
    assert fastlstm.load(path, batch_first=True).batch_first
    m64 = fastlstm.load(path, dtype=np.float64)
    assert m64.dtype == np.float64 and m64.batch_first
    q = fastlstm.load(path, weights="int8")
    assert q.weights_precision == "int8" and q.batch_first
    x = _input(lstm)
    err = max_rel_err(q(x)[0], fastlstm.load(path)(x)[0])
    assert err <= PRECISION_TOL["int8"], err


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.LSTM(4, 3, batch_first=True)
        self.dec = torch.nn.Module()
        self.dec.lstm = torch.nn.LSTM(3, 5, bidirectional=True)
        self.cell = torch.nn.LSTMCell(10, 2)

    def forward(self, x):
        y = self.enc(x)[0]
        z = self.dec.lstm(y.transpose(0, 1))[0]
        h, c = self.cell(z[0])
        return z, h


def test_several_lstms_and_a_cell(tmp_path):
    torch.manual_seed(3)
    net = _Two().eval()
    x = np.random.default_rng(0).standard_normal((2, 6, 4)).astype(np.float32)
    path = tmp_path / "two.pt2"
    _export(net, x, path)
    found = dict(fastlstm.list_stacks(path))
    assert sorted(found) == ["cell", "dec.lstm", "enc"]
    assert found["enc"]["batch_first"] is True and found["dec.lstm"]["batch_first"] is False
    assert found["cell"]["kind"] == "LSTMCell" and "batch_first" not in found["cell"]
    with pytest.raises(fastlstm.FormatError, match="pass name= one of"):
        fastlstm.load(path)
    enc = fastlstm.load(path, name="enc")
    assert enc.batch_first
    _check(enc, _flat(_torch_run(net.enc, x)), x, np.float32, "enc")
    dec = fastlstm.load(path, name="lstm")  # a unique dotted suffix
    assert not dec.batch_first
    xd = np.ascontiguousarray(x.transpose(1, 0, 2)[..., :3])
    _check(dec, _flat(_torch_run(net.dec.lstm, xd)), xd, np.float32, "dec")
    cell = fastlstm.load(path, name="cell")  # aten.lstm_cell: no batch_first, a state dict's
    assert not cell.batch_first
    xc = np.random.default_rng(1).standard_normal((1, 2, 10)).astype(np.float32)
    with torch.no_grad():
        h1, c1 = net.cell(torch.from_numpy(xc[0]))
    out, (h, c) = cell(xc)
    assert_close(h[0], h1.numpy(), np.float32, "cell h")
    assert_close(c[0], c1.numpy(), np.float32, "cell c")


def test_dynamic_batch(tmp_path):
    torch.manual_seed(4)
    lstm = torch.nn.LSTM(3, 4, bidirectional=True, batch_first=True)
    path = tmp_path / "dyn.pt2"
    ep = _export(lstm, _input(lstm, N=2), path,
                 dynamic_shapes=({0: torch.export.Dim("batch")},))
    m = fastlstm.load(path)
    assert m.batch_first
    for n in (1, 5):
        x = _input(lstm, N=n, seed=n)
        with torch.no_grad():
            got = ep.module()(torch.from_numpy(x))
        _check(m, _flat(got), x, np.float32, f"batch {n}")


class _Graphs(torch.nn.Module):
    """An LSTM run in a no_grad region (a nested graph), one whose weights are
    tied to it (weight_hh), and a functional aten.lstm on non-persistent
    buffers (lifted constants)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.LSTM(3, 3, batch_first=True)
        self.b = torch.nn.LSTM(3, 3)
        self.b.weight_hh_l0 = self.a.weight_hh_l0
        for k, v in torch.nn.LSTM(3, 2).state_dict().items():
            self.register_buffer("f_" + k, v.clone(), persistent=False)

    def forward(self, x):
        with torch.no_grad():
            y = self.a(x)[0]
        z = self.b(y.transpose(0, 1))[0]
        w = [self.f_weight_ih_l0, self.f_weight_hh_l0, self.f_bias_ih_l0, self.f_bias_hh_l0]
        h0 = torch.zeros(1, x.shape[0], 2)
        return z, torch._VF.lstm(x, (h0, h0), w, True, 1, 0.0, False, False, True)[0]


def test_nested_tied_and_constant_weights(tmp_path):
    torch.manual_seed(5)
    net = _Graphs().eval()
    x = np.random.default_rng(2).standard_normal((2, 4, 3)).astype(np.float32)
    path = tmp_path / "graphs.pt2"
    ep = _export(net, x, path)
    found = dict(fastlstm.list_stacks(path))
    assert {k: v["batch_first"] for k, v in found.items()} == {"a": True, "b": False,
                                                               "f_": True}
    _check(fastlstm.load(path, name="a"), _flat(_torch_run(net.a, x)), x, np.float32, "a")
    xb = np.ascontiguousarray(_torch_run(net.a, x)[0].numpy().transpose(1, 0, 2))
    _check(fastlstm.load(path, name="b"), _flat(_torch_run(net.b, xb)), xb, np.float32, "b")
    with torch.no_grad():
        want = ep.module()(torch.from_numpy(x))
    assert_close(fastlstm.load(path, name="f_")(x)[0], want[1].numpy(), np.float32, "f_")


def test_decomposed_graph_and_multi_program_archive(tmp_path):
    """After run_decompositions() no aten.lstm node is left: batch_first is
    unknown and defaults to False.  package_pt2 with two programs: stacks are
    named '<model>.<fqn>'."""
    from torch.export.pt2_archive._package import package_pt2

    torch.manual_seed(6)
    lstm = torch.nn.LSTM(3, 4, batch_first=True).eval()
    x = _input(lstm)
    ep = torch.export.export(lstm, (torch.from_numpy(x),))
    path = tmp_path / "decomposed.pt2"
    torch.export.save(ep.run_decompositions(), str(path))
    [(_, info)] = fastlstm.list_stacks(path)
    assert "batch_first" not in info
    assert not fastlstm.load(path).batch_first
    _check(fastlstm.load(path, batch_first=True), _flat(_torch_run(lstm, x)), x, np.float32,
           "decomposed")
    other = torch.nn.LSTM(4, 2).eval()
    ep2 = torch.export.export(other, (torch.randn(5, 2, 4),))
    path = tmp_path / "multi.pt2"
    package_pt2(str(path), exported_programs={"enc": ep, "dec": ep2})
    found = dict(fastlstm.list_stacks(path))
    assert {k: v["batch_first"] for k, v in found.items()} == {"enc": True, "dec": False}
    _check(fastlstm.load(path, name="enc"), _flat(_torch_run(lstm, x)), x, np.float32, "enc")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(marker):
    return pickle.dumps(_Evil(marker))


def test_no_torch_and_no_pickle_needed(tmp_path):
    """Loading imports no torch, and the archive's pickles (sample inputs)
    are never unpickled: an os.system pickle there is not run."""
    lstm = torch.nn.LSTM(3, 4)
    path = tmp_path / "m.pt2"
    _export(lstm, _input(lstm), path)
    marker = tmp_path / "pwned"
    blob = _rewrite(path.read_bytes(), {"data/sample_inputs/model.pt": _evil_pickle(marker)})
    path.write_bytes(blob)
    code = (f"import sys, fastlstm; m = fastlstm.load({str(path)!r}); "
            f"fastlstm.list_stacks({str(path)!r}); assert 'torch' not in sys.modules, 'torch'; "
            f"print(m.hidden_size)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "4" and not marker.exists()


def test_detection(tmp_path):
    lstm = torch.nn.LSTM(3, 4)
    path = tmp_path / "m.pt2"
    _export(lstm, _input(lstm), path)
    saved = tmp_path / "m.pt"
    torch.save(lstm.state_dict(), str(saved))
    assert not _torch_sniff(Probe(path))  # a .pt2 has no <root>/data.pkl
    assert detect_format(saved) == "torch" and not _pt2_sniff(Probe(saved))
    with pytest.raises(fastlstm.FormatError, match="data.pkl"):
        fastlstm.load(path, format="torch")
    with pytest.raises(fastlstm.FormatError, match="not a torch.export archive"):
        fastlstm.load(saved, format="torch-export")
    with pytest.raises(fastlstm.FormatError, match="corrupt zip archive"):
        fastlstm.load(_write(tmp_path, b"\0" * 64), format="torch-export")
    # an archive with archive_format but no ExportedProgram (as AOTInductor packages)
    aoti = _rewrite(path.read_bytes(), {"models/model.json": None})
    with pytest.raises(fastlstm.FormatError, match="PT2 archive without an ExportedProgram"):
        fastlstm.load(_write(tmp_path, aoti))
    with pt2.ExportFile(path.read_bytes()) as f:  # bytes work too
        assert sorted(f.obj) == sorted(lstm.state_dict())


# ------------------------------------------------------- crafted archives
def _write(tmp_path, blob, name="crafted.pt2"):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def _rewrite(blob, edits, compress=()):
    """A copy of archive `blob` with records replaced (name under the root ->
    bytes, None deletes, new names are added) and `compress` deflated."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as zin, zipfile.ZipFile(out, "w") as zout:
        root = zin.namelist()[0].split("/")[0] + "/"
        names = [n[len(root):] for n in zin.namelist()]
        for n in names + [e for e in edits if e not in names]:
            data = edits[n] if n in edits else zin.read(root + n)
            if data is not None:
                zout.writestr(root + n, data, compress_type=zipfile.ZIP_DEFLATED
                              if n in compress else zipfile.ZIP_STORED)
    return out.getvalue()


def _records(blob):
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        root = z.namelist()[0].split("/")[0] + "/"
        return {n[len(root):]: z.read(n) for n in z.namelist()}


_WEIGHTS = "data/weights/model_weights_config.json"
_MODEL = "models/model.json"


def _edit_json(blob, record, fn):
    obj = json.loads(_records(blob)[record])
    fn(obj)
    return _rewrite(blob, {record: json.dumps(obj).encode()})


def _meta(key):
    return lambda fn: (lambda cfg: fn(cfg["config"][key]["tensor_meta"]))


def _lstm_node(model):
    return next(n for n in model["graph_module"]["graph"]["nodes"]
                if n["target"] == "torch.ops.aten.lstm.input")


def _set_arg(name, value):
    def fn(model):
        for i in _lstm_node(model)["inputs"]:
            if i["name"] == name:
                i["arg"] = value
    return fn


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-layer bidirectional batch_first LSTM with a head, as torch saves it."""
    torch.manual_seed(7)
    net = _WithHead(torch.nn.LSTM(4, 3, num_layers=2, bidirectional=True, batch_first=True))
    path = tmp_path_factory.mktemp("pt2") / "base.pt2"
    _export(net, _input(net.lstm), path)
    return path.read_bytes()


W0 = "lstm.weight_ih_l0"


def _crafted(base):
    ih = _meta(W0)
    return [
        (_rewrite(base, {_MODEL: b"{not json"}), "models/model.json is not valid JSON"),
        (_rewrite(base, {_MODEL: b"\xff\xfe{}"}), "not valid JSON"),
        (_rewrite(base, {_MODEL: b"[" * 300 + b"]" * 300}), "nested deeper than 200"),
        (_rewrite(base, {_MODEL: b"[" * 100000 + b"]" * 100000}), "not valid JSON"),
        (_rewrite(base, {_MODEL: b"[]"}), "not a JSON object"),
        (_rewrite(base, {_WEIGHTS: b'{"config": []}'}), "expected 'config' of type dict"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m["sizes"][0].update(as_int=1000))),
         "'lstm.weight_ih_l0': tensor view .* exceeds its storage of 48 elements"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m["sizes"][0].update(as_int=-12))),
         "non-negative"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m["sizes"][0].update(as_int=2 ** 62))),
         "exceeds its storage"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m["sizes"][1].update(as_int=10 ** 30))),
         "exceeds its storage"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m["sizes"].__setitem__(0, {"as_expr": "s0"}))),
         "expected 'as_int' of type int"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m["strides"].pop())), "differ in length"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m["storage_offset"].update(as_int=-1))),
         "bad storage offset"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m["storage_offset"].update(as_int=40))),
         "exceeds its storage"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m.update(dtype=99))), "unknown dtype 99"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m.update(dtype="float32"))),
         "expected 'dtype' of type int"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m.update(dtype=True))),
         "expected 'dtype' of type int"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m.update(dtype=8))),  # float64: 24 of them
         "exceeds its storage of 24 elements"),
        (_edit_json(base, _WEIGHTS, ih(lambda m: m.update(layout=1))), "not strided"),
        (_edit_json(base, _WEIGHTS, lambda c: c["config"][W0].update(path_name="../x")),
         "bad record name"),
        (_edit_json(base, _WEIGHTS, lambda c: c["config"][W0].update(path_name="weight_99")),
         "record 'data/weights/weight_99' missing"),
        (_rewrite(base, {"data/weights/weight_0": None}), "missing from the archive"),
        (_rewrite(base, {"data/weights/weight_0": b"\0" * 190}), "not a whole number"),
        (_rewrite(base, {}, compress={"data/weights/weight_0"}), "weight_0' is compressed"),
        (_rewrite(base, {}, compress={_MODEL}), "model.json' is compressed"),
        (_rewrite(base, {_WEIGHTS: None}), "model_weights_config.json' missing"),
        (_rewrite(base, {_WEIGHTS: None, "data/weights/model.pt": b"PK"}), "legacy PT2"),
        (_rewrite(base, {"archive_format": b"zip"}), "archive_format is not 'pt2'"),
        (_rewrite(base, {"archive_version": b"7"}), "archive_version '7' is not supported"),
        (_rewrite(base, {"byteorder": b"middle"}), "byteorder record is 'middle'"),
        (_edit_json(base, _MODEL, lambda m: m["graph_module"]["signature"].update(
            input_specs={})), "expected 'input_specs' of type list"),
        (_edit_json(base, _MODEL, _set_arg("num_layers", {"as_int": 1})),
         "graph node 'lstm' .*num_layers=1.* contradicts the weights of 'lstm' \\(2 layers"),
        (_edit_json(base, _MODEL, _set_arg("bidirectional", {"as_bool": False})),
         "contradicts the weights"),
        (_edit_json(base, _MODEL, _set_arg("has_biases", {"as_bool": False})),
         "contradicts the weights"),
        (_edit_json(base, _MODEL, lambda m: _lstm_node(m)["inputs"][2]["arg"][
            "as_tensors"].reverse()), "contradicts the weights"),
        (_edit_json(base, _MODEL, _set_arg("batch_first", {"as_int": 1})),
         "expected 'as_bool' of type bool"),
        (_edit_json(base, _MODEL, _set_arg("params", {"as_tensor": {"name": "x"}})),
         "expected 'as_tensors' of type list"),
    ]


def test_crafted_archives(base, tmp_path):
    fastlstm.load(_write(tmp_path, base))  # the untouched archive loads
    for i, (blob, msg) in enumerate(_crafted(base)):
        path = _write(tmp_path, blob, f"c{i}.pt2")
        for fn in (fastlstm.load, fastlstm.list_stacks):
            with pytest.raises(fastlstm.FormatError, match=msg) as err:
                fn(path)
            assert str(path) in str(err.value), (i, str(err.value))


def test_big_endian_records(base, tmp_path):
    """byteorder 'big': the weight records are read byte-swapped."""
    swapped = {n: np.frombuffer(v, "<f4").astype(">f4").tobytes()
               for n, v in _records(base).items() if n.startswith("data/weights/weight_")}
    blob = _rewrite(base, {**swapped, "byteorder": b"big"})
    want = fastlstm.load(_write(tmp_path, base, "little.pt2")).state_dict()
    got = fastlstm.load(_write(tmp_path, blob, "big.pt2")).state_dict()
    assert all(np.array_equal(got[k], v) for k, v in want.items())


def _central_entry(blob, name):
    """Offset of the central directory entry of record `name` (ends in)."""
    pos = 0
    while True:
        pos = blob.index(b"PK\x01\x02", pos + 1)
        n = int.from_bytes(blob[pos + 28:pos + 30], "little")
        if blob[pos + 46:pos + 46 + n].endswith(name.encode()):
            return pos


@pytest.mark.parametrize("field,value,msg", [
    (42, 2 ** 32 - 2, "beyond the archive"),          # local header offset past the end
    (20, 2 ** 31, "compressed|beyond the archive"),   # compressed size != file size
])
def test_record_offsets_past_the_end(base, tmp_path, field, value, msg):
    blob = bytearray(base)
    pos = _central_entry(blob, "data/weights/weight_0")
    blob[pos + field:pos + field + 4] = value.to_bytes(4, "little")
    if field == 20:
        blob[pos + 24:pos + 28] = value.to_bytes(4, "little")
    with pytest.raises(fastlstm.FormatError, match=msg):
        fastlstm.list_stacks(_write(tmp_path, bytes(blob)))


def test_expanded_views_claim_more_than_the_file(base, tmp_path):
    """Zero strides view one record as a huge weight: listed, refused before
    anything is allocated."""
    H, In = 2 ** 11, 2 ** 11

    def fn(cfg):
        for k, e in cfg["config"].items():
            if k.startswith("lstm."):
                sizes = ([4 * H] if "bias" in k else [4 * H, H] if "hh" in k else
                         [4 * H, In] if "ih_l0" in k else [4 * H, 2 * H])
                e["tensor_meta"]["sizes"] = [{"as_int": s} for s in sizes]
                e["tensor_meta"]["strides"] = [{"as_int": 0} for _ in sizes]
    path = _write(tmp_path, _edit_json(base, _WEIGHTS, fn))
    [(_, info)] = fastlstm.list_stacks(path)
    assert info["hidden_size"] == H
    with pytest.raises(fastlstm.FormatError, match="claim"):
        fastlstm.load(path)


def test_pickled_weights_are_listed_not_unpickled(base, tmp_path):
    marker = tmp_path / "pwned"
    blob = _edit_json(base, _WEIGHTS, lambda c: c["config"][W0].update(use_pickle=True))
    blob = _rewrite(blob, {"data/weights/weight_0": _evil_pickle(marker)})
    path = _write(tmp_path, blob)
    assert dict(fastlstm.list_stacks(path))["lstm"]["batch_first"] is True
    with pytest.raises(fastlstm.FormatError, match="pickled tensor"):
        fastlstm.load(path)
    assert not marker.exists()


def test_batch_first_disagreeing_nodes(tmp_path):
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.LSTM(3, 3)

        def forward(self, x):
            return self.a(self.a(x)[0])[0]

    net = Twice()
    path = tmp_path / "twice.pt2"
    _export(net, _input(net.a), path)
    assert fastlstm.list_stacks(path)[0][1]["batch_first"] is False

    def flip(model):
        node = [n for n in model["graph_module"]["graph"]["nodes"]
                if n["target"] == "torch.ops.aten.lstm.input"][1]
        next(i for i in node["inputs"] if i["name"] == "batch_first")["arg"]["as_bool"] = True
    path = _write(tmp_path, _edit_json(path.read_bytes(), _MODEL, flip))
    assert "batch_first" not in fastlstm.list_stacks(path)[0][1]
    with pytest.raises(fastlstm.FormatError, match="batch_first both True and False"):
        fastlstm.load(path)
    assert fastlstm.load(path, batch_first=True).batch_first


# ------------------------------------------------------------------ fuzzing
def _flip_text(rng, data):
    """JSON text with a few characters replaced by digits, signs or JSON
    punctuation (mostly digits of numbers: sizes, offsets, dtypes)."""
    data = bytearray(data)
    digits = [i for i, b in enumerate(data) if 48 <= b <= 57]
    for _ in range(int(rng.integers(1, 4))):
        pos = digits[int(rng.integers(len(digits)))] if rng.integers(4) else int(
            rng.integers(len(data)))
        chars = b'0123456789-9e.[]{},:"tf'
        data[pos] = chars[int(rng.integers(len(chars)))]
    return bytes(data)


def _mutate_json(rng, blob):
    """A random field of the weights config or of the lstm node set to a
    huge or wrongly typed value."""
    def bad():
        return [huge_int(rng), None, "x", True, [], {}, 1.5][int(rng.integers(7))]

    if rng.integers(2):
        def fn(cfg):
            entry = list(cfg["config"].values())[int(rng.integers(len(cfg["config"])))]
            meta = entry["tensor_meta"]
            field = ["sizes", "strides", "storage_offset", "dtype", "path_name", "use_pickle",
                     "layout"][int(rng.integers(7))]
            if field in ("sizes", "strides") and meta[field] and rng.integers(2):
                meta[field][int(rng.integers(len(meta[field])))]["as_int"] = bad()
            elif field == "storage_offset" and rng.integers(2):
                meta[field]["as_int"] = bad()
            elif field in ("path_name", "use_pickle"):
                entry[field] = bad()
            else:
                meta[field] = bad()
        return _edit_json(blob, _WEIGHTS, fn)

    def fn(model):
        node = _lstm_node(model)
        arg = node["inputs"][int(rng.integers(len(node["inputs"])))]
        if arg["name"] == "params" and rng.integers(2):
            ts = arg["arg"]["as_tensors"]
            rng.shuffle(ts)
            del ts[int(rng.integers(len(ts) + 1)):]
        else:
            value = arg["arg"]
            key = next(iter(value))
            value[key] = bad() if rng.integers(2) else not value[key] if isinstance(
                value[key], bool) else value[key]
    return _edit_json(blob, _MODEL, fn)


def test_fuzz_pt2_files(base, tmp_path):
    path = _write(tmp_path, base, "base.pt2")
    fastlstm.load(path)  # warm-up: imports and caches are not the file's doing
    records = _records(base)
    rng = np.random.default_rng(SEED + 41)
    fz_path = tmp_path / "fuzz.pt2"
    with Fuzzer() as fz:
        for i in range(iters(250)):
            kind = i % 5
            if kind == 0:
                blob = flip_bytes(rng, base)
            elif kind == 1:
                blob = truncate(rng, base)
            elif kind in (2, 3):
                record = _MODEL if kind == 2 else _WEIGHTS
                flip = flip_bytes if rng.integers(4) == 0 else _flip_text
                blob = _rewrite(base, {record: flip(rng, records[record])})
            else:
                blob = _mutate_json(rng, base)
            fz_path.write_bytes(blob)
            fz.attempt(lambda: fastlstm.load(fz_path, name="lstm"), len(blob),
                       f"iteration {i} kind {kind}")
            if i % 3 == 0:
                fz.attempt(lambda: fastlstm.list_stacks(fz_path), len(blob), f"list {i}")
    assert fz.outcomes["FormatError"] > 0 and fz.outcomes["ok"] > 0

"""fastlstm's own format (LSTM.save / fastlstm.load), format detection, the
format registry, and fuzzing of native files."""
import json
import struct

import numpy as np
import pytest

import fastlstm
import fastlstm.io as fio
from fastlstm.io import native
from fastlstm.io import safetensors as fst
from io_fuzzing import Fuzzer, flip_bytes, huge_int, iters, truncate, SEED

CONFIGS = [
    dict(),
    dict(num_layers=3, bidirectional=True, proj_size=2, batch_first=True),
    dict(bias=False, dtype=np.float64, dropout=0.25),
    dict(num_layers=2, peepholes=True, cell_clip=3.0),
    dict(activations=("hardsigmoid", "leakyrelu", "scaledtanh"),
         activation_alpha=(0.1, 0.02, 0.7), activation_beta=(0.6, None, 1.3), clip=2.5,
         input_forget=True, bidirectional=True, dtype=np.float64),
    dict(input_size=0),
]


def _model(cfg, seed=0):
    cfg = dict(cfg)
    In = cfg.pop("input_size", 5)
    m = fastlstm.LSTM(In, 6, seed=seed, **cfg)
    if m.peepholes:  # peepholes start at zero: give them values
        rng = np.random.default_rng(seed)
        m.load_state_dict({k: rng.standard_normal(v.shape) for k, v in m.state_dict().items()
                           if k.startswith("peephole_")}, strict=False)
    return m


def _same_model(a, b):
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "bidirectional", "proj_size", "dtype", "dropout"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.cell_options() == b.cell_options()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].tobytes() == sb[k].tobytes(), k


@pytest.mark.parametrize("cfg", CONFIGS)
def test_roundtrip_is_exact(tmp_path, cfg):
    m = _model(cfg)
    path = tmp_path / "m.fastlstm"
    m.save(path)
    m2 = fastlstm.load(path)
    _same_model(m, m2)
    x = np.random.default_rng(1).standard_normal(
        (3, 4, m.input_size) if m.batch_first else (4, 3, m.input_size))
    out, (h, c) = m(x)
    out2, (h2, c2) = m2(x)
    assert out.tobytes() == out2.tobytes() and h.tobytes() == h2.tobytes()
    assert c.tobytes() == c2.tobytes()
    [(name, info)] = fastlstm.list_stacks(path)
    assert name == "" and info["format"] == "fastlstm"
    assert info["num_layers"] == m.num_layers and info["dtype"] == m.dtype.name
    assert info["cell_options"]["activations"] == list(m.activations)
    assert (info["variant"] == "standard") == m.is_default_cell
    # saving the loaded model gives the same bytes
    m2.save(tmp_path / "again.fastlstm")
    assert (tmp_path / "again.fastlstm").read_bytes() == path.read_bytes()


def test_overrides_and_name(tmp_path):
    m = _model(dict(batch_first=True))
    path = tmp_path / "m.safetensors"
    m.save(path)
    assert fastlstm.load(path, batch_first=False, num_threads=1).batch_first is False
    m64 = fastlstm.load(path, dtype=np.float64)
    assert m64.dtype == np.float64
    assert np.array_equal(m64.state_dict()["weight_hh_l0"], m.state_dict()["weight_hh_l0"])
    with pytest.raises(fastlstm.DTypeError):
        fastlstm.load(path, dtype=np.int8)
    assert fastlstm.load(path, name="").hidden_size == 6
    with pytest.raises(fastlstm.FormatError, match="one stack"):
        fastlstm.load(path, name="encoder")


def test_readable_by_safetensors_package_and_numpy_only(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy")
    safetensors = pytest.importorskip("safetensors")
    m = _model(CONFIGS[1])
    path = tmp_path / "m.safetensors"
    m.save(path)
    tensors = st_np.load_file(str(path))
    for k, v in m.state_dict().items():
        assert np.array_equal(tensors[k], v)
    with safetensors.safe_open(str(path), "np") as f:
        meta = f.metadata()
    cfg = json.loads(meta["fastlstm"])
    assert cfg["format"] == "fastlstm" and cfg["version"] == 1
    assert cfg["hidden_size"] == 6 and cfg["proj_size"] == 2 and cfg["batch_first"] is True
    # the generic safetensors reader finds the same stack (minus the options)
    assert fst.load_file(path).keys() == m.state_dict().keys()


def test_torch_reads_the_weights(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    m = _model(dict(num_layers=2, bidirectional=True))
    path = tmp_path / "m.safetensors"
    m.save(path)
    mod = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True)
    mod.load_state_dict(st_torch.load_file(str(path)))
    x = np.random.default_rng(2).standard_normal((4, 2, 5)).astype(np.float32)
    with torch.no_grad():
        ro = mod(torch.from_numpy(x))[0].numpy()
    assert np.abs(m(x)[0] - ro).max() <= 1e-5


def _write_native(path, cfg, tensors):
    path.write_bytes(fst.save(tensors, metadata={"fastlstm": json.dumps(cfg)}))


@pytest.mark.parametrize("change,msg", [
    ({"version": native.FORMAT_VERSION + 1}, "newer fastlstm"),
    ({"version": "1"}, "version"),
    ({"format": "other"}, "format"),
    ({"hidden_size": 7}, "configuration needs"),
    ({"hidden_size": 0}, "out of range"),
    ({"hidden_size": 2 ** 40}, "too large"),
    ({"num_layers": 10 ** 9}, "too large"),
    ({"num_layers": -1}, "out of range"),
    ({"proj_size": 6}, "proj_size"),
    ({"dtype": "float16"}, "dtype"),
    ({"dtype": "float64"}, "is F32"),
    ({"bias": 1}, "wrong type"),
    ({"activations": ["sigmoid", "tanh"]}, "wrong type"),
    ({"activations": ["sigmoid", "tanh", "nope"]}, "unknown activation"),
    ({"dropout": 2.0}, "dropout"),
    ({"clip": -1.0}, "clip"),
    ({"peepholes": True}, "missing"),
    ({"bidirectional": True}, "missing"),
])
def test_bad_configurations(tmp_path, change, msg):
    m = _model({})
    cfg = {**native.model_config(m), **change}
    path = tmp_path / "bad.safetensors"
    _write_native(path, cfg, m.state_dict())
    with pytest.raises(fastlstm.FormatError, match=msg):
        fastlstm.load(path)


def test_bad_metadata_json(tmp_path):
    m = _model({})
    path = tmp_path / "bad.safetensors"
    path.write_bytes(fst.save(m.state_dict(), metadata={"fastlstm": "{not json"}))
    with pytest.raises(fastlstm.FormatError, match="not valid JSON"):
        fastlstm.load(path)
    cfg = native.model_config(m)
    del cfg["proj_size"]
    _write_native(path, cfg, m.state_dict())
    with pytest.raises(fastlstm.FormatError, match="lacks 'proj_size'"):
        fastlstm.list_stacks(path)


def test_save_is_atomic_and_checks_type(tmp_path):
    with pytest.raises(TypeError):
        native.save_model("not a model", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ detection
def test_detection_by_content(tmp_path):
    m = _model({})
    for ext in ("pt", "onnx", "h5", "bin", ""):
        path = tmp_path / f"model.{ext}"
        m.save(path)
        assert fio.detect_format(path) == "fastlstm"
        _same_model(fastlstm.load(path), m)


@pytest.mark.parametrize("blob,msg", [
    (b"", "empty file"),
    (b"hello world, not weights", "unrecognised"),
    (b"\x89HDF\r\n\x1a\n" + b"\0" * 100, None),
    (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94.", "pickle"),
    (struct.pack("<Q", 10) + b"{" + b" " * 20, "safetensors"),
])
def test_unrecognised_files(tmp_path, blob, msg):
    path = tmp_path / "f.bin"
    path.write_bytes(blob)
    with pytest.raises(fastlstm.FormatError, match=msg):
        fastlstm.load(path)
    with pytest.raises(fastlstm.FormatError):
        fastlstm.list_stacks(path)


def test_directory(tmp_path):
    with pytest.raises(fastlstm.FormatError, match="directory"):
        fastlstm.load(tmp_path)


def test_keras_zip_without_keras_loader(tmp_path, monkeypatch):
    import zipfile
    monkeypatch.setattr(fio, "_FORMATS", {k: v for k, v in fio._FORMATS.items() if k != "keras"})
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("metadata.json", "{}")
        z.writestr("model.weights.h5", b"")
    with pytest.raises(fastlstm.FormatError, match="keras support not available"):
        fastlstm.load(path)


def test_register_format(tmp_path, monkeypatch):
    monkeypatch.setattr(fio, "_FORMATS", dict(fio._FORMATS))
    calls = []

    def sniff(probe):
        return probe.head.startswith(b"MYFMT")

    def list_stacks(path):
        return [("only", {"format": "mine"})]

    def load(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return fastlstm.LSTM(1, 2)

    fio.register_format("mine", sniff, list_stacks, load, priority=5)
    assert fio.formats().index("mine") < fio.formats().index("safetensors")
    path = tmp_path / "x.dat"
    path.write_bytes(b"MYFMT....")
    assert fio.detect_format(path) == "mine"
    assert fastlstm.list_stacks(path) == [("only", {"format": "mine"})]
    assert isinstance(fastlstm.load(path, name="only", dtype="x"), fastlstm.LSTM)
    assert calls == [(str(path), "only", {"dtype": "x"})]
    m = _model({})
    m.save(path)
    assert fio.detect_format(path) == "fastlstm"
    assert fastlstm.load(path, format="safetensors").hidden_size == 6  # forced format
    with pytest.raises(ValueError, match="unknown format"):
        fastlstm.load(path, format="nope")
    fio.unregister_format("mine")
    assert "mine" not in fio.formats()
    with pytest.raises(TypeError):
        fio.register_format("bad", None, list_stacks, load)


def test_public_names():
    assert fastlstm.load is fio.load and fastlstm.list_stacks is fio.list_stacks
    assert callable(fastlstm.LSTM.save)
    assert {"fastlstm", "safetensors", "torch"} <= set(fio.formats())


# ------------------------------------------------------------------ fuzzing
def _mutate_config(rng, m):
    cfg = native.model_config(m)
    key = list(cfg)[int(rng.integers(len(cfg)))]
    choices = [huge_int(rng), -1, 0, 1, 2, 0.5, float(huge_int(rng)), True, None, "x", [],
               ["sigmoid"] * 3, {}, [1e308, -1e308, 0.0]]
    cfg[key] = choices[int(rng.integers(len(choices)))]
    return fst.save(m.state_dict(), metadata={"fastlstm": json.dumps(cfg)})


def test_fuzz_native(tmp_path):
    m = _model(dict(num_layers=2, bidirectional=True, proj_size=2, peepholes=True))
    path = tmp_path / "m.fastlstm"
    m.save(path)
    base = path.read_bytes()
    fastlstm.load(path)  # warm-up
    rng = np.random.default_rng(SEED + 31)
    fz_path = tmp_path / "fuzz.fastlstm"
    n_header = 8 + struct.unpack("<Q", base[:8])[0]
    with Fuzzer() as fz:
        for i in range(iters(300)):
            kind = i % 4
            if kind == 0:
                blob = _mutate_config(rng, m)
            elif kind == 1:
                blob = flip_bytes(rng, base, 0, n_header)
            elif kind == 2:
                blob = truncate(rng, base)
            else:
                blob = flip_bytes(rng, base)
            fz_path.write_bytes(blob)
            fz.attempt(lambda: fastlstm.load(fz_path), len(blob), f"iteration {i} kind {kind}")
            fz.attempt(lambda: fastlstm.list_stacks(fz_path), len(blob), f"list {i}")
    assert fz.outcomes["FormatError"] > 0 and fz.outcomes["ok"] > 0

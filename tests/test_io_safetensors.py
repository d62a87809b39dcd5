"""safetensors read/write with NumPy alone (fastlstm.io.safetensors), against
the `safetensors` package and torch, plus validation and fuzz tests."""
import json
import struct

import numpy as np
import pytest

import fastlstm
from fastlstm.io import safetensors as fst
from io_fuzzing import Fuzzer, flip_bytes, huge_int, iters, truncate, SEED
from tolerances import assert_close

ALL_DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.float16, np.int32,
              np.uint32, np.float32, np.int64, np.uint64, np.float64, np.complex64]


def _sample(rng, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for k, dt in enumerate(ALL_DTYPES):
        shape = [(), (0,), (3,), (2, 5), (4, 0, 3), (2, 3, 4)][k % 6]
        out[f"t{k}.{np.dtype(dt).name}"] = _sample(rng, dt, shape)
    out["noncontig"] = np.arange(60, dtype=np.float32).reshape(6, 10)[::2, ::3]
    out["fortran"] = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    out["bigendian"] = np.arange(5, dtype=">i4")
    return out


def _assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        w = np.asarray(want[k])
        assert got[k].shape == w.shape, k
        assert got[k].dtype == w.dtype.newbyteorder("="), k
        assert np.array_equal(got[k], w), k


# ------------------------------------------------------------------ round trips
def test_roundtrip_every_dtype(tmp_path):
    tensors = _tensors()
    path = tmp_path / "t.safetensors"
    fst.save_file(tensors, path, metadata={"a": "b", "format": "np"})
    _assert_same(fst.load_file(path), tensors)
    assert fst.read_metadata(path) == {"a": "b", "format": "np"}
    _assert_same(fst.load(fst.save(tensors)), tensors)
    assert path.read_bytes() == fst.save(tensors, metadata={"a": "b", "format": "np"})
    with fst.SafetensorsFile(path) as f:
        assert f.info("t8.float32").logical_dtype == "float32"
        assert (f.data_start % 8) == 0  # header padded: data aligned


def test_empty_file_and_no_metadata(tmp_path):
    path = tmp_path / "e.safetensors"
    fst.save_file({}, path)
    assert fst.load_file(path) == {}
    assert fst.read_metadata(path) is None


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(TypeError):
        fst.save({"x": np.array(["a"])})
    with pytest.raises(TypeError):
        fst.save({"x": np.zeros(2)}, metadata={"a": 1})
    with pytest.raises(ValueError):
        fst.save({"__metadata__": np.zeros(2)})


def test_package_reads_our_files(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy")
    tensors = _tensors(1)
    path = tmp_path / "ours.safetensors"
    fst.save_file(tensors, path, metadata={"k": "v"})
    _assert_same(st_np.load_file(str(path)), tensors)
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(path), "np") as f:
        assert f.metadata() == {"k": "v"}


def test_we_read_package_files(tmp_path):
    st_np = pytest.importorskip("safetensors.numpy")
    tensors = {k: v for k, v in _tensors(2).items() if v.dtype.kind != "c"}
    tensors = {k: np.ascontiguousarray(v, v.dtype.newbyteorder("=")) for k, v in tensors.items()}
    path = tmp_path / "theirs.safetensors"
    st_np.save_file(tensors, str(path), metadata={"x": "y"})
    _assert_same(fst.load_file(path), tensors)
    assert fst.read_metadata(path) == {"x": "y"}


def test_bf16_and_f16_from_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    t = {"bf": torch.randn(7, 3, generator=g).to(torch.bfloat16),
         "h": torch.randn(4, generator=g).half(), "d": torch.randn(2, 2, generator=g).double(),
         "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
         "special": torch.tensor([float("inf"), -0.0, float("nan"), 1e-40]).to(torch.bfloat16)}
    path = tmp_path / "t.safetensors"
    st_torch.save_file(t, str(path))
    got = fst.load_file(path)
    assert got["bf"].dtype == np.float32
    assert np.array_equal(got["bf"], t["bf"].float().numpy())
    sp = t["special"].float().numpy()
    assert np.array_equal(got["special"], sp, equal_nan=True)
    assert np.signbit(got["special"][1])
    assert got["h"].dtype == np.float16 and np.array_equal(got["h"], t["h"].numpy())
    assert np.array_equal(got["d"], t["d"].numpy()) and np.array_equal(got["i"], t["i"].numpy())


# ------------------------------------------------------------- LSTMs in files
def _torch_out(mod, x):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out, (h, c) = mod(torch.from_numpy(x))
    return out.numpy(), h.numpy(), c.numpy()


@pytest.mark.parametrize("cfg", [
    dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=3), dict(bias=False),
    dict(num_layers=3, bidirectional=True, proj_size=2, batch_first=True)])
@pytest.mark.parametrize("wdtype", ["float32", "float64", "float16", "bfloat16"])
def test_lstm_from_safetensors_matches_torch(tmp_path, cfg, wdtype):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    mod = torch.nn.LSTM(5, 6, **cfg).to(getattr(torch, wdtype))
    path = tmp_path / "lstm.safetensors"
    st_torch.save_file(mod.state_dict(), str(path))
    ref = mod.double() if wdtype == "float64" else mod.float()
    stacks = fastlstm.list_stacks(path)
    assert len(stacks) == 1 and stacks[0][0] == ""
    info = stacks[0][1]
    assert info["format"] == "safetensors" and info["dtype"] == wdtype
    assert info["num_layers"] == cfg.get("num_layers", 1)
    assert info["num_directions"] == (2 if cfg.get("bidirectional") else 1)
    assert info["proj_size"] == cfg.get("proj_size", 0) and info["bias"] == cfg.get("bias", True)
    m = fastlstm.load(path, batch_first=cfg.get("batch_first", False))
    dt = np.float64 if wdtype == "float64" else np.float32
    assert m.dtype == dt
    x = np.random.default_rng(2).standard_normal((4, 3, 5)).astype(dt)
    out, (h, c) = m(x)
    ro, rh, rc = _torch_out(ref, x)
    assert_close(out, ro, dt, "out")
    assert_close(h, rh, dt, "h_n")
    assert_close(c, rc, dt, "c_n")


def test_prefixed_model_and_cell_in_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(3)
    net = torch.nn.ModuleDict({
        "encoder": torch.nn.ModuleDict({"lstm": torch.nn.LSTM(4, 5, num_layers=2)}),
        "decoder": torch.nn.LSTM(5, 3, bidirectional=True),
        "cell": torch.nn.LSTMCell(4, 6), "gru": torch.nn.GRU(4, 5), "rnncell": torch.nn.RNNCell(4, 4),
        "head": torch.nn.Linear(5, 2)})
    path = tmp_path / "net.safetensors"
    st_torch.save_file(net.state_dict(), str(path))
    names = [n for n, _ in fastlstm.list_stacks(path)]
    assert names == ["cell", "decoder", "encoder.lstm"]
    with pytest.raises(fastlstm.FormatError, match="encoder.lstm"):
        fastlstm.load(path)
    with pytest.raises(fastlstm.FormatError, match="no LSTM stack named 'gru'"):
        fastlstm.load(path, name="gru")
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    m = fastlstm.load(path, name="encoder.lstm")
    out, (h, c) = m(x)
    ro, rh, rc = _torch_out(net["encoder"]["lstm"], x)
    assert_close(out, ro, np.float32, "encoder out")
    assert fastlstm.load(path, name="lstm").num_layers == 2  # unique dotted suffix
    cell = fastlstm.load(path, name="cell")
    with torch.no_grad():
        h1, c1 = net["cell"](torch.from_numpy(x[0]))
    out, (h, c) = cell(x[:1])
    assert_close(h[0], h1.numpy(), np.float32, "cell h")
    assert_close(c[0], c1.numpy(), np.float32, "cell c")


def test_no_lstm_explains(tmp_path):
    path = tmp_path / "gru.safetensors"
    fst.save_file({"weight_ih_l0": np.zeros((12, 3), np.float32),
                   "weight_hh_l0": np.zeros((12, 4), np.float32)}, path)
    with pytest.raises(fastlstm.FormatError, match="not .*LSTM"):
        fastlstm.load(path)
    assert fastlstm.list_stacks(path) == []


# ------------------------------------------------------------- validation
def _raw(header, data=b"", pad=True):
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(h)) + h + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "I16", "shape": [1, 2], "data_offsets": [8, 12]}}


@pytest.mark.parametrize("blob,msg", [
    (b"", "shorter than"),
    (b"\x05\x00\x00", "shorter than"),
    (struct.pack("<Q", 2 ** 63) + b"{}", "100 MB"),
    (struct.pack("<Q", 100 * 2 ** 20 + 1) + b"{}", "100 MB"),
    (struct.pack("<Q", 50) + b"{}", "exceeds the file size"),
    (struct.pack("<Q", 0), "too small"),
    (_raw(b"[1, 2]"), "start with"),
    (_raw(b"{\"a\": 1"), "not valid JSON"),
    (_raw(b"{\xff}"), "UTF-8"),
    (_raw(b"[" * 100000), "start with"),
    (_raw(b"{\"a\":" + b"[" * 100000), "JSON"),
    (_raw(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
          b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4), "duplicate"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "trailing"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "outside"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlaps"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gap"),
    (_raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "needs 12"),
    (_raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "non-negative"),
    (_raw({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, b"\0" * 8), "integers"),
    (_raw({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8), "integers"),
    (_raw({"a": {"dtype": "F32", "shape": [0, 2 ** 62], "data_offsets": [0, 0]}}), "too large"),
    (_raw({"a": {"dtype": "F32", "shape": [2 ** 64, 2 ** 64, 0], "data_offsets": [0, 0]}}), "too large"),
    (_raw({"a": {"dtype": "F32", "shape": [1] * 33, "data_offsets": [0, 4]}}, b"\0" * 4), "at most"),
    (_raw({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    (_raw({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), "data_offsets"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 4), "begin, end"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4), "outside"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "outside"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"x": 1}},
          b"\0" * 4), "__metadata__"),
    (_raw({"a": [1]}), "not an object"),
    (_raw(b'{"a": NaN}'), "non-finite"),
    (_raw(b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 4]}}'),
     "JSON"),
])
def test_malformed_headers(blob, msg):
    with pytest.raises(fastlstm.FormatError, match=msg):
        fst.load(blob)


def test_float8_listed_but_not_read():
    blob = _raw({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]},
                 "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\1\2\3\4")
    f = fst.SafetensorsFile(blob)
    assert f.info("a").shape == (2,)
    assert list(f.get("b")) == [3, 4]
    with pytest.raises(fastlstm.FormatError, match="NumPy cannot"):
        f.get("a")


def test_detect_by_content_not_extension(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "weights.pt"  # misleading extension
    st_torch.save_file(torch.nn.LSTM(2, 3).state_dict(), str(path))
    assert fastlstm.io.detect_format(path) == "safetensors"
    assert fastlstm.load(path).hidden_size == 3


# ------------------------------------------------------------------ fuzzing
def _base_file():
    rng = np.random.default_rng(7)
    sd = {"enc.weight_ih_l0": rng.standard_normal((16, 3)).astype(np.float32),
          "enc.weight_hh_l0": rng.standard_normal((16, 4)).astype(np.float32),
          "enc.bias_ih_l0": rng.standard_normal(16).astype(np.float16),
          "enc.bias_hh_l0": rng.standard_normal(16).astype(np.float64),
          "enc.weight_ih_l0_reverse": rng.standard_normal((16, 3)).astype(np.float32),
          "enc.weight_hh_l0_reverse": rng.standard_normal((16, 4)).astype(np.float32),
          "enc.bias_ih_l0_reverse": rng.standard_normal(16).astype(np.float32),
          "enc.bias_hh_l0_reverse": rng.standard_normal(16).astype(np.float32),
          "steps": np.arange(3, dtype=np.int64)}
    return fst.save(sd, metadata={"note": "fuzz"})


def _mutate_header(rng, blob):
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    entry = header[names[int(rng.integers(len(names)))]]
    what = int(rng.integers(0, 8))
    if what == 0:
        entry["data_offsets"][int(rng.integers(2))] = huge_int(rng)
    elif what == 1:
        other = header[names[int(rng.integers(len(names)))]]
        entry["data_offsets"] = list(other["data_offsets"])  # overlap
    elif what == 2:
        if entry["shape"]:
            entry["shape"][int(rng.integers(len(entry["shape"])))] = huge_int(rng)
        else:
            entry["shape"] = [huge_int(rng)]
    elif what == 3:
        entry["shape"] = entry["shape"] + [0, huge_int(rng)]
    elif what == 4:
        entry["dtype"] = str(rng.choice(["F32", "F64", "BF16", "F16", "I64", "BOOL", "F8_E5M2",
                                         "X", "", "f32"]))
    elif what == 5:
        entry["shape"] = [int(d) for d in rng.integers(-3, 40, int(rng.integers(0, 4)))]
    elif what == 6:
        choices = [None, {"a": 1}, [], "x", {"fastlstm": "{}"},
                   {"fastlstm": '{"format": "fastlstm", "version": 1}'}]
        header["__metadata__"] = choices[int(rng.integers(len(choices)))]
    else:
        choices = [None, "3", 3.5, [[1]], {}, True]
        key = ["dtype", "shape", "data_offsets"][int(rng.integers(3))]
        entry[key] = choices[int(rng.integers(len(choices)))]
    raw = json.dumps(header).encode()
    size_field = len(raw) if rng.integers(4) else huge_int(rng) % 2 ** 64
    return struct.pack("<Q", size_field) + raw + data


def test_fuzz_safetensors(tmp_path):
    base = _base_file()
    rng = np.random.default_rng(SEED + 11)
    path = tmp_path / "fuzz.safetensors"
    # warm-up: imports and caches are not the file's doing
    path.write_bytes(base)
    fastlstm.load(path)
    with Fuzzer() as fz:
        for i in range(iters(400)):
            kind = i % 5
            if kind == 0:
                blob = flip_bytes(rng, base)
            elif kind == 1:
                blob = flip_bytes(rng, base, 0, 8 + struct.unpack("<Q", base[:8])[0])
            elif kind == 2:
                blob = truncate(rng, base)
            elif kind == 3:
                blob = _mutate_header(rng, base)
            else:
                blob = struct.pack("<Q", huge_int(rng) % 2 ** 64) + base[8:]
            path.write_bytes(blob)
            fz.attempt(lambda: fastlstm.load(path), len(blob), f"iteration {i} kind {kind}")
            fz.attempt(lambda: fastlstm.list_stacks(path), len(blob), f"list {i}")
            fz.attempt(lambda: fst.load(blob), len(blob), f"fst.load {i}")
    assert fz.outcomes["FormatError"] > 0

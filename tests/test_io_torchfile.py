"""torch.save files read without torch (fastlstm.io.torchfile): LSTMs saved by
torch itself in every configuration, nested checkpoints, shared storages and
strided views, the restricted unpickler (no code from a file ever runs), and
fuzzing of damaged archives and pickles."""
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

import fastlstm
from fastlstm.io import TorchFile, from_torch_cell, load_torch
from io_fuzzing import Fuzzer, flip_bytes, huge_int, iters, truncate, SEED
from tolerances import assert_close

torch = pytest.importorskip("torch", reason="torch writes the files under test")


def _run_torch(mod, x, batch_first=False):
    with torch.no_grad():
        out, (h, c) = mod(torch.from_numpy(x))
    return out.numpy(), h.numpy(), c.numpy()


def _check_same(m, mod, dtype=np.float32, T=4, N=3, what=""):
    In = m.input_size
    shape = (N, T, In) if m.batch_first else (T, N, In)
    x = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    out, (h, c) = m(x)
    ro, rh, rc = _run_torch(mod, x)
    assert_close(out, ro, dtype, what + " out")
    assert_close(h, rh, dtype, what + " h_n")
    assert_close(c, rc, dtype, what + " c_n")


def _save(obj, path):
    torch.save(obj, str(path))
    return path


# ------------------------------------------------------------ torch.save files
CONFIGS = [dict(), dict(num_layers=2), dict(bidirectional=True),
           dict(num_layers=2, bidirectional=True, proj_size=2), dict(proj_size=3),
           dict(bias=False, num_layers=2), dict(batch_first=True, bidirectional=True)]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("wdtype", ["float32", "float64", "float16", "bfloat16"])
def test_state_dict_matches_torch(tmp_path, cfg, wdtype):
    torch.manual_seed(0)
    mod = torch.nn.LSTM(5, 6, **cfg).to(getattr(torch, wdtype))
    path = _save(mod.state_dict(), tmp_path / "m.pt")
    ref = mod.double() if wdtype == "float64" else mod.float()
    [(name, info)] = fastlstm.list_stacks(path)
    assert name == "" and info["format"] == "torch" and info["kind"] == "LSTM"
    assert info["dtype"] == wdtype and info["hidden_size"] == 6 and info["input_size"] == 5
    assert info["num_layers"] == cfg.get("num_layers", 1)
    assert info["bidirectional"] == cfg.get("bidirectional", False)
    assert info["proj_size"] == cfg.get("proj_size", 0)
    assert info["bias"] == cfg.get("bias", True)
    m = fastlstm.load(path, batch_first=cfg.get("batch_first", False))
    dt = np.float64 if wdtype == "float64" else np.float32
    assert m.dtype == dt
    _check_same(m, ref, dt, what=f"{cfg} {wdtype}")
    # the same weights as torch.load gives
    sd = torch.load(str(path), weights_only=True)
    for k, v in m.state_dict().items():
        assert np.array_equal(v, sd[k].to(torch.float64 if dt == np.float64 else torch.float32)
                              .numpy()), k


def test_dtype_override_and_unbatched(tmp_path):
    torch.manual_seed(1)
    mod = torch.nn.LSTM(3, 4).double()
    path = _save(mod.state_dict(), tmp_path / "m.pth")
    m = fastlstm.load(path, dtype=np.float32)
    assert m.dtype == np.float32
    x = np.random.default_rng(0).standard_normal((5, 3))
    out, (h, c) = m(x)
    with torch.no_grad():
        ro, (rh, rc) = mod(torch.from_numpy(x))
    assert_close(out, ro.numpy(), np.float32, "unbatched out")


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.encoder = torch.nn.Module()
        self.encoder.lstm = torch.nn.LSTM(4, 5, num_layers=2, bidirectional=True)
        self.decoder = torch.nn.LSTM(10, 3, proj_size=2)
        self.cell = torch.nn.LSTMCell(3, 4)
        self.gru = torch.nn.GRU(4, 5)
        self.head = torch.nn.Linear(5, 2)


@pytest.mark.parametrize("wrap", ["flat", "model_state_dict", "state_dict", "model", "deep",
                                  "list", "dataparallel"])
def test_nested_checkpoints_and_prefixes(tmp_path, wrap):
    torch.manual_seed(2)
    net = _Net()
    opt = torch.optim.Adam(net.parameters())
    loss = net.head(net.encoder.lstm(net.embed(torch.tensor([[1, 2]])))[0][..., :5]).sum()
    loss.backward()
    opt.step()
    sd = net.state_dict()
    if wrap == "flat":
        obj, prefix = sd, ""
    elif wrap == "deep":
        obj, prefix = {"run": {"best": {"weights": sd}}, "epoch": 3}, "run.best.weights."
    elif wrap == "list":
        obj, prefix = {"models": [sd]}, "models.0."
    elif wrap == "dataparallel":
        obj, prefix = {"module." + k: v for k, v in sd.items()}, "module."
    else:
        obj = {wrap: sd, "optimizer_state_dict": opt.state_dict(), "epoch": 7, "loss": 0.25,
               "acc": np.float64(0.5), "steps": np.int64(12), "shape": torch.Size([2, 3]),
               "tags": {"a", "b"}, "blob": b"\x00\xffbytes", "ratio": complex(1, 2),
               "dev": torch.device("cpu"), "half": torch.float16, "args": ("x", 1, None)}
        prefix = wrap + "."
    path = _save(obj, tmp_path / "ckpt.pt")
    stacks = dict(fastlstm.list_stacks(path))
    assert sorted(stacks) == sorted(prefix + n for n in ("cell", "decoder", "encoder.lstm"))
    enc = stacks[prefix + "encoder.lstm"]
    assert (enc["num_layers"], enc["num_directions"], enc["hidden_size"]) == (2, 2, 5)
    assert stacks[prefix + "decoder"]["proj_size"] == 2
    assert stacks[prefix + "cell"]["kind"] == "LSTMCell"
    with pytest.raises(fastlstm.FormatError, match="pass name= one of"):
        fastlstm.load(path)
    _check_same(fastlstm.load(path, name=prefix + "encoder.lstm"), net.encoder.lstm, what=wrap)
    _check_same(fastlstm.load(path, name="decoder"), net.decoder, what=wrap)  # dotted suffix
    cell = fastlstm.load(path, name="cell")
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    with torch.no_grad():
        h1, c1 = net.cell(torch.from_numpy(x))
    out, (h, c) = cell(x[None])
    assert_close(h[0], h1.numpy(), np.float32, "cell h")
    assert_close(c[0], c1.numpy(), np.float32, "cell c")
    with pytest.raises(fastlstm.FormatError, match="no LSTM stack named"):
        fastlstm.load(path, name="gru")
    if wrap not in ("flat", "dataparallel", "deep", "list"):
        got = load_torch(path)
        assert got["epoch"] == 7 and got["loss"] == 0.25 and got["acc"] == 0.5
        assert got["steps"] == 12 and got["shape"] == (2, 3) and got["tags"] == {"a", "b"}
        assert got["blob"] == b"\x00\xffbytes" and got["ratio"] == complex(1, 2)
        assert got["args"] == ("x", 1, None)
        state = got["optimizer_state_dict"]["state"]
        want = opt.state_dict()["state"]
        assert np.array_equal(state[0]["exp_avg"], want[0]["exp_avg"].numpy())


def test_parameters_saved_as_parameters(tmp_path):
    torch.manual_seed(3)
    mod = torch.nn.LSTM(3, 4, num_layers=2)
    path = _save({"lstm." + k: v for k, v in mod.named_parameters()}, tmp_path / "p.pt")
    _check_same(fastlstm.load(path, name="lstm"), mod, what="parameters")
    path = _save(mod, tmp_path / "module.pt")  # a pickled module: refused, not run
    with pytest.raises(fastlstm.FormatError, match="refused to load global torch.nn"):
        fastlstm.load(path)


def test_shared_storage_and_strided_views(tmp_path):
    """Weights as views into one flat buffer (as cuDNN's flatten_parameters
    leaves them), transposed, sliced with steps and offsets."""
    torch.manual_seed(4)
    mod = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    sd = mod.state_dict()
    total = sum(v.numel() for v in sd.values())
    flat = torch.zeros(total + 7)
    shared, pos = {}, 7
    for k, v in sd.items():
        view = flat[pos:pos + v.numel()].view(v.shape)
        view.copy_(v)
        shared[k] = view
        pos += v.numel()
    odd = {}
    for k, v in sd.items():
        if v.dim() == 2:
            big = torch.randn(v.shape[1] * 2, v.shape[0] * 3)
            big[::2, 1::3] = v.t()
            odd[k] = big[::2, 1::3].t()  # strides (3, 2 * rows * 3), offset 1
            assert not odd[k].is_contiguous()
        else:
            big = torch.randn(v.numel() * 2 + 1)
            big[1::2] = v
            odd[k] = big[1::2]
    for variant in (shared, odd):
        path = _save(variant, tmp_path / "views.pt")
        with zipfile.ZipFile(path) as z:
            n_storages = sum("/data/" in n for n in z.namelist())
        assert n_storages == (1 if variant is shared else len(sd))
        _check_same(fastlstm.load(path), mod, what="views")
        got = load_torch(path)
        for k, v in variant.items():
            assert np.array_equal(got[k], v.numpy()), k
            assert not got[k].flags.writeable


def test_lstm_cell_state_dict_and_live_cell(tmp_path):
    torch.manual_seed(5)
    cell = torch.nn.LSTMCell(4, 3)
    path = _save(cell.state_dict(), tmp_path / "cell.pt")
    [(name, info)] = fastlstm.list_stacks(path)
    assert name == "" and info["kind"] == "LSTMCell" and info["num_layers"] == 1
    x = np.random.default_rng(2).standard_normal((6, 2, 4)).astype(np.float32)
    h = torch.zeros(2, 3)
    c = torch.zeros(2, 3)
    outs = []
    with torch.no_grad():
        for t in range(6):
            h, c = cell(torch.from_numpy(x[t]), (h, c))
            outs.append(h.numpy())
    for m in (fastlstm.load(path), from_torch_cell(cell)):
        out, (hn, cn) = m(x)
        assert_close(out, np.stack(outs), np.float32, "cell sequence")
        assert_close(cn[0], c.numpy(), np.float32, "cell c")
    nobias = torch.nn.LSTMCell(4, 3, bias=False)
    assert not from_torch_cell(nobias).bias
    with pytest.raises(TypeError):
        from_torch_cell(torch.nn.GRUCell(4, 3))
    sd = {"rnn.weight_ih": cell.weight_ih, "rnn.weight_hh": cell.weight_hh}
    assert fastlstm.io.from_state_dict(sd).bias is False


def test_from_state_dict_in_memory():
    torch.manual_seed(6)
    net = _Net()
    m = fastlstm.io.from_state_dict({"ckpt": net.state_dict()}, name="encoder.lstm")
    _check_same(m, net.encoder.lstm, what="in memory")


# ------------------------------------------------------- crafted archives
def _op(value):
    """Pickle opcodes pushing `value` (protocol 2, without PROTO and STOP)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _tensor_op(stype, key, numel, offset, size, stride, fn=b"_rebuild_tensor_v2"):
    return (b"ctorch._utils\n" + fn + b"\n((" + _op("storage") + b"ctorch\n" + stype + b"\n"
            + _op(key) + _op("cpu") + _op(numel) + b"tQ" + _op(offset) + _op(tuple(size))
            + _op(tuple(stride)) + b"\x89ccollections\nOrderedDict\n)RtR")


def _dict_pickle(entries):
    """entries: name -> tensor opcodes (or any opcodes)."""
    body = b"".join(_op(k) + v for k, v in entries.items())
    return b"\x80\x02}(" + body + b"u."


def _archive(pkl, storages=(), name="archive", byteorder=b"little", compress=None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", pkl, compress_type=compress or zipfile.ZIP_STORED)
        if byteorder is not None:
            z.writestr(f"{name}/byteorder", byteorder)
        for k, v in dict(storages).items():
            z.writestr(f"{name}/data/{k}", v)
        z.writestr(f"{name}/version", b"3\n")
    return buf.getvalue()


def _lstm_archive(H=2, In=3, byteorder="little"):
    rng = np.random.default_rng(0)
    w = {"weight_ih_l0": rng.standard_normal((4 * H, In)).astype(np.float32),
         "weight_hh_l0": rng.standard_normal((4 * H, H)).astype(np.float32)}
    flat = np.concatenate([w["weight_ih_l0"].ravel(), w["weight_hh_l0"].ravel()])
    raw = flat.astype(">f4" if byteorder == "big" else "<f4").tobytes()
    n_ih = 4 * H * In
    pkl = _dict_pickle({
        "weight_ih_l0": _tensor_op(b"FloatStorage", "0", flat.size, 0, (4 * H, In), (In, 1)),
        "weight_hh_l0": _tensor_op(b"FloatStorage", "0", flat.size, n_ih, (4 * H, H), (H, 1))})
    return _archive(pkl, {"0": raw}, byteorder=byteorder.encode()), w


def test_crafted_archive_agrees_with_torch_load():
    blob, w = _lstm_archive()
    want = torch.load(io.BytesIO(blob), weights_only=True)
    got = load_torch(blob)
    for k in w:
        assert np.array_equal(got[k], want[k].numpy()) and np.array_equal(got[k], w[k])


def test_big_endian_archive(tmp_path):
    blob, w = _lstm_archive(byteorder="big")
    got = load_torch(blob)
    for k in w:
        assert np.array_equal(got[k], w[k])
    path = tmp_path / "be.pt"
    path.write_bytes(blob)
    assert np.array_equal(fastlstm.load(path).state_dict()["weight_hh_l0"], w["weight_hh_l0"])


def test_untyped_storage_v3_dtypes(tmp_path):
    t = {"u16": torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
         "u32": torch.tensor(range(6), dtype=torch.int64).to(torch.uint32)[::2],
         "i8": torch.arange(-3, 3, dtype=torch.int8), "b": torch.tensor([True, False]),
         "c": torch.randn(3, dtype=torch.complex64), "scalar": torch.tensor(2.5),
         "empty": torch.zeros(0, 3)}
    path = _save(t, tmp_path / "dtypes.pt")
    got = load_torch(path)
    for k, v in t.items():
        assert np.array_equal(got[k], v.numpy()), k
        assert got[k].shape == tuple(v.shape)


@pytest.mark.parametrize("blob,msg", [
    (_archive(_dict_pickle({"w": _tensor_op(b"FloatStorage", "0", 10, 0, (2,), (1,))}),
              {"0": b"\0" * 8}), "holds 8 bytes"),
    (_archive(_dict_pickle({"w": _tensor_op(b"FloatStorage", "0", 2, 1, (2,), (1,))}),
              {"0": b"\0" * 8}), "exceeds its storage"),
    (_archive(_dict_pickle({"w": _tensor_op(b"FloatStorage", "0", 2, 0, (2, 2), (1,))}),
              {"0": b"\0" * 8}), "differ in length"),
    (_archive(_dict_pickle({"w": _tensor_op(b"FloatStorage", "0", 2, -1, (1,), (1,))}),
              {"0": b"\0" * 8}), "offset"),
    (_archive(_dict_pickle({"w": _tensor_op(b"FloatStorage", "0", -2, 0, (1,), (1,))}),
              {"0": b"\0" * 8}), "storage size"),
    (_archive(_dict_pickle({"w": _tensor_op(b"FloatStorage", "0", 2, 0, (2,), (1,))}), {}),
     "missing"),
    (_archive(_dict_pickle({"w": _tensor_op(b"FloatStorage", "0", 2, 0, (2,), (1,)),
                            "v": _tensor_op(b"LongStorage", "0", 2, 0, (2,), (1,))}),
              {"0": b"\0" * 16}), "used as both"),
    (_archive(_dict_pickle({"w": _tensor_op(b"QInt8Storage", "0", 2, 0, (2,), (1,))}),
              {"0": b"\0" * 2}), "refused to load global torch.QInt8Storage"),
    (_archive(b"\x80\x02}q\x00.", byteorder=b"middle"), "byteorder"),
    (_archive(b"\x80\x02}q\x00.", compress=zipfile.ZIP_DEFLATED), "compressed"),
    (_archive(b"\x80\x02}q\x00"), "corrupt pickle"),
    (_archive(b"\x80\x02K\x01r\xff\xff\xff\x7f."), "memo index"),
    (_archive(b"\x80\x04\x8e" + (2 ** 40).to_bytes(8, "little") + b"ab."), "corrupt pickle"),
    (_archive(b"\x80\x04\x8d" + (2 ** 40).to_bytes(8, "little") + b"ab."), "corrupt pickle"),
    (_archive(b"\x80\x04\x95" + (2 ** 40).to_bytes(8, "little") + b"N."), "corrupt pickle"),
    (_archive(b"\x80\x02\x8a\x08" + b"\xff" * 8 + b"."), None),  # a big int is fine
    (b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19" + b"." * 10, "legacy"),
    (b"PK\x03\x04" + b"\0" * 40, "corrupt zip"),
    (b"\0" * 100, "not a torch.save zip"),
])
def test_malformed_archives(blob, msg):
    if msg is None:
        load_torch(blob)
        return
    with pytest.raises(fastlstm.FormatError, match=msg):
        TorchFile(blob).materialize()


def test_deep_nesting_is_bounded():
    depth = 50000
    pkl = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    with pytest.raises(fastlstm.FormatError, match="nested too deeply"):
        load_torch(_archive(pkl))


def test_expanded_views_cannot_inflate_memory(tmp_path):
    """A 1-element storage viewed with stride 0 as a huge weight: listing is
    free, loading is refused before anything is allocated."""
    H, In = 2 ** 11, 2 ** 11
    pkl = _dict_pickle({
        "weight_ih_l0": _tensor_op(b"FloatStorage", "0", 1, 0, (4 * H, In), (0, 0)),
        "weight_hh_l0": _tensor_op(b"FloatStorage", "0", 1, 0, (4 * H, H), (0, 0))})
    path = tmp_path / "expand.pt"
    path.write_bytes(_archive(pkl, {"0": b"\0" * 4}))
    [(_, info)] = fastlstm.list_stacks(path)
    assert info["hidden_size"] == H
    with pytest.raises(fastlstm.FormatError, match="claim"):
        fastlstm.load(path)
    view = load_torch(path)["weight_ih_l0"]  # a broadcast view, not a copy
    assert view.shape == (4 * H, In) and view.strides == (0, 0)


def test_not_torch_files(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.nn.LSTM(2, 3).state_dict(), str(legacy), _use_new_zipfile_serialization=False)
    with pytest.raises(fastlstm.FormatError, match="legacy torch.save"):
        fastlstm.load(legacy)
    with pytest.raises(fastlstm.FormatError, match="legacy"):
        TorchFile(legacy)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(fastlstm.FormatError, match="pickle"):
        fastlstm.load(plain)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(fastlstm.FormatError, match="empty"):
        fastlstm.load(empty)


# ------------------------------------------------------ no code from a file
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _u(text):
    """SHORT_BINUNICODE opcode."""
    return b"\x8c" + bytes([len(text)]) + text.encode()


def _evil_pickles(marker):
    cmd = f"touch {marker}".encode()
    s = _op(cmd.decode())
    return {
        "os.system": b"\x80\x02cos\nsystem\n(" + s + b"tR.",
        "posix.system": b"\x80\x02cposix\nsystem\n(" + s + b"tR.",
        "builtins.eval": b"\x80\x02c__builtin__\neval\n(" + _op(f"__import__('os').system('touch {marker}')") + b"tR.",
        "builtins.exec": b"\x80\x02cbuiltins\nexec\n(" + _op(f"import os; os.system('touch {marker}')") + b"tR.",
        "builtins.getattr": b"\x80\x02cbuiltins\ngetattr\n(cos\nsystem\n)tR.",
        "subprocess.Popen": b"\x80\x02csubprocess\nPopen\n(" + _op(["touch", str(marker)]) + b"tR.",
        "os.system inst": b"\x80\x02(" + s + b"ios\nsystem\n.",
        "os.system stack_global": b"\x80\x04" + _u("os") + _u("system") + b"\x93(" + s + b"tR.",
        "torch.load": b"\x80\x02ctorch\nload\n(" + s + b"tR.",
        "numpy._reconstruct": b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n)R.",
        "dotted": b"\x80\x04" + _u("torch._utils") + _u("_rebuild_tensor_v2.__globals__") + b"\x93.",
        "copyreg": b"\x80\x02ccopy_reg\n_reconstructor\n)R.",
        "ext": b"\x80\x02\x82\x01.",
    }


@pytest.mark.parametrize("kind", list(_evil_pickles("/x")))
def test_refuses_to_run_code(tmp_path, kind):
    marker = tmp_path / "pwned"
    pkl = _evil_pickles(marker)[kind]
    path = tmp_path / "evil.pt"
    path.write_bytes(_archive(pkl))
    with pytest.raises(fastlstm.FormatError) as err:
        fastlstm.load(path)
    assert not marker.exists()
    if kind in ("os.system", "posix.system", "builtins.eval", "subprocess.Popen", "torch.load"):
        assert kind in str(err.value) and "refused" in str(err.value)
    with pytest.raises(fastlstm.FormatError):
        load_torch(path)
    assert not marker.exists()


def test_refuses_os_system_saved_by_torch(tmp_path):
    marker = tmp_path / "pwned"
    mod = torch.nn.LSTM(2, 3)
    path = _save({"state_dict": mod.state_dict(), "hook": _Evil(marker)}, tmp_path / "evil.pt")
    with zipfile.ZipFile(path) as z:
        pkl = next(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    assert b"system" in pkl
    for fn in (fastlstm.load, fastlstm.list_stacks, load_torch):
        with pytest.raises(fastlstm.FormatError, match=r"refused to load global (os|posix)\.system"):
            fn(path)
    assert not marker.exists()


def test_stand_ins_cannot_be_modified():
    """BUILD on an allowed global (to plant attributes on fastlstm's own
    callables) fails instead of modifying them."""
    for pkl in (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}(X\x08\x00\x00\x00__call__K\x01ub.",
                b"\x80\x02ccollections\nOrderedDict\n}(X\x01\x00\x00\x00xK\x01ub.",
                b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}(X\x04\x00\x00\x00_fnK\x01u\x86b."):
        with pytest.raises(fastlstm.FormatError):
            load_torch(_archive(pkl))
    blob, w = _lstm_archive()
    assert np.array_equal(load_torch(blob)["weight_ih_l0"], w["weight_ih_l0"])


# ------------------------------------------------------------------ fuzzing
def _replace_pickle(blob, pkl):
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as zin, zipfile.ZipFile(out, "w") as zout:
        for zi in zin.infolist():
            data = pkl if zi.filename.endswith("data.pkl") else zin.read(zi)
            zout.writestr(zi.filename, data)
    return out.getvalue()


def _random_tensor_archive(rng):
    n = int(rng.integers(0, 64))
    stype = [b"FloatStorage", b"HalfStorage", b"BFloat16Storage", b"DoubleStorage",
             b"LongStorage", b"BoolStorage"][int(rng.integers(6))]
    pick = lambda good: huge_int(rng) if rng.integers(4) == 0 else good  # noqa: E731
    H = int(rng.integers(1, 4))
    numel = pick(4 * H * 3 + 4 * H * H)
    entries = {
        "lstm.weight_ih_l0": _tensor_op(stype, "0", numel, pick(0), (pick(4 * H), pick(3)),
                                        (pick(3), pick(1))),
        "lstm.weight_hh_l0": _tensor_op(stype, "0", numel, pick(12 * H), (4 * H, pick(H)),
                                        (pick(H), 1), fn=[b"_rebuild_tensor_v2",
                                                          b"_rebuild_tensor"][int(rng.integers(2))]),
    }
    return _archive(_dict_pickle(entries), {"0": bytes(rng.integers(0, 256, n * 8, np.uint8))})


def test_fuzz_torch_files(tmp_path):
    torch.manual_seed(9)
    mod = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    path = tmp_path / "base.pt"
    torch.save({"model_state_dict": mod.state_dict(), "epoch": 1}, str(path))
    base = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        pkl = next(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    fastlstm.load(path)  # warm-up: imports and caches are not the file's doing
    rng = np.random.default_rng(SEED + 23)
    fz_path = tmp_path / "fuzz.pt"
    with Fuzzer() as fz:
        for i in range(iters(300)):
            kind = i % 6
            if kind == 0:
                blob = flip_bytes(rng, base)
            elif kind == 1:
                blob = truncate(rng, base)
            elif kind == 2:
                blob = _replace_pickle(base, flip_bytes(rng, pkl))
            elif kind == 3:
                blob = _replace_pickle(base, truncate(rng, pkl))
            elif kind == 4:
                cut = int(rng.integers(2, len(pkl)))
                junk = bytes(rng.integers(0, 256, int(rng.integers(1, 12)), np.uint8))
                blob = _replace_pickle(base, pkl[:cut] + junk + pkl[cut:])
            else:
                blob = _random_tensor_archive(rng)
            fz_path.write_bytes(blob)
            fz.attempt(lambda: fastlstm.load(fz_path, name="lstm") if kind == 5
                       else fastlstm.load(fz_path), len(blob), f"iteration {i} kind {kind}")
            if i % 3 == 0:
                fz.attempt(lambda: load_torch(blob), len(blob), f"load_torch {i}")
    assert fz.outcomes["FormatError"] > 0 and fz.outcomes["ok"] > 0

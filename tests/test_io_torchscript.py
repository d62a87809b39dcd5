"""TorchScript archives (torch.jit.save of scripted and traced modules) read
without torch: the LSTMs found under their attribute paths, the configuration
the archive's code records (batch_first above all, which a state dict cannot
tell), checked against torch running the same archive; and what such a file
may not do (run code, claim classes it is not, inflate memory)."""
import io
import zipfile

import numpy as np
import pytest

import fastlstm
from fastlstm.io import TorchFile, load_torch
from fastlstm.io.torchfile import ScriptObject
from io_fuzzing import Fuzzer, SEED, flip_bytes, iters, truncate
from tolerances import assert_close

torch = pytest.importorskip("torch", reason="torch writes the TorchScript archives under test")


class _Net(torch.nn.Module):
    """Embedding -> LSTM -> Linear, the shape of a typical tagging model."""

    def __init__(self, **lstm):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 5)
        self.lstm = torch.nn.LSTM(5, 6, **lstm)
        D = 2 if lstm.get("bidirectional") else 1
        self.fc = torch.nn.Linear(D * (lstm.get("proj_size") or 6), 3)

    def forward(self, tokens):
        y, _ = self.lstm(self.emb(tokens))
        return self.fc(y)


def _tokens(batch_first, T=5, N=3):
    shape = (N, T) if batch_first else (T, N)
    return np.random.default_rng(1).integers(0, 7, shape)


def _save(net, how, tokens, path, dtype=torch.float32):
    torch.manual_seed(0)
    net = net.to(dtype).eval()
    with torch.no_grad():
        mod = (torch.jit.script(net) if how == "script"
               else torch.jit.trace(net, (torch.from_numpy(tokens),)))
    mod.save(str(path))
    return net


def _rewrite(path, name_suffix, edit):
    """The archive at path with one record's bytes passed through edit."""
    out = io.BytesIO()
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(out, "w") as zout:
        hit = False
        for zi in zin.infolist():
            data = zin.read(zi)
            if zi.filename.endswith(name_suffix):
                data, hit = edit(data), True
            zout.writestr(zi, data)
    assert hit, name_suffix
    return out.getvalue()


CONFIGS = [dict(batch_first=True, num_layers=2, bidirectional=True), dict(),
           dict(batch_first=True, proj_size=2), dict(bias=False, num_layers=2)]


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_matches_torch_running_the_archive(tmp_path, how, cfg):
    bf = cfg.get("batch_first", False)
    tokens = _tokens(bf)
    path = tmp_path / f"{how}.pt"
    net = _save(_Net(**cfg), how, tokens, path)

    [(name, info)] = fastlstm.list_stacks(path)
    assert name == "lstm" and info["torchscript"] == "__torch__.torch.nn.modules.rnn.LSTM"
    assert info["batch_first"] is bf  # from the archive's code, not a default
    m = fastlstm.load(path)
    assert m.batch_first is bf
    assert (m.num_layers, m.bidirectional, m.proj_size, m.bias) == (
        cfg.get("num_layers", 1), cfg.get("bidirectional", False), cfg.get("proj_size", 0),
        cfg.get("bias", True))

    # the whole network from the archive's arrays, against torch running it
    parts = load_torch(path)
    assert set(parts) >= {"emb", "lstm", "fc"}
    x = parts["emb"]["weight"][tokens]
    y, _ = m(x)
    got = y @ parts["fc"]["weight"].T + parts["fc"]["bias"]
    with torch.no_grad():
        want = torch.jit.load(str(path))(torch.from_numpy(tokens)).numpy()
        lstm_want = net.lstm(torch.from_numpy(x))[0].numpy()
    assert_close(got, want, np.float32, f"{how} {cfg} network")
    assert_close(y, lstm_want, np.float32, f"{how} {cfg} lstm")


@pytest.mark.parametrize("how", ["script", "trace"])
def test_network_from_the_archive(tmp_path, how):
    """Embedding, LSTM and head of a TorchScript archive as one Network."""
    tokens = _tokens(True)
    path = tmp_path / f"{how}.pt"
    _save(_Net(batch_first=True, num_layers=2, bidirectional=True), how, tokens, path)
    net = fastlstm.Network.from_state_dict(path, lstm="lstm", embedding="emb", head="fc")
    with torch.no_grad():
        want = torch.jit.load(str(path))(torch.from_numpy(tokens)).numpy()
    assert_close(net(tokens), want, np.float32, f"{how} Network")


def test_bare_lstm_cell_float64_and_override(tmp_path):
    torch.manual_seed(2)
    lstm = torch.nn.LSTM(3, 4, batch_first=True).double().eval()
    path = tmp_path / "bare.pt"
    torch.jit.script(lstm).save(str(path))
    m = fastlstm.load(path)  # the root module: the stack named ''
    assert m.batch_first and m.dtype == np.float64
    x = np.random.default_rng(3).standard_normal((2, 5, 3))
    with torch.no_grad():  # (a scripted nn.LSTM has no forward of its own to call)
        ro, (rh, rc) = lstm(torch.from_numpy(x))
    out, (h, c) = m(x)
    assert_close(out, ro.numpy(), np.float64, "bare scripted LSTM")
    assert_close(h, rh.numpy(), np.float64, "h_n")
    assert_close(c, rc.numpy(), np.float64, "c_n")
    # an explicit batch_first is the caller's array layout and wins
    m2 = fastlstm.load(path, batch_first=False, dtype=np.float32)
    assert not m2.batch_first and m2.dtype == np.float32
    assert_close(m2(x.transpose(1, 0, 2))[0].transpose(1, 0, 2), ro.numpy(), np.float32,
                 "batch_first=False override")

    cell = torch.nn.LSTMCell(3, 4).eval()
    cpath = tmp_path / "cell.pt"
    torch.jit.script(cell).save(str(cpath))
    [(name, info)] = fastlstm.list_stacks(cpath)
    assert info["kind"] == "LSTMCell" and "batch_first" not in info
    mc = fastlstm.load(cpath)
    xc = np.random.default_rng(4).standard_normal((2, 3)).astype(np.float32)
    with torch.no_grad():
        h1, c1 = torch.jit.load(str(cpath))(torch.from_numpy(xc))
    _, (h, c) = mc(xc[None])
    assert_close(h[0], h1.numpy(), np.float32, "scripted LSTMCell h")
    assert_close(c[0], c1.numpy(), np.float32, "scripted LSTMCell c")

    # the modules torch.jit.load returns, converted live: the same weights
    loaded = torch.jit.load(str(path))
    live = fastlstm.LSTM.from_torch(loaded)
    assert live.batch_first and np.array_equal(live(x)[0], m(x)[0])
    live_cell = fastlstm.io.from_torch_cell(torch.jit.load(str(cpath)))
    assert np.array_equal(live_cell(xc[None])[0], mc(xc[None])[0])
    for c in (cell, torch.jit.load(str(cpath))):
        with pytest.raises(TypeError, match=r"expected a torch\.nn\.LSTM.*from_torch_cell"):
            fastlstm.LSTM.from_torch(c)


def test_several_lstms_by_name(tmp_path):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.LSTM(4, 3, batch_first=True)
            self.dec = torch.nn.LSTM(3, 5, proj_size=2)

        def forward(self, x):
            y, _ = self.enc(x)
            z, _ = self.dec(y.transpose(0, 1))
            return z

    path = tmp_path / "two.pt"
    torch.manual_seed(5)
    net = Two().eval()
    torch.jit.script(net).save(str(path))
    info = dict(fastlstm.list_stacks(path))
    assert info["enc"]["batch_first"] is True and info["dec"]["batch_first"] is False
    assert info["dec"]["torchscript"] == "__torch__.torch.nn.modules.rnn.LSTM"  # demangled
    with pytest.raises(fastlstm.FormatError, match="pass name="):
        fastlstm.load(path)
    x = np.random.default_rng(6).standard_normal((2, 4, 4)).astype(np.float32)
    enc, dec = fastlstm.load(path, name="enc"), fastlstm.load(path, name="dec")
    z = dec(enc(x)[0].transpose(1, 0, 2))[0]
    with torch.no_grad():
        want = torch.jit.load(str(path))(torch.from_numpy(x)).numpy()
    assert_close(z, want, np.float32, "encoder + decoder")


def _code_record(path, module="lstm"):
    """The code record of the module's class (torch mangles the class names
    of modules scripted earlier in the process with other settings)."""
    with TorchFile(path) as f:
        qualname = f.script_paths[module]
    return "code/" + qualname.rpartition(".")[0].replace(".", "/") + ".py"


def _hidden_edit(old, new):
    return lambda text: text.replace(old.encode(), new.encode())


def test_code_that_contradicts_the_weights_is_refused(tmp_path):
    path = tmp_path / "ts.pt"
    _save(_Net(batch_first=True), "script", _tokens(True), path)
    blob = _rewrite(path, _code_record(path),
                    _hidden_edit("hidden_size : Final[int] = 6", "hidden_size : Final[int] = 7"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(blob)
    with pytest.raises(fastlstm.FormatError, match=r"hidden_size=7.*hidden_size=6"):
        fastlstm.load(bad)
    blob = _rewrite(path, _code_record(path),
                    _hidden_edit('mode : Final[str] = "LSTM"', 'mode : Final[str] = "GRU"'))
    bad.write_bytes(blob)
    with pytest.raises(fastlstm.FormatError, match="TorchScript GRU, not an LSTM"):
        fastlstm.list_stacks(bad)


def test_code_is_never_run(tmp_path):
    """A constant that is an expression is ignored, not evaluated."""
    marker = tmp_path / "pwned"
    path = tmp_path / "ts.pt"
    _save(_Net(batch_first=True), "script", _tokens(True), path)
    evil = f"batch_first : Final[bool] = __import__('os').system('touch {marker}') or True"
    blob = _rewrite(path, _code_record(path),
                    _hidden_edit("batch_first : Final[bool] = True", evil))
    bad = tmp_path / "evil.pt"
    bad.write_bytes(blob)
    [(_, info)] = fastlstm.list_stacks(bad)
    m = fastlstm.load(bad)
    assert "batch_first" not in info and m.batch_first is False  # the state-dict default
    assert not marker.exists()


def _pickle_archive(pkl, code=True):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("a/data.pkl", pkl)
        z.writestr("a/byteorder", b"little")
        if code:
            z.writestr("a/code/__torch__.py", b"class M(Module):\n  pass\n",
                       compress_type=zipfile.ZIP_DEFLATED)
            z.writestr("a/constants.pkl", b"\x80\x02).")
    return out.getvalue()


def test_script_objects_are_names_only(tmp_path):
    ok = b"\x80\x02c__torch__\nM\n)\x81}(X\x01\x00\x00\x00xK\x01ub."
    obj = load_torch(_pickle_archive(ok))
    assert obj == {"x": 1}
    with TorchFile(_pickle_archive(ok)) as f:
        assert f.torchscript and f.script_paths == {"": "__torch__.M"}
    # the same global in a plain torch.save archive (no code/): refused
    with pytest.raises(fastlstm.FormatError, match=r"refused to load global __torch__\.M"):
        load_torch(_pickle_archive(ok, code=False))
    for pkl, msg in [
        (b"\x80\x02c__torch__\nM\n(K\x01t\x81.", "built with arguments"),  # NEWOBJ with args
        (b"\x80\x02c__torch__\nM\n(K\x01tR.", "built with arguments"),     # REDUCE
        (b"\x80\x02c__torch__\nM\n)R.", "called like a function"),
        (b"\x80\x02c__torch__\nM\n)\x81}b}b.", "state set twice"),
        (b"\x80\x02c__torch__\nM.__init__\n)R.", "refused to load global"),
        (b"\x80\x02c__torch__.os;x\nsystem\n)R.", "refused to load global"),
        (b"\x80\x02cos\nsystem\n(X\x02\x00\x00\x00idtR.", r"refused to load global os\.system"),
    ]:
        with pytest.raises(fastlstm.FormatError, match=msg):
            load_torch(_pickle_archive(pkl))
    # the stand-in's class is fastlstm's, whatever the file names it
    from fastlstm.io.torchfile import _RestrictedUnpickler
    cls = _RestrictedUnpickler(io.BytesIO(b""), "x", script=True).find_class("__torch__.a", "B")
    assert issubclass(cls, ScriptObject) and cls.__module__ == ScriptObject.__module__


def test_quantized_modules_are_refused_by_name(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 3)

        def forward(self, x):
            return self.lstm(x)[0]

    q = torch.ao.quantization.quantize_dynamic(M().eval(), {torch.nn.LSTM}, dtype=torch.qint8)
    path = tmp_path / "q.pt"
    torch.jit.script(q).save(str(path))
    with pytest.raises(fastlstm.FormatError, match=r"quantized tensors.*weights='int8'"):
        fastlstm.load(path)


def test_code_records_cannot_inflate_memory(tmp_path):
    path = tmp_path / "ts.pt"
    torch.jit.script(torch.nn.LSTM(2, 3)).save(str(path))
    bomb = _rewrite(path, _code_record(path, ""),
                    lambda text: text + b" " * (40 << 20))
    assert len(bomb) < (1 << 20)  # deflate: 40 MB of spaces in ~40 KB
    bad = tmp_path / "bomb.pt"
    bad.write_bytes(bomb)
    with pytest.raises(fastlstm.FormatError, match="too large"):
        fastlstm.load(bad)


def test_fuzz_torchscript_archives(tmp_path):
    path = tmp_path / "base.pt"
    _save(_Net(batch_first=True, num_layers=2), "script", _tokens(True), path)
    base = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        pkl = next(z.read(n) for n in z.namelist() if n.endswith("/data.pkl"))
        code_name = next(n for n in z.namelist() if n.endswith(_code_record(path)))
        code = z.read(code_name)
    fastlstm.load(path)  # warm-up: imports and caches are not the file's doing
    rng = np.random.default_rng(SEED + 41)
    fz_path = tmp_path / "fuzz.pt"
    with Fuzzer() as fz:
        for i in range(iters(120)):
            kind = i % 4
            if kind == 0:
                blob = flip_bytes(rng, base)
            elif kind == 1:
                blob = truncate(rng, base)
            elif kind == 2:
                blob = _rewrite(path, "/data.pkl", lambda _: flip_bytes(rng, pkl))
            else:
                blob = _rewrite(path, code_name, lambda _: flip_bytes(rng, code))
            fz_path.write_bytes(blob)
            fz.attempt(lambda: fastlstm.load(fz_path), len(blob), f"iteration {i} kind {kind}")
    assert fz.outcomes["FormatError"] > 0 and fz.outcomes["ok"] > 0

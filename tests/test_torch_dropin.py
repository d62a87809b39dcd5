"""fastlstm.torch: the nn.LSTM drop-in (tensors, PackedSequence, hx,
batch_first, unbatched, convert, refusals), and variable-length batches
against ONNX Runtime's sequence_lens and Keras masking."""
import copy
import io
import os
import subprocess
import sys

import numpy as np
import pytest

import fastlstm
from tolerances import assert_close

torch = pytest.importorskip("torch")
nn = torch.nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import fastlstm.torch as ft  # noqa: E402

F32, F64 = np.float32, np.float64


def _np(t):
    return t.detach().numpy()


def _close(got, want, dtype=F32, what=""):
    assert_close(_np(got), _np(want), dtype, what)


# ------------------------------------------------------------------ import
def test_importing_fastlstm_does_not_import_torch():
    code = ("import sys, fastlstm, numpy as np; fastlstm.LSTM(2, 3)(np.zeros((2, 2)));"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_clear_import_error_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import fastlstm.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                         capture_output=True, text=True).stdout
    assert "fastlstm.torch needs PyTorch" in out and "install torch" in out


# -------------------------------------------------------------- real model
class Tagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM over a packed batch -> Linear."""

    def __init__(self, vocab=50, emb=12, hidden=20, classes=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb, padding_idx=0)
        self.encoder = nn.LSTM(emb, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.emb(tokens), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, (h, c) = self.encoder(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return self.head(out), h, c


def _tokens(rng, N, T, vocab=50):
    lens = rng.integers(1, T + 1, size=N)
    lens[0], lens[1] = 1, T  # the extremes
    rng.shuffle(lens)
    tok = rng.integers(1, vocab, size=(N, T))
    tok[np.arange(T)[None, :] >= lens[:, None]] = 0
    return torch.from_numpy(tok), torch.from_numpy(lens)


@pytest.mark.parametrize("seed", range(3))
def test_convert_real_model_same_outputs(seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Tagger().eval().requires_grad_(False)
    tok, lens = _tokens(rng, 9, 13)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        want = model(tok, lens)
    assert ft.convert(model) is model
    assert type(model.encoder) is ft.LSTM and isinstance(model.encoder, nn.LSTM)
    assert "fastlstm.torch.LSTM" in repr(model)
    got = model(tok, lens)  # no torch.no_grad() needed once frozen
    for g, w, name in zip(got, want, ("logits", "h_n", "c_n")):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert not g.requires_grad
        _close(g, w, what=name)
    # the state dict (names and values) and parameter count are unchanged
    sd = model.state_dict()
    assert list(sd) == list(sd_before)
    assert all(torch.equal(sd[k], sd_before[k]) for k in sd)
    assert sum(p.numel() for p in model.parameters()) == params_before


def test_convert_under_no_grad_and_detach():
    torch.manual_seed(0)
    model = Tagger().eval()  # parameters require grad (the default)
    tok, lens = _tokens(np.random.default_rng(0), 4, 6)
    with torch.no_grad():
        want = model(tok, lens)[0]
        ft.convert(model)
        _close(model(tok, lens)[0], want)
    # outside no_grad the embedding's output requires grad: refused ...
    with pytest.raises(ft.UnsupportedError, match="input.data: requires grad"):
        model(tok, lens)
    # ... unless gradients may stop at the LSTM
    model2 = Tagger().eval()
    model2.load_state_dict(model.state_dict())
    ft.convert(model2, detach=True)
    out = model2(tok, lens)[0]
    _close(out, want)
    assert out.requires_grad  # the head after the LSTM still tracks its own parameters
    out.sum().backward()
    assert model2.head.weight.grad is not None and model2.emb.weight.grad is None


def test_convert_shared_nested_and_idempotent():
    lstm = nn.LSTM(3, 4)
    model = nn.Sequential(nn.ModuleDict({"a": lstm}), nn.ModuleList([lstm])).eval()
    with torch.no_grad():
        ft.convert(model)
    a, b = model[0]["a"], model[1][0]
    assert a is b and type(a) is ft.LSTM
    assert ft.convert(model)[0]["a"] is a  # already converted: kept
    # an nn.LSTM itself: a new module is returned
    with torch.no_grad():
        single = ft.convert(nn.LSTM(3, 4).eval())
    assert type(single) is ft.LSTM


# ------------------------------------------------------- PackedSequence
@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("proj, module_batch_first", [(0, False), (3, False), (0, True)])
def test_packed_sequence_in_and_out(enforce_sorted, with_hx, proj, module_batch_first):
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    T, N, In, H = 11, 6, 5, 9
    ref = nn.LSTM(In, H, num_layers=2, bidirectional=True, proj_size=proj,
                  batch_first=module_batch_first).eval()  # batch_first: ignored when packed
    with torch.no_grad():
        m = ft.LSTM.from_lstm(ref)
    lens = rng.integers(1, T + 1, size=N)
    lens[2], lens[4] = 1, T
    if enforce_sorted:
        lens = -np.sort(-lens)
    x = torch.randn(N, T, In)
    packed = pack_padded_sequence(x, torch.from_numpy(lens), batch_first=True,
                                  enforce_sorted=enforce_sorted)
    hx = None
    if with_hx:
        hx = (torch.randn(4, N, proj or H), torch.randn(4, N, H))
    with torch.no_grad():
        want, (wh, wc) = ref(packed, hx)
    got, (gh, gc) = m(packed, hx)
    assert type(got) is type(want)
    assert torch.equal(got.batch_sizes, want.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None and w is None) or torch.equal(g, w), name
    assert got.data.shape == want.data.shape
    _close(got.data, want.data, what="data")
    _close(gh, wh, what="h_n")
    _close(gc, wc, what="c_n")
    # padded back, zeros past each end like torch
    gp, gl = pad_packed_sequence(got)
    wp, wl = pad_packed_sequence(want)
    assert torch.equal(gl, wl)
    _close(gp, wp)


# ----------------------------------------------------------------- tensors
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_forms(batch_first, dtype):
    torch.manual_seed(2)
    ref = nn.LSTM(4, 7, num_layers=2, batch_first=batch_first, proj_size=3).to(dtype).eval()
    with torch.no_grad():
        m = ft.LSTM.from_lstm(ref)
    npd = F32 if dtype == torch.float32 else F64
    T, N = 8, 3
    x = torch.randn((N, T, 4) if batch_first else (T, N, 4), dtype=dtype)
    hx = (torch.randn(2, N, 3, dtype=dtype), torch.randn(2, N, 7, dtype=dtype))
    with torch.no_grad():
        for args in ((x,), (x, hx), (x[0] if batch_first else x[:, 0],),
                     (x[:, 1:3] if not batch_first else x[1:3],)):
            want = ref(*args)
            got = m(*args)
            assert got[0].shape == want[0].shape and got[0].dtype == dtype
            _close(got[0], want[0], npd, "out")
            _close(got[1][0], want[1][0], npd, "h_n")
            _close(got[1][1], want[1][1], npd, "c_n")
        # unbatched with 2-D hx
        xu = torch.randn(T, 4, dtype=dtype)
        hu = (hx[0][:, 0], hx[1][:, 0])
        want, got = ref(xu, hu), m(xu, hu)
        assert got[1][0].shape == want[1][0].shape == (2, 3)
        _close(got[0], want[0], npd)
        _close(got[1][1], want[1][1], npd)


def test_zero_copy_input_and_output():
    torch.manual_seed(3)
    ref = nn.LSTM(4, 6, batch_first=True).eval()
    with torch.no_grad():
        m = ft.LSTM.from_lstm(ref)
    seen = {}

    class Spy:  # stands in for the engine to see what it is given
        def __init__(self, fl):
            self.fl, self.dtype, self.batch_first = fl, fl.dtype, fl.batch_first

        def __call__(self, x, hx=None, **kw):
            seen["x"] = x
            out = self.fl(x, hx, **kw)
            seen["out"] = out[0]
            return out

    m._fl = Spy(m._sync())
    x = torch.randn(5, 3, 8)[:, :, ::2]  # non-contiguous view
    out, _ = m(x)
    assert np.shares_memory(seen["x"], x.numpy())
    assert np.shares_memory(out.numpy(), seen["out"])
    assert out.is_contiguous()


def test_mismatched_hx_dims_as_torch():
    m = ft.LSTM(3, 4)
    with pytest.raises(RuntimeError, match="hx and cx should also be 3-D"):
        m(torch.zeros(5, 2, 3), (torch.zeros(1, 4), torch.zeros(1, 4)))
    with pytest.raises(RuntimeError, match="hx and cx should also be 2-D"):
        m(torch.zeros(5, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D"):
        m(torch.zeros(5, 2, 3, 1))
    with pytest.raises(fastlstm.ShapeError, match="hx"):
        m(torch.zeros(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))


# ----------------------------------------------------------------- weights
def test_constructor_like_nn_lstm():
    m = ft.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=True)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    out, (h, c) = m(torch.randn(2, 6, 5))
    assert out.shape == (2, 6, 16) and h.shape == (4, 2, 8)
    ref = nn.LSTM(5, 8, num_layers=2, bidirectional=True, batch_first=True).eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 6, 5)
    with torch.no_grad():
        _close(m(x)[0], ref(x)[0])
    m.flatten_parameters()  # a no-op that user code calls


def test_weights_shared_and_repacked_on_change():
    torch.manual_seed(4)
    ref = nn.LSTM(3, 5, num_layers=2).eval().requires_grad_(False)
    m = ft.LSTM.from_lstm(ref)
    assert m.weight_hh_l1.data_ptr() == ref.weight_hh_l1.data_ptr()  # shared, not copied
    x = torch.randn(4, 2, 3)
    # in-place change of the original's weights: seen through the version counter
    ref.weight_hh_l1.mul_(0.5)
    _close(m(x)[0], ref(x)[0], what="after in-place update")
    # load_state_dict repacks
    other = nn.LSTM(3, 5, num_layers=2).eval().requires_grad_(False)
    m.load_state_dict(other.state_dict())
    _close(m(x)[0], other(x)[0], what="after load_state_dict")
    # .data writes bypass version counters: refresh()
    m.bias_ih_l0.data[:] = 0.25
    other.bias_ih_l0.data[:] = 0.25
    m.refresh()
    _close(m(x)[0], other(x)[0], what="after refresh")
    # .double() repacks as float64
    m.double()
    other.double()
    out = m(x.double())[0]
    assert out.dtype == torch.float64 and m.fastlstm.dtype == np.float64
    _close(out, other(x.double())[0], F64, "float64")
    # deepcopy and pickling (torch.save) work; the engine is rebuilt on use
    m2 = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    for mm in (m2, m3):
        assert torch.equal(mm(x.double())[0], out)


def test_model_built_under_inference_mode():
    # inference tensors have no version counter (reading it raises, slowly):
    # the module notes which parameters are inference tensors and keys the
    # packed copy on their storage alone, without repacking per call
    with torch.inference_mode():
        ref = nn.LSTM(3, 4, num_layers=2).eval()
        m = ft.convert(ref)
        x = torch.randn(5, 2, 3)
        want = ref(x)[0]
        _close(m(x)[0], want)
        cell = ft.convert(nn.LSTMCell(3, 4).eval())
        packed = cell.fastlstm
        h, c = cell(x[0])
        assert cell.fastlstm is packed and cell.__dict__["_fl_inference"] == [True] * 4
    _close(m(x.clone())[0], want)
    assert m.__dict__["_fl_inference"] == [True] * 8
    m.weight_hh_l1 = nn.Parameter(torch.zeros(16, 4), requires_grad=False)  # not one
    m(x.clone())  # new storage: repacked, and that parameter keyed on its version too
    assert m.__dict__["_fl_inference"] == [True] * 5 + [False] + [True] * 2


def test_other_input_dtypes_converted():
    m = ft.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    want = m(x)[0]
    for xx in (x.double(), x.half(), x.bfloat16()):
        got = m(xx)[0]
        assert got.dtype == torch.float32
        assert_close(_np(got), _np(m(xx.float())[0]), F32)
    assert torch.equal(m(x.double())[0], want)


# ---------------------------------------------------------------- refusals
def test_refuses_training_mode():
    model = Tagger().requires_grad_(False)  # training mode
    with pytest.raises(ft.UnsupportedError, match="model: is in training mode"):
        ft.convert(model)
    model.eval()
    model.encoder.train()
    with pytest.raises(ft.UnsupportedError, match=r"model\.encoder: .*training mode"):
        ft.convert(model)
    assert type(model.encoder) is nn.LSTM  # untouched
    model.eval()
    ft.convert(model)
    model.train()  # after conversion: forward refuses
    tok, lens = _tokens(np.random.default_rng(0), 3, 4)
    with pytest.raises(ft.UnsupportedError, match=r"training mode.*call \.eval\(\)"):
        model(tok, lens)
    model.eval()
    model(tok, lens)


def test_refuses_grad_params_under_autograd():
    model = nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 4)).eval()
    with pytest.raises(ft.UnsupportedError, match=r"model\.1: parameters require grad"):
        ft.convert(model)
    assert type(model[1]) is nn.LSTM
    with pytest.raises(ft.UnsupportedError, match="parameters require grad"):
        ft.LSTM.from_lstm(model[1])
    with torch.inference_mode():
        m = ft.LSTM.from_lstm(model[1])
    assert not any(p.requires_grad for p in m.parameters())


def test_refuses_inputs_requiring_grad_under_autograd():
    m = ft.LSTM(3, 4)
    x = torch.randn(5, 2, 3, requires_grad=True)
    with pytest.raises(ft.UnsupportedError, match="input: requires grad"):
        m(x)
    h = (torch.zeros(1, 2, 4, requires_grad=True), torch.zeros(1, 2, 4))
    with pytest.raises(ft.UnsupportedError, match=r"hx\[0\] \(h_0\): requires grad"):
        m(x.detach(), h)
    with torch.no_grad():
        out = m(x, h)[0]
    assert not out.requires_grad
    m.detach = True
    assert not m(x, h)[0].requires_grad


def test_refuses_devices_dtypes_and_customised_lstms():
    with torch.no_grad():
        with pytest.raises(ft.UnsupportedError, match="weights are on meta"):
            ft.convert(nn.Sequential(nn.LSTM(3, 4, device="meta")).eval())
        for dt in (torch.float16, torch.bfloat16):
            with pytest.raises(fastlstm.DTypeError, match="float32 or float64"):
                ft.convert(nn.Sequential(nn.LSTM(3, 4).to(dt)).eval())

        class Custom(nn.LSTM):
            def forward(self, x, hx=None):
                return super().forward(x * 2, hx)

        with pytest.raises(ft.UnsupportedError, match="overrides forward"):
            ft.convert(nn.Sequential(Custom(3, 4)).eval())
        hooked = nn.LSTM(3, 4).eval()
        hooked.register_forward_hook(lambda *a: None)
        with pytest.raises(ft.UnsupportedError, match="hooks"):
            ft.convert(nn.Sequential(hooked).eval())
        with pytest.raises(TypeError, match="expected a torch.nn.Module"):
            ft.convert(object())
        with pytest.raises(TypeError, match="expected a torch.nn.LSTM"):
            ft.LSTM.from_lstm(nn.GRU(3, 4).eval())
        # weights moved off float32/float64 after conversion: refused at call time
        m = ft.LSTM(3, 4).half()
        with pytest.raises(fastlstm.DTypeError, match="float32 or float64"):
            m(torch.zeros(2, 1, 3))


# ------------------------------------------- ONNX Runtime: sequence_lens
def _onnx_lstm_session(m, T, N, with_initial):
    """One ONNX LSTM node (with sequence_lens) carrying m's weights."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    H, In, D = m.hidden_size, m.input_size, m.num_directions

    def ifgo_to_iofc(w):  # torch gate blocks i, f, g, o -> ONNX i, o, f, c
        return w.reshape(4, H, *w.shape[1:])[[0, 3, 1, 2]].reshape(w.shape)

    cells = [m.get_weights(0, d) for d in range(D)]
    W = np.stack([ifgo_to_iofc(c["w_ih"]) for c in cells])
    R = np.stack([ifgo_to_iofc(c["w_hh"]) for c in cells])
    B = np.stack([np.concatenate([ifgo_to_iofc(c["b_ih"]), ifgo_to_iofc(c["b_hh"])])
                  for c in cells])
    f32 = TensorProto.FLOAT
    names = ["X", "W", "R", "B", "sequence_lens"] + (["initial_h", "initial_c"]
                                                      if with_initial else [])
    node = helper.make_node("LSTM", names, ["Y", "Y_h", "Y_c"], hidden_size=H,
                            direction="bidirectional" if D == 2 else "forward")
    inputs = [helper.make_tensor_value_info("X", f32, [T, N, In]),
              helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, [N])]
    if with_initial:
        inputs += [helper.make_tensor_value_info(n, f32, [D, N, H])
                   for n in ("initial_h", "initial_c")]
    graph = helper.make_graph(
        [node], "lstm", inputs,
        [helper.make_tensor_value_info("Y", f32, [T, D, N, H]),
         helper.make_tensor_value_info("Y_h", f32, [D, N, H]),
         helper.make_tensor_value_info("Y_c", f32, [D, N, H])],
        [numpy_helper.from_array(a.astype(F32), n) for a, n in ((W, "W"), (R, "R"), (B, "B"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_initial", [False, True])
def test_lengths_match_onnxruntime_sequence_lens(bidirectional, with_initial):
    rng = np.random.default_rng(7)
    T, N, In, H = 9, 6, 5, 11
    m = fastlstm.LSTM(In, H, bidirectional=bidirectional, seed=7)
    D = m.num_directions
    sess = _onnx_lstm_session(m, T, N, with_initial)
    x = rng.standard_normal((T, N, In)).astype(F32)
    lens = np.array([T, 1, 4, 7, 1, 3], np.int32)
    feeds = {"X": x, "sequence_lens": lens}
    hx = None
    if with_initial:
        hx = (rng.standard_normal((D, N, H)).astype(F32),
              rng.standard_normal((D, N, H)).astype(F32))
        feeds.update(initial_h=hx[0], initial_c=hx[1])
    else:
        # a length-0 sequence: both give zeros.  (With a nonzero initial_h,
        # ORT 1.x returns Y_h = Y_c = 0 for it, while fastlstm, like a
        # PackedSequence would, returns the initial state.)
        lens[4] = 0
    Y, Y_h, Y_c = sess.run(None, feeds)
    out, (h, c) = m(x, hx, lengths=lens, num_threads=1)
    want = Y.transpose(0, 2, 1, 3).reshape(T, N, D * H)  # (T, D, N, H) -> (T, N, D*H)
    assert_close(out, want, F32, "Y")
    assert_close(h, Y_h, F32, "Y_h")
    assert_close(c, Y_c, F32, "Y_c")
    for n in range(N):  # zero-filled past each length, in both
        assert not out[lens[n]:, n].any() and not want[lens[n]:, n].any()


# ------------------------------------------------------- Keras masking
keras_warnings = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def keras():
    os.environ["KERAS_BACKEND"] = "torch"
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on {keras.backend.backend()}, not torch")
    return keras


def _keras_case(keras, layer, seed, pattern, T=8, N=4, In=3):
    """A Masking(0.0) model: Keras' outputs and fastlstm's mask arguments.
    pattern "lengths": each row's valid steps a prefix (lengths 8, 2, 0, 5),
    given as lengths=; "holes": a leading masked step, masked steps inside
    rows, a row with none valid, given as mask=."""
    rng = np.random.default_rng(seed)
    if pattern == "lengths":
        lens = np.array([T, 2, 0, 5])[:N]
        mask = np.arange(T)[None, :] < lens[:, None]
        kw = {"lengths": lens}
    else:
        mask = rng.random((N, T)) < 0.6
        mask[0, 0], mask[0, 3], mask[0, -1] = False, True, True
        mask[2] = False
        kw = {"mask": mask}
    x = rng.standard_normal((N, T, In)).astype(F32)
    x[~mask] = 0.0  # Masking(0.0) masks these steps
    inp = keras.Input((T, In))
    model = keras.Model(inp, layer(keras.layers.Masking(0.0)(inp)))
    model.set_weights([rng.uniform(-0.6, 0.6, w.shape).astype(F32)
                       for w in model.get_weights()])
    res = model(x)
    res = res if isinstance(res, (list, tuple)) else [res]
    outs = [keras.ops.convert_to_numpy(o) for o in res]
    return x, kw, model.get_weights(), outs


def _set_from_keras(m, layer, direction, kernel, recurrent, bias):
    # Keras: kernel (In, 4H), recurrent_kernel (H, 4H), one bias; gates i, f, c, o
    m.set_weights(layer, direction, w_ih=kernel.T, w_hh=recurrent.T, b_ih=bias,
                  b_hh=np.zeros_like(bias))


PATTERNS = ["lengths", "holes"]


@keras_warnings
@pytest.mark.parametrize("pattern", PATTERNS)
def test_keras_masking_unidirectional_is_repeat(keras, pattern):
    H = 6
    layer = keras.layers.LSTM(H, return_sequences=True, return_state=True)
    x, kw, w, (y, kh, kc) = _keras_case(keras, layer, 8, pattern)
    m = fastlstm.LSTM(3, H, batch_first=True)
    _set_from_keras(m, 0, 0, *w)
    out, (h, c) = m(x, padding="repeat", **kw)
    assert_close(out, y, F32, "out")  # last valid output repeated; zeros before any
    assert_close(h[0], kh, F32, "h_n")
    assert_close(c[0], kc, F32, "c_n")


@keras_warnings
@pytest.mark.parametrize("pattern", PATTERNS)
def test_keras_masking_stacked_unidirectional_is_repeat(keras, pattern):
    H = 5
    l1 = keras.layers.LSTM(H, return_sequences=True)
    l2 = keras.layers.LSTM(H, return_sequences=True)
    x, kw, w, (y,) = _keras_case(keras, lambda t: l2(l1(t)), 9, pattern)
    m = fastlstm.LSTM(3, H, num_layers=2, batch_first=True)
    _set_from_keras(m, 0, 0, *w[:3])
    _set_from_keras(m, 1, 0, *w[3:])
    out, _ = m(x, padding="repeat", **kw)
    assert_close(out, y, F32, "out")


def _keras_bidirectional(keras, seed, pattern):
    H = 6
    layer = keras.layers.Bidirectional(
        keras.layers.LSTM(H, return_sequences=True, return_state=True))
    x, kw, w, (y, fh, fc, bh, bc) = _keras_case(keras, layer, seed, pattern)
    m = fastlstm.LSTM(3, H, batch_first=True, bidirectional=True)
    _set_from_keras(m, 0, 0, *w[:3])
    _set_from_keras(m, 0, 1, *w[3:])
    return m, x, kw, y, (fh, fc, bh, bc)


@keras_warnings
@pytest.mark.parametrize("pattern", PATTERNS)
def test_keras_masking_bidirectional_is_zeros(keras, pattern):
    # Keras 3's Bidirectional sets zero_output_for_mask = return_sequences on
    # both of its layers: at masked steps both directions output zeros,
    # which is fastlstm's padding="zeros" (PyTorch's convention); the reverse
    # direction runs over the valid steps only, in reverse order.
    m, x, kw, y, (fh, fc, bh, bc) = _keras_bidirectional(keras, 10, pattern)
    out, (h, c) = m(x, padding="zeros", **kw)
    assert_close(out, y, F32, "out")
    for got, want, name in ((h[0], fh, "h fwd"), (c[0], fc, "c fwd"), (h[1], bh, "h bwd"),
                            (c[1], bc, "c bwd")):
        assert_close(got, want, F32, name)


@keras_warnings
@pytest.mark.xfail(strict=True, reason=(
    "fastlstm's padding='repeat' on a bidirectional model repeats the forward "
    "direction's last valid output past each length; Keras 3's Bidirectional "
    "forces zero_output_for_mask=True on both layers, so its forward half is "
    "zeros there (its reverse half agrees: zeros)"))
def test_keras_masking_bidirectional_vs_repeat(keras):
    m, x, kw, y, _ = _keras_bidirectional(keras, 10, "lengths")
    out, _ = m(x, padding="repeat", **kw)
    H = m.hidden_size
    assert_close(out[..., H:], y[..., H:], F32, "reverse half")  # agrees
    assert_close(out[..., :H], y[..., :H], F32, "forward half")  # differs past each end


@pytest.mark.parametrize("weights", ["int8", "bfloat16", "float16"])
def test_convert_with_reduced_weights(weights):
    """convert(model, weights=p): every LSTM runs fastlstm's astype(p) of its
    weights (bitwise the NumPy model's), close to the float32 model within
    the documented bound; parameters and state_dict stay float32."""
    from tolerances import PRECISION_TOL, max_rel_err
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    model = Tagger().eval().requires_grad_(False)
    tok, lens = _tokens(rng, 6, 11)
    orig = copy.deepcopy(model.encoder)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(tok, lens)
    ft.convert(model, weights=weights)
    assert model.encoder.fastlstm.weights_precision == weights
    got = model(tok, lens)
    for g, w in zip(got, want):
        assert max_rel_err(_np(g), _np(w)) <= PRECISION_TOL[weights]
    assert all(torch.equal(v, sd_before[k]) for k, v in model.state_dict().items())
    # the same as fastlstm.LSTM.from_torch(...).astype(weights), bit for bit
    x = rng.standard_normal((2, 5, 12)).astype(np.float32)
    ref = fastlstm.LSTM.from_torch(orig).astype(weights)
    out, (h, c) = model.encoder(torch.from_numpy(x))
    rout, (rh, rc) = ref(x)
    assert np.array_equal(_np(out), rout) and np.array_equal(_np(h), rh)
    # and after a weight change it repacks in the same precision
    with torch.no_grad():
        model.encoder.weight_hh_l0.mul_(0.5)
    assert model.encoder.fastlstm.weights_precision == weights


def test_convert_weights_refused_before_any_swap():
    model = Tagger().eval().requires_grad_(False)
    with pytest.raises(ValueError, match="weights"):
        ft.convert(model, weights="int4")
    assert type(model.encoder) is nn.LSTM
    model64 = Tagger().double().eval().requires_grad_(False)
    with pytest.raises(fastlstm.DTypeError, match="model.encoder.*float32"):
        ft.convert(model64, weights="int8")
    assert type(model64.encoder) is nn.LSTM
    assert type(ft.convert(model64, weights="float32").encoder) is ft.LSTM
    with pytest.raises(fastlstm.DTypeError, match="float32"):
        ft.LSTM(3, 4, dtype=torch.float64, weights="int8")
    assert ft.LSTM(3, 4, weights="int8").fastlstm.weights_precision == "int8"


def test_convert_refusal_of_a_later_lstm_swaps_none():
    """The weights are stored (quantized) for every LSTM before any is swapped:
    one that cannot be (W_hh beyond float16's range) leaves the model untouched,
    and the error names it."""
    model = nn.Sequential(nn.LSTM(3, 4), nn.LSTM(4, 4)).eval().requires_grad_(False)
    with torch.no_grad():
        model[1].weight_hh_l0[0, 0] = 1e6
    with pytest.raises(fastlstm.WeightsError, match=r"model\.1.*float16"):
        ft.convert(model, weights="float16")
    assert type(model[0]) is nn.LSTM and type(model[1]) is nn.LSTM


def test_refuses_parameters_made_to_require_grad_after_conversion():
    m = ft.convert(nn.LSTM(3, 4).eval().requires_grad_(False))
    x = torch.zeros(2, 1, 3)
    m.requires_grad_(True)
    with pytest.raises(ft.UnsupportedError, match="require grad"):
        m(x)
    with torch.no_grad():
        m(x)  # no gradient asked for: fine


def test_torchscript_and_tracing_refused_compile_runs():
    lstm = nn.LSTM(3, 4).eval().requires_grad_(False)
    m = ft.convert(copy.deepcopy(lstm))
    x = torch.randn(5, 2, 3)
    with pytest.raises(ft.UnsupportedError, match="TorchScript"):
        torch.jit.script(m)
    with pytest.raises(ft.UnsupportedError, match="trac"):
        torch.jit.trace(m, (x,))
    wrapped = nn.Sequential(m).eval()
    compiled = torch.compile(wrapped, backend="eager")
    with torch.no_grad():
        got = compiled(x)[0]
        want = lstm(x)[0]
    assert_close(got.numpy(), want.numpy(), np.float32, "torch.compile")
    with torch.no_grad():  # and again on a new input (no constants baked in)
        x2 = torch.randn(5, 2, 3)
        assert_close(compiled(x2)[0].numpy(), lstm(x2)[0].numpy(), np.float32, "second input")


# ------------------------------------------------------------ nn.LSTMCell
class Decoder(nn.Module):
    """An nn.LSTM encoder and a greedy nn.LSTMCell decoder loop fed its own
    predictions (the seq2seq pattern that steps a cell from Python)."""

    def __init__(self, vocab=30, emb=8, hidden=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.encoder = nn.LSTM(emb, hidden, batch_first=True)
        self.cell = nn.LSTMCell(emb, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens, steps=6):
        _, (h, c) = self.encoder(self.emb(tokens))
        h, c = h[0], c[0]
        tok = tokens[:, -1]
        logits = []
        for _ in range(steps):
            h, c = self.cell(self.emb(tok), (h, c))
            logits.append(self.head(h))
            tok = logits[-1].argmax(-1)
        return torch.stack(logits, 1)


def test_convert_decoder_with_lstm_cell_same_outputs():
    torch.manual_seed(5)
    model = Decoder().eval().requires_grad_(False)
    tok = torch.randint(0, 30, (4, 7))
    with torch.no_grad():
        want = model(tok)
    ft.convert(model)
    assert type(model.cell) is ft.LSTMCell and isinstance(model.cell, nn.LSTMCell)
    assert type(model.encoder) is ft.LSTM
    assert "fastlstm.torch.LSTMCell" in repr(model)
    got = model(tok)
    assert not got.requires_grad
    _close(got, want, what="decoder logits")
    assert torch.equal(got.argmax(-1), want.argmax(-1))  # the same greedy tokens


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_cell_forms_against_torch(bias, dtype):
    torch.manual_seed(6)
    ref = nn.LSTMCell(5, 9, bias=bias).to(dtype).eval().requires_grad_(False)
    cell = ft.LSTMCell.from_cell(ref)
    assert cell.weight_hh.data_ptr() == ref.weight_hh.data_ptr()  # shared, not copied
    tol = F32 if dtype == torch.float32 else F64
    x = torch.randn(4, 5, dtype=dtype)
    hx = (torch.randn(4, 9, dtype=dtype), torch.randn(4, 9, dtype=dtype))
    for args in ((x,), (x, hx), (x[1],), (x[1], (hx[0][1], hx[1][1]))):
        got, want = cell(*args), ref(*args)
        for g, w, what in zip(got, want, ("h_1", "c_1")):
            assert g.shape == w.shape and g.dtype == w.dtype
            _close(g, w, tol, what)
    # the state it returned, fed back (read through the engine's arrays), also
    # after an in-place change of it, and beside another tensor
    h1, c1 = cell(x, hx)
    r1 = ref(x, hx)
    for k in range(3):
        if k == 1:
            h1.mul_(0.5)
            r1[0].mul_(0.5)
        c_in = (c1, r1[1]) if k < 2 else (hx[1], hx[1])
        h1, c1 = cell(x, (h1, c_in[0]))
        r1 = ref(x, (r1[0], c_in[1]))
        _close(h1, r1[0], tol, f"fed back {k}")
        _close(c1, r1[1], tol, f"fed back {k}")
    ref.weight_ih.mul_(0.5)  # an in-place update is seen (version counter)
    _close(cell(x, hx)[0], ref(x, hx)[0], tol, "after update")
    other = nn.LSTMCell(5, 9, bias=bias).to(dtype).eval().requires_grad_(False)
    cell.load_state_dict(other.state_dict())
    _close(cell(x, hx)[1], other(x, hx)[1], tol, "after load_state_dict")
    for copied in (copy.deepcopy(cell), ft.LSTMCell(5, 9, bias=bias, dtype=dtype)):
        copied.load_state_dict(other.state_dict())
        assert torch.equal(copied(x, hx)[0], cell(x, hx)[0])


def test_lstm_cell_refusals():
    with pytest.raises(ft.UnsupportedError, match=r"cell: the nn.LSTMCell is in training mode"):
        ft.LSTMCell.from_cell(nn.LSTMCell(3, 4).requires_grad_(False))
    with pytest.raises(ft.UnsupportedError, match=r"model\.1: parameters require grad"):
        ft.convert(nn.Sequential(nn.Linear(3, 3), nn.LSTMCell(3, 4)).eval())
    with torch.no_grad():
        with pytest.raises(fastlstm.DTypeError, match="float32 or float64"):
            ft.convert(nn.LSTMCell(3, 4).half().eval())

        class Custom(nn.LSTMCell):
            def forward(self, x, hx=None):
                return super().forward(x * 2, hx)

        with pytest.raises(ft.UnsupportedError, match="subclasses nn.LSTMCell and overrides"):
            ft.convert(nn.Sequential(Custom(3, 4)).eval())
        cell = ft.convert(nn.LSTMCell(3, 4).eval())
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D, got 3D"):
        cell(torch.randn(1, 2, 3))
    with pytest.raises(RuntimeError, match=r"Expected hx\[0\] and hx\[1\] to be 2D"):
        cell(x, (torch.zeros(4), torch.zeros(4)))
    with pytest.raises(ft.UnsupportedError, match="input: requires grad"):
        cell(x.requires_grad_(True))
    cell.train()
    with pytest.raises(ft.UnsupportedError, match=r"LSTMCell: the module is in training"):
        cell(x.detach())
    cell.eval()
    with pytest.raises(ft.UnsupportedError, match="TorchScript"):
        torch.jit.script(cell)
    with pytest.raises(ft.UnsupportedError, match="trac"):
        torch.jit.trace(cell, (x.detach(),))


@pytest.mark.parametrize("weights", ["int8", "bfloat16"])
def test_convert_lstm_cell_with_reduced_weights(weights):
    """convert(model, weights=p) stores the cells' weights in p too: one
    step is within the documented bound of the float32 cell."""
    from tolerances import PRECISION_TOL, max_rel_err
    torch.manual_seed(7)
    ref = nn.LSTMCell(6, 32).eval().requires_grad_(False)
    cell = ft.convert(copy.deepcopy(ref), weights=weights)
    assert cell.fastlstm.weights_precision == weights
    x, hx = torch.randn(3, 6), (torch.randn(3, 32), torch.randn(3, 32))
    for g, w in zip(cell(x, hx), ref(x, hx)):
        assert max_rel_err(_np(g), _np(w)) <= PRECISION_TOL[weights]


def test_lstm_state_fed_back_step_by_step():
    """nn.LSTM stepped one time step at a time with its own (h_n, c_n) fed
    back (read through the engine's arrays behind them), also after an
    in-place change of h_n, equals torch's loop."""
    torch.manual_seed(8)
    ref = nn.LSTM(4, 6, num_layers=2).eval().requires_grad_(False)
    m = ft.LSTM.from_lstm(ref)
    xs = torch.randn(7, 1, 3, 4)
    hx_m = hx_r = None
    for t in range(7):
        if t == 3:
            hx_m[0].mul_(0.5)
            hx_r[0].mul_(0.5)
        y_m, hx_m = m(xs[t], hx_m)
        y_r, hx_r = ref(xs[t], hx_r)
        _close(y_m, y_r, what=f"step {t}")
        _close(hx_m[1], hx_r[1], what=f"c at step {t}")


def test_numpy_api_names_a_packed_sequence():
    packed = pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(fastlstm.DTypeError, match="x: a torch PackedSequence.*lengths="):
        fastlstm.LSTM(3, 4)(packed)

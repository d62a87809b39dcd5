"""fastlstm.io.keras against Keras itself.

Keras 3 (torch backend) builds and saves the models here and its predict is
the oracle.  Keras 2 files cannot be made without TensorFlow (too large for
CI), so tests/data/keras2 holds files written by tf_keras 2.21 with its
predictions (make_fixtures.py regenerates them), and a Keras 2.2-era legacy
file is written by hand with h5py, its expected output computed by a NumPy
Keras cell in this file.  Keras is imported lazily (it is slow to import).
"""
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastlstm
from fastlstm.io import keras as fk
from tolerances import TOL

F32_TOL = TOL[np.dtype(np.float32)]  # the float32 bound (tolerances.py)

DATA = Path(__file__).parent / "data" / "keras2"
# Keras 3 on NumPy 2 warns about __array__(copy=...) on every conversion.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
T, N, IN = 7, 2, 3


def rel_err(want, got):
    if isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want), (type(got), len(want))
        return max(rel_err(w, g) for w, g in zip(want, got))
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    assert want.shape == got.shape, (want.shape, got.shape)
    return float(np.max(np.abs(want - got) / np.maximum(1.0, np.abs(want))))


@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("h5py")
    os.environ["KERAS_BACKEND"] = "torch"
    return pytest.importorskip("keras")


def _randomize(model, seed, scale=0.6):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-scale, scale, w.shape).astype(np.float32)
                       for w in model.get_weights()])
    return model


def _functional(keras, layers, seed):
    inp = keras.Input((T, IN))
    x = inp
    for layer in layers:
        x = layer(x)
    return _randomize(keras.Model(inp, x), seed)


def _cases(keras):
    L = keras.layers
    cases = {
        "lstm": lambda: [L.LSTM(5)],
        "sequences_state": lambda: [L.LSTM(5, return_sequences=True, return_state=True)],
        "go_backwards": lambda: [L.LSTM(5, return_sequences=True, go_backwards=True)],
        "go_backwards_last_state": lambda: [L.LSTM(5, go_backwards=True, return_state=True)],
        "hard_sigmoid": lambda: [L.LSTM(5, return_sequences=True,
                                        recurrent_activation="hard_sigmoid")],
        "activations": lambda: [L.LSTM(4, return_sequences=True, activation="softsign",
                                       recurrent_activation="hard_sigmoid"),
                                L.LSTM(3, activation="relu")],
        "no_bias": lambda: [L.LSTM(5, use_bias=False, return_sequences=True)],
        "stacked": lambda: [L.LSTM(6, return_sequences=True),
                            L.Bidirectional(L.LSTM(4, return_sequences=True), merge_mode="ave"),
                            L.LSTM(3, go_backwards=True)],
    }
    for mode in ("concat", "sum", "mul", "ave", None):
        cases[f"bi_{mode}"] = (lambda mode=mode: [
            L.Bidirectional(L.LSTM(4, return_sequences=True), merge_mode=mode)])
        cases[f"bi_{mode}_last_state"] = (lambda mode=mode: [
            L.Bidirectional(L.LSTM(4, return_state=True), merge_mode=mode)])
    return cases


CASES = ["lstm", "sequences_state", "go_backwards", "go_backwards_last_state", "hard_sigmoid",
         "activations", "no_bias", "stacked"] + [
    f"bi_{m}{s}" for m in ("concat", "sum", "mul", "ave", None) for s in ("", "_last_state")]


@pytest.fixture(scope="module")
def built(keras, tmp_path_factory):
    """case -> (model, x, keras output, {format: path}) built once per case."""
    cache = {}
    root = tmp_path_factory.mktemp("keras3")
    cases = _cases(keras)

    def get(case):
        if case not in cache:
            seed = CASES.index(case)
            model = _functional(keras, cases[case](), seed)
            x = np.random.default_rng(100 + seed).normal(size=(N, T, IN)).astype(np.float32)
            want = model.predict(x, verbose=0)
            paths = {"keras": root / f"{case}.keras", "h5": root / f"{case}.h5",
                     "weights": root / f"{case}.weights.h5"}
            model.save(paths["keras"])
            model.save(paths["h5"])
            model.save_weights(paths["weights"])
            cache[case] = (model, x, want, paths)
        return cache[case]
    return get


@pytest.mark.parametrize("fmt", ["keras", "h5", "weights", "live"])
@pytest.mark.parametrize("case", CASES)
def test_keras3_matches_predict(built, case, fmt):
    model, x, want, paths = built(case)
    if fmt == "live":
        stack = fk.from_keras(model)
    elif fmt == "weights":  # no architecture in the file: give the config
        stack = fk.load_keras(paths[fmt], config=json.dumps(model.get_config()))
    else:
        stack = fk.load_keras(paths[fmt])
    got = stack(x)
    assert rel_err(want, got) <= F32_TOL
    assert all(isinstance(m, fastlstm.LSTM) for m in stack.lstms)
    if fmt in ("keras", "h5"):
        assert stack.keras_version.startswith("3.")


MASK_CASES = CASES + ["zero_output_for_mask", "stacked_bi_concat"]


@pytest.mark.parametrize("case", MASK_CASES)
def test_keras3_masking_with_holes_matches_predict(keras, tmp_path, case):
    """A Masking layer before the stack, masks with holes (a leading masked
    step, steps inside, a row with none valid): the loader warns that the
    file masks, and stack(x, mask=) gives what Keras predicts (skipped steps,
    repeated or zero outputs, go_backwards, every merge mode, states)."""
    L = keras.layers
    extra = {"zero_output_for_mask": lambda: [L.LSTM(5, return_sequences=True,
                                                     zero_output_for_mask=True)],
             "stacked_bi_concat": lambda: [L.LSTM(6, return_sequences=True),
                                           L.Bidirectional(L.LSTM(4, return_sequences=True))]}
    layers = {**_cases(keras), **extra}[case]()
    seed = MASK_CASES.index(case)
    rng = np.random.default_rng(200 + seed)
    n = 4
    mask = rng.random((n, T)) < 0.6
    mask[0, 0], mask[0, 3], mask[0, -1] = False, True, True
    mask[2] = False
    x = rng.normal(size=(n, T, IN)).astype(np.float32)
    x[~mask] = 0.0
    model = _functional(keras, [L.Masking(0.0)] + layers, seed)
    want = model.predict(x, verbose=0)
    model.save(tmp_path / "m.keras")
    with pytest.warns(UserWarning, match=r"masks the input .* stack\(x, mask=m\)"):
        stack = fk.load_keras(tmp_path / "m.keras")
    assert rel_err(want, stack(x, mask=mask)) <= F32_TOL
    assert rel_err(want, stack(x, mask=np.any(x != 0, axis=-1))) <= F32_TOL
    with pytest.raises(fastlstm.ShapeError, match=r"mask: expected x's first two dimensions"):
        stack(x, mask=mask.T)


def test_keras3_call_with_initial_state_gets_no_mask(keras, tmp_path):
    """Keras 3 gives no mask to an LSTM called with initial_state=, even
    behind a Masking layer (its config then has no mask= keyword): the loader
    does not warn, and the stack without a mask is what Keras predicts."""
    import warnings
    L = keras.layers
    inp, h0, c0 = keras.Input((T, IN)), keras.Input((5,)), keras.Input((5,))
    lstm = L.LSTM(5, return_sequences=True)
    model = _randomize(keras.Model([inp, h0, c0], lstm(L.Masking(0.0)(inp),
                                                       initial_state=[h0, c0])), 30)
    rng = np.random.default_rng(30)
    x = rng.normal(size=(N, T, IN)).astype(np.float32)
    x[0, 2:4] = 0.0  # steps a mask would skip
    hc = [rng.normal(size=(N, 5)).astype(np.float32) for _ in range(2)]
    want = model.predict([x] + hc, verbose=0)
    model.save(tmp_path / "m.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stack = fk.load_keras(tmp_path / "m.keras")
    assert not stack.layers[0].masked
    assert rel_err(want, stack(x, initial_state=[hc])) <= F32_TOL


def test_hard_sigmoid_slope_follows_version(built):
    model, x, want, paths = built("hard_sigmoid")
    x = x * 4  # drive the gates into the region where the slopes differ
    want = model.predict(x, verbose=0)
    assert rel_err(want, fk.load_keras(paths["keras"])(x)) <= F32_TOL
    m2 = fk.load_keras(paths["keras"], keras_version="2.15.0")  # slope 0.2: not Keras 3
    assert rel_err(want, m2(x)) > 1e-3
    lstm = fk.load_keras(paths["h5"]).lstms[0]
    assert lstm.activations[0] == "hardsigmoid"
    assert lstm.activation_alpha[0] == pytest.approx(1 / 6)


def test_weights_only_without_config_uses_defaults(built):
    model, x, want, paths = built("stacked")
    # Mixed LSTM / Bidirectional: the file does not say in which order.
    with pytest.raises(fastlstm.FormatError, match="config"):
        fk.load_keras(paths["weights"])
    model, x, want, paths = built("lstm")
    assert rel_err(want, fk.load_keras(paths["weights"])(x)) <= F32_TOL


def test_to_lstm_refuses_mixed_stacks(built):
    with pytest.raises(fastlstm.FormatError, match="single fastlstm.LSTM"):
        fk.load_keras(built("stacked")[3]["keras"]).to_lstm()


def test_sequential_stacks_names_and_registry(keras, tmp_path):
    L = keras.layers
    model = _randomize(keras.Sequential([
        keras.Input((T, IN)), L.LSTM(4, return_sequences=True), L.Dropout(0.3),
        L.LSTM(4, return_sequences=True, name="second"), L.Dense(5),
        L.Bidirectional(L.LSTM(3), name="bi")]), 7)
    path = tmp_path / "seq.keras"
    model.save(path)
    infos = fk.list_keras_stacks(path)
    assert [d["num_layers"] for d in infos] == [2, 1]
    assert infos[1]["name"] == "bi" and infos[1]["input_size"] == 5
    with pytest.raises(fastlstm.FormatError, match="2 LSTM stacks"):
        fk.load_keras(path)
    with pytest.raises(fastlstm.FormatError, match="nope"):
        fk.load_keras(path, "nope")
    x = np.random.default_rng(0).normal(size=(N, T, IN)).astype(np.float32)
    # The first stack's output is the output of the layer named "second".
    sub = keras.Model(model.inputs, model.get_layer("second").output)
    assert rel_err(sub.predict(x, verbose=0), fk.load_keras(path, "second")(x)) <= F32_TOL
    stack = fk.load_keras(path, 0)
    fused = stack.to_lstm()  # two LSTM(4) layers: one 2-layer fastlstm.LSTM
    assert (fused.num_layers, fused.batch_first) == (2, True)
    assert rel_err(stack(x), fused(x)[0]) <= 1e-6
    assert fk.load_keras(path, "bi").to_lstm().bidirectional
    if hasattr(fastlstm, "load") and "keras" in getattr(fastlstm.io, "formats", lambda: [])():
        assert fastlstm.io.detect_format(path) == "keras"
        names = [n for n, _ in fastlstm.list_stacks(path)]
        assert names == ["lstm", "bi"] or names[1] == "bi"
        m = fastlstm.load(path, "bi")
        assert isinstance(m, fk.KerasStack)
        h5 = tmp_path / "seq.h5"
        model.save(h5)
        assert fastlstm.io.detect_format(h5) == "keras"


def test_initial_state_and_layer_object(keras):
    L = keras.layers
    layer = L.LSTM(4, return_sequences=True, return_state=True)
    bi = L.Bidirectional(L.LSTM(3, return_sequences=True, return_state=True), merge_mode="sum")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, T, IN)).astype(np.float32)
    h0, c0 = (rng.normal(size=(N, 4)).astype(np.float32) for _ in range(2))
    states = [rng.normal(size=(N, 3)).astype(np.float32) for _ in range(4)]
    layer(x)  # build
    _randomize(layer, 5)
    want = [np.asarray(v.detach().cpu()) for v in layer(x, initial_state=[h0, c0])]
    got = fk.from_keras(layer)(x, initial_state=[[h0, c0]])
    assert rel_err(want, got) <= F32_TOL
    bi(x)
    _randomize(bi, 6)
    want = [np.asarray(v.detach().cpu()) for v in bi(x, initial_state=states)]
    got = fk.from_keras(bi)(x, initial_state=[states])
    assert rel_err(want, got) <= F32_TOL


def test_nested_model(keras, tmp_path):
    """LSTMs inside a Sequential used as a layer of a functional model."""
    L = keras.layers
    inner = keras.Sequential([keras.Input((T, IN)), L.LSTM(4, return_sequences=True),
                              L.Bidirectional(L.LSTM(3), merge_mode="mul")], name="enc")
    inp = keras.Input((T, IN))
    model = _randomize(keras.Model(inp, L.Dense(2)(inner(L.Dense(IN)(inp)))), 11)
    x = np.random.default_rng(1).normal(size=(N, T, IN)).astype(np.float32)
    want = inner.predict(x, verbose=0)
    model.save(tmp_path / "n.keras")
    model.save(tmp_path / "n.h5")
    for src in (tmp_path / "n.keras", tmp_path / "n.h5", model):
        assert [d["num_layers"] for d in fk.list_keras_stacks(src)] == [2]
        assert rel_err(want, fk.load_keras(src)(x)) <= F32_TOL


def test_no_code_from_lambda_layers(keras, tmp_path, built):
    """A Lambda layer's config holds marshalled code: it is never run."""
    model, x, want, paths = built("stacked")
    with zipfile.ZipFile(paths["keras"]) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    cfg = json.loads(files["config.json"])
    layers = cfg["config"]["layers"]
    lam = {"module": "keras.layers", "class_name": "Lambda", "name": "evil",
           "config": {"name": "evil", "function": {"class_name": "__lambda__", "config": {
               "code": "ZXZpbA==", "defaults": None, "closure": None}}},
           "inbound_nodes": []}
    layers.append(lam)
    files["config.json"] = json.dumps(cfg).encode()
    out = tmp_path / "lambda.keras"
    with zipfile.ZipFile(out, "w") as zf:
        for n, b in files.items():
            zf.writestr(n, b)
    assert rel_err(want, fk.load_keras(out)(x)) <= F32_TOL


# ----------------------------------------------------------------- Keras 2 files
def _expected():
    return np.load(DATA / "expected.npz")


@pytest.mark.parametrize("model,file", [
    ("a", "a.h5"), ("a", "a_weights.h5"), ("a", "a.keras"), ("b", "b.h5"),
    ("b", "b_weights.h5"), ("c", "c.h5"), ("c", "c_weights.h5"), ("d", "d.h5"),
    ("d", "d_weights.h5")])
def test_keras2_files_match_tf_keras(model, file):
    h5py = pytest.importorskip("h5py")
    e = _expected()
    want = [e[k] for k in sorted(e.files) if k.startswith(model + "_y")]
    config = None
    if "weights" in file:  # weights-only: architecture from the full file
        with h5py.File(DATA / f"{model}.h5", "r") as f:
            config = f.attrs["model_config"]
    stack = fk.load_keras(DATA / file, config=config)
    assert stack.keras_version == str(e["keras_version"]) and stack.keras_version[0] == "2"
    got = stack(e[model + "_x"])
    assert rel_err(want if len(want) > 1 else want[0], got) <= F32_TOL


def test_keras2_hard_sigmoid_is_slope_0_2():
    e = _expected()
    stack = fk.load_keras(DATA / "a.h5")
    assert stack.layers[1].lstms[0].activation_alpha[0] == pytest.approx(0.2)
    wrong = fk.load_keras(DATA / "a.h5", keras_version="3.0")
    assert rel_err([e["a_y0"], e["a_y1"], e["a_y2"]], wrong(e["a_x"])) > 1e-4


def keras_lstm_np(x, kernel, rk, bias, rec, act=np.tanh, go_backwards=False):
    """Keras' LSTMCell in NumPy (blocks i, f, c, o; x·kernel + h·rk + bias)."""
    N_, T_, _ = x.shape
    U = rk.shape[0]
    h, c = np.zeros((N_, U)), np.zeros((N_, U))
    outs = []
    steps = range(T_ - 1, -1, -1) if go_backwards else range(T_)
    for t in steps:
        z = x[:, t] @ kernel + h @ rk + (0 if bias is None else bias)
        i, f, g, o = np.split(z, 4, axis=1)
        c = rec(f) * c + rec(i) * act(g)
        h = rec(o) * act(c)
        outs.append(h)
    return np.stack(outs, axis=1), h, c


def _hand_built_keras22(path, rng):
    """A legacy full-model .h5 as Keras 2.2.4 wrote it: hard_sigmoid was the
    default recurrent activation, weights lstm_1/kernel:0 without a cell scope,
    a CuDNNLSTM with its two biases (8U)."""
    import h5py
    U1, U2 = 4, 3
    w = {"cu": [rng.uniform(-.5, .5, s).astype(np.float32) for s in
                ((IN, 4 * U1), (U1, 4 * U1), (8 * U1,))],
         "lstm": [rng.uniform(-.5, .5, s).astype(np.float32) for s in
                  ((U1, 4 * U2), (U2, 4 * U2), (4 * U2,))]}
    config = {"class_name": "Sequential", "config": {"name": "sequential_1", "layers": [
        {"class_name": "CuDNNLSTM", "config": {
            "name": "cu_dnnlstm_1", "units": U1, "return_sequences": True,
            "return_state": False, "go_backwards": False, "stateful": False,
            "batch_input_shape": [None, T, IN]}},
        {"class_name": "LSTM", "config": {
            "name": "lstm_1", "units": U2, "activation": "tanh",
            "recurrent_activation": "hard_sigmoid", "use_bias": True,
            "return_sequences": False, "go_backwards": True, "unit_forget_bias": True}}]}}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.2.4"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(config).encode()
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = np.array([b"cu_dnnlstm_1", b"lstm_1"])
        mw.attrs["backend"] = b"tensorflow"
        mw.attrs["keras_version"] = b"2.2.4"
        for lname, key in (("cu_dnnlstm_1", "cu"), ("lstm_1", "lstm")):
            g = mw.create_group(lname)
            names = [f"{lname}/{n}:0".encode() for n in ("kernel", "recurrent_kernel", "bias")]
            g.attrs["weight_names"] = np.array(names)
            for n, arr in zip(names, w[key]):
                g.create_dataset(n.decode(), data=arr)
    return w


def test_keras22_hand_built_legacy_file(tmp_path):
    pytest.importorskip("h5py")
    rng = np.random.default_rng(22)
    path = tmp_path / "keras22.h5"
    w = _hand_built_keras22(path, rng)
    x = rng.normal(size=(N, T, IN)) * 2
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    hard = lambda v: np.clip(0.2 * v + 0.5, 0.0, 1.0)  # noqa: E731 - Keras 2 hard_sigmoid
    k, rk, b = w["cu"]
    y1, _, _ = keras_lstm_np(x, k, rk, b[:16].astype(np.float64) + b[16:], sigmoid)
    y2, h2, _ = keras_lstm_np(y1, *w["lstm"], hard, go_backwards=True)
    stack = fk.load_keras(path)
    assert [layer.class_name for layer in stack.layers] == ["CuDNNLSTM", "LSTM"]
    assert rel_err(h2, stack(x)) <= F32_TOL
    # Weights-only legacy layout (save_weights in Keras 2): the same groups at the root.
    import h5py
    wpath = tmp_path / "keras22_weights.h5"
    with h5py.File(path, "r") as src, h5py.File(wpath, "w") as dst:
        for name in ("layer_names", "backend", "keras_version"):
            dst.attrs[name] = src["model_weights"].attrs[name]
        for lname in ("cu_dnnlstm_1", "lstm_1"):
            src.copy(src["model_weights"][lname], dst, lname)
        cfg = src.attrs["model_config"]
    assert rel_err(h2, fk.load_keras(wpath, config=cfg)(x)) <= F32_TOL
    # Without the config: Keras' defaults (sigmoid, forward), so a different result.
    guessed = fk.load_keras(wpath)
    assert [layer.return_sequences for layer in guessed.layers] == [True, False]


# ------------------------------------------------------------------ malformed files
def test_missing_h5py_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(fastlstm.FastLSTMError, match="h5py"):
        fk.load_keras(DATA / "a.h5")


def _assert_format_error_or_loads(data, x):
    try:
        stack = fk.load_keras(io.BytesIO(data))
    except fastlstm.FormatError:
        return "error"
    out = stack(x)  # a mutation in weight bytes still loads: it must run
    assert out is not None
    return "loaded"


@pytest.mark.parametrize("file", ["a.h5", "a.keras", "b_weights.h5"])
def test_truncated_and_fuzzed_files(file):
    pytest.importorskip("h5py")
    data = (DATA / file).read_bytes()
    e = _expected()
    x = e[file[0] + "_x"]
    rng = np.random.default_rng(sum(map(ord, file)))
    outcomes = []
    for cut in sorted(set(rng.integers(0, len(data), 12).tolist()) | {0, 7, 100}):
        with pytest.raises(fastlstm.FormatError):
            fk.load_keras(io.BytesIO(data[:cut]), config=None)
    for _ in range(25):
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf), rng.integers(1, 8)):
            buf[pos] = int(rng.integers(0, 256))
        outcomes.append(_assert_format_error_or_loads(bytes(buf), x))
    assert outcomes  # every mutation either loaded and ran, or raised FormatError


def _rezip(src, **replace):
    with zipfile.ZipFile(src) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    for name, value in replace.items():
        name = name.replace("__", ".")
        if value is None:
            files.pop(name, None)
        else:
            files[name] = value
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n, b in files.items():
            zf.writestr(n, b)
    return buf.getvalue()


def _config_edit(fn):
    with zipfile.ZipFile(DATA / "a.keras") as zf:
        cfg = json.loads(zf.read("config.json"))
    fn(cfg)
    return json.dumps(cfg).encode()


def _layer(cfg, name):
    return next(layer for layer in cfg["config"]["layers"] if layer["config"]["name"] == name)


@pytest.mark.parametrize("replace,match", [
    ({"config__json": b"{not json"}, "JSON"),
    ({"config__json": None}, "config.json"),
    ({"model__weights__h5": None}, "model.weights.h5"),
    ({"model__weights__h5": b"\x89HDF\r\n\x1a\n" + b"\0" * 50}, "HDF5"),
    ({"config__json": b"[1, 2]"}, "config"),
    ({"config__json": _config_edit(lambda c: _layer(c, "lstm")["config"].update(units=7))},
     "units"),
    ({"config__json": _config_edit(
        lambda c: _layer(c, "lstm")["config"].update(activation="gelu"))}, "gelu"),
    ({"config__json": _config_edit(
        lambda c: _layer(c, "bidirectional")["config"].update(merge_mode="max"))}, "merge_mode"),
    ({"config__json": _config_edit(lambda c: c["config"].update(layers="oops"))}, "layers"),
    ({"config__json": _config_edit(lambda c: c["config"]["layers"][1].update(inbound_nodes=5))},
     "inbound"),
])
def test_malformed_keras_archives(replace, match):
    pytest.importorskip("h5py")
    data = _rezip(DATA / "a.keras", **replace)
    with pytest.raises(fastlstm.FormatError, match=match):
        fk.load_keras(io.BytesIO(data))


def test_not_keras_files(tmp_path):
    pytest.importorskip("h5py")
    import h5py
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(fastlstm.FormatError, match="Keras"):
        fk.load_keras(p)
    q = tmp_path / "junk.bin"
    q.write_bytes(b"hello world")
    with pytest.raises(fastlstm.FormatError):
        fk.load_keras(q)
    assert not fk.sniff(b"hello world") and fk.sniff(b"\x89HDF\r\n\x1a\n" + b"\0" * 8)


# ------------------------------------------------- hostile sizes, activations, options
def _fill_only_weights(path, shapes, compression=None):
    """A Keras 3 weights file whose LSTM datasets declare `shapes` but hold no
    data (HDF5 returns the fill value): a few KB declaring many MB."""
    import h5py
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/lstm/cell/vars")
        for k, shape in enumerate(shapes):
            chunks = tuple(min(d, 1024) for d in shape)
            g.create_dataset(str(k), shape=shape, dtype="f4", chunks=chunks,
                             compression=compression, fillvalue=0.0)


@pytest.fixture
def count_reads(monkeypatch):
    """Every HDF5 dataset read (h5py.Dataset.__getitem__) is recorded."""
    h5py = pytest.importorskip("h5py")
    reads = []
    orig = h5py.Dataset.__getitem__

    def getitem(self, key):
        reads.append((self.name, self.shape))
        return orig(self, key)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
    return reads


def test_huge_declared_kernel_is_refused_from_its_header(tmp_path, count_reads):
    # The audit's file: a (20000, 40000) float32 kernel (3.2 GB) in 8 KB.
    path = tmp_path / "bomb.weights.h5"
    _fill_only_weights(path, [(20000, 40000), (4, 16), (16,)], compression="gzip")
    assert path.stat().st_size < 64 << 10
    for call in (fastlstm.list_stacks, fk.list_keras_stacks, fk.load_keras, fastlstm.load):
        with pytest.raises(fastlstm.FormatError, match=r"kernel has shape \(20000, 40000\)"):
            call(path)
    assert count_reads == []  # refused from the shapes: nothing was read


def test_consistent_but_huge_weights_are_refused_before_reading(tmp_path, count_reads):
    # Shapes of a real LSTM(2048) (64 MB of float32) declared in a few KB.
    U = 2048
    path = tmp_path / "big.weights.h5"
    _fill_only_weights(path, [(IN, 4 * U), (U, 4 * U), (4 * U,)])
    assert path.stat().st_size < 64 << 10
    (name, info), = fastlstm.list_stacks(path)  # listing reads headers only
    assert (info["input_size"], info["hidden_size"]) == (IN, U)
    assert count_reads == []
    with pytest.raises(fastlstm.FormatError, match="refused before reading"):
        fk.load_keras(path)
    # Only the kernel (96 KB) fits the budget; the recurrent kernel is never read.
    assert [shape for _, shape in count_reads] == [(IN, 4 * U)]
    # The same weights file inside a .keras archive: the budget is relative to
    # the archive member, whatever the HDF5 inside declares.
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"name": "in", "batch_shape": [None, T, IN]}},
        {"class_name": "LSTM", "config": {"name": "lstm", "units": U}}]}}
    archive = tmp_path / "big.keras"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", json.dumps(config))
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
        zf.write(path, "model.weights.h5")
    assert fastlstm.list_stacks(archive)[0][1]["hidden_size"] == U
    with pytest.raises(fastlstm.FormatError, match="refused before reading"):
        fastlstm.load(archive)


def test_non_float_or_non_dataset_weights_are_refused_unread(tmp_path, count_reads):
    import h5py
    path = tmp_path / "odd.weights.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/lstm/cell/vars")
        g.create_dataset("0", shape=(IN, 16), dtype="i4")
        g.create_dataset("1", shape=(4, 16), dtype="f4")
        g.create_dataset("2", shape=(16,), dtype="f4")
    with pytest.raises(fastlstm.FormatError, match="floating-point"):
        fk.load_keras(path)
    with h5py.File(path, "a") as f:
        del f["layers/lstm/cell/vars/0"]
        f.create_group("layers/lstm/cell/vars/0")
    with pytest.raises(fastlstm.FormatError, match="not an HDF5 dataset"):
        fk.list_keras_stacks(path)
    assert count_reads == []


def _layer_activation_model(keras, activation, seed=0):
    L = keras.layers
    model = keras.Sequential([keras.Input((T, IN)),
                              L.LSTM(4, activation=activation, return_sequences=True)])
    _randomize(model, seed, scale=1.0)
    x = (np.random.default_rng(seed).normal(size=(N, T, IN)) * 3).astype(np.float32)
    return model, x


@pytest.mark.parametrize("make,want_act", [
    (lambda L: L.LeakyReLU(negative_slope=0.01), ("leakyrelu", 0.01)),
    (lambda L: L.LeakyReLU(), ("leakyrelu", 0.3)),
    (lambda L: L.ReLU(), ("relu", None)),
    (lambda L: L.ReLU(negative_slope=0.25), ("leakyrelu", 0.25)),
    (lambda L: L.Activation("softsign"), ("softsign", None)),
])
def test_activation_layers_read_with_their_settings(keras, tmp_path, make, want_act):
    model, x = _layer_activation_model(keras, make(keras.layers))
    path = tmp_path / "act.keras"
    model.save(path)
    want = model.predict(x, verbose=0)
    for src in (path, model):
        stack = fk.load_keras(src)
        lstm = stack.lstms[0]
        assert lstm.activations[1] == want_act[0]
        if want_act[1] is not None:
            assert lstm.activation_alpha[1] == pytest.approx(want_act[1])
        assert rel_err(want, stack(x)) <= F32_TOL


def test_elu_layer_reads_its_alpha(keras, tmp_path):
    # Saved as {"class_name": "ELU", "config": {"name": "elu", "alpha": 0.5, ...}}:
    # "elu" is the layer's name, not the function (whose alpha is 1).
    model, x = _layer_activation_model(keras, keras.layers.ELU(alpha=0.5), seed=1)
    want = model.predict(x, verbose=0)
    path = tmp_path / "elu.keras"
    model.save(path)
    for src in (path, model):
        stack = fk.load_keras(src)
        assert stack.lstms[0].activations[1] == "elu"
        assert stack.lstms[0].activation_alpha[1] == pytest.approx(0.5)
        assert rel_err(want, stack(x)) <= F32_TOL
    with zipfile.ZipFile(path) as zf:
        cfg = json.loads(zf.read("config.json"))
    lstm = next(l for l in cfg["config"]["layers"] if l["class_name"] == "LSTM")
    act = lstm["config"]["activation"]
    assert act["class_name"] == "ELU" and act["config"]["name"].startswith("elu")
    del act["config"]["alpha"]  # not guessed
    data = _rezip(path, config__json=json.dumps(cfg).encode())
    with pytest.raises(fastlstm.FormatError,
                       match=r"layer 'lstm\w*': activation: a serialised 'ELU' layer.*alpha"):
        fk.load_keras(io.BytesIO(data))


@pytest.mark.parametrize("make,match", [
    (lambda L: L.ReLU(max_value=0.5), r"'ReLU' layer.*max_value=0.5"),
    (lambda L: L.ReLU(threshold=0.1), r"'ReLU' layer.*threshold=0.1"),
    (lambda L: L.Softmax(), r"'Softmax' layer.*cannot run"),
])
def test_unsupported_activation_layers_are_refused(keras, tmp_path, make, match):
    model, _ = _layer_activation_model(keras, make(keras.layers))
    path = tmp_path / "act.keras"
    model.save(path)
    with pytest.raises(fastlstm.FormatError, match=r"layer 'lstm\w*': activation: .*" + match):
        fk.load_keras(path)


def test_unknown_serialized_activation_object(built):
    model, x, want, paths = built("lstm")
    with zipfile.ZipFile(paths["keras"]) as zf:
        cfg = json.loads(zf.read("config.json"))
    lstm = next(l for l in cfg["config"]["layers"] if l["class_name"] == "LSTM")
    lstm["config"]["recurrent_activation"] = {
        "module": "my_pkg", "class_name": "Sigmoidish", "config": {"name": "sigmoid"},
        "registered_name": "my_pkg>Sigmoidish"}
    data = _rezip(paths["keras"], config__json=json.dumps(cfg).encode())
    with pytest.raises(fastlstm.FormatError,
                       match=r"recurrent_activation: a serialised 'Sigmoidish'"):
        fk.load_keras(io.BytesIO(data))


def test_stateful_layers_warn(keras, tmp_path):
    L = keras.layers
    inp = keras.Input((T, IN), batch_size=N)
    model = _randomize(keras.Model(inp, L.LSTM(4, stateful=True, return_sequences=True,
                                               unroll=True)(inp)), 12)
    path = tmp_path / "stateful.keras"
    model.save(path)
    x = np.random.default_rng(12).normal(size=(N, T, IN)).astype(np.float32)
    first = model.predict(x, verbose=0, batch_size=N)
    with pytest.warns(UserWarning, match=r"'lstm\w*' are stateful=True.*initial_state=.*stream"):
        stack = fk.load_keras(path)
    assert stack.layers[0].stateful
    assert fk.list_keras_stacks(path)[0]["layers"][0]["stateful"] is True
    assert rel_err(first, stack(x)) <= F32_TOL  # a first call: Keras' zero state too
    with pytest.warns(UserWarning, match="stateful"):
        fk.from_keras(model)


def test_fastlstm_load_options_on_keras_files(built):
    model, x, want, paths = built("stacked")
    stack = fastlstm.load(paths["keras"])
    q = fastlstm.load(paths["keras"], weights="int8")
    assert isinstance(q, fk.KerasStack) and len(q.layers) == len(stack.layers)
    assert all(m.weights_precision == "int8" for m in q.lstms)
    assert all(m.weights_precision == "float32" for m in stack.lstms)
    ref = stack.astype("int8")
    assert rel_err(ref(x), q(x)) == 0.0
    assert rel_err(want, q(x)) <= 0.1
    with pytest.raises(ValueError, match="weights"):
        fastlstm.load(paths["keras"], weights="int4")
    # batch_first: the Keras layout by default; False takes and gives (T, N, ...).
    assert rel_err(want, fastlstm.load(paths["keras"], batch_first=True)(x)) <= F32_TOL
    model_b, x_b, want_b, paths_b = built("bi_concat")
    tm = fastlstm.load(paths_b["keras"], batch_first=False)
    assert rel_err(want_b.transpose(1, 0, 2), tm(x_b.transpose(1, 0, 2))) <= F32_TOL
    time_major = fastlstm.load(paths["keras"], batch_first=False)
    assert rel_err(want, time_major(x.transpose(1, 0, 2))) <= F32_TOL  # last output: (N, U)
    f64 = fastlstm.load(paths["h5"], dtype=np.float64, num_threads=1)
    assert all(np.dtype(m.dtype) == np.float64 for m in f64.lstms)
    assert rel_err(want, f64(x)) <= F32_TOL
    with pytest.raises(TypeError, match="batch_first"):
        fastlstm.load(paths["keras"], batch_first="yes")
    with pytest.raises(TypeError, match=r"^activations: not an argument for Keras files"):
        fastlstm.load(paths["keras"], activations=("sigmoid", "tanh", "tanh"))


def test_damaged_attribute_type_is_a_format_error_not_a_crash():
    """A Keras 3 .weights.h5 with 7 bytes changed (found by byte mutation):
    an attribute's type record says variable-length sequence where Keras wrote
    a variable-length string, and libhdf5 crashes (SIGSEGV) converting it.
    Attribute type classes are checked first: every entry point gives a
    FormatError.  Run in subprocesses, so a regression fails instead of
    killing the test run."""
    import subprocess
    import sys
    path = os.path.join(os.path.dirname(__file__), "data", "keras_damaged", "vlen_type.weights.h5")
    for call in ("fastlstm.list_stacks(p)", "fastlstm.load(p)", "fastlstm.io.keras.load_keras(p)"):
        code = ("import fastlstm, fastlstm.io.keras\n"
                f"p = {path!r}\n"
                "try:\n"
                f"    {call}\n"
                "except fastlstm.FormatError as e:\n"
                "    print('FormatError', e)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, (call, r.returncode, r.stderr[-500:])
        assert r.stdout.startswith("FormatError") and "type class" in r.stdout, (call, r.stdout)

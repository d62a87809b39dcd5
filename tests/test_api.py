"""The NumPy API: shapes, layouts, dtypes, weights, errors."""
import os

import numpy as np
import pytest

import fastlstm
from fastlstm import DTypeError, ShapeError, WeightsError
from tolerances import assert_lstm_close


def test_readme_example():
    m = fastlstm.LSTM(8, 16, num_layers=2, bidirectional=True)
    out, (h, c) = m(np.zeros((5, 3, 8), np.float32))
    assert out.shape == (5, 3, 32) and h.shape == (4, 3, 16) and c.shape == (4, 3, 16)


@pytest.mark.parametrize("bf", [False, True])
def test_shapes(bf):
    m = fastlstm.LSTM(3, 10, num_layers=3, bidirectional=True, proj_size=4, batch_first=bf)
    x = np.ones((2, 7, 3) if bf else (7, 2, 3), np.float32)
    out, (h, c) = m(x)
    assert out.shape == ((2, 7, 8) if bf else (7, 2, 8))
    assert h.shape == (6, 2, 4) and c.shape == (6, 2, 10)
    out, (h, c) = m(np.ones((7, 3), np.float32))  # unbatched ignores batch_first
    assert out.shape == (7, 8) and h.shape == (6, 4) and c.shape == (6, 10)


def test_unbatched_equals_batch_of_one():
    rng = np.random.default_rng(0)
    m = fastlstm.LSTM(4, 9, bidirectional=True, seed=1)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    out1, (h1, c1) = m(x)
    out2, (h2, c2) = m(x[:, None, :])
    np.testing.assert_array_equal(out1, out2[:, 0])
    np.testing.assert_array_equal(h1, h2[:, 0])


def test_reverse_h_n_is_state_after_t0():
    rng = np.random.default_rng(0)
    m = fastlstm.LSTM(4, 9, bidirectional=True, seed=1)
    x = rng.standard_normal((6, 2, 4)).astype(np.float32)
    out, (h, c) = m(x)
    np.testing.assert_array_equal(h[0], out[-1, :, :9])
    np.testing.assert_array_equal(h[1], out[0, :, 9:])


@pytest.mark.parametrize("layout", ["F", "noncontig", "transposed", "readonly", "int", "float16",
                                    "float64"])
def test_input_layouts_and_dtypes(layout):
    rng = np.random.default_rng(3)
    m = fastlstm.LSTM(5, 7, seed=2)
    base = rng.standard_normal((6, 3, 5)).astype(np.float32)
    if layout == "F":
        x = np.asfortranarray(base)
    elif layout == "noncontig":
        big = np.zeros((12, 3, 10), np.float32)
        big[::2, :, ::2] = base
        x = big[::2, :, ::2]
    elif layout == "transposed":
        x = np.ascontiguousarray(base.transpose(1, 0, 2)).transpose(1, 0, 2)
    elif layout == "readonly":
        x = base.copy()
        x.flags.writeable = False
    elif layout == "int":
        base = np.round(base * 3)
        x = base.astype(np.int32)
    elif layout == "float16":
        base = base.astype(np.float16).astype(np.float32)
        x = base.astype(np.float16)
    else:
        x = base.astype(np.float64)
    out = m(x)
    assert out[0].dtype == np.float32
    assert_lstm_close(out, m(np.ascontiguousarray(base, dtype=np.float32)), np.float32)
    assert_lstm_close(out, m.reference(base), np.float32)


def test_list_input():
    m = fastlstm.LSTM(2, 3, seed=0)
    x = [[[0.5, -1.0]], [[1.0, 2.0]]]
    assert_lstm_close(m(x), m.reference(np.array(x)), np.float32)


def test_float64_model():
    m = fastlstm.LSTM(3, 5, dtype=np.float64, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    out, _ = m(x)
    assert out.dtype == np.float64
    assert_lstm_close(m(x), m.reference(x), np.float64)


@pytest.mark.parametrize("bad, exc, words", [
    (np.zeros((2, 3, 4, 5), np.float32), ShapeError, "x: expected a 2-D"),
    (np.zeros(5, np.float32), ShapeError, "x: expected a 2-D"),
    (np.zeros((2, 3, 4), np.float32), ShapeError, "input_size 5"),
    (np.array([["a", "b"]]), DTypeError, "x: expected a real numeric"),
    (np.zeros((2, 1, 5), object), DTypeError, "x: expected a real numeric"),
    (np.zeros((2, 1, 5), complex), DTypeError, "x: expected a real numeric"),
    (np.zeros((2, 1, 5), bool), DTypeError, "x: expected a real numeric"),
    (3.0, ShapeError, "x: expected a 2-D"),
])
def test_bad_x(bad, exc, words):
    m = fastlstm.LSTM(5, 4)
    with pytest.raises(exc, match=words):
        m(bad)


def test_shape_errors_are_value_errors_and_dtype_errors_type_errors():
    assert issubclass(ShapeError, ValueError) and issubclass(DTypeError, TypeError)
    assert issubclass(ShapeError, fastlstm.FastLSTMError)


@pytest.mark.parametrize("hx, words", [
    ((np.zeros((1, 2, 4)), np.zeros((1, 2, 4))), r"hx\[0\] \(h_0\): expected shape \(2, 2, 4\)"),
    ((np.zeros((2, 2, 4)), np.zeros((2, 3, 4))), r"hx\[1\] \(c_0\): expected shape \(2, 2, 4\)"),
    ((np.zeros((2, 2, 4)),), "hx: expected a tuple"),
    (np.zeros((2, 2, 4)), "hx: expected a tuple"),
])
def test_bad_hx(hx, words):
    m = fastlstm.LSTM(5, 4, num_layers=2)
    with pytest.raises(ShapeError, match=words):
        m(np.zeros((3, 2, 5), np.float32), hx)


def test_bad_hx_dtype():
    m = fastlstm.LSTM(5, 4)
    with pytest.raises(DTypeError, match=r"hx\[0\]"):
        m(np.zeros((3, 2, 5), np.float32), (np.zeros((1, 2, 4), object), np.zeros((1, 2, 4))))


def test_constructor_errors():
    with pytest.raises(ValueError, match="hidden_size"):
        fastlstm.LSTM(3, 0)
    with pytest.raises(ValueError, match="proj_size"):
        fastlstm.LSTM(3, 4, proj_size=4)
    with pytest.raises(TypeError, match="num_layers"):
        fastlstm.LSTM(3, 4, num_layers=1.5)
    with pytest.raises(DTypeError, match="dtype"):
        fastlstm.LSTM(3, 4, dtype=np.float16)
    with pytest.raises(ValueError, match="activations"):
        fastlstm.LSTM(3, 4, activations=("sigmoid", "tanh", "nope"))


@pytest.mark.parametrize("kwargs,exc,name", [
    ({"dropout": "x"}, TypeError, "dropout"), ({"dropout": None}, TypeError, "dropout"),
    ({"clip": "x"}, TypeError, "clip"), ({"cell_clip": [1]}, TypeError, "cell_clip"),
    ({"activation_alpha": ("a", None, None)}, TypeError, "activation_alpha"),
    ({"seed": "a"}, ValueError, "seed"), ({"seed": -1}, ValueError, "seed"),
    ({"bias": np.array([1, 2])}, TypeError, "bias"), ({"bidirectional": "yes"}, TypeError,
                                                      "bidirectional"),
    ({"num_threads": 0}, ValueError, "num_threads"), ({"num_threads": "2"}, TypeError,
                                                      "num_threads"),
    ({"num_threads": 1.5}, TypeError, "num_threads"), ({"num_threads": True}, TypeError,
                                                        "num_threads"),
])
def test_constructor_errors_name_the_argument(kwargs, exc, name):
    """Bad constructor arguments are refused at construction, naming the argument
    (not at the first call, and not with NumPy's or float()'s own words)."""
    with pytest.raises(exc, match=name):
        fastlstm.LSTM(3, 4, **kwargs)


def test_constructor_accepts_torch_style_values():
    m = fastlstm.LSTM(3, 4, dtype=None, bias=1, bidirectional=np.True_, num_threads=np.int64(2),
                      seed=np.int64(3))
    assert m.dtype == np.float32 and m.bias and m.bidirectional  # dtype=None: float32, as torch


@pytest.mark.parametrize("attr,value", [
    ("num_layers", 1), ("hidden_size", 16), ("input_size", 1), ("proj_size", 2),
    ("dtype", np.float64), ("bidirectional", True), ("bias", False), ("clip", 1.0),
    ("activations", ("relu", "tanh", "tanh")), ("weights_precision", "int8")])
def test_configuration_is_fixed_after_construction(attr, value):
    """Assigning a size or cell option after construction would run the packed
    engine against arrays sized for the new value (out-of-bounds reads) or
    silently keep the old cell: refused, naming the attribute; the model still
    runs as before.  batch_first and num_threads stay assignable."""
    m = fastlstm.LSTM(3, 8, num_layers=2, seed=1)
    x = np.random.default_rng(1).standard_normal((4, 2, 3)).astype(np.float32)
    want = m(x)[0]
    with pytest.raises(AttributeError, match=attr):
        setattr(m, attr, value)
    np.testing.assert_array_equal(m(x)[0], want)
    m.batch_first = True
    np.testing.assert_array_equal(m(x.transpose(1, 0, 2))[0], want.transpose(1, 0, 2))
    m.num_threads = 1
    np.testing.assert_array_equal(m(x.transpose(1, 0, 2))[0], want.transpose(1, 0, 2))


def test_padding_checked_without_lengths():
    m = fastlstm.LSTM(3, 4)
    with pytest.raises(ValueError, match="padding"):
        m(np.zeros((2, 1, 3), np.float32), padding="bogus")


def test_empty_lengths_list_for_an_empty_batch():
    m = fastlstm.LSTM(3, 4)
    out, (h, c) = m(np.zeros((5, 0, 3), np.float32), lengths=[])
    assert out.shape == (5, 0, 4) and h.shape == (1, 0, 4)


def test_from_state_dict_keeps_float64_of_either_byte_order():
    sd = fastlstm.LSTM(3, 4, dtype=np.float64, seed=2).state_dict()
    big = {k: v.astype(">f8") for k, v in sd.items()}
    m = fastlstm.LSTM.from_state_dict(big)
    assert m.dtype == np.float64
    np.testing.assert_array_equal(m.state_dict()["weight_hh_l0"], sd["weight_hh_l0"])


def test_nonfinite_recurrent_weights_without_hx():
    """hx omitted means h_0 = 0, and 0 * Inf is NaN: an Inf or NaN in W_hh
    reaches the outputs from t = 0, as with an explicit zero hx and in torch
    (the engine skips the product with a zero h; the model passes zeros)."""
    for bad in (np.inf, np.nan):
        m = fastlstm.LSTM(3, 4, seed=0)
        w = m.state_dict()["weight_hh_l0"]
        w[1, 2] = bad
        m.load_state_dict({"weight_hh_l0": w}, strict=False)
        x = np.zeros((3, 2, 3), np.float32)
        zeros = (np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 4), np.float32))
        got, want = m(x), m(x, zeros)
        assert np.isnan(got[0][0]).any()
        np.testing.assert_array_equal(got[0], want[0])
        ref = m.reference(x)[0]
        assert np.array_equal(np.isnan(got[0]), np.isnan(ref))


def test_state_dict_errors_name_the_key():
    m = fastlstm.LSTM(3, 4, num_layers=2)
    sd = m.state_dict()
    del sd["weight_hh_l1"]
    with pytest.raises(WeightsError, match="weight_hh_l1"):
        m.load_state_dict(sd)
    sd = m.state_dict()
    sd["bias_ih_l0"] = np.zeros(5)
    with pytest.raises(WeightsError, match=r"bias_ih_l0.*\(16,\)"):
        m.load_state_dict(sd)
    sd = m.state_dict()
    sd["weight_ih_l7"] = np.zeros((16, 3))
    with pytest.raises(WeightsError, match="weight_ih_l7"):
        m.load_state_dict(sd)
    with pytest.raises(WeightsError, match="weight_ih_l0"):
        fastlstm.LSTM.from_state_dict({"foo": np.zeros(3)})
    with pytest.raises(WeightsError, match="weight_ih_l0"):
        fastlstm.LSTM.from_state_dict({"weight_ih_l0": np.zeros((16, 3)), "weight_hh_l0": np.zeros((12, 4))})


def test_weights_set_get_and_repack():
    """Changing weights repacks: the next call sees them (no stale cache)."""
    rng = np.random.default_rng(5)
    m = fastlstm.LSTM(3, 4, bidirectional=True, seed=0)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    before = m(x)[0]
    w = m.get_weights(0, 1)
    assert w["w_ih"].shape == (16, 3) and w["w_hr"] is None
    w["w_ih"][:] = 0  # a copy: the model is unchanged
    np.testing.assert_array_equal(m(x)[0], before)
    new_w = rng.standard_normal((16, 3))
    m.set_weights(0, 1, w_ih=new_w)
    after = m(x)[0]
    np.testing.assert_array_equal(after[:, :, :4], before[:, :, :4])
    assert not np.allclose(after[:, :, 4:], before[:, :, 4:])
    np.testing.assert_array_equal(m.get_weights(0, 1)["w_ih"], new_w.astype(np.float32))
    assert_lstm_close(m(x), m.reference(x), np.float32)


def test_zero_length_and_zero_batch():
    m = fastlstm.LSTM(3, 4, num_layers=2)
    out, (h, c) = m(np.zeros((0, 2, 3), np.float32))
    assert out.shape == (0, 2, 4) and h.shape == (2, 2, 4) and not h.any() and not c.any()
    h0 = np.ones((2, 2, 4), np.float32)
    out, (h, c) = m(np.zeros((0, 2, 3), np.float32), (h0, 2 * h0))
    np.testing.assert_array_equal(h, h0)
    np.testing.assert_array_equal(c, 2 * h0)
    out, (h, c) = m(np.zeros((5, 0, 3), np.float32))
    assert out.shape == (5, 0, 4) and h.shape == (2, 0, 4)


def test_nan_propagates():
    m = fastlstm.LSTM(3, 4, seed=0)
    x = np.zeros((4, 2, 3), np.float32)
    x[1, 0, 0] = np.nan
    out, (h, c) = m(x)
    assert np.isnan(out[1:, 0]).all() and not np.isnan(out[:, 1]).any()
    assert not np.isnan(out[0]).any()


def test_cpu_info_and_set_isa():
    info = fastlstm.cpu_info()
    assert info["isa"] in info["isas_available"]
    assert fastlstm.set_isa("portable") == "portable"
    assert fastlstm.cpu_info()["isa"] == "portable"
    assert fastlstm.set_isa(None) == info["isa_detected"]
    with pytest.raises(ValueError, match="name"):
        fastlstm.set_isa("sse9")


def test_num_threads():
    prev = fastlstm.get_num_threads()
    fastlstm.set_num_threads(1)
    assert fastlstm.get_num_threads() == 1
    fastlstm.set_num_threads(None)
    assert fastlstm.get_num_threads() == fastlstm.cpu_info()["num_cpus"]
    with pytest.raises(ValueError):
        fastlstm.set_num_threads(0)
    m = fastlstm.LSTM(3, 4)
    with pytest.raises(ValueError, match="num_threads"):
        m(np.zeros((2, 1, 3), np.float32), num_threads=0)
    fastlstm.set_num_threads(prev)


@pytest.mark.parametrize("isa", fastlstm.cpu_info()["isas_available"])
def test_cache_tuning_never_changes_results(isa):
    # The K chunk and the panel prefetch are chosen per CPU (csrc/engine.c,
    # fl_tune_init); row tiles are balanced (batch 8 -> 4 + 4) and the
    # input GEMM tiles time steps x batch as one matrix.  None of it may
    # change a bit: every sum is one sequential chain per output.
    from fastlstm import _engine
    from tolerances import assert_lstm_close
    kc0, pf0 = _engine.tune("kc"), _engine.tune("prefetch")
    prev = fastlstm.cpu_info()["isa"]
    try:
        fastlstm.set_isa(isa)
        rng = np.random.default_rng(5)
        # K = 300 and 200: several chunks for small kc, an uneven last chunk
        m = fastlstm.LSTM(300, 200, num_layers=2, seed=3)
        for N in (1, 7, 8, 13, 32):
            x = rng.standard_normal((9, N, 300)).astype(np.float32)
            lengths = rng.integers(0, 10, N)
            ref = None
            for kc in (16, 48, 128, 512, 4096):
                for pf in (0, 1):
                    _engine.tune("kc", kc)
                    _engine.tune("prefetch", pf)
                    got = m(x, lengths=lengths, num_threads=2)
                    if ref is None:
                        ref = got
                        assert_lstm_close(m(x), m.reference(x), np.float32, f"N={N}")
                    else:
                        assert np.array_equal(got[0], ref[0]), (N, kc, pf)
                        assert np.array_equal(got[1][0], ref[1][0]) and np.array_equal(got[1][1], ref[1][1])
        with pytest.raises(ValueError, match="knob"):
            _engine.tune("blocking")
        with pytest.raises(ValueError, match="read-only"):
            _engine.tune("gchunk", 1 << 20)
        assert _engine.tune("gchunk") >= 1 << 16
    finally:
        _engine.tune("kc", kc0)
        _engine.tune("prefetch", pf0)
        fastlstm.set_isa(prev)


def test_fma_peak_runs_on_every_isa():
    # the benchmarks' "% of peak" divides by this measurement (no timing is
    # asserted here: only that every path runs and returns a rate)
    from fastlstm import _engine
    prev = fastlstm.cpu_info()["isa"]
    try:
        for isa in fastlstm.cpu_info()["isas_available"]:
            fastlstm.set_isa(isa)
            g = _engine.fma_peak_gflops(0.02)
            assert np.isfinite(g) and g > 0, (isa, g)
        for bad in (0, -1, 11, float("nan")):
            with pytest.raises(ValueError, match="seconds"):
                _engine.fma_peak_gflops(bad)
    finally:
        fastlstm.set_isa(prev)


def test_read_bandwidth_probe_runs_on_every_isa():
    # the benchmarks' "% of read bandwidth" and streaming "read floor" divide
    # by this measurement (no timing asserted: every path and thread count
    # runs, reports the threads it ran, and bad arguments are refused)
    from fastlstm import _engine
    prev = fastlstm.cpu_info()["isa"]
    try:
        for isa in fastlstm.cpu_info()["isas_available"]:
            fastlstm.set_isa(isa)
            for nbytes, threads in ((512, 1), (1000, 2), (3 << 16, 2), (1 << 20, 1)):
                g, used = _engine.read_bandwidth_gbps(nbytes, threads, 0.01)
                assert np.isfinite(g) and g > 0, (isa, nbytes, threads, g)
                assert 1 <= used <= threads, (isa, nbytes, threads, used)
    finally:
        fastlstm.set_isa(prev)
    # no more threads than CPUs (the pool's workers persist)
    g, used = _engine.read_bandwidth_gbps(4096, 64, 0.01)
    assert g > 0 and 1 <= used <= (os.cpu_count() or 1)
    for bad in (0, 511, 1 << 35, -1):
        with pytest.raises(ValueError, match="nbytes"):
            _engine.read_bandwidth_gbps(bad)
    for bad in (1.5, "4096", True, None):
        with pytest.raises(TypeError, match="nbytes"):
            _engine.read_bandwidth_gbps(bad)
    for bad in (0, 65, -2):
        with pytest.raises(ValueError, match="threads"):
            _engine.read_bandwidth_gbps(4096, bad)
    for bad in (0, -1, 11, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            _engine.read_bandwidth_gbps(4096, 1, bad)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the round-trip probe needs two CPUs")
def test_core_roundtrip_probe():
    # bench_stream.py and stream_breakdown.py report it beside two-thread
    # steps (no timing asserted: a positive, finite round trip, well under a
    # millisecond even on a busy machine: each run averages >= 1000 trips)
    from fastlstm import _engine
    for seconds in (0.005, 0.02):
        r = _engine.core_roundtrip_ns(seconds)
        assert r is not None and np.isfinite(r) and 0 < r < 1e6, r
    # the pool is free again afterwards: a two-thread call still splits
    m = fastlstm.LSTM(8, 64, seed=0)
    s = m.stream(1, num_threads=2)
    x = np.ones(8, np.float32)
    assert np.array_equal(s.step(x), m.stream(1, num_threads=1).step(x))
    for bad in (0, -1, 11, float("nan")):
        with pytest.raises(ValueError, match="seconds"):
            _engine.core_roundtrip_ns(bad)


@pytest.mark.parametrize("batch_first", [False, True])
def test_call_fast_path_matches_general_path(batch_first):
    """m(x, hx) takes a short path for inputs that need no conversion (a
    C-contiguous 3-D array of the model's dtype, hx None or exact arrays);
    it gives bitwise what the general path gives for the same values, and
    anything else takes the general path."""
    rng = np.random.default_rng(21)
    m = fastlstm.LSTM(7, 10, num_layers=2, proj_size=4, seed=21)
    m.batch_first = batch_first  # not fixed at construction: read on every call
    shape = (3, 5, 7) if batch_first else (5, 3, 7)
    x = rng.standard_normal(shape).astype(np.float32)
    h0 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    c0 = rng.standard_normal((2, 3, 10)).astype(np.float32)
    assert m._call_fast(x, (h0, c0), None) is not None
    fast = m(x, (h0, c0))
    general = m(np.asfortranarray(x.astype(np.float64)), [h0.astype(np.float64), c0])
    for a, b in ((fast[0], general[0]), (fast[1][0], general[1][0]), (fast[1][1], general[1][1])):
        assert np.array_equal(a, b)
    assert fast[0].shape == ((3, 5, 4) if batch_first else (5, 3, 4))
    # what the short path leaves to the general one
    for args in [(x.astype(np.float64), None), (np.asfortranarray(x), None), (x[:, :, :6], None),
                 (x[0], None), (list(x), None), (x, (h0, c0[:, :2])), (x, (h0.astype(np.float64), c0)),
                 (x, (h0,)), (x, (h0[:, :, ::-1], c0))]:
        assert m._call_fast(args[0], args[1], None) is None
    swapped = x.astype(x.dtype.newbyteorder())
    for args in [(swapped, None), (x, (h0.astype(h0.dtype.newbyteorder()), c0)),
                 (x, (h0, np.ascontiguousarray(c0[..., None]))), (x, {0: h0, 1: c0}),
                 (x, (list(h0), c0))]:
        assert m._call_fast(args[0], args[1], None) is None
    fs, gs = m(swapped), m(x.astype(np.float64))  # byte-swapped input: the general path, same bits
    assert np.array_equal(fs[0], gs[0])
    # W_hh with an Inf and no hx: the general path's explicit zero state (NaN as torch)
    sd = m.state_dict()
    sd["weight_hh_l0"][0, 0] = np.inf
    m.load_state_dict(sd)
    assert m._call_fast(x, None, None) is None
    assert np.isnan(m(x)[0]).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("T,N", [(1, 1), (6, 3), (0, 2), (4, 0)])
def test_call_fast_path_bitwise_across_models(dtype, bidirectional, T, N):
    """The short path (Stack.call_fast) gives bitwise the general path's
    out, h_n and c_n for float32 and float64 models, one and two directions,
    hx given or not, batch_first or not, and empty T or N."""
    rng = np.random.default_rng(T * 10 + N)
    m = fastlstm.LSTM(5, 6, num_layers=2, bidirectional=bidirectional, dtype=dtype, seed=3)
    D = 2 if bidirectional else 1
    for bf in (False, True):
        m.batch_first = bf
        x = rng.standard_normal((N, T, 5) if bf else (T, N, 5)).astype(dtype)
        h0 = rng.standard_normal((2 * D, N, 6)).astype(dtype)
        c0 = rng.standard_normal((2 * D, N, 6)).astype(dtype)
        for hx in (None, (h0, c0)):
            fast = m._call_fast(x, hx, None)
            assert fast is not None
            # padding="repeat" without lengths: the same outputs, always the general path
            general = m(x, hx, padding="repeat")
            assert fast[0].shape == general[0].shape
            assert np.array_equal(fast[0], general[0])
            assert np.array_equal(fast[1][0], general[1][0])
            assert np.array_equal(fast[1][1], general[1][1])

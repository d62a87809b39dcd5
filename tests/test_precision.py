"""Reduced-precision recurrent weights (LSTM.astype): every precision on every
ISA path against the float64 reference of the dequantized weights (float32
bound) and against the float32 model (PRECISION_TOL); the stored forms;
save/load; load(weights=); errors; lengths=, streaming, threads, pickle.
Bounds and their measurements: tests/tolerances.py."""
import itertools
import json
import pickle

import numpy as np
import pytest

import fastlstm
from fastlstm import DTypeError, FormatError
from fastlstm.io import native
from fastlstm.io import safetensors as fst
from fastlstm import _engine
from fastlstm.reference import quantize_h_int16
from tolerances import (BF16_REF_TOL, FORMS, INT8_A8_REF_TOL, INT8_REF_TOL, PRECISION_TOL, TOL,
                        assert_lstm_close, max_rel_err)

# "int8" is astype("int8"): int8 W_ih and W_hh, 8-bit codes of h and the inputs
PRECISIONS = ("float16", "bfloat16", "int8")
ALL = ("float32",) + PRECISIONS
# the other forms (keys of PRECISION_TOL): int8 with 16-bit codes; float32
# W_ih (int8 W_hh only); both -- the int8 model before int8 input weights and
# 8-bit codes, still saved as version 2; bfloat16 with float32 activations;
# with float32 W_ih; both (the bfloat16 model before bfloat16 dot products,
# still saved as version 2)
I8_A16 = "int8_a16"
I8_F32IN = "int8_f32in"
I8_F32IN_A16 = "int8_f32in_a16"
BF16_A32 = "bfloat16_a32"
BF16_F32IN = "bfloat16_f32in"
BF16_F32IN_A32 = "bfloat16_f32in_a32"
VARIANTS = (I8_A16, I8_F32IN, I8_F32IN_A16, BF16_A32, BF16_F32IN, BF16_F32IN_A32)
assert set(VARIANTS) == set(FORMS)


def _astype(m, prec):
    if prec in FORMS:
        return m.astype(FORMS[prec][0], **FORMS[prec][1])
    return m.astype(prec)


def _ref_tol(prec):
    """The bound against the float64 reference of the same quantized model."""
    if prec.startswith("int8"):
        return INT8_REF_TOL if prec.endswith("_a16") else INT8_A8_REF_TOL
    if prec in ("bfloat16", BF16_F32IN):  # h (and x) rounded to bfloat16 on both sides
        return BF16_REF_TOL
    return TOL[np.dtype(np.float32)]

CONFIGS = [  # (input, hidden, batch, T, options)
    (5, 8, 1, 30, {}),
    (7, 17, 5, 40, {}),
    (9, 33, 1, 25, {"bidirectional": True}),
    (4, 33, 5, 20, {"num_layers": 2}),
    (6, 17, 5, 20, {"num_layers": 2, "bidirectional": True, "proj_size": 5}),
    (12, 64, 5, 30, {"proj_size": 20}),
    (16, 128, 1, 20, {}),
    (5, 17, 5, 15, {"peepholes": True, "clip": 3.0}),
]
IDS = ["I{}_H{}_N{}_T{}_".format(*c[:4]) + ("_".join(f"{k}{v}" for k, v in c[4].items())
                                           or "plain") for c in CONFIGS]


def _model(cfg, seed=0):
    In, H, N, T, opts = cfg
    m = fastlstm.LSTM(In, H, seed=seed, **opts)
    if opts.get("peepholes"):  # peepholes start at zero: give them values
        rng = np.random.default_rng(seed + 100)
        m.load_state_dict({k: rng.uniform(-0.3, 0.3, v.shape).astype(np.float32)
                           for k, v in m.state_dict().items() if k.startswith("peephole_")},
                          strict=False)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((T, N, In)).astype(np.float32)
    return m, x


def _err(a, b):
    (o, (h, c)), (ro, (rh, rc)) = a, b
    return max(max_rel_err(o, ro), max_rel_err(h, rh), max_rel_err(c, rc))


def _bitwise(a, b, what=""):
    (o, (h, c)), (ro, (rh, rc)) = a, b
    for got, want, name in ((o, ro, "out"), (h, rh, "h_n"), (c, rc, "c_n")):
        assert got.dtype == want.dtype and np.array_equal(got, want), f"{what} {name}"
        assert got.tobytes() == want.tobytes(), f"{what} {name} (signed zeros / NaN bits)"


def _same_quantized(a, b):
    qa, qb = a.quantized_weights(), b.quantized_weights()
    assert qa.keys() == qb.keys()
    for k in qa:
        assert qa[k][0] == qb[k][0] and len(qa[k]) == len(qb[k]), k
        for x, y in zip(qa[k][1:], qb[k][1:]):
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


# ------------------------------------------------------------ accuracy
def _assert_ref_close(got, ref, prec, what):
    """float32 bound; int8 (h, and x with int8 W_ih, quantized the same way on
    both sides): INT8_A8_REF_TOL with 8-bit codes, INT8_REF_TOL with 16-bit."""
    tol = _ref_tol(prec)
    err = _err(got, ref)
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("prec", ALL + VARIANTS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_matches_reference_of_dequantized_weights(isa, cfg, prec):
    """The engine computes exactly with the weights state_dict() reports (and,
    for int8, with h_{t-1} quantized to int16 per row as the reference does):
    the float64 reference on them is within the float32 bound."""
    m, x = _model(cfg)
    q = _astype(m, prec)
    assert q.weights_precision == prec.split("_")[0] and q.dtype == np.float32
    assert q.input_weights_precision == (
        "float32" if "_f32in" in prec else q.weights_precision if q.weights_precision in
        ("int8", "bfloat16") else "float32")
    if prec.startswith("int8"):
        assert q.activation_bits == (16 if prec.endswith("_a16") else 8)
    elif prec.startswith("bfloat16"):
        assert q.activation_bits == (32 if prec.endswith("_a32") else 16)
    for nt in (1, 2):
        _assert_ref_close(q(x, num_threads=nt), q.reference(x.astype(np.float64)), prec,
                          f"{prec} {isa} threads={nt}")


@pytest.mark.parametrize("prec", ["int8", I8_A16])
@pytest.mark.parametrize("H,proj", [(302, 0), (520, 0), (600, 257), (280, 259)],
                         ids=["H302", "H520", "H600_P257", "H280_P259"])
def test_int8_long_k(isa, H, proj, prec):
    """K > 256: the int32 sums run in chunks of 256 k; K = 0, 1, 2, 3 mod 4
    (the panels hold whole k quads, zero-padded)."""
    rng = np.random.default_rng(H)
    q = _astype(fastlstm.LSTM(7, H, proj_size=proj, seed=H), prec)
    x = rng.standard_normal((6, 3, 7)).astype(np.float32)
    h0 = rng.standard_normal((1, 3, proj or H)).astype(np.float32)
    c0 = rng.standard_normal((1, 3, H)).astype(np.float32)
    for nt in (1, 2):
        _assert_ref_close(q(x, (h0, c0), num_threads=nt), q.reference(x, (h0, c0)), prec,
                          f"{isa} H={H} P={proj} threads={nt}")


@pytest.mark.parametrize("prec", [I8_A16, "int8"])
def test_int8_extreme_sums(isa, prec):
    """Every int8 weight at +-127 and every h code at its largest (32767, or
    127 with 8-bit codes): the largest integer sums a chunk can hold
    (256 * 127 * 32767 < 2**31), no overflow."""
    H = 600
    m = fastlstm.LSTM(1, H, seed=0, bias=False)
    w = np.full((4 * H, H), 0.01, np.float32)
    w[1::2] = -0.01
    m.set_weights(0, 0, w_hh=w, w_ih=np.zeros((4 * H, 1), np.float32))
    q = _astype(m, prec)
    assert np.abs(q.quantized_weights()["weight_hh_l0"][1]).min() == 127
    x = np.zeros((2, 2, 1), np.float32)
    h0 = np.ones((1, 2, H), np.float32)
    h0[0, 1] = -1.0
    c0 = np.zeros((1, 2, H), np.float32)
    got = q(x, (h0, c0))
    _assert_ref_close(got, q.reference(x, (h0, c0)), prec, isa)
    # the pre-activations are +-6 (600 * 0.01): the gates saturate visibly
    assert np.abs(got[0][0]).max() > 0.5


def test_int8_many_rows_threads():
    """So many rows that the per-thread int16 copies of h of a hidden split
    would not fit the workspace plan (~4 MB): the rows are split instead.
    Bitwise the same for every thread count, and like the reference."""
    rng = np.random.default_rng(5)
    q = fastlstm.LSTM(3, 32, seed=5).astype("int8")
    x = rng.standard_normal((3, 40000, 3)).astype(np.float32)
    want = q(x, num_threads=1)
    for nt in (2, 3):
        _bitwise(q(x, num_threads=nt), want, f"threads={nt}")
    rows = [0, 17, 39999]
    ref = q.reference(x[:, rows])
    _assert_ref_close((want[0][:, rows], (want[1][0][:, rows], want[1][1][:, rows])), ref, "int8",
                      "rows")


def _exact_input_model(opts, H=40, In=7, seed=0, bits=16, prec="int8"):
    """An int8 model whose input projection x W_ih^T + b is computed exactly
    (dyadic weights and inputs with few bits: every product and partial sum
    is a float32 without rounding... except the adds to the bias, which all
    paths do in the same k order), so any difference between ISA paths can
    only come from the recurrent int8 product."""
    rng = np.random.default_rng(seed)
    m = fastlstm.LSTM(In, H, seed=seed, **opts)
    for d in range(m.num_directions):
        m.set_weights(0, d, w_ih=rng.integers(-8, 9, (4 * H, In)) / 64.0)
    if opts.get("peepholes"):
        m.set_weights(0, 0, peephole=rng.uniform(-0.5, 0.5, (3, H)))
    x = (rng.integers(-4, 5, (9, 4, In)) / 2.0).astype(np.float32)
    h0 = rng.standard_normal((m.num_directions, 4, H)).astype(np.float32)
    c0 = rng.standard_normal((m.num_directions, 4, H)).astype(np.float32)
    return m.astype(prec, activation_bits=bits), x, (h0, c0)


@pytest.mark.parametrize("opts", [{"clip": 1e3}, {"peepholes": True, "bidirectional": True},
                                  {"activations": ("hardsigmoid", "tanh", "softsign")}],
                         ids=["clip", "peep_bidir", "acts"])
@pytest.mark.parametrize("H", [40, 300])
@pytest.mark.parametrize("bits", [16, 8])
def test_int8_bitwise_across_isas(opts, H, bits):
    """int8 W_hh: the integer sums are exact and the float operations one fixed
    sequence (fl_internal.h, fl_lstmi8_f32), so the pre-activations are
    bitwise the same on avx512 (VNNI or not), avx2 and portable.  The default
    cell's SIMD sigmoid/tanh differ from the scalar ones in the last bits, so
    this runs cells that use the one scalar epilogue every path shares, with
    an exactly computed input projection: the whole outputs must then be
    bitwise equal, for every thread count and with lengths."""
    q, x, hx = _exact_input_model(opts, H=H, bits=bits)
    lens = [9, 4, 9, 1]
    prev = fastlstm.cpu_info()["isa"]
    results = {}
    try:
        for isa in fastlstm.cpu_info()["isas_available"]:
            fastlstm.set_isa(isa)
            for vnni in ((1, 0) if isa == "avx512" else (1,)):
                _engine.int8_vnni_set(vnni)
                for nt in (1, 2):
                    results[(isa, vnni, nt)] = (q(x, hx, num_threads=nt),
                                                q(x, hx, lengths=lens, num_threads=nt))
    finally:
        _engine.int8_vnni_set(1)
        fastlstm.set_isa(prev)
    want = results[("portable", 1, 1)]
    for key, got in results.items():
        _bitwise(got[0], want[0], f"{key}")
        _bitwise(got[1], want[1], f"{key} lengths")
    _assert_ref_close(want[0], q.reference(x, hx), "int8" if bits == 8 else I8_A16, "portable")


@pytest.mark.parametrize("opts", [{"clip": 1e3}, {"peepholes": True, "bidirectional": True},
                                  {"activations": ("hardsigmoid", "tanh", "softsign")}],
                         ids=["clip", "peep_bidir", "acts"])
@pytest.mark.parametrize("H", [40, 300])
def test_bfloat16_dot_bitwise_across_isas(opts, H):
    """bfloat16 W_hh times bfloat16 h: every product is exact and each column's
    sum the one sequence of fl_lstmb_f32 (odd k, then even k, per pair), so
    vdpbf16ps, the AVX-512 / AVX2 FMAs and portable C give the same bits --
    with the shared scalar epilogue and an exact input projection (as for
    int8 above), for every thread count, with lengths, batch 4 (row tiles)
    and batch 1 (the two-block kernel)."""
    q, x, hx = _exact_input_model(opts, H=H, bits=16, prec="bfloat16")
    lens = [9, 4, 9, 1]
    prev = fastlstm.cpu_info()["isa"]
    results = {}
    try:
        for isa in fastlstm.cpu_info()["isas_available"]:
            fastlstm.set_isa(isa)
            for dot in ((1, 0) if isa == "avx512" else (1,)):
                _engine.bf16_dot_set(dot)
                for nt in (1, 2):
                    results[(isa, dot, nt)] = (
                        q(x, hx, num_threads=nt), q(x, hx, lengths=lens, num_threads=nt),
                        q(x[:, :1], (hx[0][:, :1], hx[1][:, :1]), num_threads=nt))
    finally:
        _engine.bf16_dot_set(1)
        fastlstm.set_isa(prev)
    want = results[("portable", 1, 1)]
    for key, got in results.items():
        for g, w, what in zip(got, want, ("", " lengths", " batch 1")):
            _bitwise(g, w, f"{key}{what}")
    _assert_ref_close(want[0], q.reference(x, hx), "bfloat16", "portable")


def test_bfloat16_dot_or_not_bitwise():
    """Default cells on the AVX-512 path: vdpbf16ps and the FMA kernels give the
    same bits (batch 1 with both blocks kernels, an odd K; 8 and 13 rows)."""
    if "avx512" not in fastlstm.cpu_info()["isas_available"]:
        pytest.skip("no AVX-512 path on this machine")
    prev = fastlstm.cpu_info()["isa"]
    rng = np.random.default_rng(3)
    try:
        fastlstm.set_isa("avx512")
        for H, N in [(300, 1), (65, 8), (33, 13), (17, 1)]:
            q = fastlstm.LSTM(5, H, num_layers=2, seed=H).astype("bfloat16")
            x = rng.standard_normal((7, N, 5)).astype(np.float32)
            _engine.bf16_dot_set(1)
            a = q(x)
            _engine.bf16_dot_set(0)
            assert fastlstm.cpu_info()["bf16_dot"] == "fma"
            _bitwise(q(x), a, f"H={H} N={N}")
            assert not np.array_equal(a[0], q.astype("bfloat16", activation_bits=32)(x)[0])
    finally:
        _engine.bf16_dot_set(1)
        fastlstm.set_isa(prev)


def test_round_bfloat16_reference():
    """The reference's bfloat16 rounding of h: nearest, ties to even; NaN stays
    NaN, Inf stays Inf, float32 denormals become signed zeros."""
    from fastlstm.reference import round_bfloat16
    one_plus = [1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -(1 + 2 ** -9)]
    got = round_bfloat16(np.array(one_plus + [np.nan, -np.inf, 1e-39, -1e-39, 3.4e38, 0.0]))
    np.testing.assert_array_equal(got[:4], [1.0, 1 + 2 ** -6, 1 + 2 ** -7, -1.0])
    assert np.isnan(got[4]) and got[5] == -np.inf
    assert got[6] == 0 and got[7] == 0 and np.signbit(got[7]) and not np.signbit(got[6])
    assert got[8] == np.inf  # beyond the largest bfloat16: rounds up to Inf
    assert got[9] == 0


def test_int8_vnni_or_not_bitwise():
    """Default cells: the AVX-512 int8 kernel with vpdpbusd and with
    vpmaddwd + vpaddd give the same bits (batch 1 and 8 row tiles, K > 256)."""
    if "avx512" not in fastlstm.cpu_info()["isas_available"]:
        pytest.skip("no AVX-512 path on this machine")
    prev = fastlstm.cpu_info()["isa"]
    rng = np.random.default_rng(3)
    try:
        fastlstm.set_isa("avx512")
        for (H, N), bits in itertools.product([(300, 1), (65, 8), (33, 13)], (16, 8)):
            q = fastlstm.LSTM(5, H, num_layers=2, seed=H).astype("int8", activation_bits=bits)
            x = rng.standard_normal((7, N, 5)).astype(np.float32)
            _engine.int8_vnni_set(1)
            a = q(x)
            _engine.int8_vnni_set(0)
            assert fastlstm.cpu_info()["int8_dot"] == "vpmaddwd"
            _bitwise(q(x), a, f"H={H} N={N} bits={bits}")
    finally:
        _engine.int8_vnni_set(1)
        fastlstm.set_isa(prev)


def test_quantize_h_int16_reference():
    """The reference's int16 quantization of h (what the engine does per row)."""
    h = np.array([[0.5, -1.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, np.nan, 0.0, 0.0],
                  [np.inf, 1.0, 0.0, 0.0], [1e-30, -1e-30, 0.0, 0.0], [3.0, 1.0, -2.0, 1e-9]])
    got = quantize_h_int16(h)
    np.testing.assert_array_equal(got[0], [16384 / 32767, -1.0, 8192 / 32767, 0.0])  # RNE ties
    np.testing.assert_array_equal(got[1], 0.0)
    assert np.isnan(got[2]).all() and np.isnan(got[3]).all()
    np.testing.assert_array_equal(got[4], 0.0)  # m < 2**-96: zero
    q = np.rint(h[5] * 32767 / 3.0)
    np.testing.assert_array_equal(got[5], q * 3.0 / 32767)
    assert np.abs(got[5] - h[5]).max() <= 3.0 / 32767 / 2


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_int8_non_finite_state(isa, value):
    """A NaN or Inf in h_{t-1} makes its row's pre-activations NaN (the row
    cannot be quantized), in the engine and the reference alike; other rows
    are untouched."""
    rng = np.random.default_rng(4)
    q = fastlstm.LSTM(4, 20, seed=2).astype("int8")
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    h0 = rng.standard_normal((1, 3, 20)).astype(np.float32)
    c0 = rng.standard_normal((1, 3, 20)).astype(np.float32)
    h0[0, 1, 3] = value
    got = q(x, (h0, c0))
    ref = q.reference(x, (h0, c0))
    assert np.isnan(got[0][:, 1]).all() and np.isnan(ref[0][:, 1]).all()
    clean = q(x[:, [0, 2]], (h0[:, [0, 2]], c0[:, [0, 2]]))
    _bitwise((got[0][:, [0, 2]], (got[1][0][:, [0, 2]], got[1][1][:, [0, 2]])), clean, "other rows")
    x[2, 0, 1] = np.nan  # a NaN input reaches h one step later
    got = q(x, (h0, c0))
    assert np.isnan(got[0][2:, 0]).all() and not np.isnan(got[0][:2, 0]).any()


@pytest.mark.parametrize("prec", PRECISIONS + VARIANTS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_close_to_float32_model(isa, cfg, prec):
    m, x = _model(cfg)
    err = _err(_astype(m, prec)(x), m(x))
    assert 0 < err <= PRECISION_TOL[prec], f"{prec} {isa}: {err:.3e} > {PRECISION_TOL[prec]:.0e}"


@pytest.mark.parametrize("prec", PRECISIONS + VARIANTS)
def test_bounds_hold_over_random_models(prec):
    """A wider random sweep (the kind the bounds were measured on)."""
    worst = 0.0
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        H = int(rng.choice([2, 3, 8, 17, 33, 64]))
        In, N, T = int(rng.integers(1, 30)), int(rng.choice([1, 5])), int(rng.integers(1, 80))
        opts = [{}, {"bidirectional": True}, {"num_layers": 2},
                {"proj_size": max(1, H // 3)}][seed % 4]
        m = fastlstm.LSTM(In, H, seed=seed, **opts)
        x = rng.standard_normal((T, N, In)).astype(np.float32)
        worst = max(worst, _err(_astype(m, prec)(x), m(x)))
    assert worst <= PRECISION_TOL[prec], f"{prec}: {worst:.3e}"


def test_stored_forms():
    """quantized_weights() holds what the docs say, and the state_dict holds
    exactly its dequantized values."""
    m = fastlstm.LSTM(6, 17, num_layers=2, bidirectional=True, proj_size=4, seed=3)
    sd = m.state_dict()
    for prec, inw in [(p, None) for p in PRECISIONS] + [("int8", "float32"),
                                                        ("bfloat16", "float32")]:
        q = m.astype(prec, input_weights=inw)
        qw = q.quantized_weights()
        # int8 and bfloat16 store W_ih too unless asked not to; float16 W_hh only
        both = prec in ("int8", "bfloat16") and inw is None
        stored = ("weight_hh_", "weight_ih_") if both else ("weight_hh_",)
        assert q.input_weights_precision == (prec if both else "float32")
        assert sorted(qw) == sorted(k for k in sd if k.startswith(stored))
        qsd = q.state_dict()
        for k, form in qw.items():
            assert form[0] == prec and form[1].shape == sd[k].shape
            if prec == "float16":
                assert form[1].dtype == np.uint16 and len(form) == 2
                assert np.array_equal(form[1], sd[k].astype(np.float16).view(np.uint16))
                deq = form[1].view(np.float16).astype(np.float32)
            elif prec == "bfloat16":
                assert form[1].dtype == np.uint16 and len(form) == 2
                deq = (form[1].astype(np.uint32) << 16).view(np.float32)
                # round to nearest: within half a bfloat16 ulp (2^-9 relative)
                assert np.all(np.abs(deq - sd[k]) <= np.abs(sd[k]) * 2.0 ** -8 + 1e-38)
            else:
                data, scale = form[1], form[2]
                assert data.dtype == np.int8 and scale.dtype == np.float32
                assert scale.shape == (sd[k].shape[0],)
                assert np.abs(data).max() <= 127
                np.testing.assert_allclose(scale, np.abs(sd[k]).max(axis=1) / 127, rtol=1e-6)
                assert np.all(np.abs(data).max(axis=1) == 127)
                deq = (data.astype(np.float32) * scale[:, None]).astype(np.float32)
                assert np.all(np.abs(deq - sd[k]) <= scale[:, None] * 0.5 * (1 + 1e-5))
            assert qsd[k].dtype == np.float32 and qsd[k].tobytes() == deq.tobytes(), k
        for k in sd:  # everything else stays float32, untouched
            if not k.startswith(stored):
                assert qsd[k].tobytes() == sd[k].tobytes(), k
    assert m.astype("float32").quantized_weights() == {}
    assert m.weights_precision == "float32"


def test_astype_chains():
    m = fastlstm.LSTM(5, 17, seed=4)
    q = m.astype("int8")
    _same_quantized(q.astype("int8"), q)  # same precision: stored weights kept
    for v in VARIANTS:  # and a model's input weights and activation bits
        qv = _astype(m, v)
        again = qv.astype(FORMS[v][0])
        assert (again.input_weights_precision, again.activation_bits) == \
            (qv.input_weights_precision, qv.activation_bits)
        _same_quantized(again, qv)
    # asked for explicitly: changed
    assert q.astype("int8", input_weights="float32").input_weights_precision == "float32"
    assert q.activation_bits == 8 and q.input_weights_precision == "int8"  # the defaults
    assert q.astype("int8", activation_bits=16).activation_bits == 16
    assert _astype(m, I8_A16).astype("int8", activation_bits=8).activation_bits == 8
    b = m.astype("bfloat16")  # bfloat16: h rounded by default, float32 on request
    assert b.activation_bits == 16 and b.astype("bfloat16", activation_bits=32).activation_bits == 32
    assert b.astype("int8").activation_bits == 8 and q.astype("bfloat16").activation_bits == 16
    assert m.activation_bits == 32 and b.astype("float16").activation_bits == 32
    for prec, bad in (("float16", 16), ("float32", 16), ("bfloat16", 8), ("int8", 32)):
        with pytest.raises(ValueError, match="activation_bits"):
            m.astype(prec, activation_bits=bad)
    back = q.astype("float32")  # float32 with the dequantized values
    assert back.weights_precision == "float32" and back.quantized_weights() == {}
    sq, sb = q.state_dict(), back.state_dict()
    assert all(sq[k].tobytes() == sb[k].tobytes() for k in sq)
    # ... which the int8 model with 16-bit codes runs within the float32 bound
    x = np.random.default_rng(4).standard_normal((9, 2, 5)).astype(np.float32)
    assert_lstm_close(back(x), q.astype("int8", activation_bits=16)(x), np.float32,
                      "int8 -> float32")
    assert m.astype(np.float16).weights_precision == "float16"
    assert m.astype(np.dtype("float16")).weights_precision == "float16"


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("prec", PRECISIONS)
def test_astype_float64_model_refused(prec):
    m = fastlstm.LSTM(3, 8, dtype=np.float64, seed=0)
    with pytest.raises(DTypeError):
        m.astype(prec)
    assert m.astype("float32").dtype == np.float64  # a no-op stays allowed


@pytest.mark.parametrize("bad", ["float8", "int4", "fp16", "FLOAT16", "", None, 16, np.int16])
def test_astype_unknown_name(bad):
    with pytest.raises(ValueError):
        fastlstm.LSTM(3, 8, seed=0).astype(bad)


@pytest.mark.parametrize("prec", ["int8", I8_F32IN])
def test_set_weights_requantizes(prec):
    """New weights on a reduced model are stored in its precision (W_ih too
    with int8 input weights, kept float32 without)."""
    m = fastlstm.LSTM(4, 9, seed=5)
    q = _astype(m, prec)
    rng = np.random.default_rng(5)
    w = rng.uniform(-1, 1, (36, 9)).astype(np.float32)
    wi = rng.uniform(-1, 1, (36, 4)).astype(np.float32)
    q.set_weights(0, w_hh=w, w_ih=wi)
    ref = fastlstm.LSTM(4, 9, seed=5)
    ref.set_weights(0, w_hh=w, w_ih=wi)
    _same_quantized(q, _astype(ref, prec))
    assert ("weight_ih_l0" in q.quantized_weights()) == (prec == "int8")
    if prec == I8_F32IN:
        assert q.get_weights(0)["w_ih"].tobytes() == wi.tobytes()


@pytest.mark.parametrize("prec,inw", [("float16", "int8"), ("bfloat16", "int8"),
                                      ("int8", "float16"), ("int8", "int4"), ("int8", 8)])
def test_astype_input_weights_refused(prec, inw):
    with pytest.raises(ValueError, match="input_weights"):
        fastlstm.LSTM(3, 8, seed=0).astype(prec, input_weights=inw)


@pytest.mark.parametrize("prec,bits", [("float16", 8), ("bfloat16", 8), ("float32", 8),
                                       ("int8", 4), ("int8", 32), ("int8", "8"), ("int8", True),
                                       ("int8", 8.0)])
def test_astype_activation_bits_refused(prec, bits):
    with pytest.raises(ValueError, match="activation_bits"):
        fastlstm.LSTM(3, 8, seed=0).astype(prec, activation_bits=bits)


def test_activation_bits_8_codes():
    """8-bit activations (the default): the reference's codes are 8-bit
    (h * 127 / m) and the engine gives the reference's results; 16-bit and
    8-bit differ."""
    h = np.array([[0.5, -1.0, 0.3, 0.0]], np.float32)
    np.testing.assert_array_equal(quantize_h_int16(h, 8)[0],
                                  np.rint(h[0].astype(np.float64) * 127) / 127)
    m = fastlstm.LSTM(6, 20, seed=2)
    x = np.random.default_rng(2).standard_normal((10, 3, 6)).astype(np.float32)
    q8, q16 = m.astype("int8", activation_bits=8), m.astype("int8", activation_bits=16)
    _bitwise(m.astype("int8")(x), q8(x), "default")
    _assert_ref_close(q8(x), q8.reference(x), "int8", "8-bit")
    assert _err(q8(x), q16(x)) > 10 * _err(q16(x), q16.reference(x))


def test_int8_inputs_quantized_per_row(isa):
    """int8 W_ih quantizes each input row to int16 by its own max: a row
    scaled by 2^k gives exactly 2^k times the projection (the codes are the
    same), and a row of zeros gives the bias alone, with W_hh = 0."""
    m = fastlstm.LSTM(40, 16, seed=21)
    m.set_weights(0, w_hh=np.zeros((64, 16), np.float32))
    q = m.astype("int8")
    rng = np.random.default_rng(21)
    base = rng.standard_normal((1, 1, 40)).astype(np.float32)
    x = np.concatenate([base, base * 2.0 ** 10, base * 2.0 ** -20, 0 * base], axis=1)
    ref = q.reference(x)
    got = q(x)
    _assert_ref_close(got, ref, "int8", isa)
    # the same codes at every scale: the reference's projections scale exactly
    xq = fastlstm.reference.quantize_h_int16(x[0])
    np.testing.assert_array_equal(xq[1], xq[0] * 2.0 ** 10)
    np.testing.assert_array_equal(xq[2], xq[0] * 2.0 ** -20)
    assert not xq[3].any()


def test_old_pickle_state_loads():
    """Pickled int8 models from before int8 input weights and 8-bit codes (no
    input_weights_precision, no activation_bits) load with float32 input
    weights and 16-bit codes, as they ran."""
    q = _astype(fastlstm.LSTM(4, 9, seed=5), I8_F32IN_A16)
    state = q.__getstate__()
    del state["input_weights_precision"], state["activation_bits"], state["activation_bits_v2"]
    r = fastlstm.LSTM.__new__(fastlstm.LSTM)
    r.__setstate__(state)
    assert (r.input_weights_precision, r.activation_bits) == ("float32", 16)
    x = np.random.default_rng(5).standard_normal((5, 2, 4)).astype(np.float32)
    _bitwise(r(x), q(x))


def test_old_bfloat16_pickle_keeps_float32_activations():
    """Pickles from before bfloat16 dot products said activation_bits 16 for
    every precision, meaning float32 activations: a bfloat16 one loads as
    activation_bits 32 and runs bitwise as it did; new pickles keep 16."""
    m = fastlstm.LSTM(4, 9, seed=5)
    q32, q16 = m.astype("bfloat16", activation_bits=32), m.astype("bfloat16")
    state = q32.__getstate__()
    del state["activation_bits_v2"]
    state["activation_bits"] = 16
    r = fastlstm.LSTM.__new__(fastlstm.LSTM)
    r.__setstate__(state)
    assert r.activation_bits == 32
    x = np.random.default_rng(5).standard_normal((5, 2, 4)).astype(np.float32)
    _bitwise(r(x), q32(x))
    r16 = pickle.loads(pickle.dumps(q16))
    assert r16.activation_bits == 16
    _bitwise(r16(x), q16(x))
    assert not np.array_equal(q16(x)[0], q32(x)[0])


@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
def test_lengths(isa, prec, bidirectional):
    """Reverse rows that start at different steps (lengths=) with reduced
    weights: a regression test for row tiles of the reduced-precision step."""
    rng = np.random.default_rng(6)
    m = fastlstm.LSTM(5, 33, num_layers=2, bidirectional=bidirectional, seed=6)
    q = m.astype(prec)
    T, N = 12, 9
    x = rng.standard_normal((T, N, 5)).astype(np.float32)
    lens = np.array([12, 1, 7, 0, 12, 3, 11, 5, 2])
    for nt in (1, 2):
        out, (h, c) = q(x, lengths=lens, num_threads=nt)
        o32, (h32, c32) = m(x, lengths=lens, num_threads=nt)
        assert max_rel_err(out, o32) <= PRECISION_TOL[prec]
        for n in range(N):
            assert not out[lens[n]:, n].any()
            if lens[n] == 0:
                continue
            ro, (rh, rc) = q.reference(x[:lens[n], n:n + 1].astype(np.float64))
            _assert_ref_close((out[:lens[n], n], (h[:, n], c[:, n])),
                              (ro[:, 0], (rh[:, 0], rc[:, 0])), prec, f"seq {n}")


@pytest.mark.parametrize("prec", PRECISIONS + VARIANTS)
def test_stream_bitwise_equal_to_one_call(isa, prec):
    rng = np.random.default_rng(7)
    q = _astype(fastlstm.LSTM(6, 33, num_layers=2, proj_size=7, seed=7), prec)
    T, N = 17, 3
    x = rng.standard_normal((T, N, 6)).astype(np.float32)
    for nt in (1, 2):
        want, (wh, wc) = q(x, num_threads=nt)
        s = q.stream(N, num_threads=nt)
        chunks = [s(x[:5]), s.step(x[5])[None], s(x[6:11])] + [s.step(x[t])[None]
                                                              for t in range(11, T)]
        assert np.array_equal(np.concatenate(chunks), want), f"threads={nt}"
        h, c = s.state
        assert np.array_equal(h, wh) and np.array_equal(c, wc)


# ---------------------------------------------------------------- threads
@pytest.mark.parametrize("prec", PRECISIONS)
def test_thread_counts_bitwise_identical(isa, prec):
    rng = np.random.default_rng(8)
    for (N, H) in [(1, 256), (3, 100), (8, 33), (40, 17)]:
        q = fastlstm.LSTM(24, H, num_layers=2, bidirectional=True, seed=8).astype(prec)
        x = rng.standard_normal((12, N, 24)).astype(np.float32)
        want = q(x, num_threads=1)
        for nt in (2, 3, 4):
            _bitwise(q(x, num_threads=nt), want, f"{prec} N={N} H={H} threads={nt}")


def test_pickle_keeps_stored_weights():
    q = fastlstm.LSTM(5, 17, num_layers=2, seed=9).astype("int8")
    r = pickle.loads(pickle.dumps(q))
    assert r.weights_precision == "int8"
    _same_quantized(q, r)
    x = np.random.default_rng(9).standard_normal((6, 2, 5)).astype(np.float32)
    _bitwise(r(x), q(x))


# -------------------------------------------------------------- save/load
SAVE_CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True, proj_size=5, batch_first=True),
    dict(peepholes=True, activations=("hardsigmoid", "tanh", "softsign"), cell_clip=2.0),
]


@pytest.mark.parametrize("prec", ALL + VARIANTS)
@pytest.mark.parametrize("opts", SAVE_CONFIGS, ids=["plain", "bidir_proj", "variant"])
def test_save_load_bitwise(tmp_path, prec, opts):
    m = fastlstm.LSTM(6, 17, seed=10, **opts)
    q = _astype(m, prec)
    path = tmp_path / "q.safetensors"
    q.save(path)
    r = fastlstm.load(path)
    assert r.weights_precision == q.weights_precision and r.dtype == np.float32
    assert r.input_weights_precision == q.input_weights_precision
    assert r.activation_bits == q.activation_bits
    assert repr(r) == repr(q) and r.cell_options() == q.cell_options()
    _same_quantized(q, r)
    sq, sr = q.state_dict(), r.state_dict()
    assert sq.keys() == sr.keys() and all(sq[k].tobytes() == sr[k].tobytes() for k in sq)
    x = np.random.default_rng(10).standard_normal((11, 3, 6)).astype(np.float32)
    if opts.get("batch_first"):
        x = x.transpose(1, 0, 2).copy()
    _bitwise(r(x), q(x), prec)
    _bitwise(r(x, num_threads=2), q(x, num_threads=2), prec)
    # saved again: the same bytes
    path2 = tmp_path / "r.safetensors"
    r.save(path2)
    assert path2.read_bytes() == path.read_bytes()
    info = dict(fastlstm.list_stacks(path))[""]
    assert info["weights_precision"] == q.weights_precision and info["dtype"] == "float32"
    assert info["input_weights_precision"] == q.input_weights_precision
    assert info["activation_bits"] == q.activation_bits


@pytest.mark.parametrize("prec", ALL)
def test_file_layout(tmp_path, prec):
    m = fastlstm.LSTM(4, 8, num_layers=2, bidirectional=True, seed=11)
    q = m.astype(prec)
    path = tmp_path / "q.safetensors"
    q.save(path)
    with fst.SafetensorsFile(path) as f:
        infos = {k: (i.dtype, i.shape) for k, i in f.infos.items()}
        cfg = json.loads(f.metadata["fastlstm"])
    sd = m.state_dict()
    hh = [k for k in sd if k.startswith("weight_hh_")]
    ih = [k for k in sd if k.startswith("weight_ih_")]
    assert len(hh) == 4 and len(ih) == 4
    for k in hh + (ih if prec in ("int8", "bfloat16") else []):
        if prec == "int8":  # int8 and bfloat16 store W_ih too (astype's default)
            assert k not in infos
            assert infos[k + ".int8"] == ("I8", sd[k].shape)
            assert infos[k + ".scale"] == ("F32", (32,))
        else:
            assert infos[k] == ({"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[prec],
                                sd[k].shape)
    assert all(v[0] == "F32" for k, v in infos.items() if "weight_hh_" not in k and
               not (prec in ("int8", "bfloat16") and "weight_ih_" in k))
    if prec == "float32":  # unchanged format: older fastlstm versions read it
        assert cfg["version"] == 1 and "weights_precision" not in cfg
    elif prec == "int8":
        assert cfg["version"] == 3 and cfg["weights_precision"] == prec
        assert cfg["input_weights_precision"] == "int8"
    elif prec == "bfloat16":  # bfloat16 dot products: version 4
        assert cfg["version"] == 4 and cfg["weights_precision"] == prec
        assert (cfg["input_weights_precision"], cfg["activation_bits"]) == ("bfloat16", 16)
    else:
        assert cfg["version"] == 2 and cfg["weights_precision"] == prec
        assert "input_weights_precision" not in cfg
    # the raw tensors are the stored forms
    raw = fst.load_file(path)
    for k, form in q.quantized_weights().items():
        if prec == "float16":
            assert raw[k].dtype == np.float16 and raw[k].view(np.uint16).tobytes() == \
                form[1].tobytes()
        elif prec == "bfloat16":  # read back widened to float32, exactly
            assert raw[k].view(np.uint32).tobytes() == \
                (form[1].astype(np.uint32) << 16).tobytes()
        else:
            assert raw[k + ".int8"].tobytes() == form[1].tobytes()
            assert raw[k + ".scale"].tobytes() == form[2].tobytes()


@pytest.mark.parametrize("prec", ["float16", "bfloat16", "int8"])
def test_readable_by_safetensors_package(tmp_path, prec):
    st_np = pytest.importorskip("safetensors.numpy")
    q = fastlstm.LSTM(4, 8, seed=12).astype(prec)
    path = tmp_path / "q.safetensors"
    q.save(path)
    if prec == "bfloat16":  # NumPy has no bfloat16: check with torch if present
        st_torch = pytest.importorskip("safetensors.torch")
        t = st_torch.load_file(str(path))["weight_hh_l0"]
        assert str(t.dtype) == "torch.bfloat16"
        assert np.array_equal(t.float().numpy(), q.state_dict()["weight_hh_l0"])
        return
    t = st_np.load_file(str(path))
    if prec == "float16":
        assert np.array_equal(t["weight_hh_l0"].astype(np.float32), q.state_dict()["weight_hh_l0"])
    else:
        deq = t["weight_hh_l0.int8"].astype(np.float32) * t["weight_hh_l0.scale"][:, None]
        assert np.array_equal(deq, q.state_dict()["weight_hh_l0"])


def test_old_float32_file_loads(tmp_path):
    """A version-1 file as earlier fastlstm versions wrote it."""
    m = fastlstm.LSTM(5, 9, num_layers=2, seed=13)
    cfg = native.model_config(m)
    assert cfg["version"] == 1 and "weights_precision" not in cfg
    path = tmp_path / "old.safetensors"
    path.write_bytes(fst.save(m.state_dict(), metadata={"fastlstm": json.dumps(cfg)}))
    r = fastlstm.load(path)
    assert r.weights_precision == "float32" and r.quantized_weights() == {}
    x = np.random.default_rng(13).standard_normal((5, 2, 5)).astype(np.float32)
    _bitwise(r(x), m(x))
    _bitwise(fastlstm.load(path, weights="int8")(x), m.astype("int8")(x))


@pytest.mark.parametrize("prec", ALL)
def test_load_with_weights(tmp_path, prec):
    m = fastlstm.LSTM(5, 17, bidirectional=True, seed=14)
    x = np.random.default_rng(14).standard_normal((8, 2, 5)).astype(np.float32)
    path = tmp_path / "m.safetensors"
    m.save(path)
    r = fastlstm.load(path, weights=prec)
    assert r.weights_precision == prec
    _same_quantized(r, m.astype(prec))
    _bitwise(r(x), m.astype(prec)(x))
    # from a reduced file: the same precision keeps the stored weights
    q = m.astype("int8")
    qpath = tmp_path / "q.safetensors"
    q.save(qpath)
    r = fastlstm.load(qpath, weights=prec)
    _same_quantized(r, q.astype(prec))
    _bitwise(r(x), q.astype(prec)(x))
    # other formats too (torch.save zip, via the registry)
    torch = pytest.importorskip("torch")
    mod = torch.nn.LSTM(5, 17, bidirectional=True)
    tpath = tmp_path / "m.pt"
    torch.save(mod.state_dict(), tpath)
    r = fastlstm.load(tpath, weights=prec)
    _bitwise(r(x), fastlstm.LSTM.from_torch(mod).astype(prec)(x))


def test_load_weights_errors(tmp_path):
    m = fastlstm.LSTM(3, 8, seed=15)
    path = tmp_path / "m.safetensors"
    m.save(path)
    with pytest.raises(ValueError, match="weights"):
        fastlstm.load(path, weights="int4")
    with pytest.raises(ValueError, match="weights"):  # checked before reading the file
        fastlstm.load(tmp_path / "missing.safetensors", weights="int4")
    m64 = fastlstm.LSTM(3, 8, dtype=np.float64, seed=15)
    p64 = tmp_path / "m64.safetensors"
    m64.save(p64)
    with pytest.raises(DTypeError):
        fastlstm.load(p64, weights="int8")
    r = fastlstm.load(p64, weights="int8", dtype=np.float32)
    assert r.weights_precision == "int8" and r.dtype == np.float32
    q = m.astype("float16")
    qpath = tmp_path / "q.safetensors"
    q.save(qpath)
    with pytest.raises(DTypeError):
        fastlstm.load(qpath, dtype=np.float64)


def _reduced_file(tmp_path, prec, change=None, tensors=None):
    q = fastlstm.LSTM(3, 4, seed=16).astype(prec)
    path = tmp_path / "q.safetensors"
    q.save(path)
    with fst.SafetensorsFile(path) as f:
        cfg = json.loads(f.metadata["fastlstm"])
        raw = {k: f.get(k) for k in f.infos}
        dtypes = {k: "BF16" for k, i in f.infos.items() if i.dtype == "BF16"}
    for k in dtypes:
        raw[k] = (raw[k].view(np.uint32) >> 16).astype(np.uint16)
    cfg.update(change or {})
    if tensors:
        tensors(raw)
    path.write_bytes(fst.save(raw, metadata={"fastlstm": json.dumps(cfg)},
                              dtypes={k: v for k, v in dtypes.items() if k in raw}))
    return path


def _set(key, value):
    def f(raw):
        raw[key] = value
    return f


def _drop(key):
    def f(raw):
        del raw[key]
    return f


@pytest.mark.parametrize("prec,change,tensors,msg", [
    ("int8", {"weights_precision": "int4"}, None, "weights_precision"),
    ("int8", {"weights_precision": 8}, None, "weights_precision"),
    ("int8", {"weights_precision": ["int8"]}, None, "weights_precision"),
    ("float16", {"weights_precision": None}, None, "weights_precision"),
    ("int8", {"version": native.FORMAT_VERSION + 1}, None, "newer fastlstm"),
    ("int8", {"dtype": "float64"}, None, "needs dtype float32"),
    ("float16", {"weights_precision": "bfloat16"}, None, "is F16"),
    ("bfloat16", {"weights_precision": "float16", "version": 2}, None, "is BF16"),
    ("bfloat16", {"weights_precision": "float16"}, None, "input_weights_precision"),
    ("bfloat16", {"weights_precision": "float16", "input_weights_precision": "float32"}, None,
     "activation_bits"),  # 16: bfloat16's
    ("bfloat16", {"input_weights_precision": "int8"}, None, "input_weights_precision"),
    ("bfloat16", {"version": 3}, None, "input_weights_precision"),
    ("bfloat16", {"activation_bits": 8}, None, "activation_bits"),
    ("bfloat16", {"activation_bits": None}, None, "activation_bits"),
    ("bfloat16", {"activation_bits": 16.0}, None, "activation_bits"),
    ("bfloat16", {"version": 2, "weights_precision": None}, None, "weights_precision"),
    ("float16", {"weights_precision": "float32"}, None, "is F16"),
    ("int8", {"weights_precision": "float16"}, None, "input_weights_precision"),
    ("int8", {"input_weights_precision": "float16"}, None, "input_weights_precision"),
    ("int8", {"input_weights_precision": None}, None, "input_weights_precision"),
    ("int8", {"input_weights_precision": "float32"}, None, "missing"),
    ("int8", {"version": 2}, None, "missing"),  # version 2: float32 input weights
    ("int8", {"activation_bits": 4}, None, "activation_bits"),
    ("int8", {"activation_bits": "8"}, None, "activation_bits"),
    ("int8", {"activation_bits": 8.0}, None, "activation_bits"),
    ("int8", {"activation_bits": None}, None, "activation_bits"),
    ("float16", {"version": 3, "input_weights_precision": "float32", "activation_bits": 8},
     None, "activation_bits"),
    ("float16", {"version": 3, "activation_bits": 16}, None,
     "lacks 'input_weights_precision'"),
    ("int8", {"input_weights_precision": "float32", "activation_bits": 8}, None, "missing"),
    ("int8", None, _drop("weight_hh_l0.scale"), "missing"),
    ("int8", None, _drop("weight_ih_l0.scale"), "missing"),
    ("int8", None, _set("weight_ih_l0.scale", np.zeros(16, np.float32)), "scales"),
    ("int8", None, _set("weight_hh_l0", np.zeros((16, 4), np.float32)), "unexpected"),
    ("int8", None, _set("weight_hh_l0.scale", np.ones(15, np.float32)), "shape"),
    ("int8", None, _set("weight_hh_l0.scale", np.ones(16, np.float64)), "is F64"),
    ("int8", None, _set("weight_hh_l0.int8", np.ones((16, 4), np.uint8)), "is U8"),
    ("int8", None, _set("weight_hh_l0.scale", np.full(16, np.nan, np.float32)), "scales"),
    ("int8", None, _set("weight_hh_l0.scale", np.zeros(16, np.float32)), "scales"),
    ("int8", None, _set("weight_hh_l0.scale", np.full(16, -1, np.float32)), "scales"),
    ("float16", None, _set("weight_hh_l0", np.zeros((16, 4), np.float32)), "is F32"),
])
def test_bad_reduced_files(tmp_path, prec, change, tensors, msg):
    path = _reduced_file(tmp_path, prec, change, tensors)
    with pytest.raises(FormatError, match=msg):
        fastlstm.load(path)


def test_version2_needs_precision(tmp_path):
    m = fastlstm.LSTM(3, 4, seed=17)
    cfg = {**native.model_config(m), "version": 2}
    path = tmp_path / "v2.safetensors"
    path.write_bytes(fst.save(m.state_dict(), metadata={"fastlstm": json.dumps(cfg)}))
    with pytest.raises(FormatError, match="lacks 'weights_precision'"):
        fastlstm.load(path)
    cfg["weights_precision"] = "float32"
    path.write_bytes(fst.save(m.state_dict(), metadata={"fastlstm": json.dumps(cfg)}))
    assert fastlstm.load(path).weights_precision == "float32"


def test_safetensors_bf16_writer_checks():
    with pytest.raises(TypeError, match="BF16"):
        fst.save({"a": np.zeros(3, np.float32)}, dtypes={"a": "BF16"})
    with pytest.raises(ValueError, match="only 'BF16'"):
        fst.save({"a": np.zeros(3, np.uint16)}, dtypes={"a": "F16"})
    with pytest.raises(ValueError, match="not among"):
        fst.save({"a": np.zeros(3, np.uint16)}, dtypes={"b": "BF16"})
    bits = np.array([0x3F80, 0xC000, 0x7FC0], np.uint16)
    back = fst.load(fst.save({"a": bits}, dtypes={"a": "BF16"}))["a"]
    assert back.dtype == np.float32 and np.array_equal(back[:2], [1.0, -2.0])
    assert np.isnan(back[2])


@pytest.mark.parametrize("prec", ("float32",) + PRECISIONS + VARIANTS)
def test_rows_independent_of_their_tile(isa, prec):
    # Row tiles are balanced (8 rows: 4 + 4, 13: 5 + 4 + 4), so a row's tile
    # depends on the batch; its result must not (one sequential chain per
    # output, integer sums exact).  Each row alone must give the same bits.
    rng = np.random.default_rng(11)
    q = fastlstm.LSTM(40, 70, seed=11)
    q = q if prec == "float32" else _astype(q, prec)
    for N in (7, 8, 13):
        x = rng.standard_normal((6, N, 40)).astype(np.float32)
        out, (h, c) = q(x, num_threads=1)
        for n in range(N):
            o1, (h1, c1) = q(x[:, n:n + 1], num_threads=1)
            assert np.array_equal(o1[:, 0], out[:, n]), f"{prec} N={N} row {n}"
            assert np.array_equal(h1[:, 0], h[:, n]) and np.array_equal(c1[:, 0], c[:, n])


@pytest.mark.parametrize("prec", ["int8", I8_A16, "bfloat16"])
def test_int8_inputs_threads_chunks_layers(isa, prec):
    """int8 (and bfloat16) W_ih with threads that split the batch: each thread's quantized
    input rows must stay its own across time chunks and layers (the threads
    do not wait for each other, one may be chunks ahead).  A regression test:
    per-chunk offsets let a thread in the next chunk overwrite rows another
    still read (2 layers, T beyond one chunk; seen as ~1 wrong call in 3)."""
    m = fastlstm.LSTM(25, 58, num_layers=2, seed=1)
    x = np.random.default_rng(0).standard_normal((106, 5, 25)).astype(np.float32)
    q = _astype(m, prec)
    want = q(x, num_threads=1)
    _assert_ref_close(want, q.reference(x), prec, isa)
    for _ in range(12):
        _bitwise(q(x, num_threads=2), want, prec)


@pytest.mark.parametrize("prec,version", [(I8_F32IN, 3), (I8_F32IN_A16, 2)])
def test_int8_float32_inputs_saved(tmp_path, prec, version):
    """int8 W_hh with float32 W_ih, with 8-bit codes of h (version 3: it names
    its activation bits) and with 16-bit codes (version 2, the form older
    fastlstm versions wrote and read): like its reference, and saved and
    loaded bit for bit."""
    m = fastlstm.LSTM(6, 21, num_layers=2, seed=30)
    q = _astype(m, prec)
    bits = 16 if prec.endswith("_a16") else 8
    assert (q.input_weights_precision, q.activation_bits) == ("float32", bits)
    assert sorted(q.quantized_weights()) == ["weight_hh_l0", "weight_hh_l1"]
    x = np.random.default_rng(30).standard_normal((12, 3, 6)).astype(np.float32)
    _assert_ref_close(q(x), q.reference(x), prec, "f32 inputs")
    path = tmp_path / "q.safetensors"
    q.save(path)
    r = fastlstm.load(path)
    assert (r.input_weights_precision, r.activation_bits) == ("float32", bits)
    _bitwise(r(x), q(x))
    with fst.SafetensorsFile(path) as f:
        cfg = json.loads(f.metadata["fastlstm"])
    assert cfg["version"] == version
    if version == 3:
        assert cfg["activation_bits"] == 8 and cfg["input_weights_precision"] == "float32"
    else:
        assert "activation_bits" not in cfg and "input_weights_precision" not in cfg


def test_quantized_weights_are_copies():
    """quantized_weights() hands out copies: editing them changes neither the
    model, nor its pickles, nor a later repack (load_state_dict sets weights)."""
    m = fastlstm.LSTM(4, 6, seed=8)
    x = np.random.default_rng(8).standard_normal((5, 2, 4)).astype(np.float32)
    for prec in ("int8", "bfloat16", "float16"):
        q = m.astype(prec)
        want = q(x)
        for form in q.quantized_weights().values():
            form[1][...] = 0
            if len(form) > 2:
                form[2][...] = 1
        q.load_state_dict({"bias_ih_l0": q.state_dict()["bias_ih_l0"]}, strict=False)  # repack
        _bitwise(q(x), want, prec)
        _bitwise(pickle.loads(pickle.dumps(q))(x), want, f"{prec} pickle")


def test_int8_rows_below_the_smallest_normal(tmp_path):
    """A W_hh row whose largest |w| is below float32's smallest normal (zero to
    the engine, which flushes denormals) is stored as zeros with scale 1, not
    with a scale that underflows to 0 (a file that could not be read back)."""
    m = fastlstm.LSTM(3, 4, seed=9)
    w = m.state_dict()["weight_hh_l0"]
    w[2] = 1e-43
    w[5] = -3e-39
    m.load_state_dict({"weight_hh_l0": w}, strict=False)
    q = m.astype("int8")
    data, scale = q.quantized_weights()["weight_hh_l0"][1:]
    assert not data[2].any() and scale[2] == 1 and not data[5].any() and scale[5] == 1
    assert (scale > 0).all()
    q.save(tmp_path / "q.safetensors")
    r = fastlstm.load(tmp_path / "q.safetensors")
    _same_quantized(r, q)


def test_bfloat16_refuses_values_that_round_to_inf():
    """float32 values above bfloat16's largest finite (~3.39e38) would round to
    Inf: refused, as float16 refuses its range; Inf itself stays Inf."""
    m = fastlstm.LSTM(3, 4, seed=2)
    w = m.state_dict()["weight_hh_l0"]
    w[0, 0] = 3.4e38
    m.load_state_dict({"weight_hh_l0": w}, strict=False)
    with pytest.raises(fastlstm.WeightsError, match="bfloat16's range"):
        m.astype("bfloat16")
    w[0, 0] = np.inf
    m.load_state_dict({"weight_hh_l0": w}, strict=False)
    assert np.isinf(m.astype("bfloat16").state_dict()["weight_hh_l0"][0, 0])


@pytest.mark.parametrize("kw", [{}, {"activation_bits": 32}, {"input_weights": "float32"}])
def test_bfloat16_denormal_weights_stored_as_signed_zeros(kw):
    """A weight that rounds to a bfloat16 denormal (a float32 denormal, which
    the kernels flush) is stored as the signed zero the engine multiplies, so
    state_dict() and reference() describe exactly what runs: the model equals,
    bit for bit, the one with those weights set to zero."""
    m = fastlstm.LSTM(5, 20, seed=11)
    sd = m.state_dict()
    tiny = {"weight_hh_l0": [(0, 0, 1e-39), (7, 3, -5e-40), (30, 19, 2e-45)],
            "weight_ih_l0": [(1, 2, -1e-39), (40, 4, 3e-39)]}
    zeroed = {k: v.copy() for k, v in sd.items()}
    for k, cells in tiny.items():
        for r, c, v in cells:
            sd[k][r, c] = v
            zeroed[k][r, c] = 0.0
    m.load_state_dict(sd)
    q = m.astype("bfloat16", **kw)
    z = fastlstm.LSTM(5, 20, seed=11)
    z.load_state_dict(zeroed)
    qz = z.astype("bfloat16", **kw)
    x = np.random.default_rng(3).standard_normal((9, 2, 5)).astype(np.float32)
    _bitwise(q(x), qz(x), "denormal weights vs zeros")
    got = q.state_dict()
    for k, cells in tiny.items():
        stored = k in q.quantized_weights()
        for r, c, v in cells:
            if stored:  # a bfloat16 matrix: the signed zero the kernels see
                assert got[k][r, c] == 0 and np.signbit(got[k][r, c]) == (v < 0)
                assert q.quantized_weights()[k][1][r, c] == (0x8000 if v < 0 else 0)

"""The C engine against the float64 reference, over randomized configurations,
on every kernel path this machine has."""
import numpy as np
import pytest

import fastlstm
from tolerances import assert_lstm_close


def _random_config(rng, big=False):
    hi = 300 if big else 40
    return dict(
        T=int(rng.integers(1, 301 if big else 30)),
        N=int(rng.integers(1, 18)),
        In=int(rng.integers(1, hi + 1)),
        H=int(rng.integers(1, hi + 1)),
        L=int(rng.integers(1, 4)),
        bi=bool(rng.integers(0, 2)),
        proj=bool(rng.integers(0, 3) == 0),
        bias=bool(rng.integers(0, 4) != 0),
        batch_first=bool(rng.integers(0, 2)),
        hx=bool(rng.integers(0, 2)),
        unbatched=bool(rng.integers(0, 6) == 0),
    )


def _run_case(cfg, dtype, rng, num_threads):
    H = cfg["H"]
    P = int(rng.integers(1, H)) if cfg["proj"] and H > 1 else 0
    m = fastlstm.LSTM(cfg["In"], H, num_layers=cfg["L"], bias=cfg["bias"],
                      batch_first=cfg["batch_first"], bidirectional=cfg["bi"], proj_size=P,
                      dtype=dtype, seed=int(rng.integers(1 << 30)))
    T, N, In = cfg["T"], cfg["N"], cfg["In"]
    D = 2 if cfg["bi"] else 1
    if cfg["unbatched"]:
        x = rng.standard_normal((T, In))
    elif cfg["batch_first"]:
        x = rng.standard_normal((N, T, In))
    else:
        x = rng.standard_normal((T, N, In))
    hx = None
    if cfg["hx"]:
        batch = () if cfg["unbatched"] else (N,)
        hx = (rng.standard_normal((cfg["L"] * D,) + batch + (P or H,)),
              rng.standard_normal((cfg["L"] * D,) + batch + (H,)))
    x = x.astype(dtype)
    if hx is not None:
        hx = tuple(a.astype(dtype) for a in hx)
    res = m(x, hx, num_threads=num_threads)
    ref = m.reference(x, hx)
    assert res[0].shape == ref[0].shape and res[0].dtype == np.dtype(dtype)
    assert_lstm_close(res, ref, dtype, what=f"{cfg} P={P}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(12))
def test_random_small(isa, dtype, seed):
    rng = np.random.default_rng(1000 + seed)
    for _ in range(4):
        _run_case(_random_config(rng), dtype, rng, num_threads=int(rng.integers(1, 3)))


@pytest.mark.parametrize("seed", range(6))
def test_random_large_float32(isa, seed):
    """Sizes up to 300 (not multiples of 8 or 16), sequences up to 300."""
    rng = np.random.default_rng(2000 + seed)
    _run_case(_random_config(rng, big=True), np.float32, rng, num_threads=int(rng.integers(1, 3)))


@pytest.mark.parametrize("seed", range(2))
def test_random_large_float64(seed):
    rng = np.random.default_rng(3000 + seed)
    _run_case(_random_config(rng, big=True), np.float64, rng, num_threads=2)


@pytest.mark.parametrize("H", [1, 7, 15, 16, 17, 31, 33, 97])
def test_hidden_tails(isa, H):
    """Hidden sizes that hit the 16-unit block tails, every row-tile count."""
    rng = np.random.default_rng(H)
    for N in (1, 5, 6, 7, 13):
        m = fastlstm.LSTM(9, H, bidirectional=True, seed=H)
        x = rng.standard_normal((6, N, 9)).astype(np.float32)
        assert_lstm_close(m(x), m.reference(x), np.float32, what=f"H={H} N={N}")


@pytest.mark.parametrize("P", [1, 5, 63, 64, 65])
def test_projection_tails(isa, P):
    rng = np.random.default_rng(P)
    m = fastlstm.LSTM(11, 80, num_layers=2, proj_size=P, seed=P)
    x = rng.standard_normal((7, 3, 11)).astype(np.float32)
    assert_lstm_close(m(x, num_threads=2), m.reference(x), np.float32, what=f"P={P}")


def test_long_sequence_stays_within_bound(isa):
    """T = 1000: float32 errors must not accumulate past the bound."""
    rng = np.random.default_rng(7)
    m = fastlstm.LSTM(32, 64, seed=7)
    x = rng.standard_normal((1000, 2, 32)).astype(np.float32)
    assert_lstm_close(m(x), m.reference(x), np.float32, what="T=1000")


def test_large_preactivations(isa):
    """Saturated gates (|pre-activation| up to ~100) stay accurate."""
    rng = np.random.default_rng(8)
    m = fastlstm.LSTM(16, 40, seed=8)
    sd = {k: v * 20 for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    x = (rng.standard_normal((20, 3, 16)) * 5).astype(np.float32)
    assert_lstm_close(m(x), m.reference(x), np.float32, what="saturated")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_weights(isa, dtype):
    """Weights of 4 MB and more (here W_ih 4.7 MB and W_hh 4 MB per direction
    in float32, twice that in float64) take the allocator's huge-page path
    (2 MB-aligned, MADV_HUGEPAGE on Linux): the same results as the
    reference, and bitwise the same on one and two threads, at batch 1
    (hidden split) and batch 3."""
    rng = np.random.default_rng(12)
    m = fastlstm.LSTM(600, 512, bidirectional=True, dtype=dtype, seed=12)
    for N in (1, 3):
        x = rng.standard_normal((4, N, 600)).astype(dtype)
        a = m(x, num_threads=1)
        b = m(x, num_threads=2)
        assert_lstm_close(a, m.reference(x), dtype, what=f"N={N}")
        for u, v in zip((a[0], a[1][0], a[1][1]), (b[0], b[1][0], b[1][1])):
            np.testing.assert_array_equal(u, v)


def test_thread_counts_are_bitwise_identical():
    """Splitting hidden units or batch rows between threads does not change
    any sum's order: results are bitwise the same for every thread count."""
    rng = np.random.default_rng(9)
    for (N, H) in [(1, 256), (3, 100), (40, 64), (64, 16)]:
        m = fastlstm.LSTM(24, H, num_layers=2, bidirectional=True, seed=9)
        x = rng.standard_normal((30, N, 24)).astype(np.float32)
        a = m(x, num_threads=1)
        b = m(x, num_threads=2)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1][0], b[1][0])
        np.testing.assert_array_equal(a[1][1], b[1][1])


@pytest.mark.parametrize("acts", [None, ("hardsigmoid", "tanh", "tanh"),
                                  ("sigmoid", "relu", "softsign"),
                                  ("leakyrelu", "elu", "scaledtanh"),
                                  ("thresholdedrelu", "affine", "softplus")])
@pytest.mark.parametrize("opts", [dict(peepholes=True), dict(clip=0.5),
                                  dict(cell_clip=0.3, input_forget=True),
                                  dict(peepholes=True, proj_size=5, clip=2.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cell_variants(isa, acts, opts, dtype):
    rng = np.random.default_rng(11)
    m = fastlstm.LSTM(7, 21, num_layers=2, bidirectional=True, activations=acts, dtype=dtype,
                      seed=3, **opts)
    if m.peepholes:
        m.load_state_dict({k: rng.standard_normal((3, 21)) * 0.5
                           for k in m.state_dict() if k.startswith("peephole")}, strict=False)
    x = rng.standard_normal((8, 4, 7))
    for nt in (1, 2):
        assert_lstm_close(m(x, num_threads=nt), m.reference(x), dtype, what=f"{acts} {opts}")


@pytest.mark.parametrize("proj", [0, 11])
def test_rows_do_not_depend_on_their_batch(isa, proj):
    """Batch rows are cut into register tiles of 1..rmax rows (AVX2 and
    AVX-512: up to 6 rows, each tile size its own kernel shape); every
    column of every row is still one chain in k order, so a row's outputs
    are bitwise those of the same row run alone, whatever the batch around
    it (one-shot calls, and one-step calls, which fuse the input
    projection)."""
    rng = np.random.default_rng(11 + proj)
    m = fastlstm.LSTM(45, 70, num_layers=2, proj_size=proj, seed=12)
    for N in (2, 3, 4, 5, 6, 7, 8, 13):
        for T in (1, 7):
            x = rng.standard_normal((T, N, 45)).astype(np.float32)
            h0 = rng.standard_normal((2, N, m.output_size)).astype(np.float32)
            c0 = rng.standard_normal((2, N, 70)).astype(np.float32)
            y, (h, c) = m(x, (h0, c0), num_threads=1)
            for n in range(N):
                yn, (hn, cn) = m(x[:, n:n + 1], (h0[:, n:n + 1], c0[:, n:n + 1]), num_threads=1)
                assert np.array_equal(y[:, n:n + 1], yn), f"N={N} T={T} row {n}"
                assert np.array_equal(h[:, n:n + 1], hn) and np.array_equal(c[:, n:n + 1], cn)

"""Variable-length batches: PyTorch PackedSequence semantics (and Keras'
"repeat" padding), checked against the reference per sequence and torch."""
import numpy as np
import pytest

import fastlstm
from fastlstm import DTypeError, ShapeError
from tolerances import assert_close


def _per_sequence_reference(m, x, hx, lens):
    """Each sequence alone through the float64 reference (time-major x)."""
    T, N, _ = x.shape
    D, Hout = m.num_directions, m.output_size
    out = np.zeros((T, N, D * Hout))
    hn = np.zeros((m.num_layers * D, N, Hout))
    cn = np.zeros((m.num_layers * D, N, m.hidden_size))
    for n in range(N):
        L = int(lens[n])
        h = None if hx is None else (hx[0][:, n:n + 1], hx[1][:, n:n + 1])
        if L == 0:
            if hx is not None:
                hn[:, n], cn[:, n] = hx[0][:, n], hx[1][:, n]
            continue
        saved, m.batch_first = m.batch_first, False
        try:
            o, (a, b) = m.reference(x[:L, n:n + 1], h)
        finally:
            m.batch_first = saved
        out[:L, n] = o[:, 0]
        hn[:, n], cn[:, n] = a[:, 0], b[:, 0]
    return out, hn, cn


@pytest.mark.parametrize("seed", range(10))
def test_lengths_match_per_sequence_reference(isa, seed):
    rng = np.random.default_rng(seed)
    T, N = int(rng.integers(1, 20)), int(rng.integers(1, 14))
    H = int(rng.integers(2, 40))
    P = int(rng.integers(1, H)) if seed % 3 == 0 else 0
    m = fastlstm.LSTM(5, H, num_layers=int(rng.integers(1, 3)), bidirectional=bool(seed % 2),
                      proj_size=P, seed=seed)
    lens = rng.integers(0 if seed % 4 == 0 else 1, T + 1, size=N)
    lens[rng.integers(N)] = T
    x = rng.standard_normal((T, N, 5)).astype(np.float32)
    D = m.num_directions
    hx = None
    if seed % 2:
        hx = (rng.standard_normal((m.num_layers * D, N, P or H)).astype(np.float32),
              rng.standard_normal((m.num_layers * D, N, H)).astype(np.float32))
    for nt in (1, 2):
        out, (h, c) = m(x, hx, lengths=lens, num_threads=nt)
        ro, rh, rc = _per_sequence_reference(m, x, hx, lens)
        assert_close(out, ro, np.float32, "out")
        assert_close(h, rh, np.float32, "h_n")
        assert_close(c, rc, np.float32, "c_n")
        for n in range(N):
            assert not out[lens[n]:, n].any()


def test_sorted_and_unsorted_batches_agree():
    rng = np.random.default_rng(1)
    m = fastlstm.LSTM(4, 24, num_layers=2, bidirectional=True, seed=1)
    x = rng.standard_normal((12, 9, 4)).astype(np.float32)
    lens = rng.integers(1, 13, size=9)
    perm = rng.permutation(9)
    a = m(x, lengths=lens)
    b = m(x[:, perm], lengths=lens[perm])
    np.testing.assert_array_equal(a[0][:, perm], b[0])
    np.testing.assert_array_equal(a[1][0][:, perm], b[1][0])
    np.testing.assert_array_equal(a[1][1][:, perm], b[1][1])


def test_full_lengths_equal_no_lengths():
    rng = np.random.default_rng(2)
    m = fastlstm.LSTM(4, 20, bidirectional=True, seed=2)
    x = rng.standard_normal((7, 3, 4)).astype(np.float32)
    a = m(x)
    b = m(x, lengths=[7, 7, 7])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1][0], b[1][0])


def test_batch_first_and_unbatched_lengths():
    rng = np.random.default_rng(3)
    m = fastlstm.LSTM(4, 10, batch_first=True, seed=3)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    out, (h, c) = m(x, lengths=[6, 2, 4])
    assert not out[1, 2:].any()
    np.testing.assert_array_equal(h[0, 1], out[1, 1])
    # a batch of one runs other kernels (a different summation order): close, not bitwise
    o1, (h1, _) = m(x[1, :2][None], lengths=[2])
    assert_close(o1[0], out[1, :2], np.float32)
    ou, (hu, cu) = m(x[1], lengths=2)
    np.testing.assert_array_equal(ou[:2], o1[0])
    assert not ou[2:].any()


def test_keras_repeat_padding():
    rng = np.random.default_rng(4)
    m = fastlstm.LSTM(3, 5, bidirectional=True, seed=4)
    x = rng.standard_normal((6, 2, 3)).astype(np.float32)
    out, _ = m(x, lengths=[6, 3], padding="repeat")
    z, _ = m(x, lengths=[6, 3])
    np.testing.assert_array_equal(out[:3], z[:3])
    for t in range(3, 6):
        np.testing.assert_array_equal(out[t, 1, :5], z[2, 1, :5])
        assert not out[t, 1, 5:].any()


@pytest.mark.parametrize("lengths, exc, words", [
    ([1, 2], ShapeError, r"lengths: expected shape \(3,\)"),
    ([1, 2, 9], ShapeError, r"lengths: values must be in \[0, T=5\]"),
    ([1, -1, 2], ShapeError, r"lengths: values must be in \[0, T=5\]"),
    ([1.0, 2.0, 3.0], DTypeError, "lengths: expected integers"),
    (["a", "b", "c"], DTypeError, "lengths: expected integers"),
])
def test_bad_lengths(lengths, exc, words):
    m = fastlstm.LSTM(2, 3)
    with pytest.raises(exc, match=words):
        m(np.zeros((5, 3, 2), np.float32), lengths=lengths)


def test_bad_padding():
    m = fastlstm.LSTM(2, 3)
    with pytest.raises(ValueError, match="padding"):
        m(np.zeros((5, 1, 2), np.float32), lengths=[3], padding="same")


# ------------------------------------------------------------ masks (Keras)
def _masked_reference(m, x, hx, mask, padding):
    """Each sequence's valid steps alone through the float64 reference, the
    outputs put back at those steps; masked steps zero, or with "repeat" the
    forward half of the last valid output before them (zeros before the
    first).  Time-major x (T, N, In) and mask (T, N)."""
    T, N, _ = x.shape
    Hout = m.output_size
    v = [np.nonzero(mask[:, n])[0] for n in range(N)]
    lens = np.array([len(i) for i in v])
    xc = np.zeros_like(x)
    for n in range(N):
        xc[:lens[n], n] = x[v[n], n]
    oc, hn, cn = _per_sequence_reference(m, xc, hx, lens)
    out = np.zeros_like(oc)
    for n in range(N):
        out[v[n], n] = oc[:lens[n], n]
        if padding == "repeat":
            for t in range(T):
                k = np.searchsorted(v[n], t, side="right")  # valid steps up to t
                if not mask[t, n] and k > 0:
                    out[t, n, :Hout] = oc[k - 1, n, :Hout]
    return out, hn, cn


@pytest.mark.parametrize("seed", range(8))
def test_mask_with_holes_matches_per_sequence_reference(isa, seed):
    rng = np.random.default_rng(100 + seed)
    T, N = int(rng.integers(2, 16)), int(rng.integers(1, 9))
    H = int(rng.integers(2, 33))
    P = int(rng.integers(1, H)) if seed % 3 == 0 else 0
    m = fastlstm.LSTM(4, H, num_layers=1 + seed % 2, bidirectional=seed % 4 < 2, proj_size=P,
                      seed=seed)
    x = rng.standard_normal((T, N, 4)).astype(np.float32)
    mask = rng.random((T, N)) < 0.6
    mask[0, 0], mask[-1, 0] = False, True  # row 0: a leading hole, not a prefix
    if N > 1:
        mask[:, 1] = False  # no valid step at all
    D = m.num_directions
    hx = None
    if seed % 2:
        hx = (rng.standard_normal((m.num_layers * D, N, P or H)).astype(np.float32),
              rng.standard_normal((m.num_layers * D, N, H)).astype(np.float32))
    for padding in ("zeros", "repeat"):
        ro, rh, rc = _masked_reference(m, x, hx, mask, padding)
        for nt in (1, 2):
            out, (h, c) = m(x, hx, mask=mask, padding=padding, num_threads=nt)
            assert out.shape == (T, N, D * m.output_size) and out.flags.c_contiguous
            assert_close(out, ro, np.float32, f"out ({padding}, {nt} threads)")
            assert_close(h, rh, np.float32, "h_n")
            assert_close(c, rc, np.float32, "c_n")
            if padding == "zeros":
                assert not out[~mask].any()


def test_masked_steps_do_not_read_x():
    """What x holds at masked steps (NaN here) changes nothing: those steps
    are skipped, not computed and discarded."""
    rng = np.random.default_rng(5)
    m = fastlstm.LSTM(3, 12, num_layers=2, bidirectional=True, seed=5)
    x = rng.standard_normal((9, 4, 3)).astype(np.float32)
    mask = rng.random((9, 4)) < 0.5
    mask[0] = False
    a = m(x, mask=mask, padding="repeat")
    xn = x.copy()
    xn[~mask] = np.nan
    b = m(xn, mask=mask, padding="repeat")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1][0], b[1][0])
    np.testing.assert_array_equal(a[1][1], b[1][1])


def test_prefix_mask_is_lengths():
    rng = np.random.default_rng(6)
    m = fastlstm.LSTM(3, 10, bidirectional=True, seed=6)
    x = rng.standard_normal((8, 5, 3)).astype(np.float32)
    lens = np.array([8, 0, 3, 5, 1])
    mask = np.arange(8)[:, None] < lens[None, :]
    for padding in ("zeros", "repeat"):
        a = m(x, mask=mask, padding=padding)
        b = m(x, lengths=lens, padding=padding)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1][0], b[1][0])
        np.testing.assert_array_equal(a[1][1], b[1][1])
    np.testing.assert_array_equal(m(x, mask=np.ones((8, 5), np.uint8))[0], m(x)[0])


def test_mask_batch_first_and_unbatched():
    rng = np.random.default_rng(7)
    kw = dict(num_layers=2, seed=7)
    mt, mb = fastlstm.LSTM(3, 6, **kw), fastlstm.LSTM(3, 6, batch_first=True, **kw)
    x = rng.standard_normal((7, 3, 3)).astype(np.float32)
    mask = rng.random((7, 3)) < 0.5
    mask[1, 0] = False
    a, (ha, ca) = mt(x, mask=mask, padding="repeat")
    b, (hb, cb) = mb(x.transpose(1, 0, 2), mask=mask.T, padding="repeat")
    assert b.shape == (3, 7, 6) and b.flags.c_contiguous
    np.testing.assert_array_equal(b, a.transpose(1, 0, 2))
    np.testing.assert_array_equal(hb, ha)
    # unbatched: (T, In) with a (T,) mask; a batch of one runs other kernels
    # (another summation order), so close to the batched call's row, not bitwise
    u, (hu, cu) = mb(x[:, 0], mask=mask[:, 0], padding="repeat")
    assert u.shape == (7, 6) and hu.shape == (2, 6)
    ro, rh, _ = _masked_reference(mt, x[:, :1], None, mask[:, :1], "repeat")
    assert_close(u, ro[:, 0], np.float32, "unbatched out")
    assert_close(hu, rh[:, 0], np.float32, "unbatched h_n")


@pytest.mark.parametrize("mask, lengths, exc, words", [
    (np.ones((5, 2), bool), None, ShapeError, r"mask: expected x's shape without its last axis, \(T, N\) = \(5, 3\)"),
    (np.ones((3, 5), bool), None, ShapeError, r"mask: .* got shape \(3, 5\)"),
    (np.ones((5, 3)), None, DTypeError, "mask: expected booleans"),
    (np.full((5, 3), 2), None, DTypeError, "mask: expected booleans .* with other values"),
    ("abc", None, DTypeError, "mask: expected booleans"),
    (np.ones((5, 3), bool), [5, 5, 5], ValueError, "lengths, mask: give one of them"),
])
def test_bad_masks(mask, lengths, exc, words):
    m = fastlstm.LSTM(2, 3)
    with pytest.raises(exc, match=words):
        m(np.zeros((5, 3, 2), np.float32), mask=mask, lengths=lengths)


torch = pytest.importorskip("torch", reason="torch is the oracle for PackedSequence")


@pytest.mark.parametrize("seed", range(6))
def test_packed_sequence_matches_torch(seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    T, N = 15, 7
    mod = torch.nn.LSTM(6, 18, num_layers=2, bidirectional=True, batch_first=bool(seed % 2)).eval()
    m = fastlstm.LSTM.from_torch(mod)
    lens = rng.integers(1, T + 1, size=N)
    lens[0] = T
    lens[1] = 1
    shape = (N, T, 6) if seed % 2 else (T, N, 6)
    x = rng.standard_normal(shape).astype(np.float32)
    enforce_sorted = seed % 3 == 0
    if enforce_sorted:
        order = np.argsort(-lens, kind="stable")
        lens = lens[order]
        x = x[order] if seed % 2 else x[:, order]
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        torch.from_numpy(x), torch.from_numpy(lens), batch_first=bool(seed % 2),
        enforce_sorted=enforce_sorted)
    with torch.no_grad():
        po, (th, tc) = mod(packed)
        to, _ = torch.nn.utils.rnn.pad_packed_sequence(po, batch_first=bool(seed % 2),
                                                        total_length=T)
    out, (h, c) = m(x, lengths=lens)
    assert_close(out, to.numpy(), np.float32, "out")
    assert_close(h, th.numpy(), np.float32, "h_n")
    assert_close(c, tc.numpy(), np.float32, "c_n")

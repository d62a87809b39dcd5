"""Streaming (LSTM.stream): chunked and step-by-step runs are bitwise equal to
one call on the whole sequence (same thread count); reset, state, errors."""
import numpy as np
import pytest

import fastlstm
from fastlstm import ShapeError

THREADS = (1, 2)


def _random_chunks(rng, T):
    """Chunk sizes summing to T: a random mix, with chunks of 1 among them."""
    sizes = []
    while sum(sizes) < T:
        k = 1 if rng.random() < 0.3 else int(rng.integers(1, T + 1))
        sizes.append(min(k, T - sum(sizes)))
    return sizes


def _feed(stream, x, sizes, batch_first):
    """Feed x in chunks of the given sizes; concatenate the outputs."""
    outs, t = [], 0
    axis = 1 if batch_first else 0
    for k in sizes:
        chunk = x[:, t:t + k] if batch_first else x[t:t + k]
        outs.append(stream(chunk))
        t += k
    return np.concatenate(outs, axis=axis)


CONFIGS = [  # (input, hidden, layers, proj, batch, batch_first)
    (5, 8, 1, 0, 1, False),
    (6, 17, 2, 0, 3, False),
    (4, 20, 3, 7, 4, True),
    (7, 33, 2, 5, 2, True),
    (3, 64, 1, 0, 5, False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "I{}_H{}_L{}_P{}_N{}_bf{}".format(*c))
def test_chunked_equals_one_shot_bitwise(cfg, isa):
    In, H, L, P, N, bf = cfg
    rng = np.random.default_rng(H)
    m = fastlstm.LSTM(In, H, num_layers=L, proj_size=P, batch_first=bf, seed=H)
    T = 23
    x = rng.standard_normal((N, T, In) if bf else (T, N, In)).astype(np.float32)
    for nt in THREADS:
        want, (wh, wc) = m(x, num_threads=nt)
        chunkings = [[T], [1] * T] + [_random_chunks(rng, T) for _ in range(4)]
        for sizes in chunkings:
            s = m.stream(N, num_threads=nt)
            got = _feed(s, x, sizes, bf)
            assert np.array_equal(got, want), f"threads={nt} chunks={sizes}"
            h, c = s.state
            assert np.array_equal(h, wh) and np.array_equal(c, wc), f"state, chunks={sizes}"


@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=lambda c: "I{}_H{}_L{}_P{}_N{}_bf{}".format(*c))
def test_step_equals_one_shot_bitwise(cfg):
    In, H, L, P, N, bf = cfg
    rng = np.random.default_rng(1 + H)
    m = fastlstm.LSTM(In, H, num_layers=L, proj_size=P, batch_first=bf, seed=H)
    T = 12
    x = rng.standard_normal((T, N, In)).astype(np.float32)  # time-major for step()
    xin = x.transpose(1, 0, 2) if bf else x
    for nt in THREADS:
        want, (wh, wc) = m(xin, num_threads=nt)
        want_tm = want.transpose(1, 0, 2) if bf else want
        s = m.stream(N, num_threads=nt)
        ys = [s.step(x[t]) for t in range(T)]
        assert all(y.shape == (N, P or H) for y in ys)
        assert np.array_equal(np.stack(ys), want_tm)
        h, c = s.state
        assert np.array_equal(h, wh) and np.array_equal(c, wc)
        # steps and chunks mixed
        s.reset()
        got = [s.step(x[0]), s(x[1:5].transpose(1, 0, 2) if bf else x[1:5]), s.step(x[5])]
        got[1] = got[1].transpose(1, 0, 2) if bf else got[1]
        assert np.array_equal(np.concatenate([got[0][None], got[1], got[2][None]]), want_tm[:6])


def test_step_batch1_takes_1d():
    rng = np.random.default_rng(2)
    m = fastlstm.LSTM(4, 9, seed=2)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    want, _ = m(x, num_threads=1)  # unbatched
    s = m.stream(num_threads=1)
    ys = [s.step(x[t]) for t in range(6)]
    assert ys[0].shape == (9,)
    assert np.array_equal(np.stack(ys), want)
    # outputs are fresh arrays, not views of a reused buffer
    assert not np.shares_memory(ys[0], ys[1])


def test_step_converts_dtype_and_layout():
    rng = np.random.default_rng(3)
    m = fastlstm.LSTM(5, 8, seed=3)
    x = rng.standard_normal((4, 2, 5))
    want, _ = m(x.astype(np.float32), num_threads=1)
    s = m.stream(2, num_threads=1)
    for t in range(4):
        xt = np.asfortranarray(x[t])  # float64, Fortran order
        assert np.array_equal(s.step(xt), want[t])


def test_float64_stream():
    rng = np.random.default_rng(4)
    m = fastlstm.LSTM(3, 6, num_layers=2, dtype=np.float64, seed=4)
    x = rng.standard_normal((9, 2, 3))
    want, _ = m(x, num_threads=1)
    s = m.stream(2, num_threads=1)
    got = np.concatenate([s(x[:4]), s(x[4:5]), s(x[5:])])
    assert got.dtype == np.float64 and np.array_equal(got, want)


@pytest.mark.parametrize("nt", THREADS)
def test_reset_all_and_some_rows(nt):
    rng = np.random.default_rng(5)
    N, T = 4, 10
    m = fastlstm.LSTM(3, 12, num_layers=2, proj_size=5, seed=5)
    x = rng.standard_normal((2 * T, N, 3)).astype(np.float32)
    s = m.stream(N, num_threads=nt)
    s(x[:T])
    # reset of all rows: the stream continues as if starting fresh
    s.reset()
    assert not s.state[0].any() and not s.state[1].any()
    fresh, (fh, fc) = m(x[T:], num_threads=nt)
    assert np.array_equal(s(x[T:]), fresh)

    # reset of some rows (indices, then a boolean mask)
    whole, (wh, wc) = m(x, num_threads=nt)
    _, (h_half, c_half) = m(x[:T], num_threads=nt)
    for rows in ([1, 3], np.array([False, True, False, True])):
        s = m.stream(N, num_threads=nt)
        first = s(x[:T])
        assert np.array_equal(first, whole[:T])
        s.reset(rows)
        h, c = s.state
        assert not h[:, [1, 3]].any() and not c[:, [1, 3]].any()
        assert np.array_equal(h[:, [0, 2]], h_half[:, [0, 2]])
        assert np.array_equal(c[:, [0, 2]], c_half[:, [0, 2]])
        second = s(x[T:])
        # rows not reset are unaffected: they continue the whole sequence
        assert np.array_equal(second[:, [0, 2]], whole[T:, [0, 2]])
        # rows reset start fresh on the second half; compare against a fresh
        # run of the same batch (same N, so the same kernels and summation order)
        assert np.array_equal(second[:, [1, 3]], fresh[:, [1, 3]])
        h, c = s.state
        assert np.array_equal(h[:, [0, 2]], wh[:, [0, 2]])
        assert np.array_equal(h[:, [1, 3]], fh[:, [1, 3]])
        assert np.array_equal(c[:, [1, 3]], fc[:, [1, 3]])


def test_reset_rows_refuses_bad_rows():
    s = fastlstm.LSTM(2, 3).stream(3)
    with pytest.raises(ShapeError, match="rows"):
        s.reset([3])
    with pytest.raises(ShapeError, match="rows"):
        s.reset(np.array([True, False]))
    with pytest.raises(ShapeError, match="rows"):
        s.reset([0.5])


def test_reset_empty_rows_list():
    s = fastlstm.LSTM(2, 3).stream(3)
    s.step(np.ones((3, 2), np.float32))
    h = s.state[0]
    s.reset([])  # no rows: nothing changes
    np.testing.assert_array_equal(s.state[0], h)


def test_state_roundtrip_and_resume():
    rng = np.random.default_rng(6)
    N, T = 3, 14
    m = fastlstm.LSTM(4, 10, num_layers=2, proj_size=3, seed=6)
    x = rng.standard_normal((T, N, 4)).astype(np.float32)
    whole, _ = m(x, num_threads=1)
    s = m.stream(N, num_threads=1)
    s(x[:6])
    h, c = s.state
    assert h.shape == (2, N, 3) and c.shape == (2, N, 10)
    # state is a copy: mutating it does not touch the stream
    h_saved, c_saved = h.copy(), c.copy()
    h += 1.0
    assert np.array_equal(s.state[0], h_saved)
    # roundtrip into another stream: it continues exactly
    s2 = m.stream(N, num_threads=1)
    s2.state = (h_saved, c_saved)
    assert np.array_equal(s2.state[0], h_saved) and np.array_equal(s2.state[1], c_saved)
    assert np.array_equal(s2(x[6:]), whole[6:])
    # state given as the hx of a one-shot call agrees too
    o, _ = m(x[6:], (h_saved, c_saved), num_threads=1)
    assert np.array_equal(o, whole[6:])
    # wrong shapes are refused, naming the part
    with pytest.raises(ShapeError, match=r"state\[0\] \(h\)"):
        s2.state = (np.zeros((2, N, 10)), c_saved)
    with pytest.raises(ShapeError, match=r"state\[1\] \(c\)"):
        s2.state = (h_saved, np.zeros((1, N, 10)))
    with pytest.raises(ShapeError, match="state"):
        s2.state = h_saved


def test_bidirectional_refused():
    m = fastlstm.LSTM(3, 4, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional") as e:
        m.stream()
    assert "whole sequence" in str(e.value)


@pytest.mark.parametrize("shape", [(3,), (2, 4), (1, 2, 3), (3, 2), ()])
def test_bad_step_shapes_name_x_t(shape):
    s = fastlstm.LSTM(3, 5).stream(2)
    with pytest.raises(ShapeError, match="x_t"):
        s.step(np.zeros(shape, np.float32))


def test_bad_step_shape_batch1():
    s = fastlstm.LSTM(3, 5).stream(1)
    for shape in [(4,), (2, 3), (1, 1, 3)]:
        with pytest.raises(ShapeError, match="x_t"):
            s.step(np.zeros(shape, np.float32))


def test_bad_chunk_shapes():
    s = fastlstm.LSTM(3, 5).stream(2)
    with pytest.raises(ShapeError, match="chunk"):
        s(np.zeros((4, 3, 3), np.float32))
    with pytest.raises(ShapeError, match="chunk"):
        s(np.zeros((4, 3), np.float32))


def test_step_sees_weight_changes():
    """step() reads the model's current weights (copy-on-write swap) each call."""
    rng = np.random.default_rng(7)
    m = fastlstm.LSTM(4, 6, seed=7)
    other = fastlstm.LSTM(4, 6, seed=8)
    x = rng.standard_normal((5, 1, 4)).astype(np.float32)
    s = m.stream(1, num_threads=1)
    y0 = s.step(x[0])
    m.load_state_dict(other.state_dict())
    got = [y0] + [s.step(x[t]) for t in range(1, 5)]
    # the same as running the first step on the old weights, the rest on the new
    _, hc = fastlstm.LSTM(4, 6, seed=7)(x[:1], num_threads=1)
    want_rest, _ = other(x[1:], hc, num_threads=1)
    assert np.array_equal(np.stack(got[1:]), want_rest)


def test_step_fast_and_slow_inputs_agree():
    """Every input form step() converts (lists, float64, strided and unaligned
    views) gives bitwise the result of the C-contiguous float32 array."""
    rng = np.random.default_rng(9)
    m = fastlstm.LSTM(5, 7, seed=9)
    x = rng.standard_normal((6, 2, 5)).astype(np.float32)
    want, _ = m(x, num_threads=1)
    raw = np.zeros(2 * 5 * 4 + 1, np.uint8)
    unaligned = raw[1:].view(np.float32).reshape(2, 5)
    forms = [lambda a: a, lambda a: a.tolist(), lambda a: a.astype(np.float64),
             lambda a: np.asfortranarray(a), lambda a: np.repeat(a, 2, axis=1)[:, ::2],
             lambda a: a.astype(">f4"), lambda a: a.astype(">f8")]  # byte-swapped

    def unaligned_copy(a):
        unaligned[...] = a
        assert not unaligned.flags.aligned
        return unaligned
    forms.append(unaligned_copy)
    for form in forms:
        s = m.stream(2, num_threads=1)
        got = np.stack([s.step(form(x[t])) for t in range(6)])
        assert got.dtype == np.float32 and np.array_equal(got, want)


ONE_STEP = [  # (input, hidden, layers, proj, batch, bidirectional, cell options)
    (600, 40, 1, 0, 13, False, {}),              # input beyond one K chunk; row tiles 5+4+4
    (9, 24, 2, 0, 8, True, {"peepholes": True}),  # the generic epilogue; a second layer
    (5, 33, 2, 7, 7, True, {"clip": 0.5}),        # projection; a partial last block
    (6, 20, 1, 0, 6, False, {}),                  # one full tile of six rows
]


@pytest.mark.parametrize("cfg", ONE_STEP, ids=lambda c: "I{}_H{}_L{}_P{}_N{}_D{}".format(*c[:6]))
def test_one_step_call_equals_longer_call_bitwise(cfg, isa):
    """A one-step call (what Stream.step runs) fuses the input projection into
    the recurrent kernel; its outputs and states are bitwise those of the
    unfused path, here step 0 of a two-step call whose rows all have length 1
    (the reverse direction then also starts at step 0, from the same h0)."""
    In, H, L, P, N, bidir, opts = cfg
    rng = np.random.default_rng(In + H)
    m = fastlstm.LSTM(In, H, num_layers=L, proj_size=P, bidirectional=bidir, seed=H, **opts)
    D = 2 if bidir else 1
    x = rng.standard_normal((2, N, In)).astype(np.float32)
    h0 = rng.standard_normal((L * D, N, P or H)).astype(np.float32)
    c0 = rng.standard_normal((L * D, N, H)).astype(np.float32)
    for nt in THREADS:
        for hx in (None, (h0, c0)):
            y1, (h1, c1) = m(x[:1], hx, num_threads=nt)
            y2, (h2, c2) = m(x, hx, lengths=[1] * N, num_threads=nt)
            assert np.array_equal(y1[0], y2[0]), f"threads={nt} hx={hx is not None}"
            assert np.array_equal(h1, h2) and np.array_equal(c1, c2)


@pytest.mark.parametrize("nt", THREADS)
@pytest.mark.parametrize("batch,proj", [(1, 0), (3, 0), (2, 5)])
def test_step_out_is_written_and_returned(nt, batch, proj):
    """step(x_t, out=y) writes y in place, returns it, and gives bitwise the
    outputs of the allocating step (also when x_t needs a conversion)."""
    rng = np.random.default_rng(40 + batch)
    m = fastlstm.LSTM(6, 20, num_layers=2, proj_size=proj, seed=4)
    x = rng.standard_normal((7, batch, 6)).astype(np.float32)
    ref = m.stream(batch, num_threads=nt)
    want = [ref.step(x[t]) for t in range(7)]
    s = m.stream(batch, num_threads=nt)
    y = np.full((batch, m.output_size), np.nan, np.float32)
    for t in range(7):
        xt = x[t] if t % 2 == 0 else np.asfortranarray(x[t].astype(np.float64))  # slow path too
        got = s.step(xt, out=y)
        assert got is y
        assert np.array_equal(y, want[t]), f"t={t}"
    if batch == 1:  # the 1-D form
        s1 = m.stream(1, num_threads=nt)
        y1 = np.empty(m.output_size, np.float32)
        assert s1.step(x[0, 0], out=y1) is y1 and np.array_equal(y1, want[0][0])


def test_step_out_refuses_bad_arrays():
    m = fastlstm.LSTM(4, 6, seed=5)
    s = m.stream(2, num_threads=1)
    x = np.ones((2, 4), np.float32)
    h0 = s.state
    bad = [
        ([[0.0] * 6] * 2, TypeError, "out: expected a numpy.ndarray"),
        (np.empty((2, 6), np.float64), TypeError, "out: expected dtype float32"),
        (np.empty((2, 6), ">f4"), TypeError, "out: expected dtype float32"),
        (np.empty((6, 2), np.float32), ShapeError, r"out: expected shape \(2, 6\)"),
        (np.empty((2, 6, 1), np.float32), ShapeError, "out: expected shape"),
        (np.empty((2, 12), np.float32)[:, ::2], ValueError, "out: must be C-contiguous"),
        (np.empty((6, 2), np.float32).T, ValueError, "out: must be C-contiguous"),
    ]
    ro = np.empty((2, 6), np.float32)
    ro.flags.writeable = False
    bad.append((ro, ValueError, "writeable"))
    for out, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            s.step(x, out=out)
    # out overlapping x_t (input = hidden here): refused, nothing written
    m2 = fastlstm.LSTM(6, 6, seed=6)
    s2 = m2.stream(1, num_threads=1)
    xy = np.ones(6, np.float32)
    with pytest.raises(ValueError, match="out: must not overlap x_t"):
        s2.step(xy, out=xy)
    assert np.array_equal(xy, np.ones(6, np.float32))
    with pytest.raises(ValueError, match="out: must not overlap the stream's state"):
        s.step(x, out=s._h[0])  # only reachable through a private attribute
    # a refused out leaves the state as it was
    for a, b in zip(s.state, h0):
        assert np.array_equal(a, b)


def test_stream_loop_ns_runs_the_steps():
    """The benchmark helper behind benchmarks/stream_breakdown.py runs n real
    steps: the state afterwards is bitwise that of n calls of step."""
    from fastlstm import _engine
    m = fastlstm.LSTM(5, 12, num_layers=2, seed=8)
    x = np.random.default_rng(8).standard_normal(5).astype(np.float32)
    ref = m.stream(1, num_threads=1)
    for _ in range(1 + 7):  # stream_loop_ns runs one checked step, then n = 7
        want = ref.step(x)
    s = m.stream(1, num_threads=1)
    y = np.empty(12, np.float32)
    ns = _engine.stream_loop_ns(s._fast, x, y, 7)
    assert ns > 0
    assert np.array_equal(y, want)
    for a, b in zip(s.state, ref.state):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="x, y"):
        _engine.stream_loop_ns(s._fast, x.astype(np.float64), y, 3)
    with pytest.raises(ValueError, match="n:"):
        _engine.stream_loop_ns(s._fast, x, y, 0)


def test_busy_stream_refuses_every_entry_point():
    """While a stream runs in one thread (marked busy exactly as step and
    chunk calls mark it), every entry point of another thread gets a clear
    RuntimeError instead of sharing the state and the workspace."""
    m = fastlstm.LSTM(4, 8, seed=0)
    s = m.stream(1)
    x = np.ones(4, np.float32)
    s._fast.enter("test")
    try:
        calls = {
            "step": lambda: s.step(x),
            "step (slow path)": lambda: s.step([1.0, 1.0, 1.0, 1.0]),
            "stream(chunk)": lambda: s(np.ones((3, 1, 4), np.float32)),
            "step (mask)": lambda: s.step(x, mask=[False]),
            "stream(chunk) (mask)": lambda: s(np.ones((3, 1, 4), np.float32),
                                              mask=np.array([[1], [0], [1]], bool)),
            "reset": lambda: s.reset(),
            "state": lambda: s.state,
        }
        for name, call in calls.items():
            with pytest.raises(RuntimeError, match="another thread is running this stream"):
                call()
        with pytest.raises(RuntimeError, match="another thread"):
            s.state = (np.zeros((1, 1, 8), np.float32), np.zeros((1, 1, 8), np.float32))
    finally:
        s._fast.leave()
    y = s.step(x)  # usable again, and nothing ran while it was busy
    np.testing.assert_array_equal(y, m.stream(1).step(x))


@pytest.mark.parametrize("nt", THREADS)
def test_stream_shared_by_threads_never_mixes_steps(nt):
    """Two Python threads stepping one stream: each step either runs whole or
    raises the busy error, so the final state is bitwise that of as many
    steps run one after another.  The cell counts its steps: W = 0, the input
    and forget gates saturated at exactly 1, so c_t = c_{t-1} + tanh(0.5) and
    a lost or doubled update (two steps reading the same c) shows in c."""
    import threading
    H = 128
    m = fastlstm.LSTM(128, H, seed=1)
    b = np.zeros(4 * H, np.float32)
    b[:H] = 40.0          # i = 1
    b[H:2 * H] = 40.0     # f = 1
    b[2 * H:3 * H] = 0.5  # g = tanh(0.5)
    m.set_weights(0, w_ih=np.zeros((4 * H, 128), np.float32),
                  w_hh=np.zeros((4 * H, H), np.float32), b_ih=b, b_hh=np.zeros(4 * H, np.float32))
    s = m.stream(1, num_threads=nt)
    x = np.full(128, 0.25, np.float32)
    done, errors, others = [0, 0], [0, 0], []

    def worker(i):
        for _ in range(400):
            try:
                s.step(x)
                done[i] += 1
            except RuntimeError as e:
                if "another thread" not in str(e):
                    others.append(e)
                errors[i] += 1
            except Exception as e:  # pragma: no cover - reported below
                others.append(e)

    th = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert not others
    assert sum(done) > 0
    ref = m.stream(1, num_threads=nt)
    for _ in range(sum(done)):
        ref.step(x)
    h, c = s.state
    h_ref, c_ref = ref.state
    np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_array_equal(c, c_ref)


@pytest.mark.parametrize("nt", THREADS)
def test_workspace_reused_across_unlike_calls(nt):
    """The engine keeps a call's context in the workspace and rewrites only
    what changed since the last call on it (a stream's steps: nothing but x
    and y).  One workspace, starting as garbage, reused by calls that differ
    in every field -- T, batch, lengths, initial state, strides, arrays --
    gives each call bitwise the outputs of a call on a fresh workspace."""
    rng = np.random.default_rng(77)
    m = fastlstm.LSTM(5, 40, num_layers=2, seed=7)
    st = m._stack
    calls = []  # (T, N, lengths, with_state)
    for T, N in [(9, 3), (1, 1), (9, 3), (4, 2), (1, 3), (12, 1), (4, 2)]:
        for lengths in (None, np.sort(rng.integers(0, T + 1, N)).astype(np.int32)[::-1].copy()):
            calls.append((T, N, lengths, bool(rng.integers(0, 2))))
    room = max(st.workspace_bytes(T, N) for T, N, _, _ in calls)
    ws = np.full(room, 0xFF, np.uint8)  # NaNs, and a garbage context
    H = m.hidden_size
    for i, (T, N, lengths, with_state) in enumerate(calls):
        x = rng.standard_normal((T, N, 5)).astype(np.float32)
        h0 = rng.standard_normal((2, N, H)).astype(np.float32) if with_state else None
        c0 = rng.standard_normal((2, N, H)).astype(np.float32) if with_state else None
        outs = []
        for w in (ws, np.full(st.workspace_bytes(T, N), 0xFF, np.uint8)):
            y = np.full((T, N, H), np.nan, np.float32)
            hn = np.full((2, N, H), np.nan, np.float32)
            cn = np.full((2, N, H), np.nan, np.float32)
            st.forward(x, y, h0, c0, hn, cn, w, nt, lengths)
            outs.append((y, hn, cn))
        for got, want in zip(outs[0], outs[1]):  # (y past a length: left unwritten, NaN in both)
            assert np.array_equal(got, want, equal_nan=True), f"call {i}: T={T} N={N} lengths={lengths}"
        assert not np.isnan(outs[0][1]).any(), f"call {i}: h_n not written"


@pytest.mark.parametrize("layers,batch", [(1, 1), (2, 1), (1, 3), (3, 2)])
def test_two_thread_steps_keep_the_state_exact_after_every_step(layers, batch):
    """On two threads the last layer's h_n is written after the threads are
    done (the caller copies the worker's columns from y): after every step
    the state -- read, and also set between steps -- is bitwise the
    one-thread stream's, and so are the outputs."""
    rng = np.random.default_rng(90 + layers + batch)
    m = fastlstm.LSTM(7, 50, num_layers=layers, seed=3)  # 4 hidden blocks: two a thread
    one, two = m.stream(batch, num_threads=1), m.stream(batch, num_threads=2)
    for t in range(30):
        x = rng.standard_normal((batch, 7)).astype(np.float32)
        y1, y2 = one.step(x), two.step(x)
        assert np.array_equal(y1, y2), f"t={t}"
        (h1, c1), (h2, c2) = one.state, two.state
        assert np.array_equal(h1, h2) and np.array_equal(c1, c2), f"state after t={t}"
        if t % 7 == 6:  # a state set from outside is what the next step starts from
            h = rng.standard_normal(h1.shape).astype(np.float32)
            c = rng.standard_normal(c1.shape).astype(np.float32)
            one.state = (h, c)
            two.state = (h, c)


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("cfg", CONFIGS[1:], ids=lambda c: "I{}_H{}_L{}_P{}_N{}_bf{}".format(*c))
@pytest.mark.parametrize("padding", ["zeros", "repeat"])
def test_masked_steps_and_chunks_equal_one_masked_call(cfg, padding, isa):
    """A sequence with a Keras mask (holes, leading masked steps, a row
    masked throughout), fed step by step and in random chunks with its mask,
    gives the outputs and final state of one m(x, mask=) call (float32
    rounding: the valid rows of a step are other batches there)."""
    from tolerances import assert_close
    In, H, L, P, N, bf = cfg
    rng = np.random.default_rng(300 + H)
    m = fastlstm.LSTM(In, H, num_layers=L, proj_size=P, batch_first=bf, seed=H)
    T = 19
    x = rng.standard_normal((T, N, In)).astype(np.float32)
    mask = rng.random((T, N)) < 0.6
    mask[:4, 0] = False
    mask[:, -1] = False
    xm, mm = (x.transpose(1, 0, 2), mask.T) if bf else (x, mask)
    for nt in THREADS:
        want, (wh, wc) = m(xm, mask=mm, padding=padding, num_threads=nt)
        wt = want.transpose(1, 0, 2) if bf else want
        s = m.stream(N, num_threads=nt)
        got = np.stack([s.step(x[t], mask=mask[t], padding=padding) for t in range(T)])
        assert_close(got, wt, np.float32, f"steps, {nt} threads")
        assert_close(s.state[0], wh, np.float32, "h after steps")
        assert_close(s.state[1], wc, np.float32, "c after steps")
        sizes = _random_chunks(rng, T)
        s, outs, t = m.stream(N, num_threads=nt), [], 0
        for k in sizes:
            c, mk = x[t:t + k], mask[t:t + k]
            outs.append(s(c.transpose(1, 0, 2) if bf else c, mask=mk.T if bf else mk,
                          padding=padding))
            t += k
        got = np.concatenate(outs, axis=1 if bf else 0)
        assert_close(got, want, np.float32, f"chunks {sizes}, {nt} threads")
        assert_close(s.state[0], wh, np.float32, "h after chunks")


@pytest.mark.parametrize("nt", THREADS)
def test_masked_step_keeps_masked_rows_and_the_others_bitwise(nt):
    m = fastlstm.LSTM(5, 24, num_layers=2, proj_size=7, seed=4)
    rng = np.random.default_rng(4)
    a, b = m.stream(4, num_threads=nt), m.stream(4, num_threads=nt)
    for _ in range(3):  # some history in both
        x = rng.standard_normal((4, 5)).astype(np.float32)
        a.step(x), b.step(x)
    h0, c0 = a.state
    x = rng.standard_normal((4, 5)).astype(np.float32)
    valid = np.array([True, False, True, False])
    y = a.step(x, mask=valid)
    yr = b.step(x)
    h, c = a.state
    hb, cb = b.state
    np.testing.assert_array_equal(y[valid], yr[valid])  # valid rows: the unmasked step's bits
    np.testing.assert_array_equal(h[:, valid], hb[:, valid])
    np.testing.assert_array_equal(c[:, valid], cb[:, valid])
    np.testing.assert_array_equal(h[:, ~valid], h0[:, ~valid])  # masked rows: untouched
    np.testing.assert_array_equal(c[:, ~valid], c0[:, ~valid])
    assert not y[~valid].any()
    out = np.full((4, 7), np.nan, np.float32)
    assert a.step(x, out=out, mask=~valid, padding="repeat") is out
    np.testing.assert_array_equal(out[valid], h[-1, valid])  # repeat: the row's last output


def test_masked_step_batch1_and_errors():
    m = fastlstm.LSTM(3, 6, seed=5)
    s = m.stream(1)
    y = s.step(np.ones(3, np.float32))
    np.testing.assert_array_equal(s.step(np.ones(3, np.float32), mask=False, padding="repeat"), y)
    assert not s.step(np.ones(3, np.float32), mask=np.array([0], np.uint8)).any()
    s2 = m.stream(2)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ShapeError, match=r"mask: expected shape \(2,\), a bool per batch row"):
        s2.step(x, mask=[True, False, True])
    with pytest.raises(fastlstm.DTypeError, match="mask: expected booleans"):
        s2.step(x, mask=[0.5, 1.0])
    with pytest.raises(ValueError, match="padding: expected 'zeros' or 'repeat'"):
        s2.step(x, padding="same")
    with pytest.raises(ValueError, match="padding: expected"):
        s2.step(x, mask=[True, True], padding="last")
    with pytest.raises(ShapeError, match=r"mask: expected x's shape without its last axis"):
        s2(np.ones((4, 2, 3), np.float32), mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="padding: expected"):
        s2(np.ones((4, 2, 3), np.float32), padding="ones")
    h, c = s2.state
    assert not h.any() and not c.any()  # nothing ran

"""fastlstm.dask on a real LocalCluster (2 worker processes x 1 thread):
distributed results equal single-process results exactly."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastlstm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_import_fastlstm_does_not_import_dask():
    r = _run("import sys, fastlstm; m = fastlstm.LSTM(2, 3); m(__import__('numpy').zeros((1, 2)))"
             "; print(sorted(k for k in sys.modules if k == 'dask' or k.startswith('dask.')"
             " or k == 'distributed'))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_dask_gives_install_hint():
    r = _run("import sys; sys.modules['dask'] = None\n"
             "try:\n    import fastlstm.dask\nexcept ImportError as e:\n    print(e)")
    assert r.returncode == 0, r.stderr
    assert 'pip install "dask[distributed]"' in r.stdout


# ------------------------------------------------------------------ cluster
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip(
        "dask.distributed", reason="dask.distributed is not installed "
        '(pip install "dask[distributed]")')
    import cloudpickle

    # Task functions defined here travel by value (workers can't import tests/).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    import dask
    import fastlstm.dask as fd

    with dask.config.set(fd.worker_config()):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=40)
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def fd():
    pytest.importorskip("dask.distributed", reason="dask.distributed is not installed")
    import fastlstm.dask
    return fastlstm.dask


def _model(batch_first=False, **kw):
    return fastlstm.LSTM(8, 24, num_layers=2, bidirectional=True, batch_first=batch_first,
                         seed=5, **kw)


def _data(N=503, T=13, In=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, T, In)).astype(np.float32)
    lens = rng.integers(0, T + 1, N)
    lens[:3] = (0, T, 1)
    return x, lens


def _single(m, x, lengths=None, padding="zeros"):
    """Single-process reference on the whole batch: out (N, T, F), h_n (N, F), last (N, F)."""
    kw = {} if lengths is None else {"lengths": lengths, "padding": padding}
    out, (h, _) = m(x if m.batch_first else x.transpose(1, 0, 2), **kw)
    out = out if m.batch_first else out.transpose(1, 0, 2)
    D = m.num_directions
    h_n = np.concatenate([h[-D + d] for d in range(D)], axis=1)
    N, T = x.shape[:2]
    if lengths is None:
        last = out[:, -1]
    else:
        last = np.where((np.asarray(lengths) > 0)[:, None],
                        out[np.arange(N), np.maximum(np.asarray(lengths) - 1, 0)], 0)
    return {"sequence": out, "h_n": h_n, "last": last}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("output", ["h_n", "last", "sequence"])
def test_score_array_equals_single_process(client, fd, batch_first, output):
    import dask.array as da

    m = _model(batch_first)
    x, _ = _data()
    dx = da.from_array(x, chunks=(97, 13, 8))
    got = fd.score_array(m, dx, output=output, batch_size=40)
    assert got.chunks[0] == dx.chunks[0]
    res = got.compute()
    want = _single(m, x)[output]
    assert res.dtype == np.float32 and res.shape == want.shape
    assert np.array_equal(res, want)


@pytest.mark.parametrize("output", ["h_n", "last", "sequence"])
@pytest.mark.parametrize("padding", ["zeros", "repeat"])
def test_score_array_with_lengths(client, fd, output, padding):
    import dask.array as da

    m = _model()
    x, lens = _data(seed=1)
    dx = da.from_array(x, chunks=(128, 5, 8))  # chunked along T too: rechunked
    want = _single(m, x, lens, padding)[output]
    res = fd.score_array(m, dx, lengths=lens, output=output, padding=padding).compute()
    assert np.array_equal(res, want)
    dl = da.from_array(lens, chunks=50)  # lengths chunked differently from x
    res = fd.score_array(m, dx, lengths=dl, output=output, padding=padding,
                         batch_size=33).compute()
    assert np.array_equal(res, want)


@pytest.mark.parametrize("output", ["h_n", "last", "sequence"])
@pytest.mark.parametrize("padding", ["zeros", "repeat"])
def test_score_array_with_mask(client, fd, output, padding):
    """A Keras mask with holes (NumPy, or Dask chunked differently from x)
    gives the single-process m(x, mask=) call's results; "last" is the output
    at each row's last valid step."""
    import dask.array as da

    m = _model()
    x, _ = _data(seed=2)
    N, T = x.shape[:2]
    mask = np.random.default_rng(2).random((N, T)) < 0.6
    mask[0], mask[1, :3] = False, False
    out, (h, _) = m(x.transpose(1, 0, 2), mask=mask.T, padding=padding)
    out = out.transpose(1, 0, 2)
    last_t = np.where(mask.any(1), T - 1 - np.argmax(mask[:, ::-1], axis=1), 0)
    want = {"sequence": out, "h_n": np.concatenate([h[-2], h[-1]], axis=1),
            "last": np.where(mask.any(1)[:, None], out[np.arange(N), last_t], 0)}[output]
    dx = da.from_array(x, chunks=(128, 5, 8))
    res = fd.score_array(m, dx, mask=mask, output=output, padding=padding).compute()
    assert np.array_equal(res, want)
    dm = da.from_array(mask, chunks=(50, 4))
    res = fd.score_array(m, dx, mask=dm, output=output, padding=padding,
                         batch_size=33).compute()
    assert np.array_equal(res, want)


def test_score_array_float64_and_projection(client, fd):
    import dask.array as da

    m = fastlstm.LSTM(8, 20, proj_size=6, dtype=np.float64, seed=2)
    x, lens = _data(N=200, seed=2)
    res = fd.score_array(m, da.from_array(x, chunks=64), lengths=lens).compute()
    assert res.dtype == np.float64 and res.shape == (200, 6)
    assert np.array_equal(res, _single(m, x, lens)["h_n"])


def _ragged(n=411, In=8, seed=3, max_T=30):
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, max_T + 1, n)
    lens[:2] = (0, max_T)
    return [rng.standard_normal((int(t), In)).astype(np.float32) for t in lens]


@pytest.mark.parametrize("output", ["h_n", "last", "sequence"])
def test_score_bag_variable_lengths(client, fd, output):
    import dask.bag as db

    m = _model()
    seqs = _ragged()
    res = fd.score_bag(m, db.from_sequence(seqs, npartitions=6), output=output,
                       batch_size=25).compute()
    assert len(res) == len(seqs)
    for s, r in zip(seqs, res):  # each sequence alone, unbatched, single process
        out, (h, _) = m(s) if len(s) else (np.zeros((0, 48), np.float32), (np.zeros((4, 24)),
                                                                            None))
        want = {"sequence": out, "h_n": np.concatenate([h[-2], h[-1]]),
                "last": out[-1] if len(s) else np.zeros(48, np.float32)}[output]
        assert r.dtype == np.float32 and np.array_equal(r, want)


def test_score_bag_keyed_matches_padded_batch(client, fd):
    import dask.bag as db

    m = _model(batch_first=True)
    seqs = _ragged(n=300, seed=4)
    T = max(len(s) for s in seqs)
    x = np.zeros((len(seqs), T, 8), np.float32)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = s
    lens = np.array([len(s) for s in seqs])
    want = _single(m, x, lens)["h_n"]
    bag = db.from_sequence([(f"id{i}", s) for i, s in enumerate(seqs)], npartitions=5)
    res = fd.score_bag(m, bag, keyed=True).compute()
    assert [k for k, _ in res] == [f"id{i}" for i in range(len(seqs))]
    assert np.array_equal(np.stack([r for _, r in res]), want)


def _who(block, model):
    return np.array([[os.getpid(), id(model)]] * block.shape[0], np.int64)


@pytest.mark.parametrize("use_client", [True, False])
def test_model_reaches_each_worker_once(client, fd, use_client):
    """Every task on a worker sees the same model object (one copy per
    process), whether scattered (broadcast) or a delayed node of the graph."""
    import dask.array as da

    m = _model()
    marg = fd.model_argument(m, client if use_client else False)
    x = da.zeros((64, 3), chunks=(4, 3))  # 16 tasks
    who = da.blockwise(_who, "nf", x, "nj", marg, None, new_axes={"f": 2}, concatenate=True,
                       dtype=np.int64, meta=np.empty((0, 0), np.int64)).compute()
    pairs = {tuple(p) for p in who}
    pids = {p for p, _ in pairs}
    assert len(pairs) == len(pids) and 1 <= len(pids) <= 2


def test_default_num_threads(client, fd):
    cores = client.run(fd._usable_cores)
    assert fd.default_num_threads(client) == max(1, min(cores.values()) // 2)
    import dask

    with dask.config.set(num_workers=1):
        assert fd.default_num_threads(False) == fd._usable_cores()


def test_local_threaded_scheduler_without_client(fd):
    import dask
    import dask.array as da
    import dask.bag as db

    m = _model()
    x, lens = _data(N=150)
    with dask.config.set(scheduler="threads"):
        res = fd.score_array(m, da.from_array(x, chunks=40), lengths=lens, client=False).compute()
        assert np.array_equal(res, _single(m, x, lens)["h_n"])
        seqs = _ragged(n=50)
        bag = fd.score_bag(m, db.from_sequence(seqs, npartitions=3), client=False)
        want = fd.score_sequences(m, seqs)
    assert all(np.array_equal(a, b) for a, b in zip(bag.compute(scheduler="threads"), want))


def test_errors(fd):
    import dask.array as da
    import dask.bag as db

    m = _model()
    dx = da.zeros((10, 4, 8), chunks=5)
    with pytest.raises(TypeError, match="model"):
        fd.score_array("not a model", dx, client=False)
    with pytest.raises(TypeError, match="dask.array"):
        fd.score_array(m, np.zeros((10, 4, 8)), client=False)
    with pytest.raises(ValueError, match="x: expected shape"):
        fd.score_array(m, da.zeros((10, 4, 7), chunks=5), client=False)
    with pytest.raises(ValueError, match="output"):
        fd.score_array(m, dx, output="everything", client=False)
    with pytest.raises(ValueError, match="lengths"):
        fd.score_array(m, dx, lengths=np.ones(9, int), client=False)
    with pytest.raises(ValueError, match=r"mask: expected shape \(10, 4\)"):
        fd.score_array(m, dx, mask=np.ones((10, 5), bool), client=False)
    with pytest.raises(ValueError, match="lengths, mask: give one"):
        fd.score_array(m, dx, mask=np.ones((10, 4), bool), lengths=np.ones(10, int),
                       client=False)
    with pytest.raises(ValueError, match="num_threads"):
        fd.score_array(m, dx, num_threads=0, client=False)
    with pytest.raises(ValueError, match="batch_size"):
        fd.score_array(m, dx, batch_size=0, client=False)
    with pytest.raises(ValueError, match="padding"):
        fd.score_bag(m, db.from_sequence([np.zeros((3, 8))]), padding="edge", client=False)
    with pytest.raises(TypeError, match="bag"):
        fd.score_bag(m, [np.zeros((3, 8))], client=False)
    with pytest.raises(ValueError, match="sequence 1"):
        fd.score_sequences(m, [np.zeros((3, 8)), np.zeros((3, 7))])
    assert fd.score_sequences(m, []) == []

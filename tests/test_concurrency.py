"""Many Python threads at once: results bitwise equal to sequential calls,
and the GIL is released while C runs.

The worker pool runs one call at a time on several threads; a call that
finds it busy runs alone on its caller's thread.  The engine promises
bitwise-identical results for every thread count, so concurrency must not
change a single bit.  Nothing here asserts timing.
"""
import os
import sys
import threading
import time

import numpy as np
import pytest

import fastlstm

NUM_CALLERS = 8
CALLS_EACH = 6

# Configurations that take either thread split (batch rows for small
# hidden sizes, hidden blocks for large ones), both dtypes, projections,
# variable lengths and the generic (cell variant) epilogue.
CONFIGS = [
    dict(input_size=8, hidden_size=32, T=12, N=5),
    dict(input_size=8, hidden_size=32, T=12, N=3, bidirectional=True, num_layers=2),
    dict(input_size=40, hidden_size=300, T=6, N=2),
    dict(input_size=24, hidden_size=200, T=8, N=20, num_layers=2, proj_size=50),
    dict(input_size=6, hidden_size=20, T=9, N=7, dtype=np.float64, bidirectional=True),
    dict(input_size=6, hidden_size=20, T=9, N=4, peepholes=True, cell_clip=0.5),
    dict(input_size=5, hidden_size=17, T=10, N=6, lengths=True, bidirectional=True),
    # large enough for two threads, split by direction (one each, a barrier per
    # layer): few rows with W_hh in half an L2, many rows, float64, lengths
    dict(input_size=16, hidden_size=128, T=40, N=3, bidirectional=True, num_layers=3, lengths=True),
    dict(input_size=10, hidden_size=64, T=30, N=17, bidirectional=True, num_layers=2),
    dict(input_size=12, hidden_size=48, T=40, N=5, bidirectional=True, dtype=np.float64),
    dict(input_size=7, hidden_size=36, T=30, N=4, bidirectional=True, peepholes=True, clip=2.0),
]


def _ids(cfgs):
    return ["-".join(f"{k}={v.__name__ if isinstance(v, type) else v}" for k, v in c.items()) for c in cfgs]


def _make(cfg, seed):
    kw = {k: v for k, v in cfg.items() if k not in ("T", "N", "lengths")}
    m = fastlstm.LSTM(seed=seed, **kw)
    if cfg.get("peepholes"):
        m.set_weights(0, 0, peephole=np.random.default_rng(seed).standard_normal((3, m.hidden_size)))
    return m


def _inputs(cfg, m, seed):
    rng = np.random.default_rng(seed)
    T, N = cfg["T"], cfg["N"]
    x = rng.standard_normal((T, N, cfg["input_size"])).astype(m.dtype)
    LD = m.num_layers * m.num_directions
    hx = (rng.standard_normal((LD, N, m.output_size)), rng.standard_normal((LD, N, m.hidden_size)))
    lengths = rng.integers(0, T + 1, N) if cfg.get("lengths") else None
    return x, hx, lengths


def _flat(res):
    out, (h, c) = res
    return out, h, c


def _assert_bitwise(a, b, what):
    for u, v, name in zip(_flat(a), _flat(b), ("out", "h_n", "c_n")):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v, err_msg=f"{what}: {name} differs")


def _run_threads(jobs):
    """Run the callables of `jobs` (a list per thread), all threads released
    at once by a barrier; return the results per thread, re-raising errors."""
    barrier = threading.Barrier(len(jobs))
    results = [None] * len(jobs)
    errors = []

    def worker(k):
        try:
            barrier.wait()
            results[k] = [job() for job in jobs[k]]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_thread_count_does_not_change_bits(cfg):
    """The precondition of everything below: a concurrent caller runs
    single-threaded, so its result must equal the pool's bit for bit."""
    m = _make(cfg, 1)
    x, hx, lengths = _inputs(cfg, m, 2)
    want = m(x, hx, lengths=lengths, num_threads=1)
    for nt in (2, 3, None):
        _assert_bitwise(m(x, hx, lengths=lengths, num_threads=nt), want, f"num_threads={nt}")


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_one_model_many_threads(cfg):
    m = _make(cfg, 3)
    inputs = [_inputs(cfg, m, 100 + k) for k in range(NUM_CALLERS * CALLS_EACH)]
    want = [m(x, hx, lengths=ln) for x, hx, ln in inputs]  # sequential, default threads
    jobs = [[(lambda i=i: m(inputs[i][0], inputs[i][1], lengths=inputs[i][2]))
             for i in range(k * CALLS_EACH, (k + 1) * CALLS_EACH)] for k in range(NUM_CALLERS)]
    got = _run_threads(jobs)
    for k in range(NUM_CALLERS):
        for j in range(CALLS_EACH):
            i = k * CALLS_EACH + j
            _assert_bitwise(got[k][j], want[i], f"thread {k} call {j}")


def test_different_models_many_threads():
    cfgs = CONFIGS * 2
    models = [_make(cfg, 10 + k) for k, cfg in enumerate(cfgs)]
    inputs = [[_inputs(cfg, m, 1000 * k + j) for j in range(CALLS_EACH)]
              for k, (cfg, m) in enumerate(zip(cfgs, models))]
    want = [[m(x, hx, lengths=ln) for x, hx, ln in inp] for m, inp in zip(models, inputs)]
    jobs = [[(lambda m=m, a=a: m(a[0], a[1], lengths=a[2])) for a in inp]
            for m, inp in zip(models, inputs)]
    got = _run_threads(jobs)
    for k in range(len(models)):
        for j in range(CALLS_EACH):
            _assert_bitwise(got[k][j], want[k][j], f"model {k} call {j}")


def test_mixed_thread_counts_and_isas_many_threads():
    """Concurrent calls with explicit num_threads (1, 2, default) on every
    kernel path: each equals the sequential single-threaded result."""
    isas = fastlstm.cpu_info()["isas_available"]
    prev = fastlstm.cpu_info()["isa"]
    try:
        for isa in isas:
            fastlstm.set_isa(isa)
            m = _make(CONFIGS[1], 7)
            inputs = [_inputs(CONFIGS[1], m, 50 + k) for k in range(NUM_CALLERS)]
            want = [m(x, hx, num_threads=1) for x, hx, _ in inputs]
            nts = [1, 2, None]
            jobs = [[(lambda k=k, j=j: m(inputs[k][0], inputs[k][1], num_threads=nts[(k + j) % 3]))
                     for j in range(CALLS_EACH)] for k in range(NUM_CALLERS)]
            got = _run_threads(jobs)
            for k in range(NUM_CALLERS):
                for j in range(CALLS_EACH):
                    _assert_bitwise(got[k][j], want[k], f"{isa} thread {k} call {j}")
    finally:
        fastlstm.set_isa(prev)


def _long_call_model():
    """A model and input whose call takes a good fraction of a second on one
    thread.  The input is small and already of the model's dtype, so the
    Python part of the call does no large NumPy work (which could release
    the GIL on its own)."""
    m = fastlstm.LSTM(64, 512, seed=0)
    x = np.random.default_rng(0).standard_normal((1500, 1, 64)).astype(np.float32)
    return m, x


def test_gil_is_released_during_the_call():
    """While one thread is inside a fastlstm call, another Python thread
    makes progress.

    With the interpreter's switch interval set very long, the calling thread
    never hands the GIL over on a timer: between its two reads of the
    counter, the counting thread can only run if the call releases the GIL.
    A call that held it would leave the counter unchanged, every time.  The
    call is repeated (up to 20 times) only so that a heavily loaded machine
    that does not schedule the counting thread during one call cannot make
    the test fail; no duration is asserted.
    """
    m, x = _long_call_model()
    m(x[:5])  # warm-up: worker threads and first-call costs outside the measurement
    counter = [0]
    go = threading.Event()
    stop = threading.Event()

    def count():
        go.wait()
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.0005)  # blocks with the GIL released, so the caller can resume

    prev_interval = sys.getswitchinterval()
    t = threading.Thread(target=count)
    t.start()
    progressed = []
    try:
        sys.setswitchinterval(1000.0)
        go.set()
        for _ in range(20):
            before = counter[0]
            m(x, num_threads=1)
            progressed.append(counter[0] - before)
            if progressed[-1] > 0:
                break
    finally:
        sys.setswitchinterval(prev_interval)
        stop.set()
        t.join()
    assert max(progressed) > 0, f"no progress of the other thread during {len(progressed)} calls"


def test_concurrent_long_calls_finish_and_agree():
    """Two long calls at once (one gets the pool, one runs alone) finish and
    equal the sequential result."""
    m, x = _long_call_model()
    x = x[:400]
    want = m(x)
    got = _run_threads([[lambda: m(x)], [lambda: m(x)], [lambda: m(x, num_threads=2)]])
    for g in got:
        _assert_bitwise(g[0], want, "long call")


def test_weight_updates_during_calls():
    """load_state_dict/set_weights in one thread while others call the model:
    every call sees one complete set of weights (the old or the new one,
    bitwise), never a freed or half-packed cell."""
    cfg = CONFIGS[3]
    m = _make(cfg, 5)
    x, hx, _ = _inputs(cfg, m, 6)
    sd_a = m.state_dict()
    sd_b = {k: (v * 0.5).astype(v.dtype) for k, v in sd_a.items()}
    m.load_state_dict(sd_b)
    want_b = m(x, hx)
    m.load_state_dict(sd_a)
    want_a = m(x, hx)
    stop = threading.Event()

    def caller():
        res = []
        while not stop.is_set() or len(res) < 5:
            res.append(m(x, hx))
        return res

    def updater():
        for k in range(40):
            sd = sd_b if k % 2 else sd_a
            m.load_state_dict(sd)
            # A repack of one cell with the value it already has.
            m.set_weights(1, 0, w_hh=sd["weight_hh_l1"], b_ih=sd["bias_ih_l1"])
        m.load_state_dict(sd_a)
        stop.set()

    got = _run_threads([[caller], [caller], [updater]])
    for res in got[0][0] + got[1][0]:
        if np.array_equal(res[0], want_a[0]):
            _assert_bitwise(res, want_a, "old weights")
        else:
            _assert_bitwise(res, want_b, "new weights")
    _assert_bitwise(m(x, hx), want_a, "final weights")


def test_busy_machine_falls_back_to_one_thread_with_the_same_bits():
    """With every core busy in other processes, a hidden-split call (barrier
    per step) finds its worker descheduled; the pool notices (cpu_info()
    ["congested_calls"] grows) and runs the next calls alone.  Results are
    bitwise those of one thread throughout."""
    import subprocess
    m = fastlstm.LSTM(64, 256, seed=3)  # batch 1, hidden 256: split by hidden units
    x = np.random.default_rng(3).standard_normal((200, 1, 64)).astype(np.float32)
    want, _ = m(x, num_threads=1)
    before = fastlstm.cpu_info()["congested_calls"]
    hog = "import time\nt = time.time() + 30\nwhile time.time() < t: pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", hog])
            for _ in range(max(2, os.cpu_count() or 2))]
    try:
        deadline = time.monotonic() + 20
        seen = False
        while time.monotonic() < deadline:
            got, _ = m(x, num_threads=2)
            assert np.array_equal(got, want)
            if fastlstm.cpu_info()["congested_calls"] > before:
                seen = True
                break
    finally:
        for p in hogs:
            p.kill()
            p.wait()
    assert seen, "no congested call detected with every core busy"
    # in the solo window and after it, still the same bits
    for _ in range(3):
        got, _ = m(x, num_threads=2)
        assert np.array_equal(got, want)

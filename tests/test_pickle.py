"""Pickling (configuration + canonical weights only) and sharing a model
between threads, including weight updates while other threads call it."""
import copy
import pickle
import threading

import numpy as np
import pytest

import fastlstm
from fastlstm import WeightsError

CONFIGS = [
    dict(input_size=8, hidden_size=32),
    dict(input_size=5, hidden_size=17, num_layers=2, bidirectional=True, batch_first=True),
    dict(input_size=6, hidden_size=12, proj_size=5, bias=False, dtype=np.float64),
    dict(input_size=4, hidden_size=9, peepholes=True, activations=("hardsigmoid", "tanh", "elu"),
         activation_alpha=(0.3, None, 0.7), clip=3.0, cell_clip=2.5, input_forget=True,
         num_threads=1, dropout=0.25),
]


def _weights_nbytes(m):
    return sum(v.nbytes for v in m.state_dict().values())


def _outputs(m, x, **kw):
    out, (h, c) = m(x, **kw)
    return out, h, c


def _x(m, rng, T=7, N=5):
    shape = (N, T, m.input_size) if m.batch_first else (T, N, m.input_size)
    return rng.standard_normal(shape)


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_round_trip_is_bitwise(cfg, protocol):
    rng = np.random.default_rng(0)
    m = fastlstm.LSTM(**cfg, seed=3)
    if m.peepholes:
        m.load_state_dict({k: rng.standard_normal(v.shape) * 0.1
                           for k, v in m.state_dict().items() if k.startswith("peephole_")},
                          strict=False)
    m2 = pickle.loads(pickle.dumps(m, protocol=protocol))
    assert type(m2) is fastlstm.LSTM and repr(m2) == repr(m)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "dtype", "num_threads"):
        assert getattr(m2, attr) == getattr(m, attr), attr
    assert m2.cell_options() == m.cell_options()
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype and np.array_equal(sd2[k], sd[k]), k
    assert m2.packed_nbytes == m.packed_nbytes
    x = _x(m, rng)
    lengths = [7, 0, 3, 7, 1]
    for kw in ({}, {"lengths": lengths}, {"lengths": lengths, "padding": "repeat"}):
        for a, b in zip(_outputs(m, x, **kw), _outputs(m2, x, **kw)):
            assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_pickle_holds_weights_not_packed_layout(cfg):
    m = fastlstm.LSTM(**cfg, seed=1)
    payload = pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL)
    w = _weights_nbytes(m)
    assert w <= len(payload) <= w + 4096, (len(payload), w, m.packed_nbytes)
    assert b"Stack" not in payload and b"_engine" not in payload and b"_lock" not in payload


def test_pickle_size_of_a_large_model():
    m = fastlstm.LSTM(256, 512, num_layers=2, bidirectional=True, seed=0)
    w = _weights_nbytes(m)
    n = len(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL))
    assert w <= n <= w * 1.001 + 4096  # the packed copy would double it
    assert m.packed_nbytes >= 0.9 * w


def test_copies_are_independent():
    rng = np.random.default_rng(0)
    m = fastlstm.LSTM(4, 8, seed=0)
    x = rng.standard_normal((6, 3, 4))
    before = _outputs(m, x)
    for dup in (copy.copy(m), copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        dup.set_weights(0, w_hh=np.zeros((32, 8)))
        assert not np.array_equal(_outputs(dup, x)[0], before[0])
        for a, b in zip(_outputs(m, x), before):
            assert np.array_equal(a, b)
        assert not np.array_equal(m.get_weights(0)["w_hh"], 0)


def test_unpickling_mismatched_state_is_refused():
    m = fastlstm.LSTM(4, 8, seed=0)
    state = m.__getstate__()
    state["_params"] = dict(state["_params"])
    state["_params"]["weight_hh_l0"] = np.zeros((32, 7), np.float32)
    m2 = fastlstm.LSTM.__new__(fastlstm.LSTM)
    with pytest.raises(WeightsError, match="pickle"):
        m2.__setstate__(state)
    state = m.__getstate__()
    del state["_params"]["bias_ih_l0"]
    with pytest.raises(WeightsError):
        fastlstm.LSTM.__new__(fastlstm.LSTM).__setstate__(state)


def test_concurrent_calls_share_one_model():
    """Calls don't mutate the model: threads calling one model at once get
    exactly what serial calls give."""
    rng = np.random.default_rng(1)
    m = fastlstm.LSTM(8, 48, num_layers=2, bidirectional=True, seed=2)
    xs = [rng.standard_normal((int(rng.integers(1, 30)), int(rng.integers(1, 40)), 8))
          .astype(np.float32) for _ in range(12)]
    lens = [rng.integers(0, x.shape[0] + 1, x.shape[1]) for x in xs]
    want = [_outputs(m, x, lengths=ln) for x, ln in zip(xs, lens)]
    errors = []

    def worker(k):
        try:
            for r in range(15):
                i = (k + r) % len(xs)
                got = _outputs(m, xs[i], lengths=lens[i], num_threads=1 + (r % 2))
                if not all(np.array_equal(a, b) for a, b in zip(got, want[i])):
                    errors.append((k, r, i))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_weight_updates_while_other_threads_call():
    """load_state_dict swaps the packed weights under the lock: a call that
    runs meanwhile sees either the old or the new weights, whole."""
    rng = np.random.default_rng(2)
    m = fastlstm.LSTM(8, 96, num_layers=2, seed=0)
    sd_a = m.state_dict()
    sd_b = fastlstm.LSTM(8, 96, num_layers=2, seed=1).state_dict()
    x = rng.standard_normal((40, 8, 8)).astype(np.float32)
    want_a = _outputs(m, x)
    m.load_state_dict(sd_b)
    want_b = _outputs(m, x)
    stop = threading.Event()
    errors, seen = [], set()

    def writer():
        k = 0
        while not stop.is_set():
            m.load_state_dict(sd_a if k % 2 else sd_b)
            m.set_weights(1, b_ih=(sd_a if k % 2 else sd_b)["bias_ih_l1"])
            k += 1

    def reader():
        try:
            for _ in range(60):
                got = _outputs(m, x, num_threads=1)
                if all(np.array_equal(a, b) for a, b in zip(got, want_a)):
                    seen.add("a")
                elif all(np.array_equal(a, b) for a, b in zip(got, want_b)):
                    seen.add("b")
                else:
                    errors.append("mixed weights")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    w = threading.Thread(target=writer)
    readers = [threading.Thread(target=reader) for _ in range(2)]
    w.start()
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    stop.set()
    w.join()
    assert not errors
    assert seen  # at least one consistent result; usually both


@pytest.mark.parametrize("change", [
    {"activations": ("sigmoid", "nope", "tanh")}, {"num_layers": 0}, {"hidden_size": -1},
    {"proj_size": 99}, {"dtype": "float16"}, {"clip": -1.0}, {"bias": "yes"},
    {"weights_precision": "int4"}, {"input_weights_precision": "int8"}, {"_params": []},
])
def test_bad_pickled_configuration_refused(change):
    """A pickle's configuration is checked as the constructor checks it: a bad
    one is a WeightsError at load, not a KeyError or an engine error later."""
    state = fastlstm.LSTM(3, 5, seed=1).__getstate__()
    state.update(change)
    with pytest.raises(fastlstm.WeightsError, match="pickle"):
        fastlstm.LSTM.__new__(fastlstm.LSTM).__setstate__(state)


def test_set_num_threads_accepts_numpy_ints_and_clamps():
    prev = fastlstm.get_num_threads()
    try:
        fastlstm.set_num_threads(np.int64(1))
        assert fastlstm.get_num_threads() == 1
        fastlstm.set_num_threads(2 ** 31)  # more than the engine's int: clamped, no OverflowError
        assert fastlstm.get_num_threads() >= 1
    finally:
        fastlstm.set_num_threads(prev)


def _tamper_qforms(form, edit, **astype_kw):
    m = fastlstm.LSTM(5, 18, num_layers=2, seed=3).astype(form, **astype_kw)
    state = m.__getstate__()
    state["_qforms"] = {k: list(v) for k, v in state["_qforms"].items()}
    edit(state["_qforms"])
    state["_qforms"] = {k: tuple(v) for k, v in state["_qforms"].items()}
    return state


def _shrink(q):
    q["weight_hh_l1"][1] = q["weight_hh_l1"][1][:, :-1].copy()


def _flip(q):
    a = q["weight_hh_l0"][1].copy()
    a[3, 4] ^= 1  # one stored weight changed: no longer the pickled float32 weights
    q["weight_hh_l0"][1] = a


def _drop(q):
    del q["weight_ih_l0"]


def _retype(q):
    q["weight_hh_l0"][1] = q["weight_hh_l0"][1].view(np.int16 if q["weight_hh_l0"][0] != "int8"
                                                     else np.uint8)


def _scales(q):
    q["weight_hh_l0"][2] = q["weight_hh_l0"][2][:-1].copy()


def _extra_ih(q):  # float16 stores W_hh only: a W_ih form is one matrix too many
    q["weight_ih_l0"] = ["float16", np.zeros((72, 5), np.uint16)]


@pytest.mark.parametrize("form,edit", [
    (f, e) for f in ("int8", "bfloat16", "float16") for e in (_shrink, _flip, _retype)
] + [("int8", _drop), ("bfloat16", _drop), ("float16", _extra_ih), ("int8", _scales)])
def test_pickled_reduced_weights_checked(form, edit):
    """The reduced-precision weights of a pickle are what the engine packs:
    a wrong shape or type (the packers read 4H x K elements), a missing or
    extra matrix, or values that are not the pickled float32 weights'
    (state_dict() and reference() would then disagree with the engine) are
    WeightsErrors at load."""
    state = _tamper_qforms(form, edit)
    with pytest.raises(WeightsError, match="reduced-precision"):
        fastlstm.LSTM.__new__(fastlstm.LSTM).__setstate__(state)


@pytest.mark.parametrize("form,kw", [("int8", {}), ("int8", {"input_weights": "float32"}),
                                     ("bfloat16", {}), ("bfloat16", {"activation_bits": 32}),
                                     ("bfloat16", {"input_weights": "float32"}), ("float16", {})])
def test_reduced_precision_pickles_round_trip(form, kw):
    m = fastlstm.LSTM(7, 33, num_layers=2, bidirectional=True, proj_size=5, seed=4).astype(form, **kw)
    m2 = pickle.loads(pickle.dumps(m))
    x = np.random.default_rng(0).standard_normal((6, 3, 7)).astype(np.float32)
    for a, b in zip(_outputs(m, x), _outputs(m2, x)):
        assert a.tobytes() == b.tobytes()
    assert m2.quantized_weights().keys() == m.quantized_weights().keys()

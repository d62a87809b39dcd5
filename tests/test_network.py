"""fastlstm.Network: input stages and heads against PyTorch and Keras, and
generation (greedy token for token against a PyTorch loop written here,
seeded sampling, batching)."""
import io
import os

import numpy as np
import pytest

import fastlstm
from fastlstm import WeightsError, _engine
from fastlstm.network import Network
from tolerances import max_rel_err

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # Keras 3
    pytest.mark.filterwarnings("ignore:LSTM with projections:UserWarning"),  # torch oneDNN note
]
nn = torch.nn
TOL = 1e-5  # float32: |got - want| <= 1e-5 * max(1, |want|) (tests/tolerances.py)


# --------------------------------------------------------------- helpers
class TorchLM(nn.Module):
    """Embedding (or one-hot) -> LSTM -> Linear, batch-first."""

    def __init__(self, V=40, E=12, H=24, L=2, out=None, one_hot=False, proj=0, bidir=False,
                 batch_first=True):
        super().__init__()
        self.V, self.one_hot = V, one_hot
        self.emb = None if one_hot else nn.Embedding(V, E)
        self.lstm = nn.LSTM(V if one_hot else E, H, L, batch_first=batch_first, proj_size=proj,
                            bidirectional=bidir)
        self.fc = nn.Linear((2 if bidir else 1) * (proj or H), out or V)

    def embed(self, tok):
        if self.one_hot:
            return nn.functional.one_hot(tok, self.V).float()
        return self.emb(tok)


def scaled(model, seed, scale=1.5, rec=0.3):
    """Random weights: input, embedding and head weights large enough that the
    generated text keeps moving, recurrent weights small enough that the state
    forgets (a contracting system, like a trained model).  With large recurrent
    weights the dynamics are chaotic: float32 rounding differences (any two
    summation orders) grow until some argmax flips, and no two implementations
    agree token for token for long."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = rec if ("weight_hh" in name or "weight_hr" in name) else scale
            p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * s)
    return model.eval()


def torch_greedy(model, prompt, steps):
    """The reference loop: prompt in one call, then argmax -> embed -> one step."""
    x = torch.as_tensor(prompt)
    with torch.no_grad():
        out, hc = model.lstm(model.embed(x))
        logits = model.fc(out[:, -1])
        toks = []
        for _ in range(steps):
            t = torch.argmax(logits, dim=-1)
            toks.append(t)
            out, hc = model.lstm(model.embed(t[:, None]), hc)
            logits = model.fc(out[:, -1])
    return torch.stack(toks, 1).numpy()


def act_torch(z, act):
    return {"none": lambda z: z, "softmax": lambda z: torch.softmax(z, -1),
            "log_softmax": lambda z: torch.log_softmax(z, -1),
            "sigmoid": torch.sigmoid}[act](z)


# ------------------------------------------------- forward against torch
@pytest.mark.parametrize("act", ["none", "softmax", "log_softmax", "sigmoid"])
@pytest.mark.parametrize("stage", ["embedding", "one_hot"])
def test_sequence_heads_match_torch(act, stage):
    m = scaled(TorchLM(V=30, E=10, H=20, L=2, out=17, one_hot=stage == "one_hot"), 1, 0.5)
    net = Network.from_torch(m, activation=act, one_hot=30 if stage == "one_hot" else None)
    assert net.input_kind == stage and net.activation == act and net.output_size == 17
    tok = np.random.default_rng(0).integers(0, 30, (4, 9))
    with torch.no_grad():
        t = torch.as_tensor(tok)
        want = act_torch(m.fc(m.lstm(m.embed(t))[0]), act).numpy()
    got = net(tok)
    assert got.dtype == np.float32 and got.shape == (4, 9, 17)
    assert max_rel_err(got, want) <= TOL
    assert max_rel_err(net(tok[1]), want[1]) <= TOL  # unbatched


@pytest.mark.parametrize("bidir", [False, True])
def test_classification_last_valid_step(bidir):
    m = scaled(TorchLM(V=25, E=8, H=16, L=2, out=5, bidir=bidir), 2, 0.5)
    net = Network.from_torch(m, mode="last", activation="log_softmax")
    rng = np.random.default_rng(1)
    tok = rng.integers(0, 25, (5, 11))
    lengths = np.array([11, 3, 7, 1, 9])
    tok_padded = tok.copy()
    tok_padded[np.arange(11)[None] >= lengths[:, None]] = -1  # padding is never looked up
    got = net(tok_padded, lengths=lengths)
    with torch.no_grad():
        packed = nn.utils.rnn.pack_padded_sequence(m.emb(torch.as_tensor(tok)), lengths,
                                                   batch_first=True, enforce_sorted=False)
        _, (hn, _) = m.lstm(packed)
        feat = torch.cat([hn[-2], hn[-1]], -1) if bidir else hn[-1]
        want = torch.log_softmax(m.fc(feat), -1).numpy()
    assert got.shape == (5, 5)
    assert max_rel_err(got, want) <= TOL
    if not bidir:  # "last" without lengths is the output after the last step
        with torch.no_grad():
            out = m.fc(m.lstm(m.emb(torch.as_tensor(tok)))[0][:, -1]).numpy()
        assert max_rel_err(Network.from_torch(m, mode="last")(tok), out) <= TOL


def test_sequence_lengths_zero_padding_and_state():
    m = scaled(TorchLM(V=20, E=6, H=12, L=1), 3, 0.5)
    net = Network.from_torch(m)
    rng = np.random.default_rng(2)
    tok = rng.integers(0, 20, (3, 8))
    lengths = [8, 2, 5]
    out, (h, c) = net(tok, lengths=lengths, return_state=True)
    for n, L in enumerate(lengths):
        with torch.no_grad():
            o, (hn, cn) = m.lstm(m.emb(torch.as_tensor(tok[n:n + 1, :L])))
            want = m.fc(o).numpy()[0]
        assert max_rel_err(out[n, :L], want) <= TOL
        assert np.all(out[n, L:] == 0)
        assert max_rel_err(h[:, n], hn[:, 0].numpy()) <= TOL
    # state in, state out: two halves equal one call
    a, st = net(tok[:, :4], return_state=True)
    b = net(tok[:, 4:], state=st)
    assert max_rel_err(np.concatenate([a, b], 1), net(tok)) <= TOL


def test_features_input_time_major_and_no_head():
    lstm = nn.LSTM(5, 7, 1)
    fc = nn.Linear(7, 3)
    net = Network(fastlstm.LSTM.from_torch(lstm), head=fc.weight, head_bias=fc.bias,
                  activation="sigmoid", batch_first=False)
    x = np.random.default_rng(3).standard_normal((6, 2, 5)).astype(np.float32)
    with torch.no_grad():
        want = torch.sigmoid(fc(lstm(torch.as_tensor(x))[0])).numpy()
    assert max_rel_err(net(x), want) <= TOL
    bare = Network(fastlstm.LSTM.from_torch(lstm), batch_first=False)
    with torch.no_grad():
        assert max_rel_err(bare(x), lstm(torch.as_tensor(x))[0].numpy()) <= TOL


def test_from_state_dict_and_file(tmp_path):
    m = scaled(TorchLM(V=15, E=4, H=8, L=2, proj=3), 4, 0.5)
    tok = np.random.default_rng(4).integers(0, 15, (2, 5))
    with torch.no_grad():
        want = torch.softmax(m.fc(m.lstm(m.emb(torch.as_tensor(tok)))[0]), -1).numpy()
    net = Network.from_state_dict(m.state_dict(), embedding="emb", head="fc",
                                  activation="softmax")
    assert max_rel_err(net(tok), want) <= TOL
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model_state_dict": m.state_dict()}, path)
    net2 = Network.from_state_dict(str(path), lstm="lstm", embedding="emb", head="fc",
                                   activation="softmax")
    assert max_rel_err(net2(tok), want) <= TOL
    with pytest.raises(fastlstm.WeightsError, match="missing key"):
        Network.from_state_dict(m.state_dict(), embedding="embedding", head="fc")


def test_from_torch_finds_modules_and_activation():
    class Clf(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(9, 4, padding_idx=0)
            self.drop = nn.Dropout(0.3)
            self.rnn = nn.LSTM(4, 6, batch_first=True)
            self.out = nn.Linear(6, 2)
            self.act = nn.LogSoftmax(dim=-1)

    net = Network.from_torch(Clf().eval(), mode="classification")
    assert net.activation == "log_softmax" and net.mode == "last" and net.vocab_size == 9

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 2)
            self.b = nn.Linear(6, 2)
            self.rnn = nn.LSTM(4, 6)

    with pytest.raises(fastlstm.WeightsError, match="head="):
        Network.from_torch(Two())
    assert Network.from_torch(Two(), head="b").output_size == 2
    assert Network.from_torch(Two(), head=False).output_size == 6
    emb = nn.Embedding(5, 4, max_norm=1.0)
    with pytest.raises(fastlstm.WeightsError, match="max_norm"):
        Network.from_torch(nn.ModuleDict({"e": emb, "l": nn.LSTM(4, 3)}))


def test_chain_of_lstms():
    l1, l2 = nn.LSTM(4, 6, batch_first=True), nn.LSTM(6, 3, batch_first=True)
    fc = nn.Linear(3, 4)
    emb = nn.Embedding(4, 4)
    mod = nn.ModuleDict({"emb": emb, "l1": l1, "l2": l2, "fc": fc})
    net = Network.from_torch(mod, lstm=["l1", "l2"], mode="prediction")
    tok = np.random.default_rng(5).integers(0, 4, (3, 6))
    with torch.no_grad():
        want = fc(l2(l1(emb(torch.as_tensor(tok)))[0])[0]).numpy()
    assert max_rel_err(net(tok), want) <= TOL
    # generation through a chain, against the same loop by hand
    with torch.no_grad():
        x = torch.as_tensor(tok)
        o1, s1 = l1(emb(x))
        o2, s2 = l2(o1)
        lg = fc(o2[:, -1])
        ref = []
        for _ in range(40):
            t = lg.argmax(-1)
            ref.append(t)
            o1, s1 = l1(emb(t[:, None]), s1)
            o2, s2 = l2(o1, s2)
            lg = fc(o2[:, -1])
    np.testing.assert_array_equal(net.generate(tok, 40, temperature=0),
                                  torch.stack(ref, 1).numpy())


# ---------------------------------------------------- greedy generation
@pytest.mark.parametrize("cfg, seed, scale", [
    (dict(V=48, E=16, H=64, L=2), 11, 1.5),
    (dict(V=33, E=8, H=40, L=2, one_hot=True), 13, 2.0),
    (dict(V=70, E=20, H=48, L=3, proj=24), 11, 1.5),
])
def test_greedy_matches_torch_token_for_token(cfg, seed, scale, isa):
    m = scaled(TorchLM(**cfg), seed, scale)
    net = Network.from_torch(m, one_hot=cfg["V"] if cfg.get("one_hot") else None,
                             mode="prediction")
    prompt = np.random.default_rng(6).integers(0, cfg["V"], (3, 5))
    steps = 250
    want = torch_greedy(m, prompt, steps)
    got = net.generate(prompt, steps, temperature=0)
    assert got.dtype == np.int64 and got.shape == (3, steps)
    assert len(np.unique(want)) > 5  # the test is not vacuous: the text moves
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(net.generate(prompt[0], steps, temperature=0), want[0])


def test_greedy_with_lengths_equals_each_prompt():
    m = scaled(TorchLM(V=40, E=8, H=32, L=2), 12)
    net = Network.from_torch(m)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 40, n) for n in (3, 9, 1, 6)]
    got = net.generate(prompts, 200, temperature=0)  # ragged list: padded + lengths
    for n, p in enumerate(prompts):
        np.testing.assert_array_equal(got[n], torch_greedy(m, p[None], 200)[0])
    padded = np.zeros((4, 9), np.int64)
    for n, p in enumerate(prompts):
        padded[n, :len(p)] = p
    np.testing.assert_array_equal(
        net.generate(padded, 200, temperature=0, lengths=[len(p) for p in prompts]), got)


def test_continuation_with_state():
    m = scaled(TorchLM(V=30, E=8, H=32, L=2), 13)
    net = Network.from_torch(m)
    prompt = np.random.default_rng(8).integers(0, 30, (2, 4))
    full = net.generate(prompt, 60, temperature=0)
    a, st = net.generate(prompt, 25, temperature=0, return_state=True)
    b = net.generate(a[:, -1:], 35, temperature=0, state=st)
    np.testing.assert_array_equal(np.concatenate([a, b], 1), full)
    # the same for sampling: the draws are indexed per call, so reseed per part
    s1 = net.generate(prompt, 5, temperature=1.0, seed=[1, 2], return_state=True)
    assert s1[0].shape == (2, 5)


# ------------------------------------------------------------ sampling
def test_philox_known_answers():
    # Random123 known-answer vectors for philox4x32-10
    assert _engine.philox4x32_10((0, 0, 0, 0), (0, 0)) == (
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _engine.philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert _engine.philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
                                 (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)
    u = [_engine.gen_uniform(7, s, k) for s in range(20) for k in range(50)]
    assert 0.0 <= min(u) and max(u) < 1.0 and abs(np.mean(u) - 0.5) < 0.03


@pytest.fixture(scope="module")
def lm():
    return Network.from_torch(scaled(TorchLM(V=50, E=16, H=48, L=2), 14, 0.8))


def test_seeded_sampling_reproducible(lm):
    prompt = np.random.default_rng(9).integers(0, 50, (4, 6))
    a = lm.generate(prompt, 120, temperature=0.9, seed=1234)
    b = lm.generate(prompt, 120, temperature=0.9, seed=1234)
    c = lm.generate(prompt, 120, temperature=0.9, seed=1235)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a, lm.generate(prompt, 120, temperature=0.9, seed=1234,
                                                 num_threads=1))
    np.testing.assert_array_equal(a, lm.generate(prompt, 120, temperature=0.9, seed=1234,
                                                 num_threads=2))
    # top_k=1 is greedy
    np.testing.assert_array_equal(lm.generate(prompt, 50, top_k=1, seed=5),
                                  lm.generate(prompt, 50, temperature=0))


def test_batched_generation_equals_per_prompt(lm):
    rng = np.random.default_rng(10)
    prompt = rng.integers(0, 50, (16, 7))
    seeds = list(range(100, 116))
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=seeds),
               dict(temperature=0.7, top_k=8, seed=seeds)):
        batch = lm.generate(prompt, 80, **kw)
        for n in range(16):
            one = dict(kw)
            if "seed" in one:
                one["seed"] = [seeds[n]]
            np.testing.assert_array_equal(lm.generate(prompt[n:n + 1], 80, **one)[0], batch[n])
    # an int seed: row n draws from stream (seed, n); row 0 equals a 1-row run
    batch = lm.generate(prompt, 30, temperature=1.0, seed=77)
    np.testing.assert_array_equal(batch[0], lm.generate(prompt[0], 30, temperature=1.0, seed=77))
    # ragged prompts with seeds
    prompts = [prompt[n, :k] for n, k in zip(range(5), (7, 2, 5, 1, 6))]
    batch = lm.generate(prompts, 40, temperature=1.0, seed=seeds[:5])
    for n, p in enumerate(prompts):
        np.testing.assert_array_equal(lm.generate(p, 40, temperature=1.0, seed=[seeds[n]]),
                                      batch[n])


def test_top_k_and_temperature_follow_the_logits(lm):
    """Every sampled token is among the top_k logits the network gives for the
    sequence so far (the NumPy forward path, independent of the C loop)."""
    lm_soft = Network(lm.lstm, embedding=lm.embedding, head=lm.head_weight,
                      head_bias=lm.head_bias, activation="log_softmax")
    prompt = np.random.default_rng(11).integers(0, 50, (3, 4))
    k = 4
    toks = lm.generate(prompt, 60, temperature=1.5, top_k=k, seed=3)
    logp = lm_soft(np.concatenate([prompt, toks], 1))[:, 3:-1]  # predicts toks
    rank = (logp > np.take_along_axis(logp, toks[..., None], -1)).sum(-1)
    assert rank.max() < k
    assert len(np.unique(toks)) > k  # not greedy
    # the empirical distribution of one step over many streams is softmax(l / T)
    T, n = 0.8, 4000
    one = np.repeat(prompt[:1], n, 0)
    first = lm.generate(one, 1, temperature=T, seed=list(range(n)))[:, 0]
    z = lm_soft(prompt[:1])[0, -1] / T
    p = np.exp(z - z.max())
    p /= p.sum()
    freq = np.bincount(first, minlength=50) / n
    assert np.abs(freq - p).max() < 0.03


# ---------------------------------------------------------- streaming
def test_stream_steps_equal_the_sequence_output(lm):
    tok = np.random.default_rng(12).integers(0, 50, (2, 10))
    want = lm(tok)
    s = lm.stream(batch=2)
    got = np.stack([s.step(tok[:, t]) for t in range(10)], 1)
    assert max_rel_err(got, want) <= TOL
    s.reset()
    assert max_rel_err(s.step(tok[:, 0]), want[:, 0]) <= TOL


# --------------------------------------------------------------- errors
def test_errors(lm):
    with pytest.raises(ValueError, match="token ids must be in"):
        lm.generate([[0, 50]], 3)
    with pytest.raises(ValueError, match="temperature"):
        lm.generate([[0, 1]], 3, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        lm.generate([[0, 1]], 3, top_k=0)
    with pytest.raises(ValueError, match="seed"):
        lm.generate([[0, 1], [2, 3]], 3, seed=[1])
    with pytest.raises(fastlstm.DTypeError):
        lm(np.zeros((2, 3), np.float32))
    bi = Network.from_torch(TorchLM(V=10, E=4, H=4, L=1, bidir=True))
    with pytest.raises(ValueError, match="bidirectional"):
        bi.generate([[1, 2]], 3)
    with pytest.raises(ValueError, match="prediction"):
        Network(fastlstm.LSTM(3, 4), mode="prediction")
    with pytest.raises(fastlstm.WeightsError, match="embedding"):
        Network(fastlstm.LSTM(3, 4), embedding=np.zeros((5, 4)))
    assert lm.generate([[1, 2]], 0).shape == (1, 0)


def test_float64_generation():
    m = scaled(TorchLM(V=20, E=6, H=16, L=2), 15).double()
    net = Network.from_torch(m, dtype=np.float64)
    assert net.dtype == np.float64
    prompt = np.random.default_rng(13).integers(0, 20, (2, 3))
    np.testing.assert_array_equal(net.generate(prompt, 200, temperature=0),
                                  torch_greedy(m, prompt, 200))


# ---------------------------------------------------------------- Keras
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


def _keras_cases(keras):
    L = keras.layers
    return {
        "lm_softmax": (lambda: [L.Embedding(30, 8), L.LSTM(16, return_sequences=True),
                                L.Dense(30, activation="softmax")], "sequence"),
        "clf_sigmoid": (lambda: [L.Embedding(20, 6), L.LSTM(10), L.Dropout(0.2),
                                 L.Dense(1, activation="sigmoid")], "last"),
        "stacked_td_act": (lambda: [L.Embedding(25, 6), L.LSTM(12, return_sequences=True),
                                    L.LSTM(12, return_sequences=True),
                                    L.TimeDistributed(L.Dense(9)), L.Activation("log_softmax")],
                           "sequence"),
        "chain_widths_bi": (lambda: [L.Embedding(25, 6),
                                     L.Bidirectional(L.LSTM(7, return_sequences=True)),
                                     L.LSTM(5), L.Dense(3), L.Softmax()], "last"),
    }


@pytest.mark.parametrize("case", ["lm_softmax", "clf_sigmoid", "stacked_td_act",
                                  "chain_widths_bi"])
def test_keras_sequential(keras, case, tmp_path):
    layers, mode = _keras_cases(keras)[case]
    model = keras.Sequential([keras.Input((None,), dtype="int32")] + layers())
    _randomize(model, 20)
    tok = np.random.default_rng(14).integers(0, 20, (3, 7)).astype(np.int32)
    want = np.asarray(model.predict(tok, verbose=0))
    paths = [tmp_path / "m.keras", tmp_path / "m.h5"]
    for p in paths:
        model.save(p)
    for src in paths + [model, io.BytesIO(paths[0].read_bytes())]:
        net = Network.from_keras(src if not isinstance(src, os.PathLike) else str(src))
        assert net.mode == mode
        got = net(tok)
        assert max_rel_err(got, want) <= TOL, (case, src)


def test_keras_mask_zero_and_generation(keras, tmp_path):
    L = keras.layers
    model = keras.Sequential([keras.Input((None,), dtype="int32"),
                              L.Embedding(30, 8, mask_zero=True),
                              L.LSTM(16, return_sequences=True), L.Dense(30)])
    _randomize(model, 21, 1.2)
    w, b = model.layers[-1].get_weights()
    b[0] = -100.0  # token 0 is padding: never generate it (Keras would mask it when fed back)
    model.layers[-1].set_weights([w, b])
    tok = np.random.default_rng(15).integers(1, 30, (3, 8)).astype(np.int32)
    tok[1, 5:] = 0
    tok[2, 2:] = 0
    want = np.asarray(model.predict(tok, verbose=0))
    model.save(tmp_path / "m.keras")
    net = Network.from_keras(str(tmp_path / "m.keras"), mode="prediction")
    assert net.mask_zero
    assert max_rel_err(net(tok), want) <= TOL
    # greedy generation against Keras' own step-by-step predictions
    prompt = tok[:1, :4]
    seq = prompt.copy()
    for _ in range(12):
        nxt = np.argmax(np.asarray(model.predict(seq, verbose=0))[:, -1], -1)
        seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], 1)
    got = net.generate(prompt, 12, temperature=0)
    np.testing.assert_array_equal(got, seq[:, 4:])
    # generation continues from a prompt's end: a 0 inside it is refused
    with pytest.raises(ValueError, match="prompt: token 0 .* inside a prompt"):
        net.generate(np.array([[3, 0, 5]]), 2)


@pytest.mark.parametrize("stack", ["bi", "uni_bi"])
def test_keras_mask_zero_bidirectional(keras, tmp_path, stack):
    """Keras' Bidirectional outputs zeros for both halves at masked steps
    (zero_output_for_mask), where a lone LSTM repeats its last output: the
    head then sees zeros past each sequence's end."""
    L = keras.layers
    lstms = ([L.Bidirectional(L.LSTM(6, return_sequences=True))] if stack == "bi" else
             [L.LSTM(5, return_sequences=True), L.Bidirectional(L.LSTM(6, return_sequences=True))])
    model = keras.Sequential([keras.Input((None,), dtype="int32"),
                              L.Embedding(30, 8, mask_zero=True)] + lstms + [L.Dense(4)])
    _randomize(model, 22)
    tok = np.random.default_rng(16).integers(1, 30, (3, 8)).astype(np.int32)
    tok[1, 5:] = 0
    tok[2, 2:] = 0
    want = np.asarray(model.predict(tok, verbose=0))
    model.save(tmp_path / "m.keras")
    net = Network.from_keras(str(tmp_path / "m.keras"))
    assert max_rel_err(net(tok), want) <= TOL


@pytest.mark.parametrize("stack", ["uni", "uni_uni", "uni_bi", "last"])
def test_keras_mask_zero_with_holes(keras, tmp_path, stack):
    """A 0 token inside a row is a masked step for Keras (the state carries
    over it, a lone LSTM repeats its last output there, a Bidirectional one
    outputs zeros): the network passes tok != 0 as the LSTMs' mask."""
    L = keras.layers
    lstms = {"uni": [L.LSTM(6, return_sequences=True)],
             "uni_uni": [L.LSTM(5, return_sequences=True), L.LSTM(6, return_sequences=True)],
             "uni_bi": [L.LSTM(5, return_sequences=True),
                        L.Bidirectional(L.LSTM(6, return_sequences=True))],
             "last": [L.LSTM(5, return_sequences=True), L.LSTM(6)]}[stack]
    model = keras.Sequential([keras.Input((None,), dtype="int32"),
                              L.Embedding(30, 8, mask_zero=True)] + lstms + [L.Dense(4)])
    _randomize(model, 23)
    tok = np.random.default_rng(17).integers(1, 30, (4, 9)).astype(np.int32)
    tok[0, [0, 3, 4]] = 0  # a leading hole and holes inside
    tok[1, 5:] = 0         # trailing padding only
    tok[2, [2, 7, 8]] = 0  # holes and padding
    want = np.asarray(model.predict(tok, verbose=0))
    model.save(tmp_path / "m.keras")
    net = Network.from_keras(str(tmp_path / "m.keras"))
    assert net.mask_zero and net.mode == ("last" if stack == "last" else "sequence")
    assert max_rel_err(net(tok), want) <= TOL
    if stack in ("uni", "uni_uni"):  # a stream masks the 0 tokens per step and row too
        s = net.stream(4)
        got = np.stack([s.step(tok[:, t]) for t in range(9)], axis=1)
        assert max_rel_err(got, want) <= TOL


@pytest.mark.parametrize("stack", ["uni", "uni_bi", "last"])
def test_keras_masking_layer(keras, tmp_path, stack):
    """Sequential([Masking(v), LSTM..., Dense]) on features: the network masks
    the steps whose features all equal v itself, as Keras (holes, trailing
    padding, a row masked throughout), with no warning; it pickles with its
    mask_value, and a unidirectional network's stream, fed the same steps,
    gives the sequence's outputs."""
    import pickle
    import warnings
    L = keras.layers
    lstms = {"uni": [L.LSTM(6, return_sequences=True)],
             "uni_bi": [L.LSTM(5, return_sequences=True),
                        L.Bidirectional(L.LSTM(6, return_sequences=True))],
             "last": [L.LSTM(5, return_sequences=True), L.LSTM(6)]}[stack]
    model = keras.Sequential([keras.Input((None, 3)), L.Masking(-1.5)] + lstms + [L.Dense(4)])
    _randomize(model, 24)
    rng = np.random.default_rng(18)
    x = rng.standard_normal((4, 9, 3)).astype(np.float32)
    x[0, [0, 3, 4]] = -1.5  # a leading hole and holes inside
    x[1, 5:] = -1.5         # trailing padding
    x[2] = -1.5             # nothing valid
    x[3, 2, 0] = -1.5       # one feature only: not masked
    want = np.asarray(model.predict(x, verbose=0))
    model.save(tmp_path / "m.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stack's "masks" warning does not apply here
        net = Network.from_keras(str(tmp_path / "m.keras"))
    assert net.mask_value == -1.5 and not net.mask_zero
    assert max_rel_err(net(x), want) <= TOL
    np.testing.assert_array_equal(net(x, mask=np.any(x != -1.5, axis=-1)), net(x))
    again = pickle.loads(pickle.dumps(net))
    assert again.mask_value == -1.5
    np.testing.assert_array_equal(again(x), net(x))
    if stack == "uni":
        s = net.stream(4)
        got = np.stack([s.step(x[:, t]) for t in range(9)], axis=1)
        assert max_rel_err(got, want) <= TOL


@pytest.mark.parametrize("batch_first", [True, False])
def test_explicit_mask(batch_first):
    """net(x, mask=m): the LSTMs run with that mask, then the head; masked
    steps are zeros after the head (as past a length), unbatched too."""
    rng = np.random.default_rng(9)
    lstm = fastlstm.LSTM(4, 6, num_layers=2, seed=9, batch_first=batch_first)
    w, b = rng.standard_normal((3, 6)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    net = Network(lstm, head=w, head_bias=b, activation="sigmoid", batch_first=batch_first)
    x = rng.standard_normal((2, 7, 4)).astype(np.float32)
    mask = rng.random((2, 7)) < 0.6
    mask[0, 0] = False
    xl, ml = (x, mask) if batch_first else (x.transpose(1, 0, 2), mask.T)
    out = net(xl, mask=ml)
    y, _ = lstm(xl, mask=ml)
    want = 1 / (1 + np.exp(-(y @ w.T + b)))
    want[~ml] = 0
    np.testing.assert_allclose(out, want, rtol=0, atol=TOL)
    u = net(xl[:, 1] if not batch_first else xl[1], mask=mask[1])
    assert u.shape == (7, 3) and not u[~mask[1]].any()
    with pytest.raises(ValueError, match="lengths, mask: give one"):
        net(xl, [7, 7], mask=ml)
    with pytest.raises(fastlstm.ShapeError, match="mask: expected"):
        net(xl, mask=ml.T)


def test_mask_value_errors():
    lstm = fastlstm.LSTM(4, 6, seed=1)
    with pytest.raises(ValueError, match="mask_value: masks feature input"):
        Network(lstm, embedding=np.ones((10, 4), np.float32), mask_value=0.0)
    with pytest.raises(fastlstm.DTypeError, match="mask_value: expected a real number"):
        Network(lstm, mask_value="zero")
    with pytest.raises(fastlstm.DTypeError, match="mask_value: expected a real number"):
        Network(lstm, mask_value=[0.0, 1.0])


def test_no_head_padding_is_zero_after_the_activation():
    """Without a head the activation still applies; past each sequence's end
    the output is zeros (as documented), not activation(0)."""
    lstm = fastlstm.LSTM(5, 7, seed=3)
    x = np.random.default_rng(3).standard_normal((2, 6, 5)).astype(np.float32)
    for act in ("sigmoid", "softmax"):
        net = Network(lstm, activation=act)
        out = net(x, lengths=[6, 2])
        assert not out[1, 2:].any() and (out[1, :2] > 0).all() and (out[0] > 0).all()


def test_pickle_checks_the_arrays():
    """A pickle whose head or embedding does not fit its LSTMs is refused (they
    would make generate() read out of bounds), not loaded."""
    import pickle
    lstm = fastlstm.LSTM(4, 6, seed=1)
    net = Network(lstm, embedding=np.ones((10, 4), np.float32), head=np.ones((10, 6), np.float32),
                  head_bias=np.zeros(10, np.float32))
    state = net.__getstate__()
    for key, bad in (("embedding", np.ones((10, 2), np.float32)),
                     ("head_bias", np.zeros(3, np.float32)),
                     ("head_weight", np.ones((10, 3), np.float32)), ("lstms", [])):
        broken = dict(state, **{key: bad})
        with pytest.raises(WeightsError, match="pickle"):
            Network.__new__(Network).__setstate__(broken)
    again = pickle.loads(pickle.dumps(net))
    np.testing.assert_array_equal(again(np.array([[1, 2, 3]])), net(np.array([[1, 2, 3]])))


def test_keras_unsupported_layers(keras, tmp_path):
    L = keras.layers
    model = keras.Sequential([keras.Input((None,), dtype="int32"), L.Embedding(10, 4),
                              L.LSTM(5, return_sequences=True), L.Dense(6, activation="relu"),
                              L.Dense(3)])
    model.save(tmp_path / "two_dense.keras")
    with pytest.raises(fastlstm.FormatError, match="activation 'relu'"):
        Network.from_keras(str(tmp_path / "two_dense.keras"))
    model = keras.Sequential([keras.Input((None,), dtype="int32"), L.Embedding(10, 4),
                              L.LSTM(5, return_sequences=True), L.Dense(6), L.Dense(3)])
    model.save(tmp_path / "two_dense2.keras")
    with pytest.raises(fastlstm.FormatError, match="one dense head"):
        Network.from_keras(str(tmp_path / "two_dense2.keras"))
    with pytest.raises(fastlstm.FormatError):
        Network.from_keras(io.BytesIO(b"not a keras file at all"))


def test_head_kernel_rows_independent_and_exact(isa):
    rng = np.random.default_rng(16)
    for dt, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        w = rng.standard_normal((37, 19)).astype(dt)
        b = rng.standard_normal(37).astype(dt)
        head = _engine.Head(0 if dt == np.float32 else 1, w, b)
        x = rng.standard_normal((11, 19)).astype(dt)
        full = np.empty((11, 37), dt)
        head.apply(x, full, 1)
        assert max_rel_err(full, x.astype(np.float64) @ w.T.astype(np.float64) + b) <= tol
        for n in range(11):  # the same bits whatever the rows around it
            one = np.empty((1, 37), dt)
            head.apply(x[n:n + 1], one, 1)
            np.testing.assert_array_equal(one[0], full[n])


def test_pickle_round_trip(lm):
    import pickle
    again = pickle.loads(pickle.dumps(lm))
    prompt = [[1, 2, 3]]
    np.testing.assert_array_equal(again.generate(prompt, 30, temperature=0.8, seed=4),
                                  lm.generate(prompt, 30, temperature=0.8, seed=4))
    assert not lm.head_weight.flags.writeable


def test_large_vocabulary_head_threads():
    """A head big enough to run on the worker pool gives the same tokens on 1
    and 2 threads (each logit is one thread's sequential sum)."""
    m = scaled(TorchLM(V=3000, E=8, H=64, L=1), 17, 1.0)
    net = Network.from_torch(m)
    prompt = np.random.default_rng(18).integers(0, 3000, (4, 3))
    kw = dict(temperature=1.0, top_k=50, seed=[1, 2, 3, 4])
    a = net.generate(prompt, 25, num_threads=1, **kw)
    np.testing.assert_array_equal(a, net.generate(prompt, 25, num_threads=2, **kw))
    np.testing.assert_array_equal(net.generate(prompt, 25, temperature=0, num_threads=2),
                                  torch_greedy(m, prompt, 25))


def test_keras_huge_declared_embedding_refused_before_reading(keras, tmp_path):
    """A small weights file declaring a huge Embedding table (no data written):
    refused from the dataset's header, nothing allocated."""
    import h5py
    L = keras.layers
    model = keras.Sequential([keras.Input((None,), dtype="int32"), L.Embedding(30, 8),
                              L.LSTM(6, return_sequences=True), L.Dense(4)])
    model.save(tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        found = []
        f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset)
                     and o.shape == (30, 8) else None)
        assert found, "no embedding table in the file"
        del f[found[0]]
        f.create_dataset(found[0], shape=(400000, 20000), dtype="f4")  # 32 GB, unwritten
    with pytest.raises(fastlstm.FormatError, match="refused before reading"):
        Network.from_keras(str(tmp_path / "m.h5"))

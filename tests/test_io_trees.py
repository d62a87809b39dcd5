"""fastlstm.io.trees: TF1, Flax and Haiku parameter trees, Equinox cells.

Each framework's cell is written out below in NumPy straight from its own
equations and in its own layout (TF1's [x, h]·kernel with blocks i, j, f, o
and a run-time forget bias; Flax's eight denses; Haiku's blocks i, g, f, o
with f = σ(f + 1); Equinox's weight_ih @ x + weight_hh @ h + bias, blocks i,
f, g, o), so the tests do not re-run the conversion they check.  Where Flax /
Haiku / Equinox are installed they are run too.
"""
import numpy as np
import pytest

import fastlstm
from fastlstm.io import trees
from tolerances import TOL as _TOL

T, N = 7, 3


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------- the frameworks' cells
def tf1_step(x, state, p, forget_bias=1.0, cell_clip=None, act=np.tanh):
    """tf.compat.v1.nn.rnn_cell.LSTMCell.call; state = (c, h)."""
    c, h = state
    z = np.concatenate([x, h], axis=1) @ p["kernel"] + p["bias"]
    i, j, f, o = np.split(z, 4, axis=1)
    if "w_i_diag" in p:
        c_new = (sig(f + forget_bias + p["w_f_diag"] * c) * c
                 + sig(i + p["w_i_diag"] * c) * act(j))
    else:
        c_new = sig(f + forget_bias) * c + sig(i) * act(j)
    if cell_clip:
        c_new = np.clip(c_new, -cell_clip, cell_clip)
    if "w_i_diag" in p:
        m = sig(o + p["w_o_diag"] * c_new) * act(c_new)
    else:
        m = sig(o) * act(c_new)
    if "proj" in p:
        m = m @ p["proj"]
    return c_new, m


def flax_step(x, carry, p, gate=sig, act=np.tanh):
    """flax.linen.LSTMCell.__call__; carry = (c, h)."""
    c, h = carry
    d = lambda name, v: v @ p[name]["kernel"] + p[name].get("bias", 0.0)  # noqa: E731
    i = gate(d("ii", x) + d("hi", h))
    f = gate(d("if", x) + d("hf", h))
    g = act(d("ig", x) + d("hg", h))
    o = gate(d("io", x) + d("ho", h))
    c_new = f * c + i * g
    return c_new, o * act(c_new)


def flax_nnx_opt_step(x, carry, p):
    """flax.nnx.OptimizedLSTMCell.__call__; carry = (c, h)."""
    c, h = carry
    y = x @ p["dense_i"]["kernel"] + h @ p["dense_h"]["kernel"] + p["dense_h"]["bias"]
    i, f, g, o = np.split(y, 4, axis=-1)
    c_new = sig(f) * c + sig(i) * np.tanh(g)
    return c_new, sig(o) * np.tanh(c_new)


def haiku_step(x, state, w, b):
    """hk.LSTM.__call__; state = LSTMState(hidden, cell)."""
    h, c = state
    gated = np.concatenate([x, h], axis=-1) @ w + b
    i, g, f, o = np.split(gated, 4, axis=-1)
    f = sig(f + 1)
    c_new = f * c + sig(i) * np.tanh(g)
    h_new = sig(o) * np.tanh(c_new)
    return h_new, c_new


def eqx_step(x, state, p):
    """equinox.nn.LSTMCell.__call__ (rows of x at once); state = (h, c)."""
    h, c = state
    lin = x @ p["weight_ih"].T + h @ p["weight_hh"].T
    if p.get("bias") is not None:
        lin = lin + p["bias"]
    i, f, g, o = np.split(lin, 4, axis=-1)
    c_new = sig(f) * c + sig(i) * np.tanh(g)
    return sig(o) * np.tanh(c_new), c_new


def unroll(step, x, state, reverse=False, out_index=1):
    """Run `step` over time; returns outputs (T, N, ·) in time order and the
    final state."""
    outs = [None] * x.shape[0]
    order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in order:
        state = step(x[t], state)
        outs[t] = state[out_index]
    return np.stack(outs), state


def rand(rng, *shape, scale=0.5):
    return rng.uniform(-scale, scale, size=shape)


def check(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want)))
    assert err <= tol, err


# the one table's bounds (tolerances.py), by dtype; F64 / F32 for short
TOL = {np.float64: _TOL[np.dtype(np.float64)], np.float32: _TOL[np.dtype(np.float32)]}
F64, F32 = TOL[np.float64], TOL[np.float32]


# ------------------------------------------------------------------------ TF1
def tf1_params(rng, In, U, P=0, peep=False):
    H_out = P or U
    p = {"kernel": rand(rng, In + H_out, 4 * U), "bias": rand(rng, 4 * U)}
    if peep:
        for g in "ifo":
            p[f"w_{g}_diag"] = rand(rng, U)
    if P:
        p["proj"] = rand(rng, U, P)
    return p


def tf1_tree(p):
    cell = {k: v for k, v in p.items() if k != "proj"}
    if "proj" in p:
        cell["projection"] = {"kernel": p["proj"]}
    return cell


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("forget_bias", [1.0, 0.0, 0.7])
def test_tf1_basic_cell(dtype, forget_bias):
    rng = np.random.default_rng(1)
    In, U = 5, 6
    p = tf1_params(rng, In, U)
    tree = {"rnn": {"basic_lstm_cell": tf1_tree(p)}}
    m = trees.from_tf1_cell(tree, forget_bias=forget_bias, dtype=dtype)
    assert (m.input_size, m.hidden_size, m.num_layers) == (In, U, 1)
    x = rng.normal(size=(T, N, In))
    c0, h0 = rand(rng, N, U), rand(rng, N, U)
    want, (c, h) = unroll(lambda xt, s: tf1_step(xt, s, p, forget_bias), x, (c0, h0))
    out, (hn, cn) = m(x, (h0[None], c0[None]))  # fastlstm takes (h, c)
    check(out, want, TOL[dtype])
    check(hn[0], h, TOL[dtype])
    check(cn[0], c, TOL[dtype])


def test_tf1_peepholes_projection_cell_clip():
    rng = np.random.default_rng(2)
    In, U, P = 4, 8, 3
    p = tf1_params(rng, In, U, P=P, peep=True)
    p["kernel"] *= 4  # make the cell clip bite
    flat = {f"rnn/lstm_cell/{k}:0": v for k, v in tf1_tree(p).items() if k != "projection"}
    flat["rnn/lstm_cell/projection/kernel:0"] = p["proj"]
    m = trees.from_tf1_cell(flat, cell_clip=0.5, dtype=np.float64)
    assert (m.proj_size, m.peepholes, m.cell_clip) == (P, True, 0.5)
    x = rng.normal(size=(T, N, In)) * 2
    want, (c, h) = unroll(lambda xt, s: tf1_step(xt, s, p, 1.0, cell_clip=0.5), x,
                          (np.zeros((N, U)), np.zeros((N, P))))
    assert np.max(np.abs(c)) == pytest.approx(0.5)
    out, (hn, cn) = m(x)
    check(out, want, F64)
    check(cn[0], c, F64)
    m32 = trees.from_tf1_cell({k: v.astype(np.float32) for k, v in flat.items()}, cell_clip=0.5)
    assert m32.dtype == np.float32  # the weights' dtype by default
    check(m32(x)[0], want, F32)


def test_tf1_old_names_activation_and_block_cell():
    rng = np.random.default_rng(3)
    In, U = 3, 4
    p = tf1_params(rng, In, U, peep=True)
    old = {"weights": p["kernel"], "biases": p["bias"],
           **{k: v for k, v in p.items() if k.startswith("w_")}}
    x = rng.normal(size=(T, N, In))
    zeros = (np.zeros((N, U)), np.zeros((N, U)))
    m = trees.from_tf1_cell({"lstm_cell": old}, activation="relu", dtype=np.float64)
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    want, _ = unroll(lambda xt, s: tf1_step(xt, s, p, 1.0, act=relu), x, zeros)
    check(m(x)[0], want, F64)
    # LSTMBlockCell: same layout and equations, cell_clip from the op attr.
    mb = trees.from_tf1_block_cell(tf1_tree(p), cell_clip=3.0, forget_bias=0.5,
                                   dtype=np.float64, batch_first=True)
    want, _ = unroll(lambda xt, s: tf1_step(xt, s, p, 0.5, cell_clip=3.0), x, zeros)
    check(mb(x.transpose(1, 0, 2))[0], want.transpose(1, 0, 2), F64)


def test_tf1_stacked_bidirectional_by_prefix():
    rng = np.random.default_rng(4)
    In, U = 3, 5
    cells = {}
    tree = {}
    for k, In_k in enumerate((In, 2 * U)):
        for d in ("fw", "bw"):
            p = tf1_params(rng, In_k, U)
            cells[k, d] = p
            tree.setdefault(f"stack/cell_{k}", {})[d] = {"lstm_cell": tf1_tree(p)}
    prefix = [(f"stack/cell_{k}/fw/lstm_cell", f"stack/cell_{k}/bw/lstm_cell") for k in range(2)]
    with pytest.raises(fastlstm.FormatError, match="prefix"):
        trees.from_tf1_cell(tree)
    m = trees.from_tf1_cell(tree, prefix=prefix, dtype=np.float64)
    assert (m.num_layers, m.bidirectional) == (2, True)
    x = rng.normal(size=(T, N, In))
    layer_in = x
    zeros = (np.zeros((N, U)), np.zeros((N, U)))
    finals = []
    for k in range(2):
        fw, sf = unroll(lambda xt, s: tf1_step(xt, s, cells[k, "fw"]), layer_in, zeros)
        bw, sb = unroll(lambda xt, s: tf1_step(xt, s, cells[k, "bw"]), layer_in, zeros,
                        reverse=True)
        finals += [sf, sb]
        layer_in = np.concatenate([fw, bw], axis=2)
    out, (hn, cn) = m(x)
    check(out, layer_in, F64)
    for j, (c, h) in enumerate(finals):
        check(hn[j], h, F64)
        check(cn[j], c, F64)


# ----------------------------------------------------------------------- Flax
def flax_params(rng, In, H, nnx=False):
    p = {}
    for g in "ifgo":
        p[f"i{g}"] = {"kernel": rand(rng, In, H)}
        p[f"h{g}"] = {"kernel": rand(rng, H, H), "bias": rand(rng, H)}
    if nnx:
        tree = dict(p)
        tree["if_"] = tree.pop("if")
        return p, tree
    return p, p


@pytest.mark.parametrize("nnx", [False, True])
def test_flax_lstm_cell(nnx):
    rng = np.random.default_rng(5)
    In, H = 4, 6
    p, tree = flax_params(rng, In, H, nnx=nnx)
    m = trees.from_flax_lstm_cell({"params": {"cell": tree}}, dtype=np.float64)
    x = rng.normal(size=(T, N, In))
    c0, h0 = rand(rng, N, H), rand(rng, N, H)
    want, (c, h) = unroll(lambda xt, s: flax_step(xt, s, p), x, (c0, h0))
    out, (hn, cn) = m(x, (h0[None], c0[None]))  # Flax's carry is (c, h)
    check(out, want, F64)
    check(hn[0], h, F64)
    check(cn[0], c, F64)


def test_flax_activation_functions():
    rng = np.random.default_rng(6)
    In, H = 3, 4
    p, tree = flax_params(rng, In, H)
    hard = lambda v: np.clip(v / 6 + 0.5, 0, 1)  # noqa: E731 - jax.nn.hard_sigmoid
    m = trees.from_flax_lstm_cell(tree, gate_fn="hard_sigmoid", activation_fn="softsign",
                                  dtype=np.float64)
    x = rng.normal(size=(T, N, In)) * 3
    softsign = lambda v: v / (1 + np.abs(v))  # noqa: E731
    want, _ = unroll(lambda xt, s: flax_step(xt, s, p, gate=hard, act=softsign), x,
                     (np.zeros((N, H)), np.zeros((N, H))))
    check(m(x)[0], want, F64)
    with pytest.raises(ValueError, match="gelu"):
        trees.from_flax_lstm_cell(tree, activation_fn="gelu")


def test_flax_nnx_optimized_cell():
    rng = np.random.default_rng(7)
    In, H = 5, 3
    p = {"dense_i": {"kernel": rand(rng, In, 4 * H)},
         "dense_h": {"kernel": rand(rng, H, 4 * H), "bias": rand(rng, 4 * H)}}
    m = trees.from_flax_optimized_lstm_cell(p, dtype=np.float64)
    x = rng.normal(size=(T, N, In))
    want, (c, h) = unroll(lambda xt, s: flax_nnx_opt_step(xt, s, p), x,
                          (np.zeros((N, H)), np.zeros((N, H))))
    out, (hn, cn) = m(x)
    check(out, want, F64)
    check(cn[0], c, F64)


# ---------------------------------------------------------------------- Haiku
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_haiku_lstm(dtype):
    rng = np.random.default_rng(8)
    In, H = 4, 5
    w, b = rand(rng, In + H, 4 * H), rand(rng, 4 * H)
    params = {"lstm/linear": {"w": w, "b": b}, "linear": {"w": rand(rng, H, 2), "b": rand(rng, 2)}}
    m = trees.from_haiku_lstm(params, dtype=dtype)
    x = rng.normal(size=(T, N, In))
    h0, c0 = rand(rng, N, H), rand(rng, N, H)
    want, (h, c) = unroll(lambda xt, s: haiku_step(xt, s, w, b), x, (h0, c0), out_index=0)
    out, (hn, cn) = m(x, (h0[None], c0[None]))  # Haiku's LSTMState is (hidden, cell)
    check(out, want, TOL[dtype])
    check(hn[0], h, TOL[dtype])
    check(cn[0], c, TOL[dtype])


def test_haiku_deep_rnn_by_prefix():
    rng = np.random.default_rng(9)
    In, H = 3, 4
    w0, b0 = rand(rng, In + H, 4 * H), rand(rng, 4 * H)
    w1, b1 = rand(rng, H + H, 4 * H), rand(rng, 4 * H)
    params = {"deep_rnn/lstm/linear": {"w": w0, "b": b0},
              "deep_rnn/lstm_1/linear": {"w": w1, "b": b1}}
    with pytest.raises(fastlstm.FormatError, match="prefix"):
        trees.from_haiku_lstm(params)
    m = trees.from_haiku_lstm(params, prefix=["deep_rnn/lstm", "deep_rnn/lstm_1"],
                              dtype=np.float64)
    x = rng.normal(size=(T, N, In))
    z = (np.zeros((N, H)), np.zeros((N, H)))
    y0, _ = unroll(lambda xt, s: haiku_step(xt, s, w0, b0), x, z, out_index=0)
    y1, _ = unroll(lambda xt, s: haiku_step(xt, s, w1, b1), y0, z, out_index=0)
    check(m(x)[0], y1, F64)


# ------------------------------------------------------------------ Equinox
def eqx_params(rng, In, H, bias=True):
    return {"weight_ih": rand(rng, 4 * H, In), "weight_hh": rand(rng, 4 * H, H),
            "bias": rand(rng, 4 * H) if bias else None}


@pytest.mark.parametrize("bias", [True, False])
def test_equinox_cells_stacked_and_bidirectional(bias):
    rng = np.random.default_rng(20)
    In, H = 4, 5
    x = rng.normal(size=(T, N, In))
    z = np.zeros((N, H))
    p = eqx_params(rng, In, H, bias)
    h0, c0 = rng.normal(size=(N, H)), rng.normal(size=(N, H))
    m = trees.from_equinox_lstm_cell(p, dtype=np.float64)
    out, (hn, cn) = m(x, (h0[None], c0[None]))
    want, (h, c) = unroll(lambda xt, st: eqx_step(xt, st, p), x, (h0, c0), out_index=0)
    check(out, want, F64)
    check(hn[0], h, F64)
    check(cn[0], c, F64)
    p2 = eqx_params(rng, H, H, bias)
    y1, _ = unroll(lambda xt, st: eqx_step(xt, st, p2), want, (z, z), out_index=0)
    m2 = trees.from_equinox_lstm_cell([p, p2], dtype=np.float64)
    check(m2(x, (np.stack([h0, z]), np.stack([c0, z])))[0], y1, F64)
    pb = eqx_params(rng, In, H, bias)
    yb, _ = unroll(lambda xt, st: eqx_step(xt, st, pb), x, (z, z), reverse=True, out_index=0)
    mb = trees.from_equinox_lstm_cell([(p, pb)], dtype=np.float64, batch_first=True)
    wz, _ = unroll(lambda xt, st: eqx_step(xt, st, p), x, (z, z), out_index=0)
    check(mb(x.transpose(1, 0, 2))[0], np.concatenate([wz, yb], -1).transpose(1, 0, 2), F64)


@pytest.mark.parametrize("bad, exc, words", [
    ({"weight_ih": np.zeros((8, 3))}, fastlstm.FormatError, "expected an equinox.nn.LSTMCell"),
    ({"weight_ih": np.zeros((8, 3)), "weight_hh": np.zeros((8, 3))}, fastlstm.FormatError,
     r"weight_hh has shape \(8, 3\), expected \(4H, H\)"),
    ({"weight_ih": np.zeros((12, 3)), "weight_hh": np.zeros((8, 2))}, fastlstm.FormatError,
     r"weight_ih has shape \(12, 3\), expected \(8, In\)"),
    ({"weight_ih": np.zeros((8, 3)), "weight_hh": np.zeros((8, 2)), "bias": np.zeros(7)},
     fastlstm.FormatError, r"bias has shape \(7,\)"),
    ({"weight_ih": np.zeros((8, 3), np.int32), "weight_hh": np.zeros((8, 2))},
     fastlstm.FormatError, "floating-point"),
    ([], ValueError, "empty list"),
    ([("a", "b", "c")], ValueError, r"cells\[0\]: expected a cell or a \(forward, backward\)"),
    ("not a cell", fastlstm.FormatError, "got str"),
])
def test_equinox_malformed(bad, exc, words):
    with pytest.raises(exc, match=words):
        trees.from_equinox_lstm_cell(bad)


def test_equinox_mixed_layers_refused():
    rng = np.random.default_rng(21)
    p = eqx_params(rng, 3, 2)
    with pytest.raises(ValueError, match="mix of unidirectional and bidirectional"):
        trees.from_equinox_lstm_cell([p, (p, p)])
    with pytest.raises(fastlstm.FormatError, match="size"):
        trees.from_equinox_lstm_cell([p, eqx_params(rng, 3, 2)])  # layer 1 reads 2, not 3


# ----------------------------------------------------------- malformed trees
def test_list_cells_and_flatten():
    rng = np.random.default_rng(10)
    p, _ = flax_params(rng, 2, 3)
    tree = {"params": {"RNN_0": {"cell": p}, "RNN_1": {"cell": p}},
            "tf": {"rnn/lstm_cell/kernel:0": rand(rng, 5, 12), "rnn/lstm_cell/bias:0": rand(rng, 12)}}
    found = trees.list_cells(tree)
    assert found["flax"] == ["params/RNN_0/cell", "params/RNN_1/cell"]
    assert found["tf1"] == ["tf/rnn/lstm_cell"]
    flat = trees.flatten_tree(tree)
    assert "tf/rnn/lstm_cell/kernel" in flat


class _Var:  # an NNX-style variable wrapper
    def __init__(self, value):
        self.value = value


def test_wrapped_leaves_and_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    In, H = 3, 2
    w, b = rand(rng, In + H, 4 * H), rand(rng, 4 * H)
    m1 = trees.from_haiku_lstm({"lstm": {"linear": {"w": _Var(w), "b": torch.tensor(b)}}},
                               dtype=np.float64)
    m2 = trees.from_haiku_lstm({"lstm/linear": {"w": w, "b": b}}, dtype=np.float64)
    x = rng.normal(size=(T, N, In))
    check(m1(x)[0], m2(x)[0], 0)


@pytest.mark.parametrize("bad", [
    "not a tree",
    {"lstm_cell": {"kernel": np.zeros((5, 12))}},                        # no bias
    {"lstm_cell": {"kernel": np.zeros((5, 10)), "bias": np.zeros(10)}},  # 4U?
    {"lstm_cell": {"kernel": np.zeros((5, 12)), "bias": np.zeros(8)}},
    {"lstm_cell": {"kernel": np.zeros((2, 12)), "bias": np.zeros(12)}},  # rows < H
    {"lstm_cell": {"kernel": np.zeros((5, 12), np.int32), "bias": np.zeros(12)}},
    {"lstm_cell": {"kernel": np.zeros((5, 12)), "bias": np.zeros(12),
                   "w_i_diag": np.zeros(3)}},                            # partial peepholes
    {"lstm_cell": {"kernel": np.zeros((5, 12)), "bias": np.zeros(12), "x": object()}},
    {},
])
def test_tf1_malformed(bad):
    with pytest.raises(fastlstm.FormatError):
        trees.from_tf1_cell(bad)


@pytest.mark.parametrize("mutate", ["drop_hg", "shape", "input_bias", "half_bias"])
def test_flax_malformed(mutate):
    rng = np.random.default_rng(12)
    p, _ = flax_params(rng, 3, 4)
    p = {k: dict(v) for k, v in p.items()}
    if mutate == "drop_hg":
        del p["hg"]
    elif mutate == "shape":
        p["hf"]["kernel"] = np.zeros((4, 5))
    elif mutate == "input_bias":
        p["ii"]["bias"] = np.zeros(4)
    else:
        del p["ho"]["bias"]
    with pytest.raises(fastlstm.FormatError):
        trees.from_flax_lstm_cell(p)


def test_haiku_malformed_and_mismatched_layers():
    rng = np.random.default_rng(13)
    with pytest.raises(fastlstm.FormatError):
        trees.from_haiku_lstm({"lstm/linear": {"w": np.zeros((3, 8)), "b": np.zeros(7)}})
    with pytest.raises(fastlstm.FormatError):
        trees.from_haiku_lstm({"dense": np.zeros(3)})
    params = {"a/lstm/linear": {"w": rand(rng, 3 + 4, 16), "b": rand(rng, 16)},
              "b/lstm/linear": {"w": rand(rng, 5 + 5, 20), "b": rand(rng, 20)}}
    with pytest.raises(fastlstm.FormatError, match="size"):
        trees.from_haiku_lstm(params, prefix=["a/lstm", "b/lstm"])


# ------------------------------------------------- against the frameworks
def test_against_flax_linen_and_nnx():
    pytest.importorskip("flax", reason="flax not installed (pip install flax)")
    import jax
    import jax.numpy as jnp
    from flax import linen
    from flax import nnx

    jax.config.update("jax_enable_x64", False)
    rng = np.random.default_rng(14)
    In, H = 4, 5
    x = rng.normal(size=(T, N, In)).astype(np.float32)
    for cls in (linen.LSTMCell, linen.OptimizedLSTMCell):
        cell = cls(features=H)
        carry = cell.initialize_carry(jax.random.PRNGKey(0), (N, In))
        variables = cell.init(jax.random.PRNGKey(1), carry, jnp.asarray(x[0]))
        ys = []
        for t in range(T):
            carry, y = cell.apply(variables, carry, jnp.asarray(x[t]))
            ys.append(np.asarray(y))
        m = trees.from_flax_lstm_cell(variables)
        out, (hn, cn) = m(x)
        check(out, np.stack(ys), F32)
        check(cn[0], np.asarray(carry[0]), F32)  # carry is (c, h)
        check(hn[0], np.asarray(carry[1]), F32)
    for cls in (nnx.LSTMCell, nnx.OptimizedLSTMCell):
        cell = cls(In, H, rngs=nnx.Rngs(2))
        carry = cell.initialize_carry((N, In), rngs=nnx.Rngs(3))
        ys = []
        for t in range(T):
            carry, y = cell(carry, jnp.asarray(x[t]))
            ys.append(np.asarray(y))
        m = trees.from_flax_lstm_cell(nnx.state(cell, nnx.Param))
        out, (hn, cn) = m(x)
        check(out, np.stack(ys), F32)
        check(cn[0], np.asarray(carry[0]), F32)


def test_against_haiku():
    pytest.importorskip("haiku", reason="dm-haiku not installed (pip install dm-haiku)")
    import haiku as hk
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(15)
    In, H = 3, 6
    x = rng.normal(size=(T, N, In)).astype(np.float32)

    def f(xs):
        core = hk.LSTM(H)
        return hk.dynamic_unroll(core, xs, core.initial_state(N))

    fn = hk.without_apply_rng(hk.transform(f))
    params = fn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    params = jax.tree_util.tree_map(lambda a: a + 0.1, params)  # non-zero bias
    ys, state = fn.apply(params, jnp.asarray(x))
    m = trees.from_haiku_lstm(params)
    out, (hn, cn) = m(x)
    check(out, np.asarray(ys), F32)
    check(hn[0], np.asarray(state.hidden), F32)
    check(cn[0], np.asarray(state.cell), F32)


def test_against_equinox():
    pytest.importorskip("equinox", reason="equinox not installed (pip install equinox)")
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", False)
    rng = np.random.default_rng(22)
    In, H = 4, 6
    x = rng.normal(size=(T, N, In)).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    fwd = eqx.nn.LSTMCell(In, H, key=keys[0])
    bwd = eqx.nn.LSTMCell(In, H, use_bias=False, key=keys[1])
    top = eqx.nn.LSTMCell(2 * H, H, key=keys[2])

    def scan(cell, xs, state):  # the usual Equinox idiom: vmap over rows, scan over time
        def step(st, xt):
            st = jax.vmap(cell)(xt, st)
            return st, st[0]
        return jax.lax.scan(step, state, xs)

    h0 = jnp.asarray(rng.normal(size=(N, H)).astype(np.float32))
    c0 = jnp.asarray(rng.normal(size=(N, H)).astype(np.float32))
    (h, c), ys = scan(fwd, jnp.asarray(x), (h0, c0))
    out, (hn, cn) = trees.from_equinox_lstm_cell(fwd)(x, (np.asarray(h0)[None],
                                                          np.asarray(c0)[None]))
    check(out, np.asarray(ys), F32)
    check(hn[0], np.asarray(h), F32)
    check(cn[0], np.asarray(c), F32)
    # two layers, the first bidirectional (backward cell without bias)
    zero = (jnp.zeros((N, H)), jnp.zeros((N, H)))
    _, yf = scan(fwd, jnp.asarray(x), zero)
    _, yb = scan(bwd, jnp.asarray(x[::-1]), zero)
    layer0 = jnp.concatenate([yf, yb[::-1]], axis=-1)
    m = trees.from_equinox_lstm_cell([(fwd, bwd)])
    check(m(x)[0], np.asarray(layer0), F32)
    topb = eqx.nn.LSTMCell(2 * H, H, key=keys[0])
    _, y2f = scan(top, layer0, zero)
    _, y2b = scan(topb, layer0[::-1], zero)
    m2 = trees.from_equinox_lstm_cell([(fwd, bwd), (top, topb)])
    check(m2(x)[0], np.concatenate([np.asarray(y2f), np.asarray(y2b)[::-1]], -1), F32)

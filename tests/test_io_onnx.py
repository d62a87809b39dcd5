"""ONNX LSTM loading (fastlstm.io.onnx) against onnxruntime and torch.

Models are built with onnx.helper, run with onnxruntime (the oracle: the
onnx reference op ignores activations, clip, input_forget, sequence_lens),
and loaded with fastlstm's own protobuf reader.  Tolerances: sigmoid/tanh
cells at the float32 table (1e-5 x max(1, |value|)); other activations at
onnxruntime's own test tolerance (1e-5 abs + 1e-4 rel).
"""
import os

import numpy as np
import pytest

import fastlstm
from fastlstm.io import onnx as fo
from io_fuzzing import SEED, Fuzzer, flip_bytes, iters, truncate
from tolerances import ORT_ATOL, ORT_RTOL, assert_close, assert_lstm_close

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

ACTS = ["Sigmoid", "Tanh", "Relu", "HardSigmoid", "Affine", "LeakyRelu", "ThresholdedRelu",
        "ScaledTanh", "Elu", "Softsign", "Softplus"]
# explicit (alpha, beta) for the activations that read them
ALPHA_BETA = {"Affine": (0.7, 0.1), "LeakyRelu": (0.2, None), "ThresholdedRelu": (0.1, None),
              "ScaledTanh": (1.3, 0.8), "HardSigmoid": (0.3, 0.45), "Elu": (0.9, None)}
USES = {"Affine": (1, 1), "LeakyRelu": (1, 0), "ThresholdedRelu": (1, 0), "ScaledTanh": (1, 1),
        "HardSigmoid": (1, 1), "Elu": (1, 0)}


def _tensor(name, arr, encoding):
    arr = np.asarray(arr)
    if encoding == "raw":
        return numpy_helper.from_array(arr, name)
    dt = helper.np_dtype_to_tensor_dtype(arr.dtype)
    return helper.make_tensor(name, dt, arr.shape, arr.reshape(-1).tolist(), raw=False)


def make_lstm(In, H, direction="forward", *, bias=True, peep=False, activations=None,
              alpha=None, beta=None, clip=None, input_forget=None, layout=0, weights="init",
              encoding="raw", dtype=np.float32, seed=0, scale=0.3, states=True, seq_lens=False,
              hidden_attr=True, node_name="lstm", opset=14):
    """(ModelProto, onnx weights dict) of one LSTM node with graph inputs X
    [+ initial_h, initial_c] [+ sequence_lens]."""
    rng = np.random.default_rng(seed)
    D = 2 if direction == "bidirectional" else 1
    w = {"W": rng.uniform(-scale, scale, (D, 4 * H, In)),
         "R": rng.uniform(-scale, scale, (D, 4 * H, H))}
    if bias:
        w["B"] = rng.uniform(-scale, scale, (D, 8 * H))
    if peep:
        w["P"] = rng.uniform(-scale, scale, (D, 3 * H))
    w = {k: v.astype(dtype) for k, v in w.items()}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    xshape = ["T", "N", In] if layout == 0 else ["N", "T", In]
    sshape = [D, "N", H] if layout == 0 else ["N", D, H]
    inputs = [helper.make_tensor_value_info("X", elem, xshape)]
    if seq_lens:
        inputs.append(helper.make_tensor_value_info("seq", TensorProto.INT32, ["N"]))
    if states:
        inputs += [helper.make_tensor_value_info("h0", elem, sshape),
                   helper.make_tensor_value_info("c0", elem, sshape)]
    nodes, inits = [], []
    names = {}
    for k, v in w.items():
        name = "w_" + k
        names[k] = name
        if weights in ("init", "init_input"):
            inits.append(_tensor(name, v, encoding))
            if weights == "init_input":
                inputs.append(helper.make_tensor_value_info(name, elem, list(v.shape)))
        elif weights in ("constant", "identity"):
            cname = name if weights == "constant" else name + "_c"
            nodes.append(helper.make_node("Constant", [], [cname],
                                          value=_tensor(cname + "_t", v, encoding)))
            if weights == "identity":
                nodes.append(helper.make_node("Identity", [cname], [name]))
        else:
            raise ValueError(weights)
    attrs = {"direction": direction}
    if hidden_attr:
        attrs["hidden_size"] = H
    if activations is not None:
        attrs["activations"] = activations
    if alpha is not None:
        attrs["activation_alpha"] = alpha
    if beta is not None:
        attrs["activation_beta"] = beta
    if clip is not None:
        attrs["clip"] = clip
    if input_forget is not None:
        attrs["input_forget"] = input_forget
    if layout:
        attrs["layout"] = layout
    lstm_in = ["X", names["W"], names["R"], names.get("B", ""), "seq" if seq_lens else "",
               "h0" if states else "", "c0" if states else "", names.get("P", "")]
    while lstm_in[-1] == "":
        lstm_in.pop()
    nodes.append(helper.make_node("LSTM", lstm_in, ["Y", "Y_h", "Y_c"], name=node_name, **attrs))
    outputs = [helper.make_tensor_value_info(n, elem, None) for n in ("Y", "Y_h", "Y_c")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, w


def ort_run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def inputs(In, H, D, T=5, N=3, seed=1, dtype=np.float32, layout=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, N, In)).astype(dtype)
    h0 = (0.5 * rng.standard_normal((D, N, H))).astype(dtype)
    c0 = (0.5 * rng.standard_normal((D, N, H))).astype(dtype)
    return x, h0, c0


def check(got, want, tight, what=""):
    names = ("Y", "Y_h", "Y_c")
    for g, w_, n in zip(got, want, names):
        assert g.shape == w_.shape, f"{what} {n}: shape {g.shape} != {w_.shape}"
        if tight:
            assert_close(g, w_, np.float32, f"{what} {n}")
        else:
            np.testing.assert_allclose(g, w_, rtol=ORT_RTOL, atol=ORT_ATOL, err_msg=f"{what} {n}")


def compare(model, In, H, D, *, tight=True, T=5, N=3, seed=1, states=True, what=""):
    x, h0, c0 = inputs(In, H, D, T, N, seed)
    feeds = {"X": x, "h0": h0, "c0": c0} if states else {"X": x}
    want = ort_run(model, feeds)
    node = fo.load_onnx(model.SerializeToString())
    got = node(x, h0, c0) if states else node(x)
    check(got, want, tight, what)
    return node, got


def alpha_beta_lists(acts):
    alpha, beta = [], []
    for a in acts:
        ua, ub = USES.get(a, (0, 0))
        if ua:
            alpha.append(ALPHA_BETA[a][0])
        if ub:
            beta.append(ALPHA_BETA[a][1])
    return alpha or None, beta or None


# ------------------------------------------------------------ directions, variants
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("peep", [False, True])
def test_directions_and_peepholes(direction, peep):
    D = 2 if direction == "bidirectional" else 1
    model, _ = make_lstm(4, 6, direction, peep=peep, seed=3)
    node, (Y, Yh, Yc) = compare(model, 4, 6, D, what=direction)
    assert Y.shape == (5, D, 3, 6) and Yh.shape == (D, 3, 6)
    assert node.direction == direction and node.num_directions == D
    if direction == "reverse":
        with pytest.raises(fastlstm.FastLSTMError, match="reverse"):
            node.lstm
        assert len(node.parts) == 1 and node.parts[0][1] is True
    else:
        m = node.lstm
        assert isinstance(m, fastlstm.LSTM) and m.bidirectional == (D == 2)
        assert m.peepholes == peep


def test_lstm_attribute_is_torch_semantics():
    model, _ = make_lstm(4, 6, "bidirectional", seed=5)
    x, h0, c0 = inputs(4, 6, 2)
    Y, Yh, Yc = ort_run(model, {"X": x, "h0": h0, "c0": c0})
    m = fo.load_onnx(model.SerializeToString()).lstm
    out, (h, c) = m(x, (h0, c0))
    # torch layout: out (T, N, D*H) = Y (T, D, N, H) with D moved next to H
    assert_close(out, Y.transpose(0, 2, 1, 3).reshape(5, 3, 12), np.float32)
    assert_close(h, Yh, np.float32)
    ref_out, (ref_h, _) = m.reference(x, (h0, c0))
    assert_close(out, ref_out, np.float32)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_no_bias_no_states(direction):
    D = 2 if direction == "bidirectional" else 1
    model, _ = make_lstm(3, 5, direction, bias=False, states=False, seed=4)
    node, _ = compare(model, 3, 5, D, states=False)
    assert all(not m.bias for m, _ in node.parts)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_clip(direction):
    D = 2 if direction == "bidirectional" else 1
    model, _ = make_lstm(4, 6, direction, clip=0.4, scale=1.0, seed=6)
    node, _ = compare(model, 4, 6, D)
    assert node.parts[0][0].clip == pytest.approx(0.4)


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_input_forget_with_peepholes_and_clip(direction):
    D = 2 if direction == "bidirectional" else 1
    model, _ = make_lstm(4, 6, direction, input_forget=1, seed=7)
    compare(model, 4, 6, D)
    model, _ = make_lstm(4, 6, direction, input_forget=1, peep=True, clip=0.8, seed=8)
    compare(model, 4, 6, D)


# ------------------------------------------------------------ activations
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("where", ["f", "gh", "split"])
def test_activations(act, where):
    if where == "f":
        acts, direction = [act, "Tanh", "Tanh"], "forward"
    elif where == "gh":
        acts, direction = ["Sigmoid", act, act], "forward"
    else:  # bidirectional, different activations per direction
        acts, direction = [act, "Tanh", "Tanh", "Sigmoid", act, act], "bidirectional"
    D = 2 if direction == "bidirectional" else 1
    alpha, beta = alpha_beta_lists(acts)
    model, _ = make_lstm(4, 5, direction, activations=acts, alpha=alpha, beta=beta, peep=True,
                         seed=11, scale=0.25)
    tight = act in ("Sigmoid", "Tanh")
    node, _ = compare(model, 4, 5, D, T=4, tight=tight, what=f"{act} {where}")
    if where == "split" and act != "Sigmoid":
        assert len(node.parts) == 2
        with pytest.raises(fastlstm.FastLSTMError, match="different activations"):
            node.lstm


@pytest.mark.parametrize("acts", [["ThresholdedRelu", "LeakyRelu", "Elu"],
                                  ["HardSigmoid", "ScaledTanh", "Affine"],
                                  ["HardSigmoid", "Softplus", "Softsign"]])
def test_activation_defaults_and_partial_lists(acts):
    # no alpha/beta: onnxruntime's defaults (0.0 where it has none)
    model, _ = make_lstm(3, 4, "forward", activations=acts, seed=12)
    compare(model, 3, 4, 1, T=4, tight=False, what=f"defaults {acts}")
    # one alpha only: consumed by the first activation that reads alpha
    model, _ = make_lstm(3, 4, "bidirectional", activations=acts + acts[::-1], alpha=[0.25],
                         seed=13)
    compare(model, 3, 4, 2, T=4, tight=False, what=f"partial {acts}")


def test_activation_names_are_case_insensitive():
    model, _ = make_lstm(3, 4, activations=["sigmoid", "TANH", "tanh"], seed=14)
    compare(model, 3, 4, 1)


# ------------------------------------------------------------ layout, dtypes, encodings
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_layout_1(direction):
    # onnxruntime refuses layout=1, so its oracle is the layout-0 twin.
    D = 2 if direction == "bidirectional" else 1
    m1, _ = make_lstm(4, 6, direction, layout=1, peep=True, seed=15)
    m0, _ = make_lstm(4, 6, direction, layout=0, peep=True, seed=15)
    x, h0, c0 = inputs(4, 6, D, seed=2)
    want = ort_run(m0, {"X": x, "h0": h0, "c0": c0})
    node = fo.load_onnx(m1.SerializeToString())
    got = node(x.transpose(1, 0, 2), h0.transpose(1, 0, 2), c0.transpose(1, 0, 2))
    want = (want[0].transpose(2, 0, 1, 3), want[1].transpose(1, 0, 2), want[2].transpose(1, 0, 2))
    check(got, want, True, "layout 1")
    if direction != "reverse":
        assert node.lstm.batch_first


def test_float64_weights():
    model, _ = make_lstm(4, 6, "bidirectional", dtype=np.float64, seed=16)
    x, h0, c0 = inputs(4, 6, 2, dtype=np.float64)
    node = fo.load_onnx(model.SerializeToString())
    assert node.dtype == np.float64 and node.lstm.dtype == np.float64
    got = node(x, h0, c0)
    try:
        want = ort_run(model, {"X": x, "h0": h0, "c0": c0})
    except Exception:  # onnxruntime builds without a double LSTM kernel
        want = None
    ref_out, (rh, rc) = node.lstm.reference(x, (h0, c0))
    assert_close(got[0].transpose(0, 2, 1, 3).reshape(ref_out.shape), ref_out, np.float64)
    if want is not None:
        check(got, want, True, "float64")


@pytest.mark.parametrize("weights", ["init", "init_input", "constant", "identity"])
@pytest.mark.parametrize("encoding", ["raw", "typed"])
def test_weight_sources_and_encodings(weights, encoding):
    model, _ = make_lstm(3, 4, "bidirectional", peep=True, weights=weights, encoding=encoding,
                         seed=17)
    compare(model, 3, 4, 2)


def test_float16_and_bfloat16_initializers():
    model32, w = make_lstm(3, 4, "forward", seed=18)
    x, h0, c0 = inputs(3, 4, 1)
    for elem, raw in ((TensorProto.FLOAT16, True), (TensorProto.FLOAT16, False),
                      (TensorProto.BFLOAT16, False)):
        m = onnx.ModelProto()
        m.CopyFrom(model32)
        del m.graph.initializer[:]
        widened = {}
        for k, v in w.items():
            if elem == TensorProto.FLOAT16:
                v16 = v.astype(np.float16)
                widened[k] = v16.astype(np.float32)
                t = (numpy_helper.from_array(v16, "w_" + k) if raw else
                     helper.make_tensor("w_" + k, elem, v.shape, v16.reshape(-1).tolist()))
            else:  # bfloat16: the top 16 bits of the float32
                v16 = (v.view(np.uint32) >> 16 << 16).view(np.float32)
                widened[k] = v16
                t = helper.make_tensor("w_" + k, elem, v.shape, v16.reshape(-1).tolist())
            m.graph.initializer.append(t)
        node = fo.load_onnx(m.SerializeToString())
        assert node.dtype == np.float32
        assert fo.list_stacks(m.SerializeToString())[0]["dtype"] in ("float16", "bfloat16")
        # the loaded weights are exactly the widened 16-bit values, in our gate order
        W16, sd = widened["W"][0], node.lstm.state_dict()
        np.testing.assert_array_equal(sd["weight_ih_l0"][:4], W16[:4])       # i
        np.testing.assert_array_equal(sd["weight_ih_l0"][4:8], W16[8:12])    # f
        np.testing.assert_array_equal(sd["weight_ih_l0"][8:12], W16[12:16])  # g = c
        np.testing.assert_array_equal(sd["weight_ih_l0"][12:16], W16[4:8])   # o
        # and run like the float32 model holding the same values
        m32, _ = make_lstm(3, 4, "forward", seed=18)
        del m32.graph.initializer[:]
        m32.graph.initializer.extend(numpy_helper.from_array(v, "w_" + k)
                                     for k, v in widened.items())
        check(node(x, h0, c0), ort_run(m32, {"X": x, "h0": h0, "c0": c0}), True)


# ------------------------------------------------------------ graphs
def test_hidden_size_inferred_from_R():
    model, _ = make_lstm(3, 4, "bidirectional", hidden_attr=False, seed=19)
    with_attr, _ = make_lstm(3, 4, "bidirectional", seed=19)
    x, h0, c0 = inputs(3, 4, 2)
    want = ort_run(with_attr, {"X": x, "h0": h0, "c0": c0})
    node = fo.load_onnx(model.SerializeToString())
    assert node.hidden_size == 4
    check(node(x, h0, c0), want, True)


def test_lstm_among_other_ops(tmp_path):
    rng = np.random.default_rng(20)
    In, H = 4, 5
    W = rng.uniform(-0.3, 0.3, (1, 4 * H, In)).astype(np.float32)
    R = rng.uniform(-0.3, 0.3, (1, 4 * H, H)).astype(np.float32)
    B = rng.uniform(-0.3, 0.3, (1, 8 * H)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(
            np.array(2.0, np.float32), "two_t")),
        helper.make_node("Mul", ["inp", "two"], ["x"]),
        helper.make_node("Tanh", ["x"], ["xt"]),
        helper.make_node("LSTM", ["xt", "W", "R", "B"], ["y", "yh", "yc"], hidden_size=H,
                         direction="reverse", name="the_lstm"),
        helper.make_node("Squeeze", ["y", "axes"], ["ys"]),
        helper.make_node("Relu", ["ys"], ["out"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((W, "W"), (R, "R"), (B, "B"), (np.array([1], np.int64), "axes"))]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("inp", f, ["T", "N", In])],
        [helper.make_tensor_value_info(n, f, None) for n in ("out", "xt", "y", "yh", "yc")],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    path = tmp_path / "mixed.onnx"
    onnx.save(model, str(path))
    inp = rng.standard_normal((6, 2, In)).astype(np.float32)
    out, xt, y, yh, yc = ort_run(model, {"inp": inp})
    (info,) = fo.list_stacks(path)
    assert info["name"] == "the_lstm" and info["direction"] == "reverse"
    assert info["input_size"] == In and info["hidden_size"] == H and info["loadable"]
    node = fo.load_onnx(path, "the_lstm")
    check(node(xt), (y, yh, yc), True)


def test_runtime_weight_is_a_format_error():
    model, _ = make_lstm(3, 4, seed=21)
    # R becomes a graph input without initializer
    m = onnx.ModelProto()
    m.CopyFrom(model)
    r = [t for t in m.graph.initializer if t.name == "w_R"][0]
    m.graph.initializer.remove(r)
    m.graph.input.append(helper.make_tensor_value_info("w_R", TensorProto.FLOAT, [1, 16, 4]))
    with pytest.raises(fastlstm.FormatError, match="w_R"):
        fo.load_onnx(m.SerializeToString())
    (info,) = fo.list_stacks(m.SerializeToString())
    assert not info["loadable"] and "w_R" in info["problem"]
    # W computed at run time from a graph input
    m2 = onnx.ModelProto()
    m2.CopyFrom(model)
    for n in m2.graph.node:
        if n.op_type == "LSTM":
            n.input[1] = "w_W_run"
    m2.graph.node.insert(0, helper.make_node("Neg", ["w_W"], ["w_W_run"], name="negate"))
    with pytest.raises(fastlstm.FormatError, match="w_W_run.*Neg node 'negate'"):
        fo.load_onnx(m2.SerializeToString())


def test_several_nodes_need_a_name():
    model, _ = make_lstm(3, 4, seed=22)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    lstm = [n for n in m.graph.node if n.op_type == "LSTM"][0]
    second = helper.make_node("LSTM", list(lstm.input), ["Y2", "", ""], hidden_size=4,
                              name="second")
    m.graph.node.append(second)
    names = [s["name"] for s in fo.list_stacks(m.SerializeToString())]
    assert names == ["lstm", "second"]
    with pytest.raises(fastlstm.FormatError, match="second"):
        fo.load_onnx(m.SerializeToString())
    assert fo.load_onnx(m.SerializeToString(), "second").name == "second"
    with pytest.raises(fastlstm.FormatError, match="nope"):
        fo.load_onnx(m.SerializeToString(), "nope")


@pytest.mark.parametrize("attr, value, match", [
    ("bogus", 3, "unknown attribute 'bogus'"),
    ("direction", "sideways", "direction 'sideways'"),
    ("activations", ["Sigmoid", "Tanh"], "2 names, expected 3"),
    ("activations", ["Sigmoid", "Tanh", "Gelu"], "unknown activation 'Gelu'"),
    ("layout", 2, "layout 2"),
    ("clip", -1.0, "clip -1"),
    ("hidden_size", 5, "W has shape .1, 16, 3., expected .1, 20"),
])
def test_bad_attributes_are_format_errors(attr, value, match):
    model, _ = make_lstm(3, 4, seed=31)
    node = [n for n in model.graph.node if n.op_type == "LSTM"][0]
    for a in list(node.attribute):
        if a.name == attr:
            node.attribute.remove(a)
    node.attribute.append(helper.make_attribute(attr, value))
    with pytest.raises(fastlstm.FormatError, match=match):
        fo.load_onnx(model.SerializeToString())


def test_constant_initial_state_is_the_default():
    model, _ = make_lstm(3, 4, states=False, seed=23)
    rng = np.random.default_rng(0)
    h0 = rng.standard_normal((1, 2, 4)).astype(np.float32)
    c0 = rng.standard_normal((1, 2, 4)).astype(np.float32)
    model.graph.initializer.extend([numpy_helper.from_array(h0, "h0c"),
                                    numpy_helper.from_array(c0, "c0c")])
    lstm = [n for n in model.graph.node if n.op_type == "LSTM"][0]
    while len(lstm.input) < 7:
        lstm.input.append("")
    lstm.input[5], lstm.input[6] = "h0c", "c0c"
    x = rng.standard_normal((3, 2, 3)).astype(np.float32)
    want = ort_run(model, {"X": x})
    check(fo.load_onnx(model.SerializeToString())(x), want, True)


def test_external_data(tmp_path):
    model, _ = make_lstm(3, 4, "bidirectional", peep=True, seed=24)
    x, h0, c0 = inputs(3, 4, 2)
    want = ort_run(model, {"X": x, "h0": h0, "c0": c0})
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert os.path.getsize(tmp_path / "weights.bin") > 0
    assert all(t.data_location == TensorProto.EXTERNAL
               for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    check(fo.load_onnx(path)(x, h0, c0), want, True)
    # as bytes there is no directory to look in
    with pytest.raises(fastlstm.FormatError, match="external"):
        fo.load_onnx(path.read_bytes())
    # a location outside the model's directory, or past the end of the file
    for loc, offset in (("../weights.bin", "0"), ("/etc/passwd", "0"), ("weights.bin", "999999")):
        m = onnx.load(str(path), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = loc
                if e.key == "offset":
                    e.value = offset
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(m.SerializeToString())
        with pytest.raises(fastlstm.FormatError):
            fo.load_onnx(bad)


# ------------------------------------------------------------ sequence_lens
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional", "split"])
@pytest.mark.parametrize("layout", [0, 1])
def test_sequence_lens(direction, layout):
    acts = None
    if direction == "split":  # two directions with different activations: two models
        direction, acts = "bidirectional", ["Sigmoid", "Tanh", "Tanh", "Sigmoid", "Tanh", "Relu"]
    D = 2 if direction == "bidirectional" else 1
    kw = dict(seq_lens=True, peep=True, activations=acts, seed=25)
    model, _ = make_lstm(3, 4, direction, **kw)
    node = fo.load_onnx(make_lstm(3, 4, direction, layout=layout, **kw)[0].SerializeToString())
    x, h0, c0 = inputs(3, 4, D, T=6, N=5)

    def run(lens):
        if layout == 0:
            return node(x, h0, c0, sequence_lens=lens)
        Y, Yh, Yc = node(x.transpose(1, 0, 2), h0.transpose(1, 0, 2), c0.transpose(1, 0, 2),
                         sequence_lens=lens)
        return Y.transpose(1, 2, 0, 3), Yh.transpose(1, 0, 2), Yc.transpose(1, 0, 2)
    full = np.full(5, 6, np.int32)
    want = ort_run(model, {"X": x, "seq": full, "h0": h0, "c0": c0})
    check(run(full), want, acts is None, "full lengths")
    lens = np.array([6, 3, 1, 0, 5], np.int32)
    if not fo._supports_lengths():
        with pytest.raises(fo.SequenceLensUnsupported):
            run(lens)
        pytest.skip("fastlstm.LSTM has no lengths= yet")
    want = ort_run(model, {"X": x, "seq": lens, "h0": h0, "c0": c0})
    check(run(lens), want, acts is None, "lengths")


# ------------------------------------------------------------ torch.onnx.export
def _torch_export(tmp_path, mod, x, hx=None):
    torch = pytest.importorskip("torch")
    import warnings
    path = tmp_path / "torch.onnx"
    args = (torch.from_numpy(x),) if hx is None else (
        torch.from_numpy(x), tuple(torch.from_numpy(a) for a in hx))
    names = ["x"] if hx is None else ["x", "h0", "c0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(mod, args, str(path), dynamo=False, input_names=names,
                          output_names=["y", "hn", "cn"])
    return path


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_export_two_layers(tmp_path, batch_first, bidirectional):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    D, T, N, H = (2 if bidirectional else 1), 6, 3, 7
    mod = torch.nn.LSTM(5, H, num_layers=2, bidirectional=bidirectional,
                        batch_first=batch_first).eval()
    rng = np.random.default_rng(26)
    x = rng.standard_normal((N, T, 5) if batch_first else (T, N, 5)).astype(np.float32)
    hx = tuple(rng.standard_normal((2 * D, N, H)).astype(np.float32) for _ in range(2))
    path = _torch_export(tmp_path, mod, x, hx)
    with torch.no_grad():
        t_out, (t_h, t_c) = mod(torch.from_numpy(x), tuple(torch.from_numpy(a) for a in hx))
    infos = fo.list_stacks(path)
    assert len(infos) == 2
    assert [i["layer"] for i in infos] == [0, 1] and infos[1]["stack"] == infos[0]["name"]
    assert infos[0]["input_size"] == 5 and infos[1]["input_size"] == D * H
    # the merged stack has torch.nn.LSTM's semantics
    m = fo.load_stack(path)
    assert (m.num_layers, m.bidirectional, m.batch_first) == (2, bidirectional, batch_first)
    out, (h, c) = m(x, hx)
    assert_close(out, t_out.numpy(), np.float32, "out")
    assert_close(h, t_h.numpy(), np.float32, "h_n")
    assert_close(c, t_c.numpy(), np.float32, "c_n")
    for k in mod.state_dict():
        np.testing.assert_array_equal(m.state_dict()[k], mod.state_dict()[k].numpy())
    # each node on its own, with ONNX's semantics, against onnxruntime
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y, hn, cn = sess.run(None, {"x": x, "h0": hx[0], "c0": hx[1]})
    assert_close(y, out, np.float32)
    xt = x.transpose(1, 0, 2) if batch_first else x
    node0 = fo.load_onnx(path, infos[0]["name"])
    Y0, Yh0, Yc0 = node0(xt, hx[0][:D], hx[1][:D])
    node1 = fo.load_onnx(path, infos[1]["name"])
    Y1, Yh1, Yc1 = node1(Y0.transpose(0, 2, 1, 3).reshape(T, N, D * H), hx[0][D:], hx[1][D:])
    assert_close(np.concatenate([Yh0, Yh1]), hn, np.float32)
    assert_close(np.concatenate([Yc0, Yc1]), cn, np.float32)
    assert_close(Y1.transpose(0, 2, 1, 3).reshape(T, N, D * H),
                 y.transpose(1, 0, 2) if batch_first else y, np.float32)


def test_torch_export_single_layer_without_states(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    mod = torch.nn.LSTM(4, 6).eval()
    x = np.random.default_rng(27).standard_normal((5, 2, 4)).astype(np.float32)
    path = _torch_export(tmp_path, mod, x)
    m = fo.load_stack(path)
    with torch.no_grad():
        t_out, (t_h, t_c) = mod(torch.from_numpy(x))
    out, (h, c) = m(x)
    assert_close(out, t_out.numpy(), np.float32)
    assert_close(c, t_c.numpy(), np.float32)


def _dynamo_export(tmp_path, mod, x, hx=None, dynamic=False):
    """torch.onnx.export with the default (dynamo) exporter; dynamic: the
    batch size is a dynamic dimension.  (torch 2.13 cannot export the
    sequence length of an nn.LSTM as dynamic: it is fixed to x's.)"""
    torch = pytest.importorskip("torch")
    import logging
    import warnings
    path = tmp_path / "dynamo.onnx"
    args = (torch.from_numpy(x),) if hx is None else (
        torch.from_numpy(x), tuple(torch.from_numpy(a) for a in hx))
    shapes = None
    if dynamic:
        n = torch.export.Dim("N", min=2)
        xs = {0: n} if mod.batch_first else {1: n}
        shapes = (xs,) if hx is None else (xs, ({1: n}, {1: n}))
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(mod, args, str(path), dynamic_shapes=shapes, verbose=False)
    finally:
        logging.disable(level)
    return path


@pytest.mark.parametrize("layers, bidirectional, batch_first, dynamic, states", [
    (2, False, False, False, False), (2, True, True, False, True), (3, False, True, True, True),
    (3, True, False, True, False), (2, True, False, True, True), (1, True, True, False, False),
])
def test_torch_dynamo_export(tmp_path, layers, bidirectional, batch_first, dynamic, states):
    # torch 2.13's default exporter links the layers with Transpose and a
    # Reshape to [T, N, D*H] (a constant, or computed from Shape when the
    # batch is dynamic), and passes zero initial states as constants
    torch = pytest.importorskip("torch")
    torch.manual_seed(40 + layers)
    D, T, N, In, H = (2 if bidirectional else 1), 5, 2, 3, 4
    mod = torch.nn.LSTM(In, H, num_layers=layers, bidirectional=bidirectional,
                        batch_first=batch_first).eval()
    rng = np.random.default_rng(41)

    def data(n):
        x = rng.standard_normal((n, T, In) if batch_first else (T, n, In)).astype(np.float32)
        return x, tuple(rng.standard_normal((D * layers, n, H)).astype(np.float32)
                        for _ in range(2))
    x, hx = data(N)
    path = _dynamo_export(tmp_path, mod, x, hx if states else None, dynamic)
    ((name, info),) = fastlstm.list_stacks(path)
    assert (info["num_layers"], info["bidirectional"], info["variant"]) == \
        (layers, bidirectional, "standard")
    assert [i["layer"] for i in fo.list_stacks(path)] == list(range(layers))
    m = fastlstm.load(path)
    assert (m.num_layers, m.bidirectional, m.batch_first) == (layers, bidirectional, batch_first)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in sess.get_inputs()]
    for n in (N, 3) if dynamic else (N,):
        x, hx = data(n)
        with torch.no_grad():
            targs = (torch.from_numpy(x),) + (
                (tuple(torch.from_numpy(a) for a in hx),) if states else ())
            t_out, (t_h, t_c) = mod(*targs)
        got = m(x, hx) if states else m(x)
        assert_lstm_close(got, (t_out.numpy(), (t_h.numpy(), t_c.numpy())), np.float32,
                          f"torch N={n}")
        y, yh, yc = sess.run(None, dict(zip(feed_names, (x,) + (hx if states else ()))))
        assert_lstm_close(got, (y, (yh, yc)), np.float32, f"onnxruntime N={n}")


def _chained_lstms(link, D=1, T=4, N=3, In=3, H=4, declare=True, value_info=(), seed=42):
    """Two LSTM nodes 'a' -> 'b': a's Y 'y0' goes through the nodes and
    initializers `link(D, T, N, H)` returns to b's X 'x1'.  declare: the graph
    input x has the fixed shape [T, N, In] (else symbolic)."""
    rng = np.random.default_rng(seed)
    direction = "bidirectional" if D == 2 else "forward"
    ws = {"W0": (D, 4 * H, In), "R0": (D, 4 * H, H), "B0": (D, 8 * H),
          "W1": (D, 4 * H, D * H), "R1": (D, 4 * H, H), "B1": (D, 8 * H)}
    inits = [numpy_helper.from_array(rng.uniform(-0.4, 0.4, s).astype(np.float32), k)
             for k, s in ws.items()]
    link_nodes, link_inits = link(D, T, N, H)
    inits += [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in link_inits.items()]
    nodes = [helper.make_node("LSTM", ["x", "W0", "R0", "B0"], ["y0", "yh0", "yc0"], name="a",
                              hidden_size=H, direction=direction)]
    nodes += link_nodes
    nodes.append(helper.make_node("LSTM", ["x1", "W1", "R1", "B1"], ["y1", "yh1", "yc1"],
                                  name="b", hidden_size=H, direction=direction))
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", f, [T, N, In] if declare else
                                                   ["T", "N", In])],
        [helper.make_tensor_value_info(n, f, None) for n in ("y1", "yh0", "yc0", "yh1", "yc1")],
        initializer=inits,
        value_info=[helper.make_tensor_value_info(n, f, s) for n, s in value_info])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def _transpose_reshape(target, perm=(0, 2, 1, 3), allowzero=0):
    """Link: Transpose(y0, perm) then Reshape to the constant target(D, T, N, H)."""
    def link(D, T, N, H):
        return ([helper.make_node("Transpose", ["y0"], ["t0"], perm=list(perm)),
                 helper.make_node("Reshape", ["t0", "shape"], ["x1"], allowzero=allowzero)],
                {"shape": target(D, T, N, H)})
    return link


def _computed_reshape(parts):
    """Link: Transpose(y0, 0 2 1 3) then Reshape to Concat of parts: (source,
    start, end) slices of Shape(source) for source 't0' or 'y0', or ints."""
    def link(D, T, N, H):
        nodes = [helper.make_node("Transpose", ["y0"], ["t0"], perm=[0, 2, 1, 3]),
                 helper.make_node("Shape", ["t0"], ["s_t0"]),
                 helper.make_node("Shape", ["y0"], ["s_y0"])]
        inits, names = {}, []
        for k, p in enumerate(parts):
            if isinstance(p, tuple):
                src, a, b = p
                inits[f"a{k}"], inits[f"b{k}"] = [a], [b]
                nodes.append(helper.make_node("Slice", [f"s_{src}", f"a{k}", f"b{k}"], [f"p{k}"]))
            else:
                inits[f"p{k}"] = [p(D, H) if callable(p) else p]
            names.append(f"p{k}")
        nodes += [helper.make_node("Concat", names, ["shape"], axis=0),
                  helper.make_node("Reshape", ["t0", "shape"], ["x1"])]
        return nodes, inits
    return link


DH = lambda D, H: D * H  # noqa: E731
LINKS_OK = {
    "fixed": _transpose_reshape(lambda D, T, N, H: [T, N, D * H]),
    "zeros": _transpose_reshape(lambda D, T, N, H: [0, 0, -1]),
    "fixed_minus1": _transpose_reshape(lambda D, T, N, H: [T, -1, D * H]),
    "shape_of_transpose": _computed_reshape([("t0", 0, 2), DH]),
    "shape_of_y": _computed_reshape([("y0", 0, 1), ("y0", 2, 3), -1]),
}
LINKS_BAD = {  # valid ONNX, but not the layer-to-layer reshaping: never merged
    "swapped": _transpose_reshape(lambda D, T, N, H: [N, T, D * H]),
    "wrong_perm": _transpose_reshape(lambda D, T, N, H: [0, 0, -1], perm=(0, 2, 3, 1)),
    "shape_swapped": _computed_reshape([("t0", 1, 2), ("t0", 0, 1), DH]),
    "shape_of_y_swapped": _computed_reshape([("y0", 2, 3), ("y0", 0, 1), DH]),
}


def _run_chain(model, x):
    y1, yh0, yc0, yh1, yc1 = ort_run(model, {"x": x})
    T, D, N, H = y1.shape
    return (y1.transpose(0, 2, 1, 3).reshape(T, N, D * H),
            (np.concatenate([yh0, yh1]), np.concatenate([yc0, yc1])))


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("link", sorted(LINKS_OK))
def test_layer_links_that_are_merged(tmp_path, D, link):
    model = _chained_lstms(LINKS_OK[link], D)
    path = tmp_path / "chain.onnx"
    onnx.save(model, str(path))
    ((name, info),) = fastlstm.list_stacks(path)
    assert (name, info["num_layers"], info["nodes"]) == ("a", 2, ["a", "b"])
    x = np.random.default_rng(43).standard_normal((4, 3, 3)).astype(np.float32)
    assert_lstm_close(fastlstm.load(path)(x), _run_chain(model, x), np.float32, link)


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("link", sorted(LINKS_BAD))
def test_layer_links_that_are_not_merged(tmp_path, D, link):
    model = _chained_lstms(LINKS_BAD[link], D)
    path = tmp_path / "chain.onnx"
    onnx.save(model, str(path))
    ort_run(model, {"x": np.zeros((4, 3, 3), np.float32)})  # a model onnxruntime runs
    assert [i["num_layers"] for _, i in fastlstm.list_stacks(path)] == [1, 1]
    with pytest.raises(fastlstm.FormatError, match="2 separate LSTM stacks"):
        fastlstm.load(path)


def test_fixed_reshape_target_needs_declared_sizes(tmp_path):
    # [T, N, D*H] as numbers is the layer link only if the graph says the
    # node's sequence and batch sizes are T and N
    link = LINKS_OK["fixed"]
    for declare, vinfo, merged in (
            (True, (), True),
            (False, (), False),                                      # nothing declared
            (False, [("y0", [4, 2, 3, 4])], True),                  # Y declares T, N
            (True, [("y0", [4, 2, 5, 4])], False),                  # contradicts x
            (True, [("y0", [4, 1, 3, 4])], False)):                 # contradicts D
        model = _chained_lstms(link, 2, declare=declare, value_info=vinfo)
        assert [i["stack_layers"] for i in fo.list_stacks(model.SerializeToString())] == \
            ([2, 2] if merged else [1, 1]), (declare, vinfo)


# ------------------------------------------------------------ what a stack cannot carry
def _with_constants(model, h0=None, c0=None, seq=None, x_shape=None):
    """The one-node model with initial_h / initial_c / sequence_lens as
    initializers (x_shape: X's declared shape)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    lstm = [n for n in m.graph.node if n.op_type == "LSTM"][0]
    while len(lstm.input) < 7:
        lstm.input.append("")
    for k, (name, v) in enumerate((("seq_c", seq), ("h0_c", h0), ("c0_c", c0))):
        if v is not None:
            m.graph.initializer.append(numpy_helper.from_array(v, name))
            lstm.input[4 + k] = name
    if x_shape is not None:
        m.graph.input[0].CopyFrom(helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape))
    return m


def test_constant_states_and_lengths_are_not_dropped(tmp_path):
    # load_onnx applies them; an LSTM model cannot hold them, so
    # fastlstm.load / load_stack refuse them rather than drop them silently
    model, _ = make_lstm(3, 4, states=False, seed=44)
    rng = np.random.default_rng(45)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32)
    h0 = rng.standard_normal((1, 2, 4)).astype(np.float32)
    path = tmp_path / "c.onnx"
    for kw, what in ((dict(h0=h0, c0=np.zeros_like(h0)), "initial_h 'h0_c'"),
                     (dict(c0=h0), "initial_c 'c0_c'"),
                     (dict(h0=h0, c0=h0), "initial_h 'h0_c' and initial_c 'c0_c'"),
                     (dict(seq=np.array([5, 3], np.int32), x_shape=[5, 2, 3]), "sequence_lens"),
                     (dict(seq=np.array([5, 5], np.int32)), "sequence_lens")):  # T unknown
        m = _with_constants(model, **kw)
        onnx.save(m, str(path))
        check(fo.load_onnx(path)(x), ort_run(m, {"X": x}), True, what)
        for load in (fastlstm.load, fo.load_stack):
            with pytest.raises(fastlstm.FormatError, match=f"constant {what}.*load_onnx"):
                load(path)
    # all-zero states and lengths equal to the declared sequence length:
    # ignoring them is exact
    zeros = np.zeros_like(h0)
    for kw in (dict(h0=zeros, c0=zeros), dict(seq=np.array([5, 5], np.int32), x_shape=[5, 2, 3])):
        m = _with_constants(model, **kw)
        onnx.save(m, str(path))
        Y, Yh, Yc = ort_run(m, {"X": x})
        assert_lstm_close(fastlstm.load(path)(x), (Y[:, 0], (Yh, Yc)), np.float32, str(kw))


def test_cycle_of_lstm_nodes_is_a_format_error(tmp_path):
    H = 4
    rng = np.random.default_rng(46)
    inits, nodes = [numpy_helper.from_array(np.array([1], np.int64), "ax")], []
    for k, (x, y) in enumerate((("xa", "ya"), ("xb", "yb"), ("xc", "yc"))):
        inits += [numpy_helper.from_array(rng.normal(size=(1, 4 * H, H)).astype(np.float32), n)
                  for n in (f"W{k}", f"R{k}")]
        nodes.append(helper.make_node("LSTM", [x, f"W{k}", f"R{k}"], [y], name=f"L{k}",
                                      hidden_size=H))
    nodes += [helper.make_node("Squeeze", [y, "ax"], [x]) for y, x in
              (("ya", "xb"), ("yb", "xc"), ("yc", "xa"))]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(
        "ya", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "cycle.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    for fn in (fo.list_stacks, fo.load_onnx, fastlstm.list_stacks, fastlstm.load):
        with pytest.raises(fastlstm.FormatError, match="cycle .'L0' -> 'L1' -> 'L2' -> 'L0'"):
            fn(path)


def test_empty_tensor_with_huge_dims_is_a_format_error(tmp_path):
    model, _ = make_lstm(3, 4, seed=47)
    for t in model.graph.initializer:
        if t.name == "w_W":
            t.CopyFrom(helper.make_tensor("w_W", TensorProto.FLOAT, [1, 0, 2 ** 62], b"",
                                          raw=True))
    path = tmp_path / "huge.onnx"
    onnx.save(model, str(path))
    for fn in (fo.load_onnx, fastlstm.load):
        with pytest.raises(fastlstm.FormatError, match="'w_W': dimensions .* too large"):
            fn(path)
    (info,) = fo.list_stacks(path)
    assert not info["loadable"] and "too large" in info["problem"]


def test_one_bad_node_leaves_the_others_loadable(tmp_path):
    # a node fastlstm does not understand (here an unknown activation) is
    # listed with its problem; the other nodes of the file still load
    model, _ = make_lstm(3, 4, states=False, seed=48)
    lstm = [n for n in model.graph.node if n.op_type == "LSTM"][0]
    bad = helper.make_node("LSTM", list(lstm.input), ["Y2"], name="bad", hidden_size=4,
                           activations=["Gelu", "Tanh", "Tanh"])
    model.graph.node.append(bad)
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    good, bad_info = fo.list_stacks(path)
    assert good["loadable"] and good["name"] == "lstm" and good["hidden_size"] == 4
    assert (bad_info["name"], bad_info["loadable"]) == ("bad", False)
    assert "unknown activation 'Gelu'" in bad_info["problem"]
    x = np.random.default_rng(49).standard_normal((5, 2, 3)).astype(np.float32)
    single, _ = make_lstm(3, 4, states=False, seed=48)
    want = ort_run(single, {"X": x})
    check(fo.load_onnx(path, "lstm")(x), want, True)
    assert_close(fastlstm.load(path, "lstm")(x)[0], want[0][:, 0], np.float32)
    stacks = dict(fastlstm.list_stacks(path))
    assert set(stacks) == {"lstm", "bad"} and "Gelu" in stacks["bad"]["problem"]
    for load in (fo.load_onnx, fo.load_stack, fastlstm.load):
        with pytest.raises(fastlstm.FormatError, match="Gelu"):
            load(path, "bad")
    with pytest.raises(fastlstm.FormatError, match="pass name="):
        fo.load_onnx(path)


# ------------------------------------------------------------ sniffing, registry
def test_sniff():
    model, _ = make_lstm(3, 4)
    data = model.SerializeToString()
    assert fo.sniff(data[:16])
    assert not fo.sniff(b"PK\x03\x04" + bytes(12))              # zip (torch.save)
    assert not fo.sniff((264).to_bytes(8, "little") + b'{"a":1}')  # safetensors
    assert not fo.sniff(b"\x89HDF\r\n\x1a\n")
    assert not fo.sniff(b"")
    assert fo.sniff(data[:3] + b"\xff" * 5) is False


def test_fastlstm_load_and_list_stacks(tmp_path):
    torch = pytest.importorskip("torch")
    io = pytest.importorskip("fastlstm.io")
    if not hasattr(io, "register_format") or "onnx" not in io.formats():
        pytest.skip("fastlstm.io has no format registry with onnx")
    torch.manual_seed(2)
    mod = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True).eval()
    x = np.random.default_rng(28).standard_normal((3, 4, 5)).astype(np.float32)
    path = _torch_export(tmp_path, mod, x)
    assert io.detect_format(path) == "onnx"
    ((name, info),) = fastlstm.list_stacks(path)
    assert (info["format"], info["num_layers"], info["bidirectional"]) == ("onnx", 2, True)
    assert (info["input_size"], info["hidden_size"], info["variant"]) == (5, 7, "standard")
    m = fastlstm.load(path)
    assert (m.num_layers, m.batch_first) == (2, True)
    assert fastlstm.load(path, name, dtype=np.float64, batch_first=False).dtype == np.float64
    with torch.no_grad():
        t_out = mod(torch.from_numpy(x))[0].numpy()
    assert_close(m(x)[0], t_out, np.float32)
    # a reverse-only node has no torch.nn.LSTM equivalent
    model, _ = make_lstm(3, 4, "reverse")
    rpath = tmp_path / "rev.onnx"
    onnx.save(model, str(rpath))
    ((_, rinfo),) = fastlstm.list_stacks(rpath)
    assert "reverse" in rinfo["variant"]
    with pytest.raises(fastlstm.FormatError, match="load_onnx"):
        fastlstm.load(rpath)
    with pytest.raises(TypeError, match="activations"):
        fastlstm.load(path, activations=("relu", "tanh", "tanh"))


# ------------------------------------------------------------ malformed input
def _load_and_run(data):
    """Load (list_stacks, load_onnx) and, if that works, run the node once
    (every listed node, when the file has several)."""
    try:
        listed = fo.list_stacks(data)
    except fastlstm.FormatError:
        listed = []
    for name in [i["name"] for i in listed] if len(listed) > 1 else [None]:
        node = fo.load_onnx(data, name)
        x = np.zeros((2, 1, node.input_size), np.float32)
        node(x if node.layout == 0 else x.transpose(1, 0, 2))


def _loads(data):
    try:
        _load_and_run(data)
        return True
    except fastlstm.FormatError:
        return False


def test_truncated_files_raise_format_error():
    model, _ = make_lstm(3, 4, "bidirectional", peep=True, seed=29)
    data = model.SerializeToString()
    assert _loads(data)
    loaded = [_loads(data[:cut]) for cut in range(len(data))]
    # a cut at a field boundary after the graph (opset_import) still loads
    assert sum(loaded) < 0.05 * len(data)
    graph_end = data.index(b"\x42", len(data) - 8)   # opset_import comes last
    assert not any(loaded[:graph_end])


def test_fuzzed_files_raise_only_format_error():
    rng = np.random.default_rng(1234 + SEED)
    seeds = []
    for enc, weights in (("raw", "init"), ("typed", "constant"), ("typed", "identity")):
        m, _ = make_lstm(3, 4, "bidirectional", peep=True, activations=["HardSigmoid", "Tanh",
                         "Elu"] * 2, alpha=[0.3, 0.9], clip=2.0, encoding=enc, weights=weights)
        seeds.append(m.SerializeToString())
    seeds.append(_loop_model(3, 4, 2)[0].SerializeToString())  # LSTMs in Loop and If bodies
    n = iters(1000)
    with Fuzzer() as fz:
        for k in range(n):
            base = seeds[k % len(seeds)]
            kind = k % 3
            if kind == 0:
                data = flip_bytes(rng, base)
            elif kind == 1:
                data = truncate(rng, base)
            else:  # insert or delete a few bytes (shifts every later field)
                data = bytearray(base)
                pos = int(rng.integers(0, len(data)))
                if rng.integers(0, 2):
                    del data[pos:pos + int(rng.integers(1, 8))]
                else:
                    data[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 8)),
                                                       np.uint8))
                data = bytes(data)
            fz.attempt(lambda: _load_and_run(data), len(data), f"mutation {k}")
        for k in range(200):
            data = bytes(rng.integers(0, 256, int(rng.integers(0, 200)), np.uint8))
            fz.attempt(lambda: _load_and_run(data), len(data), f"random bytes {k}")
    assert fz.outcomes["ok"] > 0 and fz.outcomes["FormatError"] > n // 2


def _pb(field, payload):
    """One length-delimited protobuf field."""
    n, out = len(payload), bytearray([(field << 3) | 2])
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out) + payload


def test_memory_stays_bounded_by_file_size():
    # many tiny nodes, initializers and graph inputs: the graph's index keeps
    # no Python object per entry, so memory is a small multiple of the file
    import tracemalloc
    k = 2000
    parts = []
    for i in range(k):
        parts.append(_pb(1, _pb(1, b"i%d" % i) + _pb(2, b"o%d" % i) + _pb(4, b"Relu")))
        parts.append(_pb(5, b"\x10\x01" + _pb(8, b"t%d" % i)))   # empty float tensor
        parts.append(_pb(11, _pb(1, b"g%d" % i)))
    parts.append(_pb(1, _pb(1, b"X") + _pb(1, b"o5") + _pb(1, b"t7") + _pb(4, b"LSTM")))
    data = b"\x08\x08" + _pb(7, b"".join(parts))
    with pytest.raises(fastlstm.FormatError, match="'o5' is computed at run time by Relu"):
        fo.load_onnx(data)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        (info,) = fo.list_stacks(data)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert not info["loadable"]
    assert peak < 8 * len(data) + 65536, f"{peak} bytes for a {len(data)}-byte file"


def test_hostile_sizes_do_not_allocate():
    # a tensor claiming 2**40 floats with 4 bytes of data
    t = helper.make_tensor("w_W", TensorProto.FLOAT, [1, 4, 1], [0.0, 0.0, 0.0, 0.0])
    model, _ = make_lstm(1, 1, seed=30)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.name == "w_W":
            init.CopyFrom(t)
            del init.dims[:]
            init.dims.extend([1, 4 * 2 ** 20, 2 ** 20])
    with pytest.raises(fastlstm.FormatError, match="w_W"):
        fo.load_onnx(m.SerializeToString())
    # a length prefix far beyond the end of the file
    with pytest.raises(fastlstm.FormatError):
        fo.load_onnx(b"\x08\x08\x3a\xff\xff\xff\xff\x0f" + bytes(8))


# ------------------------------------------------------------- subgraphs
def _loop_model(In, H, steps, seed=60):
    """Main graph: X (T, N, In), h0, c0; a Loop of `steps` iterations whose
    body runs LSTM 'body_lstm' on the outer X (its W, R from the main
    graph's initializers, B from a Constant in the body) from the carried
    state, and an If whose branches hold one LSTM each (weights local to
    each branch), fed the Loop's final state."""
    rng = np.random.default_rng(seed)
    f = TensorProto.FLOAT

    def w(*shape):
        return rng.uniform(-0.4, 0.4, shape).astype(np.float32)

    W, R, B = w(1, 4 * H, In), w(1, 4 * H, H), w(1, 8 * H)
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["B_body"], value=numpy_helper.from_array(B, "Bt")),
         helper.make_node("LSTM", ["X", "W", "R", "B_body", "", "h_in", "c_in"],
                          ["", "h_out_", "c_out_"], hidden_size=H, name="body_lstm"),
         helper.make_node("Squeeze", ["h_out_", "ax0"], ["h_sq"]),
         helper.make_node("Unsqueeze", ["h_sq", "ax0"], ["h_out"]),
         helper.make_node("Identity", ["c_out_"], ["c_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", f, [1, None, H]),
         helper.make_tensor_value_info("c_in", f, [1, None, H])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", f, [1, None, H]),
         helper.make_tensor_value_info("c_out", f, [1, None, H])])

    def branch(name, seed_w):
        Wb, Rb = w(1, 4 * H, H), w(1, 4 * H, H)
        return helper.make_graph(
            [helper.make_node("LSTM", ["h_seq", "Wb_" + name, "Rb_" + name], ["y_" + name],
                              hidden_size=H, name="lstm")],
            name, [], [helper.make_tensor_value_info("y_" + name, f, [None, 1, None, H])],
            initializer=[numpy_helper.from_array(Wb, "Wb_" + name),
                         numpy_helper.from_array(Rb, "Rb_" + name)]), (Wb, Rb)

    then_g, then_w = branch("then", 1)
    else_g, else_w = branch("else", 2)
    nodes = [
        helper.make_node("Loop", ["M", "", "h0", "c0"], ["h_fin", "c_fin"], body=body,
                         name="steps"),
        helper.make_node("Identity", ["h_fin"], ["h_seq"]),  # (1, N, H): a 1-step sequence
        helper.make_node("If", ["flag"], ["y_if"], then_branch=then_g, else_branch=else_g),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((W, "W"), (R, "R"), (np.array(steps, np.int64), "M"),
              (np.array([0], np.int64), "ax0"))]
    graph = helper.make_graph(
        nodes, "main",
        [helper.make_tensor_value_info("X", f, [None, None, In]),
         helper.make_tensor_value_info("h0", f, [1, None, H]),
         helper.make_tensor_value_info("c0", f, [1, None, H]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("h_fin", f, [1, None, H]),
         helper.make_tensor_value_info("c_fin", f, [1, None, H]),
         helper.make_tensor_value_info("y_if", f, [None, 1, None, H])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, (W, R, B), then_w, else_w


def test_lstm_nodes_inside_loop_and_if_bodies():
    In, H, T, N, steps = 3, 5, 4, 2, 3
    model, _, _, _ = _loop_model(In, H, steps)
    buf = model.SerializeToString()
    names = [i["name"] for i in fo.list_stacks(buf)]
    # (in the file's order: onnx.helper writes attributes sorted by name)
    assert names == ["steps/body/body_lstm", "If_2/else_branch/lstm", "If_2/then_branch/lstm"]
    assert all(i["loadable"] for i in fo.list_stacks(buf))
    rng = np.random.default_rng(61)
    X = rng.standard_normal((T, N, In)).astype(np.float32)
    h0 = rng.standard_normal((1, N, H)).astype(np.float32)
    c0 = rng.standard_normal((1, N, H)).astype(np.float32)
    node = fo.load_onnx(buf, "steps/body/body_lstm")  # W, R from the main graph, B from the body
    h, c = h0, c0
    for _ in range(steps):  # what the Loop does: the body's LSTM from the carried state
        _, h, c = node(X, h, c)
    for flag, branch in ((True, "then_branch"), (False, "else_branch")):
        h_fin, c_fin, y_if = ort_run(model, {"X": X, "h0": h0, "c0": c0,
                                             "flag": np.array(flag)})
        assert_close(h, h_fin, np.float32, "Loop h")
        assert_close(c, c_fin, np.float32, "Loop c")
        y, _, _ = fo.load_onnx(buf, f"If_2/{branch}/lstm")(h_fin)
        assert_close(y, y_if, np.float32, f"If {branch}")
    # a nested node loads as a stack too (fastlstm.load / load_stack)
    m = fo.load_stack(buf, "steps/body/body_lstm")
    out, (hn, cn) = m(X, (h0, c0))
    _, want_h, want_c = node(X, h0, c0)
    assert_close(hn, want_h, np.float32, "stack h")


def test_subgraph_inputs_are_run_time_values_and_depth_is_bounded():
    In, H = 3, 4
    model, _, _, _ = _loop_model(In, H, 2)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    body = m.graph.node[0].attribute[0].g
    for n in body.node:
        if n.op_type == "LSTM":
            n.input[2] = "h_in"  # R: the body's loop-carried input, a run-time value
    info = {i["name"]: i for i in fo.list_stacks(m.SerializeToString())}
    assert not info["steps/body/body_lstm"]["loadable"]
    assert "graph input without an initializer" in info["steps/body/body_lstm"]["problem"]
    # If nodes nested 20 deep, an LSTM at the bottom: not searched past 16 levels
    f = TensorProto.FLOAT
    rng = np.random.default_rng(62)
    inner = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=H, name="deep")], "g0", [],
        [helper.make_tensor_value_info("y", f, [None, 1, None, H])],
        initializer=[numpy_helper.from_array(rng.uniform(-1, 1, (1, 4 * H, In)).astype(
            np.float32), "W"), numpy_helper.from_array(rng.uniform(-1, 1, (1, 4 * H, H)).astype(
                np.float32), "R")])
    empty = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "e", [],
                              [helper.make_tensor_value_info("y", f, [None, 1, None, H])])
    for depth in range(1, 21):
        node = helper.make_node("If", ["flag"], ["y"], then_branch=inner, else_branch=empty,
                                name=f"if{depth}")
        g = helper.make_graph([node], f"g{depth}", [],
                              [helper.make_tensor_value_info("y", f, [None, 1, None, H])])
        if depth == 3:
            shallow = g
        inner = g
    for top, found in ((shallow, 1), (inner, 0)):
        main = helper.make_graph(list(top.node), "main",
                                 [helper.make_tensor_value_info("x", f, [None, None, In]),
                                  helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                                 [helper.make_tensor_value_info("y", f, None)])
        mm = helper.make_model(main, opset_imports=[helper.make_opsetid("", 17)])
        listed = fo.list_stacks(mm.SerializeToString())
        assert len(listed) == found and all(i["loadable"] for i in listed)

"""Never crash, never trust the caller: bad calls raise documented errors,
odd but valid inputs give the reference's results, non-finite values
propagate like the float64 reference.

Every bad call in the tables raises a fastlstm error (ShapeError is also a
ValueError, DTypeError also a TypeError) whose message names the argument
and, for shape errors, the shape that was expected.
"""
import warnings

import numpy as np
import pytest

import fastlstm
from fastlstm import DTypeError, FastLSTMError, ShapeError
from fastlstm.model import ACTIVATIONS
from tolerances import TOL, assert_lstm_close, max_rel_err

F32 = np.float32
INT_MAX = 2 ** 31 - 1


def _huge(shape, dtype=F32):
    """A read-only view of `shape` backed by one row of zeros (no memory)."""
    return np.broadcast_to(np.zeros(shape[-1:], dtype), shape)


def _model(**kw):
    """The model most rows of the tables call: In=5, H=4, 2 layers -> LD=2."""
    args = dict(input_size=5, hidden_size=4, num_layers=2, seed=0)
    args.update(kw)
    return fastlstm.LSTM(**args)


X = np.zeros((3, 2, 5), F32)      # T=3, N=2
H0 = np.zeros((2, 2, 4), F32)     # (LD, N, H)

# (id, model kwargs, call kwargs, error class, regex the message must match)
BAD_CALLS = [
    # ---- x: number of dimensions and sizes
    ("x_4d", {}, dict(x=np.zeros((1, 3, 2, 5), F32)), ShapeError,
     r"^x: expected a 2-D \(unbatched\) or 3-D array of shape \(T, 5\) unbatched or \(T, N, 5\), "
     r"got 4-D with shape \(1, 3, 2, 5\)"),
    ("x_1d", {}, dict(x=np.zeros(5, F32)), ShapeError, r"^x: expected a 2-D .*\(T, N, 5\).*got 1-D"),
    ("x_python_scalar", {}, dict(x=3.0), ShapeError, r"^x: expected a 2-D .*\(T, N, 5\).*got 0-D"),
    ("x_numpy_scalar", {}, dict(x=np.float32(1)), ShapeError, r"^x: expected a 2-D .*got 0-D"),
    ("x_features", {}, dict(x=np.zeros((3, 2, 6), F32)), ShapeError,
     r"^x: expected input_size 5 in the last dimension, shape .*\(T, N, 5\), got shape \(3, 2, 6\)"),
    ("x_features_unbatched", {}, dict(x=np.zeros((3, 4), F32)), ShapeError,
     r"^x: expected input_size 5 .*\(T, 5\) unbatched.*got shape \(3, 4\)"),
    ("x_features_batch_first", {"batch_first": True}, dict(x=np.zeros((2, 3, 4), F32)), ShapeError,
     r"^x: expected input_size 5 .*\(N, T, 5\), got shape \(2, 3, 4\)"),
    ("x_list_features", {}, dict(x=[[[0.0] * 4] * 2] * 3), ShapeError,
     r"^x: expected input_size 5 .*got shape \(3, 2, 4\)"),
    ("x_empty_list", {}, dict(x=[]), ShapeError, r"^x: expected a 2-D .*got 1-D with shape \(0,\)"),
    # ---- x: T or N beyond the engine's int, sizes whose products overflow
    ("x_T_over_int", {}, dict(x=_huge((INT_MAX + 1, 1, 5))), ShapeError,
     r"^x: T and N must each be below 2\*\*31 - 1, got T=2147483648, N=1 .*\(T, N, 5\)"),
    ("x_T_int_max", {}, dict(x=_huge((INT_MAX, 5))), ShapeError,
     r"^x: T and N must each be below 2\*\*31 - 1, got T=2147483647"),
    ("x_N_over_int", {}, dict(x=_huge((1, INT_MAX + 1, 5))), ShapeError,
     r"^x: T and N must each be below 2\*\*31 - 1, got T=1, N=2147483648"),
    ("x_N_over_int_batch_first", {"batch_first": True}, dict(x=_huge((2 ** 32, 1, 5))), ShapeError,
     r"^x: T and N must each be below .*N=4294967296 .*\(N, T, 5\)"),
    ("x_T_times_N_overflows", {}, dict(x=_huge((2 ** 28, 2 ** 28, 5))), ShapeError,
     r"^x: shape \(268435456, 268435456, 5\) too large"),
    ("x_T_times_N_overflows_f64", {"dtype": np.float64, "hidden_size": 2 ** 10, "num_layers": 1},
     dict(x=_huge((2 ** 26, 2 ** 24, 5), np.float64)), ShapeError, r"^x: shape .* too large"),
    # ---- x: dtypes
    ("x_object", {}, dict(x=np.zeros((3, 2, 5), object)), DTypeError,
     r"^x: expected a real numeric array \(float or int\), got dtype object"),
    ("x_str", {}, dict(x=np.full((3, 2, 5), "a")), DTypeError, r"^x: expected a real numeric.*<U1"),
    ("x_python_str", {}, dict(x="abc"), DTypeError, r"^x: expected a real numeric"),
    ("x_bytes", {}, dict(x=b"abc"), DTypeError, r"^x: expected a real numeric.*S3"),
    ("x_none", {}, dict(x=None), DTypeError, r"^x: expected a real numeric.*object"),
    ("x_dict", {}, dict(x={"a": 1}), DTypeError, r"^x: expected a real numeric"),
    ("x_bool", {}, dict(x=np.zeros((3, 2, 5), bool)), DTypeError, r"^x: expected a real numeric.*bool"),
    ("x_complex", {}, dict(x=np.zeros((3, 2, 5), complex)), DTypeError, r"^x: .*complex128"),
    ("x_datetime", {}, dict(x=np.zeros((3, 2, 5), "M8[s]")), DTypeError, r"^x: .*datetime64"),
    ("x_timedelta", {}, dict(x=np.zeros((3, 2, 5), "m8[s]")), DTypeError, r"^x: .*timedelta64"),
    ("x_structured", {}, dict(x=np.zeros((3, 2, 5), [("a", F32)])), DTypeError, r"^x: expected a real"),
    ("x_void", {}, dict(x=np.zeros((3, 2, 5), "V4")), DTypeError, r"^x: expected a real"),
    ("x_ragged_list", {}, dict(x=[[[0.0] * 5], [[0.0] * 5, [0.0] * 5]]), DTypeError,
     r"^x: cannot be converted to a numeric array"),
    ("x_list_of_str", {}, dict(x=[["a"] * 5] * 3), DTypeError, r"^x: expected a real numeric"),
    # ---- hx: structure, shapes, dtypes
    ("hx_array", {}, dict(hx=H0), ShapeError,
     r"^hx: expected a tuple \(h_0, c_0\) of shapes \(2, 2, 4\) and \(2, 2, 4\), or None, got ndarray"),
    ("hx_one", {}, dict(hx=(H0,)), ShapeError, r"^hx: expected a tuple .*got tuple of length 1"),
    ("hx_three", {}, dict(hx=[H0, H0, H0]), ShapeError, r"^hx: expected a tuple .*got list of length 3"),
    ("hx_str", {}, dict(hx="ab"), ShapeError, r"^hx: expected a tuple .*\(2, 2, 4\).*got str"),
    ("hx_int", {}, dict(hx=5), ShapeError, r"^hx: expected a tuple .*got int"),
    ("hx_dict", {}, dict(hx={"h": H0, "c": H0}), ShapeError, r"^hx: expected a tuple .*got dict"),
    ("h0_layers", {}, dict(hx=(np.zeros((1, 2, 4)), H0)), ShapeError,
     r"^hx\[0\] \(h_0\): expected shape \(2, 2, 4\), got \(1, 2, 4\)"),
    ("h0_batch", {}, dict(hx=(np.zeros((2, 3, 4)), H0)), ShapeError,
     r"^hx\[0\] \(h_0\): expected shape \(2, 2, 4\), got \(2, 3, 4\)"),
    ("c0_hidden", {}, dict(hx=(H0, np.zeros((2, 2, 5)))), ShapeError,
     r"^hx\[1\] \(c_0\): expected shape \(2, 2, 4\), got \(2, 2, 5\)"),
    ("h0_2d_for_batched", {}, dict(hx=(np.zeros((2, 4)), np.zeros((2, 4)))), ShapeError,
     r"^hx\[0\] \(h_0\): expected shape \(2, 2, 4\), got \(2, 4\)"),
    ("h0_3d_for_unbatched", {}, dict(x=np.zeros((3, 5), F32), hx=(np.zeros((2, 1, 4)), np.zeros((2, 4)))),
     ShapeError, r"^hx\[0\] \(h_0\): expected shape \(2, 4\), got \(2, 1, 4\)"),
    ("h0_proj", {"proj_size": 3, "bidirectional": True}, dict(hx=(np.zeros((4, 2, 4)), np.zeros((4, 2, 4)))),
     ShapeError, r"^hx\[0\] \(h_0\): expected shape \(4, 2, 3\), got \(4, 2, 4\)"),
    ("c0_proj", {"proj_size": 3, "bidirectional": True}, dict(hx=(np.zeros((4, 2, 3)), np.zeros((4, 2, 3)))),
     ShapeError, r"^hx\[1\] \(c_0\): expected shape \(4, 2, 4\), got \(4, 2, 3\)"),
    ("h0_none", {}, dict(hx=(None, H0)), DTypeError, r"^hx\[0\] \(h_0\): expected a real numeric.*object"),
    ("c0_none", {}, dict(hx=(H0, None)), DTypeError, r"^hx\[1\] \(c_0\): expected a real numeric"),
    ("h0_object", {}, dict(hx=(H0.astype(object), H0)), DTypeError, r"^hx\[0\] \(h_0\): .*object"),
    ("c0_str", {}, dict(hx=(H0, H0.astype(str))), DTypeError, r"^hx\[1\] \(c_0\): .*<U"),
    ("h0_bool", {}, dict(hx=(H0.astype(bool), H0)), DTypeError, r"^hx\[0\] \(h_0\): .*bool"),
    ("c0_complex", {}, dict(hx=(H0, H0.astype(complex))), DTypeError, r"^hx\[1\] \(c_0\): .*complex"),
    ("h0_ragged", {}, dict(hx=([[1.0], [1.0, 2.0]], H0)), DTypeError, r"^hx\[0\] \(h_0\): cannot be converted"),
    # ---- lengths: count, range, dtype
    ("lengths_count", {}, dict(lengths=[1, 2, 3]), ShapeError,
     r"^lengths: expected shape \(2,\), one per sequence, got shape \(3,\)"),
    ("lengths_scalar_batched", {}, dict(lengths=3), ShapeError, r"^lengths: expected shape \(2,\).*got shape \(\)"),
    ("lengths_2d", {}, dict(lengths=[[1, 2]]), ShapeError, r"^lengths: expected shape \(2,\).*\(1, 2\)"),
    ("lengths_unbatched", {}, dict(x=np.zeros((3, 5), F32), lengths=[1, 2]), ShapeError,
     r"^lengths: expected one int \(unbatched input\), got shape \(2,\)"),
    ("lengths_over_T", {}, dict(lengths=[1, 4]), ShapeError,
     r"^lengths: values must be in \[0, T=3\], got min 1 and max 4"),
    ("lengths_negative", {}, dict(lengths=[-1, 2]), ShapeError, r"^lengths: values must be in \[0, T=3\]"),
    ("lengths_int32_wrap", {}, dict(lengths=np.array([2 ** 32 + 1, 1], np.int64)), ShapeError,
     r"^lengths: values must be in \[0, T=3\]"),
    ("lengths_uint64_max", {}, dict(lengths=np.array([2 ** 64 - 1, 1], np.uint64)), ShapeError,
     r"^lengths: values must be in \[0, T=3\]"),
    ("lengths_unbatched_over_T", {}, dict(x=np.zeros((3, 5), F32), lengths=7), ShapeError,
     r"^lengths: values must be in \[0, T=3\]"),
    ("lengths_float", {}, dict(lengths=[1.0, 2.0]), DTypeError, r"^lengths: expected integers, got dtype float64"),
    ("lengths_bool", {}, dict(lengths=[True, False]), DTypeError, r"^lengths: expected integers, got dtype bool"),
    ("lengths_str", {}, dict(lengths=["1", "2"]), DTypeError, r"^lengths: expected integers"),
    ("lengths_object", {}, dict(lengths=np.array([1, None], object)), DTypeError, r"^lengths: expected integers"),
    ("lengths_ragged", {}, dict(lengths=[[1], [1, 2]]), DTypeError, r"^lengths: cannot be converted"),
    ("lengths_T0_nonzero", {}, dict(x=np.zeros((0, 2, 5), F32), lengths=[0, 1]), ShapeError,
     r"^lengths: values must be in \[0, T=0\]"),
]


@pytest.mark.parametrize("model_kw, call, exc, words",
                         [pytest.param(*row[1:], id=row[0]) for row in BAD_CALLS])
def test_bad_call_raises_documented_error(model_kw, call, exc, words):
    m = _model(**model_kw)
    call = dict(call)
    x = call.pop("x", X)
    with pytest.raises(exc, match=words) as info:
        m(x, **call)
    err = info.value
    assert isinstance(err, FastLSTMError)
    if isinstance(err, ShapeError):
        assert isinstance(err, ValueError)
    if isinstance(err, DTypeError):
        assert isinstance(err, TypeError)
    # The model is still usable after a refused call.
    assert_lstm_close(m(X), m.reference(X), F32, "after a refused call")


# Arguments that are not arrays: refused like torch.nn.LSTM (ValueError or
# TypeError; the size checks with the engine's limits are ShapeErrors).
BAD_CONSTRUCTIONS = [
    ("sizes_2_24", dict(input_size=2 ** 24, hidden_size=4), ShapeError,
     r"^sizes too large: input_size, hidden_size, proj_size = \(16777216, 4, 0\).*expected each size < 2\*\*24"),
    ("hidden_2_31", dict(input_size=4, hidden_size=2 ** 31), ShapeError, r"^sizes too large"),
    ("input_2_63", dict(input_size=2 ** 63, hidden_size=4), ShapeError, r"^sizes too large"),
    ("product_2_40", dict(input_size=2 ** 23, hidden_size=2 ** 23 - 1), ShapeError,
     r"^sizes too large.*4\*hidden_size\*max\(input_size, hidden_size\) < 2\*\*40"),
    ("layers_over_int", dict(input_size=1, hidden_size=1, num_layers=2 ** 31), ShapeError,
     r"^sizes too large.*num_layers = 2147483648"),
    ("layers_times_dirs_over_int", dict(input_size=1, hidden_size=1, num_layers=2 ** 30, bidirectional=True),
     ShapeError, r"num_layers\*num_directions < 2\*\*31"),
    ("hidden_0", dict(input_size=3, hidden_size=0), ValueError, r"^hidden_size: expected an int >= 1, got 0"),
    ("input_negative", dict(input_size=-1, hidden_size=3), ValueError, r"^input_size: expected an int >= 0"),
    ("layers_0", dict(input_size=3, hidden_size=3, num_layers=0), ValueError, r"^num_layers: expected an int >= 1"),
    ("proj_negative", dict(input_size=3, hidden_size=3, proj_size=-1), ValueError, r"^proj_size: expected an int >= 0"),
    ("proj_too_big", dict(input_size=3, hidden_size=3, proj_size=3), ValueError, r"^proj_size: must be smaller"),
    ("input_float", dict(input_size=3.0, hidden_size=3), TypeError, r"^input_size: expected an int, got float"),
    ("hidden_str", dict(input_size=3, hidden_size="3"), TypeError, r"^hidden_size: expected an int, got str"),
    ("hidden_bool", dict(input_size=3, hidden_size=True), TypeError, r"^hidden_size: expected an int, got bool"),
    ("dropout_nan", dict(input_size=3, hidden_size=3, dropout=float("nan")), ValueError, r"^dropout: expected"),
    ("clip_nan", dict(input_size=3, hidden_size=3, clip=float("nan")), ValueError, r"^clip: expected a finite"),
    ("cell_clip_inf", dict(input_size=3, hidden_size=3, cell_clip=float("inf")), ValueError, r"^cell_clip:"),
    ("clip_negative", dict(input_size=3, hidden_size=3, clip=-1.0), ValueError, r"^clip:"),
    ("dtype_float16", dict(input_size=3, hidden_size=3, dtype=np.float16), DTypeError,
     r"^dtype: expected float32 or float64, got float16"),
    ("dtype_object", dict(input_size=3, hidden_size=3, dtype=object), DTypeError, r"^dtype: expected float32"),
    ("dtype_garbage", dict(input_size=3, hidden_size=3, dtype="nope"), DTypeError, r"^dtype: expected float32"),
    ("activations_two", dict(input_size=3, hidden_size=3, activations=("tanh", "tanh")), ValueError,
     r"^activations: expected 3 names"),
    ("activations_unknown", dict(input_size=3, hidden_size=3, activations=("tanh", "tanh", "gelu")),
     ValueError, r"^activations: unknown activation 'gelu'"),
    ("alpha_two", dict(input_size=3, hidden_size=3, activation_alpha=(1.0, 2.0)), ValueError,
     r"^activation_alpha: expected 3 values"),
]


@pytest.mark.parametrize("kw, exc, words", [pytest.param(*row[1:], id=row[0]) for row in BAD_CONSTRUCTIONS])
def test_bad_construction_raises(kw, exc, words):
    with pytest.raises(exc, match=words):
        fastlstm.LSTM(**kw)


@pytest.mark.parametrize("nt, exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError), ("2", TypeError),
                                     (True, TypeError)])
def test_bad_num_threads(nt, exc):
    m = _model()
    with pytest.raises(exc, match="^num_threads: expected an int"):
        m(X, num_threads=nt)


def test_huge_num_threads_is_clamped():
    m = _model()
    want = m(X, num_threads=1)
    for nt in (10 ** 6, INT_MAX, 2 ** 40):
        got = m(X, num_threads=nt)
        np.testing.assert_array_equal(got[0], want[0])


# ------------------------------------------------------------ zero sizes
# N = 0: torch 2.13 returns empty outputs and empty states; so do we.
# T = 0: torch 2.13 raises ("Expected sequence length to be larger than 0");
# fastlstm defines it: out is empty and (h_n, c_n) = (h_0, c_0), zeros
# without hx (no step was taken).  input_size = 0, which torch refuses, is
# allowed: the gates see only the bias and h_{t-1}.
ZERO_CFGS = [dict(), dict(num_layers=2, bidirectional=True), dict(num_layers=2, proj_size=2),
             dict(batch_first=True), dict(dtype=np.float64, bidirectional=True)]


@pytest.mark.parametrize("cfg", ZERO_CFGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_zero_batch_matches_torch_shapes(cfg):
    m = fastlstm.LSTM(3, 4, seed=0, **cfg)
    D, L = m.num_directions, m.num_layers
    x = np.zeros((0, 5, 3) if m.batch_first else (5, 0, 3), m.dtype)
    out, (h, c) = m(x)
    assert out.shape == x.shape[:2] + (D * m.output_size,) and out.dtype == m.dtype
    assert h.shape == (L * D, 0, m.output_size) and c.shape == (L * D, 0, 4)
    out2, _ = m(x, (np.zeros((L * D, 0, m.output_size)), np.zeros((L * D, 0, 4))), lengths=np.zeros(0, int))
    assert out2.shape == out.shape
    torch = pytest.importorskip("torch")
    tm = torch.nn.LSTM(3, 4, **{k: v for k, v in cfg.items() if k != "dtype"})
    with torch.no_grad():
        tout, (th, tc) = tm(torch.zeros(x.shape))
    assert tuple(tout.shape) == out.shape and tuple(th.shape) == h.shape and tuple(tc.shape) == c.shape


@pytest.mark.parametrize("cfg", ZERO_CFGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_zero_steps_returns_initial_state(cfg):
    m = fastlstm.LSTM(3, 4, seed=0, **cfg)
    LD, P = m.num_layers * m.num_directions, m.output_size
    x = np.zeros((2, 0, 3) if m.batch_first else (0, 2, 3), m.dtype)
    out, (h, c) = m(x)
    assert out.shape == x.shape[:2] + (m.num_directions * P,)
    assert h.shape == (LD, 2, P) and not h.any() and c.shape == (LD, 2, 4) and not c.any()
    rng = np.random.default_rng(0)
    h0, c0 = rng.standard_normal((LD, 2, P)), rng.standard_normal((LD, 2, 4))
    out, (h, c) = m(x, (h0, c0), lengths=[0, 0])
    np.testing.assert_array_equal(h, h0.astype(m.dtype))
    np.testing.assert_array_equal(c, c0.astype(m.dtype))
    ro, (rh, rc) = m.reference(x, (h0, c0))
    assert ro.shape == out.shape
    np.testing.assert_array_equal(rh.astype(m.dtype), h)
    # Unbatched, and T = N = 0.
    out, (h, c) = m(np.zeros((0, 3), m.dtype))
    assert out.shape == (0, m.num_directions * P) and h.shape == (LD, P) and not h.any()
    out, (h, c) = m(np.zeros((0, 0, 3), m.dtype))
    assert out.shape == (0, 0, m.num_directions * P) and h.shape == (LD, 0, P)


def test_torch_refuses_zero_steps():
    """Documents why T = 0 is ours to define (see the comment above)."""
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError, match="sequence length"):
        torch.nn.LSTM(3, 4)(torch.zeros(0, 2, 3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_input_size(dtype):
    m = fastlstm.LSTM(0, 5, num_layers=2, bidirectional=True, dtype=dtype, seed=1)
    x = np.zeros((4, 3, 0), dtype)
    assert_lstm_close(m(x), m.reference(x), dtype, "input_size=0")
    assert_lstm_close(m(x, lengths=[4, 0, 2]), _ref_with_lengths(m, x, [4, 0, 2]), dtype)


def _ref_with_lengths(m, x, lengths):
    """Reference for lengths: run each sequence alone on its valid prefix."""
    D, P = m.num_directions, m.output_size
    out = np.zeros(x.shape[:2] + (D * P,))
    hs, cs = [], []
    for n, L in enumerate(lengths):
        o, (h, c) = m.reference(x[:L, n:n + 1])
        out[:L, n] = o[:, 0]
        hs.append(h)
        cs.append(c)
    return out, (np.concatenate(hs, axis=1), np.concatenate(cs, axis=1))


# --------------------------------------------- layouts: read-only, strided
def _layouts(base):
    """(name, array equal to base) for memory layouts the engine must read."""
    T, N, In = base.shape
    ro = base.copy()
    ro.flags.writeable = False
    big = np.zeros((2 * T, N, 3 * In), base.dtype)
    big[::2, :, ::3] = base
    rev = np.ascontiguousarray(base[::-1, ::-1])[::-1, ::-1]  # negative strides
    buf = np.zeros(base.nbytes + 1, np.uint8)                  # misaligned data pointer
    unaligned = buf[1:].view(base.dtype).reshape(base.shape)
    unaligned[...] = base
    bcast_src = base[:, :1]                                    # zero stride on the batch axis
    bcast = np.broadcast_to(bcast_src, base.shape)
    swapped = base.astype(base.dtype.newbyteorder(">"))
    return [("readonly", ro, base), ("strided", big[::2, :, ::3], base),
            ("fortran", np.asfortranarray(base), base), ("negative_strides", rev, base),
            ("time_major_view_of_batch_first", np.ascontiguousarray(base.transpose(1, 0, 2)).transpose(1, 0, 2), base),
            ("unaligned", unaligned, base), ("broadcast_batch", bcast, np.ascontiguousarray(bcast)),
            ("big_endian", swapped, base)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_layouts_match_reference(isa, dtype, with_lengths):
    rng = np.random.default_rng(11)
    m = fastlstm.LSTM(6, 20, num_layers=2, bidirectional=True, proj_size=7, dtype=dtype, seed=3)
    base = rng.standard_normal((7, 5, 6)).astype(dtype)
    h0 = rng.standard_normal((4, 5, 7)).astype(dtype)
    c0 = rng.standard_normal((4, 5, 20)).astype(dtype)
    lengths = [7, 3, 0, 5, 7] if with_lengths else None
    for name, x, same in _layouts(base):
        want = m(np.ascontiguousarray(same), (h0, c0), lengths=lengths)
        for hx_name, hx in _layouts_hx(h0, c0):
            got = m(x, hx, lengths=lengths)
            for a, b in zip((got[0],) + got[1], (want[0],) + want[1]):
                np.testing.assert_array_equal(a, b, err_msg=f"{name} x, {hx_name} hx")
        if not with_lengths:
            assert_lstm_close(m(x, (h0, c0)), m.reference(same, (h0, c0)), dtype, name)
    assert base.flags.writeable  # inputs are never written to


def _layouts_hx(h0, c0):
    yield "contiguous", (h0, c0)
    rh, rc = h0.copy(), c0.copy()
    rh.flags.writeable = rc.flags.writeable = False
    yield "readonly", (rh, rc)
    yield "fortran", (np.asfortranarray(h0), np.asfortranarray(c0))
    buf = np.zeros(h0.nbytes + 1, np.uint8)
    uh = buf[1:].view(h0.dtype).reshape(h0.shape)
    uh[...] = h0
    yield "unaligned_h0", (uh, list(c0.tolist()))


def test_inputs_are_not_modified():
    rng = np.random.default_rng(2)
    m = _model(proj_size=3, bidirectional=True)
    x = rng.standard_normal((4, 2, 5)).astype(F32)
    h0, c0 = rng.standard_normal((4, 2, 3)).astype(F32), rng.standard_normal((4, 2, 4)).astype(F32)
    copies = [a.copy() for a in (x, h0, c0)]
    m(x, (h0, c0), lengths=[2, 4])
    m(x, (h0, c0), lengths=np.array([4, 2], np.int64))
    for a, b in zip((x, h0, c0), copies):
        np.testing.assert_array_equal(a, b)


def test_torch_tensor_inputs():
    torch = pytest.importorskip("torch")
    m = _model()
    x = torch.randn(5, 2, 10)[:, :, ::2]  # non-contiguous tensor
    h0 = torch.randn(2, 2, 4)
    assert not x.is_contiguous()
    got = m(x, (h0, torch.zeros(2, 2, 4, dtype=torch.float64)))
    assert_lstm_close(got, m.reference(x.numpy(), (h0.numpy(), np.zeros((2, 2, 4)))), F32)
    got = m(x.to(torch.bfloat16), lengths=torch.tensor([5, 1]))
    assert got[0].dtype == F32


# -------------------------------------------------------- NaN and Inf
def _set_weight(m, key, idx, value):
    w = m.get_weights(0, 0)
    arr = w[key].copy()
    arr[idx] = value
    m.set_weights(0, 0, **{key: arr})


def _assert_like_reference(got, ref, dtype, what):
    """Bitwise agreement on where values are NaN and +-Inf, reference
    tolerance on the finite values (max_rel_err counts a NaN or an Inf on
    one side only as an infinite error)."""
    tol = TOL[np.dtype(dtype)]
    for a, b, name in zip((got[0],) + got[1], (ref[0],) + ref[1], ("out", "h_n", "c_n")):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{what} {name}: NaN positions")
        with np.errstate(invalid="ignore"):
            err = max_rel_err(a, b)
        assert err <= tol, f"{what} {name}: error {err:.3e} > {tol:.0e}"


SPECIALS = [np.nan, np.inf, -np.inf, 1e30, -1e30]
PLACES = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", SPECIALS, ids=str)
@pytest.mark.parametrize("place", PLACES)
def test_non_finite_propagates_like_reference(isa, dtype, value, place):
    rng = np.random.default_rng(4)
    m = fastlstm.LSTM(4, 5, num_layers=2, bidirectional=True, dtype=dtype, seed=2)
    x = rng.standard_normal((6, 3, 4)).astype(dtype)
    h0 = rng.standard_normal((4, 3, 5)).astype(dtype)
    c0 = rng.standard_normal((4, 3, 5)).astype(dtype)
    if place == "x":
        x[2, 1, 0] = value
    elif place == "h0":
        h0[0, 1, 1] = value
    elif place == "c0":
        c0[1, 1, 3] = value
    else:
        _set_weight(m, place, (7, 1) if place.startswith("w_") else 7, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the reference's overflow in exp
        ref = m.reference(x, (h0, c0))
    got = m(x, (h0, c0))
    _assert_like_reference(got, ref, dtype, f"{place}={value}")
    if place in ("x", "h0", "c0") and np.isnan(value):
        assert np.isnan(got[0]).any()  # a NaN is never swallowed by the default cell


@pytest.mark.parametrize("place", ["w_hr", "peephole", "x_projected"])
def test_nan_in_projection_and_peepholes(isa, place):
    rng = np.random.default_rng(5)
    m = fastlstm.LSTM(4, 6, proj_size=3, peepholes=True, bidirectional=True, seed=1)
    m.set_weights(0, 0, peephole=rng.standard_normal((3, 6)))
    x = rng.standard_normal((5, 2, 4)).astype(F32)
    if place == "x_projected":
        x[1, 0, 2] = np.nan
    else:
        _set_weight(m, place, (1, 2), np.nan)
    got = m(x)
    _assert_like_reference(got, m.reference(x), F32, place)
    assert np.isnan(got[0]).any()


def _cell_variants():
    opts_list = []
    for a in sorted(ACTIVATIONS):
        for pos in range(3):
            acts = ["sigmoid", "tanh", "tanh"]
            acts[pos] = a
            opts_list.append(({"activations": tuple(acts)}, f"{a}@{'fgh'[pos]}"))
    for opts in ({"clip": 0.5}, {"cell_clip": 0.7}, {"input_forget": True}, {"peepholes": True}):
        opts_list.append((opts, ",".join(opts)))
    out = []
    for opts, name in opts_list:
        for value in (np.nan, np.inf, -np.inf):
            # thresholdedrelu(NaN) is 0 in the engine, the reference and
            # ONNX Runtime alike (x > alpha is false for NaN).
            out.append(pytest.param(opts, value, id=f"{name}-{value}"))
    return out


@pytest.mark.parametrize("opts, value", _cell_variants())
def test_non_finite_in_cell_variants(opts, value):
    """The generic (scalar) epilogue: NaN/Inf in x or c_0 like the reference."""
    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float64):
        m = fastlstm.LSTM(4, 5, dtype=dtype, seed=2, **opts)
        if opts.get("peepholes"):
            m.set_weights(0, 0, peephole=rng.standard_normal((3, 5)))
        for place in ("x", "c0"):
            x = rng.standard_normal((6, 3, 4)).astype(dtype)
            h0 = rng.standard_normal((1, 3, 5)).astype(dtype)
            c0 = rng.standard_normal((1, 3, 5)).astype(dtype)
            if place == "x":
                x[2, 1, 0] = value
            else:
                c0[0, 1, 1] = value
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ref = m.reference(x, (h0, c0))
            _assert_like_reference(m(x, (h0, c0)), ref, dtype, f"{opts} {place}={value}")


def test_all_nan_long_sequence_terminates():
    """A fully non-finite run finishes (no hang, no crash) with NaN output."""
    m = fastlstm.LSTM(8, 32, num_layers=2, bidirectional=True, seed=0)
    x = np.full((500, 4, 8), np.nan, F32)
    out, (h, c) = m(x)
    assert np.isnan(out).all() and np.isnan(h).all() and np.isnan(c).all()
    sd = {k: np.full_like(v, np.inf) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    out, _ = m(np.ones((50, 4, 8), F32))
    assert out.shape == (50, 4, 64)


def test_nan_past_sequence_end_is_never_read():
    """Steps past lengths[n] are not computed: NaN padding cannot leak."""
    rng = np.random.default_rng(7)
    m = fastlstm.LSTM(3, 6, num_layers=2, bidirectional=True, seed=4)
    x = rng.standard_normal((8, 3, 3)).astype(F32)
    lengths = [8, 5, 2]
    clean = m(x, lengths=lengths)
    for n, L in enumerate(lengths):
        x[L:, n] = np.nan
    dirty = m(x, lengths=lengths)
    for a, b in zip((clean[0],) + clean[1], (dirty[0],) + dirty[1]):
        np.testing.assert_array_equal(a, b)


def test_denormal_and_extreme_finite_inputs():
    """Denormals (flushed to zero inside the kernels) and huge finite
    values saturate the gates; results stay within the reference tolerance."""
    rng = np.random.default_rng(8)
    m = fastlstm.LSTM(4, 9, seed=5)
    for fill in (1e-40, -1e-44, 3e38, -3e38, np.finfo(F32).max):
        x = rng.standard_normal((5, 2, 4)).astype(F32)
        x[1:3] = fill
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = m.reference(x)
        _assert_like_reference(m(x), ref, F32, f"fill={fill}")

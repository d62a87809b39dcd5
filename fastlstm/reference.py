"""A float64 NumPy reference of the LSTM, written straight from the equations.

It shares no code with the C engine or with fastlstm.model: it reads weights
in PyTorch's canonical names (weight_ih_l{k}[_reverse], weight_hh_l{k},
bias_ih_l{k}, bias_hh_l{k}, weight_hr_l{k}) and does its own layout handling.
Used by the tests as the oracle, and by users to check a model.

Per layer and direction, gate order i, f, g, o (Graves 2013 with the ONNX
variants):
    i_t = σ(W_ii x_t + W_hi h_{t-1} + b_i [+ p_i ⊙ c_{t-1}])
    f_t = σ(W_if x_t + W_hf h_{t-1} + b_f [+ p_f ⊙ c_{t-1}])     (1 - i_t if input_forget)
    g_t = tanh(W_ig x_t + W_hg h_{t-1} + b_g)
    c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t                              (clamped if cell_clip)
    o_t = σ(W_io x_t + W_ho h_{t-1} + b_o [+ p_o ⊙ c_t])
    h_t = o_t ⊙ tanh(c_t);  h_t = W_hr h_t if projecting

With quantize_h="int16" (what fastlstm runs for int8 W_hh with
activation_bits=16), h_{t-1} enters W_hh h_{t-1} quantized per batch row:
m = max_k |h_k|, q_k = round_half_even(h_k * 32767 / m), h_k <- q_k * m / 32767;
a row with a NaN or Inf becomes all NaN, a row with m < 2**-96 all zero
(quantize_h_int16).  quantize_h="bfloat16" rounds h_{t-1} to bfloat16
(round_bfloat16; fastlstm's default for bfloat16 weights).
quantize_h="int8" (fastlstm's default for int8 weights,
activation_bits=8) is the same with 127 for 32767.  With quantize_x="int16"
or "int8" (fastlstm's int8 W_ih) each input row x_t (the layer below's output
for deeper layers) enters W_ih x_t quantized the same way.
"""
import numpy as np


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.where(x > 30, x, np.log1p(np.exp(np.minimum(x, 30))))


ACTIVATIONS = {
    "sigmoid": lambda x, a, b: _sigmoid(x),
    "tanh": lambda x, a, b: np.tanh(x),
    "relu": lambda x, a, b: np.maximum(x, 0.0),
    "hardsigmoid": lambda x, a, b: np.clip(a * x + b, 0.0, 1.0),
    "affine": lambda x, a, b: a * x + b,
    "leakyrelu": lambda x, a, b: np.where(x >= 0, x, a * x),
    "thresholdedrelu": lambda x, a, b: np.where(x > a, x, 0.0),
    "scaledtanh": lambda x, a, b: a * np.tanh(b * x),
    "elu": lambda x, a, b: np.where(x >= 0, x, a * (np.exp(np.minimum(x, 0)) - 1.0)),
    "softsign": lambda x, a, b: x / (1.0 + np.abs(x)),
    "softplus": lambda x, a, b: _softplus(x),
}


HQ_MAX = 32767
HQ8_MAX = 127
HQ_MIN = 2.0 ** -96


def quantize_h_int16(h, bits=16):
    """h (N, K) -> the per-row int16-quantized h, dequantized (float64).

    The codes are computed as the engine computes them, in float32 (h is
    the engine's float32 state or input): m = max_k |h_k|, inv = 32767 / m,
    q_k = round_half_even(clip(h_k * inv, +-32767)), each operation rounded
    to float32 -- so a float32 input row gets exactly the engine's codes
    (no code lands one step apart from a float64 rounding).  The dequantized
    value q_k * m / 32767 is float64.  bits=8: the same with 127 for 32767
    (the engine's activation_bits=8)."""
    qmax = HQ_MAX if bits == 16 else HQ8_MAX
    h32 = np.asarray(h, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        a = np.abs(h32)
        finite = np.isfinite(h32).all(axis=-1, keepdims=True)
        m = np.where(finite, a, np.float32(0)).max(axis=-1, keepdims=True,
                                                   initial=np.float32(0))
        ok = finite & (m >= np.float32(HQ_MIN))
        safe = np.where(ok, m, np.float32(1)).astype(np.float32)
        inv = (np.float32(qmax) / safe).astype(np.float32)
        y = np.clip((h32 * inv).astype(np.float32), -qmax, qmax)
        q = np.where(ok, np.rint(y), np.float32(0)).astype(np.float64)
        out = q * safe.astype(np.float64) / qmax
    return np.where(finite, out, np.nan)


def round_bfloat16(h):
    """h -> h rounded to bfloat16 (float64 result), as fastlstm rounds h_{t-1}
    for bfloat16 dot products (astype("bfloat16"), activation_bits=16): the
    value as float32, then to the nearest bfloat16 (ties to even); NaN stays
    NaN, Inf stays Inf, float32 denormals become a signed zero."""
    u = np.ascontiguousarray(np.asarray(h, dtype=np.float32)).view(np.uint32).astype(np.uint64)
    mag = u & 0x7FFFFFFF
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    r = np.where(mag > 0x7F800000, ((u >> 16) | 0x40) << 16, r)        # NaN: quieted
    r = np.where((mag & 0x7F800000) == 0, (u >> 16 & 0x8000) << 16, r)  # zero, denormal
    return r.astype(np.uint32).view(np.float32).astype(np.float64)


def _quantize_rows(v, how):
    if how in ("int16", "int8") and v.shape[-1] > 0:
        return quantize_h_int16(v, 16 if how == "int16" else 8)
    if how == "bfloat16":
        return round_bfloat16(v)
    return v


def _cell_step(x, h, c, w_ih, w_hh, b, w_hr, peep, cell, quantize_h=None, quantize_x=None):
    acts = cell.get("activations", ("sigmoid", "tanh", "tanh"))
    alpha = cell.get("alpha", (0.0, 0.0, 0.0))
    beta = cell.get("beta", (0.0, 0.0, 0.0))
    clip = cell.get("clip", 0.0)
    cell_clip = cell.get("cell_clip", 0.0)
    fa = lambda v: ACTIVATIONS[acts[0]](v, alpha[0], beta[0])  # noqa: E731
    ga = lambda v: ACTIVATIONS[acts[1]](v, alpha[1], beta[1])  # noqa: E731
    ha = lambda v: ACTIVATIONS[acts[2]](v, alpha[2], beta[2])  # noqa: E731
    clipf = (lambda v: np.clip(v, -clip, clip)) if clip > 0 else (lambda v: v)  # noqa: E731
    hq = _quantize_rows(h, quantize_h)
    xq = _quantize_rows(x, quantize_x)
    z = xq @ w_ih.T + hq @ w_hh.T
    if b is not None:
        z = z + b
    H = w_hh.shape[0] // 4
    zi, zf, zg, zo = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
    if peep is not None:
        zi = zi + peep[0] * c
        zf = zf + peep[1] * c
    i = fa(clipf(zi))
    f = 1.0 - i if cell.get("input_forget", False) else fa(clipf(zf))
    g = ga(clipf(zg))
    c_new = f * c + i * g
    if cell_clip > 0:
        c_new = np.clip(c_new, -cell_clip, cell_clip)
    if peep is not None:
        zo = zo + peep[2] * c_new
    o = fa(clipf(zo))
    h_new = o * ha(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.T
    return h_new, c_new


def lstm_forward(params, x, hx=None, *, num_layers=1, bidirectional=False,
                 batch_first=False, cell=None, peepholes=None, quantize_h=None,
                 quantize_x=None):
    """Run the LSTM described by `params` (PyTorch names) in float64.

    x: (T, N, In), (N, T, In) with batch_first, or unbatched (T, In).
    hx: None or (h0, c0) shaped (L*D, N, Hout) / (L*D, N, H) (unbatched: no N).
    cell: dict of variant options (activations, alpha, beta, clip, cell_clip,
    input_forget).  peepholes: dict name -> (3, H) for 'l{k}[_reverse]'.
    quantize_h: None, or "int16" for the per-row int16 quantization of
    h_{t-1} that fastlstm applies with int8 W_hh (see the module docstring);
    quantize_x: the same for each input row (int8 W_ih).  "int8" for either:
    8-bit codes (activation_bits=8).  quantize_h="bfloat16": h_{t-1} rounded
    to bfloat16 (round_bfloat16), as fastlstm's bfloat16 weights with
    activation_bits=16 run.
    Returns out, (h_n, c_n) with torch.nn.LSTM's shapes, in float64.
    """
    cell = cell or {}
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    x = np.asarray(x, dtype=np.float64)
    unbatched = x.ndim == 2
    if unbatched:
        x = x[:, None, :]
    elif batch_first:
        x = x.transpose(1, 0, 2)
    T, N, _ = x.shape
    D = 2 if bidirectional else 1
    H = p["weight_hh_l0"].shape[0] // 4
    Hout = p["weight_hh_l0"].shape[1]
    if hx is None:
        h0 = np.zeros((num_layers * D, N, Hout))
        c0 = np.zeros((num_layers * D, N, H))
    else:
        h0 = np.asarray(hx[0], dtype=np.float64)
        c0 = np.asarray(hx[1], dtype=np.float64)
        if unbatched:
            h0, c0 = h0[:, None, :], c0[:, None, :]
    hn = np.zeros((num_layers * D, N, Hout))
    cn = np.zeros((num_layers * D, N, H))
    layer_in = x
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = p["weight_ih_" + sfx], p["weight_hh_" + sfx]
            b = None
            if "bias_ih_" + sfx in p:
                b = p["bias_ih_" + sfx] + p["bias_hh_" + sfx]
            w_hr = p.get("weight_hr_" + sfx)
            peep = None
            if peepholes is not None and sfx in peepholes:
                peep = np.asarray(peepholes[sfx], dtype=np.float64)
            h, c = h0[layer * D + d], c0[layer * D + d]
            out = np.zeros((T, N, Hout))
            steps = range(T - 1, -1, -1) if d else range(T)
            for t in steps:
                h, c = _cell_step(layer_in[t], h, c, w_ih, w_hh, b, w_hr, peep, cell,
                                  quantize_h, quantize_x)
                out[t] = h
            hn[layer * D + d], cn[layer * D + d] = h, c
            outs.append(out)
        layer_in = np.concatenate(outs, axis=2)
    out = layer_in
    if unbatched:
        return out[:, 0, :], (hn[:, 0, :], cn[:, 0, :])
    if batch_first:
        out = out.transpose(1, 0, 2)
    return out, (hn, cn)

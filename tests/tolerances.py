"""The one table of tolerances the tests use.

Errors are measured as max |got - want| / max(1, |want|) over outputs and
final states (absolute for values of order 1, relative beyond).

float32: 1e-5.  One float32 rounding is 6e-8 relative; a step accumulates
  sums of In + H products (~sqrt(K) * 6e-8 for random weights), the
  activations are accurate to ~2 ulp, and errors are contracted by the gates
  (|sigmoid'| <= 1/4, |tanh'| <= 1) over time.  Measured worst case over the
  randomized sweeps here is ~2e-6; 1e-5 leaves room for different summation
  orders (the frameworks' BLAS) without hiding a wrong gate or index, which
  gives errors of order 1e-1.
float64: 1e-12.  The same argument with 1.1e-16 per rounding.
ONNX Runtime's own test tolerance for activations other than sigmoid/tanh:
  1e-5 absolute + 1e-4 relative (ORT_ATOL, ORT_RTOL).

Reduced-precision W_hh (LSTM.astype; tests/test_precision.py):
  * against the float64 reference run on the *dequantized* weights
    (m.astype(p).reference(x)): the float32 bound, 1e-5.  The engine widens
    the stored weights to float32 exactly (float16, bfloat16), so only
    float32 arithmetic separates the two.  Measured worst case ~3e-7 on
    every ISA path (3 x 288 random models, H 8..256, T 50).
  * int8 with 16-bit codes (astype("int8", activation_bits=16), key
    "int8_a16"; INT8_REF_TOL = 1e-5, the same float32 bound): the engine also
    quantizes h_{t-1} to int16 per row (q = rne(h * (32767/m)) in float32)
    and the reference does the same in float64 (q = rint(h * 32767 / m)).
    The integer products are exact, but h * inv in float32 differs from the
    float64 value by up to ~32767 * 2^-23 = 4e-3 of a quantization step, so
    about 0.1% of the q_k (measured 0.08% on tanh-distributed rows) land one
    step apart from the reference's, and more where the two h trajectories
    already differ by float32 roundings; each such flip moves a
    pre-activation by |w| * m / 32767.  Measured worst case over 3 x 2000
    random models (the PRECISION_TOL sweep below, every ISA path): 4.9e-6
    (portable 3.2e-6, avx2 4.9e-6, avx512 3.6e-6), typical 1e-6: 2x headroom
    under 1e-5, and still three orders of magnitude below a wrong scale,
    row or chunk (1e-2 and up).  Not widened for int8: the same 1e-5.
    With int8 W_ih the engine also quantizes every input row the same way.
    Input rows are larger than h (m ~ 3 for N(0, 1) inputs, against h <= 1),
    so a code one step apart costs ~3x more: measured with the float64
    quantization above, 2.2e-5.  The reference's quantizer now computes the
    codes in float32 as the engine does (reference.quantize_h_int16), so a
    float32 input row gets exactly the engine's codes and only h (and the
    inputs of deeper layers, the outputs below) can flip; re-measured over
    3 x 2000 random models (`python benchmarks/precision_bounds.py --isa I`
    for each ISA path): worst 7.9e-6
    (portable; avx2 4.3e-6, avx512 4.4e-6).  Still 1e-5, not widened.
  * int8 with 8-bit codes (astype("int8"), the default since activation
    bits became a choice, key "int8"; INT8_A8_REF_TOL = 1.5e-3): the same
    quantization with 127 for 32767.  A
    code one step apart now moves a pre-activation by |w| * m / 127 (~1e-3),
    and the reference's h trajectory (float64) lands a code apart from the
    engine's (float32) now and then; the input codes of layer 0 match
    exactly.  Measured worst over the same 3 x 2000 models: 3.6e-4
    (portable), 5.1e-4 (avx2), 3.7e-4 (avx512) -> 1.5e-3 (3x headroom); a
    wrong code plane, scale or chunk is 1e-2 and up.  With float32 W_ih
    ("int8_f32in": 8-bit codes of h only) the same bound: measured 3.6e-4 on
    every path (`python benchmarks/precision_bounds.py --isa I`, 2000
    models each, the sweep below).
  * bfloat16 with the activations rounded to bfloat16 (astype("bfloat16"),
    the default since bfloat16 dot products, key "bfloat16": h_{t-1} and
    the input rows; "bfloat16_f32in": h_{t-1} only, W_ih float32;
    BF16_REF_TOL = 5e-4): the reference rounds its float64 h and inputs (via
    float32) the same way (reference.round_bfloat16).  The products are
    exact on both sides, but where the two h trajectories straddle a
    rounding boundary a code lands one bfloat16 step (2^-8 relative) apart,
    moving a pre-activation by up to |w| |h| 2^-8 (the inputs of layer 0
    round identically).  Measured worst over 2000 random models (the sweep
    below; `python benchmarks/precision_bounds.py --isa I --forms
    bfloat16,bfloat16_a32,bfloat16_f32in,bfloat16_f32in_a32`): 1.29e-4 to
    1.30e-4 ("bfloat16"), 1.49e-4 ("bfloat16_f32in") on every path -> 5e-4
    (3x headroom); a wrong pair order, row or gate is 1e-2 and up.  With
    float32 activations ("bfloat16_a32", "bfloat16_f32in_a32") the float32
    bound: measured 4.3e-7 to 5.6e-7.
  * against the float32 model (the weights before rounding): PRECISION_TOL.
    This is the price of the weight rounding itself, not an engine error.
    Measured worst case of max_rel_err over outputs and final states, on
    3 x 2000 random models (default init U(-1/sqrt(H), 1/sqrt(H)), inputs
    N(0, 1), H in 1..128 with the tails 17 and 33, input 1..39, T 1..119,
    batch 1 and 5, bidirectional, 2-3 layers, proj_size; every ISA path):
      float16   3.6e-4  (unit roundoff 2^-11 = 4.9e-4)  -> bound 1e-3
      bfloat16  1.9e-3  (unit roundoff 2^-8  = 3.9e-3)  -> bound 5e-3
      int8      2.3e-3  (half step 1/254 of the row max) -> bound 7e-3
    int8 re-measured with h quantized to int16 (per row and step): over 3 x
    2000 random models of the same kind (H from 1..128, 17 and 33, input
    1..39, T 1..119, batch 1 and 5, bidirectional / 2-3 layers / proj_size,
    every ISA path) the worst case is 1.492e-3 with int16 h against 1.488e-3
    on the same models without it (0.94e-3 for H >= 64): the int16 rounding
    of h (1/65534 of the row max) is 1% of the int8 weights' half step, so
    the bound stays 7e-3.
    int8 with int8 W_ih too and 16-bit codes ("int8_a16"; above: int8 with
    float32 inputs and 16-bit codes, astype("int8", input_weights="float32",
    activation_bits=16), key "int8_f32in_a16"), over 3 x 2000 random models of the same kind (seeds 7000+,
    every ISA path, the same worst model on each): 1.65e-2 (H = 2 with 33
    inputs, bidirectional; 4.6e-3 for H >= 64), against 1.6e-3 for the same
    models with float32 inputs.  W_ih's rounding is the int8 half step of
    each row times |x| summed over up to 39 inputs of N(0, 1), with weights
    up to 1/sqrt(H) = 0.7 at H = 2 -- the price torch's and ONNX Runtime's
    dynamic quantization pay too.  Bound 5e-2 (3x headroom).
    bfloat16 re-measured over 2000 random models of that kind (seeds 7000+,
    `python benchmarks/precision_bounds.py --forms ...` as above, every ISA
    path, the same worst model on each):
      bfloat16_f32in_a32 (W_hh only, float32 activations)  1.03e-3 -> 5e-3
      bfloat16_f32in     (W_hh, h rounded)                 1.47e-3 -> 5e-3
      bfloat16_a32       (W_ih too, float32 activations)   1.03e-2 -> 5e-2
      bfloat16           (W_ih too, h and inputs rounded)  1.32e-2 -> 5e-2
    Rounding W_ih costs ~10x at the worst models (H 2-3 with ~30 inputs of
    N(0, 1): the error is 2^-9 of sum |w x| over the inputs, large next to
    |h| <= 1) -- the price any bfloat16 input projection pays, as int8's
    W_ih does above; the inputs' own rounding adds ~30%.
    int8 with 8-bit codes of h and the inputs ("int8", astype's default),
    the same sweep: 2.95e-2 (same worst model on every path) -> bound 1e-1.
    int8 W_hh with float32 W_ih and 8-bit codes of h ("int8_f32in"):
    2.37e-3 on every path (1.61e-3 with 16-bit codes, "int8_f32in_a16") ->
    bound 7e-3, the 16-bit codes' bound (W_hh's rounding dominates either way).  This bound
    documents the quantization, it does not check the engine: the engine is
    checked by the reference of the same quantized model (INT8_REF_TOL,
    INT8_A8_REF_TOL)
    and bitwise across ISA paths.
    The worst cases are at tiny hidden sizes (H 2..8), where each weight is
    large (up to 1/sqrt(H)); for H >= 64 the errors are 3-5x smaller.  The
    bounds leave ~3x headroom and stay an order of magnitude below the errors
    of a wrong row, scale or gate (1e-1).  They hold for random models like
    these; a trained model with large weights and long memory can amplify
    the rounding further (see benchmarks/precision_accuracy.py for the
    effect on a task metric).
"""
import numpy as np

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
# max_rel_err of a reduced-precision model against the same float32 model.
# Keys: the precision names of astype, and the other int8 forms ("int8" is
# astype("int8"): int8 W_ih and W_hh, 8-bit codes; "_a16": 16-bit codes,
# "_f32in": float32 W_ih).
PRECISION_TOL = {"float16": 1e-3, "bfloat16": 5e-2, "bfloat16_a32": 5e-2, "bfloat16_f32in": 5e-3,
                 "bfloat16_f32in_a32": 5e-3, "int8": 1e-1, "int8_a16": 5e-2, "int8_f32in": 7e-3,
                 "int8_f32in_a16": 7e-3}
# The keys that are not astype's defaults: key -> (precision, astype's other
# arguments).  "bfloat16" is astype("bfloat16"): bfloat16 W_ih and W_hh, the
# inputs and h_{t-1} rounded to bfloat16 for the dot products; "_a32": the
# activations float32; "_f32in": W_ih (and the inputs) float32.
FORMS = {"int8_a16": ("int8", {"activation_bits": 16}),
         "int8_f32in": ("int8", {"input_weights": "float32"}),
         "int8_f32in_a16": ("int8", {"input_weights": "float32", "activation_bits": 16}),
         "bfloat16_a32": ("bfloat16", {"activation_bits": 32}),
         "bfloat16_f32in": ("bfloat16", {"input_weights": "float32"}),
         "bfloat16_f32in_a32": ("bfloat16", {"input_weights": "float32", "activation_bits": 32})}
# int8 engine against the float64 reference with the same int16 h quantization
# (see above: measured worst case 7.9e-6).
INT8_REF_TOL = 1e-5
# ... with 8-bit codes of h and the inputs (measured worst case 5.1e-4).
INT8_A8_REF_TOL = 1.5e-3
# bfloat16 engine against the reference with h (and the inputs) rounded to
# bfloat16 the same way (measured worst case 1.49e-4).
BF16_REF_TOL = 5e-4
ORT_ATOL = 1e-5
ORT_RTOL = 1e-4


def max_rel_err(got, want):
    """max |got - want| / max(1, |want|); NaN where exactly one side is NaN counts as inf."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    if got.size == 0:
        return 0.0
    both_nan = np.isnan(got) & np.isnan(want)
    same_inf = np.isinf(got) & np.isinf(want) & (np.sign(got) == np.sign(want))
    diff = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    diff = np.where(both_nan | same_inf, 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    return float(diff.max())


def assert_close(got, want, dtype, what=""):
    tol = TOL[np.dtype(dtype)]
    err = max_rel_err(got, want)
    assert err <= tol, f"{what}: error {err:.3e} > {tol:.0e}"


def assert_lstm_close(res, ref, dtype, what=""):
    (out, (h, c)), (ro, (rh, rc)) = res, ref
    assert_close(out, ro, dtype, what + " out")
    assert_close(h, rh, dtype, what + " h_n")
    assert_close(c, rc, dtype, what + " c_n")

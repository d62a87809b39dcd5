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
"""
import numpy as np

TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
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

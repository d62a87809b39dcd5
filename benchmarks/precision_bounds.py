"""The random-model sweep behind tests/tolerances.py's int8 and bfloat16 bounds.

    python benchmarks/precision_bounds.py [--models 2000] [--isa avx512] [--forms bfloat16,int8]

For each random model (default init, inputs N(0, 1), H in 1..128 with the
tails 17 and 33, input 1..39, T 1..119, batch 1 or 5, bidirectional / 2-3
layers / proj_size in turn) it prints the worst max-relative error, over
outputs and final states, of each int8 form (the keys of
tests/tolerances.py's PRECISION_TOL) against the float32 model
(PRECISION_TOL) and against the float64 reference of the same quantized
model (INT8_REF_TOL for 16-bit codes, INT8_A8_REF_TOL for 8-bit ones,
BF16_REF_TOL for bfloat16 h, the float32 bound for float32 h):

    int8            astype("int8"): int8 W_ih and W_hh, 8-bit codes
    int8_a16        astype("int8", activation_bits=16)
    int8_f32in      astype("int8", input_weights="float32"): int8 W_hh only
    int8_f32in_a16  astype("int8", input_weights="float32", activation_bits=16)
    bfloat16        astype("bfloat16"): bfloat16 W_hh, h rounded to bfloat16
    bfloat16_a32    astype("bfloat16", activation_bits=32): float32 h
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import fastlstm  # noqa: E402
from tolerances import FORMS as _FORMS, max_rel_err  # noqa: E402

FORMS = {"int8": ("int8", {}), "bfloat16": ("bfloat16", {}), **_FORMS}


def _err(a, b):
    (y, (h, c)), (y2, (h2, c2)) = a, b
    return max(max_rel_err(y, y2), max_rel_err(h, h2), max_rel_err(c, c2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=2000)
    ap.add_argument("--isa", default=None, help="portable, avx2 or avx512 (default: the best)")
    ap.add_argument("--forms", default=",".join(FORMS),
                    help="comma-separated keys (default: all: " + ", ".join(FORMS) + ")")
    args = ap.parse_args()
    forms = {f: FORMS[f] for f in args.forms.split(",")}
    if args.isa:
        fastlstm.set_isa(args.isa)
    worst = {f"{f} vs {o}": (0.0, None) for f in forms for o in ("float32", "reference")}
    for seed in range(args.models):
        rng = np.random.default_rng(7000 + seed)
        H = int(rng.choice(list(range(1, 129)) + [17, 33] * 10))
        In, N, T = int(rng.integers(1, 40)), int(rng.choice([1, 5])), int(rng.integers(1, 120))
        opts = [{}, {"bidirectional": True}, {"num_layers": int(rng.integers(2, 4))},
                {"proj_size": max(1, H // 3)} if H > 1 else {}][seed % 4]
        m = fastlstm.LSTM(In, H, seed=seed, **opts)
        x = rng.standard_normal((T, N, In)).astype(np.float32)
        f32 = m(x)
        for f, (prec, kw) in forms.items():
            q = m.astype(prec, **kw)
            got = q(x)
            for o, want in (("float32", f32), ("reference", q.reference(x))):
                v = _err(got, want)
                if v > worst[f"{f} vs {o}"][0]:
                    worst[f"{f} vs {o}"] = (v, dict(seed=seed, H=H, input=In, batch=N, T=T, **opts))
    print(f"isa {fastlstm.cpu_info()['isa']}, {args.models} models")
    for k, (v, where) in worst.items():
        print(f"  {k:28s} worst {v:.3e}  at {where}")


if __name__ == "__main__":
    main()

"""`python -m fastlstm` (the README's first command): it runs, checks the
model against the float64 reference within the float32 bound, and reports
each reduced precision's difference from float32 within its bound."""
import re

import numpy as np

from fastlstm import __main__ as demo
from tolerances import PRECISION_TOL, TOL


def test_demo_runs_and_reports(capsys):
    demo.main(["--seq", "12", "--batch", "2", "--input", "8", "--hidden", "24", "--threads", "1"])
    out = capsys.readouterr().out
    err = float(re.search(r"max abs error vs float64 reference: (\S+)", out).group(1))
    assert err <= TOL[np.dtype(np.float32)]
    assert re.search(r"^fastlstm\s+\d+\.\d+\s+1\.00x$", out, re.M)
    for prec in ("bfloat16", "float16", "int8"):
        row = re.search(rf"^{prec}\s+(\S+)\s+(\S+)x\s+(\S+)$", out, re.M)
        assert row, f"no {prec} row in:\n{out}"
        ms, diff = float(row.group(1)), float(row.group(3))
        assert ms > 0
        # outputs and states of this small model stay below 1 in magnitude, so
        # the absolute difference is the max_rel_err PRECISION_TOL bounds
        assert 0 < diff <= PRECISION_TOL[prec], (prec, diff)

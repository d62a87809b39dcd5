"""The environment variables read at import (README "API"): FASTLSTM_ISA
forces a kernel path, FASTLSTM_NUM_THREADS sets the default thread count;
a bad value stops the import with a message naming the variable."""
import os
import subprocess
import sys

import pytest

import fastlstm

PROBE = ("import fastlstm, numpy as np; i = fastlstm.cpu_info(); "
         "m = fastlstm.LSTM(3, 20, seed=1); "
         "x = np.linspace(-1, 1, 2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3); "
         "print(i['isa'], fastlstm.get_num_threads(), m(x)[0].tobytes().hex())")


def _run(env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("FASTLSTM_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True,
                          text=True, timeout=120)


def _ok(env):
    r = _run(env)
    assert r.returncode == 0, r.stderr
    isa, nt, out = r.stdout.split()
    return isa, int(nt), out


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_fastlstm_isa(isa):
    got, _, out = _ok({"FASTLSTM_ISA": isa})
    avail = fastlstm.cpu_info()["isas_available"]
    # a path this CPU lacks is lowered to the best one it has
    assert got == (isa if isa in avail else avail[-1])
    # the same results as forcing the path in this process
    import numpy as np
    prev = fastlstm.cpu_info()["isa"]
    try:
        fastlstm.set_isa(isa)
        m = fastlstm.LSTM(3, 20, seed=1)
        x = np.linspace(-1, 1, 2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
        assert m(x)[0].tobytes().hex() == out
    finally:
        fastlstm.set_isa(prev)


@pytest.mark.parametrize("n", [1, 3])
def test_fastlstm_num_threads(n):
    assert _ok({"FASTLSTM_NUM_THREADS": str(n)})[1] == n


def test_unset_or_empty_is_the_default():
    isa, nt, _ = _ok({"FASTLSTM_ISA": "", "FASTLSTM_NUM_THREADS": ""})
    assert isa == fastlstm.cpu_info()["isa_detected"]
    assert nt == fastlstm.cpu_info()["num_cpus"]


@pytest.mark.parametrize("env,name", [({"FASTLSTM_ISA": "sse2"}, "FASTLSTM_ISA"),
                                      ({"FASTLSTM_ISA": "AVX2"}, "FASTLSTM_ISA"),
                                      ({"FASTLSTM_NUM_THREADS": "0"}, "FASTLSTM_NUM_THREADS"),
                                      ({"FASTLSTM_NUM_THREADS": "-2"}, "FASTLSTM_NUM_THREADS"),
                                      ({"FASTLSTM_NUM_THREADS": "two"}, "FASTLSTM_NUM_THREADS")])
def test_bad_values_refused(env, name):
    r = _run(env)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and name in r.stderr, r.stderr

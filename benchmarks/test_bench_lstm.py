"""pytest-benchmark benchmarks: fastlstm beside torch, ONNX Runtime and OpenVINO.

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only -k "T100_B1_I128 and 1t"
    FASTLSTM_BENCH_QUICK=1 pytest benchmarks/ --benchmark-only     # tiny sizes

One test per (engine, config, threads); results are grouped by config and
thread count, so pytest-benchmark's table compares the engines side by side.
Every engine's output is checked against fastlstm's (max abs diff < 1e-4);
timings are never asserted.  A peer that cannot be imported or built is
skipped with the reason.  For interleaved, adaptive timing of all engines use
run_all.py instead; here each test runs its engine alone.

Environment:
  FASTLSTM_BENCH_QUICK=1        the tiny grid of run_all.py --quick
  FASTLSTM_BENCH_THREADS=1,2    thread counts
  FASTLSTM_BENCH_ROUNDS=5       timed rounds per test (one call each, after
                                one warm-up round)
"""
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peers  # noqa: E402

QUICK = os.environ.get("FASTLSTM_BENCH_QUICK", "") not in ("", "0")
GRID = peers.QUICK_GRID if QUICK else peers.GRID
THREADS = [int(t) for t in os.environ.get("FASTLSTM_BENCH_THREADS", "1,2").split(",") if t.strip()]
ROUNDS = int(os.environ.get("FASTLSTM_BENCH_ROUNDS", "3" if QUICK else "5"))


class _Case:
    """Weights, input, ONNX file and fastlstm's output for one config."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.module = peers.make_module(cfg)
        self.x = peers.make_input(cfg)
        self.onnx_info = None
        self.ref = None


_CASES = {}


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fastlstm_bench_onnx"))


def _case(cfg):
    if cfg not in _CASES:
        try:
            import torch  # noqa: F401
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"torch is needed to make the weights: {type(e).__name__}: {e}")
        _CASES.clear()  # keep one config's models alive at a time
        _CASES[cfg] = _Case(cfg)
    return _CASES[cfg]


@pytest.mark.parametrize("engine", peers.ENGINES)
@pytest.mark.parametrize("threads", THREADS, ids=lambda n: f"{n}t")
@pytest.mark.parametrize("cfg", GRID, ids=lambda c: c.label)
def test_lstm_forward(benchmark, cfg, threads, engine, onnx_dir):
    case = _case(cfg)
    if case.ref is None:
        ref_runner = peers.make_fastlstm_runner(case.module, cfg, 1)
        case.ref = np.array(ref_runner(case.x), copy=True)
    runners, skipped, case.onnx_info = peers.build_runners(
        case.module, cfg, threads, onnx_dir, engines=[engine], onnx_info=case.onnx_info)
    if engine in skipped:
        pytest.skip(f"{engine}: {skipped[engine]}")
    run = runners[engine]
    out = np.array(run(case.x), copy=True)
    assert out.shape == case.ref.shape
    diff = float(np.max(np.abs(out.astype(np.float64) - case.ref)))

    benchmark.group = f"{cfg.label} {threads}t"
    benchmark.extra_info.update(
        engine=engine, threads=threads, config=cfg.tuple_str, flops_per_call=cfg.flops(),
        weight_bytes_per_call=cfg.weight_bytes_read(), max_abs_diff_vs_fastlstm=diff,
        exporter=(case.onnx_info or {}).get("exporter"))
    benchmark.pedantic(run, args=(case.x,), rounds=ROUNDS, iterations=1, warmup_rounds=1)

    # Correctness only; timings are reported, never asserted.
    assert diff < peers.TOLERANCE, (
        f"{engine} differs from fastlstm by {diff:.3g} (tolerance {peers.TOLERANCE:g})")

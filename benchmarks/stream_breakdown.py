#!/usr/bin/env python
"""Where a streaming step's time goes: the C part against the Python part.

For one layer at batch 1 (input = hidden), in one process, interleaved round
by round (medians over rounds, GC off):

  C loop          n steps back to back inside C (``_engine.stream_loop_ns``:
                  one GIL release for all of them; what a step costs without
                  Python)
  step(x, out=y)  ``Stream.step`` writing into a preallocated y
  step(x)         ``Stream.step`` allocating its output

The last column is the core round trip (fastlstm._engine.core_roundtrip_ns)
before and after the row: on a VM the host moves the vCPUs (SMT siblings
~40 ns, two cores ~100-130 ns, two core complexes ~500 ns), and two-thread
steps move with it.

The differences are Python's share of a step (argument checks, the GIL
release, the output allocation).  No peers: bench_stream.py compares with
torch and ONNX Runtime.

    python benchmarks/stream_breakdown.py                     # hidden 16,64,128; 1 and 2 threads
    python benchmarks/stream_breakdown.py --hidden 128 --threads 1 --rounds 40
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np


def measure(hidden, threads, rounds, steps):
    import fastlstm
    from fastlstm import _engine
    m = fastlstm.LSTM(hidden, hidden, seed=0)
    s = m.stream(1, num_threads=threads)
    x = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    y = np.empty(hidden, np.float32)
    step, fast = s.step, s._fast
    pc = time.perf_counter_ns

    def c_loop():
        return _engine.stream_loop_ns(fast, x, y, steps)

    def py_out():
        t0 = pc()
        for _ in range(steps):
            step(x, y)
        return (pc() - t0) / steps

    def py_new():
        t0 = pc()
        for _ in range(steps):
            step(x)
        return (pc() - t0) / steps

    kinds = {"C loop": c_loop, "step(x, out=y)": py_out, "step(x)": py_new}
    res = {k: [] for k in kinds}
    for f in kinds.values():
        f()  # warm-up: workers, caches
    for r in range(rounds):
        order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
        for k in order:
            res[k].append(kinds[k]())
    return {k: statistics.median(v) / 1000 for k, v in res.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", default="16,64,128")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=3000, help="steps per round and kind")
    a = ap.parse_args(argv)
    import fastlstm
    from fastlstm import _engine
    print(f"# {fastlstm.cpu_info()['isa']}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| hidden | threads | C loop µs | step(x, out=y) µs | step(x) µs | Python's share µs (out= / new array) "
          "| core round trip ns (before / after) |")
    print("|---|---|---|---|---|---|---|")
    gc.disable()
    try:
        for h in [int(v) for v in a.hidden.split(",")]:
            for t in [int(v) for v in a.threads.split(",")]:
                t0 = _engine.core_roundtrip_ns(0.01)
                r = measure(h, t, a.rounds, a.steps)
                t1 = _engine.core_roundtrip_ns(0.01)
                c, o, n = r["C loop"], r["step(x, out=y)"], r["step(x)"]
                trip = " / ".join("–" if v is None else f"{v:.0f}" for v in (t0, t1))
                print(f"| {h} | {t} | {c:.2f} | {o:.2f} | {n:.2f} | {o - c:.2f} / {n - c:.2f} | {trip} |",
                      flush=True)
    finally:
        gc.enable()


if __name__ == "__main__":
    main()

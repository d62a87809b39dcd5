#!/usr/bin/env python
"""Batch scoring throughput on Dask against a plain single-process loop.

    python benchmarks/bench_dask.py                 # 1,000,000 sequences, T=20, input 8, hidden 32
    python benchmarks/bench_dask.py --n 100000      # a smaller run
    python benchmarks/bench_dask.py --workers 1,2,4 --chunk 50000 --repeats 3

The data set is generated where it is used: block i of ``--chunk`` sequences
is drawn from ``np.random.default_rng([seed, i])`` (uniform in [-1, 1)),
inside the Dask task that scores it, and by the loop for the baseline, so no
input is shipped and both score exactly the same numbers.  Every
configuration computes each sequence's h_n (``fastlstm.dask.score_array``,
``output="h_n"``) and reduces each block to a float64 checksum; the
checksums of every run must equal the loop's bit for bit (fastlstm is
deterministic), else the script exits with status 1.  Generation is part of
every timed run (the same work in each); its own rate is reported too.

Configurations, each timed ``--repeats`` times (median reported):
  loop, 1 thread     for block in blocks: generate; score in batches, 1 thread
  loop, C threads    the same with fastlstm using every core (C = usable cores)
  dask, W workers    LocalCluster(n_workers=W, threads_per_worker=1,
                     processes=True); fastlstm threads per call from
                     fastlstm.dask.default_num_threads (C // W); workers
                     started with fastlstm.dask.worker_config() (glibc malloc
                     thresholds; ``--malloc dask-default`` keeps Dask's
                     MALLOC_TRIM_THRESHOLD_=65536, which halves throughput
                     here: see fastlstm/dask.py)
The cluster's start-up, and one warm-up run that imports fastlstm in the
workers, are not timed (start-up is reported).  A timed Dask run includes
building the graph, sending the model to the workers, and gathering the
checksums.

Prints a Markdown table and writes benchmarks/results/dask.json (``--out``).
On a machine shared with other work, the numbers move by tens of percent.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def gen_block(i, rows, T, In, seed):
    """Block i of the data set: rows sequences (rows, T, In), float32."""
    rng = np.random.default_rng([seed, i])
    x = rng.random((rows, T, In), dtype=np.float32)
    x *= 2
    x -= 1
    return x


def block_sizes(n, chunk):
    return [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])


def checksum(h):
    return float(np.asarray(h, np.float64).sum())


# ------------------------------------------------------------------- loop
def run_loop(model, sizes, args, num_threads):
    from fastlstm.dask import score_batch, _auto_batch

    bs = args.batch_size or _auto_batch(model, args.T)
    sums = []
    for i, rows in enumerate(sizes):
        x = gen_block(i, rows, args.T, args.input, args.seed)
        h = np.empty((rows, model.output_size), model.dtype)
        for k in range(0, rows, bs):
            h[k:k + bs] = score_batch(model, x[k:k + bs], output="h_n",
                                      num_threads=num_threads)
        sums.append(checksum(h))
    return sums


def run_gen_only(sizes, args):
    return [checksum(gen_block(i, rows, args.T, args.input, args.seed))
            for i, rows in enumerate(sizes)]


# ------------------------------------------------------------------- dask
def _gen_task(block_id=None, *, sizes, T, In, seed):
    i = block_id[0]
    return gen_block(i, sizes[i], T, In, seed)


def dask_run(model, sizes, args, client):
    import dask.array as da
    import fastlstm.dask as fd

    x = da.map_blocks(_gen_task, dtype=np.float32, chunks=(tuple(sizes), (args.T,), (args.input,)),
                      meta=np.empty((0, 0, 0), np.float32), sizes=list(sizes), T=args.T,
                      In=args.input, seed=args.seed)
    h = fd.score_array(model, x, output="h_n", batch_size=args.batch_size, client=client)
    sums = h.map_blocks(lambda b: np.array([checksum(b)]), drop_axis=1, dtype=np.float64,
                        chunks=((1,) * len(sizes),), meta=np.empty((0,), np.float64))
    return [float(s) for s in sums.compute()]


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


# ------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="sequences (default 1,000,000)")
    ap.add_argument("--T", type=int, default=20, help="steps per sequence")
    ap.add_argument("--input", type=int, default=8, help="input features")
    ap.add_argument("--hidden", type=int, default=32, help="hidden units")
    ap.add_argument("--chunk", type=int, default=50_000, help="sequences per Dask block")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per model call (default: fastlstm.dask's automatic choice)")
    ap.add_argument("--workers", default="1,2", help="worker-process counts, comma separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--malloc", choices=("tuned", "dask-default"), default="tuned",
                    help="worker malloc settings: fastlstm.dask.worker_config() or Dask's own")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "dask.json"))
    args = ap.parse_args(argv)

    import dask
    import distributed
    from dask.distributed import Client, LocalCluster

    import fastlstm
    from fastlstm.dask import _auto_batch, _usable_cores, worker_config

    cores = _usable_cores()
    model = fastlstm.LSTM(args.input, args.hidden, batch_first=True, seed=args.seed)
    sizes = block_sizes(args.n, args.chunk)
    load_before = os.getloadavg()
    print(f"{args.n:,} sequences, T={args.T}, input={args.input}, hidden={args.hidden}; "
          f"{len(sizes)} blocks of <= {args.chunk:,}; batch "
          f"{args.batch_size or _auto_batch(model, args.T)} rows per call; {cores} usable cores; "
          f"isa {fastlstm.cpu_info()['isa']}; load average {load_before[0]:.2f}", flush=True)
    if load_before[0] > 0.5:
        print("warning: the machine is busy (load average > 0.5): expect noisy numbers",
              flush=True)

    flops = 2 * 4 * args.hidden * (args.input + args.hidden) * args.T  # per sequence
    rows, ok = [], True

    gen_t, ref_gen = timed(lambda: run_gen_only(sizes, args), args.repeats)
    print(f"generation alone: {args.n / statistics.median(gen_t):,.0f} seq/s", flush=True)

    ref = None
    for nt in sorted({1, cores}):
        t, sums = timed(lambda: run_loop(model, sizes, args, nt), args.repeats)
        if ref is None:
            ref = sums
        same = sums == ref
        ok &= same
        rows.append({"config": f"loop, {nt} thread{'s' if nt > 1 else ''}", "workers": 0,
                     "fastlstm_threads": nt, "times_s": t, "exact": same})
        print(f"{rows[-1]['config']}: {args.n / statistics.median(t):,.0f} seq/s", flush=True)

    for w in [int(s) for s in args.workers.split(",") if s.strip()]:
        t0 = time.perf_counter()
        with dask.config.set(worker_config() if args.malloc == "tuned" else {}), \
                LocalCluster(n_workers=w, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            start = time.perf_counter() - t0
            import fastlstm.dask as fd
            nt = fd.default_num_threads(client)
            warm = args.n if args.n <= args.chunk else args.chunk
            dask_run(model, block_sizes(warm, args.chunk), args, client)  # warm-up
            t, sums = timed(lambda: dask_run(model, sizes, args, client), args.repeats)
        same = sums == ref
        ok &= same
        rows.append({"config": f"dask, {w} worker{'s' if w > 1 else ''} x 1 thread"
                     + (", Dask's malloc settings" if args.malloc != "tuned" else ""),
                     "workers": w, "fastlstm_threads": nt, "times_s": t, "exact": same,
                     "cluster_start_s": start})
        print(f"{rows[-1]['config']}: {args.n / statistics.median(t):,.0f} seq/s "
              f"(cluster start {start:.1f} s)", flush=True)

    base = next(r for r in rows if r["config"].startswith("loop") and
                r["fastlstm_threads"] == cores)
    base_rate = args.n / statistics.median(base["times_s"])
    for r in rows:
        med = statistics.median(r["times_s"])
        r.update(median_s=med, seq_per_s=args.n / med, speedup_vs_loop=args.n / med / base_rate,
                 gflops=flops * args.n / med / 1e9)

    lines = ["| configuration | fastlstm threads per call | seconds (median) | sequences/s | "
             "vs loop on all cores | GFLOP/s | exact |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['fastlstm_threads']} | {r['median_s']:.2f} | "
                     f"{r['seq_per_s']:,.0f} | {r['speedup_vs_loop']:.2f}x | "
                     f"{r['gflops']:.1f} | {'yes' if r['exact'] else 'NO'} |")
    table = "\n".join(lines)
    print()
    print(f"{args.n:,} sequences (T={args.T}, input={args.input}, hidden={args.hidden}), "
          f"{cores} cores, generation included (alone: "
          f"{args.n / statistics.median(gen_t):,.0f} seq/s)")
    print(table)

    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "usable_cores": cores, "cpu_info": fastlstm.cpu_info(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "versions": {"fastlstm": fastlstm.__version__, "numpy": np.__version__,
                     "dask": dask.__version__, "distributed": distributed.__version__},
        "settings": {**vars(args), "blocks": len(sizes),
                     "batch_rows": args.batch_size or _auto_batch(model, args.T),
                     "flops_per_sequence": flops},
        "generation_only": {"times_s": gen_t, "seq_per_s": args.n / statistics.median(gen_t)},
        "results": rows,
        "markdown": table,
        "all_exact": ok,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")
    if not ok:
        print("!!! a distributed result differs from the loop's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Run fastlstm and every peer engine side by side over the benchmark grid.

All engines run in this one process on the same weights and input.  For each
configuration and thread count the engines are interleaved: in every round
each engine runs a few timed calls, the engine order rotating from round to
round, so that drifting machine load hits all engines alike.  Medians of the
per-call times are reported.

    python benchmarks/run_all.py                  # full grid, 1 and 2 threads
    python benchmarks/run_all.py --quick          # tiny sizes, smoke test
    python benchmarks/run_all.py --threads 1 --configs 0,3
    python benchmarks/run_all.py --configs B1_ --repeats 7

Writes <out>.json (machine, versions, raw timings), <out>.png (chart) and
<out>.md (the Markdown table, also printed).  <out> defaults to
benchmarks/results/latest (latest_quick with --quick).  Exits with status 1
if any peer's output differs from fastlstm's by 1e-4 or more.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peers  # noqa: E402
from peers import ENGINES, GRID, PEERS, QUICK_GRID, SHORT, TOLERANCE  # noqa: E402


# ------------------------------------------------------------------- timing
def _time_call(fn, x):
    t0 = time.perf_counter_ns()
    fn(x)
    return (time.perf_counter_ns() - t0) / 1e6


SETTLE_S = 0.25


def time_interleaved(runners, x, repeats, min_calls, min_time, max_calls_per_round=2000,
                     settle_s=SETTLE_S, on_switch=None):
    """Time every runner on ``x``, interleaved over ``repeats`` rounds.

    Each runner has had its warm-up call (the cross-check).  In every round
    the engine order rotates and each engine makes timed calls until it has
    spent min_time / repeats seconds and made at least
    ceil(min_calls / repeats) calls in that round; so over all rounds at
    least ``min_calls`` calls and ``min_time`` seconds per engine.  Before
    its timed calls in a round each engine waits ``settle_s`` seconds idle and
    makes one untimed call: the worker threads of the engine that ran before
    (OpenMP spins ~200 ms after a parallel region, ONNX Runtime and TBB spin
    too) would otherwise share the cores with the next engine's threads, an
    artifact of hosting all engines in one process that hurts whichever
    engine synchronises its threads most often.

    ``on_switch``: called with the engine's name right before its timed calls
    in each round, after the idle wait (a probe of the machine's state as
    that engine meets it: bench_stream.py's core round trip); what it
    returns is in the engine's result as ``probes``, one per round.

    Returns {name: dict(times_ms=[all timed calls in order], calls_per_round,
    switch_warmup_ms, median_ms, q25_ms, q75_ms, min_ms, mean_ms, calls,
    round_medians_ms)}.
    """
    names = list(runners)
    round_budget_ns = min_time * 1e9 / repeats
    round_min_calls = max(1, math.ceil(min_calls / repeats))
    res = {n: {"times_ms": [], "calls_per_round": [], "switch_warmup_ms": [], "probes": []} for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                fn = runners[n]
                if settle_s > 0:
                    time.sleep(settle_s)
                if on_switch is not None:
                    res[n]["probes"].append(on_switch(n))
                res[n]["switch_warmup_ms"].append(round(_time_call(fn, x), 5))
                ts = []
                spent = 0
                while (len(ts) < round_min_calls or spent < round_budget_ns) \
                        and len(ts) < max_calls_per_round:
                    t0 = time.perf_counter_ns()
                    fn(x)
                    dt = time.perf_counter_ns() - t0
                    spent += dt
                    ts.append(round(dt / 1e6, 5))
                res[n]["times_ms"].extend(ts)
                res[n]["calls_per_round"].append(len(ts))
    finally:
        if gc_was_enabled:
            gc.enable()
    for n in names:
        ts = res[n]["times_ms"]
        q = np.percentile(ts, [25, 75])
        res[n].update(
            median_ms=statistics.median(ts), min_ms=min(ts), mean_ms=statistics.fmean(ts),
            q25_ms=float(q[0]), q75_ms=float(q[1]), calls=len(ts),
            round_medians_ms=[statistics.median(ts[a - k:a]) for a, k in zip(
                np.cumsum(res[n]["calls_per_round"]), res[n]["calls_per_round"])])
    return res


# ------------------------------------------------------------------ metrics
def derive(cfg, threads, eng):
    """Speedup, GFLOP/s, peak fraction and weight bandwidth of fastlstm."""
    out = {"best_peer": None, "speedup_vs_best_peer": None, "fastlstm_gflops": None,
           "fastlstm_peak_fraction": None, "fastlstm_weights_gbps": None,
           "read_bw_gbps": None, "read_bw_threads": None, "fastlstm_read_bw_fraction": None}
    peer_ms = {n: eng[n]["median_ms"] for n in PEERS if n in eng}
    if "fastlstm" not in eng:
        return out
    f_ms = eng["fastlstm"]["median_ms"]
    if peer_ms:
        best = min(peer_ms, key=peer_ms.get)
        out["best_peer"] = best
        out["speedup_vs_best_peer"] = peer_ms[best] / f_ms
    gflops = cfg.flops() / (f_ms * 1e-3) / 1e9
    out["fastlstm_gflops"] = gflops
    out["fastlstm_peak_fraction"] = gflops / (peers.peak_gflops_per_core() * threads)
    if cfg.batch == 1:
        gbps = cfg.weight_bytes_read() / (f_ms * 1e-3) / 1e9
        out["fastlstm_weights_gbps"] = gbps
        # The ceiling: this machine's read bandwidth for W_hh's bytes on as
        # many threads, measured now (after the timed calls, nothing else
        # running in this process).
        bw, used = peers.read_bw_gbps(cfg.step_weight_bytes(), threads)
        out["read_bw_gbps"], out["read_bw_threads"] = bw, used
        out["fastlstm_read_bw_fraction"] = gbps / bw
    return out


# ------------------------------------------------------------------- output
def _fmt_ms(v):
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def markdown_table(results, engines):
    cols = [e for e in engines if any(e in r["engines"] for r in results)]
    head = (["T, batch, input, hidden, layers, dirs", "threads"]
            + [f"{SHORT[e]} ms" for e in cols]
            + ["speedup vs best peer", "fastlstm GFLOP/s (% of peak)",
               "weights GB/s / read bandwidth GB/s (%)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ms = {e: r["engines"][e]["median_ms"] for e in cols if e in r["engines"]}
        fastest = min(ms, key=ms.get) if ms else None
        cells = [r["config_str"], str(r["threads"])]
        for e in cols:
            if e not in ms:
                cells.append("skipped" if e in r["skipped"] else "–")
                continue
            s = _fmt_ms(ms[e])
            if r["max_abs_diff"].get(e) is not None and peers.is_mismatch(r["max_abs_diff"][e]):
                s += " (MISMATCH)"
            cells.append(f"**{s}**" if e == fastest else s)
        sp = r["speedup_vs_best_peer"]
        cells.append(f"{sp:.2f}× ({SHORT[r['best_peer']]})" if sp else "–")
        g = r["fastlstm_gflops"]
        cells.append(f"{g:.1f} ({100 * r['fastlstm_peak_fraction']:.0f}%)" if g else "–")
        bw, rb = r["fastlstm_weights_gbps"], r.get("read_bw_gbps")
        if bw and rb:
            cells.append(f"{bw:.1f} / {rb:.0f} ({100 * bw / rb:.0f}%)")
        else:
            cells.append(f"{bw:.1f}" if bw else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thread_counts = sorted({r["threads"] for r in results})
    n_cfg = len({r["label"] for r in results})
    fig, axes = plt.subplots(len(thread_counts), 1, squeeze=False,
                             figsize=(max(7, 1.6 * n_cfg + 2), 3.8 * len(thread_counts)))
    colors = {"torch": "#ee4c2c", "onnxruntime": "#4f81bd", "openvino": "#7f3fbf"}
    for ax, n in zip(axes[:, 0], thread_counts):
        rows = [r for r in results if r["threads"] == n]
        xs = np.arange(len(rows))
        present = [p for p in PEERS if any(p in r["engines"] for r in rows)]
        width = 0.8 / max(1, len(present))
        finite = [1.0]
        for i, p in enumerate(present):
            vals = []
            for r in rows:
                e = r["engines"]
                vals.append(e[p]["median_ms"] / e["fastlstm"]["median_ms"]
                            if p in e and "fastlstm" in e else np.nan)
            vals = np.array(vals)
            finite += [v for v in vals if np.isfinite(v)]
            # Bars grow from 1 (fastlstm) on a log axis: up = fastlstm faster.
            bars = ax.bar(xs + (i - (len(present) - 1) / 2) * width, vals - 1.0, width,
                          bottom=1.0, label=SHORT[p], color=colors.get(p))
            ax.bar_label(bars, labels=["" if not np.isfinite(v) else f"{v:.2f}" for v in vals],
                         fontsize=7, padding=1)
        ax.set_yscale("log")
        ax.set_ylim(min(finite) / 1.3, max(finite) * 1.6)
        ax.axhline(1.0, color="k", lw=1, ls="--", label="fastlstm (= 1)")
        ax.set_xticks(xs)
        tick = []
        for r in rows:
            c = r["config"]
            lab = f"T{c['T']} B{c['batch']}\nI{c['input']} H{c['hidden']}"
            if c["layers"] > 1 or c["dirs"] > 1:
                lab += f"\nL{c['layers']} D{c['dirs']}"
            f = r["engines"].get("fastlstm")
            if f:
                lab += f"\nfastlstm {_fmt_ms(f['median_ms'])} ms"
            tick.append(lab)
        ax.set_xticklabels(tick, fontsize=8)
        ax.set_ylabel("peer time / fastlstm time (log)")
        ax.set_title(f"{n} thread{'s' if n > 1 else ''}: how many times faster fastlstm is "
                     f"(> 1: fastlstm faster)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes and few repeats, for smoke testing")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (1,2)")
    ap.add_argument("--configs", default=None,
                    help="filter the grid: comma-separated 0-based indices and/or label "
                         "substrings, e.g. '0,3' or 'B1_' or 'L2' (see --list)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated engines ({','.join(ENGINES)}); fastlstm is always run")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved rounds per config and thread count (default 5; 3 quick)")
    ap.add_argument("--min-calls", type=int, default=None,
                    help="least timed calls per engine per config (default 5; 3 quick)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="least seconds of timed calls per engine per config "
                         "(default 2.0; 0.05 quick)")
    ap.add_argument("--out", default=None,
                    help="output path prefix (default benchmarks/results/latest, "
                         "latest_quick with --quick)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG chart")
    ap.add_argument("--check-only", action="store_true",
                    help="only build every engine and cross-check its output against "
                         "fastlstm's (one call each, no timing, nothing written)")
    ap.add_argument("--list", action="store_true", help="list the grid and exit")
    a = ap.parse_args(argv)
    a.repeats = a.repeats or (3 if a.quick else 5)
    a.min_calls = a.min_calls or (3 if a.quick else 5)
    a.min_time = a.min_time if a.min_time is not None else (0.05 if a.quick else 2.0)
    if a.repeats < 1 or a.min_calls < 1 or a.min_time < 0:
        ap.error("--repeats and --min-calls must be >= 1, --min-time >= 0")
    try:
        a.thread_list = [int(t) for t in a.threads.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--threads: expected comma-separated ints, got {a.threads!r}")
    if not a.thread_list or min(a.thread_list) < 1:
        ap.error("--threads: need positive thread counts")
    a.engine_list = ["fastlstm"] + [e.strip() for e in a.engines.split(",")
                                    if e.strip() and e.strip() != "fastlstm"]
    bad = [e for e in a.engine_list if e not in ENGINES]
    if bad:
        ap.error(f"--engines: unknown {bad}; choose from {ENGINES}")
    a.out = a.out or os.path.join(HERE, "results", "latest_quick" if a.quick else "latest")
    return a


def main(argv=None):
    args = parse_args(argv)
    grid = QUICK_GRID if args.quick else GRID
    if args.list:
        for i, c in enumerate(grid):
            print(f"{i}: {c.label}  ({c.tuple_str})")
        return 0
    try:
        configs = peers.select_configs(grid, args.configs)
    except ValueError as e:
        print(f"--configs: {e}", file=sys.stderr)
        return 2
    ncpu = os.cpu_count() or 1
    if max(args.thread_list) > ncpu:
        print(f"warning: {max(args.thread_list)} threads > {ncpu} CPUs", file=sys.stderr)

    started = time.time()
    machine = peers.machine_info()
    vers = peers.versions()
    print(f"fastlstm {vers['fastlstm']} ({machine.get('fastlstm_cpu_info')})")
    print(f"peers: " + ", ".join(f"{e} {vers[e]}" for e in PEERS if e in args.engine_list))
    print(f"CPU: {machine.get('cpu_model', '?')}, {ncpu} CPUs, load {machine.get('loadavg')}")
    print(f"measured FMA peak: {machine['peak_gflops_per_core']:.1f} GFLOP/s per core")
    load = machine.get("loadavg", [0.0])[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before start: other work is running; "
              f"timings (2-thread ones especially) will be noisy", file=sys.stderr)
    print(f"{len(configs)} configs x threads {args.thread_list}; {args.repeats} rounds, "
          f">= {args.min_calls} calls and >= {args.min_time:g} s per engine\n")

    results, mismatches, export_infos = [], [], {}
    with tempfile.TemporaryDirectory(prefix="fastlstm_bench_") as workdir:
        for ci, cfg in enumerate(configs):
            module = peers.make_module(cfg)
            x = peers.make_input(cfg)
            onnx_info = None
            for n in args.thread_list:
                t_cfg = time.time()
                runners, skipped, onnx_info = peers.build_runners(
                    module, cfg, n, workdir, engines=args.engine_list, onnx_info=onnx_info)
                head = f"[{ci + 1}/{len(configs)}] {cfg.label} ({cfg.tuple_str})  threads={n}"
                print(head)
                for e, why in skipped.items():
                    print(f"   {SHORT[e]:<9} skipped: {why}")
                if "fastlstm" not in runners:
                    print("   fastlstm could not be built; nothing to compare", file=sys.stderr)
                    continue
                diffs = peers.cross_check(runners, x)  # also the warm-up call
                for e, d in diffs.items():
                    if peers.is_mismatch(d):
                        mismatches.append({"config": cfg.label, "threads": n, "engine": e,
                                           "max_abs_diff": d})
                if args.check_only:
                    for e, d in diffs.items():
                        if e != "fastlstm":
                            print(f"   {SHORT[e]:<9} max abs diff {d:.2e}"
                                  + ("  <-- MISMATCH" if peers.is_mismatch(d) else "  ok"))
                    print()
                    continue
                eng = time_interleaved(runners, x, args.repeats, args.min_calls, args.min_time,
                                       settle_s=0.0 if args.quick else SETTLE_S)
                met = derive(cfg, n, eng)
                for e in args.engine_list:
                    if e not in eng:
                        continue
                    r = eng[e]
                    check = "" if e == "fastlstm" else (
                        f"  diff {diffs[e]:.1e}" + ("  <-- MISMATCH" if peers.is_mismatch(diffs[e])
                                                    else ""))
                    print(f"   {SHORT[e]:<9} {r['median_ms']:10.3f} ms  (IQR {r['q25_ms']:.3f}"
                          f"-{r['q75_ms']:.3f}, {r['calls']} calls){check}")
                line = []
                if met["speedup_vs_best_peer"]:
                    line.append(f"speedup vs fastest peer ({SHORT[met['best_peer']]}) "
                                f"{met['speedup_vs_best_peer']:.2f}x")
                line.append(f"fastlstm {met['fastlstm_gflops']:.1f} GFLOP/s = "
                            f"{100 * met['fastlstm_peak_fraction']:.1f}% of "
                            f"{peers.peak_gflops_per_core() * n:.0f} GFLOP/s peak")
                if met["fastlstm_weights_gbps"] is not None:
                    line.append(f"weights read {met['fastlstm_weights_gbps']:.1f} GB/s = "
                                f"{100 * met['fastlstm_read_bw_fraction']:.0f}% of the "
                                f"{met['read_bw_gbps']:.0f} GB/s this machine reads "
                                f"{cfg.step_weight_bytes() >> 10} KB at on "
                                f"{met['read_bw_threads']} thread(s)")
                print("   " + " | ".join(line) + f"   [{time.time() - t_cfg:.1f} s]\n")
                results.append({
                    "config": {k: getattr(cfg, k) for k in
                               ("T", "batch", "input", "hidden", "layers", "dirs")},
                    "label": cfg.label, "config_str": cfg.tuple_str, "threads": n,
                    "flops_per_call": cfg.flops(), "weight_bytes_per_call": cfg.weight_bytes_read(),
                    "skipped": skipped, "max_abs_diff": diffs,
                    "runner_info": {e: r.info for e, r in runners.items()},
                    "engines": eng, **met,
                })
                del runners
                gc.collect()
            if onnx_info is not None:
                export_infos[cfg.label] = {k: v for k, v in onnx_info.items() if k != "path"}

    elapsed = time.time() - started
    if args.check_only:
        if export_infos:
            print("ONNX export: " + "; ".join(
                f"{k}: {v.get('exporter')} {v.get('ops')}" for k, v in export_infos.items()))
        return _report_mismatches(mismatches)
    table = markdown_table(results, args.engine_list)
    print(table)
    exporters = sorted({i.get("exporter", "?") for i in export_infos.values()})
    if export_infos:
        print(f"\nONNX export: {', '.join(exporters)} exporter; ops "
              f"{sorted({o for i in export_infos.values() for o in i.get('ops', [])})}")
    peers.note_load_end(machine)
    doc = {
        **peers.result_header(argv),
        "settings": {"quick": args.quick, "threads": args.thread_list,
                     "engines": args.engine_list, "repeats": args.repeats,
                     "min_calls": args.min_calls, "min_time_s": args.min_time,
                     "settle_s": 0.0 if args.quick else SETTLE_S,
                     "tolerance": TOLERANCE, "configs": [c.label for c in configs]},
        "machine": machine, "versions": vers, "onnx_export": export_infos,
        "elapsed_s": elapsed, "mismatches": mismatches, "results": results,
        "markdown": table,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    written = [args.out + ".json", args.out + ".md"]
    if not args.no_plot and results:
        try:
            ci = machine.get("fastlstm_cpu_info")
            isa = ci.get("isa", "?") if isinstance(ci, dict) else "?"
            plot(results, args.out + ".png",
                 f"fastlstm {vers['fastlstm']} ({isa}) vs peers, float32, "
                 f"{machine.get('cpu_model', 'CPU')}, median per call")
            written.append(args.out + ".png")
        except Exception as e:  # noqa: BLE001
            print(f"chart failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"\nwrote {', '.join(os.path.relpath(p) for p in written)} in {elapsed:.0f} s")
    return _report_mismatches(mismatches)


def _report_mismatches(mismatches):
    if mismatches:
        bar = "!" * 78
        print(f"\n{bar}\n!!! {len(mismatches)} OUTPUT MISMATCH(ES) beyond {TOLERANCE:g}:",
              file=sys.stderr)
        for m in mismatches:
            print(f"!!!   {m}", file=sys.stderr)
        print(bar, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

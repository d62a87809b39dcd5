#!/usr/bin/env python
"""Latency of one streaming step: fastlstm's ``Stream.step`` against the
cheapest equivalent call of torch and ONNX Runtime.

One layer, batch 1, input = hidden (64 and 128 by default), float32, at 1 and
2 threads (every engine pinned to the same count: n below).  Every engine
carries (h, c) from one call to the next, as a real-time loop must:

  fastlstm        ``s = m.stream(1, num_threads=n)``; ``y = s.step(x_t)``
                  (x_t: NumPy (1, H); the state stays inside the stream; with
                  n > 1 every step is split across the threads, which spin
                  between back-to-back steps)
  fastlstm step(out=)
                  ``s.step(x_t, out=y)``: the same stream writing into one
                  preallocated y (no allocation per step; called through a
                  lambda), for reference
  fastlstm call   ``y, (h, c) = m(x_t[None], (h, c), num_threads=n)``: the
                  one-shot API at T=1, for reference (not a peer)
  fastlstm bf16 / int8 step
                  the same stream with ``astype("bfloat16")`` / ``astype("int8")``
                  weights, for reference (not the target's subject: that is
                  float32); checked against float32 within 5e-2 / 1e-1
  torch           ``y, (h, c) = lstm(x, (h, c))`` with x (1, 1, H): nn.LSTM
                  with hx at T=1; torch.set_num_threads(n), the whole timing
                  inside one torch.inference_mode() block (no per-call context
                  manager), inputs already tensors
  torch oneDNN off  the same nn.LSTM call with torch.backends.mkldnn.enabled =
                  False (set by each torch runner on every call; the flag is
                  global): at T=1 torch's oneDNN RNN path costs more than its
                  native one, so the cheaper of the two is the peer
  torch cell      ``h, c = cell(x, (h, c))``: nn.LSTMCell with the same
                  weights, for reference (not counted as the peer: it is not
                  an nn.LSTM call)
  fastlstm.torch cell  the same loop on ``fastlstm.torch.LSTMCell.from_cell``
                  of that cell (tensors in and out): what converting a torch
                  decoder's nn.LSTMCell gives, beside torch's own cell
  ORT             one ONNX LSTM node built with onnx.helper, T=1, inputs X,
                  initial_h, initial_c, outputs Y_h and Y_c only (Y_h is y_t);
                  ``sess.run`` with intra_op_num_threads=n, inter_op=1,
                  sequential execution

Before timing, each engine runs the same 32-step sequence from zero state and
its outputs are compared with fastlstm's (max abs diff < 1e-4).  Timing:
run_all.time_interleaved (rounds, engine order rotating, 0.25 s idle and one untimed call
after each switch, every call timed alone, GC off); medians reported.  Speedup
is against the fastest of torch nn.LSTM (oneDNN on or off) and ORT; the
target is >= 5x.  Right before every engine's timed calls in each round the
core round trip (fastlstm._engine.core_roundtrip_ns: a cache line between
this thread and fastlstm's worker and back) is probed: on a VM the host
moves the two vCPUs, notably while they idle between engines, between SMT
siblings of one core (~40 ns, one L2 shared: two threads gain little on an
L2-bound step), two cores (~100-130 ns) and two core complexes (~500 ns:
every hop of a two-thread step costs that), and the two-thread rows move
with it; the table gives its median and range before fastlstm's rounds, the
JSON each of those probes beside that round's median step, and the rounds
grouped by the probe's band (fastlstm_by_placement).

    python benchmarks/bench_stream.py               # writes benchmarks/results/stream.{json,md}
    python benchmarks/bench_stream.py --quick --out /tmp/stream_check
    python benchmarks/bench_stream.py --hidden 64,128,256 --threads 1 --repeats 30
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peers  # noqa: E402
from run_all import SETTLE_S, time_interleaved  # noqa: E402

ENGINES = ("fastlstm", "fastlstm_out", "fastlstm_call", "fastlstm_bf16", "fastlstm_int8", "torch", "torch_nodnn",
           "torch_cell", "ft_torch_cell", "onnxruntime")
PEERS = ("torch", "torch_nodnn", "onnxruntime")  # speedup: against the fastest of these
LABEL = {"fastlstm": "fastlstm step", "fastlstm_out": "fastlstm step(out=)", "fastlstm_call": "fastlstm m(x, hx)",
         "torch": "torch nn.LSTM", "torch_nodnn": "torch nn.LSTM oneDNN off",
         "torch_cell": "torch LSTMCell", "ft_torch_cell": "fastlstm.torch LSTMCell",
         "onnxruntime": "ORT",
         "fastlstm_bf16": "fastlstm bf16 step", "fastlstm_int8": "fastlstm int8 step"}
# Max abs difference from fastlstm float32 over the check steps: the reduced
# precisions round the weights (and activations); float32 engines: peers.TOLERANCE.
TOL = {"fastlstm_bf16": 5e-2, "fastlstm_int8": 1e-1}
TARGET = 5.0
CHECK_STEPS = 32


class StepRunner(peers.Runner):
    """``runner(x) -> y_t`` (NumPy (1, H)) carrying the state between calls;
    ``prepare(x_t)`` turns a NumPy (1, H) step into the engine's own input
    (done outside the timed call); ``reset()`` zeroes the state."""

    def __init__(self, name, step, prepare, reset, threads, info=None):
        super().__init__(name, step, threads, info)
        self.prepare = prepare
        self.reset = reset


# ------------------------------------------------------------------ engines
def make_fastlstm(module, threads):
    import fastlstm
    m = fastlstm.LSTM.from_torch(module)
    s = m.stream(1, num_threads=threads)
    return StepRunner("fastlstm", s.step, lambda x: np.ascontiguousarray(x, np.float32),
                      s.reset, threads, {"isa": fastlstm.cpu_info()["isa"]})


def make_fastlstm_out(module, threads):
    import fastlstm
    s = fastlstm.LSTM.from_torch(module).stream(1, num_threads=threads)
    y = np.empty((1, module.hidden_size), np.float32)
    return StepRunner("fastlstm_out", lambda x: s.step(x, out=y),
                      lambda x: np.ascontiguousarray(x, np.float32), s.reset, threads)


def _make_fastlstm_reduced(precision, name):
    def make(module, threads):
        import fastlstm
        s = fastlstm.LSTM.from_torch(module).astype(precision).stream(1, num_threads=threads)
        return StepRunner(name, s.step, lambda x: np.ascontiguousarray(x, np.float32),
                          s.reset, threads, {"weights": precision})
    return make


def make_fastlstm_call(module, threads):
    import fastlstm
    m = fastlstm.LSTM.from_torch(module)
    H = m.hidden_size
    st = {}

    def reset():
        st["hx"] = (np.zeros((1, 1, H), np.float32), np.zeros((1, 1, H), np.float32))

    def step(x):
        y, st["hx"] = m(x, st["hx"], num_threads=threads)
        return y[0]

    reset()
    return StepRunner("fastlstm_call", step, lambda x: np.ascontiguousarray(x[None], np.float32),
                      reset, threads)


def make_torch(module, threads, onednn=True):
    import torch
    H = module.hidden_size
    st = {}
    flags = torch.backends.mkldnn

    def reset():
        st["h"], st["c"] = torch.zeros(1, 1, H), torch.zeros(1, 1, H)

    def step(x):
        flags.enabled = onednn
        y, (st["h"], st["c"]) = module(x, (st["h"], st["c"]))
        return y[0]

    reset()
    return StepRunner("torch" if onednn else "torch_nodnn", step,
                      lambda x: torch.from_numpy(np.array(x[None], np.float32)), reset, threads,
                      {"torch_threads": threads, "mkldnn_enabled": onednn,
                       "mkldnn_available": bool(flags.is_available())})


def make_torch_nodnn(module, threads):
    return make_torch(module, threads, onednn=False)


def make_torch_cell(module, threads, fastlstm_cell=False):
    import torch
    H = module.hidden_size
    cell = torch.nn.LSTMCell(module.input_size, H).eval()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(module, name + "_l0"))
    if fastlstm_cell:
        import fastlstm.torch as ft
        with torch.no_grad():
            cell = ft.LSTMCell.from_cell(cell, num_threads=threads)
    st = {}

    def reset():
        st["h"], st["c"] = torch.zeros(1, H), torch.zeros(1, H)

    def step(x):
        st["h"], st["c"] = cell(x, (st["h"], st["c"]))
        return st["h"]

    reset()
    return StepRunner("ft_torch_cell" if fastlstm_cell else "torch_cell", step,
                      lambda x: torch.from_numpy(np.array(x, np.float32)), reset, threads)


def make_ft_torch_cell(module, threads):
    return make_torch_cell(module, threads, fastlstm_cell=True)


def onnx_step_model(module):
    """Serialized ONNX model: one LSTM node, T=1, batch 1, inputs X,
    initial_h, initial_c, outputs Y_h, Y_c; weights of ``module`` (torch gate
    order i, f, g, o mapped to ONNX's i, o, f, c; B = [Wb | Rb])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    H, In = module.hidden_size, module.input_size

    def iofc(t):
        w = t.detach().numpy()
        return w.reshape(4, H, *w.shape[1:])[[0, 3, 1, 2]].reshape(w.shape)

    W = iofc(module.weight_ih_l0)[None]
    R = iofc(module.weight_hh_l0)[None]
    B = np.concatenate([iofc(module.bias_ih_l0), iofc(module.bias_hh_l0)])[None]
    f32 = TensorProto.FLOAT
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "", "initial_h", "initial_c"],
                            ["", "Y_h", "Y_c"], hidden_size=H, direction="forward")
    graph = helper.make_graph(
        [node], "lstm_step",
        [helper.make_tensor_value_info("X", f32, [1, 1, In]),
         helper.make_tensor_value_info("initial_h", f32, [1, 1, H]),
         helper.make_tensor_value_info("initial_c", f32, [1, 1, H])],
        [helper.make_tensor_value_info("Y_h", f32, [1, 1, H]),
         helper.make_tensor_value_info("Y_c", f32, [1, 1, H])],
        [numpy_helper.from_array(np.ascontiguousarray(a, np.float32), n)
         for a, n in ((W, "W"), (R, "R"), (B, "B"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_ort(module, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_step_model(module), so,
                                providers=["CPUExecutionProvider"])
    H = module.hidden_size
    st = {}
    outs = ["Y_h", "Y_c"]

    def reset():
        st["h"], st["c"] = np.zeros((1, 1, H), np.float32), np.zeros((1, 1, H), np.float32)

    def step(x):
        st["h"], st["c"] = sess.run(outs, {"X": x, "initial_h": st["h"], "initial_c": st["c"]})
        return st["h"][0]

    reset()
    return StepRunner("onnxruntime", step,
                      lambda x: np.ascontiguousarray(x[None], np.float32), reset, threads,
                      {"providers": sess.get_providers(), "api": "InferenceSession.run"})


MAKERS = {"fastlstm": make_fastlstm, "fastlstm_out": make_fastlstm_out, "fastlstm_call": make_fastlstm_call,
          "fastlstm_bf16": _make_fastlstm_reduced("bfloat16", "fastlstm_bf16"),
          "fastlstm_int8": _make_fastlstm_reduced("int8", "fastlstm_int8"), "torch": make_torch,
          "torch_nodnn": make_torch_nodnn, "torch_cell": make_torch_cell,
          "ft_torch_cell": make_ft_torch_cell, "onnxruntime": make_ort}


def build(module, threads, engines):
    runners, skipped = {}, {}
    for name in engines:
        try:
            runners[name] = MAKERS[name](module, threads)
        except Exception as e:  # noqa: BLE001 - a peer that cannot be built is skipped
            skipped[name] = f"{type(e).__name__}: {str(e)[:300]}"
    return runners, skipped


def _numpy(y):
    return y.numpy() if hasattr(y, "numpy") else np.asarray(y)


def cross_check(runners, xs):
    """Run CHECK_STEPS steps from zero state through every engine; max abs
    difference of each engine's outputs from fastlstm's."""
    outs = {}
    for name, r in runners.items():
        r.reset()
        ys = [_numpy(r(r.prepare(x))).astype(np.float64).reshape(-1) for x in xs]
        outs[name] = np.stack(ys)
        r.reset()
    ref = outs["fastlstm"]
    return {n: float(np.max(np.abs(o - ref))) for n, o in outs.items()}


# ------------------------------------------------------------------- output
def core_roundtrip(engine):
    """A cache line's round trip between this thread and fastlstm's first
    worker, ns (fastlstm._engine.core_roundtrip_ns), right before each
    engine's timed calls in every round (after the idle wait, during which
    the host may move the vCPUs): where the two vCPUs are as those calls run.
    Every engine gets the probe (10 ms of both cores busy), so none starts
    its calls from a different state; the table reports fastlstm's.  None
    on one CPU or when the pool is busy."""
    from fastlstm import _engine
    return _engine.core_roundtrip_ns(0.01)


def trip_summary(trips):
    """'median (min–max)' of round trips in ns, '–' when none."""
    if not trips:
        return "–"
    return f"{statistics.median(trips):.0f} ({min(trips):.0f}–{max(trips):.0f})"


# Round-trip bands of the placements seen on the 2-core EPYC guests here (ns).
PLACEMENTS = (("SMT siblings of one core", 0, 70), ("two cores of one complex", 70, 200),
              ("two core complexes", 200, None))  # None: no upper bound


def placement_bins(trip_rounds):
    """fastlstm's rounds grouped by the round trip probed before them: per
    band, how many rounds and the median of their median steps (µs)."""
    out = []
    for name, lo, hi in PLACEMENTS:
        ms = [m for t, m in trip_rounds if lo <= t and (hi is None or t < hi)]
        if ms:
            out.append({"placement": name, "lo_ns": lo, "hi_ns": hi, "rounds": len(ms),
                        "median_us": statistics.median(ms)})
    return out


def markdown_table(results):
    cols = [e for e in ENGINES if any(e in r["engines"] for r in results)]
    head = (["hidden (= input), batch 1, 1 layer", "threads"] + [f"{LABEL[e]} µs" for e in cols]
            + [f"speedup vs fastest of torch nn.LSTM / ORT (target ≥ {TARGET:g}×)",
               "read floor µs (weights / read bandwidth)",
               "core round trip ns before fastlstm's rounds (median, range)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [str(r["hidden"]), str(r["threads"])]
        for e in cols:
            if e not in r["engines"]:
                cells.append("skipped" if e in r["skipped"] else "–")
                continue
            s = f"{r['engines'][e]['median_us']:.2f}"
            if peers.is_mismatch(r["max_abs_diff"].get(e, 0.0), TOL.get(e, peers.TOLERANCE)):
                s += " (MISMATCH)"
            cells.append(f"**{s}**" if e == "fastlstm" else s)
        sp = r["speedup"]
        cells.append("–" if sp is None else
                     f"{sp:.1f}× vs {LABEL[r['best_peer']]}"
                     + (" ✓" if sp >= TARGET else " (below target)"))
        fl = r.get("read_floor_us")
        cells.append("–" if fl is None else f"{fl:.2f}")
        cells.append(trip_summary(r.get("core_roundtrip_ns")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="64,128", help="comma-separated hidden sizes (64,128)")
    ap.add_argument("--threads", default="1,2",
                    help="comma-separated thread counts, each engine pinned to it (1,2)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help=f"comma-separated, from {','.join(ENGINES)}; fastlstm always runs")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved rounds per hidden size (default 20; 3 with --quick)")
    ap.add_argument("--min-calls", type=int, default=None,
                    help="least timed calls per engine and size (default 20000; 300 quick)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="least seconds of timed calls per engine and size (default 1.0; "
                         "0.05 quick)")
    ap.add_argument("--max-calls-per-round", type=int, default=5000)
    ap.add_argument("--quick", action="store_true", help="few calls: check that it runs")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "stream"),
                    help="output path prefix: writes <out>.json and <out>.md "
                         "(default benchmarks/results/stream)")
    a = ap.parse_args(argv)
    a.repeats = a.repeats or (3 if a.quick else 20)
    a.min_calls = a.min_calls or (300 if a.quick else 20000)
    a.min_time = a.min_time if a.min_time is not None else (0.05 if a.quick else 1.0)
    try:
        a.hidden_list = [int(h) for h in a.hidden.split(",") if h.strip()]
    except ValueError:
        ap.error(f"--hidden: expected comma-separated ints, got {a.hidden!r}")
    a.engine_list = ["fastlstm"] + [e.strip() for e in a.engines.split(",")
                                    if e.strip() and e.strip() != "fastlstm"]
    bad = [e for e in a.engine_list if e not in ENGINES]
    if bad:
        ap.error(f"--engines: unknown {bad}; choose from {ENGINES}")
    try:
        a.thread_list = [int(t) for t in a.threads.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--threads: expected comma-separated ints, got {a.threads!r}")
    if (not a.thread_list or min(a.thread_list) < 1 or a.repeats < 1 or a.min_calls < 1
            or a.min_time < 0):
        ap.error("--threads, --repeats, --min-calls must be >= 1 and --min-time >= 0")
    return a


def main(argv=None):
    args = parse_args(argv)
    import torch
    started = time.time()
    machine = peers.machine_info()
    vers = peers.versions()
    print(f"fastlstm {vers['fastlstm']} ({machine.get('fastlstm_cpu_info')})")
    print(f"torch {vers['torch']}, onnxruntime {vers['onnxruntime']}; "
          f"CPU: {machine.get('cpu_model', '?')}, load {machine.get('loadavg')}")
    if machine.get("loadavg", [0.0])[0] > 0.5:
        print(f"warning: load average {machine['loadavg'][0]:.2f} before start: other work "
              "is running; timings will be noisy", file=sys.stderr)
    print(f"{args.repeats} rounds, >= {args.min_calls} calls and >= {args.min_time:g} s per "
          f"engine and size, threads {args.thread_list}\n")

    results = []
    for H, threads in [(H, t) for H in args.hidden_list for t in args.thread_list]:
        torch.set_num_threads(threads)
        cfg = peers.Config(1, 1, H, H, 1, 1)
        module = peers.make_module(cfg)
        rng = np.random.default_rng(H)
        xs = rng.standard_normal((CHECK_STEPS, 1, H), dtype=np.float32)
        with torch.inference_mode():
            runners, skipped = build(module, threads, args.engine_list)
            for e, why in skipped.items():
                print(f"   {LABEL[e]:<25} skipped: {why}")
            if "fastlstm" not in runners:
                print("fastlstm could not be built", file=sys.stderr)
                return 1
            diffs = cross_check(runners, xs)  # also the warm-up
            timed = {}
            for name, r in runners.items():
                x = r.prepare(xs[0])
                timed[name] = peers.Runner(name, lambda _x, f=r.fn, x=x: f(x), r.threads)
            eng = time_interleaved(timed, None, args.repeats, args.min_calls, args.min_time,
                                   settle_s=0.0 if args.quick else SETTLE_S,
                                   max_calls_per_round=args.max_calls_per_round,
                                   on_switch=core_roundtrip)
        # the round trip right before each round of fastlstm's timed steps,
        # beside that round's median step
        trip_rounds = [[v, 1e3 * m] for v, m in zip(eng["fastlstm"]["probes"],
                                                  eng["fastlstm"]["round_medians_ms"]) if v is not None]
        trips = [v for v, _ in trip_rounds]
        stats = {}
        for name, d in eng.items():
            stats[name] = {
                "median_us": 1e3 * d["median_ms"], "q25_us": 1e3 * d["q25_ms"],
                "q75_us": 1e3 * d["q75_ms"], "min_us": 1e3 * d["min_ms"],
                "mean_us": 1e3 * d["mean_ms"], "calls": d["calls"],
                "round_medians_us": [1e3 * v for v in d["round_medians_ms"]]}
        peer_us = {n: stats[n]["median_us"] for n in PEERS if n in stats}
        best = min(peer_us, key=peer_us.get) if peer_us else None
        speedup = peer_us[best] / stats["fastlstm"]["median_us"] if best else None
        # The floor of a float32 step: its weights (W_ih and W_hh) read once
        # at this machine's read bandwidth for that many bytes and threads,
        # measured now (fastlstm._engine.read_bandwidth_gbps).
        wbytes = 4 * H * (H + H) * 4
        bw, bw_threads = peers.read_bw_gbps(wbytes, threads)
        floor_us = wbytes / (bw * 1e9) * 1e6
        print(f"hidden {H}, {threads} thread(s):")
        for name in args.engine_list:
            if name not in stats:
                continue
            s = stats[name]
            diff = "" if name == "fastlstm" else (
                f"  diff {diffs[name]:.1e}" + ("  <-- MISMATCH" if peers.is_mismatch(
                    diffs[name], TOL.get(name, peers.TOLERANCE)) else ""))
            print(f"   {LABEL[name]:<25} {s['median_us']:9.2f} µs  (IQR {s['q25_us']:.2f}-"
                  f"{s['q75_us']:.2f}, {s['calls']} calls){diff}")
        print(f"   read floor: {wbytes >> 10} KB of weights at {bw:.0f} GB/s "
              f"({bw_threads} thread(s)) = {floor_us:.2f} µs")
        by_trip = placement_bins(trip_rounds)
        if trips:
            print(f"   core round trip before fastlstm's rounds: {trip_summary(trips)} ns (median, range)")
            for b in by_trip:
                band = f"{b['lo_ns']}-{b['hi_ns']}" if b["hi_ns"] is not None else f">= {b['lo_ns']}"
                print(f"     {b['placement']} ({band} ns): {b['rounds']} round(s), "
                      f"fastlstm step {b['median_us']:.2f} µs (median of the rounds' medians)")
        if speedup:
            print(f"   speedup vs {LABEL[best]}: {speedup:.2f}x (target {TARGET:g}x)\n")
        results.append({"hidden": H, "input": H, "batch": 1, "layers": 1, "threads": threads,
                        "skipped": skipped, "max_abs_diff": diffs,
                        "runner_info": {n: r.info for n, r in runners.items()},
                        "engines": stats, "best_peer": best, "speedup": speedup,
                        "weight_bytes": wbytes, "read_bw_gbps": bw, "read_bw_threads": bw_threads,
                        "read_floor_us": floor_us,
                        "core_roundtrip_ns": trips,
                        "core_roundtrip_vs_round_median_us": trip_rounds,
                        "fastlstm_by_placement": by_trip,
                        "meets_target": None if speedup is None else speedup >= TARGET})

    table = markdown_table(results)
    print(table)
    torch.backends.mkldnn.enabled = True
    peers.note_load_end(machine)
    mismatches = [{"hidden": r["hidden"], "engine": e, "max_abs_diff": d}
                  for r in results for e, d in r["max_abs_diff"].items()
                  if peers.is_mismatch(d, TOL.get(e, peers.TOLERANCE))]
    doc = {
        **peers.result_header(argv),
        "benchmark": "stream step latency",
        "settings": {"hidden": args.hidden_list, "threads": args.thread_list,
                     "engines": args.engine_list, "repeats": args.repeats,
                     "min_calls": args.min_calls, "min_time_s": args.min_time,
                     "max_calls_per_round": args.max_calls_per_round, "quick": args.quick,
                     "tolerance": peers.TOLERANCE, "target_speedup": TARGET,
                     "check_steps": CHECK_STEPS},
        "machine": machine, "versions": vers, "elapsed_s": time.time() - started,
        "mismatches": mismatches, "results": results, "markdown": table,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    print(f"\nwrote {args.out}.json, {args.out}.md ({time.time() - started:.1f} s)")
    if mismatches:
        print(f"!!! {len(mismatches)} engine output(s) differ from fastlstm's by >= "
              f"{peers.TOLERANCE:g}: {mismatches}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

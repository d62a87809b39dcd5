#!/usr/bin/env python
"""Speed of reduced-precision recurrent weights against torch's and ONNX
Runtime's quantized LSTMs.

Engines, all on the weights of one torch.nn.LSTM and the same float32 input
(T, batch, input):

  fastlstm float32 / float16 / bfloat16 / bfloat16f32 / int8 / int8a16
        ``LSTM.from_torch(m).astype(p)(x, num_threads=n)``: float16 stores
        W_hh in float16 (W_ih, state and the arithmetic float32); bfloat16
        stores W_ih and W_hh in bfloat16 and rounds h_{t-1} and each input
        row to bfloat16 for the dot products (vdpbf16ps; float32 sums and
        state); bfloat16f32 is ``astype("bfloat16", input_weights="float32",
        activation_bits=32)``: W_hh bfloat16, everything else float32 (the
        bfloat16 form before bfloat16 dot products); int8 stores W_ih and
        W_hh in int8 (per-row scales) and quantizes h_{t-1} and each input row
        to 8-bit codes per row for integer dot products, as torch's and
        ORT's int8 LSTMs quantize them; int8a16 is ``astype("int8",
        activation_bits=16)``: the same with int16 codes.
  torch float32        the nn.LSTM itself (peers.make_torch_runner).
  torch bfloat16       the nn.LSTM converted to bfloat16 (``.to(torch.bfloat16)``:
        weights, input, state and outputs all bfloat16; torch has no dynamic
        bfloat16 LSTM), the input converted inside the timed call.
  torch qint8 / float16
        ``torch.ao.quantization.quantize_dynamic`` on a module holding the
        LSTM (a bare nn.LSTM given as the root module is left unquantized),
        giving ``torch.ao.nn.quantized.dynamic.LSTM``: W_ih and W_hh in
        qint8 (with dynamically quantized activations) or float16.
  ORT float32          the ONNX file torch.onnx.export writes (peers.export_onnx).
  ORT int8             a one-node ONNX LSTM graph (W, R, B initializers) run
        through ``onnxruntime.quantization.quantize_dynamic`` (QInt8), which
        turns it into com.microsoft's DynamicQuantizeLSTM (the exported file
        computes its weights, so the quantizer would leave it alone).

Threads are pinned per engine as in run_all.py: ``num_threads=n`` per call,
``torch.set_num_threads(n)`` right before every torch call, ORT
intra_op_num_threads=n / inter_op 1 / sequential.  For every configuration
and thread count the engines are timed interleaved (run_all.time_interleaved:
rotating order, an untimed call after each switch) and medians reported.
Outputs are checked first against fastlstm float32 (float32 engines < 1e-4,
fastlstm reduced < 1e-2, torch/ORT quantized < 0.1: they also quantize
activations and W_ih).

    python benchmarks/bench_precision.py            # 12 configs x 12 engines (~10 min)
    python benchmarks/bench_precision.py --quick    # tiny sizes: smoke test (~30 s)
    python benchmarks/bench_precision.py --threads 1 --hidden 512 --batch 1

Prints a Markdown table (per configuration, thread count and precision:
fastlstm's median, its speedup over fastlstm float32, torch's and ORT's
median at the same precision and fastlstm's speedup over them) and writes
benchmarks/results/precision.json (precision_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peers  # noqa: E402
from run_all import SETTLE_S, time_interleaved  # noqa: E402

PRECISIONS = ("float32", "float16", "bfloat16", "bfloat16f32", "int8", "int8a16")
ENGINES = tuple(f"fastlstm {p}" for p in PRECISIONS) + (
    "torch float32", "torch qint8", "torch float16", "torch bfloat16", "ORT float32", "ORT int8")
# Which peer runs "the same precision" as each fastlstm precision.
SAME = {"float32": ("torch float32", "ORT float32"), "float16": ("torch float16", None),
        "bfloat16": ("torch bfloat16", None), "bfloat16f32": ("torch bfloat16", None),
        "int8": ("torch qint8", "ORT int8"),
        "int8a16": ("torch qint8", "ORT int8")}
# Max abs difference from fastlstm float32 before an engine counts as broken.
TOL = {"fastlstm float32": 0.0, "torch float32": peers.TOLERANCE, "ORT float32": peers.TOLERANCE,
       "fastlstm float16": 1e-2, "fastlstm bfloat16": 5e-2, "fastlstm bfloat16f32": 1e-2,
       "fastlstm int8": 0.1, "torch bfloat16": 0.1,
       "fastlstm int8a16": 1e-2,
       "torch qint8": 0.1, "torch float16": 0.1, "ORT int8": 0.1}

HIDDEN = (256, 512, 1024)
BATCH = (1, 8)
QUICK_HIDDEN = (32, 64)
QUICK_BATCH = (1, 4)


def make_configs(hidden, batch, T):
    return [peers.Config(T, b, h // 2, h, 1, 1) for b in batch for h in hidden]


# ------------------------------------------------------------------ runners
def fastlstm_runner(module, precision, threads):
    import fastlstm
    m = fastlstm.LSTM.from_torch(module)
    m = (m.astype("int8", activation_bits=16) if precision == "int8a16" else
         m.astype("bfloat16", input_weights="float32", activation_bits=32)
         if precision == "bfloat16f32" else m.astype(precision))

    def run(x):
        return m(x, num_threads=threads)[0]

    return peers.Runner(f"fastlstm {precision}", run, threads,
                        {"isa": fastlstm.cpu_info()["isa"], "packed_bytes": int(m.packed_nbytes)})


def torch_dynamic(module, dtype):
    """The LSTM quantized by torch.ao's quantize_dynamic (wrapped: a bare
    nn.LSTM root is returned unquantized)."""
    import torch

    class Holder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.lstm = m

        def forward(self, x):
            return self.lstm(x)[0]

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao.quantization
        q = torch.ao.quantization.quantize_dynamic(Holder(module), {torch.nn.LSTM}, dtype=dtype)
    if type(q.lstm) is torch.nn.LSTM:
        raise RuntimeError("quantize_dynamic left the LSTM unquantized")
    return q.lstm.eval()


def torch_bf16_runner(module, threads):
    """nn.LSTM in bfloat16: the float32 input converted and the output widened
    inside the call (the conversions are O(T N (In + H)), the LSTM's work
    O(T N H (In + H)))."""
    import torch

    def run(x):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(torch.bfloat16))[0].float().numpy()

    return peers.Runner("torch bfloat16", run, threads,
                        {"mkldnn_enabled": bool(torch.backends.mkldnn.is_available()
                                                and torch.backends.mkldnn.enabled)})


def onnx_lstm_graph(module, cfg, path):
    """A one-node ONNX LSTM (W, R, B as initializers; output (T, N, H)) for a
    one-layer unidirectional nn.LSTM.  ONNX gate order is i, o, f, c."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if cfg.layers != 1 or cfg.dirs != 1:
        raise ValueError("onnx_lstm_graph: one layer, one direction only")
    sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}

    def reorder(w):
        i, f, g, o = np.split(w, 4, axis=0)
        return np.concatenate([i, o, f, g], axis=0)

    inits = [
        numpy_helper.from_array(reorder(sd["weight_ih_l0"])[None].astype(np.float32), "W"),
        numpy_helper.from_array(reorder(sd["weight_hh_l0"])[None].astype(np.float32), "R"),
        numpy_helper.from_array(np.concatenate([reorder(sd["bias_ih_l0"]), reorder(
            sd["bias_hh_l0"])])[None].astype(np.float32), "B"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=cfg.hidden),
             helper.make_node("Squeeze", ["Y", "axis1"], ["y"])]
    graph = helper.make_graph(
        nodes, "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [cfg.T, cfg.batch, cfg.input])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [cfg.T, cfg.batch, cfg.hidden])],
        inits)
    # IR 8 / opset 17: read by every onnxruntime this benchmark may meet
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def ort_int8_model(module, cfg, workdir):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src = onnx_lstm_graph(module, cfg, os.path.join(workdir, f"{cfg.label}_f32_node.onnx"))
    dst = os.path.join(workdir, f"{cfg.label}_int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "consider pre-processing" advice
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM"])
    finally:
        root.setLevel(level)
    import onnx
    ops = sorted({n.op_type for n in onnx.load(dst).graph.node})
    if "DynamicQuantizeLSTM" not in ops:
        raise RuntimeError(f"quantize_dynamic did not quantize the LSTM (ops {ops})")
    return {"path": dst, "ops": ops}


def build(module, cfg, threads, workdir, engines, cache):
    """Runners for ``engines`` at ``threads``; ``cache`` holds what is built
    once per config (quantized torch modules, ONNX files)."""
    import torch
    runners, skipped = {}, {}
    for name in engines:
        try:
            if name.startswith("fastlstm "):
                runners[name] = fastlstm_runner(module, name.split()[1], threads)
            elif name == "torch float32":
                runners[name] = peers.make_torch_runner(module, cfg, threads)
            elif name in ("torch qint8", "torch float16"):
                if name not in cache:
                    cache[name] = torch_dynamic(
                        module, torch.qint8 if name == "torch qint8" else torch.float16)
                r = peers.make_torch_runner(cache[name], cfg, threads)
                r.info["module"] = type(cache[name]).__module__ + "." + type(cache[name]).__name__
                runners[name] = r
            elif name == "torch bfloat16":
                if name not in cache:
                    import copy
                    cache[name] = copy.deepcopy(module).to(torch.bfloat16).eval()
                runners[name] = torch_bf16_runner(cache[name], threads)
            elif name == "ORT float32":
                if "onnx" not in cache:
                    cache["onnx"] = peers.export_onnx(
                        module, cfg, os.path.join(workdir, f"{cfg.label}.onnx"))
                runners[name] = peers.make_ort_runner(cache["onnx"]["path"], cfg, threads)
            elif name == "ORT int8":
                if "onnx_int8" not in cache:
                    cache["onnx_int8"] = ort_int8_model(module, cfg, workdir)
                runners[name] = peers.make_ort_runner(cache["onnx_int8"]["path"], cfg, threads)
            else:
                raise ValueError(f"unknown engine {name!r}")
            runners[name].name = name
        except Exception as e:  # noqa: BLE001 - a peer that cannot be built is skipped
            skipped[name] = f"{type(e).__name__}: {str(e)[:300]}"
    return runners, skipped


def check(runners, x):
    """Max abs difference of every runner's output from fastlstm float32's
    (also every runner's warm-up call)."""
    ref = np.array(runners["fastlstm float32"](x), dtype=np.float64)
    diffs = {}
    for name, r in runners.items():
        out = np.asarray(r(x))
        diffs[name] = (float("nan") if out.shape != ref.shape
                       else float(np.max(np.abs(out.astype(np.float64) - ref))))
    return diffs


# ------------------------------------------------------------------- output
def _ms(v):
    if v is None:
        return "–"
    return f"{v:.1f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def _x(v):
    return "–" if v is None else f"{v:.2f}x"


def rows_of(result):
    """Per fastlstm precision: its time and speedups (for the table)."""
    eng = result["engines"]
    med = {n: e["median_ms"] for n, e in eng.items()}
    f32 = med.get("fastlstm float32")
    out = []
    for p in PRECISIONS:
        mine = med.get(f"fastlstm {p}")
        t_name, o_name = SAME[p]
        t, o = med.get(t_name), med.get(o_name)
        out.append({
            "precision": p, "fastlstm_ms": mine,
            "speedup_vs_fastlstm_float32": f32 / mine if (f32 and mine) else None,
            "torch_engine": t_name, "torch_ms": t,
            "speedup_vs_torch": t / mine if (t and mine) else None,
            "ort_engine": o_name, "ort_ms": o,
            "speedup_vs_ort": o / mine if (o and mine) else None,
        })
    return out


def markdown_table(results):
    lines = ["| T, batch, input, hidden | threads | weights | fastlstm ms | vs fastlstm f32 | "
             "torch, same precision | fastlstm vs torch | ORT, same precision | "
             "fastlstm vs ORT |",
             "|---|---|---|---|---|---|---|---|---|"]
    short = {"torch float32": "f32", "torch float16": "dyn. f16", "torch qint8": "dyn. qint8",
             "torch bfloat16": "bf16",
             "ORT float32": "f32", "ORT int8": "DynamicQuantizeLSTM"}
    for res in results:
        c = res["config"]
        for r in res["rows"]:
            t = f"{_ms(r['torch_ms'])} ({short[r['torch_engine']]})" if r["torch_ms"] else "–"
            o = f"{_ms(r['ort_ms'])} ({short[r['ort_engine']]})" if r["ort_ms"] else "–"
            lines.append(
                f"| {c['T']}, {c['batch']}, {c['input']}, {c['hidden']} | {res['threads']} | "
                f"{r['precision']} | {_ms(r['fastlstm_ms'])} | "
                f"{_x(r['speedup_vs_fastlstm_float32'])} | {t} | {_x(r['speedup_vs_torch'])} | "
                f"{o} | {_x(r['speedup_vs_ort'])} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: smoke test")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (1,2)")
    ap.add_argument("--hidden", default=None, help="comma-separated hidden sizes "
                    f"(default {','.join(map(str, HIDDEN))}); input = hidden / 2")
    ap.add_argument("--batch", default=None,
                    help=f"comma-separated batch sizes (default {','.join(map(str, BATCH))})")
    ap.add_argument("--T", type=int, default=None, help="sequence length (100; 20 quick)")
    ap.add_argument("--engines", default=",".join(ENGINES),
                    help="comma-separated subset of: " + ", ".join(ENGINES)
                    + " (fastlstm float32 always runs)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (5; 3 quick)")
    ap.add_argument("--min-calls", type=int, default=None,
                    help="least timed calls per engine (5; 3 quick)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="least seconds of timed calls per engine (2.0; 0.05 quick)")
    ap.add_argument("--out", default=None, help="JSON path (default "
                    "benchmarks/results/precision.json, precision_quick.json with --quick)")
    a = ap.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    try:
        a.thread_list = ints(a.threads)
        a.hidden_list = ints(a.hidden) if a.hidden else list(QUICK_HIDDEN if a.quick else HIDDEN)
        a.batch_list = ints(a.batch) if a.batch else list(QUICK_BATCH if a.quick else BATCH)
    except ValueError as e:
        ap.error(str(e))
    if not a.thread_list or min(a.thread_list + a.hidden_list + a.batch_list) < 1:
        ap.error("thread counts, hidden and batch sizes must be >= 1")
    if min(a.hidden_list) < 2:
        ap.error("--hidden: need >= 2 (input = hidden / 2)")
    a.T = a.T or (20 if a.quick else 100)
    a.repeats = a.repeats or (3 if a.quick else 5)
    a.min_calls = a.min_calls or (3 if a.quick else 5)
    a.min_time = a.min_time if a.min_time is not None else (0.05 if a.quick else 2.0)
    a.engine_list = ["fastlstm float32"] + [e.strip() for e in a.engines.split(",")
                                            if e.strip() and e.strip() != "fastlstm float32"]
    bad = [e for e in a.engine_list if e not in ENGINES]
    if bad:
        ap.error(f"--engines: unknown {bad}")
    a.out = a.out or os.path.join(HERE, "results",
                                  "precision_quick.json" if a.quick else "precision.json")
    return a


def main(argv=None):
    args = parse_args(argv)
    configs = make_configs(args.hidden_list, args.batch_list, args.T)
    started = time.time()
    machine = peers.machine_info()
    vers = peers.versions()
    ncpu = os.cpu_count() or 1
    print(f"fastlstm {vers['fastlstm']} ({machine.get('fastlstm_cpu_info')})")
    print(f"torch {vers['torch']}, onnxruntime {vers['onnxruntime']}")
    print(f"CPU: {machine.get('cpu_model', '?')}, {ncpu} CPUs, load {machine.get('loadavg')}")
    if machine.get("loadavg", [0.0])[0] > 0.5:
        print("warning: load average > 0.5 before start: timings will be noisy", file=sys.stderr)
    print(f"{len(configs)} configs x threads {args.thread_list} x {len(args.engine_list)} "
          f"engines; {args.repeats} rounds, >= {args.min_calls} calls and >= "
          f"{args.min_time:g} s per engine\n")
    results, problems = [], []
    with tempfile.TemporaryDirectory(prefix="fastlstm_prec_") as workdir:
        for ci, cfg in enumerate(configs):
            module = peers.make_module(cfg)
            x = peers.make_input(cfg)
            cache = {}
            for n in args.thread_list:
                t0 = time.time()
                print(f"[{ci + 1}/{len(configs)}] {cfg.label} threads={n}")
                runners, skipped = build(module, cfg, n, workdir, args.engine_list, cache)
                for e, why in skipped.items():
                    print(f"   {e:<18} skipped: {why}")
                if "fastlstm float32" not in runners:
                    print("   fastlstm float32 could not be built", file=sys.stderr)
                    continue
                diffs = check(runners, x)
                for e, d in diffs.items():
                    if not d <= TOL[e]:
                        problems.append({"config": cfg.label, "threads": n, "engine": e,
                                         "max_abs_diff": d, "tolerance": TOL[e]})
                        print(f"   !!! {e}: max abs diff {d:.3g} from fastlstm float32 > "
                              f"{TOL[e]:g}", file=sys.stderr)
                eng = time_interleaved(runners, x, args.repeats, args.min_calls, args.min_time,
                                       settle_s=0.0 if args.quick else SETTLE_S)
                for e in args.engine_list:
                    if e in eng:
                        r = eng[e]
                        print(f"   {e:<18} {r['median_ms']:10.3f} ms  (IQR {r['q25_ms']:.3f}-"
                              f"{r['q75_ms']:.3f}, {r['calls']} calls)  diff {diffs[e]:.1e}")
                res = {"config": {k: getattr(cfg, k) for k in
                                  ("T", "batch", "input", "hidden", "layers", "dirs")},
                       "label": cfg.label, "threads": n, "skipped": skipped,
                       "max_abs_diff_vs_fastlstm_float32": diffs,
                       "runner_info": {e: r.info for e, r in runners.items()},
                       "engines": eng}
                res["rows"] = rows_of(res)
                results.append(res)
                print(f"   [{time.time() - t0:.1f} s]\n")
                del runners
                gc.collect()
    table = markdown_table(results)
    print(table)
    peers.note_load_end(machine)
    doc = {
        **peers.result_header(argv),
        "settings": {"quick": args.quick, "threads": args.thread_list,
                     "hidden": args.hidden_list, "batch": args.batch_list, "T": args.T,
                     "engines": args.engine_list, "repeats": args.repeats,
                     "min_calls": args.min_calls, "min_time_s": args.min_time,
                     "tolerances": TOL},
        "machine": machine, "versions": vers, "elapsed_s": time.time() - started,
        "problems": problems, "results": results, "markdown": table,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {os.path.relpath(args.out)} in {time.time() - started:.0f} s")
    if problems:
        print(f"!!! {len(problems)} engine(s) beyond their tolerance: {problems}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

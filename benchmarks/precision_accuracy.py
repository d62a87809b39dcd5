#!/usr/bin/env python
"""Accuracy of reduced-precision recurrent weights (``LSTM.astype``).

(a) Random models: for each precision (float16; bfloat16: W_ih and W_hh
    bfloat16, h and the inputs rounded to bfloat16, astype("bfloat16");
    bfloat16_f32in: W_hh only, h rounded, astype("bfloat16",
    input_weights="float32"); bfloat16_f32in_a32: W_hh only, float32
    activations; int8: W_ih and W_hh
    int8 with 8-bit codes of h and the inputs, astype("int8"); int8_a16:
    int16 codes, astype("int8", activation_bits=16); int8_f32in: int8 W_hh
    only, astype("int8", input_weights="float32")), the max abs
    error of outputs and final states against the same float32 model, over
    random models (torch's default init, inputs N(0, 1), T = 100; hidden 17,
    33, 64, 256, 512; batch 1 and 5; bidirectional, 2 layers, proj_size).
(b) Trained models: three small tasks trained with torch on this CPU (about
    a minute in all), converted with ``fastlstm.LSTM.from_torch(lstm)
    .astype(p)`` (as_precision); the linear head runs in NumPy (float64) on fastlstm's
    output.  Each task's metric is reported per precision, with torch's own
    dynamic quantization (``quantize_dynamic``, qint8 and float16: all LSTM
    weights, and for qint8 the activations too) for context:

    * ``sine``: one-step-ahead forecasting of a sum of two sines from a noisy
      history (noise sd 0.2); MSE against the clean next value (steps 20..).
    * ``freq``: classify which of 6 frequencies a very noisy sine has (noise
      sd 1.0, T = 100, read at the last step); accuracy and cross-entropy.
    * ``parity``: running parity of a +-1 bit stream, trained on T <= 40 and
      evaluated on T = 1000 (a state that must be held exactly for long).

    python benchmarks/precision_accuracy.py             # ~1-2 min
    python benchmarks/precision_accuracy.py --quick     # smoke test (~10 s)

Writes benchmarks/results/precision_accuracy.json (``--out``) and prints
Markdown tables.  Everything is seeded: reruns give the same models; the
metrics can differ in the last digits between machines (BLAS, ISA paths).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import peers  # noqa: E402
from bench_precision import torch_dynamic  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "..", "tests"))
# The bounds tests/test_precision.py enforces (max_rel_err): the one table.
from tolerances import FORMS, PRECISION_TOL as TEST_BOUNDS  # noqa: E402

PRECISIONS = ("float32", "float16", "bfloat16", "bfloat16_f32in", "bfloat16_f32in_a32", "int8",
              "int8_a16", "int8_f32in")


def as_precision(m, p):
    """The astype of key p (tests/tolerances.py FORMS, else astype(p))."""
    if p in FORMS:
        return m.astype(FORMS[p][0], **FORMS[p][1])
    return m.astype(p)


# -------------------------------------------------------- (a) random models
RANDOM_CONFIGS = [  # (input, hidden, batch, options)
    (8, 17, 1, {}), (8, 17, 5, {"bidirectional": True}),
    (16, 33, 1, {"num_layers": 2}), (16, 33, 5, {"proj_size": 11}),
    (32, 64, 5, {}), (32, 64, 1, {"num_layers": 2, "bidirectional": True}),
    (128, 256, 1, {}), (128, 256, 5, {"proj_size": 64}),
    (256, 512, 1, {}), (256, 512, 5, {}),
]


def random_model_errors(seeds, T=100):
    import fastlstm
    rows = []
    for (In, H, N, opts) in RANDOM_CONFIGS:
        for seed in range(seeds):
            m = fastlstm.LSTM(In, H, seed=seed, **opts)
            x = np.random.default_rng(seed + 7).standard_normal((T, N, In)).astype(np.float32)
            o32, (h32, c32) = m(x)
            row = {"input": In, "hidden": H, "batch": N, "T": T, "options": opts, "seed": seed,
                   "max_abs_err": {}, "mean_abs_err_out": {}}
            for p in PRECISIONS[1:]:
                o, (h, c) = as_precision(m, p)(x)
                row["max_abs_err"][p] = float(max(np.abs(o - o32).max(), np.abs(h - h32).max(),
                                                  np.abs(c - c32).max()))
                row["mean_abs_err_out"][p] = float(np.abs(o - o32).mean())
            rows.append(row)
    summary = {}
    for p in PRECISIONS[1:]:
        errs = [r["max_abs_err"][p] for r in rows]
        big = [r["max_abs_err"][p] for r in rows if r["hidden"] >= 256]
        summary[p] = {"max_abs_err": max(errs), "median_of_max_abs_err": float(np.median(errs)),
                      "max_abs_err_hidden_ge_256": max(big) if big else None,
                      "mean_abs_err_out": float(np.mean([r["mean_abs_err_out"][p]
                                                         for r in rows])),
                      "test_bound": TEST_BOUNDS[p]}
    return rows, summary


# ----------------------------------------------------------------- (b) tasks
def _sine_batch(rng, n, T):
    t = np.arange(T + 1)[:, None]
    f = rng.uniform(0.01, 0.1, (2, n))
    ph = rng.uniform(0, 2 * np.pi, (2, n))
    a = rng.uniform(0.3, 1.0, (2, n))
    clean = (a[0] * np.sin(2 * np.pi * f[0] * t + ph[0])
             + a[1] * np.sin(2 * np.pi * f[1] * t + ph[1]))
    noisy = clean + rng.normal(0, 0.2, clean.shape)
    return noisy[:-1, :, None].astype(np.float32), clean[1:, :, None].astype(np.float32)


FREQS = np.linspace(0.03, 0.15, 6)


def _freq_batch(rng, n, T):
    c = rng.integers(0, len(FREQS), n)
    t = np.arange(T)[:, None]
    f = FREQS[c] * rng.uniform(0.97, 1.03, n)
    x = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi, n)) + rng.normal(0, 1.0, (T, n))
    return x[:, :, None].astype(np.float32), c


def _parity_batch(rng, n, T):
    b = rng.integers(0, 2, (T, n, 1))
    return (2.0 * b - 1).astype(np.float32), (np.cumsum(b, 0) % 2).astype(np.float32)


TASKS = {
    # Adam with a cosine learning-rate decay; clip: gradient norm clipping
    # (None for freq: with it, training at this noise level stalls at chance).
    "sine": dict(hidden=64, out=1, steps=1200, quick=60, batch=32, lr=5e-3, T=100, clip=1.0),
    "freq": dict(hidden=64, out=len(FREQS), steps=1500, quick=60, batch=32, lr=1e-2, T=100,
                 clip=None),
    "parity": dict(hidden=32, out=1, steps=400, quick=40, batch=64, lr=1e-2, T=(10, 40),
                   clip=1.0),
}
SKIP = 20  # sine: forecasts from step 20 on are scored (a warm-up for the state)


def _train(name, spec, quick, seed):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(1, spec["hidden"])
            self.head = nn.Linear(spec["hidden"], spec["out"])

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    net = Net()
    steps = spec["quick"] if quick else spec["steps"]
    opt = torch.optim.Adam(net.parameters(), spec["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.perf_counter()
    for _ in range(steps):
        if name == "sine":
            x, y = _sine_batch(rng, spec["batch"], spec["T"])
            loss = nn.functional.mse_loss(net(torch.from_numpy(x))[SKIP:],
                                          torch.from_numpy(y)[SKIP:])
        elif name == "freq":
            x, y = _freq_batch(rng, spec["batch"], spec["T"])
            loss = nn.functional.cross_entropy(net(torch.from_numpy(x))[-1], torch.from_numpy(y))
        else:
            x, y = _parity_batch(rng, spec["batch"], int(rng.integers(*spec["T"])))
            loss = nn.functional.binary_cross_entropy_with_logits(net(torch.from_numpy(x)),
                                                                  torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        if spec["clip"]:
            nn.utils.clip_grad_norm_(net.parameters(), spec["clip"])
        opt.step()
        sched.step()
    return net.eval(), steps, time.perf_counter() - t0


def _test_set(name, quick, seed):
    rng = np.random.default_rng(seed + 12345)
    if name == "sine":
        return _sine_batch(rng, 256 if quick else 2048, 100)
    if name == "freq":
        return _freq_batch(rng, 512 if quick else 4096, 100)
    return _parity_batch(rng, 64 if quick else 256, 1000)


def _metrics(name, hseq, head_w, head_b, y):
    """Task metrics from the LSTM output sequence (T, N, H), head in float64."""
    if name == "freq":
        logits = hseq[-1].astype(np.float64) @ head_w.T + head_b
        z = logits - logits.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        pred = logits.argmax(1)
        return {"accuracy": float((pred == y).mean()),
                "cross_entropy": float(-logp[np.arange(len(y)), y].mean())}, pred
    pre = hseq.astype(np.float64) @ head_w.T + head_b
    if name == "sine":
        return {"mse": float(((pre[SKIP:] - y[SKIP:]) ** 2).mean())}, pre
    pred = pre > 0
    p = 1 / (1 + np.exp(-np.clip(pre, -50, 50)))
    eps = 1e-12
    bce = -(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)).mean()
    return {"accuracy": float((pred == (y > 0.5)).mean()),
            "bce": float(bce)}, pred


def run_task(name, quick, seed):
    import torch
    import fastlstm

    spec = TASKS[name]
    net, steps, train_s = _train(name, spec, quick, seed)
    x, y = _test_set(name, quick, seed)
    head_w = net.head.weight.detach().numpy().astype(np.float64)
    head_b = net.head.bias.detach().numpy().astype(np.float64)
    outputs = {}
    with torch.inference_mode():
        outputs["torch float32"] = net.lstm(torch.from_numpy(x))[0].numpy()
        for label, dt in (("torch dynamic qint8", torch.qint8),
                          ("torch dynamic float16", torch.float16)):
            try:
                outputs[label] = torch_dynamic(net.lstm, dt)(torch.from_numpy(x))[0].numpy()
            except Exception as e:  # noqa: BLE001
                outputs[label] = f"unavailable ({type(e).__name__}: {e})"
    base = fastlstm.LSTM.from_torch(net.lstm)
    for p in PRECISIONS:
        outputs[f"fastlstm {p}"] = as_precision(base, p)(x)[0]
    ref_out = outputs["fastlstm float32"]
    _, ref_pred = _metrics(name, ref_out, head_w, head_b, y)
    rows = {}
    for label, out in outputs.items():
        if isinstance(out, str):
            rows[label] = {"error": out}
            continue
        met, pred = _metrics(name, out, head_w, head_b, y)
        met["max_abs_err_vs_fastlstm_float32"] = float(np.abs(out - ref_out).max())
        met["mean_abs_err_vs_fastlstm_float32"] = float(np.abs(out - ref_out).mean())
        if name != "sine":
            met["predictions_changed"] = int((pred != ref_pred).sum())
            met["predictions"] = int(pred.size)
        rows[label] = met
    return {"task": name, "hidden": spec["hidden"], "train_steps": steps,
            "train_seconds": round(train_s, 2), "test_shape": list(x.shape), "results": rows}


# ------------------------------------------------------------------- output
def _fmt(v, digits=4):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2e}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4)) else f"{v:.{digits}g}"
    return str(v)


def markdown(summary, tasks):
    lines = ["Random models: max abs error of outputs and final states vs the float32 model",
             "", "| weights | max abs err | median of per-model max | max (hidden >= 256) | "
             "mean abs err (out) | test bound (max_rel_err) |",
             "|---|---|---|---|---|---|"]
    for p, s in summary.items():
        lines.append(f"| {p} | {_fmt(s['max_abs_err'])} | {_fmt(s['median_of_max_abs_err'])} | "
                     f"{_fmt(s['max_abs_err_hidden_ge_256'])} | {_fmt(s['mean_abs_err_out'])} | "
                     f"{_fmt(s['test_bound'])} |")
    for t in tasks:
        res = t["results"]
        keys = [k for k in next(iter(res.values())) if k not in (
            "max_abs_err_vs_fastlstm_float32", "mean_abs_err_vs_fastlstm_float32",
            "predictions_changed", "predictions")]
        lines += ["", f"Task `{t['task']}` (hidden {t['hidden']}, {t['train_steps']} training "
                  f"steps in {t['train_seconds']:.0f} s, test {tuple(t['test_shape'])})", "",
                  "| model | " + " | ".join(keys) + " | change vs fastlstm float32 | "
                  "h vs fastlstm float32: max abs err | mean abs err |"
                  + (" predictions changed |" if t["task"] != "sine" else ""),
                  "|---|" + "---|" * (len(keys) + 3 + (t["task"] != "sine"))]
        ref = res["fastlstm float32"]
        for label, r in res.items():
            if "error" in r:
                lines.append(f"| {label} | {r['error']} |")
                continue
            k0 = keys[0]
            delta = r[k0] - ref[k0]
            cells = [_fmt(r[k]) for k in keys]
            row = (f"| {label} | " + " | ".join(cells) + f" | {k0} {delta:+.2e} | "
                   f"{_fmt(r['max_abs_err_vs_fastlstm_float32'])} | "
                   f"{_fmt(r['mean_abs_err_vs_fastlstm_float32'])} |")
            if t["task"] != "sine":
                row += f" {r['predictions_changed']} / {r['predictions']} |"
            lines.append(row)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few training steps, small test sets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=None,
                    help="random models per configuration in (a) (default 3; 1 quick)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch threads for training (default min(2, CPUs))")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"subset of {','.join(TASKS)}")
    ap.add_argument("--out", default=None, help="JSON path (default "
                    "benchmarks/results/precision_accuracy[_quick].json)")
    a = ap.parse_args(argv)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        ap.error(f"--tasks: unknown {bad}")
    import torch
    import fastlstm
    torch.set_num_threads(a.threads)
    out = a.out or os.path.join(HERE, "results", "precision_accuracy"
                                + ("_quick" if a.quick else "") + ".json")
    t0 = time.time()
    print(f"fastlstm {fastlstm.__version__ if hasattr(fastlstm, '__version__') else '?'} "
          f"({fastlstm.cpu_info()['isa']}), torch {torch.__version__}, {a.threads} torch threads")
    rows, summary = random_model_errors(a.seeds or (1 if a.quick else 3))
    print(f"(a) {len(rows)} random models done [{time.time() - t0:.0f} s]")
    results = []
    for t in tasks:
        r = run_task(t, a.quick, a.seed)
        results.append(r)
        print(f"(b) task {t}: {r['train_steps']} steps in {r['train_seconds']:.1f} s")
    table = markdown(summary, results)
    print()
    print(table)
    doc = {
        **peers.result_header(argv),
        "settings": {"quick": a.quick, "seed": a.seed, "threads": a.threads, "tasks": tasks},
        "machine": peers.machine_info(), "versions": peers.versions(),
        "random_models": {"configs": [list(c[:3]) + [c[3]] for c in RANDOM_CONFIGS],
                          "summary": summary, "rows": rows},
        "tasks": results, "markdown": table, "elapsed_s": time.time() - t0,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {os.path.relpath(out)} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Tokens per second of autoregressive generation: fastlstm.Network.generate
(the whole loop in C) against the same loop written in PyTorch.

The model is a character-level language model (Embedding -> LSTM -> Linear)
with random weights; both engines run it on the same weights.  The PyTorch
loop is the usual one under torch.inference_mode(): the prompt in one call,
then per token softmax(logits / T) -> torch.multinomial (or argmax for
greedy) -> embedding -> one LSTM step with the carried state -> Linear.
Rounds interleave the engines (order rotating) and medians are reported, so
drifting machine load hits both alike.  Greedy outputs are cross-checked
(token for token) before timing.

    python benchmarks/bench_generate.py                 # batch 1 and 16, 1 thread
    python benchmarks/bench_generate.py --quick         # a smoke test (seconds)
    python benchmarks/bench_generate.py --batches 1,4,16,64 --threads 2 --hidden 256

Target: >= 3x PyTorch's tokens/s at batch 1.  Timings on a shared or busy
machine are noisy; compare medians of several repeats.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def build(vocab, embed, hidden, layers, seed=0):
    import torch
    from torch import nn

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, embed)
            self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
            self.head = nn.Linear(hidden, vocab)

    torch.manual_seed(seed)
    return CharLM().eval()


def torch_generate(model, prompt, steps, temperature, seed=0):
    """The reference PyTorch loop; returns (N, steps) int64 tokens."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        x = torch.as_tensor(prompt)
        out, hc = model.lstm(model.embed(x))
        logits = model.head(out[:, -1])
        toks = torch.empty((x.shape[0], steps), dtype=torch.long)
        for s in range(steps):
            if temperature == 0:
                t = torch.argmax(logits, dim=-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                t = torch.multinomial(probs, 1, generator=g)[:, 0]
            toks[:, s] = t
            out, hc = model.lstm(model.embed(t[:, None]), hc)
            logits = model.head(out[:, -1])
    return toks.numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny run: checks that it works")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 40, 2

    import torch
    import fastlstm
    from fastlstm.network import Network

    torch.set_num_threads(args.threads)
    model = build(args.vocab, args.embed, args.hidden, args.layers)
    net = Network.from_torch(model, mode="prediction", num_threads=args.threads)
    rng = np.random.default_rng(0)
    info = fastlstm.cpu_info()
    print(f"fastlstm {fastlstm.__version__} ({info['isa']}), torch {torch.__version__}; "
          f"{info['num_cpus']} CPUs, {args.threads} thread(s)")
    print(f"model: vocab {args.vocab}, embedding {args.embed}, LSTM {args.hidden} x "
          f"{args.layers}; prompt {args.prompt_len}, {args.steps} steps, "
          f"temperature {args.temperature}")
    print(f"{'batch':>5}  {'fastlstm tok/s':>15}  {'torch tok/s':>12}  {'speed-up':>8}")
    rows = []
    for N in [int(b) for b in args.batches.split(",")]:
        prompt = rng.integers(0, args.vocab, (N, args.prompt_len))
        # cross-check: greedy decoding token for token (a few steps)
        a = net.generate(prompt, 20, temperature=0)
        b = torch_generate(model, prompt, 20, 0.0)
        if not np.array_equal(a, b):
            print(f"!!! MISMATCH at batch {N}: greedy tokens differ from PyTorch's")
        runs = {
            "fastlstm": lambda: net.generate(prompt, args.steps, temperature=args.temperature,
                                             seed=1),
            "torch": lambda: torch_generate(model, prompt, args.steps, args.temperature),
        }
        times = {k: [] for k in runs}
        for fn in runs.values():  # warm-up
            fn()
        order = list(runs)
        for r in range(args.repeats):
            for name in order[r % 2:] + order[:r % 2]:
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
        tps = {k: N * args.steps / statistics.median(v) for k, v in times.items()}
        rows.append((N, tps["fastlstm"], tps["torch"]))
        print(f"{N:>5}  {tps['fastlstm']:>15,.0f}  {tps['torch']:>12,.0f}  "
              f"{tps['fastlstm'] / tps['torch']:>7.1f}x")
    return rows


if __name__ == "__main__":
    main()

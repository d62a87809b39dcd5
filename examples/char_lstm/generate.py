#!/usr/bin/env python
"""Generate text with the character LSTM of train.py on fastlstm, and time it
against the same loop in PyTorch.

    python examples/char_lstm/train.py       # once: writes char_lstm.pt
    python examples/char_lstm/generate.py --prompt "It is a truth" --chars 400
    python examples/char_lstm/generate.py --no-bench     # text only (no torch needed)

The checkpoint is read by fastlstm's own torch.save reader (a restricted
unpickler: nothing in the file is executed, torch is not needed);
Network.from_state_dict builds Embedding -> LSTM -> Linear from it, and
Network.generate runs the whole sampling loop in C.  The timing part
(tokens per second at batch 1 and 16) imports torch and runs the usual
PyTorch loop on the same weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from fastlstm.io import load_torch
from fastlstm.network import Network

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path):
    ckpt = load_torch(path)
    net = Network.from_state_dict(ckpt["model_state_dict"], lstm="lstm", embedding="embed",
                                  head="head", activation="log_softmax", mode="prediction")
    return net, ckpt["vocab"]


def torch_loop(model, prompt, steps, temperature, seed=0):
    """The PyTorch reference: prompt in one call, then sample -> embed -> step."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        out, state = model.lstm(model.embed(torch.as_tensor(prompt)))
        logits = model.head(out[:, -1])
        toks = torch.empty((prompt.shape[0], steps), dtype=torch.long)
        for s in range(steps):
            if temperature == 0:
                t = logits.argmax(-1)
            else:
                t = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)[:, 0]
            toks[:, s] = t
            out, state = model.lstm(model.embed(t[:, None]), state)
            logits = model.head(out[:, -1])
    return toks.numpy()


def bench(net, path, vocab, prompt_ids, steps, temperature, threads, repeats=5):
    import torch
    from train import CharLM
    ckpt = torch.load(path, weights_only=True)
    cfg = ckpt["config"]
    model = CharLM(len(vocab), cfg["embed"], cfg["hidden"], cfg["layers"])
    model.load_state_dict(ckpt["model_state_dict"])
    model.eval()
    torch.set_num_threads(threads)
    # the two engines agree token for token when decoding greedily
    a = net.generate(prompt_ids, 100, temperature=0)
    b = torch_loop(model, prompt_ids[None], 100, 0.0)[0]
    print(f"greedy decoding, fastlstm == PyTorch over 100 tokens: {np.array_equal(a, b)}")
    print(f"\ntokens per second ({steps} tokens per row, temperature {temperature}, "
          f"{threads} thread(s); a busy machine makes these noisy):")
    print(f"{'batch':>5}  {'fastlstm':>10}  {'PyTorch':>10}  {'speed-up':>8}")
    for N in (1, 16):
        prompts = np.repeat(prompt_ids[None], N, 0)
        runs = {"fastlstm": lambda: net.generate(prompts, steps, temperature=temperature,
                                                 seed=list(range(N)), num_threads=threads),
                "torch": lambda: torch_loop(model, prompts, steps, temperature)}
        times = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for r in range(repeats):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
        tps = {k: N * steps / statistics.median(v) for k, v in times.items()}
        print(f"{N:>5}  {tps['fastlstm']:>10,.0f}  {tps['torch']:>10,.0f}  "
              f"{tps['fastlstm'] / tps['torch']:>7.1f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(HERE, "char_lstm.pt"))
    ap.add_argument("--prompt", default="It is a truth")
    ap.add_argument("--chars", type=int, default=400)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bench-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args(argv)

    if not os.path.exists(args.model):
        raise SystemExit(f"{args.model} not found: run examples/char_lstm/train.py first")
    net, vocab = load(args.model)
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(args.prompt) - set(index))
    if unknown:
        raise SystemExit(f"--prompt: characters {unknown} are not in the vocabulary")
    prompt_ids = np.array([index[ch] for ch in args.prompt])
    print(net)
    t0 = time.perf_counter()
    toks = net.generate(prompt_ids, args.chars, temperature=args.temperature, top_k=args.top_k,
                        seed=args.seed, num_threads=args.threads)
    dt = time.perf_counter() - t0
    print(f"\n--- temperature {args.temperature}, seed {args.seed} "
          f"({args.chars} characters in {dt * 1e3:.1f} ms) ---")
    print(args.prompt + "".join(vocab[t] for t in toks))
    print("---")
    if not args.no_bench:
        import sys
        sys.path.insert(0, HERE)
        bench(net, args.model, vocab, prompt_ids, args.bench_steps, 1.0, args.threads)


if __name__ == "__main__":
    main()

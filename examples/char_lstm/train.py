#!/usr/bin/env python
"""Train a small character-level LSTM language model with PyTorch.

    python examples/char_lstm/train.py                 # ~1-2 minutes on 2 cores
    python examples/char_lstm/train.py --seconds 20    # a quick, rougher model

The text is the first chapter of Jane Austen's "Pride and Prejudice" (1813,
public domain), shipped next to this script.  The model is
Embedding(vocab, 32) -> LSTM(32, 128, 2 layers) -> Linear(128, vocab); it is
trained on random windows of the text with teacher forcing and saved with
torch.save to char_lstm.pt as {"model_state_dict", "vocab", "config"}, which
generate.py loads into fastlstm (without needing torch to read it).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "pride_and_prejudice_ch1.txt")


class CharLM(nn.Module):
    def __init__(self, vocab, embed=32, hidden=128, layers=2, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        out, state = self.lstm(self.embed(x), state)
        return self.head(out), state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--out", default=os.path.join(HERE, "char_lstm.pt"))
    ap.add_argument("--embed", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--seconds", type=float, default=90.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with open(args.text, encoding="utf-8") as fh:
        text = fh.read()
    vocab = "".join(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(vocab)}
    data = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    print(f"text: {len(text)} characters, vocabulary {len(vocab)}")

    model = CharLM(len(vocab), args.embed, args.hidden, args.layers)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(  # cosine decay over the step budget
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / args.max_steps, 1.0))))
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    step = 0
    avg = None
    model.train()
    while step < args.max_steps and time.perf_counter() - t0 < args.seconds:
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,))
        x = torch.stack([data[s:s + args.seq_len] for s in starts])
        y = torch.stack([data[s + 1:s + args.seq_len + 1] for s in starts])
        logits, _ = model(x)
        loss = loss_fn(logits.reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 100 == 0:
            print(f"step {step:5d}  loss {avg:.3f}  ({time.perf_counter() - t0:.0f} s)")
    print(f"trained {step} steps in {time.perf_counter() - t0:.0f} s, loss {avg:.3f}")
    model.eval()
    torch.save({"model_state_dict": model.state_dict(), "vocab": vocab,
                "config": {"embed": args.embed, "hidden": args.hidden, "layers": args.layers}},
               args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

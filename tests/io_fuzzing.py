"""Shared helpers of the loader fuzz tests (tests/test_io_*.py).

The fuzz tests are seeded and of fixed length, so they are reproducible and
fast.  A longer run:

    FASTLSTM_FUZZ_ITERS=20000 python -m pytest -q tests/test_io_safetensors.py \
        tests/test_io_torchfile.py tests/test_io_torchscript.py tests/test_io_pt2.py \
        tests/test_io_native.py tests/test_io_onnx.py -k fuzz

(FASTLSTM_FUZZ_SEED=<int> changes the seed.)  Each iteration loads a damaged
file and checks that it either loads or raises fastlstm.FormatError (never
another exception), and, with tracemalloc, that the peak of memory allocated
while loading stays within a small multiple of the file size.
"""
import os
import tracemalloc

import fastlstm

ITERS = int(os.environ.get("FASTLSTM_FUZZ_ITERS", "0") or 0)
SEED = int(os.environ.get("FASTLSTM_FUZZ_SEED", "0") or 0)


def iters(default):
    return ITERS or default


def mem_bound(size):
    """Most bytes a load may allocate for a file of `size` bytes: the file,
    its tensors widened to float32 / copied into the model and packed, plus
    fixed overhead (modules, regex caches, zipfile structures)."""
    return 16 * size + 2 * 1024 * 1024


class Fuzzer:
    """Runs load attempts and records what happened; every `trace_every`-th
    attempt runs under tracemalloc (which makes allocation ~8x slower) and
    checks the peak of memory allocated while loading."""

    def __init__(self, trace_every=3):
        self.outcomes = {"ok": 0, "FormatError": 0}
        self.trace_every = trace_every
        self.count = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if tracemalloc.is_tracing():
            tracemalloc.stop()

    def attempt(self, load, size, what):
        self.count += 1
        trace = self.count % self.trace_every == 0
        if trace:
            tracemalloc.start()
        try:
            load()
        except fastlstm.FormatError:
            self.outcomes["FormatError"] += 1
        except Exception as exc:  # pragma: no cover - the failure being tested for
            raise AssertionError(f"{what}: raised {type(exc).__name__}: {exc}") from exc
        else:
            self.outcomes["ok"] += 1
        finally:
            if trace:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        if trace:
            assert peak <= mem_bound(size), f"{what}: allocated {peak} bytes for a {size}-byte file"


def flip_bytes(rng, data, lo=0, hi=None, count=None):
    data = bytearray(data)
    hi = len(data) if hi is None else hi
    if hi <= lo:
        return bytes(data)
    for _ in range(count or int(rng.integers(1, 9))):
        pos = int(rng.integers(lo, hi))
        mode = int(rng.integers(0, 3))
        if mode == 0:
            data[pos] ^= 1 << int(rng.integers(0, 8))
        elif mode == 1:
            data[pos] = int(rng.integers(0, 256))
        else:
            data[pos] = int(rng.choice([0x00, 0xFF, 0x7F, 0x80, ord("9"), ord("-")]))
    return bytes(data)


def truncate(rng, data):
    return data[: int(rng.integers(0, len(data)))]


def huge_int(rng):
    return int(rng.choice([-1, -(2 ** 31), 2 ** 31 - 1, 2 ** 32, 2 ** 40, 2 ** 62, 2 ** 63 - 1,
                           2 ** 64 - 1, 2 ** 64, 10 ** 30, 0, 1, 3]))

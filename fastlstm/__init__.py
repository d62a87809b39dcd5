"""fastlstm: fast, faithful LSTM inference on CPUs.

    import numpy as np, fastlstm
    m = fastlstm.LSTM(8, 16, num_layers=2, bidirectional=True)
    out, (h_n, c_n) = m(np.zeros((5, 3, 8), np.float32))

See README.md for the API, the loaders and the architecture.
"""
import os as _os

import numpy as _np

from . import _engine
from .errors import DTypeError, FastLSTMError, FormatError, ShapeError, WeightsError
from .model import LSTM

__version__ = "0.1.0"

__all__ = [
    "LSTM", "FastLSTMError", "ShapeError", "DTypeError", "WeightsError", "FormatError",
    "cpu_info", "set_isa", "set_num_threads", "get_num_threads",
]

_ISAS = ("portable", "avx2", "avx512")


def cpu_info():
    """Which kernel path runs and how many threads calls use by default.

    Returns a dict: ``isa`` (active path), ``isa_detected`` (best path this CPU,
    OS and build support), ``isas_available`` (every path that can be forced
    here), ``num_cpus``, ``num_threads``, ``congested_calls`` (how many
    multi-threaded calls spent over a third of their time waiting for a worker
    descheduled by other busy processes; after each, calls run on one thread
    for ~10 ms, since waiting at every step for a descheduled thread is slower
    than one thread alone)
    and ``int8_dot``: the instruction the active path computes int8-weight x
    quantized-state dot products with ("vpdpbusd" with AVX512_VNNI, on the
    8-bit codes, or 16-bit codes split into two byte planes; "vpmaddwd" on
    AVX-512 without it and on AVX2, "c" on the portable path), ``tuning``: the
    cache-blocking choices made for this CPU at import (``kc``: the GEMMs'
    K chunk; ``prefetch``: whether compute-bound steps prefetch the next
    W_hh panel; ``gchunk``: bytes of input projection computed ahead of the
    steps), which never change results; ``bf16_dot``: the instruction
    bfloat16-weight x bfloat16-h dot products run on (``astype("bfloat16")``,
    activation_bits=16): "vdpbf16ps" with AVX512_BF16, else "fma" (float32
    FMAs of the widened values, the same sums).
    """
    best = _engine.isa_detected()
    active = _engine.isa_active()
    if active == "portable":
        dot = "c"
    else:
        dot = "vpdpbusd" if active == "avx512" and _engine.int8_vnni_set(-1) else "vpmaddwd"
    return {
        "int8_dot": dot,
        "bf16_dot": "vdpbf16ps" if active == "avx512" and _engine.bf16_dot_set(-1) else "fma",
        "isa": active,
        "isa_detected": best,
        "isas_available": list(_ISAS[: _ISAS.index(best) + 1]),
        "num_cpus": _engine.num_cpus(),
        "num_threads": _engine.num_threads_get(),
        "congested_calls": _engine.congested_calls(),
        "tuning": {k: _engine.tune(k) for k in ("kc", "prefetch", "gchunk")},
    }


def set_isa(name=None):
    """Force the kernel path: "portable", "avx2", "avx512", or None for the
    best one detected.  A path this CPU lacks is lowered to the best one it
    has.  Returns the name of the path now active.  Weights need no repack:
    every path uses the same packed layout.  The environment variable
    FASTLSTM_ISA does the same at import."""
    if name is None:
        return _engine.isa_set(len(_ISAS))
    if name not in _ISAS:
        raise ValueError(f"name: expected one of {_ISAS} or None, got {name!r}")
    return _engine.isa_set(_ISAS.index(name))


def set_num_threads(n=None):
    """Default number of threads for calls that don't pass num_threads
    (None: one per online CPU).  The environment variable FASTLSTM_NUM_THREADS
    does the same at import."""
    if n is None:
        _engine.num_threads_set(0)
        return
    if isinstance(n, bool) or not isinstance(n, (int, _np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive int or None, got {n!r}")
    _engine.num_threads_set(int(min(n, 2 ** 31 - 1)))  # the engine clamps to the CPUs


def get_num_threads():
    """The default number of threads of a call."""
    return _engine.num_threads_get()


def _init_from_env():
    isa = _os.environ.get("FASTLSTM_ISA")
    if isa:
        if isa not in _ISAS:
            raise ImportError(f"FASTLSTM_ISA: expected one of {_ISAS}, got {isa!r}")
        set_isa(isa)
    nt = _os.environ.get("FASTLSTM_NUM_THREADS")
    if nt:
        if not nt.isdigit() or int(nt) < 1:
            raise ImportError(f"FASTLSTM_NUM_THREADS: expected a positive int, got {nt!r}")
        set_num_threads(int(nt))


_init_from_env()
from .io import list_stacks, load  # noqa: E402
from .network import Network  # noqa: E402  (whole networks: input stage, LSTM, head, generate)

__all__.append("Network")

"""Runners for fastlstm and the engines it is compared with.

Every runner wraps one engine, holds the weights of one ``torch.nn.LSTM`` and
a thread count pinned to ``n``, takes the same NumPy input ``x`` shaped
(T, N, input_size) float32 and returns the output sequence (T, N, D*hidden).

    cfg = Config(100, 1, 128, 256, 1, 1)
    module = make_module(cfg)
    runners, skipped, notes = build_runners(module, cfg, threads=1, workdir=tmp)
    diffs = cross_check(runners, make_input(cfg))

Engines:
  fastlstm      ``m(x, num_threads=n)``
  torch         ``torch.set_num_threads(n)`` right before every call (the
                setting is process-global), under ``torch.inference_mode()``
  onnxruntime   the ONNX file ``torch.onnx.export`` wrote; intra_op_num_threads=n,
                inter_op_num_threads=1, sequential execution
  openvino      the same ONNX file compiled for "CPU" with
                INFERENCE_NUM_THREADS=n, NUM_STREAMS=1, PERFORMANCE_HINT=LATENCY and
                INFERENCE_PRECISION_HINT=f32 (without it OpenVINO computes in
                bfloat16 on CPUs with AVX512-BF16/AMX and misses 1e-4)

A peer that cannot be imported or built is skipped; the reason is returned.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import platform
import sys
import warnings
from dataclasses import asdict, dataclass

import numpy as np

ENGINES = ("fastlstm", "torch", "onnxruntime", "openvino")
PEERS = ENGINES[1:]
SHORT = {"fastlstm": "fastlstm", "torch": "torch", "onnxruntime": "ORT", "openvino": "OpenVINO"}

# Max abs difference a peer's output may have from fastlstm's.
TOLERANCE = 1e-4


@functools.lru_cache(maxsize=None)
def peak_gflops_per_core():
    """Float32 FMA peak of one core of *this* machine, GFLOP/s, measured once
    per process (fastlstm._engine.fma_peak_gflops: register-only FMA chains on
    fastlstm's active ISA path, best of 5).  Measured rather than assumed:
    the machines this runs on differ (a Sapphire Rapids-class Xeon reached
    ~145, an AMD Zen 4 EPYC ~115, where AVX-512 and AVX2 have the same FMA
    width)."""
    from fastlstm import _engine
    return _engine.fma_peak_gflops(0.5)


@functools.lru_cache(maxsize=None)
def read_bw_gbps(nbytes, threads):
    """Read bandwidth of *this* machine for a working set of ``nbytes`` read
    again and again by ``threads`` threads, GB/s, measured once per process
    (fastlstm._engine.read_bandwidth_gbps: each thread its own slice,
    vector loads, chunk order reversing each pass as a step walks W_hh;
    best of 5): the ceiling of a batch-1 step that must read those bytes.
    Returns (GB/s, threads the pool ran)."""
    from fastlstm import _engine
    return _engine.read_bandwidth_gbps(int(nbytes), int(threads), 0.5)


@dataclass(frozen=True)
class Config:
    T: int
    batch: int
    input: int
    hidden: int
    layers: int
    dirs: int

    @property
    def label(self):
        return (f"T{self.T}_B{self.batch}_I{self.input}_H{self.hidden}"
                f"_L{self.layers}_D{self.dirs}")

    @property
    def tuple_str(self):
        return ", ".join(str(v) for v in asdict(self).values())

    def layer_inputs(self):
        """Input width of each layer: input_size, then D*hidden."""
        return [self.input] + [self.dirs * self.hidden] * (self.layers - 1)

    def flops(self):
        """Multiply-add FLOPs of one forward call: per step, layer and
        direction 2*B*4H*(In_l + H); the gate math is left out."""
        per_step = sum(2 * self.batch * 4 * self.hidden * (i + self.hidden) * self.dirs
                       for i in self.layer_inputs())
        return per_step * self.T

    def step_weight_bytes(self):
        """Bytes of float32 W_hh a step reads: every direction's of one layer
        (the working set a batch-1 step streams again and again)."""
        return self.dirs * 4 * self.hidden * self.hidden * 4

    def weight_bytes_read(self):
        """Bytes of float32 weights one call must read at least: W_hh once per
        step, W_ih once (its GEMM covers all steps), per layer and direction."""
        H, T = self.hidden, self.T
        total = 0
        for i in self.layer_inputs():
            total += self.dirs * (4 * H * H * 4 * T + 4 * H * i * 4)
        return total


# The benchmark grid: (T, batch, input, hidden, layers, dirs).
GRID = (
    Config(100, 1, 128, 256, 1, 1),
    Config(100, 1, 256, 512, 1, 1),
    Config(100, 1, 512, 1024, 1, 1),
    Config(100, 8, 256, 512, 1, 1),
    Config(100, 32, 256, 512, 1, 1),
    Config(100, 64, 512, 512, 1, 1),
    Config(50, 16, 256, 256, 2, 2),
)

# Tiny sizes for smoke tests (--quick, FASTLSTM_BENCH_QUICK=1).
QUICK_GRID = (
    Config(20, 1, 16, 32, 1, 1),
    Config(20, 4, 32, 64, 1, 1),
    Config(10, 2, 16, 32, 2, 2),
)


def select_configs(grid, spec):
    """Filter a grid by a comma-separated list of 0-based indices and/or
    label substrings (e.g. "0,3" or "B1_" or "L2"). None/"" keeps all."""
    if not spec:
        return list(grid)
    chosen = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if tok.isdigit():
            idx = int(tok)
            if idx >= len(grid):
                raise ValueError(f"config index {idx} out of range (grid has {len(grid)})")
            hits = [grid[idx]]
        else:
            hits = [c for c in grid if tok.lower() in c.label.lower()]
            if not hits:
                raise ValueError(f"no config label contains {tok!r}; labels: "
                                 + ", ".join(c.label for c in grid))
        chosen.extend(c for c in hits if c not in chosen)
    return chosen


# --------------------------------------------------------------------- data
def make_module(cfg, seed=0):
    """A float32 torch.nn.LSTM in eval mode with torch's default init."""
    import torch
    torch.manual_seed(seed)
    m = torch.nn.LSTM(cfg.input, cfg.hidden, num_layers=cfg.layers,
                      bidirectional=cfg.dirs == 2)
    return m.float().eval()


def make_input(cfg, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((cfg.T, cfg.batch, cfg.input), dtype=np.float32)


# ----------------------------------------------------------------- versions
def _version(modname):
    try:
        mod = __import__(modname)
    except Exception as e:  # noqa: BLE001 - any import failure means "absent"
        return f"unavailable ({type(e).__name__}: {e})"
    return str(getattr(mod, "__version__", "unknown"))


def versions():
    v = {name: _version(name) for name in
         ("fastlstm", "numpy", "torch", "onnx", "onnxscript", "onnxruntime", "openvino")}
    v["python"] = sys.version.split()[0]
    return v


def machine_info():
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "os_cpu_count": os.cpu_count(),
        "peak_gflops_per_core": peak_gflops_per_core(),
    }
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = set()
        for line in text.splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        info["cpu_flags_simd"] = sorted(f for f in flags
                                        if f.startswith(("avx", "amx", "fma", "sse4")))
    except OSError:
        pass
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import fastlstm
        info["fastlstm_cpu_info"] = fastlstm.cpu_info()
    except Exception as e:  # noqa: BLE001
        info["fastlstm_cpu_info"] = f"unavailable ({type(e).__name__}: {e})"
    try:
        import torch
        info["torch_parallel_info"] = torch.__config__.parallel_info()
    except Exception:  # noqa: BLE001
        pass
    return info


# ------------------------------------------------------------------ runners
class Runner:
    """``runner(x) -> output ndarray``; ``info`` describes the setup."""

    def __init__(self, name, fn, threads, info=None):
        self.name = name
        self.fn = fn
        self.threads = threads
        self.info = info or {}

    def __call__(self, x):
        return self.fn(x)

    def __repr__(self):
        return f"Runner({self.name!r}, threads={self.threads})"


def make_fastlstm_runner(module, cfg, threads):
    import fastlstm
    m = fastlstm.LSTM.from_torch(module)

    def run(x):
        return m(x, num_threads=threads)[0]

    return Runner("fastlstm", run, threads,
                  {"isa": fastlstm.cpu_info()["isa"], "packed_bytes": int(m.packed_nbytes)})


def make_torch_runner(module, cfg, threads):
    import torch

    def run(x):
        torch.set_num_threads(threads)  # global: set right before each call
        with torch.inference_mode():
            return module(torch.from_numpy(x))[0].numpy()

    return Runner("torch", run, threads,
                  {"mkldnn_enabled": bool(torch.backends.mkldnn.is_available()
                                          and torch.backends.mkldnn.enabled)})


def _wrap_output_only(module):
    import torch

    class OutputOnly(torch.nn.Module):
        def __init__(self, lstm):
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            return self.lstm(x)[0]

    return OutputOnly(module).eval()


def export_onnx(module, cfg, path):
    """Export the LSTM (output sequence only, static shapes) to ``path``.

    Tries the torch.export-based exporter (``dynamo=True``) first and falls
    back to the legacy TorchScript one (``dynamo=False``).  Returns a dict:
    exporter used, the ONNX op types in the graph, and any failure text.
    """
    import torch
    wrapped = _wrap_output_only(module)
    example = (torch.from_numpy(make_input(cfg)),)
    info = {"path": path}
    errors = {}
    for dynamo in (True, False):
        # The new exporter prints progress and logs registry warnings; keep
        # that out of the benchmark output unless it fails.
        out_buf, err_buf = io.StringIO(), io.StringIO()
        loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                                  "onnxscript")]
        old_levels = [lg.level for lg in loggers]
        try:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            with warnings.catch_warnings(), contextlib.redirect_stdout(out_buf), \
                    contextlib.redirect_stderr(err_buf):
                warnings.simplefilter("ignore")
                kwargs = dict(input_names=["x"], output_names=["y"], dynamo=dynamo)
                if not dynamo:
                    kwargs["opset_version"] = 17
                torch.onnx.export(wrapped, example, path, **kwargs)
        except Exception as e:  # noqa: BLE001
            errors["dynamo" if dynamo else "legacy"] = f"{type(e).__name__}: {str(e)[:500]}"
            continue
        finally:
            for lg, lvl in zip(loggers, old_levels):
                lg.setLevel(lvl)
        info["exporter"] = "dynamo" if dynamo else "legacy"
        break
    else:
        raise RuntimeError(f"torch.onnx.export failed with both exporters: {errors}")
    if errors:
        info["export_errors"] = errors
    try:
        import onnx
        model = onnx.load(path, load_external_data=False)
        info["ops"] = sorted({n.op_type for n in model.graph.node})
        info["opset"] = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                            default=None)
        if "LSTM" not in info["ops"]:
            info["warning"] = "graph has no ONNX LSTM op (exported as unrolled primitives)"
    except Exception as e:  # noqa: BLE001
        info["ops"] = f"unreadable ({type(e).__name__}: {e})"
    return info


def make_ort_runner(onnx_path, cfg, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    out_name = sess.get_outputs()[0].name

    def run(x):
        return sess.run([out_name], {in_name: x})[0]

    return Runner("onnxruntime", run, threads, {"providers": sess.get_providers()})


def openvino_config(threads):
    """Compile properties pinning OpenVINO's CPU plugin to ``threads``
    threads, one stream, latency mode, float32 arithmetic.  Uses the property
    objects of the installed version when it has them."""
    try:
        import openvino.properties as props
        import openvino.properties.hint as hints
        return {
            props.inference_num_threads(): threads,
            props.num_streams(): 1,
            hints.performance_mode(): hints.PerformanceMode.LATENCY,
            hints.inference_precision(): _ov_f32(),
        }
    except (ImportError, AttributeError):
        return {"INFERENCE_NUM_THREADS": str(threads), "NUM_STREAMS": "1",
                "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def _ov_f32():
    try:
        import openvino as ov
        return ov.Type.f32
    except (ImportError, AttributeError):
        import openvino.runtime as ovr
        return ovr.Type.f32


def make_openvino_runner(onnx_path, cfg, threads):
    import openvino as ov
    core = ov.Core()
    model = core.read_model(onnx_path)
    compiled = core.compile_model(model, "CPU", openvino_config(threads))
    request = compiled.create_infer_request()
    got = {}
    for key in ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT",
                "INFERENCE_PRECISION_HINT"):
        try:
            got[key] = str(compiled.get_property(key))
        except Exception as e:  # noqa: BLE001
            got[key] = f"? ({type(e).__name__})"

    def run(x):
        # share_outputs: the result is a view of the request's output buffer,
        # which the next call overwrites (cross_check copies it).
        request.infer({0: x}, share_inputs=True, share_outputs=True)
        return request.get_output_tensor(0).data

    if got["INFERENCE_NUM_THREADS"] != str(threads):
        got["warning"] = f"INFERENCE_NUM_THREADS reads back {got['INFERENCE_NUM_THREADS']}"
    return Runner("openvino", run, threads, {"compiled_properties": got})


def build_runners(module, cfg, threads, workdir, engines=ENGINES, onnx_info=None):
    """Build a runner for every engine in ``engines`` at ``threads`` threads.

    ``onnx_info``: the dict of an earlier ``export_onnx`` for this module and
    config (the file is reused across thread counts); exported to
    ``workdir`` when None and an ONNX peer is wanted.

    Returns (runners: dict name -> Runner, skipped: dict name -> reason,
    onnx_info or None).
    """
    runners, skipped = {}, {}
    makers = {"fastlstm": make_fastlstm_runner, "torch": make_torch_runner}
    for name in engines:
        if name in makers:
            try:
                runners[name] = makers[name](module, cfg, threads)
            except Exception as e:  # noqa: BLE001
                skipped[name] = f"{type(e).__name__}: {e}"
            continue
        mod = {"onnxruntime": "onnxruntime", "openvino": "openvino"}[name]
        try:
            __import__(mod)
        except Exception as e:  # noqa: BLE001
            skipped[name] = f"cannot import {mod}: {type(e).__name__}: {e}"
            continue
        if onnx_info is None:
            try:
                onnx_info = export_onnx(module, cfg, os.path.join(workdir, f"{cfg.label}.onnx"))
            except Exception as e:  # noqa: BLE001
                onnx_info = {"error": f"{type(e).__name__}: {e}"}
        if "error" in onnx_info:
            skipped[name] = f"ONNX export failed: {onnx_info['error']}"
            continue
        maker = make_ort_runner if name == "onnxruntime" else make_openvino_runner
        try:
            runners[name] = maker(onnx_info["path"], cfg, threads)
        except Exception as e:  # noqa: BLE001
            skipped[name] = f"{type(e).__name__}: {str(e)[:500]}"
    return runners, skipped, onnx_info


def cross_check(runners, x, reference="fastlstm", tol=TOLERANCE, loud=True):
    """Run every runner on ``x`` and compare with ``reference``'s output.

    Returns {name: max abs diff} (the reference maps to 0.0; NaN when shapes
    differ).  With ``loud``, mismatches beyond ``tol`` are printed in a
    banner to stderr.  The reference must be among the runners.
    """
    if reference not in runners:
        raise ValueError(f"cross_check: reference engine {reference!r} is not among the "
                         f"runners ({sorted(runners)})")
    ref = np.array(runners[reference](x), copy=True)
    diffs = {reference: 0.0}
    for name, r in runners.items():
        if name == reference:
            continue
        out = np.array(r(x), copy=True)
        if out.shape != ref.shape:
            diffs[name] = float("nan")
            detail = f"shape {out.shape} != {ref.shape}"
        else:
            diffs[name] = float(np.max(np.abs(out.astype(np.float64) - ref)))
            detail = f"max abs diff {diffs[name]:.3g}"
        if loud and not diffs[name] < tol:
            bar = "!" * 78
            print(f"\n{bar}\n!!! MISMATCH: {name} vs {reference} at threads={r.threads}: "
                  f"{detail} (tolerance {tol:g})\n{bar}\n", file=sys.stderr, flush=True)
    return diffs


def is_mismatch(diff, tol=TOLERANCE):
    return not (diff < tol) or math.isnan(diff)


def result_header(argv=None):
    """The fields every results JSON starts with: schema, creation time (UTC)
    and the command line that produced it."""
    import datetime as _dt
    return {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
    }


def note_load_end(machine):
    """Record the load average at the end of a run in ``machine`` (where the OS has one),
    and how many fastlstm calls lost over a third of their time to a descheduled
    worker (the pool then ran calls alone for ~10 ms: cpu_info()["congested_calls"]);
    printed when nonzero."""
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import fastlstm
        n = fastlstm.cpu_info().get("congested_calls", 0)
    except Exception:  # pragma: no cover - diagnostics only
        return
    machine["fastlstm_congested_calls"] = n
    if n:
        print(f"note: {n} fastlstm call(s) lost over a third of their time to a worker "
              "thread descheduled by other load; the next ~10 ms of calls ran on one thread",
              file=sys.stderr)

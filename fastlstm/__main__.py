"""`python -m fastlstm`: a short demonstration on a default model.

Builds a random LSTM (or one of --hidden/--batch/...), checks it against the
float64 NumPy reference, and times it beside the NumPy reference and torch
if it is installed, threads pinned to the same count; then the same model
with reduced-precision weights (LSTM.astype: bfloat16, float16, int8), each
timed and compared with the float32 outputs.  The full benchmarks against
all peers are benchmarks/run_all.py and benchmarks/bench_precision.py.
"""
import argparse
import statistics
import time

import numpy as np

import fastlstm


def _median_ms(fn, min_time=0.5, min_runs=5):
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastlstm", description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--input", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=fastlstm.get_num_threads())
    args = ap.parse_args(argv)

    info = fastlstm.cpu_info()
    print(f"fastlstm {fastlstm.__version__}: kernel path {info['isa']} "
          f"(available {', '.join(info['isas_available'])}), {args.threads} thread(s)")
    T, N, In, H, L = args.seq, args.batch, args.input, args.hidden, args.layers
    print(f"model: T={T} batch={N} input={In} hidden={H} layers={L}, float32")
    m = fastlstm.LSTM(In, H, num_layers=L, seed=0)
    x = np.random.default_rng(0).standard_normal((T, N, In)).astype(np.float32)
    out, (h, c) = m(x, num_threads=args.threads)
    ref = m.reference(x)
    err = max(float(np.abs(a - b).max()) for a, b in zip((out, h, c), (ref[0], *ref[1])))
    print(f"max abs error vs float64 reference: {err:.2e}")

    rows = [("fastlstm", _median_ms(lambda: m(x, num_threads=args.threads)))]
    rows.append(("numpy float64 reference", _median_ms(lambda: m.reference(x), min_runs=1, min_time=0.2)))
    try:
        import torch
        torch.set_num_threads(args.threads)
        tm = torch.nn.LSTM(In, H, num_layers=L).eval()
        tm.load_state_dict({k: torch.from_numpy(v) for k, v in m.state_dict().items()})
        xt = torch.from_numpy(x)

        def run_torch():
            with torch.inference_mode():
                tm(xt)
        rows.append((f"torch {torch.__version__}", _median_ms(run_torch)))
    except ImportError:
        print("torch not installed: skipped")
    base = rows[0][1]
    print(f"\n{'engine':<28}{'median ms':>12}{'fastlstm speedup':>18}")
    for name, ms in rows:
        print(f"{name:<28}{ms:>12.3f}{ms / base:>17.2f}x")
    flops = 2.0 * T * N * 4 * H * (In + H) * L
    print(f"\nfastlstm: {flops / base / 1e6:.1f} GFLOP/s")

    print(f"\n{'stored weights (astype)':<28}{'median ms':>12}{'vs float32':>12}"
          f"{'max abs diff vs float32':>26}")
    print(f"{'float32':<28}{base:>12.3f}{1.0:>11.2f}x{0.0:>26.1e}")
    for prec in ("bfloat16", "float16", "int8"):
        q = m.astype(prec)
        qout, (qh, qc) = q(x, num_threads=args.threads)
        diff = max(float(np.abs(a - b).max()) for a, b in zip((qout, qh, qc), (out, h, c)))
        ms = _median_ms(lambda: q(x, num_threads=args.threads))
        print(f"{prec:<28}{ms:>12.3f}{base / ms:>11.2f}x{diff:>26.1e}")


if __name__ == "__main__":
    main()

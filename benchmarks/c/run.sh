#!/usr/bin/env bash
# Build and run benchmarks/c/kernels_bench.c against csrc/ (baseline flags:
# each ISA file selects its own target, as in the package build).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="$(mktemp -d "${TMPDIR:-/tmp}/fastlstm-kbench.XXXXXX")"
trap 'rm -rf "$out"' EXIT
"${CC:-gcc}" -O3 -std=gnu11 -I"$repo/csrc" -I"$repo/csrc/include" \
    "$repo/benchmarks/c/kernels_bench.c" "$repo"/csrc/engine.c "$repo"/csrc/epilogue.c \
    "$repo"/csrc/pool.c "$repo"/csrc/peak.c "$repo"/csrc/kernels/*.c -lm -pthread -o "$out/kernels_bench"
"$out/kernels_bench"

#!/usr/bin/env bash
# ThreadSanitizer run of the engine's C code: tests/c/tsan_stress.c (both
# thread splits, several chunks and layers, lengths, int8 and bfloat16
# weights) linked with csrc/ built with -fsanitize=thread.  Any race report,
# or a two-thread result that differs from the one-thread one, fails.
# Needs gcc with libtsan (CC may name another compiler).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cc="${CC:-gcc}"
libtsan="$("$cc" -print-file-name=libtsan.so)"
if [ ! -e "$libtsan" ]; then
    echo "tsan: no libtsan for $cc ($libtsan); install the compiler's sanitizer runtime" >&2
    exit 2
fi
work="$(mktemp -d "${TMPDIR:-/tmp}/fastlstm-tsan.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "tsan: building tests/c/tsan_stress.c with -fsanitize=thread"
"$cc" -O1 -g -fsanitize=thread -std=gnu11 -I"$repo/csrc" -I"$repo/csrc/include" \
    "$repo/tests/c/tsan_stress.c" "$repo"/csrc/engine.c "$repo"/csrc/epilogue.c \
    "$repo"/csrc/pool.c "$repo"/csrc/peak.c "$repo"/csrc/kernels/*.c \
    -lm -pthread -o "$work/tsan_stress"
TSAN_OPTIONS="halt_on_error=1 exitcode=66 ${TSAN_OPTIONS:-}" "$work/tsan_stress"
# The pool's job publication with a pause while a job is half written
# (FL_POOL_PUBLISH_PAUSE_US, a test-only hook): natively, where a wrong or
# repeated run is counted, and under ThreadSanitizer.
echo "tsan: tests/c/pool_stress.c (publication window widened), native and -fsanitize=thread"
"$cc" -O2 -std=gnu11 -DFL_POOL_PUBLISH_PAUSE_US=50 -I"$repo/csrc" -I"$repo/csrc/include" \
    "$repo/tests/c/pool_stress.c" "$repo"/csrc/pool.c -pthread -o "$work/pool_stress"
"$work/pool_stress" 20000
"$cc" -O1 -g -fsanitize=thread -std=gnu11 -DFL_POOL_PUBLISH_PAUSE_US=50 -I"$repo/csrc" \
    -I"$repo/csrc/include" "$repo/tests/c/pool_stress.c" "$repo"/csrc/pool.c -pthread \
    -o "$work/pool_stress_tsan"
TSAN_OPTIONS="halt_on_error=1 exitcode=66 ${TSAN_OPTIONS:-}" "$work/pool_stress_tsan" 4000

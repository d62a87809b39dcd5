#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the core tests.
#
#   .ci/sanitize.sh                  # the core tests (a few minutes on 2 cores)
#   .ci/sanitize.sh tests/test_api.py -k hx    # or any pytest arguments
#
# Builds the extension with FASTLSTM_SANITIZE=1 (setup.py: -fsanitize=address,
# undefined, -fno-sanitize-recover) in a temporary copy of the working tree, so
# the normal in-place build is untouched, then runs pytest on that copy with
# the ASan runtime preloaded (the Python interpreter itself is not
# instrumented).  Leak detection is off (the interpreter's own allocations
# would be reported); any ASan or UBSan report stops the run and fails it.
# Uses the active python (its numpy; Cython and setuptools are installed into
# it if missing).  Needs gcc with its sanitizer runtimes (libasan, libubsan;
# CC may name another gcc).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python}"
cc="${CC:-gcc}"

if [ "$#" -eq 0 ]; then
    # The core tests and the reduced-precision kernels (~1 minute); the two
    # slowest reference sweeps (over a minute under ASan, same code paths as
    # their siblings) are left out.
    set -- tests/test_lstm_reference.py tests/test_api.py tests/test_lengths.py \
        tests/test_robustness.py tests/test_concurrency.py tests/test_stream.py \
        tests/test_precision.py \
        --deselect "tests/test_lstm_reference.py::test_random_large_float32[portable-3]" \
        --deselect "tests/test_lstm_reference.py::test_random_large_float64[1]"
fi

libasan="$("$cc" -print-file-name=libasan.so)"
if [ ! -e "$libasan" ]; then
    echo "sanitize: no libasan for $cc ($libasan); install the compiler's sanitizer runtime" >&2
    exit 2
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/fastlstm-sanitize.XXXXXX")"
if [ "${FASTLSTM_SANITIZE_KEEP:-0}" = 1 ]; then
    echo "sanitize: keeping $work"
else
    trap 'rm -rf "$work"' EXIT
fi

# The working tree without builds, virtual environments, caches or VCS data.
tar -C "$repo" -cf - \
    --exclude=./.git --exclude=./.venv --exclude='./venv*' --exclude=./build \
    --exclude='*.so' --exclude=./fastlstm/_engine.c --exclude='__pycache__' \
    --exclude=./.pytest_cache --exclude=./.hypothesis --exclude=./.benchmarks \
    --exclude=./benchmarks/results . | tar -C "$work" -xf -

if ! "$py" -c "import Cython, setuptools, numpy" 2>/dev/null; then
    "$py" -m pip install -q "Cython>=3.0" "setuptools>=68" "numpy>=1.23"
fi

echo "sanitize: building the ASan+UBSan extension in $work"
(cd "$work" && FASTLSTM_SANITIZE=1 CC="$cc" "$py" setup.py -q build_ext --inplace -j 2) \
    >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }

# libstdc++ right after the ASan runtime: C++ libraries loaded later (torch)
# throw exceptions through ASan's __cxa_throw interceptor, which needs it.
libstdcxx="$("$cc" -print-file-name=libstdc++.so.6)"
export LD_PRELOAD="$libasan${libstdcxx:+:$libstdcxx}${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:allocator_may_return_null=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONMALLOC=malloc
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
cd "$work"

# The tests must import this build, not an installed one.
"$py" - <<EOF
import subprocess, fastlstm._engine as e
assert e.__file__.startswith("$work/"), e.__file__
libs = subprocess.run(["ldd", e.__file__], capture_output=True, text=True).stdout
assert "libasan" in libs and "libubsan" in libs, libs
print("sanitize: testing", e.__file__)
EOF

# Canary: a deliberate heap overflow (a too small workspace handed straight
# to the engine, past the Python checks) must be reported, or this run would
# prove nothing.
canary="$("$py" - 2>&1 <<'CANARY' || true
import numpy as np, fastlstm
m = fastlstm.LSTM(4, 8, num_layers=2)
x = np.zeros((5, 3, 4), np.float32)
y = np.empty((5, 3, 8), np.float32)
hn, cn = np.empty((2, 3, 8), np.float32), np.empty((2, 3, 8), np.float32)
m._stack.forward(x, y, None, None, hn, cn, np.empty(64, np.uint8), 1)
print("canary: no report")
CANARY
)"
if ! grep -q "ERROR: AddressSanitizer: heap-buffer-overflow" <<<"$canary"; then
    echo "$canary" >&2
    echo "sanitize: FAILED: the canary overflow was not reported; ASan is not active" >&2
    exit 1
fi
echo "sanitize: canary overflow reported as expected"

log="$work/pytest.log"
status=0
# --capture=sys: pytest's default fd capture would swallow a report printed
# by a test that the sanitizer then stops.
"$py" -m pytest -q -p no:cacheprovider --capture=sys "$@" 2>&1 | tee "$log" || status=$?
if grep -qE "ERROR: AddressSanitizer|runtime error:|Sanitizer: CHECK failed" "$log"; then
    echo "sanitize: FAILED: sanitizer report above" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "sanitize: FAILED: pytest exit status $status" >&2
    exit "$status"
fi
echo "sanitize: OK (no ASan/UBSan report)"

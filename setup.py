"""Build of the fastlstm extension: the C engine (csrc/) and its Cython layer.

Compiler flags: -O3 and warnings on; never -ffast-math (NaN/Inf semantics
and reproducibility).  The SIMD kernel files select their own instruction
set with `#pragma GCC target`, so the whole package builds with baseline
flags and picks the kernel at run time.

Environment switches (for development):
  FASTLSTM_SANITIZE=1   AddressSanitizer + UndefinedBehaviorSanitizer build
  FASTLSTM_DEBUG=1      -O0 -g and Cython bounds checks
  FASTLSTM_NATIVE=1     add -march=native (opt-in only; not for wheels)
"""
import glob
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

SOURCES = [
    "fastlstm/_engine.pyx",
    "csrc/engine.c",
    "csrc/epilogue.c",
    "csrc/pool.c",
    "csrc/kernels/portable.c",
    "csrc/kernels/avx2.c",
    "csrc/kernels/avx512.c",
    "csrc/generate.c",
    "csrc/peak.c",
]

debug = os.environ.get("FASTLSTM_DEBUG") == "1"
sanitize = os.environ.get("FASTLSTM_SANITIZE") == "1"

compile_args = ["-std=gnu11", "-Wall", "-Wno-unused-function"]
link_args = []
if sys.platform == "win32":  # pragma: no cover - MSVC is not a supported compiler yet
    compile_args = ["/O2"]
else:
    compile_args += ["-O0", "-g"] if debug else ["-O3"]
    if sanitize:
        compile_args += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                         "-fno-sanitize-recover=undefined"]
        link_args += ["-fsanitize=address,undefined"]
    if os.environ.get("FASTLSTM_NATIVE") == "1":
        compile_args.append("-march=native")
    link_args.append("-pthread")

directives = {
    "language_level": 3,
    "boundscheck": debug,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": debug,
}

# Headers: a change to any of them rebuilds the C sources that include them.
DEPENDS = sorted(glob.glob("csrc/*.h") + glob.glob("csrc/include/*.h")
                 + glob.glob("csrc/kernels/*.h"))

ext = Extension(
    "fastlstm._engine",
    sources=SOURCES,
    depends=DEPENDS,
    include_dirs=["csrc/include", "csrc", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

setup(ext_modules=cythonize([ext], compiler_directives=directives))

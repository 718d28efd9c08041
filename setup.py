"""Build of deelm's C core (deelm._core): plain C11 with OpenMP, no BLAS.

DEELM_SANITIZE=1 builds it with AddressSanitizer and UndefinedBehaviorSanitizer
(for the fuzz and concurrency tests; the interpreter is not instrumented, so
run with the ASan runtime preloaded):

    DEELM_SANITIZE=1 python setup.py build_ext --inplace
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 python -m pytest tests/core/test_fuzz.py \
        tests/model/test_concurrency.py tests/model/test_bad_input.py tests/core/test_ops.py
"""
import glob
import os

import numpy
from setuptools import Extension, setup

SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"] \
    if os.environ.get("DEELM_SANITIZE") == "1" else []

# DEELM_ONE_CLONE=avx512f|avx2|default builds one clone of every multi-versioned
# function instead of all three (csrc/deelm.h), for tests/core/test_clones.py
ONE_CLONE = {"avx512f": ['-DDL_ONE_CLONE="avx512f"', '-DDL_ONE_FMA_CLONE="avx512f"'],
             "avx2": ['-DDL_ONE_CLONE="avx2"', '-DDL_ONE_FMA_CLONE="fma"'],
             "default": ["-DDL_BASELINE_CLONE"],
             "": []}[os.environ.get("DEELM_ONE_CLONE", "")]

core = Extension(
    "deelm._core",
    # every C file under csrc/, so a new file needs no edit here
    sources=sorted(glob.glob("csrc/**/*.c", recursive=True)),
    depends=sorted(glob.glob("csrc/**/*.h", recursive=True)),
    include_dirs=[numpy.get_include(), "csrc"],
    extra_compile_args=["-O3", "-fopenmp", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers", "-Wno-cast-function-type",
                        # 8-float vector types (csrc/dot.h) only cross always-inlined calls
                        "-Wno-psabi"] + SANITIZE + ONE_CLONE,
    extra_link_args=["-fopenmp"] + SANITIZE,
)

setup(ext_modules=[core])

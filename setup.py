"""Build of deelm's C core (deelm._core): plain C11 with OpenMP, no BLAS."""
import glob

import numpy
from setuptools import Extension, setup

core = Extension(
    "deelm._core",
    sources=sorted(glob.glob("csrc/*.c")),
    depends=glob.glob("csrc/*.h"),
    include_dirs=[numpy.get_include(), "csrc"],
    extra_compile_args=["-O3", "-fopenmp", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers", "-Wno-cast-function-type",
                        # 8-float vector types (csrc/dot.h) only cross always-inlined calls
                        "-Wno-psabi"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[core])

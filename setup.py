"""Build of deelm's C core (deelm._core), linked against the system OpenBLAS."""
import glob
import shutil
import subprocess
import sys

import numpy
from setuptools import Extension, setup

OPENBLAS_HELP = (
    "deelm needs OpenBLAS and pkg-config to build its C core, and pkg-config could not find "
    "'openblas'. On Debian/Ubuntu: apt-get install pkg-config libopenblas-openmp-dev "
    "(or libopenblas-dev); on Fedora: dnf install pkgconf openblas-devel; on macOS: "
    "brew install openblas pkg-config and set PKG_CONFIG_PATH to its pkgconfig folder."
)


def pkg_config(*args):
    if shutil.which("pkg-config") is None:
        sys.exit("error: pkg-config is not installed.\n" + OPENBLAS_HELP)
    try:
        out = subprocess.run(["pkg-config", *args, "openblas"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError:
        sys.exit("error: " + OPENBLAS_HELP)
    return out.stdout.split()


cflags = pkg_config("--cflags")
libs = pkg_config("--libs")

core = Extension(
    "deelm._core",
    sources=sorted(glob.glob("csrc/*.c")),
    depends=glob.glob("csrc/*.h"),
    include_dirs=[numpy.get_include(), "csrc"] + [f[2:] for f in cflags if f.startswith("-I")],
    library_dirs=[f[2:] for f in libs if f.startswith("-L")],
    libraries=[f[2:] for f in libs if f.startswith("-l")],
    runtime_library_dirs=[f[2:] for f in libs if f.startswith("-L")],
    extra_compile_args=["-O3", "-fopenmp", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers", "-Wno-cast-function-type",
                        # 8-float vector types (csrc/dot.h) only cross always-inlined calls
                        "-Wno-psabi"]
    + [f for f in cflags if not f.startswith("-I")],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[core])

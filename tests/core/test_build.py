"""The C core is self-contained: it links no BLAS, only the C library and OpenMP."""
import shutil
import subprocess

import pytest

from deelm import _core


def test_core_links_no_blas():
    if shutil.which("ldd") is None:
        pytest.skip("ldd is not installed")
    out = subprocess.run(["ldd", _core.__file__], capture_output=True, text=True, check=True).stdout
    print("\n" + out)
    assert "blas" not in out.lower()
    assert "gomp" in out  # the one threading runtime

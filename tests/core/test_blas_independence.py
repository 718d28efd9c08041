"""deelm's numbers do not depend on which BLAS kernels NumPy's OpenBLAS picks.

The C core links no BLAS; the one place deelm's results pass through a BLAS
is the training loss (float64 NumPy). Each child process below runs the same
short training and encoding with OpenBLAS forced to another CPU's kernels
(OPENBLAS_CORETYPE), so a machine of one kind catches what would differ on
another kind: the adapter, the embeddings and the similarity scores must be
the same bits."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = r"""
import hashlib, json, sys
import numpy as np
import deelm
from deelm.adapters.lora import LoraConfig
from deelm.train import TrainingArguments, train
model_path, data, out = sys.argv[1:4]
m = deelm.DeeLM.from_pretrained(model_path, bidirectional_from=1, threads=2)
args = TrainingArguments(max_steps=3, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0,
                         lora=LoraConfig(r=4, alpha=8, dropout=0.1))
res = train(m, data, out, args, show_progress_bar=False)
emb = m.encode(["the cat sat on the mat", "a dog ran", "x"])
sim = m.similarity(emb, emb)
h = lambda b: hashlib.sha256(b).hexdigest()[:16]
print(json.dumps({"adapter": h((res.adapter / "adapter_model.safetensors").read_bytes()),
                  "loss": [float(r["loss"]) for r in res.history],
                  "emb": h(emb.tobytes()), "sim": h(np.asarray(sim).tobytes())}))
"""


def _cpu_flags():
    try:
        return set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
                   .group(1).split())
    except (OSError, AttributeError):
        return set()


def _coretypes():
    """OpenBLAS kernel families this CPU can execute."""
    flags = _cpu_flags()
    types = ["Prescott"]  # SSE3: every x86-64 CPU
    if {"avx2", "fma"} <= flags:
        types += ["Haswell", "Zen"]
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        types += ["SkylakeX"]
    return types


def _run(tiny_path, data, out, coretype):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_path), str(data), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_and_encoding_are_the_same_under_every_openblas_kernel(tiny_path, tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("OPENBLAS_CORETYPE is checked on Linux x86-64")
    import numpy as np

    rng = np.random.default_rng(0)
    words = "cat dog sun man car mat sea runs sits red big old new hot".split()
    data = tmp_path / "triplets.jsonl"
    with open(data, "w") as fh:
        for i in range(24):
            a = list(rng.choice(words, 4, replace=False))
            fh.write(json.dumps({"text": " ".join(a), "positive": " ".join(a[:3] + ["too"]),
                                 "negative": "no " + " ".join(rng.choice(words, 4))}) + "\n")
    ref = _run(tiny_path[0], data, tmp_path / "native", None)
    print(f"\nnative: {ref}")
    for ct in _coretypes():
        got = _run(tiny_path[0], data, tmp_path / ct, ct)
        print(f"OPENBLAS_CORETYPE={ct}: {got}")
        assert got == ref, ct

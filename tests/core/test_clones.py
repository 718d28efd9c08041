"""Every target_clones version of the C core gives the same bits, on one CPU.

Norms, RoPE, attention, GLU, pooling and LoRA are compiled per vector width
(`DL_CLONES` in csrc/deelm.h: avx512f, avx2 and the baseline) and the CPU picks
one at load time, so a test run on one machine exercises one of them. Here
the core is rebuilt once per clone this CPU can run (setup.py's
DEELM_ONE_CLONE compiles that clone only), and each build embeds with tiny
LLaMA and Gemma-3 models (float32 and int8, causal and bidirectional, every
pooling) and takes two training steps; every output must equal the normal
build's bit for bit. The GEMM paths are forced separately (isa=, see
test_invariants.py); each build here runs them all too.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from deelm import _core

# a clone runs where the CPU has its features (what csrc/isa.h's checks say)
CLONES = [c for c, isa in (("avx512f", "avx512vnni"), ("avx2", "avx2"), ("default", "scalar"))
          if isa in _core.isa_info()["supported"]]

OUTPUTS = textwrap.dedent("""
    import hashlib, json, sys, tempfile
    from pathlib import Path
    import numpy as np
    import deelm
    from deelm.train import TrainingArguments, train
    from deelm.adapters.lora import LoraConfig
    from support.gguf_builder import random_gemma3_weights, write_gemma3_gguf, write_tiny_gguf

    def h(a):
        return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

    sentences = ["A cat sat on the mat.", "x", "Üñíçødé and digits 12345!",
                 "the heat in the station was rather oppressive today, said the guard"]
    out = {}
    tmp = Path(tempfile.mkdtemp())
    files = {"llama": write_tiny_gguf(tmp / "tiny.gguf")[0],
             "gemma3": write_gemma3_gguf(tmp / "g.gguf", random_gemma3_weights())[0]}
    for name, path in files.items():
        for precision in ("float32", "int8"):
            for isa in deelm._core.isa_info()["supported"]:
                m = deelm.DeeLM.from_pretrained(path, threads=2, compute_precision=precision,
                                                isa=isa)
                for k in (-1, 1):
                    for pooling in ("mean", "last"):
                        m.bidirectional_from, m.pooling = k, pooling
                        out[f"{name}/{precision}/{isa}/k{k}/{pooling}"] = h(
                            m.encode(sentences, output_value="layer_embeddings"))
        data = tmp / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"text": sentences[i], "positive": sentences[(i + 1) % 4],
                                            "negative": sentences[(i + 2) % 4]}) + "\\n"
                                for i in range(4)))
        m = deelm.DeeLM.from_pretrained(path, threads=2, bidirectional_from=1)
        args = TrainingArguments(max_steps=2, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0,
                                 train_from=0, lora=LoraConfig(r=4, alpha=8, dropout=0.1))
        r = train(m, str(data), tmp / f"run_{name}", args, show_progress_bar=False)
        out[f"{name}/train/losses"] = [x["loss"] for x in r.history]
        out[f"{name}/train/params"] = h(m.adapter[1])
    json.dump(out, sys.stdout, sort_keys=True)
""")


def outputs(package_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_dir), str(REPO / "tests")]),
               OMP_WAIT_POLICY="PASSIVE")
    script = tmp_path / "outputs.py"
    script.write_text(OUTPUTS)
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def build(clone, tmp_path):
    """A copy of the deelm package whose core has only `clone`."""
    pkg = tmp_path / f"pkg-{clone}"
    shutil.copytree(REPO / "deelm", pkg / "deelm",
                    ignore=shutil.ignore_patterns("_core*.so", "__pycache__", "adapters"))
    env = dict(os.environ, DEELM_ONE_CLONE=clone)
    run = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib",
                          str(tmp_path / f"lib-{clone}"), "--build-temp",
                          str(tmp_path / f"obj-{clone}")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    so = next((tmp_path / f"lib-{clone}" / "deelm").glob("_core*.so"))
    shutil.copy(so, pkg / "deelm" / so.name)
    return pkg


@pytest.mark.slow
def test_every_clone_gives_the_installed_builds_bits(tmp_path):
    installed = tmp_path / "pkg-installed"
    shutil.copytree(REPO / "deelm", installed / "deelm",
                    ignore=shutil.ignore_patterns("__pycache__", "adapters"))
    expected = outputs(installed, tmp_path)
    assert len(expected) > 40
    for clone in CLONES:
        got = outputs(build(clone, tmp_path), tmp_path)
        differ = sorted(k for k in expected if got.get(k) != expected[k])
        print(f"\n[clone {clone}] {len(expected)} outputs, {len(differ)} differ")
        assert not differ, f"the {clone} clone differs from the installed build: {differ[:5]}"
    digest = hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()
    print(f"[clones {CLONES}] every output equal; digest {digest[:16]}")

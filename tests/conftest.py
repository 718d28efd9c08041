"""Shared fixtures: tiny models built at run time, the default model, the shared data."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from support.gguf_builder import TINY, random_gemma3_weights, write_gemma3_gguf, write_tiny_gguf
from support.reference import bidirectional_layers, padded_batch

# There is no model hub here: transformers must only ever read local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
# Evaluation data lives outside the repository; DEELM_DATA overrides the location.
DATA_DIR = Path(os.environ.get("DEELM_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Measured k values are cached in $DEELM_CACHE_DIR (default ~/.cache/deelm):
    tests write theirs to a temporary folder, never into the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("DEELM_CACHE_DIR", str(tmp_path_factory.mktemp("deelm-cache")))
    yield
    patch.undo()


def fresh_tiny(tiny_path, k=1):
    """The tiny LLaMA of `tiny_path` as a DeeLM, bidirectional from layer k."""
    import deelm

    return deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=k, threads=2)


def quick_args(**kw):
    """TrainingArguments of a few quick steps on the tiny models."""
    from deelm.adapters.lora import LoraConfig
    from deelm.train import TrainingArguments

    base = dict(max_steps=6, batch_size=8, learning_rate=5e-3, warmup_ratio=0.0,
                lora=LoraConfig(r=4, alpha=8, dropout=0.1))
    base.update(kw)
    return TrainingArguments(**base)


def data_file(*parts):
    """A file of the shared data set, or skip the test saying where it looked."""
    p = DATA_DIR.joinpath(*parts)
    if not p.is_file():
        pytest.skip(f"shared data {p} is absent (set DEELM_DATA to the data folder)")
    return p


def read_jsonl(path, limit=None):
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def sts_sentences(n, task="STSBenchmark", split="test"):
    """n distinct sentences from an STS file of the shared data."""
    rows = read_jsonl(data_file("sts", task, f"{split}.jsonl"))
    seen = []
    for r in rows:
        for s in (r["sentence1"], r["sentence2"]):
            if s not in seen:
                seen.append(s)
            if len(seen) >= n:
                return seen
    return seen


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A tiny random LLaMA GGUF (F32 weights) and its stored weights."""
    path, stored = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    return path, stored


@pytest.fixture(scope="session")
def gemma_tiny_path(tmp_path_factory):
    """A tiny random Gemma-3 GGUF (F32 weights, gguf_builder.GEMMA3_TINY: local
    layers with a sliding window of 8 and one global layer) and its
    Gemma3ForCausalLM-named weights as stored."""
    path, stored = write_gemma3_gguf(tmp_path_factory.mktemp("gemma") / "tiny-gemma3.gguf",
                                     random_gemma3_weights())
    return path, stored


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    import deelm

    return deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=-1)


@pytest.fixture(scope="session")
def default_path():
    import deelm
    from deelm.errors import ModelNotFoundError

    try:
        return deelm.io.default_model.packaged_model_path()
    except ModelNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")


@pytest.fixture(scope="session")
def default_model(default_path):
    """The default model as users get it: int8 GEMMs on the fastest ISA path."""
    import deelm

    return deelm.DeeLM.from_pretrained(default_path, bidirectional_from=-1, adapter=None)


@pytest.fixture(scope="session")
def default_f32(default_path):
    """The default model computed in float32 (deelm's own GEMM): the exact path."""
    import deelm

    return deelm.DeeLM.from_pretrained(default_path, bidirectional_from=-1,
                                       compute_precision="float32", adapter=None)


@pytest.fixture(scope="session")
def hf_default(default_path):
    """transformers' model and tokenizer on the same GGUF (float32, eager attention)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(
        str(default_path.parent), gguf_file=default_path.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(default_path.parent), gguf_file=default_path.name)
    return model, tok


def hf_hidden_states(model, ids, bidirectional_from=-1, windows=None):
    """transformers reference for a batch of token id lists (right-padded in one
    call): per sentence, the list of hidden states after the embedding and every
    layer (the last one final-normed, as transformers returns it), unpadded.
    Layers >= bidirectional_from get a padding-only mask instead of the causal
    one, which is how DeeLM changes a layer (windows: bidirectional_layers').
    One id list may be passed alone."""
    import torch

    single = bool(ids) and isinstance(ids[0], (int, np.integer))
    batch = [list(ids)] if single else [list(x) for x in ids]
    input_ids, keep = padded_batch(batch)
    with bidirectional_layers(model.layers, keep, bidirectional_from, windows), torch.no_grad():
        out = model(input_ids, attention_mask=keep, output_hidden_states=True)
    states = [h.double().numpy() for h in out.hidden_states]
    per_sentence = [[st[i, :len(x)] for st in states] for i, x in enumerate(batch)]
    return per_sentence[0] if single else per_sentence


def cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


__all__ = ["TINY", "DATA_DIR", "data_file", "read_jsonl", "sts_sentences", "hf_hidden_states",
           "bidirectional_layers", "padded_batch", "cosine"]

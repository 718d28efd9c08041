"""Hugging Face model directories (config.json + safetensors): tiny random
LLaMA, Mistral and Qwen2 models saved by transformers, loaded by deelm, and
compared with transformers layer by layer, causal and with bidirectional
upper layers; float16/bfloat16 and sharded checkpoints, tied and untied
embeddings, rope scaling, the same weights as GGUF, PEFT adapters, training,
the CLI. Run with `pytest -s` to see the measured differences."""
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import deelm
from conftest import REPO, cosine, hf_hidden_states
from support.reference import max_abs, report
from support.gguf_builder import TINY, write_tiny_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers
from support.hf_builder import build  # noqa: E402  (needs torch and transformers)
from support.reference import assert_same_embeddings

L = TINY["n_layers"]
KS = [-1, 0, 1, L - 1]
SENTENCES = ["A cat sat on the mat.", "x", "the heat in the station was rather oppressive",
             "Üñíçødé, emoji 🙂 and digits 12345!"]
# float32 against float32 on activations of |x| ~ 10: ~2e-6 measured; a wrong
# row order, mask, bias or frequency gives differences of order 1
TOL = 2e-5


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """(arch, options) -> (directory, float32 reference model), built once."""
    cache = {}

    def get(arch="llama", **options):
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"hf_{arch}")
            cache[key] = directory, build(directory, arch, **options)
        return cache[key]

    return get


def compare(directory, reference, label, ks=KS, sentences=SENTENCES, **load):
    """deelm (float32) on the directory against transformers, every k of ks:
    the worst difference of hidden states after each layer, of final-normed
    token states and of mean-pooled embeddings; returns the deelm model."""
    model = deelm.DeeLM.from_pretrained(directory, bidirectional_from=-1, threads=1, **load)
    ids = [e.ids for e in model.tokenize(sentences)]
    assert max(len(x) for x in ids) > 30, "the sentences should reach many rotary positions"
    for k in ks:
        pooled, _, hidden, tokens, off = model.forward_ids(ids, hidden=True, token_states=True,
                                                           bidirectional_from=k)
        ref = hf_hidden_states(reference.model, ids, k)  # one right-padded batch
        worst, final, pool, cos = 0.0, 0.0, 0.0, 1.0
        for s in range(len(ids)):
            a, b = off[s], off[s + 1]
            # transformers' states 0..L-1 are residual streams, its last one is final-normed
            worst = max([worst] + [max_abs(hidden[l, a:b], ref[s][l]) for l in range(L)])
            final = max(final, max_abs(tokens[a:b], ref[s][L]))
            pool = max(pool, max_abs(pooled[s], ref[s][L].mean(0)))
            cos = min(cos, cosine(pooled[s], ref[s][L].mean(0)))
        report(f"{label} k={k}", f"max abs diff: hidden states {worst:.2e}, final-normed tokens "
                                 f"{final:.2e}, pooled {pool:.2e} (1 - cosine {1 - cos:.1e})")
        assert worst <= TOL and final <= TOL and pool <= TOL, (worst, final, pool)
    return model


# ------------------------------------------------------------------ architectures

@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_architectures_match_transformers(tiny_dirs, arch):
    # LLaMA: head_dim given, wider than hidden_size / heads; Mistral: a
    # sliding window shorter than max_position_embeddings, which caps deelm's
    # context; Qwen2: q/k/v biases (random, non-zero)
    options = {"llama": dict(head_dim=32), "mistral": dict(sliding_window=64),
               "qwen2": dict(tie_word_embeddings=True)}
    directory, ref = tiny_dirs(arch, **options.get(arch, {}))
    model = compare(directory, ref, arch)
    assert model.compute_precision == "float32" and model.config["architecture"] == arch
    assert model.config["rope_style"] == 1  # rotate-half: HF rows are used as stored
    assert model.config["head_dim"] == (32 if arch == "llama" else 16)
    expected_context = 64 if arch == "mistral" else TINY["context_length"]
    assert model.config["context_length"] == model.max_seq_length == expected_context
    with pytest.raises(ValueError, match=f"exceeds the model's context length {expected_context}"):
        model.max_seq_length = expected_context + 1
    if arch == "qwen2":
        biases = [n for n in model._file.tensors if n.endswith(".bias")]
        assert len(biases) == 3 * L
        assert float(ref.model.layers[0].self_attn.q_proj.bias.detach().abs().min()) > 0


def test_bare_model_checkpoint(tiny_dirs, tmp_path):
    """A LlamaModel saved alone (no vocabulary head, no "model." prefix)."""
    directory, ref = tiny_dirs("llama")
    ref.model.save_pretrained(str(tmp_path))
    shutil.copy(directory / "tokenizer.json", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaModel"]
    compare(tmp_path, ref, "LlamaModel", ks=[-1, 1])


def test_tied_and_untied_embeddings(tiny_dirs):
    from safetensors import safe_open

    for tie in (True, False):
        directory, ref = tiny_dirs("llama", tie_word_embeddings=tie)
        with safe_open(str(directory / "model.safetensors"), framework="np") as f:
            assert ("lm_head.weight" in f.keys()) != tie
        compare(directory, ref, f"llama tie_word_embeddings={tie}", ks=[1])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tiny_dirs, dtype):
    """F16/BF16 tensors, decoded by the C core, against transformers in
    float32 on the same rounded weights."""
    directory, ref = tiny_dirs("llama", dtype=dtype)
    model = compare(directory, ref, f"llama {dtype}", ks=[-1, 1])
    name = {"float16": "F16", "bfloat16": "BF16"}[dtype]
    assert model._file.tensor_types == {name: 2 + 9 * L}
    assert model.compute_precision == "float32"


def test_sharded_checkpoint(tiny_dirs):
    directory, ref = tiny_dirs("llama", max_shard_size="40KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (directory / "model.safetensors.index.json").is_file()
    model = compare(directory, ref, f"llama in {len(shards)} shards", ks=[-1, 1])
    # one mapping per shard that holds weights deelm uses (not the lm_head's)
    assert 2 <= len(model._file.mappings) <= len(shards)
    single = deelm.DeeLM.from_pretrained(tiny_dirs("llama")[0], bidirectional_from=-1, threads=1)
    assert np.array_equal(model.encode(SENTENCES), single.encode(SENTENCES))


def test_weights_are_memory_mapped_not_copied(tiny_dirs):
    from deelm.io.hf import read_hf_checkpoint

    ckpt = read_hf_checkpoint(tiny_dirs("llama")[0])
    for name, (_, _, _, raw) in ckpt.tensors.items():
        assert raw.dtype == np.uint8 and not raw.flags.owndata and not raw.flags.writeable, name
    ckpt.release_resident_pages()


# ------------------------------------------------------------------ rope scaling

LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def rewrite_config(directory, edit):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


def older_keys(key):
    """config.json as transformers 4 wrote it: top-level rope_theta and
    rope_scaling, its type under `key` ("rope_type", or the oldest "type")."""
    def edit(cfg):
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type", None) or params.pop("type")
        params.pop("type", None)
        cfg["rope_scaling"] = None if kind == "default" else {key: kind, **params}
    return edit


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", **LLAMA3},
                                     {"rope_type": "dynamic", "factor": 2.0}],
                         ids=["linear", "llama3", "dynamic"])
def test_rope_scaling(tmp_path, scaling):
    """inv_freq equal to transformers' own (bitwise), and the hidden states,
    whichever way config.json spells the scaling."""
    ref = build(tmp_path / "new", rope_scaling=scaling)
    want = ref.model.rotary_emb.inv_freq.numpy()
    plain = deelm.io.layout.rope_inv_freq(TINY["dim"] // TINY["n_heads"], TINY["rope_theta"])
    # dynamic NTK only changes frequencies past max_position_embeddings, which
    # deelm's context never reaches
    assert np.array_equal(want, plain) == (scaling["rope_type"] == "dynamic")
    for form in ("rope_parameters", "rope_type", "type"):
        directory = tmp_path / "new"
        if form != "rope_parameters":
            directory = tmp_path / form
            shutil.copytree(tmp_path / "new", directory)
            rewrite_config(directory, older_keys(form))
            assert form in json.loads((directory / "config.json").read_text())["rope_scaling"]
        model = deelm.DeeLM.from_pretrained(directory, threads=1)
        got = model._file.config["inv_freq"]
        assert np.array_equal(got, want), (form, got, want)
    compare(tmp_path / "new", ref, f"llama rope {scaling['rope_type']}", ks=[-1, 1])


# ------------------------------------------------------------------ the same weights as GGUF

def test_hf_directory_and_gguf_give_the_same_embeddings(tiny_dirs, tmp_path):
    """The tiny LLaMA written as GGUF (q/k rows permuted to the interleaved
    order llama.cpp's converter writes): same ids, same embeddings."""
    directory, ref = tiny_dirs("llama")
    sd = {k: v.numpy().astype(np.float32) for k, v in ref.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    weights = {"token_embd": sd["model.embed_tokens.weight"], "output_norm": sd["model.norm.weight"]}
    for l in range(L):
        for hf, short in names.items():
            weights[f"blk.{l}.{short}"] = sd[f"model.layers.{l}.{hf}.weight"]
    path, _ = write_tiny_gguf(tmp_path / "same.gguf", weights=weights)
    from_gguf = deelm.DeeLM.from_pretrained(path, threads=1)
    from_hf = deelm.DeeLM.from_pretrained(directory, threads=1)
    assert from_gguf.config["rope_style"] == 0 and from_hf.config["rope_style"] == 1
    assert_same_embeddings(from_gguf, from_hf, SENTENCES, (-1, 0, L - 1), "HF directory vs GGUF",
                           1e-5)


# ------------------------------------------------------------------ adapters, training, CLI

def test_peft_adapter_on_an_hf_model(tiny_dirs, tmp_path):
    peft = pytest.importorskip("peft")
    directory, ref = tiny_dirs("qwen2", tie_word_embeddings=True)
    base = copy.deepcopy(ref)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"],
                          layers_to_transform=[1, 2], lora_dropout=0.0)
    pm = peft.get_peft_model(base, cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make every path count
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "adapter"))
    model = deelm.DeeLM.from_pretrained(directory, bidirectional_from=-1, threads=1)
    model.load_adapter(tmp_path / "adapter")
    ids = [e.ids for e in model.tokenize(SENTENCES)]
    for k in (-1, 1):
        pooled, _, _, tokens, off = model.forward_ids(ids, token_states=True, bidirectional_from=k)
        refs = hf_hidden_states(pm.base_model.model.model, ids, k)
        worst = max(max_abs(tokens[off[s]:off[s + 1]], refs[s][L]) for s in range(len(ids)))
        plain = max(max_abs(tokens[off[s]:off[s + 1]], r[L])
                    for s, r in enumerate(hf_hidden_states(ref.model, ids, k)))
        report(f"PEFT LoRA on qwen2 k={k}", f"max abs diff of final-normed token states {worst:.2e} "
                                            f"(the adapter moves them by {plain:.2f})")
        assert worst <= TOL and plain > 0.1


def test_training_runs_on_an_hf_model(tiny_dirs, tmp_path):
    from deelm.adapters.lora import LoraConfig
    from deelm.train import TrainingArguments, train

    rows = [{"text": f"the cat {i} sat", "positive": f"a cat {i} sits", "negative": f"dog {i} ran"}
            for i in range(16)]
    data = tmp_path / "triplets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = deelm.DeeLM.from_pretrained(tiny_dirs("llama")[0], bidirectional_from=1, threads=1)
    args = TrainingArguments(max_steps=3, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0,
                             lora=LoraConfig(r=4, alpha=8))
    result = train(model, data, tmp_path / "run", args, show_progress_bar=False)
    assert result.steps == 3 and all(np.isfinite(h["loss"]) for h in result.history)
    again = deelm.DeeLM.from_pretrained(tiny_dirs("llama")[0], adapter=result.adapter, threads=1)
    assert np.array_equal(again.encode(SENTENCES), model.encode(SENTENCES))


def test_cli_encode_on_an_hf_directory(tiny_dirs, tmp_path):
    directory = tiny_dirs("llama")[0]
    out = tmp_path / "emb.npy"
    proc = subprocess.run([sys.executable, "-m", "deelm", "encode", "--model", str(directory),
                           "--threads", "1", "--output", str(out), *SENTENCES[:2]],
                          capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = deelm.DeeLM.from_pretrained(directory, threads=1).encode(SENTENCES[:2])
    assert np.array_equal(np.load(out), want)

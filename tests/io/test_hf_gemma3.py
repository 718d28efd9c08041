"""Gemma-3 Hugging Face checkpoints (Gemma3ForCausalLM, Gemma3TextModel):
tiny random models saved by transformers in float32 and bfloat16, loaded by
deelm and compared with transformers layer by layer, causal and with
bidirectional upper layers (local and global ones); config.json's older
spellings; the same weights as a GGUF file; configs deelm refuses.

The tiny model (tests/support/hf_builder.py GEMMA3_HF): 7 layers, layers 2 and 5
global, the others local with a sliding window of 8 shorter than the test
sentences, head_dim 24 != hidden_size / heads = 12, 4 query heads on 2 key/
value heads, random norm weights w around 0 (the model multiplies by 1 + w).
Mixed direction: layers >= k get conftest.bidirectional_layers' mask, which
for a local layer is deelm's symmetric window |i - j| < 8, as in
tests/io/test_gemma3.py. Run with `pytest -s` to see the measured differences."""
import json
import math
import shutil

import numpy as np
import pytest

import deelm
from deelm.errors import ModelFileError, UnsupportedModelError
from conftest import cosine, hf_hidden_states
from support.reference import max_abs, report
from support.gguf_builder import tiny_vocab, write_gemma3_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers
from support.hf_builder import GEMMA3_HF, build  # noqa: E402  (needs torch and transformers)
from support.reference import assert_same_embeddings  # noqa: E402

L = GEMMA3_HF["n_layers"]
V = len(tiny_vocab()[0])
WINDOWS = [0 if (l + 1) % GEMMA3_HF["sliding_window_pattern"] == 0 else GEMMA3_HF["sliding_window"]
           for l in range(L)]
# causal; all layers; k = 4: local 4 and 6 and global 5; the last (local) only
KS = [-1, 0, 4, L - 1]
LENGTHS = (1, 5, 9, 20, 40)  # around the window of 8, and past 32 tokens
# float32 against float32 in another order of operations (test_gemma3's
# bound); a missing 1 + w, a wrong mask, rotation or scale is of order 1
TOL = 5e-5
LINEAR = {"rope_type": "linear", "factor": 2.0}


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory):
    """options -> (directory, float32 transformers reference), built once."""
    cache = {}

    def get(**options):
        key = json.dumps(options, sort_keys=True)
        if key not in cache:
            directory = tmp_path_factory.mktemp("hf_gemma3")
            cache[key] = directory, build(directory, "gemma3", **options)
        return cache[key]

    return get


def ids_of(seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, V, n)] for n in LENGTHS]


def compare(directory, reference, label, ks=KS):
    """deelm (float32) on the directory against transformers for every k:
    the worst difference after each layer (relative to the state's size past
    10), of final-normed tokens and of mean-pooled embeddings."""
    model = deelm.DeeLM.from_pretrained(directory, bidirectional_from=-1, threads=1)
    assert model._core.config["sliding_window"] == WINDOWS
    ids = ids_of()
    for k in ks:
        pooled, _, hidden, tokens, off = model.forward_ids(ids, hidden=True, token_states=True,
                                                           bidirectional_from=k)
        ref = hf_hidden_states(reference.model, ids, k, WINDOWS)
        worst, biggest, final, pool, cos = [0.0] * L, [0.0] * L, 0.0, 0.0, 1.0
        for s in range(len(ids)):
            a, b = off[s], off[s + 1]
            for l in range(L):  # transformers' states 0..L-1 are residual streams
                worst[l] = max(worst[l], max_abs(hidden[l, a:b], ref[s][l]))
                biggest[l] = max(biggest[l], float(np.abs(ref[s][l]).max()))
            final = max(final, max_abs(tokens[a:b], ref[s][L]))
            pool = max(pool, max_abs(pooled[s], ref[s][L].mean(0)))
            cos = min(cos, cosine(pooled[s], ref[s][L].mean(0)))
        report(f"{label} k={k}", "max abs diff per layer " + ", ".join(f"{w:.2e}" for w in worst)
               + f"; final-normed tokens {final:.2e}; pooled {pool:.2e} (1 - cosine {1 - cos:.1e})")
        assert worst[0] == 0.0, "the scaled embedding must be transformers' float32 one exactly"
        assert all(w <= TOL * max(1.0, m / 10) for w, m in zip(worst, biggest)), (worst, biggest)
        assert final <= TOL and pool <= TOL, (final, pool)
    return model


# ------------------------------------------------------------------ against transformers

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma3_matches_transformers(gemma_dirs, dtype):
    directory, ref = gemma_dirs(dtype=dtype)
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    model = compare(directory, ref, f"HF gemma3 {dtype}")
    c = model._core.config
    assert model.config["architecture"] == "gemma3" and model.compute_precision == "float32"
    assert (c["ffn_act"], c["qk_norm"], c["post_norms"], c["rope_style"], c["head_dim"]) == \
        ("gelu_tanh", 1, 1, 1, 24)
    assert c["attn_scale"] == pytest.approx(GEMMA3_HF["query_pre_attn_scalar"] ** -0.5, rel=1e-7)
    assert model.max_seq_length == 256 == model.config["context_length"]  # the window caps nothing
    assert model._file.tensor_types == {"F32": 2 + 13 * L} if dtype == "float32" else \
        {"BF16": 2 + 13 * L}
    # the norms reach the core as float32 1 + w, the rest as stored
    t, ne0, ne1, raw = model._file.tensors["blk.3.attn_q_norm"]
    w = ref.model.layers[3].self_attn.q_norm.weight.detach().numpy()
    assert (t, ne0, ne1) == (0, 24, 1) and np.array_equal(raw.view(np.float32), np.float32(1) + w)


def test_embedding_scale_is_float32(gemma_dirs):
    """transformers multiplies the embedding by sqrt(hidden_size) rounded to
    the weights' dtype: in float32, deelm's arithmetic, that is float32
    sqrt(48); a bfloat16 model run in bfloat16 would use 6.9375 instead of
    6.9282 (llama.cpp uses float32 sqrt too)."""
    _, ref = gemma_dirs(dtype="bfloat16")
    emb = ref.model.embed_tokens
    assert float(emb.embed_scale.to(torch.float32)) == np.float32(math.sqrt(48))
    assert float(emb.embed_scale.to(torch.bfloat16)) == 6.9375
    model = deelm.DeeLM.from_pretrained(gemma_dirs(dtype="bfloat16")[0], threads=1)
    assert np.float32(model._core.config["embed_scale"]) == np.float32(math.sqrt(48))


def test_bare_text_model(gemma_dirs, tmp_path):
    """Gemma3TextModel saved alone: no vocabulary head, no "model." prefix."""
    directory, ref = gemma_dirs()
    ref.model.save_pretrained(str(tmp_path))
    shutil.copy(directory / "tokenizer.json", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Gemma3TextModel"]
    compare(tmp_path, ref, "HF Gemma3TextModel", ks=[-1, 4])


def test_linear_rope_scaling_on_global_layers(gemma_dirs):
    directory, ref = gemma_dirs(rope_scaling=LINEAR)
    cfg = json.loads((directory / "config.json").read_text())
    assert cfg["rope_parameters"]["full_attention"]["rope_type"] == "linear"
    model = compare(directory, ref, "HF gemma3 linear rope x2", ks=[-1, 4])
    # the factor divides the global frequencies only, as in transformers;
    # deelm's float32 powers (layout.rope_inv_freq) may differ from
    # torch's by an ulp
    rotary = ref.model.rotary_emb
    for key, want in (("inv_freq", rotary.full_attention_inv_freq),
                      ("inv_freq_local", rotary.sliding_attention_inv_freq)):
        np.testing.assert_allclose(model._file.config[key], want.numpy(), rtol=2.5e-7, atol=0)


def older_spelling(cfg):
    """config.json as transformers 4.5x wrote it: top-level rope_theta,
    rope_scaling and rope_local_base_freq; no layer_types, only
    sliding_window_pattern."""
    params = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    full = dict(params["full_attention"])
    cfg["rope_theta"] = full.pop("rope_theta")
    cfg["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    cfg["rope_scaling"] = None if full["rope_type"] == "default" else full


def test_older_config_spellings(gemma_dirs, tmp_path):
    """The same model under the older keys: deelm reads the same layers and
    frequencies, and transformers itself reads them so too."""
    directory, _ = gemma_dirs(rope_scaling=LINEAR)
    old = shutil.copytree(directory, tmp_path / "old")
    path = old / "config.json"
    cfg = json.loads(path.read_text())
    older_spelling(cfg)
    path.write_text(json.dumps(cfg))
    assert "layer_types" not in cfg and cfg["sliding_window_pattern"] == 3
    new_cfg = deelm.io.hf.read_hf_checkpoint(directory).config
    old_cfg = deelm.io.hf.read_hf_checkpoint(old).config
    for key in ("inv_freq", "inv_freq_local", "sliding_window"):
        assert np.array_equal(new_cfg[key], old_cfg[key]), key
    assert old_cfg["attn_scale"] == new_cfg["attn_scale"]
    hf = transformers.AutoConfig.from_pretrained(str(old))
    assert hf.layer_types == transformers.AutoConfig.from_pretrained(str(directory)).layer_types
    assert hf.rope_parameters["full_attention"] == dict(LINEAR, rope_theta=GEMMA3_HF["rope_theta"])
    assert hf.rope_parameters["sliding_attention"]["rope_theta"] == GEMMA3_HF["local_theta"]


# ------------------------------------------------------------------ the same weights as GGUF

def test_hf_directory_and_gguf_give_the_same_embeddings(gemma_dirs, tmp_path):
    """The tiny Gemma-3 written as GGUF the way llama.cpp's converter does
    (norms as 1 + w, the pattern, local base and attention scale as keys):
    same ids, same per-layer pooled embeddings as the Hugging Face load."""
    directory, ref = gemma_dirs(rope_scaling=LINEAR)
    weights = {k: v.numpy().astype(np.float32) for k, v in ref.state_dict().items()}
    metadata = dict(sliding_window_pattern=GEMMA3_HF["sliding_window_pattern"],
                    freq_base_swa=GEMMA3_HF["local_theta"], rope_scaling_linear=2.0,
                    attention_scale=GEMMA3_HF["query_pre_attn_scalar"] ** -0.5)
    path, _ = write_gemma3_gguf(tmp_path / "same.gguf", weights, cfg=GEMMA3_HF, metadata=metadata)
    from_gguf = deelm.DeeLM.from_pretrained(path, threads=1)
    from_hf = deelm.DeeLM.from_pretrained(directory, threads=1)
    for key in ("inv_freq", "inv_freq_local", "sliding_window"):
        assert np.array_equal(from_gguf._file.config[key], from_hf._file.config[key]), key
    sentences = ["A cat sat on the mat, and then another cat sat beside it.", "x",
                 "the heat in the station was rather oppressive that afternoon"]
    assert_same_embeddings(from_gguf, from_hf, sentences, (-1, 4, 0), "HF gemma3 directory vs GGUF",
                           1e-6)


# ------------------------------------------------------------------ configs deelm refuses

@pytest.mark.parametrize("edit, reason, cls", [
    (lambda c: c.update(hidden_activation="gelu"), "hidden_activation 'gelu' is not supported",
     UnsupportedModelError),
    (lambda c: c.update(attn_logit_softcapping=50.0),
     "attn_logit_softcapping = 50.0: softcapped attention scores are not supported",
     UnsupportedModelError),
    (lambda c: c["rope_parameters"]["full_attention"].update(rope_type="yarn", factor=4.0),
     r"rope scaling type 'yarn' is not supported \(supported: default, linear\)",
     UnsupportedModelError),
    (lambda c: c["rope_parameters"]["sliding_attention"].update(rope_type="llama3"),
     "rope scaling type 'llama3' is not supported", UnsupportedModelError),
    (lambda c: (older_spelling(c), c.update(rope_scaling={"rope_type": "dynamic"})),
     "rope scaling type 'dynamic' is not supported", UnsupportedModelError),
    (lambda c: (older_spelling(c), c.update(rope_scaling={"type": "linear", "factor": 2.0})),
     "'rope_scaling.type' = 'linear': transformers 5 ignores this older key", UnsupportedModelError),
    (lambda c: c.update(use_bidirectional_attention=True), "use_bidirectional_attention",
     UnsupportedModelError),
    (lambda c: c.update(attention_bias=True), "'attention_bias'", UnsupportedModelError),
    (lambda c: c["layer_types"].__setitem__(1, "chunked_attention"),
     "layer type 'chunked_attention' in 'layer_types' is not supported", UnsupportedModelError),
    (lambda c: c.update(layer_types=["full_attention"] * 3),
     "'layer_types' should list 7 layer types .* found 3 entries", ModelFileError),
    (lambda c: c.update(sliding_window=None),
     "'layer_types' marks sliding-window layers but 'sliding_window' is null", ModelFileError),
    (lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
     "'rope_parameters' should hold one JSON object per layer type", ModelFileError),
    (lambda c: c.update(query_pre_attn_scalar=0),
     "'query_pre_attn_scalar' = 0 should be a positive number", ModelFileError),
], ids=["activation", "softcapping", "yarn", "local-llama3", "old-dynamic", "old-type", "bidirectional",
        "bias", "layer-type", "layer-count", "no-window", "flat-rope", "scalar"])
def test_refused_configs(gemma_dirs, tmp_path, edit, reason, cls):
    directory = shutil.copytree(gemma_dirs()[0], tmp_path / "m")
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    with pytest.raises(cls, match=reason) as info:
        deelm.DeeLM.from_pretrained(directory, threads=1)
    assert info.value.path == str(path), info.value


def test_final_logit_softcapping_is_ignored(gemma_dirs, tmp_path):
    """It acts on the vocabulary logits, which embeddings never compute."""
    directory = shutil.copytree(gemma_dirs()[0], tmp_path / "m")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["final_logit_softcapping"] = 30.0
    (directory / "config.json").write_text(json.dumps(cfg))
    a = deelm.DeeLM.from_pretrained(directory, threads=1).encode(["a cat sat"])
    b = deelm.DeeLM.from_pretrained(gemma_dirs()[0], threads=1).encode(["a cat sat"])
    assert np.array_equal(a, b)

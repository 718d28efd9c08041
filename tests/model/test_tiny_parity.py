"""End to end on tiny random LLaMA GGUF files built at test time: deelm's hidden
states after every layer against the NumPy float64 reference of support/gguf_builder.py
and against transformers loading the same file, for every weight encoding and
for causal, partly and fully bidirectional attention. Run with `pytest -s` to
see the measured differences."""
import numpy as np
import pytest

import deelm
from conftest import cosine, hf_hidden_states
from support.gguf_builder import TINY, reference_forward, tiny_cfg, write_tiny_gguf
from support.reference import max_abs, report

L = TINY["n_layers"]
# K-quants (and the Q4_K_M mix: Q4_K with attn_v and ffn_down in Q6_K) need
# rows of 256: their tiny model is TINY_K, 256 wide
NEW_TYPES = ["Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M"]
WEIGHT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"] + NEW_TYPES
HF_WEIGHT_TYPES = ["F32", "Q8_0", "Q4_1"] + NEW_TYPES
KS = [-1, 0, 1, L - 1]


def _cases(types, new_ks):
    """(type, k) pairs: every k for the first types; attention does not depend
    on the weight type, so the new types run a few (the 256-wide models cost
    more)."""
    return [(t, k) for t in types for k in (new_ks if t in NEW_TYPES else KS)]

SENTENCES = [
    "A cat sat on the mat.",
    "x",
    "the heat in the station was rather oppressive, and the cat sat at the door",
    "Üñíçødé, emoji 🙂 and digits 12345!",
]
# float32 against float64 on these activations (max |x| ~ 10) measures ~3e-6;
# a wrong op (mask, rotation, norm) or a wrongly decoded block gives
# differences of order 1. Hidden states are held to TOL per 10 of their
# largest magnitude: the 256-wide K-quant models reach |x| ~ 60 (float32
# error ~1e-4 there, 1.6e-6 relative).
TOL = 5e-5


def state_tol(max_state):
    return TOL * max(1.0, max_state / 10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """weight_type -> (folder, file name, stored weights, DeeLM), built once per module."""
    cache = {}

    def get(weight_type):
        if weight_type not in cache:
            folder = tmp_path_factory.mktemp(f"tiny_{weight_type}")
            path, stored = write_tiny_gguf(folder / f"tiny-{weight_type}.gguf", weight_type=weight_type,
                                           cfg=tiny_cfg(weight_type))
            model = deelm.DeeLM.from_pretrained(path, bidirectional_from=-1, compute_precision="float32")
            cache[weight_type] = (folder, path.name, stored, model)
        return cache[weight_type]

    return get


@pytest.fixture(scope="module")
def hf_tiny(tiny):
    """weight_type -> transformers' model on the same GGUF (float32, eager attention)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cache = {}

    def get(weight_type):
        if weight_type not in cache:
            folder, name, _, _ = tiny(weight_type)
            cache[weight_type] = transformers.AutoModel.from_pretrained(
                str(folder), gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
        return cache[weight_type]

    return get


def _ids(model):
    ids = [e.ids for e in model.tokenize(SENTENCES)]
    assert min(len(x) for x in ids) == 1 and max(len(x) for x in ids) > 40
    return ids


def _forward(model, ids, k, **kw):
    return model.forward_ids(ids, hidden=True, token_states=True, bidirectional_from=k, **kw)


@pytest.mark.parametrize("weight_type, k", _cases(WEIGHT_TYPES, [1]))
def test_hidden_states_vs_numpy_reference(tiny, weight_type, k):
    _, _, stored, model = tiny(weight_type)
    ids = _ids(model)
    cfg = tiny_cfg(weight_type)
    pooled, _, hidden, tokens, off = _forward(model, ids, k)  # all sentences packed in one batch
    assert hidden.shape == (L + 1, off[-1], cfg["dim"]) and tokens.shape == (off[-1], cfg["dim"])
    worst_layer, worst_final, worst_cos = [0.0] * (L + 1), 0.0, 1.0
    biggest = [0.0] * (L + 1)
    for s, x in enumerate(ids):
        a, b = off[s], off[s + 1]
        states, final = reference_forward(stored, cfg, x, k)
        for l in range(L + 1):
            worst_layer[l] = max(worst_layer[l], max_abs(hidden[l, a:b], states[l]))
            biggest[l] = max(biggest[l], float(np.abs(states[l]).max()))
        worst_final = max(worst_final, max_abs(tokens[a:b], final))
        c = cosine(pooled[s], final.mean(0))
        worst_cos = min(worst_cos, c)
        assert c >= 0.99999, f"sentence {s}: pooled cosine {c}"
        assert max_abs(pooled[s], final.mean(0)) <= TOL
    report(f"numpy ref {weight_type} k={k}", "max abs diff per layer "
           + ", ".join(f"{v:.2e}" for v in worst_layer)
           + f"; final-normed tokens {worst_final:.2e}; pooled 1 - cosine {1 - worst_cos:.2e}")
    assert worst_layer[0] == 0.0, "the embedding lookup must reproduce the stored rows exactly"
    assert all(w <= state_tol(m) for w, m in zip(worst_layer, biggest)), (worst_layer, biggest)
    assert worst_final <= TOL, worst_final


@pytest.mark.parametrize("weight_type", ["F32", "Q4_0"])
def test_bidirectional_changes_only_layers_from_k(tiny, weight_type):
    """Layers below k run exactly as the causal model; from k on the states
    change (except for a one-token sentence, where there is nothing to see)."""
    model = tiny(weight_type)[3]
    ids = _ids(model)
    causal = _forward(model, ids, -1)[2]
    for k in range(L):
        _, _, hidden, _, off = _forward(model, ids, k)
        assert np.array_equal(hidden[:k + 1], causal[:k + 1]), k
        for s, x in enumerate(ids):
            a, b = off[s], off[s + 1]
            changed = max_abs(hidden[k + 1:, a:b], causal[k + 1:, a:b])
            assert (changed > 1e-3) if len(x) > 1 else (changed == 0), (k, s, changed)
        # the last token sees its whole sentence either way, so its state after
        # layer k (the first bidirectional one) is the causal one
        last = off[1:] - 1
        assert max_abs(hidden[k + 1, last], causal[k + 1, last]) <= 1e-5


def test_thread_count_does_not_change_results(tiny):
    model = tiny("Q8_0")[3]
    ids = _ids(model)
    saved = model.threads
    try:
        model.threads = 1
        one = _forward(model, ids, 1)
        model.threads = 2
        two = _forward(model, ids, 1)
    finally:
        model.threads = saved
    report("threads 1 vs 2", f"max abs diff hidden {max_abs(one[2], two[2]):.3g}")
    assert np.array_equal(one[2], two[2]) and np.array_equal(one[0], two[0])


@pytest.mark.reference
@pytest.mark.parametrize("weight_type, k", _cases(HF_WEIGHT_TYPES, [1]))
def test_hidden_states_vs_transformers(tiny, hf_tiny, weight_type, k):
    _, _, stored, model = tiny(weight_type)
    hf = hf_tiny(weight_type)
    ids = _ids(model)
    pooled, _, hidden, tokens, off = _forward(model, ids, k)
    worst_layer, worst_final, worst_cos = [0.0] * (L + 1), 0.0, 1.0
    biggest = [0.0] * (L + 1)
    for s, x in enumerate(ids):
        a, b = off[s], off[s + 1]
        ref = hf_hidden_states(hf, x, k)
        assert len(ref) == L + 1
        # transformers' states 0..L-1 are raw residual streams, its last one is final-normed
        for l in range(L):
            worst_layer[l] = max(worst_layer[l], max_abs(hidden[l, a:b], ref[l]))
            biggest[l] = max(biggest[l], float(np.abs(ref[l]).max()))
        worst_final = max(worst_final, max_abs(tokens[a:b], ref[L]))
        c = cosine(pooled[s], ref[L].mean(0))
        worst_cos = min(worst_cos, c)
        assert c >= 0.99999, f"sentence {s}: pooled cosine {c}"
        # and the NumPy reference agrees with transformers (both sides of the comparison are sane)
        assert max_abs(reference_forward(stored, tiny_cfg(weight_type), x, k)[1], ref[L]) <= TOL
    report(f"transformers {weight_type} k={k}", "max abs diff per layer "
           + ", ".join(f"{v:.2e}" for v in worst_layer[:L])
           + f"; final-normed tokens {worst_final:.2e}; pooled 1 - cosine {1 - worst_cos:.2e}")
    assert all(w <= state_tol(m) for w, m in zip(worst_layer, biggest)), (worst_layer, biggest)
    assert worst_final <= TOL, worst_final


@pytest.mark.parametrize("weight_type", ["F32", "BF16", "Q4_1"])
def test_layer_pooled_is_final_normed_mean(tiny, weight_type):
    model = tiny(weight_type)[3]
    ids = _ids(model)
    w = model._file.tensors["output_norm"]
    norm_w = np.frombuffer(w[3].tobytes(), np.float32).astype(np.float64)
    eps = model.config["rms_eps"]
    pooled, layer_pooled, hidden, tokens, off = model.forward_ids(
        ids, layers=True, hidden=True, token_states=True, bidirectional_from=L - 1)
    assert layer_pooled.shape == (L + 1, len(ids), TINY["dim"])
    worst = 0.0
    for l in range(L + 1):
        h = hidden[l].astype(np.float64)
        normed = h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * norm_w
        for s in range(len(ids)):
            ref = normed[off[s]:off[s + 1]].mean(0)
            worst = max(worst, max_abs(layer_pooled[l, s], ref) / np.abs(ref).max())
    report(f"layer_pooled {weight_type}", f"max rel diff vs mean(rmsnorm(hidden[l]) * w) {worst:.3g}")
    assert worst <= 1e-5
    assert np.array_equal(layer_pooled[L], pooled)
    # the final-normed token states are the last layer's normed rows
    h = hidden[L].astype(np.float64)
    assert max_abs(tokens, h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * norm_w) <= 1e-5
    # encode(output_value="layer_embeddings") is the same array, per sentence
    model.bidirectional_from = L - 1
    try:
        enc = model.encode(SENTENCES, output_value="layer_embeddings", batch_size=3)
    finally:
        model.bidirectional_from = -1
    assert enc.shape == (len(ids), L + 1, TINY["dim"])
    assert max_abs(enc, layer_pooled.transpose(1, 0, 2)) <= 1e-5


def test_pooling_last_is_last_token_state(tiny):
    model = tiny("F32")[3]
    ids = _ids(model)
    _, _, _, tokens, off = _forward(model, ids, model.bidirectional_from)
    last = model.encode(SENTENCES, pooling="last", batch_size=2)
    diff = max_abs(last, tokens[off[1:] - 1])
    report("pooling last", f"max abs diff vs token_states[-1] {diff:.3g}")
    assert diff == 0.0  # in batches of 2 or all at once, the same bits
    mean = model.encode(SENTENCES, pooling="mean")
    assert max_abs(mean, np.stack([tokens[off[s]:off[s + 1]].mean(0) for s in range(len(ids))])) <= 1e-5


@pytest.mark.parametrize("prompt", [deelm.PAPER_PROMPT, "Summarize: {text}\nIn one word:",
                                    "query: "])
def test_text_mean_pools_only_the_sentence(tiny, prompt):
    model = tiny("F32")[3]
    prefix, _, suffix = prompt.partition("{text}")
    dec = model.tokenizer.decode
    encs = model.tokenize(SENTENCES, prompt=prompt)
    for sentence, e in zip(SENTENCES, encs):
        a, b = e.text_start, e.text_end
        assert 0 <= a < b <= len(e.ids)
        # the three parts decode to prompt prefix / sentence / suffix; the
        # sentence's first token may carry the space that ends the prefix
        assert dec(e.ids) == prefix + sentence + suffix
        assert dec(e.ids[a:b]).strip() == sentence.strip(), (dec(e.ids[:a]), dec(e.ids[a:b]))
        assert dec(e.ids[:a]).strip() == prefix.strip()
        assert dec(e.ids[b:]).strip() == suffix.strip()
    emb = model.encode(SENTENCES, prompt=prompt, pooling="text_mean", batch_size=3)
    full = model.encode(SENTENCES, prompt=prompt, pooling="mean", batch_size=3)
    worst = 0.0
    for s, e in enumerate(encs):
        tokens = model.forward_ids([e.ids], token_states=True)[3]
        worst = max(worst, max_abs(emb[s], tokens[e.text_start:e.text_end].mean(0)))
        assert max_abs(full[s], tokens.mean(0)) <= 1e-5
        assert max_abs(emb[s], full[s]) > 1e-3  # the prompt tokens are really left out
    report(f"text_mean {prompt!r}", f"max abs diff vs mean of the sentence's token states {worst:.3g}")
    assert worst <= 1e-5

"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers on
the same file: hidden states after every layer and pooled embeddings, for the
causal model, the fully bidirectional one and a mixed one.

transformers dequantises the GGUF to float32 and runs it with eager attention;
for k >= 0 its causal mask is replaced by a padding-only mask in layers >= k.
These tests run deelm's float32 path; tests/core/test_int8.py holds the int8 path
to its own, stated tolerance.
"""
import numpy as np
import pytest

from conftest import cosine, hf_hidden_states, sts_sentences

N_SENTENCES = 50


@pytest.fixture(scope="module")
def sentences():
    # real sentences, several sources: STS-B (raw text), STS12 (SentEval text), SICK
    out = sts_sentences(30, "STSBenchmark", "test") + sts_sentences(10, "STS12", "test") \
        + sts_sentences(10, "SICK-R", "test")
    assert len(out) == N_SENTENCES
    return out


@pytest.mark.reference
@pytest.mark.parametrize("k", [-1, 0, 15], ids=["causal", "bidirectional", "mixed-k15"])
def test_layers_and_pooled_match_transformers(default_f32, hf_default, sentences, k):
    hf, _ = hf_default
    ids = default_f32.tokenizer.encode_ids(sentences)
    # all sentences in one deelm batch, one transformers call each
    pooled, _, hidden, tokens, off = default_f32.forward_ids(
        ids, hidden=True, token_states=True, bidirectional_from=k)
    L = default_f32.num_layers
    worst_layer_diff, worst_layer_cos, worst_pooled_cos, worst_pooled_diff = 0.0, 1.0, 1.0, 0.0
    refs = hf_hidden_states(hf, ids, k)
    for s, ref in enumerate(refs):
        rows = slice(off[s], off[s + 1])
        for l in range(L):  # raw residual stream after the embedding and layers 1..L-1
            mine = hidden[l][rows]
            worst_layer_diff = max(worst_layer_diff, float(np.abs(mine - ref[l]).max()))
            worst_layer_cos = min(worst_layer_cos, cosine(mine, ref[l]))
        # transformers' last hidden state is after the final norm
        final = tokens[rows]
        worst_layer_diff = max(worst_layer_diff, float(np.abs(final - ref[L]).max()))
        worst_layer_cos = min(worst_layer_cos, cosine(final, ref[L]))
        ref_mean = ref[L].mean(axis=0)
        worst_pooled_cos = min(worst_pooled_cos, cosine(pooled[s], ref_mean))
        worst_pooled_diff = max(worst_pooled_diff, float(np.abs(pooled[s] - ref_mean).max()))
    print(f"\nk={k}: {len(ids)} sentences, {off[-1]} tokens; hidden states (all {L + 1}): "
          f"max |diff| {worst_layer_diff:.3g}, min cosine {worst_layer_cos:.8f}; "
          f"pooled mean: max |diff| {worst_pooled_diff:.3g}, min cosine {worst_pooled_cos:.8f}")
    assert worst_pooled_cos >= 0.9999
    assert worst_layer_cos >= 0.9999
    assert worst_pooled_diff < 1e-3


@pytest.mark.reference
def test_last_token_pooling_matches_transformers(default_f32, hf_default, sentences):
    hf, _ = hf_default
    ids = default_f32.tokenizer.encode_ids(sentences[:10])
    pool = [(len(x) - 1, len(x)) for x in ids]
    pooled, *_ = default_f32.forward_ids(ids, pool, bidirectional_from=-1)
    refs = hf_hidden_states(hf, ids)
    worst = min(cosine(pooled[s], ref[-1][-1]) for s, ref in enumerate(refs))
    print(f"\nlast-token pooling: min cosine {worst:.8f}")
    assert worst >= 0.9999


def test_per_layer_pooled_equals_pooling_each_hidden_state(default_f32, sentences):
    """layer_pooled[l] is the final norm applied to hidden[l], then mean-pooled."""
    ids = default_f32.tokenizer.encode_ids(sentences[:4])
    pooled, layers, hidden, _, off = default_f32.forward_ids(ids, layers=True, hidden=True)
    w = default_f32._file.tensors["output_norm"][3].view(np.float32).astype(np.float64)
    eps = default_f32.config["rms_eps"]
    for l in range(default_f32.num_layers + 1):
        for s in range(len(ids)):
            h = hidden[l][off[s]:off[s + 1]].astype(np.float64)
            ref = (h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * w).mean(0)
            np.testing.assert_allclose(layers[l][s], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layers[-1], pooled)

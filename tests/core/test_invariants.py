"""Exact invariants of the forward pass: batching, padding, order, threads, and
the causal/bidirectional identities of DeeLM."""
import numpy as np
import pytest

from conftest import sts_sentences

MIXED = ["A man is playing a guitar.", "Hi", "x",
         "The quick brown fox jumps over the lazy dog near the bank of the river, twice.",
         "Café naïve — 日本語のテキスト 12345!", "A woman slices an onion."]


# every compute path: each precision on each ISA path this CPU runs (forced,
# so a machine with AVX-512 also checks the AVX2 and scalar kernels), and
# Gemma-3's block (q/k norms, post-norms, GeGLU, sliding windows of 8 tokens
# on its local layers, which the longer sentences exceed)
PATHS = {f"{model}-{precision}-{isa}": (where, precision, isa)
         for model, where in (("tiny", "tiny_path"), ("gemma", "gemma_tiny_path"))
         for precision in ("float32", "int8")
         for isa in ("avx512vnni", "avx2", "scalar")}
PATHS.update({"default-int8": ("default_path", "int8", "auto"),
              "default-int8-avx2": ("default_path", "int8", "avx2"),
              "default-float32": ("default_path", "float32", "auto"),
              "default-float32-avx2": ("default_path", "float32", "avx2")})


@pytest.fixture(scope="module", params=list(PATHS))
def model(request):
    import deelm
    from deelm import _core

    where, precision, isa = PATHS[request.param]
    if isa != "auto" and isa not in _core.isa_info()["supported"]:
        pytest.skip(f"this CPU cannot run the {isa} path")
    path = request.getfixturevalue(where)
    path = path[0] if isinstance(path, tuple) else path
    m = deelm.DeeLM.from_pretrained(path, bidirectional_from=-1, compute_precision=precision, isa=isa)
    saved = (m.bidirectional_from, m.pooling, m.threads, m.prompt)
    yield m
    m.bidirectional_from, m.pooling, m.threads, m.prompt = saved


@pytest.mark.parametrize("k", ["causal", "last", "zero"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_alone_equals_in_batch(model, k, pooling):
    model.bidirectional_from = {"causal": -1, "last": model.num_layers - 1, "zero": 0}[k]
    model.pooling = pooling
    batch = model.encode(MIXED, batch_size=64)
    alone = np.stack([model.encode(s) for s in MIXED])
    diff = float(np.abs(batch - alone).max())
    print(f"\nalone vs batch ({k}, {pooling}): max |diff| {diff:.3g}")
    assert diff == 0.0  # every row is computed alike, in either precision


def test_batch_size_and_order_do_not_matter(model):
    model.bidirectional_from = 0
    ref = model.encode(MIXED, batch_size=64)
    for bs in (1, 2, 5):
        assert np.array_equal(model.encode(MIXED, batch_size=bs), ref), bs
    perm = np.random.default_rng(0).permutation(len(MIXED))
    shuffled = model.encode([MIXED[i] for i in perm], batch_size=64)
    assert np.array_equal(shuffled, ref[perm])


def test_thread_count_does_not_matter(model):
    model.bidirectional_from = 0
    out = {}
    for t in (1, 2, 3):
        model.threads = t
        out[t] = model.encode(MIXED * 3, output_value="layer_embeddings")
    for t in (2, 3):
        diff = float(np.abs(out[t] - out[1]).max())
        print(f"\nthreads {t} vs 1: max |diff| {diff:.3g}")
        assert np.array_equal(out[t], out[1])


@pytest.mark.parametrize("precision", ["float32", "int8"])
@pytest.mark.parametrize("where", ["tiny_path", "gemma_tiny_path", "default_path"])
def test_isa_paths_give_the_same_bits(request, where, precision):
    """Every ISA path computes every layer's state bit for bit alike (the
    default model's scalar float32 path is left out: minutes of fmaf calls)."""
    import deelm
    from deelm import _core

    path = request.getfixturevalue(where)
    path = path[0] if isinstance(path, tuple) else path
    isas = [i for i in _core.isa_info()["supported"]
            if not (where == "default_path" and precision == "float32" and i == "scalar")]
    out = {}
    for isa in isas:
        m = deelm.DeeLM.from_pretrained(path, bidirectional_from=1, compute_precision=precision, isa=isa,
                                        adapter=None)
        out[isa] = m.encode(MIXED, output_value="layer_embeddings")
    print(f"\n{where} {precision}: {isas} bitwise equal")
    for isa in isas[1:]:
        assert np.array_equal(out[isa], out[isas[0]]), isa


def test_last_layer_bidirectional_with_last_pooling_equals_causal(model):
    """With only layer L-1 bidirectional, the last token attends to the same
    tokens as under causal attention, so its final state is unchanged."""
    model.pooling = "last"
    model.bidirectional_from = -1
    causal = model.encode(MIXED)
    model.bidirectional_from = model.num_layers - 1
    mixed = model.encode(MIXED)
    assert np.array_equal(causal, mixed)
    # ... but mean pooling does see the difference (tokens before the last changed)
    model.pooling = "mean"
    model.bidirectional_from = -1
    causal_mean = model.encode(MIXED[3])
    model.bidirectional_from = model.num_layers - 1
    assert np.abs(model.encode(MIXED[3]) - causal_mean).max() > 1e-4


def _first_token_states(model, text, k):
    ids = model.tokenizer.encode_ids([text])
    _, _, hidden, _, _ = model.forward_ids(ids, hidden=True, bidirectional_from=k)
    return hidden[:, 0, :]


def test_backward_flow_only_when_bidirectional(model):
    # short enough that the changed word is within 8 tokens of the first one,
    # so it reaches it through a sliding-window layer too
    a = "the cat sat"
    b = "the cat ran"
    # causal: the first token never sees later ones
    assert np.array_equal(_first_token_states(model, a, -1), _first_token_states(model, b, -1))
    # fully bidirectional: changing the last word changes the first token from layer 1 on
    sa, sb = _first_token_states(model, a, 0), _first_token_states(model, b, 0)
    assert np.array_equal(sa[0], sb[0])  # the embedding itself is per token
    assert np.all(np.abs(sa[1:] - sb[1:]).max(axis=1) > 0)
    # mixed: identical below k, different from k + 1 on
    k = model.num_layers // 2
    ma, mb = _first_token_states(model, a, k), _first_token_states(model, b, k)
    assert np.array_equal(ma[:k + 1], mb[:k + 1])
    assert np.all(np.abs(ma[k + 1:] - mb[k + 1:]).max(axis=1) > 0)


def test_many_real_sentences_batched_equal_alone(default_model):
    m = default_model
    m.bidirectional_from, m.pooling = 0, "mean"
    try:
        sents = sts_sentences(64)
        batch = m.encode(sents, batch_size=64)
        alone = np.stack([m.encode(s) for s in sents[:16]])
        assert np.array_equal(batch[:16], alone)
    finally:
        m.bidirectional_from = -1


def test_concurrent_encode_from_threads(tiny_path):
    """The GIL is released during compute: encode calls from several Python
    threads run at once and give the same result as one call."""
    import threading

    import deelm

    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=0, threads=2)
    sents = [f"the cat sat on the mat {i} " * (1 + i % 7) for i in range(200)]
    ref = m.encode(sents)
    out = {}
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, m.encode(sents)))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(out[i], ref) for i in range(4))

"""DeeLM as a drop-in for sentence-transformers' SentenceTransformer: encode's
signature and options, prompts, similarity functions, output quantisation,
save_pretrained / from_pretrained, and the real sentence-transformers tools
(util.paraphrase_mining, util.semantic_search, EmbeddingSimilarityEvaluator,
InformationRetrievalEvaluator) run unchanged on a DeeLM."""
import inspect
import json
import shutil
import warnings

import numpy as np
import pytest

import deelm
from deelm.errors import SavedModelError
from deelm.adapters.lora import LoraConfig, LoraLayout
from deelm.adapters.peft import save_adapter
from deelm.quantization import quantize_embeddings

SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument.", "A cat sleeps.",
             "The stock market fell today.", "A woman slices an onion.", "x", "",
             "Two dogs run across a green field while a child watches them."]


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=1, threads=1)


def _st():
    return pytest.importorskip("sentence_transformers")


def _adapter(model, folder=None, seed=0):
    """A LoRA adapter with non-zero A and B (so it changes the embeddings),
    applied from memory, or saved to `folder` and loaded from there."""
    layout = LoraLayout(LoraConfig(r=2, alpha=4), model.config)
    params = (0.05 * np.random.default_rng(seed).standard_normal(layout.size)).astype(np.float32)
    if folder is None:
        model.set_adapter(layout, params)
    else:
        save_adapter(folder, layout, params)
        model.load_adapter(folder)


# ---- encode's signature and options ---------------------------------------------

@pytest.mark.reference
@pytest.mark.parametrize("method", ["encode", "encode_query", "encode_document"])
def test_encode_takes_sentence_transformers_parameters_in_order(method):
    st = _st()
    theirs = list(inspect.signature(getattr(st.SentenceTransformer, method)).parameters)
    ours = list(inspect.signature(getattr(deelm.DeeLM, method)).parameters)
    if method == "encode":
        # same names in the same places after self and the input (ST: inputs, deelm: sentences)
        assert ours[2:2 + len(theirs) - 3] == theirs[2:-1] and ours[-1] == theirs[-1] == "kwargs"
    else:
        assert ours[2:4] == theirs[2:4] == ["prompt_name", "prompt"]


def test_second_positional_argument_is_prompt_name(tiny):
    tiny.prompts["q"] = "query: "
    try:
        assert np.array_equal(tiny.encode(SENTENCES, "q"), tiny.encode(SENTENCES, prompt="query: "))
        assert not np.array_equal(tiny.encode(SENTENCES, "q"), tiny.encode(SENTENCES))
    finally:
        del tiny.prompts["q"]


def test_inputs_keyword_and_accepted_unused_arguments(tiny):
    ref = tiny.encode(SENTENCES)
    same = tiny.encode(inputs=SENTENCES, pool={"processes": []}, chunk_size=2, device=["cpu"],
                       task="query")
    assert np.array_equal(ref, same)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(not_an_option=1), ValueError, "not_an_option"),
    (dict(processing_kwargs={"text": {"max_length": 8}}), ValueError, "processing_kwargs"),
    (dict(precision="int4"), ValueError, "precision"),
    (dict(precision="int8", output_value="layer_embeddings"), ValueError, "quantizes"),
    (dict(truncate_dim=0), ValueError, "truncate_dim"),
    (dict(truncate_dim=65), ValueError, "truncate_dim"),
    (dict(truncate_dim=2.0), ValueError, "truncate_dim"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(pool="yes"), ValueError, "pool"),
    (dict(device=["cpu", "cuda:0"]), ValueError, "device"),
    (dict(prompt_name="nope"), ValueError, "prompt_name 'nope'"),
])
def test_bad_st_arguments(tiny, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tiny.encode(SENTENCES[:2], **kwargs)


def test_encode_needs_sentences(tiny):
    with pytest.raises(TypeError, match="sentences"):
        tiny.encode()
    with pytest.raises(TypeError, match="both"):
        tiny.encode(["a"], inputs=["b"])


def test_truncate_dim_renormalises(tiny):
    full = tiny.encode(SENTENCES)
    cut = tiny.encode(SENTENCES, truncate_dim=16)
    assert np.array_equal(cut, full[:, :16])
    unit = tiny.encode(SENTENCES, truncate_dim=16, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(unit, cut / np.linalg.norm(cut, axis=1, keepdims=True), rtol=1e-6)
    tiny.truncate_dim = 16  # the model's own setting, overridable per call
    try:
        assert np.array_equal(tiny.encode(SENTENCES), cut)
        assert tiny.encode(SENTENCES, truncate_dim=8).shape == (len(SENTENCES), 8)
    finally:
        tiny.truncate_dim = None
    with pytest.raises(ValueError, match="truncate_dim"):
        tiny.truncate_dim = -1


def test_output_value_none_gives_features_per_sentence(tiny):
    feats = tiny.encode(SENTENCES, output_value=None, truncate_dim=16)
    emb = tiny.encode(SENTENCES, truncate_dim=16)
    tokens = tiny.encode(SENTENCES, output_value="token_embeddings")
    ids = tiny.tokenize(SENTENCES)
    for f, e, t, i in zip(feats, emb, tokens, ids):
        assert set(f) == {"input_ids", "attention_mask", "token_embeddings", "sentence_embedding"}
        assert np.array_equal(f["sentence_embedding"], e) and np.array_equal(f["token_embeddings"], t)
        assert f["input_ids"].tolist() == list(i.ids) and f["attention_mask"].sum() == len(i.ids)
    one = tiny.encode(SENTENCES[0], output_value=None)
    assert isinstance(one, dict) and one["sentence_embedding"].shape == (64,)


# ---- output precision -----------------------------------------------------------

@pytest.mark.reference
@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
def test_output_precision_equals_sentence_transformers_quantize(tiny, precision):
    st = _st()
    from sentence_transformers.util.quantization import quantize_embeddings as st_quantize

    for kwargs in (dict(), dict(normalize_embeddings=True, truncate_dim=24)):
        floats = tiny.encode(SENTENCES, **kwargs)
        ours = tiny.encode(SENTENCES, precision=precision, **kwargs)
        theirs = st_quantize(floats, precision=precision)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), (precision, kwargs)
        tensor = tiny.encode(SENTENCES, precision=precision, convert_to_tensor=True, **kwargs)
        assert np.array_equal(tensor.numpy(), theirs)
    tokens = tiny.encode(SENTENCES[:3], output_value="token_embeddings")
    for ours, theirs in zip(tiny.encode(SENTENCES[:3], output_value="token_embeddings",
                                        precision=precision), st_quantize(tokens, precision)):
        assert np.array_equal(ours, theirs)
    assert st.__version__  # the reference really ran


def test_quantize_edge_cases():
    x = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)
    assert quantize_embeddings(x, "binary").shape == (5, 2)
    assert quantize_embeddings(np.zeros((0, 10), np.float32), "int8").shape == (0, 10)
    assert quantize_embeddings([], "int8") == []
    with pytest.raises(ValueError, match="more than one embedding"):
        quantize_embeddings(x[:1], "int8")
    ranges = np.stack([x.min(0), x.max(0)])
    assert np.array_equal(quantize_embeddings(x[:1], "uint8", ranges=ranges),
                          quantize_embeddings(x, "uint8")[:1])
    with pytest.raises(TypeError, match="floats"):
        quantize_embeddings(x.astype(np.int8), "int8")


def test_single_string_int8_needs_ranges_as_in_st(tiny):
    with pytest.raises(ValueError, match="more than one embedding"):
        tiny.encode("one sentence", precision="int8")
    assert tiny.encode("one sentence", precision="ubinary").shape == (8,)


# ---- prompts ------------------------------------------------------------------

def test_prompts_at_load_and_their_resolution(tiny_path):
    m = deelm.DeeLM.from_pretrained(tiny_path[0], threads=1, prompts={"query": "query: ",
                                    "clf": "Classify: {text} ->"}, default_prompt_name="clf")
    assert m.prompts == {"query": "query: ", "document": "", "clf": "Classify: {text} ->"}
    raw = m.encode(SENTENCES, prompt="")
    clf = m.encode(SENTENCES, prompt="Classify: {text} ->")
    assert np.array_equal(m.encode(SENTENCES), clf)                       # default_prompt_name
    assert np.array_equal(m.encode_query(SENTENCES), m.encode(SENTENCES, prompt="query: "))
    # the empty "document" prompt keeps encode_document off default_prompt_name
    assert np.array_equal(m.encode_document(SENTENCES), raw)
    assert np.array_equal(m.encode_document(SENTENCES, prompt_name="clf"), clf)
    with pytest.raises(ValueError, match="default_prompt_name 'x'"):
        deelm.DeeLM.from_pretrained(tiny_path[0], threads=1, default_prompt_name="x")
    with pytest.raises(ValueError, match=r"prompts\['bad'\]"):
        deelm.DeeLM.from_pretrained(tiny_path[0], threads=1, prompts={"bad": "{text}{text}"})
    with pytest.raises(TypeError, match="prompts must be a dict"):
        deelm.DeeLM.from_pretrained(tiny_path[0], threads=1, prompts=["query: "])


def test_an_empty_named_prompt_keeps_the_model_template(tiny_path):
    m = deelm.DeeLM.from_pretrained(tiny_path[0], threads=1, prompt=deelm.PAPER_PROMPT)
    assert np.array_equal(m.encode_query(SENTENCES), m.encode(SENTENCES))
    assert not np.array_equal(m.encode(SENTENCES, prompt=""), m.encode(SENTENCES))


# ---- similarity -----------------------------------------------------------------

@pytest.mark.reference
@pytest.mark.parametrize("name", ["cosine", "dot", "euclidean", "manhattan"])
def test_similarity_follows_similarity_fn_name_like_st(tiny_path, name):
    st = _st()
    torch = pytest.importorskip("torch")
    from sentence_transformers.util import SimilarityFunction

    m = deelm.DeeLM.from_pretrained(tiny_path[0], threads=1, similarity_fn_name=name)
    a, b = m.encode(SENTENCES[:5]), m.encode(SENTENCES[3:])
    full = SimilarityFunction.to_similarity_fn(name)(a, b).numpy()
    pair = SimilarityFunction.to_similarity_pairwise_fn(name)(a[:4], b[:4]).numpy()
    np.testing.assert_allclose(m.similarity(a, b), full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.similarity_pairwise(a[:4], b[:4]), pair, rtol=1e-5, atol=1e-5)
    assert isinstance(m.similarity(torch.from_numpy(a), b), torch.Tensor)
    assert isinstance(m.similarity(a, b), np.ndarray) and st


def test_similarity_fn_name_is_checked(tiny):
    with pytest.raises(ValueError, match="similarity_fn_name"):
        tiny.similarity_fn_name = "maxsim"
    with pytest.raises(ValueError, match="pairwise"):
        tiny.similarity_pairwise(np.ones((2, 4)), np.ones((3, 4)))
    assert tiny.similarity_fn_name == "cosine"


# ---- the real sentence-transformers tools ----------------------------------------

@pytest.mark.reference
def test_st_util_and_evaluators_run_on_a_deelm(tiny_path):
    _st()
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.evaluation import (EmbeddingSimilarityEvaluator,
                                                  InformationRetrievalEvaluator)

    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=1, threads=1)
    pairs = util.paraphrase_mining(m, SENTENCES[:6], show_progress_bar=False)
    assert len(pairs) == 15 and all(0 <= i < 6 and 0 <= j < 6 for _, i, j in pairs)
    emb = m.encode(SENTENCES[:6])
    assert pairs[0][0] == pytest.approx(max(m.similarity(emb, emb)[i, j]
                                            for i in range(6) for j in range(i + 1, 6)), abs=1e-5)
    hits = util.semantic_search(m.encode(SENTENCES[:2], convert_to_tensor=True),
                                m.encode(SENTENCES, convert_to_tensor=True), top_k=3)
    assert [h[0]["corpus_id"] for h in hits] == [0, 1]  # each query finds itself first

    sts = EmbeddingSimilarityEvaluator(SENTENCES[:4], SENTENCES[4:8], [0.1, 0.9, 0.4, 0.2],
                                       name="tiny")
    scores = sts(m)
    assert sts.primary_metric in scores and np.isfinite(scores[sts.primary_metric])
    assert m.model_card_data.eval_results[-1]["evaluator"] == "EmbeddingSimilarityEvaluator"

    m.prompts.update(query="query: ", document="passage: ")
    ir = InformationRetrievalEvaluator(
        queries={"q0": SENTENCES[0], "q1": SENTENCES[3]},
        corpus={f"d{i}": s for i, s in enumerate(SENTENCES)},
        relevant_docs={"q0": {"d1"}, "q1": {"d3"}}, name="tiny-ir", show_progress_bar=False)
    scores = ir(m)
    assert f"tiny-ir_{m.similarity_fn_name}_ndcg@10" in scores


@pytest.mark.reference
def test_st_sts_evaluator_scores_the_default_model_as_the_harness(default_path):
    """EmbeddingSimilarityEvaluator (which passes truncate_dim=None and reads
    similarity_fn_name) gives the default model the Spearman deelm's own STS
    harness gives it."""
    _st()
    from conftest import data_file, read_jsonl
    from scipy.stats import spearmanr
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    rows = read_jsonl(data_file("sts", "STSBenchmark", "test.jsonl"), limit=60)
    m = deelm.DeeLM.from_pretrained(default_path)
    a, b = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]
    gold = [r["score"] / 5 for r in rows]
    scores = EmbeddingSimilarityEvaluator(a, b, gold, name="stsb")(m)
    ours = spearmanr(gold, m.similarity_pairwise(m.encode(a), m.encode(b))).statistic
    assert scores["stsb_spearman_cosine"] == pytest.approx(ours, abs=1e-6)


# ---- save_pretrained / from_pretrained ---------------------------------------------

def _custom(tiny_path, **kw):
    return deelm.DeeLM.from_pretrained(
        tiny_path[0], bidirectional_from=1, pooling="text_mean", prompt="Say: {text}!",
        max_seq_length=48, threads=1, prompts={"query": "q: "}, default_prompt_name="query",
        similarity_fn_name="dot", truncate_dim=40, **kw)


@pytest.mark.parametrize("adapter", ["none", "memory", "folder"])
def test_save_and_reload_is_bitwise_equal(tiny_path, tmp_path, adapter):
    m = _custom(tiny_path)
    if adapter != "none":
        _adapter(m, tmp_path / "lora" if adapter == "folder" else None)
    m.save_pretrained(tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / "deelm_model.json").read_text())
    assert record["base_model"]["path"] == str(tiny_path[0].resolve())
    assert len(record["base_model"]["sha256"]) == 64
    assert (record["adapter"] is None) == (adapter == "none")
    again = deelm.DeeLM.from_pretrained(tmp_path / "saved", threads=1)
    for k in ("bidirectional_from", "pooling", "prompt", "prompts", "default_prompt_name",
              "max_seq_length", "compute_precision", "isa", "similarity_fn_name", "truncate_dim"):
        assert again.load_options[k] == m.load_options[k], k
    for method in (again.encode, again.encode_document):
        assert np.array_equal(method(SENTENCES), getattr(m, method.__name__)(SENTENCES))
    if adapter == "folder":  # the adapter's files were copied, not referenced
        shutil.rmtree(tmp_path / "lora")
        assert np.array_equal(deelm.DeeLM.from_pretrained(tmp_path / "saved").encode(SENTENCES),
                              m.encode(SENTENCES))
    # settings given at load override the saved ones
    assert deelm.DeeLM.from_pretrained(tmp_path / "saved", pooling="last").pooling == "last"


def test_saved_model_refuses_a_moved_or_changed_base(tiny_path, tmp_path):
    base = tmp_path / "base.gguf"
    shutil.copy(tiny_path[0], base)
    deelm.DeeLM.from_pretrained(base, threads=1).save_pretrained(tmp_path / "saved")
    with open(base, "r+b") as fh:  # one byte of the last tensor's data
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(SavedModelError, match="changed since the model was saved"):
        deelm.DeeLM.from_pretrained(tmp_path / "saved")
    base.unlink()
    with pytest.raises(SavedModelError, match="moved or deleted"):
        deelm.DeeLM.from_pretrained(tmp_path / "saved")


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"format": "other"}', "not a saved deelm model"),
    ('{"format": "deelm-model", "format_version": 99}', "format version 99"),
    ('{"format": "deelm-model", "format_version": 1, "base_model": "x"}', "base_model must"),
])
def test_malformed_saved_records(tmp_path, text, match):
    (tmp_path / "deelm_model.json").write_text(text)
    with pytest.raises(SavedModelError, match=match):
        deelm.DeeLM.from_pretrained(tmp_path)


def test_save_refuses_a_foreign_folder(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a saved deelm model folder"):
        tiny.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_save_and_reload_the_default_model_with_its_adapter(default_path, tmp_path, monkeypatch):
    monkeypatch.delenv("DEELM_MODEL", raising=False)
    m = deelm.DeeLM.from_pretrained()  # with the bundled adapter
    m.save_pretrained(tmp_path / "smol")
    again = deelm.DeeLM.from_pretrained(tmp_path / "smol")
    assert again.adapter is not None
    assert np.array_equal(again.encode(SENTENCES), m.encode(SENTENCES))


# ---- compute precision ---------------------------------------------------------------

def test_compute_precision_and_its_deprecated_name(tiny_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = deelm.DeeLM.from_pretrained(tiny_path[0], compute_precision="int8", threads=1)
    assert m.compute_precision == "int8" and m.load_options["compute_precision"] == "int8"
    with pytest.warns(DeprecationWarning, match="compute_precision"):
        old = deelm.DeeLM.from_pretrained(tiny_path[0], precision="int8", threads=1)
    assert np.array_equal(old.encode(SENTENCES), m.encode(SENTENCES))
    with pytest.warns(DeprecationWarning):
        assert m.precision == "int8"
    with pytest.raises(ValueError, match="contradicts"), pytest.warns(DeprecationWarning):
        deelm.DeeLM.from_pretrained(tiny_path[0], precision="int8", compute_precision="float32")
    with pytest.raises(ValueError, match="compute_precision must be"):
        deelm.DeeLM.from_pretrained(tiny_path[0], compute_precision="int4")


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(similarity_fn_name="maxsim"), ValueError, "similarity_fn_name"),
    (dict(truncate_dim=0), ValueError, "truncate_dim"),
    (dict(truncate_dim=65), ValueError, "truncate_dim"),
    (dict(prompts={"q": 3}), TypeError, r"prompts\['q'\]"),
    (dict(prompts={1: "x"}), TypeError, "prompt names"),
])
def test_bad_st_settings_at_load(tiny_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        deelm.DeeLM.from_pretrained(tiny_path[0], threads=1, **kwargs)


def test_saved_folder_missing_its_adapter_or_a_setting(tiny_path, tmp_path):
    m = deelm.DeeLM.from_pretrained(tiny_path[0], threads=1)
    _adapter(m)
    m.save_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "saved" / "adapter")
    with pytest.raises(SavedModelError, match="adapter folder .* is missing"):
        deelm.DeeLM.from_pretrained(tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / "deelm_model.json").read_text())
    del record["pooling"], record["truncate_dim"]
    (tmp_path / "saved" / "deelm_model.json").write_text(json.dumps(record))
    with pytest.raises(SavedModelError, match="lacks the setting.*pooling, truncate_dim"):
        deelm.DeeLM.from_pretrained(tmp_path / "saved")

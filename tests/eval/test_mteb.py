"""deelm with the real mteb: a ModelMeta per configuration (so mteb's result
cache keeps configurations apart), prompts by prompt type, tasks on local
files (deelm.eval.mteb_tasks), and `deelm eval` JSON that mteb reads."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

import deelm
from deelm.eval import sts as ev
from deelm.eval.mteb_model import MTEBModel, prompt_name_for

mteb = pytest.importorskip("mteb")
pytest.importorskip("datasets")

WORDS = ["a man plays a guitar", "someone plays music", "a cat sleeps on the sofa",
         "the market fell sharply", "a woman cuts an onion", "a chef slices vegetables",
         "two dogs run in a field", "children play outside", "it is raining today",
         "the weather is wet", "he reads a book", "she writes a letter"]


def _sts_rows():
    """Twelve scored pairs (the scores are arbitrary: a tiny random model's
    Spearman only has to be reproducible and configuration-specific)."""
    rng = np.random.default_rng(0)
    return [{"sentence1": WORDS[i], "sentence2": WORDS[(i * 5 + 3) % 12],
             "score": float(rng.uniform(0, 5))} for i in range(12)]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def sts_dir(tmp_path):
    _write_jsonl(tmp_path / "data" / "sts" / "STSBenchmark" / "test.jsonl", _sts_rows())
    return tmp_path / "data"


def _tiny(tiny_path, k, **kw):
    return deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=k, threads=1, **kw)


def _score(result):
    return result.task_results[0].scores["test"][0]["main_score"]


# ---- ModelMeta ---------------------------------------------------------------------

def test_model_meta_names_the_configuration(tiny_path):
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    m = _tiny(tiny_path, 1, pooling="last", prompt=deelm.PAPER_PROMPT)
    meta = MTEBModel(m).mteb_model_meta
    assert isinstance(meta, ModelMeta)
    assert meta.name.startswith("deelm/tiny-k1-last-prompt-")
    assert len(meta.revision) == 64 and int(meta.revision, 16) >= 0
    assert (meta.embed_dim, meta.max_tokens) == (64, m.max_seq_length)
    assert meta.similarity_fn_name == ScoringFunction.COSINE and meta.open_weights
    assert meta.n_parameters > meta.n_embedding_parameters > 0 and meta.use_instructions
    # an equal configuration loaded again is the same model; any change is another
    assert MTEBModel(_tiny(tiny_path, 1, pooling="last", prompt=deelm.PAPER_PROMPT)) \
        .mteb_model_meta.revision == meta.revision
    m.bidirectional_from = 0
    assert MTEBModel(m).mteb_model_meta.name.startswith("deelm/tiny-k0-last")
    revisions = {meta.revision}
    for change in (dict(similarity_fn_name="dot"), dict(truncate_dim=32), dict(max_seq_length=64)):
        for k, v in change.items():
            setattr(m, k, v)
        meta2 = MTEBModel(m).mteb_model_meta
        assert meta2.revision not in revisions, change
        revisions.add(meta2.revision)
    assert meta2.embed_dim == 32 and meta2.similarity_fn_name == ScoringFunction.DOT_PRODUCT


def test_model_meta_follows_the_adapter(tiny_path, tmp_path):
    from deelm.adapters.lora import LoraConfig, LoraLayout

    m = _tiny(tiny_path, 1)
    bare = MTEBModel(m).mteb_model_meta
    layout = LoraLayout(LoraConfig(r=2), m.config)
    for seed in (1, 2):
        params = (0.01 * np.random.default_rng(seed).standard_normal(layout.size)).astype(np.float32)
        m.set_adapter(layout, params)
        meta = MTEBModel(m).mteb_model_meta
        assert "-adapter-" in meta.name and meta.revision != bare.revision
        bare = meta  # each adapter gives its own revision


def test_euclidean_and_manhattan_models_have_a_meta(tiny_path):
    from mteb.models.model_meta import ScoringFunction

    for name in ("euclidean", "manhattan"):
        meta = MTEBModel(_tiny(tiny_path, -1, similarity_fn_name=name)).mteb_model_meta
        assert meta.similarity_fn_name == ScoringFunction(name)


# ---- one cache, two configurations ---------------------------------------------------

def test_two_configurations_keep_their_own_scores_in_one_cache(tiny_path, sts_dir, tmp_path):
    """With mteb's result cache, k = -1 then k = 0 used to both be filed under
    no_model_name/available, and the second run returned the first score."""
    from deelm.eval import mteb_tasks

    cache = mteb.ResultCache(tmp_path / "cache")
    models = {k: _tiny(tiny_path, k) for k in (-1, 0)}
    fresh = {k: _score(mteb.evaluate(MTEBModel(m), mteb_tasks.sts_tasks(["STSBenchmark"], sts_dir),
                                     cache=None, show_progress_bar=False))
             for k, m in models.items()}
    assert abs(fresh[-1] - fresh[0]) > 1e-3
    for _ in range(2):  # the second round is read back from the cache (6 decimals kept)
        for k, m in models.items():
            got = _score(mteb.evaluate(MTEBModel(m), mteb_tasks.sts_tasks(["STSBenchmark"], sts_dir),
                                       cache=cache, show_progress_bar=False))
            assert got == pytest.approx(fresh[k], abs=5e-7), k
    # and the harness agrees with mteb on each
    for k, m in models.items():
        ours = ev.evaluate(m, ["STSBenchmark"], data_dir=sts_dir, show_progress_bar=False)
        assert ours["STSBenchmark"].main_score == pytest.approx(fresh[k], abs=1e-6)
    folders = sorted(p.name for p in (tmp_path / "cache" / "results").iterdir())
    assert folders == sorted(MTEBModel(m).mteb_model_meta.model_name_as_path()
                             for m in models.values())


# ---- prompts -----------------------------------------------------------------------

def test_prompt_names_follow_mtebs_priority():
    from mteb.types import PromptType

    prompts = {"query": "Q", "document": "D", "Retrieval": "R", "STS": "S",
               "SciFact-query": "SQ", "SciFact": "SF"}
    assert prompt_name_for(prompts, "SciFact", "Retrieval", PromptType.query) == "SciFact-query"
    assert prompt_name_for(prompts, "SciFact", "Retrieval", PromptType.document) == "SciFact"
    assert prompt_name_for(prompts, "NFCorpus", "Retrieval", PromptType.document) == "Retrieval"
    assert prompt_name_for({"query": "Q"}, "NFCorpus", "Retrieval", PromptType.query) == "query"
    assert prompt_name_for({"query": "Q"}, "NFCorpus", "Retrieval", None) is None


def test_queries_and_documents_get_their_prompts(tiny_path):
    from mteb.types import PromptType

    m = _tiny(tiny_path, 1, prompts={"query": "query: ", "document": "passage: "})
    wrapped = MTEBModel(m)
    meta = SimpleNamespace(name="SomeRetrieval", type="Retrieval")
    batches = [{"text": WORDS[:5]}, {"text": WORDS[5:]}]  # a DataLoader's batches
    q = wrapped.encode(batches, task_metadata=meta, hf_split="test", hf_subset="default",
                       prompt_type=PromptType.query)
    d = wrapped.encode(batches, task_metadata=meta, hf_split="test", hf_subset="default",
                       prompt_type=PromptType.document)
    assert np.array_equal(q, m.encode_query(WORDS)) and np.array_equal(d, m.encode_document(WORDS))
    assert not np.array_equal(q, d)
    task_prompt = MTEBModel(m, prompts={"SomeRetrieval": "Find: {text}"})
    assert np.array_equal(task_prompt.encode(WORDS, task_metadata=meta),
                          m.encode(WORDS, prompt="Find: {text}"))


# ---- tasks on local files ----------------------------------------------------------

def test_sts_task_reads_the_data_layout(sts_dir):
    from deelm.eval import mteb_tasks

    task = mteb_tasks.sts_task("STSBenchmark", sts_dir)
    split = task.dataset["default"]["test"]
    assert split["sentence1"] == [r["sentence1"] for r in _sts_rows()]
    assert task.data_loaded
    with pytest.raises(ev.DataError, match="does not exist"):
        mteb_tasks.sts_task("STS12", sts_dir)


def test_a_classification_task_runs_offline_on_local_rows(tiny_path, tmp_path):
    """A non-STS task through mteb, offline: Banking77Classification.v2's
    evaluation on a few local rows (sentences of the shared STS12 data,
    labelled by the corpus they come from)."""
    from conftest import data_file, read_jsonl
    from deelm.eval import mteb_tasks

    rows = read_jsonl(data_file("sts", "STS12", "test.jsonl"))
    by_subset = {}
    for r in rows:
        by_subset.setdefault(r["subset"], []).append(r["sentence1"])
    labels = sorted(by_subset)[:3]
    take = [{"text": s, "label": i} for i, name in enumerate(labels) for s in by_subset[name][:12]]
    folder = tmp_path / "banking-local"
    _write_jsonl(folder / "train.jsonl", take[0::2])
    _write_jsonl(folder / "test.jsonl", take[1::2])
    task = mteb_tasks.local_task("Banking77Classification.v2", folder)
    result = mteb.evaluate(MTEBModel(_tiny(tiny_path, 1)), task, cache=mteb.ResultCache(tmp_path / "c"),
                           show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]
    assert 0 <= scores["main_score"] <= 1 and "accuracy" in scores
    with pytest.raises(ev.DataError, match="no test.jsonl"):
        mteb_tasks.local_task("Banking77Classification.v2", tmp_path / "empty")


# ---- deelm eval output -------------------------------------------------------------

def test_deelm_eval_json_reads_with_mteb_task_result(tiny_path, sts_dir, tmp_path):
    from mteb.results import TaskResult

    from deelm.__main__ import main

    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_path[0]), "--data", str(sts_dir), "--tasks",
                 "STSBenchmark", "--output", str(out), "--bidirectional-from", "0"]) == 0
    ours = json.loads((out / "STSBenchmark.json").read_text())
    theirs = TaskResult.from_disk(out / "STSBenchmark.json")
    assert theirs.task_name == "STSBenchmark" and theirs.get_score() == ours["scores"]["test"][0]["main_score"]
    from deelm.saved_model import file_sha256

    assert theirs.dataset_revision == file_sha256(sts_dir / "sts" / "STSBenchmark" / "test.jsonl")


def test_rows_must_not_be_empty():
    from deelm.eval import mteb_tasks

    with pytest.raises(ev.DataError, match="split 'test' has no rows"):
        mteb_tasks.with_rows("STSBenchmark", {"test": []})

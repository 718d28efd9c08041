"""The STS harness: metrics against an independent computation, data reading, bad data."""
import json

import numpy as np
import pytest
from scipy import stats

from deelm.eval import sts as ev


class FixedModel:
    """An encode() returning fixed vectors per sentence, for exact metric checks."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def encode(self, sentences, batch_size=32, show_progress_bar=None, **kw):
        self.calls.append(list(sentences))
        return np.stack([self.table[s] for s in sentences]).astype(np.float32)


def _write_task(root, task, rows, name="test.jsonl"):
    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return folder / name


@pytest.fixture
def fixture_data(tmp_path):
    """STS-shaped data with tied gold scores and tied similarities, repeated sentences."""
    rng = np.random.default_rng(0)
    sentences = [f"sentence {i}" for i in range(12)]
    table = {s: rng.standard_normal(8) for s in sentences}
    table["twin a"] = table["twin b"] = np.ones(8)  # identical embeddings -> tied cosine 1.0
    rows = []
    golds = [0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 0.5, 5]
    for i, g in enumerate(golds):
        rows.append({"sentence1": sentences[i], "sentence2": sentences[(i * 5 + 3) % 12], "score": g})
    rows.append({"sentence1": "twin a", "sentence2": "twin b", "score": 5})
    rows.append({"sentence1": "twin b", "sentence2": "twin a", "score": 4})
    _write_task(tmp_path, "STSBenchmark", rows)
    return tmp_path, table, rows


def test_metrics_equal_independent_scipy(fixture_data):
    root, table, rows = fixture_data
    model = FixedModel(table)
    res = ev.evaluate(model, ["STSBenchmark"], data_dir=root, show_progress_bar=False)["STSBenchmark"]
    a = np.stack([table[r["sentence1"]] for r in rows]).astype(np.float32).astype(np.float64)
    b = np.stack([table[r["sentence2"]] for r in rows]).astype(np.float32).astype(np.float64)
    gold = np.array([r["score"] for r in rows], dtype=np.float64)
    cos = np.array([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
    man = -np.abs(a - b).sum(1)
    euc = -np.linalg.norm(a - b, axis=1)
    expect = {
        "cosine_spearman": stats.spearmanr(gold, cos).statistic,
        "cosine_pearson": stats.pearsonr(gold, cos).statistic,
        "manhattan_spearman": stats.spearmanr(gold, man).statistic,
        "manhattan_pearson": stats.pearsonr(gold, man).statistic,
        "euclidean_spearman": stats.spearmanr(gold, euc).statistic,
        "euclidean_pearson": stats.pearsonr(gold, euc).statistic,
    }
    for k, v in expect.items():
        assert res.scores[k] == pytest.approx(v, abs=1e-12), k
    assert res.main_score == res.scores["cosine_spearman"]
    # Spearman with ties is the Pearson correlation of average ranks
    ranks = stats.pearsonr(stats.rankdata(gold), stats.rankdata(cos)).statistic
    assert res.main_score == pytest.approx(ranks, abs=1e-12)


def test_each_unique_sentence_is_encoded_once(fixture_data):
    root, table, rows = fixture_data
    model = FixedModel(table)
    ev.evaluate(model, ["STSBenchmark"], data_dir=root, show_progress_bar=False)
    assert len(model.calls) == 1
    seen = model.calls[0]
    assert len(seen) == len(set(seen)) == len({s for r in rows for s in (r["sentence1"], r["sentence2"])})


def test_result_files_and_summary(fixture_data, tmp_path):
    root, table, _ = fixture_data
    out = tmp_path / "out"
    res = ev.evaluate(FixedModel(table), ["STSBenchmark"], data_dir=root, output_dir=out,
                      model_name="fixed", show_progress_bar=False)
    doc = json.loads((out / "STSBenchmark.json").read_text())
    assert doc["task_name"] == "STSBenchmark"
    test = doc["scores"]["test"][0]
    assert test["main_score"] == res["STSBenchmark"].main_score
    assert test["hf_subset"] == "default" and "cosine_spearman" in test
    summary = (out / "summary.md").read_text()
    assert "STSBenchmark" in summary and "avg" in summary


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_other_formats_read_the_same(fixture_data, fmt):
    root, table, rows = fixture_data
    path = root / "STSBenchmark" / f"test.{fmt}"
    (root / "STSBenchmark" / "test.jsonl").unlink()
    if fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(["sentence1", "sentence2", "score"])]
        lines += [sep.join([r["sentence1"], r["sentence2"], str(r["score"])]) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    data = ev.load_task("STSBenchmark", data_dir=root)
    assert data.sentence1 == [r["sentence1"] for r in rows]
    assert np.array_equal(data.scores, [r["score"] for r in rows])


def test_the_dev_split_defaults_to_the_tasks_that_have_one(fixture_data):
    root, table, rows = fixture_data
    _write_task(root, "STSBenchmark", rows, "dev.jsonl")
    res = ev.evaluate(FixedModel(table), data_dir=root, split="dev", show_progress_bar=False)
    assert list(res) == ["STSBenchmark"] and res["STSBenchmark"].split == "dev"
    assert ev.default_tasks() == list(ev.TASKS)


def test_senteval_protocol_uses_the_sick_test_split(tmp_path):
    _write_task(tmp_path, "SICK-R", [{"sentence1": "a", "sentence2": "b", "score": 1}] * 3)
    _write_task(tmp_path, "SICK-R", [{"sentence1": "a", "sentence2": "b", "score": 1}] * 2,
                name="test.senteval.jsonl")
    assert len(ev.load_task("SICK-R", tmp_path, "mteb").scores) == 3
    assert len(ev.load_task("SICK-R", tmp_path, "senteval").scores) == 2


def test_senteval_punctuation():
    assert ev.senteval_normalize(' a man plays "guitar" loudly ') == "a man plays 'guitar' loudly."
    assert ev.senteval_normalize('he said "no"') == "he said 'no'"
    assert ev.senteval_normalize("is it?") == "is it."
    assert ev.senteval_normalize("done.") == "done."


# ---- bad data ------------------------------------------------------------------

def test_unknown_task_lists_known_ones(tmp_path):
    with pytest.raises(ev.DataError, match="known tasks: STS12, STS13"):
        ev.task_file(tmp_path, "STS99")


def test_missing_task_folder_names_it(fixture_data):
    root, table, _ = fixture_data
    with pytest.raises(ev.DataError, match=r"STS12.*does not exist"):
        ev.evaluate(FixedModel(table), ["STS12"], data_dir=root, show_progress_bar=False)


def test_no_data_folder_says_where_it_looked(tmp_path, monkeypatch):
    with pytest.raises(ev.DataError, match="looked in: .*nowhere"):
        ev.resolve_data_dir(tmp_path / "nowhere")
    monkeypatch.setenv("DEELM_DATA", str(tmp_path / "elsewhere"))
    assert ev.default_data_dirs()[:2] == [tmp_path / "elsewhere" / "sts", tmp_path / "elsewhere"]


@pytest.mark.parametrize("row,match", [
    ({"sentence1": "a", "score": 1}, r"record 2 lacks column\(s\) sentence2"),
    ({"sentence1": "a", "sentence2": "b", "score": "high"}, r"record 2: score 'high' is not a number"),
    ({"sentence1": "a", "sentence2": None, "score": 1}, "must be text"),
    ({"sentence1": "a", "sentence2": "b", "score": float("nan")}, "not finite"),
])
def test_malformed_rows_name_file_and_record(tmp_path, row, match):
    path = _write_task(tmp_path, "STS12", [{"sentence1": "x", "sentence2": "y", "score": 2}, row])
    with pytest.raises(ev.DataError, match=match) as e:
        ev.load_task("STS12", tmp_path)
    assert str(path) in str(e.value)


def test_empty_and_invalid_files(tmp_path):
    path = _write_task(tmp_path, "STS13", [])
    with pytest.raises(ev.DataError, match="holds no sentence pairs") as e:
        ev.load_task("STS13", tmp_path)
    assert str(path) in str(e.value)
    _write_task(tmp_path, "STS13", [{"sentence1": "a", "sentence2": "b", "score": 1.0}])
    with pytest.raises(ev.DataError, match="one sentence pair; a correlation needs at least two"):
        ev.load_task("STS13", tmp_path)
    path.write_text("{not json\n")
    with pytest.raises(ev.DataError, match="line 1 is not valid JSON"):
        ev.load_task("STS13", tmp_path)


def test_real_data_counts_match_mteb(tmp_path):
    """Pair counts of the shared data are MTEB's (skips without the data)."""
    from conftest import DATA_DIR

    if not (DATA_DIR / "sts").is_dir():
        pytest.skip(f"shared data absent at {DATA_DIR}")
    expect = {"STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
              "STSBenchmark": 1379, "SICK-R": 9927}
    for task, n in expect.items():
        assert len(ev.load_task(task, DATA_DIR).scores) == n
    assert len(ev.load_task("SICK-R", DATA_DIR, "senteval").scores) == 4927


@pytest.mark.reference
def test_mteb_cosine_spearman_equals_the_harness(default_model, tmp_path):
    """The real mteb STS evaluation, run offline on local data, scores the same
    model exactly as deelm's own harness does."""
    mteb = pytest.importorskip("mteb")
    datasets = pytest.importorskip("datasets")
    from conftest import data_file, read_jsonl
    from deelm.eval.mteb_model import MTEBModel

    rows = read_jsonl(data_file("sts", "STSBenchmark", "test.jsonl"))[:150]
    _write_task(tmp_path, "STSBenchmark", rows)
    ours = ev.evaluate(default_model, ["STSBenchmark"], data_dir=tmp_path,
                       show_progress_bar=False)["STSBenchmark"]

    task = mteb.get_task("STSBenchmark")
    split = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("sentence1", "sentence2", "score")})
    task.dataset = {"default": datasets.DatasetDict({"test": split})}
    task.data_loaded = True
    result = mteb.evaluate(MTEBModel(default_model), tasks=[task], cache=None,
                           overwrite_strategy="always", show_progress_bar=False)
    theirs = result.task_results[0].scores["test"][0]
    print(f"\nmteb cosine_spearman {theirs['cosine_spearman']:.10f}, deelm {ours.main_score:.10f}")
    for key in ("cosine_spearman", "cosine_pearson", "manhattan_spearman", "euclidean_spearman",
                "spearman", "main_score"):
        assert theirs[key] == pytest.approx(ours.scores[key], abs=1e-6), key


def _raw_task_file(tmp_path, name, data):
    folder = tmp_path / "STS12"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


@pytest.mark.parametrize("name, data, match", [
    ("test.jsonl", b'{"sentence1": "a", "sentence2": "b", "score": 1}\n' + b"[" * 100_000 + b"\n",
     "line 2 nests JSON too deeply"),
    ("test.jsonl", b'{"sentence1": "a\xff", "sentence2": "b", "score": 1}\n', "line 1 is not UTF-8"),
    ("test.csv", b'sentence1,sentence2,score\n"' + b"x" * 200_000 + b'",b,1\n', "line 2 cannot be read"),
    ("test.csv", b"sentence1,sentence2,score\na\xff,b,1\n", "cannot be read"),
    ("test.parquet", b"PAR1 this is not parquet PAR1", "not a readable Parquet file"),
])
def test_unreadable_files_are_data_errors_naming_file_and_line(tmp_path, name, data, match):
    """A RecursionError, UnicodeDecodeError, csv.Error or pyarrow error from a
    bad file used to escape as itself, without the file or the line."""
    path = _raw_task_file(tmp_path, name, data)
    with pytest.raises(ev.DataError, match=match) as e:
        ev.load_task("STS12", tmp_path)
    assert str(path) in str(e.value)

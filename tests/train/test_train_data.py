"""Training data: JSONL readers, their errors, and batches without repeated sentences."""
import json

import numpy as np
import pytest

from conftest import data_file
from deelm.errors import TrainingDataError
from deelm.train.data import (Pairs, Triplets, iter_batches, load_pairs, load_training_data,
                              load_triplets, make_batch)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_rows(path, rows):
    return write_lines(path, [json.dumps(r) for r in rows])


TRIPLETS = [{"text": f"premise {i}", "positive": f"entailed {i}", "negative": f"contra {i}"}
            for i in range(5)]


def test_triplets_read_with_line_numbers_and_blank_lines_skipped(tmp_path):
    lines = [json.dumps(TRIPLETS[0]), "", "   ", json.dumps(TRIPLETS[1]), json.dumps(TRIPLETS[2])]
    d = load_triplets(write_lines(tmp_path / "t.jsonl", lines))
    assert isinstance(d, Triplets) and len(d) == 3
    assert d.text == ["premise 0", "premise 1", "premise 2"]
    assert d.negative == ["contra 0", "contra 1", "contra 2"]
    assert d.lines.tolist() == [1, 4, 5]
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(TRIPLETS[0]).encode() + b"\r\n")
    assert load_triplets(p).text == ["premise 0"]


def test_triplets_without_negatives(tmp_path):
    rows = [{"text": r["text"], "positive": r["positive"]} for r in TRIPLETS]
    d = load_training_data(write_rows(tmp_path / "t.jsonl", rows))
    assert isinstance(d, Triplets) and d.negative is None and len(d) == 5


def test_pairs_accept_aliases(tmp_path):
    rows = [{"sentence1": "a b", "sentence2": "c d", "score": 4},
            {"text1": "e f", "text2": "g h", "label": 0.5},
            {"sentence1": "i", "text2": "j", "score": 1.25}]
    p = tmp_path / "p.jsonl"
    write_rows(p, rows)
    for d in (load_pairs(p), load_training_data(p)):
        assert isinstance(d, Pairs)
        assert d.sentence1 == ["a b", "e f", "i"] and d.sentence2 == ["c d", "g h", "j"]
        assert d.scores.dtype == np.float64 and d.scores.tolist() == [4.0, 0.5, 1.25]


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "a", "positive": "b", "negative": ', "invalid JSON"),
    ('{"text": "a", "negative": "c"}', "missing field 'positive'"),
    ('{"text": 3, "positive": "b", "negative": "c"}', "'text' must be a string, got int"),
    ('{"text": "a", "positive": "  ", "negative": "c"}', "'positive' is empty"),
    ('{"text": "a", "positive": "b"}', "missing field 'negative'"),
    ('["a", "b", "c"]', "expected a JSON object, got list"),
])
def test_bad_triplet_rows_name_file_and_line(tmp_path, bad_line, message):
    p = write_lines(tmp_path / "bad.jsonl", [json.dumps(TRIPLETS[0]), "", bad_line,
                                            json.dumps(TRIPLETS[1])])
    with pytest.raises(TrainingDataError, match=message) as e:
        load_training_data(p)
    assert e.value.line == 3 and e.value.path == str(p)
    assert f"{p}, line 3" in str(e.value)


def test_negative_must_be_in_every_row_or_none(tmp_path):
    rows = [{"text": "a", "positive": "b"}, {"text": "c", "positive": "d", "negative": "e"}]
    with pytest.raises(TrainingDataError, match="line 2.*'negative' field but line 1") as e:
        load_triplets(write_rows(tmp_path / "t.jsonl", rows))
    assert e.value.line == 2


@pytest.mark.parametrize("score", ['"high"', "true", "null", "[1]", "NaN"])
def test_non_numeric_score(tmp_path, score):
    p = write_lines(tmp_path / "p.jsonl", ['{"sentence1": "a", "sentence2": "b", "score": 1}',
                                          f'{{"sentence1": "a", "sentence2": "b", "score": {score}}}'])
    with pytest.raises(TrainingDataError, match="'score'") as e:
        load_pairs(p)
    assert e.value.line == 2


def test_missing_score(tmp_path):
    p = write_rows(tmp_path / "p.jsonl", [{"sentence1": "a", "sentence2": "b"}])
    with pytest.raises(TrainingDataError, match="line 1: missing field 'score' or 'label'"):
        load_training_data(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_names_the_file(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    for loader in (load_triplets, load_pairs, load_training_data):
        with pytest.raises(TrainingDataError, match="empty") as e:
            loader(p)
        assert e.value.path == str(p) and e.value.line is None


def test_missing_file_and_unknown_format_and_bad_bytes(tmp_path):
    with pytest.raises(TrainingDataError, match="nope.jsonl: cannot open"):
        load_training_data(tmp_path / "nope.jsonl")
    p = write_rows(tmp_path / "x.jsonl", [{"query": "a", "doc": "b"}])
    with pytest.raises(TrainingDataError, match="line 1: cannot tell the format"):
        load_training_data(p)
    p.write_bytes(json.dumps(TRIPLETS[0]).encode() + b'\n{"text": "\xff"}\n')
    with pytest.raises(TrainingDataError, match="line 2: not UTF-8"):
        load_training_data(p)


def test_larger_file_streams(tmp_path):
    n = 20_000
    p = tmp_path / "big.jsonl"
    with open(p, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"text": f"t{i}", "positive": f"p{i}", "negative": f"n{i % 97}"}) + "\n")
    d = load_training_data(p)
    assert len(d) == n and d.lines[-1] == n
    eb = iter_batches(d, 256, seed=3)
    assert sum(len(b) for b in eb.plan) == n and eb.n_dropped == 0


def repetitive_triplets(n=300, seed=0):
    """Triplets drawn from a small pool of sentences, so batches must defer many."""
    rng = np.random.default_rng(seed)
    pool = [f"s{i}" for i in range(40)]
    rows = [[pool[j] for j in rng.choice(len(pool), 3, replace=False)] for _ in range(n)]
    rows[7][1] = rows[7][0]          # text == positive: can never be placed
    cols = list(zip(*rows))
    return Triplets("mem", list(cols[0]), list(cols[1]), list(cols[2]),
                    np.arange(1, n + 1, dtype=np.int64))


def test_batches_never_repeat_a_sentence_and_lose_nothing():
    d = repetitive_triplets()
    eb = iter_batches(d, 8, seed=5, epoch=2)
    assert eb.n_dropped == 1 and eb.dropped_lines.tolist() == [8]
    assert eb.n_deferred > 0
    seen = []
    for b in eb:
        assert len(set(b.sentences)) == len(b.sentences) == 3 * len(b)
        used = np.concatenate([b.anchor_idx, b.positive_idx, b.negative_idx])
        assert sorted(used.tolist()) == list(range(len(b.sentences)))
        for j, i in enumerate(b.examples):
            assert b.sentences[b.anchor_idx[j]] == d.text[i]
            assert b.sentences[b.positive_idx[j]] == d.positive[i]
            assert b.sentences[b.negative_idx[j]] == d.negative[i]
        seen.extend(b.examples.tolist())
    assert sorted(seen) == sorted(set(range(len(d))) - {7})
    assert all(len(p) <= 8 for p in eb.plan)


def test_batches_are_deterministic_per_seed_and_epoch():
    d = repetitive_triplets()

    def plan(seed, epoch):
        return [p.tolist() for p in iter_batches(d, 16, seed=seed, epoch=epoch).plan]

    assert plan(1, 0) == plan(1, 0)
    assert plan(1, 0) != plan(1, 1)
    assert plan(1, 0) != plan(2, 0)


def test_pair_batches_and_repeats_allowed():
    d = Pairs("mem", ["a", "b", "a", "c"], ["x", "a", "y", "z"], np.array([1.0, 2.0, 3.0, 4.0]),
              np.arange(1, 5))
    eb = iter_batches(d, 4, seed=0)
    assert eb.n_deferred > 0 and eb.n_dropped == 0
    for b in eb:
        assert b.kind == "pair" and len(set(b.sentences)) == len(b.sentences)
        assert b.scores.tolist() == d.scores[b.examples].tolist()
    # Without the uniqueness rule one batch holds all four; "a" is encoded once.
    b = make_batch(d, [0, 1, 2, 3])
    assert sorted(b.sentences) == ["a", "b", "c", "x", "y", "z"]
    assert [b.sentences[i] for i in b.idx1] == d.sentence1
    assert [b.sentences[i] for i in b.idx2] == d.sentence2
    eb = iter_batches(d, 4, unique_texts=False)
    assert len(eb) == 1 and eb.n_deferred == 0


def test_scored_pairs_of_a_triplet_batch():
    d = Triplets("mem", ["a", "b"], ["c", "d"], ["e", "f"], np.arange(1, 3))
    i1, i2, labels = make_batch(d, [1, 0]).scored_pairs()
    assert i1.tolist() == [0, 1, 0, 1] and i2.tolist() == [2, 3, 4, 5]
    assert labels.tolist() == [1, 1, 0, 0]
    d = Triplets("mem", ["a", "b"], ["c", "d"], None, np.arange(1, 3))
    b = make_batch(d, [0, 1])
    assert b.negative_idx is None and b.scored_pairs()[2].tolist() == [1, 1]


def test_bad_batch_size():
    d = repetitive_triplets(10)
    for bs in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            iter_batches(d, bs)


def test_real_nli_file():
    d = load_training_data(data_file("nli", "snli_dev_test_triplets.jsonl"))
    assert isinstance(d, Triplets) and len(d) == 5883 and d.negative is not None
    eb = iter_batches(d, 64, seed=42)
    total = 0
    for b in eb:
        assert len(set(b.sentences)) == len(b.sentences)
        total += len(b)
    assert total + eb.n_dropped == len(d)


def test_deeply_nested_json_is_a_training_data_error(tmp_path):
    from deelm.errors import TrainingDataError
    from deelm.train.data import load_training_data

    path = tmp_path / "deep.jsonl"
    path.write_bytes(b'{"text": "a", "positive": "b", "negative": "c"}\n' + b"[" * 100_000 + b"\n")
    with pytest.raises(TrainingDataError, match="nested too deeply") as e:
        load_training_data(path)
    assert str(path) in str(e.value) and "2" in str(e.value)

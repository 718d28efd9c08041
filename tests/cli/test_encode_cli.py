"""`python -m deelm encode`: text, JSONL, CSV and Parquet in; text, .npy or a
folder of Parquet shards out, resumed after a kill."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deelm import corpus
from deelm.__main__ import main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"record {i}: the cat sat" + " on the mat" * (i % 3) for i in range(23)]
IDS = [f"doc-{i}" for i in range(23)]


def _args(tiny_path, *more):
    return ["encode", "--model", str(tiny_path[0]), "--bidirectional-from", "-1", *map(str, more)]


def _expected(tiny_model):
    return tiny_model.encode(TEXTS)


def _read_folder(folder):
    """(ids, embeddings) of a shard folder, read as one table."""
    table = pq.read_table(folder)
    emb = table.column("embedding").combine_chunks()
    return table.column("id").to_pylist(), emb.flatten().to_numpy().reshape(len(table), -1)


def _inputs(tmp_path):
    rows = [{"text": t, "key": k, "other": 1} for t, k in zip(TEXTS, IDS)]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a trailing blank line
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["key", "text", "other"])
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.table({"key": IDS, "text": TEXTS}), tmp_path / "in.parquet",
                   row_group_size=5)
    return [jsonl, tmp_path / "in.csv", tmp_path / "in.parquet"]


def test_every_format_into_parquet_shards(tiny_path, tiny_model, tmp_path, capsys):
    expected = _expected(tiny_model)
    for src in _inputs(tmp_path):
        out = tmp_path / f"out-{src.suffix[1:]}"
        assert main(_args(tiny_path, "--input", src, "--text-field", "text", "--id-field", "key",
                          "--output", out, "--shard-size", 10)) == 0
        assert "wrote 3 Parquet shards" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [
            "_deelm_manifest.json", "part-000000.parquet", "part-000001.parquet",
            "part-000002.parquet"]
        ids, emb = _read_folder(out)
        assert ids == IDS and emb.dtype == np.float32
        assert np.array_equal(emb, expected), src.name
    # without --id-field the id is the record's position
    assert main(_args(tiny_path, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "pos")) == 0
    assert _read_folder(tmp_path / "pos")[0] == list(range(len(TEXTS)))


def test_plain_text_to_stdout_and_to_npy(tiny_path, tiny_model, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    assert main(_args(tiny_path, "--input", src, "--batch-size", 4)) == 0
    printed = np.loadtxt(capsys.readouterr().out.splitlines())
    assert np.allclose(printed, _expected(tiny_model), rtol=1e-5, atol=1e-5)
    out = tmp_path / "emb.npy"
    assert main(_args(tiny_path, "--input", src, "--output", out)) == 0
    assert f"to {out}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "in.txt"]
    assert np.array_equal(np.load(out), _expected(tiny_model))


def test_a_rerun_writes_only_the_missing_shards(tiny_path, tiny_model, tmp_path, capsys):
    src = _inputs(tmp_path)[0]
    out = tmp_path / "out"
    args = _args(tiny_path, "--input", src, "--id-field", "key", "--output", out, "--shard-size", 5)
    assert main(args) == 0
    capsys.readouterr()
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == 5
    # as a kill leaves it: the manifest not yet complete, a shard missing, a
    # temporary file of the shard being written
    manifest = json.loads((out / corpus.MANIFEST).read_text())
    (out / corpus.MANIFEST).write_text(json.dumps(dict(manifest, complete=False)))
    shards[3].unlink()
    (out / ".part-000003.parquet.tmp-12345").write_bytes(b"half a file")
    before = {p.name: p.stat().st_mtime_ns for p in shards if p.exists()}
    time.sleep(0.01)
    assert main(args) == 0
    assert "wrote 1 Parquet shard to" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in shards if p.name in before} == before
    assert not list(out.glob(".*"))
    ids, emb = _read_folder(out)
    assert ids == IDS and np.array_equal(emb, _expected(tiny_model))
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_run_resumes(tiny_path, tmp_path):
    n, shard = 20_000, 500
    src = tmp_path / "in.txt"
    src.write_text("".join(f"{i % 997} lines\n" for i in range(n)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deelm", *_args(tiny_path, "--input", src, "--output", out,
                                                  "--shard-size", shard, "--batch-size", 250)]
    env = dict(os.environ, PYTHONPATH=str(REPO), DEELM_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "part-000000.parquet").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no shard within 2 minutes"
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    first = len(list(out.glob("part-*.parquet")))
    assert 1 <= first < n // shard
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{first} kept from an earlier run" in done.stderr
    ids, emb = _read_folder(out)
    assert ids == list(range(n))
    import deelm

    model = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=-1)
    pick = [0, 1, shard - 1, shard, n // 2, n - 1]
    assert np.array_equal(emb[pick], model.encode([f"{i % 997} lines" for i in pick]))


@pytest.mark.parametrize("content, more, message", [
    ('{"text": "a"}\n{"txt": "b"}\n', [], r"line 2: no field 'text' \(it has 'txt'\)"),
    ('{"text": "a"}\nnot json\n', [], "line 2 is not valid JSON"),
    ('{"text": 3}\n', [], "field 'text' is int, not text"),
    ('["text"]\n', [], "line 1 is not a JSON object"),
    ('{"text": "a"}\n', ["--id-field", "key"], "no field 'key'"),
    ('{"text": "a", "key": 1}\n{"text": "b", "key": "x"}\n', ["--id-field", "key"],
     "ids of part-000000.parquet cannot form one column"),
])
def test_bad_jsonl_is_named(tiny_path, tmp_path, capsys, content, more, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    assert main(_args(tiny_path, "--input", src, "--output", tmp_path / "out", *more)) == 1
    import re

    assert re.search(message, capsys.readouterr().err)


def test_bad_arguments_and_folders_are_refused(tiny_path, tmp_path, capsys):
    txt = tmp_path / "in.txt"
    txt.write_text("a\nb\n")
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), tmp_path / "in.parquet")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("one\ntwo\ncaf\u00e9\n".encode("latin-1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(_args(tiny_path, "--input", empty, "--output", tmp_path / "none")) == 0
    assert "the input holds no records: no shards written" in capsys.readouterr().err
    # a missing input is an argument error, reported before the model loads
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tiny_path, "--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o"))
    assert exit_info.value.code == 2 and "missing.jsonl" in capsys.readouterr().err
    cases = [
        (["--input", latin1, "--output", tmp_path / "o"], "latin1.txt, line 3: not UTF-8 text"),
        (["--input", txt, "--id-field", "key"], "plain text has no fields"),
        (["some text", "--input", txt], "not both"),
        (["--input", tmp_path / "in.parquet", "--output", tmp_path / "o"],
         "no column 'text' \\(it has 'body', 'n'\\)"),
        (["--input", tmp_path / "in.parquet", "--text-field", "n", "--output", tmp_path / "o"],
         "column 'n' is int64, not text"),
        (["--input", txt, "--text-field", "body"], "plain text has no fields"),
        (["--input", txt, "--output", txt], "is not a folder"),
    ]
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "part-000000.parquet").write_bytes(b"")
    cases.append((["--input", txt, "--output", stray], "no _deelm_manifest.json"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "part-000000.parquet").write_bytes(b"")
    (broken / corpus.MANIFEST).write_text("{not json")
    cases.append((["--input", txt, "--output", broken], "_deelm_manifest.json: not a readable"))
    out = tmp_path / "done"
    assert main(_args(tiny_path, "--input", txt, "--output", out)) == 0
    cases.append((["--input", txt, "--output", out, "--normalize"],
                  "another run \\(different normalize_embeddings\\)"))
    cases.append((["--input", txt, "--output", out, "--pooling", "last"],
                  "another run \\(different model\\)"))
    capsys.readouterr()
    import re

    for more, message in cases:
        assert main(_args(tiny_path, *more)) == 1, more
        err = capsys.readouterr().err
        assert re.search(message, err), (more, err)
    # a run that failed before its first shard left nothing to keep: a rerun
    # with the input fixed starts afresh
    assert (tmp_path / "o" / corpus.MANIFEST).is_file()
    latin1.write_text("one\ntwo\ncaf\u00e9\n", encoding="utf-8")
    assert main(_args(tiny_path, "--input", latin1, "--output", tmp_path / "o")) == 0
    assert "wrote 1 Parquet shard to" in capsys.readouterr().err
    # an input changed since the shards were written is another input
    txt.write_text("a\nb\nc\n")
    assert main(_args(tiny_path, "--input", txt, "--output", out)) == 1
    assert "(different input)" in capsys.readouterr().err

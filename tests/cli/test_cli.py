"""The command line: --version, its name, --compute-precision, and argument
errors reported before the model loads."""
import re

import pytest

import deelm
from deelm.__main__ import main


class LoaderCalled(Exception):
    pass


@pytest.fixture
def loads(monkeypatch):
    """Records from_pretrained's keyword arguments and stops there."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs)
        raise LoaderCalled

    monkeypatch.setattr(deelm.DeeLM, "from_pretrained", fake)
    return calls


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"deelm {deelm.__version__}"


def test_the_program_names_itself_deelm(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: deelm ")
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert capsys.readouterr().out.startswith("usage: deelm eval ")


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "sts" / "STSBenchmark").mkdir(parents=True)
    (tmp_path / "sts" / "STSBenchmark" / "test.jsonl").write_text(
        '{"sentence1": "a", "sentence2": "b", "score": 1}\n'
        '{"sentence1": "a cat", "sentence2": "the sky", "score": 0}\n')
    return tmp_path


@pytest.mark.parametrize("argv, message", [
    (["eval", "--tasks", "STS99"], "invalid choice: 'STS99'"),
    (["eval", "--data", "{missing}"], "no STS data folder found"),
    (["eval", "--data", "{data}", "--tasks", "STS12"], r"task STS12: folder .* does not exist"),
    (["eval", "--data", "{data}", "--protocol", "senteval", "--tasks", "SICK-R"], "SICK-R"),
    (["turning-point", "--data", "{data}", "--split", "dev"], r"no dev\{"),
    (["eval", "--data", "{data}", "--tasks", "STSBenchmark", "--split", "dev"], r"no dev\{"),
    (["eval", "--data", "{data}", "--split", "train"], "invalid choice: 'train'"),
    (["probe", "--data", "{missing}"], "no STS data folder found"),
    (["train", "--data", "{missing}/nli.jsonl", "--output", "{tmp}/out"], "training data .* does not exist"),
    (["encode", "--input", "{missing}/lines.txt"], "input file .* does not exist"),
    (["eval", "--data", "{data}", "--adapter", "{missing}/adapter"], "adapter folder .* does not exist"),
    (["demo", "--model", "{missing}/model.gguf"], "no such model file"),
])
def test_argument_errors_come_before_the_model_loads(argv, message, loads, data_dir, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "missing", data=data_dir, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"deelm {argv[0]}: error:" in err
    assert re.search(message, err), err
    assert loads == []  # the model loader was never called


def test_valid_arguments_reach_the_loader(loads, data_dir):
    with pytest.raises(LoaderCalled):
        main(["eval", "--data", str(data_dir), "--tasks", "STSBenchmark", "--compute-precision", "float32"])
    assert loads[-1]["compute_precision"] == "float32"


def test_precision_is_a_former_name_of_compute_precision(loads, data_dir, capsys):
    with pytest.raises(LoaderCalled):
        main(["eval", "--data", str(data_dir), "--tasks", "STSBenchmark", "--precision", "int8"])
    assert loads[-1]["compute_precision"] == "int8"
    assert "--precision is now --compute-precision" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--compute-precision", "int4"])


def test_eval_on_the_dev_split_writes_dev_scores(tiny_path, data_dir, tmp_path, capsys):
    import json

    (data_dir / "sts" / "STSBenchmark" / "dev.jsonl").write_text("".join(
        json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n"
        for a, b, s in [("a cat", "a cat sits", 4.0), ("a dog", "the sky", 0.5),
                        ("rain", "it rains", 4.5), ("x", "y z", 1.0)]))
    assert main(["eval", "--model", str(tiny_path[0]), "--adapter", "none", "--data",
                 str(data_dir), "--tasks", "STSBenchmark", "--split", "dev", "--output",
                 str(tmp_path / "out")]) == 0
    assert "dev split" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "STSBenchmark.json").read_text())
    assert list(saved["scores"]) == ["dev"] and saved["data_file"].endswith("dev.jsonl")


def test_eval_on_the_dev_split_defaults_to_the_tasks_that_have_one(loads, data_dir):
    (data_dir / "sts" / "STSBenchmark" / "dev.jsonl").write_text(
        '{"sentence1": "a", "sentence2": "b", "score": 1.0}\n')
    with pytest.raises(LoaderCalled):  # no "no dev split" error for STS12-16 and SICK-R
        main(["eval", "--data", str(data_dir), "--split", "dev"])


def test_demo_scores_sts_benchmark_and_names_its_settings(tiny_path, data_dir, capsys):
    import json

    (data_dir / "sts" / "STSBenchmark" / "test.jsonl").write_text("".join(
        json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n"
        for a, b, s in [("a cat", "a cat sits", 4.0), ("a dog", "the sky", 0.5),
                        ("rain", "it rains", 4.5), ("x", "y z", 1.0)]))
    assert main(["demo", "--model", str(tiny_path[0]), "--adapter", "none", "--data",
                 str(data_dir), "--pooling", "text_mean", "--prompt", "Word for {text}:",
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "(1 thread)" in out and "with 1 thread\n" in out
    assert "cosine similarity of example pairs" in out
    assert re.search(r"STS Benchmark test \(4 pairs from .*\), cosine Spearman x100: -?\d+\.\d\d", out)
    assert "pooling=text_mean, prompt='Word for {text}:', untrained" in out


def test_demo_names_the_bundled_adapter_of_the_default_model(default_path, data_dir, capsys):
    from deelm.adapters.bundled import BUNDLED_ADAPTER

    assert main(["demo", "--data", str(data_dir), "--threads", "1"]) == 0
    assert f"the bundled DeeLM adapter {BUNDLED_ADAPTER.name}" in capsys.readouterr().out

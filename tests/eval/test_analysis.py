"""deelm.eval.analysis: the turning-point rule, per-layer STS, the backward-dependency
probe, the report writers and the CLI subcommands (tiny model, tiny STS fixture)."""
import json
import math

import numpy as np
import pytest

from conftest import data_file, sts_sentences
from deelm import _core
from deelm.eval import analysis as an
from deelm.eval import sts as ev

PROBE_SENTENCES = ["the cat sat on the mat", "a man is playing a guitar.", "x",
                   "in the heat of the sun, the cats rest", "hello there everyone"]


@pytest.fixture
def sts_dir(tmp_path):
    """<dir>/STSBenchmark/{dev,test}.jsonl: 16 pairs with spread gold scores."""
    words = ["the cat", "a dog", "the sun", "in the heat", "a man", "the car", "on the mat",
             "is running", "sat", "at noon", "the sea", "a cat"]
    rng = np.random.default_rng(1)
    rows = []
    for i in range(16):
        a = " ".join(words[j] for j in rng.choice(len(words), 3, replace=False))
        b = " ".join(words[j] for j in rng.choice(len(words), 3, replace=False))
        rows.append({"sentence1": a, "sentence2": b if i % 5 else a, "score": float(i % 6)})
    folder = tmp_path / "data" / "STSBenchmark"
    folder.mkdir(parents=True)
    for split in ("dev", "test"):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return tmp_path / "data"


@pytest.fixture(params=_core.isa_info()["supported"])
def tiny_isa(request, tiny_path):
    """The tiny model on each ISA path this CPU runs, forced: the exact
    identities below must hold on every one of them."""
    import deelm

    return deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=-1, isa=request.param)


@pytest.fixture
def tiny(tiny_model):
    saved = (tiny_model.bidirectional_from, tiny_model.pooling)
    yield tiny_model
    tiny_model.bidirectional_from, tiny_model.pooling = saved


# ---- the turning-point rule ----------------------------------------------------------

@pytest.mark.parametrize("curve, k, peak", [
    ([0.1, 0.3, 0.5, 0.4, 0.2], 3, 2),      # two falls in the upper half: the sharper one
    ([0.1, 0.2, 0.3, 0.4], 2, 3),           # never falls: k = L-1
    ([0.1, 0.5, 0.5, 0.2], 2, 1),           # ties for the peak: the earliest
    ([0.5, 0.4, 0.3], 1, 0),                # equal falls: the earliest in the upper half
    ([0.2, 0.6], 0, 1),                     # one layer, no fall: k = L-1 = 0
    ([0.1, float("nan"), 0.4, 0.3], 2, 2),  # NaN ignored
    ([0.5, 0.9, 0.2, 0.6, 0.62, 0.61, 0.6, 0.4], 6, 1),  # a fall in the lower half is not it
    # SmolLM2-135M-Instruct, STS-B dev, causal: plateau, then the last layer falls by 7.75
    ([55.33, 58.35, 63.11, 62.19, 62.70, 64.31, 64.37, 64.60, 65.35, 64.64, 63.50, 62.92, 64.29,
      64.01, 63.65, 63.30, 63.84, 62.19, 62.44, 61.44, 58.29, 58.40, 60.12, 59.37, 62.58, 62.83,
      63.10, 62.09, 62.58, 61.90, 54.15], 29, 8),
])
def test_turning_point_rule(curve, k, peak):
    assert an.turning_point(curve) == (k, peak)


def test_turning_point_rejects_bad_curves():
    for bad in ([0.3], [], [float("nan")] * 3, [[0.1, 0.2]]):
        with pytest.raises(ValueError):
            an.turning_point(bad)


# ---- per-layer STS and degradation ------------------------------------------------------

def test_layer_sts_equals_slices_of_layer_embeddings(tiny_isa, sts_dir):
    tiny = tiny_isa
    tiny.bidirectional_from = tiny.num_layers - 1  # layer_sts measures the causal model
    curve = an.layer_sts(tiny, data_dir=sts_dir)
    assert tiny.bidirectional_from == tiny.num_layers - 1  # the model was not changed
    assert len(curve) == tiny.num_layers + 1
    data = ev.load_sts_file(sts_dir / "STSBenchmark" / "dev.jsonl")
    n = len(data.scores)
    tiny.bidirectional_from = -1
    every = data.sentence1 + data.sentence2
    layers = tiny.encode(every, output_value="layer_embeddings")
    for l, score in enumerate(curve):
        ref = ev.sts_scores(layers[:n, l], layers[n:, l], data.scores)["cosine_spearman"]
        assert math.isfinite(score) and score == pytest.approx(ref, abs=1e-9)
    # the last layer output is the ordinary sentence embedding
    emb = tiny.encode(every)
    final = ev.sts_scores(emb[:n], emb[n:], data.scores)["cosine_spearman"]
    assert curve[-1] == pytest.approx(final, abs=1e-9)
    assert an.auto_bidirectional_from(tiny, "turning_point", data_dir=sts_dir) == \
        an.turning_point(curve)[0]


def test_max_pairs_is_a_fixed_seeded_subset(sts_dir):
    a = an.load_pairs(data_dir=sts_dir, max_pairs=5)
    b = an.load_pairs(data_dir=sts_dir, max_pairs=5)
    full = an.load_pairs(data_dir=sts_dir)
    assert len(a.scores) == 5 and a.sentence1 == b.sentence1
    assert set(zip(a.sentence1, a.sentence2)) <= set(zip(full.sentence1, full.sentence2))
    assert len(an.load_pairs(data_dir=sts_dir, max_pairs=100).scores) == len(full.scores)
    with pytest.raises(ev.DataError):
        an.load_pairs(task="STS12", data_dir=sts_dir)


def test_degradation_curve(tiny, sts_dir):
    tiny.bidirectional_from = 1
    deg = an.degradation_curve(tiny, data_dir=sts_dir, max_pairs=10)
    assert tiny.bidirectional_from == 1
    assert list(deg) == [-1] + list(range(tiny.num_layers))
    causal = an.layer_sts(tiny, data_dir=sts_dir, max_pairs=10)
    assert deg[-1] == pytest.approx(causal[-1], abs=1e-9)
    assert an.degradation_curve(tiny, [0], data_dir=sts_dir, max_pairs=10)[0] == pytest.approx(deg[0])


# ---- backward dependency ------------------------------------------------------------------

def test_probe_causal_is_exactly_zero(tiny_isa):
    tiny = tiny_isa
    r = an.backward_dependency(tiny, PROBE_SENTENCES, -1, n_positions=None)
    assert r["n_pairs"] == sum(len(x) - 1 for x in tiny.tokenizer.encode_ids(PROBE_SENTENCES))
    assert r["n_skipped"] == 1  # "x" is one token
    assert r["mean"] == [0.0] * (tiny.num_layers + 1)
    assert r["max"] == [0.0] * (tiny.num_layers + 1)


def test_probe_fully_bidirectional_is_positive(tiny):
    r = an.backward_dependency(tiny, PROBE_SENTENCES, 0)
    assert r["mean"][0] == 0.0 and r["max"][0] == 0.0  # the embedding sees only its token
    assert all(v > 0 for v in r["mean"][1:])


@pytest.mark.parametrize("k", [1, 2])
def test_probe_mixed_is_zero_up_to_k(tiny_isa, k):
    tiny = tiny_isa
    r = an.backward_dependency(tiny, PROBE_SENTENCES, k, batch_sentences=2, max_tokens=64)
    assert r["max"][:k + 1] == [0.0] * (k + 1)
    assert all(v > 0 for v in r["mean"][k + 1:])


def test_probe_is_seeded(tiny):
    a = an.backward_dependency(tiny, PROBE_SENTENCES, 0, seed=3)
    b = an.backward_dependency(tiny, PROBE_SENTENCES, 0, seed=3, batch_sentences=1)
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-6, atol=1e-9)
    c = an.backward_dependency(tiny, PROBE_SENTENCES, 0, seed=4)
    assert a["mean"] != c["mean"]
    with pytest.raises(ValueError):
        an.backward_dependency(tiny, PROBE_SENTENCES, tiny.num_layers)
    with pytest.raises(ValueError):
        an.backward_dependency(tiny, PROBE_SENTENCES, 0, n_positions=0)


def test_probe_causal_default_model(default_model):
    """The exact zero also holds for the quantised default model's kernels."""
    sentences = ["A man is playing a guitar.", "The quick brown fox jumps over the lazy dog.",
                 "A woman slices an onion in the kitchen."]
    r = an.backward_dependency(default_model, sentences, -1, n_positions=3)
    assert r["max"] == [0.0] * (default_model.num_layers + 1)
    k = default_model.num_layers - 2
    r = an.backward_dependency(default_model, sentences, k, n_positions=2)
    assert r["max"][:k + 1] == [0.0] * (k + 1) and min(r["mean"][k + 1:]) > 0


# ---- reports -----------------------------------------------------------------------------

def _has_matplotlib():
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_turning_point_report(tmp_path):
    curve = [0.2, 0.4, 0.6, 0.5, 0.45]
    deg = {-1: 0.45, 0: 0.1, 1: 0.2, 2: 0.3, 3: 0.44}
    k, _ = an.turning_point(curve)
    files = an.write_turning_point_report(tmp_path / "tp", curve, deg, k, {"model": "m.gguf"})
    doc = json.loads((tmp_path / "tp" / "turning_point.json").read_text())
    assert doc["turning_point_k"] == 2 and doc["peak_layer_output"] == 2
    assert doc["layer_sts"] == curve and doc["degradation"]["-1"] == 0.45
    assert "drops the score the most" in doc["rule"] and doc["meta"]["model"] == "m.gguf"
    md = (tmp_path / "tp" / "turning_point.md").read_text()
    assert "k = 2" in md and "| 2 | layer 1 (peak) | 60.00 |" in md
    if _has_matplotlib():
        assert (tmp_path / "tp" / "turning_point.png").stat().st_size > 1000
    assert all(f.exists() for f in files)
    # without a degradation curve
    an.write_turning_point_report(tmp_path / "tp2", curve, None, k, {})
    assert json.loads((tmp_path / "tp2" / "turning_point.json").read_text())["degradation"] is None


def test_probe_report(tiny, tmp_path):
    res = {k: an.backward_dependency(tiny, PROBE_SENTENCES[:2], k, n_positions=2) for k in (-1, 1, 0)}
    files = an.write_probe_report(tmp_path, res, {"model": "tiny"})
    doc = json.loads((tmp_path / "backward_dependency.json").read_text())
    assert set(doc["results"]) == {"-1", "1", "0"}
    assert doc["results"]["-1"]["max"] == [0.0] * (tiny.num_layers + 1)
    md = (tmp_path / "backward_dependency.md").read_text()
    assert "causal (k = -1) mean" in md and "k = 1 max" in md
    if _has_matplotlib():
        assert (tmp_path / "backward_dependency.png").stat().st_size > 1000
    assert all(f.exists() for f in files)


# ---- CLI -----------------------------------------------------------------------------------

def test_cli_turning_point(tiny_path, sts_dir, tmp_path, capsys):
    from deelm.__main__ import main

    out = tmp_path / "tp"
    rc = main(["turning-point", "--model", str(tiny_path[0]), "--data", str(sts_dir),
               "--degradation-pairs", "8", "--output", str(out), "--threads", "1"])
    text = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((out / "turning_point.json").read_text())
    k = doc["turning_point_k"]
    assert f"turning point k = {k}" in text and "| 0 | embedding" in text
    assert set(doc["degradation"]) == {"-1", "0", "1", "2"} and doc["meta"]["degradation_pairs"] == 8
    assert doc["meta"]["n_pairs"] == 16
    rc = main(["turning-point", "--model", str(tiny_path[0]), "--data", str(sts_dir),
               "--no-degradation", "--max-pairs", "10"])
    assert rc == 0 and "degradation" not in capsys.readouterr().out.split("become bidirectional")[1]


def test_cli_probe(tiny_path, sts_dir, tmp_path, capsys):
    from deelm.__main__ import main

    out = tmp_path / "probe"
    rc = main(["probe", "--model", str(tiny_path[0]), "--data", str(sts_dir), "--sentences", "6",
               "--configs", "-1", "auto", "0", "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "auto: turning point k =" in text
    doc = json.loads((out / "backward_dependency.json").read_text())
    assert doc["results"]["-1"]["max"] == [0.0] * 4
    assert doc["meta"]["n_sentences"] == 6
    # 'auto' read from a turning-point report
    tp = tmp_path / "tp.json"
    tp.write_text(json.dumps({"turning_point_k": 1}))
    rc = main(["probe", "--model", str(tiny_path[0]), "--data", str(sts_dir), "--sentences", "3",
               "--configs", "auto", "--turning-point-json", str(tp)])
    assert rc == 0 and "k = 1 from" in capsys.readouterr().out


def test_cli_bidirectional_from_auto(tiny_path, sts_dir, capsys):
    from deelm.__main__ import main

    rc = main(["eval", "--model", str(tiny_path[0]), "--data", str(sts_dir), "--tasks",
               "STSBenchmark", "--bidirectional-from", "auto"])
    captured = capsys.readouterr()
    assert rc == 0 and "bidirectional_from=auto: k =" in captured.err
    rc = main(["eval", "--model", str(tiny_path[0]), "--data", str(sts_dir), "--tasks",
               "STSBenchmark", "--bidirectional-from", "turning_point"])
    assert rc == 0 and "bidirectional_from=turning_point: k =" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--bidirectional-from", "sometimes"])


# ---- real data ------------------------------------------------------------------------------

def test_real_data_subset_and_probe(tiny):
    data_file("sts", "STSBenchmark", "dev.jsonl")
    d = an.load_pairs("STSBenchmark", "dev", max_pairs=50)
    assert len(d.scores) == 50 and d.path.name == "dev.jsonl"
    r = an.backward_dependency(tiny, sts_sentences(8, split="dev"), -1)
    assert r["max"] == [0.0] * (tiny.num_layers + 1) and r["n_pairs"] > 8


def test_from_pretrained_auto_uses_the_degradation_rule_and_caches_it(tiny_path, sts_dir, tmp_path,
                                                                     monkeypatch):
    import deelm

    monkeypatch.setenv("DEELM_DATA", str(sts_dir))
    monkeypatch.setenv("DEELM_CACHE_DIR", str(tmp_path / "cache"))
    causal = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=-1)
    curve = an.degradation_curve(causal, max_pairs=an.DEGRADATION_PAIRS)
    expect = an.degradation_k(curve)
    assert curve[expect] == max(curve.values())
    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from="auto")
    assert m.bidirectional_from == expect
    assert deelm.DeeLM.from_pretrained(tiny_path[0],
                                       bidirectional_from="degradation").bidirectional_from == expect
    tp = an.turning_point(an.layer_sts(causal))[0]
    assert deelm.DeeLM.from_pretrained(tiny_path[0],
                                       bidirectional_from="turning_point").bidirectional_from == tp
    cache = json.loads((tmp_path / "cache" / "turning_points.json").read_text())
    assert sorted(e["k"] for e in cache.values()) == sorted([expect, tp])
    # later loads read the cache instead of measuring
    monkeypatch.setattr(an, "layer_sts", lambda *a, **k: pytest.fail("measured again"))
    monkeypatch.setattr(an, "degradation_curve", lambda *a, **k: pytest.fail("measured again"))
    for rule, k in (("auto", expect), ("turning_point", tp)):
        assert deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=rule).bidirectional_from == k
    with pytest.raises(TypeError, match="turning_point"):
        deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from="best")


def test_degradation_k_takes_the_earliest_best():
    assert an.degradation_k({-1: 0.5, 0: 0.7, 1: 0.7, 2: float("nan")}) == 0
    assert an.degradation_k({-1: 0.9, 0: 0.1}) == -1
    with pytest.raises(ValueError, match="NaN"):
        an.degradation_k({0: float("nan")})



"""The trainer's recipe features, without the torch reference: several data
files in one run (triplets and scored pairs, each with its loss), GradCache
steps (gradients equal to the one-pass step's), dev evaluation with the best
adapter kept, and early stopping."""
import json

import numpy as np
import pytest

from conftest import fresh_tiny, quick_args
from deelm.adapters.lora import LoraConfig, LoraLayout, init_params
from deelm.adapters.peft import read_deelm_config
from deelm.train.trainer import FrozenCache, batch_gradient, train
from deelm.train.data import (MixedBatches, Pairs, Triplets, concat_examples, group_sources,
                              iter_batches, load_training_data, make_batch)
from deelm.errors import TrainingDataError

WORDS = ("red blue green small large old new happy sad fast slow dog cat bird fish tree house "
         "car road river hill city park book song game").split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def triplet_rows(n, tag, seed=0, negatives=True):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w = list(rng.choice(WORDS, 5, replace=False))
        row = {"text": f"{tag}{i} " + " ".join(w), "positive": " ".join(w[:4]) + f" {tag}"}
        if negatives:
            row["negative"] = f"no {tag}{i} " + " ".join(rng.choice(WORDS, 4, replace=False))
        rows.append(row)
    return rows


def pair_rows(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{"sentence1": f"p{i} " + " ".join(rng.choice(WORDS, 4, replace=False)),
             "sentence2": f"q{i} " + " ".join(rng.choice(WORDS, 4, replace=False)),
             "score": float(rng.integers(0, 6))} for i in range(n)]


@pytest.fixture()
def files(tmp_path):
    return {"t1": write_jsonl(tmp_path / "t1.jsonl", triplet_rows(20, "a")),
            "t2": write_jsonl(tmp_path / "t2.jsonl", triplet_rows(12, "b", seed=2)),
            "t3": write_jsonl(tmp_path / "t3.jsonl", triplet_rows(6, "c", negatives=False)),
            "p": write_jsonl(tmp_path / "p.jsonl", pair_rows(16)),
            "dev": write_jsonl(tmp_path / "dev.jsonl", pair_rows(24, seed=5))}


tiny = fresh_tiny


def args(**kw):
    return quick_args(**{"max_steps": 4, "lora": LoraConfig(r=4, alpha=8, dropout=0.0), **kw})


# ---- several files ----------------------------------------------------------

def test_files_of_one_kind_are_batched_together(files):
    t1, t2, t3, p = (load_training_data(files[n]) for n in ("t1", "t2", "t3", "p"))
    groups = group_sources([t1, p, t2, t3])
    assert [type(g) for g in groups] == [Triplets, Pairs, Triplets]
    both = groups[0]
    assert len(both) == 32 and both.text == t1.text + t2.text
    assert str(files["t1"]) in both.path and str(files["t2"]) in both.path
    assert np.array_equal(both.lines, np.concatenate([t1.lines, t2.lines]))
    assert groups[2].negative is None and len(groups[2]) == 6
    with pytest.raises(TrainingDataError, match="cannot be batched"):
        concat_examples([t1, t3])
    with pytest.raises(TrainingDataError, match="cannot be batched"):
        concat_examples([t1, p])


def test_mixed_batches_interleave_and_keep_each_set_whole(files):
    t = concat_examples([load_training_data(files["t1"]), load_training_data(files["t2"])])
    p = load_training_data(files["p"])
    mixed = MixedBatches([t, p], 8, seed=3, epoch=1)
    got = list(mixed)
    assert len(got) == len(mixed) == len(iter_batches(t, 8, 3, 1)) + len(iter_batches(p, 8, 3, 1))
    kinds = [j for j, _ in got]
    assert kinds != sorted(kinds)  # interleaved, not one set after the other
    for j, data in enumerate((t, p)):
        mine = [b.examples.tolist() for i, b in got if i == j]
        assert mine == [e.tolist() for e in iter_batches(data, 8, 3, 1).plan]
        assert {b.kind for i, b in got if i == j} == {data.kind}
    again = [(j, b.examples.tolist()) for j, b in MixedBatches([t, p], 8, seed=3, epoch=1)]
    assert again == [(j, b.examples.tolist()) for j, b in got]
    other = [(j, b.examples.tolist()) for j, b in MixedBatches([t, p], 8, seed=3, epoch=2)]
    assert other != again


def test_one_file_batches_as_before(files):
    t = load_training_data(files["t1"])
    assert [b.examples.tolist() for _, b in MixedBatches([t], 8, seed=4, epoch=0)] == \
        [e.tolist() for e in iter_batches(t, 8, seed=4, epoch=0).plan]


def test_training_on_triplets_and_pairs_uses_each_loss(tiny_path, files, tmp_path, monkeypatch):
    import deelm.train.trainer as tr

    seen = []
    real = tr.combined_loss

    def spy(emb, batch, weights, scale):
        seen.append((batch.kind, dict(weights)))
        return real(emb, batch, weights, scale)

    monkeypatch.setattr(tr, "combined_loss", spy)
    a = args(max_steps=None, epochs=1, pair_loss_weights={"cosent": 1.0, "angle": 0.5})
    result = train(tiny(tiny_path), [files["t1"], files["p"], files["t2"]], tmp_path / "run", a,
                   show_progress_bar=False)
    kinds = [k for k, _ in seen]
    assert kinds.count("triplet") == len(iter_batches(
        concat_examples([load_training_data(files["t1"]), load_training_data(files["t2"])]), 8))
    assert kinds.count("pair") == len(iter_batches(load_training_data(files["p"]), 8))
    assert all(w == a.loss_weights for k, w in seen if k == "triplet")
    assert all(w == a.pair_loss_weights for k, w in seen if k == "pair")
    assert result.steps == len(seen) and all(np.isfinite(h["loss"]) for h in result.history)


def test_pair_losses_are_checked():
    for bad in ({"contrastive": 1.0}, {"cosent": 0.0}, {"cosent": -1.0}, {"angle": float("nan")}):
        with pytest.raises(ValueError, match="pair_loss_weights"):
            args(pair_loss_weights=bad).check(4)


# ---- GradCache ----------------------------------------------------------------

@pytest.mark.parametrize("k,train_from", [(1, 1), (0, 0), (-1, 2)])
@pytest.mark.parametrize("kind", ["triplet", "pair"])
def test_grad_cache_step_equals_the_one_pass_step(tiny_path, files, k, train_from, kind):
    model = tiny(tiny_path, k)
    data = load_training_data(files["t1" if kind == "triplet" else "p"])
    batch = make_batch(data, np.arange(8))
    layout = LoraLayout(LoraConfig(r=4, alpha=8, layers=tuple(range(train_from, model.num_layers))),
                        model._core.config)
    params = init_params(layout, 0)
    params[:] = np.random.default_rng(1).standard_normal(params.size).astype(np.float32) * 0.05
    model.set_adapter(layout, params)
    cache = FrozenCache(model, train_from, k, 1 << 30)
    grads, losses = [], []
    for micro in (None, 1, 5, 7, 100):
        a = args(micro_batch_size=micro, pair_loss_weights={"cosent": 1.0, "angle": 1.0},
                 loss_weights={"contrastive": 1.0, "cosent": 0.5, "angle": 0.2})
        g = np.zeros_like(params)
        loss, _ = batch_gradient(model, batch, cache, train_from, k, a, g, 2, seed=11)
        grads.append(g)
        losses.append(loss)
    assert len(batch.sentences) > 7
    for g, loss in zip(grads[1:], losses[1:]):
        err = float(np.max(np.abs(g - grads[0])) / np.max(np.abs(grads[0])))
        print(f"\n[grad cache vs one pass, k={k}, {kind}] loss {loss - losses[0]:.3g}, "
              f"grad max rel {err:.3g}")
        assert loss == losses[0]   # the forward is batch-invariant bit for bit
        assert err < 1e-5          # the backward sums chunks in another order
    assert np.array_equal(grads[-1], grads[0])  # one chunk holding everything: the same step


def test_grad_cache_recomputes_the_same_dropout(tiny_path, files):
    """With dropout, each chunk's second forward draws the masks of its first."""
    model = tiny(tiny_path, 1)
    batch = make_batch(load_training_data(files["t1"]), np.arange(8))
    layout = LoraLayout(LoraConfig(r=4, alpha=8, dropout=0.3, layers=(1, 2)), model._core.config)
    params = init_params(layout, 0)
    params[:] = np.random.default_rng(1).standard_normal(params.size).astype(np.float32) * 0.05
    model.set_adapter(layout, params)
    cache = FrozenCache(model, 1, 1, 1 << 30)
    a = args(micro_batch_size=3, lora=LoraConfig(r=4, alpha=8, dropout=0.3, layers=(1, 2)))
    g1, g2 = np.zeros_like(params), np.zeros_like(params)
    l1, _ = batch_gradient(model, batch, cache, 1, 1, a, g1, 2, seed=5)
    l2, _ = batch_gradient(model, batch, cache, 1, 1, a, g2, 2, seed=5)
    assert l1 == l2 and np.array_equal(g1, g2) and np.any(g1 != 0)


def test_grad_cache_training_runs(tiny_path, files, tmp_path):
    r = train(tiny(tiny_path), files["t1"], tmp_path / "run",
              args(micro_batch_size=4, batch_size=16, max_steps=3), show_progress_bar=False)
    assert r.steps == 3 and all(np.isfinite(h["loss"]) for h in r.history)
    with pytest.raises(ValueError, match="micro_batch_size"):
        args(micro_batch_size=0).check(4)


# ---- dev evaluation, best adapter, early stopping ----------------------------

def test_dev_eval_keeps_the_best_adapter(tiny_path, files, tmp_path):
    logs = []
    model = tiny(tiny_path)
    r = train(model, files["t1"], tmp_path / "run", args(max_steps=4, eval_steps=2),
              eval_data=files["dev"], show_progress_bar=False, log=logs.append)
    assert [e["step"] for e in r.evals] == [0, 2, 4]
    best = max(r.evals, key=lambda e: e["score"])
    assert (r.best_step, r.best_score) == (best["step"], best["score"])
    cfg = read_deelm_config(r.adapter)
    assert cfg["best_step"] == r.best_step and cfg["dev_score"] == r.best_score
    assert (tmp_path / "run" / "last_adapter" / "adapter_model.safetensors").is_file()
    # the model holds the best adapter, and scores what the evaluation said
    from deelm.train.trainer import _DevEval

    assert _DevEval(files["dev"], None, 0).score(model) == r.best_score
    assert [x["dev_score"] for x in logs if "dev_score" in x] == [e["score"] for e in r.evals]


def test_early_stopping(tiny_path, files, tmp_path):
    # no evaluation can gain 1000 points: the run stops at the first one after the start
    r = train(tiny(tiny_path), files["t1"], tmp_path / "run",
              args(max_steps=10, eval_steps=2, early_stopping_patience=1,
                   early_stopping_threshold=1000.0),
              eval_data=files["dev"], show_progress_bar=False)
    assert r.steps == 2 and [e["step"] for e in r.evals] == [0, 2]
    r = train(tiny(tiny_path), files["t1"], tmp_path / "run2",
              args(max_steps=6, eval_steps=2, early_stopping_patience=2,
                   early_stopping_threshold=1000.0),
              eval_data=files["dev"], show_progress_bar=False)
    assert r.steps == 4 and read_deelm_config(r.adapter)["best_step"] == 0


def test_eval_resumes_with_its_history(tiny_path, files, tmp_path):
    a = args(max_steps=6, eval_steps=2, save_steps=2)
    full = train(tiny(tiny_path), files["t1"], tmp_path / "full", a, eval_data=files["dev"],
                 show_progress_bar=False)
    part = train(tiny(tiny_path), files["t1"], tmp_path / "part", args(max_steps=6, eval_steps=2,
                 save_steps=2), eval_data=files["dev"], show_progress_bar=False)
    assert part.evals == full.evals
    import shutil

    shutil.rmtree(tmp_path / "part" / "adapter")
    shutil.rmtree(tmp_path / "part" / "checkpoint-4")
    again = train(tiny(tiny_path), files["t1"], tmp_path / "part", a, eval_data=files["dev"],
                  show_progress_bar=False)
    assert [e["step"] for e in again.evals] == [0, 2, 4, 6]
    assert again.evals == full.evals


def test_eval_settings_are_checked(tiny_path, files, tmp_path):
    m = tiny(tiny_path)
    with pytest.raises(ValueError, match="eval_steps"):
        train(m, files["t1"], tmp_path / "a", args(), eval_data=files["dev"],
              show_progress_bar=False)
    with pytest.raises(ValueError, match="eval_data"):
        train(m, files["t1"], tmp_path / "b", args(eval_steps=2), show_progress_bar=False)
    with pytest.raises(ValueError, match="eval_steps"):
        args(eval_steps=-1).check(4)
    with pytest.raises(Exception, match="no such file"):
        train(m, files["t1"], tmp_path / "c", args(eval_steps=2), eval_data=tmp_path / "nope.jsonl",
              show_progress_bar=False)


def test_train_cli_with_several_files_gradcache_and_dev_eval(tiny_path, files, tmp_path, capsys):
    from deelm.__main__ import main

    out = tmp_path / "cli"
    assert main(["train", "--model", str(tiny_path[0]), "--data", str(files["t1"]),
                 str(files["p"]), "--output", str(out), "--max-steps", "4", "--batch-size", "8",
                 "--micro-batch-size", "5", "--pair-angle-weight", "0.5", "--eval-data",
                 str(files["dev"]), "--eval-steps", "2", "--early-stopping-patience", "3",
                 "--threads", "1", "--keep-checkpoints", "3", "--save-steps", "1"]) == 0
    captured = capsys.readouterr()
    assert "best dev score" in captured.out and "step 2: dev" in captured.err
    cfg = read_deelm_config(out / "adapter")
    t = cfg["training"]
    assert t["micro_batch_size"] == 5 and t["pair_loss_weights"] == {"cosent": 1.0, "angle": 0.5}
    assert "best_step" in cfg and len(list(out.glob("checkpoint-*"))) == 3


def test_auto_adapter_is_recognised_by_content(tiny_path, gemma_tiny_path, files, tmp_path,
                                               monkeypatch):
    """A bundled adapter applies to the weights it was trained on, under any file name."""
    import shutil

    import deelm
    from deelm.adapters import bundled

    r = train(tiny(tiny_path), files["t1"], tmp_path / "run", args(max_steps=1),
              show_progress_bar=False)
    cfg = read_deelm_config(r.adapter)
    assert cfg["base_model_fingerprint"] == tiny(tiny_path).fingerprint
    shutil.copytree(r.adapter, tmp_path / "bundle" / "tiny-deelm")
    monkeypatch.setattr(bundled, "ADAPTERS_DIR", tmp_path / "bundle")
    renamed = tmp_path / "another-name.gguf"
    shutil.copyfile(tiny_path[0], renamed)
    m = deelm.DeeLM.from_pretrained(renamed)
    assert m.load_options["adapter"] == str(tmp_path / "bundle" / "tiny-deelm")
    assert deelm.DeeLM.from_pretrained(renamed, adapter=None).adapter is None
    # other weights (the tiny Gemma-3) get none
    assert deelm.DeeLM.from_pretrained(gemma_tiny_path[0]).adapter is None
    # a damaged bundled config means no automatic adapter, not a failure
    (tmp_path / "bundle" / "tiny-deelm" / "deelm_config.json").write_text("{oops")
    assert deelm.DeeLM.from_pretrained(renamed).adapter is None


def test_dev_eval_on_a_seeded_sample(files):
    from deelm.eval.analysis import sample_pairs
    from deelm.eval.sts import load_sts_file
    from deelm.train.trainer import _DevEval

    full = load_sts_file(files["dev"])
    part = _DevEval(files["dev"], 10, 3).data
    want = sample_pairs(full, 10, 3)
    assert len(part.scores) == 10 and part.sentence1 == want.sentence1
    assert part.sentence1 != sample_pairs(full, 10, 4).sentence1
    assert _DevEval(files["dev"], None, 0).data.sentence1 == full.sentence1

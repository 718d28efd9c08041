"""DeeLM training: the full loss's LoRA gradients against torch autograd +
PEFT on the same weights (tiny model in every attention configuration, and
the default model), the training forward against inference, dropout against
finite differences, and the trainer: learning, checkpoints and resume,
atomic output, bad input. Run with `pytest -s` to see the measured errors."""
import json
import shutil

import numpy as np
import pytest

import deelm
from conftest import fresh_tiny, quick_args, sts_sentences
from deelm.errors import AdapterError, TrainingDataError
from deelm.adapters.lora import LoraConfig
from deelm.adapters.peft import adapter_tensors, save_adapter
from deelm.train import train
from support.gguf_builder import TINY
from support.grads import SENTENCES, batch_arrays, compare, deelm_grads, random_adapter, torch_grads
from support.reference import report

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers

L = TINY["n_layers"]


@pytest.fixture(scope="module")
def tiny_f32(tiny_path):
    return deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=-1, compute_precision="float32")


@pytest.fixture(scope="module")
def hf_tiny(tiny_path):
    path = tiny_path[0]
    return transformers.AutoModel.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32,
                                                  attn_implementation="eager").eval()


# (k, train_from): causal all layers, fully bidirectional, DeeLM-style upper
# layers only, and a trained causal layer below a bidirectional one
CONFIGS = [(-1, 0), (0, 0), (L - 1, L - 1), (2, 1)]


@pytest.mark.parametrize("k,train_from", CONFIGS)
def test_lora_gradients_match_torch_tiny(tiny_f32, hf_tiny, tmp_path, k, train_from):
    layout, params = random_adapter(tiny_f32, range(train_from, L))
    try:
        pooled, R, grad = deelm_grads(tiny_f32, SENTENCES, k, train_from)
        save_adapter(tmp_path / "a", layout, params)
        ids = batch_arrays(tiny_f32, SENTENCES)[0]
        ref_pooled, ref = torch_grads(hf_tiny, tmp_path / "a", ids, k, R)
        report(f"tiny k={k}: pooled max |deelm - torch+PEFT|", np.abs(pooled - ref_pooled).max())
        assert np.abs(pooled - ref_pooled).max() < 1e-4
        assert compare(layout, grad, ref, f"tiny k={k} train_from={train_from}") < 1e-4
    finally:
        tiny_f32.remove_adapter()


def test_lora_gradients_match_torch_default(default_path, hf_default, tmp_path):
    """The default model, float32 path, DeeLM-style: k = 29, layers 27-29 trained."""
    model = deelm.DeeLM.from_pretrained(default_path, compute_precision="float32", threads=2,
                                        adapter=None)
    hf, _ = hf_default
    k, train_from = 29, 27
    layout, params = random_adapter(model, range(train_from, model.num_layers), r=8)
    params *= 0.2  # keep the adapted model near the base one, as training does
    sentences = sts_sentences(6)
    pooled, R, grad = deelm_grads(model, sentences, k, train_from)
    save_adapter(tmp_path / "a", layout, params)
    ref_pooled, ref = torch_grads(hf, tmp_path / "a", batch_arrays(model, sentences)[0], k, R)
    report("default k=29: pooled max |deelm - torch+PEFT|", np.abs(pooled - ref_pooled).max())
    assert compare(layout, grad, ref, "default model k=29 train_from=27") < 1e-3


# The tiny LLaMA and the tiny Gemma-3 (its block's backward: post-norms, q/k
# head norms, GeGLU, sliding windows), by (fixture, precision).
BLOCKS = {"llama-f32": ("tiny_path", "float32"), "gemma3-f32": ("gemma_tiny_path", "float32"),
          "gemma3-int8": ("gemma_tiny_path", "int8")}


@pytest.fixture(scope="module", params=list(BLOCKS))
def block_model(request):
    where, precision = BLOCKS[request.param]
    path = request.getfixturevalue(where)[0]
    return deelm.DeeLM.from_pretrained(path, bidirectional_from=-1, compute_precision=precision)


@pytest.fixture(scope="module", params=["llama-f32", "gemma3-f32"])
def block_f32(request):
    where, precision = BLOCKS[request.param]
    return deelm.DeeLM.from_pretrained(request.getfixturevalue(where)[0], bidirectional_from=-1,
                                       compute_precision=precision)


def test_train_forward_equals_inference(block_model):
    """With dropout off, the training pass computes what encode does, bitwise."""
    model, n = block_model, block_model.num_layers
    for k, train_from in CONFIGS + [(n - 1, n - 1), (n - 2, n - 3)]:
        random_adapter(model, range(train_from, n), seed=3)
        try:
            _, tokens, offsets, pool = batch_arrays(model, SENTENCES)
            x = model._core.residual(tokens, offsets, train_from, k, 2)
            pooled = model._core.train_forward(x, offsets, pool, train_from, k, 2)
            ref = model._core.forward(tokens, offsets, pool, k, 2)[0]
            assert np.array_equal(pooled, ref), (k, train_from)
        finally:
            model.remove_adapter()


def test_adapter_changes_the_embeddings_and_removal_restores(tiny_model):
    base = tiny_model.encode(SENTENCES)
    random_adapter(tiny_model, range(L))
    adapted = tiny_model.encode(SENTENCES)
    tiny_model.remove_adapter()
    assert np.abs(adapted - base).max() > 1e-3
    assert np.array_equal(tiny_model.encode(SENTENCES), base)


def test_dropout_gradient_matches_finite_differences(block_f32):
    """Dropout masks are a function of (seed, position): the same seed gives
    the same mask, so the loss is a smooth function of the parameters."""
    model = block_f32
    layout, params = random_adapter(model, range(model.num_layers))
    try:
        _, tokens, offsets, pool = batch_arrays(model, SENTENCES)
        core = model._core
        x = core.residual(tokens, offsets, 0, 0, 1)
        R = np.random.default_rng(5).standard_normal((len(SENTENCES),
                                                       model.get_sentence_embedding_dimension()))

        def loss(p):
            params[:] = p
            return float(np.sum(core.train_forward(x, offsets, pool, 0, 0, 1, 0.3, 42) * R))

        p0 = params.copy()
        other = core.train_forward(x, offsets, pool, 0, 0, 1, 0.3, 43)
        pooled = core.train_forward(x, offsets, pool, 0, 0, 1, 0.3, 42)
        assert not np.array_equal(pooled, other)  # another seed, another mask
        grad = np.zeros_like(params)
        core.train_backward(R.astype(np.float32), grad)
        v = np.random.default_rng(6).standard_normal(params.size)
        v = (v / np.linalg.norm(v)).astype(np.float32)  # a unit step: the loss stays near-linear
        eps = 1e-2
        fd = (loss(p0 + eps * v) - loss(p0 - eps * v)) / (2 * eps)
        params[:] = p0
        rel = abs(fd - float(grad @ v)) / abs(fd)
        report(f"{model.config['architecture']} dropout 0.3: directional derivative vs finite "
               f"differences, rel. error", rel)
        assert rel < 2e-3
    finally:
        model.remove_adapter()


def test_gradients_thread_invariant(block_f32):
    model = block_f32
    random_adapter(model, range(model.num_layers))
    try:
        g1 = deelm_grads(model, SENTENCES, 0, 0, threads=1)[2]
        g2 = deelm_grads(model, SENTENCES, 0, 0, threads=2)[2]
        report("gradient, 1 vs 2 threads, max abs difference", np.abs(g1 - g2).max())
        np.testing.assert_allclose(g1, g2, rtol=0, atol=1e-6 * np.abs(g1).max())
    finally:
        model.remove_adapter()


def test_core_rejects_bad_training_calls(tiny_model):
    core = tiny_model._core
    _, tokens, offsets, pool = batch_arrays(tiny_model, SENTENCES)
    x = core.residual(tokens, offsets, 1, -1, 1)
    with pytest.raises(RuntimeError, match="set_lora"):
        core.train_forward(x, offsets, pool, 1)
    layout, params = random_adapter(tiny_model, range(L))
    try:
        with pytest.raises(ValueError, match="below layer_from"):
            core.train_forward(x, offsets, pool, 1)
        with pytest.raises(RuntimeError, match="train_forward first"):
            core.train_backward(np.zeros((4, TINY["dim"]), np.float32), np.zeros_like(params))
        with pytest.raises(ValueError, match="dropout"):
            core.train_forward(x, offsets, pool, 0, dropout=1.0)
        with pytest.raises(ValueError, match=r"x must be"):
            core.train_forward(x[:, :5], offsets, pool, 0)
        bad = x.copy()
        bad[0, 0] = np.nan
        with pytest.raises(ValueError, match="non-finite"):
            core.train_forward(bad, offsets, pool, 0)
        core.train_forward(core.residual(tokens, offsets, 0, -1, 1), offsets, pool, 0)
        with pytest.raises(TypeError, match="grad"):
            core.train_backward(np.zeros((4, TINY["dim"]), np.float32), np.zeros(3, np.float32))
    finally:
        tiny_model.remove_adapter()
    table = layout.table.copy()
    table[0, 5] = params.size  # A outside the buffer
    with pytest.raises(ValueError, match="do not fit"):
        core.set_lora(table, layout.scales, params)
    table = layout.table.copy()
    table[0, 3] += 1  # wrong input width
    with pytest.raises(ValueError, match="rank"):
        core.set_lora(table, layout.scales, params)
    with pytest.raises(ValueError, match="sorted"):
        core.set_lora(layout.table[::-1].copy(), layout.scales, params)
    with pytest.raises(TypeError, match="float32"):
        core.set_lora(layout.table, layout.scales, params.astype(np.float64))


# ---- the trainer ---------------------------------------------------------------

WORDS = ("cat dog bird fish horse cow sheep goat lion tiger bear wolf fox deer mouse rat "
         "red blue green black white small big old young fast slow").split()


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    """A small synthetic triplet file: positives share words with the anchor."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "triplets.jsonl"
    with open(path, "w") as fh:
        for i in range(48):
            words = list(rng.choice(WORDS, 5, replace=False))
            pos = words[:4] + [str(rng.choice(WORDS))]
            neg = list(rng.choice(WORDS, 5, replace=False))
            fh.write(json.dumps({"text": f"{i} " + " ".join(words), "positive": " ".join(pos),
                                 "negative": f"not {i} " + " ".join(neg)}) + "\n")
    return path


def test_training_lowers_the_loss(tiny_path, triplets, tmp_path):
    model = fresh_tiny(tiny_path)
    result = train(model, triplets, tmp_path / "run",
                   quick_args(max_steps=24, lora=LoraConfig(r=8, alpha=16)),
                   show_progress_bar=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 24 and result.steps == 24
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses
    # the adapter on disk reproduces the trained model, settings included
    reloaded = deelm.DeeLM.from_pretrained(tiny_path[0], adapter=result.adapter, threads=2)
    assert reloaded.bidirectional_from == model.bidirectional_from == 1
    assert np.array_equal(reloaded.encode(SENTENCES), model.encode(SENTENCES))


def test_resume_equals_uninterrupted(tiny_path, triplets, tmp_path):
    straight = train(fresh_tiny(tiny_path), triplets, tmp_path / "a", quick_args(save_steps=3),
                     show_progress_bar=False)

    class Stop(Exception):
        pass

    def stop_after_3(entry):
        if entry["step"] == 4:
            raise Stop

    with pytest.raises(Stop):
        train(fresh_tiny(tiny_path), triplets, tmp_path / "b", quick_args(save_steps=3),
              show_progress_bar=False, log=stop_after_3)
    # interrupted: a complete checkpoint, no adapter, no temporary leftovers
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint-3"]
    resumed = train(fresh_tiny(tiny_path), triplets, tmp_path / "b", quick_args(save_steps=3),
                    show_progress_bar=False)
    a = adapter_tensors(*_layout_params(straight.adapter, tiny_path))
    b = adapter_tensors(*_layout_params(resumed.adapter, tiny_path))
    assert all(np.array_equal(a[key], b[key]) for key in a)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]


def _layout_params(adapter, tiny_path):
    from deelm.adapters.peft import load_adapter

    model = fresh_tiny(tiny_path)
    _, layout, params = load_adapter(adapter, model._core.config)
    return layout, params


def test_trainer_bad_input(tiny_path, triplets, tmp_path):
    model = fresh_tiny(tiny_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TrainingDataError, match="empty"):
        train(model, empty, tmp_path / "o1", quick_args(), show_progress_bar=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(triplets.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(TrainingDataError, match="line 2"):
        train(model, broken, tmp_path / "o2", quick_args(), show_progress_bar=False)
    with pytest.raises(ValueError, match="below train_from"):
        train(model, triplets, tmp_path / "o3",
              quick_args(train_from=2, lora=LoraConfig(r=4, layers=(0, 1, 2))),
              show_progress_bar=False)
    with pytest.raises(ValueError, match="train_from"):
        train(model, triplets, tmp_path / "o4", quick_args(train_from=L), show_progress_bar=False)
    with pytest.raises(Exception, match="layer"):
        train(model, triplets, tmp_path / "o5", quick_args(lora=LoraConfig(r=4, layers=(L + 3,))),
              show_progress_bar=False)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"sentence1": "a b", "sentence2": "a c", "score": 4.0}\n' * 3)
    with pytest.raises(ValueError, match="no in-batch positives"):
        train(model, pairs, tmp_path / "o6", quick_args(pair_loss_weights={"contrastive": 1.0}),
              show_progress_bar=False)


def test_corrupt_adapter_is_a_clear_error(tiny_path, triplets, tmp_path):
    result = train(fresh_tiny(tiny_path), triplets, tmp_path / "run", quick_args(max_steps=1),
                   show_progress_bar=False)
    bad = tmp_path / "bad"
    shutil.copytree(result.adapter, bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        deelm.DeeLM.from_pretrained(tiny_path[0], adapter=bad)
    (bad / "deelm_config.json").write_text("{oops")
    with pytest.raises(AdapterError, match="deelm_config.json"):
        deelm.DeeLM.from_pretrained(tiny_path[0], adapter=bad)


def test_train_cli(tiny_path, triplets, tmp_path):
    from deelm.__main__ import main

    out = tmp_path / "cli"
    assert main(["train", "--model", str(tiny_path[0]), "--data", str(triplets), "--output",
                 str(out), "--max-steps", "2", "--batch-size", "8", "--bidirectional-from", "2",
                 "--lora-r", "2", "--threads", "1", "--adapter-dtype", "float16"]) == 0
    cfg = json.loads((out / "adapter" / "deelm_config.json").read_text())
    assert cfg["bidirectional_from"] == 2 and cfg["train_from"] == 2 and cfg["steps"] == 2
    peft_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 2 and peft_cfg["layers_to_transform"] == [2]
    from safetensors.numpy import load_file

    assert all(v.dtype == np.float16
               for v in load_file(str(out / "adapter" / "adapter_model.safetensors")).values())
    assert deelm.DeeLM.from_pretrained(tiny_path[0], adapter=out / "adapter").adapter is not None


def test_default_model_carries_the_bundled_deelm_adapter(default_path, monkeypatch, tmp_path):
    from deelm.adapters.bundled import bundled_adapter_path
    from deelm.io.default_model import MODEL_ENV

    if bundled_adapter_path() is None:
        pytest.skip("this installation has no bundled adapter (deelm/adapters/)")
    monkeypatch.delenv(MODEL_ENV, raising=False)
    shipped = deelm.DeeLM.from_pretrained(threads=2)
    assert shipped.adapter is not None
    settings = json.loads((bundled_adapter_path() / "deelm_config.json").read_text())
    assert shipped.bidirectional_from == settings["bidirectional_from"]
    assert shipped.pooling == settings["pooling"]
    bare = deelm.DeeLM.from_pretrained(adapter=None, threads=2)
    assert bare.adapter is None
    assert np.abs(shipped.encode(SENTENCES) - bare.encode(SENTENCES)).max() > 1e-2
    # the weights are recognised by content: by path, through $DEELM_MODEL, or as a copy
    # under another name, the default model gets its adapter
    assert deelm.DeeLM.from_pretrained(default_path).adapter is not None
    monkeypatch.setenv(MODEL_ENV, str(default_path))
    assert deelm.DeeLM.from_pretrained().adapter is not None
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(default_path, copy)
    assert deelm.DeeLM.from_pretrained(copy).load_options["adapter"] == str(bundled_adapter_path())


def test_max_examples_takes_the_first_rows(tiny_path, triplets, tmp_path):
    from deelm.train.data import load_training_data

    data = load_training_data(triplets)
    head = data.head(16)
    assert head.text == data.text[:16] and list(head.lines) == list(range(1, 17))
    result = train(fresh_tiny(tiny_path), triplets, tmp_path / "run",
                   quick_args(max_steps=None, max_examples=16, batch_size=8),
                   show_progress_bar=False)
    assert result.steps == 2


def test_training_start_cleans_a_killed_runs_leftovers(tiny_path, triplets, tmp_path):
    out = tmp_path / "run"
    (out / ".checkpoint-2.tmp-dead").mkdir(parents=True)
    (out / "checkpoint-9").mkdir()  # incomplete
    train(fresh_tiny(tiny_path), triplets, out, quick_args(max_steps=2), show_progress_bar=False)
    names = {p.name for p in out.iterdir()}
    assert ".checkpoint-2.tmp-dead" not in names and "checkpoint-9" not in names
    assert "adapter" in names

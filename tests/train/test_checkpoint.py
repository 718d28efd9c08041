"""Checkpoints: exact resume, newest-checkpoint lookup, atomic saves, bad checkpoints."""
import json
import os

import numpy as np
import pytest

from deelm.train.checkpoint import (checkpoint_path, latest_checkpoint, list_checkpoints,
                              load_checkpoint, remove_old_checkpoints, save_checkpoint)
from deelm.errors import CheckpointError
from deelm.adapters.lora import LoraConfig, LoraLayout, init_params
from deelm.train.optim import AdamW, LinearWarmupDecay

TINY = dict(n_layers=3, dim=32, hidden_dim=48, n_heads=4, n_kv_heads=2, head_dim=8, rope_style=0)


def setup(seed=0):
    layout = LoraLayout(LoraConfig(r=2, alpha=4, layers=(1, 2)), TINY)
    params = init_params(layout, seed)
    opt = AdamW(params, lr=1e-2, schedule=LinearWarmupDecay(2, 10))
    return layout, params, opt


def fake_grads(layout, n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(layout.size).astype(np.float32) for _ in range(n)]


def save(out, step, layout, opt, rng, extra=None):
    return save_checkpoint(checkpoint_path(out, step), step, layout, opt.params, opt.state_dict(),
                           rng_state=rng.bit_generator.state, extra=extra or {"epoch": 0})


def test_resume_is_exact(tmp_path):
    layout, _, full = setup()
    grads = fake_grads(layout, 10)
    for g in grads:
        full.step(g)

    layout, _, opt = setup()
    rng = np.random.default_rng(7)
    for g in grads[:4]:
        opt.step(g)
    rng.random(3)
    path = save(tmp_path, 4, layout, opt, rng, extra={"epoch": 1, "batch": 17, "losses": [0.5]})
    assert path == tmp_path / "checkpoint-4"

    ck = load_checkpoint(path, model_cfg=dict(TINY, vocab_size=64))
    assert ck.step == 4 and ck.extra == {"epoch": 1, "batch": 17, "losses": [0.5]}
    assert ck.layout.same_as(layout) and ck.config == layout.config
    assert np.array_equal(ck.params, opt.params)
    resumed_rng = np.random.default_rng()
    resumed_rng.bit_generator.state = ck.rng_state
    assert resumed_rng.random() == rng.random()
    resumed = AdamW(ck.params, lr=0.0)
    resumed.load_state_dict(ck.optimizer_state)
    assert resumed.step_count == 4 and resumed.schedule.total_steps == 10
    for g in grads[4:]:
        resumed.step(g)
    assert np.array_equal(resumed.params, full.params)


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    assert latest_checkpoint(tmp_path) is None
    layout, _, opt = setup()
    rng = np.random.default_rng(0)
    for step in (9, 10, 2):
        save(tmp_path, step, layout, opt, rng)
    (tmp_path / "checkpoint-99").mkdir()                  # incomplete: ignored
    (tmp_path / ".checkpoint-50.tmp-abc").mkdir()         # a save in progress: ignored
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 9, 10]
    removed = remove_old_checkpoints(tmp_path, keep=2)
    assert removed == [tmp_path / "checkpoint-2"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [9, 10]
    with pytest.raises(ValueError):
        remove_old_checkpoints(tmp_path, keep=0)


def test_interrupted_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    layout, _, opt = setup()
    rng = np.random.default_rng(0)
    save(tmp_path, 5, layout, opt, rng)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 10, layout, opt, rng)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-5"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"


def test_bad_checkpoints(tmp_path):
    layout, _, opt = setup()
    rng = np.random.default_rng(0)
    path = save(tmp_path, 3, layout, opt, rng)
    with pytest.raises(CheckpointError, match="made for another model: dim 32 here vs 64"):
        load_checkpoint(path, model_cfg=dict(TINY, dim=64))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-4")
    npz = path / "optimizer.npz"
    npz.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="optimizer.npz: corrupt"):
        load_checkpoint(path)
    npz.unlink()
    with pytest.raises(CheckpointError, match="optimizer.npz: missing"):
        load_checkpoint(path)
    (path / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match="trainer_state.json: not valid JSON"):
        load_checkpoint(path)
    (path / "trainer_state.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "c", 1, layout, opt.params, opt.state_dict(), extra={"x": object()})
    assert not (tmp_path / "c").exists()


def test_leftovers_of_a_killed_run_are_cleaned_on_the_next_start(tmp_path):
    """Hidden temporary folders of interrupted saves (each a whole checkpoint)
    and checkpoint folders missing a file used to stay forever."""
    from deelm.train import checkpoint as ck

    out = tmp_path / "run"
    (out / ".checkpoint-4.tmp-abc123").mkdir(parents=True)
    (out / ".checkpoint-4.tmp-abc123" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (out / ".adapter.tmp-zz").mkdir()
    (out / "checkpoint-18").mkdir()  # no files: a stale, incomplete one
    (out / "notes").mkdir()          # not ours: left alone
    removed = ck.clean_leftovers(out)
    assert sorted(p.name for p in removed) == [".adapter.tmp-zz", ".checkpoint-4.tmp-abc123",
                                               "checkpoint-18"]
    assert sorted(p.name for p in out.iterdir()) == ["notes"]
    assert ck.clean_leftovers(tmp_path / "missing") == []

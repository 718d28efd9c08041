"""Training checkpoints: save every N steps, find the newest, resume exactly.

A checkpoint is a directory ``<output>/checkpoint-<step>`` holding

* the PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``),
  so any checkpoint is also a usable adapter;
* ``optimizer.npz``: the optimiser's arrays (AdamW's two moments);
* ``trainer_state.json``: step, the optimiser's scalars, the RNG state, the
  model dimensions the LoRA layout was made for, and whatever the trainer
  passes as ``extra`` (epoch, position in the epoch, loss history...).

The directory is written atomically (:func:`deelm.io.atomic.atomic_directory`): an
interrupted save leaves no checkpoint, never a partial one, so
:func:`latest_checkpoint` can trust whatever it finds.
"""
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deelm.errors import AdapterError, CheckpointError, read_json
from deelm.adapters.lora import LoraLayout
from deelm.adapters.peft import (CONFIG_FILE, WEIGHTS_FILE, _write_json, load_adapter, write_adapter_files)
from deelm.io.atomic import atomic_directory

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.npz"
CHECKPOINT_PREFIX = "checkpoint-"
FORMAT_VERSION = 1
_NAME_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_REQUIRED = (STATE_FILE, OPTIMIZER_FILE, CONFIG_FILE, WEIGHTS_FILE)


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    step: int
    layout: LoraLayout
    params: np.ndarray
    optimizer_state: dict
    rng_state: object
    extra: dict

    @property
    def config(self):
        return self.layout.config


def checkpoint_path(output_dir, step):
    """``<output_dir>/checkpoint-<step>``."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{int(step)}"


def save_checkpoint(directory, step, layout, params, optimizer_state, rng_state=None, extra=None,
                    base_model_name=None):
    """Writes a checkpoint directory atomically; returns its path.

    ``optimizer_state`` is :meth:`deelm.train.optim.AdamW.state_dict` (arrays go to
    optimizer.npz, the rest to trainer_state.json); ``rng_state`` and
    ``extra`` must be JSON-serialisable (a NumPy ``Generator.bit_generator.state``
    is).
    """
    arrays = {k: np.asarray(v) for k, v in optimizer_state.items() if isinstance(v, np.ndarray)}
    state = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "model": layout.model,
        "optimizer": {k: v for k, v in optimizer_state.items() if k not in arrays},
        "rng_state": rng_state,
        "extra": extra or {},
    }
    try:
        json.dumps(state)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint state is not JSON-serialisable: {e}") from None
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_adapter_files(tmp, layout, params, base_model_name)
        np.savez(tmp / OPTIMIZER_FILE, **arrays)
        _write_json(tmp / STATE_FILE, state)
    return directory


def _read_state(directory):
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(path, "missing: not a complete checkpoint")
    state = read_json(path, CheckpointError)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(path, f"not a deelm checkpoint state of format {FORMAT_VERSION}")
    return state


def load_checkpoint(directory, model_cfg=None):
    """Reads a checkpoint written by :func:`save_checkpoint`.

    With ``model_cfg`` (``DeeLM.config``) the checkpoint must have been made
    for a model of the same dimensions. Raises CheckpointError (or
    AdapterError for the adapter files) naming the file at fault.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(directory, "no such checkpoint directory")
    state = _read_state(directory)
    dims = state.get("model") or {}
    if model_cfg is not None:
        differ = {k: (v, model_cfg.get(k)) for k, v in dims.items() if model_cfg.get(k) != v}
        if differ:
            raise CheckpointError(directory / STATE_FILE, "made for another model: "
                                  + ", ".join(f"{k} {a} here vs {b}" for k, (a, b) in differ.items()))
    try:
        _, layout, params = load_adapter(directory, dims)
    except AdapterError:
        raise
    except ValueError as e:
        raise CheckpointError(directory / STATE_FILE, f"bad model dimensions: {e}") from None
    opt_path = directory / OPTIMIZER_FILE
    try:
        with np.load(opt_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise CheckpointError(opt_path, "missing: not a complete checkpoint") from None
    except Exception as e:
        raise CheckpointError(opt_path, f"corrupt ({type(e).__name__}: {e})") from None
    for k, v in arrays.items():
        if v.shape != params.shape:
            raise CheckpointError(opt_path, f"{k} has shape {v.shape}, the LoRA parameters "
                                  f"{params.shape}")
    return Checkpoint(path=directory, step=int(state["step"]), layout=layout, params=params,
                      optimizer_state={**state.get("optimizer", {}), **arrays},
                      rng_state=state.get("rng_state"), extra=state.get("extra") or {})


def list_checkpoints(output_dir):
    """[(step, path)] of the complete checkpoints in `output_dir`, oldest first.

    Temporary directories of saves in progress (or interrupted) are hidden
    names and never match.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in _REQUIRED):
            found.append((int(m.group(1)), p))
    return sorted(found)


def clean_leftovers(output_dir):
    """Removes what an interrupted run leaves in `output_dir`: the hidden
    temporary folders of saves that never completed (``.checkpoint-N.tmp-*``,
    ``.adapter.tmp-*``, each a whole checkpoint's size) and checkpoint folders
    that lack a required file. Returns the removed paths."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed = []
    for p in output_dir.iterdir():
        if not p.is_dir() or p.is_symlink():
            continue
        stale_tmp = p.name.startswith(".") and ".tmp-" in p.name
        incomplete = _NAME_RE.match(p.name) and not all((p / f).is_file() for f in _REQUIRED)
        if stale_tmp or incomplete:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def latest_checkpoint(output_dir):
    """Path of the checkpoint with the highest step in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_old_checkpoints(output_dir, keep):
    """Deletes all but the `keep` newest checkpoints; returns the removed paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    old = [p for _, p in list_checkpoints(output_dir)[:-keep]]
    for p in old:
        shutil.rmtree(p)
    return old

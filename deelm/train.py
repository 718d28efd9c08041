"""DeeLM training: contrastive LoRA fine-tuning of the layers above the turning point.

The C core runs the trained layers forward and backward (``train_forward`` /
``train_backward``); this module feeds it batches, computes the loss on the
pooled embeddings (deelm.losses), steps AdamW on the flat LoRA buffer
(deelm.optim), and writes checkpoints and the final adapter (deelm.lora,
deelm.checkpoint), all atomically.

Layers below ``train_from`` are frozen, so their output for a sentence never
changes during training: it is computed once per sentence and cached, and
each step runs only the upper layers.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .errors import TrainingDataError
from .lora import LoraConfig, LoraLayout, atomic_directory, init_params, write_adapter_files
from .losses import DEFAULT_WEIGHTS, LOSS_NAMES, combined_loss
from .model import pack_ids
from .optim import AdamW, LinearWarmupDecay, clip_grad_norm
from .train_data import Pairs, Triplets, iter_batches, load_training_data

DEELM_CONFIG_FILE = "deelm_config.json"


@dataclass
class TrainingArguments:
    """How to train. Defaults follow common LoRA practice for sentence
    embeddings (AnglE / BeLLM recipes scaled down to a CPU)."""

    bidirectional_from: int | None = None  # None: the model's current setting
    train_from: int | None = None          # None: bidirectional_from, or 0 when causal
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=8, alpha=16, dropout=0.05))
    loss_weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    loss_scale: float = 20.0
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    batch_size: int = 32            # examples (triplets or pairs) per in-batch loss
    gradient_accumulation: int = 1  # batches per optimiser step
    epochs: int = 1
    max_steps: int | None = None    # optimiser steps; overrides epochs when set
    max_examples: int | None = None  # train on the data's first N examples only
    max_grad_norm: float = 1.0
    seed: int = 0
    save_steps: int = 0             # checkpoint every N steps (0: only the final adapter)
    keep_checkpoints: int = 2
    cache_bytes: int = 2 << 30      # cap on the frozen-layer cache
    adapter_dtype: str = "float32"  # the final adapter's file dtype ("float16" halves it)
    threads: int | None = None

    def check(self, n_layers):
        k = self.bidirectional_from
        if k is not None and not (-1 <= k < n_layers):
            raise ValueError(f"bidirectional_from must be -1 or in [0, {n_layers}), got {k}")
        if self.train_from is not None and not (0 <= self.train_from < n_layers):
            raise ValueError(f"train_from must be in [0, {n_layers}), got {self.train_from}")
        for name in ("batch_size", "gradient_accumulation", "epochs", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("max_steps", "max_examples"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not (self.learning_rate > 0 and self.max_grad_norm > 0 and 0 <= self.warmup_ratio < 1
                and self.weight_decay >= 0 and self.save_steps >= 0):
            raise ValueError("need learning_rate > 0, max_grad_norm > 0, 0 <= warmup_ratio < 1, "
                             "weight_decay >= 0 and save_steps >= 0")
        unknown = set(self.loss_weights) - set(LOSS_NAMES)
        if unknown or not any(w > 0 for w in self.loss_weights.values()):
            raise ValueError(f"loss_weights must weigh at least one of {LOSS_NAMES} above 0, "
                             f"got {self.loss_weights}")

    def to_json(self):
        d = asdict(self)
        d["lora"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.lora).items()}
        return d


@dataclass
class TrainResult:
    adapter: Path
    steps: int
    seconds: float
    tokens: int
    history: list  # per step: step, loss, lr, grad_norm, tokens, seconds

    @property
    def tokens_per_second(self):
        return self.tokens / self.seconds if self.seconds else float("nan")


class _FrozenCache:
    """Residual stream entering `train_from` per sentence, computed once.

    Bounded by bytes: past the cap, sentences are recomputed each time."""

    def __init__(self, model, train_from, k, cap_bytes):
        self.model, self.train_from, self.k, self.cap = model, train_from, k, cap_bytes
        self.store, self.bytes = {}, 0

    def gather(self, sentences, ids, threads):
        """x_in [N, d] of the batch (sentences packed in order)."""
        core = self.model._core
        missing = [i for i, s in enumerate(sentences) if s not in self.store]
        fresh = {}
        if missing:
            tokens, offsets = pack_ids([ids[i] for i in missing])
            x = core.residual(tokens, offsets, self.train_from, self.k, threads)
            for j, i in enumerate(missing):
                fresh[sentences[i]] = x[offsets[j]:offsets[j + 1]]
            if self.train_from > 0:  # layer 0's input is just the embedding: nothing to save
                for s, v in fresh.items():
                    if self.bytes + v.nbytes > self.cap:
                        break
                    self.store[s] = v.copy()
                    self.bytes += v.nbytes
        return np.concatenate([self.store[s] if s in self.store else fresh[s] for s in sentences])


def _read_data(data):
    if isinstance(data, (Triplets, Pairs)):
        return data
    return load_training_data(data)


def train(model, data, output_dir, args: TrainingArguments | None = None, *, resume=True,
          show_progress_bar=True, log=None):
    """Trains a LoRA adapter on `model` (a DeeLM) and writes it to
    ``output_dir/adapter`` (PEFT's format plus deelm_config.json).

    data: a JSONL path of triplets (text, positive, negative) or scored pairs
    (sentence1, sentence2, score), or what deelm.train_data loads.
    resume: continue from the newest checkpoint in output_dir, if any.
    The model keeps the trained adapter applied when this returns.
    """
    args = args or TrainingArguments()
    L = model.num_layers
    args.check(L)
    data = _read_data(data)
    if args.max_examples is not None:
        data = data.head(args.max_examples)
    if isinstance(data, Pairs) and args.loss_weights.get("contrastive", 0) > 0:
        raise TrainingDataError(data.path, "scored pairs have no in-batch positives: set the "
                                "contrastive weight to 0 and use cosent and/or angle")
    k = model.bidirectional_from if args.bidirectional_from is None else args.bidirectional_from
    model.bidirectional_from = k
    train_from = args.train_from if args.train_from is not None else max(k, 0)
    lora_cfg = args.lora
    if lora_cfg.layers is None:
        lora_cfg = LoraConfig(**{**asdict(lora_cfg), "layers": tuple(range(train_from, L))})
    layers = lora_cfg.layer_indices(L)
    if min(layers) < train_from:
        raise ValueError(f"LoRA on layer {min(layers)} is below train_from = {train_from}: "
                         f"frozen layers cannot be trained")
    layout = LoraLayout(lora_cfg, model._core.config)
    params = init_params(layout, args.seed)
    grad = np.zeros_like(params)
    threads = args.threads or model.threads

    batches_per_epoch = len(iter_batches(data, args.batch_size, seed=args.seed, epoch=0))
    if batches_per_epoch == 0:
        raise TrainingDataError(data.path, "no batch could be formed from the data")
    total = args.max_steps or math.ceil(batches_per_epoch * args.epochs / args.gradient_accumulation)
    schedule = LinearWarmupDecay(int(args.warmup_ratio * total), total)
    opt = AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, schedule=schedule)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a single writer per output folder is assumed: what a killed run left
    # half-written is garbage now
    ckpt.clean_leftovers(out)
    step, history = 0, []
    latest = ckpt.latest_checkpoint(out) if resume else None
    if latest is not None:
        c = ckpt.load_checkpoint(latest, model._core.config)
        if not c.layout.same_as(layout):
            raise ValueError(f"{latest} was made with another LoRA layout ({c.layout!r}); use a "
                             f"new output directory or resume=False")
        params[:] = c.params
        opt.load_state_dict(c.optimizer_state)
        step, history = c.step, list(c.extra.get("history", []))
    model.set_adapter(layout, params)

    cache = _FrozenCache(model, train_from, k, args.cache_bytes)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not show_progress_bar)
    t_start, tokens_total, micro = time.perf_counter(), 0, 0
    skip = step * args.gradient_accumulation  # batches the resumed steps consumed
    step_loss, step_tokens, t_step = 0.0, 0, time.perf_counter()
    try:
        for epoch in range(10 ** 9):
            if step >= total:
                break
            for batch in iter_batches(data, args.batch_size, seed=args.seed, epoch=epoch):
                if skip:
                    skip -= 1
                    continue
                if step >= total:
                    break
                # dropout masks depend on (seed, step, batch within the step) only, so a
                # resumed run draws what the uninterrupted one would have
                loss, n_tok = _micro_step(model, batch, cache, train_from, k, args, grad, threads,
                                          seed=_mask_seed(args.seed, step,
                                                          micro % args.gradient_accumulation))
                micro += 1
                step_loss += loss / args.gradient_accumulation
                step_tokens += n_tok
                if micro % args.gradient_accumulation:
                    continue
                norm = clip_grad_norm(grad, args.max_grad_norm)
                if not math.isfinite(norm):
                    raise FloatingPointError(f"step {step + 1}: the gradient is not finite "
                                             f"(loss {step_loss}); lower the learning rate")
                lr = opt.step(grad)
                grad[:] = 0.0
                step += 1
                now = time.perf_counter()
                history.append({"step": step, "loss": step_loss, "lr": lr, "grad_norm": norm,
                                "tokens": step_tokens, "seconds": now - t_step})
                tokens_total += step_tokens
                bar.set_postfix(loss=f"{step_loss:.4f}",
                                tok_s=f"{step_tokens / max(now - t_step, 1e-9):.0f}")
                bar.update(1)
                if log:
                    log(history[-1])
                step_loss, step_tokens, t_step = 0.0, 0, now
                if args.save_steps and step % args.save_steps == 0 and step < total:
                    ckpt.save_checkpoint(ckpt.checkpoint_path(out, step), step, layout, params,
                                         opt.state_dict(), extra={"history": history})
                    ckpt.remove_old_checkpoints(out, args.keep_checkpoints)
    finally:
        bar.close()
    seconds = time.perf_counter() - t_start
    adapter = save_trained_adapter(out / "adapter", model, layout, params, args, train_from,
                                   history)
    return TrainResult(adapter, step, seconds, tokens_total, history)


def _mask_seed(seed, step, micro):
    return (seed * 1_000_003 + step * 1_009 + micro) & (2 ** 64 - 1)


def _micro_step(model, batch, cache, train_from, k, args, grad, threads, seed):
    """Forward, loss and backward of one batch; adds its gradient to `grad`."""
    encoded = model.tokenize(batch.sentences)
    ids = [e.ids for e in encoded]
    _, offsets = pack_ids(ids)
    pool = np.array([model._pool_range(e, model.pooling) for e in encoded], dtype=np.int64)
    x_in = cache.gather(batch.sentences, ids, threads)
    pooled = model._core.train_forward(x_in, offsets, pool, train_from, k, threads,
                                       args.lora.dropout, seed)
    loss, g = combined_loss(pooled, batch, args.loss_weights, args.loss_scale)
    model._core.train_backward((g / args.gradient_accumulation).astype(np.float32), grad)
    return loss, int(offsets[-1])


def save_trained_adapter(directory, model, layout, params, args, train_from, history):
    """The adapter in PEFT's format, plus deelm_config.json: the attention
    setting and pooling it was trained with, so loading restores them."""
    settings = {
        "bidirectional_from": model.bidirectional_from,
        "train_from": train_from,
        "pooling": model.pooling,
        "prompt": model.prompt,
        "base_model": Path(str(model.path)).name,
        "training": args.to_json(),
        "steps": len(history),
        "final_loss": history[-1]["loss"] if history else None,
    }
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_adapter_files(tmp, layout, params, base_model_name=settings["base_model"],
                            dtype=args.adapter_dtype)
        (Path(tmp) / DEELM_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return directory


def read_deelm_config(directory):
    """deelm_config.json of an adapter folder, or {} (PEFT-made adapters have none)."""
    path = Path(directory) / DEELM_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        from .errors import AdapterError

        raise AdapterError(path, f"not valid JSON ({e})") from None

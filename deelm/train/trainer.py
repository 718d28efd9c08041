"""DeeLM training: contrastive LoRA fine-tuning of the layers above the turning point.

The C core runs the trained layers forward and backward (``train_forward`` /
``train_backward``); this module feeds it batches, computes the loss on the
pooled embeddings (deelm.train.losses), steps AdamW on the flat LoRA buffer
(deelm.train.optim), and writes checkpoints and the final adapter (deelm.adapters.lora,
deelm.train.checkpoint), all atomically.

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

from deelm.adapters.lora import LoraConfig, LoraLayout, init_params
from deelm.adapters.peft import DEELM_CONFIG_FILE, write_adapter_files
from deelm.errors import TrainingDataError
from deelm.inputs import pack_ids
from deelm.io.atomic import atomic_directory
from deelm.train import checkpoint as ckpt
from deelm.train.arguments import TrainingArguments
from deelm.train.data import MixedBatches, Pairs, Triplets, group_sources, load_training_data
from deelm.train.losses import combined_loss
from deelm.train.optim import AdamW, LinearWarmupDecay, clip_grad_norm



@dataclass
class TrainResult:
    adapter: Path
    steps: int
    seconds: float
    tokens: int
    history: list  # per step: step, loss, lr, grad_norm, tokens, seconds
    evals: list = field(default_factory=list)  # per dev evaluation: step, score
    best_step: int | None = None
    best_score: float | None = None

    @property
    def tokens_per_second(self):
        return self.tokens / self.seconds if self.seconds else float("nan")


class FrozenCache:
    """Residual stream entering `train_from` per sentence, computed once.

    Bounded by bytes: past the cap, sentences are recomputed each time."""

    def __init__(self, model, train_from, k, cap_bytes):
        self.model, self.train_from, self.k, self.cap = model, train_from, k, cap_bytes
        self.store, self.bytes = {}, 0

    def clear(self):
        self.store, self.bytes = {}, 0

    def gather(self, sentences, ids, threads):
        """x_in [N, d] of the batch (sentences packed in order)."""
        core = self.model.core
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
    """Data sets to batch: a path, a loaded Triplets/Pairs, or a list of
    those, grouped by kind (deelm.train.data.group_sources)."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise ValueError("no training data given")
    loaded = [d if isinstance(d, (Triplets, Pairs)) else load_training_data(d) for d in items]
    return group_sources(loaded)


class _DevEval:
    """Scores the model on scored pairs (STS-B dev) during training and keeps
    the best adapter: Spearman x 100 of the cosines, as deelm.eval.sts."""

    def __init__(self, eval_data, max_pairs, seed):
        from deelm.eval.analysis import sample_pairs
        from deelm.eval.sts import STSData, load_sts_file

        data = eval_data if isinstance(eval_data, STSData) else load_sts_file(eval_data)
        self.data = sample_pairs(data, max_pairs, seed)

    def score(self, model):
        from deelm.eval.sts import encode_unique, sts_scores

        d = self.data
        emb, where = encode_unique(model, d.sentence1 + d.sentence2, batch_size=64,
                                   show_progress_bar=False)
        n = len(d.scores)
        return 100.0 * sts_scores(emb[where[:n]], emb[where[n:]], d.scores)["cosine_spearman"]


def train(model, data, output_dir, args: TrainingArguments | None = None, *, resume=True,
          show_progress_bar=True, log=None, eval_data=None):
    """Trains a LoRA adapter on `model` (a DeeLM) and writes it to
    ``output_dir/adapter`` (PEFT's format plus deelm_config.json).

    data: a JSONL path of triplets (text, positive, negative) or scored pairs
    (sentence1, sentence2, score), what deelm.train.data loads, or a list of
    those. Triplet files are batched together (in-batch negatives from every
    file) and train with ``args.loss_weights``; scored-pair files form their
    own batches and train with ``args.pair_loss_weights``; the two kinds of
    batches are interleaved at random over each epoch.
    eval_data: scored pairs (an STS JSONL path such as STS-B dev, or an
    evaluation.STSData) scored every ``args.eval_steps`` steps and at the
    start; ``adapter`` is then the best-scoring one (``last_adapter`` the
    final one) and training stops early after ``args.early_stopping_patience``
    evaluations without a gain.
    resume: continue from the newest checkpoint in output_dir, if any.
    The model keeps the returned adapter applied when this returns.
    """
    args = args or TrainingArguments()
    L = model.num_layers
    args.check(L)
    sources = _read_data(data)
    if args.max_examples is not None:
        sources = [d.head(args.max_examples) for d in sources]
    dev = None
    if eval_data is not None:
        if not args.eval_steps:
            raise ValueError("eval_data needs eval_steps > 0 (how often to evaluate)")
        dev = _DevEval(eval_data, args.eval_max_pairs, args.seed)
    elif args.eval_steps or args.early_stopping_patience:
        raise ValueError("eval_steps and early_stopping_patience need eval_data")
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
    layout = LoraLayout(lora_cfg, model.core.config)
    params = init_params(layout, args.seed)
    grad = np.zeros_like(params)
    threads = args.threads or model.threads

    batches_per_epoch = len(MixedBatches(sources, args.batch_size, seed=args.seed, epoch=0))
    if batches_per_epoch == 0:
        raise TrainingDataError(sources[0].path, "no batch could be formed from the data")
    total = args.max_steps or math.ceil(batches_per_epoch * args.epochs / args.gradient_accumulation)
    schedule = LinearWarmupDecay(int(args.warmup_ratio * total), total)
    opt = AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay, schedule=schedule)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a single writer per output folder is assumed: what a killed run left
    # half-written is garbage now
    ckpt.clean_leftovers(out)
    step, history, evals = 0, [], []
    latest = ckpt.latest_checkpoint(out) if resume else None
    if latest is not None:
        c = ckpt.load_checkpoint(latest, model.core.config)
        if not c.layout.same_as(layout):
            raise ValueError(f"{latest} was made with another LoRA layout ({c.layout!r}); use a "
                             f"new output directory or resume=False")
        params[:] = c.params
        opt.load_state_dict(c.optimizer_state)
        step, history = c.step, list(c.extra.get("history", []))
        evals = list(c.extra.get("evals", []))
    model.set_adapter(layout, params)

    def save_adapter(directory, extra=None):
        return save_trained_adapter(directory, model, layout, params, args, train_from, history,
                                    extra)

    def evaluate():
        """Scores the model now; True when training should stop early."""
        score = dev.score(model)
        best = max((e["score"] for e in evals), default=-math.inf)
        evals.append({"step": step, "score": score})
        if log:
            log({"step": step, "dev_score": score})
        if score > best:
            save_adapter(out / "best_adapter", {"best_step": step, "dev_score": score,
                                                "dev_data": str(dev.data.path)})
        if not args.early_stopping_patience:
            return False
        stale = len(evals) - 1 - _last_gain(evals, args.early_stopping_threshold)
        return stale >= args.early_stopping_patience

    if dev is not None and not evals:
        evaluate()

    cache = FrozenCache(model, train_from, k, args.cache_bytes)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not show_progress_bar)
    t_start, tokens_total, micro = time.perf_counter(), 0, 0
    skip = step * args.gradient_accumulation  # batches the resumed steps consumed
    step_loss, step_tokens, t_step = 0.0, 0, time.perf_counter()
    stop = False
    try:
        for epoch in range(10 ** 9):
            if step >= total or stop:
                break
            for _, batch in MixedBatches(sources, args.batch_size, seed=args.seed, epoch=epoch):
                if skip:
                    skip -= 1
                    continue
                if step >= total or stop:
                    break
                # dropout masks depend on (seed, step, batch within the step) only, so a
                # resumed run draws what the uninterrupted one would have
                loss, n_tok = batch_gradient(model, batch, cache, train_from, k, args, grad, threads,
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
                if dev is not None and step % args.eval_steps == 0:
                    stop = evaluate()
                step_loss, step_tokens, t_step = 0.0, 0, time.perf_counter()
                if args.save_steps and step % args.save_steps == 0 and step < total and not stop:
                    ckpt.save_checkpoint(ckpt.checkpoint_path(out, step), step, layout, params,
                                         opt.state_dict(),
                                         extra={"history": history, "evals": evals})
                    ckpt.remove_old_checkpoints(out, args.keep_checkpoints)
    finally:
        bar.close()
    if dev is not None and evals[-1]["step"] != step:
        evaluate()
    seconds = time.perf_counter() - t_start
    if dev is None:
        adapter = save_adapter(out / "adapter")
        best_step = best_score = None
    else:
        save_adapter(out / "last_adapter")
        best = evals[_best_eval(evals)]
        best_step, best_score = best["step"], best["score"]
        adapter = _publish_best(out)
        model.load_adapter(adapter)
    return TrainResult(adapter, step, seconds, tokens_total, history, evals, best_step, best_score)


def _best_eval(evals):
    """Index of the best evaluation (the earliest of equal scores)."""
    return max(range(len(evals)), key=lambda i: (evals[i]["score"], -i))


def _last_gain(evals, threshold):
    """Index of the last evaluation that beat every earlier one by more than `threshold`."""
    best, at = evals[0]["score"], 0
    for i in range(1, len(evals)):
        if evals[i]["score"] > best + threshold:
            at = i
        best = max(best, evals[i]["score"])
    return at


def _publish_best(out):
    """Copies best_adapter/ to adapter/ (atomically): the adapter a run hands over."""
    import shutil

    target = out / "adapter"
    with atomic_directory(target) as tmp:
        for f in (out / "best_adapter").iterdir():
            shutil.copy2(f, Path(tmp) / f.name)
    return target


def _mask_seed(seed, step, micro):
    return (seed * 1_000_003 + step * 1_009 + micro) & (2 ** 64 - 1)


def _chunk_seed(seed, chunk):
    return seed if chunk == 0 else (seed * 6_364_136_223_846_793_005 + chunk) & (2 ** 64 - 1)


def batch_gradient(model, batch, cache, train_from, k, args, grad, threads, seed):
    """Forward, loss and backward of one batch; adds its gradient to `grad`.

    With args.micro_batch_size below the batch's sentence count this is a
    GradCache step: a forward pass per chunk of sentences gives the pooled
    embeddings (each chunk's activations are overwritten by the next), the
    loss and its gradient w.r.t. every embedding come from the whole batch,
    then each chunk is run forward again (same dropout masks: same seed) and
    backward with its rows of that gradient. The gradient equals the
    one-pass step's up to float summation order; the cost is one extra
    forward pass.
    """
    encoded = model.tokenize(batch.sentences)
    ids = [e.ids for e in encoded]
    pool = np.array([model.pool_range(e) for e in encoded], dtype=np.int64)
    n = len(ids)
    size = args.micro_batch_size or n
    chunks = [(lo, min(lo + size, n)) for lo in range(0, n, size)]

    def forward(c):
        lo, hi = chunks[c]
        _, offsets = pack_ids(ids[lo:hi])
        x_in = cache.gather(batch.sentences[lo:hi], ids[lo:hi], threads)
        return model.core.train_forward(x_in, offsets, pool[lo:hi], train_from, k, threads,
                                         args.lora.dropout, _chunk_seed(seed, c))

    weights = args.loss_weights if batch.kind == "triplet" else args.pair_loss_weights
    scale = 1.0 / args.gradient_accumulation
    if len(chunks) == 1:
        pooled = forward(0)
        loss, g = combined_loss(pooled, batch, weights, args.loss_scale)
        model.core.train_backward((g * scale).astype(np.float32), grad)
    else:
        pooled = np.concatenate([forward(c) for c in range(len(chunks))])
        loss, g = combined_loss(pooled, batch, weights, args.loss_scale)
        g = (g * scale).astype(np.float32)
        for c, (lo, hi) in enumerate(chunks):
            forward(c)
            model.core.train_backward(np.ascontiguousarray(g[lo:hi]), grad)
    return loss, sum(len(x) for x in ids)


def save_trained_adapter(directory, model, layout, params, args, train_from, history, extra=None):
    """The adapter in PEFT's format, plus deelm_config.json: the attention
    setting and pooling it was trained with, so loading restores them."""
    settings = {
        "bidirectional_from": model.bidirectional_from,
        "train_from": train_from,
        "pooling": model.pooling,
        "prompt": model.prompt,
        "base_model": Path(str(model.path)).name,
        "base_model_fingerprint": model.fingerprint,
        "training": args.to_json(),
        "steps": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        **(extra or {}),
    }
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_adapter_files(tmp, layout, params, base_model_name=settings["base_model"],
                            dtype=args.adapter_dtype)
        (Path(tmp) / DEELM_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return directory

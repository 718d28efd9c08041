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
        from deelm.eval.sts import score_pairs

        return score_pairs(model, self.data)


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
    run = _Run(model, data, Path(output_dir), args or TrainingArguments(), eval_data, log)
    if resume:
        run.resume()
    model.set_adapter(run.layout, run.params)
    if run.dev is not None and not run.evals:
        run.evaluate()
    run.loop(show_progress_bar)
    return run.finish()


class _Run:
    """One training run's state: the adapter being trained, its optimiser,
    the step reached, the history and the dev evaluations."""

    def __init__(self, model, data, out, args, eval_data, log):
        L = model.num_layers
        args.check(L)
        self.model, self.args, self.out, self.log = model, args, out, log
        self.sources = _read_data(data)
        if args.max_examples is not None:
            self.sources = [d.head(args.max_examples) for d in self.sources]
        self.dev = None
        if eval_data is not None:
            if not args.eval_steps:
                raise ValueError("eval_data needs eval_steps > 0 (how often to evaluate)")
            self.dev = _DevEval(eval_data, args.eval_max_pairs, args.seed)
        elif args.eval_steps or args.early_stopping_patience:
            raise ValueError("eval_steps and early_stopping_patience need eval_data")
        self.k = model.bidirectional_from if args.bidirectional_from is None \
            else args.bidirectional_from
        model.bidirectional_from = self.k
        self.train_from = args.train_from if args.train_from is not None else max(self.k, 0)
        lora_cfg = args.lora
        if lora_cfg.layers is None:
            lora_cfg = LoraConfig(**{**asdict(lora_cfg), "layers": tuple(range(self.train_from, L))})
        layers = lora_cfg.layer_indices(L)
        if min(layers) < self.train_from:
            raise ValueError(f"LoRA on layer {min(layers)} is below train_from = "
                             f"{self.train_from}: frozen layers cannot be trained")
        self.layout = LoraLayout(lora_cfg, model.core.config)
        self.params = init_params(self.layout, args.seed)
        self.grad = np.zeros_like(self.params)
        self.threads = args.threads or model.threads
        per_epoch = len(MixedBatches(self.sources, args.batch_size, seed=args.seed, epoch=0))
        if per_epoch == 0:
            raise TrainingDataError(self.sources[0].path, "no batch could be formed from the data")
        self.total = args.max_steps or math.ceil(per_epoch * args.epochs
                                                 / args.gradient_accumulation)
        schedule = LinearWarmupDecay(int(args.warmup_ratio * self.total), self.total)
        self.opt = AdamW(self.params, lr=args.learning_rate, weight_decay=args.weight_decay,
                         schedule=schedule)
        out.mkdir(parents=True, exist_ok=True)
        # a single writer per output folder is assumed: what a killed run left
        # half-written is garbage now
        ckpt.clean_leftovers(out)
        self.step, self.history, self.evals = 0, [], []
        self.tokens = 0

    def resume(self):
        """Continues from the newest checkpoint in the output folder, if any."""
        latest = ckpt.latest_checkpoint(self.out)
        if latest is None:
            return
        c = ckpt.load_checkpoint(latest, self.model.core.config)
        if not c.layout.same_as(self.layout):
            raise ValueError(f"{latest} was made with another LoRA layout ({c.layout!r}); use a "
                             f"new output directory or resume=False")
        self.params[:] = c.params
        self.opt.load_state_dict(c.optimizer_state)
        self.step, self.history = c.step, list(c.extra.get("history", []))
        self.evals = list(c.extra.get("evals", []))

    def save_adapter(self, directory, extra=None):
        return save_trained_adapter(directory, self.model, self.layout, self.params, self.args,
                                    self.train_from, self.history, extra)

    def evaluate(self):
        """Scores the model now; True when training should stop early."""
        score = self.dev.score(self.model)
        best = max((e["score"] for e in self.evals), default=-math.inf)
        self.evals.append({"step": self.step, "score": score})
        if self.log:
            self.log({"step": self.step, "dev_score": score})
        if score > best:
            self.save_adapter(self.out / "best_adapter",
                              {"best_step": self.step, "dev_score": score,
                               "dev_data": str(self.dev.data.path)})
        if not self.args.early_stopping_patience:
            return False
        stale = len(self.evals) - 1 - _last_gain(self.evals, self.args.early_stopping_threshold)
        return stale >= self.args.early_stopping_patience

    def batches(self):
        """The batches from where the run stands, epoch after epoch: those a
        resumed run's finished steps consumed are skipped."""
        skip = self.step * self.args.gradient_accumulation
        for epoch in range(10 ** 9):
            for _, batch in MixedBatches(self.sources, self.args.batch_size, seed=self.args.seed,
                                         epoch=epoch):
                if skip:
                    skip -= 1
                    continue
                yield batch

    def loop(self, show_progress_bar):
        from tqdm.auto import tqdm

        args, acc = self.args, self.args.gradient_accumulation
        cache = FrozenCache(self.model, self.train_from, self.k, args.cache_bytes)
        bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step",
                   disable=not show_progress_bar)
        self.t_start, micro = time.perf_counter(), 0
        step_loss, step_tokens, t_step = 0.0, 0, time.perf_counter()
        try:
            if self.step >= self.total:
                return
            for batch in self.batches():
                # dropout masks depend on (seed, step, batch within the step) only, so a
                # resumed run draws what the uninterrupted one would have
                loss, n_tok = batch_gradient(self.model, batch, cache, self.train_from, self.k,
                                             args, self.grad, self.threads,
                                             seed=_mask_seed(args.seed, self.step, micro % acc))
                micro += 1
                step_loss += loss / acc
                step_tokens += n_tok
                if micro % acc:
                    continue
                stop = self.optimizer_step(step_loss, step_tokens, t_step, bar)
                step_loss, step_tokens, t_step = 0.0, 0, time.perf_counter()
                if stop or self.step >= self.total:
                    break
        finally:
            bar.close()

    def optimizer_step(self, step_loss, step_tokens, t_step, bar):
        """Clips, steps AdamW, records, evaluates and checkpoints; True to stop early."""
        args = self.args
        norm = clip_grad_norm(self.grad, args.max_grad_norm)
        if not math.isfinite(norm):
            raise FloatingPointError(f"step {self.step + 1}: the gradient is not finite "
                                     f"(loss {step_loss}); lower the learning rate")
        lr = self.opt.step(self.grad)
        self.grad[:] = 0.0
        self.step += 1
        now = time.perf_counter()
        self.history.append({"step": self.step, "loss": step_loss, "lr": lr, "grad_norm": norm,
                             "tokens": step_tokens, "seconds": now - t_step})
        self.tokens += step_tokens
        bar.set_postfix(loss=f"{step_loss:.4f}",
                        tok_s=f"{step_tokens / max(now - t_step, 1e-9):.0f}")
        bar.update(1)
        if self.log:
            self.log(self.history[-1])
        stop = self.dev is not None and self.step % args.eval_steps == 0 and self.evaluate()
        if args.save_steps and self.step % args.save_steps == 0 and self.step < self.total \
                and not stop:
            ckpt.save_checkpoint(ckpt.checkpoint_path(self.out, self.step), self.step,
                                 self.layout, self.params, self.opt.state_dict(),
                                 extra={"history": self.history, "evals": self.evals})
            ckpt.remove_old_checkpoints(self.out, args.keep_checkpoints)
        return stop

    def finish(self):
        """The final evaluation and adapters; the model keeps the one handed over."""
        if self.dev is not None and self.evals[-1]["step"] != self.step:
            self.evaluate()
        seconds = time.perf_counter() - self.t_start
        if self.dev is None:
            adapter = self.save_adapter(self.out / "adapter")
            best_step = best_score = None
        else:
            self.save_adapter(self.out / "last_adapter")
            best = self.evals[_best_eval(self.evals)]
            best_step, best_score = best["step"], best["score"]
            adapter = _publish_best(self.out)
            self.model.load_adapter(adapter)
        return TrainResult(adapter, self.step, seconds, self.tokens, self.history, self.evals,
                           best_step, best_score)


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

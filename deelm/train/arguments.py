"""TrainingArguments: every training setting, its default, its check and its CLI flag.

Each field's metadata carries the flag's help (and its name when it is not
the field's): `add_cli_flags` builds `deelm train`'s flags from the fields,
and `from_cli` builds the dataclass back from parsed flags, so a default is
written once, here. Dict fields (the loss weights) get one flag per key; the
LoRA configuration gets --lora-r, --lora-alpha, --lora-dropout and
--lora-modules. `bidirectional_from` and `threads` are model settings: the
CLI shares them with the other commands and passes the model's values.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from deelm.adapters.lora import MODULES, LoraConfig
from deelm.train.losses import DEFAULT_WEIGHTS, LOSS_NAMES

PAIR_LOSS_NAMES = ("cosent", "angle")  # scored pairs have no in-batch positives
ADAPTER_DTYPES = ("float32", "float16")


def _opt(help, **cli):
    """Field metadata: the CLI flag's help text, and optionally `flag` (its
    name), `keys` (dict fields: key -> flag), `choices`."""
    return {"help": help, **cli}


@dataclass
class TrainingArguments:
    """How to train. Defaults follow common LoRA practice for sentence
    embeddings (AnglE / BeLLM recipes scaled down to a CPU)."""

    bidirectional_from: int | None = field(default=None, metadata=_opt(
        "None: the model's current setting", flag=None))
    train_from: int | None = field(default=None, metadata=_opt(
        "first trained layer; lower ones are frozen and cached (default: --bidirectional-from, "
        "0 when causal)"))
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=8, alpha=16, dropout=0.05),
                             metadata=_opt("LoRA rank, alpha, dropout and modules", flag="lora"))
    loss_weights: dict = field(default_factory=lambda: dict(DEFAULT_WEIGHTS), metadata=_opt(
        "losses of triplet batches", keys={
            "contrastive": ("--contrastive-weight",
                            "in-batch negatives + hard negative loss (InfoNCE)"),
            "reverse_contrastive": ("--reverse-contrastive-weight",
                                    "InfoNCE from each positive to the batch's anchors (with "
                                    "--contrastive-weight: the symmetric loss)"),
            "cosent": ("--cosent-weight", "CoSENT on triplet batches"),
            "angle": ("--angle-weight", "AnglE on triplet batches")}))
    loss_scale: float = field(default=20.0, metadata=_opt("inverse temperature of the losses"))
    learning_rate: float = field(default=2e-4, metadata=_opt("peak learning rate", flag="--lr"))
    weight_decay: float = field(default=0.0, metadata=_opt("AdamW's decoupled weight decay"))
    warmup_ratio: float = field(default=0.1, metadata=_opt(
        "share of the steps with a linear warm-up; the rest decays linearly to 0"))
    batch_size: int = field(default=32, metadata=_opt(
        "examples (triplets or pairs) per in-batch loss"))
    gradient_accumulation: int = field(default=1, metadata=_opt("batches per optimiser step"))
    epochs: int = field(default=1, metadata=_opt("passes over the data"))
    max_steps: int | None = field(default=None, metadata=_opt(
        "optimiser steps; overrides --epochs when set"))
    max_examples: int | None = field(default=None, metadata=_opt(
        "train on the first N examples of each kind of --data only"))
    max_grad_norm: float = field(default=1.0, metadata=_opt("gradient clipping (L2 norm)"))
    seed: int = field(default=0, metadata=_opt("shuffling, LoRA initialisation and dropout"))
    save_steps: int = field(default=0, metadata=_opt(
        "checkpoint every N steps (0: only the final adapter)"))
    keep_checkpoints: int = field(default=2, metadata=_opt("newest checkpoints kept"))
    cache_bytes: int = field(default=2 << 30, metadata=_opt(
        "cap on the frozen layers' output cache, in bytes"))
    adapter_dtype: str = field(default="float32", metadata=_opt(
        "dtype of the final adapter file (float16 halves it)", choices=ADAPTER_DTYPES))
    threads: int | None = field(default=None, metadata=_opt("the model's threads", flag=None))
    pair_loss_weights: dict = field(default_factory=lambda: {"cosent": 1.0, "angle": 0.0}, metadata=_opt(
        "losses of scored-pair batches", keys={
            "cosent": ("--pair-cosent-weight", "CoSENT on scored-pair batches"),
            "angle": ("--pair-angle-weight", "AnglE on scored-pair batches")}))
    micro_batch_size: int | None = field(default=None, metadata=_opt(
        "GradCache: sentences per forward/backward pass, so a large --batch-size fits in "
        "memory (the same gradient, one extra forward pass); default: the whole batch"))
    eval_steps: int = field(default=0, metadata=_opt(
        "score --eval-data every N steps (and at the start); adapter/ is then the best one"))
    eval_max_pairs: int | None = field(default=None, metadata=_opt(
        "score a seeded sample of this many pairs"))
    early_stopping_patience: int | None = field(default=None, metadata=_opt(
        "stop after N evaluations without a gain"))
    early_stopping_threshold: float = field(default=0.0, metadata=_opt(
        "the gain that counts (Spearman x 100 points)"))

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
        for name in ("max_steps", "max_examples", "micro_batch_size", "eval_max_pairs",
                     "early_stopping_patience"):
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
        pw = self.pair_loss_weights
        if (set(pw) - set(PAIR_LOSS_NAMES) or not any(w > 0 for w in pw.values())
                or any(not math.isfinite(w) or w < 0 for w in pw.values())):
            raise ValueError("pair_loss_weights must weigh cosent and/or angle (scored pairs have "
                             f"no in-batch positives for the contrastive loss), got {pw}")
        if isinstance(self.eval_steps, bool) or not isinstance(self.eval_steps, int) \
                or self.eval_steps < 0:
            raise ValueError(f"eval_steps must be an int >= 0, got {self.eval_steps!r}")
        if not (math.isfinite(self.early_stopping_threshold) and self.early_stopping_threshold >= 0):
            raise ValueError("early_stopping_threshold must be finite and >= 0")

    def to_json(self):
        d = asdict(self)
        d["lora"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.lora).items()}
        return d


# --------------------------------------------------------------------- the CLI

_NUMBER_TYPES = {"int": int, "float": float, "str": str}


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default


def _scalar_type(f):
    """int / float / str from the annotation ("int | None" -> int)."""
    return _NUMBER_TYPES[str(f.type).split("|")[0].strip()]


def _cli_fields():
    """(field, flag) of every field the CLI sets; flag "lora" stands for the
    LoRA flags, and dict fields name their per-key flags in metadata."""
    for f in fields(TrainingArguments):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        if flag is not None:
            yield f, flag


def _lora_flags(group, default):
    group.add_argument("--lora-r", type=int, default=default.r, help="LoRA rank")
    group.add_argument("--lora-alpha", type=float, default=float(default.alpha),
                       help="LoRA scale numerator (scale = alpha / r)")
    group.add_argument("--lora-dropout", type=float, default=default.dropout,
                       help="dropout on the LoRA path's input")
    group.add_argument("--lora-modules", nargs="+", default=None, choices=MODULES,
                       metavar="MODULE", help=f"{' '.join(MODULES)} (default: all)")


def add_cli_flags(parser):
    """`deelm train`'s flags, one per TrainingArguments field (per key for
    the loss weights), with the dataclass's defaults."""
    group = parser.add_argument_group("training (TrainingArguments)")
    for f, flag in _cli_fields():
        meta = f.metadata
        if flag == "lora":
            _lora_flags(group, _default(f))
        elif "keys" in meta:
            defaults = _default(f)
            for key, (key_flag, key_help) in meta["keys"].items():
                group.add_argument(key_flag, type=float, default=defaults.get(key, 0.0),
                                   help=key_help)
        else:
            group.add_argument(flag, dest=f.name, type=_scalar_type(f), default=_default(f),
                               choices=meta.get("choices"), help=meta["help"])
    return group


def from_cli(args, **model_settings):
    """The TrainingArguments of parsed `add_cli_flags` flags; `model_settings`
    fills the fields the CLI shares with the model (bidirectional_from, threads)."""
    values = dict(model_settings)
    for f, flag in _cli_fields():
        meta = f.metadata
        if flag == "lora":
            targets = tuple(args.lora_modules) if args.lora_modules else MODULES
            values["lora"] = LoraConfig(r=args.lora_r, alpha=args.lora_alpha,
                                        dropout=args.lora_dropout, target_modules=targets)
        elif "keys" in meta:
            values[f.name] = {key: getattr(args, key_flag[2:].replace("-", "_"))
                              for key, (key_flag, _) in meta["keys"].items()}
        else:
            values[f.name] = getattr(args, f.name)
    return TrainingArguments(**values)

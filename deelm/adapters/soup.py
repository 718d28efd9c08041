"""Model soups of LoRA adapters: one adapter whose weights are the average of several.

Adapters fine-tuned from the same base model with the same settings (other
seeds, other data orders) can be averaged in weight space, which often scores
better than any one of them at the cost of none at inference time beyond a
larger rank (Wortsman et al. 2022, "Model soups"). LoRA factors cannot be
averaged factor by factor (``(B0 + B1)(A0 + A1) / 4`` is not
``(B0 A0 + B1 A1) / 2``), but a weighted sum of LoRA updates is itself a LoRA
update, of rank ``sum r_i``:

    sum_i w_i * s_i * B_i @ A_i  =  [w_0 s_0 B_0 | w_1 s_1 B_1 | ...] @ [A_0; A_1; ...]

(``s_i`` each adapter's scale, alpha / r). So a soup is exact, is written in
PEFT's format with scale 1 (``lora_alpha = r``), and loads wherever an adapter
does. :func:`soup_adapters` works on the files alone; :func:`greedy_soup`
scores candidates with a model on held-out pairs (STS-B dev) and keeps a
member only if it does not lower the score, the greedy recipe of the paper.
"""
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deelm.adapters.lora import MODULE_IDS, PREFIX_MODEL, LoraConfig, _SUBLAYER
from deelm.adapters.peft import (CONFIG_FILE, DEELM_CONFIG_FILE, _config_from_file, _parse_keys, _read_config, _write_json, _write_tensors, WEIGHTS_FILE, peft_config_dict, read_adapter_tensors, read_deelm_config)
from deelm.errors import AdapterError
from deelm.io.atomic import atomic_directory

# deelm_config.json settings every member must share: how the soup embeds
SHARED_SETTINGS = ("bidirectional_from", "pooling", "prompt", "base_model_fingerprint")


@dataclass
class _Member:
    path: Path
    config: object  # LoraConfig
    entries: dict  # (layer, module) -> {"A": [r, in], "B": [out, r]}
    settings: dict  # deelm_config.json, {} for PEFT-made adapters


def _read_member(directory):
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(directory, "no such adapter directory")
    cfg_path = directory / CONFIG_FILE
    cfg = _read_config(cfg_path)
    weights_path, tensors = read_adapter_tensors(directory)
    entries = _parse_keys(weights_path, tensors)
    # the files alone say nothing of the model's depth: validate against the deepest layer held
    config = _config_from_file(cfg_path, cfg, entries, max(l for l, _ in entries) + 1)
    for (layer, module), e in entries.items():
        a, b = np.asarray(e["A"], np.float32), np.asarray(e["B"], np.float32)
        rank, _ = config.rank_alpha(layer, module)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterError(weights_path, f"{e['key']}: A {list(a.shape)} and B "
                               f"{list(b.shape)} do not make a rank-{rank} LoRA")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AdapterError(weights_path, f"{e['key']} has non-finite values")
        e["A"], e["B"] = a, b
    return _Member(directory, config, entries, read_deelm_config(directory))


def _check_members(members):
    """The members must embed the same way and cover the same matrices."""
    first = members[0]
    for m in members[1:]:
        for key in SHARED_SETTINGS:
            if m.settings.get(key) != first.settings.get(key):
                raise AdapterError(m.path, f"{key} is {m.settings.get(key)!r} in its "
                                   f"{DEELM_CONFIG_FILE} but {first.settings.get(key)!r} in "
                                   f"{first.path}: a soup's members must share "
                                   f"{', '.join(SHARED_SETTINGS)}")
        if set(m.entries) != set(first.entries):
            raise AdapterError(m.path, f"adapts other layers or modules than {first.path}: a "
                               "soup's members must adapt the same matrices")
        for lm, e in m.entries.items():
            f = first.entries[lm]
            if e["A"].shape[1] != f["A"].shape[1] or e["B"].shape[0] != f["B"].shape[0]:
                raise AdapterError(m.path, f"{e['key']} is {e['A'].shape[1]} -> "
                                   f"{e['B'].shape[0]}, {f['A'].shape[1]} -> {f['B'].shape[0]} in "
                                   f"{first.path}: not the same base model")


def _weights(weights, n):
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != n or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers, not all zero, got {weights!r}")
    return w / w.sum()


def _pattern_key(layer, module):
    return re.escape(f"layers.{layer}.{_SUBLAYER[module]}.{module}")


def _truncate(a, b, rank):
    """The best rank-`rank` factors of B @ A (truncated SVD, Eckart-Young), and
    the share of its squared Frobenius norm they keep. Through two QR
    decompositions the SVD is of a k x k matrix, never of the [out, in] update."""
    qb, rb = np.linalg.qr(b.astype(np.float64))  # B = Qb Rb, Qb [out, k]
    qa, ra = np.linalg.qr(a.T.astype(np.float64))  # A^T = Qa Ra, Qa [in, k]
    u, s, vt = np.linalg.svd(rb @ ra.T)  # B A = Qb (U S V^T) Qa^T
    root = np.sqrt(s[:rank])
    total = float(np.sum(s ** 2))
    kept = float(np.sum(s[:rank] ** 2)) / total if total > 0 else 1.0
    return ((root[:, None] * vt[:rank]) @ qa.T).astype(np.float32), \
        ((qb @ u[:, :rank]) * root).astype(np.float32), kept


def _soup_files(members, w, rank=None):
    """(LoraConfig, PEFT tensors, least share of an update's squared norm
    kept) of the weighted soup, compressed to `rank` if given."""
    tensors, ranks, least_kept = {}, {}, 1.0
    for (layer, module) in sorted(members[0].entries, key=lambda lm: (lm[0], MODULE_IDS[lm[1]])):
        a_parts, b_parts = [], []
        for m, wi in zip(members, w):
            e = m.entries[(layer, module)]
            r_i, alpha_i = m.config.rank_alpha(layer, module)
            a_parts.append(e["A"])
            b_parts.append(e["B"] * np.float32(wi * m.config.scale(r_i, alpha_i)))
        a, b = np.concatenate(a_parts, axis=0), np.concatenate(b_parts, axis=1)
        if rank is not None and a.shape[0] > rank:
            a, b, kept = _truncate(a, b, rank)
            least_kept = min(least_kept, kept)
        stem = f"{PREFIX_MODEL}{layer}.{_SUBLAYER[module]}.{module}"
        tensors[stem + ".lora_A.weight"] = np.ascontiguousarray(a)
        tensors[stem + ".lora_B.weight"] = np.ascontiguousarray(b)
        ranks[(layer, module)] = a.shape[0]
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    # scale 1 everywhere: alpha = rank, pattern entries only where the rank differs from r
    odd = {_pattern_key(l, m): k for (l, m), k in ranks.items() if k != r}
    base = members[0].config
    config = LoraConfig(r=r, alpha=r, dropout=base.dropout, target_modules=base.target_modules,
                        layers=base.layers, rank_pattern=odd, alpha_pattern=dict(odd))
    return config, tensors, least_kept


def _settings(members, w, extra):
    first = members[0].settings
    out = {key: first.get(key) for key in SHARED_SETTINGS if key in first}
    if "base_model" in first:
        out["base_model"] = first["base_model"]
    # the recipe the members share (everything but what differs, typically the seed)
    trainings = [m.settings.get("training") for m in members]
    if all(isinstance(t, dict) for t in trainings):
        out["training"] = {k: v for k, v in trainings[0].items()
                           if all(k in t and t[k] == v for t in trainings)}
    data = [m.settings.get("training_data") for m in members]
    if data[0] is not None and all(d == data[0] for d in data):
        out["training_data"] = data[0]
    out["soup"] = [{"adapter": str(m.path), "weight": float(wi),
                    "seed": (m.settings.get("training") or {}).get("seed"),
                    "dev_score": m.settings.get("dev_score")}
                   for m, wi in zip(members, w)]
    out.update(extra or {})
    return out


def _check_rank(rank):
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
                             or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")


def _write_soup(directory, members, w, dtype, extra, rank=None):
    if dtype not in ("float32", "float16"):
        raise ValueError(f"adapter dtype must be 'float32' or 'float16', got {dtype!r}")
    config, tensors, kept = _soup_files(members, w, rank)
    settings = _settings(members, w, extra)
    if rank is not None:
        settings.update(soup_rank=int(rank), soup_least_norm_kept=kept)
    directory = Path(directory)
    if dtype == "float16":
        big = max(float(np.abs(v).max()) for v in tensors.values())
        if big > float(np.finfo(np.float16).max):
            raise ValueError(f"the soup holds values up to {big:.3g}, beyond float16's range: "
                             "write it as float32")
    with atomic_directory(directory) as tmp:
        _write_tensors(Path(tmp) / WEIGHTS_FILE, {k: v.astype(dtype) for k, v in tensors.items()})
        _write_json(Path(tmp) / CONFIG_FILE,
                    peft_config_dict(config, base_model_name=settings.get("base_model")))
        (Path(tmp) / DEELM_CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    return directory


def _read_members(adapters):
    if isinstance(adapters, (str, Path)) or not adapters:
        raise ValueError("a soup needs a list of one or more adapter folders")
    members = [_read_member(a) for a in adapters]
    _check_members(members)
    return members


def soup_adapters(adapters, output, weights=None, dtype="float32", rank=None):
    """Writes the weight-space average of `adapters` (LoRA adapter folders
    trained on one base model with the same settings) to `output` as one
    adapter. `weights` (default uniform) are normalised to sum to 1. The
    soup's rank is the members' summed rank; `rank` compresses each update to
    its best rank-`rank` approximation (truncated SVD; exact when the update
    has no higher rank), which shrinks the file and the inference cost. The
    members' shared settings (attention, pooling, prompt, base model) go to
    its deelm_config.json, with each member's path, weight, seed and dev
    score. Returns the output path."""
    _check_rank(rank)
    members = _read_members(adapters)
    return _write_soup(output, members, _weights(weights, len(members)), dtype,
                       {"soup_method": "uniform" if weights is None else "weighted"}, rank)


@dataclass
class GreedySoup:
    """What greedy_soup chose: every candidate's own score, the members kept
    and the soup's score on the same pairs."""
    path: Path
    members: list
    dev_score: float
    candidate_scores: dict = field(default_factory=dict)  # adapter -> its own score
    tried: list = field(default_factory=list)  # (members tried, score), in order


def greedy_soup(model, adapters, eval_data, output, dtype="float32", log=None, rank=None):
    """The greedy soup of Wortsman et al.: score every adapter on `eval_data`
    (scored pairs, e.g. STS-B dev, never a test set), then, from the best
    down, add each to the soup if the uniform soup of the kept ones scores at
    least as well. `model` is a DeeLM on the adapters' base model; it embeds
    with their shared settings while scoring and gets its own adapter and
    settings back afterwards (so no other thread should use it meanwhile).
    Writes the chosen soup to `output`, in `dtype` and compressed to `rank`
    as in soup_adapters; every candidate soup is scored as written, so
    `dev_score` is the written file's."""
    from deelm.eval.sts import STSData, load_sts_file, score_pairs

    _check_rank(rank)
    members = _read_members(adapters)
    data = eval_data if isinstance(eval_data, STSData) else load_sts_file(eval_data)
    say = log or (lambda msg: None)
    saved = (model.adapter, model.adapter_path, model.bidirectional_from, model.pooling,
             model.prompt)
    shared = members[0].settings
    try:
        if "bidirectional_from" in shared:
            model.bidirectional_from = shared["bidirectional_from"]
        if "pooling" in shared:
            model.pooling = shared["pooling"]
        if "prompt" in shared:
            model.prompt = shared["prompt"]
        own = {}
        for m in members:
            model.load_adapter(m.path)
            own[str(m.path)] = score_pairs(model, data)
            say(f"{m.path}: {own[str(m.path)]:.2f}")
        order = sorted(members, key=lambda m: -own[str(m.path)])
        with tempfile.TemporaryDirectory(prefix="deelm-soup-") as tmp:
            def score_as_written(trial):
                _write_soup(Path(tmp) / "trial", trial, _weights(None, len(trial)), dtype, {},
                            rank)
                model.load_adapter(Path(tmp) / "trial")
                return score_pairs(model, data)

            kept = [order[0]]
            # a lone member is written unchanged only in float32 at full rank
            best = own[str(order[0].path)] if dtype == "float32" and rank is None \
                else score_as_written(kept)
            tried = [([str(order[0].path)], best)]
            for m in order[1:]:
                trial = kept + [m]
                score = score_as_written(trial)
                tried.append(([str(t.path) for t in trial], score))
                say(f"soup of {len(trial)} (+ {m.path}): {score:.2f} "
                    f"({'kept' if score >= best else 'dropped'})")
                if score >= best:
                    kept, best = trial, score
    finally:
        layout_params, path, k, pooling, prompt = saved
        model.remove_adapter()
        if path is not None:
            model.load_adapter(path)
        elif layout_params is not None:
            model.set_adapter(*layout_params)
        model.bidirectional_from, model.pooling, model.prompt = k, pooling, prompt
    out = _write_soup(output, kept, _weights(None, len(kept)), dtype,
                      {"soup_method": "greedy", "dev_score": best,
                       "dev_data": str(data.path), "candidate_dev_scores": own}, rank)
    return GreedySoup(out, [str(m.path) for m in kept], best, own, tried)

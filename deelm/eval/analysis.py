"""Layer analyses of the DeeLM method: the turning point and a backward-dependency probe.

Layer-output indices
--------------------
A model with L transformer layers (0-based indices 0..L-1) has L+1 *layer
outputs*, indexed l = 0..L: output 0 is the embedding (before any layer),
output l >= 1 is the residual state after transformer layer l-1. This is the
indexing of ``encode(output_value="layer_embeddings")`` ([n, L+1, d]) and of
``forward_ids(..., hidden=True)`` ([L+1, N, d]). ``bidirectional_from = k``
uses the *layer* index: layers k..L-1 attend in both directions, so their
outputs, l = k+1..L, are the ones that change; outputs 0..k do not.

1. Turning point (the DeeLM paper's discovery step). :func:`layer_sts` scores
   every layer output of the (by default causal) model on an STS split in one
   forward pass per batch; :func:`turning_point` turns that curve into k;
   :func:`degradation_curve` measures, for every k, what making layers >= k
   bidirectional (untrained) does to the final embedding.
2. Backward dependency. :func:`backward_dependency` measures how much the
   state of token i at each layer changes when the tokens after i are
   replaced: exactly zero under causal attention, and the amount of "looking
   ahead" the bidirectional layers do otherwise.

Report writers produce JSON (all numbers), Markdown and, when matplotlib is
installed, a PNG plot.
"""
import copy
import json
import os
from pathlib import Path

import numpy as np

from deelm.eval import sts as ev
from deelm.settings import K_RULES

TURNING_POINT_RULE = (
    "the curve's layer outputs are l = 0..L (0 = embedding output, l >= 1 = output of transformer "
    "layer l-1); transformer layer j (0-based) changes the score by c[j+1] - c[j]. The turning "
    "point k is the layer j in the upper half (j >= L // 2) whose output drops the score the "
    "most, the earliest on ties; layers >= k are made bidirectional. If no layer in the upper "
    "half lowers the score, k = L-1 (the paper's default: only the last layer bidirectional). "
    "The peak (the best layer output, earliest on ties) is reported alongside.")


# ---- data ---------------------------------------------------------------------

def load_pairs(task="STSBenchmark", split="dev", data_dir=None, max_pairs=None, seed=0):
    """An STS split as evaluation.STSData, optionally cut to `max_pairs` pairs.

    The subset is a seeded random sample (kept in file order), not the first
    pairs: STS files are ordered by source, so a prefix would be one genre.
    The same (max_pairs, seed) always selects the same pairs.
    """
    path = ev.task_file(ev.resolve_data_dir(data_dir), task, "mteb", split)
    return sample_pairs(ev.load_sts_file(path, task), max_pairs, seed)


def sample_pairs(data, max_pairs=None, seed=0):
    """`max_pairs` pairs of an evaluation.STSData as a seeded random sample
    kept in file order (all of them when None or more than there are)."""
    if max_pairs is None:
        return data
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer)) or max_pairs < 2:
        raise ValueError(f"max_pairs must be an int >= 2 or None, got {max_pairs!r}")
    n = len(data.scores)
    if max_pairs >= n:
        return data
    keep = np.sort(np.random.default_rng(seed).choice(n, size=int(max_pairs), replace=False))
    return ev.STSData(data.task, data.path, [data.sentence1[i] for i in keep],
                      [data.sentence2[i] for i in keep], data.scores[keep])


def _with_k(model, k):
    """A shallow copy of `model` with another bidirectional_from (shares the
    weights; the caller's model is left untouched)."""
    if k is None or k == model.bidirectional_from:
        return model
    m = copy.copy(model)
    m.bidirectional_from = k
    return m


# ---- 1. turning point ---------------------------------------------------------------

def layer_sts(model, task="STSBenchmark", split="dev", data_dir=None, max_pairs=None,
              batch_size=32, bidirectional_from=-1, seed=0, show_progress_bar=False, data=None):
    """Cosine Spearman of every layer output on an STS split: a list of L+1
    floats in [-1, 1], entry l for layer output l (0 = embedding output,
    l >= 1 = after transformer layer l-1; final norm applied to each, pooled
    with the model's pooling and prompt).

    Each unique sentence is encoded once with output_value="layer_embeddings":
    one forward pass gives all layers. bidirectional_from: attention used
    while measuring; -1 (default) is the causal model, which is what the
    turning-point analysis looks at; None uses the model's own setting.
    max_pairs / seed: see load_pairs. data: an evaluation.STSData to use
    instead of loading task/split.
    """
    if data is None:
        data = load_pairs(task, split, data_dir, max_pairs, seed)
    m = _with_k(model, bidirectional_from)
    n = len(data.scores)
    emb, idx = ev.encode_unique(m, data.sentence1 + data.sentence2, batch_size=batch_size,
                                show_progress_bar=show_progress_bar,
                                output_value="layer_embeddings")
    i1, i2 = idx[:n], idx[n:]
    return [ev.sts_scores(emb[i1, l], emb[i2, l], data.scores)["cosine_spearman"]
            for l in range(emb.shape[1])]


def turning_point(curve):
    """(k, peak_layer) from a per-layer-output STS curve of length L+1.

    Indexing: curve[l] belongs to layer output l, where l = 0 is the embedding
    output and l >= 1 the state after transformer layer l-1 (0-based), so
    transformer layer j moves the score from curve[j] to curve[j+1].

    Rule (the paper's "rises, peaks, then drops sharply near the top"): k is
    the layer j >= L // 2 with the largest drop curve[j] - curve[j+1]
    (earliest on ties, NaN ignored); layers >= k become bidirectional. If no
    layer of the upper half lowers the score, k = L-1, the paper's default of
    only the last layer bidirectional (its choice for LLaMA-2-7B, k = 31 of
    32). The peak is the best layer output (earliest on ties). Taking the
    argmax as the turning point instead is unstable on curves with a long
    plateau: SmolLM2-135M's STS-B dev curve varies by 2 points over outputs
    5-16 and then falls by 7.75 at its last layer.
    """
    c = np.asarray(curve, dtype=np.float64)
    if c.ndim != 1 or c.size < 2:
        raise ValueError(f"a layer curve needs L+1 >= 2 entries, got shape {c.shape}")
    if np.isnan(c).all():
        raise ValueError("the layer curve is all NaN")
    peak = int(np.nanargmax(c))  # first occurrence of the maximum
    L = c.size - 1
    lo = L // 2
    drops = c[lo:-1] - c[lo + 1:]  # drops[i]: what layer lo + i does to the score
    if np.isnan(drops).all() or np.nanmax(drops) <= 0:
        return L - 1, peak
    return lo + int(np.nanargmax(drops)), peak


def _cache_path():
    base = os.environ.get("DEELM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deelm")
    return Path(base) / "turning_points.json"


def _file_identity(path):
    """path:size:mtime; for a Hugging Face model directory, that of each of
    its files (a weight file changed in place leaves the folder's own mtime)."""
    path = Path(path)
    if path.is_dir():
        return ",".join(_file_identity(p) for p in sorted(path.iterdir()) if p.is_file())
    st = os.stat(path)
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


# Names bidirectional_from accepts for a measured choice of k. "auto" is the
# degradation rule: on both packaged models it picks the k that also trains
# best (docs/training.md), where the paper's turning point picks far too few
# bidirectional layers (Gemma-3-270M: 17 against 4).
DEGRADATION_RULE = (
    "k is the setting j in {-1 (causal), 0, ..., L-1} whose untrained model (layers >= j "
    "bidirectional, the model's pooling and prompt) scores best on the dev pairs: the argmax of "
    "the degradation curve, the earliest j on ties.")
DEGRADATION_PAIRS = 500  # a seeded sample of STS-B dev: L+1 encodes of it stay affordable


def degradation_k(curve):
    """The best j of a degradation curve {j: score} (the earliest on ties, NaN ignored)."""
    scored = {j: v for j, v in curve.items() if v == v}
    if not scored:
        raise ValueError("the degradation curve is all NaN")
    return min(scored, key=lambda j: (-scored[j], j))


def auto_bidirectional_from(model, rule="auto", use_cache=True, **kw):
    """k for `model` measured on STS Benchmark dev by `rule`:

    * "auto" / "degradation": the argmax of the untrained degradation curve
      (see degradation_curve; DEGRADATION_RULE), on a seeded sample of
      DEGRADATION_PAIRS dev pairs unless kw gives max_pairs;
    * "turning_point": the paper's rule on the causal model's layer curve
      (layer_sts(model, **kw), see turning_point).

    Measuring takes minutes, so the result is cached in
    $DEELM_CACHE_DIR/turning_points.json (default ~/.cache/deelm), keyed by
    the rule, the model file and data file (path, size, mtime) and every
    setting that changes the curve; use_cache=False measures again."""
    if rule not in K_RULES:
        raise ValueError(f"rule must be one of {K_RULES}, got {rule!r}")
    rule = "degradation" if rule == "auto" else rule
    if rule == "degradation":
        kw.setdefault("max_pairs", DEGRADATION_PAIRS)
    task, split = kw.get("task", "STSBenchmark"), kw.get("split", "dev")
    data_file = ev.task_file(ev.resolve_data_dir(kw.get("data_dir")), task, "mteb", split)
    key = "|".join(str(x) for x in (
        _file_identity(model.path), _file_identity(data_file), kw.get("max_pairs"), kw.get("seed", 0),
        kw.get("bidirectional_from", -1), model.pooling, model.prompt, model.max_seq_length)) + \
        ("" if rule == "turning_point" else f"|{rule}")
    cache = _cache_path()
    entries = {}
    if use_cache and cache.is_file():
        try:
            entries = json.loads(cache.read_text())
        except (OSError, ValueError):
            entries = {}  # an unreadable cache is only a cache: measure again
        if key in entries:
            return int(entries[key]["k"])
    if rule == "turning_point":
        curve = layer_sts(model, **kw)
        k = turning_point(curve)[0]
        entry = {"k": k, "curve": curve, "rule": TURNING_POINT_RULE}
    else:
        curve = degradation_curve(model, **{n: v for n, v in kw.items() if n != "bidirectional_from"})
        k = degradation_k(curve)
        entry = {"k": k, "degradation": {str(j): v for j, v in curve.items()},
                 "rule": DEGRADATION_RULE}
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            entries[key] = entry
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, indent=1))
            tmp.replace(cache)
        except OSError:
            pass  # read-only home: still correct, just not cached
    return k


def degradation_curve(model, js=None, task="STSBenchmark", split="dev", data_dir=None,
                      max_pairs=None, batch_size=32, seed=0, show_progress_bar=False, data=None):
    """{j: cosine Spearman of the final embedding (the model's pooling) when
    layers >= j are bidirectional, untrained}.

    js: the settings to measure; default -1 (causal) then 0..L-1. Unlike
    layer_sts this needs one full encode of the data per j (L+1 encodes in
    all), so pass max_pairs (the CLI uses 500 pairs by default) to keep it
    affordable; with the same max_pairs and seed, layer_sts sees the same
    pairs. The model itself is not modified.
    """
    if data is None:
        data = load_pairs(task, split, data_dir, max_pairs, seed)
    if js is None:
        js = [-1] + list(range(model.num_layers))
    n = len(data.scores)
    out = {}
    for j in js:
        m = _with_k(model, int(j))
        emb, idx = ev.encode_unique(m, data.sentence1 + data.sentence2, batch_size=batch_size,
                                    show_progress_bar=show_progress_bar)
        out[int(j)] = ev.sts_scores(emb[idx[:n]], emb[idx[n:]], data.scores)["cosine_spearman"]
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no PNG plot (pip install matplotlib)")
        return None
    return plt


def _fmt(x, scale=100.0, digits=2):
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    return f"{scale * x:.{digits}f}"


def turning_point_table(curve):
    """Markdown table: STS x100 of every layer output l (peak marked)."""
    _, peak = turning_point(curve)
    rows = ["| output l | state after | STS x100 |", "|---:|---|---:|"]
    for l, s in enumerate(curve):
        after = "embedding" if l == 0 else f"layer {l - 1}"
        rows.append(f"| {l} | {after}{' (peak)' if l == peak else ''} | {_fmt(s)} |")
    return "\n".join(rows)


def degradation_table(degradation, k=None):
    """Markdown table: final-output STS x100 for each bidirectional_from j."""
    rows = ["| bidirectional_from j | bidirectional layers | final STS x100 |", "|---:|---|---:|"]
    for j, s in sorted(degradation.items()):
        what = "none (causal)" if j == -1 else f">= {j}"
        rows.append(f"| {j} | {what}{' <- turning point' if j == k else ''} | {_fmt(s)} |")
    return "\n".join(rows)


def write_turning_point_report(out_dir, curve, degradation, k, meta):
    """Writes turning_point.json (all numbers, the rule, `meta`: model, config,
    data), turning_point.md and turning_point.png (if matplotlib is installed)
    to out_dir. degradation: the dict of degradation_curve, or None.
    Returns the list of files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, peak = turning_point(curve)
    L = len(curve) - 1
    curve = [float(x) for x in curve]
    deg = None if degradation is None else {int(j): float(v) for j, v in sorted(degradation.items())}
    doc = {
        "turning_point_k": int(k),
        "peak_layer_output": int(peak),
        "peak_score": curve[peak],
        "n_layers": L,
        "rule": TURNING_POINT_RULE,
        "index_convention": "layer output l: 0 = embedding output, l >= 1 = after transformer layer "
                            "l-1 (0-based); degradation key j = bidirectional_from (layers >= j "
                            "bidirectional, -1 = causal)",
        "metric": "cosine Spearman of the pooled, final-normed state, in [-1, 1]",
        "layer_sts": curve,
        "degradation": None if deg is None else {str(j): v for j, v in deg.items()},
        "meta": meta,
    }
    files = [out / "turning_point.json", out / "turning_point.md"]
    files[0].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = [f"# Turning point: k = {k}", "",
          f"Peak at layer output {peak} ({'embedding' if peak == 0 else f'after layer {peak - 1}'}), "
          f"cosine Spearman x100 {100 * curve[peak]:.2f}; layers >= {k} (0-based, of {L}) "
          f"become bidirectional: `--bidirectional-from {k}`.", "",
          f"Rule: {TURNING_POINT_RULE}", ""]
    for key in ("model", "task", "split", "data_file", "n_pairs", "degradation_pairs", "pooling",
                "prompt", "seconds_layer_sts", "seconds_degradation"):
        if key in meta:
            md.append(f"- {key}: {meta[key]}")
    md += ["", "## STS of every layer output (causal model)", "", turning_point_table(curve), ""]
    if deg:
        md += ["## Final-output STS with layers >= j bidirectional (untrained)", "",
               degradation_table(deg, k), ""]
    files[1].write_text("\n".join(md))

    plt = _pyplot()
    if plt is not None:
        panels = 2 if deg else 1
        fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
        ax = axes[0][0]
        ax.plot(range(L + 1), [100 * c for c in curve], "o-", ms=3, label="layer output (causal)")
        ax.plot([peak], [100 * curve[peak]], "r*", ms=14, label=f"peak: output {peak}")
        ax.axvspan(k + 0.5, L + 0.5, color="tab:orange", alpha=0.12,
                   label=f"outputs of layers >= k = {k}")
        ax.set_xlabel("layer output l (0 = embedding, l = after layer l-1)")
        ax.set_ylabel("STS cosine Spearman x100")
        n = f", {meta['n_pairs']} pairs" if meta.get("n_pairs") else ""
        ax.set_title(meta.get("title", "per-layer STS") + n)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if deg:
            ax = axes[0][1]
            js = [j for j in deg if j >= 0]
            ax.plot(js, [100 * deg[j] for j in js], "s-", ms=3, color="tab:green",
                    label="final output, layers >= j bidirectional")
            if -1 in deg:
                ax.axhline(100 * deg[-1], color="gray", ls="--", label="causal (j = -1)")
            if k in deg:
                ax.plot([k], [100 * deg[k]], "r*", ms=14, label=f"k = {k}")
            ax.set_xlabel("bidirectional_from j (0-based layer index)")
            ax.set_ylabel("STS cosine Spearman x100")
            n = f", {meta['degradation_pairs']} pairs" if meta.get("degradation_pairs") else ""
            ax.set_title(f"final output, layers >= j bidirectional (untrained{n})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(out / "turning_point.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


# ---- 2. backward-dependency probe ------------------------------------------------------

def _probe_positions(T, n_positions):
    if n_positions is None or n_positions >= T - 1:
        return np.arange(T - 1)
    return np.unique(np.linspace(0, T - 2, n_positions).round().astype(np.int64))


def backward_dependency(model, sentences, bidirectional_from, n_positions=4, seed=0,
                        batch_sentences=8, max_tokens=8192):
    """How much the state of token i depends on the tokens after it.

    For each sentence (ids from model.tokenizer.encode_ids, truncated to
    max_seq_length; no prompt) with T >= 2 tokens, and positions i (n_positions
    evenly spaced in [0, T-2], or all of them if None), a variant replaces the
    tokens after i with random ones (seeded numpy RNG; drawn from the token ids
    of the given sentences other than BOS/EOS/control ids, each differing from
    the token it replaces). Originals and variants run through one forward_ids
    call per batch (hidden=True, bidirectional_from as given), and at every
    layer output l = 0..L the change of position i's raw residual state is
    1 - cos(h_l[i], h'_l[i]), computed as ||a/|a| - b/|b|||^2 / 2 in float64
    (the same quantity; exactly 0 when the states are bitwise equal, and no
    cancellation for tiny changes).

    Under causal attention (-1) every value is exactly 0; with k >= 0 outputs
    0..k are exactly 0 (layers before k cannot see the future) and outputs
    k+1..L are positive.

    Memory: each call holds [L+1, N, d] floats, so calls are capped at
    batch_sentences sentences and max_tokens tokens (a long sentence's variants
    are split over several calls, each with the original).

    Returns {"bidirectional_from", "mean": [L+1], "max": [L+1], "n_pairs",
    "n_sentences", "n_skipped"} with mean / max over (sentence, position).
    """
    if isinstance(sentences, str):
        sentences = [sentences]
    if n_positions is not None and (isinstance(n_positions, bool) or
                                    not isinstance(n_positions, (int, np.integer)) or n_positions < 1):
        raise ValueError(f"n_positions must be a positive int or None, got {n_positions!r}")
    k = int(bidirectional_from)
    if not -1 <= k < model.num_layers:
        raise ValueError(f"bidirectional_from must be in [-1, {model.num_layers}), got {k}")
    tok = model.tokenizer
    ids = [x[:model.max_seq_length] for x in tok.encode_ids(list(sentences))]
    exclude = {t for t in (tok.bos_id, tok.eos_id) if t is not None}
    try:
        exclude |= {int(i) for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    except AttributeError:
        pass
    pool = np.array(sorted({t for x in ids for t in x} - exclude), dtype=np.int64)
    if pool.size < 2:
        pool = np.array(sorted(set(range(tok.vocab_size)) - exclude), dtype=np.int64)
    rng = np.random.default_rng(seed)

    # work units: (original ids, [(position, variant ids), ...]) within the token budget
    units, n_skipped = [], 0
    for x in ids:
        T = len(x)
        if T < 2:
            n_skipped += 1
            continue
        orig = np.asarray(x, dtype=np.int64)
        per_unit = max(1, max_tokens // T - 1)
        variants = []
        for i in _probe_positions(T, n_positions):
            tail = orig[i + 1:]
            # uniform over the pool minus the original token at each place
            at = np.searchsorted(pool, tail)
            in_pool = (at < pool.size) & (pool[np.minimum(at, pool.size - 1)] == tail)
            r = rng.integers(0, pool.size - in_pool.astype(np.int64))
            r = np.where(in_pool & (r >= at), r + 1, r)
            new = orig.copy()
            new[i + 1:] = pool[r]
            variants.append((int(i), new.tolist()))
        for s in range(0, len(variants), per_unit):
            units.append((x, variants[s:s + per_unit]))

    L = model.num_layers
    sums = np.zeros(L + 1, dtype=np.float64)
    maxs = np.zeros(L + 1, dtype=np.float64)
    n_pairs = 0
    b = 0
    while b < len(units):
        batch, tokens = [], 0
        while b < len(units) and len(batch) < batch_sentences:
            size = len(units[b][0]) * (1 + len(units[b][1]))
            if batch and tokens + size > max_tokens:
                break
            batch.append(units[b])
            tokens += size
            b += 1
        seqs, rows_a, rows_b = [], [], []
        for x, variants in batch:
            seqs.append(x)
            o = len(seqs) - 1
            for i, v in variants:
                seqs.append(v)
                rows_a.append((o, i))
                rows_b.append((len(seqs) - 1, i))
        _, _, hidden, _, offsets = model.forward_ids(seqs, hidden=True, bidirectional_from=k)
        ra = np.array([offsets[s] + i for s, i in rows_a], dtype=np.int64)
        rb = np.array([offsets[s] + i for s, i in rows_b], dtype=np.int64)
        ha = hidden[:, ra].astype(np.float64)  # [L+1, P, d]
        hb = hidden[:, rb].astype(np.float64)
        del hidden
        na = ha / np.maximum(np.linalg.norm(ha, axis=-1, keepdims=True), 1e-300)
        nb = hb / np.maximum(np.linalg.norm(hb, axis=-1, keepdims=True), 1e-300)
        change = 0.5 * np.sum((na - nb) ** 2, axis=-1)  # [L+1, P]
        sums += change.sum(axis=1)
        maxs = np.maximum(maxs, change.max(axis=1))
        n_pairs += change.shape[1]
    mean = sums / max(n_pairs, 1)
    return {"bidirectional_from": k, "mean": mean.tolist(), "max": maxs.tolist(),
            "n_pairs": n_pairs, "n_sentences": len(ids) - n_skipped, "n_skipped": n_skipped,
            "n_positions": n_positions, "seed": seed}


def _config_label(key, result):
    k = result.get("bidirectional_from", key)
    return "causal (k = -1)" if k == -1 else f"k = {k}"


def probe_table(results_by_config):
    """Markdown table: one row per layer output, mean and max 1 - cos per configuration."""
    keys = list(results_by_config)
    labels = [_config_label(c, results_by_config[c]) for c in keys]
    head = "| output l | " + " | ".join(f"{lab} mean | {lab} max" for lab in labels) + " |"
    rule = "|---:|" + "---:|---:|" * len(keys)
    L1 = len(results_by_config[keys[0]]["mean"])
    rows = [head, rule]
    for l in range(L1):
        cells = []
        for c in keys:
            r = results_by_config[c]
            cells += [f"{r['mean'][l]:.3g}", f"{r['max'][l]:.3g}"]
        rows.append(f"| {l} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_probe_report(out_dir, results_by_config, meta):
    """Writes backward_dependency.json, .md and .png (if matplotlib is
    installed) to out_dir. results_by_config: {label or k: the dict of
    backward_dependency}. Returns the list of files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "metric": "1 - cos(h_l[i], h'_l[i]) of position i's raw residual state at layer output l "
                  "(0 = embedding, l = after layer l-1) when the tokens after i are replaced by "
                  "random tokens; mean and max over (sentence, position)",
        "results": {str(c): r for c, r in results_by_config.items()},
        "meta": meta,
    }
    files = [out / "backward_dependency.json", out / "backward_dependency.md"]
    files[0].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = ["# Backward dependency: 1 - cos of a token's state when the later tokens change", "",
          doc["metric"] + ". Exactly 0 means the state cannot see the future.", ""]
    for key in ("model", "sentences_from", "n_sentences", "n_positions", "seed", "seconds"):
        if key in meta:
            md.append(f"- {key}: {meta[key]}")
    for c, r in results_by_config.items():
        md.append(f"- {_config_label(c, r)}: {r['n_pairs']} (sentence, position) pairs")
    md += ["", probe_table(results_by_config), ""]
    files[1].write_text("\n".join(md))

    plt = _pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
        for c, r in results_by_config.items():
            lab = _config_label(c, r)
            x = range(len(r["mean"]))
            axes[0].plot(x, r["mean"], "o-", ms=3, label=lab)
            axes[1].plot(x, r["max"], "o-", ms=3, label=lab)
        for ax, what in zip(axes, ("mean", "max")):
            ax.set_xlabel("layer output l (0 = embedding, l = after layer l-1)")
            ax.set_ylabel(f"{what} 1 - cos")
            ax.set_title(f"backward dependency ({what} over sentence, position)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(out / "backward_dependency.png")
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def model_meta(model):
    """What identifies a run: model file, config and settings."""
    cfg = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
           for k, v in model.config.items()}
    return {"model": str(model.path), "config": cfg, "pooling": model.pooling,
            "prompt": model.prompt, "max_seq_length": model.max_seq_length,
            "threads": model.threads}

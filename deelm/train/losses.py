"""Sentence-embedding losses on pooled embeddings, with analytic gradients.

Every loss is ``f(emb, batch, ...) -> (loss, grad)``: ``emb`` is the float
array [n_sentences, dim] of a batch's unique sentences (``batch.sentences``
order, see :mod:`deelm.train.data`), ``grad`` is d loss / d emb with the same
shape, float64. The C core back-propagates ``grad`` into the LoRA parameters;
the losses themselves are cheap (a few [b, b] matrices) so NumPy in float64
is plenty and keeps the gradient check against torch tight.

The definitions follow SeanLee97/AnglE (``angle_emb``), which the BeLLM
reference trains with:

* :func:`contrastive_loss`: in-batch negatives with hard negatives ("ibn"):
  cosine(anchor_i, candidate_j) x scale, candidates = all positives then all
  negatives of the batch, cross-entropy towards positive i, mean over anchors.
* :func:`reverse_contrastive_loss`: the other direction, positive i scored
  against every anchor of the batch, cross-entropy towards anchor i; added to
  the contrastive loss it makes the symmetric InfoNCE (sentence-transformers'
  MultipleNegativesSymmetricRankingLoss).
* :func:`cosent_loss`: CoSENT ``log(1 + sum exp(scale (cos_j - cos_i)))`` over
  ordered pairs of pairs whose gold scores say s_i > s_j.
* :func:`angle_loss`: AnglE's angle objective, the same ranking on a score made
  by dividing the two embeddings as complex vectors (first half real, second
  half imaginary).

For triplet batches the ranking losses see (anchor, positive) pairs labelled 1
and (anchor, negative) pairs labelled 0, as AnglE builds them.

Default weights (:data:`DEFAULT_WEIGHTS`) are contrastive only: the BeLLM
LLaMA-2-7B adapter was trained with ``--ibn_w 1.0 --cosine_w 0.0 --angle_w 0.0``
(4AI/BeLLM README). AnglE's and BiLLM's LLM NLI recipes use
``--ibn_w 20.0 --cosine_w 0.0 --angle_w 1.0`` (all taus 20), kept here as
:data:`ANGLE_NLI_WEIGHTS`; the ``AngleLoss`` class itself defaults to 1/1/1.
"""
import numpy as np

DEFAULT_SCALE = 20.0
LOSS_NAMES = ("contrastive", "reverse_contrastive", "cosent", "angle")
DEFAULT_WEIGHTS = {"contrastive": 1.0, "reverse_contrastive": 0.0, "cosent": 0.0, "angle": 0.0}
ANGLE_NLI_WEIGHTS = {"contrastive": 20.0, "cosent": 0.0, "angle": 1.0}


def _as_float64(emb):
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty [n, dim] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"embeddings have non-finite values in rows {rows[:10].tolist()}")
    return x


def _norms(x, rows):
    """Row norms of x; a zero row among `rows` (the ones a loss uses) is an error.

    A zero embedding has no direction, so cosine and angle are undefined;
    torch's F.normalize would silently call its cosine 0 and AnglE's angle
    would be NaN. Neither is worth training on.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    zero = np.flatnonzero(norms[rows] == 0)
    if zero.size:
        bad = np.unique(np.asarray(rows)[zero])
        raise ValueError(f"zero embedding vectors (rows {bad[:10].tolist()}): cosine and angle "
                         "are undefined for them")
    return norms


def _unit(x, rows):
    norms = _norms(x, rows)
    safe = np.where(norms > 0, norms, 1.0)
    return x / safe[:, None], safe


def _unit_backward(g, xn, norms):
    """d/dx of a loss whose gradient wrt x/|x| is g: the part of g orthogonal to x, over |x|."""
    return (g - np.einsum("ij,ij->i", g, xn)[:, None] * xn) / norms[:, None]


def _matmul_nt(a, b):
    """a @ b.T without a BLAS: a BLAS picks its kernel, and so its rounding,
    by CPU, and the loss must be the same bits on every machine."""
    return np.einsum("ik,jk->ij", a, b, optimize=False)


def _scatter(n_rows, dim, index_grads):
    """Sums per-use gradients into rows: a sentence used twice gets both."""
    g = np.zeros((n_rows, dim))
    for idx, grad in index_grads:
        np.add.at(g, idx, grad)
    return g


def _logsumexp(z, axis=None):
    m = np.max(z, axis=axis, keepdims=True)
    out = m + np.log(np.sum(np.exp(z - m), axis=axis, keepdims=True))
    return out if axis is not None else float(out.reshape(()))


def _rank_loss(s, labels):
    """CoSENT ranking ``log(1 + sum_{l_i < l_j} exp(s_i - s_j))`` and d loss / d s.

    Ties in the labels add no term; with no ordered pair the loss is 0.
    """
    labels = np.asarray(labels, dtype=np.float64)
    mask = labels[:, None] < labels[None, :]
    diff = s[:, None] - s[None, :]
    terms = np.concatenate([[0.0], diff[mask]])
    loss = _logsumexp(terms)
    w = np.where(mask, np.exp(np.where(mask, diff, 0.0) - loss), 0.0)
    return loss, w.sum(axis=1) - w.sum(axis=0)


def _info_nce(xn, rows, cols, scale):
    """Cross-entropy of scale x cos(rows_i, cols_j) over j towards j = i, the
    mean over rows, and its gradient w.r.t. the unit vectors as (index,
    gradient) uses for _scatter."""
    b = len(rows)
    logits = scale * _matmul_nt(xn[rows], xn[cols])             # [b, c]
    lse = _logsumexp(logits, axis=1)
    loss = float(np.mean(lse[:, 0] - logits[np.arange(b), np.arange(b)]))
    dlogits = np.exp(logits - lse)
    dlogits[np.arange(b), np.arange(b)] -= 1.0
    dlogits *= scale / b
    return loss, [(rows, _matmul_nt(dlogits, xn[cols].T)), (cols, _matmul_nt(dlogits.T, xn[rows].T))]


def _triplet_indices(batch, name):
    if getattr(batch, "anchor_idx", None) is None:
        raise ValueError(f"the {name} loss needs triplets (text, positive[, negative]); "
                         "scored pairs train with the cosent or angle loss")
    return np.asarray(batch.anchor_idx), np.asarray(batch.positive_idx)


def contrastive_loss(emb, batch, scale=DEFAULT_SCALE):
    """In-batch contrastive (InfoNCE) loss with hard negatives.

    Anchor i is scored against every positive and negative of the batch by
    cosine x scale; the loss is the cross-entropy towards positive i, averaged
    over anchors. Needs a triplet batch (negatives optional).
    """
    a, cand = _triplet_indices(batch, "contrastive")
    x = _as_float64(emb)
    if batch.negative_idx is not None:
        cand = np.concatenate([cand, np.asarray(batch.negative_idx)])
    xn, norms = _unit(x, np.concatenate([a, cand]))
    loss, uses = _info_nce(xn, a, cand, scale)
    return loss, _unit_backward(_scatter(*x.shape, uses), xn, norms)


def reverse_contrastive_loss(emb, batch, scale=DEFAULT_SCALE):
    """InfoNCE in the other direction: positive i is scored against every
    anchor of the batch (cosine x scale), cross-entropy towards anchor i,
    averaged over positives. Negatives take no part. Needs a triplet batch.
    """
    a, pos = _triplet_indices(batch, "reverse_contrastive")
    x = _as_float64(emb)
    xn, norms = _unit(x, np.concatenate([pos, a]))
    loss, uses = _info_nce(xn, pos, a, scale)
    return loss, _unit_backward(_scatter(*x.shape, uses), xn, norms)


def _pairs(batch):
    i1, i2, labels = batch.scored_pairs()
    return np.asarray(i1), np.asarray(i2), labels


def cosent_loss(emb, batch, scale=DEFAULT_SCALE):
    """CoSENT: ``log(1 + sum over s_i > s_j of exp(scale (cos_j - cos_i)))``.

    cos_i is the cosine of pair i; pairs with equal gold scores are not compared.
    """
    x = _as_float64(emb)
    i1, i2, labels = _pairs(batch)
    xn, norms = _unit(x, np.concatenate([i1, i2]))
    cos = np.einsum("ij,ij->i", xn[i1], xn[i2])
    loss, ds = _rank_loss(scale * cos, labels)
    dcos = scale * ds
    gn = _scatter(*x.shape, [(i1, dcos[:, None] * xn[i2]), (i2, dcos[:, None] * xn[i1])])
    return float(loss), _unit_backward(gn, xn, norms)


def angle_loss(emb, batch, scale=DEFAULT_SCALE, pooling="sum"):
    """AnglE's angle loss (Li & Li 2023, ``angle_emb.angle_loss``).

    Each embedding is a complex vector z = re + i im with re its first half
    and im its second. For a pair (u, v) AnglE computes u / v "normalised":
    ``(re_k, im_k) = ((a_k c_k + b_k d_k), (b_k c_k - a_k d_k)) / (|u| |v|)``
    with u = (a, b), v = (c, d) and the norms over whole vectors, pools
    ``re`` and ``im`` together by sum (or mean over all dim values), and ranks
    pairs by ``scale * |pooled|`` with the CoSENT ranking. The reference's
    sign convention is kept: a larger |pooled| counts as more similar.
    """
    if pooling not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
    x = _as_float64(emb)
    dim = x.shape[1]
    if dim % 2:
        raise ValueError(f"the angle loss splits embeddings into real and imaginary halves: "
                         f"the dimension must be even, got {dim}")
    i1, i2, labels = _pairs(batch)
    norms = _norms(x, np.concatenate([i1, i2]))
    h = dim // 2
    u, v = x[i1], x[i2]
    a, b, c, d = u[:, :h], u[:, h:], v[:, :h], v[:, h:]
    nu, nv = norms[i1], norms[i2]
    p = np.einsum("ij,ij->i", a, c - d) + np.einsum("ij,ij->i", b, c + d)
    p /= nu * nv
    k = scale / dim if pooling == "mean" else scale
    loss, ds = _rank_loss(k * np.abs(p), labels)
    dp = ds * k * np.sign(p)                 # sign(0) = 0, as torch's abs backward
    coef = (dp / (nu * nv))[:, None]
    du = coef * np.concatenate([c - d, c + d], axis=1) - (dp * p / nu**2)[:, None] * u
    dv = coef * np.concatenate([a + b, b - a], axis=1) - (dp * p / nv**2)[:, None] * v
    return float(loss), _scatter(*x.shape, [(i1, du), (i2, dv)])


LOSSES = {"contrastive": contrastive_loss, "reverse_contrastive": reverse_contrastive_loss,
          "cosent": cosent_loss, "angle": angle_loss}


def combined_loss(emb, batch, weights=None, scale=DEFAULT_SCALE, return_parts=False):
    """Weighted sum of the losses and of their gradients.

    ``weights`` maps loss names (contrastive, cosent, angle) to non-negative
    weights; missing names weigh 0, None means :data:`DEFAULT_WEIGHTS`.
    ``scale`` is one float for all losses or a dict per loss name (AnglE's
    ibn_tau, cosine_tau, angle_tau; all 20 by default). Terms of weight 0 are
    not computed. With ``return_parts`` the unweighted value of each computed
    term is returned too, for logging.
    """
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = set(weights) - set(LOSSES)
    if unknown:
        raise ValueError(f"unknown loss names {sorted(unknown)}; known: {list(LOSS_NAMES)}")
    if any(not np.isfinite(w) or w < 0 for w in weights.values()):
        raise ValueError(f"loss weights must be finite and >= 0, got {weights}")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"at least one loss weight must be > 0, got {weights}")
    scales = scale if isinstance(scale, dict) else {name: scale for name in LOSSES}
    x = _as_float64(emb)
    total, grad, parts = 0.0, np.zeros_like(x), {}
    for name in LOSS_NAMES:
        w = weights.get(name, 0.0)
        if w > 0:
            value, g = LOSSES[name](x, batch, scale=scales.get(name, DEFAULT_SCALE))
            parts[name] = value
            total += w * value
            grad += w * g
    return (total, grad, parts) if return_parts else (total, grad)

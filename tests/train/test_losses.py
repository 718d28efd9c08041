"""Losses: values and gradients against torch autograd and finite differences."""
import numpy as np
import pytest

from deelm.train.losses import (ANGLE_NLI_WEIGHTS, DEFAULT_WEIGHTS, angle_loss, combined_loss,
                                contrastive_loss, cosent_loss, reverse_contrastive_loss)
from deelm.train.data import Batch

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers
F = torch.nn.functional


def triplet_batch(b, with_negative=True, shuffle_seed=None):
    """A triplet batch over 3b (or 2b) sentences, optionally in shuffled sentence order."""
    k = 3 if with_negative else 2
    idx = np.arange(k * b)
    if shuffle_seed is not None:
        idx = np.random.default_rng(shuffle_seed).permutation(k * b)
    return Batch([f"s{i}" for i in range(k * b)], np.arange(b), anchor_idx=idx[:b],
                 positive_idx=idx[b:2 * b], negative_idx=idx[2 * b:] if with_negative else None)


def pair_batch(scores, n_sentences=None, seed=0):
    """Pairs over a pool of sentences; some sentences are used by several pairs."""
    m = len(scores)
    n = n_sentences or 2 * m
    rng = np.random.default_rng(seed)
    i1 = rng.integers(0, n, m)
    i2 = (i1 + 1 + rng.integers(0, n - 1, m)) % n
    return Batch([f"s{i}" for i in range(n)], np.arange(m), idx1=i1, idx2=i2,
                 scores=np.asarray(scores, dtype=np.float64))


def emb(n, dim=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim))


# References written from the angle_emb definitions, in its "zigzag" layout:
# rows (x0, y0, x1, y1, ...) are the pairs and labels come one per pair.
def ref_rank(scores, labels):
    mask = labels[:, None] < labels[None, :]
    diff = (scores[:, None] - scores[None, :])[mask]
    return torch.logsumexp(torch.cat([torch.zeros(1, dtype=diff.dtype), diff]), dim=0)


def ref_cosent(zig, labels, tau):
    y = F.normalize(zig, p=2, dim=1)
    return ref_rank((y[0::2] * y[1::2]).sum(dim=1) * tau, labels)


def ref_angle(zig, labels, tau, pooling="sum"):
    re_part, im_part = torch.chunk(zig, 2, dim=1)
    a, b, c, d = re_part[0::2], im_part[0::2], re_part[1::2], im_part[1::2]
    den = (c ** 2 + d ** 2).sum(dim=1, keepdim=True)
    re = (a * c + b * d) / den
    im = (b * c - a * d) / den
    ratio = (a ** 2 + b ** 2).sum(dim=1, keepdim=True).sqrt() / den.sqrt()
    z = torch.cat([re / ratio, im / ratio], dim=1)
    pooled = z.sum(dim=1) if pooling == "sum" else z.mean(dim=1)
    return ref_rank(pooled.abs() * tau, labels)


def ref_contrastive(x, batch, tau):
    anchors = F.normalize(x[batch.anchor_idx], dim=1)
    cand = batch.positive_idx if batch.negative_idx is None else \
        np.concatenate([batch.positive_idx, batch.negative_idx])
    logits = anchors @ F.normalize(x[cand], dim=1).T * tau
    return F.cross_entropy(logits, torch.arange(len(anchors)))


def ref_reverse_contrastive(x, batch, tau):
    positives = F.normalize(x[batch.positive_idx], dim=1)
    logits = positives @ F.normalize(x[batch.anchor_idx], dim=1).T * tau
    return F.cross_entropy(logits, torch.arange(len(positives)))


def ref_loss(name, x, batch, tau, **kw):
    if name == "contrastive":
        return ref_contrastive(x, batch, tau)
    if name == "reverse_contrastive":
        return ref_reverse_contrastive(x, batch, tau)
    i1, i2, labels = batch.scored_pairs()
    zig = torch.stack([x[i1], x[i2]], dim=1).reshape(-1, x.shape[1])
    fn = ref_cosent if name == "cosent" else ref_angle
    return fn(zig, torch.as_tensor(labels), tau, **kw)


OURS = {"contrastive": contrastive_loss, "reverse_contrastive": reverse_contrastive_loss,
        "cosent": cosent_loss, "angle": angle_loss}


def check_against_torch(name, e, batch, tau=20.0, **kw):
    x = torch.tensor(e, dtype=torch.float64, requires_grad=True)
    ref = ref_loss(name, x, batch, tau, **kw)
    ref.backward()
    loss, grad = OURS[name](e, batch, scale=tau, **kw)
    assert grad.shape == e.shape and grad.dtype == np.float64
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-6, atol=1e-10)
    return loss, grad


@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("b, with_negative, shuffle", [(8, True, None), (5, True, 1),
                                                        (6, False, 2), (1, True, None)])
def test_triplet_losses_match_torch(name, b, with_negative, shuffle):
    batch = triplet_batch(b, with_negative, shuffle)
    n = len(batch.sentences)
    for seed, tau in ((0, 20.0), (1, 5.0)):
        check_against_torch(name, emb(n, 16, seed), batch, tau)


@pytest.mark.parametrize("name", ["cosent", "angle"])
def test_pair_losses_match_torch_with_ties_and_shared_sentences(name):
    scores = [0.0, 1.5, 1.5, 5.0, 3.2, 0.0, 4.4, 1.5, 2.0, 3.2]   # ties included
    batch = pair_batch(scores, n_sentences=12, seed=3)
    loss, _ = check_against_torch(name, emb(12, 10, 4), batch)
    assert loss > 0


def test_angle_mean_pooling_matches_torch():
    batch = triplet_batch(4)
    check_against_torch("angle", emb(12, 8, 5), batch, pooling="mean")


def finite_difference(fn, e, eps=1e-6):
    g = np.zeros_like(e)
    for idx in np.ndindex(*e.shape):
        up, down = e.copy(), e.copy()
        up[idx] += eps
        down[idx] -= eps
        g[idx] = (fn(up)[0] - fn(down)[0]) / (2 * eps)
    return g


@pytest.mark.parametrize("name", list(OURS))
def test_gradients_match_finite_differences(name):
    batch = triplet_batch(3, shuffle_seed=7)
    e = emb(9, 6, 8)
    _, grad = OURS[name](e, batch, scale=5.0)
    fd = finite_difference(lambda z: OURS[name](z, batch, scale=5.0), e)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


def test_combined_is_the_weighted_sum():
    batch = triplet_batch(6, shuffle_seed=2)
    e = emb(18, 12, 9)
    w = {"contrastive": 1.0, "reverse_contrastive": 0.7, "cosent": 0.5, "angle": 0.02}
    loss, grad, parts = combined_loss(e, batch, weights=w, return_parts=True)
    want = sum(w[k] * OURS[k](e, batch)[0] for k in w)
    want_grad = sum(w[k] * OURS[k](e, batch)[1] for k in w)
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert set(parts) == set(w)
    # Per-loss scales, and zero-weight terms are skipped (contrastive on pairs would fail).
    scales = {"contrastive": 20.0, "reverse_contrastive": 15.0, "cosent": 10.0, "angle": 5.0}
    l2, _ = combined_loss(e, batch, weights=w, scale=scales)
    assert l2 == pytest.approx(sum(w[k] * OURS[k](e, batch, scale=scales[k])[0] for k in w))
    pairs = pair_batch([1.0, 2.0, 3.0])
    loss, _ = combined_loss(emb(6, 4), pairs, weights={"cosent": 1.0, "contrastive": 0.0})
    assert loss == pytest.approx(cosent_loss(emb(6, 4), pairs)[0])


def test_default_weights():
    batch = triplet_batch(4)
    e = emb(12)
    assert DEFAULT_WEIGHTS == {"contrastive": 1.0, "reverse_contrastive": 0.0, "cosent": 0.0,
                               "angle": 0.0}
    assert combined_loss(e, batch)[0] == pytest.approx(contrastive_loss(e, batch)[0])
    loss, _ = combined_loss(e, batch, weights=ANGLE_NLI_WEIGHTS)
    assert loss == pytest.approx(20 * contrastive_loss(e, batch)[0] + angle_loss(e, batch)[0])


def test_combined_rejects_bad_weights():
    batch, e = triplet_batch(2), emb(6)
    for w, msg in (({"cosine": 1.0}, "unknown loss"), ({"angle": -1.0}, ">= 0"),
                   ({"angle": float("nan")}, ">= 0"), ({"angle": 0.0}, "at least one")):
        with pytest.raises(ValueError, match=msg):
            combined_loss(e, batch, weights=w)


def test_no_ordered_pair_gives_zero():
    # All labels equal (triplets without negatives, or tied scores): nothing to rank.
    for batch, n in ((triplet_batch(3, with_negative=False), 6), (pair_batch([2.0, 2.0]), 4)):
        for fn in (cosent_loss, angle_loss):
            loss, grad = fn(emb(n), batch)
            assert loss == 0.0 and not grad.any()


def test_single_triplet_without_negative_is_zero_loss():
    loss, grad = contrastive_loss(emb(2), triplet_batch(1, with_negative=False))
    assert loss == pytest.approx(0.0) and np.allclose(grad, 0)


def test_zero_and_non_finite_embeddings_are_errors():
    batch = triplet_batch(2)
    e = emb(6)
    e[2] = 0   # a positive: every loss uses it
    for fn in OURS.values():
        with pytest.raises(ValueError, match=r"zero embedding vectors \(rows \[2\]\)"):
            fn(e, batch)
    e = emb(6)
    e[4] = 0   # a negative: the reverse direction never looks at negatives
    assert np.isfinite(reverse_contrastive_loss(e, batch)[0])
    e = emb(7)
    e[6] = 0   # a row no example uses may be anything
    for fn in OURS.values():
        fn(e, batch)
    e = emb(6)
    e[1, 3] = np.nan
    for fn in OURS.values():
        with pytest.raises(ValueError, match="non-finite"):
            fn(e, batch)


def test_shape_errors():
    batch = triplet_batch(2)
    with pytest.raises(ValueError, match="even"):
        angle_loss(emb(6, 7), batch)
    for fn in (contrastive_loss, reverse_contrastive_loss):
        with pytest.raises(ValueError, match="needs triplets"):
            fn(emb(4), pair_batch([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[n, dim\]"):
        cosent_loss(np.zeros(6), batch)


def test_float32_input_gives_float64_gradient():
    batch = triplet_batch(3)
    e = emb(9).astype(np.float32)
    loss, grad = contrastive_loss(e, batch)
    assert grad.dtype == np.float64
    assert loss == pytest.approx(contrastive_loss(e.astype(np.float64), batch)[0], rel=1e-12)


def test_contrastive_plus_reverse_is_the_symmetric_loss():
    # sentence-transformers' MultipleNegativesSymmetricRankingLoss without negatives:
    # (CE(a -> p) + CE(p -> a)) / 2, here as the sum of the two weighted 1/2.
    batch = triplet_batch(5, with_negative=False, shuffle_seed=4)
    e = emb(10, 8, 3)
    x = torch.tensor(e, requires_grad=True)
    a, p = F.normalize(x[batch.anchor_idx], dim=1), F.normalize(x[batch.positive_idx], dim=1)
    s = 20.0 * a @ p.T
    ref = (F.cross_entropy(s, torch.arange(5)) + F.cross_entropy(s.T, torch.arange(5))) / 2
    ref.backward()
    loss, grad = combined_loss(e, batch, {"contrastive": 0.5, "reverse_contrastive": 0.5})
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-10)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-8, atol=1e-12)

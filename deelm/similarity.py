"""Similarity functions of sentence-transformers, computed with NumPy.

Each takes embeddings as NumPy arrays, lists or torch tensors ([n, d] or one
[d] vector) and returns a NumPy array, or a torch tensor when an input was one
(sentence-transformers' evaluators call torch.topk on the result). Scores
follow sentence-transformers' definitions: cosine, dot product, and the
negated Euclidean and Manhattan distances (higher is always more similar).
"""
import numpy as np
from scipy.spatial.distance import cdist

from deelm import _core
from deelm.settings import default_threads

SIMILARITY_FN_NAMES = ("cosine", "dot", "euclidean", "manhattan")


def _is_tensor(x):
    return hasattr(x, "detach") and hasattr(x, "numpy")


def _as_2d(x):
    if _is_tensor(x):
        x = x.detach().cpu().float().numpy()
    elif isinstance(x, (list, tuple)) and x and _is_tensor(x[0]):
        x = np.stack([t.detach().cpu().float().numpy() for t in x])
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :] if x.size else x.reshape(0, 0)  # [] is no vectors, not one empty one
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 1-D or 2-D, got shape {x.shape}")
    return x


def _l2_normalize(x):
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, np.float32(1e-12))


def _pair(a, b, pairwise=False):
    """Both sides as float32 [n, d], checked to fit together."""
    a2, b2 = _as_2d(a), _as_2d(b)
    if a2.shape[1] != b2.shape[1] and a2.size and b2.size:
        raise ValueError(f"embedding sizes differ: {a2.shape[1]} and {b2.shape[1]}")
    if pairwise and a2.shape != b2.shape:
        raise ValueError(f"pairwise similarity needs equal shapes, got {a2.shape} and {b2.shape}")
    return a2, b2


def _like_inputs(scores, a, b):
    """A torch tensor when either input was one, else the NumPy array."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    if _is_tensor(a) or _is_tensor(b):
        import torch

        return torch.from_numpy(scores)
    return scores


def _gemm(a, b):
    """a @ b.T through deelm's own GEMM: the same bits on every CPU (a BLAS
    picks its kernel, and so its rounding, per CPU)."""
    if not a.shape[0] or not b.shape[0]:
        return np.zeros((a.shape[0], b.shape[0]), dtype=np.float32)

    work = a.shape[0] * b.shape[0] * a.shape[1]
    threads = default_threads() if work > 1 << 22 else 1
    return _core.linear(np.ascontiguousarray(a), np.ascontiguousarray(b), threads)


def cos_sim(a, b):
    """Cosine similarity matrix [len(a), len(b)]."""
    a2, b2 = _pair(a, b)
    return _like_inputs(_gemm(_l2_normalize(a2), _l2_normalize(b2)), a, b)


def dot_score(a, b):
    """Dot product matrix [len(a), len(b)]."""
    a2, b2 = _pair(a, b)
    return _like_inputs(_gemm(a2, b2), a, b)


def euclidean_sim(a, b):
    """Negated Euclidean distance matrix [len(a), len(b)]."""
    a2, b2 = _pair(a, b)
    return _like_inputs(-cdist(a2.astype(np.float64), b2.astype(np.float64), "euclidean"), a, b)


def manhattan_sim(a, b):
    """Negated Manhattan distance matrix [len(a), len(b)]."""
    a2, b2 = _pair(a, b)
    return _like_inputs(-cdist(a2.astype(np.float64), b2.astype(np.float64), "cityblock"), a, b)


def pairwise_cos_sim(a, b):
    a2, b2 = _pair(a, b, pairwise=True)
    return _like_inputs(np.sum(_l2_normalize(a2) * _l2_normalize(b2), axis=1), a, b)


def pairwise_dot_score(a, b):
    a2, b2 = _pair(a, b, pairwise=True)
    return _like_inputs(np.sum(a2 * b2, axis=1), a, b)


def pairwise_euclidean_sim(a, b):
    a2, b2 = _pair(a, b, pairwise=True)
    diff = a2.astype(np.float64) - b2.astype(np.float64)
    return _like_inputs(-np.sqrt(np.sum(diff * diff, axis=1)), a, b)


def pairwise_manhattan_sim(a, b):
    a2, b2 = _pair(a, b, pairwise=True)
    return _like_inputs(-np.sum(np.abs(a2.astype(np.float64) - b2.astype(np.float64)), axis=1), a, b)


_FUNCTIONS = {
    "cosine": (cos_sim, pairwise_cos_sim),
    "dot": (dot_score, pairwise_dot_score),
    "euclidean": (euclidean_sim, pairwise_euclidean_sim),
    "manhattan": (manhattan_sim, pairwise_manhattan_sim),
}


def check_similarity_fn_name(name):
    """The name as a plain string ("dot_product" is sentence-transformers'
    alias of "dot"; its SimilarityFunction enum members are accepted too)."""
    name = getattr(name, "value", name)
    if name == "dot_product":
        name = "dot"
    if not isinstance(name, str) or name not in _FUNCTIONS:
        raise ValueError(f"similarity_fn_name must be one of {SIMILARITY_FN_NAMES}, got {name!r}")
    return name


def similarity_functions(name):
    """(matrix function, pairwise function) for a similarity_fn_name."""
    return _FUNCTIONS[check_similarity_fn_name(name)]

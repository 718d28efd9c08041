"""References the tests compare deelm against, and how they print the differences.

report/max_abs print what a comparison measured (pytest -s shows it);
check_fd / check_torch test a backward op against finite differences of its
forward and against torch autograd in float64; attention_torch is grouped-query
attention in torch on a fixed batch of sentences (OFFSETS); assert_same_embeddings
compares two loads of the same weights. torch is imported only by the functions
that use it, so the light tier can import this module.
"""
import contextlib

import numpy as np

RNG = np.random.default_rng(7)


def report(name, value):
    """Prints a measured difference (run pytest with -s to see them); returns it."""
    print(f"\n[{name}] {value:.3g}" if isinstance(value, float) else f"\n[{name}] {value}")
    return value


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def directional_fd(f, x, v, w, eps):
    """(f(x + eps v) - f(x - eps v)) / (2 eps) . w in float64."""
    up = np.asarray(f((x + eps * v).astype(np.float32)), np.float64)
    down = np.asarray(f((x - eps * v).astype(np.float32)), np.float64)
    return float(np.sum((up - down) / (2 * eps) * w))


def check_fd(name, f, backward, x, eps=1e-2, tol=2e-3, seed=None):
    """seed: draw w and v from their own generator, so the check does not
    depend on which tests ran before (a random v can make the derivative
    small enough for float32 rounding in f to dominate the difference)."""
    rng = RNG if seed is None else np.random.default_rng(seed)
    x = x.astype(np.float32)
    w = rng.standard_normal(np.shape(f(x))).astype(np.float32)
    v = rng.standard_normal(x.shape).astype(np.float32)
    fd = directional_fd(f, x, v, w, eps)
    an = float(np.sum(np.asarray(backward(x, w), np.float64) * v))
    rel = abs(fd - an) / max(abs(fd), 1e-6)
    report(f"{name}: finite-difference rel. error", rel)
    assert rel < tol, (fd, an)


def check_torch(name, torch_f, backward, x, tol=1e-5):
    import torch

    x = x.astype(np.float32)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = torch_f(xt)
    w = RNG.standard_normal(tuple(y.shape)).astype(np.float32)
    (y * torch.tensor(w, dtype=torch.float64)).sum().backward()
    ref = xt.grad.numpy()
    got = np.asarray(backward(x, w), np.float64)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    report(f"{name}: vs torch autograd, max rel. error", err)
    assert err < tol


# the attention tests' batch: heads, kv heads, head dim, and sentence offsets
NH, NKV, AHD = 4, 2, 8
OFFSETS = np.array([0, 1, 5, 40, 45], dtype=np.int64)  # lengths 1, 4, 35 (sgemm path), 5


def attention_torch(qkv, causal, window=0, scale=AHD ** -0.5):
    """Per sentence, grouped-query SDPA in float64: query i sees key j when
    j <= i (causal) and, with a window, when |i - j| < window (deelm.h)."""
    import torch

    outs = []
    for s in range(len(OFFSETS) - 1):
        a, b = OFFSETS[s], OFFSETS[s + 1]
        x = qkv[a:b]
        q = x[:, :NH * AHD].reshape(-1, NH, AHD)
        k = x[:, NH * AHD:(NH + NKV) * AHD].reshape(-1, NKV, AHD).repeat_interleave(NH // NKV, 1)
        v = x[:, (NH + NKV) * AHD:].reshape(-1, NKV, AHD).repeat_interleave(NH // NKV, 1)
        pos = torch.arange(b - a)
        dist = pos[:, None] - pos[None, :]  # i - j
        allowed = dist >= 0 if causal else torch.ones_like(dist, dtype=torch.bool)
        if window:
            allowed = allowed & (dist.abs() < window)
        s_ = (torch.einsum("ihc,jhc->hij", q, k) * scale).masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s_, -1)
        outs.append(torch.einsum("hij,jhc->ihc", p, v).reshape(b - a, NH * AHD))
    return torch.cat(outs)


def assert_same_embeddings(one, other, sentences, ks, label, tol):
    """Two loads of the same weights: the same token ids, and every layer's
    pooled state within tol of each other for every k of ks."""
    assert [e.ids for e in one.tokenize(sentences)] == [e.ids for e in other.tokenize(sentences)]
    for k in ks:
        one.bidirectional_from = other.bidirectional_from = k
        a = one.encode(sentences, output_value="layer_embeddings")
        b = other.encode(sentences, output_value="layer_embeddings")
        report(f"{label} k={k}", f"max abs diff of every layer's pooled state {max_abs(a, b):.2e}")
        assert max_abs(a, b) <= tol


def padded_batch(ids):
    """Right-padded torch input ids [b, T] and the mask of real tokens."""
    import torch

    T = max(len(x) for x in ids)
    input_ids = torch.zeros((len(ids), T), dtype=torch.long)
    keep = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, :len(x)] = torch.tensor(x)
        keep[i, :len(x)] = 1
    return input_ids, keep


@contextlib.contextmanager
def bidirectional_layers(layers, keep, bidirectional_from, windows=None):
    """While active, transformers decoder layers with index >= bidirectional_from
    (>= 0) get a padding-only attention mask instead of the causal one, which is
    how DeeLM changes a layer. keep: [batch, T] 1 for real tokens (eager attention).
    windows: per layer, its sliding window (0: none), for models with local
    layers (Gemma-3): a bidirectional local layer then sees the keys with
    |i - j| < window, deelm's definition (csrc/deelm.h, dl_attn_spec), instead
    of all of them; layers below bidirectional_from keep the model's own masks."""
    import torch

    visible = keep.bool()[:, None, None, :]  # [b, 1, 1, T]: key is a real token

    def hook(window):
        def padding_only(module, args, kwargs):
            am = kwargs.get("attention_mask")
            assert am is not None, "expected an explicit attention mask in eager mode"
            allowed = visible.expand(am.shape)
            if window:
                pos = torch.arange(am.shape[-1])
                allowed = allowed & ((pos[:, None] - pos[None, :]).abs() < window)
            if am.dtype == torch.bool:
                new = allowed
            else:
                new = torch.zeros(am.shape, dtype=am.dtype).masked_fill(
                    ~allowed, torch.finfo(am.dtype).min)
            kwargs["attention_mask"] = new
            return args, kwargs

        return padding_only

    hooks = [layer.register_forward_pre_hook(hook(windows[i] if windows else 0), with_kwargs=True)
             for i, layer in enumerate(layers) if 0 <= bidirectional_from <= i]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()

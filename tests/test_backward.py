"""The C core's backward ops, each checked two ways:

* against finite differences of the C core's own forward op: the directional
  derivative (f(x + e v) - f(x - e v)) / 2e . w must equal <backward(w), v>,
  where float32 rounding allows a relative error of about 1e-3;
* against torch autograd of the same op in float64 (tight).

Run with `pytest -s` to see the measured errors."""
import numpy as np
import pytest

from deelm import _core

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers

RNG = np.random.default_rng(7)


def report(name, value):
    print(f"\n[{name}] {value:.3g}")


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


# ---- RMSNorm -----------------------------------------------------------------

D, EPS = 48, 1e-5
NORM_W = RNG.uniform(0.5, 1.5, D).astype(np.float32)


def rms_torch(x):
    w = torch.tensor(NORM_W, dtype=torch.float64)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def test_rmsnorm_backward():
    x = RNG.standard_normal((5, D)).astype(np.float32) * 3
    f = lambda x: _core.rmsnorm(x, NORM_W, EPS)
    bw = lambda x, g: _core.rmsnorm_backward(x, NORM_W, EPS, g)
    check_fd("rmsnorm", f, bw, x)
    check_torch("rmsnorm", rms_torch, bw, x)


# ---- RoPE --------------------------------------------------------------------

HEADS, HD = 3, 16
INV_FREQ = (1.0 / 10000 ** (np.arange(0, HD, 2) / HD)).astype(np.float32)
POS = np.array([0, 1, 2, 7, 30], dtype=np.int32)


@pytest.mark.parametrize("style", [0, 1])
def test_rope_backward(style):
    x = RNG.standard_normal((len(POS), HEADS, HD)).astype(np.float32)
    f = lambda x: _core.rope(x, POS, INV_FREQ, style)
    bw = lambda x, g: _core.rope_backward(g, POS, INV_FREQ, style)
    check_fd(f"rope style {style}", f, bw, x)
    # a rotation: the backward of the forward is the identity
    np.testing.assert_allclose(bw(None, f(x)), x, atol=1e-5)


# ---- SwiGLU ------------------------------------------------------------------

def test_swiglu_backward():
    gu = RNG.standard_normal((6, 2 * 20)).astype(np.float32) * 2
    f = lambda gu: _core.swiglu(gu)
    bw = lambda gu, g: _core.swiglu_backward(gu, g)
    check_fd("swiglu", f, bw, gu)

    def torch_f(gu):
        g, u = gu[:, :20], gu[:, 20:]
        return torch.nn.functional.silu(g) * u

    # the forward uses a fast exp (within 2 ulp): compare at float32 precision
    check_torch("swiglu", torch_f, bw, gu, tol=1e-6)


# ---- attention -----------------------------------------------------------------

NH, NKV, AHD = 4, 2, 8
OFFSETS = np.array([0, 1, 5, 40, 45], dtype=np.int64)  # lengths 1, 4, 35 (sgemm path), 5


def attention_torch(qkv, causal, window=0, scale=AHD ** -0.5):
    """Per sentence, grouped-query SDPA in float64: query i sees key j when
    j <= i (causal) and, with a window, when |i - j| < window (deelm.h)."""
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


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_backward(causal, threads):
    qkv = RNG.standard_normal((OFFSETS[-1], (NH + 2 * NKV) * AHD)).astype(np.float32)
    f = lambda x: _core.attention(x, OFFSETS, NH, NKV, AHD, causal, threads)
    bw = lambda x, g: _core.attention_backward(x, OFFSETS, g, NH, NKV, AHD, causal, threads)
    check_fd(f"attention causal={causal}", f, bw, qkv)
    check_torch(f"attention causal={causal}", lambda x: attention_torch(x, causal), bw, qkv)


def test_attention_backward_thread_invariant():
    qkv = RNG.standard_normal((OFFSETS[-1], (NH + 2 * NKV) * AHD)).astype(np.float32)
    g = RNG.standard_normal((OFFSETS[-1], NH * AHD)).astype(np.float32)
    one = _core.attention_backward(qkv, OFFSETS, g, NH, NKV, AHD, False, 1)
    two = _core.attention_backward(qkv, OFFSETS, g, NH, NKV, AHD, False, 2)
    assert np.array_equal(one, two)


def test_backward_ops_reject_bad_shapes():
    with pytest.raises(ValueError):
        _core.rmsnorm_backward(np.zeros((2, 4), np.float32), np.ones(4, np.float32), 1e-5,
                               np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError):
        _core.swiglu_backward(np.zeros((2, 6), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError):
        _core.attention_backward(np.zeros((3, 32), np.float32), np.array([0, 3]),
                                 np.zeros((3, 7), np.float32), 2, 1, 8, True, 1)
    with pytest.raises(ValueError):
        _core.rope_backward(np.zeros((2, 1, 4), np.float32), np.zeros(2, np.int32),
                            np.ones(2, np.float32), 5)

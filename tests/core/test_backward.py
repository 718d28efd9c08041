"""The C core's backward ops, each checked two ways:

* against finite differences of the C core's own forward op: the directional
  derivative (f(x + e v) - f(x - e v)) / 2e . w must equal <backward(w), v>,
  where float32 rounding allows a relative error of about 1e-3;
* against torch autograd of the same op in float64 (tight).

Run with `pytest -s` to see the measured errors."""
import numpy as np
import pytest

from deelm import _core
from support.reference import AHD, NH, NKV, OFFSETS, RNG, attention_torch, check_fd, check_torch

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers

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

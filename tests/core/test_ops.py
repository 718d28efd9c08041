"""Each C kernel of deelm._core against a reference (gguf's NumPy decoders, torch,
transformers' own LLaMA functions). Run with `pytest -s` to see the measured
differences."""
import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import quants

from deelm import _core
from support.gguf_builder import F16_FIELDS, _permute_for_gguf, random_blocks
from support.reference import max_abs, report

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers

BLOCK_TYPES = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K]
SUPPORTED = [QT.F32, QT.F16, QT.BF16] + BLOCK_TYPES
QUANTIZABLE = [t for t in SUPPORTED if t not in (QT.Q4_K, QT.Q5_K, QT.Q6_K)]  # gguf-py quantizes these


# ---- dequantize / type_info ---------------------------------------------------

def _sample(rng, n):
    """Random values with some structure: several scales, a few zero blocks,
    a block of one repeated value, and outliers."""
    x = rng.standard_normal(n).astype(np.float32)
    x *= np.repeat(10.0 ** rng.uniform(-4, 3, n // 32), 32).astype(np.float32)
    x[:32] = 0.0
    x[32:64] = 0.37
    x[64:96] = -1e-7
    x[96:128] = np.linspace(-65000.0, 65000.0, 32)  # near the F16 limit
    return x


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_matches_gguf_bitwise(qtype):
    rng = np.random.default_rng(int(qtype))
    x = _sample(rng, 32 * 512)
    for shape in [(x.size,), (64, x.size // 64)]:
        q = quants.quantize(x.reshape(shape), qtype)
        ref = np.ascontiguousarray(quants.dequantize(q, qtype), dtype=np.float32).reshape(-1)
        got = _core.dequantize(int(qtype), q.tobytes(), x.size)
        assert got.dtype == np.float32 and got.shape == (x.size,)
        diff = int(np.count_nonzero(got.view(np.uint32) != ref.view(np.uint32)))
        report(f"dequantize {qtype.name} {shape}", f"{diff} bitwise mismatches of {x.size}, "
               f"max abs diff {max_abs(got, ref)}")
        assert diff == 0, f"{qtype.name}: {diff} values differ from gguf.quants.dequantize " \
                          f"(max abs diff {max_abs(got, ref)})"


def _bitwise_mismatches(got, ref):
    return int(np.count_nonzero(got.view(np.uint32) != ref.view(np.uint32)))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_matches_gguf_bitwise(qtype):
    """Every bit pattern a block can hold, not just what a quantizer writes:
    random bytes (all nibbles, high bits, packed 6-bit scales and mins, int8
    sub-block scales) with random finite fp16 scales, zeros and subnormals
    among them. gguf-py cannot quantize K-quants, so this is their test."""
    be, bb = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = 64 * 1024 // be
    blocks = random_blocks(np.random.default_rng(int(qtype)), qtype.name, n_blocks)
    for off in F16_FIELDS[qtype.name]:
        blocks[:3, off:off + 2] = np.array([0.0, -0.0, 6e-8], np.float16).view(np.uint8).reshape(3, 2)
    ref = np.ascontiguousarray(quants.dequantize(blocks, qtype), np.float32).reshape(-1)
    assert np.isfinite(ref).all()
    got = _core.dequantize(int(qtype), blocks.tobytes(), n_blocks * be)
    diff = _bitwise_mismatches(got, ref)
    report(f"dequantize random {qtype.name}", f"{diff} bitwise mismatches of {got.size} "
           f"({n_blocks} blocks), max abs diff {max_abs(got, ref)}")
    assert diff == 0


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_quantized_scale_is_f16_subnormal_inf_nan(qtype):
    """Block scales (and mins) go through the same F16 decoding: a subnormal
    scale decodes like numpy's, an inf/nan one gives non-finite values exactly
    where gguf's decoder does (counted as bad when a model is loaded)."""
    fields = F16_FIELDS[qtype.name]
    blocks = random_blocks(np.random.default_rng(3), qtype.name, 4 * len(fields))
    for f, off in enumerate(fields):
        for i, pattern in enumerate([0x0001, 0x83FF, 0x7C00, 0x7E00]):  # subnormals, inf, nan
            blocks[4 * f + i, off:off + 2] = np.frombuffer(np.uint16(pattern).tobytes(), np.uint8)
    with np.errstate(invalid="ignore"):  # inf scale * 0
        ref = quants.dequantize(blocks, qtype).astype(np.float32).reshape(-1)
    got = _core.dequantize(int(qtype), blocks.tobytes(), ref.size)
    fin = np.isfinite(ref)
    assert not fin.all()
    assert _bitwise_mismatches(got[fin], ref[fin]) == 0
    assert np.array_equal(np.isfinite(got), fin)
    assert np.array_equal(np.isnan(got), np.isnan(ref))


def test_f16_every_bit_pattern_like_numpy():
    """All 65536 half-precision patterns: zeros, subnormals, normals, inf, nan."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = h.view(np.float16).astype(np.float32)
    got = _core.dequantize(int(QT.F16), h.tobytes(), h.size)
    g, r = got.view(np.uint32), ref.view(np.uint32)
    nan = np.isnan(ref)
    mismatches = int(np.count_nonzero(g[~nan] != r[~nan]))
    nan_payload = int(np.count_nonzero(g[nan] != r[nan]))
    report("F16 all patterns", f"{mismatches} non-NaN mismatches, {nan_payload} NaN payload "
           f"differences (of {int(nan.sum())} NaNs)")
    assert mismatches == 0
    # NaNs stay NaN with their sign (the payload is not something GGUF relies on)
    assert np.isnan(got[nan]).all()
    assert np.array_equal(np.signbit(got[nan]), np.signbit(ref[nan]))
    # spot checks of the special classes
    sub = (h & 0x7C00) == 0
    assert np.array_equal(got[sub], ref[sub])
    assert got[h == 0x0001][0] == np.float32(2.0 ** -24)
    assert got[h == 0x03FF][0] == np.float32(1023 * 2.0 ** -24)
    assert got[h == 0x7C00][0] == np.inf and got[h == 0xFC00][0] == -np.inf
    assert np.signbit(got[h == 0x8000][0]) and got[h == 0x8000][0] == 0


def test_bf16_special_values():
    vals = np.array([0.0, -0.0, 1.0, -2.5, 1e-40, 3.0e38, np.inf, -np.inf, np.nan], np.float32)
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16)
    ref = (bits.astype(np.uint32) << 16).view(np.float32)
    got = _core.dequantize(int(QT.BF16), bits.tobytes(), bits.size)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_type_info():
    for t in SUPPORTED:
        info = _core.type_info(int(t))
        assert info == (t.name, *gguf.GGML_QUANT_SIZES[t]), (t, info)
    for t in [QT.Q8_1, QT.Q2_K, QT.Q3_K, QT.Q8_K, QT.IQ4_NL, QT.TQ1_0, QT.I8, QT.F64]:
        assert _core.type_info(int(t)) is None, t
    assert _core.type_info(10) is None  # Q2_K
    for t in (-1, 4, 5, 1000, 2 ** 31 - 1):
        assert _core.type_info(t) is None
    supported = [t for t in range(64) if _core.type_info(t) is not None]
    assert supported == sorted(int(t) for t in SUPPORTED)


def test_dequantize_size_checks():
    with pytest.raises(ValueError):
        _core.dequantize(int(QT.Q8_0), bytes(34), 31)  # not a whole block
    with pytest.raises(ValueError):
        _core.dequantize(int(QT.Q8_0), bytes(33), 32)  # too few bytes
    with pytest.raises(ValueError):
        _core.dequantize(10, bytes(84), 256)  # unsupported type (Q2_K)
    for t in (QT.Q4_K, QT.Q5_K, QT.Q6_K):  # K-quants decode whole super-blocks of 256
        bb = gguf.GGML_QUANT_SIZES[t][1]
        with pytest.raises(ValueError, match="256"):
            _core.dequantize(int(t), bytes(bb), 128)
        with pytest.raises(ValueError):
            _core.dequantize(int(t), bytes(bb - 1), 256)
        assert _core.dequantize(int(t), bytes(2 * bb), 512).shape == (512,)


# ---- rmsnorm -------------------------------------------------------------------

def _llama_rmsnorm(x, w, eps):
    """transformers' LlamaRMSNorm.forward in float32."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:  # the same computation, written out
        x = x.to(torch.float32)
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    norm = LlamaRMSNorm(x.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(w)
        return norm(x)


@pytest.mark.parametrize("d,eps", [(64, 1e-5), (576, 1e-5), (4096, 1e-6), (7, 1e-6)])
def test_rmsnorm_vs_llama_rmsnorm(d, eps):
    rng = np.random.default_rng(d)
    n = 33
    x = rng.standard_normal((n, d)).astype(np.float32)
    x *= (10.0 ** rng.uniform(-2, 3, (n, 1))).astype(np.float32)  # rows of very different scale
    x[0] = 0.0  # all-zero row: eps keeps it finite
    w = (1 + 0.3 * rng.standard_normal(d)).astype(np.float32)
    got = _core.rmsnorm(x, w, eps)
    ref = _llama_rmsnorm(torch.from_numpy(x), torch.from_numpy(w), eps).numpy()
    assert np.isfinite(got).all() and not got[0].any()
    rel = np.abs(got.astype(np.float64) - ref) / np.maximum(np.abs(ref), 1e-30)
    rel[ref == 0] = 0
    report(f"rmsnorm d={d}", f"max abs diff {max_abs(got, ref):.3g}, max rel diff {rel.max():.3g}")
    assert rel.max() <= 1e-6, f"max relative diff {rel.max():.3g}"


# ---- rope ------------------------------------------------------------------------

def _hf_cos_sin(pos, hd, base):
    """LlamaRotaryEmbedding's computation, float32 throughout."""
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = pos[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return inv_freq, emb.cos(), emb.sin()


def _hf_apply_rope(x, cos, sin):
    """transformers' apply_rotary_pos_emb on x [n, heads, hd]."""
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except ImportError:
        def rotate_half(t):
            return torch.cat((-t[..., t.shape[-1] // 2:], t[..., :t.shape[-1] // 2]), dim=-1)

        return x * cos[:, None] + rotate_half(x) * sin[:, None]
    out, _ = apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=1)
    return out


def _to_interleaved(x):
    """[n, heads, hd] vectors in HF order -> GGUF's interleaved order, using the
    converter's own row permutation (gguf_builder._permute_for_gguf)."""
    n, heads, hd = x.shape
    return np.ascontiguousarray(_permute_for_gguf(x.reshape(n, heads * hd).T, heads).T).reshape(n, heads, hd)


ROPE_TOL = 2e-6  # relative to the largest |x|: a few float32 ulps, at any angle


@pytest.mark.parametrize("hd,base", [(64, 10000.0), (128, 500000.0), (16, 10000.0)])
def test_rope_vs_transformers(hd, base):
    rng = np.random.default_rng(hd)
    heads = 3
    pos = np.concatenate([np.arange(40), rng.integers(0, 4096, 60), [4095, 3999]]).astype(np.int32)
    x = rng.standard_normal((pos.size, heads, hd)).astype(np.float32)
    inv_freq, cos, sin = _hf_cos_sin(torch.from_numpy(pos.astype(np.int64)), hd, base)

    ref = _hf_apply_rope(torch.from_numpy(x), cos, sin).numpy()
    got = _core.rope(x, pos, inv_freq.numpy(), 1)
    d_half = max_abs(got, ref)
    report(f"rope style 1 hd={hd} base={base:g}", f"max abs diff {d_half:.3g} "
           f"(max |x| {np.abs(x).max():.3g}, max angle {pos.max() * inv_freq[0].item():.0f} rad)")
    assert d_half <= ROPE_TOL * np.abs(x).max(), f"rotate-half RoPE differs by {d_half:.3g}"
    assert not np.array_equal(got, x)

    # interleaved pairs on GGUF-permuted vectors = rotate-half on the originals, permuted
    xi = _to_interleaved(x)
    got_i = _core.rope(xi, pos, inv_freq.numpy(), 0)
    d_perm = max_abs(got_i, _to_interleaved(got))
    d_perm_hf = max_abs(got_i, _to_interleaved(ref))
    report(f"rope style 0 hd={hd}", f"vs style 1 permuted: {d_perm:.3g}; vs transformers "
           f"permuted: {d_perm_hf:.3g}")
    assert np.array_equal(got_i, _to_interleaved(got)), f"style 0 vs permuted style 1: {d_perm:.3g}"
    assert d_perm_hf <= ROPE_TOL * np.abs(x).max()
    # and style 0 on unpermuted vectors is a different rotation
    assert max_abs(_core.rope(x, pos, inv_freq.numpy(), 0), ref) > 1e-2

    # position 0 is the identity; the input array is not modified
    x0 = x.copy()
    assert np.array_equal(_core.rope(x, np.zeros(len(pos), np.int32), inv_freq.numpy(), 1), x)
    assert np.array_equal(x, x0)


def test_rope_inv_freq_matches_transformers():
    """The frequencies deelm derives from a GGUF file are transformers' inv_freq."""
    from deelm.io.gguf import rope_inv_freq

    worst = 0.0
    for hd, base in [(64, 10000.0), (128, 500000.0), (64, 100000.0), (80, 10000.0)]:
        ref = _hf_cos_sin(torch.arange(1), hd, base)[0].numpy()
        got = rope_inv_freq(hd, base)
        rel = float(np.max(np.abs(got.astype(np.float64) - ref) / ref))
        worst = max(worst, rel)
    report("rope inv_freq", f"max rel diff vs transformers {worst:.3g}")
    assert worst <= 2.4e-7  # at most 2 ulp


# ---- attention ------------------------------------------------------------------

NH, NKV, HD = 6, 2, 16


def _sdpa_reference(qkv, offsets, causal, kv_repeat="interleave"):
    q_w, kv_w = NH * HD, NKV * HD
    out = np.zeros((qkv.shape[0], q_w), np.float32)
    for s in range(len(offsets) - 1):
        a, b = offsets[s], offsets[s + 1]
        if a == b:
            continue
        t = torch.from_numpy(qkv[a:b])
        q = t[:, :q_w].reshape(b - a, NH, HD).transpose(0, 1)
        k = t[:, q_w:q_w + kv_w].reshape(b - a, NKV, HD).transpose(0, 1)
        v = t[:, q_w + kv_w:].reshape(b - a, NKV, HD).transpose(0, 1)
        if kv_repeat == "interleave":  # query head h reads kv head h // (nh / nkv), as repeat_kv
            k = k.repeat_interleave(NH // NKV, dim=0)
            v = v.repeat_interleave(NH // NKV, dim=0)
        else:  # the other grouping, h % nkv: must not match
            k, v = k.repeat(NH // NKV, 1, 1), v.repeat(NH // NKV, 1, 1)
        o = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None],
                                                             is_causal=causal)[0]
        out[a:b] = o.transpose(0, 1).reshape(b - a, q_w).numpy()
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_vs_sdpa(causal):
    rng = np.random.default_rng(7)
    lengths = [1, 7, 33, 64, 2, 129]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    qkv = (2 * rng.standard_normal((offsets[-1], (NH + 2 * NKV) * HD))).astype(np.float32)
    ref = _sdpa_reference(qkv, offsets, causal)
    got1 = _core.attention(qkv, offsets, NH, NKV, HD, causal, 1)
    got2 = _core.attention(qkv, offsets, NH, NKV, HD, causal, 2)
    diff = max_abs(got1, ref)
    report(f"attention {'causal' if causal else 'bidirectional'}", f"max abs diff {diff:.3g} "
           f"(max |v| {np.abs(qkv).max():.3g}); threads 1 vs 2 identical: {np.array_equal(got1, got2)}")
    assert diff <= 1e-5, f"attention differs from SDPA by {diff:.3g}"
    assert np.array_equal(got1, got2)
    assert max_abs(got1, _sdpa_reference(qkv, offsets, causal, "tile")) > 1e-2  # grouping matters
    # packing: each sentence alone gives the same result as inside the batch
    for s in range(len(lengths)):
        a, b = offsets[s], offsets[s + 1]
        alone = _core.attention(qkv[a:b], np.array([0, b - a]), NH, NKV, HD, causal, 1)
        assert np.array_equal(alone, got1[a:b])
    # the first token of a sentence sees only itself when causal: output = its v
    if causal:
        v0 = qkv[offsets[:-1], (NH + NKV) * HD:].reshape(len(lengths), NKV, HD)
        o0 = got1[offsets[:-1]].reshape(len(lengths), NH, HD)
        assert np.allclose(o0, np.repeat(v0, NH // NKV, axis=1), rtol=0, atol=1e-6)


def test_attention_query_results_do_not_depend_on_tiles_or_length():
    """Queries go in tiles of 8 and keys in tiles of 32, and a query's result
    depends on its own keys only: under causal attention each prefix of a
    sentence gives, bitwise, the first rows of the whole sentence, and the last
    query gets the same bits with causal and bidirectional attention (the
    exact identity DeeLM's last bidirectional layer relies on), for lengths on
    both sides of every tile edge."""
    rng = np.random.default_rng(11)
    L = 97
    qkv = (2 * rng.standard_normal((L, (NH + 2 * NKV) * HD))).astype(np.float32)
    whole = _core.attention(qkv, np.array([0, L]), NH, NKV, HD, True, 1)
    for p in (1, 7, 8, 9, 31, 32, 33, 64, 96):
        prefix = _core.attention(qkv[:p], np.array([0, p]), NH, NKV, HD, True, 1)
        assert np.array_equal(prefix, whole[:p]), p
        bidir = _core.attention(qkv[:p], np.array([0, p]), NH, NKV, HD, False, 1)
        assert np.array_equal(bidir[p - 1], prefix[p - 1]), p


# ---- swiglu ----------------------------------------------------------------------

def test_swiglu_vs_torch():
    rng = np.random.default_rng(9)
    n, f = 17, 1536
    g = (4 * rng.standard_normal((n, f))).astype(np.float32)
    g[0, :9] = [-200, -100, -88, -20, 0, 20, 88, 100, 200]  # saturated sigmoid, exp overflow
    u = (3 * rng.standard_normal((n, f))).astype(np.float32)
    got = _core.swiglu(np.concatenate([g, u], axis=1))
    ref = (torch.nn.functional.silu(torch.from_numpy(g)) * torch.from_numpy(u)).numpy()
    assert np.isfinite(got).all()
    err = np.abs(got.astype(np.float64) - ref)
    tol = 4 * np.finfo(np.float32).eps * np.abs(ref) + 1e-30
    report("swiglu", f"max abs diff {err.max():.3g}, max diff / |ref| "
           f"{np.max(err / np.maximum(np.abs(ref), 1e-30)):.3g}")
    assert (err <= tol).all(), f"swiglu differs by up to {err.max():.3g}"


# ---- linear ----------------------------------------------------------------------

@pytest.mark.parametrize("n,inp,out", [(1, 64, 64), (37, 576, 1536), (130, 1536, 576), (3, 5, 7)])
def test_linear_vs_torch(n, inp, out):
    rng = np.random.default_rng(n + inp)
    x = rng.standard_normal((n, inp)).astype(np.float32)
    w = (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)
    ref = (torch.from_numpy(x) @ torch.from_numpy(w).T).numpy()
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T  # error bound's scale
    got1 = _core.linear(x, w, 1)
    got2 = _core.linear(x, w, 2)
    rel1 = float(np.max(np.abs(got1 - exact) / scale))
    rel2 = float(np.max(np.abs(got2 - exact) / scale))
    rel_t = float(np.max(np.abs(got1 - ref) / scale))
    report(f"linear {n}x{inp} -> {out}", f"max abs diff vs torch {max_abs(got1, ref):.3g}, "
           f"vs float64 {max_abs(got1, exact):.3g}; relative to sum|x||w|: {rel_t:.3g} / {rel1:.3g}; "
           f"threads 1 vs 2 max diff {max_abs(got1, got2):.3g}")
    assert rel_t <= 1e-5 and rel1 <= 1e-5 and rel2 <= 1e-5, (rel_t, rel1, rel2)
    assert np.array_equal(got1, _core.linear(x, w, 1))  # deterministic for a fixed thread count

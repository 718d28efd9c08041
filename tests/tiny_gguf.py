"""Builds tiny random-weight LLaMA GGUF files at test time.

The files are real GGUF (written by the `gguf` package), with a small
byte-level BPE vocabulary, so every part of deelm's loading path runs on them
and transformers can load them as the reference.
"""
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import quants

TINY = dict(n_layers=3, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, context_length=256,
            rope_theta=10000.0, rms_eps=1e-5)


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_vocab():
    """(tokens, token_types, merges): 3 control tokens, 256 bytes, a few merges."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    byte_tokens = list(_bytes_to_unicode().values())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"),
              ("o", "n"), ("Ġ", "s"), ("Ġ", "c"), ("a", "t")]
    merged = [a + b for a, b in merges]
    tokens = special + byte_tokens + merged
    types = [3] * len(special) + [1] * (len(tokens) - len(special))
    return tokens, types, [f"{a} {b}" for a, b in merges]


def _permute_for_gguf(w, n_head):
    """HF rotate-half row order -> the interleaved order GGUF LLaMA files use
    (what llama.cpp's converter does to q/k projections)."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def random_weights(cfg, seed=0):
    """HF-layout float32 weights (rows = outputs), scaled to keep activations sane."""
    rng = np.random.default_rng(seed)
    d, f, nh, nkv = cfg["dim"], cfg["hidden_dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hd = d // nh
    vocab = len(tiny_vocab()[0])

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w = {"token_embd": rng.standard_normal((vocab, d)).astype(np.float32),
         "output_norm": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
    for l in range(cfg["n_layers"]):
        p = f"blk.{l}."
        w[p + "attn_norm"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        w[p + "attn_q"] = mat(nh * hd, d)
        w[p + "attn_k"] = mat(nkv * hd, d)
        w[p + "attn_v"] = mat(nkv * hd, d)
        w[p + "attn_output"] = mat(d, nh * hd)
        w[p + "ffn_norm"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        w[p + "ffn_gate"] = mat(f, d)
        w[p + "ffn_up"] = mat(f, d)
        w[p + "ffn_down"] = mat(d, f)
    return w


def write_tiny_gguf(path, *, cfg=None, weight_type="F32", seed=0, arch="llama", add_bos=False,
                    weights=None, skip=(), extra_tensors=None):
    """Writes a tiny LLaMA GGUF to `path` and returns (path, HF-layout weights).

    weight_type: encoding of the 2-D projection weights (F32, F16, BF16, Q8_0,
    Q4_0, Q4_1); norms stay F32, the embedding table uses the same type.
    The returned weights are the values as stored (after a quantisation round
    trip), so a reference built from them sees exactly what deelm reads.
    skip: tensor names to leave out; extra_tensors: name -> (array, raw type).
    """
    cfg = dict(TINY, **(cfg or {}))
    w = weights or random_weights(cfg, seed)
    qt = QT[weight_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg["n_layers"])
    writer.add_context_length(cfg["context_length"])
    writer.add_embedding_length(cfg["dim"])
    writer.add_feed_forward_length(cfg["hidden_dim"])
    writer.add_head_count(cfg["n_heads"])
    writer.add_head_count_kv(cfg["n_kv_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_eps"])
    writer.add_rope_dimension_count(cfg["dim"] // cfg["n_heads"])
    writer.add_name("tiny-llama")
    tokens, types, merges = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    stored = {}
    for name, arr in w.items():
        if name in skip:
            continue
        data = arr
        if name.endswith("attn_q"):
            data = _permute_for_gguf(arr, cfg["n_heads"])
        elif name.endswith("attn_k"):
            data = _permute_for_gguf(arr, cfg["n_kv_heads"])
        if arr.ndim == 2 and qt != QT.F32:
            q = quants.quantize(data, qt)
            writer.add_tensor(name + ".weight", q, raw_dtype=qt)
            back = quants.dequantize(q, qt).reshape(data.shape).astype(np.float32)
        else:
            writer.add_tensor(name + ".weight", data)
            back = data
        if name.endswith("attn_q") or name.endswith("attn_k"):  # undo the permutation
            heads = cfg["n_heads"] if name.endswith("attn_q") else cfg["n_kv_heads"]
            out, inp = back.shape
            back = back.reshape(heads, out // heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)
        stored[name] = back
    for name, (arr, raw) in (extra_tensors or {}).items():
        writer.add_tensor(name, arr, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path), stored


def reference_forward(stored, cfg, ids, bidirectional_from=-1):
    """A plain NumPy float64 LLaMA forward (HF rotate-half convention) over one
    sentence: hidden states after the embedding and every layer, final-normed
    last state. Independent of deelm's C code and of torch."""
    cfg = dict(TINY, **(cfg or {}))
    d, nh, nkv = cfg["dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hd, eps = d // nh, cfg["rms_eps"]
    W = {k: v.astype(np.float64) for k, v in stored.items()}
    T = len(ids)
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def norm(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x):  # x [T, heads, hd]
        rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    x = W["token_embd"][ids]
    states = [x.copy()]
    for l in range(cfg["n_layers"]):
        p = f"blk.{l}."
        h = norm(x, W[p + "attn_norm"])
        q = rope((h @ W[p + "attn_q"].T).reshape(T, nh, hd))
        k = rope((h @ W[p + "attn_k"].T).reshape(T, nkv, hd))
        v = (h @ W[p + "attn_v"].T).reshape(T, nkv, hd)
        k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)
        s = np.einsum("ihc,jhc->hij", q, k) / np.sqrt(hd)
        if not (0 <= bidirectional_from <= l):
            s = s + np.triu(np.full((T, T), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("hij,jhc->ihc", s, v).reshape(T, nh * hd)
        x = x + a @ W[p + "attn_output"].T
        h = norm(x, W[p + "ffn_norm"])
        g, u = h @ W[p + "ffn_gate"].T, h @ W[p + "ffn_up"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down"].T
        states.append(x.copy())
    return states, norm(x, W["output_norm"])

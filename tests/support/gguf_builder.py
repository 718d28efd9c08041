"""Builds tiny random-weight LLaMA and Gemma-3 GGUF files at test time.

The files are real GGUF (written by the `gguf` package), with a small
byte-level BPE vocabulary (or any vocabulary given, such as a SentencePiece
model's, see sentencepiece_vocab), so every part of deelm's loading path runs
on them and transformers can load them as the reference.

One file, past ~600 lines on purpose: it is the project's one GGUF writer, the
tiny test models and (at the end) the random models of real shapes the
benchmarks use share its metadata and encoding helpers.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import quants

TINY = dict(n_layers=3, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, context_length=256,
            rope_theta=10000.0, rms_eps=1e-5)
# K-quants encode rows in super-blocks of 256 values: every row length (dim,
# hidden_dim) must be a multiple of 256
TINY_K = dict(TINY, dim=256, hidden_dim=256)
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# Named mixes of types, as llama.cpp's file types have: Q4_K_M keeps attn_v
# and ffn_down in Q6_K (here in every layer).
MIXES = {"Q4_K_M": ("Q4_K", {"attn_v": "Q6_K", "ffn_down": "Q6_K"})}


def tiny_cfg(weight_type):
    """The tiny config a weight type (or mix) needs: TINY_K for K-quants."""
    base = MIXES.get(weight_type, (weight_type,))[0]
    return TINY_K if base in K_QUANTS else TINY

# Byte offsets of the fp16 fields (scale first, then min/offset) of each
# block-quantized type; everything else in a block is free bits.
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(rng, type_name, n_blocks, scale=1.0, decades=2.5):
    """n_blocks random valid blocks [n_blocks, block_bytes] of a quantized
    type: random bytes, with finite fp16 scales, normal times 10 ** uniform
    over `decades` decades (the default reaches fp16 subnormals), times `scale`."""
    bb = gguf.GGML_QUANT_SIZES[QT[type_name]][1]
    blocks = rng.integers(0, 256, (n_blocks, bb), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        v = rng.standard_normal(n_blocks) * 10.0 ** rng.uniform(-decades, 0, n_blocks) * scale
        blocks[:, off:off + 2] = v.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _weight_blocks(seed, type_name, n_blocks, scale=1.0):
    """Random blocks as model weights: Q4_K/Q5_K sub-blocks are centred on 0
    (each min equal to its scale, dmin = d x the middle level), so that random
    layers do not add up large row means."""
    blocks = random_blocks(np.random.default_rng(seed), type_name, n_blocks, scale, decades=1)
    if type_name in ("Q4_K", "Q5_K"):
        s = blocks[:, 4:16]
        s[:, 4:8] = s[:, 0:4]  # mins of sub-blocks 0-3 (and top bits of 4-7) = the scales'
        s[:, 8:12] = (s[:, 8:12] & 15) * 17  # sub-blocks 4-7: min nibble = scale nibble
        middle = 7.5 if type_name == "Q4_K" else 15.5
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        blocks[:, 2:4] = (d * middle).astype(np.float16).view(np.uint8)
    return blocks


def encode_matrix(x, type_name, rng):
    """x [rows, cols] in a GGUF type: gguf's own quantizer where it has one,
    otherwise (K-quants) random valid blocks scaled to x's standard deviation,
    which is all a random-weight test model needs. Returns raw [rows, bytes]."""
    qt = QT[type_name]
    try:
        return quants.quantize(x, qt)
    except NotImplementedError:
        be, bb = gguf.GGML_QUANT_SIZES[qt]
        rows, cols = x.shape
        seed = int(rng.integers(1 << 32))
        unit = _weight_blocks(seed, type_name, rows * cols // be)
        scale = float(x.std() / quants.dequantize(unit, qt).std())
        blocks = _weight_blocks(seed, type_name, rows * cols // be, scale)
        return blocks.reshape(rows, cols // be * bb)


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


def sentencepiece_vocab(sp, *, user_defined=(), add_space_prefix=True, add_bos=True):
    """The GGUF vocabulary fields of a sentencepiece.SentencePieceProcessor,
    as llama.cpp's converter writes them: every piece with its score and type
    (user_defined: the pieces the model was trained with as
    user_defined_symbols, which the processor's API cannot tell apart)."""
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    user = set(user_defined)

    def piece_type(i):
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if tokens[i] in user:
            return 4
        if sp.is_unused(i):
            return 5
        return 6 if sp.is_byte(i) else 1

    return dict(model="llama", tokens=tokens, scores=[sp.get_score(i) for i in range(n)],
                token_type=[piece_type(i) for i in range(n)], bos_token_id=sp.bos_id(),
                eos_token_id=sp.eos_id(), unknown_token_id=sp.unk_id(), add_bos_token=add_bos,
                add_eos_token=False, add_space_prefix=add_space_prefix)


def write_vocab(writer, vocab):
    """Writes the tokenizer.ggml.* fields of a vocabulary dict (model,
    tokens, token_type, scores, merges, pre, bos/eos/unknown_token_id,
    add_bos_token, add_eos_token, add_space_prefix); keys left out are not
    written, keys set to a wrong value are written as they are."""
    writers = dict(model=writer.add_tokenizer_model, pre=writer.add_tokenizer_pre,
                   tokens=writer.add_token_list, token_type=writer.add_token_types,
                   scores=writer.add_token_scores, merges=writer.add_token_merges,
                   bos_token_id=writer.add_bos_token_id, eos_token_id=writer.add_eos_token_id,
                   unknown_token_id=writer.add_unk_token_id, add_bos_token=writer.add_add_bos_token,
                   add_eos_token=writer.add_add_eos_token,
                   add_space_prefix=writer.add_add_space_prefix)
    for key, value in vocab.items():
        writers[key](value)


def random_weights(cfg, seed=0, n_vocab=None):
    """HF-layout float32 weights (rows = outputs), scaled to keep activations
    sane; n_vocab embedding rows (default: the tiny byte-level vocabulary's)."""
    rng = np.random.default_rng(seed)
    d, f, nh, nkv = cfg["dim"], cfg["hidden_dim"], cfg["n_heads"], cfg["n_kv_heads"]
    hd = d // nh
    vocab = len(tiny_vocab()[0]) if n_vocab is None else n_vocab

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


def add_llama_metadata(writer, cfg):
    """The block shape keys every LLaMA-style model file carries."""
    writer.add_block_count(cfg["n_layers"])
    writer.add_context_length(cfg["context_length"])
    writer.add_embedding_length(cfg["dim"])
    writer.add_feed_forward_length(cfg["hidden_dim"])
    writer.add_head_count(cfg["n_heads"])
    writer.add_head_count_kv(cfg["n_kv_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_eps"])


def _new_writer(path, arch, cfg, name, add_bos=False, vocab=None):
    """A GGUFWriter with the metadata every tiny model shares and a
    vocabulary: `vocab` (see write_vocab), or the tiny byte-level BPE one."""
    writer = gguf.GGUFWriter(str(path), arch)
    add_llama_metadata(writer, cfg)
    writer.add_name(name)
    if vocab is None:
        tokens, types, merges = tiny_vocab()
        vocab = dict(model="gpt2", pre="gpt2", tokens=tokens, token_type=types, merges=merges,
                     bos_token_id=1, eos_token_id=2, add_bos_token=add_bos)
    write_vocab(writer, vocab)
    return writer


def _weight_type(name, weight_type, type_overrides):
    return QT[next((t for suffix, t in (type_overrides or {}).items() if name.endswith(suffix)),
                   weight_type)]


def _add_weight(writer, name, data, qt, rng):
    """Writes one weight (2-D ones in type qt, the rest F32) and returns its
    values as stored, after a quantisation round trip."""
    if data.ndim == 2 and qt != QT.F32:
        q = encode_matrix(data, qt.name, rng)
        writer.add_tensor(name + ".weight", q, raw_dtype=qt)
        return quants.dequantize(q, qt).reshape(data.shape).astype(np.float32)
    writer.add_tensor(name + ".weight", data)
    return data


def _finish(writer, extra_tensors):
    for name, (arr, raw, *shape) in (extra_tensors or {}).items():
        writer.add_tensor(name, arr, raw_dtype=raw, raw_shape=shape[0] if shape else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_gguf(path, *, cfg=None, weight_type="F32", seed=0, arch="llama", add_bos=False,
                    weights=None, skip=(), extra_tensors=None, type_overrides=None, vocab=None,
                    n_vocab=None):
    """Writes a tiny LLaMA GGUF to `path` and returns (path, HF-layout weights).

    weight_type: encoding of the 2-D projection weights (F32, F16, BF16, Q8_0,
    Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, or a mix of MIXES; K-quants
    need cfg=tiny_cfg(weight_type)); norms stay F32, the embedding table uses
    the same type.
    type_overrides: tensor name suffix -> type, e.g. {"ffn_down": "Q6_K"}.
    The returned weights are the values as stored (after a quantisation round
    trip), so a reference built from them sees exactly what deelm reads.
    skip: tensor names to leave out; extra_tensors: name -> (array, raw type)
    or (array, raw type, shape): the shape as written when the array is not
    uint8 (a uint8 array's shape is read as bytes per row).
    vocab: tokenizer fields to write instead of the tiny byte-level
    vocabulary (see write_vocab); the embedding table gets one row per token,
    or n_vocab rows if given.
    """
    cfg = dict(TINY, **(cfg or {}))
    if n_vocab is None and vocab is not None:
        n_vocab = len(vocab["tokens"])
    w = weights or random_weights(cfg, seed, n_vocab)
    rng = np.random.default_rng(seed + 1000)
    if weight_type in MIXES:
        weight_type, mix = MIXES[weight_type]
        type_overrides = dict(mix, **(type_overrides or {}))
    writer = _new_writer(path, arch, cfg, "tiny-llama", add_bos, vocab)
    writer.add_rope_dimension_count(cfg["dim"] // cfg["n_heads"])
    stored = {}
    for name, arr in w.items():
        if name in skip:
            continue
        data = arr
        if name.endswith("attn_q"):
            data = _permute_for_gguf(arr, cfg["n_heads"])
        elif name.endswith("attn_k"):
            data = _permute_for_gguf(arr, cfg["n_kv_heads"])
        back = _add_weight(writer, name, data, _weight_type(name, weight_type, type_overrides), rng)
        if name.endswith("attn_q") or name.endswith("attn_k"):  # undo the permutation
            heads = cfg["n_heads"] if name.endswith("attn_q") else cfg["n_kv_heads"]
            out, inp = back.shape
            back = back.reshape(heads, out // heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)
        stored[name] = back
    _finish(writer, extra_tensors)
    return Path(path), stored


# Gemma-3: a tiny model with local and global layers (every 6th is global),
# a head_dim that is not dim / n_heads, grouped-query attention and a sliding
# window shorter than the test sentences.
GEMMA3_TINY = dict(n_layers=7, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=24,
                   context_length=256, rope_theta=1e6, rms_eps=1e-6, sliding_window=8)

# transformers' Gemma3ForCausalLM parameter names -> GGUF names (llama.cpp's
# converter); {} is the layer index.
GEMMA3_NAMES = {
    "model.embed_tokens.weight": "token_embd",
    "model.norm.weight": "output_norm",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output",
    "model.layers.{}.self_attn.q_norm.weight": "blk.{}.attn_q_norm",
    "model.layers.{}.self_attn.k_norm.weight": "blk.{}.attn_k_norm",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.post_attention_norm",
    "model.layers.{}.pre_feedforward_layernorm.weight": "blk.{}.ffn_norm",
    "model.layers.{}.post_feedforward_layernorm.weight": "blk.{}.post_ffw_norm",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down",
}


def gemma3_gguf_name(hf_name):
    """The GGUF tensor name (without .weight) of a Gemma3ForCausalLM parameter, or None."""
    parts = hf_name.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    key = hf_name if layer is None else hf_name.replace(f".{layer}.", ".{}.", 1)
    name = GEMMA3_NAMES.get(key)
    return None if name is None else name.format(layer)


def random_gemma3_weights(cfg=None, seed=0):
    """Gemma3ForCausalLM-named float32 weights for a tiny config: projections
    scaled to keep activations sane, RMSNorm weights w (used as 1 + w) around 0."""
    cfg = dict(GEMMA3_TINY, **(cfg or {}))
    rng = np.random.default_rng(seed)
    d, f, hd = cfg["dim"], cfg["hidden_dim"], cfg["head_dim"]
    dq, dkv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (0.3 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((len(tiny_vocab()[0]), d)).astype(np.float32),
         "model.norm.weight": norm(d)}
    for l in range(cfg["n_layers"]):
        p = f"model.layers.{l}."
        w.update({p + "input_layernorm.weight": norm(d),
                  p + "self_attn.q_proj.weight": mat(dq, d),
                  p + "self_attn.k_proj.weight": mat(dkv, d),
                  p + "self_attn.v_proj.weight": mat(dkv, d),
                  p + "self_attn.o_proj.weight": mat(d, dq),
                  p + "self_attn.q_norm.weight": norm(hd),
                  p + "self_attn.k_norm.weight": norm(hd),
                  p + "post_attention_layernorm.weight": norm(d),
                  p + "pre_feedforward_layernorm.weight": norm(d),
                  p + "post_feedforward_layernorm.weight": norm(d),
                  p + "mlp.gate_proj.weight": mat(f, d),
                  p + "mlp.up_proj.weight": mat(f, d),
                  p + "mlp.down_proj.weight": mat(d, f)})
    return w


def write_gemma3_gguf(path, hf_weights, *, cfg=None, weight_type="F32", seed=0, metadata=None,
                      skip=(), extra_tensors=None, replace=None):
    """Writes a Gemma-3 GGUF as llama.cpp's converter does and returns (path,
    the HF-named weights as stored, to load back into the reference model).

    hf_weights: Gemma3ForCausalLM's state dict as float32 NumPy arrays. Its
    RMSNorm weights w (the model computes x / rms(x) * (1 + w)) are written as
    1 + w, in float32 as transformers forms 1 + w. 2-D weights are encoded in
    weight_type, norms stay F32. metadata: optional extra keys
    (sliding_window_pattern, freq_base_swa, attention_scale,
    rope_scaling_linear, value_length). skip: GGUF names to leave out;
    replace: GGUF name -> array written instead of the model's.
    """
    cfg = dict(GEMMA3_TINY, **(cfg or {}))
    metadata = metadata or {}
    rng = np.random.default_rng(seed + 1000)
    writer = _new_writer(path, "gemma3", cfg, "tiny-gemma3")
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(metadata.get("value_length", cfg["head_dim"]))
    if cfg["sliding_window"] is not None:
        writer.add_sliding_window(cfg["sliding_window"])
    if "sliding_window_pattern" in metadata:
        writer.add_sliding_window_pattern(metadata["sliding_window_pattern"])
    if "freq_base_swa" in metadata:
        writer.add_rope_freq_base_swa(metadata["freq_base_swa"])
    if "attention_scale" in metadata:
        writer.add_attention_scale(metadata["attention_scale"])
    if "rope_scaling_linear" in metadata:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(metadata["rope_scaling_linear"])
    for key, (value, vtype) in metadata.get("raw", {}).items():
        writer.add_key_value(key, value, vtype)
    stored = {}
    for hf_name, arr in hf_weights.items():
        name = gemma3_gguf_name(hf_name)
        if name is None or name in skip:
            continue
        data = np.asarray((replace or {}).get(name, arr), dtype=np.float32)
        is_norm = name.endswith("norm")
        if is_norm and name not in (replace or {}):
            data = (np.float32(1.0) + data).astype(np.float32)
        back = _add_weight(writer, name, data, QT[weight_type], rng)
        # a norm is written as is (F32): the reference's own 1 + w is bitwise the file's
        stored[hf_name] = np.asarray(arr, dtype=np.float32) if is_norm else back
    _finish(writer, extra_tensors)
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


# ---- random models of real shapes, for benchmarks (benchmarks/random_gguf.py) ----
#
# Layer shapes of real models with the default model's vocabulary; weights
# normal with std 0.02 (RMSNorm weights 1 + N(0, 0.05)), each tensor from its
# own generator seeded by (seed, tensor index), generated and quantised in row
# chunks so memory stays at one tensor. benchmarks/random_gguf.py documents
# the presets and caches the files.

PRESETS = {
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         real_vocab=49152, context_length=8192, rope_theta=100000.0, rms_eps=1e-5,
                         shape_of="SmolLM2-135M"),
    "0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                 real_vocab=151936, context_length=32768, rope_theta=1000000.0, rms_eps=1e-6,
                 shape_of="Qwen2.5-0.5B (without q/k/v biases)"),
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
               real_vocab=32000, context_length=2048, rope_theta=10000.0, rms_eps=1e-5,
               shape_of="TinyLlama-1.1B"),
}
WEIGHT_TYPES = ("Q4_1", "Q4_0", "Q8_0", "F16", "F32")
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
LINEAR_STD = 0.02
EMBED_STD = 0.02
NORM_STD = 0.05
CHUNK_ELEMS = 1 << 22  # rows generated and quantised at a time: ~4M values (16 MB float32)


def default_tokenizer_source():
    from deelm.io.default_model import resolve_model_path

    return resolve_model_path(None)


def tokenizer_metadata(path):
    """[(key, value, value type, item type)] of the tokenizer.ggml.* keys of a GGUF."""
    reader = gguf.GGUFReader(str(path), "r")
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ValueError(f"{path} holds no tokenizer.ggml.tokens")
    return out


def layer_shapes(cfg):
    """(name, numpy shape [out, in]) of one block's tensors, in the default model's order."""
    d, f = cfg["dim"], cfg["hidden_dim"]
    hd = d // cfg["n_heads"]
    q, kv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    return [("attn_norm", (d,)), ("ffn_down", (d, f)), ("ffn_gate", (f, d)), ("ffn_up", (f, d)),
            ("ffn_norm", (d,)), ("attn_k", (kv, d)), ("attn_output", (d, q)), ("attn_q", (q, d)),
            ("attn_v", (kv, d))]


def param_counts(cfg, vocab):
    """{'layers': non-embedding parameters (blocks + final norm), 'embedding': token_embd}."""
    per_layer = sum(int(np.prod(s)) for _, s in layer_shapes(cfg))
    return {"layers": cfg["n_layers"] * per_layer + cfg["dim"], "embedding": vocab * cfg["dim"]}


def _nbytes(shape, qt):
    block, size = gguf.GGML_QUANT_SIZES[qt]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {qt.name} block {block}")
    return rows * (shape[-1] // block) * size


def _tensor_plan(cfg, vocab, weight_type, embd_type):
    """[(GGUF name, numpy shape, GGML type, kind)] in file order."""
    plan = [("token_embd.weight", (vocab, cfg["dim"]), embd_type, "embedding")]
    for l in range(cfg["n_layers"]):
        for name, shape in layer_shapes(cfg):
            kind = "norm" if len(shape) == 1 else "linear"
            plan.append((f"blk.{l}.{name}.weight", shape, QT.F32 if kind == "norm" else weight_type, kind))
    plan.append(("output_norm.weight", (cfg["dim"],), QT.F32, "norm"))
    return plan


def _encode_tensor(shape, qt, kind, rng):
    """Random values for one tensor, encoded as `qt`, generated and quantised in
    row chunks (bounded memory). Returns the array to write (its bytes are the
    tensor's data)."""
    if kind == "norm":
        return (1.0 + NORM_STD * rng.standard_normal(shape[0], dtype=np.float32)).astype(np.float32)
    std = EMBED_STD if kind == "embedding" else LINEAR_STD
    rows, cols = shape
    out = np.empty(_nbytes(shape, qt), dtype=np.uint8)
    step = max(1, CHUNK_ELEMS // cols)
    pos = 0
    for r in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
        x *= np.float32(std)
        enc = quants.quantize(x, qt)  # F32/F16 return float arrays, the others uint8 blocks
        raw = enc.reshape(-1).view(np.uint8)
        out[pos:pos + raw.nbytes] = raw
        pos += raw.nbytes
    assert pos == out.nbytes
    return out


def write_random_gguf(path, preset, *, weight_type="Q4_1", embd_type="Q8_0", seed=0,
                      tokenizer_from=None, progress=True):
    """Writes a random-weight LLaMA GGUF of the preset's shape to `path`.
    Returns a dict describing it (sizes, parameter counts, seconds taken)."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    name = preset if isinstance(preset, str) else cfg.get("name", "custom")
    wt, et = QT[weight_type], QT[embd_type]
    tok_src = Path(tokenizer_from) if tokenizer_from else default_tokenizer_source()
    tok = tokenizer_metadata(tok_src)
    vocab = len(next(v for k, v, *_ in tok if k == "tokenizer.ggml.tokens"))
    hd = cfg["dim"] // cfg["n_heads"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".part{os.getpid()}")

    t0 = time.perf_counter()
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"random-llama-{name}")
    w.add_description(f"random weights (seed {seed}, std {LINEAR_STD}) in the layer shape of "
                      f"{cfg['shape_of']}; tokenizer and vocabulary ({vocab} tokens) copied from "
                      f"{tok_src.name}; written by deelm benchmarks/random_gguf.py for benchmarks only")
    add_llama_metadata(w, cfg)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    w.add_file_type(FILE_TYPES[weight_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tok:
        w.add_key_value(key, value, vtype, sub_type=sub)

    plan = _tensor_plan(cfg, vocab, wt, et)
    for tname, shape, qt, _ in plan:
        # the element shape with a non-uint8 dtype: the writer takes it as is
        w.add_tensor_info(tname, shape, np.float32, _nbytes(shape, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = len(plan)
    for i, (tname, shape, qt, kind) in enumerate(plan):
        rng = np.random.default_rng([seed, i])
        w.write_tensor_data(_encode_tensor(shape, qt, kind, rng))
        if progress and (i % 20 == 0 or i == total - 1):
            print(f"  [{i + 1}/{total}] {tname} {qt.name} {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
    w.close()
    os.replace(tmp, path)
    seconds = time.perf_counter() - t0
    counts = param_counts(cfg, vocab)
    return {"path": str(path), "preset": name, "shape_of": cfg["shape_of"], "weight_type": weight_type,
            "embd_type": embd_type, "seed": seed, "vocab": vocab, "real_vocab": cfg.get("real_vocab"),
            "params_layers": counts["layers"], "params_embedding": counts["embedding"],
            "file_bytes": path.stat().st_size, "seconds": seconds}

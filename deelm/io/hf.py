"""Reading a Hugging Face model directory: config.json, safetensors weights, tokenizer files.

The weights are `model.safetensors`, or shards named by
`model.safetensors.index.json`, read by deelm.io.safetensors.

Hugging Face q/k projections are in the "rotate half" row order the C core
runs as ROPE_HALF, so no rows are permuted (GGUF LLaMA files need the
interleaved order instead).

Gemma-3 (Gemma3ForCausalLM, Gemma3TextModel) runs the block GGUF Gemma-3
files run, configured by layout.gemma3_features from config.json's
numbers. Gemma's RMSNorm multiplies by 1 + w: each norm weight is decoded
and handed to the C core as the float32 array 1 + w (llama.cpp's converter
stores the same in GGUF files), owned by the HFCheckpoint.
"""
from dataclasses import dataclass, field
import json
import math
from pathlib import Path
import re

import numpy as np

from deelm import _core
from deelm.errors import ModelFileError, UnsupportedModelError
from deelm.io.layout import (GEMMA3_LAYER_TENSORS, GEMMA3_LOCAL_ROPE_BASE, GEMMA3_PATTERN,
                             LAYER_TENSORS, ROPE_HALF, ModelFile, gemma3_features,
                             gemma3_local_layers, linear_scaled, rope_inv_freq)
from deelm.io.safetensors import DTYPES, map_file, read_safetensors_header

HF_CONFIG_FILE = "config.json"


def is_hf_directory(path):
    """A folder holding config.json and safetensors weights."""
    path = Path(path)
    return (path.is_dir() and (path / HF_CONFIG_FILE).is_file()
            and any(path.glob("*.safetensors")))

# config.json "architectures" -> deelm's architecture name. LLaMA, Mistral
# and Qwen2 are LLaMA's block (RMSNorm, RoPE, grouped-query attention,
# SwiGLU); Qwen2 adds q/k/v biases. Gemma-3 adds q/k and post norms, GeGLU
# and sliding-window layers. The bare *Model classes (no vocabulary head)
# have the same weights without the "model." prefix.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "LlamaModel": "llama",
    "MistralForCausalLM": "mistral", "MistralModel": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen2Model": "qwen2",
    "Gemma3ForCausalLM": "gemma3", "Gemma3TextModel": "gemma3",
}
# transformers' defaults for keys a config.json may leave out
_DEFAULT_CONTEXT = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "gemma3": 131072}
# Gemma3TextConfig's defaults (its global rope base is not LLaMA's 10000)
_GEMMA3_DEFAULTS = dict(num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=4096, rope_theta=1e6)
_GEMMA3_ACTIVATION = "gelu_pytorch_tanh"  # GELU, tanh approximation: the C core's gelu_tanh

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Hugging Face tensor name (after the optional "model." prefix) -> deelm name
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GEMMA3_LAYER_NAMES = dict(
    _LAYER_NAMES, post_attention_layernorm="post_attention_norm",
    pre_feedforward_layernorm="ffn_norm", post_feedforward_layernorm="post_ffw_norm",
    **{"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
# architecture -> (Hugging Face layer tensor name -> deelm name, the names a block needs)
_BLOCKS = {"llama": (_LAYER_NAMES, LAYER_TENSORS), "mistral": (_LAYER_NAMES, LAYER_TENSORS),
           "qwen2": (_LAYER_NAMES, LAYER_TENSORS),
           "gemma3": (_GEMMA3_LAYER_NAMES, GEMMA3_LAYER_TENSORS)}
_LAYER_RE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)\.(weight|bias)$")
_BIASED = ("attn_q", "attn_k", "attn_v")  # the biases the C core adds (Qwen2)
# tensors a checkpoint may hold that embeddings never need: the vocabulary
# head and RoPE tables that old transformers versions saved
_IGNORED_RE = re.compile(r"^lm_head\.weight$|(^|\.)rotary_emb\.inv_freq$")


@dataclass
class HFCheckpoint(ModelFile):
    """What deelm reads from a Hugging Face model directory (mappings: one per shard)."""

    # deelm name -> the checked safetensors entry (TensorInfo) it was read from
    stored: dict = field(default_factory=dict, repr=False)
    # what the rotary frequencies were computed from: theta, scaling (type)
    # and, for models with local layers, local_theta and local_scaling
    rope: dict = field(default_factory=dict)

    def tokenizer(self):
        """The deelm Tokenizer of the directory's tokenizer.json or tokenizer.model."""
        from deelm.io.tokenizer import Tokenizer

        return Tokenizer.from_hf_directory(self.path, self.config["vocab_size"])


# ------------------------------------------------------------------ config.json

def _read_json(path, what):
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(path, "no such file") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot be read ({e.strerror})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(path, f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ModelFileError(path, f"{what} should be a JSON object")
    return value


def _int(cfg, key, path, default=None, limit=1 << 24):
    v = cfg.get(key)
    if v is None:
        if default is None:
            raise ModelFileError(path, f"'{key}' is missing")
        return default
    if type(v) is not int or not 0 < v <= limit:
        raise ModelFileError(path, f"'{key}' = {v!r} should be an integer in 1..{limit}")
    return v


def _number(d, key, path, default=None, where=""):
    v = d.get(key, default)
    if v is None:
        raise ModelFileError(path, f"'{where}{key}' is missing")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ModelFileError(path, f"'{where}{key}' = {v!r} should be a positive number")
    return float(v)


def _architecture(cfg, path):
    archs = cfg.get("architectures")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise UnsupportedModelError(path, f"'architectures' is missing or not a list of names; "
                                          f"deelm runs {supported}")
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a]
    raise UnsupportedModelError(path, f"architecture {', '.join(archs)} is not supported by deelm "
                                      f"(supported: {supported})")


def _json_object(value, key, path):
    """value ({} for null), or ModelFileError if it is not a JSON object."""
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise ModelFileError(path, f"'{key}' = {value!r} is not a JSON object")
    return value


_ROPE_KINDS = ("default", "linear", "dynamic", "llama3")


def _rope(cfg, path, head_dim, context):
    """(inv_freq [head_dim/2] float32, theta, scaling type) for the config's
    rope_theta and scaling.

    Reads transformers 5's `rope_parameters` (rope_theta inside) and the
    older top-level `rope_theta` + `rope_scaling`, whose type is under
    `rope_type` (newer) or `type` (older)."""
    params = cfg.get("rope_parameters")
    if params is not None:
        params = _json_object(params, "rope_parameters", path)
        if any(isinstance(v, dict) for v in params.values()):
            raise UnsupportedModelError(path, "per-layer-type rope_parameters are not supported")
        scaling, where = params, "rope_parameters."
        theta = _number(params, "rope_theta", path, cfg.get("rope_theta", 10000.0), where)
    else:
        scaling, where = _json_object(cfg.get("rope_scaling"), "rope_scaling", path), "rope_scaling."
        theta = _number(cfg, "rope_theta", path, 10000.0)
    return _scaled_inv_freq(cfg, scaling, where, path, head_dim, theta, context, _ROPE_KINDS)


def _scaled_inv_freq(cfg, scaling, where, path, head_dim, theta, context, kinds):
    """(inv_freq, theta, type) of one set of rope parameters `scaling`
    (named `where` in messages), for a type among `kinds`."""
    for d, w in ((cfg, ""), (scaling, where)):
        prf = d.get("partial_rotary_factor", 1.0)
        if prf != 1.0:
            raise UnsupportedModelError(path, f"partial rotary embedding ('{w}partial_rotary_factor' "
                                              f"= {prf!r}) is not supported")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = "default" if kind in (None, "none") else kind
    if kind not in kinds:
        raise UnsupportedModelError(path, f"rope scaling type '{kind}' is not supported (supported: "
                                          f"{', '.join(kinds)})")
    inv_freq = rope_inv_freq(head_dim, theta)
    if kind == "linear":
        inv_freq = linear_scaled(inv_freq, _number(scaling, "factor", path, where=where))
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling, path, where, context)
    # Dynamic NTK changes the frequencies only for sequences longer than
    # max_position_embeddings; deelm's context length is capped at that,
    # where transformers uses the plain frequencies too: exact as is.
    return inv_freq, theta, kind


def _llama3_inv_freq(inv_freq, scaling, path, where, context):
    """LLaMA 3.1's frequency scaling, in float32 as transformers computes it:
    wavelengths shorter than original_max_position_embeddings /
    high_freq_factor keep their frequency, those longer than
    original_max_position_embeddings / low_freq_factor are divided by
    factor, and the ones between are blended linearly in 1 / wavelength."""
    factor = _number(scaling, "factor", path, where=where)
    low = _number(scaling, "low_freq_factor", path, where=where)
    high = _number(scaling, "high_freq_factor", path, where=where)
    old_context = _number(scaling, "original_max_position_embeddings", path, context, where)
    if high <= low:
        raise ModelFileError(path, f"'{where}high_freq_factor' ({high}) must exceed "
                                   f"'{where}low_freq_factor' ({low})")
    f32 = np.float32
    low_wavelen, high_wavelen = f32(old_context / low), f32(old_context / high)
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / f32(factor), inv_freq)
    smooth = (f32(old_context) / wavelen - f32(low)) / f32(high - low)
    blended = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def _context_length(cfg, path, arch):
    """max_position_embeddings, capped at the attention window where the
    model uses sliding-window attention (Mistral's sliding_window, Qwen2's
    use_sliding_window): deelm attends to the whole sentence, which is what
    the model does for sequences up to the window, so keeping
    max_seq_length within it keeps the results exact."""
    context = _int(cfg, "max_position_embeddings", path, _DEFAULT_CONTEXT[arch], limit=1 << 30)
    window = cfg.get("sliding_window")
    uses_window = (arch == "mistral" or (arch == "qwen2" and cfg.get("use_sliding_window")))
    if uses_window and window is not None:
        context = min(context, _int(cfg, "sliding_window", path, limit=1 << 30))
    return context


def _model_config(cfg, path, arch):
    """(the C core's config, context length, what the rope was computed from)."""
    quant = cfg.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise UnsupportedModelError(path, f"quantized checkpoints (quantization_config, method "
                                          f"'{method}') are not supported; use a GGUF file")
    defaults = _GEMMA3_DEFAULTS if arch == "gemma3" else {}
    n_layers = _int(cfg, "num_hidden_layers", path, limit=4096)
    dim = _int(cfg, "hidden_size", path)
    hidden = _int(cfg, "intermediate_size", path)
    n_heads = _int(cfg, "num_attention_heads", path, limit=4096)
    n_kv = _int(cfg, "num_key_value_heads", path, defaults.get("num_key_value_heads", n_heads),
                limit=4096)
    if n_heads % n_kv:
        raise ModelFileError(path, f"num_attention_heads {n_heads} is not a multiple of "
                                   f"num_key_value_heads {n_kv}")
    default_head_dim = defaults.get("head_dim", dim // n_heads if dim % n_heads == 0 else None)
    if cfg.get("head_dim") is None and default_head_dim is None:
        raise ModelFileError(path, f"hidden_size {dim} is not a multiple of num_attention_heads "
                                   f"{n_heads} (and head_dim is not given)")
    head_dim = _int(cfg, "head_dim", path, default_head_dim)
    if head_dim % 2:
        raise ModelFileError(path, f"head_dim {head_dim} is odd; rotary embeddings need pairs")
    config = dict(n_layers=n_layers, dim=dim, hidden_dim=hidden, n_heads=n_heads, n_kv_heads=n_kv,
                  head_dim=head_dim, vocab_size=_int(cfg, "vocab_size", path, limit=1 << 26),
                  rms_eps=_number(cfg, "rms_norm_eps", path, 1e-6), rope_style=ROPE_HALF)
    context = _context_length(cfg, path, arch)
    rope_context = cfg.get("max_position_embeddings") or context
    if arch == "gemma3":
        features, rope = _gemma3_config(cfg, path, config, rope_context)
        config.update(features)
        return config, context, rope
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(path, f"hidden_act '{act}' is not supported (deelm runs SwiGLU "
                                          f"with silu)")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(path, "'mlp_bias': biases on the MLP are not supported")
    config["inv_freq"], theta, kind = _rope(cfg, path, head_dim, rope_context)
    return config, context, dict(theta=theta, scaling=kind)


def _gemma3_config(cfg, path, config, context):
    """Gemma3TextConfig's keys as the C core's config entries
    (layout.gemma3_features), and what the rope was computed from.

    - hidden_activation must be gelu_pytorch_tanh; attention logit
      softcapping (Gemma-2's) must be off: deelm has none (the final logit
      softcapping acts on the vocabulary head, which deelm never runs);
    - attention scale query_pre_attn_scalar ** -0.5;
    - local layers: `layer_types` ("sliding_attention" / "full_attention"),
      or, in configs older than it, every `sliding_window_pattern`-th layer
      global (default 6), as transformers derives layer_types;
    - rope: transformers 5's per-layer-type `rope_parameters`
      ({"full_attention": {...}, "sliding_attention": {...}}), or the older
      `rope_theta` + `rope_scaling` for the global layers and
      `rope_local_base_freq` for the local ones (which transformers never
      scales); types default and linear, under `rope_type` (the older
      `type` key is refused: transformers 4 and 5 read it differently).
    """
    act = cfg.get("hidden_activation", _GEMMA3_ACTIVATION)
    if act != _GEMMA3_ACTIVATION:
        raise UnsupportedModelError(path, f"hidden_activation {act!r} is not supported (deelm runs "
                                          f"Gemma's GeGLU with {_GEMMA3_ACTIVATION})")
    if cfg.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(path, f"attn_logit_softcapping = "
                                          f"{cfg['attn_logit_softcapping']!r}: softcapped attention "
                                          f"scores are not supported")
    if cfg.get("attention_bias"):
        raise UnsupportedModelError(path, "'attention_bias': biases on the attention projections "
                                          "are not supported")
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            path, "use_bidirectional_attention (every layer bidirectional, with the sliding "
                  "window halved, as in EmbeddingGemma) is not supported: deelm sets the layers' "
                  "direction itself (bidirectional_from)")
    L = config["n_layers"]
    attn_scale = _number(cfg, "query_pre_attn_scalar", path,
                         _GEMMA3_DEFAULTS["query_pre_attn_scalar"]) ** -0.5

    types = cfg.get("layer_types")
    if types is not None:
        kinds = ("sliding_attention", "full_attention")
        if not isinstance(types, list) or len(types) != L:
            found = f"{len(types)} entries" if isinstance(types, list) else repr(types)[:80]
            raise ModelFileError(path, f"'layer_types' should list {L} layer types (one per "
                                       f"layer), found {found}")
        other = next((t for t in types if t not in kinds), None)
        if other is not None:
            raise UnsupportedModelError(path, f"layer type {other!r} in 'layer_types' is not "
                                              f"supported (supported: {', '.join(kinds)})")
        local = [t == "sliding_attention" for t in types]
        marks = "'layer_types' marks"
    else:
        local = gemma3_local_layers(L, _int(cfg, "sliding_window_pattern", path, GEMMA3_PATTERN,
                                            limit=1 << 16))
        marks = "the sliding_window_pattern makes"
    window = 0
    if any(local):
        if "sliding_window" in cfg and cfg["sliding_window"] is None:
            raise ModelFileError(path, f"{marks} sliding-window layers but 'sliding_window' is null")
        window = _int(cfg, "sliding_window", path, _GEMMA3_DEFAULTS["sliding_window"], limit=1 << 30)

    params, head_dim = cfg.get("rope_parameters"), config["head_dim"]
    if params is not None:
        params = _json_object(params, "rope_parameters", path)
        if not params or not all(isinstance(v, dict) for v in params.values()):
            raise ModelFileError(path, "'rope_parameters' should hold one JSON object per layer "
                                       "type ('full_attention', 'sliding_attention')")
        full = params.get("full_attention", {})
        local_params = params.get("sliding_attention", {})
        where, local_where = "rope_parameters.full_attention.", "rope_parameters.sliding_attention."
        theta = _number(full, "rope_theta", path, cfg.get("rope_theta", _GEMMA3_DEFAULTS["rope_theta"]),
                        where)
        local_theta = _number(local_params, "rope_theta", path,
                              cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE), local_where)
    else:
        full, where = _json_object(cfg.get("rope_scaling"), "rope_scaling", path), "rope_scaling."
        local_params, local_where = {}, ""
        theta = _number(cfg, "rope_theta", path, _GEMMA3_DEFAULTS["rope_theta"])
        local_theta = _number(cfg, "rope_local_base_freq", path, GEMMA3_LOCAL_ROPE_BASE)
    for d, w in ((full, where), (local_params, local_where)):
        if "type" in d and "rope_type" not in d:
            raise UnsupportedModelError(
                path, f"'{w}type' = {d['type']!r}: transformers 5 ignores this older key for "
                      f"Gemma-3 (and runs the default frequencies) where transformers 4 applied "
                      f"it; write it as '{w}rope_type'")
    kinds = ("default", "linear")
    inv_freq, theta, kind = _scaled_inv_freq(cfg, full, where, path, head_dim, theta, context, kinds)
    inv_freq_local, local_theta, local_kind = _scaled_inv_freq(
        cfg, local_params, local_where, path, head_dim, local_theta, context, kinds)
    features = gemma3_features(dim=config["dim"], local=local, window=window,
                               attn_scale=attn_scale, inv_freq=inv_freq,
                               inv_freq_local=inv_freq_local)
    return features, dict(theta=theta, scaling=kind, local_theta=local_theta,
                          local_scaling=local_kind)


# ------------------------------------------------------------------ the weight files

def _weight_files(directory):
    """[(shard path, names the index puts in it, or None)] and the file that
    lists them (for messages about missing tensors)."""
    index = directory / INDEX_FILE
    single = directory / WEIGHTS_FILE
    if index.is_file():
        data = _read_json(index, "the index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(index, "'weight_map' is missing or empty")
        shards = {}
        for tensor, shard in weight_map.items():
            if (not isinstance(shard, str) or not shard or Path(shard).name != shard
                    or shard in (".", "..")):
                raise ModelFileError(index, f"tensor '{tensor}' is mapped to {shard!r}, not a file "
                                            f"name in the model directory")
            shards.setdefault(shard, set()).add(tensor)
        for shard in sorted(shards):
            if not (directory / shard).is_file():
                raise ModelFileError(index, f"shard '{shard}' named by the index is missing from "
                                            f"{directory}")
        return [(directory / s, names) for s, names in sorted(shards.items())], index
    if single.is_file():
        return [(single, None)], single
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    if others:
        raise ModelFileError(directory, f"holds {', '.join(others[:3])} but neither {WEIGHTS_FILE} "
                                        f"nor {INDEX_FILE}")
    found = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    hint = (f" (found {found[0]}: only safetensors weights are read; save them with "
            f"save_pretrained(..., safe_serialization=True))") if found else ""
    raise ModelFileError(directory, f"no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")


def _deelm_name(name, path, arch):
    """The deelm name of a Hugging Face tensor (None for tensors embeddings
    do not use), or UnsupportedModelError for one deelm cannot run."""
    names = _BLOCKS[arch][0]
    bare = name[len("model."):] if name.startswith("model.") else name
    if bare == "embed_tokens.weight":
        return "token_embd"
    if bare == "norm.weight":
        return "output_norm"
    if _IGNORED_RE.search(name):
        return None
    m = _LAYER_RE.match(name)
    if m and m.group(2) in names:
        short = names[m.group(2)]
        if m.group(3) == "weight":
            return f"blk.{m.group(1)}.{short}"
        if short in _BIASED and arch != "gemma3":
            return f"blk.{m.group(1)}.{short}.bias"
        allowed = "none" if arch == "gemma3" else "q/k/v biases only"
        raise UnsupportedModelError(path, f"tensor '{name}': a bias on {m.group(2)} is not "
                                          f"supported (deelm's {arch} blocks have {allowed})")
    style = "a Gemma-3" if arch == "gemma3" else "a LLaMA-style"
    raise UnsupportedModelError(path, f"unexpected tensor '{name}': not part of {style} "
                                      f"block, the embedding or the final norm")


def _expected_shapes(c):
    """deelm name -> [out, in] (or [n]) in Hugging Face's order."""
    per_layer = {t["name"]: list(t["shape"]) for t in _core.layer_schema(c)}
    d = c["dim"]
    shapes = {"token_embd": [c["vocab_size"], d], "output_norm": [d]}
    for l in range(c["n_layers"]):
        for k, v in per_layer.items():
            shapes[f"blk.{l}.{k}"] = v
    return shapes


def read_hf_checkpoint(directory):
    """Reads and checks a Hugging Face model directory (config.json and
    safetensors weights). Raises ModelFileError (or UnsupportedModelError)
    naming the file and the problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFileError(directory, "no such directory")
    cfg_path = directory / HF_CONFIG_FILE
    cfg = _read_json(cfg_path, "config.json")
    arch = _architecture(cfg, cfg_path)
    config, context, rope = _model_config(cfg, cfg_path, arch)
    files, listing = _weight_files(directory)

    found, mappings, file_size = {}, [], 0  # deelm name -> (file, TensorInfo, array)
    for path, expected_names in files:
        infos, size = read_safetensors_header(path)
        file_size += size
        if expected_names is not None and set(infos) != expected_names:
            missing = sorted(expected_names - set(infos))
            extra = sorted(set(infos) - expected_names)
            what = (f"lacks tensor '{missing[0]}' that {INDEX_FILE} puts there" if missing else
                    f"holds tensor '{extra[0]}' that {INDEX_FILE} does not list")
            raise ModelFileError(path, what)
        wanted = {}
        for name, info in infos.items():
            short = _deelm_name(name, path, arch)
            if short is None:
                continue
            if short in found or short in wanted:
                raise ModelFileError(path, f"tensor '{name}' appears twice (as '{short}')")
            wanted[short] = info
        if not wanted:
            continue
        mm, buf = map_file(path)
        mappings.append(mm)
        for short, info in wanted.items():
            found[short] = (path, info, buf[info.start:info.end])

    shapes = _expected_shapes(config)
    tensors, types, stored = {}, {}, {}
    for short, (path, info, raw) in found.items():
        want = shapes.get(short)
        if want is None:  # a layer past num_hidden_layers
            raise ModelFileError(path, f"tensor '{info.name}' belongs to no layer: config.json says "
                                       f"num_hidden_layers = {config['n_layers']}")
        if list(info.shape) != want:
            raise ModelFileError(path, f"tensor '{info.name}' has shape {list(info.shape)}, "
                                       f"config.json needs {want}")
        if info.dtype not in DTYPES:
            raise UnsupportedModelError(path, f"tensor '{info.name}' has dtype {info.dtype}, which "
                                              f"deelm does not run (supported: {', '.join(DTYPES)})")
        type_id = DTYPES[info.dtype][1]
        ne0, ne1 = info.shape[-1], (info.shape[0] if len(info.shape) == 2 else 1)
        if arch == "gemma3" and short.endswith("norm"):
            raw = _one_plus(type_id, ne0 * ne1, raw)
            type_id = DTYPES["F32"][1]
        tensors[short] = (type_id, ne0, ne1, raw)
        stored[short] = info
        types[info.dtype] = types.get(info.dtype, 0) + 1

    names, block = _BLOCKS[arch]
    required = ["token_embd", "output_norm"] + [f"blk.{l}.{n}" for l in range(config["n_layers"])
                                                for n in block]
    for short in required:
        if short not in tensors:
            raise ModelFileError(listing, f"tensor '{_hf_name(short, names)}' is missing "
                                          f"(config.json says {config['n_layers']} layers)")
    return HFCheckpoint(path=directory, architecture=arch, name=directory.resolve().name,
                        config=config, tensors=tensors, tensor_types=types,
                        context_length=context, file_size=file_size, mappings=mappings,
                        stored=stored, rope=rope)


def _one_plus(type_id, n, raw):
    """A Gemma RMSNorm weight w (F32, F16 or BF16 bytes) as the float32 1 + w
    the model multiplies by, as bytes: transformers forms it in float32
    (1.0 + w.float()), so this is bitwise its factor. (The C core checks it
    for non-finite values as it checks every weight.)"""
    w = _core.dequantize(type_id, raw, n)
    return (np.float32(1.0) + w).astype(np.float32).view(np.uint8)


def _hf_name(short, names):
    """The Hugging Face name of a deelm tensor name (for messages)."""
    if short == "token_embd":
        return "model.embed_tokens.weight"
    if short == "output_norm":
        return "model.norm.weight"
    _, layer, rest = short.split(".", 2)
    hf = next(k for k, v in names.items() if v == rest)
    return f"model.layers.{layer}.{hf}.weight"

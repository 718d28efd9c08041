"""PEFT adapter folders: adapter_config.json and adapter_model.safetensors.

Adapters are PEFT's format: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys such as
``base_model.model.layers.3.self_attn.q_proj.lora_A.weight`` (a ``LlamaModel``
/ ``AutoModel`` base) or ``base_model.model.model.layers.3...`` (a
``LlamaForCausalLM`` base, as most published adapters, BeLLM's included).
Writes are atomic (:func:`deelm.io.atomic.atomic_directory`).
"""
import json
import re
import struct
from pathlib import Path

import numpy as np

from deelm.adapters.lora import (MODULE_IDS, MODULES, PREFIX_CAUSAL_LM, PREFIX_MODEL, LoraConfig, LoraLayout, _SUBLAYER, _is_int, _model_dims, gguf_to_hf_rows, hf_to_gguf_rows)
from deelm.errors import AdapterError, LoraConfigError
from deelm.io.atomic import atomic_directory

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_FILE_BIN = "adapter_model.bin"
_KEY_RE = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\."
                     r"(\w+)\.lora_([AB])\.weight$")



def peft_config_dict(config, base_model_name=None, causal_lm=False):
    """adapter_config.json contents for `config`, with the keys PEFT's LoraConfig knows."""
    alpha = int(config.alpha) if float(config.alpha).is_integer() else float(config.alpha)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal_lm else "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model_name,
        "inference_mode": True,
        "r": int(config.r),
        "lora_alpha": alpha,
        "lora_dropout": float(config.dropout),
        "target_modules": list(config.target_modules),
        "layers_to_transform": None if config.layers is None else list(config.layers),
        # PEFT finds the layer index in a module name through this pattern.
        "layers_pattern": None if config.layers is None else "layers",
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "use_rslora": bool(config.use_rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "exclude_modules": None,
        "layer_replication": None,
        "revision": None,
    }


def adapter_tensors(layout, params, causal_lm=False):
    """PEFT-named float32 tensors of `params`, q/k B rows in Hugging Face order."""
    params = np.asarray(params, dtype=np.float32).reshape(-1)
    if params.size != layout.size:
        raise ValueError(f"params has {params.size} values, the layout {layout.size}")
    prefix = PREFIX_CAUSAL_LM if causal_lm else PREFIX_MODEL
    tensors = {}
    for i in range(len(layout)):
        b = layout.lora_B(params, i)
        heads = layout.q_k_heads(i)
        stem = layout.key(i, prefix)
        tensors[stem + ".lora_A.weight"] = np.ascontiguousarray(layout.lora_A(params, i))
        tensors[stem + ".lora_B.weight"] = np.ascontiguousarray(
            b if heads is None else gguf_to_hf_rows(b, heads))
    return tensors


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def _write_tensors(path, tensors):
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def write_adapter_files(directory, layout, params, base_model_name=None, causal_lm=False,
                        dtype="float32"):
    """Writes the two adapter files into an existing directory (not atomic by
    itself); dtype "float16" halves the file (PEFT and deelm load either)."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"adapter dtype must be 'float32' or 'float16', got {dtype!r}")
    directory = Path(directory)
    tensors = {k: v.astype(dtype) for k, v in adapter_tensors(layout, params, causal_lm).items()}
    _write_tensors(directory / WEIGHTS_FILE, tensors)
    _write_json(directory / CONFIG_FILE, peft_config_dict(layout.config, base_model_name, causal_lm))


def save_adapter(directory, layout, params, base_model_name=None, causal_lm=False):
    """Saves LoRA parameters as a PEFT adapter directory, atomically.

    Keys are those PEFT writes for a ``LlamaModel`` / ``AutoModel`` base
    (task FEATURE_EXTRACTION); ``causal_lm=True`` writes them for a
    ``LlamaForCausalLM`` base instead (``base_model.model.model.layers...``,
    task CAUSAL_LM). Returns the directory path.
    """
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        write_adapter_files(tmp, layout, params, base_model_name, causal_lm)
    return directory


# PEFT options deelm cannot honour: config key -> (value meaning "off", why).
_UNSUPPORTED = {
    "use_dora": (False, "DoRA adapters (use_dora) are not supported"),
    "fan_in_fan_out": (False, "fan_in_fan_out adapters (Conv1D-style weights) are not supported"),
    "bias": ("none", "only bias='none' is supported (deelm trains no biases)"),
    "lora_bias": (False, "lora_bias (a bias on lora_B) is not supported"),
    "modules_to_save": (None, "modules_to_save (fully trained extra modules) is not supported"),
    "layer_replication": (None, "layer_replication is not supported"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported"),
    "target_parameters": (None, "target_parameters (LoRA on raw parameters) is not supported"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) is not supported"),
}


def _read_config(path):
    if not path.is_file():
        raise AdapterError(path, f"missing {CONFIG_FILE}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(path, f"not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(path, "expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(path, f"peft_type is {cfg.get('peft_type')!r}; only LORA is supported")
    for key, (off, why) in _UNSUPPORTED.items():
        value = cfg.get(key, off)
        if value != off and not (off is None and value in ([], {}, "")):
            raise AdapterError(path, f"{why} (found {key}={value!r})")
    return cfg


def _bf16_tensor(path, key):
    """Reads one BF16 tensor of a safetensors file as float32 (NumPy has no bfloat16)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        info = json.loads(fh.read(n))[key]
        begin, end = info["data_offsets"]
        fh.seek(8 + n + begin)
        raw = np.frombuffer(fh.read(end - begin), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def _read_safetensors(path):
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                if f.get_slice(key).get_dtype() == "BF16":
                    out[key] = _bf16_tensor(path, key)
                else:
                    out[key] = f.get_tensor(key)
        return out
    except Exception as e:
        raise AdapterError(path, f"corrupt or truncated safetensors file ({type(e).__name__}: {e})") \
            from None


def _read_bin(path):
    try:
        import torch
    except ImportError:
        raise AdapterError(path, "reading adapter_model.bin needs torch (pip install torch), or "
                           "convert the adapter to adapter_model.safetensors") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise AdapterError(path, f"cannot read the torch file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise AdapterError(path, "expected a state dict of tensors")
    return {k: v.detach().float().numpy() for k, v in state.items()}


def read_adapter_tensors(directory):
    """(path, {key: array}) of an adapter's weights: safetensors if present, else the .bin."""
    directory = Path(directory)
    st, binf = directory / WEIGHTS_FILE, directory / WEIGHTS_FILE_BIN
    if st.is_file():
        return st, _read_safetensors(st)
    if binf.is_file():
        return binf, _read_bin(binf)
    raise AdapterError(directory, f"no {WEIGHTS_FILE} or {WEIGHTS_FILE_BIN}")


def _parse_keys(path, tensors):
    """{(layer, module): {"A": array, "B": array, "key": stem}} from PEFT key names."""
    entries, unexpected = {}, []
    for key, arr in tensors.items():
        m = _KEY_RE.match(key)
        if not m or m.group(3) not in MODULE_IDS or _SUBLAYER[m.group(3)] != m.group(2):
            unexpected.append(key)
            continue
        e = entries.setdefault((int(m.group(1)), m.group(3)), {"key": key[:-len(".lora_A.weight")]})
        e[m.group(4)] = arr
    if unexpected:
        raise AdapterError(path, f"unexpected tensors {sorted(unexpected)[:5]}: deelm reads LoRA "
                           f"A/B weights of {', '.join(MODULES)} only")
    if not entries:
        raise AdapterError(path, "holds no LoRA weights")
    for (layer, module), e in sorted(entries.items()):
        for ab in "AB":
            if ab not in e:
                raise AdapterError(path, f"{e['key']}.lora_{ab}.weight is missing")
    return entries


def _config_from_file(cfg_path, cfg, entries, n_layers):
    layers = sorted({l for l, _ in entries})
    modules = sorted({m for _, m in entries}, key=MODULE_IDS.__getitem__)
    if layers[-1] >= n_layers:
        raise AdapterError(cfg_path, f"has weights for layer {layers[-1]}, but the model has "
                           f"{n_layers} layers (0..{n_layers - 1})")
    declared = cfg.get("target_modules")
    if isinstance(declared, (list, tuple)):
        unknown = sorted(set(declared) - set(MODULE_IDS))
        if unknown:
            raise AdapterError(cfg_path, f"targets unknown modules {unknown}: deelm supports "
                               f"{', '.join(MODULES)}")
        missing = sorted(set(declared) - set(modules))
        if missing:
            raise AdapterError(cfg_path, f"targets {missing} but the weights file has no LoRA "
                               "weights for them")
    want_layers = cfg.get("layers_to_transform")
    if want_layers is not None:
        want_layers = [want_layers] if _is_int(want_layers) else list(want_layers)
        if sorted(want_layers) != layers:
            raise AdapterError(cfg_path, f"layers_to_transform is {want_layers} but the weights "
                               f"cover layers {layers}")
    for layer in layers:
        for module in modules:
            if (layer, module) not in entries:
                raise AdapterError(cfg_path, f"weights cover {module} on some layers but not on "
                                   f"layer {layer}: deelm needs the same modules on every layer")
    try:
        return LoraConfig(
            r=cfg.get("r", 8), alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout", 0.0),
            target_modules=tuple(modules),
            layers=None if layers == list(range(n_layers)) else tuple(layers),
            use_rslora=bool(cfg.get("use_rslora", False)),
            rank_pattern=cfg.get("rank_pattern") or {}, alpha_pattern=cfg.get("alpha_pattern") or {})
    except LoraConfigError as e:
        raise AdapterError(cfg_path, str(e)) from None


def load_adapter(directory, model_cfg):
    """Reads a PEFT LoRA adapter for a model; returns (LoraConfig, LoraLayout, params).

    Accepts keys saved for a CausalLM base (``base_model.model.model.layers.``)
    or a bare-model base (``base_model.model.layers.``), ``adapter_model.safetensors``
    (F32, F16 or BF16) or ``adapter_model.bin`` (needs torch), and honours
    rank_pattern / alpha_pattern. Raises AdapterError, naming the file, for
    missing or corrupt files, unsupported PEFT options (DoRA, biases,
    fan_in_fan_out, modules_to_save...) and anything that does not fit the
    model (layers out of range, unknown modules, wrong shapes). q/k B rows
    come back in the model's row order (GGUF's for interleaved RoPE).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(directory, "no such adapter directory")
    cfg_path = directory / CONFIG_FILE
    cfg = _read_config(cfg_path)
    dims = _model_dims(model_cfg)
    weights_path, tensors = read_adapter_tensors(directory)
    entries = _parse_keys(weights_path, tensors)
    config = _config_from_file(cfg_path, cfg, entries, dims["n_layers"])
    layout = LoraLayout(config, dims)
    params = np.zeros(layout.size, dtype=np.float32)
    for i in range(len(layout)):
        layer, mid, rank, n_in, n_out = (int(v) for v in layout.table[i, :5])
        e = entries[(layer, MODULES[mid])]
        for ab, want, dst in (("A", (rank, n_in), layout.lora_A(params, i)),
                              ("B", (n_out, rank), layout.lora_B(params, i))):
            arr = np.asarray(e[ab])
            key = f"{e['key']}.lora_{ab}.weight"
            if arr.shape != want:
                raise AdapterError(weights_path, f"{key} has shape {list(arr.shape)}, the model "
                                   f"needs {list(want)} (rank {rank}, {MODULES[mid]} is "
                                   f"{n_in} -> {n_out})")
            if not np.isfinite(arr).all():
                raise AdapterError(weights_path, f"{key} has non-finite values")
            heads = layout.q_k_heads(i) if ab == "B" else None
            dst[...] = arr if heads is None else hf_to_gguf_rows(arr, heads)
    return config, layout, params


# the settings a DeeLM adapter was trained with (k, pooling, prompt, base model), beside PEFT's files
DEELM_CONFIG_FILE = "deelm_config.json"


def read_deelm_config(directory):
    """deelm_config.json of an adapter folder, or {} (PEFT-made adapters have none)."""
    path = Path(directory) / DEELM_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        from deelm.errors import AdapterError

        raise AdapterError(path, f"not valid JSON ({e})") from None

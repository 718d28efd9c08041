"""LoRA parameters: configuration, the flat buffer layout the C core reads, PEFT adapters.

LoRA adds ``scale * B @ A`` to a frozen projection W [out, in], with A [r, in],
B [out, r] and ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). deelm
keeps all A and B matrices in **one** contiguous float32 buffer so the C core
and the optimiser (:mod:`deelm.optim`) each see a single array:

    for each layer (increasing), for each targeted module (by id):
        A [r, in] row-major, then B [out, r] row-major

:class:`LoraLayout` describes that buffer: ``table`` (int64 [n, 7]: layer,
module_id, rank, in_dim, out_dim, off_A, off_B, offsets in floats),
``scales`` (float32 [n]) and ``size``. The C core consumes exactly these.

Row order of q/k. llama.cpp's converter stores LLaMA's q_proj/k_proj rows
permuted for interleaved RoPE: GGUF row ``h*hd + 2*j + i`` holds Hugging Face
row ``h*hd + i*(hd/2) + j`` (head h, i in {0, 1}, j < hd/2), and transformers'
GGUF loader undoes it (``LlamaTensorProcessor._reverse_permute_weights``).
When the model's ``rope_style`` is interleaved (0, GGUF), B of q_proj and
k_proj is kept in GGUF row order inside deelm, so it adds straight onto the
weights the C core holds; :func:`save_adapter` converts to Hugging Face order
and :func:`load_adapter` back, so adapters on disk are always in PEFT's
(Hugging Face's) order. A is never permuted (its rows are the rank).

Adapters are PEFT's format: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys such as
``base_model.model.layers.3.self_attn.q_proj.lora_A.weight`` (a ``LlamaModel``
/ ``AutoModel`` base) or ``base_model.model.model.layers.3...`` (a
``LlamaForCausalLM`` base, as most published adapters, BeLLM's included).
Writes are atomic (:func:`atomic_directory`).
"""
import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _core
from .errors import AdapterError, LoraConfigError
from .model_file import ROPE_INTERLEAVED

MODULES = _core.LORA_MODULES  # the C core's module table (csrc/schema.c) owns them
MODULE_IDS = {name: i for i, name in enumerate(MODULES)}
_SUBLAYER = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
             "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
TABLE_COLUMNS = ("layer", "module_id", "rank", "in_dim", "out_dim", "off_A", "off_B")
MODEL_KEYS = ("n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "rope_style")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
WEIGHTS_FILE_BIN = "adapter_model.bin"
PREFIX_MODEL = "base_model.model.layers."            # PEFT on LlamaModel / AutoModel
PREFIX_CAUSAL_LM = "base_model.model.model.layers."  # PEFT on LlamaForCausalLM
_KEY_RE = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\."
                     r"(\w+)\.lora_([AB])\.weight$")


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class LoraConfig:
    """Which projections get LoRA, with what rank and scale.

    ``layers`` None means every layer; otherwise the 0-based layer indices
    (PEFT's ``layers_to_transform``). ``rank_pattern`` / ``alpha_pattern``
    override r / alpha for modules whose name matches, as in PEFT (keys are
    regular expressions matched at the end of names such as
    ``layers.3.self_attn.q_proj``). Invalid values raise LoraConfigError.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple = MODULES
    layers: tuple | None = None
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def __post_init__(self):
        if not _is_int(self.r) or self.r < 1:
            raise LoraConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise LoraConfigError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise LoraConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        modules = (self.target_modules,) if isinstance(self.target_modules, str) \
            else tuple(self.target_modules)
        unknown = [m for m in modules if m not in MODULE_IDS]
        if unknown:
            raise LoraConfigError(f"unknown target modules {unknown}: deelm puts LoRA on "
                                  f"{', '.join(MODULES)}")
        if not modules:
            raise LoraConfigError("target_modules is empty")
        object.__setattr__(self, "target_modules",
                           tuple(sorted(set(modules), key=MODULE_IDS.__getitem__)))
        if self.layers is not None:
            layers = (self.layers,) if _is_int(self.layers) else tuple(self.layers)
            bad = [l for l in layers if not _is_int(l) or l < 0]
            if bad or not layers:
                raise LoraConfigError(f"layers must be non-negative layer indices, got "
                                      f"{self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(int(l) for l in layers))))
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name) or {}
            if not isinstance(pattern, Mapping):
                raise LoraConfigError(f"{name} must map module names to values, got {pattern!r}")
            pattern = dict(pattern)
            for key, value in pattern.items():
                ok = (_is_int(value) and value >= 1) if name == "rank_pattern" else \
                    (isinstance(value, (int, float)) and math.isfinite(value) and value > 0)
                if not ok:
                    raise LoraConfigError(f"{name}[{key!r}] must be positive, got {value!r}")
            object.__setattr__(self, name, pattern)

    def layer_indices(self, n_layers):
        """The targeted layers for a model of `n_layers`; LoraConfigError if one is out of range."""
        if self.layers is None:
            return tuple(range(n_layers))
        out = [l for l in self.layers if l >= n_layers]
        if out:
            raise LoraConfigError(f"LoRA layers {out} are out of range: the model has "
                                  f"{n_layers} layers (0..{n_layers - 1})")
        return self.layers

    def rank_alpha(self, layer, module):
        """(rank, alpha) of one module after rank_pattern / alpha_pattern."""
        names = (f"layers.{layer}.{_SUBLAYER[module]}.{module}",
                 f"model.layers.{layer}.{_SUBLAYER[module]}.{module}")
        return (_pattern_value(self.rank_pattern, names, self.r),
                _pattern_value(self.alpha_pattern, names, self.alpha))

    def scale(self, rank, alpha):
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(pattern, names, default):
    # PEFT's get_pattern_key: the first key (in order) that matches at the end of a name.
    for key, value in pattern.items():
        if any(re.match(rf"(.*\.)?({key})$", n) for n in names):
            return value
    return default


def _model_dims(model_cfg):
    missing = [k for k in MODEL_KEYS if k not in model_cfg]
    if missing:
        raise LoraConfigError(f"model config lacks {missing} (pass DeeLM.config)")
    dims = {k: int(model_cfg[k]) for k in MODEL_KEYS}
    if dims["rope_style"] == ROPE_INTERLEAVED and dims["head_dim"] % 2:
        raise LoraConfigError(f"interleaved RoPE needs an even head_dim, got {dims['head_dim']}")
    return dims


def module_shapes(model_cfg):
    """(in_dim, out_dim) of each projection, by module name."""
    m = _model_dims(model_cfg)
    return {t["module"]: (t["shape"][1], t["shape"][0])
            for t in _core.layer_schema({**m, "vocab_size": 1}) if t["module"]}


class LoraLayout:
    """Where each LoRA matrix lives in the flat float32 parameter buffer.

    ``table`` int64 [n_entries, 7] with columns :data:`TABLE_COLUMNS`,
    ``scales`` float32 [n_entries], ``size`` the buffer length in floats.
    ``model`` keeps the model dimensions the layout was made for.
    """

    def __init__(self, config, model_cfg):
        self.config = config
        self.model = _model_dims(model_cfg)
        shapes = module_shapes(self.model)
        rows, scales = [], []
        for layer in config.layer_indices(self.model["n_layers"]):
            for module in config.target_modules:
                rank, alpha = config.rank_alpha(layer, module)
                rows.append((layer, MODULE_IDS[module], rank, *shapes[module]))
                scales.append(config.scale(rank, alpha))
        t = np.zeros((len(rows), 7), dtype=np.int64)
        t[:, :5] = rows
        a_size, b_size = t[:, 2] * t[:, 3], t[:, 4] * t[:, 2]
        ends = np.cumsum(a_size + b_size)
        t[:, 5] = ends - a_size - b_size
        t[:, 6] = t[:, 5] + a_size
        self.table = t
        self.scales = np.asarray(scales, dtype=np.float32)
        self.size = int(ends[-1])

    def __len__(self):
        return len(self.table)

    def __repr__(self):
        return (f"LoraLayout({len(self)} A/B pairs, {self.size:,} floats, "
                f"r={self.config.r}, modules={list(self.config.target_modules)})")

    def index(self, layer, module):
        """Row of `table` for (layer, module name)."""
        hit = np.flatnonzero((self.table[:, 0] == layer) & (self.table[:, 1] == MODULE_IDS[module]))
        if not hit.size:
            raise KeyError(f"no LoRA on layer {layer} {module}")
        return int(hit[0])

    def lora_A(self, params, i):
        """View [rank, in] of entry i's A inside `params` (writes go to the buffer)."""
        _, _, r, n_in, _, off, _ = self.table[i]
        return params[off:off + r * n_in].reshape(r, n_in)

    def lora_B(self, params, i):
        """View [out, rank] of entry i's B inside `params`."""
        _, _, r, _, n_out, _, off = self.table[i]
        return params[off:off + n_out * r].reshape(n_out, r)

    def q_k_heads(self, i):
        """Heads to permute B rows by for entry i (q_proj, k_proj), or None."""
        module = MODULES[self.table[i, 1]]
        if self.model["rope_style"] != ROPE_INTERLEAVED:
            return None
        return {"q_proj": self.model["n_heads"], "k_proj": self.model["n_kv_heads"]}.get(module)

    def key(self, i, prefix=PREFIX_MODEL):
        """PEFT's key stem (without ``.lora_A.weight``) of entry i."""
        layer, mid = int(self.table[i, 0]), int(self.table[i, 1])
        return f"{prefix}{layer}.{_SUBLAYER[MODULES[mid]]}.{MODULES[mid]}"

    def same_as(self, other):
        return (np.array_equal(self.table, other.table) and np.array_equal(self.scales, other.scales)
                and self.model == other.model)


def init_params(layout, seed=0):
    """A new float32 parameter buffer initialised as PEFT does.

    A ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's kaiming_uniform_ with a=sqrt(5),
    what PEFT uses for lora_A), B = 0, so training starts from the base model.
    """
    rng = np.random.default_rng(seed)
    params = np.zeros(layout.size, dtype=np.float32)
    for i in range(len(layout)):
        a = layout.lora_A(params, i)
        bound = 1.0 / math.sqrt(a.shape[1])
        a[...] = rng.uniform(-bound, bound, size=a.shape)
    return params


def hf_to_gguf_rows(x, n_heads):
    """Rows of a q/k-projection-shaped array from Hugging Face order to GGUF's interleaved order.

    What llama.cpp's converter (``LlamaModel.permute``) does to q_proj/k_proj.
    """
    x = np.asarray(x)
    return x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, *x.shape[1:]) \
        .swapaxes(1, 2).reshape(x.shape)


def gguf_to_hf_rows(x, n_heads):
    """Inverse of :func:`hf_to_gguf_rows` (transformers' GGUF loader does the same)."""
    x = np.asarray(x)
    return x.reshape(n_heads, x.shape[0] // n_heads // 2, 2, *x.shape[1:]) \
        .swapaxes(1, 2).reshape(x.shape)


# ---------------------------------------------------------------- atomic writes

def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a, b):
    """Atomically swaps two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(tmp, target):
    if not os.path.lexists(target):
        os.replace(tmp, target)
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if _exchange(tmp, target):
        shutil.rmtree(tmp)          # tmp now holds the old contents
        return
    # Without an atomic exchange: move the old directory aside, put the new one
    # in place, and put the old one back if that fails.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target):
    """Yields a fresh temporary directory next to `target`; on success it replaces `target`.

    Files written there are fsynced, then the directory is swapped in with
    one atomic rename (an exchange when `target` exists, on Linux), so
    readers see the old directory or the new one, never a half-written one.
    On any exception the temporary directory is removed and `target` is
    untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        # mkdtemp (and some writers) create owner-only files; give the result
        # the modes a plain mkdir / open would, so others can read an adapter
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
            _fsync_path(f)
        _fsync_path(tmp)
        _swap_in(tmp, target)
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- PEFT adapters

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
        from .errors import AdapterError

        raise AdapterError(path, f"not valid JSON ({e})") from None

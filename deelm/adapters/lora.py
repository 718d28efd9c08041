"""LoRA parameters: configuration and the flat buffer layout the C core reads.

LoRA adds ``scale * B @ A`` to a frozen projection W [out, in], with A [r, in],
B [out, r] and ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). deelm
keeps all A and B matrices in **one** contiguous float32 buffer so the C core
and the optimiser (:mod:`deelm.train.optim`) each see a single array:

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
weights the C core holds; :func:`deelm.adapters.peft.save_adapter` converts to Hugging Face order
and :func:`~deelm.adapters.peft.load_adapter` back, so adapters on disk are always in PEFT's
(Hugging Face's) order. A is never permuted (its rows are the rank).
Files on disk: deelm.adapters.peft.
"""
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from deelm import _core
from deelm.errors import LoraConfigError
from deelm.io.layout import ROPE_INTERLEAVED

# PEFT's key stems of a layer's modules: on a LlamaModel / AutoModel, or on a LlamaForCausalLM
PREFIX_MODEL = "base_model.model.layers."
PREFIX_CAUSAL_LM = "base_model.model.model.layers."
MODULES = _core.LORA_MODULES  # the C core's module table (csrc/schema.c) owns them
MODULE_IDS = {name: i for i, name in enumerate(MODULES)}
_SUBLAYER = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
             "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
TABLE_COLUMNS = ("layer", "module_id", "rank", "in_dim", "out_dim", "off_A", "off_B")
MODEL_KEYS = ("n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "rope_style")

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


"""One owner per fact: the names and shapes the C core's tables define, as
Python reads them, checked against the C sources they come from."""
import re
from pathlib import Path

import numpy as np
import pytest

import deelm
from deelm import _core
from deelm.adapters import lora
from deelm.io import layout
from deelm.io.gguf import read_gguf

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _enum(prefix, text):
    """The members of the enum that holds names PREFIX*, in order, up to DL_N_*."""
    body = re.search(r"enum\s*\{([^}]*\b" + prefix + r"\w+[^}]*)\}", text).group(1)
    names = re.findall(r"\b(DL_\w+)", re.sub(r"/\*.*?\*/", "", body, flags=re.S))
    return [n for n in names if not n.startswith("DL_N_")]


def _designated(table, text):
    """[ENUM] = "name" pairs of the C table `table`."""
    body = re.search(re.escape(table) + r"\[[^\]]*\]\s*=\s*\{(.*?)\};", text, re.S).group(1)
    return dict(re.findall(r"\[(DL_\w+)\]\s*=\s*\"([^\"]*)\"", body))


@pytest.mark.parametrize("prefix, table, source, exported", [
    ("DL_OP_", "dl_op_names", "forward.c", "OP_NAMES"),
    ("DL_ISA_", "dl_isa_names", "cpu.c", "ISA_NAMES"),
    ("DL_PRECISION_", "dl_precision_names", "model.c", "PRECISION_NAMES"),
])
def test_name_tables_match_their_enum(prefix, table, source, exported):
    """Every enum member has exactly one name, in enum order, and Python sees
    that table (a static check: it reads deelm.h and the table's source)."""
    members = _enum(prefix, (CSRC / "deelm.h").read_text())
    names = _designated(table, (CSRC / source).read_text())
    assert sorted(names) == sorted(members)
    assert getattr(_core, exported) == tuple(names[m] for m in members)


def test_python_reads_the_names_from_the_core():
    assert lora.MODULES == _core.LORA_MODULES
    assert deelm.settings.PRECISIONS == ("int8", "float32")
    assert deelm.settings.ISAS == ("auto", "avx512vnni", "avx2", "scalar")
    schema = _core.layer_schema()
    assert layout.LAYER_TENSORS == tuple(t["name"] for t in schema[:9])
    assert set(layout.GEMMA3_LAYER_TENSORS) - set(layout.LAYER_TENSORS) == {
        "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"}


def test_layer_schema_shapes_for_a_config():
    c = dict(dim=8, hidden_dim=24, n_heads=4, n_kv_heads=2, head_dim=2, vocab_size=11)
    shapes = {t["name"]: t["shape"] for t in _core.layer_schema(c)}
    assert shapes["attn_q"] == (8, 8) and shapes["attn_k"] == (4, 8)
    assert shapes["ffn_down"] == (8, 24) and shapes["attn_q_norm"] == (2,)
    assert lora.module_shapes({**c, "n_layers": 1, "rope_style": 0})["o_proj"] == (8, 8)
    with pytest.raises(TypeError):
        _core.layer_schema([1])
    with pytest.raises(ValueError, match="dim"):
        _core.layer_schema({})


@pytest.mark.parametrize("precision", ["int8", "float32"])
@pytest.mark.parametrize("which", ["tiny_path", "gemma_tiny_path"])
def test_memory_estimate_is_what_the_model_allocates(request, which, precision):
    """The weights estimate and the allocation are one walk over the layout:
    they agree for LLaMA and for Gemma-3's extra arrays (q/k norms, post-norms,
    local rotary frequencies), which the estimate once left out."""
    gm = read_gguf(request.getfixturevalue(which)[0])
    core = _core.Model(gm.config, gm.tensors, precision=precision)
    est = _core.memory_estimate(gm.config, precision, 1, 1)["weights"]
    assert est == core.weight_bytes
    if which == "gemma_tiny_path":  # the Gemma-3 arrays are counted
        c = gm.config
        plain = {k: v for k, v in c.items() if k not in ("qk_norm", "post_norms", "inv_freq_local")}
        extra = c["n_layers"] * (2 * c["head_dim"] + 2 * c["dim"]) * 4 + c["head_dim"] // 2 * 4
        assert est - _core.memory_estimate(plain, precision, 1, 1)["weights"] == extra


def test_qkv_bias_arrays_are_counted(tiny_path):
    gm = read_gguf(tiny_path[0])
    c = gm.config
    dq = c["n_heads"] * c["head_dim"]
    tensors = dict(gm.tensors)
    bias = np.zeros(dq, np.float32)
    tensors["blk.0.attn_q.bias"] = (0, dq, 1, bias.tobytes())
    core = _core.Model(c, tensors, precision="float32")
    assert core.weight_bytes == _core.memory_estimate(c, "float32", 1, 1, qkv_bias=True)["weights"]

"""LoRA layout, q/k row order, and PEFT adapters read and written both ways."""
import json
import os

import numpy as np
import pytest

from deelm.errors import AdapterError, LoraConfigError
from deelm.adapters.lora import (MODULES, LoraConfig, LoraLayout, gguf_to_hf_rows, hf_to_gguf_rows, init_params)
from deelm.adapters.peft import load_adapter, save_adapter

# A tiny LLaMA shape: 3 layers, d=32, 4 query heads and 2 KV heads of 8, SwiGLU 48.
TINY = dict(n_layers=3, dim=32, hidden_dim=48, n_heads=4, n_kv_heads=2, head_dim=8, rope_style=0)
# The default model (SmolLM2-135M) as DeeLM.config reports it.
SMOL = dict(n_layers=30, dim=576, hidden_dim=1536, n_heads=9, n_kv_heads=3, head_dim=64,
            rope_style=0, vocab_size=49152)


def random_params(layout, seed=0):
    """Non-zero A and B everywhere, so a wrong row order or key would show."""
    return np.random.default_rng(seed).standard_normal(layout.size).astype(np.float32)


# ------------------------------------------------------------------ config and layout

@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "rank r"), (dict(r=2.0), "rank r"), (dict(alpha=0), "alpha"),
    (dict(alpha=float("inf")), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(target_modules=("q_proj", "lm_head")), r"unknown target modules \['lm_head'\]"),
    (dict(target_modules=()), "empty"), (dict(layers=(-1,)), "layer indices"),
    (dict(layers=()), "layer indices"), (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(LoraConfigError, match=message):
        LoraConfig(**kwargs)


def test_config_normalises_modules_and_layers():
    c = LoraConfig(target_modules=["down_proj", "q_proj", "q_proj"], layers=[5, 2, 5])
    assert c.target_modules == ("q_proj", "down_proj") and c.layers == (2, 5)
    assert LoraConfig(target_modules="v_proj", layers=3).target_modules == ("v_proj",)
    assert issubclass(LoraConfigError, ValueError)


def test_layout_checks_the_model():
    with pytest.raises(LoraConfigError, match=r"layers \[3, 7\] are out of range: the model has 3"):
        LoraLayout(LoraConfig(layers=(1, 3, 7)), TINY)
    with pytest.raises(LoraConfigError, match="lacks"):
        LoraLayout(LoraConfig(), {"n_layers": 3})


def test_layout_table_and_scales():
    layout = LoraLayout(LoraConfig(r=4, alpha=8, layers=(0, 2),
                                   target_modules=("down_proj", "k_proj", "q_proj")), TINY)
    t = layout.table
    assert t.dtype == np.int64 and t.shape == (6, 7)
    assert t[:, 0].tolist() == [0, 0, 0, 2, 2, 2] and t[:, 1].tolist() == [0, 1, 6] * 2
    assert t[:, 2].tolist() == [4] * 6
    assert t[:3, 3].tolist() == [32, 32, 48] and t[:3, 4].tolist() == [32, 16, 32]
    # Contiguous: A then B per entry, entries back to back.
    assert t[0, 5] == 0
    np.testing.assert_array_equal(t[:, 6], t[:, 5] + t[:, 2] * t[:, 3])
    np.testing.assert_array_equal(t[1:, 5], t[:-1, 6] + t[:-1, 4] * t[:-1, 2])
    assert layout.size == t[-1, 6] + t[-1, 4] * t[-1, 2]
    assert layout.scales.dtype == np.float32 and (layout.scales == 2.0).all()
    rs = LoraLayout(LoraConfig(r=4, alpha=8, use_rslora=True), TINY)
    assert np.allclose(rs.scales, 4.0)
    p = np.arange(layout.size, dtype=np.float32)
    a, b = layout.lora_A(p, 1), layout.lora_B(p, 1)
    assert a.shape == (4, 32) and b.shape == (16, 4) and a[0, 0] == t[1, 5] and b[0, 0] == t[1, 6]
    a[0, 0] = -1
    assert p[t[1, 5]] == -1                       # views write into the buffer


def test_layout_of_the_default_model():
    layout = LoraLayout(LoraConfig(r=8, layers=tuple(range(20, 30))), SMOL)
    per_layer = 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    assert len(layout) == 70 and layout.size == 10 * per_layer


def test_rank_and_alpha_patterns():
    c = LoraConfig(r=4, alpha=8, rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                   alpha_pattern={"v_proj": 3})
    layout = LoraLayout(c, TINY)
    t = layout.table
    q, down1, v = layout.index(0, "q_proj"), layout.index(1, "down_proj"), layout.index(2, "v_proj")
    assert t[q, 2] == 2 and layout.scales[q] == 4.0
    assert t[down1, 2] == 6 and t[layout.index(0, "down_proj"), 2] == 4
    assert t[v, 2] == 4 and layout.scales[v] == pytest.approx(0.75)


def test_init_params_like_peft():
    layout = LoraLayout(LoraConfig(r=16, target_modules=("q_proj", "down_proj")), SMOL)
    p = init_params(layout, seed=3)
    assert p.dtype == np.float32 and p.size == layout.size
    assert np.array_equal(p, init_params(layout, seed=3))
    assert not np.array_equal(p, init_params(layout, seed=4))
    for i in (0, 1):
        a, b = layout.lora_A(p, i), layout.lora_B(p, i)
        bound = 1 / np.sqrt(a.shape[1])                   # kaiming_uniform_(a=sqrt(5))
        assert not b.any() and np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
        assert a.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


@pytest.mark.reference
def test_kaiming_bound_is_torchs():
    torch = pytest.importorskip("torch")
    w = torch.empty(8, 1536)
    torch.nn.init.kaiming_uniform_(w, a=np.sqrt(5))
    assert w.abs().max().item() <= 1 / np.sqrt(1536)


# ------------------------------------------------------------------ q/k row order

def test_permutation_round_trip_and_formula():
    x = np.arange(4 * 8 * 3).reshape(32, 3)
    g = hf_to_gguf_rows(x, 4)
    assert np.array_equal(gguf_to_hf_rows(g, 4), x)
    hd = 8
    for h in range(4):
        for i in range(2):
            for j in range(hd // 2):
                assert np.array_equal(g[h * hd + 2 * j + i], x[h * hd + i * (hd // 2) + j])


@pytest.mark.reference
def test_permutation_matches_the_converters():
    from support.gguf_builder import _permute_for_gguf    # the test suite's copy of llama.cpp's permute

    rng = np.random.default_rng(0)
    for heads, rows in ((4, 32), (2, 16), (9, 576)):
        w = rng.standard_normal((rows, 5)).astype(np.float32)
        assert np.array_equal(hf_to_gguf_rows(w, heads), _permute_for_gguf(w, heads))
    pytest.importorskip("torch")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor()
    for n_head, n_kv, rows in ((9, 9, 576), (9, 3, 192), (4, 2, 16)):
        w = rng.standard_normal((rows, 7)).astype(np.float32)
        heads = n_kv if n_kv != n_head else n_head
        assert np.array_equal(gguf_to_hf_rows(w, heads), proc._reverse_permute_weights(w, n_head, n_kv))


def rope_half(x, pos, hd, theta=10000.0):
    """Hugging Face rotate-half RoPE on a [heads*hd] vector."""
    x = x.reshape(-1, hd)
    f = pos / theta ** (np.arange(hd // 2) * 2 / hd)
    c, s = np.cos(f), np.sin(f)
    x1, x2 = x[:, :hd // 2], x[:, hd // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=1).reshape(-1)


def rope_interleaved(x, pos, hd, theta=10000.0):
    """GGUF / llama.cpp interleaved RoPE: pairs (2j, 2j+1)."""
    x = x.reshape(-1, hd // 2, 2)
    f = pos / theta ** (np.arange(hd // 2) * 2 / hd)
    c, s = np.cos(f), np.sin(f)
    out = np.stack([x[..., 0] * c - x[..., 1] * s, x[..., 1] * c + x[..., 0] * s], axis=-1)
    return out.reshape(-1)


def test_gguf_order_makes_interleaved_rope_equal_hf_rope():
    rng = np.random.default_rng(1)
    q_hf = rng.standard_normal(4 * 8)
    for pos in (0, 3, 17):
        got = gguf_to_hf_rows(rope_interleaved(hf_to_gguf_rows(q_hf, 4), pos, 8), 4)
        np.testing.assert_allclose(got, rope_half(q_hf, pos, 8), atol=1e-12)


# ------------------------------------------------------------------ PEFT interop

@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    return torch, config


def peft_lora_modules(peft_model):
    """{(layer, module): peft LoRA layer} of a PeftModel on LlamaModel or LlamaForCausalLM."""
    base = peft_model.base_model.model
    layers = base.model.layers if hasattr(base, "model") else base.layers
    out = {}
    for l, block in enumerate(layers):
        for m in MODULES:
            mod = getattr(block.self_attn if m in MODULES[:4] else block.mlp, m)
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                out[(l, m)] = mod
    return out


def expected_b(layout, params, i):
    b = layout.lora_B(params, i)
    heads = layout.q_k_heads(i)
    return b if heads is None else gguf_to_hf_rows(b, heads)


@pytest.mark.parametrize("causal_lm, config", [
    (False, LoraConfig(r=4, alpha=8)),
    (False, LoraConfig(r=3, alpha=6, layers=(1,), target_modules=("o_proj", "gate_proj"))),
    (True, LoraConfig(r=2, alpha=5, layers=(0, 2), target_modules=("q_proj", "k_proj", "up_proj"),
                      use_rslora=True)),
])
@pytest.mark.reference
def test_saved_adapter_loads_in_peft(tmp_path, hf, causal_lm, config):
    torch, hf_config = hf
    from peft import PeftModel
    from transformers import LlamaForCausalLM, LlamaModel

    layout = LoraLayout(config, TINY)
    params = random_params(layout)
    save_adapter(tmp_path / "ad", layout, params, base_model_name="tiny-llama", causal_lm=causal_lm)
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "tiny-llama" and saved["peft_type"] == "LORA"
    base = (LlamaForCausalLM if causal_lm else LlamaModel)(hf_config)
    pm = PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    mods = peft_lora_modules(pm)
    assert len(mods) == len(layout)
    for i in range(len(layout)):
        layer, mid = int(layout.table[i, 0]), int(layout.table[i, 1])
        mod = mods[(layer, MODULES[mid])]
        assert np.array_equal(mod.lora_A["default"].weight.detach().numpy(), layout.lora_A(params, i))
        assert np.array_equal(mod.lora_B["default"].weight.detach().numpy(),
                              expected_b(layout, params, i))
        assert mod.scaling["default"] == pytest.approx(float(layout.scales[i]))


@pytest.mark.reference
def test_peft_adapter_loads_in_deelm(tmp_path, hf):
    torch, hf_config = hf
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    pc = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                        layers_to_transform=[1, 2], layers_pattern="layers", task_type="CAUSAL_LM",
                        rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 12})
    pm = get_peft_model(LlamaForCausalLM(hf_config), pc)
    mods = peft_lora_modules(pm)
    with torch.no_grad():
        for mod in mods.values():
            mod.lora_B["default"].weight.normal_()   # PEFT starts B at 0
    for safe in (True, False):
        out = tmp_path / f"peft-{safe}"
        pm.save_pretrained(str(out), safe_serialization=safe)
        assert (out / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
        config, layout, params = load_adapter(out, TINY)
        assert config.layers == (1, 2) and config.target_modules == ("q_proj", "k_proj", "v_proj",
                                                                      "down_proj")
        assert len(layout) == len(mods) == 8
        for (layer, m), mod in mods.items():
            i = layout.index(layer, m)
            assert np.array_equal(layout.lora_A(params, i), mod.lora_A["default"].weight.detach().numpy())
            b_hf = mod.lora_B["default"].weight.detach().numpy()
            heads = layout.q_k_heads(i)
            assert np.array_equal(layout.lora_B(params, i),
                                  b_hf if heads is None else hf_to_gguf_rows(b_hf, heads))
            assert layout.scales[i] == pytest.approx(mod.scaling["default"])
    # And back out again: deelm's save reproduces PEFT's tensors.
    save_adapter(tmp_path / "again", layout, params)
    _, layout2, params2 = load_adapter(tmp_path / "again", TINY)
    assert layout2.same_as(layout) and np.array_equal(params2, params)


def test_rope_style_half_keeps_rows(tmp_path):
    half = dict(TINY, rope_style=1)
    layout = LoraLayout(LoraConfig(r=2, target_modules=("q_proj",)), half)
    params = random_params(layout)
    save_adapter(tmp_path / "ad", layout, params)
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert np.array_equal(t["base_model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                          layout.lora_B(params, 0))
    assert np.array_equal(load_adapter(tmp_path / "ad", half)[2], params)


@pytest.mark.reference
def test_bf16_and_f16_adapters(tmp_path, hf):
    torch, _ = hf
    from safetensors.torch import save_file

    layout = LoraLayout(LoraConfig(r=2, target_modules=("v_proj",)), TINY)
    params = random_params(layout)
    save_adapter(tmp_path / "ad", layout, params)
    from safetensors.numpy import load_file

    path = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for dtype in (torch.bfloat16, torch.float16):
        save_file({k: torch.from_numpy(v).to(dtype) for k, v in tensors.items()}, str(path))
        _, _, got = load_adapter(tmp_path / "ad", TINY)
        want = torch.from_numpy(params).to(dtype).float().numpy()
        assert np.array_equal(got, want)


# ------------------------------------------------------------------ bad adapters

@pytest.fixture()
def adapter(tmp_path):
    layout = LoraLayout(LoraConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")), TINY)
    return save_adapter(tmp_path / "ad", layout, random_params(layout))


def edit_config(directory, **changes):
    p = directory / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def edit_tensors(directory, fn):
    from safetensors.numpy import load_file, save_file

    p = str(directory / "adapter_model.safetensors")
    save_file(fn(load_file(p)), p)


@pytest.mark.parametrize("changes, message", [
    (dict(use_dora=True), "DoRA"), (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(bias="lora_only"), "bias='none'"), (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(peft_type="IA3"), "only LORA"),
    (dict(target_modules=["q_proj", "v_proj", "lm_head"]), r"unknown modules \['lm_head'\]"),
    (dict(target_modules=["q_proj", "v_proj", "o_proj"]), r"targets \['o_proj'\] but"),
    (dict(layers_to_transform=[0, 1]), "layers_to_transform is"),
    (dict(r=3), r"needs \[3, 32\]"),
    (dict(rank_pattern=2), "rank_pattern must map"), (dict(alpha_pattern=[1]), "alpha_pattern must map"),
])
def test_config_problems(adapter, changes, message):
    edit_config(adapter, **changes)
    with pytest.raises(AdapterError, match=message) as e:
        load_adapter(adapter, TINY)
    assert "adapter_config.json" in str(e.value) or "adapter_model" in str(e.value)


def test_missing_and_corrupt_files(adapter, tmp_path):
    with pytest.raises(AdapterError, match="no such adapter directory"):
        load_adapter(tmp_path / "nope", TINY)
    weights = adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: corrupt or truncated"):
        load_adapter(adapter, TINY)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(adapter, TINY)
    weights.unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors or adapter_model.bin"):
        load_adapter(adapter, TINY)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        load_adapter(adapter, TINY)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        load_adapter(adapter, TINY)


def test_adapter_that_does_not_fit_the_model(adapter):
    with pytest.raises(AdapterError, match=r"layer 2, but the model has 2 layers"):
        load_adapter(adapter, dict(TINY, n_layers=2))
    with pytest.raises(AdapterError, match=r"q_proj.lora_A.weight has shape \[2, 32\], the model "
                                           r"needs \[2, 64\]"):
        load_adapter(adapter, dict(TINY, dim=64))


def test_bad_tensor_sets(adapter):
    key = "base_model.model.layers.1.self_attn.q_proj.lora_B.weight"

    def drop(t):
        del t[key]
        return t

    edit_tensors(adapter, drop)
    with pytest.raises(AdapterError, match="q_proj.lora_B.weight is missing"):
        load_adapter(adapter, TINY)
    edit_tensors(adapter, lambda t: {k: v for k, v in t.items() if ".layers.1.self_attn.q_proj" not in k})
    with pytest.raises(AdapterError, match="not on layer 1"):
        load_adapter(adapter, TINY)
    edit_tensors(adapter, lambda t: dict(t, **{"base_model.model.embed_tokens.lora_A.weight":
                                               np.zeros((2, 64), np.float32)}))
    with pytest.raises(AdapterError, match="unexpected tensors.*embed_tokens"):
        load_adapter(adapter, TINY)


def test_non_finite_weights(adapter):
    def poison(t):
        t["base_model.model.layers.0.self_attn.v_proj.lora_A.weight"][0, 0] = np.nan
        return t

    edit_tensors(adapter, poison)
    with pytest.raises(AdapterError, match="non-finite"):
        load_adapter(adapter, TINY)


# ------------------------------------------------------------------ atomic writes

def test_interrupted_save_leaves_the_old_adapter(tmp_path, monkeypatch):
    import deelm.adapters.peft as peft

    layout = LoraLayout(LoraConfig(r=2, target_modules=("q_proj",)), TINY)
    old = random_params(layout, seed=1)
    target = save_adapter(tmp_path / "ad", layout, old)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def half_then_fail(path, tensors):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setattr(peft, "_write_tensors", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(target, layout, random_params(layout, seed=2))
    assert os.listdir(tmp_path) == ["ad"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    monkeypatch.undo()
    assert np.array_equal(load_adapter(target, TINY)[2], old)


@pytest.mark.parametrize("exchange", [True, False])
def test_save_replaces_an_existing_adapter(tmp_path, monkeypatch, exchange):
    import deelm.io.atomic as atomic

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    layout = LoraLayout(LoraConfig(r=2, target_modules=("k_proj",)), TINY)
    save_adapter(tmp_path / "ad", layout, random_params(layout, seed=1))
    (tmp_path / "ad" / "stale.txt").write_text("from the old directory")
    new = random_params(layout, seed=2)
    save_adapter(tmp_path / "ad", layout, new)
    assert os.listdir(tmp_path) == ["ad"]
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert np.array_equal(load_adapter(tmp_path / "ad", TINY)[2], new)


@pytest.mark.parametrize("settings, message", [
    ({"bidirectional_from": "two"}, "bidirectional_from must be"),
    ({"bidirectional_from": 99}, "bidirectional_from must be"),
    ({"bidirectional_from": True}, "bidirectional_from must be"),
    ({"pooling": 3}, "pooling must be one of"),
    ({"prompt": 5}, "prompt: prompt must be a string"),
    ({"prompt": "{text} and {text}"}, "prompt: a prompt template"),
    ([1, 2], "must hold a JSON object"),
])
def test_bad_deelm_config_names_file_and_key(tiny_path, adapter, settings, message):
    """Wrong-typed settings in deelm_config.json used to escape from the model's
    setters as TypeError/ValueError without the file."""
    import deelm

    (adapter / "deelm_config.json").write_text(json.dumps(settings))
    with pytest.raises(AdapterError, match=message) as e:
        deelm.DeeLM.from_pretrained(tiny_path[0], adapter=adapter)
    assert "deelm_config.json" in str(e.value)

"""Broken Hugging Face model directories: unsupported configs, missing files,
safetensors headers that lie, tokenizers of another size. Each is a clear
ModelFileError (or UnsupportedModelError) naming the file and the problem,
never a crash."""
import json
import shutil
import struct

import numpy as np
import pytest

import deelm
from deelm.errors import ModelFileError, UnsupportedModelError

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers
from support.hf_builder import build  # noqa: E402  (needs torch and transformers)

Q0 = "model.layers.0.self_attn.q_proj.weight"
O0 = "model.layers.0.self_attn.o_proj.weight"
NORM0 = "model.layers.0.input_layernorm.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A good tiny LLaMA directory (single file) and a sharded one."""
    root = tmp_path_factory.mktemp("pristine")
    build(root / "single")
    build(root / "sharded", max_shard_size="40KB")
    return root


@pytest.fixture
def model_dir(pristine, tmp_path):
    return shutil.copytree(pristine / "single", tmp_path / "m")


def load_fails(directory, reason, path, cls=ModelFileError):
    with pytest.raises(cls, match=reason) as info:
        deelm.DeeLM.from_pretrained(directory, threads=1)
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(path), info.value
    return info.value


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def read_st(path):
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path, header, data, raw_header=None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_header(path, edit, extra=b""):
    header, data = read_st(path)
    edit(header)
    write_st(path, header, data + extra)


def test_good_directory_loads(model_dir):
    assert deelm.DeeLM.from_pretrained(model_dir, threads=1).encode("a cat").shape == (64,)


# ------------------------------------------------------------------ config.json

@pytest.mark.parametrize("edit, reason, cls", [
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]),
     r"architecture GPT2LMHeadModel is not supported by deelm \(supported: LlamaForCausalLM, "
     r"LlamaModel, MistralForCausalLM", UnsupportedModelError),
    (lambda c: c.pop("architectures"), "'architectures' is missing", UnsupportedModelError),
    (lambda c: c["rope_parameters"].update(rope_type="yarn", factor=4.0),
     "rope scaling type 'yarn' is not supported", UnsupportedModelError),
    (lambda c: (c.pop("rope_parameters"), c.update(rope_scaling={"type": "longrope"})),
     "rope scaling type 'longrope' is not supported", UnsupportedModelError),
    (lambda c: c["rope_parameters"].update(rope_type="llama3", factor=8.0),
     r"'rope_parameters.low_freq_factor' is missing", ModelFileError),
    (lambda c: c["rope_parameters"].update(rope_type="linear", factor=-2),
     r"'rope_parameters.factor' = -2 should be a positive number", ModelFileError),
    (lambda c: c.update(partial_rotary_factor=0.5), "partial rotary embedding",
     UnsupportedModelError),
    (lambda c: c.update(quantization_config={"quant_method": "gptq"}),
     "quantized checkpoints .* 'gptq'", UnsupportedModelError),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu' is not supported",
     UnsupportedModelError),
    (lambda c: c.pop("hidden_size"), "'hidden_size' is missing", ModelFileError),
    (lambda c: c.update(num_key_value_heads=3), "not a multiple of num_key_value_heads 3",
     ModelFileError),
    (lambda c: c.update(num_hidden_layers=2), r"tensor 'model.layers.2.\S+' belongs to no layer",
     ModelFileError),
    (lambda c: c.update(num_hidden_layers=4), r"'model.layers.3.input_layernorm.weight' is missing "
     r"\(config.json says 4 layers\)", ModelFileError),
    (lambda c: c.update(intermediate_size=128), r"mlp\.\w+_proj.weight' has shape \[(96, 64|64, 96)\], "
     r"config.json needs \[(128, 64|64, 128)\]", ModelFileError),
])
def test_bad_config(model_dir, edit, reason, cls):
    edit_json(model_dir / "config.json", edit)
    where = {"belongs to no": "model.safetensors", "is missing (": "model.safetensors",
             "has shape": "model.safetensors"}
    name = next((f for key, f in where.items() if key in reason.replace("\\", "")), "config.json")
    load_fails(model_dir, reason, model_dir / name, cls)


def test_config_json_not_json(model_dir):
    (model_dir / "config.json").write_text("{nope")
    load_fails(model_dir, "not valid JSON", model_dir / "config.json")


def test_only_pytorch_weights(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    load_fails(model_dir, r"no model.safetensors or model.safetensors.index.json \(found "
                          r"pytorch_model.bin: only safetensors", model_dir)


# ------------------------------------------------------------------ shards

def test_missing_shard(pristine, tmp_path):
    directory = shutil.copytree(pristine / "sharded", tmp_path / "s")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    load_fails(directory, f"shard '{shard.name}' named by the index is missing",
               directory / "model.safetensors.index.json")


def test_index_naming_a_path_outside_the_directory(pristine, tmp_path):
    directory = shutil.copytree(pristine / "sharded", tmp_path / "s")
    edit_json(directory / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({Q0: "../elsewhere.safetensors"}))
    load_fails(directory, "not a file name in the model directory",
               directory / "model.safetensors.index.json")


def test_shard_disagreeing_with_the_index(pristine, tmp_path):
    directory = shutil.copytree(pristine / "sharded", tmp_path / "s")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"][Q0]
    edit_header(shard, lambda h: h.pop(Q0))
    load_fails(directory, f"lacks tensor '{Q0}' that model.safetensors.index.json puts there", shard)


# ------------------------------------------------------------------ safetensors headers that lie

@pytest.mark.parametrize("edit, reason, cls", [
    (lambda h: h[O0].update(data_offsets=h[Q0]["data_offsets"]), "overlap", ModelFileError),
    (lambda h: h[Q0].update(shape=[64, 32]), r"hold 16384 bytes, but F32 \[64, 32\] needs 8192",
     ModelFileError),
    (lambda h: h[Q0].update(shape=[32, 128]), r"has shape \[32, 128\], config.json needs \[64, 64\]",
     ModelFileError),
    (lambda h: h[Q0].update(dtype="Q9"), "unknown dtype 'Q9'", ModelFileError),
    (lambda h: h[NORM0].update(dtype="I32"), f"tensor '{NORM0}' has dtype I32, which deelm does not "
     "run", UnsupportedModelError),
    (lambda h: h[Q0].update(data_offsets=[-4, 16380]), "not an increasing pair", ModelFileError),
    (lambda h: h[Q0].update(data_offsets=["0", 16384]), "not a pair of integers", ModelFileError),
    (lambda h: h[Q0].update(shape=[64, -64]), "not a list of non-negative integers", ModelFileError),
    (lambda h: h.update({Q0: [1, 2]}), "its header entry is not a JSON object", ModelFileError),
    (lambda h: h.update(__metadata__=[1]), "__metadata__ is not a JSON object", ModelFileError),
    (lambda h: h.pop("model.layers.1.mlp.up_proj.weight"),
     r"tensor 'model.layers.1.mlp.up_proj.weight' is missing", ModelFileError),
    (lambda h: h.update({"model.layers.0.self_attn.rotary_weird.weight": h.pop(Q0)}),
     "unexpected tensor 'model.layers.0.self_attn.rotary_weird.weight'", UnsupportedModelError),
])
def test_lying_header(model_dir, edit, reason, cls):
    edit_header(model_dir / "model.safetensors", edit)
    load_fails(model_dir, reason, model_dir / "model.safetensors", cls)


def test_tensor_past_the_end_of_the_file(model_dir):
    path = model_dir / "model.safetensors"
    header, data = read_st(path)
    header[Q0]["data_offsets"] = [len(data), len(data) + 16384]
    write_st(path, header, data)
    load_fails(model_dir, f"tensor '{Q0}': data_offsets .* run past the end of the {len(data)}-byte "
                          "data section", path)


def test_unsupported_bias(model_dir):
    path = model_dir / "model.safetensors"
    header, data = read_st(path)
    header[O0.replace("weight", "bias")] = {"dtype": "F32", "shape": [64],
                                            "data_offsets": [len(data), len(data) + 256]}
    write_st(path, header, data + bytes(256))
    load_fails(model_dir, r"a bias on self_attn.o_proj is not supported", path, UnsupportedModelError)


@pytest.mark.parametrize("content, reason", [
    (b"\x01\x02", "too short for the 8-byte header length"),
    (struct.pack("<Q", 1 << 62) + b"{}", r"header length \d+ is larger than the 100000000 bytes"),
    (struct.pack("<Q", 1000) + b"{}", "header length 1000 runs past the end of the 10-byte file"),
    (struct.pack("<Q", 9) + b"{not json", "the safetensors header is not valid JSON"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "the safetensors header is not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "the safetensors header is not a JSON object"),
    (struct.pack("<Q", 15) + b'{"a":1, "a":2 }', "key 'a' appears twice"),
])
def test_broken_file(model_dir, content, reason):
    path = model_dir / "model.safetensors"
    path.write_bytes(content)
    load_fails(model_dir, reason, path)


def test_truncated_file(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    load_fails(model_dir, "run past the end of the .*-byte data section", path)


def test_random_header_damage_is_never_a_crash(model_dir):
    """Bytes of the header changed at random: loading either works or says
    what is wrong with the file."""
    path = model_dir / "model.safetensors"
    good = path.read_bytes()
    (n,) = struct.unpack_from("<Q", good)
    rng = np.random.default_rng(0)
    outcomes = {}
    for _ in range(60):
        bad = bytearray(good)
        for pos in rng.integers(0, 8 + n, size=rng.integers(1, 4)):
            bad[pos] = rng.integers(0, 256)
        path.write_bytes(bytes(bad))
        try:
            deelm.DeeLM.from_pretrained(model_dir, threads=1)
            outcomes["loaded"] = outcomes.get("loaded", 0) + 1
        except ModelFileError as e:
            assert e.path in (str(path), str(model_dir)), e
            outcomes["refused"] = outcomes.get("refused", 0) + 1
    print(f"\n[random header damage] {outcomes}")
    assert outcomes.get("refused", 0) > 30


# ------------------------------------------------------------------ tokenizer

def test_tokenizer_of_another_size(tmp_path):
    """The tokenizer has 269 tokens; a model with 200 embedding rows cannot
    run it."""
    build(tmp_path, vocab_size=200)
    load_fails(tmp_path, "the tokenizer has 269 tokens but the model's embedding table has 200 "
                         "rows", tmp_path / "tokenizer.json")


def test_no_tokenizer(model_dir):
    (model_dir / "tokenizer.json").unlink()
    load_fails(model_dir, "holds no tokenizer.json or tokenizer.model", model_dir)

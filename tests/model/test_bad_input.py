"""Bad input gives a clear Python exception: never a crash, a hang or silent garbage.
(Past ~600 lines: one catalogue of bad inputs, each a short case, is easier to
check for gaps than several.)

Covers the encode() arguments, broken and corrupted model files (missing,
empty, truncated, unsupported, non-finite, bit-flipped, fuzzed), the C core's
own argument checks, and how the model path is resolved.
"""
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gguf
from gguf import GGMLQuantizationType as QT

import deelm
from deelm import _core
from deelm.io.gguf import read_gguf
from support.gguf_builder import TINY, random_weights, tiny_cfg, tiny_vocab, write_tiny_gguf

TEMPLATE = 'The representative word for sentence {text} is:"'
LONG_TEXT = "the cat sat on the mat and looked at the other cat " * 20
D = TINY["dim"]
VOCAB = len(tiny_vocab()[0])


# ---- fixtures and helpers ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_file(tiny_path):
    return tiny_path[0]


@pytest.fixture(scope="module")
def tiny_bytes(tiny_file):
    return tiny_file.read_bytes()


@pytest.fixture(scope="module")
def layout(tiny_file):
    """The pristine tiny file as the gguf package parses it."""
    return gguf.GGUFReader(str(tiny_file))


@pytest.fixture(scope="module")
def short_model(tiny_file):
    """The tiny model truncating at 16 tokens."""
    return deelm.DeeLM.from_pretrained(tiny_file, bidirectional_from=-1, max_seq_length=16, threads=1)


@pytest.fixture(scope="module")
def own_model(tiny_file):
    """A model of this module's own, for tests that assign attributes."""
    return deelm.DeeLM.from_pretrained(tiny_file, threads=1)


def _write(tmp_path, data, name="model.gguf"):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def _flipped(tmp_path, data, pos, bit):
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return _write(tmp_path, b, f"flip_{pos}_{bit}.gguf")


def _load_fails(path, reason, cls=deelm.ModelFileError, **kw):
    """Loading `path` (from_pretrained options kw) raises `cls`, naming the
    file and matching `reason`."""
    with pytest.raises(cls, match=reason) as info:
        deelm.DeeLM.from_pretrained(path, threads=1, **kw)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    assert info.value.reason
    return info.value


def _part_offset(field, part):
    """Byte offset of field.parts[part] in the file."""
    return field.offset + sum(int(p.nbytes) for p in field.parts[:part])


def _tensor_field(layout, name):
    return next(t.field for t in layout.tensors if t.name == name)


# ---- 1. encode() arguments ----------------------------------------------------------

def test_encode_empty_list(tiny_model):
    e = tiny_model.encode([])
    assert e.shape == (0, D) and e.dtype == np.float32
    layers = tiny_model.encode([], output_value="layer_embeddings")
    assert layers.shape == (0, TINY["n_layers"] + 1, D) and layers.dtype == np.float32
    assert tiny_model.encode([], output_value="token_embeddings") == []


def test_encode_empty_string(tiny_model):
    e = tiny_model.encode("")
    assert e.shape == (D,) and e.dtype == np.float32
    assert np.isfinite(e).all() and np.linalg.norm(e) > 0
    for pooling in deelm.POOLINGS:
        for prompt in (None, TEMPLATE):
            e = tiny_model.encode([""], pooling=pooling, prompt=prompt)
            assert e.shape == (1, D) and np.isfinite(e).all(), (pooling, prompt)


@pytest.mark.parametrize("bad", [3, None, b"b", 1.5, ["b"]], ids=repr)
def test_encode_non_string_element(tiny_model, bad):
    with pytest.raises(TypeError, match=r"sentences\[1\]") as info:
        tiny_model.encode(["a", bad, "b"])
    assert type(bad).__name__ in str(info.value)


@pytest.mark.parametrize("bad", [3, None, 2.5, b"abc", bytearray(b"abc"), object()], ids=repr)
def test_encode_non_iterable_or_bytes(tiny_model, bad):
    with pytest.raises(TypeError, match="sentences"):
        tiny_model.encode(bad)


@pytest.mark.parametrize("text", ["a\ud800b", "\udcff"], ids=["lone-high", "lone-low"])
def test_encode_invalid_unicode(tiny_model, text):
    with pytest.raises(ValueError, match=r"sentences\[1\].*surrogate"):
        tiny_model.encode(["fine", text])
    with pytest.raises(ValueError, match="prompt.*surrogate"):
        tiny_model.encode(["fine"], prompt=text + " {text}")


def test_encode_odd_but_valid_text(tiny_model):
    texts = ["a\x00b", "<|endoftext|>", "<|im_start|><|im_end|>", " " * 300, "\n\t\r", "é€😀"]
    e = tiny_model.encode(texts)
    assert e.shape == (len(texts), D) and np.isfinite(e).all()


@pytest.mark.parametrize("pooling", deelm.POOLINGS)
def test_long_text_is_truncated(short_model, tiny_model, pooling):
    assert len(tiny_model.tokenize([LONG_TEXT])[0].ids) > 100  # the untruncated length
    enc = short_model.tokenize([LONG_TEXT])[0]
    assert len(enc.ids) == short_model.max_seq_length == 16
    e = short_model.encode(LONG_TEXT, pooling=pooling)
    assert e.shape == (D,) and np.isfinite(e).all()
    # a text that differs only after the first 16 tokens embeds identically
    other = LONG_TEXT + " and then a dog came in and everything changed"
    assert short_model.tokenize([other])[0].ids == enc.ids
    assert np.array_equal(short_model.encode(other, pooling=pooling), e)
    both = short_model.encode([LONG_TEXT, other], pooling=pooling)
    np.testing.assert_allclose(both[0], both[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(both[0], e, rtol=0, atol=1e-5)


def test_truncation_keeps_the_prompt_template(tiny_file, tiny_model):
    # the tiny vocabulary has few merges: the template alone takes 38 tokens
    model = deelm.DeeLM.from_pretrained(tiny_file, max_seq_length=48, threads=1)
    # the template around a short text starting with the same word ("Ġthe" is one token)
    full = tiny_model.tokenize(["the"], prompt=TEMPLATE)[0]
    head, tail = full.ids[:full.text_start], full.ids[full.text_end:]
    assert head and tail and len(head) + len(tail) < 48
    assert model.tokenizer.decode(tail) == ' is:"'
    enc = model.tokenize([LONG_TEXT], prompt=TEMPLATE)[0]
    assert len(enc.ids) == 48
    assert enc.ids[-len(tail):] == tail
    assert enc.ids[:len(head)] == head
    assert enc.text_end - enc.text_start == 48 - len(head) - len(tail)
    for pooling in deelm.POOLINGS:
        e = model.encode(LONG_TEXT, prompt=TEMPLATE, pooling=pooling)
        assert np.isfinite(e).all()


def test_truncation_keeps_bos(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)
    model = deelm.DeeLM.from_pretrained(path, max_seq_length=48, threads=1)
    enc = model.tokenize([LONG_TEXT], prompt=TEMPLATE)[0]
    assert len(enc.ids) == 48 and enc.ids[0] == model.tokenizer.bos_id
    assert model.tokenizer.decode(enc.ids).endswith(' is:"')
    assert np.isfinite(model.encode(LONG_TEXT, prompt=TEMPLATE)).all()


@pytest.mark.parametrize("prompt", [TEMPLATE, "word " * 40 + "{text}", "{text}" + " word" * 40,
                                    "word " * 40], ids=["paper", "prefix", "suffix", "plain-prefix"])
def test_prompt_template_too_long(short_model, prompt):
    with pytest.raises(ValueError, match="max_seq_length"):
        short_model.encode(["a"], prompt=prompt)


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(pooling="max"), ValueError, "pooling"),
    (dict(pooling=3), ValueError, "pooling"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=-4), ValueError, "batch_size"),
    (dict(batch_size="8"), ValueError, "batch_size"),
    (dict(batch_size=2.0), ValueError, "batch_size"),
    (dict(batch_size=True), ValueError, "batch_size"),
    (dict(batch_size=None), ValueError, "batch_size"),
    (dict(output_value="embeddings"), ValueError, "output_value"),
    (dict(output_value=3), ValueError, "output_value"),
    (dict(precision="int4"), ValueError, "precision"),  # output quantisation: int8/uint8/binary/ubinary
    (dict(device="cuda"), ValueError, "device"),
    (dict(prompt=5), TypeError, "prompt"),
    (dict(prompt="{text} and {text}"), ValueError, "prompt"),
    # not an encode() argument: a ValueError naming it, as in sentence-transformers
    (dict(bidirectional_from=0), ValueError, "bidirectional_from"),
], ids=lambda v: repr(v) if isinstance(v, dict) else (v.__name__ if isinstance(v, type) else v))
def test_encode_invalid_argument(tiny_model, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        tiny_model.encode(["a", "b"], **kwargs)


MODEL_SETTINGS = [
    ("bidirectional_from", 3, ValueError),   # the tiny model has layers 0..2
    ("bidirectional_from", -2, ValueError),
    ("bidirectional_from", 1 << 40, ValueError),
    ("bidirectional_from", 1.0, TypeError),
    ("bidirectional_from", "1", TypeError),
    ("bidirectional_from", True, TypeError),
    ("threads", 0, ValueError),
    ("threads", -1, ValueError),
    ("threads", 5000, ValueError),
    ("threads", "2", ValueError),
    ("threads", 1.5, ValueError),
    ("max_seq_length", 0, ValueError),
    ("max_seq_length", -5, ValueError),
    ("max_seq_length", TINY["context_length"] + 1, ValueError),
    ("max_seq_length", "16", ValueError),
    ("max_seq_length", 16.0, ValueError),
    ("max_seq_length", True, ValueError),
    ("pooling", "cls", ValueError),
    ("prompt", 7, TypeError),
]
# from_pretrained(pooling=None) means "mean, or what the adapter was trained
# with"; on a loaded model None is not a pooling
ASSIGN_ONLY = [("pooling", None, ValueError)]


@pytest.mark.parametrize("name, value, exc", MODEL_SETTINGS,
                         ids=lambda v: v.__name__ if isinstance(v, type) else repr(v))
def test_from_pretrained_invalid_setting(tiny_file, name, value, exc):
    with pytest.raises(exc, match=name):
        deelm.DeeLM.from_pretrained(tiny_file, **{name: value})


@pytest.mark.parametrize("name, value, exc", MODEL_SETTINGS + ASSIGN_ONLY,
                         ids=lambda v: v.__name__ if isinstance(v, type) else repr(v))
def test_assigning_invalid_setting(own_model, name, value, exc):
    before = getattr(own_model, name)
    with pytest.raises(exc, match=name):
        setattr(own_model, name, value)
    assert getattr(own_model, name) == before  # a refused value changes nothing
    assert np.isfinite(own_model.encode("still fine")).all()


# ---- 2. model files ----------------------------------------------------------------------

def test_missing_file(tmp_path):
    _load_fails(tmp_path / "absent.gguf", "no such file")


def test_directory_without_gguf(tmp_path):
    (tmp_path / "README.txt").write_text("no model here")
    _load_fails(tmp_path, r"exactly one \.gguf file, found 0")


def test_directory_with_two_ggufs(tmp_path, tiny_bytes):
    _write(tmp_path, tiny_bytes, "a.gguf")
    _write(tmp_path, tiny_bytes, "b.gguf")
    _load_fails(tmp_path, r"exactly one \.gguf file, found 2")


def test_directory_with_one_gguf_loads(tmp_path, tiny_bytes):
    _write(tmp_path, tiny_bytes, "only.gguf")
    model = deelm.DeeLM.from_pretrained(tmp_path, threads=1)
    assert model.path == tmp_path / "only.gguf"


def test_random_bytes(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    _load_fails(_write(tmp_path, data), "not a GGUF file")


def test_text_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("this is a text file, not a model\n" * 10)
    _load_fails(p, "not a GGUF file")


def test_empty_file(tmp_path):
    _load_fails(_write(tmp_path, b""), "not a GGUF file")


def test_just_the_magic(tmp_path):
    _load_fails(_write(tmp_path, b"GGUF"), "truncated")


def _cut_points(layout, size):
    """name -> length to cut the tiny file at."""
    tokens = layout.fields["tokenizer.ggml.tokens"]
    info = _tensor_field(layout, "blk.1.attn_q.weight")
    mid = next(t for t in layout.tensors if t.name == "blk.1.ffn_up.weight")
    return {
        "in-magic": 2,
        "in-version": 6,
        "in-counts": 20,
        "in-first-key": 30,
        "in-token-list": _part_offset(tokens, 5 + 2 * 100) + 3,
        "in-metadata-end": layout.fields["tokenizer.ggml.add_bos_token"].offset + 5,
        "in-tensor-info": _part_offset(info, 3) + 4,
        "at-data-start": int(layout.data_offset),
        "in-first-tensor": int(layout.data_offset) + 1000,
        "in-middle-tensor": int(mid.data_offset) + 10,
        "last-tensor-minus-3": size - 3,
        "last-tensor-minus-1": size - 1,
    }


CUTS = ["in-magic", "in-version", "in-counts", "in-first-key", "in-token-list", "in-metadata-end",
        "in-tensor-info", "at-data-start", "in-first-tensor", "in-middle-tensor",
        "last-tensor-minus-3", "last-tensor-minus-1"]


@pytest.mark.parametrize("where", CUTS)
def test_truncated_file(tmp_path, tiny_bytes, layout, where):
    cut = _cut_points(layout, len(tiny_bytes))[where]
    assert 0 < cut < len(tiny_bytes)
    reason = "not a GGUF file" if cut < 4 else "truncated"
    _load_fails(_write(tmp_path, tiny_bytes[:cut]), reason)


def test_truncated_data_names_the_tensor(tmp_path, tiny_bytes, layout):
    last = layout.tensors[-1].name
    _load_fails(_write(tmp_path, tiny_bytes[:-3]), re.escape(f"tensor '{last}'") + ".*truncated")


def test_tensor_table_is_the_gguf_readers(tiny_file, layout, tmp_path, tiny_bytes):
    """deelm.io.gguf.tensor_table (the header alone, checked like read_gguf)
    lists what gguf's reader finds, and refuses a file cut inside the data."""
    from deelm.io.gguf import tensor_table

    assert tensor_table(tiny_file) == [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type),
                                        int(t.data_offset)) for t in layout.tensors]
    with pytest.raises(deelm.ModelFileError, match="truncated"):
        tensor_table(_write(tmp_path, tiny_bytes[:-3]))
    with pytest.raises(deelm.ModelFileError, match="not a GGUF file"):
        tensor_table(_write(tmp_path, b"GGML" + tiny_bytes[4:]))


@pytest.mark.parametrize("arch", ["gpt2", "mamba"])
def test_unknown_architecture(tmp_path, arch):
    path, _ = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    _load_fails(path, f"architecture '{arch}' is not supported", deelm.UnsupportedModelError)


@pytest.mark.parametrize("qtype, row_bytes", [(QT.Q2_K, 84), (QT.IQ4_NL, 18)], ids=["Q2_K", "IQ4_NL"])
def test_unsupported_extra_tensor_type(tmp_path, qtype, row_bytes):
    extra = {"blk.0.extra.weight": (np.zeros((1, row_bytes), np.uint8), qtype)}
    path, _ = write_tiny_gguf(tmp_path / "extra.gguf", extra_tensors=extra)
    _load_fails(path, rf"blk\.0\.extra\.weight.*{qtype.name}", deelm.UnsupportedModelError)


def test_unsupported_layer_weight_type(tmp_path):
    # blk.1.ffn_up [64 x 96] stored as IQ4_NL: 2 blocks of 18 bytes per row
    extra = {"blk.1.ffn_up.weight": (np.zeros((96, 36), np.uint8), QT.IQ4_NL)}
    path, _ = write_tiny_gguf(tmp_path / "iq4.gguf", skip=("blk.1.ffn_up",), extra_tensors=extra)
    _load_fails(path, r"blk\.1\.ffn_up\.weight.*IQ4_NL.*supported: .*Q4_K, Q5_K, Q6_K",
                deelm.UnsupportedModelError)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda t: t.name)
def test_k_quant_rows_must_be_whole_super_blocks(tmp_path, qtype):
    """A K-quant encodes each row in super-blocks of 256 values: blk.1.ffn_down
    has rows of 96 (the tiny hidden size), which no K-quant file can hold."""
    be, bb = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = D, TINY["hidden_dim"]
    extra = {"blk.1.ffn_down.weight": (np.zeros(rows * cols * bb // be, np.int8), qtype, (rows, cols))}
    path, _ = write_tiny_gguf(tmp_path / "k.gguf", skip=("blk.1.ffn_down",), extra_tensors=extra)
    _load_fails(path, rf"tensor 'blk\.1\.ffn_down\.weight': row length {cols} is not a multiple of "
                      rf"the {qtype.name} block of 256")


@pytest.mark.parametrize("name", ["blk.1.ffn_up", "token_embd", "output_norm", "blk.2.attn_norm"])
def test_missing_tensor(tmp_path, name):
    path, _ = write_tiny_gguf(tmp_path / "skip.gguf", skip=(name,))
    _load_fails(path, re.escape(f"tensor '{name}.weight' is missing"))


@pytest.mark.parametrize("name, value", [("blk.0.attn_q", np.nan), ("blk.2.ffn_down", np.inf),
                                         ("output_norm", -np.inf), ("token_embd", np.nan)])
def test_non_finite_f32_weight(tmp_path, name, value):
    w = random_weights(TINY)
    w[name].flat[7] = value
    path, _ = write_tiny_gguf(tmp_path / "nan.gguf", weights=w)
    _load_fails(path, re.escape(f"'{name}") + ".*non-finite")


@pytest.mark.parametrize("weight_type, field", [
    ("Q8_0", 0), ("Q4_0", 0), ("Q4_1", 0), ("F16", 0), ("Q5_0", 0), ("Q5_1", 2), ("Q4_K", 0),
    ("Q4_K", 2), ("Q5_K", 2), ("Q6_K", 208)])
@pytest.mark.parametrize("precision", ["int8", "float32"])
def test_non_finite_f16_scale(tmp_path, weight_type, field, precision):
    """An fp16 field of blk.1.ffn_gate's first block (its scale d, the min m of
    Q5_1, the dmin of the K-quants, the first value of an F16 tensor) set to
    inf, whichever way the weights are decoded."""
    path, _ = write_tiny_gguf(tmp_path / f"{weight_type}.gguf", weight_type=weight_type,
                              cfg=tiny_cfg(weight_type))
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_gate.weight")
    assert t.tensor_type == QT[weight_type]
    at = int(t.data_offset) + field
    del t  # it maps the file
    data = bytearray(path.read_bytes())
    data[at:at + 2] = np.float16(np.inf).tobytes()
    path = _write(tmp_path, data, "inf.gguf")
    _load_fails(path, r"'blk\.1\.ffn_gate.*non-finite", compute_precision=precision)


def test_huge_finite_weights_raise_instead_of_nan(tmp_path):
    """Weights that are finite but absurd overflow in the forward pass: encode()
    must say so rather than return NaN embeddings."""
    w = random_weights(TINY)
    w["blk.0.ffn_down"][:] = 3e38
    path, _ = write_tiny_gguf(tmp_path / "huge.gguf", weights=w)
    model = deelm.DeeLM.from_pretrained(path, threads=1)
    for output_value in ("sentence_embedding", "token_embeddings", "layer_embeddings"):
        with pytest.raises(deelm.ModelFileError, match="non-finite") as info:
            model.encode(["hello world"], output_value=output_value)
        assert str(path) in str(info.value)


# Structural bit flips in the header, metadata and tensor-info table, each
# must be refused: name -> (byte position, bit, reason the error gives).
def _structural_flips(layout):
    f = layout.fields
    # a tensor's parts: name length, name, n_dims, dims, type, offset
    q0 = _tensor_field(layout, "blk.0.attn_q.weight")
    q1 = _tensor_field(layout, "blk.1.attn_q.weight")
    # an array's parts: key length, key, type, item type, count, (length, string)*
    tokens = f["tokenizer.ggml.tokens"]
    return {
        "magic": (0, 0, "not a GGUF file"),
        "magic-high-bit": (3, 7, "not a GGUF file"),
        "version-to-1": (4, 1, "version 1"),
        "version-to-7": (4, 2, "version 7"),
        "version-high-bit": (6, 4, "version"),
        "tensor-count-low": (8, 0, "missing"),
        "tensor-count-high": (13, 0, "tensors cannot fit"),
        "tensor-count-top": (15, 7, "tensors cannot fit"),
        "kv-count-plus-one": (16, 0, "corrupted"),
        "kv-count-minus-two": (16, 1, "corrupted"),
        "kv-count-high": (20, 3, "metadata entries .* cannot fit"),
        "key-length": (_part_offset(f["general.architecture"], 0), 0, "corrupted"),
        "key-length-high": (_part_offset(f["general.architecture"], 0) + 7, 6, "corrupted"),
        "string-length": (_part_offset(f["general.architecture"], 3), 1, "corrupted"),
        "string-length-high": (_part_offset(f["general.architecture"], 3) + 5, 0, "corrupted"),
        "value-type-string-to-array": (_part_offset(f["general.architecture"], 2), 0, "corrupted"),
        "array-length": (_part_offset(tokens, 4) + 4, 1, "tokenizer.ggml.tokens.*cannot fit"),
        "scalar-array-length": (_part_offset(f["tokenizer.ggml.token_type"], 4) + 5, 0,
                                "tokenizer.ggml.token_type.*needs"),
        "token-string-length": (_part_offset(tokens, 5 + 2 * 100), 3, "corrupted"),
        "tensor-name-length": (_part_offset(q0, 0), 0, "corrupted"),
        # 2 dims -> 0: the first dim (64) is read as the type
        "tensor-dim-count": (_part_offset(q0, 2), 1, "unknown tensor type 64"),
        "tensor-type-to-F16": (_part_offset(q0, 4), 0, "offset"),
        "tensor-type-to-Q4_0": (_part_offset(q0, 4), 1, "offset"),
        "tensor-type-to-Q8_0": (_part_offset(q0, 4), 3, "offset"),
        "tensor-type-to-IQ2_XXS": (_part_offset(q0, 4), 4, "corrupted"),
        "tensor-type-invalid": (_part_offset(q0, 4), 2, "corrupted"),
        "tensor-dim-0": (_part_offset(q0, 3), 0, "offset"),
        "tensor-dim-1": (_part_offset(q0, 3) + 8, 5, "offset"),
        "tensor-dim-huge": (_part_offset(q0, 3) + 5, 0, "truncated"),
        "tensor-offset-misaligned": (_part_offset(q1, 5), 2, "offset"),
        "tensor-offset-aligned": (_part_offset(q1, 5), 5, "offset"),
        "tensor-offset-back": (_part_offset(q1, 5) + 1, 4, "offset"),
        "tensor-offset-huge": (_part_offset(q1, 5) + 6, 2, "truncated"),
        "last-tensor-offset": (_part_offset(layout.tensors[-1].field, 5), 5, "truncated"),
        "last-tensor-type": (_part_offset(layout.tensors[-1].field, 4), 0, "non-finite"),
    }


STRUCTURAL = ["magic", "magic-high-bit", "version-to-1", "version-to-7", "version-high-bit",
              "tensor-count-low", "tensor-count-high", "tensor-count-top", "kv-count-plus-one",
              "kv-count-minus-two", "kv-count-high", "key-length", "key-length-high",
              "string-length", "string-length-high", "value-type-string-to-array", "array-length",
              "scalar-array-length", "token-string-length", "tensor-name-length",
              "tensor-dim-count", "tensor-type-to-F16", "tensor-type-to-Q4_0",
              "tensor-type-to-Q8_0", "tensor-type-to-IQ2_XXS", "tensor-type-invalid",
              "tensor-dim-0", "tensor-dim-1", "tensor-dim-huge", "tensor-offset-misaligned",
              "tensor-offset-aligned", "tensor-offset-back", "tensor-offset-huge",
              "last-tensor-offset", "last-tensor-type"]


@pytest.mark.parametrize("where", STRUCTURAL)
def test_structural_bit_flip(tmp_path, tiny_bytes, layout, where):
    pos, bit, reason = _structural_flips(layout)[where]
    _load_fails(_flipped(tmp_path, tiny_bytes, pos, bit), reason)


def test_structural_flip_list_is_complete(layout):
    assert sorted(_structural_flips(layout)) == sorted(STRUCTURAL)


def test_version_2_header_loads_the_same(tmp_path, tiny_bytes, tiny_model):
    """Version 3 -> 2 is the one header flip that must load: the layouts are
    the same."""
    path = _flipped(tmp_path, tiny_bytes, 4, 0)
    model = deelm.DeeLM.from_pretrained(path, bidirectional_from=-1, threads=1)
    texts = ["a cat", "the other cat sat"]
    np.testing.assert_allclose(model.encode(texts), tiny_model.encode(texts), rtol=0, atol=1e-5)


def test_big_endian_file_is_refused(tmp_path, tiny_bytes):
    data = bytearray(tiny_bytes)
    data[4:8] = (3).to_bytes(4, "big")
    _load_fails(_write(tmp_path, data), "big-endian", deelm.UnsupportedModelError)


FUZZ_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import deelm

    src_path, flips_json, work = sys.argv[1:4]
    src = open(src_path, "rb").read()
    out = sys.stdout
    for i, (pos, bit) in enumerate(json.loads(flips_json)):
        data = bytearray(src)
        data[pos] ^= 1 << bit
        path = f"{work}/flip{i}.gguf"  # a new file: a loaded model maps its file
        with open(path, "wb") as fh:
            fh.write(data)
        out.write(json.dumps(dict(pos=pos, bit=bit, started=True)) + "\\n")
        out.flush()
        try:
            model = deelm.DeeLM.from_pretrained(path, threads=1)
            e = model.encode(["a cat sat on the mat", "", "hello world " * 5], pooling="last")
            e2 = model.encode(["the end"], output_value="layer_embeddings")
            finite = bool(np.isfinite(e).all() and np.isfinite(e2).all())
            res = dict(outcome="loaded" if finite else "non-finite")
        except deelm.DeeLMError as exc:
            res = dict(outcome="error", type=type(exc).__name__, message=str(exc),
                       names_path=path in str(exc))
        except BaseException as exc:
            res = dict(outcome="other", type=type(exc).__name__, message=str(exc)[:300])
        res.update(pos=pos, bit=bit)
        out.write(json.dumps(res) + "\\n")
        out.flush()
""")


def test_fuzz_bit_flips_before_the_data(tmp_path, tiny_file, layout):
    """200 single-bit flips (fixed seed) in the header, metadata and tensor-info
    table, all loaded in one subprocess so that a crash shows as its exit code."""
    rng = np.random.default_rng(20240611)
    n_header = int(layout.data_offset)
    flips = [(int(p), int(b)) for p, b in zip(rng.integers(0, n_header, 200), rng.integers(0, 8, 200))]
    try:
        proc = subprocess.run([sys.executable, "-c", FUZZ_SCRIPT, str(tiny_file), json.dumps(flips),
                               str(tmp_path)], capture_output=True, text=True, timeout=60)
        stdout, rc, stderr = proc.stdout, proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, stderr = "timeout (60 s)", ""
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    results = [r for r in lines if not r.get("started")]
    if rc != 0:
        last = lines[-1] if lines else None
        pytest.fail(f"fuzz subprocess ended with {rc} at flip {last} "
                    f"({len(results)} of {len(flips)} done): {stderr[-2000:]}")
    assert len(results) == len(flips)
    bad = [r for r in results if r["outcome"] not in ("loaded", "error")]
    assert not bad, f"flips giving neither finite embeddings nor a DeeLMError: {bad}"
    no_path = [r for r in results if r["outcome"] == "error" and not r["names_path"]]
    assert not no_path, f"errors that do not name the file: {no_path}"
    # the sample really exercises both outcomes
    outcomes = {r["outcome"] for r in results}
    assert outcomes == {"loaded", "error"}


# ---- 3. the C core -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_read(tiny_file):
    return read_gguf(tiny_file)


def _shortened(tensors, name, by=4):
    t, ne0, ne1, buf = tensors[name]
    return dict(tensors, **{name: (t, ne0, ne1, buf[:-by])})


def test_core_model_accepts_the_real_tensors(tiny_read):
    core = _core.Model(tiny_read.config, tiny_read.tensors)
    assert core.config["vocab_size"] == tiny_read.config["vocab_size"]


@pytest.mark.parametrize("name", ["token_embd", "output_norm", "blk.0.attn_q", "blk.1.attn_v",
                                  "blk.2.ffn_down"])
def test_core_model_short_buffer(tiny_read, name):
    with pytest.raises(ValueError, match=re.escape(f"tensor '{name}'") + ".*bytes"):
        _core.Model(tiny_read.config, _shortened(tiny_read.tensors, name))


def test_core_model_long_buffer(tiny_read):
    t, ne0, ne1, buf = tiny_read.tensors["blk.1.ffn_up"]
    longer = np.concatenate([buf, np.zeros(64, np.uint8)])
    with pytest.raises(ValueError, match=r"tensor 'blk\.1\.ffn_up'.*bytes"):
        _core.Model(tiny_read.config, dict(tiny_read.tensors, **{"blk.1.ffn_up": (t, ne0, ne1, longer)}))


@pytest.mark.parametrize("lie", ["type-F16", "type-Q8_0", "type-Q4_K", "type-unknown", "ne0", "ne1",
                                 "not-a-tuple", "short-tuple", "not-a-buffer"])
def test_core_model_lying_tensor(tiny_read, lie):
    name = "blk.1.attn_k"
    t, ne0, ne1, buf = tiny_read.tensors[name]
    value = {"type-F16": (1, ne0, ne1, buf), "type-Q8_0": (8, ne0, ne1, buf),
             "type-Q4_K": (12, ne0, ne1, buf),  # rows of 64: not whole super-blocks of 256
             "type-unknown": (10, ne0, ne1, buf), "ne0": (t, ne0 * 2, ne1 // 2, buf),
             "ne1": (t, ne0, ne1 + 1, buf), "not-a-tuple": [t, ne0, ne1, buf],
             "short-tuple": (t, ne0, ne1), "not-a-buffer": (t, ne0, ne1, list(range(10)))}[lie]
    exc = TypeError if lie == "not-a-buffer" else ValueError
    reason = {"type-Q4_K": "row length 64 is not a multiple of the Q4_K block of 256",
              "type-unknown": "tensor type 10, which deelm does not support"}.get(lie, "")
    with pytest.raises(exc, match=None if exc is TypeError else re.escape(f"'{name}'") + ".*" + reason):
        _core.Model(tiny_read.config, dict(tiny_read.tensors, **{name: value}))


@pytest.mark.parametrize("key, value, reason", [
    ("vocab_size", 270, r"'token_embd' has shape \[64, 269\]; the model config needs \[64, 270\]"),
    ("dim", 32, r"'token_embd' has shape \[64, 269\]; the model config needs \[32, 269\]"),
    ("hidden_dim", 97, r"'blk\.0\.ffn_gate' has shape"),
    ("n_layers", 4, r"'blk\.3\.attn_norm' is missing"),
    ("n_layers", 0, "n_layers"),
    ("n_layers", "3", "n_layers"),
    ("n_kv_heads", 3, "n_kv_heads"),
    ("n_heads", 0, "n_heads"),
    ("head_dim", 15, "head_dim"),
    ("vocab_size", -1, "vocab_size"),
    ("rms_eps", float("nan"), "rms_eps"),
    ("rms_eps", 2.0, "rms_eps"),
    ("rope_style", 7, "rope_style"),
    ("inv_freq", np.ones(3, np.float32), "inv_freq"),
], ids=lambda v: repr(v) if not isinstance(v, str) or "'" not in v else "")
def test_core_model_lying_config(tiny_read, key, value, reason):
    with pytest.raises(ValueError, match=reason):
        _core.Model(dict(tiny_read.config, **{key: value}), tiny_read.tensors)


def test_core_model_missing_config_key(tiny_read):
    cfg = dict(tiny_read.config)
    del cfg["n_heads"]
    with pytest.raises(ValueError, match="n_heads"):
        _core.Model(cfg, tiny_read.tensors)


def _batch(*lengths, vocab=VOCAB):
    rng = np.random.default_rng(sum(lengths))
    tokens = rng.integers(0, vocab, sum(lengths)).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    pool = np.array([[0, n] for n in lengths], dtype=np.int64).reshape(len(lengths), 2)
    return tokens, offsets, pool


def test_core_forward_good_batch(tiny_model):
    pooled, *_ = tiny_model._core.forward(*_batch(3, 5, 1), -1, 1)
    assert pooled.shape == (3, D) and np.isfinite(pooled).all()
    pooled, *_ = tiny_model._core.forward(np.zeros(0, np.int32), np.zeros(1, np.int64),
                                          np.zeros((0, 2), np.int64), -1, 1)
    assert pooled.shape == (0, D)


def _bad_batches(vocab):
    tokens, offsets, pool = _batch(3, 3)

    def with_id(i, v):
        return np.where(np.arange(6) == i, v, tokens).astype(np.int32)

    return {
        "id-equals-vocab": (with_id(4, vocab), offsets, pool, "token id"),
        "id-negative": (with_id(0, -1), offsets, pool, "token id"),
        "id-huge": (np.full(6, 2**31 - 1, np.int32), offsets, pool, "token id"),
        "offsets-start-at-1": (tokens, np.array([1, 3, 6]), pool, "seq_offsets"),
        "offsets-end-short": (tokens, np.array([0, 3, 5]), pool, "seq_offsets"),
        "offsets-end-long": (tokens, np.array([0, 3, 7]), pool, "seq_offsets"),
        "offsets-decrease": (tokens, np.array([0, 4, 2, 6]), np.array([[0, 1]] * 3), "sentence 1"),
        "offsets-overshoot": (tokens, np.array([0, 1 << 40, 6]), pool, "sentence 0"),
        "offsets-empty": (tokens, np.zeros(0, np.int64), np.zeros((0, 2), np.int64), "seq_offsets"),
        "empty-sentence": (tokens, np.array([0, 3, 3, 6]), np.array([[0, 3], [0, 1], [0, 3]]), "sentence 1"),
        "pool-past-end": (tokens, offsets, np.array([[0, 3], [0, 4]]), "pool range"),
        "pool-negative": (tokens, offsets, np.array([[-1, 3], [0, 3]]), "pool range"),
        "pool-empty": (tokens, offsets, np.array([[0, 3], [2, 2]]), "pool range"),
        "pool-reversed": (tokens, offsets, np.array([[2, 1], [0, 3]]), "pool range"),
        "pool-wrong-count": (tokens, offsets, np.array([[0, 3]]), "pool"),
        "pool-wrong-width": (tokens, offsets, np.array([[0, 3, 0], [0, 3, 0]]), "pool"),
        "pool-1d": (tokens, offsets, np.array([0, 3, 0, 3]), "too deep|too small depth"),
        "tokens-2d": (tokens.reshape(2, 3), offsets, pool, "too deep|too small depth"),
    }


BAD_BATCHES = ["id-equals-vocab", "id-negative", "id-huge", "offsets-start-at-1", "offsets-end-short",
               "offsets-end-long", "offsets-decrease", "offsets-overshoot", "offsets-empty",
               "empty-sentence", "pool-past-end", "pool-negative", "pool-empty", "pool-reversed",
               "pool-wrong-count", "pool-wrong-width", "pool-1d", "tokens-2d"]


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_core_forward_bad_batch(tiny_model, case):
    core = tiny_model._core
    tokens, offsets, pool, reason = _bad_batches(core.config["vocab_size"])[case]
    with pytest.raises(ValueError, match=reason):
        core.forward(tokens, offsets, pool, -1, 1)
    pooled, *_ = core.forward(*_batch(2, 4), -1, 1)  # the model is unharmed
    assert np.isfinite(pooled).all()


def test_bad_batch_list_is_complete():
    assert sorted(_bad_batches(VOCAB)) == sorted(BAD_BATCHES)


@pytest.mark.parametrize("k, threads, name", [(3, 1, "bidirectional_from"), (-2, 1, "bidirectional_from"),
                                              (-1, 0, "threads"), (-1, 4096, "threads")])
def test_core_forward_bad_settings(tiny_model, k, threads, name):
    with pytest.raises(ValueError, match=name):
        tiny_model._core.forward(*_batch(2, 3), k, threads)


def test_core_forward_wrong_dtypes_are_refused(tiny_model):
    tokens, offsets, pool = _batch(2, 3)
    for args in [(tokens.astype(np.float64), offsets, pool), (tokens, offsets.astype(np.float32), pool),
                 (tokens, offsets, pool.astype(np.float64)), ("abc", offsets, pool)]:
        with pytest.raises((TypeError, ValueError)):
            tiny_model._core.forward(*args, -1, 1)


# ---- 4. resolving the model path -------------------------------------------------------

@pytest.mark.parametrize("bad", [123, 4.5, [b"x.gguf"], b"model.gguf"], ids=repr)
def test_model_argument_of_wrong_type(bad):
    with pytest.raises(TypeError, match="model must be a path"):
        deelm.DeeLM.from_pretrained(model=bad)


def test_env_var_pointing_to_missing_file(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "model.gguf"
    monkeypatch.setenv(deelm.MODEL_ENV, str(missing))
    with pytest.raises(deelm.ModelFileError, match=re.escape(str(missing)) + ".*no such file"):
        deelm.DeeLM.from_pretrained()


def test_env_var_pointing_to_empty_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(deelm.MODEL_ENV, str(tmp_path))
    with pytest.raises(deelm.ModelFileError, match=re.escape(str(tmp_path)) + ".*found 0"):
        deelm.DeeLM.from_pretrained()


def test_env_var_pointing_to_tiny_model(tiny_file, monkeypatch):
    monkeypatch.setenv(deelm.MODEL_ENV, str(tiny_file))
    assert deelm.DeeLM.from_pretrained(threads=1).path == tiny_file


# ---- inputs that used to pass through wrong or with the wrong error --------------------

def test_tokenize_refuses_non_strings_like_encode(tiny_model):
    with pytest.raises(TypeError, match=r"sentences\[0\] is int"):
        tiny_model.tokenize([1])
    with pytest.raises(TypeError, match="sentences must be"):
        tiny_model.tokenize(3.5)


def test_forward_ids_refuses_float_and_out_of_range_ids(tiny_model):
    with pytest.raises(TypeError, match="integers"):
        tiny_model.forward_ids([[1.7, 2.2]])
    with pytest.raises(TypeError, match="integers"):
        tiny_model.forward_ids([[True, False]])
    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):
        tiny_model.forward_ids([[2**40]])  # would wrap to a valid id as int32
    with pytest.raises(ValueError, match=r"\[0, 2\*\*31\)"):
        tiny_model.forward_ids([[-1]])


def test_similarity_of_no_vectors_is_empty():
    import deelm

    assert deelm.cos_sim(np.array([]), np.array([])).shape == (0, 0)
    assert deelm.cos_sim(np.zeros((0, 4)), np.ones((3, 4))).shape == (0, 3)


def test_train_forward_seed_out_of_range(tiny_model):
    core = tiny_model._core
    x = np.zeros((2, tiny_model.config["dim"]), np.float32)
    off = np.array([0, 2], np.int64)
    pool = np.array([[0, 2]], np.int64)
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            core.train_forward(x, off, pool, 0, -1, 1, 0.1, seed)
    for seed in (0, 2**64 - 1, np.uint64(7)):  # valid: past the seed check to the next one
        with pytest.raises(RuntimeError, match="set_lora"):
            core.train_forward(x, off, pool, 0, -1, 1, 0.1, seed)


def test_overflowing_adapter_is_an_error_naming_it(tiny_path, tmp_path):
    """An adapter whose B is finite but absurd (3e38) overflows q/k to inf;
    attention used to turn that into finite, wrong embeddings."""
    from deelm.errors import AdapterError
    from deelm.adapters.lora import LoraConfig, LoraLayout
    from deelm.adapters.peft import save_adapter

    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=1)
    layout = LoraLayout(LoraConfig(r=2, alpha=4, target_modules=("q_proj", "k_proj")), m.config)
    params = np.full(layout.size, 3e38, np.float32)
    folder = save_adapter(tmp_path / "huge", layout, params)
    m.load_adapter(folder)
    with pytest.raises(AdapterError, match="overflowed") as e:
        m.encode(["a cat sat on the mat"])
    assert "huge" in str(e.value)
    m.remove_adapter()
    assert np.isfinite(m.encode(["a cat sat on the mat"])).all()


def test_attention_op_refuses_non_finite_qkv():
    from deelm import _core

    qkv = np.zeros((3, 4 * 8), np.float32)
    off = np.array([0, 3], np.int64)
    for bad in (np.inf, -np.inf, np.nan):
        q = qkv.copy()
        q[1, 9] = bad  # a key
        with pytest.raises(ValueError, match="inf or NaN"):
            _core.attention(q, off, 2, 1, 8, False, 1)


def test_public_layer_level_surface(tiny_model):
    """pool_range, num_parameters, adapter_path and core: the names the
    trainer and the analyses use instead of private attributes."""
    enc = tiny_model.tokenize(["a cat sat", "x"])
    n = len(enc[0].ids)
    assert tiny_model.pool_range(enc[0], "mean") == (0, n)
    assert tiny_model.pool_range(enc[0], "last") == (n - 1, n)
    with pytest.raises(ValueError, match="pooling must be one of"):
        tiny_model.pool_range(enc[0], "max")
    total = tiny_model.num_parameters()
    assert 0 < tiny_model.num_parameters(exclude_embeddings=True) < total
    assert tiny_model.adapter_path is None
    assert tiny_model.core.config["n_layers"] == tiny_model.num_layers

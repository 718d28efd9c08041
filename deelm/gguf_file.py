"""Reading a GGUF model file: configuration, tensor views and vocabulary.

Parsing is done by the `gguf` package (the format's reference reader). deelm
adds what a reader of untrusted files needs: the header's counts and lengths
are checked against the file size before the reader sees them, every failure
becomes a ModelFileError naming the file, every tensor's offset and size is
checked against the file before its bytes are handed to the C core (which
checks the byte counts once more against the shapes), and the configuration
is checked for consistency with the tensors.
"""
from dataclasses import dataclass, field
import math
import mmap
import os
from pathlib import Path
import struct

import numpy as np

from . import _core
from .errors import ModelFileError, UnsupportedModelError
from .model_file import LAYER_TENSORS, ROPE_INTERLEAVED, ModelFile, rope_inv_freq

# GGUF architectures whose blocks deelm runs: LLaMA's layout (RMSNorm, RoPE,
# grouped-query attention, SwiGLU). Mistral GGUFs are written as "llama".
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF metadata value types: bytes taken by each scalar type; 8 is a string,
# 9 an array.
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_DIMS = 4


@dataclass
class GGUFModel(ModelFile):
    """What deelm reads from a GGUF file."""

    vocab: dict = field(default_factory=dict, repr=False)  # tokenizer.ggml.* fields

    def tokenizer(self):
        """The deelm Tokenizer of the file's vocabulary."""
        from .tokenizer import Tokenizer

        return Tokenizer.from_gguf_vocab(self.vocab, self.path, self.config["vocab_size"])


def _supported_type_names():
    names = []
    for t in range(64):
        info = _core.type_info(t)
        if info:
            names.append(info[0])
    return ", ".join(names)


def _field(reader, key, default=None, *, required=False, path=None):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ModelFileError(path, f"metadata key '{key}' is missing")
        return default
    try:
        return f.contents()
    except Exception as e:  # a corrupted field: say which one
        raise ModelFileError(path, f"metadata key '{key}' cannot be read ({e})") from None


def _positive_int(value, key, path, *, limit=1 << 24):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ModelFileError(path, f"metadata key '{key}' should be an integer, found {value!r}")
    if not 0 < int(value) <= limit:
        raise ModelFileError(path, f"metadata key '{key}' = {value} is out of range (1..{limit})")
    return int(value)


def read_gguf(path):
    """Reads and checks a GGUF file. Raises ModelFileError (or its subclass
    UnsupportedModelError) with the path and the reason."""
    path = Path(path)
    file_size = _check_header(path)
    _check_layout(path, file_size)
    import gguf  # imported late: it is only needed when a file is read

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError, TypeError,
            UnicodeDecodeError, OSError, AssertionError) as e:
        raise ModelFileError(path, f"corrupted or truncated GGUF ({type(e).__name__}: {e})") from None
    return _interpret(reader, path, file_size)


def tensor_table(path):
    """The tensors of a GGUF file as [(name, shape (row length first), GGML
    type id, byte offset in the file)], read from its header alone, checked
    as read_gguf checks it. Metadata values are skipped, not decoded: fast
    even for files with vocabularies of 262k tokens, where read_gguf takes
    seconds."""
    path = Path(path)
    infos, data_start = _check_layout(path, _check_header(path))
    if data_start is None:
        raise ModelFileError(path, "corrupted GGUF (general.alignment is not a power of two)")
    return [(name, dims, type_id, data_start + offset) for name, dims, type_id, offset in infos]


def _check_header(path):
    """The file exists and starts like a GGUF file; returns its size."""
    if not path.exists():
        raise ModelFileError(path, "no such file")
    if not path.is_file():
        raise ModelFileError(path, "not a regular file")
    file_size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise ModelFileError(path, f"cannot be read ({e.strerror})") from None
    if magic != b"GGUF":
        raise ModelFileError(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    return file_size


def _check_layout(path, file_size):
    """Walks the header, the metadata and the tensor-info table, checking that
    every count and length fits in the file and every tensor's data ends inside
    it, before the gguf reader sees it: the reader trusts them, and a corrupted
    array length can keep it looping for hours. Raises ModelFileError at the
    first one that does not fit. Returns the tensor-info table [(name, dims,
    type id, offset in the data section)] and where the data section starts
    (None if the alignment is not a power of two: the gguf reader says so)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    def bad(what):
        return ModelFileError(path, f"corrupted or truncated GGUF ({what})")

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos, alignment = 4, 32  # after the magic; GGUF's default alignment

        def take(n, what):
            nonlocal pos
            if n > file_size - pos:
                raise bad(f"{what} at byte {pos} needs {n} bytes, the {file_size}-byte file has "
                          f"{file_size - pos} left")
            pos += n
            return pos - n

        def uint(fmt, what):
            return struct.unpack_from("<" + fmt, buf, take(struct.calcsize(fmt), what))[0]

        def string(what):  # -> where it starts
            return take(uint("Q", f"length of {what}"), what)

        version = uint("I", "version")
        if version & 0xFFFF == 0 and version:  # how the gguf reader spots a big-endian file
            raise UnsupportedModelError(path, "big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise bad(f"version {version}; deelm reads GGUF versions 2 and 3")
        n_tensors, n_kv = uint("Q", "tensor count"), uint("Q", "metadata count")
        # a metadata entry takes at least 13 bytes, a tensor description 24
        if n_kv * 13 + n_tensors * 24 > file_size - pos:
            raise bad(f"{n_kv} metadata entries and {n_tensors} tensors cannot fit in the "
                      f"{file_size}-byte file")
        for i in range(n_kv):
            start = string(f"metadata key {i}")
            key = buf[start:min(pos, start + 80)].decode("utf-8", "replace")
            what = f"metadata value {key!r}"
            vtype, n = uint("I", f"type of {what}"), 1
            if key == "general.alignment" and vtype == 4:  # UINT32
                alignment = struct.unpack_from("<I", buf, pos)[0] if file_size - pos >= 4 else 0
            if vtype == _GGUF_ARRAY:
                vtype, n = uint("I", f"item type of {what}"), uint("Q", f"length of {what}")
                what = f"{what} (an array of {n})"
            if vtype == _GGUF_STRING:
                if n * 8 > file_size - pos:
                    raise bad(f"{what} cannot fit in the {file_size - pos} bytes left")
                for _ in range(n):
                    string(what)
            elif vtype in _GGUF_SCALAR_BYTES:
                take(n * _GGUF_SCALAR_BYTES[vtype], what)
            else:
                raise bad(f"{what} has unknown or unsupported value type {vtype}")
        infos = []
        for i in range(n_tensors):
            start = string(f"name of tensor {i}")
            name = buf[start:min(pos, start + 80)].decode("utf-8", "replace")
            n_dims = uint("I", f"dimension count of tensor {name!r}")
            if n_dims > _GGUF_MAX_DIMS:
                raise bad(f"tensor {name!r} has {n_dims} dimensions, GGUF allows {_GGUF_MAX_DIMS}")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, take(8 * n_dims, f"shape of tensor {name!r}"))
            infos.append((name, dims, uint("I", f"type of tensor {name!r}"),
                          uint("Q", f"offset of tensor {name!r}")))
        # GGML types encode each row in whole blocks (256 values for K-quants);
        # the gguf reader would refuse such a tensor without naming it
        for name, dims, type_id, _ in infos:
            if type_id in GGML_QUANT_SIZES and dims and dims[0] % GGML_QUANT_SIZES[type_id][0]:
                raise ModelFileError(
                    path, f"tensor '{name}': row length {dims[0]} is not a multiple of the "
                          f"{GGMLQuantizationType(type_id).name} block of "
                          f"{GGML_QUANT_SIZES[type_id][0]} (corrupted tensor table?)")
        # a file cut short (an interrupted download) ends inside some tensor's data
        data_start = None
        if alignment and not alignment & (alignment - 1):  # else the gguf reader says what is wrong
            data_start = -(-pos // alignment) * alignment
            for name, dims, type_id, offset in infos:
                if type_id in GGML_QUANT_SIZES:
                    block_elems, block_bytes = GGML_QUANT_SIZES[type_id]
                    end = data_start + offset + math.prod(dims) * block_bytes // block_elems
                    if end > file_size:
                        raise ModelFileError(path, f"tensor '{name}' ends at byte {end}, past the end "
                                                   f"of the {file_size}-byte file (truncated?)")
        return infos, data_start


def _interpret(reader, path, file_size):
    arch = _field(reader, "general.architecture", required=True, path=path)
    if not isinstance(arch, str):
        raise ModelFileError(path, "metadata key 'general.architecture' is not a string")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            path, f"architecture '{arch}' is not supported by deelm "
                  f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def meta_int(key, default=None):
        full = f"{arch}.{key}"
        v = _field(reader, full, default, required=default is None, path=path)
        return _positive_int(v, full, path)

    n_layers = meta_int("block_count")
    dim = meta_int("embedding_length")
    hidden = meta_int("feed_forward_length")
    n_heads = meta_int("attention.head_count")
    n_kv = meta_int("attention.head_count_kv", n_heads)
    if dim % n_heads:
        raise ModelFileError(path, f"embedding_length {dim} is not a multiple of head_count {n_heads}")
    head_dim = meta_int("attention.key_length", dim // n_heads)
    rope_dims = meta_int("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(
            path, f"partial rotary embedding (rope.dimension_count {rope_dims} < head_dim "
                  f"{head_dim}) is not supported")
    theta = _field(reader, f"{arch}.rope.freq_base", 10000.0, path=path)
    eps = _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, path=path)
    for key, v in (("rope.freq_base", theta), ("attention.layer_norm_rms_epsilon", eps)):
        if not isinstance(v, (float, int, np.floating)) or not np.isfinite(v) or v <= 0:
            raise ModelFileError(path, f"metadata key '{arch}.{key}' = {v!r} is not a positive number")
    scaling = _field(reader, f"{arch}.rope.scaling.type", None, path=path)
    if scaling not in (None, "none"):
        raise UnsupportedModelError(path, f"rope scaling type '{scaling}' is not supported")
    context_length = meta_int("context_length", 2048)

    tensors, types = _tensors(reader, path, file_size)
    embd = tensors.get("token_embd")
    if embd is None:
        raise ModelFileError(path, "tensor 'token_embd.weight' is missing")
    vocab_size = embd[2]

    inv_freq = rope_inv_freq(head_dim, float(theta))
    if "rope_freqs" in tensors:  # LLaMA-3.1 style frequency factors, stored as a tensor
        t, ne0, ne1, buf = tensors.pop("rope_freqs")
        if ne0 != head_dim // 2 or ne1 != 1 or t != 0:
            raise ModelFileError(path, f"tensor 'rope_freqs.weight' should be F32 [{head_dim // 2}]")
        inv_freq = (inv_freq / buf.view(np.float32)).astype(np.float32)

    config = dict(n_layers=n_layers, dim=dim, hidden_dim=hidden, n_heads=n_heads,
                  n_kv_heads=n_kv, head_dim=head_dim, vocab_size=vocab_size,
                  rms_eps=float(eps), rope_style=ROPE_INTERLEAVED, inv_freq=inv_freq)
    if n_heads % n_kv:
        raise ModelFileError(path, f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    for l in range(n_layers):
        for name in LAYER_TENSORS:
            if f"blk.{l}.{name}" not in tensors:
                raise ModelFileError(path, f"tensor 'blk.{l}.{name}.weight' is missing "
                                           f"(block_count says {n_layers} layers)")
    if "output_norm" not in tensors:
        raise ModelFileError(path, "tensor 'output_norm.weight' is missing")

    vocab = {}
    for key in reader.fields:
        if key.startswith("tokenizer.ggml."):
            vocab[key[len("tokenizer.ggml."):]] = _field(reader, key, path=path)
    name = _field(reader, "general.name", path.stem, path=path)
    return GGUFModel(path=path, architecture=arch, name=str(name), config=config, tensors=tensors,
                     tensor_types=types, context_length=context_length, vocab=vocab,
                     file_size=file_size, mappings=[getattr(reader.data, "_mmap", None)])


def _tensors(reader, path, file_size):
    """deelm name -> (type id, ne0, ne1, bytes as a uint8 array view of the file)."""
    # Each tensor's data follows the previous one's, padded to the alignment, as
    # llama.cpp requires: a corrupted offset or type must not make a tensor
    # silently read the bytes of another.
    expected, align = 0, int(reader.alignment)
    for t in reader.tensors:
        offset = int(t.data_offset) - int(reader.data_offset)
        if offset != expected:
            raise ModelFileError(path, f"tensor '{t.name}' data is at offset {offset} of the data "
                                       f"section, the tensors before it end at {expected} "
                                       f"(corrupted tensor table?)")
        expected += -(-int(t.n_bytes) // align) * align
    tensors, types = {}, {}
    for t in reader.tensors:
        name = t.name[:-len(".weight")] if t.name.endswith(".weight") else t.name
        if name == "output":  # the vocabulary head: embeddings never need it
            continue
        type_id = int(t.tensor_type)
        info = _core.type_info(type_id)
        type_name = t.tensor_type.name
        if info is None:
            raise UnsupportedModelError(
                path, f"tensor '{t.name}' has tensor type {type_name}, which deelm does not "
                      f"support (supported: {_supported_type_names()})")
        shape = [int(x) for x in t.shape]  # ne0 first: row length
        if not 1 <= len(shape) <= 2 or any(x <= 0 for x in shape):
            raise ModelFileError(path, f"tensor '{t.name}' has shape {shape}, expected 1 or 2 positive dims")
        ne0, ne1 = shape[0], (shape[1] if len(shape) == 2 else 1)
        _, block_elems, block_bytes = info
        if ne0 % block_elems:
            raise ModelFileError(path, f"tensor '{t.name}': row length {ne0} is not a multiple of "
                                       f"the {type_name} block of {block_elems}")
        n_bytes = ne0 // block_elems * block_bytes * ne1
        start = int(t.data_offset)
        if start < 0 or start + n_bytes > file_size:
            raise ModelFileError(
                path, f"tensor '{t.name}' ({n_bytes} bytes at offset {start}) runs past the end of "
                      f"the {file_size}-byte file (truncated?)")
        data = np.asarray(t.data)
        raw = data.reshape(-1).view(np.uint8) if data.flags.c_contiguous else None
        if raw is None or raw.nbytes != n_bytes:
            raise ModelFileError(path, f"tensor '{t.name}' data is {0 if raw is None else raw.nbytes} "
                                       f"bytes, its shape and type need {n_bytes}")
        if name in tensors:
            raise ModelFileError(path, f"tensor '{t.name}' appears twice")
        tensors[name] = (type_id, ne0, ne1, raw)
        types[type_name] = types.get(type_name, 0) + 1
    return tensors, types

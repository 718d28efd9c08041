"""Reading a GGUF model file: configuration, tensor views and vocabulary.

deelm walks the header itself (the `gguf` package supplies the format's
constants): every count and length in it is checked against the file size as
it is read, and metadata values are decoded only when asked for. The `gguf`
package's reader decodes every value up front, which takes 3 s for the
default model's 49k-token vocabulary and merges and 15 s for Gemma-3's 262k
tokens; this reader takes 0.1 s for either (and 0.13 s more to decode
Gemma-3's vocabulary when it is needed). Every failure becomes a
ModelFileError naming the file, every tensor's offset and size is checked
against the file before its bytes are handed to the C core (which checks the
byte counts once more against the shapes), and the configuration is checked
for consistency with the tensors.
"""
from dataclasses import dataclass, field
import math
import mmap
import os
from pathlib import Path
import struct

import numpy as np

from deelm import _core
from deelm.errors import ModelFileError, UnsupportedModelError
from deelm.io.layout import (GEMMA3_LAYER_TENSORS, GEMMA3_LOCAL_ROPE_BASE, GEMMA3_PATTERN,
                             LAYER_TENSORS, ROPE_INTERLEAVED, ModelFile, gemma3_features,
                             gemma3_local_layers, linear_scaled, rope_inv_freq)

# GGUF architectures whose blocks deelm runs: LLaMA's layout (RMSNorm, RoPE,
# grouped-query attention, SwiGLU; Mistral GGUFs are written as "llama") and
# Gemma-3's (see _gemma3_features).
SUPPORTED_ARCHITECTURES = ("llama", "gemma3")

# GGUF metadata value types: the struct format of each scalar type; 8 is a
# string, 9 an array.
_GGUF_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                        11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
_GGUF_MAX_DIMS = 4
_U64 = struct.Struct("<Q")


@dataclass
class GGUFModel(ModelFile):
    """What deelm reads from a GGUF file."""

    vocab: dict = field(default_factory=dict, repr=False)  # tokenizer.ggml.* fields

    def tokenizer(self):
        """The deelm Tokenizer of the file's vocabulary."""
        from deelm.io.tokenizer import Tokenizer

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
    header = read_header(path)
    return _interpret(header, header.path, header.file_size)


def tensor_table(path):
    """The tensors of a GGUF file as [(name, shape (row length first), GGML
    type id, byte offset in the file)], read from its header alone, checked
    as read_gguf checks it."""
    return [(t.name, t.shape, int(t.tensor_type), t.data_offset) for t in read_header(path).tensors]


class _Field:
    """One metadata value, decoded when read with contents() (as the gguf
    package's ReaderField): a 262k-token vocabulary costs nothing until it is
    used. [start, end) is the value's bytes in the file."""

    def __init__(self, buf, vtype, start, end, count=None, string_ends=None):
        self.buf, self.vtype, self.start, self.end = buf, vtype, start, end
        self.count = count              # items of an array; None for a scalar
        self.string_ends = string_ends  # array of strings: where each one ends

    def string_at(self, i):
        """Item i of an array of strings, decoding only that one."""
        begin = self.start if i == 0 else self.string_ends[i - 1]
        return str(self.buf[begin + 8:self.string_ends[i]], "utf-8")

    def contents(self):
        buf, start = self.buf, self.start
        if self.vtype == _GGUF_STRING:
            if self.count is None:
                return str(buf[start + 8:self.end], "utf-8")
            raw, out, prev = buf[start:self.end], [], 0  # one read, then slices of it
            for end in self.string_ends:
                end -= start
                out.append(str(raw[prev + 8:end], "utf-8"))
                prev = end
            return out
        fmt = _GGUF_SCALAR_FORMATS[self.vtype]
        if self.count is None:
            return struct.unpack_from("<" + fmt, buf, start)[0]
        if fmt == "?":  # any non-zero byte is true, as for a scalar
            return (np.frombuffer(buf, np.uint8, self.count, start) != 0).tolist()
        return np.frombuffer(buf, np.dtype("<" + fmt), self.count, start).tolist()


@dataclass
class _TensorInfo:
    """A tensor as the header describes it (the attributes deelm uses of the
    gguf package's ReaderTensor). data: its bytes, a uint8 view of the file."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple         # row length first
    n_bytes: int
    data_offset: int     # in the file
    data: np.ndarray = field(repr=False)


@dataclass
class GGUFHeader:
    """A GGUF file's metadata (key -> _Field) and tensor table, walked once
    and checked against the file's size; the file stays mapped."""

    path: Path
    file_size: int
    fields: dict
    tensors: list
    alignment: int
    data_offset: int  # where the tensor data section starts
    mapping: object = field(repr=False)

    def value(self, key, default=None, *, required=False):
        """A metadata value, decoded; ModelFileError if it cannot be."""
        return _field(self, key, default, required=required, path=self.path)

    def vocab(self):
        """The tokenizer.ggml.* fields, decoded, keyed without the prefix:
        what deelm.io.tokenizer.Tokenizer.from_gguf_vocab takes."""
        prefix = "tokenizer.ggml."
        return {key[len(prefix):]: self.value(key) for key in self.fields if key.startswith(prefix)}


def read_header(path):
    """Walks the header, the metadata and the tensor-info table of a GGUF
    file, checking that every count and length fits in the file, every key
    and tensor name is UTF-8 and unique, and every tensor's data ends inside
    the file. Raises ModelFileError at the first thing that does not fit.
    Metadata values are located, not decoded."""
    path = Path(path)
    file_size = _check_header(path)
    with open(path, "rb") as fh:
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _walk(path, buf, file_size)
    except BaseException:
        buf.close()
        raise


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


def _walk(path, buf, file_size):
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    def bad(what):
        return ModelFileError(path, f"corrupted or truncated GGUF ({what})")

    pos = 4  # after the magic

    def take(n, what):
        nonlocal pos
        if n > file_size - pos:
            raise bad(f"{what} at byte {pos} needs {n} bytes, the {file_size}-byte file has "
                      f"{file_size - pos} left")
        pos += n
        return pos - n

    def uint(fmt, what):
        return struct.unpack_from("<" + fmt, buf, take(struct.calcsize(fmt), what))[0]

    def text(what):
        start = take(uint("Q", f"length of {what}"), what)
        try:
            return str(buf[start:pos], "utf-8")
        except UnicodeDecodeError:
            raise bad(f"{what} is not UTF-8 text") from None

    def strings(n, what):
        """Skips n strings; returns where each ends. The tight loop keeps a
        262k-token vocabulary at ~0.1 s."""
        nonlocal pos
        if n * 8 > file_size - pos:
            raise bad(f"{what} cannot fit in the {file_size - pos} bytes left")
        ends, p, last = [], pos, file_size - 8
        unpack, append = _U64.unpack_from, ends.append
        for i in range(n):
            if p > last:
                break
            p += 8 + unpack(buf, p)[0]
            append(p)
        if len(ends) < n or p > file_size:
            raise bad(f"string {len(ends) - (p > file_size)} of {what} runs past the end of the "
                      f"{file_size}-byte file")
        pos = p
        return ends

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
    fields = {}
    for i in range(n_kv):
        key = text(f"metadata key {i}")
        if key in fields:
            raise bad(f"metadata key {key!r} appears twice")
        what = f"metadata value {key!r}"
        vtype, count = uint("I", f"type of {what}"), None
        start = pos
        if vtype == _GGUF_ARRAY:
            vtype, count = uint("I", f"item type of {what}"), uint("Q", f"length of {what}")
            what = f"{what} (an array of {count})"
        ends = None
        if vtype == _GGUF_STRING:
            if count is None:
                take(uint("Q", f"length of {what}"), what)
            else:
                ends = strings(count, what)
        elif vtype in _GGUF_SCALAR_FORMATS:
            take((count or 1) * struct.calcsize(_GGUF_SCALAR_FORMATS[vtype]), what)
        else:
            raise bad(f"{what} has unknown or unsupported value type {vtype}")
        if count is not None:
            start += 12  # the array's item type and length
        fields[key] = _Field(buf, vtype, start, pos, count, ends)
    alignment = 32  # GGUF's default
    if "general.alignment" in fields:
        f = fields["general.alignment"]
        alignment = f.contents() if f.vtype == _GGUF_UINT32 and f.count is None else 0
        if not alignment or alignment & (alignment - 1):
            raise bad("general.alignment is not a UINT32 power of two")
    infos, names = [], set()
    for i in range(n_tensors):
        name = text(f"name of tensor {i}")
        if name in names:
            raise bad(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = uint("I", f"dimension count of tensor {name!r}")
        if n_dims > _GGUF_MAX_DIMS:
            raise bad(f"tensor {name!r} has {n_dims} dimensions, GGUF allows {_GGUF_MAX_DIMS}")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, take(8 * n_dims, f"shape of tensor {name!r}"))
        type_id = uint("I", f"type of tensor {name!r}")
        if type_id not in GGML_QUANT_SIZES:
            raise bad(f"tensor {name!r} has unknown tensor type {type_id}")
        infos.append((name, dims, type_id, uint("Q", f"offset of tensor {name!r}")))
    # GGML types encode each row in whole blocks (256 values for K-quants)
    for name, dims, type_id, _ in infos:
        if dims and dims[0] % GGML_QUANT_SIZES[type_id][0]:
            raise ModelFileError(
                path, f"tensor '{name}': row length {dims[0]} is not a multiple of the "
                      f"{GGMLQuantizationType(type_id).name} block of "
                      f"{GGML_QUANT_SIZES[type_id][0]} (corrupted tensor table?)")
    # a file cut short (an interrupted download) ends inside some tensor's data
    data_start = -(-pos // alignment) * alignment
    spans = []
    for name, dims, type_id, offset in infos:
        block_elems, block_bytes = GGML_QUANT_SIZES[type_id]
        start = data_start + offset
        end = start + math.prod(dims) * block_bytes // block_elems
        if end > file_size:
            raise ModelFileError(path, f"tensor '{name}' ends at byte {end}, past the end of the "
                                       f"{file_size}-byte file (truncated?)")
        spans.append((start, end))
    data = np.frombuffer(buf, np.uint8)  # from here on the mapping cannot be closed
    tensors = [_TensorInfo(name, GGMLQuantizationType(type_id), dims, end - start, start,
                           data[start:end])
               for (name, dims, type_id, _), (start, end) in zip(infos, spans)]
    return GGUFHeader(path, file_size, fields, tensors, alignment, data_start, buf)


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
    if scaling not in (None, "none") and not (arch == "gemma3" and scaling == "linear"):
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
    layer_tensors = LAYER_TENSORS
    if arch == "gemma3":
        config.update(_gemma3_features(reader, path, config))
        layer_tensors = GEMMA3_LAYER_TENSORS
    if n_heads % n_kv:
        raise ModelFileError(path, f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    for l in range(n_layers):
        for name in layer_tensors:
            if f"blk.{l}.{name}" not in tensors:
                raise ModelFileError(path, f"tensor 'blk.{l}.{name}.weight' is missing "
                                           f"(block_count says {n_layers} layers)")
    if "output_norm" not in tensors:
        raise ModelFileError(path, "tensor 'output_norm.weight' is missing")

    vocab = reader.vocab()
    name = _field(reader, "general.name", path.stem, path=path)
    return GGUFModel(path=path, architecture=arch, name=str(name), config=config, tensors=tensors,
                     tensor_types=types, context_length=context_length, vocab=vocab,
                     file_size=file_size, mappings=[reader.mapping])


def _positive_float(reader, key, default, path):
    v = _field(reader, key, default, path=path)
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (float, int, np.floating, np.integer)) \
            or not np.isfinite(v) or v <= 0:
        raise ModelFileError(path, f"metadata key '{key}' = {v!r} is not a positive number")
    return float(v)


def _gemma3_features(reader, path, config):
    """The C core's config entries for Gemma-3's block (layout.gemma3_features),
    from the keys (and defaults) llama.cpp's loader uses for the architecture
    "gemma3":

    - attention scale: gemma3.attention.scale when present (the converter
      writes it for checkpoints whose query_pre_attn_scalar is not the
      default), else 1/sqrt(key_length), and 1/sqrt(embedding_length /
      head_count) for the 62-layer (27B) model;
    - the converter stores Gemma's RMSNorm weights w as 1 + w and does not
      permute q/k rows (rotate-half RoPE);
    - a sliding window gemma3.attention.sliding_window (absent or 0: none) on
      the local layers: gemma3.attention.sliding_window_pattern is a period p
      (layer l is local when l % p < p - 1; 0: all local) or one bool per
      layer; default p = 6. Local layers rotate with base
      gemma3.rope.freq_base_swa (default 10000), global ones with
      rope.freq_base, divided by rope.scaling.factor under linear scaling.
    """
    arch, L, dim = "gemma3", config["n_layers"], config["dim"]
    n_heads, head_dim = config["n_heads"], config["head_dim"]
    v_len = _field(reader, f"{arch}.attention.value_length", head_dim, path=path)
    if v_len != head_dim:
        raise UnsupportedModelError(path, f"attention.value_length {v_len} differs from "
                                          f"key_length {head_dim}")
    if f"{arch}.attention.scale" in reader.fields:
        attn_scale = _positive_float(reader, f"{arch}.attention.scale", None, path)
    else:
        attn_scale = 1.0 / math.sqrt(dim / n_heads if L == 62 else head_dim)

    window = _field(reader, f"{arch}.attention.sliding_window", 0, path=path)
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, np.integer)) \
            or not 0 <= window <= 1 << 30:
        raise ModelFileError(path, f"metadata key '{arch}.attention.sliding_window' = {window!r} "
                                   f"is not a window size")
    pattern_key = f"{arch}.attention.sliding_window_pattern"
    pattern = _field(reader, pattern_key, GEMMA3_PATTERN, path=path)
    if isinstance(pattern, list):
        if len(pattern) != L or not all(isinstance(x, (bool, np.bool_)) for x in pattern):
            raise ModelFileError(path, f"metadata key '{pattern_key}' should be {L} booleans "
                                       f"(one per layer), found {len(pattern)} values")
        local = [bool(x) for x in pattern]
    elif isinstance(pattern, (int, np.integer)) and not isinstance(pattern, (bool, np.bool_)) \
            and 0 <= pattern <= 1 << 16:
        local = gemma3_local_layers(L, int(pattern))
    else:
        raise ModelFileError(path, f"metadata key '{pattern_key}' = {pattern!r} is neither a "
                                   f"period nor one boolean per layer")
    if pattern_key in reader.fields and any(local) and window == 0:
        raise ModelFileError(path, f"'{pattern_key}' marks sliding-window layers but "
                                   f"'{arch}.attention.sliding_window' is absent or 0")
    inv_freq = config["inv_freq"]
    if _field(reader, f"{arch}.rope.scaling.type", None, path=path) == "linear":
        inv_freq = linear_scaled(inv_freq, _positive_float(reader, f"{arch}.rope.scaling.factor",
                                                           1.0, path))
    local_base = _positive_float(reader, f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE, path)
    return gemma3_features(dim=dim, local=local, window=int(window), attn_scale=attn_scale,
                           inv_freq=inv_freq, inv_freq_local=rope_inv_freq(head_dim, local_base))


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

"""safetensors files, read and checked by deelm before a byte is viewed.

A safetensors file is an 8-byte
little-endian header length, a JSON header (tensor name -> dtype, shape,
[begin, end) byte offsets into the data section) and the data section.
deelm parses the header itself and checks all of it -- the header length
against the file, the JSON, every dtype, shape and offset pair, sizes
against shapes, no two tensors sharing bytes -- before it views a byte, so
a file that lies about its contents fails with a ModelFileError naming the
file and the tensor, never with a crash. Each shard is memory-mapped once;
tensors are uint8 views of the mapping (no copies), handed to the C core
with the GGML type id of their dtype (F32 0, F16 1, BF16 30).
"""
import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deelm.errors import ModelFileError

# safetensors dtype -> (bytes per element, GGML type id the C core decodes)
DTYPES = {"F32": (4, 0), "F16": (2, 1), "BF16": (2, 30)}
# dtypes deelm cannot run, with their sizes, so that the tensors deelm does
# not use (a vocabulary head, say) can still be checked
_OTHER_DTYPES = {"F64": 8, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2,
                 "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
# what the safetensors library itself accepts as a header
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One checked entry of a safetensors header."""

    name: str
    dtype: str
    shape: tuple
    start: int  # byte offset in the file
    end: int


def _reject_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"key {twice[0]!r} appears twice")
    return dict(pairs)


def read_safetensors_header(path):
    """The tensors of a safetensors file as {name: TensorInfo}, with the
    file's size, after checking every entry against the file. Raises
    ModelFileError naming the file (and the tensor) at the first lie."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, "no such file")
    file_size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelFileError(path, f"not a safetensors file: {file_size} bytes, too short "
                                           f"for the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise ModelFileError(path, f"header length {n} is larger than the "
                                           f"{MAX_HEADER_BYTES} bytes safetensors allows "
                                           f"(corrupted or not a safetensors file)")
            if 8 + n > file_size:
                raise ModelFileError(path, f"header length {n} runs past the end of the "
                                           f"{file_size}-byte file (truncated?)")
            raw = fh.read(n)
    except OSError as e:
        raise ModelFileError(path, f"cannot be read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(path, f"the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "the safetensors header is not a JSON object")
    data_start, data_size = 8 + n, file_size - 8 - n
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict):
        raise ModelFileError(path, "the header's __metadata__ is not a JSON object")
    infos = {}
    for name, entry in header.items():
        dtype, shape, begin, end = _check_entry(path, name, entry, data_size)
        infos[name] = TensorInfo(name, dtype, shape, data_start + begin, data_start + end)
    # two tensors must never share bytes: a corrupted offset would otherwise
    # make one silently read another's data
    spans = sorted((t.start, t.end, t.name) for t in infos.values() if t.end > t.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ModelFileError(path, f"tensors '{a}' and '{b}' overlap (bytes {start_b - data_start}"
                                       f"..{end_a - data_start} of the data section)")
    return infos, file_size


def _check_entry(path, name, entry, data_size):
    """(dtype, shape, begin, end) of one header entry, checked."""
    def bad(what):
        return ModelFileError(path, f"tensor '{name}': {what}")

    if not isinstance(entry, dict):
        raise bad("its header entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"dtype {dtype!r} is not a string")
    if dtype in DTYPES:
        itemsize = DTYPES[dtype][0]
    elif dtype in _OTHER_DTYPES:
        itemsize = _OTHER_DTYPES[dtype]
    else:
        raise bad(f"unknown dtype '{dtype}'")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets [{begin}, {end}] are not an increasing pair of byte offsets")
    if end > data_size:
        raise bad(f"data_offsets [{begin}, {end}] run past the end of the {data_size}-byte data "
                  f"section (truncated?)")
    n_bytes = math.prod(shape) * itemsize
    if end - begin != n_bytes:
        raise bad(f"data_offsets [{begin}, {end}] hold {end - begin} bytes, but {dtype} "
                  f"{list(shape)} needs {n_bytes}")
    return dtype, tuple(shape), begin, end


def map_file(path):
    """The whole file, memory-mapped read-only: (mmap, uint8 array view)."""
    try:
        with open(path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise ModelFileError(path, f"cannot be memory-mapped ({e})") from None
    return mm, np.frombuffer(mm, dtype=np.uint8)

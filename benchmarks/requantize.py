"""Copies of a GGUF model with its layer weights in another block format, for
benchmarks that compare engines on the formats each is fast at.

    python -m benchmarks.requantize --type Q4_0 Q8_0 [--model PATH] [--output-dir DIR]

Every 2-D `blk.*` weight stored in a block format (the default model's Q4_1) is
dequantized and quantized again to the target type with the `gguf` package's
reference quantizers; everything else (metadata, the token embedding table,
norms) is copied unchanged, and general.file_type is set to match. The copies
are made at benchmark time, cached in --output-dir (default: results/models,
which git ignores), and are never to be committed.

As a library: requantized(path, "Q8_0") returns the cached copy's path.
"""
import argparse
import os
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

from benchmarks.common import REPO

DEFAULT_DIR = REPO / "results" / "models"
TARGETS = {"Q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
           "Q4_1": (QT.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
           "Q5_0": (QT.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
           "Q5_1": (QT.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
           "Q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)


def default_model():
    from deelm.io.default_model import resolve_model_path

    return Path(resolve_model_path(None))


def _retyped(t, target):
    """Whether tensor t is a layer weight that changes format."""
    return (t.name.startswith("blk.") and len(t.shape) == 2 and t.tensor_type not in FLOAT_TYPES
            and t.tensor_type != target)


def write_requantized(src, dst, type_name):
    """Writes src with its block-format layer weights in type_name to dst."""
    target, file_type = TARGETS[type_name]
    reader = gguf.GGUFReader(str(src), "r")
    arch = reader.fields["general.architecture"].contents()
    tmp = Path(dst).with_name(Path(dst).name + f".part{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by the writer itself
        vtype = field.types[0]
        if key == "general.file_type":
            w.add_file_type(int(file_type))
            continue
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    plan = []
    for t in reader.tensors:
        # GGUF lists dims fastest first; numpy shapes are the other way round
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        qt = target if _retyped(t, target) else t.tensor_type
        nbytes = (int(np.prod(shape)) // gguf.GGML_QUANT_SIZES[qt][0]) * gguf.GGML_QUANT_SIZES[qt][1]
        w.add_tensor_info(t.name, shape, np.float32, nbytes, raw_dtype=qt)
        plan.append((t, qt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t, qt in plan:
        if qt == t.tensor_type:
            w.write_tensor_data(np.ascontiguousarray(t.data))
        else:
            dense = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w.write_tensor_data(quants.quantize(dense, qt))
    w.close()
    os.replace(tmp, dst)
    return Path(dst)


def requantized(src, type_name, cache_dir=DEFAULT_DIR):
    """The copy of src in type_name (src itself when it already is), written if missing."""
    src = Path(src)
    cache_dir = Path(cache_dir)
    dst = cache_dir / f"{src.stem}.requant-{type_name}.gguf"
    reader = gguf.GGUFReader(str(src), "r")
    target = TARGETS[type_name][0]
    if not any(_retyped(t, target) for t in reader.tensors):
        return src
    if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_requantized(src, dst, type_name)
    return dst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="GGUF file (default: the packaged model)")
    p.add_argument("--type", nargs="+", choices=sorted(TARGETS), required=True)
    p.add_argument("--output-dir", type=Path, default=DEFAULT_DIR)
    args = p.parse_args(argv)
    src = args.model or default_model()
    for name in args.type:
        print(requantized(src, name, args.output_dir))


if __name__ == "__main__":
    main()

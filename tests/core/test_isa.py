"""The ISA paths: what each needs of the CPU, checked where it is chosen, and
the float32 GEMM's bits on every path."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deelm import _core

CSRC = Path(__file__).resolve().parents[2] / "csrc"
ISAS = _core.isa_info()["supported"]
# gcc's feature names where /proc/cpuinfo spells them otherwise
CPUINFO_NAME = {"avx512vnni": "avx512_vnni"}


def _target_strings():
    """Every target("...") attribute string in the C sources, with the ones the
    DL_TARGET_* macros stand for, and where each appears."""
    macros = dict(re.findall(r'#define (DL_TARGET_\w+) "([^"]*)"', (CSRC / "isa.h").read_text()))
    found = []
    for f in sorted(CSRC.rglob("*.[ch]")):
        text = f.read_text()
        for m in re.finditer(r'__attribute__\(\(target\(([^)]*)\)\)\)', text):
            arg = m.group(1).strip()
            if arg in ("DL_ONE_CLONE", "DL_ONE_FMA_CLONE"):
                continue  # a target_clones clone built alone (test_clones.py), chosen by the CPU
            value = macros.get(arg, arg.strip('"'))
            found.append((str(f.relative_to(CSRC)), value))
    return found


def test_every_kernel_target_is_a_checked_isa():
    """A kernel compiled for features its ISA path does not check would fault on
    a CPU without them (the AVX-512 quantizer once used avx512dq unchecked)."""
    features = {isa: set(filter(None, f.split(","))) for isa, f in _core.isa_info()["features"].items()}
    found = _target_strings()
    assert found, "no target attributes found: has the source layout changed?"
    for where, target in found:
        need = set(target.split(","))
        assert any(need <= have for have in features.values()), (where, target, features)


def test_isa_support_matches_the_cpu_flags():
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
                    .group(1).split())
    except (OSError, AttributeError):
        pytest.skip("no /proc/cpuinfo flags on this system")
    for isa, feats in _core.isa_info()["features"].items():
        need = [CPUINFO_NAME.get(f, f) for f in feats.split(",") if f]
        assert (isa in ISAS) == all(f in flags for f in need), (isa, need)


HARNESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include "deelm.h"
/* Quantizes rows built to straddle the outlier test on every isa and prints
 * a checksum of the bytes per isa. */
int main(void) {
    enum { ROWS = 64, COLS = 256 };
    static float x[ROWS * COLS];
    unsigned s = 12345;
    for (int i = 0; i < ROWS * COLS; i++) {
        s = s * 1103515245u + 12345u;
        x[i] = ((int)(s >> 8 & 0xffff) - 32768) / 32768.0f;
    }
    /* block b of row t: its largest value is (1.5 + 0.5 b) times the next,
     * so some blocks sit exactly on the ratio */
    for (int t = 0; t < ROWS; t++)
        for (int b = 0; b < COLS / 32; b++) {
            float *blk = x + t * COLS + b * 32;
            for (int j = 0; j < 32; j++) blk[j] = blk[j] * 0.5f;
            blk[t % 32] = 0.5f;
            blk[(t + 7) % 32] = 0.5f * (1.5f + 0.5f * b) * (t % 2 ? -1.0f : 1.0f);
        }
    for (int isa = 0; isa < 3; isa++) {
        if (!dl_isa_supported(isa)) continue;
        dl_qact a;
        if (dl_qact_alloc(&a, ROWS, COLS)) return 1;
        dl_quantize_rows(&a, x, ROWS, COLS, isa, 1);
        unsigned long long h = 1469598103934665603ull;
        const unsigned char *q = (const unsigned char *)a.q;
        for (long i = 0; i < (long)ROWS * COLS; i++) h = (h ^ q[i]) * 1099511628211ull;
        for (long i = 0; i < (long)ROWS * (COLS / 32); i++) {
            unsigned char *d = (unsigned char *)&a.d[i];
            for (int j = 0; j < 4; j++) h = (h ^ d[j]) * 1099511628211ull;
        }
        long outliers = 0;
        for (int t = 0; t < ROWS; t++) outliers += a.n_out[t];
        printf("%s %016llx %ld\n", dl_isa_name(isa), h, outliers);
        dl_qact_free(&a);
    }
    return 0;
}
"""


@pytest.mark.parametrize("ratio", ["2.5f", "4.0f"])
def test_outlier_ratio_is_one_constant_on_every_path(tmp_path, ratio):
    """Built with another DL_OUTLIER_RATIO, every path still quantizes alike
    (the AVX-512 path once hard-coded 4)."""
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "harness.c"
    src.write_text(HARNESS)
    exe = tmp_path / "harness"
    subprocess.run([cc, "-O2", "-std=c11", "-fopenmp", f"-DDL_OUTLIER_RATIO={ratio}", f"-I{CSRC}",
                    str(src), str(CSRC / "quant" / "qactivation.c"), str(CSRC / "cpu.c"), "-lm", "-o", str(exe)],
                   check=True, capture_output=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    rows = [line.split() for line in lines if line]
    print("\n" + "\n".join(" ".join(r) for r in rows))
    assert len(rows) == len(ISAS)
    assert len({(h, n) for _, h, n in rows}) == 1
    assert int(rows[0][2]) > 0  # some blocks do have outliers


# ---- the float32 GEMM ------------------------------------------------------------

SHAPES = [(1, 7, 5), (5, 64, 33), (37, 96, 100), (50, 33, 47), (97, 576, 70)]


@pytest.mark.parametrize("n, k, o", SHAPES)
def test_float_gemm_is_one_fma_chain_per_output(n, k, o):
    """Equal bits on every path and thread count, each row alone as in the batch,
    and equal to the chain of fmas written out in NumPy (float64 fma emulation:
    a float32 product is exact in float64, so round(a*b + c) = fma)."""
    rng = np.random.default_rng(n * 1000 + k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = rng.standard_normal((o, k)).astype(np.float32)
    ref = np.zeros((n, o), dtype=np.float32)
    for j in range(k):  # acc = fma(x[:, j], w[:, j], acc), column by column
        prod = x[:, j:j + 1].astype(np.float64) * w[:, j].astype(np.float64)[None, :]
        ref = (prod + ref.astype(np.float64)).astype(np.float32)
    outs = {(isa, t): _core.linear(x, w, t, isa) for isa in ISAS for t in (1, 2, 3)}
    first = outs[(ISAS[0], 1)]
    # the float64 sum prod + acc can round twice (to float64, then float32):
    # allow that rare one-ulp difference, nothing more
    assert np.abs(first - ref).max() <= np.spacing(np.abs(ref)).max() * k
    for key, y in outs.items():
        assert np.array_equal(y, first), key
    for i in (0, n // 2, n - 1):
        assert np.array_equal(_core.linear(x[i:i + 1], w, 1, ISAS[-1])[0], first[i])


# ---- limits every entry point checks -----------------------------------------------

def test_thread_limit_is_one_constant_checked_by_every_op():
    """threads past the limit used to reach libgomp from the attention ops and
    abort the interpreter; every op now raises ValueError."""
    big = _core.MAX_THREADS + 1
    qkv = np.zeros((4, (2 + 2) * 8), np.float32)
    off = np.array([0, 4], np.int64)
    for threads in (0, big, 2**31 - 1):
        with pytest.raises(ValueError, match="threads"):
            _core.attention(qkv, off, 2, 1, 8, True, threads)
        with pytest.raises(ValueError, match="threads"):
            _core.attention_backward(qkv, off, np.zeros((4, 16), np.float32), 2, 1, 8, True, threads)
        with pytest.raises(ValueError, match="threads"):
            _core.linear(np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32), threads)
        with pytest.raises(ValueError, match="threads"):
            _core.peak_gops("fp32", threads)


def test_attention_head_sizes_that_overflow_are_refused():
    """(nh + 2 nkv) hd used to wrap around in the shape check; a crafted triple
    whose product wraps to the array's width must not get through."""
    qkv = np.zeros((2, 64), np.float32)
    off = np.array([0, 2], np.int64)
    nkv = 2**62
    # (2**62 + 14 + 2) * 4 wraps to 64, the array's width
    for nh, kv, hd in [(2**62 + 14, 1, 4), (2**62, nkv, 16), (2**63 - 1, 1, 2), (4, 2, 2**61),
                       (-4, 2, 8)]:
        with pytest.raises(ValueError, match="head"):
            _core.attention(qkv, off, nh, kv, hd, True, 1)
        with pytest.raises(ValueError, match="head"):
            _core.attention_backward(qkv, off, np.zeros((2, 64), np.float32), nh, kv, hd, True, 1)

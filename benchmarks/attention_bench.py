"""The attention op alone (deelm._core.attention), causal and bidirectional.

    python -m benchmarks.attention_bench [--lengths 13 48 300] [--sentences 8] [--threads 1]

Random q/k/v in the default model's head layout (9 query heads, 3 key/value
heads of 64). Prints the best of --repeats calls per setting and the useful
GFLOP/s (4 L^2 hd per sentence and head, halved when causal).
"""
import argparse
import time

import numpy as np

from deelm import _core


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[13, 48, 300])
    p.add_argument("--sentences", type=int, default=8)
    p.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], metavar=("NH", "NKV", "HD"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    nh, nkv, hd = args.heads
    rng = np.random.default_rng(0)
    for L in args.lengths:
        n = L * args.sentences
        qkv = rng.standard_normal((n, (nh + 2 * nkv) * hd)).astype(np.float32)
        offsets = np.arange(0, n + 1, L, dtype=np.int64)
        for causal in (True, False):
            best = min(_timed(qkv, offsets, nh, nkv, hd, causal, args.threads) for _ in range(args.repeats))
            flops = args.sentences * nh * 4 * L * L * hd * (0.5 if causal else 1.0)
            print(f"L={L:4d} {'causal' if causal else 'bidirectional':13s} {best * 1e3:8.2f} ms "
                  f"{flops / best / 1e9:6.1f} GFLOP/s")


def _timed(qkv, offsets, nh, nkv, hd, causal, threads):
    t0 = time.perf_counter()
    _core.attention(qkv, offsets, nh, nkv, hd, causal, threads)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()

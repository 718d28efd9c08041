"""Random-weight LLaMA GGUF files of real model shapes, for scaling benchmarks.

    python -m benchmarks.random_gguf [--preset smollm2-135m 0.5b 1b] [--type Q4_1]
                                     [--output-dir results/models] [--seed 0] [--force] [--check]

Presets (the layer shapes of real models; head_dim is 64 in all three):

| preset         | shape of                       | dim  | layers | heads | kv heads | ffn  |
|----------------|--------------------------------|-----:|-------:|------:|---------:|-----:|
| smollm2-135m   | SmolLM2-135M (the default model) | 576 |     30 |     9 |        3 | 1536 |
| 0.5b           | Qwen2.5-0.5B, without its q/k/v biases | 896 | 24 | 14 |     2 | 4864 |
| 1b             | TinyLlama-1.1B                 | 2048 |     22 |    32 |        4 | 5632 |

The vocabulary is NOT the real model's: every file carries the default model's
tokenizer (the tokenizer.ggml.* metadata copied from SmolLM2-135M-Instruct's
GGUF, 49,152 tokens), so deelm can tokenise text for it, and token_embd has
49,152 rows. The embedding table is therefore smaller than Qwen2.5-0.5B's
(151,936 rows) and larger than TinyLlama's (32,000 rows); the layers, which
hold the weights deelm decodes to float32 and multiplies with, are exactly the
real models' sizes. Parameter counts with this vocabulary (non-embedding +
embedding): 106.2M + 28.3M, 357.9M + 44.0M, 969.0M + 100.7M.

Weights: normal with std 0.02 for the projections and the embedding table
(the initialisation scale of LLaMA/GPT-2 training, close to trained weights'
spread), RMSNorm weights 1 + N(0, 0.05). Each tensor has its own generator
seeded by (seed, tensor index), so a file is the same whatever the chunking.
q/k rows are not permuted for RoPE as converters do: the rows are i.i.d.
Linear weights default to Q4_1 (as the default model), token_embd is Q8_0 and
norms F32 (also as the default model). Tensors are generated, quantised (with
gguf.quants, in row chunks) and written one at a time, so memory stays at one
tensor; a file is written under a temporary name and renamed when complete.

As a library: ensure_model("1b") returns the cached path, writing it first if
it is missing. The writer itself (write_random_gguf) is the test suite's GGUF
builder, tests/support/gguf_builder.py.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

import gguf

from tests.support.gguf_builder import PRESETS, WEIGHT_TYPES, param_counts, write_random_gguf

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "results" / "models"
FORMAT_VERSION = 1  # part of the file name: bump when the weights or metadata change

def model_path(preset, weight_type="Q4_1", seed=0, cache_dir=DEFAULT_DIR):
    return Path(cache_dir) / f"random-llama-{preset}.{weight_type}.seed{seed}.v{FORMAT_VERSION}.gguf"


def ensure_model(preset, weight_type="Q4_1", seed=0, cache_dir=DEFAULT_DIR, *, force=False,
                 progress=True):
    """Path of the cached random model, writing it first if missing (or force)."""
    path = model_path(preset, weight_type, seed, cache_dir)
    if force or not path.exists():
        if progress:
            print(f"writing {path} ...", file=sys.stderr, flush=True)
        info = write_random_gguf(path, preset, weight_type=weight_type, seed=seed, progress=progress)
        if progress:
            print(f"  done in {info['seconds']:.1f} s, {info['file_bytes'] / 1e6:.1f} MB",
                  file=sys.stderr, flush=True)
    return path


def check_model(path, threads=2):
    """Loads `path` with deelm and encodes one sentence; returns a short report."""
    import deelm

    t0 = time.perf_counter()
    m = deelm.DeeLM.from_pretrained(path, threads=threads)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    e = m.encode("A man is playing a guitar.")
    t_enc = time.perf_counter() - t0
    if not np.isfinite(e).all():
        raise RuntimeError(f"{path}: non-finite embedding")
    return (f"{m!r}: load {t_load:.1f} s, encode 1 sentence {t_enc:.2f} s, embedding {e.shape} "
            f"norm {np.linalg.norm(e):.3f}, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    p.add_argument("--type", default="Q4_1", choices=WEIGHT_TYPES, help="linear weights' encoding")
    p.add_argument("--output-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rewrite even if the file exists")
    p.add_argument("--check", action="store_true", help="load each file with deelm and encode a sentence")
    p.add_argument("--threads", type=int, default=2, help="threads for --check")
    args = p.parse_args(argv)
    for preset in args.preset:
        path = ensure_model(preset, args.type, args.seed, args.output_dir, force=args.force)
        cfg = PRESETS[preset]
        vocab = int(gguf.GGUFReader(str(path), "r").fields["llama.vocab_size"].contents())
        counts = param_counts(cfg, vocab)
        print(f"{preset}: {path} ({path.stat().st_size / 1e6:.1f} MB; shape of {cfg['shape_of']}; "
              f"{counts['layers'] / 1e6:.1f}M non-embedding + {counts['embedding'] / 1e6:.1f}M "
              f"embedding parameters with the {vocab:,}-token vocabulary)")
        if args.check:
            print("  " + check_model(path, args.threads))


if __name__ == "__main__":
    main()

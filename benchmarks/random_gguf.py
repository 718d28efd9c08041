"""Random-weight LLaMA GGUF files of real model shapes, for scaling benchmarks.

    python benchmarks/random_gguf.py [--preset smollm2-135m 0.5b 1b] [--type Q4_1]
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
it is missing.
"""
import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import quants

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "results" / "models"
FORMAT_VERSION = 1  # part of the file name: bump when the weights or metadata change

PRESETS = {
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         real_vocab=49152, context_length=8192, rope_theta=100000.0, rms_eps=1e-5,
                         shape_of="SmolLM2-135M"),
    "0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                 real_vocab=151936, context_length=32768, rope_theta=1000000.0, rms_eps=1e-6,
                 shape_of="Qwen2.5-0.5B (without q/k/v biases)"),
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
               real_vocab=32000, context_length=2048, rope_theta=10000.0, rms_eps=1e-5,
               shape_of="TinyLlama-1.1B"),
}
WEIGHT_TYPES = ("Q4_1", "Q4_0", "Q8_0", "F16", "F32")
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
LINEAR_STD = 0.02
EMBED_STD = 0.02
NORM_STD = 0.05
CHUNK_ELEMS = 1 << 22  # rows generated and quantised at a time: ~4M values (16 MB float32)


def default_tokenizer_source():
    sys.path.insert(0, str(REPO))
    from deelm.default_model import resolve_model_path

    return resolve_model_path(None)


def tokenizer_metadata(path):
    """[(key, value, value type, item type)] of the tokenizer.ggml.* keys of a GGUF."""
    reader = gguf.GGUFReader(str(path), "r")
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.ggml."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ValueError(f"{path} holds no tokenizer.ggml.tokens")
    return out


def layer_shapes(cfg):
    """(name, numpy shape [out, in]) of one block's tensors, in the default model's order."""
    d, f = cfg["dim"], cfg["hidden_dim"]
    hd = d // cfg["n_heads"]
    q, kv = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    return [("attn_norm", (d,)), ("ffn_down", (d, f)), ("ffn_gate", (f, d)), ("ffn_up", (f, d)),
            ("ffn_norm", (d,)), ("attn_k", (kv, d)), ("attn_output", (d, q)), ("attn_q", (q, d)),
            ("attn_v", (kv, d))]


def param_counts(cfg, vocab):
    """{'layers': non-embedding parameters (blocks + final norm), 'embedding': token_embd}."""
    per_layer = sum(int(np.prod(s)) for _, s in layer_shapes(cfg))
    return {"layers": cfg["n_layers"] * per_layer + cfg["dim"], "embedding": vocab * cfg["dim"]}


def _nbytes(shape, qt):
    block, size = gguf.GGML_QUANT_SIZES[qt]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if shape[-1] % block:
        raise ValueError(f"row length {shape[-1]} is not a multiple of the {qt.name} block {block}")
    return rows * (shape[-1] // block) * size


def _tensor_plan(cfg, vocab, weight_type, embd_type):
    """[(GGUF name, numpy shape, GGML type, kind)] in file order."""
    plan = [("token_embd.weight", (vocab, cfg["dim"]), embd_type, "embedding")]
    for l in range(cfg["n_layers"]):
        for name, shape in layer_shapes(cfg):
            kind = "norm" if len(shape) == 1 else "linear"
            plan.append((f"blk.{l}.{name}.weight", shape, QT.F32 if kind == "norm" else weight_type, kind))
    plan.append(("output_norm.weight", (cfg["dim"],), QT.F32, "norm"))
    return plan


def _encode_tensor(shape, qt, kind, rng):
    """Random values for one tensor, encoded as `qt`, generated and quantised in
    row chunks (bounded memory). Returns the array to write (its bytes are the
    tensor's data)."""
    if kind == "norm":
        return (1.0 + NORM_STD * rng.standard_normal(shape[0], dtype=np.float32)).astype(np.float32)
    std = EMBED_STD if kind == "embedding" else LINEAR_STD
    rows, cols = shape
    out = np.empty(_nbytes(shape, qt), dtype=np.uint8)
    step = max(1, CHUNK_ELEMS // cols)
    pos = 0
    for r in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
        x *= np.float32(std)
        enc = quants.quantize(x, qt)  # F32/F16 return float arrays, the others uint8 blocks
        raw = enc.reshape(-1).view(np.uint8)
        out[pos:pos + raw.nbytes] = raw
        pos += raw.nbytes
    assert pos == out.nbytes
    return out


def write_random_gguf(path, preset, *, weight_type="Q4_1", embd_type="Q8_0", seed=0,
                      tokenizer_from=None, progress=True):
    """Writes a random-weight LLaMA GGUF of the preset's shape to `path`.
    Returns a dict describing it (sizes, parameter counts, seconds taken)."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    name = preset if isinstance(preset, str) else cfg.get("name", "custom")
    wt, et = QT[weight_type], QT[embd_type]
    tok_src = Path(tokenizer_from) if tokenizer_from else default_tokenizer_source()
    tok = tokenizer_metadata(tok_src)
    vocab = len(next(v for k, v, *_ in tok if k == "tokenizer.ggml.tokens"))
    hd = cfg["dim"] // cfg["n_heads"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".part{os.getpid()}")

    t0 = time.perf_counter()
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"random-llama-{name}")
    w.add_description(f"random weights (seed {seed}, std {LINEAR_STD}) in the layer shape of "
                      f"{cfg['shape_of']}; tokenizer and vocabulary ({vocab} tokens) copied from "
                      f"{tok_src.name}; written by deelm benchmarks/random_gguf.py for benchmarks only")
    w.add_block_count(cfg["n_layers"])
    w.add_context_length(cfg["context_length"])
    w.add_embedding_length(cfg["dim"])
    w.add_feed_forward_length(cfg["hidden_dim"])
    w.add_head_count(cfg["n_heads"])
    w.add_head_count_kv(cfg["n_kv_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_eps"])
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    w.add_file_type(FILE_TYPES[weight_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tok:
        w.add_key_value(key, value, vtype, sub_type=sub)

    plan = _tensor_plan(cfg, vocab, wt, et)
    for tname, shape, qt, _ in plan:
        # the element shape with a non-uint8 dtype: the writer takes it as is
        w.add_tensor_info(tname, shape, np.float32, _nbytes(shape, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = len(plan)
    for i, (tname, shape, qt, kind) in enumerate(plan):
        rng = np.random.default_rng([seed, i])
        w.write_tensor_data(_encode_tensor(shape, qt, kind, rng))
        if progress and (i % 20 == 0 or i == total - 1):
            print(f"  [{i + 1}/{total}] {tname} {qt.name} {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
    w.close()
    os.replace(tmp, path)
    seconds = time.perf_counter() - t0
    counts = param_counts(cfg, vocab)
    return {"path": str(path), "preset": name, "shape_of": cfg["shape_of"], "weight_type": weight_type,
            "embd_type": embd_type, "seed": seed, "vocab": vocab, "real_vocab": cfg.get("real_vocab"),
            "params_layers": counts["layers"], "params_embedding": counts["embedding"],
            "file_bytes": path.stat().st_size, "seconds": seconds}


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
    sys.path.insert(0, str(REPO))
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

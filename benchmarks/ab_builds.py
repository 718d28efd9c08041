"""Encode throughput of two or more deelm builds (source trees), side by side.

    python -m benchmarks.ab_builds --build new=. --build old=/path/to/old/checkout \\
        [--build old-haswell=/path/to/old:OPENBLAS_CORETYPE=Haswell] \\
        [--precision float32] [--isa avx2] [--threads 2] [--sentences 1000] [--rounds 5]

Each --build is LABEL=DIR[:VAR=VALUE,...]: a checkout whose deelm package (with
its compiled _core) is imported through PYTHONPATH, and environment variables
for that build only. Every round runs each build once, in a fresh process, in
an order that rotates from round to round; a run loads the model, warms up on
64 sentences, then times encode of the first --sentences unique sentences of
STS Benchmark test (batch --batch-size, causal, mean pooling, bare model,
--isa and --precision passed where the build knows them). Reports the median
tokens/s per build and its ratio to the first build's.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import STSB_TEST, cpu_model, unique_sentences

CHILD = r"""
import inspect, json, sys, time
import deelm
opts = json.loads(sys.argv[1])
sents = json.loads(open(opts["texts"]).read())
kw = {"bidirectional_from": -1, "adapter": None, "threads": opts["threads"]}
accepted = inspect.signature(deelm.DeeLM.from_pretrained).parameters
for k in ("compute_precision", "precision"):  # the compute precision's new and old names
    if opts.get("precision") and k in accepted:
        kw[k] = opts["precision"]
        break
if opts.get("isa") and "isa" in accepted:
    kw["isa"] = opts["isa"]
m = deelm.DeeLM.from_pretrained(opts["model"], **kw)
m.pooling = "mean"
tokens = sum(len(e.ids) for e in m.tokenize(sents))
m.encode(sents[:64], batch_size=opts["batch_size"], show_progress_bar=False)
t = time.perf_counter()
m.encode(sents, batch_size=opts["batch_size"], show_progress_bar=False)
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": tokens,
                  "config": {k: m.config.get(k) for k in ("precision", "isa")}}))
"""


def parse_build(spec):
    label, _, rest = spec.partition("=")
    path, _, env = rest.partition(":")
    extra = dict(kv.split("=", 1) for kv in env.split(",") if kv)
    if not label or not path:
        raise argparse.ArgumentTypeError(f"--build takes LABEL=DIR[:VAR=VALUE,...], got {spec!r}")
    return label, Path(path).resolve(), extra


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=parse_build, action="append", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--precision", default=None)
    p.add_argument("--isa", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sentences", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--texts-file", type=Path, default=Path("/tmp/deelm-ab-texts.json"))
    args = p.parse_args(argv)

    args.texts_file.write_text(json.dumps(unique_sentences(STSB_TEST)[:args.sentences]))
    opts = {"model": args.model, "precision": args.precision, "isa": args.isa, "threads": args.threads,
            "batch_size": args.batch_size, "texts": str(args.texts_file)}
    tps = {label: [] for label, _, _ in args.build}
    seen = {}
    for r in range(args.rounds):
        order = args.build[r % len(args.build):] + args.build[:r % len(args.build)]
        for label, path, extra in order:
            env = dict(os.environ, PYTHONPATH=str(path), OMP_WAIT_POLICY="PASSIVE", **extra)
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(opts)], env=env,
                                  capture_output=True, text=True, cwd="/")
            if proc.returncode:
                sys.exit(f"{label}: {proc.stderr[-2000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            tps[label].append(out["tokens"] / out["seconds"])
            seen[label] = out
            print(f"round {r + 1} {label}: {tps[label][-1]:,.0f} tokens/s", file=sys.stderr)
    first = args.build[0][0]
    base = statistics.median(tps[first])
    print(f"\n{cpu_model()}; {args.sentences} STS-B test sentences, {seen[first]['tokens']:,} tokens; "
          f"batch {args.batch_size}; {args.threads} threads; medians of {args.rounds} rounds\n")
    print("| build | precision | isa | env | tokens/s (median) | min | max | vs " + first + " |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for label, path, extra in args.build:
        v = tps[label]
        med = statistics.median(v)
        cfg = seen[label]["config"]
        env = ",".join(f"{k}={x}" for k, x in extra.items()) or "-"
        print(f"| {label} | {cfg['precision']} | {cfg['isa']} | {env} | {med:,.0f} | {min(v):,.0f} | "
              f"{max(v):,.0f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()

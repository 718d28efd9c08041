"""How deelm's throughput and memory scale with batch size, sentence length and model size.

    python -m benchmarks.scaling [--parts batch length size memory] [--quick]
                                 [--threads 2] [--repeats 3] [--precision int8|float32]
                                 [--model PATH] [--size-models default smollm2-135m 0.5b 1b]
                                 [--output results/bench/scaling]

Parts (all four by default):

batch   tokens/s and sentences/s of model.encode on a fixed sample of STS Benchmark
        test sentences ($DEELM_DATA or ../shared/data, sts/STSBenchmark/test.jsonl;
        --batch-sentences, default 512, drawn with a fixed seed), batch_size 1, 2, 4,
        ..., 256. Includes tokenisation, as a user sees it.
length  tokens/s of model.forward_ids on sequences of exactly T tokens, T = 16, 32,
        ..., 512: windows cut from the token stream of the STS-B test sentences, the
        same number of tokens per measurement for every T (--length-tokens, default
        4096) and per forward call (--length-batch-tokens, default 512, i.e. 32
        sequences of 16 tokens or 1 of 512; one sequence per call when T exceeds
        it), so only the sequence length changes. Excludes tokenisation.
size    tokens/s of model.encode at a fixed setting (--size-sentences, default 256,
        batch 32) for the default model and random-weight GGUFs of the SmolLM2-135M,
        Qwen2.5-0.5B-like and TinyLlama-1.1B shapes (benchmarks/random_gguf.py; written
        to --model-dir, default results/models, on first use). Their vocabulary is the
        default model's 49,152 tokens, so their embedding tables differ from the real
        models' (smaller than Qwen2.5-0.5B's, larger than TinyLlama's); the layers
        are the real sizes.
memory  peak RSS against model size, with the GGUF file size and peak RSS minus file
        size (with precision float32 deelm decodes the layer weights to float32 at
        load, 4 bytes per layer parameter; int8 keeps them packed; the embedding
        table stays in the file, memory-mapped, rows decoded on lookup).

Each model of the size and memory parts runs in its own subprocess, so its RSS is
its own (the two parts share that subprocess when both are selected). batch and
length run in this process on --model (default: the packaged default model).
Every figure is the median of --repeats (>= 3) timed runs after one untimed
warm-up; within the batch and length parts the settings alternate round-robin
so drift in machine load affects all of them alike. The load average is recorded
at the start and end: on a shared machine, compare figures of one run.

--precision is passed to DeeLM.from_pretrained(compute_precision=...) only when given.
--quick: a smoke run (small samples, few settings, the default model and the
random 135M only; 3 repeats).

Outputs, in --output (default results/bench/scaling): scaling-<time>.md
(Markdown tables, also printed), scaling-<time>.json (raw timings and RSS) and
scaling-<time>.png (one subplot per part).
"""
import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import deelm
from benchmarks import random_gguf
from benchmarks.common import (REPO, STSB_TEST, cpu_model, current_rss_mb, median, peak_rss_mb,
                               timed, unique_sentences)

PARTS = ("batch", "length", "size", "memory")
RESULT_TAG = "SCALING_WORKER_RESULT "
MIB = 2 ** 20

FULL = dict(batch_sizes=[2 ** i for i in range(9)], batch_sentences=512,
            lengths=[2 ** i for i in range(4, 10)], length_tokens=4096, length_batch_tokens=512,
            size_models=["default", "smollm2-135m", "0.5b", "1b"], size_sentences=256)
QUICK = dict(batch_sizes=[1, 4, 16], batch_sentences=32, lengths=[16, 64, 256], length_tokens=512,
             length_batch_tokens=256, size_models=["default", "smollm2-135m"], size_sentences=32)


# ---- helpers ------------------------------------------------------------------------
def rss_mb():
    """(current RSS, peak RSS) of this process in MiB."""
    return current_rss_mb(), peak_rss_mb()


def sample_sentences(n, seed=0):
    """n unique STS-B test sentences, drawn with a fixed seed (the same for every model)."""
    if not STSB_TEST.exists():
        sys.exit(f"STS Benchmark test data not found at {STSB_TEST} (set $DEELM_DATA)")
    sents = unique_sentences(STSB_TEST)
    if n > len(sents):
        sys.exit(f"asked for {n} sentences, {STSB_TEST} has {len(sents)} unique ones")
    random.Random(seed).shuffle(sents)
    return sents[:n]


def load_model(path, args):
    # the bare model: with no path given, from_pretrained would add deelm's bundled adapter
    kw = dict(bidirectional_from=args["bidirectional_from"], pooling=args["pooling"],
              threads=args["threads"], adapter=None)
    if args.get("precision") is not None:
        kw["compute_precision"] = args["precision"]
    return deelm.DeeLM.from_pretrained(path, **kw)


def param_counts(config):
    """Non-embedding ("layers") and embedding parameters from a loaded model's config."""
    d, f, L = config["dim"], config["hidden_dim"], config["n_layers"]
    hd = config["head_dim"]
    q, kv = config["n_heads"] * hd, config["n_kv_heads"] * hd
    per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
    return {"layers": L * per_layer + d, "embedding": config["vocab_size"] * d}


# ---- part (a): batch size -----------------------------------------------------------------
def part_batch(model, opts):
    sents = sample_sentences(opts["batch_sentences"])
    n_tokens = sum(len(e.ids) for e in model.tokenize(sents))
    sizes = opts["batch_sizes"]
    print(f"\n[batch] {len(sents)} sentences, {n_tokens} tokens, batch sizes {sizes}", flush=True)

    def run(b):
        return timed(lambda: model.encode(sents, batch_size=b, show_progress_bar=False))

    run(sizes[len(sizes) // 2])  # warm-up
    times = {b: [] for b in sizes}
    for r in range(opts["repeats"]):
        for b in sizes:
            times[b].append(run(b))
        print(f"  round {r + 1}/{opts['repeats']}: " +
              ", ".join(f"b={b} {times[b][-1]:.2f}s" for b in sizes), flush=True)
    rows = []
    for b in sizes:
        med = median(times[b])
        rows.append(dict(batch_size=b, times_s=times[b], median_s=med, tokens_per_s=n_tokens / med,
                         sentences_per_s=len(sents) / med))
    return dict(sentences=len(sents), tokens=n_tokens, rows=rows)


# ---- part (b): sequence length ----------------------------------------------------------------
def part_length(model, opts):
    import numpy as np

    stream = np.concatenate([np.asarray(e.ids, dtype=np.int32)
                             for e in model.tokenize(unique_sentences(STSB_TEST))])
    total, per_call = opts["length_tokens"], opts["length_batch_tokens"]
    work = {}
    for T in opts["lengths"]:
        if T > model.config["context_length"]:
            sys.exit(f"length {T} exceeds the model's context length {model.config['context_length']}")
        n_seq = max(1, total // T)
        flat = np.resize(stream, n_seq * T)  # repeats the stream if it is too short
        seqs = [flat[i * T:(i + 1) * T] for i in range(n_seq)]
        k = max(1, per_call // T)
        work[T] = [seqs[i:i + k] for i in range(0, n_seq, k)]
    print(f"\n[length] lengths {opts['lengths']}, {total} tokens per measurement, "
          f"{per_call} tokens per forward call", flush=True)

    def run(T):
        def go():
            for batch in work[T]:
                model.forward_ids(batch)
        return timed(go)

    run(opts["lengths"][len(opts["lengths"]) // 2])  # warm-up
    times = {T: [] for T in opts["lengths"]}
    for r in range(opts["repeats"]):
        for T in opts["lengths"]:
            times[T].append(run(T))
        print(f"  round {r + 1}/{opts['repeats']}: " +
              ", ".join(f"T={T} {times[T][-1]:.2f}s" for T in opts["lengths"]), flush=True)
    rows = []
    for T in opts["lengths"]:
        n_tok = sum(len(s) for b in work[T] for s in b)
        med = median(times[T])
        rows.append(dict(length=T, sequences=sum(len(b) for b in work[T]),
                         sequences_per_call=len(work[T][0]), calls=len(work[T]), tokens=n_tok,
                         times_s=times[T], median_s=med, tokens_per_s=n_tok / med))
    return dict(tokens_per_measurement=total, tokens_per_call=per_call, rows=rows)


# ---- parts (c) and memory: one subprocess per model ------------------------------------------------
def worker(spec):
    """Runs in a fresh process: loads one model, encodes, reports times and RSS."""
    rss_start, _ = rss_mb()
    path = deelm.io.default_model.resolve_model_path(spec["path"])
    t0 = time.perf_counter()
    model = load_model(path, spec)
    load_s = time.perf_counter() - t0
    rss_load, peak_load = rss_mb()
    sents = sample_sentences(spec["sentences"])
    n_tokens = sum(len(e.ids) for e in model.tokenize(sents))

    def run():
        return timed(lambda: model.encode(sents, batch_size=spec["batch_size"], show_progress_bar=False))

    times = []
    first = run()  # warm-up (the only run when timing is off)
    if spec["timed"]:
        times = [run() for _ in range(spec["repeats"])]
    rss_end, peak = rss_mb()
    cfg = model.config
    return dict(path=str(path), name=cfg["name"], file_bytes=os.path.getsize(path),
                precision=cfg.get("precision"), isa=cfg.get("isa"),
                config={k: cfg[k] for k in ("n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads",
                                            "head_dim", "vocab_size", "context_length")},
                params=param_counts(cfg), load_s=load_s, sentences=len(sents), tokens=n_tokens,
                batch_size=spec["batch_size"], first_run_s=first, times_s=times,
                rss_mb=dict(start=rss_start, after_load=rss_load, peak_after_load=peak_load,
                            end=rss_end, peak=peak))


def resolve_size_model(name, opts):
    if name == "default":
        return None, "default (SmolLM2-135M-Instruct Q4_1)"
    if name in random_gguf.PRESETS:
        path = random_gguf.ensure_model(name, opts["weight_type"], 0, opts["model_dir"])
        return str(path), f"random {name} ({random_gguf.PRESETS[name]['shape_of']}) {opts['weight_type']}"
    return name, Path(name).name


def part_size(opts, timed_runs):
    rows = []
    label = "size" if timed_runs else "memory"
    print(f"\n[{label}] models {opts['size_models']}, {opts['size_sentences']} sentences, batch 32, "
          f"one subprocess each", flush=True)
    for name in opts["size_models"]:
        path, desc = resolve_size_model(name, opts)
        spec = dict(path=path, threads=opts["threads"], precision=opts["precision"],
                    bidirectional_from=opts["bidirectional_from"], pooling=opts["pooling"],
                    sentences=opts["size_sentences"], batch_size=32, repeats=opts["repeats"],
                    timed=timed_runs)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--worker", json.dumps(spec)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
        if proc.returncode or not lines:
            err = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            print(f"  {name}: FAILED (exit {proc.returncode}): {err}", flush=True)
            rows.append(dict(model=name, description=desc, error=proc.stderr[-4000:]))
            continue
        res = json.loads(lines[-1][len(RESULT_TAG):])
        res.update(model=name, description=desc, wall_s=time.perf_counter() - t0)
        if timed_runs:
            med = median(res["times_s"])
            res.update(median_s=med, tokens_per_s=res["tokens"] / med,
                       sentences_per_s=res["sentences"] / med)
        rows.append(res)
        extra = f", {res['tokens_per_s']:,.0f} tokens/s" if timed_runs else ""
        print(f"  {name}: load {res['load_s']:.1f} s, peak RSS {res['rss_mb']['peak']:.0f} MiB{extra}",
              flush=True)
    return dict(sentences=opts["size_sentences"], batch_size=32, rows=rows)


# ---- reporting ----------------------------------------------------------------------------------
def fmt_params(n):
    return f"{n / 1e6:,.1f}M"


def tables(results, opts, header):
    out = [header]
    if "model_repr" in opts:
        out.append(f"batch/length model: {opts['model_repr']}, precision {opts['model_precision']}, "
                   f"isa {opts['model_isa']}")
    if "batch" in results:
        r = results["batch"]
        out += [f"\n## Batch size ({r['sentences']} STS-B test sentences, {r['tokens']} tokens, "
                f"model.encode)\n",
                "| batch size | median s | min s | max s | tokens/s | sentences/s |",
                "|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {x['batch_size']} | {x['median_s']:.3f} | {min(x['times_s']):.3f} | "
                f"{max(x['times_s']):.3f} | {x['tokens_per_s']:,.0f} | {x['sentences_per_s']:,.1f} |"
                for x in r["rows"]]
    if "length" in results:
        r = results["length"]
        out += [f"\n## Sequence length (model.forward_ids, ~{r['tokens_per_measurement']} tokens per "
                f"measurement, up to {r['tokens_per_call']} tokens per call)\n",
                "| tokens per sequence | sequences x calls | tokens | median s | min s | max s | tokens/s |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {x['length']} | {x['sequences_per_call']} x {x['calls']} | {x['tokens']} | "
                f"{x['median_s']:.3f} | {min(x['times_s']):.3f} | {max(x['times_s']):.3f} | "
                f"{x['tokens_per_s']:,.0f} |" for x in r["rows"]]
    if "size" in results:
        r = results["size"]
        out += [f"\n## Model size ({r['sentences']} STS-B test sentences, batch {r['batch_size']}, "
                f"model.encode)\n",
                "| model | precision | layers x dim | params: layers + embedding | file MiB | load s | "
                "tokens/s | sentences/s | GOP/s (2 x layer params x tokens/s) |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for x in r["rows"]:
            if "error" in x:
                out.append(f"| {x['description']} | failed | | | | | | | |")
                continue
            p = x["params"]
            out.append(f"| {x['description']} | {x.get('precision') or '?'} | {x['config']['n_layers']} x {x['config']['dim']} | "
                       f"{fmt_params(p['layers'])} + {fmt_params(p['embedding'])} | "
                       f"{x['file_bytes'] / MIB:,.1f} | {x['load_s']:.1f} | {x['tokens_per_s']:,.1f} | "
                       f"{x['sentences_per_s']:,.2f} | {2 * p['layers'] * x['tokens_per_s'] / 1e9:,.1f} |")
    mem = results.get("memory") or results.get("size")
    if "memory" in opts["parts"] and mem:
        out += [f"\n## Memory (each model in its own process; peak RSS over load and encoding "
                f"{mem['sentences']} sentences at batch {mem['batch_size']})\n",
                "| model | precision | params: layers + embedding | file MiB | layer weights as float32 MiB | "
                "RSS before load MiB | RSS after load MiB | peak RSS MiB | peak RSS - file MiB |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for x in mem["rows"]:
            if "error" in x:
                out.append(f"| {x['description']} | failed | | | | | | | |")
                continue
            p, m = x["params"], x["rss_mb"]
            out.append(f"| {x['description']} | {x.get('precision') or '?'} | "
                       f"{fmt_params(p['layers'])} + {fmt_params(p['embedding'])} | "
                       f"{x['file_bytes'] / MIB:,.1f} | {4 * p['layers'] / MIB:,.0f} | {m['start']:,.0f} | "
                       f"{m['after_load']:,.0f} | {m['peak']:,.0f} | {m['peak'] - x['file_bytes'] / MIB:,.0f} |")
        out.append("\nThe random models carry the default model's 49,152-token vocabulary, so "
                   "their embedding tables (and files) differ from the real models': smaller than "
                   "Qwen2.5-0.5B's 151,936 rows, larger than TinyLlama's 32,000. RSS before load: "
                   "Python, NumPy and deelm imported. MiB = 2^20 bytes.")
    return "\n".join(out)


def plot(results, opts, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = [p for p in PARTS if (p in results) or (p == "memory" and "memory" in opts["parts"]
                                                    and ("size" in results or "memory" in results))]
    if not panels:
        return False
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.3 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)

    def errbars(ax, xs, rows, tokens_of):
        meds = [tokens_of(r) / r["median_s"] for r in rows]
        lo = [m - tokens_of(r) / max(r["times_s"]) for m, r in zip(meds, rows)]
        hi = [tokens_of(r) / min(r["times_s"]) - m for m, r in zip(meds, rows)]
        ax.errorbar(xs, meds, yerr=[lo, hi], marker="o", capsize=3)

    def plain(ax, xs=None):
        # plain numbers on log axes; for (a) and (b) one tick per measured setting
        if xs is not None:
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.xaxis.set_minor_formatter(NullFormatter())
        def minor(v, _):  # label 2, 3 and 5 x 10^n only: the others crowd
            return f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""

        for axis in ((ax.yaxis,) if xs is not None else (ax.xaxis, ax.yaxis)):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(FuncFormatter(minor))

    for ax, part in zip(axes.flat, panels):
        ax.grid(True, alpha=0.3)
        if part == "batch":
            r = results["batch"]
            errbars(ax, [x["batch_size"] for x in r["rows"]], r["rows"], lambda x: r["tokens"])
            ax.set_xscale("log", base=2)
            plain(ax, [x["batch_size"] for x in r["rows"]])
            ax.set_xlabel("batch size (sentences)")
            ax.set_ylabel("tokens/s")
            ax.set_title(f"(a) batch size: {r['sentences']} STS-B sentences")
        elif part == "length":
            r = results["length"]
            errbars(ax, [x["length"] for x in r["rows"]], r["rows"], lambda x: x["tokens"])
            ax.set_xscale("log", base=2)
            plain(ax, [x["length"] for x in r["rows"]])
            ax.set_xlabel("tokens per sequence")
            ax.set_ylabel("tokens/s")
            ax.set_title(f"(b) sequence length: {r['tokens_per_measurement']} tokens per run")
        elif part == "size":
            rows = sorted((x for x in results["size"]["rows"] if "error" not in x),
                          key=lambda x: x["params"]["layers"])
            xs = [x["params"]["layers"] / 1e6 for x in rows]
            errbars(ax, xs, rows, lambda x: x["tokens"])
            for i, (x, v) in enumerate(zip(rows, xs)):
                ax.annotate(x["model"], (v, x["tokens_per_s"]), textcoords="offset points",
                            xytext=(6, 6 if i % 2 else -12), fontsize=8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            plain(ax)
            ax.set_xlabel("non-embedding parameters (M)")
            ax.set_ylabel("tokens/s")
            ax.set_title(f"(c) model size: batch 32, {results['size']['sentences']} sentences")
        else:
            mem = results.get("memory") or results["size"]
            rows = [x for x in mem["rows"] if "error" not in x]
            order = sorted(range(len(rows)), key=lambda i: rows[i]["params"]["layers"])
            rows = [rows[i] for i in order]
            xs = [x["params"]["layers"] / 1e6 for x in rows]
            ax.plot(xs, [x["rss_mb"]["peak"] for x in rows], "o-", label="peak RSS")
            ax.plot(xs, [x["file_bytes"] / MIB for x in rows], "s--", label="GGUF file")
            ax.plot(xs, [x["rss_mb"]["peak"] - x["file_bytes"] / MIB for x in rows],
                    "^-", label="peak RSS - file")
            ax.plot(xs, [4 * x["params"]["layers"] / MIB for x in rows], ":", color="gray",
                    label="layer weights as float32")
            for i, (x, v) in enumerate(zip(rows, xs)):
                ax.annotate(x["model"], (v, x["rss_mb"]["peak"]),
                            textcoords="offset points", xytext=(6, 6 if i % 2 else -12), fontsize=8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            plain(ax)
            ax.set_xlabel("non-embedding parameters (M)")
            ax.set_ylabel("MiB")
            ax.set_title("(d) memory per model (own process)")
            ax.legend(fontsize=8)
    prec = f", precision {opts['precision']}" if opts["precision"] else ""
    fig.suptitle(f"deelm scaling: {opts['threads']} threads{prec}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- main ------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--quick", action="store_true", help="a smoke run: small samples, few settings")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (>= 3)")
    p.add_argument("--precision", default=None,
                   help="passed to DeeLM.from_pretrained(compute_precision=...) when given")
    p.add_argument("--model", default=None, help="GGUF for the batch and length parts (default: "
                                                 "the packaged default model)")
    p.add_argument("--bidirectional-from", type=int, default=None,
                   help="default: the model's default (last layer bidirectional)")
    p.add_argument("--pooling", default="mean", choices=deelm.POOLINGS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 2 4 ... 256")
    p.add_argument("--batch-sentences", type=int, default=None, help="default 512")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="default 16 32 ... 512")
    p.add_argument("--length-tokens", type=int, default=None, help="tokens per measurement, default 4096")
    p.add_argument("--length-batch-tokens", type=int, default=None,
                   help="tokens per forward call, default 512")
    p.add_argument("--size-models", nargs="+", default=None,
                   help="'default', a random_gguf preset (smollm2-135m, 0.5b, 1b) or a GGUF path; "
                        "default: all four")
    p.add_argument("--size-sentences", type=int, default=None, help="default 256")
    p.add_argument("--weight-type", default="Q4_1", choices=random_gguf.WEIGHT_TYPES,
                   help="linear weights' encoding of the random models")
    p.add_argument("--model-dir", type=Path, default=random_gguf.DEFAULT_DIR,
                   help="where the random models are cached")
    p.add_argument("--output", type=Path, default=REPO / "results" / "bench" / "scaling")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None and args.repeats < 3:
        p.error("--repeats must be >= 3")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    base = QUICK if args.quick else FULL
    opts = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    opts.update(parts=args.parts, threads=args.threads, repeats=args.repeats, precision=args.precision,
                bidirectional_from=args.bidirectional_from, pooling=args.pooling,
                weight_type=args.weight_type, model_dir=str(args.model_dir), model=args.model,
                quick=args.quick)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(),
               "usable_cores": deelm.settings.available_cores(), "python": platform.python_version(),
               "loadavg_start": os.getloadavg()}
    header = (f"# deelm scaling\n\nmachine: {machine['cpu']}, {machine['cores']} cores "
              f"({machine['usable_cores']} usable), Python {machine['python']}; load average at start "
              f"{machine['loadavg_start'][0]:.2f}\nthreads {opts['threads']}, "
              f"precision {opts['precision'] or '(deelm default)'}, pooling {opts['pooling']}, "
              f"medians of {opts['repeats']} timed runs after 1 warm-up"
              f"{' (--quick smoke run)' if opts['quick'] else ''}")
    print(header, flush=True)

    results = {}
    if "batch" in opts["parts"] or "length" in opts["parts"]:
        model = load_model(deelm.io.default_model.resolve_model_path(opts["model"]), opts)
        opts["model_repr"], opts["model_path"] = repr(model), str(model.path)
        opts["model_precision"] = model.config.get("precision")
        opts["model_isa"] = model.config.get("isa")
        print(f"model for batch/length: {model!r} ({model.path}); precision "
              f"{opts['model_precision']}, isa {opts['model_isa']}", flush=True)
        if "batch" in opts["parts"]:
            results["batch"] = part_batch(model, opts)
        if "length" in opts["parts"]:
            results["length"] = part_length(model, opts)
        del model
    if "size" in opts["parts"]:
        results["size"] = part_size(opts, timed_runs=True)  # also gives the memory figures
    elif "memory" in opts["parts"]:
        results["memory"] = part_size(opts, timed_runs=False)
    machine["loadavg_end"] = os.getloadavg()

    md = tables(results, opts, header) + f"\n\nload average at end: {machine['loadavg_end'][0]:.2f}\n"
    print("\n" + md)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = args.output / f"scaling-{time.strftime('%Y%m%d-%H%M%S')}"
    Path(f"{stem}.md").write_text(md)
    Path(f"{stem}.json").write_text(json.dumps(dict(options=opts, machine=machine, data=str(STSB_TEST),
                                                    results=results), indent=2) + "\n")
    png = plot(results, opts, f"{stem}.png")
    print(f"written: {stem}.md, {stem}.json" + (f", {stem}.png" if png else ""))


if __name__ == "__main__":
    main()

"""Rows/s of deelm.integrations.ray.embed_dataset on a local Ray cluster, for
1 and 2 actors x 1 and 2 threads, against model.encode in one process.

    python -m benchmarks.ray_scaling [--rows 20000] [--repeats 3] [--actors 1 2]
                                     [--threads 1 2] [--batch-size 256] [--model PATH]
                                     [--compute-precision int8|float32] [--output results/bench/ray]
                                     [--quick]

Rows are STS Benchmark test sentences ($DEELM_DATA or ../shared/data,
sts/STSBenchmark/test.jsonl), cycled to --rows (a synthetic fallback when the
data is absent), each with an integer id. Settings:

encode        model.encode(rows) in this process with `threads` threads.
ray a x t     embed_dataset(ds, concurrency=a, num_cpus=t): a actors, each with
              one model and t threads, on ray.init(num_cpus=usable cores);
              combinations needing more CPUs than that are skipped (Ray would
              wait for CPUs that never come).

Each Ray run is timed end to end (actor start and model load included, as a
user pays them: `.materialize()` of the embedded dataset). The start-up alone
is timed on a dataset of one row per actor; "steady rows/s" is rows / (end to
end - start-up), an estimate. Every figure is the median of --repeats runs,
settings alternating round-robin so drift in machine load hits all alike.
The first Ray run's embeddings are checked against encode's (bitwise).
Printed: lscpu's CPU description, the load average at start and end, and a
Markdown table (also written to --output with the raw timings as JSON).
--quick: a smoke run (400 rows, 1 repeat).
"""
import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import deelm
from benchmarks.common import STSB_TEST, unique_sentences


def lscpu():
    """lscpu's lines that describe the CPU and its cores."""
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
            "L3 cache", "Flags")
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["lscpu unavailable"]
    lines = [ln for ln in out.splitlines() if ln.split(":")[0].strip() in keep]
    # the flags line is long: only the vector extensions that matter here
    return [(ln.split(":")[0] + ": " + " ".join(f for f in ln.split(":", 1)[1].split()
                                                 if f.startswith(("avx", "fma"))))
            if ln.startswith("Flags") else ln for ln in lines]


def sentences(n):
    if STSB_TEST.is_file():
        pool, source = unique_sentences(STSB_TEST), str(STSB_TEST)
    else:
        pool = [f"sentence {i} about the weather, the news and a cat" + " again" * (i % 7)
                for i in range(997)]
        source = "synthetic (no STS data found)"
    return [pool[i % len(pool)] for i in range(n)], source


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=256, help="rows per actor call")
    ap.add_argument("--model", default=None)
    ap.add_argument("--compute-precision", default=None, choices=["int8", "float32"])
    ap.add_argument("--output", default=None, help="folder for ray_scaling-<time>.{md,json}")
    ap.add_argument("--quick", action="store_true", help="smoke run: 400 rows, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.repeats = 400, 1

    import ray

    from deelm.integrations.ray import embed_dataset

    cores = deelm.settings.available_cores()
    texts, source = sentences(args.rows)
    load = {"compute_precision": args.compute_precision} if args.compute_precision else {}
    model = deelm.DeeLM.from_pretrained(args.model, **load)
    load_options = {k: v for k, v in model.load_options.items() if k not in ("model", "threads")}
    path = model.load_options["model"]
    header = ["# ray_scaling", "", *lscpu(), f"usable cores: {cores}",
              f"load average at start: {os.getloadavg()}", f"model: {model!r}",
              f"rows: {args.rows} from {source}; {args.repeats} repeats, medians"]
    print("\n".join(header), flush=True)

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"id": i, "text": t} for i, t in enumerate(texts)]
    settings = [("encode", 1, t) for t in args.threads if t <= cores]
    settings += [("ray", a, t) for a in args.actors for t in args.threads if a * t <= cores]
    skipped = [(a, t) for a in args.actors for t in args.threads if a * t > cores]
    runs = {s: {"seconds": [], "startup": []} for s in settings}
    expected = None
    for rep in range(args.repeats):
        for s in settings:
            kind, actors, threads = s
            if kind == "encode":
                model.threads = threads
                if rep == 0:
                    model.encode(texts[:64], show_progress_bar=False)  # warm-up
                sec, emb = timed(lambda: model.encode(texts, show_progress_bar=False))
                expected = emb if expected is None else expected
                runs[s]["seconds"].append(sec)
                continue

            def run(rows):
                ds = ray.data.from_items(rows)
                return embed_dataset(ds, model=path, concurrency=actors, num_cpus=threads,
                                     batch_size=args.batch_size,
                                     load_options=load_options).materialize()

            startup, _ = timed(lambda: run(items[:actors]))
            sec, result = timed(lambda: run(items))
            runs[s]["startup"].append(startup)
            runs[s]["seconds"].append(sec)
            if rep == 0 and expected is not None:
                rows = sorted(result.take_all(), key=lambda r: r["id"])
                got = np.stack([r["embedding"] for r in rows])
                assert np.array_equal(got, expected), f"ray {actors}x{threads} differs from encode"
            print(f"  repeat {rep + 1}: {kind} {actors}x{threads}: {sec:.2f} s", flush=True)
    ray.shutdown()

    base = statistics.median(runs[("encode", 1, 1)]["seconds"]) if ("encode", 1, 1) in runs else None
    table = ["| setting | actors x threads | rows/s end to end | start-up s | steady rows/s "
             "(est.) | vs encode 1 thread |", "|---|---:|---:|---:|---:|---:|"]
    for (kind, actors, threads), r in runs.items():
        sec = statistics.median(r["seconds"])
        start = statistics.median(r["startup"]) if r["startup"] else 0.0
        steady = args.rows / (sec - start) if sec > start else float("nan")
        ratio = f"{base / sec:.2f}x" if base else "-"
        table.append(f"| {kind} | {actors} x {threads} | {args.rows / sec:,.0f} | "
                     f"{start:.2f} | {steady:,.0f} | {ratio} |")
    footer = [f"skipped (more CPUs than the {cores} usable): "
              + ", ".join(f"{a}x{t}" for a, t in skipped)] if skipped else []
    footer.append(f"load average at end: {os.getloadavg()}")
    report = "\n".join(header + ["", *table, "", *footer])
    print("\n" + "\n".join(table + [""] + footer))
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (out / f"ray_scaling-{stamp}.md").write_text(report + "\n")
        raw = {f"{k} {a}x{t}": v for (k, a, t), v in runs.items()}
        (out / f"ray_scaling-{stamp}.json").write_text(json.dumps(
            {"rows": args.rows, "repeats": args.repeats, "cores": cores, "runs": raw}, indent=1))
        print(f"\nwrote {out}/ray_scaling-{stamp}.md and .json")


if __name__ == "__main__":
    main()

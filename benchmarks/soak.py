"""Soak run: many encode calls and adapter load/unload cycles in one process,
with the resident set logged, to show that nothing grows without bound.

    python -m benchmarks.soak [--cycles 300] [--model PATH] [--reload-every 25] [--log-every 25]

Each cycle: load the bundled adapter (or the one given with --adapter), encode
a batch of STS Benchmark sentences, remove the adapter, encode again; every
--reload-every cycles the model itself is dropped and loaded again (0: never).
Prints RSS (MB) at the start, after the first cycle and every --log-every
cycles, and the growth over the second half of the run.
"""
import argparse
import gc
import time

import deelm
from deelm.adapters.bundled import bundled_adapter_path
from benchmarks.common import STSB_TEST, cpu_model, current_rss_mb, unique_sentences


def rss_mb():
    mb = current_rss_mb()
    return float("nan") if mb is None else mb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cycles", type=int, default=300)
    p.add_argument("--reload-every", type=int, default=25)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None, help="adapter folder (default: the bundled one)")
    p.add_argument("--sentences", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    adapter = args.adapter or bundled_adapter_path()
    sents = unique_sentences(STSB_TEST)[:args.sentences]

    def load():
        return deelm.DeeLM.from_pretrained(args.model, adapter=None, threads=args.threads)

    log = [("start", rss_mb())]
    model, t0 = load(), time.perf_counter()
    for c in range(1, args.cycles + 1):
        model.load_adapter(adapter)
        model.encode(sents, batch_size=32)
        model.remove_adapter()
        model.encode(sents, batch_size=32)
        if args.reload_every and c % args.reload_every == 0:
            del model
            gc.collect()
            model = load()
        if c == 1 or c % args.log_every == 0:
            log.append((f"cycle {c}", rss_mb()))
    seconds = time.perf_counter() - t0
    half = [r for name, r in log if name.startswith("cycle") and
            int(name.split()[1]) >= args.cycles // 2]
    print(f"{cpu_model()}; {args.cycles} cycles of (load adapter, encode {len(sents)}, remove, "
          f"encode), the model reloaded every {args.reload_every or 'never'}; {2 * args.cycles} "
          f"encode calls, {args.cycles} adapter loads, "
          f"{args.cycles // args.reload_every if args.reload_every else 0} model reloads in "
          f"{seconds:.0f} s")
    print("| point | RSS MB |\n|---|---:|")
    for name, r in log:
        print(f"| {name} | {r:.1f} |")
    if len(half) >= 2:
        print(f"\ngrowth over the second half: {half[-1] - half[0]:+.1f} MB")


if __name__ == "__main__":
    main()

"""What the bundled DeeLM adapter (LoRA on every projection of every layer)
costs over the bare default model, encoding the same STS-B test sentences.

    python -m benchmarks.adapter_cost [--model GGUF] [--sentences 256] [--threads 1]
                                      [--repeats 15] [--adapters auto DIR ...] [--no-prompt]

The models (the bare one, and one per --adapters entry: "auto" is the bundled
adapter, a folder any other, e.g. a lower-rank one) are loaded once and timed
alternately, so drift in machine load hits all alike. Each adapter is applied
with its own pooling and prompt; --no-prompt embeds every model without one,
so only the LoRA arithmetic differs. The minimum of the runs is the least disturbed time of each;
the medians are printed too.
"""
import argparse
import statistics
import time

import deelm
from benchmarks.common import STSB_TEST, cpu_model, unique_sentences


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--adapters", nargs="+", default=["auto"])
    p.add_argument("--no-prompt", action="store_true")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3")

    sents = unique_sentences(STSB_TEST)[:args.sentences]
    extra = {"prompt": ""} if args.no_prompt else {}
    models = {"bare": deelm.DeeLM.from_pretrained(args.model, adapter=None)}
    for a in args.adapters:
        models["adapter" if a == "auto" else a] = deelm.DeeLM.from_pretrained(args.model, adapter=a,
                                                                              **extra)
    times = {name: [] for name in models}
    for m in models.values():
        m.threads = args.threads
        m.encode(sents[:64], batch_size=args.batch_size)  # warm-up
    for _ in range(args.repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m.encode(sents, batch_size=args.batch_size, show_progress_bar=False)
            times[name].append(time.perf_counter() - t0)

    print(f"{cpu_model()}; {len(sents)} STS-B sentences, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.repeats} alternating runs")
    bare = times["bare"]
    for name, ts in times.items():
        cost = "" if name == "bare" else (
            f"  cost over the bare model: {100 * (min(ts) / min(bare) - 1):.1f} % (minimum "
            f"times), {100 * (statistics.median(ts) / statistics.median(bare) - 1):.1f} % (medians)")
        print(f"{name}: min {min(ts):.3f} s  median {statistics.median(ts):.3f} s{cost}")


if __name__ == "__main__":
    main()

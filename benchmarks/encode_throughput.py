"""Encode throughput of deelm on the unique sentences of STS Benchmark test.

    python -m benchmarks.encode_throughput [--model PATH] [--threads 1 2] [--repeats 5]
                                           [--peer transformers]

Each thread setting is timed after one warm-up run, the settings alternating
round-robin so that drift in machine load affects all of them alike. Prints a
Markdown table and writes it, with a JSON of all raw timings, to --output.

--peer transformers also times transformers + torch (float32, CPU) on the same
GGUF file, the same sentences, the same length-sorted batches and mean pooling,
alternating with deelm in the same rounds, reports deelm/peer ratios and checks
that both compute the same embeddings (cosine). The peer runs the causal model,
so deelm is then run causal too (--bidirectional-from -1 is implied).
"""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import deelm
from benchmarks.common import REPO, STSB_TEST, cpu_model, peak_rss_mb, unique_sentences  # noqa: F401


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF path (default: the packaged SmolLM2-135M)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per setting (>= 3)")
    p.add_argument("--bidirectional-from", type=int, default=None)
    p.add_argument("--pooling", default="mean", choices=deelm.POOLINGS)
    p.add_argument("--output", type=Path, default=REPO / "results" / "bench")
    p.add_argument("--peer", choices=["transformers"], default=None,
                   help="also time transformers + torch float32 on the same file, side by side")
    p.add_argument("--peak-rss-only", action="store_true",
                   help="load, encode once with the first thread setting, report peak RSS; no timing")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be >= 3")
    if args.peer:
        args.bidirectional_from = -1
    return args


class TransformersPeer:
    """transformers + torch on the same GGUF, batched like deelm, mean pooling."""

    def __init__(self, path, sentences, batch_size):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModel.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        ids = tok(sentences)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # as deelm batches
        self.batches = []
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            T = max(len(ids[i]) for i in idx)
            x = torch.zeros((len(idx), T), dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for j, i in enumerate(idx):
                x[j, :len(ids[i])] = torch.tensor(ids[i])
                mask[j, :len(ids[i])] = 1
            self.batches.append((idx, x, mask))
        self.n = len(sentences)

    def encode(self, threads):
        torch = self.torch
        torch.set_num_threads(threads)
        out = torch.zeros((self.n, self.model.config.hidden_size))
        with torch.inference_mode():
            for idx, x, mask in self.batches:
                h = self.model(input_ids=x, attention_mask=mask).last_hidden_state
                m = mask[..., None].float()
                out[idx] = (h * m).sum(1) / m.sum(1)
        return out.numpy()


def main(argv=None):
    args = parse_args(argv)
    model = deelm.DeeLM.from_pretrained(args.model, bidirectional_from=args.bidirectional_from,
                                        pooling=args.pooling, adapter=None)
    rss_load = peak_rss_mb()
    sentences = unique_sentences(STSB_TEST)
    n_tokens = sum(len(e.ids) for e in model.tokenize(sentences))
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": deelm.settings.available_cores(),
               "python": platform.python_version()}
    print(f"# deelm encode throughput\n\nmodel: {model!r}\nfile: {model.path}\n"
          f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
          f"Python {machine['python']}\ndata: {STSB_TEST} -> {len(sentences)} unique sentences, "
          f"{n_tokens} tokens; batch_size={args.batch_size}\npeak RSS after load: {rss_load:.1f} MB")

    def run(threads):
        model.threads = threads
        t0 = time.perf_counter()
        model.encode(sentences, batch_size=args.batch_size, show_progress_bar=False)
        return time.perf_counter() - t0

    peer = TransformersPeer(model.path, sentences, args.batch_size) if args.peer else None
    if peer:
        import numpy as np

        a = model.encode(sentences, batch_size=args.batch_size, show_progress_bar=False)
        b = peer.encode(args.threads[-1])
        cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(f"deelm vs {args.peer} embeddings: min cosine {cos.min():.6f}, "
              f"mean {cos.mean():.6f} over {len(cos)} sentences")
        machine["peer_min_cosine"] = float(cos.min())

    def run_peer(threads):
        t0 = time.perf_counter()
        peer.encode(threads)
        return time.perf_counter() - t0

    if args.peak_rss_only:
        run(args.threads[0])
        print(f"peak RSS after one encode ({args.threads[0]} threads): {peak_rss_mb():.1f} MB")
        return

    times = {t: [] for t in args.threads}
    peer_times = {t: [] for t in args.threads}
    for t in args.threads:  # warm-up, untimed
        run(t)
        if peer:
            run_peer(t)
    for _ in range(args.repeats):  # round-robin, deelm and the peer alternating
        for t in args.threads:
            times[t].append(run(t))
            if peer:
                peer_times[t].append(run_peer(t))
    rss_end = peak_rss_mb()

    base = statistics.median(times[args.threads[0]])
    rows = ["| threads | median s | min s | max s | tokens/s | sentences/s | speed-up |",
            "|---:|---:|---:|---:|---:|---:|---:|"]
    for t in args.threads:
        med = statistics.median(times[t])
        rows.append(f"| {t} | {med:.3f} | {min(times[t]):.3f} | {max(times[t]):.3f} | "
                    f"{n_tokens / med:,.0f} | {len(sentences) / med:,.1f} | {base / med:.2f}x |")
    if peer:
        rows += ["", f"| threads | {args.peer} median s | tokens/s | sentences/s | deelm / peer speed |",
                 "|---:|---:|---:|---:|---:|"]
        for t in args.threads:
            pm = statistics.median(peer_times[t])
            rows.append(f"| {t} | {pm:.3f} | {n_tokens / pm:,.0f} | {len(sentences) / pm:,.1f} | "
                        f"{pm / statistics.median(times[t]):.2f}x |")
    table = "\n".join(rows)
    footer = (f"speed-up relative to {args.threads[0]} thread(s); {args.repeats} timed runs per "
              f"setting after 1 warm-up, round-robin\npeak RSS after load: {rss_load:.1f} MB, "
              f"at end: {rss_end:.1f} MB")
    print(f"\n{table}\n\n{footer}")

    args.output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.output / f"encode_throughput-{stamp}.md").write_text(f"{table}\n\n{footer}\n")
    raw = {"model": str(model.path), "model_repr": repr(model), "machine": machine,
           "data": str(STSB_TEST), "sentences": len(sentences), "tokens": n_tokens,
           "batch_size": args.batch_size, "repeats": args.repeats,
           "bidirectional_from": model.bidirectional_from, "pooling": model.pooling,
           "times_s": {str(t): v for t, v in times.items()},
           "peer": args.peer, "peer_times_s": {str(t): v for t, v in peer_times.items()},
           "peak_rss_mb": {"after_load": rss_load, "end": rss_end}}
    (args.output / f"encode_throughput-{stamp}.json").write_text(json.dumps(raw, indent=2) + "\n")
    print(f"written: {args.output}/encode_throughput-{stamp}.{{md,json}}")


if __name__ == "__main__":
    main()

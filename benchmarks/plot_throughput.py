"""Plots the published throughput comparison (docs/performance.md) as
docs/throughput.png: deelm against llama.cpp and transformers + torch, in
tokens per second, on the default model's file and its requantized copies.

    python -m benchmarks.plot_throughput [--output docs/throughput.png]

It draws the figures recorded in docs/performance.md (AMD EPYC Zen 4, 2
threads, 1,000 STS-B test sentences); it measures nothing. To measure anew,
run benchmarks/compare.py (the commands are in docs/performance.md) and
update the tables and the constants below together.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file backend)

# docs/performance.md, "Every block format": every layer bidirectional in both
# engines (deelm k = 0, llama.cpp's non-causal embedding mode); tokens/s
BLOCK_FORMATS = ["Q4_1 (default)", "Q4_0", "Q8_0"]
BIDIRECTIONAL = {
    "deelm, AVX-512": [1940, 1848, 1649],
    "llama.cpp, AVX-512": [235, 449, 438],
    "deelm, AVX2": [1315, 1276, 707],
    "llama.cpp, AVX2": [260, 397, 318],
}
# the same section, against transformers + torch 2.13 float32, causal, Q4_1
CAUSAL_PATHS = ["AVX-512", "AVX2"]
CAUSAL = {"deelm": [1770, 1303], "transformers + torch": [559, 598]}

COLOURS = {"deelm": "#1f77b4", "llama.cpp": "#ff7f0e", "transformers + torch": "#2ca02c"}


def colour(label):
    return COLOURS[label.split(",")[0]]


def grouped_bars(ax, groups, series, title):
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=label, color=colour(label),
                      alpha=0.55 if "AVX2" in label else 1.0)
        ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("tokens / s (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper right", ncol=2)
    ax.set_ylim(0, max(max(v) for v in series.values()) * 1.3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path,
                    default=Path(__file__).resolve().parent.parent / "docs" / "throughput.png")
    args = ap.parse_args()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=[3, 2])
    grouped_bars(left, BLOCK_FORMATS, BIDIRECTIONAL,
                 "deelm vs llama.cpp, every layer bidirectional")
    grouped_bars(right, CAUSAL_PATHS, CAUSAL,
                 "deelm vs transformers (float32), causal, Q4_1")
    fig.suptitle("SmolLM2-135M encode throughput: 1,000 STS-B sentences, 2 threads, AMD Zen 4",
                 fontsize=11)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

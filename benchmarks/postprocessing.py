"""Does post-processing the embeddings help on STS-B dev? Centering, whitening
(Su et al. 2021) and removing the top principal directions (Mu & Viswanath
2018, "all-but-the-top"), each fitted on clean NLI training sentences only.

    python -m benchmarks.postprocessing [--model GGUF] [--adapter auto|DIR] [--fit-sentences 6000]

Anisotropic embeddings (all pointing into a narrow cone) are common for
language models; these transforms make them isotropic. Whether that still
helps after contrastive training is what this measures: cosine Spearman x100 on
STS-B dev for the raw embeddings and for each transform. Nothing is fitted on
an evaluation set.
"""
import argparse
import random

import numpy as np

import deelm
from benchmarks.common import DATA_DIR, cpu_model
from benchmarks.recipe_sweep import CLEAN_TRIPLETS
from deelm.eval.sts import encode_unique, load_sts_file, sts_scores
from deelm.train.data import load_triplets


def fit_sentences(n, seed=0):
    """`n` distinct sentences of the clean triplet files, in a seeded random order."""
    seen = {}
    for name in CLEAN_TRIPLETS:
        t = load_triplets(DATA_DIR / "nli" / name)
        for col in (t.text, t.positive, t.negative):
            seen.update(dict.fromkeys(col))
    sents = list(seen)
    random.Random(seed).shuffle(sents)
    return sents[:n]


def transforms(fit, dims=(None, 512, 256, 128), drops=(1, 2, 3, 5)):
    """name -> function of embeddings [n, d], all fitted on `fit` [m, d]."""
    mu = fit.mean(axis=0)
    _, s, vt = np.linalg.svd(fit - mu, full_matrices=False)  # principal directions of the fit set
    out = {"raw": lambda e: e, "centered": lambda e: e - mu}
    for d in dims:
        d = d or fit.shape[1]
        if d > len(fit) // 4:  # too few sentences to estimate that many variances
            continue
        w = vt[:d].T * (np.sqrt(len(fit)) / s[:d])  # [dim, d]: unit variance per kept direction
        out[f"whitened to {d}"] = lambda e, w=w: (e - mu) @ w
    for k in drops:
        p = vt[:k]  # [k, dim]
        out[f"top {k} removed"] = lambda e, p=p: (e - mu) - ((e - mu) @ p.T) @ p
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--adapter", default="auto")
    p.add_argument("--fit-sentences", type=int, default=6000)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    model = deelm.DeeLM.from_pretrained(args.model, adapter=args.adapter, threads=args.threads)
    dev = load_sts_file(DATA_DIR / "sts" / "STSBenchmark" / "dev.jsonl")
    emb, where = encode_unique(model, dev.sentence1 + dev.sentence2, show_progress_bar=False)
    fit = model.encode(fit_sentences(args.fit_sentences), show_progress_bar=False)
    n = len(dev.scores)
    print(f"{cpu_model()}; {model!r}\nSTS-B dev, {len(fit)} clean NLI sentences fitted on")
    for name, f in transforms(np.asarray(fit, np.float64)).items():
        e = f(np.asarray(emb, np.float64))
        score = 100 * sts_scores(e[where[:n]], e[where[n:]], dev.scores)["cosine_spearman"]
        print(f"  {name:>16}: {score:.2f}")


if __name__ == "__main__":
    main()

"""sha256 of deelm's outputs on fixed inputs, to show a change leaves every bit alone.

Embeds 50 STS Benchmark dev sentences with the default model in both compute
precisions, on every instruction path this CPU runs, at k = -1, 0 and the
last layer, bare and with the bundled adapter; and takes two training steps,
hashing the LoRA parameters they produce. Run it on two checkouts and diff:

    PYTHONPATH=<old tree> python scripts/output_digest.py > before.json
    PYTHONPATH=<new tree> python scripts/output_digest.py > after.json
    diff before.json after.json

Only the public API is used, so older trees run it unchanged.
"""
import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import deelm
from deelm import _core

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"


def digest(a):
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


def sentences(data_dir, n):
    rows = [json.loads(line) for line in
            (data_dir / "sts" / "STSBenchmark" / "dev.jsonl").read_text().splitlines()[:n]]
    return [r["sentence1"] for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sentences", type=int, default=50)
    args = p.parse_args()
    texts = sentences(args.data, args.sentences)
    isas = [i for i in ("avx512vnni", "avx2", "scalar") if i in _core.isa_info()["supported"]]
    out = {"deelm": getattr(deelm, "__version__", "?"), "isas": isas, "arrays": {}}
    bare = deelm.DeeLM.from_pretrained(adapter=None, threads=2)
    last = bare.num_layers - 1
    for adapter in ("none", "bundled"):
        for precision in ("float32", "int8"):
            for isa in isas:
                m = deelm.DeeLM.from_pretrained(
                    adapter=None if adapter == "none" else "auto", compute_precision=precision,
                    isa=isa, threads=2)
                for k in (-1, 0, last):
                    m.bidirectional_from = k
                    key = f"{adapter}/{precision}/{isa}/k={k}"
                    out["arrays"][key] = digest(m.encode(texts, batch_size=16))
    from deelm.train import TrainingArguments, train

    triplets = [{"text": texts[i], "positive": texts[i + 1], "negative": texts[i + 2]}
                for i in range(0, 24)]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "triplets.jsonl"
        data.write_text("".join(json.dumps(t) + "\n" for t in triplets))
        targs = TrainingArguments(bidirectional_from=last - 2, train_from=last - 2, max_steps=2,
                                  batch_size=8, learning_rate=1e-3, threads=2)
        result = train(bare, str(data), Path(tmp) / "run", targs, show_progress_bar=False)
        out["train"] = {"losses": [h["loss"] for h in result.history]}
        trained = deelm.DeeLM.from_pretrained(adapter=str(result.adapter), threads=2)
        out["arrays"]["trained/int8/auto"] = digest(trained.encode(texts, batch_size=16))
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()

"""One LoRA training step, deelm against PyTorch + PEFT, side by side.

    python -m benchmarks.train_step [--model PATH] [--data FILE] [--triplets 32]
                                    [--bidirectional-from 29] [--train-from K]
                                    [--lora-r 8] [--threads 2] [--repeats 5]
                                    [--micro-batch-size N]
                                    [--output results/bench/train_step]

The same batch (the first --triplets rows of --data, SNLI triplets from the
shared data by default), the same LoRA configuration (rank r, alpha 2r, on
q/k/v/o/gate/up/down of layers >= train_from, dropout 0.05), the same loss
(in-batch contrastive with hard negatives, scale 20, on mean-pooled
embeddings), the same attention (layers >= k bidirectional) and the same
optimiser (AdamW). A step is: tokenize, forward, loss, backward, optimiser
step.

  deelm           the step as deelm.train.trainer runs it, with the frozen layers'
                  output (layers < train_from) taken from its cache, as it is
                  from the second epoch on (or for any sentence seen before)
  deelm-nocache   the same, computing the frozen layers too (a first epoch)
  torch+peft      transformers (float32, eager attention, the GGUF loaded with
                  gguf_file=...) wrapped by peft.get_peft_model; the frozen
                  layers run under autograd with no trainable parameters

--micro-batch-size N makes deelm's step a GradCache step over chunks of N
sentences (a triplet is 3 sentences), so large batches fit in little memory;
torch+peft always runs the plain step.

Each engine runs in its own worker process (no shared threads or allocators)
and gets one warm-up step; then the engines alternate for --repeats rounds,
the order rotating. Reported: the median seconds per step and tokens/s,
deelm's speed-up over torch+peft, and each worker's peak resident memory
(model, cache and step together). Written to --output as train_step-<stamp>.md
and .json.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO

ENGINES = ("deelm", "deelm-nocache", "torch+peft")


def load_batch(path, n):
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) >= n:
                break
    return rows


def deelm_worker(opts):
    import numpy as np

    import deelm
    from deelm.adapters.lora import LoraConfig, LoraLayout, init_params
    from deelm.train import TrainingArguments
    from deelm.train.data import Triplets, iter_batches
    from deelm.train.optim import AdamW
    from deelm.train.trainer import FrozenCache, batch_gradient

    model = deelm.DeeLM.from_pretrained(opts["model"], bidirectional_from=opts["k"],
                                        threads=opts["threads"])
    rows = opts["rows"]
    data = Triplets("batch", [r["text"] for r in rows], [r["positive"] for r in rows],
                    [r["negative"] for r in rows], np.arange(1, len(rows) + 1))
    batch = next(iter(iter_batches(data, len(rows), seed=0, epoch=0)))
    lora = LoraConfig(r=opts["r"], alpha=2 * opts["r"], dropout=0.05,
                      layers=tuple(range(opts["train_from"], model.num_layers)))
    layout = LoraLayout(lora, model.core.config)
    params = init_params(layout, 0)
    model.set_adapter(layout, params)
    grad = np.zeros_like(params)
    opt = AdamW(params, lr=1e-4, weight_decay=0.0)
    args = TrainingArguments(bidirectional_from=opts["k"], train_from=opts["train_from"],
                             lora=lora, micro_batch_size=opts["micro"])
    cache = FrozenCache(model, opts["train_from"], opts["k"], 1 << 40)

    def step():
        if opts["engine"] == "deelm-nocache":
            cache.clear()
        grad[:] = 0
        loss, n_tok = batch_gradient(model, batch, cache, opts["train_from"], opts["k"], args, grad,
                                  opts["threads"], seed=1)
        opt.step(grad)
        return loss, n_tok

    step()  # fills the cache for "deelm"
    return step


def torch_worker(opts):
    import torch
    import transformers
    import peft

    from tests.support.reference import bidirectional_layers, padded_batch  # torch's side

    torch.set_num_threads(opts["threads"])
    torch.manual_seed(0)
    path = Path(opts["model"])
    base = transformers.AutoModel.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch.float32,
                                                  attn_implementation="eager")
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    L = base.config.num_hidden_layers
    cfg = peft.LoraConfig(r=opts["r"], lora_alpha=2 * opts["r"], lora_dropout=0.05,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                          "up_proj", "down_proj"],
                          layers_to_transform=list(range(opts["train_from"], L)),
                          layers_pattern="layers")
    model = peft.get_peft_model(base, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            weight_decay=0.0)
    rows = opts["rows"]
    texts = ([r["text"] for r in rows] + [r["positive"] for r in rows]
             + [r["negative"] for r in rows])
    b = len(rows)

    def step():
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        input_ids, keep = padded_batch(ids)
        with bidirectional_layers(model.base_model.model.layers, keep, opts["k"]):
            out = model(input_ids=input_ids, attention_mask=keep).last_hidden_state
        pooled = (out * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        e = torch.nn.functional.normalize(pooled, dim=-1)
        logits = 20.0 * e[:b] @ e[b:].T  # anchors against all positives and negatives
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item(), int(keep.sum())

    return step


def worker_main():
    opts = json.loads(sys.stdin.readline())
    step = torch_worker(opts) if opts["engine"] == "torch+peft" else deelm_worker(opts)
    step()  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        loss, n_tok = step()
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        print(json.dumps({"seconds": seconds, "loss": loss, "tokens": n_tok, "peak_mb": peak_mb}),
              flush=True)


class Worker:
    def __init__(self, engine, opts, log):
        self.engine = engine
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.train_step", "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     text=True, cwd=REPO)
        self.proc.stdin.write(json.dumps(dict(opts, engine=engine)) + "\n")
        self.proc.stdin.flush()
        self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.engine} died; see the log")
        return json.loads(line)

    def step(self):
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--triplets", type=int, default=32)
    p.add_argument("--bidirectional-from", type=int, default=29)
    p.add_argument("--train-from", type=int, default=None)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="deelm only: GradCache chunks of this many sentences")
    p.add_argument("--output", default="results/bench/train_step")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main()

    import deelm

    model_path = str(deelm.io.default_model.resolve_model_path(args.model))
    data_root = Path(os.environ.get("DEELM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    data = Path(args.data) if args.data else data_root / "nli" / "snli_dev_test_triplets.jsonl"
    k = args.bidirectional_from
    train_from = args.train_from if args.train_from is not None else max(k, 0)
    opts = {"model": model_path, "rows": load_batch(data, args.triplets), "k": k,
            "train_from": train_from, "r": args.lora_r, "threads": args.threads,
            "micro": args.micro_batch_size}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(out / f"workers-{stamp}.log", "w") as log:
        workers = [Worker(e, opts, log) for e in args.engines]
        times = {e: [] for e in args.engines}
        info = {}
        for rnd in range(args.repeats):
            order = workers[rnd % len(workers):] + workers[:rnd % len(workers)]
            for w in order:
                r = w.step()
                times[w.engine].append(r["seconds"])
                info[w.engine] = r
                print(f"round {rnd + 1}: {w.engine:14s} {r['seconds']:.3f} s  loss {r['loss']:.4f}",
                      file=sys.stderr)
        for w in workers:
            w.close()
    med = {e: statistics.median(t) for e, t in times.items()}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        machine = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                       if line.startswith("model name")) + f", {os.cpu_count()} cores"
    except (OSError, StopIteration):
        pass
    lines = [f"# One LoRA training step: deelm vs PyTorch + PEFT ({stamp})", "",
             f"{machine}; {args.threads} threads; {args.triplets} triplets "
             f"({info[args.engines[0]]['tokens']} tokens, deelm's tokenisation); k = {k}, layers "
             f">= {train_from} trained, LoRA r = {args.lora_r} on all 7 projections; "
             + (f"deelm in GradCache chunks of {args.micro_batch_size} sentences; "
                if args.micro_batch_size else "")
             + f"medians of {args.repeats} alternating rounds.", "",
             "| engine | s / step | tokens/s | speed-up vs torch+peft | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|"]
    for e in args.engines:
        ratio = f"{med['torch+peft'] / med[e]:.2f}x" if "torch+peft" in med else "-"
        lines.append(f"| {e} | {med[e]:.3f} | {info[e]['tokens'] / med[e]:.0f} | {ratio} "
                     f"| {info[e]['peak_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    (out / f"train_step-{stamp}.md").write_text(text)
    (out / f"train_step-{stamp}.json").write_text(json.dumps(
        {"args": vars(args), "times": times, "median": med, "machine": machine,
         "last": info}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

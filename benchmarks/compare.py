"""Side-by-side encode throughput: deelm, llama.cpp (llama-cpp-python) and
transformers + torch on the same GGUF file, the same texts and mean pooling.
(One script past ~600 lines: three engines' workers, their tuning and the
report have to agree on one protocol, which is easier to keep in one file.)

    python -m benchmarks.compare [--model PATH [PATH ...]] [--requantize Q4_0 Q8_0]
                                 [--deelm-isa auto|avx512vnni|avx2|scalar] [--threads 1 2] [--repeats 5]
                                 [--sets stsb long] [--batch-size 32] [--stsb-sentences N]
                                 [--engines deelm llamacpp transformers transformers-bf16]
                                 [--deelm-precision int8|float32] [--quick]
                                 [--output results/bench/compare]

    python -m benchmarks.compare --quick --repeats 3      # smoke run, a few dozen texts

Several files (--model A B, and --requantize T adding copies of the first file
with its layer weights in block format T, made by benchmarks/requantize.py) are
run one after the other, each with its own llama.cpp tuning, and reported in one
table each. --deelm-isa forces deelm's instruction path (e.g. avx2 on an
AVX-512 machine, to measure the AVX2 kernels; llama.cpp then still runs the
kernels it was built with: say so next to the figures).

Engines and the attention each one is compared under:

  deelm-bidir      deelm, bidirectional_from=0 (every layer bidirectional)
  llamacpp         llama-cpp-python in embedding mode, mean pooling, non-causal
                   attention (attention_type=NON_CAUSAL, llama_set_causal_attn(ctx, False));
                   compared with deelm-bidir
  deelm-causal     deelm, bidirectional_from=-1
  transformers     transformers + torch float32 (benchmarks/encode_throughput.py's
                   TransformersPeer: the GGUF loaded with gguf_file=..., batches of
                   --batch-size length-sorted texts); causal, compared with deelm-causal
  transformers-bf16  the same model cast to bfloat16 (reported only if it runs)

llama.cpp's batching is tuned first, per data set and thread count: every setting in
--llamacpp-candidates is timed (after a short warm-up) on a length-stratified subset of
about --tune-tokens tokens, and the fastest is then timed as "llama.cpp best". A
setting "<S>x<N>[+fa]" embeds S texts per embed() call ("all": the whole list in one
call; embed() packs consecutive texts into decodes of at most N tokens, all of them
attending within one masked attention matrix), with n_ctx = n_batch = n_ubatch = N
(non-causal attention needs a whole decode in one micro-batch, so n_ubatch = n_batch);
"+fa" turns flash attention on. "1x512" is one text per decode. Settings whose N is
below the set's longest text are skipped.

Data (from $DEELM_DATA or ../shared/data):
  stsb  the unique sentences of STS Benchmark test (sts/STSBenchmark/test.jsonl)
  long  texts of 128-512 tokens: the unique sentences of STS Benchmark train
        (sts/STSBenchmark/train.jsonl), in file order, joined with spaces into
        consecutive runs; text i takes sentences until it reaches a token target
        drawn from random.Random(0) in [128, 512] (a sentence that would push it past
        512 tokens is skipped); --long-texts of them (default 100, ~32k tokens)

Each engine runs in its own worker process per data set (a persistent subprocess
driven over a pipe), so load time stays out of the timings, peak RSS is per engine,
and no two engines share threads or allocators. Every (engine, threads) pair gets
one warm-up, then --repeats timed runs; within each round the engines alternate
(the order rotating from round to round), so machine drift hits all alike. Token ids
are checked to be the same for every engine, and each peer's embeddings are
compared with deelm's for the same attention (cosine, min and median). Two untimed
checks help read those cosines: llama.cpp run causal against deelm causal (a
well-conditioned configuration: the untrained model made fully bidirectional
amplifies rounding, so int8 against float32 differ far more there), and, when deelm
runs at another precision than float32, deelm float32 embeddings as a reference
(a separate short-lived worker; --no-reference skips it).

Written to --output: compare-<stamp>.md (tables), compare-<stamp>.json (raw
timings and everything else), compare-<stamp>.png (tokens/s bar plot) and
workers-<stamp>.log (the workers' stderr).
"""
import argparse
import inspect
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

import deelm
from benchmarks.common import REPO, cpu_model, peak_rss_mb, unique_sentences
from benchmarks.encode_throughput import TransformersPeer

DATA_DIR = Path(os.environ.get("DEELM_DATA", REPO.parent / "shared" / "data"))
ENGINES = ("deelm", "llamacpp", "transformers", "transformers-bf16")
SETS = ("stsb", "long")
LONG_MIN, LONG_MAX = 128, 512
DEFAULT_CANDIDATES = ("1x512", "allx512", "allx2048", "allx2048+fa")
QUICK_SIZES = {"stsb": 48, "long": 4}

# config name -> (engine worker, attention, label in the tables)
CONFIGS = {
    "deelm-bidir": ("deelm", "bidirectional", "deelm (k=0, all layers bidirectional)"),
    "llamacpp": ("llamacpp", "bidirectional", "llama.cpp best (non-causal)"),
    "deelm-causal": ("deelm", "causal", "deelm (k=-1, causal)"),
    "transformers": ("transformers", "causal", "transformers + torch float32"),
    "transformers-bf16": ("transformers-bf16", "causal", "transformers + torch bfloat16"),
}
# peer config -> the deelm config it is compared with
PAIRS = {"llamacpp": "deelm-bidir", "transformers": "deelm-causal",
         "transformers-bf16": "deelm-causal"}
# embeddings computed only for the checks (never timed)
CHECK_LABELS = {"llamacpp-causal": "llama.cpp, causal (check only)",
                "deelm-bidir-f32": "deelm float32 (k=0), reference",
                "deelm-causal-f32": "deelm float32 (k=-1), reference"}
# cosine checks: (embeddings, versus), each made when both exist
CHECKS = [("llamacpp", "deelm-bidir"), ("llamacpp", "deelm-bidir-f32"),
          ("llamacpp-causal", "deelm-causal"), ("llamacpp-causal", "deelm-causal-f32"),
          ("transformers", "deelm-causal"), ("transformers", "deelm-causal-f32"),
          ("transformers-bf16", "deelm-causal"), ("transformers-bf16", "deelm-causal-f32"),
          ("deelm-bidir", "deelm-bidir-f32"), ("deelm-causal", "deelm-causal-f32")]


def label(config):
    return CONFIGS[config][2] if config in CONFIGS else CHECK_LABELS[config]


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------

def file_tokenizer(path):
    """The tokenizer stored in the GGUF file, as deelm builds it (without
    loading the weights), and deelm's default max_seq_length for the file."""
    from deelm.io.gguf import read_gguf
    from deelm.io.tokenizer import Tokenizer

    gm = read_gguf(path)
    tok = Tokenizer.from_gguf_vocab(gm.vocab, path, gm.config["vocab_size"])
    return tok, min(deelm.settings.DEFAULT_MAX_SEQ_LENGTH, gm.context_length)


def long_texts(source, tokenizer, n_texts, lo=LONG_MIN, hi=LONG_MAX, seed=0):
    """Consecutive unique sentences of `source` joined with spaces, one text per
    token target drawn in [lo, hi]; token counts include BOS/EOS as deelm adds
    them. Deterministic."""
    def count(text):
        return len(tokenizer.encode_prompted([text], "", "", 10 ** 9)[0].ids)

    sentences = unique_sentences(source)
    rng = random.Random(seed)
    texts, pos = [], 0
    while len(texts) < n_texts:
        target = rng.randint(lo, hi)
        parts, n = [], 0
        while n < target:
            if pos >= len(sentences):
                raise ValueError(f"{source} has too few sentences for {n_texts} long texts")
            candidate = " ".join(parts + [sentences[pos]])
            c = count(candidate)
            pos += 1
            if c <= hi:
                parts, n = parts + [sentences[pos - 1]], c
        texts.append(" ".join(parts))
    return texts


def stratified(lengths, n):
    """Indices of n texts spread evenly over the length-sorted list, in their
    original order (the llama.cpp tuning subset)."""
    if n >= len(lengths):
        return list(range(len(lengths)))
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return sorted({order[round(j * (len(lengths) - 1) / (n - 1))] for j in range(n)})


# ---------------------------------------------------------------------------
# engines (run inside the worker processes)
# ---------------------------------------------------------------------------

def parse_candidate(spec):
    """'allx2048+fa' -> {'seqs': 0 (all), 'n_batch': 2048, 'flash': True}."""
    m = re.fullmatch(r"(all|[1-9]\d*)x([1-9]\d*)(\+fa)?", spec)
    if not m:
        raise ValueError(f"bad llama.cpp setting {spec!r} (expected <S|all>x<N>[+fa], e.g. allx2048)")
    seqs = 0 if m.group(1) == "all" else int(m.group(1))
    return {"seqs": seqs, "n_batch": int(m.group(2)), "flash": bool(m.group(3))}


class DeelmEngine:

    def __init__(self, path, texts, opts):
        kw = {}
        self.encode_kw = {"batch_size": opts["batch_size"], "show_progress_bar": False}
        precision = opts.get("deelm_precision")
        if precision is not None:
            # compute precision: from_pretrained's compute_precision (its
            # `precision` in older versions), else encode's own `precision`
            # in the oldest (today encode's precision quantizes the output)
            accepted = inspect.signature(deelm.DeeLM.from_pretrained).parameters
            if "compute_precision" in accepted or "precision" in accepted:
                kw["compute_precision" if "compute_precision" in accepted else "precision"] = precision
                where = "from_pretrained"
            else:
                self.encode_kw["precision"] = precision
                where = "encode"
        if opts.get("deelm_isa"):
            kw["isa"] = opts["deelm_isa"]
        self.model = deelm.DeeLM.from_pretrained(path, bidirectional_from=0, pooling="mean",
                                                 threads=1, **kw)
        self.texts = texts
        used = precision or self.model.compute_precision
        self.info = {"deelm": repr(self.model), "deelm_file": str(self.model.path),
                     "deelm_precision": precision, "deelm_precision_used": used or "float32",
                     "deelm_precision_passed_to": where if precision is not None else None,
                     "deelm_isa": self.model.config.get("isa")}

    def token_ids(self):
        return [list(map(int, e.ids)) for e in self.model.tokenize(self.texts)]

    def encode(self, config, threads):
        self.model.bidirectional_from = 0 if config == "deelm-bidir" else -1
        self.model.threads = threads
        return self.model.encode(self.texts, **self.encode_kw)


class LlamaCppEngine:
    """llama-cpp-python, embedding mode, mean pooling, non-causal attention.
    settings: {threads: candidate spec} (several specs when tuning)."""


    def __init__(self, path, texts, opts):
        import llama_cpp

        self.lc = llama_cpp
        self.path = str(path)
        self.texts = texts
        self.settings = {int(t): s for t, s in opts["llamacpp_settings"].items()}
        self.llms = {}
        for spec in dict.fromkeys(self.settings.values()):
            self._llm(spec)
        llm = next(iter(self.llms.values()))
        self.info = {"llama_cpp_version": llama_cpp.__version__,
                     "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
                     "llama_cpp_causal_attn": bool(llama_cpp.llama_get_causal_attn(llm.ctx))
                     if hasattr(llama_cpp, "llama_get_causal_attn") else None,
                     "llama_cpp_n_seq_max": llm.context_params.n_seq_max,
                     "llama_cpp_kv_unified": bool(llm.context_params.kv_unified)}

    def _llm(self, spec):
        p = parse_candidate(spec)
        key = (p["n_batch"], p["flash"])
        if key not in self.llms:
            lc = self.lc
            t = min(self.settings)
            llm = lc.Llama(self.path, embedding=True, pooling_type=lc.LLAMA_POOLING_TYPE_MEAN,
                           attention_type=lc.LLAMA_ATTENTION_TYPE_NON_CAUSAL,
                           n_ctx=p["n_batch"], n_batch=p["n_batch"], n_ubatch=p["n_batch"],
                           n_threads=t, n_threads_batch=t, flash_attn=p["flash"], verbose=False)
            lc.llama_set_causal_attn(llm.ctx, False)
            self.llms[key] = llm
        return self.llms[key], p

    def token_ids(self):
        llm = next(iter(self.llms.values()))
        # what embed() does: add_bos=True adds BOS/EOS as the file's metadata says
        return [llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in self.texts]

    def encode(self, config, threads, spec=None, limit=None):
        """config "llamacpp-causal" (a check, never timed) runs the same
        context with causal attention."""
        llm, p = self._llm(spec or self.settings[threads])
        self.lc.llama_set_n_threads(llm.ctx, threads, threads)
        texts = self.texts[:limit] if limit else self.texts
        step = p["seqs"] or len(texts)
        out = []
        self.lc.llama_set_causal_attn(llm.ctx, config == "llamacpp-causal")
        try:
            for b in range(0, len(texts), step):
                chunk = texts[b:b + step]
                out.extend([llm.embed(chunk[0])] if step == 1 else llm.embed(chunk))
        finally:
            self.lc.llama_set_causal_attn(llm.ctx, False)
        return np.asarray(out, dtype=np.float32)


class TransformersEngine:
    dtype = "float32"

    def __init__(self, path, texts, opts):
        import torch
        import transformers

        self.peer = TransformersPeer(Path(path), texts, opts["batch_size"])
        if self.dtype == "bfloat16":
            self.peer.model = self.peer.model.to(torch.bfloat16)
        self.info = {"torch_version": torch.__version__,
                     "transformers_version": transformers.__version__,
                     "torch_dtype": str(next(self.peer.model.parameters()).dtype)}

    def token_ids(self):
        ids = [None] * self.peer.n
        for idx, x, mask in self.peer.batches:
            for j, i in enumerate(idx):
                ids[i] = x[j, :int(mask[j].sum())].tolist()
        return ids

    def encode(self, config, threads):
        return self.peer.encode(threads)


class TransformersBF16Engine(TransformersEngine):
    dtype = "bfloat16"


ENGINE_CLASSES = {"deelm": DeelmEngine, "llamacpp": LlamaCppEngine,
                  "transformers": TransformersEngine, "transformers-bf16": TransformersBF16Engine}


def worker_main(engine_name):
    """A worker: reads one JSON command per line on stdin, answers one JSON
    line on a private copy of stdout (fd 1 itself goes to stderr, so nothing a
    library prints can corrupt the protocol)."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    reply = os.fdopen(reply_fd, "w")
    engine = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            cmd = msg["cmd"]
            if cmd == "setup":
                texts = json.loads(Path(msg["texts"]).read_text())
                engine = ENGINE_CLASSES[engine_name](msg["model"], texts, msg["opts"])
                out = {"info": engine.info, "rss_after_load_mb": peak_rss_mb()}
            elif cmd == "tokens":
                Path(msg["path"]).write_text(json.dumps(engine.token_ids()))
                out = {}
            elif cmd == "run":
                extra = {k: msg[k] for k in ("spec", "limit") if msg.get(k)}
                t0 = time.perf_counter()
                emb = engine.encode(msg["config"], msg["threads"], **extra)
                seconds = time.perf_counter() - t0
                if msg.get("save"):
                    np.save(msg["save"], np.asarray(emb, dtype=np.float32))
                out = {"seconds": seconds}
            elif cmd == "close":
                reply.write(json.dumps({"peak_rss_mb": peak_rss_mb()}) + "\n")
                reply.flush()
                return
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as e:  # reported to the parent, which decides
            out = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        reply.write(json.dumps(out) + "\n")
        reply.flush()


# ---------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------

class WorkerError(RuntimeError):
    pass


class Worker:
    """Parent-side handle of one engine's worker process."""

    def __init__(self, engine, log):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.engine = engine
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.compare",
                                      "--_worker", engine],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                     text=True, env=env, cwd=str(REPO))

    def ask(self, **msg):
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerError(f"{self.engine} worker died (exit code {self.proc.poll()})") from None
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{self.engine} worker died (exit code {self.proc.wait()}); "
                              f"see the workers log")
        out = json.loads(line)
        if "error" in out:
            raise WorkerError(f"{self.engine}: {out['error']}\n{out['traceback']}")
        return out

    def close(self):
        try:
            out = self.ask(cmd="close")
        except WorkerError:
            out = {}
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return out.get("peak_rss_mb")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=[None],
                   help="GGUF paths (default: the packaged SmolLM2-135M Q4_1)")
    p.add_argument("--requantize", nargs="+", default=[], metavar="TYPE",
                   help="also run copies of the first --model in these block formats "
                        "(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; benchmarks/requantize.py)")
    p.add_argument("--deelm-isa", default=None,
                   help="force deelm's ISA path (auto, avx512vnni, avx2, scalar)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per (engine, threads), >= 3")
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    p.add_argument("--batch-size", type=int, default=32,
                   help="texts per batch for deelm and transformers (default 32)")
    p.add_argument("--deelm-precision", choices=["int8", "float32"], default=None,
                   help="deelm compute precision (default: not passed, deelm's default)")
    p.add_argument("--long-texts", type=int, default=100, help="number of texts in the long set")
    p.add_argument("--stsb-sentences", type=int, default=None,
                   help="a sample of this many STS-B sentences (every k-th; default: all 2,552)")
    p.add_argument("--llamacpp-candidates", nargs="+", default=list(DEFAULT_CANDIDATES),
                   help="llama.cpp settings tried, <S|all>x<N>[+fa]; one setting skips tuning")
    p.add_argument("--tune-tokens", type=int, default=None,
                   help="tokens in the llama.cpp tuning subset (default 4000; 600 with --quick)")
    p.add_argument("--tune-repeats", type=int, default=None,
                   help="timed runs per tuning candidate (default 2; 1 with --quick)")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the deelm float32 reference embeddings (made when deelm runs at "
                        "another precision, for the cosine checks)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_SIZES['stsb']} STS-B sentences, "
                        f"{QUICK_SIZES['long']} long texts")
    p.add_argument("--output", type=Path, default=REPO / "results" / "bench" / "compare")
    p.add_argument("--_worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return args
    if args.repeats < 3:
        p.error("--repeats must be >= 3")
    if args.tune_tokens is None:
        args.tune_tokens = 600 if args.quick else 4000
    if args.tune_repeats is None:
        args.tune_repeats = 1 if args.quick else 2
    if any(t < 1 for t in args.threads):
        p.error("--threads must be positive")
    for spec in args.llamacpp_candidates:
        try:
            parse_candidate(spec)
        except ValueError as e:
            p.error(str(e))
    return args


def machine_info():
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "usable_cores": deelm.settings.available_cores(), "python": platform.python_version(),
            "platform": platform.platform()}


def load_sets(args, path):
    tok, max_len = file_tokenizer(path)
    sets = {}
    for name in args.sets:
        if name == "stsb":
            source = DATA_DIR / "sts" / "STSBenchmark" / "test.jsonl"
            texts = unique_sentences(source)
            if args.quick:
                texts = texts[:QUICK_SIZES["stsb"]]
            elif args.stsb_sentences:
                # every k-th sentence: a sample spread over the file, not its first topics
                step = max(1, len(texts) // args.stsb_sentences)
                texts = texts[::step][:args.stsb_sentences]
            desc = (f"STS Benchmark test, unique sentences ({source})"
                    + (f", every {step}th: {len(texts)}" if not args.quick and args.stsb_sentences
                       else ""))
        else:
            source = DATA_DIR / "sts" / "STSBenchmark" / "train.jsonl"
            n = QUICK_SIZES["long"] if args.quick else args.long_texts
            texts = long_texts(source, tok, n)
            desc = (f"{n} texts of {LONG_MIN}-{LONG_MAX} tokens: consecutive unique sentences of "
                    f"{source} joined with spaces up to a token target drawn by "
                    f"random.Random(0) in [{LONG_MIN}, {LONG_MAX}]")
        lengths = [len(e.ids) for e in tok.encode_prompted(texts, "", "", max_len)]
        sets[name] = {"texts": texts, "lengths": lengths, "description": desc,
                      "tokens": sum(lengths)}
    return sets


def cosines(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def spawn(engine, path, texts_file, opts, log):
    w = Worker(engine, log)
    info = w.ask(cmd="setup", model=str(path), texts=str(texts_file), opts=opts)
    return w, info


def tune_llamacpp(args, path, texts, lengths, work, log, say):
    """Times every candidate setting on a subset; returns ({threads: best
    spec}, raw tuning times)."""
    cands = list(dict.fromkeys(args.llamacpp_candidates))
    longest = max(lengths)
    too_small = [c for c in cands if parse_candidate(c)["n_batch"] < longest]
    cands = [c for c in cands if c not in too_small]
    if too_small:
        say(f"  llama.cpp: skipping {', '.join(too_small)} (n_batch below the longest text, "
            f"{longest} tokens)")
    if not cands:
        raise WorkerError("no llama.cpp candidate setting fits the longest text")
    if len(cands) == 1:
        return {t: cands[0] for t in args.threads}, {}
    n = max(2, round(args.tune_tokens * len(lengths) / sum(lengths)))
    pick = stratified(lengths, n)
    subset = [texts[i] for i in pick]
    sub_file = work / "tune_texts.json"
    sub_file.write_text(json.dumps(subset))
    say(f"  llama.cpp tuning on {len(subset)} texts ({sum(lengths[i] for i in pick):,} tokens): "
        f"{' '.join(cands)}")
    opts = {"llamacpp_settings": {str(args.threads[0]): cands[0]}, "batch_size": args.batch_size}
    w, _ = spawn("llamacpp", path, sub_file, opts, log)
    times = {t: {c: [] for c in cands} for t in args.threads}
    try:
        for t in args.threads:
            for c in cands:  # a short warm-up (also builds each context)
                w.ask(cmd="run", config="llamacpp", threads=t, spec=c, limit=4)
        for r in range(args.tune_repeats):
            for t in args.threads:
                for c in cands[r % len(cands):] + cands[:r % len(cands)]:
                    times[t][c].append(w.ask(cmd="run", config="llamacpp", threads=t,
                                             spec=c)["seconds"])
    finally:
        w.close()
    best = {t: min(cands, key=lambda c: statistics.median(times[t][c])) for t in args.threads}
    for t in args.threads:
        row = "  ".join(f"{c} {statistics.median(v):.3f}s" for c, v in times[t].items())
        say(f"    {t} thread(s): {row} -> best {best[t]}")
    return best, {"subset_texts": len(subset), "subset_tokens": sum(lengths[i] for i in pick),
                  "times_s": {str(t): d for t, d in times.items()}}


def checks(args, path, workers, configs, emb, res, texts_file, opts, work, log, say):
    """Untimed embeddings for the cosine checks: llama.cpp causal against deelm
    causal (a well-conditioned configuration), and deelm float32 as a reference
    when deelm ran at another precision; then every pair in CHECKS."""
    def compute(worker, config, name):
        emb[name] = str(work / f"check-{name}.npy")
        worker.ask(cmd="run", config=config, threads=args.threads[-1], save=emb[name])

    if "llamacpp" in configs and "deelm" in workers:
        compute(workers["llamacpp"], "llamacpp-causal", "llamacpp-causal")
        if "deelm-causal" not in emb:
            compute(workers["deelm"], "deelm-causal", "deelm-causal")
    used = res["engine_info"].get("deelm", {}).get("deelm_precision_used")
    if used not in (None, "float32") and args.reference:
        say("  deelm float32 reference embeddings ...")
        w, _ = spawn("deelm", path, texts_file, dict(opts, deelm_precision="float32"), log)
        try:
            for c in ("deelm-bidir", "deelm-causal"):
                if c in emb:
                    compute(w, c, c + "-f32")
        finally:
            w.close()
    for a, b in CHECKS:
        if a in emb and b in emb:
            cos = cosines(np.load(emb[b]), np.load(emb[a]))
            res["cosine"].append({"embeddings": a, "versus": b, "min": float(cos.min()),
                                  "median": float(np.median(cos)), "n": int(len(cos))})


def run_set(args, path, name, data, work, log, say):
    """Tunes llama.cpp, then times all engines round-robin on one data set."""
    texts_file = work / f"{name}.json"
    texts_file.write_text(json.dumps(data["texts"]))
    engines = list(args.engines)
    peers = [c for c in PAIRS if c in engines]
    configs = []
    if "deelm" in engines:  # deelm runs in the attention its peers need (both without peers)
        needed = {PAIRS[c] for c in peers} or {"deelm-bidir", "deelm-causal"}
        configs = [c for c in ("deelm-bidir", "deelm-causal") if c in needed]
    configs += peers
    res = {"description": data["description"], "texts": len(data["texts"]),
           "tokens": data["tokens"], "min_tokens": min(data["lengths"]),
           "max_tokens": max(data["lengths"]), "skipped": {}, "engine_info": {},
           "rss_mb": {}, "times_s": {}, "cosine": [], "token_check": {}}
    opts = {"batch_size": args.batch_size, "deelm_precision": args.deelm_precision,
            "deelm_isa": args.deelm_isa}

    if "llamacpp" in engines:
        try:
            best, tuning = tune_llamacpp(args, path, data["texts"], data["lengths"], work, log, say)
            opts["llamacpp_settings"] = {str(t): s for t, s in best.items()}
            res["llamacpp_best"] = {str(t): s for t, s in best.items()}
            res["llamacpp_tuning"] = tuning
        except WorkerError as e:
            res["skipped"]["llamacpp"] = str(e).splitlines()[0]
            say(f"  llama.cpp skipped: {e}")

    workers = {}
    for engine in engines:
        if engine in res["skipped"]:
            continue
        say(f"  loading {engine} ...")
        try:
            w, info = spawn(engine, path, texts_file, opts, log)
        except WorkerError as e:
            res["skipped"][engine] = str(e).splitlines()[0]
            say(f"  {engine} skipped: {res['skipped'][engine]}")
            continue
        workers[engine] = w
        res["engine_info"][engine] = info["info"]
        res["rss_mb"][engine] = {"after_load": info["rss_after_load_mb"]}
    configs = [c for c in configs if CONFIGS[c][0] in workers]

    try:
        # same tokens everywhere
        ids = {}
        for engine, w in workers.items():
            f = work / f"{name}-{engine}-ids.json"
            w.ask(cmd="tokens", path=str(f))
            ids[engine] = json.loads(f.read_text())
        if "deelm" in ids:
            ref = ids["deelm"]
            for engine, other in ids.items():
                if engine == "deelm":
                    continue
                differ = [i for i, (a, b) in enumerate(zip(ref, other)) if list(a) != list(b)]
                res["token_check"][engine] = {
                    "texts_with_different_ids": len(differ), "tokens": sum(map(len, other)),
                    "deelm_tokens": sum(map(len, ref)), "first_differences": [
                        {"text": data["texts"][i][:80], "deelm": ref[i][:12], engine: other[i][:12]}
                        for i in differ[:3]]}

        # warm-up; the first one of each config also gives the embeddings to compare
        times = {c: {t: [] for t in args.threads} for c in configs}
        emb_files = {}
        for t in args.threads:
            for c in list(configs):
                save = None
                if c not in emb_files:
                    save = emb_files[c] = str(work / f"{name}-{c}.npy")
                try:
                    workers[CONFIGS[c][0]].ask(cmd="run", config=c, threads=t, save=save)
                except WorkerError as e:
                    if c.startswith("deelm"):
                        raise
                    res["skipped"][c] = str(e).splitlines()[0]
                    say(f"  {c} skipped: {res['skipped'][c]}")
                    configs.remove(c)
                    del times[c]
                    emb_files.pop(c, None)
        checks(args, path, workers, configs, emb_files, res, texts_file, opts, work, log, say)

        # timed rounds, configs alternating, the order rotating every round
        if not configs:
            raise WorkerError("no engine could run")
        for r in range(args.repeats):
            for t in args.threads:
                k = r % len(configs)
                for c in configs[k:] + configs[:k]:
                    s = workers[CONFIGS[c][0]].ask(cmd="run", config=c, threads=t)["seconds"]
                    times[c][t].append(s)
            say(f"  round {r + 1}/{args.repeats}: " + ", ".join(
                f"{c}@{t} {times[c][t][-1]:.2f}s" for t in args.threads for c in configs))
        res["times_s"] = {c: {str(t): v for t, v in d.items()} for c, d in times.items()}
    finally:
        for engine, w in workers.items():
            res["rss_mb"].setdefault(engine, {})["peak"] = w.close()
    return res


def markdown(args, machine, model_path, results):
    used = {r["engine_info"]["deelm"]["deelm_precision_used"] for r in results.values()
            if "deelm" in r["engine_info"]}
    out = ["# deelm vs llama.cpp vs transformers: encode throughput\n",
           f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
           f"Python {machine['python']}  ",
           f"model: {model_path}  ",
           f"deelm isa: {args.deelm_isa or 'auto'}  ",
           f"mean pooling; batch size {args.batch_size} (deelm, transformers); "
           f"deelm precision: {args.deelm_precision or 'not passed'} "
           f"(used: {', '.join(sorted(map(str, used))) or '-'}); "
           f"medians of {args.repeats} timed runs after 1 warm-up, engines alternating "
           f"round-robin{'; QUICK smoke run' if args.quick else ''}\n"]
    for name, res in results.items():
        out.append(f"## {name}: {res['texts']} texts, {res['tokens']:,} tokens "
                   f"({res['min_tokens']}-{res['max_tokens']} per text)\n\n{res['description']}\n")
        rows = ["| engine | attention | threads | median s | min s | max s | tokens/s | "
                "sentences/s | peak RSS MB | deelm / peer |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        med = {c: {t: statistics.median(v) for t, v in d.items()} for c, d in res["times_s"].items()}
        for c, d in res["times_s"].items():
            engine, attention, _ = CONFIGS[c]
            rss = res["rss_mb"].get(engine, {}).get("peak")
            for t, v in d.items():
                name = label(c) + (f" `{res['llamacpp_best'][t]}`" if c == "llamacpp" else "")
                m = med[c][t]
                ratio = ""
                if c in PAIRS and PAIRS[c] in med:
                    ratio = f"**{m / med[PAIRS[c]][t]:.2f}x**"
                rss_s = f"{rss:,.0f}" if rss else ""
                rows.append(f"| {name} | {attention} | {t} | {m:.3f} | {min(v):.3f} | {max(v):.3f} | "
                            f"{res['tokens'] / m:,.0f} | {res['texts'] / m:,.1f} | {rss_s} | {ratio} |")
        out.append("\n".join(rows))
        out.append("\ndeelm / peer: deelm's tokens/s over the peer's, same attention, same threads "
                   "(> 1: deelm faster). Peak RSS is the engine's worker process (deelm's covers "
                   "both attention settings; bfloat16's includes loading in float32).\n")
        if res["cosine"]:
            out.append("| embeddings | versus | min cosine | median cosine | texts |\n"
                       "|---|---|---:|---:|---:|")
            for v in res["cosine"]:
                out.append(f"| {label(v['embeddings'])} | {label(v['versus'])} | {v['min']:.6f} | "
                           f"{v['median']:.6f} | {v['n']} |")
            out.append("")
        for engine, v in res["token_check"].items():
            same = "same ids" if v["texts_with_different_ids"] == 0 else \
                f"DIFFERENT ids in {v['texts_with_different_ids']} texts"
            out.append(f"tokens, {engine} vs deelm: {same} ({v['tokens']:,} vs {v['deelm_tokens']:,} "
                       f"tokens)  ")
        if "llamacpp_tuning" in res and res["llamacpp_tuning"]:
            tun = res["llamacpp_tuning"]
            out.append(f"\nllama.cpp tuning ({tun['subset_texts']} texts, {tun['subset_tokens']:,} "
                       f"tokens, median of {args.tune_repeats}; tokens/s):\n")
            cands = list(next(iter(tun["times_s"].values())))
            out.append("| threads | " + " | ".join(cands) + " | best |\n|---:|"
                       + "---:|" * len(cands) + "---|")
            for t, d in tun["times_s"].items():
                out.append(f"| {t} | " + " | ".join(
                    f"{tun['subset_tokens'] / statistics.median(d[c]):,.0f}" for c in cands)
                    + f" | {res['llamacpp_best'][t]} |")
        if res.get("llamacpp_best") and not res.get("llamacpp_tuning"):
            out.append(f"\nllama.cpp setting (one candidate, not tuned): "
                       f"{', '.join(sorted(set(res['llamacpp_best'].values())))}")
        for what, why in res["skipped"].items():
            out.append(f"\nskipped {what}: {why}")
        info = res["engine_info"].get("llamacpp")
        if info:
            out.append(f"\nllama.cpp {info['llama_cpp_version']}: causal_attn="
                       f"{info['llama_cpp_causal_attn']}, n_seq_max={info['llama_cpp_n_seq_max']}, "
                       f"kv_unified={info['llama_cpp_kv_unified']}; {info['llama_cpp_system_info']}")
        out.append("")
    return "\n".join(out)


def plot(results, threads, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        configs = list(res["times_s"])
        width = 0.8 / max(1, len(configs))
        for j, c in enumerate(configs):
            ys = [res["tokens"] / statistics.median(res["times_s"][c][str(t)]) for t in threads]
            xs = [i + (j - (len(configs) - 1) / 2) * width for i in range(len(threads))]
            bars = ax.bar(xs, ys, width, label=CONFIGS[c][2])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(threads)), [f"{t} thread{'s' if t > 1 else ''}" for t in threads])
        ax.set_ylabel("tokens/s (median)")
        ax.set_title(f"{name}: {res['texts']} texts, {res['tokens']:,} tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args._worker:
        return worker_main(args._worker)
    paths = [Path(deelm.io.default_model.resolve_model_path(m)) for m in args.model]
    if args.requantize:
        from benchmarks.requantize import requantized

        paths += [requantized(paths[0], t) for t in args.requantize]
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
          f"Python {machine['python']}, {machine['platform']}", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = args.output / f"workers-{stamp}.log"
    t0 = time.perf_counter()

    def say(s):
        lead = len(s) - len(s.lstrip("\n"))
        print(f"{s[:lead]}[{time.perf_counter() - t0:6.0f}s] {s[lead:]}", flush=True)

    per_file, mds = {}, []
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="deelm-compare-") as tmp:
        for path in paths:
            print(f"model: {path}", flush=True)
            sets = load_sets(args, path)
            results = {}
            for name, data in sets.items():
                say(f"\n[{path.name} / {name}] {len(data['texts'])} texts, {data['tokens']:,} tokens")
                results[name] = run_set(args, path, name, data, Path(tmp), log, say)
            per_file[str(path)] = results
            mds.append(markdown(args, machine, path, results))

    md = "\n".join(mds)
    print("\n" + md)
    base = args.output / f"compare-{stamp}"
    Path(f"{base}.md").write_text(md + "\n")
    raw = {"machine": machine, "models": [str(p) for p in paths], "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "_worker"},
        "files": per_file}
    Path(f"{base}.json").write_text(json.dumps(raw, indent=2) + "\n")
    for i, (path, results) in enumerate(per_file.items()):
        plot(results, args.threads, f"{base}-{i}-{Path(path).stem}.png")
    print(f"written: {base}.{{md,json}}, {base}-*.png, {log_path}")


if __name__ == "__main__":
    main()

"""The long-running fuzz harness: any number of seeded mutants of tiny GGUF
files, adapter folders, training and STS data files, plus random calls of the
C ops, each kind run in child processes; a child that dies is restarted after
the case that killed it. Meant for a core built with sanitizers:

    DEELM_SANITIZE=1 python setup.py build_ext --inplace
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \\
        python fuzz/run_fuzz.py --mutants 20000 [--kinds gguf adapter train_data sts core]

Reports, per kind: mutants loaded, refused with a deelm error naming the file,
refused without naming it, other exceptions, non-finite outputs, crashes,
sanitizer reports, hangs (a case over --case-seconds), and the children's peak
RSS (a blow-up shows there). Mutant generation and the child program are the
fast tier's (tests/core/test_fuzz.py), so both tiers test the same things.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from test_fuzz import CHILD, CORE_CHILD, _mutants  # noqa: E402
from support.gguf_builder import write_tiny_gguf  # noqa: E402

KINDS = ("gguf", "adapter", "train_data", "sts", "core")
SANITIZER = ("AddressSanitizer", "runtime error:", "LeakSanitizer", "UndefinedBehaviorSanitizer")


def seeds(tmp, model_path):
    """The intact file each kind mutates, and how a mutant becomes a case."""
    import deelm
    from deelm.adapters.lora import LoraConfig, LoraLayout
    from deelm.adapters.peft import save_adapter

    m = deelm.DeeLM.from_pretrained(model_path, adapter=None)
    layout = LoraLayout(LoraConfig(r=2, alpha=4), m.config)
    params = np.random.default_rng(0).standard_normal(layout.size).astype(np.float32) * 0.05
    good = save_adapter(tmp / "good_adapter", layout, params)
    triplets = "".join(json.dumps({"text": f"a cat {i}", "positive": f"the cat {i}",
                                   "negative": f"no {i}"}) + "\n" for i in range(12)).encode()
    sts = "".join(json.dumps({"sentence1": f"a cat {i}", "sentence2": f"the dog {i}",
                              "score": i % 6}) + "\n" for i in range(12)).encode()
    return {"gguf": Path(model_path).read_bytes(), "adapter": good, "train_data": triplets,
            "sts": sts}


def write_case(kind, i, data, folder, good_adapter=None):
    if kind == "adapter":
        d = folder / f"a{i}"
        d.mkdir()
        weights = (good_adapter / "adapter_model.safetensors").read_bytes()
        config = (good_adapter / "adapter_config.json").read_bytes()
        if i % 2:
            weights = data
        else:
            config = data
        (d / "adapter_model.safetensors").write_bytes(weights)
        (d / "adapter_config.json").write_bytes(config)
        return d
    p = folder / (f"m{i}.gguf" if kind == "gguf" else f"m{i}.jsonl")
    p.write_bytes(data)
    return p


def run_cases(kind, model_path, cases, work, case_seconds, counts):
    """Runs cases in children until all are done, restarting after a death."""
    todo = [str(c) for c in cases]
    while todo:
        listing = work / "cases.json"
        listing.write_text(json.dumps(todo))
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(model_path), str(listing)],
                                  capture_output=True, text=True,
                                  timeout=max(60, case_seconds * len(todo)))
            out, rc, err, hung = proc.stdout, proc.returncode, proc.stderr, False
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, err, hung = None, "", True
        lines = [json.loads(x) for x in out.splitlines() if x.strip()]
        done = {r["case"] for r in lines if "outcome" in r}
        for r in lines:
            if "outcome" in r:
                key = r["outcome"] if r["outcome"] != "error" or r["names_file"] else "error, file not named"
                counts[key] = counts.get(key, 0) + 1
        started = [r["started"] for r in lines if "started" in r]
        if rc == 0:
            return
        culprit = started[-1] if started and started[-1] not in done else None
        key = "hang" if hung else "sanitizer report" if any(s in err for s in SANITIZER) else "crash"
        counts[key] = counts.get(key, 0) + 1
        counts.setdefault("examples", []).append({"case": culprit, "what": key, "stderr": err[-800:]})
        skip = set(done) | ({culprit} if culprit else set())
        todo = [c for c in todo if c not in skip]
        if not culprit:  # died before any case started
            return


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mutants", type=int, default=5000, help="per kind")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--chunk", type=int, default=2000, help="mutant files on disk at once")
    p.add_argument("--case-seconds", type=float, default=5.0)
    p.add_argument("--output", type=Path, default=REPO / "results" / "fuzz")
    args = p.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    report = {}
    with tempfile.TemporaryDirectory(prefix="deelm-fuzz-") as tmp:
        tmp = Path(tmp)
        model_path, _ = write_tiny_gguf(tmp / "tiny.gguf")
        base = seeds(tmp, model_path)
        for kind in args.kinds:
            t0, counts = time.perf_counter(), {}
            if kind == "core":
                calls = args.mutants
                proc = subprocess.run([sys.executable, "-c", CORE_CHILD, str(args.seed), str(calls)],
                                      capture_output=True, text=True, timeout=max(120, calls))
                lines = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
                if proc.returncode == 0:
                    counts.update({("error" if k == "error" else "loaded"): v
                                   for k, v in lines[-1]["outcomes"].items()})
                else:
                    err = proc.stderr
                    key = "sanitizer report" if any(s in err for s in SANITIZER) else "crash"
                    counts[key] = 1
                    counts["examples"] = [{"case": lines[-1] if lines else None, "stderr": err[-800:]}]
            else:
                rng = np.random.default_rng([args.seed, KINDS.index(kind)])
                source = base[kind]
                for start in range(0, args.mutants, args.chunk):
                    n = min(args.chunk, args.mutants - start)
                    with tempfile.TemporaryDirectory(dir=tmp) as chunk:
                        chunk = Path(chunk)
                        if kind == "adapter":
                            w = (source / "adapter_model.safetensors").read_bytes()
                            c = (source / "adapter_config.json").read_bytes()
                            head = 8 + int.from_bytes(w[:8], "little")
                            datas = [(_mutants(w, rng, 1, head=head)[0] if i % 2 else
                                      _mutants(c, rng, 1)[0]) for i in range(n)]
                        else:
                            head = 4096 if kind == "gguf" else None
                            datas = _mutants(source, rng, n, head=head)
                        cases = [write_case(kind, start + i, d, chunk, source if kind == "adapter" else None)
                                 for i, d in enumerate(datas)]
                        run_cases(kind, model_path, cases, chunk, args.case_seconds, counts)
                    print(f"{kind}: {start + n}/{args.mutants} {dict((k, v) for k, v in counts.items() if k != 'examples')}",
                          file=sys.stderr, flush=True)
            counts["seconds"] = round(time.perf_counter() - t0, 1)
            report[kind] = counts
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    cols = ["loaded", "error", "error, file not named", "other", "non-finite", "crash",
            "sanitizer report", "hang"]
    print(f"\nsanitizers: {'on' if 'asan' in os.environ.get('LD_PRELOAD', '') else 'off'}; "
          f"children's peak RSS {peak:.0f} MB\n")
    print("| kind | mutants | " + " | ".join(cols) + " | seconds |")
    print("|---|---:|" + "---:|" * len(cols) + "---:|")
    for kind, c in report.items():
        total = sum(c.get(k, 0) for k in cols)
        print(f"| {kind} | {total} | " + " | ".join(str(c.get(k, 0)) for k in cols) + f" | {c['seconds']} |")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.output / f"fuzz-{stamp}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""A fast, seeded fuzz tier: mutated adapter folders and data files, each kind
in a child process so that a crash is a failure of this test and not the end
of the run. Every mutant must load (and give finite embeddings) or raise one of
deelm's own errors naming the file. (Mutated GGUF files: tests/model/test_bad_input.py.)"""
import json
import subprocess
import sys

import numpy as np
import pytest

CHILD = r"""
import json, sys, traceback
from pathlib import Path
import numpy as np
import deelm
from deelm.eval import sts as ev
from deelm.errors import DeeLMError
from deelm.train.data import load_training_data

kind, model_path, cases = sys.argv[1], sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
model = deelm.DeeLM.from_pretrained(model_path, adapter=None) if kind == "adapter" else None
for case in cases:
    print(json.dumps({"started": case}), flush=True)
    try:
        if kind == "gguf":
            out = deelm.DeeLM.from_pretrained(case, adapter=None, threads=1).encode(["a cat", "x"])
            ok = bool(np.isfinite(out).all())
        elif kind == "adapter":
            model.load_adapter(case)
            out = model.encode(["a cat sat on the mat", "x"])
            ok = bool(np.isfinite(out).all())
            model.remove_adapter()
        elif kind == "train_data":
            load_training_data(case)
            ok = True
        else:
            ev.load_sts_file(Path(case))
            ok = True
        res = {"outcome": "loaded" if ok else "non-finite"}
    except DeeLMError as e:
        res = {"outcome": "error", "names_file": case in str(e), "message": str(e)[:200]}
    except BaseException as e:
        res = {"outcome": "other", "type": type(e).__name__, "message": str(e)[:300],
               "where": traceback.format_exc()[-600:]}
    res["case"] = case
    print(json.dumps(res), flush=True)
"""


def _flip_bytes(data, rng, n):
    b = bytearray(data)
    for _ in range(n):
        i = int(rng.integers(0, len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def _mutants(data, rng, count, head=None):
    """Bit flips (mostly in the first `head` bytes, where formats keep their
    sizes and offsets), truncations and random splices."""
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            region = data[:head] if head else data
            out.append(_flip_bytes(region, rng, int(rng.integers(1, 4))) + data[len(region):])
        elif kind == 1:
            out.append(_flip_bytes(data, rng, int(rng.integers(1, 8))))
        elif kind == 2:
            out.append(data[:int(rng.integers(0, len(data)))])
        else:
            cut = int(rng.integers(0, len(data)))
            junk = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
            out.append(data[:cut] + junk + data[cut:])
    return out


def _run(kind, model_path, cases, tmp_path):
    listing = tmp_path / f"{kind}-cases.json"
    listing.write_text(json.dumps([str(c) for c in cases]))
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(model_path), str(listing)],
                              capture_output=True, text=True, timeout=240)
        stdout, rc, stderr = proc.stdout, proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, stderr = "timeout (240 s)", ""
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    done = [r for r in lines if "outcome" in r]
    if rc != 0:
        last = [r for r in lines if "started" in r][-1:] or None
        pytest.fail(f"{kind} fuzz child ended with {rc} at {last} ({len(done)} of {len(cases)} "
                    f"done): {stderr[-2000:]}")
    assert len(done) == len(cases)
    counts = {}
    for r in done:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    print(f"\n{kind}: {len(cases)} mutants: {counts}")
    bad = [r for r in done if r["outcome"] not in ("loaded", "error")]
    assert not bad, bad[:5]
    unnamed = [r for r in done if r["outcome"] == "error" and not r["names_file"]]
    assert not unnamed, unnamed[:5]
    return counts


def test_fuzz_adapter_folders(tiny_path, tmp_path):
    import deelm
    from deelm.adapters.lora import LoraConfig, LoraLayout
    from deelm.adapters.peft import save_adapter

    m = deelm.DeeLM.from_pretrained(tiny_path[0], adapter=None)
    layout = LoraLayout(LoraConfig(r=2, alpha=4), m.config)
    params = np.random.default_rng(0).standard_normal(layout.size).astype(np.float32) * 0.05
    good = save_adapter(tmp_path / "good", layout, params)
    weights = (good / "adapter_model.safetensors").read_bytes()
    config = (good / "adapter_config.json").read_bytes()
    rng = np.random.default_rng(20261207)
    cases = []
    header = 8 + int.from_bytes(weights[:8], "little")  # safetensors: length, JSON header
    for i, data in enumerate(_mutants(weights, rng, 80, head=header)):
        d = tmp_path / f"w{i}"
        d.mkdir()
        (d / "adapter_config.json").write_bytes(config)
        (d / "adapter_model.safetensors").write_bytes(data)
        cases.append(d)
    for i, data in enumerate(_mutants(config, rng, 60)):
        d = tmp_path / f"c{i}"
        d.mkdir()
        (d / "adapter_config.json").write_bytes(data)
        (d / "adapter_model.safetensors").write_bytes(weights)
        cases.append(d)
    counts = _run("adapter", tiny_path[0], cases, tmp_path)
    assert counts.get("error", 0) > 0


@pytest.mark.parametrize("kind", ["train_data", "sts"])
def test_fuzz_data_files(tiny_path, tmp_path, kind):
    rng = np.random.default_rng(7 if kind == "sts" else 11)
    rows = []
    for i in range(12):
        if kind == "sts":
            rows.append({"sentence1": f"a cat {i}", "sentence2": f"the dog {i}", "score": i % 6})
        else:
            rows.append({"text": f"a cat {i}", "positive": f"the cat {i}", "negative": f"no {i}"})
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    cases = []
    for i, mutant in enumerate(_mutants(data, rng, 120)):
        p = tmp_path / f"m{i}.jsonl"
        p.write_bytes(mutant)
        cases.append(p)
    _run(kind, tiny_path[0], cases, tmp_path)


CORE_CHILD = r"""
import json, sys
import numpy as np
from deelm import _core

rng = np.random.default_rng(int(sys.argv[1]))
n_calls = int(sys.argv[2])
SIZES = [0, 1, 2, 3, 7, 16, 33, -1, 2**31, 2**62, 2**63 - 1, -2**63]
DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint8, object]


def arr():
    kind = rng.integers(0, 6)
    if kind == 0:
        return None
    if kind == 1:
        return int(rng.choice([0, 1, -1, 5, 2**31, 2**64]))
    shape = tuple(int(rng.integers(0, 9)) for _ in range(int(rng.integers(0, 4))))
    dt = DTYPES[int(rng.integers(0, len(DTYPES)))]
    a = rng.standard_normal(shape) * float(rng.choice([1, 1e30, 1e-30]))
    if rng.random() < 0.1 and a.size:
        a.flat[0] = rng.choice([np.nan, np.inf])
    return a.astype(dt) if dt is not object else a.astype(object)


def num():
    return int(rng.choice(SIZES))


OPS = {
    "attention": lambda: _core.attention(arr(), arr(), num(), num(), num(), bool(rng.integers(0, 2)), num()),
    "attention_backward": lambda: _core.attention_backward(arr(), arr(), arr(), num(), num(), num(),
                                                           True, num()),
    "dequantize": lambda: _core.dequantize(num(), bytes(int(rng.integers(0, 300))), num()),
    "linear": lambda: _core.linear(arr(), arr(), num()),
    "qlinear": lambda: _core.qlinear(arr(), num(), bytes(int(rng.integers(0, 300))), num(), num()),
    "quantize_rows": lambda: _core.quantize_rows(arr()),
    "qweight": lambda: _core.qweight(num(), bytes(int(rng.integers(0, 300))), num(), num()),
    "rmsnorm": lambda: _core.rmsnorm(arr(), arr(), float(rng.choice([1e-6, 0.0, -1.0, np.nan]))),
    "rope": lambda: _core.rope(arr(), arr(), arr(), num()),
    "swiglu": lambda: _core.swiglu(arr()),
    "geglu_backward": lambda: _core.geglu_backward(arr(), arr()),
    "memory_estimate": lambda: _core.memory_estimate({}, "int8", num(), num()),
    "type_info": lambda: _core.type_info(num()),
}
names = sorted(OPS)
outcomes = {}
for i in range(n_calls):
    name = names[i % len(names)]
    print(json.dumps({"started": [name, i]}), flush=True)
    try:
        OPS[name]()
        key = "returned"
    except (TypeError, ValueError, OverflowError, MemoryError, RuntimeError) as e:
        key = "error"
    outcomes[key] = outcomes.get(key, 0) + 1
print(json.dumps({"outcomes": outcomes}), flush=True)
"""


def test_fuzz_core_arguments():
    """Random shapes, dtypes, sizes (negative, 2**62, ...) and values into the
    C ops: each call returns or raises a Python exception; none may crash or
    hang (the child's exit code and a time limit check that)."""
    proc = subprocess.run([sys.executable, "-c", CORE_CHILD, "20261207", "1300"],
                          capture_output=True, text=True, timeout=240)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0:
        last = [r for r in lines if "started" in r][-1:]
        pytest.fail(f"_core fuzz child ended with {proc.returncode} at {last}: {proc.stderr[-2000:]}")
    print(f"\n_core: {lines[-1]}")
    assert lines[-1]["outcomes"].get("error", 0) > 0

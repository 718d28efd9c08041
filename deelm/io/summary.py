"""A model file described from its header: what `python -m deelm info` prints.

Nothing is decoded or packed: the sizes, tensor types and the vocabulary's
size come from the GGUF header, and the memory figures from the C core's own
allocation arithmetic (_core.memory_estimate: the functions that size
dl_model_alloc's and dl_model_forward's buffers). A file whose architecture
deelm cannot run is described as far as its header allows.
"""
import math

from deelm import _core
from deelm.errors import UnsupportedModelError
from deelm.io.gguf import read_gguf, read_header
from deelm.settings import PRECISIONS, available_cores, default_precision
from deelm.io.hf import is_hf_directory
from deelm.io.layout import GEMMA3_LOCAL_ROPE_BASE, ROPE_HALF, ROPE_INTERLEAVED
from deelm.io.tokenizer import TOKENIZER_TYPES

EXAMPLE_BATCH = (32, 128)  # sentences x tokens


def summarize(path, *, threads=None, batch=EXAMPLE_BATCH):
    """A dict (JSON-ready) describing the GGUF file at `path`. threads: the
    C core's threads, which set the attention buffers (default: all cores);
    batch: (sentences, tokens each) of the example batch."""
    if is_hf_directory(path):
        return _summarize_hf(path, threads or available_cores(), batch)
    header = read_header(path)
    arch = header.value("general.architecture")
    try:
        model = read_gguf(path)
        cannot_run = None
    except UnsupportedModelError as e:
        model, cannot_run = None, e.reason
    out = dict(file=str(header.path), file_bytes=header.file_size,
               name=str(header.value("general.name", header.path.stem)), architecture=arch,
               runs=model is not None, cannot_run=cannot_run)
    out["dimensions"] = _dimensions(header, arch, model)
    out["rope"] = _rope(header, arch, model)
    out["tensor_types"], out["parameters"] = _tensors(header)
    out["tokenizer"] = _tokenizer(header)
    if model is not None:
        out["memory"] = _memory(model, threads or available_cores(), batch)
    return out


def _summarize_hf(directory, threads, batch):
    """The same description for a Hugging Face directory, from config.json,
    the safetensors headers (read_hf_checkpoint maps but decodes nothing)
    and the tokenizer files."""
    from pathlib import Path

    from deelm.io.hf import read_hf_checkpoint

    model = read_hf_checkpoint(directory)
    path = Path(directory)
    types, params = {}, dict(embedding=0, output_head=0, other=0)
    for name, info in model.stored.items():  # as stored: Gemma's norms are F32 1 + w in memory
        entry = types.setdefault(info.dtype, dict(count=0, bytes=0))
        entry["count"] += 1
        entry["bytes"] += info.end - info.start
        params["embedding" if name == "token_embd" else "other"] += math.prod(info.shape)
    tok = model.tokenizer()
    kind = "tokenizer.json" if (path / "tokenizer.json").is_file() else "tokenizer.model"

    def special(i):
        return None if i is None else dict(id=int(i), token=None)

    return dict(
        file=str(path), file_bytes=sum(p.stat().st_size for p in path.glob("*.safetensors")),
        name=path.name, architecture=model.architecture, runs=True, cannot_run=None,
        dimensions=_dimensions(None, model.architecture, model),
        rope=dict(theta=model.rope["theta"], dimensions=model.config["head_dim"],
                  style="pairs (j, j + head_dim/2)",
                  scaling="none" if model.rope["scaling"] == "default" else model.rope["scaling"],
                  frequency_factors=False, local_theta=model.rope.get("local_theta")),
        tensor_types=dict(sorted(types.items())), parameters=params,
        tokenizer=dict(type=kind, kind="Hugging Face tokenizer file", pre=None,
                       tokens=tok.vocab_size, bos=special(tok.bos_id), eos=special(tok.eos_id),
                       add_bos=tok.add_bos, add_eos=tok.add_eos),
        memory=_memory(model, threads, batch))


def _dimensions(header, arch, model):
    if model is not None:
        c = model.config
        windows = [int(w) for w in c.get("sliding_window", ())]
        return dict(layers=c["n_layers"], dim=c["dim"], heads=c["n_heads"],
                    kv_heads=c["n_kv_heads"], head_dim=c["head_dim"], ffn=c["hidden_dim"],
                    vocab=c["vocab_size"], context_length=model.context_length,
                    rms_eps=c["rms_eps"], sliding_window=max(windows, default=0),
                    local_layers=sum(w > 0 for w in windows))

    def meta(key):
        return header.value(f"{arch}.{key}")

    embd = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    heads = meta("attention.head_count")
    dim = meta("embedding_length")
    head_dim = meta("attention.key_length")
    if head_dim is None and isinstance(heads, int) and isinstance(dim, int) and heads:
        head_dim = dim // heads
    return dict(layers=meta("block_count"), dim=dim, heads=heads,
                kv_heads=meta("attention.head_count_kv") or heads, head_dim=head_dim,
                ffn=meta("feed_forward_length"),
                vocab=int(embd.shape[1]) if embd is not None and len(embd.shape) > 1 else None,
                context_length=meta("context_length"),
                rms_eps=meta("attention.layer_norm_rms_epsilon"))


def _rope(header, arch, model):
    factors = any(t.name == "rope_freqs.weight" for t in header.tensors)
    # the pairing is a property of the architecture's converter: known only
    # for the architectures deelm runs
    style = None if model is None else {
        ROPE_INTERLEAVED: "interleaved pairs (2j, 2j+1)",
        ROPE_HALF: "pairs (j, j + head_dim/2)"}[model.config["rope_style"]]
    local = model is not None and "inv_freq_local" in model.config
    return dict(theta=header.value(f"{arch}.rope.freq_base", 10000.0),
                dimensions=header.value(f"{arch}.rope.dimension_count"), style=style,
                scaling=header.value(f"{arch}.rope.scaling.type", "none"),
                frequency_factors=factors,
                local_theta=header.value(f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)
                if local else None)


def _tensors(header):
    types, params = {}, dict(embedding=0, output_head=0, other=0)
    for t in header.tensors:
        entry = types.setdefault(t.tensor_type.name, dict(count=0, bytes=0))
        entry["count"] += 1
        entry["bytes"] += t.n_bytes
        n = math.prod(t.shape)
        kind = {"token_embd.weight": "embedding", "output.weight": "output_head"}.get(t.name, "other")
        params[kind] += n
    return dict(sorted(types.items())), params


def _tokenizer(header):
    fields = header.fields
    model = header.value("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    n = tokens.count if tokens is not None and tokens.count is not None else None

    def special(key):
        i = header.value(f"tokenizer.ggml.{key}")
        if not isinstance(i, int) or n is None or not 0 <= i < n or tokens.vtype != 8:
            return None if i is None else dict(id=i, token=None)
        return dict(id=i, token=tokens.string_at(i))

    out = dict(type=model, kind=TOKENIZER_TYPES.get(model, "not supported"),
               pre=header.value("tokenizer.ggml.pre"), tokens=n, bos=special("bos_token_id"),
               eos=special("eos_token_id"),
               add_bos=bool(header.value("tokenizer.ggml.add_bos_token", model == "llama")),
               add_eos=bool(header.value("tokenizer.ggml.add_eos_token", False)))
    if model == "llama":
        out["add_space_prefix"] = bool(header.value("tokenizer.ggml.add_space_prefix", True))
    return out


def _memory(model, threads, batch):
    """Resident bytes of the weights in either precision (the token
    embedding table stays in the file mapping: only the rows of tokens met
    are read), and what one forward call allocates per batch."""
    cfg, tensors = model.config, model.tensors
    qkv_bias = "blk.0.attn_q.bias" in tensors
    n_seq, length = batch
    length = min(length, model.context_length)
    n_tokens = n_seq * length
    out = dict(default_precision=default_precision(tensors), threads=threads,
               token_embedding_in_file=int(tensors["token_embd"][3].nbytes),
               example_batch=dict(sentences=n_seq, tokens_each=length))
    for precision in PRECISIONS:
        est = _core.memory_estimate(cfg, precision, n_tokens, length, threads=threads,
                                    qkv_bias=qkv_bias)
        output = n_seq * cfg["dim"] * 4  # the pooled embeddings handed back
        out[precision] = dict(weights=est["weights"], batch=est["forward"] + output,
                              per_token=round((est["forward"] + output) / n_tokens))
    return out


def _mb(n):
    return f"{n / 1e6:,.1f} MB"


def format_summary(s):
    """The summary as aligned text lines."""
    d, r, tk = s["dimensions"], s["rope"], s["tokenizer"]
    lines = [f"file          {s['file']} ({_mb(s['file_bytes'])})",
             f"name          {s['name']}",
             f"architecture  {s['architecture']}"
             + ("" if s["runs"] else f"  -- deelm cannot run it: {s['cannot_run']}"),
             f"dimensions    {d['layers']} layers, dim {d['dim']}, {d['heads']} heads / "
             f"{d['kv_heads']} kv heads, head_dim {d['head_dim']}, ffn {d['ffn']}, vocab "
             f"{d['vocab']}, context {d['context_length']}"
             + (f", sliding window {d['sliding_window']} on {d['local_layers']} of {d['layers']} "
                f"layers" if d.get("sliding_window") else ""),
             f"rope          theta {r['theta']:g}, {r['style'] or 'pairing unknown'}, "
             f"scaling {r['scaling']}"
             + (", frequency factors (rope_freqs)" if r["frequency_factors"] else "")
             + (f"; local layers theta {r['local_theta']:g}" if r.get("local_theta") else "")]
    types = ", ".join(f"{k}: {v['count']} ({_mb(v['bytes'])})" for k, v in s["tensor_types"].items())
    lines.append(f"tensor types  {types}")
    p = s["parameters"]
    head = f", output head {p['output_head'] / 1e6:.1f} M (not used)" if p["output_head"] else ""
    lines.append(f"parameters    {p['other'] / 1e6:.1f} M non-embedding, {p['embedding'] / 1e6:.1f} "
                 f"M embedding{head}")

    def tok(t):
        return "-" if t is None else f"{t['id']} {t['token']!r}"

    extra = f", add_space_prefix={tk['add_space_prefix']}" if "add_space_prefix" in tk else ""
    lines.append(f"tokenizer     {tk['type']} ({tk['kind']}, pre {tk['pre'] or '-'}), "
                 f"{tk['tokens']} tokens, BOS {tok(tk['bos'])}, EOS {tok(tk['eos'])}, "
                 f"add_bos={tk['add_bos']}, add_eos={tk['add_eos']}{extra}")
    m = s.get("memory")
    if m is None:
        lines.append("memory        - (deelm cannot run this architecture)")
        return "\n".join(lines)
    ex = m["example_batch"]
    lines.append(f"memory        weights resident (default precision {m['default_precision']}); "
                 f"the token embedding ({_mb(m['token_embedding_in_file'])}) stays in the "
                 f"file mapping")
    for precision in PRECISIONS:
        e = m[precision]
        mark = " (default)" if precision == m["default_precision"] else ""
        lines.append(f"  {precision + mark:18s} weights {_mb(e['weights'])}; activations "
                     f"{e['per_token'] / 1e3:,.1f} KB per token: {_mb(e['batch'])} for a batch of "
                     f"{ex['sentences']} x {ex['tokens_each']} tokens, {m['threads']} "
                     f"thread{'s' if m['threads'] > 1 else ''}")
    lines.append("  (plus the tokenizer and the vocabulary's Python objects, which the C core "
                 "does not hold)")
    return "\n".join(lines)

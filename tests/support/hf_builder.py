"""Builds tiny random-weight Hugging Face model directories at test time.

transformers saves them (config.json + safetensors, as published checkpoints
are), with tests/support/gguf_builder.py's byte-level BPE vocabulary as tokenizer.json,
so the same weights can also be written as GGUF and tokenize alike.
"""
import copy

import torch
import transformers

from deelm.io.tokenizer import Tokenizer
from support.gguf_builder import GEMMA3_TINY, TINY, random_gemma3_weights, tiny_vocab

VOCAB = len(tiny_vocab()[0])
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}
# The tiny Gemma-3 of tests/support/gguf_builder.py with hidden_size 48: sqrt(48) is not
# a bfloat16 number, so the embedding scale's rounding would show. Every
# third layer is global (layers 2 and 5), the local layers rotate with base
# 100 and query_pre_attn_scalar is not head_dim.
GEMMA3_HF = dict(GEMMA3_TINY, dim=48, sliding_window_pattern=3, local_theta=100.0,
                 query_pre_attn_scalar=32)


def hf_config(arch, **overrides):
    c = GEMMA3_HF if arch == "gemma3" else TINY
    kw = dict(vocab_size=VOCAB, hidden_size=c["dim"], intermediate_size=c["hidden_dim"],
              num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
              num_key_value_heads=c["n_kv_heads"], max_position_embeddings=c["context_length"],
              rms_norm_eps=c["rms_eps"], rope_theta=c["rope_theta"], tie_word_embeddings=False)
    if arch == "gemma3":
        kw.update(head_dim=c["head_dim"], sliding_window=c["sliding_window"],
                  sliding_window_pattern=c["sliding_window_pattern"],
                  rope_local_base_freq=c["local_theta"],
                  query_pre_attn_scalar=c["query_pre_attn_scalar"], tie_word_embeddings=True)
    kw.update(overrides)
    cfg = getattr(transformers, ARCHS[arch][0])(**kw)
    cfg._attn_implementation = "eager"  # the bidirectional hooks replace eager masks
    return cfg


def randomize(model, seed):
    """Weights with a fixed seed, scaled so that activations stay of order
    1-10 through the layers; norms near 1 and biases clearly non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * r)
            elif name.endswith(".bias"):
                p.copy_(0.5 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            else:
                p.copy_(r / p.shape[1] ** 0.5)


def write_tokenizer(directory):
    """tests/support/gguf_builder.py's byte-level BPE vocabulary as tokenizer.json, so
    the directory and the tiny GGUF files tokenize alike."""
    tokens, types, merges = tiny_vocab()
    vocab = {"model": "gpt2", "tokens": tokens, "merges": merges, "token_type": types}
    Tokenizer.from_gguf_vocab(vocab, directory, len(tokens)).backend.save(str(directory / "tokenizer.json"))


def build(directory, arch="llama", *, dtype="float32", seed=0, max_shard_size=None, **overrides):
    """Saves a tiny random `arch` model to `directory` (safetensors in
    `dtype`, with a tokenizer) and returns the float32 reference model whose
    weights are the saved ones (rounded to `dtype`)."""
    model = getattr(transformers, ARCHS[arch][1])(hf_config(arch, **overrides)).eval()
    if arch == "gemma3":  # norm weights w around 0: the model multiplies by 1 + w
        weights = random_gemma3_weights(dict(GEMMA3_HF, n_layers=model.config.num_hidden_layers),
                                        seed)
        missing = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()},
                                         strict=False).missing_keys
        assert missing in ([], ["lm_head.weight"]), missing
    else:
        randomize(model, seed)
    torch_dtype = getattr(torch, dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch_dtype).float())
    saved = copy.deepcopy(model).to(torch_dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    saved.save_pretrained(str(directory), **kw)
    write_tokenizer(directory)
    return model

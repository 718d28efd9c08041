"""Token ids equal transformers' tokenizer for the same GGUF file."""
import numpy as np
import pytest

from conftest import data_file, read_jsonl
from support.texts import NON_ASCII

def _real_sentences(n):
    files = [("sts", "STS12", "test.raw.jsonl"), ("sts", "STS14", "test.raw.jsonl"),
             ("sts", "STS16", "test.raw.jsonl"), ("sts", "STSBenchmark", "train.jsonl"),
             ("sts", "SICK-R", "test.jsonl")]
    out, non_ascii = [], []
    for f in files:
        for r in read_jsonl(data_file(*f)):
            for s in (r["sentence1"], r["sentence2"]):
                (non_ascii if any(ord(c) > 127 for c in s) else out).append(s)
    # every non-ASCII sentence, then enough plain ones
    return non_ascii + out[: max(0, n - len(non_ascii))]


@pytest.mark.reference
def test_default_model_ids_equal_transformers(default_model, hf_default):
    _, hf_tok = hf_default
    sentences = _real_sentences(400) + NON_ASCII
    n_non_ascii = sum(any(ord(c) > 127 for c in s) for s in sentences)
    assert len(sentences) >= 200 and n_non_ascii >= 50
    mine = default_model.tokenizer.encode_ids(sentences)
    ref = hf_tok(sentences, add_special_tokens=True)["input_ids"]
    bad = [(s, a, b) for s, a, b in zip(sentences, mine, ref) if a != b]
    print(f"\n{len(sentences)} sentences ({n_non_ascii} with non-ASCII text), "
          f"{sum(map(len, mine))} tokens: {len(bad)} differ")
    assert not bad, bad[:3]


def test_default_model_decodes_back(default_model):
    for s in NON_ASCII:
        assert default_model.tokenizer.decode(default_model.tokenizer.encode_ids([s])[0]) == s


@pytest.mark.reference
def test_tiny_model_ids_equal_transformers(tiny_path):
    transformers = pytest.importorskip("transformers")
    import deelm

    path = tiny_path[0]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = deelm.DeeLM.from_pretrained(path).tokenizer
    sentences = ["the cat sat on the mat", "The Cat SAT", "in ther at on", ""] + NON_ASCII
    assert tok.encode_ids(sentences) == hf_tok(sentences)["input_ids"]


@pytest.mark.reference
def test_bos_is_added_when_the_file_says_so(tmp_path):
    transformers = pytest.importorskip("transformers")
    import deelm
    from support.gguf_builder import write_tiny_gguf

    path, _ = write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)
    tok = deelm.DeeLM.from_pretrained(path).tokenizer
    ids = tok.encode_ids(["the cat"])[0]
    assert ids[0] == 1 and ids.count(1) == 1
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    print("\ntransformers with add_bos_token:", hf_tok("the cat")["input_ids"], "deelm:", ids)


def test_prompt_template_spans(default_model):
    m = default_model
    prompt = 'The representative word for sentence {text} is:"'
    for text in ["A cat sat on the mat.", "Hello", "日本語", ""]:
        enc = m.tokenize([text], prompt=prompt)[0]
        inner = m.tokenizer.decode(enc.ids[enc.text_start:enc.text_end])
        assert inner.strip() == text
        assert m.tokenizer.decode(enc.ids) == prompt.replace("{text}", text)


def test_truncation_keeps_the_template(default_model):
    m = default_model
    prompt = 'The representative word for sentence {text} is:"'
    long_text = " ".join(["word"] * 2000)
    saved = m.max_seq_length
    try:
        m.max_seq_length = 64
        enc = m.tokenize([long_text], prompt=prompt)[0]
        assert len(enc.ids) == 64
        suffix_ids = m.tokenize(["x"], prompt=prompt)[0]
        tail = suffix_ids.ids[suffix_ids.text_end:]
        assert enc.ids[-len(tail):] == tail
        assert np.isfinite(m.encode(long_text, prompt=prompt)).all()
    finally:
        m.max_seq_length = saved

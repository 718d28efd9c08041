"""A model in worker processes (pickling, threads from the environment, fork
after a pass) and embedding a stream in bounded memory (encode_iter)."""
import copy
import multiprocessing
import pickle
import tracemalloc

import numpy as np
import pytest

import deelm
from deelm.adapters.lora import LoraConfig, LoraLayout
from deelm.adapters.peft import save_adapter

TEXTS = [f"the cat sat on mat number {i}" + " again" * (i % 4) for i in range(20)]


def _adapter(model, seed=0):
    layout = LoraLayout(LoraConfig(r=2, alpha=4), model.config)
    params = np.random.default_rng(seed).standard_normal(layout.size).astype(np.float32) * 0.1
    return layout, params


# ---- pickling ---------------------------------------------------------------------

def test_pickle_and_deepcopy_reload_the_same_model(tiny_path):
    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=1, pooling="last",
                                    prompt="q: {text}!", max_seq_length=64, threads=1)
    blob = pickle.dumps(m)
    assert len(blob) < 4096, "the weights must not travel in the pickle"
    for other in (pickle.loads(blob), copy.deepcopy(m)):
        assert other is not m and other.load_options == m.load_options
        assert np.array_equal(other.encode(TEXTS), m.encode(TEXTS))


def test_an_adapter_set_from_memory_travels_in_the_pickle(tiny_path):
    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=0)
    layout, params = _adapter(m)
    m.set_adapter(layout, params)
    other = pickle.loads(pickle.dumps(m))
    assert other.adapter is not None and other.adapter[1] is not params
    assert np.array_equal(other.adapter[1], params)
    assert np.array_equal(other.encode(TEXTS), m.encode(TEXTS))
    bare = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=0)
    assert not np.array_equal(bare.encode(TEXTS), m.encode(TEXTS))


def test_an_adapter_loaded_from_a_folder_is_loaded_again(tiny_path, tmp_path):
    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=0)
    folder = save_adapter(tmp_path / "adapter", *_adapter(m, seed=1))
    m.load_adapter(folder)
    # a prompt cleared after loading stays cleared, though the adapter's own
    # settings would otherwise fill it in
    m.prompt = None
    blob = pickle.dumps(m)
    assert len(blob) < 4096, "an adapter with a folder travels as its path"
    other = pickle.loads(blob)
    assert other.load_options == m.load_options and other.prompt is None
    assert np.array_equal(other.encode(TEXTS), m.encode(TEXTS))


def test_the_default_model_is_found_in_the_receiving_installation(default_path, tmp_path,
                                                                   monkeypatch):
    """The default model and the bundled adapter live inside installed
    packages, whose paths differ between machines: the unpickling side looks
    them up in its own installation."""
    monkeypatch.delenv("DEELM_MODEL", raising=False)
    m = deelm.DeeLM.from_pretrained(threads=1)
    assert m.load_options["adapter"] is not None  # the bundled adapter
    blob = pickle.dumps(m)
    elsewhere = tmp_path / "site-packages" / default_path.name
    elsewhere.parent.mkdir()
    elsewhere.symlink_to(default_path)
    monkeypatch.setattr(deelm.io.default_model, "packaged_model_path", lambda: elsewhere)
    other = pickle.loads(blob)
    assert other.path == elsewhere
    assert other.load_options["adapter"] == m.load_options["adapter"]
    assert np.array_equal(other.encode(TEXTS[:4]), m.encode(TEXTS[:4]))


# ---- threads from the environment ---------------------------------------------------

def test_threads_default_to_the_environment(tiny_path, monkeypatch):
    monkeypatch.delenv("DEELM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    path = tiny_path[0]
    assert deelm.DeeLM.from_pretrained(path).threads == deelm.settings.available_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")  # nested levels: the first one counts
    assert deelm.DeeLM.from_pretrained(path).threads == 3
    monkeypatch.setenv("DEELM_NUM_THREADS", "1")  # deelm's own beats OpenMP's
    m = deelm.DeeLM.from_pretrained(path)
    assert m.threads == 1
    assert deelm.DeeLM.from_pretrained(path, threads=2).threads == 2

    # threads left to the default are read again where the model is unpickled;
    # given ones travel
    blob, given = pickle.dumps(m), pickle.dumps(deelm.DeeLM.from_pretrained(path, threads=2))
    monkeypatch.setenv("DEELM_NUM_THREADS", "2")
    assert pickle.loads(blob).threads == 2
    monkeypatch.setenv("DEELM_NUM_THREADS", "1")
    assert pickle.loads(given).threads == 2


@pytest.mark.parametrize("name", ["DEELM_NUM_THREADS", "OMP_NUM_THREADS"])
@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "99999"])
def test_a_bad_thread_count_in_the_environment_is_named(tiny_path, monkeypatch, name, value):
    monkeypatch.delenv("DEELM_NUM_THREADS", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"\${name}='{value}'"):
        deelm.DeeLM.from_pretrained(tiny_path[0])


def test_an_empty_thread_variable_counts_as_unset(tiny_path, monkeypatch):
    monkeypatch.setenv("DEELM_NUM_THREADS", " ")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert deelm.DeeLM.from_pretrained(tiny_path[0]).threads == 1


# ---- worker processes ---------------------------------------------------------------

_worker_model = None


def _keep_model(model):  # a pool worker's initializer
    global _worker_model
    _worker_model = model


def _embed(texts):
    return _worker_model.encode(texts)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_pool_after_a_multithreaded_pass(tiny_path, method):
    """The parent's OpenMP team exists when the pool starts; a forked child
    inherits a copy of it and once hung in its first parallel region."""
    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=0, threads=2)
    m.set_adapter(*_adapter(m))
    expected = m.encode(TEXTS)
    pool = multiprocessing.get_context(method).Pool(2, initializer=_keep_model, initargs=(m,))
    try:
        parts = pool.map_async(_embed, [TEXTS[:7], TEXTS[7:14], TEXTS[14:]]).get(timeout=120)
    finally:
        pool.terminate()
        pool.join()
    assert np.array_equal(np.concatenate(parts), expected)
    assert np.array_equal(m.encode(TEXTS), expected)  # the parent builds a new team


# ---- streaming ------------------------------------------------------------------------

def test_encode_iter_yields_encode_results_per_batch(tiny_model):
    batches = list(tiny_model.encode_iter(iter(TEXTS), batch_size=8))
    assert [len(b) for b in batches] == [8, 8, 4]
    assert all(b.dtype == np.float32 for b in batches)
    assert np.array_equal(np.concatenate(batches), tiny_model.encode(TEXTS))
    unit = np.concatenate(list(tiny_model.encode_iter(TEXTS, batch_size=6,
                                                       normalize_embeddings=True)))
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    tokens = next(tiny_model.encode_iter(TEXTS, output_value="token_embeddings"))
    assert isinstance(tokens, list) and len(tokens) == len(TEXTS)
    assert list(tiny_model.encode_iter([])) == []


@pytest.mark.slow
def test_encode_iter_memory_stays_bounded(tiny_model):
    n, d = 100_000, tiny_model.get_sentence_embedding_dimension()
    rows = 0
    tracemalloc.start()
    try:
        for batch in tiny_model.encode_iter((str(i % 1000) for i in range(n)), batch_size=1000):
            rows += len(batch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == n
    # holding every embedding would take n * d * 4 bytes (25.6 MB) alone
    assert peak < n * d * 4 / 3, f"peak {peak / 1e6:.1f} MB"


def test_encode_iter_bad_input(tiny_model):
    with pytest.raises(TypeError, match="iterable of strings, not str"):
        tiny_model.encode_iter("one string")
    with pytest.raises(TypeError, match="not int"):
        tiny_model.encode_iter(3)
    # argument errors come at the call, not at the first batch
    with pytest.raises(ValueError, match="batch_size"):
        tiny_model.encode_iter(TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="colour"):  # encode's own check, as in sentence-transformers
        tiny_model.encode_iter(TEXTS, colour="red")
    with pytest.raises(TypeError, match="item 9 of the stream is bytes"):
        list(tiny_model.encode_iter(TEXTS[:9] + [b"bytes"], batch_size=4))

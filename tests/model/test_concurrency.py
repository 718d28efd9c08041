"""Calls from several threads on one model: the GIL-free forward pass and the
calls that change what it reads (adapters, training) never overlap, so there
is no crash and every result is one a serial run gives."""
import threading

import numpy as np
import pytest

import deelm
from deelm.adapters.lora import LoraConfig, LoraLayout
SENTS = [f"the cat sat on the mat {i} " * (1 + i % 5) for i in range(40)]


def _layout_and_params(model, seed):
    layout = LoraLayout(LoraConfig(r=4, alpha=8), model.config)
    params = np.random.default_rng(seed).standard_normal(layout.size).astype(np.float32) * 0.05
    return layout, params


def _run_threads(targets, seconds_guard=120):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds_guard)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_encode_while_adapters_are_swapped(tiny_path, precision):
    """Used to crash (the forward read LoRA tables that set/clear had freed)."""
    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=1, threads=2,
                                    compute_precision=precision)
    adapters = [_layout_and_params(m, s) for s in (1, 2)]
    # every state an encode can see, computed serially
    expected = [m.encode(SENTS)]
    for layout, params in adapters:
        m.set_adapter(layout, params)
        expected.append(m.encode(SENTS))
    m.remove_adapter()
    stop = threading.Event()
    seen = []

    def encoder():
        while not stop.is_set():
            seen.append(m.encode(SENTS, batch_size=8))

    def swapper():
        for i in range(20):
            if i % 3 == 2:
                m.remove_adapter()
            else:
                m.set_adapter(*adapters[i % 3])
        stop.set()

    _run_threads([encoder] * 4 + [swapper, swapper])
    assert seen
    # each C call (a batch) sees one state; a sentence lies in one batch
    for out in seen:
        for i in range(len(SENTS)):
            assert any(np.array_equal(out[i], e[i]) for e in expected), i


def test_encode_while_training(tiny_path, tmp_path):
    """Training steps (which own the training state) and encodes on one model."""
    import json

    from deelm.train import TrainingArguments, train

    data = tmp_path / "t.jsonl"
    with open(data, "w") as fh:
        for i in range(16):
            fh.write(json.dumps({"text": f"a cat {i}", "positive": f"the cat {i}",
                                 "negative": f"no dog {i}"}) + "\n")
    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=1, threads=2)
    stop = threading.Event()

    def trainer():
        train(m, data, tmp_path / "run", TrainingArguments(max_steps=4, batch_size=4,
              lora=LoraConfig(r=2, alpha=4)), show_progress_bar=False)
        stop.set()

    def encoder():
        while not stop.is_set():
            out = m.encode(SENTS[:10])
            assert np.isfinite(out).all()

    _run_threads([trainer] + [encoder] * 4)


def test_encode_while_settings_change(tiny_path):
    """8 threads encode while others change threads, bidirectional_from,
    pooling and the adapter: each call uses the settings it started with, so
    every result is one that a serial run with some combination gives."""
    import itertools

    m = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=1, threads=2)
    adapter = _layout_and_params(m, 3)
    sents = SENTS[:12]
    expected = []
    for k, pooling, with_adapter in itertools.product((-1, 0, 1), ("mean", "last"), (False, True)):
        m.bidirectional_from, m.pooling = k, pooling
        if with_adapter:
            m.set_adapter(*adapter)
        else:
            m.remove_adapter()
        expected.append(m.encode(sents, batch_size=64))
    stop = threading.Event()
    seen = []

    def encoder():
        while not stop.is_set():
            seen.append(m.encode(sents, batch_size=64))  # one batch: one C call

    def changer():
        rng = np.random.default_rng(0)
        for i in range(40):
            m.threads = int(rng.integers(1, 4))
            m.bidirectional_from = int(rng.choice([-1, 0, 1]))
            m.pooling = str(rng.choice(["mean", "last"]))
            if i % 2:
                m.set_adapter(*adapter)
            else:
                m.remove_adapter()
        stop.set()

    _run_threads([encoder] * 8 + [changer])
    assert seen
    for out in seen:
        assert any(np.array_equal(out, e) for e in expected)

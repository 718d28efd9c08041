"""deelm.integrations.ray on a local Ray cluster of 2 CPUs: the embeddings of a
Dataset are the bits encode gives in one process."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deelm
from deelm.adapters.lora import LoraConfig, LoraLayout

REPO = Path(__file__).resolve().parents[2]
TEXTS = [f"row {i}: a sentence" + " that goes on" * (i % 6) for i in range(3000)]


def test_import_deelm_never_imports_ray():
    code = ("import sys, deelm, deelm.integrations; "
            "assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'deelm[ray]')")
    pytest.importorskip("ray.data", reason="ray is installed without ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


def _sorted_embeddings(rows, column="embedding"):
    rows = sorted(rows, key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(len(rows)))
    return np.stack([r[column] for r in rows])


@pytest.mark.slow
def test_embed_dataset_equals_encode(ray_cluster, tiny_path):
    from deelm.integrations.ray import embed_dataset

    ds = ray_cluster.data.from_items([{"id": i, "text": t} for i, t in enumerate(TEXTS)])
    rows = embed_dataset(ds, model=str(tiny_path[0]), concurrency=2, num_cpus=1,
                         batch_size=200, load_options={"bidirectional_from": 1}).take_all()
    assert set(rows[0]) == {"id", "text", "embedding"}
    emb = _sorted_embeddings(rows)
    assert emb.dtype == np.float32
    model = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=1)
    assert np.array_equal(emb, model.encode(TEXTS))


@pytest.mark.slow
def test_a_trained_model_goes_to_the_actors(ray_cluster, tiny_path):
    """A DeeLM with an adapter set from memory reaches every actor (pickled
    as its path and settings plus the adapter) through map_batches."""
    from deelm.integrations.ray import Embedder

    model = deelm.DeeLM.from_pretrained(tiny_path[0], bidirectional_from=0, pooling="last")
    layout = LoraLayout(LoraConfig(r=2, alpha=4), model.config)
    model.set_adapter(layout, np.random.default_rng(0).standard_normal(layout.size)
                      .astype(np.float32) * 0.1)
    texts = TEXTS[:600]
    ds = ray_cluster.data.from_items([{"id": i, "body": t} for i, t in enumerate(texts)])
    rows = ds.map_batches(Embedder, batch_size=100, batch_format="numpy", num_cpus=1,
                          compute=ray_cluster.data.ActorPoolStrategy(size=2),
                          fn_constructor_kwargs=dict(model=model, text_column="body",
                                                     output_column="vec",
                                                     normalize_embeddings=True)).take_all()
    assert np.array_equal(_sorted_embeddings(rows, "vec"),
                          model.encode(texts, normalize_embeddings=True))


def test_an_actor_runs_as_many_threads_as_it_has_cpus(ray_cluster, tiny_path):
    from deelm.integrations.ray import Embedder

    path = str(tiny_path[0])

    @ray_cluster.remote
    def threads():
        return Embedder(path).model.threads

    assert ray_cluster.get(threads.options(num_cpus=1).remote()) == 1
    assert ray_cluster.get(threads.options(num_cpus=2).remote()) == 2


def test_embedder_bad_input(tiny_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'deelm[ray]')")
    from deelm.integrations.ray import Embedder

    embedder = Embedder(str(tiny_path[0]), threads=1)
    with pytest.raises(KeyError, match="no column 'text' to embed \\(the batch has 'body'\\)"):
        embedder({"body": np.array(["a"], dtype=object)})
    with pytest.raises(TypeError, match=r"sentences\[1\] is NoneType"):
        embedder({"text": np.array(["a", None], dtype=object)})
    with pytest.raises(ValueError, match="load_options apply to a model path"):
        Embedder(embedder.model, load_options={"pooling": "last"})

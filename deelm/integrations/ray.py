"""Embedding a Ray Dataset: one model per actor, the actor's CPUs as its threads.

    import ray
    from deelm.integrations.ray import embed_dataset

    ray.init()                                   # or ray.init(address="auto") on a cluster
    ds = ray.data.read_parquet("corpus/")        # any Dataset with a text column
    ds = embed_dataset(ds, model="/shared/models/model.gguf", text_column="text",
                       concurrency=4, num_cpus=2)
    ds.write_parquet("embeddings/")

Each actor loads the model once (from the path, which must exist on every
node, or from the package of the default model) and embeds the batches Ray
gives it with `threads` set to the CPUs Ray reserved for it, so actors on one
node do not oversubscribe its cores. A sentence's embedding is the same bits
as ``DeeLM.encode`` gives in one process. Ray is imported only here; ``pip
install 'deelm[ray]'``.
"""
import numpy as np

from deelm.model import DeeLM
from deelm.settings import default_threads


def _actor_cpus():
    """The CPUs Ray reserved for the calling actor or task (at least 1), or
    None outside Ray."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - the driver has no assigned resources in some versions
        return None
    return max(1, int(cpus)) if cpus else None


class Embedder:
    """A callable class for ``Dataset.map_batches`` (batch_format "numpy"):
    adds the embeddings of `text_column` as `output_column` (float32 [rows, d]).

    model: a model path (as from_pretrained takes it, so it must exist on
    every node), None for $DEELM_MODEL or the default model, or a DeeLM
    (which travels as its path and settings and is loaded again in the actor).
    threads: None means the actor's CPUs as Ray reserved them (num_cpus of
    map_batches), else $DEELM_NUM_THREADS / $OMP_NUM_THREADS / the cores.
    load_options: more keyword arguments of DeeLM.from_pretrained.
    """

    def __init__(self, model=None, *, text_column="text", output_column="embedding",
                 batch_size=32, normalize_embeddings=False, threads=None, load_options=None):
        if threads is None:
            threads = _actor_cpus() or default_threads()
        if isinstance(model, DeeLM):
            if load_options:
                raise ValueError("load_options apply to a model path, not to a loaded DeeLM")
            self.model = model
            self.model.threads = threads
        else:
            self.model = DeeLM.from_pretrained(model, threads=threads, **(load_options or {}))
        self.text_column = text_column
        self.output_column = output_column
        self.batch_size = batch_size
        self.normalize_embeddings = normalize_embeddings

    def __call__(self, batch):
        if self.text_column not in batch:
            raise KeyError(f"no column {self.text_column!r} to embed (the batch has "
                           f"{', '.join(map(repr, batch))})")
        texts = batch[self.text_column]
        texts = texts.tolist() if isinstance(texts, np.ndarray) else list(texts)
        emb = self.model.encode(texts, batch_size=self.batch_size, show_progress_bar=False,
                                normalize_embeddings=self.normalize_embeddings)
        return {**batch, self.output_column: emb}


def embed_dataset(ds, model=None, *, text_column="text", output_column="embedding",
                  concurrency=1, num_cpus=1, batch_size=256, encode_batch_size=32,
                  normalize_embeddings=False, load_options=None, **map_batches_kwargs):
    """`ds` with a column `output_column` of float32 embeddings of
    `text_column` (lazy, like every Ray Dataset transform).

    concurrency: the number of actors, each holding one model; an int, or
    (min, max) for a pool Ray grows with the load. num_cpus: CPUs per actor,
    which are also its threads. batch_size: rows per call of an actor;
    encode_batch_size: sentences per forward pass inside it. model and
    load_options: as :class:`Embedder` takes them. Other keyword arguments
    go to ``Dataset.map_batches`` (e.g. memory, resources, runtime_env).
    """
    import ray.data

    if isinstance(concurrency, tuple):
        pool = ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    else:
        pool = ray.data.ActorPoolStrategy(size=concurrency)
    threads = max(1, int(num_cpus))
    return ds.map_batches(
        Embedder, batch_size=batch_size, batch_format="numpy", compute=pool, num_cpus=num_cpus,
        fn_constructor_kwargs=dict(model=model, text_column=text_column,
                                   output_column=output_column, batch_size=encode_batch_size,
                                   normalize_embeddings=normalize_embeddings, threads=threads,
                                   load_options=load_options),
        **map_batches_kwargs)

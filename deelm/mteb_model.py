"""A DeeLM model in the shape the `mteb` package expects.

mteb 2.x hands `encode` a DataLoader of batches ({"text": [...]}) plus task
keywords and checks the model against its EncoderProtocol (encode, similarity,
similarity_pairwise, mteb_model_meta); mteb 1.x passes a list of strings and
`task_name` / `prompt_type`. MTEBModel accepts both. mteb itself is not a
dependency of deelm: nothing here imports it.
"""
import numpy as np

from .model import _as_2d, cos_sim


class MTEBModel:
    """Wraps a DeeLM for mteb.evaluate(...)."""

    mteb_model_meta = None  # mteb 2.x accepts None (no model card)

    def __init__(self, model, batch_size=32, show_progress_bar=False):
        self.model = model
        self.batch_size = batch_size
        self.show_progress_bar = show_progress_bar

    @staticmethod
    def _texts(inputs):
        if isinstance(inputs, str):
            return [inputs]
        if isinstance(inputs, (list, tuple)) and all(isinstance(s, str) for s in inputs):
            return list(inputs)
        texts = []
        for batch in inputs:  # mteb 2.x: a DataLoader of {"text": [...], ...}
            if not isinstance(batch, dict) or "text" not in batch:
                raise TypeError("expected a list of strings or batches with a 'text' field")
            texts.extend(batch["text"])
        return texts

    def encode(self, inputs, *, task_metadata=None, hf_split=None, hf_subset=None,
               prompt_type=None, task_name=None, batch_size=None, show_progress_bar=None, **kwargs):
        return self.model.encode(
            self._texts(inputs), batch_size=batch_size or self.batch_size,
            show_progress_bar=self.show_progress_bar if show_progress_bar is None else show_progress_bar)

    def similarity(self, embeddings1, embeddings2):
        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        a, b = _as_2d(embeddings1), _as_2d(embeddings2)
        return np.asarray(self.model.similarity_pairwise(a, b))

    def __repr__(self):
        return f"MTEBModel({self.model!r})"

"""DeeLM embeddings for LlamaIndex (``pip install "deelm[llamaindex]"``).

    from llama_index.core import Settings
    from deelm.integrations.llama_index import DeeLMEmbedding
    Settings.embed_model = DeeLMEmbedding()     # the default model, or a path, or a DeeLM
"""
import asyncio
from typing import Any, List, Optional

from ._shared import as_text, as_text_list, embed, import_for, resolve_model

BaseEmbedding = import_for("llama_index.core.base.embeddings.base", "llamaindex").BaseEmbedding
from pydantic import Field, PrivateAttr  # noqa: E402  (a dependency of llama-index-core)


class DeeLMEmbedding(BaseEmbedding):
    """A LlamaIndex ``BaseEmbedding`` backed by a DeeLM model.

    model: a loaded ``deelm.DeeLM``; or a model path, or None for the default
        model, loaded with ``DeeLM.from_pretrained(model, **load_kwargs)``.
    query_prompt / document_prompt: as in ``deelm.integrations.langchain``;
        None uses the model's own query and document prompts.
    embed_batch_size: texts per batch of the C core.
    normalize_embeddings: unit vectors (default).
    The async methods run the synchronous ones in a worker thread (deelm
    releases the GIL while it computes).
    """

    query_prompt: Optional[str] = Field(default=None, description="prompt for queries")
    document_prompt: Optional[str] = Field(default=None, description="prompt for documents")
    normalize_embeddings: bool = Field(default=True, description="return unit vectors")
    _model: Any = PrivateAttr()

    def __init__(self, model=None, *, query_prompt=None, document_prompt=None, embed_batch_size=32,
                 normalize_embeddings=True, callback_manager=None, **load_kwargs):
        model = resolve_model(model, load_kwargs)
        path = getattr(model, "path", None)
        super().__init__(model_name=str(path) if path is not None else type(model).__name__,
                         embed_batch_size=embed_batch_size, query_prompt=query_prompt,
                         document_prompt=document_prompt,
                         normalize_embeddings=normalize_embeddings,
                         callback_manager=callback_manager)
        self._model = model

    @classmethod
    def class_name(cls):
        return "DeeLMEmbedding"

    @property
    def model(self):
        """The DeeLM model behind this embedding."""
        return self._model

    def _embed(self, texts, role, prompt):
        return embed(self._model, texts, role, prompt, batch_size=self.embed_batch_size,
                     normalize_embeddings=self.normalize_embeddings, show_progress_bar=False)

    def _get_query_embedding(self, query: str) -> List[float]:
        return self._embed([as_text(query)], "query", self.query_prompt)[0].tolist()

    def _get_text_embedding(self, text: str) -> List[float]:
        return self._embed([as_text(text)], "document", self.document_prompt)[0].tolist()

    def _get_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return self._embed(as_text_list(texts), "document", self.document_prompt).tolist()

    async def _aget_query_embedding(self, query: str) -> List[float]:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> List[float]:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)

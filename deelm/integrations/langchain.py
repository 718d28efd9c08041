"""DeeLM embeddings for LangChain (``pip install "deelm[langchain]"``).

    from deelm.integrations.langchain import DeeLMEmbeddings
    embeddings = DeeLMEmbeddings()               # the default model, or a path, or a DeeLM
    vectors = embeddings.embed_documents(["first text", "second text"])
    query = embeddings.embed_query("what is in the texts?")
"""
from ._shared import as_text, as_text_list, embed, import_for, resolve_model

Embeddings = import_for("langchain_core.embeddings", "langchain").Embeddings


class DeeLMEmbeddings(Embeddings):
    """LangChain ``Embeddings`` backed by a DeeLM model.

    model: a loaded ``deelm.DeeLM``; or a model path, or None for the default
        model, loaded with ``DeeLM.from_pretrained(model, **load_kwargs)``.
    query_prompt / document_prompt: the prompt for each side (a template with
        ``{text}`` or a prefix). None: the model's own query and document
        prompts (``encode_query`` / ``encode_document``), or its one prompt.
    normalize_embeddings: unit vectors (default), so that vector stores
        ranking by L2 distance or inner product rank by cosine.

    ``aembed_documents`` / ``aembed_query`` are LangChain's: they run the
    synchronous methods in an executor thread. deelm releases the GIL while
    it computes, so concurrent calls overlap.
    """

    def __init__(self, model=None, *, query_prompt=None, document_prompt=None, batch_size=32,
                 normalize_embeddings=True, show_progress_bar=False, **load_kwargs):
        self.model = resolve_model(model, load_kwargs)
        self.query_prompt = query_prompt
        self.document_prompt = document_prompt
        self.batch_size = batch_size
        self.normalize_embeddings = normalize_embeddings
        self.show_progress_bar = show_progress_bar

    def _embed(self, texts, role, prompt):
        return embed(self.model, texts, role, prompt, batch_size=self.batch_size,
                     normalize_embeddings=self.normalize_embeddings,
                     show_progress_bar=self.show_progress_bar)

    def embed_documents(self, texts):
        """One embedding (a list of floats) per text, with the document prompt."""
        return self._embed(as_text_list(texts), "document", self.document_prompt).tolist()

    def embed_query(self, text):
        """The embedding of one query (a list of floats), with the query prompt."""
        return self._embed([as_text(text)], "query", self.query_prompt)[0].tolist()

    def __repr__(self):
        return f"DeeLMEmbeddings({self.model!r})"

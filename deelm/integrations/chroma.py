"""A Chroma embedding function backed by DeeLM (``pip install "deelm[chroma]"``).

    import chromadb
    from deelm.integrations.chroma import DeeLMEmbeddingFunction
    collection = chromadb.EphemeralClient().create_collection(
        "docs", embedding_function=DeeLMEmbeddingFunction())
    collection.add(ids=["a", "b"], documents=["first text", "second text"])
    collection.query(query_texts=["what is in the texts?"], n_results=1)

Chroma calls the function for documents and ``embed_query`` for query texts,
so each side gets its own prompt.
"""
from ._shared import as_text_list, embed, import_for, resolve_model

EmbeddingFunction = import_for("chromadb.api.types", "chroma").EmbeddingFunction
register_embedding_function = import_for("chromadb.utils.embedding_functions",
                                         "chroma").register_embedding_function


@register_embedding_function
class DeeLMEmbeddingFunction(EmbeddingFunction):
    """Chroma ``EmbeddingFunction`` over a DeeLM model.

    model: a loaded ``deelm.DeeLM``; or a model path, or None for the default
        model, loaded with ``DeeLM.from_pretrained(model, **load_kwargs)``.
    query_prompt / document_prompt: as in ``deelm.integrations.langchain``;
        None uses the model's own query and document prompts.
    normalize_embeddings: unit vectors (default); the default space is
        "cosine".

    ``get_config`` stores the model's ``load_options`` (its file, settings and
    adapter folder), so a persisted collection can rebuild the function.
    """

    def __init__(self, model=None, *, query_prompt=None, document_prompt=None, batch_size=32,
                 normalize_embeddings=True, **load_kwargs):
        self.model = resolve_model(model, load_kwargs)
        self.query_prompt = query_prompt
        self.document_prompt = document_prompt
        self.batch_size = batch_size
        self.normalize_embeddings = normalize_embeddings

    def _embed(self, texts, role, prompt):
        return list(embed(self.model, as_text_list(texts), role, prompt, batch_size=self.batch_size,
                          normalize_embeddings=self.normalize_embeddings,
                          show_progress_bar=False))

    def __call__(self, input):
        return self._embed(input, "document", self.document_prompt)

    def embed_query(self, input):
        return self._embed(input, "query", self.query_prompt)

    @staticmethod
    def name():
        return "deelm"

    def default_space(self):
        return "cosine"

    def get_config(self):
        options = getattr(self.model, "load_options", None)
        if options is None:
            raise TypeError(f"{type(self.model).__name__} has no load_options: this embedding "
                             "function cannot be saved in a collection's configuration")
        return {"model": dict(options), "query_prompt": self.query_prompt,
                "document_prompt": self.document_prompt, "batch_size": self.batch_size,
                "normalize_embeddings": self.normalize_embeddings}

    @staticmethod
    def build_from_config(config):
        config = dict(config)
        load_options = dict(config.pop("model"))
        return DeeLMEmbeddingFunction(load_options.pop("model"), **config, **load_options)

    def is_legacy(self):
        # Chroma's own check rebuilds the function from its config, which here
        # would load the model a second time; this class implements the whole
        # configuration protocol, so it is not legacy.
        return False

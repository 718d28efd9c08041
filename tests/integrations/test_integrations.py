"""The optional integrations (deelm.integrations.*) against the real LangChain,
LlamaIndex and Chroma, on the tiny model built at run time."""
import asyncio
import subprocess
import sys

import numpy as np
import pytest

DOCS = ["A man is playing a guitar.", "A woman slices an onion.", "Two dogs run on the beach.",
        "The stock market fell sharply today.", "Children build a sandcastle."]
QUERY_PROMPT, DOCUMENT_PROMPT = "query: ", "passage: "


def expected(model, texts, prompt=None):
    return model.encode(texts, prompt=prompt, normalize_embeddings=True)


class RoleModel:
    """A model with encode_query / encode_document (as DeeLM models with query
    and document prompts have), recording which method ran."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def encode(self, texts, **kw):
        self.calls.append(("encode", kw.get("prompt")))
        return self.model.encode(texts, **kw)

    def encode_query(self, texts, **kw):
        self.calls.append(("encode_query", None))
        return self.model.encode(texts, prompt=QUERY_PROMPT, **kw)

    def encode_document(self, texts, **kw):
        self.calls.append(("encode_document", None))
        return self.model.encode(texts, prompt=DOCUMENT_PROMPT, **kw)


def test_import_deelm_imports_no_integration_library():
    code = ("import sys, deelm, deelm.integrations; "
            "print(sorted(m for m in ('langchain_core', 'llama_index', 'chromadb') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("module, library, extra", [
    ("langchain", "langchain_core", "langchain"), ("llama_index", "llama_index", "llamaindex"),
    ("chroma", "chromadb", "chroma")])
def test_a_missing_library_names_its_extra(module, library, extra):
    code = (f"import sys; sys.modules[{library!r}] = None\n"  # as if it were not installed
            f"try:\n    import deelm.integrations.{module}\n"
            "except ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert f'pip install "deelm[{extra}]"' in out.stdout


# ---- LangChain ------------------------------------------------------------------
lc = pytest.importorskip("langchain_core.embeddings")


def test_langchain_embeddings_with_prompts(tiny_model):
    from deelm.integrations.langchain import DeeLMEmbeddings

    emb = DeeLMEmbeddings(tiny_model, query_prompt=QUERY_PROMPT, document_prompt=DOCUMENT_PROMPT)
    assert isinstance(emb, lc.Embeddings)
    docs = emb.embed_documents(DOCS)
    assert isinstance(docs, list) and all(isinstance(v, list) for v in docs)
    assert isinstance(docs[0][0], float)
    np.testing.assert_array_equal(np.float32(docs), expected(tiny_model, DOCS, DOCUMENT_PROMPT))
    query = emb.embed_query(DOCS[0])
    np.testing.assert_array_equal(np.float32(query), expected(tiny_model, [DOCS[0]], QUERY_PROMPT)[0])
    assert not np.allclose(query, docs[0])  # the two prompts make the two sides differ
    assert emb.embed_documents([]) == []


def test_langchain_async_matches_sync(tiny_model):
    from deelm.integrations.langchain import DeeLMEmbeddings

    emb = DeeLMEmbeddings(tiny_model, query_prompt=QUERY_PROMPT)

    async def both():
        return await asyncio.gather(emb.aembed_documents(DOCS), emb.aembed_query(DOCS[1]))

    docs, query = asyncio.run(both())
    assert docs == emb.embed_documents(DOCS)
    assert query == emb.embed_query(DOCS[1])


def test_integrations_use_the_models_query_and_document_encoders(tiny_model):
    from deelm.integrations.chroma import DeeLMEmbeddingFunction
    from deelm.integrations.langchain import DeeLMEmbeddings
    from deelm.integrations.llama_index import DeeLMEmbedding

    role = RoleModel(tiny_model)
    q, d = expected(tiny_model, DOCS[:2], QUERY_PROMPT), expected(tiny_model, DOCS[:2], DOCUMENT_PROMPT)
    lc_emb = DeeLMEmbeddings(role)
    np.testing.assert_array_equal(np.float32(lc_emb.embed_documents(DOCS[:2])), d)
    np.testing.assert_array_equal(np.float32(lc_emb.embed_query(DOCS[0])), q[0])
    li_emb = DeeLMEmbedding(role)
    np.testing.assert_array_equal(np.float32(li_emb.get_query_embedding(DOCS[1])), q[1])
    np.testing.assert_array_equal(np.float32(li_emb.get_text_embedding_batch(DOCS[:2])), d)
    chroma_fn = DeeLMEmbeddingFunction(role)
    np.testing.assert_array_equal(np.float32(chroma_fn(DOCS[:2])), d)
    np.testing.assert_array_equal(np.float32(chroma_fn.embed_query(DOCS[:2])), q)
    assert {c[0] for c in role.calls} == {"encode_query", "encode_document"}
    # an explicit prompt goes straight to encode
    role.calls.clear()
    DeeLMEmbeddings(role, query_prompt="q: ").embed_query(DOCS[0])
    assert role.calls == [("encode", "q: ")]


def test_langchain_loads_a_model_from_a_path(tiny_path):
    from deelm.integrations.langchain import DeeLMEmbeddings

    emb = DeeLMEmbeddings(tiny_path[0], bidirectional_from=-1, pooling="last")
    assert emb.model.pooling == "last" and emb.model.bidirectional_from == -1
    assert len(emb.embed_query("hello")) == emb.model.get_sentence_embedding_dimension()


def test_integrations_bad_input(tiny_model):
    from deelm.integrations.chroma import DeeLMEmbeddingFunction
    from deelm.integrations.langchain import DeeLMEmbeddings
    from deelm.integrations.llama_index import DeeLMEmbedding

    with pytest.raises(TypeError, match="only apply when the model is a path"):
        DeeLMEmbeddings(tiny_model, pooling="last")
    with pytest.raises(TypeError, match="must be a DeeLM"):
        DeeLMEmbeddings(42)
    with pytest.raises(TypeError, match="must be a DeeLM"):
        DeeLMEmbedding(object())
    emb = DeeLMEmbeddings(tiny_model)
    with pytest.raises(TypeError, match="single string"):
        emb.embed_documents("one text")
    with pytest.raises(TypeError, match="expected a string"):
        emb.embed_query(["a list"])
    with pytest.raises(TypeError, match=r"\[1\] is int"):
        emb.embed_documents(["fine", 3])
    with pytest.raises(TypeError, match="single string"):
        DeeLMEmbeddingFunction(tiny_model)("one text")
    with pytest.raises(TypeError, match="expected a string"):
        DeeLMEmbedding(tiny_model).get_query_embedding(None)
    with pytest.raises(TypeError, match="no load_options"):
        DeeLMEmbeddingFunction(RoleModel(tiny_model)).get_config()


# ---- LlamaIndex -----------------------------------------------------------------
def test_llama_index_embedding(tiny_model):
    base = pytest.importorskip("llama_index.core.base.embeddings.base")
    from deelm.integrations.llama_index import DeeLMEmbedding

    emb = DeeLMEmbedding(tiny_model, query_prompt=QUERY_PROMPT, document_prompt=DOCUMENT_PROMPT,
                         embed_batch_size=2)
    assert isinstance(emb, base.BaseEmbedding)
    assert emb.model is tiny_model and emb.model_name == str(tiny_model.path)
    d = expected(tiny_model, DOCS, DOCUMENT_PROMPT)
    np.testing.assert_array_equal(np.float32(emb.get_text_embedding_batch(DOCS)), d)
    np.testing.assert_array_equal(np.float32(emb.get_text_embedding(DOCS[2])), d[2])
    q = np.float32(emb.get_query_embedding(DOCS[3]))
    np.testing.assert_array_equal(q, expected(tiny_model, [DOCS[3]], QUERY_PROMPT)[0])

    async def run():
        return await asyncio.gather(emb.aget_query_embedding(DOCS[3]),
                                    emb.aget_text_embedding(DOCS[2]),
                                    emb.aget_text_embedding_batch(DOCS))

    aq, ad, abatch = asyncio.run(run())
    np.testing.assert_array_equal(np.float32(aq), q)
    np.testing.assert_array_equal(np.float32(ad), d[2])
    np.testing.assert_array_equal(np.float32(abatch), d)


def test_llama_index_vector_index_retrieves(tiny_model):
    core = pytest.importorskip("llama_index.core")
    from llama_index.core.schema import TextNode

    from deelm.integrations.llama_index import DeeLMEmbedding

    nodes = [TextNode(text=t, id_=f"doc{i}") for i, t in enumerate(DOCS)]
    index = core.VectorStoreIndex(nodes, embed_model=DeeLMEmbedding(tiny_model))
    hits = index.as_retriever(similarity_top_k=2).retrieve(DOCS[2])
    assert hits[0].node.node_id == "doc2"  # no prompts: the query is the document itself
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


# ---- Chroma ---------------------------------------------------------------------
def test_chroma_collection_add_and_query(tiny_model):
    chromadb = pytest.importorskip("chromadb")
    from deelm.integrations.chroma import DeeLMEmbeddingFunction

    client = chromadb.EphemeralClient(chromadb.config.Settings(anonymized_telemetry=False))
    fn = DeeLMEmbeddingFunction(tiny_model)
    collection = client.create_collection("deelm_docs", embedding_function=fn)
    assert collection.configuration["hnsw"]["space"] == "cosine"  # the function's default
    collection.add(ids=[f"doc{i}" for i in range(len(DOCS))], documents=DOCS)
    got = collection.get(ids=["doc1"], include=["embeddings"])
    np.testing.assert_allclose(got["embeddings"][0], expected(tiny_model, [DOCS[1]])[0], atol=1e-7)
    result = collection.query(query_texts=[DOCS[4], DOCS[0]], n_results=2)
    assert [ids[0] for ids in result["ids"]] == ["doc4", "doc0"]
    assert max(d[0] for d in result["distances"]) < 1e-5  # cosine space, identical texts
    client.delete_collection("deelm_docs")


def test_chroma_config_rebuilds_the_function(tiny_path, tmp_path):
    chromadb = pytest.importorskip("chromadb")
    from deelm.integrations.chroma import DeeLMEmbeddingFunction

    fn = DeeLMEmbeddingFunction(tiny_path[0], bidirectional_from=1, pooling="last",
                                query_prompt=QUERY_PROMPT)
    assert fn.name() == "deelm" and fn.default_space() == "cosine" and not fn.is_legacy()
    config = fn.get_config()
    rebuilt = DeeLMEmbeddingFunction.build_from_config(config)
    assert rebuilt.get_config() == config
    assert rebuilt.model.bidirectional_from == 1 and rebuilt.model.pooling == "last"
    np.testing.assert_array_equal(np.float32(rebuilt.embed_query(DOCS[:2])),
                                  np.float32(fn.embed_query(DOCS[:2])))
    # a persisted collection, opened again without the function, rebuilds it
    settings = chromadb.config.Settings(anonymized_telemetry=False)
    chromadb.PersistentClient(str(tmp_path), settings=settings).create_collection(
        "deelm_saved", embedding_function=fn).add(ids=["a", "b"], documents=DOCS[:2])
    reopened = chromadb.PersistentClient(str(tmp_path), settings=settings).get_collection("deelm_saved")
    assert isinstance(reopened.configuration["embedding_function"], DeeLMEmbeddingFunction)
    assert reopened.query(query_texts=[DOCS[1]], n_results=1)["ids"] == [["b"]]

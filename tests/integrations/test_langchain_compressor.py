"""DraftContextCompressor inside LangChain pipelines: a compression retriever and an LCEL chain."""

from __future__ import annotations

import asyncio
import threading

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_text_splitters import RecursiveCharacterTextSplitter

from draft_rag import DraftCache, SpecPC
from tests.integrations.test_compression_adapters import QUERY, SPECPC_KWARGS, TEXTS, count


@pytest.fixture
def retriever():
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    store.add_documents([Document(page_content=t, id=f"doc-{i}", metadata={"n": i}) for i, t in enumerate(TEXTS)])
    return store.as_retriever(search_kwargs={"k": 4})


@pytest.fixture
def compressor(tiny_draft):
    from langchain_draft_rag import DraftContextCompressor

    return DraftContextCompressor(draft=tiny_draft, budget=30, specpc_kwargs=SPECPC_KWARGS)


def expected_texts(tiny_draft, retrieved: list[Document]) -> list[str]:
    result = SpecPC(draft=tiny_draft, budget=30, **SPECPC_KWARGS).compress(QUERY, [d.page_content for d in retrieved])
    return result.texts


def test_works_inside_contextual_compression_retriever(retriever, compressor, tiny_draft):
    from langchain_classic.retrievers import ContextualCompressionRetriever

    pipeline = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=retriever)
    retrieved = retriever.invoke(QUERY)
    docs = pipeline.invoke(QUERY)
    assert [d.id for d in docs] == [d.id for d in retrieved]
    assert [d.metadata["n"] for d in docs] == [d.metadata["n"] for d in retrieved]
    assert [d.page_content for d in docs] == expected_texts(tiny_draft, retrieved)
    assert sum(count(d.page_content) for d in docs) <= 30
    assert asyncio.run(pipeline.ainvoke(QUERY)) == docs


def test_works_as_a_runnable_lambda_step(retriever, compressor, tiny_draft):
    chain = {"docs": retriever, "question": RunnablePassthrough()} | RunnableLambda(
        lambda x: compressor.compress_documents(x["docs"], x["question"])
    )
    docs = chain.invoke(QUERY)
    assert [d.page_content for d in docs] == expected_texts(tiny_draft, retriever.invoke(QUERY))
    assert asyncio.run(chain.ainvoke(QUERY)) == docs


def test_input_documents_are_not_modified(compressor):
    docs = [Document(page_content=t, id=f"doc-{i}", metadata={"n": i}) for i, t in enumerate(TEXTS)]
    before = [d.model_copy(deep=True) for d in docs]
    compressor.compress_documents(docs, QUERY)
    assert docs == before


def test_rejects_unknown_settings():
    from langchain_draft_rag import DraftContextCompressor

    with pytest.raises(ValueError, match="budgett"):
        DraftContextCompressor(budgett=10)
    with pytest.raises(ValueError, match="budget"):
        DraftContextCompressor(budget=0)


def cached_compressor(tiny_draft):
    from langchain_draft_rag import DraftContextCompressor

    return DraftContextCompressor(draft=tiny_draft, budget=30, specpc_kwargs=SPECPC_KWARGS, cache=DraftCache())


def test_warmer_fills_the_cache_while_indexing_and_the_retriever_hits_it(tiny_draft):
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_draft_rag import DraftCacheWarmer

    compressor = cached_compressor(tiny_draft)
    warmer = DraftCacheWarmer(compressor)
    raw = [Document(page_content=t, metadata={"n": i}) for i, t in enumerate(TEXTS)]
    chunks = RecursiveCharacterTextSplitter(chunk_size=120, chunk_overlap=0).split_documents(raw)
    before = [d.model_copy(deep=True) for d in chunks]
    warmed = warmer.transform_documents(chunks)
    assert warmed is chunks
    assert chunks == before
    assert compressor.cache.stats.entries == len(chunks) + 1  # every chunk and the chat template's opening

    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    store.add_documents(warmed)
    retriever = ContextualCompressionRetriever(
        base_compressor=compressor, base_retriever=store.as_retriever(search_kwargs={"k": 4})
    )
    stats = compressor.cache.stats
    docs = retriever.invoke(QUERY)
    assert compressor.cache.stats.misses == stats.misses
    assert compressor.cache.stats.hits > stats.hits
    assert sum(count(d.page_content) for d in docs) <= 30


def test_warmer_skips_blank_documents_and_warms_in_a_worker_thread_when_async(tiny_draft, monkeypatch):
    from langchain_draft_rag import DraftCacheWarmer, DraftContextCompressor

    compressor = cached_compressor(tiny_draft)
    docs = [Document(page_content=t) for t in [*TEXTS[:2], "", " \n "]]
    threads = []
    warm = DraftContextCompressor.warm

    def recording_warm(self, documents):
        threads.append(threading.get_ident())
        warm(self, documents)

    monkeypatch.setattr(DraftContextCompressor, "warm", recording_warm)
    assert asyncio.run(DraftCacheWarmer(compressor).atransform_documents(docs)) is docs
    assert threads and threads[0] != threading.get_ident()
    assert compressor.cache.stats.entries == 3  # two non-blank documents and the chat template's opening


def test_warmer_needs_a_compressor_with_a_cache(compressor):
    from langchain_draft_rag import DraftCacheWarmer

    with pytest.raises(ValueError, match=r"^DraftCacheWarmer needs a draft cache.*cache=DraftCache\(\)"):
        DraftCacheWarmer(compressor)
    with pytest.raises(TypeError, match="^compressor must be a DraftContextCompressor, got InMemoryVectorStore"):
        DraftCacheWarmer(InMemoryVectorStore(DeterministicFakeEmbedding(size=16)))

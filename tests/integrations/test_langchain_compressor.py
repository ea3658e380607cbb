"""DraftContextCompressor inside LangChain pipelines: a compression retriever and an LCEL chain."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from draft_rag import SpecPC
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

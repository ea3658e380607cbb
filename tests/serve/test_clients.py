"""The clients people use, against the gateway on loopback in front of the stub upstream: the official ``openai``
client (sync, async, streaming), a LangChain RAG chain on ``ChatOpenAI``, and LlamaIndex's ``OpenAILike``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from tests.integrations.test_compression_adapters import QUERY, TEXTS, count
from tests.serve.support import BUDGET, StubUpstream, gateway_on_loopback, make_specpc

ANSWER = f"Answer to: {QUERY}"
TAGGED = "Answer from the documents.\n" + "\n".join(f"<document>{text}</document>" for text in TEXTS) + f"\n{QUERY}"


@pytest.fixture
def gateway(stub, specpc) -> Iterator[tuple[StubUpstream, str]]:
    upstream, url = stub
    with gateway_on_loopback(url, specpc) as gateway_url:
        yield upstream, gateway_url


def compressed(draft, question: str, texts: list[str], budget: int = BUDGET) -> list[str]:
    """What the upstream must receive: SpecPC's output for the same question and documents."""
    return make_specpc(draft, budget).compress(question, texts).texts


def field_layout(texts: list[str]) -> str:
    return "".join(f'<document index="{i}">\n{text}\n</document>\n\n' for i, text in enumerate(texts, start=1))


def test_openai_sync_client_with_documents_in_extra_body(gateway, tiny_draft):
    upstream, url = gateway
    with openai.OpenAI(base_url=url, api_key="client-key", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": QUERY}], temperature=0, extra_body={"documents": TEXTS})
    completion = raw.parse()
    assert completion.choices[0].message.content == ANSWER
    stats = completion.model_extra["draft_rag"]
    assert stats["context_tokens_before"] == sum(count(t) for t in TEXTS)
    assert stats["context_tokens_after"] <= BUDGET
    assert int(raw.headers["x-draft-rag-context-tokens-after"]) == stats["context_tokens_after"]
    [received] = upstream.chats()
    assert received["body"] == {"model": "m", "temperature": 0, "messages": [
        {"role": "user", "content": field_layout(compressed(tiny_draft, QUERY, TEXTS)) + QUERY}]}
    assert received["headers"]["authorization"] == "Bearer client-key"


def test_openai_sync_client_with_tagged_documents(gateway, tiny_draft):
    upstream, url = gateway
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as client:
        completion = client.chat.completions.create(
            model="m", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": TAGGED}])
    assert completion.choices[0].message.content == ANSWER
    kept = compressed(tiny_draft, f"Answer from the documents.\n\n{QUERY}", TEXTS)
    expected = "Answer from the documents.\n" + "\n".join(f"<document>{t}</document>" for t in kept) + f"\n{QUERY}"
    [received] = upstream.chats()
    assert received["body"]["messages"] == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": expected}]


def test_openai_streaming_with_the_headers(gateway, tiny_draft):
    upstream, url = gateway
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as client, \
            client.chat.completions.with_streaming_response.create(
                model="m", messages=[{"role": "user", "content": QUERY}], stream=True,
                extra_body={"documents": [{"text": t, "title": f"doc {i}"} for i, t in enumerate(TEXTS)],
                            "draft_rag": {"budget": 30}}) as response:
        headers = response.headers
        chunks = list(response.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert int(headers["x-draft-rag-context-tokens-after"]) <= 30
    assert int(headers["x-draft-rag-context-tokens-before"]) == sum(count(t) for t in TEXTS)
    [received] = upstream.chats()
    kept = compressed(tiny_draft, QUERY, TEXTS, budget=30)
    assert received["body"]["messages"][0]["content"] == "".join(
        f'<document index="{i + 1}" title="doc {i}">\n{t}\n</document>\n\n' for i, t in enumerate(kept)) + QUERY


def test_openai_async_client_plain_and_streaming(gateway):
    _, url = gateway

    async def ask() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0) as client:
            messages = [{"role": "user", "content": TAGGED}]
            completion = await client.chat.completions.create(model="m", messages=messages)
            stream = await client.chat.completions.create(model="m", messages=messages, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return completion.choices[0].message.content or "", text

    assert asyncio.run(ask()) == (ANSWER, ANSWER)


def test_openai_client_errors_name_the_field(gateway):
    upstream, url = gateway
    with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUERY}],
                                           extra_body={"documents": TEXTS, "draft_rag": {"budget": 0}})
        models = client.models.list()
    assert (error.value.param, error.value.code) == ("draft_rag.budget", "invalid_value")
    assert upstream.chats() == []
    assert [m.id for m in models.data] == ["stub-model"]


def test_langchain_rag_chain_with_tagged_documents(gateway, tiny_draft):
    from langchain_core.documents import Document
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_openai import ChatOpenAI

    upstream, url = gateway
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    store.add_documents([Document(page_content=text) for text in TEXTS])
    retriever = store.as_retriever(search_kwargs={"k": 4})
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer from the context only."),
        ("human", "Context:\n{context}\n\nQuestion: {question}"),
    ])

    def tag(docs: list[Document]) -> str:
        return "\n".join(f"<document>{doc.page_content}</document>" for doc in docs)

    llm = ChatOpenAI(base_url=url, api_key="k", model="m", max_retries=0, timeout=30)
    chain = {"context": retriever | tag, "question": RunnablePassthrough()} | prompt | llm | StrOutputParser()
    assert chain.invoke(QUERY) == f"Answer to: Question: {QUERY}"
    assert "".join(chain.stream(QUERY)) == f"Answer to: Question: {QUERY}"

    retrieved = [doc.page_content for doc in retriever.invoke(QUERY)]
    kept = compressed(tiny_draft, f"Context:\n\nQuestion: {QUERY}", retrieved)
    assert sum(count(t) for t in retrieved) > BUDGET
    for received in upstream.chats():
        system, human = received["body"]["messages"]
        assert system == {"role": "system", "content": "Answer from the context only."}
        assert human["content"] == f"Context:\n{tag([Document(page_content=t) for t in kept])}\n\nQuestion: {QUERY}"
    assert [r["body"].get("stream", False) for r in upstream.chats()] == [False, True]


def test_llama_index_openai_like(gateway, tiny_draft):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    upstream, url = gateway
    llm = OpenAILike(api_base=url, api_key="k", model="m", is_chat_model=True, max_retries=0, timeout=30)
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content=TAGGED)]
    assert llm.chat(messages).message.content == ANSWER
    assert "".join(r.delta or "" for r in llm.stream_chat(messages)) == ANSWER
    assert asyncio.run(llm.achat(messages)).message.content == ANSWER
    assert llm.complete(TAGGED).text == ANSWER

    kept = compressed(tiny_draft, f"Answer from the documents.\n\n{QUERY}", TEXTS)
    expected = "Answer from the documents.\n" + "\n".join(f"<document>{t}</document>" for t in kept) + f"\n{QUERY}"
    chats = upstream.chats()
    assert len(chats) == 4
    assert all(received["body"]["messages"][-1]["content"] == expected for received in chats)

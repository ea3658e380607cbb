"""DraftRAGLLM: completion and chat, streaming and async, and a query engine with DraftNodePostprocessor."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole

from tests.integrations.conftest import ENGINE_SETTINGS, assert_models_load_on_first_call
from tests.integrations.heartbeat import assert_loop_kept_ticking, ticks_during
from tests.integrations.test_compression_adapters import QUERY, SPECPC_KWARGS, TEXTS, count

SETTINGS = ENGINE_SETTINGS
PROMPT = "What is the special magic number for the word apple? The quick brown fox. " * 3
MESSAGES = [
    ChatMessage(role=MessageRole.SYSTEM, content="Answer with the number only."),
    ChatMessage(role=MessageRole.USER, content=PROMPT),
]
AS_DICTS = [{"role": "system", "content": "Answer with the number only."}, {"role": "user", "content": PROMPT}]


@pytest.fixture
def llm(tiny_pair):
    from llama_index.llms.draft_rag import DraftRAGLLM

    draft, target = tiny_pair
    return DraftRAGLLM(target=target, draft=draft, max_new_tokens=8, **SETTINGS)


def test_complete_and_chat_match_the_engine(llm, engine):
    expected = engine.generate(PROMPT, max_new_tokens=8)
    completion = llm.complete(PROMPT)
    assert completion.text == expected.text
    assert completion.additional_kwargs["prompt_tokens"] == expected.prompt_tokens
    assert completion.additional_kwargs["completion_tokens"] == expected.completion_tokens

    chat_expected = engine.generate(AS_DICTS, max_new_tokens=8)
    reply = llm.chat(MESSAGES)
    assert reply.message.role == MessageRole.ASSISTANT
    assert reply.message.content == chat_expected.text
    assert reply.message.additional_kwargs["finish_reason"] == chat_expected.finish_reason


def test_streaming_equals_non_streaming(llm):
    text = llm.complete(PROMPT).text
    responses = list(llm.stream_complete(PROMPT))
    assert "".join(r.delta for r in responses) == responses[-1].text == text
    assert responses[-1].additional_kwargs["completion_tokens"] == 8

    reply = llm.chat(MESSAGES).message.content
    chat_responses = list(llm.stream_chat(MESSAGES))
    assert "".join(r.delta for r in chat_responses) == chat_responses[-1].message.content == reply


def test_async_forms_equal_sync(llm):
    text = llm.complete(PROMPT).text
    reply = llm.chat(MESSAGES).message.content

    async def run() -> tuple[str, str, str, str]:
        completion = await llm.acomplete(PROMPT)
        streamed = [r async for r in await llm.astream_complete(PROMPT)]
        chat = await llm.achat(MESSAGES)
        chat_streamed = [r async for r in await llm.astream_chat(MESSAGES)]
        return completion.text, streamed[-1].text, chat.message.content, chat_streamed[-1].message.content

    assert asyncio.run(run()) == (text, text, reply, reply)


@pytest.mark.parametrize("method", ["acomplete", "astream_complete", "achat", "astream_chat"])
def test_async_methods_do_not_block_the_event_loop(llm, method):
    llm.complete(PROMPT)  # load and warm up outside the measurement
    argument = MESSAGES if "chat" in method else PROMPT

    async def generate() -> None:
        result = await getattr(llm, method)(argument, max_new_tokens=24)
        if "stream" in method:
            async for _ in result:
                pass

    ticks, seconds = asyncio.run(ticks_during(generate))
    assert_loop_kept_ticking(ticks, seconds)


def test_per_call_options_and_metadata(llm):
    assert llm.complete(PROMPT, max_new_tokens=3).additional_kwargs["completion_tokens"] == 3
    assert llm.metadata.is_chat_model
    assert llm.metadata.num_output == 8
    with pytest.raises(ValueError, match="tool"):
        llm.chat([ChatMessage(role=MessageRole.TOOL, content="3")])


def test_construction_loads_no_model(tiny_pair, monkeypatch):
    from llama_index.llms.draft_rag import DraftRAGLLM

    assert_models_load_on_first_call(
        monkeypatch,
        tiny_pair,
        lambda target, draft: DraftRAGLLM(target=target, draft=draft, max_new_tokens=2, **SETTINGS),
        lambda llm: llm.complete(PROMPT),
    )


def test_query_engine_with_postprocessor_and_llm(tiny_pair, tiny_draft):
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.llms.draft_rag import DraftRAGLLM
    from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

    draft, target = tiny_pair
    documents = [Document(text=t, metadata={"source": f"file{i}.txt"}) for i, t in enumerate(TEXTS)]
    index = VectorStoreIndex.from_documents(
        documents, embed_model=MockEmbedding(embed_dim=8), transformations=[SentenceSplitter(chunk_size=1024)]
    )
    postprocessor = DraftNodePostprocessor(draft=tiny_draft, budget=30, specpc_kwargs=SPECPC_KWARGS)
    query_engine = index.as_query_engine(
        similarity_top_k=4, node_postprocessors=[postprocessor],
        llm=DraftRAGLLM(target=target, draft=draft, max_new_tokens=4, **SETTINGS),
    )
    response = query_engine.query(QUERY)
    assert isinstance(response.response, str)
    assert len(response.source_nodes) == 4
    texts = [n.node.get_content() for n in response.source_nodes]
    assert sum(count(t) for t in texts) <= 30
    for node, text in zip(response.source_nodes, texts):
        assert node.node.metadata["draft_rag"]["original_tokens"] >= count(text)
    # The compression details are metadata for the caller, not text for the LLM.
    assert all("draft_rag" not in n.node.get_content(metadata_mode="llm") for n in response.source_nodes)

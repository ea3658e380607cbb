"""ChatDraftRAG: the langchain-tests standard unit suite, and generation through every LangChain entry point."""

from __future__ import annotations

import asyncio
from functools import reduce
from operator import add

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_tests.unit_tests import ChatModelUnitTests

from tests.integrations.conftest import ENGINE_SETTINGS, assert_models_load_on_first_call
from tests.integrations.heartbeat import assert_loop_kept_ticking, ticks_during

SETTINGS = ENGINE_SETTINGS
MESSAGES = [
    SystemMessage("Answer with the number only."),
    HumanMessage("What is the special magic number for the word apple? The quick brown fox. " * 3),
]
AS_DICTS = [
    {"role": "system", "content": "Answer with the number only."},
    {"role": "user", "content": MESSAGES[1].content},
]


class TestChatDraftRAGStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self):
        from langchain_draft_rag import ChatDraftRAG

        return ChatDraftRAG

    @property
    def chat_model_params(self) -> dict:
        return {"model": "qwen2.5-coder-1.5b-instruct", "method": "speckv", "budget": 256}

    @property
    def standard_chat_model_params(self) -> dict:
        # The suite adds an API client's settings; a local model has no API key, request timeout or retries.
        params = super().standard_chat_model_params
        del params["api_key"], params["timeout"], params["max_retries"]
        return params


@pytest.fixture
def chat(tiny_pair):
    from langchain_draft_rag import ChatDraftRAG

    draft, target = tiny_pair
    return ChatDraftRAG(model=target, draft=draft, max_tokens=8, **SETTINGS)


def test_invoke_renders_messages_in_the_chat_template_and_reports_usage(chat, engine):
    expected = engine.generate(AS_DICTS, max_new_tokens=8)
    message = chat.invoke(MESSAGES)
    assert isinstance(message, AIMessage)
    assert message.content == expected.text
    assert message.usage_metadata == {
        "input_tokens": expected.prompt_tokens,
        "output_tokens": expected.completion_tokens,
        "total_tokens": expected.prompt_tokens + expected.completion_tokens,
    }
    assert message.response_metadata["finish_reason"] == expected.finish_reason
    assert message.response_metadata["kv_entries_kept"] == expected.kv_entries_kept < expected.kv_entries_full


def test_stream_equals_invoke(chat):
    message = chat.invoke(MESSAGES)
    chunks = list(chat.stream(MESSAGES))
    assert len(chunks) > 1
    merged = reduce(add, chunks)
    assert merged.content == message.content
    assert merged.usage_metadata == message.usage_metadata
    assert merged.response_metadata["finish_reason"] == message.response_metadata["finish_reason"]


def test_batch_and_async_forms_equal_invoke(chat):
    text = chat.invoke(MESSAGES).content
    other = [HumanMessage("The lazy dog.")]
    assert [m.content for m in chat.batch([MESSAGES, other])] == [text, chat.invoke(other).content]

    async def run() -> tuple[str, str, list[str]]:
        streamed = "".join([chunk.content async for chunk in chat.astream(MESSAGES)])
        batched = await chat.abatch([MESSAGES, MESSAGES])
        return (await chat.ainvoke(MESSAGES)).content, streamed, [m.content for m in batched]

    assert asyncio.run(run()) == (text, text, [text, text])


def test_async_calls_do_not_block_the_event_loop(chat):
    chat.invoke(MESSAGES)  # load and warm up outside the measurement

    async def stream_then_invoke() -> None:
        async for _ in chat.astream(MESSAGES, max_tokens=16):
            pass
        await chat.ainvoke(MESSAGES, max_tokens=16)

    ticks, seconds = asyncio.run(ticks_during(stream_then_invoke))
    assert_loop_kept_ticking(ticks, seconds)


def test_max_tokens_and_stop(chat):
    short = chat.invoke(MESSAGES, max_tokens=3)
    assert short.usage_metadata["output_tokens"] == 3
    assert short.response_metadata["finish_reason"] == "length"

    full = chat.invoke(MESSAGES).content
    assert len(full) >= 5
    stop = full[3:5]
    stopped = chat.invoke(MESSAGES, stop=[stop])
    assert stopped.content == full[: full.index(stop)]
    assert stopped.response_metadata["finish_reason"] == "stop"
    assert "".join(c.content for c in chat.stream(MESSAGES, stop=[stop])) == stopped.content


def test_seeded_sampling_is_reproducible(chat):
    first = chat.invoke(MESSAGES, temperature=1.0, seed=5).content
    assert chat.invoke(MESSAGES, temperature=1.0, seed=5).content == first


def test_rejects_what_it_cannot_read(chat):
    with pytest.raises(ValueError, match="tool"):
        chat.invoke([HumanMessage("hi"), ToolMessage("3", tool_call_id="call-1")])
    with pytest.raises(ValueError, match="text only"):
        chat.invoke([HumanMessage([{"type": "image", "url": "https://example.com/cat.png"}])])
    with pytest.raises(TypeError, match="max_new_tokens"):
        chat.invoke(MESSAGES, max_new_tokens=3)


def test_construction_loads_no_model(tiny_pair, monkeypatch):
    from langchain_draft_rag import ChatDraftRAG

    assert_models_load_on_first_call(
        monkeypatch,
        tiny_pair,
        lambda target, draft: ChatDraftRAG(model=target, draft=draft, max_tokens=2, **SETTINGS),
        lambda chat: chat.invoke(MESSAGES),
    )

"""ChatDraftRAG: the langchain-tests standard unit suite, and generation through every LangChain entry point."""

from __future__ import annotations

import asyncio
import threading
from functools import reduce
from operator import add

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.messages import AIMessage, AIMessageChunk, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_tests.unit_tests import ChatModelUnitTests

from tests.integrations.conftest import ENGINE_SETTINGS, assert_models_load_on_first_call, finishes_within
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
PROMPTS = [
    [HumanMessage(f"Question {i}: what is the special magic number for the word apple? The lazy dog. " * 2)]
    for i in range(4)
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
    with pytest.raises(ValueError, match=r"messages\[1\] is a 'tool' message.*no tool calling"):
        chat.invoke([HumanMessage("hi"), ToolMessage("3", tool_call_id="call-1")])
    with pytest.raises(ValueError, match=r"messages\[0\].content\[1\] is a block of type 'image'.*text only"):
        chat.invoke([HumanMessage(["Describe:", {"type": "image", "url": "https://example.com/cat.png"}])])
    with pytest.raises(ValueError, match=r"type 'image_url'"):
        chat.invoke([HumanMessage([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])])
    with pytest.raises(ValueError, match=r"messages\[1\] holds tool calls"):
        chat.invoke([HumanMessage("hi"), AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "call-1"}])])
    with pytest.raises(ValueError, match=r"role 'critic'.*use one of"):
        chat.invoke([ChatMessage(role="critic", content="hi")])
    with pytest.raises(ValueError, match="empty"):
        chat.invoke([SystemMessage(""), HumanMessage([" ", {"type": "text", "text": "\n"}])])
    with pytest.raises(TypeError, match="max_new_tokens"):
        chat.invoke(MESSAGES, max_new_tokens=3)


def test_messages_become_plain_text_turns():
    from langchain_draft_rag.chat_models import to_chat_messages

    messages = [
        ChatMessage(role="developer", content="Be brief."),
        HumanMessage(["Read ", {"type": "text", "text": "this"}, {"type": "text", "text": " text."}]),
        AIMessageChunk(content=[{"type": "text", "text": "Done.", "id": "block-1"}]),
        ChatMessage(role="human", content=""),
        ChatMessage(role="ai", content="   "),
    ]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Read this text."},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "   "},
    ]


def test_text_blocks_read_as_their_text(chat):
    blocks = [SystemMessage(MESSAGES[0].content), HumanMessage([{"type": "text", "text": MESSAGES[1].content}])]
    assert chat.invoke(blocks).content == chat.invoke(MESSAGES).content


def test_invoke_inside_a_stream_loop(chat):
    expected = [chat.invoke(prompt).content for prompt in PROMPTS]

    def stream_and_invoke() -> tuple[str, list[str]]:
        streamed, inner = "", []
        for chunk in chat.stream(PROMPTS[0]):
            streamed += chunk.content
            inner.append(chat.invoke(PROMPTS[len(inner) % 3 + 1]).content)
        return streamed, inner

    streamed, inner = finishes_within(120, stream_and_invoke)
    assert streamed == expected[0]
    assert len(inner) > 1
    assert inner == [expected[i % 3 + 1] for i in range(len(inner))]


def test_many_concurrent_astream_and_ainvoke_calls_all_finish(chat):
    expected = [chat.invoke(prompt).content for prompt in PROMPTS]

    async def stream(prompt: list) -> str:
        return "".join([chunk.content async for chunk in chat.astream(prompt)])

    async def invoke(prompt: list) -> str:
        return (await chat.ainvoke(prompt)).content

    async def all_calls() -> list[str]:
        calls = [call(PROMPTS[i % 4]) for i in range(16) for call in (stream, invoke)]
        return await asyncio.gather(*calls)

    results = finishes_within(180, lambda: asyncio.run(all_calls()))
    assert results == [expected[i % 4] for i in range(16) for _ in range(2)]


def test_settings_changed_after_the_first_call_take_effect(chat, tiny_pair):
    from draft_rag import SpecKV

    draft, target = tiny_pair
    first = chat.invoke(MESSAGES).response_metadata
    assert first["kv_entries_kept"] == SETTINGS["budget"]

    chat.budget = 24
    assert chat.invoke(MESSAGES).response_metadata["kv_entries_kept"] == 24
    chat.method = "full"
    assert chat.invoke(MESSAGES).response_metadata["kv_entries_kept"] == first["kv_entries_full"]

    chat.method = "speckv"
    chat.speckv_kwargs["kernel_size"] = 3  # changed in place, not replaced
    message = chat.invoke(MESSAGES)
    expected = SpecKV(target=target, draft=draft, method="speckv", budget=24, window_size=4, kernel_size=3)
    assert chat.engine.eviction == expected.eviction
    assert message.content == expected.generate(AS_DICTS, max_new_tokens=8).text
    engine = chat.engine
    assert chat.engine is engine  # nothing changed: no rebuild


def test_cache_keys_cover_every_setting_that_changes_the_answer(tiny_pair):
    from langchain_draft_rag import ChatDraftRAG

    draft, target = tiny_pair
    base = {"model": target, "draft": draft, "max_tokens": 8, **SETTINGS}
    changes = {
        "model": draft, "draft": target, "method": "snapkv", "budget": 20, "window_size": 8, "max_tokens": 9,
        "temperature": 0.5, "top_p": 0.9, "stop": ["."], "seed": 3, "speckv_kwargs": {"kernel_size": 3},
    }
    keys = {ChatDraftRAG(**base)._get_llm_string()}
    for name, value in changes.items():
        keys.add(ChatDraftRAG(**{**base, name: value})._get_llm_string())
    assert len(keys) == len(changes) + 1

    # A call's own options are part of its key, and the instance's stop strings count when the call gives none.
    chat = ChatDraftRAG(**base)
    assert chat._get_llm_string(max_tokens=3) != chat._get_llm_string()
    assert ChatDraftRAG(**base, stop=["."])._get_llm_string() == chat._get_llm_string(stop=["."])

    cache = InMemoryCache()
    plain = ChatDraftRAG(**base, cache=cache)
    stopped = ChatDraftRAG(**base, stop=[plain.invoke(MESSAGES).content[2:4]], cache=cache)
    assert stopped.invoke(MESSAGES).content == ChatDraftRAG(**base, stop=stopped.stop).invoke(MESSAGES).content
    assert stopped.invoke(MESSAGES).content != plain.invoke(MESSAGES).content
    assert len(cache._cache) == 2


def test_construction_loads_no_model(tiny_pair, monkeypatch):
    from langchain_draft_rag import ChatDraftRAG

    assert_models_load_on_first_call(
        monkeypatch,
        tiny_pair,
        lambda target, draft: ChatDraftRAG(model=target, draft=draft, max_tokens=2, **SETTINGS),
        lambda chat: chat.invoke(MESSAGES),
    )


def test_batch_is_one_batched_engine_call_with_a_run_per_input(chat, monkeypatch):
    from langchain_core.callbacks import BaseCallbackHandler

    other = [HumanMessage("The lazy dog.")]
    expected = [chat.invoke(MESSAGES).content, chat.invoke(other).content, chat.invoke(MESSAGES).content]
    engine = chat.engine
    calls = []
    original = engine.generate

    def counting(prompt, **kwargs):
        calls.append(len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], list) else 1)
        return original(prompt, **kwargs)

    monkeypatch.setattr(engine, "generate", counting)

    class Runs(BaseCallbackHandler):
        def __init__(self) -> None:
            self.started, self.ended = 0, []

        def on_chat_model_start(self, *args, **kwargs) -> None:
            self.started += 1

        def on_llm_end(self, response, **kwargs) -> None:
            self.ended.append(response.generations[0][0].text)

    runs = Runs()
    answers = chat.batch([MESSAGES, other, MESSAGES], config={"callbacks": [runs]})
    assert [m.content for m in answers] == expected
    assert calls == [3]  # one engine call for the three prompts
    assert runs.started == 3 and runs.ended == expected

    calls.clear()
    batched = asyncio.run(chat.abatch([other, MESSAGES]))
    assert [m.content for m in batched] == expected[1::-1] and calls == [2]
    calls.clear()
    assert [m.content for m in chat.batch([MESSAGES, other], max_tokens=3)] == [
        chat.invoke(MESSAGES, max_tokens=3).content, chat.invoke(other, max_tokens=3).content
    ]


def test_batched_answers_go_to_prompts_that_differ_only_by_a_chat_message_role(chat, monkeypatch):
    from langchain_draft_rag import ChatDraftRAG

    instruction = "Answer with the number only."
    prompts = [[ChatMessage(role=role, content=instruction), MESSAGES[1]] for role in ("system", "user")]
    alone = [chat.invoke(prompt).content for prompt in prompts]
    assert alone[0] != alone[1], "the two roles must give different answers for this test to tell them apart"

    # The per-prompt calls run in worker threads in any order: make the second prompt take its answer first,
    # so that a key blind to the role hands it the first prompt's answer.
    second_done = threading.Event()
    original = ChatDraftRAG._generate

    def second_first(self, messages, *args, **kwargs):
        if messages[0].role == "system":
            assert second_done.wait(60), "the second prompt's call did not run"
            return original(self, messages, *args, **kwargs)
        try:
            return original(self, messages, *args, **kwargs)
        finally:
            second_done.set()

    monkeypatch.setattr(ChatDraftRAG, "_generate", second_first)
    result = asyncio.run(chat.agenerate(prompts))
    assert [generations[0].text for generations in result.generations] == alone


def test_batch_with_different_configs_or_exceptions_falls_back_per_input(chat, monkeypatch):
    engine = chat.engine
    calls = []
    original = engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompt, **kw: calls.append(1) or original(prompt, **kw))
    chat.batch([MESSAGES, MESSAGES], config=[{"tags": ["a"]}, {"tags": ["b"]}])
    assert len(calls) == 2
    calls.clear()
    out = chat.batch([MESSAGES, [HumanMessage([{"type": "image", "url": "x"}])]], return_exceptions=True)
    assert isinstance(out[1], ValueError) and len(calls) == 1


def test_prompt_budget_reaches_the_engine(tiny_pair):
    from langchain_draft_rag import ChatDraftRAG

    draft, target = tiny_pair
    chat = ChatDraftRAG(model=target, draft=draft, max_tokens=4, prompt_budget=24, **SETTINGS)
    assert chat.engine.prompt_budget == 24
    assert chat._identifying_params["prompt_budget"] == 24
    long = [HumanMessage("The quick brown fox jumps over the lazy dog. " * 12 + "\n\nWhat jumps?")]
    message = chat.invoke(long)
    assert message.response_metadata["timings"]["compress_s"] > 0

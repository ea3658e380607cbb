"""DraftRAGLLM through every LlamaIndex LLM entry point, answered by the packaged real target.

LlamaIndex has no standard test suite; these are the behaviours langchain-tests' chat-model suite checks
(``test_real_langchain_standard.py``), asked through ``complete``/``chat``, their stream and async forms and
``metadata``. Answers are greedy, so every form of a request must give the text that ``complete`` or
``chat`` gave once.
"""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, MessageRole

import tests.integrations  # noqa: F401  (puts the adapters on the path when running from a checkout)
from draft_rag import GenerationResult
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET

pytestmark = pytest.mark.real_model

MAX_NEW_TOKENS = 4
"""Enough for three words of every answer below; each token costs ~0.5 s on two CPU cores."""
PROMPT = "Hello"
"""Completion prompt: one user message under the template's default system prompt."""
CHAT = [
    ChatMessage(role=MessageRole.SYSTEM, content="Answer briefly."),
    ChatMessage(role=MessageRole.USER, content="Hello"),
]
"""Chat prompt; a short system message keeps the prompt, and so the prefill, about half as long."""


@pytest.fixture(scope="module")
def llm():
    from llama_index.llms.draft_rag import DraftRAGLLM

    # Named models: load_model keeps one copy per process, shared with every other instance in the run.
    return DraftRAGLLM(target=DEFAULT_TARGET, draft=DEFAULT_DRAFT, method="speckv", max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def completed(llm) -> CompletionResponse:
    """``complete(PROMPT)``, the answer every other form of that request must repeat."""
    return llm.complete(PROMPT)


@pytest.fixture(scope="module")
def chatted(llm) -> ChatResponse:
    """``chat(CHAT)``, the answer every other form of that request must repeat."""
    return llm.chat(CHAT)


def prompt_tokens(llm, messages: list[dict[str, str]]) -> int:
    """Length of ``messages`` in the target's chat template, counted with the target's tokenizer."""
    tokenizer = llm.engine.target.tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def same_usage(streamed: dict, whole: dict) -> bool:
    """The token counts and finish reason of two answers agree (timings differ from run to run)."""
    keys = ("prompt_tokens", "completion_tokens", "total_tokens", "finish_reason", "kv_entries_kept")
    return {k: streamed[k] for k in keys} == {k: whole[k] for k in keys}


def assert_streamed(responses: list[tuple[str, str | None, dict]]) -> None:
    """``(text, delta, usage)`` of each streamed response: text arrives in pieces, each text is the previous
    one plus its delta, and only the last response carries the usage (counted once, as LangChain's suite
    also demands of streamed chunks)."""
    assert len(responses) > 2
    so_far = ""
    for text, delta, _ in responses:
        so_far += delta or ""
        assert text == so_far
    assert not any(usage for _, _, usage in responses[:-1])
    assert responses[-1][2]["completion_tokens"] > 0


def test_metadata(llm):
    metadata = llm.metadata
    assert metadata.model_name == DEFAULT_TARGET
    assert metadata.is_chat_model is True
    assert metadata.num_output == MAX_NEW_TOKENS
    assert metadata.context_window == llm.engine.target.model.config.max_position_embeddings


def test_complete_reports_text_usage_and_raw_result(llm, completed):
    assert isinstance(completed, CompletionResponse)
    assert isinstance(completed.text, str) and completed.text.strip()
    usage = completed.additional_kwargs
    assert usage["prompt_tokens"] == prompt_tokens(llm, [{"role": "user", "content": PROMPT}])
    assert 0 < usage["completion_tokens"] <= MAX_NEW_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["finish_reason"] in ("stop", "length")
    # Below the budget nothing is evicted: the cache keeps every prompt entry.
    assert usage["kv_entries_kept"] == usage["kv_entries_full"] == usage["prompt_tokens"]
    assert isinstance(completed.raw, GenerationResult)
    assert completed.raw.text == completed.text


def test_chat_reports_an_assistant_message_with_usage(llm, chatted):
    assert isinstance(chatted, ChatResponse)
    assert chatted.message.role == MessageRole.ASSISTANT
    assert chatted.message.content and chatted.message.content.strip()
    usage = chatted.message.additional_kwargs
    as_dicts = [{"role": m.role.value, "content": m.content} for m in CHAT]
    assert usage["prompt_tokens"] == prompt_tokens(llm, as_dicts)
    assert 0 < usage["completion_tokens"] <= MAX_NEW_TOKENS
    assert isinstance(chatted.raw, GenerationResult)
    assert chatted.raw.text == chatted.message.content


def test_stream_complete_deltas_join_to_the_completion(llm, completed):
    responses = list(llm.stream_complete(PROMPT))
    assert_streamed([(r.text, r.delta, r.additional_kwargs) for r in responses])
    assert responses[-1].text == completed.text
    assert same_usage(responses[-1].additional_kwargs, completed.additional_kwargs)


def test_stream_chat_deltas_join_to_the_chat_answer(llm, chatted):
    responses = list(llm.stream_chat(CHAT))
    assert all(r.message.role == MessageRole.ASSISTANT for r in responses)
    assert_streamed([(r.message.content, r.delta, r.message.additional_kwargs) for r in responses])
    assert responses[-1].message.content == chatted.message.content
    assert same_usage(responses[-1].message.additional_kwargs, chatted.message.additional_kwargs)


async def test_acomplete_equals_complete(llm, completed):
    response = await llm.acomplete(PROMPT)
    assert isinstance(response, CompletionResponse)
    assert response.text == completed.text
    assert same_usage(response.additional_kwargs, completed.additional_kwargs)


async def test_astream_complete_deltas_join_to_the_completion(llm, completed):
    responses = [r async for r in await llm.astream_complete(PROMPT)]
    assert_streamed([(r.text, r.delta, r.additional_kwargs) for r in responses])
    assert responses[-1].text == completed.text
    assert same_usage(responses[-1].additional_kwargs, completed.additional_kwargs)


async def test_achat_equals_chat(llm, chatted):
    response = await llm.achat(CHAT)
    assert isinstance(response, ChatResponse)
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == chatted.message.content
    assert same_usage(response.message.additional_kwargs, chatted.message.additional_kwargs)


async def test_astream_chat_deltas_join_to_the_chat_answer(llm, chatted):
    responses = [r async for r in await llm.astream_chat(CHAT)]
    assert_streamed([(r.message.content, r.delta, r.message.additional_kwargs) for r in responses])
    assert responses[-1].message.content == chatted.message.content
    assert same_usage(responses[-1].message.additional_kwargs, chatted.message.additional_kwargs)


async def test_concurrent_async_calls_give_the_sequential_greedy_answers(llm, completed, chatted):
    # Two different prompts and one request asked twice, all interleaved step by step.
    completion, first, second = await asyncio.gather(llm.acomplete(PROMPT), llm.achat(CHAT), llm.achat(CHAT))
    assert completion.text == completed.text
    assert first.message.content == second.message.content == chatted.message.content


def test_max_tokens_per_call_is_honoured(llm, chatted):
    short = llm.chat(CHAT, max_tokens=2)
    assert short.message.additional_kwargs["completion_tokens"] == 2
    assert short.message.additional_kwargs["finish_reason"] == "length"
    assert chatted.message.content.startswith(short.message.content)
    assert len(short.message.content) < len(chatted.message.content)


def stop_within(answer: str) -> tuple[str, str]:
    """A stop string taken from the middle of ``answer`` (its second word), and the answer cut before it."""
    words = answer.split()
    assert len(words) > 2, f"the reference answer {answer!r} is too short to cut"
    stop = " " + words[1]
    return stop, answer[: answer.index(stop)]


def test_stop_per_call_cuts_the_answer(llm, chatted):
    stop, expected = stop_within(chatted.message.content)
    response = llm.chat(CHAT, stop=[stop])
    assert response.message.content == expected
    assert response.message.additional_kwargs["finish_reason"] == "stop"


def test_stop_set_on_the_instance_cuts_the_streamed_answer(chatted):
    from llama_index.llms.draft_rag import DraftRAGLLM

    stop, expected = stop_within(chatted.message.content)
    llm = DraftRAGLLM(target=DEFAULT_TARGET, draft=DEFAULT_DRAFT, max_new_tokens=MAX_NEW_TOKENS, stop=[stop])
    responses = list(llm.stream_chat(CHAT))
    assert "".join(r.delta or "" for r in responses) == responses[-1].message.content == expected
    assert responses[-1].message.additional_kwargs["finish_reason"] == "stop"


def test_system_message_is_followed(llm):
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Whatever the user says, reply with the word banana."),
        ChatMessage(role=MessageRole.USER, content="Hello"),
    ]
    assert "banana" in llm.chat(messages).message.content.lower()


def test_conversation_history_is_read(llm):
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Answer briefly."),
        ChatMessage(role=MessageRole.USER, content="My name is Zed."),
        ChatMessage(role=MessageRole.ASSISTANT, content="Nice to meet you."),
        ChatMessage(role=MessageRole.USER, content="What is my name?"),
    ]
    # The answer is "Your name is Zed.": the name is its fourth and fifth tokens.
    assert "Zed" in llm.chat(messages, max_tokens=6).message.content


def test_repeated_roles_in_a_row_are_accepted(llm):
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Answer briefly."),
        ChatMessage(role=MessageRole.SYSTEM, content="Answer briefly."),
        ChatMessage(role=MessageRole.USER, content="Hello"),
        ChatMessage(role=MessageRole.USER, content="Hello"),
        ChatMessage(role=MessageRole.ASSISTANT, content="Hi!"),
        ChatMessage(role=MessageRole.ASSISTANT, content="Hi!"),
        ChatMessage(role=MessageRole.USER, content="How are you?"),
    ]
    response = llm.chat(messages)
    assert response.message.content and response.message.content.strip()
    assert response.message.additional_kwargs["prompt_tokens"] == prompt_tokens(
        llm, [{"role": m.role.value, "content": m.content} for m in messages]
    )

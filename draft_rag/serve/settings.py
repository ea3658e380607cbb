"""What the gateway is told: the upstream, where to listen, SpecPC's budget and draft, limits and timeouts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from draft_rag.models import DEFAULT_DRAFT

SETTINGS_ENV = "DRAFT_RAG_SERVE_SETTINGS"
"""Environment variable through which ``--workers N`` hands the settings (as JSON) to each worker process."""


@dataclass(frozen=True)
class GatewaySettings:
    """Settings of ``draft-rag serve``, checked when made.

    Args:
        upstream: base URL of the OpenAI-compatible server the gateway forwards to, with its version path, e.g.
            ``"http://127.0.0.1:8080/v1"``; ``POST /v1/chat/completions`` goes to ``{upstream}/chat/completions``.
        host: address to listen on (``"127.0.0.1"``: this machine only; ``"0.0.0.0"`` for every interface).
        port: port to listen on (8100, beside servers on 8000 and 8080; 0 picks a free one).
        budget: tokens of document text SpecPC keeps per request (1024) unless the request asks for another.
        draft: SpecPC's draft model: a packaged name, a Hugging Face id or path, or a ``.gguf`` file.
        dtype, device: how and where the draft runs (default: SpecPC's choice for the hardware).
        cache_dir: keep the draft's per-document K/V in this directory (None: in memory only). Every worker and
            gateway process that names the same directory shares it.
        workers: gateway processes serving the port (1); each loads its own draft.
        api_key: the key clients must send as ``Authorization: Bearer <key>`` (None: no check). When set, the
            client's ``Authorization`` is the gateway's and is not forwarded.
        upstream_api_key: sent to the upstream as ``Authorization: Bearer <key>`` in place of the client's.
        target_tokenizer: tokenizer (name or path) of the upstream's model, so budgets count its tokens (None:
            the draft's tokens).
        max_request_bytes: largest request body accepted (16 MiB); larger ones get 413.
        queue_size: most compressions waiting or running at once (64); more get 503 with ``Retry-After``.
        connect_timeout: seconds to open a connection to the upstream (10) before answering 504.
        read_timeout: seconds to wait for the upstream's next bytes (600; a long answer on a slow server may
            need more before its first byte) before answering 504.
        max_connections: most open connections to the upstream (100); a request waits up to
            ``connect_timeout`` for a free one.
    """

    upstream: str
    host: str = "127.0.0.1"
    port: int = 8100
    budget: int = 1024
    draft: str = DEFAULT_DRAFT
    dtype: str | None = None
    device: str | None = None
    cache_dir: str | None = None
    workers: int = 1
    api_key: str | None = field(default=None, repr=False)
    upstream_api_key: str | None = field(default=None, repr=False)
    target_tokenizer: str | None = None
    max_request_bytes: int = 16 << 20
    queue_size: int = 64
    connect_timeout: float = 10.0
    read_timeout: float = 600.0
    max_connections: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "upstream", _check_upstream(self.upstream))
        for name, minimum in (("port", 0), ("budget", 1), ("workers", 1), ("max_request_bytes", 1),
                              ("queue_size", 1), ("max_connections", 1)):
            _check_int(name, getattr(self, name), minimum)
        if self.port > 65535:
            msg = f"port must be at most 65535, got {self.port}."
            raise ValueError(msg)
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                msg = f"{name} must be a positive number of seconds, got {value!r}."
                raise ValueError(msg)
        for name in ("host", "draft"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                msg = f"{name} must be a non-empty string, got {getattr(self, name)!r}."
                raise ValueError(msg)
        for name in ("api_key", "upstream_api_key"):
            value = getattr(self, name)
            # Checked without echoing the value: a key must never reach a log or a terminal.
            if value is not None and (not isinstance(value, str) or not value or value != value.strip()
                                      or not value.isprintable()):
                msg = f"{name} must be a non-empty string of printable characters without surrounding spaces."
                raise ValueError(msg)

    def to_json(self) -> str:
        """The settings as JSON, keys included (for :data:`SETTINGS_ENV`; never log it)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GatewaySettings:
        """Settings from :meth:`to_json`'s output."""
        values: dict[str, Any] = json.loads(text)
        return cls(**values)

    @classmethod
    def from_environment(cls) -> GatewaySettings:
        """Settings from :data:`SETTINGS_ENV`, where ``draft-rag serve --workers N`` puts them."""
        text = os.environ.get(SETTINGS_ENV)
        if not text:
            msg = f"{SETTINGS_ENV} is not set; start the gateway with `draft-rag serve --upstream URL`."
            raise ValueError(msg)
        return cls.from_json(text)


def _check_int(name: str, value: object, minimum: int) -> None:
    # Not draft_rag.scoring.check_int: that module imports torch, and the settings load before any model.
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{name} must be an integer >= {minimum}, got {value!r}."
        raise TypeError(msg)
    if value < minimum:
        msg = f"{name} must be >= {minimum}, got {value}."
        raise ValueError(msg)


def _check_upstream(url: object) -> str:
    """The upstream URL without a trailing slash, or a ValueError that shows the expected form."""
    example = "e.g. http://127.0.0.1:8080/v1"
    if not isinstance(url, str):
        msg = f"upstream must be a URL string ({example}), got {url!r}."
        raise ValueError(msg)
    parts = urlsplit(url.strip())
    # Checked first and without echoing the URL, which would carry the credentials into a log.
    if parts.query or parts.fragment or parts.username or parts.password:
        msg = (f"upstream must be a plain base URL without query, fragment or credentials ({example}); pass a key "
               "with --upstream-api-key.")
        raise ValueError(msg)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        msg = f"upstream must be an http:// or https:// URL with a host ({example}), got {url!r}."
        raise ValueError(msg)
    return url.strip().rstrip("/")

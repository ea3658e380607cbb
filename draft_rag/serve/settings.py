"""What the server is told: its mode (gateway or engine), where to listen, SpecPC's budget and draft, the engine's
SpecKV settings, limits and timeouts."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from draft_rag.checks import check_candidate_factors
from draft_rag.models import DEFAULT_DRAFT
from draft_rag.specpc import OBSERVE_FROM

SETTINGS_ENV = "DRAFT_RAG_SERVE_SETTINGS"
"""Environment variable through which ``--workers N`` hands the settings (as JSON) to each worker process."""

UPSTREAM_SETTINGS = ("upstream_api_key", "target_tokenizer", "connect_timeout", "read_timeout", "max_connections")
"""Settings of gateway mode only: they describe the upstream server."""

ENGINE_SETTINGS = ("method", "kv_budget", "lookahead_tokens", "max_batch_size", "max_tokens")
"""Settings of engine mode only: they describe the server's own generation."""


@dataclass(frozen=True)
class GatewaySettings:
    """Settings of ``draft-rag serve``, checked when made.

    The server runs in one of two modes, chosen by giving exactly one of ``upstream`` and ``target``: gateway
    mode forwards each request, its documents compressed, to ``upstream``; engine mode answers it with its own
    ``target`` model and SpecKV, batching requests as they arrive (:mod:`draft_rag.serve.engine`). A setting of
    the other mode (:data:`UPSTREAM_SETTINGS`, :data:`ENGINE_SETTINGS`) set to other than its default is an
    error.

    Args:
        upstream: gateway mode: base URL of the OpenAI-compatible server the gateway forwards to, with its version
            path, e.g. ``"http://127.0.0.1:8080/v1"``; ``POST /v1/chat/completions`` goes to
            ``{upstream}/chat/completions``.
        host: address to listen on (``"127.0.0.1"``: this machine only; ``"0.0.0.0"`` for every interface).
        port: port to listen on (8100, beside servers on 8000 and 8080; 0 picks a free one).
        budget: tokens of document text SpecPC keeps per request (1024) unless the request asks for another.
        observe_from: which draft queries score the documents (:attr:`draft_rag.SpecPC.observe_from`):
            ``"question"`` (default), the question's own tokens and the chat template's end, or ``"window"``
            (SpecPC's default when it reads the documents jointly), the last 64 prompt positions, which also hold
            the last document's tail; ``"auto"`` is ``"question"`` here, since the gateway always reads the
            documents apart, over its cache. Over a
            warm draft cache the draft runs only over the observers, so ``"question"`` costs about 40% less
            per request, and on the tuning seed it kept more answers (see the gateway guide).
        rescore_factor: ``0`` (default): select from the draft's reading over the warm cache. ``k >= 2``: pick
            candidates at ``k`` times the budget from it, and the budget among them from one more draft pass over
            their text, without the cache (:attr:`draft_rag.SpecPC.rescore_factor`): closer to reading the
            documents together, for a draft pass over about ``k`` times the budget per request.
        recompute_factor: ``0`` (default): as above. ``k >= 2``: pick candidates at ``k`` times the budget, compute
            their draft K/V again in context over the cache and let the question read once more, picking the budget
            among them (:attr:`draft_rag.SpecPC.recompute_factor`): the documents before each candidate are read
            with it, for a draft forward over ``k`` times the budget per request. At most one of the two factors.
        draft: SpecPC's draft model (and in engine mode SpecKV's): a packaged name, a Hugging Face id or path, or
            a ``.gguf`` file.
        dtype, device: how and where the draft (and in engine mode the target) runs (default: the library's
            choice for the hardware).
        cache_dir: keep the draft's per-document K/V in this directory (None: in memory only). Every worker and
            gateway process that names the same directory shares it.
        workers: gateway processes serving the port (1); each loads its own draft. Engine mode serves from one
            process (batching, not processes, serves concurrent requests there).
        api_key: the key clients must send as ``Authorization: Bearer <key>`` (None: no check). When set, the
            client's ``Authorization`` is the gateway's and is not forwarded.
        upstream_api_key: sent to the upstream as ``Authorization: Bearer <key>`` in place of the client's.
        target_tokenizer: tokenizer (name or path) of the upstream's model, so budgets count its tokens (None:
            the draft's tokens).
        max_request_bytes: largest request body accepted (16 MiB); larger ones get 413.
        queue_size: most compressions waiting or running at once (64), and in engine mode also most generations
            waiting or running; more get 503 with ``Retry-After``.
        connect_timeout: seconds to open a connection to the upstream (10) before answering 504.
        read_timeout: seconds to wait for the upstream's next bytes (600; a long answer on a slow server may
            need more before its first byte) before answering 504.
        max_connections: most open connections to the upstream (100); a request waits up to
            ``connect_timeout`` for a free one.
        target: engine mode: the model that answers, a packaged name, Hugging Face id, path or ``.gguf`` file;
            ``/v1/models`` lists it by this name.
        method: engine mode's KV-cache method: ``"speckv"`` (default), ``"snapkv"``, ``"streamingllm"`` or
            ``"full"`` (see :class:`~draft_rag.SpecKV`).
        kv_budget: prompt KV entries kept per layer and KV head (256) unless a request asks for another.
        lookahead_tokens: the SpecKV draft answer's length (None: up to each request's ``max_tokens``) unless a
            request asks for another.
        max_batch_size: most requests answered together in one batched engine call (16).
        max_tokens: completion tokens of a request that does not say (256).
    """

    upstream: str | None = None
    host: str = "127.0.0.1"
    port: int = 8100
    budget: int = 1024
    observe_from: str = "question"
    rescore_factor: int = 0
    recompute_factor: int = 0
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
    target: str | None = None
    method: str = "speckv"
    kv_budget: int = 256
    lookahead_tokens: int | None = None
    max_batch_size: int = 16
    max_tokens: int = 256

    def __post_init__(self) -> None:
        if (self.upstream is None) == (self.target is None):
            msg = ("give exactly one of upstream (--upstream URL: forward to an OpenAI-compatible server, gateway "
                   "mode) and target (--target NAME: answer with a local model and SpecKV, engine mode)"
                   f"{', not both' if self.target is not None else ''}.")
            raise ValueError(msg)
        if self.upstream is not None:
            object.__setattr__(self, "upstream", _check_upstream(self.upstream))
        check_mode(self.engine_mode, [f.name for f in fields(self) if getattr(self, f.name) != f.default])
        for name, minimum in (("port", 0), ("budget", 1), ("workers", 1), ("max_request_bytes", 1),
                              ("queue_size", 1), ("max_connections", 1), ("kv_budget", 1), ("max_batch_size", 1),
                              ("max_tokens", 1)):
            _check_int(name, getattr(self, name), minimum)
        if self.lookahead_tokens is not None:
            _check_int("lookahead_tokens", self.lookahead_tokens, 1)
        for name in ("rescore_factor", "recompute_factor"):
            _check_int(name, getattr(self, name), 0)
        check_candidate_factors(self.rescore_factor, self.recompute_factor,
                                how=" (--rescore-factor or --recompute-factor)")
        if self.observe_from not in OBSERVE_FROM:
            msg = f"observe_from must be one of {', '.join(map(repr, OBSERVE_FROM))}, got {self.observe_from!r}."
            raise ValueError(msg)
        if self.port > 65535:
            msg = f"port must be at most 65535, got {self.port}."
            raise ValueError(msg)
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                msg = f"{name} must be a positive number of seconds, got {value!r}."
                raise ValueError(msg)
        for name in ("host", "draft", *(("target",) if self.engine_mode else ())):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                msg = f"{name} must be a non-empty string, got {getattr(self, name)!r}."
                raise ValueError(msg)
        if self.engine_mode:
            self._check_engine()
        for name in ("api_key", "upstream_api_key"):
            value = getattr(self, name)
            # Checked without echoing the value: a key must never reach a log or a terminal.
            if value is not None and (not isinstance(value, str) or not value or value != value.strip()
                                      or not value.isprintable()):
                msg = f"{name} must be a non-empty string of printable characters without surrounding spaces."
                raise ValueError(msg)

    @property
    def engine_mode(self) -> bool:
        """Whether the server answers with its own ``target`` (engine mode) rather than an upstream's."""
        return self.target is not None

    def _check_engine(self) -> None:
        """Engine mode's own checks: one process, and a method that takes ``kv_budget``."""
        if self.workers != 1:
            msg = (f"workers must be 1 in engine mode (--target), got {self.workers}: each worker would load its "
                   "own copy of the target, and batching, not processes, serves concurrent requests there.")
            raise ValueError(msg)
        # Engine mode runs torch anyway; the gateway's settings load without it.
        from draft_rag.engine import build_eviction

        try:
            build_eviction(self.method, budget=self.kv_budget, lookahead_tokens=self.lookahead_tokens)
        except ValueError as error:
            msg = f"method {self.method!r} with kv_budget {self.kv_budget}: {error}"
            raise ValueError(msg) from None

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
            msg = f"{SETTINGS_ENV} is not set; start the gateway with `draft-rag serve --upstream URL --workers N`."
            raise ValueError(msg)
        return cls.from_json(text)


def check_mode(engine_mode: bool, given: Iterable[str]) -> None:
    """Raise a ValueError naming the first setting in ``given`` that belongs to the other mode (its flag too).

    ``draft-rag serve`` calls it with the options given on its command line, and the settings with those that
    differ from their defaults.
    """
    if engine_mode:
        other, needs = UPSTREAM_SETTINGS, "an upstream server (--upstream URL, gateway mode), not with --target"
    else:
        other, needs = ENGINE_SETTINGS, "the server's own model (--target NAME, engine mode), not with --upstream"
    wrong = next((name for name in given if name in other), None)
    if wrong is not None:
        msg = f"{wrong} (--{wrong.replace('_', '-')}) applies only with {needs}."
        raise ValueError(msg)


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

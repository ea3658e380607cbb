"""SpecPC off the event loop: one compression thread per gateway process, behind a bounded queue.

Compressions run one at a time in a worker thread: the draft's forward passes take turns on the model's lock
anyway, and one at a time keeps each request's cache hits and misses exact (they are read from the shared
:class:`~draft_rag.DraftCache` counters before and after). Streams and passthrough requests never wait for
it; several processes (``--workers``) compress in parallel. At most ``queue_size`` compressions wait or run
at once; the next request gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from draft_rag.serve.protocol import GatewayError

if TYPE_CHECKING:
    from draft_rag import SpecPC

logger = logging.getLogger("draft_rag.serve")

K = TypeVar("K")
V = TypeVar("V")

BUDGETS_KEPT = 8
"""Per-request budgets other than the default whose compressors are kept (they share the loaded draft)."""


def kept_recent(store: OrderedDict[K, V], key: K, limit: int, make: Callable[[], V]) -> V:
    """``store[key]``, made by ``make()`` if missing, as the most recent of the ``limit`` entries ``store`` keeps
    (the least recently used one is dropped). The caller holds whatever lock guards ``store``."""
    value = store.pop(key, None)
    if value is None:
        value = make()
    store[key] = value
    while len(store) > limit:
        store.popitem(last=False)
    return value


@dataclass(frozen=True)
class CompressionStats:
    """What one request's compression did."""

    context_tokens_before: int
    """Tokens of document text received (in the budget's tokenizer)."""
    context_tokens_after: int
    """Tokens of document text sent on, elision markers included."""
    compress_s: float
    """Seconds SpecPC took, queueing excluded."""
    cache_hits: int
    """Draft cache lookups answered from memory or disk."""
    cache_misses: int
    """Draft cache lookups that ran the draft over a document."""

    def as_dict(self) -> dict[str, int | float]:
        """The ``draft_rag`` object added to a non-streamed response."""
        return {**dataclasses.asdict(self), "compress_s": round(self.compress_s, 4)}

    def headers(self) -> dict[str, str]:
        """The ``X-Draft-RAG-*`` response headers, e.g. ``X-Draft-RAG-Context-Tokens-Before``."""
        return {"X-Draft-RAG-" + "-".join(word.capitalize() if word != "s" else "S" for word in name.split("_")):
                str(value) for name, value in self.as_dict().items()}


class Compression:
    """Runs ``specpc`` in a worker thread for the gateway's requests.

    Args:
        specpc: the compressor; its ``budget`` is the default, a request may ask for another.
        queue_size: most compressions waiting or running at once.
    """

    def __init__(self, specpc: SpecPC, queue_size: int) -> None:
        self.specpc = specpc
        self.queue_size = queue_size
        self.loaded = threading.Event()
        self.load_error: str | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-rag-compress")
        self._lock = threading.Lock()
        self._pending = 0
        self._mean_s = 1.0
        self._by_budget: OrderedDict[int, SpecPC] = OrderedDict()

    @property
    def pending(self) -> int:
        """Compressions waiting or running now."""
        return self._pending

    def start_loading(self, load_first: Callable[[SpecPC], SpecPC] | None = None) -> Future[None]:
        """Load the draft in the worker thread (the first job: compressions queue behind it).

        ``load_first`` runs before, in the same job: it loads what else the app serves (engine mode's target)
        and returns the compressor to use from then on (one that counts budgets in the target's tokens).
        ``loaded`` is set once both are done; a failure of either is ``load_error``.
        """
        return self._executor.submit(self._load, load_first)

    def _load(self, load_first: Callable[[SpecPC], SpecPC] | None) -> None:
        try:
            if load_first is not None:
                self.specpc = load_first(self.specpc)
            draft = self.specpc.load()
            if self.specpc.reading == "apart":
                # The draft cache's key hashes every weight (about a second for a 0.5B draft), once per loaded
                # model: here, before /health reports ready, instead of in the first request's compression.
                from draft_rag.draft_cache import model_fingerprint

                model_fingerprint(draft.model)
        except Exception as error:  # noqa: BLE001 (reported by /health and to each request that needs a model)
            self.load_error = f"{type(error).__name__}: {error}"
            logger.error("the models could not be loaded: %s", self.load_error)
            return
        self.loaded.set()
        logger.info("draft model loaded: %s", self.specpc.load().dtype_name)

    async def compress(
        self, question: str, documents: Sequence[str], budget: int | None = None
    ) -> tuple[list[str], CompressionStats]:
        """``documents`` compressed for ``question`` to ``budget`` tokens (default: the SpecPC's budget).

        Raises:
            GatewayError: 503 when the queue is full or the draft failed to load; 400 when SpecPC rejects the
                input (e.g. the prompt exceeds the draft's context length).
        """
        if self.load_error is not None:
            message = f"The draft model could not be loaded ({self.load_error}); see the gateway's log."
            raise GatewayError(503, message, type="server_error", code="draft_unavailable")
        with self._lock:
            if self._pending >= self.queue_size:
                retry = max(1, math.ceil(self._mean_s * self._pending))
                message = f"The gateway is compressing {self._pending} requests already; retry in {retry} s."
                raise GatewayError(503, message, type="server_error", code="overloaded",
                                   headers={"Retry-After": str(retry)})
            self._pending += 1
        job = self._executor.submit(self._compress, question, list(documents), budget)
        # Released when the job ends, or is cancelled before it starts (its client went away while it waited).
        job.add_done_callback(self._release)
        return await asyncio.wrap_future(job)

    def _release(self, _: Future[tuple[list[str], CompressionStats]]) -> None:
        with self._lock:
            self._pending -= 1

    def _compress(self, question: str, documents: list[str], budget: int | None) -> tuple[list[str], CompressionStats]:
        cache = self.specpc.cache
        before = cache.stats if cache is not None else None
        try:
            result = self._for_budget(budget).compress(question, documents)
        except (ValueError, TypeError, NotImplementedError) as error:
            raise GatewayError(400, f"The documents cannot be compressed: {error}", param="documents",
                               code="invalid_documents") from None
        after = cache.stats if cache is not None else None
        self._mean_s = 0.8 * self._mean_s + 0.2 * result.seconds
        stats = CompressionStats(
            context_tokens_before=result.total_original_tokens,
            context_tokens_after=result.total_kept_tokens,
            compress_s=result.seconds,
            cache_hits=after.hits - before.hits if after and before else 0,
            cache_misses=after.misses - before.misses if after and before else 0,
        )
        return result.texts, stats

    def _for_budget(self, budget: int | None) -> SpecPC:
        """The compressor for ``budget``: the default one, or a copy sharing its loaded draft and cache."""
        if budget is None or budget == self.specpc.budget:
            return self.specpc
        return kept_recent(self._by_budget, budget, BUDGETS_KEPT,
                           lambda: dataclasses.replace(self.specpc, budget=budget, draft=self.specpc.load()))

    def close(self) -> None:
        """Stop the worker thread: queued compressions are cancelled, a running one finishes on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)

"""Engine mode: the server answers with its own target model and SpecKV, batching requests as they arrive.

``draft-rag serve --target NAME --method speckv`` serves the target behind the gateway's OpenAI-compatible API.
A request's documents are compressed with SpecPC first, exactly as in gateway mode (the app's compression step);
then its messages are prepared (checked and tokenized by :meth:`~draft_rag.SpecKV.prepare`, off the event loop,
so a bad request is refused on its own) and wait for the scheduler.

**Dynamic batching.** One scheduler thread runs the engine. Whenever it is free it takes the oldest waiting
request and the other waiting requests with the same SpecKV settings, in arrival order, up to
``max_batch_size``, and answers them in one batched call (:meth:`~draft_rag.SpecKV.run_prepared`: each prompt's
draft answer, prefill and eviction one after another, then one decode step for all rows per token). Requests
that arrive while a batch runs wait and form the next one; a running batch takes no new rows (its batched decode
has a fixed set of rows, which leave it as they finish).

**Per-request settings.** The decoding fields (``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``)
may differ within a batch: every row decodes with its own. The SpecKV settings (``draft_rag.kv_budget``,
``draft_rag.lookahead_tokens``) decide the eviction, which one engine call runs with one setting, so requests
that ask for different ones go to separate batches (one engine per setting, all over the same loaded models).
The oldest waiting request's setting always goes next, so no setting starves.

**Streams never block one another.** The scheduler hands each text piece to the request's own unbounded queue
on the event loop (``call_soon_threadsafe``) and never waits for a reader: a client that reads slowly, or not at
all, holds only its own queue (at most ``max_tokens`` pieces), never the model. A client that goes away cancels
its request: it leaves the queue if it waits, and its batch at the next decode step if it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from starlette.responses import JSONResponse, Response

from draft_rag.serve.compression import CompressionStats, kept_recent
from draft_rag.serve.metrics import Metrics
from draft_rag.serve.protocol import (
    ChatCompletionRequest,
    DraftRAGOptions,
    ErrorResponse,
    GatewayError,
    parse_generation,
)
from draft_rag.serve.settings import GatewaySettings
from draft_rag.serve.streams import WatchedStream

if TYPE_CHECKING:
    from draft_rag import SpecKV, SpecPC
    from draft_rag.engine import GenerationResult, PreparedPrompt
    from draft_rag.models import LoadedModel

logger = logging.getLogger("draft_rag.serve")

ENGINES_KEPT = 8
"""SpecKV settings whose engines are kept (they share the loaded models, so making one again is cheap)."""


@dataclass(frozen=True)
class KVSettings:
    """A request's SpecKV settings; requests with equal ones can share a batch."""

    budget: int
    lookahead_tokens: int | None


@dataclass(frozen=True)
class EngineRequest:
    """What engine mode reads of a request before any compute."""

    kv: KVSettings
    decoding: dict[str, Any]
    """The keyword arguments of :meth:`~draft_rag.SpecKV.prepare`: ``max_new_tokens``, ``temperature``..."""
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class Finished:
    """A request's generation is done."""

    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    """A request's batch failed (or the server shut down before it ran)."""

    error: BaseException


Answer = str | Finished | Failed
"""What the scheduler hands a request: a text piece (streams only), then its end."""


@dataclass(eq=False)
class Job:
    """One request in the scheduler, and the queue on its event loop that its answer comes back through.

    The queue is unbounded: the scheduler never waits for the request's reader.
    """

    kv: KVSettings
    prepared: PreparedPrompt
    streams: bool
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    answers: asyncio.Queue[Answer] = field(default_factory=asyncio.Queue)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    batch_size: int = 0
    """Requests in the batch that answered this one (set when the batch starts)."""
    done: bool = False
    """Set on the event loop once the request's end was read."""

    def deliver(self, item: Answer) -> None:
        """Hand ``item`` to the request, from the scheduler's thread; never waits."""
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.answers.put_nowait, item)


class Scheduler:
    """Dynamic batching: one thread takes the waiting requests in batches and runs each through its engine.

    Args:
        engine_for: the engine for a SpecKV setting.
        max_batch_size: most requests per batch.
        on_batch: called with each batch's size as it starts (for the metrics).
    """

    def __init__(
        self, engine_for: Callable[[KVSettings], SpecKV], max_batch_size: int, on_batch: Callable[[int], None]
    ) -> None:
        self._engine_for = engine_for
        self.max_batch_size = max_batch_size
        self._on_batch = on_batch
        self._condition = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self.mean_batch_s = 1.0
        """Seconds a batch takes, a moving average (for ``Retry-After``)."""

    @property
    def waiting(self) -> int:
        """Requests waiting for a batch."""
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests in the batch running now."""
        return len(self._running)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="draft-rag-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job`` for the next batch it fits."""
        with self._condition:
            if self._closed:
                raise GatewayError(503, "The server is shutting down.", type="server_error", code="shutting_down")
            self._waiting.append(job)
            self._condition.notify()

    def withdraw(self, job: Job) -> None:
        """Cancel ``job``: it leaves the queue if it waits, and its batch at the next decode step if it runs."""
        job.prepared.cancelled = True
        with self._condition:
            if job in self._waiting:
                self._waiting.remove(job)

    def close(self, seconds: float = 5.0) -> None:
        """Stop: waiting requests get 503, the running batch is cancelled (it ends at its next decode step)."""
        with self._condition:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            for job in self._running:
                job.prepared.cancelled = True
            self._condition.notify_all()
        for job in waiting:
            job.deliver(Failed(GatewayError(503, "The server is shutting down.", type="server_error",
                                            code="shutting_down")))
        if self._thread is not None:
            self._thread.join(seconds)

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting request and the waiting ones with its SpecKV settings, in arrival order, up to
        ``max_batch_size``; None once closed."""
        with self._condition:
            while not self._waiting and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            kv = self._waiting[0].kv
            batch = [job for job in self._waiting if job.kv == kv][: self.max_batch_size]
            taken = {id(job) for job in batch}
            self._waiting = deque(job for job in self._waiting if id(job) not in taken)
            self._running = batch
            return batch

    def _serve(self) -> None:
        while (batch := self._next_batch()) is not None:
            began = time.perf_counter()
            try:
                self._run(batch)
            finally:
                with self._condition:
                    self._running = []
            self.mean_batch_s = 0.8 * self.mean_batch_s + 0.2 * (time.perf_counter() - began)

    def _run(self, batch: list[Job]) -> None:
        """One batched engine call; each piece and each end goes to its request as soon as it is known.

        A batch that fails before its decoding starts (while a prompt's draft answer or prefill runs) is answered
        again one request at a time, so that a request the engine cannot answer fails alone.
        """
        self._on_batch(len(batch))
        for job in batch:
            job.batch_size = len(batch)
        decoding = False
        try:
            run = self._engine_for(batch[0].kv).run_prepared([job.prepared for job in batch])
            while True:
                index, piece = next(run)
                decoding = True
                if batch[index].streams:
                    batch[index].deliver(piece)
        except StopIteration as done:
            for job, result in zip(batch, done.value, strict=True):
                job.deliver(Finished(result))
        except Exception as error:  # noqa: BLE001 (handed to the requests; the log has the traceback)
            if len(batch) > 1 and not decoding:
                logger.warning("a batch of %d requests failed before decoding (%s: %s); answering them one at a time",
                               len(batch), type(error).__name__, error)
                for job in batch:
                    self._run([job])
                return
            logger.exception("a batch of %d requests failed", len(batch))
            for job in batch:
                job.deliver(Failed(error))


class EngineMode:
    """Engine mode's part of the app: the target, one engine per SpecKV setting, the scheduler, the answers.

    Args:
        settings: the server's settings (engine mode).
        metrics: the app's metrics, to which engine mode's are added.
        target: the target to serve instead of loading ``settings.target`` (e.g. one already loaded).
    """

    def __init__(self, settings: GatewaySettings, metrics: Metrics, target: LoadedModel | None = None) -> None:
        if settings.target is None:
            msg = "EngineMode needs engine mode's settings (a target), not gateway mode's."
            raise ValueError(msg)
        self.settings = settings
        self.model_id = settings.target
        self.metrics = metrics
        self._given_target = target
        self.target: LoadedModel | None = None
        self.draft: LoadedModel | None = None
        self._engines: OrderedDict[KVSettings, SpecKV] = OrderedDict()
        self._lock = threading.Lock()
        self.scheduler = Scheduler(self.engine_for, settings.max_batch_size, metrics.batch)
        metrics.add_engine(lambda: self.scheduler.waiting, lambda: self.scheduler.running)
        self.created = int(time.time())

    def load(self, specpc: SpecPC) -> SpecPC:
        """Load the target and the draft, make the default engine, start the scheduler.

        Returns the compressor for the app from now on: ``specpc`` over the same loaded draft, counting budgets in
        the target's tokens (unless it was given a tokenizer to count in).
        """
        from draft_rag.models import load_model

        given = self._given_target
        self.target = load_model(given if given is not None else self.model_id, device=self.settings.device,
                                 dtype=self.settings.dtype)
        self.draft = specpc.load()
        self.engine_for(KVSettings(self.settings.kv_budget, self.settings.lookahead_tokens))
        self.scheduler.start()
        logger.info("engine mode: %s with %s, kv budget %d, batches of up to %d", self.target.name,
                    self.settings.method, self.settings.kv_budget, self.settings.max_batch_size)
        if specpc.target_tokenizer is not None:
            return specpc
        return dataclasses.replace(specpc, draft=self.draft, target_tokenizer=self.target.tokenizer)

    def engine_for(self, kv: KVSettings) -> SpecKV:
        """The engine for ``kv``, made on first use over the loaded models (the latest :data:`ENGINES_KEPT` are
        kept). Raises ValueError for settings the method refuses (e.g. a budget below its window)."""
        from draft_rag import SpecKV

        if self.target is None or self.draft is None:
            msg = "engine mode has not loaded its models yet."
            raise RuntimeError(msg)
        target, draft = self.target, self.draft
        with self._lock:
            return kept_recent(self._engines, kv, ENGINES_KEPT, lambda: SpecKV(
                target=target, draft=draft, method=self.settings.method, budget=kv.budget,
                lookahead_tokens=kv.lookahead_tokens))

    def models(self) -> dict[str, Any]:
        """The ``GET /v1/models`` answer: the target."""
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": self.created,
                                            "owned_by": "draft-rag"}]}

    def check(self, data: dict[str, Any], parsed: ChatCompletionRequest) -> EngineRequest:
        """What engine mode reads of a request; a 400 for a malformed or unsupported field, before any compute."""
        fields = parse_generation(data)
        options = parsed.draft_rag or DraftRAGOptions()
        kv = KVSettings(options.kv_budget or self.settings.kv_budget,
                        options.lookahead_tokens or self.settings.lookahead_tokens)
        decoding = {
            "max_new_tokens": fields.max_completion_tokens or fields.max_tokens or self.settings.max_tokens,
            "temperature": fields.temperature or 0.0,
            "top_p": 1.0 if fields.top_p is None else fields.top_p,
            "stop": fields.stop,
            "seed": fields.seed,
        }
        include_usage = fields.stream_options is not None and fields.stream_options.include_usage
        return EngineRequest(kv, decoding, bool(parsed.stream), include_usage)

    async def answer(
        self, request: EngineRequest, messages: list[Any], stats: CompressionStats | None, headers: dict[str, str]
    ) -> Response:
        """Answer ``messages`` (documents already compressed): queue them for a batch, then stream or return the
        answer. ``stats`` are the compression's figures, ``headers`` go on the response."""
        prepared = await anyio.to_thread.run_sync(self._prepare, request, messages)
        job = Job(request.kv, prepared, streams=request.stream)
        self._admit(job)
        if request.stream:
            return EngineStream(self, job, request, stats, headers)
        try:
            result = await self._result(job)
        finally:
            if not job.done:  # this handler was cancelled: nobody will read the answer
                self.scheduler.withdraw(job)
        return JSONResponse(self.completion(job, result, stats), headers=headers)

    def _prepare(self, request: EngineRequest, messages: list[Any]) -> PreparedPrompt:
        """The request's prompt, checked and tokenized (in a worker thread), or a 400 that says what is wrong."""
        try:
            engine = self.engine_for(request.kv)
        except ValueError as error:
            raise GatewayError(400, f"The SpecKV settings cannot be used: {error}", param="draft_rag.kv_budget",
                               code="invalid_value") from None
        try:
            prepared = engine.prepare(messages, **request.decoding, name="messages")
        except (ValueError, TypeError, NotImplementedError) as error:
            raise GatewayError(400, f"The messages cannot be answered: {error}", param="messages",
                               code="invalid_value") from None
        wanted = request.decoding["max_new_tokens"]
        context = engine.target.max_context
        if prepared.prompt_tokens + wanted > context:
            message = (f"The prompt takes {prepared.prompt_tokens} tokens and max_tokens asks for {wanted} more, over "
                       f"the target's context of {context} tokens; lower max_tokens or shorten the messages.")
            raise GatewayError(400, message, param="max_tokens", code="context_length_exceeded")
        return prepared

    def _admit(self, job: Job) -> None:
        """Queue ``job``, or 503 with ``Retry-After`` when ``queue_size`` requests already wait or run."""
        scheduler = self.scheduler
        pending = scheduler.waiting + scheduler.running
        if pending >= self.settings.queue_size:
            retry = max(1, math.ceil(scheduler.mean_batch_s * (1 + scheduler.waiting / scheduler.max_batch_size)))
            message = f"The server has {pending} requests waiting or running already; retry in {retry} s."
            raise GatewayError(503, message, type="server_error", code="overloaded",
                               headers={"Retry-After": str(retry)})
        scheduler.submit(job)

    async def _result(self, job: Job) -> GenerationResult:
        """The end of a request that does not stream (its pieces are not sent)."""
        while True:
            item = await job.answers.get()
            if not isinstance(item, str):
                return self.ended(job, item)

    def ended(self, job: Job, item: Finished | Failed) -> GenerationResult:
        """The result of a request whose end ``item`` was read, or the error to answer with."""
        job.done = True
        if isinstance(item, Failed):
            if isinstance(item.error, GatewayError):
                raise item.error
            raise GatewayError(500, "The engine failed on this request's batch; the server's log has the details.",
                               type="server_error", code="generation_failed")
        result = item.result
        self.metrics.generated(result.prompt_tokens, result.completion_tokens)
        return result

    def completion(self, job: Job, result: GenerationResult, stats: CompressionStats | None) -> dict[str, Any]:
        """The ``chat.completion`` object of a request that does not stream."""
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                  "finish_reason": result.finish_reason}
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": self.model_id,
                "choices": [choice], "usage": _usage(result), "draft_rag": self.figures(job, result, stats)}

    def chunk(self, job: Job, delta: Mapping[str, Any], finish_reason: str | None = None,
              **extra: Any) -> dict[str, Any]:
        """One ``chat.completion.chunk`` object of a stream."""
        choice = {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}
        return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": self.model_id,
                "choices": [choice], **extra}

    def figures(self, job: Job, result: GenerationResult, stats: CompressionStats | None) -> dict[str, Any]:
        """The ``draft_rag`` object: the compression's figures (when documents were compressed) and the engine's."""
        return {
            **(stats.as_dict() if stats is not None else {}),
            "method": self.settings.method,
            "kv_budget": job.kv.budget,
            "kv_entries_kept": result.kv_entries_kept,
            "kv_entries_full": result.kv_entries_full,
            "batch_size": job.batch_size,
            "ttft_s": round(result.timings.get("ttft_s", 0.0), 4),
        }

    def close(self) -> None:
        self.scheduler.close()


class EngineStream(WatchedStream):
    """A streamed answer of engine mode: ``chat.completion.chunk`` events as the text is settled, then ``[DONE]``.

    The first chunk carries the role, each text piece one chunk, the last one the finish reason and the
    ``draft_rag`` figures; with ``stream_options.include_usage`` a chunk with ``usage`` and no choices follows.
    When the batch fails the stream ends with ``data: {"error": {...}}`` and no ``[DONE]``. A client that goes
    away cancels the request.
    """

    def __init__(self, mode: EngineMode, job: Job, request: EngineRequest, stats: CompressionStats | None,
                 headers: Mapping[str, str]) -> None:
        super().__init__(self._events(), headers=headers, media_type="text/event-stream")
        self.mode = mode
        self.job = job
        self.include_usage = request.include_usage
        self.stats = stats

    async def _events(self) -> AsyncIterator[bytes]:
        mode, job = self.mode, self.job
        yield _event(mode.chunk(job, {"role": "assistant", "content": ""}))
        while True:
            item = await job.answers.get()
            if isinstance(item, str):
                yield _event(mode.chunk(job, {"content": item}))
                continue
            try:
                result = mode.ended(job, item)
            except GatewayError as error:
                yield _event(ErrorResponse(error=error.detail).model_dump(mode="json"))
                return
            yield _event(mode.chunk(job, {}, result.finish_reason, draft_rag=mode.figures(job, result, self.stats)))
            if self.include_usage:
                yield _event({**mode.chunk(job, {}), "choices": [], "usage": _usage(result)})
            yield b"data: [DONE]\n\n"
            return

    async def closed(self) -> None:
        if not self.job.done:
            self.mode.scheduler.withdraw(self.job)


def _usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _event(payload: dict[str, Any]) -> bytes:
    # Non-ASCII text stays UTF-8, as in the client's request.
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


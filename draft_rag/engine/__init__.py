"""SpecKV: generate with a target model whose prompt KV cache was evicted with a draft model's help.

One generation, top to bottom:

1. Draft (SpecKV only, and only when the prompt is longer than the budget): the draft model greedily
   answers the prompt (:func:`~draft_rag.specpc.draft_pass.greedy_tokens`); the answer text is re-tokenized
   with the target tokenizer.
2. Target prefill of prompt + draft answer, with :class:`~draft_rag.scoring.ObserverScores` watching the
   last ``window_size + 1`` prompt positions and the draft answer. Per layer and KV head, the older prompt
   keys are scored (max over the group's query heads and the observers, max-pooled over positions).
3. Eviction: drop the draft answer's and the last prompt token's KV; each KV head keeps the ``window_size``
   positions before the last prompt token and its best-scored older positions, ``budget - 1`` in all.
   With the default one-pass prefill each layer is evicted as soon as its attention has run, so the full
   cache of all layers never exists at once (see :mod:`draft_rag.kv.base`).
4. The last prompt token runs against the compressed cache at its original position (so the prompt
   cache holds ``budget`` entries per KV head), then decoding continues at the original positions.

A batch of prompts runs steps 1-3 one prompt at a time, then stacks the compressed caches (left-padded,
with an attention mask) and decodes them together, each prompt at its own positions until it finishes.

Every argument is checked, and the prompt tokenized, before any model runs. Each step that computes (the
draft answer, the target prefill with eviction, each decode step) holds that model's
:attr:`~draft_rag.models.LoadedModel.lock`; nothing is held between steps, so a paused stream blocks no
other generation, and generations sharing a model interleave their steps, each over its own cache.

The baselines run in the same engine: ``snapkv`` (step 2 without a draft), ``streamingllm`` (attention
sinks + most recent positions) and ``full`` (no eviction). The user's model is never changed: scoring hooks
live only during the prefill.

Where each part lives: this module holds the public :class:`SpecKV` (settings, ``generate``, ``stream``,
``prepare`` and ``run_prepared`` for servers that batch prompts as they arrive, and the run of one call) and
its result types; :mod:`~draft_rag.engine.requests` checks and tokenizes
each prompt and readies its prefill (the cascade's SpecPC step, the draft's answer, sparse prefill);
:mod:`~draft_rag.engine.batch` stacks the compressed caches and decodes them together.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypedDict, cast, overload

import torch

from draft_rag.checks import check_int
from draft_rag.decoding import TextStream
from draft_rag.engine.batch import _Decoding, decode
from draft_rag.engine.requests import Prompt, _Request, _Requests, _Settings
from draft_rag.hf import cache_bytes
from draft_rag.kv import METHODS, KVEviction, KVPeak
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, LoadedModel, load_model, stop_token_ids
from draft_rag.scoring import ScoreReduction

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from draft_rag.specpc import CompressionResult, SpecPC


class GenerationSettings(TypedDict, total=False):
    """The decoding settings that :meth:`SpecKV.generate` and :meth:`SpecKV.stream` take by keyword."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: str | Sequence[str] | None
    seed: int | None


@dataclass
class GenerationResult:
    """One generation: the text, token counts, the prompt KV cache kept vs full, and timings.

    ``kv_entries_*`` count prompt KV entries per layer and KV head (the unit of ``budget``); ``kv_bytes_*``
    are the prompt cache's keys and values over all layers and heads (tokens generated afterwards add the
    same to both). ``peak_kv_bytes`` is the most key and value bytes the target's cache held at any moment
    of the call, prefill (with the draft answer's entries, before eviction) and decoding included.
    ``timings`` holds ``compress_s`` (the cascade's SpecPC step, 0 without ``prompt_budget``), ``draft_s``
    (the draft's answer; near 0 when the cascade's pass wrote it), ``prefill_s`` (target prefill, scoring and
    eviction), ``ttft_s`` (call to first token), ``decode_s`` (first to last token) and ``tokens_per_s``
    (decode steps per second after the first token). ``token_ids`` are the generated token ids, end-of-turn
    token included. With the cascade (``prompt_budget``), ``prompt_tokens`` and the KV counts are those of
    the shortened prompt, and ``prompt_compression`` is SpecPC's result for its context (None otherwise, or
    when the prompt had no context to shorten).

    In a batch, ``draft_s`` and ``prefill_s`` are this prompt's own; ``ttft_s`` counts from the call's
    start, so it includes the prompts prefilled before this one and the batch's first step; ``decode_s``
    and ``tokens_per_s`` are over decode steps shared with the other prompts; ``peak_kv_bytes`` is the
    whole batch's (the compressed caches waiting for the others, and the stacked cache).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    kv_entries_kept: int
    kv_entries_full: int
    kv_bytes_kept: int
    kv_bytes_full: int
    peak_kv_bytes: int
    timings: dict[str, float] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    prompt_compression: CompressionResult | None = None


PreparedPrompt = _Request
"""A prompt checked and tokenized by :meth:`SpecKV.prepare`, with its own decoding settings, for
:meth:`SpecKV.run_prepared`. ``prompt_tokens`` counts its target tokens; setting ``cancelled`` (from any thread)
drops it from its batch at the next decode step."""


class SpecKV(_Requests):
    """Generation engine with draft-guided KV-cache eviction (SpecKV) and its baselines.

    Args:
        target: the model that answers: a packaged name, HF id, path or :class:`LoadedModel`
            (default the packaged Qwen2.5-Coder-1.5B-Instruct).
        draft: the small model whose answer guides eviction (default the packaged
            Qwen2.5-Coder-0.5B-Instruct); loaded only for ``method="speckv"``. Its tokenizer
            may differ from the target's.
        method: ``"speckv"`` (default), ``"snapkv"``, ``"streamingllm"`` or ``"full"``, or a
            :class:`~draft_rag.kv.KVEviction` instance (then the knobs below are ignored).
        budget: prompt KV entries kept per layer and KV head, last prompt token included (default 256).
        window_size: prompt positions before the last one that are always kept and observe (default 32).
        kernel_size: max-pooling width over positions for the scores (default 7).
        pool: ``"max"`` (default) or ``"avg"`` pooling.
        reduction: ``"max"`` (default) or ``"mean"`` over a KV group's query heads and over observers.
        lookahead_tokens: draft answer length; ``None`` (default) means up to ``max_new_tokens``.
        prompt_budget: the SpecKV-PC cascade: SpecPC first shortens the prompt's context to this many target
            tokens, then the eviction method runs on the shortened prompt (default ``None``: no cascade).
            The context is the last user message up to its question (its last paragraph, or the last one
            that ends with a question mark and the short instructions after it), which is kept verbatim
            (see :func:`draft_rag.cascade.split_context`). The draft reads the long prompt once, jointly
            (``SpecPC(reading="joint")``, with SpecPC's window of 64 observing positions): that pass scores the context
            for SpecPC and, for ``speckv``, also writes the draft answer.
        sink_tokens: first positions StreamingLLM always keeps (default 4).
        chunk_size: ``None`` (default) prefills the prompt (and the draft answer) in one forward pass and
            evicts each layer's cache right after that layer's attention, so the full prompt cache never
            exists at once (peak: the compressed layers plus one full layer). A number prefills in chunks
            of that many tokens, which bounds the activations' memory, and evicts afterwards: then the
            full prompt cache exists at the peak.
        prefill_window_size, prefill_vertical_size: draft-guided sparse prefill (default ``None``: dense).
            With both set, a one-pass prefill longer than their sum attends, in every layer, only to each
            query's band of ``prefill_window_size`` keys plus the ``prefill_vertical_size`` key columns that
            the observers (the prompt window and the draft answer) attend to most (see
            :mod:`draft_rag.sparse_prefill`; the paper uses 2048 and 2048). An approximation of the dense
            prefill that cuts its attention cost on long prompts; off with ``chunk_size``.
        observer_block_size: observer rows whose attention onto all keys is computed at once, when the
            target's KV entries (and, with the cascade, the draft's tokens) are scored; it bounds the scoring's
            extra memory (O(rows * heads * prompt tokens) per layer) and does not change the result. None
            (default) is :data:`draft_rag.scoring.OBSERVER_BLOCK_SIZE` (32). An eviction instance passed as
            ``method`` keeps its own (:class:`~draft_rag.kv.KVEviction`'s ``observer_block_size``).
        device, dtype: passed to :func:`~draft_rag.models.load_model` for models given by name.

    The engine is thread-safe, and so is sharing its models with other engines and SpecPC compressors:
    each compute step holds the model's own lock, and no lock is held while a stream waits to be read.
    """

    def __init__(
        self,
        target: str | LoadedModel = DEFAULT_TARGET,
        draft: str | LoadedModel = DEFAULT_DRAFT,
        method: str | KVEviction = "speckv",
        budget: int = 256,
        window_size: int = 32,
        kernel_size: int = 7,
        pool: str = "max",
        reduction: str = "max",
        lookahead_tokens: int | None = None,
        sink_tokens: int = 4,
        prompt_budget: int | None = None,
        chunk_size: int | None = None,
        prefill_window_size: int | None = None,
        prefill_vertical_size: int | None = None,
        observer_block_size: int | None = None,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        if observer_block_size is not None:
            check_int("observer_block_size", observer_block_size, 1)
        if isinstance(method, KVEviction):
            self.eviction = method
        else:
            knobs: dict[str, Any] = {
                "budget": budget,
                "window_size": window_size,
                "kernel_size": kernel_size,
                "pool": pool,
                "reduction": ScoreReduction(heads=reduction, observers=reduction),  # type: ignore[arg-type]
                "lookahead_tokens": lookahead_tokens,
                "sink_tokens": sink_tokens,
            }
            if observer_block_size is not None:
                knobs["observer_block_size"] = observer_block_size
            self.eviction = build_eviction(method, **knobs)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, 1)
        self.chunk_size = chunk_size
        if prompt_budget is not None:
            check_int("prompt_budget", prompt_budget, 1)
        if (prefill_window_size is None) != (prefill_vertical_size is None):
            msg = (
                "sparse prefill needs both prefill_window_size and prefill_vertical_size (e.g. 2048 and 2048); "
                f"got {prefill_window_size!r} and {prefill_vertical_size!r}."
            )
            raise ValueError(msg)
        if prefill_window_size is not None:
            check_int("prefill_window_size", prefill_window_size, 1)
            check_int("prefill_vertical_size", prefill_vertical_size, 0)
        self.prefill_window_size = prefill_window_size
        self.prefill_vertical_size = prefill_vertical_size
        self.prompt_budget = prompt_budget
        self.target = load_model(target, device=device, dtype=dtype)
        needs_draft = self.eviction.uses_draft or prompt_budget is not None
        self.draft = load_model(draft, device=device, dtype=dtype) if needs_draft else None
        self.prompt_compressor: SpecPC | None = None
        if self.draft is not None and prompt_budget is not None:
            from draft_rag.specpc import SpecPC

            # The cascade's context is one document, which reading it apart would not change but for the
            # observers (the question's instead of the window); the joint reading keeps the cascade as measured.
            self.prompt_compressor = SpecPC(
                draft=self.draft, budget=prompt_budget, target_tokenizer=self.target.tokenizer,
                chunk_size=chunk_size or SpecPC.chunk_size, progress=False,
                observer_block_size=observer_block_size, reading="joint",
            )
        self._stop_ids = set(stop_token_ids(self.target))

    def settings(self) -> dict[str, Any]:
        """The knobs that decide the output besides the budget, by name: the eviction method's own (its
        dataclass fields, e.g. ``window_size``, ``lookahead_tokens``) and the engine's (``chunk_size``, the
        sparse prefill sizes, ``prompt_budget``), as plain data for a log or a results file."""
        # The observer block size changes the scoring's memory, not the output.
        own = {name: value for name, value in asdict(self.eviction).items()
               if name not in ("budget", "observer_block_size")}
        return {
            "method": self.method, **own, "chunk_size": self.chunk_size, "prompt_budget": self.prompt_budget,
            "prefill_window_size": self.prefill_window_size, "prefill_vertical_size": self.prefill_vertical_size,
        }

    @property
    def method(self) -> str:
        """The eviction method's name (``"speckv"``, ``"snapkv"``, ``"streamingllm"`` or ``"full"``)."""
        return self.eviction.name

    @overload
    def generate(
        self, prompt: list[Prompt] | tuple[Prompt, ...], **settings: Unpack[GenerationSettings]
    ) -> list[GenerationResult]: ...

    @overload
    def generate(self, prompt: Prompt, **settings: Unpack[GenerationSettings]) -> GenerationResult: ...

    def generate(
        self,
        prompt: Prompt | list[Prompt] | tuple[Prompt, ...],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
    ) -> GenerationResult | list[GenerationResult]:
        """Answer one prompt, or a batch of prompts.

        Args:
            prompt: a string (one user message in the target's chat template) or a list of
                ``{"role", "content"}`` messages (see :func:`~draft_rag.decoding.as_messages`); or a batch:
                a list of such prompts (strings or message lists), answered together.
            max_new_tokens: most tokens to generate (per prompt), an integer >= 1 (default 256).
            temperature: 0 (default) is greedy; above 0 samples. A finite number >= 0.
            top_p: nucleus sampling mass in (0, 1] (default 1.0).
            stop: a string or a list of strings; the text is cut before the first one generated. Empty
                strings are ignored.
            seed: integer sampling seed (default nondeterministic); in a batch every prompt samples with
                its own generator seeded with it, as if it were answered alone.

        Returns:
            A :class:`GenerationResult`, or for a batch a list of them in the prompts' order (``[]`` for an
            empty list).

        A batch keeps memory per prompt where it matters: each prompt's draft answer, prefill and eviction
        run one prompt at a time, so only one prompt's uncompressed cache exists at once. Then the compressed
        caches (each KV head keeps its own entries; a prompt within budget keeps all of its entries) are
        left-padded to the longest and decoded together, every prompt at its own true positions, with its
        own stop strings and end of turn; a finished prompt leaves the batch. Greedy answers equal one-by-one
        calls, up to floating-point differences between batched and single matrix products.

        Raises:
            TypeError, ValueError: an argument or a prompt is malformed (the message names it, as
                ``prompts[i]`` for a batch's item); nothing has run yet.
            NotImplementedError: a model attends within a sliding window shorter than the generation.
        """
        batch = _is_batch(prompt)
        prompts = cast("list[Prompt]", list(prompt) if batch else [prompt])
        settings = _Settings.check(max_new_tokens, temperature, top_p, stop, seed)
        requests = [
            self._prepare(item, f"prompts[{index}]" if batch else "prompt", settings)
            for index, item in enumerate(prompts)
        ]
        if not requests:
            return []
        run = self._run(requests)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value if batch else done.value[0]

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
    ) -> Generator[str, None, GenerationResult]:
        """Like :meth:`generate` for one prompt, but yield the text in pieces as it is generated.

        The arguments are checked at once, so errors raise here rather than at the first piece. The pieces
        join to ``generate(...).text``; text that may still turn into a stop string and unfinished
        multi-byte characters are held back until settled. The generator's return value
        (``StopIteration.value``) is the :class:`GenerationResult`. A stream holds no lock between pieces:
        the same engine may run other generations (in this thread or others) while it is paused. A batch
        of prompts cannot be streamed: pass it to :meth:`generate`.
        """
        if _is_batch(prompt):
            msg = (
                f"stream() answers one prompt, got a batch of {len(prompt)}; stream each prompt on its own, "
                "or pass the batch to generate()."
            )
            raise TypeError(msg)
        settings = _Settings.check(max_new_tokens, temperature, top_p, stop, seed)
        return _only_pieces(self._run([self._prepare(prompt, "prompt", settings)]))

    def prepare(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        *,
        name: str = "prompt",
    ) -> PreparedPrompt:
        """Check and tokenize one prompt, with its own decoding settings, for :meth:`run_prepared`.

        :meth:`generate` split in two for a server that gathers prompts arriving at different times into
        batches: each prompt is prepared when it arrives, so a malformed one is refused on its own (with the
        errors of :meth:`generate`, the prompt called ``name``) before any model runs; the prompts gathered
        are then answered together. The arguments are those of :meth:`generate`.
        """
        return self._prepare(prompt, name, _Settings.check(max_new_tokens, temperature, top_p, stop, seed))

    def run_prepared(
        self, prepared: Sequence[PreparedPrompt]
    ) -> Generator[tuple[int, str], None, list[GenerationResult]]:
        """Answer prompts from this engine's :meth:`prepare` together, as :meth:`generate` answers a batch.

        Yields ``(index into prepared, text piece)`` as each prompt's text is settled (the pieces of a prompt
        join to its result's ``text``) and returns the results in the order of ``prepared``. Each prompt decodes
        with its own settings (length, sampling, stop strings, seed); the eviction settings are the engine's.
        A prompt whose ``cancelled`` is set leaves the batch at the next decode step, its result's
        ``finish_reason`` ``"cancelled"``. The generator holds no lock between pieces.
        """
        if not prepared:
            msg = "run_prepared needs at least one prompt from prepare()."
            raise ValueError(msg)
        return self._run(list(prepared))

    def _run(self, requests: list[_Request]) -> Generator[tuple[int, str], None, list[GenerationResult]]:
        """Answer ``requests`` together; yield ``(index, text piece)`` as text is settled; return the results."""
        target = self.target
        start = time.perf_counter()
        peak = KVPeak()
        caches, states = [], []
        for request in requests:
            began = time.perf_counter()
            compress_s = 0.0
            if request.messages is not None:
                request = self._shorten(request)
                compress_s = time.perf_counter() - began
                began = time.perf_counter()
            lookahead = self._draft_lookahead(request)
            drafted = time.perf_counter()
            with target.lock, self._sparse_prefill(request, lookahead):
                cache = self.eviction.compress(
                    target.model, request.prompt_ids.to(target.device), lookahead, chunk_size=self.chunk_size,
                    peak=peak,
                )
            # The compressed caches wait for the batch's decoding while the next prompts are prefilled.
            peak.held += cache_bytes(cache)
            caches.append(cache)
            timings = {"compress_s": compress_s, "draft_s": drafted - began, "prefill_s": time.perf_counter() - drafted}
            text = TextStream(target.tokenizer, request.settings.stop)
            states.append(_Decoding(request, cache.get_seq_length(), timings, text))
        return (yield from decode(target, caches, states, peak, self._stop_ids, start))


def _is_batch(prompt: object) -> bool:
    """Whether ``prompt`` is a batch: a list or tuple of prompts, not one prompt's list of message dicts."""
    return isinstance(prompt, (list, tuple)) and not (prompt and isinstance(prompt[0], Mapping))


def _only_pieces(
    run: Generator[tuple[int, str], None, list[GenerationResult]],
) -> Generator[str, None, GenerationResult]:
    """The text pieces of a one-prompt run; the generator returns its result."""
    while True:
        try:
            _, piece = next(run)
        except StopIteration as done:
            return done.value[0]
        yield piece


def build_eviction(method: str, **knobs: Any) -> KVEviction:
    """The eviction method named ``method``, configured with those ``knobs`` that it has."""
    if method not in METHODS:
        msg = f"unknown method {method!r}; choose one of {', '.join(METHODS)}."
        raise ValueError(msg)
    cls = METHODS[method]
    own = {f.name for f in fields(cls) if f.init}
    return cls(**{name: value for name, value in knobs.items() if name in own})

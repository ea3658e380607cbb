"""SpecKV: generate with a target model whose prompt KV cache was evicted with a draft model's help.

One generation, top to bottom:

1. Draft (SpecKV only, and only when the prompt is longer than the budget): the draft model greedily
   answers the prompt; the answer text is re-tokenized with the target tokenizer.
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
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypedDict, cast, overload

import torch
import torch.nn.functional as F

from draft_rag.cascade import compress_prompt
from draft_rag.checks import check_int
from draft_rag.decoding import (
    Sampler,
    TextStream,
    as_messages,
    chat_prompt_ids,
    forward_tokens,
    stop_strings,
)
from draft_rag.hf import cache_bytes, check_supported, layer_bytes
from draft_rag.kv import METHODS, KVEviction, KVPeak
from draft_rag.kv.speckv import answer_ids, draft_lookahead
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, LoadedModel, load_model, stop_token_ids
from draft_rag.scoring import ScoreReduction

if TYPE_CHECKING:
    from transformers import Cache
    from typing_extensions import Unpack

    from draft_rag.specpc import CompressionResult, SpecPC

Prompt = str | Sequence[dict[str, Any]]


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


class SpecKV:
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
            (see :func:`draft_rag.cascade.split_context`). The draft reads the long prompt once: that pass
            scores the context for SpecPC and, for ``speckv``, also writes the draft answer.
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
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        if isinstance(method, KVEviction):
            self.eviction = method
        else:
            knobs = {
                "budget": budget,
                "window_size": window_size,
                "kernel_size": kernel_size,
                "pool": pool,
                "reduction": ScoreReduction(heads=reduction, observers=reduction),  # type: ignore[arg-type]
                "lookahead_tokens": lookahead_tokens,
                "sink_tokens": sink_tokens,
            }
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

            self.prompt_compressor = SpecPC(
                draft=self.draft, budget=prompt_budget, target_tokenizer=self.target.tokenizer,
                chunk_size=chunk_size or SpecPC.chunk_size, progress=False,
            )
        self._stop_ids = set(stop_token_ids(self.target))

    def settings(self) -> dict[str, Any]:
        """The knobs that decide the output besides the budget, by name: the eviction method's own (its
        dataclass fields, e.g. ``window_size``, ``lookahead_tokens``) and the engine's (``chunk_size``, the
        sparse prefill sizes, ``prompt_budget``), as plain data for a log or a results file."""
        own = {name: value for name, value in asdict(self.eviction).items() if name != "budget"}
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

    def _prepare(self, prompt: Prompt, name: str, settings: _Settings) -> _Request:
        """Check one prompt (``name`` in errors) and tokenize it for the target (and the draft, if it will run).

        With the cascade, the draft's view of the whole prompt is checked here, and the target's after
        SpecPC has shortened it (:meth:`_shorten`).
        """
        messages = as_messages(prompt, name)
        if self.prompt_compressor is None:
            return self._tokenize(messages, name, settings)
        assert self.draft is not None
        draft_ids = chat_prompt_ids(self.draft.tokenizer, messages)
        _check_context(self.draft, draft_ids.shape[1], "draft", name)
        check_supported(self.draft.model, draft_ids.shape[1] + self._lookahead_steps(settings))
        return _Request(draft_ids[:, :0], None, 0, settings, messages=messages, name=name)

    def _tokenize(
        self, messages: list[dict[str, str]], name: str, settings: _Settings, drafted: str | None = None
    ) -> _Request:
        """The request for ``messages``; ``drafted`` is a draft answer already written (by the cascade)."""
        prompt_ids = chat_prompt_ids(self.target.tokenizer, messages)
        n = prompt_ids.shape[1]
        _check_context(self.target, n, "target", name)
        draft_ids, steps = None, 0
        if self.draft is not None and self.eviction.uses_draft and self.eviction.evicts(n):
            steps = self._lookahead_steps(settings)
            if drafted is None:
                draft_ids = chat_prompt_ids(self.draft.tokenizer, messages)
                _check_context(self.draft, draft_ids.shape[1], "draft", name)
                check_supported(self.draft.model, draft_ids.shape[1] + steps - 1, scoring=False)
        check_supported(self.target.model, n + max(steps, settings.max_new_tokens - 1), scoring=self._reads_target(n))
        return _Request(prompt_ids, draft_ids, steps, settings, drafted=drafted if steps else None)

    def _reads_target(self, n: int) -> bool:
        """Whether a prompt of ``n`` tokens has the target's attention read: scored by the eviction method, or
        replaced by sparse prefill (the draft only generates its answer)."""
        scored = self.eviction.evicts(n) and self.eviction.observers(n) is not None
        return scored or self._sparse_sizes() is not None

    def _sparse_sizes(self) -> tuple[int, int] | None:
        """The sparse prefill's window and vertical sizes, or None when the target's prefill stays dense."""
        if self.prefill_window_size is None or self.prefill_vertical_size is None or self.chunk_size is not None:
            return None
        return self.prefill_window_size, self.prefill_vertical_size

    def _lookahead_steps(self, settings: _Settings) -> int:
        """How many tokens the draft answers with for SpecKV (0 for methods without a draft)."""
        if not self.eviction.uses_draft:
            return 0
        return getattr(self.eviction, "lookahead_tokens", None) or settings.max_new_tokens

    def _shorten(self, request: _Request) -> _Request:
        """The cascade's first stage: SpecPC shortens the prompt's context (its pass also drafts the answer)."""
        assert self.prompt_compressor is not None and request.messages is not None
        cascaded = compress_prompt(request.messages, self.prompt_compressor, self._lookahead_steps(request.settings))
        shortened = self._tokenize(cascaded.messages, request.name, request.settings, cascaded.draft_answer)
        shortened.compression = cascaded.compression
        return shortened

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
        peak.held = 0
        cache, padding = stack_caches(caches, peak)

        # Each step runs every unfinished prompt's newest token (first: its last prompt token).
        active = list(range(len(states)))
        while True:
            with target.lock:
                logits = forward_tokens(
                    target.model, cache, [states[i].next_token for i in active],
                    [states[i].next_position for i in active], padding,
                )
            if padding is not None:
                padding = F.pad(padding, (0, 1), value=True)
            peak.observe(cache)
            for row, index in enumerate(active):
                state = states[index]
                for piece in state.take(state.request.sampler(logits[row : row + 1]), self._stop_ids):
                    yield index, piece
            running = [row for row, index in enumerate(active) if not states[index].done]
            if not running:
                break
            if len(running) < len(active):
                rows = torch.tensor(running, device=target.device)
                cache.batch_select_indices(rows)
                padding = None if padding is None else padding[rows]
                active = [active[row] for row in running]
        entry_bytes = cache_bytes(cache) // (len(active) * cache.get_seq_length())
        return [state.result(start, entry_bytes, peak.bytes) for state in states]

    def _sparse_prefill(
        self, request: _Request, lookahead: torch.Tensor | None
    ) -> contextlib.AbstractContextManager[None]:
        """The sparse-prefill block for this request's target prefill, or a no-op when it stays dense."""
        sizes = self._sparse_sizes()
        if sizes is None:
            return contextlib.nullcontext()
        from draft_rag.sparse_prefill import sparse_prefill

        n = request.prompt_ids.shape[1]
        observers = self.eviction.observers(n) if self.eviction.evicts(n) else None
        # The prompt's observers (or, for methods without scores, a window like SnapKV's) and the draft answer.
        prompt_observers = n - observers.first if observers is not None else min(n, 33)
        extra = lookahead.shape[1] if lookahead is not None and observers is not None and observers.lookahead else 0
        return sparse_prefill(
            self.target.model, num_observers=prompt_observers + extra, window_size=sizes[0], vertical_size=sizes[1]
        )

    def _draft_lookahead(self, request: _Request) -> torch.Tensor | None:
        """The draft's answer in target tokens ``[1, L]``, or None when the draft does not run or says nothing."""
        tokenizer = self.target.tokenizer
        if request.drafted is not None:
            lookahead = answer_ids(tokenizer, request.drafted)
        elif self.draft is not None and request.draft_ids is not None:
            lookahead = draft_lookahead(
                self.draft, request.draft_ids, request.lookahead_steps, tokenizer, chunk_size=self.chunk_size
            )
        else:
            return None
        if lookahead is not None:
            # Re-tokenized by another tokenizer, the answer can take more target tokens than the draft generated.
            n = request.prompt_ids.shape[1]
            check_supported(self.target.model, n + lookahead.shape[1], scoring=self._reads_target(n))
        return lookahead


def stack_caches(caches: list[Cache], peak: KVPeak) -> tuple[Cache, torch.Tensor | None]:
    """The sequences of ``caches`` (each of batch 1) as one cache, left-padded to the longest.

    Returns the cache and the padding mask ``[batch, longest]`` (False at padding), or None when no row is
    padded. Each sequence's layer is released as soon as it is copied, so at most one layer exists twice;
    ``peak`` counts that moment.
    """
    lengths = [cache.get_seq_length() for cache in caches]
    longest = max(lengths)
    if len(caches) == 1 or longest == 0:
        return caches[0], None
    base = caches[lengths.index(longest)]
    stacked, unstacked = 0, sum(cache_bytes(cache) for cache in caches)
    for index, layer in enumerate(base.layers):
        own = [cache.layers[index] for cache, length in zip(caches, lengths, strict=True) if length]
        empty = layer.keys[:, :, :0]
        keys, values = (
            torch.cat([
                F.pad(getattr(cache.layers[index], kind) if length else empty, (0, 0, longest - length, 0))
                for cache, length in zip(caches, lengths, strict=True)
            ])
            for kind in ("keys", "values")
        )
        copied = sum(layer_bytes(part) for part in own)
        for part in own:
            part.keys = part.values = None
        layer.keys, layer.values = keys, values
        stacked += layer_bytes(layer)
        unstacked -= copied
        # Until the copies were released this layer existed twice: stacked and in each sequence's own cache.
        peak.count(stacked + unstacked + copied)
    positions = torch.arange(longest)
    padding = positions[None, :] >= longest - torch.tensor(lengths)[:, None]
    return base, padding.to(base.layers[0].keys.device)

@dataclass
class _Settings:
    """The checked decoding settings of one call, shared by all its prompts."""

    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None

    @classmethod
    def check(
        cls, max_new_tokens: int, temperature: float, top_p: float, stop: str | Sequence[str] | None, seed: int | None
    ) -> _Settings:
        """The settings, or the error that names the first malformed one."""
        check_int("max_new_tokens", max_new_tokens, 1)
        Sampler(temperature, top_p, seed)
        return cls(max_new_tokens, temperature, top_p, stop_strings(stop), seed)


@dataclass
class _Request:
    """One checked prompt: target (and draft) prompt tokens, the call's settings and its own sampler."""

    prompt_ids: torch.Tensor
    draft_ids: torch.Tensor | None
    lookahead_steps: int
    settings: _Settings
    messages: list[dict[str, str]] | None = None  # set while the cascade has yet to shorten the prompt
    name: str = "prompt"
    drafted: str | None = None  # a draft answer already written (by the cascade's SpecPC pass)
    compression: CompressionResult | None = None
    sampler: Sampler = field(init=False)

    def __post_init__(self) -> None:
        # Each prompt samples with its own generator, so a batch samples like one-by-one calls.
        self.sampler = Sampler(self.settings.temperature, self.settings.top_p, self.settings.seed)


@dataclass
class _Decoding:
    """One prompt from its compressed cache on: what it generated so far, and at the end its result."""

    request: _Request
    kept: int
    timings: dict[str, float]
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    finish: str = "length"
    done: bool = False
    first_token_at: float = 0.0
    end: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return int(self.request.prompt_ids.shape[1])

    @property
    def next_token(self) -> int:
        """The token to run next: the newest generated one, or before any the last prompt token."""
        return self.tokens[-1] if self.tokens else int(self.request.prompt_ids[0, -1])

    @property
    def next_position(self) -> int:
        """The true position of :attr:`next_token`."""
        return self.prompt_tokens - 1 + len(self.tokens)

    def take(self, token: int, stop_ids: set[int]) -> list[str]:
        """Add a generated token; return the text pieces it settles. Sets ``done`` when the prompt is finished."""
        self.tokens.append(token)
        if len(self.tokens) == 1:
            self.first_token_at = time.perf_counter()
        pieces = []
        if token in stop_ids:
            self.finish = "stop"
        else:
            pieces.append(self.text.push(token))
            if self.text.stopped:
                self.finish = "stop"
        if self.finish == "stop" or len(self.tokens) == self.request.settings.max_new_tokens:
            self.done = True
            pieces.append(self.text.flush())
            self.end = time.perf_counter()
        pieces = [piece for piece in pieces if piece]
        self.pieces += pieces
        return pieces

    def result(self, start: float, entry_bytes: int, peak_bytes: int) -> GenerationResult:
        """The finished generation; ``start`` is the call's start, ``entry_bytes`` one position's KV bytes."""
        decode_s = self.end - self.first_token_at
        steps = len(self.tokens) - 1
        timings = {
            **self.timings,
            "ttft_s": self.first_token_at - start,
            "decode_s": decode_s,
            "tokens_per_s": steps / decode_s if steps and decode_s > 0 else 0.0,
        }
        kept = self.kept + 1  # the last prompt token joined the compressed cache
        return GenerationResult(
            text="".join(self.pieces),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.tokens),
            finish_reason=self.finish,
            kv_entries_kept=kept,
            kv_entries_full=self.prompt_tokens,
            kv_bytes_kept=kept * entry_bytes,
            kv_bytes_full=self.prompt_tokens * entry_bytes,
            peak_kv_bytes=peak_bytes,
            timings=timings,
            token_ids=self.tokens,
            prompt_compression=self.request.compression,
        )


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


def _check_context(model: LoadedModel, tokens: int, role: str, name: str) -> None:
    """Raise when prompt ``name`` of ``tokens`` tokens does not fit the ``role`` (target or draft) model's context."""
    if tokens > model.max_context:
        msg = (
            f"{name} has {tokens} tokens in the {role} model {model.name!r}, over its context of "
            f"{model.max_context} tokens; shorten the prompt or use a {role} model with a longer context."
        )
        raise ValueError(msg)


def build_eviction(method: str, **knobs: Any) -> KVEviction:
    """The eviction method named ``method``, configured with those ``knobs`` that it has."""
    if method not in METHODS:
        msg = f"unknown method {method!r}; choose one of {', '.join(METHODS)}."
        raise ValueError(msg)
    cls = METHODS[method]
    own = {f.name for f in fields(cls) if f.init}
    return cls(**{name: value for name, value in knobs.items() if name in own})


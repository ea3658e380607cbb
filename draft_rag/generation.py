"""SpecKV: generate with a target model whose prompt KV cache was evicted with a draft model's help.

One generation, top to bottom:

1. Draft (SpecKV only, and only when the prompt is longer than the budget): the draft model greedily
   answers the prompt; the answer text is re-tokenized with the target tokenizer.
2. Target prefill of prompt + draft answer, with :class:`~draft_rag.scoring.ObserverScores` watching the
   last ``window_size + 1`` prompt positions and the draft answer. Per layer and KV head, the older prompt
   keys are scored (max over the group's query heads and the observers, max-pooled over positions).
3. Eviction: drop the draft answer's and the last prompt token's KV; each KV head keeps the ``window_size``
   positions before the last prompt token and its best-scored older positions, ``budget - 1`` in all.
4. The last prompt token runs against the compressed cache at its original position (so the prompt
   cache holds ``budget`` entries per KV head), then decoding continues at the original positions.

Every argument is checked, and the prompt tokenized, before any model runs. Each step that computes (the
draft answer, the target prefill with eviction, each decode step) holds that model's
:attr:`~draft_rag.models.LoadedModel.lock`; nothing is held between steps, so a paused stream blocks no
other generation, and generations sharing a model interleave their steps, each over its own cache.

The baselines run in the same engine: ``snapkv`` (step 2 without a draft), ``streamingllm`` (attention
sinks + most recent positions) and ``full`` (no eviction). The user's model is never changed: scoring hooks
live only during the prefill.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from draft_rag.decoding import (
    Sampler,
    TextStream,
    as_messages,
    chat_prompt_ids,
    decode_steps,
    forward_token,
    stop_strings,
)
from draft_rag.kv import METHODS, KVEviction
from draft_rag.kv.speckv import draft_answer
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, LoadedModel, load_model, stop_token_ids
from draft_rag.scoring import ScoreReduction, check_attention_support, check_int

if TYPE_CHECKING:
    import torch
    from transformers import Cache

Prompt = str | Sequence[dict[str, Any]]


@dataclass
class GenerationResult:
    """One generation: the text, token counts, the prompt KV cache kept vs full, and timings.

    ``kv_entries_*`` count prompt KV entries per layer and KV head (the unit of ``budget``); ``kv_bytes_*``
    are the prompt cache's keys and values over all layers and heads (tokens generated afterwards add the
    same to both). ``timings`` holds ``draft_s``, ``prefill_s`` (target prefill, scoring and eviction),
    ``ttft_s`` (call to first token), ``decode_s`` (first to last token) and ``tokens_per_s`` (decode steps
    per second after the first token). ``token_ids`` are the generated token ids, end-of-turn token included.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    kv_entries_kept: int
    kv_entries_full: int
    kv_bytes_kept: int
    kv_bytes_full: int
    timings: dict[str, float] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)


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
        sink_tokens: first positions StreamingLLM always keeps (default 4).
        chunk_size: prefill chunk length (default 2048).
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
        chunk_size: int = 2048,
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
        check_int("chunk_size", chunk_size, 1)
        self.chunk_size = chunk_size
        self.target = load_model(target, device=device, dtype=dtype)
        self.draft = load_model(draft, device=device, dtype=dtype) if self.eviction.uses_draft else None
        self._stop_ids = set(stop_token_ids(self.target))

    @property
    def method(self) -> str:
        """The eviction method's name (``"speckv"``, ``"snapkv"``, ``"streamingllm"`` or ``"full"``)."""
        return self.eviction.name

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
    ) -> GenerationResult:
        """Answer one prompt.

        Args:
            prompt: a string (one user message in the target's chat template) or a list of
                ``{"role", "content"}`` messages (see :func:`~draft_rag.decoding.as_messages`).
            max_new_tokens: most tokens to generate, an integer >= 1 (default 256).
            temperature: 0 (default) is greedy; above 0 samples. A finite number >= 0.
            top_p: nucleus sampling mass in (0, 1] (default 1.0).
            stop: a string or a list of strings; the text is cut before the first one generated. Empty
                strings are ignored.
            seed: integer sampling seed (default nondeterministic).

        Raises:
            TypeError, ValueError: an argument is malformed (the message names it); nothing has run yet.
            NotImplementedError: a model attends within a sliding window shorter than the generation.
        """
        run = self._run(self._prepare(prompt, max_new_tokens, temperature, top_p, stop, seed))
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
    ) -> Generator[str, None, GenerationResult]:
        """Like :meth:`generate`, but yield the text in pieces as it is generated (same arguments).

        The arguments are checked at once, so errors raise here rather than at the first piece. The pieces
        join to ``generate(...).text``; text that may still turn into a stop string and unfinished
        multi-byte characters are held back until settled. The generator's return value
        (``StopIteration.value``) is the :class:`GenerationResult`. A stream holds no lock between pieces:
        the same engine may run other generations (in this thread or others) while it is paused.
        """
        return self._run(self._prepare(prompt, max_new_tokens, temperature, top_p, stop, seed))

    def _prepare(
        self,
        prompt: Prompt,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: str | Sequence[str] | None,
        seed: int | None,
    ) -> _Request:
        """Check every argument and tokenize the prompt for the target (and the draft, if it will run)."""
        messages = as_messages(prompt)
        check_int("max_new_tokens", max_new_tokens, 1)
        sampler = Sampler(temperature, top_p, seed)
        stops = stop_strings(stop)
        prompt_ids = chat_prompt_ids(self.target.tokenizer, messages)
        n = prompt_ids.shape[1]
        _check_context(self.target, n, "target")
        draft_ids, steps = None, 0
        if self.draft is not None and self.eviction.evicts(n):
            steps = getattr(self.eviction, "lookahead_tokens", None) or max_new_tokens
            draft_ids = chat_prompt_ids(self.draft.tokenizer, messages)
            _check_context(self.draft, draft_ids.shape[1], "draft")
            check_attention_support(self.draft.model, draft_ids.shape[1] + steps - 1)
        check_attention_support(self.target.model, n + max(steps, max_new_tokens - 1))
        return _Request(prompt_ids, draft_ids, steps, max_new_tokens, sampler, stops)

    def _run(self, request: _Request) -> Generator[str, None, GenerationResult]:
        target = self.target
        start = time.perf_counter()
        lookahead = self._draft_lookahead(request)
        drafted = time.perf_counter()

        prompt_ids = request.prompt_ids.to(target.device)
        n = prompt_ids.shape[1]
        with target.lock:
            cache = self.eviction.compress(target.model, prompt_ids, lookahead, chunk_size=self.chunk_size)
            logits = forward_token(target.model, cache, int(prompt_ids[0, -1]), n - 1)
        prefilled = time.perf_counter()
        kept = cache.get_seq_length()
        bytes_kept = cache_bytes(cache)

        text = TextStream(target.tokenizer, request.stop)
        pieces: list[str] = []
        tokens: list[int] = []
        finish, first_token_at = "length", prefilled
        steps = decode_steps(target.model, cache, logits, n, request.sampler, request.max_new_tokens, target.lock)
        for token in steps:
            tokens.append(token)
            if len(tokens) == 1:
                first_token_at = time.perf_counter()
            if token in self._stop_ids:
                finish = "stop"
                break
            piece = text.push(token)
            if piece:
                pieces.append(piece)
                yield piece
            if text.stopped:
                finish = "stop"
                break
        tail = text.flush()
        if tail:
            pieces.append(tail)
            yield tail
        end = time.perf_counter()

        decode_s = end - first_token_at
        timings = {
            "draft_s": drafted - start,
            "prefill_s": prefilled - drafted,
            "ttft_s": first_token_at - start,
            "decode_s": decode_s,
            "tokens_per_s": (len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
        }
        return GenerationResult(
            text="".join(pieces),
            prompt_tokens=n,
            completion_tokens=len(tokens),
            finish_reason=finish,
            kv_entries_kept=kept,
            kv_entries_full=n,
            kv_bytes_kept=bytes_kept,
            kv_bytes_full=bytes_kept // kept * n,
            timings=timings,
            token_ids=tokens,
        )

    def _draft_lookahead(self, request: _Request) -> torch.Tensor | None:
        """The draft's answer in target tokens ``[1, L]``, or None when the draft does not run or says nothing."""
        draft = self.draft
        if draft is None or request.draft_ids is None:
            return None
        with draft.lock:
            answer = draft_answer(draft, request.draft_ids, request.lookahead_steps, chunk_size=self.chunk_size)
        if not answer:
            return None
        lookahead = self.target.tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids
        # Re-tokenized by another tokenizer, the answer can take more target tokens than the draft generated.
        check_attention_support(self.target.model, request.prompt_ids.shape[1] + lookahead.shape[1])
        return lookahead


@dataclass
class _Request:
    """One checked generation request: target (and draft) prompt tokens and the decoding settings."""

    prompt_ids: torch.Tensor
    draft_ids: torch.Tensor | None
    lookahead_steps: int
    max_new_tokens: int
    sampler: Sampler
    stop: list[str]


def _check_context(model: LoadedModel, tokens: int, role: str) -> None:
    """Raise when a prompt of ``tokens`` tokens does not fit the ``role`` (target or draft) model's context."""
    if tokens > model.max_context:
        msg = (
            f"the prompt has {tokens} tokens in the {role} model {model.name!r}, over its context of "
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


def cache_bytes(cache: Cache) -> int:
    """Bytes of all keys and values held in ``cache``."""
    return sum(
        (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
        for layer in cache.layers
        if getattr(layer, "keys", None) is not None
    )

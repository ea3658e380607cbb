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

The baselines run in the same engine: ``snapkv`` (step 2 without a draft), ``streamingllm`` (attention
sinks + most recent positions) and ``full`` (no eviction). The user's model is never changed: scoring hooks
live only during the prefill.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from draft_rag.decoding import Sampler, TextStream, as_messages, chat_prompt_ids, decode_steps, forward_token
from draft_rag.kv import METHODS, KVEviction
from draft_rag.kv.speckv import draft_answer
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, LoadedModel, load_model, stop_token_ids
from draft_rag.scoring import ScoreReduction

if TYPE_CHECKING:
    import torch
    from transformers import Cache

Prompt = str | Sequence[dict[str, str]]


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

    The engine is thread-safe: one generation at a time holds the models.
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
        if chunk_size < 1:
            msg = f"chunk_size must be >= 1, got {chunk_size}."
            raise ValueError(msg)
        self.chunk_size = chunk_size
        self.target = load_model(target, device=device, dtype=dtype)
        self.draft = load_model(draft, device=device, dtype=dtype) if self.eviction.uses_draft else None
        self._stop_ids = set(stop_token_ids(self.target))
        self._lock = threading.Lock()

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
                ``{"role", "content"}`` messages.
            max_new_tokens: most tokens to generate (default 256).
            temperature: 0 (default) is greedy; above 0 samples.
            top_p: nucleus sampling mass (default 1.0).
            stop: a string or strings; the text is cut before the first one generated.
            seed: sampling seed (default nondeterministic).
        """
        run = self._run(prompt, max_new_tokens, temperature, top_p, stop, seed)
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

        The pieces join to ``generate(...).text``; text that may still turn into a stop string and
        unfinished multi-byte characters are held back until settled. The generator's return value
        (``StopIteration.value``) is the :class:`GenerationResult`.
        """
        return (yield from self._run(prompt, max_new_tokens, temperature, top_p, stop, seed))

    def _run(
        self,
        prompt: Prompt,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: str | Sequence[str] | None,
        seed: int | None,
    ) -> Generator[str, None, GenerationResult]:
        messages = as_messages(prompt)
        if max_new_tokens < 1:
            msg = f"max_new_tokens must be >= 1, got {max_new_tokens}."
            raise ValueError(msg)
        sampler = Sampler(temperature, top_p, seed)
        target = self.target
        with self._lock:
            start = time.perf_counter()
            prompt_ids = chat_prompt_ids(target.tokenizer, messages).to(target.device)
            n = prompt_ids.shape[1]
            if n > target.max_context:
                msg = f"the prompt has {n} tokens, over the context of {target.max_context}; shorten it."
                raise ValueError(msg)
            lookahead = None
            if self.draft is not None and self.eviction.evicts(n):
                steps = getattr(self.eviction, "lookahead_tokens", None) or max_new_tokens
                answer = draft_answer(self.draft, messages, steps, chunk_size=self.chunk_size)
                if answer:
                    lookahead = target.tokenizer(
                        answer, add_special_tokens=False, return_tensors="pt"
                    ).input_ids
            drafted = time.perf_counter()

            cache = self.eviction.compress(target.model, prompt_ids, lookahead, chunk_size=self.chunk_size)
            logits = forward_token(target.model, cache, int(prompt_ids[0, -1]), n - 1)
            prefilled = time.perf_counter()
            kept = cache.get_seq_length()
            bytes_kept = cache_bytes(cache)

            text = TextStream(target.tokenizer, [stop] if isinstance(stop, str) else list(stop or ()))
            pieces: list[str] = []
            tokens: list[int] = []
            finish, first_token_at = "length", prefilled
            for token in decode_steps(target.model, cache, logits, n, sampler, max_new_tokens):
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

"""SpecKV's requests: each prompt checked and tokenized before any model runs, then made ready for its prefill.

:class:`_Requests` holds the engine's per-prompt steps (a base of :class:`~draft_rag.engine.SpecKV`): check
and tokenize a prompt for the target (and the draft, if it will answer), the cascade's SpecPC step that
shortens it (:mod:`draft_rag.cascade`), the draft's answer in target tokens, and the sparse-prefill block
around the target's prefill.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from draft_rag.cascade import compress_prompt
from draft_rag.checks import check_int
from draft_rag.decoding import Sampler, as_messages, chat_prompt_ids, stop_strings
from draft_rag.hf import check_supported
from draft_rag.kv import KVEviction
from draft_rag.kv.speckv import answer_ids, draft_lookahead
from draft_rag.models import LoadedModel

if TYPE_CHECKING:
    from draft_rag.specpc import CompressionResult, SpecPC

Prompt = str | Sequence[dict[str, Any]]


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
    cancelled: bool = False  # set from any thread when nobody reads the answer any more
    sampler: Sampler = field(init=False)

    def __post_init__(self) -> None:
        # Each prompt samples with its own generator, so a batch samples like one-by-one calls.
        self.sampler = Sampler(self.settings.temperature, self.settings.top_p, self.settings.seed)

    @property
    def prompt_tokens(self) -> int:
        """The prompt's target tokens (0 while the cascade has yet to shorten it)."""
        return int(self.prompt_ids.shape[1])


class _Requests:
    """The per-prompt steps of :class:`~draft_rag.engine.SpecKV`, which sets these attributes."""

    target: LoadedModel
    draft: LoadedModel | None
    eviction: KVEviction
    chunk_size: int | None
    prefill_window_size: int | None
    prefill_vertical_size: int | None
    prompt_compressor: SpecPC | None

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


def _check_context(model: LoadedModel, tokens: int, role: str, name: str) -> None:
    """Raise when prompt ``name`` of ``tokens`` tokens does not fit the ``role`` (target or draft) model's context."""
    if tokens > model.max_context:
        msg = (
            f"{name} has {tokens} tokens in the {role} model {model.name!r}, over its context of "
            f"{model.max_context} tokens; shorten the prompt or use a {role} model with a longer context."
        )
        raise ValueError(msg)

"""One target prefill per sample, shared by every KV-side method and budget of the benchmark.

Eviction does not change what a prefill computes: each layer's attention reads the whole prompt before that
layer is evicted (:mod:`draft_rag.kv.base`), so the prompt's keys and values, and the scores that the observers
give them, are the same for ``speckv``, ``snapkv`` and ``streamingllm`` at every budget; only the entries kept
differ. The benchmark therefore runs, per sample:

1. the draft's answer, once (when a method that uses it evicts at this length);
2. one target pass over the prompt, scored by each distinct set of prompt observers (SnapKV's and SpecKV's
   window), then one pass over the draft answer's target tokens that only SpecKV's scorer observes, both
   extending one cache (the same as the engine's one pass over prompt + draft answer, in two chunks);
3. per method and budget: the method's own selection from those scores, a cache of the kept entries, and the
   engine's usual decoding from it (:class:`draft_rag.SpecKV`), which runs the last prompt token at its
   position and answers.

Each row is charged what it would cost alone: SpecKV's draft seconds as its compress time; the prompt pass
(and, for SpecKV, the draft-answer pass) plus its own selection and decoding as its answer time. The prompt
pass includes every method's scoring, a few observer rows per layer, so ``streamingllm`` (which scores
nothing) is charged slightly more than it would pay alone. Greedy answers equal the engine's own generation
up to floating-point differences between one pass and two (tested on tiny models).
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from draft_rag.decoding import as_messages, chat_prompt_ids
from draft_rag.hf import cache_from_tensors, cache_layers, kept_entries
from draft_rag.kv.base import KVEviction, KVPeak, Observers
from draft_rag.kv.speckv import draft_lookahead
from draft_rag.scoring import ObserverScores, prefill

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel

    from draft_rag.bench.tasks import Sample
    from draft_rag.engine import SpecKV
    from draft_rag.models import LoadedModel

SHARED_PREFILL = "one target prefill per sample for every KV-side method and budget"
"""How the bench's KV-side rows were made, as their ``method_settings`` record it."""


@dataclass
class PrefilledCache(KVEviction):
    """An "eviction" whose work is done: :meth:`compress` hands the engine a cache made beforehand, once."""

    cache: Any = None
    name: ClassVar[str] = "prefilled"

    def compress(
        self,
        model: PreTrainedModel,
        prompt_ids: torch.Tensor,
        lookahead_ids: torch.Tensor | None = None,
        *,
        chunk_size: int | None = None,
        peak: KVPeak | None = None,
    ) -> Cache:
        if self.cache is None:
            msg = "a PrefilledCache is used once; make a new one for each generation."
            raise RuntimeError(msg)
        cache, self.cache = self.cache, None
        if peak is not None:
            peak.observe(cache)
        return cache


@dataclass
class _Pass:
    """What one sample's shared prefill left: the prompt, its full cache, the observers' scores, the seconds."""

    key: tuple[str, int, tuple[str, ...], tuple[int, ...]]
    prompt_ids: torch.Tensor
    cache: Cache
    scores: dict[tuple[Observers, bool], list[torch.Tensor]]
    draft_s: float
    prompt_s: float
    lookahead_s: float
    lookahead_tokens: int


@dataclass
class SharedKVPass:
    """Answers a sample with each KV-side method and budget from one draft answer and one target prefill.

    Args:
        target, draft: the loaded models (the draft runs only for methods that use it).
        methods: the KV-side method names (``speckv``, ``snapkv``, ``streamingllm``) whose rows will be asked
            for; the shared prefill scores for all of them.
        budgets: their budgets.
    """

    target: LoadedModel
    draft: LoadedModel
    methods: list[str] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    _engines: dict[tuple[str, int], SpecKV] = field(default_factory=dict, init=False, repr=False)
    _latest: _Pass | None = field(default=None, init=False, repr=False)

    def engine(self, name: str, budget: int) -> SpecKV:
        """The engine that runs ``name`` at ``budget`` alone; its eviction settings are the ones shared here."""
        if (name, budget) not in self._engines:
            from draft_rag import SpecKV

            self._engines[name, budget] = SpecKV(target=self.target, draft=self.draft, method=name, budget=budget)
        return self._engines[name, budget]

    def answer(self, sample: Sample, name: str, budget: int) -> tuple[str, float, float, int, int]:
        """``(text, compress seconds, answer seconds, prompt tokens, prompt KV bytes)`` of ``name`` at ``budget``.

        A method or budget not given at construction joins them (and the sample's pass is made again).
        """
        if name not in self.methods:
            self.methods.append(name)
        if budget not in self.budgets:
            self.budgets.append(budget)
        shared = self._pass(sample)
        eviction = self.engine(name, budget).eviction
        n = int(shared.prompt_ids.shape[1])
        started = time.perf_counter()
        drafted = eviction.uses_draft and eviction.evicts(n)
        keep = [torch.arange(n - 1)] * len(shared.cache.layers)
        if eviction.evicts(n):
            observers = eviction.observers(n)
            scores = (
                [None] * len(keep) if observers is None
                else shared.scores[_scorer_key(observers, drafted and shared.lookahead_tokens > 0)]
            )
            keep = [eviction.select(layer_scores, n - 1) for layer_scores in scores]
        cache = _kept_cache(shared.cache, keep)
        result = self._decoder(cache).generate(sample.prompt(), max_new_tokens=sample.max_new_tokens, temperature=0.0)
        own_s = time.perf_counter() - started
        answer_s = shared.prompt_s + (shared.lookahead_s if drafted else 0.0) + own_s
        return result.text, shared.draft_s if drafted else 0.0, answer_s, result.prompt_tokens, result.kv_bytes_kept

    def _decoder(self, cache: Cache) -> SpecKV:
        from draft_rag import SpecKV

        return SpecKV(target=self.target, method=PrefilledCache(budget=None, cache=cache))

    def _pass(self, sample: Sample) -> _Pass:
        """The shared prefill of ``sample`` (the latest one is kept; a new sample replaces it)."""
        key = (sample.prompt(), sample.max_new_tokens, tuple(self.methods), tuple(self.budgets))
        if self._latest is not None and self._latest.key == key:
            return self._latest
        self._latest = None  # free the previous sample's cache first
        messages = as_messages(sample.prompt())
        prompt_ids = chat_prompt_ids(self.target.tokenizer, messages).to(self.target.device)
        n = prompt_ids.shape[1]
        evictions = [self.engine(name, budget).eviction for name in self.methods for budget in self.budgets]
        evicting = [eviction for eviction in evictions if eviction.evicts(n)]
        steps = {getattr(e, "lookahead_tokens", None) or sample.max_new_tokens for e in evicting if e.uses_draft}
        if len(steps) > 1:
            msg = f"the shared KV pass needs one draft answer length for all SpecKV budgets, got {sorted(steps)}."
            raise ValueError(msg)
        started = time.perf_counter()
        lookahead = self._draft(messages, steps.pop()) if steps else None
        draft_s = time.perf_counter() - started
        length = 0 if lookahead is None else int(lookahead.shape[1])
        wanted = {
            _scorer_key(observers, e.uses_draft and length > 0)
            for e in evicting if (observers := e.observers(n)) is not None
        }
        with self.target.lock, ExitStack() as stack:
            scorers = {
                wants: stack.enter_context(
                    ObserverScores(self.target.model, wants[0].first, n + (length if wants[1] else 0)
                                   - wants[0].first, wants[0].reduction)
                )
                for wants in wanted
            }
            started = time.perf_counter()
            cache, _ = prefill(self.target.model, prompt_ids, chunk_size=n)
            prompt_s = time.perf_counter() - started
            started = time.perf_counter()
            if lookahead is not None and any(wants[1] for wants in wanted):
                prefill(self.target.model, lookahead.to(prompt_ids), cache, chunk_size=length)
            lookahead_s = time.perf_counter() - started
        layers = len(cache.layers)
        scores = {
            wants: [scorer.pop_layer(index)[..., : wants[0].first] for index in range(layers)]
            for wants, scorer in scorers.items()
        }
        self._latest = _Pass(key, prompt_ids, cache, scores, draft_s, prompt_s, lookahead_s, length)
        return self._latest

    def _draft(self, messages: list[dict[str, str]], steps: int) -> torch.Tensor | None:
        """The draft's answer in target tokens ``[1, L]``, as the engine makes it; None when it says nothing."""
        draft_ids = chat_prompt_ids(self.draft.tokenizer, messages)
        return draft_lookahead(self.draft, draft_ids, steps, self.target.tokenizer)


def _scorer_key(observers: Observers | None, with_lookahead: bool) -> tuple[Observers, bool]:
    """Which scorer serves ``observers``: its prompt observers, and whether a draft answer observes too."""
    assert observers is not None
    return Observers(observers.first, reduction=observers.reduction), with_lookahead and observers.lookahead


def _kept_cache(cache: Cache, keep: list[torch.Tensor]) -> Cache:
    """A new cache of the positions ``keep[layer]`` of each layer of ``cache`` (which is not changed)."""
    return cache_from_tensors(
        kept_entries(layer, positions) for layer, positions in zip(cache_layers(cache), keep, strict=True)
    )

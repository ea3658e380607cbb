"""What every KV-cache eviction method shares: the budget, and one prefill that scores and evicts.

A method turns a prompt into a KV cache of all prompt positions but the last, holding at most
``budget - 1`` entries per layer and KV head, so that once the last prompt token is run against it the
prompt cache holds at most ``budget`` entries. A method says only two things: which positions observe
(:meth:`KVEviction.observers`: none, the last prompt window, or the window and a draft answer) and how one
layer's scores become the positions each KV head keeps (:meth:`KVEviction.select`). The rest is here.

When the prompt (and the draft answer) run through the model in one forward pass, each layer is evicted
inside that pass, by a forward hook on its attention module that runs right after the layer's attention
(and after :class:`~draft_rag.scoring.ObserverScores` has scored that layer). So at no moment does the whole
uncompressed cache exist: the peak is the layers already compressed plus one layer's full keys and values.
A prefill in chunks (``chunk_size`` given) cannot do that, since a layer's scores are complete only after
the last chunk: it fills the full cache, then evicts every layer, and the full cache is the peak.

The kept entries keep their original RoPE positions; the engine runs later tokens at their true positions
against the shorter cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from draft_rag.checks import check_int
from draft_rag.hf import attention_modules, cache_bytes, cache_layers, empty_cache, hooked_cache, keep_layer_entries
from draft_rag.scoring import OBSERVER_BLOCK_SIZE, ObserverScores, ScoreReduction, prefill

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel


@dataclass(frozen=True)
class Observers:
    """The positions whose attention scores the prompt keys, as a method asks for them.

    Args:
        first: the first observing prompt position; every later prompt position observes too, and the keys
            before it are the ones scored.
        lookahead: whether a draft answer, run after the prompt, observes as well.
        reduction: how query heads and observers reduce to one score per key.
    """

    first: int
    lookahead: bool = False
    reduction: ScoreReduction = ScoreReduction()


@dataclass
class KVEviction:
    """Base class of the eviction methods: keep at most ``budget`` prompt KV entries per layer and KV head.

    Args:
        budget: KV entries per KV head per layer that the prompt cache may hold, the last prompt token
            included (default 256); ``None`` keeps everything. Prompts of at most ``budget`` tokens are not
            compressed at all.
        observer_block_size: keyword only; observer rows whose attention onto all keys is computed at once
            (default :data:`~draft_rag.scoring.OBSERVER_BLOCK_SIZE`): it bounds the scoring's extra memory,
            O(rows * heads * prompt tokens) per layer, and does not change which entries are kept.
    """

    budget: int | None = 256
    observer_block_size: int = field(default=OBSERVER_BLOCK_SIZE, kw_only=True, compare=False)

    name: ClassVar[str] = ""
    uses_draft: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.budget is not None:
            check_int("budget", self.budget, 1)
        check_int("observer_block_size", self.observer_block_size, 1)

    def evicts(self, prompt_length: int) -> bool:
        """Whether a prompt of ``prompt_length`` tokens is longer than the budget."""
        return self.budget is not None and prompt_length > self.budget

    def observers(self, prompt_length: int) -> Observers | None:
        """The observers that score a prompt of ``prompt_length`` tokens; None (the default): no scores."""
        return None

    def select(self, scores: torch.Tensor | None, older: int) -> torch.Tensor:
        """The positions among the first ``older`` that each KV head of one layer keeps, ``budget - 1`` of them.

        Args:
            scores: ``[batch, kv_heads, first]`` raw scores of the keys before :attr:`Observers.first`, or
                None for a method without observers.
            older: the prompt positions before the last one (all candidates).

        Returns:
            ``[budget - 1]`` positions for every head alike or ``[batch, kv_heads, budget - 1]``, ascending.
        """
        raise NotImplementedError

    def compress(
        self,
        model: PreTrainedModel,
        prompt_ids: torch.Tensor,
        lookahead_ids: torch.Tensor | None = None,
        *,
        chunk_size: int | None = None,
        peak: KVPeak | None = None,
    ) -> Cache:
        """Prefill ``prompt_ids[:, :-1]`` (``[1, n]``) into a cache of at most ``budget - 1`` entries a head.

        Args:
            model: the target model; it is not changed (hooks live only during this call).
            prompt_ids: the prompt's target tokens ``[1, n]``.
            lookahead_ids: ``[1, L]`` target tokens of a draft answer, extra observers for the methods that
                use them; their KV is never kept.
            chunk_size: ``None`` (default) runs the prompt (and the draft answer) in one forward pass and
                evicts each layer inside it, so the full cache never exists at once. A number prefills in
                chunks of that many tokens and evicts afterwards: the full cache exists at the peak.
            peak: if given, records the most key and value bytes the cache held during the call.
        """
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, 1)
        n = prompt_ids.shape[1]
        peak = peak if peak is not None else KVPeak()
        if not self.evicts(n):
            if n == 1:
                return empty_cache()
            cache, _ = prefill(model, prompt_ids[:, :-1], chunk_size=chunk_size or n - 1)
            peak.observe(cache)
            return cache
        observers = self.observers(n)
        # Without scores the last prompt token runs only later, against the compressed cache.
        ids = prompt_ids if observers is not None else prompt_ids[:, :-1]
        if observers is not None and observers.lookahead and lookahead_ids is not None:
            ids = torch.cat([prompt_ids, lookahead_ids.to(prompt_ids)], dim=1)
        with ExitStack() as stack:
            scorer = None
            if observers is not None:
                scorer = ObserverScores(
                    model, observers.first, ids.shape[1] - observers.first, observers.reduction,
                    block_size=self.observer_block_size,
                )
                stack.enter_context(scorer)

            def evict(layer: Any, index: int) -> None:
                scores = None if scorer is None else scorer.pop_layer(index)[..., : scorer.first_observer]
                keep_layer_entries(layer, self.select(scores, n - 1))

            if chunk_size is None:
                stack.enter_context(evicting_layers(model, evict, peak))
                cache, _ = prefill(model, ids, chunk_size=ids.shape[1])
            else:
                cache, _ = prefill(model, ids, chunk_size=chunk_size)
                peak.observe(cache)
                for index, layer in enumerate(cache_layers(cache)):
                    evict(layer, index)
        return cache


@contextmanager
def evicting_layers(model: PreTrainedModel, evict: Callable[[Any, int], None], peak: KVPeak) -> Iterator[None]:
    """Inside the block, evict each layer's cache right after that layer's attention ran in a forward pass.

    A forward hook on every attention module calls ``evict(cache_layer, layer_index)`` once the layer has
    written its keys and values (and after any hook registered before, such as the scoring's). Before that
    it records the cache's size in ``peak``: the layers evicted so far plus this layer in full. The mask and
    positions of a forward pass are computed before its first layer, and a layer reads only its own cache,
    so shrinking a layer's cache after its attention leaves the rest of the pass unchanged. Only forward
    calls of the thread that entered the block are acted on.
    """
    thread = threading.get_ident()

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if threading.get_ident() == thread:
            cache = hooked_cache(kwargs)
            peak.observe(cache)
            evict(cache_layers(cache)[module.layer_idx], module.layer_idx)

    handles = [module.register_forward_hook(hook, with_kwargs=True) for module in attention_modules(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class KVPeak:
    """The most key and value bytes held at once, sampled from the cache tensors where they are largest.

    Args:
        held: bytes held meanwhile in other caches (e.g. the compressed prompts of a batch), added to each
            sample.
    """

    def __init__(self, held: int = 0) -> None:
        self.held = held
        self.bytes = 0

    def observe(self, cache: Cache) -> None:
        """Count ``cache``'s keys and values now, plus ``held``, toward the peak."""
        self.count(cache_bytes(cache))

    def count(self, nbytes: int) -> None:
        """Count ``nbytes`` of keys and values held now, plus ``held``, toward the peak."""
        self.bytes = max(self.bytes, self.held + nbytes)

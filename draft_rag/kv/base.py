"""What every KV-cache eviction method shares: the budget, the prompt prefill and the per-head eviction.

A method turns a prompt into a KV cache of all prompt positions but the last, holding at most
``budget - 1`` entries per layer and KV head, so that once the last prompt token is run against it the
prompt cache holds at most ``budget`` entries. Only :meth:`KVEviction.prefill_and_select` differs between
methods: which entries each KV head keeps. The kept entries keep their original RoPE positions; the
engine runs later tokens at their true positions against the shorter cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from draft_rag.scoring import check_int, prefill

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel


@dataclass
class KVEviction:
    """Base class of the eviction methods: keep at most ``budget`` prompt KV entries per layer and KV head.

    Args:
        budget: KV entries per KV head per layer that the prompt cache may hold, the last prompt token
            included (default 256); ``None`` keeps everything. Prompts of at most ``budget`` tokens are not
            compressed at all.
    """

    budget: int | None = 256

    name: ClassVar[str] = ""
    uses_draft: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.budget is not None:
            check_int("budget", self.budget, 1)

    def evicts(self, prompt_length: int) -> bool:
        """Whether a prompt of ``prompt_length`` tokens is longer than the budget."""
        return self.budget is not None and prompt_length > self.budget

    def compress(
        self,
        model: PreTrainedModel,
        prompt_ids: torch.Tensor,
        lookahead_ids: torch.Tensor | None = None,
        *,
        chunk_size: int = 2048,
    ) -> Cache:
        """Prefill ``prompt_ids[:, :-1]`` (``[1, n]``) into a cache of at most ``budget - 1`` entries a head.

        ``lookahead_ids`` (``[1, L]``, target tokens of a draft answer) are extra observers for the methods
        that use them; their KV is never kept.
        """
        if not self.evicts(prompt_ids.shape[1]):
            return prefill_prompt(model, prompt_ids, chunk_size)
        cache, keep = self.prefill_and_select(model, prompt_ids, lookahead_ids, chunk_size)
        keep_entries(cache, keep)
        return cache

    def prefill_and_select(
        self,
        model: PreTrainedModel,
        prompt_ids: torch.Tensor,
        lookahead_ids: torch.Tensor | None,
        chunk_size: int,
    ) -> tuple[Cache, torch.Tensor]:
        """Return a cache of exactly the first ``n - 1`` prompt positions and the positions each head keeps.

        The indices are ``[batch, kv_heads, budget - 1]`` (the same for every layer) or
        ``[layers, batch, kv_heads, budget - 1]``, each row sorted ascending.
        """
        raise NotImplementedError


def prefill_prompt(model: PreTrainedModel, prompt_ids: torch.Tensor, chunk_size: int) -> Cache:
    """A cache of every prompt position but the last (empty for a one-token prompt), no scoring."""
    from transformers import DynamicCache

    if prompt_ids.shape[1] == 1:
        return DynamicCache()
    cache, _ = prefill(model, prompt_ids[:, :-1], chunk_size=chunk_size)
    return cache


def keep_entries(cache: Cache, keep: torch.Tensor) -> None:
    """Keep, in every layer of ``cache``, only the sequence positions ``keep`` of each KV head, in place.

    ``keep`` is ``[batch, kv_heads, k]`` for all layers alike or ``[layers, batch, kv_heads, k]``.
    """
    with torch.inference_mode():
        for index, layer in enumerate(cache.layers):
            rows = keep if keep.dim() == 3 else keep[index]
            gather = rows.to(layer.keys.device)[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)


def crop_to(cache: Cache, length: int) -> None:
    """Drop every cached position from ``length`` on (draft-answer tokens, the last prompt token)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)

"""Recomputing chosen positions of a laid-out draft cache in context (CacheBlend-style selective recompute).

A :class:`~draft_rag.draft_cache.DraftCache` encodes each document on its own, so the K/V of a document's tokens
never saw the documents before it. :func:`recompute_in_context` runs chosen tokens through the draft again over
the laid-out cache, each attending to every position before it, and writes their fresh K/V over the cached ones:
recomputing every document token this way gives the K/V of one prefill of the whole prompt. SpecPC's
``recompute_factor`` recomputes its candidates so (:class:`~draft_rag.specpc.SpecPC`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from draft_rag.hf import cache_from_tensors, cache_kwargs, cache_tensors

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel


def recompute_in_context(
    model: PreTrainedModel, past: DynamicCache, input_ids: Sequence[int], positions: Sequence[int]
) -> DynamicCache:
    """``past`` (the K/V of prompt positions ``0 .. L-1``) with the K/V of ``positions`` computed again in context.

    The tokens of ``input_ids`` at ``positions`` (increasing, each ``< L``) run through ``model``'s decoder in one
    forward pass at their own positions: each attends to the cached positions before it except those being
    recomputed, whose fresh K/V (from this pass, layer by layer) it reads instead, and to itself. Their fresh
    K/V then replace the cached ones; the other positions keep theirs. ``past`` is consumed (the pass appends to
    it); the caller holds the model's lock.
    """
    length = past.get_seq_length()
    if not positions:
        return past
    if any(b <= a for a, b in zip(positions, positions[1:])) or positions[0] < 0 or positions[-1] >= length:
        msg = f"positions must increase and lie in [0, {length}) (the cached positions); got {list(positions)[:8]}..."
        raise ValueError(msg)
    device = model.device
    fresh = torch.tensor(list(positions), device=device)
    stale = torch.zeros(length, dtype=torch.bool, device=device)
    stale[fresh] = True
    before = torch.arange(length, device=device)[None, :] < fresh[:, None]
    allowed = torch.cat([before & ~stale[None, :], fresh[None, :] <= fresh[:, None]], dim=1)
    mask = torch.zeros(allowed.shape, dtype=model.dtype, device=device)
    mask = mask.masked_fill(~allowed, torch.finfo(model.dtype).min)[None, None]
    ids = torch.tensor([[input_ids[p] for p in positions]], device=device)
    decoder = model.get_decoder()
    with torch.no_grad():
        decoder(input_ids=ids, position_ids=fresh[None], attention_mask=mask, use_cache=True,
                **cache_kwargs(decoder, past))
    layers = []
    for keys, values in cache_tensors(past):
        new_keys, new_values = keys[:, :, :length].clone(), values[:, :, :length].clone()
        new_keys[:, :, fresh] = keys[:, :, length:]
        new_values[:, :, fresh] = values[:, :, length:]
        layers.append((new_keys, new_values))
    return cache_from_tensors(layers)

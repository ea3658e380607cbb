"""Draft-guided sparse prefill: the target attends to a local band plus the key columns the observers pick.

A long prefill spends most of its attention on keys that matter little. Here every layer first scores each
key by the attention it gets from the *observer* positions (the last ``num_observers`` positions of the
sequence: the end of the prompt and, in SpecKV, the draft model's answer), exactly like
:mod:`draft_rag.scoring`: causal softmax rows in fp32, max over the query heads of each KV group, then max
over observers, giving one score per KV head and key. The ``vertical_size`` best-scored keys become
*vertical* columns of that KV head. Then every query ``i`` attends only to

- its *slash* band: the ``window_size`` keys ending at itself, ``i - window_size + 1 .. i``, and
- the vertical columns that lie before its band (``< i - window_size + 1``), so no key is counted twice.

The vertical pattern is shared by the query heads of a KV group (as the SpecKV reference does), so GQA
models gather the vertical keys and values once per KV head and layer. Only keys that some query sees
outside its band (``< n - window_size``) are candidates. Queries are processed in blocks of
``block_size`` (default :data:`QUERY_BLOCK_SIZE`): per KV head, each block runs one sdpa call (in fp32) of
the group's query heads over the band keys the block spans plus the vertical keys, under one additive mask
shared by the group, so the extra memory is O(block_size * (window_size + vertical_size + block_size)).

Cost: a query attends to at most ``window_size + vertical_size`` keys (the first ``window_size`` queries
attend causally to everything before them), against ``i + 1`` for dense causal attention, and a block
also scores up to ``block_size - 1`` band keys per query that its mask discards. Of dense attention's
``n**2 / 2`` scores it computes at most ``(window_size**2 / 2 + (n - window_size) * (window_size +
vertical_size + block_size)) / (n**2 / 2)``: 56% at 16k tokens with the defaults (2048, 2048, 1024), 35%
with 1024/1024, and less when the chosen columns lie late in the sequence (a query uses only the columns
before its band). The observer scoring adds ``num_observers * n`` scores per head. Masked blocks cost
more per score than dense causal sdpa: on a 2-core AVX2 CPU the attention of a 16k-token Qwen2.5-1.5B layer
takes about 0.65x of dense with the defaults and 0.45x with 1024/1024. Projections and MLPs are
unchanged, so the prefill as a whole saves less (see ``docs/bench/sparse_prefill.md``). Sequences of at
most ``window_size + vertical_size`` tokens, and every forward call that extends a cache (decode steps,
later prefill chunks), run the model's dense attention.

Based on https://arxiv.org/abs/2506.08373 (SpecKV's sparse prefill) and MInference's vertical-slash pattern.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from draft_rag.checks import check_int
from draft_rag.hf import attention_modules, check_supported, register_attention
from draft_rag.scoring import OBSERVER_BLOCK_SIZE, ScoreReduction, observer_attention, reduce_rows

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PREFILL_WINDOW_SIZE = 2048
"""Default band: each query attends to the keys ending at itself, this many of them."""
PREFILL_VERTICAL_SIZE = 2048
"""Default number of vertical key columns per layer and KV head."""
QUERY_BLOCK_SIZE = 1024
"""Queries whose sparse attention is computed at once."""

# Implementations whose mask is None for an unpadded prefill from position 0, so the sparse path knows the
# call is plain causal attention. Eager and flex attention always build a mask.
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
_NAME_PREFIX = "draft_rag_sparse_prefill_"


def vertical_columns(
    query: torch.Tensor,
    key: torch.Tensor,
    num_observers: int,
    vertical_size: int,
    window_size: int,
    scaling: float,
) -> torch.Tensor:
    """The vertical key columns of each KV head, ascending: ``[batch, kv_heads, min(vertical_size, n - window_size)]``.

    Keys are scored by the causal fp32 attention of the last ``num_observers`` queries (max over each KV
    group's query heads, then over observers); only keys ``< n - window_size`` are candidates, since later
    keys lie inside every query's band that can see them.

    Args:
        query: post-RoPE queries ``[batch, heads, n, dim]`` of a prefill from position 0.
        key: post-RoPE keys ``[batch, kv_heads, n, dim]``.
        num_observers, vertical_size, window_size, scaling: see :func:`sparse_prefill_attention`.
    """
    batch, _, n, _ = query.shape
    kv_heads = key.shape[1]
    candidates = max(n - window_size, 0)
    count = min(vertical_size, candidates)
    if count == 0:
        return torch.empty(batch, kv_heads, 0, dtype=torch.long, device=key.device)
    keys = key.float()
    scores = torch.zeros(batch, kv_heads, candidates, device=key.device)
    for block in range(n - num_observers, n, OBSERVER_BLOCK_SIZE):
        end = min(block + OBSERVER_BLOCK_SIZE, n)
        positions = torch.arange(block, end, device=key.device)
        # The softmax runs over every key the observer sees; only the candidates' probabilities are kept.
        probs = observer_attention(query[:, :, block:end], keys, positions, scaling)[..., :candidates]
        rows = reduce_rows(probs, kv_heads, ScoreReduction(), None)
        scores = torch.maximum(scores, rows.amax(dim=2))
    return scores.topk(count, dim=-1).indices.sort(dim=-1).values


def sparse_prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window_size: int,
    vertical_size: int,
    num_observers: int,
    scaling: float,
    *,
    block_size: int = QUERY_BLOCK_SIZE,
) -> torch.Tensor:
    """Vertical-slash sparse causal attention of a prefill from position 0 (see the module docstring).

    Args:
        query: post-RoPE queries ``[batch, heads, n, dim]``.
        key, value: ``[batch, kv_heads, n, dim]``; ``heads`` must be a multiple of ``kv_heads`` (GQA).
        window_size: keys in each query's band, ending at itself (>= 1).
        vertical_size: vertical key columns per KV head (>= 0).
        num_observers: the last ``num_observers`` positions score the keys (1 .. n).
        scaling: the softmax temperature, usually ``dim ** -0.5``.
        block_size: queries computed at once; the result does not depend on it, the speed and memory do.

    Returns:
        ``[batch, heads, n, dim]`` in the query's dtype. When ``n <= window_size + vertical_size`` it is
        exactly dense causal sdpa.
    """
    check_int("window_size", window_size, 1)
    check_int("vertical_size", vertical_size, 0)
    check_int("block_size", block_size, 1)
    batch, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    if key.shape[2] != n or value.shape[2] != n or heads % kv_heads:
        msg = (
            f"sparse prefill needs as many keys as queries (a prefill from position 0) and heads divisible by "
            f"kv_heads; got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}."
        )
        raise ValueError(msg)
    check_int("num_observers", num_observers, 1)
    if num_observers > n:
        msg = f"num_observers must be at most the sequence length {n}, got {num_observers}."
        raise ValueError(msg)
    if n <= window_size + vertical_size:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)

    group = heads // kv_heads
    columns = vertical_columns(query, key, num_observers, vertical_size, window_size, scaling)
    out = torch.empty_like(query)
    # The first window_size queries see every earlier key through their band: plain causal attention.
    out[:, :, :window_size] = F.scaled_dot_product_attention(
        query[:, :, :window_size].float(),
        key[:, :, :window_size].float(),
        value[:, :, :window_size].float(),
        is_causal=True,
        scale=scaling,
        enable_gqa=True,
    ).to(query.dtype)
    rows = min(block_size, n - window_size)
    band_width = window_size + rows - 1
    # Block keys, per KV head: the band_width keys ending at the block's last query (fewer for a shorter
    # last block), then the vertical columns. Row a of a block sees band key c when a <= c < a + window_size.
    offsets = torch.arange(band_width, device=query.device)
    local = torch.arange(rows, device=query.device)[:, None]
    band_hidden = (offsets < local) | (offsets >= local + window_size)
    for b in range(batch):
        for g in range(kv_heads):
            head_columns = columns[b, g]
            ascending = head_columns.tolist()
            # Float masks shared by the group's query heads (a boolean one would be expanded to floats per
            # head inside sdpa); keys, values and mask live in buffers that each block updates in part.
            keys = torch.zeros(band_width + len(ascending), dim, device=query.device)
            values = torch.zeros_like(keys)
            keys[band_width:] = key[b, g, head_columns].float()
            values[band_width:] = value[b, g, head_columns].float()
            mask = torch.zeros(rows, band_width + len(ascending), device=query.device)
            mask[:, :band_width].masked_fill_(band_hidden, float("-inf"))
            heads_of_group = slice(g * group, (g + 1) * group)
            previous_fully_seen = 0
            for start in range(window_size, n, block_size):
                end = min(start + block_size, n)
                band_start = start - window_size + 1
                keys[: end - band_start] = key[b, g, band_start:end].float()
                values[: end - band_start] = value[b, g, band_start:end].float()
                # Columns before the block's first band are seen by all its queries; the next ones up to the
                # last query's band start are seen by some.
                fully_seen = bisect.bisect_left(ascending, band_start)
                used = bisect.bisect_left(ascending, end - window_size)
                mask[:, band_width + previous_fully_seen : band_width + used] = 0.0
                first_in_band = torch.arange(band_start, end - window_size + 1, device=query.device)[:, None]
                partly_seen = mask[: end - start, band_width + fully_seen : band_width + used]
                partly_seen.masked_fill_(head_columns[fully_seen:used] >= first_in_band, float("-inf"))
                previous_fully_seen = fully_seen
                attended = F.scaled_dot_product_attention(
                    query[b, heads_of_group, start:end].float()[None],
                    keys[None, None, : band_width + used],
                    values[None, None, : band_width + used],
                    attn_mask=mask[None, None, : end - start, : band_width + used],
                    scale=scaling,
                    enable_gqa=True,
                )
                out[b, heads_of_group, start:end] = attended[0].to(query.dtype)
    return out


@dataclass(frozen=True)
class _Settings:
    window_size: int
    vertical_size: int
    num_observers: int
    block_size: int


# Per thread, the settings of each model config inside a sparse_prefill block (keyed by id(config)).
_active = threading.local()


def _thread_settings() -> dict[int, _Settings]:
    if not hasattr(_active, "settings"):
        _active.settings = {}
    settings: dict[int, _Settings] = _active.settings
    return settings


@functools.cache
def _registered_name(previous: str) -> str:
    """Register (once) the sparse attention wrapping ``previous`` and ``previous``'s mask; return its name."""
    name = _NAME_PREFIX + previous
    register_attention(name, previous, _attention_function)
    return name


def _attention_function(dense: Callable[..., Any]) -> Callable[..., Any]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        settings = _thread_settings().get(id(getattr(module, "config", None)))
        n = key.shape[2]
        if (
            settings is None  # another thread's call on a model that one thread runs sparse
            or query.shape[2] != n  # the call extends a cache: decode step or later prefill chunk
            or n <= settings.window_size + settings.vertical_size
        ):
            return dense(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if attention_mask is not None:
            msg = (
                "sparse prefill supports unpadded sequences only (attention_mask of ones, batch size 1 or "
                "equal lengths); pass no attention_mask, or run without sparse_prefill."
            )
            raise NotImplementedError(msg)
        sliding = kwargs.get("sliding_window")
        if sliding is not None and n > sliding:
            msg = (
                f"sparse prefill does not support sliding-window layers (window {sliding} < {n} tokens); "
                "use a model with full attention, or run without sparse_prefill."
            )
            raise NotImplementedError(msg)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        out = sparse_prefill_attention(
            query,
            key,
            value,
            settings.window_size,
            settings.vertical_size,
            min(settings.num_observers, n),
            scaling,
            block_size=settings.block_size,
        )
        return out.transpose(1, 2).contiguous(), None

    return attention


@contextlib.contextmanager
def sparse_prefill(
    model: PreTrainedModel,
    *,
    num_observers: int,
    window_size: int = PREFILL_WINDOW_SIZE,
    vertical_size: int = PREFILL_VERTICAL_SIZE,
    block_size: int = QUERY_BLOCK_SIZE,
) -> Iterator[None]:
    """Run ``model``'s long prefills with vertical-slash sparse attention inside the ``with`` block.

    A forward call made by the entering thread, from position 0 (no earlier cache) over more than
    ``window_size + vertical_size`` tokens, uses :func:`sparse_prefill_attention` in every layer, with the
    last ``num_observers`` positions of that sequence as observers (capped at its length). Every other call
    (shorter sequences, decode steps, later chunks of a chunked prefill, other threads) gets exactly the
    model's own dense attention. So feed the whole sequence in one forward call, e.g.
    ``prefill(model, ids, chunk_size=ids.shape[1])``.

    The block switches the attention implementation of the model's configs and restores it on exit, also
    when the block raises; the model is otherwise untouched. Hold the model's lock (``LoadedModel.lock``)
    across the block: another thread's call meanwhile still computes dense attention, but two blocks on one
    model must not overlap.

    Args:
        model: a decoder-only transformers model loaded with ``attn_implementation`` ``"sdpa"`` or flash
            attention (Llama, Qwen2, Qwen3, Mistral...), whose attention draft-rag's scoring supports (see
            :func:`draft_rag.hf.check_supported`; NotImplementedError otherwise, before anything runs).
        num_observers: how many positions at the end of the sequence score the keys; in SpecKV the last
            ``window_size + 1`` prompt positions plus the draft answer's tokens.
        window_size: keys in each query's local band (default :data:`PREFILL_WINDOW_SIZE`).
        vertical_size: vertical key columns per layer and KV head (default :data:`PREFILL_VERTICAL_SIZE`).
        block_size: queries computed at once (default :data:`QUERY_BLOCK_SIZE`).

    Example:
        >>> with loaded.lock, sparse_prefill(loaded.model, num_observers=33):  # doctest: +SKIP
        ...     cache, logits = prefill(loaded.model, ids, chunk_size=ids.shape[1])
    """
    check_int("num_observers", num_observers, 1)
    check_int("window_size", window_size, 1)
    check_int("vertical_size", vertical_size, 0)
    check_int("block_size", block_size, 1)
    check_supported(model, None)
    configs: list[Any] = list({id(m.config): m.config for m in attention_modules(model)}.values())
    previous = [config._attn_implementation for config in configs]
    for implementation in previous:
        if implementation not in SUPPORTED_IMPLEMENTATIONS:
            hint = " (already inside a sparse_prefill block)" if str(implementation).startswith(_NAME_PREFIX) else ""
            msg = (
                f"sparse_prefill needs a model whose attn_implementation is one of "
                f"{', '.join(SUPPORTED_IMPLEMENTATIONS)}, got {implementation!r}{hint}; load the model with "
                "attn_implementation='sdpa'."
            )
            raise ValueError(msg)
    settings = _Settings(window_size, vertical_size, num_observers, block_size)
    active = _thread_settings()
    try:
        for config, implementation in zip(configs, previous):
            name = _registered_name(implementation)
            active[id(config)] = settings
            config._attn_implementation = name
        yield
    finally:
        for config, implementation in zip(configs, previous):
            config._attn_implementation = implementation
            active.pop(id(config), None)

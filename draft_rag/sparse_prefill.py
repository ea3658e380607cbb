"""Draft-guided sparse prefill: the target attends to a local band plus the key columns the observers pick.

A long prefill spends most of its attention on keys that matter little. Here every layer first scores each
key by the attention it gets from the *observer* positions (the last ``num_observers`` positions of the
sequence: the end of the prompt and, in SpecKV, the draft model's answer), exactly like
:mod:`draft_rag.scoring`: causal softmax rows in fp32, max over the query heads of each KV group, then max
over observers, giving one score per KV head and key. The ``vertical_size`` best-scored keys become
*vertical* columns of that KV head. Then every query ``i`` attends only to

- its *slash* band: the ``window_size`` keys ending at itself, ``i - window_size + 1 .. i``, and
- the vertical columns that lie before its band (``< i - window_size + 1``), so no key is counted twice.

The vertical pattern is shared by the query heads of a KV group (as the SpecKV reference does). Only keys
that some query sees outside its band (``< n - window_size``) are candidates. The attention runs in the
model's dtype through one of two kernels, both without a loop over heads and without reading any value
back to the host:

- ``"flex"`` (the default on CUDA): PyTorch's FlexAttention, compiled, over the vertical keys gathered in
  front of all keys and a block mask built on the device: for each block of 128 queries, the blocks of
  vertical keys and the band's blocks of keys that it sees, so key blocks no query of the block sees are
  skipped.
- ``"sdpa"`` (the default elsewhere): queries in blocks of ``block_size`` (default :data:`QUERY_BLOCK_SIZE`),
  each one sdpa call of all heads over the band keys the block spans plus the vertical keys, under a
  boolean mask shared by each KV group's query heads; the extra memory is
  O(block_size * (window_size + vertical_size + block_size)) per KV head. On a 2-core CPU it runs within
  about 15% of the per-head loop it replaced, either way.

Cost: a query attends to at most ``window_size + vertical_size`` keys (the first ``window_size`` queries
attend causally to everything before them), against ``i + 1`` for dense causal attention. The sdpa kernel
also scores, per block, the band keys its mask discards (up to ``block_size - 1`` per query) and vertical
keys that lie after a query's band; FlexAttention scores only the 128 x 128 blocks that hold a seen key.
The observer scoring adds ``num_observers * n`` scores per head. On a 2-core CPU the masked blocks cost
more per score than dense causal sdpa, so the saving there is small (see ``docs/bench/sparse_prefill.md``);
projections and MLPs are unchanged. Sequences of at most
``window_size + vertical_size`` tokens, and every forward call that extends a cache (decode steps, later
prefill chunks), run the model's dense attention.

Based on https://arxiv.org/abs/2506.08373 (SpecKV's sparse prefill) and MInference's vertical-slash pattern.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from draft_rag.checks import check_int
from draft_rag.hf import attention_modules, check_supported, register_attention
from draft_rag.scoring import OBSERVER_BLOCK_SIZE, ScoreReduction, observer_attention, reduce_rows, score_operand

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask
    from transformers import PreTrainedModel

PREFILL_WINDOW_SIZE = 2048
"""Default band: each query attends to the keys ending at itself, this many of them."""
PREFILL_VERTICAL_SIZE = 2048
"""Default number of vertical key columns per layer and KV head."""
QUERY_BLOCK_SIZE = 1024
"""Queries whose sparse attention is computed at once by the ``"sdpa"`` kernel."""
FLEX_BLOCK_SIZE = 128
"""Queries and keys per block of FlexAttention's block mask (its default block size)."""

Kernel = Literal["flex", "sdpa"]
KERNELS: tuple[Kernel, ...] = ("flex", "sdpa")

# Implementations whose mask is None for an unpadded prefill from position 0, so the sparse path knows the
# call is plain causal attention. Eager and flex attention always build a mask.
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
_NAME_PREFIX = "draft_rag_sparse_prefill_"


def default_kernel(device: torch.device) -> Kernel:
    """The kernel :func:`sparse_prefill_attention` uses on ``device`` when none is named: FlexAttention on CUDA
    (compiled to a block-sparse GPU kernel), sdpa over query blocks elsewhere (FlexAttention compiles on a
    CPU too, but takes about a minute per new shape there and ran no faster in our measurements)."""
    return "flex" if device.type == "cuda" else "sdpa"


def _check_kernel(kernel: object) -> None:
    if kernel is not None and kernel not in KERNELS:
        msg = f"kernel must be one of {', '.join(KERNELS)} or None (the device's default), got {kernel!r}."
        raise ValueError(msg)


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
    keys = score_operand(key)
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
    kernel: Kernel | None = None,
) -> torch.Tensor:
    """Vertical-slash sparse causal attention of a prefill from position 0 (see the module docstring).

    Args:
        query: post-RoPE queries ``[batch, heads, n, dim]``.
        key, value: ``[batch, kv_heads, n, dim]``; ``heads`` must be a multiple of ``kv_heads`` (GQA).
        window_size: keys in each query's band, ending at itself (>= 1).
        vertical_size: vertical key columns per KV head (>= 0).
        num_observers: the last ``num_observers`` positions score the keys (1 .. n).
        scaling: the softmax temperature, usually ``dim ** -0.5``.
        block_size: queries computed at once by the ``"sdpa"`` kernel; the result does not depend on it,
            the speed and memory do.
        kernel: ``"flex"`` or ``"sdpa"`` (see the module docstring); None (default): :func:`default_kernel`.

    Returns:
        ``[batch, heads, n, dim]`` in the query's dtype. When ``n <= window_size + vertical_size`` it is
        exactly dense causal sdpa.
    """
    check_int("window_size", window_size, 1)
    check_int("vertical_size", vertical_size, 0)
    check_int("block_size", block_size, 1)
    _check_kernel(kernel)
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
    columns = vertical_columns(query, key, num_observers, vertical_size, window_size, scaling)
    if (kernel or default_kernel(query.device)) == "flex":
        return flex_vertical_slash(query, key, value, columns, window_size, scaling)
    return sdpa_vertical_slash(query, key, value, columns, window_size, scaling, block_size)


def sdpa_vertical_slash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    columns: torch.Tensor,
    window_size: int,
    scaling: float,
    block_size: int,
) -> torch.Tensor:
    """Attention under the vertical-slash mask of ``columns`` (``[batch, kv_heads, vertical]``, ascending),
    through sdpa over blocks of ``block_size`` queries; shapes as in :func:`sparse_prefill_attention`."""
    batch, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(query)
    # The first window_size queries see every earlier key through their band: plain causal attention.
    out[:, :, :window_size] = F.scaled_dot_product_attention(
        query[:, :, :window_size], key[:, :, :window_size], value[:, :, :window_size],
        is_causal=True, scale=scaling, enable_gqa=True,
    )
    gather = columns[..., None].expand(-1, -1, -1, dim)
    vertical_keys, vertical_values = key.gather(2, gather), value.gather(2, gather)
    rows = min(block_size, n - window_size)
    # Block keys: the keys from the first query's band start to the block's end, then the vertical columns.
    # Row a of a block sees band key c when a <= c < a + window_size.
    offsets = torch.arange(window_size + rows - 1, device=query.device)
    local = torch.arange(rows, device=query.device)[:, None]
    band_seen = (offsets >= local) & (offsets < local + window_size)
    for start in range(window_size, n, block_size):
        end = min(start + block_size, n)
        band_start = start - window_size + 1
        # The block's queries see only columns below end - window_size: distinct and ascending, they are among
        # the first that many, a bound known without reading the columns back.
        used = min(columns.shape[-1], end - window_size)
        # Each KV head becomes a batch entry whose group of query heads shares its keys and its mask.
        keys = torch.cat([key[:, :, band_start:end], vertical_keys[:, :, :used]], dim=2).flatten(0, 1)[:, None]
        values = torch.cat([value[:, :, band_start:end], vertical_values[:, :, :used]], dim=2).flatten(0, 1)[:, None]
        first_in_band = torch.arange(band_start, end - window_size + 1, device=query.device)[:, None]
        seen = torch.cat([
            band_seen[: end - start, : end - band_start].expand(batch, kv_heads, -1, -1),
            columns[:, :, None, :used] < first_in_band,
        ], dim=-1)
        attended = F.scaled_dot_product_attention(
            query[:, :, start:end].reshape(batch * kv_heads, group, end - start, dim), keys, values,
            attn_mask=seen.flatten(0, 1)[:, None], scale=scaling, enable_gqa=True,
        )
        out[:, :, start:end] = attended.reshape(batch, heads, end - start, dim)
    return out


def vertical_slash_block_mask(columns: torch.Tensor, n: int, window_size: int, heads: int) -> BlockMask:
    """FlexAttention's block mask of the vertical-slash pattern, over keys laid out as in :func:`flex_vertical_slash`.

    The key sequence is the vertical columns of each KV head (``columns``, ``[batch, kv_heads, vertical]``,
    ascending), padded to whole blocks with the never-seen column ``n``, followed by all ``n`` keys. A block
    of queries lists the key blocks it sees some key of; those whose every key it sees are marked full, so
    FlexAttention skips the mask there. Built with tensor operations on ``columns``' device, without reading
    them back. ``heads``: query heads (a multiple of ``kv_heads``).
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, kv_heads, vertical = columns.shape
    group = heads // kv_heads
    size = FLEX_BLOCK_SIZE
    padded_size = max(-(-vertical // size), 1) * size
    padded = F.pad(columns, (0, padded_size - vertical), value=n)
    device = columns.device
    starts = torch.arange(0, n, size, device=device)
    ends = (starts + size).clamp(max=n) - 1  # the last query (or key) of each block
    # Query i sees column c when c <= i - window_size; the columns of a block are ascending.
    column_blocks = padded.view(batch, kv_heads, padded_size // size, size)
    vertical_any = column_blocks[:, :, None, :, 0] <= (ends - window_size)[:, None]
    vertical_all = column_blocks[:, :, None, :, -1] <= (starts - window_size)[:, None]
    # Query i sees band key k when i - window_size < k <= i.
    band_any = (starts[None] <= ends[:, None]) & (ends[None] > starts[:, None] - window_size)
    band_all = (ends[None] <= starts[:, None]) & (starts[None] > ends[:, None] - window_size)
    shape = (batch, kv_heads, len(starts), len(starts))
    seen_any = torch.cat([vertical_any, band_any.expand(shape)], dim=-1)
    seen_all = torch.cat([vertical_all, band_all.expand(shape)], dim=-1)

    def listed(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query block, how many key blocks are set, and their indices first (ascending), for every head."""
        blocks = blocks.repeat_interleave(group, dim=1)
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return blocks.sum(dim=-1, dtype=torch.int32), order.to(torch.int32)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        column = padded[b, h // group, kv.clamp(max=padded_size - 1)]
        k = kv - padded_size
        return ((kv < padded_size) & (column <= q - window_size)) | ((k >= 0) & (k <= q) & (k > q - window_size))

    return BlockMask.from_kv_blocks(
        *listed(seen_any & ~seen_all), *listed(seen_all), BLOCK_SIZE=size, mask_mod=mask_mod,
        seq_lengths=(n, padded_size + n),
    )


def flex_vertical_slash(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    columns: torch.Tensor,
    window_size: int,
    scaling: float,
    attend: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """Attention under the vertical-slash mask of ``columns`` through FlexAttention (:func:`vertical_slash_block_mask`).

    ``attend`` is the FlexAttention function to call (default: :func:`torch.nn.attention.flex_attention.flex_attention`
    compiled by :func:`torch.compile`, once per process); shapes as in :func:`sparse_prefill_attention`.
    """
    n, dim = query.shape[2], query.shape[3]
    mask = vertical_slash_block_mask(columns, n, window_size, query.shape[1])
    padded_size = mask.seq_lengths[1] - n
    # The padding columns (index n) gather the last key; the mask never shows them.
    gather = F.pad(columns, (0, padded_size - columns.shape[-1]), value=n - 1)[..., None].expand(-1, -1, -1, dim)
    keys = torch.cat([key.gather(2, gather), key], dim=2)
    values = torch.cat([value.gather(2, gather), value], dim=2)
    attend = attend or _compiled_flex_attention()
    out: torch.Tensor = attend(query, keys, values, block_mask=mask, scale=scaling, enable_gqa=True)
    return out


@functools.cache
def _compiled_flex_attention() -> Callable[..., Any]:
    """FlexAttention compiled into a fused block-sparse kernel (uncompiled, it materializes every score)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


@dataclass(frozen=True)
class _Settings:
    window_size: int
    vertical_size: int
    num_observers: int
    block_size: int
    kernel: Kernel | None


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
            kernel=settings.kernel,
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
    kernel: Kernel | None = None,
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
        block_size: queries computed at once by the ``"sdpa"`` kernel (default :data:`QUERY_BLOCK_SIZE`).
        kernel: ``"flex"`` or ``"sdpa"``; None (default): FlexAttention on CUDA, sdpa elsewhere (see
            :func:`sparse_prefill_attention`).

    Example:
        >>> with loaded.lock, sparse_prefill(loaded.model, num_observers=33):  # doctest: +SKIP
        ...     cache, logits = prefill(loaded.model, ids, chunk_size=ids.shape[1])
    """
    check_int("num_observers", num_observers, 1)
    check_int("window_size", window_size, 1)
    check_int("vertical_size", vertical_size, 0)
    check_int("block_size", block_size, 1)
    _check_kernel(kernel)
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
    settings = _Settings(window_size, vertical_size, num_observers, block_size, kernel)
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

"""The scoring primitive shared by SpecPC, SpecKV and the attention baselines.

During an ordinary forward pass (sdpa or flash-attention; eager is never needed) every attention layer
is observed by a temporary forward hook. For the *observer* positions (a contiguous tail of the sequence:
the last prompt window plus lookahead / draft-answer tokens) the hook rebuilds the query states from the
layer's input (rotated by RoPE in the layers that rotate them: SmolLM3, for one, skips RoPE in every
fourth layer), reads the keys of all positions from the KV cache, and computes

    A[l, h, o, j] = softmax_j(q[l, h, o] . k[l, kv(h), j] / sqrt(d))    (fp32, causal)

for those rows only, never the n x n matrix. Observers are processed in blocks of ``block_size`` rows
(default :data:`OBSERVER_BLOCK_SIZE`), each reduced at once (query heads of each KV group, then
observers) into one score per layer, KV head and key, so the extra memory is O(block_size * heads * n)
per layer however many observers there are. Scores combine across blocks and forward calls, so a long
prompt can be prefilled in chunks and lookahead tokens generated one at a time while the scores
accumulate. Hooks live only inside the ``with`` block and act only on forward calls made by the thread
that entered it, so another thread may run the same (shared) model meanwhile: the user's model is not
changed. What the rebuild assumes of a model's attention layers is checked, before anything runs, by
:func:`draft_rag.hf.check_supported`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from draft_rag.checks import check_int
from draft_rag.hf import (
    attention_modules,
    cache_kwargs,
    empty_cache,
    hooked_cache,
    layer_keys,
    query_rebuild,
    rebuild_queries,
)

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel

Reduction = Literal["max", "mean"]
Pool = Literal["max", "avg"]

OBSERVER_BLOCK_SIZE = 32
"""Observer rows whose attention onto all keys is computed at once (bounds the scoring's extra memory)."""


@dataclass(frozen=True)
class ScoreReduction:
    """How observer attention rows become one score per key.

    Args:
        heads: reduce the query heads of each KV group (GQA) with ``"max"`` (default) or ``"mean"``.
        observers: reduce the observer rows with ``"max"`` (default) or ``"mean"``.
        weighted_query: first scale observer row ``i`` of ``|O|`` by ``i / (|O| - 1)``, a linear ramp from
            0 for the oldest observer to 1 for the newest (1 when there is a single observer), so tokens
            near the end of the prompt speak loudest.
        ramp_rows: with ``weighted_query``, ramp over the first ``ramp_rows`` observers only (the prompt
            window) and weigh the later ones (lookahead tokens) 1; None (default) ramps over all.
    """

    heads: Reduction = "max"
    observers: Reduction = "max"
    weighted_query: bool = False
    ramp_rows: int | None = None

    def __post_init__(self) -> None:
        for name in ("heads", "observers"):
            if getattr(self, name) not in ("max", "mean"):
                msg = f"ScoreReduction.{name} must be 'max' or 'mean', got {getattr(self, name)!r}."
                raise ValueError(msg)


def observer_weights(
    num_observers: int, device: torch.device | None = None, ramp_rows: int | None = None
) -> torch.Tensor:
    """The ``weighted_query`` ramp: 0 for the oldest observer, 1 for the newest.

    With ``ramp_rows``, the ramp spans the first ``ramp_rows`` observers and every later one weighs 1.
    """
    ramp = num_observers if ramp_rows is None else min(ramp_rows, num_observers)
    rising = torch.ones(1, device=device) if ramp == 1 else torch.linspace(0.0, 1.0, ramp, device=device)
    return torch.cat([rising, torch.ones(num_observers - ramp, device=device)])


def score_operand(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as :func:`observer_attention` multiplies it: unchanged in bf16/fp16 on CUDA, where the product
    of two half-precision numbers is exact in fp32 and the matrix product accumulates and returns fp32 (no fp32
    copy of the keys); fp32 elsewhere (a no-op for fp32 models).

    Converting the keys once per layer, instead of in every observer block, is what this is for.
    """
    if tensor.is_cuda and tensor.dtype in (torch.bfloat16, torch.float16) and _fp32_products_of_halves():
        return tensor
    return tensor.float()


@functools.cache
def _fp32_products_of_halves() -> bool:
    """Whether this torch has ``bmm(..., out_dtype=torch.float32)`` for bf16/fp16 inputs (2.8 and later, CUDA)."""
    return hasattr(torch.ops.aten.bmm, "dtype")


def observer_attention(
    query: torch.Tensor, key: torch.Tensor, query_positions: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Causal softmax attention rows of some queries onto all keys, in fp32.

    The logits are fp32 products: of fp32 copies, or on CUDA of the bf16/fp16 tensors themselves with fp32
    accumulation (see :func:`score_operand`), which is the same computation without the copy.

    Args:
        query: post-RoPE queries ``[batch, heads, q, dim]``.
        key: post-RoPE keys ``[batch, kv_heads, n, dim]``; ``heads`` must be a multiple of ``kv_heads``.
        query_positions: ``[q]`` index of each query in the key sequence (a query sees keys ``<=`` it).
        scaling: the softmax temperature, usually ``dim ** -0.5``.

    Returns:
        ``[batch, heads, q, n]`` attention probabilities.
    """
    batch, heads, q, dim = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    queries = score_operand(query).reshape(batch * kv_heads, heads // kv_heads * q, dim)
    keys = score_operand(key).reshape(batch * kv_heads, n, dim).mT
    products = torch.bmm(queries, keys, torch.float32) if queries.dtype != torch.float32 else torch.bmm(queries, keys)
    logits = products.reshape(batch, kv_heads, heads // kv_heads, q, n) * scaling
    future = torch.arange(n, device=key.device)[None, :] > query_positions.to(key.device)[:, None]
    logits = logits.masked_fill(future, float("-inf"))
    return logits.softmax(dim=-1).reshape(batch, heads, -1, n)


def reduce_rows(
    probs: torch.Tensor, num_kv_heads: int, reduction: ScoreReduction, weights: torch.Tensor | None
) -> torch.Tensor:
    """Reduce attention rows ``[batch, heads, q, n]`` to ``[batch, kv_heads, q, n]`` (over each KV group's heads).

    ``weights`` (``[q]``) scales each observer row first, for ``weighted_query``.
    """
    if weights is not None:
        probs = probs * weights.to(probs)[None, None, :, None]
    batch, heads, q, n = probs.shape
    grouped = probs.reshape(batch, num_kv_heads, heads // num_kv_heads, q, n)
    return grouped.amax(dim=2) if reduction.heads == "max" else grouped.mean(dim=2)


def pool_scores(scores: torch.Tensor, kernel_size: int, pool: Pool = "max") -> torch.Tensor:
    """Smooth scores over the last (position) axis with a stride-1 window of ``kernel_size``, "same" size.

    Edges are zero-padded; for an even kernel the window reaches one further left than right. ``avg``
    divides by the full kernel size, like a zero-padded convolution.
    """
    if kernel_size <= 1:
        return scores
    if pool not in ("max", "avg"):
        msg = f"pool must be 'max' or 'avg', got {pool!r}."
        raise ValueError(msg)
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    padded = F.pad(flat, (kernel_size // 2, (kernel_size - 1) // 2))
    pooled = F.max_pool1d(padded, kernel_size, stride=1) if pool == "max" else F.avg_pool1d(
        padded, kernel_size, stride=1
    )
    return pooled.reshape(shape)


class ObserverScores:
    """Context manager that scores every key by the attention it gets from the observer positions.

    Observers are the positions ``first_observer .. first_observer + num_observers - 1`` of the sequence fed
    through the model inside the block (in one or several forward calls that extend one KV cache), by the
    thread that entered the block; forward calls from other threads are not observed. After the block,
    :meth:`scores` returns ``[layers, batch, kv_heads, n]``: for each layer, KV head and key, the reduced
    attention from all observers, where ``n`` is the longest key sequence seen.

    Args:
        model: a decoder-only transformers model with Llama/Qwen/Mistral-style attention layers (Llama, Qwen2,
            Qwen3, Mistral, SmolLM3 and most others): what that means is in :func:`draft_rag.hf.check_supported`,
            and an unsupported layer raises NotImplementedError here, before anything runs.
        first_observer: index of the first observer position.
        num_observers: how many observer positions follow it.
        reduction: see :class:`ScoreReduction`.
        layers: which layer indices to score (default all); others run untouched.
        block_size: observer rows whose attention is computed at once (default :data:`OBSERVER_BLOCK_SIZE`);
            the result does not depend on it, the peak memory does.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        first_observer: int,
        num_observers: int,
        reduction: ScoreReduction | None = None,
        layers: Sequence[int] | None = None,
        *,
        block_size: int = OBSERVER_BLOCK_SIZE,
    ) -> None:
        if num_observers < 1 or first_observer < 0:
            msg = f"need at least one observer at a position >= 0, got {num_observers} from {first_observer}."
            raise ValueError(msg)
        check_int("block_size", block_size, 1)
        self.model = model
        self.first_observer = first_observer
        self.num_observers = num_observers
        self.reduction = reduction or ScoreReduction()
        self.block_size = block_size
        self._attention = list(attention_modules(model))
        self._layers = set(range(len(self._attention)) if layers is None else layers)
        self._rebuilds = {index: query_rebuild(self._attention[index]) for index in sorted(self._layers)}
        self._weights = (
            observer_weights(num_observers, ramp_rows=self.reduction.ramp_rows)
            if self.reduction.weighted_query
            else None
        )
        self._sums: dict[int, torch.Tensor] = {}
        self._seen: dict[int, int | torch.Tensor] = {}
        self._gate: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._thread: int | None = None

    def __enter__(self) -> ObserverScores:
        self._thread = threading.get_ident()
        for index, module in enumerate(self._attention):
            if index in self._layers:
                self._handles.append(module.register_forward_hook(self._make_hook(index), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._thread = None

    def scores(self) -> torch.Tensor:
        """``[layers, batch, kv_heads, n]`` scores of the scored layers, in layer order."""
        if not self._sums:
            msg = "no observer position was run through the model inside the ObserverScores block."
            raise RuntimeError(msg)
        n = max(s.shape[-1] for s in self._sums.values())
        out = []
        for index in sorted(self._sums):
            total = F.pad(self._sums[index], (0, n - self._sums[index].shape[-1]))
            if self.reduction.observers == "mean":
                total = total / self._seen[index]
            out.append(total)
        return torch.stack(out)

    def pop_layer(self, layer_index: int) -> torch.Tensor:
        """``[batch, kv_heads, n]`` scores of one layer so far, forgotten by the scorer (freeing their memory).

        For a layer that has seen all its observers, e.g. right after its attention ran in a forward pass that
        held every observer; :meth:`scores` then no longer includes that layer.
        """
        total = self._sums.pop(layer_index)
        seen = self._seen.pop(layer_index)
        return total / seen if self.reduction.observers == "mean" else total

    def _make_hook(self, layer_index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if threading.get_ident() != self._thread:
                return  # another thread's forward call on a model shared with this block
            cache = hooked_cache(kwargs)
            hidden = args[0] if args else kwargs["hidden_states"]
            self._observe(layer_index, module, hidden, layer_keys(cache, module.layer_idx), kwargs)

        return hook

    def _observe(
        self, layer_index: int, module: Any, hidden: torch.Tensor, keys: torch.Tensor, kwargs: dict[str, Any]
    ) -> None:
        """Score the keys with the observers among this forward call's ``hidden`` states, a block at a time."""
        q_len, n = hidden.shape[1], keys.shape[2]
        start = n - q_len
        lo = max(self.first_observer, start)
        hi = min(self.first_observer + self.num_observers, n)
        if lo >= hi:
            return
        rebuild = self._rebuilds[layer_index]
        # A layer without RoPE still receives the model's angles; it just does not use them.
        angles = kwargs["position_embeddings"] if rebuild.rope is not None else None
        keys = score_operand(keys)
        for block in range(lo, hi, self.block_size):
            end = min(block + self.block_size, hi)
            local = slice(block - start, end - start)
            block_angles = None if angles is None else (angles[0][:, local], angles[1][:, local])
            query = rebuild_queries(module, rebuild, hidden[:, local], block_angles)
            positions = torch.arange(block, end, device=keys.device)
            probs = observer_attention(query, keys, positions, rebuild.scaling)
            weights = None
            if self._weights is not None:
                weights = self._weights[block - self.first_observer : end - self.first_observer]
            self._accumulate(layer_index, reduce_rows(probs, keys.shape[1], self.reduction, weights))

    def gate(self, counts: torch.Tensor | None) -> None:
        """Count the observer rows of the forward calls that follow only if ``counts`` (a 0-d bool tensor on the
        model's device) is True; None (the default) counts them all.

        For a token that runs before the host knows whether it should have (a greedy loop that checks for its
        stop token one step late, so as not to wait for the device): its rows then add nothing, without the
        flag being read back. Probabilities are never negative, so a zeroed row leaves a max unchanged; for
        ``"mean"`` the row count is kept on the device too.
        """
        self._gate = counts

    def _accumulate(self, layer_index: int, rows: torch.Tensor) -> None:
        count: int | torch.Tensor = rows.shape[2]
        if self._gate is not None:
            rows = rows * self._gate
            count = count * self._gate.long()
        combined = rows.amax(dim=2) if self.reduction.observers == "max" else rows.sum(dim=2)
        previous = self._sums.get(layer_index)
        if previous is not None:
            previous = F.pad(previous, (0, combined.shape[-1] - previous.shape[-1]))
            combined = torch.maximum(previous, combined) if self.reduction.observers == "max" else previous + combined
        self._sums[layer_index] = combined
        self._seen[layer_index] = self._seen.get(layer_index, 0) + count


def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache | None = None,
    *,
    chunk_size: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> tuple[Cache, torch.Tensor]:
    """Run ``input_ids`` ``[batch, n]`` through the model in chunks, extending ``cache``.

    Only the last position's logits are computed (no full-vocabulary logits for the prompt). Returns the
    cache and the last logits ``[batch, vocab]``. A new cache keeps every position in every layer (no
    sliding-window truncation), so the scoring sees all keys; :func:`~draft_rag.hf.check_supported` rejects
    sequences that a layer's window would cut. ``progress`` is called with the number of tokens done after
    each chunk.
    """
    cache, logits = _run(model, input_ids, cache, chunk_size, progress, logits=True)
    assert logits is not None, "prefill needs at least one token"
    return cache, logits


def extend_cache(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache | None = None,
    *,
    chunk_size: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> Cache:
    """:func:`prefill` without logits, for callers that read only the cache and the hooks' scores: the
    decoder runs without the language-model head, whose one row of logits costs a read of the whole
    vocabulary matrix (for a 0.5B draft a quarter of its weights)."""
    return _run(model, input_ids, cache, chunk_size, progress, logits=False)[0]


def _run(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Cache | None,
    chunk_size: int,
    progress: Callable[[int], None] | None,
    *,
    logits: bool,
) -> tuple[Cache, torch.Tensor | None]:
    check_int("chunk_size", chunk_size, 1)
    cache = cache if cache is not None else empty_cache()
    decoder = model.get_decoder()
    # The decoder alone where the model has one apart (every supported causal LM), else the whole model.
    forward = model if logits or decoder is model else decoder
    keep = {"logits_to_keep": 1} if forward is model else {}
    last = None
    with torch.inference_mode():
        for start in range(0, input_ids.shape[1], chunk_size):
            chunk = input_ids[:, start : start + chunk_size]
            out = forward(input_ids=chunk, **cache_kwargs(forward, cache), use_cache=True, **keep)
            if logits:
                last = out.logits[:, -1]
            if progress is not None:
                progress(chunk.shape[1])
    return cache, last

"""A batch of compressed prompt caches decoded together: stacking, the decode loop, each prompt's result.

The caches are left-padded to the longest and stacked (:func:`stack_caches`); each step runs every unfinished
prompt's newest token at its own true position (:func:`decode`), and :class:`_Decoding` follows one prompt
from its compressed cache to its :class:`~draft_rag.engine.GenerationResult`.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from draft_rag.decoding import TextStream, forward_tokens, sample_rows
from draft_rag.hf import cache_bytes, layer_bytes
from draft_rag.kv import KVPeak
from draft_rag.models import LoadedModel

if TYPE_CHECKING:
    from transformers import Cache

    from draft_rag.engine import GenerationResult
    from draft_rag.engine.requests import _Request


def decode(
    target: LoadedModel, caches: list[Cache], states: list[_Decoding], peak: KVPeak, stop_ids: set[int], start: float
) -> Generator[tuple[int, str], None, list[GenerationResult]]:
    """Decode the prompts of ``states`` together from their compressed ``caches`` (one each, in order); yield
    ``(index, text piece)`` as text is settled; return the results. ``start`` is the call's start."""
    peak.held = 0
    cache, padding = stack_caches(caches, peak)
    device = target.device

    # Each step runs every unfinished prompt's newest token (first: its last prompt token) at its true position.
    # Tokens and positions stay on the device; the host reads the step's tokens once, for all rows together.
    tokens = torch.cat([state.request.prompt_ids[0, -1:] for state in states]).to(device)
    positions = torch.tensor([state.prompt_tokens - 1 for state in states], device=device)
    active = list(range(len(states)))
    while True:
        with target.lock:
            logits = forward_tokens(target.model, cache, tokens, positions, padding)
        if padding is not None:
            padding = F.pad(padding, (0, 1), value=True)
        peak.observe(cache)
        tokens = sample_rows(logits, [states[index].request.sampler for index in active])
        for index, token in zip(active, tokens.tolist(), strict=True):
            for piece in states[index].take(token, stop_ids):
                yield index, piece
        running = [row for row, index in enumerate(active) if not states[index].done]
        if not running:
            break
        positions = positions + 1
        if len(running) < len(active):
            rows = torch.tensor(running, device=device)
            cache.batch_select_indices(rows)
            padding = None if padding is None else padding[rows]
            tokens, positions = tokens[rows], positions[rows]
            active = [active[row] for row in running]
    entry_bytes = cache_bytes(cache) // (len(active) * cache.get_seq_length())
    return [state.result(start, entry_bytes, peak.bytes) for state in states]


def stack_caches(caches: list[Cache], peak: KVPeak) -> tuple[Cache, torch.Tensor | None]:
    """The sequences of ``caches`` (each of batch 1) as one cache, left-padded to the longest.

    Returns the cache and the padding mask ``[batch, longest]`` (False at padding), or None when no row is
    padded. Each sequence's layer is released as soon as it is copied, so at most one layer exists twice;
    ``peak`` counts that moment.
    """
    lengths = [cache.get_seq_length() for cache in caches]
    longest = max(lengths)
    if len(caches) == 1 or longest == 0:
        return caches[0], None
    base = caches[lengths.index(longest)]
    stacked, unstacked = 0, sum(cache_bytes(cache) for cache in caches)
    for index, layer in enumerate(base.layers):
        own = [cache.layers[index] for cache, length in zip(caches, lengths, strict=True) if length]
        empty = layer.keys[:, :, :0]
        keys, values = (
            torch.cat([
                F.pad(getattr(cache.layers[index], kind) if length else empty, (0, 0, longest - length, 0))
                for cache, length in zip(caches, lengths, strict=True)
            ])
            for kind in ("keys", "values")
        )
        copied = sum(layer_bytes(part) for part in own)
        for part in own:
            part.keys = part.values = None
        layer.keys, layer.values = keys, values
        stacked += layer_bytes(layer)
        unstacked -= copied
        # Until the copies were released this layer existed twice: stacked and in each sequence's own cache.
        peak.count(stacked + unstacked + copied)
    positions = torch.arange(longest)
    padding = positions[None, :] >= longest - torch.tensor(lengths)[:, None]
    return base, padding.to(base.layers[0].keys.device)


@dataclass
class _Decoding:
    """One prompt from its compressed cache on: what it generated so far, and at the end its result."""

    request: _Request
    kept: int
    timings: dict[str, float]
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    finish: str = "length"
    done: bool = False
    first_token_at: float = 0.0
    end: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return int(self.request.prompt_ids.shape[1])

    def take(self, token: int, stop_ids: set[int]) -> list[str]:
        """Add a generated token; return the text pieces it settles. Sets ``done`` when the prompt is finished."""
        self.tokens.append(token)
        if len(self.tokens) == 1:
            self.first_token_at = time.perf_counter()
        pieces = []
        if self.request.cancelled:  # nobody reads the answer: the prompt leaves the batch at this step
            self.finish = "cancelled"
        elif token in stop_ids:
            self.finish = "stop"
        else:
            pieces.append(self.text.push(token))
            if self.text.stopped:
                self.finish = "stop"
        if self.finish != "length" or len(self.tokens) == self.request.settings.max_new_tokens:
            self.done = True
            pieces.append(self.text.flush())
            self.end = time.perf_counter()
        pieces = [piece for piece in pieces if piece]
        self.pieces += pieces
        return pieces

    def result(self, start: float, entry_bytes: int, peak_bytes: int) -> GenerationResult:
        """The finished generation; ``start`` is the call's start, ``entry_bytes`` one position's KV bytes."""
        from draft_rag.engine import GenerationResult  # the package imports this module first

        decode_s = self.end - self.first_token_at
        steps = len(self.tokens) - 1
        timings = {
            **self.timings,
            "ttft_s": self.first_token_at - start,
            "decode_s": decode_s,
            "tokens_per_s": steps / decode_s if steps and decode_s > 0 else 0.0,
        }
        kept = self.kept + 1  # the last prompt token joined the compressed cache
        return GenerationResult(
            text="".join(self.pieces),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.tokens),
            finish_reason=self.finish,
            kv_entries_kept=kept,
            kv_entries_full=self.prompt_tokens,
            kv_bytes_kept=kept * entry_bytes,
            kv_bytes_full=self.prompt_tokens * entry_bytes,
            peak_kv_bytes=peak_bytes,
            timings=timings,
            token_ids=self.tokens,
            prompt_compression=self.request.compression,
        )

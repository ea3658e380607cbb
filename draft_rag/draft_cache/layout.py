"""Chunks and their draft K/V: encoding a chunk after the prefix, and laying encoded chunks out at prompt positions.

A chunk is encoded on its own, after the shared prefix, and its keys are kept post-RoPE for the positions it
was encoded at. Laid out in a prompt, each chunk's keys are turned to its place there: RoPE rotates a key by an
angle proportional to its position, so a shift by ``d`` is one more rotation by ``d``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from draft_rag.draft_cache.tiers import to_device
from draft_rag.hf import cache_from_tensors, cache_tensors, check_supported, empty_cache, kv_shape, rotate_keys
from draft_rag.hf.attention import model_name
from draft_rag.models import LoadedModel
from draft_rag.scoring import extend_cache

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel


@dataclass(frozen=True)
class Chunk:
    """A document as the draft reads it: its text, its token ids with the separator after it, and the
    character span of each of the document's tokens (the separator has none)."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]


@dataclass(frozen=True)
class CachedChunk:
    """An encoded chunk (or the shared prefix): its token ids and character spans, and every layer's K/V.

    ``keys`` and ``values`` are ``[layers, kv_heads, tokens, head_dim]`` in the model's dtype, on the device of
    the tier that holds the entry (the draft's device, or host memory); the keys are post-RoPE for positions
    ``position, position + 1, ...``, where the chunk was encoded.
    """

    input_ids: list[int]
    offsets: list[tuple[int, int]]
    keys: torch.Tensor
    values: torch.Tensor
    position: int

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def bytes_per_token(model: PreTrainedModel | LoadedModel) -> int:
    """Bytes of draft K/V the cache keeps per token: layers x KV heads x head dim x (K, V) x dtype size.

    12 KiB (12288) for the packaged 0.5B draft in bf16: 24 layers, 2 KV heads of 64 dims.
    """
    model = model.model if isinstance(model, LoadedModel) else model
    layers, kv_heads, head_dim = kv_shape(model)
    return 2 * layers * kv_heads * head_dim * model.dtype.itemsize


def entry_shape(model: PreTrainedModel, tokens: int) -> tuple[int, int, int, int]:
    """The shape of the keys (and of the values) of an entry of ``tokens`` tokens for ``model``."""
    layers, kv_heads, head_dim = kv_shape(model)
    return layers, kv_heads, tokens, head_dim


def entry_fits(
    entry: CachedChunk, model: PreTrainedModel, input_ids: list[int], offsets: list[tuple[int, int]], position: int
) -> bool:
    """Whether ``entry`` can stand for ``input_ids`` encoded by ``model`` at ``position``: same token ids, spans
    and position, and keys and values of every layer in the model's shape and dtype."""
    shape = entry_shape(model, len(input_ids))
    return (
        entry.input_ids == input_ids and entry.offsets == offsets and entry.position == position
        and tuple(entry.keys.shape) == shape and tuple(entry.values.shape) == shape
        and entry.keys.dtype == entry.values.dtype == model.dtype
    )


def check_chunks(draft: LoadedModel, prefix_tokens: int, chunks: Sequence[Chunk]) -> None:
    """Raise before any compute when the draft's keys cannot be moved, the draft is split over devices, or a chunk
    does not fit after the prefix."""
    check_one_device(draft.model)
    longest = max((len(chunk.input_ids) for chunk in chunks), default=0)
    needed = prefix_tokens + longest
    if needed > draft.max_context:
        msg = (
            f"a document needs {needed} draft tokens after the chat template's opening, more than the draft "
            f"model's maximum context of {draft.max_context}; split long documents into smaller chunks."
        )
        raise ValueError(msg)
    check_supported(draft.model, needed, cache=True)


def encode_chunk(
    model: PreTrainedModel,
    input_ids: list[int],
    offsets: list[tuple[int, int]],
    prefix: CachedChunk | None,
    chunk_size: int,
) -> CachedChunk:
    """Run ``input_ids`` through the draft after ``prefix``'s K/V (none: from position 0) and keep their K/V."""
    position = 0 if prefix is None else len(prefix.input_ids)
    device = model.device
    if not input_ids:
        layers, kv_heads, head_dim = kv_shape(model)
        empty = torch.empty(layers, kv_heads, 0, head_dim, dtype=model.dtype, device=device)
        return CachedChunk([], offsets, empty, empty.clone(), position)
    past = None
    if prefix is not None and position:
        keys, values = to_device(prefix.keys, device), to_device(prefix.values, device)
        past = cache_from_tensors((k[None], v[None]) for k, v in zip(keys, values))
    ids = torch.tensor([input_ids], device=device)
    cache = extend_cache(model, ids, past, chunk_size=chunk_size)
    cached = cache_tensors(cache)
    # The K/V stay on the draft's device: the device tier keeps them there.
    keys = torch.stack([k[0, :, position:] for k, _ in cached])
    values = torch.stack([v[0, :, position:] for _, v in cached])
    return CachedChunk(input_ids, offsets, keys, values, position)


def lay_out(model: PreTrainedModel, entries: Iterable[CachedChunk], length: int) -> DynamicCache:
    """A KV cache of ``model`` holding the first ``length`` positions of ``entries`` placed one after another.

    Each entry's keys are rotated from the positions it was encoded at to its place here, on the model's device
    and in its dtype (:func:`~draft_rag.hf.rotate_keys`), all entries in one rotation; nothing is read back to
    the host. Every entry is read, also those past ``length``. The cache holds fewer positions than ``length``
    when the entries end sooner.
    """
    device = model.device
    keys, values, shifts = [], [], []
    start = 0
    for entry in entries:
        take = min(len(entry.input_ids), length - start)
        if take > 0:
            keys.append(to_device(entry.keys[:, :, :take], device))
            values.append(to_device(entry.values[:, :, :take], device))
            shifts.append((take, start - entry.position))
        start += len(entry.input_ids)
    if not keys:
        return empty_cache()
    all_keys, all_values = torch.cat(keys, dim=2), torch.cat(values, dim=2)
    # Entries laid out where they were encoded (the prefix, the first document) keep their keys; the others
    # turn by their own shift, one per key. The shifts are filled on the device: a tensor copied from the
    # host would make the host wait for the device's queue.
    unmoved = 0
    while unmoved < len(shifts) and shifts[unmoved][1] == 0:
        unmoved += 1
    if unmoved < len(shifts):
        begin = sum(take for take, _ in shifts[:unmoved])
        per_key = torch.cat([torch.full((take,), shift, device=device) for take, shift in shifts[unmoved:]])
        # all_keys is torch.cat's own new tensor, so writing into it changes no cached entry.
        all_keys[:, :, begin:] = rotate_keys(model, all_keys[:, :, begin:], per_key)
    return cache_from_tensors((k[None], v[None]) for k, v in zip(all_keys, all_values))


def check_one_device(model: PreTrainedModel) -> None:
    """Raise NotImplementedError before any compute when ``model`` is split over several devices with
    ``device_map``: an entry holds the K/V of all layers in one tensor, on one device."""
    devices = sorted({repr(where) for where in (getattr(model, "hf_device_map", None) or {}).values()})
    if len(devices) > 1:
        msg = (
            f"{model_name(model)} is split over the devices {', '.join(devices)} by device_map, but the draft "
            "cache keeps the K/V of all layers on one device; load the draft on one device (e.g. "
            "device_map={'': 0} or device_map='cuda:0') or use SpecPC(reading='joint') without cache=."
        )
        raise NotImplementedError(msg)

"""The draft cache's tiers in memory: entries on the draft's device, then in host memory, each an LRU bounded in bytes.

An entry lives in one tier at a time. Encoded, read and looked-up entries go to the device tier, on the draft's own
device (GPU memory for a draft on an accelerator, host memory for a CPU draft), so that a query over cached
documents moves nothing between host and device. What the device tier pushes out falls to the host tier when it
came from an accelerator, and a later lookup copies it back up; what the host tier pushes out is dropped (with a
directory, every entry is also on disk). A CPU draft's device tier is host memory already, so what it pushes out is
dropped at once.

Host memory is pinned (page-locked) where CUDA is available, so that copies both ways are queued on the device
without the host waiting for them (``non_blocking``) and overlap its compute; elsewhere it is plain memory.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from draft_rag.draft_cache.layout import CachedChunk


def offloads(device: torch.device) -> bool:
    """Whether the device tier on ``device`` pushes entries down to the host tier, and a draft on ``device``
    reads them back from it: on accelerators only (a CPU's device tier is host memory already)."""
    return device.type != "cpu"


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` (on an accelerator) in host memory: pinned and queued without waiting where CUDA is
    available, plain and waited for elsewhere.

    The host never reads a pinned copy itself (a CPU draft does not read the host tier, see :func:`offloads`):
    only the copy back to the device does, queued after this one.
    """
    pinned = torch.cuda.is_available()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pinned)
    return host.copy_(tensor, non_blocking=pinned)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` (itself when it is there). A copy to an accelerator is queued without waiting
    (from pinned memory it overlaps compute); a copy to the CPU waits, since the CPU reads it next."""
    return tensor.to(device, non_blocking=device.type != "cpu")


def entry_on_host(entry: CachedChunk) -> CachedChunk:
    """``entry`` with its K/V copied to host memory (:func:`to_host`)."""
    return dataclasses.replace(entry, keys=to_host(entry.keys), values=to_host(entry.values))


def entry_on_device(entry: CachedChunk, device: torch.device) -> CachedChunk:
    """``entry`` with its K/V on ``device`` (itself when they are there)."""
    if entry.keys.device == device and entry.values.device == device:
        return entry
    return dataclasses.replace(entry, keys=to_device(entry.keys, device), values=to_device(entry.values, device))


@dataclass(eq=False)
class MemoryTier:
    """One tier: entries by key digest, least recently used first, and the bytes and tokens they hold.

    Not thread-safe on its own: the :class:`~draft_rag.DraftCache` holding it calls it under its lock.
    """

    entries: OrderedDict[str, CachedChunk] = field(default_factory=OrderedDict)
    bytes: int = 0
    tokens: int = 0

    def put(self, digest: str, entry: CachedChunk, max_bytes: int) -> list[tuple[str, CachedChunk]]:
        """Keep ``entry`` as the most recently used; what no longer fits within ``max_bytes``, least recently used
        first: the entries it pushes out, or ``entry`` itself (not kept) when it alone is larger."""
        if entry.nbytes > max_bytes:
            return [(digest, entry)]
        self.entries[digest] = entry
        self.bytes += entry.nbytes
        self.tokens += len(entry.input_ids)
        pushed: list[tuple[str, CachedChunk]] = []
        while self.bytes > max_bytes:
            oldest, old = next(iter(self.entries.items()))
            self.pop(oldest)
            pushed.append((oldest, old))
        return pushed

    def pop(self, digest: str) -> CachedChunk | None:
        """Remove and return the entry under ``digest`` (None when the tier does not hold it)."""
        entry = self.entries.pop(digest, None)
        if entry is not None:
            self.bytes -= entry.nbytes
            self.tokens -= len(entry.input_ids)
        return entry

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = self.tokens = 0

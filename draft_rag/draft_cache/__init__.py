"""DraftCache: each document's draft K/V, encoded once and reused across queries.

In RAG the documents exist before the question. The cache encodes every document with the draft model on
its own, after one fixed shared prefix (the chat template's opening, up to where documents start), and keeps
every layer's keys and values for the document's tokens and the separator after it. At query time SpecPC
lays the cached documents out in prompt order, turns each one's keys from the positions it was encoded at to
its place in the prompt (RoPE rotates a key by an angle proportional to its position, so a shift by ``d`` is
one more rotation by ``d``), and runs only the observer window (the question and the template's end) through
the draft over that cache: the draft's cost per query drops from the whole context to about ``window_size``
tokens. Documents attend only within themselves and to the prefix: this is SpecPC's default reading
(``reading="apart"``), which without a cache encodes a call's documents the same way and forgets them after it,
so a cache changes a query's cost, not its scores. The paper's joint prefill of the prompt (``reading="joint"``)
scores differently when there are several documents; with a single document the two agree.

Entries are content-addressed: the key is a SHA-256 of the model's fingerprint (class, config and every byte
of its weights), its dtype, the prefix token ids and the document text, so an entry made by another model,
dtype or chat template is never used. Entries are kept on the draft's device (an LRU bounded in bytes), so that a
query moves nothing between host and device; for a draft on an accelerator, what that tier pushes out falls to host
memory (pinned, another LRU bounded in bytes) and a lookup copies it back. With a ``directory`` every entry is also
a safetensors file there, which other processes read. An entry is used only when its token ids, position and every
layer's K/V shape match what the model would make, and a file only when the SHA-256 of its tensors matches the one
written into it.
Reuse of per-chunk K/V follows APE (https://arxiv.org/abs/2502.05431) and TurboRAG
(https://arxiv.org/abs/2410.07590).

This module holds the cache itself (its tiers, one encoding per missed key, ``add`` and ``context``);
:mod:`~draft_rag.draft_cache.tiers` holds the tiers in memory and the copies between them,
:mod:`~draft_rag.draft_cache.layout` encodes chunks and lays them out at prompt positions,
:mod:`~draft_rag.draft_cache.store` keeps the entries on disk, and :mod:`~draft_rag.draft_cache.fingerprint`
names them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from draft_rag.checks import check_int
from draft_rag.draft_cache.fingerprint import EntryKey, entry_key, model_fingerprint
from draft_rag.draft_cache.layout import (
    CachedChunk,
    Chunk,
    bytes_per_token,
    check_chunks,
    encode_chunk,
    entry_fits,
    entry_shape,
    lay_out,
)
from draft_rag.draft_cache.store import cache_directory, read_entry, write_entry
from draft_rag.draft_cache.tiers import MemoryTier, entry_on_device, entry_on_host, offloads
from draft_rag.models import LoadedModel

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

__all__ = [
    "CacheStats",
    "CachedChunk",
    "Chunk",
    "DraftCache",
    "as_draft_cache",
    "bytes_per_token",
    "model_fingerprint",
]


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`DraftCache`, in all and per tier.

    Attributes:
        hits: lookups answered from memory or disk, ``device_hits + host_hits + disk_hits`` (the shared prefix
            is looked up once per call too).
        misses: lookups that had to run the draft model.
        entries: entries held in memory, ``device_entries + host_entries``.
        tokens: tokens of the entries held in memory.
        bytes: bytes of K/V held in memory, ``device_bytes + host_bytes``.
        device_hits: lookups answered from the device tier, including those that waited for another thread
            reading or encoding the same entry.
        host_hits: lookups answered from the host tier, each copying the entry back to the device tier.
        disk_hits: lookups answered from a file in the cache's directory.
        device_entries: entries in the device tier (on the draft's device; host memory for a CPU draft).
        device_bytes: bytes of K/V in the device tier (at most ``max_bytes``).
        host_entries: entries in the host tier (only a draft on an accelerator fills it).
        host_bytes: bytes of K/V in the host tier (at most ``max_host_bytes``).
    """

    hits: int
    misses: int
    entries: int
    tokens: int
    bytes: int
    device_hits: int = 0
    host_hits: int = 0
    disk_hits: int = 0
    device_entries: int = 0
    device_bytes: int = 0
    host_entries: int = 0
    host_bytes: int = 0


@dataclass(eq=False)
class DraftCache:
    """Per-document draft K/V reused across queries, so SpecPC's draft reads only the question per query.

    Pass one to :class:`~draft_rag.specpc.SpecPC` (``cache=``): the first query over a document encodes it
    (about what a full prefill costs), later queries over any mix of cached documents run only the last
    ``window_size`` prompt tokens through the draft. :meth:`SpecPC.warm <draft_rag.specpc.SpecPC.warm>`
    encodes documents ahead of time. Safe to share between threads and compressors, even of different
    draft models: keys never collide across models, dtypes or chat templates, and threads that miss the same
    document at once encode it once (the others wait for it).

    Entries are kept in tiers, each entry in one: on the draft's device (``max_bytes``), so that a query over
    cached documents moves nothing between host and device; for a draft on an accelerator, then in host memory
    (``max_host_bytes``, pinned where CUDA is available so that copies to and from the device do not make the host
    wait); then on disk (``directory``). What a tier pushes out (least recently used first) falls to the next one,
    and a lookup moves the entry back to the device tier. :attr:`stats` counts hits and bytes per tier. A draft
    split over several devices with ``device_map`` is refused (NotImplementedError, before any compute): load it on
    one device.

    Args:
        max_bytes: most bytes of K/V kept on the draft's device (1 GiB); for a CPU draft, the most kept in
            memory. About :func:`bytes_per_token` per token: 12 KiB for the packaged 0.5B draft in bf16. An
            entry larger than this serves the query that made it but is not kept on the device (a draft on an
            accelerator keeps it in the host tier, if it fits there).
        directory: also keep each entry as a safetensors file in this directory, for later runs and other
            processes. A missing directory is created with mode 0700 (:data:`.store.DIRECTORY_MODE`: the entry
            names and files hold users' documents); missing parents get the default mode, and a directory that
            already exists keeps its mode (e.g. a group-shared one). Files are created with mode 0600
            (:data:`.store.FILE_MODE`), written under a temporary name in the directory, flushed to disk and
            then renamed, so readers never see a partial file. A file that cannot be read, holds another model's
            or dtype's K/V, has the wrong shape or fails its SHA-256 checksum is ignored and rebuilt. Files
            are never deleted by the cache; a read-only directory serves its entries and new ones stay in
            memory (with a warning).
        max_host_bytes: most bytes of K/V kept in host memory for a draft on an accelerator (4 GiB), as the
            tier below the device: entries the device tier pushes out, until a lookup copies them back. Not
            used by a CPU draft (its device tier is host memory already). 0 turns the tier off.

    Raises:
        TypeError: ``max_bytes`` or ``max_host_bytes`` is not an integer, or ``directory`` is not a ``str`` or
            ``os.PathLike`` of ``str`` (e.g. bytes).
        ValueError: ``max_bytes`` or ``max_host_bytes`` is negative, or ``directory`` is empty, names a file (or
            a path under one), or cannot be created.

    Example:
        >>> cache = DraftCache(max_bytes=2 << 30, directory="~/.cache/my-rag/draft")
        >>> pc = SpecPC(budget=512, cache=cache)
        >>> pc.warm(chunks)                               # optional: encode ahead of the first question
        >>> pc.compress("What is the magic number?", retrieved_chunks)
        >>> cache.stats
    """

    max_bytes: int = 1 << 30
    directory: str | os.PathLike[str] | None = None
    max_host_bytes: int = 4 << 30
    _device: MemoryTier = field(default_factory=MemoryTier, init=False, repr=False)
    _host: MemoryTier = field(default_factory=MemoryTier, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("misses", "device_hits", "host_hits", "disk_hits"), 0),
        init=False, repr=False,
    )
    # Keys being read from disk or encoded right now, each by one thread; others asking for it wait on its future.
    _flights: dict[str, Future[CachedChunk]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_int("DraftCache max_bytes", self.max_bytes, 0)
        check_int("DraftCache max_host_bytes", self.max_host_bytes, 0)
        if self.directory is not None:
            self.directory = cache_directory(self.directory)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            device, host, counts = self._device, self._host, self._counts
            return CacheStats(
                hits=counts["device_hits"] + counts["host_hits"] + counts["disk_hits"],
                entries=len(device.entries) + len(host.entries),
                tokens=device.tokens + host.tokens,
                bytes=device.bytes + host.bytes,
                device_entries=len(device.entries),
                device_bytes=device.bytes,
                host_entries=len(host.entries),
                host_bytes=host.bytes,
                **counts,
            )

    def clear(self) -> None:
        """Forget the entries held in memory (both tiers) and reset the counters; files on disk stay."""
        with self._lock:
            self._device.clear()
            self._host.clear()
            self._counts.update(dict.fromkeys(self._counts, 0))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the settings, not the entries held in memory (nor the lock).

        A copy, e.g. one sent to a worker process, starts empty; with a ``directory`` it reads and writes the
        same files, so what the workers encode is found by every process that uses the directory.
        """
        return (type(self), (self.max_bytes, self.directory, self.max_host_bytes))

    def add(
        self,
        draft: LoadedModel,
        prefix_ids: Sequence[int],
        chunks: Iterable[Chunk],
        *,
        chunk_size: int = 2048,
        progress: bool | None = None,
    ) -> None:
        """Encode and store the chunks (and the prefix) that are not cached yet.

        ``chunks`` is read one chunk at a time (pass a generator to stream a corpus), so memory stays bounded
        by ``max_bytes`` (and ``max_host_bytes`` for a draft on an accelerator) however many chunks are passed.
        A list is checked whole before any compute; the chunks of any other iterable are checked as they come,
        after the earlier ones are stored.
        """
        for _ in self._resolve(draft, prefix_ids, chunks, chunk_size, progress):
            pass

    def context(
        self,
        draft: LoadedModel,
        prefix_ids: Sequence[int],
        chunks: Sequence[Chunk],
        length: int,
        *,
        chunk_size: int = 2048,
        progress: bool | None = None,
    ) -> DynamicCache:
        """A draft KV cache of the first ``length`` positions of the prompt ``prefix_ids + chunks...``.

        Chunks not cached yet are encoded and stored first (all of them, also those past ``length``). Each
        chunk's keys are rotated to the chunk's place in this prompt, on the draft's device. The cache holds
        fewer positions than ``length`` when the chunks end sooner (``get_seq_length()`` says how many); the
        caller runs the rest.

        Raises:
            NotImplementedError: the draft's keys cannot be moved to new positions, or the draft is split over
                several devices with ``device_map`` (before any compute).
            ValueError: a chunk does not fit in the draft's context after the prefix.
        """
        check_int("length", length, 0)
        return lay_out(draft.model, self._resolve(draft, prefix_ids, chunks, chunk_size, progress), length)

    def _resolve(
        self,
        draft: LoadedModel,
        prefix_ids: Sequence[int],
        chunks: Iterable[Chunk],
        chunk_size: int,
        progress: bool | None,
    ) -> Iterator[CachedChunk]:
        """The prefix's entry, then each chunk's, in order; those not cached are encoded and stored.

        Chunks are pulled one at a time; a list is checked whole first, other iterables chunk by chunk.
        """
        from tqdm.auto import tqdm

        model = draft.model
        prefix_ids = list(prefix_ids)
        listed = chunks if isinstance(chunks, Sequence) else None
        check_chunks(draft, len(prefix_ids), [] if listed is None else listed)
        prefix = self._fetch(draft, entry_key(model, prefix_ids, None), prefix_ids, [], None, chunk_size)
        yield prefix
        # A stream's length is unknown, so its bar counts tokens without a total.
        total = None if listed is None else sum(len(chunk.input_ids) for chunk in listed)
        disable = None if progress is None else not progress
        with tqdm(total=total, desc="Draft cache", unit="tok", disable=disable) as bar:
            for chunk in chunks:
                if listed is None:
                    check_chunks(draft, len(prefix_ids), [chunk])
                key = entry_key(model, prefix_ids, chunk.text)
                offsets = [(int(start), int(end)) for start, end in chunk.offsets]
                yield self._fetch(draft, key, list(chunk.input_ids), offsets, prefix, chunk_size)
                bar.update(len(chunk.input_ids))

    def _fetch(
        self,
        draft: LoadedModel,
        key: EntryKey,
        input_ids: list[int],
        offsets: list[tuple[int, int]],
        prefix: CachedChunk | None,
        chunk_size: int,
    ) -> CachedChunk:
        """The entry under ``key`` from memory or disk, else encoded by the draft (after ``prefix``) and stored.

        The entry returned is in the device tier (on the draft's device) unless it is larger than that tier.
        One thread at a time reads or encodes a key: the others that miss it meanwhile wait for that entry
        instead of encoding it again, and get its error if it fails (the next call then tries afresh).
        """
        position = 0 if prefix is None else len(prefix.input_ids)
        device = draft.device

        def fits(entry: CachedChunk) -> bool:
            return entry_fits(entry, draft.model, input_ids, offsets, position)

        while True:
            with self._lock:
                # Token ids are compared too, in case the same model is used with another tokenizer.
                entry = self._look_up(key.digest, device, fits)
                if entry is not None:
                    return entry
                flight = self._flights.get(key.digest)
                if flight is None:
                    flight = self._flights[key.digest] = Future()
                    break
            entry = flight.result()  # another thread's read or encoding of this key; raises its error
            if fits(entry):
                self._count("device_hits")
                return entry
        try:
            entry = read_entry(self.directory, key)
            if entry is not None and fits(entry):
                self._count("disk_hits")
                entry = entry_on_device(entry, device)
            else:
                with draft.lock:
                    entry = encode_chunk(draft.model, input_ids, offsets, prefix, chunk_size)
                if not fits(entry):  # stored entries are checked against the config's shape: it must be right
                    msg = (
                        f"{type(draft.model).__name__} makes K/V of shape {tuple(entry.keys.shape)} and "
                        f"{tuple(entry.values.shape)} per chunk, not [layers, kv_heads, tokens, head_dim] = "
                        f"{entry_shape(draft.model, len(input_ids))} as its config says; the draft cache does not "
                        "support this model, use SpecPC(reading='joint') without cache=."
                    )
                    raise NotImplementedError(msg)
                self._count("misses")
                write_entry(self.directory, key, entry)
            with self._lock:
                self._keep(key.digest, entry)
        except BaseException as error:
            flight.set_exception(error)
            raise
        else:
            flight.set_result(entry)
        finally:
            with self._lock:
                del self._flights[key.digest]
        return entry

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _look_up(self, digest: str, device: torch.device, fits: Callable[[CachedChunk], bool]) -> CachedChunk | None:
        """The entry under ``digest`` from a tier in memory, on ``device`` and moved up to the device tier (unless
        larger than it); None when no tier holds one that ``fits``. Called under the lock."""
        tiers = [("device_hits", self._device)]
        # A CPU draft does not read the host tier: the copies into it are queued without waiting, so only a copy
        # back to an accelerator, queued after them, may read it.
        if offloads(device):
            tiers.append(("host_hits", self._host))
        for counter, tier in tiers:
            entry = tier.entries.get(digest)
            if entry is None or not fits(entry):
                continue
            self._counts[counter] += 1
            if (tier is self._device and entry.keys.device == device) or entry.nbytes > self.max_bytes:
                tier.entries.move_to_end(digest)  # where it is already, or too large for the device tier
                return entry_on_device(entry, device)
            return self._keep(digest, entry_on_device(entry, device))
        return None

    def _keep(self, digest: str, entry: CachedChunk) -> CachedChunk:
        """Put ``entry`` in the device tier as the most recently used and return it. What the device tier pushes
        out (``entry`` itself when larger than ``max_bytes``) falls to the host tier if it is on an accelerator,
        and what that pushes out is dropped. Called under the lock."""
        self._device.pop(digest)
        self._host.pop(digest)
        for old_digest, old in self._device.put(digest, entry, self.max_bytes):
            if offloads(old.keys.device) and old.nbytes <= self.max_host_bytes:
                self._host.put(old_digest, entry_on_host(old), self.max_host_bytes)
        return entry


def as_draft_cache(value: object) -> DraftCache | None:
    """``value`` when it is a :class:`DraftCache` or None; otherwise a ValueError that says how to make one.

    The framework adapters validate their ``cache`` setting with it.
    """
    if value is None or isinstance(value, DraftCache):
        return value
    msg = (
        f"cache must be a draft_rag.DraftCache, got {type(value).__name__}; "
        "pass cache=DraftCache() (from draft_rag import DraftCache)."
    )
    raise ValueError(msg)

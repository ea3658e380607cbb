"""DraftCache: each document's draft K/V, encoded once and reused across queries.

In RAG the documents exist before the question. The cache encodes every document with the draft model on
its own, after one fixed shared prefix (the chat template's opening, up to where documents start), and keeps
every layer's keys and values for the document's tokens and the separator after it. At query time SpecPC
lays the cached documents out in prompt order, turns each one's keys from the positions it was encoded at to
its place in the prompt (RoPE rotates a key by an angle proportional to its position, so a shift by ``d`` is
one more rotation by ``d``), and runs only the observer window (the question and the template's end) through
the draft over that cache: the draft's cost per query drops from the whole context to about ``window_size``
tokens. Documents attend only within themselves and to the prefix, so scores differ a little from a full
prefill of the prompt; with a single document they are the same.

Entries are content-addressed: the key is a SHA-256 of the model's fingerprint (class, config and every byte
of its weights), its dtype, the prefix token ids and the document text, so an entry made by another model,
dtype or chat template is never used. In memory the cache is an LRU bounded in bytes; with a ``directory``
every entry is also a safetensors file there, which other processes read. An entry is used only when its
token ids, position and every layer's K/V shape match what the model would make, and a file only when the
SHA-256 of its tensors matches the one written into it.
Reuse of per-chunk K/V follows APE (https://arxiv.org/abs/2502.05431) and TurboRAG
(https://arxiv.org/abs/2410.07590).

This module holds the cache itself (the LRU in memory, one encoding per missed key, ``add`` and ``context``);
:mod:`~draft_rag.draft_cache.layout` encodes chunks and lays them out at prompt positions,
:mod:`~draft_rag.draft_cache.store` keeps the entries on disk, and :mod:`~draft_rag.draft_cache.fingerprint`
names them.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
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
from draft_rag.models import LoadedModel

if TYPE_CHECKING:
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
    """Counters of a :class:`DraftCache`.

    Attributes:
        hits: lookups answered from memory or disk (the shared prefix is looked up once per call too).
        misses: lookups that had to run the draft model.
        entries: entries held in memory.
        tokens: tokens of the entries held in memory.
        bytes: bytes of K/V held in memory (at most ``max_bytes``).
    """

    hits: int
    misses: int
    entries: int
    tokens: int
    bytes: int


@dataclass(eq=False)
class DraftCache:
    """Per-document draft K/V reused across queries, so SpecPC's draft reads only the question per query.

    Pass one to :class:`~draft_rag.specpc.SpecPC` (``cache=``): the first query over a document encodes it
    (about what a full prefill costs), later queries over any mix of cached documents run only the last
    ``window_size`` prompt tokens through the draft. :meth:`SpecPC.warm <draft_rag.specpc.SpecPC.warm>`
    encodes documents ahead of time. Safe to share between threads and compressors, even of different
    draft models: keys never collide across models, dtypes or chat templates, and threads that miss the same
    document at once encode it once (the others wait for it). Entries are held in CPU memory and copied to
    the draft's device for each query.

    Args:
        max_bytes: most bytes of K/V kept in memory (1 GiB); the least recently used entries go first. About
            :func:`bytes_per_token` per token: 12 KiB for the packaged 0.5B draft in bf16. An entry larger
            than this serves the query that made it but is not kept in memory.
        directory: also keep each entry as a safetensors file in this directory, for later runs and other
            processes. A missing directory is created with mode 0700 (:data:`.store.DIRECTORY_MODE`: the entry
            names and files hold users' documents); missing parents get the default mode, and a directory that
            already exists keeps its mode (e.g. a group-shared one). Files are created with mode 0600
            (:data:`.store.FILE_MODE`), written under a temporary name in the directory, flushed to disk and
            then renamed, so readers never see a partial file. A file that cannot be read, holds another model's
            or dtype's K/V, has the wrong shape or fails its SHA-256 checksum is ignored and rebuilt. Files
            are never deleted by the cache; a read-only directory serves its entries and new ones stay in
            memory (with a warning).

    Raises:
        TypeError: ``directory`` is not a ``str`` or ``os.PathLike`` of ``str`` (e.g. bytes).
        ValueError: ``directory`` is empty, names a file (or a path under one), or cannot be created.

    Example:
        >>> cache = DraftCache(max_bytes=2 << 30, directory="~/.cache/my-rag/draft")
        >>> pc = SpecPC(budget=512, cache=cache)
        >>> pc.warm(chunks)                               # optional: encode ahead of the first question
        >>> pc.compress("What is the magic number?", retrieved_chunks)
        >>> cache.stats
    """

    max_bytes: int = 1 << 30
    directory: str | os.PathLike[str] | None = None
    _entries: OrderedDict[str, CachedChunk] = field(default_factory=OrderedDict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("hits", "misses", "tokens", "bytes"), 0), init=False, repr=False
    )
    # Keys being read from disk or encoded right now, each by one thread; others asking for it wait on its future.
    _flights: dict[str, Future[CachedChunk]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_int("DraftCache max_bytes", self.max_bytes, 0)
        if self.directory is not None:
            self.directory = cache_directory(self.directory)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(entries=len(self._entries), **self._counts)

    def clear(self) -> None:
        """Forget the entries held in memory and reset the counters; files on disk stay."""
        with self._lock:
            self._entries.clear()
            self._counts.update(dict.fromkeys(self._counts, 0))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the settings, not the entries held in memory (nor the lock).

        A copy, e.g. one sent to a worker process, starts empty; with a ``directory`` it reads and writes the
        same files, so what the workers encode is found by every process that uses the directory.
        """
        return (type(self), (self.max_bytes, self.directory))

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
        by ``max_bytes`` however many chunks are passed. A list is checked whole before any compute; the
        chunks of any other iterable are checked as they come, after the earlier ones are stored.
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
        chunk's keys are rotated to the chunk's place in this prompt. The cache holds fewer positions than
        ``length`` when the chunks end sooner (``get_seq_length()`` says how many); the caller runs the rest.
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

        One thread at a time reads or encodes a key: the others that miss it meanwhile wait for that entry
        instead of encoding it again, and get its error if it fails (the next call then tries afresh).
        """
        position = 0 if prefix is None else len(prefix.input_ids)

        def fits(entry: CachedChunk) -> bool:
            return entry_fits(entry, draft.model, input_ids, offsets, position)

        while True:
            with self._lock:
                entry = self._entries.get(key.digest)
                # Token ids are compared too, in case the same model is used with another tokenizer.
                if entry is not None and fits(entry):
                    self._entries.move_to_end(key.digest)
                    self._counts["hits"] += 1
                    return entry
                flight = self._flights.get(key.digest)
                if flight is None:
                    flight = self._flights[key.digest] = Future()
                    break
            entry = flight.result()  # another thread's read or encoding of this key; raises its error
            if fits(entry):
                self._count("hits")
                return entry
        try:
            entry = read_entry(self.directory, key)
            if entry is not None and fits(entry):
                self._count("hits")
            else:
                with draft.lock:
                    entry = encode_chunk(draft.model, input_ids, offsets, prefix, chunk_size)
                if not fits(entry):  # stored entries are checked against the config's shape: it must be right
                    msg = (
                        f"{type(draft.model).__name__} makes K/V of shape {tuple(entry.keys.shape)} and "
                        f"{tuple(entry.values.shape)} per chunk, not [layers, kv_heads, tokens, head_dim] = "
                        f"{entry_shape(draft.model, len(input_ids))} as its config says; the draft cache does not "
                        "support this model, use SpecPC without cache=."
                    )
                    raise NotImplementedError(msg)
                self._count("misses")
                write_entry(self.directory, key, entry)
            self._remember(key.digest, entry)
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

    def _remember(self, digest: str, entry: CachedChunk) -> None:
        """Keep ``entry`` in memory as the most recently used, evicting the least recently used beyond ``max_bytes``."""
        with self._lock:
            self._forget(digest)
            if entry.nbytes > self.max_bytes:
                return
            self._entries[digest] = entry
            self._counts["bytes"] += entry.nbytes
            self._counts["tokens"] += len(entry.input_ids)
            while self._counts["bytes"] > self.max_bytes:
                self._forget(next(iter(self._entries)))

    def _forget(self, digest: str) -> None:
        old = self._entries.pop(digest, None)
        if old is not None:
            self._counts["bytes"] -= old.nbytes
            self._counts["tokens"] -= len(old.input_ids)


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

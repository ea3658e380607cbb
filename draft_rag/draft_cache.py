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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from draft_rag.checks import check_int
from draft_rag.hf import cache_from_tensors, cache_tensors, check_supported, empty_cache, kv_shape, rotate_keys
from draft_rag.models import LoadedModel
from draft_rag.scoring import prefill

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

ENTRY_FORMAT = "draft-rag-chunk-1"
"""Hashed into every key and written into every file: a changed layout gets a new name and old files go unread."""

DIRECTORY_MODE = 0o700
"""Mode of a cache directory the cache creates: entries hold users' documents, so only the owner lists them."""

FILE_MODE = 0o600
"""Mode of every entry file: only the owner reads the K/V of users' documents."""

_HASH_SLICE = 1 << 26
"""Bytes of a tensor copied to the CPU and hashed at a time (bounds the extra memory of hashing GPU weights)."""

_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_FINGERPRINT_LOCK = threading.Lock()


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

    ``keys`` and ``values`` are ``[layers, kv_heads, tokens, head_dim]`` in the model's dtype, on the CPU; the
    keys are post-RoPE for positions ``position, position + 1, ...``, where the chunk was encoded.
    """

    input_ids: list[int]
    offsets: list[tuple[int, int]]
    keys: torch.Tensor
    values: torch.Tensor
    position: int

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


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


@dataclass(frozen=True)
class _Key:
    digest: str
    fingerprint: str
    dtype: str


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
            processes. A missing directory is created with mode 0700 (:data:`DIRECTORY_MODE`: the entry names
            and files hold users' documents); missing parents get the default mode, and a directory that
            already exists keeps its mode (e.g. a group-shared one). Files are created with mode 0600
            (:data:`FILE_MODE`), written under a temporary name in the directory, flushed to disk and then
            renamed, so readers never see a partial file. A file that cannot be read, holds another model's
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
            self.directory = _cache_directory(self.directory)

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
        model = draft.model
        keys, values = [], []
        start = 0
        for entry in self._resolve(draft, prefix_ids, chunks, chunk_size, progress):
            take = min(len(entry.input_ids), length - start)
            if take > 0:
                head = entry.keys[:, :, :take].to(model.device)
                keys.append(rotate_keys(model, head, start - entry.position))
                values.append(entry.values[:, :, :take].to(model.device))
            start += len(entry.input_ids)
        if not keys:
            return empty_cache()
        all_keys, all_values = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        return cache_from_tensors((k[None], v[None]) for k, v in zip(all_keys, all_values))

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
        _check_supported(draft, len(prefix_ids), [] if listed is None else listed)
        prefix = self._fetch(draft, _key(model, prefix_ids, None), prefix_ids, [], None, chunk_size)
        yield prefix
        # A stream's length is unknown, so its bar counts tokens without a total.
        total = None if listed is None else sum(len(chunk.input_ids) for chunk in listed)
        disable = None if progress is None else not progress
        with tqdm(total=total, desc="Draft cache", unit="tok", disable=disable) as bar:
            for chunk in chunks:
                if listed is None:
                    _check_supported(draft, len(prefix_ids), [chunk])
                key = _key(model, prefix_ids, chunk.text)
                offsets = [(int(start), int(end)) for start, end in chunk.offsets]
                yield self._fetch(draft, key, list(chunk.input_ids), offsets, prefix, chunk_size)
                bar.update(len(chunk.input_ids))

    def _fetch(
        self,
        draft: LoadedModel,
        key: _Key,
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
            return _fits(entry, draft.model, input_ids, offsets, position)

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
            entry = self._read(key)
            if entry is not None and fits(entry):
                self._count("hits")
            else:
                with draft.lock:
                    entry = _encode(draft.model, input_ids, offsets, prefix, chunk_size)
                if not fits(entry):  # stored entries are checked against the config's shape: it must be right
                    msg = (
                        f"{type(draft.model).__name__} makes K/V of shape {tuple(entry.keys.shape)} and "
                        f"{tuple(entry.values.shape)} per chunk, not [layers, kv_heads, tokens, head_dim] = "
                        f"{_entry_shape(draft.model, len(input_ids))} as its config says; the draft cache does not "
                        "support this model, use SpecPC without cache=."
                    )
                    raise NotImplementedError(msg)
                self._count("misses")
                self._write(key, entry)
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

    def _path(self, key: _Key) -> Path | None:
        return None if self.directory is None else Path(self.directory) / f"{key.digest}.safetensors"

    def _read(self, key: _Key) -> CachedChunk | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            return _load(path, key)
        except Exception:  # a truncated, corrupted or unreadable file is rebuilt, never fatal
            return None

    def _write(self, key: _Key, entry: CachedChunk) -> None:
        """Store ``entry`` as ``key``'s file: written to a private temporary file in the directory, flushed to disk,
        then renamed over the name (atomic, so other processes read a whole file or none)."""
        from safetensors.torch import save

        path = self._path(key)
        if path is None:
            return
        tensors = _tensors(entry)
        metadata = {"format": ENTRY_FORMAT, "key": key.digest, "fingerprint": key.fingerprint, "dtype": key.dtype,
                    "position": str(entry.position), "checksum": _checksum(tensors)}
        data = save(tensors, metadata=metadata)
        tmp = None
        try:
            handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(handle, "wb") as file:
                os.chmod(tmp, FILE_MODE)  # mkstemp's mode is masked by the umask; this one is exact
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except OSError as error:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            warnings.warn(f"DraftCache could not write {path} ({error}); the entry stays in memory only.",
                          stacklevel=2)


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


def bytes_per_token(model: PreTrainedModel | LoadedModel) -> int:
    """Bytes of draft K/V the cache keeps per token: layers x KV heads x head dim x (K, V) x dtype size.

    12 KiB (12288) for the packaged 0.5B draft in bf16: 24 layers, 2 KV heads of 64 dims.
    """
    model = model.model if isinstance(model, LoadedModel) else model
    layers, kv_heads, head_dim = kv_shape(model)
    return 2 * layers * kv_heads * head_dim * model.dtype.itemsize


def model_fingerprint(model: PreTrainedModel) -> str:
    """A hex SHA-256 of ``model``'s class, config and every byte of every weight tensor (parameters and buffers).

    Computed once per model object and remembered while the object lives (models are not expected to change
    their weights while cached); concurrent first calls compute it once. Any changed weight changes it. Tied
    weights are hashed once, and tensors left on the ``meta`` device (offloaded) are not hashed. The config's
    path and transformers version are left out, so the same weights loaded from another place share entries.

    Cost: one pass over the weights at SHA-256 speed, paid by the first cache lookup of each loaded model.
    Measured on the packaged 0.5B draft on a busy 2-core x86 CPU with SHA extensions: 1.3 s in bf16 (1.17 GiB
    of weights), 3.5 s in fp32 (2.35 GiB), 0.7-0.9 GiB/s. GPU weights are copied to the CPU 64 MiB at a time.
    """
    with _FINGERPRINT_LOCK:
        fingerprint = _FINGERPRINTS.get(model)
        if fingerprint is None:
            config = model.config.to_dict()
            for volatile in ("_name_or_path", "transformers_version"):
                config.pop(volatile, None)
            digest = hashlib.sha256(type(model).__qualname__.encode())
            digest.update(json.dumps(config, sort_keys=True, default=str).encode())
            for name, tensor in (*model.named_parameters(), *model.named_buffers()):
                if tensor.device.type != "meta":
                    _hash_tensor(digest, name, tensor)
            fingerprint = _FINGERPRINTS[model] = digest.hexdigest()
    return fingerprint


def _entry_shape(model: PreTrainedModel, tokens: int) -> tuple[int, int, int, int]:
    """The shape of the keys (and of the values) of an entry of ``tokens`` tokens for ``model``."""
    layers, kv_heads, head_dim = kv_shape(model)
    return layers, kv_heads, tokens, head_dim


def _fits(
    entry: CachedChunk, model: PreTrainedModel, input_ids: list[int], offsets: list[tuple[int, int]], position: int
) -> bool:
    """Whether ``entry`` can stand for ``input_ids`` encoded by ``model`` at ``position``: same token ids, spans
    and position, and keys and values of every layer in the model's shape and dtype."""
    shape = _entry_shape(model, len(input_ids))
    return (
        entry.input_ids == input_ids and entry.offsets == offsets and entry.position == position
        and tuple(entry.keys.shape) == shape and tuple(entry.values.shape) == shape
        and entry.keys.dtype == entry.values.dtype == model.dtype
    )


def _key(model: PreTrainedModel, prefix_ids: list[int], text: str | None) -> _Key:
    """The key of a chunk's text (``None``: the prefix itself) after ``prefix_ids`` for ``model``."""
    fingerprint, dtype = model_fingerprint(model), str(model.dtype)
    payload = json.dumps([ENTRY_FORMAT, fingerprint, dtype, prefix_ids, text])
    return _Key(hashlib.sha256(payload.encode()).hexdigest(), fingerprint, dtype)


def _check_supported(draft: LoadedModel, prefix_tokens: int, chunks: Sequence[Chunk]) -> None:
    """Raise before any compute when the draft's keys cannot be moved or a chunk does not fit after the prefix."""
    longest = max((len(chunk.input_ids) for chunk in chunks), default=0)
    needed = prefix_tokens + longest
    if needed > draft.max_context:
        msg = (
            f"a document needs {needed} draft tokens after the chat template's opening, more than the draft "
            f"model's maximum context of {draft.max_context}; split long documents into smaller chunks."
        )
        raise ValueError(msg)
    check_supported(draft.model, needed, cache=True)


def _encode(
    model: PreTrainedModel,
    input_ids: list[int],
    offsets: list[tuple[int, int]],
    prefix: CachedChunk | None,
    chunk_size: int,
) -> CachedChunk:
    """Run ``input_ids`` through the draft after ``prefix``'s K/V (none: from position 0) and keep their K/V."""
    position = 0 if prefix is None else len(prefix.input_ids)
    if not input_ids:
        layers, kv_heads, head_dim = kv_shape(model)
        empty = torch.empty(layers, kv_heads, 0, head_dim, dtype=model.dtype)
        return CachedChunk([], offsets, empty, empty.clone(), position)
    past = None
    if prefix is not None and position:
        past = cache_from_tensors(
            (k[None].to(model.device), v[None].to(model.device)) for k, v in zip(prefix.keys, prefix.values)
        )
    ids = torch.tensor([input_ids], device=model.device)
    cache, _ = prefill(model, ids, past, chunk_size=chunk_size)
    cached = cache_tensors(cache)
    keys = torch.stack([k[0, :, position:] for k, _ in cached]).cpu()
    values = torch.stack([v[0, :, position:] for _, v in cached]).cpu()
    return CachedChunk(input_ids, offsets, keys, values, position)


def _cache_directory(directory: object) -> Path:
    """``directory`` as a usable cache directory, created (mode :data:`DIRECTORY_MODE`) when missing."""
    if not isinstance(directory, (str, os.PathLike)) or not isinstance(os.fspath(directory), str):
        msg = (
            f"DraftCache directory must be a path (str or pathlib.Path), got {type(directory).__name__}; "
            "pass e.g. directory='~/.cache/my-rag/draft' (decode a bytes path with os.fsdecode first)."
        )
        raise TypeError(msg)
    if not os.fspath(directory):
        msg = "DraftCache directory is empty; pass a path such as '~/.cache/my-rag/draft' (or '.' for this directory)."
        raise ValueError(msg)
    try:
        path = Path(directory).expanduser()
    except RuntimeError as error:  # "~user/..." of an unknown user
        msg = f"DraftCache directory {directory}: {error}; pass a path without an unknown ~user."
        raise ValueError(msg) from None
    if path.is_dir():  # someone's existing directory keeps the mode they gave it
        return path
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        msg = f"DraftCache directory {path} cannot be created: {blocker} is a file; pass a directory path."
        raise ValueError(msg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=DIRECTORY_MODE)
        path.chmod(DIRECTORY_MODE)  # mkdir's mode is masked by the umask; this one is exact
    except OSError as error:
        if not path.is_dir():  # else another process made it meanwhile, and its mode is theirs
            msg = f"DraftCache directory {path} cannot be created ({error.strerror or error}); pass a writable path."
            raise ValueError(msg) from None
    return path


def _tensors(entry: CachedChunk) -> dict[str, torch.Tensor]:
    """The tensors of ``entry``'s file, by name."""
    return {
        "keys": entry.keys.contiguous(),
        "values": entry.values.contiguous(),
        "input_ids": torch.tensor(entry.input_ids, dtype=torch.int64),
        "offsets": torch.tensor(entry.offsets, dtype=torch.int64).reshape(-1, 2),
    }


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes: written into each file and checked on reading it.

    Costs one pass at SHA-256 speed (0.7-0.9 GiB/s: about 8 ms for a 512-token entry of the 0.5B draft in bf16).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Add ``tensor``'s name, dtype, shape and raw bytes to ``digest``, copied to the CPU a slice at a time."""
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, raw.numel(), _HASH_SLICE):
        digest.update(raw[start : start + _HASH_SLICE].cpu().numpy())


def _load(path: Path, key: _Key) -> CachedChunk | None:
    """The entry in ``path`` if it is a whole entry for ``key`` (same model and dtype, checksum right), else None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        expected = {"format": ENTRY_FORMAT, "key": key.digest, "fingerprint": key.fingerprint, "dtype": key.dtype}
        if any(metadata.get(name) != value for name, value in expected.items()):
            return None
        tensors = {name: handle.get_tensor(name) for name in ("keys", "values", "input_ids", "offsets")}
    if metadata.get("checksum") != _checksum(tensors):
        return None
    offsets = [(int(start), int(end)) for start, end in tensors["offsets"].tolist()]
    return CachedChunk(tensors["input_ids"].tolist(), offsets, tensors["keys"], tensors["values"],
                       int(metadata["position"]))

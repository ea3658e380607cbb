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

Entries are content-addressed: the key is a SHA-256 of the model's fingerprint (class, config and a sample of
its weights), its dtype, the prefix token ids and the document text, so an entry made by another model,
dtype or chat template is never used. In memory the cache is an LRU bounded in bytes; with a ``directory``
every entry is also a safetensors file there, which other processes read.
Reuse of per-chunk K/V follows APE (https://arxiv.org/abs/2502.05431) and TurboRAG
(https://arxiv.org/abs/2410.07590).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from draft_rag.models import LoadedModel
from draft_rag.scoring import attention_modules, check_attention_support, check_int, prefill

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

ENTRY_FORMAT = "draft-rag-chunk-1"
"""Hashed into every key and written into every file: a changed layout gets a new name and old files go unread."""

SAMPLES_PER_TENSOR = 64
"""Values of each weight tensor (evenly strided) that go into a model's fingerprint."""

# RoPE variants whose angle is a fixed frequency times the position, so that a shift is one more rotation.
# ("dynamic" and "longrope" change their frequencies with the sequence length.)
_SHIFTABLE_ROPE = ("default", "linear", "llama3", "yarn")

_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


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
    draft models: keys never collide across models, dtypes or chat templates. Entries are held in CPU memory
    and copied to the draft's device for each query.

    Args:
        max_bytes: most bytes of K/V kept in memory (1 GiB); the least recently used entries go first. About
            :func:`bytes_per_token` per token: 12 KiB for the packaged 0.5B draft in bf16. An entry larger
            than this serves the query that made it but is not kept in memory.
        directory: also keep each entry as a safetensors file in this directory (created if missing), for
            later runs and other processes. Files are written under a temporary name and renamed; one that
            cannot be read, or holds another model's or dtype's K/V, is ignored and rebuilt. Files are never
            deleted by the cache.

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

    def __post_init__(self) -> None:
        check_int("DraftCache max_bytes", self.max_bytes, 0)
        if self.directory is not None:
            self.directory = Path(self.directory).expanduser()
            self.directory.mkdir(parents=True, exist_ok=True)

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
        chunks: Sequence[Chunk],
        *,
        chunk_size: int = 2048,
        progress: bool | None = None,
    ) -> None:
        """Encode and store the chunks (and the prefix) that are not cached yet.

        Memory stays bounded by ``max_bytes`` however many chunks are passed.
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
        from transformers import DynamicCache

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
            return DynamicCache()
        all_keys, all_values = torch.cat(keys, dim=2), torch.cat(values, dim=2)
        return DynamicCache(ddp_cache_data=[(k[None], v[None]) for k, v in zip(all_keys, all_values)])

    def _resolve(
        self,
        draft: LoadedModel,
        prefix_ids: Sequence[int],
        chunks: Sequence[Chunk],
        chunk_size: int,
        progress: bool | None,
    ) -> Iterator[CachedChunk]:
        """The prefix's entry, then each chunk's, in order; those not cached are encoded and stored."""
        from tqdm.auto import tqdm

        model = draft.model
        prefix_ids = list(prefix_ids)
        _check_supported(draft, len(prefix_ids), chunks)
        prefix = self._fetch(draft, _key(model, prefix_ids, None), prefix_ids, [], None, chunk_size)
        yield prefix
        total = sum(len(chunk.input_ids) for chunk in chunks)
        disable = None if progress is None else not progress
        with tqdm(total=total, desc="Draft cache", unit="tok", disable=disable) as bar:
            for chunk in chunks:
                key = _key(model, prefix_ids, chunk.text)
                yield self._fetch(draft, key, list(chunk.input_ids), list(chunk.offsets), prefix, chunk_size)
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
        """The entry under ``key`` from memory or disk, else encoded by the draft (after ``prefix``) and stored."""
        entry = self._recall(key)
        # The token ids are checked too, in case the same model is used with another tokenizer.
        if entry is not None and entry.input_ids == input_ids:
            self._count("hits")
            return entry
        with draft.lock:
            entry = _encode(draft.model, input_ids, offsets, prefix, chunk_size)
        self._count("misses")
        self._remember(key.digest, entry)
        self._write(key, entry)
        return entry

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _recall(self, key: _Key) -> CachedChunk | None:
        with self._lock:
            entry = self._entries.get(key.digest)
            if entry is not None:
                self._entries.move_to_end(key.digest)
                return entry
        entry = self._read(key)
        if entry is not None:
            self._remember(key.digest, entry)
        return entry

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
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = self._path(key)
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tensors = {
            "keys": entry.keys.contiguous(),
            "values": entry.values.contiguous(),
            "input_ids": torch.tensor(entry.input_ids, dtype=torch.int64),
            "offsets": torch.tensor(entry.offsets, dtype=torch.int64).reshape(-1, 2),
        }
        metadata = {"format": ENTRY_FORMAT, "key": key.digest, "fingerprint": key.fingerprint, "dtype": key.dtype,
                    "position": str(entry.position)}
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        except (OSError, SafetensorError) as error:
            tmp.unlink(missing_ok=True)
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
    layers, kv_heads, head_dim = _kv_shape(model)
    return 2 * layers * kv_heads * head_dim * model.dtype.itemsize


def model_fingerprint(model: PreTrainedModel) -> str:
    """A hex digest of ``model``'s class, config and an evenly strided sample of every weight tensor.

    Computed once per model object (models are not expected to change their weights while cached); two
    checkpoints of one architecture differ in their samples. The config's path and transformers version are
    left out, so the same weights loaded from another place share entries.
    """
    fingerprint = _FINGERPRINTS.get(model)
    if fingerprint is None:
        config = model.config.to_dict()
        for volatile in ("_name_or_path", "transformers_version"):
            config.pop(volatile, None)
        digest = hashlib.sha256(type(model).__qualname__.encode())
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if tensor.device.type == "meta":
                    continue
                flat = tensor.detach().reshape(-1)
                sample = flat[:: max(flat.numel() // SAMPLES_PER_TENSOR, 1)][:SAMPLES_PER_TENSOR]
                digest.update(f"{name}{tuple(tensor.shape)}".encode())
                digest.update(sample.float().cpu().numpy().tobytes())
        fingerprint = _FINGERPRINTS[model] = digest.hexdigest()
    return fingerprint


def rotate_keys(model: PreTrainedModel, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Post-RoPE ``keys`` ``[..., kv_heads, tokens, head_dim]`` moved ``shift`` positions later (or earlier).

    RoPE rotates each pair of dimensions by an angle proportional to the position, so a key of position ``p``
    becomes the key of position ``p + shift`` by one more rotation by ``shift``. The rotation uses the
    model's own rotary module and ``apply_rotary_pos_emb`` (so partial and interleaved RoPE work), in fp32,
    with the rotary module's ``attention_scaling`` divided out so that it is a pure rotation.

    Raises:
        NotImplementedError: the model's RoPE changes its frequencies with the sequence length
            (``dynamic``, ``longrope``) or differs between layers, so a shift is not a rotation.
    """
    rotary, apply_rope = _rope(model)
    if shift == 0:
        return keys
    probe = torch.zeros(1, device=keys.device)
    cos, sin = rotary(probe, torch.tensor([[shift]], device=keys.device))
    scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    full = keys.float()
    _, rotated = apply_rope(full, full, cos.float() / scaling, sin.float() / scaling)
    return rotated.to(keys.dtype)


def _rope(model: PreTrainedModel) -> tuple[Any, Any]:
    """The model's rotary embedding module and its architecture's ``apply_rotary_pos_emb``."""
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    rotary = next((m for n, m in model.named_modules() if n.split(".")[-1] == "rotary_emb"), None)
    rope_type = getattr(rotary, "rope_type", None)
    attention = next(attention_modules(model))
    apply_rope = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    if rotary is None or apply_rope is None or rope_type not in _SHIFTABLE_ROPE:
        msg = (
            f"{name} uses RoPE of type {rope_type!r}, which a draft cache cannot shift to new positions (supported: "
            f"{', '.join(_SHIFTABLE_ROPE)}); use SpecPC without cache= for this draft model."
        )
        raise NotImplementedError(msg)
    return rotary, apply_rope


def _kv_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """Layers, KV heads and head dim of ``model``'s attention."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(config.num_hidden_layers), int(kv_heads), int(head_dim)


def _key(model: PreTrainedModel, prefix_ids: list[int], text: str | None) -> _Key:
    """The key of a chunk's text (``None``: the prefix itself) after ``prefix_ids`` for ``model``."""
    fingerprint, dtype = model_fingerprint(model), str(model.dtype)
    payload = json.dumps([ENTRY_FORMAT, fingerprint, dtype, prefix_ids, text])
    return _Key(hashlib.sha256(payload.encode()).hexdigest(), fingerprint, dtype)


def _check_supported(draft: LoadedModel, prefix_tokens: int, chunks: Sequence[Chunk]) -> None:
    """Raise before any compute when the draft's keys cannot be moved or a chunk does not fit after the prefix."""
    _rope(draft.model)
    longest = max((len(chunk.input_ids) for chunk in chunks), default=0)
    needed = prefix_tokens + longest
    if needed > draft.max_context:
        msg = (
            f"a document needs {needed} draft tokens after the chat template's opening, more than the draft "
            f"model's maximum context of {draft.max_context}; split long documents into smaller chunks."
        )
        raise ValueError(msg)
    check_attention_support(draft.model, needed)


def _encode(
    model: PreTrainedModel,
    input_ids: list[int],
    offsets: list[tuple[int, int]],
    prefix: CachedChunk | None,
    chunk_size: int,
) -> CachedChunk:
    """Run ``input_ids`` through the draft after ``prefix``'s K/V (none: from position 0) and keep their K/V."""
    from transformers import DynamicCache

    position = 0 if prefix is None else len(prefix.input_ids)
    if not input_ids:
        layers, kv_heads, head_dim = _kv_shape(model)
        empty = torch.empty(layers, kv_heads, 0, head_dim, dtype=model.dtype)
        return CachedChunk([], offsets, empty, empty.clone(), position)
    past = None
    if prefix is not None and position:
        past = DynamicCache(ddp_cache_data=[
            (k[None].to(model.device), v[None].to(model.device)) for k, v in zip(prefix.keys, prefix.values)
        ])
    ids = torch.tensor([input_ids], device=model.device)
    cache, _ = prefill(model, ids, past, chunk_size=chunk_size)
    keys = torch.stack([layer.keys[0, :, position:] for layer in cache.layers]).cpu()
    values = torch.stack([layer.values[0, :, position:] for layer in cache.layers]).cpu()
    return CachedChunk(input_ids, offsets, keys, values, position)


def _load(path: Path, key: _Key) -> CachedChunk | None:
    """The entry in ``path`` if it is a complete entry for ``key`` (same model and dtype), else None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        expected = {"format": ENTRY_FORMAT, "key": key.digest, "fingerprint": key.fingerprint, "dtype": key.dtype}
        if any(metadata.get(name) != value for name, value in expected.items()):
            return None
        keys, values = handle.get_tensor("keys"), handle.get_tensor("values")
        input_ids = handle.get_tensor("input_ids").tolist()
        offsets = [(int(s), int(e)) for s, e in handle.get_tensor("offsets").tolist()]
    if keys.ndim != 4 or keys.shape != values.shape or keys.shape[2] != len(input_ids) or str(keys.dtype) != key.dtype:
        return None
    return CachedChunk(input_ids, offsets, keys, values, int(metadata["position"]))

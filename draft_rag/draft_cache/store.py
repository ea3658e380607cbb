"""The draft cache's entries on disk: the directory, atomic file writes, and reading a file back only when whole.

Every entry is a safetensors file named by its key in the cache's directory, which other processes read. A
file is written under a private temporary name, flushed to disk and renamed, so readers never see a partial
one; it is used only when its model, dtype and key match and the SHA-256 of its tensors matches the one
written into it. Anything else is ignored, so the entry is encoded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

import torch

from draft_rag.draft_cache.fingerprint import ENTRY_FORMAT, EntryKey, hash_tensor
from draft_rag.draft_cache.layout import CachedChunk

DIRECTORY_MODE = 0o700
"""Mode of a cache directory the cache creates: entries hold users' documents, so only the owner lists them."""

FILE_MODE = 0o600
"""Mode of every entry file: only the owner reads the K/V of users' documents."""


def cache_directory(directory: object) -> Path:
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


def _entry_path(directory: str | os.PathLike[str] | None, key: EntryKey) -> Path | None:
    return None if directory is None else Path(directory) / f"{key.digest}.safetensors"


def read_entry(directory: str | os.PathLike[str] | None, key: EntryKey) -> CachedChunk | None:
    """``key``'s entry from its file in ``directory``; None without a directory or a whole, matching file."""
    path = _entry_path(directory, key)
    if path is None or not path.is_file():
        return None
    try:
        return _load(path, key)
    except Exception:  # a truncated, corrupted or unreadable file is rebuilt, never fatal
        return None


def write_entry(directory: str | os.PathLike[str] | None, key: EntryKey, entry: CachedChunk) -> None:
    """Store ``entry`` as ``key``'s file: written to a private temporary file in the directory, flushed to disk,
    then renamed over the name (atomic, so other processes read a whole file or none)."""
    from safetensors.torch import save

    path = _entry_path(directory, key)
    if path is None:
        return
    tensors = _tensors(entry)
    metadata = {"format": ENTRY_FORMAT, "key": key.digest, "fingerprint": key.fingerprint, "dtype": key.dtype,
                "position": str(entry.position), "checksum": file_checksum(tensors)}
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


def _tensors(entry: CachedChunk) -> dict[str, torch.Tensor]:
    """The tensors of ``entry``'s file, by name, in host memory (copied once from the draft's device: the checksum
    and the file both read them)."""
    return {
        "keys": entry.keys.contiguous().cpu(),
        "values": entry.values.contiguous().cpu(),
        "input_ids": torch.tensor(entry.input_ids, dtype=torch.int64),
        "offsets": torch.tensor(entry.offsets, dtype=torch.int64).reshape(-1, 2),
    }


def file_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes: written into each file and checked on reading it.

    Costs one pass at SHA-256 speed (0.7-0.9 GiB/s: about 8 ms for a 512-token entry of the 0.5B draft in bf16).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def _load(path: Path, key: EntryKey) -> CachedChunk | None:
    """The entry in ``path`` if it is a whole entry for ``key`` (same model and dtype, checksum right), else None."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        expected = {"format": ENTRY_FORMAT, "key": key.digest, "fingerprint": key.fingerprint, "dtype": key.dtype}
        if any(metadata.get(name) != value for name, value in expected.items()):
            return None
        tensors = {name: handle.get_tensor(name) for name in ("keys", "values", "input_ids", "offsets")}
    if metadata.get("checksum") != file_checksum(tensors):
        return None
    offsets = [(int(start), int(end)) for start, end in tensors["offsets"].tolist()]
    return CachedChunk(tensors["input_ids"].tolist(), offsets, tensors["keys"], tensors["values"],
                       int(metadata["position"]))

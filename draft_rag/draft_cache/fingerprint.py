"""The names of draft cache entries: a model's fingerprint, and the key of a chunk's entry derived from it.

A key is a SHA-256 of the model's fingerprint (class, config and every byte of its weights), its dtype, the
prefix token ids and the chunk's text, so an entry made by another model, dtype or chat template is never used.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ENTRY_FORMAT = "draft-rag-chunk-1"
"""Hashed into every key and written into every file: a changed layout gets a new name and old files go unread."""

_HASH_SLICE = 1 << 26
"""Bytes of a tensor copied to the CPU and hashed at a time (bounds the extra memory of hashing GPU weights)."""

_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_FINGERPRINT_LOCK = threading.Lock()


@dataclass(frozen=True)
class EntryKey:
    """The name of an entry (``digest``) and what it was derived from that its file records."""

    digest: str
    fingerprint: str
    dtype: str


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
                    hash_tensor(digest, name, tensor)
            fingerprint = _FINGERPRINTS[model] = digest.hexdigest()
    return fingerprint


def entry_key(model: PreTrainedModel, prefix_ids: list[int], text: str | None) -> EntryKey:
    """The key of a chunk's text (``None``: the prefix itself) after ``prefix_ids`` for ``model``."""
    fingerprint, dtype = model_fingerprint(model), str(model.dtype)
    payload = json.dumps([ENTRY_FORMAT, fingerprint, dtype, prefix_ids, text])
    return EntryKey(hashlib.sha256(payload.encode()).hexdigest(), fingerprint, dtype)


def hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Add ``tensor``'s name, dtype, shape and raw bytes to ``digest``, copied to the CPU a slice at a time."""
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    for start in range(0, raw.numel(), _HASH_SLICE):
        digest.update(raw[start : start + _HASH_SLICE].cpu().numpy())

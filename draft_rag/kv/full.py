"""The full cache: no eviction, the reference every eviction method is measured against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from draft_rag.kv.base import KVEviction


@dataclass
class NoEviction(KVEviction):
    """Keep every prompt KV entry (``budget`` is ``None``): plain generation with the full cache."""

    budget: int | None = field(default=None, init=False)

    name: ClassVar[str] = "full"

"""KV-cache eviction methods, one small module each, all over the shared scoring primitive."""

from __future__ import annotations

from draft_rag.kv.base import KVEviction, KVPeak, Observers
from draft_rag.kv.full import NoEviction
from draft_rag.kv.snapkv import SnapKVEviction
from draft_rag.kv.speckv import SpecKVEviction
from draft_rag.kv.streaming_llm import StreamingLLMEviction

METHODS: dict[str, type[KVEviction]] = {
    cls.name: cls for cls in (SpecKVEviction, SnapKVEviction, StreamingLLMEviction, NoEviction)
}

__all__ = [
    "METHODS",
    "KVEviction",
    "KVPeak",
    "NoEviction",
    "Observers",
    "SnapKVEviction",
    "SpecKVEviction",
    "StreamingLLMEviction",
]

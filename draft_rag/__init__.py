"""draft-rag: a small draft model decides what a large target model needs to read.

- :class:`SpecPC` compresses retrieved documents to the spans the draft attends to (text out, any target).
- :class:`DraftCache` keeps each document's draft K/V across queries, so SpecPC's draft reads only the question.
- :class:`SpecKV` evicts the target's KV cache guided by a draft answer during generation.

Names are imported lazily so that ``import draft_rag`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SpecPC": "draft_rag.specpc",
    "CompressionResult": "draft_rag.specpc",
    "CompressedDocument": "draft_rag.specpc",
    "ContextScores": "draft_rag.specpc",
    "DraftCache": "draft_rag.draft_cache",
    "SpecKV": "draft_rag.engine",
    "GenerationResult": "draft_rag.engine",
    "LoadedModel": "draft_rag.models",
    "load_model": "draft_rag.models",
    "ScoreReduction": "draft_rag.scoring",
    "ObserverScores": "draft_rag.scoring",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from draft_rag.draft_cache import DraftCache
    from draft_rag.engine import GenerationResult, SpecKV
    from draft_rag.models import LoadedModel, load_model
    from draft_rag.scoring import ObserverScores, ScoreReduction
    from draft_rag.specpc import CompressedDocument, CompressionResult, ContextScores, SpecPC


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    msg = f"module 'draft_rag' has no attribute {name!r}"
    raise AttributeError(msg)

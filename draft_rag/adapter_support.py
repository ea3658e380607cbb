"""What the LangChain and LlamaIndex SpecPC adapters share: their SpecPC, and the check of their draft cache.

Kept free of heavy imports at module level, so importing an adapter stays instant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from draft_rag.draft_cache import DraftCache
    from draft_rag.models import Lazy
    from draft_rag.specpc import SpecPC


def adapter_specpc(lazy: Lazy[SpecPC], specpc_kwargs: Mapping[str, Any], **fields: Any) -> SpecPC:
    """The :class:`~draft_rag.SpecPC` for an adapter's current settings, rebuilt only when they change.

    ``fields`` are the settings the adapter has as its own fields (draft, budget, target_tokenizer, cache),
    ``specpc_kwargs`` the rest. A setting given in both raises TypeError instead of one silently winning.
    A :class:`~draft_rag.DraftCache` equals only itself, so keeping the same cache keeps the SpecPC.
    """
    from draft_rag.specpc import SpecPC

    settings = dict(**fields, **specpc_kwargs)
    return lazy.get(lambda: SpecPC(**settings), settings)


def checked_cache(cache: object) -> DraftCache | None:
    """An adapter's ``cache`` setting checked: a :class:`~draft_rag.DraftCache` or None (a ValueError says how)."""
    if cache is None:  # no torch import for the default
        return None
    from draft_rag.draft_cache import as_draft_cache

    return as_draft_cache(cache)

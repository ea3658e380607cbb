"""What the LangChain and LlamaIndex SpecPC adapters share: their SpecPC and the checks of what they are given.

Kept free of heavy imports at module level, so importing an adapter stays instant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def require_cache(adapter: Any, caller: str) -> None:
    """Raise a ValueError, saying how to set one, when ``adapter`` (a compressor or postprocessor) has no cache."""
    if adapter.cache is None:
        kind = type(adapter).__name__
        msg = (
            f"{caller} needs a draft cache, and this {kind} has none; create it with "
            f"{kind}(..., cache=DraftCache()) (from draft_rag import DraftCache)."
        )
        raise ValueError(msg)


def check_list(
    value: object,
    name: str,
    item_type: type | tuple[type, ...],
    *,
    what: str,
    item: str,
    single_hint: str,
    item_hint: str,
    not_lists: tuple[type, ...] = (),
) -> None:
    """Raise a TypeError naming ``name`` unless ``value`` is a list (any sequence but text) of ``item_type``.

    ``what`` names the items in the plural ("strings"), ``item`` one of them ("a string"); ``single_hint`` says
    how to pass a lone item, ``item_hint`` how to fix a wrong one. ``not_lists`` are sequence types that are
    items, not lists (a mapping or a node passed alone).
    """
    if isinstance(value, (str, *not_lists)) or not isinstance(value, Sequence):
        msg = f"{name} must be a list of {what}, got {type(value).__name__}; {single_hint}."
        raise TypeError(msg)
    for index, entry in enumerate(value):
        if not isinstance(entry, item_type):
            msg = f"{name}[{index}] must be {item}, got {type(entry).__name__}; {item_hint}."
            raise TypeError(msg)


def check_query(query: object, name: str, answers: str) -> str:
    """``query`` when it is non-empty text; a TypeError or ValueError naming ``name`` and the fix otherwise.

    ``answers`` names what the question is asked of ("documents", "nodes").
    """
    if not isinstance(query, str):
        msg = f"{name} must be a string, got {type(query).__name__}; pass the question as text."
        raise TypeError(msg)
    if not query.strip():
        msg = f"{name} is empty; pass the question the {answers} should answer."
        raise ValueError(msg)
    return query

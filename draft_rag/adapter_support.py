"""What the LangChain and LlamaIndex adapters share: their SpecPC and the checks of what they are given.

Kept free of heavy imports at module level, so importing an adapter stays instant.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping, Sequence
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


def check_keywords(kind: str, data: object, fields: Mapping[str, Any], ignored: Collection[str] = ()) -> None:
    """Raise a TypeError for keywords that set none of ``fields``, or two keywords that set the same field.

    ``data`` is what a pydantic adapter is constructed from, ``fields`` its ``model_fields``: a field is set by
    its name or any of its aliases. The error names each unknown keyword with the closest accepted one, so a
    typo fails at construction instead of leaving the default in place. ``ignored`` keys are let through (a
    framework's own serialization may write them).
    """
    if not isinstance(data, Mapping):
        return  # an instance or other input: pydantic validates it
    names = {field: keyword_names(field, info) for field, info in fields.items()}
    accepted = sorted(name for field_names in names.values() for name in field_names)
    unknown = [key for key in data if key not in accepted and key not in ignored]
    if unknown:
        raise TypeError(unknown_keywords_message(kind, unknown, accepted))
    for field_names in names.values():
        given = [name for name in field_names if name in data]
        if len(given) > 1:
            msg = f"{kind} got both {given[0]} and {given[1]}; pass one of them (they mean the same)."
            raise TypeError(msg)


def keyword_names(name: str, field: Any) -> list[str]:
    """The keywords that set a pydantic field: its name and its aliases (``alias``, ``validation_alias``)."""
    aliases = [field.alias, *getattr(field.validation_alias, "choices", [field.validation_alias])]
    return list(dict.fromkeys([name, *(alias for alias in aliases if isinstance(alias, str))]))


def unknown_keywords_message(kind: str, unknown: Iterable[object], accepted: Sequence[str]) -> str:
    """The error for ``unknown`` keywords given to ``kind``: each with the closest ``accepted`` name, then all."""
    named = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), accepted, n=1)
        named.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    noun = "an unknown keyword argument" if len(named) == 1 else "unknown keyword arguments"
    return f"{kind} got {noun} {', '.join(named)}; it accepts {', '.join(accepted)}."


def check_picklable(adapter: Any, *fields: str) -> None:
    """Raise a TypeError naming the field when one of ``adapter``'s ``fields`` holds a loaded model.

    Called when an adapter is pickled (sent to a worker process): a loaded model is not copied there (its
    weights would travel with every task, and its lock cannot), so the model must be given by name or path,
    which the worker loads itself. Without this check LlamaIndex would drop the field and the copy would
    quietly load the packaged default model.
    """
    from draft_rag.models import LoadedModel

    for field in fields:
        if isinstance(getattr(adapter, field), LoadedModel):
            kind = type(adapter).__name__
            msg = (
                f"{kind} cannot be pickled (e.g. sent to worker processes) while its {field} is a loaded model; "
                f"give {field}= as a model name or a local path (a model saved with save_pretrained), which each "
                "process loads itself."
            )
            raise TypeError(msg)

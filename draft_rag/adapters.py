"""What the LangChain and LlamaIndex adapters share, so that each adapter only maps its framework's types.

The adapters build their SpecPC or SpecKV lazily from their settings (:class:`Lazy`, :class:`SpecPCAdapter`,
:class:`SpecKVAdapter`), check what they are given (keywords, lists, queries, per-call options, message roles,
the cache, pickling) and report a generation (:func:`next_piece`, :func:`usage`) the same way; the framework's
own names (its message types and role names, its response types) stay in the adapter. Kept free of heavy
imports at module level, so importing an adapter stays instant.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Collection, Generator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from draft_rag import DraftCache, GenerationResult, SpecKV, SpecPC

T = TypeVar("T")


class Lazy(Generic[T]):
    """A value built on first use, and built again when the settings it was built from change.

    The framework adapters keep their SpecPC/SpecKV object in one: constructing an adapter loads no model,
    concurrent first calls share one object, and a setting changed after the first call takes effect on the
    next (models are cached by :func:`~draft_rag.load_model`, so a rebuild does not load them again).
    """

    def __init__(self) -> None:
        self._value: T | None = None
        self._settings: object = None
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy (pickled for a worker process, or deep-copied) starts empty and builds its own value on first
        # use: neither the lock nor a loaded model travels with it.
        return (type(self), ())

    def get(self, build: Callable[[], T], settings: object = None) -> T:
        """The value ``build()`` made for ``settings``, built again when ``settings`` differ from last time.

        Settings are compared with ``==``; pass a fresh copy of mutable ones, so that a change made in place
        is seen.
        """
        with self._lock:
            if self._value is None or settings != self._settings:
                self._value = build()
                self._settings = settings
            return self._value


def _built(lazy: Lazy[T], build: Callable[..., T], kwargs: Mapping[str, Any], **fields: Any) -> T:
    """``build(**fields, **kwargs)`` kept in ``lazy``, built again only when the settings change."""
    # dict() rejects a setting given twice (as a field and in the kwargs) instead of picking one.
    settings = dict(**fields, **kwargs)
    return lazy.get(lambda: build(**settings), settings)


class SpecPCAdapter:
    """The SpecPC of an adapter that compresses (LangChain's compressor, LlamaIndex's postprocessor).

    Mixed into the adapter's pydantic class, which holds the settings as fields: ``draft``, ``budget``,
    ``target_tokenizer`` and ``cache``, the rest in ``specpc_kwargs``, and the SpecPC in a ``_specpc``
    :class:`Lazy`. A setting given both as a field and in ``specpc_kwargs`` raises TypeError instead of one
    silently winning. A :class:`~draft_rag.DraftCache` equals only itself, so keeping the same cache keeps the
    SpecPC.
    """

    if TYPE_CHECKING:
        draft: Any
        budget: int
        target_tokenizer: Any
        cache: Any
        specpc_kwargs: dict[str, Any]
        _specpc: Lazy[SpecPC]

    @property
    def specpc(self) -> SpecPC:
        """The underlying :class:`draft_rag.SpecPC` for the current settings (its model loads on first use)."""
        from draft_rag import SpecPC

        return _built(
            self._specpc, SpecPC, self.specpc_kwargs,
            draft=self.draft, budget=self.budget, target_tokenizer=self.target_tokenizer, cache=self.cache,
        )


class SpecKVAdapter:
    """The SpecKV engine of an adapter that generates (LangChain's chat model, LlamaIndex's LLM).

    Mixed into the adapter's pydantic class, which holds the settings as fields: ``target``, ``draft``,
    ``method``, ``budget``, ``window_size`` and ``prompt_budget``, the rest in ``speckv_kwargs``, and the engine
    in an ``_engine`` :class:`Lazy`. A setting given both as a field and in ``speckv_kwargs`` raises TypeError
    instead of one silently winning.
    """

    if TYPE_CHECKING:
        target: Any
        draft: Any
        method: str
        budget: int
        window_size: int
        prompt_budget: int | None
        speckv_kwargs: dict[str, Any]
        _engine: Lazy[SpecKV]

    @property
    def engine(self) -> SpecKV:
        """The underlying :class:`draft_rag.SpecKV` for the current settings, built on first access."""
        from draft_rag import SpecKV

        return _built(
            self._engine, SpecKV, self.speckv_kwargs,
            target=self.target, draft=self.draft, method=self.method, budget=self.budget,
            window_size=self.window_size, prompt_budget=self.prompt_budget,
        )


def model_label(model: Any) -> str:
    """A model's name: the string it is given by, or the name a loaded model was loaded under."""
    return model if isinstance(model, str) else getattr(model, "name", "") or "local"


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


def call_options(
    adapter: Any,
    kwargs: Mapping[str, Any],
    names: Sequence[str],
    *,
    also: str,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Per-call settings: each of ``names`` from ``kwargs`` when given there, else the ``adapter``'s own.

    Any other keyword raises TypeError naming it and the accepted ones (``also`` names the keywords the call
    takes besides ``names``), rather than being ignored. ``aliases`` map other names of a setting to its
    name; giving both raises TypeError.
    """
    aliases = aliases or {}
    kind = type(adapter).__name__
    unknown = sorted(set(kwargs) - {*names, *aliases})
    if unknown:
        msg = f"{kind} got unknown options {unknown}; per call it accepts {list(names)} and {also}."
        raise TypeError(msg)
    for alias, name in aliases.items():
        if alias in kwargs:
            if name in kwargs:
                msg = f"{kind} got both {alias} and {name}; pass one of them (they mean the same)."
                raise TypeError(msg)
            kwargs = {**kwargs, name: kwargs[alias]}
    return {name: kwargs.get(name, getattr(adapter, name)) for name in names}


def chat_role(index: int, role: Any, roles: Mapping[Any, str], problem: str) -> str:
    """The chat template's role for ``role``, the role of ``messages[index]``, read from the adapter's ``roles``.

    Each framework names its roles its own way, so the table is the adapter's; a role it lacks raises a
    ValueError that says ``problem`` and lists the roles the table knows.
    """
    template_role = roles.get(role)
    if template_role is None:
        known = ", ".join(sorted(str(getattr(name, "value", name)) for name in roles))
        msg = f"messages[{index}] {problem}; use one of {known}."
        raise ValueError(msg)
    return template_role


def next_piece(pieces: Generator[str, None, GenerationResult]) -> str | GenerationResult:
    """The next streamed text piece, or the stream's :class:`~draft_rag.GenerationResult` once it is finished."""
    try:
        return next(pieces)
    except StopIteration as finished:
        return finished.value


def usage(result: GenerationResult) -> dict[str, Any]:
    """Token counts, finish reason, prompt KV entries kept and timings of one generation, as a plain dict.

    Each adapter maps it into its framework's type (LlamaIndex's ``additional_kwargs``, LangChain's usage and
    response metadata).
    """
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "finish_reason": result.finish_reason,
        "kv_entries_kept": result.kv_entries_kept,
        "kv_entries_full": result.kv_entries_full,
        "timings": dict(result.timings),
    }

"""Argument checks shared by the public entry points: each error names the argument and the fix."""

from __future__ import annotations

import numbers


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise unless ``value`` is an integer (not a bool) of at least ``minimum``; the message names ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        msg = f"{name} must be an integer >= {minimum}, got {value!r}; pass a whole number such as {max(minimum, 1)}."
        raise TypeError(msg)
    if value < minimum:
        msg = f"{name} must be >= {minimum}, got {value}."
        raise ValueError(msg)


def check_candidate_factor(name: str, value: int) -> None:
    """Raise unless ``value`` (an integer >= 0, already checked) is a usable SpecPC ``rescore_factor`` or
    ``recompute_factor``: 0 or >= 2."""
    if value == 1:
        msg = (f"{name} must be 0 (off) or at least 2 (candidates at that multiple of the budget, read again by the "
               "draft), got 1: candidates of the budget itself leave nothing to choose.")
        raise ValueError(msg)


def check_text(name: str, text: str) -> str:
    """``text`` itself, or a ValueError naming ``name`` when it holds a lone surrogate (not valid Unicode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        msg = (
            f"{name} holds a lone surrogate {text[error.start]!r} at index {error.start}, which no tokenizer "
            "can encode; clean the text first, e.g. text.encode('utf-8', 'replace').decode('utf-8')."
        )
        raise ValueError(msg) from None
    return text

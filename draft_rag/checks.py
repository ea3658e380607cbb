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


def check_candidate_factors(rescore_factor: int, recompute_factor: int, *, owner: str = "", how: str = "") -> None:
    """Raise unless SpecPC's ``rescore_factor`` and ``recompute_factor`` (integers >= 0, already checked) can be used
    together: each 0 or >= 2, and at most one of them set. ``owner`` starts each name in the messages (``"SpecPC "``);
    ``how`` says where they are set (e.g. the command-line options), after "set one of them"."""
    for name, value in (("rescore_factor", rescore_factor), ("recompute_factor", recompute_factor)):
        if value == 1:
            msg = (f"{owner}{name} must be 0 (off) or at least 2 (candidates at that multiple of the budget, read "
                   "again by the draft), got 1: candidates of the budget itself leave nothing to choose.")
            raise ValueError(msg)
    if rescore_factor and recompute_factor:
        msg = (f"{owner}rescore_factor={rescore_factor} and recompute_factor={recompute_factor} are two ways to read "
               f"the candidates again; set one of them{how} and leave the other 0.")
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

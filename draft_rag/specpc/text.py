"""Kept token spans as text: widened to word edges, merged, and joined by an elision marker.

Pure Python (no torch): the character spans come from the draft prompt's offsets
(:mod:`draft_rag.specpc.prompt`); this module only decides where each kept span starts and ends and how the
spans read as one text.
"""

from __future__ import annotations

import unicodedata

ELISION_MARKER = " … "
"""Stands between kept spans, and at either end of a document where text was cut."""

SNAP_REACH = 16
"""Most characters a kept span is widened by, at each end, to reach the edge of its word."""

# Scripts written without spaces between words (by Unicode character-name prefix): there a whitespace
# "word" can be a whole paragraph, so spans keep their token boundaries.
_UNSPACED_SCRIPTS = (
    "CJK", "IDEOGRAPHIC", "FULLWIDTH", "HIRAGANA", "KATAKANA", "HALFWIDTH KATAKANA", "BOPOMOFO",
    "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN",
)


def snap_spans(
    source: str, token_spans: list[tuple[int, int]], reach: int = SNAP_REACH
) -> list[tuple[int, int]]:
    """Merge token character spans, widening each end to the edge of its word when that edge is near.

    A word is a run of characters that are neither whitespace nor of a script written without spaces
    (Chinese, Japanese, Thai...). An end moves at most ``reach`` characters to reach its word edge, else
    it stays on the token boundary, so a URL, base64 or a paragraph of Chinese never pulls in more than
    a few characters. Combining marks stay with their base character. Spans that touch, overlap or are
    separated only by whitespace become one; leading and trailing whitespace is trimmed from each span.
    """
    snapped: list[tuple[int, int]] = []
    for run_start, run_end in _runs(token_spans):
        start = _word_start(source, run_start, reach)
        end = _word_end(source, run_end, reach)
        while start < end and source[start].isspace():
            start += 1
        while end > start and source[end - 1].isspace():
            end -= 1
        if start == end:
            continue
        if snapped and not source[snapped[-1][1] : start].strip():
            snapped[-1] = (snapped[-1][0], max(end, snapped[-1][1]))
        else:
            snapped.append((start, end))
    return snapped


def _runs(token_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token spans that touch or overlap, merged into runs.

    Snapping widens only the ends of a run: a token inside it snaps to edges no farther out than the run's own
    (its word's edge is the same or lies within the run, and is farther away from it), so each kept run is
    snapped once instead of each of its tokens.
    """
    runs: list[tuple[int, int]] = []
    for start, end in sorted(token_spans):
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(end, runs[-1][1]))
        else:
            runs.append((start, end))
    return runs


def _in_word(char: str) -> bool:
    """True for a character of a space-delimited word: not whitespace, not of a script without spaces."""
    return not char.isspace() and not unicodedata.name(char, "").startswith(_UNSPACED_SCRIPTS)


def _is_mark(char: str) -> bool:
    return unicodedata.category(char).startswith("M")


def _word_start(source: str, start: int, reach: int) -> int:
    """``start`` moved left to its word's first character if that is at most ``reach`` away."""
    while 0 < start < len(source) and _is_mark(source[start]):
        start -= 1
    if start >= len(source) or not _in_word(source[start]):
        return start
    edge = start
    while edge > 0 and _in_word(source[edge - 1]):
        if start - edge == reach:
            return start
        edge -= 1
    return edge


def _word_end(source: str, end: int, reach: int) -> int:
    """``end`` moved right past its word's last character if that is at most ``reach`` away."""
    while end < len(source) and _is_mark(source[end]):
        end += 1
    if end == 0 or not _in_word(source[end - 1]):
        return end
    edge = end
    while edge < len(source) and _in_word(source[edge]):
        if edge - end == reach:
            return end
        edge += 1
    return edge


def join_spans(source: str, spans: list[tuple[int, int]], marker: str) -> str:
    """The text of ``spans``, joined by ``marker``; a trimmed marker also stands where either end was cut."""
    if not spans:
        return ""
    if spans == [(0, len(source))]:
        return source
    text = marker.join(source[s:e] for s, e in spans)
    if source[: spans[0][0]].strip():
        text = marker.lstrip() + text
    if source[spans[-1][1] :].strip():
        text = text + marker.rstrip()
    return text


def span_starts(source: str, spans: list[tuple[int, int]], marker: str) -> list[int]:
    """Where each of ``spans`` starts in ``join_spans(source, spans, marker)``."""
    if not spans or spans == [(0, len(source))]:
        return [0] * len(spans)
    at = len(marker.lstrip()) if source[: spans[0][0]].strip() else 0
    starts = []
    for start, end in spans:
        starts.append(at)
        at += end - start + len(marker)
    return starts

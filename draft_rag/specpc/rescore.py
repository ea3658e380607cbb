"""Rescoring: a second, exact draft pass over the candidates of the first, its scores moved back onto the documents.

Read apart (SpecPC's default ``reading``, and always over a draft cache), the documents were encoded apart, so
the first pass scores each one without the others as context. With
:attr:`~draft_rag.specpc.SpecPC.rescore_factor` ``k``, SpecPC keeps ``k x budget`` tokens of candidates from that
pass, lets the draft read the candidates' text and the question once more, in one joint prefill where they see
each other, and selects the budget among the candidates from that reading.
This module holds the two steps around that pass: the candidates as text with a map back to their sources
(:func:`candidate_texts`), and the second pass's scores moved onto the tokens of the first prompt
(:func:`transfer_scores`). torch is imported where it is used.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from draft_rag.specpc.text import span_starts

if TYPE_CHECKING:
    import torch

    from draft_rag.specpc import CompressedDocument
    from draft_rag.specpc.prompt import _DraftPrompt


@dataclass(frozen=True)
class Candidate:
    """One document's candidates as the second pass reads them.

    Attributes:
        text: the kept spans joined by the elision marker (what a target would read).
        pieces: ``(start in text, start in source, length)`` of each kept span.
    """

    text: str
    pieces: list[tuple[int, int, int]]


def candidate_texts(sources: Sequence[str], kept: Sequence[CompressedDocument], marker: str) -> list[Candidate]:
    """Each source document's kept spans (``kept``, one per source, in order, their text joined by ``marker``)
    as text, with where each span is."""
    candidates = []
    for source, document in zip(sources, kept):
        starts = span_starts(source, document.spans, marker)
        pieces = [(at, start, end - start) for at, (start, end) in zip(starts, document.spans)]
        candidates.append(Candidate(document.text, pieces))
    return candidates


def transfer_scores(
    prompt: _DraftPrompt,
    candidate_prompt: _DraftPrompt,
    candidate_scores: torch.Tensor,
    candidates: Sequence[Candidate],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[n]`` over ``prompt``'s positions from the second pass over ``candidate_prompt``, and which
    positions were candidates (bool ``[n]``).

    A document token of ``prompt`` whose characters the candidates hold gets the highest score of the
    candidate tokens over them; every other position scores 0 and is no candidate. ``candidate_prompt`` was
    built from ``candidates``' texts, in order.
    """
    import torch

    values = candidate_scores.float().cpu().tolist()
    result = torch.zeros(len(prompt.input_ids), dtype=torch.float32)
    within = torch.zeros(len(prompt.input_ids), dtype=torch.bool)
    token_starts = iter(prompt.starts)
    candidate_starts = iter(candidate_prompt.starts)
    for offsets, candidate, candidate_offsets in zip(prompt.offsets, candidates, candidate_prompt.offsets):
        if offsets is None:  # blank source: not in either prompt
            continue
        first = next(token_starts)
        if candidate_offsets is None:  # nothing of it was a candidate
            continue
        candidate_first = next(candidate_starts)
        best: dict[int, float] = {}  # source character -> best score of a candidate token covering it
        piece_starts = [at for at, _, _ in candidate.pieces]
        for index, (start, end) in enumerate(candidate_offsets):
            score = values[candidate_first + index]
            piece = max(bisect.bisect_right(piece_starts, start) - 1, 0)  # the pieces under the token, in order
            for at, source_start, length in candidate.pieces[piece:]:
                if at >= end:
                    break
                for char in range(max(start, at), min(end, at + length)):
                    source_char = source_start + char - at
                    best[source_char] = max(best.get(source_char, 0.0), score)
        for index, (start, end) in enumerate(offsets):
            covered = [best[char] for char in range(start, end) if char in best]
            if covered:
                result[first + index] = max(covered)
                within[first + index] = True
    return result, within

"""Token selection: draft scores pooled per document, the best tokens with their neighbourhoods, fit to the budget.

torch is imported where it is used, so that importing :mod:`draft_rag.specpc` does not load it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from draft_rag.scoring import Pool
    from draft_rag.specpc import CompressedDocument
    from draft_rag.specpc.prompt import _DraftPrompt


def pool_context(
    prompt: _DraftPrompt,
    scores: torch.Tensor,
    kernel_size: int,
    pool: Pool,
    document_boundaries: bool,
    within: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
    """The pooled score of every document token of ``prompt``, document after document, and the documents'
    ``(start, end)`` among them when ``document_boundaries`` keeps pooling (and neighbourhoods) within each
    document (None otherwise: pooled over the whole prompt).

    ``within`` (a bool per prompt position) limits the selection to the positions it marks: pooling and
    neighbourhoods stop at the edges of each run of them too, and the other positions score ``-inf``.
    """
    from draft_rag.scoring import pool_scores

    segments = prompt.context_segments() if document_boundaries else None
    if segments is None and within is None:
        return pool_scores(scores, kernel_size, pool)[prompt.context_positions()], None
    import torch

    positions = prompt.context_positions()
    context = scores[positions]
    if segments is None:
        segments = [(0, context.shape[0])]
    if within is not None:
        inside = within[positions]
        segments = split_runs(segments, inside.tolist())
    context_scores = torch.cat([pool_scores(context[a:b], kernel_size, pool) for a, b in segments])
    if within is not None:
        context_scores = context_scores.masked_fill(~inside.to(context_scores.device), float("-inf"))
    return context_scores, segments


def split_runs(segments: list[tuple[int, int]], marks: list[bool]) -> list[tuple[int, int]]:
    """``segments`` (``(start, end)`` ranges that tile the positions) cut wherever ``marks`` changes value."""
    runs = []
    for start, end in segments:
        for position in range(start + 1, end):
            if marks[position] != marks[position - 1]:
                runs.append((start, position))
                start = position
        if start < end:
            runs.append((start, end))
    return runs


def selection_order(
    scores: torch.Tensor, limit: int, neighbor_tokens: int, segments: list[tuple[int, int]] | None = None
) -> list[int]:
    """The first ``limit`` positions in the order the selection keeps them: top scores, each with its centred
    neighbourhood; sorted, the first ``budget`` of them are the selection for ``budget``.

    Positions are visited by descending score (ties: earlier first); each visit adds the not-yet-kept
    positions of ``[p - neighbor_tokens // 2, p - neighbor_tokens // 2 + neighbor_tokens)``, nearest to
    ``p`` first (ties: the earlier one). With ``segments`` (``(start, end)`` ranges that tile the positions,
    e.g. documents), a neighbourhood is clipped to the segment holding ``p``. Keeping only adds positions as
    the budget grows, so every budget's selection is a prefix of this one order: budgets tried one after
    another cost one walk. Plain Python over the scores' list: faster than small tensor
    operations per position.
    """
    import torch

    m = scores.shape[0]
    limit = min(limit, m)
    if limit <= 0:
        return []
    order = torch.argsort(scores.float().cpu(), descending=True, stable=True).tolist()
    if neighbor_tokens <= 1:
        return order[:limit]
    segment_of = [(0, m)] * m
    for start, end in segments or []:
        segment_of[start:end] = [(start, end)] * (end - start)
    half = neighbor_tokens // 2
    kept = [False] * m
    picked: list[int] = []
    for center in order:
        first, last = segment_of[center]
        window = range(max(center - half, first), min(center - half + neighbor_tokens, last))
        for position in sorted((p for p in window if not kept[p]), key=lambda p: (abs(p - center), p)):
            kept[position] = True
            picked.append(position)
        if len(picked) >= limit:
            break
    return picked[:limit]


def candidate_positions(
    prompt: _DraftPrompt,
    scores: torch.Tensor,
    limit: int,
    kernel_size: int,
    pool: Pool,
    neighbor_tokens: int,
    document_boundaries: bool,
) -> list[int]:
    """The prompt positions, increasing, of the first ``limit`` document tokens that the selection keeps from
    ``scores`` (pooled and with neighbourhoods as SpecPC's settings say): the candidates a second reading
    chooses among."""
    context_scores, segments = pool_context(prompt, scores, kernel_size, pool, document_boundaries)
    order = selection_order(context_scores, limit, neighbor_tokens, segments)
    return sorted(prompt.context_positions()[order].tolist())


def fit_to_budget(
    build: Callable[[int], list[CompressedDocument]], budget: int
) -> list[CompressedDocument]:
    """The documents ``build(n)`` makes for the largest ``n <= budget`` whose kept tokens fit ``budget``.

    ``build(n)`` keeps about ``n`` tokens, but its text can count more: elision markers, word snapping and
    a different counting tokenizer all add tokens. ``n = budget`` is tried first (it usually fits), then a
    search between the largest ``n`` known to fit (0 at first) and the smallest known not to, each try
    re-tokenising only the kept text. Tries alternate between a guess in proportion (the ``n`` at which the
    last try's tokens per kept token would meet the budget; usually within a token or two) and the midpoint,
    so at most about ``2 * log2(budget)`` rebuilds, assuming that keeping more never yields fewer tokens.
    ``build(0)`` must keep nothing.
    """
    fits, too_many = 0, budget + 1
    best: list[CompressedDocument] | None = None
    n = budget
    guess = True
    while too_many - fits > 1:
        documents = build(n)
        tokens = sum(d.kept_tokens for d in documents)
        if tokens <= budget:
            fits, best = n, documents
        else:
            too_many = n
        if guess and tokens:
            n = min(max(n * budget // tokens, fits + 1), too_many - 1)
        else:
            n = (fits + too_many) // 2
        guess = not guess
    return best if best is not None else build(0)

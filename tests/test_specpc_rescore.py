"""SpecPC's rescoring (``rescore_factor``): candidates from the first draft pass, read again without the cache."""

from __future__ import annotations

import re

import pytest

from draft_rag import DraftCache, SpecPC
from draft_rag.specpc import CompressedDocument
from draft_rag.specpc.prompt import _DraftPrompt
from draft_rag.specpc.rescore import candidate_texts, transfer_scores
from draft_rag.specpc.selection import split_runs
from draft_rag.specpc.text import join_spans, span_starts
from tests.test_specpc import count, make
from tests.tiny import tiny_tokenizer

QUERY = "What is the special magic number for the word apple?"
DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "A special magic number is hidden in the text: 4815162. " * 3,
    "   ",
    "Retrieval augmented generation reads long documents, and a small draft model decides. " * 4,
]


def decoder_tokens(loaded):
    """Tokens each forward call of the draft's decoder reads (every pass runs the decoder)."""
    calls: list[int] = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(ids.shape[-1])

    return calls, loaded.model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("marker", [" … ", "", " [...] "])
def test_span_starts_say_where_each_span_is_in_the_joined_text(marker):
    source = "alpha beta gamma delta epsilon zeta"
    for spans in ([(6, 10)], [(0, 5), (23, 30)], [(6, 10), (17, 22), (31, 35)], [(0, len(source))], []):
        text = join_spans(source, spans, marker)
        starts = span_starts(source, spans, marker)
        assert len(starts) == len(spans)
        assert [text[at : at + end - start] for at, (start, end) in zip(starts, spans)] == \
            [source[start:end] for start, end in spans]


def test_scores_move_from_the_candidates_onto_the_tokens_they_came_from():
    tokenizer = tiny_tokenizer()
    sources = ["alpha beta gamma delta epsilon zeta", "   ", "one two three four five six seven"]
    spans = [[(6, 10), (23, 30)], [], [(0, 3), (14, 18)]]
    kept = [CompressedDocument(join_spans(s, sp, " … "), sp, 0, 0) for s, sp in zip(sources, spans)]
    candidates = candidate_texts(sources, kept, " … ")
    prompt = _DraftPrompt(tokenizer, "Which word?", sources)
    candidate_prompt = _DraftPrompt(tokenizer, "Which word?", [c.text for c in candidates])
    import torch

    # Every candidate token scores its own position + 1, so each source token can be traced to where it was read.
    candidate_scores = torch.arange(len(candidate_prompt.input_ids), dtype=torch.float32) + 1
    moved, within = transfer_scores(prompt, candidate_prompt, candidate_scores, candidates)
    assert moved.shape == within.shape == (len(prompt.input_ids),)
    assert within.tolist() == (moved > 0).tolist()  # every candidate token scored here is >= 1
    starts = iter(prompt.starts)
    candidate_starts = iter(candidate_prompt.starts)
    for source, offsets, candidate, candidate_offsets in zip(sources, prompt.offsets, candidates,
                                                             candidate_prompt.offsets):
        if offsets is None:
            continue
        first, candidate_first = next(starts), next(candidate_starts)
        for index, (start, end) in enumerate(offsets):
            expected = 0.0
            for at, source_start, length in candidate.pieces:
                for j, (c_start, c_end) in enumerate(candidate_offsets):
                    # the candidate token's characters that are this source token's characters
                    lo, hi = max(c_start, at, start - source_start + at), min(c_end, at + length,
                                                                               end - source_start + at)
                    if lo < hi:
                        expected = max(expected, float(candidate_first + j + 1))
            assert float(moved[first + index]) == expected, (source[start:end], index)
    documents = zip(prompt.starts, [o for o in prompt.offsets if o])
    inside = {first + i for first, offsets in documents for i in range(len(offsets))}
    outside = set(range(len(prompt.input_ids))) - inside
    assert all(float(moved[p]) == 0.0 for p in outside)
    # Candidate words score, the words left out do not.
    first = prompt.starts[0]
    by_word = {}
    for word in re.finditer(r"\S+", sources[0]):
        overlapping = [float(moved[first + i]) for i, (start, end) in enumerate(prompt.offsets[0])
                       if start < word.end() and end > word.start()]
        by_word[word.group()] = max(overlapping)
    assert by_word["beta"] > 0 and by_word["epsilon"] > 0
    assert by_word["alpha"] == by_word["gamma"] == by_word["delta"] == by_word["zeta"] == 0


@pytest.mark.parametrize("observe_from", ["window", "question"])
def test_candidates_that_are_the_whole_context_select_what_the_joint_reading_selects(draft, observe_from):
    """Over a draft cache, a second pass that reads every token is the joint pass: same scores, same text.

    (Documents without whitespace at their ends: kept spans are trimmed, so the candidates' text would lack it.)
    """
    docs = [doc.strip() for doc in DOCS]
    total = sum(count(d) for d in docs)
    for budget in (12, 24):
        factor = -(-total // budget)  # candidates at factor x budget >= the context: every token
        plain = make(draft, budget=budget, observe_from=observe_from, reading="joint").compress(QUERY, docs)
        rescored = make(draft, budget=budget, cache=DraftCache(), rescore_factor=factor,
                        observe_from=observe_from).compress(QUERY, docs)
        assert rescored.texts == plain.texts
        assert [d.spans for d in rescored.documents] == [d.spans for d in plain.documents]


def test_reading_jointly_with_every_token_a_candidate_the_draft_runs_once(draft):
    total = sum(count(d) for d in DOCS)
    calls, handle = decoder_tokens(draft)
    try:
        rescored = make(draft, budget=24, rescore_factor=-(-total // 24), reading="joint").compress(QUERY, DOCS)
    finally:
        handle.remove()
    assert sum(calls) == len(_DraftPrompt(draft.tokenizer, QUERY, DOCS).input_ids)  # one prefill, no second
    assert rescored.texts == make(draft, budget=24, reading="joint").compress(QUERY, DOCS).texts
    # Read apart, the candidates' joint reading is a second one, even when every token is a candidate.
    apart = make(draft, budget=24, rescore_factor=-(-total // 24)).compress(QUERY, DOCS)
    assert apart.texts != make(draft, budget=24).compress(QUERY, DOCS).texts


@pytest.mark.parametrize("cached", [False, True])
def test_the_second_pass_reads_the_candidates_and_the_question_once_without_the_cache(draft, cached):
    pc = make(draft, budget=12, rescore_factor=2, cache=DraftCache() if cached else None)
    if cached:
        pc.warm(DOCS)
    context = pc.score(QUERY, DOCS)
    candidates = make(draft, budget=24, cache=pc.cache).select(context)
    calls, handle = decoder_tokens(draft)
    try:
        result = pc.select(context)
    finally:
        handle.remove()
    candidate_prompt = _DraftPrompt(draft.tokenizer, QUERY, candidates.texts)
    assert sum(calls) == len(candidate_prompt.input_ids)  # one uncached prefill of the candidates' prompt
    assert result.total_kept_tokens <= 12
    assert sum(count(d.text) for d in result.documents) == result.total_kept_tokens
    for source, document, candidate in zip(DOCS, result.documents, candidates.documents):
        assert all(source[start:end].strip() for start, end in document.spans)
        # the second selection keeps only candidates
        assert all(any(a <= start and end <= b for a, b in candidate.spans) for start, end in document.spans)
    assert result.documents[2].blank


def test_split_runs_cuts_segments_where_the_marks_change():
    marks = [True, True, False, False, True, False, True, True]
    assert split_runs([(0, 8)], marks) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 8)]
    assert split_runs([(0, 3), (3, 8)], marks) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 8)]
    assert split_runs([(0, 8)], [True] * 8) == [(0, 8)]


def test_rescoring_is_a_selection_setting_and_is_checked(draft):
    from draft_rag.specpc import SELECTION_SETTINGS

    assert make(draft).settings()["rescore_factor"] == 0
    assert make(draft, rescore_factor=3).settings()["rescore_factor"] == 3
    assert "rescore_factor" in SELECTION_SETTINGS  # the first pass does not depend on it: it can be shared
    with pytest.raises(ValueError, match="rescore_factor must be 0 .* or at least 2"):
        SpecPC(rescore_factor=1)
    with pytest.raises(ValueError, match="rescore_factor must be >= 0"):
        SpecPC(rescore_factor=-2)
    with pytest.raises(TypeError, match="rescore_factor must be an integer"):
        SpecPC(rescore_factor=2.5)
    # A budget that holds the whole context keeps it unchanged, without a second pass.
    total = sum(count(d) for d in DOCS)
    assert make(draft, budget=total, rescore_factor=2, cache=DraftCache()).compress(QUERY, DOCS).texts == DOCS

"""SpecPC's in-context recompute (``recompute_factor``): candidates' draft K/V computed again over the cache."""

from __future__ import annotations

import pytest
import torch

from draft_rag import DraftCache, SpecPC
from draft_rag.draft_cache.recompute import recompute_in_context
from draft_rag.hf import cache_tensors
from draft_rag.scoring import extend_cache
from draft_rag.specpc.prompt import _DraftPrompt
from draft_rag.specpc.selection import candidate_positions
from tests.test_specpc import count, make

QUERY = "What is the special magic number for the word apple?"
DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "A special magic number is hidden in the text: 4815162. " * 3,
    "Retrieval augmented generation reads long documents, and a small draft model decides. " * 3,
]


def laid_out(draft, cache, prompt):
    prefix_ids, chunks = prompt.cache_chunks()
    return cache.context(draft, prefix_ids, chunks, prompt.question_start)


def copies(past):
    return [(k.clone(), v.clone()) for k, v in cache_tensors(past)]


def test_recomputing_every_document_token_gives_the_joint_prefill(draft):
    prompt = _DraftPrompt(draft.tokenizer, QUERY, DOCS)
    length = prompt.question_start
    cache = DraftCache()
    separate = copies(laid_out(draft, cache, prompt))
    blended = recompute_in_context(draft.model, laid_out(draft, cache, prompt), prompt.input_ids,
                                   list(range(prompt.starts[0], length)))
    with torch.no_grad():
        joint = extend_cache(draft.model, torch.tensor([prompt.input_ids[:length]]), None, chunk_size=2048)
    for (k, v), (jk, jv) in zip(cache_tensors(blended), cache_tensors(joint), strict=True):
        assert k.shape == jk.shape
        torch.testing.assert_close(k, jk, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, jv, atol=1e-4, rtol=1e-4)
    # The documents after the first, encoded apart, differ from the joint prefill: the check above can fail.
    later = slice(prompt.starts[1], length)
    assert any(not torch.allclose(sk[:, :, later], jk[:, :, later], atol=1e-3)
               for (sk, _), (jk, _) in zip(separate, cache_tensors(joint), strict=True))


def test_only_the_recomputed_positions_change(draft):
    prompt = _DraftPrompt(draft.tokenizer, QUERY, DOCS)
    cache = DraftCache()
    before = copies(laid_out(draft, cache, prompt))
    positions = sorted([prompt.starts[1] + 3, *range(prompt.starts[2], prompt.starts[2] + 6)])
    blended = recompute_in_context(draft.model, laid_out(draft, cache, prompt), prompt.input_ids, positions)
    others = torch.ones(prompt.question_start, dtype=torch.bool)
    others[positions] = False
    changed = False
    for (k, v), (bk, bv) in zip(cache_tensors(blended), before, strict=True):
        assert torch.equal(k[:, :, others], bk[:, :, others]) and torch.equal(v[:, :, others], bv[:, :, others])
        changed |= not torch.allclose(k[:, :, positions], bk[:, :, positions], atol=1e-3)
    assert changed


def test_positions_outside_the_cache_or_out_of_order_are_refused(draft):
    prompt = _DraftPrompt(draft.tokenizer, QUERY, DOCS)
    cache = DraftCache()
    length = prompt.question_start
    for positions in ([length], [5, 4], [3, 3], [-1]):
        with pytest.raises(ValueError, match=r"positions must increase and lie in \[0, "):
            recompute_in_context(draft.model, laid_out(draft, cache, prompt), prompt.input_ids, positions)


@pytest.mark.parametrize("observe_from", ["window", "question"])
def test_the_selection_lies_among_the_candidates_and_fits_the_budget(draft, observe_from):
    budget = 20
    pc = make(draft, budget=budget, cache=DraftCache(), recompute_factor=2, observe_from=observe_from)
    context = pc.score(QUERY, DOCS)
    prompt = context.prompt
    candidates = set(candidate_positions(prompt, context.scores, 2 * budget, pc.kernel_size, pc.pool,
                                         pc.neighbor_tokens, pc.document_boundaries))
    assert len(candidates) == 2 * budget
    result = pc.select(context)
    assert 0 < result.total_kept_tokens <= budget
    assert sum(count(d.text) for d in result.documents) <= budget
    # Every kept character lies in a candidate token's span.
    candidate_chars = {(index, c) for index, start in enumerate(prompt.starts)
                       for local, (a, b) in enumerate(prompt.offsets[index]) if start + local in candidates
                       for c in range(a, b)}
    kept = {(index, c) for index, d in enumerate(result.documents) for a, b in d.spans for c in range(a, b)
            if not DOCS[index][c].isspace()}
    assert kept and kept <= candidate_chars
    # The second reading is over other K/V than the first: the candidates' scores change.
    again, _ = pc._score_context(draft, prompt, context.cache, recompute=sorted(candidates))
    assert not torch.allclose(again, context.scores)


def test_the_recompute_runs_the_candidates_once_then_the_observers(draft):
    budget = 16
    pc = make(draft, budget=budget, cache=DraftCache(), recompute_factor=3)
    pc.warm(DOCS)
    calls: list[int] = []
    handle = draft.model.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True)
    try:
        pc.compress(QUERY, DOCS)
    finally:
        handle.remove()
    # The cache covers the documents; the question and the template's end run through the draft each time.
    prompt = _DraftPrompt(draft.tokenizer, QUERY, DOCS)
    tail = len(prompt.input_ids) - prompt.question_start
    first, candidates, second = calls
    assert first == second == tail and 0 < candidates <= 3 * budget


def test_reading_jointly_it_changes_nothing(draft):
    for budget in (12, 24):
        assert make(draft, budget=budget, recompute_factor=2, reading="joint").compress(QUERY, DOCS).texts == \
            make(draft, budget=budget, reading="joint").compress(QUERY, DOCS).texts


def test_reading_apart_without_a_cache_it_recomputes_as_over_one(draft):
    """The call's own cache serves the second pass as a DraftCache would; the check can fail: it changes the text."""
    for budget in (12, 24):
        apart = make(draft, budget=budget, recompute_factor=2).compress(QUERY, DOCS).texts
        assert apart == make(draft, budget=budget, recompute_factor=2, cache=DraftCache()).compress(QUERY, DOCS).texts
    assert apart != make(draft, budget=24).compress(QUERY, DOCS).texts


def test_recompute_factor_is_checked():
    with pytest.raises(ValueError, match="recompute_factor must be 0 .off. or at least 2"):
        SpecPC(recompute_factor=1)
    with pytest.raises(ValueError, match="recompute_factor must be >= 0, got -1"):
        SpecPC(recompute_factor=-1)
    with pytest.raises(TypeError, match="recompute_factor must be an integer"):
        SpecPC(recompute_factor=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="set one of them and leave the other 0"):
        SpecPC(recompute_factor=2, rescore_factor=2)
    assert SpecPC(recompute_factor=3).settings()["recompute_factor"] == 3


def test_the_budget_is_picked_among_the_candidates_only(draft, monkeypatch):
    """Candidates forced onto the first document (the one the question least needs): only its text is kept."""
    import draft_rag.specpc as specpc_module

    def first_document(prompt, scores, limit, *args):
        return list(range(prompt.starts[0], prompt.starts[0] + limit))

    monkeypatch.setattr(specpc_module, "candidate_positions", first_document)
    result = make(draft, budget=12, cache=DraftCache(), recompute_factor=2).compress(QUERY, DOCS)
    assert result.documents[0].kept_tokens > 0
    assert [d.text for d in result.documents[1:]] == ["", ""]

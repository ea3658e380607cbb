"""SpecPC invariants on a tiny random draft model."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from draft_rag import DraftCache, LoadedModel, SpecPC
from draft_rag.bench.tiny import CHATML
from draft_rag.specpc.prompt import TEMPLATE_DATE, _template_parts
from draft_rag.specpc.selection import selection_order
from draft_rag.specpc.text import join_spans, snap_spans
from tests.tiny import tiny_model, tiny_tokenizer

QUERY = "What is the special magic number for the word apple?"
DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "A special magic number is hidden in the text: 4815162. " * 3,
    "Retrieval augmented generation reads long documents, and a small draft model decides. " * 4,
]


def make(draft, **kwargs):
    defaults = dict(budget=48, window_size=8, kernel_size=5, neighbor_tokens=6, starting_layer_index=1)
    defaults.update(kwargs)
    return SpecPC(draft=draft, **defaults)


def count(text: str) -> int:
    return len(tiny_tokenizer()(text, add_special_tokens=False)["input_ids"])


def test_budget_at_least_context_returns_documents_unchanged(draft):
    total = sum(count(d) for d in DOCS)
    for budget in (total, total + 100):
        result = make(draft, budget=budget).compress(QUERY, DOCS)
        assert result.texts == DOCS
        assert [d.spans for d in result.documents] == [[(0, len(d))] for d in DOCS]
        assert result.total_kept_tokens == result.total_original_tokens == total
        assert not any(d.compressed for d in result.documents)


@pytest.mark.parametrize("budget", [12, 20, 48, 90])
@pytest.mark.parametrize("lookahead", [1, 4])
def test_output_never_exceeds_budget(draft, budget, lookahead):
    result = make(draft, budget=budget, lookahead_tokens=lookahead).compress(QUERY, DOCS)
    assert len(result.documents) == len(DOCS)
    assert result.total_kept_tokens <= budget
    assert sum(count(d.text) for d in result.documents) == result.total_kept_tokens
    assert result.total_kept_tokens >= budget // 2  # the budget is used, not wasted


@pytest.mark.parametrize("kwargs", [{}, {"pool": "avg", "reduction": "mean"}, {"weighted_query": False},
                                    {"neighbor_tokens": 1}, {"observer_reduction": "mean"}])
def test_kept_spans_map_exactly_to_source_text(draft, kwargs):
    result = make(draft, **kwargs).compress(QUERY, DOCS)
    marker = " … "
    for source, doc in zip(DOCS, result.documents):
        pieces = [source[s:e] for s, e in doc.spans]
        assert all(piece and piece == piece.strip() for piece in pieces)
        assert all(a[1] < b[0] for a, b in zip(doc.spans, doc.spans[1:]))  # sorted, disjoint
        assert doc.text.strip("… ") == marker.join(pieces).strip("… ") or not pieces
        for s, e in doc.spans:  # no word cut in half
            assert s == 0 or source[s - 1].isspace()
            assert e == len(source) or source[e].isspace()


def test_query_and_document_order_and_count_preserved(draft):
    docs = DOCS + ["   ", ""]
    result = make(draft).compress(QUERY, docs)
    assert result.query == QUERY
    assert len(result.documents) == len(docs)
    assert result.documents[3].text == "" and result.documents[4].text == ""  # cut: whitespace keeps nothing
    for source, doc in zip(docs, result.documents):
        assert doc.original_tokens == count(source)
        assert doc.blank == (not source.strip())
        assert doc.dropped == (not doc.blank and doc.original_tokens > 0 and not doc.spans)


def test_deterministic(draft):
    a = make(draft).compress(QUERY, DOCS)
    b = make(draft).compress(QUERY, DOCS)
    assert a.documents == b.documents


def test_empty_document_list_returns_empty_result(draft):
    result = make(draft).compress(QUERY, [])
    assert result.documents == [] and result.total_kept_tokens == 0


def test_target_tokenizer_counts_the_budget():
    """With a different target tokenizer the budget is counted in its tokens."""
    from transformers import AutoTokenizer  # noqa: F401  (the tokenizer object is passed directly)

    draft = tiny_model("qwen2", seed=7)
    target_tok = tiny_tokenizer()
    result = make(draft, budget=30, target_tokenizer=target_tok).compress(QUERY, DOCS)
    assert sum(len(target_tok(d.text, add_special_tokens=False)["input_ids"]) for d in result.documents) <= 30


@pytest.mark.parametrize(
    ("query", "documents", "error", "match"),
    [
        ("", DOCS, ValueError, "query"),
        ("   ", DOCS, ValueError, "query"),
        (None, DOCS, TypeError, "query"),
        (QUERY, "a single string", TypeError, "documents"),
        (QUERY, ["ok", 3], TypeError, r"documents\[1\]"),
        (QUERY, None, TypeError, "documents"),
    ],
)
def test_bad_input_gives_clear_errors(draft, query, documents, error, match):
    with pytest.raises(error, match=match):
        make(draft).compress(query, documents)


POSITIVE = ["budget", "window_size", "kernel_size", "neighbor_tokens", "chunk_size"]
NON_NEGATIVE = ["lookahead_tokens", "starting_layer_index"]


@pytest.mark.parametrize("name", POSITIVE)
@pytest.mark.parametrize("value", [0, -3])
def test_bad_config_gives_clear_errors(name, value):
    with pytest.raises(ValueError, match=name):
        SpecPC(**{name: value})


@pytest.mark.parametrize("name", NON_NEGATIVE)
def test_negative_counts_are_rejected(name):
    with pytest.raises(ValueError, match=f"{name} must be >= 0, got -1"):
        SpecPC(**{name: -1})


@pytest.mark.parametrize("name", POSITIVE + NON_NEGATIVE)
@pytest.mark.parametrize("value", [2.5, 8.0, True, "8", None])
def test_non_integer_config_is_a_type_error(name, value):
    with pytest.raises(TypeError, match=f"{name} must be an integer"):
        SpecPC(**{name: value})


def test_integer_like_config_is_stored_as_int():
    pc = SpecPC(budget=np.int64(256), starting_layer_index=np.int32(0))
    assert (pc.budget, pc.starting_layer_index) == (256, 0)
    assert type(pc.budget) is int and type(pc.starting_layer_index) is int


def test_bad_choice_config():
    with pytest.raises(ValueError, match="pool"):
        SpecPC(pool="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        SpecPC(reduction="sum")  # type: ignore[arg-type]


def test_document_longer_than_draft_context_is_rejected():
    draft = tiny_model("qwen2", seed=7, max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"maximum context of 64.*documents\[1\]"):
        make(draft, budget=10).compress(QUERY, ["short text here.", "The quick brown fox jumps. " * 30])


def test_sliding_window_draft_shorter_than_the_prompt_is_rejected_before_scoring():
    draft = tiny_model("qwen2", seed=7, use_sliding_window=True, sliding_window=32, max_window_layers=0)
    with pytest.raises(NotImplementedError, match="window of 32"):
        make(draft, budget=10).compress(QUERY, DOCS)
    assert make(draft, budget=10).compress(QUERY, ["fits."]).texts == ["fits."]  # no draft run needed


def test_draft_forward_takes_turns_on_the_model_lock(draft):
    results = []
    worker = threading.Thread(target=lambda: results.append(make(draft).compress(QUERY, DOCS)), daemon=True)
    with draft.lock:
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not results  # waiting for the lock held here
    worker.join(timeout=60)
    assert results[0].documents == make(draft).compress(QUERY, DOCS).documents


def test_constructing_loads_nothing():
    pc = SpecPC(draft="no/such-model-anywhere")
    assert pc.draft == "no/such-model-anywhere"


def test_loading_keeps_the_fields_as_given(draft, tmp_path):
    draft.model.save_pretrained(tmp_path)
    draft.tokenizer.save_pretrained(tmp_path)
    pc = make(str(tmp_path), target_tokenizer=str(tmp_path))
    loaded = pc.load()
    assert loaded.model.config.hidden_size == draft.model.config.hidden_size
    assert pc.draft == str(tmp_path) and pc.target_tokenizer == str(tmp_path)
    assert pc.load() is loaded
    result = pc.compress(QUERY, DOCS)
    assert result.total_kept_tokens <= pc.budget
    assert pc.draft == str(tmp_path) and pc.target_tokenizer == str(tmp_path)


def test_selection_neighbourhoods():
    scores = torch.zeros(20)
    scores[10] = 5.0
    scores[2] = 4.0
    assert sorted(selection_order(scores, 4, 4)) == [8, 9, 10, 11]
    assert sorted(selection_order(scores, 6, 4)) == [1, 2, 8, 9, 10, 11]  # nearest the centre first
    assert sorted(selection_order(scores, 3, 4)) == [9, 10, 11]
    assert sorted(selection_order(scores, 2, 1)) == [2, 10]
    assert sorted(selection_order(scores, 100, 4)) == list(range(20))
    assert sorted(selection_order(scores, 0, 4)) == []


def _select_one_budget(scores, budget, neighbor_tokens, segments=None):
    """The selection rule walked for one budget alone, the obvious way (the reference)."""
    m = len(scores)
    owner = {p: (a, b) for a, b in (segments or [(0, m)]) for p in range(a, b)}
    kept = []
    for center in sorted(range(m), key=lambda p: (-float(scores[p]), p)):
        a, b = owner[center]
        lo, hi = max(center - neighbor_tokens // 2, a), min(center - neighbor_tokens // 2 + neighbor_tokens, b)
        fresh = sorted((p for p in range(lo, hi) if p not in kept), key=lambda p: (abs(p - center), p))
        kept += fresh[: max(budget - len(kept), 0)]
        if len(kept) >= budget:
            break
    return sorted(kept)


@pytest.mark.parametrize("seed", range(6))
def test_every_budget_selects_what_the_rule_walked_for_that_budget_alone_selects(seed):
    generator = torch.Generator().manual_seed(seed)
    m = 60
    scores = torch.randint(0, 8, (m,), generator=generator).float()  # many ties
    cuts = sorted(torch.randperm(m - 1, generator=generator)[:3].add(1).tolist())
    segments = list(zip([0, *cuts], [*cuts, m]))
    for neighbor_tokens in (1, 3, 8):
        order = selection_order(scores, m, neighbor_tokens, segments)
        assert sorted(order) == list(range(m))
        for budget in (0, 1, 5, 17, 33, 59, 60, 80):
            expected = _select_one_budget(scores, budget, neighbor_tokens, segments)
            assert sorted(selection_order(scores, budget, neighbor_tokens, segments)) == expected
            assert sorted(order[:budget]) == expected


def test_snap_and_join_spans():
    source = "alpha beta gamma delta epsilon"
    assert snap_spans(source, [(7, 9), (12, 13)]) == [(6, 16)]  # "beta gamma", merged over whitespace
    assert snap_spans(source, [(0, 2), (24, 26)]) == [(0, 5), (23, 30)]
    assert join_spans(source, [(6, 10)], " … ") == "… beta …"
    assert join_spans(source, [(0, 5), (23, 30)], " … ") == "alpha … epsilon"
    assert join_spans(source, [(0, len(source))], " … ") == source


def test_observers_from_the_question_equal_a_window_of_the_question_length(draft):
    from draft_rag.specpc.prompt import _DraftPrompt

    prompt = _DraftPrompt(draft.tokenizer, QUERY, DOCS)
    question_window = len(prompt.input_ids) - prompt.question_start
    by_question = make(draft, observe_from="question", window_size=3).compress(QUERY, DOCS)
    by_window = make(draft, window_size=question_window).compress(QUERY, DOCS)
    assert [d.spans for d in by_question.documents] == [d.spans for d in by_window.documents]
    assert by_question.total_kept_tokens <= 48


def test_auto_observers_read_from_the_question_apart_and_from_the_window_jointly(draft):
    from draft_rag import DraftCache

    def reading(**kwargs):
        pc = make(draft, **kwargs)
        return pc.observers, pc.settings()["observe_from"], pc.score(QUERY, DOCS).scores

    assert make(draft).observe_from == "auto"  # the field keeps what was passed; observers and settings resolve it
    for settings, resolved, other in ((dict(cache=DraftCache()), "question", "window"), ({}, "question", "window"),
                                      (dict(reading="joint"), "window", "question")):
        auto, same, different = (reading(**settings, observe_from=observe_from)
                                 for observe_from in ("auto", resolved, other))
        assert auto[:2] == same[:2] == (resolved, resolved)
        torch.testing.assert_close(auto[2], same[2], atol=0, rtol=0)
        assert not torch.allclose(auto[2], different[2])  # the other observers score otherwise: the check can fail


def test_observe_from_is_checked(draft):
    with pytest.raises(ValueError, match="observe_from"):
        make(draft, observe_from="everything")


def test_neighbourhoods_stop_at_segment_edges():
    scores = torch.zeros(12)
    scores[5] = 1.0  # the last position of the first segment
    assert sorted(selection_order(scores, 4, 4)) == [3, 4, 5, 6]
    # clipped, not shifted: 3, 4, 5 from the hit, then the next best position (a tie: the earliest)
    assert sorted(selection_order(scores, 4, 4, [(0, 6), (6, 12)])) == [0, 3, 4, 5]
    assert sorted(selection_order(scores, 4, 4, [(0, 12)])) == [3, 4, 5, 6]


@pytest.mark.parametrize("budget", [20, 48])
def test_document_boundaries_keep_every_span_inside_its_document(draft, budget):
    result = make(draft, budget=budget, document_boundaries=True, lookahead_tokens=3).compress(QUERY, DOCS)
    assert result.total_kept_tokens <= budget
    for doc, source in zip(result.documents, DOCS):
        assert all(0 <= a < b <= len(source) for a, b in doc.spans)


def test_window_only_ramp_changes_nothing_without_lookahead_rows(draft):
    plain = make(draft).compress(QUERY, DOCS)
    ramped = make(draft, ramp_window_only=True).compress(QUERY, DOCS)
    assert [d.spans for d in plain.documents] == [d.spans for d in ramped.documents]


def test_window_only_ramp_weighs_lookahead_rows_one():
    from draft_rag.scoring import observer_weights

    assert observer_weights(5, ramp_rows=3).tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert observer_weights(3).tolist() == [0.0, 0.5, 1.0]
    assert observer_weights(1, ramp_rows=1).tolist() == [1.0]


def count_forwards(loaded):
    """Forward calls of the draft's decoder: every pass runs it, with the LM head (logits wanted) or without."""
    calls = []
    handle = loaded.model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("lookahead", [1, 4])
def test_one_draft_pass_selects_like_compress_at_every_budget(draft, lookahead):
    pc = make(draft, lookahead_tokens=lookahead)
    calls, handle = count_forwards(draft)
    try:
        context = pc.score(QUERY, DOCS)
        forwards = len(calls)
        selected = {budget: pc.select(context, budget) for budget in (12, 30, 48, 10_000)}
        assert len(calls) == forwards > 0  # selection never runs the draft
    finally:
        handle.remove()
    for budget, result in selected.items():
        expected = make(draft, budget=budget, lookahead_tokens=lookahead).compress(QUERY, DOCS)
        assert result.texts == expected.texts and result.budget == budget
        assert [d.spans for d in result.documents] == [d.spans for d in expected.documents]
        assert result.lookahead_text == context.lookahead_text
        assert result.seconds >= context.seconds > 0  # each result costs what one compress call would
    assert selected[10_000].texts == DOCS  # budget >= context: unchanged
    assert pc.select(context).budget == pc.budget


def test_score_reads_blank_documents_without_the_draft(draft):
    pc = make(draft, budget=1)
    calls, handle = count_forwards(draft)
    try:
        context = pc.score(QUERY, ["  ", "\n"])
        result = pc.select(context)
    finally:
        handle.remove()
    assert not calls and context.scores is None
    assert [d.blank and d.text == "" for d in result.documents] == [True, True]


def test_select_checks_its_budget_and_score_its_inputs(draft):
    pc = make(draft)
    context = pc.score(QUERY, DOCS)
    with pytest.raises(ValueError, match="budget"):
        pc.select(context, 0)
    with pytest.raises(TypeError, match="budget"):
        pc.select(context, 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="documents"):
        pc.score(QUERY, "one string")  # type: ignore[arg-type]


def test_settings_name_every_knob_with_its_value_and_leave_out_models_and_budget(draft):
    settings = make(draft).settings()
    assert settings["window_size"] == 8 and settings["document_boundaries"] is True  # a default is recorded too
    assert {"draft", "budget", "target_tokenizer", "device", "dtype", "progress", "cache"}.isdisjoint(settings)
    assert make(draft, budget=7).settings() == settings
    assert make(draft, document_boundaries=False).settings() == {**settings, "document_boundaries": False}


# Templates that render the clock, as Llama 3.x does for its "Today Date" (microseconds: every rendering differs).
CLOCK_TEMPLATE = "<|im_start|>system\nNow: {{ strftime_now('%H:%M:%S.%f') }}<|im_end|>\n" + CHATML
DATED_TEMPLATE = (
    "{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y %H:%M:%S.%f') %}{% endif %}"
    "<|im_start|>system\nToday Date: {{ date_string }}<|im_end|>\n" + CHATML
)


def with_template(draft, template: str) -> LoadedModel:
    """``draft``'s weights with a fresh copy of its tokenizer that renders ``template``."""
    tokenizer = copy.deepcopy(draft.tokenizer)
    tokenizer.chat_template = template
    user = [{"role": "user", "content": "hi"}]
    first, second = (tokenizer.apply_chat_template(user, tokenize=False) for _ in range(2))
    assert first != second  # the template does render the clock, so a rendering per call would drift
    return LoadedModel(model=draft.model, tokenizer=tokenizer, name=draft.name)


def test_a_template_that_renders_the_clock_keeps_cache_keys_and_output(draft):
    clocked = with_template(draft, CLOCK_TEMPLATE)
    cache = DraftCache()
    first = make(clocked, cache=cache).compress(QUERY, DOCS)
    before = cache.stats
    second = make(clocked, cache=cache).compress(QUERY, DOCS)  # a second SpecPC, as the cascade makes per prompt
    after = cache.stats
    assert first.texts == second.texts
    assert after.misses == before.misses == len(DOCS) + 1  # the prefix and each document, encoded once
    assert after.hits - before.hits == len(DOCS) + 1


def test_a_template_dated_by_date_string_gets_the_same_prefix_in_every_process(draft):
    # Each fresh tokenizer copy stands for another process (or day) that renders the template anew.
    cache = DraftCache()
    results = [make(with_template(draft, DATED_TEMPLATE), cache=cache).compress(QUERY, DOCS) for _ in range(2)]
    assert results[0].texts == results[1].texts
    assert cache.stats.misses == len(DOCS) + 1 and cache.stats.hits == len(DOCS) + 1
    assert TEMPLATE_DATE in _template_parts(with_template(draft, DATED_TEMPLATE).tokenizer)[0]

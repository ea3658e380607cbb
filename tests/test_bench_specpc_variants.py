"""SpecPC's bench variants on tiny models: the warm draft cache (``specpc-cached``), the two-pass selection
(``specpc-2pass``, :mod:`draft_rag.bench.two_pass`) and the long lookahead (``specpc-lookahead``)."""

from __future__ import annotations

import pytest

from draft_rag.bench.methods import Outcome, build_methods
from draft_rag.bench.runner import BenchConfig, read_rows, run_bench
from draft_rag.bench.tasks import TaskGenerator
from draft_rag.bench.tiny import TINY_SPECPC_SETTINGS


@pytest.fixture
def draft_calls(tiny_pair):
    """The number of tokens of each forward call of the tiny draft, while the test runs."""
    calls: list[int] = []
    handle = tiny_pair[0].model.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((args[0] if args else kwargs["input_ids"]).shape[1]), with_kwargs=True
    )
    yield calls
    handle.remove()


def _sample(target, task="niah_multikey", index=0, length=600):
    return TaskGenerator(target.tokenizer, chunk_tokens=64).sample(task, length, index)


def _methods(tiny_pair, *names):
    draft, target = tiny_pair
    return build_methods(list(names), draft=draft, target=target, specpc_settings=TINY_SPECPC_SETTINGS)[0]


def test_specpc_cached_warms_before_the_compression_and_records_it_apart(tiny_pair, draft_calls):
    from draft_rag import DraftCache, SpecPC

    draft, target = tiny_pair
    method = _methods(tiny_pair, "specpc-cached")["specpc-cached"]
    assert method.settings["draft_cache"] == "warm"
    sample = _sample(target)
    first = method.run(sample, 64)
    documents = len([doc for doc in sample.documents if doc.strip()])
    # Warming encodes the chat template's opening and each document, one forward call each; compressing then runs
    # only what follows the cached documents (the question and the template's end) through the draft.
    assert len(draft_calls) == 1 + documents + 1 and draft_calls[-1] < sum(draft_calls[1:-1]) / 2
    assert first.warm_s > 0 and first.compress_s > 0
    alone = SpecPC(draft=draft, budget=64, target_tokenizer=target.tokenizer, progress=False, cache=DraftCache(),
                   observe_from="window", **TINY_SPECPC_SETTINGS)  # the method's observers, not "auto"
    alone.warm(sample.documents)
    assert first.context_tokens == alone.compress(sample.question, sample.documents).total_kept_tokens
    # The next budget of the same sample reuses the warm cache and the draft pass, and is charged the same warm time.
    draft_calls.clear()
    second = method.run(sample, 128)
    assert not draft_calls and second.warm_s == first.warm_s
    # A new sample empties the cache first, so it holds one sample's documents and its warm time is its own.
    other = _sample(target, index=1)
    method.run(other, 64)
    cache = method.warm.specpc.cache
    assert cache.stats.entries == 1 + len([doc for doc in other.documents if doc.strip()])  # with the opening


def test_specpc_cached_does_not_reuse_the_uncached_draft_pass(tiny_pair, draft_calls):
    methods = _methods(tiny_pair, "specpc", "specpc-cached")
    sample = _sample(tiny_pair[1])
    methods["specpc"].run(sample, 64)
    draft_calls.clear()
    methods["specpc-cached"].run(sample, 64)
    # Warming (the opening and each document), then its own reading over the cache, not specpc's full prefill.
    assert len(draft_calls) == 1 + len([doc for doc in sample.documents if doc.strip()]) + 1


def test_rows_record_the_warm_seconds_apart_from_the_end_to_end_time(tmp_path, tiny_pair):
    class Warmed:
        name, budgeted, settings = "specpc-cached", True, {}

        def run(self, sample, budget):
            return Outcome("no idea", 0.25, 1.0, 100, 2048, budget, warm_s=3.5)

    config = BenchConfig(tasks=["qa"], lengths=[600], budgets=[64], samples=1)
    run_bench(config, {"specpc-cached": Warmed()}, TaskGenerator(tiny_pair[1].tokenizer, chunk_tokens=64), tmp_path,
              progress=False)
    (row,) = read_rows(tmp_path / "results.jsonl")
    assert row["warm_s"] == 3.5 and row["total_s"] == 1.25


def test_specpc_lookahead_reads_with_the_draft_answer_and_alone(tiny_pair, draft_calls):
    methods = _methods(tiny_pair, "specpc", "specpc-lookahead")
    assert methods["specpc-lookahead"].settings["lookahead_tokens"] == 32
    assert {k: v for k, v in methods["specpc-lookahead"].settings.items() if k != "lookahead_tokens"} == {
        k: v for k, v in methods["specpc"].settings.items() if k != "lookahead_tokens"}
    sample = _sample(tiny_pair[1])
    methods["specpc"].run(sample, 64)
    draft_calls.clear()
    assert methods["specpc-lookahead"].run(sample, 64).context_tokens <= 64
    assert draft_calls


@pytest.mark.parametrize(("name", "reference"), [("specpc-question", "specpc"),
                                               ("specpc-cached-question", "specpc-cached")])
def test_specpc_question_observes_from_the_question_and_reads_alone(tiny_pair, draft_calls, name, reference):
    methods = _methods(tiny_pair, reference, name)
    assert methods[name].settings["observe_from"] == "question"
    assert methods[reference].settings["observe_from"] == "window"
    assert {k: v for k, v in methods[name].settings.items() if k != "observe_from"} == {
        k: v for k, v in methods[reference].settings.items() if k != "observe_from"}
    assert (methods[name].warm is None) == (reference == "specpc")
    sample = _sample(tiny_pair[1])
    methods[reference].run(sample, 64)
    draft_calls.clear()
    assert methods[name].run(sample, 64).context_tokens <= 64
    assert draft_calls  # its own draft pass: other observers, other scores


def test_specpc_cached_question_lookahead_adds_the_draft_answer_to_the_question_observers(tiny_pair, draft_calls):
    name, reference = "specpc-cached-question-lookahead", "specpc-cached-question"
    methods = _methods(tiny_pair, reference, name)
    assert methods[name].settings["lookahead_tokens"] == 32
    assert methods[name].settings["observe_from"] == "question"
    assert {k: v for k, v in methods[name].settings.items() if k != "lookahead_tokens"} == {
        k: v for k, v in methods[reference].settings.items() if k != "lookahead_tokens"}
    assert methods[name].warm is not None
    sample = _sample(tiny_pair[1])
    methods[reference].run(sample, 64)
    draft_calls.clear()
    assert methods[name].run(sample, 64).context_tokens <= 64
    assert draft_calls


def _two_pass(tiny_pair, answer="", **kwargs):
    from draft_rag import SpecPC
    from draft_rag.bench.two_pass import TwoPassSpecPC

    draft, target = tiny_pair
    specpc = SpecPC(draft=draft, budget=64, target_tokenizer=target.tokenizer, progress=False, **TINY_SPECPC_SETTINGS)
    two_pass = TwoPassSpecPC(specpc, target.tokenizer, **kwargs)
    answers: list[tuple[str, list[str]]] = []

    def draft_answer(query, documents):
        answers.append((query, documents))
        return answer

    two_pass.draft_answer = draft_answer  # the tiny draft's own answers are noise; the tests pick one
    return two_pass, answers


def _covered(source, inner, outer):
    """Whether every non-space character of ``source`` that the spans ``inner`` keep, the spans ``outer`` keep too
    (spans of both merge where only whitespace lies between them)."""
    def kept(spans):
        return {i for start, end in spans for i in range(start, end) if not source[i].isspace()}

    return kept(inner) <= kept(outer)


def test_two_pass_keeps_the_first_picks_and_fills_the_budget_from_the_answer(tiny_pair):
    sample = _sample(tiny_pair[1], task="qa")
    needle = next(doc for doc in sample.documents if "That autumn" in doc or " paid " in doc)
    answer = needle[:80]
    two_pass, answers = _two_pass(tiny_pair, answer=answer, first_share=0.5)
    context = two_pass.score(sample.question, sample.documents)
    result = two_pass.select(context, 64)
    specpc = two_pass.specpc
    first = specpc.select(context, 64)
    # The draft answered from the first selection at the full budget.
    assert answers == [(sample.question, [doc.text for doc in first.documents if not doc.dropped])]
    assert result.lookahead_text == answer and result.total_kept_tokens <= 64
    second = two_pass.second_pass(context, first).context
    assert second.query == f"{sample.question} {answer}" and second.documents == sample.documents
    picks = specpc.select(context, 32)
    found = specpc.select(second, 64)
    for source, kept, pick, full in zip(sample.documents, result.documents, picks.documents, found.documents,
                                        strict=True):
        assert _covered(source, pick.spans, kept.spans)  # the first pass's best half stays
        assert _covered(source, kept.spans, pick.spans + full.spans)  # and everything else is the second pass's
    assert result.texts != picks.texts  # the second pass added something
    assert result.seconds >= context.seconds + two_pass.second_pass(context, first).seconds


def test_two_pass_makes_one_second_pass_per_budget_for_every_share(tiny_pair):
    sample = _sample(tiny_pair[1])
    two_pass, answers = _two_pass(tiny_pair, answer="special magic number")
    context = two_pass.score(sample.question, sample.documents)
    only_answer = two_pass.select(context, 64, first_share=0.0)
    for share in (0.25, 0.75):
        assert two_pass.select(context, 64, first_share=share).total_kept_tokens <= 64
    assert len(answers) == 1
    second = two_pass.second_pass(context, two_pass.specpc.select(context, 64)).context
    alone = two_pass.specpc.select(second, 64)
    assert all(_covered(source, kept.spans, full.spans)
               for source, kept, full in zip(sample.documents, only_answer.documents, alone.documents, strict=True))
    two_pass.select(context, 128)
    assert len(answers) == 2  # another budget, another first selection to answer from


def test_two_pass_without_an_answer_or_without_cutting_is_the_first_pass(tiny_pair):
    sample = _sample(tiny_pair[1])
    two_pass, answers = _two_pass(tiny_pair, answer="")
    context = two_pass.score(sample.question, sample.documents)
    result = two_pass.select(context, 64)
    first = two_pass.specpc.select(context, 64)
    assert answers and result.texts == first.texts and result.seconds >= context.seconds
    answers.clear()
    whole = two_pass.select(context, 10_000)
    assert whole.texts == sample.documents and not answers


def test_two_pass_checks_its_share():
    from draft_rag.bench.two_pass import TwoPassSpecPC

    for share in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="first_share"):
            TwoPassSpecPC(None, None, first_share=share)  # type: ignore[arg-type]


def test_specpc_2pass_shares_the_first_pass_with_specpc_and_lets_the_draft_answer(tiny_pair, draft_calls):
    methods = _methods(tiny_pair, "specpc", "specpc-2pass")
    settings = methods["specpc-2pass"].settings
    assert (settings["first_share"], settings["answer_tokens"]) == (0.5, 32)
    sample = _sample(tiny_pair[1])
    methods["specpc"].run(sample, 64)
    reading = methods["specpc"]._compressors[64].latest["context"]
    draft_calls.clear()
    outcome = methods["specpc-2pass"].run(sample, 64)
    assert outcome.context_tokens <= 64 and outcome.compress_s >= reading.seconds
    compressor = methods["specpc-2pass"]._compressors[64]
    assert compressor.latest["context"] is reading  # the first pass is specpc's
    # The draft's greedy answer (at most 32 tokens: a prefill and decode steps), then the second reading if it said
    # anything, which reads the whole prompt again.
    answer = compressor.specpc.second_pass(reading, compressor.specpc.specpc.select(reading, 64)).answer
    long_reads = [n for n in draft_calls if n > 1]
    assert len(draft_calls) - len(long_reads) <= 32 and len(long_reads) == (2 if answer else 1)


def _after_the_cached_question_pass(tiny_pair, draft_calls, name, knob):
    """Runs ``name`` (specpc-cached-question with ``knob`` = 2) at budget 64 after specpc-cached-question on the same
    sample, and returns the sample and the draft's forward calls of that run (the shared first pass not among
    them)."""
    reference = "specpc-cached-question"
    methods = _methods(tiny_pair, reference, name)
    assert methods[name].settings[knob] == 2
    assert {k: v for k, v in methods[name].settings.items() if k != knob} == {
        k: v for k, v in methods[reference].settings.items() if k != knob}
    assert methods[name].warm is not None
    sample = _sample(tiny_pair[1])
    plain = methods[reference].run(sample, 64)
    draft_calls.clear()
    outcome = methods[name].run(sample, 64)
    assert outcome.context_tokens <= 64
    assert outcome.compress_s > 0 and plain.compress_s > 0
    return sample, list(draft_calls)


def test_specpc_cached_question_rescore_shares_the_cached_pass_and_reads_its_candidates_again(tiny_pair, draft_calls):
    sample, calls = _after_the_cached_question_pass(tiny_pair, draft_calls, "specpc-cached-question-rescore",
                                                    "rescore_factor")
    # Its own cache is warmed (the prefix, then each document), the first pass is specpc-cached-question's (shared),
    # and one more draft pass reads the candidates (at most twice the budget) with the question, without the cache.
    *encodings, second = calls
    assert len(encodings) == len(sample.documents) + 1
    assert 64 < second < sum(encodings)


def test_specpc_cached_question_recompute_shares_the_cached_pass_and_recomputes_its_candidates(tiny_pair, draft_calls):
    sample, calls = _after_the_cached_question_pass(tiny_pair, draft_calls, "specpc-cached-question-recompute",
                                                    "recompute_factor")
    # Its own cache is warmed (the prefix, then each document), the first pass is specpc-cached-question's (shared),
    # then the candidates (at most twice the budget, in draft tokens) run again over the cache, then the question.
    *encodings, candidates, question = calls
    assert len(encodings) == len(sample.documents) + 1
    assert 64 <= candidates <= 2 * 64 and question < 64

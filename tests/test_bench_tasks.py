from __future__ import annotations

import re
from pathlib import Path

import pytest

from draft_rag.bench import prose, tasks
from draft_rag.bench.book_qa import book_questions
from draft_rag.bench.prose import book_text, prose_sentences
from draft_rag.bench.tasks import (
    DEFAULT_TASKS,
    TASKS,
    Sample,
    TaskGenerator,
    build_prompt,
    string_match,
)
from tests.tiny import tiny_tokenizer


def words_embedding(texts):
    """A cheap stand-in for MiniLM: unit vectors of hashed word counts (texts sharing words are similar)."""
    import zlib

    import numpy as np

    vectors = np.zeros((len(texts), 512), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"[a-z]+", text.lower()):
            vectors[row, zlib.crc32(word.encode()) % 512] += 1.0
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


@pytest.fixture(scope="module")
def generator() -> TaskGenerator:
    return TaskGenerator(tiny_tokenizer(), seed=7, chunk_tokens=128, embed=words_embedding)


def _prompt_tokens(sample: Sample) -> int:
    return len(tiny_tokenizer()(sample.prompt(), add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_and_near_the_requested_length(generator, task):
    # Long enough for eight facts in eight documents of 128 tokens (the spread tasks).
    sample = generator.sample(task, 2500, 3)
    again = TaskGenerator(tiny_tokenizer(), seed=7, chunk_tokens=128, embed=words_embedding).sample(task, 2500, 3)
    assert sample == again
    assert generator.sample(task, 2500, 4) != sample
    assert abs(_prompt_tokens(sample) - 2500) < 0.1 * 2500
    assert len(sample.documents) > 3
    assert sample.answers and sample.question


@pytest.mark.parametrize(
    "task", ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "qa", "multivalue_spread",
             "two_hop"],
)
def test_every_gold_answer_is_in_the_context(generator, task):
    sample = generator.sample(task, 2500, 0)
    context = "\n".join(sample.documents)
    for answer in sample.answers:
        assert answer in context


def test_multikey_has_distractor_needles_and_asks_the_right_key(generator):
    sample = generator.sample("niah_multikey", 1200, 1)
    context = " ".join(sample.documents)
    needles = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", context)
    assert len(needles) == 4 and len({key for key, _ in needles}) == 4
    asked = re.search(r"number for (\S+) mentioned", sample.question).group(1)
    assert dict(needles)[asked] == sample.answers[0]


def test_variable_chain_appears_in_order(generator):
    sample = generator.sample("variable_tracking", 1200, 2)
    context = " ".join(sample.documents)
    positions = [context.index(f"VAR {name} =") for name in sample.answers]
    assert positions == sorted(positions)
    value = sample.question.split("value ")[1].split()[0]
    assert f"VAR {sample.answers[0]} = {value}." in context
    for previous, name in zip(sample.answers, sample.answers[1:], strict=False):
        assert f"VAR {name} = VAR {previous}." in context


def _documents_with(sample: Sample, pattern: str) -> list[int]:
    """Index of the document holding each match of ``pattern``, in reading order."""
    return [i for i, doc in enumerate(sample.documents) for _ in re.finditer(pattern, doc)]


@pytest.mark.parametrize("index", range(4))
def test_multivalue_spread_puts_every_needle_in_a_document_of_its_own(generator, index):
    sample = generator.sample("multivalue_spread", 2500, index)
    context = " ".join(sample.documents)
    needles = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", context)
    asked = re.search(r"numbers for (\S+) mentioned", sample.question).group(1)
    assert sorted(v for k, v in needles if k == asked) == sorted(sample.answers) and len(sample.answers) == 4
    assert len(needles) == 8 and len({k for k, _ in needles}) == 5
    holders = _documents_with(sample, r"special magic numbers for")
    assert len(holders) == len(set(holders)) == 8


@pytest.mark.parametrize("index", range(4))
def test_two_hop_chain_crosses_documents_and_its_answer_shares_no_word_with_the_question(generator, index):
    sample = generator.sample("two_hop", 2500, index)
    context = " ".join(sample.documents)
    person = re.search(r"belongs to (.+)'s parcel", sample.question).group(1)
    locker = re.search(re.escape(person) + r" put the parcel in the (\w+ \w+) locker\.", context).group(1)
    answer_fact = f"The {locker} locker opens with {sample.answers[0]}."
    assert answer_fact in context and context.index(person) < context.index(answer_fact)
    words = lambda text: set(re.findall(r"[a-z0-9]+", text.lower())) - {"the"}  # noqa: E731
    assert not words(answer_fact) & words(sample.question)
    # Four chains of two facts, with four different people and lockers, in eight documents.
    people = re.findall(r"([A-Z][a-z]+) ([A-Z][a-z]+) put the parcel in the", context)
    lockers = re.findall(r"The (\w+) (\w+) locker opens with \d{7}\.", context)
    for pairs in (people, lockers):
        assert len(pairs) == 4 and all(len({pair[i] for pair in pairs}) == 4 for i in (0, 1))
    holders = _documents_with(sample, r"put the parcel in the|locker opens with")
    assert len(holders) == len(set(holders)) == 8


def test_spread_tasks_differ_by_seed_and_say_when_there_are_too_few_documents(generator):
    other = TaskGenerator(tiny_tokenizer(), seed=8, chunk_tokens=128)
    for task in ("multivalue_spread", "two_hop"):
        assert generator.sample(task, 2500, 0).answers != other.sample(task, 2500, 0).answers
        with pytest.raises(ValueError, match="different documents"):
            TaskGenerator(tiny_tokenizer(), chunk_tokens=512).sample(task, 1500, 0)


def test_default_tasks_leave_out_variable_tracking():
    assert set(DEFAULT_TASKS) <= set(TASKS) and "variable_tracking" not in DEFAULT_TASKS
    assert {"multivalue_spread", "two_hop", "niah_multikey", "qa"} <= set(DEFAULT_TASKS)


def test_common_words_are_the_most_frequent(generator):
    sample = generator.sample("common_words", 1500, 0)
    words = re.findall(r"\d+\. ([a-z]+)", " ".join(sample.documents))
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert sorted(top) == sorted(sample.answers)
    assert min(counts[w] for w in sample.answers) > max(c for w, c in counts.items() if w not in sample.answers)


def test_haystack_is_real_prose_in_reading_order(generator):
    sample = generator.sample("niah_single", 1200, 5)
    sentences = prose_sentences()
    first = next(s for s in sentences if s in sample.documents[0])
    start = sentences.index(first)
    assert sentences[start + 1] in " ".join(sample.documents)


def test_string_match_scores_like_ruler():
    assert string_match("The numbers are 123 and 456.", ["123", "456", "789"], "all") == pytest.approx(2 / 3)
    assert string_match("It is in the CELLAR.", ["cellar"], "any") == 1.0
    assert string_match("no idea", ["cellar", "attic"], "any") == 0.0
    assert string_match("anything", [], "all") == 0.0


def test_prompt_numbers_documents_and_ends_with_the_question():
    prompt = build_prompt("Read this.", ["alpha", "beta"], "What?")
    assert prompt.index("[Document 1]\nalpha") < prompt.index("[Document 2]\nbeta") < prompt.index("Question: What?")
    assert prompt.startswith("Read this.")


def test_errors_name_the_fix(generator):
    with pytest.raises(ValueError, match="Unknown task"):
        generator.sample("haystack", 1000, 0)
    with pytest.raises(ValueError, match="too short"):
        generator.sample("niah_multivalue", 120, 0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        TaskGenerator(tiny_tokenizer(), chunk_tokens=4)


BOOK_QA = book_questions()


def test_book_qa_has_forty_checked_questions_some_needing_two_passages():
    assert len(BOOK_QA) >= 40 and len({q.id for q in BOOK_QA}) == len(BOOK_QA)
    assert sum(q.hops == 2 for q in BOOK_QA) >= 10 and {q.hops for q in BOOK_QA} == {1, 2}
    # The books the task reads are shipped with the package and listed with their source.
    readme = (Path(tasks.__file__).parent / "data" / "README.md").read_text()
    for book in {q.book for q in BOOK_QA}:
        assert (Path(tasks.__file__).parent / "data" / f"{book}.txt").is_file() and f"`{book}.txt`" in readme


@pytest.mark.parametrize("question", BOOK_QA, ids=[q.id for q in BOOK_QA])
def test_book_qa_evidence_is_quoted_verbatim_and_holds_the_answer(question):
    text = book_text(question.book)
    for quote in question.evidence:
        # Exactly once, so that the quote names one place of the book.
        assert text.count(quote) == 1, quote
    for answer in question.answers:
        assert answer.lower() not in question.question.lower(), answer
        assert question.note or any(answer.lower() in quote.lower() for quote in question.evidence), answer
    # The note explains an alternative; at least one gold answer is written in the evidence itself.
    assert any(answer.lower() in quote.lower() for answer in question.answers for quote in question.evidence)
    if question.hops == 2:
        first, second = (text.index(quote) for quote in question.evidence)
        assert len(question.evidence) == 2 and abs(first - second) > 3000
        # The second passage holds the answer; the first is the hop that leads there.
        assert any(answer.lower() in question.evidence[1].lower() for answer in question.answers)
    else:
        assert question.hops == 1


def test_book_qa_context_holds_the_evidence_within_the_length(generator):
    for index in range(6):  # one question of each book
        question = BOOK_QA[index]
        sample = generator.sample("book_qa", 2500, index)
        assert (sample.question, sample.answers, sample.metric) == (question.question, list(question.answers), "any")
        context = " ".join(" ".join(doc.split()) for doc in sample.documents)
        assert all(quote in context for quote in question.evidence)
        assert _prompt_tokens(sample) < 2500 + 128
        # Chunks in book order, each a run of the book's sentences.
        text = book_text(question.book)
        starts = [text.index(" ".join(doc.split())) for doc in sample.documents]
        assert starts == sorted(starts) and len(starts) > 3


def test_book_qa_retrieves_the_chunks_most_like_the_question():
    import numpy as np

    generator = TaskGenerator(tiny_tokenizer(), chunk_tokens=128, embed=words_embedding)
    question = BOOK_QA[0]
    sample = generator.sample("book_qa", 1500, 0)
    chunks, vectors = generator._book_qa._book_chunks(question.book)
    kept = {c.text for c in chunks} & set(sample.documents)
    assert len(kept) == len(sample.documents)
    similarity = vectors @ words_embedding([question.question])[0]
    evidence = {c.text for c in chunks if any(quote in " ".join(c.text.split()) for quote in question.evidence)}
    # Every chunk kept for its similarity beats every chunk left out.
    kept_scores = [s for c, s in zip(chunks, similarity) if c.text in kept and c.text not in evidence]
    left_scores = [s for c, s in zip(chunks, similarity) if c.text not in kept]
    assert kept_scores and min(kept_scores) >= np.round(max(left_scores), 4) - 1e-4
    # With no room beyond the evidence, the evidence alone is kept.
    short = generator.sample("book_qa", 200, 0)
    assert {" ".join(d.split()) for d in short.documents} <= {" ".join(t.split()) for t in evidence}
    assert short.documents


def test_book_qa_questions_do_not_depend_on_the_seed_and_refuse_missing_indices(generator):
    other = TaskGenerator(tiny_tokenizer(), seed=8, chunk_tokens=128, embed=words_embedding)
    assert other.sample("book_qa", 2500, 1) == generator.sample("book_qa", 2500, 1)
    with pytest.raises(ValueError, match=f"book_qa has {len(BOOK_QA)} questions"):
        generator.sample("book_qa", 2500, len(BOOK_QA))


def test_book_qa_is_registered_but_not_a_default():
    assert "book_qa" in TASKS and "book_qa" not in DEFAULT_TASKS


def test_haystacks_read_only_the_haystack_books():
    assert prose.HAYSTACK_BOOKS == ("alice_in_wonderland", "legend_of_sleepy_hollow", "yellow_wallpaper")
    douglass = book_text("narrative_of_frederick_douglass")
    assert not any(sentence in douglass for sentence in prose_sentences()[-50:])
    assert prose_sentences()[-1] in book_text("yellow_wallpaper")

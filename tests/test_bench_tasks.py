from __future__ import annotations

import re

import pytest

from draft_rag.bench.tasks import TASKS, Sample, TaskGenerator, build_prompt, prose_sentences, string_match
from tests.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def generator() -> TaskGenerator:
    return TaskGenerator(tiny_tokenizer(), seed=7, chunk_tokens=128)


def _prompt_tokens(sample: Sample) -> int:
    return len(tiny_tokenizer()(sample.prompt(), add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_and_near_the_requested_length(generator, task):
    sample = generator.sample(task, 1500, 3)
    again = TaskGenerator(tiny_tokenizer(), seed=7, chunk_tokens=128).sample(task, 1500, 3)
    assert sample == again
    assert generator.sample(task, 1500, 4) != sample
    assert abs(_prompt_tokens(sample) - 1500) < 0.1 * 1500
    assert len(sample.documents) > 3
    assert sample.answers and sample.question


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "qa"])
def test_every_gold_answer_is_in_the_context(generator, task):
    sample = generator.sample(task, 1200, 0)
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

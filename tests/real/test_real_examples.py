"""Both example apps answer every default question right, with and without compression."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model

# What the manual says for each default question, in words the question itself does not use: an answer must
# name at least one. Q1: "Organizations and Conferences"; Q2: "Managers and Supervisors"; Q3: "Office Workers".
EXPECTED = (
    ("channels", "speech", "irrelevant", "haggle", "wording", "further study", "caution", "reasonable",
     "re-open", "reopen", "jurisdiction", "propriety", "as large as possible"),
    ("written", "misunderstand", "quibble", "endless questions", "long correspondence", "delay the delivery"),
    ("quantities", "similar names", "wrong addresses", "prolong", "misfile", "carbon cop", "one too few",
     "duplicate files", "multiply paper"),
)


@pytest.fixture(scope="module")
def examples():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    try:
        import langchain_rag
        import llama_index_rag
    finally:
        sys.path.pop(0)
    return {"langchain": langchain_rag, "llama_index": llama_index_rag}


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "full-context"])
@pytest.mark.parametrize("framework", ["langchain", "llama_index"])
def test_example_answers_every_default_question(examples, framework, compress):
    example = examples[framework]
    assert len(example.QUESTIONS) == len(EXPECTED)
    answers = example.main([] if compress else ["--no-compress"])
    assert len(answers) == len(EXPECTED)
    wrong = [(question, answer) for question, answer, expected in zip(example.QUESTIONS, answers, EXPECTED)
             if not any(phrase in answer.lower() for phrase in expected)]
    assert wrong == []

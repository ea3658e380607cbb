"""Both example apps answer every default question right, with and without compression."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model

# What the manual says for each default question, in words the question itself does not use: an answer must
# name at least one. Q1: "Organizations and Conferences"; Q2: "Managers and Supervisors"; Q3: "Office Workers".
EXPECTED = (
    ("channels", "speech", "irrelevant", "haggle", "wording", "further study", "reasonable",
     "re-open", "reopen", "jurisdiction", "propriety", "as large as possible"),
    ("written", "misunderstand", "quibble", "endless questions", "long correspondence", "delay the delivery"),
    ("quantities", "similar names", "wrong addresses", "prolong", "misfile", "carbon cop", "one too few",
     "duplicate files", "multiply paper"),
)


@pytest.fixture
def examples(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))
    import langchain_rag
    import llama_index_rag

    return {"langchain": langchain_rag, "llama_index": llama_index_rag}


# Three questions per run: on a 2-core CPU in fp32 the full-context run takes several minutes.
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "full-context"])
@pytest.mark.parametrize("framework", ["langchain", "llama_index"])
def test_example_answers_every_default_question(examples, framework, compress):
    example = examples[framework]
    assert len(example.QUESTIONS) == len(EXPECTED)
    answers = example.main([] if compress else ["--no-compress"])
    assert len(answers) == len(EXPECTED)
    for question, answer, expected in zip(example.QUESTIONS, answers, EXPECTED):
        assert any(phrase in answer.lower() for phrase in expected), (question, answer)

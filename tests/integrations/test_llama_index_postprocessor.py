"""DraftNodePostprocessor specifics: nodes are shortened in place, and the details stay out of the LLM's text."""

from __future__ import annotations

import pytest
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

from tests.integrations.test_compression_adapters import QUERY, SPECPC_KWARGS, TEXTS


@pytest.fixture
def postprocessor(tiny_draft):
    from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

    return DraftNodePostprocessor(draft=tiny_draft, budget=30, specpc_kwargs=SPECPC_KWARGS)


def nodes() -> list[NodeWithScore]:
    return [
        NodeWithScore(node=TextNode(text=t, id_=f"n{i}", metadata={"page": i}), score=0.5) for i, t in enumerate(TEXTS)
    ]


def test_nodes_are_shortened_in_place(postprocessor):
    items = nodes()
    originals = [item.node for item in items]
    out = postprocessor.postprocess_nodes(items, query_str=QUERY)
    assert len(out) == len(items)
    assert all(a is b and a.node is node for a, b, node in zip(out, items, originals))
    assert any(len(item.node.get_content(MetadataMode.NONE)) < len(t) for item, t in zip(out, TEXTS))


def test_details_are_hidden_from_the_llm_and_the_embedder(postprocessor):
    for item in postprocessor.postprocess_nodes(nodes(), query_str=QUERY):
        assert "draft_rag" in item.node.metadata
        assert "page: " in item.node.get_content(MetadataMode.LLM)
        assert "draft_rag" not in item.node.get_content(MetadataMode.LLM)
        assert "draft_rag" not in item.node.get_content(MetadataMode.EMBED)


def test_needs_the_query(postprocessor):
    with pytest.raises(ValueError, match="query"):
        postprocessor.postprocess_nodes(nodes())

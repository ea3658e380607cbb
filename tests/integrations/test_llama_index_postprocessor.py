"""DraftNodePostprocessor specifics: copies not the caller's nodes, non-text nodes pass, details hidden from the LLM."""

from __future__ import annotations

import asyncio
import json
import os
import pickle

import pytest
from llama_index.core.schema import (
    ImageNode,
    MediaResource,
    MetadataMode,
    Node,
    NodeRelationship,
    NodeWithScore,
    RelatedNodeInfo,
    TextNode,
)

from draft_rag import DraftCache, SpecPC
from tests.integrations.test_compression_adapters import QUERY, SPECPC_KWARGS, TEXTS


@pytest.fixture
def postprocessor(tiny_draft):
    from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

    return DraftNodePostprocessor(draft=tiny_draft, budget=30, specpc_kwargs=SPECPC_KWARGS)


def nodes() -> list[NodeWithScore]:
    return [
        NodeWithScore(
            node=TextNode(
                text=t, id_=f"n{i}", metadata={"page": i},
                relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=f"doc{i}")},
            ),
            score=0.5 + i / 100,
        )
        for i, t in enumerate(TEXTS)
    ]


def texts_of(items: list[NodeWithScore]) -> list[str]:
    return [item.node.get_content(MetadataMode.NONE) for item in items]


def expected_texts(tiny_draft, texts: list[str], budget: int = 30) -> list[str]:
    return SpecPC(draft=tiny_draft, budget=budget, **SPECPC_KWARGS).compress(QUERY, texts).texts


def test_callers_nodes_are_not_modified(postprocessor, tiny_draft):
    items = nodes()
    before = [item.model_copy(deep=True) for item in items]
    out = postprocessor.postprocess_nodes(items, query_str=QUERY)
    assert [item.model_dump() for item in items] == [item.model_dump() for item in before]
    assert all(a is not b and a.node is not b.node for a, b in zip(out, items))
    assert texts_of(out) == expected_texts(tiny_draft, TEXTS)
    assert any(item.node.get_content(MetadataMode.NONE) != t for item, t in zip(out, TEXTS))
    for item, original in zip(out, before):
        assert (item.node.node_id, item.score) == (original.node.node_id, original.score)
        assert item.node.relationships == original.node.relationships
        assert item.node.metadata == {**original.node.metadata, "draft_rag": item.node.metadata["draft_rag"]}
    # A retriever that caches its nodes hands out the full text again on the next query.
    again = postprocessor.postprocess_nodes(items, query_str=QUERY)
    assert texts_of(again) == texts_of(out)


def test_a_node_listed_twice_comes_back_twice(postprocessor, tiny_draft):
    items = nodes()
    twice = [items[0], *items]
    kept = expected_texts(tiny_draft, [TEXTS[0], *TEXTS])
    assert kept[0] != kept[1], "the two copies must keep different text for this test to see them apart"
    out = postprocessor.postprocess_nodes(twice, query_str=QUERY)
    assert [item.node.node_id for item in out] == ["n0", *(f"n{i}" for i in range(len(TEXTS)))]
    assert texts_of(out) == kept
    assert out[0].node.metadata["draft_rag"] != out[1].node.metadata["draft_rag"]


def test_non_text_nodes_pass_through_and_text_changes_only_when_cut(postprocessor, tiny_draft):
    image = NodeWithScore(
        node=ImageNode(text="A cat.", image_path="/data/cat.png", image_mimetype="image/png", id_="img"), score=0.9
    )
    picture = NodeWithScore(
        node=Node(image_resource=MediaResource(path="/data/dog.jpg", mimetype="image/jpeg"), id_="pic"), score=0.8
    )
    resource = MediaResource(text=TEXTS[1], path="/data/text1.md", mimetype="text/markdown")
    text_resource = NodeWithScore(node=Node(text_resource=resource, id_="res"), score=0.7)
    items = [image, nodes()[0], picture, text_resource, *nodes()[2:]]
    before = [item.model_copy(deep=True) for item in items]

    out = postprocessor.postprocess_nodes(items, query_str=QUERY)
    texts = [TEXTS[0], TEXTS[1], *TEXTS[2:]]
    assert [item.node.node_id for item in out] == ["img", "n0", "pic", "res", *(f"n{i}" for i in range(2, len(TEXTS)))]
    assert out[0] is image and out[2] is picture
    assert out[0].model_dump() == before[0].model_dump() and out[2].model_dump() == before[2].model_dump()
    kept = expected_texts(tiny_draft, texts)
    assert texts_of([out[1], out[3], *out[4:]]) == kept
    assert kept[1] != TEXTS[1]
    shortened = out[3].node.text_resource
    assert (shortened.text, shortened.path, shortened.mimetype) == (kept[1], resource.path, "text/markdown")

    # Nothing cut: the text resource stays exactly as it was.
    roomy = postprocessor.model_copy(update={"budget": 10_000}).postprocess_nodes(items, query_str=QUERY)
    assert roomy[3].node.text_resource == resource
    assert roomy[3].node.metadata["draft_rag"]["dropped"] is False


def test_details_are_hidden_from_the_llm_and_the_embedder(postprocessor):
    for item in postprocessor.postprocess_nodes(nodes(), query_str=QUERY):
        assert "draft_rag" in item.node.metadata
        assert "page: " in item.node.get_content(MetadataMode.LLM)
        assert "draft_rag" not in item.node.get_content(MetadataMode.LLM)
        assert "draft_rag" not in item.node.get_content(MetadataMode.EMBED)


def test_unknown_keywords_raise_naming_the_closest_setting(tiny_draft):
    from llama_index.postprocessor.draft_rag import DraftCacheWarmer, DraftNodePostprocessor

    message = r"DraftNodePostprocessor got an unknown keyword argument 'budgt' \(did you mean 'budget'\?\)"
    with pytest.raises(TypeError, match=message):
        DraftNodePostprocessor(draft=tiny_draft, budgt=5)
    with pytest.raises(TypeError, match=r"'specpc_kwarg' \(did you mean 'specpc_kwargs'\?\)"):
        DraftNodePostprocessor.from_dict({"draft": "some-draft", "specpc_kwarg": {}})
    with pytest.raises(TypeError, match="'cach'"):
        DraftCacheWarmer(cached_postprocessor(tiny_draft), cach=None)


def test_needs_the_query(postprocessor):
    with pytest.raises(ValueError, match="query"):
        postprocessor.postprocess_nodes(nodes())
    with pytest.raises(TypeError, match="query_bundle must be a QueryBundle.*query_str="):
        postprocessor.postprocess_nodes(nodes(), QUERY)


def cached_postprocessor(tiny_draft):
    from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

    return DraftNodePostprocessor(draft=tiny_draft, budget=30, specpc_kwargs=SPECPC_KWARGS, cache=DraftCache())


@pytest.mark.parametrize("ingestion", ["pipeline", "from_documents"])
def test_warmer_fills_the_cache_during_ingestion_and_queries_hit_it(tiny_draft, ingestion):
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.llms import MockLLM
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.postprocessor.draft_rag import DraftCacheWarmer

    postprocessor = cached_postprocessor(tiny_draft)
    embed_model = MockEmbedding(embed_dim=8)
    splitter = SentenceSplitter(chunk_size=1024, chunk_overlap=0)
    documents = [Document(text=t) for t in TEXTS]
    if ingestion == "pipeline":
        pipeline = IngestionPipeline(transformations=[splitter, embed_model, DraftCacheWarmer(postprocessor)])
        index = VectorStoreIndex(pipeline.run(documents=documents), embed_model=embed_model)
    else:
        transformations = [splitter, DraftCacheWarmer(postprocessor)]
        index = VectorStoreIndex.from_documents(documents, embed_model=embed_model, transformations=transformations)
    cache = postprocessor.cache
    assert cache.stats.entries == len(TEXTS) + 1  # every node and the chat template's opening

    stats = cache.stats
    engine = index.as_query_engine(llm=MockLLM(), similarity_top_k=4, node_postprocessors=[postprocessor])
    response = engine.query(QUERY)
    assert cache.stats.misses == stats.misses
    assert cache.stats.hits > stats.hits
    assert sum(item.node.metadata["draft_rag"]["kept_tokens"] for item in response.source_nodes) <= 30


def test_warmer_reads_what_the_postprocessor_compresses(tiny_draft):
    from llama_index.postprocessor.draft_rag import DraftCacheWarmer

    postprocessor = cached_postprocessor(tiny_draft)
    items = [
        ImageNode(text="A cat.", image_path="/data/cat.png", id_="img"),
        TextNode(text=TEXTS[0], metadata={"page": 0}),
        Node(image_resource=MediaResource(path="/data/dog.jpg"), id_="pic"),
        Node(text_resource=MediaResource(text=TEXTS[1], path="/data/text1.md")),
        TextNode(text=" \n "),
    ]
    before = [item.model_dump() for item in items]
    assert DraftCacheWarmer(postprocessor)(items) is items
    assert [item.model_dump() for item in items] == before
    cache = postprocessor.cache
    assert cache.stats.entries == 3  # the two texts, without metadata, and the chat template's opening

    stats = cache.stats
    postprocessor.postprocess_nodes([NodeWithScore(node=node) for node in items], query_str=QUERY)
    assert cache.stats.misses == stats.misses
    assert cache.stats.hits > stats.hits


def test_warmer_acall_returns_the_nodes_and_fills_the_cache(tiny_draft):
    from llama_index.postprocessor.draft_rag import DraftCacheWarmer

    postprocessor = cached_postprocessor(tiny_draft)
    items = [TextNode(text=t) for t in TEXTS[:2]]
    assert asyncio.run(DraftCacheWarmer(postprocessor).acall(items)) is items
    assert postprocessor.cache.stats.entries == 3


def test_warmer_needs_a_postprocessor_with_a_cache(postprocessor):
    from llama_index.postprocessor.draft_rag import DraftCacheWarmer

    with pytest.raises(ValueError, match=r"DraftCacheWarmer needs a draft cache.*cache=DraftCache\(\)"):
        DraftCacheWarmer(postprocessor)


def test_settings_serialize_the_cache_settings_not_its_entries():
    from llama_index.postprocessor.draft_rag import DraftCacheWarmer, DraftNodePostprocessor

    cache = DraftCache(max_bytes=1 << 20)
    warmer = DraftCacheWarmer(postprocessor=DraftNodePostprocessor(draft="some-draft", cache=cache))
    expected = "DraftCache(max_bytes=1048576, directory=None, max_host_bytes=4294967296)"
    assert json.loads(warmer.to_json())["postprocessor"]["cache"] == expected


@pytest.fixture(scope="module")
def saved_draft(tiny_draft, tmp_path_factory) -> str:
    """The tiny draft saved as a model directory: a path by which another process loads the same model."""
    path = tmp_path_factory.mktemp("draft")
    tiny_draft.model.save_pretrained(path)
    tiny_draft.tokenizer.save_pretrained(path)
    return str(path)


def test_warmer_pickles_its_settings_not_the_model_nor_the_entries(saved_draft, tiny_draft, tmp_path):
    from llama_index.postprocessor.draft_rag import DraftCacheWarmer, DraftNodePostprocessor

    cache = DraftCache(max_bytes=1 << 20, directory=tmp_path)
    postprocessor = DraftNodePostprocessor(draft=saved_draft, budget=30, specpc_kwargs=SPECPC_KWARGS, cache=cache)
    warmer = DraftCacheWarmer(postprocessor)
    warmer([TextNode(text=TEXTS[0])])  # the draft is loaded and the cache holds entries
    pickled = pickle.dumps(warmer)
    model_bytes = sum(t.nbytes for t in tiny_draft.model.state_dict().values())
    assert len(pickled) < model_bytes / 10, "the pickle must hold the settings, not the loaded draft"

    copy = pickle.loads(pickled).postprocessor
    assert copy.to_dict() == postprocessor.to_dict()
    assert copy.cache is not cache
    assert (copy.cache.max_bytes, copy.cache.directory, copy.cache.stats.entries) == (1 << 20, tmp_path, 0)
    # The copy loads the draft again and finds on disk what the original read.
    DraftCacheWarmer(copy)([TextNode(text=TEXTS[0])])
    assert copy.cache.stats.misses == 0 and copy.cache.stats.hits > 0

    with pytest.raises(TypeError, match="DraftNodePostprocessor cannot be pickled .* draft is a loaded model"):
        pickle.dumps(DraftCacheWarmer(cached_postprocessor(tiny_draft)))


def test_warmer_in_another_process_needs_a_cache_directory(saved_draft):
    from llama_index.postprocessor.draft_rag import DraftCacheWarmer, DraftNodePostprocessor

    warmer = DraftCacheWarmer(DraftNodePostprocessor(draft=saved_draft, cache=DraftCache()))
    warmer._origin_pid = os.getpid() + 1  # as if it had been made in another process and pickled to this one
    with pytest.raises(ValueError, match=r"another process.*has no directory.*DraftCache\(directory=\.\.\.\)"):
        warmer([TextNode(text=TEXTS[0])])
    assert warmer.postprocessor.cache.stats.misses == 0


def test_ingestion_pipeline_workers_fill_the_shared_cache_directory(saved_draft, tmp_path):
    from llama_index.core import Document
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.postprocessor.draft_rag import DraftCacheWarmer, DraftNodePostprocessor

    cache = DraftCache(directory=tmp_path)
    postprocessor = DraftNodePostprocessor(draft=saved_draft, budget=30, specpc_kwargs=SPECPC_KWARGS, cache=cache)
    # No text splitter: its tiktoken encoding, unpickled in a worker, downloads its vocabulary (tests run offline).
    pipeline = IngestionPipeline(transformations=[MockEmbedding(embed_dim=8), DraftCacheWarmer(postprocessor)])
    ingested = pipeline.run(documents=[Document(text=t) for t in TEXTS], num_workers=2)
    assert [node.get_content() for node in ingested] == TEXTS
    assert all(node.embedding for node in ingested)
    # The workers read the nodes: none is in this process's memory, all are on disk with the template's opening.
    assert cache.stats.entries == 0
    assert len(list(tmp_path.glob("*.safetensors"))) == len(TEXTS) + 1

    out = postprocessor.postprocess_nodes([NodeWithScore(node=node) for node in ingested], query_str=QUERY)
    assert cache.stats.misses == 0 and cache.stats.hits == len(TEXTS) + 1
    assert sum(item.node.metadata["draft_rag"]["kept_tokens"] for item in out) <= 30

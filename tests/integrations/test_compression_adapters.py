"""The checks every compression adapter must pass: LangChain's compressor and LlamaIndex's postprocessor."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from draft_rag import DraftCache, SpecPC
from tests.integrations.heartbeat import assert_loop_kept_ticking, ticks_during
from tests.tiny import tiny_tokenizer

QUERY = "What is the special magic number for the word apple?"
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 5,
    "A special magic number is hidden in the text: 4815162. " * 3,
    "Retrieval augmented generation reads long documents, and a small draft model decides. " * 3,
    "What is the special magic number? The lazy dog does not know. " * 4,
    "A small draft model decides which tokens matter; the quick brown fox reads. " * 3,
    "The word apple is special, and the number 0123456789 is magic. " * 3,
]
# Small windows suit the tiny model and the short texts.
# The same observers with a cache and without ("auto" would switch them), so the cached oracle compares like with like.
SPECPC_KWARGS = {"window_size": 8, "kernel_size": 5, "neighbor_tokens": 6, "starting_layer_index": 1,
                 "observe_from": "window"}
KEY = "draft_rag"


def count(text: str) -> int:
    return len(tiny_tokenizer()(text, add_special_tokens=False)["input_ids"])


@dataclass
class Out:
    """One output item, whatever the framework."""

    id: str
    text: str
    metadata: dict[str, Any]
    score: float | None


class LangChainAdapter:
    argument = "documents"

    def make(self, draft: Any, **kwargs: Any) -> Any:
        from langchain_draft_rag import DraftContextCompressor

        specpc_kwargs = {**SPECPC_KWARGS, **kwargs.pop("specpc_kwargs", {})}
        return DraftContextCompressor(draft=draft, specpc_kwargs=specpc_kwargs, **kwargs)

    def inputs(self, texts: list[str]) -> list[Any]:
        from langchain_core.documents import Document

        return [
            Document(page_content=t, id=f"doc-{i}", metadata={"source": f"file{i}.txt", "retrieval_score": 1 - i / 10})
            for i, t in enumerate(texts)
        ]

    def outputs(self, docs: Any) -> list[Out]:
        return [Out(d.id, d.page_content, d.metadata, d.metadata["retrieval_score"]) for d in docs]

    def run(self, compressor: Any, items: list[Any], query: Any = QUERY) -> list[Out]:
        return self.outputs(compressor.compress_documents(items, query))

    async def arun(self, compressor: Any, items: list[Any]) -> list[Out]:
        return self.outputs(await compressor.acompress_documents(items, QUERY))

    def wrong_items(self) -> list[Any]:
        """Things passed by mistake for an item: text, the other framework's node, a dict."""
        from llama_index.core.schema import NodeWithScore, TextNode

        return ["some text", NodeWithScore(node=TextNode(text="some text")), {"page_content": "some text"}]


class LlamaIndexAdapter:
    argument = "nodes"

    def make(self, draft: Any, **kwargs: Any) -> Any:
        from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

        specpc_kwargs = {**SPECPC_KWARGS, **kwargs.pop("specpc_kwargs", {})}
        return DraftNodePostprocessor(draft=draft, specpc_kwargs=specpc_kwargs, **kwargs)

    def inputs(self, texts: list[str]) -> list[Any]:
        from llama_index.core.schema import NodeWithScore, TextNode

        return [
            NodeWithScore(node=TextNode(text=t, id_=f"doc-{i}", metadata={"source": f"file{i}.txt"}), score=1 - i / 10)
            for i, t in enumerate(texts)
        ]

    def outputs(self, nodes: Any) -> list[Out]:
        from llama_index.core.schema import MetadataMode

        return [Out(n.node.node_id, n.node.get_content(MetadataMode.NONE), n.node.metadata, n.score) for n in nodes]

    def run(self, postprocessor: Any, items: list[Any], query: Any = QUERY) -> list[Out]:
        return self.outputs(postprocessor.postprocess_nodes(items, query_str=query))

    async def arun(self, postprocessor: Any, items: list[Any]) -> list[Out]:
        return self.outputs(await postprocessor.apostprocess_nodes(items, query_str=QUERY))

    def wrong_items(self) -> list[Any]:
        """Things passed by mistake for an item: text, a bare node, the other framework's document."""
        from langchain_core.documents import Document
        from llama_index.core.schema import TextNode

        return ["some text", TextNode(text="some text"), Document(page_content="some text")]


@pytest.fixture(params=[LangChainAdapter(), LlamaIndexAdapter()], ids=["langchain", "llama_index"])
def adapter(request):
    return request.param


def test_preserves_ids_metadata_order_and_scores(adapter, tiny_draft):
    expected = SpecPC(draft=tiny_draft, budget=40, **SPECPC_KWARGS).compress(QUERY, TEXTS).documents
    out = adapter.run(adapter.make(tiny_draft, budget=40), adapter.inputs(TEXTS))
    assert [o.id for o in out] == [f"doc-{i}" for i in range(len(TEXTS))]
    assert [o.score for o in out] == pytest.approx([1 - i / 10 for i in range(len(TEXTS))])
    assert [o.text for o in out] == [d.text for d in expected]
    for i, (o, d) in enumerate(zip(out, expected)):
        assert o.metadata["source"] == f"file{i}.txt"
        details = o.metadata[KEY]
        assert (details["kept_tokens"], details["original_tokens"]) == (d.kept_tokens, d.original_tokens)
        assert [tuple(s) for s in details["spans"]] == d.spans
        assert details["score"] == pytest.approx(d.score)
        assert details["dropped"] is d.dropped


@pytest.mark.parametrize("budget", [12, 40, 100])
def test_budget_is_respected_across_all_documents(adapter, tiny_draft, budget):
    out = adapter.run(adapter.make(tiny_draft, budget=budget), adapter.inputs(TEXTS))
    assert len(out) == len(TEXTS)
    assert sum(count(o.text) for o in out) <= budget
    assert sum(o.metadata[KEY]["kept_tokens"] for o in out) <= budget
    assert sum(o.metadata[KEY]["original_tokens"] for o in out) == sum(count(t) for t in TEXTS)
    assert any(o.text != t for o, t in zip(out, TEXTS))


def test_documents_within_budget_come_back_unchanged(adapter, tiny_draft):
    out = adapter.run(adapter.make(tiny_draft, budget=10_000), adapter.inputs(TEXTS))
    assert [o.text for o in out] == TEXTS


def test_empty_input_returns_empty_without_loading_the_model(adapter, monkeypatch):
    import draft_rag.specpc

    def no_load(name, **kwargs):
        raise AssertionError("an empty input must not load the draft model")

    monkeypatch.setattr(draft_rag.specpc, "load_model", no_load)
    compressor = adapter.make("some-draft", budget=40, cache=DraftCache())
    assert adapter.run(compressor, []) == []
    assert asyncio.run(adapter.arun(compressor, [])) == []
    compressor.warm([])


def test_wrong_inputs_raise_errors_that_name_the_argument(adapter, tiny_draft):
    compressor = adapter.make(tiny_draft, budget=40)
    items = adapter.inputs(TEXTS[:2])
    name = adapter.argument
    for not_a_list in (None, {"a": items[0]}, items[0], "some text", *adapter.wrong_items()[1:2]):
        with pytest.raises(TypeError, match=rf"^{name} must be a list of .* got {type(not_a_list).__name__}; wrap"):
            adapter.run(compressor, not_a_list)
    for wrong in adapter.wrong_items():
        with pytest.raises(TypeError, match=rf"^{name}\[1\] must be a .* got {type(wrong).__name__}; wrap"):
            adapter.run(compressor, [items[0], wrong])
    for query, error in ((42, TypeError), (b"question", TypeError), ("", ValueError), ("  \n", ValueError)):
        with pytest.raises(error, match=r"query(_str)? (must be a string|is empty)"):
            adapter.run(compressor, items, query=query)


def test_settings_changed_after_the_first_call_take_effect(adapter, tiny_draft):
    compressor = adapter.make(tiny_draft, budget=100)
    adapter.run(compressor, adapter.inputs(TEXTS))
    compressor.budget = 12
    assert adapter.run(compressor, adapter.inputs(TEXTS)) == adapter.run(
        adapter.make(tiny_draft, budget=12), adapter.inputs(TEXTS)
    )
    compressor.specpc_kwargs["neighbor_tokens"] = 2  # changed in place, not replaced
    changed = adapter.run(compressor, adapter.inputs(TEXTS))
    fresh = SpecPC(draft=tiny_draft, budget=12, **{**SPECPC_KWARGS, "neighbor_tokens": 2})
    assert [o.text for o in changed] == fresh.compress(QUERY, TEXTS).texts


def test_empty_and_whitespace_documents_are_never_dropped(adapter, tiny_draft):
    texts = ["", *TEXTS[:3], "   \n ", *TEXTS[3:]]
    for budget in (6, 10_000):
        out = adapter.run(adapter.make(tiny_draft, budget=budget, drop_empty=True), adapter.inputs(texts))
        ids = [o.id for o in out]
        assert "doc-0" in ids and "doc-4" in ids
        assert all(not o.metadata[KEY]["dropped"] for o in out)
        blank = [o for o in out if o.id in ("doc-0", "doc-4")]
        assert all(not o.text.strip() for o in blank)


def test_document_with_nothing_kept_is_reported_or_dropped_when_configured(adapter, tiny_draft):
    # Six-token neighbourhoods and a six-token budget can reach at most two documents.
    kept_all = adapter.run(adapter.make(tiny_draft, budget=6), adapter.inputs(TEXTS))
    assert [o.id for o in kept_all] == [f"doc-{i}" for i in range(len(TEXTS))]
    dropped = [o for o in kept_all if o.metadata[KEY]["dropped"]]
    assert len(dropped) >= len(TEXTS) - 2
    assert all(o.text == "" and o.metadata[KEY]["kept_tokens"] == 0 for o in dropped)

    survivors = adapter.run(adapter.make(tiny_draft, budget=6, drop_empty=True), adapter.inputs(TEXTS))
    assert [o.id for o in survivors] == [o.id for o in kept_all if not o.metadata[KEY]["dropped"]]
    assert [o.text for o in survivors] == [o.text for o in kept_all if o.text]


def test_async_equals_sync(adapter, tiny_draft):
    compressor = adapter.make(tiny_draft, budget=30)
    assert asyncio.run(adapter.arun(compressor, adapter.inputs(TEXTS))) == adapter.run(
        compressor, adapter.inputs(TEXTS)
    )


def test_fifty_concurrent_calls_on_one_shared_instance(adapter, tiny_draft):
    compressor = adapter.make(tiny_draft, budget=30)
    reference = adapter.run(compressor, adapter.inputs(TEXTS))

    async def many() -> list[list[Out]]:
        return await asyncio.gather(*(adapter.arun(compressor, adapter.inputs(TEXTS)) for _ in range(50)))

    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda _: adapter.run(compressor, adapter.inputs(TEXTS)), range(50)))
    assert all(result == reference for result in asyncio.run(many()))
    assert all(result == reference for result in threaded)


def test_async_call_does_not_block_the_event_loop(adapter, tiny_draft):
    compressor = adapter.make(tiny_draft, budget=30)
    adapter.run(compressor, adapter.inputs(TEXTS))  # build and warm up outside the measurement

    async def call() -> None:
        await adapter.arun(compressor, adapter.inputs(TEXTS * 8))

    ticks, seconds = asyncio.run(ticks_during(call))
    assert_loop_kept_ticking(ticks, seconds)


def test_construction_loads_no_model(adapter, tiny_draft, monkeypatch):
    import draft_rag.specpc

    loads = []

    def fake_load(name, **kwargs):
        loads.append(name)
        return tiny_draft

    monkeypatch.setattr(draft_rag.specpc, "load_model", fake_load)
    compressor = adapter.make("some-draft", budget=30)
    assert loads == []
    adapter.run(compressor, adapter.inputs(TEXTS))
    assert loads == ["some-draft"]


def test_warmed_cache_serves_the_next_compression(adapter, tiny_draft):
    cache = DraftCache()
    compressor = adapter.make(tiny_draft, budget=30, cache=cache)
    assert compressor.specpc.cache is cache
    compressor.warm(adapter.inputs([*TEXTS, " \n"]))
    warmed = cache.stats
    assert warmed.entries == len(TEXTS) + 1  # the non-blank documents and the chat template's opening
    out = adapter.run(compressor, adapter.inputs(TEXTS))
    assert cache.stats.misses == warmed.misses
    assert cache.stats.hits > warmed.hits
    assert sum(count(o.text) for o in out) <= 30
    assert sum(o.metadata[KEY]["kept_tokens"] for o in out) <= 30


def test_cached_single_document_keeps_what_the_joint_reading_keeps(adapter, tiny_draft):
    cached = adapter.make(tiny_draft, budget=12, cache=DraftCache())
    joint = adapter.make(tiny_draft, budget=12, specpc_kwargs={"reading": "joint"})  # the whole-prompt prefill
    expected = adapter.run(joint, adapter.inputs(TEXTS[1:2]))
    for _ in range(2):  # the first call fills the cache, the second reads the document from it
        out = adapter.run(cached, adapter.inputs(TEXTS[1:2]))
        assert [(o.text, o.metadata[KEY]["spans"]) for o in out] == [
            (o.text, o.metadata[KEY]["spans"]) for o in expected
        ]
    assert cached.cache.stats.hits > 0


def test_the_same_cache_keeps_the_specpc_and_another_rebuilds_it(adapter, tiny_draft):
    cache = DraftCache()
    compressor = adapter.make(tiny_draft, budget=30, cache=cache)
    built = compressor.specpc
    compressor.cache = cache
    assert compressor.specpc is built
    compressor.cache = other = DraftCache()
    assert compressor.specpc is not built
    assert compressor.specpc.cache is other
    compressor.cache = None
    assert compressor.specpc.cache is None


def test_warming_needs_a_cache_and_a_list(adapter, tiny_draft):
    with pytest.raises(ValueError, match=r"warm needs a draft cache.*cache=DraftCache\(\)"):
        adapter.make(tiny_draft, budget=30).warm(adapter.inputs(TEXTS))
    compressor = adapter.make(tiny_draft, budget=30, cache=DraftCache())
    with pytest.raises(TypeError, match=rf"^{adapter.argument} must be a list of .* got str; wrap"):
        compressor.warm("some text")
    with pytest.raises(ValueError, match=r"cache must be a draft_rag.DraftCache, got dict; pass cache=DraftCache\(\)"):
        adapter.make(tiny_draft, budget=30, cache={})

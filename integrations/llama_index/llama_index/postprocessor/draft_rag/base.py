"""SpecPC as a LlamaIndex node postprocessor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr, field_serializer, field_validator, model_validator
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import (
    BaseNode,
    ImageNode,
    MediaResource,
    MetadataMode,
    Node,
    NodeWithScore,
    QueryBundle,
    TextNode,
)

from draft_rag.adapters import (
    Lazy,
    SpecPCAdapter,
    check_keywords,
    check_list,
    check_picklable,
    check_query,
    checked_cache,
    require_cache,
)
from draft_rag.models import DEFAULT_DRAFT

if TYPE_CHECKING:
    from draft_rag import CompressedDocument, DraftCache, SpecPC

# What a caller may pass alone where a list is wanted: named as such in the error, not iterated.
_NOT_LISTS = (dict, BaseNode, NodeWithScore)


class DraftNodePostprocessor(SpecPCAdapter, BaseNodePostprocessor):
    """Shorten retrieved nodes to what a small draft model attends to when reading the query.

    Runs :class:`draft_rag.SpecPC` over the text of all text nodes at once, so that together they keep at
    most ``budget`` tokens. Each text node comes back, in input order, as a new ``NodeWithScore`` holding a
    copy of the node: id, metadata, relationships and retrieval score stay; the text becomes the kept spans
    joined by ``" … "`` (it is replaced only when something was cut); and the metadata gets a
    ``"draft_rag"`` entry (``kept_tokens``, ``original_tokens``, ``spans``, ``score``, ``dropped``) that is
    excluded from what the LLM and the embedder read. The caller's ``NodeWithScore`` and node objects are
    not changed, so a retriever that caches its nodes keeps their full text, and a node listed twice comes
    back twice, each copy shortened on its own.

    A node of which nothing was kept comes back with empty text (``dropped=True``) unless
    ``drop_empty=True`` leaves it out. Empty and whitespace-only nodes had nothing to keep: they are never
    marked dropped nor left out (their text may come back empty when the others are compressed). Nodes that
    are not text (``ImageNode``, a multimodal ``Node`` or ``Document`` with an image, audio or video) are
    passed through as they are, in their place, and do not count against the budget. An empty list gives an
    empty list without loading the model. Settings changed after the first call (``budget``, ``draft``,
    ``specpc_kwargs``...) apply from the next call on. An unknown keyword at construction raises ``TypeError``
    naming it and the closest setting, rather than leaving a default in place.

    The draft model is loaded on first use, not at construction; one instance may serve many threads and
    tasks, and ``apostprocess_nodes`` runs the work in a worker thread so the event loop keeps running.
    Pickled (e.g. for worker processes), it carries its settings, not the loaded model: each process loads the
    draft itself, so the draft must be given by name or path there, not as a loaded model.

    Example:
        .. code-block:: python

            from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

            query_engine = index.as_query_engine(
                similarity_top_k=8, node_postprocessors=[DraftNodePostprocessor(budget=512)]
            )

    Draft cache:
        With ``cache=DraftCache()`` each node's text is read by the draft once, on its own, and reused by later
        queries, which then run only the question through the draft. :meth:`warm`, or a
        :class:`~llama_index.postprocessor.draft_rag.DraftCacheWarmer` as the last step of the ingestion,
        reads the nodes ahead of the first question.

        .. code-block:: python

            from draft_rag import DraftCache
            from llama_index.core import Document, VectorStoreIndex
            from llama_index.core.embeddings import MockEmbedding
            from llama_index.core.node_parser import SentenceSplitter
            from llama_index.postprocessor.draft_rag import DraftCacheWarmer, DraftNodePostprocessor

            postprocessor = DraftNodePostprocessor(budget=512, cache=DraftCache())
            index = VectorStoreIndex.from_documents(
                [Document(text="A long report...")],
                embed_model=MockEmbedding(embed_dim=8),
                transformations=[SentenceSplitter(chunk_size=512), DraftCacheWarmer(postprocessor)],
            )
            retriever = index.as_retriever(similarity_top_k=8)
            nodes = postprocessor.postprocess_nodes(retriever.retrieve("Who wrote it?"), query_str="Who wrote it?")
            postprocessor.cache.stats  # hits: the nodes were not read again
    """

    draft: Any = Field(
        default=DEFAULT_DRAFT,
        description="Draft model: a packaged name, a Hugging Face id, a local path, or a LoadedModel.",
    )
    budget: int = Field(default=1024, gt=0, description="Most tokens of node text kept over all nodes.")
    target_tokenizer: Any = Field(
        default=None,
        description="Tokenizer (or its name/path) of the model that reads the result; None counts draft tokens.",
    )
    drop_empty: bool = Field(default=False, description="Leave out nodes of which nothing was kept.")
    metadata_key: str = Field(default="draft_rag", description="Metadata entry for the compression details.")
    specpc_kwargs: dict[str, Any] = Field(default_factory=dict, description="More draft_rag.SpecPC settings.")
    cache: Any = Field(
        default=None,
        description="A draft_rag.DraftCache of each node's draft K/V, reused across queries (None: no cache).",
    )

    _specpc: Lazy[SpecPC] = PrivateAttr(default_factory=Lazy)

    @classmethod
    def class_name(cls) -> str:
        return "DraftNodePostprocessor"

    @model_validator(mode="before")
    @classmethod
    def _check_keywords(cls, data: Any) -> Any:
        # LlamaIndex's to_dict() and to_json() add the class name to the settings.
        check_keywords(cls.__name__, data, cls.model_fields, ignored=("class_name",))
        return data

    def __getstate__(self) -> dict[str, Any]:
        check_picklable(self, "draft")
        return super().__getstate__()

    @field_validator("cache")
    @classmethod
    def _check_cache_type(cls, cache: Any) -> DraftCache | None:
        return checked_cache(cache)

    @field_serializer("cache")
    def _cache_settings(self, cache: DraftCache | None) -> str | None:
        # Its settings, not its entries: to_dict() stays small, and so does an IngestionPipeline's hash of it.
        return None if cache is None else repr(cache)

    def warm(self, nodes: Sequence[BaseNode | NodeWithScore]) -> None:
        """Read the text of ``nodes`` into :attr:`cache` now, so that the first question over them is fast too.

        Reads what :meth:`postprocess_nodes` compresses: each text node's text without metadata; nodes that
        are not text, whitespace-only and already cached ones are skipped. Shows a progress bar on a terminal
        (``specpc_kwargs={"progress": True}`` forces it).

        Raises:
            ValueError: no ``cache`` is set, or a node is longer than the draft model's context.
            TypeError: ``nodes`` is not a list of nodes.
        """
        require_cache(self, "DraftNodePostprocessor.warm")
        check_nodes(nodes)
        bare = (item.node if isinstance(item, NodeWithScore) else item for item in nodes)
        self.specpc.warm([text for node in bare if (text := node_text(node)) is not None])

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        query = check_inputs(nodes, query_bundle)
        texts = {i: text for i, item in enumerate(nodes) if (text := node_text(item.node)) is not None}
        if not texts:
            return list(nodes)
        compressed = dict(zip(texts, self.specpc.compress(query, list(texts.values())).documents))
        out = []
        for i, item in enumerate(nodes):
            kept = compressed.get(i)
            if kept is None:
                out.append(item)
            elif not (self.drop_empty and kept.dropped):
                out.append(item.model_copy(update={"node": self._shortened(item.node, texts[i], kept)}))
        return out

    def _shortened(self, node: BaseNode, text: str, kept: CompressedDocument) -> BaseNode:
        """A copy of ``node`` with the kept text (when something was cut) and the details in its metadata."""
        key = self.metadata_key
        update: dict[str, Any] = {
            "metadata": {**node.metadata, key: kept.as_metadata()},
            # The details are for the caller; the LLM and the embedder should not read them.
            "excluded_llm_metadata_keys": [*(k for k in node.excluded_llm_metadata_keys if k != key), key],
            "excluded_embed_metadata_keys": [*(k for k in node.excluded_embed_metadata_keys if k != key), key],
        }
        if kept.text != text:
            if isinstance(node, TextNode):
                update["text"] = kept.text
            else:
                # A Node's text resource may carry a path, URL or mimetype: keep them, change the text only.
                resource = getattr(node, "text_resource", None) or MediaResource()
                update["text_resource"] = resource.model_copy(update={"text": kept.text})
        return node.model_copy(update=update)


def node_text(node: BaseNode) -> str | None:
    """The text of a text node; None for a node that holds an image, audio or video (left as it is)."""
    if isinstance(node, ImageNode):
        return None
    if isinstance(node, TextNode) or (
        isinstance(node, Node) and not (node.image_resource or node.audio_resource or node.video_resource)
    ):
        return node.get_content(metadata_mode=MetadataMode.NONE)
    return None


def check_nodes(nodes: object) -> None:
    """Raise a TypeError that names the wrong argument when ``nodes`` is not a list of nodes."""
    check_list(
        nodes, "nodes", (BaseNode, NodeWithScore), what="nodes", item="a node or a NodeWithScore",
        single_hint="wrap a single node as [node]", item_hint="wrap text as TextNode(text=text)",
        not_lists=_NOT_LISTS,
    )


def check_inputs(nodes: object, query_bundle: object) -> str:
    """The query text; a TypeError or ValueError naming the wrong argument and how to pass it otherwise."""
    check_list(
        nodes, "nodes", NodeWithScore, what="NodeWithScore", item="a NodeWithScore",
        single_hint="wrap a single node as [NodeWithScore(node=node)]",
        item_hint="wrap a node as NodeWithScore(node=node, score=score)", not_lists=_NOT_LISTS,
    )
    if query_bundle is None:
        msg = "DraftNodePostprocessor needs the query: pass query_bundle or query_str."
        raise ValueError(msg)
    if not isinstance(query_bundle, QueryBundle):
        msg = (
            f"query_bundle must be a QueryBundle, got {type(query_bundle).__name__}; "
            "pass the question as query_str=... or query_bundle=QueryBundle(question)."
        )
        raise TypeError(msg)
    return check_query(query_bundle.query_str, "query_str", "nodes")

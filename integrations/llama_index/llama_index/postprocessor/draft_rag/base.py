"""SpecPC as a LlamaIndex node postprocessor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from draft_rag.models import DEFAULT_DRAFT, Lazy

if TYPE_CHECKING:
    from draft_rag import SpecPC


class DraftNodePostprocessor(BaseNodePostprocessor):
    """Shorten retrieved nodes to what a small draft model attends to when reading the query.

    Runs :class:`draft_rag.SpecPC` over the text of all nodes at once, so that together they keep at most
    ``budget`` tokens, and shortens each node in place: node ids, metadata, relationships and retrieval
    scores stay, the text becomes the kept spans joined by ``" … "``. The node's metadata gets a
    ``"draft_rag"`` entry (``kept_tokens``, ``original_tokens``, ``spans``, ``score``, ``dropped``) that is
    excluded from what the LLM and the embedder read. A node of which nothing was kept stays with empty
    text (``dropped=True``) unless ``drop_empty=True`` leaves it out.

    The draft model is loaded on first use, not at construction; one instance may serve many threads and
    tasks, and ``apostprocess_nodes`` runs the work in a worker thread so the event loop keeps running.

    Example:
        .. code-block:: python

            from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

            query_engine = index.as_query_engine(
                similarity_top_k=8, node_postprocessors=[DraftNodePostprocessor(budget=512)]
            )
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

    _specpc: Lazy[SpecPC] = PrivateAttr(default_factory=Lazy)

    @classmethod
    def class_name(cls) -> str:
        return "DraftNodePostprocessor"

    @property
    def specpc(self) -> SpecPC:
        """The underlying :class:`draft_rag.SpecPC`, built on first access (its model loads on first use)."""
        from draft_rag import SpecPC

        return self._specpc.get(
            lambda: SpecPC(
                draft=self.draft, budget=self.budget, target_tokenizer=self.target_tokenizer,
                **self.specpc_kwargs,
            )
        )

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if query_bundle is None:
            msg = "DraftNodePostprocessor needs the query: pass query_bundle or query_str."
            raise ValueError(msg)
        texts = [item.node.get_content(metadata_mode=MetadataMode.NONE) for item in nodes]
        result = self.specpc.compress(query_bundle.query_str, texts)
        kept_nodes = []
        for item, kept in zip(nodes, result.documents):
            if self.drop_empty and kept.dropped:
                continue
            node = item.node
            node.set_content(kept.text)
            node.metadata[self.metadata_key] = kept.as_metadata()
            # The details are for the caller; the LLM and the embedder should not read them.
            for excluded in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
                if self.metadata_key not in excluded:
                    excluded.append(self.metadata_key)
            kept_nodes.append(item)
        return kept_nodes

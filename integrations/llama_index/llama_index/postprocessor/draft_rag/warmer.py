"""A LlamaIndex transformation that reads nodes into a postprocessor's draft cache while indexing."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr, model_validator
from llama_index.core.schema import BaseNode, TransformComponent
from llama_index.postprocessor.draft_rag.base import DraftNodePostprocessor

from draft_rag.adapters import require_cache


class DraftCacheWarmer(TransformComponent):
    """Read nodes into a :class:`DraftNodePostprocessor`'s draft cache as they are ingested.

    Calling it runs :meth:`DraftNodePostprocessor.warm` over the nodes and returns them unchanged (the same
    objects), so it fits as the last transformation of an ``IngestionPipeline`` or of
    ``VectorStoreIndex.from_documents``: the queries made later find every node already read by the draft,
    which then reads only the question. It reads what the postprocessor compresses: each text node's text
    without metadata; nodes that are not text, whitespace-only and already cached ones are skipped.
    ``acall`` does the work in a worker thread, so the event loop keeps running. Shows a progress bar on a
    terminal (the postprocessor's ``specpc_kwargs={"progress": True}`` forces it).

    A pipeline with an ingestion cache skips a step whose output it already holds, this one included, so
    nodes ingested again from that cache are read by the draft at their first query instead (or found in the
    ``DraftCache``'s ``directory``, when it has one).

    ``IngestionPipeline(num_workers=...)`` sends a pickled copy of the warmer to each worker process. The copy
    carries the postprocessor's settings, not its loaded model nor the entries in memory: each worker loads the
    draft itself (so give it by name or path, not as a loaded model) and writes what it reads into the
    ``DraftCache``'s ``directory``, where the postprocessor finds it. The cache must therefore have a
    ``directory``: a warmer called in another process than the one that made it raises ``ValueError`` without
    one, since the entries would stay in that process.

    Draft cache:
        .. code-block:: python

            from draft_rag import DraftCache
            from llama_index.core import Document, VectorStoreIndex
            from llama_index.core.embeddings import MockEmbedding
            from llama_index.core.ingestion import IngestionPipeline
            from llama_index.core.llms import MockLLM
            from llama_index.core.node_parser import SentenceSplitter
            from llama_index.postprocessor.draft_rag import DraftCacheWarmer, DraftNodePostprocessor

            postprocessor = DraftNodePostprocessor(budget=512, cache=DraftCache())
            embed_model = MockEmbedding(embed_dim=8)
            pipeline = IngestionPipeline(
                transformations=[SentenceSplitter(chunk_size=512), embed_model, DraftCacheWarmer(postprocessor)]
            )
            nodes = pipeline.run(documents=[Document(text="A long report...")])
            index = VectorStoreIndex(nodes, embed_model=embed_model)
            query_engine = index.as_query_engine(  # MockLLM: put the LLM that answers here
                llm=MockLLM(), similarity_top_k=8, node_postprocessors=[postprocessor]
            )
            response = query_engine.query("Who wrote it?")
            postprocessor.cache.stats  # hits: the nodes were not read again
    """

    postprocessor: DraftNodePostprocessor = Field(
        description="The postprocessor that will compress the retrieved nodes; it must have a cache."
    )

    # Where the warmer was made: a copy called in another process can fill only a cache on disk.
    _origin_pid: int = PrivateAttr(default_factory=os.getpid)

    def __init__(self, postprocessor: DraftNodePostprocessor) -> None:
        # mypy types the base's __init__ by the base's own fields (none); pydantic takes this one's by keyword.
        super().__init__(postprocessor=postprocessor)  # type: ignore[call-arg]

    @classmethod
    def class_name(cls) -> str:
        return "DraftCacheWarmer"

    @model_validator(mode="after")
    def _check_cache(self) -> DraftCacheWarmer:
        require_cache(self.postprocessor, "DraftCacheWarmer")
        return self

    # pydantic's own pickling, not LlamaIndex's: that one drops a field that fails to pickle (the postprocessor,
    # this warmer's only setting) and runs __init__ again on loading (which would reset _origin_pid).
    def __getstate__(self) -> dict[str, Any]:
        return BaseModel.__getstate__(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        BaseModel.__setstate__(self, state)

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Read the text of ``nodes`` into the postprocessor's draft cache and return them unchanged.

        Raises:
            ValueError: the postprocessor has no ``cache``, or a node is longer than the draft model's context,
                or the warmer runs in another process than the one that made it and the cache has no directory.
            TypeError: ``nodes`` is not a list of nodes.
        """
        cache = self.postprocessor.cache
        if os.getpid() != self._origin_pid and cache is not None and cache.directory is None:
            msg = (
                "DraftCacheWarmer runs in another process than the one that made it (IngestionPipeline "
                "num_workers > 1 runs it in worker processes), and its DraftCache has no directory: what it reads "
                "here would never reach the postprocessor. Give the cache a directory that every process shares: "
                "DraftCache(directory=...)."
            )
            raise ValueError(msg)
        self.postprocessor.warm(nodes)
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)

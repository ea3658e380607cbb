"""A LangChain document transformer that reads documents into a compressor's draft cache while indexing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.documents import BaseDocumentTransformer, Document

from draft_rag.adapters import require_cache
from langchain_draft_rag.compressors import DraftContextCompressor


class DraftCacheWarmer(BaseDocumentTransformer):
    """Read documents into a :class:`~langchain_draft_rag.DraftContextCompressor`'s draft cache as they are indexed.

    ``transform_documents`` runs :meth:`DraftContextCompressor.warm` over the documents and returns them
    unchanged (the same objects), so it fits between a text splitter and a vector store: the questions asked
    later find every chunk already read by the draft, which then reads only the question. Whitespace-only and
    already cached documents are skipped. ``atransform_documents`` does the work in a worker thread, so the
    event loop keeps running. Shows a progress bar on a terminal (the compressor's
    ``specpc_kwargs={"progress": True}`` forces it).

    Args:
        compressor: the compressor that will shorten the retrieved documents; it must have a ``cache``.

    Draft cache:
        .. code-block:: python

            from draft_rag import DraftCache
            from langchain_core.documents import Document
            from langchain_core.embeddings import DeterministicFakeEmbedding
            from langchain_core.vectorstores import InMemoryVectorStore
            from langchain_text_splitters import RecursiveCharacterTextSplitter
            from langchain_draft_rag import DraftCacheWarmer, DraftContextCompressor

            compressor = DraftContextCompressor(budget=512, cache=DraftCache())
            warmer = DraftCacheWarmer(compressor)
            splitter = RecursiveCharacterTextSplitter(chunk_size=2000, chunk_overlap=0)
            store = InMemoryVectorStore(DeterministicFakeEmbedding(size=256))
            raw = [Document(page_content="A long report...")]
            store.add_documents(warmer.transform_documents(splitter.split_documents(raw)))
    """

    def __init__(self, compressor: DraftContextCompressor) -> None:
        if not isinstance(compressor, DraftContextCompressor):
            msg = (
                f"compressor must be a DraftContextCompressor, got {type(compressor).__name__}; "
                "pass the one that will compress the retrieved documents."
            )
            raise TypeError(msg)
        require_cache(compressor, "DraftCacheWarmer")
        self.compressor = compressor

    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        """Read ``documents`` into the compressor's draft cache and return them unchanged.

        Raises:
            ValueError: the compressor has no ``cache``, or a document is longer than the draft model's context.
            TypeError: ``documents`` is not a list of ``Document`` objects.
        """
        self.compressor.warm(documents)
        return documents

"""LangChain integration of draft-rag: SpecPC document compression and a SpecKV chat model."""

from langchain_draft_rag.chat_models import ChatDraftRAG
from langchain_draft_rag.compressors import DraftContextCompressor
from langchain_draft_rag.warmers import DraftCacheWarmer

__all__ = ["ChatDraftRAG", "DraftCacheWarmer", "DraftContextCompressor"]

"""LlamaIndex node postprocessor of draft-rag: SpecPC prompt compression, and a draft cache warmer for ingestion."""

from llama_index.postprocessor.draft_rag.base import DraftNodePostprocessor
from llama_index.postprocessor.draft_rag.warmer import DraftCacheWarmer

__all__ = ["DraftCacheWarmer", "DraftNodePostprocessor"]

"""LlamaIndex node postprocessor of draft-rag: SpecPC prompt compression."""

from llama_index.postprocessor.draft_rag.base import DraftNodePostprocessor

__all__ = ["DraftNodePostprocessor"]

"""LlamaIndex LLM of draft-rag: a local target model with SpecKV generation."""

from llama_index.llms.draft_rag.base import DraftRAGLLM

__all__ = ["DraftRAGLLM"]

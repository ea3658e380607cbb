"""Retrieval-augmented QA over long public-domain texts with a LlamaIndex query engine, offline.

VectorStoreIndex (MiniLM embeddings, default in-memory store) -> DraftNodePostprocessor (SpecPC, 0.5B draft)
-> DraftRAGLLM (the packaged 1.5B target).

The postprocessor is the only addition to an ordinary query engine:
``index.as_query_engine(node_postprocessors=[DraftNodePostprocessor(...)], llm=...)``.
Run ``--no-compress`` to answer from the full retrieved chunks instead.

    python examples/llama_index_rag.py
    python examples/llama_index_rag.py --question "How did Frederick Douglass learn to read?" --budget 384
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Any

from llama_index.core import (
    Settings,
    SimpleDirectoryReader,
    StorageContext,
    VectorStoreIndex,
    load_index_from_storage,
)
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import MetadataMode

DATA_DIR = Path(__file__).resolve().parent / "data"
QUESTION = "How should a saboteur slow down meetings and committees?"


class MiniLMEmbedding(BaseEmbedding):
    """The packaged all-MiniLM-L6-v2 sentence-transformers model as a LlamaIndex embedding."""

    _model: Any = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        from sentence_transformers import SentenceTransformer

        from draft_rag.models import embedding_model_path

        super().__init__(model_name="all-MiniLM-L6-v2", **kwargs)
        self._model = SentenceTransformer(str(embedding_model_path()), device="cpu")

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._model.encode(texts, batch_size=32, normalize_embeddings=True).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._get_text_embedding(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


def build_index(data_dir: Path, chunk_tokens: int) -> VectorStoreIndex:
    """A MiniLM vector index of the chunks; it is persisted, so later runs skip indexing."""
    from draft_rag.models import cache_dir

    documents = SimpleDirectoryReader(str(data_dir), required_exts=[".txt"], filename_as_id=True).load_data()
    digest = hashlib.sha256(f"{chunk_tokens}".encode())
    for document in documents:
        digest.update(document.text.encode())
    persist_dir = cache_dir() / "examples" / f"llama-index-{digest.hexdigest()[:16]}"
    embed_model = MiniLMEmbedding()
    if persist_dir.exists():
        return load_index_from_storage(StorageContext.from_defaults(persist_dir=str(persist_dir)),
                                       embed_model=embed_model)
    index = VectorStoreIndex.from_documents(
        documents, embed_model=embed_model,
        transformations=[SentenceSplitter(chunk_size=chunk_tokens, chunk_overlap=20)],
    )
    index.storage_context.persist(persist_dir=str(persist_dir))
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--budget", type=int, default=512, help="context tokens kept by SpecPC (default 512)")
    parser.add_argument("--top-k", type=int, default=8, help="chunks retrieved (default 8)")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="chunk size in tokens (default 256)")
    parser.add_argument("--no-compress", action="store_true", help="send the full retrieved chunks")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="SpecPC draft model")
    parser.add_argument("--method", default="full", choices=["full", "speckv", "snapkv", "streamingllm"],
                        help="KV-cache method of the local target (default full)")
    parser.add_argument("--max-tokens", type=int, default=64, help="most answer tokens (default 64)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)

    from llama_index.llms.draft_rag import DraftRAGLLM
    from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

    from draft_rag.models import DEFAULT_TARGET, load_model

    target = load_model(DEFAULT_TARGET)

    def count_tokens(text: str) -> int:
        return len(target.tokenizer.encode(text))

    # Chunk sizes and prompt fitting count the target's tokens (LlamaIndex's default tokenizer is GPT's).
    Settings.tokenizer = target.tokenizer.encode

    started = time.perf_counter()
    index = build_index(args.data_dir, args.chunk_tokens)
    print(f"Indexed {len(index.docstore.docs)} chunks of {args.data_dir} in {time.perf_counter() - started:.1f} s")

    postprocessors = [] if args.no_compress else [
        DraftNodePostprocessor(draft=args.draft, budget=args.budget, target_tokenizer=target.tokenizer)
    ]
    llm = DraftRAGLLM(target=target, draft=args.draft, method=args.method, max_new_tokens=args.max_tokens)
    query_engine = index.as_query_engine(similarity_top_k=args.top_k, node_postprocessors=postprocessors, llm=llm)

    started = time.perf_counter()
    response = query_engine.query(args.question)
    seconds = time.perf_counter() - started

    print(f"\nQuestion: {args.question}\n\nAnswer: {str(response).strip()}\n\nSources:")
    before = after = 0
    for item in response.source_nodes:
        text = item.node.get_content(metadata_mode=MetadataMode.NONE)
        details = item.node.metadata.get("draft_rag", {})
        kept = details.get("kept_tokens", count_tokens(text))
        before += details.get("original_tokens", kept)
        after += kept
        print(f"  - {item.node.metadata['file_name']} (similarity {item.score:.3f}): {kept} tokens"
              + (" (dropped)" if details.get("dropped") else ""))
    print(f"\nContext tokens: {before} retrieved -> {after} sent to the model")
    print(f"End-to-end: {seconds:.1f} s")


if __name__ == "__main__":
    main()

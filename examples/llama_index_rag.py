"""Retrieval-augmented QA over long public-domain texts with a LlamaIndex query engine, offline.

VectorStoreIndex (MiniLM embeddings, default in-memory store) -> DraftNodePostprocessor (SpecPC, 0.5B draft)
-> DraftRAGLLM (the packaged 1.5B target).

The postprocessor is the only addition to an ordinary query engine:
``index.as_query_engine(node_postprocessors=[DraftNodePostprocessor(...)], llm=...)``.
Run ``--no-compress`` to answer from the full retrieved chunks instead. Three related questions are asked by
default; the postprocessor's draft cache keeps the draft's K/V of every chunk it has read, so a later question
that retrieves some of the same chunks compresses faster.

    python examples/llama_index_rag.py
    python examples/llama_index_rag.py --question "How did Frederick Douglass learn to read?" --budget 384
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable
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
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.prompts import ChatPromptTemplate
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

DATA_DIR = Path(__file__).resolve().parent / "data"
QUESTIONS = (
    "How should a saboteur slow down meetings and committees?",
    "How should a saboteur treat the orders of managers and supervisors?",
    "How can office workers sabotage paperwork and correspondence?",
)
# A small local target answers best when told to stay with the context and keep it short, and when it reads the
# question before the context as well as after it (it then answers from the passage that holds the answer).
QA_PROMPT = ChatPromptTemplate([
    ChatMessage(role=MessageRole.SYSTEM,
                content="Answer the question from the context only, in two or three sentences."),
    ChatMessage(role=MessageRole.USER,
                content="Question: {query_str}\n\nContext:\n{context_str}\n\nQuestion: {query_str}"),
])


class MiniLMEmbedding(BaseEmbedding):
    """The packaged all-MiniLM-L6-v2 sentence-transformers model as a LlamaIndex embedding."""

    _model: Any = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        from sentence_transformers import SentenceTransformer

        from draft_rag.packaged import embedding_model_path

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
    from draft_rag.packaged import cache_dir

    documents = SimpleDirectoryReader(str(data_dir), required_exts=[".txt"], filename_as_id=True).load_data()
    for document in documents:
        # The model and the embeddings see each chunk's file name (as the LangChain example shows its source),
        # not the local path, size or dates: those are noise that costs tokens, leaks the machine's directory
        # layout into the prompt, and would make retrieval depend on where and when the books were checked out.
        hidden = [key for key in document.metadata if key != "file_name"]
        document.excluded_llm_metadata_keys = hidden
        document.excluded_embed_metadata_keys = hidden
    digest = hashlib.sha256(f"{chunk_tokens}:file_name-only:embed-file_name-only".encode())
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


def main(argv: list[str] | None = None) -> list[str]:
    """Run the example; return the answers, one per question."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", action="append", dest="questions",
                        help="a question to ask (repeatable; default: three related questions)")
    parser.add_argument("--budget", type=int, default=512, help="context tokens kept by SpecPC (default 512)")
    parser.add_argument("--top-k", type=int, default=10, help="chunks retrieved (default 10)")
    parser.add_argument("--chunk-tokens", type=int, default=200, help="chunk size in tokens (default 200)")
    parser.add_argument("--no-compress", action="store_true", help="send the full retrieved chunks")
    parser.add_argument("--no-cache", action="store_true", help="compress without the draft cache")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="SpecPC draft model")
    parser.add_argument("--method", default="full", choices=["full", "speckv", "snapkv", "streamingllm"],
                        help="KV-cache method of the local target (default full)")
    parser.add_argument("--max-tokens", type=int, default=64, help="most answer tokens (default 64)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)

    from llama_index.llms.draft_rag import DraftRAGLLM
    from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

    from draft_rag import DraftCache
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
        DraftNodePostprocessor(draft=args.draft, budget=args.budget, target_tokenizer=target.tokenizer,
                               cache=None if args.no_cache else DraftCache())
    ]
    llm = DraftRAGLLM(target=target, draft=args.draft, method=args.method, max_new_tokens=args.max_tokens)
    query_engine = index.as_query_engine(
        similarity_top_k=args.top_k, node_postprocessors=postprocessors, llm=llm, text_qa_template=QA_PROMPT
    )

    answers = []
    for question in args.questions or QUESTIONS:
        started = time.perf_counter()
        nodes = query_engine.retrieve(QueryBundle(question))  # retrieval, then the postprocessors
        retrieved = time.perf_counter()
        response = query_engine.synthesize(QueryBundle(question), nodes)
        answered = time.perf_counter()
        answers.append(str(response).strip())
        report(question, answers[-1], nodes, count_tokens)
        print(f"End-to-end: {answered - started:.1f} s (retrieval and compression {retrieved - started:.1f} s, "
              f"answer {answered - retrieved:.1f} s)")
    return answers


def report(question: str, answer: str, nodes: list[NodeWithScore], count_tokens: Callable[[str], int]) -> None:
    """Print the answer, the sources, and the context tokens before and after compression."""
    print(f"\nQuestion: {question}\n\nAnswer: {answer}\n\nSources:")
    before = after = 0
    for item in nodes:
        text = item.node.get_content(metadata_mode=MetadataMode.NONE)
        details = item.node.metadata.get("draft_rag", {})
        kept = details.get("kept_tokens", count_tokens(text))
        before += details.get("original_tokens", kept)
        after += kept
        print(f"  - {item.node.metadata['file_name']} (similarity {item.score:.3f}): {kept} tokens"
              + (" (dropped)" if details.get("dropped") else ""))
    print(f"\nContext tokens: {before} retrieved -> {after} sent to the model")


if __name__ == "__main__":
    main()

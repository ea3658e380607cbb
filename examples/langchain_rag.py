"""Retrieval-augmented QA over long public-domain texts with LangChain, offline.

retriever (MiniLM embeddings, in-memory vector store) -> DraftContextCompressor (SpecPC, 0.5B draft)
-> chat model (ChatDraftRAG: the packaged 1.5B target, or any LangChain chat model).

The compressor is the only addition to an ordinary LangChain RAG chain: it wraps the retriever in a
``ContextualCompressionRetriever``. Run ``--no-compress`` to answer from the full retrieved chunks instead.
Three related questions are asked by default; the compressor's draft cache keeps the draft's K/V of every
chunk it has read, so a later question that retrieves some of the same chunks compresses faster.

    python examples/langchain_rag.py
    python examples/langchain_rag.py --question "How did Frederick Douglass learn to read?" --budget 384
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import BaseChatModel
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

DATA_DIR = Path(__file__).resolve().parent / "data"
QUESTIONS = (
    "How should a saboteur slow down meetings and committees?",
    "How should a saboteur treat the orders of managers and supervisors?",
    "How can office workers sabotage paperwork and correspondence?",
)
# The question comes before the context as well as after it: a small target then reads the context knowing
# what it looks for, and answers from the passage that holds the answer instead of the first one that is close.
PROMPT = ChatPromptTemplate.from_messages([
    ("system", "Answer the question from the context only, in two or three sentences."),
    ("human", "Question: {question}\n\nContext:\n{context}\n\nQuestion: {question}"),
])


class MiniLMEmbeddings(Embeddings):
    """The packaged all-MiniLM-L6-v2 sentence-transformers model as LangChain embeddings."""

    def __init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        from draft_rag.packaged import embedding_model_path

        self.model = SentenceTransformer(str(embedding_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, batch_size=32, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def load_chunks(data_dir: Path = DATA_DIR, chunk_chars: int = 1200) -> list[Document]:
    """The ``.txt`` files of ``data_dir`` split into overlapping chunks of about ``chunk_chars`` characters."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_chars, chunk_overlap=100, add_start_index=True)
    documents = [
        Document(page_content=path.read_text(encoding="utf-8"), metadata={"source": path.name})
        for path in sorted(data_dir.glob("*.txt"))
    ]
    return splitter.split_documents(documents)


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(f"[{d.metadata['source']}]\n{d.page_content}" for d in docs if d.page_content)


def build_chain(retriever: BaseRetriever, llm: BaseChatModel) -> Runnable:
    """question -> {"question", "docs", "answer"}: retrieve, then answer (an AI message) from the documents."""
    answer = RunnablePassthrough.assign(context=lambda x: format_docs(x["docs"])) | PROMPT | llm
    return {"docs": retriever, "question": RunnablePassthrough()} | RunnablePassthrough.assign(answer=answer)


def report(result: dict[str, Any], seconds: float, count_tokens: Any) -> None:
    """Print the answer, the sources, and the context tokens before and after compression."""
    docs = result["docs"]
    after = sum(count_tokens(d.page_content) for d in docs)
    before = sum(d.metadata["draft_rag"]["original_tokens"] if "draft_rag" in d.metadata else
                 count_tokens(d.page_content) for d in docs)
    answer = result["answer"]
    print(f"\nQuestion: {result['question']}\n\nAnswer: {answer.content.strip()}\n\nSources:")
    for d in docs:
        kept = d.metadata.get("draft_rag", {}).get("kept_tokens", count_tokens(d.page_content))
        print(f"  - {d.metadata['source']} (chunk at char {d.metadata['start_index']}): {kept} tokens"
              + (" (dropped)" if d.metadata.get("draft_rag", {}).get("dropped") else ""))
    print(f"\nContext tokens: {before} retrieved -> {after} sent to the model")
    print(f"End-to-end: {seconds:.1f} s", end="")
    timings = answer.response_metadata.get("timings")
    if timings:  # a local ChatDraftRAG target reports where its time went
        target_s = timings["ttft_s"] + timings["decode_s"]
        print(f" (retrieval and compression {seconds - target_s:.1f} s, target prefill {timings['prefill_s']:.1f} s,"
              f" decode {timings['decode_s']:.1f} s for {answer.usage_metadata['output_tokens']} tokens)", end="")
    print()


def make_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The flags shared by the LangChain examples."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--question", action="append", dest="questions",
                        help="a question to ask (repeatable; default: three related questions)")
    parser.add_argument("--budget", type=int, default=512, help="context tokens kept by SpecPC (default 512)")
    parser.add_argument("--top-k", type=int, default=8, help="chunks retrieved (default 8)")
    parser.add_argument("--chunk-chars", type=int, default=1200, help="chunk size in characters (default 1200)")
    parser.add_argument("--no-compress", action="store_true", help="send the full retrieved chunks")
    parser.add_argument("--no-cache", action="store_true", help="compress without the draft cache")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="also keep the draft cache in this directory, so later runs start warm")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="SpecPC draft model")
    parser.add_argument("--max-tokens", type=int, default=64, help="most answer tokens (default 64)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    return parser


def compressed(retriever: BaseRetriever, args: argparse.Namespace, target_tokenizer: Any) -> BaseRetriever:
    """The one addition to the pipeline: SpecPC between the retriever and the chat model."""
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_draft_rag import DraftContextCompressor

    from draft_rag import DraftCache

    cache = None if getattr(args, "no_cache", False) else DraftCache(directory=getattr(args, "cache_dir", None))
    compressor = DraftContextCompressor(
        draft=args.draft, budget=args.budget, target_tokenizer=target_tokenizer, cache=cache
    )
    return ContextualCompressionRetriever(base_compressor=compressor, base_retriever=retriever)


def build_retriever(args: argparse.Namespace) -> BaseRetriever:
    """A MiniLM retriever over the chunks; the embeddings are cached, so later runs skip indexing."""
    from draft_rag.packaged import cache_dir

    chunks = load_chunks(args.data_dir, args.chunk_chars)
    key = hashlib.sha256("\0".join(d.page_content for d in chunks).encode()).hexdigest()[:16]
    cached = cache_dir() / "examples" / f"langchain-{key}.json"
    started = time.perf_counter()
    if cached.exists():
        store = InMemoryVectorStore.load(str(cached), MiniLMEmbeddings())
    else:
        store = InMemoryVectorStore(MiniLMEmbeddings())
        store.add_documents(chunks)
        cached.parent.mkdir(parents=True, exist_ok=True)
        store.dump(str(cached))
    print(f"Indexed {len(chunks)} chunks of {args.data_dir} in {time.perf_counter() - started:.1f} s")
    return store.as_retriever(search_kwargs={"k": args.top_k})


def main(argv: list[str] | None = None) -> list[str]:
    """Run the example; return the answers, one per question."""
    parser = make_parser()
    parser.add_argument("--method", default="full", choices=["full", "speckv", "snapkv", "streamingllm"],
                        help="KV-cache method of the local target (default full)")
    args = parser.parse_args(argv)

    from langchain_draft_rag import ChatDraftRAG

    from draft_rag.models import DEFAULT_TARGET, load_model

    target = load_model(DEFAULT_TARGET)
    llm = ChatDraftRAG(model=target, draft=args.draft, method=args.method, max_tokens=args.max_tokens)
    retriever = build_retriever(args)
    if not args.no_compress:
        retriever = compressed(retriever, args, target.tokenizer)
    return ask_all(build_chain(retriever, llm), args.questions or QUESTIONS,
                   lambda text: len(target.tokenizer.encode(text)))


def ask_all(chain: Runnable, questions: Sequence[str], count_tokens: Any) -> list[str]:
    """Ask each question in turn, report each, and return the answers."""
    answers = []
    for question in questions:
        started = time.perf_counter()
        result = chain.invoke(question)
        report(result, time.perf_counter() - started, count_tokens)
        answers.append(str(result["answer"].content).strip())
    return answers


if __name__ == "__main__":
    main()

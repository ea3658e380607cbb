"""Retrieval-augmented QA through the draft-rag gateway, in front of a llama.cpp server, with any OpenAI client.

The gateway (`draft-rag serve`) sits between the client and the LLM server: it finds the retrieved documents in
each chat request, compresses them with SpecPC, and forwards the request. The client changes nothing but its
base URL. Two ways to hand it documents, both shown here over the LangChain example's retrieval:

- ``--client openai``: the official ``openai`` client, documents in ``extra_body={"documents": [...]}``;
- ``--client langchain``: LangChain's ``ChatOpenAI`` in a RAG chain whose prompt wraps each retrieved chunk in
  ``<document>...</document>``.

Start llama.cpp on the packaged 1.5B target and the gateway in front of it (two terminals):

    python -m llama_cpp.server --port 8080 --n_ctx 4096 --n_threads 2 --model "$(python -c \\
        'from draft_rag.packaged import packaged_gguf; print(packaged_gguf("qwen2.5-coder-1.5b-instruct"))')"
    draft-rag serve --upstream http://127.0.0.1:8080/v1 --budget 512 --cache-dir ~/.cache/draft-rag/gateway

then ask through it (``--start`` starts and stops both for you instead; ``--no-compress`` has the gateway forward
the documents as they are, for comparison):

    python examples/gateway_rag.py
    python examples/gateway_rag.py --client langchain
    python examples/gateway_rag.py --start --client langchain --cache-dir ~/.cache/draft-rag/gateway
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnablePassthrough
from langchain_rag import PROMPT, QUESTIONS, build_retriever, make_parser

SYSTEM = PROMPT.messages[0].prompt.template  # "Answer the question from the context only, ..."


def ask_openai(client: Any, model: str, question: str, docs: list[Document], max_tokens: int,
               compress: bool = True) -> tuple[str, dict]:
    """The answer and the gateway's compression figures, the documents sent in the request's ``documents`` field."""
    completion = client.chat.completions.create(
        model=model, temperature=0, max_tokens=max_tokens,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        extra_body={"documents": [{"text": d.page_content, "title": d.metadata.get("source")} for d in docs],
                    "draft_rag": {"compress": compress}},
    )
    return (completion.choices[0].message.content or "").strip(), (completion.model_extra or {}).get("draft_rag", {})


def tagged(docs: list[Document]) -> str:
    """The retrieved chunks, each in a ``<document>`` block: the gateway compresses the text inside."""
    return "\n\n".join(f'<document source="{d.metadata.get("source", "")}">{d.page_content}</document>' for d in docs)


def langchain_chain(retriever: BaseRetriever, base_url: str, model: str, max_tokens: int,
                    compress: bool = True) -> Runnable:
    """question -> AI message: an ordinary LangChain RAG chain; only ``base_url`` points at the gateway."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=base_url, api_key="none", model=model, temperature=0, max_tokens=max_tokens,
                     extra_body=None if compress else {"draft_rag": {"compress": False}},
                     include_response_headers=True)  # the gateway's figures come as X-Draft-RAG-* headers
    return {"context": retriever | tagged, "question": RunnablePassthrough()} | PROMPT | llm


def gateway_figures(message: Any) -> dict[str, str]:
    """The gateway's ``X-Draft-RAG-*`` headers of a LangChain answer, by name (``context_tokens_after``...)."""
    headers = message.response_metadata.get("headers", {})
    prefix = "x-draft-rag-"
    return {name[len(prefix):].replace("-", "_"): value for name, value in headers.items()
            if name.lower().startswith(prefix)}


@contextlib.contextmanager
def started_servers(args: Any, llama_port: int = 8080, gateway_port: int = 8100) -> Iterator[str]:
    """llama.cpp on the packaged target and the gateway in front of it (``--budget``, ``--draft``, ``--cache-dir``),
    as two processes, llama.cpp first; yields the gateway's URL once both answer, and stops both after."""
    from draft_rag.models import DEFAULT_TARGET
    from draft_rag.packaged import packaged_gguf
    from draft_rag.serve.launch import llama_cpp_server, started

    gateway = [sys.executable, "-m", "draft_rag.cli", "serve", "--upstream", f"http://127.0.0.1:{llama_port}/v1",
               "--port", str(gateway_port), "--budget", str(args.budget), "--draft", args.draft, "--log-level",
               "warning", *(["--cache-dir", str(args.cache_dir)] if args.cache_dir else [])]
    with llama_cpp_server(packaged_gguf(DEFAULT_TARGET), threads=2, port=llama_port), \
            started(gateway, f"http://127.0.0.1:{gateway_port}/health"):
        yield f"http://127.0.0.1:{gateway_port}/v1"


def main(argv: list[str] | None = None) -> list[str]:
    """Run the example; return the answers, one per question."""
    parser = make_parser(__doc__)
    parser.add_argument("--gateway", default="http://127.0.0.1:8100/v1", help="the gateway's /v1 URL")
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct", help="model name sent to the server")
    parser.add_argument("--client", choices=["openai", "langchain"], default="openai")
    parser.add_argument("--start", action="store_true", help="start llama.cpp and the gateway, stop them after")
    args = parser.parse_args(argv)

    import openai

    retriever = build_retriever(args)
    servers = started_servers(args) if args.start else contextlib.nullcontext(args.gateway)
    compress = not args.no_compress
    answers = []
    with servers as gateway, openai.OpenAI(base_url=gateway, api_key="none", timeout=600) as client:
        chain = langchain_chain(retriever, gateway, args.model, args.max_tokens, compress)
        for question in args.questions or QUESTIONS:
            started = time.perf_counter()
            if args.client == "openai":
                answer, stats = ask_openai(client, args.model, question, retriever.invoke(question), args.max_tokens,
                                           compress)
            else:
                message = chain.invoke(question)
                answer, stats = str(message.content).strip(), gateway_figures(message)
            figures = (f"{stats['context_tokens_before']} retrieved -> {stats['context_tokens_after']} sent "
                       f"(compressed in {float(stats['compress_s']):.2f} s)" if stats else "sent as retrieved")
            print(f"\nQuestion: {question}\n\nAnswer: {answer}\n\nContext tokens: {figures}; "
                  f"end to end {time.perf_counter() - started:.1f} s")
            answers.append(answer)
    return answers


if __name__ == "__main__":
    main()

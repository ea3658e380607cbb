"""The remote-target example's pipeline against a small OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore

from tests.integrations.test_compression_adapters import QUERY, TEXTS, count

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ANSWER = "The magic number is 4815162."


class OpenAIStub(BaseHTTPRequestHandler):
    """Answers ``POST /v1/chat/completions`` with a fixed reply and records each request body."""

    requests: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (the http.server hook name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, **body})
        reply = {
            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ANSWER}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        payload = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    OpenAIStub.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), OpenAIStub)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import langchain_rag

    return langchain_rag


@pytest.fixture
def retriever():
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    store.add_documents([Document(page_content=t, metadata={"source": f"file{i}.txt"}) for i, t in enumerate(TEXTS)])
    return store.as_retriever(search_kwargs={"k": 4})


def remote_llm(base_url: str):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=base_url, api_key="EMPTY", model="big-target", max_tokens=16, timeout=10, max_retries=0)


def test_compressed_context_is_what_the_remote_target_reads(server, example, retriever, tiny_draft):
    args = argparse.Namespace(draft=tiny_draft, budget=30, no_cache=False)
    pipeline = example.compressed(retriever, args, tiny_draft.tokenizer)
    result = example.build_chain(pipeline, remote_llm(server)).invoke(QUERY)

    assert result["answer"].content == ANSWER
    docs = result["docs"]
    assert sum(count(d.page_content) for d in docs) <= 30
    assert all(d.metadata["draft_rag"]["kept_tokens"] <= d.metadata["draft_rag"]["original_tokens"] for d in docs)
    [request] = OpenAIStub.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["model"] == "big-target"
    user = request["messages"][-1]["content"]
    assert QUERY in user
    assert example.format_docs(docs) in user
    assert not any(original in user for original in TEXTS)


def test_without_compression_the_remote_target_reads_full_chunks(server, example, retriever):
    result = example.build_chain(retriever, remote_llm(server)).invoke(QUERY)
    assert result["answer"].content == ANSWER
    [request] = OpenAIStub.requests
    assert all(d.page_content in request["messages"][-1]["content"] for d in result["docs"])
    assert sum(d.page_content in TEXTS for d in result["docs"]) == 4

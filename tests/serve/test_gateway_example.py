"""examples/gateway_rag.py against the gateway on loopback in front of the stub upstream (a fake retriever)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore

from tests.integrations.test_compression_adapters import QUERY, TEXTS
from tests.serve.support import BUDGET, gateway_on_loopback

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import gateway_rag

    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    store.add_documents([Document(page_content=t, metadata={"source": f"file{i}.txt"}) for i, t in enumerate(TEXTS)])
    monkeypatch.setattr(gateway_rag, "build_retriever", lambda args: store.as_retriever(search_kwargs={"k": 4}))
    return gateway_rag


@pytest.mark.parametrize("client", ["openai", "langchain"])
def test_the_example_asks_through_the_gateway(stub, specpc, example, client, capsys):
    upstream, url = stub
    with gateway_on_loopback(url, specpc) as gateway:
        answers = example.main(["--gateway", gateway, "--client", client, "--question", QUERY])
        full = example.main(["--gateway", gateway, "--client", client, "--question", QUERY, "--no-compress"])
    printed = capsys.readouterr().out
    [compressed, uncompressed] = upstream.chats()
    user = compressed["body"]["messages"][-1]["content"]
    assert answers == full == [f"Answer to: {user.splitlines()[-1]}"]
    assert compressed["body"]["messages"][0]["content"] == example.SYSTEM
    assert "draft_rag" not in compressed["body"] and "documents" not in compressed["body"]
    retrieved = [t for t in TEXTS if t in uncompressed["body"]["messages"][-1]["content"]]
    assert len(retrieved) == 4 and not any(t in user for t in retrieved)
    assert ('title="file' in user) == (client == "openai")
    assert ('<document source="file' in user) == (client == "langchain")
    kept = re.search(r"Context tokens: (\d+) retrieved -> (\d+) sent \(compressed in [\d.]+ s\)", printed)
    assert kept and int(kept[2]) <= BUDGET < int(kept[1])
    assert "sent as retrieved" in printed

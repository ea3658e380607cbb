"""The gateway in front of a real llama.cpp server (``llama-cpp-python[server]``) serving the packaged target GGUF.

The draft is the packaged 0.5B model rather than the tiny random one: with it the compressed context still
holds the answer, so the test can check what users get (llama.cpp answers right from what the gateway kept)
and not only the plumbing, which the stub-upstream tests cover.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from draft_rag import DraftCache, SpecPC
from draft_rag.commands.demo import needle_haystack
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET
from draft_rag.packaged import packaged_gguf
from draft_rag.serve.launch import llama_cpp_server
from tests.serve.support import gateway_on_loopback

pytestmark = pytest.mark.real_model

BUDGET = 256
STARTUP_S = 300


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a free loopback port, ready to answer; stopped afterwards, always."""
    log = tmp_path_factory.mktemp("llama-cpp") / "server.log"
    with llama_cpp_server(packaged_gguf(DEFAULT_TARGET), log_path=log, seconds=STARTUP_S) as url:
        yield url


@pytest.fixture(scope="module")
def gateway(llama_server) -> Iterator[str]:
    specpc = SpecPC(draft=DEFAULT_DRAFT, budget=BUDGET, cache=DraftCache(), progress=False)
    specpc.load()
    with gateway_on_loopback(llama_server, specpc) as url:
        yield url


@pytest.fixture(scope="module")
def haystack(gateway):
    from draft_rag.models import load_model

    docs, question, answer = needle_haystack(load_model(DEFAULT_DRAFT).tokenizer, 1500, 0.6, seed=3)
    return docs, f"{question} Answer with the number only.", answer


def test_llama_cpp_answers_from_compressed_field_documents(gateway, haystack):
    docs, question, answer = haystack
    with openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0, timeout=600) as client:
        completion = client.chat.completions.create(
            model=DEFAULT_TARGET, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24,
            extra_body={"documents": docs})
    stats = completion.model_extra["draft_rag"]
    assert stats["context_tokens_before"] >= 1200 and stats["context_tokens_after"] <= BUDGET
    assert answer in (completion.choices[0].message.content or "")
    assert completion.usage is not None
    # llama.cpp read the compressed documents, not the full ones (its prompt counts the chat template too).
    assert completion.usage.prompt_tokens < stats["context_tokens_before"] / 2


def test_llama_cpp_streams_from_compressed_tagged_documents(gateway, haystack):
    docs, question, answer = haystack
    context = "\n".join(f"<document>{doc}</document>" for doc in docs)
    with openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0, timeout=600) as client, \
            client.chat.completions.with_streaming_response.create(
                model=DEFAULT_TARGET, temperature=0, max_tokens=24, stream=True,
                messages=[{"role": "user", "content": f"Context:\n{context}\n\n{question}"}]) as response:
        after = int(response.headers["x-draft-rag-context-tokens-after"])
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert after <= BUDGET
    assert answer in text


def test_llama_cpp_models_pass_through(gateway):
    with openai.OpenAI(base_url=gateway, api_key="unused", max_retries=0) as client:
        models = client.models.list()
    assert models.data and all(model.id for model in models.data)

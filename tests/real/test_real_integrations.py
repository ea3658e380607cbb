"""End to end with the packaged real models: a LangChain chain and a LlamaIndex query engine, both compressed."""

from __future__ import annotations

import pytest

import tests.integrations  # noqa: F401  (puts the adapters on the path when running from a checkout)
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET, load_model

pytestmark = pytest.mark.real_model

NEEDLE = "7304981"
QUESTION = "What is the access code for the north gate?"
DOCS = [
    "The harbour town woke early. Fishermen mended their nets along the quay while gulls argued over the "
    "morning catch, and the baker opened his shutters to the smell of fresh bread drifting down the lane. " * 3,
    "The keeper of the lighthouse wrote in his log every evening. The access code for the north gate is "
    f"{NEEDLE}; he changed it each spring and told only the harbour master. "
    "Storms came from the west that year, and the lamp burned through many long nights. " * 2,
    "In the market square, traders sold wool, salt and dried fish. Children chased each other between the "
    "stalls, and an old man played the fiddle by the fountain until the church bell rang noon. " * 3,
]
BUDGET = 96
# The paper's 64-token pooling and neighbourhoods are sized for long contexts; these documents are short.
SPECPC_KWARGS = {"kernel_size": 16, "neighbor_tokens": 16}


@pytest.fixture(scope="module")
def target():
    return load_model(DEFAULT_TARGET)


def test_langchain_compressor_and_chat_model(target):
    from langchain_core.documents import Document
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_draft_rag import ChatDraftRAG, DraftContextCompressor

    compressor = DraftContextCompressor(
        draft=DEFAULT_DRAFT, budget=BUDGET, target_tokenizer=target.tokenizer, specpc_kwargs=SPECPC_KWARGS
    )
    docs = compressor.compress_documents([Document(page_content=d, id=str(i)) for i, d in enumerate(DOCS)], QUESTION)
    assert [d.id for d in docs] == ["0", "1", "2"]
    assert sum(len(target.tokenizer.encode(d.page_content)) for d in docs) <= BUDGET
    assert NEEDLE in docs[1].page_content

    # The chat model reads the whole documents (~400 tokens) and evicts its own cache to 64 entries a head:
    # the SpecKV path on its own, independent of which spans the compressor happened to keep (on this prompt
    # the target's own window, SnapKV, loses digits of the code at 64, 96 and 128 in fp32 and bf16).
    chat = ChatDraftRAG(model=target, draft=DEFAULT_DRAFT, method="speckv", budget=64, max_tokens=20)
    context = "\n\n".join(DOCS)
    answer = chat.invoke([SystemMessage("Answer briefly."), HumanMessage(f"{context}\n\nQuestion: {QUESTION}")])
    assert NEEDLE in answer.content
    assert answer.usage_metadata["output_tokens"] <= 20


def test_llama_index_postprocessor_and_llm(target):
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.llms.draft_rag import DraftRAGLLM
    from llama_index.postprocessor.draft_rag import DraftNodePostprocessor

    index = VectorStoreIndex.from_documents([Document(text=d) for d in DOCS], embed_model=MockEmbedding(embed_dim=8))
    query_engine = index.as_query_engine(
        similarity_top_k=3,
        node_postprocessors=[
            DraftNodePostprocessor(budget=BUDGET, target_tokenizer=target.tokenizer, specpc_kwargs=SPECPC_KWARGS)
        ],
        llm=DraftRAGLLM(target=target, method="full", max_new_tokens=20),
    )
    response = query_engine.query(QUESTION)
    texts = [n.node.get_content() for n in response.source_nodes]
    assert sum(len(target.tokenizer.encode(t)) for t in texts) <= BUDGET
    assert any(NEEDLE in t for t in texts)
    assert NEEDLE in str(response)

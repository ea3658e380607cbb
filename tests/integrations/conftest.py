from __future__ import annotations

import pytest

from tests.tiny import tiny_model


@pytest.fixture(scope="session")
def tiny_draft():
    """The draft for the compression adapters (same tokenizer as every tiny model)."""
    return tiny_model("qwen2", seed=11)


ENGINE_SETTINGS = {"method": "speckv", "budget": 16, "window_size": 4}
"""SpecKV settings shared by the chat-model and LLM adapter tests (small enough to evict on short prompts)."""


@pytest.fixture(scope="module")
def engine(tiny_pair):
    """The SpecKV engine an adapter built from ``tiny_pair`` and ENGINE_SETTINGS must agree with."""
    from draft_rag import SpecKV

    draft, target = tiny_pair
    return SpecKV(target=target, draft=draft, **ENGINE_SETTINGS)

from __future__ import annotations

import pytest

from tests.tiny import tiny_model


@pytest.fixture(scope="session")
def tiny_qwen():
    return tiny_model("qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama", seed=1)


@pytest.fixture(scope="session")
def tiny_pair():
    """A draft and a target with the same tokenizer (different seeds and sizes)."""
    return tiny_model("qwen2", seed=2), tiny_model("qwen2", seed=3, hidden_size=96, num_attention_heads=6,
                                                  num_key_value_heads=2, num_hidden_layers=3)

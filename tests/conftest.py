from __future__ import annotations

import pytest

from tests.tiny import saved, tiny_model


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


@pytest.fixture(scope="module")
def draft():
    """The tiny draft that the SpecPC and draft-cache tests compress with (one per module)."""
    return tiny_model("qwen2", seed=7)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A tiny draft saved as a model directory, for the commands that load a draft by name (one per module)."""
    return saved(tiny_model("qwen2", seed=11), tmp_path_factory.mktemp("tiny-draft"))

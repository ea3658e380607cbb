from __future__ import annotations

import pytest

from tests.tiny import tiny_model


@pytest.fixture(scope="session")
def tiny_draft():
    """The draft for the compression adapters (same tokenizer as every tiny model)."""
    return tiny_model("qwen2", seed=11)

"""Fixtures of the gateway tests: the tiny draft, a SpecPC over it, the stub upstream on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from draft_rag import SpecPC
from draft_rag.serve.app import serve_in_thread
from tests.serve.support import StubUpstream, make_specpc
from tests.tiny import tiny_model


@pytest.fixture(scope="session")
def tiny_draft():
    return tiny_model("qwen2", seed=11)


@pytest.fixture
def specpc(tiny_draft) -> SpecPC:
    """A fresh compressor (its own empty draft cache) over the shared tiny draft."""
    return make_specpc(tiny_draft)


@pytest.fixture
def stub() -> Iterator[tuple[StubUpstream, str]]:
    """The stub upstream on loopback and its ``/v1`` URL."""
    upstream = StubUpstream()
    with serve_in_thread(upstream.app()) as url:
        yield upstream, f"{url}/v1"

"""langchain-tests' standard integration suite for ChatDraftRAG, answered by the packaged real target."""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

import tests.integrations  # noqa: F401  (puts the adapters on the path when running from a checkout)
from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET

pytestmark = pytest.mark.real_model


class TestChatDraftRAGIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self):
        from langchain_draft_rag import ChatDraftRAG

        return ChatDraftRAG

    @property
    def chat_model_params(self) -> dict:
        # Models are named, not passed loaded: load_model keeps one copy per process, so every test's fresh
        # instance shares them. Three tokens are enough for the suite's non-empty checks; each costs ~0.5 s.
        return {"model": DEFAULT_TARGET, "draft": DEFAULT_DRAFT, "method": "speckv", "max_tokens": 3}

    # What a local text-only model does not have; the suite skips the tests that need it.
    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_model_override(self) -> bool:
        # One instance answers with the model it was built for; a per-call ``model=`` is rejected.
        return False

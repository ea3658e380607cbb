"""The correctness oracles hold in bf16 too (the default on CPUs with native bf16 and on CUDA)."""

from __future__ import annotations

import pytest
import torch

from draft_rag import SpecKV, SpecPC
from draft_rag.kv import METHODS
from draft_rag.models import LoadedModel
from tests.test_speckv import LONG_PROMPT, plain_generate
from tests.test_specpc import DOCS, QUERY
from tests.tiny import tiny_model


def bf16(arch: str, seed: int, **overrides) -> LoadedModel:
    loaded = tiny_model(arch, seed=seed, **overrides)
    return LoadedModel(loaded.model.to(torch.bfloat16), loaded.tokenizer, f"{loaded.name}-bf16")


@pytest.fixture(scope="module")
def pair():
    return bf16("qwen2", 31), bf16("qwen2", 32, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)


def test_specpc_budget_at_least_context_returns_documents_unchanged(pair):
    draft = pair[0]
    total = sum(len(draft.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS)
    result = SpecPC(draft=draft, budget=total, progress=False).compress(QUERY, DOCS)
    assert result.texts == DOCS


def test_specpc_compresses_within_budget(pair):
    result = SpecPC(draft=pair[0], budget=24, kernel_size=4, neighbor_tokens=4, progress=False).compress(QUERY, DOCS)
    assert 0 < result.total_kept_tokens <= 24


@pytest.mark.parametrize("method", list(METHODS))
def test_speckv_budget_above_prompt_equals_plain_generate(pair, method):
    draft, target = pair
    result = SpecKV(target=target, draft=draft, method=method, budget=4096, window_size=8).generate(
        LONG_PROMPT, max_new_tokens=16
    )
    assert result.token_ids == plain_generate(target, LONG_PROMPT, 16)

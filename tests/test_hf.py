"""The one support check (draft_rag.hf): layers without RoPE are found layer by layer and scored right, and an
attention layer draft-rag does not reproduce is refused with NotImplementedError before any model runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import Cohere2Config, Exaone4Config, Gemma3TextConfig, GptOssConfig, Olmo2Config

from draft_rag import DraftCache, SpecKV, SpecPC
from draft_rag.hf import attention_modules, check_supported, key_rotation, query_rebuild
from draft_rag.models import LoadedModel
from draft_rag.scoring import ScoreReduction
from draft_rag.sparse_prefill import sparse_prefill
from tests.test_scoring import efficient_scores, naive_scores
from tests.test_sliding_window import build
from tests.test_speckv import LONG_PROMPT
from tests.tiny import no_forward, tiny_model, tiny_tokenizer

QUERY = "What is the special magic number for the word apple?"
DOCS = ["The quick brown fox jumps over the lazy dog. " * 4, "A special magic number is hidden here: 4815162. " * 3]


def tiny(config_class: type, seed: int = 0, attn: str = "sdpa", **settings: object) -> LoadedModel:
    """A random 4-layer model of a real architecture (hidden 64, 4 query and 2 KV heads) with the tiny tokenizer."""
    config = config_class(vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                          **settings)
    return build(config, seed, attn)


def compress(draft: LoadedModel, cache: DraftCache | None = None, **settings: Any) -> None:
    SpecPC(draft=draft, cache=cache, budget=10, window_size=8, kernel_size=5, neighbor_tokens=6,
           starting_layer_index=1, **settings).compress(QUERY, DOCS)


# EXAONE 4 and Command R7B (Cohere 2) rotate only in their sliding-window layers: with a window, every fourth
# layer is global and has no RoPE, decided by a condition on the layer's window rather than by `use_rope`.
GLOBAL_LAYER_WITHOUT_ROPE = {
    "exaone4": lambda seed, attn: tiny(Exaone4Config, seed, attn, sliding_window=4096, sliding_window_pattern=4),
    "cohere2": lambda seed, attn: tiny(Cohere2Config, seed, attn, sliding_window=4096),
}


@pytest.mark.parametrize("arch", ["smollm3", *GLOBAL_LAYER_WITHOUT_ROPE])
def test_layers_without_rope_are_found_layer_by_layer(arch):
    if arch == "smollm3":
        model = tiny_model("smollm3", no_rope_layers=[1, 0, 1, 1]).model
        expected = [True, False, True, True]
    else:
        model = GLOBAL_LAYER_WITHOUT_ROPE[arch](0, "sdpa").model
        expected = [layer_type == "sliding_attention" for layer_type in model.config.layer_types]
        assert expected == [True, True, True, False]
    assert [query_rebuild(module).rope is not None for module in attention_modules(model)] == expected
    assert key_rotation(model)[2] == expected
    check_supported(model, 100, cache=True)


@pytest.mark.parametrize("arch", list(GLOBAL_LAYER_WITHOUT_ROPE))
def test_scores_of_layers_without_rope_match_eager_reference(arch):
    eager, sdpa = (GLOBAL_LAYER_WITHOUT_ROPE[arch](5, attn).model for attn in ("eager", "sdpa"))
    ids = torch.randint(3, sdpa.config.vocab_size, (1, 53), generator=torch.Generator().manual_seed(0))
    reduction = ScoreReduction(weighted_query=True)
    expected = naive_scores(eager, ids, 40, 13, reduction)
    got = efficient_scores(sdpa, ids, 40, 13, reduction, chunk_size=16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _without_q_proj() -> LoadedModel:
    loaded = tiny_model("qwen2", seed=1)
    for layer in loaded.model.model.layers:
        del layer.self_attn.q_proj
    return loaded


def _wrapped_forward() -> LoadedModel:
    """Attention layers whose forward hands everything to another function: nothing there says how they attend."""
    loaded = tiny_model("qwen2", seed=1)
    attention_class = type(loaded.model.model.layers[0].self_attn)

    class WrappedAttention(attention_class):  # type: ignore[misc, valid-type]
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    for layer in loaded.model.model.layers:
        layer.self_attn.__class__ = WrappedAttention
    return loaded


UNSUPPORTED = {
    "no-q-proj": (_without_q_proj, "no attention layers with q_proj"),
    "wrapped-forward": (_wrapped_forward, r"WrappedAttention\.forward does not build its query"),
    # OLMo 2 normalizes the query across all heads before splitting it into heads.
    "olmo2": (lambda: tiny(Olmo2Config), "does not split its q_proj output into heads"),
    # gpt-oss adds a learned sink logit per head to every softmax.
    "gpt-oss": (
        lambda: tiny(GptOssConfig, attn="eager", num_local_experts=2, num_experts_per_tok=1, sliding_window=4096),
        "s_aux",
    ),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_attention_is_refused_before_any_compute(case):
    make, message = UNSUPPORTED[case]
    loaded = make()
    with pytest.raises(NotImplementedError, match=message):
        check_supported(loaded.model, 10)
    check_supported(loaded.model, 10, scoring=False)  # generating with it needs none of this
    for settings in ({}, {"reading": "joint"}, {"cache": DraftCache()}):
        with no_forward(loaded), pytest.raises(NotImplementedError, match=message):
            compress(loaded, **settings)
    with no_forward(loaded), pytest.raises(NotImplementedError, match=message):
        with sparse_prefill(loaded.model, num_observers=3):
            pass


@pytest.mark.parametrize(
    ("method", "settings", "refused"),
    [
        ("snapkv", {}, True),  # scores the target's keys
        ("full", {"prefill_window_size": 8, "prefill_vertical_size": 8}, True),  # replaces its attention
        ("full", {}, False),  # only generates with it
    ],
)
def test_speckv_refuses_a_target_it_would_read_before_any_compute(method, settings, refused, tiny_pair):
    target, draft = tiny(Olmo2Config, seed=1), tiny_pair[0]
    engine = SpecKV(target=target, draft=draft, method=method, budget=40, window_size=8, **settings)
    if refused:
        with no_forward(target, draft), pytest.raises(NotImplementedError, match="Olmo2Attention"):
            engine.generate(LONG_PROMPT, max_new_tokens=2)
    else:
        assert len(engine.generate(LONG_PROMPT, max_new_tokens=2).token_ids) == 2


def test_rope_that_differs_between_layer_types_cannot_be_cached():
    """Gemma 3 gives its sliding and global layers different RoPE: read jointly it is scored; read apart (SpecPC's
    default, and over a cache) it is refused before any compute, with the way out named."""
    draft = tiny(Gemma3TextConfig, sliding_window=4096)
    for cache in (DraftCache(), None):
        with no_forward(draft), pytest.raises(NotImplementedError, match=r"cannot shift.*reading='joint'"):
            compress(draft, cache)
    compress(draft, reading="joint")

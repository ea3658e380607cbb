"""Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window, Gemma): exact within the window,
a clear NotImplementedError before any compute beyond it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, MistralConfig

from draft_rag.engine import SpecKV
from draft_rag.hf import check_supported
from draft_rag.models import LoadedModel
from draft_rag.scoring import ObserverScores, ScoreReduction, prefill
from tests.test_scoring import naive_scores
from tests.test_speckv import LONG_PROMPT, plain_generate
from tests.tiny import no_forward, tiny_config, tiny_model, tiny_tokenizer

PROMPT_TOKENS = 277  # LONG_PROMPT in the tiny tokenizer's chat template
WINDOW = 320


def build(config, seed: int = 0, attn: str = "sdpa") -> LoadedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return LoadedModel(model=model.eval(), tokenizer=tiny_tokenizer(), name=f"tiny-{config.model_type}")


def tiny_mistral(sliding_window: int | None = WINDOW, seed: int = 0, attn: str = "sdpa") -> LoadedModel:
    """A 2-layer Mistral; MistralConfig's own default window (4096) is the v0.1 setting."""
    llama = tiny_config("llama").to_dict()
    shared = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "pad_token_id", "eos_token_id")
    window = {} if sliding_window == 4096 else {"sliding_window": sliding_window}
    return build(MistralConfig(**{key: llama[key] for key in shared}, **window), seed, attn)


def test_mistral_v01_defaults_to_a_4096_window():
    assert tiny_mistral(4096).model.config.sliding_window == 4096


@pytest.mark.parametrize(
    ("loaded", "window"),
    [
        (lambda: tiny_mistral(64), 64),
        (lambda: tiny_model("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1), 64),
        (lambda: tiny_model("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=2), None),
        (lambda: tiny_model("qwen2"), None),
        (lambda: tiny_model("llama"), None),
    ],
)
def test_check_supported_rejects_only_sequences_longer_than_the_window(loaded, window):
    model = loaded().model
    if window is None:
        check_supported(model, 100_000)
        return
    check_supported(model, window)
    with pytest.raises(NotImplementedError, match=f"window of {window} tokens.*{window + 1} tokens"):
        check_supported(model, window + 1)


def test_check_supported_rejects_soft_capping_and_unknown_layers():
    config = Gemma2Config(vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    gemma = build(config, attn="eager")
    with pytest.raises(NotImplementedError, match="soft-caps"):
        check_supported(gemma.model, 10)
    gemma.model.config.attn_logit_softcapping = None
    with pytest.raises(NotImplementedError, match="softcap=self.attn_logit_softcapping"):
        check_supported(gemma.model, 10)  # the layers took their soft-capping from the config when built
    for layer in gemma.model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    check_supported(gemma.model, gemma.model.config.sliding_window)
    with pytest.raises(NotImplementedError, match="window"):
        check_supported(gemma.model, gemma.model.config.sliding_window + 1)
    hybrid = tiny_model("qwen2")
    hybrid.model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(NotImplementedError, match="'linear_attention' layers"):
        check_supported(hybrid.model, 10)
    with pytest.raises(ValueError, match="total_tokens"):
        check_supported(hybrid.model, -1)


@pytest.mark.parametrize("chunk_size", [2048, 16])
def test_scores_within_the_window_match_eager_reference(chunk_size):
    """A sequence exactly as long as the window: the window hides nothing and every key is scored."""
    eager, sdpa = tiny_mistral(64, seed=4, attn="eager"), tiny_mistral(64, seed=4)
    ids = torch.randint(3, sdpa.model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    reduction = ScoreReduction(weighted_query=True)
    check_supported(sdpa.model, 64)
    with ObserverScores(sdpa.model, 40, 24, reduction) as scorer:
        prefill(sdpa.model, ids, chunk_size=chunk_size)
    torch.testing.assert_close(scorer.scores(), naive_scores(eager.model, ids, 40, 24, reduction), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("method", ["speckv", "snapkv", "streamingllm", "full"])
def test_speckv_on_a_sliding_window_target_within_the_window(method, tiny_pair):
    target = tiny_mistral(seed=1)
    exact = SpecKV(target=target, draft=tiny_pair[0], method=method, budget=4096, window_size=8)
    assert exact.generate(LONG_PROMPT, max_new_tokens=20).token_ids == plain_generate(target, LONG_PROMPT, 20)
    if method != "full":
        evicting = SpecKV(target=target, draft=tiny_pair[0], method=method, budget=40, window_size=8)
        result = evicting.generate(LONG_PROMPT, max_new_tokens=20)
        assert result.prompt_tokens == PROMPT_TOKENS and result.kv_entries_kept == 40


@pytest.mark.parametrize("method", ["speckv", "snapkv", "streamingllm", "full"])
@pytest.mark.parametrize(
    ("prompt", "max_new_tokens"), [(LONG_PROMPT * 2, 4), (LONG_PROMPT, WINDOW - PROMPT_TOKENS + 2)]
)
def test_sequence_beyond_the_target_window_raises_before_any_compute(method, prompt, max_new_tokens, tiny_pair):
    target, draft = tiny_mistral(seed=1), tiny_pair[0]
    engine = SpecKV(target=target, draft=draft, method=method, budget=40, window_size=8)
    with no_forward(target, draft), pytest.raises(NotImplementedError, match=f"window of {WINDOW} tokens"):
        engine.generate(prompt, max_new_tokens=max_new_tokens)
    with no_forward(target, draft), pytest.raises(NotImplementedError, match=f"window of {WINDOW} tokens"):
        engine.stream(prompt, max_new_tokens=max_new_tokens)


def test_draft_answer_beyond_the_draft_window_raises_before_any_compute(tiny_pair):
    target, draft = tiny_pair[1], tiny_mistral(seed=2)
    engine = SpecKV(target=target, draft=draft, budget=40, window_size=8)
    steps = WINDOW - PROMPT_TOKENS + 2  # the draft feeds back all but its last token
    with no_forward(target, draft), pytest.raises(NotImplementedError, match="MistralForCausalLM"):
        engine.generate(LONG_PROMPT, max_new_tokens=steps)
    assert engine.generate(LONG_PROMPT, max_new_tokens=steps - 1).kv_entries_kept == 40

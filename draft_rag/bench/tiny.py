"""Tiny random-weight models for ``draft-rag bench --preset tiny`` and the test suite.

They check plumbing and file formats in seconds, with no download: a byte-level BPE tokenizer is trained
here and Qwen2-, Llama- or SmolLM3-architecture models of a few hundred thousand parameters are built from
real configs. Their answers are noise; their accuracy means nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from draft_rag.models import LoadedModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# SpecPC's paper settings assume 24+ layers and long prompts; these fit two layers and short prompts.
TINY_SPECPC_SETTINGS = {"window_size": 16, "kernel_size": 8, "neighbor_tokens": 8, "starting_layer_index": 0}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = SPECIAL_TOKENS
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 512-token BPE tokenizer trained on the bundled prose."""
    from draft_rag.bench.prose import prose_sentences

    return train_tokenizer(prose_sentences()[:2000], 512)


def tiny_config(tokenizer: PreTrainedTokenizerFast, arch: str = "qwen2", **overrides: Any) -> PretrainedConfig:
    """A real Qwen2, Llama or SmolLM3 config shrunk to 2 layers (SmolLM3: 4), hidden 64, 4 query and 2 KV heads (GQA).

    SmolLM3 skips RoPE in every fourth layer (``no_rope_layers``): its last layer here.
    """
    from transformers import LlamaConfig, Qwen2Config, SmolLM3Config

    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "smollm3":
        # Its default bos id (Llama 3's 128000) lies outside this vocabulary.
        settings.update(num_hidden_layers=4, bos_token_id=None)
    settings.update(overrides)
    settings.setdefault("intermediate_size", 2 * settings["hidden_size"])
    config_classes = {"qwen2": Qwen2Config, "llama": LlamaConfig, "smollm3": SmolLM3Config}
    if arch not in config_classes:
        msg = f"arch must be one of {', '.join(config_classes)}, got {arch!r}."
        raise ValueError(msg)
    return config_classes[arch](**settings)


def tiny_model(
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    arch: str = "qwen2",
    seed: int = 0,
    attn: str = "sdpa",
    name: str | None = None,
    **overrides: Any,
) -> LoadedModel:
    """A random-weight model (seeded) from :func:`tiny_config`, with ``tokenizer`` (default :func:`tiny_tokenizer`)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(tokenizer, arch, **overrides), attn_implementation=attn, dtype=torch.float32
    )
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name or f"tiny-{arch}-{seed}")


def tiny_pair(seed: int = 0) -> tuple[LoadedModel, LoadedModel]:
    """A tiny draft (2 layers, hidden 64) and target (3 layers, hidden 96) sharing :func:`tiny_tokenizer`."""
    return (
        tiny_model(seed=seed, name="tiny-draft"),
        tiny_model(seed=seed + 1, name="tiny-target", hidden_size=96, num_attention_heads=6, num_hidden_layers=3),
    )

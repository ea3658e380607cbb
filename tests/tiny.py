"""Tiny random-weight models from real configs, and a small offline tokenizer, for fast tests."""

from __future__ import annotations

import functools

import torch

from draft_rag.models import LoadedModel

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A special magic number is hidden in the text. "
    "What is the special magic number for the word apple? Retrieval augmented generation reads long "
    "documents, and a small draft model decides which tokens matter. 0123456789 , . ? ! : ; ' \" - … "
)


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer (about 400 tokens) trained here, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML
    return fast


def tiny_config(arch: str = "qwen2", **overrides):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=tiny_tokenizer().pad_token_id,
        eos_token_id=tiny_tokenizer().eos_token_id,
    )
    common.update(overrides)
    return (Qwen2Config if arch == "qwen2" else LlamaConfig)(**common)


def tiny_model(arch: str = "qwen2", seed: int = 0, attn: str = "sdpa", **overrides) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.eval()
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), name=f"tiny-{arch}-{seed}")

"""Tiny random-weight models from real configs, and a small offline tokenizer, for fast tests.

The models are built on the CPU in fp32. To run the suite on a GPU, set ``DRAFT_RAG_TEST_DEVICE`` (e.g. ``cuda``)
and ``DRAFT_RAG_TEST_DTYPE`` (``bfloat16``, ``float16`` or ``float32``): every model made here is then moved
there. Tests that build their own tensors on the CPU or compare with fp32 tolerances may fail there; that run
counts what works on the device, it is not CI's.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

from draft_rag.bench import tiny as bench_tiny
from draft_rag.models import LoadedModel

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A special magic number is hidden in the text. "
    "What is the special magic number for the word apple? Retrieval augmented generation reads long "
    "documents, and a small draft model decides which tokens matter. 0123456789 , . ? ! : ; ' \" - … "
)


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer (about 400 tokens) trained on CORPUS, with a ChatML chat template."""
    return bench_tiny.train_tokenizer([CORPUS] * 20, 400)


def tiny_config(arch: str = "qwen2", **overrides):
    overrides.setdefault("max_position_embeddings", 4096)
    return bench_tiny.tiny_config(tiny_tokenizer(), arch, **overrides)


def tiny_model(arch: str = "qwen2", seed: int = 0, attn: str = "sdpa", **overrides) -> LoadedModel:
    overrides.setdefault("max_position_embeddings", 4096)
    loaded = bench_tiny.tiny_model(tiny_tokenizer(), arch=arch, seed=seed, attn=attn, **overrides)
    device, dtype = device_and_dtype()
    if (device, dtype) != ("cpu", "float32"):
        import torch

        loaded.model.to(device=device, dtype=getattr(torch, dtype))
    return loaded


def device_and_dtype() -> tuple[str, str]:
    """Where the tiny models run: ``DRAFT_RAG_TEST_DEVICE`` (default ``cpu``) and ``DRAFT_RAG_TEST_DTYPE``
    (default ``float32``)."""
    return os.environ.get("DRAFT_RAG_TEST_DEVICE", "cpu"), os.environ.get("DRAFT_RAG_TEST_DTYPE", "float32")


def saved(loaded: LoadedModel, path: Path) -> Path:
    """``loaded`` written to ``path`` as a model directory (weights and tokenizer), which load_model reads."""
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def no_forward(*loaded: LoadedModel) -> Iterator[None]:
    """Fail if any of the models runs a forward pass inside the block (errors must come before any compute)."""
    calls = []
    # The decoder runs in every pass, with the language-model head or without it.
    handles = [m.model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(1)) for m in loaded]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    assert not calls, "a model ran before the error"

"""StreamingLLM: keep the first tokens (attention sinks) and the most recent ones.

Based on https://arxiv.org/abs/2309.17453. Needs no scores, so it costs nothing beyond the prefill; it
forgets everything in the middle of the prompt, which is where a retrieved fact usually sits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from draft_rag.checks import check_int
from draft_rag.kv.base import KVEviction


@dataclass
class StreamingLLMEviction(KVEviction):
    """Keep ``sink_tokens`` first positions plus the most recent positions, ``budget`` entries in all.

    Args:
        budget: KV entries per KV head per layer, last prompt token included (default 256).
        sink_tokens: first positions always kept (default 4); must leave room for recent ones
            (``sink_tokens < budget - 1``).
    """

    sink_tokens: int = 4

    name: ClassVar[str] = "streamingllm"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sink_tokens", self.sink_tokens, 0)
        if self.budget is not None and self.sink_tokens >= self.budget - 1:
            msg = f"sink_tokens must be >= 0 and < budget - 1 = {self.budget - 1}, got {self.sink_tokens}."
            raise ValueError(msg)

    def select(self, scores: torch.Tensor | None, older: int) -> torch.Tensor:
        """The first ``sink_tokens`` positions and the most recent ones, the same for every head."""
        assert self.budget is not None
        recent = self.budget - 1 - self.sink_tokens
        return torch.cat([torch.arange(self.sink_tokens), torch.arange(older - recent, older)])

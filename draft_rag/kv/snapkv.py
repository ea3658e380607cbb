"""SnapKV: keep the prompt KV entries that the last prompt window attends to most.

Based on https://arxiv.org/abs/2404.14469. The target's own queries at the end of the prompt (the window
and the last prompt token) score every older key through :class:`~draft_rag.scoring.ObserverScores`; the
scores are max-pooled over positions so that neighbours of a hit survive with it, and each KV head keeps
its top entries plus the window. SpecKV is the same selection with more observers (a draft's answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from draft_rag.checks import check_int
from draft_rag.kv.base import KVEviction, Observers
from draft_rag.scoring import Pool, ScoreReduction, pool_scores


@dataclass
class SnapKVEviction(KVEviction):
    """Per KV head, keep the ``window_size`` positions before the last prompt token and the best older ones.

    Args:
        budget: KV entries per KV head per layer, last prompt token included (default 256).
        window_size: prompt positions before the last one that are always kept and observe (default 32);
            must be smaller than ``budget``.
        kernel_size: max/avg pooling width over positions applied to the scores (default 7).
        pool: ``"max"`` (default) or ``"avg"`` pooling.
        reduction: how the query heads of a KV group and the observers are reduced (default max/max).
    """

    window_size: int = 32
    kernel_size: int = 7
    pool: Pool = "max"
    reduction: ScoreReduction = field(default_factory=ScoreReduction)

    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window_size", self.window_size, 0)
        check_int("kernel_size", self.kernel_size, 1)
        if self.budget is not None and self.window_size >= self.budget:
            msg = (
                f"window_size must be smaller than budget ({self.budget}), got {self.window_size}; "
                "lower window_size or raise budget."
            )
            raise ValueError(msg)
        if self.pool not in ("max", "avg"):
            msg = f"pool must be 'max' or 'avg', got {self.pool!r}."
            raise ValueError(msg)

    def observers(self, prompt_length: int) -> Observers:
        """The window before the last prompt token, and the last prompt token itself."""
        return Observers(prompt_length - 1 - self.window_size, reduction=self.reduction)

    def select(self, scores: torch.Tensor | None, older: int) -> torch.Tensor:
        """Per KV head, the ``budget - 1 - window_size`` best pooled scores plus the window."""
        assert scores is not None and self.budget is not None
        first = scores.shape[-1]
        top = pool_scores(scores, self.kernel_size, self.pool).topk(self.budget - 1 - self.window_size, dim=-1)
        window = torch.arange(first, older, device=scores.device)
        keep = torch.cat([top.indices, window.expand(*scores.shape[:-1], -1)], dim=-1)
        return keep.sort(dim=-1).values

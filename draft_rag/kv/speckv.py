"""SpecKV: SnapKV selection where a draft model's answer joins the observers.

Based on https://arxiv.org/abs/2506.08373. The prompt window only knows the question; a small draft
model's approximate answer, run through the target after the prompt, also attends to the facts the real
answer will need, so those KV entries survive eviction. The draft answer is passed as text and
re-tokenized with the target tokenizer, so draft and target need not share a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from draft_rag.checks import check_int
from draft_rag.kv.base import Observers
from draft_rag.kv.snapkv import SnapKVEviction
from draft_rag.models import LoadedModel, stop_token_ids
from draft_rag.scoring import prefill
from draft_rag.specpc.draft_pass import greedy_tokens

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass
class SpecKVEviction(SnapKVEviction):
    """:class:`SnapKVEviction` whose observers also include a draft answer's tokens (their KV is dropped).

    Args:
        budget, window_size, kernel_size, pool, reduction: as for SnapKV (defaults 256, 32, 7, max, max/max).
        lookahead_tokens: how many tokens the draft answers with; ``None`` (default) means up to the
            generation's ``max_new_tokens``, stopping at the draft's end of turn.
    """

    lookahead_tokens: int | None = None

    name: ClassVar[str] = "speckv"
    uses_draft: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lookahead_tokens is not None:
            check_int("lookahead_tokens", self.lookahead_tokens, 1)

    def observers(self, prompt_length: int) -> Observers:
        """SnapKV's observers and the draft answer."""
        return replace(super().observers(prompt_length), lookahead=True)


def draft_answer(
    draft: LoadedModel, prompt_ids: torch.Tensor, max_tokens: int, *, chunk_size: int | None = None
) -> str:
    """The draft's greedy answer to ``prompt_ids`` (``[1, n]`` draft tokens) as text, up to its end of turn.

    At most ``max_tokens`` tokens are generated. The prompt is prefilled in one pass, or in chunks of
    ``chunk_size`` tokens. The caller holds the draft's lock.
    """
    ids = prompt_ids.to(draft.device)
    cache, logits = prefill(draft.model, ids, chunk_size=chunk_size or ids.shape[1])
    tokens = greedy_tokens(draft.model, cache, logits, max_tokens, set(stop_token_ids(draft)))
    return draft.tokenizer.decode(tokens, skip_special_tokens=True)


def answer_ids(target_tokenizer: PreTrainedTokenizerBase, answer: str) -> torch.Tensor | None:
    """A draft's ``answer`` re-tokenized as ``[1, L]`` target tokens; None when the answer is empty."""
    if not answer:
        return None
    ids: torch.Tensor = target_tokenizer(answer, add_special_tokens=False, return_tensors="pt").input_ids
    return ids


def draft_lookahead(
    draft: LoadedModel, prompt_ids: torch.Tensor, max_tokens: int, target_tokenizer: PreTrainedTokenizerBase,
    *, chunk_size: int | None = None,
) -> torch.Tensor | None:
    """:func:`draft_answer` under the draft's lock, in target tokens (see :func:`answer_ids`)."""
    with draft.lock:
        answer = draft_answer(draft, prompt_ids, max_tokens, chunk_size=chunk_size)
    return answer_ids(target_tokenizer, answer)

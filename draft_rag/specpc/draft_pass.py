"""The draft pass: the draft reads a prompt (after its cached part) and greedily continues it, scored throughout.

:func:`greedy_tokens` is the one greedy loop of the draft model: SpecPC's lookahead tokens, SpecKV's draft
answer (:func:`draft_rag.kv.speckv.draft_answer`) and, through SpecPC's lookahead, the cascade's draft answer
(:mod:`draft_rag.cascade`) all come from it. torch is imported where it is used, so that importing
:mod:`draft_rag.specpc` does not load it.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import TYPE_CHECKING

from draft_rag.models import LoadedModel, stop_token_ids

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PreTrainedModel

    from draft_rag.draft_cache import DraftCache
    from draft_rag.scoring import ScoreReduction
    from draft_rag.specpc.prompt import _DraftPrompt


def score_prompt(
    draft: LoadedModel,
    prompt: _DraftPrompt,
    window: int,
    lookahead: int,
    reduction: ScoreReduction,
    layers: Sequence[int],
    *,
    cache: DraftCache | None,
    chunk_size: int,
    progress: bool | None,
) -> tuple[torch.Tensor, list[int]]:
    """Draft attention score of every prompt position ``[n]`` (not pooled), and the lookahead tokens generated.

    The draft prefills ``prompt`` (chunked, no full-vocabulary logits) inside
    :class:`~draft_rag.scoring.ObserverScores`, then generates up to ``lookahead`` greedy tokens; the observers
    are the last ``window`` prompt positions and those tokens. Scores are reduced over heads and observers
    (``reduction``), then ``max`` over ``layers``. With a draft ``cache``, the documents' cached K/V stand in
    for the prefill before the window. ``progress`` shows a bar over the prefill (None: only on a terminal).
    """
    import torch
    from tqdm.auto import tqdm

    from draft_rag.scoring import ObserverScores, prefill

    model = draft.model
    n = len(prompt.input_ids)
    ids = torch.tensor([prompt.input_ids], device=draft.device)
    stops = set(stop_token_ids(draft))
    scorer = ObserverScores(model, n - window, window + lookahead, reduction, layers)
    past = None
    if cache is not None:  # the cached documents up to the window; only the rest runs below
        prefix_ids, chunks = prompt.cache_chunks()
        past = cache.context(draft, prefix_ids, chunks, n - window, chunk_size=chunk_size, progress=progress)
    start = 0 if past is None else past.get_seq_length()
    with draft.lock, scorer, tqdm(total=n - start, desc="SpecPC draft prefill", unit="tok",
                                  disable=None if progress is None else not progress) as bar:
        kv, logits = prefill(model, ids[:, start:], past, chunk_size=chunk_size, progress=bar.update)
        # Every lookahead token runs through the draft, the last one too: its query observes.
        generated = greedy_tokens(model, kv, logits, lookahead, stops, feed_last=True)
    per_layer = scorer.scores()[:, 0, :, :n]  # [layers, kv_heads, n]
    per_key = per_layer.amax(dim=1) if reduction.heads == "max" else per_layer.mean(dim=1)
    return per_key.amax(dim=0), generated


def greedy_tokens(
    model: PreTrainedModel,
    cache: Cache,
    logits: torch.Tensor,
    max_tokens: int,
    stop_ids: Container[int],
    *,
    feed_last: bool = False,
) -> list[int]:
    """The model's greedy continuation of the sequence in ``cache``: at most ``max_tokens`` token ids, cut
    before the first of ``stop_ids`` (which is never run).

    ``logits`` (``[1, vocab]``) are the last position's. Each token taken runs through the model, extending
    ``cache``, to give the next one's logits; the last one runs only with ``feed_last``, for hooks that
    read its query (SpecPC's observers), since nothing reads its logits. The caller holds the model's lock.
    """
    from draft_rag.scoring import prefill

    tokens: list[int] = []
    for _ in range(max_tokens):
        token = logits.argmax(dim=-1, keepdim=True)
        if token.item() in stop_ids:
            break
        tokens.append(int(token.item()))
        if len(tokens) == max_tokens and not feed_last:
            break
        _, logits = prefill(model, token, cache)
    return tokens

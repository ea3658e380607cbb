"""The draft pass: the draft reads a prompt (after its cached part) and greedily continues it, scored throughout.

:func:`greedy_tokens` is the one greedy loop of the draft model: SpecPC's lookahead tokens, SpecKV's draft
answer (:func:`draft_rag.kv.speckv.draft_answer`) and, through SpecPC's lookahead, the cascade's draft answer
(:mod:`draft_rag.cascade`) all come from it. torch is imported where it is used, so that importing
:mod:`draft_rag.specpc` does not load it.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from draft_rag.models import LoadedModel, stop_token_ids

if TYPE_CHECKING:
    import torch
    from transformers import Cache, PreTrainedModel

    from draft_rag.draft_cache import DraftCache
    from draft_rag.scoring import ObserverScores, ScoreReduction
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
    observer_block_size: int | None = None,
    recompute: Sequence[int] = (),
) -> tuple[torch.Tensor, list[int]]:
    """Draft attention score of every prompt position ``[n]`` (not pooled), and the lookahead tokens generated.

    The draft prefills ``prompt`` (chunked, no full-vocabulary logits) inside
    :class:`~draft_rag.scoring.ObserverScores`, then generates up to ``lookahead`` greedy tokens; the observers
    are the last ``window`` prompt positions and those tokens. Scores are reduced over heads and observers
    (``reduction``), then ``max`` over ``layers``. With a draft ``cache``, the documents' cached K/V stand in
    for the prefill before the window, and the cached positions among ``recompute`` (increasing) are first computed
    again in context (:func:`~draft_rag.draft_cache.recompute.recompute_in_context`; the window's own positions
    run below anyway). ``progress`` shows a bar over the prefill (None: only on a terminal).
    ``observer_block_size``: observer rows scored at once (None: the scoring's default).
    """
    import torch
    from tqdm.auto import tqdm

    from draft_rag.scoring import OBSERVER_BLOCK_SIZE, ObserverScores, extend_cache, prefill

    model = draft.model
    n = len(prompt.input_ids)
    ids = torch.tensor([prompt.input_ids], device=draft.device)
    stops = set(stop_token_ids(draft))
    scorer = ObserverScores(model, n - window, window + lookahead, reduction, layers,
                            block_size=observer_block_size or OBSERVER_BLOCK_SIZE)
    past = None
    if cache is not None:  # the cached documents up to the window; only the rest runs below
        prefix_ids, chunks = prompt.cache_chunks()
        past = cache.context(draft, prefix_ids, chunks, n - window, chunk_size=chunk_size, progress=progress)
        if recompute:
            from draft_rag.draft_cache.recompute import recompute_in_context

            cached = past.get_seq_length()
            with draft.lock:  # apart from the window's pass below: the scoring hooks watch that one only
                past = recompute_in_context(model, past, prompt.input_ids, [p for p in recompute if p < cached])
    start = 0 if past is None else past.get_seq_length()
    with draft.lock, scorer, tqdm(total=n - start, desc="SpecPC draft prefill", unit="tok",
                                  disable=None if progress is None else not progress) as bar:
        if not lookahead:  # nothing reads the logits
            extend_cache(model, ids[:, start:], past, chunk_size=chunk_size, progress=bar.update)
            generated = []
        else:
            kv, logits = prefill(model, ids[:, start:], past, chunk_size=chunk_size, progress=bar.update)
            # Every lookahead token runs through the draft, the last one too: its query observes.
            generated = greedy_tokens(model, kv, logits, lookahead, stops, feed_last=True, scorer=scorer)
    per_layer = scorer.scores()[:, 0, :, :n]  # [layers, kv_heads, n]
    per_key = per_layer.amax(dim=1) if reduction.heads == "max" else per_layer.mean(dim=1)
    return per_key.amax(dim=0), generated


def greedy_tokens(
    model: PreTrainedModel,
    cache: Cache,
    logits: torch.Tensor,
    max_tokens: int,
    stop_ids: Collection[int],
    *,
    feed_last: bool = False,
    scorer: ObserverScores | None = None,
) -> list[int]:
    """The model's greedy continuation of the sequence in ``cache``: at most ``max_tokens`` token ids, cut
    before the first of ``stop_ids``.

    ``logits`` (``[1, vocab]``) are the last position's. Each token taken runs through the model, extending
    ``cache``, to give the next one's logits; the last one runs only with ``feed_last``, for hooks that
    read its query (SpecPC's observers), since nothing reads its logits. The caller holds the model's lock.

    Tokens are picked and checked against ``stop_ids`` on the device; the host learns them through
    :class:`~draft_rag.decoding.HostCopies`, never by ``.item()``. On a CUDA device a token's stop check is
    read only once its forward pass is queued (the host then waits for that token alone, while the device has
    the next step to run), so the device never idles waiting for the host: a stop token therefore runs through
    the model, its rows are left out of ``scorer`` (the :class:`~draft_rag.scoring.ObserverScores`
    watching these calls, if any, see :meth:`~draft_rag.scoring.ObserverScores.gate`) and its entry is cropped
    from ``cache`` again. Elsewhere the check comes first and the stop token never runs. Either way the tokens,
    the cache and the scores come out the same.
    """
    import torch

    from draft_rag.decoding import HostCopies
    from draft_rag.scoring import prefill

    if max_tokens == 0:
        return []
    device = logits.device
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    copies = HostCopies(max_tokens, 2, device)
    going = torch.ones((), dtype=torch.bool, device=device)
    steps = 0  # tokens picked
    ran = 0  # tokens run through the model
    for step in range(max_tokens):
        token = logits.argmax(dim=-1, keepdim=True)
        going = going & ~torch.isin(token[0, 0], stops)
        copies.put(step, torch.stack([token[0, 0], going.long()]))
        steps += 1
        if not copies.overlaps and not copies.get(step)[1]:
            break
        if steps == max_tokens and not feed_last:
            break
        if scorer is not None and copies.overlaps:
            scorer.gate(going)
        _, logits = prefill(model, token, cache)
        ran += 1
        if copies.overlaps and not copies.get(step)[1]:
            break
    if scorer is not None:
        scorer.gate(None)
    picked = [copies.get(step) for step in range(steps)]
    tokens = [int(token) for token, going_on in picked if going_on]
    if ran > len(tokens):  # the stop token ran: drop its entry (a negative crop removes that many)
        cache.crop(len(tokens) - ran)
    return tokens

"""SpecPC: draft-model guided prompt compression.

The draft model reads [documents + question]; the attention that the question window (and optional
lookahead tokens the draft generates) pays to each document token decides which spans survive, up to a
token budget. The output is text, so any target model can read it.
Based on https://arxiv.org/abs/2506.08373 (Draft-based Approximate Inference for LLMs).

How tokens are picked, top to bottom in this file:
1. ``_DraftPrompt`` lays the documents and the question into the draft's chat template, recording for
   every document token its character span in its document.
2. ``_score_context`` prefills the draft (chunked, no full-vocabulary logits) inside
   :class:`~draft_rag.scoring.ObserverScores`; the observers are the last ``window_size`` prompt positions
   plus ``lookahead_tokens - 1`` greedy draft tokens. Scores are reduced over heads and observers, then
   ``max`` over layers ``>= starting_layer_index``, then max/avg-pooled over positions.
3. ``select_tokens`` walks document tokens by descending score and adds each one's centred neighbourhood
   of ``neighbor_tokens`` until the budget is full.
4. ``_rebuild`` turns kept tokens into character spans snapped to word edges, joined by an elision marker.
   The result is re-counted with the target tokenizer (or the draft's) and the selection shrunk until the
   documents fit the budget.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from draft_rag.models import DEFAULT_DRAFT, LoadedModel, load_model, stop_token_ids
from draft_rag.scoring import Pool, Reduction

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class CompressedDocument:
    """One input document after compression.

    Attributes:
        text: the kept text: source spans in order, joined (and, where text was cut at either end,
            framed) by the elision marker. Equal to the source when nothing was cut.
        spans: kept ``(start, end)`` character ranges of the source document, sorted and disjoint.
        kept_tokens: tokens of ``text`` (target tokenizer when given, else the draft's).
        original_tokens: tokens of the source document, counted the same way.
        score: the highest pooled draft attention score of any of the document's tokens (0 when the
            document was passed through without scoring).
    """

    text: str
    spans: list[tuple[int, int]]
    kept_tokens: int
    original_tokens: int
    score: float = 0.0

    @property
    def dropped(self) -> bool:
        """True when the document had content and none of it was kept."""
        return self.original_tokens > 0 and not self.spans

    @property
    def compressed(self) -> bool:
        """True when some of the document was cut."""
        return self.kept_tokens != self.original_tokens or len(self.spans) > 1

    def as_metadata(self) -> dict[str, Any]:
        """Everything but the text, as plain data for a framework's metadata: counts, spans, score, dropped."""
        return {
            "kept_tokens": self.kept_tokens,
            "original_tokens": self.original_tokens,
            "spans": [list(span) for span in self.spans],
            "score": self.score,
            "dropped": self.dropped,
        }


@dataclass(frozen=True)
class CompressionResult:
    """The output of :meth:`SpecPC.compress`: one :class:`CompressedDocument` per input document, in order."""

    documents: list[CompressedDocument]
    query: str
    budget: int
    seconds: float = 0.0
    draft_prompt_tokens: int = 0

    @property
    def total_kept_tokens(self) -> int:
        return sum(d.kept_tokens for d in self.documents)

    @property
    def total_original_tokens(self) -> int:
        return sum(d.original_tokens for d in self.documents)

    @property
    def texts(self) -> list[str]:
        return [d.text for d in self.documents]


@dataclass
class SpecPC:
    """SpecPC prompt compression with a small draft model.

    Shortens retrieved documents to the spans a draft model attends to when reading the question, so a
    target model reads at most ``budget`` tokens of context. Defaults are the paper's settings for Qwen.
    Based on https://arxiv.org/abs/2506.08373.

    Args:
        draft: draft model: a packaged name (default ``"qwen2.5-coder-0.5b-instruct"``), a Hugging Face id or
            path, a ``.gguf`` file, or a :class:`~draft_rag.models.LoadedModel`. Loaded on first use.
        budget: most tokens of document text to keep, over all documents (1024). Counted in
            ``target_tokenizer`` tokens when given, else draft tokens. The question is not compressed and
            not counted; the elision markers are counted.
        window_size: the last prompt positions (question and template tail) whose queries observe (64).
        lookahead_tokens: ``0`` or ``1``: observe during prefill only; ``k > 1``: the draft also generates
            ``k - 1`` greedy tokens whose queries observe too (1).
        starting_layer_index: layers from this index on are maxed over (8; clamped to the last layer).
        pool: ``"max"`` or ``"avg"`` smoothing of scores over positions (``"max"``).
        kernel_size: smoothing window in tokens (64).
        reduction: how query heads are combined, ``"max"`` or ``"mean"`` (``"max"``).
        observer_reduction: how observer rows are combined, ``"max"`` or ``"mean"`` (``"max"``).
        neighbor_tokens: each selected token brings its centred neighbourhood of this many tokens (64).
        weighted_query: scale observer rows by a 0 → 1 ramp from oldest to newest first (True).
        target_tokenizer: tokenizer (or name/path) of the model that will read the result, for counting.
        chunk_size: prefill chunk length, bounding activation memory on long inputs (2048).
        elision_marker: placed between kept spans, and at either end where text was cut (``" … "``).
        device, dtype: where and how to run the draft (default CUDA + bf16 when available, else CPU fp32).
        progress: show a progress bar over the prefill (None: only on a terminal).

    Example:
        >>> pc = SpecPC(budget=512)
        >>> result = pc.compress("What is the magic number?", [long_text_1, long_text_2])
        >>> result.documents[0].text, result.total_kept_tokens
    """

    draft: str | LoadedModel = DEFAULT_DRAFT
    budget: int = 1024
    window_size: int = 64
    lookahead_tokens: int = 1
    starting_layer_index: int = 8
    pool: Pool = "max"
    kernel_size: int = 64
    reduction: Reduction = "max"
    observer_reduction: Reduction = "max"
    neighbor_tokens: int = 64
    weighted_query: bool = True
    target_tokenizer: str | PreTrainedTokenizerBase | None = None
    chunk_size: int = 2048
    elision_marker: str = " … "
    device: str | None = None
    dtype: Any = None
    progress: bool | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("budget", "window_size", "kernel_size", "neighbor_tokens", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"SpecPC {name} must be a positive integer, got {value!r}."
                raise ValueError(msg)
        for name in ("lookahead_tokens", "starting_layer_index"):
            if getattr(self, name) < 0:
                msg = f"SpecPC {name} must be >= 0, got {getattr(self, name)!r}."
                raise ValueError(msg)
        for name, allowed in (("pool", ("max", "avg")), ("reduction", ("max", "mean")),
                              ("observer_reduction", ("max", "mean"))):
            if getattr(self, name) not in allowed:
                msg = f"SpecPC {name} must be one of {allowed}, got {getattr(self, name)!r}."
                raise ValueError(msg)

    def load(self) -> LoadedModel:
        """Load the draft model now (it is otherwise loaded on the first compression)."""
        if not isinstance(self.draft, LoadedModel):
            self.draft = load_model(self.draft, device=self.device, dtype=self.dtype)
        if isinstance(self.target_tokenizer, str):
            from transformers import AutoTokenizer

            self.target_tokenizer = AutoTokenizer.from_pretrained(self.target_tokenizer)
        return self.draft

    def compress(self, query: str, documents: Sequence[str]) -> CompressionResult:
        """Compress ``documents`` for ``query`` to at most ``budget`` tokens of document text.

        Documents come back in input order, one result per input. Whitespace-only documents are passed
        through unchanged. When the documents already fit the budget they are returned unchanged and the
        draft model does not run.

        Raises:
            TypeError: ``query`` is not a string, ``documents`` is a string or holds a non-string.
            ValueError: ``query`` is empty, or the prompt exceeds the draft model's context length.
        """
        _check_inputs(query, documents)
        started = time.perf_counter()
        with self._lock:
            draft = self.load()
            counter = cast("PreTrainedTokenizerBase", self.target_tokenizer or draft.tokenizer)
            originals = [_count(counter, doc) for doc in documents]
            if sum(originals) <= self.budget:
                kept = [_unchanged(doc, n) for doc, n in zip(documents, originals)]
                return CompressionResult(kept, query, self.budget, time.perf_counter() - started)
            prompt = _DraftPrompt(draft.tokenizer, query, documents)
            _check_length(prompt, documents, draft, self.lookahead_tokens)
            scores = self._score_context(draft, prompt)
        compressed = self._fit_budget(prompt, scores, counter, originals)
        return CompressionResult(
            compressed, query, self.budget, time.perf_counter() - started, len(prompt.input_ids)
        )

    def _score_context(self, draft: LoadedModel, prompt: _DraftPrompt) -> torch.Tensor:
        """Pooled draft attention score of every prompt position, ``[n]``."""
        import torch
        from tqdm.auto import tqdm

        from draft_rag.scoring import ObserverScores, ScoreReduction, pool_scores, prefill

        model = draft.model
        n = len(prompt.input_ids)
        window = min(self.window_size, n)
        extra = max(self.lookahead_tokens - 1, 0)
        num_layers = model.config.num_hidden_layers
        first_layer = min(self.starting_layer_index, num_layers - 1)
        reduction = ScoreReduction(self.reduction, self.observer_reduction, self.weighted_query)
        ids = torch.tensor([prompt.input_ids], device=draft.device)
        stops = set(stop_token_ids(draft))
        scorer = ObserverScores(model, n - window, window + extra, reduction, range(first_layer, num_layers))
        with scorer, tqdm(total=n, desc="SpecPC draft prefill", unit="tok",
                          disable=None if self.progress is None else not self.progress) as bar:
            cache, logits = prefill(model, ids, chunk_size=self.chunk_size, progress=bar.update)
            for _ in range(extra):
                token = logits.argmax(dim=-1, keepdim=True)
                if token.item() in stops:
                    break
                _, logits = prefill(model, token, cache)
        per_layer = scorer.scores()[:, 0, :, :n]  # [layers, kv_heads, n]
        per_key = per_layer.amax(dim=1) if self.reduction == "max" else per_layer.mean(dim=1)
        return pool_scores(per_key.amax(dim=0), self.kernel_size, self.pool)

    def _fit_budget(
        self,
        prompt: _DraftPrompt,
        scores: torch.Tensor,
        counter: PreTrainedTokenizerBase,
        originals: list[int],
    ) -> list[CompressedDocument]:
        """Select tokens for a draft-token budget, rebuild the text, and shrink until it fits the budget."""
        context_scores = scores[prompt.context_positions()]
        draft_budget = self.budget
        while True:
            kept = select_tokens(context_scores, draft_budget, self.neighbor_tokens)
            documents = self._rebuild(prompt, kept.tolist(), context_scores, counter, originals)
            total = sum(d.kept_tokens for d in documents)
            if total <= self.budget or draft_budget == 0:
                return documents
            # Word snapping, markers and a different target tokenizer can all add tokens: shrink and retry.
            draft_budget = min(draft_budget - 1, draft_budget * self.budget // total)

    def _rebuild(
        self,
        prompt: _DraftPrompt,
        kept: list[int],
        context_scores: torch.Tensor,
        counter: PreTrainedTokenizerBase,
        originals: list[int],
    ) -> list[CompressedDocument]:
        kept_set = set(kept)
        results = []
        offset = 0
        for doc_index, source in enumerate(prompt.documents):
            token_spans = prompt.offsets[doc_index]
            if token_spans is None:
                results.append(_unchanged(source, originals[doc_index]))
                continue
            local = [i for i in range(len(token_spans)) if offset + i in kept_set]
            spans = snap_spans(source, [token_spans[i] for i in local])
            text = join_spans(source, spans, self.elision_marker)
            doc_scores = context_scores[offset : offset + len(token_spans)]
            score = float(doc_scores.max()) if len(token_spans) else 0.0
            kept_tokens = originals[doc_index] if text == source else _count(counter, text)
            results.append(CompressedDocument(text, spans, kept_tokens, originals[doc_index], score))
            offset += len(token_spans)
        return results


def select_tokens(scores: torch.Tensor, budget: int, neighbor_tokens: int) -> torch.Tensor:
    """Indices (sorted) of at most ``budget`` positions: top scores, each with its centred neighbourhood.

    Positions are visited by descending score (ties: earlier first); each visit adds the not-yet-kept
    positions of ``[p - neighbor_tokens // 2, p - neighbor_tokens // 2 + neighbor_tokens)``, nearest to
    ``p`` first, until ``budget`` positions are kept.
    """
    import torch

    m = scores.shape[0]
    budget = min(budget, m)
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(scores.float().cpu(), descending=True, stable=True)
    if neighbor_tokens <= 1:
        return order[:budget].sort().values
    kept = torch.zeros(m, dtype=torch.bool)
    count = 0
    half = neighbor_tokens // 2
    for center in order.tolist():
        lo, hi = max(center - half, 0), min(center - half + neighbor_tokens, m)
        window = torch.arange(lo, hi)
        fresh = window[~kept[lo:hi]]
        if fresh.numel() == 0:
            continue
        if count + fresh.numel() > budget:
            nearest = torch.argsort((fresh - center).abs(), stable=True)[: budget - count]
            fresh = fresh[nearest]
        kept[fresh] = True
        count += fresh.numel()
        if count >= budget:
            break
    return kept.nonzero().flatten()


def snap_spans(source: str, token_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge token character spans and widen them to whole whitespace-delimited words.

    Spans that touch, overlap or are separated only by whitespace become one; leading and trailing
    whitespace is trimmed from each span.
    """
    snapped: list[tuple[int, int]] = []
    for start, end in sorted(token_spans):
        while start > 0 and not source[start - 1].isspace():
            start -= 1
        while end < len(source) and not source[end].isspace():
            end += 1
        while start < end and source[start].isspace():
            start += 1
        while end > start and source[end - 1].isspace():
            end -= 1
        if start == end:
            continue
        if snapped and not source[snapped[-1][1] : start].strip():
            snapped[-1] = (snapped[-1][0], max(end, snapped[-1][1]))
        else:
            snapped.append((start, end))
    return snapped


def join_spans(source: str, spans: list[tuple[int, int]], marker: str) -> str:
    """The text of ``spans``, joined by ``marker``; a trimmed marker also stands where either end was cut."""
    if not spans:
        return ""
    if spans == [(0, len(source))]:
        return source
    text = marker.join(source[s:e] for s, e in spans)
    if source[: spans[0][0]].strip():
        text = marker.lstrip() + text
    if source[spans[-1][1] :].strip():
        text = text + marker.rstrip()
    return text


class _DraftPrompt:
    """Token ids of [chat template prefix, documents, question, template suffix] with document offsets.

    Each document is tokenised on its own so that every one of its tokens maps to a character span of that
    document. Whitespace-only documents are left out of the prompt (``offsets`` is None for them).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, query: str, documents: Sequence[str]) -> None:
        prefix, suffix = _template_parts(tokenizer)
        self.documents = list(documents)
        self.input_ids: list[int] = _encode(tokenizer, prefix)
        self.starts: list[int] = []
        self.offsets: list[list[tuple[int, int]] | None] = []
        for doc in documents:
            if not doc.strip():
                self.offsets.append(None)
                continue
            encoded = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
            self.starts.append(len(self.input_ids))
            self.offsets.append([tuple(span) for span in encoded["offset_mapping"]])
            self.input_ids += encoded["input_ids"] + _encode(tokenizer, "\n\n")
        self.input_ids += _encode(tokenizer, f"Question: {query}{suffix}")

    def context_positions(self) -> torch.Tensor:
        """Prompt positions of all document tokens, document after document."""
        import torch

        lengths = [len(o) for o in self.offsets if o is not None]
        return torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, lengths)])


def _template_parts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The chat template's text before and after a single user message (plain text without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return "", "\nAnswer:"
    marker = "\u2063DRAFT_RAG_CONTENT\u2063"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    prefix, suffix = str(rendered).split(marker)
    return prefix, suffix


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(_encode(tokenizer, text))


def _unchanged(source: str, tokens: int) -> CompressedDocument:
    spans = [(0, len(source))] if source else []
    return CompressedDocument(source, spans, tokens, tokens)


def _check_inputs(query: object, documents: object) -> None:
    if not isinstance(query, str):
        msg = f"query must be a string, got {type(query).__name__}."
        raise TypeError(msg)
    if not query.strip():
        msg = "query is empty; SpecPC needs the question to decide what to keep."
        raise ValueError(msg)
    if isinstance(documents, str) or not isinstance(documents, Sequence):
        msg = (
            f"documents must be a list of strings, got {type(documents).__name__}; "
            "wrap a single document as [text]."
        )
        raise TypeError(msg)
    for index, doc in enumerate(documents):
        if not isinstance(doc, str):
            msg = (
                f"documents[{index}] must be a string, got {type(doc).__name__}; "
                "pass the page text (e.g. Document.page_content)."
            )
            raise TypeError(msg)


def _check_length(
    prompt: _DraftPrompt, documents: Sequence[str], draft: LoadedModel, lookahead_tokens: int
) -> None:
    needed = len(prompt.input_ids) + max(lookahead_tokens - 1, 0)
    if needed <= draft.max_context:
        return
    longest = max(range(len(documents)), key=lambda i: len(prompt.offsets[i] or []))
    msg = (
        f"documents need {needed} draft tokens with the question, more than the draft model's maximum "
        f"context of {draft.max_context} (the longest is documents[{longest}] with "
        f"{len(prompt.offsets[longest] or [])} tokens). Split long documents into smaller chunks or "
        "retrieve fewer of them."
    )
    raise ValueError(msg)

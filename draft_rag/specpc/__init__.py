"""SpecPC: draft-model guided prompt compression.

The draft model reads [documents + question]; the attention that the question window (and optional
lookahead tokens the draft generates) pays to each document token decides which spans survive, up to a
token budget. The output is text, so any target model can read it.
Based on https://arxiv.org/abs/2506.08373 (Draft-based Approximate Inference for LLMs).

How tokens are picked, one module of this package per step:
1. ``prompt``: ``_DraftPrompt`` lays the documents and the question into the draft's chat template,
   recording for every document token its character span in its document.
2. ``draft_pass``: the draft reads the prompt (chunked, no full-vocabulary logits) inside
   :class:`~draft_rag.scoring.ObserverScores`; the observers are the question's own tokens and the template's
   end (``observe_from="question"``, the default when the documents are read apart) or the last ``window_size``
   prompt positions (``"window"``), plus ``lookahead_tokens - 1`` greedy draft tokens. Scores are reduced over
   heads and observers, then ``max`` over layers ``>= starting_layer_index``. By default (``reading="apart"``)
   each document is encoded on its own through a :mod:`draft_rag.draft_cache` (the ``cache`` given, else one
   kept for the call) and only the observers run over the documents' K/V; ``reading="joint"`` prefills the
   whole prompt at once.
3. ``selection``: scores are max/avg-pooled over positions; ``selection_order`` walks document tokens by
   descending score and adds each one's centred neighbourhood of ``neighbor_tokens`` until the budget is full.
4. ``text`` (from ``SpecPC._rebuild`` here): kept tokens become character spans, widened a little to word
   edges (``snap_spans``), joined by an elision marker. The result is re-counted with the target tokenizer
   (or the draft's), and ``fit_to_budget`` searches for the largest selection whose text fits the budget.

This module holds :class:`SpecPC` and its result types. No module of the package imports torch at load
time, so ``text`` (pure Python) can be used without it.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from draft_rag.models import DEFAULT_DRAFT, LoadedModel, load_model
from draft_rag.specpc.draft_pass import score_prompt
from draft_rag.specpc.prompt import _cache_chunks, _check_documents, _check_inputs, _check_length, _count, _DraftPrompt
from draft_rag.specpc.selection import candidate_positions, fit_to_budget, pool_context, selection_order
from draft_rag.specpc.text import ELISION_MARKER, join_spans, snap_spans

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from draft_rag.draft_cache import DraftCache
    from draft_rag.scoring import Pool, Reduction

OBSERVE_FROM = ("auto", "window", "question")
"""The values of :attr:`SpecPC.observe_from`: where the observing prompt positions start (``"auto"``: from the
question when the documents are read apart, else the window)."""

READINGS = ("apart", "joint")
"""The values of :attr:`SpecPC.reading`: how the draft reads the documents (``"apart"``: each on its own, as a
:class:`~draft_rag.draft_cache.DraftCache` stores them; ``"joint"``: all in one prefill, as the paper does)."""

SELECTION_SETTINGS = frozenset({"budget", "pool", "kernel_size", "neighbor_tokens", "document_boundaries",
                                "elision_marker", "rescore_factor", "recompute_factor"})
"""SpecPC settings that act only after the draft pass: two SpecPCs that differ only in these read a text
alike, so the :class:`ContextScores` of one can be passed to the other's :meth:`SpecPC.select`
(``rescore_factor``'s and ``recompute_factor``'s second pass runs in :meth:`SpecPC.select`)."""

_UNBOUNDED = 1 << 62
"""Bytes enough for any one call's documents: the size of the cache a reading apart without a ``cache`` keeps."""

_NOT_KNOBS = frozenset({"draft", "budget", "target_tokenizer", "device", "dtype", "progress", "cache",
                        "observer_block_size"})


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
        blank: the source was empty or whitespace only: there was nothing to keep, so it is never
            ``dropped``.
    """

    text: str
    spans: list[tuple[int, int]]
    kept_tokens: int
    original_tokens: int
    score: float = 0.0
    blank: bool = False

    @property
    def dropped(self) -> bool:
        """True when the document had content and none of it was kept."""
        return not self.blank and self.original_tokens > 0 and not self.spans

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
    lookahead_text: str = ""
    """The draft's greedy continuation whose queries observed (``lookahead_tokens - 1`` tokens at most, cut
    at its end of turn), decoded; empty when the draft did not run or generated nothing. SpecKV's cascade
    reuses it as the draft answer."""

    @property
    def total_kept_tokens(self) -> int:
        return sum(d.kept_tokens for d in self.documents)

    @property
    def total_original_tokens(self) -> int:
        return sum(d.original_tokens for d in self.documents)

    @property
    def texts(self) -> list[str]:
        return [d.text for d in self.documents]


@dataclass(frozen=True)
class ContextScores:
    """One draft pass over a query and its documents (:meth:`SpecPC.score`), selectable at any budget.

    Attributes:
        query, documents: what was read.
        original_tokens: tokens of each document, counted as the budget counts them.
        seconds: how long counting and the draft pass took.
        prompt: the draft prompt and its token-to-character map (None when every document is blank).
        scores: the draft's attention score of every draft prompt position, not yet pooled (None likewise).
        lookahead_text: the draft's decoded lookahead tokens (see :attr:`CompressionResult.lookahead_text`).
        cache: the draft cache the documents were read from when read apart (the SpecPC's ``cache``, else one
            made for this reading, holding these documents' K/V), for :meth:`SpecPC.select`'s second pass; None
            when they were read jointly or not at all.
    """

    query: str
    documents: list[str]
    original_tokens: list[int]
    seconds: float
    prompt: _DraftPrompt | None = None
    scores: torch.Tensor | None = None
    lookahead_text: str = ""
    cache: DraftCache | None = field(default=None, repr=False)


@dataclass
class SpecPC:
    """SpecPC prompt compression with a small draft model.

    Shortens retrieved documents to the spans a draft model attends to when reading the question, so a
    target model reads at most ``budget`` tokens of context. Defaults are the paper's settings for Qwen, except
    three chosen on the benchmark's tuning seed (``document_boundaries``, ``kernel_size``, ``neighbor_tokens``) and
    the reading (``reading="apart"`` with the question's observers; the paper's is ``reading="joint"``).
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
        kernel_size: smoothing window in tokens (8; the paper's 64 kept fewer facts on the tuning seed at
            4k-token contexts and 256-1024-token budgets).
        reduction: how query heads are combined, ``"max"`` or ``"mean"`` (``"max"``).
        observer_reduction: how observer rows are combined, ``"max"`` or ``"mean"`` (``"max"``).
        neighbor_tokens: each selected token brings its centred neighbourhood of this many tokens (8; the
            paper's 64 spends a small budget on few places, and a fact spread over several documents needs
            more of them).
        weighted_query: scale observer rows by a 0 → 1 ramp from oldest to newest first (True).
        reading: how the draft reads the documents. ``"apart"`` (default): each document on its own, after the
            chat template's opening, as a ``cache`` stores it (without one, the documents' K/V are kept for the
            call only), and then the observers read over all of them; ``"joint"``: one prefill of the whole
            prompt, in which later documents attend to earlier ones (the paper's reading). Apart costs less
            (attention within each document instead of over the whole context: about 5.4 s against 14.0 s for a
            4k-token prompt on 2 CPU cores in bf16) and on the benchmark answered more: with the question's
            observers, +13.1 / +10.3 / +8.4 points over the joint reading at 256 / 512 / 1024 tokens on the
            synthetic tasks (seed 0, n = 80, every interval above 0), -3.3 / -6.6 / +3.3 on its 61 book questions
            (no interval excluding 0). Apart needs a draft whose keys can be moved to new positions (one RoPE for
            all layers, without length-dependent scaling, on one device): others (e.g. Gemma 3) get a
            NotImplementedError before any compute, whose message points to ``"joint"``. A ``cache`` needs ``"apart"``.
        observe_from: ``"window"``: the last ``window_size`` prompt positions observe; ``"question"``: the
            observers start at the question instead (its ``Question:`` line and the template's end), so a short
            question is not padded out with the tail of the last document; ``"auto"`` (default): ``"question"``
            when the documents are read apart, ``"window"`` when they are read jointly. Over documents read apart
            the question's observers answered more than the window on the benchmark (seed 0, n = 80: +12.5 /
            +8.8 / +2.5 points at 256 / 512 / 1024 tokens, the first two intervals above 0; on its 61 book
            questions 0.0 / 0.0 / +3.3) for less draft work; over a joint prefill they did not (+0.0 / -0.8 /
            -1.2 on the synthetic tasks, +3.3 / -6.6 / -4.9 on the book questions). :meth:`settings` and
            :attr:`observers` give the resolved value.
        document_boundaries: pooling and neighbourhoods stop at document edges, so a hit near the end of
            one document neither lifts nor keeps the start of the next (True: chosen on the benchmark's
            tuning seed, where it kept more of the facts spread over several documents; False is the
            paper's behaviour).
        ramp_window_only: with ``weighted_query``, the ramp spans the prompt observers only and every
            lookahead row weighs 1 (False: the ramp spans all observers).
        target_tokenizer: tokenizer (or name/path) of the model that will read the result, for counting.
        chunk_size: prefill chunk length, bounding activation memory on long inputs (2048).
        observer_block_size: observer rows whose attention onto all keys is computed at once, bounding the
            scoring's extra memory (O(rows * heads * prompt tokens) per layer); None (default) is
            :data:`draft_rag.scoring.OBSERVER_BLOCK_SIZE` (32). The kept text does not depend on it.
        elision_marker: placed between kept spans, and at either end where text was cut (``" … "``; ``""``
            joins the spans directly).
        rescore_factor: ``0`` (default): select from the draft pass. ``k >= 2``: select ``k x budget`` tokens
            of candidates from it, then let the draft read the candidates' text and the question once more, in
            one joint prefill (:mod:`draft_rag.specpc.rescore`), and select the budget from that reading, which
            sees the candidates together. It costs a draft pass over about ``k x budget`` tokens per
            compression. On the benchmark's book questions, 2 over documents read apart kept the gold answer in
            the text nearly as often as the joint reading on the questions it was chosen on, but the target's
            answers gained little over the reading apart alone
            (see the benchmark's results, "Real documents"), so it is off by default.
        recompute_factor: ``0`` (default): select from the draft pass. ``k >= 2``, reading apart: select
            ``k x budget`` tokens of candidates from it, compute the candidates' draft K/V again in context (each
            attends to every document before it, not only to its own:
            :mod:`draft_rag.draft_cache.recompute`), let the observers read once more over that cache, and select
            the budget among the candidates from that reading. It costs a draft forward over the ``k x budget``
            candidates per compression. Reading jointly there is nothing to recompute and it does nothing.
            Use at most one of ``rescore_factor`` and ``recompute_factor``. On the benchmark's book questions, 2
            with question observers kept the gold answer as often as the joint reading on the questions it was
            tried on, but the target's answers gained nothing over the reading apart alone (see the benchmark's
            results, "Real documents"), so it is off by default.
        device, dtype: where and how to run the draft (default CUDA when available, in bf16 where the GPU has
            it natively, else fp16; else the CPU, in bf16 where it has native bf16, else fp32).
        progress: show a progress bar over the prefill (None: only on a terminal).
        cache: a :class:`~draft_rag.draft_cache.DraftCache` of per-document draft K/V (None: each call encodes
            its documents afresh). With one, each document is encoded once, as ``reading="apart"`` reads it, and
            reused by later queries, which run only the observers' tokens through the draft; the scores are those
            of the same call without a cache. :meth:`warm` encodes documents ahead of the first query.

    The fields keep what was passed; the loaded draft and tokenizer are held privately (see :meth:`load`).
    One draft model can serve several threads: its forward passes take turns on the model's lock.

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
    kernel_size: int = 8
    reduction: Reduction = "max"
    observer_reduction: Reduction = "max"
    neighbor_tokens: int = 8
    weighted_query: bool = True
    reading: str = "apart"
    observe_from: str = "auto"
    document_boundaries: bool = True
    ramp_window_only: bool = False
    target_tokenizer: str | PreTrainedTokenizerBase | None = None
    chunk_size: int = 2048
    observer_block_size: int | None = None
    elision_marker: str = ELISION_MARKER
    rescore_factor: int = 0
    recompute_factor: int = 0
    device: str | None = None
    dtype: Any = None
    progress: bool | None = None
    cache: DraftCache | None = None
    _draft: LoadedModel | None = field(default=None, init=False, repr=False, compare=False)
    _counter: PreTrainedTokenizerBase | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from draft_rag.checks import check_candidate_factors, check_int, check_text

        minimums = {"budget": 1, "window_size": 1, "kernel_size": 1, "neighbor_tokens": 1, "chunk_size": 1,
                    "lookahead_tokens": 0, "starting_layer_index": 0, "rescore_factor": 0, "recompute_factor": 0}
        for name, minimum in minimums.items():
            check_int(f"SpecPC {name}", getattr(self, name), minimum)
            setattr(self, name, int(getattr(self, name)))
        check_candidate_factors(self.rescore_factor, self.recompute_factor, owner="SpecPC ")
        if self.observer_block_size is not None:
            check_int("SpecPC observer_block_size", self.observer_block_size, 1)
            self.observer_block_size = int(self.observer_block_size)
        for name, allowed in (("pool", ("max", "avg")), ("reduction", ("max", "mean")),
                              ("observer_reduction", ("max", "mean")), ("observe_from", OBSERVE_FROM),
                              ("reading", READINGS)):
            if getattr(self, name) not in allowed:
                msg = f"SpecPC {name} must be one of {allowed}, got {getattr(self, name)!r}."
                raise ValueError(msg)
        if self.reading == "joint" and self.cache is not None:
            msg = ("SpecPC reading='joint' prefills the documents together, but a cache holds each one read apart; "
                   "pass reading='apart' (the default) to use the cache, or leave out cache= to read jointly.")
            raise ValueError(msg)
        if not isinstance(self.elision_marker, str):
            msg = (
                f"SpecPC elision_marker must be a string, got {type(self.elision_marker).__name__} "
                f"{self.elision_marker!r}; pass the text to put where text was cut (default {ELISION_MARKER!r}), "
                "or '' to join kept spans with nothing between them."
            )
            raise TypeError(msg)
        check_text("SpecPC elision_marker", self.elision_marker)

    def settings(self) -> dict[str, Any]:
        """The knobs that decide which text is kept, by name: every field but the budget, the models, where
        they run and the cache, ``observe_from`` resolved (e.g. for a log or a results file; a changed default
        shows up here)."""
        knobs = {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name not in _NOT_KNOBS}
        return {**knobs, "observe_from": self.observers}

    @property
    def observers(self) -> str:
        """Where the observers start for this instance: :attr:`observe_from`, with ``"auto"`` resolved (``"question"``
        reading apart, ``"window"`` reading jointly)."""
        if self.observe_from != "auto":
            return self.observe_from
        return "question" if self.reading == "apart" else "window"

    def load(self) -> LoadedModel:
        """Load the draft model (and a named ``target_tokenizer``) now; otherwise the first compression does.

        Returns the loaded draft. ``draft`` and ``target_tokenizer`` keep the values they were given.
        """
        return self._loaded()[0]

    def _loaded(self) -> tuple[LoadedModel, PreTrainedTokenizerBase]:
        """The draft and the tokenizer that counts the budget, loaded on the first call."""
        if self._draft is None:
            self._draft = load_model(self.draft, device=self.device, dtype=self.dtype)
        if self._counter is None:
            self._counter = self._load_counter(self._draft)
        return self._draft, self._counter

    def _load_counter(self, draft: LoadedModel) -> PreTrainedTokenizerBase:
        """The tokenizer that counts the budget: ``target_tokenizer`` (loaded if a name), else the draft's."""
        if self.target_tokenizer is None:
            return draft.tokenizer
        if isinstance(self.target_tokenizer, str):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.target_tokenizer)
        return self.target_tokenizer

    def compress(self, query: str, documents: Sequence[str]) -> CompressionResult:
        """Compress ``documents`` for ``query`` to at most ``budget`` tokens of document text.

        Documents come back in input order, one result per input. When the documents (whitespace-only
        ones included) already fit the budget they are returned unchanged and the draft model does not
        run. Otherwise whitespace-only documents come back empty: text ``""``, no spans, ``kept_tokens``
        0 and ``blank`` set (nothing to keep, so not ``dropped``); the budget goes to the others.

        Raises:
            TypeError: ``query`` is not a string, ``documents`` is a string or holds a non-string.
            ValueError: ``query`` is empty, a text holds lone surrogates, or the prompt exceeds the draft
                model's context length.
            NotImplementedError: the draft uses sliding-window attention and the prompt is longer than
                its window.
        """
        _check_inputs(query, documents)
        started = time.perf_counter()
        counter = self._loaded()[1]
        originals = [_count(counter, doc) for doc in documents]
        if sum(originals) <= self.budget:
            kept = [_unchanged(doc, n) for doc, n in zip(documents, originals)]
            return CompressionResult(kept, query, self.budget, time.perf_counter() - started)
        return self.select(self._score(query, documents, originals, started))

    def score(self, query: str, documents: Sequence[str]) -> ContextScores:
        """Run the draft once over ``query`` and ``documents``; :meth:`select` then compresses them to any budget.

        ``compress(query, documents)`` is ``select(score(query, documents))`` except that it skips the draft
        when the documents already fit. Use this to compare several budgets for the price of one draft pass.
        The draft does not run when every document is blank. Raises as :meth:`compress` does.
        """
        _check_inputs(query, documents)
        started = time.perf_counter()
        counter = self._loaded()[1]
        return self._score(query, documents, [_count(counter, doc) for doc in documents], started)

    def select(self, context: ContextScores, budget: int | None = None) -> CompressionResult:
        """Compress the documents that :meth:`score` read to ``budget`` tokens (default :attr:`budget`).

        Selection and pooling use this instance's settings, so ``context`` should come from the :meth:`score`
        of this instance or of one that differs only in :data:`SELECTION_SETTINGS`. The result's ``seconds``
        is the draft pass's time plus the selection's: what one :meth:`compress` call at that budget costs.
        """
        from draft_rag.checks import check_int

        started = time.perf_counter()
        budget = self.budget if budget is None else budget
        check_int("SpecPC budget", budget, 1)
        originals = context.original_tokens
        if sum(originals) <= budget:
            kept = [_unchanged(doc, n) for doc, n in zip(context.documents, originals)]
        elif context.prompt is None or context.scores is None:  # every document blank: nothing was scored
            kept = [_blank(n) for n in originals]
        elif self.rescore_factor:
            kept = self._rescored(context, context.prompt, context.scores, budget)
        elif self.recompute_factor and context.cache is not None:
            kept = self._recomputed(context, context.prompt, context.scores, budget)
        else:
            kept = self._fit_budget(context.prompt, context.scores, self._loaded()[1], originals, budget)
        return CompressionResult(
            kept, context.query, budget, context.seconds + time.perf_counter() - started,
            len(context.prompt.input_ids) if context.prompt else 0, context.lookahead_text,
        )

    def _score(
        self, query: str, documents: Sequence[str], originals: list[int], started: float
    ) -> ContextScores:
        """The draft's scores for the documents (none when all are blank), timed from ``started``."""
        if not any(doc.strip() for doc in documents):
            return ContextScores(query, list(documents), originals, time.perf_counter() - started)
        draft = self._loaded()[0]
        prompt = _DraftPrompt(draft.tokenizer, query, documents)
        _check_length(prompt, draft, self.lookahead_tokens)
        cache = self._reading_cache()
        scores, lookahead = self._score_context(draft, prompt, cache)
        return ContextScores(
            query, list(documents), originals, time.perf_counter() - started, prompt, scores,
            draft.tokenizer.decode(lookahead, skip_special_tokens=True), cache,
        )

    def _reading_cache(self) -> DraftCache | None:
        """The draft cache that one reading goes through: :attr:`cache`; reading apart without one, a cache in
        memory for this reading only (never on disk, unbounded: it holds just the call's documents); reading
        jointly, None."""
        if self.cache is not None or self.reading == "joint":
            return self.cache
        from draft_rag.draft_cache import DraftCache

        return DraftCache(max_bytes=_UNBOUNDED, max_host_bytes=0)

    def warm(self, documents: Sequence[str]) -> None:
        """Encode ``documents`` into :attr:`cache` now, so that the first query over them is fast too.

        Each document is encoded as :meth:`compress` would on first use: on its own, after the chat
        template's opening. Documents are tokenized and encoded one at a time, so memory stays within the
        cache's ``max_bytes`` (plus one document's tokens) however many are passed. Cached documents are
        skipped, whitespace-only ones ignored.

        Raises:
            ValueError: no ``cache`` is set, a text holds lone surrogates, or a document is longer than the
                draft model's context (the message names it; the documents before it are cached by then).
            TypeError: ``documents`` is a string or holds a non-string.
        """
        if self.cache is None:
            msg = "SpecPC.warm needs a draft cache; create SpecPC(..., cache=DraftCache())."
            raise ValueError(msg)
        _check_documents(documents)
        if not any(doc.strip() for doc in documents):
            return
        draft = self.load()
        chunks = _cache_chunks(draft, documents)
        prefix_ids, first = next(chunks)
        self.cache.add(draft, prefix_ids, itertools.chain([first], (chunk for _, chunk in chunks)),
                       chunk_size=self.chunk_size, progress=self.progress)

    def _score_context(
        self, draft: LoadedModel, prompt: _DraftPrompt, cache: DraftCache | None, *, recompute: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[int]]:
        """Draft attention score of every prompt position ``[n]`` (not pooled), and the lookahead tokens generated:
        the draft pass (:func:`~draft_rag.specpc.draft_pass.score_prompt`) with the observers, layers and
        reductions of this instance's settings, over ``cache`` (None: one prefill of the whole prompt), with the
        cached positions among ``recompute`` computed again in context first."""
        from draft_rag.hf import check_supported
        from draft_rag.scoring import ScoreReduction

        model = draft.model
        n = len(prompt.input_ids)
        window = n - prompt.question_start if self.observers == "question" else min(self.window_size, n)
        extra = max(self.lookahead_tokens - 1, 0)
        check_supported(model, n + extra)
        num_layers = model.config.num_hidden_layers
        first_layer = min(self.starting_layer_index, num_layers - 1)
        reduction = ScoreReduction(self.reduction, self.observer_reduction, self.weighted_query,
                                   window if self.ramp_window_only else None)
        return score_prompt(draft, prompt, window, extra, reduction, range(first_layer, num_layers),
                            cache=cache, chunk_size=self.chunk_size, progress=self.progress,
                            observer_block_size=self.observer_block_size, recompute=recompute)

    def _recomputed(
        self, context: ContextScores, prompt: _DraftPrompt, scores: torch.Tensor, budget: int
    ) -> list[CompressedDocument]:
        """The documents selected, among the candidates that ``scores`` give at :attr:`recompute_factor` times
        ``budget``, from a draft pass over the cache with the candidates' K/V recomputed in context."""
        import torch

        draft, counter = self._loaded()
        candidates = candidate_positions(prompt, scores, self.recompute_factor * budget, self.kernel_size, self.pool,
                                         self.neighbor_tokens, self.document_boundaries)
        rescored, _ = self._score_context(draft, prompt, context.cache, recompute=candidates)
        within = torch.zeros(len(prompt.input_ids), dtype=torch.bool)
        within[candidates] = True
        return self._fit_budget(prompt, rescored, counter, context.original_tokens, budget, within)

    def _rescored(
        self, context: ContextScores, prompt: _DraftPrompt, scores: torch.Tensor, budget: int
    ) -> list[CompressedDocument]:
        """The documents selected from a second draft pass over the candidates that ``context``'s ``prompt`` and
        ``scores`` give at :attr:`rescore_factor` times ``budget`` (see :mod:`draft_rag.specpc.rescore`)."""
        from draft_rag.specpc.rescore import candidate_texts, transfer_scores

        draft, counter = self._loaded()
        originals = context.original_tokens
        if context.cache is None and sum(originals) <= self.rescore_factor * budget:
            # Every token is a candidate: the second pass would read the first one's prompt again.
            return self._fit_budget(prompt, scores, counter, originals, budget)
        kept = self._fit_budget(prompt, scores, counter, originals, self.rescore_factor * budget)
        candidates = candidate_texts(context.documents, kept, self.elision_marker)
        candidate_prompt = _DraftPrompt(draft.tokenizer, context.query, [c.text for c in candidates])
        _check_length(candidate_prompt, draft, self.lookahead_tokens)
        candidate_scores, _ = self._score_context(draft, candidate_prompt, None)
        rescored, within = transfer_scores(prompt, candidate_prompt, candidate_scores, candidates)
        return self._fit_budget(prompt, rescored, counter, originals, budget, within)

    def _fit_budget(
        self,
        prompt: _DraftPrompt,
        scores: torch.Tensor,
        counter: PreTrainedTokenizerBase,
        originals: list[int],
        budget: int,
        within: torch.Tensor | None = None,
    ) -> list[CompressedDocument]:
        """The documents rebuilt from the largest token selection whose text fits the budget, among the prompt
        positions ``within`` marks (None: all)."""
        context_scores, segments = pool_context(prompt, scores, self.kernel_size, self.pool, self.document_boundaries,
                                                within)

        # One walk gives every smaller budget's selection as a prefix (the search below tries several).
        order = selection_order(context_scores, budget, self.neighbor_tokens, segments)

        def build(draft_budget: int) -> list[CompressedDocument]:
            return self._rebuild(prompt, sorted(order[:draft_budget]), context_scores, counter, originals)

        return fit_to_budget(build, budget)

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
                results.append(_blank(originals[doc_index]))
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


def _unchanged(source: str, tokens: int) -> CompressedDocument:
    spans = [(0, len(source))] if source else []
    return CompressedDocument(source, spans, tokens, tokens, blank=not source.strip())


def _blank(tokens: int) -> CompressedDocument:
    """A whitespace-only document of ``tokens`` tokens, kept as nothing."""
    return CompressedDocument("", [], 0, tokens, blank=True)

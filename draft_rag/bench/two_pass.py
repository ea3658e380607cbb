"""Two-pass SpecPC: the draft's own answer looks for the second hop of a question.

A question like "which code belongs to Ada Crane's parcel?" shares no word with the fact that holds its answer
("The amber falcon locker opens with 4821937."), only with the fact that leads there ("Ada Crane put the parcel
in the amber falcon locker."). One SpecPC pass, observed from the question, finds the first fact; the draft,
answering from what that pass kept, often names the locker; a second pass observed from the question plus that
answer can then find the second fact. Built only on SpecPC's public API (:meth:`~draft_rag.SpecPC.score` and
:meth:`~draft_rag.SpecPC.select`):

1. First pass: ``score(question, documents)``, then ``select`` at the budget.
2. The draft answers the question from that selection (greedy, at most ``answer_tokens`` tokens), through the
   project's generation engine (:class:`draft_rag.SpecKV` with ``method="full"``, the draft as its target).
3. Second pass: ``score(question + " " + answer, documents)`` over the full context again.
4. Union within the budget: the first pass's best picks at ``first_share`` of the budget are kept, and the
   rest of the budget is filled by the second pass's scores (the largest second-pass selection whose union
   with those picks still fits; text both passes keep counts once). The first pass keeps what the question
   itself finds; the second adds what only the answer finds.

A step that finds nothing new ends early: when the documents fit the budget they come back whole (no draft
runs), and when the draft answers nothing the first selection is returned as it is.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from draft_rag.scoring import check_int
from draft_rag.specpc import CompressedDocument, CompressionResult, fit_to_budget, join_spans, snap_spans

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from draft_rag.specpc import ContextScores, SpecPC

ANSWER_INSTRUCTION = "Read the following passages and answer the question after them."
"""What the draft reads before the first selection when it answers (the question and "Answer briefly." follow)."""


@dataclass(frozen=True)
class SecondPass:
    """The draft's answer from a first selection, and its second reading of the full context with that answer.

    Attributes:
        answer: the draft's answer (empty when it said nothing; then there is no second reading).
        context: the second pass's scores (None without an answer).
        seconds: the answer's and the second reading's time.
    """

    answer: str
    context: ContextScores | None
    seconds: float


@dataclass
class TwoPassSpecPC:
    """SpecPC that scores the context a second time with the draft's own answer (see the module docstring).

    Offers :class:`draft_rag.SpecPC`'s ``score`` / ``select`` / ``compress``, so the bench shares the first
    pass with plain SpecPC and across budgets. A selection's ``seconds`` counts the first pass, the draft's
    answer, the second pass and the union: what one :meth:`compress` call costs. Its ``lookahead_text`` is the
    draft's answer.

    Args:
        specpc: the SpecPC that reads both times and selects (its budget is the default budget; with a
            ``cache`` both passes read over it).
        tokenizer: counts the budget (the target's tokenizer, as ``specpc.target_tokenizer`` counts).
        first_share: the fraction of the budget that the first pass's best picks keep, in [0, 1) (0.5); 0
            keeps only what the second pass picks.
        answer_tokens: most tokens of the draft's answer (32).
    """

    specpc: SpecPC
    tokenizer: PreTrainedTokenizerBase
    first_share: float = 0.5
    answer_tokens: int = 32
    _engine: Any = field(default=None, init=False, repr=False)
    _passes: dict[Any, SecondPass] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_share(self.first_share)
        check_int("TwoPassSpecPC answer_tokens", self.answer_tokens, 1)

    def settings(self) -> dict[str, Any]:
        """SpecPC's knobs and this variant's own, by name (for a results file)."""
        return {**self.specpc.settings(), "first_share": self.first_share, "answer_tokens": self.answer_tokens}

    def score(self, query: str, documents: Sequence[str]) -> ContextScores:
        """The first pass: :meth:`draft_rag.SpecPC.score`."""
        return self.specpc.score(query, documents)

    def compress(self, query: str, documents: Sequence[str]) -> CompressionResult:
        """Both passes and their union, at SpecPC's budget."""
        return self.select(self.score(query, documents))

    def select(
        self, context: ContextScores, budget: int | None = None, first_share: float | None = None
    ) -> CompressionResult:
        """The union of the first pass's picks (``context``) and the second pass's, within ``budget``.

        ``budget`` defaults to SpecPC's and ``first_share`` to this instance's. The second pass depends on the
        budget (the draft answers from the first selection at it) but not on ``first_share``, so it is made once
        per sample and budget and shared by calls that differ only in the share.
        """
        started = time.perf_counter()
        budget = self.specpc.budget if budget is None else budget
        share = self.first_share if first_share is None else _check_share(first_share)
        first = self.specpc.select(context, budget)
        if context.scores is None or sum(context.original_tokens) <= budget:
            return first  # nothing was scored, or nothing needed cutting
        second = self.second_pass(context, first)
        if second.context is None:
            return replace(first, seconds=first.seconds + second.seconds)
        second_context = second.context
        picks = self.specpc.select(context, round(share * budget)).documents if share * budget >= 1 else None

        def union(n: int) -> list[CompressedDocument]:
            found = self.specpc.select(second_context, n).documents if n else None
            return self._union(context, picks, found)

        kept = fit_to_budget(union, budget)
        seconds = context.seconds + second.seconds + time.perf_counter() - started
        return CompressionResult(kept, context.query, budget, seconds, first.draft_prompt_tokens, second.answer)

    def second_pass(self, context: ContextScores, first: CompressionResult) -> SecondPass:
        """The draft's answer from the ``first`` selection of ``context`` and its second reading with it (made
        once per sample and budget; only the latest sample's are kept)."""
        key = (context.query, tuple(context.documents), first.budget)
        if key not in self._passes:
            if any(k[:2] != key[:2] for k in self._passes):
                self._passes.clear()
            started = time.perf_counter()
            answer = self.draft_answer(context.query, [doc.text for doc in first.documents if not doc.dropped])
            reread = self.specpc.score(f"{context.query} {answer}", context.documents) if answer else None
            self._passes[key] = SecondPass(answer, reread, time.perf_counter() - started)
        return self._passes[key]

    def draft_answer(self, query: str, documents: list[str]) -> str:
        """The draft's greedy answer to ``query`` from ``documents``, stripped (empty when it says nothing)."""
        from draft_rag.bench.tasks import build_prompt

        if self._engine is None:
            from draft_rag import SpecKV

            draft = self.specpc.load()
            self._engine = SpecKV(target=draft, draft=draft, method="full")
        prompt = build_prompt(ANSWER_INSTRUCTION, documents, query)
        result = self._engine.generate(prompt, max_new_tokens=self.answer_tokens, temperature=0.0)
        return str(result.text).strip()

    def _union(
        self, context: ContextScores, *selections: list[CompressedDocument] | None
    ) -> list[CompressedDocument]:
        """Each document of ``context`` with the spans any of ``selections`` kept (None: a selection of nothing),
        merged, its text rebuilt and re-counted."""
        chosen = [selection for selection in selections if selection is not None]
        documents = []
        for index, (source, original) in enumerate(zip(context.documents, context.original_tokens, strict=True)):
            if not source.strip():
                documents.append(CompressedDocument("", [], 0, original, blank=True))
                continue
            kept = [selection[index] for selection in chosen]
            spans = snap_spans(source, [span for doc in kept for span in doc.spans])
            text = join_spans(source, spans, self.specpc.elision_marker)
            tokens = original if text == source else len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            score = max((doc.score for doc in kept), default=0.0)
            documents.append(CompressedDocument(text, spans, tokens, original, score))
        return documents


def _check_share(share: object) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        msg = (
            f"first_share must be a number in [0, 1), the fraction of the budget the first pass keeps; got {share!r}. "
            "Use 0 to keep only the second pass's picks."
        )
        raise ValueError(msg)
    return float(share)

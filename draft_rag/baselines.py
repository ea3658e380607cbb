"""Prompt-side baselines with SpecPC's interface: ``compress(query, documents) -> CompressionResult``.

- :class:`Truncation` keeps the first and last tokens of the concatenated documents (no model).
- :class:`EmbeddingFilter` ranks the documents by sentence-embedding similarity to the query and keeps
  the best ones until the budget is full (all-MiniLM-L6-v2 by default).

Budgets are counted as SpecPC counts them, so every method is measured in the same unit: the tokens of
each document's output text with ``tokenizer`` (the target's), the elision markers where text was cut
included. When markers push the text over the budget, fewer source tokens are kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from draft_rag.checks import check_int
from draft_rag.specpc import CompressedDocument, CompressionResult
from draft_rag.specpc.selection import fit_to_budget
from draft_rag.specpc.text import ELISION_MARKER, join_spans

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Truncation:
    """Keep the first and the last context tokens, half the budget each.

    The documents are read as one sequence; whole documents in the middle are dropped and at most two
    documents are cut (one keeps a prefix, one a suffix). The classic "truncate the middle" baseline.
    The elision markers where text was cut count against the budget, so a few fewer source tokens fit.

    Args:
        tokenizer: counts tokens (the target's tokenizer).
        budget: most context tokens to keep (1024).
    """

    tokenizer: PreTrainedTokenizerBase
    budget: int = 1024

    def __post_init__(self) -> None:
        check_int("budget", self.budget, 1)

    def compress(self, query: str, documents: Sequence[str]) -> CompressionResult:
        """Keep the head and the tail of ``documents`` within the budget; ``query`` is not used."""
        started = time.perf_counter()
        offsets = [_offsets(self.tokenizer, doc) for doc in documents]
        total = sum(len(o) for o in offsets)

        def build(keep: int) -> list[CompressedDocument]:
            head = min(keep // 2, total)
            tail_start = max(head, total - (keep - keep // 2))
            compressed: list[CompressedDocument] = []
            seen = 0
            for doc, doc_offsets in zip(documents, offsets, strict=True):
                n = len(doc_offsets)
                kept = [i for i in range(n) if seen + i < head or seen + i >= tail_start]
                seen += n
                compressed.append(_keep_tokens(self.tokenizer, doc, doc_offsets, kept))
            return compressed

        kept = fit_to_budget(build, self.budget)
        return CompressionResult(kept, query, self.budget, time.perf_counter() - started)


@dataclass
class EmbeddingFilter:
    """Keep the documents most similar to the query until the budget is full.

    Documents are embedded with a sentence-transformers model and ranked by cosine similarity to the
    query. Whole documents are kept best first; the first one that does not fit keeps its beginning up
    to the remaining budget, and the rest are dropped. Kept documents stay in input order.

    Args:
        tokenizer: counts tokens (the target's tokenizer).
        budget: most context tokens to keep (1024).
        model: a sentence-transformers model directory (default: the packaged all-MiniLM-L6-v2), or a
            function mapping a list of texts to an array of unit-normalised embeddings.
        device: where the embedding model runs (default CPU).
    """

    tokenizer: PreTrainedTokenizerBase
    budget: int = 1024
    model: str | Callable[[list[str]], Any] | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_int("budget", self.budget, 1)
        self._embed: Callable[[list[str]], Any] | None = self.model if callable(self.model) else None

    def compress(self, query: str, documents: Sequence[str]) -> CompressionResult:
        """Keep the documents closest to ``query`` in embedding space, within the budget."""
        import numpy as np

        started = time.perf_counter()
        documents = list(documents)
        if not documents:
            return CompressionResult([], query, self.budget, time.perf_counter() - started)
        vectors = np.asarray(self.embedder()([query, *documents]), dtype=np.float32)
        similarity = [float(s) for s in vectors[1:] @ vectors[0]]
        best_first = sorted(range(len(documents)), key=lambda i: -similarity[i])
        offsets = [_offsets(self.tokenizer, doc) for doc in documents]

        def build(keep: int) -> list[CompressedDocument]:
            allowance = [0] * len(documents)
            for index in best_first:
                allowance[index] = min(keep, len(offsets[index]))
                keep -= allowance[index]
            return [
                _keep_tokens(self.tokenizer, doc, doc_offsets, list(range(n)), score)
                for doc, doc_offsets, n, score in zip(documents, offsets, allowance, similarity, strict=True)
            ]

        kept = fit_to_budget(build, self.budget)
        return CompressionResult(kept, query, self.budget, time.perf_counter() - started)

    def embedder(self) -> Callable[[list[str]], Any]:
        """The embedding function (texts -> unit vectors), loading the model on first use."""
        if self._embed is None:
            from sentence_transformers import SentenceTransformer

            from draft_rag.packaged import embedding_model_path

            encoder = SentenceTransformer(str(self.model or embedding_model_path()), device=self.device)
            self._embed = lambda texts: encoder.encode(texts, normalize_embeddings=True)
        return self._embed


def _offsets(tokenizer: PreTrainedTokenizerBase, text: str) -> list[tuple[int, int]]:
    if not text:
        return []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(int(s), int(e)) for s, e in encoded["offset_mapping"]]


def _keep_tokens(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    offsets: list[tuple[int, int]],
    keep: list[int],
    score: float = 0.0,
) -> CompressedDocument:
    """The document made of the tokens ``keep`` (ascending indices into ``offsets``), its text re-counted."""
    blank = not source.strip()
    if len(keep) == len(offsets):
        whole = [(0, len(source))] if source else []
        return CompressedDocument(source, whole, len(offsets), len(offsets), score, blank)
    spans: list[tuple[int, int]] = []
    for position, index in enumerate(keep):
        start, end = offsets[index]
        if position and keep[position - 1] == index - 1:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    # Token spans start with the space before a word; trim it so the spans are the kept text itself.
    spans = [(start + len(source[start:end]) - len(source[start:end].lstrip()), end) for start, end in spans]
    spans = [(start, end) for start, end in spans if start < end]
    text = join_spans(source, spans, ELISION_MARKER)
    return CompressedDocument(text, spans, len(_offsets(tokenizer, text)), len(offsets), score, blank)

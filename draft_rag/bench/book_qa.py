"""The ``book_qa`` task: hand-written questions over real books, with the context a RAG retriever would give.

Questions written and checked by hand over six public-domain books
(``draft_rag/bench/data/book_qa.jsonl``; sample ``i`` is question ``i``, the same for every seed), some
needing two passages of the book (``hops: 2``). The context is retrieved as a RAG pipeline would: the book
split into sentence-aligned chunks of about ``chunk_tokens`` target tokens, the chunks most similar to the
question (the packaged all-MiniLM-L6-v2, on the CPU) up to the requested length, in book order; the chunks
holding the question's evidence are always included (even past the length), so the full context can
answer every question.

Scoring is the string match of :mod:`draft_rag.bench.tasks`, with alternatives: any gold answer found counts.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from draft_rag.bench.prose import DATA_DIR, SENTENCE_BREAK, book_paragraphs, book_text
from draft_rag.bench.tasks import Sample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BOOK_QA_FILE = DATA_DIR / "book_qa.jsonl"
BOOK_TITLES = {
    "alice_in_wonderland": "Alice's Adventures in Wonderland",
    "legend_of_sleepy_hollow": "The Legend of Sleepy Hollow",
    "modest_proposal": "A Modest Proposal",
    "narrative_of_frederick_douglass": "Narrative of the Life of Frederick Douglass",
    "simple_sabotage_field_manual": "the Simple Sabotage Field Manual",
    "yellow_wallpaper": "The Yellow Wallpaper",
}


@dataclass(frozen=True)
class BookQuestion:
    """One hand-written ``book_qa`` question (a line of ``book_qa.jsonl``).

    Attributes:
        id: a stable name, e.g. ``"douglass-07"``.
        book: the book's file name in ``DATA_DIR`` without ``.txt``.
        question: asked after the context.
        answers: gold answers, any of which counts (case-insensitive substring of the prediction).
        hops: 1, or 2 when the answer needs two passages of the book: the first evidence quote leads to the
            second, which holds the answer.
        evidence: quotes of the book (as :func:`book_text` has it) that answer the question.
        note: how an answer that is not written in the evidence follows from it (e.g. a number in digits).
    """

    id: str
    book: str
    question: str
    answers: tuple[str, ...]
    hops: int
    evidence: tuple[str, ...]
    note: str = ""


@functools.lru_cache(maxsize=1)
def book_questions() -> tuple[BookQuestion, ...]:
    """The ``book_qa`` questions, in file order (sample ``i`` is question ``i``)."""
    questions = []
    for line in BOOK_QA_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            questions.append(BookQuestion(
                id=item["id"], book=item["book"], question=item["question"], answers=tuple(item["answers"]),
                hops=item["hops"], evidence=tuple(item["evidence"]), note=item.get("note", ""),
            ))
    return tuple(questions)


@dataclass(frozen=True)
class BookChunk:
    """A run of whole sentences of a book, about ``chunk_tokens`` long.

    Attributes:
        text: the sentences, with a blank line where a paragraph ends.
        start, end: where they lie in :func:`book_text`.
        tokens: target tokens of the sentences.
    """

    text: str
    start: int
    end: int
    tokens: int


@dataclass
class BookQA:
    """Makes ``book_qa``'s samples for a :class:`~draft_rag.bench.tasks.TaskGenerator` (which makes one on first use).

    Args:
        tokenizer: the target's tokenizer; chunks are counted with it.
        chunk_tokens: approximate size of each chunk.
        embed: the retriever: texts to unit-normalised vectors (None: the packaged all-MiniLM-L6-v2 on the CPU,
            loaded on first use, as the ``embedding`` method uses it).
        context_tokens: the generator's tokens of document text that make a prompt with this instruction and
            question (the arguments, in that order) about ``length`` tokens long.
    """

    tokenizer: PreTrainedTokenizerBase
    chunk_tokens: int
    embed: Callable[[list[str]], Any] | None
    context_tokens: Callable[[str, str, int], int]
    _books: dict[str, tuple[list[BookChunk], Any]] = field(default_factory=dict, init=False, repr=False)

    def sample(self, length: int, index: int) -> Sample:
        """Question ``index`` of ``book_qa`` over its book's chunks: the evidence chunks, then the chunks most similar
        to the question while they fit ``length``, in book order."""
        import numpy as np

        questions = book_questions()
        if not 0 <= index < len(questions):
            msg = (
                f"book_qa has {len(questions)} questions, so sample index {index} does not exist; "
                f"ask for at most {len(questions)} samples."
            )
            raise ValueError(msg)
        item = questions[index]
        instruction = f"Read the following passages from {BOOK_TITLES[item.book]} and answer the question after them."
        chunks, vectors = self._book_chunks(item.book)
        text = book_text(item.book)
        spans = [(start, start + len(quote)) for quote in item.evidence if (start := text.find(quote)) >= 0]
        if len(spans) < len(item.evidence):
            msg = f"book_qa question {item.id!r} quotes text that {item.book}.txt does not hold."
            raise ValueError(msg)
        chosen = {i for i, c in enumerate(chunks) for start, end in spans if c.start < end and start < c.end}
        budget = self.context_tokens(instruction, item.question, length) - sum(chunks[i].tokens for i in chosen)
        query = np.asarray(self._embedder()([item.question]), dtype=np.float32)[0]
        # Rounded so that the last digits of a float sum, which differ between CPUs, cannot reorder the chunks.
        similarity = np.round(vectors @ query, 4)
        for i in sorted(range(len(chunks)), key=lambda i: (-similarity[i], i)):
            if i in chosen:
                continue
            if chunks[i].tokens > budget:
                break
            chosen.add(i)
            budget -= chunks[i].tokens
        return Sample(
            task="book_qa",
            length=length,
            sample_id=index,
            instruction=instruction,
            documents=[chunks[i].text for i in sorted(chosen)],
            question=item.question,
            answers=list(item.answers),
            metric="any",
        )

    def _book_chunks(self, book: str) -> tuple[list[BookChunk], Any]:
        """The book's chunks and their embeddings (made once per book)."""
        import numpy as np

        if book not in self._books:
            units = [(sentence, k == 0) for paragraph in book_paragraphs(book)
                     for k, sentence in enumerate(SENTENCE_BREAK.split(paragraph))]
            ids = self.tokenizer([" " + s for s, _ in units], add_special_tokens=False)["input_ids"]
            chunks: list[BookChunk] = []
            pieces: list[str] = []
            start = position = size = 0
            for (sentence, first), tokens in zip(units, map(len, ids), strict=True):
                if pieces and size + tokens > self.chunk_tokens:
                    chunks.append(BookChunk("".join(pieces), start, position - 1, size))
                    pieces, start, size = [], position, 0
                pieces.append(("\n\n" if first else " ") + sentence if pieces else sentence)
                position += len(sentence) + 1
                size += tokens
            chunks.append(BookChunk("".join(pieces), start, position - 1, size))
            vectors = np.asarray(self._embedder()([c.text for c in chunks]), dtype=np.float32)
            self._books[book] = (chunks, vectors)
        return self._books[book]

    def _embedder(self) -> Callable[[list[str]], Any]:
        if self.embed is None:
            from draft_rag.baselines import EmbeddingFilter

            self.embed = EmbeddingFilter(self.tokenizer).embedder()
        return self.embed

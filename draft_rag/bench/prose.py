"""The bundled public-domain books (``draft_rag/bench/data``): their paragraphs, sentences and words.

The synthetic tasks of :mod:`draft_rag.bench.tasks` fill their haystacks with the sentences of
:data:`HAYSTACK_BOOKS`; :mod:`draft_rag.bench.book_qa` asks about those books and the others there.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"

HAYSTACK_BOOKS = ("alice_in_wonderland", "legend_of_sleepy_hollow", "yellow_wallpaper")
"""The books (in ``DATA_DIR``) whose prose fills the synthetic tasks' haystacks; ``book_qa`` asks about these and
the other books there."""
# A sentence ends at . ! or ? followed by whitespace and a capital or an opening quote.
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“‘'])")


@functools.lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """The sentences of the bundled public-domain books, in reading order, whitespace normalised."""
    sentences: list[str] = []
    for book in HAYSTACK_BOOKS:
        for text in book_paragraphs(book):
            # Titles, headings and verse lines are short; narrative paragraphs are not.
            if len(text) < 80:
                continue
            sentences.extend(s for s in SENTENCE_BREAK.split(text) if s)
    return tuple(sentences)


def book_paragraphs(book: str) -> list[str]:
    """The paragraphs of ``DATA_DIR/<book>.txt`` (split at blank lines), whitespace normalised, empty ones left out.

    Joined by single spaces they make :func:`book_text`."""
    text = (DATA_DIR / f"{book}.txt").read_text(encoding="utf-8")
    return [" ".join(paragraph.split()) for paragraph in re.split(r"\n\s*\n", text) if paragraph.strip()]


def book_text(book: str) -> str:
    """The text of a bundled book with every run of whitespace (the line wrapping) made one space: where
    ``book_qa``'s evidence quotes are found."""
    return " ".join(book_paragraphs(book))


@functools.lru_cache(maxsize=1)
def prose_words() -> tuple[str, ...]:
    """Distinct lowercase words of 5 to 10 letters from the bundled books, sorted (the word pool)."""
    words = {w.lower() for s in prose_sentences() for w in re.findall(r"\b[A-Za-z]{5,10}\b", s)}
    return tuple(sorted(words))

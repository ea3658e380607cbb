"""RULER-style long-context tasks, generated locally at a requested length in target tokens.

Every sample is a list of context documents (the context split into chunks of about ``chunk_tokens``
target tokens, as a retriever would return them), a question, gold answers and a scoring rule. Samples
are deterministic: the same tokenizer, seed, task, length and index always give the same sample.

Tasks (haystacks are real public-domain prose from ``draft_rag/bench/data``, read by
:mod:`draft_rag.bench.prose`):

- ``niah_single``: one "special magic number" sentence hidden in the prose; ask for it.
- ``niah_multikey``: the same plus three distractor needles with other keys.
- ``niah_multivalue``: four numbers for the same key; ask for all of them (partial credit).
- ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``... spread through the prose; ask
  for every variable that holds the value (partial credit).
- ``common_words``: a numbered word list where ten words appear far more often; ask for those ten
  (partial credit).
- ``qa``: three short fact sentences about invented people (where something was hidden, what it
  cost) inserted into the prose; one is asked about in plain language, the others distract.
- ``multivalue_spread``: four numbers for one key, each in a different document, among four needles of
  other keys (each in a document of its own too); ask for all four (partial credit; as everywhere, an
  answer that also names other numbers is not penalised). A filter that keeps whole documents needs four
  documents' worth of budget to get them all.
- ``two_hop``: "Ada Crane put the parcel in the amber falcon locker." ... "The amber falcon locker opens
  with 4821937.", with three more person/locker/code chains as distractors, every sentence in a document
  of its own. The question names the person and asks for the parcel's seven-digit code, so the fact that
  holds the answer shares no word with it: only a reader that follows the locker's name finds it.
- ``book_qa``: questions written and checked by hand over six public-domain books, with the context a RAG
  retriever gives; see :mod:`draft_rag.bench.book_qa`.

Scoring follows RULER's string match: a gold answer counts when it occurs in the prediction
(case-insensitive); tasks with several answers score the fraction found (``qa`` and ``book_qa`` list
alternatives, any of which counts).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from draft_rag.bench.prose import prose_sentences, prose_words

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from draft_rag.bench.book_qa import BookQA

TASKS = (
    "niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words", "qa",
    "multivalue_spread", "two_hop", "book_qa",
)
DEFAULT_TASKS = ("niah_multikey", "qa", "multivalue_spread", "two_hop")
"""The tasks ``draft-rag bench`` runs by default: those the packaged 1.5B target answers from the full
context and that need different things from a compressor (one fact among distractors, plain-language
questions, four facts in four documents, a two-step chain). ``variable_tracking`` is left out: with the full
context the 1.5B target names only the first variable of the chain (20%), so it measures the target, not the
compressors."""

ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "keen",
    "lucky", "misty", "noble", "olive", "proud", "quiet", "rapid", "silver", "tidy", "upper", "vivid",
    "witty", "young", "zesty", "bitter", "crimson", "frozen", "golden", "humble",
)
NOUNS = (
    "anchor", "badger", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket",
    "kettle", "lantern", "meadow", "needle", "orchid", "pepper", "quarry", "rocket", "saddle", "teapot",
    "umbrella", "violin", "walrus", "yarrow", "zeppelin", "compass", "feather", "mirror", "pebble", "tunnel",
)
FIRST_NAMES = (
    "Ada", "Bertram", "Cornelia", "Dorian", "Eudora", "Fenwick", "Griselda", "Horatio", "Imogen", "Jasper",
    "Lavinia", "Mortimer", "Octavia", "Percival", "Rosalind", "Silas", "Thaddeus", "Winifred",
)
LAST_NAMES = (
    "Ashcombe", "Blackwood", "Crane", "Dunmore", "Everly", "Fairweather", "Greaves", "Hollis", "Marchbank",
    "Pemberton", "Quill", "Ravenscroft", "Sedgwick", "Thornbury", "Whitlock",
)
THINGS = (
    "silver spoon", "brass key", "pocket watch", "velvet purse", "map of the county", "wooden flute",
    "signet ring", "bundle of letters", "copper kettle", "leather journal", "glass inkwell", "iron lantern",
)
PLACES = (
    "cellar", "bell tower", "orchard", "boathouse", "chapel", "granary", "hayloft", "pantry", "stable",
    "greenhouse", "attic", "smokehouse", "dovecote", "millpond",
)
CURRENCIES = ("shillings", "guineas", "florins", "crowns")


@dataclass(frozen=True)
class Sample:
    """One benchmark question over long context.

    Args:
        task, length, sample_id: which task, requested length (prompt tokens) and index it was made with.
        instruction: the task's preface, placed before the documents.
        documents: the context, split into retriever-sized chunks.
        question: what is asked after the documents (also the query given to compressors).
        answers: gold answer strings.
        metric: ``"all"`` scores the fraction of ``answers`` found in the prediction; ``"any"`` scores 1
            when one of them is found.
        max_new_tokens: enough for a correct answer.
    """

    task: str
    length: int
    sample_id: int
    instruction: str
    documents: list[str]
    question: str
    answers: list[str]
    metric: Literal["all", "any"] = "all"
    max_new_tokens: int = 32

    def score(self, prediction: str) -> float:
        """RULER string match of ``prediction`` against the gold answers, in [0, 1]."""
        return string_match(prediction, self.answers, self.metric)

    def prompt(self, documents: list[str] | None = None) -> str:
        """The user message for the target: instruction, documents (default: all of them), question."""
        chosen = self.documents if documents is None else documents
        return build_prompt(self.instruction, chosen, self.question)


def string_match(prediction: str, answers: list[str], metric: Literal["all", "any"] = "all") -> float:
    """Case-insensitive substring match: fraction of answers found (``"all"``) or any found (``"any"``)."""
    found = [answer.lower() in prediction.lower() for answer in answers]
    if not found:
        return 0.0
    return float(any(found)) if metric == "any" else sum(found) / len(found)


def build_prompt(instruction: str, documents: list[str], question: str) -> str:
    """Join instruction, numbered documents and question into one user message."""
    blocks = [f"[Document {i + 1}]\n{doc}" for i, doc in enumerate(documents)]
    return "\n\n".join([instruction, *blocks, f"Question: {question}\nAnswer briefly."])



@dataclass
class _Draft:
    """What a task contributes before the haystack is filled in (common words brings its own list)."""

    instruction: str
    question: str
    answers: list[str]
    facts: list[str] = field(default_factory=list)
    metric: Literal["all", "any"] = "all"
    max_new_tokens: int = 32
    spread: bool = False
    """Place every fact in a document of its own (in the given order) instead of at random depths."""


class TaskGenerator:
    """Make benchmark samples whose prompts are about ``length`` target tokens long.

    Args:
        tokenizer: the target's tokenizer; lengths are counted with it.
        seed: base seed; each sample is seeded with ``(seed, task, length, index)`` (``book_qa``'s samples do
            not depend on it).
        chunk_tokens: approximate size of each context document (default 256 tokens).
        embed: ``book_qa``'s retriever: texts to unit-normalised vectors (default: the packaged
            all-MiniLM-L6-v2 on the CPU, loaded on first use, as the ``embedding`` method uses it).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        seed: int = 0,
        chunk_tokens: int = 256,
        embed: Callable[[list[str]], Any] | None = None,
    ) -> None:
        if chunk_tokens < 16:
            msg = f"chunk_tokens must be at least 16, got {chunk_tokens}."
            raise ValueError(msg)
        self.tokenizer = tokenizer
        self.seed = seed
        self.chunk_tokens = chunk_tokens
        self.embed = embed
        self._sentence_tokens: list[int] | None = None
        self._book_qa: BookQA | None = None

    def samples(self, task: str, length: int, count: int) -> list[Sample]:
        """``count`` samples of ``task`` at ``length`` tokens (indices ``0 .. count-1``)."""
        return [self.sample(task, length, index) for index in range(count)]

    def sample(self, task: str, length: int, index: int) -> Sample:
        """The sample number ``index`` of ``task`` at ``length`` prompt tokens."""
        if task not in TASKS:
            msg = f"Unknown task {task!r}; choose from {', '.join(TASKS)}."
            raise ValueError(msg)
        if task == "book_qa":
            if self._book_qa is None:
                # Imported here, not at the top: book_qa builds this module's Samples.
                from draft_rag.bench.book_qa import BookQA

                self._book_qa = BookQA(self.tokenizer, self.chunk_tokens, self.embed, self._context_tokens)
            return self._book_qa.sample(length, index)
        rng = random.Random(f"{self.seed}/{task}/{length}/{index}")
        draft = _TASK_BUILDERS[task](rng)
        context_tokens = self._context_tokens(draft.instruction, draft.question, length)
        fact_tokens = sum(self._count(f) for f in draft.facts)
        if context_tokens < fact_tokens + 64:
            msg = (
                f"length {length} is too short for task {task!r}; "
                f"use at least {length + fact_tokens + 64 - context_tokens} tokens."
            )
            raise ValueError(msg)
        answers = draft.answers
        if task == "common_words":
            units, answers = _common_word_units(rng, context_tokens, self._count)
            documents = self._chunk(units)
        elif draft.spread:
            documents = self._chunk(self._haystack(rng, context_tokens - fact_tokens))
            if len(documents) < len(draft.facts):
                msg = (
                    f"task {task!r} puts {len(draft.facts)} facts in different documents, but length {length} "
                    f"makes only {len(documents)} documents of {self.chunk_tokens} tokens; use a longer length "
                    "or smaller chunk_tokens."
                )
                raise ValueError(msg)
            # Sorted document indices keep the facts in their given order (chains read forwards).
            chosen = sorted(rng.sample(range(len(documents)), len(draft.facts)))
            for position, fact in zip(chosen, draft.facts, strict=True):
                documents[position].insert(rng.randrange(len(documents[position]) + 1), fact)
        else:
            units = self._haystack(rng, context_tokens - fact_tokens)
            # Sorted depths keep the facts in their given order (variable-tracking chains read forwards).
            depths = sorted(rng.randrange(len(units) + 1) for _ in draft.facts)
            for offset, (depth, fact) in enumerate(zip(depths, draft.facts, strict=True)):
                units.insert(depth + offset, fact)
            documents = self._chunk(units)
        return Sample(
            task=task,
            length=length,
            sample_id=index,
            instruction=draft.instruction,
            documents=[" ".join(doc) for doc in documents],
            question=draft.question,
            answers=answers,
            metric=draft.metric,
            max_new_tokens=draft.max_new_tokens,
        )

    def _context_tokens(self, instruction: str, question: str, length: int) -> int:
        """Tokens of document text that make the prompt about ``length`` tokens long."""
        # The chat template adds about 16 tokens; each document adds a "[Document i]" header.
        overhead = self._count(build_prompt(instruction, [], question)) + 16
        header = self._count("\n\n[Document 10]\n")
        return (length - overhead) * self.chunk_tokens // (self.chunk_tokens + header)


    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _haystack(self, rng: random.Random, tokens: int) -> list[str]:
        """Consecutive prose sentences from a random starting point, about ``tokens`` tokens in all."""
        sentences = prose_sentences()
        if self._sentence_tokens is None:
            ids = self.tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
            self._sentence_tokens = [len(x) for x in ids]
        position = rng.randrange(len(sentences))
        units: list[str] = []
        total = 0
        while total < tokens:
            total += self._sentence_tokens[position]
            units.append(sentences[position])
            position = (position + 1) % len(sentences)
        return units

    def _chunk(self, units: list[str]) -> list[list[str]]:
        """Group consecutive units into documents of about ``chunk_tokens`` tokens (each a list of units)."""
        documents: list[list[str]] = [[]]
        size = 0
        for unit in units:
            tokens = self._count(" " + unit)
            if documents[-1] and size + tokens > self.chunk_tokens:
                documents.append([])
                size = 0
            documents[-1].append(unit)
            size += tokens
        return documents


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _keys(rng: random.Random, count: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < count:
        key = _key(rng)
        if key not in keys:
            keys.append(key)
    return keys


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _niah_single(rng: random.Random) -> _Draft:
    key, value = _key(rng), _number(rng)
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    return _Draft(NIAH_INSTRUCTION, question, [value], facts=[_needle(key, value)])


def _niah_multikey(rng: random.Random) -> _Draft:
    keys = _keys(rng, 4)
    values = [_number(rng) for _ in keys]
    facts = [_needle(k, v) for k, v in zip(keys, values, strict=True)]
    rng.shuffle(facts)
    question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    return _Draft(NIAH_INSTRUCTION, question, [values[0]], facts=facts)


def _niah_multivalue(rng: random.Random) -> _Draft:
    key = _key(rng)
    values = [_number(rng) for _ in range(4)]
    question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
    return _Draft(NIAH_INSTRUCTION, question, values, facts=[_needle(key, v) for v in values],
                  max_new_tokens=64)


def _multivalue_spread(rng: random.Random) -> _Draft:
    key, *others = _keys(rng, 5)
    values = [_number(rng) for _ in range(4)]
    facts = [_needle(key, v) for v in values] + [_needle(other, _number(rng)) for other in others]
    rng.shuffle(facts)
    question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
    return _Draft(NIAH_INSTRUCTION, question, values, facts=facts, max_new_tokens=64, spread=True)


def _two_hop(rng: random.Random) -> _Draft:
    # Distinct first and last names: "Ada Crane" next to "Ada Hollis" would test names, not the chain.
    people = [f"{f} {last}" for f, last in zip(rng.sample(FIRST_NAMES, 4), rng.sample(LAST_NAMES, 4), strict=True)]
    # Lockers are named, not numbered: a small target asked for a code answers with any number it has just
    # read, and a locker number is the nearest one.
    lockers = [f"{a} {n}" for a, n in zip(rng.sample(ADJECTIVES, 4), rng.sample(NOUNS, 4), strict=True)]
    codes = [_number(rng) for _ in people]
    links = [f"{person} put the parcel in the {locker} locker." for person, locker in zip(people, lockers, strict=True)]
    openers = [f"The {locker} locker opens with {code}." for locker, code in zip(lockers, codes, strict=True)]
    facts = links + openers
    rng.shuffle(facts)
    # The asked chain reads forwards: the person's locker before that locker's code.
    first, second = facts.index(links[0]), facts.index(openers[0])
    if first > second:
        facts[first], facts[second] = facts[second], facts[first]
    instruction = (
        "Read the following passages. Some people put parcels in lockers, and every locker opens with a "
        "seven-digit code. The code of a person's parcel is the code of the locker the parcel is in."
    )
    question = f"Which seven-digit code belongs to {people[0]}'s parcel?"
    return _Draft(instruction, question, [codes[0]], facts=facts, spread=True)


def _variable_tracking(rng: random.Random) -> _Draft:
    names: list[str] = []
    while len(names) < 5:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randrange(10_000, 100_000))
    facts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    instruction = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    question = f"Find all variables that are assigned the value {value} in the text above."
    return _Draft(instruction, question, names, facts=facts, max_new_tokens=48)


def _common_words(rng: random.Random) -> _Draft:
    instruction = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often."
    )
    question = "What are the 10 most common words in the above list?"
    return _Draft(instruction, question, [], max_new_tokens=96)


def _common_word_units(
    rng: random.Random, tokens: int, count: Callable[[str], int]
) -> tuple[list[str], list[str]]:
    """A shuffled numbered word list of about ``tokens`` tokens, and its ten common words.

    As in RULER, at 4k tokens each common word appears about 30 times and the others 3 times; the
    common frequency scales with the list length so the gap stays clear at every length.
    """
    pool = prose_words()
    per_entry = sum(count(f" 500. {word}") for word in rng.sample(pool, 32)) / 32
    entries = max(40, int(tokens / per_entry))
    common_freq = max(6, round(0.3 * entries / 10))
    words = rng.sample(pool, 10 + max(0, (entries - 10 * common_freq) // 3))
    listing = [w for w in words[:10] for _ in range(common_freq)]
    listing += [w for w in words[10:] for _ in range(3)]
    rng.shuffle(listing)
    return [f"{i + 1}. {word}" for i, word in enumerate(listing)], words[:10]


def _qa(rng: random.Random) -> _Draft:
    people = rng.sample([f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES], 3)
    things = rng.sample(THINGS, 3)
    places = rng.sample(PLACES, 3)
    prices = rng.sample(range(11, 99), 3)
    currency = rng.choice(CURRENCIES)
    if rng.random() < 0.5:
        trios = zip(people, things, places, strict=True)
        facts = [f"That autumn {p} hid the {t} in the {w}." for p, t, w in trios]
        question, answer = f"Where did {people[0]} hide the {things[0]}?", places[0]
    else:
        purchases = zip(people, things, prices, strict=True)
        facts = [f"{p} paid {n} {currency} for the {t}." for p, t, n in purchases]
        question, answer = f"How many {currency} did {people[0]} pay for the {things[0]}?", str(prices[0])
    rng.shuffle(facts)
    instruction = "Read the following passages from old books and answer the question after them."
    return _Draft(instruction, question, [answer], facts=facts, metric="any")


_TASK_BUILDERS: dict[str, Callable[[random.Random], _Draft]] = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "qa": _qa,
    "multivalue_spread": _multivalue_spread,
    "two_hop": _two_hop,
}

"""``draft-rag demo``: compress a long document for a question with the packaged draft, offline.

The document is a public-domain story with one "special magic number" sentence hidden at a chosen depth;
the demo shows how many tokens survive, whether the number did, and the kept text around it.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from draft_rag.models import DEFAULT_DRAFT

STORY = Path(__file__).resolve().parent.parent / "bench" / "data" / "legend_of_sleepy_hollow.txt"
KEYS = ("lantern", "orchard", "harvest", "pumpkin", "bridge", "schoolhouse", "meadow", "spindle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4000, help="length of the document in draft tokens")
    parser.add_argument("--depth", type=float, default=0.5, help="where the needle sits, 0 (start) to 1 (end)")
    parser.add_argument("--budget", type=int, default=512, help="tokens of context to keep")
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model name, id or path")
    parser.add_argument("--documents", type=int, default=4, help="split the text into this many documents")
    parser.add_argument("--seed", type=int, default=0)


def needle_haystack(
    tokenizer: object, tokens: int, depth: float, *, documents: int = 4, seed: int = 0
) -> tuple[list[str], str, str]:
    """Split ~``tokens`` tokens of the story into ``documents`` parts with a needle sentence at ``depth``.

    Returns ``(documents, question, answer)``, the answer being a 7-digit number.
    """
    if not 0.0 <= depth <= 1.0:
        msg = f"depth must be between 0 and 1, got {depth}."
        raise ValueError(msg)
    rng = random.Random(seed)
    key, answer = rng.choice(KEYS), str(rng.randint(1_000_000, 9_999_999))
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in STORY.read_text(encoding="utf-8").split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p) > 200]
    chosen: list[str] = []
    used = 0
    for paragraph in paragraphs:
        if used >= tokens:
            break
        chosen.append(paragraph)
        used += len(tokenizer(paragraph, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    sentences = [s for p in chosen for s in re.split(r"(?<=[.!?]) ", p)]
    sentences.insert(round(depth * len(sentences)), f"The special magic number for {key} is {answer}.")
    per_doc = -(-len(sentences) // documents)
    docs = [" ".join(sentences[i : i + per_doc]) for i in range(0, len(sentences), per_doc)]
    return docs, f"What is the special magic number for {key}?", answer


def run(args: argparse.Namespace) -> int:
    from draft_rag import SpecPC

    pc = SpecPC(draft=args.draft, budget=args.budget, progress=True)
    draft = pc.load()
    docs, question, answer = needle_haystack(
        draft.tokenizer, args.tokens, args.depth, documents=args.documents, seed=args.seed
    )
    result = pc.compress(question, docs)
    kept = "\n".join(d.text for d in result.documents)
    found = answer in kept
    print(f"question: {question}   (answer: {answer}, hidden at depth {args.depth})")
    print(f"documents: {len(docs)}, context tokens: {result.total_original_tokens} -> "
          f"{result.total_kept_tokens} (budget {args.budget}) in {result.seconds:.1f} s")
    print(f"needle kept: {'yes' if found else 'NO'}")
    if found:
        at = kept.index(answer)
        print(f"kept text around it: ...{kept[max(at - 200, 0): at + 60]}...")
    return 0 if found else 1

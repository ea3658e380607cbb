"""``draft-rag compress``: SpecPC over files (one document each) for a query; text or JSON out."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from draft_rag.models import DEFAULT_DRAFT
from draft_rag.specpc import READINGS, SpecPC


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="documents to compress; '-' reads stdin")
    parser.add_argument("--query", required=True, help="the question the context must answer")
    parser.add_argument("--budget", type=int, required=True, help="tokens of context to keep")
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help="draft model name, id or path")
    parser.add_argument("--target-tokenizer", default=None, help="count the budget in this tokenizer's tokens")
    parser.add_argument("--lookahead-tokens", type=int, default=1)
    parser.add_argument(
        "--reading", choices=READINGS, default=SpecPC.reading,
        help="apart (default): the draft reads each document on its own, as --cache-dir stores it; joint: one "
        "prefill of all of them, the paper's reading (no --cache-dir)",
    )
    parser.add_argument(
        "--dtype", default=None, help="draft dtype, e.g. bfloat16 or float32 (default: bf16 where the hardware has it)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--cache-dir", default=None,
        help="reuse (and extend) the draft's per-document K/V in this directory, e.g. one made by `draft-rag index`",
    )


def read_documents(files: list[str]) -> list[str]:
    """Read each FILE as one document of UTF-8 text; '-' is standard input.

    Raises:
        FileNotFoundError: a FILE does not exist.
        ValueError: a FILE is not UTF-8 text (the message names it).
    """
    documents = []
    for name in files:
        try:
            if name == "-":
                documents.append(sys.stdin.read())
                continue
            path = Path(name)
            if not path.is_file():
                msg = f"no such file: {name}"
                raise FileNotFoundError(msg)
            documents.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            source = "standard input" if name == "-" else name
            msg = (
                f"{source} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                "convert it first, e.g. iconv -f latin1 -t utf-8."
            )
            raise ValueError(msg) from None
    return documents


def run(args: argparse.Namespace) -> int:
    from draft_rag import DraftCache

    documents = read_documents(args.files)
    pc = SpecPC(
        draft=args.draft,
        budget=args.budget,
        target_tokenizer=args.target_tokenizer,
        lookahead_tokens=args.lookahead_tokens,
        reading=args.reading,
        progress=not args.json,
        dtype=args.dtype,
        cache=None if args.cache_dir is None else DraftCache(directory=args.cache_dir),
    )
    result = pc.compress(args.query, documents)
    if args.json:
        payload = {
            "documents": [
                {
                    "source": name,
                    "text": doc.text,
                    "kept_tokens": doc.kept_tokens,
                    "original_tokens": doc.original_tokens,
                    "spans": [list(span) for span in doc.spans],
                }
                for name, doc in zip(args.files, result.documents)
            ],
            "budget": result.budget,
            "total_kept_tokens": result.total_kept_tokens,
            "dtype": pc.load().dtype_name,
            "seconds": result.seconds,
        }
        print(json.dumps(payload, ensure_ascii=False))
        return 0
    for name, doc in zip(args.files, result.documents):
        print(f"== {name}: {doc.original_tokens} -> {doc.kept_tokens} tokens")
        print(doc.text)
    print(f"== total: {result.total_original_tokens} -> {result.total_kept_tokens} tokens "
          f"(budget {result.budget}) in {result.seconds:.1f} s", file=sys.stderr)
    return 0

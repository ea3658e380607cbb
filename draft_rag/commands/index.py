"""``draft-rag index``: encode documents into a draft cache directory ahead of the questions.

Each FILE is one document, exactly as ``draft-rag compress`` reads it, so a later
``draft-rag compress --cache-dir DIR`` over the same files runs only the question through the draft.
Split long texts into files of retrieval-chunk size first: the cache keeps one entry per document.
"""

from __future__ import annotations

import argparse

from draft_rag.commands.compress import read_documents
from draft_rag.models import DEFAULT_DRAFT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Each FILE is one document, as `draft-rag compress` reads it: split long texts into files of retrieval-chunk "
        "size first, since the cache keeps one entry per document and a query reuses whole documents only."
    )
    parser.add_argument(
        "files", nargs="+", metavar="FILE",
        help="documents to encode, one per file as `draft-rag compress` reads them; '-' reads stdin",
    )
    parser.add_argument(
        "--cache-dir", required=True,
        help="draft cache directory (created if missing, mode 0700: it holds the documents' K/V); pass the same to "
             "`draft-rag compress --cache-dir`",
    )
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help=f"draft model name, id or path ({DEFAULT_DRAFT})")


def run(args: argparse.Namespace) -> int:
    from draft_rag import DraftCache, SpecPC

    documents = read_documents(args.files)
    cache = DraftCache(directory=args.cache_dir)
    SpecPC(draft=args.draft, cache=cache, progress=True).warm(documents)
    stats = cache.stats
    print(f"indexed {len(documents)} document(s) into {args.cache_dir}: {stats.misses} entries encoded, "
          f"{stats.hits} already there (one entry is the chat template's shared opening)")
    return 0

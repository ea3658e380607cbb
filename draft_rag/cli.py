"""The ``draft-rag`` command line: ``demo``, ``compress``, ``index``, ``ask``, ``bench`` and ``serve``.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``; those
modules import torch and transformers only inside ``run`` so that ``draft-rag --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("draft_rag.commands.demo", "offline demo: compress a long document with the packaged draft"),
    "compress": ("draft_rag.commands.compress", "SpecPC: compress documents for a query"),
    "index": ("draft_rag.commands.index", "encode documents into a draft cache directory for later compressions"),
    "ask": ("draft_rag.commands.ask", "answer a question with SpecKV (or a baseline) KV-cache eviction"),
    "bench": ("draft_rag.bench.command", "benchmark accuracy, latency and memory against baselines"),
    "serve": ("draft_rag.commands.serve", "OpenAI-compatible gateway: compress retrieved documents, forward upstream"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draft-rag", description="Draft-model guided prompt compression and KV-cache eviction."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, ImportError, FileNotFoundError, NotImplementedError) as error:
        print(f"draft-rag {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

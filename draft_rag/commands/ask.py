"""``draft-rag ask``: answer a question over context files with SpecKV (or a baseline) KV-cache eviction.

The prompt is the context files' text followed by the question, as one user message. Without ``--json``
the answer streams to stdout and a one-line summary (KV kept vs full, timings) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET

METHOD_NAMES = ("speckv", "snapkv", "streamingllm", "full")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--query", required=True, help="the question to answer")
    parser.add_argument(
        "--context", nargs="*", default=[], metavar="FILE", help="text files to read before the question"
    )
    parser.add_argument(
        "--method", choices=METHOD_NAMES, default="speckv", help="KV-cache method (default speckv)"
    )
    parser.add_argument(
        "--kv-budget",
        type=int,
        default=256,
        help="prompt KV entries kept per layer and KV head (default 256)",
    )
    parser.add_argument("--window-size", type=int, default=32, help="prompt window always kept (default 32)")
    parser.add_argument(
        "--lookahead-tokens",
        type=int,
        default=None,
        help="draft answer length for speckv (default: up to --max-new-tokens)",
    )
    parser.add_argument("--draft", default=DEFAULT_DRAFT, help=f"draft model (default {DEFAULT_DRAFT})")
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"target model (default {DEFAULT_TARGET})")
    parser.add_argument(
        "--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)"
    )
    parser.add_argument(
        "--dtype", default=None, help="model dtype, e.g. bfloat16 or float32 (default: bf16 where the hardware has it)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def build_prompt(query: str, context_files: list[str]) -> str:
    """The context files' text, then the question."""
    texts = []
    for name in context_files:
        path = Path(name)
        if not path.is_file():
            msg = f"--context file {name!r} does not exist."
            raise FileNotFoundError(msg)
        texts.append(path.read_text(encoding="utf-8").strip())
    return "\n\n".join([*texts, query.strip()])


def run(args: argparse.Namespace) -> int:
    from draft_rag.engine import SpecKV

    prompt = build_prompt(args.query, args.context)
    engine = SpecKV(
        target=args.target,
        draft=args.draft,
        method=args.method,
        budget=args.kv_budget,
        window_size=args.window_size,
        lookahead_tokens=args.lookahead_tokens,
        dtype=args.dtype,
    )
    kv_budget = None if args.method == "full" else args.kv_budget
    if args.json:
        result = engine.generate(prompt, max_new_tokens=args.max_new_tokens)
        report = {
            "answer": result.text,
            "method": args.method,
            "dtype": engine.target.dtype_name,
            "kv_budget": kv_budget,
            "prompt_tokens": result.prompt_tokens,
            "kv_entries_kept": result.kv_entries_kept,
            "kv_entries_full": result.kv_entries_full,
            "timings": result.timings,
        }
        print(json.dumps(report, ensure_ascii=False))
        return 0
    stream = engine.stream(prompt, max_new_tokens=args.max_new_tokens)
    try:
        while True:
            sys.stdout.write(next(stream))
            sys.stdout.flush()
    except StopIteration as done:
        result = done.value
    print()
    timings = ", ".join(f"{name} {value:.2f}" for name, value in result.timings.items())
    print(
        f"[{args.method}] prompt {result.prompt_tokens} tokens; KV kept {result.kv_entries_kept}/"
        f"{result.kv_entries_full} entries per head ({result.kv_bytes_kept / 2**20:.1f} of "
        f"{result.kv_bytes_full / 2**20:.1f} MiB); {timings}",
        file=sys.stderr,
    )
    return 0

"""The gateway against llama.cpp: the LangChain example's questions, full context and through ``draft-rag serve``.

(a) Each of ``examples/langchain_rag.py``'s three questions retrieves its chunks as the example does (MiniLM,
top 8, 1200-character chunks); the example's prompt carries them, each in a ``<document>`` block. The same
openai client sends that request once straight to llama.cpp (the full context) and once through the gateway
(``draft-rag serve`` started in a process of its own, as it is deployed), whose draft cache in ``--cache-dir``
was warmed with the chunks first (SpecPC to ``--budget`` tokens). A row
records the seconds the client waited, the target's prompt tokens, the gateway's compression figures and the
answer. Both sides run every question, the full-context side first.
(b) The gateway's overhead when it compresses nothing: a short request without documents, and the first
question's request with a budget above its context, sent straight and through the gateway in turns
(llama.cpp reuses an identical prompt's KV, so both sides cost it the same). Medians and 95th percentiles.

Writes ``gateway.jsonl`` (one row per request measured) and ``gateway.md`` to ``--out``, replacing earlier ones.

    python -m benchmarks.gateway_bench --out docs/bench            # starts llama.cpp on the packaged target GGUF
    python -m benchmarks.gateway_bench --upstream http://127.0.0.1:8080/v1 --out docs/bench   # a running server
    python -m benchmarks.gateway_bench --smoke --out /tmp/gateway-smoke   # tiny draft, stub upstream, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET
from draft_rag.serve.settings import GatewaySettings
from draft_rag.specpc import OBSERVE_FROM

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RESULTS_FILE = "gateway.jsonl"
SUMMARY_FILE = "gateway.md"
Row = dict[str, Any]


def _example() -> Any:
    """``examples/langchain_rag.py`` (its questions, prompt, chunks and retriever)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import langchain_rag

    return langchain_rag


def retrieve(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """Each question with the text of its retrieved chunks, as the LangChain example retrieves them.

    ``--smoke`` ranks the chunks by the words they share with the question instead of embedding them.
    """
    example = _example()
    questions = list(example.QUESTIONS)
    if args.smoke:
        chunks = [doc.page_content for doc in example.load_chunks(example.DATA_DIR, args.chunk_chars)]

        def best(question: str) -> list[str]:
            words = set(question.lower().split())
            return sorted(chunks, key=lambda chunk: -len(words & set(chunk.lower().split())))[:args.top_k]

        return [(q, best(q)) for q in questions]
    retriever = example.build_retriever(argparse.Namespace(data_dir=example.DATA_DIR, chunk_chars=args.chunk_chars,
                                                           top_k=args.top_k))
    return [(q, [doc.page_content for doc in retriever.invoke(q)]) for q in questions]


def messages_for(question: str, chunks: list[str]) -> list[dict[str, str]]:
    """The example's prompt with each chunk in a ``<document>`` block, as OpenAI chat messages."""
    context = "\n\n".join(f"<document>{chunk}</document>" for chunk in chunks)
    roles = {"system": "system", "human": "user"}
    return [{"role": roles[m.type], "content": str(m.content)}
            for m in _example().PROMPT.format_messages(context=context, question=question)]


@contextlib.contextmanager
def upstream_server(args: argparse.Namespace) -> Iterator[str]:
    """The upstream's ``/v1`` URL: ``--upstream``, the smoke stub, or llama.cpp started on the packaged target."""
    from draft_rag.serve.app import serve_in_thread

    if args.smoke:
        with serve_in_thread(_stub_upstream()) as url:
            yield f"{url}/v1"
        return
    if args.upstream:
        yield args.upstream.rstrip("/")
        return
    from draft_rag.packaged import packaged_gguf
    from draft_rag.serve.launch import llama_cpp_server

    with tempfile.TemporaryDirectory() as scratch, llama_cpp_server(
            packaged_gguf(DEFAULT_TARGET), threads=args.threads, batch_threads=args.threads,
            log_path=Path(scratch) / "llama-cpp.log") as url:
        yield url


def _stub_upstream() -> Any:
    """For ``--smoke``: an OpenAI-compatible server that answers every chat with the same short completion."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({
            "id": "smoke", "object": "chat.completion", "created": 0, "model": body.get("model", "smoke"),
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": len(json.dumps(body["messages"])) // 4, "completion_tokens": 1,
                      "total_tokens": 1 + len(json.dumps(body["messages"])) // 4},
        })

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


@contextlib.contextmanager
def gateway(args: argparse.Namespace, upstream: str, cache_dir: Path, contexts: list[tuple[str, list[str]]],
            scratch: Path) -> Iterator[tuple[str, str, str]]:
    """``draft-rag serve`` in a process of its own, as it is deployed, with ``cache_dir`` warmed with every
    question's chunks first; yields its ``/v1`` URL, the draft's dtype and its device.

    Not in this process: here the client retrieves (its embedder runs torch in this thread), and torch ops in
    two threads of one process make each other's small operations several times slower (OpenMP wakes its
    threads instead of letting them spin once a process runs more of them than it has cores).
    """
    from draft_rag import DraftCache, SpecPC
    from draft_rag.serve.launch import free_port, started

    draft = args.draft
    if args.smoke:
        from draft_rag.bench.tiny import tiny_model

        tiny = tiny_model(max_position_embeddings=8192)
        draft = str(scratch / "tiny-draft")
        tiny.model.save_pretrained(draft)
        tiny.tokenizer.save_pretrained(draft)
    specpc = SpecPC(draft=draft, budget=args.budget, observe_from=args.observe_from, dtype=args.dtype,
                    progress=False, cache=DraftCache(directory=cache_dir))
    specpc.warm(sorted({chunk for _, chunks in contexts for chunk in chunks}))
    loaded = specpc.load()
    dtype, device = loaded.dtype_name, str(loaded.device)
    del specpc, loaded
    port = free_port()
    command = [sys.executable, "-m", "draft_rag.cli", "serve", "--upstream", upstream, "--port", str(port),
               "--budget", str(args.budget), "--observe-from", args.observe_from, "--draft", draft,
               "--dtype", dtype, "--device", device, "--cache-dir", str(cache_dir), "--log-level", "warning"]
    with started(command, f"http://127.0.0.1:{port}/health", log_path=scratch / "gateway.log"):
        yield f"http://127.0.0.1:{port}/v1", dtype, device


def ask(client: Any, messages: list[dict[str, str]], max_tokens: int, extra: dict[str, Any] | None = None) -> Row:
    """One chat completion: the seconds the client waited, the answer, token counts and the gateway's figures."""
    started = time.perf_counter()
    completion = client.chat.completions.create(model=DEFAULT_TARGET, messages=messages, temperature=0,
                                                max_tokens=max_tokens, extra_body=extra or None)
    seconds = time.perf_counter() - started
    usage = completion.usage
    return {"seconds": seconds, "answer": (completion.choices[0].message.content or "").strip(),
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            **(completion.model_extra or {}).get("draft_rag", {})}


def compare(direct: Any, via: Any, contexts: list[tuple[str, list[str]]], args: argparse.Namespace) -> list[Row]:
    """Part (a): every question straight to the upstream, then every question through the gateway."""
    rows = []
    for path, client in (("full context", direct), ("gateway", via)):
        for index, (question, chunks) in enumerate(contexts):
            row = {"part": "questions", "path": path, "question": question, "index": index,
                   **ask(client, messages_for(question, chunks), args.max_tokens)}
            rows.append(row)
            print(f"{path} #{index}: {row['seconds']:.1f} s, prompt {row['prompt_tokens']} tokens"
                  + (f", compressed {row['context_tokens_before']} -> {row['context_tokens_after']} in "
                     f"{row['compress_s']:.2f} s" if path == "gateway" else ""), flush=True)
    return rows


def overhead(direct: Any, via: Any, contexts: list[tuple[str, list[str]]], rounds: int) -> list[Row]:
    """Part (b): the same request straight and through the gateway in turns, when the gateway compresses nothing."""
    question, chunks = contexts[0]
    cases = {
        "no documents": ([{"role": "user", "content": "Say hello."}], None),
        "budget above the context": (messages_for(question, chunks), {"draft_rag": {"budget": 1_000_000}}),
    }
    rows = []
    for case, (messages, extra) in cases.items():
        ask(direct, messages, 1)  # both sides' first request fills llama.cpp's prompt cache
        ask(via, messages, 1, extra)
        for turn in range(rounds):
            for path, client, body in (("full context", direct, None), ("gateway", via, extra)):
                rows.append({"part": "overhead", "case": case, "path": path, "turn": turn,
                             **ask(client, messages, 1, body)})
    return rows


def percentiles(values: list[float]) -> tuple[float, float]:
    """Median and 95th percentile."""
    if len(values) < 2:
        return values[0], values[0]
    return statistics.median(values), statistics.quantiles(values, n=20, method="inclusive")[18]


def summarize(rows: list[Row], setup: Row) -> str:
    """The markdown report: the setup, table (a) with totals and ratios, table (b)."""
    lines = [f"Setup: {', '.join(f'{k} {v}' for k, v in setup.items())}.", "",
             "## (a) The LangChain example's questions", "",
             "| question | full context s | prompt tokens | gateway s | compress s | context tokens | cache hits / "
             "misses | answer, full context | answer, gateway |", "|---|---|---|---|---|---|---|---|---|"]
    questions = [r for r in rows if r["part"] == "questions"]
    full = {r["index"]: r for r in questions if r["path"] == "full context"}
    via = {r["index"]: r for r in questions if r["path"] == "gateway"}

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    for index in sorted(full):
        a, b = full[index], via[index]
        lines.append(
            f"| {cell(a['question'])} | {a['seconds']:.2f} | {a['prompt_tokens']} -> {b['prompt_tokens']} | "
            f"{b['seconds']:.2f} | {b['compress_s']:.2f} | {b['context_tokens_before']} -> "
            f"{b['context_tokens_after']} | {b['cache_hits']} / {b['cache_misses']} | {cell(a['answer'])} | "
            f"{cell(b['answer'])} |")
    full_s = sum(r["seconds"] for r in full.values())
    via_s = sum(r["seconds"] for r in via.values())
    compress_s = sum(r["compress_s"] for r in via.values())
    lines += ["", f"End to end: full context {full_s:.2f} s, through the gateway {via_s:.2f} s: "
                  f"**{via_s / full_s:.2f}x**; compression {compress_s:.2f} s, {100 * compress_s / via_s:.1f}% "
                  "of the gateway's time.", "",
              "## (b) Gateway overhead when nothing is compressed", "",
              "| case | n | full context p50 / p95 ms | gateway p50 / p95 ms | added p50 / p95 ms | added p50 |",
              "|---|---|---|---|---|---|"]
    overheads = [r for r in rows if r["part"] == "overhead"]
    for case in dict.fromkeys(r["case"] for r in overheads):
        times = {path: [1e3 * r["seconds"] for r in overheads if r["case"] == case and r["path"] == path]
                 for path in ("full context", "gateway")}
        (d50, d95), (g50, g95) = percentiles(times["full context"]), percentiles(times["gateway"])
        lines.append(f"| {case} | {len(times['gateway'])} | {d50:.1f} / {d95:.1f} | {g50:.1f} / {g95:.1f} | "
                     f"{g50 - d50:.1f} / {g95 - d95:.1f} | {100 * (g50 - d50) / d50:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", default=None,
                        help="a running OpenAI-compatible server's /v1 URL (default: start llama.cpp on the packaged "
                             f"{DEFAULT_TARGET} GGUF)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads (all cores)")
    parser.add_argument("--budget", type=int, default=512, help="the gateway's budget (512, as the example's)")
    parser.add_argument("--observe-from", default=GatewaySettings.observe_from, choices=OBSERVE_FROM,
                        help=f"the gateway's --observe-from ({GatewaySettings.observe_from}, its default)")
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--chunk-chars", type=int, default=1200)
    parser.add_argument("--max-tokens", type=int, default=64, help="most answer tokens (64, as the example's)")
    parser.add_argument("--rounds", type=int, default=20, help="requests per side and case in part (b)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the gateway's draft cache (a fresh one)")
    parser.add_argument("--smoke", action="store_true", help="tiny draft and a stub upstream: checks the script")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.top_k, args.chunk_chars, args.max_tokens, args.rounds = 3, 400, 8, min(args.rounds, 5)
        args.budget = min(args.budget, 128)

    import openai

    from draft_rag.bench.hardware import hardware_label

    contexts = retrieve(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch, upstream_server(args) as upstream, \
            gateway(args, upstream, args.cache_dir or Path(scratch) / "draft-cache", contexts, Path(scratch)) as (
                gateway_url, dtype, device):
        with openai.OpenAI(base_url=upstream, api_key="none", max_retries=0, timeout=1800) as direct, \
                openai.OpenAI(base_url=gateway_url, api_key="none", max_retries=0, timeout=1800) as via:
            ask(direct, [{"role": "user", "content": "Say hello."}], 1)  # llama.cpp reads its weights once
            rows += compare(direct, via, contexts, args)
            rows += overhead(direct, via, contexts, args.rounds)
        setup = {"upstream": "stub (smoke)" if args.smoke else args.upstream or f"llama.cpp, {DEFAULT_TARGET} GGUF, "
                 f"{args.threads} threads", "draft": "tiny (smoke)" if args.smoke else args.draft,
                 "draft dtype": dtype, "hardware": hardware_label(device), "budget": args.budget,
                 "observe from": args.observe_from, "top k": args.top_k, "chunk chars": args.chunk_chars,
                 "max tokens": args.max_tokens, "gateway": "draft-rag serve, its own process"}
    with open(args.out / RESULTS_FILE, "w", encoding="utf-8") as sink:
        sink.writelines(json.dumps({**row, "setup": setup}) + "\n" for row in rows)
    table = summarize(rows, setup)
    (args.out / SUMMARY_FILE).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

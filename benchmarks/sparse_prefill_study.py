"""Time to first token of the target, dense versus draft-guided sparse prefill, on a long needle-in-a-haystack prompt.

For each length, one process prefills the whole prompt in one forward pass with dense attention and then
with :func:`draft_rag.sparse_prefill.sparse_prefill` (for each ``--settings`` window/vertical pair), back
to back, so their ratio is measured under the same machine load. The observers are the last
``--observers`` prompt positions (33: SpecKV's ``window_size + 1``; no draft answer). Time to first token
is the prefill plus picking the first token; the answer is then decoded greedily to ``--new-tokens`` tokens
(dense decode steps over the cache the prefill built) and checked for the needle. Forward hooks split the
prefill's time between the self-attention layers (projections and attention) and the MLPs. Rows are
appended to ``sparse_prefill.jsonl`` as they are made, a rerun skips the rows already there, and
``sparse_prefill.md`` is rewritten from all rows.

    python -m benchmarks.sparse_prefill_study --lengths 8192 16384 --out docs/bench
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from draft_rag.bench.hardware import hardware_label
from draft_rag.bench.tasks import TASKS, TaskGenerator
from draft_rag.models import DEFAULT_TARGET, LoadedModel, load_model

RESULTS_FILE = "sparse_prefill.jsonl"
SUMMARY_FILE = "sparse_prefill.md"


@contextlib.contextmanager
def layer_timer(model: Any) -> Iterator[dict[str, float]]:
    """Seconds spent inside the decoder layers' ``self_attn`` and ``mlp`` modules during the block."""
    totals = {"attention_s": 0.0, "mlp_s": 0.0}
    started: dict[int, float] = {}
    handles = []
    for layer in model.model.layers:
        for key, module in (("attention_s", layer.self_attn), ("mlp_s", layer.mlp)):

            def pre(module: Any, *_: Any) -> None:
                started[id(module)] = time.perf_counter()

            def post(module: Any, *_: Any, key: str = key) -> None:
                totals[key] += time.perf_counter() - started.pop(id(module))

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield totals
    finally:
        for handle in handles:
            handle.remove()


def run_mode(
    target: LoadedModel, ids: Any, sample: Any, new_tokens: int, setting: tuple[int, int] | None, observers: int
) -> dict[str, Any]:
    """Prefill ``ids`` in one pass (sparse when ``setting`` is a (window, vertical) pair), then decode greedily."""
    import torch
    from transformers import DynamicCache

    from draft_rag.hf import cache_kwargs
    from draft_rag.models import stop_token_ids
    from draft_rag.sparse_prefill import QUERY_BLOCK_SIZE, sparse_prefill

    model = target.model
    sparse = (
        sparse_prefill(model, window_size=setting[0], vertical_size=setting[1], num_observers=observers)
        if setting
        else contextlib.nullcontext()
    )
    cache = DynamicCache(config=model.config)
    past = cache_kwargs(model, cache)
    with torch.inference_mode(), target.lock:
        wall, cpu = time.perf_counter(), time.process_time()
        with sparse, layer_timer(model) as split:
            logits = model(input_ids=ids, **past, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        ttft_s, ttft_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        stops = set(stop_token_ids(target))
        answer = [int(token)]
        while len(answer) < new_tokens and answer[-1] not in stops:
            token = model(input_ids=token, **past, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            answer.append(int(token))
    text = target.tokenizer.decode(answer, skip_special_tokens=True)
    return {
        "mode": "sparse" if setting else "dense",
        "window_size": setting[0] if setting else None,
        "vertical_size": setting[1] if setting else None,
        "observers": observers if setting else None,
        "block_size": QUERY_BLOCK_SIZE if setting else None,
        "ttft_s": ttft_s,
        "ttft_cpu_s": ttft_cpu_s,
        **split,
        "answer": text,
        "found": sample.score(text) == 1,
    }


def summarize(rows: list[dict[str, Any]]) -> str:
    """The markdown report: one line per length and mode, with the TTFT ratio to dense from the same run."""
    machines = sorted({r["machine"] for r in rows})
    lines = [
        "# Sparse prefill: time to first token",
        "",
        f"Target {', '.join(sorted({r['model'] for r in rows}))}, fp32, on a {' / '.join(machines)} "
        f"({', '.join(sorted({str(r['threads']) for r in rows}))} torch threads); the last column is the load "
        "average when each row started (the study's own threads count about that many). Each length's dense "
        "and sparse rows ran back to back in one process; "
        "TTFT / dense compares wall times within that run. TTFT is one forward pass over the whole "
        f"{rows[0]['task']} prompt plus the first token; observers are the last prompt positions, no draft "
        "answer. The attention and MLP shares are of the prefill's wall time, measured by forward hooks "
        "(attention includes the q/k/v/o projections). The MLPs do the same work in both modes, so their "
        "wall time gauges how fast the shared machine ran at that moment: the load-adjusted ratio is "
        "(TTFT / MLP s) over dense's (TTFT / MLP s). Needle: the greedy answer of "
        f"{rows[0]['new_tokens']} tokens contains it; answer as dense: it is the dense row's answer token for "
        "token. † marks a row whose run resumed after its dense row's run.",
        "",
        "| length | prompt tokens | mode | window / vertical | TTFT s | CPU s | TTFT / dense | load-adjusted | "
        "attention share | MLP share | needle | answer as dense | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["length"], r["mode"] != "dense", -(r["window_size"] or 0))):
        dense = [r for r in rows if r["length"] == row["length"] and r["mode"] == "dense"]
        same_run = [r for r in dense if r["run"] == row["run"]] or dense
        ratio = adjusted = same_answer = "-"
        if same_run and row["mode"] == "sparse":
            # A dagger marks a ratio to the dense row of an earlier run (this run resumed after it).
            mark = "" if same_run[0]["run"] == row["run"] else " †"
            ratio = f"{row['ttft_s'] / same_run[0]['ttft_s']:.2f}{mark}"
            speed = same_run[0]["mlp_s"] / row["mlp_s"]
            adjusted = f"{speed * row['ttft_s'] / same_run[0]['ttft_s']:.2f}{mark}"
            same_answer = "yes" if row["answer"] == same_run[0]["answer"] else "no"
        setting = f"{row['window_size']} / {row['vertical_size']}" if row["mode"] == "sparse" else "-"
        lines.append(
            f"| {row['length']} | {row['prompt_tokens']} | {row['mode']} | {setting} | {row['ttft_s']:.1f} | "
            f"{row['ttft_cpu_s']:.1f} | {ratio} | {adjusted} | {100 * row['attention_s'] / row['ttft_s']:.0f}% | "
            f"{100 * row['mlp_s'] / row['ttft_s']:.0f}% | {'yes' if row['found'] else 'no'} | {same_answer} | "
            f"{row['load_avg']:.1f} |"
        )
    bounds = [
        f"{100 * (1 - r['attention_s'] / r['ttft_s']):.0f}% at {r['length']}"
        for r in sorted(rows, key=lambda r: r["length"])
        if r["mode"] == "dense"
    ]
    if bounds:
        lines += [
            "",
            "Outside the attention layers (MLPs, norms, embeddings, the LM head) a dense prefill spends "
            f"{', '.join(bounds)} tokens of its TTFT: the least TTFT / dense that any attention sparsity "
            "could reach on this machine.",
        ]
    return "\n".join(lines) + "\n"


def parse_setting(text: str) -> tuple[int, int]:
    """``"2048/2048"`` -> ``(2048, 2048)`` (window size, vertical size)."""
    try:
        window, vertical = (int(part) for part in text.split("/"))
    except ValueError:
        msg = f"--settings takes WINDOW/VERTICAL pairs such as 2048/2048, got {text!r}."
        raise argparse.ArgumentTypeError(msg) from None
    return window, vertical


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[8192, 16384], help="prompt tokens")
    parser.add_argument("--settings", nargs="+", type=parse_setting, default=[(2048, 2048)],
                        help="sparse WINDOW/VERTICAL pairs (default 2048/2048)")
    parser.add_argument("--observers", type=int, default=33, help="last prompt positions that score keys (33)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy answer length (default 16)")
    parser.add_argument("--task", choices=TASKS, default="niah_single")
    parser.add_argument("--sample", type=int, default=0, help="sample index (default 0)")
    parser.add_argument("--model", default=DEFAULT_TARGET)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)

    import torch

    from draft_rag.decoding import chat_prompt_ids

    target = load_model(args.model, dtype="float32", device="cpu", attn_implementation="sdpa")
    generator = TaskGenerator(target.tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULTS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {(r["model"], r["task"], r["length"], r["sample_id"], r["window_size"], r["vertical_size"]) for r in rows}
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    warm = False
    for length in args.lengths:
        sample = generator.sample(args.task, length, args.sample)
        ids = chat_prompt_ids(target.tokenizer, [{"role": "user", "content": sample.prompt()}])
        for setting in [None, *args.settings]:
            key = (args.model, args.task, length, args.sample, *(setting or (None, None)))
            if key in done:
                continue
            if not warm:  # the first forward pass of a process pays one-off allocation costs
                run_mode(target, ids[:, :256], sample, 1, None, args.observers)
                warm = True
            row = {
                "model": args.model, "task": args.task, "length": length, "sample_id": args.sample,
                "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "run": run,
                "machine": hardware_label("cpu"),
                "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
                **run_mode(target, ids, sample, args.new_tokens, setting, args.observers),
            }
            rows.append(row)
            with open(path, "a", encoding="utf-8") as sink:
                sink.write(json.dumps(row) + "\n")
            print(f"{length} {row['mode']} {setting or ''}: TTFT {row['ttft_s']:.1f} s (cpu {row['ttft_cpu_s']:.1f}), "
                  f"attention {row['attention_s']:.1f} s, mlp {row['mlp_s']:.1f} s, found {row['found']}: "
                  f"{row['answer']!r}", flush=True)
    if rows:
        (args.out / SUMMARY_FILE).write_text(summarize(rows))
        print(summarize(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

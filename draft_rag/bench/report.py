"""Turn benchmark rows into ``summary.md`` (accuracy and latency tables) and ``accuracy_vs_budget.png``.

Latency is reported as ratios to ``full`` over the same samples of the same run: absolute seconds depend
on the machine and on whatever else it was doing, ratios much less so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from draft_rag.bench.methods import KV_METHODS, METHODS

SUMMARY_FILE = "summary.md"
PLOT_FILE = "accuracy_vs_budget.png"


def _method_order(name: str) -> int:
    return METHODS.index(name) if name in METHODS else len(METHODS)


def _groups(rows: Iterable[Mapping[str, Any]], *keys: str) -> dict[tuple[Any, ...], list[Mapping[str, Any]]]:
    grouped: dict[tuple[Any, ...], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[tuple(row[k] for k in keys)].append(row)
    return grouped


def _settings(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, int | None]]:
    """(method, budget) pairs present in ``rows``: ``full`` first, then by method and budget."""
    pairs = {(row["method"], row["budget"]) for row in rows}
    return sorted(pairs, key=lambda p: (p[0] != "full", _method_order(p[0]), p[0], p[1] or 0))


def _label(method: str, budget: int | None) -> str:
    return method if budget is None else f"{method} @ {budget}"


def accuracy_table(rows: Sequence[Mapping[str, Any]], length: int) -> str:
    """Markdown table at one length: mean accuracy (%) per method/budget (rows) and task (columns)."""
    rows = [r for r in rows if r["length"] == length]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cells = _groups(rows, "method", "budget", "task")
    lines = [
        "| method @ budget | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for method, budget in _settings(rows):
        scores = [cells.get((method, budget, task)) for task in tasks]
        shown = [f"{100 * mean(r['accuracy'] for r in c):.1f} (n={len(c)})" if c else "–" for c in scores]
        task_means = [mean(r["accuracy"] for r in c) for c in scores if c]
        overall = f"{100 * mean(task_means):.1f}" if task_means else "–"
        lines.append(f"| {_label(method, budget)} | " + " | ".join(shown) + f" | {overall} |")
    return "\n".join(lines)


def latency_table(rows: Sequence[Mapping[str, Any]], length: int) -> str:
    """Markdown table at one length: seconds, ratios to ``full`` on the same samples, tokens and memory."""
    rows = [r for r in rows if r["length"] == length]
    full = {(r["task"], r["sample_id"]): r for r in rows if r["method"] == "full"}
    lines = [
        "| method @ budget | end-to-end vs full | answer vs full | compress s | answer s | end-to-end s "
        "| prompt tokens | KV MiB | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups = _groups(rows, "method", "budget")
    for method, budget in _settings(rows):
        group = groups[(method, budget)]
        paired = [(r, full[k]) for r in group if (k := (r["task"], r["sample_id"])) in full]
        ratio = _ratio(sum(r["total_s"] for r, _ in paired), sum(f["total_s"] for _, f in paired))
        answer_ratio = _ratio(sum(r["answer_s"] for r, _ in paired), sum(f["answer_s"] for _, f in paired))
        lines.append(
            f"| {_label(method, budget)} | {ratio} | {answer_ratio} "
            f"| {mean(r['compress_s'] for r in group):.2f} | {mean(r['answer_s'] for r in group):.2f} "
            f"| {mean(r['total_s'] for r in group):.2f} | {mean(r['prompt_tokens'] for r in group):.0f} "
            f"| {mean(r['kv_bytes'] for r in group) / 2**20:.1f} "
            f"| {max(r['peak_rss_mb'] for r in group):.0f} |"
        )
    return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 else "–"


def write_summary(
    rows: Sequence[Mapping[str, Any]],
    out: Path,
    *,
    title: str = "draft-rag bench",
    notes: Sequence[str] = (),
    skipped: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out/summary.md``: notes, then per length an accuracy table and a latency table."""
    parts = [f"# {title}", ""]
    parts += [f"- {note}" for note in notes]
    for name, reason in (skipped or {}).items():
        parts.append(f"- `{name}` skipped: {reason}")
    parts.append("")
    for length in sorted({r["length"] for r in rows}):
        parts += [
            f"## {length} tokens: accuracy (%)",
            "",
            "Mean string-match accuracy per task (n = samples); `mean` averages the task columns. "
            "Prompt-side budgets are context tokens kept; KV-side (`speckv`, `snapkv`, `streamingllm`) "
            "budgets are KV entries per head.",
            "",
            accuracy_table(rows, length),
            "",
            f"## {length} tokens: latency and memory",
            "",
            "Ratios divide summed seconds by `full`'s on the same samples of this run. `compress` is the "
            "compressor's time (the draft's lookahead for SpecKV); `answer` is the target's prefill and "
            "decoding. KV MiB is the target's prompt KV cache after compression; peak RSS is the process's.",
            "",
            latency_table(rows, length),
            "",
        ]
    path = out / SUMMARY_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def plot_accuracy(rows: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Write ``out/accuracy_vs_budget.png``: mean accuracy over tasks vs budget, one line per method.

    One panel per length; ``full`` is a dashed horizontal line, KV-side methods are dotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    figure, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    for axis, length in zip(axes[0], lengths, strict=True):
        at_length = [r for r in rows if r["length"] == length]
        by_task = _groups(at_length, "method", "budget", "task")
        curves: dict[str, list[tuple[int | None, float]]] = defaultdict(list)
        for method, budget in _settings(at_length):
            task_means = [mean(r["accuracy"] for r in c) for (m, b, _), c in by_task.items()
                          if (m, b) == (method, budget)]
            curves[method].append((budget, 100 * mean(task_means)))
        # Markers shrink from method to method so that methods with equal accuracy stay visible.
        for rank, (method, points) in enumerate(curves.items()):
            if method == "full":
                axis.axhline(points[0][1], color="black", linestyle="--", label="full")
                continue
            budgets, accuracy = zip(*sorted(points, key=lambda p: p[0] or 0), strict=True)
            style = ":" if method in KV_METHODS else "-"
            size = max(3.0, 12.0 - 1.5 * rank)
            axis.plot(budgets, accuracy, marker="o", markersize=size, linestyle=style, label=method)
        ticks = sorted({r["budget"] for r in at_length if r["budget"] is not None})
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("budget (tokens / KV entries per head)")
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(-2, 102)
        axis.set_title(f"{length}-token prompts")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path = out / PLOT_FILE
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

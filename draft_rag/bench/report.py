"""Turn benchmark rows into ``summary.md`` (accuracy and latency tables) and two plots.

Every accuracy is shown with its number of samples ``n`` and a 95% Wilson score interval, so a reader can
tell a difference from noise: at n = 20, 90% means anything from 70% to 97%. Latency is reported as ratios
to ``full`` over the same samples of the same run: absolute seconds depend on the machine and on whatever
else it was doing, ratios much less so. Rows of several runs (another machine or dtype, see
:func:`draft_rag.bench.runner.merge_runs`) share the accuracy tables, but seconds are never put side by side
across runs: the latency table and the time plot come once per run.

- ``accuracy_vs_budget.png``: accuracy (mean over tasks) against the budget, one line per method with its
  interval as a band; ``full`` is a dashed line with its band.
- ``accuracy_vs_time.png``: accuracy against mean end-to-end seconds (compress + answer), one point per
  method and budget with its interval as an error bar.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from statistics import mean
from typing import Any, TypeVar

from draft_rag.bench.methods import KV_METHODS, METHODS
from draft_rag.bench.runner import SAMPLE_FIELDS, sample_key

SUMMARY_FILE = "summary.md"
PLOT_FILE = "accuracy_vs_budget.png"
TIME_PLOT_FILE = "accuracy_vs_time.png"
Z_95 = 1.959963984540054


def wilson_interval(accuracy: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion ``accuracy`` observed over ``n`` samples.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0% or 100%. Tasks that give
    partial credit (a fraction of the gold answers found) are treated as if each sample were one trial with
    that mean, an approximation that errs on the wide side for them.
    """
    if n <= 0:
        return 0.0, 1.0
    z2 = z * z
    centre = (accuracy + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _cell(accuracy: float, n: int) -> str:
    low, high = wilson_interval(accuracy, n)
    return f"{100 * accuracy:.1f} [{100 * low:.0f}, {100 * high:.0f}] n={n}"


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


Row = TypeVar("Row", bound=Mapping[str, Any])


def run_label(row: Mapping[str, Any]) -> str:
    """The run a row's seconds belong to: its dtype and the machine that timed it."""
    return f"{row.get('dtype') or 'float32'} on {row.get('machine') or 'an unrecorded machine'}"


def _runs(rows: Sequence[Row]) -> list[tuple[str, list[Row]]]:
    """``rows`` split by :func:`run_label`, in the order the runs first appear."""
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        grouped.setdefault(run_label(row), []).append(row)
    return list(grouped.items())


def _label(method: str, budget: int | None) -> str:
    return method if budget is None else f"{method} @ {budget}"


def _accuracy(cells: Iterable[Sequence[Mapping[str, Any]]]) -> tuple[float, int]:
    """Mean over tasks of each task's mean accuracy, and the number of samples behind it."""
    groups = [c for c in cells if c]
    if not groups:
        return 0.0, 0
    return mean(mean(r["accuracy"] for r in c) for c in groups), sum(len(c) for c in groups)


def complete_samples(rows: Sequence[Row]) -> tuple[list[Row], int]:
    """The rows of samples that every method and budget of their run in ``rows`` has answered, and how many rows
    were left out.

    A run that stopped part-way through a sample has answered it with some methods only; comparing methods
    on different samples would mix the samples' difficulty into the methods' differences. Where rows come from
    several runs (:func:`run_label`), each sample is held to the methods and budgets of its own run, and within
    a run to those of its own task (a method run on one task only leaves the other tasks' samples complete).
    """
    wanted = {(length, task, run): {(r["method"], r["budget"]) for r in group}
              for run, of_run in _runs(rows) for (length, task), group in _groups(of_run, "length", "task").items()}
    complete = {key for key, group in _groups(rows, *SAMPLE_FIELDS).items()
                if {(r["method"], r["budget"]) for r in group}
                >= wanted[group[0]["length"], group[0]["task"], run_label(group[0])]}
    kept = [row for row in rows if sample_key(row) in complete]
    return kept, len(rows) - len(kept)


def accuracy_table(rows: Sequence[Mapping[str, Any]], length: int) -> str:
    """Markdown table at one length: accuracy (%) per method/budget (rows) and task (columns).

    Each cell reads ``mean [95% Wilson interval] n=samples``; ``mean`` averages the task columns, its interval
    counts every sample of the row.
    """
    rows = [r for r in rows if r["length"] == length]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    cells = _groups(rows, "method", "budget", "task")
    lines = [
        "| method @ budget | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for method, budget in _settings(rows):
        scores = [cells.get((method, budget, task), []) for task in tasks]
        shown = [_cell(*_accuracy([c])) if c else "–" for c in scores]
        overall = _cell(*_accuracy(scores)) if any(scores) else "–"
        lines.append(f"| {_label(method, budget)} | " + " | ".join(shown) + f" | {overall} |")
    return "\n".join(lines)


def latency_table(rows: Sequence[Mapping[str, Any]], length: int) -> str:
    """Markdown table at one length: seconds, ratios to ``full`` on the same samples, tokens, memory and the seconds
    spent before the question (``warm_s``; 0 for rows that do not record it)."""
    rows = [r for r in rows if r["length"] == length]
    full = {(r["task"], r["sample_id"]): r for r in rows if r["method"] == "full"}
    lines = [
        "| method @ budget | end-to-end vs full | answer vs full | compress s | answer s | end-to-end s "
        "| prompt tokens | KV MiB | peak RSS MiB | warm s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"| {max(r['peak_rss_mb'] for r in group):.0f} | {mean(r.get('warm_s', 0.0) for r in group):.2f} |"
        )
    return "\n".join(lines)


SPECPC_VARIANTS = ("specpc-apart", "specpc-cached", "specpc-2pass", "specpc-lookahead", "specpc-question",
                   "specpc-cached-question", "specpc-cached-question-lookahead", "specpc-cached-question-rescore",
                   "specpc-cached-question-recompute")
"""SpecPC's variants, each compared with SpecPC itself (and the embedding filter) rather than SpecPC with them."""
PAIRED_REFERENCES = {
    "specpc": tuple(m for m in METHODS if m not in KV_METHODS and m not in SPECPC_VARIANTS),
    **{variant: ("specpc", "embedding") for variant in SPECPC_VARIANTS},
    "speckv": ("full", *KV_METHODS),
}
"""The methods each reference is compared with on the same samples: SpecPC and SpecKV with their own side's others
and ``full``; each SpecPC variant with SpecPC and the embedding filter."""


def paired_differences(
    pairs: Sequence[tuple[float, float]], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired scores, in points, with a 95% percentile bootstrap interval.

    The same samples answered by two methods are resampled together, so the interval reflects how much the
    two methods differ on the same questions, which is narrower than two independent intervals would
    suggest. Deterministic for a given ``seed``.
    """
    import random

    diffs = [100 * (a - b) for a, b in pairs]
    if not diffs:
        return 0.0, 0.0, 0.0
    rng = random.Random(seed)
    means = sorted(mean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return mean(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def paired_table(rows: Sequence[Mapping[str, Any]], length: int) -> str:
    """Markdown table at one length: each reference of :data:`PAIRED_REFERENCES` (``specpc``, its variants,
    ``speckv``) against its methods at the same budget (``full`` at none), on the samples both answered: wins,
    ties, losses and the mean difference."""
    rows = [r for r in rows if r["length"] == length]
    scores = {(r["method"], r["budget"], r["task"], r["sample_id"]): r["accuracy"] for r in rows}
    lines = [
        "| comparison | samples | better | tie | worse | difference (points) [95% paired bootstrap] |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for reference, others in PAIRED_REFERENCES.items():
        budgets = sorted({b for (m, b, _, _) in scores if m == reference and b is not None})
        for budget in budgets:
            mine = {(t, i): a for (m, b, t, i), a in scores.items() if (m, b) == (reference, budget)}
            for other in others:
                other_budget = None if other == "full" else budget
                pairs = [(a, scores[(other, other_budget, *key)]) for key, a in mine.items()
                         if (other, other_budget, *key) in scores]
                if other == reference or not pairs:
                    continue
                diff, low, high = paired_differences(pairs)
                better = sum(a > b for a, b in pairs)
                worse = sum(a < b for a, b in pairs)
                lines.append(
                    f"| {_label(reference, budget)} vs {_label(other, other_budget)} | {len(pairs)} | {better} "
                    f"| {len(pairs) - better - worse} | {worse} | {diff:+.1f} [{low:+.1f}, {high:+.1f}] |"
                )
    return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator > 0 else "–"


LATENCY_TEXT = (
    "Ratios divide summed seconds by `full`'s on the same samples of this run. `compress` is the compressor's "
    "time (the draft's lookahead for SpecKV); `warm` is work done before the question and not in the end-to-end "
    "time (`specpc-cached`: encoding the sample's documents into the draft cache); `answer` is the target's "
    "prefill and decoding. KV MiB is the target's prompt KV cache after compression; peak RSS is the process's."
)


def write_summary(
    rows: Sequence[Mapping[str, Any]],
    out: Path,
    *,
    title: str = "draft-rag bench",
    notes: Sequence[str] = (),
    skipped: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out/summary.md``: notes, then per length an accuracy table, a latency table and the plots."""
    parts = [f"# {title}", ""]
    parts += [f"- {note}" for note in notes]
    for name, reason in (skipped or {}).items():
        parts.append(f"- `{name}` skipped: {reason}")
    parts.append("")
    runs = _runs(rows)
    for length in sorted({r["length"] for r in rows}):
        latency = []
        for run, of_run in runs:
            heading = f"## {length} tokens: latency and memory" + (f" ({run})" if len(runs) > 1 else "")
            if any(r["length"] == length for r in of_run):
                latency += [heading, "", LATENCY_TEXT, "", latency_table(of_run, length), ""]
        parts += [
            f"## {length} tokens: accuracy (%)",
            "",
            "String-match accuracy per task: mean [95% Wilson interval] n=samples; `mean` averages the "
            "task columns and its interval counts all their samples. Intervals that overlap do not "
            "separate two methods. Prompt-side budgets are context tokens kept; KV-side (`speckv`, "
            "`snapkv`, `streamingllm`) budgets are KV entries per head.",
            "",
            accuracy_table(rows, length),
            "",
            *latency,
            f"## {length} tokens: the same samples, two methods",
            "",
            "Each row pairs SpecPC (or SpecKV) with another method at the same budget (or with `full`), or a "
            "SpecPC variant (" + ", ".join(f"`{name}`" for name in SPECPC_VARIANTS) + ") with SpecPC "
            "(`specpc`: the paper's joint reading) and the embedding filter, on the samples both answered: how often "
            "the first scored higher, equal or lower, and the mean difference in accuracy points with a 95% "
            "bootstrap interval over those pairs. An interval that excludes 0 separates the two methods on these "
            "tasks; one that includes 0 does not.",
            "",
            paired_table(rows, length),
            "",
        ]
    parts += [
        f"![accuracy vs budget]({PLOT_FILE})",
        "",
        f"![accuracy vs end-to-end time]({TIME_PLOT_FILE})",
        "",
    ]
    path = out / SUMMARY_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _color(method: str) -> str:
    """One colour per method, the same in both plots."""
    palette = ("black", "tab:blue", "navy", "teal", "slateblue", "tab:orange", "tab:green", "tab:red", "tab:purple",
               "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
    return palette[_method_order(method) % len(palette)]


def _points(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int | None, float, float, float, float]]]:
    """Per method: ``(budget, accuracy %, low %, high %, mean end-to-end s)`` for each budget, budgets sorted."""
    by_task = _groups(rows, "method", "budget", "task")
    by_setting = _groups(rows, "method", "budget")
    points: dict[str, list[tuple[int | None, float, float, float, float]]] = defaultdict(list)
    for method, budget in _settings(rows):
        accuracy, n = _accuracy(c for (m, b, _), c in by_task.items() if (m, b) == (method, budget))
        low, high = wilson_interval(accuracy, n)
        seconds = mean(r["total_s"] for r in by_setting[(method, budget)])
        points[method].append((budget, 100 * accuracy, 100 * low, 100 * high, seconds))
    return points


def _figure(panels: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_accuracy(rows: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Write ``out/accuracy_vs_budget.png``: mean accuracy over tasks vs budget, one line per method.

    One panel per length; each line carries its 95% Wilson interval as a band. ``full`` is a dashed
    horizontal line with its band in grey; KV-side methods are dotted.
    """
    lengths = sorted({r["length"] for r in rows})
    figure, axes = _figure(len(lengths))
    for axis, length in zip(axes[0], lengths, strict=True):
        at_length = [r for r in rows if r["length"] == length]
        # Markers shrink from method to method so that methods with equal accuracy stay visible.
        for rank, (method, points) in enumerate(_points(at_length).items()):
            if method == "full":
                _, accuracy, low, high, _ = points[0]
                axis.axhline(accuracy, color="black", linestyle="--", label="full")
                axis.axhspan(low, high, color="black", alpha=0.08, linewidth=0)
                continue
            budgets = [p[0] or 0 for p in points]
            style = ":" if method in KV_METHODS else "-"
            color = _color(method)
            axis.plot(budgets, [p[1] for p in points], marker="o", markersize=max(3.0, 10.0 - 1.2 * rank),
                      linestyle=style, color=color, label=method)
            axis.fill_between(budgets, [p[2] for p in points], [p[3] for p in points], color=color, alpha=0.12,
                              linewidth=0)
        ticks = sorted({r["budget"] for r in at_length if r["budget"] is not None})
        axis.set_xscale("log", base=2)
        if ticks:
            axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("budget (context tokens; KV-side: KV entries per head)")
        axis.set_ylabel("accuracy (%), band: 95% Wilson interval")
        axis.set_ylim(-2, 102)
        axis.set_title(f"{length}-token prompts")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return _save(figure, out / PLOT_FILE)


def plot_accuracy_vs_time(rows: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """Write ``out/accuracy_vs_time.png``: accuracy against mean end-to-end seconds (compress + answer).

    One panel per length (and per run, where rows come from several: seconds of different machines or dtypes
    do not share an axis), one point per method and budget (labelled with the budget), error bars for the
    95% Wilson interval; points of one method are joined in budget order. Up and to the left is better.
    """
    runs = _runs(rows)
    panels = [(length, run, [r for r in of_run if r["length"] == length])
              for length in sorted({r["length"] for r in rows}) for run, of_run in runs
              if any(r["length"] == length for r in of_run)]
    figure, axes = _figure(len(panels))
    for axis, (length, run, at_length) in zip(axes[0], panels, strict=True):
        for method, points in _points(at_length).items():
            color = _color(method)
            seconds, accuracy = [p[4] for p in points], [p[1] for p in points]
            # Clamped: at 0% or 100% rounding can put a bound a hair on the wrong side.
            errors = [[max(0.0, p[1] - p[2]) for p in points], [max(0.0, p[3] - p[1]) for p in points]]
            axis.errorbar(seconds, accuracy, yerr=errors, color=color, marker="s" if method == "full" else "o",
                          linestyle=":" if method in KV_METHODS else "-", linewidth=1, capsize=3,
                          label=method)
            for budget, y, _, _, x in points:
                if budget is not None:
                    axis.annotate(str(budget), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                                  color=color)
        axis.set_xlabel("mean end-to-end seconds per sample (compress + answer)")
        axis.set_ylabel("accuracy (%), bars: 95% Wilson interval")
        axis.set_ylim(-2, 102)
        axis.set_xlim(left=0)
        axis.set_title(f"{length}-token prompts (labels: budget)" + (f"\n{run}" if len(runs) > 1 else ""),
                       fontsize=10 if len(runs) > 1 else None)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return _save(figure, out / TIME_PLOT_FILE)

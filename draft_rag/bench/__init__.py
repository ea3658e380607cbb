"""``draft-rag bench``: RULER-style tasks, the methods compared, a resumable runner and the report.

- :mod:`draft_rag.bench.tasks`: seeded task generators at a requested length in target tokens, over the prose of
  :mod:`draft_rag.bench.prose`; :mod:`draft_rag.bench.book_qa`: hand-written questions over real books with
  retrieved context.
- :mod:`draft_rag.bench.methods`: ``full``, prompt-side (SpecPC and its variants: over a warm draft cache,
  two-pass (:mod:`draft_rag.bench.two_pass`) and with a long lookahead; its SnapKV-style ablation, truncation,
  embedding filter, LongLLMLingua (:mod:`draft_rag.bench.longllmlingua`)) and KV-side (SpecKV, SnapKV,
  StreamingLLM) methods behind one interface.
- :mod:`draft_rag.bench.runner`: one JSON row per sample x method x budget, resumable.
- :mod:`draft_rag.bench.hardware`: the hardware label every row records, so rows timed elsewhere are not mixed.
- :mod:`draft_rag.bench.report`: ``summary.md`` (Wilson intervals), ``accuracy_vs_budget.png`` and
  ``accuracy_vs_time.png``.

Nothing here imports torch at import time.
"""

from draft_rag.bench.methods import METHODS, build_methods
from draft_rag.bench.report import plot_accuracy, plot_accuracy_vs_time, write_summary
from draft_rag.bench.runner import BenchConfig, run_bench
from draft_rag.bench.tasks import DEFAULT_TASKS, TASKS, Sample, TaskGenerator

__all__ = [
    "DEFAULT_TASKS",
    "METHODS",
    "TASKS",
    "BenchConfig",
    "Sample",
    "TaskGenerator",
    "build_methods",
    "plot_accuracy",
    "plot_accuracy_vs_time",
    "run_bench",
    "write_summary",
]

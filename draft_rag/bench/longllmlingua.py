"""The ``llmlingua`` method on the bench's side: the LongLLMLingua environment, its worker and the compressor.

llmlingua 0.2.2 needs transformers 4.x, so LongLLMLingua runs in a second process with its own environment
(``bash scripts/llmlingua-env.sh``), started once and kept loaded: :mod:`draft_rag.bench.llmlingua_worker`.
This module finds that environment, speaks to the worker and counts its output in target tokens. (It is not
named ``llmlingua.py``: the worker runs as a script from this folder, where such a file would hide the
``llmlingua`` package from it.)
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from draft_rag.bench.methods import Compressor

LLMLINGUA_ENV = ".venv-llmlingua"
LLMLINGUA_PYTHON = "DRAFT_RAG_LLMLINGUA_PYTHON"
"""Environment variable naming the LongLLMLingua environment's python (default: ``.venv-llmlingua/bin/python``
in the working directory, else beside the ``draft_rag`` package)."""
WORKER_FILE = Path(__file__).with_name("llmlingua_worker.py")


def llmlingua_python() -> Path | None:
    """The LongLLMLingua environment's python: ``$DRAFT_RAG_LLMLINGUA_PYTHON``, else ``.venv-llmlingua`` in the
    working directory or beside the ``draft_rag`` package (a source checkout); None when there is none."""
    if os.environ.get(LLMLINGUA_PYTHON):
        path = Path(os.environ[LLMLINGUA_PYTHON]).expanduser()
        return path if path.is_file() else None
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / LLMLINGUA_ENV / "bin" / "python"
        if path.is_file():
            return path
    return None


@dataclass
class TextOnly:
    """A compressor's output that is one text, not spans of each document (LongLLMLingua reorders and merges)."""

    text: str
    dropped: bool = False


@dataclass
class TextOnlyResult:
    documents: list[TextOnly]
    total_kept_tokens: int
    seconds: float


@dataclass
class LLMLinguaWorker:
    """The LongLLMLingua worker process: started once, the draft loaded once, requests as JSON lines.

    Args:
        python: the LongLLMLingua environment's python.
        model: the draft's safetensors directory (or a hub id that environment can load).
        tokenizer: a tokenizer directory transformers 4.44 can read.
        dtype: the draft's dtype, as the main process runs it (``"bfloat16"``, ``"float32"``).
        threads: torch threads for the worker (default: this process's).
        command: the worker's command line (default: ``python llmlingua_worker.py``); tests use a fake.
    """

    python: Path
    model: str
    tokenizer: str
    dtype: str = "float32"
    threads: int = 0
    command: list[str] | None = None
    _process: subprocess.Popen[str] | None = field(default=None, init=False, repr=False)
    _log: IO[str] | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        """Start the worker and load the draft, unless it is already running."""
        if self._process is not None and self._process.poll() is None:
            return
        import torch

        self._log = tempfile.TemporaryFile("w+", encoding="utf-8")
        self._process = subprocess.Popen(
            self.command or [str(self.python), str(WORKER_FILE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, encoding="utf-8",
        )
        atexit.register(self.close)
        self.request({"op": "load", "model": self.model, "tokenizer": self.tokenizer, "dtype": self.dtype,
                      "threads": self.threads or torch.get_num_threads()})

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the worker's answer; a failure raises with the worker's own words."""
        if self._process is None or self._process.stdin is None or self._process.stdout is None:
            msg = "the LongLLMLingua worker is not running; call start() first."
            raise RuntimeError(msg)
        try:
            self._process.stdin.write(json.dumps(message, ensure_ascii=False) + "\n")
            self._process.stdin.flush()
            line = self._process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            msg = f"the LongLLMLingua worker stopped. Its last output:\n{self._log_tail()}"
            raise RuntimeError(msg)
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            msg = f"the LongLLMLingua worker failed on {message.get('op')!r}: {reply.get('error')}"
            raise RuntimeError(msg)
        return reply

    def close(self) -> None:
        """Ask the worker to quit (then end it if it does not)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.write('{"op": "quit"}\n')
                process.stdin.close()
            process.wait(timeout=10)
        except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()

    def _log_tail(self, chars: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-chars:]


@dataclass
class LongLLMLingua:
    """LongLLMLingua at one budget, through the shared worker; the budget counts target tokens.

    LongLLMLingua returns one text (documents ranked, reordered by relevance and merged), so the target
    reads it as a single document. Its budget (``target_token``) is approximate: text beyond the budget is
    cut at the end, where the least relevant document ends up, so every method reads at most ``budget``
    context tokens.
    """

    worker: LLMLinguaWorker
    budget: int
    tokenizer: Any
    """Counts tokens (the target's tokenizer)."""

    def compress(self, query: str, documents: list[str]) -> TextOnlyResult:
        self.worker.start()  # a no-op unless the worker stopped since
        started = time.perf_counter()
        reply = self.worker.request(
            {"op": "compress", "question": query, "documents": documents, "budget": self.budget}
        )
        ids = list(self.tokenizer(reply["text"], add_special_tokens=False)["input_ids"])
        text = reply["text"] if len(ids) <= self.budget else str(self.tokenizer.decode(ids[: self.budget]))
        # A ranking reused from this sample's previous budget counts as if this call had made it (as SpecPC's
        # shared draft pass does), so every budget's time is what one call costs.
        seconds = time.perf_counter() - started + float(reply.get("reused_s", 0.0))
        return TextOnlyResult([TextOnly(text)], min(len(ids), self.budget), seconds)


def llmlingua_compressors(worker: LLMLinguaWorker, tokenizer: Any) -> Callable[[int], Compressor]:
    """Make LongLLMLingua compressors for any budget that share ``worker``, started on the first one (so
    starting it and loading the draft happen before the bench's clock runs, as for every other method)."""

    def make(budget: int) -> Compressor:
        worker.start()
        return LongLLMLingua(worker, budget, tokenizer)

    return make

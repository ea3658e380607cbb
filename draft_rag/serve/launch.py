"""Starting servers as child processes on loopback: a free port, waiting until one answers, llama.cpp.

For the benchmark, the examples and the tests that put the gateway in front of a real llama.cpp server
(``llama-cpp-python[server]``); the gateway itself never starts processes.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

LOG_TAIL_LINES = 30
"""Lines of a server's log quoted when it exits or does not get ready."""


def free_port() -> int:
    """A loopback port nothing listens on now (for servers that cannot be told port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_ready(url: str, processes: Sequence[subprocess.Popen[Any]], seconds: float,
                     log: Path | None = None) -> None:
    """Return once a GET of ``url`` answers 200; raise RuntimeError if one of ``processes`` exits first or
    ``seconds`` pass.

    Args:
        url: what to ask, e.g. the server's ``/v1/models`` or ``/health``.
        processes: the processes the answer depends on; any one exiting ends the wait.
        seconds: how long to wait.
        log: the file the processes write their output to; its last lines go into the error. Without it
            the error points at the output the processes wrote to the terminal.
    """
    import httpx

    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=5) as client:
        while True:
            for process in processes:
                if process.poll() is not None:
                    msg = f"a server exited ({process.returncode}) before {url} answered{_tail(log)}"
                    raise RuntimeError(msg)
            with contextlib.suppress(httpx.TransportError):
                if client.get(url).status_code == 200:
                    return
            if time.monotonic() > deadline:
                msg = f"{url} was not ready within {seconds:.0f} s{_tail(log)}"
                raise RuntimeError(msg)
            time.sleep(0.5)


@contextlib.contextmanager
def started(command: Sequence[str], ready_url: str, *, seconds: float = 600,
            log_path: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command``, wait until ``ready_url`` answers (:func:`wait_until_ready`) and yield the process; stop
    it after, always: terminated, and killed if it has not exited 30 s later.

    ``log_path``: the file that takes the process's output (default: this process's own output).
    """
    if log_path is None:
        process = subprocess.Popen(list(command))
    else:
        with open(log_path, "w") as sink:
            process = subprocess.Popen(list(command), stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(ready_url, [process], seconds, log_path)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def llama_cpp_server(gguf_path: str | Path, *, threads: int | None = None, batch_threads: int | None = None,
                     n_ctx: int = 4096, port: int | None = None, log_path: Path | None = None,
                     seconds: float = 600) -> Iterator[str]:
    """``python -m llama_cpp.server`` serving ``gguf_path`` on loopback; yields its ``/v1`` URL once it answers,
    and stops it after, always (:func:`started`).

    Args:
        gguf_path: the model file.
        threads, batch_threads: llama.cpp's threads for generating and for reading the prompt
            (``--n_threads``, ``--n_threads_batch``; default: llama.cpp's choice).
        n_ctx: the context window in tokens.
        port: the port (default: a free one).
        log_path: the file that takes the server's output (default: this process's own output).
        seconds: how long loading the model may take.
    """
    port = port or free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--verbose", "False"]
    if threads is not None:
        command += ["--n_threads", str(threads)]
    if batch_threads is not None:
        command += ["--n_threads_batch", str(batch_threads)]
    url = f"http://127.0.0.1:{port}/v1"
    with started(command, f"{url}/models", seconds=seconds, log_path=log_path):
        yield url


def _tail(log: Path | None) -> str:
    """The end of ``log`` after a colon, to close an error message; without a log, where the output went."""
    if log is None:
        return "; see its output above"
    return ":\n" + "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])

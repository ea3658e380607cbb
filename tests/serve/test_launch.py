"""Starting servers as child processes: waiting until they answer, clear errors when they do not, stopping them."""

from __future__ import annotations

import subprocess
import sys

import httpx
import psutil
import pytest

from draft_rag.serve.launch import free_port, started, wait_until_ready


def test_a_process_that_exits_while_starting_is_a_clear_error_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-c", "print('no such model file'); raise SystemExit(3)"],
                                   stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{free_port()}/v1/models"
    with pytest.raises(RuntimeError, match=r"exited \(3\) before .*/v1/models answered:\nno such model file"):
        wait_until_ready(url, [process], 60, log)


def test_without_a_log_the_error_points_at_the_output():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    with pytest.raises(RuntimeError, match=r"exited \(1\) .*; see its output above$"):
        wait_until_ready(f"http://127.0.0.1:{free_port()}/health", [process], 60)


def test_a_server_is_ready_once_it_answers_and_is_stopped_after(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(tmp_path)]
    with started(command, f"http://127.0.0.1:{port}/", seconds=60, log_path=tmp_path / "server.log") as process:
        assert process.poll() is None
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    assert process.returncode is not None


def test_a_server_that_never_answers_is_a_timeout_and_is_stopped(tmp_path):
    log = tmp_path / "server.log"
    command = [sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"]
    with pytest.raises(RuntimeError, match=r"was not ready within 1 s:\n\d+"):
        with started(command, f"http://127.0.0.1:{free_port()}/health", seconds=1, log_path=log):
            pytest.fail("the server never answered")
    pid = int(log.read_text().split()[0])
    assert not psutil.pid_exists(pid), "the process outlived the failed start"

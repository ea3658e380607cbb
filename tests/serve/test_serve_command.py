"""``draft-rag serve``: its options, clear errors for bad values, and ``--workers 2`` as real processes sharing a
draft cache directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from draft_rag.cli import main
from draft_rag.commands import serve as serve_command
from draft_rag.serve.launch import free_port, wait_until_ready
from draft_rag.serve.settings import SETTINGS_ENV, GatewaySettings
from tests.integrations.test_compression_adapters import QUERY, TEXTS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("argv", "message"), [
    (["--upstream", "ftp://127.0.0.1/v1"], "upstream must be an http:// or https:// URL"),
    (["--upstream", "127.0.0.1:8080"], "upstream must be an http:// or https:// URL"),
    (["--upstream", "http://127.0.0.1:8080/v1?key=1"], "without query, fragment or credentials"),
    (["--upstream", "http://x/v1", "--port", "70000"], "port must be at most 65535"),
    (["--upstream", "http://x/v1", "--budget", "0"], "budget must be >= 1"),
    (["--upstream", "http://x/v1", "--workers", "0"], "workers must be >= 1"),
    (["--upstream", "http://x/v1", "--queue-size", "0"], "queue_size must be >= 1"),
    (["--upstream", "http://x/v1", "--read-timeout", "0"], "read_timeout must be a positive number"),
    (["--upstream", "http://x/v1", "--connect-timeout", "nan"], "connect_timeout must be a positive number"),
    (["--upstream", "http://x/v1", "--max-request-bytes", "-1"], "max_request_bytes must be >= 1"),
    ([], "give exactly one of upstream (--upstream URL"),
    (["--upstream", "http://x/v1", "--target", "t"], "engine mode), not both"),
    (["--target", "t", "--connect-timeout", "10"], "connect_timeout (--connect-timeout) applies only with an upstream"),
    (["--target", "t", "--upstream-api-key", "k"], "upstream_api_key (--upstream-api-key) applies only with an"),
    (["--target", "t", "--target-tokenizer", "x"], "target_tokenizer (--target-tokenizer) applies only with an"),
    (["--upstream", "http://x/v1", "--method", "speckv"], "method (--method) applies only with the server's own model"),
    (["--upstream", "http://x/v1", "--kv-budget", "9"], "kv_budget (--kv-budget) applies only with the server's own"),
    (["--upstream", "http://x/v1", "--max-batch-size", "4"], "max_batch_size (--max-batch-size) applies only with"),
    (["--target", "t", "--workers", "2"], "workers must be 1 in engine mode"),
    (["--target", "t", "--method", "nope"], "unknown method 'nope'"),
    (["--target", "t", "--kv-budget", "16"], "window_size must be smaller than budget (16)"),
    (["--target", "t", "--kv-budget", "0"], "kv_budget must be >= 1"),
    (["--target", "t", "--max-batch-size", "0"], "max_batch_size must be >= 1"),
    (["--target", "t", "--max-tokens", "0"], "max_tokens must be >= 1"),
    (["--target", "t", "--lookahead-tokens", "0"], "lookahead_tokens must be >= 1"),
    (["--target", " "], "target must be a non-empty string"),
])
def test_bad_options_get_a_clear_error(capsys, monkeypatch, argv, message):
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: pytest.fail("the server must not start"))
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_without_the_serve_extra_the_error_names_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--upstream", "http://127.0.0.1:8080/v1"]) == 2
    assert "pip install 'draft-rag[serve]'" in capsys.readouterr().err


def test_options_become_settings(monkeypatch):
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **options: calls.append((app, options)))
    monkeypatch.setattr("draft_rag.serve.app.create_app", lambda settings: settings)
    assert main(["serve", "--upstream", "http://10.0.0.5:8000/v1/", "--host", "0.0.0.0", "--port", "9000",
                 "--budget", "512", "--observe-from", "window", "--recompute-factor", "3", "--draft", "some/draft",
                 "--cache-dir", "/tmp/c",
                 "--target-tokenizer", "some/tok",
                 "--max-request-bytes", "1000", "--queue-size", "3", "--connect-timeout", "2", "--read-timeout", "30",
                 "--log-level", "warning"]) == 0
    [(settings, options)] = calls
    assert settings == GatewaySettings(
        upstream="http://10.0.0.5:8000/v1", host="0.0.0.0", port=9000, budget=512, observe_from="window",
        recompute_factor=3, draft="some/draft",
        cache_dir="/tmp/c", target_tokenizer="some/tok", max_request_bytes=1000, queue_size=3, connect_timeout=2.0,
        read_timeout=30.0)
    assert (options["host"], options["port"], options["log_level"]) == ("0.0.0.0", 9000, "warning")
    assert options["log_config"]["loggers"]["draft_rag"]["level"] == "WARNING"


def test_engine_options_become_settings(monkeypatch):
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **options: calls.append((app, options)))
    monkeypatch.setattr("draft_rag.serve.app.create_app", lambda settings: settings)
    # The upstream's key in the environment is the gateway's business: engine mode neither takes nor refuses it.
    monkeypatch.setenv(serve_command.UPSTREAM_API_KEY_ENV, "upstream-key")
    assert main(["serve", "--target", "some/model", "--method", "snapkv", "--kv-budget", "128",
                 "--lookahead-tokens", "16", "--max-batch-size", "8", "--max-tokens", "64", "--draft", "some/draft",
                 "--device", "cpu", "--port", "9001"]) == 0
    [(settings, options)] = calls
    assert settings == GatewaySettings(target="some/model", method="snapkv", kv_budget=128, lookahead_tokens=16,
                                       max_batch_size=8, max_tokens=64, draft="some/draft", device="cpu", port=9001)
    assert settings.engine_mode and settings.upstream is None and options["port"] == 9001


def test_observe_from_reaches_specpc_and_a_bad_value_names_the_setting(capsys, monkeypatch):
    from draft_rag.serve.app import build_specpc

    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: pytest.fail("the server must not start"))
    with pytest.raises(SystemExit) as refused:
        main(["serve", "--upstream", "http://x/v1", "--observe-from", "answer"])
    assert refused.value.code == 2
    assert "argument --observe-from: invalid choice: 'answer'" in capsys.readouterr().err
    assert build_specpc(GatewaySettings(upstream="http://x/v1")).observe_from == "question"
    assert build_specpc(GatewaySettings(upstream="http://x/v1", observe_from="window")).observe_from == "window"
    with pytest.raises(ValueError, match="observe_from must be one of 'auto', 'window', 'question', got 'last'"):
        GatewaySettings(upstream="http://x/v1", observe_from="last")


@pytest.mark.parametrize("name", ["rescore_factor", "recompute_factor"])
def test_candidate_factors_reach_specpc_and_a_bad_value_names_the_setting(name):
    from draft_rag.serve.app import build_specpc

    assert getattr(build_specpc(GatewaySettings(upstream="http://x/v1")), name) == 0
    assert getattr(build_specpc(GatewaySettings(upstream="http://x/v1", **{name: 2})), name) == 2
    with pytest.raises(ValueError, match=f"{name} must be 0 .off. or at least 2"):
        GatewaySettings(upstream="http://x/v1", **{name: 1})
    with pytest.raises(ValueError, match=f"{name} must be >= 0, got -1"):
        GatewaySettings(upstream="http://x/v1", **{name: -1})
    with pytest.raises(TypeError, match=f"{name} must be an integer"):
        GatewaySettings(upstream="http://x/v1", **{name: 2.0})


def test_the_two_candidate_factors_are_refused_together(capsys, monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: pytest.fail("the server must not start"))
    with pytest.raises(ValueError, match="--rescore-factor or --recompute-factor"):
        GatewaySettings(upstream="http://x/v1", rescore_factor=2, recompute_factor=2)
    assert main(["serve", "--upstream", "http://x/v1", "--rescore-factor", "2", "--recompute-factor", "3"]) == 2
    assert "set one of them (--rescore-factor or --recompute-factor)" in capsys.readouterr().err


def test_settings_travel_to_workers_as_json(monkeypatch):
    settings = GatewaySettings(upstream="http://127.0.0.1:8080/v1", budget=77, api_key="k1", workers=3)
    monkeypatch.setenv(SETTINGS_ENV, settings.to_json())
    assert GatewaySettings.from_environment() == settings
    monkeypatch.delenv(SETTINGS_ENV)
    with pytest.raises(ValueError, match=SETTINGS_ENV):
        GatewaySettings.from_environment()


def test_two_workers_share_the_cache_directory(stub, tiny_draft, tmp_path):
    upstream, url = stub
    draft_dir = tmp_path / "draft"
    tiny_draft.model.save_pretrained(draft_dir)
    tiny_draft.tokenizer.save_pretrained(draft_dir)
    port = free_port()
    key = "worker-key-31337"
    env = {**os.environ, "DRAFT_RAG_API_KEY": key, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "integrations/langchain"), str(REPO / "integrations/llama_index"),
         os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "draft_rag.cli", "serve", "--upstream", url, "--port", str(port),
               "--workers", "2", "--draft", str(draft_dir), "--dtype", "float32", "--cache-dir",
               str(tmp_path / "cache"), "--budget", "40", "--log-level", "warning"]
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{base}/health", [process], 120, log)
        with httpx.Client(timeout=60) as client:
            workers = psutil.Process(process.pid).children(recursive=True)
            command_lines = [" ".join(worker.cmdline()) for worker in workers]
            answers = [client.post(f"{base}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                   json={"model": "m", "messages": [{"role": "user", "content": QUERY}],
                                         "documents": TEXTS}) for _ in range(6)]
            refused = client.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert [a.status_code for a in answers] == [200] * 6, answers[0].text
    assert {a.json()["draft_rag"]["context_tokens_after"] for a in answers} <= set(range(1, 41))
    assert refused.status_code == 401, "the key reached the workers through the environment"
    assert len([line for line in command_lines if "spawn_main" in line]) == 2
    assert not any(key in line for line in command_lines), "the key is on no command line"
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) >= len(TEXTS), "the cache is on disk"
    assert len(upstream.chats()) == 6
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert alive == [], "a worker outlived the gateway"

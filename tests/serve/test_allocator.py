"""The gateway process keeps freed memory for reuse, unless the environment already tunes the allocator."""

from __future__ import annotations

import platform

import pytest

from draft_rag.cli import main
from draft_rag.serve import allocator
from draft_rag.serve.allocator import KEPT, USER_SETTINGS, keep_freed_memory
from draft_rag.serve.settings import SETTINGS_ENV, GatewaySettings


class RecordingLibc:
    def __init__(self, answer: int = 1) -> None:
        self.answer = answer
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return self.answer


def test_sets_one_arena_and_high_thresholds(monkeypatch):
    libc = RecordingLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    assert keep_freed_memory({}) is True
    assert libc.calls == list(KEPT.items())
    assert dict(libc.calls) == {allocator.M_ARENA_MAX: 1, allocator.M_MMAP_THRESHOLD: 32 << 20,
                                allocator.M_TRIM_THRESHOLD: 512 << 20}


@pytest.mark.parametrize("name", USER_SETTINGS)
def test_an_allocator_the_environment_tunes_is_left_alone(monkeypatch, name):
    monkeypatch.setattr(allocator, "_glibc", lambda: pytest.fail("malloc must not be touched"))
    assert keep_freed_memory({name: "2"}) is False


def test_a_refused_setting_or_another_c_library_reports_false(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: RecordingLibc(answer=0))
    assert keep_freed_memory({}) is False
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert keep_freed_memory({}) is False


def test_the_real_c_library(monkeypatch):
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is on_glibc


def test_serve_keeps_freed_memory_before_the_app_is_built(monkeypatch):
    events = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: events.append("malloc") or True)
    monkeypatch.setattr("draft_rag.serve.app.create_app", lambda settings: events.append("app") or settings)
    monkeypatch.setattr("uvicorn.run", lambda app, **options: events.append("run"))
    assert main(["serve", "--upstream", "http://127.0.0.1:8080/v1"]) == 0
    assert events == ["malloc", "app", "run"]


def test_each_worker_keeps_freed_memory(monkeypatch):
    from draft_rag.serve import app

    events = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: events.append("malloc") or True)
    monkeypatch.setattr(app, "create_app", lambda settings: events.append("app") or settings)
    monkeypatch.setenv(SETTINGS_ENV, GatewaySettings(upstream="http://127.0.0.1:8080/v1", workers=2).to_json())
    assert app.app_from_environment().workers == 2
    assert events == ["malloc", "app"]

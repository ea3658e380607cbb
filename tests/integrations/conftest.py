from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

from tests.tiny import tiny_model


@pytest.fixture(scope="session")
def tiny_draft():
    """The draft for the compression adapters (same tokenizer as every tiny model)."""
    return tiny_model("qwen2", seed=11)


T = TypeVar("T")

ENGINE_SETTINGS = {"method": "speckv", "budget": 16, "window_size": 4}
"""SpecKV settings shared by the chat-model and LLM adapter tests (small enough to evict on short prompts)."""


@pytest.fixture(scope="module")
def engine(tiny_pair):
    """The SpecKV engine an adapter built from ``tiny_pair`` and ENGINE_SETTINGS must agree with."""
    from draft_rag import SpecKV

    draft, target = tiny_pair
    return SpecKV(target=target, draft=draft, **ENGINE_SETTINGS)


def assert_models_load_on_first_call(monkeypatch, tiny_pair, make_adapter, call):
    """Constructing ``make_adapter(target_name, draft_name)`` loads nothing; the first ``call(adapter)`` loads both."""
    import draft_rag.engine

    draft, target = tiny_pair
    loads = []

    def fake_load(name, **kwargs):
        loads.append(name)
        return {"some-target": target, "some-draft": draft}[name]

    monkeypatch.setattr(draft_rag.engine, "load_model", fake_load)
    adapter = make_adapter("some-target", "some-draft")
    assert loads == []
    call(adapter)
    assert loads == ["some-target", "some-draft"]


def finishes_within(seconds: float, work: Callable[[], T]) -> T:
    """``work()``'s result; the test fails instead of hanging when a deadlock or starvation keeps it longer.

    ``work`` runs in a daemon thread, so a hung call is left behind rather than blocking the test run.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as error:  # noqa: BLE001 (re-raised in the test's thread)
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"the calls did not finish within {seconds} s: a deadlock or a starved stream")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]

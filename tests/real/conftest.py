from __future__ import annotations

import inspect
from collections.abc import Generator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> Generator[None, Any, None]:
    """Run coroutine tests on an event loop.

    The langchain-tests standard suites define ``async def`` tests without pytest-asyncio's marker; they
    expect ``asyncio_mode = "auto"``. The marker is added here, before pytest-asyncio wraps the items, so
    the rest of the test tree keeps strict mode.
    """
    outcome = yield
    if not inspect.iscoroutinefunction(obj):
        return
    items = outcome.get_result()
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, pytest.Function):
            item.add_marker(pytest.mark.asyncio)

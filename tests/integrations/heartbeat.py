"""Count event-loop ticks while async work runs: a blocked loop does not tick."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

INTERVAL = 0.005


async def ticks_during(work: Callable[[], Awaitable[Any]], min_seconds: float = 0.3) -> tuple[int, float]:
    """Await ``work()`` again and again for at least ``min_seconds`` beside a heartbeat task.

    Returns the ticks the heartbeat counted and the seconds taken.
    """
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(INTERVAL)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)
    started = time.perf_counter()
    while time.perf_counter() - started < min_seconds:
        await work()
    seconds = time.perf_counter() - started
    beat.cancel()
    return ticks, seconds


def assert_loop_kept_ticking(ticks: int, seconds: float) -> None:
    """At least a tenth of the ticks an idle loop would count; a blocked loop counts none.

    The margin is wide because the worker thread competes with the loop for the GIL and the CPU.
    """
    expected = seconds / INTERVAL
    assert ticks >= expected / 10, f"{ticks} ticks in {seconds:.3f} s: the event loop was blocked"

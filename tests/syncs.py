"""Count where draft-rag's own code reads a tensor's value on the host.

On a GPU each such read (``.item()``, ``.tolist()``, ``int(t)``, ``if t:`` ...) makes the host wait until the
device has finished everything queued before it. On the CPU nothing waits, but the calls are the same, so
counting them on the CPU tells what a GPU run would wait for. Only calls made directly by a module of the
``draft_rag`` package count: torch's and transformers' own reads are theirs. (On a GPU,
``torch.cuda.set_sync_debug_mode`` reports the waits themselves; see tests/test_cuda.py.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """Inside the block, record ``"module:line method"`` for each tensor read made by draft-rag's code."""
    seen: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name: str, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith("draft_rag"):
                seen.append(f"{module}:{caller.f_lineno} {name}")
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)

"""The hardware a measured time depends on, as the benchmark records it in every row."""

from __future__ import annotations

from draft_rag.models import cpu_flags

_CPU_MATMUL_LEVELS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")
"""x86 flags that change which matrix kernels PyTorch runs, fastest first."""


def hardware_label(device: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The hardware that a measured time depends on, in a few words.

    On CUDA the GPU's name; on a CPU the architecture, the best of :data:`_CPU_MATMUL_LEVELS` it has and
    torch's thread count, e.g. ``"x86_64 CPU (avx512_bf16), 2 torch threads"``. The benchmark stores it in every
    row, so rows timed on different machines are never mixed.
    """
    import platform

    import torch

    if str(device).startswith("cuda"):
        return f"CUDA {torch.cuda.get_device_name(torch.device(device))}"
    flags = cpu_flags(cpuinfo)
    level = next((flag for flag in _CPU_MATMUL_LEVELS if flag in flags), "generic")
    return f"{platform.machine()} CPU ({level}), {torch.get_num_threads()} torch threads"

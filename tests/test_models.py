"""Model loading: local directories, packaged-model assembly, clear errors."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.metadata
import importlib.util
import multiprocessing
import re
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch

from draft_rag import models, packaged
from draft_rag.models import LoadedModel, load_model, stop_token_ids
from draft_rag.packaged import PackagedModel
from tests.tiny import tiny_model


def test_loads_a_local_directory_once(tmp_path):
    tiny = tiny_model("llama", seed=3)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    first = load_model(str(tmp_path), device="cpu", dtype=torch.float32)
    assert load_model(tmp_path, device="cpu", dtype=torch.float32) is first
    assert first.model.config._attn_implementation == "sdpa" and first.model.dtype == torch.float32
    # Without a dtype the CPU's own default applies (bf16 where it has native bf16, see below).
    assert load_model(tmp_path, device="cpu").model.dtype == models.default_dtype("cpu")
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(first.model(ids).logits, tiny.model(ids).logits)


def test_loaded_model_passes_through(tiny_qwen):
    assert load_model(tiny_qwen) is tiny_qwen


def test_each_loaded_model_has_its_own_lock(tiny_qwen):
    """The lock lives on the loaded model, shared by every engine that uses it, and is not data."""
    twin = LoadedModel(model=tiny_qwen.model, tokenizer=tiny_qwen.tokenizer, name=tiny_qwen.name)
    assert isinstance(tiny_qwen.lock, type(threading.Lock()))
    assert twin.lock is not tiny_qwen.lock
    assert twin == tiny_qwen
    assert "lock" not in repr(tiny_qwen)
    with tiny_qwen.lock:
        assert not twin.lock.locked()


def test_bad_arguments():
    with pytest.raises(TypeError, match="name_or_path"):
        load_model(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        load_model("anything", dtype="float99")


def test_stop_tokens_include_chat_end(tiny_qwen):
    vocab = tiny_qwen.tokenizer.get_vocab()
    assert vocab["<|im_end|>"] in stop_token_ids(tiny_qwen)


def _fake_parts(root, package, chunks):
    pkg = root / package / "data"
    pkg.mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    for i, chunk in enumerate(chunks, 1):
        (pkg / f"part{i:02d}.bin").write_bytes(chunk)


FAKE_GGUF = b"GGUF-abc-defg"


def _fake_spec(sha256: str = hashlib.sha256(FAKE_GGUF).hexdigest(), size: int = len(FAKE_GGUF)) -> PackagedModel:
    return PackagedModel("fake", ("fakemodel_part1", "fakemodel_part2"), size, sha256, "1.0")


@pytest.fixture()
def fake_packages(tmp_path, monkeypatch):
    _fake_parts(tmp_path, "fakemodel_part1", [b"GGUF", b"-abc"])
    _fake_parts(tmp_path, "fakemodel_part2", [b"-defg"])
    monkeypatch.syspath_prepend(str(tmp_path))
    return _fake_spec()


def test_assembles_parts_in_order(fake_packages, tmp_path):
    out = tmp_path / "fake.gguf"
    packaged._assemble_gguf(fake_packages, out, progress=False)
    assert out.read_bytes() == FAKE_GGUF
    assert not list(tmp_path.glob("*.tmp"))


def test_size_mismatch_is_reported(fake_packages, tmp_path):
    spec = _fake_spec(size=99)
    with pytest.raises(OSError, match="expected 99.*pip install --force-reinstall fakemodel-part1==1.0"):
        packaged._assemble_gguf(spec, tmp_path / "x.gguf", progress=False)


def test_digest_mismatch_is_reported_and_leaves_nothing(fake_packages, tmp_path):
    """Parts of the right total size but other bytes (a damaged part, another release) are never converted."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    spec = _fake_spec(sha256=hashlib.sha256(b"GGUF-abc-defh").hexdigest())
    fix = "pip install --force-reinstall fakemodel-part1==1.0 fakemodel-part2==1.0"
    with pytest.raises(OSError, match=f"SHA-256 {hashlib.sha256(FAKE_GGUF).hexdigest()}.*{re.escape(fix)}"):
        packaged._assemble_gguf(spec, out_dir / "fake.gguf", progress=False)
    assert list(out_dir.iterdir()) == []


def test_a_leftover_assembled_file_is_checked_again(fake_packages, tmp_path, monkeypatch):
    """A GGUF of the right size left by an interrupted first use is assembled again, not converted as it is."""
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake", fake_packages)
    root = tmp_path / "cache" / "fake"
    root.mkdir(parents=True)
    (root / "fake.gguf").write_bytes(b"X" * len(FAKE_GGUF))
    converted = []
    monkeypatch.setattr(packaged, "_convert_gguf", lambda gguf, out_dir: converted.append(gguf.read_bytes()))
    packaged.ensure_packaged_model("fake", progress=False)
    assert converted == [FAKE_GGUF]


def test_packaged_gguf_is_assembled_once_and_kept(fake_packages, tmp_path, monkeypatch):
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake", fake_packages)
    path = packaged.packaged_gguf("fake", progress=False)
    assert path == tmp_path / "cache" / "fake" / "gguf" / "fake.gguf"
    assert path.read_bytes() == FAKE_GGUF
    monkeypatch.setattr(packaged, "_assemble_gguf", lambda *args, **kwargs: pytest.fail("assembled again"))
    assert packaged.packaged_gguf("fake", progress=False) == path
    with pytest.raises(ValueError, match="not a packaged model"):
        packaged.packaged_gguf("no-such-model")


def test_packaged_gguf_replaces_a_file_of_the_wrong_size(fake_packages, tmp_path, monkeypatch):
    monkeypatch.setenv(packaged.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "fake", fake_packages)
    truncated = tmp_path / "cache" / "fake" / "gguf" / "fake.gguf"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(FAKE_GGUF[:5])
    assert packaged.packaged_gguf("fake", progress=False).read_bytes() == FAKE_GGUF


def test_packaged_specs_match_the_pinned_extra():
    """The digests hold for one release of the part packages; the ``models`` extra must install that release."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    for spec in packaged.PACKAGED_MODELS.values():
        assert re.fullmatch("[0-9a-f]{64}", spec.sha256)
        for requirement in spec.requirements:
            assert f'"{requirement}"' in pyproject


def test_declared_build_and_torch_requirements():
    """The torch floor covers what the code (sdpa ``enable_gqa``: 2.5) and the installed transformers need;
    the license is an SPDX string, which setuptools reads from 77 on (a TOML table is deprecated)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.MULTILINE)
    setuptools_floor = re.search(r'"setuptools>=([\d.]+)"', pyproject)
    assert setuptools_floor and Version(setuptools_floor[1]) >= Version("77")
    torch_floor = re.search(r'^    "torch>=([\d.]+)",$', pyproject, re.MULTILINE)
    assert torch_floor
    needed = [Version("2.5")]
    for line in importlib.metadata.requires("transformers") or []:
        requirement = Requirement(line)
        if requirement.name == "torch" and requirement.marker and requirement.marker.evaluate({"extra": "torch"}):
            needed += [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    assert Version(torch_floor[1]) >= max(needed)


def test_missing_package_names_the_pip_command():
    spec = PackagedModel("nope", ("no_such_pkg_part1",), 1, "0" * 64, "1.0")
    with pytest.raises(ImportError, match=r"pip install 'draft-rag\[models\]'.*no-such-pkg-part1"):
        packaged.packaged_parts(spec)


def _build_in_process(path: str, cache: str) -> None:
    sys.path.insert(0, path)
    import os

    os.environ[packaged.CACHE_ENV] = cache
    packaged.PACKAGED_MODELS["fake"] = _fake_spec()

    def convert(gguf, out_dir):  # stands in for the slow dequantisation; same temp-then-rename contract
        tmp = out_dir.with_name(out_dir.name + f".{os.getpid()}.tmp")
        tmp.mkdir()
        (tmp / "config.json").write_bytes(gguf.read_bytes())
        os.replace(tmp, out_dir)

    packaged._convert_gguf = convert
    packaged.ensure_packaged_model("fake", progress=False)


def test_concurrent_first_use_is_safe(fake_packages, tmp_path):
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path), str(cache))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (cache / "fake" / "hf" / "config.json").read_bytes() == FAKE_GGUF
    assert not (cache / "fake" / "fake.gguf").exists()
    assert not list((cache / "fake").glob("*.tmp"))


def test_loaded_model_reports_context(tiny_qwen):
    assert isinstance(tiny_qwen, LoadedModel) and tiny_qwen.max_context == 4096


def test_lazy_builds_once_when_threads_race():
    import threading
    import time

    from draft_rag.adapters import Lazy

    lazy: Lazy[object] = Lazy()
    builds = []

    def build():
        builds.append(1)
        time.sleep(0.05)
        return object()

    results = []
    threads = [threading.Thread(target=lambda: results.append(lazy.get(build))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len({id(r) for r in results}) == 1


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", True),
        ("fpu sse avx2 amx_tile amx_bf16 amx_int8", True),
        ("fpu sse avx2 avx512f avx512_vnni", False),
        ("fpu sse avx2 fma", False),
    ],
)
def test_cpu_bf16_detection_reads_the_flags(tmp_path, flags, expected):
    from draft_rag.models import cpu_has_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")
    assert cpu_has_bf16(str(cpuinfo)) is expected
    assert cpu_has_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize(
    ("flags", "level"),
    [
        ("fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16", "amx_bf16"),
        ("fpu sse avx2 avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
        ("fpu sse avx2 avx512f avx512_vnni", "avx512f"),
        ("fpu sse avx2 fma", "avx2"),
        ("fpu sse", "generic"),
    ],
)
def test_hardware_label_names_the_cpu_kernels_and_threads(tmp_path, flags, level):
    import platform

    import torch

    from draft_rag.bench.hardware import hardware_label

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n")
    label = hardware_label("cpu", str(cpuinfo))
    assert label == f"{platform.machine()} CPU ({level}), {torch.get_num_threads()} torch threads"


def test_default_dtype_follows_the_cpu(monkeypatch):
    import torch

    from draft_rag import models

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.default_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert models.default_dtype("cpu") == torch.float32


@pytest.fixture()
def fake_cuda(monkeypatch):
    """torch.cuda as it looks with GPUs: ``set(current=..., capability=..., native_bf16=...)`` describes them.

    ``is_bf16_supported`` answers like torch does on a pre-Ampere GPU: True with emulation counted, so a caller
    that leaves ``including_emulation`` at its default gets bf16 where it is slow.
    """
    state = {"current": 0, "capability": (8, 0), "native_bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: state["native_bf16"] or including_emulation
    )
    return state


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_dtype_is_bf16_only_where_the_gpu_has_it(fake_cuda, native_bf16, expected):
    fake_cuda["native_bf16"] = native_bf16
    assert models.default_dtype("cuda") == expected
    assert models.default_dtype("cuda:0") == expected


def _flash_attn_installed(monkeypatch, installed: bool) -> None:
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "flash_attn":
            return object() if installed else None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    ("device", "capability", "dtype", "installed", "expected"),
    [
        ("cuda", (8, 0), torch.bfloat16, True, "flash_attention_2"),
        ("cuda:0", (9, 0), torch.float16, True, "flash_attention_2"),
        ("cuda", (8, 0), torch.bfloat16, False, "sdpa"),
        ("cuda", (8, 0), torch.float32, True, "sdpa"),
        ("cuda", (7, 5), torch.float16, True, "sdpa"),
        ("cuda", (7, 0), torch.float16, True, "sdpa"),
        ("cpu", None, torch.bfloat16, True, "sdpa"),
    ],
)
def test_flash_attention_only_where_it_runs(fake_cuda, monkeypatch, device, capability, dtype, installed, expected):
    fake_cuda["capability"] = capability
    _flash_attn_installed(monkeypatch, installed)
    assert models.default_attn_implementation(device, dtype) == expected


def test_a_pre_ampere_gpu_gets_fp16_and_sdpa(fake_cuda, monkeypatch):
    """The defaults together, as load_model picks them on a T4 with flash-attn installed."""
    fake_cuda.update(capability=(7, 5), native_bf16=False)
    _flash_attn_installed(monkeypatch, True)
    dtype = models.default_dtype("cuda")
    assert (dtype, models.default_attn_implementation("cuda", dtype)) == (torch.float16, "sdpa")


def test_device_spellings_share_one_registry_key(fake_cuda):
    def key(device):
        return models._load_key("m", device, torch.float32, "sdpa", None)

    assert key("cuda") == key("cuda:0") == key(torch.device("cuda", 0)) != key("cuda:1")
    fake_cuda["current"] = 1
    assert key("cuda") == key("cuda:1") != key("cuda:0")
    assert key("cpu") == key("cpu:0") == key(torch.device("cpu"))


def test_bad_device_is_named():
    with pytest.raises(ValueError, match="device 'gpu'.*'cuda:1'"):
        load_model("anything", device="gpu")


def test_cpu_spellings_load_one_model(tmp_path):
    tiny = tiny_model("llama", seed=4)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    first = load_model(tmp_path, device="cpu", dtype=torch.float32)
    assert load_model(tmp_path, device="cpu:0", dtype=torch.float32) is first
    assert load_model(tmp_path, device=torch.device("cpu"), dtype=torch.float32) is first


def test_a_model_no_one_holds_is_freed(tmp_path, monkeypatch):
    """Held models are shared however many others load; unheld ones beyond the recent few are freed."""
    monkeypatch.setattr(models, "KEEP_RECENT", 1)
    tiny = tiny_model("llama", seed=5)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    del tiny

    def load(dtype):
        return load_model(tmp_path, device="cpu", dtype=dtype)

    held = load(torch.float32)
    dropped = weakref.ref(load(torch.bfloat16))
    gc.collect()
    assert dropped() is not None  # the most recent one is kept
    load(torch.float16)  # now the most recent
    gc.collect()
    assert dropped() is None
    assert load(torch.float32) is held  # older than the recent one, but held: still the one shared copy
    recent = weakref.ref(load(torch.float16))
    models.release_unused_models()
    assert recent() is None and load(torch.float32) is held

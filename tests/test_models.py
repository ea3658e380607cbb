"""Model loading: local directories, packaged-model assembly, clear errors."""

from __future__ import annotations

import multiprocessing
import sys
import threading

import pytest
import torch

from draft_rag import models
from draft_rag.models import LoadedModel, PackagedModel, load_model, stop_token_ids
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


@pytest.fixture()
def fake_packages(tmp_path, monkeypatch):
    _fake_parts(tmp_path, "fakemodel_part1", [b"GGUF", b"-abc"])
    _fake_parts(tmp_path, "fakemodel_part2", [b"-defg"])
    monkeypatch.syspath_prepend(str(tmp_path))
    return PackagedModel("fake", ("fakemodel_part1", "fakemodel_part2"), 13)


def test_assembles_parts_in_order(fake_packages, tmp_path):
    out = tmp_path / "fake.gguf"
    models._assemble_gguf(fake_packages, out, progress=False)
    assert out.read_bytes() == b"GGUF-abc-defg"
    assert not list(tmp_path.glob("*.tmp"))


def test_size_mismatch_is_reported(fake_packages, tmp_path):
    spec = PackagedModel("fake", fake_packages.packages, 99)
    with pytest.raises(OSError, match="expected 99.*pip install --force-reinstall fakemodel-part1"):
        models._assemble_gguf(spec, tmp_path / "x.gguf", progress=False)


def test_missing_package_names_the_pip_command():
    spec = PackagedModel("nope", ("no_such_pkg_part1",), 1)
    with pytest.raises(ImportError, match=r"pip install 'draft-rag\[models\]'.*no-such-pkg-part1"):
        models.packaged_parts(spec)


def _build_in_process(path: str, cache: str) -> None:
    sys.path.insert(0, path)
    import os

    os.environ[models.CACHE_ENV] = cache
    spec = PackagedModel("fake", ("fakemodel_part1", "fakemodel_part2"), 13)
    models.PACKAGED_MODELS["fake"] = spec

    def convert(gguf, out_dir):  # stands in for the slow dequantisation; same temp-then-rename contract
        tmp = out_dir.with_name(out_dir.name + f".{os.getpid()}.tmp")
        tmp.mkdir()
        (tmp / "config.json").write_bytes(gguf.read_bytes())
        os.replace(tmp, out_dir)

    models._convert_gguf = convert
    models.ensure_packaged_model("fake", progress=False)


def test_concurrent_first_use_is_safe(fake_packages, tmp_path):
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path), str(cache))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (cache / "fake" / "hf" / "config.json").read_bytes() == b"GGUF-abc-defg"
    assert not (cache / "fake" / "fake.gguf").exists()
    assert not list((cache / "fake").glob("*.tmp"))


def test_loaded_model_reports_context(tiny_qwen):
    assert isinstance(tiny_qwen, LoadedModel) and tiny_qwen.max_context == 4096


def test_lazy_builds_once_when_threads_race():
    import threading
    import time

    lazy: models.Lazy[object] = models.Lazy()
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

    from draft_rag.models import hardware_label

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
    assert models.default_dtype("cuda:0") == torch.bfloat16

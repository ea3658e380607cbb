"""DraftCache entries that cannot lie, private files, clear errors for bad directories, one encoding per key
under concurrency, and warm() streaming its documents (tiny fp32 models)."""

from __future__ import annotations

import copy
import itertools
import os
import re
import tempfile
import threading
from concurrent.futures import Future

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from draft_rag import DraftCache, LoadedModel, cli
from draft_rag import draft_cache as draft_cache_module
from draft_rag.draft_cache import model_fingerprint
from draft_rag.draft_cache.store import DIRECTORY_MODE, FILE_MODE, file_checksum
from tests.test_draft_cache import DOCS, LONG_DOC, QUERY, make, scores
from tests.tiny import tiny_model


def rewrite(path, change):
    """Rewrite the entry file ``path`` with ``change(tensors)`` applied and its metadata kept as it was."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def mode(path):
    return path.stat().st_mode & 0o777


# Entries that lie: weights, NaN keys, cut layers.


def test_a_copy_with_every_other_weight_changed_gets_its_own_fingerprint(draft):
    same = LoadedModel(copy.deepcopy(draft.model), draft.tokenizer)
    changed = LoadedModel(copy.deepcopy(draft.model), draft.tokenizer)
    with torch.no_grad():
        for parameter in changed.model.parameters():
            if parameter.ndim == 2:
                parameter.view(-1)[1::2] += 0.01
    assert model_fingerprint(same.model) == model_fingerprint(draft.model)  # the weights decide, not the object
    assert model_fingerprint(changed.model) != model_fingerprint(draft.model)
    cache = DraftCache()
    make(draft, cache).warm(DOCS)
    make(changed, cache).warm(DOCS)
    assert cache.stats.misses == 8  # the changed copy reuses none of the original's entries
    make(same, cache).warm(DOCS)
    assert cache.stats.misses == 8


def test_entries_with_nan_keys_are_rebuilt(draft, tmp_path):
    fresh = make(draft, DraftCache())
    expected_texts, expected_scores = fresh.compress(QUERY, DOCS).texts, scores(fresh, QUERY, DOCS)
    make(draft, DraftCache(directory=tmp_path)).warm(DOCS)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 4
    for path in files:  # the header and metadata stay intact
        rewrite(path, lambda tensors, _: tensors["keys"].fill_(float("nan")))
    reread = make(draft, DraftCache(directory=tmp_path))
    assert reread.compress(QUERY, DOCS).texts == expected_texts
    torch.testing.assert_close(scores(reread, QUERY, DOCS), expected_scores, atol=0, rtol=0)
    assert (reread.cache.stats.misses, reread.cache.stats.hits) == (4, 4)
    again = DraftCache(directory=tmp_path)  # the rebuilt files replaced the poisoned ones
    make(draft, again).warm(DOCS)
    assert again.stats.misses == 0


@pytest.mark.parametrize("checksum", ["kept", "recomputed"])
def test_an_entry_cut_to_fewer_layers_is_rebuilt(draft, tmp_path, checksum):
    def cut(tensors, metadata):
        tensors["keys"], tensors["values"] = tensors["keys"][:1].clone(), tensors["values"][:1].clone()
        if checksum == "recomputed":  # a well-formed file of the wrong shape: the shape check must catch it
            metadata["checksum"] = file_checksum(tensors)

    expected = make(draft, DraftCache()).compress(QUERY, DOCS).texts
    make(draft, DraftCache(directory=tmp_path)).warm(DOCS)
    for path in tmp_path.glob("*.safetensors"):
        rewrite(path, cut)
    reread = DraftCache(directory=tmp_path)
    assert make(draft, reread).compress(QUERY, DOCS).texts == expected
    assert reread.stats.misses == 4


def test_files_without_a_checksum_are_rebuilt_in_place(draft, tmp_path):
    make(draft, DraftCache(directory=tmp_path)).warm(DOCS)
    files = sorted(tmp_path.glob("*.safetensors"))
    for path in files:
        rewrite(path, lambda _, metadata: metadata.pop("checksum"))
    reread = DraftCache(directory=tmp_path)
    make(draft, reread).warm(DOCS)
    assert reread.stats.misses == 4
    assert sorted(tmp_path.glob("*.safetensors")) == files


# Private files and their directory.


# 0o277 leaves mkdir and mkstemp without the owner's write bit (so no missing parent here: it would be read-only).
@pytest.mark.parametrize(("umask", "below"), [(0o022, "parent/cache"), (0o000, "parent/cache"), (0o277, "cache")])
def test_a_created_directory_is_0700_and_its_files_0600(draft, tmp_path, umask, below):
    directory = tmp_path / below
    old = os.umask(umask)
    try:
        cache = DraftCache(directory=directory)
        make(draft, cache).warm(DOCS)
    finally:
        os.umask(old)
    assert mode(directory) == DIRECTORY_MODE == 0o700
    files = list(directory.iterdir())
    assert len(files) == 4 and all(path.suffix == ".safetensors" for path in files)  # no temporary files left
    assert {mode(path) for path in files} == {FILE_MODE} == {0o600}


def test_an_existing_directory_keeps_its_mode(draft, tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o750)
    make(draft, DraftCache(directory=directory)).warm(DOCS)
    assert mode(directory) == 0o750
    assert {mode(path) for path in directory.iterdir()} == {0o600}


def test_files_are_written_through_mkstemp_in_the_directory_and_synced_before_the_rename(draft, tmp_path, monkeypatch):
    events = []
    mkstemp, fsync, replace = tempfile.mkstemp, os.fsync, os.replace

    def recording_mkstemp(*args, **kwargs):
        handle, name = mkstemp(*args, **kwargs)
        events.append(("mkstemp", name))
        return handle, name

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))  # the path of the file being synced
        fsync(fd)

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append(("replace", str(src))) or replace(src, dst))
    make(draft, DraftCache(directory=tmp_path)).warm(DOCS)
    assert len(events) == 12
    for (made, name), (synced, fd_path), (renamed, source) in zip(events[::3], events[1::3], events[2::3]):
        assert (made, synced, renamed) == ("mkstemp", "fsync", "replace")
        assert name == fd_path == source and os.path.dirname(name) == str(tmp_path)


# Bad directories.


def test_an_empty_directory_is_refused():
    with pytest.raises(ValueError, match="directory is empty"):
        DraftCache(directory="")


@pytest.mark.parametrize("directory", [b"/tmp/draft-cache", 123])
def test_a_directory_that_is_not_a_path_is_refused(directory):
    with pytest.raises(TypeError, match=r"directory must be a path \(str or pathlib.Path\), got (bytes|int); pass"):
        DraftCache(directory=directory)


@pytest.mark.parametrize("below", ["", "sub", "sub/deeper"])
def test_a_directory_at_or_under_a_file_is_refused_naming_the_file(tmp_path, below):
    file = tmp_path / "file.txt"
    file.write_text("not a directory")
    with pytest.raises(ValueError, match=re.escape(f"{file} is a file")):
        DraftCache(directory=file / below if below else file)


def test_a_directory_replaced_by_a_file_warns_and_keeps_entries_in_memory(draft, tmp_path):
    directory = tmp_path / "cache"
    cache = DraftCache(directory=directory)
    directory.rmdir()
    directory.write_text("replaced")
    expected = make(draft, DraftCache()).compress(QUERY, DOCS).texts
    with pytest.warns(UserWarning, match=re.escape(f"could not write {directory}")):
        assert make(draft, cache).compress(QUERY, DOCS).texts == expected
    assert (cache.stats.misses, cache.stats.entries) == (4, 4)


def one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"draft-rag {command}: error: ") and "Traceback" not in err
    return err


def test_cli_cache_dir_that_is_a_file_is_a_one_line_error(draft_dir, tmp_path, capsys):
    doc, file = tmp_path / "doc.txt", tmp_path / "file"
    doc.write_text(LONG_DOC)
    file.write_text("not a directory")
    assert cli.main(["index", "--cache-dir", str(file), "--draft", str(draft_dir), str(doc)]) == 2
    assert f"{file} is a file" in one_line_error(capsys, "index")
    args = ["compress", "--query", QUERY, "--budget", "30", "--draft", str(draft_dir), str(doc)]
    assert cli.main([*args, "--cache-dir", str(file / "sub")]) == 2
    assert f"{file} is a file" in one_line_error(capsys, "compress")


@pytest.mark.parametrize("command", ["index", "compress"])
def test_cli_names_a_file_that_is_not_utf8(draft_dir, tmp_path, capsys, command):
    good, bad = tmp_path / "good.txt", tmp_path / "latin1.txt"
    good.write_text(DOCS[0])
    bad.write_bytes("Café au lait, crème brûlée.".encode("latin-1"))
    options = ["--cache-dir", str(tmp_path / "cache")] if command == "index" else ["--query", QUERY, "--budget", "9"]
    assert cli.main([command, *options, "--draft", str(draft_dir), str(good), str(bad)]) == 2
    assert f"{bad} is not UTF-8 text (byte 0xe9 at offset 3)" in one_line_error(capsys, command)


# One encoding per key, however many threads miss it at once.


def run_threads(count, target):
    """Run ``target`` in ``count`` threads started together; each one's exception (or None)."""
    barrier, errors = threading.Barrier(count), [None] * count

    def run(index):
        barrier.wait()
        try:
            target()
        except Exception as error:  # noqa: BLE001 (each thread's outcome is checked)
            errors[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


class CountedEncode:
    """The draft cache's encoder, counting its calls by token ids. With ``fail_first`` set, the first call
    raises, once that many other threads wait on a future (the one of its key)."""

    def __init__(self, encode):
        self.encode, self.calls, self.fail_first = encode, [], 0
        self.waiting = threading.Semaphore(0)

    def __call__(self, model, input_ids, *args, **kwargs):
        self.calls.append(tuple(input_ids))
        if self.fail_first and len(self.calls) == 1:
            for _ in range(self.fail_first):
                assert self.waiting.acquire(timeout=60)
            msg = "the draft ran out of memory"
            raise RuntimeError(msg)
        return self.encode(model, input_ids, *args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    counted = CountedEncode(draft_cache_module.encode_chunk)
    result = Future.result

    def counting_result(self, timeout=None):
        counted.waiting.release()
        return result(self, timeout)

    monkeypatch.setattr(draft_cache_module, "encode_chunk", counted)
    monkeypatch.setattr(Future, "result", counting_result)
    return counted


def test_concurrent_misses_of_a_key_encode_it_once(draft, counted):
    cache = DraftCache()
    pc = make(draft, cache)
    threads = 8
    assert run_threads(threads, lambda: pc.warm(DOCS)) == [None] * threads
    assert len(counted.calls) == len(set(counted.calls)) == 4  # the prefix and three documents, once each
    assert (cache.stats.misses, cache.stats.hits) == (4, threads * 4 - 4)
    expected = make(draft, DraftCache()).compress(QUERY, DOCS).texts
    assert pc.compress(QUERY, DOCS).texts == expected


def test_a_failed_encoding_reaches_every_waiter_and_is_retried_later(draft, counted):
    threads = 6
    counted.fail_first = threads - 1  # the shared prefix's encoding fails while the other threads wait for it
    cache = DraftCache()
    pc = make(draft, cache)
    errors = run_threads(threads, lambda: pc.warm(DOCS))
    assert all(isinstance(error, RuntimeError) and "out of memory" in str(error) for error in errors)
    assert len(counted.calls) == 1 and cache.stats.entries == 0
    pc.warm(DOCS)  # nothing is left in flight: the key is encoded afresh
    assert len(counted.calls) == 5 and cache.stats.entries == 4


# warm() streams its documents.


class RecordingTokenizer:
    """A tokenizer that logs each document it tokenizes (the calls that ask for character offsets)."""

    def __init__(self, tokenizer, events):
        self._tokenizer, self._events = tokenizer, events

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            self._events.append(f"tokenize {text[:20]}")
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_warm_tokenizes_each_document_only_when_it_is_encoded(draft):
    events = []
    recording = LoadedModel(draft.model, RecordingTokenizer(draft.tokenizer, events))
    handle = draft.model.get_decoder().register_forward_pre_hook(lambda *_: events.append("forward"))
    try:
        make(recording, DraftCache()).warm(DOCS)
    finally:
        handle.remove()
    steps = [event for event, _ in itertools.groupby(events)]  # runs of forward calls as one
    assert steps == [step for doc in DOCS for step in (f"tokenize {doc[:20]}", "forward")]


def test_add_pulls_chunks_from_an_iterator_one_at_a_time(draft):
    from draft_rag.specpc.prompt import _DraftPrompt

    prefix_ids, chunks = _DraftPrompt(draft.tokenizer, "", DOCS).cache_chunks()
    events = []

    def stream():
        for chunk in chunks:
            events.append("pull")
            yield chunk

    handle = draft.model.get_decoder().register_forward_pre_hook(lambda *_: events.append("forward"))
    cache = DraftCache()
    try:
        cache.add(draft, prefix_ids, stream())
    finally:
        handle.remove()
    steps = [event for event, _ in itertools.groupby(events)]  # runs of forward calls as one
    assert steps == ["forward"] + ["pull", "forward"] * 3
    assert cache.stats.misses == 4


def test_warm_names_a_document_too_long_for_the_draft():
    short_context = tiny_model("qwen2", seed=7, max_position_embeddings=96)
    cache = DraftCache()
    named = r"documents\[2\] \('Retrieval augmented generation reads lon\.\.\.'\) needs \d+ draft tokens"
    with pytest.raises(ValueError, match=named):
        make(short_context, cache).warm([DOCS[1], "  ", DOCS[2] * 3])
    assert cache.stats.entries == 2  # the prefix and the document before the long one are cached

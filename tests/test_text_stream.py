"""TextStream: incremental decoding returns the pieces that decoding every id again would, at a bounded cost."""

from __future__ import annotations

import json
import random

import pytest

from draft_rag.decoding import TextStream
from tests.tiny import CORPUS, tiny_tokenizer

# Words with multi-byte characters (2, 3 and 4 bytes), combining marks, and some no tokenizer here has seen
# (byte-level pieces or byte-fallback tokens).
WORDS = (
    "the quick fox Grüße aus Köln naïve café 東京は晴れです Привет мир 🙂 🚀 … é e\u0301 42 ?! "
    "Łódź ñandú 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 中文字 ⌘ \n \n\n"
).split(" ")


def sentencepiece_tokenizer():
    """A tiny Llama-2-style tokenizer: BPE over "▁"-marked words with byte-fallback tokens ``<0xNN>``.

    Its decoder drops the leading space of the first token of every decode, so decoding a window of ids is
    not the end of decoding them all unless the window starts with context.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    words = Tokenizer(models.BPE(unk_token="<unk>"))
    words.normalizer = normalizers.Replace(" ", "▁")
    words.train_from_iterator([CORPUS] * 20, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                                 show_progress=False))
    trained = json.loads(words.to_str())["model"]
    vocab = trained["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(merge) for merge in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tokenizer.add_special_tokens(special)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte-level": tiny_tokenizer, "sentencepiece": sentencepiece_tokenizer}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def full_decode_pieces(tokenizer, ids: list[int], stop: list[str]) -> list[object]:
    """What each push returns (and whether it stopped), then the flush, decoding all ids at every token."""
    stop = [s for s in stop if s]
    out: list[object] = []
    text, emitted = "", 0
    for count in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:count], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        hits = [i for i in (text.find(s, emitted) for s in stop) if i >= 0]
        if hits:
            text = text[: min(hits)]
            out.append((text[emitted:], True))
            emitted = len(text)
            break
        if text.endswith("\ufffd"):
            out.append(("", False))
            continue
        held = max((size for s in stop for size in range(1, len(s)) if text.endswith(s[:size])), default=0)
        safe = max(emitted, len(text) - held)
        out.append((text[emitted:safe], False))
        emitted = safe
    out.append(text[emitted:])
    return out


def stream_pieces(tokenizer, ids: list[int], stop: list[str]) -> list[object]:
    stream = TextStream(tokenizer, stop)
    out: list[object] = []
    for token in ids:
        out.append((stream.push(token), stream.stopped))
        if stream.stopped:
            break
    out.append(stream.flush())
    return out


def random_ids(tokenizer, rng: random.Random) -> list[int]:
    """Either text with special tokens mixed in, or random ids.

    Random ids of the byte-fallback tokenizer leave out its byte tokens: a run of them that is not UTF-8
    becomes one U+FFFD per byte, valid bytes included, so a full decode rewrites text it already returned
    and no stream can match it; a model writes its byte tokens as whole characters.
    """
    if rng.random() < 0.5:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 30)))
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        for _ in range(rng.randrange(3)):
            ids.insert(rng.randrange(len(ids) + 1), tokenizer.eos_token_id)
        return ids
    allowed = [i for i in range(len(tokenizer)) if not tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
    return [rng.choice(allowed) for _ in range(rng.randrange(1, 60))]


def test_stream_equals_decoding_every_id_again(tokenizer):
    rng = random.Random(0)
    for _ in range(600):
        ids = random_ids(tokenizer, rng)
        full = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        stop = []  # pieces of the answer (they stop it), possibly one that never occurs
        for _ in range(rng.randrange(4)):
            start = rng.randrange(len(full) + 1)
            stop.append(full[start : start + rng.randrange(1, 6)])
        if rng.random() < 0.3:
            stop.append("zz\u00e9z")
        assert stream_pieces(tokenizer, ids, stop) == full_decode_pieces(tokenizer, ids, stop), (ids, stop)


def test_stop_string_and_unfinished_characters_are_held_back(tokenizer):
    ids = list(tokenizer("Grüße 🙂 aus Köln 🚀 und 中文字", add_special_tokens=False)["input_ids"])
    stream = TextStream(tokenizer, ["🚀 und"])
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == "Grüße 🙂 aus Köln " and stream.flush() == ""
    assert all("\ufffd" not in piece for piece in pieces)


class CountingTokenizer:
    """A tokenizer that records how many ids each decode reads."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_each_token_decodes_a_bounded_window(tokenizer):
    rng = random.Random(1)
    text = " ".join(rng.choice(WORDS) for _ in range(400))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    counting = CountingTokenizer(tokenizer)
    stream = TextStream(counting, ["never in the text"])
    out = "".join(stream.push(token) for token in ids) + stream.flush()
    assert out == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    # A window is the tokens of the last whole characters and those since: at most 4 bytes each for 4-byte
    # characters, so at most 8 ids, however long the answer.
    assert len(ids) > 500 and max(counting.lengths) <= 8
    assert sum(counting.lengths) <= 2 * 8 * len(ids)

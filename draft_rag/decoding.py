"""Token-by-token decoding over a (possibly compressed) KV cache: prompts, sampling, stop strings, streaming.

After eviction a cache is shorter than the sequence it stands for, so every step passes the token's true
position explicitly (RoPE stays the original one); the attention mask follows the cache itself.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from draft_rag.checks import check_text
from draft_rag.hf import cache_kwargs

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")


def as_messages(prompt: str | Sequence[Mapping[str, Any]], name: str = "prompt") -> Messages:
    """One prompt as chat messages ``[{"role", "content"}]``, checked before any model runs.

    A string becomes one user message. In a list of messages each must be a dict with a ``role`` of
    ``"system"``, ``"user"`` or ``"assistant"`` and a ``content`` that is a string (``""`` is fine) or a list
    of OpenAI-style text blocks ``{"type": "text", "text": ...}``, which are joined with newlines. Other
    blocks (images, audio, files) raise ValueError; other keys of a message are dropped. Text may hold any
    character, NUL included, except lone surrogates (not encodable Unicode). Errors name the prompt
    ``name`` (``prompt``, or ``prompts[i]`` for an item of a batch).
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": check_text(name, prompt)}]
    elif isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        msg = (
            f"{name} must be a string or a list of {{'role', 'content'}} dicts, got {type(prompt).__name__}; "
            "decode bytes to str first."
        )
        raise TypeError(msg)
    else:
        messages = [_message(f"{name}[{i}]", message) for i, message in enumerate(prompt)]
    if not any(m["content"].strip() for m in messages):
        msg = f"{name} is empty; pass the text to answer (a non-empty string or messages with content)."
        raise ValueError(msg)
    return messages


def _message(where: str, message: object) -> dict[str, str]:
    """One checked chat message; ``where`` (``prompt[i]``) names it in errors."""
    if not isinstance(message, Mapping):
        msg = f"{where} must be a {{'role', 'content'}} dict, got {type(message).__name__}."
        raise TypeError(msg)
    role = message.get("role")
    if role not in ROLES:
        msg = (
            f"{where}['role'] must be one of {', '.join(ROLES)}, got {role!r}; "
            "map other roles (e.g. tool results) to one of these."
        )
        raise ValueError(msg)
    content = message.get("content")
    if content is None:
        msg = f"{where}['content'] is missing or None; give every message its text as a string ('' for none)."
        raise ValueError(msg)
    if isinstance(content, list):
        text = "\n".join(_text_block(f"{where}['content'][{j}]", block) for j, block in enumerate(content))
    elif isinstance(content, str):
        text = check_text(f"{where}['content']", content)
    else:
        msg = (
            f"{where}['content'] must be a string or a list of {{'type': 'text', 'text': ...}} blocks, "
            f"got {type(content).__name__}."
        )
        raise TypeError(msg)
    return {"role": str(role), "content": text}


def _text_block(where: str, block: object) -> str:
    """The text of an OpenAI-style ``{"type": "text", "text": ...}`` content block."""
    if not isinstance(block, Mapping) or not isinstance(block.get("text"), str):
        msg = f"{where} must be a {{'type': 'text', 'text': '...'}} block, got {block!r}."
        raise TypeError(msg)
    if block.get("type") != "text":
        msg = f"{where} is a {block.get('type')!r} block; only text blocks can be read, so remove the others."
        raise ValueError(msg)
    return check_text(where, block["text"])


def stop_strings(stop: str | Sequence[str] | None) -> list[str]:
    """``stop`` (``None``, a string or a list of strings) as a checked list (empty strings stay; they never match)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, (bytes, bytearray)) or not isinstance(stop, Sequence):
        msg = f"stop must be a string, a list of strings or None, got {type(stop).__name__} {stop!r}."
        raise TypeError(msg)
    for index, item in enumerate(stop):
        if not isinstance(item, str):
            msg = f"stop[{index}] must be a string, got {type(item).__name__} {item!r}; pass stop strings as text."
            raise TypeError(msg)
    return list(stop)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> torch.Tensor:
    """Token ids ``[1, n]`` of the messages in the tokenizer's chat template, ready for the assistant's turn.

    A tokenizer without a chat template reads the messages' contents joined by blank lines.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


class Sampler:
    """Pick the next token: greedy when ``temperature == 0``, else temperature and nucleus (top-p) sampling.

    Sampling runs on the logits' device, with a random generator of that device seeded with ``seed`` (one per
    device, made on first use), so the vocabulary never moves to the host. On the CPU, a seed gives the same
    tokens as drawing from a CPU generator with that seed; devices draw different (equally distributed) ones.

    Args:
        temperature: 0 (default) for greedy decoding; higher is more random.
        top_p: keep the smallest set of tokens whose probability adds up to ``top_p`` (default 1.0: all).
        seed: seed of the sampler's own random generators (default: nondeterministic).
    """

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> None:
        temperature, top_p = _finite("temperature", temperature), _finite("top_p", top_p)
        if temperature < 0:
            msg = f"temperature must be >= 0 (0 is greedy), got {temperature}."
            raise ValueError(msg)
        if not 0 < top_p <= 1:
            msg = f"top_p must be in (0, 1] (1 keeps every token), got {top_p}."
            raise ValueError(msg)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            msg = f"seed must be an integer or None, got {type(seed).__name__} {seed!r}."
            raise TypeError(msg)
        if seed is not None and not 0 <= seed < 2**64:
            msg = f"seed must be in [0, 2**64), got {seed}."
            raise ValueError(msg)
        self.temperature = temperature
        self.top_p = top_p
        self.seed = None if seed is None else int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token ids ``[rows]`` from last-position logits ``[rows, vocab]``, on the logits' device."""
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        probs = (logits.float() / self.temperature).softmax(dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
        return torch.multinomial(probs, 1, generator=self._generator(probs.device))[:, 0]

    def _generator(self, device: torch.device) -> torch.Generator:
        """This sampler's random generator on ``device``, seeded on first use."""
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.seed)
            self._generators[device] = generator
        return generator


def sample_rows(logits: torch.Tensor, samplers: Sequence[Sampler]) -> torch.Tensor:
    """Next token ids ``[rows]`` of a batch's logits ``[rows, vocab]``, row ``i`` picked by ``samplers[i]``.

    Everything stays on the logits' device: one argmax when every row is greedy, else one draw per row from
    its own sampler (each prompt of a batch samples as if it were alone).
    """
    if all(sampler.temperature == 0 for sampler in samplers):
        return logits.argmax(dim=-1)
    return torch.cat([sampler(logits[row : row + 1]) for row, sampler in enumerate(samplers)])


class HostCopies:
    """Small int64 rows of device tensors copied to host memory in the device's order, read without draining it.

    A loop that must learn a value computed on the device (a sampled token, a stop flag) copies it here with
    :meth:`put` and reads it later with :meth:`get`. On a CUDA device the copy is ``non_blocking`` into pinned
    memory behind an event, and :meth:`get` waits for that event only: work queued after the copy (the next
    decode step) keeps the device busy meanwhile, where ``.item()`` would wait for the whole queue. Elsewhere
    the copy is done at once. Values are read from a numpy view of the host buffer.

    Args:
        rows: how many rows can be put.
        width: values per row.
        device: the device the values are computed on.

    Attributes:
        overlaps: whether the device runs ahead of the host (CUDA), so that a loop should queue its next step
            before it calls :meth:`get`.
    """

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self._queued = device.type == "cuda"
        self.overlaps = self._queued
        self._host = torch.zeros(rows, width, dtype=torch.int64, pin_memory=self._queued)
        self._view = self._host.numpy()
        self._events: list[Any] = [None] * rows

    def put(self, row: int, values: torch.Tensor) -> None:
        """Queue the copy of ``values`` (``width`` integers or booleans, on the device) into row ``row``."""
        self._host[row].copy_(values.reshape(-1).to(torch.int64), non_blocking=self._queued)
        if self._queued:
            event = torch.cuda.Event()
            event.record()
            self._events[row] = event

    def get(self, row: int) -> Any:
        """Row ``row`` as a numpy array, once its copy (and everything queued before it) is done."""
        event = self._events[row]
        if event is not None:
            event.synchronize()
            self._events[row] = None
        return self._view[row]


def _finite(name: str, value: object) -> float:
    """``value`` as a float, or an error naming ``name`` when it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        msg = f"{name} must be a number, got {type(value).__name__} {value!r}."
        raise TypeError(msg)
    if not math.isfinite(value):
        msg = f"{name} must be a finite number, got {value}."
        raise ValueError(msg)
    return float(value)


def forward_token(model: PreTrainedModel, cache: Cache, token: int, position: int) -> torch.Tensor:
    """Run one token at true position ``position`` against ``cache``; return logits ``[1, vocab]``."""
    return forward_tokens(model, cache, [token], [position])


def forward_tokens(
    model: PreTrainedModel,
    cache: Cache,
    tokens: Sequence[int] | torch.Tensor,
    positions: Sequence[int] | torch.Tensor,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run one token per sequence of a batched ``cache``, each at its own true position; logits ``[batch, vocab]``.

    ``tokens`` and ``positions`` (``[batch]`` each) may be lists or tensors; tensors already on the model's
    device cost no copy from the host, which on CUDA would wait for the device to finish its queue.
    ``padding_mask`` (``[batch, cached entries]``, False where a sequence's cache row is left padding) is
    needed when the sequences' caches were of different lengths; ``None`` means no row is padded.
    """
    device = model.device
    kwargs: dict[str, Any] = {
        "input_ids": torch.as_tensor(tokens, device=device)[:, None],
        "position_ids": torch.as_tensor(positions, device=device)[:, None],
        **cache_kwargs(model, cache),
        "use_cache": True,
    }
    if padding_mask is not None:
        new = torch.ones(padding_mask.shape[0], 1, dtype=torch.bool, device=device)
        kwargs["attention_mask"] = torch.cat([padding_mask.to(device), new], dim=1)
    with torch.inference_mode():
        return model(**kwargs).logits[:, -1]


class TextStream:
    """Turn generated token ids into text pieces, cutting at stop strings and never splitting a character.

    Text that could still become the start of a stop string, and an unfinished multi-byte character, are
    held back until the next tokens settle them, so no emitted piece is ever taken back. Empty stop strings
    are ignored.

    Decoding is incremental, so a long answer costs linear time: each token decodes only the tokens since
    the text last ended in a whole character, together with the tokens of the text before that (their
    decoded text is subtracted), as a tokenizer may write a token differently at the start of a decode (a
    SentencePiece word loses its leading space there).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_settled] are the context of the next decode; they read _prefix_text
        self._settled = 0  # ids before this index are text that ends in a whole character
        self._prefix_text = ""
        self._unsent = ""  # settled text not emitted yet: it may still turn into a stop string
        self._unsettled = ""  # the text of ids[_settled:], ending in an unfinished character

    def push(self, token: int) -> str:
        """Add a token; return the text now safe to emit (maybe empty). Sets ``stopped`` at a stop string."""
        self.ids.append(token)
        new = self._decode(self.ids[self._prefix :])[len(self._prefix_text) :]
        text = self._unsent + new
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self._unsent, self._unsettled = text[: min(hits)], ""
            return self.flush()
        if new.endswith("\ufffd"):
            self._unsettled = new
            return ""
        if new:
            self._prefix, self._settled = self._settled, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix : self._settled])
        self._unsettled = ""
        safe = len(text) - self._held_back(text)
        piece, self._unsent = text[:safe], text[safe:]
        return piece

    def flush(self) -> str:
        """Return everything not emitted yet (at the end of generation)."""
        piece = self._unsent + self._unsettled
        self._unsent = self._unsettled = ""
        return piece

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def _held_back(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper start of a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

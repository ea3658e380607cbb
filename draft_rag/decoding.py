"""Token-by-token decoding over a (possibly compressed) KV cache: prompts, sampling, stop strings, streaming.

After eviction a cache is shorter than the sequence it stands for, so every step passes the token's true
position explicitly (RoPE stays the original one); the attention mask follows the cache itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

Messages = list[dict[str, str]]


def as_messages(prompt: str | Sequence[dict[str, str]]) -> Messages:
    """One prompt as chat messages: a string becomes one user message; a list of role/content dicts is kept.

    A batch (a list of strings or of message lists) raises NotImplementedError.
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
        messages = [dict(m) for m in cast("Sequence[dict[str, str]]", prompt)]
    elif isinstance(prompt, Sequence) and all(isinstance(m, (str, list, tuple)) for m in prompt):
        msg = "batches of prompts are not supported yet; call generate() once per prompt."
        raise NotImplementedError(msg)
    else:
        msg = (
            f"prompt must be a string or a list of {{'role', 'content'}} dicts, got {type(prompt).__name__}."
        )
        raise TypeError(msg)
    if not messages or not any(str(m.get("content", "")).strip() for m in messages):
        msg = "prompt is empty; pass the text to answer (a non-empty string or messages with content)."
        raise ValueError(msg)
    return messages


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

    Args:
        temperature: 0 (default) for greedy decoding; higher is more random.
        top_p: keep the smallest set of tokens whose probability adds up to ``top_p`` (default 1.0: all).
        seed: seed of the sampler's own random generator (default: nondeterministic).
    """

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> None:
        if temperature < 0:
            msg = f"temperature must be >= 0 (0 is greedy), got {temperature}."
            raise ValueError(msg)
        if not 0 < top_p <= 1:
            msg = f"top_p must be in (0, 1], got {top_p}."
            raise ValueError(msg)
        self.temperature = temperature
        self.top_p = top_p
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token id from last-position logits ``[1, vocab]``."""
        if self.temperature == 0:
            return int(logits[0].argmax())
        probs = (logits[0].float().cpu() / self.temperature).softmax(dim=-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Drop a token when the tokens before it already reach top_p; the most likely one always stays.
            outside = sorted_probs.cumsum(0) - sorted_probs >= self.top_p
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


def decode_steps(
    model: PreTrainedModel,
    cache: Cache,
    logits: torch.Tensor,
    position: int,
    sampler: Sampler,
    max_new_tokens: int,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids, feeding each back at its true position.

    ``logits`` are the last prompt position's; ``position`` is the true position of the first new token.
    The model only runs for a token when the caller asks for the next one, so stopping early costs nothing.
    """
    for step in range(max_new_tokens):
        token = sampler(logits)
        yield token
        if step + 1 == max_new_tokens:
            return
        logits = forward_token(model, cache, token, position + step)


def forward_token(model: PreTrainedModel, cache: Cache, token: int, position: int) -> torch.Tensor:
    """Run one token at true position ``position`` against ``cache``; return logits ``[1, vocab]``."""
    device = model.device
    kwargs: dict[str, Any] = {
        "input_ids": torch.tensor([[token]], device=device),
        "position_ids": torch.tensor([[position]], device=device),
        "past_key_values": cache,
        "use_cache": True,
    }
    with torch.inference_mode():
        return model(**kwargs).logits[:, -1]


class TextStream:
    """Turn generated token ids into text pieces, cutting at stop strings and never splitting a character.

    Text that could still become the start of a stop string, and an unfinished multi-byte character, are
    held back until the next tokens settle them, so no emitted piece is ever taken back.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text now safe to emit (maybe empty). Sets ``stopped`` at a stop string."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(
            self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self.flush()
        if self.text.endswith("\ufffd"):
            return ""
        safe = max(self.emitted, len(self.text) - self._held_back())
        piece, self.emitted = self.text[self.emitted : safe], safe
        return piece

    def flush(self) -> str:
        """Return everything not emitted yet (at the end of generation)."""
        piece, self.emitted = self.text[self.emitted :], len(self.text)
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of the text that is a proper start of a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

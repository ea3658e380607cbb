"""SpecKV input validation: malformed arguments raise a clear error naming them before any model runs."""

from __future__ import annotations

import numpy as np
import pytest

from draft_rag.engine import SpecKV
from tests.test_speckv import LONG_PROMPT
from tests.tiny import no_forward, tiny_model

QUESTION = "What is the magic number?"


@pytest.fixture(scope="module")
def engine(tiny_pair):
    return SpecKV(target=tiny_pair[1], draft=tiny_pair[0], budget=40, window_size=8)


def user(content):
    return [{"role": "user", "content": content}]


BAD_PROMPTS = [
    ([{"role": "tool", "content": "42"}], ValueError, r"prompt\[0\]\['role'\] must be one of system, user"),
    ([{"content": "hi"}], ValueError, r"prompt\[0\]\['role'\]"),
    ([{"role": "user"}], ValueError, r"prompt\[0\]\['content'\] is missing"),
    (user(None), ValueError, r"prompt\[0\]\['content'\] is missing or None"),
    (user(42), TypeError, r"prompt\[0\]\['content'\] must be a string"),
    (user({"text": "hi"}), TypeError, r"prompt\[0\]\['content'\] must be a string"),
    (user([{"type": "image_url", "image_url": {"url": "x"}, "text": ""}]), ValueError,
     r"prompt\[0\]\['content'\]\[0\] is a 'image_url' block; only text"),
    (user([{"type": "text"}]), TypeError, r"prompt\[0\]\['content'\]\[0\] must be a"),
    (user(["plain string block"]), TypeError, r"prompt\[0\]\['content'\]\[0\]"),
    ([{"role": "user", "content": "hi"}, "hello"], TypeError, r"prompt\[1\] must be a"),
    ([{"role": "user", "content": "hi"}, None], TypeError, r"prompt\[1\]"),
    ("bad \ud800 text", ValueError, r"prompt holds a lone surrogate .*encode\('utf-8', 'replace'\)"),
    (user("bad \udfff text"), ValueError, r"prompt\[0\]\['content'\] holds a lone surrogate"),
    (user([{"type": "text", "text": "\ud83d"}]), ValueError, r"prompt\[0\]\['content'\]\[0\] holds a lone surrogate"),
    (b"What is the magic number?", TypeError, "prompt must be a string.*decode bytes"),
    (None, TypeError, "prompt must be a string"),
    (42, TypeError, "prompt must be a string"),
    (user("   "), ValueError, "prompt is empty"),
]

BAD_SETTINGS = [
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an integer"),
    ({"max_new_tokens": "8"}, TypeError, "max_new_tokens must be an integer"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an integer"),
    ({"temperature": float("nan")}, ValueError, "temperature must be a finite number"),
    ({"temperature": float("inf")}, ValueError, "temperature must be a finite number"),
    ({"temperature": -0.5}, ValueError, "temperature must be >= 0"),
    ({"temperature": "0.7"}, TypeError, "temperature must be a number"),
    ({"temperature": True}, TypeError, "temperature must be a number"),
    ({"top_p": 0}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"top_p": float("nan")}, ValueError, "top_p must be a finite number"),
    ({"top_p": "0.9"}, TypeError, "top_p must be a number"),
    ({"stop": 5}, TypeError, "stop must be a string, a list of strings or None"),
    ({"stop": b"\n"}, TypeError, "stop must be a string"),
    ({"stop": ["ok", 3]}, TypeError, r"stop\[1\] must be a string"),
    ({"stop": [None]}, TypeError, r"stop\[0\] must be a string"),
    ({"seed": "7"}, TypeError, "seed must be an integer or None"),
    ({"seed": 1.5}, TypeError, "seed must be an integer or None"),
    ({"seed": True}, TypeError, "seed must be an integer or None"),
    ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*64\)"),
]


@pytest.mark.parametrize("call", ["generate", "stream"])
@pytest.mark.parametrize(("prompt", "exception", "error"), BAD_PROMPTS)
def test_bad_prompt(call, prompt, exception, error, engine):
    with no_forward(engine.target, engine.draft), pytest.raises(exception, match=error):
        getattr(engine, call)(prompt, max_new_tokens=4)


@pytest.mark.parametrize("call", ["generate", "stream"])
@pytest.mark.parametrize(("kwargs", "exception", "error"), BAD_SETTINGS)
def test_bad_generation_setting(call, kwargs, exception, error, engine):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with no_forward(engine.target, engine.draft), pytest.raises(exception, match=error):
        getattr(engine, call)(LONG_PROMPT, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exception", "error"),
    [
        ({"budget": True}, TypeError, "budget must be an integer"),
        ({"budget": 40.0}, TypeError, "budget must be an integer"),
        ({"budget": "40"}, TypeError, "budget must be an integer"),
        ({"window_size": 1.5}, TypeError, "window_size must be an integer"),
        ({"window_size": "8"}, TypeError, "window_size must be an integer"),
        ({"window_size": True}, TypeError, "window_size must be an integer"),
        ({"window_size": -1}, ValueError, "window_size must be >= 0"),
        ({"kernel_size": 0}, ValueError, "kernel_size must be >= 1"),
        ({"kernel_size": 7.0}, TypeError, "kernel_size must be an integer"),
        ({"kernel_size": False}, TypeError, "kernel_size must be an integer"),
        ({"lookahead_tokens": 0}, ValueError, "lookahead_tokens must be >= 1"),
        ({"lookahead_tokens": 2.5}, TypeError, "lookahead_tokens must be an integer"),
        ({"lookahead_tokens": True}, TypeError, "lookahead_tokens must be an integer"),
        ({"method": "streamingllm", "sink_tokens": -1}, ValueError, "sink_tokens must be >= 0"),
        ({"method": "streamingllm", "sink_tokens": 1.5}, TypeError, "sink_tokens must be an integer"),
        ({"method": "streamingllm", "sink_tokens": True}, TypeError, "sink_tokens must be an integer"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be >= 1"),
        ({"chunk_size": "2048"}, TypeError, "chunk_size must be an integer"),
        ({"chunk_size": True}, TypeError, "chunk_size must be an integer"),
    ],
)
def test_bad_engine_setting(kwargs, exception, error, tiny_pair):
    with pytest.raises(exception, match=error):
        SpecKV(target=tiny_pair[1], draft=tiny_pair[0], **{"budget": 40, **kwargs})


def test_prompt_over_the_draft_context_names_the_draft(tiny_pair):
    draft = tiny_model("qwen2", seed=2, max_position_embeddings=64)
    engine = SpecKV(target=tiny_pair[1], draft=draft, budget=40, window_size=8)
    with no_forward(tiny_pair[1], draft), pytest.raises(ValueError, match=r"draft model 'tiny-qwen2-2', over its "
                                                                          r"context of 64 tokens; shorten"):
        engine.generate(LONG_PROMPT, max_new_tokens=4)
    assert engine.generate(QUESTION, max_new_tokens=2).completion_tokens >= 1  # fits the budget: no draft


def test_prompt_over_the_target_context_names_the_target(tiny_pair):
    target = tiny_model("qwen2", seed=3, max_position_embeddings=64)
    engine = SpecKV(target=target, draft=tiny_pair[0], budget=40, window_size=8)
    with no_forward(target, tiny_pair[0]), pytest.raises(ValueError, match="target model 'tiny-qwen2-3'"):
        engine.generate(LONG_PROMPT, max_new_tokens=4)


def test_text_blocks_are_joined_with_newlines(engine):
    blocks = user([{"type": "text", "text": "What is the"}, {"type": "text", "text": "magic number?"}])
    joined = engine.generate("What is the\nmagic number?", max_new_tokens=6)
    assert engine.generate(blocks, max_new_tokens=6).token_ids == joined.token_ids


def test_system_and_empty_assistant_turns_are_accepted(engine):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": QUESTION, "name": "extra keys are dropped"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Please answer."},
    ]
    assert engine.generate(messages, max_new_tokens=3).completion_tokens >= 1


def test_nul_characters_pass_through(engine):
    result = engine.generate("What is\x00 the magic\x00number?", max_new_tokens=4)
    assert result.completion_tokens >= 1 and result.prompt_tokens > 10


def test_empty_stop_strings_are_ignored(engine):
    plain = engine.generate(LONG_PROMPT, max_new_tokens=10)
    assert engine.generate(LONG_PROMPT, max_new_tokens=10, stop=["", "never generated"]).text == plain.text
    assert engine.generate(LONG_PROMPT, max_new_tokens=10, stop="").text == plain.text


def test_numpy_integers_are_accepted(engine):
    plain = engine.generate(LONG_PROMPT, max_new_tokens=5, temperature=0.8, seed=3)
    numpy = engine.generate(LONG_PROMPT, max_new_tokens=np.int64(5), temperature=np.float64(0.8), seed=np.int64(3))
    assert numpy.token_ids == plain.token_ids

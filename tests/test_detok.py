"""Incremental detokenizer on a real byte-level BPE tokenizer (the tiny model's, trained here: no model)."""

from __future__ import annotations

import pytest

from streamgen.engine.detok import IncrementalDetokenizer
from streamgen.engine.tokenizer import TextTokenizer

from tiny import CHAT_TEMPLATE, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    raw = build_tiny_tokenizer()
    return TextTokenizer(raw, CHAT_TEMPLATE, frozenset({raw.token_to_id("<|im_end|>")}))


def _stream(tok: TextTokenizer, text: str, stop=(), decode=None) -> tuple[list[str], bool, str]:
    prompt = tok.encode("Hello")
    detok = IncrementalDetokenizer(decode or tok.decode, prompt, stop)
    deltas, stopped = [], False
    for tid in tok.encode(text):
        step = detok.add(tid)
        deltas.append(step.delta)
        if step.stopped:
            stopped = True
            break
    tail = "" if stopped else detok.flush()
    return deltas, stopped, tail


def test_multibyte_characters_split_across_tokens_are_never_broken(tok: TextTokenizer) -> None:
    text = "Hi 你好, 🎉 and ünïcödé!"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the case must split a character across tokens"
    deltas, stopped, tail = _stream(tok, text)
    assert not stopped
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + tail == text
    assert "" in deltas, "bytes of an incomplete character are held back, not streamed"


def test_leading_spaces_survive_a_decoder_that_strips_them(tok: TextTokenizer) -> None:
    # The GGUF-converted tokenizer's decoder strips the leading space of the
    # first token it decodes; decoding over a window must not lose it.
    def stripping_decode(ids):
        return tok.decode(ids).lstrip(" ")

    text = " the quick brown fox jumps over the lazy dog"
    deltas, _, tail = _stream(tok, text, decode=stripping_decode)
    assert "".join(deltas) + tail == text
    assert deltas[0].startswith(" "), "the first generated word keeps its space"


def test_stop_string_spanning_tokens_is_never_streamed(tok: TextTokenizer) -> None:
    text = "Hello world! How are you today?"
    stop = "world! How"
    assert len(tok.encode(stop)) > 1
    deltas, stopped, _ = _stream(tok, text, stop=[stop])
    assert stopped
    assert "".join(deltas) == "Hello "
    assert "w" not in "".join(deltas) and "!" not in "".join(deltas)


def test_stop_string_that_never_completes_is_released_at_the_end(tok: TextTokenizer) -> None:
    text = "Hello world! How"
    deltas, stopped, tail = _stream(tok, text, stop=["world!!!", "How are"])
    assert not stopped
    assert tail.endswith("How"), "the possible start of a stop string was held back until the end"
    assert "".join(deltas) + tail == text


def test_earliest_of_several_stop_strings_wins(tok: TextTokenizer) -> None:
    deltas, stopped, _ = _stream(tok, "one two three four", stop=["four", "two"])
    assert stopped and "".join(deltas) == "one "

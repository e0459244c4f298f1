"""Incremental detokenizer on a real byte-level BPE tokenizer (the tiny model's)."""

from __future__ import annotations

from streamgen.engine.detok import IncrementalDetokenizer
from streamgen.engine.loader import LoadedModel


def _stream(model: LoadedModel, text: str, stop=(), decode=None) -> tuple[list[str], bool, str]:
    tok = model.tokenizer
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


def test_multibyte_characters_split_across_tokens_are_never_broken(tiny_model: LoadedModel) -> None:
    text = "Hi 你好, 🎉 and ünïcödé!"
    tok = tiny_model.tokenizer
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the case must split a character across tokens"
    deltas, stopped, tail = _stream(tiny_model, text)
    assert not stopped
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + tail == text
    assert "" in deltas, "bytes of an incomplete character are held back, not streamed"


def test_leading_spaces_survive_a_decoder_that_strips_them(tiny_model: LoadedModel) -> None:
    # The GGUF-converted tokenizer's decoder strips the leading space of the
    # first token it decodes; decoding over a window must not lose it.
    def stripping_decode(ids):
        return tiny_model.tokenizer.decode(ids).lstrip(" ")

    text = " the quick brown fox jumps over the lazy dog"
    deltas, _, tail = _stream(tiny_model, text, decode=stripping_decode)
    assert "".join(deltas) + tail == text
    assert deltas[0].startswith(" "), "the first generated word keeps its space"


def test_stop_string_spanning_tokens_is_never_streamed(tiny_model: LoadedModel) -> None:
    text = "Hello world! How are you today?"
    stop = "world! How"
    assert len(tiny_model.tokenizer.encode(stop)) > 1
    deltas, stopped, _ = _stream(tiny_model, text, stop=[stop])
    assert stopped
    assert "".join(deltas) == "Hello "
    assert "w" not in "".join(deltas) and "!" not in "".join(deltas)


def test_stop_string_that_never_completes_is_released_at_the_end(tiny_model: LoadedModel) -> None:
    text = "Hello world! How"
    deltas, stopped, tail = _stream(tiny_model, text, stop=["world!!!", "How are"])
    assert not stopped
    assert tail.endswith("How"), "the possible start of a stop string was held back until the end"
    assert "".join(deltas) + tail == text


def test_earliest_of_several_stop_strings_wins(tiny_model: LoadedModel) -> None:
    deltas, stopped, _ = _stream(tiny_model, "one two three four", stop=["four", "two"])
    assert stopped and "".join(deltas) == "one "

"""Incremental detokenization with UTF-8 and stop-string hold-back.

Two things are held back from the stream until they are resolved:
- bytes of an incomplete UTF-8 character (the decoder shows them as U+FFFD);
- a tail of text that could still grow into a stop string, so a stop string
  is never streamed, not even in part.

Text is decoded over a short sliding window of ids (a prefix offset and a read
offset, as TGI does) rather than per token: byte-level BPE tokens are not
independent strings, and some decoders strip the leading space of the first
token they see. The window starts a few prompt tokens back so the first
generated token keeps its leading space too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

_CONTEXT_TOKENS = 4
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True, slots=True)
class DetokStep:
    delta: str  # text to stream now; may be empty while bytes are held back
    stopped: bool  # a stop string completed; delta ends right before it


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self._text = ""  # all decoded text of the generated tokens
        self._emitted = 0  # how much of _text has been streamed

    @property
    def text(self) -> str:
        """Everything streamed so far."""
        return self._text[: self._emitted]

    def add(self, token_id: int) -> DetokStep:
        self._ids.append(token_id)
        self._text += self._decode_new()
        if not self._stop:
            return DetokStep(self._emit(len(self._text)), stopped=False)
        # Stop strings can only begin in the not-yet-emitted tail (see _held_back).
        tail = self._text[self._emitted :]
        hits = [i for i in (tail.find(s) for s in self._stop) if i >= 0]
        if hits:
            return DetokStep(self._emit(self._emitted + min(hits)), stopped=True)
        return DetokStep(self._emit(len(self._text) - self._held_back(tail)), stopped=False)

    def flush(self) -> str:
        """At the end of generation: release whatever is still held back."""
        pending = self._decode(self._ids[self._prefix_offset :])[len(self._decode(self._ids[self._prefix_offset : self._read_offset])) :]
        self._text += pending
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._emit(len(self._text))

    def _decode_new(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix) :]
        return ""  # an incomplete character: wait for the next token

    def _emit(self, upto: int) -> str:
        delta = self._text[self._emitted : upto]
        self._emitted = max(self._emitted, upto)
        return delta

    def _held_back(self, tail: str) -> int:
        """Length of the longest suffix of tail that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(tail)), longest, -1):
                if tail.endswith(s[:n]):
                    longest = n
                    break
        return longest

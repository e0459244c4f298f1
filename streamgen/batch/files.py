"""The batch's files: the input read as a bounded stream, the output written whole lines at a time.

- Input: one line at a time, never the whole file; a line longer than MAX_LINE_BYTES is skipped to its
  end and reported as too large. count_lines() counts a regular file's lines in a fast first pass (the
  progress bar's total).
- Output: each answer is one JSON line handed to the kernel in one write() on an unbuffered descriptor,
  so a crash, Ctrl-C or a kill leaves whole lines, except at worst a torn last one. A rerun scans what an
  earlier run wrote (Output.resume): a last line without its newline is cut off, and every complete
  line's request counts as done.
- DigestSet: the custom_ids seen, in 8 bytes each, so a million-line file does not need a million
  strings in memory to find its duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamgen.errors import ConfigError

MAX_LINE_BYTES = 1 << 20  # one request; the context window holds far less text than this
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class RawLine:
    number: int  # 1-based, as an editor shows it
    data: bytes | None  # None: longer than MAX_LINE_BYTES, skipped


def read_lines(path: str) -> Iterator[RawLine]:
    """The input's non-blank lines, one at a time; '-' reads stdin."""
    if path == "-":
        yield from _lines(sys.stdin.buffer)
        return
    with open(path, "rb") as stream:
        yield from _lines(stream)


def _lines(stream) -> Iterator[RawLine]:
    number = 0
    while data := stream.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
            while (rest := stream.readline(_CHUNK)) and not rest.endswith(b"\n"):
                pass
            yield RawLine(number, None)
        elif data.strip():
            yield RawLine(number, data)


def count_lines(path: str) -> int | None:
    """Lines in a regular file, counted without decoding (about a second per GB); None for stdin."""
    if path == "-" or not Path(path).is_file():
        return None
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


class DigestSet:
    """A set of strings kept as 64-bit BLAKE2b digests: a sorted array plus a small set of recent ones,
    merged now and then. 8 bytes a member; two distinct ids collide with odds of about n^2 / 2^65
    (3e-8 for a million)."""

    _MERGE_AT = 1 << 16

    def __init__(self) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, key: str) -> bool:
        return self._has(_digest(key))

    def add(self, key: str) -> bool:
        """Add key; False when it was already there."""
        digest = _digest(key)
        if self._has(digest):
            return False
        self._recent.add(digest)
        if len(self._recent) >= self._MERGE_AT:
            fresh = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._sorted = np.union1d(self._sorted, fresh)
            self._recent.clear()
        return True

    def _has(self, digest: int) -> bool:
        if digest in self._recent:
            return True
        at = int(np.searchsorted(self._sorted, np.uint64(digest)))
        return at < len(self._sorted) and int(self._sorted[at]) == digest


def _digest(key: str) -> int:
    raw = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(raw, "little")


@dataclass(slots=True)
class Done:
    """What an earlier run wrote: answered custom_ids, and input lines answered with an error."""

    keys: DigestSet = field(default_factory=DigestSet)
    lines: int = 0  # complete output lines
    torn_bytes: int = 0  # a torn last line, cut off

    def has_id(self, custom_id: str) -> bool:
        return bool(self.lines) and f"id:{custom_id}" in self.keys

    def has_line(self, number: int) -> bool:
        return bool(self.lines) and f"line:{number}" in self.keys

    def add(self, record: Any) -> None:
        """One output line. A line-level error (no response) names its input line; an answer, its custom_id."""
        error = record.get("error")
        if isinstance(error, dict) and isinstance(error.get("line"), int):
            self.keys.add(f"line:{error['line']}")
        elif isinstance(record.get("custom_id"), str):
            self.keys.add(f"id:{record['custom_id']}")
        self.lines += 1


class Output:
    """The output file, appended to one whole line per write()."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @classmethod
    def resume(cls, path: Path) -> tuple[Output, Done]:
        """Open path for appending, after cutting a torn last line and reading what is done."""
        done = scan(path) if path.exists() else Done()
        return cls(path), done

    def write(self, record: dict[str, Any]) -> None:
        data = memoryview((json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
        while data:  # a regular file takes it whole; a short write (disk full) is finished or raises
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        os.close(self._fd)


def scan(path: Path) -> Done:
    """Cut a torn last line off path, then read every complete line's key."""
    done = Done()
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        end = _end_of_last_line(f, size)
        if end < size:
            f.truncate(end)
            done.torn_bytes = size - end
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if not isinstance(record, dict) or "custom_id" not in record:
                raise ConfigError(f"{path} line {number} is not a line of a batch output, so it cannot be resumed: "
                                  "write to another file, or delete this one to start again")
            done.add(record)
    return done


def _end_of_last_line(f, size: int) -> int:
    """The offset just after the last newline (0 when there is none)."""
    at = size
    while at > 0:
        start = max(0, at - _CHUNK)
        f.seek(start)
        chunk = f.read(at - start)
        if (i := chunk.rfind(b"\n")) >= 0:
            return start + i + 1
        at = start
    return 0

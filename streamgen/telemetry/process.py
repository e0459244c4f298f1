"""This process's memory, as the operating system counts it (what `ps` and a container limit see)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """Resident set size now; None where /proc is missing (macOS)."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kB elsewhere

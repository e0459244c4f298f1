"""structlog for everything: JSON lines off a terminal, readable colour on one.

The standard library's loggers (uvicorn, onnxruntime helpers, ours) are routed
through the same renderer, so a process writes one format only.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """fmt: auto (JSON unless stream is a terminal), json or console."""
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    structlog.configure(
        # A line below the level is dropped first, before it is stamped and formatted: at the default
        # level a batch of a million requests would otherwise build millions of info events for nothing.
        processors=[structlog.stdlib.filter_by_level, *_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer = (
        [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
        if as_json
        else [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_uvicorn_noise)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # One line per HTTP request is noise next to the request lifecycle events.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


# Two of uvicorn's own lines mislead here: its "running on" URL comes before the
# model is loaded (streamgen's `server.ready` line gives the URL once it serves),
# and it reports every WebSocket handshake that streamgen refused on purpose
# (with a 401/403/503 and a reason) as an error.
_UVICORN_NOISE = ("Uvicorn running on", "ASGI callable returned without completing handshake")


def _uvicorn_noise(record: logging.LogRecord) -> bool:
    return not (record.name.startswith("uvicorn") and str(record.msg).startswith(_UVICORN_NOISE))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)

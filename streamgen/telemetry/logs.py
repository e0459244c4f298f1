"""structlog for everything: JSON lines off a terminal, readable colour on one.

The standard library's loggers (uvicorn, onnxruntime helpers, ours) are routed
through the same renderer, so a process writes one format only.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_FIELDS: dict[str, str] = {}  # stamped on every line of the process (the replica's id)


def _process_fields(logger, method: str, event: dict) -> dict:
    for key, value in _FIELDS.items():
        event.setdefault(key, value)
    return event


_SHARED = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    _process_fields,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None,
                      replica: str | None = None) -> None:
    """fmt: auto (JSON unless stream is a terminal), json or console. replica: stamped on every line."""
    stream = stream or sys.stderr
    _FIELDS.clear()
    if replica:
        _FIELDS["replica"] = replica
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
    handler.addFilter(_component_name)
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


def _component_name(record: logging.LogRecord) -> bool:
    """uvicorn logs its server's life (started, shutting down) as "uvicorn.error", which reads as a failure:
    those lines are the server's, and are named so."""
    if record.name == "uvicorn.error":
        record.name = "uvicorn.server"
    return True


def _uvicorn_noise(record: logging.LogRecord) -> bool:
    return not (record.name.startswith("uvicorn") and str(record.msg).startswith(_UVICORN_NOISE))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)

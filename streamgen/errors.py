"""Typed errors shared by every layer.

Each error carries a stable `code` so that the CLI, and later the WebSocket
protocol, can report it without parsing messages.
"""

from __future__ import annotations


class StreamgenError(Exception):
    """Base class. `code` is stable; `message` says what to do."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(StreamgenError):
    """A request or parameter is invalid. Raised only at the edge."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_parameter") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFoundError(StreamgenError):
    code = "model_not_found"


class PullError(StreamgenError):
    code = "pull_failed"


class DeviceError(StreamgenError):
    code = "device_unavailable"


class ConfigError(StreamgenError):
    """A flag, environment variable or their combination is invalid."""

    code = "invalid_setting"

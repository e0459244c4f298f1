"""What the generation loop reports about each request, for telemetry.

The engine knows nothing of OpenTelemetry or logging: it calls these hooks
with `time.perf_counter()` timestamps, and telemetry/ turns them into spans,
metrics and log lines. The default observer does nothing, so a loop without
telemetry pays a few no-op calls per token.
"""

from __future__ import annotations

from streamgen.engine.request import ErrorEvent, FinishEvent, TokenEvent


class RequestObserver:
    """Hooks for one request. Called from the engine's worker thread."""

    def queued(self, start: float, end: float) -> None:
        """The request waited for the engine from start to end."""

    def prefill(self, start: float, end: float, batch_size: int, prompt_tokens: int, cached_tokens: int) -> None:
        """A forward pass over prompt_tokens of the prompt; cached_tokens of it came from the prefix cache."""

    def forward(self, step: int, start: float, end: float, batch_size: int) -> None:
        """A decode forward pass shared by batch_size requests; step counts this request's tokens."""

    def sample(self, step: int, start: float, end: float, batch_size: int) -> None:
        """Choosing this step's tokens for the batch."""

    def detokenize(self, step: int, start: float, end: float) -> None:
        """Turning this request's new token into text."""

    def token(self, event: TokenEvent, now: float) -> None:
        """A token was delivered."""

    def finished(self, event: FinishEvent | ErrorEvent, now: float) -> None:
        """The request ended; its final event."""


NULL_OBSERVER = RequestObserver()

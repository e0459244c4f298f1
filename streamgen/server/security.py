"""Who may connect: API key, WebSocket Origin, per-client request rate.

- API keys (optional; one or several, one per client or tenant) are compared
  in constant time. A request is known by the digest of its key: the rate
  limit counts per key, and the prefix cache only lets a request reuse KV
  left by the same key (docs/security.md). HTTP callers send
  `Authorization: Bearer KEY`. Browsers cannot set headers on a WebSocket, so
  the handshake also accepts the key as the subprotocol `bearer.KEY`, offered
  next to `streamgen.v1`; the server answers with `streamgen.v1` and never
  echoes the key.
- The Origin check stops cross-site WebSocket hijacking: a browser on another
  site would otherwise ride on the user's network position. Allowed: no Origin
  (not a browser), the server's own origin, loopback, and any listed origins.
- The rate limit is a token bucket per client: the API key when one is given,
  else the peer address.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers

SUBPROTOCOL = "streamgen.v1"
_BEARER = "bearer."
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as the transport knows them."""

    client: str  # rate-limit identity: "key:<digest>" or "addr:<ip>"
    namespace: str = ""  # prefix-cache isolation: the API key's digest, "" when the server is open
    traceparent: str | None = None  # the connection's or HTTP request's trace context, if the spec has none


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # HTTP status of the refused handshake or request
    code: str
    message: str


class AccessPolicy:
    def __init__(self, api_keys: Sequence[str] | str | None, allowed_origins: str = "") -> None:
        if isinstance(api_keys, str):
            api_keys = [api_keys]
        self._keys = [k.encode() for k in api_keys or ()]
        self._origins = {o.strip().rstrip("/") for o in allowed_origins.split(",") if o.strip()}

    def check_http(self, headers: Headers) -> Refusal | None:
        if not self._keys or self.key_id(headers) is not None:
            return None
        return _missing_or_wrong(_bearer(headers.get("authorization")))

    def check_websocket(self, headers: Headers, offered: list[str]) -> Refusal | None:
        origin = headers.get("origin")
        if origin is not None and not self._origin_ok(origin, headers.get("host", "")):
            return Refusal(403, "origin_not_allowed",
                           f"WebSocket connections from origin {origin[:100]!r} are not allowed; "
                           "the server lists the origins it accepts in --allowed-origins")
        if not self._keys or self.key_id(headers, offered) is not None:
            return None
        return _missing_or_wrong(next((c for c in _candidates(headers, offered) if c), None))

    def caller(self, headers: Headers, peer: str | None, offered: Sequence[str] = ()) -> Caller:
        """The one rule for who a request is: rate limits count per API key when keys are in use, else per
        address (the peer, as the server resolved it from a trusted proxy's X-Forwarded-For); each key's
        requests reuse only the KV cache its own requests left (docs/security.md)."""
        key = self.key_id(headers, offered)
        identity = f"key:{key}" if key else f"addr:{peer or 'unknown'}"
        return Caller(identity, key or "", headers.get("traceparent"))

    def key_id(self, headers: Headers, offered: Sequence[str] = ()) -> str | None:
        """A short digest naming the valid key the caller sent, or None (no key required, or none valid)."""
        for candidate in _candidates(headers, offered):
            if candidate is not None and self._key_ok(candidate):
                return hashlib.sha256(candidate.encode()).hexdigest()[:16]
        return None

    def _key_ok(self, candidate: str) -> bool:
        # Every key is compared, so the time taken does not tell which one matched.
        return sum(hmac.compare_digest(candidate.encode(), key) for key in self._keys) > 0

    def _origin_ok(self, origin: str, host: str) -> bool:
        if "*" in self._origins or origin.rstrip("/") in self._origins:
            return True
        parts = urlsplit(origin)
        return parts.netloc == host or (parts.hostname or "") in _LOOPBACK


def _candidates(headers: Headers, offered: Sequence[str]) -> list[str | None]:
    """Keys a caller offers: the Authorization header, then `bearer.KEY` subprotocols."""
    return [_bearer(headers.get("authorization"))] + [p[len(_BEARER):] for p in offered if p.startswith(_BEARER)]


def _bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


def _missing_or_wrong(candidate: str | None) -> Refusal:
    if candidate is None:
        return Refusal(401, "unauthorized", "an API key is required: send Authorization: Bearer KEY, or offer the "
                                            "WebSocket subprotocol bearer.KEY")
    return Refusal(401, "unauthorized", "the API key is not valid")


class RateLimiter:
    """Token buckets: `per_minute` requests per client, refilled continuously."""

    def __init__(self, per_minute: int, max_clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, stamp)
        self._max_clients = max_clients

    def take(self, client: str, now: float | None = None) -> int:
        """0 when allowed, else the milliseconds until the next request would be."""
        if self.per_minute <= 0:
            return 0
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        tokens, stamp = self._buckets.pop(client, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - stamp) * rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            retry = 0
        else:
            self._buckets[client] = (tokens, now)
            retry = max(1, int((1.0 - tokens) / rate * 1000))
        while len(self._buckets) > self._max_clients:  # forget the least recently seen
            self._buckets.popitem(last=False)
        return retry

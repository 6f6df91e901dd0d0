"""API keys per product team, with a request rate limit per key (a token bucket).

Keys come from a mounted secret file (JSON or YAML) or from an environment variable holding the
same JSON; the file is read again when it changes (checked at most every ``reload_seconds``), so
rotating a Kubernetes secret needs no restart::

    {"sk-search-1f9c": {"team": "search", "requests_per_minute": 600},
     "sk-ads-77aa":    {"team": "ads", "requests_per_minute": 60, "burst": 10}}

``requests_per_minute`` 0 (or absent) means no limit; ``burst`` (default: one minute's worth) is
how many requests may arrive at once after a quiet spell. With no keys configured at all,
authentication is off and every request is accepted (team "anonymous"), as on a laptop.

Keys are held only as SHA-256 digests, and looked up by digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import ConfigError

log = logging.getLogger("rlhf.runtime.apikeys")


class AuthError(Exception):
    """No key, or an unknown one (HTTP 401)."""


class RateLimitedError(Exception):
    """The key's rate limit is used up (HTTP 429); ``retry_after`` seconds until the next request."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class KeyInfo:
    team: str
    requests_per_minute: float = 0.0  # 0: unlimited
    burst: float = 0.0  # bucket size; 0: requests_per_minute


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; a request takes one."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity = rate, capacity
        self.tokens, self.t = capacity, now

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str, source: str) -> dict[str, KeyInfo]:
    """``{key: {team, requests_per_minute, burst}}`` from JSON or YAML text, by key digest."""
    import yaml

    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid JSON or YAML ({e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of key -> {{team, requests_per_minute}}")
    out: dict[str, KeyInfo] = {}
    for i, (key, v) in enumerate(raw.items()):
        where = f"{source}: entry {i + 1}"  # never the key itself
        if not isinstance(key, str) or len(key) < 8:
            raise ConfigError(f"{where}: a key must be a string of at least 8 characters")
        if isinstance(v, str):
            v = {"team": v}
        if not isinstance(v, dict) or not isinstance(v.get("team"), str) or not v["team"]:
            raise ConfigError(f"{where}: needs a non-empty 'team'")
        unknown = set(v) - {"team", "requests_per_minute", "burst"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        rpm = v.get("requests_per_minute", 0) or 0
        burst = v.get("burst", 0) or 0
        if not isinstance(rpm, (int, float)) or rpm < 0 or not isinstance(burst, (int, float)) or burst < 0:
            raise ConfigError(f"{where}: requests_per_minute and burst must be numbers >= 0")
        out[_digest(key)] = KeyInfo(v["team"], float(rpm), float(burst))
    return out


class ApiKeys:
    """The configured keys; :meth:`check` authenticates a request and applies its key's limit."""

    def __init__(self, file: str | os.PathLike | None = None, inline: str = "", reload_seconds: float = 10.0):
        self.file = Path(file) if file else None
        self.inline = inline
        self.reload_seconds = reload_seconds
        self._keys: dict[str, KeyInfo] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._load(initial=True)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _load(self, initial: bool = False) -> None:
        keys: dict[str, KeyInfo] = {}
        if self.inline:
            keys.update(parse_keys(self.inline, "api_keys"))
        if self.file is not None:
            try:
                st = self.file.stat()
                text = self.file.read_text()
            except OSError as e:
                if initial:
                    raise ConfigError(f"api_keys_file {self.file}: cannot read it ({e.strerror})") from None
                log.error("api keys file unreadable; keeping the previous keys",
                          extra={"fields": {"file": str(self.file)}})
                return
            self._mtime = st.st_mtime
            keys.update(parse_keys(text, f"api_keys_file {self.file}"))
        self._keys = keys
        # a key whose limit changed starts a fresh bucket
        self._buckets = {d: b for d, b in self._buckets.items()
                         if d in keys and b.rate * 60 == keys[d].requests_per_minute}
        if not initial:
            log.info("api keys reloaded", extra={"fields": {"keys": len(keys)}})

    def _maybe_reload(self, now: float) -> None:
        if self.file is None or now - self._checked < self.reload_seconds:
            return
        self._checked = now
        try:
            changed = self.file.stat().st_mtime != self._mtime
        except OSError:
            changed = False
        if changed:
            try:
                self._load()
            except ConfigError as e:
                log.error("api keys file invalid; keeping the previous keys", extra={"fields": {"error": str(e)}})

    def team_of(self, key: str) -> str | None:
        """The team of a key, without spending from its rate limit (None: not a key)."""
        with self._lock:
            self._maybe_reload(time.monotonic())
            info = self._keys.get(_digest(key))
        return info.team if info is not None else None

    def check(self, authorization: str | None) -> str:
        """The team of the request's ``Authorization: Bearer <key>``; raises AuthError or
        RateLimitedError. With no keys configured every request passes as "anonymous"."""
        now = time.monotonic()
        with self._lock:
            self._maybe_reload(now)
            if not self._keys:
                return "anonymous"
            scheme, _, key = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
            d = _digest(key.strip())
            info = self._keys.get(d)
            if info is None:
                raise AuthError("invalid API key")
            if info.requests_per_minute > 0:
                b = self._buckets.get(d)
                if b is None:
                    cap = info.burst or info.requests_per_minute
                    b = self._buckets[d] = TokenBucket(info.requests_per_minute / 60.0, max(1.0, cap), now)
                wait = b.take(now)
                if wait > 0:
                    raise RateLimitedError(f"rate limit of {info.requests_per_minute:g} requests per minute "
                                           f"for team {info.team} reached; retry in {wait:.1f} s", wait)
            return info.team

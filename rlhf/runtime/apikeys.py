"""Product teams: their API keys, and per team a request rate limit and token quotas.

Keys and teams come from a mounted secret file (JSON or YAML) or from an environment variable
holding the same JSON; the file is read again when it changes (checked at most every
``reload_seconds``), so rotating a Kubernetes secret needs no restart::

    teams:
      search: {requests_per_minute: 600, tokens_per_minute: 200000, tokens_per_day: 20000000}
      ads:    {requests_per_minute: 60, burst: 10}
    keys:
      sk-search-1f9c0d27e4: search
      sk-ads-77aa9e0b3c5f: ads

(The older form, one entry per key with its team and limits,
``{"sk-search-1f9c": {"team": "search", "requests_per_minute": 600}}``, is read too; the limits
are the team's, and two keys of one team may not give different ones.)

Every limit is per team, whatever key the team uses, and 0 (or absent) means none:

* ``requests_per_minute``: a token bucket refilled continuously, holding up to ``burst``
  requests (default: one minute's worth);
* ``tokens_per_minute`` and ``tokens_per_day``: prompt plus generated tokens. A request reserves
  its prompt tokens and the most it may generate when it is admitted (:meth:`ApiKeys.admit`);
  what it did not use is given back when it ends (:meth:`ApiKeys.settle`).

A request is authenticated first (:meth:`ApiKeys.authenticate`) and admitted only once it is known
to be valid, so a refused request spends nothing. With no keys configured at all, authentication
is off and every request is accepted as team "anonymous", without limits, as on a laptop.

Keys are held only as SHA-256 digests, looked up by digest, and never logged. Team names are
configured, so they can label metrics (:meth:`ApiKeys.label`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from rlhf.errors import ConfigError

log = logging.getLogger("rlhf.runtime.apikeys")

ANONYMOUS = "anonymous"  # the team of every request when no keys are configured
UNAUTHENTICATED = "unauthenticated"  # the metrics label of a request without a valid key
INTERNAL = "internal"  # the metrics label of the platform's own callers (services, operators): no team


class AuthError(Exception):
    """No key, or an unknown one (HTTP 401)."""


class RateLimitedError(Exception):
    """The team's request rate limit is used up (HTTP 429); ``retry_after`` seconds until the next
    request may pass."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceededError(RateLimitedError):
    """The team's token quota (per minute or per day) cannot hold the request now (HTTP 429)."""


@dataclass(frozen=True)
class TeamLimits:
    requests_per_minute: float = 0.0  # 0: unlimited
    burst: float = 0.0  # requests that may arrive at once after a quiet spell; 0: requests_per_minute
    tokens_per_minute: float = 0.0  # prompt + generated tokens; 0: unlimited
    tokens_per_day: float = 0.0  # prompt + generated tokens; 0: unlimited


LIMIT_FIELDS = tuple(f.name for f in fields(TeamLimits))


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity = rate, capacity
        self.tokens, self.t = capacity, now

    def wait(self, now: float, amount: float = 1.0) -> float:
        """0 if ``amount`` tokens are there now, else the seconds until they are (inf: never)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= amount:
            return 0.0
        if amount > self.capacity:
            return math.inf
        return (amount - self.tokens) / self.rate

    def take(self, now: float, amount: float = 1.0) -> float:
        """Take ``amount`` and return 0, or return the seconds until they are there."""
        wait = self.wait(now, amount)
        if wait == 0.0:
            self.tokens -= amount
        return wait

    def give(self, amount: float) -> None:
        self.tokens = min(self.capacity, self.tokens + amount)


@dataclass
class Admission:
    """What :meth:`ApiKeys.admit` took from a team's quotas (give it to :meth:`ApiKeys.settle`)."""

    team: str
    tokens: int


class _Team:
    def __init__(self, name: str, limits: TeamLimits, now: float):
        self.name, self.limits = name, limits
        lim = limits
        self.requests = (TokenBucket(lim.requests_per_minute / 60.0, max(1.0, lim.burst or lim.requests_per_minute), now)
                         if lim.requests_per_minute > 0 else None)
        self.quotas = [(TokenBucket(per / seconds, per, now), f"{per:g} tokens per {unit}")
                       for per, seconds, unit in ((lim.tokens_per_minute, 60.0, "minute"),
                                                  (lim.tokens_per_day, 86400.0, "day")) if per > 0]


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _limits(v: dict, where: str) -> TeamLimits:
    vals = {k: v.get(k, 0) or 0 for k in LIMIT_FIELDS}
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in vals.values()):
        raise ConfigError(f"{where}: {', '.join(LIMIT_FIELDS)} must be numbers >= 0")
    return TeamLimits(**{k: float(x) for k, x in vals.items()})


def parse_keys(text: str, source: str) -> tuple[dict[str, str], dict[str, TeamLimits]]:
    """(team by key digest, limits by team) from JSON or YAML text, in either form above."""
    import yaml

    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid JSON or YAML ({e})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of teams and keys")
    if raw and set(raw) <= {"teams", "keys"}:
        teams_raw, keys_raw = raw.get("teams") or {}, raw.get("keys") or {}
        if not isinstance(teams_raw, dict) or not isinstance(keys_raw, dict):
            raise ConfigError(f"{source}: 'teams' and 'keys' must be mappings")
        limits: dict[str, TeamLimits] = {}
        for name, v in teams_raw.items():
            where = f"{source}: team {name!r}"
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{source}: a team name must be a non-empty string")
            v = v or {}
            unknown = set(v) - set(LIMIT_FIELDS) if isinstance(v, dict) else {"?"}
            if unknown:
                raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
            limits[name] = _limits(v, where)
        entries = list(keys_raw.items())
        allowed = {"team"}
    else:
        limits = {}
        entries = list(raw.items())
        allowed = {"team", *LIMIT_FIELDS}
    teams: dict[str, str] = {}
    for i, (key, v) in enumerate(entries):
        where = f"{source}: key entry {i + 1}"  # never the key itself
        if not isinstance(key, str) or len(key) < 8:
            raise ConfigError(f"{where}: a key must be a string of at least 8 characters")
        if isinstance(v, str):
            v = {"team": v}
        if not isinstance(v, dict) or not isinstance(v.get("team"), str) or not v["team"]:
            raise ConfigError(f"{where}: needs a non-empty 'team'")
        unknown = set(v) - allowed
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        team = v["team"]
        if allowed == {"team"}:
            if team not in limits:
                raise ConfigError(f"{where}: team {team!r} is not among the configured teams")
        else:
            lim = _limits(v, where)
            if limits.setdefault(team, lim) != lim:
                raise ConfigError(f"{where}: team {team!r} is given other limits by another key")
        teams[_digest(key)] = team
    return teams, limits


class ApiKeys:
    """The configured teams and keys: :meth:`authenticate` a request, :meth:`admit` it against
    its team's limits once it is known to be valid, :meth:`settle` it when it ends."""

    def __init__(self, file: str | os.PathLike | None = None, inline: str = "", reload_seconds: float = 10.0):
        self.file = Path(file) if file else None
        self.inline = inline
        self.reload_seconds = reload_seconds
        self._keys: dict[str, str] = {}
        self._teams: dict[str, _Team] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._load(initial=True)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @property
    def teams(self) -> frozenset[str]:
        return frozenset(self._teams)

    def label(self, team: str | None) -> str:
        """``team`` as a metrics label: a configured team, "anonymous", "internal" or "unauthenticated"."""
        if team is None:
            return UNAUTHENTICATED
        return team if team in self._teams or team in (ANONYMOUS, INTERNAL) else UNAUTHENTICATED

    def _load(self, initial: bool = False) -> None:
        keys: dict[str, str] = {}
        limits: dict[str, TeamLimits] = {}
        sources = []
        if self.inline:
            sources.append((self.inline, "api_keys"))
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
            sources.append((text, f"api_keys_file {self.file}"))
        for text, source in sources:
            k, lim = parse_keys(text, source)
            for team, v in lim.items():
                if limits.setdefault(team, v) != v:
                    raise ConfigError(f"{source}: team {team!r} has other limits in another source")
            keys.update(k)
        now = time.monotonic()
        # a team whose limits changed starts with fresh buckets
        self._teams = {t: (self._teams[t] if t in self._teams and self._teams[t].limits == lim else _Team(t, lim, now))
                       for t, lim in limits.items()}
        self._keys = keys
        if not initial:
            log.info("api keys reloaded", extra={"fields": {"keys": len(keys), "teams": len(limits)}})

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
        """The team of a key, without spending from its team's limits (None: not a key)."""
        with self._lock:
            self._maybe_reload(time.monotonic())
            return self._keys.get(_digest(key))

    def authenticate(self, authorization: str | None) -> str:
        """The team of the request's ``Authorization: Bearer <key>`` (AuthError without a valid
        key); "anonymous" when no keys are configured. Spends nothing."""
        with self._lock:
            self._maybe_reload(time.monotonic())
            if not self._keys:
                return ANONYMOUS
            scheme, _, key = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
            team = self._keys.get(_digest(key.strip()))
            if team is None:
                raise AuthError("invalid API key")
            return team

    def admit(self, team: str, tokens: int = 0) -> Admission:
        """Take one request and ``tokens`` tokens from ``team``'s limits, or raise
        RateLimitedError / QuotaExceededError (with the seconds until it would pass) and take
        nothing."""
        now = time.monotonic()
        with self._lock:
            t = self._teams.get(team)
            if t is None:
                return Admission(team, 0)
            if t.requests is not None:
                wait = t.requests.wait(now)
                if wait > 0:
                    raise RateLimitedError(f"rate limit of {t.limits.requests_per_minute:g} requests per minute "
                                           f"for team {team} reached; retry in {wait:.1f} s", wait)
            for bucket, what in t.quotas:
                wait = bucket.wait(now, tokens)
                if wait == math.inf:
                    raise QuotaExceededError(f"the request needs {tokens} tokens (prompt and the most it may "
                                             f"generate), more than team {team}'s quota of {what}", 60.0)
                if wait > 0:
                    raise QuotaExceededError(f"team {team}'s quota of {what} is used up; retry in {wait:.1f} s", wait)
            if t.requests is not None:
                t.requests.take(now)
            for bucket, _ in t.quotas:
                bucket.take(now, tokens)
            return Admission(team, tokens)

    def settle(self, admission: Admission | None, used_tokens: int) -> None:
        """The request of ``admission`` ended having used ``used_tokens``: give back the rest."""
        if admission is None or admission.tokens <= used_tokens:
            return
        with self._lock:
            t = self._teams.get(admission.team)
            if t is not None:
                for bucket, _ in t.quotas:
                    bucket.give(admission.tokens - used_tokens)
            admission.tokens = used_tokens

    def check(self, authorization: str | None) -> str:
        """:meth:`authenticate`, then :meth:`admit` one request without tokens; the team."""
        team = self.authenticate(authorization)
        self.admit(team)
        return team

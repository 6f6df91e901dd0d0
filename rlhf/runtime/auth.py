"""Who is calling: credentials, roles, and the caller of the RPC being served.

Every gRPC call (and the HTTP pages that use the same credentials) is made by a
:class:`Principal`: a name, the roles it holds, and for product teams their team, for labelers
their labeler id. The bootstrap's interceptor (:mod:`rlhf.runtime.server`) authenticates each
call and checks its roles against the ones the RPC declares (each service's ``rpc_roles``), then
makes the principal available to the handler through :func:`caller`.

Roles (``ROLES``):

* ``product``: a product team calling the inference API (its ``team`` names it in limits and
  metrics);
* ``labeler``: a person ranking outputs and writing demonstrations; their ``labeler_id`` comes
  from the credential, never from a request field;
* ``trainer``: an ML engineer starting and watching training jobs;
* ``operator``: runs the platform (every RPC except labelers' own submissions);
* ``service``: the platform's own services calling each other.

Credentials are bearer tokens (metadata ``authorization: Bearer <token>``) or, with mutual TLS,
client certificates, read from a credentials file (YAML or JSON, re-read when it changes, so
tokens rotate without a restart)::

    callers:
      - name: team-search          # one entry per caller
        roles: [product]
        team: search               # product callers (default: the name)
        token_sha256: 9f86d0...    # sha256 of the token, hex (preferred: the file holds no secret)
      - name: alice
        roles: [labeler]
        token: s3cret-token        # or the token itself
      - name: trainer-service
        roles: [service]
        cert_common_name: trainer  # a client certificate with this CN (mutual TLS)

Services may add resolvers of their own (the policy-server's API keys, the feedback-store's
labeler tokens): a function from a token to a principal, or None. A resolver added with
``required=False`` (the feedback-store's labeler tokens, which admins create while it runs) only
identifies the callers who present one of its tokens: it does not turn authentication on, so a
development setup that allows anonymous callers keeps allowing them.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from rlhf.errors import ConfigError, RLHFError

log = logging.getLogger("rlhf.runtime.auth")

PRODUCT, LABELER, TRAINER, OPERATOR, SERVICE = "product", "labeler", "trainer", "operator", "service"
ROLES = frozenset({PRODUCT, LABELER, TRAINER, OPERATOR, SERVICE})
ANYONE = ROLES  # an RPC any authenticated caller may make (version queries, say)
MAX_TOKEN_CHARS = 4096
RELOAD_CHECK_SECONDS = 1.0


class AuthError(RLHFError):
    """A call without valid credentials (UNAUTHENTICATED) or without the role it needs
    (PERMISSION_DENIED, ``denied=True``)."""

    def __init__(self, message: str, denied: bool = False):
        super().__init__(message)
        self.denied = denied


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]
    team: str = ""  # product callers: the team their limits and metrics are kept under
    labeler_id: str = ""  # labelers: the id their rankings are stored under
    anonymous: bool = False  # authentication is off (a development setting)

    def has(self, *roles: str) -> bool:
        return bool(self.roles & set(roles))


ANONYMOUS = Principal("anonymous", ROLES, team="anonymous", anonymous=True)
_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("rlhf_principal", default=None)


def caller() -> Principal:
    """The principal of the RPC being served (ANONYMOUS outside an authenticated call)."""
    p = _current.get()
    return p if p is not None else ANONYMOUS


def set_caller(p: Principal) -> contextvars.Token:
    return _current.set(p)


def reset_caller(token: contextvars.Token) -> None:
    _current.reset(token)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(metadata: Iterable[tuple[str, Any]] | Mapping[str, Any] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry (None without one)."""
    items = metadata.items() if isinstance(metadata, Mapping) else (metadata or ())
    for k, v in items:
        if k.lower() == "authorization":
            v = v.decode() if isinstance(v, bytes) else str(v)
            scheme, _, token = v.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError("the authorization metadata must be 'Bearer <token>'")
            return token.strip()
    return None


@dataclass
class _Entry:
    principal: Principal
    token_sha256: str = ""
    cert_common_name: str = ""


def parse_credentials(data: Any, where: str) -> list[_Entry]:
    """The callers of a credentials document; ConfigError naming every problem."""
    if not isinstance(data, dict) or not isinstance(data.get("callers"), list):
        raise ConfigError(f"{where}: expected a mapping with a list 'callers'")
    problems, out, names, hashes = [], [], set(), set()
    for i, c in enumerate(data["callers"]):
        at = f"{where}: callers[{i}]"
        if not isinstance(c, dict):
            problems.append(f"{at}: expected a mapping")
            continue
        unknown = set(c) - {"name", "roles", "team", "token", "token_sha256", "cert_common_name"}
        if unknown:
            problems.append(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
        name, roles = c.get("name"), c.get("roles")
        if not isinstance(name, str) or not name or len(name) > 200:
            problems.append(f"{at}: name must be a string of 1..200 characters")
            continue
        if name in names:
            problems.append(f"{at}: name {name!r} appears twice")
        names.add(name)
        if not isinstance(roles, list) or not roles or not set(roles) <= ROLES:
            problems.append(f"{at} ({name}): roles must be a non-empty list of {', '.join(sorted(ROLES))}")
            continue
        token, digest, cn = c.get("token"), c.get("token_sha256"), c.get("cert_common_name", "")
        if token is not None and digest is not None:
            problems.append(f"{at} ({name}): give token or token_sha256, not both")
        if token is not None:
            if not isinstance(token, str) or not 16 <= len(token) <= MAX_TOKEN_CHARS:
                problems.append(f"{at} ({name}): token must be 16..{MAX_TOKEN_CHARS} characters")
                continue
            digest = token_sha256(token)
        if digest is not None:
            if not isinstance(digest, str) or len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest.lower()):
                problems.append(f"{at} ({name}): token_sha256 must be 64 hex digits")
                continue
            digest = digest.lower()
            if digest in hashes:
                problems.append(f"{at} ({name}): the same token is given to two callers")
            hashes.add(digest)
        if not digest and not cn:
            problems.append(f"{at} ({name}): needs a token, a token_sha256 or a cert_common_name")
            continue
        team = c.get("team") or (name if PRODUCT in roles else "")
        principal = Principal(name=name, roles=frozenset(roles), team=str(team),
                              labeler_id=name if LABELER in roles else "")
        out.append(_Entry(principal, digest or "", str(cn)))
    if problems:
        raise ConfigError("invalid credentials:\n  " + "\n  ".join(problems))
    return out


class CredentialsFile:
    """The callers of a credentials file, re-read when the file changes (at most once a second).

    A file that turns invalid keeps the last good callers (and logs why), so a bad edit does not
    lock everybody out; a file that is invalid at start is an error.
    """

    def __init__(self, path: str | os.PathLike | None = None, inline: str = ""):
        self.path = Path(path) if path else None
        self._by_hash: dict[str, _Entry] = {}
        self._by_cn: dict[str, _Entry] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if inline:
            self._install(parse_credentials(_parse(inline, "inline credentials"), "inline credentials"))
        if self.path is not None:
            if not self.path.is_file():
                raise ConfigError(f"credentials file {self.path} does not exist")
            self._load()

    @property
    def configured(self) -> bool:
        return self.path is not None or bool(self._by_hash or self._by_cn)

    def _install(self, entries: list[_Entry]) -> None:
        self._by_hash = {e.token_sha256: e for e in entries if e.token_sha256}
        self._by_cn = {e.cert_common_name: e for e in entries if e.cert_common_name}

    def _load(self) -> None:
        assert self.path is not None
        mtime = self.path.stat().st_mtime
        entries = parse_credentials(_parse(self.path.read_text(), str(self.path)), str(self.path))
        self._install(entries)
        self._mtime = mtime

    def _refresh(self) -> None:
        if self.path is None or time.monotonic() - self._checked < RELOAD_CHECK_SECONDS:
            return
        with self._lock:
            self._checked = time.monotonic()
            try:
                if self.path.stat().st_mtime != self._mtime:
                    self._load()
                    log.info("credentials reloaded", extra={"fields": {"callers": len(self._by_hash) + len(self._by_cn)}})
            except (OSError, ConfigError) as e:
                log.error("credentials file unreadable; keeping the last good callers",
                          extra={"fields": {"error": str(e).splitlines()[0]}})

    def by_token(self, token: str) -> Principal | None:
        self._refresh()
        digest = token_sha256(token)
        e = self._by_hash.get(digest)
        return e.principal if e is not None and hmac.compare_digest(e.token_sha256, digest) else None

    def by_cert(self, common_name: str) -> Principal | None:
        self._refresh()
        e = self._by_cn.get(common_name)
        return e.principal if e is not None else None


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: cannot parse: {e}") from e


@dataclass
class Authenticator:
    """Turns a call's credentials into a :class:`Principal`.

    Without credentials configured and with ``allow_anonymous``, every call is :data:`ANONYMOUS`
    (all roles; a development setting). Otherwise a call needs a bearer token one of the sources
    knows (the credentials file, then each resolver a service added) or a client certificate
    whose common name the file maps.
    """

    credentials: CredentialsFile = field(default_factory=CredentialsFile)
    allow_anonymous: bool = False
    resolvers: list[Callable[[str], Principal | None]] = field(default_factory=list)
    # resolvers that identify the callers presenting their tokens but do not require credentials
    optional_resolvers: list[Callable[[str], Principal | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.allow_anonymous and not self.credentials.configured and not self.resolvers:
            raise ConfigError("no credentials configured: set credentials_file (a file of callers, tokens and "
                              "roles) or, for development only, allow_anonymous=true")

    @property
    def enabled(self) -> bool:
        return not (self.allow_anonymous and not self.credentials.configured and not self.resolvers)

    def add_resolver(self, fn: Callable[[str], Principal | None], required: bool = True) -> None:
        """Another source of tokens; ``required=False``: it identifies the callers who present one
        of its tokens without turning authentication on (see the module docstring)."""
        (self.resolvers if required else self.optional_resolvers).append(fn)

    def from_token(self, token: str) -> Principal | None:
        if len(token) > MAX_TOKEN_CHARS:
            return None
        p = self.credentials.by_token(token)
        for r in (*self.resolvers, *self.optional_resolvers):
            if p is not None:
                break
            p = r(token)
        return p

    def authenticate(self, metadata, cert_common_names: Iterable[str] = ()) -> Principal:
        if not self.enabled:
            # authentication is off: whatever a caller sends, it is trusted; a token an optional
            # resolver knows still says who the caller is
            try:
                token = bearer_token(metadata)
            except AuthError:
                token = None
            p = self.from_token(token) if token and self.optional_resolvers else None
            return p if p is not None else ANONYMOUS
        token = bearer_token(metadata)
        if token is not None:
            p = self.from_token(token)
            if p is None:
                raise AuthError("the bearer token is not valid (unknown, revoked or rotated)")
            return p
        for cn in cert_common_names:
            p = self.credentials.by_cert(cn)
            if p is not None:
                return p
        raise AuthError("no credentials: send 'authorization: Bearer <token>' metadata"
                        + (" or a client certificate" if self.credentials._by_cn else ""))


def check_roles(p: Principal, allowed: frozenset[str], what: str) -> None:
    """PERMISSION_DENIED unless ``p`` holds one of ``allowed``."""
    if not p.roles & allowed:
        raise AuthError(f"{p.name} (roles: {', '.join(sorted(p.roles))}) may not call {what}; "
                        f"it needs one of: {', '.join(sorted(allowed))}", denied=True)


def labeler_of(p: Principal, requested: str) -> str:
    """The labeler id a submission or listing is made under: the credential's, never a request field.

    A labeler who names another labeler is refused; without authentication (development) the
    request's labeler id stands.
    """
    if p.anonymous:
        return requested
    if not p.labeler_id:
        raise AuthError(f"{p.name} is not a labeler: only labelers submit and list their own tasks", denied=True)
    if requested and requested != p.labeler_id:
        raise AuthError(f"labeler_id {requested[:64]!r} is not yours: it comes from your credential "
                        f"({p.labeler_id!r})", denied=True)
    return p.labeler_id


def read_secret(path: str) -> str:
    """A secret from a file (a mounted Kubernetes Secret, say), without its trailing newline."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"secret file {path} does not exist")
    value = p.read_text().strip()
    if not value:
        raise ConfigError(f"secret file {path} is empty")
    return value


def make_authenticator(settings, resolvers: Iterable[Callable[[str], Principal | None]] = ()) -> Authenticator:
    """The authenticator a service's settings describe (``credentials_file``, ``allow_anonymous``),
    with the service's own token resolvers after the file."""
    creds = CredentialsFile(settings.credentials_file or None)
    return Authenticator(creds, allow_anonymous=settings.allow_anonymous, resolvers=list(resolvers))


def shared_secret_resolver(token: str, principal: Principal) -> Callable[[str], Principal | None]:
    """A resolver that knows one token (e.g. the one `rlhf up` gives its own services)."""
    digest = token_sha256(token)
    return lambda t: principal if hmac.compare_digest(token_sha256(t), digest) else None

"""Service settings from environment variables: one dataclass per service, one prefix per service.

A service's settings are a dataclass whose fields have defaults (and a comment each). Field
``foo_bar`` of service ``feedback-store`` is read from ``RLHF_FEEDBACK_STORE_FOO_BAR``; fields
without a variable keep their defaults. Types are checked with the config module's coercion
(:func:`rlhf.config._coerce`), after the environment's strings are turned into the plain values it
expects: ``int``, ``float``, ``bool`` (``true/false/1/0/yes/no``), ``str``, ``Path``, ``X | None``
(an empty value or ``none``/``null`` means None).

Every problem is collected before anything is raised: values of the wrong type, variables with
the service's prefix that name no field (most likely a typo), and values that the dataclass's
``__post_init__`` rejects. :func:`load_settings` raises one :class:`~rlhf.errors.ConfigError`
that lists each problem under its variable name::

    invalid settings for reward-scorer (3 problems):
      RLHF_REWARD_SCORER_PORT: expected an integer, got 'abc'
      RLHF_REWARD_SCORER_MAX_QUEUE: must be >= 0, got -1
      RLHF_REWARD_SCORER_PROT: unknown variable (did you mean RLHF_REWARD_SCORER_PORT?)

Validators in ``__post_init__`` raise ``ValueError`` (or ``ConfigError``) with a message that
names the field (e.g. ``"max_batch_items must be >= 1"``); the message is reported under that
field's variable.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

from rlhf.config import _coerce
from rlhf.errors import ConfigError

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"", "none", "null"}


@dataclass
class BaseServiceSettings:
    """Settings every service has; services subclass this with their own fields."""

    host: str = "127.0.0.1"  # address the gRPC and metrics servers bind to ("0.0.0.0" in a container)
    port: int = 0  # gRPC port; 0 picks a free port (the "serving" log line names it)
    metrics_port: int = 0  # Prometheus /metrics port; 0 picks a free port, -1 runs no metrics server
    max_concurrency: int = 64  # calls executing at once
    max_queue: int = 256  # calls admitted and waiting for a slot beyond that; more -> RESOURCE_EXHAUSTED
    grace_seconds: float = 10.0  # on SIGTERM, how long in-flight calls may take to finish
    log_level: str = "INFO"  # DEBUG, INFO, WARNING, ERROR or CRITICAL
    kafka_bootstrap: str | None = None  # Kafka bootstrap servers (host:port,...); unset: no Kafka
    # authentication and TLS (docs/security.md)
    credentials_file: str = ""  # YAML/JSON file of callers: token (or its sha256) or client-certificate name -> roles; re-read on change
    allow_anonymous: bool = False  # without credentials every caller is trusted with every role: development only
    tls_cert_file: str = ""  # PEM certificate of the gRPC port; set with tls_key_file to serve TLS
    tls_key_file: str = ""  # PEM private key of that certificate
    tls_client_ca_file: str = ""  # PEM CA bundle: clients must present a certificate it signed (mutual TLS)
    peer_token_file: str = ""  # the bearer token this service presents when it calls other services
    peer_tls_ca_file: str = ""  # PEM CA bundle to verify other services' certificates (their ports serve TLS)
    peer_tls_cert_file: str = ""  # PEM client certificate presented to other services (mutual TLS)
    peer_tls_key_file: str = ""  # PEM private key of that client certificate
    # -- Kafka security (rlhf.runtime.bus.kafka_client_config turns these into librdkafka's settings)
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"  # SCRAM-SHA-256 or SCRAM-SHA-512 (with SASL_*)
    kafka_sasl_username: str = ""  # SCRAM user name (required with SASL_*)
    kafka_sasl_password_file: str = ""  # file holding the SCRAM password, e.g. a mounted Secret (required with SASL_*); never the password itself
    kafka_ssl_ca_file: str = ""  # PEM file of the CA(s) that signed the brokers' certificates (SSL, SASL_SSL); empty: the system's CAs

    def __post_init__(self) -> None:
        problems = common_problems(self)
        if problems:
            raise ConfigError("; ".join(f"{name}: {msg}" for name, msg in problems))
        self.log_level = self.log_level.upper()
        self.kafka_security_protocol = self.kafka_security_protocol.upper()
        self.kafka_sasl_mechanism = self.kafka_sasl_mechanism.upper()


def common_problems(s: BaseServiceSettings) -> list[tuple[str, str]]:
    """(field, message) for each invalid value among the common fields."""
    out = []
    if not 0 <= s.port <= 65535:
        out.append(("port", f"must be in 0..65535, got {s.port}"))
    if not -1 <= s.metrics_port <= 65535:
        out.append(("metrics_port", f"must be in -1..65535, got {s.metrics_port}"))
    if s.max_concurrency < 1:
        out.append(("max_concurrency", f"must be >= 1, got {s.max_concurrency}"))
    if s.max_queue < 0:
        out.append(("max_queue", f"must be >= 0, got {s.max_queue}"))
    if not s.grace_seconds >= 0:
        out.append(("grace_seconds", f"must be >= 0, got {s.grace_seconds}"))
    for name in ("credentials_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file", "peer_token_file",
                 "peer_tls_ca_file", "peer_tls_cert_file", "peer_tls_key_file"):
        path = getattr(s, name, "")
        if path and not os.path.isfile(path):
            out.append((name, f"file {path} does not exist"))
    if bool(getattr(s, "tls_cert_file", "")) != bool(getattr(s, "tls_key_file", "")):
        out.append(("tls_cert_file", "tls_cert_file and tls_key_file go together"))
    if getattr(s, "tls_client_ca_file", "") and not getattr(s, "tls_cert_file", ""):
        out.append(("tls_client_ca_file", "mutual TLS needs tls_cert_file and tls_key_file too"))
    if bool(getattr(s, "peer_tls_cert_file", "")) != bool(getattr(s, "peer_tls_key_file", "")):
        out.append(("peer_tls_cert_file", "peer_tls_cert_file and peer_tls_key_file go together"))
    if str(s.log_level).upper() not in LOG_LEVELS:
        out.append(("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {s.log_level!r}"))
    return out + kafka_security_problems(s)


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")


def _unreadable(path: str) -> str | None:
    """Why ``path`` cannot serve as a secret or CA file, or None when it can."""
    p = Path(path)
    if not p.is_file():
        return f"no such file: {path}"
    try:
        with p.open("rb") as f:
            if not f.read(1):
                return f"the file is empty: {path}"
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    return None


def kafka_security_problems(s) -> list[tuple[str, str]]:
    """(field, message) for each inconsistent Kafka security setting; files are checked to exist."""
    out = []
    protocol = str(s.kafka_security_protocol).upper()
    if protocol not in KAFKA_SECURITY_PROTOCOLS:
        out.append(("kafka_security_protocol", f"must be one of {', '.join(KAFKA_SECURITY_PROTOCOLS)}, got {s.kafka_security_protocol!r}"))
        return out
    if protocol.startswith("SASL_"):
        if str(s.kafka_sasl_mechanism).upper() not in KAFKA_SASL_MECHANISMS:
            out.append(("kafka_sasl_mechanism", f"must be one of {', '.join(KAFKA_SASL_MECHANISMS)}, got {s.kafka_sasl_mechanism!r}"))
        if not s.kafka_sasl_username:
            out.append(("kafka_sasl_username", f"required with kafka_security_protocol {protocol}"))
        if not s.kafka_sasl_password_file:
            out.append(("kafka_sasl_password_file", f"required with kafka_security_protocol {protocol} "
                                                    "(a file holding the password, e.g. a mounted Secret)"))
        elif (why := _unreadable(s.kafka_sasl_password_file)) is not None:
            out.append(("kafka_sasl_password_file", why))
    else:
        for name in ("kafka_sasl_username", "kafka_sasl_password_file"):
            if getattr(s, name):
                out.append((name, f"set, but kafka_security_protocol {protocol} does not log in (use SASL_SSL or SASL_PLAINTEXT)"))
    if s.kafka_ssl_ca_file:
        if not protocol.endswith("SSL"):
            out.append(("kafka_ssl_ca_file", f"set, but kafka_security_protocol {protocol} does not use TLS (use SSL or SASL_SSL)"))
        elif (why := _unreadable(s.kafka_ssl_ca_file)) is not None:
            out.append(("kafka_ssl_ca_file", why))
    return out


def env_prefix(service: str) -> str:
    """``reward-scorer`` -> ``RLHF_REWARD_SCORER_``."""
    return "RLHF_" + re.sub(r"[^A-Za-z0-9]", "_", service).upper() + "_"


def env_name(service: str, field: str) -> str:
    return env_prefix(service) + field.upper()


def _from_env(raw: str, tp: Any) -> Any:
    """The environment's string as the plain value ``_coerce`` checks (left as is when it does not
    parse, so that ``_coerce`` reports it in its usual words)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.strip().lower() in _NONE:
            return None
        inner = [a for a in args if a is not type(None)]
        return _from_env(raw, inner[0]) if len(inner) == 1 else raw
    if tp is bool:
        v = raw.strip().lower()
        return True if v in _TRUE else False if v in _FALSE else raw
    if tp is int:
        try:
            return int(raw.strip())
        except ValueError:
            return raw
    if tp is float:
        return raw.strip()
    if tp is Path or (isinstance(tp, type) and issubclass(tp, Path)):
        return Path(raw)
    if origin is typing.Literal and args and all(isinstance(a, int) for a in args):
        try:
            return int(raw.strip())
        except ValueError:
            return raw
    return raw


def _field_of(message: str, names: list[str]) -> str | None:
    """The field a validator's message is about: the one it starts with (``"name: ..."``), else the
    longest field name in it as a whole word."""
    head = message.split(":", 1)[0]
    if head in names:
        return head
    for name in sorted(names, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message):
            return name
    return None


def _strip_field(message: str, name: str) -> str:
    """``"port: must be ..."`` -> ``"must be ..."`` (the variable name replaces the field's)."""
    return re.sub(rf"^{re.escape(name)}:\s*", "", message)


def load_settings(cls: type[T], service: str, environ: Mapping[str, str] | None = None,
                  base: Mapping[str, Any] | None = None, fixed: frozenset[str] | set[str] = frozenset()) -> T:
    """Build settings dataclass ``cls`` for ``service`` from ``RLHF_<SERVICE>_<FIELD>`` variables.

    ``base`` gives values the caller sets (``rlhf up``'s wiring); variables override them, except
    for the ``fixed`` fields, whose variables are reported as problems (the caller owns them).
    Raises one ConfigError listing every problem (wrong types, unknown variables, values the
    dataclass rejects), each under its variable name.
    """
    env = os.environ if environ is None else environ
    prefix = env_prefix(service)
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    by_var = {env_name(service, f): f for f in fields}
    problems: list[tuple[str, str]] = []
    kwargs: dict[str, Any] = dict(base or {})

    for var in sorted(k for k in env if k.startswith(prefix)):
        field = by_var.get(var)
        if field is None:
            close = difflib.get_close_matches(var, list(by_var), n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(by_var))}"
            problems.append((var, f"unknown variable ({hint})"))
            continue
        if field in fixed:
            problems.append((var, "set by the caller (rlhf up wires it from its own options)"))
            continue
        raw = env[var]
        try:
            kwargs[field] = _coerce(_from_env(raw, hints[field]), hints[field], var)
        except ConfigError as e:
            msg = str(e)
            problems.append((var, msg[len(var) + 2:] if msg.startswith(var + ": ") else msg))

    if issubclass(cls, BaseServiceSettings):
        # checked here as well, so that they are listed together with a subclass validator's
        # complaint (and also when a subclass's __post_init__ does not call super's)
        common = {f.name: kwargs.get(f.name, f.default) for f in dataclasses.fields(BaseServiceSettings)}
        for field, msg in common_problems(types.SimpleNamespace(**common)):  # type: ignore[arg-type]
            problems.append((env_name(service, field), msg))
            kwargs.pop(field, None)  # reported; the default lets the subclass's checks run

    settings = None
    try:
        settings = cls(**kwargs)
    except (ConfigError, ValueError, TypeError) as e:
        reported = {var for var, _ in problems}
        # the common fields' check joins its problems with "; "
        parts = str(e).split("; ") if isinstance(e, ConfigError) else [str(e)]
        for part in parts:
            field = _field_of(part, fields)
            if field is None:
                problems.append((f"{prefix}*", f"{cls.__name__}: {part}"))
            elif env_name(service, field) not in reported:
                problems.append((env_name(service, field), _strip_field(part, field)))
    if isinstance(settings, BaseServiceSettings):
        settings.log_level = settings.log_level.upper()

    if problems:
        lines = "\n".join(f"  {var}: {msg}" for var, msg in problems)
        n = len(problems)
        raise ConfigError(f"invalid settings for {service} ({n} problem{'s' if n > 1 else ''}):\n{lines}")
    return settings  # type: ignore[return-value]

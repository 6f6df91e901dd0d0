"""Structured logs for the services: one JSON object per line on stderr.

Each line has ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``service``, ``logger`` and ``msg``;
fields given as ``logger.info("scored", extra={"fields": {"items": 8, "ms": 3.1}})`` are added at
the top level (a field named like one of those five is written as ``field_<name>``); an exception
(``logger.exception(...)`` or ``exc_info=True``) becomes one string field ``exc``.

Never log prompt or response text, request payloads or other user content: log sizes, counts,
ids of model versions and durations instead. Logs are kept and read more widely than the data.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

_RESERVED = ("ts", "level", "service", "logger", "msg")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, timezone.utc)
        out: dict = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out[f"field_{k}" if k in _RESERVED else str(k)] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (so redirection and capture work)."""

    _rlhf_json = True

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every log record (root logger) to stderr as JSON lines. Calling it again replaces the
    handler it installed before, so there is never more than one."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_rlhf_json", False):
            root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())

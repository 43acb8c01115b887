"""Structured logging: one event per line as key=value pairs."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_LOG = logging.getLogger("reconciler")


def _fmt(v: Any) -> str:
    s = str(v)
    if s == "" or any(c in s for c in ' "=\n\t'):
        s = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = getattr(record, "fields", {})
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"event={_fmt(record.getMessage())}",
        ]
        parts += [f"{k}={_fmt(v)}" for k, v in fields.items()]
        return " ".join(parts)


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    _LOG.handlers[:] = [handler]
    _LOG.setLevel(level)
    _LOG.propagate = False


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event; ``fields`` become key=value pairs. Never pass secrets."""
    _LOG.log(level, name, extra={"fields": fields})

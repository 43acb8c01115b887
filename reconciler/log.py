"""Structured logging: one event per line, as key=value pairs or as a JSON object.

Both formats carry the same fields: ``ts``, ``level``, ``event`` and the event's own.
Records of the libraries underneath (watchdog, python-tuf, boto3, Python's warnings)
are events too (``event=library_log``, with ``logger`` and ``message``), on one line
however many their message or traceback had: a log shipper reads one event per line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from enum import StrEnum
from typing import Any

_LOG = logging.getLogger("reconciler")

# --log-level's names.
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class Format(StrEnum):
    """--log-format: how each event is written."""

    TEXT = "text"  # key=value pairs
    JSON = "json"  # one JSON object per line


# Escapes for what a reader of the log must not meet raw: a value from the config
# repository (a file name) can hold control characters (ESC starts a terminal's
# escape sequence) and anything str.splitlines() breaks a line at (\x85, \u2028, ...).
_NAMED = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    if c.isprintable():
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _fmt(v: Any) -> str:
    s = str(v)
    if s == "" or not s.isprintable() or any(c in s for c in ' "='):
        s = '"' + "".join(map(_escape, s)) + '"'
    return s


def _json_escape(c: str) -> str:
    """A character json.dumps leaves raw (it escapes only those below 0x20) as JSON's
    escape when it is not printable: UTF-16, as JSON's escapes are."""
    if c.isprintable():
        return c
    units = c.encode("utf-16-be")
    return "".join(f"\\u{int.from_bytes(units[i : i + 2]):04x}" for i in range(0, len(units), 2))


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The event a record is: ts, level, event and its fields, in this order."""
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    out: dict[str, Any] = {"ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname.lower()}
    if record.name == _LOG.name:
        out["event"] = record.getMessage()
        out.update(getattr(record, "fields", {}))
        return out
    # Another library's record: its message (and exception, without the traceback) on
    # one line; the logger says whose it is.
    out["event"] = "library_log"
    out["logger"] = record.name
    out["message"] = " ".join(record.getMessage().split())
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        out["error"] = " ".join("".join(traceback.format_exception_only(type(exc), exc)).split())
    return out


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_fmt(v)}" for k, v in fields_of(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # Values that are not JSON types (a Path, an enum member) as their text.
        line = json.dumps(fields_of(record), default=str, ensure_ascii=False)
        return line if line.isprintable() else "".join(map(_json_escape, line))


def configure(level: int = logging.INFO, fmt: Format = Format.TEXT) -> None:
    """Events of ``level`` and above on stderr in ``fmt``; other libraries' records from
    WARNING up (or ``level``, if higher), in the same format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == Format.JSON else KeyValueFormatter())
    _LOG.handlers[:] = [handler]
    _LOG.setLevel(level)
    _LOG.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))
    # Python's warnings (a DeprecationWarning of a library) become records, not lines
    # of source code on stderr.
    logging.captureWarnings(True)


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event; ``fields`` become key=value pairs. Never pass secrets."""
    # A field named like one of the line's own would replace it (the event would be
    # logged as another): it keeps a trailing underscore instead.
    fields = {f"{k}_" if k in _RESERVED else k: v for k, v in fields.items()}
    _LOG.log(level, name, extra={"fields": fields})


_RESERVED = frozenset({"ts", "level", "event"})

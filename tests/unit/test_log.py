"""reconciler.log: one event per line, as key=value pairs or JSON objects with the same fields."""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterator

import pytest

from reconciler import log


@pytest.fixture
def logged(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    # configure() takes over the root logger: the other tests get it back as it was.
    root, ours = logging.getLogger(), logging.getLogger("reconciler")
    saved = (root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate)
    yield capsys
    root.handlers[:], ours.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    ours.setLevel(saved[3])
    ours.propagate = saved[4]
    logging.captureWarnings(False)


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_text_and_json_carry_the_same_fields(logged: pytest.CaptureFixture[str]) -> None:
    log.configure(fmt=log.Format.TEXT)
    log.event("host_failed", logging.ERROR, host="web-1", error="line one\nline two", failures=2)
    (text,) = lines(logged)
    assert (
        text.split(" ", 1)[1]
        == 'level=error event=host_failed host=web-1 error="line one\\nline two" failures=2'
    )
    log.configure(fmt=log.Format.JSON)
    log.event("host_failed", logging.ERROR, host="web-1", error="line one\nline two", failures=2)
    (line,) = lines(logged)
    doc = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc.pop("ts"))
    assert doc == {
        "level": "error",
        "event": "host_failed",
        "host": "web-1",
        "error": "line one\nline two",
        "failures": 2,
    }


# What a config repository's file name can hold: ESC (a terminal's escape sequences),
# C1 controls (\x9b is CSI), and what str.splitlines() breaks at besides \n and \r.
HOSTILE = "esc\x1b[2J\x9bred\x85ts=1 level=info event=forged\u2028\u2029\x0b\x0c\x1c\x7f\U000e0001 é 中"


@pytest.mark.parametrize("fmt", list(log.Format))
def test_a_value_cannot_forge_a_line_or_reach_the_terminal_raw(
    logged: pytest.CaptureFixture[str], fmt: log.Format
) -> None:
    log.configure(fmt=fmt)
    log.event("host_invalid", logging.WARNING, file=HOSTILE, reason="ok")
    # One line, however the reader splits lines (lines() splits as str.splitlines()).
    (line,) = lines(logged)
    assert line.isprintable(), [c for c in line if not c.isprintable()]
    # Printable text stays as it is.
    assert "é 中" in line
    if fmt is log.Format.JSON:
        assert json.loads(line)["file"] == HOSTILE
    else:
        assert line.endswith(" reason=ok")


def test_the_level_drops_what_is_less_severe(logged: pytest.CaptureFixture[str]) -> None:
    log.configure(logging.WARNING, log.Format.JSON)
    log.event("reconcile_start")
    log.event("host_failed", logging.ERROR)
    assert [json.loads(ln)["event"] for ln in lines(logged)] == ["host_failed"]


@pytest.mark.parametrize("fmt", list(log.Format))
def test_other_libraries_records_and_warnings_are_one_event_per_line(
    logged: pytest.CaptureFixture[str], fmt: log.Format
) -> None:
    log.configure(fmt=fmt)
    other = logging.getLogger("watchdog.observers.inotify_buffer")
    try:
        raise OSError(24, "Too many open files\nin the watch")
    except OSError:
        other.exception("inotify failed:\n  a multi-line\n  message")
    logging.getLogger("urllib3").info("quiet below warning")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("old API\nuse the new one", DeprecationWarning, stacklevel=1)
    got = lines(logged)
    assert len(got) == 2, got
    if fmt == log.Format.JSON:
        first, second = (json.loads(ln) for ln in got)
        assert first["event"] == "library_log" and first["logger"] == "watchdog.observers.inotify_buffer"
        assert first["message"] == "inotify failed: a multi-line message"
        assert first["error"] == "OSError: [Errno 24] Too many open files in the watch"
        assert (
            second["logger"] == "py.warnings"
            and "DeprecationWarning: old API use the new one" in second["message"]
        )
    else:
        assert "event=library_log logger=watchdog.observers.inotify_buffer" in got[0]
        assert "Traceback" not in "".join(got)


def test_a_field_named_like_the_lines_own_does_not_replace_them(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="reconciler"):
        log.event("notification_dropped", event="host_published", ts="x")
    (record,) = caplog.records
    fields = log.fields_of(record)
    assert fields["event"] == "notification_dropped" and fields["ts"] != "x"
    assert fields["event_"] == "host_published" and fields["ts_"] == "x"

"""Blocking calls that nothing can cut short, held to a deadline all the same.

A name lookup (getaddrinfo keeps to resolv.conf's timeouts, half a minute and more)
and a botocore request (its read_timeout bounds each read, which every byte a server
trickles starts again) cannot be interrupted. So each runs in a thread of its own,
which a caller whose deadline passes leaves behind. At most ``limit`` are left behind
at once; past that, a call fails at once instead of adding threads while whatever
they wait for does not answer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")


class LateError(Exception):
    """The call did not return within its deadline; its thread is left behind."""


class CrowdedError(Exception):
    """As many calls as the limit are left behind already: this one was not started."""


class BoundedCalls:
    """Calls under a deadline each, with at most ``limit`` of them left behind."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._left = 0

    @property
    def left(self) -> int:
        """How many calls past their deadline are still running."""
        with self._lock:
            return self._left

    def run(self, call: Callable[[], T], seconds: float, name: str) -> T:
        """``call()``, in a thread named ``name``, if it returns within ``seconds``:
        what it returns or raises. Else LateError; CrowdedError when ``limit`` calls
        are left behind already."""
        with self._lock:
            if self._left >= self.limit:
                raise CrowdedError
        done = threading.Event()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = call()
            except BaseException as exc:  # raised in the caller
                box["error"] = exc
            finally:
                with self._lock:
                    done.set()
                    if box.get("left"):
                        self._left -= 1

        threading.Thread(target=work, name=name, daemon=True).start()
        if not done.wait(max(seconds, 0.0)):
            with self._lock:
                # Answered just now, or left behind for good.
                if not done.is_set():
                    box["left"] = True
                    self._left += 1
                    raise LateError
        if "error" in box:
            raise box["error"]
        return cast(T, box["value"])

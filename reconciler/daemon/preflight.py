"""Preflight: what `reconciler check` and the start of `reconciler run` find out before
anything is built, instead of after every host was (a wrong key, an unwritable store).

Each check is a name and a function that returns what it found, in one line, or raises
a ReconcilerError saying what is wrong, in one line. reconciler.wiring makes the list
with the real adapters; the checks over ports are here.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from reconciler import log
from reconciler.config import Config
from reconciler.errors import ConfigError, ReconcilerError
from reconciler.ports import Store, holds

# The store object a check writes and deletes again; a name no release, blob or TUF
# file has, so that nothing an agent reads is ever touched.
PROBE_PREFIX = ".reconciler-check-"


class CheckName(StrEnum):
    CONFIG = "config"
    STATE_DIR = "state_dir"
    SIGNING = "signing"
    STORE = "store"
    LOG = "log"
    SANDBOX = "nix"
    GIT = "git"


# What the daemon starts without: a repository it cannot reach now is what its passes
# retry (and /readyz reports); the rest would fail every pass until fixed.
NOT_FATAL_AT_START = frozenset({CheckName.GIT})

Check = tuple[CheckName, Callable[[], str]]


@dataclass(frozen=True)
class Result:
    name: CheckName
    ok: bool
    detail: str  # what was found, or why it failed: one line

    def line(self) -> str:
        return f"{self.name}: {'ok' if self.ok else 'FAILED'}: {self.detail}"


def run(checks: Sequence[Check]) -> list[Result]:
    """Every check, in order; one that fails does not stop the others."""
    results = []
    for name, check in checks:
        try:
            results.append(Result(name, True, _one_line(check())))
        except ReconcilerError as exc:
            results.append(Result(name, False, _one_line(str(exc))))
        except Exception as exc:
            # A bug, or a library's error we do not know yet: still one line.
            results.append(Result(name, False, _one_line(f"unexpected error: {exc!r}")))
    return results


def at_start(checks: Sequence[Check]) -> None:
    """The checks `reconciler run` makes before it listens or builds, each logged as it
    ends. Any failure but the repository's stops the start: a ReconcilerError naming
    the first (and the others that failed); a repository that cannot be reached now is
    what the passes retry (and /readyz reports)."""
    fatal: list[Result] = []
    for check in checks:
        (result,) = run([check])
        if result.ok:
            log.event("preflight", check=result.name, result="ok", detail=result.detail)
            continue
        level = logging.WARNING if result.name in NOT_FATAL_AT_START else logging.ERROR
        log.event("preflight", level, check=result.name, result="failed", detail=result.detail)
        if result.name not in NOT_FATAL_AT_START:
            fatal.append(result)
    if fatal:
        first, *more = fatal
        also = f" (also failed: {', '.join(r.name for r in more)})" if more else ""
        raise ReconcilerError(f"preflight: {first.name}: {first.detail}{also}")


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def check_state_dir(cfg: Config) -> str:
    """The state directory exists (or can be made) and takes a file."""
    d = cfg.state_dir
    probe = d / f"{PROBE_PREFIX}{secrets.token_hex(8)}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe\n")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(str(cfg.path), "state_dir", f"{d}: {exc.strerror or exc}") from None
    return f"{d} is writable"


def check_store(store: Store) -> str:
    """The store takes an object, gives it back and deletes it: what a publication and
    garbage collection need."""
    key = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
    data = b"reconciler check " + key.encode() + b"\n"
    store.put_bytes(key, data)
    try:
        if not holds(store, key, data):
            raise ReconcilerError(f"{store.url(key)} reads back other bytes than were written")
    finally:
        store.delete(key)
    if store.exists(key):
        raise ReconcilerError(f"{store.url(key)} is still there after it was deleted")
    return f"wrote, read and deleted {store.url(key)}"


def sandbox_verdict(cfg: Config, sandboxed: bool) -> str:
    """What the probe build's answer means under ``cfg``: an unsandboxed Nix is an error
    unless nix.sandbox: false accepts it."""
    if sandboxed:
        return "builds run in Nix's sandbox"
    if cfg.nix.sandbox:
        raise ConfigError(
            str(cfg.path),
            "nix.sandbox",
            "Nix builds unsandboxed here (a probe build saw the machine's files): set 'sandbox = true' "
            "in nix.conf (scripts/setup does), or set nix.sandbox: false to accept unsandboxed builds",
        )
    return "off (nix.sandbox: false): builds can read the machine's files and reach the network"


def check_files(cfg: Config, paths: Sequence[tuple[str, Path | None]]) -> None:
    """Each configured file (dotted key, path) is there to read."""
    for key, path in paths:
        if path is not None and not os.access(path, os.R_OK):
            why = "does not exist" if not path.exists() else "cannot be read by this user"
            raise ConfigError(str(cfg.path), key, f"{path} {why}")

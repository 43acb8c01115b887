"""The reproducibility gate (``reproducibility: {check: true}``): what Nix says when it
builds a derivation a second time and compares, and how two builds that differ are
summarised for an operator. Pure.

Nix's ``--check`` builds each given derivation again and compares the result with the
output in the store, bit for bit. On a difference it fails the derivation with exit
status 104 and, with ``--keep-failed``, keeps the second build beside the first as
``<output>.check``; the adapter lists both trees and this module says what differs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from reconciler.core.builders import LOCAL

# The builder name of a check run on the daemon's own machine (core.builders.LOCAL),
# the only place the gate runs one: Nix 2.8 hands a --check to a remote builder when
# --max-jobs is 0, and the builder, whose output is valid already, passes it without
# building again.
CHECK_LOCAL = LOCAL
# Files named in a summary; the rest are counted.
MAX_FILES = 8
# Files listed of each build: a build of tens of millions of files must not take
# gigabytes of the daemon's memory to say how it differs.
MAX_LISTED = 100_000

_MISMATCH = re.compile(
    r"derivation '(?P<drv>/[^']+\.drv)' may not be deterministic: output '(?P<out>/[^']+)' differs"
    r"(?: from '(?P<check>/[^']+\.check)')?"
)
_KEPT = re.compile(r"keeping build directory '(?P<dir>/[^']+)'")


class CheckResult(StrEnum):
    """How a host's check came out: the ``result`` label of
    reconciler_reproducibility_checks_total."""

    PASSED = "passed"  # every derivation built again gave the same bytes
    MISMATCH = "mismatch"  # one or more gave other bytes: the host is refused
    FAILED = "failed"  # the second build itself failed or could not run


@dataclass(frozen=True)
class Mismatch:
    """A derivation whose second build differs: its output, and the second build's
    (``check``, kept by Nix's --keep-failed; None when Nix did not keep it)."""

    derivation: str
    output: str
    check: str | None
    summary: str = ""  # what differs (``compare``), filled in by the adapter


@dataclass(frozen=True)
class ReproCheck:
    """What the gate found for one host: the derivations of its closure that gave the
    same bytes twice (``rebuilt`` now, the others before), where the second builds
    ran, and those that differ (the host is then refused)."""

    derivations: tuple[str, ...]
    rebuilt: tuple[str, ...]
    where: str
    mismatches: tuple[Mismatch, ...] = ()


@dataclass(frozen=True)
class CheckOutcome:
    """What Nix's --check printed: the derivations that differ and the build
    directories it kept (--keep-failed), for the adapter to remove."""

    mismatches: tuple[Mismatch, ...]
    kept_dirs: tuple[str, ...]


def parse_check(stderr: str) -> CheckOutcome:
    """The mismatches and kept build directories named in ``nix-store --realise
    --check --keep-failed``'s messages (Nix 2.8's wording)."""
    mismatches: dict[str, Mismatch] = {}
    for m in _MISMATCH.finditer(stderr):
        mismatches.setdefault(m.group("out"), Mismatch(m.group("drv"), m.group("out"), m.group("check")))
    kept = tuple(dict.fromkeys(m.group("dir") for m in _KEPT.finditer(stderr)))
    return CheckOutcome(tuple(mismatches.values()), kept)


@dataclass(frozen=True)
class Entry:
    """One file of a build output as the gate compares it: a regular file by size
    and sha256 (and whether it is executable), a symlink by its target, a directory."""

    kind: str  # "file", "symlink", "directory" or "other"
    size: int = 0
    sha256: str = ""  # empty: not read (past the gate's budget of bytes to hash)
    target: str = ""
    executable: bool = False

    def describe(self) -> str:
        if self.kind == "file":
            mode = ", executable" if self.executable else ""
            digest = f"sha256 {self.sha256[:16]}" if self.sha256 else "not read"
            return f"{self.size} bytes, {digest}{mode}"
        if self.kind == "symlink":
            return f"symlink to {printable(self.target)}"
        return self.kind


def printable(name: str) -> str:
    """``name`` with every character that is not printable escaped: a file name from
    an untrusted build reaches logs, the ledger and terminals."""
    return "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}" for c in name
    )


def compare(first: Mapping[str, Entry], second: Mapping[str, Entry], truncated: bool = False) -> list[str]:
    """What differs between two listings of an output (relative path -> Entry): one
    line per file that is only in one build or differs, sorted by path. ``truncated``
    (either listing stopped at MAX_LISTED): only the files in both are compared, as
    a file past one listing's end is not missing from its build."""
    lines = []
    paths = first.keys() & second.keys() if truncated else first.keys() | second.keys()
    for path in sorted(paths):
        a, b = first.get(path), second.get(path)
        name = printable(path) or "."
        if a is None:
            assert b is not None
            lines.append(f"{name}: only in the second build ({b.describe()})")
        elif b is None:
            lines.append(f"{name}: only in the first build ({a.describe()})")
        elif a != b:
            lines.append(f"{name}: {a.describe()} vs {b.describe()}")
    return lines


def summarise(lines: Sequence[str], limit: int = MAX_FILES, listed: int | None = None) -> str:
    """The first ``limit`` differences on one line, and how many more there are.
    ``listed``: the listings were cut at so many files of each build."""
    cut = f"listed only the first {listed} files of each build" if listed is not None else None
    if not lines:
        if cut is not None:
            return f"no file differs among those compared ({cut})"
        return "the outputs differ in metadata only (no file differs by content, type or mode)"
    shown = "; ".join(lines[:limit])
    more = len(lines) - limit
    text = f"{shown}; and {more} more" if more > 0 else shown
    return f"{text} ({cut})" if cut is not None else text


def refusal(mismatches: Sequence[Mismatch], where: str) -> str:
    """The host's error when the gate refuses it: each derivation that built
    differently, and what differed."""
    parts = [
        f"derivation {m.derivation} built again {'here' if where == CHECK_LOCAL else 'on ' + where} "
        f"gave other bytes than {m.output}: {m.summary}"
        for m in mismatches
    ]
    return "not reproducible, nothing is signed or published: " + " | ".join(parts)

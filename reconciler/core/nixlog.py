"""What of Nix's output may be shown in logs, ``status`` and metrics.

Nix's messages name files and quote their lines, and a failed build's output is
whatever the builder printed. The config repository is untrusted, so none of that
may carry a path or a line of a file outside the repository to an operator's
screen or a log shipper. Pure: text in, text out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# How many lines of Nix's output a host's error keeps (the last ones: the cause).
TAIL_LINES = 12
OUTSIDE = "<outside the repository>"
# Nix quotes the source lines around an error ("   12| code", "     | ^").
_SNIPPET = re.compile(r"^\s*\d*\s*\|")
# An absolute path: starts a word with "/", ends at white space, a quote or a colon
# (Nix writes "at /path:line:col:").
_PATH = re.compile(r"(?<![\w./-])/[^\s'\"`:,;()<>\[\]{}]*")
# Nix 2.8 colours what its messages quote, on a pipe too (SGR sequences); a builder
# prints what it likes. Both go, and then every other control character: a path just
# after a colour code starts no word (_PATH would not see it), and an escape sequence
# would act on the terminal of an operator reading `status`.
_SGR = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Paths that name nothing of the machine's: the store is world-readable and holds
# only what builds put there; the others exist only inside the build sandbox.
_PUBLIC = ("/nix/store", "/build", "/proc", "/dev")
# Nix's own verdict on a build. An unsandboxed builder can print anything, so a
# line passes only if nothing in it can be chosen but a store path's name.
_NIX_VERDICT = re.compile(
    r"^error: (builder for|\d+ dependencies of derivation|building of|build of) "
    r"'/nix/store/[0-9a-z]{32}-[\w+.?=-]+'"
    r"( failed with exit code \d+;?| failed to build| timed out after \d+ seconds;?| failed)$"
)


# How many lines of a failed builder's output its error keeps (build_failure).
BUILD_TAIL_LINES = 10
# Nix's verdict on the derivation whose build failed (the first: the one to look at).
_FAILED = re.compile(
    r"^error: (?:builder for|building of|build of) '(?P<drv>/nix/store/[0-9a-z]{32}-[\w+.?=-]+\.drv)'"
    r"(?: failed with exit code \d+;?| timed out after \d+ seconds;?| failed)$"
)
# Progress Nix prints while building, and the failures that only follow from another.
_PROGRESS = re.compile(
    r"^(?:(?:building|copying|querying info about) '/nix/store/[^']*'"
    r"|these \d+ (?:derivations|paths) will be (?:built|fetched)"
    r"|this (?:derivation|path) will be (?:built|fetched)"
    r"|/nix/store/\S+$)"
)
_CASCADE = re.compile(r"^error: \d+ dependencies of derivation '[^']*' failed to build$")


@dataclass(frozen=True)
class Redaction:
    """How to rewrite paths: the repository checkout becomes repo-relative, each of
    ``labels`` (a trusted directory such as the Nix library) becomes its label."""

    repo: str
    labels: Mapping[str, str]

    def path(self, p: str) -> str:
        if p == self.repo:
            return "."
        if p.startswith(self.repo + "/"):
            return p[len(self.repo) + 1 :]
        for root, label in self.labels.items():
            if p == root or p.startswith(root + "/"):
                return label + p[len(root) :]
        if any(p == q or p.startswith(q + "/") for q in _PUBLIC):
            return p
        return OUTSIDE


def redact(text: str, how: Redaction, unsandboxed_build: bool = False) -> str:
    """Nix's ``text`` as one line that is safe to show.

    Quoted source lines are dropped wherever they come from; paths outside the
    repository, the trusted ``labels`` and the store are replaced. Of an
    ``unsandboxed_build``'s output only Nix's verdict lines are kept: a sandboxed
    builder sees nothing but the repository and the store, an unsandboxed one the
    whole machine. (Evaluation runs no builder: import-from-derivation is off.)
    """
    return tail(_shown(text, how, unsandboxed_build))


def _shown(text: str, how: Redaction, unsandboxed_build: bool) -> list[str]:
    """The lines of ``text`` that may be shown, redacted (see :func:`redact`)."""
    kept: list[str] = []
    for raw in map(_plain, text.splitlines()):
        line = raw.strip()
        if not line or _SNIPPET.match(raw):
            continue
        if unsandboxed_build and not _NIX_VERDICT.match(line):
            continue
        kept.append(_PATH.sub(lambda m: how.path(m.group(0)), line))
    return kept


def build_failure(text: str, how: Redaction, unsandboxed_build: bool = False) -> str:
    """Why a build failed, from Nix's ``text``, redacted as :func:`redact` does.

    The derivation that failed and how, then the last BUILD_TAIL_LINES lines of its
    builder's output (Nix's progress lines and the cascade of dependents that could
    not be built left out), then where the whole log is. Several lines: a log event
    quotes them as one. Without such a verdict (Nix failed before building), the
    redacted tail as :func:`redact` gives it.
    """
    lines = _shown(text, how, unsandboxed_build)
    failed = _verdict(lines)
    if failed is None:
        return tail(lines)
    output = [ln for ln in lines if not (_FAILED.match(ln) or _PROGRESS.match(ln) or _CASCADE.match(ln))]
    out = [failed.group(0).removeprefix("error: ").rstrip(";")]
    if output:
        out[0] += "; its last lines:"
        out += ["  " + ln for ln in output[-BUILD_TAIL_LINES:]]
    out.append(f"whole log: nix-store --read-log {failed.group('drv')}")
    return "\n".join(out)


def failed_derivation(text: str) -> str | None:
    """The derivation whose build failed first, by Nix's verdict in ``text``; None
    when Nix failed before building."""
    failed = _verdict(_plain(ln).strip() for ln in text.splitlines())
    return None if failed is None else failed.group("drv")


def _plain(line: str) -> str:
    """``line`` without colours or control characters (_SGR, _CONTROL)."""
    return _CONTROL.sub("", _SGR.sub("", line))


def _verdict(lines: Iterable[str]) -> re.Match[str] | None:
    """Nix's verdict on the first derivation whose build failed, among ``lines``."""
    return next((m for m in map(_FAILED.match, lines) if m), None)


def last_line(text: str, how: Redaction, unsandboxed_build: bool = False) -> str | None:
    """The last line of a running build's output ``text`` that may be shown, not
    counting Nix's progress lines; None if there is none yet."""
    lines = [ln for ln in _shown(text, how, unsandboxed_build) if not _PROGRESS.match(ln)]
    return lines[-1] if lines else None


def tail(lines: Sequence[str]) -> str:
    """The last lines of a message joined into one."""
    return " | ".join(lines[-TAIL_LINES:]) or "no output"

"""Nix remote builders: what Nix is told about them, and what its build log says
about where a build ran. Pure: the Nix adapter writes the files and runs Nix.

Nix schedules builds over the machines it is given (as Hydra does); this side only
renders the machines specification and the ssh settings, reads back which builder took
a build and which ones could not be reached, and decides which builders Nix may be
given at all: only those a probe build found building in Nix's sandbox (a builder's
sandbox is its own nix.conf's, which nothing here can set), unless the config accepts
unsandboxed builds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

# The name of the daemon's own machine as a builder (metrics, status).
LOCAL = "local"
# A builder that stops answering mid-build (powered off, cut off): ssh asks every
# KEEPALIVE_INTERVAL seconds and ends the connection after KEEPALIVE_COUNT unanswered
# asks, and Nix's build with it ("unexpected end-of-file"), instead of the build waiting
# on it until its deadline (nix.build_timeout).
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 4
# A builder that could not be probed (down, refusing ssh) is tried again when a build
# comes after this many seconds, not before each build: a dead builder costs a probe
# its ssh ConnectTimeout (10 s).
PROBE_RETRY = 60.0


@dataclass(frozen=True)
class Builder:
    """One remote builder as configured (reconciler.yaml ``builders:``)."""

    name: str  # metrics label and status key; the URI unless named
    uri: str  # ssh-ng://user@host[:port][?remote-store=...], as written
    ssh_key: str  # private key path
    host_key: str  # "TYPE BASE64": the only host key accepted
    systems: tuple[str, ...] = ("x86_64-linux",)
    max_jobs: int = 1
    speed_factor: int = 1
    features: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        return _split(self.uri)[1]

    @property
    def port(self) -> int | None:
        return _split(self.uri)[2]

    @property
    def nix_uri(self) -> str:
        """The URI as Nix 2.8 takes it: without a port (ssh gets that from the ssh config)."""
        user, host, _, query = _split(self.uri)
        return f"ssh-ng://{user}{host}{query}"


_URI = re.compile(r"ssh-ng://(?P<user>[\w.-]+@)?(?P<host>[\w.-]+)(?::(?P<port>\d{1,5}))?(?P<query>\?\S*)?")


def _split(uri: str) -> tuple[str, str, int | None, str]:
    m = _URI.fullmatch(uri)
    if m is None:
        raise ValueError(f"not an ssh-ng:// URI: {uri!r}")
    port = m.group("port")
    return m.group("user") or "", m.group("host"), int(port) if port else None, m.group("query") or ""


def valid_uri(uri: str) -> bool:
    m = _URI.fullmatch(uri)
    return m is not None and (m.group("port") is None or 0 < int(m.group("port")) <= 65535)


def machines(builders: Sequence[Builder]) -> str:
    """Nix's machines file: URI, systems, key, max jobs, speed factor, features,
    mandatory features, host key. The host key field stays "-": Nix 2.8 would write it
    as ``host key`` for port 22 only, so known hosts come from the ssh config."""
    lines = []
    for b in builders:
        features = ",".join(b.features) or "-"
        lines.append(
            f"{b.nix_uri} {','.join(b.systems)} {b.ssh_key} {b.max_jobs} {b.speed_factor} {features} - -"
        )
    return "".join(line + "\n" for line in lines)


def known_hosts(builders: Sequence[Builder]) -> str:
    """A known_hosts file with each builder's host key, in ssh's form for its port."""
    seen: dict[str, None] = {}
    for b in builders:
        where = b.host if b.port in (None, 22) else f"[{b.host}]:{b.port}"
        seen[f"{where} {b.host_key}\n"] = None
    return "".join(seen)


def ssh_config(builders: Sequence[Builder], known_hosts_file: str) -> str:
    """The ssh client configuration Nix's ssh runs with (``-F``): each builder's port,
    its host key and no other, no prompt, no agent or forwarded anything."""
    lines = []
    for host, port in sorted({(b.host, b.port) for b in builders if b.port is not None}):
        lines += [f"Host {host}", f"  Port {port}"]
    lines += [
        "Host *",
        f"  UserKnownHostsFile {known_hosts_file}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  BatchMode yes",
        "  IdentitiesOnly yes",
        "  ForwardAgent no",
        "  ConnectTimeout 10",
        f"  ServerAliveInterval {KEEPALIVE_INTERVAL}",
        f"  ServerAliveCountMax {KEEPALIVE_COUNT}",
    ]
    return "".join(line + "\n" for line in lines)


@dataclass(frozen=True)
class Placement:
    """Where one realisation's builds ran, as its log says: per builder (LOCAL for this
    machine) the derivations it built, and the builders that could not be used, why."""

    built: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)
    last: str | None = None  # the builder of the last derivation built: the host's image

    @property
    def builder(self) -> str:
        return self.last or LOCAL


class Sandbox(Enum):
    """What a probe build on a builder found."""

    ON = "on"  # it saw nothing but its inputs
    OFF = "off"  # it saw the builder machine's own files
    UNKNOWN = "unknown"  # it could not run there (the builder is down or refused it)


@dataclass(frozen=True)
class Probe:
    """A builder's last sandbox probe: when (monotonic seconds), what it found and, for
    UNKNOWN, why."""

    at: float
    sandbox: Sandbox
    error: str = ""


def to_probe(builders: Sequence[Builder], probes: Mapping[str, Probe], now: float) -> list[Builder]:
    """The builders to probe before a build at ``now``: those never probed, and those
    whose last probe could not run, PROBE_RETRY seconds after it. A verdict stands for
    the process, as the local sandbox probe's does."""
    due = []
    for b in builders:
        last = probes.get(b.name)
        if last is None or (last.sandbox is Sandbox.UNKNOWN and now - last.at >= PROBE_RETRY):
            due.append(b)
    return due


def usable(
    builders: Sequence[Builder], probes: Mapping[str, Probe], allow_unsandboxed: bool
) -> tuple[list[Builder], dict[str, str]]:
    """The builders Nix may be given, and why each other one may not: one whose probe
    saw the machine's files builds outside Nix's sandbox, where a package of the config
    repository could reach the network and the builder's files (accepted only with
    ``allow_unsandboxed``, nix.sandbox: false); one not probed yet cannot be trusted."""
    ok: list[Builder] = []
    why: dict[str, str] = {}
    for b in builders:
        probe = probes.get(b.name)
        if probe is None:
            why[b.name] = "its sandbox is not verified yet"
        elif probe.sandbox is Sandbox.ON or (probe.sandbox is Sandbox.OFF and allow_unsandboxed):
            ok.append(b)
        elif probe.sandbox is Sandbox.OFF:
            why[b.name] = (
                "it builds outside Nix's sandbox (a probe build saw the machine's files): "
                "set 'sandbox = true' in its nix.conf"
            )
        else:
            why[b.name] = f"its sandbox could not be verified: {probe.error}"
    return ok, why


_BUILDING = re.compile(r"^building '(?P<drv>/[^']+\.drv)'(?: on '(?P<uri>[^']+)')?\.\.\.$")
_CANNOT = re.compile(r"^cannot build on '(?P<uri>[^']+)': (?P<why>.*)$")
# Lines ssh prints on its way to failing, the part of a refusal worth showing.
_SSH_REASON = re.compile(
    r"^(ssh: .*|Host key verification failed\.|Permission denied.*|No \w+ host key is known.*)$"
)


def placement(log: str, builders: Iterable[Builder]) -> Placement:
    """Read Nix 2.8's build log: "building 'D' on 'URI'..." for a remote build (the
    builder's own "building 'D'..." follows it and is not a local one), "building
    'D'..." alone for a local one, "cannot build on 'URI': ..." for a builder that
    could not be used (preceded by what ssh said)."""
    by_uri = {b.nix_uri: b.name for b in builders}
    built: dict[str, list[str]] = {}
    refused: dict[str, str] = {}
    remote: set[str] = set()
    last: str | None = None
    reason = ""
    for line in (ln.strip() for ln in log.splitlines()):
        if _SSH_REASON.match(line):
            reason = line
            continue
        m = _BUILDING.match(line)
        if m is not None:
            drv, uri = m.group("drv"), m.group("uri")
            if uri is not None:
                # A builder's output reaches this log too: only a configured builder's
                # URI is taken, so a build cannot name a machine that does not exist.
                if uri not in by_uri:
                    continue
                name = by_uri[uri]
                remote.add(drv)
            elif drv in remote:
                continue
            else:
                name = LOCAL
            built.setdefault(name, []).append(drv)
            last = name
            continue
        c = _CANNOT.match(line)
        if c is not None and c.group("uri") in by_uri:
            name = by_uri[c.group("uri")]
            why = c.group("why")
            refused[name] = f"{reason} {why}" if reason else why
            reason = ""
    return Placement(built={k: tuple(v) for k, v in built.items()}, refused=refused, last=last)

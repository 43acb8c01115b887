"""The agent's config file: read and validated, errors naming the file and key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.adapters import fetch
from reconciler.config import ORIGIN_RE, read_yaml
from reconciler.core.formats import Format
from reconciler.core.hosts import NAME_RE
from reconciler.core.schema import check_keys, parse_duration
from reconciler.errors import ConfigError

# The formats the agent can install: those that are one file.
AGENT_FORMATS = (Format.ACI.value, Format.APPIMAGE.value)


@dataclass(frozen=True)
class HealthConfig:
    url: str | None = None
    command: tuple[str, ...] | None = None
    timeout: float = 30.0  # the check must pass within this long after activation
    interval: float = 1.0


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    host: str
    store: str  # URL or absolute directory
    keys: tuple[Path, ...]
    state_dir: Path
    format: str = "appimage"
    poll_interval: float = 60.0
    activate: tuple[str, ...] | None = None
    supervise: bool = False
    health: HealthConfig | None = None
    listen: str | None = None
    metrics_file: Path | None = None
    keep: int = 3
    timeout: float = 60.0
    # Fetch an AppImage update as the blocks the running one lacks (Debian's zsync,
    # http stores); false: always whole.
    zsync: bool = True
    # Install only releases whose SLSA provenance is signed by a pinned key and names
    # exactly their artifacts, host, commit and derivation.
    require_provenance: bool = False
    # The transparency log (reconciler.agent.logcheck): a release must be in it.
    require_log: bool = False
    log_witnesses: tuple[Path, ...] = ()  # each must co-sign the log's checkpoint
    log_origin: str | None = None  # None: the origin of the first checkpoint trusted


AGENT_KEYS = frozenset(
    {
        "host",
        "store",
        "keys",
        "state_dir",
        "format",
        "poll_interval",
        "activate",
        "supervise",
        "health",
        "listen",
        "metrics_file",
        "keep",
        "timeout",
        "zsync",
        "require_provenance",
        "require_log",
        "log_witnesses",
        "log_origin",
    }
)
HEALTH_KEYS = frozenset({"url", "command", "timeout", "interval"})


def load_agent_config(path: Path) -> AgentConfig:
    """Read and validate an agent config; errors name the file and key."""
    p = str(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(p, "", "must be a mapping")
    check_keys(p, "", data, AGENT_KEYS)
    base = path.resolve().parent

    def path_of(key: str, v: Any) -> Path:
        if not isinstance(v, str) or not v:
            raise ConfigError(p, key, "must be a path")
        q = Path(v).expanduser()
        return q if q.is_absolute() else base / q

    def argv(key: str, v: Any) -> tuple[str, ...] | None:
        if v is None:
            return None
        if isinstance(v, str) and v:
            return ("/bin/sh", "-c", v)
        if isinstance(v, list) and v and all(isinstance(a, str) for a in v):
            return tuple(v)
        raise ConfigError(p, key, "must be a command string or a non-empty list of strings")

    host = data.get("host")
    if not isinstance(host, str) or not NAME_RE.fullmatch(host):
        raise ConfigError(p, "host", f"must be a host name ({NAME_RE.pattern})")
    store = data.get("store")
    if not isinstance(store, str) or not store:
        raise ConfigError(p, "store", "is required: a URL or a directory")
    if not fetch.is_url(store):
        store = str(path_of("store", store))
    keys = data.get("keys")
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or not keys:
        raise ConfigError(p, "keys", "must list the publisher's public key file(s): trust is pinned here")
    fmt = data.get("format", "appimage")
    if fmt not in AGENT_FORMATS:
        # A thin ACI or an OCI image is several blobs; the agent installs one file.
        raise ConfigError(p, "format", f"must be one of {', '.join(AGENT_FORMATS)}")
    health = data.get("health")
    health_cfg = None
    if health is not None:
        if not isinstance(health, dict):
            raise ConfigError(p, "health", "must be a mapping")
        check_keys(p, "health", health, HEALTH_KEYS)
        url, command = health.get("url"), argv("health.command", health.get("command"))
        if (url is None) == (command is None):
            raise ConfigError(p, "health", "needs exactly one of url or command")
        if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise ConfigError(p, "health.url", "must be an http(s) URL")
        health_cfg = HealthConfig(
            url=url,
            command=command,
            timeout=_seconds(p, "health.timeout", health.get("timeout", "30s")),
            interval=_seconds(p, "health.interval", health.get("interval", "1s")),
        )
    keep = data.get("keep", 3)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 2:
        raise ConfigError(
            p, "keep", "must be an integer of at least 2 (the current and the previous release)"
        )
    supervise = data.get("supervise", False)
    if not isinstance(supervise, bool):
        raise ConfigError(p, "supervise", "must be true or false")
    if supervise and fmt != "appimage":
        raise ConfigError(p, "supervise", "runs an AppImage; set format: appimage")
    if supervise and data.get("activate") is not None:
        # Two ways to run the release would both start it: say which one runs it.
        raise ConfigError(
            p,
            "activate",
            "cannot be used with supervise: true; the agent runs the AppImage itself with "
            "supervise, and activate is for a release something else runs (a service manager)",
        )
    zsync = data.get("zsync", True)
    if not isinstance(zsync, bool):
        raise ConfigError(p, "zsync", "must be true or false")
    require_provenance = data.get("require_provenance", False)
    if not isinstance(require_provenance, bool):
        raise ConfigError(p, "require_provenance", "must be true or false")
    listen = data.get("listen")
    if listen is not None and not isinstance(listen, str):
        raise ConfigError(p, "listen", "must be HOST:PORT")
    mf = data.get("metrics_file")
    require_log = data.get("require_log", False)
    if not isinstance(require_log, bool):
        raise ConfigError(p, "require_log", "must be true or false")
    witnesses = data.get("log_witnesses", [])
    if isinstance(witnesses, str):
        witnesses = [witnesses]
    if not isinstance(witnesses, list):
        raise ConfigError(p, "log_witnesses", "must list the witnesses' public key files")
    if witnesses and not require_log:
        raise ConfigError(p, "log_witnesses", "needs require_log: true (the log is checked only then)")
    origin = data.get("log_origin")
    if origin is not None and (not isinstance(origin, str) or not ORIGIN_RE.fullmatch(origin)):
        raise ConfigError(p, "log_origin", "must be a log's origin (printable ASCII without spaces or '+')")
    return AgentConfig(
        path=path.resolve(),
        host=host,
        store=store,
        keys=tuple(path_of("keys", k) for k in keys),
        state_dir=path_of("state_dir", data.get("state_dir")),
        format=fmt,
        poll_interval=_seconds(p, "poll_interval", data.get("poll_interval", "60s")),
        activate=argv("activate", data.get("activate")),
        supervise=supervise,
        health=health_cfg,
        listen=listen,
        metrics_file=path_of("metrics_file", mf) if mf is not None else None,
        keep=keep,
        timeout=_seconds(p, "timeout", data.get("timeout", "60s")),
        zsync=zsync,
        require_provenance=require_provenance,
        require_log=require_log,
        log_witnesses=tuple(path_of("log_witnesses", w) for w in witnesses),
        log_origin=origin,
    )


def _seconds(path: str, key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return parse_duration(path, key, value).total_seconds()

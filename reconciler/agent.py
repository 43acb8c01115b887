"""The host side: pull this host's signed releases, verify, install, switch, check, roll back.

One poll reads ``hosts/<host>/latest.json`` with a conditional GET (an idle poll
downloads nothing), learns the newest version from it, then reads and verifies the
immutable signed ``releases/<N>.json`` against the pinned keys only. The release
must name this host, be newer than what runs (no rollback), and not be expired (no
freeze); the artifact must have the size, sha256 and signature the release says
(no tampering, no endless data). It is installed beside the old release, the
``current`` symlink is flipped by rename, the app is activated and health-checked,
and on failure ``current`` flips back and the old release is activated again.

State directory:
    releases/<N>/<artifact>, releases/<N>/release.json   installed releases
    current -> releases/<N>                              what runs
    state.json                                          version, previous, failed, validators
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile

from reconciler import log
from reconciler.adapters import fetch
from reconciler.adapters.gpg import Verifier
from reconciler.adapters.http import Server
from reconciler.config import parse_duration, read_yaml
from reconciler.core.hosts import FORMATS, NAME_RE, check_keys
from reconciler.core.layout import latest_path, release_path
from reconciler.core.release import Release, parse_release
from reconciler.errors import ConfigError, FetchError, ReconcilerError, VerificationError
from reconciler.verify import METADATA_LIMIT, SIGNATURE_LIMIT, read_keys, verify_blob

STOP_TIMEOUT = 30.0
# An app that exits sooner than this after its start counts as crashing: its restarts
# back off, doubling from a second up to a minute.
STABLE_AFTER = 60.0
MAX_RESTART_DELAY = 60.0
# A release whose download keeps failing is tried at polls 1, 2, 4, 8 ... apart, at
# most this many apart: a tampered or unreachable blob is not fetched every poll.
MAX_POLLS_BETWEEN_TRIES = 64


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
    if fmt not in FORMATS:
        raise ConfigError(p, "format", f"must be one of {', '.join(FORMATS)}")
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
    listen = data.get("listen")
    if listen is not None and not isinstance(listen, str):
        raise ConfigError(p, "listen", "must be HOST:PORT")
    mf = data.get("metrics_file")
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
    )


def _seconds(path: str, key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return parse_duration(path, key, value).total_seconds()


# -- the decision, pure --------------------------------------------------------


class RefusalError(ReconcilerError):
    """A release this agent will not install; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def check_release(release: Release, host: str, running: int, fmt: str, now: datetime) -> None:
    """Raise :class:`RefusalError` unless ``release`` may replace version ``running``."""
    if release.host != host:
        raise RefusalError("wrong-host", f"release is for host {release.host!r}, this is {host!r}")
    if release.version <= running:
        raise RefusalError("rollback", f"version {release.version} is not newer than the running {running}")
    if release.expires <= now:
        raise RefusalError("expired", f"release {release.version} expired at {release.expires.isoformat()}")
    if release.artifact(fmt) is None:
        raise RefusalError("no-artifact", f"release {release.version} has no {fmt} artifact")


def peek_version(data: bytes, source: str) -> int:
    """The version an unverified ``latest.json`` claims: only a hint of what to verify."""
    try:
        version = json.loads(data).get("version")
    except (ValueError, AttributeError, RecursionError):
        version = None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RefusalError("malformed", f"{source}: no valid version")
    return version


# -- state, metrics, the app -----------------------------------------------------


@dataclass
class AgentState:
    version: int = 0
    previous: int = 0
    failed: list[int] = field(default_factory=list)  # versions that failed their health check
    validators: fetch.Validators = field(default_factory=fetch.Validators)
    # The version whose download failed ``retry_failures`` times in a row, and how
    # many polls to let pass before the next try.
    retry_version: int = 0
    retry_failures: int = 0
    retry_skip: int = 0

    def download_failed(self, version: int) -> None:
        """Count a failed download of ``version`` and space the next try out."""
        if version != self.retry_version:
            self.retry_version, self.retry_failures = version, 0
        self.retry_failures += 1
        self.retry_skip = min(2 ** (self.retry_failures - 1), MAX_POLLS_BETWEEN_TRIES) - 1

    def defer(self, version: int) -> bool:
        """Whether this poll lets ``version`` be (one poll of its backoff used up)."""
        if version != self.retry_version or self.retry_skip <= 0:
            return False
        self.retry_skip -= 1
        return True

    @classmethod
    def load(cls, path: Path) -> AgentState:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ReconcilerError(f"{path}: unreadable agent state ({exc})") from None
        return cls(
            version=int(doc.get("version", 0)),
            previous=int(doc.get("previous", 0)),
            failed=[int(v) for v in doc.get("failed", [])],
            validators=fetch.Validators(**doc.get("validators", {})),
            retry_version=int(doc.get("retry_version", 0)),
            retry_failures=int(doc.get("retry_failures", 0)),
            retry_skip=int(doc.get("retry_skip", 0)),
        )

    def save(self, path: Path) -> None:
        doc = {
            "version": self.version,
            "previous": self.previous,
            "failed": self.failed[-20:],
            "validators": self.validators.to_json(),
            "retry_version": self.retry_version,
            "retry_failures": self.retry_failures,
            "retry_skip": self.retry_skip,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.polls = Counter(
            "reconciler_agent_polls", "Polls of the store by result.", ["result"], registry=r
        )
        self.refusals = Counter(
            "reconciler_agent_refusals", "Releases refused, by reason.", ["reason"], registry=r
        )
        self.updates = Counter("reconciler_agent_updates", "Releases switched to and healthy.", registry=r)
        self.rollbacks = Counter(
            "reconciler_agent_rollbacks",
            "Releases rolled back after a failed activation or health check.",
            registry=r,
        )
        self.running_version = Gauge(
            "reconciler_agent_running_version", "Release version this host runs.", ["host"], registry=r
        )
        self.last_poll = Gauge(
            "reconciler_agent_last_poll_timestamp_seconds",
            "Unix time of the last completed poll.",
            registry=r,
        )
        self.downloaded = Counter(
            "reconciler_agent_downloaded_bytes", "Bytes of metadata and artifacts downloaded.", registry=r
        )
        for result in ("idle", "current", "deferred", "updated", "refused", "rolled-back", "error"):
            self.polls.labels(result)


class App:
    """The host's AppImage, run by the agent itself (``supervise: true``)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.crashes = 0  # exits in a row, each soon after its start
        self.restart_at = 0.0

    def start(self, artifact: Path) -> None:
        self.proc = subprocess.Popen([str(artifact)], cwd=artifact.parent, start_new_session=True)
        self.started = time.monotonic()
        log.event("app_started", host=self.host, artifact=str(artifact), pid=self.proc.pid)

    def exited(self) -> None:
        """Note that the app exited on its own; restarts back off while it keeps crashing."""
        assert self.proc is not None
        now = time.monotonic()
        self.crashes = self.crashes + 1 if now - self.started < STABLE_AFTER else 1
        delay = min(2.0 ** (self.crashes - 1), MAX_RESTART_DELAY)
        self.restart_at = now + delay
        status = self.proc.returncode
        log.event("app_exited", logging.WARNING, host=self.host, status=status, restart_in=round(delay))
        self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # The runtime forwards TERM to AppRun, which stops every service.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        log.event("app_stopped", host=self.host, pid=self.proc.pid, status=self.proc.returncode)
        self.proc = None


# -- the agent -------------------------------------------------------------------


class Agent:
    def __init__(
        self, cfg: AgentConfig, metrics: AgentMetrics | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics or AgentMetrics()
        self.clock = clock
        self.releases = cfg.state_dir / "releases"
        self.current = cfg.state_dir / "current"
        self.releases.mkdir(parents=True, exist_ok=True)
        self.state_file = cfg.state_dir / "state.json"
        self.state = AgentState.load(self.state_file)
        self.app = App(cfg.host) if cfg.supervise else None
        self._keys = read_keys(list(cfg.keys))
        if self.state.version:
            self.metrics.running_version.labels(cfg.host).set(self.state.version)

    def _url(self, key: str) -> str:
        return fetch.join(self.cfg.store, key)

    def _count(self, n: int) -> None:
        self.metrics.downloaded.inc(n)

    def artifact(self, version: int) -> Path:
        """The installed artifact of ``version``."""
        d = self.releases / str(version)
        release = parse_release((d / "release.json").read_bytes(), str(d / "release.json"))
        art = release.artifact(self.cfg.format)
        assert art is not None
        return d / art.name

    # -- one poll ---------------------------------------------------------------

    def poll(self) -> str:
        """Look for a newer release and switch to it; return the poll's result."""
        try:
            result = self._poll()
        except RefusalError as exc:
            result = "refused"
            self.metrics.refusals.labels(exc.reason).inc()
            log.event("agent_refused", logging.WARNING, host=self.cfg.host, reason=exc.reason, error=str(exc))
        except (FetchError, VerificationError, OSError) as exc:
            # Nothing is switched; the same update is tried again at the next poll.
            result = "error"
            log.event("agent_poll_failed", logging.ERROR, host=self.cfg.host, error=str(exc))
        self.metrics.polls.labels(result).inc()
        self.metrics.last_poll.set(self.clock())
        if self.cfg.metrics_file is not None:
            write_to_textfile(str(self.cfg.metrics_file), self.metrics.registry)
        return result

    def _poll(self) -> str:
        latest_key = latest_path(self.cfg.host)
        got = fetch.get(
            self._url(latest_key), METADATA_LIMIT, self.state.validators, self.cfg.timeout, self._count
        )
        if got is None:
            return "idle"
        version = peek_version(got.data, latest_key)
        if version == self.state.version or version in self.state.failed:
            self._remember(got.validators)
            return "current"
        if self.state.defer(version):
            self.state.save(self.state_file)
            log.event(
                "agent_deferred",
                host=self.cfg.host,
                version=version,
                failures=self.state.retry_failures,
                polls_left=self.state.retry_skip,
            )
            return "deferred"
        try:
            release = self._verified_release(version)
            check_release(release, self.cfg.host, self.state.version, self.cfg.format, self._now())
        except RefusalError:
            # A refusal is final for this latest.json; a new one gets a new look.
            self._remember(got.validators)
            raise
        try:
            self._install(release)
        except (RefusalError, FetchError, VerificationError, OSError):
            self.state.download_failed(version)
            self.state.save(self.state_file)
            raise
        result = self._switch(release.version)
        self._remember(got.validators)
        return result

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _remember(self, validators: fetch.Validators) -> None:
        self.state.validators = validators
        self.state.save(self.state_file)

    def _verified_release(self, version: int) -> Release:
        """releases/<N>.json checked against the pinned keys only (never the store's)."""
        key = release_path(self.cfg.host, version)
        try:
            sig = fetch.get(
                self._url(key + ".asc"), SIGNATURE_LIMIT, timeout=self.cfg.timeout, count=self._count
            )
        except FetchError as exc:
            raise RefusalError("unsigned", f"{key}: no signature ({exc})") from None
        meta = fetch.get(self._url(key), METADATA_LIMIT, timeout=self.cfg.timeout, count=self._count)
        assert sig is not None and meta is not None
        with Verifier(self._keys) as verifier:
            try:
                verifier.verify_bytes(meta.data, sig.data, key)
            except VerificationError as exc:
                raise RefusalError("bad-signature", str(exc)) from None
        try:
            return parse_release(meta.data, key)
        except VerificationError as exc:
            raise RefusalError("malformed", str(exc)) from None

    def _install(self, release: Release) -> None:
        """Download, check and unpack ``release`` into releases/<N>, beside the old one."""
        art = release.artifact(self.cfg.format)
        assert art is not None
        final = self.releases / str(release.version)
        work = Path(tempfile.mkdtemp(prefix=f".{release.version}.", dir=self.releases))
        try:
            with Verifier(self._keys) as verifier:
                try:
                    verify_blob(verifier, self._url(art.blob), work / art.name, art.size, art.sha256)
                except VerificationError as exc:
                    raise RefusalError("tampered", str(exc)) from None
            (work / art.name).chmod(0o555)
            (work / "release.json").write_bytes(release.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log.event("agent_installed", host=self.cfg.host, version=release.version, artifact=art.name)

    def _point_current(self, version: int) -> None:
        """Flip ``current`` to releases/<version> with one rename: never missing, never half."""
        tmp = self.current.with_name("current.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("releases") / str(version))
        os.replace(tmp, self.current)

    def _switch(self, version: int) -> str:
        old = self.state.version
        self._point_current(version)
        failure = self._activate(version)
        if failure is None:
            self.state.previous, self.state.version = old, version
            self.state.save(self.state_file)
            self.metrics.updates.inc()
            self.metrics.running_version.labels(self.cfg.host).set(version)
            log.event("agent_switched", host=self.cfg.host, version=version, previous=old)
            self._prune()
            return "updated"
        self.state.failed.append(version)
        self.metrics.rollbacks.inc()
        log.event(
            "agent_rolled_back",
            logging.ERROR,
            host=self.cfg.host,
            version=version,
            back_to=old,
            reason=failure,
        )
        if old:
            self._point_current(old)
            again = self._activate(old)
            if again is not None:
                log.event(
                    "agent_rollback_unhealthy", logging.ERROR, host=self.cfg.host, version=old, reason=again
                )
        else:
            self.current.unlink(missing_ok=True)
            if self.app is not None:
                self.app.stop()
        self.state.save(self.state_file)
        return "rolled-back"

    def _activate(self, version: int) -> str | None:
        """Start ``version`` and check it; the reason it is unhealthy, or None."""
        if self.app is not None:
            self.app.stop()
            self.app.crashes = 0
            self.app.start(self.current / self.artifact(version).name)
        if self.cfg.activate is not None:
            env = {
                **os.environ,
                "RECONCILER_VERSION": str(version),
                "RECONCILER_RELEASE_DIR": str(self.releases / str(version)),
                "RECONCILER_ARTIFACT": str(self.current / self.artifact(version).name),
            }
            try:
                proc = subprocess.run(
                    self.cfg.activate, env=env, capture_output=True, text=True, timeout=self.cfg.timeout
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"activation command failed: {exc}"
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                return f"activation command exited {proc.returncode}: {tail[0]}"
        return self._healthy()

    def _healthy(self) -> str | None:
        h = self.cfg.health
        if h is None:
            return None
        deadline = time.monotonic() + h.timeout
        last = "not checked"
        while True:
            if self.app is not None and not self.app.running():
                return "the app exited"
            last = _probe(h)
            if not last:
                return None
            if time.monotonic() + h.interval > deadline:
                return f"health check failed for {h.timeout:g}s: {last}"
            time.sleep(h.interval)

    def _prune(self) -> None:
        """Keep the newest ``keep`` releases, and always the current and previous ones."""
        installed = sorted(int(d.name) for d in self.releases.iterdir() if d.name.isdigit())
        keep = set(installed[-self.cfg.keep :]) | {self.state.version, self.state.previous}
        for v in installed:
            if v not in keep:
                shutil.rmtree(self.releases / str(v), ignore_errors=True)

    # -- the long-running agent -------------------------------------------------

    def run(self, stopping: threading.Event) -> None:
        """Poll every interval until ``stopping``; with ``supervise``, keep the app running."""
        server = None
        if self.cfg.listen is not None:
            server = Server(self.cfg.listen, self.metrics.registry, lambda: (True, "ok"), self._ready)
            server.start()
        log.event("agent_start", host=self.cfg.host, store=self.cfg.store, version=self.state.version)
        try:
            next_poll = 0.0
            while not stopping.is_set():
                if self.app is not None and self.state.version and not self.app.running():
                    if self.app.proc is not None:
                        self.app.exited()
                    if time.monotonic() >= self.app.restart_at:
                        self.app.start(self.current / self.artifact(self.state.version).name)
                if time.monotonic() >= next_poll:
                    self.poll()
                    next_poll = time.monotonic() + self.cfg.poll_interval
                stopping.wait(1.0)
        finally:
            if self.app is not None:
                self.app.stop()
            if server is not None:
                server.stop()
            log.event("agent_stop", host=self.cfg.host)

    def _ready(self) -> tuple[bool, str]:
        return (True, "ok") if self.state.version else (False, "no release installed yet")


def _probe(h: HealthConfig) -> str:
    """One health probe: empty when healthy, else why not."""
    if h.url is not None:
        try:
            with urllib.request.urlopen(h.url, timeout=min(h.timeout, 5.0)) as r:
                return "" if 200 <= r.status < 300 else f"{h.url} answered {r.status}"
        except OSError as exc:
            return f"{h.url}: {getattr(exc, 'reason', exc)}"
    assert h.command is not None
    try:
        proc = subprocess.run(h.command, capture_output=True, timeout=min(h.timeout, 30.0))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{h.command[0]}: {exc}"
    return "" if proc.returncode == 0 else f"{' '.join(h.command)} exited {proc.returncode}"

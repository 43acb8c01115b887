"""Unit tests of the agent's updater: whole polls against an in-memory store, a fake clock,
signatures that are checked without gpg and a health probe that answers as told. No
network, no process, no sleep."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

import pytest

from reconciler.adapters.fetch import Fetched, Validators
from reconciler.agent.config import AgentConfig, HealthConfig
from reconciler.agent.state import AgentState
from reconciler.agent.updater import Agent
from reconciler.core.layout import latest_path, release_path
from reconciler.core.release import Artifact, Release, new_release
from reconciler.errors import FetchError, FetchKind, VerificationError

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LIFETIME = timedelta(days=7)
PUBLISHER = b"-----BEGIN PGP PUBLIC KEY BLOCK----- publisher"
ATTACKER = b"-----BEGIN PGP PUBLIC KEY BLOCK----- attacker"
ROOT = "mem://store"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sign(key: bytes, data: bytes) -> bytes:
    """A stand-in detached signature: who signed, and the digest of what."""
    return b"signed|" + key + b"|" + sha(data).encode()


class FakeChecker:
    """Checks stand-in signatures against the keys it was made from, as gpg.Verifier does."""

    made: list[list[bytes]]  # the keys of every checker made, per test

    def __init__(self, keys: Sequence[bytes]) -> None:
        self.keys = list(keys)
        FakeChecker.made.append(self.keys)

    def verify_bytes(self, data: bytes, signature: bytes, what: str) -> str:
        parts = signature.split(b"|")
        if len(parts) != 3 or parts[0] != b"signed":
            raise VerificationError(f"{what}: bad signature (not a signature)")
        if parts[1] not in self.keys:
            raise VerificationError(f"{what}: bad signature (signed by a key that is not trusted)")
        if parts[2] != sha(data).encode():
            raise VerificationError(f"{what}: bad signature (BAD)")
        return sha(parts[1])[:40].upper()

    def verify(self, data_path: Path, signature: bytes, what: str) -> str:
        return self.verify_bytes(data_path.read_bytes(), signature, what)

    def __enter__(self) -> FakeChecker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /
    ) -> None:
        pass


class MemoryStore:
    """A store in a dict, read as the HTTP fetcher reads: bounded, conditional by ETag."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.requests: list[str] = []
        self._writes = 0

    def put(self, key: str, data: bytes) -> None:
        self._writes += 1
        self.objects[key] = data
        self.etags[key] = f'"{self._writes}"'

    def touch(self, key: str) -> None:
        """Write ``key`` again, same bytes: a new ETag, as a republished object has."""
        self.put(key, self.objects[key])

    def _read(self, target: str) -> tuple[str, bytes]:
        assert target.startswith(ROOT + "/"), target
        key = target[len(ROOT) + 1 :]
        self.requests.append(key)
        if key not in self.objects:
            raise FetchError(
                f"cannot fetch {target}: HTTP 404 Not Found", kind=FetchKind.HTTP_STATUS, status=404
            )
        return key, self.objects[key]

    def get(
        self,
        target: str,
        limit: int,
        since: Validators | None = None,
        timeout: float = 60.0,
        count: Callable[[int], None] = lambda n: None,
    ) -> Fetched | None:
        key, data = self._read(target)
        if since is not None and since.etag == self.etags[key]:
            return None
        count(min(len(data), limit + 1))
        if len(data) > limit:
            raise FetchError(f"{target}: larger than the {limit} bytes expected", kind=FetchKind.TOO_LARGE)
        return Fetched(data, Validators(etag=self.etags[key]))

    def download(
        self,
        target: str,
        dest: Path,
        size: int,
        timeout: float = 60.0,
        count: Callable[[int], None] = lambda n: None,
    ) -> str:
        _, data = self._read(target)
        count(min(len(data), size + 1))
        if len(data) > size:
            raise FetchError(f"{target}: larger than the {size} bytes expected", kind=FetchKind.TOO_LARGE)
        dest.write_bytes(data)
        if len(data) != size:
            raise FetchError(
                f"{target}: got {len(data)} bytes, expected {size} (truncated)", kind=FetchKind.TRUNCATED
            )
        return sha(data)


class FakeClock:
    def __init__(self) -> None:
        self.wall = NOW
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)


@dataclass
class Probe:
    """The health probe: a version is unhealthy while it is in ``unhealthy``."""

    current: Path
    unhealthy: set[int] = field(default_factory=set)
    probed: list[int] = field(default_factory=list)

    def __call__(self, h: HealthConfig) -> str:
        version = int(os.readlink(self.current).rsplit("/", 1)[1])
        self.probed.append(version)
        return f"version {version} answers 500" if version in self.unhealthy else ""


@dataclass
class Host:
    agent: Agent
    store: MemoryStore
    clock: FakeClock
    probe: Probe
    tmp: Path

    def publish(
        self,
        version: int,
        key: bytes = PUBLISHER,
        host: str = "web-1",
        blob: bytes | None = None,
        latest: bool = True,
    ) -> Release:
        """What the daemon's publish does, in its order, signed with ``key``."""
        blob = blob if blob is not None else f"AppImage of {host} {version}".encode()
        art = Artifact("appimage", f"{host}-{version}-x86_64.AppImage", len(blob), sha(blob))
        r = new_release(host, version, "c" * 40, "/nix/store/x.drv", (art,), self.clock.now(), LIFETIME)
        self.store.put(art.blob, blob)
        self.store.put(art.blob + ".asc", sign(key, blob))
        meta = r.to_json()
        self.store.put(release_path(host, version) + ".asc", sign(key, meta))
        self.store.put(release_path(host, version), meta)
        if latest:
            self.point_latest(version, key, meta)
        return r

    def point_latest(self, version: int, key: bytes = PUBLISHER, meta: bytes | None = None) -> None:
        meta = meta or json.dumps({"version": version}).encode()
        self.store.put(latest_path("web-1") + ".asc", sign(key, meta))
        self.store.put(latest_path("web-1"), meta)

    def poll(self) -> str:
        """One poll; what it requested is in ``self.requested``."""
        del self.store.requests[:]
        return str(self.agent.poll())

    @property
    def requested(self) -> list[str]:
        return list(self.store.requests)

    def running(self) -> int:
        return int(os.readlink(self.agent.current).rsplit("/", 1)[1])

    def installed(self) -> list[int]:
        return sorted(int(p.name) for p in self.agent.releases.iterdir() if p.name.isdigit())

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.agent.metrics.registry.get_sample_value(name, labels or {}) or 0.0

    def restart(self, **cfg: object) -> None:
        """A new agent process on the same state directory (as `--once` under a timer)."""
        self.agent = make_agent(self.tmp, self.store, self.clock, self.probe, **cfg)


def make_agent(tmp: Path, store: MemoryStore, clock: FakeClock, probe: Probe, **cfg: object) -> Agent:
    key = tmp / "publisher.asc"
    key.write_bytes(PUBLISHER)
    config = AgentConfig(
        path=tmp / "agent.yaml",
        host="web-1",
        store=ROOT,
        keys=(key,),
        state_dir=tmp / "agent",
        health=HealthConfig(command=("probe",), timeout=5.0, interval=1.0),
        **cfg,  # type: ignore[arg-type]
    )
    return Agent(config, fetcher=store, clock=clock, checker=FakeChecker, probe=probe)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    FakeChecker.made = []
    store, clock = MemoryStore(), FakeClock()
    probe = Probe(tmp_path / "agent" / "current")
    # The store also serves the publisher's key, as the daemon publishes it: for people.
    store.put("keys/publisher.asc", PUBLISHER)
    yield Host(make_agent(tmp_path, store, clock, probe), store, clock, probe, tmp_path)


@pytest.fixture
def on_v1(host: Host) -> Host:
    """An agent that installed and runs version 1."""
    host.publish(1)
    assert host.poll() == "updated"
    return host


# -- updates -------------------------------------------------------------------------------


def test_first_poll_installs_switches_and_records(host: Host) -> None:
    r = host.publish(1)
    assert host.poll() == "updated"
    art = r.artifacts[0]
    assert host.requested == [
        "hosts/web-1/latest.json",
        "hosts/web-1/releases/1.json.asc",
        "hosts/web-1/releases/1.json",
        art.blob,
        art.blob + ".asc",
    ]
    assert host.running() == 1
    assert (host.agent.current / art.name).read_bytes() == b"AppImage of web-1 1"
    assert (host.agent.current / art.name).stat().st_mode & 0o777 == 0o555
    assert AgentState.load(host.agent.state_file).version == 1
    assert host.metric("reconciler_agent_running_version", {"host": "web-1"}) == 1
    assert host.metric("reconciler_agent_polls_total", {"result": "updated"}) == 1
    # Every byte read counts, the artifact's too.
    served = sum(len(host.store.objects[k]) for k in host.requested)
    assert host.metric("reconciler_agent_downloaded_bytes_total") == served
    assert host.metric("reconciler_agent_last_poll_timestamp_seconds") == host.clock.now().timestamp()


def test_an_unchanged_latest_is_one_request(on_v1: Host) -> None:
    assert on_v1.poll() == "idle"
    assert on_v1.requested == ["hosts/web-1/latest.json"]


def test_a_republished_latest_naming_what_runs_is_current(on_v1: Host) -> None:
    on_v1.store.touch("hosts/web-1/latest.json")
    assert on_v1.poll() == "current"
    assert on_v1.requested == ["hosts/web-1/latest.json"]
    assert on_v1.poll() == "idle"


def test_update_keeps_the_previous_release(on_v1: Host) -> None:
    on_v1.publish(2)
    assert on_v1.poll() == "updated"
    state = AgentState.load(on_v1.agent.state_file)
    assert (state.version, state.previous) == (2, 1)
    assert on_v1.installed() == [1, 2] and on_v1.running() == 2


def test_the_first_release_failing_its_check_leaves_nothing_current(host: Host) -> None:
    host.publish(1)
    host.probe.unhealthy.add(1)
    assert host.poll() == "rolled-back"
    assert not host.agent.current.exists()
    assert AgentState.load(host.agent.state_file).version == 0


def test_the_health_check_waits_on_the_clock(on_v1: Host) -> None:
    on_v1.publish(2)
    on_v1.probe.unhealthy.add(2)
    start = on_v1.clock.monotonic()
    assert on_v1.poll() == "rolled-back"
    # Probed every second for the check's 5 s, then version 1 once, healthy again.
    assert on_v1.probe.probed == [1, 2, 2, 2, 2, 2, 2, 1]
    assert on_v1.clock.monotonic() - start == 5.0


# -- a failed version is never retried -----------------------------------------------------


def test_a_version_that_failed_its_health_check_is_never_retried(on_v1: Host) -> None:
    on_v1.publish(2)
    on_v1.probe.unhealthy.add(2)
    assert on_v1.poll() == "rolled-back"
    assert on_v1.running() == 1
    assert on_v1.metric("reconciler_agent_rollbacks_total") == 1
    # The store keeps naming version 2, republished so that the poll reads it.
    for agent in ("the same agent", "a restarted agent"):
        if agent == "a restarted agent":
            on_v1.restart()
        probed = len(on_v1.probe.probed)
        on_v1.store.touch("hosts/web-1/latest.json")
        assert on_v1.poll() == "current", agent
        assert on_v1.requested == ["hosts/web-1/latest.json"], agent
        assert len(on_v1.probe.probed) == probed, f"{agent} activated a version again"
        assert on_v1.running() == 1
    # The next version is taken.
    on_v1.publish(3)
    assert on_v1.poll() == "updated" and on_v1.running() == 3


def test_a_failed_version_behind_another_number_is_refused(on_v1: Host) -> None:
    on_v1.publish(2)
    on_v1.probe.unhealthy.add(2)
    assert on_v1.poll() == "rolled-back"
    # latest.json names 3, and releases/3.json is the genuine, signed release 2.
    for suffix in ("", ".asc"):
        on_v1.store.put(
            release_path("web-1", 3) + suffix, on_v1.store.objects[release_path("web-1", 2) + suffix]
        )
    on_v1.point_latest(3)
    assert on_v1.poll() == "refused"
    assert on_v1.metric("reconciler_agent_refusals_total", {"reason": "failed-before"}) == 1
    assert on_v1.running() == 1 and on_v1.probe.probed.count(2) == 6


# -- refusals ----------------------------------------------------------------------------


def attack_unsigned(h: Host) -> None:
    h.publish(2)
    del h.store.objects["hosts/web-1/releases/2.json.asc"]


def attack_other_key(h: Host) -> None:
    h.publish(2, key=ATTACKER)


def attack_key_in_store(h: Host) -> None:
    # Whoever controls the store serves their own key as the publisher's and signs with it.
    h.store.put("keys/publisher.asc", ATTACKER)
    h.publish(2, key=ATTACKER)


def attack_changed_after_signing(h: Host) -> None:
    h.publish(2)
    meta = h.store.objects["hosts/web-1/releases/2.json"]
    h.store.put("hosts/web-1/releases/2.json", meta.replace(b'"expires": "', b'"expires": "2'))


def attack_malformed(h: Host) -> None:
    h.publish(2)
    meta = b'{"schema": "reconciler.release/v1", "version": 2}'
    h.store.put("hosts/web-1/releases/2.json", meta)
    h.store.put("hosts/web-1/releases/2.json.asc", sign(PUBLISHER, meta))


def resign_release(h: Host, version: int, change: Callable[[bytes], bytes]) -> None:
    """Change releases/<version>.json and sign it again with the publisher's key: a
    malformed document the publisher's key vouches for."""
    key = release_path("web-1", version)
    meta = change(h.store.objects[key])
    h.store.put(key, meta)
    h.store.put(key + ".asc", sign(PUBLISHER, meta))


def attack_signed_nul_in_name(h: Host) -> None:
    h.publish(2)
    resign_release(h, 2, lambda meta: meta.replace(b'.AppImage"', b'.AppImage\\u0000"'))


def attack_signed_repeated_key(h: Host) -> None:
    h.publish(2)
    resign_release(h, 2, lambda meta: meta.replace(b'"host": "web-1"', b'"host": "web-2", "host": "web-1"'))


def attack_other_host(h: Host) -> None:
    h.publish(2, host="web-2", latest=False)
    for suffix in ("", ".asc"):
        h.store.put(
            "hosts/web-1/releases/2.json" + suffix, h.store.objects["hosts/web-2/releases/2.json" + suffix]
        )
    h.point_latest(2)


def attack_replay(h: Host) -> None:
    h.publish(2)
    assert h.poll() == "updated"
    h.point_latest(1)  # the genuine, signed release 1 again


def attack_freeze(h: Host) -> None:
    r = h.publish(2)
    h.clock.wall = r.expires


def attack_tampered_blob(h: Host) -> None:
    r = h.publish(2)
    blob = bytearray(h.store.objects[r.artifacts[0].blob])
    blob[3] ^= 1
    h.store.put(r.artifacts[0].blob, bytes(blob))


def attack_blob_signed_by_another_key(h: Host) -> None:
    r = h.publish(2)
    blob = h.store.objects[r.artifacts[0].blob]
    h.store.put(r.artifacts[0].blob + ".asc", sign(ATTACKER, blob))


ATTACKS: list[tuple[Callable[[Host], None], str, str]] = [
    (attack_unsigned, "unsigned", "releases/2.json.asc: HTTP 404"),
    (attack_other_key, "bad-signature", "signed by a key that is not trusted"),
    (attack_key_in_store, "bad-signature", "signed by a key that is not trusted"),
    (attack_changed_after_signing, "bad-signature", "bad signature (BAD)"),
    (attack_malformed, "malformed", "releases/2.json: host: must be a str"),
    (attack_signed_nul_in_name, "malformed", "releases/2.json: artifacts[0].name: must be a plain file name"),
    (attack_signed_repeated_key, "malformed", "releases/2.json: key 'host' appears more than once"),
    (attack_other_host, "wrong-host", "release is for host 'web-2', this is 'web-1'"),
    (attack_replay, "rollback", "version 1 is not newer than the running 2"),
    (attack_freeze, "expired", "release 2 expired at"),
    (attack_tampered_blob, "tampered", "release says"),
    (attack_blob_signed_by_another_key, "tampered", "signed by a key that is not trusted"),
]


@pytest.mark.parametrize(("attack", "reason", "message"), ATTACKS, ids=[a[0].__name__ for a in ATTACKS])
def test_each_attack_is_refused_and_nothing_changes(
    on_v1: Host, caplog: pytest.LogCaptureFixture, attack: Callable[[Host], None], reason: str, message: str
) -> None:
    attack(on_v1)
    running = on_v1.running()
    state = AgentState.load(on_v1.agent.state_file)
    assert on_v1.poll() == "refused"
    assert on_v1.running() == running and on_v1.installed() == sorted({1, running})
    after = AgentState.load(on_v1.agent.state_file)
    assert (after.version, after.previous, after.failed) == (state.version, state.previous, state.failed)
    assert on_v1.metric("reconciler_agent_refusals_total", {"reason": reason}) == 1
    refusals = [r for r in caplog.records if r.getMessage() == "agent_refused"]
    assert len(refusals) == 1 and message in refusals[0].fields["error"]  # type: ignore[attr-defined]
    # Trust stays pinned: no checker was ever made from a key but the configured one.
    assert FakeChecker.made and all(keys == [PUBLISHER] for keys in FakeChecker.made)


def test_metadata_refusals_are_final_for_that_latest(on_v1: Host) -> None:
    attack_other_key(on_v1)
    assert on_v1.poll() == "refused"
    assert on_v1.poll() == "idle"


def test_expiry_is_read_from_the_clock(on_v1: Host) -> None:
    r = on_v1.publish(2)
    on_v1.clock.wall = r.expires - timedelta(seconds=1)
    assert on_v1.poll() == "updated"


# -- failed downloads ----------------------------------------------------------------------


def test_a_download_that_keeps_failing_is_tried_at_doubling_distances(on_v1: Host) -> None:
    r = on_v1.publish(2)
    del on_v1.store.objects[r.artifacts[0].blob]
    results = [on_v1.poll() for _ in range(4)]
    assert results == ["error", "error", "deferred", "error"]
    assert on_v1.poll() == "deferred" and on_v1.requested == ["hosts/web-1/latest.json"]
    assert on_v1.installed() == [1] and not [
        p for p in on_v1.agent.releases.iterdir() if p.name.startswith(".")
    ]
    on_v1.store.put(r.artifacts[0].blob, b"AppImage of web-1 2")
    assert [on_v1.poll() for _ in range(3)][-1] == "updated"


def test_an_unreadable_store_changes_nothing(on_v1: Host) -> None:
    del on_v1.store.objects["hosts/web-1/latest.json"]
    assert on_v1.poll() == "error"
    assert on_v1.running() == 1
    assert on_v1.metric("reconciler_agent_polls_total", {"result": "error"}) == 1


def test_a_truncated_artifact_is_an_error_and_retried(on_v1: Host) -> None:
    r = on_v1.publish(2)
    blob = on_v1.store.objects[r.artifacts[0].blob]
    on_v1.store.put(r.artifacts[0].blob, blob[:5])
    assert on_v1.poll() == "error"
    on_v1.store.put(r.artifacts[0].blob, blob)
    assert on_v1.poll() == "updated"


# -- pruning -------------------------------------------------------------------------------


def test_prune_keeps_the_current_and_previous_releases(host: Host) -> None:
    host.restart(keep=2)
    host.publish(1)
    assert host.poll() == "updated"
    # Two newer versions fail their check and stay installed beside version 1.
    host.probe.unhealthy |= {5, 6}
    for v in (5, 6):
        host.publish(v)
        assert host.poll() == "rolled-back"
    # Then version 2 goes out: the two newest installed are 5 and 6, and yet the
    # current (2) and previous (1) releases stay.
    host.publish(2)
    assert host.poll() == "updated"
    assert host.installed() == [1, 2, 5, 6]
    host.publish(7)
    assert host.poll() == "updated"
    assert host.installed() == [2, 6, 7]

"""Unit tests of the agent's updater: whole polls against an in-memory store that the
real publisher (reconciler.daemon.publish and the TUF repository of reconciler.daemon.tuf)
writes and signs with real ed25519 keys, a fake clock and a health probe that answers as
told. No network, no process, no sleep, no gpg."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, Key
from tuf.api.metadata import Metadata

from reconciler.adapters.fetch import Fetched, Validators
from reconciler.agent.config import AgentConfig, HealthConfig
from reconciler.agent.state import AgentState
from reconciler.agent.updater import Agent
from reconciler.config import TufConfig
from reconciler.core import tufrepo
from reconciler.core.layout import AttestationKind, attestation_path, release_path, tuf_path
from reconciler.core.provenance import BuildRecord, NixInputs, StorePath
from reconciler.core.release import Artifact, Release, new_release
from reconciler.core.trust import Reason
from reconciler.core.tufrepo import SERIALIZER, target_path
from reconciler.daemon.attest import attest
from reconciler.daemon.publish import publish
from reconciler.daemon.tuf import TufRepository
from reconciler.errors import FetchError, FetchKind
from tests import fakes

STORE = "mem://store"
TIMESTAMP = tuf_path("timestamp", None)
NEXT_ROOT = tuf_path("root", 2)  # what ngclient asks for on every refresh
TUF = TufConfig(bit_length=2)  # four bins
RELEASE_LIFETIME = timedelta(days=7)
TIMESTAMP_LIFETIME = TUF.lifetimes.timestamp

PUBLISHER = CryptoSigner.generate_ed25519()
ATTACKER = CryptoSigner.generate_ed25519()
# The agent's pinned key files hold these bytes; ``pinned_keys`` makes TUF keys of them
# (gpg does in the real agent).
PUBLISHER_FILE = b"-----BEGIN PGP PUBLIC KEY BLOCK----- publisher"
KEYS: dict[bytes, Key] = {PUBLISHER_FILE: PUBLISHER.public_key}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class MemoryStore(fakes.MemoryStore):
    """The daemon's in-memory store (tests.fakes), read as the agent's HTTP fetcher reads
    it: bounded, conditional by ETag, a missing key an HTTP 404."""

    def __init__(self) -> None:
        super().__init__()
        self.etags: dict[str, str] = {}
        self.requests: list[str] = []
        self.down = False
        # Answer a conditional read 400, as a server does to validators too long for it.
        self.refuse_conditional = False
        self._tags = itertools.count(1)

    def _put(self, key: str, data: bytes) -> None:
        super()._put(key, data)
        self.etags[key] = f'"{next(self._tags)}"'

    def touch(self, key: str) -> None:
        """Write ``key`` again, same bytes: a new ETag, as a rewritten object has."""
        self.put_bytes(key, self.objects[key])

    def _read(self, target: str) -> tuple[str, bytes]:
        assert target.startswith(STORE + "/"), target
        key = target[len(STORE) + 1 :]
        self.requests.append(key)
        if self.down:
            raise FetchError(f"cannot fetch {target}: Connection refused", kind=FetchKind.UNREACHABLE)
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
        if self.refuse_conditional and since is not None and since.etag is not None:
            raise FetchError(
                f"cannot fetch {target}: HTTP 400 Bad Request", kind=FetchKind.HTTP_STATUS, status=400
            )
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
            raise FetchError(f"{target}: got {len(data)} bytes, expected {size}", kind=FetchKind.TRUNCATED)
        return sha(data)


class FakeClock:
    def __init__(self) -> None:
        # python-tuf's ngclient judges the expiry of what it downloads by the system
        # clock, the agent (its idle poll, a release's expiry) by this one: starting at
        # the real time, both agree on what the publisher signs at this clock's time.
        self.wall = datetime.now(UTC).replace(microsecond=0)
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)


def build_record(r: Release, now: datetime) -> BuildRecord:
    """How the daemon built ``r``, as its provenance says."""
    out = StorePath(f"/nix/store/{'0' * 32}-host-{r.host}-{r.version}", sha(b"out"), 1)
    inputs = NixInputs("2.8.0", sha(b"nix"), "debian", sha(b"toolchain"), (), (out,), (out.path,))
    return BuildRecord(
        repository="https://git.example/fleet.git",
        branch="main",
        commit=r.commit,
        host=r.host,
        derivation=r.derivation,
        inputs=inputs,
        reconciler_version="0.1.0",
        builder="local",
        builder_uri=None,
        invocation_id=f"{r.host}-{r.version}",
        started=now,
        finished=now,
    )


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
    store: MemoryStore
    clock: FakeClock
    probe: Probe
    tmp: Path
    publisher: TufRepository
    published: dict[str, int] = field(default_factory=dict)
    pinned: list[list[bytes]] = field(default_factory=list)  # what pinned_keys was given
    agent: Agent = field(init=False)

    def __post_init__(self) -> None:
        self.agent = make_agent(self)

    def publish(
        self,
        version: int,
        host: str = "web-1",
        blob: bytes | None = None,
        sync: bool = True,
        attest_by: CryptoSigner | None = None,
    ) -> Release:
        """What the daemon's pass does: publish the release (with its provenance and SBOM
        signed by ``attest_by``), then list it in the TUF bins."""
        blob = blob if blob is not None else f"AppImage of {host} {version}".encode()
        art = Artifact("appimage", f"{host}-{version}-x86_64.AppImage", len(blob), sha(blob))
        r = new_release(
            host, version, "c" * 40, "/nix/store/x.drv", (art,), self.clock.now(), RELEASE_LIFETIME
        )
        envelopes: dict[str, bytes] = {}
        if attest_by is not None:
            r, envelopes = attest(r, build_record(r, self.clock.now()), fakes.sslib_signer(attest_by))
        built = self.tmp / "build" / f"{host}-{version}"
        built.parent.mkdir(exist_ok=True)
        built.write_bytes(blob)
        publish(
            self.store,
            r,
            {"appimage": built},
            lambda p: b"signature",
            lambda d: b"signature",
            attestations=envelopes,
        )
        if sync:
            self.point(version, host)
        return r

    def point(self, version: int, host: str = "web-1") -> None:
        """The daemon's metadata pass: ``host``'s entry names ``releases/<version>.json``,
        whatever the store holds there."""
        self.published[host] = version
        self.publisher.sync(self.published)

    def resign(self, after: timedelta = timedelta(0)) -> None:
        """The daemon's metadata pass ``after`` from now, nothing new: what is due is re-signed."""
        self.clock.wall += after
        self.publisher.sync(self.published)

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

    def restart(self, **cfg: Any) -> None:
        """A new agent process on the same state directory (as `--once` under a timer)."""
        self.agent = make_agent(self, **cfg)

    def bin_of(self, host: str = "web-1") -> str:
        md = self.publisher.load()
        return tufrepo.succinct(md.targets.signed).get_role_for_target(target_path(host))


def make_agent(h: Host, **cfg: Any) -> Agent:
    key = h.tmp / "publisher.asc"
    key.write_bytes(PUBLISHER_FILE)
    config = AgentConfig(
        path=h.tmp / "agent.yaml",
        host="web-1",
        store=STORE,
        keys=(key,),
        state_dir=h.tmp / "agent",
        health=HealthConfig(command=("probe",), timeout=5.0, interval=1.0),
        **cfg,
    )

    def pinned_keys(files: Sequence[bytes]) -> list[Key]:
        h.pinned.append(list(files))
        return [KEYS[f] for f in files]

    return Agent(config, fetcher=h.store, clock=h.clock, pinned_keys=pinned_keys, probe=h.probe)


def make_host(tmp: Path, signer: CryptoSigner = PUBLISHER) -> Host:
    """An agent for web-1 and a publisher signing the store's TUF metadata with ``signer``."""
    store, clock = MemoryStore(), FakeClock()
    probe = Probe(tmp / "agent" / "current")
    publisher = TufRepository(store, tmp / "daemon-tuf", lambda: signer, clock, TUF)
    return Host(store, clock, probe, tmp, publisher)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return make_host(tmp_path)


@pytest.fixture
def on_v1(host: Host) -> Host:
    """An agent that installed and runs version 1."""
    host.publish(1)
    assert host.poll() == "updated"
    return host


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The event's own fields: reconciler.log.event passes them as the record's extra."""
    own: dict[str, Any] = record.__dict__["fields"]
    return own


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [fields(r)["error"] for r in caplog.records if r.getMessage() == "agent_refused"]


# -- updates -------------------------------------------------------------------------------


def test_first_poll_installs_switches_and_records(host: Host) -> None:
    r = host.publish(1)
    assert host.poll() == "updated"
    md = host.publisher.load()
    art = r.artifacts[0]
    assert host.requested == [
        TIMESTAMP,
        # The first root, signed by the pinned key, then ngclient's look for a newer one.
        tuf_path("root", 1),
        NEXT_ROOT,
        tuf_path("snapshot", md.snapshot.signed.version),
        tuf_path("targets", md.targets.signed.version),
        tuf_path(host.bin_of(), md.bins[host.bin_of()].signed.version),
        release_path("web-1", 1),
        art.blob,
    ]
    assert host.pinned == [[PUBLISHER_FILE]]
    assert host.running() == 1
    assert (host.agent.current / art.name).read_bytes() == b"AppImage of web-1 1"
    assert (host.agent.current / art.name).stat().st_mode & 0o777 == 0o555
    assert AgentState.load(host.agent.state_file).version == 1
    assert host.metric("reconciler_agent_running_version", {"host": "web-1"}) == 1
    assert host.metric("reconciler_agent_polls_total", {"result": "updated"}) == 1
    assert host.metric("reconciler_agent_metadata_stale") == 0
    assert host.metric("reconciler_agent_metadata_expiry_timestamp_seconds") == (
        md.timestamp.signed.expires.timestamp()
    )
    # Every byte read counts, the artifact's too.
    served = sum(len(host.store.objects.get(k, b"")) for k in host.requested)
    assert host.metric("reconciler_agent_downloaded_bytes_total") == served
    assert host.metric("reconciler_agent_last_poll_timestamp_seconds") == host.clock.now().timestamp()


def test_an_idle_poll_is_one_conditional_get_of_the_timestamp(on_v1: Host) -> None:
    downloaded = on_v1.metric("reconciler_agent_downloaded_bytes_total")
    assert on_v1.poll() == "idle"
    assert on_v1.requested == [TIMESTAMP]
    assert on_v1.metric("reconciler_agent_downloaded_bytes_total") == downloaded


def test_a_republished_timestamp_naming_what_runs_is_current(on_v1: Host) -> None:
    # The same bytes written again.
    on_v1.store.touch(TIMESTAMP)
    assert on_v1.poll() == "current"
    assert on_v1.requested == [TIMESTAMP, NEXT_ROOT]
    # The daemon re-signs the timestamp once half its lifetime is gone: a new version
    # that names the same snapshot, so nothing else is read.
    on_v1.resign(TIMESTAMP_LIFETIME / 2 + timedelta(seconds=1))
    assert on_v1.poll() == "current"
    assert on_v1.requested == [TIMESTAMP, NEXT_ROOT]
    assert on_v1.poll() == "idle"


def test_another_host_publishing_is_current_and_reads_no_release(on_v1: Host) -> None:
    on_v1.publish(1, host="web-2")
    assert on_v1.poll() == "current"
    assert not [k for k in on_v1.requested if not k.startswith("tuf/")]


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [fields(r) for r in caplog.records if r.getMessage() == name]


def test_a_host_never_published_is_told_once_not_current(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in ``host`` or a host the daemon has not built: the store has metadata,
    but none for this host, and nothing runs here."""
    caplog.set_level(logging.INFO, "reconciler")
    host.publish(1, host="web-2")
    assert host.poll() == "unpublished"
    host.store.touch(TIMESTAMP)
    assert host.poll() == "unpublished"
    assert host.poll() == "idle"
    told = events(caplog, "agent_unpublished")
    assert [t["error"] for t in told] == [
        "host web-1 has no release in the store's TUF metadata (is the host name right? has the daemon "
        "published it?); nothing is installed"
    ]
    assert host.metric("reconciler_agent_polls_total", {"result": "unpublished"}) == 2
    host.publish(1)
    assert host.poll() == "updated"


def test_a_store_without_metadata_says_what_to_check(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "reconciler")
    assert host.poll() == "error"
    (failed,) = events(caplog, "agent_poll_failed")
    assert failed["error"] == (
        f"the store {STORE} has no TUF metadata (cannot fetch {STORE}/{TIMESTAMP}: HTTP 404 Not Found): "
        "is `store` the root the daemon publishes to, and has it published anything yet?"
    )


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


def test_a_failed_health_check_rolls_back_on_the_clock(on_v1: Host) -> None:
    on_v1.publish(2)
    on_v1.probe.unhealthy.add(2)
    start = on_v1.clock.monotonic()
    assert on_v1.poll() == "rolled-back"
    # Probed every second for the check's 5 s, then version 1 once, healthy again.
    assert on_v1.probe.probed == [1, 2, 2, 2, 2, 2, 2, 1]
    assert on_v1.clock.monotonic() - start == 5.0
    assert on_v1.running() == 1
    state = AgentState.load(on_v1.agent.state_file)
    assert (state.version, state.previous) == (1, 0)
    assert on_v1.metric("reconciler_agent_rollbacks_total") == 1


def test_expiry_is_read_from_the_clock(on_v1: Host) -> None:
    r = on_v1.publish(2)
    on_v1.resign(r.expires - on_v1.clock.now() - timedelta(seconds=1))
    assert on_v1.poll() == "updated"


# -- a failed artifact is never activated again ------------------------------------------


def test_a_release_that_failed_its_health_check_is_never_activated_again(on_v1: Host) -> None:
    on_v1.publish(2)
    on_v1.probe.unhealthy.add(2)
    assert on_v1.poll() == "rolled-back"
    # The store keeps naming release 2, under timestamps the daemon re-signs.
    for agent in ("the same agent", "a restarted agent"):
        if agent == "a restarted agent":
            on_v1.restart()
        probed = len(on_v1.probe.probed)
        on_v1.resign(TIMESTAMP_LIFETIME / 2 + timedelta(seconds=1))
        # Settled: the entry that rolled back is not even read again.
        assert on_v1.poll() == "current", agent
        assert on_v1.poll() == "idle", agent
        assert len(on_v1.probe.probed) == probed, f"{agent} activated a failed release again"
        assert on_v1.running() == 1
    # The next release is taken.
    on_v1.publish(3)
    assert on_v1.poll() == "updated" and on_v1.running() == 3


def test_a_failed_artifact_under_a_new_release_number_is_refused(
    on_v1: Host, caplog: pytest.LogCaptureFixture
) -> None:
    bad = b"an AppImage that fails its health check"
    on_v1.publish(2, blob=bad)
    on_v1.probe.unhealthy.add(2)
    assert on_v1.poll() == "rolled-back"
    # Release 3, genuinely signed, runs the same artifact: it would pass the probe.
    on_v1.publish(3, blob=bad)
    assert on_v1.poll() == "refused"
    assert on_v1.metric("reconciler_agent_refusals_total", {"reason": "failed-before"}) == 1
    assert f"release 3 runs {sha(bad)[:12]}, which failed its health check here before" in refusals(caplog)[0]
    assert 3 not in on_v1.probe.probed and on_v1.running() == 1
    assert on_v1.installed() == [1, 2]
    # A restarted agent remembers it by content too.
    on_v1.restart()
    on_v1.publish(4, blob=bad)
    assert on_v1.poll() == "refused" and 4 not in on_v1.probe.probed


# -- refusals ----------------------------------------------------------------------------


def sign_as_attacker(h: Host, key: str, change: Callable[[Metadata[Any]], None]) -> None:
    """Rewrite the store's ``key`` with ``change`` applied, signed by the attacker's key."""
    md: Metadata[Any] = Metadata.from_bytes(h.store.objects[key])
    change(md)
    md.sign(ATTACKER)
    h.store.put_bytes(key, md.to_bytes(SERIALIZER))


def attack_timestamp_signed_by_another_key(h: Host) -> None:
    def newer(md: Metadata[Any]) -> None:
        md.signed.version += 1

    sign_as_attacker(h, TIMESTAMP, newer)


def attack_bin_signed_by_another_key(h: Host) -> None:
    # The genuine publisher lists release 2; the attacker swaps the bin that names it for
    # one of the same version naming their own release.
    h.publish(2)
    evil = new_release("web-1", 2, "e" * 40, "/nix/store/evil.drv", (), h.clock.now(), RELEASE_LIFETIME)
    h.store.put_bytes(release_path("web-1", 2), evil.to_json())
    name = h.bin_of()

    def names_evil(md: Metadata[Any]) -> None:
        md.signed.targets[target_path("web-1")] = tufrepo.entry("web-1", 2, evil.to_json())

    sign_as_attacker(h, tuf_path(name, h.publisher.load().bins[name].signed.version), names_evil)


def attack_metadata_rollback(h: Host) -> None:
    # The store serves the timestamp the agent trusted before its last update.
    old = h.store.objects[TIMESTAMP]
    h.publish(2)
    assert h.poll() == "updated"
    h.store.put_bytes(TIMESTAMP, old)


def attack_changed_after_signing(h: Host) -> None:
    h.publish(2)
    meta = h.store.objects[release_path("web-1", 2)]
    h.store.put_bytes(release_path("web-1", 2), meta.replace(b'"expires": "', b'"expires": "2')[: len(meta)])


def attack_malformed(h: Host) -> None:
    # The entry is signed over what the store holds: the online key signs a bad release.
    h.store.put_bytes(release_path("web-1", 2), b'{"schema": "reconciler.release/v1", "version": 2}')
    h.point(2)


def attack_nul_in_artifact_name(h: Host) -> None:
    r = h.publish(2, sync=False)
    art = r.artifacts[0]
    bad = Release(
        r.host,
        r.version,
        r.commit,
        r.derivation,
        r.created,
        r.expires,
        (Artifact(art.format, "a\0b", art.size, art.sha256),),
    )
    h.store.put_bytes(release_path("web-1", 2), bad.to_json())
    h.point(2)


def attack_other_host(h: Host) -> None:
    h.publish(2, host="web-2")
    h.store.put_bytes(release_path("web-1", 2), h.store.objects[release_path("web-2", 2)])
    h.point(2)


def attack_version_alias(h: Host) -> None:
    # releases/3.json serves the genuine release 2, and the entry naming 3 matches its bytes.
    h.publish(2, sync=False)
    h.store.put_bytes(release_path("web-1", 3), h.store.objects[release_path("web-1", 2)])
    h.point(3)


def attack_replay(h: Host) -> None:
    h.publish(2)
    assert h.poll() == "updated"
    h.point(1)  # the genuine, signed release 1 again


def attack_expired_release(h: Host) -> None:
    r = h.publish(2)
    h.resign(r.expires - h.clock.now())


def attack_tampered_blob(h: Host) -> None:
    r = h.publish(2)
    blob = bytearray(h.store.objects[r.artifacts[0].blob])
    blob[3] ^= 1
    h.store.put_bytes(r.artifacts[0].blob, bytes(blob))


ATTACKS: list[tuple[Callable[[Host], None], str, str]] = [
    (attack_timestamp_signed_by_another_key, "bad-signature", "timestamp was signed by 0/1 keys"),
    (attack_bin_signed_by_another_key, "bad-signature", "was signed by 0/1 keys"),
    (attack_metadata_rollback, "rollback", "timestamp version"),
    (attack_changed_after_signing, "tampered", "the signed entry says"),
    (attack_malformed, "malformed", "releases/2.json: host: must be a str"),
    (attack_nul_in_artifact_name, "malformed", "artifacts[0].name: must be a plain file name"),
    (attack_other_host, "wrong-host", "release is for host 'web-2', this is 'web-1'"),
    (attack_version_alias, "wrong-version", "releases/3.json holds release 2, not 3"),
    (attack_replay, "rollback", "version 1 is not newer than the running 2"),
    (attack_expired_release, "expired", "release 2 expired at"),
    (attack_tampered_blob, "tampered", "release says"),
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
    errors = refusals(caplog)
    assert len(errors) == 1 and message in errors[0], errors
    # Trust stays pinned: the configured key, read once for the first root.
    assert on_v1.pinned == [[PUBLISHER_FILE]]


def test_every_refusal_reason_is_exported_from_the_start_at_zero(host: Host) -> None:
    # A series that appears at 1 shows no increase(): the alert would never fire.
    reg = host.agent.metrics.registry
    for reason in Reason:
        assert reg.get_sample_value("reconciler_agent_refusals_total", {"reason": reason}) == 0.0


def test_counters_of_a_timer_run_agent_go_on_from_the_last_run(on_v1: Host, tmp_path: Path) -> None:
    textfile = tmp_path / "agent.prom"
    on_v1.restart(metrics_file=textfile)
    attack_tampered_blob(on_v1)
    assert on_v1.poll() == "refused"
    downloaded = on_v1.metric("reconciler_agent_downloaded_bytes_total")
    # The next run by the timer: a new process that refuses the same again.
    on_v1.restart(metrics_file=textfile)
    assert on_v1.poll() == "refused"
    assert on_v1.metric("reconciler_agent_refusals_total", {"reason": "tampered"}) == 2
    assert on_v1.metric("reconciler_agent_polls_total", {"result": "refused"}) == 2
    assert on_v1.metric("reconciler_agent_downloaded_bytes_total") > downloaded
    assert 'reconciler_agent_refusals_total{reason="tampered"} 2.0' in textfile.read_text()
    # A long-running agent (no textfile) starts its counters at 0, as Prometheus expects.
    on_v1.restart()
    assert on_v1.metric("reconciler_agent_refusals_total", {"reason": "tampered"}) == 0


def test_a_root_not_signed_by_the_pinned_key_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The store's whole TUF repository is the attacker's, each file validly signed.
    h = make_host(tmp_path, signer=ATTACKER)
    h.publish(1)
    assert h.poll() == "refused"
    assert h.requested == [TIMESTAMP, tuf_path("root", 1), NEXT_ROOT]
    assert h.metric("reconciler_agent_refusals_total", {"reason": "bad-signature"}) == 1
    assert "no TUF root in the store is signed by a threshold of the pinned keys" in refusals(caplog)[0]
    assert not h.agent.current.exists() and h.installed() == []
    assert not (h.agent.cfg.state_dir / "tuf" / "root.json").exists()


@pytest.mark.parametrize(
    ("what", "error"),
    [
        # Genuinely signed metadata of another role where the first root should be.
        ("timestamp", "TUF root 1: not root version 1"),
        ("garbage", "TUF root 1: Failed to deserialize JSON"),
    ],
)
def test_a_first_root_that_is_not_a_root_is_refused(
    host: Host, caplog: pytest.LogCaptureFixture, what: str, error: str
) -> None:
    host.publish(1)
    data = host.store.objects[TIMESTAMP] if what == "timestamp" else b"\xff not JSON"
    host.store.put_bytes(tuf_path("root", 1), data)
    assert host.poll() == "refused"
    assert host.metric("reconciler_agent_refusals_total", {"reason": "malformed"}) == 1
    assert refusals(caplog) == [error]
    assert not host.agent.current.exists()


def test_an_overlong_release_file_is_read_no_further_than_its_entry(on_v1: Host) -> None:
    on_v1.publish(2)
    key = release_path("web-1", 2)
    length = len(on_v1.store.objects[key])
    on_v1.store.put_bytes(key, on_v1.store.objects[key] + b" " * (1 << 20))
    before = on_v1.metric("reconciler_agent_downloaded_bytes_total")
    assert on_v1.poll() == "error"
    read = on_v1.metric("reconciler_agent_downloaded_bytes_total") - before
    metadata = sum(len(on_v1.store.objects.get(k, b"")) for k in on_v1.requested if k.startswith("tuf/"))
    assert read == metadata + length + 1
    assert on_v1.running() == 1


# -- a store that stops signing ----------------------------------------------------------


def test_a_timestamp_left_to_expire_is_stale_until_the_publisher_signs_again(
    on_v1: Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "reconciler")
    ts = on_v1.agent.tuf.trusted_timestamp()
    assert ts is not None
    expires = ts.signed.expires
    on_v1.clock.wall = expires - timedelta(seconds=1)
    assert on_v1.poll() == "idle"
    assert on_v1.metric("reconciler_agent_metadata_stale") == 0
    # The publisher stopped re-signing (or the store is frozen): nothing changes in the
    # store, and the timestamp the agent trusts expires.
    on_v1.clock.wall = expires
    for _ in range(2):
        assert on_v1.poll() == "stale"
        # Stale, the next poll reads the timestamp whole: "not modified" may be the
        # answer to validators a hostile answer gave.
        assert on_v1.requested[0] == TIMESTAMP and on_v1.agent.state.validators == Validators()
        assert on_v1.metric("reconciler_agent_metadata_stale") == 1
        assert on_v1.metric("reconciler_agent_polls_total", {"result": "stale"}) >= 1
    assert on_v1.metric("reconciler_agent_metadata_expiry_timestamp_seconds") == expires.timestamp()
    assert on_v1.running() == 1
    assert AgentState.load(on_v1.agent.state_file).stale
    assert [r.getMessage() for r in caplog.records].count("agent_stale") == 1
    # The publisher signs again, at the time it is now.
    on_v1.resign()
    assert on_v1.poll() == "current"
    assert on_v1.metric("reconciler_agent_metadata_stale") == 0
    assert (
        on_v1.metric("reconciler_agent_metadata_expiry_timestamp_seconds")
        == (on_v1.clock.now() + TIMESTAMP_LIFETIME).timestamp()
    )
    assert not AgentState.load(on_v1.agent.state_file).stale
    assert [r.getMessage() for r in caplog.records].count("agent_fresh") == 1
    assert on_v1.poll() == "idle"


# -- failed downloads ----------------------------------------------------------------------


def test_a_download_that_keeps_failing_is_tried_at_doubling_distances(on_v1: Host) -> None:
    r = on_v1.publish(2)
    del on_v1.store.objects[r.artifacts[0].blob]
    results = [on_v1.poll() for _ in range(4)]
    assert results == ["error", "error", "deferred", "error"]
    # A deferred poll reads no release and no artifact.
    assert on_v1.poll() == "deferred" and on_v1.requested == [TIMESTAMP, NEXT_ROOT]
    assert on_v1.installed() == [1] and not [
        p for p in on_v1.agent.releases.iterdir() if p.name.startswith(".")
    ]
    on_v1.store.put_bytes(r.artifacts[0].blob, b"AppImage of web-1 2")
    assert [on_v1.poll() for _ in range(3)][-1] == "updated"


@pytest.mark.parametrize("how", ["unreachable", "no timestamp", "no snapshot"])
def test_an_unreadable_store_changes_nothing(on_v1: Host, how: str) -> None:
    on_v1.publish(2)
    if how == "unreachable":
        on_v1.store.down = True
    elif how == "no timestamp":
        del on_v1.store.objects[TIMESTAMP]
    else:
        del on_v1.store.objects[tuf_path("snapshot", on_v1.publisher.load().snapshot.signed.version)]
    assert on_v1.poll() == "error"
    assert on_v1.running() == 1 and on_v1.installed() == [1]
    assert on_v1.metric("reconciler_agent_polls_total", {"result": "error"}) == 1
    assert on_v1.metric("reconciler_agent_metadata_stale") == 0
    # Once the store answers again, the update goes through.
    on_v1.store.down = False
    on_v1.publish(3)
    assert on_v1.poll() == "updated" and on_v1.running() == 3


def test_a_snapshot_garbled_once_delays_the_update_by_one_poll(on_v1: Host) -> None:
    """The timestamp's validators are kept only once its refresh is through: else the
    next poll is told "not modified", and the update waits for a new timestamp."""
    on_v1.publish(2)
    key = tuf_path("snapshot", on_v1.publisher.load().snapshot.signed.version)
    good = on_v1.store.objects[key]
    on_v1.store.objects[key] = b"{}"
    assert on_v1.poll() == "refused"
    on_v1.store.objects[key] = good
    assert on_v1.poll() == "updated" and on_v1.running() == 2


def test_validators_the_store_refuses_are_not_sent_again(on_v1: Host) -> None:
    """Whatever a server takes amiss in them (one too long for its header limit), a
    refused conditional read is the last: else every later poll fails the same way."""
    on_v1.publish(2)
    on_v1.store.refuse_conditional = True
    assert on_v1.poll() == "error"
    assert on_v1.poll() == "updated" and on_v1.running() == 2


def test_a_truncated_artifact_is_an_error_and_retried(on_v1: Host) -> None:
    r = on_v1.publish(2)
    blob = on_v1.store.objects[r.artifacts[0].blob]
    on_v1.store.put_bytes(r.artifacts[0].blob, blob[:5])
    assert on_v1.poll() == "error"
    on_v1.store.put_bytes(r.artifacts[0].blob, blob)
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


@pytest.mark.parametrize(
    ("cfg", "runs", "level"),
    [
        ({"supervise": True}, "supervise", logging.INFO),
        ({"activate": ("systemctl", "restart", "app")}, "activate", logging.INFO),
        ({}, "nothing", logging.WARNING),
    ],
)
def test_the_start_says_what_runs_the_releases(
    host: Host, caplog: pytest.LogCaptureFixture, cfg: dict[str, Any], runs: str, level: int
) -> None:
    caplog.set_level(logging.INFO, "reconciler")
    host.restart(**cfg)
    stopping = threading.Event()
    stopping.set()
    host.agent.run(stopping)
    (start,) = [r for r in caplog.records if r.getMessage() == "agent_start"]
    assert fields(start)["runs"] == runs
    assert start.levelno == level
    if runs == "nothing":
        assert fields(start)["note"] == (
            "neither supervise nor activate is set: releases are installed, nothing runs them"
        )


# -- provenance ----------------------------------------------------------------------------

PROVENANCE_1 = attestation_path("web-1", 1, AttestationKind.PROVENANCE)


def test_a_host_requiring_provenance_installs_a_release_whose_provenance_checks_out(host: Host) -> None:
    host.restart(require_provenance=True)
    r = host.publish(1, attest_by=PUBLISHER)
    assert host.poll() == "updated"
    # Read after the release that names it and before the artifact.
    assert host.requested[-3:] == [release_path("web-1", 1), PROVENANCE_1, r.artifacts[0].blob]
    assert host.running() == 1


def test_a_host_not_requiring_provenance_reads_none(host: Host) -> None:
    host.publish(1, attest_by=PUBLISHER)
    assert host.poll() == "updated"
    assert PROVENANCE_1 not in host.requested


def test_a_release_without_provenance_is_refused_where_it_is_required(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    host.restart(require_provenance=True)
    r = host.publish(1)
    assert host.poll() == "refused"
    assert host.metric("reconciler_agent_refusals_total", {"reason": "no-provenance"}) == 1
    assert refusals(caplog) == ["release 1 names no provenance, and this host requires it"]
    assert r.artifacts[0].blob not in host.requested
    assert host.installed() == [] and not host.agent.current.exists()
    # Final for this timestamp: nothing is read again until a new one.
    assert host.poll() == "idle"
    host.publish(2, attest_by=PUBLISHER)
    assert host.poll() == "updated"
    assert host.running() == 2


def _retype(data: bytes) -> bytes:
    return data.replace(b'"application/vnd.in-toto+json"', b'"application/vnd.in-toto+jsoN"')


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        pytest.param(_retype, "payloadType is 'application/vnd.in-toto+jsoN'", id="payload-type"),
        pytest.param(lambda d: d + b" ", "larger than the", id="longer"),
        pytest.param(
            lambda d: d.replace(b'"payload": "ey', b'"payload": "ex'), "bad signature", id="payload"
        ),
    ],
)
def test_a_tampered_provenance_is_refused_and_nothing_installed(
    on_v1: Host, caplog: pytest.LogCaptureFixture, tamper: Callable[[bytes], bytes], message: str
) -> None:
    on_v1.restart(require_provenance=True)
    r = on_v1.publish(2, attest_by=PUBLISHER)
    key = attestation_path("web-1", 2, AttestationKind.PROVENANCE)
    good = on_v1.store.objects[key]
    on_v1.store.objects[key] = tamper(good)
    assert on_v1.poll() == "refused"
    # Not the bytes the signed release names: the store's fault, not the release's.
    assert on_v1.metric("reconciler_agent_refusals_total", {"reason": "tampered"}) == 1
    (error,) = refusals(caplog)
    assert error.startswith(f"{key}: ") and message in error, error
    assert r.artifacts[0].blob not in on_v1.requested
    assert on_v1.running() == 1 and on_v1.installed() == [1]
    # Tried again: once the store answers right, the release is installed.
    on_v1.store.objects[key] = good
    assert on_v1.poll() == "updated" and on_v1.running() == 2


def test_a_release_file_tampered_once_is_tried_again_and_installed(on_v1: Host) -> None:
    """Settled, one bad answer of the store (or the network) would keep the host off a
    genuine release for good, with nothing stale to show for it."""
    on_v1.publish(2)
    key = release_path("web-1", 2)
    good = on_v1.store.objects[key]
    bad = bytearray(good)
    bad[-3] ^= 1
    on_v1.store.objects[key] = bytes(bad)
    assert on_v1.poll() == "refused"
    assert on_v1.metric("reconciler_agent_refusals_total", {"reason": "tampered"}) == 1
    on_v1.store.objects[key] = good
    assert on_v1.poll() == "updated" and on_v1.running() == 2


def test_provenance_signed_by_a_key_not_pinned_is_refused(
    on_v1: Host, caplog: pytest.LogCaptureFixture
) -> None:
    on_v1.restart(require_provenance=True)
    on_v1.publish(2, attest_by=ATTACKER)
    assert on_v1.poll() == "refused"
    assert on_v1.metric("reconciler_agent_refusals_total", {"reason": "bad-provenance"}) == 1
    assert refusals(caplog) == [
        f"{attestation_path('web-1', 2, AttestationKind.PROVENANCE)}: no signature by a pinned key"
    ]
    assert on_v1.running() == 1
    # Provenance is checked against the configured keys: each agent process read them
    # once, the first for the first TUF root, the restarted one for the provenance.
    assert on_v1.pinned == [[PUBLISHER_FILE], [PUBLISHER_FILE]]

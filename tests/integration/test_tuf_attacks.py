"""The agent against TUF's attacks (theupdateframework.io/docs/security), over a real
HTTP server on 127.0.0.1, with metadata signed by real gpg keys through python-tuf.

The store is published by the daemon's TufRepository (no Nix: the artifacts are small
stand-ins); the attacker controls what the server answers and, where an attack says
so, holds some keys. Every attack leaves the agent on what it ran, says why in its
result and metrics, and the next honest publication still gets through.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import Signer as MetadataSigner
from tuf.api.metadata import Metadata, Root, Targets

from reconciler.adapters.clock import SystemClock
from reconciler.adapters.fetch import HttpFetcher
from reconciler.adapters.store import FilesystemStore
from reconciler.adapters.tufkeys import metadata_keys, metadata_signer
from reconciler.agent import health
from reconciler.agent.config import AgentConfig
from reconciler.agent.updater import Agent
from reconciler.config import TufConfig
from reconciler.core import tufrepo
from reconciler.core.layout import latest_path, release_path, tuf_path
from reconciler.core.release import Artifact, new_release
from reconciler.core.tufrepo import SERIALIZER, Lifetimes, RoleName
from reconciler.daemon.tuf import TufRepository
from tests.conftest import Signing, signing_keys

pytestmark = pytest.mark.integration

HOST = "web-1"


class Key(Signing):
    @property
    def signer(self) -> MetadataSigner:
        return metadata_signer(self.gnupghome, self.fingerprint)

    @property
    def keyid(self) -> str:
        return self.fingerprint.lower()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Key]]:
    names = ("online", "root2", "root3", "attacker", "online2")
    with signing_keys(tmp_path_factory, "TUF", names) as made:
        yield {name: Key(k.gnupghome, k.fingerprint, k.public_key) for name, k in made.items()}


class Server:
    """The store over HTTP; ``answers`` replaces what a path gets (the attacker's hand)."""

    def __init__(self, root: Path) -> None:
        self.answers: dict[str, Callable[[SimpleHTTPRequestHandler], None]] = {}
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                answer = server.answers.get(self.path.lstrip("/"))
                if answer is not None:
                    answer(self)
                else:
                    super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_bytes(data: bytes) -> Callable[[SimpleHTTPRequestHandler], None]:
    def answer(h: SimpleHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return answer


def endless(h: SimpleHTTPRequestHandler) -> None:
    h.send_response(200)
    h.end_headers()
    try:
        while True:
            h.wfile.write(b"x" * 65536)
    except OSError:
        pass


def trickle(h: SimpleHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "100000")
    h.end_headers()
    try:
        for _ in range(100000):
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.2)
    except OSError:
        pass


def http_agent(config: AgentConfig, clock: SystemClock) -> Agent:
    """An agent as reconciler.wiring makes one: over HTTP, its health probe real."""
    return Agent(
        config,
        fetcher=HttpFetcher(),
        clock=clock,
        pinned_keys=lambda ks: metadata_keys(list(ks)),
        probe=health.probe,
    )


@dataclass
class World:
    store_dir: Path
    store: FilesystemStore
    server: Server
    keys: dict[str, Key]
    tmp: Path
    clock: SystemClock = field(default_factory=SystemClock)
    online: str = "online"
    timestamp_lifetime: timedelta = timedelta(hours=1)
    repo: TufRepository | None = None
    agents: list[Agent] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)

    def publisher(self) -> TufRepository:
        if self.repo is None:
            key = self.keys[self.online]
            self.repo = TufRepository(
                self.store,
                self.tmp / "publisher-tuf",
                lambda: key.signer,
                self.clock,
                TufConfig(Lifetimes(timestamp=self.timestamp_lifetime), bit_length=2),
            )
        return self.repo

    def publish(self, host: str = HOST, blob: bytes | None = None, sync: bool = True) -> int:
        """Host's next release, in the daemon's publish order, then the TUF metadata."""
        version = self.versions.get(host, 0) + 1
        self.versions[host] = version
        blob = blob if blob is not None else f"{host} release {version}".encode()
        art = Artifact(
            "appimage", f"{host}-{version}-x86_64.AppImage", len(blob), hashlib.sha256(blob).hexdigest()
        )
        r = new_release(
            host, version, "c" * 40, "/nix/store/x.drv", (art,), self.clock.now(), timedelta(days=30)
        )
        self.store.put_bytes(art.blob, blob)
        self.store.put_bytes(release_path(host, version), r.to_json())
        self.store.put_bytes(latest_path(host), r.to_json())
        if sync:
            self.publisher().sync(dict(self.versions))
        return version

    def agent(self, pinned: str = "online", name: str = "a", **cfg: Any) -> Agent:
        config = AgentConfig(
            path=self.tmp / f"{name}.yaml",
            host=cfg.pop("host", HOST),
            store=self.server.url,
            keys=(self.keys[pinned].public_key,),
            state_dir=self.tmp / f"agent-{name}",
            timeout=cfg.pop("timeout", 10.0),
            **cfg,
        )
        agent = http_agent(config, self.clock)
        self.agents.append(agent)
        return agent

    def read(self, role: str, version: int | None) -> Metadata[Any]:
        return Metadata.from_bytes((self.store_dir / tuf_path(role, version)).read_bytes())

    def timestamp_version(self) -> int:
        return int(self.read("timestamp", None).signed.version)


@pytest.fixture
def world(tmp_path: Path, keys: dict[str, Key]) -> Iterator[World]:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    server = Server(store_dir)
    w = World(store_dir, FilesystemStore(store_dir), server, keys, tmp_path)
    try:
        yield w
    finally:
        server.stop()


def metric(agent: Agent, name: str, labels: dict[str, str] | None = None) -> float:
    return agent.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def running(agent: Agent) -> int:
    return agent.state.version


@pytest.fixture
def on_v1(world: World) -> Agent:
    world.publish()
    world.publish("web-2")
    agent = world.agent()
    assert agent.poll() == "updated"
    assert running(agent) == 1
    return agent


# -- TUF's attacks ---------------------------------------------------------------------


def test_arbitrary_installation_is_refused(world: World, on_v1: Agent) -> None:
    """The attacker swaps the artifact, then the release file, for its own."""
    v2 = world.publish(blob=b"the genuine release 2")
    release = json.loads((world.store_dir / release_path(HOST, v2)).read_bytes())
    blob_key = release["artifacts"][0]["blob"]
    # Same length: a longer or shorter one is cut at the release's size (below).
    (world.store_dir / blob_key).write_bytes(b"the attacker's releas")
    assert on_v1.poll() == "refused"
    assert metric(on_v1, "reconciler_agent_refusals_total", {"reason": "tampered"}) == 1
    forged = dict(release, commit="d" * 40)
    (world.store_dir / release_path(HOST, v2)).write_bytes(json.dumps(forged).encode())
    world.publish("web-2")  # a new timestamp: the agent looks again
    assert on_v1.poll() == "refused"
    assert metric(on_v1, "reconciler_agent_refusals_total", {"reason": "tampered"}) == 2
    assert running(on_v1) == 1


def test_endless_data_is_cut_at_the_limit(world: World, on_v1: Agent) -> None:
    world.publish()
    world.server.answers[tuf_path("timestamp", None)] = endless
    started = time.monotonic()
    assert on_v1.poll() == "error"
    assert time.monotonic() - started < 10
    # The endless artifact: cut at the size its release says.
    del world.server.answers[tuf_path("timestamp", None)]
    release = json.loads((world.store_dir / release_path(HOST, 2)).read_bytes())
    world.server.answers[release["artifacts"][0]["blob"]] = endless
    assert on_v1.poll() == "error"
    assert running(on_v1) == 1
    assert metric(on_v1, "reconciler_agent_downloaded_bytes_total") < 1 << 20


def test_slow_retrieval_is_cut_at_the_deadline(world: World, on_v1: Agent) -> None:
    """A server trickling a byte at a time cannot hold a poll past its deadline."""
    world.publish()
    slow = world.agent(name="slow", timeout=2.0)
    world.server.answers[tuf_path("timestamp", None)] = trickle
    started = time.monotonic()
    assert slow.poll() == "error"
    assert time.monotonic() - started < 8
    assert running(slow) == 0


def test_indefinite_freeze_is_seen_and_counted(world: World) -> None:
    """The store keeps serving the same metadata after it expired: the agent keeps
    running its release, says the store is stale, and the metric alerts on it."""
    # python-tuf judges expiry by the real clock: a timestamp that lives 3 seconds.
    world.timestamp_lifetime = timedelta(seconds=3)
    world.publish()
    agent = world.agent()
    assert agent.poll() == "updated"
    assert metric(agent, "reconciler_agent_metadata_stale") == 0
    time.sleep(3.5)  # nobody re-signs
    assert agent.poll() == "stale"
    assert metric(agent, "reconciler_agent_metadata_stale") == 1
    # Whether the store answers "not modified" or the whole file, it stays stale.
    agent.state.validators = type(agent.state.validators)()
    assert agent.poll() == "stale"
    time.sleep(2.1)  # HTTP dates have one-second resolution: validators trusted from now
    assert agent.poll() == "stale"
    assert agent.poll() == "stale"
    assert running(agent) == 1
    world.publisher().sync(dict(world.versions))  # the publisher re-signs
    assert agent.poll() == "current"
    assert metric(agent, "reconciler_agent_metadata_stale") == 0


def test_rollback_to_older_metadata_is_refused(world: World, on_v1: Agent) -> None:
    old = (world.store_dir / tuf_path("timestamp", None)).read_bytes()
    world.publish("web-2")
    assert on_v1.poll() == "current"
    world.server.answers[tuf_path("timestamp", None)] = serve_bytes(old)
    assert on_v1.poll() == "refused"
    assert metric(on_v1, "reconciler_agent_refusals_total", {"reason": "rollback"}) == 1


@pytest.mark.parametrize("headers", [None, "zz", 5], ids=["none", "not hex", "not a string"])
def test_a_gpg_signature_with_garbled_fields_is_refused_as_malformed(
    world: World, on_v1: Agent, headers: object
) -> None:
    """securesystemslib's gpg key raises KeyError, binascii's Error or TypeError on these,
    not "unverified": the poll was an error, not a refusal, and no alert fired."""
    world.publish()
    doc = json.loads((world.store_dir / tuf_path("timestamp", None)).read_bytes())
    for sig in doc["signatures"]:
        if headers is None:
            del sig["other_headers"]
        else:
            sig["other_headers"] = headers
    world.server.answers[tuf_path("timestamp", None)] = serve_bytes(json.dumps(doc).encode())
    assert on_v1.poll() == "refused"
    assert metric(on_v1, "reconciler_agent_refusals_total", {"reason": "malformed"}) == 1
    del world.server.answers[tuf_path("timestamp", None)]
    assert on_v1.poll() == "updated" and running(on_v1) == 2


def test_mix_and_match_of_metadata_is_refused(world: World, on_v1: Agent) -> None:
    """A bin from an older snapshot served under the newer one's name."""
    targets = world.read("targets", 1)
    name = tufrepo.succinct(targets.signed).get_role_for_target(tufrepo.target_path(HOST))
    snapshot = world.read("snapshot", world.read("timestamp", None).signed.snapshot_meta.version)
    old_bin = (world.store_dir / tuf_path(name, snapshot.signed.meta[f"{name}.json"].version)).read_bytes()
    world.publish()
    snapshot = world.read("snapshot", world.read("timestamp", None).signed.snapshot_meta.version)
    new_version = snapshot.signed.meta[f"{name}.json"].version
    world.server.answers[tuf_path(name, new_version)] = serve_bytes(old_bin)
    assert on_v1.poll() == "refused"
    assert running(on_v1) == 1
    del world.server.answers[tuf_path(name, new_version)]
    world.publish("web-2")
    assert on_v1.poll() == "updated" and running(on_v1) == 2


def test_another_bin_signed_at_the_same_moment_is_refused(world: World, on_v1: Agent) -> None:
    """Every bin is signed by the one online key and names no role: a bin's genuine file
    served under another's name verified wherever their versions matched, and withheld
    the other bin's hosts (Mercury, section 5.6). Bins signed in one snapshot differ in
    version."""
    targets = tufrepo.succinct(world.read("targets", 1).signed)
    mine, theirs = (targets.get_role_for_target(tufrepo.target_path(h)) for h in (HOST, "web-2"))
    assert mine != theirs
    world.publish(sync=False)
    world.publish("web-2")  # one snapshot changes both bins
    snapshot = world.read("snapshot", world.read("timestamp", None).signed.snapshot_meta.version)
    listed = {name: snapshot.signed.meta[f"{name}.json"].version for name in (mine, theirs)}
    other = (world.store_dir / tuf_path(theirs, listed[theirs])).read_bytes()
    world.server.answers[tuf_path(mine, listed[mine])] = serve_bytes(other)
    assert on_v1.poll() == "refused"
    assert running(on_v1) == 1
    del world.server.answers[tuf_path(mine, listed[mine])]
    assert on_v1.poll() == "updated" and running(on_v1) == 2


def genuine_with(
    world: World, key: str, headers: dict[str, str]
) -> Callable[[SimpleHTTPRequestHandler], None]:
    """The store's own ``key``, with ``headers`` of the attacker's."""

    def answer(h: SimpleHTTPRequestHandler) -> None:
        data = (world.store_dir / key).read_bytes()
        h.send_response_only(200)
        for name, value in {"Content-Length": str(len(data)), **headers}.items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(data)

    return answer


@pytest.mark.parametrize(
    "headers",
    [
        {"ETag": '"' + "A" * 16000 + '"'},
        {"Date": "Fri, 31 Dec 2100 23:59:59 GMT", "Last-Modified": "Fri, 31 Dec 2100 23:59:00 GMT"},
        {"Last-Modified": "Fri, 31 Dec 2100 23:59:00 GMT"},
    ],
    ids=["an etag of 16 KB", "dates of 2100", "a last-modified of 2100"],
)
def test_validators_from_one_hostile_answer_do_not_keep_the_store_s_next_release_away(
    world: World, on_v1: Agent, headers: dict[str, str]
) -> None:
    """What one answer says to send back with every later read: an ETag too long for a
    server's header limit had every later read refused (400); a Last-Modified of the
    future had every later read answered "not modified"."""
    asked: list[dict[str, str]] = []
    timestamp = tuf_path("timestamp", None)
    hostile = [genuine_with(world, timestamp, headers)]

    def answer(h: SimpleHTTPRequestHandler) -> None:
        asked.append(dict(h.headers))
        if hostile:
            hostile.pop()(h)
        else:
            SimpleHTTPRequestHandler.do_GET(h)

    world.publish("web-2")
    world.server.answers[timestamp] = answer
    assert on_v1.poll() == "current"
    time.sleep(2.1)  # HTTP dates have one-second resolution: the honest answers' are older
    world.publish()
    assert on_v1.poll() == "updated" and running(on_v1) == 2
    assert len(asked) == 2
    assert all(len(value) <= 128 for value in asked[1].values()), "a validator was sent back whole"


def test_wrong_software_installation_is_refused(world: World, on_v1: Agent) -> None:
    """Another host's genuine release, under this host's name."""
    world.publish("web-2")
    other = (world.store_dir / release_path("web-2", 2)).read_bytes()
    world.publish()
    world.server.answers[release_path(HOST, 2)] = serve_bytes(other)
    assert on_v1.poll() == "refused"
    assert metric(on_v1, "reconciler_agent_refusals_total", {"reason": "tampered"}) == 1
    # The publisher's own key listing another host's release for this one: wrong host.
    del world.server.answers[release_path(HOST, 2)]
    world.store.put_bytes(release_path(HOST, 3), other)
    world.versions[HOST] = 3
    world.publisher().sync(dict(world.versions))
    assert on_v1.poll() == "refused"
    assert metric(on_v1, "reconciler_agent_refusals_total", {"reason": "wrong-host"}) == 1
    assert running(on_v1) == 1


def test_fast_forward_recovery_after_the_online_key_is_rotated(world: World, on_v1: Agent) -> None:
    """The online key leaked; the attacker signed a timestamp of a huge version. After
    the operators rotate the online roles to a new key, agents accept the new, lower
    timestamp versions (TUF drops a timestamp whose keys were rotated)."""
    leaked = world.read("timestamp", None)
    leaked.signed.version = 1_000_000
    leaked.signatures.clear()
    leaked.sign(world.keys["online"].signer)
    world.server.answers[tuf_path("timestamp", None)] = serve_bytes(leaked.to_bytes(SERIALIZER))
    assert on_v1.poll() == "current"  # validly signed: TUF cannot tell yet
    del world.server.answers[tuf_path("timestamp", None)]
    assert on_v1.poll() == "refused"  # the honest timestamp now looks like a rollback
    rotate_online(world, "online2")
    world.publish()
    assert world.timestamp_version() < 1_000_000
    assert on_v1.poll() == "updated" and running(on_v1) == 2


def rotate_online(world: World, new: str) -> None:
    """Move timestamp, snapshot and the bins from the current online key to ``new``."""
    old, key = world.keys[world.online], world.keys[new]
    signers = {old.keyid: old.signer, key.keyid: key.signer}
    new_key = key.signer.public_key

    def online_roles(root: Root, targets: Targets) -> None:
        for role in (RoleName.TIMESTAMP, RoleName.SNAPSHOT):
            tufrepo.add_key(root, targets, role, new_key)
            tufrepo.revoke_key(root, targets, role, old.keyid)

    def bins(root: Root, targets: Targets) -> None:
        tufrepo.add_key(root, targets, RoleName.BINS, new_key)
        tufrepo.revoke_key(root, targets, RoleName.BINS, old.keyid)

    repo = world.publisher()
    repo.change_keys(RoleName.TIMESTAMP, online_roles, signers)
    repo.change_keys(RoleName.BINS, bins, signers)
    world.online, world.repo = new, None


def test_key_compromise_below_threshold_is_refused(world: World, on_v1: Agent) -> None:
    """Root needs 2 of 2 keys; an attacker holding one cannot publish a root of its own."""
    online, root2 = world.keys["online"], world.keys["root2"]
    signers = {online.keyid: online.signer, root2.keyid: root2.signer}
    repo = world.publisher()
    r2 = root2.signer.public_key
    repo.change_keys(RoleName.ROOT, lambda root, t: tufrepo.add_key(root, t, RoleName.ROOT, r2), signers)
    repo.change_keys(RoleName.ROOT, lambda root, t: tufrepo.set_threshold(root, t, RoleName.ROOT, 2), signers)
    assert on_v1.poll() == "current"
    root: Metadata[Root] = world.read("root", 3)
    assert root.signed.roles["root"].threshold == 2
    # The attacker holds root2 only: a root 4 handing timestamp to its own key.
    evil = Metadata.from_bytes(root.to_bytes(SERIALIZER))
    evil.signed.version = 4
    attacker = world.keys["attacker"]
    evil.signed.add_key(attacker.signer.public_key, "timestamp")
    evil.signatures.clear()
    evil.sign(root2.signer)
    evil.sign(attacker.signer, append=True)
    (world.store_dir / tuf_path("root", 4)).write_bytes(evil.to_bytes(SERIALIZER))
    world.publish("web-2")
    assert on_v1.poll() == "refused"
    assert metric(on_v1, "reconciler_agent_refusals_total", {"reason": "bad-signature"}) == 1
    assert running(on_v1) == 1


def test_root_rotation_chain_is_followed_by_new_and_old_agents(world: World, on_v1: Agent) -> None:
    """Root moves from the first key to root2, then to root2 and root3 (2 of 2): an
    agent running follows; a new agent pinned to the first key walks the chain; one
    pinned to root3 only starts from the first root it signed."""
    online, root2, root3 = world.keys["online"], world.keys["root2"], world.keys["root3"]
    signers = {k.keyid: k.signer for k in (online, root2, root3)}
    repo = world.publisher()
    k2, k3 = root2.signer.public_key, root3.signer.public_key
    repo.change_keys(RoleName.ROOT, lambda r, t: tufrepo.add_key(r, t, RoleName.ROOT, k2), signers)
    repo.change_keys(
        RoleName.ROOT, lambda r, t: tufrepo.revoke_key(r, t, RoleName.ROOT, online.keyid), signers
    )
    repo.change_keys(RoleName.ROOT, lambda r, t: tufrepo.add_key(r, t, RoleName.ROOT, k3), signers)
    repo.change_keys(RoleName.ROOT, lambda r, t: tufrepo.set_threshold(r, t, RoleName.ROOT, 2), signers)
    assert world.read("root", 5).signed.roles["root"].threshold == 2
    world.publish()
    assert on_v1.poll() == "updated" and running(on_v1) == 2
    fresh = world.agent(name="fresh")
    assert fresh.poll() == "updated" and running(fresh) == 2
    pinned3 = world.agent(pinned="root3", name="root3")
    assert pinned3.poll() == "updated" and running(pinned3) == 2
    outsider = world.agent(pinned="attacker", name="outsider")
    assert outsider.poll() == "refused"


def test_non_consecutive_root_version_is_refused(world: World, on_v1: Agent) -> None:
    """2.root.json holding a validly signed root version 3."""
    online = world.keys["online"]
    root: Metadata[Root] = world.read("root", 1)
    skip = Metadata.from_bytes(root.to_bytes(SERIALIZER))
    skip.signed.version = 3
    skip.signatures.clear()
    skip.sign(online.signer)
    (world.store_dir / tuf_path("root", 2)).write_bytes(skip.to_bytes(SERIALIZER))
    world.publish()
    assert on_v1.poll() == "refused"
    assert running(on_v1) == 1


def test_a_store_without_tuf_metadata_installs_nothing(world: World) -> None:
    """Release files alone (an older publisher) are not enough: nothing vouches for them."""
    world.publish(sync=False)
    agent = world.agent()
    assert agent.poll() == "error"
    assert running(agent) == 0

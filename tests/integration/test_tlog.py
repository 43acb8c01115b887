"""The transparency log with real gpg keys: the agent over a real HTTP server on
127.0.0.1, `reconciler log verify` and `reconciler log cosign` as an operator runs them,
and (last) several real reconcile passes with Nix.

The store is published in the daemon's order (blobs, release, log, latest.json, then
TUF metadata); the attacker, where a test says so, holds the publisher's key (a
publisher that shows one host another history) or only the store (a rewritten leaf).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.adapters.clock import SystemClock
from reconciler.adapters.gpg import Signer
from reconciler.adapters.notes import OpenPgpNoteSigner, OpenPgpNoteVerifier
from reconciler.adapters.store import FilesystemStore
from reconciler.adapters.tufkeys import metadata_signer
from reconciler.agent.config import AgentConfig, load_agent_config
from reconciler.agent.updater import Agent
from reconciler.config import TufConfig, load_config
from reconciler.core import openpgp, tlog
from reconciler.core.layout import CHECKPOINT, log_path, release_path
from reconciler.core.note import parse_note
from reconciler.core.release import Artifact, new_release
from reconciler.core.tufrepo import Lifetimes
from reconciler.daemon.publish import publish
from reconciler.daemon.tlog import TransparencyLog
from reconciler.daemon.tuf import TufRepository
from reconciler.errors import VerificationError
from reconciler.wiring import open_agent, open_reconciler, verify_signed
from tests.conftest import PAGE_SITE, ConfigRepo, Signing, cli, gpg_verify, signing_keys, write_config
from tests.integration.test_tuf_attacks import Server, http_agent

pytestmark = pytest.mark.integration

HOST = "web-1"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Signing]]:
    with signing_keys(tmp_path_factory, "tlog", ("pub", "witness")) as made:
        yield made


@dataclass
class World:
    """A store published to in the daemon's order, served over HTTP, with agents."""

    tmp: Path
    keys: dict[str, Signing]
    clock: SystemClock = field(default_factory=SystemClock)
    versions: dict[str, int] = field(default_factory=dict)
    agents: list[Agent] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.store_dir = self.tmp / "store"
        self.store_dir.mkdir(parents=True)
        self.store = FilesystemStore(self.store_dir)
        self.server = Server(self.store_dir)
        pub = self.keys["pub"]
        self.signer = Signer(pub.gnupghome, pub.fingerprint)
        self.tuf = TufRepository(
            self.store,
            self.tmp / "publisher-tuf",
            lambda: metadata_signer(pub.gnupghome, pub.fingerprint),
            self.clock,
            TufConfig(Lifetimes(timestamp=timedelta(hours=1)), bit_length=2),
        )
        self.log = self.daemon_log(self.store, self.tmp / "publisher-tlog")

    def daemon_log(self, store: FilesystemStore, state: Path) -> TransparencyLog:
        return TransparencyLog(
            store,
            lambda: OpenPgpNoteSigner(self.signer),
            lambda: OpenPgpNoteVerifier([self.keys["pub"].public_key.read_bytes()]),
            state,
        )

    def publish(self, host: str = HOST, logged: bool = True, sync: bool = True) -> int:
        """The host's next release (logged unless not), then the TUF metadata."""
        version = self.versions.get(host, 0) + 1
        self.versions[host] = version
        blob = self.tmp / f"{host}-{version}.AppImage"
        blob.write_bytes(f"{host} release {version}".encode())
        art = Artifact(
            "appimage", blob.name, blob.stat().st_size, hashlib.sha256(blob.read_bytes()).hexdigest()
        )
        r = new_release(
            host, version, "c" * 40, "/nix/store/x.drv", (art,), self.clock.now(), timedelta(days=30)
        )
        publish(
            self.store,
            r,
            {"appimage": blob},
            self.signer.sign_file,
            self.signer.sign,
            log=(lambda rel, meta: self.log.append_release(rel.host, rel.version, meta)) if logged else None,
        )
        if sync:
            self.tuf.sync(dict(self.versions))
        return version

    def agent(self, name: str = "a", **cfg: Any) -> Agent:
        config = AgentConfig(
            path=self.tmp / f"{name}.yaml",
            host=HOST,
            store=self.server.url,
            keys=(self.keys["pub"].public_key,),
            state_dir=self.tmp / f"agent-{name}",
            timeout=10.0,
            require_log=True,
            **cfg,
        )
        agent = http_agent(config, self.clock)
        self.agents.append(agent)
        return agent

    def checkpoint(self) -> tlog.Checkpoint:
        return tlog.parse_checkpoint(parse_note((self.store_dir / CHECKPOINT).read_bytes()).text)


@pytest.fixture
def world(tmp_path: Path, keys: dict[str, Signing]) -> Iterator[World]:
    w = World(tmp_path, keys)
    try:
        yield w
    finally:
        w.server.stop()


def refusals(agent: Agent, reason: str) -> float:
    return (
        agent.metrics.registry.get_sample_value("reconciler_agent_refusals_total", {"reason": reason}) or 0.0
    )


def seen(agent: Agent) -> tlog.Checkpoint:
    note = parse_note((agent.cfg.state_dir / "log-checkpoint").read_bytes())
    return tlog.parse_checkpoint(note.text)


def test_inclusion_and_consistency_check_out_release_after_release(world: World) -> None:
    world.publish()
    world.publish("web-2")
    agent = world.agent()
    assert agent.poll() == "updated"
    assert seen(agent).size == 2
    for _ in range(3):
        world.publish("web-2")
        world.publish()
        assert agent.poll() == "updated"
        assert seen(agent) == world.checkpoint()
    assert agent.state.version == 4 and seen(agent).size == 8
    # The checkpoint's signature is a plain OpenPGP signature of its text.
    note = parse_note((world.store_dir / CHECKPOINT).read_bytes())
    (world.tmp / "cp.txt").write_bytes(note.text)
    (world.tmp / "cp.asc").write_bytes(openpgp.armor(note.signatures[0].signature))
    verified = gpg_verify(
        world.keys["pub"].public_key, world.tmp / "cp.txt", world.tmp / "cp.asc", world.tmp / "v"
    )
    assert verified.returncode == 0, verified.stderr
    # And the whole log audits clean, with the agent's head as a head seen elsewhere.
    out = cli(
        "log", "verify", "--store", str(world.store_dir), "--key", str(world.keys["pub"].public_key),
        "--seen", str(agent.cfg.state_dir / "log-checkpoint"),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8 entries" in out.stdout and "OK: the log checks out" in out.stdout
    # Over HTTP, without a listing: each logged release is read back.
    out = cli("log", "verify", "--store", world.server.url, "--key", str(world.keys["pub"].public_key))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "8 release files checked" in out.stdout


def test_an_agent_refuses_a_release_when_a_leaf_was_rewritten(world: World) -> None:
    world.publish()
    world.publish("web-2")
    agent = world.agent()
    assert agent.poll() == "updated"
    world.publish()
    # The store rewrites web-2's leaf (index 1) in the tile a proof is computed from.
    tile = world.store_dir / log_path(tlog.Tile(0, 0, 3))
    data = tile.read_bytes()
    fake = tlog.leaf_hash(tlog.release_entry("web-2", 1, "0" * 64))
    tile.write_bytes(data[:32] + fake + data[64:])
    assert agent.poll() == "refused"
    assert refusals(agent, "not-in-log") == 1
    assert agent.state.version == 1
    out = cli("log", "verify", "--store", str(world.store_dir), "--key", str(world.keys["pub"].public_key))
    assert out.returncode == 1
    assert "tile/0/000.p/3 does not match the log's entries" in out.stdout
    # Put right, the same release goes through at the next poll (not-in-log is not final).
    tile.write_bytes(data)
    assert agent.poll() == "updated"
    assert agent.state.version == 2


def test_an_agent_refuses_a_forked_tree_head_of_the_size_it_saw(world: World) -> None:
    """The publisher's key signs a second history of the same size, in which this host's
    next release sits where another host's release is in the history it saw."""
    world.publish()
    world.publish("web-2")
    agent = world.agent()
    assert agent.poll() == "updated"
    honest = seen(agent)
    # Release 2 of web-1, and another log of the same key holding [web-1 1, web-1 2]
    # where the agent saw [web-1 1, web-2 1].
    world.publish(logged=False, sync=False)
    fork_dir = world.tmp / "fork"
    fork_log = world.daemon_log(FilesystemStore(fork_dir), world.tmp / "fork-tlog")
    for version in (1, 2):
        fork_log.append_release(HOST, version, (world.store_dir / release_path(HOST, version)).read_bytes())
    forked = tlog.parse_checkpoint(parse_note((fork_dir / CHECKPOINT).read_bytes()).text)
    assert forked.size == honest.size and forked.root != honest.root
    # The store serves that log to this host, and TUF names release 2.
    shutil.rmtree(world.store_dir / "log")
    shutil.copytree(fork_dir / "log", world.store_dir / "log")
    for f in (fork_dir / "hosts" / HOST / "releases").iterdir():
        shutil.copy(f, world.store_dir / "hosts" / HOST / "releases" / f.name)
    world.tuf.sync(dict(world.versions))
    assert agent.poll() == "refused"
    assert refusals(agent, "split-view") == 1
    assert agent.state.version == 1 and seen(agent) == honest
    # An audit with the head the agent saw says the same.
    out = cli(
        "log", "verify", "--store", str(world.store_dir), "--key", str(world.keys["pub"].public_key),
        "--seen", str(agent.cfg.state_dir / "log-checkpoint"),
    )  # fmt: skip
    assert out.returncode == 1
    assert "split view" in out.stdout
    # A host that saw nothing yet cannot tell the fork from the log, unless it needs a
    # witness, which co-signs only what extends what it co-signed before.
    witnessed = world.agent("witnessed", log_witnesses=(world.keys["witness"].public_key,))
    assert witnessed.poll() == "refused"
    assert refusals(witnessed, "not-in-log") == 1


def test_an_agent_that_needs_a_witness_waits_for_its_cosignature(world: World, tmp_path: Path) -> None:
    pub = world.keys["pub"]
    cfg = write_config(
        tmp_path / "daemon",
        ConfigRepo(tmp_path / "repo"),
        pub,
        store={"type": "filesystem", "path": str(world.store_dir)},
    )
    witness = world.keys["witness"]
    world.publish()
    agent = world.agent(log_witnesses=(witness.public_key,))
    assert agent.poll() == "refused"
    assert refusals(agent, "not-in-log") == 1
    out = cli("log", "cosign", "-c", str(cfg), "--gnupghome", str(witness.gnupghome))
    assert out.returncode == 0, out.stderr
    assert f"witness/{witness.fingerprint} co-signed" in out.stdout
    assert agent.poll() == "updated"
    world.publish()
    assert agent.poll() == "refused"  # the new head is not co-signed yet
    assert refusals(agent, "not-in-log") == 2
    assert cli("log", "cosign", "-c", str(cfg), "--gnupghome", str(witness.gnupghome)).returncode == 0
    assert agent.poll() == "updated"
    out = cli("log", "verify", "-c", str(cfg), "--witness-key", str(witness.public_key))
    assert out.returncode == 0, out.stdout + out.stderr
    # The publisher's and the witness's signatures, each a plain OpenPGP one.
    note = parse_note((world.store_dir / CHECKPOINT).read_bytes())
    assert len(note.signatures) == 2
    assert OpenPgpNoteVerifier([witness.public_key.read_bytes()]).verified(note) == {witness.fingerprint}


# -- several real passes ----------------------------------------------------------

WEB = """\
name: {name}
formats: [appimage]
network: {{address: 10.42.0.{octet}/24}}
services:
  web: {{package: site, exec: [bin/busybox, httpd, -f, -p, "18099", -h, srv/www]}}
"""


def test_real_passes_log_every_release_and_the_agent_follows(
    tmp_path: Path, signing: Signing, keys: dict[str, Signing]
) -> None:
    repo = ConfigRepo(tmp_path / "repo")
    repo.write("packages/site.nix", PAGE_SITE.format(page="one"))
    repo.write("hosts/web-1.yaml", WEB.format(name="web-1", octet=11))
    repo.commit("one")
    cfg_path = write_config(tmp_path / "daemon", repo, signing)
    cfg = load_config(cfg_path)
    agent_cfg = tmp_path / "agent.yaml"
    agent_cfg.write_text(
        yaml.safe_dump(
            {
                "host": "web-1",
                "store": str(cfg.store.path),
                "keys": [str(signing.public_key)],
                "state_dir": str(tmp_path / "agent"),
                "require_log": True,
            }
        )
    )
    agent = open_agent(load_agent_config(agent_cfg))
    for n, page in enumerate(["one", "two", "three"], start=1):
        if n > 1:
            repo.write("packages/site.nix", PAGE_SITE.format(page=page))
            if n == 3:
                repo.write("hosts/web-2.yaml", WEB.format(name="web-2", octet=12))
            repo.commit(page)
        rec = open_reconciler(cfg)
        try:
            assert rec.reconcile().ok
        finally:
            rec.close()
        assert agent.poll() == "updated"
        assert agent.state.version == n
    assert seen(agent).size == 4  # web-1 1, 2, 3 and web-2 1
    out = cli("log", "verify", "-c", str(cfg_path), "--seen", str(tmp_path / "agent" / "log-checkpoint"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 entries" in out.stdout and "4 release files checked" in out.stdout
    # A rewritten leaf: the audit fails, and the daemon will not extend that log.
    assert cfg.store.path is not None
    tile = cfg.store.path / log_path(tlog.Tile(0, 0, 4))
    data = tile.read_bytes()
    tile.write_bytes(data[:8] + bytes([data[8] ^ 1]) + data[9:])
    out = cli("log", "verify", "-c", str(cfg_path))
    assert out.returncode == 1 and "does not match the log's entries" in out.stdout
    repo.write("packages/site.nix", PAGE_SITE.format(page="four"))
    repo.commit("four")
    out = cli("reconcile", "-c", str(cfg_path))
    assert out.returncode == 1
    assert "log tiles" in out.stdout + out.stderr
    assert json.loads((cfg.store.path / "hosts/web-1/latest.json").read_bytes())["version"] == 3


def test_only_a_release_this_key_signed_is_logged_unpublished(world: World) -> None:
    """wiring.verify_signed, which decides whether a release a crash left out of the log
    goes in: the publisher's own signature, checked by gpg against its public key."""
    data = b'{"host": "web-1", "version": 2}'
    key = world.signer.public_key()
    verify_signed(key, data, world.signer.sign(data), "releases/2.json")
    with pytest.raises(VerificationError, match="changed after signing"):
        verify_signed(key, data + b" ", world.signer.sign(data), "releases/2.json")
    witness = world.keys["witness"]
    other = Signer(witness.gnupghome, witness.fingerprint)
    with pytest.raises(VerificationError, match="not a trusted key"):
        verify_signed(key, data, other.sign(data), "releases/2.json")

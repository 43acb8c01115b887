"""The whole reconcile pass (reconciler.daemon.reconciler) on in-memory fakes of every port."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli import status_lines
from reconciler.config import (
    Config,
    ImagesConfig,
    NixConfig,
    RepoConfig,
    RetentionConfig,
    SigningConfig,
    StoreConfig,
)
from reconciler.core import hosts
from reconciler.core.builders import Probe, Sandbox
from reconciler.core.layout import AttestationKind, attestation_path, latest_path, release_path
from reconciler.core.model import (
    COMMIT_KEY,
    LAST_PASS_KEY,
    SOURCE_ERROR_KEY,
    Action,
    Evaluation,
    PassRecord,
    PassResult,
    Status,
)
from reconciler.core.provenance import ProvenanceSummary
from reconciler.core.release import RELEASE_LIMIT, parse_release
from reconciler.core.trust import check_attestation
from reconciler.core.tufroles import TIMESTAMP_LIMIT
from reconciler.daemon import parsing
from reconciler.daemon.gate import CommitRefusedError, Gate
from reconciler.daemon.reconciler import Reconciler, status
from reconciler.daemon.tuf import TufRepository
from reconciler.errors import ConfigError, ReconcilerError
from reconciler.ports import EventLog, Ports
from tests.conftest import reconciler_log
from tests.fakes import (
    FakeClock,
    FakeNix,
    FakePackager,
    FakeSigner,
    FakeSource,
    MemoryLedger,
    MemoryStore,
    RefusingGate,
)

HOST = "name: {name}\nformats: [aci]\nnetwork: {{address: {address}}}\n"
FLEET = {
    "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.1/24"),
    "hosts/web-2.yaml": HOST.format(name="web-2", address="10.0.0.2/24"),
}


@dataclass
class World:
    tmp: Path
    source: FakeSource = field(default_factory=FakeSource)
    store: MemoryStore = field(default_factory=MemoryStore)
    ledger: MemoryLedger = field(default_factory=MemoryLedger)
    signer: FakeSigner = field(default_factory=FakeSigner)
    clock: FakeClock = field(default_factory=FakeClock)
    allow_force_push: bool = False
    images: ImagesConfig = field(default_factory=ImagesConfig)
    gate: RefusingGate | None = None
    public_url: str | None = None
    packager: FakePackager = field(default_factory=FakePackager)
    # Where a pass records its events; none kept here (subclasses keep them).
    history: EventLog | None = None
    nix: FakeNix = field(init=False)

    def __post_init__(self) -> None:
        self.nix = FakeNix(self.tmp / "builds", self.source)

    def config(self) -> Config:
        return Config(
            path=self.tmp / "reconciler.yaml",
            repo=RepoConfig(url="/nonexistent/repo", allow_force_push=self.allow_force_push),
            store=StoreConfig(type="filesystem", path=self.tmp / "unused-store", public_url=self.public_url),
            state_dir=self.tmp / "state",
            signing=SigningConfig(gnupghome=self.tmp / "gnupg", key="K"),
            nix=NixConfig(),
            retention=RetentionConfig(interval=0),
            images=self.images,
        )

    def reconciler(self) -> Reconciler:
        """A daemon process over this world (a new one per restart)."""
        cfg = self.config()
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        gate = self.gate if self.gate is not None else Gate(cfg.repo)
        ports = Ports(
            self.source,
            self.nix,
            self.store,
            self.ledger,
            gate,
            lambda: self.signer,
            self.clock,
            self.packager,
            events=self.history,
        )
        return Reconciler(
            cfg,
            ports,
            tuf=lambda online: TufRepository(self.store, cfg.state_dir / "tuf", online, self.clock, cfg.tuf),
        )

    def latest(self, host: str) -> dict[str, Any]:
        data = self.store.get_bytes(latest_path(host), RELEASE_LIMIT)
        assert data is not None, f"{host} has no latest.json"
        doc = json.loads(data)
        assert isinstance(doc, dict)
        return doc


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def outcomes(rec: Reconciler) -> dict[str, tuple[bool, int | None]]:
    result = rec.reconcile()
    return {o.host: (o.ok, o.version) for o in result.outcomes}


def test_a_commit_publishes_every_host_signed_and_in_order(world: World) -> None:
    commit = world.source.push(FLEET)
    assert outcomes(world.reconciler()) == {"web-1": (True, 1), "web-2": (True, 1)}
    for host in ("web-1", "web-2"):
        assert world.latest(host)["commit"] == commit
        # SPEC's order: blobs and their signatures, the release file, latest.json last.
        release, latest = release_path(host, 1), latest_path(host)
        blobs = [str(a["blob"]) for a in world.latest(host)["artifacts"]]
        order = world.store.writes.index
        assert max(order(b + sfx) for b in blobs for sfx in ("", ".asc")) < order(release + ".asc")
        assert order(release + ".asc") < order(release) < order(latest + ".asc") < order(latest)
        for key in (release, latest):
            assert world.store.exists(key + ".asc")
    assert world.ledger.meta[COMMIT_KEY] == commit
    assert {h: s.version for h, s in world.ledger.states.items()} == {"web-1": 1, "web-2": 1}


def test_each_aci_is_published_where_appc_discovery_finds_it_with_the_page_that_says_so(world: World) -> None:
    world.images = ImagesConfig("example.com/fleet", "https://store.example/", ())
    world.source.push(FLEET)
    world.reconciler().reconcile()
    for host in ("web-1", "web-2"):
        (aci,) = world.latest(host)["artifacts"]
        copy = f"example.com/fleet/{host}-1-linux-amd64.aci"
        assert world.store.objects[copy] == world.store.objects[aci["blob"]]
        assert world.store.objects[copy + ".asc"] == world.store.objects[aci["blob"] + ".asc"]
        # Before the release file names the build.
        assert world.store.writes.index(copy + ".asc") < world.store.writes.index(release_path(host, 1))
    page = world.store.objects["fleet/index.html"].decode()
    assert (
        '<meta name="ac-discovery" content="example.com/fleet '
        'https://store.example/{name}-{version}-{os}-{arch}.{ext}">' in page
    )
    assert (
        '<meta name="ac-discovery-pubkeys" content="example.com/fleet https://store.example/keys/publisher.asc">'
        in page
    )
    # Written once, not by every publish.
    assert world.store.writes.count("fleet/index.html") == 1


def test_every_release_carries_its_signed_provenance_and_sbom(world: World) -> None:
    commit = world.source.push(FLEET)
    world.nix.builder_of["web-2"] = "build-1"
    assert outcomes(world.reconciler()) == {"web-1": (True, 1), "web-2": (True, 1)}
    keys = [world.signer.metadata_signer().public_key]
    for host in ("web-1", "web-2"):
        release = parse_release(world.store.objects[release_path(host, 1)], host)
        assert [a.kind for a in release.attestations] == [AttestationKind.PROVENANCE, AttestationKind.SBOM]
        order = world.store.writes.index
        for att in release.attestations:
            assert att.path == attestation_path(host, 1, att.kind)
            assert order(att.path) < order(release_path(host, 1) + ".asc")
            got = check_attestation(att.kind, world.store.objects[att.path], release, keys, att.path)
            assert got.keyid == keys[0].keyid
        prov = check_attestation(
            AttestationKind.PROVENANCE,
            world.store.objects[attestation_path(host, 1, AttestationKind.PROVENANCE)],
            release,
            keys,
            host,
        ).summary
        assert isinstance(prov, ProvenanceSummary)
        assert (prov.commit, prov.host, prov.repository, prov.branch) == (
            commit,
            host,
            "/nonexistent/repo",
            "main",
        )
        assert (prov.builder, prov.built) == ("build-1" if host == "web-2" else "local", True)
        assert prov.reproducibility == "not run"
        assert prov.store_paths == 2  # the image and the toolchain; the output is a byproduct


def test_an_unchanged_fleet_builds_nothing_and_a_change_rebuilds_only_its_host(world: World) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    builds, evaluated = len(world.nix.builds), len(world.nix.evaluated)
    rec.reconcile()
    assert len(world.nix.builds) == builds
    # Nor is anything evaluated again: the ledger keeps each host's image by its inputs.
    assert len(world.nix.evaluated) == evaluated
    world.source.push({**FLEET, "hosts/web-2.yaml": HOST.format(name="web-2", address="10.0.0.9/24")})
    assert outcomes(rec) == {"web-2": (True, 2)}
    assert world.nix.evaluated[evaluated:] == ["web-2"]
    assert world.latest("web-1")["version"] == 1


PKG = '{{ toolchain }}:\n# {comment}\nderivation {{ name = "{name}"; }}\n'


def package_fleet(hosts: int = 20) -> dict[str, str]:
    """``hosts`` hosts of which one in twenty (web-0) uses package ``rare``, the rest ``common``."""
    files = {f"packages/{p}.nix": PKG.format(comment="v1", name=p) for p in ("common", "rare")}
    files["README.md"] = "# fleet\n"
    for i in range(hosts):
        pkg = "rare" if i % 20 == 0 else "common"
        files[f"hosts/web-{i}.yaml"] = (
            HOST.format(name=f"web-{i}", address=f"10.0.0.{i + 1}/24")
            + f"services: {{web: {{package: {pkg}, exec: [bin/web]}}}}\n"
        )
    return files


def test_only_what_reaches_a_host_re_evaluates_it(world: World) -> None:
    files = package_fleet()
    world.source.push(files)
    rec = world.reconciler()
    rec.plan()
    assert len(world.nix.evaluated) == 20
    # A README edit: the packages are evaluated again (a package may read any file),
    # their ids are unchanged, and no host is evaluated.
    files["README.md"] = "# fleet\nmore docs\n"
    world.source.push(files)
    before = world.nix.package_evaluations
    rec.plan()
    assert len(world.nix.evaluated) == 20 and world.nix.package_evaluations == before + 1
    # A new commit that changes nothing outside hosts/ and profiles/ does not evaluate
    # the packages either.
    world.source.push({**files, "hosts/web-1.yaml": files["hosts/web-1.yaml"] + "\n"})
    rec.plan()
    assert world.nix.package_evaluations == before + 1 and len(world.nix.evaluated) == 20
    # A comment in a package: its derivation is the same, no host is evaluated.
    files["packages/rare.nix"] = PKG.format(comment="v2", name="rare")
    world.source.push(files)
    rec.plan()
    assert len(world.nix.evaluated) == 20
    # A real change to the package one host in twenty uses: those hosts alone.
    files["packages/rare.nix"] = PKG.format(comment="v2", name="rare-2")
    world.source.push(files)
    rec.plan()
    assert world.nix.evaluated[20:] == ["web-0"]


def test_each_batch_of_parsed_hosts_is_evaluated_while_the_next_is_parsed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parsing, "MIN_BATCH", 5)
    files = package_fleet(20)
    world.source.push(files)
    first_evaluated = threading.Event()
    real_evaluate, real_parse = world.nix.evaluate, parsing._parse_share
    seen_while_parsing: list[bool] = []

    def evaluate(batch: Sequence[hosts.Host], repo: Path) -> Evaluation:
        first_evaluated.set()
        return real_evaluate(batch, repo)

    def parse(share: Mapping[str, str], digests: dict[str, str]) -> parsing.Results:
        # The second batch waits (boundedly) until Nix has the first one.
        if parses:
            seen_while_parsing.append(first_evaluated.wait(5))
        parses.append(share)
        return real_parse(share, digests)

    parses: list[Mapping[str, str]] = []
    monkeypatch.setattr(world.nix, "evaluate", evaluate)
    monkeypatch.setattr(parsing, "_parse_share", parse)
    obs, plan = world.reconciler().plan()
    assert len(parses) == 4 and seen_while_parsing == [True, True, True]
    # What one evaluation of the whole fleet gives.
    assert sorted(world.nix.evaluated) == sorted(f"web-{i}" for i in range(20))
    assert dict(obs.evaluation.images) == {h.name: world.nix.image(h) for h in obs.fleet.hosts.values()}
    assert plan.counts()["rebuild"] == 20


def test_a_host_whose_package_does_not_evaluate_fails_as_it_without_an_evaluation_of_its_own(
    world: World,
) -> None:
    """A package that never ends cost each of its hosts the evaluation deadline, and
    again on every pass: the packages' own evaluation has said why already."""
    files = package_fleet(2)
    files["packages/rare.nix"] = "broken"
    world.source.push(files)
    rec = world.reconciler()
    obs, plan = rec.plan()
    assert world.nix.evaluated == ["web-1"]
    assert dict(obs.evaluation.errors) == {"web-0": "package rare: error: undefined variable 'broken'"}
    assert [(p.host, p.action) for p in plan.entries if p.host == "web-0"] == [("web-0", Action.INVALID)]
    # What the packages gave is kept with the tree it was evaluated from.
    asked = world.nix.package_evaluations
    world.source.push({**files, "hosts/web-1.yaml": files["hosts/web-1.yaml"] + "# edited\n"})
    rec.plan()
    assert world.nix.package_evaluations == asked and world.nix.evaluated == ["web-1"]
    # Once it evaluates again, its host is evaluated, and cached like the others.
    files["packages/rare.nix"] = PKG.format(comment="fixed", name="rare")
    world.source.push(files)
    rec.plan()
    world.source.push({**files, "README.md": "edited"})
    rec.plan()
    assert world.nix.evaluated == ["web-1", "web-0"]


def test_a_package_stopped_at_a_limit_is_asked_again_and_its_hosts_never_evaluated(world: World) -> None:
    """The deadline may have been the machine's load: its failure is not kept, but its
    hosts still cost no evaluation of their own."""
    files = package_fleet(2)
    files["packages/rare.nix"] = "slow"
    world.source.push(files)
    rec = world.reconciler()
    obs, _ = rec.plan()
    assert dict(obs.evaluation.errors) == {
        "web-0": "package rare: evaluation took longer than 300s and was stopped"
    }
    asked = world.nix.package_evaluations
    world.source.push({**files, "hosts/web-1.yaml": files["hosts/web-1.yaml"] + "# edited\n"})
    obs, _ = rec.plan()
    assert world.nix.package_evaluations == asked + 1 and world.nix.evaluated == ["web-1"]
    assert "web-0" in obs.evaluation.errors


def test_a_pass_at_an_unchanged_head_reads_and_evaluates_nothing_again(world: World) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    reads = world.source.reads
    rec.reconcile()
    assert world.source.reads == reads and len(world.nix.evaluated) == 2


def test_a_new_process_parses_only_the_host_files_that_changed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[str] = []
    real = hosts._parse_host

    def counting(path: str, *args: Any) -> hosts.Host:
        parsed.append(path)
        return real(path, *args)

    monkeypatch.setattr(hosts, "_parse_host", counting)
    files = {**FLEET, "hosts/bad.yaml": "name: bad\nformats: [tar]\n"}
    world.source.push(files)
    first = world.reconciler()
    errors = [str(e) for e in first.plan()[0].fleet.errors]
    assert sorted(parsed) == ["hosts/bad.yaml", "hosts/web-1.yaml", "hosts/web-2.yaml"]
    first.close()
    # A restart at a commit that changed one host: that file alone is parsed, and the
    # others (the invalid one with its error) are as the first process found them.
    world.source.push({**files, "hosts/web-2.yaml": HOST.format(name="web-2", address="10.0.0.9/24")})
    second = world.reconciler()
    obs, plan = second.plan()
    assert parsed[3:] == ["hosts/web-2.yaml"]
    assert [str(e) for e in obs.fleet.errors] == errors and "unknown format 'tar'" in errors[0]
    assert obs.fleet.hosts["web-1"].sources == ("hosts/web-1.yaml",)
    assert [(e.host, e.action) for e in plan.entries if e.host != "bad"] == [
        ("web-1", Action.REBUILD),
        ("web-2", Action.REBUILD),
    ]
    # A deleted host file is forgotten.
    world.source.push({"hosts/web-1.yaml": FLEET["hosts/web-1.yaml"]})
    second.plan()
    assert set(world.ledger.parse_results) == {"hosts/web-1.yaml"}
    second.close()


def test_a_plan_on_a_copy_of_the_ledger_spends_nothing_on_caches_it_drops(world: World) -> None:
    # `reconciler plan` works on a read-only copy (State(read_only=True)), gone at exit:
    # encoding 10,000 parse results into it was a tenth of a cold plan.
    world.source.push(FLEET)
    world.ledger.durable = False
    obs, plan = world.reconciler().plan()
    assert world.ledger.parse_results == {} and world.ledger.evaluations == {}
    assert sorted(obs.evaluation.images) == ["web-1", "web-2"]
    assert [(e.host, e.action) for e in plan.entries] == [
        ("web-1", Action.REBUILD),
        ("web-2", Action.REBUILD),
    ]


def test_a_pass_that_died_after_publishing_is_adopted_not_published_again(world: World) -> None:
    world.source.push(FLEET)
    world.reconciler().reconcile()
    # The process died before recording: a new one starts with an empty ledger.
    world.ledger = MemoryLedger()
    writes = len(world.store.writes)
    assert outcomes(world.reconciler()) == {"web-1": (True, 1), "web-2": (True, 1)}
    # Nothing is built into a new version; only latest.json is written again, as the
    # crash may have come before it.
    assert world.nix.builds.count(("web-1", 2)) == 0
    assert {k for k in world.store.writes[writes:]} == {
        key + sfx for h in ("web-1", "web-2") for key in (latest_path(h),) for sfx in ("", ".asc")
    }
    assert world.ledger.states["web-1"].version == 1


APPIMAGE_FLEET = {"hosts/app-1.yaml": "name: app-1\nformats: [aci, appimage]\n"}


def test_the_published_appimage_is_the_sealed_one_with_its_zsync_files(world: World) -> None:
    world.public_url = "https://store.example/fleet"
    world.source.push(APPIMAGE_FLEET)
    assert outcomes(world.reconciler()) == {"app-1": (True, 1)}
    (app,) = [a for a in world.latest("app-1")["artifacts"] if a["format"] == "appimage"]
    blob = world.store.objects[app["blob"]]
    # What was built, then what the publisher embeds after the build: the update
    # information naming the host's stable zsync file, the key, the signature.
    built = b"appimage of "
    assert blob.startswith(built)
    assert b"|zsync|https://store.example/fleet/hosts/app-1/app-1-latest-x86_64.AppImage.zsync|" in blob
    assert b"-----PUBLIC KEY-----" in blob
    assert hashlib.sha256(blob).hexdigest() == app["sha256"] and len(blob) == app["size"]
    assert world.packager.sealed == ["app-1-1.AppImage"]
    # Beside the blob its control file (URL relative: the blob's name), before the
    # release; at the stable key the same with the blob's public URL, before latest.json.
    control = world.store.objects[app["blob"] + ".zsync"]
    assert f"URL: {app['sha256']}\n".encode() in control
    update = world.store.objects["hosts/app-1/app-1-latest-x86_64.AppImage.zsync"]
    assert f"URL: https://store.example/fleet/{app['blob']}\n".encode() in update
    assert (
        update.replace(f"https://store.example/fleet/{app['blob']}".encode(), app["sha256"].encode())
        == control
    )
    order = world.store.writes.index
    assert order(app["blob"]) < order(app["blob"] + ".zsync") < order(release_path("app-1", 1))
    assert order(release_path("app-1", 1)) < order("hosts/app-1/app-1-latest-x86_64.AppImage.zsync")
    assert order("hosts/app-1/app-1-latest-x86_64.AppImage.zsync") < order(latest_path("app-1") + ".asc")
    # Only the AppImage has a control file.
    (aci,) = [a for a in world.latest("app-1")["artifacts"] if a["format"] == "aci"]
    assert not world.store.exists(aci["blob"] + ".zsync")


def test_without_a_public_url_the_appimage_has_no_update_information(world: World) -> None:
    world.source.push(APPIMAGE_FLEET)
    assert outcomes(world.reconciler()) == {"app-1": (True, 1)}
    (app,) = [a for a in world.latest("app-1")["artifacts"] if a["format"] == "appimage"]
    assert b"||-----PUBLIC KEY-----" in world.store.objects[app["blob"]]
    assert world.store.exists(app["blob"] + ".zsync")
    assert not [k for k in world.store.objects if k.startswith("hosts/app-1/") and k.endswith(".zsync")]


def test_an_adopted_release_keeps_the_appimage_it_published(world: World) -> None:
    world.public_url = "http://store.example"
    world.source.push(APPIMAGE_FLEET)
    world.reconciler().reconcile()
    published = dict(world.store.objects)
    # Died before recording, and before the host's stable zsync file was written.
    world.ledger = MemoryLedger()
    del world.store.objects["hosts/app-1/app-1-latest-x86_64.AppImage.zsync"]
    assert outcomes(world.reconciler()) == {"app-1": (True, 1)}
    # Not sealed again (that would be another signature, another blob): the release
    # stands as published, and the stable zsync file is made from the stored one.
    assert world.packager.sealed == ["app-1-1.AppImage"]
    assert world.store.objects == published


def test_a_missing_blob_of_an_adopted_release_is_not_replaced_by_other_bytes(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.source.push(APPIMAGE_FLEET)
    world.reconciler().reconcile()
    (app,) = [a for a in world.latest("app-1")["artifacts"] if a["format"] == "appimage"]
    world.ledger = MemoryLedger()
    del world.store.objects[app["blob"]]
    rec = world.reconciler()
    # Release 1 can never be completed: the host moves on to a release 2 of its own.
    with caplog.at_level(logging.WARNING, logger="reconciler"):
        assert outcomes(rec) == {"app-1": (True, 2)}
    assert not world.store.exists(app["blob"])
    assert "release_given_up" in caplog.text
    assert world.latest("app-1")["version"] == 2
    for art in world.latest("app-1")["artifacts"]:
        assert world.store.exists(art["blob"])


def test_a_blob_cut_short_in_the_store_is_written_again_not_taken_as_published(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.source.push({**FLEET, **APPIMAGE_FLEET})
    world.reconciler().reconcile()
    (aci,) = world.latest("web-1")["artifacts"]
    (app,) = [a for a in world.latest("app-1")["artifacts"] if a["format"] == "appimage"]
    whole = world.store.objects[aci["blob"]]
    for art in aci, app:
        world.store.objects[art["blob"]] = world.store.objects[art["blob"]][:10]
    world.ledger = MemoryLedger()  # the releases are adopted: published once more
    with caplog.at_level(logging.WARNING, logger="reconciler"):
        result = {o.host: o for o in world.reconciler().reconcile().outcomes}
    # The ACI is built again byte for byte: its blob is written whole.
    assert result["web-1"].ok and world.store.objects[aci["blob"]] == whole
    assert hashlib.sha256(whole).hexdigest() == aci["sha256"] and "blob_replaced" in caplog.text
    # An AppImage is sealed anew, other bytes than the blob: release 1 is given up, saying
    # why, for a release 2.
    assert result["app-1"].ok and result["app-1"].version == 2
    (given_up,) = [r.__dict__["fields"] for r in caplog.records if r.getMessage() == "release_given_up"]
    assert given_up["version"] == 1
    assert f"{app['blob']} is 10 bytes, not {app['size']} and app-1-1.AppImage is not it" in given_up["error"]
    assert len(world.store.objects[app["blob"]]) == 10


def test_a_full_disk_while_sealing_fails_that_host_and_leaves_nothing(world: World) -> None:
    # A killed pass left a sealed copy behind: the next process removes it.
    leftover = world.tmp / "state" / "publish-x1y2"
    leftover.mkdir(parents=True)
    (leftover / "app-1-1.AppImage").write_bytes(b"half")
    world.packager.disk_full = True
    world.source.push({**APPIMAGE_FLEET, **FLEET})
    result = {o.host: o for o in world.reconciler().reconcile().outcomes}
    assert not result["app-1"].ok and result["web-1"].ok and result["web-2"].ok
    assert "cannot seal app-1-1.AppImage: [Errno 28] No space left on device" in (result["app-1"].error or "")
    assert not [k for k in world.store.objects if k.startswith("hosts/app-1/")]
    assert not list((world.tmp / "state").glob("publish-*"))


def take_version_2(world: World) -> bytes:
    """Another release 2 of web-1 in the store (not this daemon's, unknown to the
    ledger), once web-1's release 1 is published: that release file."""
    world.source.push(FLEET)
    world.reconciler().reconcile()
    taken = world.store.get_bytes(release_path("web-1", 1), RELEASE_LIMIT)
    assert taken is not None
    doc = json.loads(taken)
    doc.update(version=2, derivation="/nix/store/" + "0" * 32 + "-other.drv")
    del doc["attestations"]  # release 1's are no other release's
    world.store.objects[release_path("web-1", 2)] = json.dumps(doc).encode()
    return world.store.objects[release_path("web-1", 2)]


def test_a_version_taken_by_another_build_is_skipped(world: World) -> None:
    world.store.objects[latest_path("web-1")] = take_version_2(world)
    world.source.push({**FLEET, "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.7/24")})
    builds = len(world.nix.builds)
    assert outcomes(world.reconciler()) == {"web-1": (True, 3)}
    assert world.latest("web-1")["version"] == 3
    # Version 2 was only instantiated to find it taken: one build, as version 3.
    assert world.nix.builds[builds:] == [("web-1", 3)]
    assert ("web-1", 2) in world.nix.instantiated


def test_status_names_the_version_a_failed_build_was_to_publish_past_a_taken_one(world: World) -> None:
    """Not the published version + 1: version 2 is another build's, so the failed build
    was to be version 3."""
    take_version_2(world)
    world.source.push({**FLEET, "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.7/24")})
    world.nix.failing.add("web-1")
    assert outcomes(world.reconciler()) == {"web-1": (False, 3)}
    st = status_now(world)
    assert (st["hosts"]["web-1"]["version"], st["hosts"]["web-1"]["attempt_version"]) == (1, 3)
    line = next(ln for ln in st["text"].splitlines() if ln.startswith("web-1: "))
    assert line.startswith("web-1: version 1 published; version 3 failed since "), line


def test_a_full_disk_fails_the_hosts_and_leaves_no_pointer_to_anything_missing(world: World) -> None:
    world.source.push(FLEET)
    world.store.full = True
    rec = world.reconciler()
    assert outcomes(rec) == {"web-1": (False, 1), "web-2": (False, 1)}
    assert world.store.objects == {}
    assert world.ledger.states["web-1"].status == Status.FAILED
    assert "No space left on device" in (world.ledger.states["web-1"].error or "")
    assert rec.metrics.registry.get_sample_value("reconciler_publish_failures_total") == 2


def test_a_gpg_failure_publishes_nothing_unsigned(world: World) -> None:
    world.source.push(FLEET)
    world.signer.broken = True
    rec = world.reconciler()
    assert outcomes(rec) == {"web-1": (False, 1), "web-2": (False, 1)}
    assert not any(k.startswith(("hosts/", "tuf/")) for k in world.store.objects)
    # Two releases, then the TUF metadata: each refused by gpg, each counted.
    assert rec.metrics.registry.get_sample_value("reconciler_signing_failures_total") == 3
    assert rec.metrics.registry.get_sample_value("reconciler_tuf_failures_total") == 1


def test_a_failed_build_backs_off_doubling_then_retries(world: World) -> None:
    world.source.push(FLEET)
    world.nix.failing.add("web-1")
    rec = world.reconciler()
    assert outcomes(rec)["web-1"] == (False, 1)
    first = world.ledger.states["web-1"]
    assert (first.failures, first.retry_at) == (1, world.clock.t + 30)
    world.clock.advance(29)
    result = rec.reconcile()
    assert [e.action for e in result.plan.entries if e.host == "web-1"] == [Action.BACKOFF]
    assert world.nix.builds.count(("web-1", 1)) == 1
    world.clock.advance(2)
    assert outcomes(rec)["web-1"] == (False, 1)
    second = world.ledger.states["web-1"]
    assert (second.failures, second.retry_at) == (2, world.clock.t + 60)
    world.nix.failing.clear()
    world.clock.advance(61)
    assert outcomes(rec)["web-1"] == (True, 1)


def test_a_backoff_recorded_under_a_clock_ahead_ends_once_the_clock_is_back(world: World) -> None:
    world.source.push(FLEET)
    world.nix.failing.add("web-1")
    rec = world.reconciler()
    world.clock.advance(30 * 86400)
    assert outcomes(rec)["web-1"] == (False, 1)
    world.nix.failing.clear()
    world.clock.advance(-30 * 86400)
    # The longest backoff (retry.max) has passed since, whatever the clock said then.
    world.clock.advance(world.config().retry.max.total_seconds())
    assert outcomes(rec)["web-1"] == (True, 1)


def test_a_reloaded_retry_max_reaches_the_plan(world: World) -> None:
    world.source.push(FLEET)
    world.nix.failing.add("web-1")
    rec = world.reconciler()
    assert outcomes(rec)["web-1"] == (False, 1)
    world.nix.failing.clear()
    assert outcomes(rec) == {}  # its retry is 30s (retry.initial) away
    # What a SIGHUP's reload sets (reconciler.daemon.loop): no backoff is longer now.
    rec.cfg = replace(rec.cfg, retry=replace(rec.cfg.retry, max=timedelta(seconds=10)))
    assert outcomes(rec)["web-1"] == (True, 1)


def test_a_stop_during_a_pass_finishes_the_builds_started_and_starts_no_other(world: World) -> None:
    world.source.push({**FLEET, "hosts/web-3.yaml": HOST.format(name="web-3", address="10.0.0.3/24")})
    rec = world.reconciler()  # jobs: 1, so the hosts are built one after another
    world.nix.while_building = lambda host: rec.stop()
    result = rec.reconcile()
    assert world.nix.builds == [("web-1", 1)]
    assert {o.host: o.ok for o in result.outcomes} == {"web-1": True}
    assert result.interrupted == ("web-2", "web-3") and not result.succeeded and not result.ok
    # What was not started is not a failure: no backoff, built by the next process.
    assert world.ledger.states["web-1"].version == 1
    assert "web-2" not in world.ledger.states
    world.nix.while_building = None
    again = world.reconciler()
    assert outcomes(again) == {"web-2": (True, 1), "web-3": (True, 1)}


def test_an_invalid_host_costs_only_itself_and_keeps_what_it_published(world: World) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    published = world.store.get_bytes(latest_path("web-1"), RELEASE_LIMIT)
    world.source.push(
        {
            **FLEET,
            "hosts/web-1.yaml": "name: web-1\nformats: [tarball]\n",
            "hosts/web-2.yaml": HOST.format(name="web-2", address="10.0.0.5/24"),
        }
    )
    result = rec.reconcile()
    assert not result.ok
    assert {o.host: o.version for o in result.outcomes} == {"web-2": 2}
    assert world.ledger.states["web-1"].status == Status.INVALID
    assert "formats" in (world.ledger.states["web-1"].error or "")
    assert world.store.get_bytes(latest_path("web-1"), RELEASE_LIMIT) == published


@pytest.mark.parametrize("planted", ["latest", "release"])
def test_a_release_file_larger_than_any_is_refused_unread_and_costs_only_its_host(
    world: World, planted: str
) -> None:
    """Another daemon sharing the store, or whoever can write to the bucket, left a
    file larger than any release (still valid JSON, the same release padded) where
    the pass reads one: latest.json for the next version, or the release file of the
    version it would take. Read no further than the limit; the host fails saying so."""
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    key = latest_path("web-1") if planted == "latest" else release_path("web-1", 2)
    world.store.objects[key] = world.store.objects[latest_path("web-1")] + b" " * RELEASE_LIMIT
    world.source.push({**FLEET, "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.9/24")})
    before = len(world.store.writes)
    assert outcomes(rec) == {"web-1": (False, None)}
    error = world.ledger.states["web-1"].error or ""
    assert key in error and f"larger than {RELEASE_LIMIT} bytes" in error, error
    # It failed before a version was decided: status names none.
    line = next(ln for ln in status_now(world)["text"].splitlines() if ln.startswith("web-1: "))
    assert line.startswith("web-1: version 1 published; a build failed since "), line
    assert not [k for k in world.store.writes[before:] if k.startswith("hosts/web-1/")]


def test_a_longer_object_where_the_key_or_the_discovery_page_goes_is_written_over_unread(
    world: World,
) -> None:
    world.images = ImagesConfig("example.com/fleet", "https://store.example/", ())
    for key in ("keys/publisher.asc", "fleet/index.html"):
        world.store.objects[key] = b" " * RELEASE_LIMIT
    world.source.push(FLEET)
    assert outcomes(world.reconciler()) == {"web-1": (True, 1), "web-2": (True, 1)}
    published = world.signer.public_key()
    assert world.store.objects["keys/publisher.asc"] == published
    assert world.store.limits["keys/publisher.asc"] == len(published)
    page = world.store.objects["fleet/index.html"]
    assert b"ac-discovery" in page and world.store.limits["fleet/index.html"] == len(page)


def test_an_untrusted_commit_builds_nothing_and_says_why(world: World) -> None:
    world.gate = RefusingGate()
    world.gate.refused.add(world.source.push(FLEET))
    rec = world.reconciler()
    with pytest.raises(CommitRefusedError):
        rec.reconcile()
    assert world.nix.builds == [] and world.store.objects == {}
    assert "not signed" in world.ledger.meta[SOURCE_ERROR_KEY]
    assert (
        rec.metrics.registry.get_sample_value("reconciler_untrusted_commits_total", {"reason": "unsigned"})
        == 1
    )
    assert (
        rec.metrics.registry.get_sample_value("reconciler_reconcile_runs_total", {"result": "failure"}) == 1
    )


@pytest.mark.parametrize("allowed", [False, True])
def test_a_force_push_is_refused_unless_allowed(world: World, allowed: bool) -> None:
    world.allow_force_push = allowed
    first = world.source.push(FLEET)
    world.source.push({**FLEET, "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.3/24")})
    rec = world.reconciler()
    rec.reconcile()
    # Back to a sibling of what was reconciled: the first commit's history, rewritten.
    world.source.push(
        {**FLEET, "hosts/web-2.yaml": HOST.format(name="web-2", address="10.0.0.4/24")}, parent=first
    )
    if not allowed:
        with pytest.raises(CommitRefusedError, match="does not descend from"):
            rec.reconcile()
        assert world.latest("web-2")["version"] == 1
    else:
        assert outcomes(rec) == {"web-1": (True, 2), "web-2": (True, 2)}


def test_an_unsandboxed_nix_is_refused_unless_the_config_opts_out(world: World) -> None:
    world.source.push(FLEET)
    world.nix.sandboxed = False
    with pytest.raises(ConfigError, match=r"nix\.sandbox"):
        world.reconciler().reconcile()
    assert world.nix.builds == []
    rec = world.reconciler()
    rec.cfg = replace(rec.cfg, nix=NixConfig(sandbox=False))
    assert outcomes(rec) == {"web-1": (True, 1), "web-2": (True, 1)}
    assert rec.metrics.registry.get_sample_value("reconciler_build_sandbox") == 0


def test_metrics_say_what_the_ledger_says_when_scraped(world: World) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    sample = rec.metrics.registry.get_sample_value
    assert sample("reconciler_host_published_version", {"host": "web-1"}) == 1
    assert sample("reconciler_invalid_hosts") == 0
    # A restart serves what was recorded before any pass of its own.
    assert (
        world.reconciler().metrics.registry.get_sample_value(
            "reconciler_host_published_version", {"host": "web-2"}
        )
        == 1
    )
    world.source.push({"hosts/web-1.yaml": FLEET["hosts/web-1.yaml"], "hosts/web-2.yaml": "name: [web-2]\n"})
    rec.reconcile()
    assert sample("reconciler_invalid_hosts") == 1
    world.source.push({"hosts/web-1.yaml": FLEET["hosts/web-1.yaml"]})
    rec.reconcile()
    # A removed host's series is gone, the others stay.
    assert sample("reconciler_host_published_version", {"host": "web-2"}) is None
    assert sample("reconciler_host_published_version", {"host": "web-1"}) == 1
    assert sample("reconciler_invalid_hosts") == 0


def test_an_invalid_host_fails_itself_not_the_pass(world: World) -> None:
    world.source.push({**FLEET, "hosts/web-2.yaml": "name: [web-2]\n"})
    rec = world.reconciler()
    result = rec.reconcile()
    sample = rec.metrics.registry.get_sample_value
    # `reconcile` still exits 1 (not every host is as defined), but the pass did all
    # it could: ReconcileFailing is for passes that fail, not for one bad file.
    assert not result.ok and result.succeeded
    assert sample("reconciler_reconcile_runs_total", {"result": "success"}) == 1
    assert sample("reconciler_reconcile_runs_total", {"result": "failure"}) == 0
    assert sample("reconciler_host_failing", {"host": "web-2", "status": "invalid"}) == 1
    assert sample("reconciler_host_failing", {"host": "web-1", "status": "invalid"}) is None
    assert sample("reconciler_last_successful_reconcile_timestamp_seconds") == world.clock.now().timestamp()
    # A build that fails does fail the pass, and its host shows as failed.
    world.source.push(FLEET)
    world.nix.failing.add("web-2")
    assert not rec.reconcile().succeeded
    assert sample("reconciler_reconcile_runs_total", {"result": "failure"}) == 1
    assert sample("reconciler_host_failing", {"host": "web-2", "status": "failed"}) == 1


def test_an_invalid_host_is_logged_once_while_it_stands(world: World) -> None:
    world.source.push({**FLEET, "hosts/web-2.yaml": "name: [web-2]\n"})
    rec = world.reconciler()
    with reconciler_log() as out:
        rec.reconcile()
        rec.reconcile()
        world.source.push({**FLEET, "hosts/web-2.yaml": "name: [web-2, again]\n"})
        rec.reconcile()
    # Once, and once more for its new error; a poll every few seconds repeats nothing.
    assert out.getvalue().count("event=host_invalid file=hosts/web-2.yaml") == 2


def test_a_restart_keeps_the_last_success_and_the_source_while_the_repo_is_broken(world: World) -> None:
    world.source.push(FLEET)
    first = world.reconciler()
    first.reconcile()
    at = first.metrics.registry.get_sample_value("reconciler_last_successful_reconcile_timestamp_seconds")
    assert at == world.clock.now().timestamp()
    world.clock.advance(3600)
    world.source.unreachable = "cannot fetch: connection refused"
    again = world.reconciler()
    with pytest.raises(ReconcilerError):
        again.reconcile()
    sample = again.metrics.registry.get_sample_value
    # Not 0 (ReconcileStalled would be pending from the restart on) and not the time
    # of the failed pass.
    assert sample("reconciler_last_successful_reconcile_timestamp_seconds") == at
    assert sample("reconciler_source_info", {"commit": world.source.head or "", "branch": "main"}) == 1


def test_builds_are_counted_per_builder_with_the_builders_that_could_not_take_them(world: World) -> None:
    world.source.push(FLEET)
    world.nix.builder_of = {"web-1": "b1", "web-2": "local"}
    world.nix.refused = {"web-2": {"b1": "ssh: connect to host b1 port 22: Connection refused"}}
    world.nix.while_building = lambda host: world.clock.advance(150 if host == "web-1" else 20)
    rec = world.reconciler()
    assert outcomes(rec) == {"web-1": (True, 1), "web-2": (True, 1)}
    lines = status_now(world)["text"].splitlines()
    # How long each builder's last build took (the fake ledger records it at time 0).
    at = f"{datetime.fromtimestamp(0.0, UTC):%Y-%m-%d %H:%M:%S}Z"
    assert lines[-2].startswith(f"builder b1: 1 built, 0 failed, 1 unreachable; last build {at}, took 2m; ")
    assert lines[-1] == f"builder local: 1 built, 0 failed, 0 unreachable; last build {at}, took 20s"
    world.source.push({**FLEET, "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.7/24")})
    world.nix.failing.add("web-1")
    assert outcomes(rec) == {"web-1": (False, 2)}

    def sample(builder: str, result: str) -> float | None:
        labels = {"builder": builder, "result": result}
        return rec.metrics.registry.get_sample_value("reconciler_builder_builds_total", labels)

    assert (sample("b1", "success"), sample("b1", "failure"), sample("b1", "unreachable")) == (1, 1, 1)
    assert (sample("local", "success"), sample("local", "failure")) == (1, 0)
    b1 = world.ledger.builder_states["b1"]
    assert (b1.builds, b1.failures, b1.unreachable) == (1, 1, 1)
    assert b1.last_error is not None and b1.last_error.startswith("web-1: build of host 'web-1' failed")
    assert world.ledger.builder_states["local"].builds == 1


REFUSED_B3 = "ssh: connect to host b3 port 22: Connection refused"


def test_what_each_builder_s_sandbox_probe_found_is_shown_before_its_first_build(
    world: World, events: io.StringIO
) -> None:
    world.source.push(FLEET)
    world.nix.builder_probes = {
        "b1": Probe(0.0, Sandbox.ON),
        "b2": Probe(0.0, Sandbox.OFF),
        "b3": Probe(0.0, Sandbox.UNKNOWN, f"sandbox probe: {REFUSED_B3}"),
    }
    rec = world.reconciler()
    assert outcomes(rec) == {"web-1": (True, 1), "web-2": (True, 1)}
    sample = rec.metrics.registry.get_sample_value
    assert [sample("reconciler_builder_sandbox", {"builder": b}) for b in ("b1", "b2", "b3")] == [1, 0, 0]
    # A builder that could not be probed is one Nix could not hand a build to.
    assert sample("reconciler_builder_builds_total", {"builder": "b3", "result": "unreachable"}) == 1
    text = status_now(world)["text"].splitlines()
    lines = {ln.split(":")[0]: ln for ln in text if ln.startswith("builder ")}
    assert lines["builder b1"] == "builder b1: 0 built, 0 failed, 0 unreachable; last build never; sandbox on"
    assert lines["builder b2"].endswith(
        "sandbox off; last error 1970-01-01 00:00:00Z: sandbox probe: builds outside Nix's sandbox"
        " (a probe build saw the machine's files): not used"
    )
    assert lines["builder b3"].startswith("builder b3: 0 built, 0 failed, 1 unreachable; last build never;")
    assert lines["builder b3"].endswith(
        f"sandbox unknown; last error 1970-01-01 00:00:00Z: sandbox probe: {REFUSED_B3}"
    )
    said = events.getvalue()
    (refused,) = [ln for ln in said.splitlines() if "event=builder_unsandboxed" in ln]
    assert "level=error" in refused and "builder=b2 used=False" in refused
    assert "event=builder_sandbox builder=b1 sandbox=on" in said
    # Once: later builds do not probe again (the adapter keeps the verdicts).
    assert world.nix.builder_probes == {}


def test_a_suspended_host_keeps_what_it_published_until_resumed(world: World) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    published = world.store.get_bytes(latest_path("web-1"), RELEASE_LIMIT)
    world.ledger.suspend("web-1", world.clock.t)
    moved = {k: HOST.format(name=k[6:-5], address="10.0.0.9/24") for k in FLEET}
    world.source.push(moved)
    result = rec.reconcile()
    assert {o.host: o.version for o in result.outcomes} == {"web-2": 2}
    assert [e.action for e in result.plan.entries] == [Action.SUSPENDED, Action.REBUILD]
    assert result.ok
    assert world.store.get_bytes(latest_path("web-1"), RELEASE_LIMIT) == published
    sample = rec.metrics.registry.get_sample_value
    assert sample("reconciler_host_suspended", {"host": "web-1"}) == 1
    assert sample("reconciler_host_suspended", {"host": "web-2"}) is None
    assert sample("reconciler_fleet_suspended") == 0
    # Its file removed, a suspended host is still served (not removed from the metadata).
    world.source.push({"hosts/web-2.yaml": moved["hosts/web-2.yaml"]})
    rec.reconcile()
    assert world.ledger.states["web-1"].serving
    assert sample("reconciler_host_published_version", {"host": "web-1"}) == 1
    world.source.push(moved)
    world.ledger.resume("web-1")
    assert outcomes(rec) == {"web-1": (True, 2)}
    assert sample("reconciler_host_suspended", {"host": "web-1"}) is None


def test_a_suspended_fleet_fetches_and_builds_nothing_but_keeps_its_metadata_fresh(world: World) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    world.ledger.suspend(None, world.clock.t)
    world.source.push({k: HOST.format(name=k[6:-5], address="10.0.0.9/24") for k in FLEET})
    # Unreachable: a suspended fleet's pass does not even fetch.
    world.source.unreachable = "the remote is being migrated"
    builds, timestamp = len(world.nix.builds), world.store.get_bytes("tuf/timestamp.json", TIMESTAMP_LIMIT)
    world.clock.advance(86400 * 0.6)  # past half the timestamp's lifetime (1 day)
    result = rec.reconcile()
    assert result.fleet_suspended and not result.ok and result.outcomes == ()
    assert [(e.host, e.action) for e in result.plan.entries] == [
        ("web-1", Action.SUSPENDED),
        ("web-2", Action.SUSPENDED),
    ]
    assert len(world.nix.builds) == builds
    assert world.store.get_bytes("tuf/timestamp.json", TIMESTAMP_LIMIT) != timestamp
    assert rec.metrics.registry.get_sample_value("reconciler_fleet_suspended") == 1
    # Not a pass that failed (nor one that succeeded).
    runs = rec.metrics.registry.get_sample_value
    assert runs("reconciler_reconcile_runs_total", {"result": "failure"}) == 0
    last = PassRecord.from_json(world.ledger.get_meta(LAST_PASS_KEY))
    assert last is not None and (last.result, last.at) == (PassResult.SUSPENDED, world.clock.t)
    world.ledger.resume(None)
    world.source.unreachable = None
    assert outcomes(rec) == {"web-1": (True, 2), "web-2": (True, 2)}


def test_a_host_suspended_while_its_build_waits_is_not_started(world: World) -> None:
    world.source.push({**FLEET, "hosts/web-3.yaml": HOST.format(name="web-3", address="10.0.0.3/24")})
    rec = world.reconciler()
    rec.cfg = replace(rec.cfg, jobs=1)  # the hosts are built one after another

    def suspend_web_2(host: str) -> None:
        if host == "web-1":
            world.ledger.suspend("web-2", world.clock.t)

    world.nix.while_building = suspend_web_2
    result = rec.reconcile()
    assert [h for h, _ in world.nix.builds] == ["web-1", "web-3"]
    assert {e.host: e.action for e in result.plan.entries}["web-2"] == Action.SUSPENDED
    # Left, not failed: nothing recorded, no backoff.
    assert "web-2" not in world.ledger.states and result.succeeded and result.ok
    assert rec.metrics.registry.get_sample_value("reconciler_build_queue_depth") == 0
    world.ledger.resume("web-2")
    assert outcomes(rec) == {"web-2": (True, 1)}


def status_now(world: World) -> dict[str, Any]:
    """What `reconciler status --json` says now, and its text (the lease left out)."""
    st = dict(status(world.ledger, world.clock.t, world.config().retry.max.total_seconds()))
    st["lease"] = {"enabled": False}
    st["text"] = "\n".join(status_lines(st, world.clock.t))
    return st


def test_status_says_when_the_last_pass_ran_and_that_every_fetch_fails(world: World) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    ok_at = world.clock.t
    st = status_now(world)
    assert st["last_pass"]["result"] == "success" and st["last_pass"]["at"] == ok_at
    assert st["fetch_error"] is None and "fetch:" not in st["text"]
    assert (
        f"last pass: {datetime.fromtimestamp(ok_at, UTC):%Y-%m-%d %H:%M:%S}Z (0s ago), success" in st["text"]
    )

    world.source.unreachable = "fatal: unable to access 'https://git.example/fleet': Connection refused"
    world.clock.advance(60)
    first = world.clock.t
    with pytest.raises(ReconcilerError):
        rec.reconcile()
    world.clock.advance(60)
    with pytest.raises(ReconcilerError):
        rec.reconcile()
    world.clock.advance(30)
    st = status_now(world)
    assert st["fetch_error"] == {
        "since": first,
        "at": first + 60,
        "passes": 2,
        "error": "fatal: unable to access 'https://git.example/fleet': Connection refused",
    }
    assert st["last_pass"]["result"] == "failure" and "Connection refused" in st["last_pass"]["error"]
    assert st["last_success"] == ok_at
    lines = st["text"].splitlines()
    assert lines[1].startswith("last pass: ") and "(30s ago), failure in " in lines[1], lines
    assert lines[2] == f"last successful pass: {datetime.fromtimestamp(ok_at, UTC):%Y-%m-%d %H:%M:%S}Z"
    assert lines[3].startswith("fetch: FAILING since ") and "(2 pass(es) in a row" in lines[3], lines
    assert lines[4] == (
        f"hosts: as of commit {world.source.head}: newer commits are not seen while the repository"
        " cannot be fetched"
    )
    # The first fetch that works again clears it.
    world.source.unreachable = None
    rec.reconcile()
    st = status_now(world)
    assert st["fetch_error"] is None and st["last_pass"]["result"] == "success"
    assert "FAILING" not in st["text"] and "last successful pass" not in st["text"]


def test_status_names_the_failed_attempts_version_and_its_next_retry(world: World) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    world.source.push({**FLEET, "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.7/24")})
    world.nix.failing.add("web-1")
    failed_at = world.clock.t
    rec.reconcile()
    st = status_now(world)
    web1 = st["hosts"]["web-1"]
    assert (web1["version"], web1["status"], web1["attempt_version"], web1["failures"]) == (1, "failed", 2, 1)
    assert web1["next_retry"] == failed_at + 30
    assert st["hosts"]["web-2"]["attempt_version"] is None and st["hosts"]["web-2"]["next_retry"] is None
    line = next(ln for ln in st["text"].splitlines() if ln.startswith("web-1: "))
    assert line.startswith("web-1: version 1 published; version 2 failed since "), line
    assert "(1 attempt(s) in a row): " in line and "build of host 'web-1' failed" in line
    retry = datetime.fromtimestamp(failed_at + 30, UTC)
    assert line.endswith(f"; next retry at {retry:%Y-%m-%d %H:%M:%S}Z"), line
    assert st["last_pass"]["result"] == "failure" and st["last_pass"]["error"] == "1 host(s) failed: web-1"
    # Its retry time come, the next pass retries it.
    world.clock.advance(31)
    st = status_now(world)
    assert st["hosts"]["web-1"]["next_retry"] is None
    assert "; retried at the next pass" in st["text"]

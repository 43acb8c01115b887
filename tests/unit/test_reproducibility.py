"""The reproducibility gate (reproducibility.check): Nix's --check messages, the summary of
two builds that differ, and the pass on in-memory fakes: a host whose second build differs
publishes nothing, the others go on, and the provenance says whether and where the check ran."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from reconciler.adapters.nix import MAX_REPORTS, Nix, _build_dirs, _listing, diffoscope, kept_build_dirs
from reconciler.config import Config, ReproducibilityConfig, load_config
from reconciler.core.events import EventType
from reconciler.core.layout import AttestationKind, attestation_path, release_path
from reconciler.core.model import Status
from reconciler.core.provenance import ProvenanceSummary
from reconciler.core.release import parse_release
from reconciler.core.reproducibility import Entry, compare, parse_check, printable, summarise
from reconciler.core.trust import check_attestation
from reconciler.errors import ConfigError
from tests.conftest import alive
from tests.fakes import BASE_DRV
from tests.unit.test_daemon_pass import FLEET, outcomes
from tests.unit.test_pass_events import EventWorld

DRV = "/nix/store/00sgh62p6ls9viwnbkrwcaxsxfvzxnm5-nd-501.drv"
OUT = "/nix/store/kwrvcmg703sf633599j58prs82hrm6sb-nd-501"
# What Nix 2.8 printed for `nix-store --realise --check --keep-going --keep-failed` of a
# derivation writing a random uuid and one depending on it.
NIX_CHECK = f"""\
checking outputs of '/nix/store/j8s02piznc8g8kbqj011m88n32w6n4h9-det-501.drv'...
checking outputs of '{DRV}'...
error: derivation '{DRV}' may not be deterministic: output '{OUT}' differs from '{OUT}.check'
error: 1 dependencies of derivation '/nix/store/bfw9xr0q82xsiq7z55xxh5676ga08604-top-501.drv' failed to build
note: keeping build directory '/tmp/nix-build-nd-501.drv-0'
error: build of '{DRV}', '/nix/store/bfw9xr0q82xsiq7z55xxh5676ga08604-top-501.drv' failed
"""


@dataclass
class GateWorld(EventWorld):
    check: bool = True

    def config(self) -> Config:
        return replace(super().config(), reproducibility=ReproducibilityConfig(check=self.check))


@pytest.fixture
def world(tmp_path: Path) -> GateWorld:
    return GateWorld(tmp_path)


def provenance(world: GateWorld, host: str) -> ProvenanceSummary:
    release = parse_release(world.store.objects[release_path(host, 1)], host)
    key = attestation_path(host, 1, AttestationKind.PROVENANCE)
    keys = [world.signer.metadata_signer().public_key]
    summary = check_attestation(
        AttestationKind.PROVENANCE, world.store.objects[key], release, keys, key
    ).summary
    assert isinstance(summary, ProvenanceSummary)
    return summary


def test_nix_check_messages_name_the_derivation_its_output_and_what_was_kept() -> None:
    got = parse_check(NIX_CHECK)
    assert [(m.derivation, m.output, m.check) for m in got.mismatches] == [(DRV, OUT, OUT + ".check")]
    assert got.kept_dirs == ("/tmp/nix-build-nd-501.drv-0",)
    # Without --keep-failed Nix keeps nothing and says less.
    short = parse_check(f"error: derivation '{DRV}' may not be deterministic: output '{OUT}' differs\n")
    assert [(m.output, m.check) for m in short.mismatches] == [(OUT, None)]
    assert parse_check("error: builder for '/nix/store/x.drv' failed with exit code 1\n").mismatches == ()


def test_two_builds_are_compared_file_by_file_and_summarised_on_one_line() -> None:
    first = {
        "": Entry("directory"),
        "a/id": Entry("file", 37, "11" * 32),
        "bin/run": Entry("file", 10, "22" * 32, executable=True),
        "link": Entry("symlink", target="a/id"),
        "old": Entry("file", 1, "33" * 32),
        "same": Entry("file", 3, "44" * 32),
    }
    second = {
        **first,
        "a/id": Entry("file", 37, "55" * 32),
        "bin/run": Entry("file", 10, "22" * 32),
        "link": Entry("symlink", target="b"),
        "new\x1b[31m": Entry("file", 2, "66" * 32),
    }
    del second["old"]
    lines = compare(first, second)
    assert lines == [
        "a/id: 37 bytes, sha256 1111111111111111 vs 37 bytes, sha256 5555555555555555",
        "bin/run: 10 bytes, sha256 2222222222222222, executable vs 10 bytes, sha256 2222222222222222",
        "link: symlink to a/id vs symlink to b",
        "new\\x1b[31m: only in the second build (2 bytes, sha256 6666666666666666)",
        "old: only in the first build (1 bytes, sha256 3333333333333333)",
    ]
    assert summarise(lines, limit=2) == f"{lines[0]}; {lines[1]}; and 3 more"
    assert "metadata only" in summarise([])
    assert printable("a\nb\u202ec") == "a\\x0ab\\u202ec"


def test_the_provenance_says_whether_and_where_the_check_ran(world: GateWorld) -> None:
    world.source.push(FLEET)
    assert outcomes(world.reconciler()) == {"web-1": (True, 1), "web-2": (True, 1)}
    assert provenance(world, "web-1").reproducibility == (
        "passed: 3 derivations built again on local gave the same bytes"
    )
    off = GateWorld(world.tmp / "off", check=False)
    off.source.push(FLEET)
    off.reconciler().reconcile()
    assert provenance(off, "web-1").reproducibility == "not run"


def test_a_host_whose_second_build_differs_publishes_nothing_and_the_others_go_on(world: GateWorld) -> None:
    world.source.push(FLEET)
    world.nix.unreproducible.add("web-2")
    rec = world.reconciler()
    assert outcomes(rec) == {"web-1": (True, 1), "web-2": (False, 1)}
    assert not any("web-2" in k for k in world.store.objects)
    assert world.store.exists(release_path("web-1", 1))
    state = world.ledger.states["web-2"]
    assert state.status == Status.FAILED
    image = state.failed_image
    assert f"not reproducible, nothing is signed or published: derivation {image} built again here" in (
        state.error or ""
    )
    assert "root/id: 37 bytes, sha256 0123456789abcdef vs 37 bytes" in (state.error or "")
    (failed,) = world.history.of(EventType.HOST_FAILED)
    assert failed.host == "web-2" and "not reproducible" in (failed.error or "")
    get = rec.metrics.registry.get_sample_value
    assert get("reconciler_reproducibility_checks_total", {"result": "mismatch"}) == 1
    assert get("reconciler_reproducibility_checks_total", {"result": "passed"}) == 1
    assert get("reconciler_reproducibility_checks_total", {"result": "failed"}) == 0


def test_a_check_that_cannot_run_refuses_the_host_too(world: GateWorld) -> None:
    world.source.push(FLEET)
    world.nix.check_broken.add("web-1")
    rec = world.reconciler()
    assert outcomes(rec) == {"web-1": (False, 1), "web-2": (True, 1)}
    assert not any("web-1" in k for k in world.store.objects)
    assert "the second build failed" in (world.ledger.states["web-1"].error or "")
    get = rec.metrics.registry.get_sample_value
    assert get("reconciler_reproducibility_checks_total", {"result": "failed"}) == 1


def test_a_derivation_found_reproducible_is_not_built_again_by_the_same_process(world: GateWorld) -> None:
    world.source.push({"hosts/web-1.yaml": FLEET["hosts/web-1.yaml"]})
    rec = world.reconciler()
    rec.reconcile()
    ((host, rebuilt),) = world.nix.checks
    assert host == "web-1" and BASE_DRV in rebuilt and len(rebuilt) == 3
    world.source.push(FLEET)
    rec.reconcile()
    host, rebuilt = world.nix.checks[-1]
    assert host == "web-2" and BASE_DRV not in rebuilt and len(rebuilt) == 2
    # Reproduced earlier by this process: counted as reproduced all the same.
    assert provenance(world, "web-2").reproducibility.startswith("passed: 3 derivations")


def test_without_the_gate_nothing_is_built_twice(world: GateWorld) -> None:
    world.check = False
    world.source.push(FLEET)
    world.nix.unreproducible.add("web-2")
    rec = world.reconciler()
    assert outcomes(rec) == {"web-1": (True, 1), "web-2": (True, 1)}
    assert world.nix.checks == []
    for result in ("passed", "mismatch", "failed"):
        assert (
            rec.metrics.registry.get_sample_value(
                "reconciler_reproducibility_checks_total", {"result": result}
            )
            == 0
        )


def test_the_gate_is_configured_with_clear_errors(tmp_path: Path) -> None:
    base = "repo: {url: ./r}\nstate_dir: ./s\nsigning: {gnupghome: ./g, key: K}\nstore: {path: ./st}\n"
    path = tmp_path / "reconciler.yaml"
    path.write_text(base)
    assert load_config(path).reproducibility == ReproducibilityConfig(check=False, diff_timeout=60.0)
    path.write_text(base + "reproducibility: {check: true, diff_timeout: 2m}\n")
    assert load_config(path).reproducibility == ReproducibilityConfig(check=True, diff_timeout=120.0)
    for bad, key in (
        ("reproducibility: {check: yes please}", "reproducibility.check"),
        ("reproducibility: {diff_timeout: soon}", "reproducibility.diff_timeout"),
        ("reproducibility: {second_builder: b1}", "reproducibility"),
        ("reproducibility: true", "reproducibility"),
    ):
        path.write_text(base + bad + "\n")
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert key in str(exc.value)


def test_only_the_checks_own_kept_build_directories_are_removed(tmp_path: Path) -> None:
    # The check's log carries the builds' own output: a package can print Nix's words.
    # Another host's build directory, in use while this check runs, and one an operator
    # kept, must survive a line naming them; the check's own is removed.
    other = tmp_path / "nix-build-other-host-site.drv-0"  # another host building now
    other.mkdir()
    earlier = tmp_path / "nix-build-nd-501.drv-0"  # kept by an earlier failed build
    earlier.mkdir()
    before = _build_dirs(tmp_path)
    own = tmp_path / "nix-build-nd-501.drv-1"
    own.mkdir()
    late = tmp_path / "nix-build-web-2-site.drv-0"  # another host's, started during the check
    late.mkdir()
    log = "".join(
        f"note: keeping build directory '{d}'\n"
        for d in (other, earlier, own, late, tmp_path / "sub" / "nix-build-nd-501.drv-3", Path("/etc"))
    )
    named = parse_check(NIX_CHECK + log).kept_dirs
    assert kept_build_dirs(named, tmp_path, before, [DRV]) == [own]


def test_diffoscope_runs_in_a_group_the_deadline_kills_whole_without_the_daemons_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # diffoscope hands the repository's files to other tools; one stuck on a crafted
    # file must not outlive the deadline (killing diffoscope alone left it running),
    # and none of them sees the daemon's environment (its GNUPGHOME, a store's keys).
    # This stand-in for diffoscope starts such a tool and waits for it.
    tool = tmp_path / "diffoscope"
    tool.write_text(
        '#!/bin/sh\nenv > "$(dirname "$0")/env"\nsleep 60 & echo $! > "$(dirname "$0")/tool.pid"\nwait\n'
    )
    tool.chmod(0o755)
    monkeypatch.setenv("GNUPGHOME", "/var/lib/reconciler/gnupg")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    start = time.monotonic()
    got = diffoscope(str(tool), tmp_path / "a", tmp_path / "b", tmp_path / "report.txt", 0.5)
    assert got == "stopped after 0s, see reproducibility.diff_timeout"
    assert time.monotonic() - start < 5
    pid = int((tmp_path / "tool.pid").read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(pid), "the tool diffoscope started outlived its deadline"
    env = (tmp_path / "env").read_text()
    assert "GNUPGHOME" not in env and "s3cret" not in env


def test_a_second_build_of_any_size_is_listed_without_reading_past_a_budget(tmp_path: Path) -> None:
    # The second build is not measured as the first was: a package can make it differ
    # by a sparse file of a terabyte, which costs no disk but would be hashed whole.
    out = tmp_path / "out.check"
    out.mkdir()
    (out / "small").write_bytes(b"x" * 10)
    with (out / "huge").open("wb") as f:
        f.truncate(1 << 40)
    start = time.monotonic()
    listed, truncated = _listing(out, 1 << 20)
    assert not truncated
    assert time.monotonic() - start < 2
    assert listed["huge"] == Entry("file", 1 << 40)
    assert listed["small"].sha256 and listed["huge"].describe() == f"{1 << 40} bytes, not read"


def test_a_build_of_more_files_than_the_cap_is_listed_only_up_to_it(tmp_path: Path) -> None:
    first, second = tmp_path / "out", tmp_path / "out.check"
    for root in (first, second):
        (root / "d").mkdir(parents=True)
        for i in range(6):
            (root / "d" / f"f{i}").write_bytes(b"same")
    (second / "d" / "f0").write_bytes(b"other")
    a, cut_a = _listing(first, 1 << 20, limit=4)
    b, cut_b = _listing(second, 1 << 20, limit=4)
    assert cut_a and cut_b and len(a) == len(b) == 5  # the root and 4 files
    assert _listing(first, 1 << 20, limit=7) == (_listing(first, 1 << 20)[0], False)
    # A file past one listing's end is not "only in" the other build; the summary
    # says the listing stopped, whether or not a listed file differs.
    lines = compare(a, b, truncated=True)
    assert not any("only in" in line for line in lines)
    assert summarise(lines, listed=4).endswith("(listed only the first 4 files of each build)")
    assert (
        summarise([], listed=4)
        == "no file differs among those compared (listed only the first 4 files of each build)"
    )


def test_only_the_newest_diffoscope_reports_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in diffoscope that writes its report and says the builds differ.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "diffoscope").write_text('#!/bin/sh\necho differs > "$3"\nexit 1\n')
    (bin_dir / "diffoscope").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    nix = Nix(tmp_path / "state")
    reports = tmp_path / "state" / "reproducibility"
    reports.mkdir(parents=True)
    (reports / "notes").write_text("an operator's")
    for i in range(MAX_REPORTS):
        old = reports / f"{i:02d}-old.diffoscope.txt"
        old.write_text("old")
        os.utime(old, ns=(i * 10**9, i * 10**9))
    got = nix._diffoscope(tmp_path / "aaaa-new", tmp_path / "aaaa-new.check")
    assert got == str(reports / "aaaa-new.diffoscope.txt")
    kept = sorted(p.name for p in reports.glob("*.diffoscope.txt"))
    assert len(kept) == MAX_REPORTS and "00-old.diffoscope.txt" not in kept
    assert "aaaa-new.diffoscope.txt" in kept and (reports / "notes").exists()

"""The artifacts themselves: actool-valid ACIs, runnable supervising AppImages, reproducible bytes."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters.nix import NIX_DIR
from reconciler.config import load_config
from reconciler.core.hosts import parse_fleet
from reconciler.daemon.reconciler import Reconciler
from reconciler.wiring import open_reconciler
from tests.conftest import (
    ConfigRepo,
    ReconciledFleet,
    Signing,
    fetch,
    free_port,
    standard_fleet,
    tar_member,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

PREFIX = "example.com/fleet"

# A host with three services: httpd to fetch from, a chatty one to see log prefixes,
# and one that crashes at once, saying when it started (seconds since boot).
SERVED = """\
name: served
include: [base]
network: {{address: 10.42.0.50/24}}
services:
  web:
    package: site
    exec: [bin/busybox, httpd, -f, -p, "{port}", -h, srv/www]
    restart: always
    ports: [{{name: http, port: {port}}}, {{name: status, port: 9, protocol: udp}}]
  chatter:
    exec: [bin/busybox, sh, -c, "while true; do echo hello from chatter; sleep 1; done"]
  crasher:
    exec: [bin/busybox, sh, -c, "read up idle < /proc/uptime; echo started at $up; exit 3"]
    restart: on-failure
"""
SUPERVISOR = "reconciler-supervise"


def pids_matching(needle: str) -> set[int]:
    """Processes whose command line contains ``needle``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and int(entry.name) != os.getpid():
            found.add(int(entry.name))
    return found


def supervisors_under(root: Path) -> set[int]:
    """The supervisors `pidof` finds that run from an image below ``root``."""
    found = subprocess.run(["pidof", SUPERVISOR], capture_output=True, text=True).stdout.split()
    ours = set()
    for pid in map(int, found):
        try:
            if os.readlink(f"/proc/{pid}/exe").startswith(str(root)):
                ours.add(pid)
        except OSError:
            continue
    return ours


def crasher_starts(log: Path) -> list[float]:
    prefix = "crasher: started at "
    return [float(ln.removeprefix(prefix)) for ln in log.read_text().splitlines() if ln.startswith(prefix)]


class Fleet(ReconciledFleet):
    """A config repo reconciled once into a store."""

    def __init__(self, root: Path, signing: Signing, port: int) -> None:
        images = {
            "name_prefix": PREFIX,
            "annotations": {"homepage": "https://example.com/fleet", "authors": "Ops"},
        }
        files = {"hosts/served.yaml": SERVED.format(port=port)}
        super().__init__(root, signing, port, "add served", files, images=images)

    @property
    def hosts(self) -> list[str]:
        return sorted(p.name for p in (self.store / "hosts").iterdir())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, signing: Signing) -> Fleet:
    return Fleet(tmp_path_factory.mktemp("images"), signing, free_port())


def test_every_aci_is_valid_and_carries_its_host(fleet: Fleet, tmp_path: Path) -> None:
    assert fleet.hosts == ["served", "web-1", "web-2", "worker-1"]
    for host in fleet.hosts:
        release = fleet.release(host)
        art = release.artifact("aci")
        assert art is not None
        assert art.name == f"{host}-{release.version}-linux-amd64.aci"
        blob = fleet.store / art.blob
        val = subprocess.run(["actool", "validate", str(blob)], capture_output=True, text=True)
        assert val.returncode == 0, val.stdout + val.stderr
        with tarfile.open(blob) as tar:
            manifest = json.loads(tar_member(tar, "manifest"))
            names = set(tar.getnames())
            network = tar_member(tar, "rootfs/etc/reconciler/network.env").decode()
        assert manifest["acKind"] == "ImageManifest"
        assert manifest["name"] == f"{PREFIX}/{host}"
        labels = {lab["name"]: lab["value"] for lab in manifest["labels"]}
        assert labels == {"version": str(release.version), "os": "linux", "arch": "amd64"}
        assert manifest["app"]["exec"] == ["/AppRun"]
        assert manifest["app"]["isolators"] == [{"name": "os/linux/no-new-privileges", "value": True}]
        assert manifest["annotations"] == [
            {"name": "authors", "value": "Ops"},
            {"name": "homepage", "value": "https://example.com/fleet"},
        ]
        # What appc's Linux environment does not promise is in the image: a sticky,
        # world-writable /tmp and /var/tmp, /run, and the executor's mount points.
        with tarfile.open(blob) as tar:
            modes = {d: tar.getmember(f"rootfs/{d}") for d in ("tmp", "var/tmp", "run", "dev", "proc", "sys")}
        assert {d: (m.isdir(), m.mode) for d, m in modes.items()} == {
            "tmp": (True, 0o1777),
            "var/tmp": (True, 0o1777),
            "run": (True, 0o755),
            "dev": (True, 0o755),
            "proc": (True, 0o755),
            "sys": (True, 0o755),
        }
        ports = manifest["app"].get("ports")
        if host == "served":
            assert ports == [
                {"name": "http", "protocol": "tcp", "port": fleet.port, "count": 1, "socketActivated": False},
                {"name": "status", "protocol": "udp", "port": 9, "count": 1, "socketActivated": False},
            ]
        else:
            assert ports is None
        # A fat image: the supervisor and the services' files are all inside.
        for needed in (
            "rootfs/AppRun",
            "rootfs/bin/busybox",
            "rootfs/.reconciler/apprun.sh",
            f"rootfs/.reconciler/{SUPERVISOR}",
            "rootfs/etc/motd",
        ):
            assert needed in names, f"{host}: {needed} missing"
        # Everything in it is static: no loader, no shared library.
        assert not [n for n in names if ".so" in Path(n).name or "ld-linux" in n], host
        assert f"HOSTNAME={host}" in network and "GATEWAY=10.42.0.1" in network
    with tarfile.open(fleet.blob("web-1", "aci")) as tar:
        assert "rootfs/srv/www/index.html" in tar.getnames()
        run = tar_member(tar, "rootfs/etc/service/web/run").decode()
        network = tar_member(tar, "rootfs/etc/reconciler/network.env").decode()
    assert run == "exec './bin/busybox' 'httpd' '-f' '-p' '18081' '-h' 'srv/www'\n"
    assert "ADDRESS=10.42.0.11/24" in network


def test_appimage_is_type_2_with_a_squashfs_payload(fleet: Fleet, tmp_path: Path) -> None:
    blob = fleet.blob("served", "appimage")
    app = tmp_path / "served.AppImage"
    shutil.copy(blob, app)
    app.chmod(0o755)
    head = app.read_bytes()[:16]
    assert head[:4] == b"\x7fELF" and head[8:11] == b"AI\x02"
    offset = int(
        subprocess.run([str(app), "--appimage-offset"], capture_output=True, text=True, check=True).stdout
    )
    assert 0 < offset < app.stat().st_size
    assert app.read_bytes()[offset : offset + 4] == b"hsqs"
    # xz with the x86 BCJ filter, as measured to be smallest (nix/host.nix).
    superblock = subprocess.run(
        ["unsquashfs", "-o", str(offset), "-s", str(app)], capture_output=True, text=True, check=True
    ).stdout
    assert "Compression xz" in superblock and "x86" in superblock, superblock
    listing = subprocess.run(
        ["unsquashfs", "-o", str(offset), "-l", "-d", "", str(app)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for path in (
        "/AppRun",
        "/bin/busybox",
        "/srv/www/index.html",
        "/etc/service/chatter/run",
        "/served.desktop",
    ):
        assert path in listing.splitlines(), f"{path} not in the payload"
    subprocess.run([str(app), "--appimage-extract"], cwd=tmp_path, capture_output=True, check=True)
    root = tmp_path / "squashfs-root"
    assert (root / "srv/www/index.html").read_text() == "<h1>fleet</h1>\n"
    assert os.access(root / "AppRun", os.X_OK)


@pytest.fixture
def plain_env(tmp_path: Path) -> dict[str, str]:
    """An environment without Nix or the project: only the base system's PATH."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}


@pytest.mark.parametrize("mode", ["fuse", "extract-and-run"])
def test_appimage_supervises_its_services_and_stops_cleanly(
    fleet: Fleet, tmp_path: Path, plain_env: dict[str, str], mode: str
) -> None:
    app = tmp_path / "served.AppImage"
    shutil.copy(fleet.blob("served", "appimage"), app)
    app.chmod(0o755)
    env = dict(plain_env)
    if mode == "extract-and-run":
        env["APPIMAGE_EXTRACT_AND_RUN"] = "1"
    url = f"http://127.0.0.1:{fleet.port}/"
    httpd = f"httpd -f -p {fleet.port}"
    assert not pids_matching(httpd), "port already served by a leftover"
    log = (tmp_path / "out.log").open("w")
    proc = subprocess.Popen([str(app)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for(lambda: fetch(url) == "<h1>fleet</h1>\n", 30, "the page")
        # busybox httpd serves each connection in a forked child, which may still be
        # exiting after the answer: the server is the one process left.
        wait_for(lambda: len(pids_matching(httpd)) == 1, 10, "one httpd")
        (first,) = pids_matching(httpd)
        os.kill(first, signal.SIGKILL)
        wait_for(
            lambda: bool(pids_matching(httpd) - {first}) and fetch(url) is not None, 15, "httpd restarted"
        )
        wait_for(lambda: "chatter: hello from chatter" in (tmp_path / "out.log").read_text(), 10, "log line")
        # The supervisor is itself, found by name (not a loader running it).
        assert len(supervisors_under(tmp_path)) == 1
        # The crash loop backs off: restarts 1, 2, then 4 s apart (stamps are to 10 ms).
        wait_for(lambda: len(crasher_starts(tmp_path / "out.log")) >= 4, 30, "four crasher starts")
        starts = crasher_starts(tmp_path / "out.log")
        gaps = [b - a for a, b in itertools.pairwise(starts[:4])]
        assert [round(g) for g in gaps] == [1, 2, 4], gaps
        assert all(g >= want - 0.02 for g, want in zip(gaps, (1, 2, 4), strict=True)), gaps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    wait_for(
        lambda: not pids_matching(httpd) and not pids_matching("hello from chatter"), 10, "no service left"
    )
    assert not pids_matching(str(tmp_path)), "a process from the image outlived it"
    lines = (tmp_path / "out.log").read_text().splitlines()
    assert all(not ln.startswith("hello") for ln in lines), "a log line without its service prefix"
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts
    assert not list(tmp_path.glob("appimage_extracted_*")) and not list(tmp_path.glob(".mount_*"))


@pytest.mark.parametrize("mode", ["fuse", "extract-and-run"])
def test_a_killed_appimage_leaves_no_process_and_the_next_start_cleans_up(
    fleet: Fleet, tmp_path: Path, plain_env: dict[str, str], mode: str
) -> None:
    app = tmp_path / "served.AppImage"
    shutil.copy(fleet.blob("served", "appimage"), app)
    app.chmod(0o755)
    env = dict(plain_env)
    if mode == "extract-and-run":
        env["APPIMAGE_EXTRACT_AND_RUN"] = "1"
    url = f"http://127.0.0.1:{fleet.port}/"
    httpd = f"httpd -f -p {fleet.port}"
    assert not pids_matching(httpd), "port already served by a leftover"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(app)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path
        )

    proc = start()
    try:
        wait_for(lambda: fetch(url) == "<h1>fleet</h1>\n", 30, "the page")
        assert supervisors_under(tmp_path) and pids_matching(httpd)
        proc.kill()
        proc.wait(10)
        # The supervisor, told by the runtime's death, stops every service.
        wait_for(lambda: not pids_matching(str(tmp_path)), 20, "no process from the image")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not pids_matching(httpd) and not pids_matching("hello from chatter")
    assert str(tmp_path) not in Path("/proc/self/mounts").read_text()
    assert not list(tmp_path.glob(".mount_*"))
    left = list(tmp_path.glob("appimage_extracted_*"))
    assert len(left) == (1 if mode == "extract-and-run" else 0), left

    # The next start removes what the killed one left, and runs as usual.
    again = start()
    try:
        wait_for(lambda: fetch(url) == "<h1>fleet</h1>\n", 30, "the page again")
        assert not any(p.exists() for p in left)
        again.send_signal(signal.SIGTERM)
        assert again.wait(30) == 0
    finally:
        if again.poll() is None:
            again.kill()
            again.wait(10)
    assert not list(tmp_path.glob("appimage_extracted_*")) and not pids_matching(str(tmp_path))


# An App Container Executor's part, as appc's OS-SPEC.md gives it for os=linux and no
# more: /proc, /sys, the listed devices, /dev/pts, /dev/ptmx and /dev/shm. The mount
# points are made if the image lacks them (an executor does); nothing else is added.
APPC_MINIMUM = r"""
set -eu
root=$1; shift
mkdir -p "$root/proc" "$root/sys" "$root/dev"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount -t tmpfs -o mode=755,nosuid tmpfs "$root/dev"
for d in null zero full random urandom tty console; do
  touch "$root/dev/$d"
  mount --bind "/dev/$d" "$root/dev/$d"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o nosuid,nodev tmpfs "$root/dev/shm"
exec env -i "$@" chroot "$root" "$APP_EXEC"
"""


UNSHARE = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private"]


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_the_aci_runs_on_the_appc_minimum_filesystem(fleet: Fleet, tmp_path: Path) -> None:
    """Unpacked and chrooted into with only what appc's executor promises (no /tmp
    from outside): the services start, answer, log with their prefix and stop on TERM."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "-p", "-f", "true"]).returncode != 0:
        pytest.skip("needs root and mount/PID namespaces (unshare -m -p -f)")
    aci = fleet.blob("served", "aci")
    image = tmp_path / "image"
    image.mkdir()
    subprocess.run(["tar", "-C", str(image), "-xf", str(aci), "--numeric-owner"], check=True)
    manifest = json.loads((image / "manifest").read_text())
    (exec_path,) = manifest["app"]["exec"]
    # appc ace.md: PATH, AC_APP_NAME and container, then the image's environment.
    env = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"AC_APP_NAME={manifest['name']}",
        "container=reconciler-test",
        *(f"{e['name']}={e['value']}" for e in manifest["app"]["environment"]),
    ]
    url = f"http://127.0.0.1:{fleet.port}/"
    assert not pids_matching(f"httpd -f -p {fleet.port}"), "port already served by a leftover"
    log = (tmp_path / "out.log").open("w")
    proc = subprocess.Popen(
        [*UNSHARE, "sh", "-c", APPC_MINIMUM, "sh", str(image / "rootfs"), *env],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "APP_EXEC": exec_path},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: fetch(url) == "<h1>fleet</h1>\n" or proc.poll() is not None, 30, "the page or an exit"
        )
        assert proc.poll() is None, (tmp_path / "out.log").read_text()
        wait_for(lambda: "chatter: hello from chatter" in (tmp_path / "out.log").read_text(), 10, "log line")
        # The namespace's first process is the image's entry point: TERM it, as an
        # executor stops an app.
        (app,) = children(proc.pid)
        os.kill(app, signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "out.log").read_text()
    finally:
        if proc.poll() is None:
            for child in children(proc.pid):
                os.kill(child, signal.SIGKILL)
            proc.kill()
            proc.wait(10)
        log.close()
    lines = (tmp_path / "out.log").read_text().splitlines()
    assert all(not ln.startswith("hello") for ln in lines), "a log line without its service prefix"
    assert not any("mktemp" in ln for ln in lines), lines
    assert list((image / "rootfs/tmp").iterdir()) == [], "the runtime directory was left behind"
    assert str(image) not in Path("/proc/self/mounts").read_text()


def build_outputs(rec: Reconciler, host: str) -> dict[str, bytes]:
    fleet = parse_fleet(rec.source.read_tree())
    out = rec.build(fleet.hosts[host], 7)
    return {fmt: path.read_bytes() for fmt, path in out.files.items()}


@pytest.fixture
def reconciler(tmp_path: Path, config_repo: ConfigRepo, signing: Signing) -> Iterator[Reconciler]:
    standard_fleet(config_repo)
    rec = open_reconciler(load_config(write_config(tmp_path, config_repo, signing)))
    rec.source.fetch()
    yield rec
    rec.close()


def test_builds_are_bit_for_bit_reproducible(reconciler: Reconciler, tmp_path: Path) -> None:
    first = build_outputs(reconciler, "web-1")
    assert set(first) == {"aci", "appimage"}
    # Rebuild every derivation of the host from scratch and compare with the first build.
    fleet = parse_fleet(reconciler.source.read_tree())
    out = reconciler.build(fleet.hosts["web-1"], 7)
    image = reconciler.nix.evaluate([fleet.hosts["web-1"]], reconciler.source.checkout).images["web-1"]
    requisites = subprocess.run(
        ["nix-store", "--query", "--requisites", out.derivation], capture_output=True, text=True, check=True
    ).stdout.split()
    ours = [d for d in requisites if d.endswith(".drv")]
    assert image in ours and out.derivation in ours
    check = subprocess.run(
        ["nix-store", "--realise", "--check", *ours, "--option", "substituters", ""],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    assert build_outputs(reconciler, "web-1") == first


def test_changing_one_address_changes_only_that_hosts_outputs(
    reconciler: Reconciler, config_repo: ConfigRepo
) -> None:
    checkout = reconciler.source.checkout
    before_fleet = parse_fleet(reconciler.source.read_tree())
    before = reconciler.nix.evaluate(list(before_fleet.hosts.values()), checkout).images
    before_web2 = build_outputs(reconciler, "web-2")
    before_web1 = build_outputs(reconciler, "web-1")
    text = (config_repo.path / "hosts/web-2.yaml").read_text().replace("10.42.0.12/24", "10.42.0.13/24")
    config_repo.write("hosts/web-2.yaml", text)
    config_repo.commit("move web-2")
    reconciler.source.fetch()
    after_fleet = parse_fleet(reconciler.source.read_tree())
    after = reconciler.nix.evaluate(list(after_fleet.hosts.values()), checkout).images
    assert {h for h in before if before[h] != after[h]} == {"web-2"}
    assert build_outputs(reconciler, "web-1") == before_web1
    after_web2 = build_outputs(reconciler, "web-2")
    assert after_web2["aci"] != before_web2["aci"] and after_web2["appimage"] != before_web2["appimage"]


def test_the_nixpkgs_toolchain_offers_what_the_builds_use() -> None:
    """No nixpkgs here to build it with; Nix is lazy, so its interface still evaluates."""

    def names(expr: str) -> set[str]:
        out = subprocess.run(
            ["nix-instantiate", "--eval", "--strict", "--json", "-E", f"builtins.attrNames ({expr})"],
            cwd=NIX_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return set(json.loads(out))

    nixpkgs = names('import ./toolchain-nixpkgs.nix { pkgs = throw "no nixpkgs"; }')
    assert nixpkgs == names("import ./toolchain-debian.nix { dir = /nonexistent; }")
    used = {
        m.group(1) for f in NIX_DIR.glob("*.nix") for m in re.finditer(r"\btoolchain\.(\w+)", f.read_text())
    }
    assert used and used <= nixpkgs, used - nixpkgs


def test_the_toolchain_import_takes_nothing_from_the_callers_loader_environment(tmp_path: Path) -> None:
    """LD_PRELOAD and LD_LIBRARY_PATH of whoever stages the toolchain must not add their
    libraries to it: its content hash decides every build."""
    extra = tmp_path / "extra-libs"
    extra.mkdir()
    # A library tar would otherwise resolve from LD_LIBRARY_PATH, and one preloaded into all.
    # The copy differs by a trailing byte, which the loader ignores and a comparison does not.
    (extra / "libacl.so.1").write_bytes(Path("/lib/x86_64-linux-gnu/libacl.so.1").read_bytes() + b"\0")
    env = {**os.environ, "LD_PRELOAD": "/lib/x86_64-linux-gnu/libanl.so.1", "LD_LIBRARY_PATH": str(extra)}
    out = tmp_path / "toolchain"
    staged = subprocess.run(
        ["sh", str(NIX_DIR / "toolchain" / "import-debian.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert staged.returncode == 0, staged.stderr
    libs = {p.name for p in out.rglob("*.so*")}
    assert "libanl.so.1" not in libs
    # tar's libacl is the system's, not the copy LD_LIBRARY_PATH pointed at.
    assert (out / "lib" / "libacl.so.1").read_bytes() == Path(
        "/lib/x86_64-linux-gnu/libacl.so.1"
    ).read_bytes()
    assert "libgcc_s.so.1" in {p.name for p in (out / "lib").iterdir()}

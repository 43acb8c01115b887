"""Thin ACIs over a shared base ACI, and OCI images: published by a real pass, checked
with actool, skopeo, umoci and runc, rendered and run the way their executors do."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import stat
import subprocess
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from reconciler.adapters.nix import NIX_DIR
from reconciler.adapters.tree import read_tree
from reconciler.agent.verify import verify
from reconciler.core.hosts import parse_fleet
from reconciler.wiring import open_reconciler
from tests.conftest import (
    ReconciledFleet,
    Signing,
    fetch,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.integration

# Two hosts with the thin formats: they must share one base blob.
SERVED = """\
name: served
include: [base]
formats: [aci, aci-thin, oci]
network: {{address: 10.42.0.50/24, dns: [10.42.0.1, 10.42.0.2]}}
services:
  web:
    package: site
    exec: [bin/busybox, httpd, -f, -p, "{port}", -h, srv/www]
"""
QUIET = """\
name: quiet
include: [base]
formats: [aci-thin, oci]
services:
  tick: {exec: [bin/busybox, sh, -c, "while true; do sleep 5; done"]}
"""
# What an appc executor sets beside the manifest's environment (appc spec, ace.md).
ACE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Fleet(ReconciledFleet):
    """A config repo with two thin-format hosts, reconciled once into a store."""

    def __init__(self, root: Path, signing: Signing, port: int) -> None:
        files = {"hosts/served.yaml": SERVED.format(port=port), "hosts/quiet.yaml": QUIET}
        super().__init__(root, signing, port, "thin hosts", files)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, signing: Signing) -> Fleet:
    return Fleet(tmp_path_factory.mktemp("thin"), signing, free_port())


def aci_manifest(path: Path) -> dict[str, Any]:
    with tarfile.open(path) as tar:
        f = tar.extractfile("manifest")
        assert f is not None
        doc: dict[str, Any] = json.load(f)
        return doc


def tree(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every path under ``root``: its type, mode and content (or link target)."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def extract_rootfs(aci: Path, dest: Path) -> None:
    """Lay ``aci``'s rootfs/ over ``dest``, each entry replacing what is there (the
    files of this image overwrite those of the dependencies before it)."""
    with tarfile.open(aci) as tar:
        for m in tar.getmembers():
            if not m.name.startswith("rootfs/"):
                continue
            target = dest / m.name[len("rootfs/") :]
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(m.mode)
                continue
            if target.is_symlink() or target.exists():
                target.unlink()
            if m.issym():
                target.symlink_to(m.linkname)
            else:
                assert m.isfile(), f"{m.name}: unexpected member type"
                src = tar.extractfile(m)
                assert src is not None
                target.write_bytes(src.read())
                target.chmod(m.mode)


def render(aci: Path, images: Mapping[str, list[Path]], dest: Path) -> dict[str, Any]:
    """Render ``aci`` into ``dest`` as an appc executor does (appc spec, aci.md, "Image
    Manifest" and "Dependency Matching"): each dependency is found by its imageName among
    ``images`` (what discovery would offer), must have the imageID (sha512 of the
    uncompressed tar), size and labels the dependency names, and is rendered first, in
    order; then this image's rootfs goes on top. A pathWhitelist, if any, keeps only
    the paths it lists. Returns the manifest."""
    manifest = aci_manifest(aci)
    for dep in manifest.get("dependencies", []):
        wanted = {lab["name"]: lab["value"] for lab in dep.get("labels", [])}
        found = []
        for candidate in images.get(dep["imageName"], []):
            m = aci_manifest(candidate)
            labels = {lab["name"]: lab["value"] for lab in m.get("labels", [])}
            if m["name"] != dep["imageName"] or any(labels.get(k) != v for k, v in wanted.items()):
                continue
            data = candidate.read_bytes()
            if "imageID" in dep and dep["imageID"] != "sha512-" + hashlib.sha512(data).hexdigest():
                continue
            if "size" in dep and dep["size"] != len(data):
                continue
            found.append(candidate)
        assert found, f"no image matches the dependency {dep}"
        render(found[0], images, dest)
    extract_rootfs(aci, dest)
    whitelist = manifest.get("pathWhitelist") or []
    if whitelist:
        keep = {p.lstrip("/") for p in whitelist}
        for rel in sorted(tree(dest), reverse=True):
            p = dest / rel
            if rel not in keep and not p.is_dir():
                p.unlink()
    return manifest


def test_thin_and_base_acis_are_valid_and_the_base_is_stored_once(fleet: Fleet) -> None:
    served, quiet = fleet.release("served"), fleet.release("quiet")
    assert {a.format for a in served.artifacts} == {
        "aci",
        "aci-thin",
        "aci-base",
        "oci",
        "oci-config",
        "oci-layer-base",
        "oci-layer",
    }
    for host in ("served", "quiet"):
        for fmt in ("aci-thin", "aci-base"):
            val = subprocess.run(
                ["actool", "validate", str(fleet.blob(host, fmt))], capture_output=True, text=True
            )
            assert val.returncode == 0, val.stdout + val.stderr
    # One base for the fleet: the same blob in both releases, its bytes once in the store.
    for fmt in ("aci-base", "oci-layer-base"):
        assert fleet.art("served", fmt) == fleet.art("quiet", fmt)
    base = fleet.blob("served", "aci-base")
    thin = fleet.blob("served", "aci-thin")
    base_manifest = aci_manifest(base)
    assert base_manifest["name"] == "reconciler-base" and "app" not in base_manifest
    thin_manifest = aci_manifest(thin)
    fat_manifest = aci_manifest(fleet.blob("served", "aci"))
    # The fat name (under the default images.name_prefix), -thin.
    assert thin_manifest["name"] == "localhost/fleet/served-thin"
    assert {k: v for k, v in thin_manifest.items() if k not in ("name", "dependencies")} == {
        k: v for k, v in fat_manifest.items() if k != "name"
    }
    (dep,) = thin_manifest["dependencies"]
    assert dep == {
        "imageName": "reconciler-base",
        "imageID": "sha512-" + hashlib.sha512(base.read_bytes()).hexdigest(),
        "labels": base_manifest["labels"],
        "size": base.stat().st_size,
    }
    # Per host only what differs from the base: a few KiB beside megabytes.
    assert thin.stat().st_size < 64 * 1024 < 1024 * 1024 < base.stat().st_size
    with tarfile.open(thin) as tar:
        names = set(tar.getnames())
    assert "rootfs/srv/www/index.html" in names and "rootfs/etc/service/web/run" in names
    assert not {"rootfs/bin/busybox", "rootfs/AppRun", "rootfs/.reconciler/apprun.sh"} & names
    # `reconciler verify` takes every artifact of the release: sizes, digests, signatures.
    latest = fleet.store / "hosts" / "served" / "latest.json"
    lines = verify([fleet.signing.public_key], str(latest))
    assert len(lines) == 1 + len(served.artifacts) + 2 and all(ln.startswith("OK ") for ln in lines)
    assert lines[-2:] == [
        f"OK served release {served.version}: the OCI manifest names its blobs",
        f"OK served release {served.version}: the thin ACI depends on its base",
    ]
    assert quiet.artifact("aci") is None and quiet.artifact("appimage") is None


def test_thin_aci_rendered_over_its_base_is_the_fat_rootfs_and_runs_in_a_chroot(
    fleet: Fleet, tmp_path: Path
) -> None:
    images = {"reconciler-base": [fleet.blob("served", "aci-base")]}
    rendered = tmp_path / "rendered"
    rendered.mkdir()
    manifest = render(fleet.blob("served", "aci-thin"), images, rendered)
    fat = tmp_path / "fat"
    fat.mkdir()
    extract_rootfs(fleet.blob("served", "aci"), fat)
    assert tree(rendered) == tree(fat)
    assert stat.S_IMODE((rendered / "tmp").stat().st_mode) == 0o1777

    # The appc minimum: /proc and /dev mounted by the executor; nothing else from the host.
    # The image's own mount points (appc's executor mounts over them).
    (rendered / "proc").mkdir(exist_ok=True)
    (rendered / "dev").mkdir(exist_ok=True)
    env = {
        "PATH": ACE_PATH,
        "AC_APP_NAME": "served",
        **{e["name"]: e["value"] for e in manifest["app"]["environment"]},
    }
    setup = (
        'r=$1; shift; mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" && exec chroot "$r" "$@"'
    )
    argv = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", setup, "sh"]
    log = (tmp_path / "out.log").open("w")
    proc = subprocess.Popen(
        [*argv, str(rendered), *manifest["app"]["exec"]], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{fleet.port}/"
    try:
        try:
            wait_for(lambda: fetch(url) == "<h1>fleet</h1>\n", 30, "the page from the chroot")
        except AssertionError:
            raise AssertionError((tmp_path / "out.log").read_text()) from None
        # The namespace's PID 1 is the image's entry point; it stops every service on TERM.
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        (init,) = children
        os.kill(int(init), signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "out.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    assert fetch(url) is None
    assert str(rendered) not in Path("/proc/self/mounts").read_text()


def oci_layout(fleet: Fleet, host: str, dest: Path) -> Path:
    """An OCI image layout for ``host``'s published release, made of the store itself:
    its blobs/sha256/<hex> are the image's blobs by digest, so only oci-layout and an
    index naming the manifest are written."""
    art = fleet.art(host, "oci")
    dest.mkdir()
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "blobs").symlink_to(fleet.store / "blobs")
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": f"sha256:{art.sha256}",
                "size": art.size,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def test_the_published_oci_image_is_whole_and_skopeo_reads_it(fleet: Fleet, tmp_path: Path) -> None:
    release = fleet.release("served")
    manifest = json.loads(fleet.blob("served", "oci").read_bytes())
    # The manifest names exactly the config and layers the release lists, base first.
    assert manifest["config"]["digest"] == f"sha256:{fleet.art('served', 'oci-config').sha256}"
    assert [(la["digest"], la["size"]) for la in manifest["layers"]] == [
        (f"sha256:{a.sha256}", a.size)
        for a in (release.artifact("oci-layer-base"), release.artifact("oci-layer"))
        if a is not None
    ]
    config = json.loads(fleet.blob("served", "oci-config").read_bytes())
    assert config["config"]["Entrypoint"] == ["/AppRun"]
    env = config["config"]["Env"]
    for expected in ("APPDIR=/", "HOSTNAME=served", "ADDRESS=10.42.0.50/24", "GATEWAY=10.42.0.1"):
        assert expected in env
    assert "DNS=10.42.0.1 10.42.0.2" in env
    # diff_ids are the digests of the uncompressed layers.
    diff_ids = [
        "sha256:" + hashlib.sha256(gzip.decompress(fleet.blob("served", f).read_bytes())).hexdigest()
        for f in ("oci-layer-base", "oci-layer")
    ]
    assert config["rootfs"] == {"type": "layers", "diff_ids": diff_ids}

    layout = oci_layout(fleet, "served", tmp_path / "layout")
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci:{layout}:latest"], capture_output=True, text=True, check=False
    )
    assert inspect.returncode == 0, inspect.stderr
    seen = json.loads(inspect.stdout)
    assert seen["Digest"] == f"sha256:{fleet.art('served', 'oci').sha256}"
    assert seen["Layers"] == [la["digest"] for la in manifest["layers"]]
    assert seen["Labels"] == {
        "org.opencontainers.image.title": "served",
        "org.opencontainers.image.version": str(release.version),
    }


@pytest.fixture
def runc_root(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """runc's state directory for this test, and the containers it started: each is
    killed and deleted afterwards, whatever the test did."""
    root = tmp_path / "runc"
    started: list[str] = []
    yield root, started
    for cid in started:
        subprocess.run(["runc", "--root", str(root), "kill", cid, "KILL"], capture_output=True)
        subprocess.run(["runc", "--root", str(root), "delete", "--force", cid], capture_output=True)


def test_the_oci_archive_unpacks_with_umoci_and_runs_under_runc(
    fleet: Fleet, tmp_path: Path, runc_root: tuple[Path, list[str]]
) -> None:
    checkout_fleet = parse_fleet(read_tree(fleet.root / "repo"))
    rec = open_reconciler(fleet.config)
    try:
        version = fleet.release("served").version
        out = rec.build(checkout_fleet.hosts["served"], version, gcroot="served.oci-test")
    finally:
        rec.close()
    # The build is what was published: the manifest is the same blob.
    assert out.files["oci"].read_bytes() == fleet.blob("served", "oci").read_bytes()
    archive = out.out / f"served-{version}.oci.tar"
    inspect = subprocess.run(["skopeo", "inspect", f"oci-archive:{archive}"], capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["Digest"] == f"sha256:{fleet.art('served', 'oci').sha256}"

    # umoci takes the layout inside the archive; the rootfs it gives is the fat ACI's.
    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="tar")
    bundle = tmp_path / "bundle"
    unpack = subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{version}", str(bundle)], capture_output=True, text=True
    )
    assert unpack.returncode == 0, unpack.stderr
    fat = tmp_path / "fat"
    fat.mkdir()
    extract_rootfs(fleet.blob("served", "aci"), fat)
    # The fat ACI's rootfs but for what only an ACI needs (appc promises an app
    # less than an OCI runtime gives one: the mount points, /run and /var/tmp).
    aci_only = {"dev", "proc", "sys", "run", "var", "var/tmp"}
    assert tree(bundle / "rootfs") == {p: v for p, v in tree(fat).items() if p not in aci_only}

    # runc as umoci configured it (own PID, mount and network namespaces), without a
    # terminal; the page is fetched from inside the container's network namespace.
    cfg_path = bundle / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["process"]["terminal"] = False
    cfg_path.write_text(json.dumps(cfg))
    root, started = runc_root
    cid = f"reconciler-test-{os.getpid()}"
    log = (tmp_path / "runc.log").open("w")
    started.append(cid)
    run = subprocess.run(
        [
            "runc",
            "--root",
            str(root),
            "run",
            "--detach",
            "--bundle",
            str(bundle),
            "--pid-file",
            str(tmp_path / "pid"),
            cid,
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        timeout=60,
    )
    log.close()
    assert run.returncode == 0, (tmp_path / "runc.log").read_text()
    pid = (tmp_path / "pid").read_text().strip()
    page = ["nsenter", "--target", pid, "--net", "curl", "-sf", f"http://127.0.0.1:{fleet.port}/"]

    def served() -> bool:
        return subprocess.run(page, capture_output=True, text=True).stdout == "<h1>fleet</h1>\n"

    wait_for(served, 30, "the page from the runc container")
    # The host's own network namespace does not see it: the container has its own.
    assert fetch(f"http://127.0.0.1:{fleet.port}/") is None

    def state() -> str:
        st = subprocess.run(["runc", "--root", str(root), "state", cid], capture_output=True, text=True)
        return str(json.loads(st.stdout)["status"]) if st.returncode == 0 else "gone"

    subprocess.run(["runc", "--root", str(root), "kill", cid, "TERM"], check=True)
    wait_for(lambda: state() == "stopped", 30, "the container to stop on TERM")
    subprocess.run(["runc", "--root", str(root), "delete", cid], check=True)
    assert state() == "gone"


def test_thin_and_oci_artifacts_are_reproducible_and_leak_nothing(fleet: Fleet) -> None:
    checkout_fleet = parse_fleet(read_tree(fleet.root / "repo"))
    rec = open_reconciler(fleet.config)
    try:
        out = rec.build(checkout_fleet.hosts["served"], 7, gcroot="served.check")
        first = {fmt: p.read_bytes() for fmt, p in out.files.items()}
        archive = (out.out / "served-7.oci.tar").read_bytes()
        drvs = subprocess.run(
            ["nix-store", "--query", "--requisites", out.derivation],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        ours = [
            d for d in drvs if d.endswith(".drv") and any(s in d for s in ("reconciler-base", "host-served-"))
        ]
        assert {d.rsplit("-", 1)[-1] for d in ours} >= {"base.drv", "thin.drv", "oci.drv"}
        # Every derivation built again from scratch must give the same bytes.
        check = subprocess.run(
            ["nix-store", "--realise", "--check", *ours, "--option", "substituters", ""],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr
        again = rec.build(checkout_fleet.hosts["served"], 7, gcroot="served.check")
        assert {fmt: p.read_bytes() for fmt, p in again.files.items()} == first
        assert (again.out / "served-7.oci.tar").read_bytes() == archive
    finally:
        rec.close()
    # Nothing of the build machine in the tars: owner 0 by number, one mtime; and no
    # timestamp or file name in the gzip headers (bytes 4-7 and the FNAME flag).
    tars = [out.files[f] for f in ("aci-thin", "aci-base")]
    layers = [out.files[f] for f in ("oci-layer-base", "oci-layer")]
    for layer in layers:
        head = layer.read_bytes()[:10]
        assert head[:3] == b"\x1f\x8b\x08" and head[3] & 0x08 == 0 and head[4:8] == b"\0\0\0\0"
    for path in [*tars, *layers, out.out / "served-7.oci.tar"]:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 1), (path, m.name)


def test_the_services_ports_become_the_images_exposed_ports() -> None:
    """nix/oci.nix reads a per-service ``ports`` list (numbers, or {port, protocol});
    evaluated alone, without building anything."""

    def config(services: str) -> dict[str, Any]:
        expr = (
            f'(import {NIX_DIR}/oci.nix {{ toolchain = {{ busybox = "/bb"; tar = "/tar"; }};'
            f' base = "/base"; }} {{ name = "web-1"; version = "3"; thin = "/thin";'
            f" host = {{ network = {{ }}; services = {services}; }}; }}).config.config"
        )
        out = subprocess.run(
            ["nix-instantiate", "--eval", "--strict", "--json", "-E", expr], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    ports = '{ web = { ports = [ 8080 { port = 53; protocol = "udp"; } ]; }; tick = { }; }'
    assert config(ports)["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert "ExposedPorts" not in config("{ tick = { }; }")

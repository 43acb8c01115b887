"""The AppImage as the AppImage spec and its tools see it, published by the real
reconciler (Nix, gpg) into a store that nginx serves: ``.digest_md5`` checked by
libappimage itself (through ctypes), the signature in ``.sha256_sig`` checked by the
spec's procedure with plain tools (objcopy, sha256sum, gpg) and by `reconciler
verify`, the update information and the zsync files consumed by Debian's zsync, and
an agent that fetches only the blocks a one-file change touched.
"""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.adapters import appimage as sealed
from reconciler.agent.config import load_agent_config
from reconciler.config import load_config
from reconciler.core import appimage
from reconciler.wiring import open_agent, open_reconciler
from tests.conftest import ConfigRepo, Signing, cli, free_port, gpg_verify, wait_for, write_config

pytestmark = pytest.mark.integration

HOST = """\
name: web-1
formats: [aci, appimage]
services:
  web: {exec: [bin/busybox, httpd, -f, -p, "18091"]}
files:
  etc/motd: "%s\\n"
"""
LIBAPPIMAGE = Path("/usr/lib/x86_64-linux-gnu")


@dataclass
class Published:
    url: str  # where nginx serves ``served``
    served: Path  # what nginx serves: a copy of v1 or v2
    v1: Path  # the store after release 1
    v2: Path  # the store after release 2 (only etc/motd changed)
    built: Path  # release 2's AppImage as Nix built it
    repo: ConfigRepo

    served_times: int = 0

    def serve(self, store: Path) -> None:
        shutil.rmtree(self.served)
        shutil.copytree(store, self.served)
        # nginx's validators are the mtime's second and the size: v1's and v2's
        # timestamp.json, written in the same second and as long, would answer 304 to
        # the agent's conditional GET. Each serve is a new second, as on a real store.
        self.served_times += 1
        renew(self.served, time.time() + 10 * self.served_times)

    def appimage(self, store: Path, version: int) -> tuple[Path, dict[str, Any]]:
        meta = yaml.safe_load((store / "hosts" / "web-1" / "releases" / f"{version}.json").read_text())
        (art,) = [a for a in meta["artifacts"] if a["format"] == "appimage"]
        return store / art["blob"], art


def renew(root: Path, when: float) -> None:
    """Every file under ``root`` modified at ``when``: what a server's validators
    (Last-Modified, nginx's ETag) are made of."""
    for path in root.rglob("*"):
        os.utime(path, (when, when), follow_symlinks=False)


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kw)


def runnable(blob: Path, tmp: Path) -> Path:
    """A copy of ``blob`` (stored without the execute bit) that runs."""
    copy = tmp / f"{blob.name[:12]}.AppImage"
    shutil.copyfile(blob, copy)
    copy.chmod(0o755)
    return copy


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """nginx on 127.0.0.1 serving a directory (with range requests, as zsync needs)."""
    if shutil.which("nginx") is None:
        pytest.fail("nginx is missing (scripts/setup installs it)")
    root = tmp_path_factory.mktemp("nginx")
    served = root / "served"
    served.mkdir()
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {root}/nginx.pid;\nerror_log {root}/error.log;\n"
        f"events {{}}\nhttp {{ access_log {root}/access.log; "
        f"server {{ listen 127.0.0.1:{port}; root {served}; }} }}\n"
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(root)])
    try:

        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, 20, "nginx")
        yield f"http://127.0.0.1:{port}", served
    finally:
        proc.terminate()
        proc.wait(10)


def reconcile(tmp: Path, repo: ConfigRepo, signing: Signing, store: Path, public_url: str) -> Path:
    cfg = load_config(
        write_config(
            tmp,
            repo,
            signing,
            store={"type": "filesystem", "path": str(store), "public_url": public_url + "/"},
        )
    )
    rec = open_reconciler(cfg)
    try:
        assert rec.reconcile().ok
    finally:
        rec.close()
    return cfg.state_dir


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, signing: Signing, nginx: tuple[str, Path]
) -> Published:
    url, served = nginx
    root = tmp_path_factory.mktemp("appimage-store")
    repo = ConfigRepo(root / "repo")
    repo.write("hosts/web-1.yaml", HOST % "one")
    repo.commit("one")
    store = root / "store"
    reconcile(root / "daemon", repo, signing, store, url)
    v1 = root / "v1"
    shutil.copytree(store, v1)
    repo.write("hosts/web-1.yaml", HOST % "two")
    repo.commit("two")
    state = reconcile(root / "daemon", repo, signing, store, url)
    built = next((state / "gcroots" / "web-1").glob("*.AppImage"))
    shutil.rmtree(served)
    shutil.copytree(store, served)
    return Published(url, served, v1, store, built, repo)


# -- the sections -----------------------------------------------------------------


def libappimage_digest(path: Path, tmp: Path) -> bytes:
    """libappimage's appimage_type2_digest_md5 of ``path``. Debian ships it only in the
    static libappimage_shared.a (libappimage-dev): linked into a shared object here."""
    lib = tmp / "libappimage_digest.so"
    if not lib.exists():
        archives = [LIBAPPIMAGE / "libappimage_shared.a", LIBAPPIMAGE / "libappimage_hashlib.a"]
        for a in archives:
            assert a.exists(), f"{a} is missing (install the Debian package libappimage-dev)"
        linked = run(
            [
                "gcc",
                "-shared",
                "-o",
                str(lib),
                "-Wl,--whole-archive",
                *map(str, archives),
                "-Wl,--no-whole-archive",
            ]
        )
        assert linked.returncode == 0, linked.stderr
    dll = ctypes.CDLL(str(lib))
    dll.appimage_type2_digest_md5.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    dll.appimage_type2_digest_md5.restype = ctypes.c_bool
    out = ctypes.create_string_buffer(16)
    assert dll.appimage_type2_digest_md5(str(path).encode(), out), "libappimage could not digest it"
    return out.raw


def section(path: Path, name: str, tmp: Path) -> bytes:
    """An ELF section's bytes, as binutils reads them."""
    out = tmp / f"{name.lstrip('.')}.bin"
    dumped = run(["objcopy", "--dump-section", f"{name}={out}", str(path), str(tmp / "objcopy.out")])
    assert dumped.returncode == 0, dumped.stderr
    return out.read_bytes()


def test_libappimage_finds_the_digest_that_is_embedded(published: Published, tmp_path: Path) -> None:
    for store, version in ((published.v1, 1), (published.v2, 2)):
        blob, _ = published.appimage(store, version)
        embedded = section(blob, ".digest_md5", tmp_path)
        assert embedded != bytes(16)
        assert libappimage_digest(blob, tmp_path) == embedded
    # As built, before the publisher embedded anything, it has none.
    assert section(published.built, ".digest_md5", tmp_path) == bytes(16)


def test_the_spec_s_procedure_verifies_the_embedded_signature(
    published: Published, signing: Signing, tmp_path: Path, gpg_home: Path
) -> None:
    blob, art = published.appimage(published.v2, 2)
    signature = section(blob, ".sha256_sig", tmp_path)
    key = section(blob, ".sig_key", tmp_path)
    assert signature.startswith(b"\n-----BEGIN PGP SIGNATURE-----\n")
    # The key that signed: the publisher's, armored, as appimagetool embeds it.
    shown = run(["gpg", "--show-keys", "--with-colons"], input=key.rstrip(b"\0").decode())
    assert f"fpr:::::::::{signing.fingerprint}:" in shown.stdout
    # The signed text: the hex SHA-256 of the file with .sha256_sig and .sig_key zeroed
    # (offsets from readelf, zeros written with dd, hashed by sha256sum).
    copy = tmp_path / "zeroed.AppImage"
    shutil.copyfile(blob, copy)
    table = run(["readelf", "-SW", str(blob)]).stdout
    for name in (".sha256_sig", ".sig_key"):
        (line,) = [ln for ln in table.splitlines() if f" {name} " in ln]
        fields = line.split("]", 1)[1].split()
        offset, size = int(fields[3], 16), int(fields[4], 16)
        zeroed = run(
            ["dd", "if=/dev/zero", f"of={copy}", "bs=1", f"seek={offset}", f"count={size}", "conv=notrunc"]
        )
        assert zeroed.returncode == 0, zeroed.stderr
    digest = run(["sha256sum", str(copy)]).stdout.split()[0]
    (tmp_path / "signed.txt").write_text(digest)
    (tmp_path / "signature.asc").write_bytes(signature.rstrip(b"\0"))
    checked = gpg_verify(signing.public_key, tmp_path / "signed.txt", tmp_path / "signature.asc", gpg_home)
    assert checked.returncode == 0, checked.stderr
    assert "Good signature" in checked.stderr
    # The runtime prints it too.
    printed = run([str(runnable(blob, tmp_path)), "--appimage-signature"]).stdout
    assert printed.strip() == signature.rstrip(b"\0").decode().strip()
    # A byte changed anywhere outside the two sections: bad.
    with copy.open("r+b") as f:
        f.seek(art["size"] - 100)
        byte = f.read(1)
        f.seek(art["size"] - 100)
        f.write(bytes([byte[0] ^ 1]))
    (tmp_path / "signed.txt").write_text(run(["sha256sum", str(copy)]).stdout.split()[0])
    bad = gpg_verify(signing.public_key, tmp_path / "signed.txt", tmp_path / "signature.asc", gpg_home)
    assert bad.returncode != 0 and "BAD signature" in bad.stderr


def test_update_information_names_the_host_s_stable_zsync_file(published: Published, tmp_path: Path) -> None:
    blob, _ = published.appimage(published.v2, 2)
    stable = f"{published.url}/hosts/web-1/web-1-latest-x86_64.AppImage.zsync"
    printed = run([str(runnable(blob, tmp_path)), "--appimage-updateinformation"])
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == f"zsync|{stable}\n"


def test_unsealed_the_published_appimage_is_the_nix_build(published: Published) -> None:
    blob, _ = published.appimage(published.v2, 2)
    built = published.built.read_bytes()
    assert blob.read_bytes() != built
    assert sealed.unsealed(blob, "v2") == built
    # ... and the build has every reserved section empty.
    assert sealed.unsealed(published.built, "built") == built


def test_reconciler_verify_checks_the_embedded_signature_and_digest(
    published: Published, signing: Signing, tmp_path: Path
) -> None:
    latest = f"{published.url}/hosts/web-1/latest.json"
    ok = cli("verify", "--key", str(signing.public_key), latest)
    assert ok.returncode == 0, ok.stderr
    assert f"embedded signature (.sha256_sig) by {signing.fingerprint}" in ok.stdout
    blob, art = published.appimage(published.v2, 2)
    # Tampered after signing, with a detached signature made for the tampered bytes
    # (a store that holds the key, or an .asc swapped in): the embedded one fails. The
    # digest is covered by it too.
    secs = appimage.sections(blob.read_bytes(), "blob")
    digest = secs[appimage.SectionName.DIGEST]
    for name, at in (("payload", art["size"] - 100), ("digest", digest.offset)):
        forged = tmp_path / f"{name}.AppImage"
        data = bytearray(blob.read_bytes())
        data[at] ^= 1
        forged.write_bytes(bytes(data))
        result = verify_file(forged, signing)
        assert result.returncode == 1
        assert f"{forged} (.sha256_sig): bad signature" in result.stderr, result.stderr
    # A digest that is wrong under a good signature (as a faulty publisher would make).
    data = bytearray(blob.read_bytes())
    data[digest.offset : digest.end] = bytes(16)
    sig = secs[appimage.SectionName.SIGNATURE]
    text = appimage.signature_text(bytes(data), secs)
    made = subprocess.run(
        ["gpg", "--homedir", str(signing.gnupghome), "--batch", "--armor", "--detach-sign"],
        input=text,
        capture_output=True,
        check=True,
    ).stdout
    data[sig.offset : sig.end] = appimage.filled(sig, b"\n" + made, appimage.SectionName.SIGNATURE)
    forged = tmp_path / "digest-resigned.AppImage"
    forged.write_bytes(bytes(data))
    result = verify_file(forged, signing)
    assert result.returncode == 1
    assert ".digest_md5 holds 00000000000000000000000000000000, the file's digest is" in result.stderr


def test_an_appimage_from_before_embedded_signatures_is_noted_not_refused(
    published: Published, signing: Signing, tmp_path: Path
) -> None:
    old = tmp_path / "unsealed.AppImage"
    shutil.copyfile(published.built, old)
    old.chmod(0o644)
    result = verify_file(old, signing)
    assert result.returncode == 0, result.stderr
    assert f"NOTE {old} carries no embedded signature or digest" in result.stdout


def verify_file(path: Path, signing: Signing) -> subprocess.CompletedProcess[str]:
    """`reconciler verify` of ``path``, with a detached signature made for it as it is."""
    signed = run(
        [
            "gpg",
            "--homedir",
            str(signing.gnupghome),
            "--batch",
            "--yes",
            "--armor",
            "--detach-sign",
            str(path),
        ]
    )
    assert signed.returncode == 0, signed.stderr
    return cli("verify", "--key", str(signing.public_key), str(path))


# -- zsync ------------------------------------------------------------------------


def test_debian_s_zsync_updates_release_1_from_the_update_information(
    published: Published, tmp_path: Path
) -> None:
    old, _ = published.appimage(published.v1, 1)
    new, art = published.appimage(published.v2, 2)
    published.serve(published.v2)
    info = run([str(runnable(old, tmp_path)), "--appimage-updateinformation"]).stdout.strip()
    transport, _, control = info.partition("|")
    assert transport == "zsync"
    synced = run(["zsync", "-i", str(old), "-o", str(tmp_path / "new.AppImage"), control], cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr
    assert (tmp_path / "new.AppImage").read_bytes() == new.read_bytes()
    fetched = int(synced.stdout.rsplit("fetched ", 1)[1].split()[0])
    assert fetched < art["size"] // 10, synced.stdout


def agent_for(tmp: Path, store: str, signing: Signing, timeout: str = "20s") -> Any:
    cfg = {
        "host": "web-1",
        "store": store,
        "keys": [str(signing.public_key)],
        "state_dir": str(tmp / "agent"),
        "supervise": False,
        "timeout": timeout,
    }
    (tmp / "agent.yaml").write_text(yaml.safe_dump(cfg))
    return open_agent(load_agent_config(tmp / "agent.yaml"))


def downloaded(agent: Any, method: str | None = None) -> float:
    if method is not None:
        name, labels = "reconciler_agent_artifact_downloads_total", {"method": method}
    else:
        name, labels = "reconciler_agent_downloaded_bytes_total", {}
    value = agent.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def test_the_agent_fetches_only_the_changed_blocks(
    published: Published, signing: Signing, tmp_path: Path, events: io.StringIO
) -> None:
    published.serve(published.v1)
    agent = agent_for(tmp_path, published.url, signing)
    assert agent.poll() == "updated"
    assert downloaded(agent, "full") == 1 and downloaded(agent, "zsync") == 0
    published.serve(published.v2)
    before = downloaded(agent)
    assert agent.poll() == "updated"
    blob, art = published.appimage(published.v2, 2)
    installed = agent.artifact(2)
    assert installed.read_bytes() == blob.read_bytes()
    assert downloaded(agent, "zsync") == 1
    # Metadata, the control file and the blocks: a fraction of the AppImage.
    assert downloaded(agent) - before < art["size"] // 10
    assert "event=agent_zsync " in events.getvalue()
    assert sorted(p.name for p in installed.parent.iterdir()) == sorted([installed.name, "release.json"])


def test_a_control_file_that_does_not_fit_the_release_means_a_full_download(
    published: Published, signing: Signing, tmp_path: Path, events: io.StringIO
) -> None:
    published.serve(published.v1)
    agent = agent_for(tmp_path, published.url, signing)
    assert agent.poll() == "updated"
    published.serve(published.v2)
    blob, art = published.appimage(published.v2, 2)
    control = published.served / (art["blob"] + ".zsync")
    # One that describes another length, then one that builds other bytes (its
    # checksums of the old release's blocks: zsync copies those and calls it done).
    control.write_bytes(control.read_bytes().replace(f"Length: {art['size']}".encode(), b"Length: 5"))
    assert agent.poll() == "updated"
    assert agent.artifact(2).read_bytes() == blob.read_bytes()
    assert downloaded(agent, "full") == 2 and downloaded(agent, "zsync") == 0
    assert "event=agent_zsync_failed" in events.getvalue() and "describes 5 bytes" in events.getvalue()


class HangingBlobs(ThreadingHTTPServer):
    """Serves a store's files; once ``hang`` is set, a blob's answer never comes."""

    def __init__(self, root: Path) -> None:
        self.release = threading.Event()
        self.hang = False
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                blob = "/blobs/" in self.path and not self.path.endswith((".asc", ".zsync"))
                if server.hang and blob:
                    server.release.wait(60)
                    return
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


def zsync_processes() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "exe") == "/usr/bin/zsync":
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_zsync_from_a_store_that_hangs_is_stopped_at_the_deadline(
    published: Published, signing: Signing, tmp_path: Path, events: io.StringIO
) -> None:
    root = tmp_path / "hanging"
    shutil.copytree(published.v1, root)
    server = HangingBlobs(root)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        agent = agent_for(tmp_path, server.url, signing, timeout="3s")
        assert agent.poll() == "updated"
        # Release 2, from a store whose blobs hang: zsync is stopped at the deadline,
        # the full download after it too, and the poll ends.
        shutil.rmtree(root)
        shutil.copytree(published.v2, root)
        # Release 1's files may have been written in the same second (If-Modified-Since).
        renew(root, time.time() + 10)
        server.hang = True
        started = time.monotonic()
        result = agent.poll()
        took = time.monotonic() - started
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
    assert result == "error"
    assert took < 15, took
    text = events.getvalue()
    assert "event=agent_zsync_failed" in text and "not done within 3s" in text
    assert not zsync_processes()

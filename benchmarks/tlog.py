"""The transparency log's cost per release, side by side with the plain publish, and
what an agent with ``require_log`` fetches to check a release.

Publishes R releases (default 256: one whole level-0 tile, so averages are those of a
log of any size) of one small stand-in artifact each into a filesystem store, signed
with a real gpg key, twice: plain (blob and signature, release file and signature,
latest.json and signature: publish() without the log) and logged (the same, and the
log's tiles, entry bundle, inclusion proof and signed checkpoint). Per release: wall
time, objects and bytes written (the store keeps every one: tiles are append-only).

Then a log of N entries (default 100,000, built in one batch append, then one release
published through the daemon's log as usual) and an agent's check of that release
(reconciler.agent.logcheck, real gpg verification): the objects and bytes it reads,
having seen the head one release before, and having seen a head N/2 entries before.

    python3 benchmarks/tlog.py [--releases 256] [--log-size 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.adapters.gpg import Signer  # noqa: E402
from reconciler.adapters.notes import OpenPgpNoteSigner, OpenPgpNoteVerifier  # noqa: E402
from reconciler.adapters.store import FilesystemStore  # noqa: E402
from reconciler.agent.logcheck import LogClient  # noqa: E402
from reconciler.core import tlog  # noqa: E402
from reconciler.core.layout import CHECKPOINT, log_path, release_path  # noqa: E402
from reconciler.core.note import Note  # noqa: E402
from reconciler.core.release import RELEASE_LIMIT, Artifact, new_release  # noqa: E402
from reconciler.daemon.publish import publish  # noqa: E402
from reconciler.daemon.tlog import TransparencyLog, default_origin, sign, write_state  # noqa: E402
from reconciler.demo import KeyType, make_signing_key  # noqa: E402
from tests.fakes import StoreProxy  # noqa: E402


class Counted(StoreProxy):
    """A store that counts what is written to it and read from it."""

    def __init__(self, inner: FilesystemStore) -> None:
        super().__init__(inner)
        self.writes = 0
        self.written = 0
        self.reads: list[tuple[str, int]] = []

    def wrote(self, key: str, size: int) -> None:
        # A copy is one object written, by a link or a copy inside the store: no bytes
        # sent from here (size 0).
        self.writes += 1
        self.written += size

    def read(self, key: str, data: bytes | None) -> None:
        self.reads.append((key, len(data) if data is not None else 0))


@dataclass
class Run:
    seconds: list[float] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    written: list[int] = field(default_factory=list)


def publish_one(
    store: Counted,
    tmp: Path,
    signer: Signer,
    release: tuple[str, int, bytes, datetime],
    log: TransparencyLog | None,
) -> tuple[float, int, int]:
    """One release (host, version, its one artifact's bytes, when) of a stand-in AppImage
    published, with its log entry where there is a log: seconds, objects and bytes written."""
    host, version, content, now = release
    blob = tmp / f"{host}-{version}.AppImage"
    blob.write_bytes(content)
    art = Artifact("appimage", blob.name, blob.stat().st_size, hashlib.sha256(blob.read_bytes()).hexdigest())
    r = new_release(host, version, "c" * 40, "/nix/store/x.drv", (art,), now, timedelta(days=30))
    writes, written = store.writes, store.written
    t = time.perf_counter()
    publish(
        store,
        r,
        {"appimage": blob},
        signer.sign_file,
        signer.sign,
        log=(lambda rel, meta: log.append_release(rel.host, rel.version, meta)) if log else None,
    )
    return time.perf_counter() - t, store.writes - writes, store.written - written


def publish_all(store: Counted, tmp: Path, signer: Signer, releases: int, log: TransparencyLog | None) -> Run:
    run = Run()
    now = datetime.now(UTC)
    for i in range(releases):
        host = f"web-{i % 50}"
        version = i // 50 + 1
        seconds, writes, written = publish_one(
            store, tmp, signer, (host, version, f"{host} {version} ".encode() * 256, now), log
        )
        run.seconds.append(seconds)
        run.writes.append(writes)
        run.written.append(written)
    return run


def big_log(store: Counted, state: Path, signer: Signer, size: int) -> tuple[tlog.Edge, list[bytes]]:
    """A log of ``size`` entries written as one append would, checkpoint signed."""
    entries = [
        tlog.release_entry(f"old-{i % 1000}", i // 1000 + 1, hashlib.sha256(b"%d" % i).hexdigest())
        for i in range(size)
    ]
    edge, writes = tlog.append(tlog.Edge(0), entries)
    for item, data in writes.items():
        store.inner.put_bytes(log_path(item), data)
    note_signer = OpenPgpNoteSigner(signer)
    cp = tlog.Checkpoint(default_origin(signer.fingerprint), edge.size, edge.root())
    note = Note(cp.text(), (sign(cp, note_signer, cp.origin),))
    store.inner.put_bytes(CHECKPOINT, note.to_bytes())
    write_state(state / "checkpoint", note)
    return edge, entries


def head_at(entries: list[bytes], size: int, signer: Signer) -> bytes:
    edge, _ = tlog.append(tlog.Edge(0), entries[:size])
    cp = tlog.Checkpoint(default_origin(signer.fingerprint), size, edge.root())
    return Note(cp.text(), (sign(cp, OpenPgpNoteSigner(signer), cp.origin),)).to_bytes()


def agent_check(
    store: Counted, tmp: Path, name: str, seen: bytes, verifier: OpenPgpNoteVerifier
) -> tuple[int, int, float]:
    state = tmp / name / "log-checkpoint"
    state.parent.mkdir(parents=True)
    state.write_bytes(seen)
    client = LogClient(lambda key, limit: store.get_bytes(key, limit), verifier, None, frozenset(), state)
    data = store.inner.get_bytes(release_path("new-host", 1), RELEASE_LIMIT)
    assert data is not None
    store.reads.clear()
    t = time.perf_counter()
    client.check("new-host", 1, hashlib.sha256(data).hexdigest())
    seconds = time.perf_counter() - t
    return len(store.reads), sum(n for _, n in store.reads), seconds


def kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--releases", type=int, default=256)
    ap.add_argument("--log-size", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlog-bench-") as d:
        tmp = Path(d)
        home = tmp / "gnupg"
        fpr = make_signing_key(home, name="tlog benchmark", key_type=KeyType.ED25519)
        try:
            signer = Signer(home, fpr)
            verifier = OpenPgpNoteVerifier([signer.public_key()])
            plain_store = Counted(FilesystemStore(tmp / "plain"))
            plain = publish_all(plain_store, tmp, signer, args.releases, None)
            logged_store = Counted(FilesystemStore(tmp / "logged"))
            log = TransparencyLog(
                logged_store, lambda: OpenPgpNoteSigner(signer), lambda: verifier, tmp / "state"
            )
            logged = publish_all(logged_store, tmp, signer, args.releases, log)
            n = args.releases
            print(f"publish, {n} releases of one small artifact each (per release):")
            print(f"  {'':14} {'time':>10} {'objects':>8} {'bytes written':>14}")
            for name, run in (("plain", plain), ("with the log", logged)):
                ms = statistics.median(run.seconds) * 1000
                objects = statistics.median(run.writes)
                print(f"  {name:14} {ms:8.1f}ms {objects:8.0f} {kib(statistics.mean(run.written)):>14}")
            extra_t = statistics.median(logged.seconds) - statistics.median(plain.seconds)
            extra_b = statistics.mean(logged.written) - statistics.mean(plain.written)
            print(
                f"  the log adds {extra_t * 1000:.1f} ms (a gpg signature of the checkpoint, 4 writes)"
                f" and {kib(extra_b)} per release (kept: the tiles are append-only)"
            )
            log_bytes = sum(p.stat().st_size for p in (tmp / "logged" / "log").rglob("*") if p.is_file())
            log_bytes += sum(p.stat().st_size for p in (tmp / "logged").rglob("*.inclusion.json"))
            print(
                f"  log/ and inclusion proofs after {n} releases: {kib(log_bytes)}"
                f" ({kib(log_bytes / n)} per release)"
            )

            # A big log, one more release through the daemon's log, and an agent's check.
            size = args.log_size
            big = Counted(FilesystemStore(tmp / "big"))
            t = time.perf_counter()
            _, entries = big_log(big, tmp / "big-state", signer, size)
            built = time.perf_counter() - t
            big_tlog = TransparencyLog(
                big, lambda: OpenPgpNoteSigner(signer), lambda: verifier, tmp / "big-state"
            )
            one = publish_all_one(big, tmp, signer, big_tlog)
            print(
                f"\na log of {size:,} entries (built in {built:.1f} s), one more release published:"
                f" {one[0] * 1000:.1f} ms, {one[1]} objects, {kib(one[2])} written"
            )
            behind_one = head_at(entries, size, signer)
            behind_half = head_at(entries, size // 2, signer)
            print("an agent's check of that release (checkpoint, inclusion proof, tiles; gpg included):")
            for name, seen in (
                ("seen the head one release before", behind_one),
                (f"seen the head of size {size // 2:,}", behind_half),
            ):
                count, nbytes, seconds = agent_check(big, tmp, name.replace(" ", "-"), seen, verifier)
                print(f"  {name:38} {count:3} objects, {kib(nbytes):>10}, {seconds * 1000:.0f} ms")
            print("  an idle poll reads nothing of the log (it is read only for a new release)")
        finally:
            subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    return 0


def publish_all_one(
    store: Counted, tmp: Path, signer: Signer, log: TransparencyLog
) -> tuple[float, int, int]:
    return publish_one(store, tmp, signer, ("new-host", 1, b"new host" * 512, datetime.now(UTC)), log)


if __name__ == "__main__":
    raise SystemExit(main())

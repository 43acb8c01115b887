"""The commit gate and gpg's deadlines, with real git and gpg: a head is built only if its
signature (with verify_commits) is good and it descends from the last reconciled commit;
a signature, from a commit or a store, reaches gpg only if it is signature packets."""

from __future__ import annotations

import base64
import bz2
import json
import os
import shutil
import socket
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters import git as source
from reconciler.adapters import gpg as gpg
from reconciler.adapters.git import GitSource
from reconciler.adapters.gpg import Signer
from reconciler.config import load_config
from reconciler.core.openpgp import crc24
from reconciler.daemon.reconciler import Reconciler
from reconciler.errors import ReconcilerError, SigningError, SourceError
from reconciler.wiring import open_reconciler
from tests.conftest import (
    ConfigRepo,
    Signing,
    cli,
    recorded_calls,
    standard_fleet,
    stop_gpg_agent,
    wait_for,
    write_config,
)
from tests.integration.test_sources import gpg_key, relocate, signed_commit

pytestmark = pytest.mark.integration

# gpg inflates this at about 5 s per GiB: half a minute of gpg for every check.
BOMB_GIB = 6


def versions(store: Path) -> dict[str, int]:
    return {
        p.parent.name: json.loads(p.read_text())["version"] for p in sorted(store.glob("hosts/*/latest.json"))
    }


def refusals(rec: Reconciler, reason: str) -> float | None:
    return rec.metrics.registry.get_sample_value("reconciler_untrusted_commits_total", {"reason": reason})


def compression_bomb(gib: int) -> bytes:
    """An armored "signature" of a few hundred bytes: a bzip2-compressed packet holding a
    deflate-compressed packet holding a literal packet of ``gib`` GiB of zeros, all of
    which gpg inflates before it finds no signature in it."""

    def packet(tag: int, body: bytes) -> bytes:  # new format, 5-octet length
        return bytes([0xC0 | tag, 0xFF]) + len(body).to_bytes(4, "big") + body

    literal = bytes([0xAF]) + b"b\0\0\0\0\0"  # old format, indeterminate length: to the end
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = bytes(1 << 20)
    head = deflate.compress(literal + mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    # After a full flush, every further MiB of zeros compresses to the same bytes.
    again = deflate.compress(mib) + deflate.flush(zlib.Z_FULL_FLUSH)
    inner = packet(8, b"\x01" + head + again * ((gib << 10) - 1) + deflate.flush())
    data = packet(8, b"\x03" + bz2.compress(inner, 9))
    b64 = base64.b64encode(data).decode()
    crc = base64.b64encode(crc24(data).to_bytes(3, "big")).decode()
    lines = ["-----BEGIN PGP SIGNATURE-----", "", b64, "=" + crc, "-----END PGP SIGNATURE-----"]
    return ("\n".join(lines) + "\n").encode()


def forge_commit(repo: ConfigRepo, signature: bytes, message: str) -> str:
    """Commit the work tree with ``signature`` as its gpgsig header, written as git writes
    one, and move the branch to it."""

    def git(*args: str, stdin: bytes = b"") -> str:
        res = subprocess.run(
            ["git", "-C", str(repo.path), *args], input=stdin, capture_output=True, check=True
        )
        return res.stdout.decode().strip()

    git("add", "-A")
    tree, parent = git("write-tree"), git("rev-parse", "HEAD")
    who = "Mallory <mallory@example.invalid> 1700000000 +0000"
    sig = "\n ".join(signature.decode().rstrip("\n").split("\n"))
    raw = f"tree {tree}\nparent {parent}\nauthor {who}\ncommitter {who}\ngpgsig {sig}\n\n{message}\n"
    commit = git("hash-object", "-t", "commit", "-w", "--stdin", stdin=raw.encode())
    git("update-ref", "refs/heads/main", commit)
    git("reset", "-q", "--hard", commit)
    return commit


@pytest.fixture
def developer(tmp_path: Path) -> Iterator[tuple[Path, str, Path]]:
    """A developer's keyring: (GNUPGHOME, fingerprint, public key file)."""
    home = tmp_path / "dev-gnupg"
    fpr, pub = gpg_key(home, "Developer")
    yield home, fpr, pub
    stop_gpg_agent(home)


def trusting(developer: tuple[Path, str, Path]) -> dict[str, object]:
    _, fpr, pub = developer
    return {"verify_commits": {"keys": [str(pub)], "fingerprints": [fpr]}}


def test_a_compressed_packet_signature_is_refused_before_gpg_reads_it(
    tmp_path: Path,
    config_repo: ConfigRepo,
    signing: Signing,
    developer: tuple[Path, str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    standard_fleet(config_repo)
    relocate(config_repo, 70)
    bomb = forge_commit(config_repo, compression_bomb(BOMB_GIB), "looks signed")
    repo = {"url": str(config_repo.path), **trusting(developer)}
    cfg = write_config(tmp_path, config_repo, signing, repo=repo)
    why = f"commit {bomb} is not built: gpgsig header: signature holds a packet of type 8, not a signature"
    # gpg would inflate the signature for about half a minute (the code before the gate
    # did so on every pass); refused unread, the pass takes a second or two.
    res = cli("reconcile", "-c", str(cfg), timeout=15)
    assert res.returncode == 1 and res.stderr.strip().endswith(why), res.stderr
    assert "event=commit_refused" in res.stderr and "reason=malformed-signature" in res.stderr
    assert f"source: {why}" in cli("status", "-c", str(cfg)).stdout
    assert not (tmp_path / "store" / "hosts").exists()
    # In the daemon, the verdict is remembered: the same head costs no git or gpg run
    # again, and is still counted and reported every pass.
    rec = open_reconciler(load_config(cfg))
    reads = recorded_calls(monkeypatch, rec.source, "signature")
    try:
        for passes in (1, 2, 3):
            with pytest.raises(SourceError, match=why):
                rec.reconcile()
            assert refusals(rec, "malformed-signature") == passes
        assert reads == [(bomb,)]
    finally:
        rec.close()


def test_a_commit_too_large_to_hold_a_real_signature_is_refused_unread(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, developer: tuple[Path, str, Path]
) -> None:
    home, fpr, _ = developer
    standard_fleet(config_repo)
    relocate(config_repo, 75)
    message = tmp_path / "message"
    message.write_text("x" * (source.COMMIT_LIMIT + 1))
    config_repo.repo.git.add("-A")
    env = {**os.environ, "GNUPGHOME": str(home)}
    git = ["git", "-C", str(config_repo.path)]
    subprocess.run([*git, "commit", "-q", f"-S{fpr}", "-F", str(message)], check=True, env=env)
    big = config_repo.head
    repo = {"url": str(config_repo.path), **trusting(developer)}
    rec = open_reconciler(load_config(write_config(tmp_path, config_repo, signing, repo=repo)))
    try:
        why = f"commit {big} is not built: commit larger than {source.COMMIT_LIMIT} bytes"
        with pytest.raises(SourceError, match=why):
            rec.reconcile()
        assert refusals(rec, "malformed-signature") == 1
    finally:
        rec.close()


def test_a_git_verify_commit_past_its_deadline_is_killed_with_its_gpg(
    tmp_path: Path, config_repo: ConfigRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gate never shows gpg such a signature; this is the deadline behind it.
    standard_fleet(config_repo)
    bomb = forge_commit(config_repo, compression_bomb(BOMB_GIB), "looks signed")
    src = GitSource(str(config_repo.path), "main", tmp_path / "checkout")
    assert src.fetch() == bomb
    home = tmp_path / "verify-gnupg"
    home.mkdir(mode=0o700)
    monkeypatch.setattr(source, "VERIFY_TIMEOUT", 1.0)
    with pytest.raises(SourceError, match=f"checking the signature of commit {bomb} timed out after 1 s"):
        src.verify_commit(bomb, home)
    # Neither git nor the gpg it started is left running (SIGKILL takes effect at once,
    # but not synchronously).
    wait_for(lambda: not running_with(f"GNUPGHOME={home}"), 10, "git and gpg to be killed")


def running_with(variable: str) -> list[bytes]:
    """Command lines of the live processes (not zombies) with ``variable`` in their environment."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and variable.encode() in (proc / "environ").read_bytes().split(b"\0"):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append((proc / "cmdline").read_bytes())
        except OSError:
            continue
    return found


def test_a_force_push_back_to_an_older_signed_commit_is_refused(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, developer: tuple[Path, str, Path]
) -> None:
    home, fpr, _ = developer
    standard_fleet(config_repo)
    relocate(config_repo, 71)
    old = signed_commit(config_repo, home, fpr, "web-1 at .71")
    repo = {"url": str(config_repo.path), **trusting(developer)}
    cfg = write_config(tmp_path, config_repo, signing, repo=repo)
    store = tmp_path / "store"
    rec = open_reconciler(load_config(cfg))
    try:
        assert rec.reconcile().ok
        relocate(config_repo, 72)
        last = signed_commit(config_repo, home, fpr, "web-1 at .72")
        assert [(o.host, o.version) for o in rec.reconcile().outcomes] == [("web-1", 2)]
        published = versions(store)
        # The branch is moved back to a validly signed, older commit.
        config_repo.repo.git.reset("--hard", old)
        why = f"commit {old} is not built: it does not descend from {last}, the last reconciled commit"
        with pytest.raises(SourceError, match=why):
            rec.reconcile()
        assert versions(store) == published
        assert refusals(rec, "not-descendant") == 1
        assert refusals(rec, "bad-signature") == 0
        assert f"source: {why}" in cli("status", "-c", str(cfg)).stdout
        # Once the branch moves forward from the last reconciled commit, passes resume.
        config_repo.repo.git.reset("--hard", last)
        relocate(config_repo, 73)
        newer = signed_commit(config_repo, home, fpr, "web-1 at .73")
        result = rec.reconcile()
        assert result.ok and result.plan.commit == newer
        assert [(o.host, o.version) for o in result.outcomes] == [("web-1", 3)]
        assert "source:" not in cli("status", "-c", str(cfg)).stdout
    finally:
        rec.close()
    # Allowed in the config, the older commit is built, as new versions.
    config_repo.repo.git.reset("--hard", old)
    cfg = write_config(tmp_path, config_repo, signing, repo={**repo, "allow_force_push": True})
    rec = open_reconciler(load_config(cfg))
    try:
        result = rec.reconcile()
        assert result.ok and result.plan.commit == old
        assert [(o.host, o.version) for o in result.outcomes] == [("web-1", 4)]
    finally:
        rec.close()


def orphan_history(repo: ConfigRepo) -> str:
    """Replace the branch with a history of its own (same files, one changed)."""
    repo.repo.git.checkout("-q", "--orphan", "rewrite")
    relocate(repo, 81)
    head = repo.commit("history rewritten")
    repo.repo.git.branch("-M", "rewrite", "main")
    return head


def test_without_verify_commits_a_rewritten_history_is_refused_too(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    first = standard_fleet(config_repo)
    cfg = write_config(tmp_path, config_repo, signing)
    rec = open_reconciler(load_config(cfg))
    try:
        assert rec.reconcile().ok
        published = versions(tmp_path / "store")
        rewritten = orphan_history(config_repo)
        why = f"commit {rewritten} is not built: it does not descend from {first}"
        with pytest.raises(SourceError, match=why):
            rec.reconcile()
        assert refusals(rec, "not-descendant") == 1
    finally:
        rec.close()
    assert versions(tmp_path / "store") == published
    plan = cli("plan", "-c", str(cfg))
    assert plan.returncode == 1 and why in plan.stderr
    assert f"source: {why}" in cli("status", "-c", str(cfg)).stdout


def test_a_shallow_clone_deepens_its_history_to_tell_ancestry(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    standard_fleet(config_repo)
    # file://: a plain local path would ignore the depth.
    repo = {"url": f"file://{config_repo.path}", "depth": 1}
    cfg = write_config(tmp_path, config_repo, signing, repo=repo)
    rec = open_reconciler(load_config(cfg))
    try:
        last = rec.reconcile().plan.commit
        for octet in (91, 92, 93):
            relocate(config_repo, octet)
            config_repo.commit(f"web-1 at .{octet}")
        # The last reconciled commit is three commits behind the shallow history.
        result = rec.reconcile()
        assert result.ok and [(o.host, o.version) for o in result.outcomes] == [("web-1", 2)]
        last = result.plan.commit
        rewritten = orphan_history(config_repo)
        with pytest.raises(SourceError, match=f"commit {rewritten} is not built: it does not descend"):
            rec.reconcile()
        config_repo.repo.git.reset("--hard", last)
        for octet in (94, 95, 96, 97):
            relocate(config_repo, octet)
            head = config_repo.commit(f"web-1 at .{octet}")
    finally:
        rec.close()
    # When even the deepened history does not reach back to it, the gate cannot tell,
    # and refuses.
    monkeypatch.setattr(source, "DEEPEN_STEPS", (1,))
    rec = open_reconciler(load_config(cfg))
    try:
        with pytest.raises(SourceError, match=f"commit {head} is not built: cannot tell whether it descends"):
            rec.reconcile()
    finally:
        rec.close()
    monkeypatch.undo()
    rec = open_reconciler(load_config(cfg))
    try:
        assert rec.reconcile().plan.commit == head
    finally:
        rec.close()


def test_build_and_plan_go_through_the_gate(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, developer: tuple[Path, str, Path]
) -> None:
    head = standard_fleet(config_repo)  # not signed
    repo = {"url": str(config_repo.path), **trusting(developer)}
    cfg = write_config(tmp_path, config_repo, signing, repo=repo)
    why = f"reconciler: error: commit {head} is not built: not signed"
    for command in (("build", "-c", str(cfg), "web-1"), ("plan", "-c", str(cfg))):
        res = cli(*command)
        assert res.returncode == 1 and res.stderr.strip().splitlines()[-1] == why, res.stderr
        assert res.stdout == ""


def test_reconciler_verify_refuses_a_compressed_packet_signature_before_gpg_reads_it(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    rec = open_reconciler(load_config(write_config(tmp_path, config_repo, signing)))
    try:
        assert rec.reconcile().ok
    finally:
        rec.close()
    release = tmp_path / "store/hosts/web-1/releases/1.json"
    release.with_suffix(".json.asc").write_bytes(compression_bomb(BOMB_GIB))
    # gpg would inflate it for about half a minute.
    res = cli("verify", "--key", str(signing.public_key), str(release), timeout=15)
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"reconciler: error: {release}: signature holds a packet of type 8, not a signature"
    )


@pytest.fixture
def hung_agent(tmp_path: Path, signing: Signing) -> Iterator[Path]:
    """A copy of the signing keyring whose gpg-agent accepts connections and never answers."""
    home = tmp_path / "hung-gnupg"
    shutil.copytree(signing.gnupghome, home, ignore=shutil.ignore_patterns("S.*", "*.lock"))
    where = subprocess.run(
        ["gpgconf", "--homedir", str(home), "--list-dirs", "agent-socket"], capture_output=True, text=True
    ).stdout.strip()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(where)
    listener.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield home
    listener.close()
    for conn in accepted:
        conn.close()
    if os.path.exists(where):
        os.unlink(where)


def test_gpg_calls_past_their_deadline_are_killed(
    hung_agent: Path, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpg, "GPG_TIMEOUT", 1.0)
    monkeypatch.setattr(gpg, "SIGN_TIMEOUT", 1.0)
    errors: list[ReconcilerError] = []

    def attempt() -> None:
        try:
            Signer(hung_agent, signing.fingerprint).sign(b"release")
        except ReconcilerError as exc:
            errors.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    # Without a deadline gpg waits for the agent forever.
    worker.join(30)
    assert not worker.is_alive(), "gpg is still waiting for the agent"
    assert len(errors) == 1 and isinstance(errors[0], SigningError)
    assert str(errors[0]) == f"gpg timed out after 1 s listing secret key {signing.fingerprint}"

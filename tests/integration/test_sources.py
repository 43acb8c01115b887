"""Trusting and reaching the config repository: triggers, commit signatures, remotes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import yaml

from reconciler.config import load_config
from reconciler.demo import make_signing_key
from reconciler.wiring import open_reconciler
from tests.conftest import (
    WEB,
    ConfigRepo,
    Signing,
    answer,
    cli,
    free_port,
    is_ready,
    latest_version,
    metric_value,
    standard_fleet,
    stop_gpg_agent,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

SECRET = "webhook-secret-for-tests"


def metric(base: str, name: str, labels: dict[str, str] | None = None) -> float:
    return metric_value(base, name, labels) or 0.0


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    return answer(url, body, headers)[0]


class Daemon:
    def __init__(self, tmp_path: Path, repo: ConfigRepo, signing: Signing, **extra: Any) -> None:
        self.cfg = write_config(tmp_path, repo, signing, poll_interval=3600, **extra)
        self.base = "http://" + yaml.safe_load(self.cfg.read_text())["listen"]
        self.store = tmp_path / "store"
        self.log = tmp_path / "daemon.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "run", "-c", str(self.cfg)], stderr=out
            )
        wait_for(self.ready, 180, "the first pass")

    def ready(self) -> bool:
        return is_ready(self.base)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0


@pytest.fixture
def fleet(config_repo: ConfigRepo) -> ConfigRepo:
    standard_fleet(config_repo)
    return config_repo


def relocate(repo: ConfigRepo, octet: int) -> None:
    repo.write("hosts/web-1.yaml", WEB.format(name="web-1", address=f"10.42.0.{octet}/24", port=18081))


def move(repo: ConfigRepo, octet: int) -> str:
    relocate(repo, octet)
    return repo.commit(f"move web-1 to .{octet}")


def test_webhooks_wake_the_daemon_and_bad_signatures_get_401(
    tmp_path: Path, fleet: ConfigRepo, signing: Signing
) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    d = Daemon(
        tmp_path, fleet, signing, triggers={"webhook_secret_file": str(tmp_path / "secret"), "watch": False}
    )
    try:
        assert latest_version(d.store, "web-1") == 1
        move(fleet, 31)
        body = json.dumps({"ref": "refs/heads/main"}).encode()
        good = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        bad = "sha256=" + hmac.new(b"guess", body, hashlib.sha256).hexdigest()
        hook = d.base + "/webhook"
        # The answer says which header to fix, in one line, and tells nothing secret.
        assert answer(hook, body, {"X-GitHub-Event": "push", "X-Hub-Signature-256": bad}) == (
            401,
            "unauthorized: github: X-Hub-Signature-256 does not match the body: signed with another "
            "secret, or the body changed\n",
        )
        assert answer(hook, body, {"X-GitHub-Event": "push"}) == (
            401,
            "unauthorized: github: missing X-Hub-Signature-256 header "
            "(sha256=HMAC of the body with the webhook secret)\n",
        )
        assert metric(d.base, "reconciler_webhook_requests_total", {"result": "unauthorized"}) == 2
        other = json.dumps({"ref": "refs/heads/dev"}).encode()
        sig = "sha256=" + hmac.new(SECRET.encode(), other, hashlib.sha256).hexdigest()
        assert post(hook, other, {"X-GitHub-Event": "push", "X-Hub-Signature-256": sig}) == 200
        assert post(hook, body, {"X-GitHub-Event": "push", "X-Hub-Signature-256": good}) == 202
        wait_for(lambda: latest_version(d.store, "web-1") == 2, 60, "version 2 after the GitHub webhook")
        move(fleet, 32)
        gitlab = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRET}
        assert post(hook, body, gitlab) == 202
        wait_for(lambda: latest_version(d.store, "web-1") == 3, 60, "version 3 after the GitLab webhook")
        assert metric(d.base, "reconciler_webhook_requests_total", {"result": "accepted"}) == 2
        assert metric(d.base, "reconciler_webhook_requests_total", {"result": "ignored"}) == 1
        assert metric(d.base, "reconciler_wakeups_total", {"trigger": "webhook"}) >= 2
    finally:
        d.stop()
    assert "event=webhook_refused" in d.log.read_text()


def wakeups(d: Daemon) -> dict[str, float]:
    """What woke the daemon's loop so far, by trigger (a burst counts once, under its
    first trigger)."""
    return {t: metric(d.base, "reconciler_wakeups_total", {"trigger": t}) for t in ("webhook", "filesystem")}


def test_webhooks_that_are_refused_or_ignored_wake_nothing(
    tmp_path: Path, fleet: ConfigRepo, signing: Signing
) -> None:
    """A refused or ignored webhook must not wake the loop. Whether it did is read
    from the next wake-up, not from a pause: a commit (a filesystem trigger) comes
    after the webhooks, and a wake-up is counted under its first trigger, so any
    webhook that woke the loop shows in the webhook count, early or late."""
    (tmp_path / "secret").write_text(SECRET + "\n")
    d = Daemon(
        tmp_path, fleet, signing, triggers={"webhook_secret_file": str(tmp_path / "secret"), "watch": True}
    )
    try:
        hook = d.base + "/webhook"
        body = json.dumps({"ref": "refs/heads/main"}).encode()
        bad = "sha256=" + hmac.new(b"guess", body, hashlib.sha256).hexdigest()
        assert post(hook, body, {"X-GitHub-Event": "push", "X-Hub-Signature-256": bad}) == 401
        assert post(hook, body, {"X-GitHub-Event": "push"}) == 401
        assert post(hook, body, {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "guess"}) == 401
        other = json.dumps({"ref": "refs/heads/dev"}).encode()
        sig = "sha256=" + hmac.new(SECRET.encode(), other, hashlib.sha256).hexdigest()
        assert post(hook, other, {"X-GitHub-Event": "push", "X-Hub-Signature-256": sig}) == 200
        move(fleet, 33)
        wait_for(lambda: latest_version(d.store, "web-1") == 2, 60, "version 2 after the commit")
        woken = wakeups(d)
        assert woken["webhook"] == 0 and woken["filesystem"] >= 1, woken
        assert metric(d.base, "reconciler_webhook_requests_total", {"result": "unauthorized"}) == 3
        assert metric(d.base, "reconciler_webhook_requests_total", {"result": "ignored"}) == 1
    finally:
        d.stop()


def test_commits_to_a_local_repository_are_noticed_without_polling(
    tmp_path: Path, fleet: ConfigRepo, signing: Signing
) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    d = Daemon(tmp_path, fleet, signing, triggers={"webhook_secret_file": str(tmp_path / "secret")})
    try:
        move(fleet, 41)
        wait_for(lambda: latest_version(d.store, "web-1") == 2, 60, "version 2 after a commit")
        woken = metric(d.base, "reconciler_wakeups_total", {"trigger": "filesystem"})
        assert woken >= 1
        assert metric(d.base, "reconciler_wakeups_total", {"trigger": "poll"}) == 0
        # The daemon's own reads of the repository (its fetch) must not wake it again.
        # Had that pass's fetch woken it, the wake-up would be queued already and
        # counted as "filesystem" before or together with this webhook's (a burst
        # counts under its first trigger), so the webhook's wake-up is the barrier.
        body = json.dumps({"ref": "refs/heads/main"}).encode()
        sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert post(d.base + "/webhook", body, {"X-GitHub-Event": "push", "X-Hub-Signature-256": sig}) == 202

        def woken_by_the_webhook() -> bool:
            now = wakeups(d)
            if now["filesystem"] != woken:
                raise AssertionError(f"the daemon's own fetch woke it: {now}")
            return now["webhook"] == 1

        wait_for(woken_by_the_webhook, 60, "the webhook to wake the daemon")
    finally:
        d.stop()


def gpg_key(home: Path, name: str) -> tuple[str, Path]:
    fpr = make_signing_key(home, name=name)
    pub = home / "public.asc"
    pub.write_bytes(
        subprocess.run(
            ["gpg", "--homedir", str(home), "--armor", "--export", fpr], capture_output=True
        ).stdout
    )
    return fpr, pub


def signed_commit(repo: ConfigRepo, home: Path | None, fpr: str | None, message: str) -> str:
    repo.repo.git.add("-A")
    args = ["-m", message]
    env = dict(os.environ)
    if home is not None and fpr is not None:
        args = ["-S" + fpr, *args]
        env["GNUPGHOME"] = str(home)
    subprocess.run(["git", "-C", str(repo.path), "commit", "-q", *args], check=True, env=env)
    return repo.head


def test_only_commits_signed_by_a_trusted_key_are_built(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    dev_home, other_home = tmp_path / "dev-gnupg", tmp_path / "other-gnupg"
    dev, dev_pub = gpg_key(dev_home, "Developer")
    other, other_pub = gpg_key(other_home, "Stranger")
    standard_fleet(config_repo)  # the first commit is unsigned
    trusted = {"verify_commits": {"keys": [str(dev_pub), str(other_pub)], "fingerprints": [dev]}}
    cfg = write_config(tmp_path, config_repo, signing, repo={"url": str(config_repo.path), **trusted})
    rec = open_reconciler(load_config(cfg))
    try:
        for octet, home, fpr, why, label in (
            (50, None, None, "not signed", "unsigned"),
            (51, other_home, other, f"signed by {other}, which is not a trusted key", "untrusted-key"),
        ):
            relocate(config_repo, octet)
            commit = signed_commit(config_repo, home, fpr, "try")
            with pytest.raises(Exception, match=f"commit {commit} is not built: {why}"):
                rec.reconcile()
            assert (
                rec.metrics.registry.get_sample_value("reconciler_untrusted_commits_total", {"reason": label})
                == 1
            )
            assert not (tmp_path / "store" / "hosts").exists()
            status = cli("status", "-c", str(cfg))
            assert f"source: commit {commit} is not built: {why}" in status.stdout
        relocate(config_repo, 52)
        good = signed_commit(config_repo, dev_home, dev, "signed by the developer")
        result = rec.reconcile()
        assert result.ok and result.plan.commit == good
        assert latest_version(tmp_path / "store", "web-1") == 1
        status = cli("status", "-c", str(cfg))
        assert "source:" not in status.stdout
    finally:
        rec.close()
        for home in (dev_home, other_home):
            stop_gpg_agent(home)


class GitHttp:
    """git's own smart-HTTP server (git http-backend) behind HTTP basic auth."""

    def __init__(self, root: Path, user: str, password: str) -> None:
        self.root = root
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

        def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("HTTP_AUTHORIZATION") != expected:
                start("401 Unauthorized", [("WWW-Authenticate", 'Basic realm="git"')])
                return [b"who are you?\n"]
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            env = {
                "PATH": os.environ["PATH"],
                "GIT_PROJECT_ROOT": str(root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REMOTE_USER": user,
                **{k: str(environ.get(k, "")) for k in ("PATH_INFO", "QUERY_STRING", "REQUEST_METHOD")},
                "CONTENT_TYPE": str(environ.get("CONTENT_TYPE", "")),
                "CONTENT_LENGTH": str(len(body)),
            }
            if environ.get("HTTP_GIT_PROTOCOL"):
                env["GIT_PROTOCOL"] = str(environ["HTTP_GIT_PROTOCOL"])
            out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            headers = [tuple(h.split(": ", 1)) for h in head.decode().split("\r\n") if ": " in h]
            status = next((v for k, v in headers if k.lower() == "status"), "200 OK")
            start(status, [(k, v) for k, v in headers if k.lower() != "status"])
            return [payload]

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def git_http(tmp_path: Path, fleet: ConfigRepo) -> Iterator[GitHttp]:
    bare = tmp_path / "served" / "fleet.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(fleet.path), str(bare)], check=True)
    server = GitHttp(tmp_path / "served", "deploy", "t0ken")
    yield server
    server.stop()


def test_https_style_remote_with_credentials_from_a_file_and_shallow_fetches(
    tmp_path: Path, git_http: GitHttp, fleet: ConfigRepo, signing: Signing
) -> None:
    url = f"{git_http.url}/fleet.git"
    creds = tmp_path / "git-credentials"
    creds.write_text(f"http://deploy:t0ken@127.0.0.1:{git_http.server.server_port}\n")
    creds.chmod(0o600)
    repo = {"url": url, "credentials_file": str(creds), "depth": 1}
    rec = open_reconciler(load_config(write_config(tmp_path, fleet, signing, repo=repo)))
    try:
        result = rec.reconcile()
        assert result.ok and result.plan.commit == fleet.head
        shallow = subprocess.run(
            ["git", "-C", str(tmp_path / "state/checkout"), "rev-parse", "--is-shallow-repository"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert shallow == "true"
        # A new commit pushed to the served repository is fetched, still shallow.
        head = move(fleet, 61)
        subprocess.run(
            ["git", "-C", str(fleet.path), "push", "-q", str(tmp_path / "served/fleet.git"), "main"]
        )
        second = rec.reconcile()
        assert second.plan.commit == head and [(o.host, o.version) for o in second.outcomes] == [("web-1", 2)]
    finally:
        rec.close()


def test_wrong_credentials_fail_clearly_without_prompting(
    tmp_path: Path, git_http: GitHttp, fleet: ConfigRepo, signing: Signing
) -> None:
    creds = tmp_path / "git-credentials"
    creds.write_text(f"http://deploy:wrong@127.0.0.1:{git_http.server.server_port}\n")
    repo = {"url": f"{git_http.url}/fleet.git", "credentials_file": str(creds)}
    cfg = write_config(tmp_path, fleet, signing, repo=repo)
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith(f"reconciler: error: cannot clone {git_http.url}/fleet.git:"), err
    assert "Authentication failed" in err or "401" in err, err
    assert "Traceback" not in res.stderr


class Sshd:
    """A real OpenSSH server on 127.0.0.1 accepting one client key."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        for name in ("host", "client", "other-host"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True
            )
        (root / "authorized_keys").write_text((root / "client.pub").read_text())
        self.port = free_port()
        settings = [
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {root / 'host'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "UsePAM no",
            f"PidFile {root / 'sshd.pid'}",
        ]
        (root / "sshd_config").write_text("\n".join(settings) + "\n")
        Path("/run/sshd").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-f", str(root / "sshd_config"), "-E", str(root / "log")]
        )
        self.key = root / "client"
        self.known_hosts = root / "known_hosts"
        host_key = " ".join((root / "host.pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_key}\n")
        self.wrong_known_hosts = root / "wrong_known_hosts"
        other = " ".join((root / "other-host.pub").read_text().split()[:2])
        self.wrong_known_hosts.write_text(f"[127.0.0.1]:{self.port} {other}\n")
        wait_for(self._listening, 10, "sshd to listen")

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def sshd(tmp_path: Path, fleet: ConfigRepo) -> Iterator[Sshd]:
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("openssh-server is not installed (scripts/setup installs it)")
    server = Sshd(tmp_path / "ssh")
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(fleet.path), str(tmp_path / "ssh/fleet.git")], check=True
    )
    yield server
    server.stop()


def test_ssh_remote_with_a_key_and_strict_host_keys(
    tmp_path: Path, sshd: Sshd, fleet: ConfigRepo, signing: Signing
) -> None:
    url = f"ssh://root@127.0.0.1:{sshd.port}{tmp_path / 'ssh/fleet.git'}"
    repo = {"url": url, "ssh_key": str(sshd.key), "known_hosts": str(sshd.known_hosts)}
    rec = open_reconciler(load_config(write_config(tmp_path / "good", fleet, signing, repo=repo)))
    try:
        result = rec.reconcile()
        assert result.ok and result.plan.commit == fleet.head
    finally:
        rec.close()
    # A server whose host key is not the pinned one is refused.
    repo["known_hosts"] = str(sshd.wrong_known_hosts)
    cfg = write_config(tmp_path / "bad", fleet, signing, repo=repo)
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"reconciler: error: cannot clone {url}:"), last
    assert "Could not read from remote repository" in last or "Host key verification failed" in last, last

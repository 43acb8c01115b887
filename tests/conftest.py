"""Shared fixtures: a throwaway gpg key, config repositories in git, configs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import git
import pytest
import yaml
from hypothesis import settings
from prometheus_client.parser import text_string_to_metric_families

from reconciler import log
from reconciler.config import load_config
from reconciler.core.release import Artifact, Release, parse_release
from reconciler.demo import KeyType, make_signing_key
from reconciler.wiring import open_reconciler

# Property tests check properties, not speed: no per-example deadline, which a loaded
# CI machine (or the first call into python-tuf) would trip now and then.
settings.register_profile("reconciler", deadline=None)
settings.load_profile("reconciler")

# The staged toolchain is content-addressed and restaged when its sources change,
# so test runs share one copy instead of compiling the runtime per test.
TOOLCHAIN_DIR = Path(os.environ.get("RECONCILER_TEST_CACHE", Path.home() / ".cache" / "reconciler-tests")) / (
    "toolchain"
)

WEB = """\
name: {name}
include: [base]
network:
  address: {address}
services:
  web:
    package: site
    exec: [bin/busybox, httpd, -f, -p, "{port}", -h, srv/www]
"""

BASE = """\
network:
  gateway: 10.42.0.1
files:
  etc/motd: "managed\\n"
"""

# A site whose page says ``page``: a new page is a new build, where a test wants a
# new version.
PAGE_SITE = """\
{{ toolchain }}:
derivation {{
  name = "site";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "${{toolchain.busybox}} mkdir -p $out/srv/www &&
    echo {page} > $out/srv/www/index.html" ];
}}
"""

SITE = """\
{ toolchain }:
derivation {
  name = "site";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" ''
    ${toolchain.busybox} mkdir -p $out/srv/www
    echo '<h1>fleet</h1>' > $out/srv/www/index.html
  '' ];
}
"""


@dataclass
class Signing:
    gnupghome: Path
    fingerprint: str
    public_key: Path


def make_signing(home: Path, key_type: KeyType, name: str = "Reconciler Test") -> Signing:
    fpr = make_signing_key(home, name=name, key_type=key_type)
    pub = home / "publisher.asc"
    pub.write_bytes(
        subprocess.run(
            ["gpg", "--homedir", str(home), "--armor", "--export", fpr], check=True, capture_output=True
        ).stdout
    )
    return Signing(home, fpr, pub)


@contextlib.contextmanager
def signing_keys(
    tmp_path_factory: pytest.TempPathFactory, label: str, names: Iterable[str]
) -> Iterator[dict[str, Signing]]:
    """An RSA key a name (its uid ``label name``), each in a keyring of its own: a module
    fixture's keys; the gpg agents they start are killed on leaving."""
    made = {
        name: make_signing(tmp_path_factory.mktemp(f"gnupg-{name}"), KeyType.RSA, f"{label} {name}")
        for name in names
    }
    try:
        yield made
    finally:
        for k in made.values():
            stop_gpg_agent(k.gnupghome)


@pytest.fixture(scope="session")
def signing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signing]:
    # Ed25519: a first pass signs some 260 TUF metadata files, each about twice as fast
    # as with RSA 3072. The demo's RSA key is used where its type matters
    # (test_discovery, test_commands, test_packaging).
    keys = make_signing(tmp_path_factory.mktemp("gnupg"), KeyType.ED25519)
    yield keys
    # gpg started an agent for this keyring; it must not outlive the test run.
    stop_gpg_agent(keys.gnupghome)


@pytest.fixture(scope="session")
def rsa_signing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signing]:
    """The publisher's key as `reconciler init` makes it: RSA 3072, which rkt verifies."""
    keys = make_signing(tmp_path_factory.mktemp("gnupg-rsa"), KeyType.RSA)
    yield keys
    stop_gpg_agent(keys.gnupghome)


class ConfigRepo:
    """A config repository on local disk that tests edit and commit to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.repo = git.Repo.init(path, initial_branch="main")
        with self.repo.config_writer() as cw:
            cw.set_value("user", "name", "Test")
            cw.set_value("user", "email", "test@example.invalid")

    def write(self, rel: str, text: str) -> None:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def remove(self, rel: str) -> None:
        (self.path / rel).unlink()

    def commit(self, message: str = "change") -> str:
        self.repo.git.add("-A")
        return str(self.repo.index.commit(message).hexsha)

    @property
    def head(self) -> str:
        return str(self.repo.head.commit.hexsha)


def standard_fleet(repo: ConfigRepo) -> str:
    """Three hosts sharing profile `base`, two of them using package `site`."""
    repo.write("profiles/base.yaml", BASE)
    repo.write("packages/site.nix", SITE)
    repo.write("hosts/web-1.yaml", WEB.format(name="web-1", address="10.42.0.11/24", port=18081))
    repo.write("hosts/web-2.yaml", WEB.format(name="web-2", address="10.42.0.12/24", port=18082))
    repo.write(
        "hosts/worker-1.yaml",
        "name: worker-1\ninclude: [base]\nformats: [aci]\nservices:\n"
        "  tick: {exec: [bin/busybox, sh, -c, 'while true; do echo tick; sleep 5; done']}\n",
    )
    return repo.commit("fleet")


@pytest.fixture
def config_repo(tmp_path: Path) -> ConfigRepo:
    return ConfigRepo(tmp_path / "repo")


def cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`reconciler ARGS...` as an operator runs it: its own process, no terminal to prompt on.
    ``env`` adds to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def recorded_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[tuple[Any, ...]]:
    """Make ``owner.name`` record each call's arguments, in order, and call through."""
    calls: list[tuple[Any, ...]] = []
    real = getattr(owner, name)

    def recording(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(owner, name, recording)
    return calls


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to reap it, or one dead, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


@contextlib.contextmanager
def reconciler_run(
    cfg: Path, log: Path, stop: float = 60, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m reconciler run -c cfg`, its stdout and stderr in ``log``. On leaving while
    it runs: SIGTERM, and a kill where it has not stopped within ``stop`` seconds."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run", "-c", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(stop)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def fetch(url: str) -> str | None:
    """The body of a GET, None where nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return str(r.read().decode())
    except OSError:
        return None


def is_ready(base: str) -> bool:
    """Whether the daemon listening at ``base`` answers /readyz with 200."""
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=2) as r:
            return int(r.status) == 200
    except OSError:
        return False


def metric_value(base: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """The sample ``name`` with exactly ``labels`` on ``base``/metrics; None where it has none."""
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == (labels or {}):
                return float(s.value)
    return None


def answer(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    """The status and body of a POST."""
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def latest_version(store: Path, host: str) -> int:
    """The version ``host``'s latest.json names in a filesystem store; 0 before any."""
    latest = store / "hosts" / host / "latest.json"
    return int(json.loads(latest.read_text())["version"]) if latest.exists() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, source: ConfigRepo, keys: Signing, /, **extra: object) -> Path:
    """A reconciler.yaml for ``repo``; ``extra`` replaces top-level keys."""
    cfg: dict[str, object] = {
        "repo": {"url": str(source.path), "branch": "main"},
        "store": {"type": "filesystem", "path": str(tmp_path / "store")},
        "state_dir": str(tmp_path / "state"),
        "signing": {"gnupghome": str(keys.gnupghome), "key": keys.fingerprint},
        "nix": {"toolchain_dir": str(TOOLCHAIN_DIR)},
        "listen": f"127.0.0.1:{free_port()}",
        "poll_interval": 1,
        "jobs": 2,
    }
    cfg.update(extra)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "reconciler.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class ReconciledFleet:
    """The standard fleet and ``files`` committed to a config repo under ``root``, and
    reconciled once into ``root``/store; ``config`` replaces top-level config keys."""

    def __init__(
        self,
        root: Path,
        signing: Signing,
        port: int,
        message: str,
        files: Mapping[str, str],
        **config: object,
    ) -> None:
        self.root, self.port, self.signing = root, port, signing
        self.repo = ConfigRepo(root / "repo")
        standard_fleet(self.repo)
        for path, text in files.items():
            self.repo.write(path, text)
        self.repo.commit(message)
        self.config = load_config(write_config(root, self.repo, signing, **config))
        rec = open_reconciler(self.config)
        try:
            result = rec.reconcile()
        finally:
            rec.close()
        assert result.ok, result.outcomes
        self.store = root / "store"

    def release(self, host: str) -> Release:
        path = self.store / "hosts" / host / "latest.json"
        return parse_release(path.read_bytes(), str(path))

    def art(self, host: str, fmt: str) -> Artifact:
        art = self.release(host).artifact(fmt)
        assert art is not None, f"{host} has no {fmt}"
        return art

    def blob(self, host: str, fmt: str) -> Path:
        return self.store / self.art(host, fmt).blob


def stop_gpg_agent(home: Path) -> None:
    """Stop the agent gpg started for the keyring in ``home``, if it did."""
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)


def gpg_verify(public_key: Path, data: Path, signature: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """Plain `gpg --verify` in a fresh keyring holding only ``public_key``."""
    home.mkdir(mode=0o700, exist_ok=True)
    try:
        gpg = ["gpg", "--homedir", str(home)]
        subprocess.run([*gpg, "-q", "--import", str(public_key)], check=True, capture_output=True)
        return subprocess.run([*gpg, "--verify", str(signature), str(data)], capture_output=True, text=True)
    finally:
        # The import starts an agent in ``home``, which callers make for this alone.
        stop_gpg_agent(home)


@contextlib.contextmanager
def reconciler_log() -> Iterator[io.StringIO]:
    """What the reconciler logs (at INFO, a line an event) while the block runs."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(log.KeyValueFormatter())
    logger = logging.getLogger("reconciler")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
def events() -> Iterator[io.StringIO]:
    """The log lines of the agent or daemon a test runs in-process."""
    with reconciler_log() as out:
        yield out


@pytest.fixture
def gpg_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "verify-gnupg"
    yield home
    stop_gpg_agent(home)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def no_ambient_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials come from the tests only; never the machine's AWS setup or an instance
    metadata service."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


def tar_member(tar: tarfile.TarFile, name: str) -> bytes:
    """The bytes of the regular file ``name`` in ``tar``."""
    member = tar.extractfile(name)
    assert member is not None, f"{name} is not a regular file"
    return member.read()


def aci_file(store: Path, host: str, name: str, version: int | None = None) -> bytes | None:
    """A file of ``host``'s published ACI (its latest, or release ``version``), or None
    if the image has none."""
    meta = store / "hosts" / host / ("latest.json" if version is None else f"releases/{version}.json")
    (aci,) = [a for a in json.loads(meta.read_text())["artifacts"] if a["format"] == "aci"]
    with tarfile.open(store / aci["blob"]) as tar:
        try:
            member = tar.extractfile(f"rootfs/{name}")
        except KeyError:
            return None
        return member.read() if member is not None else None

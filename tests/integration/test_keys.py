"""`reconciler keys` as an operator runs it: real gpg keyrings, a filesystem store, no
Nix. Every root it publishes is checked with python-tuf (each signed by a threshold of
the previous root's keys and of its own), and the whole store is read by python-tuf's
client (ngclient) as an agent reads it."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import FetcherInterface, Updater

from reconciler.demo import make_signing_key
from tests.conftest import ConfigRepo, Signing, cli, stop_gpg_agent, write_config

pytestmark = pytest.mark.integration


@dataclass
class Keyring:
    home: Path
    fingerprint: str
    public_key: Path

    @property
    def keyid(self) -> str:
        return self.fingerprint.lower()


def keyring(home: Path, name: str) -> Keyring:
    fpr = make_signing_key(home, name=name)
    pub = home.parent / f"{home.name}.asc"
    pub.write_bytes(
        subprocess.run(
            ["gpg", "--homedir", str(home), "--armor", "--export", fpr], check=True, capture_output=True
        ).stdout
    )
    return Keyring(home, fpr, pub)


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyring]:
    """A second root key, kept away from the daemon."""
    k = keyring(tmp_path_factory.mktemp("keys") / "offline", "Offline Root")
    yield k
    stop_gpg_agent(k.home)


@pytest.fixture(scope="module")
def bins_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyring]:
    k = keyring(tmp_path_factory.mktemp("keys") / "bins", "Second Online")
    yield k
    stop_gpg_agent(k.home)


@dataclass
class Setup:
    config: Path
    store: Path
    signing: Signing

    def keys(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli("keys", *args, "-c", str(self.config), timeout=120)

    def roots(self) -> list[int]:
        return sorted(int(p.name.split(".")[0]) for p in (self.store / "tuf").glob("*.root.json"))

    def root(self, version: int) -> Metadata[Root]:
        return Metadata.from_bytes((self.store / "tuf" / f"{version}.root.json").read_bytes())


@pytest.fixture
def setup(tmp_path: Path, config_repo: ConfigRepo, signing: Signing) -> Setup:
    config = write_config(tmp_path, config_repo, signing, tuf={"bins": 4})
    return Setup(config, tmp_path / "store", signing)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error ``result`` printed: one line, no traceback, a non-zero exit."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    assert not result.stdout
    return errors[0]


def listing(stdout: str) -> dict[str, tuple[int, list[str]]]:
    """`keys list`: role -> (threshold, keyids)."""
    roles = {}
    for line in stdout.splitlines():
        m = re.fullmatch(r"(\w+): (\d+) of (\d+): (.*)", line)
        if m:
            keyids = m[4].split(", ")
            assert len(keyids) == int(m[3])
            roles[m[1]] = (int(m[2]), keyids)
    return roles


def verify_root_chain(setup: Setup) -> None:
    versions = setup.roots()
    assert versions == list(range(1, len(versions) + 1)), "consecutive root versions"
    prev = setup.root(1)
    prev.verify_delegate("root", prev)
    for v in versions[1:]:
        new = setup.root(v)
        assert new.signed.version == v
        prev.verify_delegate("root", new)
        new.verify_delegate("root", new)
        prev = new


class StoreFetcher(FetcherInterface):
    def __init__(self, store: Path) -> None:
        self.store = store

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self.store / url.removeprefix("file-store:///")
        if not path.is_file():
            raise DownloadHTTPError(f"{path} not found", 404)
        return iter([path.read_bytes()])


class Agent:
    """python-tuf's client over the store, trusting its first root and keeping what it
    trusts between refreshes."""

    def __init__(self, setup: Setup, home: Path) -> None:
        self.setup = setup
        self.home = home
        home.mkdir()
        (home / "root.json").write_bytes((setup.store / "tuf" / "1.root.json").read_bytes())

    def refresh(self) -> int:
        """The root version the client trusts after a refresh."""
        Updater(
            str(self.home), "file-store:///tuf/", fetcher=StoreFetcher(self.setup.store), bootstrap=None
        ).refresh()
        root: Metadata[Any] = Metadata.from_bytes((self.home / "root.json").read_bytes())
        return int(root.signed.version)


def test_keys_add_a_root_key_raise_the_threshold_and_revoke_it(
    setup: Setup, offline: Keyring, bins_key: Keyring, tmp_path: Path
) -> None:
    daemon = setup.signing.fingerprint.lower()
    roles = listing(ok(setup.keys("list")))
    assert roles == {r: (1, [daemon]) for r in ("root", "targets", "snapshot", "timestamp", "bins")}
    assert setup.roots() == [1]
    agent = Agent(setup, tmp_path / "agent")
    assert agent.refresh() == 1

    both = ("--gnupghome", str(offline.home), "--gnupghome", str(setup.signing.gnupghome))
    assert ok(setup.keys("add", "root", offline.fingerprint, *both)).strip() == "root version 2 published"
    assert ok(setup.keys("threshold", "root", "2", *both)).strip() == "root version 3 published"
    assert len(setup.root(3).signatures) == 2
    assert listing(ok(setup.keys("list")))["root"] == (2, [daemon, offline.keyid])
    assert agent.refresh() == 3

    # One key cannot meet the threshold of two: refused, naming the keys it needs.
    error = one_line_error(setup.keys("threshold", "root", "1", "--gnupghome", str(setup.signing.gnupghome)))
    assert "needs 2 signature(s)" in error and daemon in error and offline.keyid in error
    assert setup.roots() == [1, 2, 3]

    error = one_line_error(setup.keys("revoke", "root", offline.fingerprint))
    assert "lower the threshold" in error
    assert ok(setup.keys("threshold", "root", "1", *both)).strip() == "root version 4 published"
    # Revoking a key needs a threshold of the old root: the daemon's key alone is 1 of 2.
    assert ok(setup.keys("revoke", "root", offline.fingerprint)).strip() == "root version 5 published"
    assert listing(ok(setup.keys("list")))["root"] == (1, [daemon])

    assert ok(setup.keys("add", "bins", str(bins_key.public_key))).strip() == "targets version 2 published"
    assert listing(ok(setup.keys("list")))["bins"] == (1, [daemon, bins_key.keyid])
    assert setup.roots() == [1, 2, 3, 4, 5]
    verify_root_chain(setup)
    assert agent.refresh() == 5
    assert Agent(setup, tmp_path / "new-agent").refresh() == 5


def test_keys_refuses_bad_roles_keys_and_thresholds_in_one_line(setup: Setup, offline: Keyring) -> None:
    ok(setup.keys("list"))
    fpr = setup.signing.fingerprint
    refusals = {
        ("add",): "needs a ROLE",
        ("add", "root"): "needs a ROLE and a KEY",
        ("revoke", "root"): "needs a ROLE and a KEYID",
        ("threshold", "root"): "needs a ROLE and a K",
        ("threshold", "root", "two"): "'two' is not a number",
        ("threshold", "root", "0"): "must be 1 to 1",
        ("threshold", "bins", "2"): "must be 1 to 1",
        ("add", "root", fpr): "already a root key",
        ("add", "root", offline.fingerprint): "is neither a public key file nor a key in",
        ("add", "root", "0000"): "is neither a public key file nor a key in",
        ("add", "root", str(setup.config)): f"{setup.config}: no usable public key",
        ("revoke", "root", "deadbeef"): "deadbeef is not a root key",
        ("revoke", "timestamp", fpr): "add a key first",
        ("add", "root", offline.fingerprint, "--gnupghome", str(setup.store / "nowhere")): "nowhere",
    }
    for args, message in refusals.items():
        error = one_line_error(setup.keys(*args))
        assert error.startswith("reconciler: error: "), (args, error)
        assert message in error, (args, error)
    result = setup.keys("add", "nosuchrole", fpr)
    assert result.returncode == 2 and "invalid choice: 'nosuchrole'" in result.stderr
    assert "Traceback" not in result.stderr
    assert setup.roots() == [1], "nothing was published"
    verify_root_chain(setup)

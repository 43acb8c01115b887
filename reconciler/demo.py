"""`reconciler init DIR`: a self-contained demo setup.

DIR/repo is a git repository with three hosts sharing a profile and a package,
DIR/gnupg holds a fresh signing key without passphrase, and DIR/reconciler.yaml
points the daemon at them with a filesystem store in DIR/store.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

import git
import gnupg

from reconciler.errors import ReconcilerError, SigningError

PROFILE_BASE = """\
# Shared by every host: network defaults and a message of the day.
network:
  gateway: 10.42.0.1
  dns: [10.42.0.1]
files:
  etc/motd: "managed by reconciler\\n"
"""

WEB_HOST = """\
name: {name}
include: [base]
formats: [aci, appimage]
network:
  address: {address}
services:
  web:
    package: site
    exec: [bin/busybox, httpd, -f, -p, "{port}", -h, srv/www]
    restart: always
    ports:                     # the ACI manifest's app.ports
      - {{name: http, port: {port}, protocol: tcp}}
"""

WORKER_HOST = """\
name: worker-1
include: [base]
network:
  address: 10.42.0.21/24
services:
  ticker:
    package: busybox
    exec: [bin/busybox, sh, -c, "while true; do echo tick; sleep 30; done"]
    restart: always
files:
  etc/worker.conf: "queue=default\\n"
"""

SITE_PACKAGE = """\
# A static site for busybox httpd. Packages take the project's toolchain and
# return a derivation whose output is merged into the image root.
{ toolchain }:
derivation {
  name = "site";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" ''
    ${toolchain.busybox} mkdir -p $out/srv/www
    echo '<h1>hello from the fleet</h1>' > $out/srv/www/index.html
  '' ];
}
"""

CONFIG = """\
# reconciler configuration; relative paths are relative to this file.
repo:
  url: repo
  branch: main
store:
  type: filesystem
  path: store
state_dir: state
signing:
  gnupghome: gnupg
  key: {fingerprint}
listen: 127.0.0.1:9180
poll_interval: 30
jobs: 2
release_lifetime: 30d
images:
  # ACIs are named example.com/fleet/<host>; serve the store at https://example.com/
  # (or set store.public_url) and appc discovery resolves them.
  name_prefix: example.com/fleet
  annotations:
    authors: Reconciler Demo <reconciler@example.invalid>
"""


class KeyType(StrEnum):
    """OpenPGP key algorithms for the publisher's key (README, "Signing keys")."""

    # rkt's OpenPGP library (golang.org/x/crypto/openpgp) refuses EdDSA keys ("public
    # key type: 22"); gpg, python-gnupg and the TUF metadata accept both.
    RSA = "rsa"
    ED25519 = "ed25519"


def make_signing_key(gnupghome: Path, name: str = "Reconciler Demo", key_type: KeyType = KeyType.RSA) -> str:
    """Create a signing key without passphrase (RSA 3072 by default, which every
    verifier of ACIs accepts); return its fingerprint."""
    gnupghome.mkdir(parents=True, exist_ok=True)
    os.chmod(gnupghome, 0o700)
    gpg = gnupg.GPG(gnupghome=str(gnupghome))
    algorithm: dict[str, str | int] = (
        {"key_type": "RSA", "key_length": 3072}
        if key_type is KeyType.RSA
        else {"key_type": "EDDSA", "key_curve": "ed25519"}
    )
    params = gpg.gen_key_input(
        **algorithm,
        key_usage="sign",
        name_real=name,
        name_email="reconciler@example.invalid",
        expire_date="0",
        no_protection=True,
    )
    key = gpg.gen_key(params)
    if not key.fingerprint:
        raise SigningError(f"gpg could not create a key in {gnupghome}: {key.status or key.stderr}")
    return str(key.fingerprint)


def write_repo(repo_dir: Path) -> str:
    """Create the demo config repository; return the commit id."""
    files = {
        "profiles/base.yaml": PROFILE_BASE,
        "hosts/web-1.yaml": WEB_HOST.format(name="web-1", address="10.42.0.11/24", port=8081),
        "hosts/web-2.yaml": WEB_HOST.format(name="web-2", address="10.42.0.12/24", port=8082),
        "hosts/worker-1.yaml": WORKER_HOST,
        "packages/site.nix": SITE_PACKAGE,
    }
    repo = git.Repo.init(repo_dir, initial_branch="main")
    for rel, text in files.items():
        p = repo_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    repo.index.add(list(files))
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Reconciler Demo")
        cw.set_value("user", "email", "reconciler@example.invalid")
    return str(repo.index.commit("Demo fleet: two web hosts and a worker").hexsha)


def init(target: Path) -> Path:
    """Create the demo in ``target``; return the config file path."""
    try:
        if target.exists() and any(target.iterdir()):
            raise ReconcilerError(f"{target} is not empty; init only writes into a new directory")
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReconcilerError(f"cannot create {target}: {exc.strerror or exc}") from None
    write_repo(target / "repo")
    fingerprint = make_signing_key(target / "gnupg")
    cfg = target / "reconciler.yaml"
    cfg.write_text(CONFIG.format(fingerprint=fingerprint))
    return cfg

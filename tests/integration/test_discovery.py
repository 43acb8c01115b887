"""appc discovery against a published store: a name resolved the way appc's
spec/discovery.md (and rkt, through appc/spec's discovery package) resolves it, over
HTTP from the store directory, the ACI and its signature fetched by the rendered
templates and checked with plain `gpg --verify` and actool; garbage collection takes
the copies of the releases it collects.

The client below is the test's own, written from the spec: it stands in for rkt,
which no longer exists as a maintained package. The one liberty: the name's domain
(example.com) resolves to the test's server on 127.0.0.1, and over http (rkt's
--insecure-options=http and its discovery port settings do the same)."""

from __future__ import annotations

import functools
import hashlib
import html.parser
import http.server
import json
import os
import re
import subprocess
import tarfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from reconciler.config import load_config
from reconciler.core.release import parse_release
from reconciler.wiring import open_reconciler
from tests.conftest import WEB, ConfigRepo, Signing, gpg_verify, standard_fleet, tar_member, write_config

pytestmark = pytest.mark.integration

PREFIX = "example.com/fleet"
LABELS = {"os": "linux", "arch": "amd64"}
TEMPLATE_VAR = re.compile(r"{[^{}]*}")


# -- a discovery client, after appc spec/discovery.md --------------------------------------------


class _Meta(html.parser.HTMLParser):
    """Every <meta name="ac-..." content="PREFIX URL"> of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "meta":
            return
        a = dict(attrs)
        name, content = a.get("name") or "", (a.get("content") or "").strip()
        prefix, _, url = content.partition(" ")
        if name.startswith("ac-") and prefix and url.strip():
            self.tags.append((name, prefix, url.strip()))


@dataclass(frozen=True)
class Endpoints:
    page: str  # the discovery URL that answered
    aci: str
    asc: str
    keys: tuple[str, ...]


class NotFoundError(Exception):
    pass


def _render(template: str, values: Mapping[str, str]) -> tuple[str, int] | None:
    """``template`` with ``values`` put in, and how many labels it used; None when a
    variable other than {ext} is left (the spec's "all labels can be substituted")."""
    used = 0
    for key, value in values.items():
        if "{" + key + "}" in template:
            template = template.replace("{" + key + "}", value)
            used += key != "name"
    if {m for m in TEMPLATE_VAR.findall(template)} - {"{ext}"}:
        return None
    return template, used


def discover(name: str, labels: Mapping[str, str], resolve: Mapping[str, str]) -> Endpoints:
    """Resolve ``name`` with ``labels``: ``https://{name}?ac-discovery=1``, then each
    parent path on a 4xx or a page without ac-discovery tags (redirects followed);
    among the templates whose prefix the name starts with and whose variables can all
    be filled, the ones filling the most labels (ties: the longest prefix, as Go's
    remote import paths, which appc discovery is modelled on)."""
    parts = name.split("/")
    for end in range(len(parts), 0, -1):
        path = "/".join(parts[:end])
        domain, _, rest = path.partition("/")
        url = f"http://{resolve.get(domain, domain)}/{rest}?ac-discovery=1"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                page = r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500:
                continue
            raise
        meta = _Meta()
        meta.feed(page)
        rendered = []
        for tag, prefix, template in meta.tags:
            if tag == "ac-discovery" and name.startswith(prefix):
                r_ = _render(template, {"name": name, **labels})
                if r_ is not None:
                    rendered.append((r_[1], len(prefix), r_[0]))
        if not rendered:
            continue
        best = max(rendered)[:2]
        (template,) = {t for u, p, t in rendered if (u, p) == best}
        keys = tuple(
            u for tag, prefix, u in meta.tags if tag == "ac-discovery-pubkeys" and name.startswith(prefix)
        )
        return Endpoints(url, template.replace("{ext}", "aci"), template.replace("{ext}", "aci.asc"), keys)
    raise NotFoundError(name)


# -- the store, served --------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served_store(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """The store directory over HTTP on 127.0.0.1, as a static server (nginx) would."""
    store = tmp_path / "store"
    store.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(store))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield store, int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        data: bytes = r.read()
        return data


def reconcile(config: Path) -> None:
    rec = open_reconciler(load_config(config))
    try:
        result = rec.reconcile()
    finally:
        rec.close()
    assert result.ok, result.outcomes


def test_a_published_aci_is_found_fetched_and_verified_by_appc_discovery(
    tmp_path: Path,
    config_repo: ConfigRepo,
    rsa_signing: Signing,
    served_store: tuple[Path, int],
    gpg_home: Path,
) -> None:
    signing = rsa_signing  # the demo's key type, the one rkt verifies
    store, port = served_store
    standard_fleet(config_repo)
    images = {"name_prefix": PREFIX}
    config = write_config(tmp_path, config_repo, signing, images=images, retention={"keep": 1, "interval": 0})
    # Where the store is served: discovery's templates point there.
    cfg = yaml.safe_load(config.read_text())
    cfg["store"]["public_url"] = f"http://127.0.0.1:{port}/"
    config.write_text(yaml.safe_dump(cfg))
    reconcile(config)
    resolve = {"example.com": f"127.0.0.1:{port}"}

    for host in ("web-1", "web-2", "worker-1"):
        release = parse_release((store / f"hosts/{host}/latest.json").read_bytes(), host)
        (art,) = [a for a in release.artifacts if a.format == "aci"]
        name = f"{PREFIX}/{host}"
        labels = {"version": str(release.version), **LABELS}
        ep = discover(name, labels, resolve)
        # /fleet/<host> is not a page: the parent /fleet answered (after the server's
        # redirect to /fleet/, whose index the publisher wrote).
        assert ep.page == f"http://127.0.0.1:{port}/fleet?ac-discovery=1"
        assert ep.aci == f"http://127.0.0.1:{port}/{name}-{release.version}-linux-amd64.aci"
        assert ep.asc == ep.aci + ".asc"
        assert ep.keys == (f"http://127.0.0.1:{port}/keys/publisher.asc",)
        aci, asc = tmp_path / f"{host}.aci", tmp_path / f"{host}.aci.asc"
        aci.write_bytes(fetch(ep.aci))
        asc.write_bytes(fetch(ep.asc))
        key = tmp_path / "pubkeys.asc"
        key.write_bytes(fetch(ep.keys[0]))
        # The release's bytes, signed: plain gpg with only the key discovery named.
        assert hashlib.sha256(aci.read_bytes()).hexdigest() == art.sha256
        check = gpg_verify(key, aci, asc, gpg_home)
        assert check.returncode == 0, check.stderr
        assert "Good signature" in check.stderr
        # An RSA signature (OpenPGP public key algorithm 1), as rkt's library needs.
        packets = subprocess.run(
            ["gpg", "--homedir", str(gpg_home), "--list-packets", str(asc)], capture_output=True, text=True
        ).stdout
        assert re.search(r"^:signature packet: algo 1,", packets, re.M), packets
        # appc: the name and labels discovered with must be the manifest's.
        with tarfile.open(aci) as tar:
            manifest = json.loads(tar_member(tar, "manifest"))
        assert manifest["name"] == name
        assert {lab["name"]: lab["value"] for lab in manifest["labels"]} == labels
        valid = subprocess.run(["actool", "validate", str(aci)], capture_output=True, text=True)
        assert valid.returncode == 0, valid.stdout + valid.stderr
        # In the filesystem store the copy is the blob itself (a hard link).
        assert os.path.samefile(store / art.blob, store / f"{name}-{release.version}-linux-amd64.aci")

    # A template needing a label the client lacks is not used: no version, no ACI.
    with pytest.raises(NotFoundError):
        discover(f"{PREFIX}/web-1", LABELS, resolve)
    # Names outside the prefix find no page with tags (the root is a bare listing).
    for other in ("example.com/other/web-1", "example.com/fleet2/web-1"):
        with pytest.raises(NotFoundError):
            discover(other, {"version": "1", **LABELS}, resolve)

    # Two more releases of web-1; garbage collection (keep 1) takes the copies of
    # releases 1 and 2 with them, and discovery of release 3 still works.
    for address in ("10.42.0.31/24", "10.42.0.32/24"):
        config_repo.write("hosts/web-1.yaml", WEB.format(name="web-1", address=address, port=18081))
        config_repo.commit(f"web-1 at {address}")
        reconcile(config)
    copies = sorted(p.name for p in (store / PREFIX).iterdir() if p.name.startswith("web-1-"))
    assert copies == [f"web-1-{v}-linux-amd64.aci{s}" for v in (1, 2, 3) for s in ("", ".asc")]
    rec = open_reconciler(load_config(config))
    try:
        deleted = rec.collect_garbage(dry_run=False, on_delete=lambda key: None)
    finally:
        rec.close()
    assert {f"{PREFIX}/web-1-{v}-linux-amd64.aci{s}" for v in (1, 2) for s in ("", ".asc")} <= set(deleted)
    copies = sorted(p.name for p in (store / PREFIX).iterdir() if p.name.startswith("web-1-"))
    assert copies == ["web-1-3-linux-amd64.aci", "web-1-3-linux-amd64.aci.asc"]
    latest = parse_release((store / "hosts/web-1/latest.json").read_bytes(), "web-1")
    assert latest.version == 3
    ep = discover(f"{PREFIX}/web-1", {"version": "3", **LABELS}, resolve)
    (art,) = [a for a in latest.artifacts if a.format == "aci"]
    assert hashlib.sha256(fetch(ep.aci)).hexdigest() == art.sha256
    with pytest.raises(urllib.error.HTTPError):
        fetch(discover(f"{PREFIX}/web-1", {"version": "1", **LABELS}, resolve).aci)

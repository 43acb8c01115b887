"""The composition root: configuration in, adapters wired to the daemon out.

The only module that opens adapters for the daemon; the CLI calls it, the daemon's
pass (reconciler.daemon.reconciler) sees only the ports (reconciler.ports).

What only some commands need is imported by the function that opens it, here and
nowhere else: boto3 for an s3 store, python-tuf and securesystemslib (which imports
boto3 too) for what signs or pins TUF metadata, the agent for `reconciler agent`.
Together they cost more than a plan of a thousand hosts (tests/integration/
test_commands.py checks what `reconciler plan` imports).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.adapters.clock import SystemClock
from reconciler.adapters.git import GitSource, Snapshot
from reconciler.adapters.ledger import State
from reconciler.adapters.nix import Nix, builds_through_daemon
from reconciler.adapters.store import FilesystemStore
from reconciler.config import Config, SigningConfig, StoreConfig
from reconciler.daemon.gate import Gate
from reconciler.daemon.observer import Observer
from reconciler.errors import (
    ConfigError,
    FetchError,
    ReconcilerError,
    SigningError,
    StoreError,
    VerificationError,
)
from reconciler.ports import EventLog as EventLogPort
from reconciler.ports import Ledger, NoteSigner, NoteVerifier, Ports, Signer, Source, Store

if TYPE_CHECKING:
    from securesystemslib.signer import Key
    from securesystemslib.signer import Signer as MetadataSigner

    from reconciler.adapters.eventlog import EventLog
    from reconciler.agent.config import AgentConfig
    from reconciler.agent.logcheck import Audit
    from reconciler.agent.updater import Agent
    from reconciler.core.builders import Builder
    from reconciler.core.lease import Holder
    from reconciler.core.tlog import Checkpoint
    from reconciler.daemon.loop import Daemon
    from reconciler.daemon.metrics import Metrics
    from reconciler.daemon.preflight import Check
    from reconciler.daemon.reconciler import OpenLog, OpenTuf, Reconciler
    from reconciler.daemon.tlog import TransparencyLog


def open_store(cfg: StoreConfig) -> Store:
    """The store ``cfg`` describes (reconciler.yaml's ``store`` section)."""
    if cfg.type == "s3":
        from reconciler.adapters.s3 import S3Store, read_credentials

        if not cfg.bucket:
            raise StoreError("an s3 store needs a bucket")
        credentials = read_credentials(cfg.credentials_file) if cfg.credentials_file else None
        return S3Store(cfg.bucket, cfg.prefix, cfg.endpoint, cfg.region, credentials)
    if cfg.type == "filesystem":
        if cfg.path is None:
            raise StoreError("a filesystem store needs a path")
        return FilesystemStore(cfg.path)
    raise StoreError(f"unsupported store type {cfg.type!r}")


def source(cfg: Config) -> GitSource:
    """The daemon's clone of the config repository, in its state directory."""
    return _clone_in(cfg, cfg.state_dir / "checkout")


def open_reconciler(cfg: Config, metrics: Metrics | None = None) -> Reconciler:
    """The daemon's pass with the real adapters: it writes to the store only while it
    holds the store's publisher lease (unless lease.enabled is false)."""
    from reconciler.daemon.lease import FencedStore, PublisherLease
    from reconciler.daemon.metrics import Metrics
    from reconciler.daemon.reconciler import Reconciler

    metrics = metrics or Metrics()
    nix = Nix(
        cfg.state_dir, cfg.nix, builders=cfg.builders, images=cfg.images, reproducibility=cfg.reproducibility
    )
    ports = _ports(cfg, source(cfg), nix)
    lease = None
    if cfg.lease.enabled:
        lease = PublisherLease(ports.store, cfg.lease, holder(cfg), ports.clock)
        ports = replace(ports, store=FencedStore(ports.store, lease))
    # The event log after the ports: a config whose keys or store credentials are
    # refused must not have created the state directory.
    ports = replace(ports, events=_events(cfg, metrics))
    return Reconciler(cfg, ports, metrics, _tuf(cfg, ports), lease, _tlog(cfg, ports))


HOLDER_FILE = "publisher.id"


def holder(cfg: Config, create: bool = True) -> Holder:
    """Who this state directory is in the publisher lease: an id made once and kept in
    ``state_dir/publisher.id`` (so a restart takes its own lease back at once), and a
    name for people. A copied state directory must lose that file. ``create`` false:
    the id is empty when there is none yet (`reconciler status`)."""
    import socket
    import tempfile
    import uuid

    from reconciler.core.lease import Holder

    path = cfg.state_dir / HOLDER_FILE
    name = f"{socket.gethostname()}:{cfg.state_dir}"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror or exc}") from None
    if text or not create:
        return Holder(text, name)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cfg.state_dir, prefix=f".{HOLDER_FILE}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(uuid.uuid4().hex + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            try:
                # Whole or not at all; another process of this state directory may be first.
                os.link(tmp, path)
            except FileExistsError:
                if not path.read_text().strip():  # an empty file a crash left
                    os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot create: {exc.strerror or exc}") from None
    return holder(cfg, create=False)


def lease_status(cfg: Config) -> dict[str, object]:
    """The store's publisher lease as `reconciler status` shows it: its newest record,
    and whether this state directory holds it."""
    from reconciler.core.layout import lease_path
    from reconciler.core.lease import parse_record
    from reconciler.daemon.lease import read_record, terms_in

    if not cfg.lease.enabled:
        return {"enabled": False}
    store = open_store(cfg.store)
    terms = terms_in(store)
    if not terms:
        return {"enabled": True, "term": None}
    try:
        record = read_record(store, terms[-1])
        if record is None:  # gone since listed: as unreadable as an empty record
            record = parse_record(b"", terms[-1], lease_path(terms[-1]))
    except VerificationError as exc:
        return {"enabled": True, "term": terms[-1], "error": str(exc)}
    return {
        "enabled": True,
        "term": record.term,
        "holder": record.name,
        "this_state_dir": record.holder == holder(cfg, create=False).id,
        "renewed": record.renewed.isoformat(),
        "duration": record.duration,
        "released": record.released,
    }


def open_events(cfg: Config, read_only: bool = False) -> EventLog:
    """The event history in the state database: ``read_only`` for what only reads it
    (`reconciler events`); writable for a command that records an event of its own."""
    from reconciler.adapters.eventlog import EventLog

    return EventLog(cfg.state_dir, cfg.events, read_only=read_only)


def _events(cfg: Config, metrics: Metrics) -> EventLogPort:
    """The history a pass records in, which also notifies the configured targets."""
    history = open_events(cfg)
    if not cfg.notifications:
        return history
    from reconciler.daemon.notify import Notifier, NotifyingLog, Target

    try:
        targets = [Target(n, cfg.path, i) for i, n in enumerate(cfg.notifications)]
    except ConfigError:
        history.close()
        raise
    return NotifyingLog(history, Notifier(targets, metrics.registry))


def _tuf(cfg: Config, ports: Ports) -> OpenTuf:
    """How the pass opens the store's TUF repository; a plan is handed none."""
    from reconciler.daemon.tuf import TufRepository

    def open_tuf(online: Callable[[], MetadataSigner]) -> TufRepository:
        return TufRepository(ports.store, cfg.state_dir / "tuf", online, ports.clock, cfg.tuf)

    return open_tuf


def _tlog(cfg: Config, ports: Ports) -> OpenLog:
    """How the pass opens the store's transparency log, signed with the daemon's key."""

    def open_log(signer: Callable[[], Signer]) -> TransparencyLog:
        from reconciler.daemon.tlog import TransparencyLog

        return TransparencyLog(
            ports.store,
            lambda: note_signer(signer()),
            lambda: note_verifier([signer().public_key()]),
            cfg.state_dir / "tlog",
            cfg.transparency_log.origin,
            lambda data, signature, what: verify_signed(signer().public_key(), data, signature, what),
        )

    return open_log


def note_signer(signer: Signer) -> NoteSigner:
    """A gpg signer as the signer of log checkpoints."""
    from reconciler.adapters.gpg import Signer as GpgSigner
    from reconciler.adapters.notes import OpenPgpNoteSigner

    if not isinstance(signer, GpgSigner):
        raise SigningError("the transparency log is signed with a gpg key")
    return OpenPgpNoteSigner(signer)


def verify_signed(public_key: bytes, data: bytes, signature: bytes, what: str) -> None:
    """Check that ``signature`` is a good signature of ``data`` by the armored
    ``public_key`` (VerificationError else)."""
    from reconciler.adapters.gpg import Verifier

    with Verifier([public_key]) as v:
        v.verify_bytes(data, signature, what)


def note_verifier(public_keys: list[bytes]) -> NoteVerifier:
    """Armored public keys that check log checkpoints' signatures."""
    from reconciler.adapters.notes import OpenPgpNoteVerifier

    return OpenPgpNoteVerifier(public_keys)


def open_planner(cfg: Config, workdir: Path) -> Observer:
    """The observation and plan of ``reconciler plan``, which changes nothing a daemon
    uses: the head is read from git objects into ``workdir`` (the daemon's clone serves
    as the object store when there is one), the ledger is a read-only copy, and Nix
    writes its fleet files under ``workdir``. Only Nix's store and the staged
    toolchain, both caches keyed by content, may grow."""
    checkout = cfg.state_dir / "checkout"
    git = source(cfg) if (checkout / ".git").is_dir() else _clone_in(cfg, workdir / "clone")
    nix_settings = replace(cfg.nix, toolchain_dir=cfg.nix.toolchain_dir or cfg.state_dir / "toolchain")
    nix = Nix(workdir, nix_settings, images=cfg.images)
    ledger = State(cfg.state_dir, read_only=True)
    return Observer(cfg, Snapshot(git, workdir), nix, ledger, Gate(cfg.repo), SystemClock())


def verified_builders(cfg: Config, workdir: Path) -> tuple[list[Builder], dict[str, str]]:
    """`reconciler builders`: the builders a root nix-daemon's machines file may list,
    each found sandboxed by the sandbox probe built on it alone, and why each other one
    may not (core.builders.usable). The probes run through this process's own Nix, as
    root runs it: such a daemon takes no builders from the reconciler, so the
    reconciler cannot probe them one by one later. ``workdir`` takes what the probes
    write (and the toolchain, unless nix.toolchain_dir names one): root must not fill
    the daemon's state directory."""
    from reconciler.core import builders as remote

    settings = replace(cfg.nix, toolchain_dir=cfg.nix.toolchain_dir or workdir / "toolchain")
    nix = Nix(workdir, settings, builders=cfg.builders)
    if cfg.builders and builds_through_daemon(nix.env):
        raise ReconcilerError(
            "builders: cannot probe each builder's sandbox through a nix-daemon: run this as root "
            "with NIX_REMOTE unset"
        )
    found = nix.probe_builders(cfg.signing.gnupghome)
    return remote.usable(cfg.builders, found, not cfg.nix.sandbox)


def _ports(cfg: Config, source: Source, nix: Nix) -> Ports:
    """The daemon's pass's ports around its ``source`` and ``nix``: the store, the
    ledger, the gate, a signer opened on first use, the system clock."""
    from reconciler.adapters.appimage import Packager

    # What can fail on bad configuration comes before the ledger is opened.
    store = open_store(cfg.store)
    gate = Gate(cfg.repo)
    s = cfg.signing
    return Ports(
        source=source,
        nix=nix,
        store=store,
        ledger=State(cfg.state_dir),
        gate=gate,
        signer=lambda: _signer(s),
        clock=SystemClock(),
        packager=Packager(),
    )


def _signer(s: SigningConfig) -> Signer:
    from reconciler.adapters.tufkeys import TufSigner

    return TufSigner(s.gnupghome, s.key, s.passphrase_file)


def _clone_in(cfg: Config, checkout: Path) -> GitSource:
    r = cfg.repo
    return GitSource(
        r.url,
        r.branch,
        checkout,
        r.depth,
        r.credentials_file,
        r.ssh_key,
        r.known_hosts,
        r.network_timeout.total_seconds(),
    )


def signers_in(homes: list[Path]) -> dict[str, MetadataSigner]:
    """Every secret key of ``homes`` as a TUF signer, by keyid (for `reconciler keys`)."""
    from reconciler.adapters.tufkeys import metadata_signers

    return {s.public_key.keyid: s for home in homes for s in metadata_signers(home)}


def read_metadata_key(spec: str, homes: list[Path]) -> Key:
    """A TUF key from an armored public key file, or by fingerprint from ``homes``."""
    from reconciler.adapters.gpg import read_keys
    from reconciler.adapters.tufkeys import metadata_keys, metadata_signer

    path = Path(spec)
    if path.is_file():
        try:
            keys = metadata_keys(read_keys([path]))
        except VerificationError as exc:
            raise ConfigError(spec, "", str(exc)) from None
        if len(keys) != 1:
            raise ConfigError(spec, "", f"holds {len(keys)} keys; give a file with one")
        return keys[0]
    for home in homes:
        try:
            return metadata_signer(home, spec).public_key
        except SigningError:
            continue
    raise ConfigError(spec, "", "is neither a public key file nor a key in " + ", ".join(map(str, homes)))


def open_daemon(cfg: Config) -> Daemon:
    from reconciler.daemon.loop import Daemon

    rec = open_reconciler(cfg)
    # The daemon's own probe: its verdict is kept for status and metrics, and the first
    # pass does not probe again.
    return Daemon(cfg, rec, preflight(cfg, sandbox=rec.check_sandbox))


def preflight(cfg: Config, sandbox: Callable[[], str] | None = None) -> list[Check]:
    """`reconciler check`'s checks, in order, with the real adapters: the config's
    files, the state directory, the signing key, the store, its transparency log (one
    this daemon can extend, or none yet), Nix's sandbox (``sandbox`` probes it,
    default: a probe of its own) and the repository."""
    import time

    from reconciler.adapters.gpg import check_signing_key
    from reconciler.daemon import preflight as pf
    from reconciler.daemon.loop import access, read_secret

    p = str(cfg.path)

    def config() -> str:
        t, r = cfg.triggers, cfg.repo
        # Through a nix-daemon, the builders' keys are the root daemon's to read.
        builder_keys = (
            []
            if builds_through_daemon()
            else [(f"builders[{i}].ssh_key", Path(b.ssh_key)) for i, b in enumerate(cfg.builders)]
        )
        pf.check_files(
            cfg,
            [
                ("repo.credentials_file", r.credentials_file),
                ("repo.ssh_key", r.ssh_key),
                ("repo.known_hosts", r.known_hosts),
                *((f"repo.verify_commits.keys[{i}]", k) for i, k in enumerate(r.trusted_keys)),
                ("store.credentials_file", cfg.store.credentials_file),
                *builder_keys,
            ],
        )
        read_secret(cfg, "triggers.webhook_secret_file", t.webhook_secret_file)
        read_secret(cfg, "triggers.reconcile_token_file", t.reconcile_token_file)
        access(cfg)  # the fleet page's token and basic-auth files
        return f"{p} is valid"

    def signing() -> str:
        s = cfg.signing
        if not s.gnupghome.is_dir():
            why = "is not a directory" if s.gnupghome.exists() else "does not exist"
            raise ConfigError(p, "signing.gnupghome", f"{s.gnupghome} {why}")
        pf.check_files(cfg, [("signing.passphrase_file", s.passphrase_file)])
        try:
            found = check_signing_key(s.gnupghome, s.key, s.passphrase_file, time.time())
            _check_metadata_signing(s)
        except SigningError as exc:
            raise ConfigError(p, "signing.key", str(exc)) from None
        return found

    def store() -> str:
        return pf.check_store(open_store(cfg.store))

    def transparency_log() -> str:
        from reconciler.daemon.tlog import TransparencyLog

        # The key is opened only for a log that exists: a broken key is the signing check's.
        return TransparencyLog(
            open_store(cfg.store),
            lambda: note_signer(_signer(cfg.signing)),
            lambda: note_verifier([_signer(cfg.signing).public_key()]),
            cfg.state_dir / "tlog",
            cfg.transparency_log.origin,
        ).describe()

    def own_probe() -> str:
        nix = Nix(cfg.state_dir, cfg.nix, builders=cfg.builders)
        return pf.sandbox_verdict(cfg, nix.probe_sandbox(cfg.signing.gnupghome))

    def git() -> str:
        head = _clone_in(cfg, cfg.state_dir / "checkout").remote_head(timeout=GIT_CHECK_TIMEOUT)
        return f"{cfg.repo.shown_url} answers: {cfg.repo.branch} is at {head}"

    return [
        (pf.CheckName.CONFIG, config),
        (pf.CheckName.STATE_DIR, lambda: pf.check_state_dir(cfg)),
        (pf.CheckName.SIGNING, signing),
        (pf.CheckName.STORE, store),
        (pf.CheckName.LOG, transparency_log),
        (pf.CheckName.SANDBOX, sandbox or own_probe),
        (pf.CheckName.GIT, git),
    ]


# How long `check` waits for the repository to answer: an operator is waiting.
GIT_CHECK_TIMEOUT = 60.0


def _check_metadata_signing(s: SigningConfig) -> None:
    from reconciler.adapters.tufkeys import check_metadata_signing

    check_metadata_signing(s.gnupghome, s.key)


def request_reconcile(cfg: Config, wait: float | None = None) -> tuple[int, str]:
    """Ask the daemon running with ``cfg`` for a pass at once (POST /reconcile with the
    reconcile token): the status and first line of its answer. ``wait``: seconds to wait
    for that pass to finish (``Prefer: wait``): 200 and its result, or 202 if it did not
    finish in time. Refused or unreachable: ReconcilerError."""
    from reconciler.adapters.http import local_url, post
    from reconciler.daemon.loop import read_secret

    t = cfg.triggers
    token = read_secret(cfg, "triggers.reconcile_token_file", t.reconcile_token_file)
    if not token:
        raise ConfigError(
            str(cfg.path), "triggers.reconcile_token_file", "is not set, so the daemon takes no such request"
        )
    url = local_url(cfg.listen, "/reconcile")
    headers = {"Authorization": "Bearer " + token.decode("latin-1")}
    if wait is None:
        status, answer = post(url, headers)
    else:
        headers["Prefer"] = f"wait={wait:g}"
        # The daemon answers within ``wait``; the margin covers a slow answer, not a pass.
        status, answer = post(url, headers, timeout=wait + 30)
    if status not in (200, 202):
        raise ReconcilerError(f"the daemon at {url} refused ({status}): {answer}")
    return status, answer


def open_ledger(cfg: Config, read_only: bool = False) -> Ledger:
    return State(cfg.state_dir, read_only=read_only)


def open_agent(cfg: AgentConfig) -> Agent:
    """The host agent with the real fetcher, clock, gpg and health probe."""
    from reconciler.adapters.fetch import HttpFetcher
    from reconciler.adapters.tufkeys import metadata_keys
    from reconciler.agent import health
    from reconciler.agent.updater import Agent

    return Agent(
        cfg,
        fetcher=HttpFetcher(),
        clock=SystemClock(),
        pinned_keys=lambda keys: metadata_keys(list(keys)),
        probe=health.probe,
    )


def audit_log(
    cfg: Config | None,
    store: str | None,
    keys: list[Path],
    witness_keys: list[Path],
    seen: list[Path],
) -> Audit:
    """`reconciler log verify`: the log of the config's store (listed whole, the daemon's
    last signed head among those seen, its key unless ``keys`` are given), or of the
    store at ``store`` (a directory, listed; or a URL, read entry by entry)."""
    from reconciler.adapters import fetch
    from reconciler.adapters.gpg import read_keys
    from reconciler.adapters.notes import OpenPgpNoteVerifier
    from reconciler.agent.logcheck import audit

    heads = list(seen)
    if cfg is not None:
        opened = open_store(cfg.store)
        own = cfg.state_dir / "tlog" / "checkpoint"
        if own.exists():
            heads.append(own)
        public = read_keys(keys) if keys else [_signer(cfg.signing).public_key()]
    elif store is not None and not fetch.is_url(store):
        opened = FilesystemStore(Path(store))
        public = read_keys(keys)
    else:
        assert store is not None
        opened = None
        public = read_keys(keys)
    if not public:
        raise ConfigError("log verify", "--key", "give the publisher's public key")
    listing: list[str] | None = None
    if opened is not None:
        s = opened
        listing = s.list("")

        def read(key: str, limit: int) -> bytes | None:
            return s.get_bytes(key, limit)
    else:
        base = store or ""

        def read(key: str, limit: int) -> bytes | None:
            try:
                got = fetch.get(fetch.join(base, key), limit)
            except FetchError as exc:
                if exc.status in (403, 404):
                    return None
                raise
            return got.data if got is not None else None

    witnesses = OpenPgpNoteVerifier(read_keys(witness_keys)) if witness_keys else None
    need = witnesses.fingerprints if witnesses is not None else frozenset()
    seen_notes = []
    for path in heads:
        try:
            seen_notes.append((str(path), path.read_bytes()))
        except OSError as exc:
            raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None
    return audit(read, listing, note_verifier(public), witnesses, need, seen_notes)


def cosign_log(
    cfg: Config,
    gnupghome: Path,
    key: str | None,
    name: str | None,
    state: Path | None,
    publisher_key: Path | None,
) -> tuple[Checkpoint, bool, str]:
    """`reconciler log cosign`: the key ``key`` of ``gnupghome`` (its only secret key
    by default) co-signs the store's checkpoint as a witness, under the pass lock and
    the publisher lease (its write of the checkpoint is fenced like a pass's)."""
    from reconciler.adapters.gpg import Signer as GpgSigner
    from reconciler.adapters.gpg import read_keys, secret_fingerprints
    from reconciler.daemon.tlog import cosign

    if key is None:
        found = secret_fingerprints(gnupghome)
        if len(found) != 1:
            raise ConfigError(str(gnupghome), "", f"holds {len(found)} secret keys; name one with --key")
        key = found[0]
    from reconciler.adapters.notes import OpenPgpNoteSigner

    witness = OpenPgpNoteSigner(GpgSigner(gnupghome, key))
    public = read_keys([publisher_key]) if publisher_key else [_signer(cfg.signing).public_key()]
    witness_name = name or f"witness/{witness.fingerprint}"
    rec = open_reconciler(cfg)
    try:
        with rec.leased():
            where = state or cfg.state_dir / "tlog" / f"witness-{witness.fingerprint}"
            cp, new = cosign(rec.store, note_verifier(public), witness, witness_name, where)
    finally:
        rec.close()
    return cp, new, witness_name

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

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.adapters.clock import SystemClock
from reconciler.adapters.git import GitSource, Snapshot
from reconciler.adapters.gpg import read_keys
from reconciler.adapters.ledger import State
from reconciler.adapters.nix import Nix
from reconciler.adapters.store import FilesystemStore
from reconciler.config import Config, SigningConfig, StoreConfig
from reconciler.daemon.gate import Gate
from reconciler.daemon.metrics import Metrics
from reconciler.daemon.reconciler import OpenLog, OpenTuf, Reconciler
from reconciler.errors import ConfigError, FetchError, SigningError, StoreError
from reconciler.ports import Ledger, NoteSigner, NoteVerifier, Ports, Signer, Source, Store

if TYPE_CHECKING:
    from securesystemslib.signer import Key
    from securesystemslib.signer import Signer as MetadataSigner

    from reconciler.agent.config import AgentConfig
    from reconciler.agent.logcheck import Audit
    from reconciler.agent.updater import Agent
    from reconciler.core.tlog import Checkpoint
    from reconciler.daemon.loop import Daemon
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
    """The daemon's pass with the real adapters."""
    nix = Nix(cfg.state_dir, cfg.nix, builders=cfg.builders)
    ports = _ports(cfg, source(cfg), nix, lambda: State(cfg.state_dir))
    return Reconciler(cfg, ports, metrics, _tuf(cfg, ports), _tlog(cfg, ports))


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
        )

    return open_log


def note_signer(signer: Signer) -> NoteSigner:
    """A gpg signer as the signer of log checkpoints."""
    from reconciler.adapters.gpg import Signer as GpgSigner
    from reconciler.adapters.notes import OpenPgpNoteSigner

    if not isinstance(signer, GpgSigner):
        raise SigningError("the transparency log is signed with a gpg key")
    return OpenPgpNoteSigner(signer)


def note_verifier(public_keys: list[bytes]) -> NoteVerifier:
    """Armored public keys that check log checkpoints' signatures."""
    from reconciler.adapters.notes import OpenPgpNoteVerifier

    return OpenPgpNoteVerifier(public_keys)


def open_planner(cfg: Config, workdir: Path) -> Reconciler:
    """The pass for ``reconciler plan``, which changes nothing a daemon uses: the head
    is read from git objects into ``workdir`` (the daemon's clone serves as the object
    store when there is one), the ledger is a read-only copy, and Nix writes its fleet
    files under ``workdir``. Only Nix's store and the staged toolchain, both caches
    keyed by content, may grow."""
    checkout = cfg.state_dir / "checkout"
    git = source(cfg) if (checkout / ".git").is_dir() else _clone_in(cfg, workdir / "clone")
    nix_settings = replace(cfg.nix, toolchain_dir=cfg.nix.toolchain_dir or cfg.state_dir / "toolchain")
    nix = Nix(workdir, nix_settings)
    return Reconciler(
        cfg, _ports(cfg, Snapshot(git, workdir), nix, lambda: State(cfg.state_dir, read_only=True))
    )


def _ports(cfg: Config, source: Source, nix: Nix, open_ledger: Callable[[], Ledger]) -> Ports:
    """A pass's ports around its ``source``, ``nix`` and ledger: the store, the gate, a
    signer opened on first use, the system clock."""
    # What can fail on bad configuration comes before the ledger is opened.
    store = open_store(cfg.store)
    gate = Gate(cfg.repo)
    s = cfg.signing
    return Ports(
        source=source,
        nix=nix,
        store=store,
        ledger=open_ledger(),
        gate=gate,
        signer=lambda: _signer(s),
        clock=SystemClock(),
    )


def _signer(s: SigningConfig) -> Signer:
    from reconciler.adapters.tufkeys import TufSigner

    return TufSigner(s.gnupghome, s.key, s.passphrase_file)


def _clone_in(cfg: Config, checkout: Path) -> GitSource:
    r = cfg.repo
    return GitSource(r.url, r.branch, checkout, r.depth, r.credentials_file, r.ssh_key, r.known_hosts)


def signers_in(homes: list[Path]) -> dict[str, MetadataSigner]:
    """Every secret key of ``homes`` as a TUF signer, by keyid (for `reconciler keys`)."""
    from reconciler.adapters.tufkeys import metadata_signers

    return {s.public_key.keyid: s for home in homes for s in metadata_signers(home)}


def read_metadata_key(spec: str, homes: list[Path]) -> Key:
    """A TUF key from an armored public key file, or by fingerprint from ``homes``."""
    from reconciler.adapters.tufkeys import metadata_keys, metadata_signer

    path = Path(spec)
    if path.is_file():
        keys = metadata_keys(read_keys([path]))
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

    return Daemon(cfg, open_reconciler(cfg))


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
            return s.get_bytes(key)
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
    by default) co-signs the store's checkpoint as a witness, under the pass lock."""
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
        with rec.exclusive():
            where = state or cfg.state_dir / "tlog" / f"witness-{witness.fingerprint}"
            cp, new = cosign(rec.store, note_verifier(public), witness, witness_name, where)
    finally:
        rec.close()
    return cp, new, witness_name

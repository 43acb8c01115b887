"""The seams between the daemon and the world: Protocols only.

The daemon's pass (reconciler.daemon.reconciler) sees git, Nix, gpg, the store, the
ledger and the clock through these; reconciler.wiring hands it the real adapters,
the unit tests in-memory fakes (tests/fakes.py).
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from reconciler.core.builders import Probe
from reconciler.core.events import Event, EventQuery
from reconciler.core.hosts import Host, ParseKey
from reconciler.core.model import (
    BuilderState,
    BuildOutput,
    BuildProgress,
    Evaluation,
    HostState,
    PackageIds,
    Status,
    Suspensions,
)
from reconciler.core.reproducibility import ReproCheck
from reconciler.errors import ObjectTooLargeError

if TYPE_CHECKING:
    # python-tuf's signer type; importing securesystemslib costs a command that never
    # signs (`reconciler plan`) boto3 and more.
    from securesystemslib.signer import Signer as MetadataSigner

    # Types only: the fetch adapter brings http.client, ssl and email, which a plan
    # does not use either.
    from reconciler.adapters import fetch
    from reconciler.core.note import Note
    from reconciler.core.provenance import NixInputs, Signature


class Source(Protocol):
    """The config repository: its tracked branch, written out for evaluation."""

    @property
    def checkout(self) -> Path:
        """Where the fetched commit is written out for Nix: its tree without the host
        and profile files (core.hosts.NOT_READ_BY_PACKAGES)."""
        ...

    def fetch(self) -> str:
        """Fetch the branch, write its head out and return the commit id."""
        ...

    def read_tree(self) -> dict[str, str]:
        """The definition files of the fetched commit (core.hosts.parse_fleet's input)."""
        ...

    def commit_time(self, commit: str) -> float: ...
    def tree_digest(self, commit: str, exclude: frozenset[str]) -> str: ...
    def changed_files(self, old: str | None, new: str) -> frozenset[str] | None: ...
    def signature(self, commit: str) -> bytes | None: ...
    def verify_commit(self, commit: str, gnupghome: Path) -> str: ...
    def is_ancestor(self, old: str, new: str) -> bool | None: ...


class Nix(Protocol):
    """Evaluates hosts to image derivations and builds their release artifacts."""

    @property
    def sandboxed(self) -> bool: ...

    def recipe_digest(self) -> str | None: ...
    def evaluate(self, hosts: Sequence[Host], repo: Path) -> Evaluation: ...
    def package_ids(self, names: Sequence[str], repo: Path) -> PackageIds:
        """What each package of ``names`` gives an image, or why it does not evaluate."""
        ...

    def instantiate(self, host: Host, version: int, repo: Path) -> str:
        """The derivation of ``host``'s artifacts as ``version``; builds nothing."""
        ...

    def realise(
        self, host: Host, drv: str, repo: Path, root: str, progress: BuildProgress | None = None
    ) -> BuildOutput:
        """Build ``drv``, kept from garbage collection under the GC root ``root``;
        ``progress`` hears now and then how long it has run and its last line."""
        ...

    def probe_sandbox(self, key_dir: Path) -> bool: ...
    def probe_builders(self, key_dir: Path) -> dict[str, Probe]:
        """Probe the sandbox of the remote builders due a probe (core.builders.to_probe):
        what each found, by name. Builds go only to those core.builders.usable allows."""
        ...

    def check_reproducible(self, host: Host, drv: str, repo: Path, skip: frozenset[str]) -> ReproCheck:
        """Build the derivations of ``drv``'s closure (realised already) but ``skip`` a
        second time and compare with the first build (the reproducibility gate)."""
        ...

    def inputs(self, host: Host, drv: str) -> NixInputs:
        """What went into building ``drv`` (realised already), for its provenance."""
        ...


class Signer(Protocol):
    def sign(self, data: bytes) -> bytes: ...
    def sign_file(self, path: Path) -> bytes: ...
    def public_key(self) -> bytes: ...
    def metadata_signer(self) -> MetadataSigner:
        """The same key as a securesystemslib signer, for TUF metadata."""
        ...

    def sign_attestation(self, pae: bytes) -> Signature:
        """The same key's DSSE signature of an envelope's pre-authentication encoding."""
        ...


class NoteSigner(Protocol):
    """A key that signs the transparency log's checkpoints (signed notes): the
    publisher's, or a witness's (reconciler.adapters.notes)."""

    @property
    def fingerprint(self) -> str:
        """The OpenPGP fingerprint of the key (its note key ID is made of it)."""
        ...

    def sign_note(self, text: bytes) -> bytes:
        """The signature of a note's text (binary OpenPGP detached signature)."""
        ...


class NoteVerifier(Protocol):
    """Pinned keys that check a signed note's signatures (reconciler.adapters.notes)."""

    def verified(self, note: Note) -> set[str]:
        """The fingerprints of the pinned keys with a good signature on ``note``;
        VerificationError when a signature by a pinned key is bad (the note is then
        rejected whole, as c2sp.org/signed-note asks)."""
        ...


class Store(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only where no object is, atomically: of writers racing for one
        key exactly one gets True, the others False (the publisher lease's election).
        ``data`` must differ between writers (an S3 store tells its own retried write
        from another's by the bytes)."""
        ...

    def get_bytes(self, key: str, limit: int) -> bytes | None:
        """``key``'s bytes, None if missing; ObjectTooLargeError (a StoreError) naming
        the key and ``limit`` when it holds more than ``limit`` bytes, having read no
        more than ``limit + 1``: an object someone else planted in a shared store never
        lands in memory whole. Every reader names the limit of what it reads."""
        ...

    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int | None: ...
    def url(self, key: str) -> str: ...
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Every key that starts with ``prefix`` (a plain string prefix), sorted."""
        ...

    def copy(self, src: str, dst: str) -> None:
        """Make ``dst`` an object with ``src``'s bytes, atomically like a put: a hard
        link or a copy inside the backend where it has one, never through this process."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""
        ...

    def sweep(self) -> builtins.list[str]:
        """Remove what writes that died mid-way left (never visible as keys); call it
        only where no write can be in progress. Returns what was removed."""
        ...


def holds(store: Store, key: str, data: bytes) -> bool:
    """Whether ``key`` holds exactly ``data``, read no further than one byte past it:
    whatever else is there (a longer object someone planted too) is to be written over."""
    try:
        return store.get_bytes(key, len(data)) == data
    except ObjectTooLargeError:
        return False


class Packager(Protocol):
    """What the publisher adds to built artifacts (reconciler.adapters.appimage)."""

    def seal_appimage(
        self,
        built: Path,
        dest: Path,
        update_information: bytes,
        public_key: bytes,
        sign: Callable[[bytes], bytes],
    ) -> None:
        """``built`` to ``dest`` with its digest, signature, key and update information
        embedded (AppImage spec)."""
        ...

    def zsync(self, artifact: Path, name: str, url: str) -> bytes:
        """The zsync control file of ``artifact`` (saved as ``name``, fetched from ``url``)."""
        ...


class Ledger(Protocol):
    """What the daemon recorded: the reconciled commit, per host its published
    version and last outcome, and the evaluation cache."""

    # Whether what is recorded outlives this process: False for the read-only copy a
    # plan works on, where caches (parse results, evaluations) are not worth writing.
    durable: bool

    def close(self) -> None: ...
    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """Writes inside are committed together, or not at all."""
        ...

    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def hosts(self) -> Mapping[str, HostState]: ...
    def evaluated(self, keys: Mapping[str, str]) -> dict[str, str]: ...
    def record_evaluated(self, entries: Mapping[str, tuple[str, str]]) -> None: ...
    def parsed(self) -> dict[ParseKey, str]:
        """Host files' parse results as core.hosts.encode_parsed wrote them."""
        ...

    def record_parsed(self, entries: Mapping[ParseKey, str], removed: Iterable[str]) -> None: ...
    def record_published(self, name: str, version: int, image: str, commit: str) -> None: ...
    def record_build_failure(
        self, name: str, error: str, image: str, failures: int, retry_at: float, version: int | None
    ) -> None:
        """A failed build of ``image`` as ``version`` (None: no version was decided)."""
        ...

    def record_failure(self, name: str, status: Status, error: str) -> None: ...
    def builders(self) -> Mapping[str, BuilderState]: ...
    def record_builder(self, name: str, result: str, seconds: float | None, error: str | None) -> None:
        """One host build on builder ``name``: ``result`` success, failure or unreachable."""
        ...

    def record_builder_probe(self, name: str, sandbox: str, error: str | None) -> None:
        """What a sandbox probe on builder ``name`` found, and why it is not used, if not."""
        ...

    def suspensions(self) -> Suspensions:
        """What operators suspended; read anew on each call (another process writes it)."""
        ...

    def suspend(self, host: str | None, at: float) -> bool:
        """Suspend ``host`` (None: the whole fleet) from unix time ``at``; False if it
        was already."""
        ...

    def resume(self, host: str | None) -> bool:
        """Lift ``host``'s suspension (None: the fleet's); False if there was none."""
        ...


class EventLog(Protocol):
    """The event history (reconciler.core.events) and whoever else hears of events
    (notifications): ``record`` returns at once and never fails the caller."""

    def record(self, *events: Event) -> None: ...
    def query(self, q: EventQuery) -> list[Event]:
        """The events ``q`` asks for, oldest first."""
        ...

    def close(self) -> None: ...


class Clock(Protocol):
    """Wall time for expiry and timestamps; monotonic time for deadlines and intervals."""

    def now(self) -> datetime:
        """Timezone-aware, UTC."""
        ...

    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class Fetcher(Protocol):
    """Reads store objects by URL, each read bounded in size (reconciler.adapters.fetch)."""

    def get(
        self,
        target: str,
        limit: int,
        since: fetch.Validators | None = ...,
        timeout: float = ...,
        count: Callable[[int], None] = ...,
    ) -> fetch.Fetched | None:
        """All of ``target``, at most ``limit`` bytes; None if unchanged ``since``."""
        ...

    def download(
        self,
        target: str,
        dest: Path,
        size: int,
        timeout: float = ...,
        count: Callable[[int], None] = ...,
    ) -> str:
        """``target`` into ``dest``, exactly ``size`` bytes; the sha256 of what was written."""
        ...


class Gate(Protocol):
    """Whether a head commit may be built (reconciler.daemon.gate)."""

    def check(self, source: Source, commit: str, last: str | None) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Ports:
    """Everything a pass talks to. ``signer`` is opened on first use: a pass with
    nothing to publish needs no key. Without ``events`` (a plan), nothing is recorded."""

    source: Source
    nix: Nix
    store: Store
    ledger: Ledger
    gate: Gate
    signer: SignerFactory
    clock: Clock
    packager: Packager
    events: EventLog | None = None


class SignerFactory(Protocol):
    def __call__(self) -> Signer: ...

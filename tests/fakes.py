"""In-memory fakes of every port (reconciler.ports), for unit tests of the whole pass.

Each keeps to its port's contract and records what was asked of it, so that a test
can say what a pass did without git, Nix, gpg, a store or sqlite.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from securesystemslib.signer import CryptoSigner
from securesystemslib.signer import Signer as SslibSigner

from reconciler.core.builders import Probe
from reconciler.core.events import Event, EventQuery, EventType
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
from reconciler.core.note import Note, openpgp_key_id
from reconciler.core.provenance import DebianPackage, NixInputs, Role, Signature, StorePath
from reconciler.core.reproducibility import CHECK_LOCAL, Mismatch, ReproCheck
from reconciler.daemon.gate import CommitRefusedError, Refusal
from reconciler.errors import (
    BuildError,
    ObjectTooLargeError,
    SigningError,
    SourceError,
    StoreError,
    VerificationError,
)
from reconciler.ports import Source, Store


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Commit:
    id: str
    files: dict[str, str]
    parent: str | None
    time: float


class FakeSource:
    """A branch of commits, each a mapping of path to text; ``push`` moves the head."""

    def __init__(self) -> None:
        self.commits: dict[str, Commit] = {}
        self.head: str | None = None
        self.reads = 0  # of the tree
        self.unreachable: str | None = None  # why fetch fails, while set

    def push(self, files: Mapping[str, str], parent: str | None = "head", at: float = 1_700_000_000.0) -> str:
        """A new commit with ``files``; its parent is the current head unless given."""
        base = self.head if parent == "head" else parent
        commit = digest(files, base, len(self.commits))[:40]
        self.commits[commit] = Commit(commit, dict(files), base, at)
        self.head = commit
        return commit

    @property
    def checkout(self) -> Path:
        return Path("/nonexistent/checkout")

    def fetch(self) -> str:
        if self.unreachable is not None:
            raise SourceError(self.unreachable)
        assert self.head is not None, "nothing pushed"
        return self.head

    def read_tree(self) -> dict[str, str]:
        assert self.head is not None
        self.reads += 1
        return dict(self.commits[self.head].files)

    def commit_time(self, commit: str) -> float:
        return self.commits[commit].time

    def tree_digest(self, commit: str, exclude: frozenset[str]) -> str:
        files = self.commits[commit].files
        return digest({p: t for p, t in files.items() if p.split("/", 1)[0] not in exclude})

    def changed_files(self, old: str | None, new: str) -> frozenset[str] | None:
        if old is None or old not in self.commits:
            return None
        a, b = self.commits[old].files, self.commits[new].files
        return frozenset(p for p in set(a) | set(b) if a.get(p) != b.get(p))

    def signature(self, commit: str) -> bytes | None:
        return None

    def verify_commit(self, commit: str, gnupghome: Path) -> str:
        return ""

    def is_ancestor(self, old: str, new: str) -> bool | None:
        c: str | None = new
        while c is not None:
            if c == old:
                return True
            c = self.commits[c].parent
        return False


# A derivation in every host's closure (FakeNix.check_reproducible).
BASE_DRV = "/nix/store/" + "b" * 32 + "-base.drv"


class FakeNix:
    """Evaluation and builds as pure functions of the host; a build writes small
    artifact files under ``workdir``."""

    def __init__(self, workdir: Path, source: FakeSource | None = None) -> None:
        self.workdir = workdir
        # Where package_ids reads the packages from (the head's files), like Nix the checkout.
        self.source = source
        self.package_evaluations = 0
        self.sandboxed = True
        self.builds: list[tuple[str, int]] = []
        self.instantiated: list[tuple[str, int]] = []
        self._drvs: dict[str, tuple[Host, int]] = {}
        self.evaluated: list[str] = []
        self.failing: set[str] = set()  # hosts whose build fails
        self.broken: set[str] = set()  # hosts whose evaluation fails
        self.builder_of: dict[str, str] = {}  # host -> the builder that builds it (default local)
        self.refused: dict[str, dict[str, str]] = {}  # host -> builders that could not take it
        self.while_building: Callable[[str], None] | None = None  # called with the host built
        self.unreproducible: set[str] = set()  # hosts whose image builds differently each time
        self.check_broken: set[str] = set()  # hosts whose second build cannot run
        self.checks: list[tuple[str, tuple[str, ...]]] = []  # host, derivations built again
        self.builder_probes: dict[str, Probe] = {}  # what the next probe_builders finds

    def recipe_digest(self) -> str | None:
        return "recipe-1"

    def package_ids(self, names: Sequence[str], repo: Path) -> PackageIds:
        """A package's id is its text without comment lines: as in Nix, where a comment
        does not reach the derivation. One that says "broken" does not evaluate; one that
        says "slow" runs into the deadline."""
        self.package_evaluations += 1
        files = self.source.read_tree() if self.source is not None else {}
        ids, failed, limited = {}, {}, set()
        for n in names:
            text = files.get(f"packages/{n}.nix", "")
            if "broken" in text:
                failed[n] = "error: undefined variable 'broken'"
            elif "slow" in text:
                failed[n] = "evaluation took longer than 300s and was stopped"
                limited.add(n)
            else:
                code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
                ids[n] = digest(code)
        return PackageIds(ids, failed, frozenset(limited))

    def image(self, host: Host) -> str:
        return f"/nix/store/{digest(host.to_nix())[:32]}-host-{host.name}-image.drv"

    def evaluate(self, hosts: Sequence[Host], repo: Path) -> Evaluation:
        self.evaluated += [h.name for h in hosts]
        images = {h.name: self.image(h) for h in hosts if h.name not in self.broken}
        errors = {h.name: "error: undefined variable 'oops'" for h in hosts if h.name in self.broken}
        return Evaluation(images=images, errors=errors)

    def instantiate(self, host: Host, version: int, repo: Path) -> str:
        self.instantiated.append((host.name, version))
        drv = f"/nix/store/{digest(self.image(host), version)[:32]}-host-{host.name}-{version}.drv"
        self._drvs[drv] = (host, version)
        return drv

    def realise(
        self, host: Host, drv: str, repo: Path, root: str, progress: BuildProgress | None = None
    ) -> BuildOutput:
        _, version = self._drvs[drv]
        self.builds.append((host.name, version))
        if self.while_building is not None:
            self.while_building(host.name)
        builder = self.builder_of.get(host.name, "local")
        refused = self.refused.get(host.name, {})
        if host.name in self.failing:
            raise BuildError(host.name, "builder failed with exit code 1", builder=builder, refused=refused)
        out = self.workdir / digest(drv)[:16]
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for fmt in host.formats:
            name = (
                f"{host.name}-{version}-linux-amd64.aci"
                if fmt == "aci"
                else f"{host.name}-{version}.AppImage"
            )
            (out / name).write_bytes(f"{fmt} of {self.image(host)} as {version}".encode())
            files[fmt] = out / name
        return BuildOutput(derivation=drv, out=out, files=files, builder=builder, refused=refused)

    def probe_sandbox(self, key_dir: Path) -> bool:
        return self.sandboxed

    def probe_builders(self, key_dir: Path) -> dict[str, Probe]:
        """What ``builder_probes`` holds, once each, as the adapter probes a builder
        until a probe could run."""
        found, self.builder_probes = self.builder_probes, {}
        return found

    def check_reproducible(self, host: Host, drv: str, repo: Path, skip: frozenset[str]) -> ReproCheck:
        """The closure is a base every host shares, the host's image and its artifacts
        derivation; the image of an ``unreproducible`` host differs in its second build."""
        closure = (BASE_DRV, self.image(host), drv)
        todo = tuple(d for d in closure if d not in skip)
        self.checks.append((host.name, todo))
        if host.name in self.check_broken:
            raise BuildError(host.name, "reproducibility check: the second build failed: out of disk")
        image = self.image(host)
        if host.name in self.unreproducible and image in todo:
            out = image.removesuffix(".drv")
            summary = "root/id: 37 bytes, sha256 0123456789abcdef vs 37 bytes, sha256 fedcba9876543210"
            return ReproCheck((), (), CHECK_LOCAL, (Mismatch(image, out, out + ".check", summary),))
        return ReproCheck(closure, todo, CHECK_LOCAL)

    def inputs(self, host: Host, drv: str) -> NixInputs:
        """The closure of a build: its output, the host's image and the toolchain."""
        out = self.workdir / digest(drv)[:16]
        closure = (str(out), self.image(host).removesuffix(".drv"), "/nix/store/0000-reconciler-toolchain")
        return NixInputs(
            nix_version="2.8.0",
            library_digest=digest("nix library"),
            toolchain="debian",
            toolchain_digest=digest("toolchain"),
            debian_packages=(DebianPackage("busybox-static", "1:1.35.0-4", "amd64", Role.CONTAINED),),
            closure=tuple(StorePath(p, digest(p), 1) for p in closure),
            outputs=(str(out),),
        )


class FakeSigner:
    def __init__(self) -> None:
        self.broken = False
        self.signed = 0
        self._metadata_signer: CryptoSigner | None = None

    def _sig(self, data: bytes) -> bytes:
        if self.broken:
            raise SigningError("gpg could not sign: the key is unusable")
        self.signed += 1
        return b"-----SIG " + hashlib.sha256(data).hexdigest().encode() + b"-----\n"

    def sign(self, data: bytes) -> bytes:
        return self._sig(data)

    def sign_file(self, path: Path) -> bytes:
        return self._sig(path.read_bytes())

    def public_key(self) -> bytes:
        return b"-----PUBLIC KEY-----\n"

    def sign_attestation(self, pae: bytes) -> Signature:
        return sslib_signer(self.metadata_signer())(pae)

    def metadata_signer(self) -> CryptoSigner:
        """A real ed25519 key for the TUF metadata (no gpg): made once per signer."""
        if self.broken:
            raise SigningError("gpg could not sign: the key is unusable")
        if self._metadata_signer is None:
            self._metadata_signer = CryptoSigner.generate_ed25519()
        return self._metadata_signer


class FakePackager:
    """Seals by appending what would be embedded; a zsync file names what it indexes.
    Records the AppImages sealed."""

    def __init__(self) -> None:
        self.sealed: list[str] = []
        self.disk_full = False

    def seal_appimage(
        self,
        built: Path,
        dest: Path,
        update_information: bytes,
        public_key: bytes,
        sign: Callable[[bytes], bytes],
    ) -> None:
        if self.disk_full:
            raise OSError(28, "No space left on device", str(dest))
        data = built.read_bytes()
        dest.write_bytes(data + b"|" + update_information + b"|" + public_key + b"|" + sign(data))
        self.sealed.append(built.name)

    def zsync(self, artifact: Path, name: str, url: str) -> bytes:
        size = artifact.stat().st_size
        blocks = -(-size // 2048)
        header = (
            f"zsync: 0.6.2\nFilename: {name}\nBlocksize: 2048\nLength: {size}\n"
            f"Hash-Lengths: 2,2,4\nURL: {url}"
        )
        return header.encode() + b"\n\n" + bytes(6 * blocks)


def sslib_signer(signer: SslibSigner) -> Callable[[bytes], Signature]:
    """A securesystemslib signer's signatures (a real ed25519 key, no gpg) as the signer
    port's sign_attestation gives them."""

    def sign(pae: bytes) -> Signature:
        sig = signer.sign(pae)
        extra = tuple(sorted((k, str(v)) for k, v in sig.unrecognized_fields.items()))
        return Signature(sig.keyid, bytes.fromhex(sig.signature), extra)

    return sign


class CrashError(StoreError):
    """The process died here: the write did not happen."""


class MemoryStore:
    """A store in a dict that records every write in order, and the limit of each key's
    last read. ``full`` makes every write fail as a full disk does; with ``crash_at``,
    the write of that index dies."""

    def __init__(self, objects: Mapping[str, bytes] | None = None, crash_at: int | None = None) -> None:
        self.objects: dict[str, bytes] = dict(objects or {})
        self.writes: list[str] = []
        self.limits: dict[str, int] = {}
        self.full = False
        self.crash_at = crash_at

    def _put(self, key: str, data: bytes) -> None:
        if self.full:
            raise StoreError(f"cannot write {key}: No space left on device")
        if len(self.writes) == self.crash_at:
            raise CrashError(f"crash before writing {key}")
        self.writes.append(key)
        self.objects[key] = data

    def put_file(self, key: str, path: Path) -> None:
        self._put(key, path.read_bytes())

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put(key, data)

    def create(self, key: str, data: bytes) -> bool:
        if key in self.objects:
            return False
        self._put(key, data)
        return True

    def get_bytes(self, key: str, limit: int) -> bytes | None:
        self.limits[key] = limit
        data = self.objects.get(key)
        if data is not None and len(data) > limit:
            raise ObjectTooLargeError(f"cannot read {key} from memory: larger than {limit} bytes")
        return data

    def exists(self, key: str) -> bool:
        return key in self.objects

    def size(self, key: str) -> int | None:
        data = self.objects.get(key)
        return None if data is None else len(data)

    def url(self, key: str) -> str:
        return f"memory:///{key}"

    def list(self, prefix: str = "") -> builtins.list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    def copy(self, src: str, dst: str) -> None:
        data = self.objects.get(src)
        if data is None:
            raise StoreError(f"cannot copy {src} to {dst}: no such object")
        # As FilesystemStore's hard link: nothing to write when dst is src's already.
        if self.objects.get(dst) is not data:
            self._put(dst, data)

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def sweep(self) -> builtins.list[str]:
        return []


class StoreProxy:
    """Passes every Store call on to ``inner``, telling ``wrote`` of each write before it
    is made (a create only once it made the object) and ``read`` of each get_bytes
    answer: the wrappers that count, record or check what a pass writes override those."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def wrote(self, key: str, size: int) -> None:
        """``key`` is written with ``size`` bytes sent (0 for a copy inside the store)."""

    def read(self, key: str, data: bytes | None) -> None:
        """``key`` was read, giving ``data``."""

    def put_file(self, key: str, path: Path) -> None:
        self.wrote(key, path.stat().st_size)
        self.inner.put_file(key, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.wrote(key, len(data))
        self.inner.put_bytes(key, data)

    def copy(self, src: str, dst: str) -> None:
        self.wrote(dst, 0)
        self.inner.copy(src, dst)

    def create(self, key: str, data: bytes) -> bool:
        created = self.inner.create(key, data)
        if created:
            self.wrote(key, len(data))
        return created

    def get_bytes(self, key: str, limit: int) -> bytes | None:
        data = self.inner.get_bytes(key, limit)
        self.read(key, data)
        return data

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def list(self, prefix: str = "") -> builtins.list[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def sweep(self) -> builtins.list[str]:
        return self.inner.sweep()


@dataclass
class MemoryLedger:
    meta: dict[str, str] = field(default_factory=dict)
    states: dict[str, HostState] = field(default_factory=dict)
    evaluations: dict[str, tuple[str, str]] = field(default_factory=dict)
    # path -> (text digest, context digest, encoded result)
    parse_results: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    builder_states: dict[str, BuilderState] = field(default_factory=dict)
    # host (None: the fleet) -> unix time suspended at
    suspended: dict[str | None, float] = field(default_factory=dict)
    durable: bool = True

    def close(self) -> None:
        pass

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        saved = (dict(self.meta), dict(self.states), dict(self.evaluations))
        try:
            yield
        except BaseException:
            self.meta, self.states, self.evaluations = saved
            raise

    def get_meta(self, key: str) -> str | None:
        return self.meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        self.meta[key] = value

    def hosts(self) -> Mapping[str, HostState]:
        return dict(self.states)

    def evaluated(self, keys: Mapping[str, str]) -> dict[str, str]:
        return {h: self.evaluations[h][1] for h, k in keys.items() if self.evaluations.get(h, ("",))[0] == k}

    def record_evaluated(self, entries: Mapping[str, tuple[str, str]]) -> None:
        self.evaluations.update(entries)

    def parsed(self) -> dict[ParseKey, str]:
        return {(path, digest, context): r for path, (digest, context, r) in self.parse_results.items()}

    def record_parsed(self, entries: Mapping[ParseKey, str], removed: Iterable[str]) -> None:
        for path in removed:
            self.parse_results.pop(path, None)
        for (path, digest, context), result in entries.items():
            self.parse_results[path] = (digest, context, result)

    def _prev(self, name: str) -> HostState:
        return self.states.get(name) or HostState(name, 0, None, None, Status.FAILED, None, 0.0)

    def record_published(self, name: str, version: int, image: str, commit: str) -> None:
        self.states[name] = HostState(name, version, image, commit, Status.PUBLISHED, None, 0.0)

    def record_build_failure(
        self, name: str, error: str, image: str, failures: int, retry_at: float, version: int | None
    ) -> None:
        p = self._prev(name)
        self.states[name] = HostState(
            name, p.version, p.image, p.commit, Status.FAILED, error, 0.0, failures, image, retry_at, version
        )

    def record_failure(self, name: str, status: Status, error: str) -> None:
        p = self._prev(name)
        self.states[name] = HostState(name, p.version, p.image, p.commit, status, error, 0.0)

    def builders(self) -> Mapping[str, BuilderState]:
        return dict(self.builder_states)

    def record_builder(self, name: str, result: str, seconds: float | None, error: str | None) -> None:
        b = self.builder_states.get(name) or BuilderState(name, 0, 0, 0, None, None, None, None)
        if result == "success":
            b = replace(b, builds=b.builds + 1, last_build=0.0, last_seconds=seconds)
        elif result == "failure":
            b = replace(b, failures=b.failures + 1, last_error=error, last_error_at=0.0)
        else:
            b = replace(b, unreachable=b.unreachable + 1, last_error=error, last_error_at=0.0)
        self.builder_states[name] = b

    def record_builder_probe(self, name: str, sandbox: str, error: str | None) -> None:
        b = self.builder_states.get(name) or BuilderState(name, 0, 0, 0, None, None, None, None)
        b = replace(b, sandbox=sandbox)
        if error is not None:
            b = replace(b, last_error=error, last_error_at=0.0)
        self.builder_states[name] = b

    def suspensions(self) -> Suspensions:
        hosts = {h: t for h, t in self.suspended.items() if h is not None}
        return Suspensions(fleet=self.suspended.get(None), hosts=hosts)

    def suspend(self, host: str | None, at: float) -> bool:
        if host in self.suspended:
            return False
        self.suspended[host] = at
        return True

    def resume(self, host: str | None) -> bool:
        return self.suspended.pop(host, None) is not None


class FakeClock:
    def __init__(self, now: float = 1_700_000_100.0) -> None:
        self.t = now

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds

    def advance(self, seconds: float) -> None:
        self.t += seconds


class RefusingGate:
    """A commit gate that refuses the commits in ``refused`` as unsigned."""

    def __init__(self) -> None:
        self.refused: set[str] = set()

    def check(self, source: Source, commit: str, last: str | None) -> None:
        if commit in self.refused:
            raise CommitRefusedError(commit, Refusal.UNSIGNED, "not signed")

    def close(self) -> None:
        pass


class MemoryEvents:
    """The event history in a list: ids in order, queries as core.events answers them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed = False

    def record(self, *events: Event) -> None:
        for e in events:
            self.events.append(replace(e, id=len(self.events) + 1))

    def query(self, q: EventQuery) -> list[Event]:
        return q.select(self.events)

    def close(self) -> None:
        self.closed = True

    def of(self, *types: EventType) -> list[Event]:
        return [e for e in self.events if e.type in types]


class FakeNoteKey:
    """A signed-note key in memory (reconciler.ports.NoteSigner and NoteVerifier of
    itself): a signature is sha256(secret || text), checked by recomputing it."""

    def __init__(self, fingerprint: str = "AB" * 20, secret: bytes = b"publisher") -> None:
        self._fingerprint = fingerprint
        self.secret = secret
        self.signed = 0

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def sign_note(self, text: bytes) -> bytes:
        self.signed += 1
        return hashlib.sha256(self.secret + text).digest()

    def verified(self, note: Note) -> set[str]:
        good = set()
        for sig in note.signatures:
            if sig.key_id != openpgp_key_id(sig.name, self._fingerprint):
                continue
            if sig.signature != hashlib.sha256(self.secret + note.text).digest():
                raise VerificationError(f"the checkpoint signature of {sig.name}: bad signature")
            good.add(self._fingerprint)
        return good

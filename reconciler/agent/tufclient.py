"""The agent's TUF client: python-tuf's ngclient over the agent's own fetcher.

ngclient does what The Update Framework asks of a client (root rotation with
thresholds, timestamp, snapshot, consistent snapshots, hash-binned delegations,
rollback and freeze checks); this module gives it the store through the agent's
:class:`Fetcher` (every read bounded in size and time), a trusted first root, and a
cheap idle poll:

- An idle poll is one conditional GET of ``tuf/timestamp.json``. Unchanged (304), the
  store has nothing new: every change of the repository, root rotations included,
  signs a new timestamp (reconciler.daemon.tuf). The trusted timestamp on disk then
  only has to be unexpired, or the store is frozen (:class:`StaleError`).
- The first root is the store's first ``N.root.json`` signed by a threshold of the
  keys pinned in the agent's config; ngclient walks on from there to the newest.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from securesystemslib import exceptions as sslib_exceptions
from securesystemslib.signer import Key
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Root, TargetFile, Timestamp
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from reconciler import log
from reconciler.adapters import fetch
from reconciler.core.layout import TUF_PREFIX, tuf_path
from reconciler.core.trust import Reason, RefusalError, refusal
from reconciler.core.tufroles import ROOT_LIMIT, SNAPSHOT_LIMIT, TARGETS_LIMIT, TIMESTAMP_LIMIT
from reconciler.errors import FetchError, FetchKind
from reconciler.ports import Fetcher

# The limits per role the publisher reads its own metadata with (core.tufroles).
CONFIG = UpdaterConfig(
    max_root_rotations=64,
    root_max_length=ROOT_LIMIT,
    timestamp_max_length=TIMESTAMP_LIMIT,
    snapshot_max_length=SNAPSHOT_LIMIT,
    targets_max_length=TARGETS_LIMIT,
    prefix_targets_with_hash=False,  # targets are content-addressed or immutable already
)
MAX_BOOTSTRAP_ROOTS = 64


class StaleError(RefusalError):
    """The newest metadata the store offers has expired: it is frozen, or its
    publisher stopped signing."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.EXPIRED, message)


class _StoreDownloads(FetcherInterface):
    """ngclient's downloads through the agent's fetcher; ``served`` holds bodies this
    poll read already (the timestamp of the conditional GET)."""

    def __init__(self, fetcher: Fetcher, timeout: float, count: Callable[[int], None]) -> None:
        self._fetcher = fetcher
        self._timeout = timeout
        self._count = count
        self.served: dict[str, bytes] = {}

    def _fetch(self, url: str) -> Iterator[bytes]:  # pragma: no cover - download_bytes is used
        raise NotImplementedError

    def read(self, url: str, limit: int) -> bytes:
        """All of ``url``, at most ``limit`` bytes, within the deadline; FetchError."""
        got = self._fetcher.get(url, limit, timeout=self._timeout, count=self._count)
        assert got is not None  # an unconditional read always answers
        return got.data

    def download_bytes(self, url: str, max_length: int) -> bytes:
        if url in self.served:
            return self.served.pop(url)
        try:
            return self.read(url, max_length)
        except FetchError as exc:
            if exc.status is not None:
                raise tuf_exceptions.DownloadHTTPError(str(exc), exc.status) from None
            if exc.kind is FetchKind.DEADLINE:
                raise tuf_exceptions.SlowRetrievalError(str(exc)) from None
            if exc.kind is FetchKind.TOO_LARGE:
                raise tuf_exceptions.DownloadLengthMismatchError(str(exc)) from None
            raise tuf_exceptions.DownloadError(str(exc)) from None


class TufClient:
    def __init__(
        self,
        fetcher: Fetcher,
        store: str,
        metadata_dir: Path,
        pinned: Callable[[], Sequence[Key]],
        timeout: float,
        count: Callable[[int], None],
    ) -> None:
        self.store = store
        self.dir = metadata_dir
        self._pinned = pinned
        self._downloads = _StoreDownloads(fetcher, timeout, count)

    def _url(self, role: str, version: int | None) -> str:
        return fetch.join(self.store, tuf_path(role, version))

    @property
    def timestamp_url(self) -> str:
        return self._url("timestamp", None)

    def trusted_timestamp(self) -> Metadata[Timestamp] | None:
        """The timestamp ngclient verified last, or None before the first."""
        try:
            return Metadata.from_bytes((self.dir / "timestamp.json").read_bytes())
        except (OSError, ValueError, tuf_exceptions.RepositoryError):
            return None

    def target(self, path: str, timestamp: bytes) -> TargetFile | None:
        """Refresh the metadata (with ``timestamp`` as just read from the store) and
        return the verified entry for ``path``, or None if the repository has none."""
        self.dir.mkdir(parents=True, exist_ok=True)
        bootstrap = None if (self.dir / "root.json").exists() else self._bootstrap()
        self._downloads.served = {self.timestamp_url: timestamp}
        try:
            updater = self._updater(bootstrap)
            updater.refresh()
            return updater.get_targetinfo(path)
        except tuf_exceptions.ExpiredMetadataError as exc:
            raise StaleError(f"TUF metadata: {exc}") from None
        except tuf_exceptions.RepositoryError as exc:
            raise refusal(exc) from None
        except tuf_exceptions.DownloadError as exc:
            raise FetchError(f"TUF metadata: {exc}") from None
        except (sslib_exceptions.Error, KeyError, TypeError, ValueError) as exc:
            # What a signature's fields make a key's check raise besides "unverified"
            # (a gpg signature without other_headers, or headers not hex): the store's
            # metadata is not what a publisher signs.
            raise RefusalError(Reason.MALFORMED, f"TUF metadata: {type(exc).__name__}: {exc}") from None
        finally:
            self._downloads.served = {}

    def _updater(self, bootstrap: bytes | None) -> Updater:
        """ngclient's updater from the root trusted here, or from ``bootstrap``. A
        trusted root on disk that does not load (a file cut short, a disk's error) was
        this host's, not the store's: trust starts again from the pinned keys, as on
        the first poll, instead of every poll refusing the store for it."""
        try:
            return self._new_updater(bootstrap)
        except (tuf_exceptions.RepositoryError, ValueError, OSError) as exc:
            if bootstrap is not None:
                raise  # the store's root
            log.event(
                "agent_tuf_reset", logging.WARNING, dir=str(self.dir), error=f"{type(exc).__name__}: {exc}"
            )
        shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        return self._new_updater(self._bootstrap())

    def _new_updater(self, bootstrap: bytes | None) -> Updater:
        return Updater(
            str(self.dir),
            fetch.join(self.store, TUF_PREFIX),
            fetcher=self._downloads,
            config=CONFIG,
            bootstrap=bootstrap,
        )

    def _bootstrap(self) -> bytes:
        """The store's first root signed by a threshold of the pinned keys."""
        pinned = {k.keyid: k for k in self._pinned()}
        for version in range(1, MAX_BOOTSTRAP_ROOTS + 1):
            try:
                data = self._downloads.read(self._url("root", version), CONFIG.root_max_length)
            except FetchError as exc:
                if exc.status in (403, 404):
                    break
                raise
            try:
                root: Metadata[Root] = Metadata.from_bytes(data)
            except (ValueError, tuf_exceptions.RepositoryError) as exc:  # DeserializationError is the latter
                raise RefusalError(Reason.MALFORMED, f"TUF root {version}: {exc}") from None
            # Any role's metadata parses: only a root names the root keys.
            role = root.signed.roles.get("root") if isinstance(root.signed, Root) else None
            if root.signed.version != version or role is None:
                raise RefusalError(Reason.MALFORMED, f"TUF root {version}: not root version {version}")
            good = 0
            for keyid in set(role.keyids) & pinned.keys():
                sig = root.signatures.get(keyid)
                if sig is None:
                    continue
                try:
                    pinned[keyid].verify_signature(sig, root.signed_bytes)
                    good += 1
                except (sslib_exceptions.Error, KeyError, TypeError, ValueError):
                    continue  # not a good signature, whatever its fields hold
            if good >= role.threshold:
                return data
        raise RefusalError(
            Reason.BAD_SIGNATURE,
            "no TUF root in the store is signed by a threshold of the pinned keys",
        )

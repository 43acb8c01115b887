"""The artifact store: a key -> bytes namespace laid out as SPEC says.

Backends implement reconciler.ports.Store: :class:`FilesystemStore` (a directory tree)
here and :class:`reconciler.adapters.s3.S3Store` (a bucket of an S3-compatible
service), a module of its own so that only an S3 store imports boto3;
reconciler.wiring picks one from the configuration. Every write is atomic: a reader
sees the old object or the whole new one, never a prefix. Every failure is a
:class:`StoreError` naming the key and the reason in one line.
"""

from __future__ import annotations

import builtins
import errno
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from reconciler.errors import ObjectTooLargeError, StoreError


def check_key(key: str) -> None:
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid store key {key!r}")


def check_prefix(prefix: str) -> None:
    """A listing prefix: like a key, but it may be empty or end in ``/``."""
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") else prefix)


TMP_PREFIX = ".tmp-"


class FilesystemStore:
    """A directory tree; serve it read-only over HTTP for agents."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key

    def _write(self, key: str, fill: object) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as out:
                    if isinstance(fill, Path):
                        with fill.open("rb") as src:
                            shutil.copyfileobj(src, out, 1 << 20)
                    else:
                        assert isinstance(fill, bytes)
                        out.write(fill)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dfd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise StoreError(f"cannot write {key} to {self.root}: {reason}") from None

    def put_file(self, key: str, path: Path) -> None:
        self._write(key, path)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, data)

    def copy(self, src: str, dst: str) -> None:
        """A hard link: the same bytes at no cost in space (objects are never written in
        place, so the two cannot drift apart); a copy where links are not possible."""
        source, target = self._path(src), self._path(dst)
        try:
            if target.exists() and os.path.samefile(source, target):
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / (TMP_PREFIX + secrets.token_hex(8))
            try:
                os.link(source, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                    raise
                self._write(dst, source)
                return
            try:
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _sync_dir(target.parent)
        except OSError as exc:
            reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise StoreError(f"cannot copy {src} to {dst} in {self.root}: {reason}") from None

    def create(self, key: str, data: bytes) -> bool:
        """The whole object is written to a temporary file first and then linked to
        ``key`` with link(2), which fails if the name exists: never a partial object,
        and atomic on local file systems and NFS alike (where O_EXCL was not always)."""
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o644)
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
            finally:
                Path(tmp).unlink(missing_ok=True)
            _sync_dir(target.parent)
        except OSError as exc:
            reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise StoreError(f"cannot create {key} in {self.root}: {reason}") from None
        return True

    def get_bytes(self, key: str, limit: int) -> bytes | None:
        try:
            with self._path(key).open("rb") as f:
                data = f.read(limit + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.root}: {exc.strerror}") from None
        if len(data) > limit:
            raise ObjectTooLargeError(f"cannot read {key} from {self.root}: larger than {limit} bytes")
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {key} in {self.root}: {exc.strerror or exc}") from None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def list(self, prefix: str = "") -> builtins.list[str]:
        check_prefix(prefix)
        # Walk only the deepest directory the prefix names; temporary files of
        # writes in progress are not objects.
        start = self.root / prefix.rpartition("/")[0]

        def fail(exc: OSError) -> None:
            raise StoreError(f"cannot list {prefix or '/'} in {self.root}: {exc.strerror or exc}")

        if not start.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(start, onerror=fail):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(TMP_PREFIX) and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        target = self._path(key)
        try:
            target.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {key} from {self.root}: {exc.strerror or exc}") from None

    def sweep(self) -> builtins.list[str]:
        """Remove the temporary files of writes that died (a kill mid-write)."""
        removed = []
        for tmp in sorted(self.root.rglob(TMP_PREFIX + "*")):
            try:
                if tmp.is_file():
                    tmp.unlink()
                    removed.append(tmp.relative_to(self.root).as_posix())
            except OSError as exc:
                raise StoreError(f"cannot remove {tmp}: {exc.strerror or exc}") from None
        return removed


def _sync_dir(path: Path) -> None:
    """A new name in ``path`` survives a crash once the directory is synced."""
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

"""The artifact store: a key -> bytes namespace laid out as SPEC says.

Backends implement :class:`Store`. Every write is atomic: a reader sees the old
object or the whole new one, never a prefix.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from reconciler.errors import StoreError


class Store(Protocol):
    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def exists(self, key: str) -> bool: ...
    def url(self, key: str) -> str: ...


def _check_key(key: str) -> None:
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"invalid store key {key!r}")


class FilesystemStore:
    """A directory tree; serve it read-only over HTTP for agents."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def _write(self, key: str, fill: object) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
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

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.root}: {exc.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

"""A checkout's definition files, read from disk for core.hosts.parse_fleet."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.core.hosts import SYMLINK, TOO_BIG, UNREADABLE
from reconciler.core.schema import MAX_FILE_BYTES
from reconciler.errors import ConfigError


def read_tree(root: Path) -> dict[str, str]:
    """Read hosts/, profiles/ and the names in packages/ of a checkout.

    Symlinks are refused wherever they point: a definition must live in the repo.
    A file that is a symlink, too large or unreadable is returned as a sentinel text
    so that :func:`parse_fleet` reports it against that file alone.
    """
    files: dict[str, str] = {}
    for sub in ("hosts", "profiles", "packages"):
        d = root / sub
        if d.is_symlink():
            raise ConfigError(sub, "", "is a symlink; definitions must live in the repository")
        if not d.is_dir():
            continue
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            # As GitSource.read_objects names it: a name that is not UTF-8 escaped.
            rel = f"{sub}/{os.fsencode(entry.name).decode(errors='backslashreplace')}"
            if sub == "packages":
                # Nix reads packages itself; we only need to know which exist.
                if entry.name.endswith(".nix"):
                    files[rel] = ""
                continue
            if not entry.name.endswith((".yaml", ".yml")):
                continue
            if entry.is_symlink():
                files[rel] = SYMLINK
                continue
            if entry.stat().st_size > MAX_FILE_BYTES:
                files[rel] = TOO_BIG
                continue
            try:
                files[rel] = Path(entry.path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                files[rel] = UNREADABLE + str(exc)
    return files


# Sentinels for files read_tree refused; parse_fleet turns them into errors so that a
# bad file costs only its own host.

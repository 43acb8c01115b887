"""Thin wrapper around nix-instantiate / nix-store for nix/fleet.nix.

The whole fleet is evaluated in one process; only when that fails is each host
evaluated alone, so that one broken host or package costs only itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import BuildError
from reconciler.hosts import Host

_HERE = Path(__file__).resolve().parent
# The Nix library: beside the package in a checkout (or an editable install), inside
# it as _nix in an installed wheel.
NIX_DIR = next(
    (d for d in (_HERE.parent / "nix", _HERE / "_nix") if (d / "fleet.nix").is_file()), _HERE.parent / "nix"
)
# Offline: no binary cache is reachable and none is wanted for reproducibility.
NIX_OPTIONS = ("--option", "substituters", "")
LOG_TAIL = 12


@dataclass(frozen=True)
class BuildOutput:
    derivation: str
    out: Path
    files: Mapping[str, Path]  # format -> artifact, named as it is published


@dataclass(frozen=True)
class Evaluation:
    images: Mapping[str, str]  # host -> image derivation path
    errors: Mapping[str, str]  # host -> why it could not be evaluated


def eval_key(host: Host, recipe: str) -> str:
    """What a host's image derivation is a function of: its normalised definition and
    ``recipe`` (the digest of every other input). Equal keys, equal derivations."""
    data = json.dumps(host.to_nix(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{recipe}\n{data}".encode()).hexdigest()


def _digest_files(root: Path, paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _tail(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-LOG_TAIL:]) or "no output"


class Nix:
    def __init__(
        self,
        state_dir: Path,
        toolchain: str = "debian",
        toolchain_dir: Path | None = None,
        nix_dir: Path = NIX_DIR,
    ) -> None:
        self.nix_dir = nix_dir
        self.toolchain = toolchain
        self.toolchain_dir = toolchain_dir or state_dir / "toolchain"
        self.gcroots = state_dir / "gcroots"
        self.work = state_dir / "work"
        self._toolchain_lock = threading.Lock()
        self._nix_version: str | None = None

    def ensure_toolchain(self) -> str | None:
        """Stage the Debian toolchain when missing or built from other sources, and
        return the digest of what is staged (None for the nixpkgs toolchain, whose
        content this side cannot know).

        A stamp beside the directory holds the digest of the sources it was staged
        from and of the staged files; a file lock keeps a daemon and a CLI call from
        staging it twice at once.
        """
        if self.toolchain != "debian":
            return None
        script = self.nix_dir / "toolchain" / "import-debian.sh"
        sources = _digest_files(self.nix_dir, [script, *(self.nix_dir / "runtime").rglob("*")])
        stamp = self.toolchain_dir.with_name(self.toolchain_dir.name + ".stamp")
        with self._toolchain_lock:
            self.toolchain_dir.parent.mkdir(parents=True, exist_ok=True)
            lock_path = self.toolchain_dir.with_name(self.toolchain_dir.name + ".lock")
            with lock_path.open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                recorded = stamp.read_text().split() if stamp.exists() else []
                if self.toolchain_dir.is_dir() and len(recorded) == 2 and recorded[0] == sources:
                    return recorded[1]
                proc = subprocess.run(
                    ["sh", str(script), str(self.toolchain_dir)], capture_output=True, text=True
                )
                if proc.returncode != 0:
                    raise BuildError("", f"toolchain import failed: {_tail(proc.stderr)}")
                # The staged binaries come from Debian packages, which can change
                # while our sources do not.
                content = _digest_files(self.toolchain_dir, self.toolchain_dir.rglob("*"))
                stamp.write_text(f"{sources}\n{content}\n")
                return content

    def recipe_digest(self) -> str | None:
        """Digest of everything besides the config repository that an image derivation
        depends on: the nix/ library, the staged toolchain and the Nix version. None
        when that cannot be known (nixpkgs toolchain)."""
        toolchain = self.ensure_toolchain()
        if toolchain is None:
            return None
        if self._nix_version is None:
            proc = subprocess.run(["nix-instantiate", "--version"], capture_output=True, text=True)
            self._nix_version = proc.stdout.strip()
        library = _digest_files(self.nix_dir, self.nix_dir.rglob("*"))
        return hashlib.sha256(f"{self._nix_version}\n{toolchain}\n{library}".encode()).hexdigest()

    def _args(self, fleet_file: Path, repo: Path) -> list[str]:
        args = [
            str(self.nix_dir / "fleet.nix"),
            *NIX_OPTIONS,
            "--argstr",
            "fleetFile",
            str(fleet_file),
            "--argstr",
            "repoDir",
            str(repo.resolve()),
        ]
        if self.toolchain == "debian":
            args += ["--argstr", "toolchainDir", str(self.toolchain_dir)]
        else:
            args += ["--arg", "toolchain", f"import {self.nix_dir / 'toolchain-nixpkgs.nix'} {{}}"]
        return args

    def write_fleet(self, hosts: Sequence[Host]) -> Path:
        """Write the normalised fleet for fleet.nix; the name is unique per content."""
        self.work.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"hosts": {h.name: h.to_nix() for h in hosts}}, sort_keys=True).encode()
        fd, tmp = tempfile.mkstemp(dir=self.work, prefix="fleet-", suffix=".json")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return Path(tmp)

    def evaluate(self, hosts: Sequence[Host], repo: Path) -> Evaluation:
        """Image derivation path of every host, in one evaluation when possible."""
        self.ensure_toolchain()
        if not hosts:
            return Evaluation(images={}, errors={})
        fleet_file = self.write_fleet(hosts)
        try:
            ok, out = self._eval_images(fleet_file, repo)
            if ok:
                return Evaluation(images=json.loads(out), errors={})
            if len(hosts) == 1:
                return Evaluation(images={}, errors={hosts[0].name: out})
            images: dict[str, str] = {}
            errors: dict[str, str] = {}
            for h in hosts:
                one = self.evaluate([h], repo)
                images.update(one.images)
                errors.update(one.errors)
            return Evaluation(images=images, errors=errors)
        finally:
            fleet_file.unlink(missing_ok=True)

    def eval_command(self, fleet_file: Path, repo: Path) -> list[str]:
        """The one nix-instantiate that evaluates every host of ``fleet_file`` to its image
        derivation, printed as JSON."""
        args = self._args(fleet_file, repo)
        return ["nix-instantiate", "--eval", "--strict", "--json", "-A", "images", *args]

    def _eval_images(self, fleet_file: Path, repo: Path) -> tuple[bool, str]:
        proc = subprocess.run(self.eval_command(fleet_file, repo), capture_output=True, text=True)
        if proc.returncode != 0:
            return False, _tail(proc.stderr)
        return True, proc.stdout

    def build(self, host: Host, version: int, repo: Path) -> BuildOutput:
        """Build one host's release artifacts; the output is kept as a GC root."""
        self.ensure_toolchain()
        self.gcroots.mkdir(parents=True, exist_ok=True)
        fleet_file = self.write_fleet([host])
        attr = f'hosts."{host.name}".artifacts'
        root = self.gcroots / host.name
        try:
            inst = subprocess.run(
                [
                    "nix-instantiate",
                    "-A",
                    attr,
                    "--argstr",
                    "version",
                    str(version),
                    *self._args(fleet_file, repo),
                ],
                capture_output=True,
                text=True,
            )
        finally:
            fleet_file.unlink(missing_ok=True)
        if inst.returncode != 0:
            raise BuildError(host.name, f"evaluation failed: {_tail(inst.stderr)}")
        drv = inst.stdout.strip().splitlines()[-1]
        real = subprocess.run(
            ["nix-store", "--realise", drv, "--add-root", str(root), "--indirect", *NIX_OPTIONS],
            capture_output=True,
            text=True,
        )
        if real.returncode != 0:
            raise BuildError(host.name, _tail(real.stderr))
        out = Path(real.stdout.strip().splitlines()[-1])
        files = {}
        for entry in sorted(out.iterdir()):
            fmt = "aci" if entry.name.endswith(".aci") else "appimage"
            files[fmt] = entry
        missing = set(host.formats) - set(files)
        if missing:
            raise BuildError(host.name, f"build produced no {', '.join(sorted(missing))} artifact")
        return BuildOutput(derivation=drv, out=out, files=files)

"""Thin wrapper around nix-instantiate / nix-store for nix/fleet.nix.

The fleet is evaluated by ``nix.eval_workers`` processes at once, each over a shard
of the hosts (reconciler.core.evalwork); a shard that fails is cut in parts until
each failing host stands alone, so that one broken host or package costs only
itself. Each evaluation process has an address-space limit (``nix.eval_memory``).

The config repository is untrusted, so Nix sees it through three walls:
evaluation is restricted to the checkout, the Nix library, the staged toolchain
and the fleet file (no other path, no URL, no import from a derivation, no
search path from the environment); builds run in Nix's sandbox (checked by a
probe build, not assumed from a setting); and every message shown is redacted
(reconciler.nixlog). Each evaluation and build has a deadline, and a build's
closure a size limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.adapters.process import OutputTooLargeError, run_keeping, run_with_deadline
from reconciler.config import ImagesConfig, NixConfig, ReproducibilityConfig
from reconciler.core import builders as remote
from reconciler.core import derivations
from reconciler.core.appc import image_name
from reconciler.core.builders import Builder
from reconciler.core.evalwork import Batch, EvalWork, Failure
from reconciler.core.formats import Kind, kind_of, kinds
from reconciler.core.hosts import Host
from reconciler.core.model import BuildOutput, BuildProgress, Evaluation, PackageIds
from reconciler.core.nixlog import Redaction, build_failure, failed_derivation, last_line, redact, tail
from reconciler.core.reproducibility import (
    CHECK_LOCAL,
    MAX_LISTED,
    Entry,
    Mismatch,
    ReproCheck,
    compare,
    parse_check,
    summarise,
)
from reconciler.errors import BuildError

if TYPE_CHECKING:
    from reconciler.core.provenance import NixInputs

_PACKAGE = Path(__file__).resolve().parent.parent
# The Nix library: beside the package in a checkout (or an editable install), inside
# it as _nix in an installed wheel.
NIX_DIR = next(
    (d for d in (_PACKAGE.parent / "nix", _PACKAGE / "_nix") if (d / "fleet.nix").is_file()),
    _PACKAGE.parent / "nix",
)
# Offline: no binary cache is reachable and none is wanted for reproducibility.
NIX_OPTIONS = ("--option", "substituters", "")
# Nix 2.8's `nix` command, which `show-derivation` needs, is experimental.
NIX_COMMAND = ("nix", "--extra-experimental-features", "nix-command")
# Derivations check_offline reads with one `nix show-derivation` (some 1 KiB each).
SHOW_BATCH = 500
# Derivations a process remembers passing check_offline, those whose closure has no
# derivation it builds with the network at all: bounded, as an attacker's commits
# could make any number.
OFFLINE_CACHE = 4096
# Evaluation sees only what -I names (see Nix._search_path): restricted mode, no
# URL, no search path from nix.conf, and no builds while evaluating (a builder run
# by import-from-derivation would escape the build deadline and the output limit).
# What the operator's Nix configuration (nix.conf, NIX_CONFIG) may enable is
# switched off, as restricted mode does not cover it: experimental features (flakes'
# fetchTree copies any file the daemon reads into the store) and unsafe native code
# (builtins.exec runs any command as the daemon). Plugins too (whatever builtins they
# add, nix-plugins' exec among them), through the environment (_for_evaluation).
HERMETIC_OPTIONS = (
    "--option",
    "experimental-features",
    "",
    "--option",
    "allow-unsafe-native-code-during-evaluation",
    "false",
    "--option",
    "restrict-eval",
    "true",
    "--option",
    "allowed-uris",
    "",
    "--option",
    "allow-import-from-derivation",
    "false",
    "--option",
    "nix-path",
    "",
)
# The search path of an evaluation: no directory. builtins.fetchGit and fetchMercurial
# run git and hg from it, and what they are pointed at may be a repository committed to
# the config repository (a bare one is plain files): its configuration is the
# attacker's, and its submodules' URLs, which restricted mode never sees, reach any
# host. Not empty, which execvp takes for the working directory: /dev/null/git is no
# file anyone can create.
EVALUATION_PATH = "/dev/null"
# What this process keeps of a Nix command's standard error: where it began and its
# end, which holds the error. Evaluation prints whatever a package traces
# (builtins.trace of a megabyte, a thousand times), which nix.eval_memory does not bound.
STDERR_HEAD = 64 << 10
STDERR_TAIL = 1 << 20
# What this process reads of a Nix command's standard output: evaluation's JSON (some
# 100 bytes a host), derivations read SHOW_BATCH at a time. A package's strings reach
# it (a derivation's attributes): without a bound, one of hundreds of MB (within
# nix.eval_memory) was held by the daemon, and kept in its ledger.
MAX_OUTPUT = 64 << 20
# Beyond the build's own deadline, for Nix to report the timeout and exit.
EXIT_GRACE = 60.0
# What a builder sees of the machine only when it is not sandboxed.
PROBE_PATHS = ("/usr", "/home", "/root", "/var")
# Nothing is substituted on a builder: there is no binary cache, as here.
_NO_BUILDER_SUBSTITUTES = ("--option", "builders-use-substitutes", "false")
# The log a build may write before Nix stops it. A build's log reaches this process
# whole (the realisation's stderr, kept for the failure's tail and the gate's messages):
# without a limit, a package printing without end would fill the daemon's memory before
# the build deadline.
MAX_BUILD_LOG = 64 << 20
# A build directory Nix keeps (--keep-failed): <TMPDIR>/nix-build-<drv name>-<n>.
_BUILD_DIR = re.compile(r"nix-build-[A-Za-z0-9+._?=-]+\.drv-[0-9]+")
# What nix/toolchain/import-debian.sh records of the Debian packages it staged from.
DEBIAN_PACKAGES = "debian-packages.tsv"
# Nix's state directory (its database, the daemon's socket): Debian's nix-bin keeps it here.
NIX_STATE = Path("/nix/var/nix")


def _digest_files(root: Path, paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _tail(text: str) -> str:
    return tail([ln.strip() for ln in text.splitlines() if ln.strip()])


def _size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"


def _out_of_memory(stderr: str) -> bool:
    """Whether a failed nix-instantiate ran into its address-space limit: Nix's
    allocator (Boehm GC) warns before Nix reports it; other allocations throw."""
    return "GC Warning: Out of Memory!" in stderr or "std::bad_alloc" in stderr


@dataclass(frozen=True)
class _Attempt:
    """What one nix-instantiate over a batch of hosts gave: images, or why not."""

    images: dict[str, str] | None
    failure: Failure = Failure.ERROR
    reason: str = ""


def _environment() -> dict[str, str]:
    """The environment of every Nix process: the daemon's, without a search path
    (NIX_PATH entries would become readable to evaluation)."""
    return {k: v for k, v in os.environ.items() if k != "NIX_PATH"}


def _for_evaluation(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for an evaluation of the config repository's code: with NIX_CONFIG ending
    in ``plugin-files =`` (read last, before any plugin is loaded; on the command line
    Nix 2.8 takes the option too late once another --option is given), and a PATH
    that names no program (EVALUATION_PATH)."""
    return {
        **env,
        "NIX_CONFIG": env.get("NIX_CONFIG", "") + "\nplugin-files =",
        "PATH": EVALUATION_PATH,
    }


def _point(link: Path, target: str | None) -> None:
    """Make ``link`` a symlink to ``target`` (replaced whole), or remove it (None)."""
    if target is None:
        link.unlink(missing_ok=True)
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    tmp.replace(link)


def builds_through_daemon(env: Mapping[str, str] | None = None, state: Path = NIX_STATE) -> bool:
    """Whether Nix hands this process's builds to a nix-daemon: NIX_REMOTE says
    ``daemon`` or a ``unix://`` socket, or it is unset (``auto``) and this user cannot
    write the store's database, which is when Nix's auto store picks the daemon. The
    daemon then schedules them over its own builders (root's files, `reconciler
    builders`) and runs their ssh itself: this user need not read their keys."""
    remote = (os.environ if env is None else env).get("NIX_REMOTE", "auto")
    if remote == "daemon" or remote.startswith("unix://"):
        return True
    return remote == "auto" and not os.access(state / "db", os.W_OK)


def write_builders(
    builders: Sequence[Builder], directory: Path, machines: Sequence[Builder] | None = None
) -> Path:
    """Write the machines file (of ``machines``, default all), known hosts and ssh
    configuration of ``builders`` into ``directory`` (the ssh configuration names the
    known hosts there): the ssh configuration's path. Each file is replaced whole, mode
    0644: ssh refuses a configuration others may write, and none holds a secret (the
    key is a path)."""
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    known = directory.resolve() / "known_hosts"
    files = {
        "machines": remote.machines(builders if machines is None else machines),
        "known_hosts": remote.known_hosts(builders),
        "ssh_config": remote.ssh_config(builders, str(known)),
    }
    for name, text in files.items():
        # Per thread: the hosts of a pass build at once, each writing these first.
        tmp = directory / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(directory / name)
    return directory / "ssh_config"


class Nix:
    def __init__(
        self,
        state_dir: Path,
        settings: NixConfig | None = None,
        nix_dir: Path = NIX_DIR,
        builders: Sequence[Builder] = (),
        images: ImagesConfig | None = None,
        reproducibility: ReproducibilityConfig | None = None,
    ) -> None:
        self.settings = settings or NixConfig()
        self.images = images or ImagesConfig()
        self.reproducibility = reproducibility or ReproducibilityConfig()
        # Where diffoscope's reports of builds that differ are kept.
        self.reports = state_dir / "reproducibility"
        self.builders = tuple(builders)
        self.builders_dir = state_dir / "builders"
        self.nix_dir = nix_dir
        self.toolchain = self.settings.toolchain
        self.toolchain_dir = self.settings.toolchain_dir or state_dir / "toolchain"
        self.gcroots = state_dir / "gcroots"
        self.work = state_dir / "work"
        self._toolchain_lock = threading.Lock()
        self._nix_version: str | None = None
        # Until a probe build says otherwise, a builder's output may have seen anything.
        self.sandboxed = False
        # Each remote builder's last sandbox probe (probe_builders), by name.
        self._probes: dict[str, remote.Probe] = {}
        self._probe_lock = threading.Lock()
        # Derivations whose closure check_offline passed (insertion order: oldest first).
        self._offline: dict[str, None] = {}
        self._offline_lock = threading.Lock()
        self.env = _environment()
        workers = self.settings.eval_workers
        self.eval_workers = len(os.sched_getaffinity(0)) if workers == "auto" else workers
        # nix-instantiate processes run by evaluate() so far: more than the shards
        # means some were narrowed down after a failure.
        self.evaluations = 0
        if self.toolchain == "nixpkgs":
            # nixpkgs comes from the operator's search path; it becomes readable too.
            self.env = dict(os.environ)

    def _run(
        self,
        args: Sequence[str],
        timeout: float,
        what: str,
        host: str = "",
        env: dict[str, str] | None = None,
        memory: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Nix command with a deadline and, given ``memory``, that much address
        space (prlimit sets it before Nix starts; a preexec_fn would not be safe in a
        process with threads)."""
        env = env or self.env
        limit = [self._program("prlimit", env), f"--as={memory}", "--"] if memory is not None else []
        if args[0] == "nix-instantiate":
            # Every evaluation of the config repository's code; found where the daemon
            # finds it, as evaluation's PATH finds nothing.
            args = [self._program(args[0], env), *args[1:]]
            env = _for_evaluation(env)
        try:
            return run_keeping(
                [*limit, *args],
                env=env,
                timeout=timeout,
                stderr_head=STDERR_HEAD,
                stderr_tail=STDERR_TAIL,
                stdout_limit=MAX_OUTPUT,
            )
        except subprocess.TimeoutExpired:
            raise BuildError(host, f"{what} took longer than {round(timeout)}s and was stopped") from None
        except OutputTooLargeError:
            raise BuildError(host, f"{what} printed more than {_size(MAX_OUTPUT)} and was stopped") from None

    @staticmethod
    def _program(name: str, env: Mapping[str, str]) -> str:
        """Where ``env``'s PATH finds ``name`` (as ``name``, failing to start as it would
        have, when it finds none)."""
        return shutil.which(name, path=env.get("PATH", os.defpath)) or name

    def redaction(self, repo: Path) -> Redaction:
        labels = {
            str(self.nix_dir.resolve()): "<reconciler nix>",
            str(self.toolchain_dir.resolve()): "<toolchain>",
        }
        return Redaction(repo=str(repo.resolve()), labels=labels)

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
        sources = self._toolchain_sources
        stamp = self.toolchain_dir.with_name(self.toolchain_dir.name + ".stamp")
        with self._toolchain_lock:
            self.toolchain_dir.parent.mkdir(parents=True, exist_ok=True)
            lock_path = self.toolchain_dir.with_name(self.toolchain_dir.name + ".lock")
            with lock_path.open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                recorded = stamp.read_text().split() if stamp.exists() else []
                if self.toolchain_dir.is_dir() and len(recorded) == 2 and recorded[0] == sources:
                    return recorded[1]
                script = [str(self._toolchain_script), str(self.toolchain_dir)]
                proc = subprocess.run(["sh", *script], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise BuildError("", f"toolchain import failed: {_tail(proc.stderr)}")
                # The staged binaries come from Debian packages, which can change
                # while our sources do not.
                content = _digest_files(self.toolchain_dir, self.toolchain_dir.rglob("*"))
                stamp.write_text(f"{sources}\n{content}\n")
                return content

    @functools.cached_property
    def _toolchain_sources(self) -> str:
        """The digest of what the toolchain is staged from: files of this package, read
        once (every evaluation checks the toolchain; a new version of them comes with a
        new process)."""
        runtime = (self.nix_dir / "runtime").rglob("*")
        return _digest_files(self.nix_dir, [self._toolchain_script, *runtime])

    @property
    def _toolchain_script(self) -> Path:
        """What stages the Debian toolchain (and, with the runtime's sources, is what it
        is staged from)."""
        return self.nix_dir / "toolchain" / "import-debian.sh"

    def recipe_digest(self) -> str | None:
        """Digest of everything besides the config repository that an image derivation
        depends on: the nix/ library, the staged toolchain and the Nix version. None
        when that cannot be known (nixpkgs toolchain)."""
        toolchain = self.ensure_toolchain()
        if toolchain is None:
            return None
        library = _digest_files(self.nix_dir, self.nix_dir.rglob("*"))
        return hashlib.sha256(f"{self._evaluator()}\n{toolchain}\n{library}".encode()).hexdigest()

    def _evaluator(self) -> str:
        """Which nix-instantiate evaluates: its resolved path and its file's identity.
        Any change of the binary (an upgrade, a rebuild of the same version) changes
        it, and reading it costs no process: asking the version does (a tenth of what
        a warm plan of 1,000 hosts may take)."""
        found = shutil.which("nix-instantiate", path=self.env.get("PATH"))
        if found is None:
            return "nix-instantiate: not found"
        path = os.path.realpath(found)
        st = os.stat(path)
        return f"{path} {st.st_dev}:{st.st_ino} {st.st_size} {st.st_mtime_ns}"

    def nix_version(self) -> str:
        """What ``nix-instantiate --version`` says, e.g. ``nix-instantiate (Nix) 2.8.0``."""
        if self._nix_version is None:
            proc = subprocess.run(["nix-instantiate", "--version"], capture_output=True, text=True)
            self._nix_version = proc.stdout.strip()
        return self._nix_version

    def inputs(self, host: Host, drv: str) -> NixInputs:
        """What went into building ``drv``, for its provenance: every store path of its
        closure (each output built or used, and the sources) with its NAR's sha256, the
        Nix version, the Nix library and the toolchain by digest, and the Debian packages
        the toolchain was staged from. Read from Nix's database: nothing is hashed again."""
        # Here, not above: provenance brings the store's layout, which a plan does not use.
        from reconciler.core.provenance import (
            DebianPackage,
            NixInputs,
            parse_debian_packages,
            parse_registrations,
        )

        deadline = self.settings.eval_timeout.total_seconds()
        req = self._run(
            ["nix-store", "--query", "--requisites", "--include-outputs", drv],
            deadline,
            "provenance",
            host.name,
        )
        paths = [p for p in req.stdout.split() if not p.endswith(".drv")]
        db = self._run(["nix-store", "--dump-db", *paths], deadline, "provenance", host.name)
        outputs = self._run(["nix-store", "--query", "--outputs", drv], deadline, "provenance", host.name)
        if req.returncode != 0 or db.returncode != 0 or outputs.returncode != 0:
            why = _tail(req.stderr + db.stderr + outputs.stderr)
            raise BuildError(host.name, f"cannot read the build's closure: {why}")
        try:
            closure = parse_registrations(db.stdout)
        except ValueError as exc:
            raise BuildError(
                host.name, f"cannot read the build's closure: nix-store --dump-db: {exc}"
            ) from None
        toolchain = self.ensure_toolchain()
        packages: tuple[DebianPackage, ...] = ()
        if self.toolchain == "debian":
            listing = self.toolchain_dir / DEBIAN_PACKAGES
            try:
                packages = parse_debian_packages(listing.read_text())
            except OSError as exc:
                raise BuildError(host.name, f"toolchain {listing}: {exc.strerror} (stage it again)") from None
            except ValueError as exc:
                raise BuildError(host.name, f"toolchain {listing}: {exc} (stage it again)") from None
        return NixInputs(
            nix_version=self.nix_version().rsplit(" ", 1)[-1],
            library_digest=_digest_files(self.nix_dir, self.nix_dir.rglob("*")),
            toolchain=self.toolchain,
            toolchain_digest=toolchain,
            debian_packages=packages,
            closure=closure,
            outputs=tuple(outputs.stdout.split()),
        )

    def _search_path(self, *allowed: Path) -> list[str]:
        """-I entries: in restricted mode, the only paths evaluation may read."""
        paths = [self.nix_dir, *allowed]
        if self.toolchain == "debian":
            paths.append(self.toolchain_dir)
        return [arg for p in paths for arg in ("-I", str(p.resolve()))]

    def _toolchain_args(self) -> list[str]:
        if self.toolchain == "debian":
            return ["--argstr", "toolchainDir", str(self.toolchain_dir.resolve())]
        return ["--arg", "toolchain", f"import {self.nix_dir / 'toolchain-nixpkgs.nix'} {{}}"]

    def _args(self, fleet_file: Path, repo: Path) -> list[str]:
        return [
            str(self.nix_dir / "fleet.nix"),
            *NIX_OPTIONS,
            *HERMETIC_OPTIONS,
            *self._search_path(repo, fleet_file),
            "--argstr",
            "fleetFile",
            str(fleet_file.resolve()),
            "--argstr",
            "repoDir",
            str(repo.resolve()),
            *self._toolchain_args(),
        ]

    def _build_options(self) -> list[str]:
        """Options of every realisation: sandbox as configured (a Nix daemon decides
        for clients it does not trust; the probe tells), and with no fallback to an
        unsandboxed build where Nix cannot set one up (the probe passed, and a later
        build is refused instead); the deadline, and how much log a build may write
        (MAX_BUILD_LOG)."""
        timeout = str(round(self.settings.build_timeout.total_seconds()))
        sandbox = "true" if self.settings.sandbox else "false"
        return [
            *NIX_OPTIONS,
            *("--option", "sandbox", sandbox, "--option", "sandbox-fallback", "false"),
            *("--option", "timeout", timeout),
            *("--option", "max-build-log-size", str(MAX_BUILD_LOG)),
        ]

    def probe_sandbox(self, key_dir: Path) -> bool:
        """Whether builds run in Nix's sandbox here, found by building a derivation
        that looks for what only an unsandboxed builder sees: the machine's own
        directories and the signing key's. Built anew each time (a nonce): a
        setting may have changed since the last probe."""
        self.sandboxed = self._probe(key_dir, "local", [], None)
        return self.sandboxed

    def probe_builders(self, key_dir: Path) -> dict[str, remote.Probe]:
        """Probe the sandbox of each remote builder that is due (core.builders.to_probe)
        with the probe build of probe_sandbox, sent to that builder alone: what each
        probe found, by builder. Later builds go only to the builders core.builders.usable
        allows. Nothing when a nix-daemon builds for this process: it takes no builders
        from it (they are root's, `reconciler builders`), and it schedules the start's
        probe itself."""
        if not self.builders or builds_through_daemon(self.env):
            return {}
        with self._probe_lock:
            due = remote.to_probe(self.builders, self._probes, time.monotonic())
            if not due:
                return {}
            # The machines file as builds use it now: a build may be reading it.
            env = self._builders_env(self._listed())
            found: dict[str, remote.Probe] = {}
            for b in due:
                only = ["--builders", remote.machines([b]).strip(), "--max-jobs", "0"]
                try:
                    on = self._probe(key_dir, b.name, [*only, *_NO_BUILDER_SUBSTITUTES], env)
                except BuildError as exc:
                    # What Nix said of the builder (and ssh before it), else how the probe failed.
                    why = f"sandbox probe: {exc.refused[b.name]}" if b.name in exc.refused else exc.reason
                    found[b.name] = remote.Probe(time.monotonic(), remote.Sandbox.UNKNOWN, why)
                    continue
                verdict = remote.Sandbox.ON if on else remote.Sandbox.OFF
                found[b.name] = remote.Probe(time.monotonic(), verdict)
            self._probes.update(found)
            return found

    def _listed(self) -> list[Builder]:
        """The builders the machines file lists (core.builders.usable; _probe_lock held)."""
        return remote.usable(self.builders, self._probes, not self.settings.sandbox)[0]

    def _probe(self, key_dir: Path, where: str, extra: list[str], env: dict[str, str] | None) -> bool:
        self.ensure_toolchain()
        inst = self._run(
            [
                "nix-instantiate",
                str(self.nix_dir / "probe.nix"),
                *NIX_OPTIONS,
                *HERMETIC_OPTIONS,
                *self._search_path(),
                *self._toolchain_args(),
                "--argstr",
                "nonce",
                f"{where}-{time.time_ns()}-{os.getpid()}",
                "--argstr",
                "paths",
                " ".join((*PROBE_PATHS, str(key_dir.resolve()))),
            ],
            self.settings.eval_timeout.total_seconds(),
            "the sandbox probe's evaluation",
        )
        if inst.returncode != 0:
            raise BuildError("", f"sandbox probe: evaluation failed: {_tail(inst.stderr)}")
        real = self._run(
            ["nix-store", "--realise", inst.stdout.strip(), *self._build_options(), *extra],
            self.settings.build_timeout.total_seconds() + EXIT_GRACE,
            "the sandbox probe's build",
            env=env,
        )
        if real.returncode != 0:
            refused = remote.placement(real.stderr, self.builders).refused
            raise BuildError("", f"sandbox probe: build failed: {_tail(real.stderr)}", refused=dict(refused))
        verdict = Path(real.stdout.strip().splitlines()[-1]).read_text().strip()
        return verdict == "sandboxed"

    def write_fleet(self, hosts: Sequence[Host], packages: Sequence[str] = ()) -> Path:
        """Write the normalised fleet for fleet.nix (and ``packages`` to evaluate
        besides the hosts'); the name is unique per content."""
        self.work.mkdir(parents=True, exist_ok=True)
        # Of each host's canonical JSON, which the pass has computed for its key.
        members = ",".join(f"{json.dumps(h.name)}:{h.nix_json}" for h in hosts)
        wanted = f',"packages":{json.dumps(list(packages))}' if packages else ""
        data = f'{{"hosts":{{{members}}}{wanted}}}'.encode()
        fd, tmp = tempfile.mkstemp(dir=self.work, prefix="fleet-", suffix=".json")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return Path(tmp)

    def evaluate(self, hosts: Sequence[Host], repo: Path) -> Evaluation:
        """Image derivation path of every host, or why it has none: shards evaluated by
        ``eval_workers`` processes at once, a failed one narrowed down to its failing
        hosts; the result is that of one evaluation (reconciler.core.evalwork)."""
        self.ensure_toolchain()
        by_name = {h.name: h for h in hosts}
        work = EvalWork(by_name, self.eval_workers)
        with ThreadPoolExecutor(self.eval_workers, thread_name_prefix="nix-eval") as pool:

            def submit(batch: Batch) -> Future[_Attempt]:
                return pool.submit(self._attempt, [by_name[n] for n in batch], repo)

            running = {submit(batch): batch for batch in work.initial}
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    batch = running.pop(future)
                    attempt = future.result()
                    self.evaluations += 1
                    if attempt.images is not None:
                        work.succeeded(batch, attempt.images)
                        continue
                    for part in work.failed(batch, attempt.failure, attempt.reason):
                        running[submit(part)] = part
        return work.result()

    def _attempt(self, hosts: Sequence[Host], repo: Path) -> _Attempt:
        """One nix-instantiate over ``hosts``, within the deadline and memory limit."""
        fleet_file = self.write_fleet(hosts)
        try:
            proc = self._run(
                self.eval_command(fleet_file, repo),
                self.settings.eval_timeout.total_seconds(),
                "evaluation",
                memory=self.settings.eval_memory,
            )
        except BuildError as exc:
            return _Attempt(None, Failure.TIMEOUT, exc.reason)
        finally:
            fleet_file.unlink(missing_ok=True)
        if proc.returncode == 0:
            images: dict[str, str] = json.loads(proc.stdout)
            return _Attempt(images)
        if _out_of_memory(proc.stderr):
            return _Attempt(None, Failure.MEMORY, self._memory_error())
        return _Attempt(None, Failure.ERROR, redact(proc.stderr, self.redaction(repo)))

    def _memory_error(self) -> str:
        limit = _size(self.settings.eval_memory)
        return f"evaluation needed more memory than nix.eval_memory ({limit}) and was stopped"

    def package_ids(self, names: Sequence[str], repo: Path) -> PackageIds:
        """What each package of ``names`` gives an image (fleet.nix's packageIds): one
        evaluation of the packages alone, no host; after a failure, each package alone,
        to say which does not evaluate and why (as its hosts would fail)."""
        self.ensure_toolchain()
        if not names:
            return PackageIds({}, {})
        fleet_file = self.write_fleet([], names)
        try:
            proc = self._run(
                [
                    "nix-instantiate",
                    "--eval",
                    "--strict",
                    "--json",
                    "-A",
                    "packageIds",
                    *self._args(fleet_file, repo),
                ],
                self.settings.eval_timeout.total_seconds(),
                "evaluation",
                memory=self.settings.eval_memory,
            )
        except BuildError as exc:
            # Past its deadline (or its output's bound): found alone, as any failure.
            proc, why, limited = None, exc.reason, True
        finally:
            fleet_file.unlink(missing_ok=True)
        if proc is not None and proc.returncode == 0:
            return PackageIds(json.loads(proc.stdout), {})
        if proc is not None:
            limited = _out_of_memory(proc.stderr)
            why = self._memory_error() if limited else redact(proc.stderr, self.redaction(repo))
        if len(names) == 1:
            return PackageIds({}, {names[0]: why}, frozenset(names) if limited else frozenset())
        alone = [self.package_ids([n], repo) for n in names]
        return PackageIds(
            {k: v for one in alone for k, v in one.ids.items()},
            {k: v for one in alone for k, v in one.failed.items()},
            frozenset(k for one in alone for k in one.limited),
        )

    def eval_command(self, fleet_file: Path, repo: Path) -> list[str]:
        """The one nix-instantiate that evaluates every host of ``fleet_file`` to its image
        derivation, printed as JSON."""
        args = self._args(fleet_file, repo)
        return ["nix-instantiate", "--eval", "--strict", "--json", "-A", "images", *args]

    def _aci(self, host: Host) -> str:
        """What the ACI manifest says beside the host's definition (nix/host.nix): its
        name under the configured prefix and the annotations. Only the release step
        reads it, so the image derivation, and with it change detection, does not."""
        return json.dumps(
            {
                "name": image_name(self.images.name_prefix, host.name),
                "annotations": [{"name": k, "value": v} for k, v in self.images.annotations],
            },
            sort_keys=True,
        )

    def instantiate(self, host: Host, version: int, repo: Path) -> str:
        """The derivation of ``host``'s release artifacts as ``version``; builds nothing."""
        self.ensure_toolchain()
        fleet_file = self.write_fleet([host])
        attr = f'hosts."{host.name}".artifacts'
        try:
            inst = self._run(
                [
                    "nix-instantiate",
                    "-A",
                    attr,
                    "--argstr",
                    "version",
                    str(version),
                    "--argstr",
                    "aci",
                    self._aci(host),
                    *self._args(fleet_file, repo),
                ],
                self.settings.eval_timeout.total_seconds(),
                "evaluation",
                host.name,
                memory=self.settings.eval_memory,
            )
        finally:
            fleet_file.unlink(missing_ok=True)
        if inst.returncode != 0 and _out_of_memory(inst.stderr):
            raise BuildError(host.name, self._memory_error())
        if inst.returncode != 0:
            raise BuildError(host.name, f"evaluation failed: {redact(inst.stderr, self.redaction(repo))}")
        return inst.stdout.strip().splitlines()[-1]

    def _builders_env(self, machines: Sequence[Builder]) -> dict[str, str]:
        """The builders' files in the state dir, written anew before each build (the
        config may have changed since), the machines file of ``machines``: the
        environment whose ssh runs with their configuration."""
        ssh_config = write_builders(self.builders, self.builders_dir, machines)
        return {**self.env, "NIX_SSHOPTS": f"-F {ssh_config.resolve()}"}

    def _builder_args(self, host: str) -> tuple[list[str], dict[str, str] | None]:
        """Options and environment that hand a realisation's builds to Nix's remote
        builders: Nix schedules them over the machines file and copies outputs back.
        Only the builders whose sandbox a probe verified are listed (probe_builders),
        unless a nix-daemon builds for this process (it uses its own). Nothing is
        substituted on a builder (no binary cache, as here); ssh runs with the
        generated configuration only (-F): the builders' host keys and no other, no
        prompt. BuildError when no machine may build ``host``."""
        if not self.builders:
            return [], None
        listed: Sequence[Builder] = self.builders
        if not builds_through_daemon(self.env):
            with self._probe_lock:
                listed, why = remote.usable(self.builders, self._probes, not self.settings.sandbox)
            if not listed and not self.settings.local_builds:
                said = "; ".join(f"builder {name}: {reason}" for name, reason in sorted(why.items()))
                raise BuildError(host, f"no builder may build it (nix.local_builds is false): {said}")
        env = self._builders_env(listed)
        args = ["--builders", f"@{(self.builders_dir / 'machines').resolve()}", *_NO_BUILDER_SUBSTITUTES]
        if not self.settings.local_builds:
            args += ["--max-jobs", "0"]
        return args, env

    def realise(
        self, host: Host, drv: str, repo: Path, root: str, progress: BuildProgress | None = None
    ) -> BuildOutput:
        """Build ``drv`` (from :meth:`instantiate`), on a remote builder when Nix picks
        one; the output is kept as the GC root ``root`` (the pass's per host, another
        for ``reconciler build``). While it runs, ``progress`` is told every
        ``nix.heartbeat`` seconds how long it has run and its output's last line."""
        self.check_offline(host.name, drv)
        self.gcroots.mkdir(parents=True, exist_ok=True)
        link = self.gcroots / root
        kept = os.readlink(link) if link.is_symlink() else None
        extra, env = self._builder_args(host.name)
        how = self.redaction(repo)

        def beat(seconds: float, output: str) -> None:
            if progress is not None:
                progress(seconds, last_line(output, how, unsandboxed_build=not self.sandboxed))

        real = self._build(
            [
                "nix-store",
                "--realise",
                drv,
                "--add-root",
                str(self.gcroots / root),
                "--indirect",
                *self._build_options(),
                *extra,
            ],
            host.name,
            env,
            beat,
        )
        where = remote.placement(real.stderr, self.builders)
        refused = {name: redact(why, how) for name, why in where.refused.items()}
        # Where the image was built; of a failed build, where the derivation that failed
        # (a package's, say) ran: the image's never did.
        last = drv if real.returncode == 0 else failed_derivation(real.stderr) or drv
        builder = next((name for name, drvs in where.built.items() if last in drvs), None)
        if real.returncode != 0:
            reason = build_failure(real.stderr, how, unsandboxed_build=not self.sandboxed)
            if refused and builder is None:
                # Say first which builders could not take it: that is what to fix.
                down = "; ".join(f"builder {name} refused: {why}" for name, why in sorted(refused.items()))
                reason = f"{down}; {reason}"
            elif builder is not None and builder != remote.LOCAL:
                # Nix's words do not say which machine (its "builder" is the build's program).
                reason = f"on builder {builder}: {reason}"
            raise BuildError(host.name, reason, builder=builder, refused=refused)
        try:
            self._check_size(host.name, drv)
        except BuildError:
            # Nix rooted what it built: a refused build is not kept from the collector,
            # the build the root held before is.
            _point(link, kept)
            raise
        out = Path(real.stdout.strip().splitlines()[-1])
        built: dict[Kind, list[Path]] = {}
        for entry in sorted(out.iterdir()):
            kind = kind_of(entry.name)
            if kind is not None:
                built.setdefault(kind, []).append(entry)
        wanted = kinds(host.formats)
        missing = [k for k in wanted if k not in built]
        if missing:
            raise BuildError(host.name, f"build produced no {', '.join(missing)} artifact")
        several = [k for k in wanted if len(built[k]) > 1]
        if several:
            raise BuildError(host.name, f"build produced more than one {', '.join(several)} artifact")
        files = {k.value: built[k][0] for k in wanted}
        return BuildOutput(derivation=drv, out=out, files=files, builder=builder, refused=refused)

    def _build(
        self, args: list[str], host: str, env: dict[str, str] | None, beat: Callable[[float, str], None]
    ) -> subprocess.CompletedProcess[str]:
        """Run a realisation to its end or its deadline, calling ``beat`` with the
        seconds so far and the output so far every ``nix.heartbeat`` seconds: a long
        build is not silent."""
        timeout = self.settings.build_timeout.total_seconds() + EXIT_GRACE
        started = time.monotonic()
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env or self.env,
            # A build's log is the package's to write: any bytes, not all UTF-8.
            text=True,
            errors="replace",
        )
        with proc:
            while True:
                left = started + timeout - time.monotonic()
                try:
                    out, err = proc.communicate(timeout=max(0.0, min(self.settings.heartbeat, left)))
                    break
                except subprocess.TimeoutExpired as exc:
                    if time.monotonic() - started >= timeout:
                        proc.kill()
                        proc.communicate()
                        raise BuildError(
                            host, f"the build took longer than {round(timeout)}s and was stopped"
                        ) from None
                    # What communicate() read so far (it keeps it for the next call).
                    so_far = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
                    beat(time.monotonic() - started, so_far)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def check_offline(self, host: str, drv: str) -> None:
        """Fail ``host`` before anything of ``drv``'s closure is built if Nix would build
        a derivation of it with the network or outside its sandbox (core.derivations):
        a fixed-output derivation's builder has the network, whatever the sandbox.

        The closure's derivations are read SHOW_BATCH at a time, so that a package
        defining a great many holds only so much of Nix's output in memory at once,
        and all within nix.eval_timeout."""
        with self._offline_lock:
            if drv in self._offline:
                return
        timeout = self.settings.eval_timeout.total_seconds()
        end = time.monotonic() + timeout
        what = "reading the build's derivations"

        def run(args: list[str]) -> str:
            left = end - time.monotonic()
            try:
                done = self._run(args, left, what, host)
            except BuildError:
                raise BuildError(host, f"{what} took longer than {round(timeout)}s and was stopped") from None
            if done.returncode != 0:
                raise BuildError(host, f"cannot read the build's derivations: {_tail(done.stderr)}")
            return done.stdout

        closure = [
            p for p in run(["nix-store", "--query", "--requisites", drv]).split() if p.endswith(".drv")
        ]
        found: list[derivations.Derivation] = []
        for at in range(0, len(closure), SHOW_BATCH):
            try:
                found += derivations.parse_shown(
                    run([*NIX_COMMAND, "show-derivation", *closure[at : at + SHOW_BATCH]])
                )
            except ValueError as exc:
                raise BuildError(host, f"cannot read the build's derivations: {exc}") from None
        drvs = tuple(found)
        outputs = [out for d in derivations.networked(drvs) for out in d.outputs]
        invalid = (
            run(["nix-store", "--check-validity", "--print-invalid", *outputs]).split() if outputs else []
        )
        why = derivations.refusal(drvs, frozenset(outputs) - set(invalid))
        if why is not None:
            raise BuildError(host, why)
        if outputs:
            return  # passed as those outputs are in the store: they may be collected since
        with self._offline_lock:
            self._offline[drv] = None
            while len(self._offline) > OFFLINE_CACHE:
                del self._offline[next(iter(self._offline))]

    def _check_size(self, host: str, drv: str) -> None:
        """Fail ``host`` when its build closure (every output it built or used, and
        its sources) is larger than the limit. Nix 2.8 has no limit during a build;
        the build deadline bounds what one can write meanwhile."""
        deadline = self.settings.eval_timeout.total_seconds()
        req = self._run(
            ["nix-store", "--query", "--requisites", "--include-outputs", drv], deadline, "sizing", host
        )
        paths = [p for p in req.stdout.split() if not p.endswith(".drv")]
        sizes = self._run(["nix-store", "--query", "--size", *paths], deadline, "sizing", host)
        if req.returncode != 0 or sizes.returncode != 0:
            raise BuildError(host, "cannot measure the build's size")
        total = sum(int(n) for n in sizes.stdout.split())
        limit = self.settings.max_output_size
        if total > limit:
            raise BuildError(
                host, f"the build's closure is {total} bytes, over nix.max_output_size ({limit} bytes)"
            )

    def check_reproducible(
        self, host: Host, drv: str, repo: Path, skip: frozenset[str] = frozenset()
    ) -> ReproCheck:
        """Build every derivation of ``drv``'s closure a second time (but those in
        ``skip``, reproduced before) and compare with the outputs in the store, bit for
        bit: Nix's --check, sandboxed and offline as every build, on this machine even
        with ``nix.local_builds: false`` (a builder would not build it again). A second
        build that differs is described (``Mismatch.summary``) and then removed; a
        check that cannot run raises BuildError."""
        deadline = self.settings.eval_timeout.total_seconds()
        req = self._run(
            ["nix-store", "--query", "--requisites", drv], deadline, "reproducibility check", host.name
        )
        if req.returncode != 0:
            raise BuildError(
                host.name, f"reproducibility check: cannot read the closure: {_tail(req.stderr)}"
            )
        closure = tuple(p for p in req.stdout.split() if p.endswith(".drv"))
        todo = [p for p in closure if p not in skip]
        if not todo:
            return ReproCheck(derivations=closure, rebuilt=(), where=CHECK_LOCAL)
        self.check_offline(host.name, drv)
        extra, env = self._builder_args(host.name)
        # An output of the closure collected since the build (only the artifacts are a
        # GC root) is built again first: --check compares with what is in the store.
        real = self._build(
            ["nix-store", "--realise", *todo, *self._build_options(), *extra], host.name, env, _quiet
        )
        if real.returncode != 0:
            why = build_failure(real.stderr, self.redaction(repo), unsandboxed_build=not self.sandboxed)
            raise BuildError(host.name, f"reproducibility check: the closure does not build: {why}")
        # Here, never through the build hook: Nix 2.8 hands a --check to a remote builder
        # when --max-jobs is 0, and the builder, whose output is valid already, passes it
        # without building again (tests/integration/test_builders.py).
        jobs = ["--option", "builders", ""] + ([] if self.settings.local_builds else ["--max-jobs", "1"])
        tmp = Path(self.env.get("TMPDIR", "/tmp")).resolve()
        before = _build_dirs(tmp)
        check = self._build(
            [
                "nix-store",
                "--realise",
                "--check",
                "--keep-going",
                "--keep-failed",
                *todo,
                *self._build_options(),
                *jobs,
            ],
            host.name,
            None,
            _quiet,
        )
        # A build's log is on the same stderr: only what names an output of these
        # derivations, and a build directory where Nix makes them, is taken from it.
        outcome = parse_check(check.stderr)
        outputs = self._outputs(host, todo) if outcome.mismatches else frozenset()
        mismatches = [m for m in outcome.mismatches if m.output in outputs and m.derivation in todo]
        kept = kept_build_dirs(outcome.kept_dirs, tmp, before, todo)
        try:
            if check.returncode == 0:
                return ReproCheck(derivations=closure, rebuilt=tuple(todo), where=CHECK_LOCAL)
            if not mismatches:
                why = build_failure(check.stderr, self.redaction(repo), unsandboxed_build=not self.sandboxed)
                raise BuildError(host.name, f"reproducibility check: the second build failed: {why}")
            described = tuple(
                Mismatch(m.derivation, m.output, m.check, self._describe(m)) for m in mismatches
            )
            return ReproCheck(derivations=(), rebuilt=(), where=CHECK_LOCAL, mismatches=described)
        finally:
            for m in mismatches:
                _remove(Path(m.output + ".check"))
            for d in kept:
                _remove(d)

    def _outputs(self, host: Host, drvs: Sequence[str]) -> frozenset[str]:
        proc = self._run(
            ["nix-store", "--query", "--outputs", *drvs],
            self.settings.eval_timeout.total_seconds(),
            "reproducibility check",
            host.name,
        )
        if proc.returncode != 0:
            raise BuildError(
                host.name, f"reproducibility check: cannot read the outputs: {_tail(proc.stderr)}"
            )
        return frozenset(proc.stdout.split())

    def _describe(self, m: Mismatch) -> str:
        """What differs between the output and its second build: the differing files by
        size and sha256 and, when diffoscope is installed, where its report is."""
        second = Path(m.output + ".check")
        if m.check != str(second) or not second.exists():
            return "Nix kept no second build to compare"
        # The second build is not measured against nix.max_output_size as the first was:
        # it may be made to differ by a file of any size (a sparse one costs no disk).
        budget = self.settings.max_output_size
        first, cut_first = _listing(Path(m.output), budget)
        other, cut_other = _listing(second, budget)
        truncated = cut_first or cut_other
        summary = summarise(compare(first, other, truncated), listed=MAX_LISTED if truncated else None)
        report = self._diffoscope(Path(m.output), second)
        return f"{summary} (diffoscope: {report})" if report else summary

    def _diffoscope(self, first: Path, second: Path) -> str | None:
        """diffoscope's text report of the two builds, written under the state
        directory (it shows file contents, which stay out of logs and the ledger): its
        path, or None without diffoscope. Bounded by ``reproducibility.diff_timeout``."""
        tool = shutil.which("diffoscope")
        if tool is None:
            return None
        self.reports.mkdir(parents=True, exist_ok=True)
        report = self.reports / f"{first.name}.diffoscope.txt"
        found = diffoscope(tool, first, second, report, self.reproducibility.diff_timeout)
        prune_reports(self.reports, MAX_REPORTS)
        return found


def prune_reports(directory: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest diffoscope reports in ``directory``: one is
    written per output that builds differently, up to 1 MiB each, and nothing else
    removes them."""
    reports = []
    for p in directory.glob("*.diffoscope.txt"):
        with contextlib.suppress(OSError):
            reports.append((p.stat().st_mtime_ns, p.name, p))
    for *_, p in sorted(reports, reverse=True)[keep:]:
        p.unlink(missing_ok=True)


def _build_dirs(tmp: Path) -> frozenset[str]:
    """The names of the build directories in ``tmp`` (Nix's, kept or in use)."""
    try:
        return frozenset(p.name for p in tmp.iterdir() if _BUILD_DIR.fullmatch(p.name))
    except OSError:
        return frozenset()


def kept_build_dirs(
    named: Iterable[str], tmp: Path, before: frozenset[str], drvs: Iterable[str]
) -> list[Path]:
    """The build directories a check's log says Nix kept (``named``) that are the
    check's own, for the gate to remove: in ``tmp``, there not ``before`` the check
    began, and named for one of the derivations it built again (``drvs``;
    ``nix-build-<drv name>-<n>``). The log carries the builds' own output, which may
    print Nix's words: a line naming another host's build directory, in use or kept
    for an operator, must not have it deleted."""
    names = {Path(d).name.partition("-")[2] for d in drvs}
    out = []
    for d in map(Path, named):
        m = _BUILD_DIR.fullmatch(d.name)
        if m is None or d.parent != tmp or d.name in before:
            continue
        if d.name.removeprefix("nix-build-").rpartition("-")[0] in names:
            out.append(d)
    return out


def diffoscope(tool: str, first: Path, second: Path, report: Path, timeout: float) -> str | None:
    """Run diffoscope over two builds, its text report to ``report``: the report's path,
    or what stopped it. The builds are the repository's: diffoscope hands their files to
    many tools (unpackers, disassemblers), which run in a process group of their own
    that the deadline kills whole (killing diffoscope alone would leave a tool stuck on
    a crafted file running), with an environment of their own (none of the daemon's:
    not its GNUPGHOME, nor a store's credentials) and a scratch HOME and TMPDIR."""
    with tempfile.TemporaryDirectory(prefix="reconciler-diffoscope-") as scratch:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C.UTF-8",
            "HOME": scratch,
            "TMPDIR": scratch,
        }
        args = [
            tool,
            "--no-progress",
            "--text",
            str(report),
            "--max-text-report-size",
            str(1 << 20),
            "--timeout",
            str(max(1, round(timeout / 2))),
            "--exclude-directory-metadata",
            "recursive",
            str(first),
            str(second),
        ]
        try:
            # Whatever diffoscope started and left behind goes with it.
            code: int | None = run_with_deadline(
                args, env=env, timeout=timeout, kill_leftovers=True
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    if code is None:
        return f"stopped after {round(timeout)}s, see reproducibility.diff_timeout"
    # 1: the two differ (the report is written); 0: diffoscope sees no difference.
    if code not in (0, 1):
        return f"failed with exit status {code}"
    return str(report)


# The diffoscope reports kept under STATE_DIR/reproducibility (the newest).
MAX_REPORTS = 50


def _quiet(seconds: float, output: str) -> None:
    """A check's heartbeat: it says nothing (the build before it did)."""


def _walk(root: Path) -> Iterator[Path]:
    """Every path under the directory ``root``, one directory read at a time (unlike
    os.walk, which holds a directory's every name): unreadable directories skipped."""
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    yield Path(e.path)
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
        except OSError:
            continue


def _listing(root: Path, budget: int, limit: int = MAX_LISTED) -> tuple[dict[str, Entry], bool]:
    """The files under ``root`` (and ``root`` itself) as the gate compares them, at
    most ``limit`` of them besides ``root``, and whether there were more; files are
    hashed while their sizes add up to no more than ``budget`` bytes, the rest compared
    by size alone."""
    out: dict[str, Entry] = {}
    left = budget

    def entry(p: Path) -> Entry:
        nonlocal left
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            return Entry("symlink", target=os.readlink(p))
        if stat.S_ISDIR(st.st_mode):
            return Entry("directory")
        if stat.S_ISREG(st.st_mode):
            executable = bool(st.st_mode & 0o111)
            if st.st_size > left:
                return Entry("file", st.st_size, executable=executable)
            left -= st.st_size
            with p.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            return Entry("file", st.st_size, digest, executable=executable)
        return Entry("other")

    out[""] = entry(root)
    if out[""].kind == "directory":
        for p in _walk(root):
            if len(out) > limit:
                return out, True
            out[p.relative_to(root).as_posix()] = entry(p)
    return out, False


def _remove(path: Path) -> None:
    """Remove what a check left (a second build in the store, a build directory),
    read-only directories included; what cannot be removed is left to Nix's garbage
    collector (an invalid store path is garbage)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        # Store paths are read-only: their directories are made writable first,
        # through descriptors (os.fwalk): a name a build's process swapped for a symlink
        # meanwhile (an unsandboxed build's may outlive it) is never followed to a
        # directory elsewhere, as chmod by path would between listing and changing it.
        for _, _, _, fd in os.fwalk(path):
            with contextlib.suppress(OSError):
                os.fchmod(fd, 0o755)
        shutil.rmtree(path, ignore_errors=True)

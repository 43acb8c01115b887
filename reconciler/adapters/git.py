"""The config repository, through the git command.

The daemon keeps its own clone in the state directory and writes the tracked branch's
head out of git objects into a tree of its own for Nix, without the host and profile
files (core.hosts.NOT_READ_BY_PACKAGES: Nix is given those normalised); whether a new
head may be built (signature, ancestry) is reconciler.gate's decision, from what this
module reads. Every operation is one git process under a deadline: a plan's reads cost
no library import (gitpython's is 30 ms and more, a fifth of a bare evaluation of 1,000
hosts), and a remote that stops answering cannot hold a pass for ever.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from reconciler import log
from reconciler.adapters.process import run_with_deadline
from reconciler.config import GIT_NETWORK_TIMEOUT
from reconciler.core.hosts import NOT_READ_BY_PACKAGES, SYMLINK, TOO_BIG, UNREADABLE
from reconciler.core.schema import MAX_FILE_BYTES
from reconciler.core.urls import without_credentials
from reconciler.errors import ConfigError, SourceError, VerificationError

# A commit is read whole to find its signature header; a longer one (it is its
# message that grows) is not read at all. Real commits are a few KB.
COMMIT_LIMIT = 1 << 20
# `git verify-commit` runs gpg on a signature that reconciler.openpgp already
# checked: milliseconds of work. Past this, git and its gpg are killed.
VERIFY_TIMEOUT = 10.0
# Telling ancestry in a shallow clone: the history is deepened by these many commits
# in turn (a fetch each) before giving up.
DEEPEN_STEPS = (100, 1000, 10000)
# Writing a commit's tree out of git objects (`reconciler plan`).
EXPORT_TIMEOUT = 300.0
# Reading a commit's definition files out of git objects, and any other local git command.
READ_TIMEOUT = 300.0
# The tree written out for Nix, in bytes, at most: git stores one blob once however many
# paths name it, so a push of a few kilobytes can ask for terabytes of disk.
MAX_TREE_BYTES = 1 << 30
# What a file system takes of a name: a component of NAME_MAX bytes, a path well under
# PATH_MAX once under the state directory. A longer one is not written (a package that
# reads it fails to evaluate, and only its hosts with it).
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 3072
# The folders whose files parse_fleet reads (only the names of packages/*.nix).
DEFINITIONS = ("hosts", "profiles", "packages")
# The clone's own attributes (info/attributes, which outrank the repository's
# .gitattributes): the tree written out for Nix is the committed blobs, byte for byte.
# Else `export-subst` would put the commit's id or date in a file whose blob did not
# change, which the evaluation cache, keyed on blob ids, could not see; and
# `export-ignore`, end-of-line conversion, `ident` and filters would make the files
# Nix reads differ from what was committed.
ATTRIBUTES = "* -export-subst -export-ignore -text -eol -ident -filter -working-tree-encoding\n"


_DEFINITION_NAMES = frozenset(d.encode() for d in DEFINITIONS)


class _Entry(NamedTuple):
    """One line of `git ls-tree --long`."""

    mode: str
    kind: str  # blob, tree or commit (a submodule)
    oid: str
    size: int  # 0 for a tree or a submodule
    path: bytes  # as git has it: not necessarily UTF-8


class TreeRefusedError(SourceError):
    """The head's tree cannot be written out for Nix (too large, or tar refused it): a
    fault of its content, which a clone afresh would have as well."""


class GitSource:
    """The Source port over a clone in ``clone`` (a git directory and no work tree);
    ``tree`` (default: ``tree`` beside the clone) holds the head fetch() last wrote out
    for Nix."""

    def __init__(
        self,
        url: str,
        branch: str,
        clone: Path,
        depth: int | None = None,
        credentials_file: Path | None = None,
        ssh_key: Path | None = None,
        known_hosts: Path | None = None,
        network_timeout: float = GIT_NETWORK_TIMEOUT.total_seconds(),
        tree: Path | None = None,
    ) -> None:
        self.url = url
        # What messages and logs say: the URL without a credential written into it.
        self.shown_url = without_credentials(url)
        self.branch = branch
        self.clone = clone
        self.checkout = tree if tree is not None else clone.parent / "tree"
        self.depth = depth
        # Seconds a clone, fetch, deepening or ls-remote may take (repo.network_timeout).
        self.network_timeout = network_timeout
        # Whether this process found (or made) the clone and set its origin.
        self._opened = False
        # The commit this process last wrote out into ``checkout``.
        self._checked_out: str | None = None
        # The last commit listed (_listing) and its entries; the fetched head's commit
        # time, read with its id.
        self._listed: tuple[str, list[_Entry]] | None = None
        self._head_time: tuple[str, float] | None = None
        # Text of the definition files last read, by blob id: a file is read out of
        # git once while it is unchanged, and the same str handed to parse_fleet,
        # whose cache then finds it at the cost of a dict lookup.
        self._blobs: dict[str, str] = {}
        # A daemon has no one to answer a prompt: fail instead of waiting for one.
        self.env = {"GIT_TERMINAL_PROMPT": "0"}
        if credentials_file is not None:
            # git's own credential store: lines of https://user:token@host
            self.env.update(
                GIT_CONFIG_COUNT="1",
                GIT_CONFIG_KEY_0="credential.helper",
                GIT_CONFIG_VALUE_0=f"store --file={shlex.quote(str(credentials_file))}",
            )
        if ssh_key is not None or known_hosts is not None:
            ssh = ["ssh", "-o", "BatchMode=yes"]
            if ssh_key is not None:
                ssh += ["-i", str(ssh_key), "-o", "IdentitiesOnly=yes"]
            if known_hosts is not None:
                ssh += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"]
            self.env["GIT_SSH_COMMAND"] = shlex.join(ssh)

    def _open(self) -> Path:
        """The clone's git directory, cloned first if there is none; its origin is the
        configured URL."""
        git_dir = self.clone / ".git"
        if self._opened:
            return git_dir
        if git_dir.is_dir():
            url = self._run(git_dir, ["config", "--get", "remote.origin.url"], READ_TIMEOUT)
            if url.returncode != 0 or url.stdout.decode(errors="replace").strip() != self.url:
                self._checked(
                    git_dir, ["remote", "set-url", "origin", self.url], f"cannot clone {self.shown_url}"
                )
        else:
            if self.clone.exists():
                shutil.rmtree(self.clone)
            self.clone.parent.mkdir(parents=True, exist_ok=True)
            shallow = [f"--depth={self.depth}"] if self.depth else []
            # --no-local: a repository on this machine is cloned as a remote one
            # is, through git's transport: only the branch's objects, in a pack,
            # instead of its object directory hard-linked or copied whole (loose
            # objects read ten times slower, and what else that directory holds
            # is not ours to take).
            target = str(self.clone.absolute())
            clone = ["clone", "--no-checkout", "--no-local", *shallow, "--", self.url, target]
            self._checked(None, clone, f"cannot clone {self.shown_url}", self.network_timeout)
        attributes = git_dir / "info" / "attributes"
        try:
            if not attributes.is_file() or attributes.read_text() != ATTRIBUTES:
                attributes.parent.mkdir(exist_ok=True)
                attributes.write_text(ATTRIBUTES)
        except OSError as exc:
            raise SourceError(f"cannot write {attributes}: {exc.strerror or exc}") from None
        self._opened = True
        return git_dir

    def _run(
        self,
        git_dir: Path | None,
        args: list[str],
        timeout: float,
        stdin: bytes | None = None,
        late: str | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """``git args`` on ``git_dir`` (None: in no repository, as a clone); past
        ``timeout`` it is killed with what it started (ssh, a credential helper) and
        SourceError says so (``late``, or which command did not finish)."""
        cmd = ["git", "-C", str(git_dir) if git_dir is not None else "/", *args]
        env = {**os.environ, **self.env, **(extra_env or {})}
        try:
            if stdin is None:
                return run_with_deadline(cmd, env=env, timeout=timeout, stdout=True, stderr=True)
            # Object reads on stdin start nothing else.
            return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            why = late or f"git {args[0]} on {self.shown_url} did not finish within {timeout:g} s"
            raise SourceError(why) from None
        except OSError as exc:
            raise SourceError(f"cannot run git: {exc.strerror or exc}") from None

    def _checked(
        self,
        git_dir: Path | None,
        args: list[str],
        what: str,
        timeout: float = READ_TIMEOUT,
        stdin: bytes | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> bytes:
        """The output of ``git args``; SourceError "``what``: git's reason" when it fails."""
        proc = self._run(git_dir, args, timeout, stdin, extra_env=extra_env)
        if proc.returncode != 0:
            raise SourceError(f"{what}: {_cause(self._said(proc.stderr), proc.returncode)}")
        return proc.stdout

    def _said(self, stderr: bytes) -> str:
        """What git said, with the URL as written (a credential in it) as shown."""
        return stderr.decode(errors="replace").replace(self.url, self.shown_url)

    def fetch(self) -> str:
        """Fetch the branch, write its head out for Nix, and return the commit id.

        When that fails while the remote answers for the branch, what is broken is
        this clone (a corrupt object, a half-written ref): it is cloned afresh, once,
        instead of every pass failing until someone deletes it."""
        try:
            return self._fetch_and_check_out()
        except TreeRefusedError:
            raise  # the head's content, not the clone: a clone afresh holds it too
        except SourceError as exc:
            if not self._remote_has_branch():
                raise
            log.event("checkout_repaired", logging.WARNING, url=self.shown_url, error=str(exc))
            self._opened, self._checked_out, self._blobs = False, None, {}
            shutil.rmtree(self.clone, ignore_errors=True)
            return self._fetch_and_check_out()

    def _remote_has_branch(self) -> bool:
        try:
            proc = self._run(None, self._ls_remote(), self.network_timeout)
        except SourceError:
            return False
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def _ls_remote(self) -> list[str]:
        return ["ls-remote", "--heads", "--", self.url, f"refs/heads/{self.branch}"]

    def remote_head(self, timeout: float = READ_TIMEOUT) -> str:
        """The commit the remote's branch points at, asked with `git ls-remote` (as a
        fetch would authenticate); SourceError saying why when it cannot be had."""
        proc = self._run(
            None, self._ls_remote(), timeout, late=f"{self.shown_url} did not answer within {timeout:.0f} s"
        )
        if proc.returncode != 0:
            # git's first fatal line says what happened; advice about access rights follows.
            lines = [ln.strip() for ln in self._said(proc.stderr).splitlines() if ln.strip()]
            fatal = [ln.removeprefix("fatal: ") for ln in lines if ln.startswith("fatal: ")]
            why = fatal[0] if fatal else lines[-1] if lines else "git ls-remote failed"
            raise SourceError(f"cannot reach {self.shown_url}: {why}")
        line = proc.stdout.decode(errors="replace").split()
        if not line:
            raise SourceError(f"{self.shown_url} has no branch {self.branch!r}")
        return line[0]

    def _fetch_and_check_out(self) -> str:
        commit = self.fetch_objects(f"refs/remotes/origin/{self.branch}")
        # Nix reads the packages (and what they import) from the tree, which only this
        # process writes: a poll whose head did not move leaves it as it is.
        if commit == self._checked_out:
            return commit
        self._checked_out = None
        self.write_tree(commit, self.checkout)
        self._checked_out = commit
        return commit

    def fetch_objects(self, ref: str, maintenance: bool = True) -> str:
        """Fetch the branch into ``ref`` and return its head commit; the work tree is
        not touched. ``maintenance``: git may start its housekeeping of the clone
        (`git maintenance run --auto`) after the fetch, as it does by default."""
        git_dir = self._open()
        what = f"cannot fetch branch {self.branch!r} from {self.shown_url}"
        # '+': the ref follows a force-push; whether such a head is built is
        # reconciler.daemon.gate's decision.
        shallow = [f"--depth={self.depth}"] if self.depth else []
        quiet = [] if maintenance else ["--no-auto-maintenance"]
        fetch = ["fetch", "origin", f"+refs/heads/{self.branch}:{ref}", "--prune", *shallow, *quiet]
        self._checked(git_dir, fetch, what, self.network_timeout)
        # The head's id and commit time in one process (commit_time asks for the latter).
        show = ["show", "-s", "--no-show-signature", "--format=%H %ct"]
        show += ["--end-of-options", f"{ref}^{{commit}}"]
        commit, _, when = self._checked(git_dir, show, what).decode().strip().partition(" ")
        self._head_time = (commit, float(when))
        return commit

    def write_tree(self, commit: str, dest: Path) -> None:
        """Replace ``dest`` with what Nix reads of ``commit``: its tree without the
        folders of NOT_READ_BY_PACKAGES, whose files Nix is given validated and
        normalised instead, so that no package can read them; within MAX_TREE_BYTES
        (export)."""
        if dest.exists():
            shutil.rmtree(dest)
        self.export(commit, dest, exclude=tuple(sorted(NOT_READ_BY_PACKAGES)))

    def _what_to_write(self, commit: str, top: list[str]) -> tuple[frozenset[str], list[bytes], int]:
        """Of ``commit``'s paths under the top-level entries ``top`` (none: all): those
        no file system takes as they are; those left out so that the rest take no more
        than MAX_TREE_BYTES, and how many bytes they take. Left out are the paths of the
        blobs that take most, all of a blob's at once: one blob named a thousand times
        is what a few KB pushed can ask (terabytes); a package that reads one of them
        fails, and only its hosts with it."""
        listing = self._git("ls-tree", "-r", "-z", "--long", "--full-tree", commit, "--", *top)
        unwritable = set()
        paths: dict[bytes, list[bytes]] = {}
        sizes: dict[bytes, int] = {}
        for entry in filter(None, listing.split(b"\0")):
            meta, _, raw = entry.partition(b"\t")
            _, kind, oid, size = meta.split()
            if kind == b"blob":
                paths.setdefault(oid, []).append(raw)
                sizes[oid] = int(size) if size.isdigit() else 0
            if len(raw) > MAX_PATH_BYTES or any(len(part) > MAX_NAME_BYTES for part in raw.split(b"/")):
                unwritable.add(raw.decode(errors="backslashreplace"))
        total = sum(sizes[oid] * len(named) for oid, named in paths.items())
        left_out: list[bytes] = []
        for oid in sorted(paths, key=lambda o: (sizes[o] * len(paths[o]), o), reverse=True):
            if total <= MAX_TREE_BYTES:
                break
            total -= sizes[oid] * len(paths[oid])
            left_out += paths[oid]
        return frozenset(unwritable), sorted(left_out), total

    def _without(self, commit: str, paths: list[bytes]) -> str:
        """The tree of ``commit`` without ``paths``, built in an index of its own (the
        clone's is never touched)."""
        git_dir = self._open()
        what = f"cannot export {commit} of {self.shown_url}"
        with tempfile.TemporaryDirectory(prefix="reconciler-index-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index"), "GIT_LITERAL_PATHSPECS": "1"}
            self._checked(git_dir, ["read-tree", commit], what, extra_env=env)
            self._checked(
                git_dir,
                ["rm", "--cached", "-q", "--ignore-unmatch", "--pathspec-from-file=-", "--pathspec-file-nul"],
                what,
                stdin=b"\0".join(paths),
                extra_env=env,
            )
            return self._checked(git_dir, ["write-tree"], what, extra_env=env).decode().strip()

    def export(self, commit: str, dest: Path, exclude: tuple[str, ...] = ()) -> None:
        """Write ``commit``'s tree into the new directory ``dest`` from git objects,
        without the top-level entries ``exclude``, nor a path no file system takes
        (logged), nor the paths left out to stay under MAX_TREE_BYTES (logged)."""
        git_dir = self._open()
        dest.mkdir(parents=True)
        kept: list[str] = []  # the top-level entries written (none named: all)
        if exclude:
            # git archive refuses pathspecs that match nothing: a repository of nothing
            # but host and profile files exports as an empty directory.
            top = [e.path for e in self._listing(commit) if b"/" not in e.path]
            kept = sorted({name.decode(errors="surrogateescape") for name in top} - set(exclude))
            if not kept:
                return
        unwritable, left_out, total = self._what_to_write(commit, kept)
        tree = commit
        if left_out:
            tree = self._without(commit, left_out)
            log.event(
                "tree_files_left_out",
                logging.WARNING,
                commit=commit,
                paths=len(left_out),
                first=left_out[0].decode(errors="backslashreplace")[:200],
                written=total,
                limit=MAX_TREE_BYTES,
            )
        paths = ["--", ".", *(f":(top,exclude){e}" for e in exclude)] if exclude else []
        archive = subprocess.Popen(
            ["git", "-C", str(git_dir), "archive", "--format=tar", tree, *paths],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        # The system's tar, as git checks out: symlinks stay symlinks, wherever they
        # point (the readers refuse or confine them); nothing lands outside ``dest``.
        untar = subprocess.run(
            ["tar", "-x", "--no-same-owner", "-C", str(dest)],
            stdin=archive.stdout,
            capture_output=True,
            timeout=EXPORT_TIMEOUT,
        )
        assert archive.stdout is not None
        archive.stdout.close()
        if archive.wait(timeout=EXPORT_TIMEOUT) != 0:
            raise SourceError(f"cannot export {commit} of {self.shown_url}: git archive failed")
        if untar.returncode == 0:
            return
        said = [ln for ln in self._said(untar.stderr).splitlines() if not ln.startswith("tar: Exiting with")]
        # tar goes on past a member it cannot write: when those were the names too long
        # for the file system, the tree is all there but them.
        if unwritable and said and all(ln.endswith("File name too long") for ln in said):
            first = min(unwritable)
            log.event(
                "tree_paths_skipped", logging.WARNING, commit=commit, paths=len(unwritable), first=first[:200]
            )
            return
        why = "; ".join(said[:3]) or f"tar exited {untar.returncode}"
        raise TreeRefusedError(f"cannot export {commit} of {self.shown_url}: {why}")

    def signature(self, commit: str) -> bytes | None:
        """The signature in ``commit``'s header, as `git verify-commit` hands it to
        gpg: the lines of its ``gpgsig`` headers; None if it has none. A commit larger
        than COMMIT_LIMIT is a VerificationError, unread."""
        git_dir = self._open()
        what = f"cannot read commit {commit}"
        size = int(self._checked(git_dir, ["cat-file", "-s", commit], what))
        if size > COMMIT_LIMIT:
            raise VerificationError(f"commit larger than {COMMIT_LIMIT} bytes, its signature is not read")
        raw = self._checked(git_dir, ["cat-file", "commit", commit], what)
        object_format = self._checked(git_dir, ["rev-parse", "--show-object-format"], what).strip()
        header_name = b"gpgsig" if object_format == b"sha1" else b"gpgsig-sha256"
        # git's own rule (commit.c, parse_buffer_signed_by_header): every header line
        # named for the repository's hash, and the continuation lines after each.
        lines: list[bytes] = []
        inside = False
        for line in raw.split(b"\n\n", 1)[0].split(b"\n"):
            if inside and line.startswith(b" "):
                lines.append(line[1:])
                continue
            inside = line.startswith(header_name + b" ")
            if inside:
                lines.append(line[len(header_name) + 1 :])
        return b"".join(ln + b"\n" for ln in lines) if lines else None

    def verify_commit(self, commit: str, gnupghome: Path) -> str:
        """gpg's status lines about the signature of ``commit``, checked by `git
        verify-commit` with the keys in ``gnupghome`` alone."""
        env = {**os.environ, **self.env, "GNUPGHOME": str(gnupghome)}
        args = ["git", "-C", str(self._open()), "verify-commit", "--raw", commit]
        # A process group of its own: a timeout kills the gpg git started, too.
        try:
            proc = run_with_deadline(args, env=env, timeout=VERIFY_TIMEOUT, stderr=True)
        except subprocess.TimeoutExpired:
            raise SourceError(
                f"checking the signature of commit {commit} timed out after {VERIFY_TIMEOUT:g} s"
            ) from None
        return proc.stderr.decode(errors="replace")

    def is_ancestor(self, old: str, new: str) -> bool | None:
        """Whether ``old`` is ``new`` or an ancestor of it; None when a shallow clone,
        deepened by each of DEEPEN_STEPS in turn, still cannot tell."""
        git_dir = self._open()
        steps = iter(DEEPEN_STEPS)
        while True:
            proc = self._run(git_dir, ["merge-base", "--is-ancestor", old, new], READ_TIMEOUT)
            if proc.returncode == 0:
                return True
            # 1: not an ancestor; 128: ``old`` is not (yet) in the local history.
            if proc.returncode not in (1, 128):
                why = _cause(self._said(proc.stderr), proc.returncode)
                raise SourceError(f"cannot compare commits {old} and {new}: {why}")
            what = f"cannot deepen the history of {self.shown_url}"
            if self._checked(git_dir, ["rev-parse", "--is-shallow-repository"], what).strip() != b"true":
                return False  # all of new's history is here
            step = next(steps, None)
            if step is None:
                return None
            # Relative to the shallow boundary; only FETCH_HEAD moves.
            deepen = ["fetch", "origin", f"refs/heads/{self.branch}", f"--deepen={step}"]
            self._checked(git_dir, deepen, what, self.network_timeout)

    def read_tree(self) -> dict[str, str]:
        """The definition files of the checked-out commit."""
        if self._checked_out is None:
            raise SourceError("nothing is checked out yet")
        return self.read_objects(self._checked_out)

    def _git(self, *args: str, stdin: bytes | None = None) -> bytes:
        return self._checked(
            self._open(), list(args), f"cannot read {args[-1]} of {self.shown_url}", stdin=stdin
        )

    def read_objects(self, commit: str) -> dict[str, str]:
        """What adapters.tree.read_tree reads from a checkout, read from ``commit``'s git
        objects instead: no work tree is written or cleaned, and a file whose blob was
        read before is not read again."""
        listing = self._listing(commit)
        for entry in listing:
            if entry.path in _DEFINITION_NAMES and entry.mode == "120000":
                raise ConfigError(
                    entry.path.decode(), "", "is a symlink; definitions must live in the repository"
                )
        files: dict[str, str] = {}
        wanted: dict[str, str] = {}  # path -> blob id
        for entry in listing:
            top_name, slash, _ = entry.path.partition(b"/")
            if not slash or top_name not in _DEFINITION_NAMES:
                continue
            mode, kind, blob, length = entry.mode, entry.kind, entry.oid, entry.size
            # A name that is not UTF-8 is shown escaped (caf\xe9.yaml): as a str that
            # holds no lone surrogate, which neither sqlite nor a log line can take.
            path = entry.path.decode(errors="backslashreplace")
            folder, name = path.split("/", 1)
            if folder == "packages":
                if name.endswith(".nix"):
                    files[path] = ""
                continue
            if not name.endswith((".yaml", ".yml")):
                continue
            if mode == "120000":
                files[path] = SYMLINK
            elif kind != "blob":
                files[path] = UNREADABLE + f"is a {'directory' if kind == 'tree' else kind}"
            elif length > MAX_FILE_BYTES:
                files[path] = TOO_BIG
            else:
                wanted[path] = blob
        missing = sorted({b for b in wanted.values() if b not in self._blobs})
        blobs = {b: self._blobs[b] for b in wanted.values() if b in self._blobs}
        if missing:
            out = self._git("cat-file", "--batch", stdin="".join(b + "\n" for b in missing).encode())
            at = 0
            for b in missing:
                header_end = out.index(b"\n", at)
                end = header_end + 1 + int(out[at:header_end].split()[2])
                data = out[header_end + 1 : end]
                at = end + 1
                try:
                    blobs[b] = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    blobs[b] = UNREADABLE + str(exc)
        for path, blob in wanted.items():
            files[path] = blobs[blob]
        self._blobs = blobs
        return dict(sorted(files.items()))

    def _listing(self, commit: str) -> list[_Entry]:
        """``commit``'s top-level entries, and those of its DEFINITIONS folders, one
        level down: what export, read_objects and tree_digest read of it, in one git
        process for the last commit asked about."""
        if self._listed is not None and self._listed[0] == commit:
            return self._listed[1]
        # -t: a folder listed into is listed too; ".": the top level's other entries.
        out = self._git("ls-tree", "-z", "--long", "-t", commit, "--", ".", *(f"{d}/" for d in DEFINITIONS))
        entries = []
        for raw in filter(None, out.split(b"\0")):
            meta, _, path = raw.partition(b"\t")
            mode, kind, oid, size = meta.decode().split()
            entries.append(_Entry(mode, kind, oid, int(size) if size.isdigit() else 0, path))
        self._listed = (commit, entries)
        return entries

    def commit_time(self, commit: str) -> float:
        """The committer time of ``commit``, unix seconds."""
        if self._head_time is not None and self._head_time[0] == commit:
            return self._head_time[1]
        show = ["show", "-s", "--no-show-signature", "--format=%ct", commit]
        return float(self._checked(self._open(), show, f"cannot read commit {commit}"))

    def tree_digest(self, commit: str, exclude: frozenset[str]) -> str:
        """Digest of ``commit``'s tree without the top-level ``exclude`` entries: git's
        object ids, so nothing is read or hashed here."""
        kept = [
            f"{e.mode} {e.kind} {e.oid}\t{name}"
            for e in self._listing(commit)
            if b"/" not in e.path and (name := e.path.decode(errors="backslashreplace")) not in exclude
        ]
        return hashlib.sha256("\n".join(kept).encode()).hexdigest()

    def changed_files(self, old: str | None, new: str) -> frozenset[str] | None:
        """Paths that differ between two commits, or None when ``old`` is unknown
        (first run, or history rewritten by a force-push)."""
        if old is None:
            return None
        if old == new:
            return frozenset()
        proc = self._run(self._open(), ["diff", "--name-only", "--no-renames", old, new, "--"], READ_TIMEOUT)
        if proc.returncode != 0:
            return None
        return frozenset(line for line in proc.stdout.decode(errors="backslashreplace").splitlines() if line)


def _cause(stderr: str, status: int) -> str:
    """The cause in git's error output: its fatal line and what ssh or the remote said
    just before it, without git's generic advice after it."""
    lines = [ln.strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Cloning into")]
    fatal = next((i for i, ln in enumerate(lines) if ln.startswith(("fatal:", "error:"))), None)
    if fatal is None:
        return lines[-1] if lines else f"git exited {status}"
    said = [ln.removeprefix("fatal: ").removeprefix("error: ") for ln in lines[max(0, fatal - 1) : fatal + 1]]
    return "; ".join(said)


class Snapshot:
    """The Source port for what only reads (``reconciler plan``): the branch head read
    from git objects into ``workdir``, fetched into a ref of its own. The daemon's tree
    and refs stay as they are, so a pass running meanwhile builds what it wrote out."""

    REF = "refs/reconciler/snapshot"

    def __init__(self, git: GitSource, workdir: Path) -> None:
        self._git = git
        self._tree = workdir / "tree"
        self._commit: str | None = None

    @property
    def checkout(self) -> Path:
        return self._tree

    def fetch(self) -> str:
        # The daemon's clone is the daemon's to keep: a plan leaves its housekeeping
        # (a process more per plan, and a repack now and then) to the daemon's fetches.
        commit = self._git.fetch_objects(self.REF, maintenance=False)
        self._git.write_tree(commit, self._tree)
        self._commit = commit
        return commit

    def read_tree(self) -> dict[str, str]:
        if self._commit is None:
            raise SourceError("nothing is fetched yet")
        return self._git.read_objects(self._commit)

    def commit_time(self, commit: str) -> float:
        return self._git.commit_time(commit)

    def tree_digest(self, commit: str, exclude: frozenset[str]) -> str:
        return self._git.tree_digest(commit, exclude)

    def changed_files(self, old: str | None, new: str) -> frozenset[str] | None:
        return self._git.changed_files(old, new)

    def signature(self, commit: str) -> bytes | None:
        return self._git.signature(commit)

    def verify_commit(self, commit: str, gnupghome: Path) -> str:
        return self._git.verify_commit(commit, gnupghome)

    def is_ancestor(self, old: str, new: str) -> bool | None:
        return self._git.is_ancestor(old, new)

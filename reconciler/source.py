"""The config repository, through gitpython.

The daemon keeps its own clone in the state directory and checks out the tracked
branch's head detached, so a force-push on the remote is just a new head.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
from pathlib import Path

import git

from reconciler.errors import SourceError


class GitSource:
    def __init__(
        self,
        url: str,
        branch: str,
        checkout: Path,
        depth: int | None = None,
        credentials_file: Path | None = None,
        ssh_key: Path | None = None,
        known_hosts: Path | None = None,
    ) -> None:
        self.url = url
        self.branch = branch
        self.checkout = checkout
        self.depth = depth
        self._repo: git.Repo | None = None
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

    def _open(self) -> git.Repo:
        if self._repo is not None:
            return self._repo
        try:
            if (self.checkout / ".git").is_dir():
                repo = git.Repo(self.checkout)
                if repo.remotes.origin.url != self.url:
                    repo.remotes.origin.set_url(self.url)
            else:
                if self.checkout.exists():
                    shutil.rmtree(self.checkout)
                self.checkout.parent.mkdir(parents=True, exist_ok=True)
                shallow = [f"--depth={self.depth}"] if self.depth else []
                repo = git.Repo.clone_from(
                    self.url, self.checkout, env=self.env, multi_options=["--no-checkout", *shallow]
                )
        except (git.GitCommandError, git.InvalidGitRepositoryError, OSError) as exc:
            raise SourceError(f"cannot clone {self.url}: {_why(exc)}") from None
        repo.git.update_environment(**self.env)
        self._repo = repo
        return repo

    def fetch(self) -> str:
        """Fetch the branch, check its head out, and return the commit id."""
        repo = self._open()
        ref = f"refs/remotes/origin/{self.branch}"
        try:
            # '+' accepts force-pushes: the remote's history is the truth.
            shallow = [f"--depth={self.depth}"] if self.depth else []
            repo.git.fetch("origin", f"+refs/heads/{self.branch}:{ref}", "--prune", *shallow)
            commit = repo.git.rev_parse(ref + "^{commit}")
            repo.git.checkout("--force", "--detach", commit)
            repo.git.clean("-ffdx")
        except git.GitCommandError as exc:
            raise SourceError(f"cannot fetch branch {self.branch!r} from {self.url}: {_why(exc)}") from None
        return str(commit)

    def signer(self, commit: str, gnupghome: Path) -> tuple[str | None, str]:
        """The fingerprints behind a good signature of ``commit`` (the signing key's,
        then its primary key's, space-separated), checked with the keys in
        ``gnupghome`` alone; or None and why not."""
        repo = self._open()
        env = {"GNUPGHOME": str(gnupghome)}
        try:
            status = repo.git.verify_commit("--raw", commit, env=env, with_extended_output=True)[2]
        except git.GitCommandError as exc:
            status = str(exc.stderr)
        lines = [ln.split() for ln in status.splitlines()]
        fields = {ln[1]: ln[2:] for ln in lines if len(ln) > 1 and ln[0] == "[GNUPG:]"}
        if "VALIDSIG" in fields and "GOODSIG" in fields:
            valid = fields["VALIDSIG"]
            return " ".join((valid[0], valid[-1])), "good signature"
        if "ERRSIG" in fields or "NO_PUBKEY" in fields:
            return None, "signed by an unknown key"
        if "BADSIG" in fields:
            return None, "bad signature"
        if "EXPKEYSIG" in fields or "REVKEYSIG" in fields:
            return None, "signed by an expired or revoked key"
        return None, "not signed"

    def commit_time(self, commit: str) -> float:
        """The committer time of ``commit``, unix seconds."""
        return float(self._open().commit(commit).committed_date)

    def tree_digest(self, exclude: frozenset[str]) -> str:
        """Digest of the checked-out commit's tree without the top-level ``exclude``
        entries: git's object ids, so nothing is read or hashed here."""
        repo = self._open()
        try:
            listing = repo.git.ls_tree("HEAD")
        except git.GitCommandError as exc:
            raise SourceError(f"cannot list the checkout of {self.url}: {_why(exc)}") from None
        kept = [ln for ln in listing.splitlines() if ln.split("\t", 1)[-1] not in exclude]
        return hashlib.sha256("\n".join(kept).encode()).hexdigest()

    def changed_files(self, old: str | None, new: str) -> frozenset[str] | None:
        """Paths that differ between two commits, or None when ``old`` is unknown
        (first run, or history rewritten by a force-push)."""
        if old is None:
            return None
        repo = self._open()
        try:
            out = repo.git.diff("--name-only", "--no-renames", old, new)
        except git.GitCommandError:
            return None
        return frozenset(line for line in out.splitlines() if line)


def _why(exc: Exception) -> str:
    """The cause in git's error output: its fatal line and what ssh or the remote said
    just before it, without gitpython's quoting or git's generic advice after it."""
    if not isinstance(exc, git.GitCommandError):
        return str(exc)
    # gitpython quotes the whole stderr: stderr: 'Cloning into...\nfatal: ...\n'
    lines = [ln.strip().removeprefix("stderr: ").strip("'").strip() for ln in str(exc.stderr).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Cloning into")]
    fatal = next((i for i, ln in enumerate(lines) if ln.startswith(("fatal:", "error:"))), None)
    if fatal is None:
        return lines[-1] if lines else f"git exited {exc.status}"
    said = [ln.removeprefix("fatal: ").removeprefix("error: ") for ln in lines[max(0, fatal - 1) : fatal + 1]]
    return "; ".join(said)

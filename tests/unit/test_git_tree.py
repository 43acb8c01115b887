"""GitSource.read_objects: the definition files read out of git objects are what
adapters.tree.read_tree reads from a checkout of the same commit."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from reconciler.adapters import git as git_adapter
from reconciler.adapters.git import GitSource
from reconciler.adapters.tree import read_tree
from reconciler.core.schema import MAX_FILE_BYTES
from reconciler.errors import ConfigError, SourceError
from tests.conftest import alive, reconciler_log


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def commit_all(repo: Path) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "c")
    return git(repo, "rev-parse", "HEAD")


def test_read_objects_reads_what_a_checkout_holds(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for d in ("hosts/nested", "profiles", "packages/lib"):
        (repo / d).mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "hosts/web-1.yaml").write_text("name: web-1\n")
    (repo / "hosts/web-2.yml").write_text("name: web-2\n")
    (repo / "hosts/same.yaml").write_text("name: web-1\n")  # a blob two paths share
    (repo / "hosts/notes.txt").write_text("not a definition")
    (repo / "hosts/nested/deep.yaml").write_text("name: deep\n")
    (repo / "hosts/big.yaml").write_text("#" * (MAX_FILE_BYTES + 1))
    (repo / "hosts/latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (repo / os.fsdecode(b"hosts/caf\xe9.yaml")).write_text("name: cafe\n")  # a name not UTF-8
    os.symlink("web-1.yaml", repo / "hosts/link.yaml")
    (repo / "profiles/base.yaml").write_text("network: {gateway: 10.0.0.1}\n")
    (repo / "packages/site.nix").write_text("{ toolchain }: toolchain.busybox\n")
    (repo / "packages/lib/util.nix").write_text("{}")
    (repo / "README.md").write_text("docs")
    commit = commit_all(repo)
    source = GitSource(str(repo), "main", tmp_path / "clone")
    assert source.fetch() == commit
    expected = read_tree(repo)
    got = source.read_objects(commit)
    assert sorted(got) == sorted(expected)
    for path, text in expected.items():
        # The decode error's wording differs; what matters is that the file is refused alone.
        assert got[path] == text or (
            got[path].startswith("\0unreadable:") and text.startswith("\0unreadable:")
        )
    assert source.read_tree() == got
    # Shown escaped: what sqlite and a log line can take.
    assert "hosts/caf\\xe9.yaml" in got
    assert all(path.encode("utf-8") for path in got)
    # A later commit: only the changed blob is new; unchanged files are the same objects.
    (repo / "hosts/web-2.yml").write_text("name: web-2\nformats: [aci]\n")
    (repo / "hosts/web-1.yaml").unlink()
    commit = commit_all(repo)
    assert source.fetch() == commit
    again = source.read_tree()
    assert "hosts/web-1.yaml" not in again and again["hosts/web-2.yml"].endswith("[aci]\n")
    assert again["profiles/base.yaml"] is got["profiles/base.yaml"]


def test_the_tree_digest_sees_what_nix_reads_and_commit_times_are_git_s(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for d in ("hosts", "profiles", "packages"):
        (repo / d).mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "hosts/web-1.yaml").write_text("name: web-1\n")
    (repo / "profiles/base.yaml").write_text("formats: [aci]\n")
    (repo / "packages/site.nix").write_text("{ toolchain }: toolchain.busybox\n")
    first = commit_all(repo)
    source = GitSource(str(repo), "main", tmp_path / "clone")
    assert source.fetch() == first
    hidden = frozenset({"hosts", "profiles"})

    def edit(path: str, text: str) -> str:
        (repo / path).write_text(text)
        # A second apart: each commit has a time of its own.
        env = {**os.environ, "GIT_COMMITTER_DATE": f"{int(time.time()) + len(path)} +0000"}
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
        subprocess.run(
            [
                "git",
                "-C",
                str(repo),
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.invalid",
                "commit",
                "-qm",
                path,
            ],
            check=True,
            env=env,
        )
        commit = git(repo, "rev-parse", "HEAD")
        assert source.fetch() == commit
        return commit

    digests = {first: source.tree_digest(first, hidden)}
    commits = [first]
    for path in ("hosts/web-1.yaml", "profiles/base.yaml", "packages/site.nix", "README.md"):
        commits.append(edit(path, f"# {path}\n"))
        digests[commits[-1]] = source.tree_digest(commits[-1], hidden)
    # Host and profile edits leave what Nix reads as it was; a package or a README does not.
    seen = [digests[c] for c in commits]
    assert seen[0] == seen[1] == seen[2] != seen[3] != seen[4]
    # Asked again of older commits, after the listing of a newer one.
    assert source.tree_digest(first, hidden) == seen[0]
    assert source.tree_digest(commits[3], frozenset()) != source.tree_digest(commits[3], hidden)
    for c in commits:
        assert source.commit_time(c) == float(git(repo, "show", "-s", "--format=%ct", c))
    assert len({source.commit_time(c) for c in commits}) == len(commits)


def test_a_definition_folder_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "real").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "real/web-1.yaml").write_text("name: web-1\n")
    os.symlink("real", repo / "hosts")
    commit = commit_all(repo)
    source = GitSource(str(repo), "main", tmp_path / "clone")
    source.fetch()
    with pytest.raises(ConfigError, match="symlink"):
        read_tree(repo)
    with pytest.raises(ConfigError, match="symlink"):
        source.read_objects(commit)


def test_a_repository_of_only_host_files_exports_as_an_empty_tree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "hosts").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "hosts/web-1.yaml").write_text("name: web-1\n")
    commit = commit_all(repo)
    source = GitSource(str(repo), "main", tmp_path / "clone")
    source.fetch()
    source.export(commit, tmp_path / "out", exclude=("hosts", "profiles"))
    assert list((tmp_path / "out").iterdir()) == []
    (repo / "README").write_text("fleet\n")
    commit = commit_all(repo)
    source.fetch()
    source.export(commit, tmp_path / "out2", exclude=("hosts", "profiles"))
    assert [p.name for p in (tmp_path / "out2").iterdir()] == ["README"]


def test_a_name_no_file_system_takes_is_left_out_of_the_tree_alone(tmp_path: Path) -> None:
    """git takes a component of 300 bytes; tar cannot write it, and stopped the whole
    export (so every pass, and each one cloned again)."""
    repo = tmp_path / "repo"
    (repo / "packages").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "packages/site.nix").write_text("{ toolchain }: toolchain.busybox\n")
    blob = subprocess.run(
        ["git", "-C", str(repo), "hash-object", "-w", "--stdin"], input="hi\n", capture_output=True, text=True
    ).stdout.strip()
    git(repo, "add", "-A")
    # Into the index only (no file system here takes the names either); committed as is.
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},docs/{'A' * 300}.md")
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},docs/{'B' * 300}/inside.md")
    git(repo, "commit", "-qm", "c")
    commit = git(repo, "rev-parse", "HEAD")
    assert len(git(repo, "ls-tree", "-r", "--name-only", commit).splitlines()) == 3
    source = GitSource(str(repo), "main", tmp_path / "clone")
    with reconciler_log() as out:
        assert source.fetch() == commit
    assert (source.checkout / "packages/site.nix").is_file()
    docs = source.checkout / "docs"
    assert not docs.exists() or not any(docs.iterdir())
    assert "event=tree_paths_skipped" in out.getvalue() and " paths=2 " in out.getvalue()


def test_a_tree_past_its_size_is_written_without_the_blobs_that_take_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One blob named a thousand times is a few KB pushed and terabytes written out. It
    failed the whole pass; now its paths are left out, and a package that reads one
    fails (only its hosts with it)."""
    monkeypatch.setattr(git_adapter, "MAX_TREE_BYTES", 21_000)
    repo = tmp_path / "repo"
    (repo / "blobs").mkdir(parents=True)
    (repo / "packages").mkdir()
    git(repo, "init", "-q", "-b", "main")
    for i in range(3):
        (repo / f"blobs/z{i}").write_text("z" * 4000)
    (repo / "packages/site.nix").write_text("{ toolchain }: toolchain.busybox\n" + "#" * 3000)
    (repo / "blobs/big").write_text("b" * 5000)
    (repo / "hosts").mkdir()
    (repo / "hosts/web-1.yaml").write_text("#" * 20_000)  # not written out: not counted
    commit_all(repo)
    source = GitSource(str(repo), "main", tmp_path / "clone")
    source.fetch()
    assert (source.checkout / "blobs/z2").is_file()
    (repo / "blobs/z3").write_text("z" * 4000)
    commit = commit_all(repo)
    clone = (tmp_path / "clone" / ".git").stat().st_ino
    with reconciler_log() as out:
        assert source.fetch() == commit
    # 16,000 bytes of one blob, 5,000 of another, 3,000 of the package: the first goes.
    assert not (source.checkout / "blobs/z0").exists() and not (source.checkout / "blobs/z3").exists()
    assert (source.checkout / "blobs/big").read_text() == "b" * 5000
    assert (source.checkout / "packages/site.nix").is_file()
    said = out.getvalue()
    assert "event=tree_files_left_out" in said and " paths=4 " in said and " first=blobs/z0 " in said
    assert " written=8" in said and "checkout_repaired" not in said
    assert (tmp_path / "clone" / ".git").stat().st_ino == clone


def test_the_tree_written_for_nix_is_the_committed_blobs_whatever_gitattributes_say(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    (repo / "packages").mkdir(parents=True)
    (repo / "hosts").mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / ".gitattributes").write_text(
        "* text eol=crlf ident\npackages/site.nix export-subst\npackages/hidden.nix export-ignore\n"
    )
    (repo / "packages/site.nix").write_text("# $Id$ $Format:%H$\n{ toolchain }: toolchain.busybox\n")
    (repo / "packages/hidden.nix").write_text("{ toolchain }: toolchain.busybox\n")
    (repo / "hosts/web-1.yaml").write_text("name: web-1\n")
    commit_all(repo)
    source = GitSource(str(repo), "main", tmp_path / "clone")
    for i in range(2):
        source.fetch()
        written = {
            p.relative_to(source.checkout).as_posix() for p in source.checkout.rglob("*") if p.is_file()
        }
        committed = set(git(repo, "ls-files").splitlines()) - {"hosts/web-1.yaml"}
        assert "packages/hidden.nix" in written and written == committed
        for name in written:
            assert (source.checkout / name).read_bytes() == (repo / name).read_bytes(), name
        # The next commit changes no package blob: what Nix reads stays the same too.
        (repo / "README").write_text(f"fleet {i}\n")
        commit_all(repo)


def test_a_repository_on_this_machine_is_cloned_through_git_s_transport(tmp_path: Path) -> None:
    """Only the branch's objects, packed: not the source's object directory hard-linked
    (loose objects, each read through a file of its own) with whatever else it holds."""
    repo = tmp_path / "repo"
    (repo / "hosts").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    for i in range(20):
        (repo / f"hosts/h-{i}.yaml").write_text(f"name: h-{i}\n")
    commit_all(repo)
    (tmp_path / "stray").write_text("an object no commit holds\n")
    stray = git(repo, "hash-object", "-w", str(tmp_path / "stray"))
    source = GitSource(str(repo), "main", tmp_path / "clone")
    source.fetch()
    counts = dict(line.split(": ") for line in git(tmp_path / "clone", "count-objects", "-v").splitlines())
    assert counts["count"] == "0" and int(counts["in-pack"]) >= 22
    missing = subprocess.run(
        ["git", "-C", str(tmp_path / "clone"), "cat-file", "-e", stray], capture_output=True
    )
    assert missing.returncode != 0


def test_a_remote_that_stops_answering_is_given_up_with_what_git_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ssh that connects and then says nothing: the clone waits on it.
    pidfile = tmp_path / "ssh.pid"
    ssh = tmp_path / "ssh"
    ssh.write_text(f"#!/bin/sh\necho $$ >> {pidfile}\nexec sleep 60\n")
    ssh.chmod(0o755)
    monkeypatch.setenv("GIT_SSH_COMMAND", str(ssh))
    source = GitSource("ssh://git@127.0.0.1/fleet.git", "main", tmp_path / "clone", network_timeout=1.0)
    with pytest.raises(
        SourceError, match=re.escape("git clone on ssh://git@127.0.0.1/fleet.git did not finish within 1 s")
    ):
        started = time.monotonic()
        try:
            source.fetch()
        finally:
            # Not the ssh's minute: a second for the clone, one for asking the remote
            # whether it has the branch (which tells a broken clone from a gone remote).
            assert time.monotonic() - started < 30
    # The stuck ssh went with git (the deadline kills the process group), the clone's
    # and that of the check whether the remote has the branch (to tell a broken clone).
    pids = [int(line) for line in pidfile.read_text().split()]
    assert pids and not [pid for pid in pids if alive(pid)]

"""The CLI's error paths as an operator meets them: one line on stderr, exit 1, no
traceback (SPEC: "Every command prints a clear one-line error")."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reconciler.adapters.ledger import State
from tests.conftest import ConfigRepo, Signing, cli, write_config

pytestmark = pytest.mark.integration


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("reconciler: error: "), res.stderr
    return lines[0].removeprefix("reconciler: error: ")


@pytest.fixture
def under_a_file(tmp_path: Path) -> Path:
    """A path that cannot be created: its parent is a file."""
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "dir"


def test_a_state_dir_that_cannot_be_created(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, under_a_file: Path
) -> None:
    config_repo.write("hosts/h-1.yaml", "name: h-1\n")
    config_repo.commit()
    cfg = write_config(tmp_path, config_repo, signing, state_dir=str(under_a_file))
    for command in ("reconcile", "gc"):
        assert one_line_error(cli(command, "-c", str(cfg))) == (
            f"state_dir {under_a_file}: cannot create it: Not a directory"
        )
    # status creates nothing: there is nothing to report yet.
    res = cli("status", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "commit (never reconciled)",
        "last pass: none recorded",
        "publisher: no daemon has taken the store's publisher lease yet",
    ], res.stdout


def test_a_damaged_ledger(tmp_path: Path, config_repo: ConfigRepo, signing: Signing) -> None:
    cfg = write_config(tmp_path, config_repo, signing)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.db").write_text("not a database, whatever it was\n")
    for command in ("status", "reconcile", "plan", "events", "suspend"):
        assert one_line_error(cli(command, "-c", str(cfg))) == (
            f"{tmp_path / 'state' / 'state.db'}: file is not a database "
            "(a damaged ledger: move it away to start afresh)"
        )


def test_a_ledger_damaged_past_its_first_page(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    """Opened, and damaged where a command reads on: one line still, not a traceback."""
    config_repo.write("hosts/h-1.yaml", "name: h-1\n")
    config_repo.commit()
    cfg = write_config(tmp_path, config_repo, signing)
    state = State(tmp_path / "state")
    for i in range(64):
        state.set_meta(f"filler-{i}", "x" * 3000)
    state.close()
    db = tmp_path / "state" / "state.db"
    with db.open("r+b") as f:
        f.seek(20 * 1024)
        f.write(random.Random(7).randbytes(8 * 1024))
    res = cli("reconcile", "-c", str(cfg))
    # The pass's own events come first (the lease it took and gave back).
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1] == (
        "reconciler: error: the ledger (state.db): database disk image is malformed "
        "(a damaged ledger: move it away to start afresh)"
    )


def test_init_where_nothing_can_be_created(under_a_file: Path) -> None:
    assert one_line_error(cli("init", str(under_a_file))) == f"cannot create {under_a_file}: Not a directory"


def test_an_agent_whose_state_dir_cannot_be_created(
    tmp_path: Path, signing: Signing, under_a_file: Path
) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "host": "h-1",
                "store": str(tmp_path),
                "keys": [str(signing.public_key)],
                "state_dir": str(under_a_file),
            }
        )
    )
    assert one_line_error(cli("agent", "-c", str(cfg), "--once")) == (
        f"{cfg}: state_dir: cannot create {under_a_file}/releases: Not a directory"
    )


def test_a_reader_that_goes_away(tmp_path: Path) -> None:
    """`reconciler schema host | head -1`: the pipe closes before the output is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "schema", "host"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 1
    assert err == ""


def test_what_the_repository_names_is_printed_without_its_control_characters(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    """A host file named with ESC reached the operator's terminal as an escape sequence
    (clear the screen, here), in `plan` and in any error naming it."""
    config_repo.write("hosts/web-1.yaml", "name: web-1\nformats: [aci]\n")
    config_repo.write("hosts/\x1b[2J\x1b]0;owned\x07.yaml", "name: x\n")
    config_repo.commit("a host file whose name clears the screen")
    cfg = write_config(tmp_path, config_repo, signing)
    res = cli("plan", "-c", str(cfg))
    assert "web-1: rebuild" in res.stdout, res.stdout + res.stderr
    assert "\\x1b[2J\\x1b]0;owned\\x07" in res.stdout, res.stdout
    assert "\x1b" not in res.stdout + res.stderr and "\x07" not in res.stdout + res.stderr
    res = cli("status", "-c", str(tmp_path / "\x1b[2J.yaml"))
    assert res.returncode == 1 and "\\x1b[2J.yaml" in res.stderr and "\x1b" not in res.stderr

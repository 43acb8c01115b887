"""The floor plan holds: imports point down only (README, "Architecture").

    cli, wiring  ->  daemon, agent  ->  ports  ->  adapters  ->  core

Read from the source with ast, so a violation fails here whatever a test imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "reconciler"

# What the core may not touch: processes, sockets, databases, gpg, git, the clock,
# the environment, the file system.
IO_MODULES = frozenset(
    {
        "subprocess",
        "socket",
        "sqlite3",
        "gnupg",
        "git",
        "boto3",
        "botocore",
        "urllib.request",
        "http",
        "threading",
        "time",
        "fcntl",
        "shutil",
        "tempfile",
        "os",
        "signal",
        "prometheus_client",
        "watchdog",
    }
)
# Calls that read the clock.
CLOCK_CALLS = frozenset({"now", "utcnow", "today", "time", "monotonic"})


def modules(sub: str) -> list[Path]:
    base = PACKAGE / sub
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


def imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            if node.module == "reconciler":
                yield from (f"reconciler.{a.name}" for a in node.names)


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", modules("core"), ids=rel)
def test_the_core_imports_only_the_core_and_does_no_io(path: Path) -> None:
    for name in imports(path):
        if name.startswith("reconciler"):
            assert under(name, "reconciler.core", "reconciler.errors"), f"{rel(path)} imports {name}"
        assert not under(name, *IO_MODULES), f"{rel(path)} imports {name}: the core does no I/O"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in CLOCK_CALLS, f"{rel(path)}:{node.lineno} reads the clock"


@pytest.mark.parametrize("path", [*modules("adapters"), PACKAGE / "ports.py"], ids=rel)
def test_adapters_and_ports_import_neither_the_daemon_nor_the_agent(path: Path) -> None:
    for name in imports(path):
        assert not under(
            name, "reconciler.daemon", "reconciler.agent", "reconciler.wiring", "reconciler.cli"
        ), f"{rel(path)} imports {name}"


@pytest.mark.parametrize("path", modules("daemon"), ids=rel)
def test_the_daemon_is_composed_elsewhere(path: Path) -> None:
    for name in imports(path):
        assert not under(name, "reconciler.wiring", "reconciler.cli", "reconciler.agent"), (
            f"{rel(path)} imports {name}"
        )


@pytest.mark.parametrize("path", modules("agent"), ids=rel)
def test_the_agent_is_composed_elsewhere_and_knows_nothing_of_the_daemon(path: Path) -> None:
    for name in imports(path):
        assert not under(name, "reconciler.wiring", "reconciler.cli", "reconciler.daemon"), (
            f"{rel(path)} imports {name}"
        )


def test_the_daemon_s_pass_sees_only_ports() -> None:
    for name in imports(PACKAGE / "daemon" / "reconciler.py"):
        assert not under(name, "reconciler.adapters"), f"the pass imports {name}; give it a port instead"


def test_the_layering_test_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import subprocess\nfrom reconciler.daemon.loop import Daemon\nfrom reconciler import wiring\n"
    )
    assert list(imports(bad)) == ["subprocess", "reconciler.daemon.loop", "reconciler", "reconciler.wiring"]

"""What of Nix's output reaches logs and status: reconciler.nixlog."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.nixlog import (
    BUILD_TAIL_LINES,
    OUTSIDE,
    TAIL_LINES,
    Redaction,
    build_failure,
    failed_derivation,
    last_line,
    redact,
)

HOW = Redaction(repo="/var/lib/reconciler/checkout", labels={"/opt/reconciler/nix": "<reconciler nix>"})
DRV = "/nix/store/" + "a" * 32 + "-host-web-1-image.drv"


def test_a_quoted_file_outside_the_repository_shows_neither_its_lines_nor_its_path() -> None:
    nix = (
        "error: undefined variable 'root'\n\n"
        "       at /etc/shadow:1:1:\n\n"
        "            1| root:$6$salt$hash:19000:0:99999:7:::\n"
        "             | ^\n"
        "(use '--show-trace' to show detailed location information)\n"
    )
    shown = redact(nix, HOW)
    assert "salt" not in shown and "/etc/shadow" not in shown
    assert shown == (
        f"error: undefined variable 'root' | at {OUTSIDE}:1:1: | "
        "(use '--show-trace' to show detailed location information)"
    )


def test_repository_paths_become_relative_and_trusted_ones_labelled() -> None:
    nix = (
        "error: syntax error, unexpected '}'\n"
        "       at /var/lib/reconciler/checkout/packages/site.nix:3:1:\n"
        "       … while evaluating /opt/reconciler/nix/fleet.nix\n"
        f"error: access to canonical path '/root/.gnupg/private-keys-v1.d' is forbidden in restricted mode\n"
        f"building '{DRV}'...\n"
        "cp: can't stat '/build/x': No such file or directory\n"
    )
    assert redact(nix, HOW).split(" | ") == [
        "error: syntax error, unexpected '}'",
        "at packages/site.nix:3:1:",
        "… while evaluating <reconciler nix>/fleet.nix",
        f"error: access to canonical path '{OUTSIDE}' is forbidden in restricted mode",
        f"building '{DRV}'...",
        "cp: can't stat '/build/x': No such file or directory",
    ]


def test_an_unsandboxed_builder_s_output_is_dropped_but_nix_s_verdict_kept() -> None:
    nix = (
        f"building '{DRV}'...\n"
        "root:$6$salt$hash:19000:0:99999:7:::\n"
        f"error: builder for '{DRV}' failed with exit code 1 root:$6$salt\n"
        f"error: builder for '{DRV}' failed with exit code 1;\n"
        f"error: 1 dependencies of derivation '{DRV}' failed to build\n"
        f"error: building of '{DRV}' timed out after 3 seconds\n"
    )
    assert redact(nix, HOW, unsandboxed_build=True).split(" | ") == [
        f"error: builder for '{DRV}' failed with exit code 1;",
        f"error: 1 dependencies of derivation '{DRV}' failed to build",
        f"error: building of '{DRV}' timed out after 3 seconds",
    ]


def test_only_the_last_lines_are_kept() -> None:
    text = "\n".join(f"line {i}" for i in range(100))
    assert redact(text, HOW).split(" | ") == [f"line {i}" for i in range(100 - TAIL_LINES, 100)]
    assert redact("", HOW) == "no output"


_SECRET_DIRS = st.sampled_from(["/etc", "/root", "/home/op", "/var/lib/reconciler/gnupg", "/tmp", "/srv"])
_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)
_NOISE = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)


@given(st.lists(st.tuples(_NOISE, _SECRET_DIRS, _NAME, _NOISE), min_size=1, max_size=8), st.booleans())
def test_no_path_outside_the_repository_survives(
    lines: list[tuple[str, str, str, str]], unsandboxed: bool
) -> None:
    text = "\n".join(f"{a} {d}/{n}:1:2: {b}" for a, d, n, b in lines)
    shown = redact(text, HOW, unsandboxed_build=unsandboxed)
    for _, d, n, _ in lines:
        assert f"{d}/{n}" not in shown


def test_nix_s_colours_and_a_builder_s_control_characters_are_dropped_and_hide_no_path() -> None:
    """Nix 2.8 colours what its messages quote, a pipe or not: a path right after a
    colour code is no word's start, and passed unredacted; and escape sequences a
    builder prints would act on an operator's terminal."""
    nix = (
        "\x1b[31;1merror:\x1b[0m getting status of '\x1b[35;1m/home/alice/secret\x1b[0m': "
        "\x1b[35;1mPermission denied\x1b[0m\n"
        "\x1b]0;a new window title\x07\x1b[2J cleared \x9b31m red\n"
    )
    shown = redact(nix, HOW)
    assert shown == (
        f"error: getting status of '{OUTSIDE}': Permission denied | ]0;a new window title cleared 31m red"
    )
    assert last_line(nix, HOW) == "]0;a new window title cleared 31m red"


PKG = "/nix/store/" + "b" * 32 + "-broken.drv"
ARTIFACTS = "/nix/store/" + "c" * 32 + "-host-web-1-3.drv"
# What nix-store --realise (Nix 2.8) prints when a package of a host fails to build.
FAILED_BUILD = (
    "these 3 derivations will be built:\n"
    f"  {PKG}\n  {DRV}\n  {ARTIFACTS}\n"
    f"building '{PKG}'...\n"
    + "".join(f"compiling part {i}\n" for i in range(1, 21))
    + "cannot open /root/.ssh/id_ed25519: Permission denied\n"
    + f"error: builder for '{PKG}' failed with exit code 3;\n"
    f"error: 1 dependencies of derivation '{DRV}' failed to build\n"
    f"error: 1 dependencies of derivation '{ARTIFACTS}' failed to build\n"
)


def test_a_failed_build_names_the_derivation_its_last_lines_and_where_the_log_is() -> None:
    shown = build_failure(FAILED_BUILD, HOW)
    assert shown.splitlines() == [
        f"builder for '{PKG}' failed with exit code 3; its last lines:",
        *(f"  compiling part {i}" for i in range(21 - BUILD_TAIL_LINES + 1, 21)),
        f"  cannot open {OUTSIDE}: Permission denied",
        f"whole log: nix-store --read-log {PKG}",
    ]
    assert "/root" not in shown


def test_an_unsandboxed_build_failure_keeps_only_the_verdict_and_the_hint() -> None:
    assert build_failure(FAILED_BUILD, HOW, unsandboxed_build=True).splitlines() == [
        f"builder for '{PKG}' failed with exit code 3",
        f"whole log: nix-store --read-log {PKG}",
    ]


def test_a_timed_out_build_and_one_that_never_started() -> None:
    timed_out = f"building '{PKG}'...\nstill at it\nerror: building of '{PKG}' timed out after 3 seconds\n"
    assert build_failure(timed_out, HOW).splitlines() == [
        f"building of '{PKG}' timed out after 3 seconds; its last lines:",
        "  still at it",
        f"whole log: nix-store --read-log {PKG}",
    ]
    short = f"these 2 derivations will be built:\n  {PKG}\n  {DRV}\nbuilding '{PKG}'...\noops\n"
    short += f"error: builder for '{PKG}' failed with exit code 1;\n"
    assert build_failure(short, HOW).splitlines()[1:] == ["  oops", f"whole log: nix-store --read-log {PKG}"]
    # No verdict: Nix failed before any builder ran. As redact() says it.
    nothing = "error: cannot connect to daemon at '/nix/var/nix/daemon-socket/socket': Connection refused\n"
    assert build_failure(nothing, HOW) == redact(nothing, HOW)


@given(st.lists(st.tuples(_NOISE, _SECRET_DIRS, _NAME, _NOISE), min_size=1, max_size=8), st.booleans())
def test_no_path_outside_the_repository_survives_a_build_failure(
    lines: list[tuple[str, str, str, str]], unsandboxed: bool
) -> None:
    text = "\n".join(f"{a} {d}/{n}:1:2: {b}" for a, d, n, b in lines)
    text += f"\nerror: builder for '{PKG}' failed with exit code 1;\n"
    shown = build_failure(text, HOW, unsandboxed_build=unsandboxed)
    for _, d, n, _ in lines:
        assert f"{d}/{n}" not in shown
    assert last_line(text, HOW, unsandboxed) is not None
    for _, d, n, _ in lines:
        assert f"{d}/{n}" not in (last_line(text, HOW, unsandboxed) or "")


def test_the_last_line_of_a_running_build() -> None:
    assert last_line(f"building '{PKG}'...\n", HOW) is None
    assert last_line(f"building '{PKG}'...\nstep 1\nreading /etc/passwd\n", HOW) == f"reading {OUTSIDE}"
    assert last_line(f"building '{PKG}'...\nstep 1\n", HOW, unsandboxed_build=True) is None


def test_the_repository_itself_is_shown_as_a_dot() -> None:
    assert HOW.path("/var/lib/reconciler/checkout") == "."
    assert HOW.path("/var/lib/reconciler/checkout/hosts") == "hosts"
    assert HOW.path("/var/lib/reconciler/checkout-old") == OUTSIDE


def test_the_derivation_that_failed_is_the_first_nix_names() -> None:
    # Not the dependents that could not be built after it (the host's image among them).
    assert failed_derivation(FAILED_BUILD) == PKG
    timed_out = f"building '{PKG}'...\nerror: building of '{PKG}' timed out after 3 seconds\n"
    assert failed_derivation(timed_out) == PKG
    assert (
        failed_derivation("error: cannot connect to daemon at '/nix/var/nix/daemon-socket/socket'\n") is None
    )

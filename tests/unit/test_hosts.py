"""Unit and property tests for reconciler.hosts: parsing, profiles, validation, read_tree."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import random
import string
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reconciler.adapters.tree import read_tree
from reconciler.config import load_config
from reconciler.core import appc, hosts, schema
from reconciler.core.hosts import (
    Fleet,
    Host,
    Network,
    ParseCache,
    Port,
    Service,
    decode_parsed,
    deep_merge,
    encode_parsed,
    eval_key,
    package_names,
    parse_fleet,
)
from reconciler.core.schema import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, MAX_SCALAR_CHARS, parse_yaml
from reconciler.errors import ConfigError
from tests.conftest import recorded_calls

HOST = "hosts/web-1.yaml"
# Generous for slow CI machines; the examples themselves are small.
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE = """\
network:
  gateway: 10.42.0.1
  dns: [10.42.0.1]
services:
  web:
    exec: [bin/busybox, httpd, -f]
    restart: never
files:
  etc/motd: "managed\\n"
  etc/issue: "base\\n"
"""

WEB = """\
name: web-1
include: [base]
formats: [appimage]
network:
  address: 10.42.0.11/24
services:
  web:
    package: site
    restart: always
files:
  etc/motd: "hello\\n"
"""


def one_host(text: str, extra: Mapping[str, str] | None = None, path: str = HOST) -> Fleet:
    return parse_fleet({path: text, **(extra or {})})


def error_of(text: str, extra: Mapping[str, str] | None = None, path: str = HOST) -> ConfigError:
    """The single error a one-host fleet produced; fails if the host was accepted."""
    fleet = one_host(text, extra, path)
    assert dict(fleet.hosts) == {}, f"expected {path} to be refused, got {fleet.hosts}"
    assert len(fleet.errors) == 1, fleet.errors
    return fleet.errors[0]


def host_of(text: str, extra: Mapping[str, str] | None = None) -> Host:
    fleet = one_host(text, extra)
    assert fleet.errors == (), [str(e) for e in fleet.errors]
    return fleet.hosts["web-1"]


# -- a valid fleet -----------------------------------------------------------------------------


def test_host_with_profile_is_deep_merged_and_host_wins() -> None:
    host = host_of(WEB, {"profiles/base.yaml": BASE, "packages/site.nix": ""})
    assert host == Host(
        name="web-1",
        formats=("appimage",),
        network=Network(address="10.42.0.11/24", gateway="10.42.0.1", dns=("10.42.0.1",)),
        # exec comes from the profile; package and restart from the host.
        services=(
            Service(name="web", package="site", exec=("bin/busybox", "httpd", "-f"), restart="always"),
        ),
        files=(("etc/issue", "base\n"), ("etc/motd", "hello\n")),
    )
    assert host.sources == ("hosts/web-1.yaml", "profiles/base.yaml")
    assert host.packages == ("site",)
    assert host.inputs() == ("hosts/web-1.yaml", "profiles/base.yaml", "packages/site.nix")
    assert host.to_nix() == {
        "name": "web-1",
        "formats": ["appimage"],
        "network": {"address": "10.42.0.11/24", "gateway": "10.42.0.1", "dns": ["10.42.0.1"]},
        "services": {"web": {"package": "site", "exec": ["bin/busybox", "httpd", "-f"], "restart": "always"}},
        "files": {"etc/issue": "base\n", "etc/motd": "hello\n"},
    }


def test_defaults_of_a_minimal_host() -> None:
    host = host_of("name: web-1\n")
    assert host == Host(name="web-1", formats=("aci", "appimage"), network=Network(), services=(), files=())
    assert host.to_nix() == {
        "name": "web-1",
        "formats": ["aci", "appimage"],
        "network": {},
        "services": {},
        "files": {},
    }
    assert host.inputs() == ("hosts/web-1.yaml",)


def test_service_defaults_are_busybox_and_always() -> None:
    host = host_of("name: web-1\nservices:\n  tick: {exec: [bin/busybox, sleep, 5]}\n")
    assert host.services == (Service("tick", "busybox", ("bin/busybox", "sleep", "5"), "always"),)
    # busybox is built in: no packages/busybox.nix input.
    assert host.packages == ("busybox",)
    assert host.inputs() == ("hosts/web-1.yaml",)


def test_nested_includes_merge_in_order_and_are_all_sources() -> None:
    files = {
        "profiles/a.yaml": "include: [b]\nfiles: {etc/a: from-a, etc/shared: from-a}\n",
        "profiles/b.yaml": "files: {etc/b: from-b, etc/shared: from-b}\nnetwork: {gateway: 10.0.0.1}\n",
        "profiles/c.yaml": "include: b\nfiles: {etc/c: from-c}\n",
    }
    host = host_of("name: web-1\ninclude: [a, c]\nfiles: {etc/host: mine}\n", files)
    assert host.files == (
        ("etc/a", "from-a"),
        ("etc/b", "from-b"),
        ("etc/c", "from-c"),
        ("etc/host", "mine"),
        # a overrides b; c re-includes b, which then overrides a's value (later wins).
        ("etc/shared", "from-b"),
    )
    assert host.network == Network(gateway="10.0.0.1")
    # Own file first, each profile once, included profiles before their includer.
    assert host.sources == ("hosts/web-1.yaml", "profiles/b.yaml", "profiles/a.yaml", "profiles/c.yaml")


def test_include_as_a_single_string() -> None:
    host = host_of("name: web-1\ninclude: base\n", {"profiles/base.yaml": "formats: [aci]\n"})
    assert host.formats == ("aci",)
    assert host.sources == ("hosts/web-1.yaml", "profiles/base.yaml")


def test_include_cycle_names_the_chain() -> None:
    err = error_of(
        "name: web-1\ninclude: [a]\n",
        {
            "profiles/a.yaml": "include: [b]\n",
            "profiles/b.yaml": "include: [c]\n",
            "profiles/c.yaml": "include: [a]\n",
        },
    )
    assert (err.path, err.key) == (HOST, "include")
    assert err.reason == "profiles/a.yaml: include: include cycle: a -> b -> c -> a"
    assert str(err) == "hosts/web-1.yaml: include: profiles/a.yaml: include: include cycle: a -> b -> c -> a"


def test_profile_including_itself() -> None:
    err = error_of("name: web-1\ninclude: [a]\n", {"profiles/a.yaml": "include: [a]\n"})
    assert err.reason == "profiles/a.yaml: include: include cycle: a -> a"


def test_unknown_profile() -> None:
    err = error_of("name: web-1\ninclude: [nope]\n")
    assert (err.path, err.key, err.reason) == (
        HOST,
        "include",
        "unknown profile 'nope' (no profiles/nope.yaml)",
    )


def test_error_in_a_profile_is_charged_to_each_including_host() -> None:
    fleet = parse_fleet(
        {
            "hosts/web-1.yaml": "name: web-1\ninclude: [base]\n",
            "hosts/web-2.yaml": "name: web-2\ninclude: [base]\n",
            "hosts/web-3.yaml": "name: web-3\n",
            "profiles/base.yaml": "name: base\n",
        }
    )
    assert list(fleet.hosts) == ["web-3"]
    assert fleet.invalid == frozenset({"web-1", "web-2"})
    reason = "profiles/base.yaml: name: unknown key (allowed: files, formats, include, network, services)"
    assert [(e.path, e.key, e.reason) for e in fleet.errors] == [
        ("hosts/web-1.yaml", "include", reason),
        ("hosts/web-2.yaml", "include", reason),
    ]


def test_profile_values_are_validated_after_merging() -> None:
    err = error_of("name: web-1\ninclude: [base]\n", {"profiles/base.yaml": "network: {gateway: nope}\n"})
    assert (err.path, err.key, err.reason) == (HOST, "network.gateway", "'nope' is not an IP address")


# -- names ------------------------------------------------------------------------------------


def test_name_is_required() -> None:
    err = error_of("formats: [aci]\n")
    assert (err.path, err.key, err.reason) == (HOST, "name", "is required")


def test_name_must_equal_the_file_stem() -> None:
    err = error_of("name: web-2\n")
    assert (err.path, err.key, err.reason) == (HOST, "name", "must equal the file stem 'web-1', got 'web-2'")


@pytest.mark.parametrize(
    "stem",
    ["Web-1", "-web", "web_1", "web.1", "a" * 64, "wéb", "web\n"],
)
def test_invalid_file_stem(stem: str) -> None:
    path = f"hosts/{stem}.yaml"
    err = error_of(f"name: {stem!r}\n", path=path)
    assert (err.path, err.key) == (path, "")
    assert err.reason == f"file name {stem!r} is not a valid host name (^[a-z0-9][a-z0-9-]{{0,62}}$)"
    assert str(err) == f"{path}: {err.reason}"


@pytest.mark.parametrize("stem", ["a", "0", "web-1", "a" * 63, "9-9", "web--1"])
def test_valid_file_stem(stem: str) -> None:
    fleet = parse_fleet({f"hosts/{stem}.yaml": f"name: '{stem}'\n"})
    assert fleet.errors == ()
    assert list(fleet.hosts) == [stem]


def test_a_name_ending_in_a_dash_is_a_host_but_cannot_name_an_aci() -> None:
    # appc's ACIdentifier (an ACI's name) ends in a letter or digit; actool refuses "web-".
    fleet = parse_fleet({"hosts/web-.yaml": "name: web-\nformats: [appimage]\n"})
    assert fleet.errors == () and list(fleet.hosts) == ["web-"]
    err = error_of("name: web-\nformats: [aci]\n", path="hosts/web-.yaml")
    assert (err.key, err.reason) == ("name", "'web-' cannot name an ACI: it must end with a letter or digit")
    assert error_of("name: web-\n", path="hosts/web-.yaml").key == "name"


def test_yml_extension_and_non_yaml_files() -> None:
    fleet = parse_fleet(
        {
            "hosts/web-1.yml": "name: web-1\n",
            "hosts/README.md": "# not a host",
            "hosts/sub/web-9.yaml": "name: web-9\n",
            "profiles/x.yaml": "name: [broken",
        }
    )
    assert list(fleet.hosts) == ["web-1"]
    assert fleet.errors == ()  # an unused broken profile is not an error of any host


@pytest.mark.parametrize(
    ("yaml_text", "yml_text"),
    [
        ("name: web-1\n", "name: web-1\n"),
        ("name: web-1\n", "name: [broken"),  # the valid one is not taken either, ...
        ("name: [broken", "name: web-1\n"),  # ... whichever sorts first
    ],
)
def test_a_host_in_two_files_is_taken_from_neither(yaml_text: str, yml_text: str) -> None:
    fleet = parse_fleet(
        {
            "hosts/web-1.yaml": yaml_text,
            "hosts/web-1.yml": yml_text,
            "hosts/web-2.yaml": "name: web-2\n",
        }
    )
    assert list(fleet.hosts) == ["web-2"]
    both = "host 'web-1' is defined twice: hosts/web-1.yaml and hosts/web-1.yml"
    assert [(e.path, e.key, e.reason) for e in fleet.errors] == [("hosts/web-1.yaml", "", both)]
    assert fleet.invalid == frozenset({"web-1"})


def test_a_profile_in_two_files_fails_the_hosts_that_include_it() -> None:
    fleet = parse_fleet(
        {
            "profiles/base.yaml": "formats: [aci]\n",
            "profiles/base.yml": "formats: [appimage]\n",
            "hosts/web-1.yaml": "name: web-1\ninclude: [base]\n",
            "hosts/web-2.yaml": "name: web-2\n",
        }
    )
    assert list(fleet.hosts) == ["web-2"]
    [error] = fleet.errors
    assert (error.path, error.key) == ("hosts/web-1.yaml", "include")
    assert "profile 'base' is defined twice: profiles/base.yaml and profiles/base.yml" in error.reason
    assert fleet.invalid == frozenset({"web-1"})


# -- document shape ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "name: web-1\nfoo: [1, 2\n",
            "invalid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'",
        ),
        ("name: web-1\n  bad: x\n", "invalid YAML at line 2, column 6: mapping values are not allowed here"),
        (
            "\tname: web-1\n",
            "invalid YAML at line 1, column 1: found character '\\t' that cannot start any token",
        ),
        (
            "name: !!python/object:os.system x\n",
            "invalid YAML at line 1, column 7: "
            "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object:os.system'",
        ),
        ("- a\n- b\n", "must be a mapping, not a list"),
        ("just text\n", "must be a mapping, not a string"),
        ("42\n", "must be a mapping, not int"),
    ],
)
def test_document_errors(text: str, reason: str) -> None:
    err = error_of(text)
    assert (err.path, err.key, err.reason) == (HOST, "", reason)


def test_empty_document_is_an_empty_mapping() -> None:
    err = error_of("# nothing here\n")
    assert (err.key, err.reason) == ("name", "is required")


def test_unknown_top_level_key() -> None:
    err = error_of("name: web-1\nhostname: web-1\n")
    assert (err.path, err.key) == (HOST, "hostname")
    assert err.reason == "unknown key (allowed: files, formats, include, name, network, services)"


def test_non_string_top_level_key() -> None:
    err = error_of("name: web-1\n1: x\n")
    assert (err.path, err.key, err.reason) == (HOST, "", "key 1 must be a string")


# -- per-key validation ----------------------------------------------------------------------------

NOT_RELATIVE = "must be a relative path inside the image"
BAD_COMPONENTS = "must not contain empty, '.' or '..' components"
RESERVED = "is reserved for the image builder"
EXEC_LIST = "must be a non-empty list of strings"
PORT_NAME = "must be an AC Name of at most 63 characters: lowercase words joined by -"


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        ("include: 3", "include", "must be a list of profile names"),
        ("include: [[a]]", "include", "must be a list of profile names"),
        # formats
        ("formats: []", "formats", "must be a non-empty list of aci, aci-thin, appimage, oci"),
        ("formats: {aci: 1}", "formats", "must be a non-empty list of aci, aci-thin, appimage, oci"),
        (
            "formats: [aci, docker]",
            "formats",
            "unknown format 'docker' (allowed: aci, aci-thin, appimage, oci)",
        ),
        ("formats: [ACI]", "formats", "unknown format 'ACI' (allowed: aci, aci-thin, appimage, oci)"),
        # network
        ("network: [10.0.0.1]", "network", "must be a mapping, not a list"),
        ("network: {mtu: 1500}", "network.mtu", "unknown key (allowed: address, dns, gateway)"),
        ("network: {address: 10.0.0.300/24}", "network.address", "'10.0.0.300/24' is not an address/prefix"),
        ("network: {address: 10.0.0.5/33}", "network.address", "'10.0.0.5/33' is not an address/prefix"),
        ("network: {address: web}", "network.address", "'web' is not an address/prefix"),
        ("network: {address: 10.0.0.5}", "network.address", "needs a prefix length, e.g. 10.0.0.5/24"),
        ("network: {gateway: nope}", "network.gateway", "'nope' is not an IP address"),
        ("network: {gateway: 10.0.0.1/24}", "network.gateway", "'10.0.0.1/24' is not an IP address"),
        # A scope is an interface: network.env is read by sh.
        (
            'network: {address: "fe80::5%x\\nHOSTNAME=spoofed\\n$(id)/64"}',
            "network.address",
            "'fe80::5%x\\nHOSTNAME=spoofed\\n$(id)/64' is not an address/prefix",
        ),
        (
            "network: {gateway: 'fe80::1%$(id)'}",
            "network.gateway",
            "'fe80::1%$(id)' is not an IP address",
        ),
        ("network: {dns: ['fe80::1%a b']}", "network.dns", "'a b' is no interface name"),
        ("network: {dns: 10.0.0.1}", "network.dns", "must be a list of IP addresses"),
        ("network: {dns: }", "network.dns", "must be a list of IP addresses"),
        (
            "network: {dns: [1.1.1.1, bogus]}",
            "network.dns",
            "'bogus' does not appear to be an IPv4 or IPv6 address",
        ),
        # services
        ("services: [web]", "services", "must be a mapping, not a list"),
        (
            "services: {Web: {exec: [bin/sh]}}",
            "services.Web",
            "service name must match ^[a-z0-9][a-z0-9_-]{0,62}$",
        ),
        (
            'services: {"web\\n": {exec: [bin/sh]}}',
            "services.web\n",
            "service name must match ^[a-z0-9][a-z0-9_-]{0,62}$",
        ),
        (
            "services: {1: {exec: [bin/sh]}}",
            "services.1",
            "service name must match ^[a-z0-9][a-z0-9_-]{0,62}$",
        ),
        ("services: {web: bin/sh}", "services.web", "must be a mapping, not a string"),
        (
            "services: {web: {exec: [bin/sh], user: root}}",
            "services.web.user",
            "unknown key (allowed: exec, package, ports, restart)",
        ),
        ("services: {web: {}}", "services.web.exec", EXEC_LIST),
        ("services: {web: {exec: []}}", "services.web.exec", EXEC_LIST),
        ("services: {web: {exec: bin/sh}}", "services.web.exec", EXEC_LIST),
        ("services: {web: {exec: [bin/sh, [x]]}}", "services.web.exec", EXEC_LIST),
        ("services: {web: {exec: [bin/sh, true]}}", "services.web.exec", EXEC_LIST),
        ("services: {web: {exec: [bin/sh, null]}}", "services.web.exec", EXEC_LIST),
        (
            'services: {web: {exec: [bin/sh, "a\\0b"]}}',
            "services.web.exec",
            "must not contain NUL characters",
        ),
        ("services: {web: {exec: [/bin/sh]}}", "services.web.exec", f"'/bin/sh' {NOT_RELATIVE}"),
        ("services: {web: {exec: [../bin/sh]}}", "services.web.exec", f"'../bin/sh' {BAD_COMPONENTS}"),
        ("services: {web: {exec: ['']}}", "services.web.exec", f"'' {NOT_RELATIVE}"),
        (
            "services: {web: {exec: [x], package: Site}}",
            "services.web.package",
            "must be a package name (^[a-z0-9][a-z0-9_-]{0,62}$)",
        ),
        (
            "services: {web: {exec: [x], package: 3}}",
            "services.web.package",
            "must be a package name (^[a-z0-9][a-z0-9_-]{0,62}$)",
        ),
        (
            "services: {web: {exec: [x], package: nope}}",
            "services.web.package",
            "unknown package 'nope' (no packages/nope.nix)",
        ),
        (
            "services: {web: {exec: [x], restart: sometimes}}",
            "services.web.restart",
            "must be one of always, on-failure, never, got 'sometimes'",
        ),
        (
            "services: {web: {exec: [x], restart: [always]}}",
            "services.web.restart",
            "must be one of always, on-failure, never, got ['always']",
        ),
        # ports
        (
            "services: {web: {exec: [x], ports: {http: 80}}}",
            "services.web.ports",
            "must be a list of {name, port, protocol}, not a mapping",
        ),
        (
            "services: {web: {exec: [x], ports: [80]}}",
            "services.web.ports[0]",
            "must be a mapping with name, port and protocol, not int",
        ),
        (
            "services: {web: {exec: [x], ports: [{name: http, port: 80, proto: tcp}]}}",
            "services.web.ports[0].proto",
            "unknown key (allowed: name, port, protocol)",
        ),
        ("services: {web: {exec: [x], ports: [{port: 80}]}}", "services.web.ports[0].name", "is required"),
        ("services: {web: {exec: [x], ports: [{name: http}]}}", "services.web.ports[0].port", "is required"),
        *[
            (
                f"services: {{web: {{exec: [x], ports: [{{name: {name}, port: 80}}]}}}}",
                "services.web.ports[0].name",
                PORT_NAME,
            )
            for name in ("HTTP", "web.http", "http-", "-http", "a_b", "'a/b'", "3", "a" * 64, "''")
        ],
        *[
            (
                f"services: {{web: {{exec: [x], ports: [{{name: http, port: {port}}}]}}}}",
                "services.web.ports[0].port",
                f"must be a port number from 1 to 65535, got {shown}",
            )
            for port, shown in (
                ("0", "0"),
                ("65536", "65536"),
                ("-1", "-1"),
                ("'80'", "'80'"),
                ("true", "True"),
            )
        ],
        (
            "services: {web: {exec: [x], ports: [{name: http, port: 80, protocol: TCP}]}}",
            "services.web.ports[0].protocol",
            "must be one of tcp, udp, got 'TCP'",
        ),
        (
            "services: {web: {exec: [x], ports: [{name: http, port: 80, protocol: sctp}]}}",
            "services.web.ports[0].protocol",
            "must be one of tcp, udp, got 'sctp'",
        ),
        (
            "services: {web: {exec: [x], ports: [{name: http, port: 80}, {name: http, port: 81}]}}",
            "services.web.ports[1].name",
            "port name 'http' is already used by services.web.ports[0]",
        ),
        (
            "services: {web: {exec: [x], ports: [{name: a, port: 80}, {name: b, port: 80, protocol: tcp}]}}",
            "services.web.ports[1].port",
            "tcp port 80 is already declared by services.web.ports[0]",
        ),
        (
            "services: {a: {exec: [x], ports: [{name: http, port: 80}]},"
            " b: {exec: [x], ports: [{name: dns, port: 53, protocol: udp}, {name: http, port: 81}]}}",
            "services.b.ports[1].name",
            "port name 'http' is already used by services.a.ports[0]",
        ),
        (
            "services: {a: {exec: [x], ports: [{name: one, port: 53, protocol: udp}]},"
            " b: {exec: [x], ports: [{name: two, port: 53, protocol: udp}]}}",
            "services.b.ports[0].port",
            "udp port 53 is already declared by services.a.ports[0]",
        ),
        # files
        ("files: [etc/motd]", "files", "must be a mapping, not a list"),
        ("files: {../x: a}", "files.../x", f"'../x' {BAD_COMPONENTS}"),
        ("files: {etc/../../x: a}", "files.etc/../../x", f"'etc/../../x' {BAD_COMPONENTS}"),
        ("files: {./x: a}", "files../x", f"'./x' {BAD_COMPONENTS}"),
        # The image builder's cp and mkdir would take it for an option.
        ("files: {-rf: a}", "files.-rf", "'-rf' must not start with '-'"),
        ("files: {etc//x: a}", "files.etc//x", f"'etc//x' {BAD_COMPONENTS}"),
        ("files: {etc/x/: a}", "files.etc/x/", f"'etc/x/' {BAD_COMPONENTS}"),
        ("files: {/etc/x: a}", "files./etc/x", f"'/etc/x' {NOT_RELATIVE}"),
        ("files: {'': a}", "files.", f"'' {NOT_RELATIVE}"),
        ('files: {"etc\\\\x": a}', "files.etc\\x", f"'etc\\\\x' {NOT_RELATIVE}"),
        ("files: {AppRun: a}", "files.AppRun", RESERVED),
        ("files: {.reconciler/x: a}", "files..reconciler/x", RESERVED),
        ("files: {etc/reconciler/host.json: a}", "files.etc/reconciler/host.json", RESERVED),
        ("files: {etc/service/web/run: a}", "files.etc/service/web/run", RESERVED),
        ("files: {bin/busybox: a}", "files.bin/busybox", RESERVED),
        # The ACI's directories for the executor's mounts and for temporary files.
        *[
            (f"files: {{{p}: a}}", f"files.{p}", RESERVED)
            for p in ("tmp", "tmp/x", "var/tmp/x", "var", "run/x")
        ],
        *[(f"files: {{{p}: a}}", f"files.{p}", RESERVED) for p in ("dev/null", "proc/x", "sys", "dev")],
        # A file that is a parent directory of a reserved path would shadow it too.
        ("files: {etc: a}", "files.etc", RESERVED),
        ("files: {bin: a}", "files.bin", RESERVED),
        ("files: {etc/app: a, etc/app/conf: b}", "files.etc/app/conf", "its parent 'etc/app' is also a file"),
        (
            "files: {srv: a, srv/www/index.html: b}",
            "files.srv/www/index.html",
            "its parent 'srv' is also a file",
        ),
        ("files: {etc/motd: 3}", "files.etc/motd", "content must be a string, not int"),
        ("files: {etc/motd: }", "files.etc/motd", "content must be a string, not empty"),
        ("files: {etc/motd: [a]}", "files.etc/motd", "content must be a string, not a list"),
        ('files: {etc/motd: "a\\0b"}', "files.etc/motd", "content must be text without NUL characters"),
        ("files: {1: a}", "files.1", "file names must be strings"),
    ],
)
def test_validation_error_names_file_key_and_reason(body: str, key: str, reason: str) -> None:
    err = error_of(f"name: web-1\n{body}\n")
    assert (err.path, err.key, err.reason) == (HOST, key, reason)
    assert str(err) == f"{HOST}: {key}: {reason}"


@pytest.mark.parametrize(
    "name",
    ["etc/motd", "etc/reconciler-notes", "etc/services", "binary", "srv/www/index.html", "AppRun2", "e/t/c"],
)
def test_allowed_file_names(name: str) -> None:
    host = host_of(f"name: web-1\nfiles: {{{name}: x}}\n")
    assert host.files == ((name, "x"),)


def test_network_is_normalised() -> None:
    host = host_of(
        "name: web-1\n"
        "network: {address: 2001:DB8::1/64, gateway: '2001:db8:0:0::fe', dns: [2001:DB8::53, 9.9.9.9]}\n"
    )
    assert host.network == Network(
        address="2001:db8::1/64", gateway="2001:db8::fe", dns=("2001:db8::53", "9.9.9.9")
    )
    scoped = host_of("name: web-1\nnetwork: {address: 'fe80::5%eth0/64', gateway: 'fe80::1%eth0.12'}\n")
    assert scoped.network == Network(address="fe80::5%eth0/64", gateway="fe80::1%eth0.12")


def test_formats_are_normalised() -> None:
    assert host_of("name: web-1\nformats: [appimage, aci, appimage]\n").formats == ("aci", "appimage")
    assert host_of("name: web-1\nformats: aci\n").formats == ("aci",)
    every = host_of("name: web-1\nformats: [oci, appimage, aci-thin, aci]\n")
    assert every.formats == ("aci", "aci-thin", "appimage", "oci")


def test_the_default_formats_stay_those_of_every_release_so_far() -> None:
    """An upgrade must not change the shape of an existing fleet's releases."""
    assert host_of("name: web-1\n").formats == ("aci", "appimage")


def test_exec_numbers_become_strings() -> None:
    host = host_of("name: web-1\nservices: {web: {exec: [bin/busybox, httpd, -p, 8080, 1.5]}}\n")
    assert host.services[0].exec == ("bin/busybox", "httpd", "-p", "8080", "1.5")


def test_one_bad_host_does_not_stop_the_others() -> None:
    fleet = parse_fleet(
        {
            "hosts/a-1.yaml": "name: a-1\n",
            "hosts/b-1.yaml": "name: b-1\nnetwork: {gateway: nope}\n",
            "hosts/c-1.yaml": "name: [",
            "hosts/d-1.yaml": "name: d-1\nformats: [aci]\n",
            "hosts/E.yaml": "name: E\n",
        }
    )
    assert sorted(fleet.hosts) == ["a-1", "d-1"]
    assert fleet.hosts["d-1"].formats == ("aci",)
    assert [(e.path, e.key) for e in fleet.errors] == [
        ("hosts/E.yaml", ""),
        ("hosts/b-1.yaml", "network.gateway"),
        ("hosts/c-1.yaml", ""),
    ]
    assert fleet.invalid == frozenset({"E", "b-1", "c-1"})


# -- to_nix normalisation -----------------------------------------------------------------------


def test_to_nix_ignores_formatting_comments_and_key_order() -> None:
    block = """\
# the web host
name: web-1
formats:
  - aci
  - appimage
network:
  address: 10.42.0.11/24   # static
  gateway: 10.42.0.1
services:
  web:
    exec:
      - bin/busybox
      - httpd
    restart: always
  cron:
    exec: [bin/busybox, crond, -f]
files:
  etc/motd: "hello\\n"
  etc/hosts: |
    127.0.0.1 localhost
"""
    flow = (
        "{files: {'etc/hosts': \"127.0.0.1 localhost\\n\", etc/motd: 'hello\n\n  '},"
        "  services: {cron: {restart: always, exec: [bin/busybox, crond, '-f'], package: busybox},"
        "  web: {exec: [bin/busybox, httpd]}}, network: {gateway: '10.42.0.1', address: \"10.42.0.11/24\"},"
        "  formats: [appimage, aci], name: web-1}"
    )
    a, b = host_of(block), host_of(flow)
    assert a == b
    assert a.to_nix() == b.to_nix()
    assert a.to_nix()["files"] == {"etc/hosts": "127.0.0.1 localhost\n", "etc/motd": "hello\n"}
    assert list(a.to_nix()["services"]) == ["cron", "web"]


# -- read_tree ----------------------------------------------------------------------------------


def write(root: Path, rel: str, data: str | bytes) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data)
    return p


def test_read_tree_reads_definitions_and_package_names(tmp_path: Path) -> None:
    write(tmp_path, "hosts/web-1.yaml", WEB)
    write(tmp_path, "hosts/notes.txt", "ignored")
    write(tmp_path, "hosts/sub/web-9.yaml", "name: web-9\n")
    write(tmp_path, "profiles/base.yaml", BASE)
    write(tmp_path, "packages/site.nix", "{ toolchain }: derivation {}")
    write(tmp_path, "packages/README.md", "ignored")
    write(tmp_path, "other/x.yaml", "ignored")
    assert read_tree(tmp_path) == {
        "hosts/web-1.yaml": WEB,
        "profiles/base.yaml": BASE,
        "packages/site.nix": "",
    }
    fleet = parse_fleet(read_tree(tmp_path))
    assert fleet.errors == ()
    assert fleet.hosts["web-1"].inputs() == ("hosts/web-1.yaml", "profiles/base.yaml", "packages/site.nix")


def test_read_tree_reads_yml_files_and_every_directory_present(tmp_path: Path) -> None:
    # No hosts/ at all: profiles/ and packages/ are still read.
    write(tmp_path, "profiles/base.yml", BASE)
    write(tmp_path, "packages/webapp.nix", "{ toolchain }: derivation {}")
    assert read_tree(tmp_path) == {"profiles/base.yml": BASE, "packages/webapp.nix": ""}
    write(
        tmp_path,
        "hosts/web-1.yml",
        "name: web-1\ninclude: [base]\nservices: {web: {package: webapp, exec: [x]}}\n",
    )
    fleet = parse_fleet(read_tree(tmp_path))
    assert fleet.errors == ()
    assert fleet.hosts["web-1"].packages == ("webapp",)
    assert fleet.hosts["web-1"].inputs() == ("hosts/web-1.yml", "profiles/base.yml", "packages/webapp.nix")


def test_a_key_that_is_not_a_string_is_reported_at_its_mapping() -> None:
    err = error_of("name: web-1\nnetwork: {1: x}\n")
    assert (err.key, err.reason) == ("network", "key 1 must be a string")


def test_a_file_below_another_file_is_refused_at_any_depth() -> None:
    err = error_of("name: web-1\nfiles: {srv/a: x, srv/a/b/c/d: y}\n")
    assert (err.key, err.reason) == ("files.srv/a/b/c/d", "its parent 'srv/a' is also a file")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("services: {1: {exec: [x]}, web: {exec: [x]}}", "services.1", "service name must match"),
        ("files: {1: x, etc/motd: y}", "files.1", "file names must be strings"),
        ('files: {"srv/a\\0b": x}', "files.srv/a\0b", "must be a relative path inside the image"),
    ],
)
def test_names_of_any_type_or_content_are_refused_cleanly(text: str, key: str, reason: str) -> None:
    err = error_of(f"name: web-1\n{text}\n")
    assert err.key == key and reason in err.reason, err


def test_read_tree_of_an_empty_checkout(tmp_path: Path) -> None:
    assert read_tree(tmp_path) == {}
    assert parse_fleet({}) == Fleet(hosts={}, errors=())


def test_read_tree_refuses_symlinks_big_and_unreadable_files_one_by_one(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write(repo, "hosts/good.yaml", "name: good\n")
    outside = write(tmp_path, "outside/evil.yaml", "name: evil\n")
    os.symlink(outside, repo / "hosts" / "evil.yaml")
    os.symlink("good.yaml", repo / "hosts" / "alias.yaml")  # even inside the repo
    write(repo, "hosts/big.yaml", "name: big\n" + "#" * MAX_FILE_BYTES)
    write(repo, "hosts/latin.yaml", b'name: latin\nfiles: {etc/motd: "\xe9"}\n')
    (repo / "hosts" / "dir.yaml").mkdir()

    fleet = parse_fleet(read_tree(repo))
    assert list(fleet.hosts) == ["good"]
    errors = {e.path: e for e in fleet.errors}
    assert sorted(errors) == [
        "hosts/alias.yaml",
        "hosts/big.yaml",
        "hosts/dir.yaml",
        "hosts/evil.yaml",
        "hosts/latin.yaml",
    ]
    assert all(e.key == "" for e in fleet.errors)
    symlink = "is a symlink; definitions must live in the repository"
    assert errors["hosts/evil.yaml"].reason == symlink
    assert str(errors["hosts/evil.yaml"]) == f"hosts/evil.yaml: {symlink}"
    assert errors["hosts/alias.yaml"].reason == symlink
    assert errors["hosts/big.yaml"].reason == f"is larger than {MAX_FILE_BYTES} bytes"
    assert errors["hosts/latin.yaml"].reason == (
        "cannot be read: 'utf-8' codec can't decode byte 0xe9 in position 31: invalid continuation byte"
    )
    assert errors["hosts/dir.yaml"].reason.startswith("cannot be read: [Errno 21] Is a directory")
    assert fleet.invalid == frozenset({"alias", "big", "dir", "evil", "latin"})


def test_read_tree_exactly_max_size_is_read(tmp_path: Path) -> None:
    text = "name: web-1\n"
    text += "#" * (MAX_FILE_BYTES - len(text))
    write(tmp_path, "hosts/web-1.yaml", text)
    assert list(parse_fleet(read_tree(tmp_path)).hosts) == ["web-1"]


def test_read_tree_symlinked_profile_costs_only_its_hosts(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    outside = write(tmp_path, "outside/base.yaml", "formats: [aci]\n")
    (repo / "profiles").mkdir(parents=True)
    os.symlink(outside, repo / "profiles" / "base.yaml")
    write(repo, "hosts/web-1.yaml", "name: web-1\ninclude: [base]\n")
    write(repo, "hosts/web-2.yaml", "name: web-2\n")
    fleet = parse_fleet(read_tree(repo))
    assert list(fleet.hosts) == ["web-2"]
    assert [str(e) for e in fleet.errors] == [
        "hosts/web-1.yaml: include: profiles/base.yaml: is a symlink; definitions must live in the repository"
    ]


def test_read_tree_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write(tmp_path, "elsewhere/web-1.yaml", "name: web-1\n")
    repo.mkdir()
    os.symlink(tmp_path / "elsewhere", repo / "hosts")
    with pytest.raises(ConfigError) as exc:
        read_tree(repo)
    assert (exc.value.path, exc.value.key) == ("hosts", "")
    assert exc.value.reason == "is a symlink; definitions must live in the repository"


# -- deep_merge ------------------------------------------------------------------------------------


def test_deep_merge_examples() -> None:
    base = {"a": 1, "n": {"x": 1, "y": {"p": 1}}, "l": [1, 2]}
    over = {"a": 2, "n": {"y": {"q": 2}, "z": 3}, "l": [3]}
    assert deep_merge(base, over) == {"a": 2, "n": {"x": 1, "y": {"p": 1, "q": 2}, "z": 3}, "l": [3]}
    # A mapping replaces a scalar and vice versa; lists are not concatenated.
    assert deep_merge({"k": 1}, {"k": {"x": 1}}) == {"k": {"x": 1}}
    assert deep_merge({"k": {"x": 1}}, {"k": None}) == {"k": None}
    # Inputs are not mutated.
    assert base == {"a": 1, "n": {"x": 1, "y": {"p": 1}}, "l": [1, 2]}


# -- property tests --------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
keys = st.sampled_from(["a", "b", "c", "d"])
trees: st.SearchStrategy[dict[str, Any]] = st.recursive(
    st.dictionaries(keys, scalars, max_size=3),
    lambda children: st.dictionaries(keys, st.one_of(scalars, children), max_size=3),
    max_leaves=12,
)


def leaves(d: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def lookup(d: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for k in path:
        d = d[k]
    return d


def has_prefix(d: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    """Whether ``d`` defines any prefix of ``path`` as something other than a mapping, or path itself."""
    cur: Any = d
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return False
        cur = cur[k]
        if not isinstance(cur, dict):
            return True
    return True


@PROPERTY
@given(trees, trees)
def test_deep_merge_laws(base: dict[str, Any], over: dict[str, Any]) -> None:
    merged = deep_merge(base, over)
    # Host wins: every leaf of the overriding mapping is in the result as is.
    for path, value in leaves(over):
        assert lookup(merged, path) == value
    # Base leaves survive unless the override touches their path.
    for path, value in leaves(base):
        if not has_prefix(over, path):
            assert lookup(merged, path) == value
    assert set(merged) == set(base) | set(over)


@PROPERTY
@given(trees)
def test_deep_merge_identity_and_idempotence(d: dict[str, Any]) -> None:
    assert deep_merge(d, {}) == d
    assert deep_merge({}, d) == d
    assert deep_merge(d, d) == d


def check_accepted(host: Host, stem: str) -> None:
    """What every accepted host satisfies: a valid name that is its file's stem, only
    known formats and clean names, and a normalised form (``to_nix``, what Nix gets)
    that is itself a host file parsing back to the same host."""
    assert host.name == stem and hosts.NAME_RE.fullmatch(host.name)
    assert host.formats and host.formats == tuple(f for f in hosts.FORMATS if f in host.formats)
    assert all(hosts.SERVICE_RE.fullmatch(s.name) and s.exec for s in host.services)
    assert all(s.restart in hosts.RESTART_POLICIES for s in host.services)
    for name, content in host.files:
        assert not name.startswith("/") and posixpath.normpath(name) == name and "\0" not in content
    ports = [p for s in host.services for p in s.ports]
    assert all(appc.is_ac_name(p.name) and 1 <= p.port <= 65535 for p in ports)
    assert len({p.name for p in ports}) == len({(p.port, p.protocol) for p in ports}) == len(ports)
    packages = {f"packages/{p}.nix": "" for p in host.packages if p not in hosts.BUILTIN_PACKAGES}
    again = parse_fleet({f"hosts/{stem}.yaml": yaml.safe_dump(host.to_nix()), **packages})
    assert again.errors == (), [str(e) for e in again.errors]
    assert again.hosts[stem] == host
    assert again.hosts[stem].to_nix() == host.to_nix()


@PROPERTY
@given(st.text(), st.text())
def test_parse_fleet_never_raises_on_arbitrary_text(host_text: str, profile_text: str) -> None:
    fleet = parse_fleet({HOST: host_text, "profiles/base.yaml": profile_text})
    assert len(fleet.hosts) + len(fleet.errors) == 1
    for e in fleet.errors:
        assert e.path == HOST
        assert e.reason
    assert fleet.invalid == ({"web-1"} if fleet.errors else set())
    for host in fleet.hosts.values():
        check_accepted(host, "web-1")


yaml_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(max_size=12),
        st.sampled_from(["aci", "appimage", "10.0.0.1", "10.0.0.1/24", "bin/sh", "../x", "/etc/x", "always"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(
                st.sampled_from(
                    [
                        "address",
                        "gateway",
                        "dns",
                        "exec",
                        "package",
                        "restart",
                        "web",
                        "etc/motd",
                        "etc",
                        "base",
                    ]
                ),
                st.text(max_size=6),
                st.integers(),
            ),
            children,
            max_size=4,
        ),
    ),
    max_leaves=16,
)


@PROPERTY
@given(
    st.fixed_dictionaries(
        {"name": st.just("web-1")},
        optional={
            "include": st.one_of(st.just(["base"]), yaml_values),
            "formats": yaml_values,
            "network": yaml_values,
            "services": yaml_values,
            "files": yaml_values,
        },
    ),
    st.dictionaries(st.sampled_from(["network", "services", "files", "formats", "include"]), yaml_values),
)
def test_parse_fleet_never_raises_on_arbitrary_structures(
    host: dict[str, Any], profile: dict[str, Any]
) -> None:
    fleet = parse_fleet(
        {
            HOST: yaml.safe_dump(host, sort_keys=False),
            "profiles/base.yaml": yaml.safe_dump(profile, sort_keys=False),
        }
    )
    assert len(fleet.hosts) + len(fleet.errors) == 1
    assert all(e.path == HOST and e.reason for e in fleet.errors)
    if fleet.hosts:
        nix = fleet.hosts["web-1"].to_nix()
        assert nix["name"] == "web-1"
        assert nix["formats"] in (["aci"], ["appimage"], ["aci", "appimage"])
        check_accepted(fleet.hosts["web-1"], "web-1")


segments = st.one_of(
    st.sampled_from(["..", ".", "", "etc", "x"]),
    st.text(alphabet=string.ascii_lowercase + "./\\", min_size=1, max_size=5),
)


@PROPERTY
@given(st.lists(segments, min_size=1, max_size=5), st.booleans())
def test_traversal_in_file_names_is_refused(parts: list[str], absolute: bool) -> None:
    name = ("/" if absolute else "") + "/".join(parts)
    fleet = one_host(yaml.safe_dump({"name": "web-1", "files": {name: "x"}}))
    split = name.split("/")
    escapes = absolute or "\\" in name or any(p in ("", ".", "..") for p in split)
    if escapes:
        assert dict(fleet.hosts) == {}
        (err,) = fleet.errors
        assert (err.path, err.key) == (HOST, f"files.{name}")
    elif fleet.hosts:
        (accepted,) = fleet.hosts["web-1"].files
        assert accepted == (name, "x")
        assert posixpath.normpath(name) == name
    else:
        # The only other refusal of a clean relative path is a reserved name.
        (err,) = fleet.errors
        assert (err.key, err.reason) == (f"files.{name}", RESERVED)


@PROPERTY
@given(st.text(max_size=20))
def test_any_accepted_file_name_stays_inside_the_image(name: str) -> None:
    text = yaml.safe_dump({"name": "web-1", "files": {name: "x"}})
    assume(yaml.safe_load(text) == {"name": "web-1", "files": {name: "x"}})
    fleet = one_host(text)
    if fleet.errors:
        (err,) = fleet.errors
        assert err.key == f"files.{name}"
        return
    (accepted,) = fleet.hosts["web-1"].files
    assert accepted[0] == name
    assert not name.startswith("/")
    assert posixpath.normpath(name) == name
    assert ".." not in name.split("/")
    assert posixpath.normpath(posixpath.join("/image", name)).startswith("/image/")


@PROPERTY
@given(st.lists(segments, min_size=1, max_size=4), st.booleans())
def test_traversal_in_exec_is_refused(parts: list[str], absolute: bool) -> None:
    argv0 = ("/" if absolute else "") + "/".join(parts)
    fleet = one_host(yaml.safe_dump({"name": "web-1", "services": {"web": {"exec": [argv0]}}}))
    escapes = absolute or "\\" in argv0 or any(p in ("", ".", "..") for p in argv0.split("/"))
    if escapes:
        (err,) = fleet.errors
        assert (err.path, err.key) == (HOST, "services.web.exec")
    else:
        assert fleet.errors == ()
        assert fleet.hosts["web-1"].services[0].exec == (argv0,)


# A strategy for valid host definitions, to check that formatting never shows.
ident = st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}", fullmatch=True)
ipv4 = st.ip_addresses(v=4).map(str)
# NEL and the Unicode line/paragraph separators are left out: PyYAML's emitter with
# allow_unicode=True writes them raw and its reader then folds them (a PyYAML quirk,
# not something the reconciler could normalise).
plain_text = st.text(st.characters(codec="utf-8", exclude_characters="\0\x85\u2028\u2029"), max_size=30)
valid_hosts = st.fixed_dictionaries(
    {"name": st.just("web-1")},
    optional={
        "formats": st.lists(st.sampled_from(["aci", "appimage"]), min_size=1, max_size=3),
        "network": st.fixed_dictionaries(
            {},
            optional={
                "address": st.tuples(ipv4, st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
                "gateway": ipv4,
                "dns": st.lists(ipv4, max_size=3),
            },
        ),
        "services": st.dictionaries(
            ident,
            st.fixed_dictionaries(
                {
                    "exec": st.tuples(
                        st.sampled_from(["bin/busybox", "srv/app"]), st.lists(plain_text, max_size=3)
                    ).map(lambda t: [t[0], *t[1]])
                },
                optional={
                    "package": st.sampled_from(["busybox", "site"]),
                    "restart": st.sampled_from(["always", "on-failure", "never"]),
                },
            ),
            max_size=3,
        ),
        "files": st.dictionaries(ident.map(lambda s: f"srv/{s}"), plain_text, max_size=4),
    },
)


def shuffled(data: Any, rnd: random.Random) -> Any:
    """``data`` with every mapping's keys in a random order, recursively."""
    if isinstance(data, dict):
        items = [(k, shuffled(v, rnd)) for k, v in data.items()]
        rnd.shuffle(items)
        return dict(items)
    if isinstance(data, list):
        return [shuffled(v, rnd) for v in data]
    return data


@PROPERTY
@given(
    valid_hosts,
    st.sampled_from([None, True, False]),
    st.booleans(),
    st.randoms(use_true_random=False),
    st.sampled_from([None, 2, 4]),
)
def test_to_nix_is_stable_under_yaml_reserialisation(
    data: dict[str, Any], flow: bool | None, sort_keys: bool, rnd: random.Random, indent: int | None
) -> None:
    packages = {"packages/site.nix": ""}
    reference = one_host(yaml.safe_dump(data), packages)
    assert reference.errors == (), [str(e) for e in reference.errors]
    host = reference.hosts["web-1"]
    text = yaml.safe_dump(
        shuffled(data, rnd), default_flow_style=flow, sort_keys=sort_keys, indent=indent, allow_unicode=True
    )
    again = one_host("# reformatted\n" + text, packages)
    assert again.errors == ()
    assert again.hosts["web-1"] == host
    assert again.hosts["web-1"].to_nix() == host.to_nix()
    check_accepted(host, "web-1")
    # And the normalised form reflects the data.
    nix = host.to_nix()
    assert nix["files"] == data.get("files", {})
    assert sorted(nix["services"]) == sorted(data.get("services", {}))
    assert nix["formats"] == [f for f in ("aci", "appimage") if f in data.get("formats", ["aci", "appimage"])]


@PROPERTY
@given(valid_hosts, st.sampled_from([[], ["base"]]))
def test_a_parse_result_reads_back_as_the_same_host(data: dict[str, Any], include: list[str]) -> None:
    files = {
        "hosts/web-1.yaml": yaml.safe_dump({**data, "include": include}),
        "profiles/base.yaml": "files: {etc/base: x}\n",
        "packages/site.nix": "",
    }
    host = parse_fleet(files).hosts["web-1"]
    again = decode_parsed(encode_parsed(host))
    assert again == host and again.sources == host.sources and again.to_nix() == host.to_nix()
    # The canonical JSON it carries is what it would compute (it keys the evaluation cache).
    assert again.nix_json == json.dumps(again.to_nix(), sort_keys=True, separators=(",", ":"))


def test_a_parse_error_reads_back_as_the_same_error() -> None:
    (error,) = parse_fleet({"hosts/a.yaml": "name: a\nformats: [tar]\n"}).errors
    again = decode_parsed(encode_parsed(error))
    assert isinstance(again, ConfigError) and (again.path, again.key, again.reason) == (
        error.path,
        error.key,
        error.reason,
    )


@pytest.mark.parametrize("name", [".DirIcon", "web-1.desktop", "web-1.svg"])
def test_files_may_not_replace_the_appimage_desktop_entry_or_icon(name: str) -> None:
    fleet = parse_fleet({"hosts/web-1.yaml": f"name: web-1\nfiles: {{{name}: x}}\n"})
    reason = "is reserved for the image builder"
    assert [str(e) for e in fleet.errors] == [f"hosts/web-1.yaml: files.{name}: {reason}"]


def test_other_desktop_files_are_allowed() -> None:
    fleet = parse_fleet({"hosts/web-1.yaml": "name: web-1\nfiles: {web-2.desktop: x, share/web-1.svg: y}\n"})
    assert fleet.errors == ()


def test_parse_cache_reuses_unchanged_hosts_and_revalidates_on_profile_change() -> None:
    files = {
        "profiles/base.yaml": "network: {gateway: 10.0.0.1}\n",
        "hosts/a.yaml": "name: a\ninclude: [base]\n",
        "hosts/b.yaml": "name: b\ninclude: [base]\n",
    }
    cache = ParseCache()
    first = parse_fleet(files, cache)
    again = parse_fleet({**files, "hosts/b.yaml": "name: b\ninclude: [base]\nformats: [aci]\n"}, cache)
    assert again.hosts["a"] is first.hosts["a"]
    assert again.hosts["b"].formats == ("aci",)
    changed = parse_fleet({**files, "profiles/base.yaml": "network: {gateway: 10.0.0.9}\n"}, cache)
    assert changed.hosts["a"].network.gateway == "10.0.0.9"
    # Only what the last call saw is kept.
    assert {k[0] for k in cache.hosts} == {"hosts/a.yaml", "hosts/b.yaml"}
    assert len(cache.docs) == 3


def test_parse_cache_keeps_errors_per_file() -> None:
    cache = ParseCache()
    files = {"hosts/a.yaml": "name: a\nformats: [tar]\n"}
    first = parse_fleet(files, cache)
    second = parse_fleet(files, cache)
    assert [str(e) for e in second.errors] == [str(e) for e in first.errors]
    assert "formats: unknown format 'tar'" in str(second.errors[0])


host_stems = st.sampled_from(["web-1", "web-2", "Bad_Name", "db"])
host_texts = st.sampled_from(
    ["name: {stem}\n", "name: {stem}\ninclude: [base]\n", "name: [broken", "name: other\n"]
)


@given(
    st.dictionaries(st.tuples(host_stems, st.sampled_from([".yaml", ".yml"])), host_texts, max_size=6),
    st.sets(st.sampled_from(["profiles/base.yaml", "profiles/base.yml"])),
)
def test_every_host_file_gives_one_host_or_one_error(
    host_files: dict[tuple[str, str], str], profile_files: set[str]
) -> None:
    files = {f"hosts/{stem}{ext}": text.format(stem=stem) for (stem, ext), text in host_files.items()}
    files |= dict.fromkeys(profile_files, "formats: [aci]\n")
    fleet = parse_fleet(files)
    stems = {stem for stem, _ in host_files}
    assert set(fleet.hosts) | fleet.invalid == stems
    assert not set(fleet.hosts) & fleet.invalid
    assert sorted(Path(e.path).stem for e in fleet.errors) == sorted(fleet.invalid)
    for name, host in fleet.hosts.items():
        check_accepted(host, name)


# -- YAML limits: depth, size, aliases -----------------------------------------------------------


def refusal(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_yaml("f.yaml", text)
    assert info.value.path == "f.yaml"
    return info.value


def depth_of(value: object) -> int:
    """Nesting depth of loaded data: collections count, scalars do not."""
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def flow_nesting(depth: int) -> str:
    # The top-level mapping is one level.
    return "a: " + "[" * (depth - 1) + "]" * (depth - 1) + "\n"


def block_nesting(depth: int) -> str:
    return "".join("  " * i + "k:\n" for i in range(depth - 1)) + "  " * (depth - 1) + "k: x\n"


def alias_nesting(depth: int) -> str:
    # Each anchor holds the previous one one level deeper: little text, deep data.
    lines = ["a1: &a1 [x]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(2, depth)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("nesting", [flow_nesting, block_nesting, alias_nesting])
def test_nesting_up_to_the_limit_is_accepted(nesting: Callable[[int], str]) -> None:
    assert depth_of(parse_yaml("f.yaml", nesting(MAX_DEPTH))) == MAX_DEPTH


def test_one_level_too_deep_is_refused_where_it_happens() -> None:
    err = refusal(flow_nesting(MAX_DEPTH + 1))
    assert (err.key, err.reason) == (
        "",
        f"nested deeper than {MAX_DEPTH} levels at line 1, column {MAX_DEPTH + 3}",
    )
    err = refusal(block_nesting(MAX_DEPTH + 1))
    # The innermost mapping begins at its first key.
    assert (
        err.reason
        == f"nested deeper than {MAX_DEPTH} levels at line {MAX_DEPTH + 1}, column {2 * MAX_DEPTH + 1}"
    )
    err = refusal(alias_nesting(MAX_DEPTH + 1))
    alias = f"*a{MAX_DEPTH - 1} at line {MAX_DEPTH}, column {2 * len(str(MAX_DEPTH)) + 8}"
    assert err.reason == f"nested deeper than {MAX_DEPTH} levels (alias {alias})"


def test_a_host_nested_50000_deep_is_invalid_and_the_others_are_not() -> None:
    # libyaml composes nodes recursively in C: this used to kill the process (SIGSEGV).
    deep = "name: web-1\nfiles: " + "[" * 50_000 + "]" * 50_000 + "\n"
    fleet = parse_fleet({"hosts/web-1.yaml": deep, "hosts/web-2.yaml": "name: web-2\n"})
    assert list(fleet.hosts) == ["web-2"]
    [err] = fleet.errors
    assert (err.path, err.key) == ("hosts/web-1.yaml", "")
    assert err.reason == f"nested deeper than {MAX_DEPTH} levels at line 2, column {MAX_DEPTH + 7}"


def node_bomb(nodes: int) -> str:
    """A document of exactly ``nodes`` nodes once its aliases are expanded; little text."""
    unit = 1024  # an anchored list of 1023 empty strings
    fixed = 1 + 3 + unit + 2  # root, keys a b c, the anchored list, lists b and c
    copies, pad = divmod(nodes - fixed, unit)
    return "a: &x [" + "'', " * (unit - 1) + "]\nb: [" + "*x, " * copies + "]\nc: [" + "'', " * pad + "]\n"


def chars_bomb(chars: int) -> str:
    """A document of exactly ``chars`` characters of scalars once its aliases are expanded."""
    unit = 1000
    copies, pad = divmod(chars - 3 - unit, unit)  # keys a b c, the anchored string
    return f"a: &x {'x' * unit}\nb: [{'*x, ' * copies}]\nc: '{'y' * pad}'\n"


def test_nodes_up_to_the_limit_are_accepted_and_one_more_refused() -> None:
    data = parse_yaml("f.yaml", node_bomb(MAX_NODES))
    assert len(data["b"]) * 1024 + len(data["c"]) + 1030 == MAX_NODES
    err = refusal(node_bomb(MAX_NODES + 1))
    assert err.reason.startswith(
        f"holds more than {MAX_NODES} nodes, aliases expanded (reached at line 3, column "
    )


def test_scalar_text_up_to_the_limit_is_accepted_and_one_more_character_refused() -> None:
    data = parse_yaml("f.yaml", chars_bomb(MAX_SCALAR_CHARS))
    assert 3 + 1000 * (len(data["b"]) + 1) + len(data["c"]) == MAX_SCALAR_CHARS
    err = refusal(chars_bomb(MAX_SCALAR_CHARS + 1))
    expect = f"holds more than {MAX_SCALAR_CHARS} characters of scalars, aliases expanded"
    assert err.reason.startswith(f"{expect} (reached at line 3, column ")


def test_billion_laughs_is_refused_before_anything_expands_it() -> None:
    # Nine levels of ten aliases each: 10**9 mappings once expanded, a few hundred bytes of text.
    lines = ["l0: &l0 {gateway: 10.0.0.1}"]
    for i in range(1, 10):
        body = ", ".join(f"k{j}: *l{i - 1}" for j in range(10))
        lines.append(f"l{i}: &l{i} {{{body}}}")
    err = error_of("name: web-1\nnetwork: *l9\n" + "\n".join(f"x{line}" for line in lines) + "\n")
    # (the anchors sit under unknown keys; the limit must be what refuses the file)
    assert err.key == "" and err.reason.startswith("holds more than ")
    assert "aliases expanded" in err.reason


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    # Self-referencing data sent deep_merge into unbounded recursion (RecursionError
    # out of parse_fleet) when a profile and its host both held one.
    fleet = parse_fleet(
        {
            HOST: "name: web-1\ninclude: [base]\nnetwork: &n {gateway: *n}\n",
            "profiles/base.yaml": "network: &m {gateway: *m}\n",
        }
    )
    [err] = fleet.errors
    assert (err.path, err.key, err.reason) == (
        HOST,
        "",
        "alias *n at line 3, column 23 refers to a node containing it",
    )
    assert (
        refusal("a: &x [1, {b: *x}]\n").reason
        == "alias *x at line 1, column 15 refers to a node containing it"
    )


def test_a_document_larger_than_the_file_limit_is_refused() -> None:
    padding = "# " + "x" * (MAX_FILE_BYTES - len("a: 1\n# \n")) + "\n"
    assert parse_yaml("f.yaml", "a: 1\n" + padding) == {"a": 1}
    assert refusal("a: 1\n" + padding + "\n").reason == f"is larger than {MAX_FILE_BYTES} bytes"
    # Bytes, not characters: the limit means the same as read_tree's.
    assert refusal("a: 1\n" + padding[:-2] + "é\n").reason == f"is larger than {MAX_FILE_BYTES} bytes"


@st.composite
def shared_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Nested lists and mappings that reuse earlier values, which safe_dump writes as
    anchors and aliases."""
    pool: list[Any] = [draw(st.text(alphabet="xyz", max_size=3))]
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["text", "list", "map"]))
        if kind == "text":
            pool.append(draw(st.text(alphabet="xyz", max_size=4)))
            continue
        children = draw(st.lists(st.sampled_from(pool), max_size=4))
        pool.append(children if kind == "list" else {f"k{i}": c for i, c in enumerate(children)})
    return {"doc": pool[-1], "more": pool[-2:]}


def expanded(value: object) -> tuple[int, int]:
    """Nodes and characters of scalars, every alias counted as what it stands for."""
    if isinstance(value, str):
        return 1, len(value)
    if isinstance(value, dict):
        children = [*value.keys(), *value.values()]
    else:
        assert isinstance(value, list), value
        children = value
    sizes = [expanded(c) for c in children]
    return 1 + sum(n for n, _ in sizes), sum(c for _, c in sizes)


@PROPERTY
@given(shared_documents())
def test_limits_count_what_the_aliases_expand_to(doc: dict[str, Any]) -> None:
    text = yaml.safe_dump(doc)
    nodes, chars = expanded(doc)
    depth = depth_of(doc)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schema, "MAX_NODES", nodes)
        mp.setattr(schema, "MAX_SCALAR_CHARS", chars)
        mp.setattr(schema, "MAX_DEPTH", depth)
        assert parse_yaml("f.yaml", text) == doc
        for limit, value, reason in (
            ("MAX_NODES", nodes, "nodes"),
            ("MAX_SCALAR_CHARS", chars, "characters of scalars"),
            ("MAX_DEPTH", depth, "nested deeper"),
        ):
            if limit == "MAX_SCALAR_CHARS" and chars == 0:
                continue
            mp.setattr(schema, limit, value - 1)
            assert reason in refusal(text).reason
            mp.setattr(schema, limit, value)


# -- YAML: duplicate keys ------------------------------------------------------------------------


@pytest.fixture(params=["libyaml", "python"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with the C loader and with the pure Python one it falls back to."""
    if request.param == "libyaml":
        if not yaml.__with_libyaml__:
            pytest.skip("PyYAML without libyaml")
        monkeypatch.setattr(schema, "_LOADER", schema._CLoader)
    else:
        monkeypatch.setattr(schema, "_LOADER", schema._PyLoader)
    return str(request.param)


AMBIGUOUS = "ambiguous, YAML would silently keep only the last"


@pytest.mark.parametrize(
    ("text", "key", "where"),
    [
        ("name: web-1\nname: web-2\n", "name", "line 2, column 1 (first at line 1, column 1)"),
        (
            "name: web-1\nservices:\n  web:\n    exec: [bin/a]\n    restart: never\n    exec: [bin/b]\n",
            "services.web.exec",
            "line 6, column 5 (first at line 4, column 5)",
        ),
        (
            "name: web-1\nfiles: {etc/a: x, etc/a: y}\n",
            "files.etc/a",
            "line 2, column 19 (first at line 2, column 9)",
        ),
        (
            "name: web-1\nnetwork:\n  dns: [{a: 1, a: 1}]\n",
            "network.dns[0].a",
            "line 3, column 16 (first at line 3, column 10)",
        ),
        # Equal once loaded: the second would silently replace the first.
        (
            "name: web-1\nfiles: {1: x, 1.0: y}\n",
            "files.1.0",
            "line 2, column 15 (first at line 2, column 9)",
        ),
    ],
)
def test_a_key_stated_twice_is_refused(loader: str, text: str, key: str, where: str) -> None:
    err = error_of(text)
    assert (err.path, err.key, err.reason) == (HOST, key, f"duplicate key at {where}: {AMBIGUOUS}")


def test_a_duplicate_key_in_a_profile_is_charged_to_its_hosts(loader: str) -> None:
    err = error_of(
        "name: web-1\ninclude: [base]\n", {"profiles/base.yaml": "formats: [aci]\nformats: [appimage]\n"}
    )
    assert (err.path, err.key) == (HOST, "include")
    where = "line 2, column 1 (first at line 1, column 1)"
    assert err.reason == f"profiles/base.yaml: formats: duplicate key at {where}: {AMBIGUOUS}"


def test_merge_keys_may_still_be_overridden(loader: str) -> None:
    text = (
        "name: web-1\n"
        "x-base: &base {etc/a: base, etc/b: base}\n"
        "x-mid: &mid {<<: *base, etc/b: mid}\n"
        "files: {<<: *mid, etc/a: host}\n"
    )
    assert parse_yaml(HOST, text)["files"] == {"etc/a": "host", "etc/b": "mid"}
    # ...but not a key stated twice inside a mapping that is merged in.
    err = refusal("files: {<<: {etc/a: x, etc/a: y}}\n")
    assert err.key == "files.<<.etc/a"


def test_config_files_get_the_same_checks(tmp_path: Path) -> None:
    cfg = tmp_path / "reconciler.yaml"
    cfg.write_text("repo: {url: a}\nrepo: {url: b}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert (info.value.path, info.value.key) == (str(cfg), "repo")
    assert info.value.reason.startswith("duplicate key at line 2, column 1")
    cfg.write_text("repo: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert (info.value.path, info.value.reason) == (
        str(cfg),
        f"nested deeper than {MAX_DEPTH} levels at line 1, column {MAX_DEPTH + 6}",
    )
    cfg.write_text("repo: {url: a}\n" + "#" * MAX_FILE_BYTES + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.reason == f"is larger than {MAX_FILE_BYTES} bytes"


# -- includes: each profile resolved once --------------------------------------------------------


def naive_fleet(
    files: Mapping[str, str],
) -> dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]] | str]:
    """Hosts' files and sources, or their error text, by expanding every include afresh
    (what parse_fleet did before it memoised; exponential, so for small fleets only)."""
    docs = {
        posixpath.basename(p)[:-5]: yaml.safe_load(t) for p, t in files.items() if p.startswith("profiles/")
    }

    def resolve(name: str, stack: tuple[str, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
        path = f"profiles/{name}.yaml"
        if name in stack:
            raise ConfigError(path, "include", "include cycle: " + " -> ".join((*stack, name)))
        merged: dict[str, Any] = {}
        sources: tuple[str, ...] = ()
        for inc in docs[name].get("include", []):
            data, srcs = resolve(inc, (*stack, name))
            merged, sources = deep_merge(merged, data), sources + srcs
        body = {k: v for k, v in docs[name].items() if k != "include"}
        return deep_merge(merged, body), (*sources, path)

    out: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]] | str] = {}
    for path, text in files.items():
        if not path.startswith("hosts/"):
            continue
        doc = yaml.safe_load(text)
        merged: dict[str, Any] = {}
        sources: tuple[str, ...] = ()
        try:
            for inc in doc.get("include", []):
                data, srcs = resolve(inc, ())
                merged, sources = deep_merge(merged, data), sources + srcs
        except ConfigError as exc:
            out[doc["name"]] = str(ConfigError(path, "include", str(exc)))
            continue
        merged = deep_merge(merged, {k: v for k, v in doc.items() if k != "include"})
        out[doc["name"]] = (
            tuple(sorted(merged.get("files", {}).items())),
            tuple(dict.fromkeys((path, *sources))),
        )
    return out


@st.composite
def include_graphs(draw: st.DrawFn, acyclic: bool) -> dict[str, str]:
    """Profiles p0..pN that include each other (only later ones if ``acyclic``) and set
    overlapping files, so that merge order shows; hosts that include some of them."""
    n = draw(st.integers(1, 7))
    names = [f"p{i}" for i in range(n)]
    keys = st.sampled_from(["etc/a", "etc/b", "etc/c"])
    files: dict[str, str] = {}
    for i, name in enumerate(names):
        choices = names[i + 1 :] if acyclic else names
        inc = draw(st.lists(st.sampled_from(choices), max_size=3, unique=True)) if choices else []
        own = draw(st.sets(keys, max_size=2))
        files[f"profiles/{name}.yaml"] = yaml.safe_dump(
            {"include": inc, "files": {k: name for k in sorted(own)}}
        )
    for h in range(draw(st.integers(1, 3))):
        inc = draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
        own = draw(st.sets(keys, max_size=1))
        files[f"hosts/h{h}.yaml"] = yaml.safe_dump(
            {"name": f"h{h}", "include": inc, "files": {k: f"h{h}" for k in sorted(own)}}
        )
    return files


def memoised_fleet(
    files: Mapping[str, str],
) -> dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]] | str]:
    fleet = parse_fleet(files)
    out: dict[str, tuple[tuple[tuple[str, str], ...], tuple[str, ...]] | str] = {
        name: (h.files, h.sources) for name, h in fleet.hosts.items()
    }
    out.update({posixpath.basename(e.path)[:-5]: str(e) for e in fleet.errors})
    return out


@PROPERTY
@given(include_graphs(acyclic=True))
def test_resolving_each_profile_once_gives_what_expanding_every_include_gives(files: dict[str, str]) -> None:
    fleet = memoised_fleet(files)
    assert fleet == naive_fleet(files)
    assert all(not isinstance(v, str) for v in fleet.values())


@PROPERTY
@given(include_graphs(acyclic=False))
def test_include_cycles_are_reported_as_before(files: dict[str, str]) -> None:
    assert memoised_fleet(files) == naive_fleet(files)


def test_a_profile_shared_by_many_hosts_and_profiles_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = recorded_calls(monkeypatch, hosts, "_parse_yaml")
    files = {f"profiles/p{i}.yaml": f"include: [p{i + 1}, bad]\n" for i in range(5)}
    files["profiles/p5.yaml"] = "formats: [aci]\n"
    files["profiles/bad.yaml"] = "formats: [aci\n"
    files |= {f"hosts/h{i}.yaml": f"name: h{i}\ninclude: [p0]\n" for i in range(10)}
    fleet = parse_fleet(files)
    assert len(fleet.errors) == 10
    assert all("profiles/bad.yaml: invalid YAML at line 2" in e.reason for e in fleet.errors)
    assert sorted(path for path, _ in parsed) == sorted(files)


def _fleet_using(packages: list[str]) -> Fleet:
    files = {f"packages/{p}.nix": "" for p in set(packages)}
    for i, pkg in enumerate(packages):
        files[f"hosts/h{i}.yaml"] = (
            f"name: h{i}\nservices: {{web: {{package: {pkg}, exec: [bin/web]}}, sh: {{exec: [bin/sh]}}}}\n"
        )
    fleet = parse_fleet(files)
    assert not fleet.errors
    return fleet


@PROPERTY
@given(
    st.lists(st.sampled_from(["a", "b", "c", "busybox"]), min_size=1, max_size=12),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.text(min_size=1, max_size=8)),
    st.sampled_from(["a", "b", "c"]),
)
def test_a_package_id_reaches_exactly_the_keys_of_its_users(
    used: list[str], ids: dict[str, str], changed: str
) -> None:
    fleet = _fleet_using(used)
    ids = {p: ids.get(p, "id-" + p) for p in ("a", "b", "c")}
    before = {n: eval_key(h, "recipe", ids) for n, h in fleet.hosts.items()}
    after = {n: eval_key(h, "recipe", {**ids, changed: ids[changed] + "'"}) for n, h in fleet.hosts.items()}
    assert {n for n in before if before[n] != after[n]} == {
        n for n, h in fleet.hosts.items() if changed in h.packages
    }
    # Ids of packages no host uses, or given in another order, change nothing.
    extra = {"z": "unused", **dict(reversed(list(ids.items())))}
    assert {n: eval_key(h, "recipe", extra) for n, h in fleet.hosts.items()} == before
    # Nor does anything that is not a package: keys see no file but the host's own.
    assert all(k is not None for k in before.values())
    assert eval_key(fleet.hosts["h0"], "other recipe", ids) != before["h0"]


@PROPERTY
@given(
    st.lists(st.sampled_from(["a", "b", "c", "busybox"]), min_size=1, max_size=6),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.text(max_size=8)),
    st.text(max_size=20),
)
def test_a_key_is_what_ledgers_hold_it_as(used: list[str], ids: dict[str, str], recipe: str) -> None:
    """The digest of [to_nix, the used packages' ids] as canonical JSON, as it was
    before the host's JSON was kept: keys in existing ledgers stay valid."""
    ids = {p: ids.get(p, "id-" + p) for p in ("a", "b", "c")}
    for host in _fleet_using(used).hosts.values():
        used_ids = {p: ids[p] for p in host.packages if p != "busybox"}
        data = json.dumps([host.to_nix(), used_ids], sort_keys=True, separators=(",", ":"))
        assert eval_key(host, recipe, ids) == hashlib.sha256(f"{recipe}\n{data}".encode()).hexdigest()


@PROPERTY
@given(
    st.lists(
        st.lists(
            st.sampled_from(["hosts", "profiles", "a", ".yaml", "x.yml", "y.yaml", "z.nix"]),
            min_size=1,
            max_size=4,
        )
    ).map(lambda ps: ["/".join(p) for p in ps])  # as git names files: no empty part
)
def test_files_are_grouped_by_stem_as_paths_say(paths: list[str]) -> None:
    for folder in ("hosts/", "profiles/"):
        expected: dict[str, tuple[str, ...]] = {}
        for path in sorted(paths):
            directory = posixpath.dirname(path)
            if path.startswith(folder) and path.endswith((".yaml", ".yml")) and directory.count("/") == 0:
                stem = posixpath.splitext(posixpath.basename(path))[0]
                expected[stem] = (*expected.get(stem, ()), path)
        assert hosts._by_stem(paths, folder) == expected


def test_a_host_whose_package_did_not_evaluate_has_no_key() -> None:
    fleet = _fleet_using(["a", "busybox"])
    assert eval_key(fleet.hosts["h0"], "recipe", {}) is None
    assert eval_key(fleet.hosts["h1"], "recipe", {}) is not None
    assert package_names(fleet.hosts.values()) == ("a",)


# -- the plain-tree loader gives what PyYAML gives ------------------------------------------------

yaml_data = st.recursive(
    # Integers of 64 bits: both refuse larger ones (test_a_value_python_cannot_hold_...).
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 63) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(yaml_data, st.sampled_from([None, True, False]))
def test_the_plain_tree_loader_gives_what_pyyaml_gives(data: object, flow: bool | None) -> None:
    text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    assert schema._load_tree(text, schema._LOADER) == yaml.load(text, Loader=schema._LOADER)


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\nb: 2019-01-01\nc: 2019-01-01 10:00:00\nd: !!str 123\ne: !!binary aGVsbG8=\nf: 0x1f\ng: ~\n",
        "base: {x: 1}\nover:\n  <<: {x: 2, y: 3}\n  x: 4\n",
        "? [a, b]\n: c\n",
        "s: !!set {a, b}\no: !!omap [{a: 1}]\n",
        "- - - deep\n  - x\n- {a: [1, {b: c}]}\n",
        "",
        "just a string\n",
        "1: int key\n1.5: float key\ntrue: bool key\n",
    ],
)
def test_the_plain_tree_loader_on_what_it_hands_back_or_builds(text: str) -> None:
    def outcome(load: Callable[[], object]) -> object:
        try:
            return load()
        except Exception as exc:  # the same refusal either way
            return (type(exc), str(exc))

    assert outcome(lambda: schema._load_tree(text, schema._LOADER)) == outcome(
        lambda: yaml.load(text, Loader=schema._LOADER)
    )


def test_a_plain_document_is_loaded_without_the_event_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    # The walk was half the cost of parsing a fleet of small host files; a document
    # without anchors or aliases has its limits counted on the composed nodes instead.
    walked: list[str] = []
    real = schema._check_limits

    def walk(text: str, loader: Any) -> bool:
        walked.append(text)
        return real(text, loader)

    monkeypatch.setattr(schema, "_check_limits", walk)
    plain = "name: web-1\nservices:\n  web: {exec: [bin/busybox, httpd]}\n"
    assert parse_yaml("f.yaml", plain) == yaml.safe_load(plain)
    assert walked == []
    shared = "a: &x [1]\nb: *x\n"
    assert parse_yaml("f.yaml", shared) == {"a": [1], "b": [1]}
    # Beyond a limit, or too many collection marks to compose first: walked, and
    # refused as before.
    deep = "a: " + "[" * 2000 + "]" * 2000 + "\n"
    assert refusal(deep).reason.startswith(f"nested deeper than {MAX_DEPTH} levels")
    monkeypatch.setattr(schema, "MAX_NODES", 4)
    assert refusal("a: [1, 2]\n").reason.startswith("holds more than 4 nodes")
    assert walked == [shared, deep, "a: [1, 2]\n"]


def test_duplicate_keys_and_unknown_tags_fail_as_before() -> None:
    assert "duplicate key" in refusal("a: 1\nb: 2\na: 3\n").reason
    assert "invalid YAML" in refusal("a: !something 1\n").reason


# -- ports -----------------------------------------------------------------------------------------


def test_ports_are_parsed_with_tcp_by_default_and_reach_nix_in_order() -> None:
    host = host_of(
        "name: web-1\nservices:\n"
        "  web: {exec: [bin/busybox, httpd], ports: [{name: http, port: 8080}, {name: alt, port: 81}]}\n"
        "  dns: {exec: [bin/busybox, sh], ports: [{name: dns, port: 53, protocol: udp}]}\n"
        "  tick: {exec: [bin/busybox, sh]}\n"
    )
    by_name = {s.name: s for s in host.services}
    assert by_name["web"].ports == (Port("http", 8080), Port("alt", 81))
    assert by_name["dns"].ports == (Port("dns", 53, appc.PortProtocol.UDP),)
    services = host.to_nix()["services"]
    assert services["web"]["ports"] == [
        {"name": "http", "port": 8080, "protocol": "tcp"},
        {"name": "alt", "port": 81, "protocol": "tcp"},
    ]
    assert services["dns"]["ports"] == [{"name": "dns", "port": 53, "protocol": "udp"}]
    # A service without ports hands Nix what it did before ports existed.
    assert "ports" not in services["tick"]
    # The same number on both protocols is two ports.
    both = host_of(
        "name: web-1\nservices:\n"
        "  dns: {exec: [x], ports: [{name: a, port: 53}, {name: b, port: 53, protocol: udp}]}\n"
    )
    assert [p.protocol for p in both.services[0].ports] == ["tcp", "udp"]


port_entries = st.lists(
    st.tuples(
        st.from_regex(r"[a-z0-9]{1,5}(-[a-z0-9]{1,5}){0,2}", fullmatch=True),
        st.integers(1, 65535),
        st.sampled_from([None, "tcp", "udp"]),
    ),
    max_size=8,
    unique_by=(lambda t: t[0], lambda t: (t[1], t[2] or "tcp")),
)


def ports_yaml(entries: list[tuple[str, int, str | None]]) -> list[dict[str, Any]]:
    return [{"name": n, "port": p, **({"protocol": proto} if proto else {})} for n, p, proto in entries]


def services_with(entries: list[tuple[str, int, str | None]], owners: list[int]) -> dict[str, Any]:
    """Three services sharing ``entries``: entry i belongs to service ``owners[i] % 3``."""
    services: dict[str, Any] = {f"s{i}": {"exec": ["bin/busybox", "true"], "ports": []} for i in range(3)}
    for entry, owner in zip(entries, owners, strict=False):
        services[f"s{owner % 3}"]["ports"] += ports_yaml([entry])
    return services


@PROPERTY
@given(port_entries, st.lists(st.integers(0, 2), min_size=8, max_size=8))
def test_unique_ports_are_accepted_wherever_they_are_declared(
    entries: list[tuple[str, int, str | None]], owners: list[int]
) -> None:
    data = {"name": "web-1", "services": services_with(entries, owners)}
    host = host_of(yaml.safe_dump(data))
    check_accepted(host, "web-1")
    for svc in host.services:
        want = ports_yaml([e for e, o in zip(entries, owners, strict=False) if f"s{o % 3}" == svc.name])
        got = svc.to_nix().get("ports", [])
        assert got == [{**w, "protocol": w.get("protocol", "tcp")} for w in want]


@PROPERTY
@given(
    port_entries.filter(bool),
    st.lists(st.integers(0, 2), min_size=9, max_size=9),
    st.integers(0, 7),
    st.booleans(),
)
def test_a_second_port_with_a_taken_name_or_number_is_refused_at_its_key(
    entries: list[tuple[str, int, str | None]], owners: list[int], pick: int, same_name: bool
) -> None:
    name, port, proto = entries[pick % len(entries)]
    clash: tuple[str, int, str | None]
    if same_name:
        clash = (name, port % 65535 + 1 if port != 65535 else 1, "udp" if proto == "tcp" else "tcp")
        assume(all((clash[1], clash[2]) != (p, q or "tcp") for _, p, q in entries))
    else:
        clash = ("zz-clash", port, proto)
    services = services_with(entries, owners)
    original = ports_yaml([entries[pick % len(entries)]])[0]
    first = next(
        (svc, spec["ports"].index(original)) for svc, spec in services.items() if original in spec["ports"]
    )
    target = f"s{owners[8] % 3}"
    services[target]["ports"].append(ports_yaml([clash])[0])
    err = error_of(yaml.safe_dump({"name": "web-1", "services": services}))
    # Services are read in name order: whichever of the two comes later is refused.
    svc, index = max(first, (target, len(services[target]["ports"]) - 1))
    assert err.key == f"services.{svc}.ports[{index}].{'name' if same_name else 'port'}"
    assert "is already" in err.reason


@PROPERTY
@given(st.one_of(st.text(max_size=70), st.from_regex(r"[a-z0-9-]{1,70}", fullmatch=True)))
def test_a_port_name_is_accepted_exactly_when_it_is_an_ac_name(name: str) -> None:
    fleet = one_host(
        yaml.safe_dump(
            {"name": "web-1", "services": {"web": {"exec": ["x"], "ports": [{"name": name, "port": 80}]}}}
        )
    )
    ok = len(name) <= 63 and appc.AC_NAME_RE.fullmatch(name) is not None
    if ok:
        assert fleet.errors == () and fleet.hosts["web-1"].services[0].ports == (Port(name, 80),)
    else:
        assert [(e.key, e.reason) for e in fleet.errors] == [("services.web.ports[0].name", PORT_NAME)]


OK_HOST = "name: ok\nformats: [aci]\nservices:\n  a: {exec: [bin/busybox, sleep, '1']}\n"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        # Scalars YAML resolves to types Python cannot hold.
        ("files:\n  etc/date: 2024-02-30\n", "invalid YAML: a value cannot be read: day is out of range"),
        ("files:\n  etc/date: 2024-01-01 25:00:00\n", "invalid YAML: a value cannot be read: hour must be"),
        ("services:\n  a: {exec: [sleep, " + "9" * 5000 + "]}\n", "invalid YAML: a value cannot be read"),
        # Loads, and then cannot be shown as decimal in any error.
        ("services:\n  a: {exec: [sleep, 0b" + "1" * 20000 + "]}\n", "an integer beyond 64 bits at line 4"),
        # YAML 1.1 reads them as numbers other than the text: the service would run
        # with 493 and 90.
        (
            "services:\n  a: {exec: [bin/chmod, 0755, x]}\n",
            "'0755' at line 4, column 25 is read by YAML 1.1 as the number 493: quote it ('0755')",
        ),
        ("services:\n  a: {exec: [bin/sleep, 1:30]}\n", "'1:30' at line 4, column 25 is read by YAML 1.1 as"),
    ],
    ids=["no such day", "no such hour", "too many digits", "binary of 20,000 digits", "octal", "base 60"],
)
def test_a_value_python_cannot_hold_makes_only_its_host_invalid(text: str, said: str) -> None:
    fleet = parse_fleet({"hosts/ok.yaml": OK_HOST, "hosts/bad.yaml": "name: bad\nformats: [aci]\n" + text})
    assert list(fleet.hosts) == ["ok"]
    (error,) = fleet.errors
    assert error.path == "hosts/bad.yaml" and said in error.reason, error


def test_a_megabyte_value_is_not_quoted_whole() -> None:
    fleet = parse_fleet(
        {"hosts/ok.yaml": OK_HOST, "hosts/bad.yaml": "name: bad\nrestart: " + "y" * (1 << 20) + "\n"}
    )
    (error,) = fleet.errors
    assert len(str(error)) < 1500


def test_whatever_else_goes_wrong_in_one_host_leaves_the_others_planned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = hosts._parse_host

    def parse(path: str, *args: Any) -> Any:
        if path == "hosts/bad.yaml":
            raise RuntimeError("a case no check foresaw")
        return real(path, *args)

    monkeypatch.setattr(hosts, "_parse_host", parse)
    fleet = parse_fleet({"hosts/ok.yaml": OK_HOST, "hosts/bad.yaml": "name: bad\n"})
    assert list(fleet.hosts) == ["ok"]
    (error,) = fleet.errors
    assert str(error) == "hosts/bad.yaml: cannot be read: RuntimeError: a case no check foresaw"

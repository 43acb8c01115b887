"""The JSON Schema of host and profile files (`reconciler schema`) against the parser.

What the parser accepts validates against the schema (the schema is never stricter,
or an editor would flag a file the daemon builds), and an unknown key is refused by
both. Documents go through YAML text both ways, as an editor and the daemon read them.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.cli import parser
from reconciler.core import hosts
from reconciler.core.appc import AC_NAME_RE, PortProtocol
from reconciler.core.hosts import parse_fleet
from reconciler.core.hostschema import Kind, schema

PROPERTY = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
PACKAGES = ("site", "db")
PROFILES = ("base", "extra")
T = TypeVar("T")
VALIDATORS = {k: jsonschema.Draft202012Validator(schema(k)) for k in Kind}


def files_with(kind: Kind, doc: Any) -> dict[str, str]:
    """A repository holding ``doc`` as a host file (hosts/h-1.yaml) or as a profile
    that host h-1 includes; packages and profiles exist for includes to name."""
    text = yaml.safe_dump(doc, allow_unicode=True)
    files = {f"packages/{p}.nix": "{ toolchain }: toolchain.busybox" for p in PACKAGES}
    files |= {f"profiles/{p}.yaml": "{}" for p in PROFILES}
    if kind is Kind.HOST:
        files["hosts/h-1.yaml"] = text
    else:
        files["profiles/p.yaml"] = text
        files["hosts/h-1.yaml"] = "name: h-1\ninclude: [p]\n"
    return files


def accepted(kind: Kind, doc: Any) -> bool:
    fleet = parse_fleet(files_with(kind, doc))
    return not fleet.errors


def valid(kind: Kind, doc: Any) -> bool:
    # What the editor sees: the document as YAML reads it back.
    return VALIDATORS[kind].is_valid(yaml.safe_load(yaml.safe_dump(doc, allow_unicode=True)))


# -- documents the parser accepts --------------------------------------------------

# Printable text without NUL; "\n" for file contents.
text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)
component = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"), min_size=1
).filter(lambda c: c not in (".", ".."))
relative_path = st.lists(component, min_size=1, max_size=3).map("/".join)
number = st.integers(-(10**6), 10**6) | st.floats()
ipv4 = st.ip_addresses(v=4).map(str)
ip = ipv4 | st.ip_addresses(v=6).map(str)
interface = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)), st.tuples(st.ip_addresses(v=6), st.integers(0, 128))
).map(lambda t: f"{t[0]}/{t[1]}")


def one_or_list(item: st.SearchStrategy[T]) -> st.SearchStrategy[T | list[T]]:
    return item | st.lists(item, min_size=1, max_size=3)


network = st.fixed_dictionaries(
    {},
    optional={"address": interface | st.none(), "gateway": ip | st.none(), "dns": st.lists(ip, max_size=3)},
)
port = st.fixed_dictionaries(
    {
        "name": st.from_regex(AC_NAME_RE, fullmatch=True).filter(lambda n: len(n) <= 63),
        "port": st.integers(1, 65535),
    },
    optional={"protocol": st.sampled_from([p.value for p in PortProtocol])},
)
service = st.fixed_dictionaries(
    {
        "exec": st.tuples(relative_path | number, st.lists(text | number, max_size=3)).map(
            lambda t: [t[0], *t[1]]
        )
    },
    optional={
        "package": st.sampled_from(("busybox", *PACKAGES)),
        "restart": st.sampled_from(hosts.RESTART_POLICIES),
        "ports": st.lists(port, max_size=2),
    },
)


def unique_ports(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without the ports whose name or number another port of the host has
    (the parser refuses those; the schema cannot say it)."""
    names: set[str] = set()
    numbers: set[tuple[int, str]] = set()
    for svc in doc.get("services", {}).values():
        kept = []
        for p in svc.get("ports", []):
            number = (p["port"], p.get("protocol", "tcp"))
            if p["name"] not in names and number not in numbers:
                names.add(p["name"])
                numbers.add(number)
                kept.append(p)
        if "ports" in svc:
            svc["ports"] = kept
    return doc


service_name = st.from_regex(hosts.SERVICE_RE, fullmatch=True)
# One level below a directory of its own: no name is a builder's or another file's parent.
file_name = component.map(lambda c: f"srv/{c}")
body = {
    "include": one_or_list(st.sampled_from(PROFILES)) | st.just([]),
    "formats": one_or_list(st.sampled_from(hosts.FORMATS)),
    "network": network,
    "services": st.dictionaries(service_name, service, max_size=3),
    "files": st.dictionaries(
        file_name,
        st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=20),
        max_size=3,
    ),
}
host_doc = st.fixed_dictionaries({"name": st.just("h-1")}, optional=body).map(unique_ports)
profile_doc = st.fixed_dictionaries({}, optional=body).map(unique_ports)


@PROPERTY
@given(host_doc)
def test_a_host_the_parser_accepts_validates(doc: dict[str, Any]) -> None:
    assert accepted(Kind.HOST, doc), parse_fleet(files_with(Kind.HOST, doc)).errors
    assert valid(Kind.HOST, doc), list(VALIDATORS[Kind.HOST].iter_errors(doc))


@PROPERTY
@given(profile_doc)
def test_a_profile_the_parser_accepts_validates(doc: dict[str, Any]) -> None:
    assert accepted(Kind.PROFILE, doc), parse_fleet(files_with(Kind.PROFILE, doc)).errors
    assert valid(Kind.PROFILE, doc)


# -- documents of any shape: the schema is never stricter --------------------------

anything = st.recursive(
    st.none() | st.booleans() | number | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def sometimes(valid_values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``valid_values``: a document the parser refuses tests nothing here."""
    return st.one_of(valid_values, valid_values, valid_values, anything)


wild_service = st.fixed_dictionaries(
    {},
    optional={
        "exec": sometimes(service.map(lambda s: s["exec"])),
        "package": sometimes(st.sampled_from(("busybox", "nope", *PACKAGES))),
        "restart": sometimes(st.sampled_from(hosts.RESTART_POLICIES)),
        "ports": sometimes(st.lists(sometimes(port), max_size=2)),
    },
)
wild_body = {
    "include": sometimes(body["include"]),
    "formats": sometimes(body["formats"]),
    "network": sometimes(
        st.fixed_dictionaries(
            {},
            optional={
                "address": sometimes(interface) | ipv4,
                "gateway": sometimes(ip),
                "dns": sometimes(st.lists(ip, max_size=2)),
            },
        )
    ),
    "services": sometimes(
        st.dictionaries(st.one_of(service_name, service_name, st.text(max_size=5)), wild_service, max_size=2)
    ),
    "files": sometimes(
        st.dictionaries(
            file_name
            | relative_path
            | st.sampled_from(("etc", "bin/busybox", "AppRun/x", "h-1.desktop", "")),
            text | anything,
            max_size=3,
        )
    ),
}


@PROPERTY
@given(st.fixed_dictionaries({"name": st.just("h-1")}, optional=wild_body), st.sampled_from(Kind))
def test_whatever_the_parser_accepts_validates(doc: dict[str, Any], kind: Kind) -> None:
    if kind is Kind.PROFILE:
        doc.pop("name")
    if accepted(kind, doc):
        assert valid(kind, doc), list(VALIDATORS[kind].iter_errors(doc))


# -- unknown keys ------------------------------------------------------------------

unknown = st.text(st.characters(min_codepoint=ord("a"), max_codepoint=ord("z")), min_size=1, max_size=10)


@PROPERTY
@given(host_doc, unknown, st.sampled_from(("", "network", "services", "ports")), st.sampled_from(Kind))
def test_an_unknown_key_is_refused_by_both(doc: dict[str, Any], key: str, where: str, kind: Kind) -> None:
    if kind is Kind.PROFILE:
        doc.pop("name")
    if where == "":
        target = doc
        allowed = hosts.HOST_KEYS if kind is Kind.HOST else hosts.PROFILE_KEYS
    elif where == "network":
        target = doc.setdefault("network", {})
        allowed = hosts.NETWORK_KEYS
    elif where == "services":
        services = doc.setdefault("services", {})
        target = services.setdefault("svc", {"exec": ["bin/busybox"]})
        allowed = hosts.SERVICE_KEYS
    else:
        # The host's only port, so that nothing but the unknown key is wrong with it.
        for svc in doc.get("services", {}).values():
            svc.pop("ports", None)
        target = {"name": "extra", "port": 1, "protocol": "udp"}
        doc.setdefault("services", {})["svc-extra"] = {"exec": ["bin/busybox"], "ports": [target]}
        allowed = hosts.PORT_KEYS
    if key in allowed:
        return
    target[key] = "x"
    assert not valid(kind, doc)
    errors = parse_fleet(files_with(kind, doc)).errors
    assert len(errors) == 1 and "unknown key" in errors[0].reason


def test_a_profile_may_not_have_a_name() -> None:
    assert not accepted(Kind.PROFILE, {"name": "h-1"})
    assert not valid(Kind.PROFILE, {"name": "h-1"})
    assert accepted(Kind.PROFILE, None) and valid(Kind.PROFILE, None)


@pytest.mark.parametrize(
    "doc",
    [
        {},  # no name
        {"name": "Web"},
        {"name": "h-1", "formats": ["tar"]},
        {"name": "h-1", "formats": []},
        {"name": "h-1", "services": {"web": {"exec": []}}},
        {"name": "h-1", "services": {"web": {"exec": ["/bin/sh"]}}},
        {"name": "h-1", "services": {"web": {"exec": ["../x"]}}},
        {"name": "h-1", "services": {"web": {"package": "site"}}},
        {"name": "h-1", "services": {"Web": {"exec": ["bin/x"]}}},
        {"name": "h-1", "services": {"web": {"exec": ["bin/x"], "restart": "sometimes"}}},
        {"name": "h-1", "files": {"etc/reconciler/x": "y"}},
        {"name": "h-1", "files": {"etc": "y"}},
        {"name": "h-1", "files": {"a/./b": "y"}},
        {"name": "h-1", "files": {"motd": 3}},
        {"name": "h-1", "network": {"dns": "10.0.0.1"}},
        {"name": "h-1", "network": {"address": "10.0.0.1"}},
        {"name": "h-1", "include": [1]},
        {"name": "h-1", "services": {"web": {"exec": ["bin/x"], "ports": [{"name": "http"}]}}},
        {"name": "h-1", "services": {"web": {"exec": ["bin/x"], "ports": [{"name": "Http", "port": 80}]}}},
        {"name": "h-1", "services": {"web": {"exec": ["bin/x"], "ports": [{"name": "http", "port": 0}]}}},
        {
            "name": "h-1",
            "services": {"web": {"exec": ["bin/x"], "ports": [{"name": "h", "port": 1, "protocol": "sctp"}]}},
        },
        {"name": "h-1", "formats": ["oci", "zip"]},
        {"name": "h-1", "files": {"tmp/x": "y"}},
    ],
)
def test_what_the_schema_refuses_the_parser_refuses_too(doc: dict[str, Any]) -> None:
    assert not valid(Kind.HOST, doc)
    assert not accepted(Kind.HOST, doc)


def test_the_schema_is_made_of_the_parsers_constants() -> None:
    host = schema(Kind.HOST)
    assert set(host["properties"]) == hosts.HOST_KEYS
    assert set(schema(Kind.PROFILE)["properties"]) == hosts.PROFILE_KEYS
    assert host["properties"]["formats"]["anyOf"][0]["enum"] == list(hosts.FORMATS)
    svc = host["properties"]["services"]["additionalProperties"]
    assert set(svc["properties"]) == hosts.SERVICE_KEYS
    assert svc["properties"]["restart"]["enum"] == list(hosts.RESTART_POLICIES)
    assert set(svc["properties"]["ports"]["items"]["properties"]) == hosts.PORT_KEYS
    assert set(host["properties"]["network"]["properties"]) == hosts.NETWORK_KEYS
    for k in Kind:
        jsonschema.Draft202012Validator.check_schema(schema(k))


def test_a_key_the_parser_learns_without_a_schema_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts, "SERVICE_KEYS", hosts.SERVICE_KEYS | {"user"})
    with pytest.raises(RuntimeError, match="user"):
        schema(Kind.HOST)


def run_cli(*argv: str) -> int:
    """The command as main() runs it, without main()'s log.configure(), which would
    point the package's logger at this test's captured stderr for the tests after it."""
    args = parser().parse_args(argv)
    return int(args.fn(args))


def test_cli_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("schema", "host") == 0
    assert json.loads(capsys.readouterr().out) == schema(Kind.HOST)
    assert run_cli("schema", "profile") == 0
    assert json.loads(capsys.readouterr().out)["title"] == "reconciler profile file"

"""A JSON Schema (draft 2020-12) of host and profile files, for editors.

Made from the constants reconciler.core.hosts validates with (the keys, formats,
restart policies, name patterns and reserved paths), so that the schema an editor
checks against and the parser cannot tell different stories. The schema is looser
than the parser where JSON Schema cannot say what the parser checks: that ``name``
equals the file stem, that an included profile or a package exists, that an address
parses, that a file is not also another file's directory. It is never stricter: what
the parser accepts validates (tests/unit/test_hostschema.py). Pure: data in, data out.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from reconciler.core import hosts
from reconciler.core.appc import AC_NAME_RE, PortProtocol
from reconciler.core.formats import DEFAULT_FORMATS

DIALECT = "https://json-schema.org/draft/2020-12/schema"


class Kind(StrEnum):
    """Which file a schema is for."""

    HOST = "host"  # hosts/<name>.yaml
    PROFILE = "profile"  # profiles/<name>.yaml


def _pattern(regex: re.Pattern[str]) -> str:
    """A Python pattern the validator fullmatches, as a JSON Schema pattern (which
    matches anywhere): anchored at both ends. The patterns used are ECMA-262 too."""
    p = regex.pattern
    return ("" if p.startswith("^") else "^") + p + ("" if p.endswith("$") else "$")


# A path inside the image (core.hosts._relative_path): relative, no empty, "." or
# ".." component, no NUL or backslash.
_COMPONENT = r"(?!\.\.?(?:/|$))[^/\\\x00]+"
RELATIVE_PATH = f"^{_COMPONENT}(?:/{_COMPONENT})*$"
_TEXT = r"^[^\x00]*$"


def _escape(text: str) -> str:
    """``text`` as a literal in a pattern. Not re.escape: it escapes characters such
    as "-" that ECMA-262 refuses to see escaped in unicode mode (as editors compile)."""
    return re.sub(r"([.^$*+?()\[\]{}|\\/])", r"\\\1", text)


def _reserved() -> str:
    """The file names a host may not use (core.hosts._files): a builder-owned path,
    anything below one, or a directory above one."""
    owned = sorted(hosts.RESERVED_PREFIXES)
    above = sorted({r.rsplit("/", i)[0] for r in owned for i in range(1, r.count("/") + 1)})
    alternatives = [f"{_escape(r)}(?:/.*)?" for r in owned] + [_escape(a) for a in above]
    return "^(?:" + "|".join(alternatives) + ")$"


def _one_or_list(item: dict[str, Any]) -> dict[str, Any]:
    """What a key that takes a single value or a list of them accepts."""
    return {"anyOf": [item, {"type": "array", "items": item}]}


NETWORK: dict[str, dict[str, Any]] = {
    "address": {
        "description": "The host's address with its prefix length, e.g. 10.42.0.11/24 "
        "(ADDRESS in etc/reconciler/network.env).",
        "type": ["string", "null"],
        "pattern": "^[^/]+/[^/]+$",
    },
    "gateway": {
        "description": "The default gateway, an IP address (GATEWAY in network.env).",
        "type": ["string", "null"],
        "anyOf": [{"type": "null"}, {"format": "ipv4"}, {"format": "ipv6"}],
    },
    "dns": {
        "description": "Name servers, a list of IP addresses (DNS in network.env, space-separated).",
        "type": "array",
        "items": {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]},
    },
}

PORT: dict[str, dict[str, Any]] = {
    "name": {
        "description": "An AC Name: lowercase words of letters and digits joined by -.",
        "type": "string",
        "pattern": _pattern(AC_NAME_RE),
        "maxLength": hosts.MAX_PORT_NAME,
    },
    "port": {"description": "The port number.", "type": "integer", "minimum": 1, "maximum": 65535},
    "protocol": {"enum": [p.value for p in PortProtocol], "default": PortProtocol.TCP.value},
}
PORT_REQUIRED = ("name", "port")

SERVICE: dict[str, dict[str, Any]] = {
    "package": {
        "description": "The package whose output is merged into the image root: packages/<name>.nix "
        "in the repository, or busybox (built in).",
        "type": "string",
        "pattern": _pattern(hosts.PACKAGE_RE),
        "default": "busybox",
    },
    "exec": {
        "description": "The command: the first item is a path inside the image (relative to its "
        "root), the others its arguments. Numbers are taken as their text.",
        "type": "array",
        "minItems": 1,
        "prefixItems": [{"anyOf": [{"type": "string", "pattern": RELATIVE_PATH}, {"type": "number"}]}],
        "items": {"anyOf": [{"type": "string", "pattern": _TEXT}, {"type": "number"}]},
    },
    "restart": {
        "description": "When the supervisor starts the service again after it exits (with backoff).",
        "enum": list(hosts.RESTART_POLICIES),
        "default": "always",
    },
    "ports": {
        "description": "Ports the service listens on, declared in the ACI's manifest (app.ports); "
        "names and port/protocol pairs are unique in the host.",
        "type": "array",
        "items": {
            "type": "object",
            "properties": PORT,
            "required": list(PORT_REQUIRED),
            "additionalProperties": False,
        },
        "default": [],
    },
}
SERVICE_REQUIRED = ("exec",)

# Per key of a host file: its schema. Every key of hosts.HOST_KEYS needs one (a key
# added to the parser without one here fails the tests, not an editor).
HOST: dict[str, dict[str, Any]] = {
    "name": {
        "description": "The host's name; must equal the file stem.",
        "type": "string",
        "pattern": _pattern(hosts.NAME_RE),
    },
    "include": {
        "description": "Profiles (profiles/<name>.yaml) merged in first, in order, each with its "
        "own includes; the including file wins. Mappings merge key by key, anything else "
        "(lists too) is replaced.",
        **_one_or_list({"type": "string"}),
    },
    "formats": {
        "description": "The artifacts built for the host.",
        **_one_or_list({"enum": list(hosts.FORMATS)}),
        "minItems": 1,
        "default": [str(f) for f in DEFAULT_FORMATS],
    },
    "network": {
        "description": "Written to etc/reconciler/network.env in the image (HOSTNAME, ADDRESS, "
        "GATEWAY, DNS) and exported to every service; nothing configures an interface.",
        "type": "object",
        "properties": NETWORK,
        "additionalProperties": False,
        "default": {},
    },
    "services": {
        "description": "The processes run together under the image's supervisor, by name.",
        "type": "object",
        "propertyNames": {"pattern": _pattern(hosts.SERVICE_RE)},
        "additionalProperties": {
            "type": "object",
            "properties": SERVICE,
            "required": list(SERVICE_REQUIRED),
            "additionalProperties": False,
        },
        "default": {},
    },
    "files": {
        "description": "Extra files baked into the image: path (relative to the image root) to text content.",
        "type": "object",
        "propertyNames": {"pattern": RELATIVE_PATH, "not": {"pattern": f"{_reserved()}|^-"}},
        "additionalProperties": {"type": "string", "pattern": _TEXT},
        "default": {},
    },
}
HOST_REQUIRED = ("name",)


def _checked(properties: dict[str, dict[str, Any]], allowed: frozenset[str], where: str) -> None:
    if set(properties) != allowed:
        raise RuntimeError(
            f"the schema's {where} keys {sorted(properties)} are not the parser's {sorted(allowed)}"
        )


def schema(kind: Kind) -> dict[str, Any]:
    """The JSON Schema of a ``kind`` file."""
    _checked(HOST, hosts.HOST_KEYS, "host")
    _checked(NETWORK, hosts.NETWORK_KEYS, "network")
    _checked(SERVICE, hosts.SERVICE_KEYS, "service")
    _checked(PORT, hosts.PORT_KEYS, "port")
    keys = hosts.HOST_KEYS if kind is Kind.HOST else hosts.PROFILE_KEYS
    doc: dict[str, Any] = {
        "$schema": DIALECT,
        "title": f"reconciler {kind} file",
        "description": (
            "hosts/<name>.yaml: one host; the file stem is its name."
            if kind is Kind.HOST
            else "profiles/<name>.yaml: a fragment that hosts and other profiles include."
        ),
        "type": "object" if kind is Kind.HOST else ["object", "null"],
        "properties": {k: HOST[k] for k in sorted(keys)},
        "additionalProperties": False,
    }
    if kind is Kind.HOST:
        doc["required"] = list(HOST_REQUIRED)
    return doc

"""Host definitions: parse, merge profiles, validate, normalise.

The core is pure: :func:`parse_fleet` takes the repository's files as a mapping of
relative path to text and returns validated :class:`Host` values plus one
:class:`~reconciler.errors.ConfigError` per invalid host. Only :func:`read_tree`
touches the disk.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import posixpath
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, Event, ScalarEvent
from yaml.nodes import MappingNode, Node, SequenceNode

from reconciler.errors import ConfigError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SERVICE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
FORMATS = ("aci", "appimage")
RESTART_POLICIES = ("always", "on-failure", "never")
BUILTIN_PACKAGES = frozenset({"busybox"})
HOST_KEYS = frozenset({"name", "include", "formats", "network", "services", "files"})
PROFILE_KEYS = HOST_KEYS - {"name"}
NETWORK_KEYS = frozenset({"address", "gateway", "dns"})
SERVICE_KEYS = frozenset({"package", "exec", "restart"})
# Paths the image builder owns; a host's `files` may not shadow them.
RESERVED_PREFIXES = ("AppRun", ".reconciler", "etc/reconciler", "etc/service", "bin/busybox", ".DirIcon")
# The AppImage's desktop entry and icon at the image root (nix/host.nix).
RESERVED_TOP_SUFFIXES = (".desktop", ".svg")
MAX_FILE_BYTES = 1 << 20
# A definition is about five levels deep (services.web.exec[0]). libyaml composes nodes
# by recursing in C once per level, where some ten thousand levels overflow the stack
# and kill the daemon (SIGSEGV, no exception to catch); deep_merge and JSON for Nix
# recurse too. Checked on the parser's event stream, aliases counted as the nodes they
# stand for, before anything recursive runs.
MAX_DEPTH = 64
# Nodes and scalar characters a document may hold once every alias is counted as what
# it stands for. A MAX_FILE_BYTES document written out without aliases stays within
# both (a node takes about a byte of text or more, a scalar's value is no longer than
# its text), so aliases ("billion laughs") cannot make a file cost more in deep_merge,
# validation and the JSON handed to Nix than the largest file read_tree accepts.
MAX_NODES = MAX_FILE_BYTES
MAX_SCALAR_CHARS = MAX_FILE_BYTES


@dataclass(frozen=True)
class Service:
    """One supervised sub-process of a host."""

    name: str
    package: str
    exec: tuple[str, ...]
    restart: str


@dataclass(frozen=True)
class Network:
    address: str | None = None
    gateway: str | None = None
    dns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Host:
    """A validated host definition, profiles already merged in."""

    name: str
    formats: tuple[str, ...]
    network: Network
    services: tuple[Service, ...]
    files: tuple[tuple[str, str], ...]
    # Repository files this host's definition was read from: its own file and every
    # profile it includes, transitively. Used to explain why a host rebuilds.
    sources: tuple[str, ...] = field(default=(), compare=False)

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(sorted({s.package for s in self.services}))

    def inputs(self) -> tuple[str, ...]:
        """Repository paths that feed this host's build."""
        pkgs = tuple(f"packages/{p}.nix" for p in self.packages if p not in BUILTIN_PACKAGES)
        return self.sources + pkgs

    def to_nix(self) -> dict[str, Any]:
        """The normalised form handed to Nix; formatting of the YAML does not show."""
        net: dict[str, Any] = {}
        if self.network.address is not None:
            net["address"] = self.network.address
        if self.network.gateway is not None:
            net["gateway"] = self.network.gateway
        if self.network.dns:
            net["dns"] = list(self.network.dns)
        return {
            "name": self.name,
            "formats": list(self.formats),
            "network": net,
            "services": {
                s.name: {"package": s.package, "exec": list(s.exec), "restart": s.restart}
                for s in self.services
            },
            "files": dict(self.files),
        }


@dataclass(frozen=True)
class Fleet:
    hosts: Mapping[str, Host]
    errors: tuple[ConfigError, ...]
    # Host names whose file exists but failed validation: they are neither built
    # nor treated as deleted.
    invalid: frozenset[str] = frozenset()


SYMLINK = "\0symlink"
TOO_BIG = "\0too-big"
UNREADABLE = "\0unreadable:"


class _RefusedError(Exception):
    """A document the loaders would accept but we do not; parse_yaml names the file."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeys(yaml.constructor.SafeConstructor):
    """Refuses a mapping that states a key twice.

    PyYAML keeps the last value silently, so the file would mean something other than
    what a reader who stopped at the first one sees. Keys that a merge (``<<``) brings
    in may still be overridden: that is what merging is for.
    """

    _root: Node | None = None
    _checked: set[int]

    def construct_document(self, node: Node) -> Any:
        self._root, self._checked = node, set()
        return super().construct_document(node)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        self._check_unique(node)
        return super().construct_mapping(node, deep=deep)

    def _check_unique(self, node: MappingNode) -> None:
        # Once per node and before flatten_mapping rewrites it: a merge source, once
        # flattened, holds the merged keys beside its own.
        if id(node) in self._checked:
            return
        self._checked.add(id(node))
        seen: dict[Any, Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                for src in sources:
                    if isinstance(src, MappingNode):
                        self._check_unique(src)
                continue
            key = self.construct_object(key_node)
            if not isinstance(key, Hashable):
                continue  # SafeConstructor refuses it, with its position
            first = seen.setdefault(key, key_node)
            if first is not key_node:
                raise _RefusedError(
                    _key_path(self._root, node, key),
                    f"duplicate key at {_position(key_node)} (first at {_position(first)}): "
                    "ambiguous, YAML would silently keep only the last",
                )


class _PyLoader(_UniqueKeys, yaml.SafeLoader):
    """Pure Python: slower, but says more precisely where and why a document is invalid."""


# libyaml's loader when PyYAML was built with it: parsing dominates planning a large fleet.
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = _PyLoader
if getattr(yaml, "__with_libyaml__", False):

    class _CLoader(_UniqueKeys, yaml.CSafeLoader):
        pass

    _LOADER = _CLoader


def _position(item: Node | Event) -> str:
    mark = item.start_mark
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown position"


def _key_path(root: Node | None, target: MappingNode, key: object) -> str:
    """The dotted path of ``key`` in ``target``, found from the document root.

    Only on error, so a walk of the whole document is cheap enough.
    """
    todo: list[tuple[Node, str]] = [(root, "")] if root is not None else []
    visited: set[int] = set()
    while todo:
        node, prefix = todo.pop()
        if node is target:
            return f"{prefix}.{key}" if prefix else str(key)
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, MappingNode):
            for k, v in node.value:
                seg = str(k.value) if isinstance(k.value, str) else "?"
                todo.append((v, f"{prefix}.{seg}" if prefix else seg))
        elif isinstance(node, SequenceNode):
            todo.extend((v, f"{prefix}[{i}]") for i, v in enumerate(node.value))
    return str(key)


def _check_limits(text: str, loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader]) -> None:
    """Refuse a document too deep or too large before a loader builds it.

    Walks the parser's event stream (both parsers are iterative, only composing nodes
    recurses) and stops at the first limit broken, so a hostile document costs no more
    than the text up to that point. An alias counts as the whole node it names:
    its nodes, its scalar characters and its height below the alias.
    """
    # Per open collection: its anchor, and nodes and characters before it began.
    open_: list[tuple[str | None, int, int]] = []
    # Per open collection: the height of its tallest child so far.
    heights: list[int] = []
    # Per anchor: (nodes, characters, height); None while the anchored node is open.
    anchors: dict[str, tuple[int, int, int] | None] = {}
    nodes = chars = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, ScalarEvent):
            n, c, h = 1, len(event.value), 0
            if event.anchor is not None:
                anchors[event.anchor] = (n, c, h)
        elif isinstance(event, AliasEvent):
            if event.anchor not in anchors:
                continue  # the composer reports the undefined alias
            size = anchors[event.anchor]
            if size is None:
                raise _RefusedError(
                    "", f"alias *{event.anchor} at {_position(event)} refers to a node containing it"
                )
            n, c, h = size
            if len(open_) + h > MAX_DEPTH:
                raise _RefusedError(
                    "", f"nested deeper than {MAX_DEPTH} levels (alias *{event.anchor} at {_position(event)})"
                )
        elif isinstance(event, CollectionStartEvent):
            if len(open_) >= MAX_DEPTH:
                raise _RefusedError("", f"nested deeper than {MAX_DEPTH} levels at {_position(event)}")
            open_.append((event.anchor, nodes, chars))
            heights.append(0)
            if event.anchor is not None:
                anchors[event.anchor] = None
            nodes += 1
            _check_size(nodes, chars, event)
            continue
        elif isinstance(event, CollectionEndEvent):
            anchor, nodes_before, chars_before = open_.pop()
            h = heights.pop() + 1
            if anchor is not None:
                anchors[anchor] = (nodes - nodes_before, chars - chars_before, h)
            if heights:
                heights[-1] = max(heights[-1], h)
            continue
        else:
            continue
        if heights:
            heights[-1] = max(heights[-1], h)
        nodes += n
        chars += c
        _check_size(nodes, chars, event)


def _check_size(nodes: int, chars: int, event: Event) -> None:
    if nodes > MAX_NODES:
        raise _RefusedError(
            "", f"holds more than {MAX_NODES} nodes, aliases expanded (reached at {_position(event)})"
        )
    if chars > MAX_SCALAR_CHARS:
        raise _RefusedError(
            "",
            f"holds more than {MAX_SCALAR_CHARS} characters of scalars, aliases expanded "
            f"(reached at {_position(event)})",
        )


@dataclass
class ParseCache:
    """What one :func:`parse_fleet` call parsed, for the next call to reuse.

    ``docs`` maps file text to its parsed document; documents are shared between
    hosts and calls, so nothing may mutate them (deep_merge builds new mappings).
    ``hosts`` maps (host file, its text, digest of every profile and package name)
    to the resulting host or error.
    """

    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    hosts: dict[tuple[str, str, str], Host | ConfigError] = field(default_factory=dict)


def parse_fleet(files: Mapping[str, str], cache: ParseCache | None = None) -> Fleet:
    """Validate every host in ``files`` (relative path -> text).

    ``cache`` carries results from one call to the next; on return it holds exactly
    what ``files`` gave.
    """
    old = cache or ParseCache()
    new = ParseCache()
    load = functools.partial(_load_yaml, seen=new.docs, cache=old.docs, failed={})
    # Each profile is resolved once per call, whichever hosts and profiles include it:
    # expanding includes afresh at every mention costs 2**depth for a diamond.
    resolved: dict[str, Resolved] = {}
    profiles = _by_stem(files, "profiles/")
    packages = {posixpath.basename(p)[:-4] for p in files if p.startswith("packages/")}
    hosts: dict[str, Host] = {}
    errors: list[ConfigError] = []
    invalid: set[str] = set()
    # A host's validation depends on its own text, every profile and the package names.
    context = hashlib.sha256(
        json.dumps([sorted(packages), [(p, files[p]) for ps in profiles.values() for p in ps]]).encode()
    ).hexdigest()
    for stem, paths in _by_stem(files, "hosts/").items():
        if len(paths) > 1:
            # x.yaml beside x.yml: neither is taken, whichever is valid.
            both = " and ".join(paths)
            errors.append(ConfigError(paths[0], "", f"host {stem!r} is defined twice: {both}"))
            invalid.add(stem)
            continue
        (path,) = paths
        key = (path, files[path], context)
        result = old.hosts.get(key)
        if result is None:
            try:
                result = _parse_host(path, files, profiles, packages, load, resolved)
            except ConfigError as exc:
                result = exc
        new.hosts[key] = result
        if isinstance(result, ConfigError):
            errors.append(result)
            invalid.add(stem)
            continue
        hosts[result.name] = result
    if cache is not None:
        cache.docs, cache.hosts = new.docs, new.hosts
    return Fleet(hosts=hosts, errors=tuple(errors), invalid=frozenset(invalid))


def _is_yaml(path: str) -> bool:
    return path.endswith((".yaml", ".yml")) and posixpath.dirname(path).count("/") == 0


def _by_stem(files: Iterable[str], folder: str) -> dict[str, tuple[str, ...]]:
    """The YAML files directly in ``folder`` by stem, sorted; two for x.yaml and x.yml."""
    out: dict[str, tuple[str, ...]] = {}
    for path in sorted(files):
        if path.startswith(folder) and _is_yaml(path):
            stem = _stem(path)
            out[stem] = (*out.get(stem, ()), path)
    return out


def _stem(path: str) -> str:
    return posixpath.splitext(posixpath.basename(path))[0]


def _load_yaml(
    path: str,
    text: str,
    seen: dict[str, dict[str, Any]],
    cache: dict[str, dict[str, Any]],
    failed: dict[tuple[str, str], ConfigError],
) -> dict[str, Any]:
    done = seen.get(text)
    if done is not None:
        return done
    if text in cache:
        done = seen[text] = cache[text]
        return done
    # A broken profile is parsed once, not once per host including it; keyed by path
    # too because the error names the file.
    err = failed.get((path, text))
    if err is None:
        try:
            done = seen[text] = _parse_yaml(path, text)
            return done
        except ConfigError as exc:
            err = failed[(path, text)] = exc
    raise ConfigError(err.path, err.key, err.reason)


Load = Callable[[str, str], dict[str, Any]]
# A profile with its includes merged in, and the files it came from (each once, in order).
Resolved = tuple[dict[str, Any], tuple[str, ...]]


def parse_yaml(path: str, text: str) -> Any:
    """The YAML document ``text`` read from ``path``; errors name the file, line and column.

    Refuses what loading would make costly or ambiguous: more than MAX_FILE_BYTES,
    nesting beyond MAX_DEPTH, more than MAX_NODES or MAX_SCALAR_CHARS once aliases are
    expanded, an alias inside the node it names, a key stated twice in one mapping.
    """
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ConfigError(path, "", f"is larger than {MAX_FILE_BYTES} bytes")
    try:
        try:
            return _load(text, _LOADER)
        except yaml.YAMLError:
            # The Python loader says more precisely where and why; errors are rare.
            return _load(text, _PyLoader)
    except _RefusedError as exc:
        raise ConfigError(path, exc.key, exc.reason) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(path, "", f"invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(path, "", "invalid YAML: nested too deeply") from None


def _load(text: str, loader: type[yaml.SafeLoader] | type[yaml.CSafeLoader]) -> Any:
    _check_limits(text, loader)
    return yaml.load(text, Loader=loader)


def _parse_yaml(path: str, text: str) -> dict[str, Any]:
    if text == SYMLINK:
        raise ConfigError(path, "", "is a symlink; definitions must live in the repository")
    if text == TOO_BIG:
        raise ConfigError(path, "", f"is larger than {MAX_FILE_BYTES} bytes")
    if text.startswith(UNREADABLE):
        raise ConfigError(path, "", "cannot be read: " + text[len(UNREADABLE) :])
    data = parse_yaml(path, text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"must be a mapping, not {_kind(data)}")
    return data


def _resolve_profile(
    name: str,
    files: Mapping[str, str],
    profiles: Mapping[str, tuple[str, ...]],
    stack: tuple[str, ...],
    load: Load,
    resolved: dict[str, Resolved],
) -> Resolved:
    """A profile with its own includes merged in, and the files it came from.

    ``resolved`` memoises successes only. They do not depend on ``stack``: a profile
    that resolves has no include cycle below it. Errors do (the cycle is named from
    where it was entered) and end the host's resolution anyway.
    """
    done = resolved.get(name)
    if done is not None:
        return done
    path, *twins = profiles[name]
    if twins:
        raise ConfigError(path, "", f"profile {name!r} is defined twice: {' and '.join((path, *twins))}")
    if name in stack:
        raise ConfigError(path, "include", "include cycle: " + " -> ".join((*stack, name)))
    data = load(path, files[path])
    check_keys(path, "", data, PROFILE_KEYS)
    merged: dict[str, Any] = {}
    sources: tuple[str, ...] = ()
    for inc in _includes(path, data, profiles):
        inc_data, inc_sources = _resolve_profile(inc, files, profiles, (*stack, name), load, resolved)
        merged = deep_merge(merged, inc_data)
        sources += inc_sources
    body = {k: v for k, v in data.items() if k != "include"}
    # Dropping repeats here keeps the first occurrences, and so the order, the host's
    # own de-duplication would give, without a tuple that doubles at every diamond.
    done = resolved[name] = (deep_merge(merged, body), tuple(dict.fromkeys((*sources, path))))
    return done


def _includes(path: str, data: Mapping[str, Any], profiles: Mapping[str, tuple[str, ...]]) -> list[str]:
    inc = data.get("include", [])
    if isinstance(inc, str):
        inc = [inc]
    if not isinstance(inc, list) or not all(isinstance(i, str) for i in inc):
        raise ConfigError(path, "include", "must be a list of profile names")
    for i in inc:
        if i not in profiles:
            raise ConfigError(path, "include", f"unknown profile {i!r} (no profiles/{i}.yaml)")
    return inc


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``over`` onto ``base``: mappings merge recursively, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _parse_host(
    path: str,
    files: Mapping[str, str],
    profiles: Mapping[str, tuple[str, ...]],
    packages: set[str],
    load: Load,
    resolved: dict[str, Resolved],
) -> Host:
    stem = _stem(path)
    if not NAME_RE.fullmatch(stem):
        raise ConfigError(path, "", f"file name {stem!r} is not a valid host name ({NAME_RE.pattern})")
    data = load(path, files[path])
    check_keys(path, "", data, HOST_KEYS)
    name = data.get("name")
    if name is None:
        raise ConfigError(path, "name", "is required")
    if name != stem:
        raise ConfigError(path, "name", f"must equal the file stem {stem!r}, got {name!r}")
    merged: dict[str, Any] = {}
    sources: tuple[str, ...] = ()
    for inc in _includes(path, data, profiles):
        try:
            inc_data, inc_sources = _resolve_profile(inc, files, profiles, (), load, resolved)
        except ConfigError as exc:
            # Charge a broken profile to the host that includes it, so callers that map
            # errors to hosts by path (plan, cli build) see this host, not the profile.
            raise ConfigError(path, "include", str(exc)) from None
        merged = deep_merge(merged, inc_data)
        sources += inc_sources
    merged = deep_merge(merged, {k: v for k, v in data.items() if k != "include"})
    # Report errors against the host file: that is where the operator looks first.
    return Host(
        name=stem,
        formats=_formats(path, merged.get("formats", list(FORMATS))),
        network=_network(path, merged.get("network", {})),
        services=_services(path, merged.get("services", {}), packages),
        files=_files(path, merged.get("files", {}), stem),
        sources=tuple(dict.fromkeys((path, *sources))),
    )


def check_keys(path: str, prefix: str, data: Mapping[Any, Any], allowed: frozenset[str]) -> None:
    """Refuse a key of ``data`` (at dotted ``prefix`` in file ``path``) not in ``allowed``."""
    for k in data:
        if not isinstance(k, str):
            raise ConfigError(path, prefix or "", f"key {k!r} must be a string")
        if k not in allowed:
            key = f"{prefix}.{k}" if prefix else k
            raise ConfigError(path, key, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _kind(v: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "empty"}.get(
        type(v), type(v).__name__
    )


def _formats(path: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "formats", f"must be a non-empty list of {', '.join(FORMATS)}")
    for f in value:
        if f not in FORMATS:
            raise ConfigError(path, "formats", f"unknown format {f!r} (allowed: {', '.join(FORMATS)})")
    return tuple(f for f in FORMATS if f in value)


def _network(path: str, value: Any) -> Network:
    if not isinstance(value, dict):
        raise ConfigError(path, "network", f"must be a mapping, not {_kind(value)}")
    check_keys(path, "network", value, NETWORK_KEYS)
    address = value.get("address")
    if address is not None:
        try:
            address = str(ipaddress.ip_interface(str(address)))
        except ValueError:
            raise ConfigError(path, "network.address", f"{address!r} is not an address/prefix") from None
        if "/" not in str(value["address"]):
            raise ConfigError(path, "network.address", "needs a prefix length, e.g. 10.0.0.5/24")
    gateway = value.get("gateway")
    if gateway is not None:
        try:
            gateway = str(ipaddress.ip_address(str(gateway)))
        except ValueError:
            raise ConfigError(path, "network.gateway", f"{gateway!r} is not an IP address") from None
    dns = value.get("dns", [])
    if not isinstance(dns, list):
        raise ConfigError(path, "network.dns", "must be a list of IP addresses")
    try:
        dns_t = tuple(str(ipaddress.ip_address(str(d))) for d in dns)
    except ValueError as exc:
        raise ConfigError(path, "network.dns", str(exc)) from None
    return Network(address=address, gateway=gateway, dns=dns_t)


def _services(path: str, value: Any, packages: set[str]) -> tuple[Service, ...]:
    if not isinstance(value, dict):
        raise ConfigError(path, "services", f"must be a mapping, not {_kind(value)}")
    out = []
    for name in sorted(value, key=str):
        key = f"services.{name}"
        if not isinstance(name, str) or not SERVICE_RE.fullmatch(name):
            raise ConfigError(path, key, f"service name must match {SERVICE_RE.pattern}")
        spec = value[name]
        if not isinstance(spec, dict):
            raise ConfigError(path, key, f"must be a mapping, not {_kind(spec)}")
        check_keys(path, key, spec, SERVICE_KEYS)
        package = spec.get("package", "busybox")
        if not isinstance(package, str) or not PACKAGE_RE.fullmatch(package):
            raise ConfigError(path, f"{key}.package", f"must be a package name ({PACKAGE_RE.pattern})")
        if package not in BUILTIN_PACKAGES and package not in packages:
            raise ConfigError(
                path, f"{key}.package", f"unknown package {package!r} (no packages/{package}.nix)"
            )
        argv = spec.get("exec")
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in argv)
        ):
            raise ConfigError(path, f"{key}.exec", "must be a non-empty list of strings")
        argv = [str(a) for a in argv]
        if any("\0" in a for a in argv):
            raise ConfigError(path, f"{key}.exec", "must not contain NUL characters")
        _relative_path(path, f"{key}.exec", argv[0])
        restart = spec.get("restart", "always")
        if restart not in RESTART_POLICIES:
            raise ConfigError(
                path, f"{key}.restart", f"must be one of {', '.join(RESTART_POLICIES)}, got {restart!r}"
            )
        out.append(Service(name=name, package=package, exec=tuple(argv), restart=restart))
    return tuple(out)


def _relative_path(path: str, key: str, p: str) -> str:
    """A normalised path inside the image root, or an error naming ``key``."""
    if not p or p.startswith("/") or "\0" in p or "\\" in p:
        raise ConfigError(path, key, f"{p!r} must be a relative path inside the image")
    parts = p.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ConfigError(path, key, f"{p!r} must not contain empty, '.' or '..' components")
    return p


def _files(path: str, value: Any, host: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ConfigError(path, "files", f"must be a mapping, not {_kind(value)}")
    out = []
    for name in sorted(value, key=str):
        key = f"files.{name}"
        if not isinstance(name, str):
            raise ConfigError(path, key, "file names must be strings")
        _relative_path(path, key, name)
        builder_owned = any(
            name == r or name.startswith(r + "/") or r.startswith(name + "/") for r in RESERVED_PREFIXES
        )
        if builder_owned or name in (host + sfx for sfx in RESERVED_TOP_SUFFIXES):
            raise ConfigError(path, key, "is reserved for the image builder")
        content = value[name]
        if not isinstance(content, str):
            raise ConfigError(path, key, f"content must be a string, not {_kind(content)}")
        if "\0" in content:
            raise ConfigError(path, key, "content must be text without NUL characters")
        out.append((name, content))
    names = {n for n, _ in out}
    for n in sorted(names):
        parent = n.rsplit("/", 1)[0] if "/" in n else None
        while parent:
            if parent in names:
                raise ConfigError(path, f"files.{n}", f"its parent {parent!r} is also a file")
            parent = parent.rsplit("/", 1)[0] if "/" in parent else None
    return tuple(out)


def eval_key(host: Host, recipe: str) -> str:
    """What a host's image derivation is a function of: its normalised definition and
    ``recipe`` (the digest of every other input). Equal keys, equal derivations."""
    data = json.dumps(host.to_nix(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{recipe}\n{data}".encode()).hexdigest()

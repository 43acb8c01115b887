"""Host definitions: parse, merge profiles, validate, normalise.

Pure: :func:`parse_fleet` takes the repository's files as a mapping of relative
path to text (reconciler.adapters.tree reads them) and returns validated :class:`Host`
values plus one :class:`~reconciler.errors.ConfigError` per invalid host. YAML itself
is reconciler.core.schema's.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.core.appc import PortProtocol, is_ac_name
from reconciler.core.formats import DEFAULT_FORMATS, Format
from reconciler.core.schema import MAX_FILE_BYTES, check_keys, kind, parse_yaml
from reconciler.errors import ConfigError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SERVICE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
FORMATS = tuple(f.value for f in Format)
RESTART_POLICIES = ("always", "on-failure", "never")
BUILTIN_PACKAGES = frozenset({"busybox"})
# The top-level folders Nix never sees as files: it is given their hosts validated and
# normalised (the fleet file), so a package cannot read them, and the evaluation cache
# keys packages on everything else in the repository.
NOT_READ_BY_PACKAGES = frozenset({"hosts", "profiles"})
HOST_KEYS = frozenset({"name", "include", "formats", "network", "services", "files"})
PROFILE_KEYS = HOST_KEYS - {"name"}
NETWORK_KEYS = frozenset({"address", "gateway", "dns"})
SERVICE_KEYS = frozenset({"package", "exec", "restart", "ports"})
PORT_KEYS = frozenset({"name", "port", "protocol"})
# Paths the image builder owns; a host's `files` may not shadow them. The last six
# are the ACI's directories for the executor's mounts and for temporary files.
RESERVED_PREFIXES = (
    "AppRun",
    ".reconciler",
    "etc/reconciler",
    "etc/service",
    "bin/busybox",
    ".DirIcon",
    "tmp",
    "var/tmp",
    "run",
    "dev",
    "proc",
    "sys",
)
# The AppImage's desktop entry and icon at the image root (nix/host.nix).
RESERVED_TOP_SUFFIXES = (".desktop", ".svg")
# A file may not be a reserved path, lie below one, or be a directory above one: the
# last set holds those directories (etc for etc/reconciler, var for var/tmp).
_RESERVED = frozenset(RESERVED_PREFIXES)
_RESERVED_BELOW = tuple(r + "/" for r in RESERVED_PREFIXES)
_RESERVED_ABOVE = frozenset(r[:i] for r in RESERVED_PREFIXES for i, c in enumerate(r) if c == "/")


@dataclass(frozen=True)
class Port:
    """A port a service listens on: the ACI manifest's ``app.ports`` (appc)."""

    name: str  # an appc ACName (words joined by -), unique in the host
    port: int
    protocol: PortProtocol = PortProtocol.TCP


@dataclass(frozen=True)
class Service:
    """One supervised sub-process of a host."""

    name: str
    package: str
    exec: tuple[str, ...]
    restart: str
    ports: tuple[Port, ...] = ()

    def to_nix(self) -> dict[str, Any]:
        out: dict[str, Any] = {"package": self.package, "exec": list(self.exec), "restart": self.restart}
        # Only when there are any: a host without ports keeps the image (and the
        # derivation) it had before services could declare them.
        if self.ports:
            out["ports"] = [{"name": p.name, "port": p.port, "protocol": str(p.protocol)} for p in self.ports]
        return out


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

    @functools.cached_property
    def packages(self) -> tuple[str, ...]:
        # Asked per host by every plan, also of a pass with nothing to do.
        return tuple(sorted({s.package for s in self.services}))

    def inputs(self) -> tuple[str, ...]:
        """Repository paths that feed this host's build."""
        return self._inputs

    # Cached, as to_nix's JSON: a host unchanged since the last pass is the same object
    # (the parse cache's), and a plan at 10,000 hosts asks both of every host.
    @functools.cached_property
    def _inputs(self) -> tuple[str, ...]:
        pkgs = tuple(f"packages/{p}.nix" for p in self.packages if p not in BUILTIN_PACKAGES)
        return self.sources + pkgs

    @functools.cached_property
    def nix_json(self) -> str:
        """to_nix as canonical JSON (sorted keys, no spaces)."""
        return json.dumps(self.to_nix(), sort_keys=True, separators=(",", ":"))

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
            "services": {s.name: s.to_nix() for s in self.services},
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


# (host file, digest of its text, digest of every profile and package name): what a
# host's validation is a function of.
ParseKey = tuple[str, str, str]


@dataclass
class ParseCache:
    """What one :func:`parse_fleet` call parsed, for the next call to reuse.

    ``docs`` maps file text to its parsed document; documents are shared between
    hosts and calls, so nothing may mutate them (deep_merge builds new mappings).
    ``hosts`` maps each host's ParseKey to the resulting host or error; the daemon
    keeps it in its ledger (encode_parsed), so that a new process parses only
    what changed. ``digests`` maps host file text to its text_digest (a ParseKey's
    middle), asked of every host file by each call and by :func:`unparsed`.
    """

    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    hosts: dict[ParseKey, Host | ConfigError] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def encode_parsed(result: Host | ConfigError) -> str:
    """A parse result as text, for decode_parsed in a later process: a kind line, then
    JSON lines (JSON has no raw line break). A host's canonical JSON is kept verbatim,
    so that the host read back has it without encoding it again."""
    if isinstance(result, ConfigError):
        return "error\n" + json.dumps([result.path, result.key, result.reason])
    return f"host\n{json.dumps(list(result.sources))}\n{result.nix_json}"


def decode_parsed(text: str) -> Host | ConfigError:
    """What encode_parsed wrote. Raises ValueError (or KeyError, TypeError) on
    anything else: the caller parses the file again."""
    kind, _, rest = text.partition("\n")
    if kind == "error":
        path, key, reason = json.loads(rest)
        return ConfigError(str(path), str(key), str(reason))
    if kind != "host":
        raise ValueError(f"not a parse result: {kind[:20]!r}")
    sources, _, nix_json = rest.partition("\n")
    host = _from_nix(json.loads(nix_json), tuple(json.loads(sources)))
    # What to_nix gives for this host, as the process that parsed it encoded it.
    host.__dict__["nix_json"] = nix_json
    return host


def _from_nix(h: dict[str, Any], sources: tuple[str, ...]) -> Host:
    net = h["network"]
    return Host(
        name=str(h["name"]),
        formats=tuple(h["formats"]),
        network=Network(
            address=net.get("address"), gateway=net.get("gateway"), dns=tuple(net.get("dns", ()))
        ),
        services=tuple(
            Service(
                name=n,
                package=s["package"],
                exec=tuple(s["exec"]),
                restart=s["restart"],
                ports=tuple(
                    Port(p["name"], int(p["port"]), PortProtocol(p["protocol"])) for p in s.get("ports", ())
                ),
            )
            for n, s in h["services"].items()
        ),
        files=tuple(h["files"].items()),
        sources=sources,
    )


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
    packages = defined_packages(files)
    hosts: dict[str, Host] = {}
    errors: list[ConfigError] = []
    invalid: set[str] = set()
    context = parse_context(files)
    for stem, paths in _by_stem(files, "hosts/").items():
        if len(paths) > 1:
            # x.yaml beside x.yml: neither is taken, whichever is valid.
            both = " and ".join(paths)
            errors.append(ConfigError(paths[0], "", f"host {stem!r} is defined twice: {both}"))
            invalid.add(stem)
            continue
        (path,) = paths
        key = (path, _digest(files[path], old.digests, new.digests), context)
        result = old.hosts.get(key)
        if result is None:
            try:
                result = _parse_host(path, files, profiles, packages, load, resolved)
            except ConfigError as exc:
                result = exc
            except Exception as exc:
                # A case the checks above did not foresee: this host is invalid, saying
                # what went wrong, and the others are planned.
                result = ConfigError(path, "", f"cannot be read: {type(exc).__name__}: {exc}")
        new.hosts[key] = result
        if isinstance(result, ConfigError):
            errors.append(result)
            invalid.add(stem)
            continue
        hosts[result.name] = result
    if cache is not None:
        cache.docs, cache.hosts, cache.digests = new.docs, new.hosts, new.digests
    return Fleet(hosts=hosts, errors=tuple(errors), invalid=frozenset(invalid))


def parse_context(files: Mapping[str, str]) -> str:
    """What a host's validation depends on besides its own text: every profile and the
    package names (the last part of its ParseKey)."""
    profiles = _by_stem(files, "profiles/")
    packages = defined_packages(files)
    return hashlib.sha256(
        json.dumps([sorted(packages), [(p, files[p]) for ps in profiles.values() for p in ps]]).encode()
    ).hexdigest()


def defined_packages(files: Iterable[str]) -> frozenset[str]:
    """The packages the repository has: packages/NAME.nix."""
    return frozenset(posixpath.basename(p)[:-4] for p in files if p.startswith("packages/"))


def unparsed(files: Mapping[str, str], cache: ParseCache) -> list[str]:
    """The host files of ``files`` that parse_fleet would parse, given ``cache``."""
    context = parse_context(files)
    digests = cache.digests
    return [
        p
        for paths in _by_stem(files, "hosts/").values()
        if len(paths) == 1
        and ((p := paths[0]), _digest(files[p], digests, digests), context) not in cache.hosts
    ]


def _digest(text: str, known: Mapping[str, str], into: dict[str, str]) -> str:
    """text_digest of ``text``, from ``known`` when it holds it; noted ``into``."""
    digest = known.get(text)
    if digest is None:
        digest = text_digest(text)
    into[text] = digest
    return digest


def _by_stem(files: Iterable[str], folder: str) -> dict[str, tuple[str, ...]]:
    """The YAML files directly in ``folder`` by stem, sorted; two for x.yaml and x.yml."""
    out: dict[str, tuple[str, ...]] = {}
    # In string operations: a plan at 10,000 hosts asks this of every host file more
    # than once.
    for path in sorted(p for p in files if p.startswith(folder)):
        name = path[len(folder) :]
        if "/" not in name and name.endswith((".yaml", ".yml")):
            stem = posixpath.splitext(name)[0]
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
        raise ConfigError(path, "", f"must be a mapping, not {kind(data)}")
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
    packages: frozenset[str],
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
    formats = _formats(path, merged.get("formats", list(DEFAULT_FORMATS)))
    if any(f in formats for f in (Format.ACI, Format.ACI_THIN)) and stem.endswith("-"):
        # appc's ACIdentifier, which an ACI's name is, ends in a letter or digit.
        raise ConfigError(path, "name", f"{stem!r} cannot name an ACI: it must end with a letter or digit")
    return Host(
        name=stem,
        formats=formats,
        network=_network(path, merged.get("network", {})),
        services=_services(path, merged.get("services", {}), packages),
        files=_files(path, merged.get("files", {}), stem),
        sources=tuple(dict.fromkeys((path, *sources))),
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


# An IPv6 scope (fe80::1%eth0): an interface's name or number. ipaddress takes any
# text after the "%", new lines and "$(...)" among it, and network.env is read by sh.
_SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@functools.lru_cache(maxsize=1024)
def _address(text: str) -> str:
    """An IP address as ipaddress writes it; ValueError if it is none. Cached: the
    gateway and the DNS servers of most hosts come from one profile."""
    return _scoped(ipaddress.ip_address(text))


def _scoped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``address`` as ipaddress writes it, or ValueError if its scope is no interface's
    name (_SCOPE). (An IPv6Interface is an IPv6Address.)"""
    scope = address.scope_id if isinstance(address, ipaddress.IPv6Address) else None
    if scope is not None and not _SCOPE.fullmatch(scope):
        raise ValueError(f"{scope!r} is no interface name")
    return str(address)


def _network(path: str, value: Any) -> Network:
    if not isinstance(value, dict):
        raise ConfigError(path, "network", f"must be a mapping, not {kind(value)}")
    check_keys(path, "network", value, NETWORK_KEYS)
    address = value.get("address")
    if address is not None:
        try:
            address = _scoped(ipaddress.ip_interface(str(address)))
        except ValueError:
            raise ConfigError(path, "network.address", f"{address!r} is not an address/prefix") from None
        if "/" not in str(value["address"]):
            raise ConfigError(path, "network.address", "needs a prefix length, e.g. 10.0.0.5/24")
    gateway = value.get("gateway")
    if gateway is not None:
        try:
            gateway = _address(str(gateway))
        except ValueError:
            raise ConfigError(path, "network.gateway", f"{gateway!r} is not an IP address") from None
    dns = value.get("dns", [])
    if not isinstance(dns, list):
        raise ConfigError(path, "network.dns", "must be a list of IP addresses")
    try:
        dns_t = tuple(_address(str(d)) for d in dns)
    except ValueError as exc:
        raise ConfigError(path, "network.dns", str(exc)) from None
    return Network(address=address, gateway=gateway, dns=dns_t)


def _services(path: str, value: Any, packages: frozenset[str]) -> tuple[Service, ...]:
    if not isinstance(value, dict):
        raise ConfigError(path, "services", f"must be a mapping, not {kind(value)}")
    out = []
    for name in sorted(value, key=str):
        key = f"services.{name}"
        if not isinstance(name, str) or not SERVICE_RE.fullmatch(name):
            raise ConfigError(path, key, f"service name must match {SERVICE_RE.pattern}")
        spec = value[name]
        if not isinstance(spec, dict):
            raise ConfigError(path, key, f"must be a mapping, not {kind(spec)}")
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
        ports = _ports(path, f"{key}.ports", spec.get("ports", []))
        out.append(Service(name=name, package=package, exec=tuple(argv), restart=restart, ports=ports))
    # One ACI holds every service: a port's name, and its number per protocol, are the
    # host's (appc: app.ports names are unique).
    names: dict[str, str] = {}
    numbers: dict[tuple[int, PortProtocol], str] = {}
    for svc in out:
        for i, port in enumerate(svc.ports):
            at = f"services.{svc.name}.ports[{i}]"
            first = names.setdefault(port.name, at)
            if first != at:
                raise ConfigError(path, f"{at}.name", f"port name {port.name!r} is already used by {first}")
            first = numbers.setdefault((port.port, port.protocol), at)
            if first != at:
                why = f"{port.protocol} port {port.port} is already declared by {first}"
                raise ConfigError(path, f"{at}.port", why)
    return tuple(out)


MAX_PORT_NAME = 63


def _ports(path: str, key: str, value: Any) -> tuple[Port, ...]:
    """A service's ``ports``: a list of {name, port, protocol} (unique in the host:
    :func:`_services` checks)."""
    if not isinstance(value, list):
        raise ConfigError(path, key, f"must be a list of {{name, port, protocol}}, not {kind(value)}")
    out: list[Port] = []
    for i, entry in enumerate(value):
        at = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(path, at, f"must be a mapping with name, port and protocol, not {kind(entry)}")
        check_keys(path, at, entry, PORT_KEYS)
        name = entry.get("name")
        if name is None:
            raise ConfigError(path, f"{at}.name", "is required")
        if not isinstance(name, str) or len(name) > MAX_PORT_NAME or not is_ac_name(name):
            raise ConfigError(
                path,
                f"{at}.name",
                f"must be an AC Name of at most {MAX_PORT_NAME} characters: lowercase words joined by -",
            )
        number = entry.get("port")
        if number is None:
            raise ConfigError(path, f"{at}.port", "is required")
        if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
            raise ConfigError(path, f"{at}.port", f"must be a port number from 1 to 65535, got {number!r}")
        protocol = entry.get("protocol", PortProtocol.TCP.value)
        allowed = ", ".join(p.value for p in PortProtocol)
        if not isinstance(protocol, str) or protocol not in {p.value for p in PortProtocol}:
            raise ConfigError(path, f"{at}.protocol", f"must be one of {allowed}, got {protocol!r}")
        out.append(Port(name=name, port=number, protocol=PortProtocol(protocol)))
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
        raise ConfigError(path, "files", f"must be a mapping, not {kind(value)}")
    out = []
    for name in sorted(value, key=str):
        key = f"files.{name}"
        if not isinstance(name, str):
            raise ConfigError(path, key, "file names must be strings")
        _relative_path(path, key, name)
        if name.startswith("-"):
            # The image builder hands it to cp and mkdir, which would take it for an option.
            raise ConfigError(path, key, f"{name!r} must not start with '-'")
        builder_owned = name in _RESERVED or name in _RESERVED_ABOVE or name.startswith(_RESERVED_BELOW)
        if builder_owned or name in (host + sfx for sfx in RESERVED_TOP_SUFFIXES):
            raise ConfigError(path, key, "is reserved for the image builder")
        content = value[name]
        if not isinstance(content, str):
            raise ConfigError(path, key, f"content must be a string, not {kind(content)}")
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


def eval_key(host: Host, recipe: str, packages: Mapping[str, str]) -> str | None:
    """What a host's image derivation is a function of: its normalised definition,
    ``recipe`` (the digest of the Nix library, the toolchain and Nix) and what each
    package it uses gives an image (``packages``: name -> id, from Nix). Nothing else
    in the repository reaches it, so nothing else is in the key. Equal keys, equal
    derivations. None when a package is missing from ``packages`` (it did not
    evaluate): such a host is evaluated every time, and never cached."""
    used = tuple((p, packages.get(p)) for p in host.packages if p not in BUILTIN_PACKAGES)
    if any(i is None for _, i in used):
        return None
    # The canonical JSON of [to_nix, used], whose list is its members' JSON joined.
    data = f"[{host.nix_json},{_packages_json(used)}]"
    return hashlib.sha256(f"{recipe}\n{data}".encode()).hexdigest()


@functools.lru_cache(maxsize=4096)
def _packages_json(used: tuple[tuple[str, str | None], ...]) -> str:
    """Canonical JSON of the packages a host uses, by id: a fleet has few sets of them
    (host.packages is sorted, so the pairs are in key order)."""
    return json.dumps(dict(used), sort_keys=True, separators=(",", ":"))


def package_names(hosts: Iterable[Host]) -> tuple[str, ...]:
    """The packages of ``hosts`` that Nix evaluates (busybox is the toolchain's)."""
    return tuple(sorted({p for h in hosts for p in h.packages if p not in BUILTIN_PACKAGES}))

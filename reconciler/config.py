"""The daemon's configuration file (reconciler.yaml).

Relative paths in the file are taken relative to the file's own directory, so a
config directory can be moved as a whole.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from reconciler.core.builders import Builder, valid_uri
from reconciler.core.schema import check_keys, parse_duration, parse_seconds, parse_size, parse_yaml
from reconciler.core.tufroles import Lifetimes
from reconciler.errors import ConfigError


@dataclass(frozen=True)
class RepoConfig:
    url: str
    branch: str = "main"
    depth: int | None = None  # shallow fetches of this many commits
    credentials_file: Path | None = None  # https: git-credential-store lines
    ssh_key: Path | None = None  # ssh: private key
    known_hosts: Path | None = None  # ssh: the only host keys accepted
    # Commit signature verification: only a head commit with a good signature by one
    # of these fingerprints (from these key files) is built.
    trusted_keys: tuple[Path, ...] = ()
    trusted_fingerprints: frozenset[str] = frozenset()
    # A new head that does not descend from the last reconciled commit is built only
    # when this is set (reconciler.gate).
    allow_force_push: bool = False

    @property
    def is_local(self) -> bool:
        return self.url.startswith("/")


@dataclass(frozen=True)
class TriggerConfig:
    """What wakes the daemon before its poll interval, and how bursts are merged."""

    webhook_secret_file: Path | None = None  # HMAC secret (GitHub, Gitea) or token (GitLab)
    watch: bool = True  # filesystem events, for a repository on local disk
    debounce: float = 0.2  # quiet time that ends a burst


@dataclass(frozen=True)
class StoreConfig:
    """``type`` filesystem uses ``path``; ``type`` s3 uses the other fields."""

    type: str
    path: Path | None = None
    bucket: str | None = None
    prefix: str = ""
    endpoint: str | None = None
    region: str = "us-east-1"
    credentials_file: Path | None = None


@dataclass(frozen=True)
class SigningConfig:
    gnupghome: Path
    key: str
    passphrase_file: Path | None = None


@dataclass(frozen=True)
class NixConfig:
    toolchain: str = "debian"
    # Staging directory of the imported Debian toolchain; shared between configs on
    # one machine because it is content-addressed once imported.
    toolchain_dir: Path | None = None
    # Builds run in Nix's sandbox. False is the explicit opt-out: the daemon then
    # starts against a Nix that builds unsandboxed, and says so in status and metrics.
    sandbox: bool = True
    # A build (one nix-store --realise) is stopped after this long.
    build_timeout: timedelta = timedelta(hours=1)
    # Evaluating the fleet (or one host) is stopped after this long.
    eval_timeout: timedelta = timedelta(minutes=5)
    # A host whose build closure (everything it produced and used) is larger fails.
    max_output_size: int = 4 << 30
    # Whether this machine builds too; false hands every build to the builders
    # (--max-jobs 0), which then fails when none of them can take it.
    local_builds: bool = True
    # Concurrent nix-instantiate processes, each over a shard of the hosts; "auto": one
    # per core this process may run on.
    eval_workers: int | Literal["auto"] = 1
    # Address space of each evaluation process: a host that allocates past it fails
    # alone, instead of the machine running out of memory.
    eval_memory: int = 4 << 30


@dataclass(frozen=True)
class RetryConfig:
    """Backoff of failed host builds: ``initial`` after the first failure, doubling up to ``max``."""

    initial: timedelta = timedelta(seconds=30)
    max: timedelta = timedelta(hours=1)


@dataclass(frozen=True)
class RetentionConfig:
    """How many releases per host garbage collection keeps."""

    keep: int = 10
    # The daemon collects after a pass at most this often (seconds); 0: only `reconciler gc`.
    interval: float = 3600.0


@dataclass(frozen=True)
class TufConfig:
    """The store's TUF metadata (reconciler.core.tufrepo)."""

    lifetimes: Lifetimes = field(default_factory=Lifetimes)
    # 2**bit_length hash bins: 256 keep an agent's poll under 20 KiB at 10,000 hosts.
    bit_length: int = 8


@dataclass(frozen=True)
class TransparencyLogConfig:
    """The store's transparency log of releases (reconciler.daemon.tlog)."""

    # The log's name in its checkpoints; None: reconciler/<the signing key's fingerprint>.
    origin: str | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    repo: RepoConfig
    store: StoreConfig
    state_dir: Path
    signing: SigningConfig
    nix: NixConfig
    listen: str = "127.0.0.1:9180"
    poll_interval: float = 30.0
    jobs: int = 2
    release_lifetime: timedelta = timedelta(days=30)
    retry: RetryConfig = RetryConfig()
    triggers: TriggerConfig = TriggerConfig()
    retention: RetentionConfig = RetentionConfig()
    tuf: TufConfig = TufConfig()
    # Nix remote builders (reconciler.core.builders), scheduled by Nix.
    builders: tuple[Builder, ...] = ()
    transparency_log: TransparencyLogConfig = TransparencyLogConfig()


TOP_KEYS = frozenset(
    {
        "repo",
        "store",
        "state_dir",
        "signing",
        "nix",
        "listen",
        "poll_interval",
        "jobs",
        "release_lifetime",
        "retry",
        "retention",
        "triggers",
        "tuf",
        "builders",
        "transparency_log",
    }
)
BUILDER_KEYS = frozenset(
    {"name", "uri", "systems", "ssh_key", "host_key", "max_jobs", "speed_factor", "features"}
)
# A word without whitespace: Nix's machines file and NIX_SSHOPTS split on whitespace.
_WORD = re.compile(r"[^\s,]+")
# The store section's keys depend on its type.
STORE_KEYS = {
    "filesystem": frozenset({"type", "path"}),
    "s3": frozenset({"type", "bucket", "prefix", "endpoint", "region", "credentials_file"}),
}
MIN_EVAL_MEMORY = 256 << 20
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SECTION_KEYS = {
    "repo": frozenset(
        {
            "url",
            "branch",
            "depth",
            "credentials_file",
            "ssh_key",
            "known_hosts",
            "verify_commits",
            "allow_force_push",
        }
    ),
    "triggers": frozenset({"webhook_secret_file", "watch", "debounce"}),
    "store": frozenset().union(*STORE_KEYS.values()),  # checked per type in load_config
    "signing": frozenset({"gnupghome", "key", "passphrase_file"}),
    "nix": frozenset(
        {
            "toolchain",
            "toolchain_dir",
            "sandbox",
            "build_timeout",
            "eval_timeout",
            "max_output_size",
            "local_builds",
            "eval_workers",
            "eval_memory",
        }
    ),
    "retry": frozenset({"initial", "max"}),
    "retention": frozenset({"keep", "interval"}),
    "tuf": frozenset(
        {"bins", "root_lifetime", "targets_lifetime", "snapshot_lifetime", "timestamp_lifetime"}
    ),
    "transparency_log": frozenset({"origin"}),
}
# A checkpoint's first line and the publisher's key name (c2sp.org/tlog-checkpoint).
ORIGIN_RE = re.compile(r"^[!-*,-~]{1,255}$")


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; errors name the file, and the line and column."""
    p = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(p, "", f"cannot read: {exc.strerror or exc}") from None
    return parse_yaml(p, text)


def load_config(path: Path) -> Config:
    """Read and validate a reconciler.yaml; errors name the file and key."""
    p = str(path)
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(p, "", "must be a mapping")
    check_keys(p, "", data, TOP_KEYS)
    base = path.resolve().parent

    def section(key: str, required: bool = True, check: bool = True) -> dict[str, Any]:
        v = data.get(key)
        if v is None and not required:
            return {}
        if not isinstance(v, dict):
            raise ConfigError(p, key, "must be a mapping" if v is not None else "is required")
        if check:
            check_keys(p, key, v, SECTION_KEYS[key])
        return v

    def string(sec: dict[str, Any], key: str, dotted: str, default: str | None = None) -> str:
        v = sec.get(key, default)
        if not isinstance(v, str) or not v:
            raise ConfigError(p, dotted, "must be a non-empty string" if key in sec else "is required")
        return v

    def optional_path(sec: dict[str, Any], dotted: str) -> Path | None:
        key = dotted.rsplit(".", 1)[1]
        if sec.get(key) is None:
            return None
        return path_of(string(sec, key, dotted))

    def path_of(s: str) -> Path:
        q = Path(s).expanduser()
        return q if q.is_absolute() else base / q

    repo = section("repo")
    url = string(repo, "url", "repo.url")
    # A local path stays a path; anything with a scheme or scp-like host is a remote.
    if "://" not in url and not re.match(r"^[\w.-]+@[\w.-]+:", url):
        url = str(path_of(url))
    depth = repo.get("depth")
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
        raise ConfigError(p, "repo.depth", "must be a positive number of commits")
    trusted_keys: tuple[Path, ...] = ()
    trusted_fingerprints: frozenset[str] = frozenset()
    vc = repo.get("verify_commits")
    if vc is not None:
        if not isinstance(vc, dict) or set(vc) - {"keys", "fingerprints"}:
            raise ConfigError(p, "repo.verify_commits", "must be a mapping with keys and fingerprints")
        keys, fprs = vc.get("keys"), vc.get("fingerprints")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(p, "repo.verify_commits.keys", "must list public key files")
        if not isinstance(fprs, list) or not fprs or not all(isinstance(f, str) for f in fprs):
            raise ConfigError(p, "repo.verify_commits.fingerprints", "must list trusted key fingerprints")
        cleaned = [f.replace(" ", "").upper() for f in fprs]
        if not all(re.fullmatch(r"[0-9A-F]{40}([0-9A-F]{24})?", f) for f in cleaned):
            raise ConfigError(p, "repo.verify_commits.fingerprints", "must be full 40-hex-digit fingerprints")
        trusted_keys = tuple(path_of(k) for k in keys)
        trusted_fingerprints = frozenset(cleaned)
    allow_force_push = repo.get("allow_force_push", False)
    if not isinstance(allow_force_push, bool):
        raise ConfigError(p, "repo.allow_force_push", "must be true or false")
    triggers = section("triggers", required=False)
    watch = triggers.get("watch", True)
    if not isinstance(watch, bool):
        raise ConfigError(p, "triggers.watch", "must be true or false")
    store = section("store", check=False)
    store_type = string(store, "type", "store.type", "filesystem")
    if store_type not in STORE_KEYS:
        supported = ", ".join(sorted(STORE_KEYS))
        raise ConfigError(p, "store.type", f"unsupported store type {store_type!r} (supported: {supported})")
    check_keys(p, "store", store, STORE_KEYS[store_type])
    if store_type == "filesystem":
        store_config = StoreConfig(type=store_type, path=path_of(string(store, "path", "store.path")))
    else:
        bucket = string(store, "bucket", "store.bucket")
        if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(
                p, "store.bucket", "must be a bucket name: 3 to 63 lowercase letters, digits, '.' and '-'"
            )
        prefix = store.get("prefix", "")
        parts = prefix.strip("/").split("/") if isinstance(prefix, str) and prefix.strip("/") else []
        if not isinstance(prefix, str) or any(part in ("", ".", "..") for part in parts):
            raise ConfigError(p, "store.prefix", "must be a key prefix like fleet/prod")
        endpoint = store.get("endpoint")
        if endpoint is not None:
            parsed = urllib.parse.urlsplit(endpoint) if isinstance(endpoint, str) else None
            if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ConfigError(p, "store.endpoint", "must be an http:// or https:// URL")
            try:
                _ = parsed.port  # raises on a bad port
            except ValueError:
                raise ConfigError(p, "store.endpoint", "must be an http:// or https:// URL") from None
        cred = store.get("credentials_file")
        if cred is not None and (not isinstance(cred, str) or not cred):
            raise ConfigError(p, "store.credentials_file", "must be a path")
        store_config = StoreConfig(
            type=store_type,
            bucket=bucket,
            prefix=prefix.strip("/"),
            endpoint=endpoint,
            region=string(store, "region", "store.region", "us-east-1"),
            credentials_file=path_of(cred) if cred else None,
        )
    signing = section("signing")
    pf = signing.get("passphrase_file")
    if pf is not None and (not isinstance(pf, str) or not pf):
        raise ConfigError(p, "signing.passphrase_file", "must be a path")
    nix = section("nix", required=False)
    toolchain = string(nix, "toolchain", "nix.toolchain", "debian")
    if toolchain not in ("debian", "nixpkgs"):
        raise ConfigError(p, "nix.toolchain", "must be 'debian' or 'nixpkgs'")
    tdir = nix.get("toolchain_dir")
    if tdir is not None and not isinstance(tdir, str):
        raise ConfigError(p, "nix.toolchain_dir", "must be a path")
    sandbox = nix.get("sandbox", True)
    if not isinstance(sandbox, bool):
        raise ConfigError(p, "nix.sandbox", "must be true or false")
    local_builds = nix.get("local_builds", True)
    if not isinstance(local_builds, bool):
        raise ConfigError(p, "nix.local_builds", "must be true or false")
    builders = _builders(p, data.get("builders"), path_of)
    if not local_builds and not builders:
        raise ConfigError(p, "nix.local_builds", "false needs at least one entry in builders")
    for where in (str(base), str(path_of(string(data, "state_dir", "state_dir")))):
        if builders and not _WORD.fullmatch(where):
            raise ConfigError(p, "builders", f"{where}: Nix's ssh options cannot hold a path with whitespace")
    eval_workers = nix.get("eval_workers", 1)
    if eval_workers != "auto" and (
        not isinstance(eval_workers, int) or isinstance(eval_workers, bool) or not 1 <= eval_workers <= 64
    ):
        raise ConfigError(p, "nix.eval_workers", "must be an integer from 1 to 64, or auto")
    eval_memory = parse_size(p, "nix.eval_memory", nix.get("eval_memory", "4G"))
    # Below this nix-instantiate cannot map its own code and first heap.
    if eval_memory < MIN_EVAL_MEMORY:
        raise ConfigError(p, "nix.eval_memory", "must be at least 256M")

    retry = section("retry", required=False)
    listen = data.get("listen", "127.0.0.1:9180")
    m = re.fullmatch(r"[\w.\-\[\]:]+:(\d{1,5})", listen) if isinstance(listen, str) else None
    if not m or int(m.group(1)) > 65535:
        raise ConfigError(p, "listen", "must be HOST:PORT")
    poll = data.get("poll_interval", 30)
    if not isinstance(poll, (int, float)) or isinstance(poll, bool) or not (poll > 0 and math.isfinite(poll)):
        raise ConfigError(p, "poll_interval", "must be a positive number of seconds")
    jobs = data.get("jobs", 2)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= 64:
        raise ConfigError(p, "jobs", "must be an integer from 1 to 64")
    retention = section("retention", required=False)
    keep = retention.get("keep", 10)
    gc_every = retention.get("interval", "1h")
    retention_interval = 0.0 if gc_every in (0, "0") else parse_seconds(p, "retention.interval", gc_every)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ConfigError(p, "retention.keep", "must be an integer >= 1")
    return Config(
        path=path.resolve(),
        repo=RepoConfig(
            url=url,
            branch=string(repo, "branch", "repo.branch", "main"),
            depth=depth,
            credentials_file=optional_path(repo, "repo.credentials_file"),
            ssh_key=optional_path(repo, "repo.ssh_key"),
            known_hosts=optional_path(repo, "repo.known_hosts"),
            trusted_keys=trusted_keys,
            trusted_fingerprints=trusted_fingerprints,
            allow_force_push=allow_force_push,
        ),
        triggers=TriggerConfig(
            webhook_secret_file=optional_path(triggers, "triggers.webhook_secret_file"),
            watch=watch,
            debounce=parse_seconds(p, "triggers.debounce", triggers.get("debounce", 0.2)),
        ),
        store=store_config,
        state_dir=path_of(string(data, "state_dir", "state_dir")),
        signing=SigningConfig(
            gnupghome=path_of(string(signing, "gnupghome", "signing.gnupghome")),
            key=string(signing, "key", "signing.key"),
            passphrase_file=path_of(pf) if isinstance(pf, str) else None,
        ),
        nix=NixConfig(
            toolchain=toolchain,
            toolchain_dir=path_of(tdir) if tdir else None,
            sandbox=sandbox,
            build_timeout=parse_duration(p, "nix.build_timeout", nix.get("build_timeout", "1h")),
            eval_timeout=parse_duration(p, "nix.eval_timeout", nix.get("eval_timeout", "5m")),
            max_output_size=parse_size(p, "nix.max_output_size", nix.get("max_output_size", "4G")),
            local_builds=local_builds,
            eval_workers=eval_workers,
            eval_memory=eval_memory,
        ),
        builders=builders,
        listen=listen,
        poll_interval=float(poll),
        jobs=jobs,
        release_lifetime=parse_duration(p, "release_lifetime", data.get("release_lifetime", "30d")),
        retry=RetryConfig(
            initial=parse_duration(p, "retry.initial", retry.get("initial", "30s")),
            max=parse_duration(p, "retry.max", retry.get("max", "1h")),
        ),
        retention=RetentionConfig(keep=keep, interval=retention_interval),
        tuf=_tuf_config(p, section("tuf", required=False)),
        transparency_log=_log_config(p, section("transparency_log", required=False)),
    )


def _log_config(p: str, sec: dict[str, Any]) -> TransparencyLogConfig:
    origin = sec.get("origin")
    if origin is not None and (not isinstance(origin, str) or not ORIGIN_RE.fullmatch(origin)):
        why = "must be printable ASCII without spaces or '+', like fleet.example/log"
        raise ConfigError(p, "transparency_log.origin", why)
    return TransparencyLogConfig(origin=origin)


def _builders(p: str, entries: Any, path_of: Callable[[str], Path]) -> tuple[Builder, ...]:
    """The ``builders:`` list: Nix machines entries, each with the one host key accepted."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ConfigError(p, "builders", "must be a list of builders")
    out: list[Builder] = []
    for i, entry in enumerate(entries):
        at = f"builders[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(p, at, "must be a mapping")
        check_keys(p, at, entry, BUILDER_KEYS)

        def word(key: str, required: bool = True, e: dict[str, Any] = entry, at: str = at) -> str | None:
            v = e.get(key)
            if v is None and not required:
                return None
            if not isinstance(v, str) or not _WORD.fullmatch(v):
                why = "is required" if v is None else "must be one word (no whitespace or commas)"
                raise ConfigError(p, f"{at}.{key}", why)
            return v

        def words(key: str, default: list[str], e: dict[str, Any] = entry, at: str = at) -> tuple[str, ...]:
            v = e.get(key, default)
            if not isinstance(v, list) or not all(isinstance(w, str) and _WORD.fullmatch(w) for w in v):
                raise ConfigError(p, f"{at}.{key}", "must be a list of words (no whitespace or commas)")
            return tuple(v)

        def count(key: str, e: dict[str, Any] = entry, at: str = at) -> int:
            v = e.get(key, 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(p, f"{at}.{key}", "must be an integer >= 1")
            return v

        uri = word("uri")
        assert uri is not None
        if not valid_uri(uri):
            raise ConfigError(p, f"{at}.uri", "must be ssh-ng://[USER@]HOST[:PORT][?remote-store=...]")
        key = word("ssh_key")
        assert key is not None
        host_key = entry.get("host_key")
        parts = host_key.split() if isinstance(host_key, str) else []
        # A known_hosts line ("HOST TYPE KEY") or the .pub file's ("TYPE KEY [COMMENT]").
        if len(parts) >= 3 and not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
            parts = parts[1:]
        if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
            raise ConfigError(
                p, f"{at}.host_key", "must be the builder's public host key (its ssh_host_*_key.pub line)"
            )
        systems = words("systems", ["x86_64-linux"])
        if not systems:
            raise ConfigError(p, f"{at}.systems", "must name at least one system")
        out.append(
            Builder(
                name=word("name", required=False) or uri,
                uri=uri,
                ssh_key=str(path_of(key)),
                host_key=" ".join(parts[:2]),
                systems=systems,
                max_jobs=count("max_jobs"),
                speed_factor=count("speed_factor"),
                features=words("features", []),
            )
        )
    identities: tuple[tuple[str, list[str]], ...] = (
        ("name", [b.name for b in out]),
        ("URI", [b.nix_uri for b in out]),
    )
    for what, names in identities:
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ConfigError(p, "builders", f"two builders have the {what} {dup!r}")
    ports: dict[str, int | None] = {}
    for b in out:
        if ports.setdefault(b.host, b.port) != b.port:
            raise ConfigError(p, "builders", f"builders on host {b.host} must share one ssh port")
    return tuple(out)


def _tuf_config(p: str, sec: dict[str, Any]) -> TufConfig:
    bins = sec.get("bins", 256)
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2 or bins > 65536 or bins & (bins - 1):
        raise ConfigError(p, "tuf.bins", "must be a power of two from 2 to 65536")
    default = Lifetimes()

    def lifetime(key: str, fallback: timedelta) -> timedelta:
        value = parse_duration(p, f"tuf.{key}", sec.get(key, f"{int(fallback.total_seconds())}s"))
        if value < timedelta(minutes=2):
            raise ConfigError(p, f"tuf.{key}", "must be at least 2m (it is re-signed at half of it)")
        return value

    lifetimes = Lifetimes(
        root=lifetime("root_lifetime", default.root),
        targets=lifetime("targets_lifetime", default.targets),
        snapshot=lifetime("snapshot_lifetime", default.snapshot),
        timestamp=lifetime("timestamp_lifetime", default.timestamp),
    )
    return TufConfig(lifetimes=lifetimes, bit_length=bins.bit_length() - 1)

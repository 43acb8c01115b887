"""The daemon's configuration file (reconciler.yaml).

Relative paths in the file are taken relative to the file's own directory, so a
config directory can be moved as a whole.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from reconciler.core.appc import DEFAULT_NAME_PREFIX, default_store_url, is_ac_identifier
from reconciler.core.builders import Builder, valid_uri
from reconciler.core.events import Retention
from reconciler.core.notify import Backoff, Notice, Provider, Route
from reconciler.core.schema import check_keys, parse_duration, parse_seconds, parse_size, parse_yaml
from reconciler.core.tufroles import Lifetimes
from reconciler.core.urls import without_credentials
from reconciler.errors import ConfigError

# repo.network_timeout's default (reconciler.adapters.git's too).
GIT_NETWORK_TIMEOUT = timedelta(minutes=15)


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
    # A clone, fetch, deepening of a shallow history or ls-remote still running after
    # this long is stopped, and the remote taken for gone (other git commands: 5 min).
    network_timeout: timedelta = GIT_NETWORK_TIMEOUT

    @property
    def is_local(self) -> bool:
        return self.url.startswith("/")

    @property
    def shown_url(self) -> str:
        """The URL as logs, errors, status and provenance give it: without a credential
        written into it (core.urls)."""
        return without_credentials(self.url)


@dataclass(frozen=True)
class TriggerConfig:
    """What wakes the daemon before its poll interval, and how bursts are merged."""

    webhook_secret_file: Path | None = None  # HMAC secret (GitHub, Gitea) or token (GitLab)
    # Bearer token of POST /reconcile (`reconciler reconcile-now`): a pass at once.
    reconcile_token_file: Path | None = None
    watch: bool = True  # filesystem events, for a repository on local disk
    debounce: float = 0.2  # quiet time that ends a burst


@dataclass(frozen=True)
class WebConfig:
    """Who may read the fleet page and the JSON APIs on ``listen`` (reconciler.daemon.web):
    with neither file, anyone who reaches a loopback address, and nobody on any other."""

    token_file: Path | None = None  # one token: Authorization: Bearer <token>
    # htpasswd lines with bcrypt hashes (htpasswd -B): Authorization: Basic
    basic_auth_file: Path | None = None


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
    # Where agents and people reach the store (http or https), without a trailing
    # slash; named in AppImages' update information. None: no update information.
    public_url: str | None = None


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
    # A running build logs how long it has run (event host_building) this often, in
    # seconds: a long build is not silent.
    heartbeat: float = 30.0


@dataclass(frozen=True)
class ReproducibilityConfig:
    """The reproducibility gate: with ``check``, every derivation of a host's image is
    built a second time (Nix's --check, on this machine) before anything is signed, and
    a host whose second build differs is refused and publishes nothing."""

    check: bool = False
    # diffoscope (when installed) gets this long to describe two builds that differ;
    # past it, or without it, the summary lists the differing files by size and sha256.
    diff_timeout: float = 60.0


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
class LeaseConfig:
    """The store's publisher lease (reconciler.core.lease): of daemons sharing a store,
    one publishes and the others stand by."""

    enabled: bool = True
    # A holder that has not renewed for this long is replaced (seconds).
    duration: float = 60.0
    # How often the holder renews, and a standby looks (seconds); default duration / 3.
    renew: float = 20.0


@dataclass(frozen=True)
class TufConfig:
    """The store's TUF metadata (reconciler.core.tufrepo)."""

    lifetimes: Lifetimes = field(default_factory=Lifetimes)
    # 2**bit_length hash bins: 256 keep an agent's poll under 20 KiB at 10,000 hosts.
    bit_length: int = 8


@dataclass(frozen=True)
class ImagesConfig:
    """What the images say about themselves: ACI names and annotations, and where the
    store is served for appc discovery (reconciler.core.appc)."""

    # ACI names are <name_prefix>/<host>; discovery copies live under it in the store.
    name_prefix: str = DEFAULT_NAME_PREFIX
    # The store's public base URL, which the discovery page's templates point into.
    store_url: str = default_store_url(DEFAULT_NAME_PREFIX)
    # ACI manifest annotations (appc: authors, homepage, documentation, or any AC Identifier).
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NotificationConfig:
    """One notification target (reconciler.core.notify): where, what it is told, and
    how hard delivery tries. The URL, token and secret are read from their files by
    the daemon; none of them is ever logged (a target is named by ``name``)."""

    name: str
    route: Route
    url: str | None = field(default=None, repr=False)
    url_file: Path | None = None  # a file holding the URL (a Slack webhook URL is a secret)
    token_file: Path | None = None  # commit statuses: the API token; webhook: a bearer token
    secret_file: Path | None = None  # webhook: HMAC-SHA256 key of the body's signature header
    timeout: float = 10.0  # one request, connecting to the whole answer
    backoff: Backoff = field(default_factory=Backoff)
    max_per_minute: int = 60
    queue: int = 1000  # messages waiting at most; past it the oldest is dropped


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
    lease: LeaseConfig = LeaseConfig()
    # Nix remote builders (reconciler.core.builders), scheduled by Nix.
    builders: tuple[Builder, ...] = ()
    images: ImagesConfig = ImagesConfig()
    # How much of the event history the state database keeps.
    events: Retention = field(default_factory=Retention)
    notifications: tuple[NotificationConfig, ...] = ()
    web: WebConfig = WebConfig()
    transparency_log: TransparencyLogConfig = TransparencyLogConfig()
    reproducibility: ReproducibilityConfig = ReproducibilityConfig()


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
        "images",
        "events",
        "notifications",
        "lease",
        "web",
        "transparency_log",
        "reproducibility",
    }
)
BUILDER_KEYS = frozenset(
    {"name", "uri", "systems", "ssh_key", "host_key", "max_jobs", "speed_factor", "features"}
)
# A word without whitespace: Nix's machines file and NIX_SSHOPTS split on whitespace.
_WORD = re.compile(r"[^\s,]+")
# The store section's keys depend on its type.
STORE_KEYS = {
    "filesystem": frozenset({"type", "path", "public_url"}),
    "s3": frozenset({"type", "bucket", "prefix", "endpoint", "region", "credentials_file", "public_url"}),
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
            "network_timeout",
        }
    ),
    "triggers": frozenset({"webhook_secret_file", "reconcile_token_file", "watch", "debounce"}),
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
            "heartbeat",
        }
    ),
    "retry": frozenset({"initial", "max"}),
    "images": frozenset({"name_prefix", "annotations"}),
    "retention": frozenset({"keep", "interval"}),
    "events": frozenset({"keep", "max_age"}),
    "lease": frozenset({"enabled", "duration", "renew"}),
    "web": frozenset({"token_file", "basic_auth_file"}),
    "reproducibility": frozenset({"check", "diff_timeout"}),
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
    public_url = store.get("public_url")
    if public_url is not None:
        public_url = _public_url(p, public_url)
    if store_type == "filesystem":
        store_config = StoreConfig(
            type=store_type, path=path_of(string(store, "path", "store.path")), public_url=public_url
        )
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
            public_url=public_url,
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
    web = section("web", required=False)
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
            network_timeout=(
                GIT_NETWORK_TIMEOUT
                if repo.get("network_timeout") is None
                else parse_duration(p, "repo.network_timeout", repo["network_timeout"])
            ),
        ),
        triggers=TriggerConfig(
            webhook_secret_file=optional_path(triggers, "triggers.webhook_secret_file"),
            reconcile_token_file=optional_path(triggers, "triggers.reconcile_token_file"),
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
            heartbeat=parse_seconds(p, "nix.heartbeat", nix.get("heartbeat", "30s")),
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
        images=_images_config(p, section("images", required=False), store_config.public_url),
        events=_events_config(p, section("events", required=False)),
        notifications=_notifications(p, data.get("notifications"), path_of),
        lease=_lease_config(p, section("lease", required=False)),
        web=WebConfig(
            token_file=optional_path(web, "web.token_file"),
            basic_auth_file=optional_path(web, "web.basic_auth_file"),
        ),
        transparency_log=_log_config(p, section("transparency_log", required=False)),
        reproducibility=_reproducibility_config(p, section("reproducibility", required=False)),
    )


# What a reload (SIGHUP) changes in a running daemon, from its next pass on; a change of
# anything else (where it listens, its state, store, key, repository, Nix, builders, TUF
# settings, watching, whether the lease is used at all) is reported as needing a restart
# and the old value stays. The lease's timings apply live: each renewal writes the
# duration it holds the lease for, and a standby reads the holder's from its record.
RELOADABLE = frozenset(
    {
        "poll_interval",
        "jobs",
        "release_lifetime",
        "retry",
        "retention",
        "notifications",
        "triggers.webhook_secret_file",
        "triggers.reconcile_token_file",
        "triggers.debounce",
        "lease.duration",
        "lease.renew",
    }
)
# The sections a reload takes key by key (the rest are taken or left whole).
_RELOADED_BY_KEY = frozenset({"triggers", "lease"})


def reload(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """What a running daemon with ``old`` takes of ``new``: the config to run with, the
    dotted keys that changed and are applied, and those that changed but need a restart."""
    applied: list[str] = []
    restart: list[str] = []
    merged = old
    for f in fields(Config):
        if f.name == "path":
            continue
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        if f.name in _RELOADED_BY_KEY:
            kept = before
            for sub in fields(before):
                key = f"{f.name}.{sub.name}"
                if getattr(before, sub.name) == getattr(after, sub.name):
                    continue
                if key in RELOADABLE:
                    kept = replace(kept, **{sub.name: getattr(after, sub.name)})
                    applied.append(key)
                else:
                    restart.append(key)
            merged = replace(merged, **{f.name: kept})
        elif f.name in RELOADABLE:
            merged = replace(merged, **{f.name: after})
            applied.append(f.name)
        else:
            restart.append(f.name)
    return merged, applied, restart


def _mappings(
    p: str, key: str, entries: Any, allowed: frozenset[str], not_a_list: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """A list setting of mappings (absent: none): each entry with where it is
    (``key[i]``), its keys checked against ``allowed``."""
    if entries is None:
        return
    if not isinstance(entries, list):
        raise ConfigError(p, key, not_a_list)
    for i, entry in enumerate(entries):
        at = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(p, at, "must be a mapping")
        check_keys(p, at, entry, allowed)
        yield at, entry


def _log_config(p: str, sec: dict[str, Any]) -> TransparencyLogConfig:
    origin = sec.get("origin")
    if origin is not None and (not isinstance(origin, str) or not ORIGIN_RE.fullmatch(origin)):
        why = "must be printable ASCII without spaces or '+', like fleet.example/log"
        raise ConfigError(p, "transparency_log.origin", why)
    return TransparencyLogConfig(origin=origin)


def _builders(p: str, entries: Any, path_of: Callable[[str], Path]) -> tuple[Builder, ...]:
    """The ``builders:`` list: Nix machines entries, each with the one host key accepted."""
    out: list[Builder] = []
    for at, entry in _mappings(p, "builders", entries, BUILDER_KEYS, "must be a list of builders"):

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


# Bounds of lease.duration: under a second a renewal cannot be counted on; a day is
# longer than anyone waits for a takeover.
MIN_LEASE = 1.0
MAX_LEASE = 86400.0


def _lease_config(p: str, sec: dict[str, Any]) -> LeaseConfig:
    enabled = sec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(p, "lease.enabled", "must be true or false")
    duration = parse_seconds(p, "lease.duration", sec.get("duration", "60s"))
    if not MIN_LEASE <= duration <= MAX_LEASE:
        raise ConfigError(p, "lease.duration", "must be from 1s to 1d")
    renew = parse_seconds(p, "lease.renew", sec["renew"]) if "renew" in sec else duration / 3
    # Two attempts within a duration: one renewal that fails does not lose the lease.
    if renew > duration / 2:
        raise ConfigError(p, "lease.renew", f"must be at most half of lease.duration ({duration / 2:g}s)")
    return LeaseConfig(enabled=enabled, duration=duration, renew=renew)


def _reproducibility_config(p: str, sec: dict[str, Any]) -> ReproducibilityConfig:
    check = sec.get("check", False)
    if not isinstance(check, bool):
        raise ConfigError(p, "reproducibility.check", "must be true or false")
    diff_timeout = parse_seconds(p, "reproducibility.diff_timeout", sec.get("diff_timeout", "60s"))
    return ReproducibilityConfig(check=check, diff_timeout=diff_timeout)


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


# Top-level folders of the store's own layout (reconciler.core.layout): a name prefix
# whose domain were one of them would mix discovery copies into them.
_LAYOUT_FOLDERS = frozenset({"blobs", "hosts", "keys", "lease", "tuf"})
# appc's well-known annotations whose value is a URL (spec/aci.md); "created" is a
# date, which would make the same commit build different bytes at another time.
_URL_ANNOTATIONS = frozenset({"homepage", "documentation"})


def _images_config(p: str, sec: dict[str, Any], public_url: str | None) -> ImagesConfig:
    prefix = sec.get("name_prefix", DEFAULT_NAME_PREFIX)
    if not isinstance(prefix, str) or not is_ac_identifier(prefix):
        why = "must be an AC Identifier: lowercase words joined by -._~/ (e.g. example.com/fleet)"
        raise ConfigError(p, "images.name_prefix", why)
    if prefix.split("/", 1)[0] in _LAYOUT_FOLDERS:
        why = f"must not start with a folder of the store ({', '.join(sorted(_LAYOUT_FOLDERS))})"
        raise ConfigError(p, "images.name_prefix", why)
    # Where discovery's templates point: the store's public URL, else a guess from
    # the prefix's domain (a page is no signed artifact, unlike update information).
    url = public_url if public_url is not None else default_store_url(prefix)
    annotations = sec.get("annotations", {})
    if not isinstance(annotations, dict):
        raise ConfigError(p, "images.annotations", "must be a mapping of AC Identifiers to strings")
    for name, value in annotations.items():
        key = f"images.annotations.{name}"
        if not isinstance(name, str) or not is_ac_identifier(name):
            why = "annotation names must be AC Identifiers (lowercase words joined by -._~/)"
            raise ConfigError(p, key, why)
        if name == "created":
            raise ConfigError(p, key, "is not allowed: a build date would make every build differ")
        if not isinstance(value, str) or not value:
            raise ConfigError(p, key, "must be a non-empty string")
        if name in _URL_ANNOTATIONS:
            _http_url(p, key, value)
    return ImagesConfig(
        name_prefix=prefix,
        store_url=url if url.endswith("/") else url + "/",
        annotations=tuple(sorted(annotations.items())),
    )


def _public_url(path: str, value: object) -> str:
    """``store.public_url``: an http(s) URL of printable ASCII without '|', as it goes
    into AppImages' update information (``zsync|<URL>``)."""
    rule = "must be the http:// or https:// URL the store is served at (printable ASCII, no '|')"
    if not isinstance(value, str):
        raise ConfigError(path, "store.public_url", rule)
    parsed = urllib.parse.urlsplit(value)
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.hostname
        or parsed.query
        or parsed.fragment
        or "|" in value
        or any(not 0x21 <= ord(c) <= 0x7E for c in value)
    ):
        raise ConfigError(path, "store.public_url", rule)
    try:
        _ = parsed.port
    except ValueError:
        raise ConfigError(path, "store.public_url", rule) from None
    return value.rstrip("/")


def _events_config(p: str, sec: dict[str, Any]) -> Retention:
    keep = sec.get("keep", Retention.keep)
    if not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= 10_000_000:
        raise ConfigError(p, "events.keep", "must be an integer from 1 to 10000000")
    max_age = parse_duration(p, "events.max_age", sec.get("max_age", "30d"))
    return Retention(keep=keep, max_age=max_age.total_seconds())


NOTIFICATION_KEYS = frozenset(
    {
        "name",
        "type",
        "url",
        "url_file",
        "on",
        "token_file",
        "secret_file",
        "repository",
        "context",
        "target_url",
        "timeout",
        "retry",
        "max_per_minute",
        "queue",
    }
)
# The API a commit status goes to when no url is given (Gitea has no public default).
DEFAULT_API = {Provider.GITHUB: "https://api.github.com", Provider.GITLAB: "https://gitlab.com/api/v4"}
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_CONTEXT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_GITHUB_REPO_RE = re.compile(rf"{_SEGMENT}/{_SEGMENT}")
_GITLAB_PROJECT_RE = re.compile(rf"[0-9]+|{_SEGMENT}(/{_SEGMENT})+")


def _http_url(p: str, key: str, v: Any) -> str:
    parsed = urllib.parse.urlsplit(v) if isinstance(v, str) else None
    try:
        ok = parsed is not None and parsed.scheme in ("http", "https") and bool(parsed.hostname)
        _ = parsed is not None and parsed.port  # raises on a bad port
    except ValueError:
        ok = False
    if not ok or any(c.isspace() for c in str(v)):
        raise ConfigError(p, key, "must be an http:// or https:// URL")
    return str(v)


def _notifications(p: str, entries: Any, path_of: Callable[[str], Path]) -> tuple[NotificationConfig, ...]:
    """The ``notifications:`` list (reconciler.core.notify)."""
    out: list[NotificationConfig] = []
    for at, entry in _mappings(p, "notifications", entries, NOTIFICATION_KEYS, "must be a list of targets"):
        try:
            provider = Provider(str(entry.get("type")))
        except ValueError:
            raise ConfigError(
                p, f"{at}.type", f"must be one of {', '.join(v.value for v in Provider)}"
            ) from None

        def text(key: str, e: dict[str, Any] = entry, at: str = at) -> str | None:
            v = e.get(key)
            if v is not None and (not isinstance(v, str) or not v):
                raise ConfigError(p, f"{at}.{key}", "must be a non-empty string")
            return v

        def file(key: str, e: dict[str, Any] = entry, at: str = at) -> Path | None:
            v = text(key, e, at)
            return None if v is None else path_of(v)

        def number(key: str, default: int, high: int, e: dict[str, Any] = entry, at: str = at) -> int:
            v = e.get(key, default)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= high:
                raise ConfigError(p, f"{at}.{key}", f"must be an integer from 1 to {high}")
            return v

        name = text("name") or f"{provider.value}-{len(out) + 1}"  # its place in the list
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(p, f"{at}.name", "must be lowercase letters, digits, '.', '_' and '-'")
        url, url_file = text("url"), file("url_file")
        if url is not None and url_file is not None:
            raise ConfigError(p, f"{at}.url", "give url or url_file, not both")
        if url is not None:
            url = _http_url(p, f"{at}.url", url)
        elif url_file is None:
            url = DEFAULT_API.get(provider)
            if url is None:
                raise ConfigError(p, f"{at}.url", "is required (or url_file)")
        on = entry.get("on", [n.value for n in Notice])
        if not isinstance(on, list) or not on:
            raise ConfigError(p, f"{at}.on", f"must list some of {', '.join(n.value for n in Notice)}")
        try:
            notices = frozenset(Notice(n) for n in on)
        except ValueError:
            raise ConfigError(
                p, f"{at}.on", f"must list some of {', '.join(n.value for n in Notice)}"
            ) from None
        token_file, secret_file = file("token_file"), file("secret_file")
        repository = text("repository")
        if provider.commit_status:
            if token_file is None:
                raise ConfigError(p, f"{at}.token_file", f"is required for a {provider.value} commit status")
            pattern = _GITLAB_PROJECT_RE if provider == Provider.GITLAB else _GITHUB_REPO_RE
            what = "a project id or path" if provider == Provider.GITLAB else "owner/name"
            if repository is None or not pattern.fullmatch(repository):
                raise ConfigError(p, f"{at}.repository", f"must be the repository as {what}")
        else:
            if repository is not None:
                raise ConfigError(p, f"{at}.repository", "is only for commit statuses")
            if provider == Provider.SLACK and token_file is not None:
                raise ConfigError(
                    p, f"{at}.token_file", "a Slack webhook's URL is its credential: use url_file"
                )
        if secret_file is not None and provider != Provider.WEBHOOK:
            raise ConfigError(p, f"{at}.secret_file", "is only for a webhook")
        context = text("context") or "reconciler"
        if not _CONTEXT_RE.fullmatch(context):
            raise ConfigError(p, f"{at}.context", "must be letters, digits, '.', '_', '-' and '/'")
        target_url = text("target_url")
        if target_url is not None:
            target_url = _http_url(p, f"{at}.target_url", target_url)
        timeout = parse_seconds(p, f"{at}.timeout", entry.get("timeout", 10))
        if timeout > 300:
            raise ConfigError(p, f"{at}.timeout", "must be at most 300 seconds")
        retry = entry.get("retry", {})
        if not isinstance(retry, dict):
            raise ConfigError(p, f"{at}.retry", "must be a mapping")
        check_keys(p, f"{at}.retry", retry, frozenset({"attempts", "initial", "max"}))
        backoff = Backoff(
            attempts=number("attempts", 5, 20, retry, f"{at}.retry"),
            initial=parse_seconds(p, f"{at}.retry.initial", retry.get("initial", 1)),
            max=parse_seconds(p, f"{at}.retry.max", retry.get("max", 60)),
        )
        out.append(
            NotificationConfig(
                name=name,
                route=Route(provider, notices, repository, context, target_url),
                url=url,
                url_file=url_file,
                token_file=token_file,
                secret_file=secret_file,
                timeout=timeout,
                backoff=backoff,
                max_per_minute=number("max_per_minute", 60, 10_000),
                queue=number("queue", 1000, 100_000),
            )
        )
    names = [n.name for n in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(p, "notifications", f"two targets are named {dup!r}")
    return tuple(out)

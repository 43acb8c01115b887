"""Unit tests for reconciler.config: reconciler.yaml loading and validation."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from reconciler import wiring
from reconciler.config import (
    Config,
    ImagesConfig,
    LeaseConfig,
    NixConfig,
    RepoConfig,
    RetentionConfig,
    RetryConfig,
    SigningConfig,
    StoreConfig,
    load_config,
    reload,
)
from reconciler.core.schema import parse_duration
from reconciler.errors import MAX_REASON, ConfigError

MINIMAL: dict[str, Any] = {
    "repo": {"url": "repo"},
    "store": {"path": "store"},
    "state_dir": "state",
    "signing": {"gnupghome": "gnupg", "key": "ABCDEF0123456789"},
}


def write_config(directory: Path, data: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "reconciler.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def config_error(tmp_path: Path, data: Any) -> ConfigError:
    path = write_config(tmp_path / "cfg", data)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.path == str(path)
    return exc.value


DELETE = object()
AC_PREFIX = "must be an AC Identifier: lowercase words joined by -._~/ (e.g. example.com/fleet)"
LAYOUT = "must not start with a folder of the store (blobs, hosts, keys, lease, tuf)"
ANNOTATION = "annotation names must be AC Identifiers (lowercase words joined by -._~/)"
HTTP_URL = "must be an http:// or https:// URL"


def merged(**changes: Any) -> dict[str, Any]:
    """MINIMAL with top-level keys replaced; a dotted key changes one key of a section."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in MINIMAL.items()}
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        target: dict[str, Any] = data
        if sub:
            target = data.setdefault(section, {})
            key = sub
        if value is DELETE:
            target.pop(key, None)
        else:
            target[key] = value
    return data


def test_defaults_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_dir = tmp_path / "etc" / "reconciler"
    path = write_config(cfg_dir, MINIMAL)
    # Paths are relative to the config file, not the working directory.
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("etc/reconciler/reconciler.yaml"))
    assert cfg == Config(
        path=path,
        repo=RepoConfig(url=str(cfg_dir / "repo"), branch="main"),
        store=StoreConfig(type="filesystem", path=cfg_dir / "store"),
        state_dir=cfg_dir / "state",
        signing=SigningConfig(gnupghome=cfg_dir / "gnupg", key="ABCDEF0123456789", passphrase_file=None),
        nix=NixConfig(toolchain="debian", toolchain_dir=None),
        listen="127.0.0.1:9180",
        poll_interval=30.0,
        jobs=2,
        release_lifetime=timedelta(days=30),
    )
    assert cfg.path.is_absolute()


def test_images_default_to_a_local_prefix_served_at_its_domain(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, MINIMAL))
    assert cfg.images == ImagesConfig("localhost/fleet", "https://localhost/", ())
    cfg = load_config(write_config(tmp_path, merged(images={"name_prefix": "example.com/fleet"})))
    assert cfg.images == ImagesConfig("example.com/fleet", "https://example.com/", ())


def test_images_settings(tmp_path: Path) -> None:
    images = {
        "name_prefix": "images.example.com/prod/fleet_1",
        "annotations": {
            "homepage": "https://example.com/",
            "authors": "Ops <ops@example.com>",
            "example.com/x": "y",
        },
    }
    cfg = load_config(
        write_config(tmp_path, merged(images=images, store__public_url="http://127.0.0.1:8080/store"))
    )
    assert cfg.images == ImagesConfig(
        name_prefix="images.example.com/prod/fleet_1",
        # Where the store is served (store.public_url), as a base URL: the templates
        # append the image's path to it.
        store_url="http://127.0.0.1:8080/store/",
        annotations=(
            ("authors", "Ops <ops@example.com>"),
            ("example.com/x", "y"),
            ("homepage", "https://example.com/"),
        ),
    )


def test_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg_dir = tmp_path / "cfg"
    path = write_config(
        cfg_dir,
        {
            "repo": {"url": "https://git.example.com/fleet.git", "branch": "prod"},
            "store": {"type": "filesystem", "path": "/srv/store"},
            "state_dir": "~/state",
            "signing": {"gnupghome": "../gnupg", "key": "K", "passphrase_file": "secret/pass"},
            "nix": {
                "toolchain": "nixpkgs",
                "toolchain_dir": "tc",
                "sandbox": False,
                "build_timeout": "20m",
                "eval_timeout": "90s",
                "max_output_size": "512MiB",
                "eval_workers": 3,
                "eval_memory": "1536M",
                "heartbeat": "5s",
            },
            "listen": "[::1]:9100",
            "poll_interval": 2.5,
            "jobs": 64,
            "release_lifetime": "12h",
        },
    )
    cfg = load_config(path)
    assert cfg.repo == RepoConfig(url="https://git.example.com/fleet.git", branch="prod")
    assert cfg.store == StoreConfig(type="filesystem", path=Path("/srv/store"))
    assert cfg.state_dir == tmp_path / "home" / "state"
    assert cfg.signing == SigningConfig(
        gnupghome=cfg_dir / ".." / "gnupg", key="K", passphrase_file=cfg_dir / "secret" / "pass"
    )
    assert cfg.nix == NixConfig(
        toolchain="nixpkgs",
        toolchain_dir=cfg_dir / "tc",
        sandbox=False,
        build_timeout=timedelta(minutes=20),
        eval_timeout=timedelta(seconds=90),
        max_output_size=512 << 20,
        eval_workers=3,
        eval_memory=1536 << 20,
        heartbeat=5.0,
    )
    assert (cfg.listen, cfg.poll_interval, cfg.jobs) == ("[::1]:9100", 2.5, 64)
    assert cfg.release_lifetime == timedelta(hours=12)


def test_eval_workers_auto_is_kept_for_the_evaluator_to_count_cores(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, merged(nix__eval_workers="auto")))
    assert (cfg.nix.eval_workers, cfg.nix.eval_memory) == ("auto", 4 << 30)


@pytest.mark.parametrize(
    "url",
    ["https://git.example.com/fleet.git", "ssh://git@example.com/fleet", "git@example.com:org/fleet.git"],
)
def test_remote_urls_are_kept(tmp_path: Path, url: str) -> None:
    cfg = load_config(write_config(tmp_path, merged(repo__url=url)))
    assert cfg.repo.url == url


def test_absolute_repo_path_is_kept(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "cfg", merged(repo__url="/srv/repo")))
    assert cfg.repo.url == "/srv/repo"


TOP = (
    "unknown key (allowed: "
    + ", ".join(
        [
            "builders",
            "events",
            "images",
            "jobs",
            "lease",
            "listen",
            "nix",
            "notifications",
            "poll_interval",
            "release_lifetime",
            "repo",
            "reproducibility",
            "retention",
            "retry",
            "signing",
            "state_dir",
            "store",
            "transparency_log",
            "triggers",
            "tuf",
            "web",
        ]
    )
    + ")"
)
PORT = "must be HOST:PORT"
S3_KEYS = "unknown key (allowed: bucket, credentials_file, endpoint, prefix, public_url, region, type)"
BUCKET = "must be a bucket name: 3 to 63 lowercase letters, digits, '.' and '-'"
PREFIX = "must be a key prefix like fleet/prod"
ENDPOINT = "must be an http:// or https:// URL"
PUBLIC_URL = "must be the http:// or https:// URL the store is served at (printable ASCII, no '|')"
KEEP = "must be an integer >= 1"


def s3(**keys: Any) -> dict[str, Any]:
    return {"type": "s3", "bucket": "fleet-artifacts", **keys}


POLL = "must be a positive number of seconds"
JOBS = "must be an integer from 1 to 64"
WORKERS = "must be an integer from 1 to 64, or auto"


def duration(value: Any) -> str:
    return f"must be a duration like 90s, 15m, 12h or 30d, got {value!r}"


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        (merged(colour="blue"), "colour", TOP),
        (
            merged(repo__brnach="dev"),
            "repo.brnach",
            "unknown key (allowed: allow_force_push, branch, credentials_file, depth, known_hosts, "
            "network_timeout, ssh_key, url, verify_commits)",
        ),
        (merged(store__bucket="b"), "store.bucket", "unknown key (allowed: path, public_url, type)"),
        (
            merged(signing__passphrase="x"),
            "signing.passphrase",
            "unknown key (allowed: gnupghome, key, passphrase_file)",
        ),
        (
            merged(nix__sandboxed=True),
            "nix.sandboxed",
            "unknown key (allowed: build_timeout, eval_memory, eval_timeout, eval_workers, heartbeat, "
            "local_builds, max_output_size, sandbox, toolchain, toolchain_dir)",
        ),
        (merged(nix__sandbox="no"), "nix.sandbox", "must be true or false"),
        (
            merged(transparency_log__origin="fleet log"),
            "transparency_log.origin",
            "must be printable ASCII without spaces or '+', like fleet.example/log",
        ),
        (merged(transparency_log__origine="x"), "transparency_log.origine", "unknown key (allowed: origin)"),
        (merged(nix__build_timeout="soon"), "nix.build_timeout", duration("soon")),
        (merged(nix__eval_timeout=0), "nix.eval_timeout", duration(0)),
        (
            merged(nix__max_output_size="lots"),
            "nix.max_output_size",
            "must be a size like 512M or 4G, got 'lots'",
        ),
        (merged(nix__max_output_size=0), "nix.max_output_size", "must be a positive number of bytes"),
        (merged(nix__eval_workers=0), "nix.eval_workers", WORKERS),
        (merged(nix__eval_workers=65), "nix.eval_workers", WORKERS),
        (merged(nix__eval_workers=True), "nix.eval_workers", WORKERS),
        (merged(nix__eval_workers="4"), "nix.eval_workers", WORKERS),
        (merged(nix__eval_workers="cores"), "nix.eval_workers", WORKERS),
        (merged(nix__eval_memory="lots"), "nix.eval_memory", "must be a size like 512M or 4G, got 'lots'"),
        (merged(nix__eval_memory=-1), "nix.eval_memory", "must be a positive number of bytes"),
        (merged(nix__eval_memory="255M"), "nix.eval_memory", "must be at least 256M"),
        (
            merged(nix__max_output_size="0G"),
            "nix.max_output_size",
            "must be a size like 512M or 4G, got '0G'",
        ),
        (
            merged(nix__max_output_size="٣G"),
            "nix.max_output_size",
            "must be a size like 512M or 4G, got '٣G'",
        ),
        (
            merged(nix__max_output_size="9" * 5000 + "G"),
            "nix.max_output_size",
            f"must be a size like 512M or 4G, got {'9' * 5000 + 'G'!r}",
        ),
        (merged(repo=DELETE), "repo", "is required"),
        (merged(repo=["x"]), "repo", "must be a mapping"),
        (merged(repo__url=DELETE), "repo.url", "is required"),
        (merged(repo__url=""), "repo.url", "must be a non-empty string"),
        (merged(repo__url=3), "repo.url", "must be a non-empty string"),
        (merged(repo__branch=None), "repo.branch", "must be a non-empty string"),
        (merged(store=DELETE), "store", "is required"),
        (merged(store__path=DELETE), "store.path", "is required"),
        (merged(store__type="gcs"), "store.type", "unsupported store type 'gcs' (supported: filesystem, s3)"),
        (merged(store__type=""), "store.type", "must be a non-empty string"),
        (merged(store={"type": "s3", "bucket": "b", "path": "x"}), "store.path", S3_KEYS),
        (merged(store={"type": "s3"}), "store.bucket", "is required"),
        (merged(store={"type": "s3", "bucket": ""}), "store.bucket", "must be a non-empty string"),
        (merged(store={"type": "s3", "bucket": 7}), "store.bucket", "must be a non-empty string"),
        (merged(store={"type": "s3", "bucket": "ab"}), "store.bucket", BUCKET),
        (merged(store={"type": "s3", "bucket": "Fleet"}), "store.bucket", BUCKET),
        (merged(store={"type": "s3", "bucket": "fleet_store"}), "store.bucket", BUCKET),
        (merged(store={"type": "s3", "bucket": "-fleet"}), "store.bucket", BUCKET),
        (merged(store={"type": "s3", "bucket": "a..b"}), "store.bucket", BUCKET),
        (merged(store=s3(prefix="a/../b")), "store.prefix", PREFIX),
        (merged(store=s3(prefix="a//b")), "store.prefix", PREFIX),
        (merged(store=s3(prefix=3)), "store.prefix", PREFIX),
        (merged(store=s3(endpoint="127.0.0.1:8333")), "store.endpoint", ENDPOINT),
        (merged(store=s3(endpoint="ftp://127.0.0.1:8333")), "store.endpoint", ENDPOINT),
        (merged(store=s3(endpoint="http://")), "store.endpoint", ENDPOINT),
        (merged(store=s3(endpoint="http://127.0.0.1:99999")), "store.endpoint", ENDPOINT),
        (merged(store=s3(endpoint=8333)), "store.endpoint", ENDPOINT),
        (merged(store=s3(region="")), "store.region", "must be a non-empty string"),
        (merged(store__public_url="store.example"), "store.public_url", PUBLIC_URL),
        (merged(store__public_url="ftp://store.example/"), "store.public_url", PUBLIC_URL),
        (merged(store__public_url="https://store.example/a b"), "store.public_url", PUBLIC_URL),
        (merged(store__public_url="https://store.example/a|b"), "store.public_url", PUBLIC_URL),
        (merged(store__public_url="https://store.example/?v=1"), "store.public_url", PUBLIC_URL),
        (merged(store__public_url="https://store.example:99999/"), "store.public_url", PUBLIC_URL),
        (merged(store=s3(public_url=["https://store.example"])), "store.public_url", PUBLIC_URL),
        (merged(store=s3(credentials_file="")), "store.credentials_file", "must be a path"),
        (merged(store=s3(credentials_file=["a"])), "store.credentials_file", "must be a path"),
        # images
        (merged(images="example.com"), "images", "must be a mapping"),
        (
            merged(images={"prefix": "a"}),
            "images.prefix",
            "unknown key (allowed: annotations, name_prefix)",
        ),
        *[
            (merged(images={"name_prefix": bad}), "images.name_prefix", AC_PREFIX)
            for bad in (
                "",
                "Example.com",
                "example.com/",
                "/fleet",
                "example.com//fleet",
                "a b",
                "x:8080/f",
                3,
                None,
            )
        ],
        *[
            (merged(images={"name_prefix": f"{folder}/fleet"}), "images.name_prefix", LAYOUT)
            for folder in ("blobs", "hosts", "keys", "tuf")
        ],
        (
            merged(images={"annotations": ["homepage"]}),
            "images.annotations",
            "must be a mapping of AC Identifiers to strings",
        ),
        (merged(images={"annotations": {"Home": "x"}}), "images.annotations.Home", ANNOTATION),
        (merged(images={"annotations": {"a-": "x"}}), "images.annotations.a-", ANNOTATION),
        (
            merged(images={"annotations": {"authors": ""}}),
            "images.annotations.authors",
            "must be a non-empty string",
        ),
        (
            merged(images={"annotations": {"authors": 3}}),
            "images.annotations.authors",
            "must be a non-empty string",
        ),
        (
            merged(images={"annotations": {"homepage": "example.com"}}),
            "images.annotations.homepage",
            HTTP_URL,
        ),
        (
            merged(images={"annotations": {"documentation": "file:///x"}}),
            "images.annotations.documentation",
            HTTP_URL,
        ),
        (
            merged(images={"annotations": {"created": "2026-01-01T00:00:00Z"}}),
            "images.annotations.created",
            "is not allowed: a build date would make every build differ",
        ),
        (merged(retention="10"), "retention", "must be a mapping"),
        (merged(retention={"kep": 3}), "retention.kep", "unknown key (allowed: interval, keep)"),
        (merged(retention={"keep": 0}), "retention.keep", KEEP),
        (merged(retention={"keep": -2}), "retention.keep", KEEP),
        (merged(retention={"keep": "3"}), "retention.keep", KEEP),
        (merged(retention={"keep": True}), "retention.keep", KEEP),
        (merged(retention={"keep": 2.5}), "retention.keep", KEEP),
        (merged(retention={"keep": None}), "retention.keep", KEEP),
        (merged(state_dir=DELETE), "state_dir", "is required"),
        (merged(state_dir=["a"]), "state_dir", "must be a non-empty string"),
        (merged(signing=DELETE), "signing", "is required"),
        (merged(signing__key=DELETE), "signing.key", "is required"),
        (merged(signing__gnupghome=""), "signing.gnupghome", "must be a non-empty string"),
        (merged(signing__passphrase_file=3), "signing.passphrase_file", "must be a path"),
        (merged(nix="debian"), "nix", "must be a mapping"),
        (merged(nix__toolchain="guix"), "nix.toolchain", "must be 'debian' or 'nixpkgs'"),
        (merged(nix__toolchain_dir=3), "nix.toolchain_dir", "must be a path"),
        (merged(jobs=0), "jobs", JOBS),
        (merged(jobs=65), "jobs", JOBS),
        (merged(jobs=-1), "jobs", JOBS),
        (merged(jobs="2"), "jobs", JOBS),
        (merged(jobs=True), "jobs", JOBS),
        (merged(jobs=2.0), "jobs", JOBS),
        (merged(listen="9180"), "listen", PORT),
        (merged(listen="localhost"), "listen", PORT),
        (merged(listen="localhost:"), "listen", PORT),
        (merged(listen="127.0.0.1:99999"), "listen", PORT),
        (merged(listen="127.0.0.1:80\n"), "listen", PORT),
        (merged(listen="http://127.0.0.1:80"), "listen", PORT),
        (merged(listen=9180), "listen", PORT),
        (merged(poll_interval=-1), "poll_interval", POLL),
        (merged(poll_interval=0), "poll_interval", POLL),
        (merged(poll_interval="30"), "poll_interval", POLL),
        (merged(poll_interval=True), "poll_interval", POLL),
        (merged(poll_interval=float("nan")), "poll_interval", POLL),
        (merged(poll_interval=float("inf")), "poll_interval", POLL),
        (merged(release_lifetime="30"), "release_lifetime", duration("30")),
        (merged(release_lifetime=30), "release_lifetime", duration(30)),
        (merged(release_lifetime="0d"), "release_lifetime", duration("0d")),
        (merged(release_lifetime="1w"), "release_lifetime", duration("1w")),
        (merged(release_lifetime="-1d"), "release_lifetime", duration("-1d")),
        (merged(release_lifetime="30d\n"), "release_lifetime", duration("30d\n")),
        (merged(release_lifetime=None), "release_lifetime", duration(None)),
    ],
)
def test_bad_setting_names_file_and_key(tmp_path: Path, data: dict[str, Any], key: str, reason: str) -> None:
    err = config_error(tmp_path, data)
    # A reason quoting a huge value is cut (errors.MAX_REASON).
    reason = reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 1] + "…"
    assert (err.key, err.reason) == (key, reason)
    assert str(err) == f"{err.path}: {key}: {reason}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("repo: [1, 2\n", "invalid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
        (
            "repo:\n  url: x\n bad: y\n",
            "invalid YAML at line 3, column 2: expected <block end>, but found '<block mapping start>'",
        ),
        ("- repo\n- store\n", "must be a mapping"),
        ("just text\n", "must be a mapping"),
        ("0\n", "must be a mapping"),
        ("false\n", "must be a mapping"),
        ("[]\n", "must be a mapping"),
    ],
)
def test_document_errors(tmp_path: Path, text: str, reason: str) -> None:
    err = config_error(tmp_path, text)
    assert (err.key, err.reason) == ("", reason)
    assert str(err) == f"{err.path}: {reason}"


def test_empty_file_reports_the_first_missing_section(tmp_path: Path) -> None:
    err = config_error(tmp_path, "# nothing yet\n")
    assert (err.key, err.reason) == ("repo", "is required")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert (exc.value.path, exc.value.key, exc.value.reason) == (
        str(path),
        "",
        "cannot read: No such file or directory",
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("1s", 1)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration("f", "k", text) == timedelta(seconds=seconds)


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["s", "m", "h", "d"]))
def test_parse_duration_property(n: int, unit: str) -> None:
    factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_duration("f", "k", f"{n}{unit}") == timedelta(seconds=n * factor)


@given(
    st.one_of(
        st.text(max_size=10),
        st.integers(),
        st.none(),
        st.floats(),
        st.from_regex(r"[0-9]{1,30}[smhd]", fullmatch=True),
        st.from_regex(r"\d{1,3}[smhd]", fullmatch=True),  # any Unicode digit
    )
)
@example("٣s")  # ARABIC-INDIC DIGIT THREE
@example("9999999999d")  # beyond what a timedelta holds
@example("9" * 5000 + "s")  # beyond what int() converts
@example("000s")
def test_parse_duration_refuses_with_config_error_only(value: object) -> None:
    try:
        d = parse_duration("f.yaml", "release_lifetime", value)
    except ConfigError as exc:
        assert (exc.path, exc.key) == ("f.yaml", "release_lifetime")
        said = (duration(value), f"{value!r} is longer than a duration can be")
        assert exc.reason in [r if len(r) <= MAX_REASON else r[: MAX_REASON - 1] + "…" for r in said]
    else:
        # Accepted: ASCII digits and a unit, meaning exactly what they say.
        assert isinstance(value, str)
        m = re.fullmatch(r"([0-9]+)([smhd])", value)
        assert m is not None, value
        factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        assert d == timedelta(seconds=int(m.group(1)) * factor) > timedelta(0)


def test_retry_backoff_defaults_and_overrides(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "a", merged())).retry == RetryConfig(
        initial=timedelta(seconds=30), max=timedelta(hours=1)
    )
    cfg = load_config(write_config(tmp_path / "b", merged(retry={"initial": "5s", "max": "2m"})))
    assert cfg.retry == RetryConfig(initial=timedelta(seconds=5), max=timedelta(minutes=2))


def test_retry_backoff_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, merged(retry={"initial": "soon"})))
    assert err.value.key == "retry.initial"


def test_s3_store_defaults(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, merged(store=s3())))
    assert cfg.store == StoreConfig(
        type="s3",
        path=None,
        bucket="fleet-artifacts",
        prefix="",
        endpoint=None,
        region="us-east-1",
        credentials_file=None,
    )


def test_s3_store_every_setting(tmp_path: Path) -> None:
    cfg_dir = tmp_path / "cfg"
    store = s3(
        prefix="/fleet/prod/",
        endpoint="http://127.0.0.1:8333",
        region="eu-west-1",
        credentials_file="secret/s3.creds",
    )
    cfg = load_config(write_config(cfg_dir, merged(store=store)))
    assert cfg.store == StoreConfig(
        type="s3",
        bucket="fleet-artifacts",
        prefix="fleet/prod",
        endpoint="http://127.0.0.1:8333",
        region="eu-west-1",
        credentials_file=cfg_dir / "secret" / "s3.creds",
    )


def test_the_store_s_public_url_loses_its_trailing_slash(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "a", merged(store__public_url="https://store.example/fleet/")))
    assert cfg.store.public_url == "https://store.example/fleet"
    cfg = load_config(write_config(tmp_path / "b", merged(store=s3(public_url="http://10.0.0.1:8080"))))
    assert cfg.store.public_url == "http://10.0.0.1:8080"
    assert load_config(write_config(tmp_path / "c", merged())).store.public_url is None


def test_filesystem_is_the_default_store_type(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, merged(store__type="filesystem")))
    assert cfg.store == StoreConfig(type="filesystem", path=tmp_path / "store")
    assert load_config(write_config(tmp_path / "b", merged())).store.type == "filesystem"


def test_retention_keep(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "a", merged())).retention == RetentionConfig(keep=10)
    assert load_config(write_config(tmp_path / "b", merged(retention={}))).retention.keep == 10
    assert load_config(write_config(tmp_path / "c", merged(retention={"keep": 1}))).retention.keep == 1


def test_repository_access_and_trust_settings(tmp_path: Path) -> None:
    fpr = "AB" * 20
    data = merged(
        repo={
            "url": "https://git.example/fleet.git",
            "depth": 1,
            "credentials_file": "creds",
            "verify_commits": {"keys": ["dev.asc"], "fingerprints": ["ab" * 10 + " " + "AB" * 10]},
        },
        triggers={"webhook_secret_file": "hook.secret", "watch": False, "debounce": 0.5},
    )
    cfg = load_config(write_config(tmp_path, data))
    assert cfg.repo.depth == 1 and not cfg.repo.is_local
    assert cfg.repo.credentials_file == tmp_path / "creds"
    assert cfg.repo.trusted_keys == (tmp_path / "dev.asc",)
    assert cfg.repo.trusted_fingerprints == frozenset({fpr})
    assert cfg.repo.allow_force_push is False
    assert cfg.triggers.webhook_secret_file == tmp_path / "hook.secret"
    assert (cfg.triggers.watch, cfg.triggers.debounce) == (False, 0.5)


@pytest.mark.parametrize(
    ("repo", "key", "reason"),
    [
        ({"depth": 0}, "repo.depth", "must be a positive number of commits"),
        ({"verify_commits": {"keys": ["k"]}}, "repo.verify_commits.fingerprints", "must list trusted"),
        ({"verify_commits": {"fingerprints": ["AB" * 20]}}, "repo.verify_commits.keys", "must list public"),
        (
            {"verify_commits": {"keys": ["k"], "fingerprints": ["DEADBEEF"]}},
            "repo.verify_commits.fingerprints",
            "must be full 40-hex-digit fingerprints",
        ),
        ({"allow_force_push": "yes"}, "repo.allow_force_push", "must be true or false"),
        ({"allow_force_push": 1}, "repo.allow_force_push", "must be true or false"),
        ({"network_timeout": "0m"}, "repo.network_timeout", duration("0m")),
        ({"network_timeout": 90}, "repo.network_timeout", duration(90)),
    ],
)
def test_repository_setting_errors(tmp_path: Path, repo: dict[str, Any], key: str, reason: str) -> None:
    err = config_error(tmp_path, merged(repo={"url": "r", **repo}))
    assert err.key == key and err.reason.startswith(reason), (err.key, err.reason)


def test_the_git_network_deadline_is_configured_and_reaches_the_daemons_clone(tmp_path: Path) -> None:
    default = load_config(write_config(tmp_path / "a", merged()))
    assert default.repo.network_timeout == timedelta(minutes=15)
    assert wiring.source(default).network_timeout == 900.0
    slow = load_config(write_config(tmp_path / "b", merged(repo={"url": "r", "network_timeout": "2h"})))
    assert slow.repo.network_timeout == timedelta(hours=2)
    assert wiring.source(slow).network_timeout == 7200.0


def test_force_pushes_are_refused_unless_allowed(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "a", merged())).repo.allow_force_push is False
    allowed = merged(repo={"url": "r", "allow_force_push": True})
    assert load_config(write_config(tmp_path / "b", allowed)).repo.allow_force_push is True


def test_trigger_setting_errors(tmp_path: Path) -> None:
    assert config_error(tmp_path / "a", merged(triggers={"watch": "yes"})).key == "triggers.watch"
    assert config_error(tmp_path / "b", merged(triggers={"debounce": -1})).key == "triggers.debounce"
    assert config_error(tmp_path / "c", merged(triggers={"webhook": "x"})).key == "triggers.webhook"


HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHo6aV0fvzBNvWmlBFq0oD0nb1R4vqHjyvj6cfSJRYOx"


def builder(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "uri": "ssh-ng://nix@build-1.example:2222",
        "ssh_key": "keys/b1",
        "host_key": HOST_KEY,
    }
    entry.update(changes)
    return entry


def test_builders_are_read_with_defaults(tmp_path: Path) -> None:
    second = builder(
        uri="ssh-ng://root@127.0.0.1?remote-store=local%3Froot%3D/srv/b2",
        name="b2",
        systems=["x86_64-linux", "i686-linux"],
        max_jobs=4,
        speed_factor=2,
        features=["big-parallel"],
        host_key=f"127.0.0.1 {HOST_KEY}",
    )
    cfg = load_config(write_config(tmp_path, merged(builders=[builder(), second], nix__local_builds=False)))
    first, other = cfg.builders
    assert not cfg.nix.local_builds
    assert (first.name, first.host, first.port, first.nix_uri) == (
        "ssh-ng://nix@build-1.example:2222",
        "build-1.example",
        2222,
        "ssh-ng://nix@build-1.example",
    )
    assert first.ssh_key == str(tmp_path / "keys/b1")
    assert (first.systems, first.max_jobs, first.speed_factor, first.features) == (
        ("x86_64-linux",),
        1,
        1,
        (),
    )
    assert other.name == "b2" and other.host_key == HOST_KEY and other.port is None
    assert (other.systems, other.max_jobs, other.speed_factor, other.features) == (
        ("x86_64-linux", "i686-linux"),
        4,
        2,
        ("big-parallel",),
    )
    assert load_config(write_config(tmp_path / "none", MINIMAL)).builders == ()


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        (merged(builders={"uri": "x"}), "builders", "must be a list of builders"),
        (merged(builders=[builder(uri="ssh://nix@b1")]), "builders[0].uri", "must be ssh-ng://"),
        (merged(builders=[builder(uri="ssh-ng://b1:99999")]), "builders[0].uri", "must be ssh-ng://"),
        (merged(builders=[builder(host_key=None)]), "builders[0].host_key", "must be the builder's public"),
        (merged(builders=[builder(host_key="AAAA")]), "builders[0].host_key", "must be the builder's public"),
        (merged(builders=[builder(ssh_key=None)]), "builders[0].ssh_key", "is required"),
        (merged(builders=[builder(ssh_key="a b")]), "builders[0].ssh_key", "must be one word"),
        (merged(builders=[builder(max_jobs=0)]), "builders[0].max_jobs", "must be an integer >= 1"),
        (merged(builders=[builder(systems=[])]), "builders[0].systems", "must name at least one system"),
        (merged(builders=[builder(features="kvm")]), "builders[0].features", "must be a list of words"),
        (merged(builders=[builder(colour=1)]), "builders[0].colour", "unknown key"),
        (merged(builders=[builder(), builder()]), "builders", "two builders have the name"),
        (
            merged(builders=[builder(), builder(uri="ssh-ng://nix@build-1.example:2200", name="x")]),
            "builders",
            "two builders have the URI",
        ),
        (merged(nix__local_builds=False), "nix.local_builds", "false needs at least one entry in builders"),
        (merged(nix__local_builds="no"), "nix.local_builds", "must be true or false"),
    ],
)
def test_bad_builders_name_file_and_key(tmp_path: Path, data: dict[str, Any], key: str, reason: str) -> None:
    err = config_error(tmp_path, data)
    assert err.key == key and err.reason.startswith(reason), (err.key, err.reason)


def test_a_reload_applies_what_can_change_live_and_names_what_needs_a_restart(tmp_path: Path) -> None:
    old = load_config(write_config(tmp_path / "a", merged(triggers={"watch": True})))
    new = load_config(
        write_config(
            tmp_path / "a",
            merged(
                poll_interval=5,
                jobs=7,
                retry={"initial": "1s", "max": "4s"},
                listen="127.0.0.1:9999",
                state_dir="elsewhere",
                triggers={"watch": False, "debounce": 1, "reconcile_token_file": "token"},
            ),
        )
    )
    running, applied, restart = reload(old, new)
    assert applied == ["poll_interval", "jobs", "retry", "triggers.reconcile_token_file", "triggers.debounce"]
    assert restart == ["state_dir", "listen", "triggers.watch"]
    assert (running.poll_interval, running.jobs, running.retry.max) == (5.0, 7, timedelta(seconds=4))
    assert running.triggers.reconcile_token_file == tmp_path / "a" / "token"
    assert running.triggers.debounce == 1.0
    # What needs a restart keeps its old value until then.
    assert (running.listen, running.state_dir, running.triggers.watch) == (old.listen, old.state_dir, True)
    assert reload(old, old) == (old, [], [])


def test_a_reload_applies_notification_targets_and_the_lease_timings_not_the_lease_itself(
    tmp_path: Path,
) -> None:
    old = load_config(write_config(tmp_path / "a", merged()))
    target = {"name": "chat", "type": "webhook", "url": "https://chat.example/hook"}
    new = load_config(
        write_config(
            tmp_path / "a",
            merged(notifications=[target], lease={"enabled": False, "duration": "30s", "renew": "5s"}),
        )
    )
    running, applied, restart = reload(old, new)
    assert applied == ["lease.duration", "lease.renew", "notifications"]
    # Whether daemons elect a publisher at all is not changed under a running one.
    assert restart == ["lease.enabled"]
    assert [n.name for n in running.notifications] == ["chat"]
    assert running.lease == LeaseConfig(enabled=True, duration=30.0, renew=5.0)


def test_the_publisher_lease_is_on_by_default_and_configurable(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path / "a", merged())).lease == LeaseConfig(
        enabled=True, duration=60.0, renew=20.0
    )
    cfg = load_config(write_config(tmp_path / "b", merged(lease={"duration": "3s"})))
    assert cfg.lease == LeaseConfig(enabled=True, duration=3.0, renew=1.0)
    cfg = load_config(write_config(tmp_path / "c", merged(lease={"duration": "2m", "renew": 15})))
    assert cfg.lease == LeaseConfig(enabled=True, duration=120.0, renew=15.0)
    assert not load_config(write_config(tmp_path / "d", merged(lease={"enabled": False}))).lease.enabled


@pytest.mark.parametrize(
    ("lease", "key", "reason"),
    [
        ({"enabled": "yes"}, "lease.enabled", "must be true or false"),
        ({"duration": "0.5"}, "lease.duration", "must be a duration"),
        ({"duration": 0.5}, "lease.duration", "must be from 1s to 1d"),
        ({"duration": "2d"}, "lease.duration", "must be from 1s to 1d"),
        ({"duration": "10s", "renew": "6s"}, "lease.renew", "must be at most half of lease.duration (5s)"),
        ({"renew": "soon"}, "lease.renew", "must be a duration"),
        ({"term": 3}, "lease.term", "unknown key"),
        ([], "lease", "must be a mapping"),
    ],
)
def test_bad_lease_settings_name_the_key(tmp_path: Path, lease: Any, key: str, reason: str) -> None:
    err = config_error(tmp_path, merged(lease=lease))
    assert err.key == key
    assert err.reason.startswith(reason), err.reason

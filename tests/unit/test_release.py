"""Unit and property tests for reconciler.release: canonical JSON, parsing, validation."""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reconciler.core.formats import Kind
from reconciler.core.hosts import NAME_RE
from reconciler.core.layout import AttestationKind, attestation_path, blob_path, latest_path, release_path
from reconciler.core.release import (
    COMMIT_RE,
    HEX64,
    SCHEMA,
    Artifact,
    Attestation,
    Release,
    format_time,
    new_release,
    parse_release,
    parse_time,
)
from reconciler.errors import VerificationError

NAME_RULE = (
    "must be a plain file name (1 to 255 letters, digits, '.', '_', '+' or '-', not starting with '.')"
)
PLAIN_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,254}")
HOST_RULE = f"must be a host name ({NAME_RE.pattern})"
DRV_RULE = "must not contain control or unprintable characters"
PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
SRC = "hosts/web-1/releases/3.json"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHA_A = "a" * 64
SHA_B = "b" * 64
DRV = "/nix/store/0000000000000000000000000000000-host-web-1-image.drv"

RELEASE = Release(
    host="web-1",
    version=3,
    commit=COMMIT,
    derivation=DRV,
    created=datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC),
    expires=datetime(2024, 5, 31, 12, 0, 0, tzinfo=UTC),
    artifacts=(
        Artifact("aci", "web-1-3-linux-amd64.aci", 1024, SHA_A),
        Artifact("appimage", "web-1-3.AppImage", 2048, SHA_B),
    ),
)

EXPECTED_JSON = f"""\
{{
  "artifacts": [
    {{
      "blob": "blobs/sha256/{SHA_A}",
      "format": "aci",
      "name": "web-1-3-linux-amd64.aci",
      "sha256": "{SHA_A}",
      "size": 1024
    }},
    {{
      "blob": "blobs/sha256/{SHA_B}",
      "format": "appimage",
      "name": "web-1-3.AppImage",
      "sha256": "{SHA_B}",
      "size": 2048
    }}
  ],
  "commit": "{COMMIT}",
  "created": "2024-05-01T12:00:00Z",
  "derivation": "{DRV}",
  "expires": "2024-05-31T12:00:00Z",
  "host": "web-1",
  "schema": "reconciler.release/v1",
  "version": 3
}}
""".encode()


def valid_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(RELEASE.to_json())
    return doc


def parse_doc(doc: Any) -> Release:
    return parse_release(json.dumps(doc).encode(), SRC)


def error_of(doc: Any) -> str:
    with pytest.raises(VerificationError) as exc:
        parse_doc(doc)
    return str(exc.value)


# -- canonical form ---------------------------------------------------------------------------


def test_to_json_is_canonical() -> None:
    assert RELEASE.to_json() == EXPECTED_JSON
    # An equal release built separately, with times in another zone, gives the same bytes.
    cet = timezone(timedelta(hours=2))
    other = Release(
        host="web-1",
        version=3,
        commit=COMMIT,
        derivation=DRV,
        created=datetime(2024, 5, 1, 14, 0, 0, tzinfo=cet),
        expires=datetime(2024, 5, 31, 14, 0, 0, tzinfo=cet),
        artifacts=tuple(RELEASE.artifacts),
    )
    assert other.to_json() == EXPECTED_JSON


def test_parse_release_round_trip() -> None:
    assert parse_release(EXPECTED_JSON, SRC) == RELEASE
    # Key order and whitespace of the input do not matter.
    compact = json.dumps(valid_doc(), separators=(",", ":")).encode()
    assert parse_release(compact, SRC) == RELEASE


def test_artifact_lookup_and_paths() -> None:
    aci = RELEASE.artifact("aci")
    assert aci is not None
    assert aci.name == "web-1-3-linux-amd64.aci"
    assert aci.blob == f"blobs/sha256/{SHA_A}"
    assert RELEASE.artifact("docker") is None
    assert blob_path(SHA_B) == f"blobs/sha256/{SHA_B}"
    assert release_path("web-1", 3) == "hosts/web-1/releases/3.json"
    assert latest_path("web-1") == "hosts/web-1/latest.json"


def test_new_release_normalises_time_and_artifact_order() -> None:
    now = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    r = new_release(
        "web-1",
        3,
        COMMIT,
        DRV,
        (Artifact("appimage", "b", 2, SHA_B), Artifact("aci", "a", 1, SHA_A)),
        now,
        timedelta(days=30),
    )
    assert r.created == datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert r.created.tzinfo is UTC
    assert r.expires == datetime(2024, 5, 31, 12, 0, 0, tzinfo=UTC)
    assert [a.format for a in r.artifacts] == ["aci", "appimage"]
    assert parse_release(r.to_json(), SRC) == r


def test_time_helpers() -> None:
    assert format_time(datetime(2024, 1, 2, 3, 4, 5, 999, tzinfo=UTC)) == "2024-01-02T03:04:05Z"
    assert parse_time("2024-01-02T03:04:05Z") == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_time("2024-01-02T05:04:05+02:00") == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_time("2024-01-02T05:04:05+02:00").tzinfo is UTC
    with pytest.raises(ValueError, match="has no time zone"):
        parse_time("2024-01-02T03:04:05")


# -- validation -----------------------------------------------------------------------------------


DELETE = object()


def with_value(key: str, value: Any) -> dict[str, Any]:
    doc = valid_doc()
    if value is DELETE:
        del doc[key]
    else:
        doc[key] = value
    return doc


def with_artifact(key: str, value: Any, index: int = 0) -> dict[str, Any]:
    doc = valid_doc()
    if value is DELETE:
        del doc["artifacts"][index][key]
    else:
        doc["artifacts"][index][key] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            with_value("schema", "reconciler.release/v0"),
            "schema: expected 'reconciler.release/v1', got 'reconciler.release/v0'",
        ),
        (with_value("schema", DELETE), "schema: expected 'reconciler.release/v1', got None"),
        (with_value("host", DELETE), "host: must be a str"),
        (with_value("host", 1), "host: must be a str"),
        (with_value("version", 0), "version: must be >= 1"),
        (with_value("version", -3), "version: must be >= 1"),
        (with_value("version", "3"), "version: must be a int"),
        (with_value("version", True), "version: must be a int"),
        (with_value("version", 3.0), "version: must be a int"),
        (with_value("commit", "abc123"), "commit: must be a full git commit id"),
        (with_value("commit", COMMIT.upper()), "commit: must be a full git commit id"),
        (with_value("commit", COMMIT + "0"), "commit: must be a full git commit id"),
        (with_value("commit", COMMIT + "\n"), "commit: must be a full git commit id"),
        (with_value("commit", None), "commit: must be a str"),
        (with_value("derivation", ["x"]), "derivation: must be a str"),
        (with_value("created", "2024-05-01T12:00:00"), "created: '2024-05-01T12:00:00' has no time zone"),
        (with_value("created", "yesterday"), "created: Invalid isoformat string: 'yesterday'"),
        (with_value("created", "9999-12-31T23:59:59-01:00"), "created: date value out of range"),
        (with_value("expires", DELETE), "expires: must be a str"),
        (with_value("expires", 1714564800), "expires: must be a str"),
        (with_value("artifacts", {}), "artifacts: must be a list"),
        (with_value("artifacts", ["aci"]), "artifacts[0]: must be an object"),
        (with_artifact("format", "docker"), "artifacts[0].format: unknown format 'docker'"),
        (with_artifact("format", DELETE), "artifacts[0].format: unknown format None"),
        (with_artifact("format", ["oci"]), "artifacts[0].format: unknown format ['oci']"),
        (with_artifact("format", "oci-layers"), "artifacts[0].format: unknown format 'oci-layers'"),
        (with_artifact("name", "../web-1.aci"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", "dir/web-1.aci"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", ".hidden"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", ""), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", 7, index=1), f"artifacts[1].name: {NAME_RULE}"),
        (with_artifact("name", "web-1.aci\0.sh"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", "web-1\n.aci"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", "web-1.aci\n"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", "\x1b[2Jweb-1.aci"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", ".."), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", "."), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", "..\\web-1.aci"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", "web 1.aci"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", "wéb-1.aci"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", "\ud800.aci"), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("name", "a" * 256), f"artifacts[0].name: {NAME_RULE}"),
        (with_artifact("format", "aci", index=1), "artifacts[1].format: a second 'aci' artifact"),
        (with_value("host", "web-1\0"), f"host: {HOST_RULE}"),
        (with_value("host", "../web-1"), f"host: {HOST_RULE}"),
        (with_value("host", "Web-1"), f"host: {HOST_RULE}"),
        (with_value("host", ""), f"host: {HOST_RULE}"),
        (with_value("host", "-web"), f"host: {HOST_RULE}"),
        (with_value("host", "web-1\n"), f"host: {HOST_RULE}"),
        (with_value("host", "w" * 64), f"host: {HOST_RULE}"),
        (with_value("derivation", DRV + "\0"), f"derivation: {DRV_RULE}"),
        (with_value("derivation", DRV + "\n"), f"derivation: {DRV_RULE}"),
        (with_value("derivation", "\x1b]0;owned\x07"), f"derivation: {DRV_RULE}"),
        (with_value("derivation", DRV + "\u202e"), f"derivation: {DRV_RULE}"),
        (with_value("derivation", "\ud800"), f"derivation: {DRV_RULE}"),
        (with_artifact("size", -1), "artifacts[0].size: must be a non-negative integer below 2**63"),
        (with_artifact("size", "1024"), "artifacts[0].size: must be a non-negative integer below 2**63"),
        (with_artifact("size", True), "artifacts[0].size: must be a non-negative integer below 2**63"),
        (with_artifact("size", 1.5), "artifacts[0].size: must be a non-negative integer below 2**63"),
        (with_artifact("size", 10**400), "artifacts[0].size: must be a non-negative integer below 2**63"),
        (with_artifact("sha256", "A" * 64), "artifacts[0].sha256: must be 64 lowercase hex digits"),
        (with_artifact("sha256", "a" * 63), "artifacts[0].sha256: must be 64 lowercase hex digits"),
        (with_artifact("sha256", "a" * 64 + "\n"), "artifacts[0].sha256: must be 64 lowercase hex digits"),
        (with_artifact("sha256", "g" * 64), "artifacts[0].sha256: must be 64 lowercase hex digits"),
        (
            with_artifact("blob", f"blobs/sha256/{SHA_B}"),
            f"artifacts[0].blob: must be 'blobs/sha256/{SHA_A}'",
        ),
        (with_artifact("blob", DELETE), f"artifacts[0].blob: must be 'blobs/sha256/{SHA_A}'"),
        (
            with_artifact("blob", f"/blobs/sha256/{SHA_A}"),
            f"artifacts[0].blob: must be 'blobs/sha256/{SHA_A}'",
        ),
    ],
)
def test_each_validation_error_names_source_and_key(doc: dict[str, Any], message: str) -> None:
    assert error_of(doc) == f"{SRC}: {message}"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[]", "must be a JSON object"),
        (b'"release"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        (
            b"{",
            "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        ),
        (
            b"\xff\xfe\xff",
            "not valid JSON ('utf-16-le' codec can't decode byte 0xff in position 2: truncated data)",
        ),
        pytest.param(b"[" * 100_000, "not valid JSON (nested too deeply)", id="deeply-nested"),
    ],
)
def test_not_an_object(data: bytes, message: str) -> None:
    with pytest.raises(VerificationError) as exc:
        parse_release(data, SRC)
    assert str(exc.value) == f"{SRC}: {message}"


def test_unknown_keys_are_ignored_and_do_not_survive_re_serialisation() -> None:
    doc = valid_doc()
    doc["comment"] = "hi"
    doc["artifacts"][0]["extra"] = 1
    r = parse_doc(doc)
    assert r == RELEASE
    assert r.to_json() == EXPECTED_JSON


# -- property tests ---------------------------------------------------------------------------------

hexes = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
utc_times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
).map(lambda t: t.replace(microsecond=0))
zones = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
any_zone_times = st.builds(lambda t, z: t.astimezone(z), utc_times, zones)
artifacts = st.builds(
    Artifact,
    format=st.sampled_from([k.value for k in Kind]),
    name=st.from_regex(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,30}", fullmatch=True),
    size=st.integers(min_value=0, max_value=2**63 - 1),
    sha256=hexes,
)
releases = st.builds(
    Release,
    host=st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True),
    version=st.integers(min_value=1, max_value=2**63),
    commit=st.one_of(
        st.text(alphabet="0123456789abcdef", min_size=40, max_size=40),
        st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    ),
    derivation=st.text(st.characters(codec="utf-8").filter(str.isprintable), max_size=80),
    created=any_zone_times,
    expires=any_zone_times,
    artifacts=st.lists(artifacts, max_size=len(Kind), unique_by=lambda a: a.format).map(tuple),
)


@PROPERTY
@given(releases)
def test_round_trip_property(r: Release) -> None:
    data = r.to_json()
    assert data == r.to_json()
    back = parse_release(data, SRC)
    assert back == r
    assert back.created.tzinfo is UTC and back.expires.tzinfo is UTC
    assert back.to_json() == data
    assert data.endswith(b"}\n")
    # Canonical: what json.dumps makes of it with sorted keys and indent 2.
    assert json.dumps(json.loads(data), indent=2, sort_keys=True).encode() + b"\n" == data


def test_times_are_written_in_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        plus_two = datetime(2024, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
        assert format_time(plus_two) == "2024-01-02T03:04:05Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_fraction_of_a_second_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'2024-01-02T03:04:05.5Z' has a fraction of a second"):
        parse_time("2024-01-02T03:04:05.5Z")


def check_accepted(r: Release) -> None:
    """What every release the parser accepts satisfies: the fields it validates hold,
    times are UTC, and its canonical form parses back to the same release."""
    assert r.version >= 1
    assert COMMIT_RE.fullmatch(r.commit)
    assert r.created.tzinfo is UTC and r.expires.tzinfo is UTC
    for a in r.artifacts:
        assert a.format in ("aci", "appimage") and a.size >= 0 and HEX64.fullmatch(a.sha256)
        assert PLAIN_NAME.fullmatch(a.name)
    assert NAME_RE.fullmatch(r.host) and r.derivation.isprintable()
    assert len({a.format for a in r.artifacts}) == len(r.artifacts)
    data = r.to_json()
    assert parse_release(data, SRC) == r
    assert parse_release(data, SRC).to_json() == data


@PROPERTY
@given(
    st.sampled_from(["created", "expires"]),
    st.datetimes(timezones=st.one_of(st.none(), st.just(UTC), zones)),
    st.sampled_from(["auto", "seconds", "milliseconds", "microseconds"]),
    st.sampled_from(["T", " "]),
)
# Both once went wrong: a year before 1000 was written unpadded (and then refused),
# and a fraction of a second was accepted but dropped by the canonical form.
@example("created", datetime(999, 1, 1, tzinfo=UTC), "auto", "T")
@example("expires", datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC), "auto", "T")
def test_any_time_the_parser_accepts_round_trips(key: str, t: datetime, spec: str, sep: str) -> None:
    doc = valid_doc()
    doc[key] = t.isoformat(sep=sep, timespec=spec)
    try:
        r = parse_doc(doc)
    except VerificationError as exc:
        assert str(exc).startswith(f"{SRC}: {key}: ")
    else:
        check_accepted(r)


@PROPERTY
@given(st.binary(max_size=300))
def test_garbage_bytes_only_raise_verification_error(data: bytes) -> None:
    try:
        r = parse_release(data, SRC)
    except VerificationError as exc:
        assert str(exc).startswith(f"{SRC}: ")
    else:
        check_accepted(r)


json_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.sampled_from(
            [
                "aci",
                SCHEMA,
                COMMIT,
                SHA_A,
                f"blobs/sha256/{SHA_A}",
                "2024-05-01T12:00:00Z",
                "0001-01-01T00:00:00+01:00",
                "9999-12-31T23:59:59-01:00",
                "2024-05-01T12:00:00+05:30",
                "2024-05-01T12:00:00.5Z",
                "2024-05-01 12:00:00Z",
                "2024-05-01T12:00Z",
                "2024-05-01T12:00:00",
            ]
        ),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@PROPERTY
@given(
    st.sampled_from(["schema", "host", "version", "commit", "derivation", "created", "expires", "artifacts"]),
    json_values,
    st.sampled_from([None, "format", "name", "size", "sha256", "blob"]),
)
def test_mutated_release_only_raises_verification_error(key: str, value: Any, art_key: str | None) -> None:
    doc = copy.deepcopy(valid_doc())
    if art_key is None:
        doc[key] = value
    else:
        doc["artifacts"][1][art_key] = value
    try:
        r = parse_doc(doc)
    except VerificationError as exc:
        # The error names the mutated key (or, for a changed sha256, the blob that no
        # longer matches it).
        expected_key = key if art_key is None else "artifacts[1]."
        assert str(exc).startswith(f"{SRC}: {expected_key}")
    else:
        check_accepted(r)


@PROPERTY
@given(json_values)
def test_arbitrary_json_only_raises_verification_error(doc: Any) -> None:
    try:
        r = parse_doc(doc)
    except VerificationError as exc:
        assert str(exc).startswith(f"{SRC}: ")
    else:
        check_accepted(r)


# -- signed names the agent uses as paths and log fields ------------------------------------------------

# Any string at all, lone surrogates and control characters included, mixed with the
# near misses and with strings that do satisfy each rule.
any_string = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=300),
    st.text(alphabet="a-.\0\n/\\ é", max_size=8),
    st.text(st.characters(categories=["Cs", "Cc", "Cf", "Zl", "Ll"]), max_size=8),
    st.sampled_from(["", ".", "..", "../x", "x/..", "a\0b", "web-1\n", "\u202eexe.aci", "a" * 256]),
    st.from_regex(PLAIN_NAME, fullmatch=True),
    st.from_regex(NAME_RE, fullmatch=True),
)


def parsed_or_refused(doc: dict[str, Any], key: str) -> Release | None:
    """The release, or None when refused by a VerificationError naming ``key``; any other
    exception fails the test."""
    try:
        return parse_doc(doc)
    except VerificationError as exc:
        assert str(exc).startswith(f"{SRC}: {key}: "), exc
        return None


@PROPERTY
@given(any_string, st.sampled_from([0, 1]))
def test_an_artifact_name_is_a_plain_file_name_or_refused(name: str, index: int) -> None:
    r = parsed_or_refused(with_artifact("name", name, index), f"artifacts[{index}].name")
    assert (r is not None) == bool(PLAIN_NAME.fullmatch(name))
    if r is not None:
        assert r.artifacts[index].name == name
        check_accepted(r)


@PROPERTY
@given(any_string)
def test_a_host_is_a_host_name_or_refused(host: str) -> None:
    r = parsed_or_refused(with_value("host", host), "host")
    assert (r is not None) == bool(NAME_RE.fullmatch(host))
    if r is not None:
        check_accepted(r)


@PROPERTY
@given(any_string)
def test_a_derivation_is_printable_or_refused(derivation: str) -> None:
    r = parsed_or_refused(with_value("derivation", derivation), "derivation")
    assert (r is not None) == derivation.isprintable()
    if r is not None:
        check_accepted(r)


def json_object(pairs: list[tuple[str, Any]]) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"


@PROPERTY
@given(st.data(), st.booleans())
def test_a_repeated_key_is_refused_wherever_it_is(data: st.DataObject, in_artifact: bool) -> None:
    doc = valid_doc()
    obj = doc["artifacts"][0] if in_artifact else doc
    key = data.draw(st.sampled_from(sorted(obj)))
    # The repeat carries the same value or another: either way the document is refused.
    again = data.draw(st.one_of(st.just(obj[key]), json_values))
    pairs = [(k, json.dumps(v)) for k, v in obj.items()]
    pairs.insert(data.draw(st.integers(0, len(pairs))), (key, json.dumps(again)))
    text = json_object(pairs)
    if in_artifact:
        rest = [json.dumps(a) for a in doc["artifacts"][1:]]
        outer = {k: json.dumps(v) for k, v in doc.items() if k != "artifacts"}
        text = json_object([*outer.items(), ("artifacts", "[" + ", ".join([text, *rest]) + "]")])
    with pytest.raises(VerificationError) as exc:
        parse_release(text.encode(), SRC)
    assert str(exc.value) == f"{SRC}: key {key!r} appears more than once"


def test_a_repeated_key_is_refused_even_when_the_last_one_is_valid() -> None:
    # json.loads alone keeps the last "host"; another reader may keep the first.
    text = EXPECTED_JSON.decode().replace('"host": "web-1",', '"host": "web-2", "host": "web-1",')
    with pytest.raises(VerificationError, match=r": key 'host' appears more than once$"):
        parse_release(text.encode(), SRC)


# -- attestations --------------------------------------------------------------------------------

PROVENANCE_KEY = "hosts/web-1/releases/3.provenance.json"
SBOM_KEY = "hosts/web-1/releases/3.sbom.json"
ATTESTED = replace(
    RELEASE,
    attestations=(
        Attestation(AttestationKind.PROVENANCE, PROVENANCE_KEY, 4321, "c" * 64),
        Attestation(AttestationKind.SBOM, SBOM_KEY, 999, "d" * 64),
    ),
)


def attested_doc(index: int | None = None, key: str = "", value: Any = None) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ATTESTED.to_json())
    if index is not None:
        if value is DELETE:
            del doc["attestations"][index][key]
        else:
            doc["attestations"][index][key] = value
    return doc


def test_a_release_names_its_attestations_and_reads_them_back() -> None:
    data = ATTESTED.to_json()
    doc = json.loads(data)
    assert doc["attestations"] == [
        {"kind": "provenance", "path": PROVENANCE_KEY, "sha256": "c" * 64, "size": 4321},
        {"kind": "sbom", "path": SBOM_KEY, "sha256": "d" * 64, "size": 999},
    ]
    back = parse_release(data, SRC)
    assert back == ATTESTED
    assert back.to_json() == data
    assert back.attestation(AttestationKind.SBOM) == ATTESTED.attestations[1]
    assert RELEASE.attestation(AttestationKind.PROVENANCE) is None


def test_a_release_without_attestations_keeps_its_bytes() -> None:
    # Releases published before provenance are adopted, compared and verified by
    # their bytes: no empty key may appear in them.
    assert b"attestations" not in RELEASE.to_json()
    assert parse_release(EXPECTED_JSON, SRC).attestations == ()


def test_an_older_reader_sees_an_attested_release_as_before() -> None:
    # Releases are parsed by key; an agent that knows no attestations ignores them.
    doc = attested_doc()
    assert parse_doc({k: v for k, v in doc.items() if k != "attestations"}) == RELEASE


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (with_value("attestations", {}), "attestations: must be a list"),
        (with_value("attestations", ["provenance"]), "attestations[0]: must be an object"),
        (attested_doc(0, "kind", "vex"), "attestations[0].kind: unknown attestation 'vex'"),
        (attested_doc(0, "kind", DELETE), "attestations[0].kind: unknown attestation None"),
        (attested_doc(1, "kind", "provenance"), "attestations[1].kind: a second 'provenance' attestation"),
        (attested_doc(0, "path", SBOM_KEY), f"attestations[0].path: must be {PROVENANCE_KEY!r}"),
        (
            attested_doc(0, "path", "hosts/web-2/releases/3.provenance.json"),
            f"attestations[0].path: must be {PROVENANCE_KEY!r}",
        ),
        (
            attested_doc(0, "path", "../../../etc/passwd"),
            f"attestations[0].path: must be {PROVENANCE_KEY!r}",
        ),
        (attested_doc(0, "path", DELETE), f"attestations[0].path: must be {PROVENANCE_KEY!r}"),
        (attested_doc(1, "size", -1), "attestations[1].size: must be a non-negative integer below 2**63"),
        (attested_doc(1, "size", True), "attestations[1].size: must be a non-negative integer below 2**63"),
        (attested_doc(1, "sha256", "C" * 64), "attestations[1].sha256: must be 64 lowercase hex digits"),
        (attested_doc(1, "sha256", DELETE), "attestations[1].sha256: must be 64 lowercase hex digits"),
    ],
)
def test_each_attestation_error_names_source_and_key(doc: dict[str, Any], message: str) -> None:
    assert error_of(doc) == f"{SRC}: {message}"


def _attest(r: Release, kinds: list[AttestationKind], sizes: list[int], shas: list[str]) -> Release:
    return replace(
        r,
        attestations=tuple(
            Attestation(k, attestation_path(r.host, r.version, k), size, sha)
            for k, size, sha in zip(kinds, sizes, shas, strict=False)
        ),
    )


@PROPERTY
@given(
    releases,
    st.lists(st.sampled_from(AttestationKind), unique=True),
    st.lists(st.integers(0, 2**40), min_size=2, max_size=2),
    st.lists(hexes, min_size=2, max_size=2),
)
def test_attested_round_trip_property(
    r: Release, kinds: list[AttestationKind], sizes: list[int], shas: list[str]
) -> None:
    attested = _attest(r, kinds, sizes, shas)
    data = attested.to_json()
    assert parse_release(data, SRC) == attested
    assert parse_release(data, SRC).to_json() == data

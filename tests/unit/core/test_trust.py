"""Unit tests of the agent's trust rules (reconciler.core.trust), the way python-tuf tests
its TrustedMetadataSet: the whole order, each step out of order, each rule alone, and
that every refusal leaves the trusted state as it was."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from tuf.api import exceptions as tuf_exceptions

from reconciler.core.release import Artifact, Release, new_release
from reconciler.core.trust import (
    Downloaded,
    Expected,
    Latest,
    Pinned,
    Reason,
    RefusalError,
    TrustedState,
    check_release,
    expired,
    refusal,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
BLOB = b"\x7fELF an AppImage"
SHA = hashlib.sha256(BLOB).hexdigest()
FAILED = hashlib.sha256(b"an AppImage that failed here").hexdigest()
BLOB_URL = f"https://store.example/blobs/sha256/{SHA}"


def release(
    host: str = "web-1",
    version: int = 5,
    expires: datetime = NOW + timedelta(days=1),
    fmt: str = "appimage",
    sha256: str = SHA,
) -> Release:
    art = Artifact(fmt, f"{host}-{version}-x86_64.AppImage", len(BLOB), sha256)
    return Release(host, version, "c" * 40, "/nix/store/x.drv", NOW - timedelta(hours=1), expires, (art,))


def entry(data: bytes) -> Expected:
    """What a signed TUF entry over ``data`` says."""
    return Expected(len(data), hashlib.sha256(data).hexdigest())


def pinned(running: int = 4, fmt: str = "appimage", failed: frozenset[str] = frozenset()) -> Pinned:
    return Pinned("web-1", fmt, running, failed)


def state(**kw: Any) -> TrustedState:
    return TrustedState(pinned(**kw), NOW)


def targeted(version: int = 5, **kw: Any) -> TrustedState:
    """A state that took the host's entry naming ``version``."""
    s = state(**kw)
    s.update_target(version)
    return s


def take(s: TrustedState, r: Release) -> Release:
    data = r.to_json()
    return s.update_release(data, entry(data))


def with_release(**kw: Any) -> TrustedState:
    s = targeted(**kw)
    take(s, release())
    return s


def snapshot(s: TrustedState) -> tuple[object, ...]:
    return (s.latest, s.release, s.artifact)


def refused(s: TrustedState, step: Callable[[], object]) -> tuple[str, str]:
    """Run ``step``, which must be refused without changing ``s``."""
    before = snapshot(s)
    with pytest.raises(RefusalError) as err:
        step()
    assert snapshot(s) == before, "a refusal changed the trusted state"
    return err.value.reason, str(err.value)


# -- the whole order, and out of order -------------------------------------------------


def test_update() -> None:
    s = state()
    assert snapshot(s) == (None, None, None)
    assert s.update_target(5) == Latest(5, new=True)
    r = take(s, release())
    assert r == release() and s.release == r
    assert s.artifact is None, "not trusted before its bytes were checked"
    art = s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))
    assert art == r.artifact("appimage") and s.artifact == art


def test_out_of_order_ops() -> None:
    data = release().to_json()
    s = state()
    with pytest.raises(RuntimeError):
        s.update_release(data, entry(data))
    with pytest.raises(RuntimeError):
        s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))
    s.update_target(5)
    with pytest.raises(RuntimeError):
        s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))
    s.update_release(data, entry(data))
    with pytest.raises(RuntimeError):
        s.update_target(5)
    with pytest.raises(RuntimeError):
        s.update_release(data, entry(data))
    s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))
    with pytest.raises(RuntimeError):
        s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))


def test_the_entry_may_be_taken_again_until_a_release_is_trusted() -> None:
    s = state()
    s.update_target(9)
    assert s.update_target(5) == Latest(5, new=True)
    take(s, release())


def test_a_release_is_not_fetched_for_what_runs() -> None:
    s = state()
    assert s.update_target(4) == Latest(4, new=False)
    with pytest.raises(RuntimeError):
        take(s, release(version=4))


def test_an_older_number_is_new_and_left_to_the_release_rules() -> None:
    # The entry's number only says which file to read; the release it holds decides.
    s = state()
    assert s.update_target(3) == Latest(3, new=True)
    assert refused(s, lambda: take(s, release(version=3))) == (
        "rollback",
        "version 3 is not newer than the running 4",
    )


# -- the host's entry --------------------------------------------------------------------


def test_an_entry_with_no_valid_release_number_is_malformed() -> None:
    s = state()
    assert refused(s, lambda: s.update_target(None)) == (
        "malformed",
        "hosts/web-1/latest.json: no valid release number",
    )


# -- the release: its bytes against the entry ------------------------------------------


def test_release_bytes_other_than_the_entry_says_are_tampered() -> None:
    data = release().to_json()
    s = targeted()
    other = "0" * 64
    assert refused(s, lambda: s.update_release(data, Expected(len(data), other))) == (
        "tampered",
        f"hosts/web-1/releases/5.json: {len(data)} bytes, sha256 {entry(data).sha256}; "
        f"the signed entry says {len(data)} bytes, sha256 {other}",
    )
    assert refused(s, lambda: s.update_release(data[:-1], entry(data)))[0] == "tampered"


def test_the_bytes_are_judged_before_they_are_parsed() -> None:
    s = targeted()
    assert refused(s, lambda: s.update_release(b"not json", entry(b"json")))[0] == "tampered"


@pytest.mark.parametrize(
    "data", [b"", b"{}", b"[1]", b"[" * 100_000, json.dumps({"schema": "other"}).encode()]
)
def test_malformed_release(data: bytes) -> None:
    s = targeted()
    reason, message = refused(s, lambda: s.update_release(data, entry(data)))
    assert reason == "malformed" and message.startswith("hosts/web-1/releases/5.json: ")


def test_a_release_file_holding_another_number_is_the_wrong_version() -> None:
    # releases/7.json serves the genuine release 5 (an alias of a release that failed
    # here, or an old one replayed under a new number).
    s = targeted(7)
    assert refused(s, lambda: take(s, release(version=5))) == (
        "wrong-version",
        "hosts/web-1/releases/7.json holds release 5, not 7",
    )


# -- the release: each rule alone --------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "kw", "reason", "message"),
    [
        (release(host="web-2"), {}, "wrong-host", "release is for host 'web-2', this is 'web-1'"),
        (release(version=3), {}, "rollback", "version 3 is not newer than the running 4"),
        (
            release(sha256=FAILED),
            {"failed": frozenset({FAILED})},
            "failed-before",
            f"release 5 runs {FAILED[:12]}, which failed its health check here before",
        ),
        (release(expires=NOW), {}, "expired", "release 5 expired at 2026-11-24T12:00:00+00:00"),
        (release(), {"fmt": "aci"}, "no-artifact", "release 5 has no aci artifact"),
    ],
)
def test_each_rule_alone(r: Release, kw: dict[str, Any], reason: str, message: str) -> None:
    assert refusal_of(r, **kw) == (reason, message)
    # The same release is refused by the whole state, which stays as it was.
    s = targeted(r.version, **kw)
    assert refused(s, lambda: take(s, r)) == (reason, message)


def refusal_of(
    r: Release, running: int = 4, fmt: str = "appimage", failed: frozenset[str] = frozenset()
) -> tuple[str, str]:
    with pytest.raises(RefusalError) as err:
        check_release(r, pinned(running, fmt, failed), NOW, number=r.version)
    return err.value.reason, str(err.value)


def test_the_host_is_named_first() -> None:
    # Another host's release is named as such, whatever else is wrong with it.
    r = release(host="web-2", version=2, expires=NOW, sha256=FAILED)
    assert refusal_of(r, failed=frozenset({FAILED}))[0] == "wrong-host"


def test_a_failure_is_remembered_by_artifact_not_by_number() -> None:
    # Another artifact under the number that failed is fine; the failed artifact under
    # any number is not.
    assert check_release(release(version=5), pinned(failed=frozenset({FAILED})), NOW, number=5).sha256 == SHA
    assert refusal_of(release(version=6, sha256=FAILED), failed=frozenset({FAILED}))[0] == "failed-before"


def test_a_refused_release_leaves_room_for_the_good_one() -> None:
    s = targeted()
    refused(s, lambda: take(s, release(expires=NOW)))
    good = release().to_json()
    refused(s, lambda: s.update_release(good, entry(good + b" ")))
    assert take(s, release()) == release()


def test_the_release_is_checked_at_the_time_the_state_was_made() -> None:
    s = TrustedState(pinned(), NOW - timedelta(days=2))
    s.update_target(5)
    take(s, release(expires=NOW - timedelta(days=1)))


# -- the artifact ----------------------------------------------------------------------


def test_artifact_of_another_size_is_tampered() -> None:
    s = with_release()
    assert refused(s, lambda: s.update_artifact(Downloaded(BLOB_URL, len(BLOB) + 1, SHA))) == (
        "tampered",
        f"{BLOB_URL}: {len(BLOB) + 1} bytes, release says {len(BLOB)}",
    )


def test_artifact_with_another_digest_is_tampered() -> None:
    s = with_release()
    other = "0" * 64
    assert refused(s, lambda: s.update_artifact(Downloaded(BLOB_URL, len(BLOB), other))) == (
        "tampered",
        f"{BLOB_URL}: sha256 {other}, release says {SHA}",
    )


def test_the_artifact_is_the_one_in_the_pinned_format() -> None:
    aci = Artifact("aci", "web-1-5.aci", 3, "b" * 64)
    r = replace(release(), artifacts=(aci, *release().artifacts))
    s = targeted()
    take(s, r)
    assert s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA)).format == "appimage"


# -- python-tuf's refusals of the metadata -----------------------------------------------


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (tuf_exceptions.ExpiredMetadataError("timestamp.json is expired"), "expired"),
        (tuf_exceptions.BadVersionNumberError("new timestamp version 2 must be >= 3"), "rollback"),
        (tuf_exceptions.EqualVersionNumberError(), "rollback"),
        (tuf_exceptions.UnsignedMetadataError("timestamp was signed by 0/1 keys"), "bad-signature"),
        (tuf_exceptions.LengthOrHashMismatchError("snapshot length 9 does not match"), "tampered"),
        (tuf_exceptions.RepositoryError("bins-0 is not a delegated role"), "malformed"),
    ],
)
def test_refusal_maps_tuf_refusals(exc: tuf_exceptions.RepositoryError, reason: str) -> None:
    got = refusal(exc)
    assert (got.reason, str(got)) == (reason, f"TUF metadata: {exc}")


def test_reasons_are_the_metric_labels() -> None:
    assert {str(r) for r in Reason} == {
        "malformed",
        "bad-signature",
        "wrong-host",
        "wrong-version",
        "rollback",
        "failed-before",
        "expired",
        "no-artifact",
        "tampered",
        "no-provenance",
        "bad-provenance",
        "not-in-log",
        "split-view",
    }


# -- properties --------------------------------------------------------------------------

VERSIONS = st.integers(1, 10**9)
HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def release_like(draw: st.DrawFn) -> bytes:
    """Release 5 of web-1 with one field, or one of its artifact's, replaced by any JSON."""
    doc = json.loads(release().to_json())
    where = doc if draw(st.booleans()) else doc["artifacts"][0]
    key = draw(st.sampled_from(sorted(where)) | st.text(max_size=10))
    where[key] = draw(JSON)
    return json.dumps(doc).encode()


@given(st.binary(max_size=300) | release_like())
def test_any_bytes_are_a_release_or_a_refusal(data: bytes) -> None:
    # Whatever a compromised online key signs: the agent gets a release or a refusal,
    # never another exception.
    s = targeted()
    try:
        r = s.update_release(data, entry(data))
    except RefusalError as exc:
        assert exc.reason in set(Reason)
        assert s.release is None
    else:
        assert (r.host, r.version) == ("web-1", 5) and s.release == r


@given(st.binary(max_size=300), st.integers(0, 400), HEX64)
def test_bytes_other_than_the_entry_says_are_tampered(data: bytes, length: int, sha256: str) -> None:
    assume((length, sha256) != (len(data), entry(data).sha256))
    s = targeted()
    assert refused(s, lambda: s.update_release(data, Expected(length, sha256)))[0] == "tampered"


@given(VERSIONS, st.integers(0, 10**9))
def test_any_version_not_newer_than_the_running_one_is_refused(version: int, running: int) -> None:
    s = TrustedState(pinned(running), NOW)
    if not s.update_target(version).new:
        assert version == running
        return
    if version > running:
        assert take(s, release(version=version)).version == version
    else:
        assert refused(s, lambda: take(s, release(version=version)))[0] == "rollback"


@given(st.frozensets(HEX64, min_size=1, max_size=20), VERSIONS, st.data())
def test_a_failed_artifact_is_never_accepted(
    failed: frozenset[str], version: int, data: st.DataObject
) -> None:
    sha256 = data.draw(st.sampled_from(sorted(failed)))
    s = TrustedState(pinned(0, failed=failed), NOW)
    s.update_target(version)
    assert refused(s, lambda: take(s, release(version=version, sha256=sha256)))[0] == "failed-before"


@given(st.integers(-10 * 365 * 86400, 10 * 365 * 86400))
def test_a_release_is_accepted_exactly_until_it_expires(seconds: int) -> None:
    # Release times have whole seconds: the signed bytes hold no more.
    left = timedelta(seconds=seconds)
    r = release(expires=NOW + left)
    s = targeted()
    assert expired(r, NOW) == (left <= timedelta(0))
    if left > timedelta(0):
        take(s, r)
    else:
        assert refused(s, lambda: take(s, r))[0] == "expired"


def test_the_expiry_boundary() -> None:
    r = new_release("web-1", 5, "c" * 40, "/x.drv", release().artifacts, NOW, timedelta(days=1))
    assert not expired(r, r.expires - timedelta(microseconds=1))
    assert expired(r, r.expires)

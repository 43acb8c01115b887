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

from reconciler.core.release import Artifact, Release, new_release
from reconciler.core.trust import (
    Downloaded,
    Latest,
    Pinned,
    Reason,
    RefusalError,
    SignatureVerdict,
    TrustedState,
    check_release,
    expired,
    peek_version,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
BLOB = b"\x7fELF an AppImage"
SHA = hashlib.sha256(BLOB).hexdigest()
GOOD = SignatureVerdict.good("0123456789ABCDEF0123456789ABCDEF01234567")
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


def latest(version: int = 5) -> bytes:
    return json.dumps({"version": version}).encode()


def pinned(running: int = 4, fmt: str = "appimage", failed: frozenset[int] = frozenset()) -> Pinned:
    return Pinned("web-1", fmt, running, failed)


def state(**kw: Any) -> TrustedState:
    return TrustedState(pinned(**kw), NOW)


def loaded(**kw: Any) -> TrustedState:
    """A state that took latest.json naming version 5."""
    s = state(**kw)
    s.update_latest(latest())
    return s


def with_release(**kw: Any) -> TrustedState:
    s = loaded(**kw)
    s.update_release(release().to_json(), GOOD)
    return s


def with_digest() -> TrustedState:
    s = with_release()
    s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))
    return s


def snapshot(s: TrustedState) -> tuple[object, ...]:
    return (s.latest, s.release, s.artifact, s._downloaded)


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
    assert snapshot(s) == (None, None, None, None)
    assert s.update_latest(latest()) == Latest(5, new=True)
    r = s.update_release(release().to_json(), GOOD)
    assert r == release() and s.release == r
    art = s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))
    assert art == r.artifact("appimage")
    assert s.artifact is None, "not trusted before its signature"
    assert s.update_artifact_signature(GOOD) == art
    assert s.artifact == art


def test_out_of_order_ops() -> None:
    s = state()
    with pytest.raises(RuntimeError):
        s.update_release(release().to_json(), GOOD)
    with pytest.raises(RuntimeError):
        s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))
    with pytest.raises(RuntimeError):
        s.update_artifact_signature(GOOD)
    s.update_latest(latest())
    with pytest.raises(RuntimeError):
        s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))
    s.update_release(release().to_json(), GOOD)
    with pytest.raises(RuntimeError):
        s.update_latest(latest())
    with pytest.raises(RuntimeError):
        s.update_release(release().to_json(), GOOD)
    with pytest.raises(RuntimeError):
        s.update_artifact_signature(GOOD)
    s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))
    with pytest.raises(RuntimeError):
        s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA))
    s.update_artifact_signature(GOOD)
    with pytest.raises(RuntimeError):
        s.update_artifact_signature(GOOD)


def test_latest_may_be_taken_again_until_a_release_is_trusted() -> None:
    s = state()
    s.update_latest(latest(9))
    assert s.update_latest(latest(5)) == Latest(5, new=True)
    s.update_release(release().to_json(), GOOD)


@pytest.mark.parametrize("version", [4, 3])
def test_a_release_is_not_fetched_for_what_is_not_new(version: int) -> None:
    s = state(failed=frozenset({3}))
    assert s.update_latest(latest(version)) == Latest(version, new=False)
    with pytest.raises(RuntimeError):
        s.update_release(release(version=version).to_json(), GOOD)


# -- latest.json -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"{}", b'{"version": "7"}', b'{"version": 0}', b'{"version": true}', b"[" * 100_000],
)
def test_latest_with_no_valid_version_is_malformed(data: bytes) -> None:
    s = state()
    assert refused(s, lambda: s.update_latest(data)) == (
        "malformed",
        "hosts/web-1/latest.json: no valid version",
    )


def test_peek_version() -> None:
    assert peek_version(b'{"version": 7, "commit": "x"}', "latest.json") == 7


@given(st.binary(max_size=200))
def test_peek_version_answers_a_version_or_refuses(data: bytes) -> None:
    try:
        version = peek_version(data, "x")
    except RefusalError as exc:
        assert exc.reason == "malformed"
    else:
        assert isinstance(version, int) and version >= 1


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(), st.lists, max_leaves=5))
def test_peek_version_accepts_exactly_a_positive_integer_version(value: object) -> None:
    data = json.dumps({"version": value}).encode()
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if ok:
        assert peek_version(data, "x") == value
    else:
        with pytest.raises(RefusalError):
            peek_version(data, "x")


# -- the release: each rule alone --------------------------------------------------------


def test_unsigned_release() -> None:
    s = loaded()
    verdict = SignatureVerdict.missing("HTTP 404 Not Found")
    assert refused(s, lambda: s.update_release(release().to_json(), verdict)) == (
        "unsigned",
        "hosts/web-1/releases/5.json: no signature (HTTP 404 Not Found)",
    )


def test_badly_signed_release() -> None:
    s = loaded()
    verdict = SignatureVerdict.bad("x: bad signature (signed by a key that is not trusted)")
    assert refused(s, lambda: s.update_release(release().to_json(), verdict)) == (
        "bad-signature",
        "x: bad signature (signed by a key that is not trusted)",
    )


def test_the_signature_is_judged_before_the_bytes_are_read() -> None:
    s = loaded()
    bad = SignatureVerdict.bad("bad signature")
    assert refused(s, lambda: s.update_release(b"not json", bad))[0] == "bad-signature"


@pytest.mark.parametrize("data", [b"", b"{}", b"[1]", json.dumps({"schema": "other"}).encode()])
def test_malformed_release(data: bytes) -> None:
    s = loaded()
    reason, message = refused(s, lambda: s.update_release(data, GOOD))
    assert reason == "malformed" and message.startswith("hosts/web-1/releases/5.json: ")


@pytest.mark.parametrize(
    ("r", "kw", "reason", "message"),
    [
        (release(host="web-2"), {}, "wrong-host", "release is for host 'web-2', this is 'web-1'"),
        (release(), {"running": 5}, "rollback", "version 5 is not newer than the running 5"),
        (release(version=3), {}, "rollback", "version 3 is not newer than the running 4"),
        (
            release(),
            {"failed": frozenset({5})},
            "failed-before",
            "version 5 failed its health check here before",
        ),
        (release(expires=NOW), {}, "expired", "release 5 expired at 2026-11-24T12:00:00+00:00"),
        (release(), {"fmt": "aci"}, "no-artifact", "release 5 has no aci artifact"),
    ],
)
def test_each_rule_alone(r: Release, kw: dict[str, Any], reason: str, message: str) -> None:
    assert refusal(r, **kw) == (reason, message)
    # The same release is refused by the whole state, which stays as it was. (latest.json
    # names version 9: what it claims is only a hint, the signed release decides.)
    s = state(**kw)
    s.update_latest(latest(9))
    assert refused(s, lambda: s.update_release(r.to_json(), GOOD)) == (reason, message)


def refusal(
    r: Release, running: int = 4, fmt: str = "appimage", failed: frozenset[int] = frozenset()
) -> tuple[str, str]:
    with pytest.raises(RefusalError) as err:
        check_release(r, pinned(running, fmt, failed), NOW)
    return err.value.reason, str(err.value)


def test_the_host_is_named_first() -> None:
    # Another host's release is named as such, whatever else is wrong with it.
    assert refusal(release(host="web-2", version=2, expires=NOW), failed=frozenset({2}))[0] == "wrong-host"


def test_a_refused_release_leaves_room_for_the_good_one() -> None:
    s = loaded()
    refused(s, lambda: s.update_release(release(expires=NOW).to_json(), GOOD))
    refused(s, lambda: s.update_release(release().to_json(), SignatureVerdict.bad("bad")))
    assert s.update_release(release().to_json(), GOOD) == release()


def test_the_release_is_checked_at_the_time_the_state_was_made() -> None:
    s = TrustedState(pinned(), NOW - timedelta(days=2))
    s.update_latest(latest())
    s.update_release(release(expires=NOW - timedelta(days=1)).to_json(), GOOD)


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


def test_artifact_signature() -> None:
    s = with_digest()
    assert refused(s, lambda: s.update_artifact_signature(SignatureVerdict.bad("x: bad signature"))) == (
        "tampered",
        "x: bad signature",
    )
    assert refused(s, lambda: s.update_artifact_signature(SignatureVerdict.missing("gone")))[0] == "unsigned"
    assert s.artifact is None
    s.update_artifact_signature(GOOD)
    assert s.artifact is not None


def test_the_artifact_is_the_one_in_the_pinned_format() -> None:
    aci = Artifact("aci", "web-1-5.aci", 3, "b" * 64)
    r = replace(release(), artifacts=(aci, *release().artifacts))
    s = loaded()
    s.update_release(r.to_json(), GOOD)
    assert s.update_artifact(Downloaded(BLOB_URL, len(BLOB), SHA)).format == "appimage"


def test_reasons_are_the_metric_labels() -> None:
    assert {str(r) for r in Reason} == {
        "malformed",
        "unsigned",
        "bad-signature",
        "wrong-host",
        "rollback",
        "failed-before",
        "expired",
        "no-artifact",
        "tampered",
    }


# -- properties --------------------------------------------------------------------------

VERSIONS = st.integers(1, 10**9)


@given(VERSIONS, st.integers(0, 10**9), VERSIONS)
def test_any_version_not_newer_than_the_running_one_is_refused(
    version: int, running: int, claimed: int
) -> None:
    # latest.json may claim anything; the signed release says ``version``.
    assume(claimed != running)
    s = TrustedState(pinned(running), NOW)
    assert s.update_latest(latest(claimed)).new
    data = release(version=version).to_json()
    if version > running:
        assert s.update_release(data, GOOD).version == version
    else:
        assert refused(s, lambda: s.update_release(data, GOOD))[0] == "rollback"


@given(st.frozensets(VERSIONS, min_size=1, max_size=20), st.integers(0, 10**9), st.data())
def test_a_failed_version_is_never_accepted(
    failed: frozenset[int], running: int, data: st.DataObject
) -> None:
    version = data.draw(st.sampled_from(sorted(failed)))
    claimed = data.draw(VERSIONS | st.just(version))  # latest.json may name any version
    s = TrustedState(pinned(running, failed=failed), NOW)
    if not s.update_latest(latest(claimed)).new:
        return
    reason = refused(s, lambda: s.update_release(release(version=version).to_json(), GOOD))[0]
    assert reason in ("rollback", "failed-before")


@given(st.integers(-10 * 365 * 86400, 10 * 365 * 86400))
def test_a_release_is_accepted_exactly_until_it_expires(seconds: int) -> None:
    # Release times have whole seconds: the signed bytes hold no more.
    left = timedelta(seconds=seconds)
    r = release(expires=NOW + left)
    s = loaded()
    assert expired(r, NOW) == (left <= timedelta(0))
    if left > timedelta(0):
        s.update_release(r.to_json(), GOOD)
    else:
        assert refused(s, lambda: s.update_release(r.to_json(), GOOD))[0] == "expired"


def test_the_expiry_boundary() -> None:
    r = new_release("web-1", 5, "c" * 40, "/x.drv", release().artifacts, NOW, timedelta(days=1))
    assert not expired(r, r.expires - timedelta(microseconds=1))
    assert expired(r, r.expires)

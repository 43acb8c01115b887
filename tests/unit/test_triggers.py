"""Unit tests for webhook authentication and the debounced wake-up."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.daemon.triggers import (
    Push,
    Unauthorized,
    Wakeup,
    authenticate,
    authorization,
    check_bearer,
    concerns,
)

SECRET = b"s3cret"
BODY = json.dumps({"ref": "refs/heads/main", "after": "a" * 40}).encode()


def sig(body: bytes, secret: bytes = SECRET) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_github_push_with_a_good_signature() -> None:
    headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=" + sig(BODY)}
    assert authenticate(headers, BODY, SECRET) == Push("github", "refs/heads/main", "push")


def test_gitea_push_with_a_good_signature() -> None:
    headers = {"X-Gitea-Event": "push", "X-Gitea-Signature": sig(BODY), "X-Hub-Signature-256": "sha256=x"}
    assert authenticate(headers, BODY, SECRET) == Push("gitea", "refs/heads/main", "push")


def test_gitlab_push_with_the_token() -> None:
    headers = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "s3cret"}
    assert authenticate(headers, BODY, SECRET) == Push("gitlab", "refs/heads/main", "Push Hook")


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        (
            {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=" + sig(BODY, b"other")},
            "github: X-Hub-Signature-256 does not match the body",
        ),
        ({"X-GitHub-Event": "push"}, "github: missing X-Hub-Signature-256 header"),
        # No sha256= prefix.
        ({"X-GitHub-Event": "push", "X-Hub-Signature-256": sig(BODY)}, "X-Hub-Signature-256 does not match"),
        (
            {"X-Gitea-Event": "push", "X-Gitea-Signature": sig(BODY + b" ")},
            "gitea: X-Gitea-Signature does not",
        ),
        ({"X-Gitea-Event": "push"}, "gitea: missing X-Gitea-Signature header"),
        ({"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "wrong"}, "gitlab: X-Gitlab-Token is not the"),
        ({"X-Gitlab-Event": "Push Hook"}, "gitlab: missing X-Gitlab-Token header"),
        ({"Content-Type": "application/json"}, "no X-GitHub-Event, X-Gitea-Event, X-Gitlab-Event header"),
        # Not ASCII (http.server decodes header bytes as Latin-1): wrong, not a crash.
        ({"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=\x80"}, "github"),
        ({"X-Gitea-Event": "push", "X-Gitea-Signature": "é" * 64}, "gitea"),
        ({"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "s3cr\udcff"}, "gitlab"),
    ],
)
def test_bad_or_missing_credentials_are_unauthorized(headers: dict[str, str], why: str) -> None:
    with pytest.raises(Unauthorized) as err:
        authenticate(headers, BODY, SECRET)
    assert why in str(err.value)
    assert "\n" not in str(err.value)


@given(
    st.binary(min_size=1, max_size=40),
    st.text("0123456789abcdef", min_size=16, max_size=70),
    st.sampled_from(
        [
            ("X-GitHub-Event", "X-Hub-Signature-256"),
            ("X-Gitea-Event", "X-Gitea-Signature"),
            ("X-Gitlab-Event", "X-Gitlab-Token"),
        ]
    ),
)
def test_a_refusal_never_tells_a_secret_or_what_was_sent(
    secret: bytes, given_value: str, forge: tuple[str, str]
) -> None:
    """The reason is the 401's body: it names the header, never the value sent (which
    may be a near-miss of the secret), the secret or the digest made with it."""
    event, credential = forge
    with pytest.raises(Unauthorized) as err:
        authenticate({event: "push", credential: given_value}, BODY, secret + b"!")
    reason = str(err.value)
    assert credential in reason
    digest = hmac.new(secret + b"!", BODY, hashlib.sha256).hexdigest()
    for told in (given_value, digest, (secret + b"!").decode(errors="replace")):
        assert told not in reason


@given(st.binary(max_size=300), st.binary(min_size=1, max_size=40))
def test_a_body_changed_after_signing_is_refused(body: bytes, extra: bytes) -> None:
    headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=" + sig(body)}
    with pytest.raises(Unauthorized):
        authenticate(headers, body + extra, SECRET)


def ref_of(body: bytes) -> str | None:
    """What a push body says its ref is: a string "ref" of a JSON object, or nothing."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    ref = doc.get("ref") if isinstance(doc, dict) else None
    return ref if isinstance(ref, str) else None


bodies = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(
        st.sampled_from(["ref", "after", "x"]), st.one_of(st.text(max_size=20), st.integers())
    ).map(lambda d: json.dumps(d).encode()),
)
secrets = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40).map(
    str.encode
)


def signed(forge: str, body: bytes, secret: bytes) -> dict[str, str]:
    if forge == "github":
        return {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=" + sig(body, secret)}
    if forge == "gitea":
        return {"X-Gitea-Event": "push", "X-Gitea-Signature": sig(body, secret)}
    return {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": secret.decode()}


@given(st.sampled_from(["github", "gitea", "gitlab"]), bodies, secrets)
def test_a_correctly_signed_push_is_accepted_with_its_ref(forge: str, body: bytes, secret: bytes) -> None:
    headers = signed(forge, body, secret)
    push = authenticate({k.lower(): v for k, v in headers.items()}, body, secret)
    event = next(v for k, v in headers.items() if k.endswith("-Event"))
    assert push == Push(forge, ref_of(body), event)


CREDENTIALS = ("X-Hub-Signature-256", "X-Gitea-Signature", "X-Gitlab-Token")


@given(
    st.dictionaries(
        st.sampled_from(
            ["X-GitHub-Event", "X-Gitea-Event", "X-Gitlab-Event", *CREDENTIALS, "x-gitlab-token"]
        ),
        st.one_of(st.text(max_size=70), st.sampled_from(["push", "Push Hook", SECRET.decode(), "sha256="])),
    ),
    bodies,
    st.data(),
)
def test_any_request_is_refused_or_carries_its_forges_credential(
    headers: dict[str, str], body: bytes, data: st.DataObject
) -> None:
    # Sometimes the right credential, so that acceptance is explored too.
    if data.draw(st.booleans()):
        right = {"X-Hub-Signature-256": "sha256=" + sig(body), "X-Gitea-Signature": sig(body)}
        right["X-Gitlab-Token"] = SECRET.decode()
        key = data.draw(st.sampled_from(CREDENTIALS))
        headers[key] = right[key]
    try:
        push = authenticate(headers, body, SECRET)
    except Unauthorized:
        return
    h = {k.lower(): v for k, v in headers.items()}
    credential = {
        "github": ("x-hub-signature-256", "sha256=" + sig(body)),
        "gitea": ("x-gitea-signature", sig(body)),
        "gitlab": ("x-gitlab-token", SECRET.decode()),
    }[push.forge]
    assert h.get(credential[0]) == credential[1]
    assert push.event == h[f"x-{push.forge}-event"]
    assert push.ref == ref_of(body)


def test_only_pushes_to_the_tracked_branch_concern_us() -> None:
    assert concerns(Push("github", "refs/heads/main", "push"), "main")
    assert not concerns(Push("github", "refs/heads/dev", "push"), "main")
    assert not concerns(Push("github", "refs/tags/main", "push"), "main")
    assert not concerns(Push("github", None, "ping"), "main")


def test_wakeup_times_out_empty() -> None:
    w = Wakeup(quiet=0.05, max_delay=1)
    t = time.monotonic()
    assert w.wait(0.1) == []
    assert time.monotonic() - t >= 0.1


def test_a_burst_is_debounced_into_one_wakeup() -> None:
    w = Wakeup(quiet=0.2, max_delay=5)

    def burst() -> None:
        for _ in range(10):
            w.notify("webhook")
            time.sleep(0.02)

    sender = threading.Thread(target=burst)
    sender.start()
    assert w.wait(5) == ["webhook"] * 10
    sender.join()
    # Nothing is left over for the next wait: it would return it (after the quiet
    # period) instead of timing out at once.
    assert w.wait(0) == []


def test_a_steady_stream_still_wakes_after_max_delay() -> None:
    w = Wakeup(quiet=0.5, max_delay=0.3)
    stop = threading.Event()
    # The stream never goes quiet for `quiet` seconds while it lasts (up to 10 s,
    # so a wait that ignores max_delay ends with it instead of hanging the test).
    intervals = 200

    def stream() -> None:
        for _ in range(intervals):
            if stop.is_set():
                return
            w.notify("filesystem")
            time.sleep(0.05)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        reasons = w.wait(5)
        # Woken while triggers kept coming: max_delay, not quiet, ended the wait.
        assert sender.is_alive(), "the wait lasted as long as the stream"
    finally:
        stop.set()
        sender.join()
    assert reasons and set(reasons) == {"filesystem"}
    assert len(reasons) < intervals


def test_the_reconcile_token_is_a_bearer_token() -> None:
    check_bearer({"Authorization": "Bearer s3cret"}, SECRET)
    check_bearer({"authorization": "bearer  s3cret "}, SECRET)


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({}, "no Authorization header"),
        ({"Authorization": "Basic czNjcmV0"}, "not a Bearer token"),
        ({"Authorization": "s3cret"}, "not a Bearer token"),
        ({"Authorization": "Bearer s3cre"}, "wrong token"),
        ({"Authorization": "Bearer s3cret2"}, "wrong token"),
        ({"Authorization": "Bearer "}, "wrong token"),
        ({"Authorization": "Bearer s3cr\udcff"}, "wrong token"),
    ],
)
def test_a_missing_or_wrong_reconcile_token_is_unauthorized(headers: dict[str, str], why: str) -> None:
    with pytest.raises(Unauthorized, match=why):
        check_bearer(headers, SECRET)


@pytest.mark.parametrize(
    ("headers", "parsed"),
    [
        ({}, None),
        ({"Accept": "*/*"}, None),
        ({"AUTHORIZATION": " Basic  b3BzOng= "}, ("basic", "b3BzOng=")),
        ({"authorization": "BEARER tok3n"}, ("bearer", "tok3n")),
        ({"Authorization": "tok3n"}, ("tok3n", "")),
        ({"Authorization": ""}, ("", "")),
        ({"Authorization": "Bearer t\u00f6k\udcff"}, ("bearer", "t\u00f6k\udcff")),
    ],
)
def test_the_authorization_header_is_read_as_a_scheme_and_a_credential(
    headers: dict[str, str], parsed: tuple[str, str] | None
) -> None:
    # One reading for POST /reconcile's token and the fleet page's token or password.
    assert authorization(headers) == parsed

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.urls import without_credentials


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:token@git.example/fleet.git", "https://git.example/fleet.git"),
        ("https://token@git.example:8443/fleet.git", "https://git.example:8443/fleet.git"),
        ("http://a:b@[::1]:80/fleet", "http://[::1]:80/fleet"),
        ("https://a@b@git.example/fleet", "https://git.example/fleet"),
        ("https://u:p@[::1/fleet", "https://[::1/fleet"),  # not a URL urllib reads
        ("https://git.example/fleet.git", "https://git.example/fleet.git"),
        # Over ssh the user is not a secret; a password is.
        ("ssh://git@git.example/fleet.git", "ssh://git@git.example/fleet.git"),
        ("ssh://git:pw@git.example:22/fleet.git", "ssh://git@git.example:22/fleet.git"),
        ("git@git.example:fleet.git", "git@git.example:fleet.git"),
        ("/srv/fleet", "/srv/fleet"),
        ("file:///srv/fleet", "file:///srv/fleet"),
    ],
)
def test_a_shown_repository_url_carries_no_credentials(url: str, shown: str) -> None:
    assert without_credentials(url) == shown


SECRET = "S3cr3tT0k3n"


@given(
    scheme=st.sampled_from(["http", "https", "ssh", "git"]),
    user=st.text(st.characters(blacklist_characters="@/:?#"), max_size=8),
    host=st.from_regex(r"[a-z0-9.-]{1,20}(:[0-9]{1,5})?|\[[0-9a-f:]{2,20}\](:[0-9]{1,5})?", fullmatch=True),
    path=st.text(st.characters(blacklist_characters="@"), max_size=20),
)
def test_no_password_survives(scheme: str, user: str, host: str, path: str) -> None:
    url = f"{scheme}://{user}:{SECRET}@{host}/{path}"
    assert SECRET not in without_credentials(url)

"""What of a URL may be shown: in logs, errors, status, provenance. Pure.

An operator may write a repository's credential into its URL
(``https://user:token@host/fleet.git``), though ``repo.credentials_file`` is the
place for it: git is given the URL as written, and everyone else this.
"""

from __future__ import annotations

import urllib.parse


def without_credentials(url: str) -> str:
    """``url`` without a password before its host (``scheme://user:pw@host``), and over
    http(s) without the user too (a token is often given as one). Any other text (a
    local path, an scp-like ``git@host:path``, which holds no password) as it is."""
    if "://" not in url:
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        # Not a URL urllib reads (an unclosed "[", say): all that precedes an "@" in
        # what would be its host part goes.
        scheme, _, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path}"
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    kept = f"{user}@" if user and parts.scheme not in ("http", "https") else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=kept + host))

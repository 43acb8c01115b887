"""What the App Container spec (appc 0.8) asks of our ACIs, beyond the store's keys
(reconciler.core.layout): AC Names and Identifiers, image names under a prefix, port protocols, and the
HTML page that answers appc discovery. Pure.

Discovery (appc spec/discovery.md): a client resolving ``example.com/fleet/web-1``
fetches ``https://example.com/fleet/web-1?ac-discovery=1``, then each parent path in
turn until a page has ``ac-discovery`` meta tags; a tag whose prefix the name starts
with gives a URL template, rendered with the name and the image's labels, ``{ext}``
being ``aci`` or ``aci.asc``. Our template is ``<store URL>{name}-{version}-{os}-{arch}.{ext}``,
so the store holds each ACI at ``<name>-<N>-linux-amd64.aci`` (SPEC, "Additions").
"""

from __future__ import annotations

import html
import re
from enum import StrEnum

# appc schema/types: an ACIdentifier (image names, annotation and isolator names) is
# lowercase words joined by -._~/ ; an ACName (port names) words joined by - only.
AC_IDENTIFIER_RE = re.compile(r"^[a-z0-9]+(?:[-._~/][a-z0-9]+)*$")
AC_NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
# The default prefix names a machine's own store: discovery of localhost/fleet/<host>
# works when the store is served on that machine, and any operator who publishes for
# others sets a domain they control (README, "Images").
DEFAULT_NAME_PREFIX = "localhost/fleet"
# The ACI template; {name} is the whole image name, prefix included (spec/discovery.md).
TEMPLATE = "{name}-{version}-{os}-{arch}.{ext}"


class PortProtocol(StrEnum):
    """The transport of an ACI's port (appc ``app.ports[].protocol``)."""

    TCP = "tcp"
    UDP = "udp"


def is_ac_identifier(value: str) -> bool:
    return bool(AC_IDENTIFIER_RE.fullmatch(value))


def is_ac_name(value: str) -> bool:
    return bool(AC_NAME_RE.fullmatch(value))


def image_name(prefix: str, host: str) -> str:
    """The ACI name of ``host``: ``example.com/fleet`` + ``web-1``."""
    return f"{prefix}/{host}"


def default_store_url(prefix: str) -> str:
    """Where the store is served when the configuration does not say: the root of the
    prefix's domain, which also answers the discovery URL of every name under it."""
    return f"https://{prefix.split('/', 1)[0]}/"


def discovery_page(prefix: str, store_url: str, public_key: str) -> bytes:
    """The HTML page that answers ``https://<prefix>?ac-discovery=1`` (and, as the
    client walks up from a name, every name under the prefix): one ``ac-discovery``
    template into the store served at ``store_url`` and the publisher's key at
    ``public_key`` (a key in the store, relative to ``store_url``)."""
    base = store_url if store_url.endswith("/") else store_url + "/"
    template = html.escape(f"{prefix} {base}{TEMPLATE}", quote=True)
    keys = html.escape(f"{prefix} {base}{public_key}", quote=True)
    title = html.escape(prefix)
    return (
        "<!DOCTYPE html>\n"
        "<html>\n"
        "<head>\n"
        '<meta charset="utf-8">\n'
        f"<title>{title}</title>\n"
        f'<meta name="ac-discovery" content="{template}">\n'
        f'<meta name="ac-discovery-pubkeys" content="{keys}">\n'
        "</head>\n"
        f"<body><p>App Container Images of {title} (appc discovery reads this page's meta tags).</p></body>\n"
        "</html>\n"
    ).encode()

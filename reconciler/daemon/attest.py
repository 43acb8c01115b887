"""A release's attestations: its provenance and SBOM (reconciler.core.provenance), each
signed in a DSSE envelope, ready to be published beside it.

The envelope's pre-authentication encoding is signed by the publisher's key through
the signer port (Signer.sign_attestation: for gpg, as securesystemslib's GPGSigner
signs), so that securesystemslib and in-toto verify the result with the same key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

from reconciler.core import provenance
from reconciler.core.layout import attestation_path
from reconciler.core.release import Attestation, Release

SignPae = Callable[[bytes], provenance.Signature]


def attest(
    release: Release, record: provenance.BuildRecord, sign: SignPae
) -> tuple[Release, dict[str, bytes]]:
    """``release`` naming its attestations, and their envelopes by store key."""
    envelopes: dict[str, bytes] = {}
    refs = []
    for kind, statement in provenance.statements(release, record).items():
        unsigned = provenance.envelope(statement)
        data = replace(unsigned, signatures=(sign(unsigned.pae()),)).to_json()
        path = attestation_path(release.host, release.version, kind)
        envelopes[path] = data
        refs.append(Attestation(kind, path, len(data), hashlib.sha256(data).hexdigest()))
    return replace(release, attestations=tuple(refs)), envelopes

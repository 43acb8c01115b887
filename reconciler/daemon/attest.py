"""A release's attestations: its provenance and SBOM (reconciler.core.provenance), each
signed in a DSSE envelope, ready to be published beside it.

The envelope's pre-authentication encoding is signed by the publisher's key as
securesystemslib signs (the signer port's metadata_signer: for gpg, GPGSigner), so
that securesystemslib and in-toto verify the result with the same key as a GPGKey.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from reconciler.core import provenance
from reconciler.core.layout import attestation_path
from reconciler.core.release import Attestation, Release
from reconciler.errors import SigningError

if TYPE_CHECKING:
    # Types only: a plan never signs, and importing securesystemslib costs it boto3.
    from securesystemslib.signer import Signer as MetadataSigner

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


def pae_signer(signer: MetadataSigner) -> SignPae:
    """Sign with ``signer`` (securesystemslib's), as a DSSE signature of our core."""

    def sign(pae: bytes) -> provenance.Signature:
        try:
            sig = signer.sign(pae)
            extra = tuple(sorted(sig.unrecognized_fields.items()))
            if not all(isinstance(v, str) for _, v in extra):
                raise ValueError(f"unexpected signature fields {sorted(k for k, _ in extra)}")
            return provenance.Signature(sig.keyid, bytes.fromhex(sig.signature), extra)
        except Exception as exc:
            # GPGSigner runs gpg (ValueError, OSError, a timeout, securesystemslib's
            # own errors); what failed is said, the signature is not made.
            raise SigningError(f"cannot sign an attestation with {signer.public_key.keyid}: {exc}") from None

    return sign

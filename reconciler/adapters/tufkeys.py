"""gpg keys as signers and keys of TUF metadata (securesystemslib's GPGSigner).

Apart from reconciler.adapters.gpg because securesystemslib imports boto3 and more:
only what signs or pins TUF metadata imports this (through reconciler.wiring), never
a plan.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from securesystemslib._gpg.common import parse_signature_packet
from securesystemslib.signer import GPGSigner, Key

from reconciler.adapters.gpg import Signer, Verifier, secret_fingerprints
from reconciler.core import provenance
from reconciler.errors import SigningError, VerificationError


class TufSigner(Signer):
    """A gpg signer that also signs TUF metadata and attestations (reconciler.ports.Signer)."""

    def sign_attestation(self, pae: bytes) -> provenance.Signature:
        """A DSSE signature of ``pae`` as securesystemslib's GPGSigner makes it (so that
        securesystemslib and in-toto verify it with this key as a GPGKey), made by this
        signer's gpg: with its passphrase file and deadline, which GPGSigner has not."""
        packet = self.sign_binary(pae)
        try:
            # securesystemslib's own reading of a signature packet, which GPGSigner uses.
            fields = parse_signature_packet(packet)  # type: ignore[no-untyped-call]  # untyped library
        except (ValueError, IndexError) as exc:
            raise SigningError(f"gpg made a signature securesystemslib cannot read: {exc}") from None
        if fields["keyid"] != self.fingerprint.lower():
            raise SigningError(f"gpg signed with {fields['keyid']}, not the primary key {self.fingerprint}")
        return provenance.Signature(
            fields["keyid"], bytes.fromhex(fields["signature"]), (("other_headers", fields["other_headers"]),)
        )

    def metadata_signer(self) -> GPGSigner:
        """This key as securesystemslib's GPGSigner, which signs TUF metadata (gpg
        with its own 10 s deadline). A passphrase reaches it only through gpg-agent."""
        return metadata_signer(self.gnupghome, self.fingerprint)


def metadata_signer(gnupghome: Path, fingerprint: str) -> GPGSigner:
    """The key ``fingerprint`` of ``gnupghome`` as a signer of TUF metadata."""
    try:
        _, key = GPGSigner.import_(fingerprint.lower(), str(gnupghome))
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        raise SigningError(f"cannot use key {fingerprint} of {gnupghome} for TUF metadata: {exc}") from None
    return GPGSigner(key, str(gnupghome))


def metadata_signers(gnupghome: Path) -> list[GPGSigner]:
    """Every secret key of ``gnupghome`` as a signer of TUF metadata."""
    return [metadata_signer(gnupghome, fpr) for fpr in secret_fingerprints(gnupghome)]


def metadata_keys(public_keys: list[bytes]) -> list[Key]:
    """Armored public keys (an agent's pinned ones) as keys of TUF metadata, one per
    primary key (the key that signs: a signing subkey is not supported)."""
    with Verifier(public_keys) as v:
        keys: list[Key] = []
        for fpr in sorted(v.fingerprints):
            try:
                _, primary = GPGSigner.import_(fpr.lower(), str(v.home))
            except (ValueError, OSError, subprocess.SubprocessError) as exc:
                raise VerificationError(f"cannot read pinned key {fpr}: {exc}") from None
            keys.append(primary)
        return keys


def check_metadata_signing(gnupghome: Path, fingerprint: str) -> None:
    """Sign a probe as TUF metadata is signed (securesystemslib's GPGSigner, whose gpg
    gets a passphrase only from gpg-agent); SigningError saying why it cannot."""
    signer = metadata_signer(gnupghome, fingerprint)
    try:
        signer.sign(b"reconciler check\n")
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise SigningError(f"cannot sign TUF metadata with key {fingerprint}: {why}") from None

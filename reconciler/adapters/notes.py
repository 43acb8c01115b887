"""OpenPGP keys as signed-note keys: the transparency log's checkpoints are signed and
co-signed with gpg (reconciler.core.note says how a signature line is made of it).

A note signature is the binary detached signature gpg makes of the note text; armored
(reconciler.core.openpgp.armor) it is what plain ``gpg --verify`` accepts, and it is
checked as every other signature here: packets checked first, then gpg in a keyring
holding only the pinned keys, with a deadline.
"""

from __future__ import annotations

from reconciler.adapters.gpg import Signer, Verifier
from reconciler.core import openpgp
from reconciler.core.note import Note, openpgp_key_id
from reconciler.errors import VerificationError


class OpenPgpNoteSigner:
    """A gpg key (reconciler.adapters.gpg.Signer) as a signer of notes
    (reconciler.ports.NoteSigner)."""

    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    @property
    def fingerprint(self) -> str:
        return self._signer.fingerprint

    def sign_note(self, text: bytes) -> bytes:
        return openpgp.detached_signature(self._signer.sign(text), "a checkpoint signature")


class OpenPgpNoteVerifier:
    """Armored public keys that check notes' signatures (reconciler.ports.NoteVerifier).
    A signature line counts for a pinned key when its key ID is that key's under the
    line's key name; the name itself is not pinned (the publisher signs as the log's
    origin, a witness under a name of its own)."""

    def __init__(self, public_keys: list[bytes]) -> None:
        self._keys = public_keys
        with Verifier(public_keys) as v:
            self.fingerprints = frozenset(v.fingerprints)

    def verified(self, note: Note) -> set[str]:
        good: set[str] = set()
        candidates = [
            (sig, fpr)
            for sig in note.signatures
            for fpr in sorted(self.fingerprints)
            if sig.key_id == _key_id(sig.name, fpr)
        ]
        if not candidates:
            return good
        with Verifier(self._keys) as v:
            for sig, fpr in candidates:
                what = f"the checkpoint signature of {sig.name}"
                signer = v.verify_bytes(note.text, openpgp.armor(sig.signature), what)
                if signer != fpr:
                    raise VerificationError(f"{what}: made by {signer}, its key ID names {fpr}")
                good.add(fpr)
        return good


def _key_id(name: str, fingerprint: str) -> bytes | None:
    try:
        return openpgp_key_id(name, fingerprint)
    except ValueError:
        return None

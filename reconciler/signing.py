"""gpg signing and verification through python-gnupg.

Signatures are detached and ASCII-armored so that plain ``gpg --verify`` accepts them.
Verification always happens in a throwaway keyring holding only the pinned keys:
a key that merely sits in the user's keyring or in the store is never trusted.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gnupg

from reconciler.errors import SigningError, VerificationError


class Signer:
    """Signs bytes with one secret key from a GNUPGHOME."""

    def __init__(self, gnupghome: Path, key: str, passphrase_file: Path | None = None) -> None:
        self.key = key
        self._gpg = gnupg.GPG(gnupghome=str(gnupghome))
        self._passphrase = None
        if passphrase_file is not None:
            try:
                self._passphrase = passphrase_file.read_text().rstrip("\n")
            except OSError as exc:
                raise SigningError(f"cannot read passphrase file {passphrase_file}: {exc.strerror}") from None
        secret = self._gpg.list_keys(secret=True, keys=[key])
        if not secret:
            raise SigningError(f"no secret key {key!r} in {gnupghome}")
        self.fingerprint: str = secret[0]["fingerprint"]

    def sign(self, data: bytes) -> bytes:
        """A detached armored signature of ``data``."""
        sig = self._gpg.sign(
            data, keyid=self.fingerprint, detach=True, clearsign=False, passphrase=self._passphrase
        )
        if not sig.data or not sig.fingerprint:
            raise SigningError(f"gpg could not sign with {self.fingerprint}: {sig.status or 'no output'}")
        return bytes(sig.data)

    def sign_file(self, path: Path) -> bytes:
        with path.open("rb") as f:
            sig = self._gpg.sign_file(
                f, keyid=self.fingerprint, detach=True, clearsign=False, passphrase=self._passphrase
            )
        if not sig.data or not sig.fingerprint:
            raise SigningError(f"gpg could not sign {path.name}: {sig.status or 'no output'}")
        return bytes(sig.data)

    def public_key(self) -> bytes:
        armored = self._gpg.export_keys(self.fingerprint)
        if not armored:
            raise SigningError(f"cannot export public key {self.fingerprint}")
        return str(armored).encode()


class Verifier:
    """Checks detached signatures against a fixed set of armored public keys."""

    def __init__(self, public_keys: list[bytes]) -> None:
        self._home = tempfile.TemporaryDirectory(prefix="reconciler-verify-")
        self._gpg = gnupg.GPG(gnupghome=self._home.name)
        self.fingerprints: set[str] = set()
        for k in public_keys:
            res = self._gpg.import_keys(k.decode(errors="replace"))
            self.fingerprints.update(res.fingerprints)
        if not self.fingerprints:
            raise VerificationError("no usable public key was given")

    @property
    def home(self) -> Path:
        """The private keyring holding only the given keys (for gpg run by others, e.g. git)."""
        return Path(self._home.name)

    def close(self) -> None:
        self._home.cleanup()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verify(self, data_path: Path, signature: bytes, what: str) -> str:
        """Return the signing key's fingerprint, or raise naming ``what``."""
        with tempfile.NamedTemporaryFile(dir=self._home.name, suffix=".asc") as sig:
            sig.write(signature)
            sig.flush()
            res = self._gpg.verify_file(sig.name, data_filename=str(data_path))
        return self._check(res, what)

    def verify_bytes(self, data: bytes, signature: bytes, what: str) -> str:
        with tempfile.NamedTemporaryFile(dir=self._home.name, suffix=".asc") as sig:
            sig.write(signature)
            sig.flush()
            res = self._gpg.verify_data(sig.name, data)
        return self._check(res, what)

    def _check(self, res: gnupg.Verify, what: str) -> str:
        # A good signature from a subkey reports the primary key's fingerprint too.
        fpr = res.pubkey_fingerprint or res.fingerprint
        if not res.valid or fpr not in self.fingerprints:
            reason = res.status or "no valid signature"
            if res.status == "no public key":
                reason = "signed by a key that is not trusted"
            raise VerificationError(f"{what}: bad signature ({reason})")
        return str(fpr)

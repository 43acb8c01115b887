"""gpg signing and verification through python-gnupg.

Signatures are detached and ASCII-armored so that plain ``gpg --verify`` accepts them.
Verification always happens in a throwaway keyring holding only the pinned keys:
a key that merely sits in the user's keyring or in the store is never trusted.
A signature is shown to gpg only after reconciler.openpgp found it to be nothing but
signature packets, and every gpg run has a deadline.
The same keys as signers of TUF metadata are reconciler.adapters.tufkeys'.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import gnupg

from reconciler.core import openpgp
from reconciler.errors import ReconcilerError, SigningError, VerificationError

# python-gnupg waits for gpg as long as gpg runs: a hung gpg-agent or an input crafted
# to keep gpg busy would hold a pass (or an agent's poll) for as long. Past its
# deadline gpg is killed and the call fails, saying what timed out.
# Listing, importing and exporting keys and checking a signature take milliseconds.
GPG_TIMEOUT = 10.0
# Signing may first wait for gpg-agent to start and unlock the key.
SIGN_TIMEOUT = 30.0
# gpg hashes what it signs or verifies; each byte adds to the deadline at this rate
# (bytes per second), slower than any disk an image is read from.
HASH_RATE = 16 * 1024 * 1024


def read_keys(key_files: list[Path]) -> list[bytes]:
    """The armored public keys in ``key_files``: the pinned keys a Verifier is made of."""
    keys = []
    for k in key_files:
        try:
            keys.append(k.read_bytes())
        except OSError as exc:
            raise VerificationError(f"cannot read key {k}: {exc.strerror}") from None
    return keys


def deadline(base: float, size: int) -> float:
    """Seconds allowed for a gpg run that hashes ``size`` bytes."""
    return base + size / HASH_RATE


class _Run:
    """The deadline of one call: every gpg process it starts is killed once it has
    run ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._timers: list[threading.Timer] = []

    def watch(self, proc: subprocess.Popen[bytes]) -> None:
        timer = threading.Timer(self.seconds, self._expire, (proc,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _expire(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            self.expired = True
            # python-gnupg's reader threads see the pipes close and the call returns.
            proc.kill()

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()


class _GPG(gnupg.GPG):  # type: ignore[misc]  # python-gnupg ships no type hints
    """python-gnupg (which has no timeout of its own) with a deadline on each gpg
    process it starts. Calls of several threads may share an instance."""

    def __init__(self, gnupghome: str, error: type[ReconcilerError]) -> None:
        self._error = error
        self._runs = threading.local()
        # The constructor runs gpg already (--list-config).
        with self.deadline("starting", GPG_TIMEOUT):
            super().__init__(gnupghome=gnupghome)

    @contextlib.contextmanager
    def deadline(self, what: str, seconds: float) -> Iterator[None]:
        """Bound the gpg runs of the python-gnupg calls in the block; raise the
        instance's error saying ``what`` timed out or failed."""
        run = _Run(seconds)
        self._runs.current = run
        try:
            yield
        except (OSError, ValueError) as exc:
            # gpg killed under python-gnupg's feet shows as a broken pipe or an error
            # exit; one that failed on its own is reported as it failed.
            if not run.expired:
                raise self._error(f"gpg failed {what}: {exc}") from None
        finally:
            self._runs.current = None
            run.cancel()
        if run.expired:
            raise self._error(f"gpg timed out after {seconds:.3g} s {what}")

    def _open_subprocess(self, args: list[str], passphrase: bool = False) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = super()._open_subprocess(args, passphrase)
        run: _Run | None = getattr(self._runs, "current", None)
        # Every call of this module sets a deadline; a stray one still gets the default.
        (run or _Run(GPG_TIMEOUT)).watch(proc)
        return proc


def secret_fingerprints(gnupghome: Path) -> list[str]:
    """The fingerprints of every secret key in ``gnupghome``."""
    gpg = _GPG(str(gnupghome), SigningError)
    with gpg.deadline(f"listing the secret keys of {gnupghome}", GPG_TIMEOUT):
        return [str(k["fingerprint"]) for k in gpg.list_keys(secret=True)]


class Signer:
    """Signs bytes with one secret key from a GNUPGHOME."""

    def __init__(self, gnupghome: Path, key: str, passphrase_file: Path | None = None) -> None:
        self.key = key
        self.gnupghome = gnupghome
        self._gpg = _GPG(str(gnupghome), SigningError)
        self._passphrase = None
        if passphrase_file is not None:
            try:
                self._passphrase = passphrase_file.read_text().rstrip("\n")
            except OSError as exc:
                raise SigningError(f"cannot read passphrase file {passphrase_file}: {exc.strerror}") from None
        with self._gpg.deadline(f"listing secret key {key}", GPG_TIMEOUT):
            secret = self._gpg.list_keys(secret=True, keys=[key])
        if not secret:
            raise SigningError(f"no secret key {key!r} in {gnupghome}")
        self.fingerprint: str = secret[0]["fingerprint"]

    def sign(self, data: bytes) -> bytes:
        """A detached armored signature of ``data``."""
        with self._gpg.deadline(f"signing {len(data)} bytes", deadline(SIGN_TIMEOUT, len(data))):
            sig = self._gpg.sign(
                data, keyid=self.fingerprint, detach=True, clearsign=False, passphrase=self._passphrase
            )
        if not sig.data or not sig.fingerprint:
            raise SigningError(f"gpg could not sign with {self.fingerprint}: {sig.status or 'no output'}")
        return bytes(sig.data)

    def sign_binary(self, data: bytes) -> bytes:
        """A detached binary OpenPGP signature of ``data``, hashed with SHA-256: what a
        DSSE envelope carries (reconciler.adapters.tufkeys.TufSigner.sign_attestation)."""
        with self._gpg.deadline(f"signing {len(data)} bytes", deadline(SIGN_TIMEOUT, len(data))):
            sig = self._gpg.sign(
                data,
                keyid=self.fingerprint,
                detach=True,
                binary=True,
                clearsign=False,
                passphrase=self._passphrase,
                extra_args=["--digest-algo", "SHA256"],
            )
        if not sig.data or not sig.fingerprint:
            raise SigningError(f"gpg could not sign with {self.fingerprint}: {sig.status or 'no output'}")
        return bytes(sig.data)

    def sign_file(self, path: Path) -> bytes:
        with (
            path.open("rb") as f,
            self._gpg.deadline(f"signing {path.name}", deadline(SIGN_TIMEOUT, path.stat().st_size)),
        ):
            sig = self._gpg.sign_file(
                f, keyid=self.fingerprint, detach=True, clearsign=False, passphrase=self._passphrase
            )
        if not sig.data or not sig.fingerprint:
            raise SigningError(f"gpg could not sign {path.name}: {sig.status or 'no output'}")
        return bytes(sig.data)

    def public_key(self) -> bytes:
        with self._gpg.deadline(f"exporting public key {self.fingerprint}", GPG_TIMEOUT):
            armored = self._gpg.export_keys(self.fingerprint)
        if not armored:
            raise SigningError(f"cannot export public key {self.fingerprint}")
        return str(armored).encode()


class Verifier:
    """Checks detached signatures against a fixed set of armored public keys."""

    def __init__(self, public_keys: list[bytes]) -> None:
        self._home = tempfile.TemporaryDirectory(prefix="reconciler-verify-")
        try:
            self._gpg = _GPG(self._home.name, VerificationError)
            self.fingerprints: set[str] = set()
            for k in public_keys:
                with self._gpg.deadline("importing a public key", GPG_TIMEOUT):
                    res = self._gpg.import_keys(k.decode(errors="replace"))
                self.fingerprints.update(res.fingerprints)
        except VerificationError:
            self._home.cleanup()
            raise
        if not self.fingerprints:
            self._home.cleanup()
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
        packets = openpgp.detached_signature(signature, what)
        seconds = deadline(GPG_TIMEOUT, data_path.stat().st_size)
        with (
            tempfile.NamedTemporaryFile(dir=self._home.name, suffix=".sig") as sig,
            self._gpg.deadline(f"verifying {what}", seconds),
        ):
            # gpg reads exactly the packets that were checked, not its own parse of the armor.
            sig.write(packets)
            sig.flush()
            res = self._gpg.verify_file(sig.name, data_filename=str(data_path))
        return self._check(res, what)

    def verify_bytes(self, data: bytes, signature: bytes, what: str) -> str:
        packets = openpgp.detached_signature(signature, what)
        with (
            tempfile.NamedTemporaryFile(dir=self._home.name, suffix=".sig") as sig,
            self._gpg.deadline(f"verifying {what}", deadline(GPG_TIMEOUT, len(data))),
        ):
            sig.write(packets)
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

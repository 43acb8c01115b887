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
import logging
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


class _ExitCodeFilter(logging.Filter):
    """python-gnupg warns of every non-zero gpg exit, which a refused signature, a
    missing key or an expired one each are: this module turns those results into one
    error that says why, and the warning would only repeat "error code 2" beside it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("gpg returned a non-zero error code")


logging.getLogger("gnupg").addFilter(_ExitCodeFilter())


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


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def unusable(key: Mapping[str, Any], now: float) -> str | None:
    """Why gpg will not sign with ``key`` (a python-gnupg listing of a secret key) at
    ``now``, or None. gpg itself says only "invalid signer" for each of these."""
    if key.get("trust") == "r":
        return "is revoked"
    expires = str(key.get("expires") or "")
    extend = (
        f"extend it (gpg --quick-set-expire {key.get('fingerprint')} 1y) and give agents the new public key"
    )
    if expires.isascii() and expires.isdigit() and int(expires) <= now:
        return f"expired on {_when(int(expires))} (now {_when(now)}): {extend}"
    if key.get("trust") == "e":
        return f"has expired: {extend}"
    created = str(key.get("date") or "")
    if created.isascii() and created.isdigit() and int(created) > now:
        return (
            f"was created on {_when(int(created))}, after this machine's clock ({_when(now)}): "
            "the clock is behind (check NTP), or it ran ahead where the key was made"
        )
    return None


class Signer:
    """Signs bytes with one secret key from a GNUPGHOME."""

    def __init__(self, gnupghome: Path, key: str, passphrase_file: Path | None = None) -> None:
        self.key = key
        self.gnupghome = gnupghome
        if not gnupghome.is_dir():
            # python-gnupg's own word for it is a ValueError about "gnupghome".
            what = "does not exist" if not gnupghome.exists() else "is not a directory"
            raise SigningError(f"signing.gnupghome {gnupghome} {what}: it must hold the signing key")
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
        problem = unusable(secret[0], time.time())
        if problem is not None:
            raise SigningError(f"signing key {self.fingerprint} {problem}")

    def _failed(self, what: str, status: str | None) -> SigningError:
        """Why gpg did not sign: the key's state when that explains it (it may have
        expired since the start), else gpg's status."""
        with self._gpg.deadline(f"listing secret key {self.fingerprint}", GPG_TIMEOUT):
            secret = self._gpg.list_keys(secret=True, keys=[self.fingerprint])
        problem = unusable(secret[0], time.time()) if secret else "is no longer in the keyring"
        if problem is not None:
            return SigningError(f"gpg could not sign {what}: signing key {self.fingerprint} {problem}")
        return SigningError(f"gpg could not sign {what} with {self.fingerprint}: {status or 'no output'}")

    def sign(self, data: bytes) -> bytes:
        """A detached armored signature of ``data``."""
        with self._gpg.deadline(f"signing {len(data)} bytes", deadline(SIGN_TIMEOUT, len(data))):
            sig = self._gpg.sign(
                data, keyid=self.fingerprint, detach=True, clearsign=False, passphrase=self._passphrase
            )
        if not sig.data or not sig.fingerprint:
            raise self._failed(f"{len(data)} bytes", sig.status)
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
            raise self._failed(path.name, sig.status)
        return bytes(sig.data)

    def public_key(self) -> bytes:
        with self._gpg.deadline(f"exporting public key {self.fingerprint}", GPG_TIMEOUT):
            armored = self._gpg.export_keys(self.fingerprint)
        if not armored:
            raise SigningError(f"cannot export public key {self.fingerprint}")
        return str(armored).encode()


def _import_problems(stderr: str) -> list[str]:
    """What gpg said about a key it did not import, with a hint for a clock that is
    behind (gpg will not take a key "created in the future")."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("gpg: key "):
            continue
        said = line.removeprefix("gpg: ")
        if "in the future" in said:
            said += ": is this machine's clock behind?"
        out.append(said)
    return out


class Verifier:
    """Checks detached signatures against a fixed set of armored public keys."""

    def __init__(self, public_keys: list[bytes]) -> None:
        self._home = tempfile.TemporaryDirectory(prefix="reconciler-verify-")
        try:
            self._gpg = _GPG(self._home.name, VerificationError)
            self.fingerprints: set[str] = set()
            refused: list[str] = []
            for k in public_keys:
                with self._gpg.deadline("importing a public key", GPG_TIMEOUT):
                    res = self._gpg.import_keys(k.decode(errors="replace"))
                self.fingerprints.update(res.fingerprints)
                if not res.fingerprints:
                    refused += _import_problems(str(res.stderr or ""))
        except VerificationError:
            self._home.cleanup()
            raise
        if not self.fingerprints:
            self._home.cleanup()
            why = f": {'; '.join(dict.fromkeys(refused))}" if refused else ""
            raise VerificationError(f"no usable public key was given{why}")

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
        if res.valid and fpr in self.fingerprints:
            return str(fpr)
        trusted = ", ".join(sorted(self.fingerprints))
        if res.status == "no public key":
            # gpg names the signer from the signature: its issuer fingerprint (ERRSIG,
            # gpg 2.2.7 and later) or else the 16-digit key id (NO_PUBKEY).
            signer = res.fingerprint or res.key_id or "unknown"
            raise VerificationError(
                f"{what}: bad signature: signed by key {signer}, which is not a trusted key "
                f"(trusted: {trusted})"
            )
        if res.status == "signature bad":
            raise VerificationError(
                f"{what}: bad signature: the data does not match the signature by key {res.key_id} "
                "(changed after signing)"
            )
        reason = res.status or "no valid signature"
        raise VerificationError(f"{what}: bad signature ({reason}; trusted: {trusted})")


def check_signing_key(gnupghome: Path, key: str, passphrase_file: Path | None, now: float) -> str:
    """What `reconciler check` finds of the signing key at unix time ``now``: a line
    saying which key it is and until when it is valid, once it has signed a probe with
    it (with the passphrase file, if one is given). A key that is missing, expired,
    revoked, created after ``now`` (a clock behind) or cannot sign is a SigningError
    saying so (:func:`unusable`), where gpg itself would only say "invalid signer"."""
    signer = Signer(gnupghome, key, passphrase_file)
    fpr = signer.fingerprint
    with signer._gpg.deadline(f"listing secret key {fpr}", GPG_TIMEOUT):
        (info,) = signer._gpg.list_keys(secret=True, keys=[fpr])
    problem = unusable(info, now)
    if problem is not None:
        raise SigningError(f"key {fpr} {problem}")
    signer.sign(b"reconciler check\n")
    expires = int(info.get("expires") or 0)
    return f"key {fpr}, expires {_when(expires) if expires else 'never'}, signs"

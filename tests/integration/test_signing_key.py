"""What the signer says about a key gpg will not sign with (real gpg, throwaway homes).

gpg itself answers "invalid signer" for an expired key and for a key made "in the
future" (this machine's clock is behind); a missing GNUPGHOME is a ValueError deep in
python-gnupg. Each gets a message that says what to fix.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters.gpg import Signer, Verifier
from reconciler.errors import SigningError, VerificationError
from tests.conftest import ConfigRepo, Signing, cli, standard_fleet, stop_gpg_agent, write_config

pytestmark = pytest.mark.integration


def gpg(home: Path, *args: str) -> str:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--passphrase", "", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def make_key(home: Path, at: str, expire: str) -> str:
    """A key created at gpg time ``at`` (YYYYMMDDTHHMMSS), expiring ``expire`` after it."""
    home.mkdir(mode=0o700)
    gpg(
        home,
        "--faked-system-time",
        at,
        "--quick-gen-key",
        "Test <t@example.invalid>",
        "ed25519",
        "sign",
        expire,
    )
    (line,) = [
        ln for ln in gpg(home, "--list-secret-keys", "--with-colons").splitlines() if ln.startswith("fpr")
    ]
    return line.split(":")[9]


@pytest.fixture
def homes(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for home in tmp_path.iterdir():
        if home.is_dir():
            stop_gpg_agent(home)


# gpg's faked clock runs on from the time given: a key "made at midnight" may be a
# second or two older.
AT = r"\d{2}:\d{2}:\d{2}Z"


def test_an_expired_key_is_named_as_expired(homes: Path) -> None:
    home = homes / "expired"
    fpr = make_key(home, "20200101T000000", "1d")
    with pytest.raises(SigningError) as err:
        Signer(home, fpr)
    assert re.fullmatch(
        f"signing key {fpr} expired on 2020-01-02 {AT} \\(now \\S+ {AT}\\): extend it "
        f"\\(gpg --quick-set-expire {fpr} 1y\\) and give agents the new public key",
        str(err.value),
    ), str(err.value)


def test_a_key_that_expires_while_the_daemon_runs(homes: Path) -> None:
    home = homes / "expiring"
    fpr = make_key(home, "20200101T000000", "never")
    signer = Signer(home, fpr)
    assert signer.sign(b"fine")
    # Expiry two days after its creation in 2020: long past.
    gpg(home, "--faked-system-time", "20200101T000000", "--quick-set-expire", fpr, "2d")
    with pytest.raises(SigningError) as err:
        signer.sign(b"now what")
    assert re.match(
        f"gpg could not sign 8 bytes: signing key {fpr} expired on 2020-01-03 {AT} ", str(err.value)
    ), str(err.value)


def test_a_key_from_the_future_blames_the_clock(homes: Path) -> None:
    home = homes / "future"
    fpr = make_key(home, "20400101T000000", "never")
    with pytest.raises(SigningError) as err:
        Signer(home, fpr)
    assert re.match(
        f"signing key {fpr} was created on 2040-01-01 {AT}, after this machine's clock \\(", str(err.value)
    )
    assert "the clock is behind" in str(err.value)


def test_a_missing_gnupghome_is_named(tmp_path: Path) -> None:
    with pytest.raises(SigningError) as err:
        Signer(tmp_path / "nowhere", "ABCD")
    assert str(err.value) == (
        f"signing.gnupghome {tmp_path / 'nowhere'} does not exist: it must hold the signing key"
    )
    (tmp_path / "file").write_text("")
    with pytest.raises(SigningError, match="is not a directory"):
        Signer(tmp_path / "file", "ABCD")


def test_reconcile_with_a_missing_gnupghome_says_so_in_one_line_per_host(
    tmp_path: Path, config_repo: ConfigRepo
) -> None:
    standard_fleet(config_repo)
    absent = tmp_path / "no-gnupg"
    cfg = write_config(tmp_path, config_repo, Signing(absent, "0" * 40, absent / "publisher.asc"))
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    failed = [ln for ln in res.stdout.splitlines() if "FAILED" in ln]
    assert len(failed) == 3
    for line in failed:
        assert line.endswith(
            f"signing.gnupghome {tmp_path / 'no-gnupg'} does not exist: it must hold the signing key"
        )


def test_a_public_key_from_the_future_blames_the_clock(homes: Path) -> None:
    """An agent or `verify` on a machine whose clock is behind the publisher's key."""
    home = homes / "future-public"
    fpr = make_key(home, "20400101T000000", "never")
    public = gpg(home, "--armor", "--export", fpr).encode()
    with pytest.raises(VerificationError) as err:
        Verifier([public])
    assert str(err.value).startswith(f"no usable public key was given: key {fpr[-16:]} was created ")
    assert "in the future (time warp or clock problem): is this machine's clock behind?" in str(err.value)

"""Unit tests for reconciler.store that need no server: credentials, open_store, keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.adapters.s3 import S3Credentials, S3Store, read_credentials
from reconciler.adapters.store import FilesystemStore
from reconciler.config import StoreConfig
from reconciler.errors import ConfigError, StoreError
from reconciler.wiring import open_store

CREDS = S3Credentials("AKID", "SECRET")

pytestmark = pytest.mark.usefixtures("no_ambient_aws")


@pytest.mark.parametrize(
    "text",
    [
        "access_key_id = AKID\nsecret_access_key = SECRET\n",
        "# comment\naccess_key_id: AKID\n\nsecret_access_key: 'SECRET'\n",
        "aws_access_key_id=AKID\naws_secret_access_key=SECRET\n",
        "[default]\naws_access_key_id = AKID\naws_secret_access_key = SECRET\nregion = eu-west-1\n",
        "[fleet]\naws_access_key_id = AKID\naws_secret_access_key = SECRET\n",
        "[other]\naws_access_key_id = X\naws_secret_access_key = Y\n"
        "[default]\naws_access_key_id = AKID\naws_secret_access_key = SECRET\n",
    ],
)
def test_credentials_file_forms(tmp_path: Path, text: str) -> None:
    path = tmp_path / "creds"
    path.write_text(text)
    assert read_credentials(path) == CREDS


def test_credentials_session_token_and_secret_not_in_repr(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    path.write_text("access_key_id = AKID\nsecret_access_key = SECRET\nsession_token = TOKEN\n")
    creds = read_credentials(path)
    assert creds.session_token == "TOKEN"
    assert "SECRET" not in repr(creds) and "TOKEN" not in repr(creds)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("access_key_id = AKID\n", "secret_access_key", "is required"),
        ("secret_access_key = S\n", "access_key_id", "is required"),
        ("access_key_id =\nsecret_access_key = S\n", "access_key_id", "is required"),
        ("", "access_key_id", "is required"),
        ("AKID SECRET\n", "", "line 1: expected 'access_key_id = VALUE'"),
        (
            "[a]\naws_access_key_id = X\n[b]\naws_access_key_id = Y\n",
            "",
            "has profiles a, b but no [default]",
        ),
        ("[default]\naws_access_key_id = X\n", "secret_access_key", "is required"),
    ],
)
def test_credentials_file_errors_name_file_and_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = tmp_path / "creds"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        read_credentials(path)
    assert (exc.value.path, exc.value.key, exc.value.reason) == (str(path), key, reason)


def test_unreadable_credentials_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        read_credentials(tmp_path / "missing")
    assert str(exc.value) == f"{tmp_path / 'missing'}: cannot read: No such file or directory"


def test_open_store_filesystem(tmp_path: Path) -> None:
    store = open_store(StoreConfig(type="filesystem", path=tmp_path))
    assert isinstance(store, FilesystemStore) and store.root == tmp_path


def test_open_store_s3_with_credentials_file(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.write_text("access_key_id = AKID\nsecret_access_key = SECRET\n")
    cfg = StoreConfig(
        type="s3", bucket="fleet", prefix="a/b", endpoint="http://127.0.0.1:1/", credentials_file=creds
    )
    store = open_store(cfg)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.endpoint_url) == ("fleet", "a/b/", "http://127.0.0.1:1")
    got = store.client._request_signer._credentials  # type: ignore[attr-defined]
    assert (got.access_key, got.secret_key) == ("AKID", "SECRET")
    assert store.url("hosts/web-1/latest.json") == "http://127.0.0.1:1/fleet/a/b/hosts/web-1/latest.json"


def test_open_store_s3_uses_the_environment_without_credentials_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENVSECRET")
    store = open_store(StoreConfig(type="s3", bucket="fleet", region="eu-west-1"))
    assert isinstance(store, S3Store)
    got = store.client._request_signer._credentials  # type: ignore[attr-defined]
    assert (got.access_key, got.secret_key) == ("ENVKEY", "ENVSECRET")
    assert store.url("blobs/sha256/ab") == "https://fleet.s3.eu-west-1.amazonaws.com/blobs/sha256/ab"


def test_open_store_s3_missing_credentials_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        open_store(StoreConfig(type="s3", bucket="fleet", credentials_file=tmp_path / "nope"))


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a/", ".."])
def test_invalid_keys_are_refused_by_both_backends(tmp_path: Path, key: str) -> None:
    for store in (
        FilesystemStore(tmp_path),
        S3Store("fleet", endpoint_url="http://127.0.0.1:1", credentials=CREDS),
    ):
        with pytest.raises(StoreError, match="invalid store key"):
            store.get_bytes(key, 1)
        with pytest.raises(StoreError, match="invalid store key"):
            store.delete(key)


@pytest.mark.parametrize("prefix", ["/", "/hosts", "hosts//", "../", "hosts/../x"])
def test_invalid_list_prefixes_are_refused(tmp_path: Path, prefix: str) -> None:
    for store in (
        FilesystemStore(tmp_path),
        S3Store("fleet", endpoint_url="http://127.0.0.1:1", credentials=CREDS),
    ):
        with pytest.raises(StoreError, match="invalid store key"):
            store.list(prefix)


def test_filesystem_list_skips_writes_in_progress(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    store.put_bytes("hosts/a/latest.json", b"{}")
    (tmp_path / "hosts" / "a" / ".tmp-123").write_bytes(b"partial")
    assert store.list() == ["hosts/a/latest.json"]
    assert store.list("nothing/here/") == []


def test_filesystem_get_bytes_with_a_limit_refuses_a_larger_object(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    store.put_bytes("log/checkpoint", b"x" * 10)
    assert store.get_bytes("log/checkpoint", limit=10) == b"x" * 10
    assert store.get_bytes("log/other", limit=10) is None
    with pytest.raises(StoreError, match=r"log/checkpoint.*larger than 9 bytes"):
        store.get_bytes("log/checkpoint", limit=9)

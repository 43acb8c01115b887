"""The S3 backend of the artifact store (reconciler.ports.Store): a bucket of an
S3-compatible service, with the guarantees of reconciler.adapters.store. Apart from
the filesystem backend because boto3 costs a command a quarter of a second to import;
reconciler.wiring imports this module only for an s3 store.
"""

from __future__ import annotations

import builtins
import configparser
import contextlib
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from reconciler.adapters.bounded import BoundedCalls, CrowdedError, LateError
from reconciler.adapters.store import check_key, check_prefix
from reconciler.errors import ConfigError, ObjectTooLargeError, StoreError

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


_CREDENTIAL_KEYS = {
    "access_key_id": "access_key_id",
    "aws_access_key_id": "access_key_id",
    "secret_access_key": "secret_access_key",
    "aws_secret_access_key": "secret_access_key",
    "session_token": "session_token",
    "aws_session_token": "session_token",
}


def read_credentials(path: Path) -> S3Credentials:
    """Read S3 credentials from ``path``; errors name the file and key.

    Two forms: lines ``access_key_id = ...`` and ``secret_access_key = ...`` (``:``
    also separates, ``#`` starts a comment), or an AWS-style ini file whose
    ``[default]`` section (or only section) holds ``aws_access_key_id`` and
    ``aws_secret_access_key``. ``session_token`` is optional in both.
    """
    p = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(p, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith(("#", ";"))]
    values: dict[str, str] = {}
    if any(line.startswith("[") for _, line in lines):
        ini = configparser.ConfigParser(interpolation=None)
        try:
            ini.read_string(text, source=p)
        except configparser.Error as exc:
            raise ConfigError(p, "", f"invalid ini file: {' '.join(str(exc).split())}") from None
        sections = ini.sections()
        if "default" in sections:
            name = "default"
        elif len(sections) == 1:
            name = sections[0]
        else:
            raise ConfigError(p, "", f"has profiles {', '.join(sections)} but no [default]")
        items = ini.items(name)
    else:
        items = []
        for n, line in lines:
            sep = min((i for i in (line.find("="), line.find(":")) if i > 0), default=-1)
            if sep < 0:
                raise ConfigError(p, "", f"line {n}: expected 'access_key_id = VALUE'")
            items.append((line[:sep].strip().lower(), line[sep + 1 :].strip()))
    for k, v in items:
        if k in _CREDENTIAL_KEYS:
            values[_CREDENTIAL_KEYS[k]] = v.strip().strip("\"'")
    for k in ("access_key_id", "secret_access_key"):
        if not values.get(k):
            raise ConfigError(p, k, "is required")
    return S3Credentials(
        access_key_id=values["access_key_id"],
        secret_access_key=values["secret_access_key"],
        session_token=values.get("session_token") or None,
    )


_CONTENT_TYPES = {
    ".json": "application/json",
    ".asc": "application/pgp-signature",
    ".html": "text/html; charset=utf-8",
}
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
# A conditional create refused: the key exists (412), or another conditional write of
# it is in progress (409, AWS).
_EXISTS = frozenset({"412", "PreconditionFailed", "409", "ConditionalRequestConflict"})
_UNSUPPORTED = frozenset({"501", "NotImplemented"})
_DENIED = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"})


T = TypeVar("T")

# Requests left running past their deadline (adapters.bounded), at most this many at once.
MAX_REQUESTS_LEFT = 8
# A whole transfer of a large object (an upload, a copy) is given a second more for
# each this many bytes: a service slower than that is as good as not answering.
MIN_TRANSFER_RATE = 1 << 20


class S3Store:
    """A bucket (and optional key prefix) of an S3-compatible object store.

    Each put is a single PUT, or a multipart upload that becomes visible only when
    completed, so a reader sees the old object or the whole new one. ``credentials``
    None means boto3's standard chain (environment, shared files, instance role).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        credentials: S3Credentials | None = None,
        *,
        max_attempts: int = 3,
        connect_timeout: float = 10.0,
        # botocore's 60 s is the publisher lease's whole duration: SeaweedFS now and then
        # leaves a conditional PUT racing others unanswered, and the lease's create then
        # waited a minute for its retry. A third of it (the renew interval) still gives
        # a slow server time to answer; the retry follows at once.
        read_timeout: float = 20.0,
        multipart_threshold: int = 64 << 20,
        multipart_chunksize: int = 16 << 20,
        # A small object's whole request, every try of it: three reads' worth.
        request_timeout: float = 60.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        check_prefix(self.prefix)
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self.region = region
        self._conditional_checked = False
        # One deadline for each whole request of a small object, its tries included:
        # botocore's read_timeout bounds each read, which every byte a server trickles
        # starts again (one answer sent a byte at a time held a pass, and the publisher
        # lease it renewed, for as long as the server liked).
        self.request_timeout = request_timeout
        self._requests = BoundedCalls(MAX_REQUESTS_LEFT)
        self.location = f"s3://{bucket}/{self.prefix}" + (f" at {self.endpoint_url}" if endpoint_url else "")
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=4,
        )
        config = BotoConfig(
            region_name=region,
            signature_version="s3v4",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
            # Most S3-compatible services (SeaweedFS, MinIO, Ceph) want path-style URLs.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        try:
            session = boto3.session.Session(
                aws_access_key_id=credentials.access_key_id if credentials else None,
                aws_secret_access_key=credentials.secret_access_key if credentials else None,
                aws_session_token=credentials.session_token if credentials else None,
                region_name=region,
            )
            self.client: S3Client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        except (BotoCoreError, ValueError) as exc:
            raise StoreError(f"cannot set up an S3 client for {self.location}: {self._reason(exc)}") from None

    def _key(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    def _reason(self, exc: BaseException) -> str:
        # boto3's managed transfer wraps the client's error; report the original.
        while isinstance(exc, S3UploadFailedError) and exc.__context__ is not None:
            exc = exc.__context__
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            message = str(err.get("Message") or "")
            if code == "NoSuchBucket":
                text = f"bucket {self.bucket!r} does not exist"
            elif code in _DENIED:
                text = f"access denied ({code}{': ' + message if message else ''}); check the credentials"
            else:
                text = f"{code}: {message}" if message else f"error {code}"
        elif isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            text = (
                "no usable S3 credentials (set store.credentials_file, or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY)"
            )
        elif isinstance(exc, EndpointConnectionError):
            text = f"cannot connect to {self.endpoint_url or 'the S3 endpoint'}"
        elif isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
            text = f"timed out talking to {self.endpoint_url or 'the S3 endpoint'}"
        elif isinstance(exc, OSError) and exc.strerror:
            text = exc.strerror
        else:
            text = str(exc) or type(exc).__name__
        return " ".join(text.split())

    def _error(self, action: str, key: str, exc: BaseException) -> StoreError:
        return StoreError(f"cannot {action} {key} in {self.location}: {self._reason(exc)}")

    def _bounded(self, action: str, key: str, call: Callable[[], T], size: int = 0) -> T:
        """``call()`` under the request deadline, longer by a second for each
        MIN_TRANSFER_RATE bytes of ``size`` it moves; a StoreError saying so when late."""
        seconds = self.request_timeout + size / MIN_TRANSFER_RATE
        try:
            return self._requests.run(call, seconds, "s3-request")
        except CrowdedError:
            why = f"{MAX_REQUESTS_LEFT} earlier requests are still unanswered"
        except LateError:
            why = f"no complete answer within {seconds:g} s"
        raise StoreError(f"cannot {action} {key} in {self.location}: {why}")

    @staticmethod
    def _code(exc: ClientError) -> str:
        return str(exc.response.get("Error", {}).get("Code", ""))

    def put_file(self, key: str, path: Path) -> None:
        full = self._key(key)
        try:
            # Left behind, an upload may still complete: the blob's own bytes, under
            # its content's name.
            self._bounded(
                "write",
                key,
                lambda: self.client.upload_file(
                    str(path),
                    self.bucket,
                    full,
                    ExtraArgs={"ContentType": _content_type(key)},
                    Config=self._transfer,
                ),
                size=path.stat().st_size,
            )
        except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as exc:
            raise self._error("write", key, exc) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        try:
            self._bounded(
                "write",
                key,
                lambda: self.client.put_object(
                    Bucket=self.bucket, Key=full, Body=data, ContentType=_content_type(key)
                ),
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._error("write", key, exc) from None

    def copy(self, src: str, dst: str) -> None:
        """A copy inside the service (CopyObject, multipart above the threshold): the
        bytes do not pass through this process."""
        source, full = self._key(src), self._key(dst)
        size = self.size(src)
        if size is None:
            raise StoreError(f"cannot copy {src} to {dst} in {self.location}: {src} does not exist")
        try:
            self._bounded(
                "copy",
                f"{src} to {dst}",
                lambda: self.client.copy(
                    {"Bucket": self.bucket, "Key": source},
                    self.bucket,
                    full,
                    ExtraArgs={"ContentType": _content_type(dst), "MetadataDirective": "REPLACE"},
                    Config=self._transfer,
                ),
                size=size,
            )
        except (BotoCoreError, ClientError, S3UploadFailedError, OSError) as exc:
            raise StoreError(f"cannot copy {src} to {dst} in {self.location}: {self._reason(exc)}") from None

    def create(self, key: str, data: bytes) -> bool:
        """A PUT with ``If-None-Match: *`` (S3 conditional writes): the service answers
        412 if the key exists, 409 while another conditional write of it is in flight.
        ``data`` must be unique to this writer: a refusal is read back, and an object
        holding exactly ``data`` is this writer's own (an earlier attempt of the PUT).
        A service that ignored the header would let two writers both "create" the key,
        so the first create of a process checks that it is honoured (see
        :meth:`_check_conditional_writes`) and refuses to go on if not."""
        if not self._conditional_checked:
            self._check_conditional_writes(key)
        return self._create(key, data)

    def _create(self, key: str, data: bytes) -> bool:
        full = self._key(key)
        try:
            self._bounded(
                "create",
                key,
                lambda: self.client.put_object(
                    Bucket=self.bucket, Key=full, Body=data, ContentType=_content_type(key), IfNoneMatch="*"
                ),
            )
        except ClientError as exc:
            if self._code(exc) in _EXISTS:
                # A retried PUT (the first attempt's answer lost or garbled, which
                # SeaweedFS does now and then under concurrent conditional writes) is
                # refused by the object the first attempt wrote: the bytes say whose
                # it is (callers write content that is theirs alone, as a lease record).
                try:
                    return self.get_bytes(key, len(data)) == data
                except ObjectTooLargeError:
                    return False  # longer than what was written: another's
            if self._code(exc) in _UNSUPPORTED:
                raise self._unsupported() from None
            raise self._error("create", key, exc) from None
        except BotoCoreError as exc:
            raise self._error("create", key, exc) from None
        return True

    def _check_conditional_writes(self, key: str) -> None:
        """Create a probe object beside ``key`` twice: the second must be refused."""
        probe = f"{key}.probe-{uuid.uuid4().hex}"
        try:
            if not self._create(probe, b"probe 1\n"):
                raise StoreError(f"cannot create {probe} in {self.location}: it exists")
            if self._create(probe, b"probe 2\n"):
                raise self._unsupported()
        finally:
            with contextlib.suppress(StoreError):
                self.delete(probe)
        self._conditional_checked = True

    def _unsupported(self) -> StoreError:
        return StoreError(
            f"{self.location} does not honour conditional writes (PUT with If-None-Match: *), "
            "so two daemons could both take the publisher lease: use a service that does "
            "(AWS S3 does; SeaweedFS 4.48 is tested), or set lease.enabled: false and run "
            "only one daemon against this store"
        )

    def get_bytes(self, key: str, limit: int) -> bytes | None:
        full = self._key(key)

        def read() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=full)["Body"]
            data = b""
            try:
                # Not a Range request: an empty object answers one with 416. Read on to
                # the end (or past the limit): the end is where botocore checks the
                # Content-Length, so a connection closed part-way is an error, not a
                # shorter object.
                while len(data) <= limit:
                    chunk: bytes = body.read(limit + 1 - len(data))
                    if not chunk:
                        break
                    data += chunk
            finally:
                body.close()
            return data

        try:
            data = self._bounded("read", key, read)
        except ClientError as exc:
            if self._code(exc) in _MISSING:
                return None
            raise self._error("read", key, exc) from None
        except BotoCoreError as exc:
            raise self._error("read", key, exc) from None
        if len(data) > limit:
            raise ObjectTooLargeError(f"cannot read {key} in {self.location}: larger than {limit} bytes")
        return data

    def size(self, key: str) -> int | None:
        full = self._key(key)
        try:
            return self._bounded(
                "stat", key, lambda: self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"]
            )
        except ClientError as exc:
            # HEAD has no body: a missing key is a bare 404 (so is a missing bucket).
            if self._code(exc) in _MISSING:
                return None
            raise self._error("stat", key, exc) from None
        except BotoCoreError as exc:
            raise self._error("stat", key, exc) from None

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def url(self, key: str) -> str:
        path = urllib.parse.quote(self._key(key), safe="/~")
        if self.endpoint_url:
            return f"{self.endpoint_url}/{self.bucket}/{path}"
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{path}"

    def _pages(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix))
        # A page at a time under the deadline: a large store lists in many.
        while (page := self._bounded("list", prefix or "/", lambda: next(pages, None))) is not None:
            for obj in page.get("Contents", []):
                key = obj.get("Key", "")
                if key.startswith(self.prefix) and not key.endswith("/"):
                    yield key[len(self.prefix) :]

    def list(self, prefix: str = "") -> builtins.list[str]:
        check_prefix(prefix)
        try:
            return sorted(self._pages(prefix))
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"cannot list {prefix or '/'} in {self.location}: {self._reason(exc)}") from None

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self._bounded("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))
        except (BotoCoreError, ClientError) as exc:
            raise self._error("delete", key, exc) from None

    def sweep(self) -> builtins.list[str]:
        """Abort the multipart uploads that writes which died left: unseen, but stored."""
        removed = []
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get("Uploads", []):
                    key, upload_id = upload.get("Key", ""), upload.get("UploadId", "")
                    if not key.startswith(self.prefix):
                        continue
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                    removed.append(f"{key[len(self.prefix) :]} (upload {upload_id})")
        except (BotoCoreError, ClientError) as exc:
            reason = self._reason(exc)
            raise StoreError(f"cannot abort unfinished uploads in {self.location}: {reason}") from None
        return removed


def _content_type(key: str) -> str:
    return _CONTENT_TYPES.get(Path(key).suffix, "application/octet-stream")

"""Object storage: local paths, ``s3://`` and ``r2://``. The only module that knows S3/R2.

boto3 does the transfers we must reason about (fixed-size multipart, staging, preflight);
pyarrow's ``S3FileSystem`` is built only for Ray Train's ``RunConfig(storage_filesystem=...)``.

Credentials come only from the environment or the AWS provider chain. They are never put in a
message: failures are reported as ``<uri>: <what is wrong>`` built from the error *code*, never by
formatting a botocore exception.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple
from urllib.parse import urlsplit

from raytimm.errors import StorageError
from raytimm.secrets import redact_uri

log = logging.getLogger(__name__)

SCHEMES = ("file", "s3", "r2")
MiB = 1024 * 1024
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB  # S3/R2 minimum for every part but the last
MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
TRANSFER_THREADS = 8
R2_ENDPOINT_TEMPLATE = "https://{account_id}.r2.cloudflarestorage.com"
R2_REGION = "auto"
DATASET_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DICE_EXTENSIONS = (".json",)

# Environment variables whose values are secrets; redact() removes them from any text.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "R2_ACCESS_KEY_ID",
    "R2_SECRET_ACCESS_KEY",
)
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidSecurity",
    "AuthorizationHeaderMalformed",
    "Unauthorized",
}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


# ----------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class StorageURI:
    """A parsed storage location. For ``file`` the bucket is empty and key is an absolute path."""

    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        if self.scheme == "file":
            return self.key
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    @property
    def remote(self) -> bool:
        return self.scheme != "file"


def parse_uri(uri: str | os.PathLike | StorageURI) -> StorageURI:
    """Split a local path, ``file://``, ``s3://`` or ``r2://`` URI; StorageError names a bad one."""
    if isinstance(uri, StorageURI):
        return uri
    text = os.fspath(uri) if isinstance(uri, os.PathLike) else uri
    if not isinstance(text, str) or not text.strip():
        raise StorageError(f"{text!r}: empty storage path or URI")
    text = text.strip()
    if "://" not in text:
        return StorageURI("file", "", os.path.abspath(os.path.expanduser(text)))
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        if not rest:
            raise StorageError(f"{text}: file:// URI without a path")
        return StorageURI("file", "", os.path.abspath(os.path.expanduser(rest)))
    if scheme not in SCHEMES:
        raise StorageError(f"{text}: unsupported scheme '{scheme}://' (use a local path, file://, s3:// or r2://)")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{text}: no bucket name (expected {scheme}://bucket/prefix)")
    if not _BUCKET_RE.match(bucket):
        raise StorageError(f"{text}: invalid bucket name '{bucket}'")
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError(f"{text}: '.' and '..' are not allowed in object keys")
    return StorageURI(scheme, bucket, "/".join(parts))


def normalize(uri: str | os.PathLike) -> str:
    """Canonical form: absolute local path, or ``scheme://bucket/key`` without stray slashes."""
    return str(parse_uri(uri))


def is_remote(uri: str | os.PathLike) -> bool:
    """True for ``s3://`` and ``r2://`` URIs, False for local paths and ``file://``."""
    return parse_uri(uri).remote


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme (``s3://b/a`` + ``c/d`` -> ``s3://b/a/c/d``)."""
    parsed = parse_uri(uri)
    pieces = [p for part in parts for p in str(part).replace("\\", "/").split("/") if p]
    if any(p in (".", "..") for p in pieces):
        raise StorageError(f"{uri}: cannot join {parts!r}: '.' and '..' are not allowed")
    if not parsed.remote:
        return os.path.join(parsed.key, *pieces)
    key = "/".join([parsed.key, *pieces]) if parsed.key else "/".join(pieces)
    return str(StorageURI(parsed.scheme, parsed.bucket, key))


def _prefix(key: str) -> str:
    """The listing prefix for a 'folder' key: ``a/b`` -> ``a/b/``, bucket root -> ``''``."""
    return f"{key}/" if key else ""


# ----------------------------------------------------------------------------- settings


@dataclass
class _Settings:
    endpoint_url: str | None = None
    region: str | None = None
    part_size: int | None = None


_settings = _Settings()


def configure(*, endpoint_url: str | None = None, region: str | None = None, part_size: int | None = None) -> None:
    """Set process-wide defaults (from config ``storage.endpoint_url``/``storage.region``); call once per process."""
    if part_size is not None:
        _check_part_size(part_size)
    _settings.endpoint_url = endpoint_url or None
    _settings.region = region or None
    _settings.part_size = part_size
    _CLIENTS.clear()


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def endpoint_for(scheme: str, endpoint_url: str | None = None, *, uri: str | None = None) -> str | None:
    """Endpoint URL for a scheme: explicit > env > (r2) derived from R2_ACCOUNT_ID; None = AWS default."""
    label = uri or (scheme if "://" in scheme else f"{scheme}://")
    scheme = _scheme_of(scheme)
    explicit = endpoint_url or _settings.endpoint_url
    if explicit:
        return explicit
    if scheme == "s3":
        return _env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL")
    if scheme == "r2":
        found = _env("R2_ENDPOINT_URL") or _env("AWS_ENDPOINT_URL")
        if found:
            return found
        account = _env("R2_ACCOUNT_ID")
        if account:
            return R2_ENDPOINT_TEMPLATE.format(account_id=account)
        raise StorageError(f"{label}: no R2 endpoint: set R2_ACCOUNT_ID, R2_ENDPOINT_URL or storage.endpoint_url")
    return None


def _scheme_of(scheme_or_uri: str) -> str:
    scheme = scheme_or_uri.lower().rstrip(":/") if "://" not in scheme_or_uri else parse_uri(scheme_or_uri).scheme
    if scheme not in ("s3", "r2"):
        raise StorageError(f"{scheme_or_uri}: not an object-store scheme (expected s3 or r2)")
    return scheme


def _is_r2(scheme: str, endpoint: str | None) -> bool:
    """R2 quirks apply to r2:// and to s3:// URIs that point at an R2 endpoint."""
    host = (urlsplit(endpoint).hostname or "") if endpoint else ""
    return scheme == "r2" or host.endswith(".r2.cloudflarestorage.com")


def _region_for(scheme: str, region: str | None) -> str | None:
    if region or _settings.region:
        return region or _settings.region
    if scheme == "r2":
        return R2_REGION
    return _env("AWS_REGION") or _env("AWS_DEFAULT_REGION")


def _endpoint_label(endpoint: str | None) -> str:
    """Endpoint for messages: scheme://host:port only, so userinfo in a URL never leaks."""
    if not endpoint:
        return "the default AWS endpoint"
    parts = urlsplit(endpoint)
    if not parts.hostname:  # not a URL urlsplit understands: show it, minus any user:password@
        return redact_uri(endpoint)
    try:
        port = parts.port
    except ValueError:  # a non-numeric port; this label is built on error paths, so never raise here
        port = None
    return f"{parts.scheme}://{parts.hostname}" + (f":{port}" if port else "")


def _explicit_credentials(scheme: str, label: str = "r2://") -> dict[str, str]:
    """R2_ACCESS_KEY_ID/R2_SECRET_ACCESS_KEY for r2 when set; empty means 'use the AWS chain'."""
    if scheme != "r2":
        return {}
    key_id, secret = _env("R2_ACCESS_KEY_ID"), _env("R2_SECRET_ACCESS_KEY")
    if bool(key_id) != bool(secret):
        missing = "R2_SECRET_ACCESS_KEY" if key_id else "R2_ACCESS_KEY_ID"
        raise StorageError(f"{label}: {missing} is not set (R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY go together)")
    if not key_id:
        return {}
    _KNOWN_SECRETS.update((key_id, secret))
    return {"aws_access_key_id": key_id, "aws_secret_access_key": secret}


# ----------------------------------------------------------------------------- secrets

_KNOWN_SECRETS: set[str] = set()


def redact(text: str) -> str:
    """Replace every known credential value (env vars and resolved provider-chain keys) with ``***``."""
    secrets = set(_KNOWN_SECRETS)
    secrets.update(v for v in (_env(name) for name in SECRET_ENV_VARS) if v)
    # Longest first, so a secret that contains another is removed whole.
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _remember_credentials(session) -> None:
    """Record the provider chain's resolved keys so redact() can remove them from logs."""
    creds = session.get_credentials()
    if creds is None:
        return
    frozen = creds.get_frozen_credentials()
    _KNOWN_SECRETS.update(v for v in (frozen.access_key, frozen.secret_key, frozen.token) if v)


# ----------------------------------------------------------------------------- clients

_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()


def client_config(scheme: str, endpoint: str | None):
    """botocore Config: standard retries, bounded timeouts; R2 gets path style and no CRC32 trailers."""
    from botocore.config import Config

    options: dict = dict(
        retries={"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},  # 5 tries in all
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=TRANSFER_THREADS * 4,
    )
    if endpoint:
        # Custom endpoints (R2, moto, MinIO) serve buckets under the path, not as subdomains.
        options["s3"] = {"addressing_style": "path"}
    if _is_r2(scheme, endpoint):
        # boto3 >= 1.36 adds CRC32 checksum trailers that R2 rejects with a misleading error.
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return Config(**options)


def _credentials_fingerprint() -> str:
    """Cache key part that changes when credential env vars change, without storing the values."""
    names = SECRET_ENV_VARS + ("AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")
    blob = "\0".join(os.environ.get(n, "") for n in names)
    return hashlib.sha256(blob.encode()).hexdigest()


def s3_client(scheme: str, *, endpoint_url: str | None = None, region: str | None = None):
    """A (cached, thread-safe) boto3 S3 client for ``s3`` or ``r2`` (a URI is accepted too)."""
    import boto3

    label = scheme if "://" in scheme else f"{scheme}://"
    scheme = _scheme_of(scheme)
    endpoint = endpoint_for(scheme, endpoint_url, uri=label)
    region_name = _region_for(scheme, region)
    cache_key = (scheme, endpoint, region_name, _credentials_fingerprint())
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(cache_key)
        if client is None:
            # A Session per client: boto3 sessions are not thread-safe, clients are.
            session = boto3.session.Session(**_explicit_credentials(scheme, label))
            client = session.client(
                "s3",
                endpoint_url=endpoint,
                region_name=region_name,
                config=client_config(scheme, endpoint),
            )
            _remember_credentials(session)
            _CLIENTS[cache_key] = client
    return client


def get_filesystem(uri: str | os.PathLike, *, endpoint_url: str | None = None, region: str | None = None):
    """``(pyarrow FileSystem, path without scheme)`` for Ray Train's ``RunConfig(storage_filesystem=...)``."""
    import pyarrow.fs as pafs

    parsed = parse_uri(uri)
    if not parsed.remote:
        return pafs.LocalFileSystem(), parsed.key
    endpoint = endpoint_for(parsed.scheme, endpoint_url, uri=str(parsed))
    kwargs: dict = dict(
        region=_region_for(parsed.scheme, region) or ("us-east-1" if endpoint else None),
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=READ_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=MAX_ATTEMPTS),
    )
    if endpoint:
        parts = urlsplit(endpoint)
        kwargs["scheme"] = parts.scheme or "https"
        kwargs["endpoint_override"] = parts.netloc.rpartition("@")[2] + parts.path.rstrip("/")
    creds = _explicit_credentials(parsed.scheme, str(parsed))
    if creds:
        kwargs["access_key"] = creds["aws_access_key_id"]
        kwargs["secret_key"] = creds["aws_secret_access_key"]
    path = f"{parsed.bucket}/{parsed.key}" if parsed.key else parsed.bucket
    return pafs.S3FileSystem(**kwargs), path


# ----------------------------------------------------------------------------- errors


def _error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) of a ClientError, also when wrapped by s3transfer."""
    from botocore.exceptions import ClientError

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {}) or {}
            status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
            return str(err.get("Code") or status or "Unknown"), status
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None, None


def _storage_error(uri: StorageURI, exc: BaseException, action: str, endpoint: str | None = None) -> StorageError:
    """Build a one-line StorageError from an exception without ever formatting it (no secrets)."""
    from botocore import exceptions as bex

    where = _endpoint_label(endpoint)
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return StorageError(
            f"{uri}: no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            + (", or R2_ACCESS_KEY_ID/R2_SECRET_ACCESS_KEY" if uri.scheme == "r2" else "")
            + ", or configure an AWS profile)"
        )
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ProxyConnectionError)):
        return StorageError(
            f"{uri}: cannot reach the storage endpoint {where} (connection refused, timed out or DNS failure); "
            "check storage.endpoint_url, AWS_ENDPOINT_URL/R2_ENDPOINT_URL or R2_ACCOUNT_ID"
        )
    if isinstance(exc, (bex.ReadTimeoutError, bex.ConnectionClosedError, bex.SSLError, bex.HTTPClientError)):
        return StorageError(f"{uri}: connection to {where} failed during {action} ({type(exc).__name__})")
    code, status = _error_code(exc)
    if code is None:
        if isinstance(exc, bex.BotoCoreError):
            return StorageError(f"{uri}: {action} failed ({type(exc).__name__})")
        if isinstance(exc, OSError):
            return StorageError(f"{uri}: {action} failed ({exc.strerror or type(exc).__name__})")
        return StorageError(f"{uri}: {action} failed ({type(exc).__name__})")
    if code in _CREDENTIAL_CODES:
        keys = "R2_ACCESS_KEY_ID/R2_SECRET_ACCESS_KEY or " if uri.scheme == "r2" else ""
        return StorageError(
            f"{uri}: the storage credentials were rejected ({code}) by {where}; "
            f"check {keys}AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        )
    if code in _DENIED_CODES:
        return StorageError(
            f"{uri}: access denied ({code}, HTTP {status}) during {action}; "
            "the credentials are wrong or lack permission on this bucket"
        )
    if code == "NoSuchBucket":
        return StorageError(f"{uri}: bucket '{uri.bucket}' does not exist at {where}")
    if code in _MISSING_CODES:
        return StorageError(f"{uri}: no such object")
    if code == "NotImplemented" and not _is_r2(uri.scheme, endpoint):
        # boto3's CRC32 trailers are turned off only for endpoints we recognise as R2.
        return StorageError(
            f"{uri}: {action} failed (NotImplemented, HTTP {status}); if {where} is Cloudflare R2 "
            "(e.g. behind a custom domain), use an r2:// URI so checksum trailers are turned off"
        )
    return StorageError(f"{uri}: {action} failed ({code}, HTTP {status})")


@contextlib.contextmanager
def _translate(uri: StorageURI, action: str, endpoint: str | None = None) -> Iterator[None]:
    """Turn botocore/s3transfer failures into StorageError; ``from None`` drops the raw traceback."""
    from botocore.exceptions import BotoCoreError, ClientError
    from boto3.exceptions import Boto3Error

    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error, OSError) as exc:
        raise _storage_error(uri, exc, action, endpoint) from None


def _client_for(uri: StorageURI, endpoint_url: str | None, region: str | None):
    """(client, endpoint) for a parsed remote URI; configuration errors name the URI."""
    endpoint = endpoint_for(uri.scheme, endpoint_url, uri=str(uri))
    try:
        client = s3_client(str(uri), endpoint_url=endpoint_url, region=region)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore setup errors (bad endpoint, unknown profile)
        # Only the type: botocore's text can quote the endpoint URL with its userinfo.
        raise StorageError(
            f"{uri}: cannot set up a storage client for {_endpoint_label(endpoint)} ({type(exc).__name__}); "
            "check storage.endpoint_url, AWS_ENDPOINT_URL/R2_ENDPOINT_URL and AWS_PROFILE"
        ) from None
    return client, endpoint


def _is_missing(exc: BaseException) -> bool:
    code, status = _error_code(exc)
    return code in _MISSING_CODES or status == 404 and code != "NoSuchBucket"


# ----------------------------------------------------------------------------- objects


class ObjectInfo(NamedTuple):
    """One file under a prefix: key relative to the prefix (``/``-separated), size, ETag (None locally)."""

    key: str
    size: int
    etag: str | None


def _iter_remote(client, uri: StorageURI) -> Iterator[tuple[str, int, str]]:
    """(full key, size, etag) under a prefix; paginated, skipping ``prefix/`` folder markers."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=uri.bucket, Prefix=_prefix(uri.key)):
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            if key.endswith("/"):  # zero-byte markers written by pyarrow's create_dir
                continue
            yield key, int(obj["Size"]), obj.get("ETag", "").strip('"')


def list_files(uri: str | os.PathLike, *, endpoint_url: str | None = None, region: str | None = None) -> list[ObjectInfo]:
    """All files under a prefix or folder, sorted by relative key. A missing prefix gives []."""
    parsed = parse_uri(uri)
    if not parsed.remote:
        return _list_local(parsed.key)
    client, endpoint = _client_for(parsed, endpoint_url, region)
    start = len(_prefix(parsed.key))
    with _translate(parsed, "listing", endpoint):
        found = [ObjectInfo(key[start:], size, etag) for key, size, etag in _iter_remote(client, parsed)]
    return sorted(found)


def _list_local(root: str) -> list[ObjectInfo]:
    if not os.path.isdir(root):
        return []
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            found.append(ObjectInfo(rel, os.path.getsize(full), None))
    return sorted(found)


def exists(uri: str | os.PathLike, *, endpoint_url: str | None = None, region: str | None = None) -> bool:
    """True if the object, or any object under the prefix, exists. Access errors raise StorageError."""
    parsed = parse_uri(uri)
    if not parsed.remote:
        return os.path.exists(parsed.key)
    client, endpoint = _client_for(parsed, endpoint_url, region)
    from botocore.exceptions import ClientError

    with _translate(parsed, "existence check", endpoint):
        if not parsed.key:
            try:
                client.head_bucket(Bucket=parsed.bucket)
                return True
            except ClientError as exc:
                if _error_code(exc)[1] == 404:
                    return False
                raise
        if _head(client, parsed) is not None:
            return True
        page = client.list_objects_v2(Bucket=parsed.bucket, Prefix=_prefix(parsed.key), MaxKeys=1)
        return page.get("KeyCount", 0) > 0


def _head(client, uri: StorageURI) -> dict | None:
    """head_object, or None when the key does not exist (a missing bucket still raises)."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=uri.bucket, Key=uri.key)
    except ClientError as exc:
        if _is_missing(exc):
            return None
        raise


def read_bytes(uri: str | os.PathLike, *, endpoint_url: str | None = None, region: str | None = None) -> bytes:
    """The whole content of one file or object."""
    parsed = parse_uri(uri)
    if not parsed.remote:
        try:
            with open(parsed.key, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise StorageError(f"{parsed}: cannot read ({exc.strerror})") from None
    client, endpoint = _client_for(parsed, endpoint_url, region)
    with _translate(parsed, "download", endpoint):
        return client.get_object(Bucket=parsed.bucket, Key=parsed.key)["Body"].read()


def write_bytes(
    uri: str | os.PathLike, data: bytes, *, endpoint_url: str | None = None, region: str | None = None
) -> str:
    """Write one file or object; local writes are atomic (temp file + rename). Returns the URI."""
    parsed = parse_uri(uri)
    if not parsed.remote:
        _atomic_write_local(parsed.key, data)
        return str(parsed)
    if not parsed.key:
        raise StorageError(f"{parsed}: cannot write an object without a key")
    client, endpoint = _client_for(parsed, endpoint_url, region)
    part_size = _part_size(None)
    with _translate(parsed, "upload", endpoint):
        if len(data) > part_size:
            _log_part_size(part_size)
            client.upload_fileobj(io.BytesIO(data), parsed.bucket, parsed.key, Config=_transfer_config(part_size))
        else:
            client.put_object(Bucket=parsed.bucket, Key=parsed.key, Body=data)
    return str(parsed)


def read_text(uri: str | os.PathLike, **kwargs) -> str:
    """UTF-8 text of one file or object."""
    return read_bytes(uri, **kwargs).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str, **kwargs) -> str:
    """Write UTF-8 text to one file or object (atomic locally)."""
    return write_bytes(uri, text.encode("utf-8"), **kwargs)


def delete(uri: str | os.PathLike, *, endpoint_url: str | None = None, region: str | None = None) -> int:
    """Delete one object or everything under a prefix (or a local file/folder); returns the count."""
    parsed = parse_uri(uri)
    if not parsed.remote:
        if os.path.isdir(parsed.key):
            count = len(_list_local(parsed.key))
            shutil.rmtree(parsed.key)
            return count
        if os.path.exists(parsed.key):
            os.remove(parsed.key)
            return 1
        return 0
    client, endpoint = _client_for(parsed, endpoint_url, region)
    with _translate(parsed, "delete", endpoint):
        keys = [k for k, _, _ in _iter_remote(client, parsed)]
        if parsed.key and _head(client, parsed) is not None:
            keys.append(parsed.key)
        for start in range(0, len(keys), 1000):  # delete_objects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            client.delete_objects(Bucket=parsed.bucket, Delete={"Objects": batch, "Quiet": True})
    return len(keys)


def _atomic_write_local(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise StorageError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # small files (pointers, meta.json, manifests): cheap, and survive a crash
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------- transfers

_LOGGED_PART_SIZES: set[int] = set()


def _check_part_size(part_size: int) -> None:
    if part_size < MIN_PART_SIZE:
        raise StorageError(f"multipart part size {part_size} bytes is below the S3/R2 minimum of 5 MiB")


def _part_size(part_size: int | None) -> int:
    """Explicit > configure() > $RAYTIMM_S3_PART_SIZE_MB > 16 MiB."""
    if part_size is None:
        part_size = _settings.part_size
    if part_size is None and _env("RAYTIMM_S3_PART_SIZE_MB"):
        try:
            part_size = int(float(_env("RAYTIMM_S3_PART_SIZE_MB")) * MiB)
        except ValueError:
            raise StorageError("RAYTIMM_S3_PART_SIZE_MB: expected a number of MiB") from None
    part_size = part_size or DEFAULT_PART_SIZE
    _check_part_size(part_size)
    return part_size


def _transfer_config(part_size: int):
    """Threshold == chunk size, so every multipart part has the same size except the last (R2 needs that)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=part_size,
        multipart_chunksize=part_size,
        max_concurrency=4,
        use_threads=True,
    )


def _log_part_size(part_size: int) -> None:
    if part_size not in _LOGGED_PART_SIZES:
        _LOGGED_PART_SIZES.add(part_size)
        log.info("object storage multipart uploads use fixed %.1f MiB parts", part_size / MiB)


def upload(
    local_path: str | os.PathLike,
    uri: str | os.PathLike,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    part_size: int | None = None,
) -> str:
    """Upload a file to an object key, or a folder under a prefix (multipart with fixed part size)."""
    src = os.path.abspath(os.fspath(local_path))
    parsed = parse_uri(uri)
    if not os.path.exists(src):
        raise StorageError(f"{src}: no such file or folder to upload")
    files = [(src, "")] if os.path.isfile(src) else [
        (os.path.join(src, info.key), info.key) for info in _list_local(src)
    ]
    if not parsed.remote:
        for path, rel in files:
            _copy_local(path, os.path.join(parsed.key, rel) if rel else parsed.key)
        return str(parsed)
    if os.path.isfile(src) and not parsed.key:
        raise StorageError(f"{parsed}: uploading a file needs an object key, not a bare bucket")
    client, endpoint = _client_for(parsed, endpoint_url, region)
    size = _part_size(part_size)
    config = _transfer_config(size)
    if any(os.path.getsize(path) > size for path, _ in files):
        _log_part_size(size)

    def put(item: tuple[str, str]) -> None:
        path, rel = item
        target = parse_uri(join(str(parsed), rel)) if rel else parsed
        with _translate(target, "upload", endpoint):
            client.upload_file(path, target.bucket, target.key, Config=config)

    _run_parallel(put, files)
    return str(parsed)


def download(
    uri: str | os.PathLike,
    local_path: str | os.PathLike,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> str:
    """Download one object to a file, or everything under a prefix into a folder; returns local_path."""
    dest = os.path.abspath(os.fspath(local_path))
    parsed = parse_uri(uri)
    if not parsed.remote:
        if os.path.isfile(parsed.key):
            _copy_local(parsed.key, dest)
        elif os.path.isdir(parsed.key):
            for info in _list_local(parsed.key):
                _copy_local(os.path.join(parsed.key, info.key), os.path.join(dest, info.key))
        else:
            raise StorageError(f"{parsed}: no such file or folder")
        return dest
    client, endpoint = _client_for(parsed, endpoint_url, region)
    with _translate(parsed, "download", endpoint):
        head = _head(client, parsed) if parsed.key else None
        if head is not None:
            _fetch(client, parsed.bucket, parsed.key, dest)
            return dest
        objects = list(_iter_remote(client, parsed))
    if not objects:
        raise StorageError(f"{parsed}: no such object, and no objects under this prefix")
    start = len(_prefix(parsed.key))
    jobs = [(key, _safe_local_path(dest, key[start:], parsed)) for key, _, _ in objects]

    def get(item: tuple[str, str]) -> None:
        key, path = item
        with _translate(StorageURI(parsed.scheme, parsed.bucket, key), "download", endpoint):
            _fetch(client, parsed.bucket, key, path)

    _run_parallel(get, jobs)
    return dest


def _fetch(client, bucket: str, key: str, path: str, progress=None) -> None:
    """Download to a temp file next to the target, then rename: a half file is never in place."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=os.path.dirname(path))
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp, Config=_transfer_config(_part_size(None)), Callback=progress)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _copy_local(src: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=os.path.dirname(dest))
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _safe_local_path(root: str, rel: str, uri: StorageURI) -> str:
    """Map a relative object key into root; refuse keys that would escape it (``..``, absolute)."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise StorageError(f"{join(str(uri), rel) if parts else uri}: object key cannot be mapped to a local file")
    return os.path.join(root, *parts)


def _run_parallel(fn, items: list) -> None:
    """Run fn over items on a small thread pool; the first failure is raised."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(TRANSFER_THREADS, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


# ----------------------------------------------------------------------------- staging


@dataclass
class StageResult:
    """What stage_prefix did: the local folder and which relative keys were fetched or removed."""

    local_dir: str
    fetched: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reused: int = 0


def cache_dir_name(uri: str | os.PathLike, endpoint: str | None = None) -> str:
    """Deterministic, readable folder name for a remote prefix (same URI + endpoint -> same name)."""
    parsed = parse_uri(uri)
    digest = hashlib.sha256(f"{parsed}\0{endpoint or ''}".encode()).hexdigest()[:16]
    tail = parsed.key.rsplit("/", 1)[-1] if parsed.key else ""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(p for p in (parsed.bucket, tail) if p))[:60]
    return f"{readable}-{digest}"


def stage(
    uri: str | os.PathLike,
    cache_root: str | os.PathLike,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> str:
    """Mirror a remote prefix into a node-local cache folder once and return it; local paths pass through."""
    return stage_prefix(uri, cache_root, endpoint_url=endpoint_url, region=region).local_dir


def stage_prefix(
    uri: str | os.PathLike,
    cache_root: str | os.PathLike,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> StageResult:
    """stage() with a report of what was fetched, removed and reused (see stage)."""
    parsed = parse_uri(uri)
    if not parsed.remote:
        return StageResult(parsed.key)
    client, endpoint = _client_for(parsed, endpoint_url, region)
    root = os.path.abspath(os.fspath(cache_root))
    name = cache_dir_name(parsed, endpoint)
    local_dir = os.path.join(root, name)
    os.makedirs(root, exist_ok=True)
    # One lock per prefix and node: concurrent workers wait, then find everything already current.
    with _file_lock(os.path.join(root, f"{name}.lock")):
        with _translate(parsed, "listing", endpoint):
            remote = {key: (size, etag) for key, size, etag in _iter_remote(client, parsed)}
        if not remote:
            raise StorageError(f"{parsed}: no objects under this prefix at {_endpoint_label(endpoint)}")
        start = len(_prefix(parsed.key))
        remote = {key[start:]: value for key, value in remote.items()}
        return _sync(client, parsed, endpoint, remote, local_dir, os.path.join(root, f"{name}.manifest.json"))


def _sync(client, uri, endpoint, remote: dict, local_dir: str, manifest_path: str) -> StageResult:
    """Bring local_dir in line with the remote listing, trusting only files the manifest vouches for."""
    manifest = _load_manifest(manifest_path)
    result = StageResult(local_dir)
    todo = []
    for rel, (size, etag) in sorted(remote.items()):
        path = _safe_local_path(local_dir, rel, uri)
        known = manifest.get(rel)
        if known == [size, etag] and os.path.isfile(path) and os.path.getsize(path) == size:
            result.reused += 1
        else:
            todo.append((rel, path, size))
    result.removed = _remove_stale(local_dir, set(remote))
    if todo:
        _fetch_all(client, uri, endpoint, todo)
        result.fetched = [rel for rel, _, _ in todo]
    if todo or result.removed or set(manifest) != set(remote):
        _atomic_write_local(manifest_path, json.dumps(
            {"uri": str(uri), "objects": {rel: [s, e] for rel, (s, e) in sorted(remote.items())}}, indent=0
        ).encode())
    log.info(
        "staged %s -> %s: %d fetched, %d reused, %d removed",
        uri, local_dir, len(result.fetched), result.reused, len(result.removed),
    )
    return result


def _fetch_all(client, uri: StorageURI, endpoint, todo: list[tuple[str, str, int]]) -> None:
    from tqdm.auto import tqdm

    total = sum(size for _, _, size in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"staging {uri}", disable=not sys.stderr.isatty()) as bar:
        lock = threading.Lock()

        def progress(n: int) -> None:
            with lock:
                bar.update(n)

        def get(item: tuple[str, str, int]) -> None:
            rel, path, _ = item
            target = StorageURI(uri.scheme, uri.bucket, "/".join(p for p in (uri.key, rel) if p))
            with _translate(target, "download", endpoint):
                _fetch(client, uri.bucket, target.key, path, progress)

        _run_parallel(get, todo)


def _remove_stale(local_dir: str, wanted: set[str]) -> list[str]:
    """Delete files (incl. leftover ``.part`` temp files) that are no longer in the remote listing."""
    removed = []
    for info in _list_local(local_dir):
        if info.key not in wanted:
            os.remove(os.path.join(local_dir, *info.key.split("/")))
            removed.append(info.key)
    for dirpath, dirnames, filenames in os.walk(local_dir, topdown=False):
        if dirpath != local_dir and not dirnames and not filenames:
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
    return removed


def _load_manifest(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return dict(json.load(fh).get("objects", {}))
    except (OSError, ValueError, AttributeError):
        return {}  # missing or corrupt: nothing is trusted, everything is compared afresh


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive fcntl lock; works across processes (Ray workers) and threads on one node."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- preflight

PREFLIGHT_WANTS = ("read", "write", "dataset")


def preflight(
    uri: str | os.PathLike,
    *,
    want: str = "read",
    endpoint_url: str | None = None,
    region: str | None = None,
) -> None:
    """Check a URI before workers start: readable, writable, or a dataset with images; else StorageError."""
    if want not in PREFLIGHT_WANTS:
        raise ValueError(f"preflight want={want!r}: expected one of {PREFLIGHT_WANTS}")
    parsed = parse_uri(uri)
    if not parsed.remote:
        _preflight_local(parsed, want)
        return
    client, endpoint = _client_for(parsed, endpoint_url, region)
    with _translate(parsed, "preflight", endpoint):
        if want == "write":
            _probe_write(client, parsed)
            return
        keys = _first_keys(client, parsed, want)
    if not keys:
        if parsed.key and want == "read":
            with _translate(parsed, "preflight", endpoint):
                if _head(client, parsed) is not None:
                    return  # a single object (e.g. a legacy best.pt)
        raise StorageError(f"{parsed}: no objects under this prefix in bucket '{parsed.bucket}'")
    if want == "dataset" and not any(_is_dataset_file(k) for k in keys):
        raise StorageError(f"{parsed}: {_no_images_message(len(keys))}")


def _first_keys(client, uri: StorageURI, want: str) -> list[str]:
    """Keys under the prefix; for 'read' one is enough, for 'dataset' stop at the first image."""
    found = []
    for key, _, _ in _iter_remote(client, uri):
        found.append(key)
        if want == "read" or _is_dataset_file(key):
            break
    return found


def _probe_write(client, uri: StorageURI) -> None:
    """Put and delete a tiny object: proves the bucket exists and the keys may write."""
    probe = "/".join(p for p in (uri.key, f".raytimm-preflight-{os.getpid()}-{threading.get_ident()}") if p)
    client.put_object(Bucket=uri.bucket, Key=probe, Body=b"ok")
    client.delete_object(Bucket=uri.bucket, Key=probe)


def _is_dataset_file(key: str) -> bool:
    return key.lower().endswith(DATASET_EXTENSIONS + DICE_EXTENSIONS)


def _no_images_message(count: int) -> str:
    return (
        f"no images under this prefix ({count} objects, none with extension "
        f"{'/'.join(e.lstrip('.') for e in DATASET_EXTENSIONS)} and no DICE .json)"
    )


def _preflight_local(uri: StorageURI, want: str) -> None:
    path = uri.key
    if want == "write":
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".raytimm-preflight-"):
                pass
        except OSError as exc:
            raise StorageError(f"{path}: not writable ({exc.strerror})") from None
        return
    if not os.path.exists(path):
        raise StorageError(f"{path}: no such file or folder")
    if want == "dataset":
        if os.path.isfile(path):
            raise StorageError(f"{path}: a dataset must be a folder, not a file")
        count = 0
        for info in _iter_local_keys(path):
            count += 1
            if _is_dataset_file(info):
                return
        raise StorageError(f"{path}: {_no_images_message(count)}")


def _iter_local_keys(root: str) -> Iterable[str]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield os.path.join(dirpath, name)

"""Clients for ``s3://`` and ``r2://``: endpoint and region, botocore and pyarrow settings, errors.

**Endpoint and region are process settings.** :func:`configure` sets them once per process from the
run's config (``storage.endpoint_url``/``storage.region``), and no storage function takes them as
arguments. Why this contract and not per-call arguments:

- They belong to the deployment, not to a call: everything a run touches (data, checkpoints,
  pointers, Ray's own files) is in one store, and botocore itself reads them per process
  (``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``).
- Per-call arguments had to be threaded through checkpoint, model, predict, tune and serve, and a
  call that forgot them silently went to another endpoint (Tune's pointer writes did). With one
  setting there is one call per process *entry point*: the driver (``train``, ``tune``), each Train
  worker (``train_loop_per_worker``), and the Train controller's callback, which carries the values
  because Ray starts the controller with only its own variables.
- The setting lives in this process's environment (``RAYTIMM_STORAGE_ENDPOINT_URL``/``_REGION``,
  :mod:`raytimm.envvars`), so every Ray worker or Serve replica the driver starts inherits it
  through the forwarded variables, as it does ``AWS_ENDPOINT_URL``.

Resolution: configured > (s3) ``AWS_ENDPOINT_URL_S3`` > ``AWS_ENDPOINT_URL``; (r2) ``R2_ENDPOINT_URL``
> ``AWS_ENDPOINT_URL`` > ``https://$R2_ACCOUNT_ID.r2.cloudflarestorage.com``. None = AWS itself.

Credentials come only from the environment or the AWS provider chain. They are never put in a
message: failures are reported as ``<uri>: <what is wrong>`` built from the error *code*, never by
formatting a botocore exception.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import threading
from typing import Iterator
from urllib.parse import urlsplit

from raytimm.envvars import STORAGE_ENDPOINT_ENV, STORAGE_REGION_ENV
from raytimm.errors import StorageError
from raytimm.secrets import redact_uri
from raytimm.storage.uri import StorageURI, parse_uri

R2_ENDPOINT_TEMPLATE = "https://{account_id}.r2.cloudflarestorage.com"
R2_REGION = "auto"
TRANSFER_THREADS = 8

# Retries, on purpose. botocore's "legacy" mode retries connection errors, 5xx, throttling and S3's
# RequestTimeout (never another 4xx) and waits rand(0,1) * 2**i s before retry i. With 8 attempts the
# 7 waits add up to 63 s on average and 127 s at most, and to less than 10 s with probability ~3e-4
# (computed from that formula): a 10 s bucket outage (a restart, a network blip) is ridden out, and a
# longer one ends in a StorageError naming the URI within about two minutes. Not "standard" mode:
# its retry quota (500 tokens, 14 per retry, per client) runs dry after ~35 retries, so the 4 parts
# of one multipart upload waiting out the same outage would exhaust it and fail.
# AWS_MAX_ATTEMPTS, botocore's own variable, overrides the count (fewer attempts fail sooner).
RETRY_MODE = "legacy"
MAX_ATTEMPTS = 8
# The preflight answers someone at a terminal: a wrong endpoint must fail in a second, not minutes.
PROBE_MAX_ATTEMPTS = 3
# A call someone is waiting on (an HTTP request to Serve: /inference/quick resolving and loading a bucket
# checkpoint) retries as briefly, inside ``retry_budget(REQUEST_MAX_ATTEMPTS)``: 2 waits of at most 1 s and
# 2 s, so an outage is answered with a 502 in seconds; with MAX_ATTEMPTS the request would hang for a
# minute or two (measured: see BENCHMARKS.md "Reliability") and the client's own timeout would answer.
REQUEST_MAX_ATTEMPTS = 3
# pyarrow's S3FileSystem (Ray's storage_filesystem: Ray's own files, resume downloads) retries with the
# AWS C++ SDK. Its default strategy waits 25 ms * 2**i before retry i, without jitter (against a closed
# port: 8 attempts gave up after 6.4 s, 10 after 25.6 s), so 10 attempts always wait 25.5 s in all.
PYARROW_MAX_ATTEMPTS = 10
CONNECT_TIMEOUT_S = 10  # a blackholed endpoint costs at most this per attempt
READ_TIMEOUT_S = 60  # silence within one response; a 16 MiB part on a slow link must not trip it

# Environment variables that hold credentials; the client cache is keyed on a hash of their values.
CREDENTIAL_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY",
    "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
)
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


# ----------------------------------------------------------------------------- settings


def configure(*, endpoint_url: str | None = None, region: str | None = None) -> None:
    """Set this process's storage endpoint and region (``storage.endpoint_url``/``region``); None clears.

    Ray workers and Serve replicas started afterwards inherit them (see the module docstring).
    """
    for name, value in ((STORAGE_ENDPOINT_ENV, endpoint_url), (STORAGE_REGION_ENV, region)):
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def endpoint_for(scheme: str, *, uri: str | None = None) -> str | None:
    """Endpoint URL for ``s3``/``r2`` (or a URI of either): see the resolution order above."""
    label = uri or (scheme if "://" in scheme else f"{scheme}://")
    scheme = _scheme_of(scheme)
    configured = _env(STORAGE_ENDPOINT_ENV)
    if configured:
        return configured
    if scheme == "s3":
        return _env("AWS_ENDPOINT_URL_S3") or _env("AWS_ENDPOINT_URL")
    found = _env("R2_ENDPOINT_URL") or _env("AWS_ENDPOINT_URL")
    if found:
        return found
    account = _env("R2_ACCOUNT_ID")
    if account:
        return R2_ENDPOINT_TEMPLATE.format(account_id=account)
    raise StorageError(f"{label}: no R2 endpoint: set R2_ACCOUNT_ID, R2_ENDPOINT_URL or storage.endpoint_url")


def _scheme_of(scheme_or_uri: str) -> str:
    scheme = scheme_or_uri.lower().rstrip(":/") if "://" not in scheme_or_uri else parse_uri(scheme_or_uri).scheme
    if scheme not in ("s3", "r2"):
        raise StorageError(f"{scheme_or_uri}: not an object-store scheme (expected s3 or r2)")
    return scheme


def is_r2(scheme: str, endpoint: str | None) -> bool:
    """R2 quirks apply to r2:// and to s3:// URIs that point at an R2 endpoint."""
    host = (urlsplit(endpoint).hostname or "") if endpoint else ""
    return scheme == "r2" or host.endswith(".r2.cloudflarestorage.com")


def _region_for(scheme: str) -> str | None:
    configured = _env(STORAGE_REGION_ENV)
    if configured:
        return configured
    if scheme == "r2":
        return R2_REGION
    return _env("AWS_REGION") or _env("AWS_DEFAULT_REGION")


def max_attempts(default: int = MAX_ATTEMPTS) -> int:
    """Attempts per request: ``$AWS_MAX_ATTEMPTS`` when set, else ``default``."""
    text = _env("AWS_MAX_ATTEMPTS")
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise StorageError(f"AWS_MAX_ATTEMPTS={text!r}: expected a whole number of attempts >= 1")
    return value


def endpoint_label(endpoint: str | None) -> str:
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
    return {"aws_access_key_id": key_id, "aws_secret_access_key": secret}


# ----------------------------------------------------------------------------- clients

_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()
# Attempts for the storage calls of one scope (a thread, or an asyncio task and the threads it hands
# work to with asyncio.to_thread, which copies the context); None: the process's budget.
_SCOPED_ATTEMPTS: contextvars.ContextVar[int | None] = contextvars.ContextVar("raytimm_storage_attempts",
                                                                               default=None)


@contextlib.contextmanager
def retry_budget(attempts: int) -> Iterator[None]:
    """Storage calls in this block (this thread or task only) make at most ``attempts`` attempts each."""
    token = _SCOPED_ATTEMPTS.set(max(1, int(attempts)))
    try:
        yield
    finally:
        _SCOPED_ATTEMPTS.reset(token)


def client_config(scheme: str, endpoint: str | None, *, attempts: int = MAX_ATTEMPTS):
    """botocore Config: the retries above, bounded timeouts; R2 gets path style and no CRC32 trailers."""
    from botocore.config import Config

    options: dict = dict(
        retries={"mode": RETRY_MODE, "total_max_attempts": attempts},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=TRANSFER_THREADS * 4,
    )
    if endpoint:
        # Custom endpoints (R2, moto, MinIO) serve buckets under the path, not as subdomains.
        options["s3"] = {"addressing_style": "path"}
    if is_r2(scheme, endpoint):
        # boto3 >= 1.36 adds CRC32 checksum trailers that R2 rejects with a misleading error.
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return Config(**options)


def _credentials_fingerprint() -> str:
    """Cache key part that changes when credential env vars change, without storing the values."""
    blob = "\0".join(os.environ.get(n, "") for n in CREDENTIAL_ENV_VARS)
    return hashlib.sha256(blob.encode()).hexdigest()


def s3_client(scheme: str, *, probe: bool = False):
    """A (cached, thread-safe) boto3 S3 client for ``s3`` or ``r2`` (a URI is accepted too).

    ``probe=True`` gives the preflight's client, which retries only briefly (PROBE_MAX_ATTEMPTS).
    """
    import boto3

    label = scheme if "://" in scheme else f"{scheme}://"
    scheme = _scheme_of(scheme)
    endpoint = endpoint_for(scheme, uri=label)
    region_name = _region_for(scheme)
    scoped = _SCOPED_ATTEMPTS.get()
    attempts = PROBE_MAX_ATTEMPTS if probe else min(scoped, max_attempts()) if scoped else max_attempts()
    cache_key = (scheme, endpoint, region_name, attempts, _credentials_fingerprint())
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(cache_key)
        if client is None:
            # A Session per client: boto3 sessions are not thread-safe, clients are.
            session = boto3.session.Session(**_explicit_credentials(scheme, label))
            client = session.client(
                "s3",
                endpoint_url=endpoint,
                region_name=region_name,
                config=client_config(scheme, endpoint, attempts=attempts),
            )
            _CLIENTS[cache_key] = client
    return client


def get_filesystem(uri: str | os.PathLike):
    """``(pyarrow FileSystem, path without scheme)`` for Ray's ``storage_filesystem`` (Train and Tune)."""
    import pyarrow.fs as pafs

    parsed = parse_uri(uri)
    if not parsed.remote:
        return pafs.LocalFileSystem(), parsed.key
    from raytimm.storage.arrowfs import RetryingS3FileSystem

    endpoint = endpoint_for(parsed.scheme, uri=str(parsed))
    kwargs: dict = dict(
        region=_region_for(parsed.scheme) or ("us-east-1" if endpoint else None),
        connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=READ_TIMEOUT_S,
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
    return RetryingS3FileSystem(max_attempts(PYARROW_MAX_ATTEMPTS), **kwargs), path


def client_for(uri: StorageURI, *, probe: bool = False):
    """(client, endpoint) for a parsed remote URI; configuration errors name the URI."""
    endpoint = endpoint_for(uri.scheme, uri=str(uri))
    try:
        client = s3_client(str(uri), probe=probe)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore setup errors (bad endpoint, unknown profile)
        # Only the type: botocore's text can quote the endpoint URL with its userinfo.
        raise StorageError(
            f"{uri}: cannot set up a storage client for {endpoint_label(endpoint)} ({type(exc).__name__}); "
            "check storage.endpoint_url, AWS_ENDPOINT_URL/R2_ENDPOINT_URL and AWS_PROFILE"
        ) from None
    return client, endpoint


# ----------------------------------------------------------------------------- errors


def error_code(exc: BaseException) -> tuple[str | None, int | None]:
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


def is_missing(exc: BaseException) -> bool:
    """Whether a ClientError means 'no such key' (a missing bucket is not 'missing')."""
    code, status = error_code(exc)
    return code in _MISSING_CODES or status == 404 and code != "NoSuchBucket"


def storage_error(uri: StorageURI, exc: BaseException, action: str, endpoint: str | None = None) -> StorageError:
    """Build a one-line StorageError from an exception without ever formatting it (no secrets)."""
    from botocore import exceptions as bex

    where = endpoint_label(endpoint)
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
    code, status = error_code(exc)
    if code is None:
        if isinstance(exc, OSError) and not isinstance(exc, bex.BotoCoreError):
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
    if code == "NotImplemented" and not is_r2(uri.scheme, endpoint):
        # boto3's CRC32 trailers are turned off only for endpoints we recognise as R2.
        return StorageError(
            f"{uri}: {action} failed (NotImplemented, HTTP {status}); if {where} is Cloudflare R2 "
            "(e.g. behind a custom domain), use an r2:// URI so checksum trailers are turned off"
        )
    return StorageError(f"{uri}: {action} failed ({code}, HTTP {status})")


@contextlib.contextmanager
def translate(uri: StorageURI, action: str, endpoint: str | None = None) -> Iterator[None]:
    """Turn botocore/s3transfer failures into StorageError; ``from None`` drops the raw traceback."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error, OSError) as exc:
        raise storage_error(uri, exc, action, endpoint) from None

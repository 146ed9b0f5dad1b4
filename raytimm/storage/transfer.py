"""Uploads and downloads of files and folders, with boto3's transfer manager and fixed-size parts.

Why boto3 here and not pyarrow (DESIGN.md, "Storage URIs"): R2 needs every multipart part but the
last to have the same size, and pyarrow's S3 multipart upload has failed against R2
(apache/arrow#34363). boto3 with ``multipart_threshold == multipart_chunksize`` cuts a file into
equal parts by construction, and the part size is logged once per process.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import shutil
import tempfile

from raytimm.errors import StorageError
from raytimm.storage.clients import TRANSFER_THREADS, client_for, translate
from raytimm.storage.objects import head, iter_remote, list_local
from raytimm.storage.uri import child, join, key_prefix, parse_uri, safe_local_path

log = logging.getLogger("raytimm.storage")

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB  # S3/R2 minimum for every part but the last
# s3transfer re-reads a download whose connection dropped mid-body (botocore's own retries end once
# a response has started); each new GetObject then gets botocore's retries (clients.py) again.
DOWNLOAD_ATTEMPTS = 3

_LOGGED_PART_SIZES: set[int] = set()


def part_size_for(explicit: int | None) -> int:
    """Multipart part size: explicit > ``$RAYTIMM_S3_PART_SIZE_MB`` > 16 MiB; StorageError below 5 MiB."""
    size = explicit
    text = os.environ.get("RAYTIMM_S3_PART_SIZE_MB", "").strip()
    if size is None and text:
        try:
            size = int(float(text) * MiB)
        except ValueError:
            raise StorageError(f"RAYTIMM_S3_PART_SIZE_MB={text!r}: expected a number of MiB") from None
    size = size or DEFAULT_PART_SIZE
    if size < MIN_PART_SIZE:
        raise StorageError(f"multipart part size {size} bytes is below the S3/R2 minimum of 5 MiB")
    return size


def transfer_config(size: int):
    """Threshold == chunk size, so every multipart part has the same size except the last (R2 needs that)."""
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=size,
        multipart_chunksize=size,
        max_concurrency=4,
        num_download_attempts=DOWNLOAD_ATTEMPTS,
        use_threads=True,
    )


def log_part_size(size: int) -> None:
    """Log the multipart part size once per process and size."""
    if size not in _LOGGED_PART_SIZES:
        _LOGGED_PART_SIZES.add(size)
        log.info("object storage multipart uploads use fixed %.1f MiB parts", size / MiB)


def upload(local_path: str | os.PathLike, uri: str | os.PathLike, *, part_size: int | None = None) -> str:
    """Upload a file to an object key, or a folder under a prefix (multipart with fixed part size)."""
    src = os.path.abspath(os.fspath(local_path))
    parsed = parse_uri(uri)
    if not os.path.exists(src):
        raise StorageError(f"{src}: no such file or folder to upload")
    files = [(src, "")] if os.path.isfile(src) else [(os.path.join(src, i.key), i.key) for i in list_local(src)]
    if not parsed.remote:
        for path, rel in files:
            copy_local(path, os.path.join(parsed.key, rel) if rel else parsed.key)
        return str(parsed)
    if os.path.isfile(src) and not parsed.key:
        raise StorageError(f"{parsed}: uploading a file needs an object key, not a bare bucket")
    client, endpoint = client_for(parsed)
    size = part_size_for(part_size)
    config = transfer_config(size)
    if any(os.path.getsize(path) > size for path, _ in files):
        log_part_size(size)

    def put(item: tuple[str, str]) -> None:
        path, rel = item
        target = child(parsed, rel)
        # An object appears at its key only when its PUT (or the multipart completion) succeeds, so
        # a failed upload leaves nothing there, never a partial object.
        with translate(target, "upload", endpoint):
            client.upload_file(path, target.bucket, target.key, Config=config)

    run_parallel(put, files)
    return str(parsed)


def download(uri: str | os.PathLike, local_path: str | os.PathLike) -> str:
    """Download one object to a file, or everything under a prefix into a folder; returns local_path."""
    dest = os.path.abspath(os.fspath(local_path))
    parsed = parse_uri(uri)
    if not parsed.remote:
        if os.path.isfile(parsed.key):
            copy_local(parsed.key, dest)
        elif os.path.isdir(parsed.key):
            for info in list_local(parsed.key):
                copy_local(os.path.join(parsed.key, info.key), os.path.join(dest, info.key))
        else:
            raise StorageError(f"{parsed}: no such file or folder")
        return dest
    client, endpoint = client_for(parsed)
    with translate(parsed, "download", endpoint):
        if parsed.key and head(client, parsed) is not None:
            fetch(client, parsed.bucket, parsed.key, dest)
            return dest
        objects = list(iter_remote(client, parsed))
    if not objects:
        raise StorageError(f"{parsed}: no such object, and no objects under this prefix")
    start = len(key_prefix(parsed.key))
    jobs = [(key[start:], safe_local_path(dest, key[start:], parsed)) for key, _, _ in objects]
    fetch_all(client, parsed, endpoint, jobs)
    return dest


def fetch_all(client, uri, endpoint: str | None, jobs: list[tuple[str, str]], progress=None) -> None:
    """Download ``(relative key, local path)`` pairs under a remote prefix on a small thread pool."""

    def get(item: tuple[str, str]) -> None:
        rel, path = item
        target = child(uri, rel)
        with translate(target, "download", endpoint):
            fetch(client, uri.bucket, target.key, path, progress)

    run_parallel(get, jobs)


def fetch(client, bucket: str, key: str, path: str, progress=None) -> None:
    """Download to a temp file next to the target, then rename: a half file is never in place."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=os.path.dirname(path))
    os.close(fd)
    try:
        client.download_file(bucket, key, tmp, Config=transfer_config(part_size_for(None)), Callback=progress)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def copy_local(src: str, dest: str) -> None:
    """Copy a local file through a temp file and rename, so dest is never half written."""
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


def run_parallel(fn, items: list) -> None:
    """Run fn over items on a small thread pool; the first failure is raised."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(TRANSFER_THREADS, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()

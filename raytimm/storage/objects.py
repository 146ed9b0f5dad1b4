"""Objects and files: list, exists, read, write and delete, for a local path or a bucket URI.

Remote calls go through boto3, not ``pyarrow.fs``, although pyarrow offers one interface over both:
measured against moto, pyarrow 25's ``S3FileSystem`` reports a missing bucket as "not found" (an empty
listing, ``exists`` False, ``FileNotFoundError`` on read) and answers a rejected key and a missing
permission alike with ``ACCESS_DENIED`` on its HEAD requests. boto3's error codes give the one-line
messages users act on ("bucket 'x' does not exist at ...", "credentials were rejected"), and one
client stack keeps one retry policy (clients.py). The local side is a few stdlib calls each.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from typing import Iterator, NamedTuple

from raytimm.errors import StorageError
from raytimm.storage.clients import client_for, error_code, is_missing, translate
from raytimm.storage.uri import StorageURI, key_prefix, parse_uri


class ObjectInfo(NamedTuple):
    """One file under a prefix: key relative to the prefix (``/``-separated), size, ETag (None locally)."""

    key: str
    size: int
    etag: str | None


def iter_remote(client, uri: StorageURI) -> Iterator[tuple[str, int, str]]:
    """(full key, size, etag) under a prefix; paginated, skipping ``prefix/`` folder markers."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=uri.bucket, Prefix=key_prefix(uri.key)):
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            if key.endswith("/"):  # zero-byte markers written by pyarrow's create_dir
                continue
            yield key, int(obj["Size"]), obj.get("ETag", "").strip('"')


def list_local(root: str) -> list[ObjectInfo]:
    """Every file under a local folder, sorted by relative key; [] when the folder is missing."""
    if not os.path.isdir(root):
        return []
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            found.append(ObjectInfo(rel, os.path.getsize(full), None))
    return sorted(found)


def list_files(uri: str | os.PathLike) -> list[ObjectInfo]:
    """All files under a prefix or folder, sorted by relative key. A missing prefix gives []."""
    parsed = parse_uri(uri)
    if not parsed.remote:
        return list_local(parsed.key)
    client, endpoint = client_for(parsed)
    start = len(key_prefix(parsed.key))
    with translate(parsed, "listing", endpoint):
        found = [ObjectInfo(key[start:], size, etag) for key, size, etag in iter_remote(client, parsed)]
    return sorted(found)


def head(client, uri: StorageURI) -> dict | None:
    """head_object, or None when the key does not exist (a missing bucket still raises)."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=uri.bucket, Key=uri.key)
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise


def exists(uri: str | os.PathLike) -> bool:
    """True if the object, or any object under the prefix, exists. Access errors raise StorageError."""
    from botocore.exceptions import ClientError

    parsed = parse_uri(uri)
    if not parsed.remote:
        return os.path.exists(parsed.key)
    client, endpoint = client_for(parsed)
    with translate(parsed, "existence check", endpoint):
        if not parsed.key:
            try:
                client.head_bucket(Bucket=parsed.bucket)
                return True
            except ClientError as exc:
                if error_code(exc)[1] == 404:
                    return False
                raise
        if head(client, parsed) is not None:
            return True
        page = client.list_objects_v2(Bucket=parsed.bucket, Prefix=key_prefix(parsed.key), MaxKeys=1)
        return page.get("KeyCount", 0) > 0


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of one file or object."""
    parsed = parse_uri(uri)
    if not parsed.remote:
        try:
            with open(parsed.key, "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise StorageError(f"{parsed}: cannot read ({exc.strerror})") from None
    client, endpoint = client_for(parsed)
    with translate(parsed, "download", endpoint):
        return client.get_object(Bucket=parsed.bucket, Key=parsed.key)["Body"].read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> str:
    """Write one file or object; local writes are atomic (temp file + fsync + rename). Returns the URI."""
    from raytimm.storage.transfer import log_part_size, part_size_for, transfer_config  # transfer imports this module

    parsed = parse_uri(uri)
    if not parsed.remote:
        atomic_write_local(parsed.key, data)
        return str(parsed)
    if not parsed.key:
        raise StorageError(f"{parsed}: cannot write an object without a key")
    client, endpoint = client_for(parsed)
    size = part_size_for(None)
    with translate(parsed, "upload", endpoint):
        if len(data) > size:  # same fixed-size parts as upload() (R2)
            log_part_size(size)
            client.upload_fileobj(io.BytesIO(data), parsed.bucket, parsed.key, Config=transfer_config(size))
        else:
            client.put_object(Bucket=parsed.bucket, Key=parsed.key, Body=data)
    return str(parsed)


def read_text(uri: str | os.PathLike) -> str:
    """UTF-8 text of one file or object."""
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> str:
    """Write UTF-8 text to one file or object (atomic locally)."""
    return write_bytes(uri, text.encode("utf-8"))


def delete(uri: str | os.PathLike) -> int:
    """Delete one object or everything under a prefix (or a local file/folder); returns the count."""
    parsed = parse_uri(uri)
    if not parsed.remote:
        if os.path.isdir(parsed.key):
            count = len(list_local(parsed.key))
            shutil.rmtree(parsed.key)
            return count
        if os.path.exists(parsed.key):
            os.remove(parsed.key)
            return 1
        return 0
    client, endpoint = client_for(parsed)
    with translate(parsed, "delete", endpoint):
        keys = [k for k, _, _ in iter_remote(client, parsed)]
        if parsed.key and head(client, parsed) is not None:
            keys.append(parsed.key)
        for start in range(0, len(keys), 1000):  # delete_objects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            client.delete_objects(Bucket=parsed.bucket, Delete={"Objects": batch, "Quiet": True})
    return len(keys)


def atomic_write_local(path: str, data: bytes) -> None:
    """Write a local file through a temp file, fsync and rename: readers see the old or the new file."""
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

"""Storage locations: parse, normalise and join local paths, ``file://``, ``s3://`` and ``r2://`` URIs.

Pure string work: no client, no network. Every other module takes its paths through here, so a
``file://`` prefix is stripped in exactly one place (:func:`local_path`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from raytimm.errors import StorageError

SCHEMES = ("file", "s3", "r2")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


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
        return StorageURI("file", "", os.path.abspath(local_path(text)))
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


def local_path(uri: str | os.PathLike) -> str | None:
    """The filesystem path of a plain path or ``file://`` URI (``~`` expanded, relative stays relative).

    None for a bucket (or any other ``scheme://``) URI, which has no local path.
    """
    text = os.fspath(uri)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme.lower() != "file":
            return None
        if not rest:
            raise StorageError(f"{text}: file:// URI without a path")
        text = rest
    return os.path.expanduser(text)


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


def key_prefix(key: str) -> str:
    """The listing prefix for a 'folder' key: ``a/b`` -> ``a/b/``, bucket root -> ``''``."""
    return f"{key}/" if key else ""


def child(uri: StorageURI, rel: str) -> StorageURI:
    """The object ``rel`` (a ``/``-separated key relative to ``uri``) under a remote prefix."""
    return StorageURI(uri.scheme, uri.bucket, "/".join(p for p in (uri.key, rel) if p))


def safe_local_path(root: str, rel: str, uri: StorageURI) -> str:
    """Map a relative object key into root; refuse keys that would escape it (``..``, absolute)."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise StorageError(f"{join(str(uri), rel) if parts else uri}: object key cannot be mapped to a local file")
    return os.path.join(root, *parts)

"""Staging: mirror a bucket prefix into the node-local cache once, and keep it current by ETag.

boto3 here (not pyarrow) because staging trusts a local file only when the listing's size and ETag
match the manifest recorded when it was fetched; pyarrow's listing has no ETags. The cache entry's
lock, last use and eviction are :mod:`raytimm.cache`'s.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Optional

from raytimm import cache
from raytimm.errors import StorageError
from raytimm.storage.clients import client_for, endpoint_label, translate
from raytimm.storage.objects import atomic_write_local, iter_remote, list_local
from raytimm.storage.transfer import fetch_all
from raytimm.storage.uri import StorageURI, key_prefix, parse_uri, safe_local_path

log = logging.getLogger("raytimm.storage")


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


def stage(uri: str | os.PathLike, cache_root: str | os.PathLike, *, max_gb: Optional[float] = None) -> str:
    """Mirror a remote prefix into a node-local cache folder once and return it; local paths pass through.

    ``max_gb`` (data.cache_max_gb) evicts least recently used cache entries after a new fetch.
    """
    return stage_prefix(uri, cache_root, max_gb=max_gb).local_dir


def stage_prefix(uri: str | os.PathLike, cache_root: str | os.PathLike, *,
                 max_gb: Optional[float] = None) -> StageResult:
    """stage() with a report of what was fetched, removed and reused (see stage)."""
    parsed = parse_uri(uri)
    if not parsed.remote:
        return StageResult(parsed.key)
    client, endpoint = client_for(parsed)
    root = os.path.abspath(os.fspath(cache_root))
    local_dir = os.path.join(root, cache_dir_name(parsed, endpoint))
    # One lock per prefix and node: concurrent workers wait, then find everything already current.
    with cache.entry_lock(local_dir):
        with translate(parsed, "listing", endpoint):
            remote = {key: (size, etag) for key, size, etag in iter_remote(client, parsed)}
        if not remote:
            raise StorageError(f"{parsed}: no objects under this prefix at {endpoint_label(endpoint)}")
        start = len(key_prefix(parsed.key))
        remote = {key[start:]: value for key, value in remote.items()}
        result = _sync(client, parsed, endpoint, remote, local_dir, f"{local_dir}.manifest.json")
        cache.mark_used(local_dir, source=str(parsed))
    if result.fetched:
        cache.after_new_entry(local_dir, max_gb)
    return result


def _sync(client, uri, endpoint, remote: dict, local_dir: str, manifest_path: str) -> StageResult:
    """Bring local_dir in line with the remote listing, trusting only files the manifest vouches for."""
    manifest = _load_manifest(manifest_path)
    result = StageResult(local_dir)
    todo = []
    for rel, (size, etag) in sorted(remote.items()):
        path = safe_local_path(local_dir, rel, uri)
        known = manifest.get(rel)
        if known == [size, etag] and os.path.isfile(path) and os.path.getsize(path) == size:
            result.reused += 1
        else:
            todo.append((rel, path, size))
    result.removed = _remove_stale(local_dir, set(remote))
    os.makedirs(local_dir, exist_ok=True)
    if todo:
        _fetch_with_progress(client, uri, endpoint, todo)
        result.fetched = [rel for rel, _, _ in todo]
    if todo or result.removed or set(manifest) != set(remote):
        _write_manifest(manifest_path, uri, remote)
    log.info(
        "staged %s -> %s: %d fetched, %d reused, %d removed",
        uri, local_dir, len(result.fetched), result.reused, len(result.removed),
    )
    return result


def _fetch_with_progress(client, uri: StorageURI, endpoint, todo: list[tuple[str, str, int]]) -> None:
    from tqdm.auto import tqdm

    total = sum(size for _, _, size in todo)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"staging {uri}", disable=not sys.stderr.isatty()) as bar:
        lock = threading.Lock()

        def progress(n: int) -> None:
            with lock:
                bar.update(n)

        fetch_all(client, uri, endpoint, [(rel, path) for rel, path, _ in todo], progress)


def _remove_stale(local_dir: str, wanted: set[str]) -> list[str]:
    """Delete files (incl. leftover ``.part`` temp files) that are no longer in the remote listing."""
    removed = []
    for info in list_local(local_dir):
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


def _write_manifest(path: str, uri: StorageURI, remote: dict) -> None:
    doc = {"uri": str(uri), "objects": {rel: [s, e] for rel, (s, e) in sorted(remote.items())}}
    atomic_write_local(path, json.dumps(doc, indent=0).encode())

"""The node-local cache (``data.cache_dir``): staged datasets and DICE conversions, their last use,
which are in use, and least-recently-used eviction under ``data.cache_max_gb``.

Layout (each entry is a folder with sidecar files beside it)::

    <cache>/datasets/<name>/             a bucket prefix staged by raytimm.storage.stage
    <cache>/datasets/<name>.lock         held exclusively while the entry is staged or removed; holds
                                         {"source", "last_used"}, rewritten on every hit
    <cache>/datasets/<name>.manifest.json  storage's record of the staged objects (ETags)
    <cache>/dice/dice-<fingerprint>/     a DICE conversion (raytimm.data.dice.ensure_dice_converted)
    <cache>/dice/dice-<fingerprint>.lock
    <cache>/onnx/<content key>/          a checkpoint's ONNX export (raytimm.export.cached_export)
    <cache>/onnx/<content key>.lock

**In use.** A process that stages or finds an entry takes a *shared* flock on the entry's folder
(under the entry's ``.lock``) and keeps it until it exits: a Train worker for its run, ``raytimm
evaluate`` for its command. Eviction takes the ``.lock`` and then an *exclusive* flock on the folder,
both without waiting, and skips the entry when either is held, so it never removes an entry that a
reader holds or that is being staged. Readers use the folder, not the ``.lock``, so a run that only
reads an entry never makes another run's staging of it wait.

**Size.** Files are counted by inode: a DICE conversion hard-links its images from its source, so a
staged DICE dataset and its conversion count once in the total, and images linked from a folder
outside the cache are not counted at all (removing the entry would free nothing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger("raytimm.cache")

GB = 1000**3  # data.cache_max_gb counts decimal gigabytes, as disk vendors and `df -H` do
KINDS = {"datasets": "dataset", "dice": "dice", "onnx": "onnx"}  # folder under the cache root -> kind `cache ls` shows
LOCK_SUFFIX = ".lock"
_EVICTED = ".evicted-"  # an entry renamed away for deletion; removed by any later prune

# Folders this process holds a shared lock on (path -> open fd), kept until the process exits.
_HELD: dict[str, int] = {}
_HELD_LOCK = threading.Lock()


@dataclasses.dataclass
class Entry:
    """One cache entry as `raytimm cache ls` shows it."""

    kind: str
    path: str
    source: str
    size: int  # bytes; hard links to files outside the cache are not counted
    last_used: float  # epoch seconds
    in_use: bool

    def to_dict(self) -> dict:
        """JSON-ready form: last use as local ISO time."""
        d = dataclasses.asdict(self)
        d["last_used"] = _dt.datetime.fromtimestamp(self.last_used).isoformat(timespec="seconds")
        return d


@dataclasses.dataclass
class PruneReport:
    """What a prune removed, what it had to keep because it was in use, and the total left."""

    removed: list[Entry]
    kept_in_use: list[Entry]
    total_bytes: int


# ----------------------------------------------------------------------------- locks and last use


@contextlib.contextmanager
def entry_lock(entry: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock on ``<entry>.lock`` while the entry is staged, converted or removed.

    Works across processes (Ray workers on one node) and threads; released when the block ends or
    the process dies. An eviction deletes the lock file while holding it, so a waiter that then gets
    a lock on the deleted file locks the new one instead.
    """
    path = f"{os.fspath(entry)}{LOCK_SUFFIX}"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def mark_used(entry: str | os.PathLike, *, source: str) -> None:
    """Record a hit on ``entry`` and hold it (shared lock) until this process exits or release().

    Call it under :func:`entry_lock`, after the entry is complete, so no eviction can come between.
    """
    path = os.path.abspath(os.fspath(entry))
    with _HELD_LOCK:
        if path not in _HELD:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_SH)
            _HELD[path] = fd
    # The record lives in the lock file, which the caller holds: writers never overlap, and a reader
    # that catches a half-written record falls back to the file's mtime, which is the same moment.
    with open(f"{path}{LOCK_SUFFIX}", "r+", encoding="utf-8") as fh:
        fh.truncate()
        json.dump({"source": source, "last_used": time.time()}, fh)


def release(entry: str | os.PathLike) -> None:
    """Stop holding ``entry`` in this process (a long-lived process that is done with it)."""
    with _HELD_LOCK:
        fd = _HELD.pop(os.path.abspath(os.fspath(entry)), None)
    if fd is not None:
        os.close(fd)


def after_new_entry(entry: str | os.PathLike, max_gb: Optional[float]) -> Optional[PruneReport]:
    """Evict least recently used entries after ``entry`` was staged or converted (no-op for None)."""
    if max_gb is None:
        return None
    return enforce_limit(Path(entry).parent.parent, max_gb)


# ----------------------------------------------------------------------------- scan, ls, prune


def cache_root(cache_dir: Optional[str] = None) -> str:
    """The cache folder: ``cache_dir``, else ``$RAYTIMM_CACHE_DIR``, else data.cache_dir's default."""
    from raytimm.config import Config
    from raytimm.envvars import CACHE_DIR_ENV

    chosen = cache_dir or os.environ.get(CACHE_DIR_ENV) or Config().data.cache_dir
    return os.path.abspath(os.path.expandvars(os.path.expanduser(chosen)))


def list_entries(cache_dir: str | os.PathLike) -> list[Entry]:
    """Every entry under the cache folder, most recently used first."""
    entries, _, _ = _scan(os.fspath(cache_dir))
    return sorted(entries, key=lambda e: e.last_used, reverse=True)


def total_bytes(cache_dir: str | os.PathLike) -> int:
    """Bytes the cache's entries occupy, each hard-linked file once."""
    _, files, outside = _scan(os.fspath(cache_dir))
    return _union_bytes(files, outside)


def prune(cache_dir: str | os.PathLike, *, max_bytes: int) -> PruneReport:
    """Remove least recently used entries not in use until the cache holds at most ``max_bytes``.

    ``max_bytes=0`` removes every entry that is not in use.
    """
    root = os.fspath(cache_dir)
    _remove_leftovers(root)
    entries, files, outside = _scan(root)
    refs: dict[tuple, int] = {}
    for per_entry in files.values():
        for ino, (_, links) in per_entry.items():
            refs[ino] = refs.get(ino, 0) + links
    total = _union_bytes(files, outside)
    removed, kept = [], []
    for entry in sorted(entries, key=lambda e: e.last_used):  # least recently used first
        if total <= max_bytes:
            break
        if not _remove(entry):
            kept.append(dataclasses.replace(entry, in_use=True))
            continue
        removed.append(entry)
        for ino, (size, links) in files[entry.path].items():
            refs[ino] -= links
            if refs[ino] == 0 and ino not in outside:
                total -= size
    return PruneReport(removed, kept, total)


def enforce_limit(cache_dir: str | os.PathLike, max_gb: float) -> PruneReport:
    """prune() to ``max_gb`` (data.cache_max_gb), logging what went and whether in-use entries exceed it."""
    limit = int(max_gb * GB)
    report = prune(cache_dir, max_bytes=limit)
    for e in report.removed:
        log.info("cache: removed %s %s (%s, last used %s) to stay under data.cache_max_gb=%g", e.kind, e.source,
                 format_size(e.size), e.to_dict()["last_used"], max_gb)
    if report.total_bytes > limit:
        log.warning("cache %s holds %s, over data.cache_max_gb=%g: the entries left are in use", cache_dir,
                    format_size(report.total_bytes), max_gb)
    return report


def format_size(size: int) -> str:
    """Human size in decimal units (the unit data.cache_max_gb uses)."""
    for unit, scale in (("GB", GB), ("MB", 1000**2), ("kB", 1000)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _scan(root: str) -> tuple[list[Entry], dict[str, dict[tuple, tuple[int, int]]], set[tuple]]:
    """Entries, each entry's files by inode ((size, links within the entry)), inodes linked from outside."""
    entries: list[Entry] = []
    files: dict[str, dict[tuple, tuple[int, int]]] = {}
    nlink: dict[tuple, int] = {}
    seen: dict[tuple, int] = {}
    for folder, kind in KINDS.items():
        parent = os.path.join(root, folder)
        if not os.path.isdir(parent):
            continue
        for name in sorted(os.listdir(parent)):
            path = os.path.join(parent, name)
            if name.startswith(".") or not os.path.isdir(path) or os.path.islink(path):
                continue
            per: dict[tuple, tuple[int, int]] = {}
            for dirpath, _, names in os.walk(path):
                for fname in names:
                    with contextlib.suppress(OSError):
                        st = os.lstat(os.path.join(dirpath, fname))
                        ino = (st.st_dev, st.st_ino)
                        size, links = per.get(ino, (st.st_size, 0))
                        per[ino] = (size, links + 1)
                        nlink[ino] = st.st_nlink
                        seen[ino] = seen.get(ino, 0) + 1
            files[path] = per
            source, last_used = _record(path)
            entries.append(Entry(kind, path, source, 0, last_used, _in_use(path)))
    outside = {ino for ino, n in nlink.items() if n > seen[ino]}
    for e in entries:
        e.size = sum(size for ino, (size, _) in files[e.path].items() if ino not in outside)
    return entries, files, outside


def _union_bytes(files: dict[str, dict[tuple, tuple[int, int]]], outside: set[tuple]) -> int:
    sizes = {ino: size for per in files.values() for ino, (size, _) in per.items() if ino not in outside}
    return sum(sizes.values())


def _record(path: str) -> tuple[str, float]:
    """(source, last use) from the entry's lock file; without a record, the lock's or folder's mtime."""
    lock_path = f"{path}{LOCK_SUFFIX}"
    try:
        with open(lock_path, encoding="utf-8") as fh:
            doc = json.load(fh)
        return str(doc.get("source") or "?"), float(doc["last_used"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        return "?", os.path.getmtime(lock_path)
    except OSError:
        return "?", os.path.getmtime(path)


def _in_use(path: str) -> bool:
    """Whether a reader holds the entry or it is being staged (checked without waiting)."""
    with _try_locks(path) as got:
        return not got


@contextlib.contextmanager
def _try_locks(path: str) -> Iterator[bool]:
    """The entry's ``.lock`` and an exclusive folder lock, without waiting; yields whether both were had."""
    lock_path = f"{path}{LOCK_SUFFIX}"
    fds: list[int] = []
    try:
        got = True
        try:
            fds.append(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644))
            fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY))
            for fd in fds:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = _same_file(fds[0], lock_path)
        except (BlockingIOError, FileNotFoundError):  # held, or removed meanwhile by another prune
            got = False
        yield got
    finally:
        for fd in fds:
            os.close(fd)


def _remove(entry: Entry) -> bool:
    """Delete an entry and its sidecars if nobody holds it; False (nothing touched) when in use."""
    parent, name = os.path.split(entry.path)
    trash = os.path.join(parent, f".{name}{_EVICTED}{uuid.uuid4().hex[:8]}")
    with _try_locks(entry.path) as got:
        if not got:
            return False
        # Renamed first: a half-deleted folder under the entry's name would look like a valid entry.
        os.rename(entry.path, trash)
        for sidecar in os.listdir(parent):
            if sidecar.startswith(f"{name}.") and sidecar != f"{name}{LOCK_SUFFIX}":
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(parent, sidecar))
        os.remove(f"{entry.path}{LOCK_SUFFIX}")  # last, while held: waiters then lock a fresh file
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _remove_leftovers(root: str) -> None:
    """Delete folders an interrupted eviction renamed away (never read by anyone)."""
    for folder in KINDS:
        parent = os.path.join(root, folder)
        if os.path.isdir(parent):
            for name in os.listdir(parent):
                if name.startswith(".") and _EVICTED in name:
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)

"""raytimm.cache: last use, in-use locks, LRU eviction, and `raytimm cache ls|prune`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from raytimm import cache

ROOT = Path(__file__).resolve().parents[1]
KB = 1000


def _entry(root: Path, kind: str, name: str, size: int, source: str) -> str:
    """A finished cache entry of ``size`` bytes, used once and no longer held by this process."""
    path = root / kind / name
    path.mkdir(parents=True)
    (path / "data.bin").write_bytes(os.urandom(size))
    with cache.entry_lock(path):
        cache.mark_used(path, source=source)
    cache.release(path)
    return str(path)


def _hit(path: str, source: str) -> None:
    with cache.entry_lock(path):
        cache.mark_used(path, source=source)
    cache.release(path)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raytimm.cli", "cache", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_prune_removes_least_recently_used_first(tmp_path):
    a = _entry(tmp_path, "datasets", "a", 10 * KB, "s3://b/a")
    b = _entry(tmp_path, "dice", "dice-b", 10 * KB, "/data/b")
    c = _entry(tmp_path, "datasets", "c", 10 * KB, "s3://b/c")
    _hit(a, "s3://b/a")  # a is now the most recently used; b the least
    assert [Path(e.path).name for e in cache.list_entries(tmp_path)] == ["a", "c", "dice-b"]

    report = cache.prune(tmp_path, max_bytes=25 * KB)
    assert [Path(e.path).name for e in report.removed] == ["dice-b"]
    assert report.total_bytes == 20 * KB == cache.total_bytes(tmp_path)
    report = cache.prune(tmp_path, max_bytes=15 * KB)
    assert [Path(e.path).name for e in report.removed] == ["c"]
    assert os.path.isdir(a) and not os.path.exists(b) and not os.path.exists(c)
    assert not os.path.exists(f"{b}.lock") and not os.path.exists(f"{c}.lock")  # sidecars go too
    assert cache.prune(tmp_path, max_bytes=0).removed[0].path == a
    assert cache.list_entries(tmp_path) == []


def test_entry_held_by_another_process_survives(tmp_path):
    old = _entry(tmp_path, "datasets", "old", 10 * KB, "s3://b/old")
    _entry(tmp_path, "datasets", "new", 10 * KB, "s3://b/new")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from raytimm import cache
        with cache.entry_lock({old!r}):
            cache.mark_used({old!r}, source="s3://b/old")
        print("held", flush=True)
        sys.stdin.readline()
        """)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert {Path(e.path).name: e.in_use for e in cache.list_entries(tmp_path)} == {"old": True, "new": False}
        report = cache.prune(tmp_path, max_bytes=0)
        assert [Path(e.path).name for e in report.removed] == ["new"]  # the LRU one is held: kept
        assert [Path(e.path).name for e in report.kept_in_use] == ["old"] and os.path.isdir(old)
    finally:
        holder.communicate("\n", timeout=60)
    assert [Path(e.path).name for e in cache.prune(tmp_path, max_bytes=0).removed] == ["old"]  # released at exit


def test_entry_in_use_by_a_thread_or_being_staged_survives(tmp_path):
    read = _entry(tmp_path, "datasets", "read", 10 * KB, "s3://b/read")
    staging = _entry(tmp_path, "dice", "dice-staging", 10 * KB, "/data/x")
    free = _entry(tmp_path, "datasets", "free", 10 * KB, "s3://b/free")
    locked, done = threading.Event(), threading.Event()

    def stager():
        with cache.entry_lock(staging):  # what storage.stage and dice hold while they write an entry
            locked.set()
            done.wait(60)

    t = threading.Thread(target=stager)
    t.start()
    try:
        locked.wait(60)
        with cache.entry_lock(read):
            cache.mark_used(read, source="s3://b/read")  # held by this process until release()
        report = cache.prune(tmp_path, max_bytes=0)
    finally:
        done.set()
        t.join()
        cache.release(read)
    assert [Path(e.path).name for e in report.removed] == ["free"] and not os.path.exists(free)
    assert sorted(Path(e.path).name for e in report.kept_in_use) == ["dice-staging", "read"]


def test_hard_links_count_once_and_outside_links_not_at_all(tmp_path):
    root = tmp_path / "cache"
    staged = _entry(root, "datasets", "ds", 30 * KB, "s3://b/dice-export")
    conv = root / "dice" / "dice-x"
    conv.mkdir(parents=True)
    os.link(os.path.join(staged, "data.bin"), conv / "img.bin")  # a conversion links the staged images
    outside = tmp_path / "user-dice" / "img.png"
    outside.parent.mkdir()
    outside.write_bytes(os.urandom(50 * KB))
    os.link(outside, conv / "user.png")  # ... or a user's own local export
    with cache.entry_lock(conv):
        cache.mark_used(conv, source=str(outside.parent))
    cache.release(conv)

    sizes = {Path(e.path).name: e.size for e in cache.list_entries(root)}
    assert sizes == {"ds": 30 * KB, "dice-x": 30 * KB}
    assert cache.total_bytes(root) == 30 * KB
    report = cache.prune(root, max_bytes=29 * KB)  # removing one entry frees nothing: both go
    assert len(report.removed) == 2 and report.total_bytes == 0
    assert outside.read_bytes()  # the user's file is untouched


def test_dice_conversion_evicts_after_a_new_entry(tmp_path):
    """ensure_dice_converted marks its entry used and prunes the cache to cache_max_gb afterwards."""
    from raytimm.data.demo import make_demo_dice
    from raytimm.data.dice import ensure_dice_converted

    src = make_demo_dice(str(tmp_path / "dice"), classes=2, per_class=4, size=16, seed=0)
    cache_dir = tmp_path / "cache"
    first = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        from raytimm.data.dice import ensure_dice_converted
        print(ensure_dice_converted({src!r}, {str(cache_dir / 'dice')!r}, seed=1, log=lambda m: None))
        """)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    second = ensure_dice_converted(src, cache_dir / "dice", seed=2, cache_max_gb=1e-9, log=lambda m: None)
    try:
        assert not os.path.exists(first)  # the earlier process is gone: its entry was the LRU one
        (entry,) = cache.list_entries(cache_dir)
        assert entry.path == second and entry.kind == "dice" and entry.source == src and entry.in_use
        # a hit of the same conversion records the new last use and converts nothing
        again = ensure_dice_converted(src, cache_dir / "dice", seed=2, cache_max_gb=1e-9, log=print)
        assert again == second and cache.list_entries(cache_dir)[0].last_used > entry.last_used
    finally:
        cache.release(second)


@pytest.mark.s3
def test_staging_records_use_and_evicts_older_datasets(s3_env, tmp_path):
    from raytimm import storage

    client = s3_env.client()
    for prefix in ("one", "two"):
        for i in range(3):
            client.put_object(Bucket=s3_env.bucket, Key=f"{prefix}/train/c/{i}.png", Body=os.urandom(2 * KB))
    datasets = tmp_path / "cache" / "datasets"
    one = storage.stage(s3_env.uri("one"), str(datasets), max_gb=1e-6)
    cache.release(one)  # the run that staged it has ended
    two = storage.stage(s3_env.uri("two"), str(datasets), max_gb=1e-6)  # 1 kB: only what is in use stays
    try:
        assert not os.path.exists(one)
        (entry,) = cache.list_entries(tmp_path / "cache")
        assert (entry.path, entry.kind, entry.source, entry.in_use) == (two, "dataset", s3_env.uri("two"), True)
        assert entry.size == 6 * KB
        again = storage.stage_prefix(s3_env.uri("one"), str(datasets))  # staged afresh after eviction
        assert len(again.fetched) == 3
        cache.release(again.local_dir)
    finally:
        cache.release(two)


def test_cli_ls_and_prune(tmp_path):
    _entry(tmp_path, "datasets", "bkt-ds-0123", 20 * KB, "s3://bkt/ds")
    _entry(tmp_path, "dice", "dice-abc", 5 * KB, "/data/dice-export")

    r = _cli("ls", "--cache-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["KIND", "SIZE", "LAST", "USED", "IN", "USE", "SOURCE"]
    assert lines[1].split()[0] == "dice" and lines[1].endswith("/data/dice-export")  # most recent first
    assert lines[2].split()[:3] == ["dataset", "20.0", "kB"] and lines[2].endswith("s3://bkt/ds")
    assert lines[-1] == f"2 entries, 25.0 kB in {tmp_path}"

    r = _cli("ls", "--json", env={"RAYTIMM_CACHE_DIR": str(tmp_path)})
    doc = json.loads(r.stdout)
    assert doc["cache_dir"] == str(tmp_path) and doc["total_bytes"] == 25 * KB
    assert [(e["kind"], e["source"], e["size"], e["in_use"]) for e in doc["entries"]] == [
        ("dice", "/data/dice-export", 5 * KB, False), ("dataset", "s3://bkt/ds", 20 * KB, False)]

    r = _cli("prune", "--cache-dir", str(tmp_path), "--max-gb", "0.00001")  # 10 kB: the older one goes
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].split()[:2] == ["removed", "dataset"]
    r = _cli("prune", "--cache-dir", str(tmp_path), "--all")
    assert "1 removed; 0 B left" in r.stdout
    assert json.loads(_cli("ls", "--json", "--cache-dir", str(tmp_path)).stdout)["entries"] == []


@pytest.mark.parametrize("args, says", [
    (["prune", "--max-gb", "0"], "--max-gb 0: expected a size in GB > 0 (--all removes every entry not in use)"),
    (["ls", "--cache-dir", "/no/such/cache"], "--cache-dir /no/such/cache: no such folder"),
])
def test_cli_errors_name_the_thing(args, says):
    r = _cli(*args)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {says}"


def test_cache_dir_that_is_a_file_is_named(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    r = _cli("ls", env={"RAYTIMM_CACHE_DIR": str(target)})
    assert r.returncode == 2 and r.stderr.strip() == f"error: cache folder {target} is not a folder; give --cache-dir a folder"


def test_cache_max_gb_must_be_positive():
    from raytimm.config import load_config
    from raytimm.errors import ConfigError

    assert load_config(None, ["data.cache_max_gb=0.5"]).data.cache_max_gb == 0.5
    with pytest.raises(ConfigError, match=r"data.cache_max_gb=-1.0 is out of range: expected a size in GB > 0"):
        load_config(None, ["data.cache_max_gb=-1"])

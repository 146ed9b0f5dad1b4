"""Bucket outages: raytimm.storage rides out a short one and fails cleanly on one that outlasts its retries.

moto's S3 server sits behind tests/fixtures/outage.py's proxy, which refuses new connections and
resets open ones while cut. Each transfer starts after the cut, so its first attempts really fail;
the proxy is restored on a timer while the call is still retrying.
"""
from __future__ import annotations

import hashlib
import os

import pytest

from raytimm import storage
from raytimm.errors import StorageError

pytestmark = pytest.mark.s3

OUTAGE_S = 6  # a short outage: well inside the retry budget of storage/clients.py


@pytest.fixture(autouse=True)
def _reset_storage_defaults():
    storage.configure()
    yield
    storage.configure()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_multipart_upload_rides_out_an_outage(s3_outage, tmp_path):
    env, proxy = s3_outage
    data = os.urandom(2 * storage.MIN_PART_SIZE + 4096)  # 3 parts, uploaded in parallel
    src = tmp_path / "model.safetensors"
    src.write_bytes(data)
    uri = env.uri("runs/r/checkpoint_000001/model.safetensors")
    storage.list_files(env.uri("runs"))  # the client now has open connections, which the cut resets

    proxy.cut_for(OUTAGE_S)
    assert proxy.is_cut
    storage.upload(str(src), uri, part_size=storage.MIN_PART_SIZE)

    assert not proxy.is_cut and proxy.cuts == 1
    body = env.client().get_object(Bucket=env.bucket, Key="runs/r/checkpoint_000001/model.safetensors")
    assert body["ETag"].strip('"').endswith("-3")
    assert _sha(body["Body"].read()) == _sha(data)


def test_download_and_staging_ride_out_an_outage(s3_outage, tmp_path):
    """A single download, then a staging that fetches 12 objects on 8 threads, each through an outage."""
    env, proxy = s3_outage
    client = env.client()
    blobs = {f"ds/train/c/{i}.png": os.urandom(4096) for i in range(12)}
    for key, data in blobs.items():
        client.put_object(Bucket=env.bucket, Key=key, Body=data)
    assert storage.exists(env.uri("ds"))  # warm connections

    proxy.cut_for(OUTAGE_S)
    dest = tmp_path / "one.png"
    storage.download(env.uri("ds/train/c/0.png"), str(dest))
    assert not proxy.is_cut
    assert dest.read_bytes() == blobs["ds/train/c/0.png"]

    proxy.cut_for(OUTAGE_S)
    staged = storage.stage_prefix(env.uri("ds"), str(tmp_path / "cache"))
    assert proxy.cuts == 2 and len(staged.fetched) == 12
    for key, data in blobs.items():
        assert (tmp_path / "cache" / os.path.basename(staged.local_dir) / key[len("ds/"):]).read_bytes() == data


def test_pyarrow_filesystem_keeps_its_retries_when_pickled(s3_outage):
    """Ray ships storage_filesystem to workers by pickling; the copy must still ride out an outage.

    pyarrow's own default (3 attempts, under 3 s of waits) cannot outlast a 4 s cut; ours (10 attempts,
    25.5 s of waits) must.
    """
    import cloudpickle

    env, proxy = s3_outage
    env.client().put_object(Bucket=env.bucket, Key="runs/x/meta.json", Body=b"{}")
    fs, path = storage.get_filesystem(env.uri("runs"))
    fs = cloudpickle.loads(cloudpickle.dumps(fs))
    assert fs.max_attempts == storage.PYARROW_MAX_ATTEMPTS

    proxy.cut_for(4)
    with fs.open_input_stream(f"{path}/x/meta.json") as fh:
        assert fh.read() == b"{}"
    assert not proxy.is_cut


def test_outage_longer_than_the_retries_fails_naming_the_uri(s3_outage, tmp_path, monkeypatch):
    """With the retry budget spent (AWS_MAX_ATTEMPTS=2 keeps this short), the error names the URI and
    nothing partial is left: no object at the key, no file at the download target."""
    env, proxy = s3_outage
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    data = os.urandom(2 * storage.MIN_PART_SIZE + 1)
    src = tmp_path / "model.safetensors"
    src.write_bytes(data)
    key = "runs/r/checkpoint_000002/model.safetensors"
    env.client().put_object(Bucket=env.bucket, Key="kept.bin", Body=b"kept")

    proxy.cut()
    try:
        with pytest.raises(StorageError) as up:
            storage.upload(str(src), env.uri(key), part_size=storage.MIN_PART_SIZE)
        dest = tmp_path / "down" / "kept.bin"
        with pytest.raises(StorageError) as down:
            storage.download(env.uri("kept.bin"), str(dest))
    finally:
        proxy.restore()

    assert str(up.value).startswith(f"{env.uri(key)}: ")
    assert str(down.value).startswith(f"{env.uri('kept.bin')}: ")
    for err in (up, down):
        assert "cannot reach the storage endpoint" in str(err.value) or "connection to" in str(err.value)
    listed = env.client().list_objects_v2(Bucket=env.bucket, Prefix="runs/")
    assert listed.get("KeyCount", 0) == 0  # no partial object at the final key
    leftovers = list((tmp_path / "down").iterdir()) if (tmp_path / "down").exists() else []
    assert leftovers == []  # no partial file at the target, no temp file beside it
    storage.download(env.uri("kept.bin"), str(dest))  # and the store answers again once it is back
    assert dest.read_bytes() == b"kept"


def test_retry_budget_shortens_retries_for_its_scope_only(s3_outage):
    """Serve reads a request's checkpoint inside retry_budget(REQUEST_MAX_ATTEMPTS): that scope's calls
    make fewer attempts and fail with the URI during an outage; other threads keep the full budget."""
    import threading

    env, proxy = s3_outage
    assert storage.s3_client("s3").meta.config.retries["total_max_attempts"] == storage.MAX_ATTEMPTS
    other: list[int] = []
    with storage.retry_budget(storage.REQUEST_MAX_ATTEMPTS):
        assert storage.s3_client("s3").meta.config.retries["total_max_attempts"] == storage.REQUEST_MAX_ATTEMPTS
        t = threading.Thread(target=lambda: other.append(
            storage.s3_client("s3").meta.config.retries["total_max_attempts"]))
        t.start()
        t.join()
        proxy.cut()
        try:
            with pytest.raises(StorageError) as err:
                storage.exists(env.uri("runs/r/checkpoint_000001/meta.json"))
        finally:
            proxy.restore()
    assert other == [storage.MAX_ATTEMPTS]
    assert str(err.value).startswith(env.uri("runs/r/checkpoint_000001/meta.json") + ": ")
    assert storage.s3_client("s3").meta.config.retries["total_max_attempts"] == storage.MAX_ATTEMPTS
    assert not storage.exists(env.uri("runs/r/checkpoint_000001/meta.json"))  # answered again once back

"""raytimm.storage against local folders and a real S3-compatible server (moto) on loopback."""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading

import pytest

from raytimm import storage
from raytimm.errors import StorageError
from tests.fixtures.s3 import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, start_moto_server
from tests.helpers_net import free_port

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _reset_storage_defaults():
    """configure() is process-wide; every test starts and ends with the defaults."""
    storage.configure()
    yield
    storage.configure()


@pytest.fixture
def no_storage_env(monkeypatch):
    """An environment with no endpoint, R2 or AWS settings, for unit tests of resolution."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "R2_ENDPOINT_URL", "R2_ACCOUNT_ID",
                 "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNITTEST0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unit-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)


def make_tree(root, files: dict[str, bytes]) -> str:
    """Write {relative path: bytes} under root; returns root as str."""
    for rel, data in files.items():
        path = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    return str(root)


def read_tree(root) -> dict[str, bytes]:
    """{relative path: bytes} of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root).replace(os.sep, "/")] = fh.read()
    return out


# --------------------------------------------------------------------------- URIs (no server)


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket/a/b.txt", ("s3", "bucket", "a/b.txt")),
        ("s3://bucket/a//b/", ("s3", "bucket", "a/b")),
        ("S3://bucket", ("s3", "bucket", "")),
        ("r2://my-bucket/", ("r2", "my-bucket", "")),
        ("r2://my.bucket/x", ("r2", "my.bucket", "x")),
        ("file:///tmp/x/../y", ("file", "", "/tmp/y")),
        ("/tmp/data", ("file", "", "/tmp/data")),
    ],
)
def test_parse_uri(uri, expected):
    parsed = storage.parse_uri(uri)
    assert (parsed.scheme, parsed.bucket, parsed.key) == expected


def test_parse_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parsed = storage.parse_uri("data/train")
    assert parsed.scheme == "file" and parsed.key == str(tmp_path / "data" / "train")
    assert not storage.is_remote("data/train") and storage.is_remote("r2://b-1/x")


@pytest.mark.parametrize(
    "uri, fragment",
    [
        ("s3://", "no bucket name"),
        ("r2:///key", "no bucket name"),
        ("s3://bad bucket/x", "invalid bucket name"),
        ("gs://bucket/x", "unsupported scheme 'gs://'"),
        ("s3://bucket/a/../b", "'..'"),
        ("", "empty"),
        ("file://", "without a path"),
    ],
)
def test_parse_uri_rejects(uri, fragment):
    with pytest.raises(StorageError) as err:
        storage.parse_uri(uri)
    assert fragment in str(err.value)
    if uri:
        assert uri in str(err.value)  # the message names the bad URI


def test_join_and_normalize(tmp_path):
    assert storage.join("s3://b-1/runs/", "x", "/ckpt/model.safetensors") == "s3://b-1/runs/x/ckpt/model.safetensors"
    assert storage.join("r2://b-1", "a/b") == "r2://b-1/a/b"
    assert storage.join("r2://b-1") == "r2://b-1"
    assert storage.join(str(tmp_path), "a", "b.txt") == os.path.join(str(tmp_path), "a", "b.txt")
    assert storage.join(f"file://{tmp_path}", "a") == os.path.join(str(tmp_path), "a")
    assert storage.normalize("s3://b-1//a///b/") == "s3://b-1/a/b"
    with pytest.raises(StorageError, match="s3://b-1/a"):
        storage.join("s3://b-1/a", "../escape")


def test_local_path_strips_file_scheme_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.local_path("file:///data/x") == "/data/x"
    assert storage.local_path("runs/a") == "runs/a"  # relative stays relative
    assert storage.local_path("file://~/w.safetensors") == str(tmp_path / "w.safetensors")
    assert storage.local_path("s3://b-1/x") is None and storage.local_path("r2://b-1/x") is None
    with pytest.raises(StorageError, match="file://: file:// URI without a path"):
        storage.local_path("file://")


# --------------------------------------------------------------------------- client config (no server)


def test_r2_client_config(no_storage_env, monkeypatch):
    monkeypatch.setenv("R2_ACCOUNT_ID", "0123abcd")
    monkeypatch.setenv("R2_ACCESS_KEY_ID", "R2KEYID-distinct")
    monkeypatch.setenv("R2_SECRET_ACCESS_KEY", "r2-secret-distinct")
    client = storage.s3_client("r2")
    cfg = client.meta.config
    assert client.meta.endpoint_url == "https://0123abcd.r2.cloudflarestorage.com"
    assert client.meta.region_name == "auto"
    assert cfg.s3["addressing_style"] == "path"
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    assert cfg.retries == {"mode": storage.RETRY_MODE, "total_max_attempts": storage.MAX_ATTEMPTS}
    assert cfg.connect_timeout == storage.CONNECT_TIMEOUT_S and cfg.read_timeout == storage.READ_TIMEOUT_S
    # R2 keys win over the AWS chain: the signed URL carries the R2 access key id, not the AWS one.
    url = client.generate_presigned_url("get_object", Params={"Bucket": "b-1", "Key": "k"})
    assert "R2KEYID-distinct" in url and "AKIAUNITTEST0000" not in url
    assert "/b-1/k" in url  # path style


def test_retry_settings_are_deliberate(no_storage_env, monkeypatch):
    """The numbers storage/clients.py explains: legacy mode, 8 attempts, bounded timeouts; a quick preflight."""
    from botocore.retryhandler import delay_exponential

    cfg = storage.s3_client("s3").meta.config
    assert cfg.retries == {"mode": "legacy", "total_max_attempts": 8}
    assert (cfg.connect_timeout, cfg.read_timeout) == (10, 60)
    assert storage.s3_client("s3", probe=True).meta.config.retries == {
        "mode": "legacy", "total_max_attempts": 3}
    # botocore's own legacy backoff for those 7 retries, rand(0,1) * 2**i s: at most 127 s, 63.5 s on
    # average (the comment's figures), far above a 10 s outage.
    assert sum(delay_exponential(1.0, 2, attempt) for attempt in range(1, storage.MAX_ATTEMPTS)) == 127
    # AWS_MAX_ATTEMPTS, botocore's variable, overrides the count; nonsense is refused by name.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert storage.s3_client("s3").meta.config.retries["total_max_attempts"] == 2
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "zero")
    with pytest.raises(StorageError, match="AWS_MAX_ATTEMPTS='zero': expected a whole number"):
        storage.s3_client("s3")


def test_pyarrow_filesystem_retries(no_storage_env, monkeypatch):
    """Ray's storage_filesystem: 10 attempts of the SDK's unjittered 25 ms * 2**i backoff, kept when pickled."""
    import cloudpickle

    monkeypatch.setenv("R2_ACCOUNT_ID", "acc")
    fs, _ = storage.get_filesystem("r2://b-1/runs")
    copy = cloudpickle.loads(cloudpickle.dumps(fs))
    assert fs.max_attempts == copy.max_attempts == 10
    assert (copy.region, copy.__reduce__()[1][1]["endpoint_override"]) == ("auto", "acc.r2.cloudflarestorage.com")


def test_r2_without_r2_keys_uses_aws_chain(no_storage_env, monkeypatch):
    monkeypatch.setenv("R2_ACCOUNT_ID", "0123abcd")
    url = storage.s3_client("r2").generate_presigned_url("get_object", Params={"Bucket": "b-1", "Key": "k"})
    assert "AKIAUNITTEST0000" in url


def test_r2_half_set_keys_is_an_error(no_storage_env, monkeypatch):
    monkeypatch.setenv("R2_ACCOUNT_ID", "0123abcd")
    monkeypatch.setenv("R2_ACCESS_KEY_ID", "R2KEYID-only")
    with pytest.raises(StorageError, match="R2_SECRET_ACCESS_KEY is not set") as err:
        storage.s3_client("r2")
    assert "R2KEYID-only" not in str(err.value)


def test_r2_without_endpoint_names_the_uri(no_storage_env):
    with pytest.raises(StorageError) as err:
        storage.read_bytes("r2://b-1/data/x.jpg")
    assert str(err.value) == (
        "r2://b-1/data/x.jpg: no R2 endpoint: set R2_ACCOUNT_ID, R2_ENDPOINT_URL or storage.endpoint_url"
    )


@pytest.mark.parametrize("env", [{"AWS_ENDPOINT_URL": "not a url://u:pw@x"}, {"AWS_PROFILE": "no-such-profile"}])
def test_client_setup_failure_is_storage_error(no_storage_env, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StorageError, match="s3://b/k: cannot set up a storage client") as e:
        storage.exists("s3://b/k")
    assert "pw" not in str(e.value)


def test_s3_client_config_keeps_boto_checksums(no_storage_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    cfg = storage.s3_client("s3").meta.config
    assert cfg.request_checksum_calculation != "when_required"
    assert cfg.s3["addressing_style"] == "path"
    # An s3:// URI pointed at an R2 endpoint still gets R2's checksum settings.
    storage.configure(endpoint_url="https://acc.r2.cloudflarestorage.com")
    r2_cfg = storage.s3_client("s3").meta.config
    assert r2_cfg.request_checksum_calculation == "when_required"


def test_endpoint_resolution(no_storage_env, monkeypatch):
    with pytest.raises(StorageError, match="R2_ACCOUNT_ID"):
        storage.endpoint_for("r2")
    assert storage.endpoint_for("s3") is None  # AWS itself
    monkeypatch.setenv("R2_ACCOUNT_ID", "acc")
    assert storage.endpoint_for("r2") == "https://acc.r2.cloudflarestorage.com"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env:1")
    assert storage.endpoint_for("r2") == "http://aws-env:1"
    assert storage.endpoint_for("s3") == "http://aws-env:1"
    monkeypatch.setenv("R2_ENDPOINT_URL", "http://r2-env:1")
    assert storage.endpoint_for("r2") == "http://r2-env:1"
    storage.configure(endpoint_url="http://configured:1")  # storage.endpoint_url wins over every variable
    assert storage.endpoint_for("s3") == "http://configured:1"
    assert storage.endpoint_for("r2") == "http://configured:1"
    storage.configure()
    assert storage.endpoint_for("s3") == "http://aws-env:1"


def test_get_filesystem_settings(no_storage_env, monkeypatch, tmp_path):
    import pyarrow.fs as pafs

    fs, path = storage.get_filesystem(str(tmp_path / "runs"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "runs")
    monkeypatch.setenv("R2_ACCOUNT_ID", "acc")
    fs, path = storage.get_filesystem("r2://b-1/runs/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "b-1/runs"
    assert fs.region == "auto"
    assert "acc.r2.cloudflarestorage.com" in repr(fs.__reduce__())


def test_part_size_minimum(monkeypatch):
    from raytimm.storage.transfer import part_size_for

    with pytest.raises(StorageError, match="5 MiB"):
        part_size_for(MiB)
    monkeypatch.setenv("RAYTIMM_S3_PART_SIZE_MB", "1")
    with pytest.raises(StorageError, match="5 MiB"):
        part_size_for(None)


# --------------------------------------------------------------------------- local paths


def test_local_roundtrip(tmp_path):
    target = tmp_path / "out" / "meta.json"
    storage.write_text(str(target), '{"a": 1}')
    assert storage.read_text(f"file://{target}") == '{"a": 1}'
    assert os.listdir(target.parent) == ["meta.json"]  # temp file renamed away
    assert storage.exists(str(target)) and not storage.exists(str(tmp_path / "nope"))
    src = make_tree(tmp_path / "src", {"a.txt": b"a", "d/b.txt": b"bb"})
    storage.upload(src, str(tmp_path / "copy"))
    assert read_tree(tmp_path / "copy") == {"a.txt": b"a", "d/b.txt": b"bb"}
    assert [tuple(i)[:2] for i in storage.list_files(src)] == [("a.txt", 1), ("d/b.txt", 2)]
    assert storage.stage(src, str(tmp_path / "cache")) == src
    assert storage.stage(f"file://{src}", str(tmp_path / "cache")) == src
    assert not (tmp_path / "cache").exists()
    with pytest.raises(StorageError, match="cannot read"):
        storage.read_bytes(str(tmp_path / "missing.bin"))


def test_local_preflight(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(StorageError, match="no images"):
        storage.preflight(str(empty), want="dataset")
    with pytest.raises(StorageError, match="no such file or folder"):
        storage.preflight(str(tmp_path / "missing"), want="read")
    make_tree(tmp_path / "ds", {"train/cat/1.JPG": b"x"})
    storage.preflight(str(tmp_path / "ds"), want="dataset")
    storage.preflight(str(tmp_path / "runs" / "new"), want="write")
    assert (tmp_path / "runs" / "new").is_dir()


def test_preflight_accepts_what_training_accepts(tmp_path):
    """The dataset preflight and the ImageFolder scan agree on image extensions (one list)."""
    from raytimm.data.folder import IMAGE_EXTENSIONS, is_image_file

    for ext in (*IMAGE_EXTENSIONS, ".gif", ".txt"):
        ds = make_tree(tmp_path / ext.lstrip("."), {f"train/cat/1{ext.upper()}": b"x"})
        if is_image_file(f"1{ext}"):
            storage.preflight(ds, want="dataset")
        else:
            with pytest.raises(StorageError, match="no images"):
                storage.preflight(ds, want="dataset")


# --------------------------------------------------------------------------- S3-compatible server


def _use_r2_endpoint(s3_env, monkeypatch) -> None:
    """r2:// against the moto endpoint set explicitly (storage.endpoint_url), with R2-specific keys."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("R2_ACCOUNT_ID", "would-be-unreachable")  # the explicit endpoint must win
    monkeypatch.setenv("R2_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("R2_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage.configure(endpoint_url=s3_env.endpoint)


@pytest.mark.s3
@pytest.mark.parametrize("scheme", ["s3", "r2"])
def test_roundtrip(s3_env, monkeypatch, tmp_path, scheme):
    if scheme == "r2":
        _use_r2_endpoint(s3_env, monkeypatch)
    files = {"train/cat/1.jpg": b"cat-1", "train/dog/2.png": b"dog-22", "val/cat/3.jpg": b"c3"}
    src = make_tree(tmp_path / "src", files)
    base = s3_env.uri("data/ds", scheme)

    assert storage.upload(src, base) == base
    assert [(i.key, i.size) for i in storage.list_files(base)] == sorted(
        (k, len(v)) for k, v in files.items()
    )
    assert storage.exists(base) and storage.exists(f"{base}/train/cat/1.jpg")
    assert not storage.exists(f"{base}/nope")

    storage.download(base, str(tmp_path / "down"))
    assert read_tree(tmp_path / "down") == files
    storage.download(f"{base}/val/cat/3.jpg", str(tmp_path / "one.jpg"))
    assert (tmp_path / "one.jpg").read_bytes() == b"c3"

    staged = storage.stage(base, str(tmp_path / "cache"))
    assert staged.startswith(str(tmp_path / "cache")) and read_tree(staged) == files

    storage.write_text(f"{base}/meta.json", '{"x": 1}')
    assert storage.read_text(f"{base}/meta.json") == '{"x": 1}'
    storage.preflight(base, want="dataset")
    storage.preflight(base, want="write")
    assert storage.delete(f"{base}/train") == 2
    assert [i.key for i in storage.list_files(base)] == ["meta.json", "val/cat/3.jpg"]


@pytest.mark.s3
def test_read_missing_object_names_it(s3_env):
    with pytest.raises(StorageError) as err:
        storage.read_bytes(s3_env.uri("nope.bin"))
    assert str(err.value) == f"{s3_env.uri('nope.bin')}: no such object"
    with pytest.raises(StorageError, match="no objects under this prefix"):
        storage.download(s3_env.uri("nothing/here"), "/tmp/never-written")


@pytest.mark.s3
def test_pyarrow_filesystem_and_markers(s3_env, tmp_path):
    """pyarrow writes `prefix/` marker objects; listings and staging must skip them."""
    fs, path = storage.get_filesystem(s3_env.uri("runs/exp"))
    assert path == f"{s3_env.bucket}/runs/exp"
    fs.create_dir(f"{path}/checkpoint_000")
    with fs.open_output_stream(f"{path}/checkpoint_000/meta.json") as out:
        out.write(b"{}")
    raw = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_env.bucket)["Contents"]]
    assert any(k.endswith("/") for k in raw), raw  # the markers really are there
    assert [i.key for i in storage.list_files(s3_env.uri("runs"))] == ["exp/checkpoint_000/meta.json"]
    staged = storage.stage(s3_env.uri("runs"), str(tmp_path / "cache"))
    assert read_tree(staged) == {"exp/checkpoint_000/meta.json": b"{}"}
    # and what boto3 wrote, pyarrow reads
    storage.write_bytes(s3_env.uri("runs/exp/x.bin"), b"from-boto3")
    with fs.open_input_stream(f"{path}/x.bin") as inp:
        assert inp.read() == b"from-boto3"


@pytest.mark.s3
def test_pyarrow_filesystem_r2(s3_env, monkeypatch):
    _use_r2_endpoint(s3_env, monkeypatch)
    fs, path = storage.get_filesystem(s3_env.uri("r", "r2"))
    with fs.open_output_stream(f"{path}/a.txt") as out:
        out.write(b"r2-data")
    assert storage.read_bytes(s3_env.uri("r/a.txt", "r2")) == b"r2-data"


@pytest.mark.s3
def test_stage_reuse_refetch_and_delete(s3_env, tmp_path):
    client = s3_env.client()
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        client.put_object(Bucket=s3_env.bucket, Key=f"ds/{name}", Body=name.encode())
    uri, cache = s3_env.uri("ds"), str(tmp_path / "cache")

    first = storage.stage_prefix(uri, cache)
    assert sorted(first.fetched) == ["a.jpg", "b.jpg", "sub/c.jpg"]
    again = storage.stage_prefix(uri, cache)
    assert again.local_dir == first.local_dir and again.fetched == [] and again.reused == 3

    client.put_object(Bucket=s3_env.bucket, Key="ds/a.jpg", Body=b"changed!")  # new ETag and size
    client.put_object(Bucket=s3_env.bucket, Key="ds/new.jpg", Body=b"new")
    client.delete_object(Bucket=s3_env.bucket, Key="ds/sub/c.jpg")
    third = storage.stage_prefix(uri, cache)
    assert sorted(third.fetched) == ["a.jpg", "new.jpg"] and third.removed == ["sub/c.jpg"]
    assert read_tree(third.local_dir) == {"a.jpg": b"changed!", "b.jpg": b"b.jpg", "new.jpg": b"new"}

    # An interrupted stage leaves a temp file and maybe a truncated one: neither is trusted.
    with open(os.path.join(third.local_dir, ".b.jpg.x.part"), "wb") as fh:
        fh.write(b"half")
    with open(os.path.join(third.local_dir, "b.jpg"), "wb") as fh:
        fh.write(b"b")
    fourth = storage.stage_prefix(uri, cache)
    assert fourth.fetched == ["b.jpg"] and fourth.removed == [".b.jpg.x.part"]
    assert read_tree(fourth.local_dir) == {"a.jpg": b"changed!", "b.jpg": b"b.jpg", "new.jpg": b"new"}


@pytest.mark.s3
def test_stage_concurrent_workers_download_once(s3_env, tmp_path):
    client = s3_env.client()
    for i in range(12):
        client.put_object(Bucket=s3_env.bucket, Key=f"ds/{i}.png", Body=os.urandom(2048))
    barrier = threading.Barrier(3)

    def worker(_):
        barrier.wait()
        return storage.stage_prefix(s3_env.uri("ds"), str(tmp_path / "cache"))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(worker, range(3)))
    assert len({r.local_dir for r in results}) == 1
    assert sorted(len(r.fetched) for r in results) == [0, 0, 12]  # exactly one worker downloaded


@pytest.mark.s3
def test_stage_cache_name_is_per_uri_and_endpoint():
    a = storage.cache_dir_name("s3://b-1/data/ds", "http://x:1")
    assert a == storage.cache_dir_name("s3://b-1/data/ds/", "http://x:1")
    assert a != storage.cache_dir_name("s3://b-1/data/ds", "http://y:1")
    assert a != storage.cache_dir_name("r2://b-1/data/ds", "http://x:1")
    assert a.startswith("b-1-ds-")


@pytest.mark.s3
def test_multipart_upload_equal_parts(s3_env, tmp_path):
    part = storage.MIN_PART_SIZE
    data = os.urandom(2 * part + 123_456)
    src = tmp_path / "model.safetensors"
    src.write_bytes(data)
    uri = s3_env.uri("ckpt/model.safetensors")
    storage.upload(str(src), uri, part_size=part)

    client = s3_env.client()
    head = client.head_object(Bucket=s3_env.bucket, Key="ckpt/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")  # really multipart, 3 parts
    sizes = [
        client.head_object(Bucket=s3_env.bucket, Key="ckpt/model.safetensors", PartNumber=n)["ContentLength"]
        for n in (1, 2, 3)
    ]
    assert sizes == [part, part, 123_456]  # equal parts except the last (R2's rule)
    storage.download(uri, str(tmp_path / "back.bin"))
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).digest() == hashlib.sha256(data).digest()


@pytest.mark.s3
@pytest.mark.slow
def test_listing_paginates_past_1000(s3_env, tmp_path):
    client = s3_env.client()
    keys = [f"many/{i:05d}.jpg" for i in range(1005)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=s3_env.bucket, Key=k, Body=b"x"), keys))
    listed = storage.list_files(s3_env.uri("many"))
    assert len(listed) == 1005 and listed[-1].key == "01004.jpg"
    assert storage.delete(s3_env.uri("many")) == 1005
    assert storage.list_files(s3_env.uri("many")) == []


# --------------------------------------------------------------------------- preflight errors


@pytest.mark.s3
def test_preflight_unreachable_endpoint(s3_env):
    closed = f"http://127.0.0.1:{free_port()}"
    storage.configure(endpoint_url=closed)
    with pytest.raises(StorageError) as err:
        storage.preflight(s3_env.uri("ds"), want="dataset")
    assert str(err.value).startswith(f"{s3_env.uri('ds')}: cannot reach the storage endpoint {closed}")


@pytest.mark.s3
def test_preflight_stopped_server(s3_env):
    server, endpoint = start_moto_server()
    server.stop()
    storage.configure(endpoint_url=endpoint)
    with pytest.raises(StorageError, match="cannot reach the storage endpoint"):
        storage.preflight(s3_env.uri("runs"), want="write")


@pytest.mark.s3
def test_preflight_missing_bucket(s3_env):
    for want in ("read", "dataset", "write"):
        with pytest.raises(StorageError) as err:
            storage.preflight("s3://no-such-bucket-xyz/ds", want=want)
        assert str(err.value).startswith("s3://no-such-bucket-xyz/ds: bucket 'no-such-bucket-xyz' does not exist")


@pytest.mark.s3
def test_preflight_wrong_keys(s3_env, s3_auth_server):
    """A server that checks keys rejects unknown ones; the message says so and names no secret."""
    storage.configure(endpoint_url=s3_auth_server.endpoint)
    for want in ("read", "write"):
        with pytest.raises(StorageError) as err:
            storage.preflight(s3_env.uri("ds"), want=want)
        msg = str(err.value)
        assert msg.startswith(f"{s3_env.uri('ds')}: the storage credentials were rejected (InvalidAccessKeyId)")
        assert FAKE_ACCESS_KEY not in msg and FAKE_SECRET_KEY not in msg


@pytest.mark.s3
def test_preflight_wrong_secret_and_no_permission(s3_env, s3_auth_server, monkeypatch):
    """A real key with a wrong secret is rejected; the right secret without a policy is denied."""
    uri = s3_env.uri("ds")
    storage.configure(endpoint_url=s3_auth_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_auth_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-for-a-real-key")
    with pytest.raises(StorageError) as rejected:
        storage.preflight(uri, want="read")
    assert str(rejected.value).startswith(f"{uri}: the storage credentials were rejected (SignatureDoesNotMatch)")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_auth_server.secret_key)
    with pytest.raises(StorageError) as denied:
        storage.preflight(uri, want="write")
    assert str(denied.value).startswith(f"{uri}: access denied (AccessDenied, HTTP 403)")
    for err in (rejected, denied):
        assert s3_auth_server.access_key not in str(err.value)
        assert s3_auth_server.secret_key not in str(err.value)


@pytest.mark.s3
def test_preflight_missing_prefix_and_no_images(s3_env):
    client = s3_env.client()
    client.put_object(Bucket=s3_env.bucket, Key="docs/readme.txt", Body=b"x")
    with pytest.raises(StorageError) as missing:
        storage.preflight(s3_env.uri("nothing"), want="dataset")
    assert str(missing.value) == f"{s3_env.uri('nothing')}: no objects under this prefix in bucket '{s3_env.bucket}'"
    with pytest.raises(StorageError) as noimg:
        storage.preflight(s3_env.uri("docs"), want="dataset")
    assert str(noimg.value).startswith(f"{s3_env.uri('docs')}: no images under this prefix (1 objects")
    storage.preflight(s3_env.uri("docs"), want="read")  # readable, just not a dataset
    storage.preflight(s3_env.uri("docs/readme.txt"), want="read")  # a single object is fine too
    client.put_object(Bucket=s3_env.bucket, Key="dice/annotations.json", Body=b"{}")
    storage.preflight(s3_env.uri("dice"), want="dataset")  # DICE json counts


@pytest.mark.s3
def test_preflight_write_leaves_nothing(s3_env):
    storage.preflight(s3_env.uri("runs/exp"), want="write")
    assert s3_env.client().list_objects_v2(Bucket=s3_env.bucket).get("KeyCount") == 0


@pytest.mark.s3
def test_secrets_never_in_errors(s3_env, s3_auth_server, monkeypatch):
    access, secret = "AKIADISTINCTIVE9999", "Distinctive/Secret+Value-42xyz"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    closed = f"http://127.0.0.1:{free_port()}"
    attempts = [  # (endpoint, call); None = AWS_ENDPOINT_URL's server
        (s3_auth_server.endpoint, lambda: storage.preflight(s3_env.uri("ds"), want="read")),
        (s3_auth_server.endpoint, lambda: storage.read_bytes(s3_env.uri("x.bin"))),
        (s3_auth_server.endpoint, lambda: storage.upload(__file__, s3_env.uri("x.py"))),
        (closed, lambda: storage.preflight(s3_env.uri("ds"), want="write")),
        (None, lambda: storage.preflight("s3://no-such-bucket-xyz/ds", want="read")),
        (None, lambda: storage.read_bytes(s3_env.uri("missing.bin"))),
    ]
    for endpoint, attempt in attempts:
        storage.configure(endpoint_url=endpoint)
        with pytest.raises(StorageError) as err:
            attempt()
        text = str(err.value) + repr(err.value)
        assert access not in text and secret not in text
        assert err.value.__cause__ is None and err.value.__suppress_context__  # no raw botocore chain


def test_pyarrow_s3_error_becomes_a_storage_error_naming_the_uri():
    """Ray Train writes its own files with pyarrow; its S3 errors become one line naming scheme://bucket/key."""
    from raytimm.storage.arrowfs import arrow_storage_error

    refused = OSError("When initiating multiple part upload for key 'runs/r/checkpoint_manager_snapshot.json' in "
                      "bucket 'b': AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7, "
                      "Could not connect to server; Details: Failed to connect to 127.0.0.1 port 9 after 0 ms")
    err = arrow_storage_error(refused, "r2")
    assert isinstance(err, StorageError)
    assert str(err).startswith("r2://b/runs/r/checkpoint_manager_snapshot.json: cannot reach the storage endpoint")
    assert "\n" not in str(err) and "127.0.0.1" not in str(err)
    denied = OSError("When reading information for key 'k' in bucket 'b': AWS Error ACCESS_DENIED during "
                     "HeadObject operation: No response body.")
    assert str(arrow_storage_error(denied, "s3")) == "s3://b/k: HeadObject failed (ACCESS_DENIED; Ray Train's own file)"
    assert arrow_storage_error(OSError("disk full"), "s3") is None
    assert arrow_storage_error(ValueError("for key 'k' in bucket 'b'"), "s3") is None

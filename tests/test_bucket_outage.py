"""Bucket outages during real training and serving (issue 10 §3, "Bucket outage").

moto's S3 server sits behind tests/fixtures/outage.py's proxy; raytimm (the CLI, Ray's workers and
controller, Serve's replicas) only knows the proxy's address. The proxy cuts at an exact moment: when
the first request of a checkpoint upload passes through it (``cut_on``), so no sleep guesses when an
upload happens. The test itself checks the bucket straight at moto, past the proxy.

(a) a 10 s cut while the first checkpoint uploads: the run finishes; every checkpoint is complete
    and loads; ``best``/``latest`` never name a partial checkpoint (polled during the run, and at the end).
(b) a cut that outlasts the retries: `raytimm train` fails with one line naming the URI (a StorageError);
    the same command after the outage resumes from the last complete checkpoint.
(c) Serve with a bucket checkpoint in /inference/quick: 502 with a JSON detail during the outage, 200 after.

One Ray and one proxy for the module. ``BENCH_OUTAGE_REPORT=path`` makes (a) also run the same
training without a cut and write both wall times there (benchmarks/bucket_outage.py); the test
itself asserts nothing about time.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.outage import OutageProxy
from tests.fixtures.s3 import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, REGION
from tests.helpers_net import free_port

ROOT = Path(__file__).resolve().parents[1]
RAYTIMM = [sys.executable, "-m", "raytimm.cli"]

pytestmark = [pytest.mark.s3, pytest.mark.ray]

OUTAGE_S = 10  # the short outage: botocore's and pyarrow's retries (storage/clients.py) outlast it
# (b) keeps the retry budget small (AWS_MAX_ATTEMPTS, botocore's own variable, which raytimm honours and
# forwards to workers): with the default 8 attempts an endless outage takes ~1-2 min to fail.
SHORT_ATTEMPTS = "3"
OUTAGE_ANSWER_BOUND_S = 30
TINY = ["model.name=test_resnet", "model.img_size=32", "model.pretrained=false", "train.batch_size=8",
        "train.warmup_epochs=0", "data.num_workers=0", "run.max_failures=0", "mlflow.enabled=false",
        "checkpoint.num_to_keep=5"]
CHECKPOINT_FILES = ("model.safetensors", "train_state.pt", "meta.json")


class Env:
    """The module's proxy, bucket, dataset and Ray."""

    def __init__(self, direct_endpoint: str, proxy: OutageProxy, bucket: str, tmp: Path, gcs: str):
        self.direct_endpoint, self.proxy, self.bucket, self.tmp, self.gcs = direct_endpoint, proxy, bucket, tmp, gcs

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def client(self):
        """boto3 straight at moto (past the proxy): what is really in the bucket."""
        import boto3

        return boto3.client("s3", endpoint_url=self.direct_endpoint, region_name=REGION,
                            aws_access_key_id=FAKE_ACCESS_KEY, aws_secret_access_key=FAKE_SECRET_KEY)

    def objects(self, prefix: str) -> dict[str, dict]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return {o["Key"]: o for page in pages for o in page.get("Contents", [])}

    def train_cmd(self, run_name: str, epochs: int) -> list[str]:
        return [*RAYTIMM, "train", "--config", "configs/quickstart.yaml", *TINY, f"train.epochs={epochs}",
                "scaling.num_workers=2", f"data.path={self.uri('ds')}", f"storage.path={self.uri('runs')}",
                f"run.name={run_name}", f"data.cache_dir={self.tmp / 'cache'}"]

    def cli_env(self, **extra: str) -> dict:
        return {**os.environ, "RAY_ADDRESS": self.gcs, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def env(s3_server, tmp_path_factory):
    """Credentials and the proxy's endpoint in the environment (Ray's workers inherit them), a bucket
    with the demo dataset at ds/, one Ray."""
    import ray

    from raytimm import storage
    from raytimm.data.demo import make_demo_dataset

    proxy = OutageProxy(*s3_server.endpoint.rsplit("//", 1)[1].split(":"))
    mp = pytest.MonkeyPatch()
    for name, value in {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
                        "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_DEFAULT_REGION": REGION,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        mp.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_MAX_ATTEMPTS",
                 "R2_ACCOUNT_ID", "R2_ENDPOINT_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        mp.delenv(name, raising=False)
    storage.configure()
    tmp = tmp_path_factory.mktemp("outage")
    ray_temp = tempfile.mkdtemp(prefix="rtout-")  # short: Ray's unix sockets have a 107-byte limit
    e = Env(s3_server.endpoint, proxy, f"outage-{os.getpid()}", tmp, "")
    e.client().create_bucket(Bucket=e.bucket)
    storage.upload(make_demo_dataset(str(tmp / "data"), classes=3, per_class=8, size=32, seed=1), e.uri("ds"))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_temp, logging_level="WARNING")
    e.gcs = ray.get_runtime_context().gcs_address
    try:
        yield e
    finally:
        ray.shutdown()
        proxy.close()
        mp.undo()
        storage.configure()
        shutil.rmtree(ray_temp, ignore_errors=True)


def _pointer_target(e: Env, run: str, raw: bytes) -> str:
    """The checkpoint key a pointer names (pointers hold a path relative to the run folder, or a URI)."""
    name = json.loads(raw)["checkpoint"]
    prefix = f"s3://{e.bucket}/"
    return name[len(prefix):] if name.startswith(prefix) else f"runs/{run}/{name}"


def _missing_files(e: Env, checkpoint_key: str) -> list[str]:
    have = e.objects(checkpoint_key + "/")
    return [f for f in CHECKPOINT_FILES if f"{checkpoint_key}/{f}" not in have]


class PointerWatch:
    """Polls `best`/`latest` straight at moto while a run goes on; records any pointer naming a
    checkpoint that is not complete at that moment."""

    def __init__(self, e: Env, run: str):
        self.e, self.run = e, run
        self.seen: dict[str, set] = {"best": set(), "latest": set()}
        self.first_seen: dict[str, float] = {}  # latest's target -> time.monotonic() it was first seen
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "PointerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        client = self.e.client()
        while not self._stop.wait(0.1):
            for name in ("best", "latest"):
                try:
                    raw = client.get_object(Bucket=self.e.bucket, Key=f"runs/{self.run}/{name}")["Body"].read()
                except client.exceptions.NoSuchKey:
                    continue
                target = _pointer_target(self.e, self.run, raw)
                self.seen[name].add(target)
                if name == "latest":
                    self.first_seen.setdefault(target, time.monotonic())
                missing = _missing_files(self.e, target)
                if missing:
                    self.bad.append(f"{name} -> {target} lacks {missing}")


def _assert_complete_and_loadable(e: Env, checkpoint_key: str) -> None:
    from raytimm.checkpoint import load_meta, load_train_state
    from raytimm.predict import Predictor

    assert _missing_files(e, checkpoint_key) == [], checkpoint_key
    uri = e.uri(checkpoint_key)
    assert load_meta(uri)["model_name"] == "test_resnet"
    assert Predictor.from_checkpoint(uri).num_classes == 3
    assert "epoch" in load_train_state(uri)


def _epoch_lines(output: str) -> list[int]:
    """Epochs the run trained, from rank 0's summary lines (`epoch N/M  train/loss ...`)."""
    out = []
    for line in output.splitlines():
        at = line.find("epoch ")
        if at >= 0 and "train/loss" in line:
            out.append(int(line[at + 6:].split("/", 1)[0]))
    return out


def _run_train(cmd: list[str], env: dict, timeout: int = 600) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - start


# ----------------------------------------------------------------------------- (a) a short outage


@pytest.fixture(scope="module")
def rode_out(env):
    """`raytimm train` (2 workers, 2 epochs) with a 10 s cut from the first request of the first checkpoint upload."""
    e, run = env, "ride-out"
    e.proxy.cut_on(f"PUT /{e.bucket}/runs/{run}/checkpoint_000001/".encode(), OUTAGE_S)
    start = time.monotonic()
    with PointerWatch(e, run) as watch:
        r, seconds = _run_train(e.train_cmd(run, epochs=2), e.cli_env())
    report = os.environ.get("BENCH_OUTAGE_REPORT")
    if report:  # the benchmark's baseline: the same run, another name, no cut, same machine and Ray
        cut_at = e.proxy.cut_at
        with PointerWatch(e, "no-outage") as base_watch:
            base_start = time.monotonic()
            base, base_s = _run_train(e.train_cmd("no-outage", epochs=2), e.cli_env())
        assert base.returncode == 0, (base.stdout + base.stderr)[-3000:]
        Path(report).write_text(json.dumps({
            "outage_s": OUTAGE_S, "with_outage_s": seconds, "without_s": base_s, "cuts": e.proxy.cuts,
            "cut_after_s": cut_at - start if cut_at else None,
            "latest_seen_after_s": {k.rsplit("/", 1)[1]: t - start for k, t in watch.first_seen.items()},
            "baseline_latest_seen_after_s": {k.rsplit("/", 1)[1]: t - base_start
                                             for k, t in base_watch.first_seen.items()}}))
    return r, watch, run


def test_training_rides_out_a_10s_outage_during_a_checkpoint_upload(rode_out, env):
    r, watch, run = rode_out
    e = env
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert e.proxy.triggered.is_set() and e.proxy.cuts >= 1, "the cut never happened: no checkpoint upload seen"
    assert not e.proxy.is_cut
    assert _epoch_lines(r.stdout + r.stderr) == [1, 2]  # each epoch once: no worker restart

    keys = e.objects(f"runs/{run}/")
    checkpoints = sorted({k.split("/")[2] for k in keys if k.count("/") == 3 and "/checkpoint_0" in k})
    assert checkpoints == ["checkpoint_000001", "checkpoint_000002"]
    for name in checkpoints:
        _assert_complete_and_loadable(e, f"runs/{run}/{name}")
    for name in ("best", "latest"):
        raw = e.client().get_object(Bucket=e.bucket, Key=f"runs/{run}/{name}")["Body"].read()
        assert _pointer_target(e, run, raw) in {f"runs/{run}/{c}" for c in checkpoints}
    assert watch.seen["latest"], "the watcher never saw a pointer: it checked nothing"
    assert watch.bad == []


# ----------------------------------------------------------------------------- (c) Serve during an outage


@pytest.mark.serve
def test_serve_answers_502_during_an_outage_and_200_after(rode_out, env):
    """/inference/quick with a bucket checkpoint_path: 502 + JSON detail naming the URI while cut, then 200."""
    import requests

    from tests.helpers_serve import raytimm_serve

    e, run = env, rode_out[2]
    port = free_port()
    image = next(p for p in (e.tmp / "data" / "val").rglob("*") if p.is_file())
    classes = {p.name for p in (e.tmp / "data" / "train").iterdir()}

    def quick(checkpoint: str, timeout: float = 90) -> requests.Response:
        with open(image, "rb") as fh:
            return requests.post(f"http://127.0.0.1:{port}/inference/quick", timeout=timeout,
                                 files={"file": (image.name, fh)}, data={"checkpoint_path": checkpoint})

    first, second = e.uri(f"runs/{run}/checkpoint_000001"), e.uri(f"runs/{run}/checkpoint_000002")
    args = ["--checkpoint", e.uri(f"runs/{run}"), "--allow", e.uri("runs"), "--num-cpus", "0.5"]
    with raytimm_serve(args, port=port, cwd=ROOT, env=e.cli_env()):
        ok = quick(first)
        assert ok.status_code == 200, ok.text  # loaded and cached in the replica before the outage
        e.proxy.cut()
        try:
            # A cached checkpoint, and a new one. The bound is no benchmark: it tells an answer from a hang (the
            # default retry budget takes ~1 min to give up, a request's at most 3 s of waits; storage/clients.py).
            answers = {uri: quick(uri, timeout=OUTAGE_ANSWER_BOUND_S) for uri in (first, second)}
        finally:
            e.proxy.restore()
        for uri, answer in answers.items():
            assert answer.status_code in (502, 503), (uri, answer.status_code, answer.text)
            assert answer.headers["content-type"].startswith("application/json")
            detail = answer.json()["detail"]
            assert uri in detail and "\n" not in detail, detail
        for uri in (first, second):
            again = quick(uri)
            assert again.status_code == 200, again.text
            assert again.json()["predicted_class"] in classes


# ----------------------------------------------------------------------------- (b) an outage that outlasts the retries


def test_outage_longer_than_the_retries_fails_naming_the_uri_and_the_rerun_resumes(env):
    e, run = env, "outlast"
    cmd = e.train_cmd(run, epochs=2)
    cli_env = e.cli_env(AWS_MAX_ATTEMPTS=SHORT_ATTEMPTS)
    e.proxy.cut_on(f"PUT /{e.bucket}/runs/{run}/checkpoint_000002/".encode(), None)
    try:
        failed, _ = _run_train(cmd, cli_env)
    finally:
        e.proxy.restore()
    out = failed.stdout + failed.stderr
    assert e.proxy.triggered.is_set(), out[-3000:]
    assert failed.returncode == 2, out[-4000:]
    # One line, from raytimm's StorageError: a worker's checkpoint upload, or (when the outage hit the
    # controller first) Ray Train's own checkpoint_manager_snapshot.json; Ray's log lines may follow it.
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out[-4000:]
    assert errors[0].startswith(f"error: {e.uri(f'runs/{run}')}/"), errors[0]
    assert "cannot reach the storage endpoint" in errors[0] or "connection to" in errors[0], errors[0]
    assert _epoch_lines(out)[:1] == [1]
    assert _missing_files(e, f"runs/{run}/checkpoint_000001") == []
    assert not e.objects(f"runs/{run}/checkpoint_000002/"), "the upload that failed left objects behind"
    first = e.objects(f"runs/{run}/checkpoint_000001/")
    pointers = e.objects(f"runs/{run}/latest")
    if pointers:  # written unless the outage stopped the controller before its callback ran
        latest = e.client().get_object(Bucket=e.bucket, Key=f"runs/{run}/latest")["Body"].read()
        assert _pointer_target(e, run, latest) == f"runs/{run}/checkpoint_000001"

    again, _ = _run_train(cmd, cli_env)  # the same command, once the bucket is back
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert _epoch_lines(out) == [2], out[-4000:]  # resumed after epoch 1: epoch 1 is not trained again
    assert {k: o["LastModified"] for k, o in e.objects(f"runs/{run}/checkpoint_000001/").items()} == \
        {k: o["LastModified"] for k, o in first.items()}
    _assert_complete_and_loadable(e, f"runs/{run}/checkpoint_000002")
    latest = e.client().get_object(Bucket=e.bucket, Key=f"runs/{run}/latest")["Body"].read()
    assert _pointer_target(e, run, latest) == f"runs/{run}/checkpoint_000002"

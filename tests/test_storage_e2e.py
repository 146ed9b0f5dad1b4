"""End to end over a real S3-compatible server on loopback (moto's server mode): every URI in raytimm
accepts s3:// and r2:// through training, evaluation, checkpoint loading and the preflight.

One Ray instance is shared by the module. Credentials are distinctive fake values set in the
environment *before* ``ray.init``, so Ray's workers inherit them exactly as they would on a node
whose environment holds the real keys; the tests then look for those values everywhere they must
never appear (MLflow, meta.json, every object of the run, the CLI's output, Ray's own log files).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.s3 import REGION
from tests.helpers_net import free_port

ROOT = Path(__file__).resolve().parents[1]
RAYTIMM = [sys.executable, "-m", "raytimm.cli"]

pytestmark = [pytest.mark.s3, pytest.mark.ray]

# Distinctive fake credentials: moto accepts any keys, and a leak of these is unmistakable.
CANARY_KEY = "AKIA_RAYTIMM_CANARY_7Q3XW"
CANARY_SECRET = "raytimm-canary-secret-9f8e7d6c5b4a3921"
R2_CANARY_KEY = "R2_RAYTIMM_CANARY_KEY_41f0"
R2_CANARY_SECRET = "raytimm-canary-r2-secret-0a1b2c3d4e5f"
CANARIES = (CANARY_KEY, CANARY_SECRET, R2_CANARY_KEY, R2_CANARY_SECRET)

# Tiny, fast runs: a timm test model on 3 classes x 12 images at 32 px.
TINY = ["model.name=test_resnet", "model.img_size=32", "model.pretrained=false", "train.epochs=2",
        "train.batch_size=8", "train.warmup_epochs=0", "data.num_workers=0", "run.max_failures=0",
        "mlflow.enabled=false"]
NUM_CLASSES = 3


@dataclasses.dataclass
class E2E:
    """The module's bucket, dataset and one finished 2-worker bucket run."""

    endpoint: str
    bucket: str
    tmp: Path
    ray_temp: str
    data_dir: str
    run_name: str = ""
    run_uri: str = ""
    result: dict = dataclasses.field(default_factory=dict)
    train_output: str = ""
    tracking_uri: str = ""

    def uri(self, key: str, scheme: str = "s3") -> str:
        return f"{scheme}://{self.bucket}/{key}"

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name=REGION,
                            aws_access_key_id=CANARY_KEY, aws_secret_access_key=CANARY_SECRET)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _node_env(endpoint: str) -> dict[str, str]:
    """What a node's environment holds: keys, endpoint, region; nothing from the host's AWS config."""
    return {
        "AWS_ACCESS_KEY_ID": CANARY_KEY, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET,
        "R2_ACCESS_KEY_ID": R2_CANARY_KEY, "R2_SECRET_ACCESS_KEY": R2_CANARY_SECRET,
        "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": REGION,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true",
    }


_UNSET = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "R2_ACCOUNT_ID",
          "R2_ENDPOINT_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="module")
def e2e(s3_server, tmp_path_factory):
    """Canary credentials in the environment, a bucket with the demo dataset at ds/, and one Ray."""
    import ray

    from raytimm import storage
    from raytimm.data.demo import make_demo_dataset

    mp = pytest.MonkeyPatch()
    for name, value in _node_env(s3_server.endpoint).items():
        mp.setenv(name, value)
    for name in _UNSET:
        mp.delenv(name, raising=False)
    storage.configure()
    tmp = tmp_path_factory.mktemp("e2e")
    # Short path: Ray's unix sockets live under its temp dir (107-byte limit).
    ray_temp = tempfile.mkdtemp(prefix="rte2e-")
    env = E2E(s3_server.endpoint, f"e2e-{os.getpid()}", tmp, ray_temp,
              make_demo_dataset(str(tmp / "data"), classes=NUM_CLASSES, per_class=12, size=32, seed=1))
    env.client().create_bucket(Bucket=env.bucket)
    storage.upload(env.data_dir, env.uri("ds"))
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_temp, logging_level="WARNING")
    try:
        yield env
    finally:
        ray.shutdown()
        mp.undo()
        storage.configure()
        shutil.rmtree(ray_temp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _reset_storage_defaults():
    """train() sets process-wide storage defaults (storage.endpoint_url); no test inherits another's."""
    from raytimm import storage

    storage.configure()
    yield
    storage.configure()


def _cli(args: list[str], *, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYTIMM, *args], cwd=ROOT, env=env or dict(os.environ), capture_output=True, text=True,
                          timeout=timeout)


def _load(overrides: list[str]):
    from raytimm.config import load_config

    return load_config(str(ROOT / "configs" / "quickstart.yaml"), [*TINY, *overrides])


def _assert_no_canary(text: str, where: str) -> None:
    for canary in CANARIES:
        assert canary not in text, f"credential value leaked into {where}"


@pytest.fixture(scope="module")
def trained(e2e):
    """`raytimm train` (the CLI, joined to the module's Ray) with 2 workers, data and checkpoints in the bucket."""
    import ray

    e2e.run_name = "two-workers"
    e2e.run_uri = e2e.uri(f"runs/{e2e.run_name}")
    e2e.tracking_uri = f"sqlite:///{e2e.tmp / 'mlflow.db'}"
    result_json = e2e.tmp / "train.json"
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    r = _cli(["train", "--config", "configs/quickstart.yaml", *TINY, "scaling.num_workers=2",
              f"data.path={e2e.uri('ds')}", f"storage.path={e2e.uri('runs')}", f"run.name={e2e.run_name}",
              f"data.cache_dir={e2e.tmp / 'cache'}", "mlflow.enabled=true", f"mlflow.tracking_uri={e2e.tracking_uri}",
              "mlflow.experiment=e2e", "--result-json", str(result_json)], env=env, timeout=480)
    e2e.train_output = r.stdout + r.stderr
    assert r.returncode == 0, e2e.train_output[-4000:]
    e2e.result = json.loads(result_json.read_text())
    return e2e


# ----------------------------------------------------------------------------- training in the bucket


def test_two_worker_training_writes_checkpoints_pointer_and_uris_to_bucket(trained):
    """Checkpoint objects, the `best` pointer and every result URI live in the bucket."""
    from raytimm.checkpoint import is_complete, load_meta, read_pointer_info

    e, res = trained, trained.result
    keys = e.keys(f"runs/{e.run_name}/")
    for epoch in (1, 2):
        for name in ("model.safetensors", "meta.json", "train_state.pt"):
            assert f"runs/{e.run_name}/checkpoint_{epoch:06d}/{name}" in keys
    assert res["run_dir"] == e.run_uri
    for field in ("best_checkpoint", "latest_checkpoint"):
        assert res[field].startswith(e.run_uri + "/checkpoint_00000"), res[field]
    assert res["latest_checkpoint"] == e.run_uri + "/checkpoint_000002"

    best = read_pointer_info(e.run_uri, "best")
    assert best["checkpoint"] == res["best_checkpoint"] and is_complete(best["checkpoint"])
    assert best["metrics"]["val/top1"] == pytest.approx(res["best_metrics"]["val/top1"])
    assert read_pointer_info(e.run_uri, "latest")["checkpoint"] == res["latest_checkpoint"]
    meta = load_meta(res["best_checkpoint"])
    assert meta["num_classes"] == NUM_CLASSES and meta["model_name"] == "test_resnet"
    assert meta["config"]["data"]["path"] == e.uri("ds") and meta["config"]["storage"]["path"] == e.uri("runs")


def test_credentials_never_reach_mlflow_meta_objects_or_logs(trained):
    """The canary keys appear in no MLflow param/tag, no object of the run, no CLI output, no Ray log file."""
    from mlflow.tracking import MlflowClient

    e = trained
    client = MlflowClient(tracking_uri=e.tracking_uri)
    run = client.get_run(e.result["mlflow_run_id"])
    assert run.data.params["data.path"] == e.uri("ds")  # the run really logged its config
    assert run.data.metrics["val/top1"] >= 0
    _assert_no_canary(json.dumps([run.data.params, run.data.tags]), "MLflow params/tags")
    _assert_no_canary((e.tmp / "mlflow.db").read_bytes().decode("latin-1"), "the MLflow store")
    with tempfile.TemporaryDirectory() as tmp:
        for path in client.list_artifacts(run.info.run_id):
            local = client.download_artifacts(run.info.run_id, path.path, tmp)
            if os.path.isfile(local):
                _assert_no_canary(Path(local).read_bytes().decode("latin-1"), f"MLflow artifact {path.path}")

    client_s3 = e.client()
    keys = e.keys(f"runs/{e.run_name}/")
    assert any(k.endswith("/meta.json") for k in keys)
    for key in keys:  # meta.json, pointers, Ray's snapshot, even the weights and train state
        body = client_s3.get_object(Bucket=e.bucket, Key=key)["Body"].read()
        _assert_no_canary(body.decode("latin-1"), key)

    _assert_no_canary(e.train_output, "`raytimm train` output")
    assert "val/top1" in e.train_output or "best checkpoint" in e.train_output  # the output was captured
    logs = [p for p in Path(e.ray_temp).rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
    assert any("worker" in p.name for p in logs)
    for path in logs:
        _assert_no_canary(path.read_bytes().decode("latin-1"), f"Ray file {path.name}")


def test_evaluate_cli_from_bucket_matches_best_metric(trained):
    """`raytimm evaluate --checkpoint s3://<run> --data s3://<ds>` reproduces the best val/top1."""
    e = trained
    out = e.tmp / "eval.json"
    env = dict(os.environ, RAYTIMM_CACHE_DIR=str(e.tmp / "eval-cache"))
    r = _cli(["evaluate", "--checkpoint", e.run_uri, "--data", e.uri("ds"), "--result-json", str(out)], env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    _assert_no_canary(r.stdout + r.stderr, "`raytimm evaluate` output")
    got = json.loads(out.read_text())
    assert got["top1"] == pytest.approx(e.result["best_metrics"]["val/top1"], abs=1e-6)
    assert got["num_samples"] == sum(1 for p in Path(e.data_dir, "val").rglob("*") if p.is_file())


def test_predictor_loads_checkpoint_and_run_from_bucket(trained):
    """Predictor.from_checkpoint takes the s3:// checkpoint folder and the run folder (its `best`)."""
    from raytimm.predict import Predictor

    e = trained
    direct = Predictor.from_checkpoint(e.result["best_checkpoint"])
    via_run = Predictor.from_checkpoint(e.run_uri)
    assert via_run.source == direct.source == e.result["best_checkpoint"]
    assert direct.class_names == sorted(p.name for p in Path(e.data_dir, "train").iterdir())
    image = next(Path(e.data_dir, "val").rglob("*.*"))
    top = direct.predict([str(image)], top_k=2)[0]
    assert len(top["top_k_predictions"]) == 2
    assert top["predicted_class"] == via_run.predict([str(image)])[0]["predicted_class"]


def test_interrupted_upload_never_becomes_best(trained):
    """A checkpoint folder with model.safetensors but no meta.json is refused as best/latest and never resolved."""
    from raytimm.checkpoint import read_pointer, resolve_checkpoint, write_best_pointer, write_latest_pointer
    from raytimm.errors import CheckpointError
    from raytimm.predict import Predictor
    from raytimm import storage

    e = trained
    partial = f"{e.run_uri}/checkpoint_000099"
    body = e.client().get_object(Bucket=e.bucket, Key=f"runs/{e.run_name}/checkpoint_000002/model.safetensors")
    storage.write_bytes(f"{partial}/model.safetensors", body["Body"].read())
    try:
        with pytest.raises(CheckpointError, match="incomplete"):
            write_best_pointer(e.run_uri, partial, {"val/top1": 100.0})
        with pytest.raises(CheckpointError, match="incomplete"):
            write_latest_pointer(e.run_uri, partial, {"val/top1": 100.0})
        assert read_pointer(e.run_uri, "best") == e.result["best_checkpoint"]
        assert resolve_checkpoint(e.run_uri).uri == e.result["best_checkpoint"]
        assert Predictor.from_checkpoint(e.run_uri).source == e.result["best_checkpoint"]
        with pytest.raises(CheckpointError):
            resolve_checkpoint(partial)
    finally:
        storage.delete(partial)


# ----------------------------------------------------------------------------- planted pickles


class _Payload:
    """Unpickling this creates a file: proof that a pickle ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _poisoned_pt(path: Path, marker: Path, *, legacy: bool) -> Path:
    import torch

    obj = {"model_state_dict": {"w": torch.zeros(1)}, "extra": _Payload(str(marker))} if legacy else \
        {"epoch": 2, "optimizer": _Payload(str(marker))}
    torch.save(obj, path)
    assert not marker.exists()
    return path


def test_planted_pickle_in_bucket_pt_never_executes(e2e, tmp_path):
    """A legacy .pt or train_state.pt with a payload in the bucket fails as CheckpointError, unexecuted."""
    from raytimm.checkpoint import load_train_state
    from raytimm.errors import CheckpointError
    from raytimm.predict import Predictor
    from raytimm import storage

    marker = tmp_path / "pwned"
    evil = e2e.uri("checkpoints/projects/1/jobs/666/best.pt", "r2")
    storage.upload(str(_poisoned_pt(tmp_path / "evil.pt", marker, legacy=True)), evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        Predictor.from_checkpoint(evil, model_name="test_resnet", num_classes=NUM_CLASSES)
    assert not marker.exists()

    state = e2e.uri("poison/checkpoint_000001/train_state.pt")
    storage.upload(str(_poisoned_pt(tmp_path / "train_state.pt", marker, legacy=False)), state)
    with pytest.raises(CheckpointError, match="refusing to load train state"):
        load_train_state(e2e.uri("poison/checkpoint_000001"))
    assert not marker.exists()


@pytest.mark.slow
def test_resume_from_poisoned_train_state_never_executes(trained, tmp_path, capfd):
    """Resuming a bucket run whose latest train_state.pt carries a payload fails cleanly; the payload never runs."""
    from raytimm.errors import RaytimmError
    from raytimm.ray_train import train
    from raytimm import storage

    e = trained
    client = e.client()
    src, dst = f"runs/{e.run_name}/", "runs/poisoned/"
    for key in e.keys(src):  # a copy of the finished run: Ray's snapshot names checkpoints relative to the run
        client.copy_object(Bucket=e.bucket, Key=dst + key[len(src):], CopySource={"Bucket": e.bucket, "Key": key})
    marker = tmp_path / "pwned"
    storage.upload(str(_poisoned_pt(tmp_path / "train_state.pt", marker, legacy=False)),
                   e.uri(dst + "checkpoint_000002/train_state.pt"))

    cfg = _load([f"data.path={e.uri('ds')}", f"storage.path={e.uri('runs')}", "run.name=poisoned",
                 "train.epochs=3", "scaling.num_workers=1", f"data.cache_dir={e.tmp / 'cache'}"])
    with pytest.raises(RaytimmError) as info:
        train(cfg)
    assert "refusing to load train state" in str(info.value)
    assert "train_state.pt" in str(info.value) and "io.open" in str(info.value)  # names the file and the global
    assert not marker.exists()
    assert not any("checkpoint_000003" in k for k in e.keys(dst))
    out = capfd.readouterr()
    _assert_no_canary(out.out + out.err + str(info.value), "a failed resume's output")


# ----------------------------------------------------------------------------- legacy .pt and r2://


def _legacy_pt(path: Path, seed: int = 7) -> tuple[Path, dict]:
    """The platform's legacy best.pt: torch.save({'model_state_dict': ...}) of a timm model."""
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": state, "epoch": 10, "best_acc": 91.5}, path)
    return path, state


def test_legacy_pt_from_bucket_loads_into_predictor(e2e, tmp_path):
    """r2://bucket/checkpoints/projects/1/jobs/100/best.pt loads with the caller's model_name/num_classes."""
    import torch

    from raytimm.errors import ConfigError
    from raytimm.predict import Predictor
    from raytimm import storage

    path, state = _legacy_pt(tmp_path / "best.pt")
    uri = e2e.uri("checkpoints/projects/1/jobs/100/best.pt", "r2")
    storage.upload(str(path), uri)
    pred = Predictor.from_checkpoint(uri, model_name="test_resnet", num_classes=NUM_CLASSES)
    assert pred.kind == "legacy_pt" and pred.source == uri
    loaded = pred.model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key].float(), value.float()), key
    image = next(Path(e2e.data_dir, "val").rglob("*.*"))
    assert len(pred.predict([str(image)], top_k=3)[0]["top_k_predictions"]) == 3
    with pytest.raises(ConfigError, match="model_name"):
        Predictor.from_checkpoint(uri)


@pytest.fixture
def second_server():
    """A separate moto server process (its own buckets): reachable only through an explicit endpoint."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "moto server exited"
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.serve
def test_r2_training_with_explicit_endpoint_fine_tunes_from_legacy_pt(e2e, second_server, tmp_path, capfd):
    """r2:// data, checkpoints and a legacy init_checkpoint on a server named only by storage.endpoint_url.

    AWS_ENDPOINT_URL points at the module's other server, so the run succeeds only if the driver,
    the controller and the workers all use the explicit endpoint; then Serve replicas load the run's
    best checkpoint from it too. Ray was started before any storage.configure(), so workers and
    replicas can only get the endpoint through what raytimm forwards, as on a joined cluster.
    """
    import safetensors.torch
    import torch

    from raytimm.checkpoint import read_pointer_info
    from raytimm.ray_train import train
    from raytimm import storage

    ep = second_server
    bucket = "r2-e2e"
    e2e.client(ep).create_bucket(Bucket=bucket)
    storage.configure(endpoint_url=ep)
    storage.upload(e2e.data_dir, f"r2://{bucket}/ds")
    legacy, state = _legacy_pt(tmp_path / "best.pt")
    init = f"r2://{bucket}/checkpoints/projects/1/jobs/100/best.pt"
    storage.upload(str(legacy), init)
    storage.configure()  # from here on only the run's config names the endpoint

    # lr ~ 0: the fine-tuned weights must still be the legacy ones, so we can tell they were loaded.
    cfg = _load([f"data.path=r2://{bucket}/ds", f"storage.path=r2://{bucket}/runs", "run.name=r2-run",
                 f"storage.endpoint_url={ep}", "scaling.num_workers=1", "train.epochs=1",
                 f"model.init_checkpoint={init}", "train.opt=sgd", "train.lr=1e-9", "train.min_lr=0",
                 "train.weight_decay=0", f"data.cache_dir={tmp_path / 'cache'}"])
    res = train(cfg)
    assert res.run_dir == f"r2://{bucket}/runs/r2-run"
    assert res.best_checkpoint == res.latest_checkpoint == f"r2://{bucket}/runs/r2-run/checkpoint_000001"
    assert read_pointer_info(res.run_dir, "best")["checkpoint"] == res.best_checkpoint
    keys = [o["Key"] for o in e2e.client(ep).list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]]
    assert {"runs/r2-run/checkpoint_000001/model.safetensors", "runs/r2-run/checkpoint_000001/meta.json",
            "runs/r2-run/best"} <= set(keys)
    assert not e2e.keys("runs/r2-run")  # nothing went to AWS_ENDPOINT_URL's server

    weights = tmp_path / "w.safetensors"
    storage.configure(endpoint_url=ep)
    storage.download(f"{res.best_checkpoint}/model.safetensors", str(weights))
    tuned = safetensors.torch.load_file(str(weights))
    for key, value in state.items():
        if value.is_floating_point() and "running" not in key:  # BN running stats move in train mode
            assert torch.allclose(tuned[key], value, atol=1e-5), key

    # `raytimm serve --config` with the run's storage section, joined to the module's Ray: the replicas
    # read the checkpoint from the endpoint only that section names.
    storage.configure()
    port = free_port()
    serve_cfg = tmp_path / "serve.yaml"
    serve_cfg.write_text(f"storage:\n  endpoint_url: {ep}\nserve:\n  checkpoint: {res.run_dir}\n"
                         f"  port: {port}\n  num_cpus: 0.5\n")
    import ray
    import requests

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.Popen([*RAYTIMM, "serve", "--config", str(serve_cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served = []
    try:
        for line in proc.stdout:  # "raytimm serving <checkpoint> at <url> ..." once /healthz answers
            served.append(line)
            if line.startswith("raytimm serving"):
                break
        assert served and served[-1].startswith(f"raytimm serving {res.run_dir} at "), "".join(served)[-3000:]
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/model", timeout=60).json()["checkpoint"] == res.best_checkpoint
        image = next(Path(e2e.data_dir, "val").rglob("*.*"))
        with open(image, "rb") as fh:
            answer = requests.post(f"{url}/predict", files={"file": (image.name, fh)}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predicted_class"] in sorted(p.name for p in Path(e2e.data_dir, "train").iterdir())
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    _assert_no_canary("".join(served) + rest, "`raytimm serve` output")
    out = capfd.readouterr()
    _assert_no_canary(out.out + out.err, "r2 training output")


# ----------------------------------------------------------------------------- preflight through the CLI


def _preflight_cases(e: E2E, auth) -> dict[str, tuple[dict, list[str], str, str]]:
    """name -> (env changes, overrides, URI the message must name, what the message must say)."""
    closed = f"http://127.0.0.1:{free_port()}"
    local_data = f"data.path={e.data_dir}"
    return {
        "server stopped": ({"AWS_ENDPOINT_URL": closed}, [local_data, f"storage.path={e.uri('runs')}"],
                           e.uri("runs"), "cannot reach the storage endpoint"),
        "wrong bucket": ({}, [local_data, "storage.path=s3://no-such-bucket-e2e/runs"],
                         "s3://no-such-bucket-e2e/runs", "does not exist"),
        "wrong keys": ({"AWS_ENDPOINT_URL": auth.endpoint},
                       [local_data, "storage.path=s3://any-bucket/runs"], "s3://any-bucket/runs", "rejected"),
        "no permission": ({"AWS_ENDPOINT_URL": auth.endpoint, "AWS_ACCESS_KEY_ID": auth.access_key,
                           "AWS_SECRET_ACCESS_KEY": auth.secret_key},
                          [local_data, "storage.path=s3://any-bucket/runs"], "s3://any-bucket/runs", "denied"),
        "no images": ({}, [f"data.path={e.uri('notes')}", f"storage.path={e.tmp / 'runs'}"], e.uri("notes"),
                      "no images"),
        "empty prefix": ({}, [f"data.path={e.uri('nothing-here')}", f"storage.path={e.tmp / 'runs'}"],
                         e.uri("nothing-here"), "no objects"),
    }


def test_preflight_errors_through_cli(e2e, s3_auth_server):
    """`raytimm train` exits 2 before any worker starts, with one line naming the URI and no secret."""
    from raytimm import storage

    storage.write_text(e2e.uri("notes/readme.txt"), "no images here")
    cases = _preflight_cases(e2e, s3_auth_server)
    procs = {}
    for name, (env_changes, overrides, _, _) in cases.items():  # in parallel: each is mostly Python start-up
        env = {**os.environ, **env_changes}
        procs[name] = subprocess.Popen(
            [*RAYTIMM, "train", "--config", "configs/quickstart.yaml", *TINY, *overrides, "run.name=preflight"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    messages = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        _, _, uri, says = cases[name]
        assert proc.returncode == 2, f"{name}: rc={proc.returncode}\n{(out + err)[-2000:]}"
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"{name}: {err[-2000:]}"
        assert err.rstrip().endswith(errors[0]), f"{name}: more after the error line:\n{err[-2000:]}"
        assert uri in errors[0] and says in errors[0].lower(), f"{name}: {errors[0]}"
        assert "Traceback" not in err, name
        _assert_no_canary(out + err, f"preflight output ({name})")
        assert s3_auth_server.secret_key not in out + err
        messages[name] = errors[0]
    assert len(set(messages.values())) == len(messages)
    assert not (e2e.tmp / "runs" / "preflight").exists()  # nothing started

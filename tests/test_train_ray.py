"""Ray Train end to end on a real local Ray: DDP over 2 CPU workers, exact metrics, fault recovery
(a SIGKILLed worker, a tracking server that goes away), errors that must not be retried, resume by
run name, MLflow against a real server.

One Ray instance serves the module. Models are tiny and data is the synthetic demo set.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from raytimm.ray_train import init_ray

    os.environ["TQDM_DISABLE"] = "1"
    # Quiet workers print each line once (Train V2's print patch doubles them).
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from raytimm.data.demo import make_demo_dataset
    from raytimm.data.folder import scan_imagefolder

    # 4 classes x 64 images, then one val image removed: an odd val set, which a
    # DistributedSampler over 2 ranks would pad with one duplicate image.
    root = make_demo_dataset(str(tmp_path_factory.mktemp("demo")), classes=4, per_class=64, size=48, seed=3)
    first_class = sorted(p for p in Path(root, "val").iterdir() if p.is_dir())[0]
    sorted(first_class.iterdir())[0].unlink()
    scan = scan_imagefolder(root)
    assert len(scan.val) % 2 == 1, len(scan.val)
    return root, scan


def _cfg(data_root, runs, *overrides):
    from raytimm.config import load_config

    root = Path(__file__).resolve().parents[1]
    return load_config(root / "configs" / "quickstart.yaml",
                       [f"data.path={data_root}", f"storage.path={runs}", "mlflow.enabled=false", *overrides])


def _digest_loop_factory(out_dir: str):
    """A train loop that runs the real per-worker loop, then records each rank's weights digest."""

    def loop(config):
        import ray.train
        import ray.train.torch
        import torch

        from raytimm import ray_train
        from raytimm.model import unwrap_model

        captured = {}
        original = ray.train.torch.prepare_model

        def capture(model, *a, **kw):
            wrapped = original(model, *a, **kw)
            captured["model"] = wrapped
            return wrapped

        ray.train.torch.prepare_model = capture
        try:
            ray_train.train_loop_per_worker(config)
        finally:
            ray.train.torch.prepare_model = original
        h = hashlib.sha256()
        # Buffers too: BatchNorm running stats must match across ranks (docs/pitfalls-found.md: DDP syncs them late).
        for k, v in sorted(unwrap_model(captured["model"]).state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        rank = ray.train.get_context().get_world_rank()
        Path(out_dir, f"rank{rank}.sha256").write_text(h.hexdigest())

    return loop


def test_ddp_two_workers_exact_metrics_and_identical_weights(ray_local, demo_data, tmp_path):
    from raytimm.predict import evaluate_checkpoint
    from raytimm.ray_train import train

    root, scan = demo_data
    cfg = _cfg(root, tmp_path / "runs", "run.name=ddp", "scaling.num_workers=2")
    result = train(cfg, train_loop=_digest_loop_factory(str(tmp_path)))

    # Both ranks end with bit-identical weights and buffers.
    d0, d1 = (tmp_path / "rank0.sha256").read_text(), (tmp_path / "rank1.sha256").read_text()
    assert d0 == d1

    # Files and pointers.
    best = Path(result.best_checkpoint)
    for name in ("model.safetensors", "meta.json", "train_state.pt"):
        assert (best / name).is_file(), name
    assert result.run_dir == str(tmp_path / "runs" / "ddp")
    pointer = json.loads((tmp_path / "runs" / "ddp" / "best").read_text())
    assert (Path(result.run_dir) / pointer["checkpoint"]).resolve() == best.resolve()
    assert result.epochs == cfg.train.epochs
    meta = json.loads((best / "meta.json").read_text())
    assert meta["model_name"] == "resnet18" and meta["num_classes"] == 4
    assert meta["class_names"] == scan.class_names
    assert meta["metrics"]["val/top1"] == pytest.approx(result.best_metrics["val/top1"])

    # The reported val/top1 is exact: the best checkpoint re-evaluated alone, over every val
    # image once (an odd count, so DistributedSampler padding would show), gives the same number.
    ev = evaluate_checkpoint(result.best_checkpoint, root, split="val")
    assert ev["num_samples"] == len(scan.val)
    assert ev["top1"] == pytest.approx(result.best_metrics["val/top1"], abs=1e-6)
    assert ev["loss"] == pytest.approx(result.best_metrics["val/loss"], rel=1e-3)

    # The quickstart learns the demo data.
    assert result.best_metrics["val/top1"] >= 90.0


def _recording_loop_factory(out_dir: str, hold_after_epoch: int | None = None, release_file: str | None = None):
    """The real per-worker loop, after a line per worker start: rank, pid, the checkpoint it resumes from.

    With ``hold_after_epoch``, each worker of a run that did not resume waits after reporting that
    epoch until ``release_file`` exists, so the test can act at a known point of the run.
    """

    def loop(config):
        import ray.train

        from raytimm import ray_train

        latest = ray.train.get_checkpoint()
        line = {"rank": ray.train.get_context().get_world_rank(), "pid": os.getpid(),
                "resume": Path(latest.path).name if latest else None}
        with open(os.path.join(out_dir, "starts.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
        report = ray.train.report

        def held_report(metrics, *args, **kwargs):
            report(metrics, *args, **kwargs)
            if latest is None and int(metrics["epoch"]) == hold_after_epoch:
                deadline = time.monotonic() + 300
                while not os.path.exists(release_file) and time.monotonic() < deadline:
                    time.sleep(0.05)

        ray.train.report = held_report
        try:
            ray_train.train_loop_per_worker(config)
        finally:
            ray.train.report = report

    return loop


def _starts(out_dir) -> list[dict]:
    p = Path(out_dir, "starts.jsonl")
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


@pytest.mark.mlflow_server
def test_sigkilled_worker_resumes_and_mlflow_has_each_epoch_once(ray_local, demo_data, tmp_path, mlflow_server):
    """SIGKILL one RayTrainWorker process mid-epoch: Ray restarts the worker group from the latest
    checkpoint, the run completes, and MLflow holds every epoch once."""
    from mlflow import MlflowClient

    from raytimm.checkpoint import read_pointer_info
    from raytimm.ray_train import train

    root, _ = demo_data
    run_dir = tmp_path / "runs" / "faulty"
    cfg = _cfg(root, tmp_path / "runs", "run.name=faulty", "scaling.num_workers=2", "train.epochs=3",
               "run.max_failures=1", "mlflow.enabled=true", f"mlflow.tracking_uri={mlflow_server}",
               "mlflow.experiment=fault-test", "model.name=test_resnet", "model.img_size=64")
    killed: dict = {}

    def killer():
        # The workers go on into epoch 2 once `latest` names epoch 1; kill rank 1's process in there.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            info = read_pointer_info(str(run_dir), "latest")
            worker = [s for s in _starts(tmp_path) if s["rank"] == 1]
            if info and worker:
                time.sleep(0.3)  # into epoch 2's batches (an epoch here takes well over a second)
                if (run_dir / "checkpoint_000002").exists():
                    killed["too_late"] = True
                    return
                pid = worker[0]["pid"]
                killed["title"] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                killed["latest_epoch"] = int(info["metrics"]["epoch"])
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    # The workers wait after epoch 1 until the controller has published it as `latest`.
    result = train(cfg, train_loop=_recording_loop_factory(str(tmp_path), 1, str(run_dir / "latest")))
    thread.join(timeout=5)
    assert "RayTrainWorker" in killed.get("title", ""), killed  # the real Train worker actor process
    assert result.epochs == 3 and result.status == "finished"

    # Two worker-group starts: the second resumed from the checkpoint that was latest at the kill.
    starts = _starts(tmp_path)
    assert len(starts) == 4, starts
    assert [s["resume"] for s in starts[:2]] == [None, None]
    assert killed["latest_epoch"] == 1
    assert {s["resume"] for s in starts[2:]} == {"checkpoint_000001"}

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "faulty"
    for key in ("val/top1", "train/loss", "lr", "throughput"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3], (key, steps)
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["model.name"] == "test_resnet"
    assert run.data.tags["raytimm.best_checkpoint"] == result.best_checkpoint
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "classes.txt", "confusion_matrix.png", "per_class.csv", "curves.png"} <= artifacts


def test_worker_data_error_fails_at_once_with_its_message(ray_local, demo_data, tmp_path):
    """A DataError inside the workers (the image set passes the driver's preflight) is not retried:
    the worker group starts once although run.max_failures allows 2 restarts."""
    from raytimm.errors import DataError
    from raytimm.ray_train import train

    root, _ = demo_data
    cfg = _cfg(root, tmp_path / "runs", "run.name=baddata", "scaling.num_workers=2", "run.max_failures=2",
               "train.batch_size=5000", "model.name=test_resnet", "model.img_size=32")
    with pytest.raises(DataError, match=r"fewer than train.batch_size=5000 per worker x 2 worker") as err:
        train(cfg, train_loop=_recording_loop_factory(str(tmp_path)))
    assert "\n" not in str(err.value)
    assert sorted(s["rank"] for s in _starts(tmp_path)) == [0, 1]  # one start of each worker, no retry


def test_cli_worker_config_error_is_the_last_line(ray_local, demo_data, tmp_path):
    """`raytimm train` with an option that only the workers check: exit 2, the worker's one-line
    error as the last line. The CLI joins this module's Ray, as under `ray job submit`."""
    import ray

    root, _ = demo_data
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [str(Path(sys.executable).with_name("raytimm")), "train", "--config",
           str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"),
           f"data.path={root}", f"storage.path={tmp_path / 'runs'}", "mlflow.enabled=false", "run.name=badopt",
           "scaling.num_workers=2", "run.max_failures=2", "model.name=test_resnet", "model.img_size=32",
           "train.opt=nosuchopt"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train.opt='nosuchopt': "), proc.stderr[-3000:]


@pytest.mark.mlflow_server
@pytest.mark.parametrize("workers", [1, 2])
def test_a_tie_for_best_names_the_later_checkpoint_everywhere(ray_local, demo_data, tmp_path, mlflow_server, workers):
    """meta.best_epoch, the `best` pointer, --result-json's best_checkpoint, MLflow's raytimm.best_epoch tag and
    progress.json all name the later of two checkpoints with the same val/top1."""
    from mlflow import MlflowClient

    from raytimm.checkpoint import load_meta, read_pointer
    from raytimm.ray_train import train

    root, _ = demo_data
    # A learning rate too small to change any prediction: val/top1 is the same every epoch. test_vit has
    # LayerNorm only, so no BatchNorm statistics drift either.
    frozen = ["train.lr=1e-12", "train.warmup_lr=1e-12", "train.min_lr=1e-12", "model.name=test_vit", "model.img_size=32"]
    cfg = _cfg(root, tmp_path / "runs", f"run.name=tie{workers}", f"scaling.num_workers={workers}", "train.epochs=2",
               *frozen, "mlflow.enabled=true", f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=tie-test")
    result = train(cfg).to_dict()  # what `raytimm train --result-json` writes

    run_dir = tmp_path / "runs" / f"tie{workers}"
    history = load_meta(result["latest_checkpoint"])["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["val/top1"] == history[1]["val/top1"]  # the tie really happened
    later = str(run_dir / "checkpoint_000002")
    assert result["best_checkpoint"] == later and result["best_metrics"]["epoch"] == 2
    assert load_meta(later)["best_epoch"] == 2
    assert read_pointer(str(run_dir), "best") == later
    tags = MlflowClient(mlflow_server).get_run(result["mlflow_run_id"]).data.tags
    assert tags["raytimm.best_epoch"] == "2" and tags["raytimm.best_checkpoint"] == later
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["status"] == "finished" and progress["progress"] == 1.0 and progress["epoch"] == 2
    assert [h["epoch"] for h in progress["history"]] == [1, 2]
    assert progress["best_epoch"] == 2 and progress["best_checkpoint"] == later
    assert progress["mlflow_run_id"] == result["mlflow_run_id"] and progress["finished_at"]


def test_same_run_name_resumes_then_reports_complete(ray_local, demo_data, tmp_path, capsys):
    from raytimm.ray_train import train

    root, _ = demo_data
    common = ["run.name=again", "scaling.num_workers=1", "model.name=test_resnet", "model.img_size=32"]
    # The first run also has an unreachable tracking server: it warns and trains without MLflow.
    from tests.helpers_net import free_port

    dead = ["mlflow.enabled=true", f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}", "mlflow.timeout_s=2"]
    first = train(_cfg(root, tmp_path / "runs", *common, "train.epochs=1", *dead))
    assert first.epochs == 1
    assert first.mlflow_run_id is None
    second = train(_cfg(root, tmp_path / "runs", *common, "train.epochs=2"))
    assert second.epochs == 2 and second.status == "finished"
    run_dir = tmp_path / "runs" / "again"
    meta2 = json.loads((Path(second.latest_checkpoint) / "meta.json").read_text())
    assert meta2["epoch"] == 2
    # The resumed run continued the first one's history instead of starting over.
    assert [h["epoch"] for h in meta2["history"]] == [1, 2]
    progress = json.loads((run_dir / "progress.json").read_text())
    assert [h["epoch"] for h in progress["history"]] == [1, 2] and progress["status"] == "finished"
    third = train(_cfg(root, tmp_path / "runs", *common, "train.epochs=2"))
    assert third.status == "already_complete"
    assert "already complete" in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*") if p.is_dir()) == ["checkpoint_000001", "checkpoint_000002"]


def _failing_loop(config):
    raise ValueError("disk quota exceeded while writing the cache\nsecond line")


def test_a_failed_run_says_so_in_progress_json(ray_local, demo_data, tmp_path):
    from raytimm.errors import RaytimmError
    from raytimm.ray_train import train

    root, _ = demo_data
    cfg = _cfg(root, tmp_path / "runs", "run.name=doomed", "scaling.num_workers=1", "run.max_failures=0")
    with pytest.raises(RaytimmError, match="disk quota exceeded"):
        train(cfg, train_loop=_failing_loop)
    progress = json.loads((tmp_path / "runs" / "doomed" / "progress.json").read_text())
    assert progress["status"] == "failed" and progress["finished_at"] and progress["history"] == []
    assert progress["message"] == "training run 'doomed' failed: ValueError: disk quota exceeded while writing the cache"


def test_workers_that_cannot_fit_a_local_ray_fail_fast_naming_the_key(ray_local, demo_data, tmp_path):
    from raytimm.errors import RaytimmError
    from raytimm.ray_train import train

    root, _ = demo_data
    # The module's local Ray has 2 CPUs and no GPU; Ray Train alone would wait for these forever.
    with pytest.raises(RaytimmError, match=r"scaling.num_workers=3 needs 3 CPU \(cluster has 2\)"):
        train(_cfg(root, tmp_path / "runs", "run.name=toobig", "scaling.num_workers=3"))
    with pytest.raises(RaytimmError, match=r"needs 1 GPU \(cluster has 0\).*scaling.use_gpu=false"):
        train(_cfg(root, tmp_path / "runs", "run.name=nogpu", "scaling.num_workers=1", "scaling.use_gpu=true"))
    assert not (tmp_path / "runs" / "toobig").exists()


@pytest.mark.mlflow_server
def test_multi_label_on_two_workers_reports_what_the_saved_checkpoint_scores_alone(ray_local, tmp_path, mlflow_server):
    """2 Ray workers on multi-label data (an odd val set): equal weights on both ranks, and the reported
    val/mAP, F1 and loss equal a single-process evaluation of the saved checkpoint at its own thresholds."""
    import csv

    from mlflow import MlflowClient
    from torch.utils.data import DataLoader

    import torch

    from raytimm import checkpoint as ckpt
    from raytimm.data.demo import make_demo_multilabel
    from raytimm.data.folder import ImageDataset
    from raytimm.data.loaders import prepare_dataset_root, scan_dataset
    from raytimm.data.transforms import build_eval_transform
    from raytimm.engine import evaluate_multilabel
    from raytimm.model import build_model
    from raytimm.ray_train import train

    data = make_demo_multilabel(tmp_path / "ml", classes=3, images=62, size=32, seed=5)
    cfg = _cfg(str(tmp_path / "ml"), tmp_path / "runs", "run.name=ml", "scaling.num_workers=2",
               f"data.path={data}", "data.format=manifest", "data.multi_label=true", "train.epochs=2",
               "train.batch_size=8", "train.calibrate_thresholds=true", "model.name=test_resnet", "model.img_size=32",
               "mlflow.enabled=true", f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=multilabel")
    assert cfg.checkpoint.metric == "val/mAP"
    scan = scan_dataset(prepare_dataset_root(cfg), cfg)
    assert len(scan.val) % 2 == 1, len(scan.val)  # a padding sampler would count one image twice
    result = train(cfg, train_loop=_digest_loop_factory(str(tmp_path)))
    assert (tmp_path / "rank0.sha256").read_text() == (tmp_path / "rank1.sha256").read_text()

    meta = ckpt.load_meta(result.best_checkpoint)
    assert meta["multi_label"] is True and len(meta["thresholds"]) == 3
    assert meta["metrics"]["val/mAP"] == pytest.approx(result.best_metrics["val/mAP"])
    model = build_model(meta["model_name"], num_classes=3)
    model.load_state_dict(ckpt.load_model_state(result.best_checkpoint))
    ds = ImageDataset(scan.val, build_eval_transform(meta["data_config"]), num_labels=3)
    alone = evaluate_multilabel(model, DataLoader(ds, batch_size=7), torch.device("cpu"),
                                class_names=meta["class_names"], thresholds=meta["thresholds"])
    assert alone["num_samples"] == len(scan.val)
    for key in ("mAP", "f1_micro", "f1_macro"):
        assert alone[key] == pytest.approx(result.best_metrics[f"val/{key}"], abs=1e-6), key
    assert alone["loss"] == pytest.approx(result.best_metrics["val/loss"], rel=1e-4)
    # The stored thresholds are the calibrated ones for these weights on the whole val set.
    recalibrated = evaluate_multilabel(model, DataLoader(ds, batch_size=7), torch.device("cpu"),
                                       class_names=meta["class_names"], calibrate=True)
    assert recalibrated["thresholds"] == pytest.approx(meta["thresholds"], abs=1e-5)

    client = MlflowClient(mlflow_server)
    run_id = result.mlflow_run_id
    assert {m.step for m in client.get_metric_history(run_id, "val/mAP")} == {1, 2}
    local = client.download_artifacts(run_id, "per_class.csv", str(tmp_path))
    with open(local, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == meta["class_names"]
    assert [float(r["ap"]) for r in rows] == pytest.approx([r["ap"] for r in meta["per_class"]], abs=0.01)
    assert {"support", "precision", "recall", "threshold"} <= set(rows[0])


def _wait_for_checkpoint(run_dir: Path, epoch: int, done: threading.Event, deadline: float) -> bool:
    """True once checkpoint_<epoch> is complete in the run folder (False if the run ended first)."""
    meta = run_dir / f"checkpoint_{epoch:06d}" / "meta.json"
    while not meta.exists():
        if done.is_set() or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.mlflow_server
def test_run_survives_tracking_server_loss_and_mlflow_has_each_epoch_once(ray_local, demo_data, tmp_path):
    """Tracking server loss during a real run: its `mlflow server` is killed at epoch 2 and started
    again (same port, same store) at epoch 4 of 6. The run finishes normally and MLflow ends with
    every epoch's metrics exactly once. The outage follows the run's checkpoints, not the clock."""
    from mlflow import MlflowClient

    from raytimm.ray_train import train
    from tests.fixtures.mlflow_server import MlflowServer

    root, _ = demo_data
    epochs = 6
    server = MlflowServer(tmp_path / "mlflow")
    uri = server.start()
    # A dead server refuses at once, so a long timeout costs nothing here; a short retry makes the
    # controller's sender send what it missed while the run goes on.
    cfg = _cfg(root, tmp_path / "runs", "run.name=outage", "scaling.num_workers=2", f"train.epochs={epochs}",
               "model.name=test_resnet", "model.img_size=32", "mlflow.enabled=true", f"mlflow.tracking_uri={uri}",
               "mlflow.experiment=outage", "mlflow.timeout_s=30", "mlflow.retry_after_s=2")
    run_dir = tmp_path / "runs" / "outage"
    done = threading.Event()
    events: dict = {}

    def outage():
        deadline = time.monotonic() + 600
        # Killed while epoch 2 trains, started again while epoch 4 trains (the workers wait after
        # epoch 4 until it answers, so a slow start on a busy machine cannot outlast the run).
        if not _wait_for_checkpoint(run_dir, 1, done, deadline):
            return
        server.kill()
        events["killed"] = True
        if not _wait_for_checkpoint(run_dir, 3, done, deadline):
            return
        server.start()
        events["back_before_epoch_5"] = not (run_dir / "checkpoint_000005").exists()
        release.touch()

    release = tmp_path / "server-is-back"
    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        result = train(cfg, train_loop=_recording_loop_factory(str(tmp_path), 4, str(release)))
    finally:
        done.set()
        thread.join(timeout=240)
    try:
        assert events == {"killed": True, "back_before_epoch_5": True}, events
        assert result.status == "finished" and result.epochs == epochs
        assert result.mlflow_run_id

        client = MlflowClient(uri)
        run = client.get_run(result.mlflow_run_id)
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr", "throughput", "epoch"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, epochs + 1)), (key, steps)
        assert run.data.params["train.epochs"] == str(epochs)
        assert run.data.tags["raytimm.best_checkpoint"] == result.best_checkpoint
    finally:
        server.stop()

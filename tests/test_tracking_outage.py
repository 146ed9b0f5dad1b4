"""Tracking server loss during a real run: a 6-epoch Ray Train run (2 workers) whose `mlflow server`
is killed at epoch 2 and started again (same port, same store) at epoch 4. The run must finish
normally and MLflow must end with every epoch's metrics exactly once.

The outage follows the run's own progress (its checkpoint folders), not the clock.
"""
import os
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.mlflow_server import MlflowServer

pytestmark = [pytest.mark.ray, pytest.mark.mlflow_server, pytest.mark.slow]

EPOCHS = 6


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from raytimm.ray_train import init_ray

    os.environ["TQDM_DISABLE"] = "1"
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _held_loop_factory(hold_after_epoch: int, release_file: str):
    """The real per-worker loop, except that each worker waits after reporting ``hold_after_epoch``
    until ``release_file`` exists: the test restarts the server meanwhile, however slowly it starts."""

    def loop(config):
        import ray.train

        from raytimm import ray_train

        report = ray.train.report

        def held_report(metrics, *args, **kwargs):
            report(metrics, *args, **kwargs)
            if int(metrics.get("epoch", 0)) == hold_after_epoch:
                deadline = time.monotonic() + 300
                while not os.path.exists(release_file) and time.monotonic() < deadline:
                    time.sleep(0.1)

        ray.train.report = held_report
        try:
            ray_train.train_loop_per_worker(config)
        finally:
            ray.train.report = report

    return loop


def _wait_for_checkpoint(run_dir: Path, epoch: int, done: threading.Event, deadline: float) -> bool:
    """True once checkpoint_<epoch> is complete in the run folder (False if the run ended first)."""
    meta = run_dir / f"checkpoint_{epoch:06d}" / "meta.json"
    while not meta.exists():
        if done.is_set() or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_run_survives_tracking_server_loss_and_mlflow_has_each_epoch_once(ray_local, tmp_path):
    from mlflow import MlflowClient

    from raytimm.config import load_config
    from raytimm.data.demo import make_demo_dataset
    from raytimm.ray_train import train

    server = MlflowServer(tmp_path / "mlflow")
    server.root.mkdir()
    uri = server.start()
    data = make_demo_dataset(str(tmp_path / "data"), classes=4, per_class=32, size=48, seed=1)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", [
        f"data.path={data}", f"storage.path={tmp_path / 'runs'}", "run.name=outage", "scaling.num_workers=2",
        f"train.epochs={EPOCHS}", "model.name=test_resnet", "model.img_size=32",
        "mlflow.enabled=true", f"mlflow.tracking_uri={uri}", "mlflow.experiment=outage",
        # A dead server refuses at once, so a long timeout costs nothing here; a short retry makes the
        # controller's sender send what it missed while the run goes on.
        "mlflow.timeout_s=30", "mlflow.retry_after_s=2",
    ])
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
        result = train(cfg, train_loop=_held_loop_factory(4, str(release)))
    finally:
        done.set()
        thread.join(timeout=240)
    try:
        assert events == {"killed": True, "back_before_epoch_5": True}, events
        assert result.status == "finished" and result.epochs == EPOCHS
        assert result.mlflow_run_id

        client = MlflowClient(uri)
        run = client.get_run(result.mlflow_run_id)
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr", "throughput", "epoch"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), (key, steps)
        assert run.data.params["train.epochs"] == str(EPOCHS)
        assert run.data.tags["raytimm.best_checkpoint"] == result.best_checkpoint
    finally:
        server.stop()

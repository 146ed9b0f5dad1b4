"""`raytimm tune` on a real Ray cluster, a real `mlflow server` and the demo data (2 CPU cores).

One Ray head per module (tests/helpers_ray.py: `ray start --head --block` on loopback). Its processes
all carry RAY_ADDRESS, so Train's PlacementGroupCleaner (State API) finds *this* cluster even when
other Ray instances run on the machine; without that it cannot release stopped trials' CPUs.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers_ray import BIN, ray_head, wait_cpus_free

ROOT = Path(__file__).resolve().parents[1]
DEMO_SWEEP = ROOT / "configs" / "tune" / "demo_asha.yaml"
BAD_LR = 1e-7  # the hopeless grid point in demo_asha.yaml

pytestmark = [pytest.mark.ray, pytest.mark.mlflow_server, pytest.mark.slow]


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A 2-CPU Ray head on 127.0.0.1 with the dashboard; yields its GCS address."""
    with ray_head(2, tmp_path_factory.mktemp("ray")) as address:
        yield address


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from raytimm.data.demo import make_demo_dataset

    return make_demo_dataset(str(tmp_path_factory.mktemp("demo") / "data"), classes=4, per_class=24, size=32,
                             seed=0)


@pytest.fixture(scope="module")
def sweep(ray_cluster, demo_data, mlflow_server, tmp_path_factory):
    """The 4-trial ASHA sweep of configs/tune/demo_asha.yaml, run once for the module."""
    from raytimm.config import load_config
    from raytimm.ray_tune import tune

    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(str(DEMO_SWEEP), [f"data.path={demo_data}", f"storage.path={runs}",
                                        f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=tune-asha",
                                        "tune.name=asha"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = tune(cfg)
    print(out.getvalue())
    return cfg, result, out.getvalue()


def _by_lr(result, lr):
    (t,) = [t for t in result.trials if t.config["train.lr"] == pytest.approx(lr)]
    return t


# ------------------------------------------------------------------ the ASHA sweep

def test_asha_stops_the_hopeless_trial_early_and_picks_a_good_one(sweep):
    cfg, result, _ = sweep
    assert len(result.trials) == 4
    bad = _by_lr(result, BAD_LR)
    assert bad.status == "stopped" and bad.epochs < cfg.train.epochs
    assert any(t.status == "completed" and t.epochs == cfg.train.epochs for t in result.trials)
    best = [t for t in result.trials if t.trial_id == result.best_trial_id][0]
    assert best.config["train.lr"] != pytest.approx(BAD_LR)
    assert result.best_config == best.config
    # demo_asha.yaml ranks by val/loss (min): see the comment there.
    assert (cfg.tune.metric, cfg.tune.mode) == ("val/loss", "min")
    assert result.best_metrics["val/loss"] < bad.best_metrics["val/loss"]
    assert result.best_metrics["val/loss"] == min(t.best_metrics["val/loss"] for t in result.trials)
    assert result.best_metrics["val/top1"] > 50.0  # it learned something


def test_every_trial_checkpoints_under_the_tune_folder(sweep):
    cfg, result, _ = sweep
    tune_dir = Path(cfg.storage.path) / "asha"
    assert result.run_dir == str(tune_dir)
    for t in result.trials:
        ckpt = Path(t.checkpoint)
        assert ckpt.parent == tune_dir / f"trial_{t.trial_id}"
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "meta.json").is_file()
        assert json.loads((ckpt / "meta.json").read_text())["metrics"]["val/loss"] == t.best_metrics["val/loss"]
        # Each trial folder says how the trial ended, even when ASHA killed its driver mid-run.
        progress = json.loads((tune_dir / f"trial_{t.trial_id}" / "progress.json").read_text())
        assert progress["status"] == {"completed": "finished", "stopped": "stopped_early"}[t.status]
        assert progress["best_checkpoint"] == t.checkpoint and progress["finished_at"]


class TrainController:
    """Named like Ray Train's controller: the kind of actor the sweep waits for before settling trial folders."""

    def write_later(self, path: str, delay_s: float) -> None:
        import ray

        time.sleep(delay_s)
        Path(path).write_text("late write")
        ray.actor.exit_actor()


class Bystander:
    def ping(self) -> int:
        return 1


def test_trial_folders_are_settled_only_after_the_trials_writers_exit(ray_cluster, tmp_path):
    """A stopped trial's controller can still write its folder after Tune returns (the flake this
    fixes: progress.json back at "running"); the sweep waits for such actors, not for others."""
    import ray

    from raytimm.ray_tune import _wait_for_trial_writers

    writer = ray.remote(num_cpus=0)(TrainController).remote()
    bystander = ray.remote(num_cpus=0)(Bystander).remote()
    assert ray.get(bystander.ping.remote()) == 1
    late = tmp_path / "late.txt"
    writer.write_later.remote(str(late), 3.0)
    # A bystander counted as a writer would keep the wait to its end and come back in the list.
    assert _wait_for_trial_writers(timeout_s=60) == []
    assert late.read_text() == "late write"  # the wait outlasted the writer's last write
    assert ray.get(bystander.ping.remote()) == 1  # and did not wait for (or touch) unrelated actors
    ray.kill(bystander)


def test_trials_csv_table_and_best_pointer(sweep):
    from raytimm.checkpoint import read_pointer_info, resolve_checkpoint

    cfg, result, printed = sweep
    tune_dir = Path(result.run_dir)
    rows = list(csv.DictReader((tune_dir / "trials.csv").open()))
    assert [r["trial_id"] for r in rows] == [t.trial_id for t in result.trials]
    assert set(rows[0]) == {"trial_id", "train.lr", "val/loss", "epochs", "status", "checkpoint"}
    for r, t in zip(rows, result.trials):
        assert float(r["train.lr"]) == pytest.approx(t.config["train.lr"])
        assert int(r["epochs"]) == t.epochs and r["status"] == t.status and r["checkpoint"] == t.checkpoint
    assert "trial_id" in printed and result.best_trial_id in printed  # the table went to stdout
    pointer = read_pointer_info(str(tune_dir), "best")
    assert pointer["checkpoint"] == result.best_checkpoint
    assert pointer["metrics"]["val/loss"] == result.best_metrics["val/loss"]
    # What `raytimm serve --checkpoint <tune folder>` loads.
    assert resolve_checkpoint(str(tune_dir)).uri == result.best_checkpoint


def test_result_json_fields(sweep):
    _, result, _ = sweep
    d = json.loads(json.dumps(result.to_dict()))
    assert d["best_checkpoint"] == result.best_checkpoint and d["best_config"] == result.best_config
    assert d["best_metrics"]["val/top1"] == result.best_metrics["val/top1"]
    assert d["run_dir"] == result.run_dir and d["mlflow_run_id"]
    for t in d["trials"]:
        assert set(t) >= {"trial_id", "config", "best_metrics", "epochs", "status", "checkpoint"}
        assert set(t["config"]) == {"train.lr"}


def test_stopped_trials_gave_their_cpus_back(sweep):
    import ray

    total = ray.cluster_resources()["CPU"]
    assert wait_cpus_free(total) == total


def test_best_checkpoint_evaluates_to_what_tune_reported(sweep, tmp_path):
    cfg, result, _ = sweep
    out = tmp_path / "eval.json"
    r = subprocess.run([str(BIN / "raytimm"), "evaluate", "--checkpoint", result.run_dir, "--data", cfg.data.path,
                        "--result-json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    evaluated = json.loads(out.read_text())
    assert evaluated["top1"] == pytest.approx(result.best_metrics["val/top1"], abs=1e-6)
    assert evaluated["num_samples"] == 24
    # ...and it is the number Tune itself received for that trial and epoch.
    progress = Path(result.run_dir) / f"tune_{result.best_trial_id}" / "progress.csv"
    rows = {int(float(r["epoch"])): float(r["val/top1"]) for r in csv.DictReader(progress.open())}
    assert rows[int(result.best_metrics["epoch"])] == pytest.approx(evaluated["top1"], abs=1e-6)


def test_mlflow_parent_run_and_one_child_per_trial(sweep, mlflow_server):
    from mlflow import MlflowClient

    _, result, _ = sweep
    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.run_name == "asha" and parent.info.status == "FINISHED"
    assert parent.data.tags["raytimm.best_trial"] == result.best_trial_id
    assert parent.data.tags["raytimm.best_checkpoint"] == result.best_checkpoint
    assert parent.data.metrics["best/val/loss"] == result.best_metrics["val/loss"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {f"trial_{t.trial_id}" for t in result.trials}
    assert parent.data.tags["raytimm.best_run_id"] == by_name[f"trial_{result.best_trial_id}"].info.run_id
    for t in result.trials:
        child = by_name[f"trial_{t.trial_id}"]
        assert float(child.data.params["train.lr"]) == pytest.approx(t.config["train.lr"])
        assert child.info.status == ("FINISHED" if t.status == "completed" else "KILLED")
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "val/loss"))
        assert steps and steps == sorted(set(steps))
        if t.status == "completed":
            assert steps == list(range(1, t.epochs + 1))


# ------------------------------------------------------------------ restore after a driver crash

def _checkpoint_mtimes(run_dir: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("checkpoint_*/model.safetensors")}


def _tune_cmd(data: str, runs: Path, tracking_uri: str, result_json: Path) -> list[str]:
    return [str(BIN / "raytimm"), "tune", "--config", str(DEMO_SWEEP), f"data.path={data}", f"storage.path={runs}",
            f"mlflow.tracking_uri={tracking_uri}", "mlflow.experiment=tune-restore", "tune.scheduler=fifo",
            "tune.max_concurrent_trials=1", "train.epochs=2", "tune.search_space={train.lr: {grid: [0.01, 0.003]}}",
            "--result-json", str(result_json)]


@pytest.mark.e2e
def test_rerun_after_a_driver_crash_resumes_without_rerunning_finished_trials(
        ray_cluster, demo_data, mlflow_server, tmp_path):
    import ray
    from mlflow import MlflowClient

    wait_cpus_free(ray.cluster_resources()["CPU"])  # an earlier sweep's trials are gone

    runs = tmp_path / "runs"
    cmd = _tune_cmd(demo_data, runs, mlflow_server, tmp_path / "result.json")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "token"}
    log = tmp_path / "first.log"
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # With one trial at a time, a second trial folder means Tune has finished the first trial.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            trial_dirs = sorted(runs.glob("*/trial_*"))
            if len(trial_dirs) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert len(trial_dirs) >= 2, log.read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the crash: no cleanup, no final experiment save
        proc.wait(timeout=30)
    assert not (tmp_path / "result.json").exists()
    first = trial_dirs[0]
    done_before = _checkpoint_mtimes(first)
    assert any(n.endswith("000002") for n in done_before), sorted(done_before)

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "resuming sweep" in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["trials"]) == 2
    assert {f"trial_{t['trial_id']}" for t in result["trials"]} == {p.name for p in trial_dirs}
    assert all(t["status"] == "completed" and t["epochs"] == 2 for t in result["trials"])
    # The finished trial was not trained again: its checkpoints are the very same files.
    assert _checkpoint_mtimes(first) == done_before
    # One MLflow parent (continued, not duplicated) and one child per trial.
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("tune-restore")
    runs_ = client.search_runs([exp.experiment_id])
    parents = [x for x in runs_ if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == result["mlflow_run_id"]
    assert len(runs_) == 3


def test_a_multi_label_sweep_ranks_trials_by_map_and_its_best_evaluates_to_it(ray_cluster, mlflow_server, tmp_path):
    """Tune over a multi-label manifest: val/mAP is the sweep's metric (the default in multi-label mode), the
    best trial is the one with the highest val/mAP, and `raytimm evaluate` of the sweep gives that number."""
    import ray

    from raytimm.config import load_config
    from raytimm.data.demo import make_demo_multilabel
    from raytimm.ray_tune import tune

    wait_cpus_free(ray.cluster_resources()["CPU"])
    csv_path = make_demo_multilabel(tmp_path / "ml", classes=3, images=48, size=32, seed=6)
    cfg = load_config(str(DEMO_SWEEP), [
        f"data.path={csv_path}", "data.format=manifest", "data.multi_label=true", f"storage.path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=tune-multilabel", "tune.name=ml",
        "tune.scheduler=fifo", "tune.metric=val/mAP", "tune.mode=max", "train.epochs=1",
        "tune.search_space={train.lr: {grid: [0.01, 0.0000001]}}"])
    with contextlib.redirect_stdout(io.StringIO()):
        result = tune(cfg)
    assert len(result.trials) == 2 and all(t.status == "completed" for t in result.trials)
    maps = {t.trial_id: t.best_metrics["val/mAP"] for t in result.trials}
    assert result.best_metrics["val/mAP"] == maps[result.best_trial_id] == max(maps.values())
    out = tmp_path / "eval.json"
    r = subprocess.run([str(BIN / "raytimm"), "evaluate", "--checkpoint", result.run_dir, "--data", csv_path,
                        "--result-json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads(out.read_text())["mAP"] == pytest.approx(result.best_metrics["val/mAP"], abs=1e-6)

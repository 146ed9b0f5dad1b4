"""engine.fit in one process (no Ray): checkpoints, meta.json, resume, EMA, accumulation, mixup, early stop."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from raytimm import checkpoint as ckpt
from raytimm.config import config_from_dict
from raytimm.engine import evaluate, fit
from raytimm.metrics import SINGLE_LABEL_KEYS
from raytimm.model import build_model

CLASSES = 3


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from raytimm.data.demo import make_demo_dataset

    # 3 classes x 12 images at 32 px: 9 train + 3 val per class.
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", classes=CLASSES, per_class=12, size=32)


def make_cfg(data_path, storage_path, **train):
    """A tiny, deterministic config: no random augmentation, so resumed runs can be compared exactly."""
    t = dict(epochs=2, batch_size=8, lr=0.01, warmup_epochs=0, seed=0, threads=1)
    t.update(train)
    return config_from_dict({
        "data": {"path": str(data_path), "num_workers": 0, "rrc": False, "hflip": 0.0, "color_jitter": 0.0},
        "model": {"name": "test_resnet", "img_size": 32},
        "train": t,
        "storage": {"path": str(storage_path)},
        "run": {"name": "run"},
        "mlflow": {"enabled": False},
    })


def reevaluate(checkpoint_dir, data_root) -> dict:
    """Evaluate a saved checkpoint alone, through the same eval transform, on the val split."""
    from torch.utils.data import DataLoader

    from raytimm.data.folder import ImageDataset, scan_imagefolder
    from raytimm.data.transforms import build_eval_transform

    meta = ckpt.load_meta(checkpoint_dir)
    model = build_model(meta["model_name"], num_classes=meta["num_classes"])
    model.load_state_dict(ckpt.load_model_state(checkpoint_dir))
    scan = scan_imagefolder(data_root)
    ds = ImageDataset(scan.val, build_eval_transform(meta["data_config"]))
    return evaluate(model, DataLoader(ds, batch_size=5), torch.device("cpu"), num_classes=meta["num_classes"])


@pytest.fixture(scope="module")
def two_epochs(demo_root, tmp_path_factory):
    """One uninterrupted 2-epoch run, shared by several tests."""
    storage = tmp_path_factory.mktemp("runs")
    result = fit(make_cfg(demo_root, storage))
    return result, storage / "run"


def test_fit_metrics_and_result(two_epochs):
    result, _ = two_epochs
    assert result.last_epoch == 2 and not result.stopped_early
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert set(h) == set(SINGLE_LABEL_KEYS)
        assert all(math.isfinite(float(v)) for v in h.values())
        for k in ("train/top1", "val/top1", "val/top5"):
            assert 0.0 <= h[k] <= 100.0
        assert h["val/top5"] == 100.0  # 3 classes: top-5 is top-3, always a hit
        assert h["throughput"] > 0 and h["lr"] > 0
    best = max(result.history, key=lambda h: h["val/top1"])
    assert result.best_metrics["val/top1"] == best["val/top1"]
    assert result.class_names == ["circle_red", "square_blue", "triangle_green"]
    cm = result.confusion_matrix
    assert len(cm) == CLASSES and sum(map(sum, cm)) == 9  # every val image exactly once
    assert [p["support"] for p in result.per_class] == [3, 3, 3]


def test_checkpoint_files_meta_and_pointers(two_epochs, demo_root):
    result, run_dir = two_epochs
    for epoch in (1, 2):
        d = run_dir / f"checkpoint_{epoch:06d}"
        assert {p.name for p in d.iterdir()} == {"model.safetensors", "meta.json", "train_state.pt"}
    meta = ckpt.load_meta(run_dir / "checkpoint_000002")
    assert meta["model_name"] == "test_resnet" and meta["num_classes"] == CLASSES
    assert meta["class_names"] == result.class_names and meta["epoch"] == 2
    assert meta["metrics"] == result.history[1]
    assert meta["data_config"]["input_size"] == [3, 32, 32]
    assert {"mean", "std", "interpolation", "crop_pct"} <= set(meta["data_config"])
    assert meta["config"]["train"]["epochs"] == 2 and meta["config"]["data"]["path"] == str(demo_root)
    assert set(meta["versions"]) >= {"raytimm", "timm", "torch"}
    assert len(meta["history"]) == 2 and len(meta["confusion_matrix"]) == CLASSES
    state = ckpt.load_train_state(run_dir / "checkpoint_000002")  # weights_only=True
    assert state["epoch"] == 2 and state["optimizer"]["state"] and len(state["rng"]) == 1
    assert ckpt.read_pointer(str(run_dir), "best") == str(run_dir / f"checkpoint_{result.best_epoch:06d}")
    assert result.best_checkpoint == str(run_dir / f"checkpoint_{result.best_epoch:06d}")
    assert ckpt.read_pointer(str(run_dir), "latest") == str(run_dir / "checkpoint_000002")


def test_saved_best_reevaluates_to_reported_metrics(two_epochs, demo_root):
    result, _ = two_epochs
    alone = reevaluate(result.best_checkpoint, demo_root)
    assert alone["num_samples"] == 9
    assert alone["top1"] == pytest.approx(result.best_metrics["val/top1"])
    assert alone["loss"] == pytest.approx(result.best_metrics["val/loss"], rel=1e-4)


def test_evaluate_checkpoint_reproduces_val_metrics(two_epochs, demo_root):
    """`raytimm evaluate` (predict.evaluate_checkpoint) on the best checkpoint gives back its epoch's val numbers."""
    from raytimm.predict import evaluate_checkpoint

    result, _ = two_epochs
    got = evaluate_checkpoint(result.best_checkpoint, demo_root, device="cpu")
    assert got["num_samples"] == 9 and got["confusion_matrix"] == result.confusion_matrix
    assert got["top1"] == pytest.approx(result.best_metrics["val/top1"], abs=1e-6)
    assert got["top5"] == pytest.approx(result.best_metrics["val/top5"], abs=1e-6)
    assert got["loss"] == pytest.approx(result.best_metrics["val/loss"], rel=1e-4)
    assert got["per_class"] == {p["class"]: p["top1"] for p in result.per_class}


def epochs_run(out: str) -> list[int]:
    """The epochs whose summary line fit printed (one per epoch it trained, on rank 0)."""
    return [int(m) for m in re.findall(r"^epoch (\d+)/\d+  train/loss", out, flags=re.M)]


def test_resume_adds_epochs(demo_root, tmp_path, capsys):
    first = fit(make_cfg(demo_root, tmp_path, epochs=1))
    assert [h["epoch"] for h in first.history] == [1]
    capsys.readouterr()
    resumed = fit(make_cfg(demo_root, tmp_path, epochs=2), resume_state_dir=str(tmp_path / "run" / "checkpoint_000001"))
    assert epochs_run(capsys.readouterr().out) == [2]  # only the added epoch runs
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]
    assert ckpt.load_train_state(tmp_path / "run" / "checkpoint_000002")["epoch"] == 2

    # Resuming a finished run trains nothing and returns its stored result.
    again = fit(make_cfg(demo_root, tmp_path, epochs=2), resume_state_dir=str(tmp_path / "run" / "checkpoint_000002"))
    assert epochs_run(capsys.readouterr().out) == [] and again.last_epoch == 2 and len(again.history) == 2


def test_resume_matches_uninterrupted_run(two_epochs, demo_root, tmp_path):
    full, full_dir = two_epochs
    resumed = fit(make_cfg(demo_root, tmp_path), resume_state_dir=str(full_dir / "checkpoint_000001"))
    # Model, optimizer, scheduler, sampler order and RNG were all restored: same weights as one 2-epoch run.
    a = ckpt.load_model_state(full_dir / "checkpoint_000002")
    b = ckpt.load_model_state(tmp_path / "run" / "checkpoint_000002")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert resumed.history[1]["lr"] == pytest.approx(full.history[1]["lr"])
    assert resumed.history[1]["train/loss"] == pytest.approx(full.history[1]["train/loss"], rel=1e-5)
    assert resumed.history[1]["val/top1"] == pytest.approx(full.history[1]["val/top1"])


def test_ema_and_accumulation_save_ema_weights(demo_root, tmp_path):
    result = fit(make_cfg(demo_root, tmp_path, epochs=1, ema=True, ema_decay=0.9, grad_accum_steps=2, clip_grad=1.0))
    d = tmp_path / "run" / "checkpoint_000001"
    saved = ckpt.load_model_state(d)
    state = ckpt.load_train_state(d)
    # 27 train images, batch 8, drop_last -> 3 micro-batches -> 2 optimizer updates (2 + a short 1).
    assert state["num_updates"] == 2
    assert ckpt.load_meta(d)["ema"] is True
    ema = {k[len("module."):]: v for k, v in state["ema"].items()}
    raw = state["model"]
    for k in saved:
        assert torch.equal(saved[k], ema[k]), k
    assert any(not torch.equal(saved[k], raw[k]) for k in saved if saved[k].is_floating_point())
    # The validated weights are the saved (EMA) ones.
    assert reevaluate(d, demo_root)["top1"] == pytest.approx(result.history[0]["val/top1"])


def test_mixup_cutmix_path(demo_root, tmp_path):
    result = fit(make_cfg(demo_root, tmp_path, epochs=1, mixup=0.8, cutmix=1.0, mixup_prob=1.0))
    assert math.isfinite(result.history[0]["train/loss"])


def test_report_callback_gets_complete_checkpoint_and_nothing_is_written(demo_root, tmp_path):
    seen = []

    def report(metrics, checkpoint_dir):
        seen.append((dict(metrics), checkpoint_dir, sorted(os.listdir(checkpoint_dir))))

    result = fit(make_cfg(demo_root, tmp_path / "runs"), report=report)
    assert [m["epoch"] for m, _, _ in seen] == [1, 2]
    assert all(files == ["meta.json", "model.safetensors", "train_state.pt"] for _, _, files in seen)
    assert not any(os.path.exists(d) for _, d, _ in seen)  # temp folders are cleaned after report
    assert not (tmp_path / "runs").exists() and result.run_dir is None


def frozen_cfg(demo_root, storage_path, **train):
    """A learning rate too small to change any prediction: val/top1 is the same every epoch (a tie)."""
    cfg = make_cfg(demo_root, storage_path, lr=1e-12, warmup_lr=1e-12, min_lr=1e-12, **train)
    cfg.model.name = "test_vit"  # LayerNorm only: no BatchNorm statistics drift in train mode
    return cfg


def test_early_stopping_on_patience(demo_root, tmp_path):
    from raytimm import runs

    cfg = frozen_cfg(demo_root, tmp_path, epochs=6, patience=2)
    cfg.checkpoint.num_to_keep = 1
    result = fit(cfg)
    # A tie is no improvement for patience, but it is the later (so the best) checkpoint for ranking.
    assert len({h["val/top1"] for h in result.history}) == 1
    assert result.stopped_early and result.last_epoch == 3 and result.best_epoch == 3
    # Like Ray's CheckpointConfig: the best num_to_keep plus the latest survive (here the same one).
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint_*")) == ["checkpoint_000003"]
    assert ckpt.load_meta(tmp_path / "run" / "checkpoint_000003")["epochs_without_improvement"] == 2
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["status"] == "stopped_early" and progress["progress"] == 1.0 and progress["epoch"] == 3
    # The completion rule agrees: a rerun with the same settings has nothing left to do.
    done = runs.completed(str(tmp_path / "run"), epochs=6, patience=2)
    assert done is not None and done["early_stopped"] and done["epoch"] == 3
    assert runs.completed(str(tmp_path / "run"), epochs=6, patience=3) is None


def test_a_tie_for_best_names_the_later_checkpoint_everywhere(demo_root, tmp_path, monkeypatch, capsys):
    """The *best mark, meta.best_epoch, the `best` pointer, FitResult and progress.json agree on a tie."""
    from raytimm import runs

    run_dir = tmp_path / "run"
    seen = []
    publish = runs.LocalReporter.__call__

    def publish_then_snapshot(self, metrics, checkpoint_dir):  # progress.json right after each epoch's report
        publish(self, metrics, checkpoint_dir)
        seen.append((int(metrics["epoch"]), json.loads((run_dir / "progress.json").read_text())))

    monkeypatch.setattr(runs.LocalReporter, "__call__", publish_then_snapshot)
    result = fit(frozen_cfg(demo_root, tmp_path, epochs=3))
    tops = [h["val/top1"] for h in result.history]
    assert tops[0] == tops[1] == tops[2], tops  # the tie really happened
    later = str(run_dir / "checkpoint_000003")
    assert result.best_epoch == 3 and result.best_checkpoint == later
    assert ckpt.read_pointer(str(run_dir), "best") == later
    assert ckpt.load_meta(later)["best_epoch"] == 3
    summaries = [line for line in capsys.readouterr().out.splitlines() if re.match(r"epoch \d+/3  train/loss", line)]
    assert len(summaries) == 3 and all(line.endswith("  *best") for line in summaries), summaries
    assert [epoch for epoch, _ in seen] == [1, 2, 3]
    for epoch, progress in seen:
        assert progress["status"] == "running" and progress["epoch"] == epoch and progress["epochs"] == 3
        assert [h["epoch"] for h in progress["history"]] == list(range(1, epoch + 1))
        assert progress["best_epoch"] == epoch and progress["best_checkpoint"].endswith(f"checkpoint_{epoch:06d}")
        assert progress["progress"] == pytest.approx(epoch / 3)
    final = json.loads((run_dir / "progress.json").read_text())
    assert final["status"] == "finished" and final["best_checkpoint"] == later and final["finished_at"]
    # Retention ranks with the same rule: the best 2 (the two later ties) plus the latest.
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_000002", "checkpoint_000003"]


def test_summary_line_on_stdout(demo_root, tmp_path, capsys):
    fit(make_cfg(demo_root, tmp_path, epochs=1))
    out = capsys.readouterr().out
    assert "epoch 1/1  train/loss" in out and "val/top1" in out and "img/s" in out


def test_sigkill_mid_run_then_resume_from_latest(demo_root, tmp_path):
    """A training process killed from outside mid-run leaves `latest` on a complete checkpoint; resuming
    from it trains only the remaining epochs."""
    epochs = 6
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_engine import make_cfg
        from raytimm.engine import fit
        resume = sys.argv[1] if len(sys.argv) > 1 else None
        r = fit(make_cfg({str(demo_root)!r}, {str(tmp_path)!r}, epochs={epochs}), resume_state_dir=resume)
        print("EPOCHS", [h["epoch"] for h in r.history])
    """)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        # Kill as soon as the first checkpoint is published: the process is then inside epoch 2.
        deadline = time.monotonic() + 300
        while ckpt.read_pointer(str(run_dir), "latest") is None and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    killed_after = epochs_run(out)
    assert killed_after and killed_after[-1] < epochs, out[-2000:]  # it really died mid-run

    latest = ckpt.read_pointer(str(run_dir), "latest")
    assert ckpt.is_complete(latest)
    done = ckpt.load_meta(latest)["epoch"]
    second = subprocess.run([sys.executable, "-c", script, latest], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert epochs_run(second.stdout) == list(range(done + 1, epochs + 1))
    assert f"EPOCHS {list(range(1, epochs + 1))}" in second.stdout


def test_dice_dataset(tmp_path):
    from raytimm.data.demo import make_demo_dice

    src = make_demo_dice(tmp_path / "dice", classes=CLASSES, per_class=12, size=32)
    cfg = make_cfg(src, tmp_path / "runs", epochs=1)
    cfg.data.format = "dice"
    cfg.data.cache_dir = str(tmp_path / "cache")
    result = fit(cfg)
    assert len(result.class_names) == CLASSES and sum(map(sum, result.confusion_matrix)) > 0
    assert list((tmp_path / "cache" / "dice").iterdir())  # converted once into the cache


def test_fp16_autocast_saves_grad_scaler_state(demo_root, tmp_path):
    # On CPU 'auto' means no AMP; asking for fp16 explicitly exercises autocast + GradScaler here too.
    result = fit(make_cfg(demo_root, tmp_path, epochs=1, amp="fp16"))
    assert math.isfinite(result.history[0]["train/loss"])
    scaler = ckpt.load_train_state(tmp_path / "run" / "checkpoint_000001")["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler

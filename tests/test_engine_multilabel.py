"""engine.fit in one process (no Ray) on multi-label data, and single-label runs with data.balance:
the meta.json contract (multi_label, thresholds, per-label metrics), exact re-evaluation, calibration, resume."""
import json
import math
import os

import pytest
import torch

from raytimm import checkpoint as ckpt
from raytimm.config import config_from_dict
from raytimm.engine import evaluate_multilabel, fit
from raytimm.metrics import MULTI_LABEL_KEYS, SINGLE_LABEL_KEYS, calibrate_thresholds
from raytimm.model import build_model


@pytest.fixture(scope="module")
def ml_csv(tmp_path_factory):
    from raytimm.data.demo import make_demo_multilabel

    return make_demo_multilabel(tmp_path_factory.mktemp("ml") / "data", classes=3, images=60, size=32, seed=2)


def make_cfg(data_path, storage_path, data=None, **train):
    t = dict(epochs=2, batch_size=8, lr=0.01, warmup_epochs=0, seed=0, threads=1)
    t.update(train)
    d = {"path": str(data_path), "num_workers": 0, "rrc": False, "hflip": 0.0, "color_jitter": 0.0}
    d.update(data or {"format": "manifest", "multi_label": True})
    return config_from_dict({"data": d, "model": {"name": "test_resnet", "img_size": 32}, "train": t,
                             "storage": {"path": str(storage_path)}, "run": {"name": "run"},
                             "mlflow": {"enabled": False}})


def reevaluate(checkpoint_dir, cfg, *, calibrate=False):
    """A saved checkpoint evaluated alone in this process, through the same data path as training."""
    from torch.utils.data import DataLoader

    from raytimm.data.folder import ImageDataset
    from raytimm.data.loaders import prepare_dataset_root, scan_dataset
    from raytimm.data.transforms import build_eval_transform

    meta = ckpt.load_meta(checkpoint_dir)
    model = build_model(meta["model_name"], num_classes=meta["num_classes"])
    model.load_state_dict(ckpt.load_model_state(checkpoint_dir))
    scan = scan_dataset(prepare_dataset_root(cfg), cfg)
    ds = ImageDataset(scan.val, build_eval_transform(meta["data_config"]), num_labels=meta["num_classes"])
    return evaluate_multilabel(model, DataLoader(ds, batch_size=5), torch.device("cpu"),
                               class_names=meta["class_names"], thresholds=meta["thresholds"], calibrate=calibrate)


@pytest.fixture(scope="module")
def ml_run(ml_csv, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = make_cfg(ml_csv, storage, calibrate_thresholds=True, pos_weight="auto")
    return fit(cfg), storage / "run", cfg


def test_multi_label_fit_reports_map_and_ranks_by_it(ml_run):
    result, run_dir, cfg = ml_run
    assert cfg.checkpoint.metric == "val/mAP"
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert set(h) == set(MULTI_LABEL_KEYS)
        assert all(math.isfinite(float(v)) for v in h.values())
        for k in ("val/mAP", "val/f1_micro", "val/f1_macro"):
            assert 0.0 <= h[k] <= 100.0
    assert result.best_metrics["val/mAP"] == max(h["val/mAP"] for h in result.history)
    assert result.confusion_matrix is None
    assert [r["class"] for r in result.per_class] == result.class_names and all("ap" in r for r in result.per_class)


def test_meta_json_contract_of_a_multi_label_checkpoint(ml_run):
    result, run_dir, _ = ml_run
    for epoch in (1, 2):
        meta = json.loads((run_dir / f"checkpoint_{epoch:06d}" / "meta.json").read_text())
        assert meta["multi_label"] is True
        assert len(meta["thresholds"]) == meta["num_classes"] == len(meta["class_names"]) == 3
        assert all(isinstance(t, float) and 0.0 < t < 1.0 for t in meta["thresholds"])
        assert meta["thresholds"] == [r["threshold"] for r in meta["per_class"]]
        for row in meta["per_class"]:
            assert set(row) == {"class", "support", "ap", "precision", "recall", "f1", "threshold"}
        assert meta["confusion_matrix"] is None and meta["metrics"]["epoch"] == epoch
    best = ckpt.read_pointer(str(run_dir), "best")
    assert best == result.best_checkpoint and ckpt.load_meta(best)["metrics"] == result.best_metrics


def test_saved_checkpoint_reevaluates_to_its_reported_metrics_and_calibrated_thresholds(ml_run):
    result, _, cfg = ml_run
    meta = ckpt.load_meta(result.best_checkpoint)
    alone = reevaluate(result.best_checkpoint, cfg)
    from raytimm.data.loaders import prepare_dataset_root, scan_dataset

    assert alone["num_samples"] == len(scan_dataset(prepare_dataset_root(cfg), cfg).val) > 0
    assert alone["mAP"] == pytest.approx(meta["metrics"]["val/mAP"], abs=1e-9)
    assert alone["f1_micro"] == pytest.approx(meta["metrics"]["val/f1_micro"], abs=1e-9)
    assert alone["f1_macro"] == pytest.approx(meta["metrics"]["val/f1_macro"], abs=1e-9)
    assert alone["loss"] == pytest.approx(meta["metrics"]["val/loss"], rel=1e-5)
    # The stored thresholds are the F1-optimal ones on val for these weights.
    recalibrated = reevaluate(result.best_checkpoint, cfg, calibrate=True)
    assert recalibrated["thresholds"] == pytest.approx(meta["thresholds"], abs=1e-6)


def test_evaluate_scores_a_multi_label_checkpoint_as_training_validation_did(ml_run, ml_csv, tmp_path, capsys):
    """`raytimm evaluate` on the training manifest's val split: the Predictor path (sigmoid scores, meta.json's
    thresholds) gives the metrics training stored; --predictions has each file's labels, label set and scores."""
    import csv

    from raytimm.cli import main

    result, _, cfg = ml_run
    meta = ckpt.load_meta(result.best_checkpoint)
    out_json, preds = tmp_path / "eval.json", tmp_path / "preds.csv"
    assert main(["evaluate", "--checkpoint", result.best_checkpoint, "--data", str(ml_csv),
                 "--predictions", str(preds), "--result-json", str(out_json)]) == 0
    assert "mAP " in capsys.readouterr().out
    out = json.loads(out_json.read_text())
    assert set(out) == {"task_type", "mAP", "f1_micro", "f1_macro", "loss", "num_samples", "thresholds", "per_class"}
    assert out["task_type"] == "multi_label_classification"
    for key in ("mAP", "f1_micro", "f1_macro"):
        assert out[key] == pytest.approx(meta["metrics"][f"val/{key}"], abs=1e-6)
    assert out["loss"] == pytest.approx(meta["metrics"]["val/loss"], rel=1e-5)
    assert out["thresholds"] == meta["thresholds"]
    assert list(out["per_class"]) == meta["class_names"]
    for row in meta["per_class"]:
        got = out["per_class"][row["class"]]
        assert got["support"] == row["support"] and got["ap"] == pytest.approx(row["ap"], abs=1e-6)
    with open(preds, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == out["num_samples"] > 0
    assert list(rows[0]) == ["file", "labels", "predicted", *(f"score:{c}" for c in meta["class_names"])]
    from raytimm.data.manifest import read_manifest

    truth = {e[0]: set(e[1]) for e in read_manifest(ml_csv, multi_label=True)[0]}
    csv_dir = os.path.dirname(os.path.realpath(ml_csv))
    for r in rows:
        assert set(r["labels"].split(";")) == truth[f"{csv_dir}/{r['file']}"]
        scores = {c: float(r[f"score:{c}"]) for c in meta["class_names"]}
        expected = {c for c, t in zip(meta["class_names"], meta["thresholds"]) if scores[c] >= t}
        assert set(filter(None, r["predicted"].split(";"))) == expected


def test_evaluate_names_a_label_the_checkpoint_does_not_know(ml_run, tmp_path):
    from raytimm.data.manifest import write_manifest
    from raytimm.errors import DataError
    from raytimm.predict import evaluate_checkpoint

    result, _, _ = ml_run
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (32, 32), (i * 90, 10, 10)).save(tmp_path / f"{i}.png")
    csv_path = write_manifest(tmp_path / "labels.csv", [("0.png", ["zebra"], "val"), ("1.png", ["zebra"], "val")])
    with pytest.raises(DataError, match=r"not in checkpoint .*\['zebra'\]"):
        evaluate_checkpoint(result.best_checkpoint, str(csv_path), device="cpu")


def test_multi_label_resume_and_default_thresholds(ml_csv, tmp_path):
    first = fit(make_cfg(ml_csv, tmp_path, epochs=1))
    meta = ckpt.load_meta(first.best_checkpoint)
    assert meta["thresholds"] == [0.5, 0.5, 0.5]  # calibration off: 0.5 per label
    second = fit(make_cfg(ml_csv, tmp_path, epochs=2), resume_state_dir=first.best_checkpoint)
    assert [h["epoch"] for h in second.history] == [1, 2]


def test_multi_label_mixup_and_cutmix_train(ml_csv, tmp_path):
    result = fit(make_cfg(ml_csv, tmp_path, epochs=1, mixup=0.4, cutmix=1.0, label_smoothing=0.1))
    assert math.isfinite(result.history[0]["train/loss"]) and "val/mAP" in result.history[0]


@pytest.fixture(scope="module")
def imbalanced_root(tmp_path_factory):
    """A 3-class ImageFolder with 24:6:3 train images (val: 4 per class)."""
    import shutil
    from pathlib import Path

    from raytimm.data.demo import make_demo_dataset

    root = Path(make_demo_dataset(tmp_path_factory.mktemp("imb") / "data", classes=3, per_class=28, size=32,
                                  val_fraction=4 / 28))
    for cls, keep in zip(sorted(p.name for p in (root / "train").iterdir()), (24, 6, 3)):
        for extra in sorted((root / "train" / cls).iterdir())[keep:]:
            extra.unlink()
    return root


@pytest.mark.parametrize("balance", ["sampler", "loss"])
def test_single_label_balance_modes_train_and_report_balanced_accuracy(imbalanced_root, tmp_path, balance):
    result = fit(make_cfg(imbalanced_root, tmp_path, data={"balance": balance}, epochs=1, batch_size=6))
    h = result.history[0]
    assert set(h) == set(SINGLE_LABEL_KEYS)
    recalls = [r["top1"] for r in result.per_class if r["support"]]
    assert h["val/balanced_acc"] == pytest.approx(sum(recalls) / len(recalls))

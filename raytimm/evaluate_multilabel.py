"""``raytimm evaluate`` for a multi-label checkpoint: mAP, F1 at the thresholds, per-label rows, a CSV of
label sets and scores. No Ray here; ``predict.evaluate_checkpoint`` hands over when meta.json says
``multi_label``.

The data is what training reads in multi-label mode: a manifest CSV (local or in a bucket, staged with its
folder) or a DICE export (converted with ``multi_label`` into the same node cache). The split comes from the
checkpoint's ``config.data`` (split_ratio, split_seed), so ``val`` is training's val set; the numbers are
computed by ``metrics.multilabel_metrics``, the function training validation uses.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raytimm.errors import ConfigError, DataError
from raytimm.predict import evaluation_source, logit_batches

log = logging.getLogger(__name__)


def stage_multilabel_data(data_uri: str, cache_dir: str | None, data_cfg: dict) -> str:
    """Local manifest CSV for a manifest path/URI or a DICE export (converted multi-label into the cache)."""
    from raytimm import storage
    from raytimm.data.dice import MULTILABEL_MANIFEST, ensure_dice_converted
    from raytimm.data.loaders import manifest_folder, stage_dataset
    from raytimm.data.manifest import is_manifest
    from raytimm.model import DEFAULT_CACHE_DIR

    cache = os.path.expanduser(cache_dir or os.environ.get("RAYTIMM_CACHE_DIR") or DEFAULT_CACHE_DIR)
    if is_manifest(str(data_uri)):
        folder, name = manifest_folder(str(data_uri))
        return os.path.join(storage.normalize(stage_dataset(folder, cache)), name)
    root = storage.normalize(stage_dataset(str(data_uri), cache))
    if not os.path.isdir(os.path.join(root, "annotations")):
        raise DataError(f"{data_uri}: a multi-label checkpoint is evaluated on a manifest CSV (header file,labels) "
                        f"or a DICE export (annotations/ + images/)")
    converted = ensure_dice_converted(root, os.path.join(cache, "dice"),
                                      split_ratio=float(data_cfg.get("split_ratio", 0.8)),
                                      seed=int(data_cfg.get("split_seed", 42)), log=log.info, multi_label=True)
    return os.path.join(converted, MULTILABEL_MANIFEST)


def _label_map(dataset_classes: Sequence[str], checkpoint_classes: Sequence[str], data_uri: str, source: str):
    """Dataset label index -> checkpoint label index; a label the checkpoint does not know is a DataError.

    A dataset may lack some of the checkpoint's labels (a small test set): their rows get support 0."""
    index = {c: i for i, c in enumerate(checkpoint_classes)}
    unknown = [c for c in dataset_classes if c not in index]
    if unknown:
        raise DataError(f"labels of {data_uri} not in checkpoint {source}: {unknown[:10]} "
                        f"(the checkpoint has {list(checkpoint_classes)[:10]})")
    return [index[c] for c in dataset_classes]


def evaluate_multilabel_checkpoint(pred, data_uri: str, *, split: str = "val", batch_size: int = 64,
                                   predictions_csv: str | os.PathLike | None = None,
                                   cache_dir: str | None = None) -> dict:
    """{mAP, f1_micro, f1_macro, loss, num_samples, thresholds, per_class, ...} of a multi-label Predictor."""
    from raytimm.data.manifest import scan_manifest
    from raytimm.metrics import multilabel_metrics

    if split not in ("val", "train", "all"):
        raise ConfigError(f"split={split!r}: expected 'val', 'train' or 'all'")
    data_cfg = (pred.meta.get("config") or {}).get("data") or {}
    csv_path = stage_multilabel_data(str(data_uri), cache_dir, data_cfg)
    scan = scan_manifest(csv_path, multi_label=True, split_ratio=float(data_cfg.get("split_ratio", 0.8)),
                         seed=int(data_cfg.get("split_seed", 42)), verify=False, max_pixels=pred.max_pixels,
                         for_training=False)
    samples = {"val": scan.val, "train": scan.train, "all": list(scan.train) + list(scan.val)}[split]
    if not samples:
        raise DataError(f"{data_uri}: the {split!r} split has no images")
    to_ckpt = _label_map(scan.class_names, pred.class_names, str(data_uri), str(pred.source))
    root = os.path.dirname(os.path.realpath(csv_path))  # scan_manifest gives real paths
    thresholds = pred.label_thresholds()

    score_rows, target_rows, files, skipped = [], [], [], []
    loss_sum = 0.0
    for chunk, logits in logit_batches(pred, samples, root, batch_size, skipped):
        targets = torch.zeros_like(logits)
        for row, (_, labels) in enumerate(chunk):
            targets[row, [to_ckpt[j] for j in labels]] = 1.0
        # Unweighted BCE averaged over labels, as training's val/loss (metrics.MultiLabelScores).
        loss_sum += float(F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")) / pred.num_classes
        score_rows.append(pred.scores(logits).numpy())
        target_rows.append(targets.numpy())
        files.extend(os.path.relpath(p, root) for p, _ in chunk)

    if not files:
        raise DataError(f"{data_uri}: none of the {len(samples)} images of the {split!r} split could be read")
    if skipped:
        log.warning("evaluate: skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0]["file"])
    scores, targets = np.concatenate(score_rows), np.concatenate(target_rows)
    metrics = multilabel_metrics(scores, targets, thresholds, pred.class_names)
    if predictions_csv:
        write_multilabel_predictions(predictions_csv, files, targets, scores, thresholds, pred.class_names)
    return {
        "task_type": "multi_label_classification",
        "mAP": metrics["mAP"],
        "f1_micro": metrics["f1_micro"],
        "f1_macro": metrics["f1_macro"],
        "loss": loss_sum / len(files),
        "num_samples": len(files),
        "thresholds": metrics["thresholds"],
        # class -> {support, ap, precision, recall, f1 (percent), threshold}, like the per-class CSV of training
        "per_class": {r["class"]: {k: v for k, v in r.items() if k != "class"} for r in metrics["per_class"]},
        **evaluation_source(pred, split=split, predictions_csv=predictions_csv, skipped=skipped),
    }


def write_multilabel_predictions(path: str | os.PathLike, files: Sequence[str], targets, scores,
                                 thresholds: Sequence[float], class_names: Sequence[str]) -> str:
    """One row per image: file, its labels, the predicted label set (``;``-joined) and one score column per label."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    thr = np.asarray(thresholds, dtype=np.float64)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "labels", "predicted", *(f"score:{c}" for c in class_names)])
        for file, t, s in zip(files, targets, scores):
            writer.writerow([Path(file).as_posix(),
                             ";".join(c for c, on in zip(class_names, t) if on),
                             ";".join(c for c, v, th in zip(class_names, s, thr) if v >= th),
                             *(f"{float(v):.8f}" for v in s)])
    return str(path)

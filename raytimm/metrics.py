"""Metric names and the counting shared by training validation and `raytimm evaluate`.

Importing this module does not import torch (nor numpy): ``config.py`` (which must stay light, so
the CLI answers config errors instantly) takes its list of rankable metrics from here. torch is
imported by ``ClassificationSums`` / ``MultiLabelScores`` when one is built, and callers that build
one have torch loaded already.

Single-label validation is a set of sums (all-reduced across ranks). Multi-label validation needs
average precision, which is not a sum: the scores and targets are gathered from every rank and
the same numbers are computed on each (``MultiLabelScores``).
"""
from __future__ import annotations

from typing import Optional, Sequence

# What the engine reports every epoch (names and units: docs/internals.md "metrics.py").
SINGLE_LABEL_KEYS = ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "val/balanced_acc",
                     "lr", "throughput", "epoch")
MULTI_LABEL_KEYS = ("train/loss", "val/loss", "val/mAP", "val/f1_micro", "val/f1_macro", "lr", "throughput",
                    "epoch")
# Every metric name either mode reports (Tune keeps these columns of a trial's history).
METRIC_KEYS = tuple(dict.fromkeys(SINGLE_LABEL_KEYS + MULTI_LABEL_KEYS))
# The ones that can rank checkpoints (checkpoint.metric) and trials (tune.metric); validation first.
RANKING_METRICS = tuple(sorted((k for k in METRIC_KEYS if k.startswith(("train/", "val/"))),
                               key=lambda k: not k.startswith("val/")))
# A metric that only one mode reports; config validation refuses it in the other mode.
SINGLE_LABEL_ONLY = tuple(k for k in RANKING_METRICS if k not in MULTI_LABEL_KEYS)
MULTI_LABEL_ONLY = tuple(k for k in RANKING_METRICS if k not in SINGLE_LABEL_KEYS)
# checkpoint.metric / tune.metric default per mode.
DEFAULT_METRIC = {False: "val/top1", True: "val/mAP"}
# Thresholds a multi-label checkpoint uses unless train.calibrate_thresholds picks them on val.
DEFAULT_THRESHOLD = 0.5


def metric_keys(multi_label: bool) -> tuple[str, ...]:
    """The metric names fit reports each epoch in that mode."""
    return MULTI_LABEL_KEYS if multi_label else SINGLE_LABEL_KEYS


class ClassificationSums:
    """Loss / top-1 / top-5 / confusion-matrix sums over batches of logits, kept on ``device``.

    Adding a batch never reads a value back to the host, so there is no sync point per batch.
    Training validation (``engine.evaluate``) and ``raytimm evaluate`` (``predict.evaluate_checkpoint``)
    both count with it, so their numbers are the same definitions.
    """

    def __init__(self, num_classes: int, device):
        import torch

        self.num_classes = num_classes
        self.k = min(5, num_classes)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, n
        self.cm = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)

    def add(self, output, targets):
        """Count one batch of logits against integer labels; returns each row's top-1 class."""
        import torch
        import torch.nn.functional as F

        output = output.float()
        top = output.topk(self.k, dim=1).indices
        hits = top.eq(targets[:, None])
        self.sums[0] += F.cross_entropy(output, targets, reduction="sum").double()
        self.sums[1] += hits[:, 0].sum()
        self.sums[2] += hits.any(dim=1).sum()
        self.sums[3] += targets.numel()
        self.cm += torch.bincount(targets * self.num_classes + top[:, 0], minlength=self.num_classes ** 2)
        return top[:, 0]

    def all_reduce(self) -> None:
        """Sum across ranks (a no-op with one process)."""
        from raytimm import distributed as dist_utils

        dist_utils.all_reduce_sum(self.sums)
        dist_utils.all_reduce_sum(self.cm)

    def result(self) -> dict:
        """{loss, top1, top5, balanced_acc (percent), num_samples, confusion_matrix (rows = true class)}."""
        n = int(self.sums[3])
        denom = max(n, 1)
        cm = self.cm.view(self.num_classes, self.num_classes).cpu().tolist()
        return {"loss": float(self.sums[0]) / denom, "top1": 100.0 * float(self.sums[1]) / denom,
                "top5": 100.0 * float(self.sums[2]) / denom, "balanced_acc": balanced_accuracy(cm),
                "num_samples": n, "confusion_matrix": cm}


def balanced_accuracy(cm: Sequence[Sequence[float]]) -> float:
    """Mean per-class recall (percent) over the classes that have samples; 0.0 without any."""
    recalls = [row[i] / sum(row) for i, row in enumerate(cm) if sum(row)]
    return 100.0 * sum(recalls) / len(recalls) if recalls else 0.0


def per_class_accuracy(cm: Sequence[Sequence[float]], class_names: Sequence[str]) -> list[dict]:
    """[{class, support, correct, top1}] from a confusion matrix (rows = true class); top1 in percent,
    0.0 for a class without samples (results go into JSON, which has no NaN)."""
    out = []
    for i, (name, row) in enumerate(zip(class_names, cm)):
        support = int(sum(row))
        correct = int(row[i])
        out.append({"class": str(name), "support": support, "correct": correct,
                    "top1": 100.0 * correct / support if support else 0.0})
    return out


# ------------------------------------------------------------------ multi-label

class MultiLabelScores:
    """Sigmoid scores, multi-hot targets and the BCE loss sum of a val set, batch by batch.

    Average precision needs every score, so ``gather`` collects all ranks' scores and targets
    (the val set is small) and ``result`` computes the same numbers on every rank. Each rank's
    loader must hold a disjoint share of the set (UnpaddedDistributedSampler): then every val
    image counts once whatever the number of ranks. Adding a batch never reads back to the host.
    """

    def __init__(self, num_labels: int, device):
        import torch

        self.num_labels = num_labels
        self.device = device
        self._scores: list = []
        self._targets: list = []
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.scores = self.targets = None  # numpy arrays over all ranks once gathered

    def add(self, output, targets) -> None:
        """Count one batch of logits against multi-hot targets (N x labels, 0/1)."""
        import torch
        import torch.nn.functional as F

        output, targets = output.float(), targets.float()
        # Unweighted BCE averaged over labels, summed over images: val/loss is comparable across pos_weight settings.
        self.loss_sum += F.binary_cross_entropy_with_logits(output, targets, reduction="sum").double() / self.num_labels
        self._scores.append(torch.sigmoid(output))
        self._targets.append(targets.to(torch.uint8))

    def gather(self) -> None:
        """Collect every rank's scores, targets and loss (identical arrays on every rank afterwards)."""
        import numpy as np
        import torch

        from raytimm import distributed as dist_utils

        empty = torch.zeros((0, self.num_labels))
        scores = (torch.cat(self._scores) if self._scores else empty).cpu().numpy().astype(np.float32)
        targets = (torch.cat(self._targets) if self._targets else empty).cpu().numpy().astype(np.uint8)
        parts = dist_utils.all_gather_object((scores, targets, float(self.loss_sum)))
        self.scores = np.concatenate([p[0] for p in parts]).astype(np.float64)
        self.targets = np.concatenate([p[1] for p in parts]).astype(bool)
        self._loss = sum(p[2] for p in parts)

    def result(self, class_names: Sequence[str], *, thresholds: Optional[Sequence[float]] = None,
               calibrate: bool = False) -> dict:
        """{loss, mAP, f1_micro, f1_macro (percent), num_samples, thresholds, per_class}; gathers first if needed.

        ``calibrate``: each label's threshold is its F1-optimal one on these scores (``calibrate_thresholds``);
        else ``thresholds`` (default 0.5 per label).
        """
        if self.scores is None:
            self.gather()
        if calibrate:
            thresholds = calibrate_thresholds(self.scores, self.targets)
        elif thresholds is None:
            thresholds = [DEFAULT_THRESHOLD] * self.num_labels
        out = multilabel_metrics(self.scores, self.targets, thresholds, class_names)
        n = int(self.scores.shape[0])
        out.update(loss=self._loss / max(n, 1), num_samples=n)
        return out


def average_precision(scores, targets) -> Optional[float]:
    """Average precision of one label (scikit-learn's definition: the sum over score thresholds of
    precision times the recall gained); None when the label has no positives. Ties in the scores are
    one threshold, so the result does not depend on the order of the samples."""
    import numpy as np

    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=bool)
    positives = int(targets.sum())
    if positives == 0:
        return None
    tps, fps, _ = _cumulative_counts(scores, targets)
    precision = tps / (tps + fps)
    recall_gain = np.diff(np.concatenate([[0], tps])) / positives
    return float(np.sum(recall_gain * precision))


def _cumulative_counts(scores, targets):
    """(true positives, false positives, score) at each distinct score, highest first, predicting score >= it."""
    import numpy as np

    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # end of each run of equal scores
    tps = np.cumsum(t)[last_of_tie].astype(np.float64)
    fps = (last_of_tie + 1) - tps
    return tps, fps, s[last_of_tie]


def f1_optimal_threshold(scores, targets, default: float = DEFAULT_THRESHOLD) -> float:
    """The threshold (predict ``score >= threshold``) with the best F1 on these samples.

    The cut is placed half-way between the last score predicted positive and the next lower score,
    the middle of the interval where every threshold gives that F1; a tie between cuts goes to the
    higher threshold (fewer positives). A label without positives keeps ``default``.
    """
    import numpy as np

    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=bool)
    positives = int(targets.sum())
    if positives == 0:
        return float(default)
    tps, fps, cut_scores = _cumulative_counts(scores, targets)
    f1 = 2 * tps / (tps + fps + positives)
    best = int(np.argmax(f1))  # first maximum = highest threshold
    lower = cut_scores[best + 1] if best + 1 < cut_scores.size else 0.0
    return float((cut_scores[best] + lower) / 2)


def calibrate_thresholds(scores, targets, default: float = DEFAULT_THRESHOLD) -> list[float]:
    """Each label's F1-optimal threshold (``f1_optimal_threshold``) over N x labels scores and 0/1 targets."""
    return [f1_optimal_threshold(scores[:, j], targets[:, j], default) for j in range(scores.shape[1])]


def multilabel_metrics(scores, targets, thresholds: Sequence[float], class_names: Sequence[str]) -> dict:
    """mAP (macro over labels with a positive), micro/macro F1 at ``thresholds`` and a row per label.

    Percentages (0-100). Macro F1 also averages over labels with a positive, as mAP does; a label
    without positives gets AP 0.0 in its row (JSON has no NaN) and support 0 says why.
    """
    import numpy as np

    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets, dtype=bool)
    predicted = scores >= np.asarray(thresholds, dtype=np.float64)[None, :]
    tp = (predicted & targets).sum(axis=0)
    fp = (predicted & ~targets).sum(axis=0)
    fn = (~predicted & targets).sum(axis=0)
    rows, aps, f1s = [], [], []
    for j, name in enumerate(class_names):
        ap = average_precision(scores[:, j], targets[:, j])
        f1 = _ratio(2 * tp[j], 2 * tp[j] + fp[j] + fn[j])
        support = int(tp[j] + fn[j])
        if support:
            aps.append(ap)
            f1s.append(f1)
        rows.append({"class": str(name), "support": support, "ap": 100.0 * (ap or 0.0),
                     "precision": 100.0 * _ratio(tp[j], tp[j] + fp[j]), "recall": 100.0 * _ratio(tp[j], support),
                     "f1": 100.0 * f1, "threshold": float(thresholds[j])})
    return {"mAP": 100.0 * float(np.mean(aps)) if aps else 0.0,
            "f1_micro": 100.0 * _ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum()),
            "f1_macro": 100.0 * float(np.mean(f1s)) if f1s else 0.0,
            "thresholds": [float(t) for t in thresholds], "per_class": rows}


def _ratio(num, den) -> float:
    return float(num) / float(den) if den else 0.0

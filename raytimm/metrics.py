"""Metric names and the classification counting shared by training validation and `raytimm evaluate`.

Importing this module does not import torch: ``config.py`` (which must stay light, so the CLI
answers config errors instantly) takes its list of rankable metrics from here. torch is imported
by ``ClassificationSums`` when one is built, and callers that build one have torch loaded already.
"""
from __future__ import annotations

from typing import Sequence

# What the engine reports every epoch (names and units: docs/internals.md "metrics.py").
METRIC_KEYS = ("train/loss", "train/top1", "val/loss", "val/top1", "val/top5", "lr", "throughput", "epoch")
# The ones that can rank checkpoints (checkpoint.metric) and trials (tune.metric); validation first.
RANKING_METRICS = tuple(sorted((k for k in METRIC_KEYS if k.startswith(("train/", "val/"))),
                               key=lambda k: not k.startswith("val/")))


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
        """{loss, top1, top5 (percent), num_samples, confusion_matrix (rows = true class)}."""
        n = int(self.sums[3])
        denom = max(n, 1)
        return {"loss": float(self.sums[0]) / denom, "top1": 100.0 * float(self.sums[1]) / denom,
                "top5": 100.0 * float(self.sums[2]) / denom, "num_samples": n,
                "confusion_matrix": self.cm.view(self.num_classes, self.num_classes).cpu().tolist()}


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

"""The training loss for a task: cross-entropy (optionally class-weighted) or, multi-label, binary
cross-entropy with per-label positive weights; Mixup/CutMix from timm for both.

Weights are computed from the train split's labels, the same on every rank.
"""
from __future__ import annotations

from typing import Optional, Sequence

import timm.data
import timm.loss
import torch
from torch import nn


def class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """Inverse class frequency normalised to mean 1 over the classes (``data.balance: loss``)."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes).double()
    inverse = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return (inverse * num_classes / inverse.sum()).tolist()


# pos_weight=auto is clipped to this range: a label seen once in train would otherwise weigh thousands.
POS_WEIGHT_RANGE = (0.01, 100.0)


def auto_pos_weight(label_sets: Sequence[Sequence[int]], num_labels: int) -> list[float]:
    """negatives / positives per label over the train split, clipped to POS_WEIGHT_RANGE (``train.pos_weight: auto``)."""
    positives = torch.zeros(num_labels, dtype=torch.float64)
    for s in label_sets:
        positives[list(set(s))] += 1
    negatives = len(label_sets) - positives
    ratio = torch.where(positives > 0, negatives / positives.clamp(min=1), torch.full_like(positives, POS_WEIGHT_RANGE[1]))
    return ratio.clamp(*POS_WEIGHT_RANGE).tolist()


def build_losses(*, num_classes: int, label_smoothing: float, mixup: float, cutmix: float, mixup_prob: float,
                 multi_label: bool = False, pos_weight: Optional[list[float]] = None,
                 class_weight: Optional[list[float]] = None):
    """(train loss, mixup fn or None).

    Single-label: timm Mixup/CutMix with soft-target CE, else CE with smoothing (and ``class_weight``).
    Multi-label: timm's BinaryCrossEntropy on logits (``pos_weight`` per label); Mixup/CutMix mix the
    multi-hot targets (timm's ``multi_label`` mode), smoothing each label towards 0.5 as the loss does
    without mixing.
    """
    mixing = mixup > 0 or cutmix > 0
    mixup_fn = None
    if mixing:
        mixup_fn = timm.data.Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                   label_smoothing=label_smoothing, num_classes=num_classes, multi_label=multi_label)
    if multi_label:
        weight = torch.tensor(pos_weight, dtype=torch.float32) if pos_weight is not None else None
        # With mixing, the mixed targets are smoothed already (as timm's train.py does).
        return timm.loss.BinaryCrossEntropy(smoothing=0.0 if mixing else label_smoothing, pos_weight=weight,
                                            smooth_dense=True), mixup_fn
    if mixing:
        return timm.loss.SoftTargetCrossEntropy(), mixup_fn
    weight = torch.tensor(class_weight, dtype=torch.float32) if class_weight is not None else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing), None

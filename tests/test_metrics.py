"""metrics.py: the one list of metric names, per-class accuracy, and a torch-free import for config.py."""
import subprocess
import sys

import pytest
import torch

from raytimm.metrics import METRIC_KEYS, RANKING_METRICS, ClassificationSums, per_class_accuracy

# rows: true class, columns: predicted class
KNOWN_CM = [
    [2, 1, 0],
    [0, 3, 0],
    [1, 1, 0],
]


def test_per_class_accuracy_is_row_recall_in_percent():
    rows = per_class_accuracy(KNOWN_CM, ["cat", "dog", "bird"])
    assert [r["class"] for r in rows] == ["cat", "dog", "bird"]
    assert [r["support"] for r in rows] == [3, 3, 2] and [r["correct"] for r in rows] == [2, 3, 0]
    assert [r["top1"] for r in rows] == pytest.approx([200 / 3, 100.0, 0.0])
    # A class with no samples reports 0, not NaN (results go into JSON).
    assert [r["top1"] for r in per_class_accuracy([[0, 0], [1, 1]], ["a", "b"])] == [0.0, 50.0]


def test_classification_sums_count_top1_top5_loss_and_confusion():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    targets = torch.tensor([0, 2, 2, 1])
    sums = ClassificationSums(3, torch.device("cpu"))
    assert sums.add(logits, targets).tolist() == [0, 1, 2, 0]
    r = sums.result()
    assert r["num_samples"] == 4 and r["top1"] == 50.0 and r["top5"] == 100.0  # 3 classes: top-5 is top-3
    assert r["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item())
    assert r["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]


def test_one_list_of_names_and_config_uses_it():
    from raytimm.config import METRIC_NAMES

    assert set(RANKING_METRICS) == set(METRIC_KEYS) - {"lr", "throughput", "epoch"}
    assert METRIC_NAMES is RANKING_METRICS and RANKING_METRICS[0].startswith("val/")


def test_importing_names_and_config_leaves_torch_unimported():
    code = ("import sys, raytimm.metrics, raytimm.config; "
            "print(sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

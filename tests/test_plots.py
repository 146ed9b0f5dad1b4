"""Tests for raytimm.plots: PNGs are real images, the per-class CSV has exact values."""
import csv
import warnings

import numpy as np
import pytest
from PIL import Image

from raytimm import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# rows: true class, columns: predicted class
KNOWN_CM = [
    [2, 1, 0],
    [0, 3, 0],
    [1, 1, 0],
]


def assert_png(path, min_side=200):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert min(im.size) >= min_side
    return data


def test_per_class_csv_exact_values(tmp_path):
    out = plots.per_class_csv(np.array(KNOWN_CM), ["cat", "dog", "bird"], tmp_path / "sub" / "per_class.csv")
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows == [
        ["class", "support", "correct", "accuracy"],
        ["cat", "3", "2", "66.67"],
        ["dog", "3", "3", "100.00"],
        ["bird", "2", "0", "0.00"],
    ]


def test_per_class_csv_keeps_korean_names(tmp_path):
    out = plots.per_class_csv([[1, 0], [0, 1]], ["고양이", "개"], tmp_path / "pc.csv")
    with open(out, newline="", encoding="utf-8") as fh:
        assert [r[0] for r in csv.reader(fh)] == ["class", "고양이", "개"]


def test_mismatched_names_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="3 classes but 2 class names"):
        plots.confusion_matrix_png(KNOWN_CM, ["a", "b"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="square"):
        plots.per_class_csv([[1, 2, 3]], ["a"], tmp_path / "pc.csv")


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_png_small(tmp_path, normalize):
    out = plots.confusion_matrix_png(KNOWN_CM, ["cat", "dog", "bird"], tmp_path / "cm.png",
                                     title="val", normalize=normalize)
    assert_png(out)


def test_confusion_matrix_png_many_classes_grows(tmp_path):
    rng = np.random.default_rng(0)
    n = 100
    cm = rng.integers(0, 5, size=(n, n)) + 50 * np.eye(n, dtype=int)
    names = [f"class_{i:03d}_with_a_rather_long_name" for i in range(n)]
    small = plots.confusion_matrix_png(KNOWN_CM, ["a", "b", "c"], tmp_path / "small.png")
    big = plots.confusion_matrix_png(cm, names, tmp_path / "big.png")
    assert_png(big)
    with Image.open(small) as s, Image.open(big) as b:
        # 100 labels need a bigger canvas than 3 to stay legible.
        assert b.size[0] > 2 * s.size[0] and b.size[1] > 2 * s.size[1]


def test_korean_class_names_do_not_crash_or_warn(tmp_path):
    names = ["고양이", "개", "새"]
    with warnings.catch_warnings():
        # Missing-glyph warnings would be turned into errors here.
        warnings.simplefilter("error")
        out = plots.confusion_matrix_png(KNOWN_CM, names, tmp_path / "cm_ko.png", title="검증 결과")
    assert_png(out)


def test_curves_png(tmp_path):
    history = [
        {"epoch": e, "train/loss": 2.0 / e, "val/loss": 2.2 / e, "train/top1": 40.0 + 10 * e,
         "val/top1": 35.0 + 10 * e, "lr": 0.01}
        for e in range(1, 5)
    ]
    out = plots.curves_png(history, tmp_path / "curves.png")
    assert_png(out)


def test_curves_png_tolerates_missing_keys(tmp_path):
    # e.g. a run killed before the first validation: only train metrics exist.
    out = plots.curves_png([{"train/loss": 1.0}, {"train/loss": 0.5}], tmp_path / "c.png")
    assert_png(out)
    assert_png(plots.curves_png([], tmp_path / "empty.png"))


def test_per_label_csv_exact_values(tmp_path):
    rows = [{"class": "cat", "support": 3, "ap": 91.666666, "precision": 75.0, "recall": 100.0, "f1": 85.714285,
             "threshold": 0.25}, {"class": "실내", "support": 0, "ap": 0.0, "precision": 0.0, "recall": 0.0,
                                  "f1": 0.0, "threshold": 0.5}]
    path = plots.per_label_csv(rows, tmp_path / "pl.csv")
    with open(path, newline="", encoding="utf-8") as fh:
        got = list(csv.reader(fh))
    assert got == [["class", "support", "ap", "precision", "recall", "f1", "threshold"],
                   ["cat", "3", "91.67", "75.00", "100.00", "85.71", "0.250000"],
                   ["실내", "0", "0.00", "0.00", "0.00", "0.00", "0.500000"]]


def test_curves_png_multi_label(tmp_path):
    history = [{"epoch": e, "train/loss": 1.0 / e, "val/loss": 1.1 / e, "val/mAP": 50.0 + 10 * e,
                "val/f1_micro": 40.0 + 10 * e, "val/f1_macro": 30.0 + 10 * e} for e in range(1, 4)]
    assert_png(plots.curves_png(history, tmp_path / "ml.png"))

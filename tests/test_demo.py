"""Synthetic demo data: layout, determinism, DICE form, learnability."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raytimm.data.demo import MAX_CLASSES, demo_class_names, make_demo_dataset, make_demo_dice
from raytimm.data.dice import convert_dice
from raytimm.data.folder import ImageDataset, class_counts, scan_imagefolder
from raytimm.data.images import decode_image
from raytimm.data.transforms import build_eval_transform, build_train_transform
from raytimm.errors import ConfigError, DataError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_imagefolder_layout(tmp_path):
    root = Path(make_demo_dataset(tmp_path / "demo", classes=3, per_class=8, size=32, val_fraction=0.25))
    assert root == tmp_path / "demo"
    names = demo_class_names(3)
    assert (root / "classes.txt").read_text(encoding="utf-8").splitlines() == names
    scan = scan_imagefolder(root)
    assert scan.class_names == sorted(names) and scan.split_source == "val_dir"
    assert class_counts(scan.train, 3) == [6, 6, 6] and class_counts(scan.val, 3) == [2, 2, 2]
    assert scan.bad_files == []
    image = decode_image(scan.train[0][0])
    assert image.shape == (32, 32, 3)
    assert all(p.endswith(".png") for p, _ in scan.train)


def test_demo_is_deterministic_for_a_seed(tmp_path):
    a = _files(Path(make_demo_dataset(tmp_path / "a", classes=2, per_class=4, size=24)))
    b = _files(Path(make_demo_dataset(tmp_path / "b", classes=2, per_class=4, size=24)))
    c = _files(Path(make_demo_dataset(tmp_path / "c", classes=2, per_class=4, size=24, seed=1)))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_classes_differ_in_shape_and_colour(tmp_path):
    root = Path(make_demo_dataset(tmp_path / "demo", classes=MAX_CLASSES, per_class=2, size=48))
    names = demo_class_names(MAX_CLASSES)
    assert len(set(names)) == MAX_CLASSES
    assert len({n.split("_")[0] for n in names}) == MAX_CLASSES  # ten shapes
    assert len({n.split("_")[1] for n in names}) == MAX_CLASSES  # ten colours
    # The images of a class are not all alike: position and scale vary.
    first = [decode_image(p) for p in sorted(root.rglob(f"{names[0]}_*.png"))]
    assert len(first) == 2 and not np.array_equal(first[0], first[1])


def test_demo_arguments_and_rerun(tmp_path):
    with pytest.raises(ConfigError, match="between 1 and 10"):
        make_demo_dataset(tmp_path / "x", classes=11)
    with pytest.raises(ConfigError, match="per_class"):
        make_demo_dataset(tmp_path / "x", per_class=0)
    with pytest.raises(ConfigError, match="size"):
        make_demo_dataset(tmp_path / "x", size=4)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty"):
        make_demo_dataset(busy)
    assert (busy / "mine.txt").read_text() == "keep"
    root = Path(make_demo_dataset(tmp_path / "again", classes=3, per_class=2))
    make_demo_dataset(root, classes=2, per_class=2)  # a previous demo is replaced
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(demo_class_names(2))


def test_demo_dice_export_converts(tmp_path):
    root = Path(make_demo_dice(tmp_path / "dice", classes=3, per_class=5, size=32))
    annotations = sorted((root / "annotations").glob("*.json"))
    assert len(annotations) == 15 and len(list((root / "images").glob("*.png"))) == 15
    doc = json.loads(annotations[0].read_text(encoding="utf-8"))
    assert doc["shapes"][0]["label"] in demo_class_names(3)
    assert (root / "images" / doc["imagePath"]).is_file()
    x0, y0 = doc["shapes"][0]["points"][0]
    x1, y1 = doc["shapes"][0]["points"][1]
    assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
    summary = convert_dice(root, tmp_path / "out", log=lambda m: None)
    assert summary.classes == sorted(demo_class_names(3)) and summary.converted == 15
    assert summary.skipped_total == 0


def test_demo_dice_holds_the_same_pictures_as_the_imagefolder_demo(tmp_path):
    dice = Path(make_demo_dice(tmp_path / "dice", classes=2, per_class=3, size=24, seed=5))
    folder = Path(make_demo_dataset(tmp_path / "folder", classes=2, per_class=3, size=24, seed=5))
    in_dice = {p.name: p.read_bytes() for p in (dice / "images").glob("*.png")}
    in_folder = {p.name: p.read_bytes() for p in folder.rglob("*.png")}
    assert len(in_dice) == 6 and in_dice == in_folder


@pytest.mark.slow
def test_demo_is_learnable_by_a_tiny_cnn(tmp_path):
    torch.manual_seed(0)
    root = make_demo_dataset(tmp_path / "demo", classes=4, per_class=40, size=48)
    scan = scan_imagefolder(root)
    config = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
              "crop_pct": 0.95, "crop_mode": "center"}
    train = ImageDataset(scan.train, build_train_transform(config, rrc_scale=(0.6, 1.0), color_jitter=0, seed=0))
    val = ImageDataset(scan.val, build_eval_transform(config))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(32, 4),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True)
    for _ in range(8):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        x, y = next(iter(torch.utils.data.DataLoader(val, batch_size=len(val))))
        top1 = (model(x).argmax(1) == y).float().mean().item() * 100
    assert top1 >= 90

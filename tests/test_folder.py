"""ImageFolder scan: layout, split fallback, bad files, errors, report, dataset."""
from pathlib import Path

import numpy as np
import pytest
import torch

from raytimm.data.folder import (
    ImageDataset,
    ScanResult,
    class_counts,
    format_report,
    scan_imagefolder,
    stratified_split,
)
from raytimm.errors import ConfigError, DataError, ImageError
from tests import helpers_images as H

COLORS = {"cat": H.RED, "dog": H.BLUE, "emu": (0, 255, 0)}


def _make_tree(root: Path, counts: dict[str, int], split: str = "train", suffix: str = ".png") -> None:
    for name, n in counts.items():
        for i in range(n):
            H.write_solid(root / split / name / f"{name}_{i:03d}{suffix}", COLORS.get(name, (9, 9, 9)), (8, 8))


def test_train_and_val_folders(tmp_path):
    _make_tree(tmp_path, {"dog": 3, "cat": 4})
    _make_tree(tmp_path, {"dog": 1, "cat": 2}, split="val")
    scan = scan_imagefolder(tmp_path)
    assert scan.class_names == ["cat", "dog"]  # sorted
    assert scan.class_to_idx == {"cat": 0, "dog": 1}
    assert scan.split_source == "val_dir"
    assert class_counts(scan.train, 2) == [4, 3]
    assert class_counts(scan.val, 2) == [2, 1]
    assert all("/val/" in p for p, _ in scan.val)
    assert all(Path(p).parent.name == scan.class_names[label] for p, label in scan.train + scan.val)
    assert scan.bad_files == []


def test_split_fallback_is_deterministic_and_stratified(tmp_path):
    _make_tree(tmp_path, {"cat": 10, "dog": 5, "emu": 2})
    a = scan_imagefolder(tmp_path, split_ratio=0.8, seed=7)
    b = scan_imagefolder(tmp_path, split_ratio=0.8, seed=7)
    c = scan_imagefolder(tmp_path, split_ratio=0.8, seed=8)
    assert a.split_source == "split" and a.split_ratio == 0.8 and a.seed == 7
    assert (a.train, a.val) == (b.train, b.val)
    assert a.val != c.val  # the seed matters
    assert class_counts(a.val, 3) == [2, 1, 1]  # round(10*.2), round(5*.2), at least one for emu
    assert class_counts(a.train, 3) == [8, 4, 1]
    assert not set(a.train) & set(a.val)
    assert len(a.train) + len(a.val) == 17


def test_split_of_one_class_does_not_depend_on_other_classes(tmp_path):
    _make_tree(tmp_path, {"cat": 10, "dog": 5})
    before = scan_imagefolder(tmp_path, seed=1)
    _make_tree(tmp_path, {"emu": 4})
    after = scan_imagefolder(tmp_path, seed=1)
    cat_val = lambda scan: sorted(p for p, _ in scan.val if "/cat/" in p)  # noqa: E731
    assert cat_val(before) == cat_val(after)


def test_stratified_split_edge_cases():
    train, val = stratified_split({"a": [1], "b": [1, 2], "c": list(range(100))}, 0.99, seed=0)
    assert train["a"] == [1] and val["a"] == []  # single item -> train
    assert len(val["b"]) == 1 and len(train["b"]) == 1
    assert len(val["c"]) == 1
    train, val = stratified_split({"b": [1, 2, 3]}, 0.01, seed=0)
    assert len(train["b"]) == 1  # train keeps at least one
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(ConfigError, match="split_ratio"):
            stratified_split({"a": [1, 2]}, bad, seed=0)


def test_extensions_hidden_entries_and_nested_folders(tmp_path):
    cat = tmp_path / "train" / "cat"
    H.write_solid(cat / "a.PNG")
    H.write_solid(cat / "b.JpEg")
    H.write_solid(cat / "c.bmp")
    H.write_solid(cat / "d.webp")
    H.write_solid(cat / "e.tiff")
    H.write_solid(cat / "sub" / "f.tif")
    H.write_solid(cat / ".hidden.png")
    H.write_solid(cat / ".ipynb_checkpoints" / "g.png")
    H.write_solid(tmp_path / "train" / ".trash" / "h.png")
    (cat / "notes.txt").write_text("hello")
    (cat / "vector.svg").write_bytes(H.svg_bytes())
    scan = scan_imagefolder(tmp_path)
    assert scan.class_names == ["cat"]
    names = sorted(Path(p).name for p, _ in scan.train + scan.val)
    assert names == ["a.PNG", "b.JpEg", "c.bmp", "d.webp", "e.tiff", "f.tif"]
    assert scan.ignored_files == 2
    assert scan.bad_files == []


def test_bad_files_are_reported_and_left_out(tmp_path):
    _make_tree(tmp_path, {"cat": 3, "dog": 3})
    _make_tree(tmp_path, {"cat": 1, "dog": 1}, split="val")
    bad = {
        H.write_image(tmp_path / "train" / "cat" / "trunc.jpg", "truncated_jpeg"),
        H.write_image(tmp_path / "train" / "cat" / "trunc.png", "truncated_png"),
        H.write_image(tmp_path / "train" / "dog" / "text.jpg", "text"),
        H.write_image(tmp_path / "train" / "dog" / "bomb.png", "bomb_png"),
        H.write_image(tmp_path / "val" / "dog" / "noise.webp", "random_bytes"),
    }
    scan = scan_imagefolder(tmp_path)
    assert {Path(p) for p, _ in scan.bad_files} == bad
    reasons = dict(scan.bad_files)
    assert "truncated" in reasons[str(tmp_path / "train" / "cat" / "trunc.jpg")]
    # The PNG is caught by the cheaper chunk check, not a decode, yet reads like decode_image's error.
    assert reasons[str(tmp_path / "train" / "cat" / "trunc.png")].startswith("cannot decode image, file is truncated")
    assert reasons[str(tmp_path / "train" / "dog" / "text.jpg")] == "not a recognised image format"
    assert "exceeds the limit" in reasons[str(tmp_path / "train" / "dog" / "bomb.png")]
    kept = {Path(p) for p, _ in scan.train + scan.val}
    assert not kept & bad
    assert class_counts(scan.train, 2) == [3, 3] and class_counts(scan.val, 2) == [1, 1]

    report = format_report(scan)
    assert "unreadable files left out: 5" in report
    assert str(tmp_path / "train" / "cat" / "trunc.jpg") in report


def test_pixel_limit_applies_at_scan_time(tmp_path):
    _make_tree(tmp_path, {"cat": 2})
    H.write_solid(tmp_path / "train" / "cat" / "big.png", size=(50, 50))
    scan = scan_imagefolder(tmp_path, max_pixels=1000)
    assert [Path(p).name for p, _ in scan.bad_files] == ["big.png"]


def test_verify_false_skips_the_check(tmp_path):
    _make_tree(tmp_path, {"cat": 2})
    H.write_image(tmp_path / "train" / "cat" / "trunc.jpg", "truncated_jpeg")
    scan = scan_imagefolder(tmp_path, verify=False)
    assert scan.bad_files == []
    assert len(scan.train) + len(scan.val) == 3


def test_report_lists_classes_and_counts(tmp_path):
    _make_tree(tmp_path, {"cat": 5, "dog": 4})
    report = format_report(scan_imagefolder(tmp_path, split_ratio=0.75, seed=3))
    assert str(tmp_path) in report
    assert "train fraction 0.75, seed 3" in report
    assert "classes: 2   train: 7   val: 2" in report
    assert any(line.split()[:4] == ["0", "cat", "4", "1"] for line in report.splitlines())
    assert "unreadable files left out: 0" in report


def test_many_bad_files_are_summarised(tmp_path):
    _make_tree(tmp_path, {"cat": 2})
    for i in range(13):
        H.write_image(tmp_path / "train" / "cat" / f"bad{i:02d}.jpg", "text")
    report = format_report(scan_imagefolder(tmp_path))
    assert "unreadable files left out: 13" in report
    assert "... and 3 more" in report


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda r: None, "does not exist"),
        (lambda r: r.mkdir(), "no train/ folder"),
        (lambda r: (r / "train").mkdir(parents=True), "no class folders"),
        (lambda r: [(r / "train" / c).mkdir(parents=True) for c in ("a", "b")], "no images found"),
    ],
)
def test_layout_errors(tmp_path, setup, match):
    root = tmp_path / "ds"
    setup(root)
    with pytest.raises(DataError, match=match) as info:
        scan_imagefolder(root)
    assert str(root) in str(info.value)


def test_empty_class_is_an_error_naming_it(tmp_path):
    _make_tree(tmp_path, {"cat": 2})
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"train/dog: class 'dog' is empty"):
        scan_imagefolder(tmp_path)


def test_class_with_only_unreadable_images_is_an_error(tmp_path):
    _make_tree(tmp_path, {"cat": 2})
    H.write_image(tmp_path / "train" / "dog" / "x.jpg", "truncated_jpeg")
    with pytest.raises(DataError, match=r"class 'dog' is empty \(all 1 image\(s\) are unreadable\)"):
        scan_imagefolder(tmp_path)


def test_class_only_in_val_is_an_error(tmp_path):
    _make_tree(tmp_path, {"cat": 2})
    _make_tree(tmp_path, {"cat": 1, "emu": 1}, split="val")
    with pytest.raises(DataError, match="class 'emu' is in val/ but not in train/") as info:
        scan_imagefolder(tmp_path)
    assert str(tmp_path / "val" / "emu") in str(info.value)


def test_val_without_images_is_an_error(tmp_path):
    _make_tree(tmp_path, {"cat": 2})
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="remove val/"):
        scan_imagefolder(tmp_path)


def test_class_missing_from_val_is_allowed_and_reported(tmp_path):
    _make_tree(tmp_path, {"cat": 2, "dog": 2})
    _make_tree(tmp_path, {"cat": 1}, split="val")
    scan = scan_imagefolder(tmp_path)
    assert class_counts(scan.val, 2) == [1, 0]
    assert "(no val images)" in format_report(scan)


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


def test_image_dataset_returns_tensor_and_label(tmp_path):
    _make_tree(tmp_path, {"cat": 2, "dog": 2})
    scan = scan_imagefolder(tmp_path, split_ratio=0.5)
    ds = ImageDataset(scan.train, _to_tensor)
    assert len(ds) == 2 and ds.targets == [label for _, label in scan.train]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        expected = np.array(COLORS[scan.class_names[y]]) / 255.0
        assert np.allclose(x[:, 0, 0].numpy(), expected)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch[0].shape == (2, 3, 8, 8)


def test_image_dataset_survives_a_file_broken_after_the_scan(tmp_path, caplog):
    _make_tree(tmp_path, {"cat": 3})
    scan = scan_imagefolder(tmp_path, split_ratio=0.7)
    assert len(scan.train) == 2
    broken = scan.train[0][0]
    Path(broken).write_bytes(H.truncated_jpeg())
    x, y = ImageDataset(scan.train, _to_tensor)[0]
    assert x.shape == (3, 8, 8) and y == 0
    assert broken in caplog.text
    with pytest.raises(ImageError, match="truncated"):
        ImageDataset(scan.train, _to_tensor, on_error="raise")[0]


def test_scan_result_is_plain_data(tmp_path):
    _make_tree(tmp_path, {"cat": 2})
    scan = scan_imagefolder(tmp_path)
    assert isinstance(scan, ScanResult) and scan.num_classes == 1
    assert all(isinstance(p, str) and isinstance(label, int) for p, label in scan.train)


def test_jpeg_with_data_after_its_end_marker_is_not_bad(tmp_path):
    _make_tree(tmp_path, {"cat": 2})
    # Motion photos and some cameras append data after the JPEG's end-of-image marker.
    (tmp_path / "train" / "cat" / "trailer.jpg").write_bytes(H.rgb_jpeg() + b"MotionPhoto" * 100)
    scan = scan_imagefolder(tmp_path)
    assert scan.bad_files == []
    assert len(scan.train) + len(scan.val) == 3

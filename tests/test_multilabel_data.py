"""Multi-label data: iterative stratification, the manifest format (hostile rows too), DICE multi-label,
the multi-label demo set and dataset-report."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from raytimm.cli import main
from raytimm.data.demo import demo_class_names, make_demo_multilabel
from raytimm.data.dice import MULTILABEL_MANIFEST, convert_dice, ensure_dice_converted
from raytimm.data.folder import ImageDataset, format_report
from raytimm.data.manifest import scan_manifest
from raytimm.data.multilabel import cooccurrence, count_labels, iterative_split
from raytimm.errors import DataError
from tests import helpers_images as H


def _label_sets(n=600, seed=0):
    """Skewed label frequencies (about 60%..4%) and 1-3 labels per image."""
    rng = np.random.default_rng(seed)
    p = np.array([0.6, 0.4, 0.3, 0.2, 0.12, 0.08, 0.05, 0.04])
    sets = []
    for _ in range(n):
        s = [j for j in range(len(p)) if rng.random() < p[j]]
        sets.append(s or [int(rng.integers(len(p)))])
    return sets


# ------------------------------------------------------------------ iterative stratification

def test_iterative_split_keeps_each_labels_val_share_near_the_ratio_and_is_deterministic():
    sets = _label_sets()
    in_val = iterative_split(sets, 8, 0.8, seed=3)
    assert in_val == iterative_split(sets, 8, 0.8, seed=3)
    assert in_val != iterative_split(sets, 8, 0.8, seed=4)
    totals = count_labels(sets, 8)
    val = count_labels([s for s, v in zip(sets, in_val) if v], 8)
    for j in range(8):
        assert totals[j] >= 20
        assert abs(val[j] / totals[j] - 0.2) <= 0.03, (j, val[j], totals[j])
    assert abs(sum(in_val) / len(sets) - 0.2) <= 0.03
    # A random split of the same data misses rare labels' shares by more.
    rng = np.random.default_rng(0)
    naive = rng.random(len(sets)) < 0.2
    naive_val = count_labels([s for s, v in zip(sets, naive) if v], 8)
    assert max(abs(naive_val[j] / totals[j] - 0.2) for j in range(8)) > max(
        abs(val[j] / totals[j] - 0.2) for j in range(8))


def test_single_image_label_stays_in_train_with_a_warning_and_small_labels_get_a_val_image():
    sets = [[0], [0], [0], [0], [0, 1], [1], [2], [0]]  # label 2: one image; label 1: two images
    warnings = []
    in_val = iterative_split(sets, 3, 0.75, seed=0, warn=warnings.append, label_names=["a", "b", "c"])
    assert in_val[6] is False
    assert any("'c' has a single image" in w for w in warnings)
    assert sum(v for s, v in zip(sets, in_val) if 1 in s) == 1  # b: one of two in val, one in train


def test_counts_and_cooccurrence():
    sets = [[0, 1], [1], [0, 1, 2], [2]]
    assert count_labels(sets, 3) == [2, 3, 2]
    assert cooccurrence(sets, 3) == [[2, 2, 1], [2, 3, 1], [1, 1, 2]]


# ------------------------------------------------------------------ manifest

def _write_csv(path: Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _images(root: Path, names, color=H.RED):
    for name in names:
        H.write_solid(root / name, color, (8, 8))


def test_manifest_single_and_multi_label(tmp_path):
    _images(tmp_path, [f"img/{i}.png" for i in range(8)])
    csv = _write_csv(tmp_path / "labels.csv", ["file,labels"] + [f"img/{i}.png,{'cat' if i % 2 else 'dog'}"
                                                                  for i in range(8)])
    scan = scan_manifest(csv, multi_label=False, split_ratio=0.5, seed=1)
    assert scan.class_names == ["cat", "dog"] and not scan.multi_label
    assert sorted(y for _, y in scan.train) == [0, 0, 1, 1] and sorted(y for _, y in scan.val) == [0, 0, 1, 1]
    assert all(os.path.isabs(p) for p, _ in scan.train)

    multi = _write_csv(tmp_path / "multi.csv", ["file,labels,note", "img/0.png, cat ; indoor ;cat,x",
                                                "img/1.png,dog,y", "img/2.png,cat;dog", "img/3.png,indoor"])
    scan = scan_manifest(multi, multi_label=True, split_ratio=0.5, seed=0)
    assert scan.class_names == ["cat", "dog", "indoor"] and scan.multi_label
    labels = dict(scan.train + scan.val)
    assert labels[str(tmp_path / "img/0.png")] == (0, 2)  # a set: the duplicate collapses
    ds = ImageDataset(scan.train + scan.val, None, num_labels=3)
    _, target = ds[[p for p, _ in ds.samples].index(str(tmp_path / "img/2.png"))]
    assert target.tolist() == [1.0, 1.0, 0.0]
    assert "co-occurrence" in format_report(scan)
    with pytest.raises(DataError, match=r"multi\.csv line 2: img/0.png has 2 labels .*data.multi_label=true"):
        scan_manifest(multi, multi_label=False)


def test_manifest_split_column_is_used(tmp_path):
    _images(tmp_path, ["a.png", "b.png", "c.png"])
    csv = _write_csv(tmp_path / "m.csv", ["file,labels,split", "a.png,x,train", "b.png,x;y,val", "c.png,y,TRAIN"])
    scan = scan_manifest(csv, multi_label=True)
    assert scan.split_source == "manifest" and [Path(p).name for p, _ in scan.val] == ["b.png"]
    bad = _write_csv(tmp_path / "bad.csv", ["file,labels,split", "a.png,x,test"])
    with pytest.raises(DataError, match="line 2: split 'test' must be 'train' or 'val'"):
        scan_manifest(bad, multi_label=True)


def test_hostile_manifest_rows_are_refused_and_nothing_outside_is_read(tmp_path):
    root = tmp_path / "ds"
    outside = tmp_path / "outside"
    _images(outside, ["secret.png"])
    _images(root, ["ok1.png", "ok2.png", "ok3.png", "ok4.png", "sub/ok5.png"])
    os.symlink(outside / "secret.png", root / "evil.png")
    os.symlink(outside, root / "evildir")
    (root / "notes.txt").write_text("x")
    rows = ["file,labels", "ok1.png,a", "ok2.png,b", "ok3.png,a;b", "ok4.png,a", "sub\\ok5.png,b",
            "../outside/secret.png,a", "/etc/passwd,a", "sub/../../outside/secret.png,a", "C:\\x.png,a",
            "evil.png,a", "evildir/secret.png,a", "missing.png,a", "notes.txt,a", "ok1.png,b",
            "ok2.png,", "ok2.png,../x", "ok2.png,.hidden", "ok2.png,bad\x01ctl", ",a"]
    csv = _write_csv(root / "labels.csv", rows)
    scan = scan_manifest(csv, multi_label=True, split_ratio=0.6, seed=0)
    used = sorted(Path(p).name for p, _ in scan.train + scan.val)
    assert used == ["ok1.png", "ok2.png", "ok3.png", "ok4.png", "ok5.png"]
    assert all(str(outside) not in p for p, _ in scan.train + scan.val)
    reasons = " | ".join(f"{where}: {why}" for where, why in scan.bad_files)
    for expected in ("contains '..'", "is absolute", "resolves outside the manifest's folder", "does not exist",
                     "is not one of", "already listed on line 2", "no labels", "contains a path separator",
                     "starts with '.'", "control characters", "no file"):
        assert expected in reasons, expected
    assert len(scan.bad_files) == len(rows) - 1 - 5
    report = format_report(scan)
    assert "unreadable files left out: 14" in report


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_manifest(tmp_path / "none.csv", multi_label=True)
    with pytest.raises(DataError, match=r"lacks column\(s\) labels"):
        scan_manifest(_write_csv(tmp_path / "h.csv", ["file,label", "a.png,x"]), multi_label=True)
    (tmp_path / "bin.csv").write_bytes(b"file,labels\n\xff\xfe,x\n")
    with pytest.raises(DataError, match="bin.csv is not UTF-8"):
        scan_manifest(tmp_path / "bin.csv", multi_label=True)
    _images(tmp_path, ["a.png", "b.png"])
    with pytest.raises(DataError, match="labels collide"):
        scan_manifest(_write_csv(tmp_path / "c.csv", ["file,labels", "a.png,Cat", "b.png,cat"]), multi_label=True)
    with pytest.raises(DataError, match="no usable rows"):
        scan_manifest(_write_csv(tmp_path / "e.csv", ["file,labels", "zz.png,x"]), multi_label=True)


# ------------------------------------------------------------------ DICE multi-label

def _annotate(root: Path, stem: str, labels):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    H.write_solid(root / "images" / f"{stem}.png", H.RED, (8, 8))
    doc = {"imagePath": f"{stem}.png", "shapes": [{"label": label, "points": [[0, 0], [1, 1]]} for label in labels]}
    (root / "annotations" / f"{stem}.json").write_text(json.dumps(doc), encoding="utf-8")


def test_dice_multi_label_takes_every_shapes_label_and_checks_each(tmp_path):
    src = tmp_path / "dice"
    for i in range(6):
        _annotate(src, f"a{i}", ["cat", "indoor", "cat"] if i % 2 else ["dog"])
    _annotate(src, "evil", ["cat", "../escape"])
    _annotate(src, "semi", ["cat;dog"])
    _annotate(src, "hidden", ["dog", ".hidden"])
    logs = []
    summary = convert_dice(src, tmp_path / "out", split_ratio=0.5, multi_label=True, log=logs.append)
    out = tmp_path / "out"
    assert summary.classes == ["cat", "dog", "indoor"] and summary.skipped["bad_label"] == 3
    assert not (out / "train").exists() and (out / MULTILABEL_MANIFEST).is_file()
    scan = scan_manifest(out / MULTILABEL_MANIFEST, multi_label=True)
    assert scan.split_source == "manifest" and len(scan.train) + len(scan.val) == 6
    assert sorted(t for _, t in scan.train + scan.val) == [(0, 2)] * 3 + [(1,)] * 3
    assert all(Path(p).is_relative_to(out / "images") for p, _ in scan.train + scan.val)
    assert any("'../escape'" in line for line in logs) and any("';'" in line for line in logs)
    # Single-label mode keeps today's rule: the first shape's label.
    single = convert_dice(src, tmp_path / "single", split_ratio=0.5, log=lambda m: None)
    assert single.classes == ["cat", "cat;dog", "dog"] and single.skipped["bad_label"] == 0  # a folder name may hold ";"


def test_dice_cache_keeps_single_and_multi_label_conversions_apart(tmp_path):
    src = tmp_path / "dice"
    for i in range(4):
        _annotate(src, f"a{i}", ["x", "y"] if i % 2 else ["x"])
    single = ensure_dice_converted(src, tmp_path / "cache", split_ratio=0.5, log=lambda m: None)
    multi = ensure_dice_converted(src, tmp_path / "cache", split_ratio=0.5, log=lambda m: None, multi_label=True)
    assert single != multi and (Path(single) / "train").is_dir() and (Path(multi) / MULTILABEL_MANIFEST).is_file()
    assert ensure_dice_converted(src, tmp_path / "cache", split_ratio=0.5, log=lambda m: None, multi_label=True) == multi


# ------------------------------------------------------------------ demo and report

def test_multilabel_demo_is_deterministic_and_its_dice_form_converts_to_the_same_labels(tmp_path):
    csv = make_demo_multilabel(tmp_path / "a", classes=4, images=40, size=32, seed=1)
    again = make_demo_multilabel(tmp_path / "b", classes=4, images=40, size=32, seed=1)
    assert Path(csv).read_text() == Path(again).read_text()
    assert (Path(csv).parent / "images" / "img_00007.png").read_bytes() == \
        (Path(again).parent / "images" / "img_00007.png").read_bytes()
    scan = scan_manifest(csv, multi_label=True, split_ratio=0.75, seed=0)
    sizes = [len(t) for _, t in scan.train + scan.val]
    assert min(sizes) == 1 and max(sizes) == 3 and len(sizes) == 40
    assert scan.class_names == sorted(demo_class_names(4))
    dice = make_demo_multilabel(tmp_path / "d", classes=4, images=40, size=32, seed=1, format="dice")
    convert_dice(dice, tmp_path / "conv", multi_label=True, log=lambda m: None)
    from_dice = scan_manifest(tmp_path / "conv" / MULTILABEL_MANIFEST, multi_label=True)
    by_name = {Path(p).name: t for p, t in from_dice.train + from_dice.val}
    assert by_name == {Path(p).name: t for p, t in scan.train + scan.val}


def test_demo_data_cli_and_dataset_report(tmp_path, capsys):
    assert main(["demo-data", "--output", str(tmp_path / "ml"), "--multi-label", "--per-class", "10",
                 "--size", "32"]) == 0
    csv = tmp_path / "ml" / "labels.csv"
    assert csv.read_text().startswith("file,labels\n")
    capsys.readouterr()
    assert main(["dataset-report", "--data", str(csv), "--multi-label"]) == 0
    out = capsys.readouterr().out
    assert "labels: 4" in out and "(multi-label)" in out and "iterative stratification" in out
    assert "co-occurrence" in out and "val %" in out
    assert main(["demo-data", "--output", str(tmp_path / "x"), "--multi-label", "--format", "imagefolder"]) == 2
    assert "class folders cannot hold a set" in capsys.readouterr().err
    assert main(["dataset-report", "--data", str(tmp_path / "ml"), "--multi-label"]) == 2


def test_convert_dice_cli_multi_label(tmp_path):
    dice = make_demo_multilabel(tmp_path / "d", classes=3, images=12, size=32, format="dice")
    assert main(["convert", "dice", "--input", dice, "--output", str(tmp_path / "out"), "--multi-label"]) == 0
    scan = scan_manifest(tmp_path / "out" / MULTILABEL_MANIFEST, multi_label=True)
    assert len(scan.train) + len(scan.val) == 12 and max(len(t) for _, t in scan.train + scan.val) >= 2


@pytest.mark.s3
def test_a_manifest_in_a_bucket_is_staged_with_its_folder(s3_env, tmp_path):
    from raytimm import storage
    from raytimm.config import load_config
    from raytimm.data.loaders import prepare_dataset_root, scan_dataset
    from raytimm.errors import ConfigError
    from raytimm.ray_train import preflight

    csv = make_demo_multilabel(tmp_path / "ml", classes=3, images=20, size=32, seed=4)
    storage.upload(str(tmp_path / "ml"), s3_env.uri("datasets/ml"))
    storage.write_text(s3_env.uri("datasets/other/x.png"), "not part of the dataset")
    cfg = load_config(None, [f"data.path={s3_env.uri('datasets/ml/labels.csv')}", "data.format=manifest",
                             "data.multi_label=true", f"data.cache_dir={tmp_path / 'cache'}"])
    preflight(cfg)  # finds the images in the CSV's folder
    local = prepare_dataset_root(cfg)
    assert local.endswith("/labels.csv") and local.startswith(str(tmp_path / "cache"))
    assert not any("other" in p.parts for p in Path(tmp_path / "cache").rglob("*"))
    staged, original = scan_dataset(local, cfg), scan_manifest(csv, multi_label=True)
    assert sorted((Path(p).name, t) for p, t in staged.train) == sorted((Path(p).name, t) for p, t in original.train)
    with pytest.raises(ConfigError, match=r"data.path=.*must name a .csv file"):
        prepare_dataset_root(load_config(None, [f"data.path={s3_env.uri('datasets/ml')}", "data.format=manifest",
                                                f"data.cache_dir={tmp_path / 'cache'}"]))

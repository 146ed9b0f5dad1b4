"""DICE converter: hostile input, label/path safety, split strategies, output handling, cache."""
import hashlib
import json
import os
import threading
import unicodedata
from pathlib import Path

import pytest

from raytimm.data.dice import MANIFEST_NAME, _dest_name, convert_dice, ensure_dice_converted
from raytimm.data.folder import scan_imagefolder
from raytimm.errors import ConfigError, DataError
from tests import helpers_images as H

SECRET = b"outside images/ - must never be read"


def _annotate(root: Path, name: str, image_path=None, label=None, *, shapes=None, raw: bytes | None = None):
    """Write annotations/<name>.json: raw bytes, or a labelme doc from image_path/label/shapes."""
    path = root / "annotations" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        path.write_bytes(raw)
        return
    doc = {"version": "5.4.1", "flags": {}, "imageData": None}
    if image_path is not None:
        doc["imagePath"] = image_path
    doc["shapes"] = shapes if shapes is not None else [{"label": label, "points": [[0, 0], [4, 4]], "shape_type": "rectangle"}]
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def _image(root: Path, rel: str, color=H.RED) -> None:
    H.write_solid(root / "images" / rel, color, (8, 8))


def _labelled(root: Path, label: str, n: int, prefix: str | None = None, color=H.RED) -> list[str]:
    """n images with one label; returns their imagePaths."""
    prefix = prefix or label
    paths = []
    for i in range(n):
        rel = f"{prefix}_{i:02d}.png"
        _image(root, rel, color)
        _annotate(root, f"{prefix}_{i:02d}", rel, label)
        paths.append(rel)
    return paths


def _snapshot(folder: Path) -> set[str]:
    return {os.path.join(d, f) for d, dirs, files in os.walk(folder) for f in files + dirs}


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))


@pytest.fixture
def hostile(tmp_path):
    """A DICE export with good entries plus every hostile case, and a secret file outside images/."""
    root = tmp_path / "dice"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(SECRET)
    (root / "secret.png").parent.mkdir(parents=True)
    (root / "secret.png").write_bytes(SECRET)  # inside the export but outside images/

    _labelled(root, "cat", 3)
    _labelled(root, "dog", 2, color=H.BLUE)
    _labelled(root, "고양이", 2, prefix="goyangi")
    _labelled(root, "강아지", 1, prefix="gangaji")
    _image(root, "sub/nested.png")
    _annotate(root, "nested", "sub\\nested.png", "cat")  # Windows separators are normalised

    bad_labels = {"traversal": "../x", "slash": "a/b", "backslash": "a\\b", "nul": "bad\x00nul",
                  "empty": "", "blank": "   ", "dot": ".", "dotdot": "..", "hidden": ".hidden"}
    for name, label in bad_labels.items():
        _image(root, f"{name}.png")
        _annotate(root, f"label_{name}", f"{name}.png", label)

    _annotate(root, "abs", "/etc/passwd", "cat")
    _annotate(root, "abs_win", "C:\\data\\x.png", "cat")
    _annotate(root, "dotdot", "../secret.png", "cat")
    _annotate(root, "dotdot_nested", "sub/../../secret.png", "cat")
    os.symlink(outside / "secret.png", root / "images" / "evil.png")
    _annotate(root, "symlink", "evil.png", "cat")
    os.symlink(outside, root / "images" / "evildir")
    _annotate(root, "symlink_dir", "evildir/secret.png", "cat")
    os.symlink(outside / "secret.png", root / "annotations" / "linked.json")

    _annotate(root, "missing", "nope.png", "cat")
    _annotate(root, "invalid", raw=b"{not json")
    _annotate(root, "latin1", raw='{"imagePath": "caf\xe9.png", "shapes": []}'.encode("latin-1"))
    _image(root, "noshapes.png")
    _annotate(root, "no_shapes", "noshapes.png", shapes=[])
    _annotate(root, "no_shapes_key", raw=json.dumps({"imagePath": "noshapes.png"}).encode())
    _annotate(root, "no_label", "noshapes.png", shapes=[{"points": [[0, 0]]}])
    _annotate(root, "no_image_path", None, "cat")
    _annotate(root, "duplicate", "cat_00.png", "dog")
    (root / "images" / "vector.svg").write_bytes(H.svg_bytes())
    _annotate(root, "svg", "vector.svg", "cat")
    return root


def test_hostile_export_converts_only_safe_entries(hostile, tmp_path):
    before = _snapshot(tmp_path)
    lines: list[str] = []
    out = tmp_path / "out"
    summary = convert_dice(hostile, out, log=lines.append)

    assert summary.classes == ["cat", "dog", "강아지", "고양이"]
    assert summary.class_counts["cat"]["train"] + summary.class_counts["cat"]["val"] == 4
    assert summary.converted == 4 + 2 + 2 + 1
    assert summary.skipped == {
        "not_utf8": 1, "invalid_json": 1, "bad_annotation_path": 1, "no_image_path": 1,
        "bad_image_path": 6, "missing_image": 1, "unsupported_image": 1, "duplicate_image": 1,
        "no_shapes": 2, "no_label": 1, "bad_label": 9,
    }
    assert summary.annotations == summary.converted + summary.skipped_total
    # one warning line per skipped entry, each naming its annotation file
    warnings = [line for line in lines if line.startswith("warning: annotations/")]
    assert len(warnings) == summary.skipped_total
    assert all("\n" not in w for w in warnings)
    assert any("label_traversal.json" in w and "'../x'" in w and "path separator" in w for w in warnings)
    assert any("symlink.json" in w and "outside images/" in w for w in warnings)
    assert any("dotdot.json" in w and "'..'" in w for w in warnings)
    assert any("abs.json" in w and "absolute" in w for w in warnings)
    assert "skipped: 25 (" in summary.format() and lines[-1] == summary.format()  # the summary ends the run

    # Nothing was written outside the output folder, and nothing inside it points elsewhere.
    new = _snapshot(tmp_path) - before
    assert new and all(Path(p).is_relative_to(out) for p in new)
    real_out = os.path.realpath(out)
    for p in _snapshot(out):
        assert not os.path.islink(p)
        assert os.path.realpath(p).startswith(real_out + os.sep)
    # Nothing was read from outside images/: the secret's bytes appear in no output file.
    for p in _snapshot(out):
        if os.path.isfile(p):
            assert Path(p).read_bytes() != SECRET
    # The result is a valid ImageFolder with the same classes.
    scan = scan_imagefolder(out)
    assert scan.class_names == summary.classes and scan.bad_files == []
    assert (out / "classes.txt").read_text(encoding="utf-8").splitlines() == summary.classes


def test_manifest_records_split_class_and_hash(hostile, tmp_path):
    out = tmp_path / "out"
    convert_dice(hostile, out, log=lambda m: None)
    manifest = _manifest(out)
    assert manifest["format"] == "raytimm-dice-split"
    images = manifest["images"]
    assert "sub/nested.png" in images
    entry = images["cat_00.png"]
    assert entry["class"] == "cat" and entry["split"] in ("train", "val")
    assert entry["sha256"] == hashlib.sha256((hostile / "images" / "cat_00.png").read_bytes()).hexdigest()
    assert (out / entry["file"]).is_file()
    assert entry["file"].startswith(f"{entry['split']}/cat/")


def test_links_that_stay_inside_images_are_followed(tmp_path):
    root = tmp_path / "dice"
    _labelled(root, "cat", 2)
    os.symlink(root / "images" / "cat_00.png", root / "images" / "alias.png")
    os.symlink("cat_01.png", root / "images" / "relative_alias.png")
    _annotate(root, "alias", "alias.png", "cat")
    _annotate(root, "relative_alias", "relative_alias.png", "cat")
    summary = convert_dice(root, tmp_path / "out", log=lambda m: None)
    assert summary.converted == 4 and summary.skipped_total == 0
    assert not any(os.path.islink(p) for p in _snapshot(tmp_path / "out"))


def test_korean_labels_are_valid_and_written_nfc(tmp_path):
    root = tmp_path / "dice"
    nfd = unicodedata.normalize("NFD", "고양이")
    assert nfd != "고양이"
    _labelled(root, nfd, 2, prefix="a")
    _labelled(root, "강아지", 2, prefix="b")
    out = tmp_path / "out"
    summary = convert_dice(root, out, log=lambda m: None)
    assert summary.classes == sorted(["고양이", "강아지"])
    folders = sorted(os.listdir(out / "train"))
    assert folders == sorted(["고양이", "강아지"])
    assert all(unicodedata.is_normalized("NFC", f) for f in folders)
    assert scan_imagefolder(out).class_names == summary.classes


@pytest.mark.parametrize(
    "labels",
    [["Cat", "cat"], ["café", unicodedata.normalize("NFD", "café")], ["Straße", "STRASSE"]],
)
def test_colliding_labels_are_an_error_listing_them(tmp_path, labels):
    root = tmp_path / "dice"
    for i, label in enumerate(labels):
        _labelled(root, label, 2, prefix=f"c{i}")
    before = _snapshot(tmp_path)
    with pytest.raises(DataError, match="collide") as info:
        convert_dice(root, tmp_path / "out", log=lambda m: None)
    for label in labels:
        assert repr(label) in str(info.value)
    assert _snapshot(tmp_path) == before


def test_surrounding_whitespace_in_labels_is_ignored(tmp_path):
    root = tmp_path / "dice"
    _labelled(root, "dog", 2, prefix="a")
    _labelled(root, " dog\t", 2, prefix="b")
    summary = convert_dice(root, tmp_path / "out", log=lambda m: None)
    assert summary.classes == ["dog"] and summary.converted == 4


def test_not_a_dice_export_and_nothing_usable(tmp_path):
    with pytest.raises(DataError, match="images/ folder is missing"):
        convert_dice(tmp_path, tmp_path / "out")
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    _annotate(tmp_path, "x", raw=b"[]")
    with pytest.raises(DataError, match="no usable annotations"):
        convert_dice(tmp_path, tmp_path / "out", log=lambda m: None)


def test_cache_refuses_a_folder_that_is_not_a_dice_export(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="annotations/ folder is missing"):
        ensure_dice_converted(tmp_path, tmp_path / "cache", log=lambda m: None)
    assert not (tmp_path / "cache").exists()  # refused before any cache entry or lock is made


# ------------------------------------------------------------------------------------------------ splits


@pytest.fixture
def classes_10_5_2_1(tmp_path):
    root = tmp_path / "dice"
    for label, n in (("a", 10), ("b", 5), ("c", 2), ("d", 1)):
        _labelled(root, label, n)
    return root


def _splits(out: Path) -> dict[str, str]:
    return {k: v["split"] for k, v in _manifest(out)["images"].items()}


def _val_per_class(out: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in _manifest(out)["images"].values():
        counts[v["class"]] = counts.get(v["class"], 0) + (v["split"] == "val")
    return counts


@pytest.mark.parametrize("strategy", ["stratified", "random", "sequential"])
def test_strategies_are_deterministic_and_keep_class_rules(classes_10_5_2_1, tmp_path, strategy):
    lines: list[str] = []
    convert_dice(classes_10_5_2_1, tmp_path / "o1", strategy=strategy, seed=3, log=lines.append)
    convert_dice(classes_10_5_2_1, tmp_path / "o2", strategy=strategy, seed=3, log=lambda m: None)
    assert _splits(tmp_path / "o1") == _splits(tmp_path / "o2")
    val = _val_per_class(tmp_path / "o1")
    assert val["a"] >= 1 and val["b"] >= 1 and val["c"] >= 1
    assert val["d"] == 0 and _splits(tmp_path / "o1")["d_00.png"] == "train"
    assert any("'d' has a single image" in line for line in lines)
    # every class with >= 2 images also keeps a training image
    manifest = _manifest(tmp_path / "o1")["images"]
    for cls in "abc":
        assert any(v["class"] == cls and v["split"] == "train" for v in manifest.values())


def test_stratified_split_proportions_and_seed(classes_10_5_2_1, tmp_path):
    convert_dice(classes_10_5_2_1, tmp_path / "o1", seed=1, log=lambda m: None)
    assert _val_per_class(tmp_path / "o1") == {"a": 2, "b": 1, "c": 1, "d": 0}
    convert_dice(classes_10_5_2_1, tmp_path / "o2", seed=2, log=lambda m: None)
    assert _splits(tmp_path / "o1") != _splits(tmp_path / "o2")


def test_random_split_depends_on_seed(classes_10_5_2_1, tmp_path):
    results = []
    for seed in (1, 2, 3):
        out = tmp_path / f"o{seed}"
        convert_dice(classes_10_5_2_1, out, strategy="random", seed=seed, log=lambda m: None)
        results.append(_splits(out))
    assert len({tuple(sorted(r.items())) for r in results}) > 1


def test_sequential_takes_the_first_fraction_in_path_order(tmp_path):
    root = tmp_path / "dice"
    for i in range(10):
        label = "a" if i % 2 == 0 else "b"
        _image(root, f"img_{i:02d}.png")
        _annotate(root, f"img_{i:02d}", f"img_{i:02d}.png", label)
    convert_dice(root, tmp_path / "out", strategy="sequential", split_ratio=0.6, log=lambda m: None)
    splits = _splits(tmp_path / "out")
    assert [splits[f"img_{i:02d}.png"] for i in range(10)] == ["train"] * 6 + ["val"] * 4


def test_file_strategy(classes_10_5_2_1, tmp_path):
    split_file = tmp_path / "train.txt"
    listed = [f"a_{i:02d}.png" for i in range(8)] + ["b_00.png", "b_01.png", "c_00.png", "c_01.png", "d_00.png"]
    split_file.write_text("# training images\n" + "\n".join(listed) + "\n\nghost.png\n", encoding="utf-8")
    lines: list[str] = []
    convert_dice(classes_10_5_2_1, tmp_path / "out", strategy="file", split_file=split_file, log=lines.append)
    splits = _splits(tmp_path / "out")
    assert [k for k, v in splits.items() if v == "val"] == ["a_08.png", "a_09.png", "b_02.png", "b_03.png",
                                                            "b_04.png", "c_01.png"]
    assert any("class 'c' had no val image; moved images/c_01.png to val" in line for line in lines)
    assert any("1 path(s) in split file" in line and "ghost.png" in line for line in lines)


def test_split_argument_errors(classes_10_5_2_1, tmp_path):
    for ratio in (0, 1, 1.2, -0.1):
        with pytest.raises(ConfigError, match="split_ratio"):
            convert_dice(classes_10_5_2_1, tmp_path / "out", split_ratio=ratio)
    with pytest.raises(ConfigError, match="unknown split strategy 'alphabetical'"):
        convert_dice(classes_10_5_2_1, tmp_path / "out", strategy="alphabetical")
    with pytest.raises(ConfigError, match="split file"):
        convert_dice(classes_10_5_2_1, tmp_path / "out", strategy="file")
    with pytest.raises(DataError, match="nope.txt does not exist"):
        convert_dice(classes_10_5_2_1, tmp_path / "out", strategy="file", split_file=tmp_path / "nope.txt",
                     log=lambda m: None)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ output


def test_output_rules(classes_10_5_2_1, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty and is not a previous raytimm conversion"):
        convert_dice(classes_10_5_2_1, out, log=lambda m: None)
    assert (out / "precious.txt").read_text() == "keep me"

    (out / "precious.txt").unlink()
    convert_dice(classes_10_5_2_1, out, seed=1, log=lambda m: None)  # an empty folder is fine
    (out / "train" / "stale.png").write_bytes(b"old")
    convert_dice(classes_10_5_2_1, out, seed=2, log=lambda m: None)  # a previous conversion is replaced
    assert not (out / "train" / "stale.png").exists()
    assert _manifest(out)["seed"] == 2

    for bad_out in (classes_10_5_2_1, classes_10_5_2_1 / "images" / "out", classes_10_5_2_1 / "annotations", tmp_path):
        with pytest.raises(DataError, match="overlaps the input"):
            convert_dice(classes_10_5_2_1, bad_out, log=lambda m: None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        convert_dice(classes_10_5_2_1, tmp_path / "file", log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dice", "file", "out"]  # no temp folders left


def test_failed_conversion_leaves_nothing_half_written(classes_10_5_2_1, tmp_path):
    out = tmp_path / "out"
    convert_dice(classes_10_5_2_1, out, seed=1, log=lambda m: None)
    previous = _splits(out)

    def failing_log(message):
        if message.startswith("writing"):  # the temp folder exists at this point; the copy has not started
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        convert_dice(classes_10_5_2_1, out, seed=2, log=failing_log)
    assert _splits(out) == previous  # the previous conversion is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dice", "out"]  # and no temp folder is left


def test_link_makes_hard_links(classes_10_5_2_1, tmp_path):
    summary = convert_dice(classes_10_5_2_1, tmp_path / "out", link=True, log=lambda m: None)
    entry = _manifest(tmp_path / "out")["images"]["a_00.png"]
    assert os.stat(tmp_path / "out" / entry["file"]).st_ino == os.stat(classes_10_5_2_1 / "images" / "a_00.png").st_ino
    assert summary.linked == summary.converted
    copied = convert_dice(classes_10_5_2_1, tmp_path / "copy", log=lambda m: None)
    assert copied.linked == 0
    assert os.stat(tmp_path / "copy" / entry["file"]).st_nlink == 1


def test_hidden_and_nested_image_names_stay_visible_and_unique(tmp_path):
    root = tmp_path / "dice"
    for rel in (".dot.png", "x/a.png", "y/a.png", "x__a.png"):
        _image(root, rel)
        _annotate(root, "ann" + rel.replace("/", "_"), rel, "cat")
    convert_dice(root, tmp_path / "out", split_ratio=0.5, log=lambda m: None)
    files = [v["file"] for v in _manifest(tmp_path / "out")["images"].values()]
    assert len(set(files)) == 4 and not any(f.rsplit("/", 1)[1].startswith(".") for f in files)
    used: set[str] = set()
    assert [_dest_name(p, used) for p in ("x/a.png", "x__a.png", "X__A.png", ".b.png")] == [
        "x__a.png", "x__a-1.png", "X__A-2.png", "_.b.png"]
    scan = scan_imagefolder(tmp_path / "out")
    assert len(scan.train) + len(scan.val) == 4


# ------------------------------------------------------------------------------------------------- cache


def test_cache_converts_once_and_again_only_on_change(classes_10_5_2_1, tmp_path):
    cache = tmp_path / "cache"
    lines: list[str] = []
    first = ensure_dice_converted(classes_10_5_2_1, cache, log=lines.append)
    assert sum(line.startswith("converting") for line in lines) == 1
    assert scan_imagefolder(first).class_names == ["a", "b", "c", "d"]

    lines.clear()
    assert ensure_dice_converted(classes_10_5_2_1, cache, log=lines.append) == first
    assert lines == []  # cached: no conversion, no output

    _labelled(classes_10_5_2_1, "e", 2)  # the input changes
    second = ensure_dice_converted(classes_10_5_2_1, cache, log=lines.append)
    assert second != first and sum(line.startswith("converting") for line in lines) == 1
    assert scan_imagefolder(second).class_names == ["a", "b", "c", "d", "e"]

    ann = classes_10_5_2_1 / "annotations" / "a_00.json"
    os.utime(ann, ns=(ann.stat().st_atime_ns, ann.stat().st_mtime_ns + 10**9))  # an edit, same size
    assert ensure_dice_converted(classes_10_5_2_1, cache, log=lambda m: None) not in (first, second)
    # other split settings are another cache entry
    assert ensure_dice_converted(classes_10_5_2_1, cache, seed=7, log=lambda m: None) != second


def test_concurrent_callers_convert_once(classes_10_5_2_1, tmp_path):
    cache = tmp_path / "cache"
    lines: list[str] = []
    barrier = threading.Barrier(4)
    results: list[str] = []

    def worker():
        barrier.wait()
        results.append(ensure_dice_converted(classes_10_5_2_1, cache, log=lines.append))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert sum(line.startswith("converting") for line in lines) == 1
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [Path(results[0]).name]

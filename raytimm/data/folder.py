"""ImageFolder datasets: scan `<root>/train/<class>/*` (and `val/`), split, validate, report, load.

Unreadable files are found at scan time, reported with their paths and left out, so a run never
crashes on one bad JPEG half-way through an epoch.
"""
from __future__ import annotations

import logging
import os
import random
import sys
import unicodedata
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from raytimm.data.extensions import IMAGE_EXTENSIONS
from raytimm.data.images import DEFAULT_MAX_PIXELS, check_pixel_limit, decode_image, pillow_errors
from raytimm.errors import ConfigError, DataError, ImageError

log = logging.getLogger(__name__)

# Scans shorter than this don't get a progress bar at all.
_PROGRESS_MIN_FILES = 500
# How many bad paths the report lists before "... and N more".
_REPORT_MAX_BAD = 10

Sample = tuple[str, int]  # multi-label data: (path, (label indices...))
T = TypeVar("T")


@dataclass
class ScanResult:
    """What a scan found: classes, train/val samples, bad files and where the val split came from."""

    root: str
    class_names: list[str]
    class_to_idx: dict[str, int]
    train: list[Sample]
    val: list[Sample]
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    split_source: str = "val_dir"  # "val_dir" | "split" | "manifest" (its split column)
    split_ratio: float | None = None
    seed: int | None = None
    ignored_files: int = 0  # non-image files (wrong extension) that were skipped
    multi_label: bool = False  # samples carry a tuple of label indices (data/manifest.py)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def is_image_file(name: str) -> bool:
    """True when the file name has an accepted image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the non-hidden class folders directly under split_dir."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _is_hidden(e.name))


def list_images(class_dir: Path) -> tuple[list[str], int]:
    """Sorted image paths under class_dir (recursive, hidden entries skipped) and the count of ignored files."""
    images: list[str] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        # Pruning in place stops os.walk from descending into hidden folders (.git, .ipynb_checkpoints).
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in filenames:
            if _is_hidden(name):
                continue
            if is_image_file(name):
                images.append(os.path.join(dirpath, name))
            else:
                ignored += 1
    return sorted(images), ignored


def stratified_split(
    items_by_class: dict[Hashable, Sequence[T]], train_fraction: float, seed: int
) -> tuple[dict[Hashable, list[T]], dict[Hashable, list[T]]]:
    """Split each class's items into (train, val), deterministic for a seed.

    Every class with >= 2 items keeps at least one item in each side; a class with one item goes to
    train. Each class is shuffled by its own seeded RNG, so adding a class never reshuffles the others.
    """
    check_split_ratio(train_fraction)
    train: dict[Hashable, list[T]] = {}
    val: dict[Hashable, list[T]] = {}
    for key, items in items_by_class.items():
        order = list(items)
        random.Random(f"{seed}:{key}").shuffle(order)
        n_val = num_val(len(order), train_fraction)
        train[key], val[key] = order[: len(order) - n_val], order[len(order) - n_val :]
    return train, val


def num_val(n: int, train_fraction: float) -> int:
    """Validation count for a class of n items: rounded share, at least 1 and at most n-1 when n >= 2."""
    if n < 2:
        return 0
    return min(n - 1, max(1, round(n * (1.0 - train_fraction))))


def check_split_ratio(train_fraction: float) -> None:
    """Raise ConfigError unless 0 < train_fraction < 1."""
    if not isinstance(train_fraction, (int, float)) or not 0.0 < float(train_fraction) < 1.0:
        raise ConfigError(f"split_ratio (the train fraction) must be between 0 and 1 exclusive, got {train_fraction!r}")


def verify_image_file(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Cheaply check one image file; return None when it looks good, else a one-line reason.

    Opens the header (format + size + pixel limit) for every file. PNGs are then verified chunk by
    chunk (CRCs, missing data); JPEGs that end in their end-of-image marker are accepted, and anything
    else (a JPEG without that marker, BMP/WebP/TIFF) is fully decoded, the only sure way for those.
    """
    try:
        with pillow_errors(path):
            with Image.open(path) as im:
                check_pixel_limit(im.size, max_pixels, path)
                fmt = im.format
                if fmt == "PNG":
                    im.verify()
                    return None
            if fmt == "JPEG" and _ends_with_jpeg_eoi(path):
                return None
        decode_image(path, max_pixels=max_pixels)
        return None
    except ImageError as exc:
        return str(exc).removeprefix(f"{path}: ")


def _ends_with_jpeg_eoi(path: str) -> bool:
    """True when the file's last bytes hold the JPEG end-of-image marker (FFD9), allowing trailing padding."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 16))
        tail = fh.read()
    return tail.rstrip(b"\x00\n\r ").endswith(b"\xff\xd9")


def scan_imagefolder(
    root: str | os.PathLike,
    *,
    split_ratio: float = 0.8,
    seed: int = 42,
    verify: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ScanResult:
    """Scan an ImageFolder root into train/val samples, finding unreadable files (DataError on bad layout)."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"dataset folder {root_path} does not exist or is not a folder")
    train_dir, val_dir = root_path / "train", root_path / "val"
    if not train_dir.is_dir():
        raise DataError(
            f"{root_path}: no train/ folder; expected {root_path}/train/<class>/<image> (and optionally val/<class>/)"
        )
    class_names = list_class_dirs(train_dir)
    if not class_names:
        raise DataError(f"{train_dir}: no class folders; expected {train_dir}/<class>/<image>")
    class_to_idx = {name: i for i, name in enumerate(class_names)}

    train_files, ignored = _list_split(train_dir, class_names)
    has_val = val_dir.is_dir()
    val_files: dict[str, list[str]] = {}
    if has_val:
        val_classes = list_class_dirs(val_dir)
        extra = [c for c in val_classes if c not in class_to_idx]
        if extra:
            raise DataError(
                f"{val_dir / extra[0]}: class {extra[0]!r} is in val/ but not in train/ "
                f"({len(extra)} such class(es): {', '.join(map(repr, extra[:5]))})"
            )
        val_files, ignored_val = _list_split(val_dir, val_classes)
        ignored += ignored_val

    all_paths = [p for files in (*train_files.values(), *val_files.values()) for p in files]
    if not all_paths:
        raise DataError(f"{root_path}: no images found (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")
    bad_files = find_bad_files(all_paths, max_pixels) if verify else []
    bad = {p for p, _ in bad_files}
    train_files = {c: [p for p in ps if p not in bad] for c, ps in train_files.items()}
    val_files = {c: [p for p in ps if p not in bad] for c, ps in val_files.items()}

    for name in class_names:
        if not train_files[name]:
            n_bad = sum(1 for p in bad if Path(p).is_relative_to(train_dir / name))
            detail = f"all {n_bad} image(s) are unreadable" if n_bad else "it has no images"
            raise DataError(f"{train_dir / name}: class {name!r} is empty ({detail})")

    if has_val:
        if not any(val_files.values()):
            raise DataError(f"{val_dir}: no readable images; remove val/ to split train/ automatically")
        train = _samples(train_files, class_to_idx)
        val = _samples(val_files, class_to_idx)
        return ScanResult(str(root_path), class_names, class_to_idx, train, val, bad_files, "val_dir",
                          ignored_files=ignored)

    split_train, split_val = stratified_split(train_files, split_ratio, seed)
    return ScanResult(
        str(root_path), class_names, class_to_idx,
        _samples(split_train, class_to_idx), _samples(split_val, class_to_idx), bad_files, "split",
        split_ratio=float(split_ratio), seed=int(seed), ignored_files=ignored,
    )


def _list_split(split_dir: Path, class_names: list[str]) -> tuple[dict[str, list[str]], int]:
    files, ignored = {}, 0
    for name in class_names:
        files[name], n = list_images(split_dir / name)
        ignored += n
    return files, ignored


def _samples(files: dict, class_to_idx: dict[str, int]) -> list[Sample]:
    """Flatten {class: [path]} into sorted (path, label) pairs; sorting keeps the order reproducible."""
    return sorted((p, class_to_idx[c]) for c, ps in files.items() for p in ps)


def find_bad_files(paths: list[str], max_pixels: int | None) -> list[tuple[str, str]]:
    """(path, reason) of every unreadable image among paths, with a progress bar on long scans in a terminal."""
    from tqdm import tqdm

    show = len(paths) >= _PROGRESS_MIN_FILES and sys.stderr.isatty()
    bad = []
    for path in tqdm(paths, desc="checking images", unit="img", disable=not show):
        reason = verify_image_file(path, max_pixels)
        if reason is not None:
            bad.append((path, reason))
    if bad:
        log.warning("%d unreadable image(s) left out, e.g. %s: %s", len(bad), bad[0][0], bad[0][1])
    return bad


def display_width(text: str) -> int:
    """Terminal columns of text: East Asian wide characters (e.g. Korean class names) take two."""
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def pad(text: str, width: int) -> str:
    """Left-align text in `width` terminal columns."""
    return text + " " * max(0, width - display_width(text))


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Number of samples per class index (multi-label samples count once for each of their labels)."""
    counts = [0] * num_classes
    for _, label in samples:
        for c in (label if isinstance(label, tuple) else (label,)):
            counts[c] += 1
    return counts


def format_report(scan: ScanResult) -> str:
    """Human-readable dataset report: root, classes with train/val counts (multi-label: per-label counts
    and co-occurrence), unreadable files."""
    if scan.split_source == "split":
        what = "train/" if Path(scan.root).is_dir() else "the manifest"
        method = ", iterative stratification" if scan.multi_label else ""
        source = f"val split from {what} (train fraction {scan.split_ratio}, seed {scan.seed}{method})"
    elif scan.split_source == "manifest":
        source = "the manifest's split column"
    else:
        source = "val from val/"
    n = scan.num_classes
    lines = [
        f"dataset: {scan.root}",
        f"split: {source}",
        f"{'labels' if scan.multi_label else 'classes'}: {n}   train: {len(scan.train)}   val: {len(scan.val)}"
        + ("   (multi-label)" if scan.multi_label else ""),
    ]
    if scan.multi_label:
        from raytimm.data.multilabel import format_multilabel_report

        lines += format_multilabel_report(scan.class_names, [t for _, t in scan.train], [t for _, t in scan.val])
    else:
        train_counts, val_counts = class_counts(scan.train, n), class_counts(scan.val, n)
        width = max([len("class"), *(display_width(c) for c in scan.class_names)])
        lines.append(f"  {'idx':>4}  {'class':<{width}}  {'train':>6}  {'val':>6}")
        for i, name in enumerate(scan.class_names):
            note = "   (no val images)" if val_counts[i] == 0 else ""
            lines.append(f"  {i:>4}  {pad(name, width)}  {train_counts[i]:>6}  {val_counts[i]:>6}{note}")
    if scan.ignored_files:
        lines.append(f"non-image files ignored: {scan.ignored_files}")
    lines.append(f"unreadable files left out: {len(scan.bad_files)}")
    for path, reason in scan.bad_files[:_REPORT_MAX_BAD]:
        lines.append(f"  {path}: {reason}")
    if len(scan.bad_files) > _REPORT_MAX_BAD:
        lines.append(f"  ... and {len(scan.bad_files) - _REPORT_MAX_BAD} more")
    return "\n".join(lines)


class ImageDataset(Dataset):
    """Map-style dataset of (path, label) samples returning (transform(decoded RGB array), label).

    With ``num_labels`` (multi-label data) a sample's label is a tuple of indices and the target
    returned is a float multi-hot vector of that length.
    A file that became unreadable after the scan is logged and replaced by the next readable sample,
    so one bad file never kills a long run (on_error="raise" turns that off).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[np.ndarray], object] | None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        *,
        on_error: str = "substitute",
        num_labels: int | None = None,
    ):
        if on_error not in ("substitute", "raise"):
            raise ValueError(f"on_error must be 'substitute' or 'raise', got {on_error!r}")
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.max_pixels = max_pixels
        self.on_error = on_error
        self.num_labels = num_labels

    def _target(self, label):
        if self.num_labels is None:
            return label
        import torch

        hot = torch.zeros(self.num_labels, dtype=torch.float32)
        hot[list(label)] = 1.0
        return hot

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        tries = min(len(self.samples), 10)
        for attempt in range(tries):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = decode_image(path, max_pixels=self.max_pixels)
            except ImageError as exc:
                if self.on_error == "raise":
                    raise
                log.warning("skipping unreadable image %s", exc)
                continue
            return (self.transform(image) if self.transform is not None else image), self._target(label)
        raise DataError(
            f"could not read any of {tries} consecutive images from index {index}, e.g. {self.samples[index][0]}"
        )

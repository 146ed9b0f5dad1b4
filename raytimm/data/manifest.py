"""The manifest format: a CSV listing each image and its labels, for single- and multi-label data.

    file,labels[,split]
    images/0001.png,cat;indoor
    images/0002.png,dog

`file` is relative to the CSV's folder; `labels` are `;`-separated (a set: at least one, duplicates
collapse); an optional `split` column (`train` | `val`) fixes the split, else it is computed
(stratified per class, or iterative stratification for multi-label data). Other columns are ignored.
It is the internal format of multi-label data too: a multi-label DICE export is converted into
images plus a manifest (data/dice.py).

The CSV is untrusted like a DICE export: a `file` is refused when absolute, when it contains `..`,
or when it resolves (links included) outside the CSV's folder; labels get DICE's checks, plus no
`;`. Refused, missing and unreadable rows are left out with their reason, as the ImageFolder scan
does with unreadable images.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from raytimm.data.dice import clean_image_path, clean_label, inside, label_collisions
from raytimm.data.folder import (
    IMAGE_EXTENSIONS,
    ScanResult,
    find_bad_files,
    is_image_file,
    stratified_split,
)
from raytimm.data.images import DEFAULT_MAX_PIXELS
from raytimm.data.multilabel import iterative_split
from raytimm.errors import DataError

FILE_COLUMN, LABELS_COLUMN, SPLIT_COLUMN = "file", "labels", "split"
LABEL_SEPARATOR = ";"
SPLITS = ("train", "val")
_MAX_MANIFEST_BYTES = 256 * 1024 * 1024  # about 4M rows; beyond that the CSV is abuse, not data


def is_manifest(path: str | os.PathLike) -> bool:
    """True when the path names a CSV file (a manifest), not a dataset folder."""
    return str(path).lower().endswith(".csv")


def _read_rows(path: Path) -> tuple[list[dict], bool]:
    """The CSV's rows as dicts with a line number (`_line`), and whether it has a split column."""
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist or is not a file")
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise DataError(f"manifest {path} is larger than {_MAX_MANIFEST_BYTES // 2**20} MiB")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest {path} is not UTF-8 text (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"manifest {path} is empty; expected a header `file,labels`") from None
    except csv.Error as exc:
        raise DataError(f"manifest {path} line 1: not valid CSV ({exc})") from None
    missing = [c for c in (FILE_COLUMN, LABELS_COLUMN) if c not in header]
    if missing:
        raise DataError(f"manifest {path}: header {','.join(header)!r} lacks column(s) {', '.join(missing)}; "
                        f"expected `file,labels` (labels separated by {LABEL_SEPARATOR!r}, optional `split`)")
    col = {name: header.index(name) for name in (FILE_COLUMN, LABELS_COLUMN, SPLIT_COLUMN) if name in header}
    rows = []
    try:
        for values in reader:
            if not any(v.strip() for v in values):
                continue  # blank line
            row = {name: (values[i] if i < len(values) else "") for name, i in col.items()}
            row["_line"] = reader.line_num
            rows.append(row)
    except csv.Error as exc:
        raise DataError(f"manifest {path} line {reader.line_num}: not valid CSV ({exc})") from None
    return rows, SPLIT_COLUMN in col


def _check_labels(raw: str) -> tuple[list[tuple[str, str]], str | None]:
    """[(label as written, class name)] of a `labels` cell, or a reason to refuse the row."""
    out, seen = [], set()
    for part in raw.split(LABEL_SEPARATOR):
        if not part.strip():
            continue
        label, name, reason = clean_label(part)
        if reason is not None:
            return [], f"label {part!r} {reason.partition(':')[2] or 'is refused'}"
        if name not in seen:
            seen.add(name)
            out.append((label, name))
    if not out:
        return [], "no labels"
    return out, None


def read_manifest(path: str | os.PathLike, *, multi_label: bool):
    """Check a manifest; return (entries [(real path, [class names], split | None)], bad [(file, reason)], has_split).

    A row with several labels in single-label mode is an error (the data is multi-label: set
    data.multi_label), not a skipped row.
    """
    csv_path = Path(path)
    root = os.path.realpath(csv_path.parent)
    rows, has_split = _read_rows(csv_path)
    entries, bad, seen = [], [], {}
    labels_seen: set[str] = set()
    for row in rows:
        where = f"line {row['_line']}"
        rel, reason = clean_image_path(row[FILE_COLUMN])
        if reason is not None:
            bad.append((f"{csv_path}:{where} {row[FILE_COLUMN]!r}", reason.partition(":")[2] or "no file"))
            continue
        labels, reason = _check_labels(row[LABELS_COLUMN])
        if reason is not None:
            bad.append((f"{csv_path}:{where} {rel}", reason))
            continue
        if not multi_label and len(labels) > 1:
            raise DataError(f"manifest {csv_path} {where}: {rel} has {len(labels)} labels "
                            f"({', '.join(n for _, n in labels)}); set data.multi_label=true for multi-label data")
        split = None
        if has_split:
            split = row.get(SPLIT_COLUMN, "").strip().lower()
            if split not in SPLITS:
                raise DataError(f"manifest {csv_path} {where}: split {row.get(SPLIT_COLUMN)!r} must be 'train' or 'val'")
        source = os.path.realpath(os.path.join(root, rel))
        problem = None
        if not inside(source, root):
            problem = f"{rel!r} resolves outside the manifest's folder {root} (a link?)"
        elif not os.path.isfile(source):
            problem = "does not exist"
        elif not is_image_file(rel):
            problem = f"is not one of {', '.join(IMAGE_EXTENSIONS)}"
        elif rel in seen:
            problem = f"is already listed on line {seen[rel]}"
        if problem:
            bad.append((f"{csv_path}:{where} {rel}", problem))
            continue
        seen[rel] = row["_line"]
        labels_seen.update(label for label, _ in labels)
        entries.append((source, [name for _, name in labels], split))
    collisions = label_collisions(labels_seen)
    if collisions:
        shown = "; ".join(" vs ".join(repr(label) for label in group) for group in collisions)
        raise DataError(f"manifest {csv_path}: labels collide after Unicode NFC normalisation and case folding: {shown}")
    return entries, bad, has_split


def scan_manifest(path: str | os.PathLike, *, multi_label: bool, split_ratio: float = 0.8, seed: int = 42,
                  verify: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  for_training: bool = True) -> ScanResult:
    """A manifest as a ScanResult: samples (path, class index) or, multi-label, (path, (indices...)).

    ``for_training=False`` (evaluate): a label without train images is fine (a held-out test manifest may be all val).
    """
    csv_path = Path(path)
    entries, bad, has_split = read_manifest(csv_path, multi_label=multi_label)
    if verify and entries:
        unreadable = find_bad_files([e[0] for e in entries], max_pixels)
        bad += unreadable
        gone = {p for p, _ in unreadable}
        entries = [e for e in entries if e[0] not in gone]
    if not entries:
        raise DataError(f"manifest {csv_path}: no usable rows ({len(bad)} left out"
                        + (f", e.g. {bad[0][0]}: {bad[0][1]}" if bad else "") + ")")
    class_names = sorted({name for _, names, _ in entries for name in names})
    class_to_idx = {c: i for i, c in enumerate(class_names)}
    entries.sort(key=lambda e: e[0])
    targets = [tuple(sorted(class_to_idx[n] for n in names)) for _, names, _ in entries]
    if has_split:
        in_val = [split == "val" for _, _, split in entries]
    elif multi_label:
        in_val = iterative_split(targets, len(class_names), split_ratio, seed, label_names=class_names)
    else:
        by_class: dict[int, list[int]] = {}
        for i, t in enumerate(targets):
            by_class.setdefault(t[0], []).append(i)
        _, val = stratified_split(by_class, split_ratio, seed)
        val_idx = {i for idx in val.values() for i in idx}
        in_val = [i in val_idx for i in range(len(entries))]
    label = (lambda t: t) if multi_label else (lambda t: t[0])
    train = [(e[0], label(t)) for e, t, v in zip(entries, targets, in_val) if not v]
    val = [(e[0], label(t)) for e, t, v in zip(entries, targets, in_val) if v]
    if for_training:
        _check_train_covers(class_names, train, multi_label, csv_path)
    return ScanResult(str(csv_path), class_names, class_to_idx, train, val, bad,
                      "manifest" if has_split else "split", split_ratio=None if has_split else float(split_ratio),
                      seed=None if has_split else int(seed), multi_label=multi_label)


def _check_train_covers(class_names: Sequence[str], train: list, multi_label: bool, csv_path: Path) -> None:
    """Every class needs a train image (the model could never learn it otherwise)."""
    have = set()
    for _, t in train:
        have.update(t if multi_label else (t,))
    missing = [c for i, c in enumerate(class_names) if i not in have]
    if missing:
        raise DataError(f"manifest {csv_path}: {len(missing)} label(s) have no train image, e.g. {missing[0]!r} "
                        f"(check its split column)")


def write_manifest(path: str | os.PathLike, rows: Sequence[tuple[str, Sequence[str], str | None]]) -> str:
    """Write (file relative to the CSV's folder, labels, split or None) rows; a split column when any has one."""
    with_split = any(split for _, _, split in rows)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([FILE_COLUMN, LABELS_COLUMN] + ([SPLIT_COLUMN] if with_split else []))
        for file, labels, split in rows:
            writer.writerow([file, LABEL_SEPARATOR.join(labels)] + ([split or ""] if with_split else []))
    return str(path)

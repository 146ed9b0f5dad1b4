"""How a DICE conversion splits its entries into train and val (data/dice.py calls these).

Strategies: "stratified" (per class; iterative stratification for multi-label), "random", "sequential"
(sorted imagePaths) or "file" (the imagePaths listed in a split file). Then the per-class rules: a
single-image class goes to train, every other class keeps at least one image in train and in val.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

from raytimm.data.folder import stratified_split
from raytimm.errors import DataError

if TYPE_CHECKING:
    from raytimm.data.dice import Log, _Entry


def split_entries(
    by_class: dict[str, list[_Entry]],
    strategy: str,
    split_ratio: float,
    seed: int,
    split_file: str | os.PathLike | None,
    log: Log,
) -> dict[str, str]:
    """Assign each entry's image_path to "train" or "val" by strategy, then enforce the per-class rules."""
    ordered = {c: sorted(es, key=lambda e: e.image_path) for c, es in by_class.items()}
    everything = sorted((e for es in ordered.values() for e in es), key=lambda e: e.image_path)
    if strategy == "stratified":
        train, _ = stratified_split(ordered, split_ratio, seed)
        in_train = {e.image_path for es in train.values() for e in es}
    else:
        in_train = _plain_split(everything, strategy, split_ratio, seed, split_file, log)
    assignment = {e.image_path: ("train" if e.image_path in in_train else "val") for e in everything}
    _enforce_class_rules(ordered, assignment, log)
    return assignment


def _plain_split(everything: list[_Entry], strategy: str, split_ratio: float, seed: int,
                 split_file: str | os.PathLike | None, log: Log) -> set[str]:
    """The imagePaths that go to train by a strategy that ignores labels: random, sequential or file."""
    if strategy in ("random", "sequential"):
        everything = list(everything)
        if strategy == "random":
            random.Random(seed).shuffle(everything)
        return {e.image_path for e in everything[: round(len(everything) * split_ratio)]}
    return _read_split_file(split_file, {e.image_path for e in everything}, log)


def split_multilabel_entries(entries: list[_Entry], classes: list[str], strategy: str, split_ratio: float,
                             seed: int, split_file: str | os.PathLike | None, log: Log) -> dict[str, str]:
    """Multi-label split: "stratified" is iterative stratification; single-image labels stay in train."""
    from raytimm.data.multilabel import fix_small_labels, iterative_split

    everything = sorted(entries, key=lambda e: e.image_path)
    index = {c: i for i, c in enumerate(classes)}
    sets = [[index[c] for c in e.class_names] for e in everything]
    warn = lambda message: log(f"warning: {message}")  # noqa: E731
    if strategy == "stratified":
        in_val = iterative_split(sets, len(classes), split_ratio, seed, warn=warn, label_names=classes)
    else:
        in_train = _plain_split(everything, strategy, split_ratio, seed, split_file, log)
        in_val = [e.image_path not in in_train for e in everything]
        fix_small_labels(sets, in_val, len(classes), classes, warn)
    return {e.image_path: ("val" if v else "train") for e, v in zip(everything, in_val)}


def _read_split_file(split_file, known: set[str], log: Log) -> set[str]:
    """The imagePaths listed in a split file (one per line; blank lines and # comments ignored)."""
    from raytimm.data.dice import clean_image_path  # here, not at the top: dice.py imports this module

    path = Path(split_file)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"split file {path} does not exist") from None
    except UnicodeDecodeError:
        raise DataError(f"split file {path} is not UTF-8 text") from None
    listed = set()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        rel, _ = clean_image_path(line)
        listed.add(rel or line)
    unknown = sorted(listed - known)
    if unknown:
        log(f"warning: {len(unknown)} path(s) in split file {path} match no converted image, e.g. {unknown[0]!r}")
    return listed & known


def _enforce_class_rules(ordered: dict[str, list[_Entry]], assignment: dict[str, str], log: Log) -> None:
    """Single-image classes go to train; every other class keeps at least one image in train and in val."""
    for name in sorted(ordered):
        paths = [e.image_path for e in ordered[name]]
        if len(paths) == 1:
            assignment[paths[0]] = "train"
            log(f"warning: class {name!r} has a single image (images/{paths[0]}); it goes to train, none to val")
            continue
        for side, other in (("val", "train"), ("train", "val")):
            if not any(assignment[p] == side for p in paths):
                moved = [p for p in paths if assignment[p] == other][-1 if side == "val" else 0]
                assignment[moved] = side
                log(f"warning: class {name!r} had no {side} image; moved images/{moved} to {side}")

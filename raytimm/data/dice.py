"""DICE (labelme-style export) -> ImageFolder converter, and a cache so training can point at DICE directly.

Input: `<dir>/images/*` and `<dir>/annotations/*.json`, each JSON with `imagePath` (relative to
images/) and `shapes[].label`; an image's class is its first shape's label. In multi-label mode an
image's labels are the distinct labels of all its shapes, and the output is images/ plus a manifest
(data/manifest.py: `manifest.csv` with file, labels, split), since class folders cannot hold sets.

The input is untrusted: labels become folder names and imagePaths become reads, so both are checked
(no traversal, separators, NUL, hidden or empty names; nothing read outside images/, nothing written
outside the output folder). The output is built in a temporary sibling folder and renamed into place,
so a failed conversion never leaves a half-written dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from raytimm import cache
from raytimm.data.folder import (
    IMAGE_EXTENSIONS,
    check_split_ratio,
    display_width,
    is_image_file,
    pad,
    stratified_split,
)
from raytimm.errors import ConfigError, DataError

STRATEGIES = ("stratified", "random", "sequential", "file")
MANIFEST_NAME = "split.json"
MANIFEST_FORMAT = "raytimm-dice-split"
CONVERTER_VERSION = 1
MULTILABEL_MANIFEST = "manifest.csv"  # the multi-label output's image list (data/manifest.py format)

# Why each entry can be skipped, in the order the summary lists them.
SKIP_REASONS = {
    "not_utf8": "not UTF-8",
    "invalid_json": "invalid JSON",
    "bad_annotation_path": "annotation outside annotations/",
    "no_image_path": "no imagePath",
    "bad_image_path": "rejected imagePath",
    "missing_image": "missing image",
    "unsupported_image": "unsupported image type",
    "duplicate_image": "duplicate imagePath",
    "no_shapes": "no shapes",
    "no_label": "no label",
    "bad_label": "rejected label",
}

_MAX_ANNOTATION_BYTES = 64 * 1024 * 1024  # labelme JSON may embed the image as base64; beyond this it is abuse
_MAX_LABEL_BYTES = 200  # folder names are limited to 255 bytes on common filesystems
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")

Log = Callable[[str], object]


@dataclass
class ConvertSummary:
    """What a conversion did: counts per class and split, and why entries were skipped."""

    input_dir: str
    output_dir: str
    strategy: str
    split_ratio: float
    seed: int
    annotations: int = 0
    classes: list[str] = field(default_factory=list)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> {"train": n, "val": n}
    skipped: dict[str, int] = field(default_factory=lambda: {k: 0 for k in SKIP_REASONS})
    single_image_classes: list[str] = field(default_factory=list)
    linked: int = 0  # files placed as hard links rather than copies

    @property
    def train(self) -> int:
        """Images in train/."""
        return sum(c["train"] for c in self.class_counts.values())

    @property
    def val(self) -> int:
        """Images in val/."""
        return sum(c["val"] for c in self.class_counts.values())

    @property
    def converted(self) -> int:
        """Images written to the output."""
        return self.train + self.val

    @property
    def skipped_total(self) -> int:
        """Annotations skipped for any reason."""
        return sum(self.skipped.values())

    def format(self) -> str:
        """Multi-line human-readable summary."""
        lines = [
            f"converted {self.converted} of {self.annotations} annotation(s) from {self.input_dir} into "
            f"{self.output_dir} (strategy {self.strategy}, train fraction {self.split_ratio}, seed {self.seed})",
            f"classes: {len(self.classes)}   train: {self.train}   val: {self.val}",
        ]
        width = max([5, *(display_width(c) for c in self.classes)])
        for name in self.classes:
            counts = self.class_counts[name]
            lines.append(f"  {pad(name, width)}  train {counts['train']:>5}  val {counts['val']:>5}")
        details = ", ".join(f"{SKIP_REASONS[k]} {n}" for k, n in self.skipped.items() if n)
        lines.append(f"skipped: {self.skipped_total}" + (f" ({details})" if details else ""))
        if self.single_image_classes:
            lines.append(f"single-image classes (train only): {', '.join(self.single_image_classes)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Entry:
    image_path: str  # normalised relative POSIX path under images/, the manifest key
    source: str  # real path of the image, checked to be inside images/
    label: str  # the label as written (stripped), for collision messages
    class_name: str  # NFC-normalised label: the folder name
    annotation: str  # annotation file name, for messages
    labels: tuple[str, ...] = ()  # multi-label: every distinct label as written
    class_names: tuple[str, ...] = ()  # multi-label: their NFC names, sorted


# ---------------------------------------------------------------------------------------------- checks


def clean_label(raw: object) -> tuple[str | None, str | None, str | None]:
    """Check a label; return (label, folder name, None) or (None, None, skip reason key + message)."""
    if raw is None or not isinstance(raw, str):
        return None, None, "no_label"
    label = raw.strip()
    name = unicodedata.normalize("NFC", label)
    problem = None
    if not name:
        problem = "is empty or whitespace"
    elif "\x00" in name:
        problem = "contains a NUL character"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif name in (".", ".."):
        problem = "is '.' or '..'"
    elif name.startswith("."):
        problem = "starts with '.' (it would be a hidden folder)"
    elif any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        problem = "contains control characters"
    elif len(name.encode("utf-8")) > _MAX_LABEL_BYTES:
        problem = f"is longer than {_MAX_LABEL_BYTES} bytes"
    if problem:
        return None, None, f"bad_label:{problem}"
    return label, name, None


def clean_image_path(raw: object) -> tuple[str | None, str | None]:
    """Normalise an imagePath to a relative POSIX path under images/; return (path, None) or (None, reason)."""
    if not isinstance(raw, str) or not raw.strip():
        return None, "no_image_path"
    if "\x00" in raw:
        return None, "bad_image_path:contains a NUL character"
    path = raw.strip().replace("\\", "/")  # labelme on Windows writes backslashes
    if path.startswith("/") or _WINDOWS_DRIVE.match(path):
        return None, "bad_image_path:is absolute"
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "bad_image_path:contains '..'"
    if not parts:
        return None, "no_image_path"
    return "/".join(parts), None


def inside(path: str, folder: str) -> bool:
    """True when the real path `path` lies inside the real folder `folder`."""
    return os.path.commonpath([path, folder]) == folder and path != folder


def label_collisions(labels: set[str]) -> list[list[str]]:
    """Groups of distinct labels that become the same folder after NFC normalisation and case folding."""
    groups: dict[str, set[str]] = {}
    for label in labels:
        key = unicodedata.normalize("NFC", unicodedata.normalize("NFC", label).casefold())
        groups.setdefault(key, set()).add(label)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


# ----------------------------------------------------------------------------------------- reading


def read_annotations(input_dir: Path, log: Log, multi_label: bool = False) -> tuple[list[_Entry], dict[str, int], int]:
    """Read and check every annotation; return (entries, skip counts, annotation count)."""
    ann_dir, images_dir = input_dir / "annotations", input_dir / "images"
    ann_real, images_real = os.path.realpath(ann_dir), os.path.realpath(images_dir)
    files = sorted(
        e.name for e in os.scandir(ann_dir)
        if not e.name.startswith(".") and e.name.lower().endswith(".json") and not e.is_dir()
    )
    skipped = {k: 0 for k in SKIP_REASONS}
    entries: list[_Entry] = []
    seen: dict[str, str] = {}
    for fname in files:
        entry, reason = _read_one(ann_dir / fname, ann_real, images_dir, images_real, seen, multi_label)
        if reason is not None:
            key, _, detail = reason.partition(":")
            skipped[key] += 1
            log(f"warning: annotations/{fname}: skipped, {detail or SKIP_REASONS[key]}")
            continue
        seen[entry.image_path] = fname
        entries.append(entry)
    return entries, skipped, len(files)


def _read_one(path: Path, ann_real: str, images_dir: Path, images_real: str, seen: dict[str, str],
              multi_label: bool = False):
    """Check one annotation file; return (entry, None) or (None, "reason_key[:detail]")."""
    if not inside(os.path.realpath(path), ann_real):
        return None, "bad_annotation_path:the file is a link pointing outside annotations/"
    if path.stat().st_size > _MAX_ANNOTATION_BYTES:
        return None, f"invalid_json:larger than {_MAX_ANNOTATION_BYTES // 2**20} MiB"
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"not_utf8:not UTF-8 text (byte {exc.start})"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"invalid_json:invalid JSON ({exc.msg} at line {exc.lineno})"
    if not isinstance(doc, dict):
        return None, "invalid_json:invalid JSON (not an object)"

    rel, reason = clean_image_path(doc.get("imagePath"))
    if reason is not None:
        return None, _with_value(reason, "imagePath", doc.get("imagePath"))
    shapes = doc.get("shapes")
    if not isinstance(shapes, list) or not shapes:
        return None, "no_shapes"
    labels: dict[str, str] = {}  # class name -> label as written, every shape in multi-label mode
    for shape in shapes if multi_label else shapes[:1]:
        raw = shape.get("label") if isinstance(shape, dict) else None
        label, class_name, reason = clean_label(raw)
        if reason is None and multi_label and ";" in class_name:
            reason = "bad_label:contains ';' (the manifest's label separator)"
        if reason is not None:
            return None, _with_value(reason, "label", raw)
        labels.setdefault(class_name, label)
    class_name, label = next(iter(labels.items()))

    source = os.path.realpath(images_dir / rel)
    if not inside(source, images_real):
        return None, f"bad_image_path:imagePath {rel!r} resolves outside images/ (a link?)"
    if not os.path.isfile(source):
        return None, f"missing_image:image images/{rel} does not exist"
    if not is_image_file(rel):
        return None, f"unsupported_image:images/{rel} is not one of {', '.join(IMAGE_EXTENSIONS)}"
    if rel in seen:
        return None, f"duplicate_image:images/{rel} is already labelled by annotations/{seen[rel]}"
    names = tuple(sorted(labels)) if multi_label else ()
    return _Entry(rel, source, label, class_name, path.name, tuple(labels[n] for n in names), names), None


def _with_value(reason: str, field_name: str, value: object) -> str:
    """Name the offending value (repr, shortened) in a skip reason that has a detail."""
    key, _, detail = reason.partition(":")
    if not detail:
        return reason
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return f"{key}:{field_name} {shown} {detail}"


# ----------------------------------------------------------------------------------------- splitting


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


# ------------------------------------------------------------------------------------------- writing


def _check_dice_layout(input_path: Path) -> None:
    """DataError naming the missing folder unless input_path holds images/ and annotations/."""
    for sub in ("images", "annotations"):
        if not (input_path / sub).is_dir():
            raise DataError(f"{input_path}: not a DICE export, {sub}/ folder is missing (expected images/ and annotations/)")


def _check_output(output: Path, input_dir: Path) -> None:
    """Refuse an output that overlaps the input, is a file, or is a non-empty folder we did not write."""
    out_real, in_real = os.path.realpath(output), os.path.realpath(input_dir)
    # Replacing an output that holds the input would delete it; writing into images/ or annotations/
    # would feed the output back into the next conversion.
    sources = [os.path.realpath(input_dir / sub) for sub in ("images", "annotations")]
    if out_real == in_real or inside(in_real, out_real) or any(
        out_real == s or inside(out_real, s) for s in sources
    ):
        raise DataError(
            f"output folder {output} overlaps the input {input_dir}; choose a folder outside its images/ and annotations/"
        )
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise DataError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not _is_previous_conversion(output):
        raise DataError(
            f"output folder {output} is not empty and is not a previous raytimm conversion (no {MANIFEST_NAME}); "
            "choose a new or empty folder"
        )


def _is_previous_conversion(folder: Path) -> bool:
    try:
        doc = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT


def _dest_name(image_path: str, used: set[str]) -> str:
    """A file name for image_path inside its class folder: flattened, visible, unique (case-insensitively)."""
    name = image_path.replace("/", "__")
    if name.startswith("."):
        name = "_" + name  # a hidden file would be skipped by the ImageFolder scan
    stem, dot, ext = name.rpartition(".")
    candidate, n = name, 1
    while candidate.lower() in used:
        candidate = f"{stem}-{n}{dot}{ext}"
        n += 1
    used.add(candidate.lower())
    return candidate


def _place(source: str, dest: Path, link: bool) -> bool:
    """Hard-link (when asked and possible) or copy source to dest; True when linked."""
    if link:
        try:
            os.link(source, dest)
            return True
        except OSError:
            pass  # other device (EXDEV), filesystem without hard links, link limit: copy instead
    shutil.copyfile(source, dest)
    shutil.copystat(source, dest)
    return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_tree(tmp: Path, entries: list[_Entry], assignment: dict[str, str], classes: list[str],
                link: bool, manifest: dict) -> int:
    """Write train/ and val/ class folders, classes.txt and the manifest into tmp; return the link count."""
    used: dict[tuple[str, str], set[str]] = {}
    images, linked = {}, 0
    for entry in sorted(entries, key=lambda e: e.image_path):
        split = assignment[entry.image_path]
        folder = tmp / split / entry.class_name
        folder.mkdir(parents=True, exist_ok=True)
        name = _dest_name(entry.image_path, used.setdefault((split, entry.class_name), set()))
        linked += _place(entry.source, folder / name, link)
        images[entry.image_path] = {
            "split": split,
            "class": entry.class_name,
            "sha256": _sha256(folder / name),
            "file": f"{split}/{entry.class_name}/{name}",
            "annotation": entry.annotation,
        }
    (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    manifest = {**manifest, "images": images}
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=True) + "\n",
                                     encoding="utf-8")
    return linked


def _write_multilabel_tree(tmp: Path, entries: list[_Entry], assignment: dict[str, str], classes: list[str],
                           link: bool, manifest: dict) -> int:
    """Write images/, manifest.csv (file, labels, split), classes.txt and split.json into tmp; return the link count."""
    from raytimm.data.manifest import write_manifest

    (tmp / "images").mkdir()
    used: set[str] = set()
    images, rows, linked = {}, [], 0
    for entry in sorted(entries, key=lambda e: e.image_path):
        split = assignment[entry.image_path]
        name = _dest_name(entry.image_path, used)
        linked += _place(entry.source, tmp / "images" / name, link)
        rows.append((f"images/{name}", list(entry.class_names), split))
        images[entry.image_path] = {"split": split, "labels": list(entry.class_names),
                                    "sha256": _sha256(tmp / "images" / name), "file": f"images/{name}",
                                    "annotation": entry.annotation}
    write_manifest(tmp / MULTILABEL_MANIFEST, rows)
    (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    manifest = {**manifest, "images": images}
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=True) + "\n",
                                     encoding="utf-8")
    return linked


def _swap_into_place(tmp: Path, output: Path) -> None:
    """Rename tmp to output; an existing output (empty or a previous conversion) is replaced."""
    if not output.exists():
        os.rename(tmp, output)
        return
    old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ entry points


def convert_dice(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    split_ratio: float = 0.8,
    strategy: str = "stratified",
    split_file: str | os.PathLike | None = None,
    seed: int = 42,
    link: bool = False,
    log: Log = print,
    multi_label: bool = False,
) -> ConvertSummary:
    """Convert a DICE export into an ImageFolder (train/, val/, classes.txt, split.json) at output_dir.

    ``multi_label``: every shape's label counts; the output is images/ + manifest.csv (file, labels, split).
    """
    check_split_ratio(split_ratio)
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown split strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if strategy == "file" and split_file is None:
        raise ConfigError("split strategy 'file' needs a split file listing the training images")
    input_path, output = Path(input_dir), Path(os.path.abspath(output_dir))
    _check_dice_layout(input_path)
    _check_output(output, input_path)

    entries, skipped, n_annotations = read_annotations(input_path, log, multi_label)
    collisions = label_collisions({label for e in entries for label in (e.labels or (e.label,))})
    if collisions:
        shown = "; ".join(" vs ".join(repr(label) for label in group) for group in collisions)
        raise DataError(f"{input_path}: labels collide after Unicode NFC normalisation and case folding: {shown}")
    if not entries:
        raise DataError(f"{input_path}: no usable annotations ({n_annotations} file(s) in annotations/, all skipped)")

    if multi_label:
        classes = sorted({c for e in entries for c in e.class_names})
        by_class = {c: [e for e in entries if c in e.class_names] for c in classes}
        assignment = split_multilabel_entries(entries, classes, strategy, float(split_ratio), seed, split_file, log)
    else:
        classes = sorted({e.class_name for e in entries})
        by_class = {c: [e for e in entries if e.class_name == c] for c in classes}
        assignment = split_entries(by_class, strategy, float(split_ratio), seed, split_file, log)

    summary = ConvertSummary(str(input_path), str(output), strategy, float(split_ratio), int(seed),
                             annotations=n_annotations, classes=classes, skipped=skipped)
    for c in classes:
        sides = [assignment[e.image_path] for e in by_class[c]]
        summary.class_counts[c] = {"train": sides.count("train"), "val": sides.count("val")}
    summary.single_image_classes = [c for c in classes if len(by_class[c]) == 1]
    manifest = {
        "format": MANIFEST_FORMAT, "version": CONVERTER_VERSION, "source": os.path.abspath(input_path),
        "strategy": strategy, "split_ratio": float(split_ratio), "seed": int(seed), "classes": classes,
        "class_counts": summary.class_counts, "skipped": skipped, "multi_label": bool(multi_label),
    }

    output.parent.mkdir(parents=True, exist_ok=True)
    # A sibling of the output, so the final rename stays on one filesystem and is atomic.
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        log(f"writing {len(entries)} image(s) in {len(classes)} class(es) to {output}")
        write = _write_multilabel_tree if multi_label else _write_tree
        summary.linked = write(tmp, entries, assignment, classes, link, manifest)
        _swap_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(summary.format())
    return summary


def dice_fingerprint(input_dir: str | os.PathLike, extra: dict | None = None) -> str:
    """Hash of annotation/image relative paths, sizes and mtimes (plus `extra` settings)."""
    root = Path(input_dir)
    digest = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for sub in ("annotations", "images"):
        for dirpath, dirnames, filenames in os.walk(root / sub):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:  # a dangling link still counts, by its own metadata
                    st = os.lstat(path)
                rel = os.path.relpath(path, root)
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def ensure_dice_converted(
    input_dir: str | os.PathLike,
    cache_root: str | os.PathLike,
    *,
    split_ratio: float = 0.8,
    strategy: str = "stratified",
    split_file: str | os.PathLike | None = None,
    seed: int = 42,
    cache_max_gb: float | None = None,
    log: Log = print,
    multi_label: bool = False,
) -> str:
    """Convert a DICE folder into `<cache_root>/dice-<fingerprint>` once per input version; return that root.

    Concurrent callers (several workers on one node) serialise on a file lock, and only the first converts.
    ``multi_label``: the root holds images/ and manifest.csv (``MULTILABEL_MANIFEST``) instead of class folders.
    The entry stays in use while this process lives; a new conversion evicts least recently used cache
    entries beyond ``cache_max_gb`` (data.cache_max_gb; see raytimm.cache).
    """
    input_path = Path(input_dir)
    _check_dice_layout(input_path)  # before fingerprinting: a walk of missing folders would hash to a valid key
    settings = {"converter": CONVERTER_VERSION, "split_ratio": split_ratio, "strategy": strategy, "seed": seed}
    if multi_label:  # only when on: single-label cache keys stay what they were
        settings["multi_label"] = True
    if split_file is not None:
        try:
            settings["split_file"] = hashlib.sha256(Path(split_file).read_bytes()).hexdigest()
        except OSError:
            raise DataError(f"split file {split_file} cannot be read") from None
    target = Path(cache_root) / f"dice-{dice_fingerprint(input_path, settings)[:24]}"
    with cache.entry_lock(target):  # released when the block ends, also if this process dies
        converting = not _is_previous_conversion(target)
        if converting:
            log(f"converting DICE export {input_path} into cache {target}")
            # Hard links save a second copy of the images when the cache is on the same filesystem.
            convert_dice(input_path, target, split_ratio=split_ratio, strategy=strategy, split_file=split_file,
                         seed=seed, link=True, log=log, multi_label=multi_label)
        cache.mark_used(target, source=str(input_path))
    if converting:
        cache.after_new_entry(target, cache_max_gb)
    return str(target)

"""Synthetic demo data: coloured shapes that a tiny CNN learns in seconds at 32-48 px.

Each class differs from every other by both its shape and its colour, drawn at a random position
and scale on a noisy light background, so the task is easy but not trivial. Everything is
deterministic for a seed: image i of class c depends only on (seed, c, i).

The multi-label demo (``make_demo_multilabel``) draws 1-3 different shapes per image, one per
quadrant; an image's labels are the classes drawn. Image i depends only on (seed, i).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from raytimm.errors import ConfigError, DataError

# (shape, colour name, RGB): ten classes, each distinct by shape AND hue.
_CLASSES = [
    ("circle", "red", (220, 40, 40)),
    ("square", "blue", (40, 80, 220)),
    ("triangle", "green", (30, 160, 50)),
    ("cross", "orange", (245, 140, 20)),
    ("diamond", "purple", (135, 55, 200)),
    ("ring", "teal", (20, 160, 165)),
    ("star", "yellow", (225, 200, 20)),
    ("hexagon", "magenta", (215, 40, 165)),
    ("bar", "brown", (125, 75, 30)),
    ("xshape", "navy", (20, 30, 110)),
]
MAX_CLASSES = len(_CLASSES)
# A marker that lets a later run replace this folder without touching anything else.
_MARKER = ".raytimm-demo"


def demo_class_names(classes: int) -> list[str]:
    """Class names of a demo dataset with `classes` classes, e.g. ['circle_red', 'square_blue', ...]."""
    _check_args(classes, 1, 16)
    return [f"{shape}_{colour}" for shape, colour, _ in _CLASSES[:classes]]


def make_demo_dataset(
    output_dir: str | os.PathLike,
    *,
    classes: int = 4,
    per_class: int = 40,
    size: int = 48,
    val_fraction: float = 0.25,
    seed: int = 0,
) -> str:
    """Write a synthetic ImageFolder (train/, val/, classes.txt) of PNG shapes; return its root."""
    _check_args(classes, per_class, size)
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    root = _fresh_folder(output_dir)
    names = demo_class_names(classes)
    n_val = min(per_class - 1, max(1, round(per_class * val_fraction))) if val_fraction > 0 and per_class > 1 else 0
    for split in ("train", "val") if n_val else ("train",):
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    for name, i, stem, image, _ in _demo_images(classes, per_class, size, seed):
        image.save(root / ("val" if i < n_val else "train") / name / f"{stem}.png")
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return str(root)


def make_demo_dice(
    output_dir: str | os.PathLike,
    *,
    classes: int = 4,
    per_class: int = 40,
    size: int = 48,
    seed: int = 0,
) -> str:
    """Write the same kind of data as a DICE export (images/ + labelme-style annotations/*.json); return its root."""
    _check_args(classes, per_class, size)
    root = _fresh_folder(output_dir)
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    for name, _, stem, image, box in _demo_images(classes, per_class, size, seed):
        image.save(root / "images" / f"{stem}.png")
        _write_annotation(root, stem, [(name, box)], size)
    return str(root)


def _write_annotation(root: Path, stem: str, shapes: list[tuple[str, list[float]]], size: int) -> None:
    """annotations/<stem>.json in labelme's format: one rectangle per (label, box)."""
    annotation = {
        "version": "5.4.1",
        "flags": {},
        "shapes": [{
            "label": label,
            "points": [[box[0], box[1]], [box[2], box[3]]],
            "group_id": None,
            "description": "",
            "shape_type": "rectangle",
            "flags": {},
        } for label, box in shapes],
        "imagePath": f"{stem}.png",
        "imageData": None,
        "imageHeight": size,
        "imageWidth": size,
    }
    (root / "annotations" / f"{stem}.json").write_text(json.dumps(annotation, indent=1), encoding="utf-8")


def make_demo_multilabel(
    output_dir: str | os.PathLike,
    *,
    classes: int = 4,
    images: int = 256,
    size: int = 64,
    seed: int = 0,
    format: str = "manifest",
) -> str:
    """Write a multi-label demo set: 1-3 shapes per image, labels = the classes drawn.

    ``format="manifest"``: images/ + labels.csv (`file,labels`, no split column: training splits it
    by iterative stratification); return the CSV's path. ``format="dice"``: a DICE export with one
    shape per drawn class; return its root.
    """
    _check_args(classes, images, size)
    if format not in ("manifest", "dice"):
        raise ConfigError(f"multi-label demo format must be 'manifest' or 'dice', got {format!r}")
    if classes < 2:
        raise ConfigError("a multi-label demo needs at least 2 classes")
    root = _fresh_folder(output_dir)
    (root / "images").mkdir()
    names = demo_class_names(classes)
    rows = []
    if format == "dice":
        (root / "annotations").mkdir()
    for i in range(images):
        rng = np.random.default_rng([seed, 7919, i])  # a stream apart from the single-label demo's
        drawn = sorted(rng.choice(classes, size=int(rng.integers(1, min(3, classes) + 1)), replace=False).tolist())
        image, boxes = render_shapes(drawn, size, rng)
        stem = f"img_{i:05d}"
        image.save(root / "images" / f"{stem}.png")
        labels = [names[c] for c in drawn]
        rows.append((f"images/{stem}.png", labels, None))
        if format == "dice":
            _write_annotation(root, stem, list(zip(labels, boxes)), size)
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    if format == "dice":
        return str(root)
    from raytimm.data.manifest import write_manifest

    return write_manifest(root / "labels.csv", rows)


def render_shapes(class_indices: list[int], size: int, rng: np.random.Generator) -> tuple[Image.Image, list[list[float]]]:
    """Draw several classes' shapes, each in its own quadrant; return the image and their boxes."""
    image = _background(size, rng)
    draw = ImageDraw.Draw(image)
    half = size / 2
    quadrants = rng.permutation(4)[: len(class_indices)]
    boxes = []
    for c, q in zip(class_indices, quadrants):
        shape, _, colour = _CLASSES[c]
        extent = half * rng.uniform(0.65, 0.95)
        x0, y0 = (q % 2) * half, (q // 2) * half
        cx, cy = (o + rng.uniform(extent / 2, half - extent / 2) for o in (x0, y0))
        _draw(draw, shape, cx, cy, extent / 2, _jittered(colour, rng), rng)
        boxes.append([round(v, 2) for v in (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)])
    return image, boxes


def _demo_images(
    classes: int, per_class: int, size: int, seed: int
) -> Iterator[tuple[str, int, str, Image.Image, list[float]]]:
    """Every demo image, shared by both layouts: (class name, index in class, file stem, image, bounding box).

    Image i of class c depends only on (seed, c, i), so the ImageFolder and DICE demos hold the same pictures.
    """
    for c, name in enumerate(demo_class_names(classes)):
        for i in range(per_class):
            image, box = render_shape(c, size, np.random.default_rng([seed, c, i]))
            yield name, i, f"{name}_{i:04d}", image, box


def render_shape(class_index: int, size: int, rng: np.random.Generator) -> tuple[Image.Image, list[float]]:
    """Draw one image of a class; return it with the shape's bounding box [x0, y0, x1, y1]."""
    shape, _, colour = _CLASSES[class_index]
    image = _background(size, rng)
    extent = size * rng.uniform(0.5, 0.8)  # shape's bounding-box side
    cx, cy = (rng.uniform(extent / 2, size - extent / 2) for _ in range(2))
    _draw(ImageDraw.Draw(image), shape, cx, cy, extent / 2, _jittered(colour, rng), rng)
    box = [cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2]
    return image, [round(v, 2) for v in box]


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """Light, slightly tinted background with pixel noise: colour alone is a strong cue, shape a second one."""
    base = rng.integers(165, 235) + rng.integers(-12, 13, size=3)
    background = base[None, None, :] + rng.normal(0, 10, size=(size, size, 3))
    return Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")


def _jittered(colour, rng: np.random.Generator) -> tuple[int, ...]:
    jitter = rng.integers(-20, 21, size=3)
    return tuple(int(v) for v in np.clip(np.array(colour) + jitter, 0, 255))


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, rng) -> None:
    """Draw a shape of half-extent r centred at (cx, cy)."""
    box = [cx - r, cy - r, cx + r, cy + r]
    t = max(2.0, r * 0.4)  # stroke thickness for cross, ring, bar, x
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon(_regular(cx, cy + r * 0.2, r * 1.1, 3, -90), fill=fill)
    elif shape == "cross":
        draw.rectangle([cx - t / 2, cy - r, cx + t / 2, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - t / 2, cx + r, cy + t / 2], fill=fill)
    elif shape == "diamond":
        draw.polygon(_regular(cx, cy, r, 4, 0), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(t * 0.8)))
    elif shape == "star":
        draw.polygon(_star(cx, cy, r, r * 0.45), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_regular(cx, cy, r, 6, 0), fill=fill)
    elif shape == "bar":
        draw.rectangle([cx - r, cy - t / 2, cx + r, cy + t / 2], fill=fill)
    elif shape == "xshape":
        width = max(2, int(t * 0.8))
        draw.line([cx - r, cy - r, cx + r, cy + r], fill=fill, width=width)
        draw.line([cx - r, cy + r, cx + r, cy - r], fill=fill, width=width)


def _regular(cx: float, cy: float, r: float, n: int, start_deg: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(math.radians(start_deg + 360 * k / n)),
             cy + r * math.sin(math.radians(start_deg + 360 * k / n))) for k in range(n)]


def _star(cx: float, cy: float, outer: float, inner: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else inner
        angle = math.radians(-90 + 36 * k)
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _check_args(classes: int, per_class: int, size: int) -> None:
    if not 1 <= classes <= MAX_CLASSES:
        raise ConfigError(f"demo classes must be between 1 and {MAX_CLASSES}, got {classes}")
    if per_class < 1:
        raise ConfigError(f"demo per_class must be at least 1, got {per_class}")
    if size < 16:
        raise ConfigError(f"demo image size must be at least 16 px, got {size}")


def _fresh_folder(output_dir: str | os.PathLike) -> Path:
    """An empty folder at output_dir; a previous demo there is replaced, anything else is refused."""
    root = Path(output_dir)
    if root.exists():
        if not root.is_dir():
            raise DataError(f"demo output {root} exists and is not a folder")
        if any(root.iterdir()):
            if not (root / _MARKER).is_file():
                raise DataError(f"demo output folder {root} is not empty; choose a new folder")
            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / _MARKER).write_text("written by raytimm.data.demo; safe to delete\n", encoding="utf-8")
    return root

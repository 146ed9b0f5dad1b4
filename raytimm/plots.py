"""Evaluation figures and tables: confusion matrix PNG, per-class CSV, training curves PNG.

Figures are drawn on matplotlib's object API (``Figure`` + Agg canvas), never pyplot: no display,
no global figure state, safe in Ray workers and threads.
"""
from __future__ import annotations

import csv
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from matplotlib import font_manager
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Fonts with Hangul/CJK glyphs, used as fallbacks when installed; DejaVu Sans (bundled) first.
_CJK_FONT_CANDIDATES = (
    "Noto Sans CJK KR", "Noto Sans KR", "NanumGothic", "Malgun Gothic", "AppleGothic",
    "Noto Sans CJK JP", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "Droid Sans Fallback",
)
MAX_LABEL_CHARS = 24
ANNOTATE_MAX_CLASSES = 20


def _font_families() -> list[str]:
    """DejaVu Sans plus whichever CJK fonts are installed (naming absent ones makes mpl warn)."""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [name for name in _CJK_FONT_CANDIDATES if name in installed]


@contextmanager
def _quiet_fonts() -> Iterator[None]:
    """Font fallback on; 'Glyph ... missing' noise off (unknown glyphs render as boxes)."""
    font_logger = logging.getLogger("matplotlib.font_manager")
    old_level = font_logger.level
    font_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), rc_context({"font.family": _font_families()}):
            warnings.filterwarnings("ignore", message=r".*[Gg]lyph .* missing from")
            yield
    finally:
        font_logger.setLevel(old_level)


def _as_matrix(cm: np.ndarray | Sequence[Sequence[float]], class_names: Sequence[str] | None) -> np.ndarray:
    """Validate ``cm`` as a square (true x predicted) count matrix matching ``class_names``."""
    matrix = np.asarray(cm, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square (true x predicted), got shape {matrix.shape}")
    if class_names is not None and len(class_names) != matrix.shape[0]:
        raise ValueError(
            f"confusion matrix has {matrix.shape[0]} classes but {len(class_names)} class names were given"
        )
    return matrix


def per_class_csv(cm: np.ndarray | Sequence[Sequence[float]], class_names: Sequence[str], path: str | os.PathLike) -> str:
    """Write ``class,support,correct,accuracy`` (accuracy in percent, 2 decimals); return the path."""
    from raytimm.metrics import per_class_accuracy  # the same numbers as meta.json's per_class

    rows = per_class_accuracy(_as_matrix(cm, class_names).tolist(), class_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "support", "correct", "accuracy"])
        for r in rows:
            writer.writerow([r["class"], r["support"], r["correct"], f"{r['top1']:.2f}"])
    return str(path)


PER_LABEL_COLUMNS = ("class", "support", "ap", "precision", "recall", "f1", "threshold")


def per_label_csv(rows: Sequence[dict], path: str | os.PathLike) -> str:
    """Multi-label: write ``class,support,ap,precision,recall,f1,threshold`` from metrics.multilabel_metrics'
    per_class rows (percent, 2 decimals; threshold 6 decimals); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(PER_LABEL_COLUMNS)
        for r in rows:
            writer.writerow([r["class"], r["support"], *(f"{r[k]:.2f}" for k in ("ap", "precision", "recall", "f1")),
                             f"{r['threshold']:.6f}"])
    return str(path)


def _short(name: str) -> str:
    name = str(name)
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "…"


def confusion_matrix_png(
    cm: np.ndarray | Sequence[Sequence[float]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
    normalize: bool = True,
) -> str:
    """Draw the confusion matrix (rows: true, columns: predicted) as a PNG; return the path.

    With ``normalize`` colours show each true class's row in percent, so rare classes stay
    visible; cells are annotated with raw counts up to 20 classes.
    """
    matrix = _as_matrix(cm, class_names)
    n = matrix.shape[0]
    if normalize:
        rows = matrix.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            shown = np.where(rows > 0, 100.0 * matrix / rows, 0.0)
        vmax = 100.0
    else:
        shown = matrix
        vmax = max(float(matrix.max()), 1.0)

    # Figure grows with the class count so labels stay legible up to ~100 classes.
    side = float(np.clip(0.25 * n + 3.0, 5.0, 28.0))
    cell_pt = 0.8 * side * 72.0 / n  # the axes take roughly 80% of the figure
    tick_size = float(np.clip(0.45 * cell_pt, 4.0, 10.0))
    text_size = float(np.clip(0.6 * side, 10.0, 20.0))
    labels = [_short(c) for c in class_names]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    with _quiet_fonts():
        fig = Figure(figsize=(side + 1.5, side), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        image = ax.imshow(shown, interpolation="nearest", cmap="Blues", vmin=0.0, vmax=vmax)
        colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        colorbar.set_label("% of true class" if normalize else "count", fontsize=text_size)
        ax.set_xticks(np.arange(n))
        ax.set_yticks(np.arange(n))
        ax.set_xticklabels(labels, rotation=90 if n > 8 else 45, ha="center" if n > 8 else "right",
                           fontsize=tick_size)
        ax.set_yticklabels(labels, fontsize=tick_size)
        ax.set_xlabel("Predicted", fontsize=text_size)
        ax.set_ylabel("True", fontsize=text_size)
        accuracy = 100.0 * np.trace(matrix) / matrix.sum() if matrix.sum() > 0 else 0.0
        ax.set_title(title or f"Confusion matrix ({n} classes, accuracy {accuracy:.1f}%)",
                     fontsize=text_size)
        if n <= ANNOTATE_MAX_CLASSES:
            cell_size = float(np.clip(120.0 / n, 6.0, 11.0))
            for i in range(n):
                for j in range(n):
                    # Light text on dark cells keeps the count readable.
                    colour = "white" if shown[i, j] > 0.6 * vmax else "black"
                    ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                            color=colour, fontsize=cell_size)
        fig.tight_layout()
        fig.savefig(path, format="png")
    return str(path)


def _series(history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for index, entry in enumerate(history):
        value = entry.get(key)
        if value is None:
            continue
        xs.append(float(entry.get("epoch", index)))
        ys.append(float(value))
    return xs, ys


def curves_png(history: Sequence[dict], path: str | os.PathLike) -> str:
    """Plot loss and top-1 (train vs val; multi-label: val mAP and F1) per epoch from per-epoch metric
    dicts; return the path.

    Each entry is one epoch's metrics, e.g. ``{"epoch": 1, "train/loss": ..., "val/top1": ...}``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    multi_label = any("val/mAP" in h for h in history)
    panels = (("loss", "loss", (("train/loss", "train", "-o"), ("val/loss", "val", "-s"))),)
    if multi_label:
        panels += (("scores", "percent", (("val/mAP", "val mAP", "-s"), ("val/f1_micro", "val F1 micro", "-^"),
                                          ("val/f1_macro", "val F1 macro", "-v"))),)
    else:
        panels += (("top1", "top-1 accuracy (%)", (("train/top1", "train", "-o"), ("val/top1", "val", "-s"))),)
    with _quiet_fonts():
        fig = Figure(figsize=(10, 4), dpi=100)
        FigureCanvasAgg(fig)
        for col, (_, label, series) in enumerate(panels):
            ax = fig.add_subplot(1, 2, col + 1)
            for key, name, style in series:
                xs, ys = _series(history, key)
                if xs:
                    ax.plot(xs, ys, style, label=name, markersize=3)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(path, format="png")
    return str(path)

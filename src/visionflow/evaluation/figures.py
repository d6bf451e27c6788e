"""Evaluation figures (PNG), logged to MLflow by the register stage.

Confusion matrices, per-class bars, per-class precision-recall curves, and grids of test
images with true and predicted boxes or masks drawn on them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Distinct colours per class (tab10); index 0 of a semantic mask (background) stays clear.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
TRUE_COLOUR, PRED_COLOUR = (0, 200, 0), (255, 40, 40)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str, path: Path) -> None:
    plt = _plt()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 1.0 * len(rows) + 2))
    # Row-normalised colours (recall per true class) keep rare classes visible; cells show counts.
    shade = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    big = cm.max() >= 10000
    for (r, c), v in np.ndenumerate(cm):
        text = f"{v / 1000:.0f}k" if big and v >= 1000 else str(v)
        ax.text(c, r, text, ha="center", va="center", fontsize=8, color="white" if shade[r, c] > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_per_class(values: dict[str, dict[str, Optional[float]]], keys: Sequence[str], title: str, path: Path) -> None:
    plt = _plt()
    names = list(values)
    x = np.arange(len(names))
    width = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names) + 2), 4))
    for i, key in enumerate(keys):
        ys = [values[n].get(key) for n in names]
        ax.bar(x + (i - (len(keys) - 1) / 2) * width, [y if y is not None and y >= 0 else 0 for y in ys],
               width=width, label=key)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr_curves(recall: Sequence[float], curves: dict[str, Sequence[float]], ap50: dict[str, float],
                   path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, (name, precision) in enumerate(curves.items()):
        p = np.asarray(precision, dtype=float)
        if (p < 0).all():  # no ground truth of this class in the test split
            continue
        ax.plot(recall, np.clip(p, 0, None), color=np.array(PALETTE[i % len(PALETTE)]) / 255,
                label=f"{name} (AP50 {ap50.get(name, -1):.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_title("precision-recall per class (IoU 0.5, test)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tile(image: np.ndarray, size: int) -> tuple[Image.Image, float]:
    im = Image.fromarray(image)
    scale = size / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale)))), scale


def _boxes(draw: ImageDraw.ImageDraw, boxes, labels, scale: float, colour, names, scores=None) -> None:
    for j, (box, label) in enumerate(zip(boxes, labels)):
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = names[label] if scores is None else f"{names[label]} {scores[j]:.2f}"
        draw.text((x1 + 2, y1 + 1), text, fill=colour)


def detection_grid(items: list[tuple[np.ndarray, dict[str, Any], dict[str, Any]]], names: Sequence[str],
                   path: Path, tile: int = 256, columns: int = 4) -> None:
    """items: (RGB image, truth {"boxes", "labels"}, prediction {"boxes", "labels", "scores"});
    true boxes green, predictions red with their scores."""
    tiles = []
    for image, truth, pred in items:
        im, scale = _tile(image, tile)
        draw = ImageDraw.Draw(im)
        _boxes(draw, truth["boxes"], truth["labels"], scale, TRUE_COLOUR, names)
        _boxes(draw, pred["boxes"], pred["labels"], scale, PRED_COLOUR, names, pred["scores"])
        tiles.append(im)
    _save_grid(tiles, path, tile, columns)


def _overlay(image: np.ndarray, mask: np.ndarray, size: int) -> Image.Image:
    colours = np.array([(0, 0, 0)] + PALETTE * 26, dtype=np.float32)[: 256]
    colours[255] = (255, 255, 255)  # ignore region
    rgb = image.astype(np.float32)
    fg = mask > 0
    rgb[fg] = 0.45 * rgb[fg] + 0.55 * colours[mask[fg]]
    return _tile(rgb.astype(np.uint8), size)[0]


def segmentation_grid(items: list[tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path, tile: int = 192,
                      columns: int = 2) -> None:
    """items: (RGB image, true mask, predicted mask); each row shows image | truth | prediction."""
    tiles = []
    for image, truth, pred in items:
        row = [_tile(image, tile)[0], _overlay(image, truth, tile), _overlay(image, pred, tile)]
        strip = Image.new("RGB", (sum(t.width for t in row) + 8, max(t.height for t in row)), "white")
        x = 0
        for t in row:
            strip.paste(t, (x, 0))
            x += t.width + 4
        tiles.append(strip)
    _save_grid(tiles, path, max((t.width for t in tiles), default=tile), columns)


def _save_grid(tiles: list[Image.Image], path: Path, cell: int, columns: int) -> None:
    if not tiles:
        return
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    cw, ch = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * (cw + 4), rows * (ch + 4)), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * (cw + 4), (i // cols) * (ch + 4)))
    grid.save(path)

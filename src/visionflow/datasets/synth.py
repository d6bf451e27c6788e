"""The built-in "shapes" dataset: deterministic synthetic images with COCO annotations.

Layout written under `out`:

    images/000001.jpg, images/000002.jpg, images/000003.png, ...  (every 3rd image PNG)
    annotations.json   COCO: images (+ "labels": [main category id]), annotations
                       (bbox [x, y, w, h] absolute pixels, polygon segmentation, area,
                       iscrowd 0), categories 1..5, info

Each image has a textured, noisy background, one large "main" shape (the image-level class)
and 0-3 smaller distractors of random classes. Annotations are listed in paint order, so a
semantic mask is obtained by painting the polygons in order (later ones on top).

Image i is drawn from `numpy.random.default_rng([seed, i])`, so it does not depend on `n`,
and the same (seed, n, size) gives byte-identical files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from visionflow.core.files import write_text, write_with

CATEGORIES = ("circle", "square", "triangle", "star", "hexagon")  # COCO ids 1..5
VERSION = "1"
JPEG_QUALITY = 90
PNG_EVERY = 3  # image ids divisible by 3 are PNG, the rest JPEG: both decoders get exercised

# Shape sizes are equal-area side lengths (sqrt(area)) as fractions of the image side, so
# every class covers the same area at a given scale and size says nothing about class.
# MAIN_SCALE[0]^2 >= 2 * DISTRACTOR_SCALE[1]^2 keeps the main shape at least twice the area
# of any distractor (0.1156 vs 0.0968). The smallest distractor is ~12.5 px across at 96 px.
MAIN_SCALE = (0.34, 0.50)
DISTRACTOR_SCALE = (0.13, 0.22)
MAX_DISTRACTORS = 3
MAX_OCCLUDED = 0.3  # at most this fraction of the main shape may be hidden by shapes on top
PLACEMENT_TRIES = 20
# Euclidean RGB distances: shape vs both background colours, distractor vs main shape.
MIN_BG_CONTRAST = 90.0
MIN_SHAPE_CONTRAST = 60.0
COLOUR_TRIES = 100

NOTE = ("Annotations of an image are listed in paint order (z-order): later annotations are "
        "drawn on top of earlier ones, so a semantic mask is obtained by painting the polygons "
        "in order. Polygons are the full shapes, including parts hidden by shapes on top. "
        "images[].labels holds the category id of the image's main (largest) shape.")


@dataclass
class Shape:
    category_id: int
    polygon: np.ndarray  # (N, 2) float x, y in pixels, rounded to 0.01
    colour: tuple[int, int, int]


def _regular(k: int, radius: float = 1.0) -> np.ndarray:
    t = 2 * np.pi * np.arange(k) / k - np.pi / 2  # first vertex points up
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular(2 * points)
    outer[1::2] *= inner
    return outer


def polygon_area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _unit_area(poly: np.ndarray) -> np.ndarray:
    return poly / np.sqrt(polygon_area(poly))


# Polygons of area 1 centred on the origin, in category order.
UNIT_SHAPES = tuple(_unit_area(p) for p in (_regular(32), _regular(4), _regular(3), _star(), _regular(6)))


def _shape_polygon(rng: np.random.Generator, category_id: int, side: float, size: int) -> np.ndarray:
    """A rotated, scaled shape at a random position fully inside a `size` x `size` image."""
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    poly = UNIT_SHAPES[category_id - 1] @ rot.T * side
    lo, hi = poly.min(axis=0), poly.max(axis=0)
    # Keep a 1 px margin so bboxes never need clipping and every edge is visible.
    centre = rng.uniform(1 - lo, size - 1 - hi)
    return np.round(poly + centre, 2)


def _mask(poly: np.ndarray, size: int) -> np.ndarray:
    img = Image.new("1", (size, size), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in poly.tolist()], fill=1)
    return np.asarray(img, dtype=bool)


def _pick_colour(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: list[float]) -> tuple[int, int, int]:
    """A random colour at least `min_dist[k]` from `avoid[k]`; the best try if none is."""
    best, best_margin = None, -np.inf
    for _ in range(COLOUR_TRIES):
        c = rng.integers(0, 256, 3)
        margin = min(np.linalg.norm(c - a) - d for a, d in zip(avoid, min_dist))
        if margin > best_margin:
            best, best_margin = c, margin
        if margin >= 0:
            break
    return tuple(int(v) for v in best)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(size, size, 3) float texture and its two base colours: a gradient, stripes or blobs."""
    c1 = rng.uniform(0, 255, 3)
    c2 = np.clip(c1 + rng.normal(0, 45, 3), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    proj = xx * np.cos(angle) + yy * np.sin(angle)
    kind = rng.integers(3)
    if kind == 0:
        t = (proj - proj.min()) / (np.ptp(proj) + 1e-9)
    elif kind == 1:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * proj + rng.uniform(0, 2 * np.pi))
    else:
        # Smooth blobs: a coarse random grid upsampled bilinearly.
        grid = rng.integers(3, 7)
        coarse = Image.fromarray((rng.random((grid, grid)) * 255).astype(np.uint8))
        t = np.asarray(coarse.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return img, [c1, c2]


def _occluded(main: np.ndarray, on_top: list[np.ndarray]) -> float:
    if not on_top:
        return 0.0
    return float((main & np.logical_or.reduce(on_top)).sum() / max(main.sum(), 1))


def _layout(rng: np.random.Generator, size: int, bg_colours: list[np.ndarray]) -> list[Shape]:
    """The shapes of one image in paint order; the main shape sits at a random depth."""
    main_cat = int(rng.integers(1, len(CATEGORIES) + 1))
    main_poly = _shape_polygon(rng, main_cat, rng.uniform(*MAIN_SCALE) * size, size)
    main_colour = _pick_colour(rng, bg_colours, [MIN_BG_CONTRAST] * 2)
    main = Shape(main_cat, main_poly, main_colour)
    main_mask = _mask(main_poly, size)

    n_distractors = int(rng.integers(0, MAX_DISTRACTORS + 1))
    main_depth = int(rng.integers(0, n_distractors + 1))
    below, above, on_top_masks = [], [], []
    for j in range(n_distractors):
        cat = int(rng.integers(1, len(CATEGORIES) + 1))
        side = rng.uniform(*DISTRACTOR_SCALE) * size
        colour = _pick_colour(rng, bg_colours + [np.array(main_colour)],
                              [MIN_BG_CONTRAST] * 2 + [MIN_SHAPE_CONTRAST])
        if j < main_depth:
            below.append(Shape(cat, _shape_polygon(rng, cat, side, size), colour))
            continue
        # On top of the main shape: overlap is welcome, hiding most of it is not.
        best, best_mask, best_occ = None, None, np.inf
        for _ in range(PLACEMENT_TRIES):
            poly = _shape_polygon(rng, cat, side, size)
            mask = _mask(poly, size)
            occ = _occluded(main_mask, on_top_masks + [mask])
            if occ < best_occ:
                best, best_occ, best_mask = poly, occ, mask
            if occ <= MAX_OCCLUDED:
                break
        above.append(Shape(cat, best, colour))
        on_top_masks.append(best_mask)
    return below + [main] + above


def render_image(seed: int, index: int, size: int) -> tuple[Image.Image, list[Shape]]:
    """Image `index` (0-based) of the dataset for `seed`, and its shapes in paint order."""
    rng = np.random.default_rng([seed, index])
    bg, bg_colours = _background(rng, size)
    shapes = _layout(rng, size, bg_colours)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for s in shapes:
        draw.polygon([tuple(p) for p in s.polygon.tolist()], fill=s.colour)
    # Sensor-like noise over everything, shapes included, so edges are not pixel-perfect.
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, rng.uniform(3, 12), (size, size, 3))
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8)), shapes


def _annotation(shape: Shape, ann_id: int, image_id: int, size: int) -> dict[str, Any]:
    lo = np.clip(shape.polygon.min(axis=0), 0, size)
    hi = np.clip(shape.polygon.max(axis=0), 0, size)
    x, y = (round(float(v), 2) for v in lo)
    w, h = (round(float(v), 2) for v in hi - lo)
    return {
        "id": ann_id, "image_id": image_id, "category_id": shape.category_id,
        "bbox": [x, y, w, h],  # COCO xywh, absolute pixels
        "segmentation": [[round(float(v), 2) for v in shape.polygon.ravel()]],
        "area": round(polygon_area(shape.polygon), 2), "iscrowd": 0,
    }


def _save(img: Image.Image, path: Path) -> None:
    # Fixed encoder settings and no metadata: same pixels, same bytes.
    if path.suffix == ".png":
        write_with(path, lambda p: img.save(p, format="PNG", compress_level=6))
    else:
        write_with(path, lambda p: img.save(p, format="JPEG", quality=JPEG_QUALITY, subsampling=2))


def _write_dataset(folder: Path, n: int, size: int, seed: int) -> dict[str, Any]:
    images, annotations = [], []
    for i in range(n):
        image_id = i + 1
        ext = "png" if image_id % PNG_EVERY == 0 else "jpg"
        file_name = f"images/{image_id:06d}.{ext}"
        img, shapes = render_image(seed, i, size)
        _save(img, folder / file_name)
        main = max(shapes, key=lambda s: polygon_area(s.polygon))
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                       "labels": [main.category_id]})
        for s in shapes:
            annotations.append(_annotation(s, len(annotations) + 1, image_id, size))
    return {
        "info": {"description": "visionflow built-in shapes dataset", "seed": seed, "n": n,
                 "size": size, "version": VERSION},
        "note": NOTE,
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"}
                       for k, name in enumerate(CATEGORIES)],
    }


def _stale_siblings(out: Path) -> Iterator[Path]:
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        yield from out.parent.glob(pattern)


def _swap_in(new: Path, out: Path) -> None:
    """Move the finished `new` folder to `out`, replacing any previous one."""
    if not out.exists() and not out.is_symlink():
        os.replace(new, out)
        return
    # A directory cannot be renamed over a non-empty one: move the old one aside first.
    # `out` is missing only between the two renames, never half-written.
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, trash / out.name)
    os.replace(new, out)
    shutil.rmtree(trash)


def render_dataset(out: Path, n: int = 600, size: int = 96, seed: int = 0) -> dict[str, int]:
    """Render the dataset into `out` (replaced atomically) and return its counts."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_siblings(out):  # left by an interrupted earlier run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is not
    try:
        (tmp / "images").mkdir()
        coco = _write_dataset(tmp, n, size, seed)
        write_text(tmp / "annotations.json", json.dumps(coco, sort_keys=True, separators=(",", ":")) + "\n")
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"images": n, "annotations": len(coco["annotations"]), "categories": len(CATEGORIES)}

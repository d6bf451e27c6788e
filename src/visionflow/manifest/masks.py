"""Mask geometry of the canonical sample record: COCO RLE, polygons to pixels, the semantic
training target, and the Pascal VOC palette. Shared by the formats, the tasks, evaluation and
the FiftyOne integration; knows no file format.

Conventions: masks are (H, W) arrays in the image's own pixels; RLE is COCO's (pycocotools on a
Fortran-ordered uint8 array, `counts` as str so the manifest stays JSON; uncompressed list
counts are read too); semantic values are 0 background, c + 1 for category c, IGNORE (255) for
pixels that count for nothing.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

import numpy as np
from pycocotools import mask as mask_util

from visionflow.manifest import Instance, Sample

IGNORE = 255


class Losses(Protocol):
    """Where painting reports what a mask cannot hold (formats.ConversionReport)."""

    def add(self, kind: str, example: str) -> None: ...


class _NoLosses:
    def add(self, kind: str, example: str) -> None:
        pass


def encode_rle(pixels: np.ndarray) -> dict[str, Any]:
    """COCO RLE of a boolean (H, W) mask; counts as str so the manifest stays JSON."""
    rle = mask_util.encode(np.asfortranarray(pixels.astype(np.uint8)))
    return {"size": [int(pixels.shape[0]), int(pixels.shape[1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any], height: int, width: int, where: str) -> np.ndarray:
    """Boolean (H, W) pixels of a COCO RLE (compressed or uncompressed) whose size must be the image's."""
    if list(rle.get("size", [])) != [height, width]:
        raise ValueError(f"{where}: RLE size {rle.get('size')} is not the image's [h, w] [{height}, {width}]")
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        coded = mask_util.frPyObjects(rle, height, width)
    else:
        coded = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_util.decode(coded).astype(bool)


def instance_mask(inst: Instance, height: int, width: int, where: str) -> Optional[np.ndarray]:
    """Boolean (H, W) pixels of an instance's RLE, else of its polygons; None when it has only a box.

    Polygons go through pycocotools, not ImageDraw: the rasterisation COCO tools and evaluation use."""
    if inst.rle is not None:
        return decode_rle(inst.rle, height, width, where)
    if inst.polygons:
        polygons = [list(p) for p in inst.polygons]
        return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, height, width))).astype(bool)
    return None


def paint(s: Sample, values: Mapping[int, int], background: int, losses: Losses) -> Optional[np.ndarray]:
    """(H, W) uint8 class values: `values[category_id]` for each instance in manifest order (later
    on top), `background` where none is, IGNORE for the ignore region (painted last)."""
    ignore_rle = s.attributes.get("ignore_rle")
    if not s.instances and ignore_rle is None:
        return None
    h, w = s.height, s.width
    canvas = np.full((h, w), background, dtype=np.uint8)
    owner = np.full((h, w), -1, dtype=np.int32)  # index of the instance that painted each pixel
    cats = [inst.category_id for inst in s.instances]
    flattened: set[int] = set()
    for i, inst in enumerate(s.instances):
        where = f"{s.id} instance #{i}"
        if inst.category_id not in values:
            raise ValueError(f"{where}: category id {inst.category_id} is not in the category table")
        pixels = instance_mask(inst, h, w, where)
        if pixels is None:
            losses.add("box_only_dropped", f"{where}: box {inst.bbox}")
            continue
        if inst.rle is None:
            losses.add("polygon_rasterised", where)
        flattened.update(j for j in np.unique(owner[pixels]).tolist() if j >= 0 and cats[j] != inst.category_id)
        canvas[pixels], owner[pixels] = values[inst.category_id], i
    if ignore_rle is not None:
        pixels = decode_rle(ignore_rle, h, w, f"{s.id} ignore_rle")
        flattened.update(j for j in np.unique(owner[pixels]).tolist() if j >= 0)
        canvas[pixels], owner[pixels] = IGNORE, len(cats)
    for j in sorted(flattened):
        losses.add("instance_overlap_flattened", f"{s.id} instance #{j} (category {cats[j]})")
    return canvas


def semantic_mask(s: Sample) -> np.ndarray:
    """Training target (H, W) uint8 of a sample: 0 background, c + 1 for category c, IGNORE for
    Sample.attributes["ignore_rle"]. Painted like the writer: manifest order (later on top), crowd
    regions as their class, box-only instances skipped, the ignore region last."""
    bad = sorted({i.category_id for i in s.instances if not 0 <= i.category_id < IGNORE - 1})
    if bad:
        raise ValueError(f"{s.id}: category ids {bad} do not fit a uint8 target (0..253, 255 = ignore)")
    canvas = paint(s, {i.category_id: i.category_id + 1 for i in s.instances}, 0,
                   _NoLosses())  # the losses a mask file would report do not apply
    return np.zeros((s.height, s.width), dtype=np.uint8) if canvas is None else canvas


def voc_palette() -> list[int]:
    """Pascal VOC's colour map (bits of the index spread over R, G, B); 255 = VOC's void colour."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    # index 255 comes out (224, 224, 192), VOC's void colour
    return palette


PALETTE = voc_palette()

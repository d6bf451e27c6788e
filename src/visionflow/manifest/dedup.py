"""Exact and near-duplicate images, so that copies of one picture never straddle splits.

Exact duplicates share `Sample.sha256` (already in the manifest: no image is read).
Near duplicates (re-encoded, resized, slightly brightened copies) are found with a 64-bit
perceptual hash (pHash): the image is decoded small (JPEG draft mode decodes at 1/2-1/8 scale
in the DCT), turned to grey, box-resized to 32x32, and the 8x8 lowest frequencies of its 2-D
DCT are thresholded at their median. Low frequencies survive brightness, contrast, scale and
re-encoding, so copies differ in 0-2 bits. A difference hash (9x8 gradient signs) was tried
first and rejected: on smooth gradient backgrounds, different pictures came within 3 bits
(distinct images of the built-in shapes dataset are >= 6 bits apart by pHash).
Only one image per sha256 is hashed (exact copies need no second look).

Pairing is all-pairs but vectorised: rows of the hash vector are XOR-ed against the later
entries in blocks of BLOCK and counted with numpy's popcount, so 10k hashes (5e7 pairs)
take well under a second and memory stays at BLOCK x n uint64.

Policies (problem -> policy):
    image file missing or unreadable while hashing -> counted in `unhashed` (ids kept), logged;
        that image only takes part in exact-duplicate matching (ingest already probed every
        image, so this means files moved after ingest; train will fail on them anyway)
    near_duplicate_threshold 0 or None               -> near-duplicate search off (no image read)
    featureless images (flat colour: every AC coefficient 0) -> they hash alike and are near
        duplicates of each other; that is what they are for a model
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from PIL import Image, ImageOps

from visionflow.manifest import Sample

log = logging.getLogger(__name__)
HASH_SIDE = 32  # the DCT input; its 8x8 lowest frequencies give the 64 bits
DRAFT_SIZE = 64  # JPEG decode target; the hash only needs 32x32
BLOCK = 512


@dataclass(frozen=True)
class DuplicatePair:
    a: str  # sample ids, a < b
    b: str
    reason: str  # "exact" | "near"
    distance: int  # Hamming distance of the hashes (0 for exact)


@dataclass
class Duplicates:
    pairs: list[DuplicatePair] = field(default_factory=list)
    clusters: list[list[str]] = field(default_factory=list)  # sorted ids, clusters of >= 2
    unhashed: list[str] = field(default_factory=list)
    threshold: Optional[int] = None

    def summary(self, n_examples: int = 10) -> dict[str, Any]:
        exact = [p for p in self.pairs if p.reason == "exact"]
        near = [p for p in self.pairs if p.reason == "near"]
        examples = exact[: n_examples // 2] + near[: n_examples - min(len(exact), n_examples // 2)]
        return {"exact_pairs": len(exact), "near_pairs": len(near), "clusters": len(self.clusters),
                "images_in_clusters": sum(map(len, self.clusters)), "near_threshold": self.threshold,
                "unhashed": len(self.unhashed),
                "examples": [{"a": p.a, "b": p.b, "reason": p.reason, "distance": p.distance}
                             for p in examples[:n_examples]]}


class UnionFind:
    def __init__(self, items: Iterable[str] = ()) -> None:
        self.parent: dict[str, str] = {i: i for i in items}

    def find(self, x: str) -> str:
        root = self.parent.setdefault(x, x)
        while root != self.parent[root]:
            root = self.parent[root]
        while x != root:  # path compression keeps later finds O(1)
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller id is the root, so components are named deterministically
            self.parent[max(ra, rb)] = min(ra, rb)

    def components(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for x in sorted(self.parent):
            out.setdefault(self.find(x), []).append(x)
        return out


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    return np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))  # (n, n) DCT-II rows, unscaled


DCT = _dct_matrix(HASH_SIDE)


def phash(path: str | Path) -> int:
    """64-bit perceptual hash of an image file; bit 8*u+v = DCT coefficient (u, v) > median."""
    with Image.open(path) as im:
        im.draft("L", (DRAFT_SIZE, DRAFT_SIZE))  # JPEG only: decode at reduced scale
        im = ImageOps.exif_transpose(im)
        grey = np.asarray(im.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX,
                                                 reducing_gap=2.0), dtype=np.float64)  # (32, 32)
    low = (DCT @ grey @ DCT.T)[:8, :8].ravel()  # (64,) lowest frequencies, DC first
    bits = low > np.median(low[1:])  # DC excluded from the median: it only measures brightness
    return int(np.packbits(bits).view(">u8")[0])


def hash_images(paths: list[Path], workers: Optional[int] = None) -> list[Optional[int]]:
    """pHash of each path (None where the file cannot be read), in order."""
    def one(p: Path) -> Optional[int]:
        try:
            return phash(p)
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
    workers = workers or min(8, os.cpu_count() or 1)  # Pillow's decoders release the GIL
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, paths, chunksize=64))


def near_pairs(hashes: np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """Index pairs (i, j, distance), i < j, whose 64-bit hashes differ in <= threshold bits."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    out: list[tuple[int, int, int]] = []
    for start in range(0, len(h), BLOCK):
        rows = h[start:start + BLOCK]
        dist = np.bitwise_count(rows[:, None] ^ h[None, start:])  # (B, n - start): only pairs with j >= start
        ii, jj = np.nonzero(dist <= threshold)
        keep = jj > ii  # j index is relative to start too: this drops self and lower-triangle pairs
        for i, j in zip(ii[keep].tolist(), jj[keep].tolist()):
            out.append((start + i, start + j, int(dist[i, j])))
    return out


def find_duplicates(samples: list[Sample], project_root: Path = Path("."),
                    threshold: Optional[int] = None) -> Duplicates:
    """Exact duplicates by sha256, near duplicates by pHash within `threshold` bits (None/0: off)."""
    result = Duplicates(threshold=threshold or None)
    by_sha: dict[str, list[str]] = {}
    for s in sorted(samples, key=lambda s: s.id):
        if s.sha256:
            by_sha.setdefault(s.sha256, []).append(s.id)
    uf = UnionFind(s.id for s in samples)
    for ids in by_sha.values():
        for other in ids[1:]:  # a star to the first copy: k copies give k - 1 pairs
            result.pairs.append(DuplicatePair(ids[0], other, "exact", 0))
            uf.union(ids[0], other)

    if threshold:
        by_id = {s.id: s for s in samples}
        reps = sorted({ids[0] for ids in by_sha.values()} | {s.id for s in samples if not s.sha256})
        hashes = hash_images([by_id[i].image_path(project_root) for i in reps])
        result.unhashed = [i for i, h in zip(reps, hashes) if h is None]
        if result.unhashed:
            log.warning("%d images could not be read for near-duplicate search (first: %s); "
                        "they are matched by sha256 only", len(result.unhashed), result.unhashed[0])
        ok = [(i, h) for i, h in zip(reps, hashes) if h is not None]
        vec = np.array([h for _, h in ok], dtype=np.uint64)
        for i, j, d in near_pairs(vec, threshold):
            a, b = ok[i][0], ok[j][0]
            result.pairs.append(DuplicatePair(min(a, b), max(a, b), "near", d))
            uf.union(a, b)

    result.clusters = [ids for ids in uf.components().values() if len(ids) > 1]
    return result

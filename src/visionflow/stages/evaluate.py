"""Evaluate stage: the branch model on the test split -> metrics, predictions and plots.

classify  accuracy, top-k, per-class precision/recall/F1, confusion matrix
detect    COCO AP/AR (bbox, and segm for Mask R-CNN) with the evaluator's settings, the test
          split and predictions as COCO files, per-class PR curves, a class confusion matrix
segment   mIoU, per-class IoU, Dice, pixel accuracy, pixel confusion matrix, predicted masks
Every task draws a grid of test images with true and predicted labels.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from visionflow.config import EvaluateParams
from visionflow.evaluation import figures
from visionflow.formats.images import load_rgb
from visionflow.io import atomic_path, write_dir, write_json, write_with
from visionflow.manifest import Sample, image_label, read_categories, read_manifest, samples_in_split
from visionflow.paths import Paths
from visionflow.tasks import load_predictor

log = logging.getLogger(__name__)


def evaluate(params: EvaluateParams, paths: Paths) -> dict[str, Any]:
    predictor = load_predictor(paths.model_dir)
    classes = predictor.meta["classes"]
    categories = read_categories(paths.categories)
    if [c.name for c in categories] != classes:
        raise ValueError(f"{paths.model_dir}: model classes {classes} differ from {paths.categories} "
                         f"{[c.name for c in categories]}; re-run train")
    test = samples_in_split(read_manifest(paths.manifest), paths.split_file, "test")
    if not test:
        raise ValueError(f"{paths.split_file}: the test split is empty")
    run = {"classify": _classify, "detect": _detect, "segment": _segment}[predictor.meta["task"]]
    return run(params, paths, predictor, test, categories)


def _predicted(predictor, samples: list[Sample], root: Path, batch_size: int) -> Iterator[tuple[Sample, np.ndarray, dict]]:
    """(sample, RGB image, prediction) in sample order, loading one batch of images at a time."""
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        images = [load_rgb(s.image_path(root)) for s in chunk]
        yield from zip(chunk, images, predictor.predict(images, batch_size=batch_size))


def _grid_pick(n: int, k: int) -> set[int]:
    return set(np.linspace(0, n - 1, num=min(k, n), dtype=int).tolist()) if k and n else set()


# --- classify -----------------------------------------------------------------------------

def _classify(params: EvaluateParams, paths: Paths, predictor, test: list[Sample], categories) -> dict[str, Any]:
    from visionflow.tasks.classify import classification_metrics

    classes = predictor.meta["classes"]
    preds = [p for _, _, p in _predicted(predictor, test, paths.root, params.batch_size)]
    y_true = np.array([image_label(s) for s in test])
    probs = np.array([p["probs"] for p in preds])
    metrics = classification_metrics(y_true, probs, classes, params.top_k)

    with atomic_path(paths.predictions) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for s, p, t in zip(test, preds, y_true):
            fh.write(json.dumps({"id": s.id, "label": p["label"], "name": p["name"], "confidence": p["confidence"],
                                 "probs": p["probs"], "true": int(t)}) + "\n")
    write_json(paths.eval_metrics, {"task": "classify", "primary_metric": "accuracy",
                                    **{k: v for k, v in metrics.items() if k != "confusion_matrix"}})
    # One row per test image: the layout DVC's confusion template expects.
    _write_csv(paths.confusion_csv, ["actual", "predicted"],
               ([classes[t], classes[p]] for t, p in zip(y_true, probs.argmax(1))))
    _write_csv(paths.per_class_csv, ["class", "precision", "recall", "f1", "support"],
               ([n, f"{v['precision']:.6f}", f"{v['recall']:.6f}", f"{v['f1']:.6f}", v["support"]]
                for n, v in metrics["per_class"].items()))

    def draw(out: Path) -> None:
        figures.plot_confusion(np.array(metrics["confusion_matrix"]), classes, classes,
                               f"confusion matrix (test, n={metrics['n']}, accuracy {metrics['accuracy']:.3f})",
                               out / "confusion_matrix.png")
        figures.plot_per_class(metrics["per_class"], ("precision", "recall", "f1"), "per-class metrics (test)",
                               out / "per_class.png")

    write_dir(paths.figures_dir, draw)
    log.info("test accuracy %.4f, top-%d %.4f, macro F1 %.4f on %d images",
             metrics["accuracy"], metrics["k"], metrics["top_k_accuracy"], metrics["macro_f1"], metrics["n"])
    return {"task": "classify", "test_images": metrics["n"], "accuracy": round(metrics["accuracy"], 4),
            "top_k_accuracy": round(metrics["top_k_accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4)}


# --- detect -------------------------------------------------------------------------------

def _detect(params: EvaluateParams, paths: Paths, predictor, test: list[Sample], categories) -> dict[str, Any]:
    from visionflow.evaluation.coco import evaluate_coco
    from visionflow.evaluation.detection import coco_ground_truth, coco_results, match_confusion

    classes = predictor.meta["classes"]
    grid_at = _grid_pick(len(test), params.grid_images)
    preds, grid = [], []
    for i, (s, image, p) in enumerate(_predicted(predictor, test, paths.root, params.batch_size)):
        preds.append(p)
        if i in grid_at:
            shown = [j for j, sc in enumerate(p["scores"]) if sc >= params.score_threshold]
            truth = {"boxes": [inst.bbox for inst in s.instances], "labels": [inst.category_id for inst in s.instances]}
            grid.append((image, truth, {k: [p[k][j] for j in shown] for k in ("boxes", "labels", "scores")}))
    gt, results = coco_ground_truth(test, categories), coco_results(preds)
    bbox = evaluate_coco(gt, results, "bbox", curves=True)
    metrics: dict[str, Any] = {"task": "detect", "primary_metric": "AP50", "n": len(test),
                               "detections": len(results), **_coco_block(bbox)}
    has_masks = bool(preds) and "masks" in preds[0]
    if has_masks:
        metrics["segm"] = _coco_block(evaluate_coco(gt, results, "segm"))
    cm = match_confusion(test, preds, len(classes), params.iou_threshold, params.score_threshold)
    metrics["confusion"] = {"iou_threshold": params.iou_threshold, "score_threshold": params.score_threshold,
                            "labels": [*classes, "(none)"], "matrix": cm.tolist()}

    write_json(paths.coco_gt, gt)
    write_json(paths.coco_results, results)
    with atomic_path(paths.predictions) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for s, p in zip(test, preds):
            fh.write(json.dumps({"id": s.id, **{k: p[k] for k in ("boxes", "labels", "scores", "masks") if k in p}}) + "\n")
    write_json(paths.eval_metrics, metrics)
    recall = bbox["recall_thresholds"]
    _write_csv(paths.pr_curve_csv, ["recall", *classes],
               ([r, *(max(bbox["pr_curves"][c][i], 0.0) for c in classes)] for i, r in enumerate(recall)))
    _write_csv(paths.per_class_csv, ["class", "ap", "ap50"],
               ([c, f"{bbox['per_class'][c]:.6f}", f"{bbox['per_class_ap50'][c]:.6f}"] for c in classes))

    def draw(out: Path) -> None:
        figures.plot_pr_curves(recall, bbox["pr_curves"], bbox["per_class_ap50"], out / "pr_curves.png")
        figures.plot_per_class({c: {"AP": bbox["per_class"][c], "AP50": bbox["per_class_ap50"][c]} for c in classes},
                               ("AP", "AP50"), "per-class AP (test, bbox)", out / "per_class.png")
        labels = [*classes, "(none)"]
        figures.plot_confusion(cm, labels, labels, f"detections at IoU {params.iou_threshold}, score >= "
                               f"{params.score_threshold} (row (none): false positives; column: missed)",
                               out / "confusion_matrix.png")
        figures.detection_grid(grid, classes, out / "test_predictions.png")

    write_dir(paths.figures_dir, draw)
    log.info("test bbox AP %.4f, AP50 %.4f%s on %d images", bbox["AP"], bbox["AP50"],
             f", mask AP {metrics['segm']['AP']:.4f}" if has_masks else "", len(test))
    out = {"task": "detect", "test_images": len(test), "AP": round(bbox["AP"], 4), "AP50": round(bbox["AP50"], 4)}
    if has_masks:
        out["mask_AP"] = round(metrics["segm"]["AP"], 4)
    return out


def _coco_block(stats: dict[str, Any]) -> dict[str, Any]:
    """Our numbers with the reference evaluator's settings (pycocotools COCOeval defaults)."""
    from visionflow.evaluation.coco import STAT_NAMES

    return {**{k: stats[k] for k in STAT_NAMES}, "per_class_AP": stats["per_class"],
            **({"per_class_AP50": stats["per_class_ap50"]} if "per_class_ap50" in stats else {}),
            "evaluator": {"implementation": "visionflow.evaluation.coco (equals pycocotools COCOeval)",
                          "reference": "pycocotools.cocoeval.COCOeval", **stats["settings"]}}


# --- segment ------------------------------------------------------------------------------

def _segment(params: EvaluateParams, paths: Paths, predictor, test: list[Sample], categories) -> dict[str, Any]:
    from PIL import Image

    from visionflow.evaluation.segmentation import ConfusionAccumulator
    from visionflow.formats.masks import semantic_mask

    classes = predictor.meta["classes"]
    names = ["background", *classes]
    acc = ConfusionAccumulator(len(names))
    grid_at = _grid_pick(len(test), params.grid_images)
    grid, records = [], []

    def fill(out: Path) -> None:
        for i, (s, image, p) in enumerate(_predicted(predictor, test, paths.root, params.batch_size)):
            truth = semantic_mask(s)
            acc.update(p["mask"], truth)
            name = f"{i:06d}.png"
            Image.fromarray(p["mask"]).save(out / name)
            records.append({"id": s.id, "mask": f"{paths.pred_masks_dir.name}/{name}",
                            "classes_present": sorted(int(v) for v in np.unique(p["mask"]) if v)})
            if i in grid_at:
                grid.append((image, truth, p["mask"]))

    write_dir(paths.pred_masks_dir, fill)
    m = acc.compute()
    per_class = {n: {"IoU": m["per_class_iou"][k], "Dice": m["per_class_dice"][k]} for k, n in enumerate(names)}
    metrics = {"task": "segment", "primary_metric": "miou", "n": len(test), "classes": names,
               "mask_values": "0 background, c + 1 for category c", "ignore_index": 255,
               **{k: m[k] for k in ("miou", "dice", "pixel_accuracy", "mean_accuracy", "pixels", "confusion_matrix")},
               "per_class": per_class}
    with atomic_path(paths.predictions) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    write_json(paths.eval_metrics, metrics)
    _write_csv(paths.per_class_csv, ["class", "iou", "dice"],
               ([n, _fmt(v["IoU"]), _fmt(v["Dice"])] for n, v in per_class.items()))

    def draw(out: Path) -> None:
        figures.plot_confusion(np.array(m["confusion_matrix"]), names, names,
                               f"pixel confusion (test, mIoU {m['miou'] or 0:.3f})", out / "confusion_matrix.png")
        figures.plot_per_class(per_class, ("IoU", "Dice"), "per-class IoU and Dice (test)", out / "per_class.png")
        figures.segmentation_grid(grid, out / "test_predictions.png")

    write_dir(paths.figures_dir, draw)
    log.info("test mIoU %.4f, Dice %.4f, pixel accuracy %.4f on %d images",
             m["miou"] or 0, m["dice"] or 0, m["pixel_accuracy"] or 0, len(test))
    return {"task": "segment", "test_images": len(test), "miou": round(m["miou"] or 0.0, 4),
            "pixel_accuracy": round(m["pixel_accuracy"] or 0.0, 4)}


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6f}"


def _write_csv(path: Path, header: list[str], rows) -> None:
    def _w(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)

    write_with(path, _w)

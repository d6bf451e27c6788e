"""Detection evaluation inputs from the manifest and a predictor's output.

`coco_ground_truth` and `coco_results` write the test split and the predictions in COCO's own
formats (so `visionflow evaluate coco`, pycocotools or any other tool can re-check the
numbers), and `match_confusion` gives the class confusion matrix of a detector.

Conventions: COCO image ids are 1..N in the order of `samples`; category ids are the ids of
categories.json (0..K-1); boxes are [x, y, w, h] absolute pixels of the original image.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from visionflow.manifest import Category, Sample


def _xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)]


def coco_ground_truth(samples: Sequence[Sample], categories: Sequence[Category]) -> dict[str, Any]:
    images, annotations = [], []
    for image_id, s in enumerate(samples, 1):
        images.append({"id": image_id, "file_name": s.path, "width": s.width, "height": s.height,
                       "visionflow_id": s.id})
        for inst in s.instances:
            x, y, w, h = _xywh(inst.bbox)
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": inst.category_id,
                   "bbox": [x, y, w, h], "iscrowd": int(inst.iscrowd),
                   # COCO's area is the mask area when there is a mask; the box area otherwise.
                   "area": float(inst.area) if inst.area is not None else w * h}
            if inst.rle is not None:
                ann["segmentation"] = inst.rle
            elif inst.polygons:
                ann["segmentation"] = inst.polygons
            annotations.append(ann)
    cats = [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in categories]
    return {"info": {"description": "visionflow test split"}, "images": images,
            "annotations": annotations, "categories": cats}


def coco_results(predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predictions (one dict per image, in sample order; see tasks.base) -> COCO results list."""
    out = []
    for image_id, p in enumerate(predictions, 1):
        masks = p.get("masks")
        for j, (box, label, score) in enumerate(zip(p["boxes"], p["labels"], p["scores"])):
            r = {"image_id": image_id, "category_id": int(label), "bbox": _xywh(box), "score": round(float(score), 5)}
            if masks is not None:
                r["segmentation"] = masks[j]
            out.append(r)
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a (N, 4) and b (M, 4) -> (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def match_confusion(samples: Sequence[Sample], predictions: Sequence[dict[str, Any]], num_classes: int,
                    iou_threshold: float = 0.5, score_threshold: float = 0.3) -> np.ndarray:
    """(K+1, K+1) counts, rows true class, cols predicted; index K is "nothing": row K counts
    false positives, column K missed objects. Detections above `score_threshold` are matched
    greedily by score to the unmatched non-crowd object of highest IoU >= `iou_threshold`,
    whatever its class, so a right box with the wrong class lands off the diagonal."""
    K = num_classes
    cm = np.zeros((K + 1, K + 1), dtype=np.int64)
    for s, p in zip(samples, predictions):
        gts = [i for i in s.instances if not i.iscrowd]
        g_box = np.array([i.bbox for i in gts], dtype=float).reshape(-1, 4)
        g_cls = [i.category_id for i in gts]
        keep = [j for j, sc in enumerate(p["scores"]) if sc >= score_threshold]
        keep.sort(key=lambda j: -p["scores"][j])
        d_box = np.array([p["boxes"][j] for j in keep], dtype=float).reshape(-1, 4)
        ious = _iou(d_box, g_box) if len(d_box) and len(g_box) else np.zeros((len(d_box), len(g_box)))
        taken = np.zeros(len(gts), dtype=bool)
        for row, j in enumerate(keep):
            cand = np.where(~taken & (ious[row] >= iou_threshold), ious[row], -1.0) if len(gts) else np.zeros(0)
            if len(cand) and cand.max() >= 0:
                g = int(cand.argmax())
                taken[g] = True
                cm[g_cls[g], int(p["labels"][j])] += 1
            else:
                cm[K, int(p["labels"][j])] += 1
        for g in np.flatnonzero(~taken):
            cm[g_cls[g], K] += 1
    return cm

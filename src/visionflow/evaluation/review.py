"""Likely label mistakes: each labelled sample's disagreement with the trained model, as a score
in [0, 1] and a reason a person can act on (the review stage, visionflow.stages.review).

These are visionflow's own signals, one per task (Task.review_signal calls them); the review
stage adds FiftyOne Brain's mistakenness and hardness where Brain has them (classification and
detection) and ranks by the larger of the two (integrations/fiftyone.write_review).

classify    1 - p(labelled class): the probability the model puts on other classes ("self
            confidence" in the label-error literature). A label the model contradicts with 0.97
            scores 0.97; one it agrees with at 0.99 scores 0.01.
multilabel  the largest per-class gap |label - p| over the classes: a class the label has but the
            model gives 0.02, or one the label lacks but the model gives 0.95.
detect      missed and spurious boxes: ground-truth boxes no prediction of their class matches
            at IoU >= iou_threshold (weighted by the confidence of the best prediction of any
            class over them, floor 0.5: "nothing found there" is itself a signal), predictions
            >= min_confidence matching no ground truth (weighted by their confidence); score =
            the largest such weight. A wrong class on a right box shows as one missed + one
            spurious box.
segment     1 - the image's IoU between label and prediction, averaged over the classes present
            in either (label 255 and the letterbox padding ignored), with the worst class named.

The scores are in-sample for the split the model was not trained on (test): honest there. On the
train split they understate mistakes (the model has fitted its own labels), which is why the
stage reviews the test split unless told otherwise (docs/review.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

IGNORE = 255


@dataclass
class Signal:
    score: float
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def classify_signal(true: Optional[int], probs: Sequence[float], names: Sequence[str]) -> Signal:
    if true is None or not 0 <= true < len(probs):
        return Signal(0.0, "no image label to check")
    p = np.asarray(probs, dtype=float)
    pred = int(p.argmax())
    score = float(1.0 - p[true])
    if pred != true:
        return Signal(score, f"labelled {names[true]}; the model says {names[pred]} ({p[pred]:.0%}), "
                             f"{names[true]} {p[true]:.0%}", {"predicted": names[pred]})
    return Signal(score, f"labelled {names[true]}; the model agrees ({p[true]:.0%})", {"predicted": names[pred]})


def multilabel_signal(true: Sequence[int], probs: Sequence[float], names: Sequence[str]) -> Signal:
    p = np.asarray(probs, dtype=float)
    t = np.zeros_like(p)
    t[[c for c in true if 0 <= c < len(p)]] = 1.0
    gap = np.abs(t - p)
    if not len(gap):
        return Signal(0.0, "no classes")
    worst = int(gap.argmax())
    if t[worst]:
        reason = f"labelled {names[worst]}; the model gives it {p[worst]:.0%}"
    else:
        reason = f"not labelled {names[worst]}; the model gives it {p[worst]:.0%}"
    return Signal(float(gap[worst]), reason, {"class": names[worst]})


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes a (N, 4) against b (M, 4) -> (N, M)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def detect_signal(gt_boxes: Sequence[Sequence[float]], gt_labels: Sequence[int], boxes: Sequence[Sequence[float]],
                  labels: Sequence[int], scores: Sequence[float], names: Sequence[str],
                  iou_threshold: float = 0.5, min_confidence: float = 0.3) -> Signal:
    gt = np.asarray(gt_boxes, dtype=float).reshape(-1, 4)
    keep = [j for j, s in enumerate(scores) if s >= min_confidence]
    pr = np.asarray([boxes[j] for j in keep], dtype=float).reshape(-1, 4)
    pl = [int(labels[j]) for j in keep]
    ps = [float(scores[j]) for j in keep]
    iou = box_iou(gt, pr)
    matched_gt: set[int] = set()
    matched_pr: set[int] = set()
    for j in sorted(range(len(pr)), key=lambda j: -ps[j]):  # greedy, most confident first (as COCO)
        cands = [i for i in range(len(gt)) if i not in matched_gt and gt_labels[i] == pl[j]
                 and iou[i, j] >= iou_threshold]
        if cands:
            i = max(cands, key=lambda i: iou[i, j])
            matched_gt.add(i)
            matched_pr.add(j)
    missed = []
    for i in range(len(gt)):
        if i in matched_gt:
            continue
        over = [j for j in range(len(pr)) if iou[i, j] >= iou_threshold]
        weight = max([0.5, *(ps[j] for j in over)])
        other = max(over, key=lambda j: ps[j]) if over else None
        missed.append((weight, names[gt_labels[i]], None if other is None else names[pl[other]]))
    spurious = [(ps[j], names[pl[j]]) for j in range(len(pr)) if j not in matched_pr]
    if not missed and not spurious:
        return Signal(0.0, f"{len(gt)} labelled boxes, each found by the model", {"missed": 0, "spurious": 0})
    parts = []
    if missed:
        said = [f"{n} (model: {o})" if o else n for _, n, o in sorted(missed, reverse=True)[:3]]
        parts.append(f"{len(missed)} labelled box(es) the model does not find: {', '.join(said)}")
    if spurious:
        said = [f"{n} {s:.0%}" for s, n in sorted(spurious, reverse=True)[:3]]
        parts.append(f"{len(spurious)} confident prediction(s) with no label: {', '.join(said)}")
    score = max([w for w, _, _ in missed] + [s for s, _ in spurious])
    return Signal(float(score), "; ".join(parts), {"missed": len(missed), "spurious": len(spurious)})


def segment_signal(true: np.ndarray, pred: np.ndarray, names: Sequence[str]) -> Signal:
    """`true`, `pred`: (H, W) 0 background, c + 1 for category c; IGNORE in `true` not counted."""
    if true.shape != pred.shape:
        raise ValueError(f"label mask {true.shape} and predicted mask {pred.shape} differ in size")
    valid = true != IGNORE
    t, p = true[valid], pred[valid]
    ious = {}
    for c in sorted(set(np.unique(t).tolist()) | set(np.unique(p).tolist())):
        if c == 0:
            continue
        inter = int(np.count_nonzero((t == c) & (p == c)))
        union = int(np.count_nonzero((t == c) | (p == c)))
        ious[c] = inter / union if union else 1.0
    if not ious:
        return Signal(0.0, "background only, in label and prediction", {"miou": 1.0})
    miou = float(np.mean(list(ious.values())))
    worst = min(ious, key=ious.get)
    name = names[worst - 1] if 0 < worst <= len(names) else f"class {worst - 1}"
    where = ("labelled, not predicted" if not np.any(p == worst) else
             "predicted, not labelled" if not np.any(t == worst) else f"IoU {ious[worst]:.2f}")
    return Signal(1.0 - miou, f"image IoU {miou:.2f}; worst: {name} ({where})", {"miou": miou, "worst": name})


def ranked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Highest score first; ties by sample id, so the order is the same every run."""
    return sorted(rows, key=lambda r: (-r["score"], r["id"]))


# --- embeddings: what the model "sees" in each image, for FiftyOne's 2-D map ---------------------

class EmbeddingRecorder:
    """Records a vector per image while a model predicts, at no extra forward pass: a hook on the
    task's embedding module (Task.embedding_module) keeps its input (a classifier head's input,
    the pooled features) or its output (a detector's backbone, a segmenter's deepest block),
    averaged over space when it is a feature map; a dict of maps (FPN levels) gives its last,
    coarsest one."""

    def __init__(self, module, take_input: bool):
        self.rows: list[np.ndarray] = []
        self._take_input = take_input
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        x = inputs[0] if self._take_input else output
        if isinstance(x, dict):
            x = list(x.values())[-1]
        if x.ndim == 4:
            x = x.mean(dim=(2, 3))
        self.rows.append(x.detach().float().flatten(1).cpu().numpy())

    def close(self) -> np.ndarray:
        self._handle.remove()
        return np.concatenate(self.rows) if self.rows else np.zeros((0, 0), dtype=np.float32)


def write_embeddings(path, ids: Sequence[str], vectors: np.ndarray) -> None:
    """`ids` and their vectors (float16: a 512-d vector is 1 KB) as one .npz, written atomically."""
    from visionflow.core.files import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, ids=np.asarray(list(ids)), vectors=vectors.astype(np.float16))


def read_embeddings(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {str(i): v.astype(np.float32) for i, v in zip(z["ids"], z["vectors"])}

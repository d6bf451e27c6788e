"""Semantic-segmentation metrics from one accumulated confusion matrix.

Masks are integer class ids, (H, W) or (B, H, W), numpy arrays or torch tensors. Pixels whose
target is `ignore_index` do not count. Everything (IoU, Dice, accuracies) is derived from a
K x K int64 matrix (rows = true class, cols = predicted class), so evaluation can run batch by
batch, and across processes with `merge`, without keeping any mask.

Conventions (those of torchmetrics / mmseg):
- a class is *present* when its union (TP + FP + FN) is > 0, i.e. it occurs in the target or
  in the prediction on a valid pixel; "miou" and "dice" average over present classes only, so
  a class absent from the evaluation data neither scores 0 nor 1 (a class that is only
  predicted scores 0 and does count);
- "mean_accuracy" averages per-class recall over classes present in the target;
- an undefined value (absent class, or nothing valid at all: pixels == 0) is None, not NaN,
  because the result goes to JSON; per_class_* lists are indexed by class id.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _to_numpy(x: Any) -> np.ndarray:
    # Torch is not imported here: a tensor is recognised by duck typing, which keeps this
    # module usable (and cheap to import) without torch.
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
    return [float(n / d) if d > 0 else None for n, d in zip(num, den)]


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


class ConfusionAccumulator:
    """Accumulates a (K, K) confusion matrix over batches of masks; `compute` gives the metrics."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """pred, target: integer class ids of the same shape, (H, W) or (B, H, W)."""
        pred, target = _to_numpy(pred), _to_numpy(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
        if pred.ndim not in (2, 3):
            raise ValueError(f"masks must be (H, W) or (B, H, W), got shape {pred.shape}")
        for name, a in (("pred", pred), ("target", target)):
            if a.dtype.kind not in "iu":
                raise ValueError(f"{name} must hold integer class ids, got dtype {a.dtype}")
        k = self.num_classes
        # Out-of-range predictions are checked on every pixel, ignored ones included: they mean
        # a wrong num_classes or a broken postprocess, and bincount would silently mis-bin them.
        bad = (pred < 0) | (pred >= k)
        if bad.any():
            raise ValueError(f"predictions outside [0, {k}): {np.unique(pred[bad])[:10].tolist()}")
        valid = target != self.ignore_index
        t, p = target[valid].astype(np.int64), pred[valid].astype(np.int64)
        bad = (t < 0) | (t >= k)
        if bad.any():
            raise ValueError(
                f"target ids outside [0, {k}) and not ignore_index={self.ignore_index}: "
                f"{np.unique(t[bad])[:10].tolist()}"
            )
        # One pass over the pixels: pair (t, p) -> flat bin t * K + p.
        self.matrix += np.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def merge(self, other: ConfusionAccumulator) -> ConfusionAccumulator:
        """Adds another accumulator's counts (e.g. gathered from another process); returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge accumulators with (num_classes, ignore_index) "
                f"{(other.num_classes, other.ignore_index)} into {(self.num_classes, self.ignore_index)}"
            )
        self.matrix += other.matrix
        return self

    def reset(self) -> None:
        self.matrix[:] = 0

    def compute(self) -> dict[str, Any]:
        cm = self.matrix
        tp = np.diag(cm)
        support = cm.sum(axis=1)  # TP + FN: pixels of the class in the target
        predicted = cm.sum(axis=0)  # TP + FP
        union = support + predicted - tp  # TP + FP + FN; 0 <=> class absent from both
        iou = _ratio(tp, union)
        dice = _ratio(2 * tp, support + predicted)  # same zero set as union
        recall = _ratio(tp, support)  # None for classes not in the target
        pixels = int(cm.sum())
        return {
            "miou": _mean(iou),
            "per_class_iou": iou,
            "dice": _mean(dice),
            "per_class_dice": dice,
            "pixel_accuracy": float(tp.sum() / pixels) if pixels else None,
            "mean_accuracy": _mean(recall),
            "confusion_matrix": cm.tolist(),
            "pixels": pixels,
        }

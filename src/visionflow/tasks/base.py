"""The task contract: classify, detect and segment each provide these pieces and the one
engine (visionflow.engine) trains and evaluates them all.

Data crossing the boundary (category ids index `categories.json`, 0..K-1):
    images   Tensor (B, 3, H, W) float on the engine's device: normalised for classify and
             segment; in [0, 1] for detect (torchvision detectors normalise inside)
    targets  classify: (B,) int64 class ids
             detect:   list of B dicts {"boxes": (N, 4) float xyxy absolute pixels of the
                       resized image, "labels": (N,) int64 in 1..K (0 is the detectors'
                       background), "masks": (N, H, W) uint8 (Mask R-CNN only)}
             segment:  (B, H, W) int64, 0 background, c + 1 for category c, 255 ignored
Predictions (Task.predict), in each input image's own pixel coordinates:
    classify {"label": int, "confidence": float, "probs": [float] * K}
    detect   {"boxes": [[x1, y1, x2, y2]], "labels": [int 0..K-1], "scores": [float],
              "masks": [COCO RLE] (Mask R-CNN only)}
    segment  {"mask": (H, W) uint8 ndarray, 0 background, c + 1 for category c}
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import albumentations as A
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from visionflow.config import TrainParams
from visionflow.manifest import Sample

IGNORE_INDEX = 255  # segment targets: pixels that count for neither loss nor metrics


class TaskBase:
    """What every task is built with (visionflow.tasks.get_task): the TrainParams it trains with,
    where its loss has settings (segment: dice_weight); None when it only predicts."""

    def __init__(self, params: Optional[TrainParams] = None):
        self.params = params


class Task(Protocol):
    name: str
    primary_metric: str  # the validation metric early stopping watches by default (e.g. val_map50)

    def build_model(self, params: TrainParams, num_classes: int, pretrained: bool = True) -> nn.Module:
        """`pretrained=False` rebuilds the architecture only (to load trained weights into)."""

    def build_transforms(self, params: TrainParams) -> tuple[A.Compose, A.Compose]:
        """(train, eval) Albumentations pipelines; train is serialised to MLflow."""

    def build_dataset(self, samples: Sequence[Sample], transform: A.Compose, project_root) -> Dataset: ...

    def collate(self, batch: list) -> tuple[torch.Tensor, Any]: ...

    def loss(self, model: nn.Module, images: torch.Tensor, targets: Any) -> dict[str, torch.Tensor]:
        """Named losses (model in train mode); the engine sums them and logs each."""

    def val_metrics(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        """Validation metrics for early stopping, keys prefixed `val_`."""

    def predict(self, model: nn.Module, images: list[np.ndarray], transform: A.Compose,
                device: torch.device) -> list[dict[str, Any]]:
        """RGB uint8 (H, W, 3) images of any size -> one prediction per image (see above)."""


class Predictor(Protocol):
    meta: dict[str, Any]

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """RGB uint8 (H, W, 3) images -> one prediction dict per image."""

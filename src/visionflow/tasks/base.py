"""The task contract: classify, detect and segment each provide these pieces and the one
engine (visionflow.engine) trains and evaluates them all.

Data crossing the boundary:
    images   Tensor (B, 3, H, W) float, normalised, on the engine's device
    targets  task-specific: (B,) int64 class ids for classification; a list of dicts
             {"boxes": (N, 4) xyxy absolute, "labels": (N,), "masks": (N, H, W)} for dense tasks
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from visionflow.config import TrainParams
from visionflow.manifest import Sample


class Task(Protocol):
    name: str

    def build_model(self, params: TrainParams, num_classes: int) -> nn.Module: ...

    def build_dataset(self, samples: Sequence[Sample], transform: Any, project_root) -> Dataset: ...

    def collate(self, batch: list) -> tuple[torch.Tensor, Any]: ...

    def loss(self, model: nn.Module, images: torch.Tensor, targets: Any) -> dict[str, torch.Tensor]:
        """Named losses; the engine sums them and logs each."""

    def postprocess(self, outputs: Any) -> list[dict[str, Any]]:
        """Model outputs -> one prediction dict per image (JSON-serialisable)."""

    def val_metrics(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        """Validation metrics used for early stopping (prefixed `val_` by the task)."""


class Predictor(Protocol):
    meta: dict[str, Any]

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """RGB uint8 (H, W, 3) images -> one prediction dict per image."""

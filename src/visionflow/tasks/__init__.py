"""Task registry and the predictor that travels with a trained model directory.

A model directory (paths.model_dir) holds:
    model.pt      state_dict (load with weights_only=True)
    meta.json     {"task", "arch", "num_classes", "classes", "image_size", "mean", "std", "params"}
    augment.json  the training Albumentations pipeline (albumentations.to_dict)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionflow.io import read_json

MODEL_FILE, META_FILE, AUGMENT_FILE = "model.pt", "meta.json", "augment.json"


_TASKS = {
    "classify": "visionflow.tasks.classify:ClassifyTask",
    "detect": "visionflow.tasks.detect:DetectTask",
    "segment": "visionflow.tasks.segment:SegmentTask",
}


def get_task(name: str, params=None):
    """The task `name`; `params` (its TrainParams) configures its loss where it has settings."""
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; tasks are {', '.join(_TASKS)}")
    import importlib

    module, _, cls = _TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(params)


class ModelPredictor:
    """A trained model directory as a predictor: pre-processing (resize, normalisation) and
    post-processing travel with the weights, so callers pass plain RGB images of any size."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from visionflow.config import TrainParams

        model_dir = Path(model_dir)
        self.meta: dict[str, Any] = read_json(model_dir / META_FILE)
        self.task = get_task(self.meta["task"])
        self.device = torch.device(device)
        # Models trained before task branches carry the task inside their params: it moved to meta.
        legacy = {k: v for k, v in self.meta["params"].items() if k != "task"}
        train_params = TrainParams.model_validate(legacy)
        self.model = self.task.build_model(train_params, self.meta["num_classes"], pretrained=False)
        self.model.load_state_dict(torch.load(model_dir / MODEL_FILE, map_location="cpu", weights_only=True))
        self.model.eval().to(self.device)
        self.transform = self.task.build_transforms(train_params)[1]

    @torch.no_grad()
    def predict(self, images: list[np.ndarray], batch_size: int = 32) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(0, len(images), batch_size):
            batch = [as_rgb(im) for im in images[i:i + batch_size]]
            out += self.task.predict(self.model, batch, self.transform, self.device)
        classes = self.meta["classes"]
        for pred in out:  # names next to ids, for people reading the output
            if "label" in pred:
                pred["name"] = classes[pred["label"]]
            if "labels" in pred:
                pred["names"] = [classes[k] for k in pred["labels"]]
        return out


def as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images, got {image.dtype}")
    return np.ascontiguousarray(image)


def load_predictor(model_dir: str | Path, device: str = "cpu") -> ModelPredictor:
    return ModelPredictor(model_dir, device)

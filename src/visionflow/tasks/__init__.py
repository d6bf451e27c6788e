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


def get_task(name: str):
    if name == "classify":
        from visionflow.tasks.classify import ClassifyTask

        return ClassifyTask()
    raise KeyError(f"unknown task {name!r}")


class ClassifierPredictor:
    """Pre-processing (resize, normalisation) and post-processing bundled with the weights,
    so callers pass plain RGB images."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from visionflow.augment import build_eval_transform
        from visionflow.models import build_classifier

        model_dir = Path(model_dir)
        self.meta: dict[str, Any] = read_json(model_dir / META_FILE)
        self.task = get_task(self.meta["task"])
        self.device = torch.device(device)
        self.model = build_classifier(self.meta["arch"], self.meta["num_classes"], weights=None)
        self.model.load_state_dict(torch.load(model_dir / MODEL_FILE, map_location="cpu", weights_only=True))
        self.model.eval().to(self.device)
        self.transform = build_eval_transform(self.meta["image_size"], self.meta["mean"], self.meta["std"])

    @torch.no_grad()
    def predict(self, images: list[np.ndarray], batch_size: int = 64) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(0, len(images), batch_size):
            batch = [self.transform(image=_as_rgb(im))["image"].transpose(2, 0, 1) for im in images[i:i + batch_size]]
            logits = self.model(torch.from_numpy(np.stack(batch)).to(self.device))
            for pred in self.task.postprocess(logits):
                pred["name"] = self.meta["classes"][pred["label"]]
                out.append(pred)
        return out


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images, got {image.dtype}")
    return np.ascontiguousarray(image)


def load_predictor(model_dir: str | Path, device: str = "cpu") -> ClassifierPredictor:
    meta = read_json(Path(model_dir) / META_FILE)
    if meta["task"] == "classify":
        return ClassifierPredictor(model_dir, device)
    raise KeyError(f"no predictor for task {meta['task']!r}")

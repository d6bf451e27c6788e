"""A trained model folder as a predictor: the weights with their pre- and post-processing.

A model folder (paths.model_dir) holds:
    model.pt      state_dict (load with weights_only=True)
    meta.json     {"task", "arch", "num_classes", "classes", "image_size", "mean", "std", "params"}
    augment.json  the training Albumentations pipeline (albumentations.to_dict)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from visionflow.core.files import read_json
from visionflow.deploy.references import META_FILE, MODEL_FILE  # noqa: F401  (the model folder's names)
from visionflow.tasks import get_task

AUGMENT_FILE = "augment.json"


class ModelPredictor:
    """A trained model directory as a predictor: pre-processing (resize, normalisation) and
    post-processing travel with the weights, so callers pass plain RGB images of any size."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from visionflow.core.config import TrainParams

        model_dir = Path(model_dir)
        self.meta: dict[str, Any] = read_json(model_dir / META_FILE)
        self.task = get_task(self.meta["task"])
        self.device = torch.device(device)
        # Models trained before task branches carry the task inside their params: it moved to meta.
        legacy = {k: v for k, v in self.meta["params"].items() if k != "task"}
        # Models trained before train.resize existed were trained stretched (tasks.base.resize_of).
        legacy.setdefault("resize", "stretch")
        train_params = TrainParams.model_validate(legacy)
        self.model = self.task.build_model(train_params, self.meta["num_classes"], pretrained=False)
        self.model.load_state_dict(torch.load(model_dir / MODEL_FILE, map_location="cpu", weights_only=True))
        self.model.eval().to(self.device)
        self.transform = self.task.build_transforms(train_params)[1]
        self.resize = train_params.resize
        self.task.configure(self.meta)  # settings the train stage chose (multilabel: per-class thresholds)
        self.fit = reader_fit(self.meta)  # JPEGs reduced as in training (train.decode), or None

    def read(self, path: str | Path) -> np.ndarray:
        """An image file as the model was trained on it: load_rgb, JPEGs reduced under its train.decode."""
        from visionflow.manifest.images import load_rgb

        return load_rgb(path, self.fit)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray], batch_size: int = 32) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in images]
        for chunk in self.batches(images, batch_size):
            batch = [as_rgb(images[i]) for i in chunk]
            for i, pred in zip(chunk, self.task.predict(self.model, batch, self.transform, self.device)):
                out[i] = pred
        classes = self.meta["classes"]
        for pred in out:  # names next to ids, for people reading the output
            if "label" in pred:
                pred["name"] = classes[pred["label"]]
            if "labels" in pred:
                pred["names"] = [classes[k] for k in pred["labels"]]
        return out

    def batches(self, images: Sequence[np.ndarray], batch_size: int) -> list[list[int]]:
        """The images' indices in batches, in order. Under resize: fit a batch is padded to its
        largest image, so landscape and portrait images go in batches of their own (as the
        train loader groups them); predictions come back in the images' order either way."""
        from visionflow.training.loader import orientation_batches

        if self.resize != "fit":
            return [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]
        return orientation_batches([np.shape(im)[1] >= np.shape(im)[0] for im in images], batch_size)

    def score(self, samples: Sequence, root: Path, categories: Sequence, settings: Any = None,
              batch_size: int = 32, each: Optional[Callable[[list, list[np.ndarray], list[dict]], None]] = None):
        """The task's test metric (TestScore) of this model on labelled manifest samples, images
        loaded one batch at a time; `each(samples, images, predictions)` sees every batch (the
        evaluate stage writes predictions and picks grid images there). The one scoring path of
        the evaluate stage and the promotion gate."""
        metric = self.task.test_metric(categories, settings)
        for i in range(0, len(samples), batch_size):
            chunk = list(samples[i:i + batch_size])
            images = [self.read(s.image_path(root)) for s in chunk]
            preds = self.predict(images, batch_size=batch_size)
            metric.process(chunk, preds)
            if each is not None:
                each(chunk, images, preds)
        return metric.compute()


def as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images, got {image.dtype}")
    return np.ascontiguousarray(image)


def decode_of(meta: dict[str, Any]) -> str:
    """How a model's readers decode its JPEGs: "reduced" (train.decode: reduced, for a task that
    reduces: classify, multilabel) or "full". Model folders trained before train.decode existed
    were trained on full decodes."""
    from visionflow.tasks import task_of

    return get_task(task_of(meta)).decode_for((meta.get("params") or {}).get("decode", "full"))


def reader_fit(meta: dict[str, Any]):
    """manifest.images.load_rgb's `fit` for a model (its meta.json): every reader of the model
    (evaluate, predict, serve, the pyfunc, the promotion gate) decodes as its training did."""
    from visionflow.tasks import task_of
    from visionflow.training.augment import decode_fit, resize_steps

    if decode_of(meta) != "reduced":
        return None
    steps = resize_steps(int(meta["image_size"]), get_task(task_of(meta)).input_resize(meta))
    return decode_fit(steps, "reduced")


def load_predictor(model_dir: str | Path, device: str = "cpu") -> ModelPredictor:
    return ModelPredictor(model_dir, device)

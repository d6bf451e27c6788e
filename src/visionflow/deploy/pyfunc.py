"""What the registered MLflow model does, free of MLflow (visionflow.integrations.mlflow wraps it).

The served model takes a DataFrame with one column, `image`, each cell one image:
base64 text of PNG/JPEG bytes (what a JSON request to `mlflow models serve` carries),
raw PNG/JPEG bytes, or an RGB uint8 numpy array (H, W, 3) for in-process callers.
It returns one row per image, with the task's columns (Task.pyfunc_columns, Task.frame_columns):

    classify  label (int class id), name (class name), confidence (softmax probability)
    detect    boxes (JSON [[x1, y1, x2, y2], ...] absolute pixels of the input image), labels
              (JSON [int]), names (JSON [str]), scores (JSON [float]); Mask R-CNN adds masks
              (JSON [COCO RLE], {"size": [h, w], "counts": str})
    segment   mask_png (base64 PNG, (H, W) uint8 class values at the input's size: 0
              background, c + 1 for class c), classes_present (JSON [int] values present)

Preprocessing (resize, normalisation) is the Predictor's, loaded from the model folder, so
it travels with the model.
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from visionflow.manifest.images import decode_mask, encode_image  # noqa: F401  (part of this module's API)

INPUT_COLUMN = "image"

_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG


def decode_image(value: Any, fit=None) -> np.ndarray:
    """One cell of the `image` column -> RGB uint8 (H, W, 3); encoded JPEGs reduced under `fit`
    (the predictor's: as the model was trained). Arrays pass as they are."""
    if isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
        return np.ascontiguousarray(arr[..., :3])
    if isinstance(value, str):
        value = value.encode("ascii")
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"an image cell must be base64 text, bytes or a uint8 array, got {type(value).__name__}")
    data = bytes(value)
    if not data.startswith(_MAGIC):
        try:
            data = base64.b64decode(data, validate=False)
        except binascii.Error as exc:
            raise ValueError(f"image cell is neither PNG/JPEG bytes nor base64 text: {exc}") from exc
    from visionflow.manifest.images import image_rgb

    with Image.open(io.BytesIO(data)) as im:  # as `predict` reads files: EXIF orientation applied,
        return image_rgb(im, lambda: np.frombuffer(data, dtype=np.uint8), fit)  # JPEGs reduced as trained


def predict_frame(predictor, frame: pd.DataFrame) -> pd.DataFrame:
    """Apply `predictor` (visionflow.deploy.predictor.ModelPredictor) to the `image` column of `frame`."""
    if INPUT_COLUMN not in frame.columns:
        raise ValueError(f"input needs a column {INPUT_COLUMN!r}, got columns {list(frame.columns)}")
    images = [decode_image(v, getattr(predictor, "fit", None)) for v in frame[INPUT_COLUMN].tolist()]
    preds = predictor.predict(images) if images else []
    columns = predictor.task.frame_columns(preds)  # the task's output columns, in its order
    return pd.DataFrame({name: pd.Series(values, dtype=dtype) for name, (values, dtype) in columns.items()})


def example_frame(meta: dict[str, Any]) -> pd.DataFrame:
    """A one-row input example: a mid-grey image of the model's input size, as base64 PNG."""
    size = int(meta.get("image_size", 64))
    return pd.DataFrame({INPUT_COLUMN: [encode_image(np.full((size, size, 3), 128, dtype=np.uint8))]})


class VisionModel:
    """Loads the Predictor from a model folder (models/<task>/) and predicts DataFrames."""

    def __init__(self) -> None:
        self.predictor = None

    def load(self, model_dir: str | Path) -> None:
        from visionflow.deploy.predictor import load_predictor

        self.predictor = load_predictor(Path(model_dir))

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        if self.predictor is None:
            raise RuntimeError("model not loaded; call load(model_dir) first")
        return predict_frame(self.predictor, frame)

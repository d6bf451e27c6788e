"""Albumentations pipelines from params: a named preset or an explicit list.

The resolved pipeline is serialized with Albumentations' own `to_dict` (logged to MLflow)
and can be rebuilt with `from_dict` to give identical outputs.

Every pipeline starts with its resize steps (`resize_steps`), one of
    stretch    A.Resize(S, S): each side to S, the aspect ratio not kept
    letterbox  A.LongestMaxSize(S) + A.PadIfNeeded(S, S) centred: the longest side to S, the
               aspect ratio kept, the rest of the S x S canvas filled with 0 (masks: `mask_fill`)
`input_frame` says where an image of a given size lands in the S x S input, read from those
steps, so predictions go back to each input's own pixels with the very geometry used (boxes
`Frame.to_image`, dense outputs `Frame.crop` then a resize to the image's size).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import albumentations as A
import cv2
import numpy as np

from visionflow.core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Geometric and photometric transforms that keep a shape's class (no crops that could cut
# the main object out of the frame).
PRESETS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "light": [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5},
    ],
    "medium": [
        {"name": "HorizontalFlip", "p": 0.5},
        {"name": "VerticalFlip", "p": 0.5},
        {"name": "Affine", "scale": (0.85, 1.15), "rotate": (-20, 20), "translate_percent": (-0.05, 0.05), "p": 0.7},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.25, "contrast_limit": 0.25, "p": 0.5},
        {"name": "HueSaturationValue", "p": 0.3},
        {"name": "GaussNoise", "p": 0.2},
    ],
}


def _build_one(spec: dict[str, Any]) -> A.BasicTransform:
    spec = dict(spec)
    name = spec.pop("name", None)
    cls = getattr(A, name, None) if isinstance(name, str) else None
    if cls is None:
        raise UserError(f"train.augment.transforms: unknown Albumentations transform {name!r}")
    # Albumentations only warns about unknown arguments; a typo in params must not pass silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        try:
            return cls(**spec)
        except (TypeError, ValueError, UserWarning) as exc:
            raise UserError(f"train.augment.transforms: {name}: {exc}") from None


def _compose(steps: list, boxes: bool, min_area: float, min_visibility: float) -> A.Compose:
    if not boxes:
        return A.Compose(steps)
    # Boxes move with the image; boxes that end up too small or mostly outside the frame are
    # dropped together with their `labels` and `instance_ids` (which index the instance masks).
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels", "instance_ids"],
                               min_area=min_area, min_visibility=min_visibility, clip=True)
    return A.Compose(steps, bbox_params=bbox_params)


def build_train_transform(preset: str, transforms: Optional[list[dict[str, Any]]], image_size: int, *,
                          normalize: bool = True, boxes: bool = False, min_area: float = 0.0,
                          min_visibility: float = 0.0, resize: ResizeMode = "stretch", mask_fill: int = 0) -> A.Compose:
    """Resize to image_size x image_size (`resize_steps`), the preset or explicit transforms,
    then normalise (ImageNet mean/std) or, with normalize=False, scale to [0, 1] (detectors
    normalise inside). Masks passed as `mask=`/`masks=` move with the image (letterbox padding
    gets `mask_fill`); with boxes=True, `bboxes=` (xyxy absolute), `labels=` and `instance_ids=` do too."""
    specs = transforms if transforms is not None else PRESETS[preset]
    steps = [*resize_steps(image_size, resize, mask_fill), *(_build_one(s) for s in specs), _normalize(normalize)]
    return _compose(steps, boxes, min_area, min_visibility)


def build_eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, normalize: bool = True,
                         boxes: bool = False, resize: ResizeMode = "stretch", mask_fill: int = 0) -> A.Compose:
    norm = A.Normalize(mean, std) if normalize else _normalize(False)
    return _compose([*resize_steps(image_size, resize, mask_fill), norm], boxes, 0.0, 0.0)


# --- the resize steps and where an image lands in the model input ---------------------------

ResizeMode = Literal["letterbox", "stretch", "fit"]
RESIZE_MODES = ("letterbox", "stretch", "fit")


def resize_steps(image_size: int, resize: ResizeMode = "stretch", mask_fill: int = 0) -> list[A.BasicTransform]:
    """The deterministic steps that bring an image of any size to image_size x image_size
    (fit: to its longest side image_size, unpadded; `batch_chw` and the loader's
    `stack(pad=True)` pad each batch to its largest image)."""
    if resize == "stretch":
        return [A.Resize(image_size, image_size)]
    if resize == "fit":
        return [A.LongestMaxSize(max_size=image_size)]
    if resize == "letterbox":
        return [A.LongestMaxSize(max_size=image_size),
                A.PadIfNeeded(min_height=image_size, min_width=image_size, position="center",
                              border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=mask_fill)]
    raise UserError(f"train.resize: {resize!r} is not one of {', '.join(RESIZE_MODES)}")


def batch_chw(images: Sequence[np.ndarray]) -> np.ndarray:
    """(H, W, C) images -> one (B, C, H, W) array. Images of different sizes (resize: fit) are
    placed top-left in a batch as high and as wide as the largest, the rest 0 (the loader's
    `stack(pad=True)` pads training batches the same way), so their frames need no offset."""
    h, w = max(im.shape[0] for im in images), max(im.shape[1] for im in images)
    if all(im.shape[:2] == (h, w) for im in images):
        return np.stack([im.transpose(2, 0, 1) for im in images])
    out = np.zeros((len(images), images[0].shape[2], h, w), images[0].dtype)
    for o, im in zip(out, images):
        o[:, :im.shape[0], :im.shape[1]] = im.transpose(2, 0, 1)
    return out


@dataclass(frozen=True)
class Frame:
    """Where an image of height x width lands in the model input: its pixels fill rows
    top .. top + rows and columns left .. left + cols (the rest is padding)."""
    height: int
    width: int
    top: int
    left: int
    rows: int
    cols: int

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) xyxy in model-input pixels -> the image's pixels, clipped to the image."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
        b[:, 0::2] = ((b[:, 0::2] - self.left) * (self.width / self.cols)).clip(0, self.width)
        b[:, 1::2] = ((b[:, 1::2] - self.top) * (self.height / self.rows)).clip(0, self.height)
        return b

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) xyxy in the image's pixels -> model-input pixels (the inverse of to_image)."""
        b = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
        b[:, 0::2] = b[:, 0::2] * (self.cols / self.width) + self.left
        b[:, 1::2] = b[:, 1::2] * (self.rows / self.height) + self.top
        return b

    def crop(self, dense):
        """(..., S, S) array or tensor of the model input's size -> (..., rows, cols): the image's part."""
        return dense[..., self.top:self.top + self.rows, self.left:self.left + self.cols]


def input_frame(transform: A.Compose | Sequence[A.BasicTransform], height: int, width: int) -> Frame:
    """The Frame of a height x width image through a pipeline's leading resize/pad steps
    (Albumentations' own size and padding arithmetic: round(side * scale), centred padding
    int(missing / 2) before)."""
    steps = transform.transforms if isinstance(transform, A.Compose) else transform
    h, w, top, left, rows, cols = height, width, 0, 0, height, width
    for step in steps:
        if isinstance(step, A.Resize):
            h, w, rows, cols = step.height, step.width, step.height, step.width
        elif isinstance(step, A.LongestMaxSize) and isinstance(step.max_size, int):
            scale = step.max_size / max(h, w)
            h, w = max(1, round(h * scale)), max(1, round(w * scale))
            rows, cols = h, w
        elif isinstance(step, A.PadIfNeeded) and getattr(step, "position", "center") == "center":
            ph, pw = max(0, (step.min_height or 0) - h), max(0, (step.min_width or 0) - w)
            top, left = top + int(ph / 2.0), left + int(pw / 2.0)
            h, w = h + ph, w + pw
        else:
            break
    return Frame(height, width, top, left, rows, cols)


DecodeMode = Literal["reduced", "full"]
DECODE_MODES = ("reduced", "full")


class DecodeFit:
    """What a reduced JPEG decode must not go below (manifest.images.load_rgb's `fit`): the
    (rows, cols) a height x width image fills in the model input through the pipeline's leading
    resize steps (`input_frame`). Picklable, for loader workers."""

    def __init__(self, transform: A.Compose | Sequence[A.BasicTransform]):
        steps = transform.transforms if isinstance(transform, A.Compose) else transform
        self.steps = list(steps)

    def __call__(self, height: int, width: int) -> tuple[int, int]:
        frame = input_frame(self.steps, height, width)
        return frame.rows, frame.cols


def decode_fit(transform, decode: DecodeMode) -> Optional[DecodeFit]:
    """load_rgb's `fit` for a pipeline: a DecodeFit with decode: reduced and a pipeline that starts
    with a resize; None (every image decoded in full) otherwise. Which tasks reduce at all is the
    task's `reduces_decode` (TaskBase.decode_mode, deploy.predictor.decode_of)."""
    if decode not in DECODE_MODES:
        raise UserError(f"train.decode: {decode!r} is not one of {', '.join(DECODE_MODES)}")
    if decode != "reduced" or transform is None:
        return None
    steps = transform.transforms if isinstance(transform, A.Compose) else transform
    if not steps or not isinstance(steps[0], (A.Resize, A.LongestMaxSize)):
        return None
    return DecodeFit(transform)


def _normalize(imagenet: bool) -> A.BasicTransform:
    if imagenet:
        return A.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return A.Normalize(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), max_pixel_value=255.0)  # -> [0, 1]

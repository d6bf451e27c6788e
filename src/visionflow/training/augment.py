"""Albumentations pipelines from params: a named preset or an explicit list.

The resolved pipeline is serialized with Albumentations' own `to_dict` (logged to MLflow)
and can be rebuilt with `from_dict` to give identical outputs.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import albumentations as A

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
                          min_visibility: float = 0.0) -> A.Compose:
    """Resize to (image_size, image_size), the preset or explicit transforms, then normalise
    (ImageNet mean/std) or, with normalize=False, scale to [0, 1] (detectors normalise inside).
    Masks passed as `mask=`/`masks=` move with the image; with boxes=True, `bboxes=` (xyxy
    absolute), `labels=` and `instance_ids=` do too."""
    specs = transforms if transforms is not None else PRESETS[preset]
    steps = [A.Resize(image_size, image_size), *(_build_one(s) for s in specs), _normalize(normalize)]
    return _compose(steps, boxes, min_area, min_visibility)


def build_eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, *, normalize: bool = True,
                         boxes: bool = False) -> A.Compose:
    norm = A.Normalize(mean, std) if normalize else _normalize(False)
    return _compose([A.Resize(image_size, image_size), norm], boxes, 0.0, 0.0)


def _normalize(imagenet: bool) -> A.BasicTransform:
    if imagenet:
        return A.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return A.Normalize(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), max_pixel_value=255.0)  # -> [0, 1]

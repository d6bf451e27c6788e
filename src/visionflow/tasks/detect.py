"""Object detection and instance segmentation (Faster/Mask R-CNN, RetinaNet, FCOS, SSDlite).

Data: every image is resized to S x S (S = image_size) with its boxes by the Albumentations
pipeline; the model's own transform then only normalises (see visionflow.detection_models).
Targets (per image, resized pixels): boxes (N, 4) float32 xyxy, labels (N,) int64 = category + 1,
masks (N, S, S) uint8. Crowd instances are left out of training targets.

Masks: the dataset always carries instance masks (polygons / RLE rasterised at the image's size,
a box-only instance as its filled box), moved with the image and filtered with the boxes that
survive augmentation. build_dataset has no params, so this keeps the dataset independent of the
model and of the order the task's methods are called in; `loss` drops the masks for models
without a mask head. The cost is rasterising a few masks per image, small beside a detector step.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from visionflow.augment import build_eval_transform, build_train_transform
from visionflow.config import TrainParams
from visionflow.detection_models import build_detector
from visionflow.formats.images import load_rgb
from visionflow.formats.masks import encode_rle, instance_mask
from visionflow.manifest import Instance, Sample
from visionflow.tasks.base import TaskBase

NO_BOXES = {"bboxes": np.zeros((0, 4), dtype=np.float32), "labels": [], "instance_ids": []}


class DetectionDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], transform, project_root: Path):
        self.samples, self.transform, self.root = list(samples), transform, Path(project_root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.samples[i]
        image = load_rgb(s.image_path(self.root))  # (H, W, 3) uint8
        kept = [inst for inst in s.instances if not inst.iscrowd]  # crowd regions are no targets
        out = self.transform(**_transform_inputs(s.id, image, kept))
        return torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))), _target(out, bool(kept))


def _transform_inputs(sample_id: str, image: np.ndarray, instances: list[Instance]) -> dict[str, Any]:
    h, w = image.shape[:2]
    inputs: dict[str, Any] = {"image": image, "labels": [k.category_id + 1 for k in instances],
                              "bboxes": np.asarray([k.bbox for k in instances], np.float32).reshape(-1, 4),
                              "instance_ids": list(range(len(instances)))}
    if instances:  # Albumentations cannot stack an empty mask list
        inputs["masks"] = np.stack([instance_pixels(k, h, w, f"{sample_id} instance #{j}")
                                    for j, k in enumerate(instances)]).astype(np.uint8)  # (N, H, W)
    return inputs


def _target(out: dict[str, Any], had_instances: bool) -> dict[str, torch.Tensor]:
    """Albumentations output -> torchvision target; masks follow the boxes that survived
    min_area / min_visibility through their instance ids. Labels come back as floats."""
    boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(out["labels"], dtype=np.float64).round().astype(np.int64)
    ids = np.asarray(out["instance_ids"], dtype=np.float64).round().astype(np.int64)
    masks = np.asarray(out["masks"])[ids] if had_instances else np.zeros((0, *out["image"].shape[:2]), np.uint8)
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # torchvision rejects empty boxes
    return {"boxes": torch.from_numpy(boxes[ok]), "labels": torch.from_numpy(labels[ok]),
            "masks": torch.from_numpy(np.ascontiguousarray(masks[ok], dtype=np.uint8))}


def instance_pixels(inst: Instance, height: int, width: int, where: str) -> np.ndarray:
    """Boolean (H, W) mask of an instance; a box-only instance counts as its filled box."""
    mask = instance_mask(inst, height, width, where)
    if mask is None:
        x1, y1, x2, y2 = inst.bbox
        mask = instance_mask(replace(inst, polygons=[[x1, y1, x2, y1, x2, y2, x1, y2]]), height, width, where)
    return mask


class DetectTask(TaskBase):
    name = "detect"
    primary_metric = "val_map50"

    def build_model(self, params: TrainParams, num_classes: int, pretrained: bool = True) -> nn.Module:
        return build_detector(params.model, params.image_size, num_classes, pretrained)

    def build_transforms(self, params: TrainParams):
        a = params.augment
        return (build_train_transform(a.preset, a.transforms, params.image_size, normalize=False, boxes=True,
                                      min_area=a.min_box_area, min_visibility=a.min_visibility),
                build_eval_transform(params.image_size, normalize=False, boxes=True))

    def build_dataset(self, samples, transform, project_root) -> Dataset:
        return DetectionDataset(samples, transform, Path(project_root))

    def collate(self, batch: list) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        images, targets = zip(*batch)
        return torch.stack(images), list(targets)  # (B, 3, S, S) in [0, 1]

    def loss(self, model, images, targets) -> dict[str, torch.Tensor]:
        keys = ("boxes", "labels", "masks") if has_masks(model) else ("boxes", "labels")
        targets = [{k: t[k].to(images.device) for k in keys} for t in targets]
        return model(list(images), targets)

    @torch.no_grad()
    def val_metrics(self, model, loader, device) -> dict[str, float]:
        """COCO AP / AP50 (boxes; and masks for Mask R-CNN) in the resized S x S pixels."""
        from visionflow.evaluation.coco import evaluate_coco

        masks, was_training = has_masks(model), model.training
        model.eval()
        sizes: list[tuple[int, int]] = []
        gt, dt = [], []
        for images, targets in loader:
            for output, target in zip(model(list(images.to(device))), targets):
                sizes.append(tuple(images.shape[-2:]))
                gt += gt_annotations(target, len(sizes), masks)
                dt += detection_results(output, len(sizes), masks)
        model.train(was_training)
        dataset = coco_ground_truth(sizes, gt, {d["category_id"] for d in dt})
        metrics = {}
        for iou_type, prefix in [("bbox", "val_")] + [("segm", "val_mask_")] * masks:
            stats = evaluate_coco(dataset, dt, iou_type)
            # -1 (nothing to evaluate) reads as 0 so early stopping compares numbers
            metrics[f"{prefix}map"], metrics[f"{prefix}map50"] = max(stats["AP"], 0.0), max(stats["AP50"], 0.0)
        return metrics

    @torch.no_grad()
    def predict(self, model, images: list[np.ndarray], transform, device) -> list[dict[str, Any]]:
        fields = NO_BOXES if "bboxes" in getattr(transform, "processors", {}) else {}
        batch = np.stack([transform(image=im, **fields)["image"].transpose(2, 0, 1) for im in images])  # (B, 3, S, S)
        was_training = model.training
        model.eval()
        outputs = model(list(torch.from_numpy(batch).to(device)))
        model.train(was_training)
        return [to_prediction(o, im.shape[:2], batch.shape[-2:]) for o, im in zip(outputs, images)]


def has_masks(model: nn.Module) -> bool:
    heads = getattr(model, "roi_heads", None)
    return bool(heads is not None and heads.has_mask())


def foreground(output: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop label-0 detections: RetinaNet, FCOS and SSD score the background slot like a class."""
    keep = output["labels"] > 0
    return output if bool(keep.all()) else {k: v[keep] for k, v in output.items()}


def to_prediction(output: dict[str, torch.Tensor], image_hw: tuple[int, int], model_hw: tuple[int, int]) -> dict[str, Any]:
    """One model output (S x S pixels, labels 1..K) -> the contract's prediction in the original
    image's pixels (labels 0..K-1, sorted by score, masks as COCO RLE at the original size)."""
    (h, w), (sh, sw) = image_hw, model_hw
    output = foreground(output)
    order = torch.argsort(output["scores"].float().cpu(), descending=True)
    boxes = output["boxes"].float().cpu()[order] * torch.tensor([w / sw, h / sh, w / sw, h / sh])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    pred: dict[str, Any] = {"boxes": boxes.tolist(), "labels": (output["labels"].cpu()[order] - 1).tolist(),
                            "scores": output["scores"].float().cpu()[order].tolist()}
    if "masks" in output:  # (N, 1, S, S) probabilities; one at a time: N full-size float maps can be huge
        probs = output["masks"].float().cpu()[order]
        pred["masks"] = [encode_rle((F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0.5)
                                    .numpy()) for p in probs]
    return pred


def gt_annotations(target: dict[str, torch.Tensor], image_id: int, masks: bool) -> list[dict]:
    """One target (labels 1..K, masks (N, H, W)) -> COCO annotations without ids."""
    anns = []
    for j, ((x1, y1, x2, y2), label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist())):
        ann = {"image_id": image_id, "category_id": int(label), "iscrowd": 0,
               "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
        if masks:
            mask = target["masks"][j].cpu().numpy().astype(bool)
            ann["segmentation"], ann["area"] = encode_rle(mask), float(mask.sum())
        anns.append(ann)
    return anns


def detection_results(output: dict[str, torch.Tensor], image_id: int, masks: bool) -> list[dict]:
    """One model output (labels 1..K, masks (N, 1, H, W) probabilities) -> COCO results."""
    results = []
    output = foreground(output)
    scores = output["scores"].float().cpu().tolist()
    for j, ((x1, y1, x2, y2), label) in enumerate(zip(output["boxes"].float().cpu().tolist(), output["labels"].tolist())):
        det = {"image_id": image_id, "category_id": int(label), "score": scores[j], "bbox": [x1, y1, x2 - x1, y2 - y1]}
        if masks:
            det["segmentation"] = encode_rle(output["masks"][j, 0].float().cpu().numpy() > 0.5)
        results.append(det)
    return results


def coco_ground_truth(sizes: list[tuple[int, int]], annotations: list[dict], detected: set[int] = frozenset()) -> dict:
    """A COCO dataset of images 1..N with (H, W) `sizes`. Categories: the labels in the GT or in
    `detected` (a category without GT has no defined AP and COCO leaves it out of the mean)."""
    categories = sorted({a["category_id"] for a in annotations} | set(detected))
    return {"images": [{"id": n + 1, "height": int(h), "width": int(w)} for n, (h, w) in enumerate(sizes)],
            "annotations": [{**a, "id": n + 1} for n, a in enumerate(annotations)],
            "categories": [{"id": c, "name": str(c)} for c in categories]}

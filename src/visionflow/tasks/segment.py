"""Semantic segmentation: one class per pixel, painted from the samples' instances.

Targets (B, S, S) int64: 0 background, c + 1 for category c, 255 (IGNORE_INDEX) for the sample's
ignore region (see visionflow.manifest.masks.semantic_mask) and for the padding of a letterboxed
input (train.resize: letterbox), so padding counts for neither loss nor metrics. Models
(visionflow.models.segmenters) return logits (B, K + 1, S, S); predictions are (H, W) uint8
masks at each image's own size: the logits cropped to the image's part of the input
(training.augment.input_frame), resized to its size, then the argmax.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from visionflow.training.augment import Frame, build_eval_transform, build_train_transform, input_frame, resize_steps
from visionflow.training.loader import LoaderDataset, chw_tensor, stack
from visionflow.core.config import TrainParams
from visionflow.core.errors import DataError
from visionflow.evaluation.segmentation import ConfusionAccumulator
from visionflow.manifest.images import load_rgb
from visionflow.manifest.masks import encode_rle, semantic_mask
from visionflow.manifest import Category, Instance, Sample
from visionflow.models.segmenters import build_segmenter
from visionflow.tasks.base import (IGNORE_INDEX, Normalize, TaskBase, TestScore, eval_batch, mean_std, merge_instances,
                                   nanmean_rows, same_outline)

log = logging.getLogger(__name__)


class SegmentationDataset(LoaderDataset):
    """(image (3, S, S) float32 normalised, target (S, S) int64); the semantic mask is painted
    once per sample (LoaderDataset's record), not every epoch."""

    def raw(self, i: int, extras: bool = True) -> dict[str, np.ndarray]:
        s = self.samples[i]
        path = s.image_path(self.root)
        image = load_rgb(path)
        if image.shape[:2] != (s.height, s.width):
            raise DataError(path, f"image is {image.shape[1]}x{image.shape[0]} but the manifest says "
                                  f"{s.width}x{s.height}", record=s.id, hint="re-run the ingest stage")
        return {"image": image, "mask": semantic_mask(s)} if extras else {"image": image}

    def item(self, i: int, record: dict[str, np.ndarray], transform) -> tuple[torch.Tensor, torch.Tensor]:
        # The mask moves with the image (Albumentations applies geometric transforms to `mask`
        # with nearest-neighbour interpolation; pixel-level ones leave it alone).
        out = transform(image=record["image"], mask=record["mask"])
        x = chw_tensor(out["image"])  # (3, S, S): float32, or uint8 when normalised on the device
        # (S, S) uint8 (class values fit: semantic_mask), made int64 where the loss runs: an eighth
        # of the bytes to hand over, pin and copy (a 640 px int64 mask is 3.3 MB)
        return x, torch.from_numpy(np.ascontiguousarray(out["mask"], dtype=np.uint8))


class SegmentMetric:
    """mIoU (primary), per-class IoU and Dice, pixel and mean accuracy and the pixel confusion
    matrix over classes background + categories (the ignore value never counts). Per image: its
    (K, K) confusion matrix (full-size masks are reduced as they come, never kept), which the
    bootstrap re-weights."""

    def __init__(self, categories: Sequence[Category]):
        self.names = ["background", *(c.name for c in categories)]
        self.per_image: list[np.ndarray] = []  # (K * K,) int64 each

    def process(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> None:
        for s, p in zip(samples, predictions, strict=True):
            acc = ConfusionAccumulator(len(self.names), IGNORE_INDEX)
            acc.update(p["mask"], semantic_mask(s))
            self.per_image.append(acc.matrix.ravel())

    def compute(self) -> TestScore:
        k = len(self.names)
        cms = np.stack(self.per_image).astype(float) if self.per_image else np.zeros((0, k * k))  # (N, K * K)
        total = ConfusionAccumulator(k, IGNORE_INDEX)
        total.matrix = cms.sum(0).astype(np.int64).reshape(k, k)
        m = total.compute()
        per_class = {n: v for n, v in zip(self.names, m["per_class_iou"]) if v is not None}
        metrics = {"n": len(self.per_image), "classes": self.names,
                   "mask_values": "0 background, c + 1 for category c", "ignore_index": IGNORE_INDEX,
                   **{key: m[key] for key in ("miou", "dice", "pixel_accuracy", "mean_accuracy", "pixels",
                                              "confusion_matrix")},
                   "per_class": {n: {"IoU": m["per_class_iou"][j], "Dice": m["per_class_dice"][j]}
                                 for j, n in enumerate(self.names)}}
        miou = m["miou"] if m["miou"] is not None else float("nan")
        return TestScore("miou", miou, per_class, "IoU", lambda w: mean_iou((w @ cms).reshape(-1, k, k)), metrics)


def _present(mask: np.ndarray) -> list[int]:
    """The class values (c + 1) a mask shows, background left out."""
    return sorted(int(v) for v in np.unique(mask) if v)


def mean_iou(cm: np.ndarray) -> np.ndarray:
    """(B, K, K) confusion matrices (rows true) -> (B,) mean IoU over the classes present
    (union > 0), the ConfusionAccumulator convention."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    union = cm.sum(2) + cm.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return nanmean_rows(np.where(union > 0, tp / union, np.nan))


class SegmentTask(TaskBase):
    name = "segment"
    cam_kind = "region"  # visionflow.evaluation.explain: Grad-CAM for the predicted class region
    target_bytes_per_pixel = 1  # the (S, S) uint8 mask (collate)

    def fits(self, data) -> Optional[str]:
        # objects without an outline would be painted background: only data outlined throughout
        if data.shapes and data.shapes * 10 >= data.boxes * 9:
            return f"{data.shapes} of {data.boxes} objects have a polygon or mask outline"
        return None
    primary_metric = "val_miou"

    def eval_outputs(self, p) -> list[Path]:
        return [p.pred_masks_dir]

    def eval_plots(self, p) -> list[Path]:
        return [p.per_class_csv]  # per-class IoU (the pixel confusion matrix is a figure)

    # --- the FiftyOne face ---
    fiftyone_label = "segmentation"
    jsonl_keys = ("id", "mask")  # PNG path relative to the JSONL's folder

    def resolve_record(self, record: dict[str, Any], folder) -> None:
        record["mask_path"] = (Path(folder) / record["mask"]).resolve()
        if not record["mask_path"].is_file():
            raise FileNotFoundError(f"predicted mask {record['mask_path']} not found")

    def review_signal(self, sample: Sample, record: dict[str, Any], names: list[str], settings: Any):
        from PIL import Image

        from visionflow.evaluation.review import segment_signal

        with Image.open(record["mask_path"]) as im:
            pred = np.asarray(im)
        return segment_signal(semantic_mask(sample), pred, names)

    def embedding_module(self, model: nn.Module) -> tuple[nn.Module, bool]:
        from visionflow.evaluation.explain import segmenter_layer

        return segmenter_layer(model), False

    # --- the relabel face: outlines (polygons, or a mask where the label is one) ---
    relabel_controls = ("polygon", "brush")
    single_choice = False

    def label_view(self, sample: Sample) -> Sample:
        return dataclasses.replace(sample, labels=[], attributes={}, instances=[
            Instance(bbox=list(i.bbox), category_id=i.category_id, polygons=[list(r) for r in i.polygons],
                     rle=i.rle) for i in sample.instances if i.polygons or i.rle is not None])

    def prediction_view(self, sample: Sample, record: dict[str, Any], settings: Any) -> Sample:
        """One mask region per class the predicted mask holds (value c + 1 is category c)."""
        from PIL import Image

        with Image.open(record["mask_path"]) as im:
            mask = np.asarray(im)
        instances = []
        for value in sorted(int(v) for v in np.unique(mask) if v not in (0, IGNORE_INDEX)):
            region = mask == value
            ys, xs = np.nonzero(region)
            instances.append(Instance(bbox=[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                                      category_id=value - 1, rle=encode_rle(region), area=float(region.sum())))
        return dataclasses.replace(sample, labels=[], attributes={}, instances=instances)

    def apply_correction(self, sample: Sample, corrected: Sample) -> Sample:
        kept = merge_instances([i for i in sample.instances if i.polygons or i.rle is not None],
                               list(corrected.instances), same_outline)
        return dataclasses.replace(sample, instances=kept + [i for i in sample.instances
                                                              if not i.polygons and i.rle is None])

    # --- the deploy face (records): the mask at the input's size, 0 background, c + 1 class c ---
    pyfunc_columns = {"mask_png": "string", "classes_present": "string"}
    count_unit = "images with"
    object_unit = "class regions"

    def objects(self, record: dict[str, Any]) -> int:
        return len(_present(record["mask"]))

    def nothing_found(self, meta: dict[str, Any], min_score: float, returned: int) -> str:
        return "every pixel of every image was predicted background (or ignore): no class region to count"

    def record(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"mask": p["mask"]}

    def frame_columns(self, preds: list[dict[str, Any]]) -> dict[str, tuple[list, Any]]:
        from visionflow.manifest.images import encode_image

        return {"mask_png": ([encode_image(p["mask"]) for p in preds], object),
                "classes_present": ([json.dumps(_present(p["mask"])) for p in preds], object)}

    def from_frame_row(self, row: dict[str, Any]) -> dict[str, Any]:
        from visionflow.manifest.images import decode_mask

        # the PNG is kept: serving answers with it as it came, not decoded and encoded again
        return {"mask": decode_mask(row["mask_png"]), "mask_png": row["mask_png"]}

    def json_record(self, rec: dict[str, Any]) -> dict[str, Any]:
        from visionflow.manifest.masks import encode_rle

        mask = rec["mask"]
        present = _present(mask)
        return {"height": int(mask.shape[0]), "width": int(mask.shape[1]), "classes_present": present,
                "mask_rle": {str(v): encode_rle(mask == v) for v in present}}

    def coco_entries(self, image_id: int, where: dict[str, Any], rec: dict[str, Any],
                     classes: list[str]) -> list[dict[str, Any]]:
        js = self.json_record(rec)
        return [{"image_id": image_id, "category_id": v - 1, "category_name": classes[v - 1],
                 "segmentation": js["mask_rle"][str(v)], **where} for v in js["classes_present"]]

    def count(self, record, counts, min_score: float, classes: list[str]) -> None:
        counts.update(classes[v - 1] for v in _present(record["mask"]))  # by class name, not mask value

    def served_record(self, rec: dict[str, Any]) -> dict[str, Any]:
        from visionflow.manifest.images import encode_image

        mask = rec["mask"]
        return {"mask_png": rec.get("mask_png") or encode_image(mask), "classes_present": _present(mask),
                "height": int(mask.shape[0]), "width": int(mask.shape[1])}

    # --- the export face ---
    export_formats = ("onnx", "torchscript")
    export_outputs = {"logits": "(B, K + 1, S, S) float32 logits (letterboxed input: padding included); "
                                "channel 0 background, c + 1 = classes[c]",
                      "mask": "(B, S, S) uint8 argmax of logits: 0 background, c + 1 = classes[c]"}

    def export_graph(self, model: nn.Module, meta: dict[str, Any]) -> nn.Module:
        return LogitsMaskGraph(model, *mean_std(meta)).eval()

    def outputs_to_numpy(self, out: Any) -> dict[str, Any]:
        return {"logits": out[0].cpu().numpy(), "mask": out[1].cpu().numpy()}

    def output_diff(self, ref: dict[str, Any], got: dict[str, Any]) -> tuple[float, int]:
        """Compared on per-pixel softmax probabilities of the logits."""
        a, b = (torch.from_numpy(x["logits"]).double().softmax(dim=1) for x in (ref, got))
        return (float((a - b).abs().max()) if a.numel() else 0.0), 0

    def exported_predictions(self, outputs: dict[str, Any], sizes, image_size: int,
                             resize: str = "stretch") -> list[dict[str, Any]]:
        steps = resize_steps(image_size, resize)
        return [{"mask": upsampled_mask(torch.from_numpy(lg), input_frame(steps, h, w))}
                for lg, (h, w) in zip(outputs["logits"], sizes)]

    def reference_outputs(self, predictor, images: list[np.ndarray]):
        # logits too, which predict does not return; the masks as predict makes them
        with torch.no_grad():
            logits = predictor.model(eval_batch(images, predictor.transform)).float()  # (B, K + 1, S, S)
        return {"logits": logits.numpy()}, [{"mask": upsampled_mask(lg, input_frame(predictor.transform, *im.shape[:2]))}
                                            for lg, im in zip(logits, images)]

    def plot_templates(self, p) -> list[tuple[Path, dict]]:
        return [(p.per_class_csv, {"template": "bar_horizontal", "x": "iou", "y": "class"})]

    def headline(self, ev: dict[str, Any]) -> str:
        return f"mIoU {ev.get('miou')}, pixel accuracy {ev.get('pixel_accuracy')}"

    def tracking_metrics(self, ev: dict[str, Any]) -> dict[str, float]:
        values = {f"test_{k}": ev[k] for k in ("miou", "dice", "pixel_accuracy", "mean_accuracy")
                  if ev.get(k) is not None}
        values.update({f"test_iou_{name}": stats["IoU"] for name, stats in ev.get("per_class", {}).items()
                       if stats.get("IoU") is not None})
        return values

    def test_metric(self, categories: Sequence[Category], settings: Any = None) -> SegmentMetric:
        return SegmentMetric(categories)

    def report_test(self, params, paths, predictor, test: list[Sample], categories) -> dict[str, Any]:
        """The evaluate stage's outputs: mIoU, per-class IoU and Dice, pixel accuracy, the pixel
        confusion matrix, one predicted mask PNG per test image and a grid of image / truth /
        prediction."""
        from PIL import Image

        from visionflow.evaluation import figures
        from visionflow.evaluation.report import fmt, grid_pick, write_csv, write_evaluation, write_jsonl
        from visionflow.core.files import write_dir

        grid_at = grid_pick(len(test), params.grid_images)
        grid, records, holder = [], [], {}

        def fill(out: Path) -> None:
            def each(samples, images, batch):
                for s, image, p in zip(samples, images, batch):
                    name = f"{len(records):06d}.png"
                    if len(records) in grid_at:
                        grid.append((image, semantic_mask(s), p["mask"]))
                    Image.fromarray(p["mask"]).save(out / name)
                    records.append({"id": s.id, "mask": f"{paths.pred_masks_dir.name}/{name}",
                                    "classes_present": _present(p["mask"])})

            holder["score"] = predictor.score(test, paths.root, categories, params, params.batch_size, each=each)

        write_dir(paths.pred_masks_dir, fill)
        score = holder["score"]
        m, names = score.metrics, score.metrics["classes"]
        write_jsonl(paths.predictions, records)
        write_evaluation(paths, {"task": self.name, "primary_metric": score.name, **m})
        write_csv(paths.per_class_csv, ["class", "iou", "dice"],
                  ([n, fmt(v["IoU"]), fmt(v["Dice"])] for n, v in m["per_class"].items()))

        def draw(out: Path) -> None:

            figures.plot_confusion(np.array(m["confusion_matrix"]), names, names,
                                   f"pixel confusion (test, mIoU {m['miou'] or 0:.3f})", out / "confusion_matrix.png")
            figures.plot_per_class(m["per_class"], ("IoU", "Dice"), "per-class IoU and Dice (test)", out / "per_class.png")
            figures.segmentation_grid(grid, out / "test_predictions.png")

        write_dir(paths.figures_dir, draw)
        log.info("test mIoU %.4f, Dice %.4f, pixel accuracy %.4f on %d images",
                 m["miou"] or 0, m["dice"] or 0, m["pixel_accuracy"] or 0, len(test))
        return {"task": self.name, "test_images": len(test), "miou": round(m["miou"] or 0.0, 4),
                "pixel_accuracy": round(m["pixel_accuracy"] or 0.0, 4)}

    @property
    def dice_weight(self) -> float:
        # Cross-entropy alone lets similar classes (circle / hexagon) collapse into one for
        # epochs; the Dice term weighs every class present equally and pulls them apart.
        return self.params.dice_weight if self.params is not None else 0.0

    def build_model(self, params: TrainParams, num_classes: int, pretrained: bool = True) -> nn.Module:
        return build_segmenter(params.model, num_classes, pretrained)

    def build_transforms(self, params: TrainParams):
        a = params.augment
        # letterbox padding is IGNORE_INDEX in the target mask: neither loss nor metrics count it
        return (build_train_transform(a.preset, a.transforms, params.image_size, normalize=True,
                                      resize=params.resize, mask_fill=IGNORE_INDEX),
                build_eval_transform(params.image_size, normalize=True, resize=params.resize, mask_fill=IGNORE_INDEX))

    def build_dataset(self, samples, transform, project_root) -> Dataset:
        return SegmentationDataset(samples, transform, Path(project_root))

    def collate(self, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = zip(*batch)
        return stack(images), stack(masks)  # (B, 3, S, S), (B, S, S)

    def loss(self, model, images, targets) -> dict[str, torch.Tensor]:
        logits, targets = model(images), targets.to(images.device).long()
        out = {"cross_entropy": _cross_entropy(logits, targets)}
        if self.dice_weight:
            out["dice"] = self.dice_weight * soft_dice_loss(logits, targets)
        return out

    @torch.no_grad()
    def val_metrics(self, model, loader, device) -> dict[str, float]:
        model.eval()
        acc, loss_sum, pixels = None, 0.0, 0
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device).long()
            logits = model(images).float()  # (B, K + 1, S, S)
            valid = int((targets != IGNORE_INDEX).sum())
            loss_sum += float(_cross_entropy(logits, targets)) * valid
            pixels += valid
            if acc is None:
                acc = ConfusionAccumulator(logits.shape[1], IGNORE_INDEX)
            acc.update(torch.from_numpy(class_argmax(logits, 1)), targets.cpu())
        m = acc.compute() if acc else {}
        # None (nothing valid to score) reads as 0 so early stopping and the logs get numbers.
        return {"val_loss": loss_sum / max(pixels, 1), "val_miou": m.get("miou") or 0.0,
                "val_pixel_accuracy": m.get("pixel_accuracy") or 0.0}

    @torch.no_grad()
    def predict(self, model, images: list[np.ndarray], transform, device) -> list[dict[str, Any]]:
        logits = model(eval_batch(images, transform).to(device)).float()  # (B, K + 1, S, S)
        # one at a time: full-size logits of a big image are large
        return [{"mask": upsampled_mask(lg, input_frame(transform, *im.shape[:2]))} for im, lg in zip(images, logits)]


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over non-ignored pixels; 0 (not NaN) for a batch that is all ignore region."""
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over the classes present in `targets` of this batch (pixels of the
    ignore index left out), Dice_c = (2 sum p_c y_c + smooth) / (sum p_c + sum y_c + smooth)
    with p the softmax over the whole batch. 0 (with a gradient path) when nothing is valid."""
    k = logits.shape[1]
    valid = (targets != IGNORE_INDEX)
    probs = logits.float().softmax(1) * valid[:, None]
    onehot = F.one_hot(torch.where(valid, targets, 0), k).permute(0, 3, 1, 2).to(probs.dtype) * valid[:, None]
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    dice = (2 * inter + smooth) / (denom + smooth)
    return 1.0 - dice[present].mean()


def upsampled_mask(logits: torch.Tensor, frame: Frame) -> np.ndarray:
    """(K + 1, S, S) logits -> (H, W) uint8 class values of the frame's image: its part of the
    input (letterbox padding cropped off), bilinear to the image's size, argmax."""
    crop = frame.crop(logits.float())
    if crop.device.type != "cpu":
        full = F.interpolate(crop[None], size=(frame.height, frame.width), mode="bilinear", align_corners=False)
        return full[0].argmax(0).to(torch.uint8).cpu().numpy()
    return resize_argmax(crop.detach().numpy(), frame.height, frame.width)


# resize_argmax's sparse path pays off while the cells whose corners disagree are few: per
# output pixel it costs about 6x the dense interpolation, the rest is a gather
_SPARSE_MAX_DISAGREE = 0.1


def resize_argmax(logits: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, h, w) float logits -> (height, width) uint8: the argmax over K (first maximum on ties)
    of the logits resized bilinearly (align_corners=False), what F.interpolate + argmax give.

    Enlarging, most output pixels need no interpolation: a pixel is a convex combination of its
    four source pixels, so where all four have the same argmax c, c is greater than or equal
    to every other class in each of them and so in the mix too (float rounding is monotone).
    Those pixels take c; only the pixels between source pixels of different classes (object
    edges) are interpolated, with torch's taps and weights. For a 1920x1080 photo from 512 px
    logits of a few objects this takes 5 ms against 61 (benchmarks/README.md). Logits whose class
    changes almost everywhere (a random-init model) and shrinking take the dense path."""
    k, h, w = logits.shape
    if height * width >= 2 * h * w:
        low = _first_argmax(logits)
        edge = np.empty((h + 1, w + 1), low.dtype)  # low with its last row and column repeated
        edge[:h, :w] = low
        edge[h, :w] = low[-1]
        edge[:, w] = edge[:, w - 1]
        mixed = (low != edge[:h, 1:]) | (low != edge[1:, :w]) | (low != edge[1:, 1:])
        if mixed.mean() <= _SPARSE_MAX_DISAGREE:
            y0, y1, wy = _linear_taps(h, height)
            x0, x1, wx = _linear_taps(w, width)
            out = low.take(y0, 0).take(x0, 1)
            ys, xs = _cell_pixels(*np.nonzero(mixed), y0, x0)
            if ys.size:
                top = logits[:, y0[ys], x0[xs]] * (1 - wx[xs]) + logits[:, y0[ys], x1[xs]] * wx[xs]
                bottom = logits[:, y1[ys], x0[xs]] * (1 - wx[xs]) + logits[:, y1[ys], x1[xs]] * wx[xs]
                out[ys, xs] = _first_argmax(top * (1 - wy[ys]) + bottom * wy[ys])
            return out
    full = F.interpolate(torch.from_numpy(np.ascontiguousarray(logits))[None], size=(height, width),
                         mode="bilinear", align_corners=False)
    return _first_argmax(full[0].numpy())


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear resize of one axis from n_in to n_out (align_corners=False), as torch computes
    it in float32: each output index's two source indices and the second one's weight."""
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5)
    i0 = src.astype(np.int64)  # truncated toward 0: with the weight clipped below, torch's clamp of src at 0
    return i0, np.minimum(i0 + 1, n_in - 1), np.clip(src - i0, 0, 1).astype(np.float32)


def _cell_pixels(cell_y: np.ndarray, cell_x: np.ndarray, y0: np.ndarray, x0: np.ndarray):
    """The output pixels (ys, xs) whose first source pixel (y0, x0) is one of the cells: each
    cell's rectangle of rows with y0 == cell_y and columns with x0 == cell_x (y0 and x0 never
    decrease), enumerated without touching the rest of the output."""
    r0, r1 = np.searchsorted(y0, cell_y, "left"), np.searchsorted(y0, cell_y, "right")
    c0, c1 = np.searchsorted(x0, cell_x, "left"), np.searchsorted(x0, cell_x, "right")
    rows, cols = r1 - r0, c1 - c0
    sizes = rows * cols
    local = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # index in its cell
    cols_each = np.repeat(cols, sizes)
    return np.repeat(r0, sizes) + local // cols_each, np.repeat(c0, sizes) + local % cols_each


def _first_argmax(values: np.ndarray) -> np.ndarray:
    """argmax over axis 0 as uint8 (class values fit: semantic_mask; the first maximum on ties,
    as numpy's and torch's): one pass per class, 1.2-1.5x faster than numpy's argmax over a
    leading axis of a few classes."""
    best = values[0].copy()
    out = np.zeros(best.shape, np.uint8)
    for c in range(1, values.shape[0]):
        out[values[c] > best] = c
        np.maximum(best, values[c], out=best)
    return out


def class_argmax(logits: torch.Tensor, dim: int) -> np.ndarray:
    """argmax over the class axis as a numpy array (the first maximum on ties, as torch's). On the
    CPU `_first_argmax`: torch's argmax over a non-innermost axis of (K, H, W) logits is about
    5x slower with one thread (2.8 ms against 0.5 ms at 6 x 128 x 128 for numpy's), a quarter of
    a U-Net's batch prediction."""
    if logits.device.type != "cpu":
        return logits.argmax(dim).cpu().numpy()
    return _first_argmax(np.moveaxis(logits.detach().numpy(), dim, 0))


class LogitsMaskGraph(nn.Module):
    """The exported segmenter: 0..255 images -> (logits (B, K + 1, S, S), mask (B, S, S) uint8)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.normalize, self.model = Normalize(mean, std), model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(self.normalize(images))  # (B, K + 1, S, S)
        return logits, logits.argmax(dim=1).to(torch.uint8)

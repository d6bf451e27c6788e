"""Object detection and instance segmentation (Faster/Mask R-CNN, RetinaNet, FCOS, SSDlite).

Data: every image is brought to S x S (S = image_size) with its boxes by the Albumentations
pipeline, letterboxed (longest side to S, aspect ratio kept, centred, padded with 0) or stretched
as train.resize says; the model's own transform then only normalises (see
visionflow.models.detectors). Targets (per image, model-input pixels): boxes (N, 4) float32
xyxy, labels (N,) int64 = category + 1, masks (N, S, S) uint8. Crowd instances are left out of
training targets. Predictions go back to each input's own pixels through the same geometry
(training.augment.input_frame).

Masks: for a mask architecture (Mask R-CNN) the dataset carries instance masks (polygons / RLE
rasterised at the image's size, a box-only instance as its filled box), moved with the image and
filtered with the boxes that survive augmentation; rasterised once per sample and kept
compressed (training.loader). For the box-only architectures it carries none: each instance's
mask was an (S, S) plane decompressed, augmented, batched and sent from the worker only for
`loss` to drop it (with 8 boxes an image at 640 px, most of an item's time). A task made without
params (get_task(name)) builds datasets with masks, which every architecture accepts.
"""
from __future__ import annotations

import json
import logging
import dataclasses
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from visionflow.training.augment import (Frame, batch_chw, build_eval_transform, build_train_transform, input_frame,
                                         resize_steps)
from visionflow.training.loader import LoaderDataset, chw_tensor, stack
from visionflow.core.config import TrainParams
from visionflow.models.detectors import build_detector, is_mask_arch
from visionflow.manifest.images import load_rgb
from visionflow.manifest.masks import encode_rle, instance_mask
from visionflow.manifest import Category, Instance, Sample
from visionflow.tasks.base import TaskBase, TestScore, merge_instances, nanmean_rows, same_box

log = logging.getLogger(__name__)

NO_BOXES = {"bboxes": np.zeros((0, 4), dtype=np.float32), "labels": [], "instance_ids": []}


class DetectionDataset(LoaderDataset):
    """(image (3, S, S) float32 in [0, 1], target); with `masks`, the target's instance masks,
    rasterised once per sample (LoaderDataset's record), not every epoch."""

    def __init__(self, samples, transform, project_root: Path, decode: str = "full", masks: bool = True):
        self.masks = masks
        super().__init__(samples, transform, project_root, decode)

    def raw(self, i: int, extras: bool = True) -> dict[str, Any]:
        s = self.samples[i]
        image = load_rgb(s.image_path(self.root))  # (H, W, 3) uint8
        if not extras:
            return {"image": image}
        kept = [inst for inst in s.instances if not inst.iscrowd]  # crowd regions are no targets
        return _transform_inputs(s.id, image, kept, self.masks)

    def item(self, i: int, record: dict[str, Any], transform) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs: dict[str, Any] = {"image": record["image"],
                                  "bboxes": np.asarray(record["bboxes"], np.float32).reshape(-1, 4),
                                  "labels": np.asarray(record["labels"]).round().astype(np.int64).tolist(),
                                  "instance_ids": np.asarray(record["instance_ids"]).round().astype(np.int64).tolist()}
        if "masks" in record:
            inputs["masks"] = record["masks"]
        out = transform(**inputs)
        return chw_tensor(out["image"]), _target(out, self.masks)


def _transform_inputs(sample_id: str, image: np.ndarray, instances: list[Instance],
                      masks: bool = True) -> dict[str, Any]:
    h, w = image.shape[:2]
    inputs: dict[str, Any] = {"image": image, "labels": [k.category_id + 1 for k in instances],
                              "bboxes": np.asarray([k.bbox for k in instances], np.float32).reshape(-1, 4),
                              "instance_ids": list(range(len(instances)))}
    if masks and instances:  # Albumentations cannot stack an empty mask list
        inputs["masks"] = np.stack([instance_pixels(k, h, w, f"{sample_id} instance #{j}")
                                    for j, k in enumerate(instances)]).astype(np.uint8)  # (N, H, W)
    return inputs


def _target(out: dict[str, Any], with_masks: bool) -> dict[str, torch.Tensor]:
    """Albumentations output -> torchvision target; with_masks, the masks that follow the boxes
    that survived min_area / min_visibility through their instance ids (none went in for an image
    without instances: Albumentations cannot stack an empty list). Labels come back as floats."""
    boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(out["labels"], dtype=np.float64).round().astype(np.int64)
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # torchvision rejects empty boxes
    target = {"boxes": torch.from_numpy(boxes[ok]), "labels": torch.from_numpy(labels[ok])}
    if with_masks:
        ids = np.asarray(out["instance_ids"], dtype=np.float64).round().astype(np.int64)
        masks = np.asarray(out["masks"])[ids] if "masks" in out else np.zeros((0, *out["image"].shape[:2]), np.uint8)
        target["masks"] = torch.from_numpy(np.ascontiguousarray(masks[ok], dtype=np.uint8))
    return target


def instance_pixels(inst: Instance, height: int, width: int, where: str) -> np.ndarray:
    """Boolean (H, W) mask of an instance; a box-only instance counts as its filled box."""
    mask = instance_mask(inst, height, width, where)
    if mask is None:
        x1, y1, x2, y2 = inst.bbox
        mask = instance_mask(replace(inst, polygons=[[x1, y1, x2, y1, x2, y2, x1, y2]]), height, width, where)
    return mask


class DetectMetric:
    """COCO AP/AR for boxes (and masks when the predictions carry them) in each image's own
    pixels; primary AP50 (bbox), per class AP50. Per image: the detections' match rows at
    IoU 0.5, which the bootstrap re-weights (evaluation.coco.weighted_ap) instead of re-matching."""

    def __init__(self, categories: Sequence[Category]):
        self.categories = list(categories)
        self.samples: list[Sample] = []
        self.predictions: list[dict[str, Any]] = []

    def process(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> None:
        for s, p in zip(samples, predictions, strict=True):
            self.samples.append(s)
            self.predictions.append({k: p[k] for k in ("boxes", "labels", "scores", "masks") if k in p})

    def compute(self) -> TestScore:
        from visionflow.evaluation.coco import coco_block, evaluate_coco, match_table, weighted_ap
        from visionflow.evaluation.detection import coco_ground_truth, coco_results

        gt, results = coco_ground_truth(self.samples, self.categories), coco_results(self.predictions)
        bbox = evaluate_coco(gt, results, "bbox", curves=True)
        metrics: dict[str, Any] = {"n": len(self.samples), "detections": len(results), **coco_block(bbox)}
        if self.predictions and "masks" in self.predictions[0]:  # Mask R-CNN
            metrics["segm"] = coco_block(evaluate_coco(gt, results, "segm"))
        table: dict[str, Any] = {}

        def resample(w: np.ndarray) -> np.ndarray:  # matched once, on the first call
            if not table:
                table.update(match_table(gt, results, "bbox", 0.5))  # image i is samples[i]
            return nanmean_rows(weighted_ap(table, w))

        per_class = {n: v for n, v in bbox["per_class_ap50"].items() if v >= 0}
        return TestScore("AP50", bbox["AP50"], per_class, "AP50", resample, metrics,
                         extras={"coco_gt": gt, "coco_results": results, "bbox": bbox})


class DetectTask(TaskBase):
    name = "detect"
    cam_kind = "boxes"  # visionflow.evaluation.explain: EigenCAM kept in the predicted boxes

    def fits(self, data) -> Optional[str]:
        return f"{data.boxes} boxed objects" if data.boxes else None
    primary_metric = "val_map50"

    history_fields = ("train_loss", "val_map50")  # detectors report no validation loss in eval mode

    def eval_outputs(self, p) -> list[Path]:
        return [p.coco_gt, p.coco_results]

    def eval_plots(self, p) -> list[Path]:
        return [p.pr_curve_csv, p.per_class_csv]

    # --- the FiftyOne face ---
    fiftyone_label = "detections"
    jsonl_keys = ("id", "boxes", "labels", "scores")  # xyxy absolute pixels; + masks [RLE] (Mask R-CNN)

    def predicted_labels(self, record: dict[str, Any]) -> list[int]:
        return [int(v) for v in record["labels"]]

    def review_signal(self, sample: Sample, record: dict[str, Any], names: list[str], settings: Any):
        from visionflow.evaluation.review import detect_signal

        gt = [i for i in sample.instances if not i.iscrowd]
        return detect_signal([i.bbox for i in gt], [i.category_id for i in gt], record["boxes"], record["labels"],
                             record["scores"], names, settings.iou_threshold, settings.min_confidence)

    def embedding_module(self, model: nn.Module) -> tuple[nn.Module, bool]:
        return model.backbone, False  # FPN levels: the coarsest, averaged over space

    # --- the relabel face: boxes (a crowd region is not shown and is kept as it is) ---
    relabel_controls = ("label",)
    single_choice = False

    def label_view(self, sample: Sample) -> Sample:
        return dataclasses.replace(sample, labels=[], attributes={}, instances=[
            Instance(bbox=list(i.bbox), category_id=i.category_id) for i in sample.instances if not i.iscrowd])

    def prediction_view(self, sample: Sample, record: dict[str, Any], settings: Any) -> Sample:
        return dataclasses.replace(sample, labels=[], attributes={}, instances=[
            Instance(bbox=[float(v) for v in box], category_id=int(label))
            for box, label, score in zip(record["boxes"], record["labels"], record["scores"])
            if score >= settings.min_confidence])

    def apply_correction(self, sample: Sample, corrected: Sample) -> Sample:
        boxes = [Instance(bbox=list(i.bbox), category_id=i.category_id) for i in corrected.instances]
        kept = merge_instances([i for i in sample.instances if not i.iscrowd], boxes,
                               lambda o, c: same_box(o.bbox, c.bbox))
        return dataclasses.replace(sample, instances=kept + [i for i in sample.instances if i.iscrowd])

    def shown_record(self, record: dict[str, Any], min_confidence: float) -> dict[str, Any]:
        """The App shows what a user would act on; COCO AP used them all."""
        keep = [j for j, sc in enumerate(record["scores"]) if sc >= min_confidence]
        return {**record, **{k: [record[k][j] for j in keep] for k in ("boxes", "labels", "scores", "masks")
                             if k in record}}

    # --- the deploy face (records): boxes xyxy in the input's pixels, names beside labels ---
    pyfunc_columns = {"boxes": "string", "labels": "string", "names": "string", "scores": "string", "masks": "string"}
    count_unit = "detections scoring >= {min_score:g}"
    object_unit = "detections"

    def objects(self, record: dict[str, Any]) -> int:
        return len(record["scores"])

    def nothing_found(self, meta: dict[str, Any], min_score: float, returned: int) -> str:
        if returned:
            return (f"none of the {returned} detections scores >= --min-score {min_score:g}, the threshold of "
                    f"this summary (and of --fiftyone); the output file keeps them all with their scores. "
                    f"Lower it, e.g. --min-score {min(0.1, min_score / 2):g}")
        threshold = (meta.get("params") or {}).get("model", {}).get("score_threshold")
        return (f"the model returned no detection: it keeps only those scoring >= {threshold} (its "
                f"model.score_threshold, from {self.name}.train.model.score_threshold when it was trained). "
                f"Lower that in params.yaml and retrain, or train longer (an undertrained detector scores low)")

    def record(self, p: dict[str, Any]) -> dict[str, Any]:
        rec = {"boxes": [[round(float(v), 2) for v in b] for b in p["boxes"]], "labels": [int(v) for v in p["labels"]],
               "names": list(p["names"]), "scores": [round(float(v), 5) for v in p["scores"]]}
        if "masks" in p:  # COCO RLE each (Mask R-CNN)
            rec["masks"] = p["masks"]
        return rec

    def frame_columns(self, preds: list[dict[str, Any]]) -> dict[str, tuple[list, Any]]:
        rows = [self.record(p) for p in preds]  # JSON text cells: MLflow schemas have no nested lists
        return {k: ([json.dumps(r.get(k, [])) for r in rows], object) for k in self.pyfunc_columns}

    def from_frame_row(self, row: dict[str, Any]) -> dict[str, Any]:
        rec = {k: json.loads(row[k]) for k in ("boxes", "labels", "names", "scores")}
        masks = json.loads(row.get("masks") or "[]")
        if masks:
            rec["masks"] = masks
        return rec

    def coco_entries(self, image_id: int, where: dict[str, Any], rec: dict[str, Any],
                     classes: list[str]) -> list[dict[str, Any]]:
        out = []
        for j, (b, label, score) in enumerate(zip(rec["boxes"], rec["labels"], rec["scores"])):
            e = {"image_id": image_id, "category_id": label, "category_name": classes[label],
                 "bbox": [b[0], b[1], round(b[2] - b[0], 2), round(b[3] - b[1], 2)], "score": score, **where}
            if "masks" in rec:
                e["segmentation"] = rec["masks"][j]
            out.append(e)
        return out

    def count(self, record, counts, min_score: float, classes: list[str]) -> None:
        counts.update(n for n, sc in zip(record["names"], record["scores"]) if sc >= min_score)

    # --- the export face: TorchScript only (torchvision's detectors return per-image lists of
    # varying length, which torch.onnx exports for one fixed batch size at best) ---
    export_formats = ("torchscript",)
    export_outputs = {"detections": "list of B dicts: boxes (N, 4) float32 xyxy in S x S input pixels "
                                    "(letterboxed input: padding included), "
                                    "labels (N,) int64 0..K-1 (classes[label]), scores (N,) float32 sorted "
                                    "descending; Mask R-CNN adds masks (N, 1, S, S) float32 probabilities"}
    parity_counts_mismatches = True

    def export_graph(self, model: nn.Module, meta: dict[str, Any]) -> nn.Module:
        return DetectionsGraph(model).eval()

    def input_normalization(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {"normalization": "inside the graph: x / 255, then the detector's own transform"}

    def outputs_to_numpy(self, out: Any) -> dict[str, Any]:
        return {"detections": [{k: v.cpu().numpy() for k, v in d.items()} for d in out]}

    def output_diff(self, ref: dict[str, Any], got: dict[str, Any]) -> tuple[float, int]:
        """Scores and box corners (pixels) of images with as many detections on both sides."""
        diff, mismatched = 0.0, 0
        for a, b in zip(ref["detections"], got["detections"], strict=True):
            if len(a["scores"]) != len(b["scores"]):
                mismatched += 1
                continue
            oa, ob = _canonical(a), _canonical(b)  # equal scores may come in either order
            for k in ("boxes", "scores"):
                diff = max(diff, float(np.abs(a[k][oa].astype(np.float64) - b[k][ob]).max(initial=0.0)))
        return diff, mismatched

    def exported_predictions(self, outputs: dict[str, Any], sizes, image_size: int,
                             resize: str = "stretch") -> list[dict[str, Any]]:
        steps, preds = resize_steps(image_size, resize), []
        for d, (h, w) in zip(outputs["detections"], sizes):
            o = {k: torch.from_numpy(v) for k, v in d.items()}
            o["labels"] = o["labels"] + 1  # to_prediction takes the detectors' 1..K labels
            preds.append(to_prediction(o, input_frame(steps, h, w)))
        return preds

    def reference_outputs(self, predictor, images: list[np.ndarray]):
        preds = predictor.predict(images, batch_size=max(1, len(images)))
        return _detections_of(preds), preds

    def parity_view(self, outputs: dict[str, Any], predictions: list[dict[str, Any]]) -> dict[str, Any]:
        return _detections_of(predictions)  # in input-image pixels, as the reference

    def plot_templates(self, p) -> list[tuple[Path, dict]]:
        # one line per class (the template colours by the `class` column: .dvc/plots/linear_by_class.json)
        return [(p.pr_curve_csv, {"template": "linear_by_class", "x": "recall", "y": "precision"}),
                (p.per_class_csv, {"template": "bar_horizontal", "x": "ap", "y": "class"})]

    def headline(self, ev: dict[str, Any]) -> str:
        mask = f", mask AP {ev['mask_AP']}" if "mask_AP" in ev else ""
        return f"mAP@0.5 {ev.get('AP50')}, mAP@[.5:.95] {ev.get('AP')}{mask}"

    def tracking_metrics(self, ev: dict[str, Any]) -> dict[str, float]:
        from visionflow.evaluation.coco import STAT_NAMES

        values: dict[str, float] = {}
        for prefix, block in (("test_", ev), ("test_mask_", ev.get("segm") or {})):
            for stat in STAT_NAMES:
                if stat in block and block[stat] is not None and block[stat] >= 0:  # -1: undefined
                    values[f"{prefix}{stat}"] = block[stat]
            for name, ap in block.get("per_class_AP", {}).items():
                if ap is not None and ap >= 0:
                    values[f"{prefix}AP_{name}"] = ap
        return values

    def test_metric(self, categories: Sequence[Category], settings: Any = None) -> DetectMetric:
        return DetectMetric(categories)

    def report_test(self, params, paths, predictor, test: list[Sample], categories) -> dict[str, Any]:
        """The evaluate stage's outputs: COCO AP/AR (bbox, and segm for Mask R-CNN) with the
        evaluator's settings, the test split and predictions as COCO files, per-class PR curves
        and AP, a class confusion matrix and a grid of true and predicted boxes."""
        from visionflow.evaluation import figures
        from visionflow.evaluation.detection import match_confusion
        from visionflow.evaluation.coco import STAT_NAMES
        from visionflow.evaluation.report import grid_pick, write_csv, write_evaluation, write_jsonl
        from visionflow.core.files import write_dir, write_json

        classes = predictor.meta["classes"]
        grid_at = grid_pick(len(test), params.grid_images)
        preds: list[dict[str, Any]] = []
        grid: list[tuple] = []

        def each(samples, images, batch):
            for s, image, p in zip(samples, images, batch):
                if len(preds) in grid_at:
                    shown = [j for j, sc in enumerate(p["scores"]) if sc >= params.score_threshold]
                    truth = {"boxes": [k.bbox for k in s.instances], "labels": [k.category_id for k in s.instances]}
                    grid.append((image, truth, {k: [p[k][j] for j in shown] for k in ("boxes", "labels", "scores")}))
                preds.append(p)

        score = predictor.score(test, paths.root, categories, params, params.batch_size, each=each)
        bbox, metrics = score.extras["bbox"], {"task": self.name, "primary_metric": score.name, **score.metrics}
        cm = match_confusion(test, preds, len(classes), params.iou_threshold, params.score_threshold)
        metrics["confusion"] = {"iou_threshold": params.iou_threshold, "score_threshold": params.score_threshold,
                                "labels": [*classes, "(none)"], "matrix": cm.tolist()}
        write_json(paths.coco_gt, score.extras["coco_gt"])
        write_json(paths.coco_results, score.extras["coco_results"])
        write_jsonl(paths.predictions, ({"id": s.id, **{k: p[k] for k in ("boxes", "labels", "scores", "masks") if k in p}}
                                        for s, p in zip(test, preds)))
        if "segm" in metrics:  # Mask R-CNN: the mask numbers as columns too (the block stays in the details)
            metrics.update({f"mask_{k}": metrics["segm"][k] for k in STAT_NAMES})
        write_evaluation(paths, metrics)
        recall = bbox["recall_thresholds"]
        write_pr_curves(paths.pr_curve_csv, recall, {c: bbox["pr_curves"][c] for c in classes})
        write_csv(paths.per_class_csv, ["class", "ap", "ap50"],
                  ([c, f"{bbox['per_class'][c]:.6f}", f"{bbox['per_class_ap50'][c]:.6f}"] for c in classes))

        def draw(out: Path) -> None:
            figures.plot_pr_curves(recall, bbox["pr_curves"], bbox["per_class_ap50"], out / "pr_curves.png")
            figures.plot_per_class({c: {"AP": bbox["per_class"][c], "AP50": bbox["per_class_ap50"][c]} for c in classes},
                                   ("AP", "AP50"), "per-class AP (test, bbox)", out / "per_class.png")
            labels = [*classes, "(none)"]
            figures.plot_confusion(cm, labels, labels, f"detections at IoU {params.iou_threshold}, score >= "
                                   f"{params.score_threshold} (row (none): false positives; column: missed)",
                                   out / "confusion_matrix.png")
            figures.detection_grid(grid, classes, out / "test_predictions.png")

        write_dir(paths.figures_dir, draw)
        segm = metrics.get("segm")
        log.info("test bbox AP %.4f, AP50 %.4f%s on %d images", bbox["AP"], bbox["AP50"],
                 f", mask AP {segm['AP']:.4f}" if segm else "", len(test))
        out = {"task": self.name, "test_images": len(test), "AP": round(bbox["AP"], 4), "AP50": round(bbox["AP50"], 4)}
        if segm:
            out["mask_AP"] = round(segm["AP"], 4)
        return out

    def build_model(self, params: TrainParams, num_classes: int, pretrained: bool = True) -> nn.Module:
        return build_detector(params.model, params.image_size, num_classes, pretrained)

    def build_transforms(self, params: TrainParams):
        a = params.augment
        return (build_train_transform(a.preset, a.transforms, params.image_size, normalize=False, boxes=True,
                                      min_area=a.min_box_area, min_visibility=a.min_visibility,
                                      resize=params.resize),
                build_eval_transform(params.image_size, normalize=False, boxes=True, resize=params.resize))

    def build_dataset(self, samples, transform, project_root) -> Dataset:
        return DetectionDataset(samples, transform, Path(project_root), masks=self.carries_masks)

    @property
    def carries_masks(self) -> bool:
        """Whether the datasets carry instance masks: for a mask architecture, or when the task
        has no params to tell (then every architecture accepts them)."""
        return self.params is None or is_mask_arch(self.params.model.arch)

    def collate(self, batch: list) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """(B, 3, S, S) in [0, 1]; with resize: fit, (B, 3, H, W) of the batch's largest image, the
        others top-left and padded with 0 (their instance masks too, so they match the input)."""
        images, targets = zip(*batch)
        x = stack(images, pad=True)
        h, w = x.shape[-2:]
        return x, [{**t, "masks": F.pad(t["masks"], (0, w - t["masks"].shape[-1], 0, h - t["masks"].shape[-2]))}
                   if "masks" in t and t["masks"].shape[-2:] != (h, w) else t for t in targets]

    def loss(self, model, images, targets) -> dict[str, torch.Tensor]:
        keys = ("boxes", "labels", "masks") if has_masks(model) else ("boxes", "labels")
        if "masks" in keys and any("masks" not in t for t in targets):
            raise RuntimeError("a model with a mask head got targets without instance masks: the dataset was "
                               "built for a box-only architecture (build it with the task made from this "
                               "model's params, or with DetectionDataset(..., masks=True))")
        targets = [{k: t[k].to(images.device) for k in keys} for t in targets]
        return model(list(images), targets)

    @torch.no_grad()
    def val_metrics(self, model, loader, device) -> dict[str, float]:
        """COCO AP / AP50 (boxes; and masks for Mask R-CNN) in the model-input S x S pixels."""
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
        batch = batch_chw([transform(image=im, **fields)["image"] for im in images])  # (B, 3, S, S); fit: padded
        was_training = model.training
        model.eval()
        outputs = model(list(torch.from_numpy(batch).to(device)))
        model.train(was_training)
        return [to_prediction(o, input_frame(transform, *im.shape[:2])) for o, im in zip(outputs, images)]


def write_pr_curves(path: Path, recall: Sequence[float], curves: dict[str, Sequence[float]]) -> None:
    """plots/pr_curve.csv as a long table, one row per class and recall threshold:
    class,recall,precision. Long, so that `dvc plots show` draws one line per class from a
    template that needs no class names; COCO's -1 (no ground truth of a class) is written as 0."""
    from visionflow.evaluation.report import write_csv

    write_csv(path, ["class", "recall", "precision"],
              ([c, r, max(curve[i], 0.0)] for c, curve in curves.items() for i, r in enumerate(recall)))


def has_masks(model: nn.Module) -> bool:
    heads = getattr(model, "roi_heads", None)
    return bool(heads is not None and heads.has_mask())


def foreground(output: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop label-0 detections: RetinaNet, FCOS and SSD score the background slot like a class."""
    keep = output["labels"] > 0
    return output if bool(keep.all()) else {k: v[keep] for k, v in output.items()}


def to_prediction(output: dict[str, torch.Tensor], frame: Frame) -> dict[str, Any]:
    """One model output (S x S pixels, labels 1..K) -> the contract's prediction in the original
    image's pixels (labels 0..K-1, sorted by score, masks as COCO RLE at the original size):
    boxes through `frame` (padding off, scaled back, clipped to the image), masks cropped to the
    image's part of the input, then resized to its size."""
    h, w = frame.height, frame.width
    output = foreground(output)
    order = torch.argsort(output["scores"].float().cpu(), descending=True)
    boxes = frame.to_image(output["boxes"].float().cpu()[order].numpy())
    pred: dict[str, Any] = {"boxes": boxes.tolist(), "labels": (output["labels"].cpu()[order] - 1).tolist(),
                            "scores": output["scores"].float().cpu()[order].tolist()}
    if "masks" in output:  # (N, 1, S, S) probabilities; one at a time: N full-size float maps can be huge
        probs = frame.crop(output["masks"].float().cpu()[order])
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


def _detections_of(preds: list[dict[str, Any]]) -> dict[str, Any]:
    """Predictions -> the boxes and scores that export parity compares (input-image pixels)."""
    return {"detections": [{"boxes": np.asarray(p["boxes"], np.float32).reshape(-1, 4),
                            "scores": np.asarray(p["scores"], np.float32)} for p in preds]}


def _canonical(d: dict[str, np.ndarray]) -> np.ndarray:
    """Order of detections by score (descending), then box corners."""
    boxes = d["boxes"].reshape(-1, 4)
    return np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], -d["scores"]))


class DetectionsGraph(nn.Module):
    """A torchvision detector on a (B, 3, S, S) 0..255 batch; label 0 (background, which
    RetinaNet, FCOS and SSD can emit) dropped, labels shifted to 0..K-1, sorted by score."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        batch = [im / 255.0 for im in images.unbind(0)]  # the detector normalises inside
        if torch.jit.is_scripting():
            outputs = self.model(batch)[1]  # scripted detectors return (losses, detections)
        else:
            outputs = self.model(batch)
        result: List[Dict[str, torch.Tensor]] = []
        for o in outputs:
            keep = torch.nonzero(o["labels"] > 0).flatten()
            order = keep[torch.argsort(o["scores"][keep], descending=True)]
            d = {"boxes": o["boxes"][order], "labels": o["labels"][order] - 1, "scores": o["scores"][order]}
            if "masks" in o:
                d["masks"] = o["masks"][order]
            result.append(d)
        return result

"""The task contract: classify, detect, segment and multilabel each provide these pieces, from
training to serving (docs/tasks.md); the one engine (visionflow.training.engine) trains them all,
and evaluate, the promotion gate, export parity, predict, serve, the pyfunc and FiftyOne call
the same pieces, never a task's name.

Data crossing the boundary (category ids index `categories.json`, 0..K-1):
    images   Tensor (B, 3, H, W) float on the engine's device: normalised for classify and
             segment; in [0, 1] for detect (torchvision detectors normalise inside)
    targets  classify: (B,) int64 class ids
             detect:   list of B dicts {"boxes": (N, 4) float xyxy absolute pixels of the
                       resized image, "labels": (N,) int64 in 1..K (0 is the detectors'
                       background), "masks": (N, H, W) uint8 (Mask R-CNN only)}
             segment:  (B, H, W) int64, 0 background, c + 1 for category c, 255 ignored (also
                       the letterbox padding)
             multilabel: list of B lists of class ids (multi-hot (B, K) built in the loss)
Predictions (Task.predict), in each input image's own pixel coordinates:
    classify {"label": int, "confidence": float, "probs": [float] * K}
    detect   {"boxes": [[x1, y1, x2, y2]], "labels": [int 0..K-1], "scores": [float],
              "masks": [COCO RLE] (Mask R-CNN only)}
    segment  {"mask": (H, W) uint8 ndarray, 0 background, c + 1 for category c}
    multilabel {"labels": [int] the classes at or above their thresholds, "scores": [float],
              "probs": [float] * K}
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import albumentations as A
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from visionflow.core.config import TASK_OPTIONS, TrainParams
from visionflow.manifest import Category, Instance, Sample

IGNORE_INDEX = 255  # segment targets: pixels that count for neither loss nor metrics


@dataclass
class TestScore:
    """A model's score on labelled samples, from the task's one scoring path (Task.test_metric):
    the evaluate stage, the promotion gate and export parity all take their numbers from here,
    so they are equal by construction.

    name        the primary test metric (accuracy, AP50, miou), a key of evaluate.json
    value       its value on the samples
    per_class   {class name: per-class value} for the classes where it is defined
    per_class_name  what per_class holds (F1, AP50, IoU)
    resample    (B, N) per-image weights (bootstrap counts) -> (B,) primary metric on each
                re-weighted sample set; all ones gives `value`
    metrics     everything evaluate.json records for the task
    extras      what the evaluate stage writes beside the metrics (COCO files, curves)
    """

    name: str
    value: float
    per_class: dict[str, float]
    per_class_name: str
    resample: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)


class TestMetric(Protocol):
    """Streaming: fed batch by batch (large predictions such as full-size masks are reduced as
    they come), then computed once."""

    def process(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> None: ...

    def compute(self) -> TestScore: ...


class Normalize(nn.Module):
    """0..255 RGB (B, 3, S, S) -> (x / 255 - mean) / std, as the eval transform's A.Normalize:
    the exported graphs carry their normalisation inside."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def eval_batch(images: Sequence[np.ndarray], transform: A.Compose) -> torch.Tensor:
    """RGB uint8 images of any size through the eval transform -> (B, 3, S, S) float32."""
    return torch.from_numpy(np.stack([transform(image=im)["image"].transpose(2, 0, 1) for im in images]))


def resize_of(meta: dict[str, Any]) -> str:
    """train.resize of a model folder's meta.json; stretch for models trained before the field
    existed (they were all trained stretched)."""
    return (meta.get("params") or {}).get("resize", "stretch")


def mean_std(meta: dict[str, Any]) -> tuple[list[float], list[float]]:
    """The normalisation a model folder was trained with (ImageNet's when meta.json predates it)."""
    from visionflow.training.augment import IMAGENET_MEAN, IMAGENET_STD

    return list(meta.get("mean", IMAGENET_MEAN)), list(meta.get("std", IMAGENET_STD))


def nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over axis 1 ignoring NaN; an all-NaN row (a resample with nothing defined) is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=1)


@dataclass(frozen=True)
class DataProfile:
    """What a dataset's labels can train (visionflow init asks each task with `fits`)."""
    images: int
    single_label: int  # images with exactly one image-level class
    multi_label: int   # images with several image-level classes
    boxes: int         # non-crowd objects with a box
    shapes: int        # objects with a polygon or mask outline
    classes: int

    @classmethod
    def of(cls, samples: Sequence[Sample], classes: int) -> "DataProfile":
        objects = [i for s in samples for i in s.instances if not i.iscrowd]
        return cls(images=len(samples), single_label=sum(len(set(s.labels)) == 1 for s in samples),
                   multi_label=sum(len(set(s.labels)) > 1 for s in samples), boxes=len(objects),
                   shapes=sum(bool(i.polygons or i.rle) for i in objects), classes=classes)


class TaskBase:
    """What every task is built with (visionflow.tasks.get_task): the TrainParams it trains with,
    where its loss has settings (segment: dice_weight); None when it only predicts."""

    name: str  # the task's key in visionflow.tasks and in config.TASK_OPTIONS (each task class sets it)
    # bytes a batch's targets take per image pixel as the loader hands them over (segment: its
    # uint8 masks); doctor's shared-memory estimate adds them to the images' (target_bytes)
    target_bytes_per_pixel = 0
    # whether the targets hold a uint8 (S, S) mask per instance (detect with a mask architecture)
    carries_masks = False

    def __init__(self, params: Optional[TrainParams] = None):
        self.params = params

    def target_bytes(self, pixels: int, instances: float = 0.0) -> float:
        """Bytes of one image's targets as the loader hands them over, for an image of `pixels`
        pixels holding `instances` objects: the per-pixel targets, and a mask per instance where
        the targets carry them (doctor's shared-memory estimate)."""
        return (self.target_bytes_per_pixel + (instances if self.carries_masks else 0)) * pixels

    @property
    def reduces_decode(self) -> bool:
        """train.decode: reduced applies (JPEGs decoded at 1/2-1/8 scale, augment.decode_fit): the
        task's TaskOptions say so (its predictions carry no pixel coordinates: classify, multilabel)."""
        return TASK_OPTIONS[self.name].reduced_decode

    def decode_for(self, decode: str) -> str:
        """What a train.decode setting means for this task: itself where the task reduces, else full."""
        return decode if self.reduces_decode else "full"

    @property
    def decode_mode(self) -> str:
        """What the datasets decode with: train.decode where this task reduces, else full."""
        return self.decode_for(self.params.decode) if self.params is not None else "full"

    def eval_outputs(self, paths) -> list:
        """What the evaluate stage writes besides predictions and figures (DVC outs)."""
        return []

    # What a class activation map explains (visionflow.evaluation.explain): "class" (Grad-CAM of
    # a class logit: classify, multilabel), "boxes" (detect), "region" (segment)
    cam_kind = "class"

    # train_history.csv columns `dvc plots show` draws over the epochs (they must be in the file)
    history_fields: tuple[str, ...] = ("train_loss", "val_loss")

    def fits(self, data: DataProfile) -> Optional[str]:
        """Why this task can train on data like this (shown by `visionflow init`), or None."""
        return None

    def calibrate(self, model: nn.Module, val_loader, device: torch.device) -> dict[str, Any]:
        """After training, on the best weights: settings chosen on the val split that travel in
        meta.json (multilabel: per-class thresholds). Default: none."""
        return {}

    def configure(self, meta: dict[str, Any]) -> None:
        """Take the settings calibrate() chose, from a model folder's meta.json."""

    # --- the deploy face: predictions as records (predict, serve, pyfunc) -------------------
    writes_csv = False  # batch prediction to .csv (one row per image, csv_columns)
    csv_columns: tuple[str, ...] = ()
    count_unit = "images"  # what the summary of `visionflow predict` counts per class ({min_score} filled in)
    object_unit: Optional[str] = None  # what a record holds several of (detections, labels), if anything

    def objects(self, record: dict[str, Any]) -> int:
        return 0

    def nothing_found(self, meta: dict[str, Any], min_score: float, returned: int) -> str:
        return ""

    def json_record(self, record: dict[str, Any]) -> dict[str, Any]:
        return record

    def served_record(self, record: dict[str, Any]) -> dict[str, Any]:
        return record

    # --- the FiftyOne face (visionflow.integrations.fiftyone renders each label kind) defaults ---
    def predicted_labels(self, record: dict[str, Any]) -> list[int]:
        return []

    def resolve_record(self, record: dict[str, Any], folder) -> None:
        pass

    def shown_record(self, record: dict[str, Any], min_confidence: float) -> dict[str, Any]:
        return record

    def unlabelled(self, samples: Sequence[Sample]) -> list[str]:
        """Ids of samples the test metric cannot score (checked before minutes of work)."""
        return []

    # --- the export face (visionflow.deploy.export) defaults ---
    parity_counts_mismatches = False  # detect: images whose exported detection count differs

    def input_resize(self, meta: dict[str, Any]) -> str:
        """How images become the model's S x S input (training.augment.resize_steps): the model
        folder's train.resize (`resize_of`) where the task honours it (TaskOptions.resize: detect,
        segment), else stretch."""
        resize = resize_of(meta)
        return resize if resize in TASK_OPTIONS[self.name].resize else "stretch"

    def input_normalization(self, meta: dict[str, Any]) -> dict[str, Any]:
        mean, std = mean_std(meta)
        return {"normalization": "inside the graph: (x / 255 - mean) / std", "mean": mean, "std": std}

    def parity_view(self, outputs: dict[str, Any], predictions: list[dict[str, Any]]) -> dict[str, Any]:
        return outputs

    def agreement(self, reference: list[dict[str, Any]], exported: list[dict[str, Any]]) -> Optional[int]:
        return None


class Task(Protocol):
    name: str
    primary_metric: str  # the validation metric early stopping watches by default (e.g. val_map50)

    def build_model(self, params: TrainParams, num_classes: int, pretrained: bool = True) -> nn.Module:
        """`pretrained=False` rebuilds the architecture only (to load trained weights into)."""

    def build_transforms(self, params: TrainParams) -> tuple[A.Compose, A.Compose]:
        """(train, eval) Albumentations pipelines; train is serialised to MLflow."""

    def build_dataset(self, samples: Sequence[Sample], transform: A.Compose, project_root) -> Dataset: ...

    def collate(self, batch: list) -> tuple[torch.Tensor, Any]: ...

    def loss(self, model: nn.Module, images: torch.Tensor, targets: Any) -> dict[str, torch.Tensor]:
        """Named losses (model in train mode); the engine sums them and logs each."""

    def val_metrics(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        """Validation metrics for early stopping, keys prefixed `val_`."""

    def predict(self, model: nn.Module, images: list[np.ndarray], transform: A.Compose,
                device: torch.device) -> list[dict[str, Any]]:
        """RGB uint8 (H, W, 3) images of any size -> one prediction per image (see above)."""

    def test_metric(self, categories: Sequence[Category], settings: Any = None) -> TestMetric:
        """The test metric over (samples, predictions); `settings` is the branch's EvaluateParams
        (top_k, thresholds) or None for the defaults."""

    def report_test(self, params, paths, predictor, test: list[Sample], categories) -> dict[str, Any]:
        """The evaluate stage: score the test split (test_metric) and write metrics/<task>/evaluate.json
        (scalars, with `task` and `primary_metric`) and its details (evaluation.report.write_evaluation),
        the predictions JSONL, plots and figures; returns a summary."""

    def eval_outputs(self, paths) -> list: ...

    def eval_plots(self, paths) -> list:
        """The evaluate stage's DVC plot files."""

    def plot_templates(self, paths) -> list[tuple]:
        """(plot file, DVC plot spec) for `dvc plots show`."""

    def headline(self, eval_metrics: dict[str, Any]) -> str:
        """One line of test metrics for the end-of-run summary."""

    def tracking_metrics(self, eval_metrics: dict[str, Any]) -> dict[str, float]:
        """evaluate.json with its details (evaluation.report.read_evaluation) -> the MLflow run's
        test_* metrics."""

    # The deploy face. A record is a prediction (above) made plain for people and files: class
    # names beside ids, rounded numbers; in each input image's own pixels.
    pyfunc_columns: dict[str, str]  # the pyfunc output column -> MLflow schema type, in order
    writes_csv: bool
    count_unit: str
    object_unit: Optional[str]

    def objects(self, record: dict[str, Any]) -> int:
        """How many `object_unit` a record holds, whatever their score (what the output file has)."""

    def nothing_found(self, meta: dict[str, Any], min_score: float, returned: int) -> str:
        """Why a predict run counted nothing, naming the threshold that left nothing and how to
        lower it; `returned` objects came back from the model in all, `meta` is its meta.json."""

    def record(self, prediction: dict[str, Any]) -> dict[str, Any]:
        """A Predictor's output (with names) -> the plain record."""

    def frame_columns(self, predictions: list[dict[str, Any]]) -> dict[str, tuple[list, Any]]:
        """Predictions -> the pyfunc's output columns: {name: (values, pandas dtype)}."""

    def from_frame_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """One pyfunc output row -> the record."""

    def json_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record as JSON (segment: the mask as one COCO RLE per class present)."""

    def coco_entries(self, image_id: int, where: dict[str, Any], record: dict[str, Any],
                     classes: list[str]) -> list[dict[str, Any]]:
        """One image's record as COCO results entries (only for tasks that do not write CSV)."""

    def count(self, record: dict[str, Any], counts, min_score: float, classes: list[str]) -> None:
        """Add the record to the per-class counts of the predict summary."""

    def served_record(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record as `visionflow serve` answers it."""

    # The FiftyOne face: which of FiftyOne's label kinds the task's ground truth and predictions
    # are (visionflow.integrations.fiftyone, the only module that imports fiftyone, renders each kind), and
    # how the evaluate stage's predictions JSONL reads back.
    fiftyone_label: str  # "classification" | "detections" | "segmentation"
    jsonl_keys: tuple[str, ...]  # the keys every predictions_test.jsonl record has

    def predicted_labels(self, record: dict[str, Any]) -> list[int]:
        """The category ids a JSONL record names (checked against categories.json)."""

    def resolve_record(self, record: dict[str, Any], folder) -> None:
        """Make a JSONL record's file references absolute (segment: the mask PNG), in place;
        raise FileNotFoundError for a missing one."""

    def shown_record(self, record: dict[str, Any], min_confidence: float) -> dict[str, Any]:
        """The record as the App shows it (detect: boxes scoring >= min_confidence)."""

    # The review face (visionflow.stages.review): how strongly a labelled sample and the model's
    # prediction disagree, as a score in [0, 1] and a reason (visionflow.evaluation.review).
    # `record` is the sample's predictions JSONL record (resolved); `settings` its ReviewParams.
    def review_signal(self, sample: Sample, record: dict[str, Any], names: list[str], settings: Any):
        """-> visionflow.evaluation.review.Signal"""

    def embedding_module(self, model: nn.Module) -> tuple[nn.Module, bool]:
        """(module, take its input?) whose activations are an image's embedding for the review's
        2-D map (evaluation.review.EmbeddingRecorder): a classifier's head input, a detector's
        backbone output, a segmenter's deepest block."""

    # The relabel face (visionflow.relabel, `visionflow annotate`): what of a sample the task
    # labels, as an annotation tool shows it, and how a person's correction of that part goes back
    # into the sample. Category ids are the sample's own; `record` a resolved JSONL record.
    relabel_controls: tuple[str, ...]  # Label Studio controls (formats.labelstudio.label_config)
    single_choice: bool  # classify: one class an image

    def label_view(self, sample: Sample) -> Sample:
        """The sample with only what this task labels (classify: the image class; detect: boxes;
        segment: outlines), nothing else: what the annotator is shown and may change."""

    def prediction_view(self, sample: Sample, record: dict[str, Any], settings: Any) -> Sample:
        """The model's prediction for the sample in the same shape as `label_view` (settings: the
        branch's ReviewParams; detect keeps boxes scoring >= min_confidence)."""

    def apply_correction(self, sample: Sample, corrected: Sample) -> Sample:
        """`sample` with its labelled part replaced by `corrected` (a label view read back from the
        tool): everything else is kept, and an object the person left as it was keeps what the
        view did not show (its mask, attributes, crowd flag)."""

    # The export face (visionflow.deploy.export). Every exported graph takes "images" float32
    # (B, 3, S, S), RGB 0..255, already resized to S x S (stretched or letterboxed, as the model's
    # input_resize says); normalisation happens inside.
    export_formats: tuple[str, ...]  # the first is what --format auto picks
    export_outputs: dict[str, str]  # output name -> meaning (the sidecar and docs say it)
    parity_counts_mismatches: bool

    def export_graph(self, model: nn.Module, meta: dict[str, Any]) -> nn.Module:
        """The module that is exported: model + pre- and post-processing, eval mode."""

    def input_normalization(self, meta: dict[str, Any]) -> dict[str, Any]:
        """What the sidecar says of the graph's normalisation."""

    def outputs_to_numpy(self, out: Any) -> dict[str, Any]:
        """A graph's eager / TorchScript output -> {output name: ndarray} (detect: a list)."""

    def output_diff(self, ref: dict[str, Any], got: dict[str, Any]) -> tuple[float, int]:
        """(max |ref - got| on the compared quantity, images whose result count differs)."""

    def input_resize(self, meta: dict[str, Any]) -> str:
        """How images become the graph's S x S input for this model: "stretch" | "letterbox"
        (visionflow.training.augment.resize_steps; export.preprocess takes it)."""

    def exported_predictions(self, outputs: dict[str, Any], sizes, image_size: int,
                             resize: str = "stretch") -> list[dict[str, Any]]:
        """An exported file's outputs -> predictions (as Task.predict) at each image's (H, W);
        `resize` is the model's input_resize (boxes and masks are mapped back through it)."""

    def reference_outputs(self, predictor, images: list[np.ndarray]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """PyTorch's outputs (the exported layout) and predictions through the model folder."""

    def parity_view(self, outputs: dict[str, Any], predictions: list[dict[str, Any]]) -> dict[str, Any]:
        """What of an exported file's outputs parity compares with reference_outputs."""

    def agreement(self, reference: list[dict[str, Any]], exported: list[dict[str, Any]]) -> Optional[int]:
        """How many predictions agree exactly (classify: labels), or None."""


class Predictor(Protocol):
    meta: dict[str, Any]

    def predict(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """RGB uint8 (H, W, 3) images -> one prediction dict per image."""


# --- the relabel face's shared pieces --------------------------------------------------------------

RELABEL_TOLERANCE_PX = 0.5  # a corrected box or outline within this of the original is the original


def same_box(a: Sequence[float], b: Sequence[float], tol: float = RELABEL_TOLERANCE_PX) -> bool:
    return len(a) == len(b) == 4 and all(abs(x - y) <= tol for x, y in zip(a, b))


def same_outline(a: Instance, b: Instance, tol: float = RELABEL_TOLERANCE_PX) -> bool:
    """Same polygons (ring by ring, point by point) or, for masks, the same RLE."""
    if a.rle is not None or b.rle is not None:
        return a.rle == b.rle
    return len(a.polygons) == len(b.polygons) and all(
        len(p) == len(q) and all(abs(x - y) <= tol for x, y in zip(p, q)) for p, q in zip(a.polygons, b.polygons))


def merge_instances(original: Sequence[Instance], corrected: Sequence[Instance],
                    same: Callable[[Instance, Instance], bool]) -> list[Instance]:
    """The corrected objects, each replaced by the original object it matches (same category and
    `same` geometry) so that what the annotation tool never showed (a box's mask, attributes)
    survives an object the person did not change. Unmatched originals were deleted or changed."""
    pool = list(original)
    out = []
    for c in corrected:
        match = next((o for o in pool if o.category_id == c.category_id and same(o, c)), None)
        if match is not None:
            pool.remove(match)
        out.append(match if match is not None else c)
    return out

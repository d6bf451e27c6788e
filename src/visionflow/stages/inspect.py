"""Inspect stage: load one split, its ground truth and the model's predictions into FiftyOne.

Inputs: the manifest and category table (ingest), the split assignment (split) and the
test predictions (evaluate). Output: a persistent FiftyOne dataset named
`inspect.dataset_name` and a JSON summary at `paths.inspection`. FiftyOne itself is only
touched through visionflow.integrations.fiftyone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visionflow.core.config import InspectParams, dataset_name
from visionflow.core.errors import DataError
from visionflow.core.files import write_json
from visionflow.manifest import read_categories, read_manifest, samples_in_split
from visionflow.core.paths import Paths

def read_predictions(path: Path, num_classes: int, task: str) -> dict[str, dict[str, Any]]:
    """Predictions JSONL of the evaluate stage -> {sample id: record} (keys: the task's jsonl_keys)."""
    from visionflow.tasks import get_task

    contract = get_task(task)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: predictions not found; run the evaluate stage first "
                                f"(visionflow stage evaluate-{task})")
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
            missing = [k for k in contract.jsonl_keys if k not in rec]
            if missing:
                raise DataError(path, f"missing keys {missing}", record=f"line {lineno}",
                                hint="re-run the evaluate stage")
            bad = [v for v in contract.predicted_labels(rec) if not 0 <= v < num_classes]
            if bad:
                raise DataError(path, f"label {bad[0]} outside the {num_classes} categories",
                                record=f"line {lineno}", hint="predictions and categories.json disagree; "
                                "re-run train and evaluate")
            try:
                contract.resolve_record(rec, path.parent)
            except FileNotFoundError as exc:
                raise DataError(path, str(exc), record=f"line {lineno}", hint="re-run the evaluate stage") from None
            preds[rec["id"]] = rec
    return preds


def read_cams(figures: Path) -> dict[str, Path]:
    """{sample id: class activation map PNG (8-bit grey)} the evaluate stage drew for its grid
    images (figures/cams.json, visionflow.evaluation.explain); {} when there are none."""
    index = Path(figures) / "cams.json"
    if not index.is_file():
        return {}
    files = json.loads(index.read_text(encoding="utf-8"))
    return {k: (index.parent / v).resolve() for k, v in files.items() if (index.parent / v).is_file()}


def inspect(params: InspectParams, paths: Paths) -> dict[str, Any]:
    samples = read_manifest(paths.manifest)
    categories = read_categories(paths.categories)
    split_samples = samples_in_split(samples, paths.split_file, params.split)
    predictions = read_predictions(paths.predictions, len(categories), paths.task)
    from visionflow.tasks import get_task

    contract = get_task(paths.task)
    predictions = {k: contract.shown_record(v, params.min_confidence) for k, v in predictions.items()}

    from visionflow.integrations.fiftyone import OPEN_COMMAND, write_split_dataset  # imports fiftyone

    name = dataset_name(paths.task, params)
    summary = write_split_dataset(name, split_samples, categories, predictions, project_root=paths.root,
                            split=params.split, task=paths.task, iou_threshold=params.iou_threshold,
                            heatmaps=read_cams(paths.figures_dir))
    known = {s.id for s in split_samples}
    summary.update({
        "split": params.split,
        # Predictions for ids outside the split mean predictions.jsonl is stale.
        "unmatched_predictions": sum(1 for pid in predictions if pid not in known),
        "open_with": f"{OPEN_COMMAND} --task {paths.task}",
    })
    write_json(paths.inspection, summary)
    return summary

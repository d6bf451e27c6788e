"""Export parity: the exported file against the model folder it came from, on labelled samples.

Both run on the same images: PyTorch through the model folder's own eval transform and task code,
the file through `export.preprocess` and the task's post-processing; the outputs are compared by
the task (Task.output_diff) and both sides are scored by the task's test metric (the number the
evaluate stage and the promotion gate report). The promotion gate calls `export_and_check`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from visionflow.core.errors import UserError
from visionflow.core.files import write_json
from visionflow.deploy.export import (METRIC_TOLERANCE, TOLERANCE, ExportedModel, _check_suffix, _export, _task,
                                      default_export_path, load_exported, load_model_folder, preprocess,
                                      resolve_format, sidecar_path)


def _parity(predictor, exported: ExportedModel, samples: Sequence, project_root: Path, tolerance: float,
            metric_tolerance: float, batch_size: int) -> dict[str, Any]:
    from visionflow.manifest.images import load_rgb

    from visionflow.manifest import Category

    meta = predictor.meta
    task, size = meta["task"], int(meta["image_size"])
    _check_samples(task, samples)
    # Both sides scored by the task's own test metric: the evaluate stage's and the gate's numbers.
    categories = [Category(i, name) for i, name in enumerate(meta["classes"])]
    contract = predictor.task
    torch_score, export_score = contract.test_metric(categories), contract.test_metric(categories)
    diff, mismatched, agree = 0.0, 0, None
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        images = [load_rgb(s.image_path(project_root)) for s in chunk]
        ref_out, ref = contract.reference_outputs(predictor, images)
        out = exported(preprocess(images, size))
        got = contract.exported_predictions(out, [im.shape[:2] for im in images], size)
        d, m = contract.output_diff(ref_out, contract.parity_view(out, got))
        diff, mismatched = max(diff, d), mismatched + m
        agreed = contract.agreement(ref, got)
        if agreed is not None:
            agree = (agree or 0) + agreed
        torch_score.process(chunk, ref)
        export_score.process(chunk, got)
    ref_score, got_score = torch_score.compute(), export_score.compute()
    metric_torch, metric_export = ref_score.value, got_score.value
    same_metric = abs(metric_export - metric_torch) <= metric_tolerance or \
        (math.isnan(metric_export) and math.isnan(metric_torch))  # undefined on both sides (nothing labelled)
    result = {"n": len(samples), "max_abs_diff": diff, "tolerance": tolerance, "metric": ref_score.name,
              "metric_torch": metric_torch, "metric_export": metric_export, "metric_tolerance": metric_tolerance,
              "within_tolerance": bool(diff <= tolerance and same_metric and mismatched == 0)}
    if agree is not None:
        result["agreement"] = agree / len(samples)
    if contract.parity_counts_mismatches:
        result["mismatched_images"] = mismatched
    return result


def _check_samples(task: str, samples: Sequence) -> None:
    if not samples:
        raise UserError("parity check: no labelled samples given (pass the test split's samples)")
    unlabelled = _task(task).unlabelled(samples)
    if unlabelled:
        raise UserError(f"parity check: {len(unlabelled)} samples have no label to score, e.g. {unlabelled[:3]}")


def check_parity(model_dir: str | Path, exported_path: str | Path, samples: Sequence, project_root: str | Path = ".",
                 tolerance: float = TOLERANCE, metric_tolerance: float = METRIC_TOLERANCE,
                 batch_size: int = 16) -> dict[str, Any]:
    """Compare the model folder (PyTorch through its own eval transform and task code) with the
    exported file (fed through `preprocess`) on labelled manifest samples.

    Returns {"n", "max_abs_diff" (see TOLERANCE; detect: over images with as many detections),
    "tolerance", "metric" (accuracy / miou / AP50), "metric_torch", "metric_export",
    "metric_tolerance", "within_tolerance"}, plus "agreement" (classify: share of equal labels)
    or "mismatched_images" (detect: images with another number of detections).
    within_tolerance: max_abs_diff <= tolerance, |metric difference| <= metric_tolerance and
    no mismatched images."""
    predictor = load_model_folder(model_dir)
    exported = load_exported(exported_path, predictor.meta["task"])
    if exported.task != predictor.meta["task"]:
        raise UserError(f"{exported_path}: a {exported.task} export, but {model_dir} is a {predictor.meta['task']} model")
    return _parity(predictor, exported, list(samples), Path(project_root), tolerance, metric_tolerance, batch_size)


def export_and_check(model_dir: str | Path, test_samples: Sequence, project_root: str | Path = ".",
                     tolerance: float = TOLERANCE, *, fmt: str = "auto", out_path: str | Path | None = None,
                     metric_tolerance: float = METRIC_TOLERANCE) -> dict[str, Any]:
    """Export (as export_model) and check parity on `test_samples` (as check_parity); the figures
    go into the sidecar too. Returns {"format", "path", "bytes", **check_parity's result}: what the
    promotion gate reads."""
    model_dir = Path(model_dir)
    predictor = load_model_folder(model_dir)
    task = predictor.meta["task"]
    fmt = resolve_format(task, fmt)
    _check_samples(task, test_samples)  # before the minutes an export can take
    out = Path(out_path) if out_path is not None else default_export_path(model_dir, fmt)
    _check_suffix(out, fmt)
    info, exported = _export(predictor, model_dir, fmt, out)
    parity = _parity(predictor, exported, list(test_samples), Path(project_root), tolerance,
                     metric_tolerance, batch_size=16)
    info["parity"]["samples"] = parity
    write_json(sidecar_path(out), {k: v for k, v in info.items() if k != "path"})
    return {"format": fmt, "path": str(out), "bytes": info["bytes"], **parity}


def parity_line(parity: dict[str, Any]) -> str:
    """One line for people: the output difference and, on labelled samples, the metric of both."""
    if "metric" not in parity:  # the export's own self-check
        return (f"parity vs PyTorch on synthetic images (batch 1 and 3): max |diff| {parity['max_abs_diff']:.3g}"
                + (f", {parity['mismatched_images']} image(s) with another detection count"
                   if parity.get("mismatched_images") else ""))
    verdict = "within" if parity["within_tolerance"] else "NOT within"
    return (f"parity vs PyTorch on {parity['n']} test samples: max |diff| {parity['max_abs_diff']:.3g}, "
            f"{parity['metric']} {parity['metric_export']:.4f} exported vs {parity['metric_torch']:.4f} PyTorch: "
            f"{verdict} tolerance ({parity['tolerance']:g} outputs, {parity['metric_tolerance']:g} metric)")

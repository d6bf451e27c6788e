"""Export parity: the exported file against the model folder it came from, on labelled samples;
and the `visionflow export-model` command, which exports (deploy/export.py) and then checks.

Both run on the same images: PyTorch through the model folder's own eval transform and task code,
the file through `export.preprocess` and the task's post-processing; the outputs are compared by
the task (Task.output_diff) and both sides are scored by the task's test metric (the number the
evaluate stage and the promotion gate report). The promotion gate calls `export_and_check`.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from visionflow.core.errors import UserError
from visionflow.core.files import read_json, write_json
from visionflow.deploy.export import (INPUT_NAME, METRIC_TOLERANCE, TOLERANCE, ExportedModel, check_suffix,
                                      default_export_path, load_exported, load_model_folder, preprocess,
                                      resolve_format, sidecar_path, write_export)
from visionflow.tasks import get_task


def _parity(predictor, exported: ExportedModel, samples: Sequence, project_root: Path, tolerance: float,
            metric_tolerance: float, batch_size: int) -> dict[str, Any]:
    from visionflow.manifest import Category

    meta = predictor.meta
    task, size = meta["task"], int(meta["image_size"])
    resize = predictor.task.input_resize(meta)
    _check_samples(task, samples)
    # Both sides scored by the task's own test metric: the evaluate stage's and the gate's numbers.
    categories = [Category(i, name) for i, name in enumerate(meta["classes"])]
    contract = predictor.task
    torch_score, export_score = contract.test_metric(categories), contract.test_metric(categories)
    diff, mismatched, agree = 0.0, 0, None
    for i in range(0, len(samples), batch_size):
        loaded = samples[i:i + batch_size]
        loaded_images = [predictor.read(s.image_path(project_root)) for s in loaded]  # as trained (train.decode)
        # both sides get the batches prediction makes (under resize: fit, one per orientation)
        for batch in predictor.batches(loaded_images, batch_size):
            chunk, images = [loaded[k] for k in batch], [loaded_images[k] for k in batch]
            ref_out, ref = contract.reference_outputs(predictor, images)
            out = exported(preprocess(images, size, resize))
            got = contract.exported_predictions(out, [im.shape[:2] for im in images], size, resize)
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
    unlabelled = get_task(task).unlabelled(samples)
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
    check_suffix(out, fmt)
    info, exported = write_export(predictor, model_dir, fmt, out)
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


# --- the command line (visionflow export-model) ---------------------------------------------

@contextlib.contextmanager
def local_model_dir(spec: str, tracking_uri: Callable[[], str]) -> Iterator[Path]:
    """A model folder, or an MLflow model URI whose model folder is downloaded to a temporary
    folder for the duration (`tracking_uri` is called only for a URI)."""
    from visionflow.deploy.references import is_registry_uri

    if is_registry_uri(spec):
        from visionflow.integrations import mlflow as tracking

        with tempfile.TemporaryDirectory(prefix="visionflow-export-") as tmp:
            yield tracking.download_model_dir(spec, tracking_uri(), tmp)
    else:
        yield Path(spec)


def project_test_samples(params_file: Optional[Path], meta: dict[str, Any], limit: int) -> tuple[list, Optional[Path], str]:
    """(the first `limit` test samples of the project of `params_file`, its root, a note saying
    which samples or why none): the labelled samples for the CLI's parity check."""
    from visionflow.manifest import read_categories, read_manifest, samples_in_split
    from visionflow.core.paths import Paths

    if limit <= 0:
        return [], None, "--samples 0: parity checked on synthetic images only"
    if params_file is None or not params_file.is_file():
        return [], None, ("no params.yaml here: parity checked on synthetic images only (pass --params of "
                          "the project to check the metric on its test split)")
    paths = Paths(params_file.resolve().parent)
    if not all(p.is_file() for p in (paths.manifest, paths.split_file, paths.categories)):
        return [], None, f"{paths.root} has no ingested, split data: parity checked on synthetic images only"
    names = [c.name for c in read_categories(paths.categories)]
    if names != list(meta["classes"]):
        return [], None, (f"{paths.categories} names other classes than the model ({names} vs {meta['classes']}): "
                          f"parity checked on synthetic images only")
    test = samples_in_split(read_manifest(paths.manifest), paths.split_file, "test")[:limit]
    if not test:
        return [], None, f"{paths.split_file}: the test split is empty: parity checked on synthetic images only"
    return test, paths.root, f"labelled samples: the first {len(test)} of {paths.split_file}'s test split"


def run_export(spec: str, fmt: str, out: str | Path, tracking_uri: Callable[[], str],
               params_file: Optional[Path] = None, max_samples: int = 64,
               tolerance: float = TOLERANCE, metric_tolerance: float = METRIC_TOLERANCE,
               log_to_version: bool = True) -> dict[str, Any]:
    """`visionflow export-model`: export `spec` (a model folder or an MLflow model URI) to `out`
    and check parity on the project's test split when there is one. A registered version
    (models:/NAME@ALIAS or models:/NAME/VERSION) also gets the file and its sidecar logged
    to it (tracking.log_exported) unless `log_to_version` is false. Returns the sidecar's
    contents plus "path", "note" and "logged" (the artifact URI, or None)."""
    out = Path(out)
    with local_model_dir(spec, tracking_uri) as model_dir:
        predictor = load_model_folder(model_dir)
        meta = predictor.meta
        fmt = resolve_format(meta["task"], fmt)
        check_suffix(out, fmt)
        samples, root, note = project_test_samples(params_file, meta, max_samples)
        info, exported = write_export(predictor, model_dir, fmt, out, source=spec)
        if samples:
            info["parity"]["samples"] = _parity(predictor, exported, samples, root, tolerance, metric_tolerance, 16)
            write_json(sidecar_path(out), {k: v for k, v in info.items() if k != "path"})
    logged = None
    if spec.startswith("models:/") and log_to_version:  # a registered version: attach the file to it
        from visionflow.integrations import mlflow as tracking

        uri = tracking_uri()
        ref = tracking.describe_model_uri(spec, uri)
        if ref["version"] is not None:
            parity = info["parity"].get("samples") or info["parity"]["self_check"]
            logged = tracking.log_exported(ref["model_name"], ref["version"], ref["run_id"], [out, sidecar_path(out)],
                                           uri, export_tags(out, parity))
    return {**info, "note": note, "logged": logged}


def export_tags(path: str | Path, parity: dict[str, Any]) -> dict[str, str]:
    """Model version tags describing an exported file (format and sha256 from its sidecar, which
    the export wrote) and its parity check."""
    side = read_json(sidecar_path(path))
    on = f"{parity['n']} test images" if "n" in parity else "synthetic images (self-check)"
    within = parity.get("within_tolerance", True)  # the self-check raises ExportError when it is not
    return {"export.format": side["format"], "export.sha256": side["sha256"],
            "export.max_abs_diff": f"{parity['max_abs_diff']:.3g}", "export.parity_on": on,
            "export.within_tolerance": str(bool(within)).lower()}


def format_report(result: dict[str, Any]) -> str:
    size = result["image_size"]
    what = f"{result['format']}" + (f" opset {result['opset']}" if result.get("opset") else "")
    lines = [f"wrote {result['path']} ({result['bytes'] / 1e6:.1f} MB, {what}, {result['task']}; input "
             f"{INPUT_NAME}: float32 (B, 3, {size}, {size}) RGB 0..255; outputs: "
             f"{', '.join(o['name'] for o in result['outputs'])})",
             f"details in {sidecar_path(result['path'])}",
             parity_line(result["parity"]["self_check"])]
    if "samples" in result["parity"]:
        lines.append(parity_line(result["parity"]["samples"]))
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    if result.get("logged"):
        lines.append(f"logged to the model version: {result['logged']} (tags export.*)")
    return "\n".join(lines)

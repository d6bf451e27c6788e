"""Register stage: log the trained model's run to MLflow and register it with an alias.

Provenance tags (git commit, data hashes) are computed here; everything MLflow is in
visionflow.integrations.mlflow. The result is also written to `paths.registration`.
"""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import yaml

from visionflow.core.config import RegisterParams, model_name
from visionflow.core.errors import UserError
from visionflow.core.files import file_digest, read_json, write_json
from visionflow.core.paths import Paths

log = logging.getLogger(__name__)

UI_COMMAND = "visionflow ui mlflow"


def _inputs(paths: Paths) -> list[tuple[Path, str]]:
    """(file, stage that makes it) for everything the stage reads."""
    return [
        (paths.model_dir / "model.pt", "train"),
        (paths.model_dir / "meta.json", "train"),
        (paths.model_dir / "augment.json", "train"),
        (paths.train_metrics, "train"),
        (paths.train_history, "train"),
        (paths.eval_metrics, "evaluate"),
        (paths.figures_dir, "evaluate"),
        (paths.manifest, "ingest"),
        (paths.split_file, "split"),
    ]


def check_inputs(paths: Paths) -> None:
    missing = [(p, stage) for p, stage in _inputs(paths) if not p.exists()]
    if missing:
        from visionflow.stages import stage_command

        lines = [f"  {p} (made by the {stage} stage: {stage_command(stage, paths.task)})" for p, stage in missing]
        raise UserError("register: missing inputs:\n" + "\n".join(lines))


def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def dvc_lock_md5(paths: Paths, target: Path) -> str | None:
    """The md5 that dvc.lock records for `target` as a stage output, if any."""
    lock = paths.root / "dvc.lock"
    if not lock.exists():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    rel = paths.rel(target)
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if out.get("path") == rel and out.get("md5"):
                return str(out["md5"])
    return None


def git_commit(root: Path) -> str:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"


def provenance_tags(paths: Paths) -> dict[str, str]:
    # DVC 3 hashes a file as the md5 of its bytes, so the file's md5 is what dvc.lock holds
    # when it is current. A differing lock entry means dvc.lock is stale: the bytes win.
    manifest_md5 = file_md5(paths.manifest)
    locked = dvc_lock_md5(paths, paths.manifest)
    tags = {
        "git_commit": git_commit(paths.root),
        "manifest_md5": manifest_md5,
        "data.split_file_md5": file_md5(paths.split_file),
    }
    if locked is not None and locked != manifest_md5:
        log.warning("dvc.lock records %s for %s but the file's md5 is %s (dvc.lock is stale)",
                    locked, paths.rel(paths.manifest), manifest_md5)
        tags["data.manifest_md5_dvc_lock"] = locked
    return {**tags, **correction_tags(paths)}


def correction_tags(paths: Paths) -> dict[str, str]:
    """How many labels of the training data were corrected by `visionflow annotate`, and after which
    review (of which model), as ingest recorded it in the validation report."""
    if not paths.validation_report.exists():
        return {}
    found = [s["corrections"] for s in read_json(paths.validation_report).get("sources", []) if s.get("corrections")]
    if not found:
        return {}
    reviews = [f"{c['review'].get('task')} review {c['review'].get('report')} (sha256 {str(c['review'].get('sha256'))[:12]}"
               + (f", {c['review']['model']}" if c["review"].get("model") else "") + f") -> {c['record']}"
               for c in found]
    return {"data.labels_corrected": str(sum(int(c["corrected"]) for c in found)),
            "data.corrections_review": "; ".join(reviews)}


def register(params: RegisterParams, paths: Paths) -> dict[str, Any]:
    check_inputs(paths)
    from visionflow.integrations import mlflow as tracking  # mlflow is slow to import; only when the stage runs

    params = params.model_copy(update={"model_name": model_name(paths.task, params)})
    result = tracking.log_and_register(params, paths, provenance_tags(paths))
    result["model_uri"] = f"models:/{result['model_name']}@{result['alias']}"
    result["ui"] = UI_COMMAND
    # The file is DVC's record of the stage: the same model gives the same file whether it was
    # registered now or found already registered (`reused`, reported by the stage, not kept).
    write_json(paths.registration, {k: v for k, v in result.items() if k != "reused"})
    return result

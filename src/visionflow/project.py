"""`visionflow init DATASET`: point this project at your own annotated data in one step.

Detects the dataset's format and layout (visionflow.formats.detect), reads it once to see what
its labels can train (each task's `fits`), and rewrites params.yaml: one ingest source, the
task branches that fit (settings kept from the current params.yaml), model, experiment and
FiftyOne dataset names derived from the dataset's name, and no `synth` section (the built-in
dataset is not rendered). Then writes the matching dvc.yaml. The previous params.yaml is kept
as params.yaml.bak.
"""
from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import yaml

from visionflow.core.config import TASK_OPTIONS, TASKS, ConfigError, Params
from visionflow.core.errors import UserError
from visionflow.core.paths import Paths
from visionflow.formats.detect import Detected, detect_source

HEADER = """\
# visionflow pipeline parameters, written by `visionflow init {dataset}`
# (detected: {why}).
# Each top-level section belongs to one stage (`visionflow stage --help`, dvc.yaml); unknown
# keys are rejected. After editing ingest.sources or removing a branch, run
# `visionflow dvc-yaml` (every stage refuses to run against a stale dvc.yaml).

"""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "dataset"


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix() or "."
    except ValueError:
        return str(path.resolve())


def init_project(dataset: Path, params_file: Path, name: Optional[str] = None, fmt: Optional[str] = None,
                 force: bool = False) -> dict[str, Any]:
    from visionflow.formats import read_source
    from visionflow.integrations.dvc import write_generated
    from visionflow.tasks import get_task
    from visionflow.tasks.base import DataProfile

    params_file = Path(params_file).resolve()
    root = params_file.parent
    if not params_file.exists():
        raise UserError(f"{params_file}: no params.yaml to start from; run `visionflow init` in a visionflow "
                        "project (a clone of the repository) or pass --params")
    backup = params_file.with_name(params_file.name + ".bak")
    if backup.exists() and not force:
        raise UserError(f"{backup} exists (kept from an earlier init); move it away or pass --force to replace it")
    detected = detect_source(Path(dataset), fmt=fmt)
    name = slug(name or Path(dataset).resolve().name)
    result = read_source(detected.format, detected.images, detected.annotations, name,
                         root=_rel(detected.images, root))
    if not result.samples:
        raise UserError(f"{dataset}: read as {detected.format} but no images were found "
                        f"(images looked for in {detected.images}); check the layout (docs/formats.md)")
    profile = DataProfile.of(result.samples, len(result.categories))
    fitting = {t: why for t in TASKS if (why := get_task(t).fits(profile))}
    if not fitting:
        raise UserError(f"{dataset}: {profile.images} images were read as {detected.format}, but no labels any "
                        f"task trains on ({profile.classes} classes, {profile.boxes} objects, "
                        f"{profile.single_label + profile.multi_label} image-level labels)")

    template = yaml.safe_load(params_file.read_text()) or {}
    own_split = Counter(s.attributes.get("split") for s in result.samples)
    keep_split = None not in own_split and len(own_split) >= 2  # every image in the export's own split
    raw = _rewrite(template, detected, name, root, fitting, keep_split)
    try:
        params = Params.model_validate(raw)
    except Exception as exc:  # the current params.yaml was not a usable template
        raise ConfigError(f"{params_file}: cannot derive a params.yaml for {dataset} from it: {exc}") from exc
    missing = [t for t in fitting if t not in params.tasks]
    shutil.copy2(params_file, backup)
    text = HEADER.format(dataset=dataset, why=detected.why) + yaml.safe_dump(raw, sort_keys=False, width=110)
    tmp = params_file.with_name(params_file.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(params_file)
    written = write_generated(params, Paths(root))
    return {"detected": detected, "samples": profile.images, "categories": len(result.categories),
            "problems": result.report.total, "tasks": {t: fitting[t] for t in params.tasks},
            "not_in_template": missing, "name": name, "params": params_file, "backup": backup,
            "own_split": dict(own_split) if keep_split else None,
            "written": written}


def _rewrite(template: dict, detected: Detected, name: str, root: Path, fitting: dict[str, str],
             keep_split: bool) -> dict:
    raw = {k: v for k, v in template.items() if k != "synth"}
    raw["ingest"] = {**(template.get("ingest") or {}), "sources": [{
        "name": name, "format": detected.format,
        "images": _rel(detected.images, root), "annotations": _rel(detected.annotations, root)}]}
    # the split file of the old data would name ids that no longer exist
    raw["split"] = {**(template.get("split") or {}), "from_file": None, "keep_existing": keep_split}
    for task in TASKS:
        if task not in fitting:
            raw.pop(task, None)
            continue
        branch = raw.get(task)
        if not isinstance(branch, dict):
            continue
        branch.setdefault("register", {})
        branch.setdefault("inspect", {})
        branch["register"]["model_name"] = f"{name}-{task}"
        branch["register"]["experiment"] = name
        branch["inspect"]["dataset_name"] = f"{name}-{task}-test"
        if isinstance(branch.get("train"), dict) and _honours_letterbox(task):
            # said outright (a template from before train.resize has none): photos keep their shape
            branch["train"].setdefault("resize", "letterbox")
    return raw


def _honours_letterbox(task: str) -> bool:
    """Whether the task feeds its model letterboxed images when train.resize asks it to (its
    TaskOptions; classifiers always stretch)."""
    return "letterbox" in TASK_OPTIONS[task].resize

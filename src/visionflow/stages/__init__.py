"""The stage table: the pipeline's single source of truth.

Each stage is a plain function `fn(section, paths) -> dict` of its own typed section of
params.yaml. `dvc.yaml` is generated from this table (`visionflow dvc-yaml`, checked by a
test), the Prefect flow in flows/pipeline.py iterates over it, and `visionflow stage NAME`
runs one entry. Stage functions are imported lazily so the CLI starts fast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from visionflow.paths import Paths

if TYPE_CHECKING:  # keep pydantic off the CLI's start-up path
    from visionflow.config import Params

PathsFn = Callable[[Paths, "Params"], list[Path]]


def _none(paths: Paths, params: Params) -> list[Path]:
    return []


@dataclass(frozen=True)
class Stage:
    name: str
    func: str  # "module:function"
    code: tuple[str, ...]  # source files whose change should re-run the stage (DVC deps)
    deps: PathsFn = _none
    outs: PathsFn = _none
    metrics: PathsFn = _none
    plots: PathsFn = _none
    # Outputs with side effects elsewhere (MLflow, FiftyOne): not cached by DVC.
    uncached: PathsFn = _none
    doc: str = ""

    @property
    def section(self) -> str:
        return self.name

    def load(self) -> Callable[..., dict[str, Any]]:
        module, _, attr = self.func.partition(":")
        return getattr(importlib.import_module(module), attr)

    def run(self, params: Params, paths: Paths) -> dict[str, Any]:
        return self.load()(getattr(params, self.section), paths)


def _src(*mods: str) -> tuple[str, ...]:
    return tuple(f"src/visionflow/{m}" for m in mods)


def _project_paths(paths: Paths, names: list) -> list[Path]:
    """Paths given in params (project-relative unless absolute); None entries skipped."""
    return [paths.resolve(n) for n in names if n]


def _sources(paths: Paths, params: "Params") -> list[Path]:
    deps: list[Path] = []
    for s in params.ingest.sources:
        for p in (paths.resolve(s.images), paths.resolve(s.annotations)):
            if not any(p == d or d in p.parents for d in deps):
                deps.append(p)
    return deps


STAGES: tuple[Stage, ...] = (
    Stage(
        "synth", "visionflow.stages.synth:synth", _src("data/synth.py", "stages/synth.py"),
        outs=lambda p, _: [p.synth_dir],
        doc="render the built-in shapes dataset (COCO annotations)",
    ),
    Stage(
        "ingest", "visionflow.stages.ingest:ingest",
        _src("stages/ingest.py", "manifest.py", "formats"),
        deps=_sources,
        outs=lambda p, _: [p.manifest, p.categories],
        metrics=lambda p, _: [p.validation_report],
        doc="read every source into the canonical manifest and validate it",
    ),
    Stage(
        "split", "visionflow.stages.split:split", _src("stages/split.py", "dedup.py"),
        deps=lambda p, params: [p.manifest, p.categories, *_project_paths(p, [params.split.from_file])],
        outs=lambda p, _: [p.split_file],
        metrics=lambda p, _: [p.split_report],
        doc="deterministic, stratified train/val/test assignment",
    ),
    Stage(
        "train", "visionflow.stages.train:train",
        _src("stages/train.py", "engine.py", "models.py", "augment.py", "tasks"),
        deps=lambda p, _: [p.manifest, p.categories, p.split_file],
        outs=lambda p, _: [p.model_dir],
        metrics=lambda p, _: [p.train_metrics],
        plots=lambda p, _: [p.train_history],
        doc="train the model on the shared engine",
    ),
    Stage(
        "evaluate", "visionflow.stages.evaluate:evaluate", _src("stages/evaluate.py", "tasks"),
        deps=lambda p, _: [p.model_dir, p.manifest, p.split_file],
        outs=lambda p, _: [p.predictions, p.figures_dir],
        metrics=lambda p, _: [p.eval_metrics],
        plots=lambda p, _: [p.confusion_csv, p.per_class_csv],
        doc="test-split metrics, predictions and plots",
    ),
    Stage(
        "register", "visionflow.stages.register:register", _src("stages/register.py", "tracking.py", "pyfunc_model.py", "tasks"),
        deps=lambda p, _: [p.model_dir, p.eval_metrics, p.train_metrics, p.train_history, p.figures_dir,
                           p.manifest, p.split_file, p.validation_report, p.split_report],
        uncached=lambda p, _: [p.registration],
        doc="log the run to MLflow and register the model with alias `candidate`",
    ),
    Stage(
        "inspect", "visionflow.stages.inspect:inspect", _src("stages/inspect.py", "inspection.py"),
        deps=lambda p, _: [p.predictions, p.manifest, p.split_file, p.categories],
        uncached=lambda p, _: [p.inspection],
        doc="load the test split with predictions into FiftyOne",
    ),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")

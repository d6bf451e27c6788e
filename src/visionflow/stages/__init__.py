"""The stage table: the pipeline's single source of truth.

Each stage is a plain function `fn(section, paths) -> dict` of its own typed section of
params.yaml. synth, ingest and split run once; train, evaluate, register and inspect run once
per task branch present in params.yaml (classify, detect, segment), on that branch's section
(`detect.train`, ...) with `paths.task` set, as stages named `train-detect` and so on.
`pipeline_stages(params)` expands the table in DAG order; `dvc.yaml` is generated from it
(`visionflow dvc-yaml`, checked by a test), the Prefect flow in flows/pipeline.py iterates over
it, and `visionflow stage NAME` runs one entry. Stage functions are imported lazily so the CLI
starts fast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from visionflow.core.paths import Paths

if TYPE_CHECKING:  # keep pydantic off the CLI's start-up path
    from visionflow.core.config import Params

PathsFn = Callable[[Paths, "Params"], list[Path]]


def _none(paths: Paths, params: Params) -> list[Path]:
    return []


@dataclass(frozen=True)
class Stage:
    name: str
    func: str  # "module:function"
    deps: PathsFn = _none
    outs: PathsFn = _none
    metrics: PathsFn = _none
    plots: PathsFn = _none
    # Outputs DVC does not cache (git keeps them): records of side effects elsewhere (MLflow,
    # FiftyOne), and small reports such as the evaluation's per-class details.
    uncached: PathsFn = _none
    branch: bool = False  # runs once per task branch (paths passed with .task set)
    # A branch stage that reads several sections of its branch gets the whole branch and
    # tracks these sections in dvc.yaml; otherwise it gets the section named like the stage.
    sections: tuple[str, ...] = ()
    # The service the stage talks to ("MLflow", "FiftyOne"): the flow retries such stages with
    # backoff (run.retries) and names the service when they fail for good.
    service: str = ""
    doc: str = ""

    def load(self) -> Callable[..., dict[str, Any]]:
        module, _, attr = self.func.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class BoundStage:
    """One stage of the pipeline: a table entry, for one task branch if it is a branch stage."""

    stage: Stage
    task: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.stage.name}-{self.task}" if self.task else self.stage.name

    @property
    def section(self) -> str:
        """Dotted params.yaml section the stage reads (`split`, `detect.train`, `detect` for a
        stage that takes its whole branch)."""
        if self.task:
            return self.task if self.stage.sections else f"{self.task}.{self.stage.name}"
        return self.stage.name

    @property
    def param_sections(self) -> list[str]:
        """The dotted sections whose keys dvc.yaml tracks for this stage."""
        if self.task and self.stage.sections:
            return [f"{self.task}.{s}" for s in self.stage.sections]
        return [self.section]

    @property
    def doc(self) -> str:
        return f"{self.task}: {self.stage.doc}" if self.task else self.stage.doc

    def params_of(self, params: Params):
        if self.task:
            branch = params.branch(self.task)
            return branch if self.stage.sections else getattr(branch, self.stage.name)
        return getattr(params, self.stage.name)

    def paths_of(self, paths: Paths) -> Paths:
        return paths.for_task(self.task) if self.task else paths

    def load(self) -> Callable[..., dict[str, Any]]:
        return self.stage.load()

    @property
    def code_roots(self) -> list[str]:
        """The modules whose import closure is the stage's code (visionflow.integrations.codedeps): the stage
        function's module and, on a branch, the task's module (tasks are found by name)."""
        roots = [self.stage.func.partition(":")[0]]
        if self.task:
            from visionflow.tasks import task_module

            roots.append(task_module(self.task))
        return roots

    def run(self, params: Params, paths: Paths) -> dict[str, Any]:
        return self.load()(self.params_of(params), self.paths_of(paths))

    # DVC's view, on this branch's paths
    def deps(self, paths: Paths, params: Params) -> list[Path]:
        return self.stage.deps(self.paths_of(paths), params)

    def outs(self, paths: Paths, params: Params) -> list[Path]:
        return self.stage.outs(self.paths_of(paths), params)

    def metrics(self, paths: Paths, params: Params) -> list[Path]:
        return self.stage.metrics(self.paths_of(paths), params)

    def plots(self, paths: Paths, params: Params) -> list[Path]:
        return self.stage.plots(self.paths_of(paths), params)

    def uncached(self, paths: Paths, params: Params) -> list[Path]:
        return self.stage.uncached(self.paths_of(paths), params)


def _project_paths(paths: Paths, names: list) -> list[Path]:
    """Paths given in params (project-relative unless absolute); None entries skipped."""
    return [paths.resolve(n) for n in names if n]


def _sources(paths: Paths, params: "Params") -> list[Path]:
    deps: list[Path] = []
    for s in params.ingest.sources:
        given = ([s.path] if s.path is not None else [s.images, s.annotations]) + ([s.corrections] if s.corrections else [])
        for p in map(paths.resolve, given):
            if not any(p == d or d in p.parents for d in deps):
                deps.append(p)
    return deps


def _task(p: Paths):
    from visionflow.tasks import get_task  # torch: only when dvc.yaml is generated, not at CLI start

    return get_task(p.task)


def _eval_outs(p: Paths) -> list[Path]:
    return [p.predictions, *_task(p).eval_outputs(p), p.figures_dir, p.embeddings]


STAGES: tuple[Stage, ...] = (
    Stage(
        "synth", "visionflow.stages.synth:synth",
        outs=lambda p, _: [p.synth_dir],
        doc="render the built-in shapes dataset (COCO annotations)",
    ),
    Stage(
        "ingest", "visionflow.stages.ingest:ingest",
        deps=_sources,
        outs=lambda p, _: [p.manifest, p.categories],
        metrics=lambda p, _: [p.validation_metrics],
        uncached=lambda p, _: [p.validation_report],
        doc="read every source into the canonical manifest and validate it",
    ),
    Stage(
        "split", "visionflow.stages.split:split",
        deps=lambda p, params: [p.manifest, p.categories, *_project_paths(p, [params.split.from_file])],
        outs=lambda p, _: [p.split_file],
        metrics=lambda p, _: [p.split_metrics],
        uncached=lambda p, _: [p.split_report],
        doc="deterministic, stratified train/val/test assignment",
    ),
    Stage(
        "train", "visionflow.stages.train:train",
        deps=lambda p, _: [p.manifest, p.categories, p.split_file],
        outs=lambda p, _: [p.model_dir],
        metrics=lambda p, _: [p.train_metrics],
        plots=lambda p, _: [p.train_history],
        branch=True,
        doc="train the model on the shared engine",
    ),
    Stage(
        "evaluate", "visionflow.stages.evaluate:evaluate",
        deps=lambda p, _: [p.model_dir, p.manifest, p.split_file],
        outs=lambda p, _: _eval_outs(p),
        metrics=lambda p, _: [p.eval_metrics],
        plots=lambda p, _: _task(p).eval_plots(p),
        uncached=lambda p, _: [p.eval_details],  # small: committed beside evaluate.json
        branch=True,
        doc="test-split metrics, predictions and plots",
    ),
    Stage(
        "register", "visionflow.stages.register:register",
        deps=lambda p, _: [p.model_dir, p.eval_metrics, p.eval_details, p.train_metrics, p.train_history,
                           p.figures_dir, p.manifest, p.split_file, p.validation_report, p.split_report],
        uncached=lambda p, _: [p.registration],
        branch=True, service="MLflow",
        doc="log the run to MLflow and register the model with alias `candidate`",
    ),
    Stage(
        "inspect", "visionflow.stages.inspect:inspect",
        deps=lambda p, _: [p.predictions, p.manifest, p.split_file, p.categories, p.figures_dir],
        uncached=lambda p, _: [p.inspection],
        branch=True, service="FiftyOne",
        doc="load the test split with predictions into FiftyOne",
    ),
    Stage(
        "review", "visionflow.stages.review:review",
        deps=lambda p, _: [p.predictions, p.embeddings, p.manifest, p.split_file, p.categories, p.inspection],
        outs=lambda p, _: [p.review],
        metrics=lambda p, _: [p.review_metrics],
        branch=True, service="FiftyOne", sections=("review", "inspect"),
        doc="rank the test split by likely label mistakes into review.json and the FiftyOne view `review`",
    ),
    Stage(
        "promote", "visionflow.stages.promote:promote_branch",
        deps=lambda p, _: [p.registration, p.manifest, p.split_file, p.categories],
        uncached=lambda p, _: [p.promotion],
        branch=True, service="MLflow", sections=("promote", "register"),
        doc="promote the candidate to champion if it beats the champion on the test split (the gate)",
    ),
)

STAGE_NAMES = tuple(s.name for s in STAGES)


def pipeline_stages(params: Params) -> list[BoundStage]:
    """The pipeline in DAG order: shared stages, then each task branch in turn."""
    shared = [BoundStage(s) for s in STAGES if not s.branch and (s.name != "synth" or params.renders_synth)]
    branches = [BoundStage(s, task) for task in params.tasks for s in STAGES if s.branch]
    return shared + branches


def stage_command(name: str, task: Optional[str] = None) -> str:
    """The command that runs table stage `name`, for hints: `visionflow stage split`, and for a
    branch stage `visionflow stage train-detect` (`train-<task>` when no task is known)."""
    stage = next(s for s in STAGES if s.name == name)
    return f"visionflow stage {name}-{task or '<task>'}" if stage.branch else f"visionflow stage {name}"


def get_stage(name: str, params: Params) -> BoundStage:
    stages = pipeline_stages(params)
    for s in stages:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; stages of this params.yaml are: {', '.join(s.name for s in stages)}")

"""Every file the pipeline reads or writes, defined once.

Stages, the dvc.yaml generator/check, the Prefect flow and the tests all take paths from
`Paths`, so an output path is never spelled twice. All paths are relative to the project
root (the folder holding params.yaml and dvc.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    def _p(self, rel: str) -> Path:
        return self.root / rel

    # --- inputs ---
    @property
    def params(self) -> Path:
        return self._p("params.yaml")

    # --- built-in dataset ---
    @property
    def synth_dir(self) -> Path:
        return self._p("data/shapes")

    # --- ingest / split ---
    @property
    def processed_dir(self) -> Path:
        return self._p("data/processed")

    @property
    def manifest(self) -> Path:
        return self._p("data/processed/manifest.jsonl")

    @property
    def categories(self) -> Path:
        return self._p("data/processed/categories.json")

    @property
    def validation_report(self) -> Path:
        return self._p("data/processed/validation.json")

    @property
    def split_file(self) -> Path:
        return self._p("data/processed/split.json")

    @property
    def split_report(self) -> Path:
        return self._p("metrics/split.json")

    # --- train ---
    @property
    def model_dir(self) -> Path:
        return self._p("models/classify")

    @property
    def checkpoint_dir(self) -> Path:
        # Not a DVC output: a scratch area that lets an interrupted train stage resume.
        return self._p("models/checkpoints/classify")

    @property
    def train_metrics(self) -> Path:
        return self._p("metrics/train.json")

    @property
    def train_history(self) -> Path:
        return self._p("plots/train_history.csv")

    # --- evaluate ---
    @property
    def eval_metrics(self) -> Path:
        return self._p("metrics/evaluate.json")

    @property
    def predictions(self) -> Path:
        return self._p("reports/predictions_test.jsonl")

    @property
    def confusion_csv(self) -> Path:
        return self._p("plots/confusion.csv")

    @property
    def per_class_csv(self) -> Path:
        return self._p("plots/per_class.csv")

    @property
    def figures_dir(self) -> Path:
        return self._p("reports/figures")

    # --- register / inspect ---
    @property
    def registration(self) -> Path:
        return self._p("reports/registration.json")

    @property
    def inspection(self) -> Path:
        return self._p("reports/inspect.json")

    @property
    def mlflow_db(self) -> Path:
        return self._p("mlflow.db")

    @property
    def mlflow_artifacts(self) -> Path:
        return self._p("mlartifacts")

    def resolve(self, given: str | Path) -> Path:
        """A path from params.yaml or the command line: relative to the project root unless absolute."""
        path = Path(given)
        return path if path.is_absolute() else self.root / path

    def rel(self, path: Path) -> str:
        """`path` relative to the project root, POSIX style (as written in dvc.yaml)."""
        return Path(path).relative_to(self.root).as_posix()

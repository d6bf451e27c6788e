"""Every file the pipeline reads or writes, defined once.

Stages, the dvc.yaml generator/check, the Prefect flow and the tests all take paths from
`Paths`, so an output path is never spelled twice. All paths are relative to the project
root (the folder holding params.yaml and dvc.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")
    # The task branch whose outputs the branch properties name (models/<task>, metrics/<task>/...).
    task: str = "classify"

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
    def extracted_dir(self) -> Path:
        """Where zipped sources are extracted (data/extracted/<source name>/)."""
        return self._p("data/extracted")

    @property
    def manifest(self) -> Path:
        return self._p("data/processed/manifest.jsonl")

    @property
    def categories(self) -> Path:
        return self._p("data/processed/categories.json")

    @property
    def validation_report(self) -> Path:
        return self._p("reports/validation.json")

    @property
    def validation_metrics(self) -> Path:
        """The report's numbers only (a DVC metric: one column each in `dvc metrics show`)."""
        return self._p("metrics/validation.json")

    @property
    def split_file(self) -> Path:
        return self._p("data/processed/split.json")

    @property
    def split_report(self) -> Path:
        return self._p("reports/split.json")

    @property
    def split_metrics(self) -> Path:
        """The split report's numbers only (a DVC metric), per-class tables left out."""
        return self._p("metrics/split.json")

    # --- one task branch (train -> evaluate -> register -> inspect -> promote), under paths.task ---
    def for_task(self, task: str) -> "Paths":
        return replace(self, task=task)

    def _t(self, folder: str, name: str) -> Path:
        return self.root / folder / self.task / name

    @property
    def model_dir(self) -> Path:
        return self.root / "models" / self.task

    @property
    def checkpoint_dir(self) -> Path:
        # Not a DVC output: a scratch area that lets an interrupted train stage resume.
        return self.root / "models" / "checkpoints" / self.task

    @property
    def train_run(self) -> Path:
        """How the last training run went (per-epoch wall times, resumed or not): beside the
        checkpoints, not a DVC output, so reruns with equal inputs leave DVC's outputs equal."""
        return self.checkpoint_dir / "run.json"

    @property
    def train_metrics(self) -> Path:
        return self._t("metrics", "train.json")

    @property
    def train_history(self) -> Path:
        return self._t("plots", "train_history.csv")

    @property
    def eval_metrics(self) -> Path:
        # flat scalars only, one column each in `dvc metrics show` / `dvc exp show`
        return self._t("metrics", "evaluate.json")

    @property
    def eval_details(self) -> Path:
        # the rest of the evaluation: per-class tables, confusion matrices, evaluator settings
        return self._t("reports", "evaluate_details.json")

    @property
    def predictions(self) -> Path:
        return self._t("reports", "predictions_test.jsonl")

    @property
    def coco_results(self) -> Path:
        # detect: the test predictions as a COCO results file (with coco_gt, the evaluator's inputs)
        return self._t("reports", "results_test.json")

    @property
    def coco_gt(self) -> Path:
        return self._t("reports", "gt_test.json")

    @property
    def confusion_csv(self) -> Path:
        return self._t("plots", "confusion.csv")

    @property
    def per_class_csv(self) -> Path:
        return self._t("plots", "per_class.csv")

    @property
    def pr_curve_csv(self) -> Path:
        return self._t("plots", "pr_curve.csv")

    @property
    def pred_masks_dir(self) -> Path:
        # segment: one PNG of predicted class values (0 background, c + 1) per test image
        return self._t("reports", "pred_masks")

    @property
    def figures_dir(self) -> Path:
        return self._t("reports", "figures")

    @property
    def registration(self) -> Path:
        return self._t("reports", "registration.json")

    @property
    def inspection(self) -> Path:
        return self._t("reports", "inspect.json")

    @property
    def embeddings(self) -> Path:
        """The test images' embeddings (ids, float16 vectors) the evaluate stage records."""
        return self._t("reports", "embeddings_test.npz")

    @property
    def review(self) -> Path:
        """The review stage's ranking: [{id, score, reason, ...}], most likely mistakes first."""
        return self._t("reports", "review.json")

    @property
    def review_metrics(self) -> Path:
        return self._t("metrics", "review.json")

    @property
    def annotate_session(self) -> Path:
        """What `visionflow annotate` last sent out (backend, project, samples), for `--pull`."""
        return self._t("reports", "annotate.json")

    def corrections_dir(self, source: str) -> Path:
        """Where `visionflow annotate --pull` writes the corrected versions of a source's annotations."""
        return self._p(f"data/corrections/{source}")

    @property
    def promotion(self) -> Path:
        # the promotion gate's decision and evidence (also on the model version in MLflow)
        return self._t("reports", "promotion.json")

    # --- shared services ---
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

    def rel_or_abs(self, path: Path) -> str:
        """`path` as params.yaml names it: relative to the project root when inside it, else absolute."""
        path, root = Path(path).resolve(), self.root.resolve()
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()

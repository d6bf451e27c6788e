"""MLflow: experiment tracking, the model registry and the UI. The only module that imports mlflow.

One call of `log_and_register` makes one run holding the training parameters, the
per-epoch history, the test metrics, the figures and the augmentation pipeline, then logs
the model as a pyfunc (visionflow.deploy.pyfunc behind `VisionflowPyfunc`), registers it and
points an alias (default `candidate`) at the new version.

Where things go: `RegisterParams.tracking_uri`, else $MLFLOW_TRACKING_URI, else the sqlite
file `paths.mlflow_db`. With a sqlite store, artifacts go to `paths.mlflow_artifacts`
(set as the experiment's artifact location when the experiment is created).
"""
from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

# A progress bar per artifact download (a model is ~70 files with its code) drowns stage logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow 3 sends usage telemetry by default; a pipeline has no business calling home (opt in
# by setting MLFLOW_DISABLE_TELEMETRY=false).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
import pandas as pd
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema

import visionflow
from visionflow.deploy import pyfunc as pyfunc_model
from visionflow.core.config import RegisterParams
from visionflow.core.files import read_json
from visionflow.core.paths import Paths
from visionflow.evaluation.report import read_evaluation
from visionflow.tasks import task_of

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"  # name of the logged pyfunc model inside the run
# Tells the MLflow 3 UI to show the experiment as model training, not GenAI.
_EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# What the served model needs beside visionflow's own code (shipped as code_paths).
_MODEL_REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow",
                       "albumentations", "pydantic", "pyyaml")


class VisionflowPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow face of visionflow.deploy.pyfunc.VisionModel (see there for the I/O contract)."""

    def load_context(self, context) -> None:
        self._model = pyfunc_model.VisionModel()
        self._model.load(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self._model.predict(model_input)


def resolve_tracking_uri(params: RegisterParams, paths: Paths) -> str:
    if params.tracking_uri:
        return params.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{paths.mlflow_db.resolve()}"


def _is_local_db(uri: str) -> bool:
    return uri.startswith("sqlite:")


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_EXPERIMENT_LOCK = threading.Lock()  # branches registering side by side (visionflow run --task-runner threads)


def _ensure_experiment(client: MlflowClient, name: str, uri: str, paths: Paths) -> str:
    """The experiment's id, created (with its UI kind tag) when missing. Safe when several
    branches ask at once: in one process they take turns; across processes, losing the race to
    create the experiment or its tag means another process did it, and the result is re-read."""
    with _EXPERIMENT_LOCK:
        for attempt in range(3):
            try:
                return _ensure_experiment_once(client, name, uri, paths)
            except MlflowException:
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _ensure_experiment_once(client: MlflowClient, name: str, uri: str, paths: Paths) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if _is_local_db(uri):
            folder = paths.mlflow_artifacts / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            folder.mkdir(parents=True, exist_ok=True)
            location = folder.resolve().as_uri()
        exp_id = client.create_experiment(name, artifact_location=location)
        exp = client.get_experiment(exp_id)
    elif exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if _EXPERIMENT_KIND[0] not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, *_EXPERIMENT_KIND)
    return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": str(value)}; lists and None kept whole as JSON."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def _metric_key(name: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / and spaces; class names may hold anything.
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def _history_metrics(history_csv: Path, run_file: Path, now_ms: int) -> list[Metric]:
    """plots/train_history.csv (epoch,train_loss,val_loss,val_accuracy,lr) and the run's
    per-epoch wall times (models/checkpoints/<task>/run.json: not DVC-tracked) -> one metric per
    column and epoch, step = epoch."""
    metrics = []
    run = read_json(run_file) if run_file.exists() else {}
    for row in run.get("epochs", []):
        metrics += [Metric(_metric_key(k), float(v), now_ms, int(row["epoch"]))
                    for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))]
    with open(history_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            step = int(float(row["epoch"]))
            for key, value in row.items():
                if key == "epoch" or value in (None, ""):
                    continue
                metrics.append(Metric(_metric_key(key), float(value), now_ms, step))
    return metrics


def test_metric_values(eval_metrics: dict[str, Any], task: str) -> dict[str, float]:
    """metrics/<task>/evaluate.json -> the run's test_* metrics (the task says which)."""
    from visionflow.tasks import get_task

    values = get_task(task).tracking_metrics(eval_metrics)
    return {_metric_key(k): float(v) for k, v in values.items()}


def _summary_metrics(eval_metrics: dict[str, Any], train_metrics: dict[str, Any], task: str,
                     now_ms: int) -> list[Metric]:
    values = test_metric_values(eval_metrics, task)
    for key in ("best_epoch", "epochs_run"):
        if isinstance(train_metrics.get(key), (int, float)):
            values[f"train_{key}"] = train_metrics[key]
    return [Metric(k, float(v), now_ms, 0) for k, v in values.items()]


def _log_batch(client: MlflowClient, run_id: str, metrics: list[Metric], params: list[Param],
               tags: list[RunTag]) -> None:
    # MLflow caps one batch at 1000 metrics, 100 params, 100 tags.
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(tags), 100):
        client.log_batch(run_id, tags=tags[i:i + 100])


def model_signature(task: str) -> ModelSignature:
    from visionflow.tasks import get_task

    return ModelSignature(
        inputs=Schema([ColSpec("string", pyfunc_model.INPUT_COLUMN)]),
        outputs=Schema([ColSpec(t, name) for name, t in get_task(task).pyfunc_columns.items()]),
    )


def _requirements() -> list[str]:
    reqs = []
    for dist in _MODEL_REQUIREMENTS:
        try:
            version = importlib.metadata.version(dist).split("+")[0]  # drop local tags (+cpu)
            reqs.append(f"{dist}=={version}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_and_register(params: RegisterParams, paths: Paths, tags: dict[str, str]) -> dict[str, Any]:
    """Log the trained model's run to MLflow, register the model and set the alias.

    `tags` are provenance tags computed by the register stage (git commit, data hashes).
    Returns {"run_id", "model_name", "version", "alias", "tracking_uri", "experiment_id"}."""
    uri = resolve_tracking_uri(params, paths)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = _client(uri)
    experiment_id = _ensure_experiment(client, params.experiment, uri, paths)
    meta = read_json(paths.model_dir / "meta.json")
    digest = model_digest(paths.model_dir)
    same = _version_with_digest(client, params.model_name, digest) if params.reuse_identical else None
    if same is not None:  # the same model again (a rerun with nothing changed): no new version
        version, run_id = str(same.version), same.run_id
        client.set_registered_model_alias(params.model_name, params.alias, version)
        log.info("%s version %s already holds these weights (sha256 %s...): not registered again; alias %s -> %s",
                 params.model_name, version, digest[:12], params.alias, version)
        return {"run_id": run_id, "model_name": params.model_name, "version": version, "alias": params.alias,
                "tracking_uri": uri, "experiment_id": client.get_run(run_id).info.experiment_id, "reused": True}

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{meta.get('task')}-{meta.get('arch')}") as run:
        run_id = run.info.run_id
        _log_run_contents(client, run_id, paths, meta, {**tags, DIGEST_TAG: digest})
        version = _log_and_register_model(paths.model_dir, meta, params.model_name)

    client.set_registered_model_alias(params.model_name, params.alias, version)
    client.set_model_version_tag(params.model_name, version, "run_id", run_id)
    client.set_model_version_tag(params.model_name, version, DIGEST_TAG, digest)
    log.info("registered %s version %s (alias %s), run %s", params.model_name, version, params.alias, run_id)
    return {"run_id": run_id, "model_name": params.model_name, "version": version, "alias": params.alias,
            "tracking_uri": uri, "experiment_id": experiment_id, "reused": False}


DIGEST_TAG = "visionflow.model_sha256"  # on the version and its run: sha256 of model.pt + meta.json


def model_digest(model_dir: Path) -> str:
    """What makes two model folders the same model: the weights and meta.json (classes, input
    size, thresholds); augment.json describes training and does not change predictions."""
    h = hashlib.sha256()
    for name in ("model.pt", "meta.json"):
        with open(model_dir / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _version_with_digest(client: MlflowClient, name: str, digest: str):
    """The newest version of `name` tagged with `digest`, or None (also when `name` is new)."""
    versions = [v for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(DIGEST_TAG) == digest]
    return max(versions, key=lambda v: int(v.version), default=None)


def _log_run_contents(client: MlflowClient, run_id: str, paths: Paths, meta: dict[str, Any],
                      tags: dict[str, str]) -> None:
    """Params, per-epoch and test metrics, tags and file artifacts of the active run."""
    eval_metrics = read_evaluation(paths)  # evaluate.json and its per-class details
    train_metrics = read_json(paths.train_metrics)
    now_ms = int(time.time() * 1000)
    run_params = {f"train.{k}": v for k, v in flatten(meta.get("params", {})).items()}
    run_params.update({"model.arch": str(meta.get("arch")), "model.num_classes": str(meta.get("num_classes")),
                       "model.image_size": str(meta.get("image_size")), "test.n": str(eval_metrics.get("n"))})
    if "k" in eval_metrics:
        run_params["test.k"] = str(eval_metrics["k"])
    for block, prefix in ((eval_metrics.get("evaluator"), "eval.bbox."), ((eval_metrics.get("segm") or {}).get("evaluator"), "eval.segm.")):
        if block:  # the reference evaluator's settings next to our numbers
            run_params.update({f"{prefix}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in block.items()})
    run_tags = {"visionflow.task": task_of(meta), "visionflow.version": visionflow.__version__,
                **({"train.device": str(train_metrics["device"])} if "device" in train_metrics else {}), **tags}
    _log_batch(
        client, run_id,
        metrics=_history_metrics(paths.train_history, paths.train_run, now_ms) + _summary_metrics(eval_metrics, train_metrics, task_of(meta), now_ms),
        params=[Param(k, v) for k, v in run_params.items()],
        tags=[RunTag(k, v) for k, v in run_tags.items()],
    )
    if paths.figures_dir.is_dir():
        mlflow.log_artifacts(str(paths.figures_dir), "figures")
    for f in (paths.eval_metrics, paths.eval_details, paths.train_metrics, paths.train_history, paths.train_run):
        if f.exists():
            mlflow.log_artifact(str(f), "metrics")
    for f in (paths.predictions, paths.coco_gt, paths.coco_results, paths.pr_curve_csv, paths.per_class_csv):
        if f.exists():  # COCO files: re-check the numbers with any COCO tool
            mlflow.log_artifact(str(f), "predictions" if f.suffix in (".json", ".jsonl") else "plots")
    for f in (paths.validation_report, paths.split_report):  # what ingest found, how the data was split
        if f.exists():
            mlflow.log_artifact(str(f), "data")
    mlflow.log_artifact(str(paths.model_dir / "meta.json"))
    mlflow.log_artifact(str(paths.model_dir / "augment.json"), "augmentation")


def _log_and_register_model(model_dir: Path, meta: dict[str, Any], model_name: str) -> str:
    """Log the pyfunc model in the active run and register it; returns the new version."""
    saved_sys_path = list(sys.path)  # validating the input example loads the model, prepending code/
    try:
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=VisionflowPyfunc(),
            artifacts={"model_dir": str(model_dir.resolve())},
            # The package travels with the model, so it loads where visionflow is not installed.
            code_paths=[str(Path(visionflow.__file__).parent)],
            signature=model_signature(task_of(meta)),
            input_example=pyfunc_model.example_frame(meta),
            pip_requirements=_requirements(),
            registered_model_name=model_name,
        )
    finally:
        sys.path[:] = saved_sys_path
    return str(info.registered_model_version)


def load_model(model_uri: str, uri: str):
    """A registered model (e.g. "models:/NAME@candidate") as an MLflow pyfunc: .predict(DataFrame)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.pyfunc.load_model(model_uri)


def _require_store(uri: str, what: str = "") -> None:
    """A UserError when `uri` is a local sqlite store whose file does not exist, before MLflow
    would create an empty one."""
    from visionflow.core.errors import UserError

    if _is_local_db(uri):
        db = uri.split(":///", 1)[-1]
        if db and db != ":memory:" and not Path(db).is_file():
            raise UserError(f"{what}no MLflow store at {uri}: register a model first (visionflow stage "
                            f"register-<task>), or set register.tracking_uri / $MLFLOW_TRACKING_URI")


def load_model_checked(model_uri: str, uri: str):
    """`load_model` for user-given URIs: a missing store, model, alias or run is a UserError
    naming the URI and the store, not an MLflow traceback (and no empty sqlite file appears)."""
    from mlflow.exceptions import MlflowException

    from visionflow.core.errors import UserError

    _require_store(uri, f"{model_uri}: ")
    try:
        return load_model(model_uri, uri)
    except MlflowException as exc:
        raise UserError(f"{model_uri}: cannot load it from {uri}: {exc.message}") from None


def describe_model_uri(model_uri: str, uri: str) -> dict[str, Any]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> {"model_name", "version", "alias", "run_id"}."""
    ref = model_uri[len("models:/"):]
    name, alias, version = ref, None, None
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        mv = _client(uri).get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        mv = _client(uri).get_model_version(name, version)
    else:
        return {"model_name": name, "version": None, "alias": None, "run_id": None}
    return {"model_name": name, "version": str(mv.version), "alias": alias, "run_id": mv.run_id}


def model_meta(pyfunc) -> dict[str, Any]:
    """meta.json of the model folder inside a loaded visionflow pyfunc (classes, image_size, ...)."""
    # Duck-typed: the class may come from the model's own code/ copy of visionflow.
    predictor = getattr(getattr(pyfunc.unwrap_python_model(), "_model", None), "predictor", None)
    return dict(getattr(predictor, "meta", {}))


# --- promotion support ---
# visionflow.stages.promote compares the `candidate` version with the `champion` version and records the
# decision; these are its registry reads and writes (version tags, description, alias, a run).

def find_version_by_alias(name: str, alias: str, uri: str) -> dict[str, Any] | None:
    """The version `alias` points at, or None when the model has no such alias. A missing store
    or registered model is a UserError (nothing was registered yet)."""
    from mlflow.exceptions import MlflowException

    from visionflow.core.errors import UserError

    _require_store(uri)
    client = _client(uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise UserError(f"registered model {name!r} not found in {uri} ({exc.message}); "
                        f"register one first (visionflow stage register-<task>)") from None
    if alias not in model.aliases:
        return None
    mv = client.get_model_version(name, str(model.aliases[alias]))
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "aliases": list(mv.aliases),
            "tags": dict(mv.tags), "description": mv.description or ""}


def experiment_id(name: str, uri: str) -> str | None:
    exp = _client(uri).get_experiment_by_name(name)
    return exp.experiment_id if exp is not None and exp.lifecycle_stage == "active" else None


PROMOTIONS = "{experiment}-promotions"  # where the gate's decisions go, apart from the training runs


def log_promotion_run(params: RegisterParams, paths: Paths, run_name: str, metrics: dict[str, float],
                      run_params: dict[str, str], tags: dict[str, str], evidence: Path) -> str:
    """One run holding a promotion decision, in the experiment `<experiment>-promotions` so that
    the training runs table stays training runs; returns its id."""
    uri = resolve_tracking_uri(params, paths)
    client = _client(uri)
    experiment_id = _ensure_experiment(client, PROMOTIONS.format(experiment=params.experiment), uri, paths)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    now_ms = int(time.time() * 1000)
    _log_batch(client, run_id, metrics=[Metric(_metric_key(k), float(v), now_ms, 0) for k, v in metrics.items()],
               params=[Param(k, v) for k, v in run_params.items()], tags=[])
    client.log_artifact(run_id, str(evidence))
    client.set_terminated(run_id)
    return run_id


def annotate_version(name: str, version: str, uri: str, tags: dict[str, str], description: str | None = None) -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if description is not None:
        client.update_model_version(name, version, description=description)


def log_exported(name: str, version: str, run_id: str, files: list[Path], uri: str, tags: dict[str, str]) -> str:
    """Attach an exported model to registered version (name, version): `files` (the exported
    file first, then its sidecar) go under `exported/` in `run_id`, the run that made the
    version, next to its `model/`; the version gets `tags` plus `export.uri`. Returns that
    artifact URI."""
    client = _client(uri)
    for f in files:
        client.log_artifact(run_id, str(f), "exported")
    artifact = f"runs:/{run_id}/exported/{Path(files[0]).name}"
    for key, value in {**tags, "export.uri": artifact}.items():
        client.set_model_version_tag(name, version, key, value)
    return artifact


def set_alias(name: str, alias: str, version: str, uri: str) -> None:
    _client(uri).set_registered_model_alias(name, alias, version)


# --- export support ---

def version_tags(model_uri: str, uri: str) -> dict[str, str]:
    """The tags of the registered version a models:/NAME@ALIAS or models:/NAME/VERSION URI names
    (the export.* tags say which exported file goes with it); {} for other URIs."""
    from mlflow.exceptions import MlflowException

    from visionflow.core.errors import UserError

    if not model_uri.startswith("models:/"):
        return {}
    _require_store(uri, f"{model_uri}: ")
    try:
        ref = describe_model_uri(model_uri, uri)
        if ref["version"] is None:
            return {}
        return dict(_client(uri).get_model_version(ref["model_name"], ref["version"]).tags)
    except MlflowException as exc:
        raise UserError(f"{model_uri}: cannot load it from {uri}: {exc.message}") from None


def download_artifact(artifact_uri: str, uri: str, dst: str | Path) -> Path:
    """One artifact (e.g. the export.uri of a version, runs:/RUN/exported/FILE) downloaded under `dst`."""
    from mlflow.exceptions import MlflowException

    from visionflow.core.errors import UserError

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise UserError(f"{artifact_uri}: cannot download it from {uri}: {exc.message}") from None


def download_model_dir(model_uri: str, uri: str, dst: str | Path) -> Path:
    """The visionflow model folder (meta.json, model.pt, augment.json) inside a logged pyfunc
    (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model), downloaded under `dst`.
    A missing store, model, alias or run is a UserError naming the URI and the store."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from visionflow.core.errors import UserError

    _require_store(uri, f"{model_uri}: ")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise UserError(f"{model_uri}: cannot download it from {uri}: {exc.message}") from None
    artifacts = Model.load(str(local / "MLmodel")).flavors.get("python_function", {}).get("artifacts") or {}
    rel = (artifacts.get("model_dir") or {}).get("path")
    if not rel or not (local / rel / "meta.json").is_file():
        raise UserError(f"{model_uri}: not a visionflow model (its pyfunc has no model_dir artifact with meta.json)")
    return local / rel

"""What `--model` may name: a registered MLflow model (models:/NAME@ALIAS, models:/NAME/VERSION,
runs:/RUN_ID/model) or a local model folder (models/<task>/, as the train stage writes it).
One parser, one set of messages, for predict, serve and export-model."""
from __future__ import annotations

from pathlib import Path

from visionflow.core.errors import UserError

MLFLOW_SCHEMES = ("models:/", "runs:/")
META_FILE, MODEL_FILE = "meta.json", "model.pt"


def is_registry_uri(spec: str) -> bool:
    """True for an MLflow model URI; UserError for another URI, or for one that names no version
    (MLflow would look `models:/NAME` up as a logged model id and say "not found"); False for a path."""
    if spec.startswith("models:/"):
        name = spec[len("models:/"):].rstrip("/")
        if not name or ("@" not in name and "/" not in name):
            raise UserError(f"{spec}: which version? Add an alias or a version number: "
                            f"models:/{name or 'NAME'}@champion (or @candidate) or models:/{name or 'NAME'}/1")
        return True
    if spec.startswith("runs:/"):
        if "/" not in spec[len("runs:/"):].strip("/"):
            raise UserError(f"{spec}: name the model's path in the run, e.g. {spec.rstrip('/')}/model")
        return True
    if "://" in spec or spec.startswith(("models:", "runs:")):
        raise UserError(f"{spec}: not a model URI this command reads (use models:/NAME@ALIAS, "
                        f"models:/NAME/VERSION, runs:/RUN_ID/model or a local model folder)")
    return False


def model_folder(spec: str | Path) -> Path:
    """`spec` as a model folder, checked to hold what the train stage writes."""
    model_dir = Path(spec)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: model folder not found (train one with `visionflow stage train-<task>`, "
                        f"or pass models:/NAME@ALIAS)")
    if not (model_dir / META_FILE).is_file() or not (model_dir / MODEL_FILE).is_file():
        raise UserError(f"{model_dir}: not a model folder (needs {META_FILE} and {MODEL_FILE}, as written by "
                        f"the train stage)")
    return model_dir

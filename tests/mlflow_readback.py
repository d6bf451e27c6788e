"""Read MLflow back in tests: what a run, a model version or an artifact holds, as plain values."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_model_version_by_alias(name: str, alias: str, uri: str) -> dict[str, Any]:
    mv = _client(uri).get_model_version_by_alias(name, alias)
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "source": mv.source,
            "aliases": list(mv.aliases), "tags": dict(mv.tags)}


def get_run(run_id: str, uri: str) -> dict[str, Any]:
    run = _client(uri).get_run(run_id)
    return {"params": dict(run.data.params), "metrics": dict(run.data.metrics), "tags": dict(run.data.tags),
            "experiment_id": run.info.experiment_id, "artifact_uri": run.info.artifact_uri}


def get_metric_history(run_id: str, key: str, uri: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def download_artifacts(run_id: str, path: str, uri: str, dst: str | Path) -> Path:
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(_client(uri).download_artifacts(run_id, path, str(dst)))

"""Test isolation: every real component (FiftyOne's MongoDB, Prefect, MLflow, torch's cache)
gets state under one temporary folder per test session, never the user's home."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

_STATE = Path(tempfile.mkdtemp(prefix="visionflow-tests-"))
os.environ["FIFTYONE_DATABASE_DIR"] = str(_STATE / "fiftyone-db")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no telemetry calls from an offline machine
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["TORCH_HOME"] = str(_STATE / "torch")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return _STATE

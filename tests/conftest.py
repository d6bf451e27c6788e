"""Test isolation: every real component (FiftyOne's MongoDB, Prefect, MLflow, torch's cache)
gets state under one temporary folder per test session, never the user's home."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
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


def pytest_sessionfinish(session, exitstatus) -> None:
    """Leave nothing in the temp folder: a whole run puts about 300 MB there (FiftyOne's MongoDB
    files). Stop the database service if this process started it, then remove the folder."""
    database = sys.modules.get("fiftyone.core.odm.database")
    service = getattr(database, "_db_service", None)
    if service is not None and not getattr(service, "attached", False):
        child = service.child
        with contextlib.suppress(Exception):
            database._disconnect()
            service.stop()  # closes the service's stdin: it stops mongod and exits
            child.wait(timeout=60)
    shutil.rmtree(_STATE, ignore_errors=True)

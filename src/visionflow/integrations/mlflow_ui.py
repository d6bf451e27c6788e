"""`visionflow ui mlflow`: the MLflow UI on the project's store, as a process of its own (`mlflow
server`), stopped with its whole process group."""
from __future__ import annotations

import os
import subprocess
import sys

from visionflow.core.config import RegisterParams
from visionflow.core.paths import Paths
from visionflow.core.service import sigterm_as_ctrl_c, stop_group, wait_for_http, warn_if_exposed
from visionflow.integrations.mlflow import PROMOTIONS, experiment_id, resolve_tracking_uri


def training_runs_url(url: str, experiment: str, uri: str) -> str | None:
    """The experiment's runs table in the UI's model-training view (MLflow 3 opens on its GenAI
    home otherwise); the gate's decisions are in `<experiment>-promotions`. None before any run."""
    found = experiment_id(experiment, uri)
    if found is None:
        return None
    promotions = experiment_id(PROMOTIONS.format(experiment=experiment), uri)
    note = f" (promotion decisions: {url}/#/experiments/{promotions}/runs?workflowType=machine_learning)" \
        if promotions else ""
    return f"{url}/#/experiments/{found}/runs?workflowType=machine_learning{note}"


def serve_ui(params: RegisterParams, paths: Paths, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run `mlflow server` on the project's store until Ctrl-C (a remote server: print its URL)."""
    uri = resolve_tracking_uri(params, paths)
    if uri.startswith(("http://", "https://")):
        print(f"MLflow tracking server: {uri}")
        return 0
    paths.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--artifacts-destination", str(paths.mlflow_artifacts.resolve()),
           "--host", host, "--port", str(port), "--workers", "1"]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    warn_if_exposed(host, "the MLflow UI")
    print(f"starting MLflow UI for {uri} at {url} (Ctrl-C to stop)", flush=True)
    # Own process group: `mlflow server` runs uvicorn and a job runner as children, and
    # stopping the group stops them all.
    # The job runner (huey workers) serves GenAI features only; it slows start and stop.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        with sigterm_as_ctrl_c():
            if wait_for_http(f"{url}/health", timeout=120, proc=proc):
                print(f"MLflow UI ready: {url}", flush=True)
                runs = training_runs_url(url, params.experiment, uri)
                if runs:
                    print(f"training runs of experiment {params.experiment!r}: {runs}", flush=True)
            code = proc.wait()
        print(f"error: mlflow server exited with code {code} (is port {port} in use?)", file=sys.stderr)
        return code or 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(proc)

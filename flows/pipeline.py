"""The visionflow pipeline as a Prefect flow.

Each stage of the stage table (visionflow.stages.STAGES) runs as a Prefect task, in DAG
order, calling the same plain function that `dvc repro` calls through `visionflow stage`.
This file holds wiring only; the logic lives in the stage functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from visionflow.config import load_params
from visionflow.paths import Paths
from visionflow.stages import STAGES


@flow(name="visionflow-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml") -> dict[str, Any]:
    params_path = Path(params_file).resolve()
    params = load_params(params_path)
    paths = Paths(params_path.parent)
    results: dict[str, Any] = {}
    for stage in STAGES:  # STAGES is in DAG order; each stage depends on the ones before it
        run_stage = task(stage.load(), name=stage.name, cache_policy=NO_CACHE, description=stage.doc)
        results[stage.name] = run_stage(getattr(params, stage.section), paths)
    return results


if __name__ == "__main__":
    pipeline()

"""The visionflow pipeline as a Prefect flow.

Each stage of the pipeline (visionflow.stages.pipeline_stages: synth, ingest, split, then
train -> evaluate -> register -> inspect -> promote for each task branch in params.yaml) runs as a
Prefect task named like its dvc.yaml stage, in DAG order, calling the same plain function
that `dvc repro` calls through `visionflow stage`. This file holds wiring only; the logic
lives in the stage functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from visionflow.core.config import load_params
from visionflow.core.paths import Paths
from visionflow.stages import pipeline_stages


@flow(name="visionflow-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml") -> dict[str, Any]:
    params_path = Path(params_file).resolve()
    params = load_params(params_path)
    paths = Paths(params_path.parent)
    results: dict[str, Any] = {}
    for stage in pipeline_stages(params):  # DAG order: every stage runs after those it reads
        run_stage = task(stage.load(), name=stage.name, cache_policy=NO_CACHE, description=stage.doc)
        results[stage.name] = run_stage(stage.params_of(params), stage.paths_of(paths))
    return results


if __name__ == "__main__":
    pipeline()

"""The visionflow pipeline as a Prefect flow.

Each stage of the pipeline (visionflow.stages.pipeline_stages: synth, ingest, split, then
train -> evaluate -> register -> inspect -> promote for each task branch in params.yaml) runs as a
Prefect task named like its dvc.yaml stage, calling the same plain function that `dvc repro`
calls through `visionflow stage`. Stages are submitted as futures: the shared stages in a chain,
then each branch's chain after them, so the branches run side by side when the task runner
allows (params.yaml `run.task_runner`, or `visionflow run --task-runner`). This file holds wiring
only; the logic (skipping what dvc.lock says is up to date, training slots, service errors)
lives in visionflow.integrations.prefect and the stage functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from visionflow.core.config import load_params
from visionflow.core.paths import Paths
from visionflow.integrations.prefect import (dvc_changed_stages, publish_summary, service_retries, stage_body,
                                             stage_runner)
from visionflow.stages import pipeline_stages


@flow(name="visionflow-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", task_runner: Optional[str] = None) -> dict[str, Any]:
    params_path = Path(params_file).resolve()
    params = load_params(params_path)
    paths = Paths(params_path.parent)
    changed = dvc_changed_stages(params, paths)  # None: not a DVC project, every stage runs
    futures: dict[str, Any] = {}
    last: dict[str | None, Any] = {}  # the latest future of each branch (None: the shared chain)
    with stage_runner(params, task_runner) as runner:
        for stage in pipeline_stages(params):  # DAG order: every stage runs after those it reads
            run_stage = task(stage_body(stage, params, paths, changed), name=stage.name, description=stage.doc,
                             cache_policy=NO_CACHE, **(service_retries(params.run) if stage.stage.service else {}))
            upstream = last.get(stage.task) or last.get(None)
            futures[stage.name] = last[stage.task] = runner.submit(
                run_stage, {"section": stage.params_of(params), "stage_paths": stage.paths_of(paths),
                            "upstream": upstream})
        wait(list(futures.values()))  # every branch finishes (or fails) before the first failure is raised
        results = {name: future.result() for name, future in futures.items()}
    publish_summary(results, runner)
    return results


if __name__ == "__main__":
    pipeline()

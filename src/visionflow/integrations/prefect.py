"""Running and scheduling the Prefect flow in flows/pipeline.py (the only module besides
flows/ that touches Prefect)."""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

# Prefect's temporary server sends telemetry heartbeats; offline they fail with noisy
# tracebacks, and a pipeline has no business calling home. Users can still opt in.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

FLOW_FILE = "flows/pipeline.py"
FLOW_NAME = "pipeline"


def load_flow(project_root: Path):
    """Import flows/pipeline.py from the project (it is project code, not package code)."""
    path = Path(project_root) / FLOW_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: flow file not found; run visionflow from the project root or pass --params")
    spec = importlib.util.spec_from_file_location("visionflow_project_flows_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return getattr(module, FLOW_NAME)


class _StageName(logging.Filter):
    """Starts each log line written inside a Prefect task run with its stage's name
    (`[train-detect] epoch 3/10 ...`, `[promote-segment] Finished in state Completed()`): four
    branches' lines look alike otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = getattr(record, "task_name", None)
        if name is None:
            from prefect.context import TaskRunContext

            ctx = TaskRunContext.get()
            name = ctx.task.name if ctx else None
        if name and not getattr(record, "_visionflow_stage", False):
            record.msg = f"[{name}] {record.msg}"
            record._visionflow_stage = True
        return True


def name_stages_in_logs() -> None:
    """Install the stage-name prefix on every handler that prints this process's logs."""
    handlers = {*logging.getLogger().handlers}
    for name in ("prefect", "prefect.task_runs", "prefect.flow_runs"):
        handlers.update(logging.getLogger(name).handlers)
    for h in handlers:
        if not any(isinstance(f, _StageName) for f in h.filters):
            h.addFilter(_StageName())


def run_pipeline(params_file: Path) -> dict[str, Any]:
    flow = load_flow(params_file.parent)  # imports prefect, which sets up its own handlers
    name_stages_in_logs()
    return flow(params_file=str(params_file))


def build_deployment(params_file: Path, cron: str, name: str):
    flow = load_flow(params_file.parent)
    return flow.to_deployment(name=name, cron=cron, parameters={"params_file": str(params_file)},
                              description="visionflow pipeline on a schedule")


def serve_schedule(params_file: Path, cron: str, name: str) -> None:
    """Register the deployment with its schedule and run scheduled flow runs in this process
    until interrupted (Prefect's `serve`)."""
    from prefect import serve

    deployment = build_deployment(params_file, cron, name)
    print(f"serving {name!r} on cron {cron!r}; Ctrl-C to stop. Runs appear in the Prefect UI (prefect server start).")
    serve(deployment)


def _headline(task: str, ev: dict[str, Any]) -> str:
    from visionflow.tasks import get_task

    return get_task(task).headline(ev)


def _aliases(reg: dict[str, Any], gate: dict[str, Any]) -> str:
    """The version's aliases after the gate (the register stage gave it the first), and why."""
    if not gate:
        return f"alias @{reg.get('alias')}"
    aliases = " ".join(f"@{a}" for a in gate.get("aliases", [reg.get("alias")]))
    verdict = "promoted by the gate" if gate.get("promoted") else f"gate: {gate.get('decision')} ({gate.get('reason')})"
    return f"aliases {aliases} ({verdict})"


def print_report(results: dict[str, Any], params_file: Path) -> None:
    p = f" --params {params_file}" if params_file != Path("params.yaml").resolve() else ""
    tasks = [name.split("-", 1)[1] for name in results if name.startswith("train-")]
    lines = ["", "visionflow pipeline finished"]
    for task in tasks:
        ev, reg, ins, gate = (results.get(f"{stage}-{task}", {})
                              for stage in ("evaluate", "register", "inspect", "promote"))
        lines += [
            f"  {task}:",
            f"    test split:  {ev.get('test_images')} images, {_headline(task, ev)}",
            f"    model:       {reg.get('model_name')} version {reg.get('version')} {_aliases(reg, gate)}",
            f"    FiftyOne:    dataset {ins.get('dataset')!r} ({ins.get('samples')} samples)",
        ]
    tracking = {results.get(f"register-{t}", {}).get("tracking_uri") for t in tasks} - {None}
    lines += [
        f"  tracking:      {', '.join(sorted(tracking))}",
        "",
        "Look at it:",
        f"  MLflow UI:     .venv/bin/visionflow ui mlflow{p}      # http://127.0.0.1:5000",
        *(f"  FiftyOne App:  .venv/bin/visionflow ui fiftyone --task {t}{p}    # http://127.0.0.1:5151" for t in tasks),
        "",
    ]
    print("\n".join(lines))

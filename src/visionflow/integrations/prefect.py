"""Running and scheduling the Prefect flow in flows/pipeline.py (the only module besides
flows/ that touches Prefect)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

# Prefect's temporary server sends telemetry heartbeats; offline they fail with noisy
# tracebacks, and a pipeline has no business calling home. Users can still opt in.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Without PREFECT_API_URL, Prefect starts a temporary server and waits 20 s for it. Its first start
# on a machine migrates a new database: 21 s on an idle 2-core machine here, so `make demo` on a
# fresh machine failed with a traceback. A warm start takes 11 s. A user's own setting is kept.
STARTUP_TIMEOUT_VAR, STARTUP_TIMEOUT_S = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180
os.environ.setdefault(STARTUP_TIMEOUT_VAR, str(STARTUP_TIMEOUT_S))


def _no_inherited_service_drains() -> None:
    """In a forked child, forget the parent's Prefect queue services' exit-time drains.

    Prefect's log and event services (APILogWorker, EventsWorker) register a drain with
    threading's exit hooks when they start. A process forked afterwards (a DataLoader worker of
    a train stage run by the flow) inherits that hook but not the service's threads, and
    Prefect's own after-fork reset (3.8) leaves the service with no event to wait on: the drain
    then fails an assertion as the worker exits, every worker ends with exit code 1, and a
    loader iterated on the main thread reports "DataLoader worker exited unexpectedly". The
    child has nothing of the parent's to drain, so the hooks are dropped; a service the child
    starts itself registers its own."""
    services = sys.modules.get("prefect._internal.concurrency.services")
    base = getattr(services, "_QueueServiceBase", None)
    hooks = getattr(threading, "_threading_atexits", None)
    if base is None or not isinstance(hooks, list):
        return
    hooks[:] = [h for h in hooks if not isinstance(getattr(getattr(h, "func", h), "__self__", None), base)]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_no_inherited_service_drains)

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


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed task's exception with its traceback; for bad input or config (a
    UserError, which names the file and the fix) the message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        from visionflow.core.config import ConfigError
        from visionflow.core.errors import UserError

        if record.exc_info and isinstance(record.exc_info[1], (UserError, ConfigError)):
            record.exc_info, record.exc_text = None, None
        return True


def name_stages_in_logs() -> None:
    """Install the stage-name prefix (and the user-error filter) on every handler that prints
    this process's logs."""
    handlers = {*logging.getLogger().handlers}
    for name in ("prefect", "prefect.task_runs", "prefect.flow_runs"):
        handlers.update(logging.getLogger(name).handlers)
    for h in handlers:
        for kind in (_StageName, _NoTracebackForUserErrors):
            if not any(isinstance(f, kind) for f in h.filters):
                h.addFilter(kind())


def run_pipeline(params_file: Path, task_runner: str | None = None) -> dict[str, Any]:
    """Run the flow with the task runner named here, else params.yaml's run.task_runner."""
    from visionflow.core.config import load_params
    from visionflow.core.errors import UserError

    load_params(params_file)  # bad params fail here, with the file's name, before Prefect starts
    if not os.environ.get("PREFECT_API_URL"):
        # No Prefect server named: Prefect starts a temporary one in a subprocess and stops it as
        # soon as the flow returns. A server service still flushing task-run events then logs the
        # cancellation with two tracebacks ("Error flushing 1 events"; about one no-change rerun
        # in two), for a database that is being thrown away. Its warnings and errors are noise
        # to a user; the flow's own failures still show (they are the client's).
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
    flow = load_flow(params_file.parent)  # imports prefect, which sets up its own handlers
    name_stages_in_logs()
    # a project's own flow may take params_file only; the runner is then its params.yaml's
    try:
        return flow(params_file=str(params_file), **({"task_runner": task_runner} if task_runner else {}))
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        raise UserError(
            f"Prefect's temporary server did not answer within {os.environ.get(STARTUP_TIMEOUT_VAR)} s "
            f"({STARTUP_TIMEOUT_VAR}); nothing ran. On a slow or busy machine set {STARTUP_TIMEOUT_VAR} "
            f"higher, or start a server once (`prefect server start`) and point runs at it with "
            f"PREFECT_API_URL=http://127.0.0.1:4200/api. Prefect said: {str(exc)[:300]}") from None


def stage_runner(params, name: str | None = None):
    """The task runner the flow's stages are submitted to: `name` (a flow parameter: `visionflow
    run --task-runner`, or a deployment's parameters), else params.yaml's run.task_runner.

    Chosen inside the flow run, not by the @flow decorator, so a run started by a work-pool
    worker or by `visionflow schedule` honours params.yaml exactly as `visionflow run` does."""
    chosen = name or params.run.task_runner
    runner = build_task_runner(chosen, params)
    runner.visionflow_choice = f"{chosen} ({'--task-runner / flow parameter' if name else 'params.yaml run.task_runner'})"
    logging.getLogger("visionflow.flow").info("task runner: %s", runner.visionflow_choice)
    return runner


# --- the flow's pieces: task runners, stage tasks, training slots, retries, the summary ----

def build_task_runner(name: str, params):
    """sequential: one worker thread, so stages run one at a time in the order the flow submits
    them (DAG order). threads: a thread per stage; a stage's thread waits for its upstream
    stage, so the branches interleave as far as the dependencies and the training slots allow.
    processes: one process per branch (Prefect resolves upstream futures before a process is
    used); dask: prefect-dask's DaskTaskRunner, on $DASK_SCHEDULER_ADDRESS or a local cluster."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    from visionflow.core.errors import UserError
    from visionflow.stages import pipeline_stages

    if name == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    if name == "threads":
        return ThreadPoolTaskRunner(max_workers=len(pipeline_stages(params)))
    if name == "processes":
        return ProcessPoolTaskRunner(max_workers=max(1, len(params.tasks)))
    if name == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise UserError("task runner dask needs prefect-dask: pip install prefect-dask") from None
        address = os.environ.get("DASK_SCHEDULER_ADDRESS")
        return DaskTaskRunner(address=address) if address else DaskTaskRunner()
    raise UserError(f"unknown task runner {name!r}; choose sequential, threads, processes or dask")


@contextmanager
def _file_lock(path: Path, blocking: bool = True):
    """An exclusive lock on `path` (fcntl.flock): held per open file, so it excludes other
    threads, processes and programs alike, and the OS frees it when its holder dies."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def training_slot(root: Path, slots: int):
    """Hold one of `slots` training slots of this project while a train stage runs.

    Why a file lock and not a Prefect concurrency limit: Prefect's global and tag concurrency
    limits live on a Prefect server, and `visionflow run` often talks to a temporary one that
    dies with the process; a slot taken by a crashed run stays taken until someone resets it.
    An flock on a file is honoured by every local task runner (threads, processes, a Dask
    cluster on this machine), needs no server, and is released by the OS when its holder
    dies. It does not span machines: on a multi-machine Dask cluster give each worker one GPU."""
    digest = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"visionflow-{digest}"
    waited = False
    while True:
        for i in range(slots):
            with _file_lock(folder / f"train-slot-{i}.lock", blocking=False) as held:
                if held:
                    yield i
                    return
        if not waited:
            logging.getLogger("visionflow").info("waiting for a training slot (run.max_parallel_trainings: %d)", slots)
            waited = True
        time.sleep(0.2)


def service_retries(run) -> dict[str, Any]:
    """Task options for a stage that talks to a service: run.retries retries, waiting
    retry_delay_seconds, then twice that, ... and only when the failure is the service's."""
    from prefect.tasks import exponential_backoff

    if run.retries == 0:
        return {}
    return {"retries": run.retries, "retry_delay_seconds": exponential_backoff(run.retry_delay_seconds)(run.retries),
            "retry_condition_fn": _retry_on_service_error}


def _retry_on_service_error(task, task_run, state) -> bool:
    from visionflow.core.errors import ServiceError

    try:
        state.result()
    except ServiceError:
        return True
    except BaseException:  # bad input or a bug: the same again would fail the same way
        return False
    return False


# A service that does not answer shows up as one of these somewhere in the exception's chain
# (requests/urllib3 for MLflow's REST client, pymongo for FiftyOne's database); matched by name
# so this module imports neither.
_UNREACHABLE = {"ConnectionError", "TimeoutError", "MaxRetryError", "NewConnectionError", "ConnectionFailure",
                "ServerSelectionTimeoutError", "AutoReconnect", "NetworkTimeout"}


def _unreachable(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        if names & _UNREACHABLE or ("MlflowException" in names and "API request to" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _root_cause(exc: BaseException) -> str:
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}"


def _service_uri(stage, section, paths) -> str:
    """Where the stage's service was looked for, for messages: without the URI's credentials."""
    from visionflow.core.errors import without_credentials

    if stage.stage.service == "MLflow":
        from visionflow.integrations.mlflow import resolve_tracking_uri

        uri = resolve_tracking_uri(section.register if stage.stage.sections else section, paths)
    else:
        uri = os.environ.get("FIFTYONE_DATABASE_URI", "its local database (FIFTYONE_DATABASE_DIR or ~/.fiftyone)")
    return without_credentials(uri)


def dvc_changed_stages(params, paths) -> frozenset[str] | None:
    """The stages dvc.lock does not vouch for at the start of the run; None when the project
    does not record runs in DVC (then every stage runs)."""
    from visionflow.integrations.dvc import changed_stages, records_runs

    if not records_runs(params, paths):
        return None
    with _file_lock(paths.root / ".dvc" / "tmp" / "visionflow-flow.lock"):
        return frozenset(changed_stages(paths))


def stage_body(stage, params, paths, dvc_changed: frozenset[str] | None) -> Callable[..., dict[str, Any]]:
    """The function the flow runs as the Prefect task of `stage`: the stage's own function,
    skipped when dvc.lock says the stage is up to date (as `dvc repro` would skip it) and
    recorded in dvc.lock after it ran; train holds a training slot; a service stage's
    unreachable service becomes a ServiceError (retried by the flow, then one clean line).

    Up to date means: not changed at the start of the run and no upstream stage ran in this run,
    or, when one did, `dvc status` on the stage after it (its outputs may have come out equal)."""
    from visionflow.core.errors import ServiceError, UserError, refusal
    from visionflow.integrations.dvc import changed_stages, record_stage

    fn = stage.load()
    records = [p for p in (*stage.metrics(paths, params), *stage.uncached(paths, params)) if p.suffix == ".json"]
    dvc_lock = paths.root / ".dvc" / "tmp" / "visionflow-flow.lock"
    slots = params.run.max_parallel_trainings

    def up_to_date(upstream: dict[str, Any] | None) -> bool:
        if dvc_changed is None or stage.name in dvc_changed or not all(p.exists() for p in records):
            return False
        if upstream is None or upstream.get("skipped"):
            return True
        with _file_lock(dvc_lock):
            return stage.name not in changed_stages(paths, [stage.name])

    def run_stage(section, stage_paths, upstream: dict[str, Any] | None = None) -> dict[str, Any]:
        if up_to_date(upstream):
            recorded: dict[str, Any] = {}
            for p in records:
                recorded.update(json.loads(p.read_text()))
            logging.getLogger("visionflow.flow").info("up to date in dvc.lock: skipped (as `dvc repro` would)")
            return {**recorded, "skipped": "up to date in dvc.lock"}
        try:
            with training_slot(paths.root, slots) if stage.stage.name == "train" else nullcontext():
                result = fn(section, stage_paths)
        except UserError:
            raise
        except Exception as exc:
            if stage.stage.service and (why := refusal(exc)):  # 401/403: retrying would get the same answer
                raise UserError(f"{stage.name}: {stage.stage.service} at {_service_uri(stage, section, stage_paths)}: "
                                f"{why}") from None
            if stage.stage.service and _unreachable(exc):
                from prefect.context import TaskRunContext

                ctx = TaskRunContext.get()
                raise ServiceError(stage.stage.service, _service_uri(stage, section, stage_paths), stage.name,
                                   _root_cause(exc), attempts=ctx.task_run.run_count if ctx else 1) from None
            raise
        if dvc_changed is not None:
            with _file_lock(dvc_lock):
                record_stage(paths, stage.name)
        return result

    run_stage.__name__ = run_stage.__qualname__ = stage.name.replace("-", "_")
    return run_stage


def summary_markdown(results: dict[str, Any], runner=None) -> str:
    """The run's summary for the Prefect UI: per branch, its test metric, the registered
    version and its aliases after the gate."""
    rows = ["| branch | test split | model version | aliases after the gate | stages skipped (up to date) |",
            "| --- | --- | --- | --- | --- |"]
    for task in [name.split("-", 1)[1] for name in results if name.startswith("train-")]:
        ev, reg, gate = (results.get(f"{stage}-{task}", {}) for stage in ("evaluate", "register", "promote"))
        skipped = [n for n, r in results.items() if n.endswith(f"-{task}") and r.get("skipped")]
        rows.append(f"| {task} | {ev.get('test_images', ev.get('n'))} images, {_headline(task, ev)} | "
                    f"`{reg.get('model_name')}` v{reg.get('version')} | {_aliases(reg, gate)} | "
                    f"{', '.join(skipped) or 'none'} |")
    shared = [n for n in results if "-" not in n and results[n].get("skipped")]
    return "\n".join(["# visionflow pipeline", "", *rows, "",
                      f"Shared stages skipped (up to date): {', '.join(shared) or 'none'}", "",
                      f"Task runner: {getattr(runner, 'visionflow_choice', 'the flow default')}"])


def publish_summary(results: dict[str, Any], runner=None) -> None:
    """A Markdown artifact on this flow run (Prefect UI: the run's Artifacts tab)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=summary_markdown(results, runner), key="visionflow-summary",
                             description="test metrics, registered versions and their aliases after the gate")


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
    names = gate.get("aliases")
    if names is None and "params" in gate:  # promotion.json of a gate that was up to date (not re-run)
        names = [gate["params"]["alias_from"]] + ([gate["params"]["alias_to"]] if gate.get("promoted") else [])
    aliases = " ".join(f"@{a}" for a in names or [reg.get("alias")])
    verdict = "promoted by the gate" if gate.get("promoted") else f"gate: {gate.get('decision')} ({gate.get('reason')})"
    return f"aliases {aliases} ({verdict})"


def cli_command() -> str:
    """How to run this visionflow from the current folder: `visionflow` when PATH finds this
    one, `.venv/bin/visionflow` at the checkout's root, else the script's absolute path."""
    import shutil

    exe = Path(sys.executable).parent / "visionflow"
    if shutil.which("visionflow") == str(exe):
        return "visionflow"
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return str(exe)


def print_report(results: dict[str, Any], params_file: Path) -> None:
    p = f" --params {params_file}" if params_file != Path("params.yaml").resolve() else ""
    cli = cli_command()
    tasks = [name.split("-", 1)[1] for name in results if name.startswith("train-")]
    lines = ["", "visionflow pipeline finished"]
    for task in tasks:
        ev, reg, ins, gate = (results.get(f"{stage}-{task}", {})
                              for stage in ("evaluate", "register", "inspect", "promote"))
        lines += [
            f"  {task}:",
            f"    test split:  {ev.get('test_images', ev.get('n'))} images, {_headline(task, ev)}",
            f"    model:       {reg.get('model_name')} version {reg.get('version')} {_aliases(reg, gate)}",
            f"    FiftyOne:    dataset {ins.get('dataset')!r} ({ins.get('samples')} samples)",
        ]
    tracking = {results.get(f"register-{t}", {}).get("tracking_uri") for t in tasks} - {None}
    lines += [
        f"  tracking:      {', '.join(sorted(tracking))}",
        "",
        "Look at it:",
        f"  MLflow UI:     {cli} ui mlflow{p}      # http://127.0.0.1:5000",
        *(f"  FiftyOne App:  {cli} ui fiftyone --task {t}{p}    # http://127.0.0.1:5151" for t in tasks),
        "",
    ]
    print("\n".join(lines))

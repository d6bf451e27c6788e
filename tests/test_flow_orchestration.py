"""The Prefect flow as an orchestrator: branches as concurrent futures with at most
run.max_parallel_trainings trainings at once, retries and a one-line failure naming the service,
a Markdown summary artifact on the run, and dvc.lock as the one record of what is up to date."""
import asyncio
import importlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from project import REPO, make_project  # noqa: E402

from visionflow.core.errors import ServiceError, UserError  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.integrations.prefect import _unreachable, training_slot  # noqa: E402
from visionflow.stages import STAGES  # noqa: E402

BIN = Path(sys.executable).parent
BRANCHES = ("classify", "detect")


# --- fast pieces -----------------------------------------------------------------------------

def test_training_slots_admit_at_most_n_holders_across_threads(tmp_path):
    held, most, lock = [0], [0], threading.Lock()

    def train():
        with training_slot(tmp_path, 2):
            with lock:
                held[0] += 1
                most[0] = max(most[0], held[0])
            time.sleep(0.3)
            with lock:
                held[0] -= 1

    threads = [threading.Thread(target=train) for _ in range(5)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert most[0] == 2


def test_service_error_is_a_user_error_that_survives_a_process_pool():
    err = ServiceError("MLflow", "http://127.0.0.1:9", "register-detect", "ConnectionRefusedError: refused", attempts=3)
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, UserError) and str(again) == str(err)
    assert str(err) == "register-detect: MLflow at http://127.0.0.1:9 failed after 3 attempts: " \
                       "ConnectionRefusedError: refused"


def test_service_uris_in_messages_lose_their_credentials():
    from visionflow.core.errors import without_credentials

    assert without_credentials("postgresql://mlflow:s3cret@db.internal:5432/mlflow") == \
        "postgresql://db.internal:5432/mlflow"
    assert without_credentials("mongodb://bob:pw@mongo:27017/?authSource=admin") == "mongodb://mongo:27017/?authSource=admin"
    for unchanged in ("http://127.0.0.1:5000", "sqlite:////tmp/mlflow.db", "file:///srv/mlruns",
                      "its local database (FIFTYONE_DATABASE_DIR or ~/.fiftyone)"):
        assert without_credentials(unchanged) == unchanged


def test_only_an_unreachable_service_counts_as_a_service_failure():
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as inner:
            raise RuntimeError("API request failed") from inner
    except RuntimeError as exc:
        assert _unreachable(exc)
    assert not _unreachable(KeyError("version"))


# --- the flow on Prefect's test server --------------------------------------------------------

@pytest.fixture(scope="module")
def threaded_run(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from visionflow.integrations.prefect import run_pipeline

    root = tmp_path_factory.mktemp("orch")
    params_file = make_project(root, name="orch", tasks=BRANCHES)
    calls: list[tuple[str, float, float]] = []  # (stage, start, end) of each stage function's own run
    with prefect_test_harness(server_startup_timeout=120), pytest.MonkeyPatch.context() as mp:
        for stage in STAGES:  # the flow takes each stage's function from its module when it runs
            module, _, attr = stage.func.partition(":")
            mp.setattr(importlib.import_module(module), attr, _timed(stage, getattr(importlib.import_module(module), attr), calls))
        t0 = time.monotonic()
        results = run_pipeline(params_file, task_runner="threads")
        wall = time.monotonic() - t0
        _, artifacts = asyncio.run(_read_back())
    spans = {name: (start, end) for name, start, end in calls}
    assert len(spans) == len(calls) == len(results)
    return root, results, spans, artifacts, wall


def _timed(stage, fn, calls):
    def timed(section, paths):
        start = time.monotonic()
        try:
            return fn(section, paths)
        finally:
            calls.append((f"{stage.name}-{paths.task}" if stage.branch else stage.name, start, time.monotonic()))
    return timed


async def _read_back():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async with get_client() as client:
        runs = await client.read_task_runs(limit=200)
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["visionflow-summary"])))
    assert {r.state_name for r in runs} == {"Completed"}
    return runs, artifacts


@pytest.mark.slow
def test_branches_interleave_in_dag_order_and_trainings_never_overlap(threaded_run):
    _, results, spans, _, _ = threaded_run
    chain = ("train", "evaluate", "register", "inspect", "review", "promote")
    for task in BRANCHES:  # each branch in DAG order: a stage starts after its upstream ended
        names = ["split", *(f"{s}-{task}" for s in chain)]
        for up, down in zip(names, names[1:]):
            assert spans[down][0] >= spans[up][1], (up, down)
    # the branches ran side by side: some stage of one branch started before a stage of the
    # other ended, both ways round
    a = [spans[f"{s}-classify"] for s in chain]
    b = [spans[f"{s}-detect"] for s in chain]
    assert any(x[0] < y[1] and y[0] < x[1] for x in a for y in b), spans
    # run.max_parallel_trainings: 1 (the default): the two trainings never overlap
    ta, tb = spans["train-classify"], spans["train-detect"]
    assert ta[1] <= tb[0] or tb[1] <= ta[0], (ta, tb)
    print(f"\nthreads, 2 branches: {threaded_run[4]:.1f} s")


@pytest.mark.slow
def test_the_run_has_a_markdown_summary_with_metrics_versions_and_aliases_after_the_gate(threaded_run):
    _, results, _, artifacts, _ = threaded_run
    assert len(artifacts) == 1 and artifacts[0].type == "markdown"
    text = artifacts[0].data
    for task in BRANCHES:
        reg, gate = results[f"register-{task}"], results[f"promote-{task}"]
        aliases = " ".join(f"@{a}" for a in gate["aliases"])
        row = next(line for line in text.splitlines() if line.startswith(f"| {task} |"))
        assert f"`{reg['model_name']}` v{reg['version']}" in row and aliases in row, row
        assert f"{results[f'evaluate-{task}']['test_images']} images" in row, row


@pytest.mark.slow
def test_side_by_side_promotions_each_export_and_check_their_model(threaded_run):
    """The two branches' promote stages may export in the same process at once (TorchScript's
    compiler is not thread-safe; visionflow.deploy.export writes one export at a time): each
    gate's export parity ran and passed, none failed on the other's compilation."""
    root = threaded_run[0]
    for task in BRANCHES:
        export = json.loads(Paths(root, task).promotion.read_text())["export"]
        assert export["status"] == "checked" and export["passed"], (task, export)


# --- the CLI: a service that does not answer ------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_unreachable_mlflow_fails_the_run_in_one_line_naming_it_after_the_retries(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    make_project(tmp_path, name="down", overrides={"classify": {"register": {"tracking_uri": uri}},
                                                    "run": {"retries": 1, "retry_delay_seconds": 0}})
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    out = subprocess.run([str(BIN / "visionflow"), "run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    assert f"register-classify: MLflow at {uri} failed after 2 attempts" in errors[0], errors
    assert "Traceback" not in text, text[-3000:]


# --- dvc.lock as the one record ---------------------------------------------------------------

def _run(cmd, cwd, env):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _ran_and_skipped(log: str, names):
    """The run succeeded, so every stage either ran or was skipped (and said so)."""
    skipped = {n for n in names if f"[{n}] up to date in dvc.lock" in log}
    return set(names) - skipped, skipped


@pytest.mark.slow
def test_run_and_dvc_repro_agree_on_what_is_up_to_date(tmp_path):
    from visionflow.core.config import load_params
    from visionflow.stages import pipeline_stages

    root = tmp_path / "proj"
    make_project(root, name="dvcflow", tasks=BRANCHES)
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], root, env)
    _run([*dvc, "init", "-q"], root, env)
    _run([*dvc, "config", "core.analytics", "false"], root, env)
    _run([str(BIN / "visionflow"), "dvc-yaml"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    names = [s.name for s in pipeline_stages(load_params(root / "params.yaml"))]
    vf = [str(BIN / "visionflow"), "run", "--task-runner", "threads"]

    first = _run(vf, root, env)
    assert _ran_and_skipped(first, names) == (set(names), set()), first[-3000:]
    repro = _run([*dvc, "repro"], root, env)
    assert "Running stage" not in repro, repro

    t0 = time.monotonic()
    again = _run(vf, root, env)
    rerun = time.monotonic() - t0
    assert _ran_and_skipped(again, names) == (set(), set(names)), again[-3000:]
    print(f"\nno-change rerun of `visionflow run`: {rerun:.1f} s")
    for task in BRANCHES:  # the summary of a run that skipped the gate still says what the gate did
        gate = json.loads(Paths(root, task).promotion.read_text())
        expected = "@candidate @champion (promoted" if gate["promoted"] else "@candidate (gate: refused"
        assert f"aliases {expected}" in again, again[-3000:]

    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["detect"]["train"]["lr"] = raw["detect"]["train"]["lr"] / 2
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    third = _run(vf, root, env)
    detect = {n for n in names if n.endswith("-detect")}
    ran, skipped = _ran_and_skipped(third, names)
    # the detect branch re-ran (a stage whose inputs came out byte-equal may be skipped, as DVC
    # would); every other stage was up to date
    assert {"train-detect", "evaluate-detect", "register-detect"} <= ran <= detect, third[-3000:]
    assert skipped == set(names) - ran, third[-3000:]
    status = _run([*dvc, "status"], root, env)
    assert "changed" not in status and "modified" not in status, status
    assert "Running stage" not in _run([*dvc, "repro"], root, env)


@pytest.mark.slow
def test_dask_task_runner_runs_the_pipeline_on_a_dask_cluster(tmp_path, monkeypatch):
    """run.task_runner: dask (prefect-dask): a local Dask cluster (worker processes) runs every
    stage; the run completes the branch through the gate, and says which runner it used."""
    from prefect.testing.utilities import prefect_test_harness

    from visionflow.integrations.prefect import run_pipeline

    params_file = make_project(tmp_path / "proj", name="dask", tasks=("classify",),
                               overrides={"run": {"task_runner": "dask"}})
    import distributed

    clusters = []
    started = distributed.LocalCluster.__init__

    def recorded(self, *args, **kwargs):
        clusters.append(kwargs)
        started(self, *args, **kwargs)

    monkeypatch.setattr(distributed.LocalCluster, "__init__", recorded)
    with prefect_test_harness(server_startup_timeout=120):
        results = run_pipeline(params_file)
        _, artifacts = asyncio.run(_read_back())
    (summary,) = artifacts
    assert "Task runner: dask (params.yaml run.task_runner)" in summary.data, summary.data
    assert len(clusters) == 1  # prefect-dask started its own local cluster, and the stages ran on it
    assert str(results["register-classify"]["version"]) == "1" and "promote-classify" in results
    branch = Paths(tmp_path / "proj", "classify")
    assert json.loads(branch.eval_metrics.read_text())["primary_metric"] == "accuracy" and branch.promotion.exists()


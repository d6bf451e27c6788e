"""Prefect work pools for real: a Prefect server of the test's own on loopback, a process work
pool, the pipeline deployed to it from a project folder, and a worker that picks the flow run up
and completes it. This is the test that chose the fastapi pin in pyproject.toml: with fastapi
0.151-0.154, `prefect work-pool ls` and `prefect worker start` get 422 from the server.

The `visionflow schedule` path likewise: the command serves the deployment with its cron
schedule, and a run of it is picked up and completed by that process. Both runs take their task
runner from the project's params.yaml, as `visionflow run` does."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from project import free_port, make_project  # noqa: E402

from visionflow.core.paths import Paths  # noqa: E402
from visionflow.core.service import stop_group, wait_for_http  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
           "PREFECT_UI_ENABLED": "false",
           # the CLI prints through rich, which wraps at 80 columns without a terminal: a long
           # tmp path (a pytest-xdist worker's adds a folder) would break across lines
           "COLUMNS": "1000"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=120, proc=proc):
            pytest.fail(f"prefect server did not start:\n{log.read_text()[-3000:]}")
        yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    finally:
        stop_group(proc)


def _prefect(env, *args, timeout=300, cwd=None):
    out = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _flow_runs(env) -> list[dict]:
    """Every flow run on the server: its deployment, state, and its run summary (Markdown)."""
    read = ("import asyncio, json\nfrom prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId\n"
            "async def main():\n    async with get_client() as client:\n        out = []\n"
            "        for r in await client.read_flow_runs():\n"
            "            arts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id])))\n"
            "            dep = (await client.read_deployment(r.deployment_id)).name if r.deployment_id else None\n"
            "            out.append({'deployment': dep, 'state': r.state_type.value,\n"
            "                        'summary': ''.join(a.data or '' for a in arts)})\n"
            "        print(json.dumps(out))\n"
            "asyncio.run(main())")
    out = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_work_pool_worker_runs_the_deployed_pipeline(server, tmp_path):
    root = tmp_path / "proj"
    make_project(root, name="pool", tasks=("classify",), overrides={"run": {"task_runner": "threads"}})
    _prefect(server, "work-pool", "create", "vf-pool", "--type", "process")
    assert "vf-pool" in _prefect(server, "work-pool", "ls")  # 422 here with fastapi 0.151-0.154
    deploy = (f"from pathlib import Path\nfrom prefect import flow\n"
              f"f = flow.from_source(source={str(root)!r}, entrypoint='flows/pipeline.py:pipeline')\n"
              f"print(f.deploy(name='pool-test', work_pool_name='vf-pool', "
              f"parameters={{'params_file': {str(root / 'params.yaml')!r}}}, print_next_steps=False))")
    out = subprocess.run([sys.executable, "-c", deploy], env=server, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = _prefect(server, "deployment", "run", "visionflow-pipeline/pool-test")
    assert "Created flow run" in run
    # the worker takes the scheduled run, runs the pipeline in a subprocess and exits
    _prefect(server, "worker", "start", "--pool", "vf-pool", "--run-once", timeout=900, cwd=root)
    (run,) = [r for r in _flow_runs(server) if r["deployment"] == "pool-test"]
    assert run["state"] == "COMPLETED", run
    # the worker's run chose its task runner from params.yaml, as `visionflow run` does
    assert "Task runner: threads (params.yaml run.task_runner)" in run["summary"], run["summary"]
    evaluated = json.loads(Paths(root, "classify").eval_metrics.read_text())
    assert evaluated["primary_metric"] == "accuracy" and Paths(root, "classify").promotion.exists()


def test_visionflow_schedule_serves_the_deployment_and_completes_its_run(server, tmp_path):
    """`visionflow schedule`: the deployment appears with its cron schedule; a run of it (here
    started by hand rather than waiting for the cron) is picked up by the serving process and
    completes the pipeline."""
    root = tmp_path / "sched"
    make_project(root, name="sched", tasks=("classify",), overrides={"run": {"task_runner": "threads"}})
    log = tmp_path / "schedule.log"
    with open(log, "w") as out:  # a cron that will not fire during the test: the run is started below
        proc = subprocess.Popen([str(BIN / "visionflow"), "schedule", "--params", str(root / "params.yaml"),
                                 "--cron", "0 4 1 1 *", "--name", "sched-test"], env=server, cwd=root,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        inspect = [str(BIN / "prefect"), "deployment", "inspect", "visionflow-pipeline/sched-test"]
        while (shown := subprocess.run(inspect, env=server, capture_output=True, text=True)).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        shown = shown.stdout
        assert "0 4 1 1 *" in shown and str(root / "params.yaml") in shown, shown
        assert "Created flow run" in _prefect(server, "deployment", "run", "visionflow-pipeline/sched-test")
        deadline = time.monotonic() + 900
        while True:
            runs = [r for r in _flow_runs(server) if r["deployment"] == "sched-test"]
            if runs and runs[0]["state"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(3)
    finally:
        stop_group(proc)
    (run,) = runs
    assert run["state"] == "COMPLETED", (run, log.read_text()[-3000:])
    assert "Task runner: threads (params.yaml run.task_runner)" in run["summary"], run["summary"]
    assert json.loads(Paths(root, "classify").eval_metrics.read_text())["primary_metric"] == "accuracy"
    assert Paths(root, "classify").promotion.exists()

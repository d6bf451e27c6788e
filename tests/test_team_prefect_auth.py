"""A team Prefect server with basic auth, for real: `prefect server start` on loopback with
PREFECT_SERVER_API_AUTH_STRING in its own PREFECT_HOME. Without credentials or with a wrong auth
string the API answers 401; with PREFECT_API_AUTH_STRING the Prefect CLI and client work, and
`visionflow run` (run_pipeline, the same code path as the real pipeline, here with a one-line
flow) takes the URL and the auth string from the environment and never writes the secret into
the flow run's parameters, its logs or its output."""
import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from project import free_port, make_project  # noqa: E402

from visionflow.core.service import stop_group, wait_for_http  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
AUTH = "vf-team:s3cr3t-Pr3fect-pw"
SECRET = "s3cr3t-Pr3fect-pw"
HEADER = base64.b64encode(AUTH.encode()).decode()  # the Authorization header's form of it

PROBE_FLOW = '''from prefect import flow, get_run_logger


@flow(name="auth-probe")
def pipeline(params_file: str):
    get_run_logger().warning("auth probe ran with %s", params_file)
    return {}
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-auth-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
           "PREFECT_UI_ENABLED": "false"}
    for var in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_API_KEY"):
        env.pop(var, None)
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env={**env, "PREFECT_SERVER_API_AUTH_STRING": AUTH},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # /api/health stays open without credentials (for probes); everything else needs them
        if not wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=120, proc=proc):
            pytest.fail(f"prefect server did not start:\n{log.read_text()[-3000:]}")
        yield {"env": {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}, "log": log}
    finally:
        stop_group(proc)
    assert SECRET not in log.read_text()


def _post(url: str, auth: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def _run(env, *cmd, timeout=300, cwd=None):
    return subprocess.run([*cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_prefect_server_refuses_strangers_and_visionflow_passes_the_auth_string(server, tmp_path):
    env = server["env"]
    url = env["PREFECT_API_URL"]
    # (a) no credentials, (c) a wrong auth string: 401 on the API
    assert _post(f"{url}/flows/filter", None) == 401
    assert _post(f"{url}/flows/filter", "vf-team:wrong") == 401
    assert _post(f"{url}/flows/filter", AUTH) == 200
    # (c) the Prefect CLI with a wrong auth string is refused, without echoing the right one
    wrong = _run({**env, "PREFECT_API_AUTH_STRING": "vf-team:wrong"}, str(BIN / "prefect"), "flow", "ls", timeout=120)
    assert wrong.returncode != 0 and "401" in wrong.stdout + wrong.stderr, wrong.stdout[-2000:] + wrong.stderr[-2000:]

    # (d) `visionflow run` through run_pipeline, with credentials from the environment only
    root = tmp_path / "proj"
    make_project(root, name="auth", tasks=("classify",))
    (root / "flows" / "pipeline.py").write_text(PROBE_FLOW)
    params = root / "params.yaml"
    assert SECRET not in params.read_text()
    good = {**env, "PREFECT_API_AUTH_STRING": AUTH}
    # -vv: every library's DEBUG lines (Prefect's client and HTTP requests included) on stderr
    run = _run(good, str(BIN / "visionflow"), "-vv", "run", "--params", str(params), cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "visionflow pipeline finished" in run.stdout
    assert SECRET not in run.stdout + run.stderr and HEADER not in run.stderr
    assert "auth probe ran" in run.stdout + run.stderr, run.stdout[-2000:]  # the flow's log line, sent to the server too

    denied = _run({**env, "PREFECT_API_AUTH_STRING": "vf-team:wrong"}, str(BIN / "visionflow"), "run",
                  "--params", str(params), cwd=root)
    assert denied.returncode != 0 and "401" in denied.stdout + denied.stderr, denied.stderr[-3000:]
    assert SECRET not in denied.stdout + denied.stderr

    # (b) a client with the right auth string reads flows, flow runs and logs; the run is the
    # server's (no temporary server), and the secret is in none of them
    ls = _run({**good, "COLUMNS": "200"}, str(BIN / "prefect"), "flow", "ls", timeout=120)
    assert ls.returncode == 0 and "auth-probe" in ls.stdout, ls.stdout[-2000:] + ls.stderr[-2000:]
    read = ("import asyncio, json\nfrom prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId\n"
            "async def main():\n    async with get_client() as client:\n"
            "        runs = await client.read_flow_runs()\n"
            "        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))\n"
            "        print(json.dumps({'runs': [{'state': r.state_type.value, 'parameters': r.parameters}\n"
            "                                   for r in runs], 'logs': [lg.message for lg in logs]}))\n"
            "asyncio.run(main())")
    out = _run(good, sys.executable, "-c", read, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["state"] for r in seen["runs"]] == ["COMPLETED"], seen  # the refused run never reached it
    assert seen["runs"][0]["parameters"] == {"params_file": str(params)}
    assert any("auth probe ran" in m for m in seen["logs"]), seen["logs"]
    assert SECRET not in out.stdout


def test_doctor_checks_the_login_without_showing_it(server, tmp_path):
    """`visionflow doctor` against the server with a login: ok with the right auth string, a
    problem saying what to set without it or with a wrong one; the secret in no output."""
    make_project(tmp_path / "proj", name="doc")
    params = str(tmp_path / "proj" / "params.yaml")
    url = server["env"]["PREFECT_API_URL"]
    for auth, expected, rc in ((AUTH, f"ok       Prefect: PREFECT_API_URL {url} answered and took PREFECT_API_AUTH_STRING", 0),
                               (None, f"problem  Prefect: PREFECT_API_URL {url} asks for a login (401): set "
                                      "PREFECT_API_AUTH_STRING", 1),
                               ("vf-team:wrong", f"problem  Prefect: PREFECT_API_URL {url} refused "
                                                 "PREFECT_API_AUTH_STRING (401)", 1)):
        env = {**server["env"], **({"PREFECT_API_AUTH_STRING": auth} if auth else {})}
        out = _run(env, str(BIN / "visionflow"), "doctor", "--params", params, cwd=tmp_path / "proj")
        assert out.returncode == rc, out.stdout[-3000:] + out.stderr[-3000:]
        assert any(line.startswith(expected) for line in out.stdout.splitlines()), out.stdout
        assert SECRET not in out.stdout + out.stderr

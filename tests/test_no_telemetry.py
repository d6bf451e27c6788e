"""A pipeline has no business calling home: the usage analytics of the tools visionflow drives
are off unless the user turns them on (README, "Where to look": the table of each tool's setting).

DVC's is checked on the real tool: after a command, DVC starts an analytics daemon (a second
process that imports DVC and posts to DVC_ANALYTICS_ENDPOINT, here a loopback server that
records what reaches it). A plain `dvc status` in a fresh repository starts one, so the check
can fail; the dvc commands visionflow runs itself start none and post nothing."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from project import free_port, make_project  # noqa: E402

BIN = Path(sys.executable).parent


class _Recorder(http.server.BaseHTTPRequestHandler):
    posts: list[bytes] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).posts.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def analytics_endpoint():
    """A loopback HTTP server that records every POST; (url, list of bodies)."""
    port = free_port()
    handler = type("Recorder", (_Recorder,), {"posts": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}/", handler.posts
    server.shutdown()
    server.server_close()


def test_visionflows_own_dvc_commands_start_no_analytics_daemon(tmp_path, monkeypatch, analytics_endpoint):
    from visionflow.core.paths import Paths
    from visionflow.integrations.dvc import changed_stages

    url, posts = analytics_endpoint
    root = tmp_path / "proj"
    make_project(root, name="quiet")
    home = tmp_path / "config"  # no user-wide DVC config (a core.analytics there would decide)
    quiet = {**os.environ, "XDG_CONFIG_HOME": str(home), "DVC_NO_ANALYTICS": "1"}
    quiet.pop("DVC_TEST", None)  # DVC's own test switch turns analytics off
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=quiet, check=True, capture_output=True)
    assert "analytics" not in (root / ".dvc" / "config").read_text()  # DVC's default: on

    # As DVC is set up here, a plain dvc command starts its analytics daemon: DVC opens
    # DVC_DAEMON_LOGFILE for the daemon's output as it starts one. (Whether the daemon then
    # posts depends on the install: DVC 3.67's daemon, started as `python dvc/__main__.py`, dies
    # on import in a plain venv, its dvc/types.py shadowing the standard library's.)
    loud = {k: v for k, v in quiet.items() if k != "DVC_NO_ANALYTICS"} | {"DVC_ANALYTICS_ENDPOINT": url}
    plain_log, ours_log = tmp_path / "plain-daemon.log", tmp_path / "visionflow-daemon.log"
    subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, check=True, capture_output=True,
                   env={**loud, "DVC_DAEMON_LOGFILE": str(plain_log)})
    assert plain_log.exists(), "a plain `dvc status` started no analytics daemon: the check below proves nothing"

    # visionflow's own: `dvc status` (as `visionflow run` asks before and between stages) and
    # `visionflow dvc-yaml` (dvc config, dvc remote), with the same environment.
    for key, value in {**loud, "DVC_DAEMON_LOGFILE": str(ours_log)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DVC_NO_ANALYTICS", raising=False)
    subprocess.run([str(BIN / "visionflow"), "dvc-yaml"], cwd=root, check=True, capture_output=True)
    assert changed_stages(Paths(root)), "a fresh repository has every stage to run"
    time.sleep(2)  # a daemon, had one started, has had time to post
    assert not ours_log.exists() and not posts, (ours_log.exists(), posts)
    assert (root / ".dvc" / "config").read_text().count("analytics") == 0  # the user's DVC settings are theirs


def test_fiftyone_tracks_nothing_unless_asked():
    """The library's setting (what the App's server reads) after visionflow's FiftyOne module is
    imported: off by default, on with FIFTYONE_DO_NOT_TRACK=false."""
    code = ("import visionflow.integrations.fiftyone, fiftyone as fo; "
            "print(fo.config.do_not_track)")
    env = {k: v for k, v in os.environ.items() if k != "FIFTYONE_DO_NOT_TRACK"}
    for given, expected in ((None, "True"), ("false", "False"), ("true", "True")):
        run_env = env if given is None else {**env, "FIFTYONE_DO_NOT_TRACK": given}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().splitlines()[-1] == expected, (given, out.stdout)


def test_mlflow_and_prefect_send_no_telemetry_unless_asked():
    code = ("import os, visionflow.integrations.mlflow, visionflow.integrations.prefect; "
            "from mlflow.telemetry.utils import is_telemetry_disabled; "
            "print(is_telemetry_disabled(), os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'])")
    # MLflow also stays quiet under pytest and in CI (it looks for these variables): a user's shell has none
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED", "DO_NOT_TRACK",
                        "PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "BUILDKITE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "false"], out.stdout
    out = subprocess.run([sys.executable, "-c", code], env={**env, "MLFLOW_DISABLE_TELEMETRY": "false"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[0] == "False", out.stdout  # a user's opt-in wins

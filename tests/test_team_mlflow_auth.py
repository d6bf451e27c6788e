"""The team MLflow server with MLflow's basic-auth app: who may do what, for real.

`mlflow server --app-name basic-auth` on PostgreSQL (tracking and users, two databases) with
artifacts in moto's S3 server. The admin creates a writer and a reader. visionflow's register
stage, given the writer's credentials only through MLFLOW_TRACKING_USERNAME / _PASSWORD, logs
and registers a model; the reader can read it but can neither register a version nor move an
alias; a client without credentials is refused outright. No password lands in a param, a tag,
the registration record or the logs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import mlflow_readback as readback  # noqa: E402
from team_services import (S3_ENV, mlflow_tracking_server, postgres_database, s3_server)  # noqa: E402
from project import make_project as make_params  # noqa: E402  (params.yaml of a tiny project)
from test_register import make_project  # noqa: E402  (the model folder and reports register reads)

from mlflow.exceptions import MlflowException  # noqa: E402
from PIL import Image  # noqa: E402

from visionflow.core.config import RegisterParams  # noqa: E402
from visionflow.core.errors import refusal  # noqa: E402
from visionflow.core.files import read_json  # noqa: E402
from visionflow.integrations import mlflow as tracking  # noqa: E402
from visionflow.stages.register import register  # noqa: E402

pytestmark = pytest.mark.slow

ADMIN = ("admin", "admin-password-for-tests-0")
WRITER = ("alice", "alice-password-for-tests-1")
READER = ("bob", "bob-password-for-tests-22")
MODEL = "auth-classifier"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team-auth")
    with contextlib.ExitStack() as stack:
        tracking_db = stack.enter_context(postgres_database("vf_track"))
        users_db = stack.enter_context(postgres_database("vf_users"))
        endpoint = stack.enter_context(s3_server(tmp, buckets=("team",)))
        ini = tmp / "basic_auth.ini"
        # authenticated users read by default; writing needs a permission (creators get MANAGE)
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = {users_db.sqlalchemy_uri}\nadmin_username = {ADMIN[0]}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        url = stack.enter_context(mlflow_tracking_server(
            tracking_db, "s3://team/mlflow", endpoint, tmp, extra_args=("--app-name", "basic-auth"),
            extra_env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
                       # CSRF: the auth app refuses to start without a fixed key (one per team, shared by its servers)
                       "MLFLOW_FLASK_SERVER_SECRET_KEY": "visionflow-test-flask-key"}))
        yield tmp, url


@contextlib.contextmanager
def as_user(monkeypatch, user: tuple[str, str] | None):
    with monkeypatch.context() as m:
        for key in S3_ENV:  # clients hold no S3 credentials: the server proxies artifacts
            m.delenv(key, raising=False)
        if user is None:
            m.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
            m.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        else:
            m.setenv("MLFLOW_TRACKING_USERNAME", user[0])
            m.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
        yield


def _status(exc: BaseException) -> str:
    return getattr(exc, "error_code", "") or str(exc)


def test_writer_registers_reader_reads_but_cannot_write_anonymous_is_refused(server, monkeypatch, caplog):
    tmp, url = server
    from mlflow.server import get_app_client

    with as_user(monkeypatch, ADMIN):
        users = get_app_client("basic-auth", tracking_uri=url)
        users.create_user(*WRITER)
        users.create_user(*READER)

    # anonymous: refused before anything is read
    assert httpx.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}).status_code == 401
    assert httpx.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                     auth=(READER[0], "wrong password")).status_code == 401
    paths = make_project(tmp / "project")
    params = RegisterParams(tracking_uri=url, model_name=MODEL)
    with as_user(monkeypatch, None), pytest.raises(Exception) as anonymous:
        register(params, paths)
    assert "401" in str(anonymous.value) or "UNAUTHENTICATED" in _status(anonymous.value) \
        or "Unauthorized" in str(anonymous.value), anonymous.value
    with as_user(monkeypatch, None):  # what visionflow tells the user instead of a traceback
        assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in refusal(anonymous.value)

    # the writer, through visionflow's own calls, with credentials from the environment only
    caplog.set_level(logging.DEBUG)
    with as_user(monkeypatch, WRITER):
        result = register(params, paths)
    assert result["version"] == "1" and result["alias"] == "candidate"

    # the reader reads ...
    with as_user(monkeypatch, READER):
        mv = readback.get_model_version_by_alias(MODEL, "candidate", url)
        assert mv["version"] == "1" and mv["run_id"] == result["run_id"]
        run = readback.get_run(result["run_id"], url)
        # ... but registers no version and moves no alias
        with pytest.raises(MlflowException) as denied_alias:
            tracking.set_alias(MODEL, "champion", "1", url)
        from mlflow import MlflowClient
        with pytest.raises(MlflowException) as denied_version:
            MlflowClient(tracking_uri=url, registry_uri=url).create_model_version(
                MODEL, mv["source"], run_id=result["run_id"])
    assert _status(denied_alias.value) == "PERMISSION_DENIED", denied_alias.value
    assert _status(denied_version.value) == "PERMISSION_DENIED", denied_version.value
    with as_user(monkeypatch, READER):
        told = refusal(denied_alias.value)
    assert f"user {READER[0]!r}" in told and "HTTP 403" in told and "MANAGE on the registered model" in told
    assert refusal(ValueError("403 things")) is None  # only MLflow's refusals count

    # the command line: no traceback, exit 2, what to do (a wrong password, then no login at all)
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(images / "a.png")
    for user, expected in (((WRITER[0], "not-her-password"), f"did not accept the credentials of user {WRITER[0]!r}"),
                           (None, "MLflow requires a login (HTTP 401)")):
        env = {k: v for k, v in os.environ.items()
               if k not in S3_ENV and k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        if user:
            env.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
        env["MLFLOW_TRACKING_URI"] = url
        out = subprocess.run([str(Path(sys.executable).parent / "visionflow"), "predict", "--model",
                              f"models:/{MODEL}@candidate", "--images", str(images)], env=env, capture_output=True,
                             text=True, timeout=300, cwd=tmp)
        assert out.returncode == 2 and expected in out.stderr, out.stderr[-3000:]
        assert "Traceback" not in out.stderr and "not-her-password" not in out.stderr
    with as_user(monkeypatch, WRITER):
        assert readback.get_model_version_by_alias(MODEL, "candidate", url)["aliases"] == ["candidate"]

    # no password or S3 secret in what visionflow records or logs
    recorded = str([run["params"], run["tags"], read_json(paths.registration), caplog.text])
    for secret in (ADMIN[1], WRITER[1], READER[1], S3_ENV["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in recorded


def test_doctor_checks_the_login_without_showing_it(server, monkeypatch):
    """`visionflow doctor`'s line for a store behind the basic-auth app (the users the test above
    created): ok with the writer's login, a problem saying what to check or set with a wrong
    password or none, and no password in any line."""
    from visionflow.core.config import load_params
    from visionflow.core.paths import Paths
    from visionflow.doctor import _mlflow

    tmp, url = server
    root = tmp / "doctor"
    make_params(root, {"classify": {"register": {"tracking_uri": url}}}, name="doc")
    params, paths = load_params(root / "params.yaml"), Paths(root)
    for user, expected in ((WRITER, f"ok: {url}: the server answered and took the login of user {WRITER[0]!r}"),
                           ((WRITER[0], "not-her-password"), f"problem: {url}: the server did not accept the "
                                                             f"credentials of user {WRITER[0]!r} (401): check "
                                                             "MLFLOW_TRACKING_PASSWORD"),
                           (None, f"problem: {url}: the server asks for a login (401): set MLFLOW_TRACKING_USERNAME "
                                  "and MLFLOW_TRACKING_PASSWORD")):
        with as_user(monkeypatch, user):
            (status, what, detail), = _mlflow(params, paths)
        line = f"{status}: {detail}"
        assert what == "MLflow (classify)" and line.startswith(expected), line
        assert WRITER[1] not in line and "not-her-password" not in line

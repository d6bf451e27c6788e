"""The classify branch against a team's MLflow: a real `mlflow server` on a fresh PostgreSQL
database with its artifacts in an S3-compatible store (moto_server), all on loopback.

The pipeline registers through the server's http:// URL; promote, predict and serve run as the
CLI in fresh processes. Only the server holds the S3 credentials: every client reaches
artifacts through it, so none of them is given any. The test reads back where things landed:
the runs, versions and aliases as rows in PostgreSQL, the files as objects in the bucket, and
nothing in a local mlartifacts folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import mlflow_readback as readback  # noqa: E402
from project import make_project  # noqa: E402
from team_services import (S3_ENV, free_port, mlflow_tracking_server, postgres_database, s3_keys,  # noqa: E402
                           s3_server, service)

from visionflow.core.config import load_params  # noqa: E402
from visionflow.core.files import read_json  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.deploy.predictor import load_predictor  # noqa: E402
from visionflow.manifest.images import load_rgb  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "team-classifier"
BUCKET = "team"
TIMEOUT_S = 300


def client_env() -> dict[str, str]:
    """A client's environment: no S3 credentials or endpoint, no tracking URI (it comes from
    params.yaml)."""
    drop = {*S3_ENV, "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """(paths, params file, tracking URL, database, S3 endpoint) after the classify branch ran
    up to register against the team server."""
    root = tmp_path_factory.mktemp("team-mlflow")
    logs = root / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as stack:
        db = stack.enter_context(postgres_database())
        endpoint = stack.enter_context(s3_server(logs, buckets=(BUCKET,)))
        url = stack.enter_context(mlflow_tracking_server(db, f"s3://{BUCKET}/mlflow", endpoint, logs))
        project = root / "project"
        # floor 0: the gate decides on a 1-epoch model; what is tested is where its records go
        params_file = make_project(project, {"classify": {"register": {"tracking_uri": url},
                                                          "promote": {"floor": 0.0}}}, name="team")
        params, paths = load_params(params_file), Paths(project)
        with _env_without_s3():
            for name in ("synth", "ingest", "split"):
                get_stage(name, params).run(params, paths)
            for stage in ("train", "evaluate", "register"):
                get_stage(f"{stage}-classify", params).run(params, paths.for_task("classify"))
        yield paths, params_file, url, db, endpoint


@contextlib.contextmanager
def _env_without_s3():
    saved = {k: os.environ.pop(k) for k in (*S3_ENV, "MLFLOW_S3_ENDPOINT_URL") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionflow.cli", *args], cwd=cwd, env=client_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def test_register_writes_runs_to_postgres_and_artifacts_to_s3(team):
    paths, _, url, db, endpoint = team
    reg = read_json(paths.for_task("classify").registration)
    assert reg["tracking_uri"] == url and reg["model_name"] == MODEL
    assert reg["version"] == "1" and reg["alias"] == "candidate"

    # the records are rows in PostgreSQL ...
    runs = dict(db.query("select run_uuid, status from runs"))
    assert runs.get(reg["run_id"]) == "FINISHED"
    assert ("team-classifier", 1) in db.query("select name, version from model_versions")
    assert ("team-classifier", "candidate", 1) in db.query("select name, alias, version from registered_model_aliases")
    params = dict(db.query(f"select key, value from params where run_uuid = '{reg['run_id']}'"))
    assert params["train.image_size"] == "64"

    # ... and the files objects in the bucket, reached by clients only through the server
    run = readback.get_run(reg["run_id"], url)
    assert run["artifact_uri"].startswith("mlflow-artifacts:/")
    keys = s3_keys(endpoint, BUCKET, "mlflow/")
    run_keys = [k for k in keys if f"/{reg['run_id']}/artifacts/" in k]
    assert any(k.endswith("/artifacts/meta.json") for k in run_keys), keys[:20]
    assert any(k.endswith("/metrics/evaluate.json") for k in run_keys)
    assert any(k.endswith("/MLmodel") for k in keys) and any(k.endswith("/model.pt") for k in keys)
    assert not paths.mlflow_artifacts.exists() and not (paths.root / "mlartifacts").exists()

    # the S3 secret is the server's alone: never a param, tag or registration field
    secret = S3_ENV["AWS_SECRET_ACCESS_KEY"]
    recorded = json.dumps([run["params"], run["tags"], reg])
    assert secret not in recorded and S3_ENV["AWS_ACCESS_KEY_ID"] not in recorded


def test_promote_moves_the_alias_on_the_server_and_logs_the_export_to_s3(team):
    paths, params_file, url, db, endpoint = team
    proc = _cli("promote", "--params", str(params_file), "--task", "classify", cwd=paths.root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    champion = readback.get_model_version_by_alias(MODEL, "champion", url)
    assert champion["version"] == "1" and sorted(champion["aliases"]) == ["candidate", "champion"]
    assert ("team-classifier", "champion", 1) in db.query("select name, alias, version from registered_model_aliases")
    assert any("/exported/" in k for k in s3_keys(endpoint, BUCKET, "mlflow/"))  # the ONNX file the gate checked
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


def _images(paths: Paths) -> list[Path]:
    return sorted((paths.root / "data").rglob("*.png"))[:4]


def test_predict_loads_the_candidate_from_the_server(team, tmp_path):
    paths, params_file, *_ = team
    folder = tmp_path / "images"
    folder.mkdir()
    for p in _images(paths):
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "preds.json"
    proc = _cli("predict", "--model", f"models:/{MODEL}@candidate", "--images", str(folder), "--out", str(out),
                "--params", str(params_file), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sorted(json.loads(out.read_text()), key=lambda r: r["path"])
    expected = load_predictor(paths.for_task("classify").model_dir).predict(
        [load_rgb(p) for p in sorted(folder.iterdir())])
    assert [r["label"] for r in records] == [e["label"] for e in expected]
    assert [r["confidence"] for r in records] == pytest.approx([e["confidence"] for e in expected], abs=1e-5)


def test_serve_answers_a_request_with_the_champion_from_the_server(team, tmp_path):
    paths, params_file, *_ = team
    port = free_port()
    cmd = [sys.executable, "-m", "visionflow.cli", "serve", "--model", f"models:/{MODEL}@champion",
           "--params", str(params_file), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    image = _images(paths)[0]
    with service(cmd, client_env(), f"{base}/health", port, tmp_path / "serve.log", "visionflow serve"):
        meta = httpx.get(f"{base}/metadata", timeout=60).json()
        r = httpx.post(f"{base}/predict", content=image.read_bytes(), headers={"Content-Type": "image/png"},
                       timeout=120)
    assert meta["model_name"] == MODEL and meta["alias"] == "champion" and meta["version"] == "1"
    assert r.status_code == 200, r.text
    [got] = r.json()["predictions"]
    [exp] = load_predictor(paths.for_task("classify").model_dir).predict([load_rgb(image)])
    assert got["label"] == exp["label"] and got["confidence"] == pytest.approx(exp["confidence"], abs=1e-5)
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in (tmp_path / "serve.log").read_text()


def test_doctor_finds_the_team_server(team):
    """`visionflow doctor` in the project that registers to the team's MLflow server: its line
    for the branch's store is ok (the server answers; this one has no login)."""
    paths, params_file, url, _, _ = team
    out = _cli("doctor", "--params", str(params_file), cwd=paths.root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"ok       MLflow (classify): {url}: the server answered" in out.stdout.splitlines(), out.stdout

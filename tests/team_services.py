"""A team's shared services, for real on loopback: a fresh PostgreSQL database on the machine's
cluster, moto's S3-compatible server, an MLflow tracking server on both. Each is a context
manager that starts the service, yields how to reach it, and removes or stops it whatever happens.

PostgreSQL: the Debian cluster (`pg_ctlcluster 15 main start`; .ci/run starts it). A role and a
database with unique names are created through the `postgres` superuser's local peer login
(as root: `runuser -u postgres -- psql`), reached by the server over TCP with a password, and
dropped at the end. Tests skip, naming what is missing, when no cluster or no superuser login is
at hand (CI turns a skip into a failure)."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from project import free_port  # tests/: the one free-port helper (test_team_mlflow imports it from here too)
from visionflow.core.service import stop_group, wait_for_http

BIN = Path(sys.executable).parent
PG_HOST, PG_PORT = "127.0.0.1", 5432
START_TIMEOUT_S = 240  # the MLflow server imports a lot on a loaded 2-core machine
# Test credentials for the S3 store; a real team takes them from its secret store, never params.
S3_ENV = {"AWS_ACCESS_KEY_ID": "visionflow-test-key", "AWS_SECRET_ACCESS_KEY": "visionflow-test-secret-" + "x" * 8,
          "AWS_DEFAULT_REGION": "us-east-1"}


def _psql(*statements: str) -> subprocess.CompletedProcess:
    """Each statement its own transaction (CREATE/DROP DATABASE refuse to run inside one)."""
    cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres"]
    for sql in statements:
        cmd += ["-c", sql]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")


def _require_postgres() -> None:
    if shutil.which("psql") is None:
        pytest.skip("PostgreSQL is not installed (psql not found)")
    with socket.socket() as s:
        if s.connect_ex((PG_HOST, PG_PORT)) != 0:
            pytest.skip(f"no PostgreSQL on {PG_HOST}:{PG_PORT}: start it with `pg_ctlcluster 15 main start`")
    probe = _psql("select 1")
    if probe.returncode != 0:
        pytest.skip(f"cannot log in as the postgres superuser to create a test database: {probe.stderr.strip()}")


@dataclass
class Database:
    name: str
    user: str
    password: str

    @property
    def sqlalchemy_uri(self) -> str:  # psycopg2: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3
        return f"postgresql+psycopg2://{self.user}:{self.password}@{PG_HOST}:{PG_PORT}/{self.name}"

    def query(self, sql: str) -> list[tuple]:
        import psycopg2

        with contextlib.closing(psycopg2.connect(host=PG_HOST, port=PG_PORT, dbname=self.name, user=self.user,
                                                 password=self.password)) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()


@contextlib.contextmanager
def postgres_database(prefix: str = "vf_test") -> Iterator[Database]:
    """A new role and database (unique names) on the local cluster, dropped afterwards."""
    _require_postgres()
    name = f"{prefix}_{secrets.token_hex(4)}"
    db = Database(name=name, user=name, password=secrets.token_hex(12))
    made = _psql(f"create role {db.user} login password '{db.password}'", f"create database {db.name} owner {db.user}")
    assert made.returncode == 0, made.stderr
    try:
        yield db
    finally:
        dropped = _psql(f"drop database if exists {db.name} with (force)", f"drop role if exists {db.user}")
        assert dropped.returncode == 0, dropped.stderr


@contextlib.contextmanager
def service(cmd: list[str], env: dict[str, str], health: str, port: int, log: Path, what: str) -> Iterator[None]:
    """Run `cmd` in its own process group (output to `log`) until `health` answers 200; stop the
    whole group afterwards and check that nothing listens on `port` any more."""
    with open(log, "w") as out:  # a file, not a pipe nobody drains
        proc = subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        if not wait_for_http(health, timeout=START_TIMEOUT_S, proc=proc):
            pytest.fail(f"{what} did not start:\n{log.read_text()[-3000:]}")
        yield
    finally:
        stop_group(proc)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"{what} still listens on {port}"


@contextlib.contextmanager
def s3_server(log_dir: Path, buckets: tuple[str, ...] = ("team",)) -> Iterator[str]:
    """moto's S3-compatible server (in memory) on a free loopback port, with `buckets` created;
    yields its endpoint URL."""
    port = free_port()
    log = log_dir / "moto.log"
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with service(cmd, dict(os.environ), f"{endpoint}/moto-api/", port, log, "moto_server"):
        for bucket in buckets:
            s3_client(endpoint).create_bucket(Bucket=bucket)
        yield endpoint


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name=S3_ENV["AWS_DEFAULT_REGION"])


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@contextlib.contextmanager
def mlflow_tracking_server(db: Database, artifacts: str, s3_endpoint: str, log_dir: Path,
                           extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` on `db` with artifacts proxied to `artifacts` (s3://bucket/prefix) in its
    own process group; yields its http:// URL. Only the server holds the S3 credentials:
    clients reach artifacts through it (mlflow-artifacts:/)."""
    port = free_port()
    log = log_dir / "mlflow-server.log"
    env = {**os.environ, **S3_ENV, **(extra_env or {}), "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           # no job-execution workers: 2 processes and about 0.5 GB instead of 10 and 2.5 GB
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it runs uvicorn from the venv's bin/
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", db.sqlalchemy_uri,
           "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           *extra_args]
    url = f"http://127.0.0.1:{port}"
    with service(cmd, env, f"{url}/health", port, log, "mlflow server"):
        yield url

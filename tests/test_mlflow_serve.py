"""MLflow's own REST server (`mlflow models serve --env-manager local`) on our registered models.

A real pipeline (synth, ingest, split, train, evaluate, register) makes a tiny classify, detect
and segment model in one temporary sqlite store; each is served by the MLflow CLI in its own
process group on a loopback port, and what POST /invocations returns must equal the in-process
pyfunc's and the Predictor's predictions for the same images.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

from visionflow.core.service import stop_group, wait_for_http  # noqa: E402
from visionflow.integrations import mlflow as tracking  # noqa: E402
from visionflow.core.config import load_params  # noqa: E402
from visionflow.manifest.images import load_rgb  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.deploy.pyfunc import decode_image, decode_mask, encode_image  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402
from visionflow.deploy.predictor import load_predictor  # noqa: E402

# Three server start-ups (about 25 s each on a busy 2-core machine) plus the pipeline.
pytestmark = pytest.mark.slow

START_TIMEOUT_S = 240  # generous: the server imports mlflow, torch and the model's code on a loaded machine
REQUEST_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Paths, str]:
    """A classify, a detect and a segment model registered in one store; (paths, tracking URI)."""
    root = tmp_path_factory.mktemp("mlflow-serve")
    # Two epochs at a high rate: enough for the tiny U-Net's masks to stop being one constant
    # class, so that equal masks mean equal pixels.
    # The detector keeps every box above 0.01, so an untrained one still answers with boxes.
    over = {"synth": {"n": 24}, "segment": {"train": {"epochs": 2, "lr": 0.01, "batch_size": 4,
                                                      "augment": {"preset": "none"}}},
            "detect": {"train": {"model": {"score_threshold": 0.01, "detections_per_image": 20}}}}
    params_file = make_project(root, over, name="ms", tasks=("classify", "detect", "segment"))
    params, paths = load_params(params_file), Paths(root)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)
    for task in ("classify", "detect", "segment"):
        for stage in ("train", "evaluate", "register"):
            get_stage(f"{stage}-{task}", params).run(params, paths.for_task(task))
    return paths, f"sqlite:///{root / 'mlflow.db'}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(model_uri: str, tracking_uri: str, log: Path) -> Iterator[str]:
    """`mlflow models serve` in its own process group, stopped (the group) whatever happens."""
    port = _free_port()
    # The CLI runs `uvicorn` through bash: the venv's bin/ must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:  # a file, not a pipe nobody drains (progress bars fill it)
        proc = subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_for_http(f"{base}/ping", timeout=START_TIMEOUT_S, proc=proc):
            pytest.fail(f"mlflow models serve did not start:\n{log.read_text()[-3000:]}")
        yield base
    finally:
        stop_group(proc)
    with socket.socket() as s:  # the server and its uvicorn child are gone
        assert s.connect_ex(("127.0.0.1", port)) != 0


def invocations(base: str, cells: list[str]) -> tuple[int, dict]:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[c] for c in cells]}}).encode()
    req = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _cells(paths: Paths) -> tuple[list[str], list[np.ndarray]]:
    """Base64 cells (two synthetic shape images as PNG, one resized to 48x72 as JPEG, and
    random noise as PNG) and the RGB arrays they decode to."""
    shapes = [load_rgb(p) for p in sorted((paths.root / "data").rglob("*.png"))[:3]]
    resized = np.asarray(Image.fromarray(shapes[2]).resize((48, 72)))
    noise = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    cells = [encode_image(shapes[0]), encode_image(shapes[1]), encode_image(resized, fmt="JPEG"), encode_image(noise)]
    return cells, [decode_image(c) for c in cells]


def _references(project, task: str, model_name: str):
    """The test images, and what the Predictor and the in-process pyfunc make of them:
    (uri, model URI, cells, arrays, Predictor predictions, pyfunc frame)."""
    paths, uri = project
    cells, arrays = _cells(paths)
    expected = load_predictor(paths.for_task(task).model_dir).predict(arrays)
    model_uri = f"models:/{model_name}@candidate"
    in_process = tracking.load_model(model_uri, uri).predict(pd.DataFrame({"image": cells}))
    return uri, model_uri, cells, arrays, expected, in_process



def _served(model_uri: str, uri: str, cells: list[str], tmp_path: Path) -> list[dict]:
    """One POST /invocations of `cells` to `mlflow models serve`: its rows, one per cell."""
    with mlflow_server(model_uri, uri, tmp_path / "server.log") as base:
        status, body = invocations(base, cells)
    assert status == 200, body
    assert len(body["predictions"]) == len(cells)
    return body["predictions"]

def test_classify_invocations_equal_the_pyfunc_and_the_predictor(project, tmp_path):
    uri, model_uri, cells, arrays, expected, in_process = _references(project, "classify", "ms-classifier")
    assert in_process["label"].tolist() == [e["label"] for e in expected]

    with mlflow_server(model_uri, uri, tmp_path / "server.log") as base:
        status, body = invocations(base, cells)
        assert status == 200, body
        rows = body["predictions"]
        # a cell that is no image: MLflow answers 400 with our decoder's message, and keeps serving
        bad_status, bad = invocations(base, ["bm90IGFuIGltYWdl"])  # base64 of "not an image"
        again_status, again = invocations(base, cells[:1])

    assert len(rows) == len(cells)
    for row, exp, (_, ref) in zip(rows, expected, in_process.iterrows()):
        assert set(row) == {"label", "name", "confidence"}
        assert row["label"] == exp["label"] == ref["label"]
        assert row["name"] == exp["name"] == ref["name"]
        assert row["confidence"] == pytest.approx(exp["confidence"], abs=1e-5)
        assert row["confidence"] == pytest.approx(ref["confidence"], abs=1e-5)
    assert again_status == 200 and again["predictions"][0]["label"] == rows[0]["label"]
    assert again["predictions"][0]["confidence"] == pytest.approx(rows[0]["confidence"], abs=1e-5)
    assert bad_status == 400 and "cannot identify image file" in bad.get("stack_trace", "") + bad["message"], bad


def test_segment_invocations_equal_the_pyfunc_and_the_predictor(project, tmp_path):
    uri, model_uri, cells, arrays, predictions, in_process = _references(project, "segment", "ms-segment")
    expected = [p["mask"] for p in predictions]
    assert any(len(np.unique(m)) > 1 for m in expected)  # not one constant class: pixels are compared

    rows = _served(model_uri, uri, cells, tmp_path)
    for row, mask, array, (_, ref) in zip(rows, expected, arrays, in_process.iterrows()):
        assert set(row) == {"mask_png", "classes_present"}
        served = decode_mask(row["mask_png"])
        assert served.shape == array.shape[:2]  # at the input's size, not the model's
        np.testing.assert_array_equal(served, mask)
        np.testing.assert_array_equal(served, decode_mask(ref["mask_png"]))
        present = json.loads(row["classes_present"])
        assert present == sorted(int(v) for v in np.unique(mask) if v) == json.loads(ref["classes_present"])


def test_detect_invocations_equal_the_pyfunc_and_the_predictor(project, tmp_path):
    uri, model_uri, cells, arrays, expected, in_process = _references(project, "detect", "ms-detect")
    assert sum(len(e["boxes"]) for e in expected) > 0  # boxes to compare, not empty lists

    rows = _served(model_uri, uri, cells, tmp_path)
    for row, exp, array, (_, ref) in zip(rows, expected, arrays, in_process.iterrows()):
        assert set(row) == {"boxes", "labels", "names", "scores", "masks"}
        boxes, labels, scores = (json.loads(row[k]) for k in ("boxes", "labels", "scores"))
        assert labels == [int(v) for v in exp["labels"]] == json.loads(ref["labels"])
        assert json.loads(row["names"]) == list(exp["names"]) == json.loads(ref["names"])
        assert json.loads(row["masks"]) == []  # Faster R-CNN: no instance masks
        np.testing.assert_allclose(scores, exp["scores"], atol=1e-5)
        np.testing.assert_allclose(scores, json.loads(ref["scores"]), atol=1e-5)
        assert scores == sorted(scores, reverse=True) and all(0.01 <= s <= 1 for s in scores)
        if boxes:  # absolute pixels of this input (the resized JPEG is 48 x 72), not the model's size
            b = np.asarray(boxes)
            np.testing.assert_allclose(b, np.asarray(exp["boxes"], dtype=float).reshape(-1, 4), atol=0.011)
            np.testing.assert_allclose(b, np.asarray(json.loads(ref["boxes"])), atol=1e-6)
            h, w = array.shape[:2]
            assert (b[:, 0] >= 0).all() and (b[:, 2] <= w + 1e-6).all() and (b[:, 3] <= h + 1e-6).all()
            assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()

"""The register stage on a real MLflow (temporary sqlite store, artifacts under tmp).

The model folder is built for real (a resnet18 state_dict, meta.json, an Albumentations
pipeline), the registered model is loaded back through the MLflow CLI in a fresh process
and must predict what the Predictor predicts directly.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import yaml
import torch
import torchvision
from PIL import Image

from visionflow.core.service import wait_for_http
from visionflow.integrations import mlflow as tracking
import mlflow_readback as readback  # noqa: E402  (tests/)
from mlflow import MlflowClient
from visionflow.core.config import RegisterParams, TrainParams
from visionflow.core.errors import UserError
from visionflow.core.files import read_json, write_json
from visionflow.core.paths import Paths
from visionflow.deploy.pyfunc import decode_image, encode_image
from visionflow.evaluation.report import write_evaluation
from visionflow.stages.register import file_md5, provenance_tags, register
from visionflow.deploy.predictor import load_predictor

CLASSES = ["circle", "square", "triangle"]
EPOCHS = 2


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def make_project(root: Path) -> Paths:
    """Everything the train, evaluate, ingest and split stages hand to register."""
    paths = Paths(root)
    paths.model_dir.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=len(CLASSES)).state_dict(), paths.model_dir / "model.pt")
    train = TrainParams(image_size=32, epochs=EPOCHS, augment={"preset": "light"})
    write_json(paths.model_dir / "meta.json", {
        "task": "classify", "arch": "resnet18", "num_classes": len(CLASSES), "classes": CLASSES,
        "image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "params": train.model_dump(mode="json"),
    })
    pipeline = A.Compose([A.Resize(32, 32), A.HorizontalFlip(p=0.5),
                          A.RandomBrightnessContrast(p=0.5), A.Normalize()])
    write_json(paths.model_dir / "augment.json", A.to_dict(pipeline))

    write_json(paths.train_metrics, {"best_epoch": 2, "epochs_run": EPOCHS, "best": {"val_accuracy": 0.6}, "device": "cpu"})
    paths.train_history.parent.mkdir(parents=True, exist_ok=True)
    paths.train_history.write_text("epoch,train_loss,val_loss,val_accuracy,lr,seconds\n"
                                   "1,1.10,1.05,0.4,0.001,3.2\n2,0.90,0.95,0.6,0.0005,3.1\n")
    write_evaluation(paths, {  # evaluate.json (scalars) and its details (the per-class table)
        "accuracy": 0.55, "top_k_accuracy": 0.9, "k": 2, "macro_f1": 0.5, "n": 20,
        "per_class": {c: {"precision": 0.5, "recall": 0.5, "f1": f, "support": 7}
                      for c, f in zip(CLASSES, (0.4, 0.5, 0.6))},
    })
    paths.figures_dir.mkdir(parents=True)
    Image.fromarray(np.full((40, 60, 3), (200, 30, 30), np.uint8)).save(paths.figures_dir / "confusion.png")
    paths.manifest.parent.mkdir(parents=True, exist_ok=True)
    paths.manifest.write_text('{"id":"shapes/a.png","labels":[0]}\n{"id":"shapes/b.png","labels":[1]}\n')
    write_json(paths.split_file, {"schema_version": 1, "seed": 0, "splits": {"train": [], "val": [], "test": []}})
    return paths


def registered_params_file(tmp: Path, model_name: str) -> tuple[Path, Paths, RegisterParams]:
    """A classifier registered as `model_name` (@candidate) in sqlite under `tmp`, and a
    params.yaml at tmp/params.yaml (the repo's, its classify.register pointing at that store): what
    a CLI command given `--model models:/NAME@candidate --params` reads. -> (that params file,
    the project registered from, the register settings)."""
    from visionflow.stages.register import register

    store = RegisterParams(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", model_name=model_name)
    paths = make_project(tmp / "project")
    register(store, paths)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["classify"]["register"] = store.model_dump()
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp / "params.yaml", paths, store


def _params(tmp: Path, db: str = "mlflow.db") -> RegisterParams:
    return RegisterParams(tracking_uri=f"sqlite:///{tmp / db}", model_name="test-classifier")


def _images() -> tuple[list[str], list[np.ndarray]]:
    """Base64 cells (two PNG, one JPEG) and the RGB arrays they decode to."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(48, 48, 3), (30, 40, 3), (64, 50, 3)]]
    cells = [encode_image(arrays[0]), encode_image(arrays[1]), encode_image(arrays[2], fmt="JPEG")]
    return cells, [decode_image(c) for c in cells]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("register")
    paths = make_project(tmp / "project")
    (paths.root / "README.md").write_text("x\n")
    _git(paths.root, "init", "-q")
    _git(paths.root, "add", "README.md")
    _git(paths.root, "commit", "-q", "-m", "init")
    # the data were relabelled after a review (visionflow annotate --pull): ingest's record of it
    write_json(paths.validation_report, {"samples": 2, "sources": [{"name": "shapes", "corrections": {
        "record": "data/corrections/shapes/v1/corrections.json", "version": 1, "corrected": 3, "reviewed": 5,
        "review": {"task": "classify", "report": "reports/classify/review.json", "sha256": "ab" * 32,
                   "model": "models:/test-classifier/7"}}}]})
    params = _params(tmp)
    return paths, params, register(params, paths)


def test_run_holds_params_history_metrics_tags_and_artifacts(registered, tmp_path):
    paths, params, result = registered
    uri = params.tracking_uri
    assert result["version"] == "1" and result["alias"] == "candidate" and result["tracking_uri"] == uri
    recorded = {k: v for k, v in result.items() if k not in ("reused", "model_uri", "ui")}
    assert read_json(paths.registration) == {**recorded, "model_uri": "models:/test-classifier@candidate",
                                             "ui": "visionflow ui mlflow"}
    mv = readback.get_model_version_by_alias("test-classifier", "candidate", uri)
    assert mv["version"] == result["version"] and mv["run_id"] == result["run_id"]

    run = readback.get_run(result["run_id"], uri)
    assert run["experiment_id"] == result["experiment_id"]
    # artifacts of a sqlite store live in the project's mlartifacts folder, not the cwd
    assert run["artifact_uri"].startswith(paths.mlflow_artifacts.resolve().as_uri())
    assert run["params"]["train.image_size"] == "32"
    assert run["params"]["train.model.arch"] == "resnet18"
    assert run["params"]["train.augment.preset"] == "light"
    assert run["params"]["train.early_stopping.patience"] == "5"
    assert readback.get_metric_history(result["run_id"], "val_accuracy", uri) == [(1, 0.4), (2, 0.6)]
    assert [s for s, _ in readback.get_metric_history(result["run_id"], "lr", uri)] == [1, 2]
    m = run["metrics"]
    assert m["test_accuracy"] == 0.55 and m["test_top_k_accuracy"] == 0.9 and m["test_macro_f1"] == 0.5
    assert {m[f"test_f1_{c}"] for c in CLASSES} == {0.4, 0.5, 0.6}
    tags = run["tags"]
    assert tags["git_commit"] == _git(paths.root, "rev-parse", "HEAD")
    assert tags["manifest_md5"] == file_md5(paths.manifest)
    assert tags["data.split_file_md5"] == file_md5(paths.split_file)
    assert tags["visionflow.task"] == "classify"
    assert tags["data.labels_corrected"] == "3"  # how many labels the relabelling changed, after which review
    assert tags["data.corrections_review"] == ("classify review reports/classify/review.json (sha256 abababababab, "
                                               "models:/test-classifier/7) -> data/corrections/shapes/v1/corrections.json")

    local = readback.download_artifacts(result["run_id"], "", uri, tmp_path / "art")
    assert (local / "figures" / "confusion.png").read_bytes() == (paths.figures_dir / "confusion.png").read_bytes()
    assert read_json(local / "metrics" / "evaluate.json") == read_json(paths.eval_metrics)
    assert read_json(local / "metrics" / "evaluate_details.json") == read_json(paths.eval_details)
    assert read_json(local / "meta.json")["classes"] == CLASSES
    assert read_json(local / "data" / "validation.json") == read_json(paths.validation_report)
    # the logged augmentation rebuilds into the same pipeline, giving the same outputs
    logged = read_json(local / "augmentation" / "augment.json")
    original = A.from_dict(read_json(paths.model_dir / "augment.json"))
    rebuilt = A.from_dict(logged)
    assert json.loads(json.dumps(A.to_dict(rebuilt))) == logged
    image = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for seed in range(4):
        original.set_random_seed(seed), rebuilt.set_random_seed(seed)
        np.testing.assert_array_equal(original(image=image)["image"], rebuilt(image=image)["image"])


def test_registered_model_predicts_like_the_predictor_in_a_fresh_process(registered, tmp_path):
    paths, params, result = registered
    cells, arrays = _images()
    expected = load_predictor(paths.model_dir).predict(arrays)

    request = tmp_path / "request.json"
    request.write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": [[c] for c in cells]}}))
    out = tmp_path / "predictions.json"
    # The MLflow CLI in a new interpreter: pyfunc.load_model("models:/NAME@candidate").predict(df)
    # with nothing of this process's state (visionflow itself comes from the model's code/).
    env = {**os.environ, "MLFLOW_TRACKING_URI": params.tracking_uri}
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", result["model_uri"], "-i", str(request),
         "-o", str(out), "-t", "json", "--env-manager", "local"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["predictions"]
    assert len(rows) == len(cells)
    for row, exp in zip(rows, expected):
        assert set(row) == {"label", "name", "confidence"}
        assert row["label"] == exp["label"] and row["name"] == exp["name"] == CLASSES[exp["label"]]
        assert row["confidence"] == pytest.approx(exp["confidence"], abs=1e-5)

    # In process, the column may also hold RGB arrays; the output follows the signature.
    model = tracking.load_model(result["model_uri"], params.tracking_uri)
    frame = model.predict(pd.DataFrame({"image": pd.Series(arrays, dtype=object)}))
    assert list(frame.columns) == ["label", "name", "confidence"]
    assert frame["label"].tolist() == [e["label"] for e in expected]
    assert frame["confidence"].to_numpy() == pytest.approx([e["confidence"] for e in expected], abs=1e-5)


def test_ui_command_serves_the_registered_model_on_loopback_and_stops(registered):
    paths, params, result = registered
    (paths.root / "params.yaml").write_text(yaml.safe_dump({
        "ingest": {"sources": [{"name": "s", "images": "data/s", "annotations": "data/s/a.json"}]},
        "classify": {"register": params.model_dump()},
    }))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "visionflow.cli", "ui", "mlflow", "--port", str(port)],
                          cwd=paths.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []  # read as it comes: the command's own readiness line may trail our probe
    reader = threading.Thread(target=lambda: lines.extend(iter(ui.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for_http(f"{base}/health", timeout=90, proc=ui), "MLflow UI did not start"
        with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/registered-models/get?name=test-classifier") as r:
            model = json.load(r)["registered_model"]
        assert {"alias": "candidate", "version": result["version"]} in model["aliases"]
        # the run's artifacts (file store next to the sqlite db) are served too
        url = f"{base}/get-artifact?path=figures/confusion.png&run_uuid={result['run_id']}"
        with urllib.request.urlopen(url) as r:
            assert r.read() == (paths.figures_dir / "confusion.png").read_bytes()
        dom = _rendered_dom(f"{base}/#/models/test-classifier")  # what a person sees, in a real browser
        deadline = time.monotonic() + 60
        while not any("training runs of experiment" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.2)
        # the command points at the experiment's training runs in the model-training view (MLflow 3
        # opens on its GenAI home page otherwise)
        runs_url = next(line for line in lines if "training runs of experiment" in line).split(": ", 1)[1].split()[0]
        runs_dom = _rendered_dom(runs_url)
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=30)
        reader.join(timeout=10)
    out = "".join(lines)
    assert ui.returncode == 0, out
    assert f"MLflow UI ready: http://127.0.0.1:{port}" in out
    with socket.socket() as s:  # the server and its workers are gone
        assert s.connect_ex(("127.0.0.1", port)) != 0
    if dom is None:
        pytest.skip("no chromium on PATH: the UI answered, but its page was not rendered in a browser")
    # The page is drawn by the UI's JavaScript (the HTML shell names no model): the rendered
    # page shows the registered model, its version and its alias.
    assert "test-classifier" in dom and "candidate" in dom and f"Version {result['version']}" in dom, dom[-3000:]
    run_name = readback.get_run(result["run_id"], params.tracking_uri)["tags"]["mlflow.runName"]
    assert runs_url.endswith("/runs?workflowType=machine_learning") and run_name in runs_dom, runs_dom[-3000:]
    assert "Model training" in runs_dom and "promote-" not in runs_dom, runs_dom[-3000:]


def _rendered_dom(url: str) -> str | None:
    """The page's DOM after headless Chromium ran its scripts; None without a browser."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if browser is None:
        return None
    with urllib.request.urlopen(url.split("#")[0]) as r:
        assert "test-classifier" not in r.read().decode()  # the shell alone proves nothing
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_same_model_is_not_registered_twice(tmp_path):
    """A rerun with nothing changed reports the version that holds these weights: no new version,
    no new run (issue 15: a few runs had left 9 versions of the classifier, 4 of them equal)."""
    paths = make_project(tmp_path / "project")
    params = _params(tmp_path)
    first = register(params, paths)
    again = register(params, paths)
    assert again == {**first, "reused": True} and first["reused"] is False
    client = MlflowClient(tracking_uri=params.tracking_uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'test-classifier'")] == ["1"]
    assert len(client.search_runs([first["experiment_id"]])) == 1
    # the file is DVC's record: the same whether the version was made now or found
    assert read_json(paths.registration) == {k: v for k, v in first.items() if k != "reused"}
    # other weights are another model: version 2, and the alias moves to it
    state = torch.load(paths.model_dir / "model.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, paths.model_dir / "model.pt")
    other = register(params, paths)
    assert other["version"] == "2" and other["reused"] is False
    # back to the first weights: version 1 again, and the alias follows
    torch.save(state, paths.model_dir / "model.pt")
    assert register(params, paths)["version"] == "1"
    assert readback.get_model_version_by_alias("test-classifier", "candidate", params.tracking_uri)["version"] == "1"


def test_registering_again_makes_version_2_and_moves_the_alias(tmp_path):
    paths = make_project(tmp_path / "project")
    params = _params(tmp_path).model_copy(update={"reuse_identical": False})  # a copy on purpose
    first = register(params, paths)
    second = register(params, paths)
    assert (first["version"], second["version"]) == ("1", "2")
    assert second["run_id"] != first["run_id"]
    mv = readback.get_model_version_by_alias("test-classifier", "candidate", params.tracking_uri)
    assert mv["version"] == "2" and mv["run_id"] == second["run_id"]
    assert read_json(paths.registration)["version"] == "2"
    # not a git repository
    assert readback.get_run(second["run_id"], params.tracking_uri)["tags"]["git_commit"] == "unknown"


def test_missing_eval_metrics_is_named_with_the_stage_that_makes_it(tmp_path):
    paths = make_project(tmp_path / "project")
    paths.eval_metrics.unlink()
    with pytest.raises(UserError) as err:
        register(_params(tmp_path), paths)
    assert str(paths.eval_metrics) in str(err.value) and "visionflow stage evaluate-classify" in str(err.value)
    assert not paths.registration.exists()
    assert not (tmp_path / "mlflow.db").exists()  # failed before touching MLflow


def test_manifest_md5_is_the_dvc_hash_and_a_stale_lock_is_flagged(tmp_path):
    paths = make_project(tmp_path / "project")
    md5 = file_md5(paths.manifest)
    lock = {"schema": "2.0", "stages": {"ingest": {"cmd": "visionflow stage ingest", "outs": [
        {"path": "data/processed/manifest.jsonl", "hash": "md5", "md5": md5, "size": 1}]}}}
    (paths.root / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    assert provenance_tags(paths)["manifest_md5"] == md5
    assert "data.manifest_md5_dvc_lock" not in provenance_tags(paths)
    lock["stages"]["ingest"]["outs"][0]["md5"] = "0" * 32
    (paths.root / "dvc.lock").write_text(json.dumps(lock))
    tags = provenance_tags(paths)
    assert tags["manifest_md5"] == md5 and tags["data.manifest_md5_dvc_lock"] == "0" * 32


def test_image_cells_decode_from_base64_bytes_and_arrays():
    rgb = np.random.default_rng(2).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    b64 = encode_image(rgb)
    np.testing.assert_array_equal(decode_image(b64), rgb)
    np.testing.assert_array_equal(decode_image(base64.b64decode(b64)), rgb)  # raw PNG bytes
    np.testing.assert_array_equal(decode_image(rgb), rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("RGBA").save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image(base64.b64encode(buf.getvalue()).decode()), rgb)
    with pytest.raises(ValueError):
        decode_image(rgb.astype(np.float32))

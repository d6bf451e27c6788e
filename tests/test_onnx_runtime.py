"""`predict` and `serve` on onnxruntime (visionflow.deploy.runtime), with real components only.

A real pipeline (synth, ingest, split, train, evaluate, register, promote) makes a tiny classifier
and segmenter in one temporary sqlite MLflow store; the promotion gate exports each candidate to
ONNX, checks its parity on the test split and logs the file to the version. The model folders are
also exported with `visionflow export-model` (parity on the project's test split) to their
default place, models/exported/<task>.onnx. What onnxruntime predicts must equal PyTorch's
predictions within the gate's tolerance; `--runtime auto` must pick onnxruntime only for a
parity-proven export of this very model, and say which runtime it took and why.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

from visionflow import cli  # noqa: E402
from visionflow.core.config import load_params  # noqa: E402
from visionflow.core.errors import UserError  # noqa: E402
from visionflow.core.files import read_json, write_json  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.deploy.export import TOLERANCE, default_export_path, sidecar_path  # noqa: E402
from visionflow.deploy.predict import load_batch_model  # noqa: E402
from visionflow.manifest.images import load_rgb  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402

NAMES = {"classify": "rt-classifier", "segment": "rt-segment"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(paths, tracking URI, params.yaml): classify and segment trained, registered and through
    the gate (floor 0: the export is checked and logged whatever the decision), and each model
    folder exported by the CLI with parity on the test split."""
    root = tmp_path_factory.mktemp("onnx-runtime")
    # Two epochs at a high rate: the tiny U-Net's masks stop being one constant class.
    over = {"synth": {"n": 24},
            "classify": {"promote": {"floor": 0.0}},
            "segment": {"train": {"epochs": 2, "lr": 0.01, "batch_size": 4, "augment": {"preset": "none"}},
                        "promote": {"floor": 0.0}}}
    params_file = make_project(root, over, name="rt", tasks=("classify", "segment"))
    params, paths = load_params(params_file), Paths(root)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)
    for task in ("classify", "segment"):
        for stage in ("train", "evaluate", "register", "promote"):
            get_stage(f"{stage}-{task}", params).run(params, paths.for_task(task))
        model_dir = paths.for_task(task).model_dir
        code = cli.main(["export-model", "--model", str(model_dir), "--out", str(default_export_path(model_dir, "onnx")),
                         "--params", str(params_file), "--no-log"])
        assert code == 0
    return paths, f"sqlite:///{root / 'mlflow.db'}", params_file


def _images(paths: Paths) -> list[np.ndarray]:
    """Shape images of the project, one resized to another aspect, and noise of odd sizes."""
    import cv2

    shapes = [load_rgb(p) for p in sorted((paths.root / "data").rglob("*.png"))[:4]]
    rng = np.random.default_rng(0)
    return [*shapes, cv2.resize(shapes[0], (90, 50)), rng.integers(0, 256, (41, 57, 3), dtype=np.uint8),
            rng.integers(0, 256, (100, 30, 3), dtype=np.uint8)]


def _assert_same(task: str, got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if task == "classify":
            assert g["label"] == w["label"] and g["name"] == w["name"]
            assert g["confidence"] == pytest.approx(w["confidence"], abs=TOLERANCE)
        else:
            assert g["mask"].shape == w["mask"].shape and g["mask"].dtype == w["mask"].dtype
            assert (g["mask"] == w["mask"]).mean() >= 0.999  # argmax of logits within 1e-3 of each other


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_auto_runs_a_proven_local_export_in_onnxruntime_and_predicts_what_torch_does(project, task):
    paths = project[0]
    model_dir = paths.for_task(task).model_dir
    onnx, torch_ = load_batch_model(str(model_dir), lambda: "", "auto"), load_batch_model(str(model_dir), lambda: "", "torch")
    assert onnx.runtime["name"] == "onnxruntime" and onnx.runtime["requested"] == "auto"
    assert onnx.runtime["export"] == str(default_export_path(model_dir, "onnx"))
    assert "parity proven on" in onnx.runtime["reason"] and "CPUExecutionProvider" in onnx.runtime["providers"]
    assert torch_.runtime == {"name": "torch", "requested": "torch", "reason": "--runtime torch"}
    images = _images(paths)
    want = torch_.predictor.predict(images, batch_size=1)
    _assert_same(task, onnx.predictor.predict(images, batch_size=1), want)  # batch 1
    _assert_same(task, onnx.predictor.predict(images, batch_size=8), want)  # all at once (dynamic batch)
    _assert_same(task, onnx.predictor.predict(images, batch_size=3), want)  # a short last batch
    # the records predict writes and serve answers
    served = [onnx.contract.served_record(r) for r in onnx.predict(images)]
    assert len(served) == len(images) and set(served[0]) == set(torch_.contract.served_record(torch_.predict(images[:1])[0]))


@pytest.fixture(scope="module")
def image_dir(project, tmp_path_factory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    for i, im in enumerate(_images(project[0])):
        Image.fromarray(im).save(folder / f"im{i}.png")
    return folder


def _predict_cli(capsys, images: Path, model: str, out: Path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["predict", "--model", model, "--images", str(images), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_cli_says_which_runtime_and_writes_the_same_rows(project, image_dir, tmp_path, capsys):
    model_dir = project[0].for_task("classify").model_dir
    code, out, err = _predict_cli(capsys, image_dir, str(model_dir), tmp_path / "onnx.jsonl")
    assert code == 0, err
    assert "runtime: onnxruntime [CPUExecutionProvider" in out and "parity proven on" in out
    code, out, err = _predict_cli(capsys, image_dir, str(model_dir), tmp_path / "torch.jsonl", "--runtime", "torch")
    assert code == 0, err
    assert "runtime: torch (--runtime torch)" in out
    rows = [[json.loads(line) for line in (tmp_path / f"{r}.jsonl").read_text().splitlines()] for r in ("onnx", "torch")]
    assert [(r["path"], r["label"], r["name"]) for r in rows[0]] == [(r["path"], r["label"], r["name"]) for r in rows[1]]
    assert [r["confidence"] for r in rows[0]] == pytest.approx([r["confidence"] for r in rows[1]], abs=TOLERANCE)


def _copy_model(project, task: str, dst: Path, with_export: bool) -> Path:
    src = project[0].for_task(task).model_dir
    model_dir = dst / "models" / task
    shutil.copytree(src, model_dir)
    if with_export:
        exported = default_export_path(src, "onnx")
        (dst / "models" / "exported").mkdir()
        for f in (exported, sidecar_path(exported)):
            shutil.copy(f, dst / "models" / "exported" / f.name)
    return model_dir


def test_auto_falls_back_to_torch_without_a_proven_export_and_onnx_refuses(project, image_dir, tmp_path, capsys):
    # no export at all
    bare = _copy_model(project, "classify", tmp_path / "bare", with_export=False)
    model = load_batch_model(str(bare), lambda: "")
    assert model.runtime["name"] == "torch"
    assert model.runtime["reason"].startswith("auto: no ONNX export at ") and "visionflow export-model" in model.runtime["reason"]
    code, out, _ = _predict_cli(capsys, image_dir, str(bare), tmp_path / "bare.jsonl")
    assert code == 0 and "runtime: torch (auto: no ONNX export at" in out
    with pytest.raises(UserError, match="--runtime onnx: no ONNX export at .*visionflow export-model"):
        load_batch_model(str(bare), lambda: "", "onnx")

    model_dir = _copy_model(project, "classify", tmp_path / "checked", with_export=True)
    side_file = sidecar_path(default_export_path(model_dir, "onnx"))
    side = read_json(side_file)
    assert load_batch_model(str(model_dir), lambda: "").runtime["name"] == "onnxruntime"
    # a parity record that failed
    write_json(side_file, {**side, "parity": {**side["parity"], "samples": {**side["parity"]["samples"],
                                                                            "within_tolerance": False}}})
    model = load_batch_model(str(model_dir), lambda: "")
    assert model.runtime["name"] == "torch" and "parity check FAILED" in model.runtime["reason"]
    with pytest.raises(UserError, match="parity check FAILED"):
        load_batch_model(str(model_dir), lambda: "", "onnx")
    # parity on synthetic images only: auto will not, --runtime onnx may (and says so)
    write_json(side_file, {**side, "parity": {"self_check": side["parity"]["self_check"]}})
    model = load_batch_model(str(model_dir), lambda: "")
    assert model.runtime["name"] == "torch" and "synthetic images only" in model.runtime["reason"]
    forced = load_batch_model(str(model_dir), lambda: "", "onnx")
    assert forced.runtime["name"] == "onnxruntime" and "synthetic images only" in forced.runtime["reason"]
    # an export of another model.pt (the model was retrained since)
    write_json(side_file, {**side, "source": {**side["source"], "model_sha256": "0" * 64}})
    model = load_batch_model(str(model_dir), lambda: "")
    assert model.runtime["name"] == "torch" and "another model.pt" in model.runtime["reason"]


def test_runtime_onnx_without_an_export_exits_2_naming_the_fix(project, tmp_path):
    bare = _copy_model(project, "segment", tmp_path, with_export=False)
    (tmp_path / "im.png").write_bytes((project[0].root / "data").rglob("*.png").__next__().read_bytes())
    proc = subprocess.run([sys.executable, "-m", "visionflow.cli", "predict", "--model", str(bare), "--images",
                           str(tmp_path / "im.png"), "--runtime", "onnx"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "--runtime onnx: no ONNX export at" in proc.stderr and "visionflow export-model" in proc.stderr


def test_detectors_run_in_torch_and_onnx_is_refused(tmp_path):
    from test_export import make_model_dir  # a random-init Faster R-CNN folder (detectors export to TorchScript)

    model_dir = make_model_dir(tmp_path / "models" / "detect", "detect")
    model = load_batch_model(str(model_dir), lambda: "")
    assert model.runtime["name"] == "torch" and "TorchScript only, not ONNX" in model.runtime["reason"]
    with pytest.raises(UserError, match="--runtime onnx: detect models export to TorchScript only"):
        load_batch_model(str(model_dir), lambda: "", "onnx")


@pytest.mark.parametrize("task", ["classify", "segment"])
def test_registered_version_runs_the_gates_export(project, task):
    from visionflow.deploy.serve import load_served_model

    paths, uri, _ = project
    spec = f"models:/{NAMES[task]}@candidate"
    served = load_served_model(spec, uri)
    rt = served.metadata["runtime"]
    assert rt["name"] == "onnxruntime" and rt["export"].startswith("runs:/") and "parity proven on" in rt["reason"]
    images = _images(paths)
    want = load_batch_model(str(paths.for_task(task).model_dir), lambda: "", "torch").predict(images)
    got = load_batch_model(spec, lambda: uri).predict(images)
    _assert_same(task, got, want)
    # --runtime torch: the registered pyfunc, as before
    pyfunc = load_served_model(spec, uri, "torch")
    assert pyfunc.metadata["runtime"]["name"] == "torch" and pyfunc.metadata["version"] == served.metadata["version"]


def test_registered_version_without_export_uses_torch(project):
    from mlflow import MlflowClient

    paths, uri, _ = project
    name = NAMES["classify"]
    client = MlflowClient(uri, uri)
    version = client.get_model_version_by_alias(name, "candidate")
    artifact = version.tags["export.uri"]
    client.delete_model_version_tag(name, version.version, "export.uri")
    try:
        model = load_batch_model(f"models:/{name}@candidate", lambda: uri)
        assert model.runtime["name"] == "torch" and "carries no export" in model.runtime["reason"]
        with pytest.raises(UserError, match="carries no export.*visionflow promote"):
            load_batch_model(f"models:/{name}@candidate", lambda: uri, "onnx")
    finally:
        client.set_model_version_tag(name, version.version, "export.uri", artifact)
    runs = load_batch_model(f"runs:/{version.run_id}/model", lambda: uri)
    assert runs.runtime["name"] == "torch" and "carries no export" in runs.runtime["reason"]


def test_serve_metadata_names_the_runtime(project, tmp_path):
    """`visionflow serve` of the registered classifier: /metadata says onnxruntime, /predict
    answers what PyTorch predicts."""
    from test_serve import encode, start_server, stop_server

    paths, uri, _ = project
    proc, base = start_server(["--model", f"models:/{NAMES['classify']}@candidate", "--tracking-uri", uri],
                              cwd=tmp_path)
    try:
        meta = httpx.get(f"{base}/metadata", timeout=60).json()
        images = _images(paths)
        body = httpx.post(f"{base}/predict", json={"images": [
            __import__("base64").b64encode(encode(im)).decode() for im in images]}, timeout=120).json()
    finally:
        out = stop_server(proc)
    assert meta["runtime"]["name"] == "onnxruntime" and meta["runtime"]["requested"] == "auto", meta
    assert "runtime: onnxruntime" in out and "Traceback" not in out
    want = load_batch_model(str(paths.for_task("classify").model_dir), lambda: "", "torch").predict(images)
    assert [p["label"] for p in body["predictions"]] == [w["label"] for w in want]
    assert [p["confidence"] for p in body["predictions"]] == pytest.approx([w["confidence"] for w in want], abs=TOLERANCE)


def test_a_fixed_batch_export_runs_any_batch(project, tmp_path):
    """A file exported without the dynamic batch axis (batch 2) runs in chunks, the last padded."""
    import torch

    from visionflow.deploy.export import INPUT_NAME, build_graph, load_model_folder
    from visionflow.deploy.runtime import OnnxPredictor

    paths = project[0]
    model_dir = paths.for_task("classify").model_dir
    predictor = load_model_folder(model_dir)
    size = predictor.meta["image_size"]
    fixed = tmp_path / "fixed.onnx"
    program = torch.onnx.export(build_graph(predictor), (torch.rand(2, 3, size, size) * 255,), input_names=[INPUT_NAME],
                                output_names=["probs"], dynamo=True, verbose=False)
    program.save(str(fixed), external_data=False)
    onnx = OnnxPredictor(fixed, predictor.meta)
    assert onnx.fixed_batch == 2
    images = _images(paths)
    want = predictor.predict(images)
    for batch in (1, 2, 5, 8):
        _assert_same("classify", onnx.predict(images, batch_size=batch), want)

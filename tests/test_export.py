"""Model export: real model folders (random-init resnet18, U-Net, Faster R-CNN on a width-0.25
MobileNetV2, 64 px), exported for real, run in onnxruntime / torch.jit.load and compared with
the PyTorch model on real image files written to tmp_path."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import albumentations as A
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from visionflow import cli
from visionflow.deploy import export, parity
from visionflow.core.config import AugmentParams, ModelParams, TrainParams
from visionflow.core.errors import UserError
from visionflow.manifest.masks import encode_rle
from visionflow.core.files import file_digest, write_json
from visionflow.manifest import Instance, Sample
from visionflow.tasks import get_task
from visionflow.deploy.predictor import load_predictor

CLASSES = ["circle", "square", "triangle"]
SIZE = 64
MODELS = {
    "classify": {"arch": "resnet18"},
    "segment": {"arch": "unet", "backbone": None, "backbone_weights": None, "width": 0.25},
    "detect": {"arch": "fasterrcnn", "backbone": "mobilenet_v2", "backbone_weights": None, "width": 0.25},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model_dir(root: Path, task: str) -> Path:
    """A model folder as the train stage writes it, with random weights."""
    params = TrainParams(model=ModelParams(**MODELS[task]), image_size=SIZE, augment=AugmentParams(preset="none"))
    t = get_task(task)
    torch.manual_seed(0)
    model = t.build_model(params, len(CLASSES), pretrained=False)
    root.mkdir(parents=True)
    torch.save(model.state_dict(), root / "model.pt")
    write_json(root / "meta.json", {"task": task, "arch": MODELS[task]["arch"], "num_classes": len(CLASSES),
                                    "classes": CLASSES, "image_size": SIZE, "mean": [0.485, 0.456, 0.406],
                                    "std": [0.229, 0.224, 0.225], "params": params.model_dump(mode="json")})
    write_json(root / "augment.json", A.to_dict(t.build_transforms(params)[0]))
    return root


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> tuple[list[Sample], Path]:
    """Six labelled images of other sizes than the model's (so the resize matters), each with two
    rectangles (boxes, RLE masks; the bigger one is the image's class)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        h, w = 48 + 8 * i, 80 - 4 * i
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        instances = []
        for j, (y1, x1, y2, x2) in enumerate([(4, 4, h // 2 + 10, w // 2 + 8), (h // 2, w // 2, h - 3, w - 3)]):
            pixels = np.zeros((h, w), bool)
            pixels[y1:y2, x1:x2] = True
            image[pixels] = (220, 60 * j, 40)
            instances.append(Instance(bbox=[float(x1), float(y1), float(x2), float(y2)], category_id=(i + j) % 3,
                                      rle=encode_rle(pixels), area=float(pixels.sum())))
        Image.fromarray(image).save(root / f"s{i}.png")
        out.append(Sample(id=f"s{i}", root=str(root), path=f"s{i}.png", width=w, height=h, sha256="0" * 64,
                          instances=instances))
    return out, root


def images_of(samples: list[Sample]) -> list[np.ndarray]:
    return [np.asarray(Image.open(s.image_path()).convert("RGB")) for s in samples]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- classify: ONNX through the CLI ----------------------------------------------------------

@pytest.fixture(scope="module")
def classify_onnx(tmp_path_factory):
    """The CLI run once on a classifier folder: (exit code, stdout, model folder, file)."""
    tmp = tmp_path_factory.mktemp("classify")
    model_dir = make_model_dir(tmp / "models" / "classify", "classify")
    out = tmp / "exported" / "classify.onnx"
    code = cli.main(["export-model", "--model", str(model_dir), "--format", "onnx", "--out", str(out),
                     "--samples", "0"])
    return code, model_dir, out


def test_cli_writes_the_onnx_file_and_reports_it(classify_onnx, capsys):
    code, model_dir, out = classify_onnx
    assert code == 0 and out.is_file() and export.sidecar_path(out).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["classify.onnx", "classify.onnx.json"]  # no temp files


def test_classify_onnx_runs_batch_1_and_3_like_pytorch(classify_onnx, samples):
    _, model_dir, out = classify_onnx
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and outp.name == "probs"
    assert not isinstance(inp.shape[0], int) and inp.shape[1:] == [3, SIZE, SIZE]  # symbolic batch axis
    images = images_of(samples[0])
    predictor = load_predictor(model_dir)
    for batch in (images[:1], images[1:4]):
        probs = session.run(None, {"images": export.preprocess(batch, SIZE)})[0]
        expected = np.array([p["probs"] for p in predictor.predict(batch)])  # the model folder's own pipeline
        assert probs.shape == (len(batch), len(CLASSES))
        assert np.abs(probs - expected).max() < 1e-4
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_sidecar_describes_the_file(classify_onnx):
    _, model_dir, out = classify_onnx
    side = json.loads(export.sidecar_path(out).read_text())
    assert side["format"] == "onnx" and side["task"] == "classify" and side["classes"] == CLASSES
    assert side["image_size"] == SIZE and side["num_classes"] == 3
    assert side["file"] == out.name and side["bytes"] == out.stat().st_size and side["sha256"] == file_digest(out)
    assert side["input"]["name"] == "images" and side["input"]["shape"] == ["batch", 3, SIZE, SIZE]
    assert side["input"]["range"].startswith("0..255") and "RGB" in side["input"]["layout"]
    assert side["input"]["mean"] == [0.485, 0.456, 0.406] and "inside the graph" in side["input"]["normalization"]
    assert [o["name"] for o in side["outputs"]] == ["probs"]
    assert isinstance(side["opset"], int) and side["opset"] >= 17
    assert {"torch", "onnx", "onnxruntime"} <= set(side["versions"])
    assert side["source"]["model_sha256"] == file_digest(model_dir / "model.pt")
    assert side["parity"]["self_check"]["max_abs_diff"] < 1e-4


def test_classify_parity_on_labelled_samples(classify_onnx, samples):
    _, model_dir, out = classify_onnx
    items, root = samples
    result = parity.check_parity(model_dir, out, items, root)
    assert result["n"] == len(items) and result["metric"] == "accuracy"
    assert result["metric_torch"] == result["metric_export"] and result["agreement"] == 1.0
    assert result["max_abs_diff"] < 1e-4 and result["within_tolerance"] is True
    strict = parity.check_parity(model_dir, out, items, root, tolerance=0.0)  # the gate does fail
    assert strict["within_tolerance"] is (strict["max_abs_diff"] == 0.0)


def test_cli_checks_parity_on_the_projects_test_split(classify_onnx, samples, tmp_path, capsys):
    """With a project (params.yaml, manifest, split, categories), the CLI checks the metric on
    the first --samples test samples and records it in the sidecar."""
    from visionflow.manifest import Category, write_categories, write_manifest, write_split
    from visionflow.core.paths import Paths

    _, model_dir, _ = classify_onnx
    items, _ = samples
    paths = Paths(tmp_path)
    paths.params.write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    write_manifest(paths.manifest, items)
    write_split(paths.split_file, {"train": [items[0].id], "test": [s.id for s in items[1:]]}, seed=0)
    write_categories(paths.categories, [Category(i, name) for i, name in enumerate(CLASSES)])
    out = tmp_path / "classify.torchscript"
    code, stdout, _ = run_cli(capsys, "export-model", "--model", str(model_dir), "--format", "torchscript",
                              "--out", str(out), "--samples", "4", "--params", str(paths.params))
    assert code == 0
    assert "parity vs PyTorch on 4 test samples" in stdout and "within tolerance" in stdout
    parity = json.loads(export.sidecar_path(out).read_text())["parity"]["samples"]
    assert parity["n"] == 4 and parity["metric_torch"] == parity["metric_export"] and parity["within_tolerance"]


# --- segment: ONNX ---------------------------------------------------------------------------

def test_segment_onnx_logits_and_mask_batch_1_and_3(tmp_path, samples):
    model_dir = make_model_dir(tmp_path / "segment", "segment")
    out = tmp_path / "segment.onnx"
    info = export.export_model(model_dir, "auto", out)
    assert info["format"] == "onnx" and [o["name"] for o in info["outputs"]] == ["logits", "mask"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    predictor = load_predictor(model_dir)
    images = images_of(samples[0])
    for batch in (images[:1], images[1:4]):
        # letterboxed, as the model was trained (train.resize default)
        x = export.preprocess(batch, SIZE, predictor.task.input_resize(predictor.meta))
        logits, mask = session.run(None, {"images": x})
        normalised = np.stack([predictor.transform(image=im)["image"].transpose(2, 0, 1) for im in batch])
        with torch.no_grad():
            expected = predictor.model(torch.from_numpy(normalised)).numpy()
        assert logits.shape == (len(batch), len(CLASSES) + 1, SIZE, SIZE) and mask.shape == (len(batch), SIZE, SIZE)
        assert np.abs(logits - expected).max() < 1e-4
        assert mask.dtype == np.uint8 and (mask == logits.argmax(1)).all()
    result = parity.check_parity(model_dir, out, *samples)
    assert result["metric"] == "miou" and result["within_tolerance"]
    assert abs(result["metric_torch"] - result["metric_export"]) < 1e-6


# --- detect: TorchScript ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("detect") / "models" / "detect", "detect")


@pytest.mark.filterwarnings("ignore:RCNN always returns", "ignore:.*torch.jit.load.*deprecated")
def test_detector_torchscript_gives_pytorchs_boxes(detector, samples, tmp_path):
    items, root = samples
    out = tmp_path / "detect.torchscript"
    items = items[:4]
    result = parity.export_and_check(detector, items, root, fmt="auto", out_path=out)
    assert result["format"] == "torchscript" and result["path"] == str(out)
    assert result["metric"] == "AP50" and result["metric_torch"] == result["metric_export"]
    assert result["mismatched_images"] == 0 and result["within_tolerance"]
    assert json.loads(export.sidecar_path(out).read_text())["parity"]["samples"]["n"] == len(items)

    scripted = torch.jit.load(str(out))
    model = load_predictor(detector).model
    x = export.preprocess(images_of(items[:2]), SIZE)
    with torch.no_grad():
        got = scripted(torch.from_numpy(x))
        expected = model(list(torch.from_numpy(x) / 255.0))
    assert len(got) == 2
    for g, e in zip(got, expected):
        keep = e["labels"] > 0
        assert len(g["boxes"]) == int(keep.sum()) > 0  # random weights still propose boxes at 0.05
        order = torch.argsort(e["scores"][keep], descending=True)
        torch.testing.assert_close(g["scores"], e["scores"][keep][order])
        torch.testing.assert_close(g["boxes"], e["boxes"][keep][order])
        assert torch.equal(g["labels"], e["labels"][keep][order] - 1)


RACE = """
import json, sys, threading, warnings
warnings.simplefilter("ignore")
from visionflow.deploy import export
from pathlib import Path
model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
results, start = {}, threading.Barrier(4)
def one(i, barrier=None):
    predictor = export.load_model_folder(model_dir)
    if barrier:
        barrier.wait()  # all four compile at once, as the branches' promote stages may
    try:
        export.write_export(predictor, model_dir, "torchscript", out / f"{i}.torchscript")
        results[i] = "ok"
    except Exception as exc:
        results[i] = str(exc)[-300:]
threads = [threading.Thread(target=one, args=(i, start)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
one("after")
print(json.dumps(results))
"""


def test_exports_side_by_side_in_one_process_all_succeed(detector, tmp_path):
    """Branches promoting side by side (`--task-runner threads`) export in one process at once.
    TorchScript compilation is not thread-safe: without export's lock, two threads define the
    same classes ("Can't redefine method: forward on class ...", 2 runs in 3 here) and a class
    left half-defined fails every later export in the process. A fresh process, so that no class
    is compiled yet."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", RACE, str(detector), str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == {"0": "ok", "1": "ok", "2": "ok", "3": "ok", "after": "ok"}, results
    assert len(list(tmp_path.glob("*.torchscript"))) == 5


def test_detector_to_onnx_exits_2_naming_torchscript(detector, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export-model", "--model", str(detector), "--format", "onnx",
                           "--out", str(tmp_path / "d.onnx"))
    assert code == 2 and "detect models export to torchscript only" in err and "--format torchscript" in err
    assert not (tmp_path / "d.onnx").exists()


# --- errors and atomicity --------------------------------------------------------------------

def test_bad_format_exits_2_listing_the_formats(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["export-model", "--model", str(tmp_path), "--format", "tflite", "--out", str(tmp_path / "m.x")])
    assert exc.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown export format 'tflite'.*onnx, torchscript, auto"):
        export.resolve_format("classify", "tflite")


def test_export_model_help_stays_light():
    import subprocess

    code = ("import sys, visionflow.cli as c\n"
            "try:\n    c.main(['export-model', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'mlflow', 'albumentations', 'cv2') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert "--format {onnx,torchscript,auto}" in proc.stdout


def test_missing_model_folder_exits_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export-model", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "model folder not found" in err


def test_interrupted_export_keeps_the_previous_file(classify_onnx, tmp_path, monkeypatch):
    _, model_dir, _ = classify_onnx
    out = tmp_path / "classify.torchscript"
    out.write_bytes(b"previous export")
    real = export._WRITERS["torchscript"]

    def interrupted(graph, example, path, task):
        real(graph, example, path, task)  # the whole file is written to the temporary path ...
        assert path.stat().st_size > 1000 and path != out
        raise KeyboardInterrupt  # ... and the process is stopped before it is kept

    monkeypatch.setitem(export._WRITERS, "torchscript", interrupted)
    for target in (out, tmp_path / "fresh.torchscript"):
        with pytest.raises(KeyboardInterrupt):
            export.export_model(model_dir, "torchscript", target)
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classify.torchscript"]  # no partial, no temp, no sidecar


# --- an MLflow model URI ---------------------------------------------------------------------

@pytest.mark.slow
def test_registered_model_uri_exports_its_model_folder(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_register import registered_params_file

    params_file, paths, store = registered_params_file(tmp_path, "export-test")
    out = tmp_path / "registered.torchscript"
    code, stdout, _ = run_cli(capsys, "export-model", "--model", "models:/export-test@candidate", "--format",
                              "torchscript", "--out", str(out), "--params", str(params_file))
    assert code == 0 and str(out) in stdout and "synthetic images only" in stdout
    side = json.loads(export.sidecar_path(out).read_text())
    assert side["source"]["model"] == "models:/export-test@candidate"
    assert side["source"]["model_sha256"] == file_digest(paths.model_dir / "model.pt")
    # the file and its sidecar are attached to the version: in its run under exported/, and tagged
    from mlflow.tracking import MlflowClient  # tests read the registry directly

    client = MlflowClient(store.tracking_uri, store.tracking_uri)
    mv = client.get_model_version_by_alias("export-test", "candidate")
    assert f"logged to the model version: runs:/{mv.run_id}/exported/registered.torchscript" in stdout
    assert mv.tags["export.uri"] == f"runs:/{mv.run_id}/exported/registered.torchscript"
    assert mv.tags["export.format"] == "torchscript" and mv.tags["export.sha256"] == file_digest(out)
    assert mv.tags["export.within_tolerance"] == "true" and mv.tags["export.parity_on"].startswith("synthetic")
    logged = {a.path for a in client.list_artifacts(mv.run_id, "exported")}
    assert logged == {"exported/registered.torchscript", "exported/registered.torchscript.json"}
    got = client.download_artifacts(mv.run_id, "exported/registered.torchscript", str(tmp_path / "dl"))
    assert Path(got).read_bytes() == out.read_bytes()
    again = tmp_path / "not-logged.torchscript"  # --no-log leaves the version alone
    code, stdout, _ = run_cli(capsys, "export-model", "--model", "models:/export-test@candidate", "--format",
                              "torchscript", "--out", str(again), "--params", str(params_file), "--no-log")
    assert code == 0 and "logged to the model version" not in stdout
    assert {a.path for a in client.list_artifacts(mv.run_id, "exported")} == logged
    code, _, err = run_cli(capsys, "export-model", "--model", "models:/export-test@nope", "--out", str(out),
                           "--params", str(params_file))
    assert code == 2 and "models:/export-test@nope" in err

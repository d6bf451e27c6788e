"""`visionflow predict` with real components: a real model folder (resnet18 state_dict,
meta.json, augment.json), registered on a temporary sqlite MLflow store, real image files
(some corrupt) and a real video written with OpenCV. The CLI's predictions must equal the
Predictor's on the same pixels."""
from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from visionflow import cli
from visionflow.core.config import RegisterParams
from visionflow.manifest.images import load_rgb
from visionflow.deploy.predict import Item, predict_items
from visionflow.stages.register import register
from visionflow.deploy.predictor import load_predictor

sys.path.insert(0, str(Path(__file__).parent))
from test_register import CLASSES, make_project  # noqa: E402  (a model project as register receives it)
MODEL_NAME = "predict-test-classifier"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(model folder, params.yaml naming the sqlite store, registration result)."""
    tmp = tmp_path_factory.mktemp("predict-model")
    paths = make_project(tmp / "project")
    params = RegisterParams(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", model_name=MODEL_NAME)
    result = register(params, paths)
    params_file = tmp / "params.yaml"
    project_params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params_file.write_text(yaml.safe_dump({**project_params, "classify": {**project_params["classify"], "register": params.model_dump()}}))
    return paths.model_dir, params_file, result


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder tree of readable images in several modes and formats, a truncated JPEG
    and a text file. Returns (folder, readable paths sorted, corrupt path)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    good = []
    for i in range(7):
        rgb = rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)
        name = root / ("sub" if i % 3 == 0 else ".") / f"img{i}.{'jpg' if i % 2 else 'png'}"
        img = Image.fromarray(rgb)
        img = img.convert("L") if i == 2 else img.convert("RGBA") if i == 4 else img
        img.save(name)
        good.append(name.resolve())
    jpeg = (root / "img1.jpg").read_bytes()
    corrupt = root / "broken.jpg"
    corrupt.write_bytes(jpeg[: len(jpeg) // 3])  # truncated mid-scan
    (root / "notes.txt").write_text("not an image\n")
    return root, sorted(good), corrupt


def _expected(model_dir: Path, arrays: list[np.ndarray]) -> list[dict]:
    return load_predictor(model_dir).predict(arrays)


def _assert_same(rows: list[dict], expected: list[dict]) -> None:
    assert len(rows) == len(expected)
    for row, exp in zip(rows, expected):
        assert int(row["label"]) == exp["label"] and row["name"] == exp["name"] == CLASSES[exp["label"]]
        assert float(row["confidence"]) == pytest.approx(exp["confidence"], abs=1e-5)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["predict", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_folder_to_csv_equals_the_predictor_and_reports_the_corrupt_file(model, images, tmp_path, capsys):
    model_dir, _, _ = model
    folder, good, corrupt = images
    out = tmp_path / "preds.csv"
    code, stdout, _ = _run(capsys, "--model", model_dir, "--images", folder, "--out", out, "--batch-size", 3)
    assert code == 0
    rows = _read_csv(out)
    assert list(rows[0]) == ["path", "label", "name", "confidence"]
    assert [Path(r["path"]).resolve() for r in rows] == good  # recursive, sorted, images only
    _assert_same(rows, _expected(model_dir, [load_rgb(p) for p in good]))
    assert "skipped 1 unreadable image" in stdout and str(corrupt) in stdout
    assert "ignored 1 file" in stdout and "notes.txt" in stdout
    assert ["total", str(len(good))] in [line.split() for line in stdout.splitlines()]  # the counts table


def test_registered_alias_in_a_fresh_process_writes_json(model, images, tmp_path):
    model_dir, params_file, result = model
    folder, good, _ = images
    out = tmp_path / "preds.json"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store comes from --params
    proc = subprocess.run(
        [sys.executable, "-m", "visionflow.cli", "predict", "--model", f"models:/{MODEL_NAME}@candidate",
         "--images", str(folder), "--out", str(out), "--params", str(params_file)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [Path(r["path"]).resolve() for r in records] == good
    assert all(set(r) == {"path", "label", "name", "confidence"} for r in records)
    _assert_same(records, _expected(model_dir, [load_rgb(p) for p in good]))
    assert "broken.jpg" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()  # the store named in params.yaml, not a new one in the cwd


def test_version_uri_and_glob_to_jsonl(model, images, tmp_path, capsys, monkeypatch):
    model_dir, params_file, result = model
    folder, good, _ = images
    monkeypatch.setenv("MLFLOW_TRACKING_URI", yaml.safe_load(params_file.read_text())["classify"]["register"]["tracking_uri"])
    out = tmp_path / "preds.jsonl"
    code, _, _ = _run(capsys, "--model", f"models:/{MODEL_NAME}/{result['version']}", "--images",
                      f"{folder}/*.png", "--out", out)
    assert code == 0
    pngs = sorted(p for p in good if p.parent == folder.resolve() and p.suffix == ".png")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["path"]).resolve() for r in records] == pngs and len(pngs) >= 2
    _assert_same(records, _expected(model_dir, [load_rgb(p) for p in pngs]))


def _write_video(path: Path, n: int = 12) -> list[np.ndarray]:
    """n distinct 64x48 frames, MJPG in .avi; returns the RGB frames as OpenCV reads them back."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    rng = np.random.default_rng(1)
    for i in range(n):
        frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        frame[:, : 5 * i] = (0, 0, 255)  # BGR red band growing with the index
        writer.write(frame)
    writer.release()
    cap, frames = cv2.VideoCapture(str(path)), []
    while (got := cap.read())[0]:
        frames.append(cv2.cvtColor(got[1], cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def test_video_every_frame_and_every_third_frame(model, tmp_path, capsys):
    model_dir, _, _ = model
    video = tmp_path / "clip.avi"
    frames = _write_video(video)
    assert len(frames) == 12
    expected = _expected(model_dir, frames)

    out = tmp_path / "all.csv"
    assert _run(capsys, "--model", model_dir, "--images", video, "--out", out, "--batch-size", 5)[0] == 0
    rows = _read_csv(out)
    assert list(rows[0]) == ["video", "frame", "label", "name", "confidence"]
    assert [int(r["frame"]) for r in rows] == list(range(12)) and {r["video"] for r in rows} == {str(video)}
    _assert_same(rows, expected)

    out3 = tmp_path / "third.json"
    assert _run(capsys, "--model", model_dir, "--images", video, "--out", out3, "--every-nth-frame", 3)[0] == 0
    records = json.loads(out3.read_text())
    assert [r["frame"] for r in records] == [0, 3, 6, 9]
    _assert_same(records, [expected[i] for i in (0, 3, 6, 9)])


def test_without_out_prints_counts_and_writes_nothing(model, images, tmp_path, capsys, monkeypatch):
    model_dir, _, _ = model
    folder, good, _ = images
    monkeypatch.chdir(tmp_path)
    before = sorted(folder.rglob("*"))
    code, stdout, _ = _run(capsys, "--model", model_dir, "--images", folder)
    assert code == 0
    names = [p["name"] for p in _expected(model_dir, [load_rgb(p) for p in good])]
    table = dict(line.split() for line in stdout.splitlines()[1:] if len(line.split()) == 2)
    assert {k: int(v) for k, v in table.items() if k != "total"} == {n: names.count(n) for n in set(names)}
    assert list(tmp_path.iterdir()) == [] and sorted(folder.rglob("*")) == before


@pytest.mark.parametrize("model_arg, needle", [
    ("{tmp}/no-such-model", "no-such-model: model folder not found (train one with `visionflow stage train-<task>`"),
    ("{tmp}", "not a model folder"),
    ("s3://bucket/model", "s3://bucket/model: not a model URI"),
    ("models:/no-such-model@candidate", "models:/no-such-model@candidate: cannot load it"),
    # a registered name without @alias or /version (MLflow: "Logged model with ID ... not found")
    (f"models:/{MODEL_NAME}", f"models:/{MODEL_NAME}: which version? Add an alias or a version number: "
                              f"models:/{MODEL_NAME}@champion (or @candidate) or models:/{MODEL_NAME}/1"),
    ("runs:/0123abcd", "runs:/0123abcd: name the model's path in the run, e.g. runs:/0123abcd/model"),
])
def test_bad_model_exits_2_naming_it(model, images, tmp_path, capsys, model_arg, needle):
    _, params_file, _ = model
    folder, _, _ = images
    code, _, stderr = _run(capsys, "--model", model_arg.format(tmp=tmp_path), "--images", folder,
                           "--params", params_file)
    assert code == 2 and needle in stderr, stderr


def test_models_uri_without_a_store_is_named_and_creates_none(images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the project's sqlite default, which does not exist
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
    code, _, stderr = _run(capsys, "--model", "models:/x@candidate", "--images", images[0])
    assert code == 2 and "no MLflow store at sqlite:///" in stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_exit_2_and_keep_the_previous_output(model, tmp_path, capsys):
    model_dir, _, _ = model
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "preds.csv"
    out.write_text("previous\n")
    code, _, stderr = _run(capsys, "--model", model_dir, "--images", bad, "--out", out)
    assert code == 2 and "no image could be predicted" in stderr and "a.png" in stderr and "b.jpg" in stderr
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["bad", "preds.csv"]

    assert _run(capsys, "--model", model_dir, "--images", tmp_path / "missing")[2].count("missing: no such") == 1
    code, _, stderr = _run(capsys, "--model", model_dir, "--images", f"{tmp_path}/*.webp")
    assert code == 2 and "matches no files" in stderr
    code, _, stderr = _run(capsys, "--model", model_dir, "--images", bad, "--out", tmp_path / "p.xlsx")
    assert code == 2 and "p.xlsx: unknown output format" in stderr
    (tmp_path / "fake.mp4").write_bytes(b"\x00" * 64)
    code, _, stderr = _run(capsys, "--model", model_dir, "--images", tmp_path / "fake.mp4")
    assert code == 2 and "fake.mp4: not a readable video" in stderr


def test_batches_are_bounded_and_the_source_is_read_lazily():
    """Memory stays flat: at most batch_size images are held, and records come out before
    the (here endless) source is exhausted."""
    seen: list[int] = []

    class Recorder:
        def predict(self, batch):
            seen.append(len(batch))
            return [{"label": 0, "name": "a", "confidence": 1.0} for _ in batch]

    frames = (Item({"frame": i}, np.zeros((2, 2, 3), np.uint8)) for i in itertools.count())
    skipped: list = []
    records = list(itertools.islice(predict_items(Recorder(), frames, 4, skipped), 10))
    assert [r["frame"] for r in records] == list(range(10))
    assert seen == [4, 4, 4] and skipped == []


def test_help_stays_light():
    code = ("import sys, visionflow.cli as c\n"
            "try:\n    c.main(['predict', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch','pydantic','mlflow','fiftyone','prefect','albumentations','cv2') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr
    assert "--every-nth-frame" in proc.stdout and "models:/NAME@ALIAS" in proc.stdout


def test_detector_summary_counts_what_it_wrote_and_names_the_threshold(tmp_path):
    """A detector's summary counts detections, not images, and says which threshold left nothing:
    the model's own score_threshold (the file is `[]`), or --min-score (the file has them all)."""
    from test_export import make_model_dir

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    model = make_model_dir(tmp_path / "detector", "detect")  # random init: low scores
    meta = json.loads((model / "meta.json").read_text())

    def predict(score_threshold: float, out: str, *args: str) -> tuple[str, list]:
        meta["params"]["model"]["score_threshold"] = score_threshold
        (model / "meta.json").write_text(json.dumps(meta))
        proc = subprocess.run([sys.executable, "-m", "visionflow.cli", "predict", "--model", str(model),
                               "--images", str(images), "--out", str(tmp_path / out), *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        text = (tmp_path / out).read_text()
        return proc.stdout, json.loads(text) if out.endswith(".json") else text.splitlines()

    stdout, written = predict(0.99, "none.json")  # nothing scores 0.99: the file is []
    assert written == []
    lines = stdout.splitlines()
    assert lines[0].split() == ["class", "detections", "scoring", ">=", "0.5"] and ["total", "0"] in map(str.split, lines)
    assert "predicted 3 images: 0 detections in all" in lines
    assert f"wrote 0 detections (COCO results entries) for 3 images to {tmp_path / 'none.json'}" in lines
    assert lines[-1] == ("nothing counted: the model returned no detection: it keeps only those scoring >= 0.99 "
                         "(its model.score_threshold, from detect.train.model.score_threshold when it was trained). "
                         "Lower that in params.yaml and retrain, or train longer (an undertrained detector scores low)")

    stdout, written = predict(0.0, "all.json", "--min-score", "0.999")  # all kept, none counted
    assert len(written) > 0 and max(d["score"] for d in written) < 0.999
    lines = stdout.splitlines()
    assert f"predicted 3 images: {len(written)} detections in all" in lines
    assert f"wrote {len(written)} detections (COCO results entries) for 3 images to {tmp_path / 'all.json'}" in lines
    assert lines[-1].startswith(f"nothing counted: none of the {len(written)} detections scores >= --min-score "
                                "0.999") and lines[-1].endswith("Lower it, e.g. --min-score 0.1")

    stdout, rows = predict(0.0, "all.jsonl", "--min-score", "0")  # one row per image, every detection counted
    assert len(rows) == 3
    total = sum(len(json.loads(r)["scores"]) for r in rows)
    assert ["total", str(total)] in map(str.split, stdout.splitlines())
    assert f"wrote 3 rows (one per image) for 3 images to {tmp_path / 'all.jsonl'}" in stdout
    assert "nothing counted" not in stdout

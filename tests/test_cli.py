"""The command line as a user meets it: fast help, clear errors with exit code 2."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from project import REPO, make_project  # noqa: E402


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "visionflow.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_help_does_not_import_heavy_libraries():
    code = ("import sys, visionflow.cli as c; c.build_parser().format_help(); "
            "print(sorted(m for m in ('torch','pydantic','mlflow','fiftyone','prefect','albumentations') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    help_text = _cli("--help").stdout
    for command in ("data", "stage", "run", "schedule", "ui", "weights", "dvc-yaml"):
        assert command in help_text


def test_stage_with_missing_input_names_the_file_and_the_stage(tmp_path):
    make_project(tmp_path)
    out = _cli("stage", "train-classify", "--params", str(tmp_path / "params.yaml"))
    assert out.returncode == 2
    assert "manifest.jsonl" in out.stderr and "ingest" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_params_key_is_reported(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["split"]["sed"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = _cli("stage", "split", "--params", str(tmp_path / "params.yaml"))
    assert out.returncode == 2
    assert "split.sed: unknown key" in out.stderr


def test_unknown_stage_is_rejected(tmp_path):
    make_project(tmp_path)  # classify branch only
    for name in ("deploy", "train", "train-detect"):
        out = _cli("stage", name, "--params", str(tmp_path / "params.yaml"))
        assert out.returncode == 2 and f"unknown stage '{name}'" in out.stderr, out.stderr
        assert "train-classify" in out.stderr and "Traceback" not in out.stderr


def test_data_synth_writes_a_coco_dataset(tmp_path):
    out = _cli("data", "synth", "--out", str(tmp_path / "shapes"), "--n", "6", "--size", "48", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "wrote 6 images" in out.stdout
    coco = yaml.safe_load((tmp_path / "shapes" / "annotations.json").read_text())  # JSON is YAML
    assert len(coco["images"]) == 6 and len(coco["categories"]) == 5


def test_stage_help_names_every_stage_of_the_table():
    from visionflow.stages import STAGES

    out = subprocess.run([sys.executable, "-m", "visionflow.cli", "stage", "--help"], capture_output=True, text=True)
    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and all(s.name in text for s in STAGES) and "promote" in text


@pytest.mark.parametrize("args, message", [
    (["data", "synth", "--out", "x", "--n", "-5"], "argument --n: -5 is not a number at least 1"),
    (["data", "synth", "--out", "x", "--size", "4096"], "argument --size: 4096 is not a number from 32 to 2048"),
    (["predict", "--model", "m", "--images", "i", "--batch-size", "0"], "argument --batch-size: 0 is not a number"),
    (["serve", "--model", "m", "--port", "70000"], "argument --port: 70000 is not a TCP port from 1 to 65535"),
    (["data", "synth", "--out", "x", "--n", "ten"], "argument --n: 'ten' is not a whole number"),
])
def test_absurd_numbers_are_refused_before_anything_runs(tmp_path, args, message):
    out = subprocess.run([sys.executable, "-m", "visionflow.cli", *args], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written

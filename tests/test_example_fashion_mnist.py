"""examples/fashion-mnist: its params.yaml is valid, its dvc.yaml is the one the stage table
derives (code deps as ../../src/...), and `dvc repro` runs the example's stages in that folder
of a real git + DVC repository, on 20 images per class of the Debian package, with the recipe
shortened to one epoch. The figures (accuracy, wall time) come from the full run, recorded in
examples/fashion-mnist/README.md; the suite cannot spend 13 minutes on them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from visionflow.core.config import load_params
from visionflow.core.paths import Paths
from visionflow.datasets.fashion_mnist import SOURCE_DIR
from visionflow.integrations.dvc import check_generated, render

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "fashion-mnist"


def test_example_params_and_dvc_yaml_are_current():
    params = load_params(EXAMPLE / "params.yaml")
    assert list(params.tasks) == ["classify"] and not params.renders_synth
    train = params.classify.train
    assert (train.model.arch, train.model.weights, train.cache) == ("small_cnn", None, "ram")
    assert check_generated(params, Paths(EXAMPLE)) == []
    deps = yaml.safe_load((EXAMPLE / "dvc.yaml").read_text())["stages"]["train-classify"]["deps"]
    assert "../../src/visionflow/stages/train.py" in deps and "data/processed/manifest.jsonl" in deps
    assert all((EXAMPLE / d).exists() for d in deps if d.startswith("../../"))
    assert (EXAMPLE / "flows" / "pipeline.py").is_file()  # the link to the repository's flows


@pytest.mark.slow
def test_dvc_repro_in_the_example_folder(tmp_path):
    if not (SOURCE_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{SOURCE_DIR} not installed (apt-get install dataset-fashion-mnist; .ci/run does)")
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    example = repo / "examples" / "fashion-mnist"
    shutil.copytree(EXAMPLE, example, symlinks=True, ignore=shutil.ignore_patterns(
        "data", "models", "reports", "metrics", "plots", "mlflow.db", "mlartifacts", "dvc.lock"))
    params = yaml.safe_load((example / "params.yaml").read_text())
    params["classify"]["train"].update(epochs=1, warmup_epochs=0)
    params["classify"]["inspect"]["dataset_name"] = "fmnist-example-test"
    params["classify"]["review"]["visualization"] = "pca"
    params["classify"]["promote"]["floor"] = 0.0
    (example / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert render(load_params(example / "params.yaml"), Paths(example)) == (example / "dvc.yaml").read_text()

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(*cmd: str, cwd: Path = repo) -> str:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{cmd} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout + out.stderr

    dvc = (sys.executable, "-m", "dvc")
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "config", "core.analytics", "false")
    run(str(Path(sys.executable).parent / "visionflow"), "data", "fashion-mnist", "--out", "data/fashion-mnist",
        "--limit-per-class", "20", cwd=example)
    run("git", "add", "-A")
    run("git", "commit", "-qm", "example")
    first = run(*dvc, "repro", cwd=example)
    for stage in ("ingest", "split", "train-classify", "evaluate-classify", "register-classify",
                  "inspect-classify", "review-classify", "promote-classify"):
        assert f"Running stage '{stage}'" in first, stage
    evaluation = json.loads((example / "metrics/classify/evaluate.json").read_text())
    assert evaluation["task"] == "classify" and 0.0 <= evaluation["accuracy"] <= 1.0
    assert json.loads((example / "reports/classify/review.json").read_text())["samples"]
    assert "Running stage" not in run(*dvc, "repro", cwd=example)  # nothing changed: nothing runs

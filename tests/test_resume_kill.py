"""A train stage killed (SIGKILL) after its first epoch resumes from the checkpoint and ends
with every epoch logged exactly once."""
import csv
import json
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from project import kill_training_after_epoch, make_project  # noqa: E402

from visionflow.core.config import load_params  # noqa: E402
from visionflow.training.engine import LAST  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402

EPOCHS = 4


def test_killed_training_resumes(tmp_path):
    params_file = make_project(tmp_path, {"synth": {"n": 96}, "classify": {"train": {"epochs": EPOCHS, "image_size": 64}},
                                          "split": {"train": 0.7, "val": 0.15, "test": 0.15}})
    params, paths = load_params(params_file), Paths(tmp_path)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)

    cmd = [sys.executable, "-m", "visionflow.cli", "stage", "train-classify", "--params", str(params_file)]
    ckpt = paths.checkpoint_dir / LAST
    killed_at = kill_training_after_epoch(cmd, tmp_path, ckpt)
    assert 1 <= killed_at < EPOCHS, f"kill landed at epoch {killed_at}"
    assert not paths.train_metrics.exists()  # the killed run never finished

    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from {ckpt}" in out.stderr or "resumed from" in out.stderr
    assert json.loads(paths.train_run.read_text())["resumed_from_epoch"] == killed_at
    assert "resumed_from_epoch" not in json.loads(paths.train_metrics.read_text())  # DVC's output: inputs only
    with open(paths.train_history) as fh:
        epochs = [int(r["epoch"]) for r in csv.DictReader(fh)]
    assert epochs == list(range(1, EPOCHS + 1))
    assert not list(paths.checkpoint_dir.glob("*.tmp")) and not list(paths.checkpoint_dir.glob(".*"))

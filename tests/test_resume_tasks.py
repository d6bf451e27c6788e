"""Exact resume for every task through the real train stage: N epochs straight equal N/2
epochs, a crash, a resume and N/2 more (same per-epoch losses and metrics, same weights;
detect and segment with the weights' moving average).

The crash is raised right after the epoch-1 checkpoint is written, in process, so the test
is deterministic; tests/test_resume_kill.py covers a real SIGKILL of the stage."""
import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

import visionflow.training.engine as engine  # noqa: E402
from visionflow.core.config import load_params  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402

EPOCHS = 2


class Crash(Exception):
    pass


# the dense tasks also keep a moving average of their weights (train.ema_decay), which the
# checkpoint carries and the resumed run must continue exactly
EMA = {"classify": None, "detect": 0.9, "segment": 0.9}


def _project(root: Path, task: str):
    over = {"synth": {"n": 32}, task: {"train": {"epochs": EPOCHS, "augment": {"preset": "medium"},
                                                 "ema_decay": EMA[task]}}}
    params_file = make_project(root, over, name=f"resume-{task}", tasks=(task,))
    params, paths = load_params(params_file), Paths(root)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)
    return params, paths.for_task(task)


def _history(paths: Paths) -> list[dict]:
    with open(paths.train_history) as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


@pytest.mark.parametrize("task", ["classify", "detect", "segment"])
def test_half_crash_resume_half_equals_straight(tmp_path, monkeypatch, task):
    params_a, paths_a = _project(tmp_path / "a", task)
    get_stage(f"train-{task}", params_a).run(params_a, paths_a)

    params_b, paths_b = _project(tmp_path / "b", task)
    save = engine._save_checkpoint

    def save_then_crash(ckpt_dir, cfg, model, optimizer, scheduler, scaler, state, ema=None):
        save(ckpt_dir, cfg, model, optimizer, scheduler, scaler, state, ema)
        if state["epoch"] == EPOCHS // 2:
            raise Crash

    monkeypatch.setattr(engine, "_save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        get_stage(f"train-{task}", params_b).run(params_b, paths_b)
    monkeypatch.setattr(engine, "_save_checkpoint", save)
    summary = get_stage(f"train-{task}", params_b).run(params_b, paths_b)

    assert summary["resumed_from_epoch"] == EPOCHS // 2
    assert _history(paths_a) == _history(paths_b)  # every loss and val metric, every epoch
    a = torch.load(paths_a.model_dir / "model.pt", weights_only=True)
    b = torch.load(paths_b.model_dir / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last = torch.load(paths_b.checkpoint_dir / engine.LAST, weights_only=True)
    assert ("ema" in last) == (EMA[task] is not None)

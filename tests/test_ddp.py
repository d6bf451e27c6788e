"""DDP through torchrun: 2 processes with the gloo backend on the CPU train one model.

Rank 0 alone writes the outputs; every rank ends with bitwise-identical weights (checked
by the train stage itself, whose per-rank digests are recorded), and registering the result
makes one MLflow run, not one per process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

from visionflow.core.config import load_params  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402

pytestmark = pytest.mark.slow


def test_torchrun_two_gloo_processes_train_one_model(tmp_path):
    params_file = make_project(tmp_path, {"classify": {"train": {"epochs": 2, "batch_size": 8}}}, name="ddp")
    params, paths = load_params(params_file), Paths(tmp_path)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "visionflow.cli", "stage", "train-classify", "--params", str(params_file)]
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    import os

    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[:6000]

    summary = json.loads(paths.train_metrics.read_text())
    assert summary["world_size"] == 2
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical weights on both ranks
    assert summary["epochs_run"] == 2
    # each rank saw half of the train split per epoch: the history has one row per epoch
    assert len(paths.train_history.read_text().strip().splitlines()) == 1 + 2

    import mlflow

    result = get_stage("evaluate-classify", params).run(params, paths)
    assert result["test_images"] > 0
    reg = get_stage("register-classify", params).run(params, paths)
    client = mlflow.MlflowClient(tracking_uri=reg["tracking_uri"])
    runs = client.search_runs([reg["experiment_id"]])
    assert len(runs) == 1 and runs[0].info.run_id == reg["run_id"]
    assert runs[0].data.params["train.batch_size"] == "8"


def _mean_worker(rank: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    from visionflow.training.distributed import DistInfo, mean_over_ranks, shutdown

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2)
    # rank 0 saw losses averaging 1.0 and 4.0, rank 1 3.0 and 8.0: the epoch's are 2.0 and 6.0
    result = mean_over_ranks({"train_loss": [1.0, 3.0][rank], "train_dice": [4.0, 8.0][rank]}, info)
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    shutdown(info)


def test_train_losses_are_averaged_over_the_ranks(tmp_path):
    """Two real gloo processes: each gets the mean over both ranks, not its own shard's."""
    import torch.multiprocessing as mp

    mp.spawn(_mean_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == {"train_loss": 2.0, "train_dice": 6.0}
    from visionflow.training.distributed import SINGLE, mean_over_ranks

    assert mean_over_ranks({"train_loss": 1.5}, SINGLE) == {"train_loss": 1.5}  # one process: unchanged


def _agree_worker(rank: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    from visionflow.training.distributed import DistInfo, require_same_on_ranks, shutdown

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    info = DistInfo(rank=rank, world_size=2)
    require_same_on_ranks(3, "the epoch to resume from", "share the folder", info)  # agree: no error
    try:  # rank 0 found a checkpoint after epoch 3, rank 1 (another node, its own disk) none
        require_same_on_ranks([3, 0][rank], "the epoch to resume from", "share the folder", info)
        message = ""
    except RuntimeError as exc:
        message = str(exc)
    Path(out_dir, f"agree{rank}.txt").write_text(message)
    shutdown(info)


def test_ranks_that_disagree_on_resume_fail_together(tmp_path):
    """Two real gloo processes: a disagreement raises on every rank (none is left waiting in a
    collective), naming each rank's value and the fix."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert (tmp_path / f"agree{rank}.txt").read_text() == (
            "DDP ranks disagree on the epoch to resume from: rank 0: 3, rank 1: 0; share the folder")


def test_two_ranks_train_a_detector_on_batches_grouped_by_orientation(tmp_path):
    """resize: fit with aspect_grouping on photos of both orientations: each rank's shard of
    batches (training/loader.AspectBatchSampler) holds as many steps as the other's, so DDP's
    collectives pair up and both ranks end with the same weights."""
    import numpy as np
    from PIL import Image

    from visionflow.formats import write_format
    from visionflow.manifest import Category, Instance, Sample

    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(22):  # 15 landscape, 7 portrait: buckets of 4 leave leftovers of both kinds
        h, w = (60, 80) if i % 3 else (80, 48)
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        image[8:30, 8:30] = (230, 30, 30)
        Image.fromarray(image).save(raw / f"p{i}.png")
        samples.append(Sample(id=f"p{i}", root=str(raw), path=f"p{i}.png", width=w, height=h, sha256="",
                              instances=[Instance(bbox=[8, 8, 30, 30], category_id=0)]))
    write_format("coco", samples, [Category(0, "red")], tmp_path / "photos")
    params_file = make_project(tmp_path, {
        "ingest": {"sources": [{"name": "photos", "format": "coco", "images": "photos",
                                "annotations": "photos/annotations.json"}]},
        "split": {"train": 0.8, "val": 0.1, "test": 0.1},
        "detect": {"train": {"resize": "fit", "image_size": 64, "epochs": 1, "batch_size": 4}}},
        name="ddpfit", tasks=("detect",))
    params, paths = load_params(params_file), Paths(tmp_path)
    assert params.detect.train.aspect_grouping is None  # on: fit's default
    for name in ("ingest", "split"):
        get_stage(name, params).run(params, paths)

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "visionflow.cli", "stage", "train-detect", "--params", str(params_file)]
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    import os

    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-6000:]
    assert "grouped by orientation" in out.stderr + out.stdout
    summary = json.loads(paths.for_task("detect").train_metrics.read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 1
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]

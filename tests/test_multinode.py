"""Multi-node DDP: two torchrun launchers ("nodes") on 127.0.0.1 meet through a c10d rendezvous,
one gloo process each, and train a detector and a segmenter as one job.

What a real cluster does, on loopback: `--nnodes 2` with no `--node-rank` (the c10d rendezvous
hands out node and global ranks), a shared project folder standing in for shared storage. Each
rank must end with bitwise-identical weights (the train stage records every rank's digest), and
global rank 0 alone writes the model, checkpoints and metrics."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from project import free_port, make_project  # noqa: E402

from visionflow.core.config import load_params  # noqa: E402
from visionflow.core.files import read_json  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.deploy.predictor import MODEL_FILE  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402
from visionflow.training.distributed import state_digest  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    params_file = make_project(root, {"synth": {"n": 32}}, name="multinode", tasks=("detect", "segment"))
    params, paths = load_params(params_file), Paths(root)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)
    return root, params_file, paths


def _launch_two_nodes(root: Path, params_file: Path, stage: str) -> list[subprocess.CompletedProcess]:
    """Two torchrun launchers, one worker each, on one c10d rendezvous; both wait for the other."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"vf-{stage}",
           "--max-restarts", "0", "-m", "visionflow.cli", "stage", stage, "--params", str(params_file)]
    # gloo picks its network interface from the hostname unless told: loopback only here
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PATH": str(Path(sys.executable).parent) + ":" + os.environ.get("PATH", "/usr/bin:/bin")}
    nodes = [subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    done = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(cmd, node.returncode, out, err))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    return done


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_two_nodes_train_one_model(project, task):
    root, params_file, paths = project
    paths = paths.for_task(task)
    nodes = _launch_two_nodes(root, params_file, f"train-{task}")
    for node in nodes:
        assert node.returncode == 0, node.stderr[-6000:]

    summary = read_json(paths.train_metrics)
    assert summary["world_size"] == 2
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # identical weights on both nodes
    assert summary["epochs_run"] == 1
    # what rank 0 saved is what every rank holds (1 epoch: the best epoch is the last)
    saved = torch.load(paths.model_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    assert state_digest(saved) == digests[0]

    # One node ran global rank 0, which wrote and reported the outputs; the other ran rank 1,
    # which returned before writing anything (the stage prints `rank=1` for it).
    reports = [[line for line in n.stdout.splitlines() if line.startswith(f"[train-{task}]")] for n in nodes]
    assert sorted(len(r) for r in reports) == [1, 1]
    lines = sorted(r[0] for r in reports)
    assert lines[0] == f"[train-{task}] rank=1"
    assert "world_size=2" in lines[1] and f"task={task}" in lines[1]
    assert {"best.pt", "last.pt"} <= {p.name for p in paths.checkpoint_dir.iterdir()}
    assert len(paths.train_history.read_text().strip().splitlines()) == 1 + 1  # header + one epoch, once

"""A tiny visionflow project in a temporary folder: the repo's params.yaml with small sizes,
plus flows/ and dvc.yaml, so tests run the real pipeline in seconds."""
from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "synth": {"n": 48, "size": 64, "seed": 0},
    "classify": {"train": {"model": {"arch": "resnet18", "weights": None, "mode": "full", "trainable_blocks": 2},
                           "image_size": 64, "epochs": 1, "batch_size": 16, "warmup_epochs": 0},
                 "evaluate": {"batch_size": 32}},
    # Small, randomly initialised dense models: seconds per epoch on one core.
    "detect": {"train": {"model": {"arch": "fasterrcnn", "backbone": "mobilenet_v2", "backbone_weights": None,
                                   "width": 0.25},
                         "image_size": 64, "epochs": 1, "batch_size": 8, "warmup_epochs": 0},
               "evaluate": {"batch_size": 16, "grid_images": 4}},
    "segment": {"train": {"model": {"arch": "unet", "backbone": None, "backbone_weights": None, "width": 0.25},
                          "image_size": 64, "epochs": 1, "batch_size": 8, "warmup_epochs": 0},
                "evaluate": {"batch_size": 16, "grid_images": 4}},
    "multilabel": {"train": {"model": {"arch": "resnet18", "weights": None, "mode": "full"},
                             "image_size": 64, "epochs": 1, "batch_size": 16, "warmup_epochs": 0},
                   "evaluate": {"batch_size": 32},
                   # a 1-epoch model from random init: the gate still runs (with its ONNX parity)
                   "promote": {"floor": 0.0}},
}
TASKS = ("classify", "detect", "segment", "multilabel")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def make_project(root: Path, overrides: dict | None = None, name: str = "tiny",
                 tasks: tuple[str, ...] = ("classify",)) -> Path:
    """Write params.yaml (TINY merged with `overrides`, with the branches `tasks` only) and
    copy flows/ into `root`."""
    root.mkdir(parents=True, exist_ok=True)
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    for task in TASKS:
        if task not in tasks:
            del params[task]
            continue
        branch = params[task]
        branch["register"] = {**branch["register"], "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                              "model_name": f"{name}-classifier" if task == "classify" else f"{name}-{task}"}
        branch["inspect"] = {**branch["inspect"],
                             "dataset_name": f"{name}-test" if task == "classify" else f"{name}-{task}-test"}
    params = _merge(params, overrides or {})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(REPO / "flows", root / "flows", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return root / "params.yaml"


def checkpoint_epoch(path: Path) -> int:
    """The last epoch a training checkpoint records; 0 while there is none (or it is mid-write)."""
    import torch

    try:
        return int(torch.load(path, weights_only=True)["state"]["epoch"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


def kill_training_after_epoch(cmd: list[str], cwd: Path, checkpoint: Path, epoch: int = 1,
                              timeout: float = 300) -> int:
    """Run a training command and SIGKILL it as soon as `checkpoint` records `epoch`; the epoch
    the checkpoint holds after the kill (what a resume starts from)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while checkpoint_epoch(checkpoint) < epoch and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return checkpoint_epoch(checkpoint)


def write_model_folder(root: Path, task_name: str, params, drop: tuple[str, ...] = ()) -> Path:
    """A model folder as the train stage writes it (model.pt, meta.json with `params`), the
    weights a seeded random init of the task's model with 2 classes; `drop` leaves those params
    out of meta.json, as visionflow wrote it before they existed."""
    import json

    import torch

    from visionflow.deploy.predictor import META_FILE, MODEL_FILE
    from visionflow.tasks import get_task

    torch.manual_seed(0)  # the same weights in every run
    model = get_task(task_name).build_model(params, 2, pretrained=False)
    root.mkdir(parents=True)
    torch.save(model.state_dict(), root / MODEL_FILE)
    dumped = {k: v for k, v in params.model_dump(mode="json").items() if k not in drop}
    (root / META_FILE).write_text(json.dumps({"task": task_name, "arch": params.model.arch, "num_classes": 2,
                                              "classes": ["a", "b"], "image_size": params.image_size,
                                              "params": dumped}))
    return root

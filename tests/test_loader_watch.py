"""Is the loader keeping up? The engine measures each epoch's share of its training pass spent
waiting for the next batch (`data_wait`) and its images per second; the train stage records both
per epoch (run.json, MLflow) and warns once when the model starves, naming what to change."""
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

from visionflow.core.config import TrainParams, load_params  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.integrations.mlflow import _history_metrics  # noqa: E402
from visionflow.stages import get_stage  # noqa: E402
from visionflow.stages.train import RUN_FACTS, LoaderWatch  # noqa: E402
from visionflow.tasks.classify import ClassifyTask  # noqa: E402
from visionflow.training import loader as loader_module  # noqa: E402
from visionflow.training.engine import FitConfig, fit  # noqa: E402
from visionflow.training.loader import STARVED, loader_advice  # noqa: E402

GIB = 1 << 30


class _Images(Dataset):
    """16 random 16x16 images; each item takes `delay` seconds (a slow decode)."""

    def __init__(self, delay: float = 0.0):
        g = torch.Generator().manual_seed(0)
        self.x, self.y, self.delay = torch.randn(16, 3, 16, 16, generator=g), torch.arange(16) % 2, delay

    def __len__(self):
        return 16

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.x[i], int(self.y[i])


class _SlowNet(nn.Module):
    """A tiny classifier whose forward pass takes `delay` seconds (a busy accelerator)."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        time.sleep(self.delay)
        return self.net(x)


def _history(tmp_path: Path, item_delay: float, step_delay: float) -> list[dict]:
    task = ClassifyTask()
    loader = DataLoader(_Images(item_delay), batch_size=4, collate_fn=task.collate)
    cfg = FitConfig(epochs=2, lr=0.01, fingerprint="fp", resume=False)
    result = fit(task, _SlowNet(step_delay), loader, None, cfg, tmp_path, torch.device("cpu"), lambda seed: None)
    return result.history


def test_a_slow_loader_shows_as_waiting_and_a_slow_step_does_not(tmp_path):
    # the same 16 images a pass: 50 ms an image to load against a 1 ms step, and the reverse
    # (sleeps only lengthen under load, so each side's margin holds on a busy machine; at 25 ms
    # an image, a step slowed down by a parallel test once took 40% of an epoch)
    starved = _history(tmp_path / "starved", item_delay=0.05, step_delay=0.0)
    fed = _history(tmp_path / "fed", item_delay=0.0, step_delay=0.1)
    for row in starved:
        assert row["data_wait"] > 0.7, row
        assert 0 < row["images_per_s"] < 16 / (16 * 0.05), row  # no faster than the loader's sleeps allow
    for row in fed:
        assert row["data_wait"] < 0.3, row
        assert 0 < row["images_per_s"] < 4 / 0.1, row  # no faster than one 4-image batch a step's sleep


def test_advice_names_what_is_off_and_what_fits():
    tips = loader_advice(workers=0, cores=16, cache="none", cache_bytes=2 * GIB, available=64 * GIB,
                         decode_reducible=True)
    assert tips[0].startswith("num_workers: 8 (now 0; this process has 16 cores")
    assert tips[1].startswith("cache: ram (each image decoded once: about 2.00 GiB of the 64.00 GiB available")
    assert tips[2].startswith("decode: reduced")
    # the split would not fit in memory: the disk cache; workers already at the cores' share
    tips = loader_advice(workers=3, cores=4, cache="none", cache_bytes=60 * GIB, available=64 * GIB,
                         decode_reducible=False)
    assert tips == ["cache: disk (ram would need about 60.00 GiB, 64.00 GiB is available)"]
    # everything on: what is left
    tips = loader_advice(workers=8, cores=32, cache="ram", cache_bytes=0, available=64 * GIB, decode_reducible=False)
    assert len(tips) == 1 and tips[0].startswith("every loader option is on already")
    # one core: no workers to add (the main process trains)
    assert not any(t.startswith("num_workers") for t in loader_advice(0, 1, "ram", 0, GIB, False))
    # a small dataset's cache in MiB, not "0.00 GiB"
    tips = loader_advice(workers=1, cores=2, cache="none", cache_bytes=4.6 * 2**20, available=22 * GIB,
                         decode_reducible=False)
    assert tips == ["cache: ram (each image decoded once: about 4.6 MiB of the 22.00 GiB available)"]


class _Records:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def estimate_bytes(self) -> int:
        return self.nbytes


def test_the_watch_warns_once_after_the_first_epoch_and_only_when_starved(caplog, monkeypatch):
    monkeypatch.setattr("visionflow.training.loader.available_cores", lambda: 8)
    monkeypatch.setattr("visionflow.stages.train.available_memory", lambda: 32 * GIB)
    params = TrainParams(num_workers=0, cache="none", decode="full")
    watch = LoaderWatch("classify", params, ClassifyTask(params), _Records(GIB), DataLoader(_Images()))
    with caplog.at_level(logging.WARNING, logger="visionflow.stages.train"):
        watch({"epoch": 1, "data_wait": 0.9, "images_per_s": 10.0})  # workers starting, cache filling: not judged
        watch({"epoch": 2, "data_wait": STARVED - 0.01, "images_per_s": 10.0})
        assert not caplog.records
        watch({"epoch": 3, "data_wait": 0.62, "images_per_s": 41.0})
        watch({"epoch": 4, "data_wait": 0.9, "images_per_s": 10.0})
    assert len(caplog.records) == 1, [r.getMessage() for r in caplog.records]
    message = caplog.records[0].getMessage()
    assert message.startswith("classify.train: epoch 3 spent 62% of its training pass waiting for data (41 images/s)")
    for tip in ("num_workers: 7 (now 0", "cache: ram (each image decoded once: about 1.00 GiB of the 32.00 GiB",
                "decode: reduced"):
        assert tip in message, message
    assert "training-loader.md" in message


def test_the_train_stage_records_the_wait_and_warns_when_decoding_starves_it(tmp_path, caplog, monkeypatch):
    params_file = make_project(tmp_path, {"classify": {"train": {"epochs": 2, "image_size": 32, "batch_size": 8,
                                                                 "decode": "full"}}})
    params, paths = load_params(params_file), Paths(tmp_path)
    for name in ("synth", "ingest", "split"):
        get_stage(name, params).run(params, paths)
    read = loader_module.LoaderDataset.read

    def slow_read(self, path):  # a decode of 0.1 s an image: far slower than a 32 px step
        time.sleep(0.1)
        return read(self, path)

    monkeypatch.setattr(loader_module.LoaderDataset, "read", slow_read)
    with caplog.at_level(logging.WARNING, logger="visionflow.stages.train"):
        get_stage("train-classify", params).run(params, paths)
    epochs = json.loads(paths.train_run.read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e in epochs:
        assert e["data_wait"] > STARVED and e["images_per_s"] > 0, e
    warnings = [r.getMessage() for r in caplog.records if "waiting for data" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("classify.train: epoch 2 spent"), warnings
    assert "cache: ram" in warnings[0] and "decode: reduced" in warnings[0]
    # run facts, not DVC outputs: kept out of the tracked history, logged to MLflow per epoch
    header = paths.train_history.read_text().splitlines()[0].split(",")
    assert not set(RUN_FACTS) & set(header), header
    logged = {(m.key, m.step) for m in _history_metrics(paths.train_history, paths.train_run, 0)}
    assert {("data_wait", 1), ("data_wait", 2), ("images_per_s", 1), ("images_per_s", 2)} <= logged


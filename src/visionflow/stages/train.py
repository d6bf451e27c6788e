"""Train stage: the task's model on the train split, early-stopped on the val split."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import albumentations as A
import torch
from torch.utils.data import DataLoader

from visionflow.augment import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform
from visionflow.config import TrainParams
from visionflow.engine import FitConfig, fit, select_device, seed_everything, write_history_csv
from visionflow.io import write_dir, write_json
from visionflow.manifest import read_categories, read_manifest, read_split
from visionflow.paths import Paths
from visionflow.tasks import AUGMENT_FILE, META_FILE, MODEL_FILE, get_task

log = logging.getLogger(__name__)


def _fingerprint(params: TrainParams, paths: Paths) -> str:
    h = hashlib.sha256(params.model_dump_json().encode())
    for f in (paths.manifest, paths.categories, paths.split_file):
        h.update(f.read_bytes())
    return h.hexdigest()


def train(params: TrainParams, paths: Paths) -> dict[str, Any]:
    samples = {s.id: s for s in read_manifest(paths.manifest)}
    categories = read_categories(paths.categories)
    split = read_split(paths.split_file)
    class_names = [c.name for c in categories]
    task = get_task(params.task)
    seed_everything(params.seed)

    train_tf = build_train_transform(params.augment.preset, params.augment.transforms, params.image_size)
    eval_tf = build_eval_transform(params.image_size)
    train_ds = task.build_dataset([samples[i] for i in split["train"]], train_tf, paths.root)
    val_ds = task.build_dataset([samples[i] for i in split["val"]], eval_tf, paths.root)
    if not len(train_ds):
        raise ValueError(f"{paths.split_file}: the train split is empty")

    loader_gen = torch.Generator()
    train_loader = DataLoader(train_ds, batch_size=params.batch_size, shuffle=True, collate_fn=task.collate,
                              num_workers=params.num_workers, generator=loader_gen, drop_last=len(train_ds) > params.batch_size)
    val_loader = DataLoader(val_ds, batch_size=params.batch_size, collate_fn=task.collate, num_workers=params.num_workers)

    def reseed(seed: int) -> None:
        loader_gen.manual_seed(seed)
        train_tf.set_random_seed(seed)

    device = select_device(params.device)
    model = task.build_model(params, len(class_names))
    es = params.early_stopping
    cfg = FitConfig(
        epochs=params.epochs, lr=params.lr, weight_decay=params.weight_decay, warmup_epochs=params.warmup_epochs,
        amp=params.amp, seed=params.seed, resume=params.resume, fingerprint=_fingerprint(params, paths),
        early_metric=es.metric if es else None, early_mode=es.mode if es else "max",
        patience=es.patience if es else 0, min_delta=es.min_delta if es else 0.0,
    )
    log.info("training %s (%s) on %s: %d train / %d val images, %d classes",
             params.model.arch, params.task, device, len(train_ds), len(val_ds), len(class_names))
    result = fit(task, model, train_loader, val_loader, cfg, paths.checkpoint_dir, device, reseed)

    meta = {
        "task": params.task, "arch": params.model.arch, "num_classes": len(class_names), "classes": class_names,
        "image_size": params.image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "params": params.model_dump(mode="json"),
    }
    _write_model_dir(paths.model_dir, result.best_state, meta, A.to_dict(train_tf))
    write_history_csv(paths.train_history, result.history)
    summary = {
        "best_epoch": result.best_epoch, "epochs_run": len(result.history), "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from, "device": result.device,
        "best": {k: v for k, v in result.best.items() if k != "epoch"},
        "train_images": len(train_ds), "val_images": len(val_ds),
    }
    write_json(paths.train_metrics, summary)
    return summary


def _write_model_dir(model_dir: Path, state: dict, meta: dict, augment: dict) -> None:
    def fill(tmp: Path) -> None:
        torch.save(state, tmp / MODEL_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / AUGMENT_FILE).write_text(json.dumps(augment, indent=2) + "\n")

    write_dir(model_dir, fill)

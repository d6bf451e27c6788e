"""Train stage: the branch task's model on the train split, early-stopped on the val split."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

# OpenMP threads sleep at barriers instead of spinning (unless the user chose a policy): spinning
# threads burn the cores another process needs, and wait for descheduled peers when it runs.
# libgomp reads this once, when torch loads it, so it must come first; the CLI sets it too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import albumentations as A  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from visionflow.training.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from visionflow.core.config import TrainParams  # noqa: E402
from visionflow.core.errors import DataError  # noqa: E402
from visionflow.training.distributed import gather_digests, init_from_env, shutdown  # noqa: E402
from visionflow.training.loader import (STARVED, AspectBatchSampler, DeviceBatches, SeededSampler,  # noqa: E402
                                        WorkerInit, available_memory, loader_advice, local_world_size,
                                        orientation_batches, orientations, process_cores, resolve_num_workers,
                                        set_main_threads)
from visionflow.training import memory  # noqa: E402
from visionflow.training.batch_slots import (SlotCollate, in_flight, shm_shortfall, shm_space,  # noqa: E402
                                             slots_for, tensor_bytes)
from visionflow.training.engine import (FitConfig, fit, select_device, seed_everything, use_channels_last,  # noqa: E402
                                         write_history_csv)
from visionflow.core.files import write_dir, write_json  # noqa: E402
from visionflow.manifest import objects_per_image, read_categories, read_manifest, read_split  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.tasks import get_task  # noqa: E402
from visionflow.deploy.predictor import AUGMENT_FILE, META_FILE, MODEL_FILE  # noqa: E402

log = logging.getLogger(__name__)


# Params that change how fast the data arrives, never what it is: a checkpoint resumes across them.
LOADER_ONLY = {"num_workers", "cache"}


def _fingerprint(params: TrainParams, paths: Paths, world_size: int) -> str:
    h = hashlib.sha256(f"{paths.task}/{world_size}/".encode() + params.model_dump_json(exclude=LOADER_ONLY).encode())
    for f in (paths.manifest, paths.categories, paths.split_file):
        h.update(f.read_bytes())
    return h.hexdigest()


def train(params: TrainParams, paths: Paths) -> dict[str, Any]:
    """Train the branch's task (paths.task) on the train split, early-stopped on val.

    Under torchrun (WORLD_SIZE > 1) each process trains on its shard; rank 0 writes the outputs."""
    samples = {s.id: s for s in read_manifest(paths.manifest)}
    categories = read_categories(paths.categories)
    split = read_split(paths.split_file)
    class_names = [c.name for c in categories]
    task = get_task(paths.task, params)
    device = select_device(params.device)
    dist_info = init_from_env(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    seed_everything(params.seed)

    train_tf, eval_tf = task.build_transforms(params)
    train_ds = task.build_dataset([samples[i] for i in split["train"]], train_tf, paths.root)
    val_ds = task.build_dataset([samples[i] for i in split["val"]], eval_tf, paths.root)
    if not len(train_ds):
        raise DataError(paths.split_file, "the train split is empty: nothing to train on",
                        hint="raise split.train or add images, then run split again")

    model = task.build_model(params, len(class_names))
    trained = model  # what fit trains and checkpoints: the whole model, or the head on cached features
    if params.feature_cache:
        from visionflow.models.classifiers import feature_head
        from visionflow.training.feature_cache import feature_loaders

        set_main_threads()
        trained = feature_head(model, params.model.arch)
        train_eval_ds = task.build_dataset([samples[i] for i in split["train"]], eval_tf, paths.root)
        train_loader, val_loader, sampler = feature_loaders(task, model, trained, params, train_eval_ds, val_ds,
                                                            device, dist_info)
    else:
        train_loader, val_loader, sampler = build_loaders(task, params, paths, train_ds, val_ds, device, dist_info)

    def reseed(seed: int) -> None:
        # Shuffle and per-sample augmentation seeds come from (seed, epoch, rank, index) in the
        # main process (SeededSampler): the same with any number of (persistent) workers.
        sampler.set_epoch(seed)

    es = params.early_stopping
    cfg = FitConfig(
        epochs=params.epochs, lr=params.lr, weight_decay=params.weight_decay,
        norm_weight_decay=params.norm_weight_decay, bias_weight_decay=params.bias_weight_decay,
        ema_decay=params.ema_decay,
        warmup_epochs=params.warmup_epochs,
        optimizer=params.optimizer, momentum=params.momentum, schedule=params.schedule,
        step_epochs=params.step_epochs, gamma=params.gamma, grad_clip=params.grad_clip,
        amp=params.amp, channels_last=params.channels_last, seed=params.seed, resume=params.resume,
        fingerprint=_fingerprint(params, paths, dist_info.world_size),
        early_metric=(es.metric or task.primary_metric) if es else None, early_mode=es.mode if es else "max",
        patience=es.patience if es else 0, min_delta=es.min_delta if es else 0.0,
    )
    if es and es.metric and es.metric not in _known_metrics(task):
        log.warning("%s.train.early_stopping.metric %r is not a metric the %s task reports (%s); "
                    "early stopping falls back to train_loss", paths.task, es.metric, paths.task,
                    ", ".join(_known_metrics(task)))
    if dist_info.is_main:
        log.info("training %s (%s) on %s x%d: %d train / %d val images, %d classes", params.model.arch, paths.task,
                 device, dist_info.world_size, len(train_ds), len(val_ds), len(class_names))
    watch = LoaderWatch(paths.task, params, task, train_ds, train_loader) if not params.feature_cache else None
    result = fit(task, trained, train_loader, val_loader, cfg, paths.checkpoint_dir, device, reseed, on_epoch=watch,
                 dist_info=dist_info)
    digests = gather_digests(model.state_dict(), dist_info)
    if not dist_info.is_main:
        shutdown(dist_info)
        return {"rank": dist_info.rank}
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks ended with different weights: {digests}")

    meta = {
        "task": paths.task, "arch": params.model.arch, "num_classes": len(class_names), "classes": class_names,
        "image_size": params.image_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "params": params.model_dump(mode="json"),
    }
    trained.load_state_dict(result.best_state)  # what is saved is what the task calibrates on
    val_batches = DeviceBatches(val_loader, device, use_channels_last(params.channels_last, device))
    meta.update(task.calibrate(trained.to(device).eval(), val_batches if len(val_ds) else None, device))
    # the whole network (with the cache, the head trained on features sits in it)
    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    _write_model_dir(paths.model_dir, best_state, meta, A.to_dict(train_tf))
    # DVC-tracked outputs are a function of code, params and data: the wall times and how this
    # run got there (resumed or not) go to an untracked side file that the register stage logs.
    write_history_csv(paths.train_history, [{k: v for k, v in row.items() if k not in RUN_FACTS} for row in result.history])
    summary = {
        "task": paths.task, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "stopped_early": result.stopped_early, "device": result.device,
        "best": {k: v for k, v in result.best.items() if k != "epoch" and k not in RUN_FACTS},
        "train_images": len(train_ds), "val_images": len(val_ds),
        "world_size": dist_info.world_size, "rank_weight_digests": digests,
    }
    write_json(paths.train_metrics, summary)
    run = {"resumed_from_epoch": result.resumed_from,
           "epochs": [{"epoch": row["epoch"], **{k: row[k] for k in RUN_FACTS if k in row}} for row in result.history]}
    write_json(paths.train_run, run)
    shutdown(dist_info)
    return {**summary, "resumed_from_epoch": result.resumed_from}


def _example_bytes(task, ds) -> int:
    """Bytes of one example as a worker hands it over: a batch of the first one (one decode), its
    instance masks (Mask R-CNN: one (H, W) uint8 plane an object) counted at the split's mean
    objects an image instead of its own."""
    images, targets = task.collate([ds[(0, 0)]])
    one = tensor_bytes(images) + tensor_bytes(targets)
    if task.carries_masks:  # the first example's masks swapped for the split's mean count (task.target_bytes)
        first = sum(int(t["masks"].shape[0]) for t in targets if "masks" in t)
        pixels = images.shape[-2] * images.shape[-1]
        one += round(task.target_bytes(pixels, objects_per_image(ds.samples)) - task.target_bytes(pixels, first))
    return one


def build_loaders(task, params: TrainParams, paths: Paths, train_ds, val_ds, device: torch.device, dist_info,
                  normalize_on_device: Optional[bool] = None):
    """The train and val loaders (docs/training-loader.md): seeded sampler, workers sized to the
    machine, pinned memory on CUDA, persistent workers, the decoded-image cache. On CUDA (or with
    normalize_on_device=True) the train and val batches stay uint8 and are normalised on the
    device (DeviceBatches, which the engine iterates them through)."""
    threads = set_main_threads()
    tuned = memory.tune_allocator()  # the items' and batches' pages reused, not faulted in afresh
    train_workers = resolve_num_workers(params.num_workers, len(train_ds), params.batch_size)
    val_workers = resolve_num_workers(params.num_workers, len(val_ds), params.batch_size)
    if params.cache != "none":
        where = paths.checkpoint_dir.parent / "decoded"  # shared by the task branches: keyed by image sha256
        for ds, name in ((train_ds, "train"), (val_ds, "val")):
            ds.use_cache(params.cache, where, threads=threads, what=f"{paths.task}.train.cache ({name} split)")
    cuda = device.type == "cuda"
    # On the CPU the training process would do the float conversion itself (7-8 ms a 640 px image
    # on one core, against 1 ms for the workers' LUT), so the loader keeps normalising there.
    if normalize_on_device is None:
        normalize_on_device = cuda
    deferred = train_ds.defer_normalization() if normalize_on_device else None
    if normalize_on_device:  # validation too: the engine hands its batches over through DeviceBatches
        val_ds.defer_normalization()

    prefetch = 4 if cuda else 2

    def options(workers: int) -> dict[str, Any]:
        # A generator of its own: the loader draws its workers' base seed from it, never from
        # torch's global generator (which the detectors' sampling uses), once per epoch with 0
        # workers and once per run with persistent ones.
        common = {"num_workers": workers, "pin_memory": cuda, "generator": torch.Generator()}
        if not workers:
            return {**common, "collate_fn": task.collate}
        # the workers' batches reach this process through shared memory they reuse (batch_slots.py)
        slots = slots_for(workers, prefetch, pin=cuda)
        return {**common, "persistent_workers": True, "prefetch_factor": prefetch,
                "collate_fn": SlotCollate(task.collate) if slots is not None else task.collate,
                "worker_init_fn": WorkerInit(params.seed, dist_info.rank, slots)}

    grouped = params.resize == "fit" and params.aspect_grouping is not False
    if grouped:  # batches of one orientation, padded to their own shape (AspectBatchSampler)
        sampler: Any = AspectBatchSampler(orientations(train_ds.samples), params.batch_size, params.seed,
                                          dist_info.rank, dist_info.world_size)
        train_loader = DataLoader(train_ds, batch_sampler=sampler, **options(train_workers))
        val_loader = DataLoader(val_ds, batch_sampler=orientation_batches(orientations(val_ds.samples),
                                                                          params.batch_size),
                                **options(val_workers))
    else:
        sampler = SeededSampler(len(train_ds), params.seed, dist_info.rank, dist_info.world_size, drop_last=True)
        drop_last = len(train_ds) > params.batch_size * dist_info.world_size
        train_loader = DataLoader(train_ds, batch_size=params.batch_size, sampler=sampler, drop_last=drop_last,
                                  **options(train_workers))
        val_loader = DataLoader(val_ds, batch_size=params.batch_size, **options(val_workers))
    if dist_info.is_main and (train_workers or val_workers):
        need = sum(in_flight(w, prefetch, params.batch_size * _example_bytes(task, ds), local_world_size())
                   for w, ds in ((train_workers, train_ds), (val_workers, val_ds)) if w and len(ds))
        shortfall = shm_shortfall(need, shm_space())
        if shortfall:
            log.warning("loader: %s", shortfall)
    if dist_info.is_main:
        slotted = isinstance(train_loader.collate_fn, SlotCollate) or isinstance(val_loader.collate_fn, SlotCollate)
        log.info("loader: %d train / %d val workers, %d threads, cache %s, pin_memory %s, batches %s%s%s%s%s",
                 train_workers, val_workers, threads, params.cache, cuda,
                 "uint8 (normalised on the device)" if deferred is not None else "float32",
                 ", grouped by orientation" if grouped else "", ", allocator tuned" if tuned else "",
                 ", workers' batches in reused shared memory" if slotted else "",
                 ", JPEGs decoded reduced where at least image_size" if getattr(train_ds, "fit", None) else "")
    return train_loader, val_loader, sampler


# per-epoch facts of one run, not of its inputs: kept out of DVC's outputs (run.json, logged to MLflow)
RUN_FACTS = ("seconds", "data_wait", "images_per_s")


class LoaderWatch:
    """fit's on_epoch: warns once per run when an epoch's training pass waited for its data
    (`data_wait`, engine.train_one_epoch) STARVED of its time or more, naming the loader settings
    that would feed it (loader_advice). Epoch 1 is not judged: it starts the workers and fills the
    cache."""

    def __init__(self, branch: str, params: TrainParams, task, train_ds, train_loader):
        self.branch, self.params, self.task = branch, params, task
        self.train_ds, self.workers = train_ds, int(getattr(train_loader, "num_workers", 0))
        self.warned = False

    def __call__(self, row: dict[str, float]) -> None:
        if self.warned or row["epoch"] < 2 or row.get("data_wait", 0.0) < STARVED:
            return
        self.warned = True
        tips = loader_advice(self.workers, process_cores(), self.params.cache,
                             self.train_ds.estimate_bytes() if self.params.cache == "none" else 0, available_memory(),
                             self.task.reduces_decode and self.params.decode == "full")
        log.warning("%s.train: epoch %d spent %.0f%% of its training pass waiting for data (%.0f images/s): the "
                    "loader cannot keep up. Try %s (docs/training-loader.md, \"Is the loader keeping up?\")",
                    self.branch, row["epoch"], 100 * row["data_wait"], row.get("images_per_s", 0.0),
                    "; ".join(tips))


def _known_metrics(task) -> tuple[str, ...]:
    return ("train_loss", "val_loss", task.primary_metric, *getattr(task, "extra_metrics", ()))


def _write_model_dir(model_dir: Path, state: dict, meta: dict, augment: dict) -> None:
    def fill(tmp: Path) -> None:
        torch.save(state, tmp / MODEL_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / AUGMENT_FILE).write_text(json.dumps(augment, indent=2) + "\n")

    write_dir(model_dir, fill)

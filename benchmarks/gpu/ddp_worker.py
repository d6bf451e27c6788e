"""One rank of gpu_bench.py's DDP figure, started by `torchrun --standalone --nproc-per-node N`.

Trains a randomly initialised classifier with visionflow.training.engine.fit on a manifest of JPEGs,
with the train stage's data path: the classify task's dataset, training transform and collate
through the train stage's own `build_loaders` (its seeded sampler sharded by rank, `--workers`
persistent workers, pinned memory and uint8 batches normalised on the GPU on CUDA). Rank 0 writes
the per-epoch images/s (the epoch's images over all ranks / the epoch's training seconds) and the
engine's `data_wait` (the share of the training pass rank 0 waited for its next batch) to `--out`.

The process group is NCCL on CUDA and gloo on the CPU. visionflow.training.distributed.init_from_env
treats WORLD_SIZE 1 as a plain single process (no process group, no DDP wrapper), so with one
process this script joins the group itself and wraps the model in DistributedDataParallel
before fit (which then sees a single rank and does not wrap it again): the run still goes
through torchrun's rendezvous, the backend and DDP's gradient all-reduce. With N > 1 it uses
init_from_env and fit's own wrapper, as the train stage does.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from visionflow.core.config import ModelParams, TrainParams
from visionflow.core.paths import Paths
from visionflow.stages.train import build_loaders
from visionflow.training.distributed import DistInfo, init_from_env, shutdown
from visionflow.training.engine import FitConfig, fit, select_device
from visionflow.manifest import image_label, read_manifest
from visionflow.tasks import get_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256, help="per process")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="   %(message)s", stream=sys.stdout)

    device = select_device(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        info = init_from_env(device.type)  # visionflow's own path (NCCL on CUDA, gloo on the CPU)
    else:
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    backend = dist.get_backend()

    params = TrainParams(model=ModelParams(arch=args.arch), image_size=args.size, batch_size=args.batch,
                         num_workers=args.workers, epochs=args.epochs, early_stopping=None, resume=False)
    task = get_task("classify", params)
    samples = read_manifest(args.manifest)
    num_classes = max(image_label(s) for s in samples) + 1
    train_tf, eval_tf = task.build_transforms(params)
    dataset = task.build_dataset(samples, train_tf, Path(args.root))
    no_val = task.build_dataset([], eval_tf, Path(args.root))
    # the train stage's loaders: on CUDA uint8 batches, normalised on the GPU by fit (DeviceBatches)
    loader, _, sampler = build_loaders(task, params, Paths(Path(args.root)), dataset, no_val, device, info)
    reseed = sampler.set_epoch  # as the train stage does: shuffle and augmentation seeds from (seed, epoch)

    model = task.build_model(params, num_classes)
    net = model
    if not info.enabled:  # one process: wrap it here (see the module docstring)
        model.to(device)
        if params.channels_last and device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    cfg = FitConfig(epochs=params.epochs, lr=params.lr, amp=params.amp, channels_last=params.channels_last,
                    seed=params.seed, resume=False)
    with tempfile.TemporaryDirectory(prefix=f"ddp-bench-rank{info.rank}-") as ckpt:
        result = fit(task, net, loader, None, cfg, Path(ckpt), device, reseed, dist_info=info)

    images = len(loader) * params.batch_size * info.world_size  # per epoch, all ranks
    epochs = [{"epoch": int(r["epoch"]), "seconds": r["seconds"], "images": images,
               "images_per_s": round(images / r["seconds"], 2), "train_loss": round(r["train_loss"], 4),
               "data_wait": r["data_wait"]} for r in result.history]
    later = epochs[1:] or epochs
    if info.is_main:
        Path(args.out).write_text(json.dumps({
            "completed": True, "world_size": dist.get_world_size(), "fit_world_size": result.world_size,
            "backend": str(backend), "device": str(device), "arch": args.arch, "image_size": args.size,
            "batch_per_process": args.batch, "loader_workers": args.workers, "epochs": epochs,
            "first_epoch_images_per_s": epochs[0]["images_per_s"],
            "images_per_s": round(sum(e["images"] for e in later) / sum(e["seconds"] for e in later), 2),
            "data_wait": round(sum(e["data_wait"] * e["seconds"] for e in later) / sum(e["seconds"] for e in later), 4),
        }, indent=2) + "\n")
    if info.enabled:
        shutdown(info)
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One training engine for every task (see visionflow.tasks.base for the contract).

Device selection, AMP and channels_last (CUDA; on the CPU too with `always`), AdamW or SGD, warmup then cosine or step LR
(per step), gradient clipping, an exponential moving average of the weights (`ema_decay`: then the
average is what validation scores and the stage saves), per-epoch atomic checkpoints, exact
resume, early stopping, progress bars, and DDP under torchrun (see visionflow.training.distributed). Each epoch's row
also says whether the data kept up: `data_wait`, the share of the training pass spent waiting
for the next batch, and `images_per_s` (docs/training-loader.md, "Is the loader keeping up?").

Exact resume: every epoch reseeds torch, numpy, python and, through `reseed`, the loader's
shuffling and per-sample augmentation seeds from (seed, epoch) (visionflow.training.loader: the
same with any number of workers), so epoch e does the same work whether the run started at
epoch 0 or resumed at e; the checkpoint holds model, optimizer, scheduler, AMP
scaler, the weights' moving average, early-stopping state and history.
"""
from __future__ import annotations

import copy
import csv
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from visionflow.training.distributed import (SINGLE, DistInfo, barrier, broadcast, mean_over_ranks,
                                            require_same_on_ranks, sync_buffers)
from visionflow.core.files import write_with
from visionflow.training.loader import DeviceBatches

log = logging.getLogger(__name__)

LAST, BEST = "last.pt", "best.pt"


def select_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class FitConfig:
    epochs: int
    lr: float
    weight_decay: float = 1e-4
    norm_weight_decay: Optional[float] = None  # None: weight_decay (param_groups)
    bias_weight_decay: Optional[float] = None
    ema_decay: Optional[float] = None  # WeightEMA after every optimizer step; None: off
    warmup_epochs: int = 0
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | step (after warmup)
    step_epochs: int = 5
    gamma: float = 0.1
    grad_clip: Optional[float] = 5.0
    amp: Union[bool, str] = True  # True: CUDA only; "always": bf16 autocast on the CPU too
    channels_last: Union[bool, str] = True  # NHWC activations: True on CUDA only, "always" on the CPU too
    seed: int = 0
    early_metric: Optional[str] = None
    early_mode: str = "max"
    patience: int = 5
    min_delta: float = 0.0
    resume: bool = True
    fingerprint: str = ""  # a checkpoint from a different config/data is never resumed


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best: dict[str, float]
    stopped_early: bool
    resumed_from: int  # epochs already done when this process started (0: fresh)
    device: str
    world_size: int = 1
    best_state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)


def param_groups(model: nn.Module, cfg: FitConfig) -> list[dict[str, Any]]:
    """The trainable parameters in optimizer groups by weight decay, as torchvision's reference
    recipes split them (references/classification/utils.py set_weight_decay): the normalisation
    layers' weights and biases take norm_weight_decay, the other layers' biases bias_weight_decay,
    the rest weight_decay; a setting left None takes weight_decay. One group when nothing
    differs (so the optimizer is exactly the single-group one of before these settings)."""
    norm = cfg.weight_decay if cfg.norm_weight_decay is None else cfg.norm_weight_decay
    bias = cfg.weight_decay if cfg.bias_weight_decay is None else cfg.bias_weight_decay
    groups: dict[float, list[nn.Parameter]] = {cfg.weight_decay: []}
    seen: set[int] = set()  # a parameter shared by two modules goes to one group
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            decay = norm if isinstance(module, NORM_LAYERS) else bias if name == "bias" else cfg.weight_decay
            groups.setdefault(decay, []).append(p)
    return [{"params": ps, "weight_decay": decay} for decay, ps in groups.items() if ps]


def build_optimizer(params, cfg: FitConfig) -> torch.optim.Optimizer:
    """`params`: tensors, or param_groups' groups (each with its own weight_decay)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class WeightEMA:
    """An exponential moving average of a model's weights, updated after every optimizer step:
    avg = decay * avg + (1 - decay) * weights, for the parameters and the floating-point buffers
    (BatchNorm's running statistics); integer buffers (num_batches_tracked) are copied. As in
    torchvision's reference recipes (--model-ema), it copies the weights instead while the LR
    warms up, so the average starts from the warmed-up model. `module` is a frozen copy of the
    model (same memory format), which validation scores and the train stage saves."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        # (average, model) tensor pairs, gathered once, not every step: the optimizer, resume
        # and DDP change both models' tensors in place (fit moves the model before making this)
        pairs = [*zip(self.module.parameters(), model.parameters()), *zip(self.module.buffers(), model.buffers())]
        self._floats = ([a for a, _ in pairs if a.is_floating_point()], [b for a, b in pairs if a.is_floating_point()])
        self._others = [(a, b) for a, b in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def update(self, copy_weights: bool = False) -> None:
        avg, now = self._floats
        if copy_weights:
            torch._foreach_copy_(avg, now)
        else:
            torch._foreach_lerp_(avg, now, 1.0 - self.decay)
        for a, b in self._others:
            a.copy_(b)


def build_scheduler(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: int,
                    schedule: str = "cosine", step_epochs: int = 5, gamma: float = 0.1):
    total = max(1, epochs * steps_per_epoch)
    warmup = min(warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:  # linear warmup, then cosine to 1% of the base LR or steps
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "step":
            return gamma ** ((step - warmup) // max(1, step_epochs * steps_per_epoch))
        t = (step - warmup) / max(1, total - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_dtype_for(setting: Union[bool, str], device: torch.device) -> Optional[torch.dtype]:
    """train.amp: True on CUDA only (bf16 where supported, else fp16 with a GradScaler), "always"
    also bf16 autocast on the CPU (oneDNN: AMX or AVX512-BF16; 2-3x per step for small_cnn here),
    False never. None: fp32. A CPU without bf16 instructions trains in fp32, with a warning."""
    if device.type == "cuda" and setting in (True, "always"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and setting == "always":
        if cpu_bf16_supported():
            return torch.bfloat16
        log.warning("train.amp: always, but this CPU has no bf16 instructions (AVX512-BF16 or AMX); "
                    "training in float32")
    return None


def cpu_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_channels_last(setting: Union[bool, str], device: torch.device) -> bool:
    """train.channels_last: True on CUDA only, "always" on any device, False never."""
    return setting == "always" or (setting is True and device.type == "cuda")


def train_one_epoch(task, model, loader, optimizer, scheduler, scaler, device, amp_dtype, grad_clip, epoch,
                    channels_last: Union[bool, str] = True,
                    after_step: Optional[Callable[[], None]] = None) -> dict[str, float]:
    """One pass over `loader`; `after_step` runs after every optimizer step (the weights' EMA)."""
    model.train()
    for m in model.modules():  # a frozen feature-extract backbone stays in inference mode
        if getattr(m, "visionflow_frozen_inference", False):
            m.eval()
    sums: dict[str, float] = {}
    n = 0
    # One iterator per epoch: tqdm.auto's asyncio class calls iter() on what it wraps, and a
    # second iter() on a DataLoader restarts its (persistent) workers mid-prefetch.
    # Images on the device, normalised there when the loader hands over uint8 (CUDA: the same
    # float batch either way), in the model's memory format (DeviceBatches, training/loader.py)
    batches = DeviceBatches(loader, device, use_channels_last(channels_last, device), move_targets=True)
    bar = tqdm(iter(batches), total=len(loader), desc=f"epoch {epoch}", leave=False, disable=None)
    # Is the model kept waiting? Time blocked on the next batch, against the whole pass. The
    # loss read at the end of each step waits for the device, so on CUDA too a wait here is
    # time the device had nothing to do (docs/training-loader.md, "Is the loader keeping up?").
    start = waited_since = time.perf_counter()
    waited = 0.0
    for images, targets in bar:
        waited += time.perf_counter() - waited_since
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = task.loss(model, images, targets)
            loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"epoch {epoch}: loss is {float(loss)}; lower train.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if after_step is not None:
            after_step()
        b = images.shape[0]
        n += b
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * b
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        waited_since = time.perf_counter()
    elapsed = max(time.perf_counter() - start, 1e-9)
    out = {f"train_{k}": v / max(n, 1) for k, v in sums.items()}
    out["train_loss"] = sum(sums.values()) / max(n, 1)
    out["data_wait"] = round(min(1.0, waited / elapsed), 4)  # share of the pass spent waiting for data
    out["images_per_s"] = round(n / elapsed, 2)  # this process's training images per second
    return out


def _improved(value: float, best: Optional[float], mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def fit(task, model: nn.Module, train_loader: DataLoader, val_loader: Optional[DataLoader], cfg: FitConfig,
        ckpt_dir: Path, device: torch.device, reseed: Callable[[int], None],
        on_epoch: Optional[Callable[[dict[str, float]], None]] = None, dist_info: DistInfo = SINGLE) -> FitResult:
    """Train `model` for cfg.epochs (or until early stopping); `reseed(epoch)` resets every
    source of randomness the data pipeline owns (loader generator or sampler, augmentation).
    Under DDP every rank calls this with its own shard of the data (DistributedSampler)."""
    model.to(device)
    if use_channels_last(cfg.channels_last, device):
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(param_groups(model, cfg), cfg)
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay else None
    scored = ema.module if ema is not None else model  # what validation scores and the stage saves
    scheduler = build_scheduler(optimizer, cfg.epochs, len(train_loader), cfg.warmup_epochs,
                                cfg.schedule, cfg.step_epochs, cfg.gamma)
    amp_dtype = amp_dtype_for(cfg.amp, device)
    # GradScaler only matters for fp16; disabled it is a pass-through (and still checkpointable).
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    state = {"epoch": 0, "history": [], "best": None, "best_epoch": 0, "bad_epochs": 0, "stopped": False}
    resumed_from = _maybe_resume(ckpt_dir, cfg, model, optimizer, scheduler, scaler, state, ema)
    require_same_on_ranks(resumed_from, "the epoch to resume from",
                          f"every node must see the same checkpoint folder {ckpt_dir} (shared storage)", dist_info)
    best_state = _load_best(ckpt_dir) if resumed_from else {}
    # DDP averages gradients across ranks in backward; `net` is what trains, `model` what is saved.
    net = model
    if dist_info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if state["stopped"]:
            break
        t0 = time.perf_counter()
        seed_everything(cfg.seed * 1000 + epoch)
        reseed(cfg.seed * 1000 + epoch)
        row = {"epoch": epoch}
        warming = epoch <= cfg.warmup_epochs
        losses = train_one_epoch(task, net, train_loader, optimizer, scheduler, scaler, device, amp_dtype, cfg.grad_clip,
                                 epoch, cfg.channels_last,
                                 (lambda: ema.update(copy_weights=warming)) if ema is not None else None)
        row.update(mean_over_ranks(losses, dist_info))  # the epoch's loss over every rank's shard
        row["images_per_s"] = round(row["images_per_s"] * dist_info.world_size, 2)  # all ranks together
        sync_buffers(model, dist_info)  # validate and checkpoint the weights every rank holds
        if dist_info.is_main and val_loader is not None and len(val_loader.dataset):
            val_batches = DeviceBatches(val_loader, device, use_channels_last(cfg.channels_last, device))
            row.update(task.val_metrics(scored, val_batches, device))
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["seconds"] = round(time.perf_counter() - t0, 3)
        row = broadcast(row, dist_info)  # rank 0's metrics decide for everyone
        state["history"].append(row)

        metric = cfg.early_metric if cfg.early_metric in row else "train_loss"
        mode = cfg.early_mode if metric == cfg.early_metric else "min"
        if _improved(row[metric], state["best"], mode, cfg.min_delta):
            state.update(best=row[metric], best_epoch=epoch, bad_epochs=0)
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in scored.state_dict().items()}
            if dist_info.is_main:
                write_with(ckpt_dir / BEST, lambda p: torch.save(best_state, p))
        else:
            state["bad_epochs"] += 1
            state["stopped"] = bool(cfg.early_metric) and state["bad_epochs"] >= cfg.patience
        state["epoch"] = epoch
        if dist_info.is_main:
            _save_checkpoint(ckpt_dir, cfg, model, optimizer, scheduler, scaler, state, ema)
            # the epoch's line first, then the decision it led to
            log.info("epoch %d/%d %s", epoch, cfg.epochs, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
            if state["stopped"]:
                log.info("early stopping after epoch %d: %s has not improved for %d epochs", epoch, metric,
                         cfg.patience)
            if on_epoch:
                on_epoch(row)
        barrier(dist_info)  # no rank runs ahead of the checkpoint

    best_row = next((r for r in state["history"] if r["epoch"] == state["best_epoch"]), {})
    return FitResult(state["history"], state["best_epoch"], best_row, state["stopped"], resumed_from,
                     str(device), dist_info.world_size,
                     best_state or {k: v.cpu() for k, v in scored.state_dict().items()})


def _save_checkpoint(ckpt_dir: Path, cfg: FitConfig, model, optimizer, scheduler, scaler, state: dict,
                     ema: Optional[WeightEMA] = None) -> None:
    ckpt = {
        "fingerprint": cfg.fingerprint,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "state": state,
    }
    if ema is not None:
        ckpt["ema"] = ema.module.state_dict()
    write_with(ckpt_dir / LAST, lambda p: torch.save(ckpt, p))


def _maybe_resume(ckpt_dir: Path, cfg: FitConfig, model, optimizer, scheduler, scaler, state: dict,
                  ema: Optional[WeightEMA] = None) -> int:
    path = ckpt_dir / LAST
    if not (cfg.resume and path.exists()):
        return 0
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    done = ckpt["state"]
    if ckpt.get("fingerprint") != cfg.fingerprint:
        log.info("checkpoint %s is from a different config or dataset; training from scratch", path)
        return 0
    if done["epoch"] >= cfg.epochs or done["stopped"]:
        log.info("checkpoint %s is a finished run; training from scratch", path)
        return 0
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        ema.module.load_state_dict(ckpt["ema"])
    state.update(done)
    log.info("resumed from %s after epoch %d", path, done["epoch"])
    return int(done["epoch"])


def _load_best(ckpt_dir: Path) -> dict:
    path = ckpt_dir / BEST
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else {}


def write_history_csv(path: Path, history: list[dict[str, float]]) -> None:
    cols = ["epoch"] + sorted({k for row in history for k in row} - {"epoch"})

    def _write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            for row in history:
                w.writerow(row)

    write_with(path, _write)

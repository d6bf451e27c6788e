"""Cached features for `mode: feature_extract` (train.feature_cache, docs/training-loader.md).

The frozen backbone of a feature-extract classifier runs in inference mode (BatchNorm on its
running statistics, dropout off: visionflow.models.classifiers), so it maps an image to the
same features every epoch. With the cache, every train and val image goes through the eval
pipeline (decode, resize, normalise: no augmentation, which TrainParams refuses with the cache)
and the backbone once; the features (N, F) stay in memory and the head (`feature_head`: the
Linear and the Dropout right before it) trains on them, so an epoch is a few matrix products.

The head shares its parameters with the whole model: what the train stage saves is the whole
network, and evaluate, predict and export use it unchanged. The checkpoint holds the head (its
optimizer state is the same as without the cache); the features are recomputed when a run
resumes.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from visionflow.training.engine import amp_dtype_for, use_channels_last
from visionflow.training.loader import SeededSampler, resolve_num_workers, stack

log = logging.getLogger(__name__)


def _pairs(batch: list) -> tuple[torch.Tensor, list]:
    images, targets = zip(*batch)
    return stack(images), list(targets)


@torch.no_grad()
def compute_features(model: nn.Module, head: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                     num_workers: int = 0, amp: Union[bool, str] = True, channels_last: Union[bool, str] = True) -> tuple[torch.Tensor, list]:
    """((N, F) float32 features on the CPU, N targets): the input of `head` (a submodule of
    `model`) for every item of `dataset`, in order, with the model in eval mode and the same
    AMP and memory format as training uses."""
    model.to(device).eval()
    amp_dtype = amp_dtype_for(amp, device)
    if use_channels_last(channels_last, device):
        model.to(memory_format=torch.channels_last)
    first = next(iter(head.children()), head)
    captured: list[torch.Tensor] = []

    def grab(_module, inputs):
        captured.append(inputs[0].detach().float().flatten(1).cpu().clone())  # in-place dropout: own copy

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_pairs, pin_memory=device.type == "cuda")
    targets: list = []
    hook = first.register_forward_pre_hook(grab)
    try:
        for images, ys in loader:
            images = images.to(device, non_blocking=True)
            if use_channels_last(channels_last, device):
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(images)
            targets.extend(ys)
    finally:
        hook.remove()
    feats = torch.cat(captured) if captured else torch.zeros((0, first.in_features if hasattr(first, "in_features") else 0))
    return feats, targets


class FeatureDataset(Dataset):
    """Stored features and their targets; keys are an index or the sampler's (index, seed)."""

    def __init__(self, features: torch.Tensor, targets: list):
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key) -> tuple[torch.Tensor, Any]:
        i = key[0] if isinstance(key, tuple) else key
        return self.features[i], self.targets[i]


def feature_loaders(task, model: nn.Module, head: nn.Module, params, train_feature_ds: Dataset, val_ds: Dataset,
                    device: torch.device, dist_info):
    """(train loader, val loader, sampler) over the cached features of the train split (through
    the eval pipeline) and the val split: the same shuffle (SeededSampler), batch size and
    drop_last as the image loaders, so the head sees the same batches in the same order."""
    t0 = time.perf_counter()
    out = []
    for ds in (train_feature_ds, val_ds):
        workers = resolve_num_workers(params.num_workers, len(ds), params.batch_size)
        out.append(FeatureDataset(*compute_features(model, head, ds, params.batch_size, device, workers,
                                                    params.amp, params.channels_last)))
    train_fs, val_fs = out
    if dist_info.is_main:
        dim = train_fs.features.shape[1] if len(train_fs) else 0
        log.info("feature cache: %d train / %d val images through the frozen backbone once (%d features each, "
                 "%.1f MB in memory) in %.1f s; the head trains on them", len(train_fs), len(val_fs), dim,
                 (train_fs.features.numel() + val_fs.features.numel()) * 4 / 1e6, time.perf_counter() - t0)
    drop_last = len(train_fs) > params.batch_size * dist_info.world_size
    sampler = SeededSampler(len(train_fs), params.seed, dist_info.rank, dist_info.world_size, drop_last=True)
    train_loader = DataLoader(train_fs, batch_size=params.batch_size, sampler=sampler, collate_fn=task.collate,
                              drop_last=drop_last, generator=torch.Generator())
    val_loader = DataLoader(val_fs, batch_size=params.batch_size, collate_fn=task.collate, generator=torch.Generator())
    return train_loader, val_loader, sampler

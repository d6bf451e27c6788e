"""Loader workers reuse their shared-memory batches (visionflow.training.batch_slots).

What must hold: every batch a consumer gets is the batch a loader without workers gives, bit for
bit, even when the consumer keeps every batch of several epochs (a slot is only written again
after its batch was copied out), the slots are really reused (far fewer storages cross than
batches), and what the collate hides or repeats is never reused.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import test_loader as T  # noqa: E402

from visionflow.core.config import AugmentParams, TrainParams  # noqa: E402
from visionflow.core.paths import Paths  # noqa: E402
from visionflow.stages.train import build_loaders  # noqa: E402
from visionflow.tasks import get_task  # noqa: E402
from visionflow.training import batch_slots, memory  # noqa: E402
from visionflow.training.batch_slots import BatchSlots, SlotCollate  # noqa: E402
from visionflow.training.distributed import SINGLE  # noqa: E402
from visionflow.training.loader import SeededSampler, WorkerInit, stack  # noqa: E402


def _epochs(task_name: str, samples, root: Path, workers: int, epochs: int = 3, on_device: bool = True):
    """Every batch of `epochs` epochs of the train stage's loader, all kept; and its slots."""
    params = TrainParams(image_size=48, batch_size=2, num_workers=workers, augment=AugmentParams(preset="medium"),
                         device="cpu")
    task = get_task(task_name, params)
    train_tf, eval_tf = task.build_transforms(params)
    train_ds = task.build_dataset(samples, train_tf, root)
    val_ds = task.build_dataset(samples[:2], eval_tf, root)
    loader, _, sampler = build_loaders(task, params, Paths(root), train_ds, val_ds, torch.device("cpu"), SINGLE,
                                       normalize_on_device=on_device)
    kept = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        kept.append(list(loader))
    slots = loader.worker_init_fn.slots if workers else None
    return kept, slots


def _flat(kept) -> list[torch.Tensor]:
    out = []
    for epoch in kept:
        for images, targets in epoch:
            out.append(images)
            if isinstance(targets, torch.Tensor):
                out.append(targets)
            else:  # detect: a list of dicts of tensors
                out.extend(v for t in targets for v in t.values())
    return out


@pytest.mark.parametrize("task_name,on_device", [("classify", True), ("segment", True), ("detect", True),
                                                 ("classify", False), ("segment", False)])
def test_kept_batches_of_two_workers_are_those_of_none_and_the_slots_are_reused(tmp_path, task_name, on_device):
    """uint8 batches (normalised on the device), and float32 ones (normalised in place)."""
    samples = T._same_image_samples(tmp_path, 16) if task_name == "classify" else T._shapes_samples(tmp_path, 16)
    ref, _ = _epochs(task_name, samples, tmp_path, workers=0, on_device=on_device)
    got, slots = _epochs(task_name, samples, tmp_path, workers=2, on_device=on_device)
    a, b = _flat(ref), _flat(got)
    assert len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))
    # the images came through the slots: copies in this process's own memory, as laid out
    assert slots is not None and slots._received
    images = [images for epoch in got for images, _ in epoch]
    assert not any(x.is_shared() for x in images)
    assert all(x.dtype == (torch.uint8 if on_device else torch.float32) for x in images)
    if task_name == "classify" and on_device:
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x in images)
    # 24 batches, each one or two stacked tensors, crossed in a few storages: reused, not made afresh
    crossed = len(slots._received)
    assert 2 <= crossed <= slots.workers * slots.per_worker < len(images)
    assert not slots.busy.any()  # every slot given back once its batch was copied out
    # the small tensors (labels, a detector's boxes and labels) crossed by value, not each in a
    # shared-memory segment of its own
    small = [t for t in b if t.numel() * t.element_size() <= batch_slots.INLINE_BYTES]
    assert small and not any(t.is_shared() for t in small)


class _Numbers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((128, 128), float(i))  # a batch of 4 is 256 KiB: above what crosses by value


def _hides_and_repeats(batch: list) -> tuple:
    """A collate that shows one stacked tensor plainly, one twice and one inside an object the
    slots do not look into: only the first may go through a slot."""
    plain, twice, hidden = stack(batch), stack(batch), stack(batch)
    return plain, (twice, [twice]), _Box(hidden)


class _Box:
    def __init__(self, t: torch.Tensor):
        self.t = t


def _loader(collate, slots: BatchSlots, workers: int = 2, **kw) -> DataLoader:
    return DataLoader(_Numbers(), batch_size=4, num_workers=workers, collate_fn=SlotCollate(collate),
                      worker_init_fn=WorkerInit(0, 0, slots), persistent_workers=True, prefetch_factor=2, **kw)


def test_a_slot_the_collate_hides_or_repeats_is_retired_never_written_again():
    slots = BatchSlots(workers=2, per_worker=6)
    loader = _loader(_hides_and_repeats, slots)
    kept = [list(loader) for _ in range(3)]  # three epochs, all kept
    for epoch in kept:
        for k, (plain, (twice, [again]), box) in enumerate(epoch):
            want = torch.arange(4 * k, 4 * k + 4, dtype=torch.float32).view(4, 1, 1).expand(4, 128, 128)
            assert torch.equal(plain, want) and torch.equal(twice, want) and torch.equal(box.t, want)
            assert not plain.is_shared()  # through a slot: copied out
            assert twice.is_shared() and box.t.is_shared()  # as torch sends a shared tensor
    assert len(slots._received) <= 2 * 6 < 30


def test_with_every_slot_busy_a_worker_stacks_into_a_fresh_segment():
    slots = BatchSlots(workers=1, per_worker=1)  # fewer than the batches in flight (prefetch 2)
    loader = _loader(lambda b: stack(b), slots, workers=1)
    kept = [list(loader) for _ in range(2)]
    for epoch in kept:
        for k, batch in enumerate(epoch):
            assert torch.equal(batch[:, 0, 0], torch.arange(4 * k, 4 * k + 4, dtype=torch.float32))
    assert len(slots._received) == 1
    assert any(not b.is_shared() for e in kept for b in e) and any(b.is_shared() for e in kept for b in e)


def test_spawned_workers_use_the_slots_too(tmp_path):
    samples = T._same_image_samples(tmp_path, 8)
    params = TrainParams(image_size=32, batch_size=2, num_workers=1, device="cpu")
    task = get_task("classify", params)
    train_tf, _ = task.build_transforms(params)
    ds = task.build_dataset(samples, train_tf, tmp_path)
    ds.defer_normalization()
    sampler = SeededSampler(len(ds), seed=3)
    keys = list(sampler)
    want = [task.collate([ds[key] for key in keys[i:i + 2]]) for i in range(0, 8, 2)]
    sampler.set_epoch(3)  # the same order again
    slots = BatchSlots(workers=1, per_worker=4, context="spawn")
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=1, collate_fn=SlotCollate(task.collate),
                        worker_init_fn=WorkerInit(0, 0, slots), multiprocessing_context="spawn")
    got = list(loader)
    assert all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want, strict=True))
    assert slots._received and not got[0][0].is_shared()


def test_slots_off_with_the_rest_of_the_loader_memory_measures(monkeypatch):
    assert batch_slots.slots_for(0, 2, pin=False) is None
    slots = batch_slots.slots_for(3, 2, pin=False)
    assert slots is not None and slots.workers == 3 and slots.per_worker == 6
    monkeypatch.setenv(memory.OPT_OUT, "default")
    assert batch_slots.slots_for(3, 2, pin=False) is None


def test_an_epoch_left_half_way_leaves_the_next_epochs_whole():
    slots = BatchSlots(workers=2, per_worker=6)
    loader = _loader(lambda b: stack(b), slots)
    for _ in range(3):
        it = iter(loader)
        next(it), next(it)  # left with batches in flight: the next iter() drains them
        del it
    for k, batch in enumerate(list(loader)):
        assert torch.equal(batch[:, 0, 0], torch.arange(4 * k, 4 * k + 4, dtype=torch.float32))
    assert not slots.busy.any()


def test_a_slot_whose_storage_never_arrived_is_refused_not_guessed():
    slots = BatchSlots(workers=1, per_worker=2)
    storage = torch.UntypedStorage._new_shared(16)
    got = slots.receive(0, 1, (123, 1), storage, torch.uint8, (16,), (1,), 0)
    assert got.shape == (16,)
    assert torch.equal(slots.receive(0, 1, (123, 1), None, torch.uint8, (16,), (1,), 0), got)
    with pytest.raises(RuntimeError, match="slot 1 .* never received"):
        slots.receive(0, 1, (123, 2), None, torch.uint8, (16,), (1,), 0)  # a newer storage than the one here


@pytest.mark.parametrize("t", [torch.tensor([[1.5, 2.0], [3.0, 4.0]]), torch.tensor([True, False]),
                               torch.arange(6, dtype=torch.int64).view(2, 3).t(), torch.empty(0, 4),
                               torch.tensor(7, dtype=torch.uint8)])
def test_a_small_tensor_crosses_by_value_and_arrives_as_it_left(t):
    import pickle

    got = pickle.loads(pickle.dumps(batch_slots._Inline(t)))
    assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t) and not got.is_shared()
    assert not batch_slots._inline(torch.zeros(batch_slots.INLINE_BYTES + 1, dtype=torch.uint8))
    assert not batch_slots._inline(torch.zeros(2, dtype=torch.bfloat16))  # numpy has no bfloat16


def test_shared_memory_is_measured_and_a_shortfall_says_what_to_do():
    free, total = batch_slots.shm_space()  # this machine's /dev/shm
    assert 0 < free <= total
    assert batch_slots.shm_space("/no/such/folder") is None
    need = batch_slots.in_flight(workers=4, prefetch_factor=2, batch_bytes=32 * 3 * 640 * 640, processes=2)
    assert need == 2 * 4 * 3 * 32 * 3 * 640 * 640  # two local ranks, four workers, two prefetched + one received
    assert batch_slots.shm_shortfall(need, (need, need)) is None
    assert batch_slots.shm_shortfall(need, None) is None
    said = batch_slots.shm_shortfall(need, (64 << 20, 64 << 20))  # Docker's default
    assert "need about 900 MiB of shared memory, but /dev/shm has 64 MiB free of 64 MiB" in said, said
    assert "--shm-size=2g" in said and "num_workers" in said and "batch_size" in said


@pytest.mark.parametrize("space,warned", [((1 << 20, 64 << 20), True), ((1 << 40, 1 << 40), False)])
def test_the_train_stage_warns_when_the_workers_batches_would_not_fit(tmp_path, monkeypatch, caplog, space, warned):
    """Two workers, three batches in flight each, of 4 float images at 48 px (110 KiB): about
    660 KiB for the train loader and as much for validation, against 1 MiB or 1 TiB free."""
    import logging

    import visionflow.stages.train as train_stage

    monkeypatch.setattr(train_stage, "shm_space", lambda: space)
    samples = T._same_image_samples(tmp_path, 16)
    params = TrainParams(image_size=48, batch_size=4, num_workers=2, device="cpu")
    task = get_task("classify", params)
    train_tf, eval_tf = task.build_transforms(params)
    with caplog.at_level(logging.WARNING, logger="visionflow.stages.train"):
        build_loaders(task, params, Paths(tmp_path), task.build_dataset(samples, train_tf, tmp_path),
                      task.build_dataset(samples, eval_tf, tmp_path), torch.device("cpu"), SINGLE)
    said = [r.getMessage() for r in caplog.records if "shared memory" in r.getMessage()]
    if warned:
        assert len(said) == 1 and "need about 1.3 MiB of shared memory, but /dev/shm has 1.0 MiB free" in said[0], said
        assert "--shm-size=1g" in said[0]
    else:
        assert not said


def test_the_train_stage_counts_mask_r_cnn_s_masks_at_the_split_s_mean_objects_an_image(tmp_path):
    """The shared-memory estimate's example: Mask R-CNN's targets hold a 48x48 uint8 mask per
    object, counted at the split's mean (1 object in the first image, 4 in the 7 others: 3.625),
    not at the first image's; a box-only detector's example is the same without any."""
    from dataclasses import replace

    from visionflow.core.config import ModelParams
    from visionflow.stages.train import _example_bytes

    samples = T._shapes_samples(tmp_path, 8)
    samples = [replace(samples[0], instances=samples[0].instances[:1]),
               *[replace(s, instances=s.instances * 2) for s in samples[1:]]]
    sizes = {}
    for arch in ("fasterrcnn", "maskrcnn"):
        params = TrainParams(model=ModelParams(arch=arch), image_size=48, batch_size=4, device="cpu")
        task = get_task("detect", params)
        sizes[arch] = _example_bytes(task, task.build_dataset(samples, task.build_transforms(params)[1], tmp_path))
    assert sizes["maskrcnn"] == sizes["fasterrcnn"] + round(3.625 * 48 * 48), sizes


@pytest.mark.parametrize("task_name", ["classify", "segment", "detect"])
def test_float_batches_are_normalised_in_place_and_equal_the_stacked_items(tmp_path, task_name):
    """With normalisation on the CPU each image's LUT writes its row of the batch (_BatchBuffer):
    the collated batch is that buffer, no copy, and bit for bit the items stacked."""
    samples = T._same_image_samples(tmp_path, 8) if task_name == "classify" else T._shapes_samples(tmp_path, 8)
    params = TrainParams(image_size=48, batch_size=4, augment=AugmentParams(preset="medium"), device="cpu")
    task = get_task(task_name, params)
    ds = task.build_dataset(samples, task.build_transforms(params)[0], tmp_path)
    for start in (0, 4):
        items = ds.__getitems__([(i, 7 + i) for i in range(start, start + 4)])
        images = task.collate(items)[0]
        assert images.dtype == torch.float32 and images.data_ptr() == items[0][0].data_ptr()  # in place
        assert torch.equal(images, torch.stack([item[0] for item in items]))
        singles = [ds[(i, 7 + i)][0] for i in range(start, start + 4)]  # one by one: no batch to write into
        assert torch.equal(images, torch.stack(singles))
    # a batch whose parts are not the buffer's rows in order is copied, not returned as the buffer
    items = ds.__getitems__([(i, i) for i in range(4)])
    swapped = [items[1], items[0], *items[2:]]
    images = task.collate(swapped)[0]
    assert images.data_ptr() != items[0][0].data_ptr() and torch.equal(images[0], items[1][0])


def test_the_shared_memory_estimate_skips_an_empty_split(tmp_path, monkeypatch):
    """An empty validation split (the GPU benchmark's smoke run has one) has no example to measure."""
    import visionflow.stages.train as train_stage

    monkeypatch.setattr(train_stage, "shm_space", lambda: (1 << 40, 1 << 40))
    samples = T._same_image_samples(tmp_path, 16)
    params = TrainParams(image_size=48, batch_size=4, num_workers=2, device="cpu")
    task = get_task("classify", params)
    train_tf, eval_tf = task.build_transforms(params)
    train_loader, val_loader, _ = build_loaders(task, params, Paths(tmp_path),
                                                task.build_dataset(samples, train_tf, tmp_path),
                                                task.build_dataset([], eval_tf, tmp_path), torch.device("cpu"), SINGLE)
    assert len(val_loader.dataset) == 0 and len(list(train_loader)) == 4

"""The training data loader: worker count, per-sample seeding, decoded-image cache, threads.

Seeding (exact resume with any number of workers): the train loader's sampler runs in the
main process and yields (index, sample_seed) pairs, sample_seed derived from (epoch seed,
rank, index). The dataset seeds its augmentation pipeline (and, around the call, python's,
numpy's and torch's global generators, for transforms that use them) from that seed, in
whichever worker the sample lands. So a sample's augmentation depends on (seed, epoch, rank,
index) only: it differs across samples and workers, is the same with 0, 2 or 8 workers, with
persistent workers, and when a run resumes at epoch e. `worker_init_fn` also seeds each
worker's global generators from (seed, rank, worker id) and gives it one thread.

Decoded-image cache (train.cache): a dataset's transform starts with deterministic resize steps
(Resize, LongestMaxSize, SmallestMaxSize, centred PadIfNeeded); a sample's *record* is the
decoded image (and its rasterised masks) through those steps, and only the rest of the pipeline
(the random augmentations, normalisation) runs per epoch. The record is computed once per
sample and process and kept:
  none  masks only, zlib-compressed in memory (never rasterised again); images decoded each epoch
  ram   every record decoded up front in the main process (shared with forked workers); refused
        when the estimate does not fit in the available memory
  disk  images as .npy files keyed by the image's sha256 (atomic writes), masks as under none
The split changes no pixel: the record is exactly what the full pipeline's first steps produce,
so none, ram and disk give identical batches, and predictions (load_rgb + the eval transform)
see the same pixels as validation.
"""
from __future__ import annotations

import abc
import copy
import logging
import math
import os
import random
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler, get_worker_info

from visionflow.core.errors import UserError
from visionflow.manifest import Sample
from visionflow.manifest.images import load_rgb
from visionflow.training.augment import decode_fit
from visionflow.training.batch_slots import BatchSlots, in_mib, shared_buffer
from visionflow.training import memory

log = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 8
# `num_workers: auto` keeps tiny datasets (fewer train batches than this per epoch) in the main
# process: starting workers costs more than loading a few batches (the test suite's datasets).
MIN_BATCHES_FOR_WORKERS = 8
CACHE_VERSION = 1  # bump when the record layout or its pixels change (disk cache keys)
RAM_SHARE = 0.8  # cache: ram is refused when the records need more than this share of the available memory


# --- threads and workers ----------------------------------------------------------------------

def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def local_world_size() -> int:
    """Processes sharing this machine's cores (torchrun sets LOCAL_WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def process_cores(cores: Optional[int] = None, local_world: Optional[int] = None) -> int:
    """One training process's share of the machine's cores (all of them without torchrun)."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // (local_world_size() if local_world is None else local_world))


def max_workers(cores: int) -> int:
    """The most loader workers a process with `cores` cores gets: one core fewer (the main process
    trains), at most MAX_AUTO_WORKERS; 0 with fewer than two."""
    return max(0, min(MAX_AUTO_WORKERS, cores - 1))


def auto_num_workers(n_samples: int, batch_size: int, cores: Optional[int] = None,
                     local_world: Optional[int] = None) -> int:
    """Workers for one training process: max_workers of its share of the cores; 0 when an epoch
    has fewer than MIN_BATCHES_FOR_WORKERS batches."""
    if math.ceil(n_samples / max(1, batch_size)) < MIN_BATCHES_FOR_WORKERS:
        return 0
    return max_workers(process_cores(cores, local_world))


def resolve_num_workers(requested: Union[int, str], n_samples: int, batch_size: int) -> int:
    return auto_num_workers(n_samples, batch_size) if requested == "auto" else int(requested)


STARVED = 0.3  # an epoch whose training pass waited this share of its time for data gets loader_advice


def loader_advice(workers: int, cores: int, cache: str, cache_bytes: int, available: int,
                  decode_reducible: bool) -> list[str]:
    """What would feed a training process that waits for its data (the engine's `data_wait`),
    from its loader's settings: more workers while it has spare cores (`cores`: its share of the
    machine's), the decoded-image cache (ram where the split's records fit as use_cache's rule
    says, else disk), reduced JPEG decoding where the task allows it and it is off. When every
    option is on, what is left to change."""
    tips = []
    most = max_workers(cores)
    if workers < most:
        tips.append(f"num_workers: {most} (now {workers}; this process has {cores} cores, and `auto` picks "
                    f"{most} for a dataset of {MIN_BATCHES_FOR_WORKERS} batches or more)")
    if cache == "none":
        if cache_bytes <= RAM_SHARE * available:
            tips.append(f"cache: ram (each image decoded once: about {_size(cache_bytes)} of the "
                        f"{_size(available)} available)")
        else:
            tips.append(f"cache: disk (ram would need about {_size(cache_bytes)}, {_size(available)} is available)")
    if decode_reducible:
        tips.append("decode: reduced (JPEGs decoded at 1/2, 1/4 or 1/8 scale wherever that still covers image_size)")
    if not tips:
        tips.append("every loader option is on already: a lighter augmentation preset, a smaller image_size or "
                    "more CPU cores per training process")
    return tips


def set_main_threads() -> int:
    """The training process's intra-op threads: its share of the cores (all of them without
    torchrun), unless OMP_NUM_THREADS says otherwise. Returns the thread count."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(process_cores())
    return torch.get_num_threads()


def _seed_int(*parts: int) -> int:
    """A 32-bit seed from any integers (negative ones too)."""
    return int(np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(1)[0])


def sample_seed(epoch_seed: int, rank: int, index: int) -> int:
    return _seed_int(epoch_seed, rank, index)


class WorkerInit:
    """worker_init_fn: one torch thread per worker (the workers already divide the cores), the
    worker's global generators seeded from (seed, rank, worker id), and, with `slots`, the
    loader's BatchSlots started for this worker (batch_slots.py). Picklable."""

    def __init__(self, seed: int, rank: int = 0, slots: Optional[BatchSlots] = None):
        self.seed, self.rank, self.slots = seed, rank, slots

    def __call__(self, worker_id: int) -> None:
        if self.slots is not None:  # its batches leave through the loader's slots (SlotCollate)
            self.slots.start_worker(worker_id)
        # OpenCV's thread count is left alone: cv2.setNumThreads in a forked child joins the
        # parent's pool threads, which do not exist there, and hangs (seen once the main process
        # had resized large images before forking, e.g. filling the ram cache).
        torch.set_num_threads(1)
        memory.tune_allocator()  # a forked worker has it already; a spawned one sets it here
        s = _seed_int(self.seed, self.rank, worker_id)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)


# --- per-sample seeding -----------------------------------------------------------------------

class SeededSampler(Sampler):
    """Wraps the shuffling sampler (RandomSampler with its own generator, or DistributedSampler)
    and yields (index, sample_seed). `set_epoch(epoch_seed)` reseeds the shuffle; it runs in
    the main process, so persistent workers need no reseeding."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True):
        self.rank, self.epoch_seed = rank, seed
        if world_size > 1:
            self.base: Sampler = DistributedSampler(_Sized(n), world_size, rank, shuffle=True, seed=seed,
                                                    drop_last=drop_last)
            self.generator = None
        else:
            self.generator = torch.Generator()
            self.generator.manual_seed(seed)
            self.base = RandomSampler(_Sized(n), generator=self.generator)

    def set_epoch(self, epoch_seed: int) -> None:
        self.epoch_seed = epoch_seed
        if self.generator is not None:
            self.generator.manual_seed(epoch_seed)
        else:
            self.base.set_epoch(epoch_seed)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.base:
            yield int(i), sample_seed(self.epoch_seed, self.rank, int(i))

    def __len__(self) -> int:
        return len(self.base)


class AspectBatchSampler(Sampler):
    """Batches of one orientation (landscape or portrait) for `resize: fit`, whose batches are
    padded to their largest image: a batch mixing a 16:9 and a 9:16 photo is padded to a square
    and gains nothing over letterbox (benchmarks/fit_bench.py), one of either kind keeps its
    shape. What Detectron2's aspect-ratio grouping does, made a pure function of the epoch seed:

    - every rank draws the same permutation of all samples from the epoch seed and walks it,
      filling one bucket per orientation; a full bucket is a batch. The buckets' leftovers, in
      the permutation's order, make the last mixed batches (an incomplete one is dropped, as the
      plain train loader drops its last, unless that would leave a rank no batch at all);
    - rank r of w takes batches r, r + w, ... of the first (count // w) * w, so every rank takes
      the same number of steps (DDP needs it) and no sample is seen twice in an epoch (unless
      there are fewer batches than ranks: then some repeat);
    - each item is (index, sample_seed) as SeededSampler yields, so augmentations, exact resume
      and the independence from the number of workers are the same as without grouping.
    """

    def __init__(self, landscape: Sequence[bool], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.landscape = np.asarray(landscape, bool)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.epoch_seed = seed
        self._made: Optional[tuple[int, list[list[int]]]] = None  # (epoch seed, its batches)

    def set_epoch(self, epoch_seed: int) -> None:
        self.epoch_seed = epoch_seed

    def batches(self) -> list[list[int]]:
        """Every rank's batches of this epoch, in order (rank r takes every w-th)."""
        if self._made is None or self._made[0] != self.epoch_seed:
            self._made = (self.epoch_seed, self._make())
        return self._made[1]

    def _make(self) -> list[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.epoch_seed)
        order = torch.randperm(len(self.landscape), generator=g).tolist()
        buckets: dict[bool, list[int]] = {True: [], False: []}
        out: list[list[int]] = []
        for i in order:
            bucket = buckets[bool(self.landscape[i])]
            bucket.append(i)
            if len(bucket) == self.batch_size:
                out.append(bucket[:])
                bucket.clear()
        position = {i: k for k, i in enumerate(order)}
        rest = sorted(buckets[True] + buckets[False], key=position.__getitem__)
        out += [rest[k:k + self.batch_size] for k in range(0, len(rest), self.batch_size)]
        if len(out) > self.world_size and len(out[-1]) < self.batch_size:
            out.pop()
        if len(out) < self.world_size:  # fewer batches than ranks: some repeat, so each rank has one
            return (out * self.world_size)[:self.world_size]
        return out[:len(out) // self.world_size * self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches()[self.rank::self.world_size]:
            yield [(i, sample_seed(self.epoch_seed, self.rank, i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batches()[self.rank::self.world_size])


def orientation_batches(landscape: Sequence[bool], batch_size: int) -> list[list[int]]:
    """Indices in order, the landscape ones then the portrait ones, each in batches of
    batch_size: how validation and prediction batch under resize: fit (unshuffled)."""
    groups = ([i for i, x in enumerate(landscape) if x], [i for i, x in enumerate(landscape) if not x])
    return [g[i:i + batch_size] for g in groups for i in range(0, len(g), batch_size)]


def orientations(samples: Sequence[Sample]) -> list[bool]:
    """Whether each sample is landscape (width >= height, after its EXIF orientation), as
    the manifest records it: what AspectBatchSampler groups by."""
    return [s.width >= s.height for s in samples]


class _Sized:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


@contextmanager
def kept_globals() -> Iterator[None]:
    """python's, numpy's and torch's CPU global generators restored after the block in the main
    process (with 0 workers, loading must not move the training's own generators). A loader
    worker's generators are its own: nothing is saved (numpy's state alone costs 0.14 ms to save
    and restore, half of a small image's whole item)."""
    if get_worker_info() is not None:
        yield
        return
    cpu = torch.default_generator
    py, npy, th = random.getstate(), np.random.get_state(), cpu.get_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        cpu.set_state(th)


def seed_pipeline(pipeline, seed: int) -> None:
    """An Albumentations pipeline seeded for one sample, with one stream that all its steps draw
    from in turn. Albumentations' own `Compose.set_random_seed(seed)` gives every step generators
    of its own, each seeded with that same seed, so the steps' draws coincide: with the `light`
    preset's two p=0.5 steps, either both applied or neither, never one (albumentations 2.0.8;
    tests/test_loader.py). One shared pair is also seeded once per sample, not once per step.
    The Compose keeps a generator of its own for its gate (drawn even at p=1), so the first step
    draws what it drew before and one-step pipelines (examples/fashion-mnist) train as before."""
    compose = pipeline.compose if isinstance(pipeline, _NormalizedBy) else pipeline
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
    compose.py_random = random.Random(seed)


def seed_globals(seed: int) -> None:
    """python's, numpy's and torch's CPU global generators seeded for one sample (the CPU
    generator, not torch.manual_seed: that also queues a lazy CUDA seeding with a stack trace,
    0.5 ms). Python's global generator gets seed + 2**32: seeded with the sample's seed itself it
    is the pipeline's random.Random(seed) (seed_pipeline), number for number, and a custom step
    drawing from the global `random` (an A.Lambda, a transform of one's own) applied exactly when
    the first built-in step did. MT19937 seeded with the key [seed, 1] instead of [seed] is
    another stream, at no cost. numpy's and torch's global generators were never the pipeline's
    streams: the pipeline's numpy generator is a PCG64, and both seed MT19937 by another routine
    than python's (init_genrand against init_by_array)."""
    random.seed(seed + (1 << 32))
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


# --- the records: deterministic prefix of the pipeline, cached ---------------------------------

_DETERMINISTIC = (A.Resize, A.LongestMaxSize, A.SmallestMaxSize)


def split_transform(transform: Optional[A.Compose]) -> tuple[Optional[A.Compose], Optional[A.Compose]]:
    """(prefix, rest): a Compose of the leading deterministic resize/pad steps and one of the
    remaining steps, both with the original's settings (boxes pass the prefix unfiltered; the
    rest filters them as the original would). (None, transform) when there is no such prefix."""
    if transform is None or not isinstance(transform, A.Compose) or transform.p < 1.0:
        return None, transform
    steps = list(transform.transforms)
    k = 0
    while k < len(steps) and _is_deterministic(steps[k]):
        k += 1
    if k == 0:
        return None, transform
    bbox = transform.processors.get("bboxes")
    keep = dict(additional_targets=getattr(transform, "additional_targets", None) or None,
                is_check_shapes=transform.is_check_shapes, strict=transform.strict)
    prefix_boxes = None
    if bbox is not None:
        bp = bbox.params
        prefix_boxes = A.BboxParams(format=bp.format, label_fields=list(bp.label_fields or []), min_area=0.0,
                                    min_visibility=0.0, clip=getattr(bp, "clip", False))
    with warnings.catch_warnings():  # "processor for bboxes, but no transform to process it": boxes
        warnings.simplefilter("ignore", UserWarning)  # still pass (and are filtered), as wanted
        prefix = A.Compose([copy.deepcopy(t) for t in steps[:k]], bbox_params=prefix_boxes, **keep)
        tail = [copy.deepcopy(t) for t in steps[k:]]
        normalize = tail.pop() if tail and _lut_normalize(tail[-1]) else None
        rest = A.Compose(tail, bbox_params=bbox.params if bbox is not None else None, p=transform.p, **keep)
    return prefix, (_NormalizedBy(rest, normalize) if normalize is not None else rest)


def _lut_normalize(step) -> bool:
    return isinstance(step, A.Normalize) and step.p >= 1.0 and step.normalization == "standard"


class _BatchBuffer:
    """A batch's float images normalised in place (LoaderDataset.__getitems__, with a pipeline
    ending in _NormalizedBy, normalising on the CPU): one (B, 3, H, W) float32 buffer, allocated
    at the first image as `stack` would allocate the batch (shared memory in a worker: a slot),
    and each image's LUT normalisation writes its row. `stack` then finds the batch in place and
    returns the buffer instead of copying every 4.9 MB image again (1.14-1.21x the loader's rate
    at 640 px, one process). Any image of another shape, or a batch that does not come out
    whole, and `stack` copies as before. uint8 images (normalised on the device) are not written
    in place: copied into their rows as they were made, they were no faster than `stack`'s copy
    of the whole batch (0.91-1.05x)."""

    def __init__(self, n: int):
        self.n, self.rows, self.base, self.shape, self.dtype = n, 0, None, None, None

    def take(self, shape: tuple, dtype) -> Optional[np.ndarray]:
        """The next row for an image of this shape and dtype, or None (then the image is made as
        before)."""
        dtype = np.dtype(dtype)
        if self.rows >= self.n or (self.base is not None and (shape != self.shape or dtype != self.dtype)):
            return None
        if self.base is None:
            flat = batch_memory(self.n * math.prod(shape), torch.from_numpy(np.empty(0, dtype)).dtype)
            self.base, self.shape, self.dtype = flat.view(self.n, *shape), shape, dtype
        row = self.base[self.rows].numpy()
        self.rows += 1
        return row


_in_place = threading.local()  # .filling: the _BatchBuffer of the batch being made; .filled: the last one made


def _take(shape: tuple, dtype) -> Optional[np.ndarray]:
    buffer = getattr(_in_place, "filling", None)
    return buffer.take(shape, dtype) if buffer is not None else None


def _filled(parts: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """The last batch buffer, when `parts` are its rows in order (then no copy is needed)."""
    buffer, _in_place.filled = getattr(_in_place, "filled", None), None
    if buffer is None or buffer.base is None or buffer.rows != buffer.n or len(parts) != buffer.n:
        return None
    base = buffer.base
    for row, part in zip(base, parts):
        if part.data_ptr() != row.data_ptr() or part.shape != row.shape or part.stride() != row.stride():
            return None
    return base


class _NormalizedBy:
    """A Compose followed by its final A.Normalize as per-channel cv2.LUTs written channel-first
    (with the transpose the datasets do, a quarter of the time of A.Normalize at 640 px). The
    tables are computed as albucore's normalize_lut computes them: the same pixels, bit for bit.

    deferred: the image stays uint8 (H, W, 3) and DeviceNormalize does the same arithmetic on the
    batch, on the device (LoaderDataset.defer_normalization)."""

    def __init__(self, compose: A.Compose, normalize: A.Normalize):
        self.compose, self.normalize, self.deferred = compose, normalize, False
        self.mean = np.broadcast_to(np.asarray(normalize.mean_np, np.float32).reshape(-1), (3,)).copy()
        self.denominator = np.broadcast_to(np.asarray(normalize.denominator, np.float32).reshape(-1), (3,)).copy()
        luts = (np.arange(0, 256, dtype=np.float32)[None] - self.mean[:, None]) * self.denominator[:, None]
        self.luts = [np.ascontiguousarray(t, np.float32) for t in luts]  # (3, 256)

    def __call__(self, **data):
        import cv2

        out = self.compose(**data)
        image = out["image"]
        rgb8 = image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        if self.deferred:
            if not rgb8:
                raise RuntimeError(f"normalisation on the device needs (H, W, 3) uint8 images from the "
                                   f"augmentations, got {image.dtype} {image.shape}")
            # kept (H, W, 3): chw_tensor makes it a (3, H, W) view with channels-last strides and
            # `stack` batches it as (B, H, W, 3) memory, so no transpose runs on the CPU at all
            # (0.8 ms a 640 px image); the device gets a channels_last batch (engine.py)
            out["image"] = np.ascontiguousarray(image)  # (copied into a _BatchBuffer row: no faster)
        elif rgb8:
            # written channel-first and returned as an (H, W, 3) view: the datasets' transpose to
            # (3, H, W) is then free instead of a copy of the float image; written straight into
            # its row of the batch where there is one
            chw = _take((3, *image.shape[:2]), np.float32)
            if chw is None:
                chw = np.empty((3, *image.shape[:2]), np.float32)
            for c, plane in enumerate(cv2.split(image)):
                cv2.LUT(plane, self.luts[c], dst=chw[c])
            out["image"] = chw.transpose(1, 2, 0)
        else:
            out["image"] = self.normalize(image=image)["image"]
        return out


def _is_deterministic(step) -> bool:
    if isinstance(step, _DETERMINISTIC) and step.p >= 1.0:
        return True
    return isinstance(step, A.PadIfNeeded) and step.p >= 1.0 and getattr(step, "position", "center") == "center"


def _pack(a: np.ndarray) -> tuple:
    if a.dtype == bool:
        return ("bits", a.shape, zlib.compress(np.packbits(a, axis=None).tobytes(), 1))
    return ("raw", a.shape, a.dtype.str, zlib.compress(np.ascontiguousarray(a).tobytes(), 1))


def _unpack(p: tuple) -> np.ndarray:
    if p[0] == "bits":
        shape = p[1]
        n = int(np.prod(shape))
        return np.unpackbits(np.frombuffer(zlib.decompress(p[2]), np.uint8), count=n).astype(bool).reshape(shape)
    return np.frombuffer(zlib.decompress(p[3]), np.dtype(p[2])).reshape(p[1]).copy()


class DeviceNormalize:
    """The pipeline's final A.Normalize applied to a uint8 (B, 3, H, W) batch where it lands (the
    GPU): (x - mean * 255) * 1 / (std * 255) in float32, the LUT's arithmetic, so the batch is
    bit for bit the one the loader would have normalised. Workers then hand over a quarter of
    the bytes (a 640 px batch of 32 is 39 MB instead of 157 MB) and pin and copy a quarter."""

    def __init__(self, mean: np.ndarray, denominator: np.ndarray):
        self.mean = torch.as_tensor(np.asarray(mean, np.float32)).view(1, 3, 1, 1)
        self.denominator = torch.as_tensor(np.asarray(denominator, np.float32)).view(1, 3, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize expects a uint8 batch, got {images.dtype}")
        if images.device not in self._on:
            self._on[images.device] = (self.mean.to(images.device), self.denominator.to(images.device))
        mean, denominator = self._on[images.device]
        return (images.float() - mean) * denominator


class LoaderDataset(Dataset, abc.ABC):
    """Base of the tasks' datasets. Subclasses give `raw(i, extras)` -> {"image": (H, W, 3) uint8
    at the file's size and, with extras, what moves with it: "mask" (H, W), "masks" (N, H, W),
    "bboxes" (N, 4) with their "labels" and "instance_ids"} and
    `item(i, record, transform)` -> the training example. Keys may be an index or (index, seed)."""

    def __init__(self, samples: Sequence[Sample], transform, project_root: Path, decode: str = "full"):
        self.samples, self.root = list(samples), Path(project_root)
        self.decode = decode
        self.device_normalize: Optional[DeviceNormalize] = None  # set by defer_normalization
        self.transform = transform  # the full pipeline (what to_dict serialises); see split_transform
        self.cache_mode, self.cache_dir = "none", None
        self._images: dict[int, np.ndarray] = {}
        self._extras: dict[int, dict[str, tuple]] = {}

    @property
    def transform(self):
        return self._transform

    @transform.setter
    def transform(self, value) -> None:
        self._transform = value
        self._prefix, self._rest = split_transform(value)
        if self.device_normalize is not None:
            self.device_normalize = None
            self.defer_normalization()
        # the image alone through the prefix (its boxes, masks are in the cached record already)
        self._prefix_image = A.Compose(list(self._prefix.transforms)) if self._prefix is not None else None
        # JPEGs decoded at 1/2-1/8 scale where that stays at least the prefix's output (`read`)
        self.fit = decode_fit(self._prefix, self.decode)

    def read(self, path: Path) -> np.ndarray:
        """An image file as the model's other readers see it (ModelPredictor.read): load_rgb,
        JPEGs reduced under train.decode (`fit`)."""
        return load_rgb(path, self.fit)

    def __len__(self) -> int:
        return len(self.samples)

    def defer_normalization(self) -> Optional[DeviceNormalize]:
        """Items keep uint8 pixels and the pipeline's final A.Normalize moves to the batch on the
        device (`device_normalize`, which the training loop applies after the copy). None, and
        nothing changes, when the pipeline does not end in a standard A.Normalize."""
        if isinstance(self._rest, _NormalizedBy):
            self._rest.deferred = True
            self.device_normalize = DeviceNormalize(self._rest.mean, self._rest.denominator)
        return self.device_normalize

    @abc.abstractmethod
    def raw(self, i: int, extras: bool = True) -> dict[str, Any]:
        """The sample as decoded from its files (see the class docstring)."""

    @abc.abstractmethod
    def item(self, i: int, record: dict[str, np.ndarray], transform) -> Any:
        """The training example from a (cached) record and the rest of the pipeline."""

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self._get(key)
        with kept_globals():
            return self._get(key)

    def __getitems__(self, keys: Sequence) -> list:
        """A batch's examples (DataLoader's batched fetch): the same examples as one by one, with
        the global generators saved and restored once per batch instead of once per sample."""
        _in_place.filling = _BatchBuffer(len(keys)) if isinstance(self._rest, _NormalizedBy) else None
        try:
            if not any(isinstance(key, tuple) for key in keys):
                return [self._get(key) for key in keys]
            with kept_globals():
                return [self._get(key) for key in keys]
        finally:  # the collate's `stack` looks for it next
            _in_place.filled, _in_place.filling = _in_place.filling, None

    def _get(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        record = self.record(i)
        if seed is not None:
            seed_globals(seed)
            seed_pipeline(self._rest, seed)
        return self.item(i, record, self._rest)

    # --- the record (decoded, resized-to-fit image and its targets), cached ---
    def record(self, i: int) -> dict[str, np.ndarray]:
        extras = self._extras.get(i)
        image = self._images.get(i)
        if image is None and self.cache_mode == "disk":
            image = self._read_disk(i)
        if extras is None:
            rec = self.make_record(i, extras=True)
            self._extras[i] = {k: _pack(v) for k, v in rec.items() if k != "image"}
            if image is None:
                self._keep(i, rec["image"])
            return rec
        if image is None:
            image = self.make_record(i, extras=False)["image"]
            self._keep(i, image)
        return {"image": image, **{k: _unpack(v) for k, v in extras.items()}}

    def _keep(self, i: int, image: np.ndarray) -> None:
        if self.cache_mode == "ram":
            self._images[i] = image
        elif self.cache_mode == "disk":
            self._write_disk(i, image)

    def make_record(self, i: int, extras: bool = True) -> dict[str, np.ndarray]:
        """The sample's image (and, with extras, the targets that move with it) through the
        pipeline's deterministic prefix."""
        rec = self.raw(i, extras)
        prefix = self._prefix if extras else self._prefix_image
        out = prefix(**rec) if prefix is not None else rec
        return {k: np.asarray(v) for k, v in out.items() if k in rec}

    def _disk_path(self, i: int) -> Path:
        sha = self.samples[i].sha256 or f"id-{self.samples[i].id}"
        return Path(self.cache_dir) / f"v{CACHE_VERSION}-{self._prefix_key()}" / sha[:2] / f"{sha}.npy"

    def _prefix_key(self) -> str:
        import hashlib
        import json

        spec = json.dumps(A.to_dict(self._prefix) if self._prefix is not None else None, sort_keys=True, default=str)
        if self.fit is not None:  # reduced JPEG decodes are other pixels
            spec += "/decode: reduced"
        return hashlib.sha256(spec.encode()).hexdigest()[:12]

    def _read_disk(self, i: int) -> Optional[np.ndarray]:
        try:
            return np.load(self._disk_path(i), allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            return None

    def _write_disk(self, i: int, image: np.ndarray) -> None:
        path = self._disk_path(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, image, allow_pickle=False)
        os.replace(tmp, path)  # atomic: readers see the whole file or none

    # --- cache set-up (main process, before workers fork) ---
    def use_cache(self, mode: str, cache_dir: Optional[Path] = None, threads: int = 1,
                  available: Optional[Callable[[], int]] = None, what: str = "train.cache") -> None:
        self.cache_mode, self.cache_dir = mode, cache_dir
        if mode == "ram":
            need = self.estimate_bytes()
            free = (available or available_memory)()
            if need > RAM_SHARE * free:
                raise UserError(f"{what}: ram needs about {_size(need)} for {len(self)} decoded images, "
                                f"but {_size(free)} of memory is available; use cache: disk or none, "
                                f"or a smaller image_size")
            self._fill(threads)
        elif mode == "disk":
            if cache_dir is None:
                raise ValueError("cache: disk needs a cache folder")

    def estimate_bytes(self) -> int:
        """Decoded records' size in memory: the images at their record size (uint8)."""
        return sum(self._record_pixels(s) * 3 for s in self.samples)

    def _record_pixels(self, s: Sample) -> int:
        h, w = fitted_size(self._prefix, s.height, s.width)
        return h * w

    def _fill(self, threads: int) -> None:
        todo = [i for i in range(len(self)) if i not in self._images]
        with ThreadPoolExecutor(max(1, threads)) as pool:  # decoding releases the GIL
            for i, rec in zip(todo, pool.map(self.make_record, todo)):
                self._images[i] = rec["image"]
                self._extras[i] = {k: _pack(v) for k, v in rec.items() if k != "image"}


def fitted_size(prefix: Optional[A.Compose], height: int, width: int) -> tuple[int, int]:
    """(H, W) of an image of this size after the deterministic prefix."""
    for step in (prefix.transforms if prefix is not None else ()):
        if isinstance(step, A.Resize):
            height, width = step.height, step.width
        elif isinstance(step, (A.LongestMaxSize, A.SmallestMaxSize)) and isinstance(step.max_size, int):
            side = max(height, width) if isinstance(step, A.LongestMaxSize) else min(height, width)
            scale = step.max_size / side
            height, width = max(1, round(height * scale)), max(1, round(width * scale))
        elif isinstance(step, A.PadIfNeeded):
            height, width = max(height, step.min_height or 0), max(width, step.min_width or 0)
    return height, width


def _size(n: float) -> str:
    """A size in words: GiB from 1 GiB up (as before), else MiB as the shared-memory messages
    write them (batch_slots.in_mib), or KiB, so a small dataset's cache does not read "0.00 GiB"."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return in_mib(n)
    return f"{max(n, 0) / 2**10:.0f} KiB"


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or psutil's figure."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def load_image(path: Path) -> np.ndarray:
    return load_rgb(path)


def chw_tensor(image: np.ndarray) -> torch.Tensor:
    """An (H, W, C) image as a (C, H, W) tensor, without a copy where its memory allows:
    - a channel-first buffer seen as (H, W, C) (the LUT normalisation's output): contiguous;
    - a contiguous uint8 (H, W, C) image (normalisation deferred to the device): a view with
      channels-last strides, which `stack` batches as (B, H, W, C) memory; copied when it is
      read-only (a decoded record that no step changed: a tensor must not alias it, and torch
      warns about it);
    - anything else: a contiguous copy."""
    chw = image.transpose(2, 0, 1)
    if chw.flags.c_contiguous:
        return torch.from_numpy(chw)
    if image.dtype == np.uint8 and image.flags.c_contiguous:
        return torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(chw))


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 3 and not t.is_contiguous() and t.permute(1, 2, 0).is_contiguous()


def batch_memory(numel: int, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """A flat, unwritten buffer for a batch: in a loader worker shared memory (a slot of the
    worker's, batch_slots.py, or a fresh segment, populated); in the main process memory marked
    for 2 MiB pages on the CPU (a 39 MB batch faults 20 times, not 9,600)."""
    if get_worker_info() is not None:
        return shared_buffer(numel, dtype)
    out = torch.empty(numel, dtype=dtype, device=device)
    if out.device.type == "cpu":
        memory.advise_huge(out)
    return out


def stack(tensors: Sequence[torch.Tensor], pad: bool = False) -> torch.Tensor:
    """torch.stack; in a loader worker, straight into shared memory, as torch's default_collate
    does: the batch then crosses to the main process without another copy (a 640 px float
    batch of 32 is 157 MB). Images with channels-last strides (chw_tensor's uint8 views) are
    stacked as (B, H, W, C) memory, a plain copy, and returned as the (B, C, H, W) view of it:
    a channels_last batch, the same values.

    pad: images of different sizes (detect with resize: fit) are placed top-left in a batch as
    high and as wide as the largest, the rest 0 (as augment.batch_chw pads for prediction)."""
    hwc = _channels_last(tensors[0])
    parts = [t.permute(1, 2, 0) for t in tensors] if hwc else list(tensors)
    shape = tuple(parts[0].shape)
    ragged = pad and any(tuple(t.shape) != shape for t in parts)
    if ragged:
        spatial = (0, 1) if hwc else (1, 2)
        shape = tuple(max(t.shape[d] for t in parts) if d in spatial else n for d, n in enumerate(shape))
    in_place = None if ragged else _filled(parts)
    if in_place is not None:  # made in place by the dataset (_BatchBuffer): nothing to copy
        return in_place.permute(0, 3, 1, 2) if hwc else in_place
    first = parts[0]
    out = batch_memory(len(parts) * math.prod(shape), first.dtype, first.device).view(len(parts), *shape)
    if ragged:
        out.zero_()
        for o, t in zip(out, parts):
            o[tuple(slice(0, n) for n in t.shape)].copy_(t)
    else:
        torch.stack(parts, 0, out=out)
    return out.permute(0, 3, 1, 2) if hwc else out


class DeviceBatches:
    """A loader's (images, targets) batches with the images on `device`: copied non_blocking
    (pinned batches copy while the GPU still works on the last step), normalised there when the
    dataset deferred its normalisation (DeviceNormalize: uint8 batches), and image batches
    (B, C, H, W) in the memory format the model runs in (channels_last, or channel-first; the
    head's (B, D) feature batches of the feature cache have no channel axis and stay as they
    are). Targets too with move_targets (training), else as the loader gives them (the tasks'
    val_metrics and calibrate move what they use). One pass per iter(), like the loader;
    `dataset` and `len` are the loader's (any iterable of batches with a len will do)."""

    def __init__(self, loader, device: torch.device, channels_last: bool, move_targets: bool = False):
        self.loader, self.device, self.move_targets = loader, device, move_targets
        self.dataset = getattr(loader, "dataset", None)  # a plain list of batches has none
        self.normalize: Optional[DeviceNormalize] = getattr(self.dataset, "device_normalize", None)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        for images, targets in self.loader:
            images = images.to(self.device, non_blocking=True)
            if self.normalize is not None:
                images = self.normalize(images)
            if images.dim() == 4:
                images = images.contiguous(memory_format=self.memory_format)
            yield images, (move_to(targets, self.device) if self.move_targets else targets)


def move_to(obj: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Tensors (also inside lists, tuples and dicts) onto `device`; everything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: move_to(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device, non_blocking) for v in obj)
    return obj

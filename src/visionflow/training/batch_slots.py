"""Loader workers stack their batches into shared memory they reuse, not a fresh segment each.

A worker's batch crosses to the main process in shared memory (torch's collate does the same).
A fresh segment per batch means the kernel zeroes and maps every page of it again: 39 MB for a
640 px uint8 batch of 32, 0.6 ms an image on the 2-core benchmark machine, as much as a third of
the decode (docs/training-loader.md, "Memory"). With `BatchSlots` each worker keeps a few
segments ("slots") and stacks into a free one:

- The first time a slot crosses, its storage goes by file descriptor, as torch sends any shared
  tensor, and the receiving process keeps its mapping. After that a batch is only
  (worker, slot, shape, strides).
- The receiving process (the main process, or its pin-memory thread) copies the batch out of
  the slot as it unpickles it, into pinned memory when the loader pins, and only then frees the
  slot. So no consumer ever holds memory a worker will write again, whatever it keeps.
- A worker that finds none of its slots free (the main process has not taken its earlier
  batches yet) stacks into a fresh segment, as before. Nothing waits.
- A slot whose tensor does not come out of the collate as a plain tensor of the result (a tuple,
  list or dict of them), or comes out twice, is retired: it goes as torch sends any shared
  tensor and is never written again.
- Small tensors of the result (up to 64 KiB: labels, a detector's boxes) cross by value.
  torch would put each in a shared-memory segment of its own and pass its file descriptor
  over a socket: two per image for a detector's targets.

The copy replaces the pin copy on CUDA. On the CPU, the main process copies where it used to
fault the fresh segment's pages in. `VISIONFLOW_LOADER_MEMORY=default` turns the slots off
with the rest of memory.py's measures.
"""
from __future__ import annotations

import math
import os
import threading
import uuid
import weakref
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp
from torch.utils.data import get_worker_info

from visionflow.training import memory

# this process's BatchSlots by token: a worker's (one), and the main process's (one per loader)
_LIVE: "weakref.WeakValueDictionary[str, BatchSlots]" = weakref.WeakValueDictionary()
_worker_slots: Optional["BatchSlots"] = None  # set in a loader worker by WorkerInit


class BatchSlots:
    """The slots of one loader's workers: `per_worker` each at most, allocated as needed.
    Created in the main process with the loader; its workers get it through worker_init_fn
    (WorkerInit), forked or pickled."""

    def __init__(self, workers: int, per_worker: int, pin: bool = False, context: Optional[str] = None):
        self.token, self.workers, self.per_worker, self.pin = uuid.uuid4().hex, workers, per_worker, pin
        # 1 while a slot holds a batch its consumer has not copied out yet (shared, under `lock`:
        # its acquire and release order the copy before the slot's reuse on any CPU)
        self.busy = torch.zeros(workers * per_worker, dtype=torch.uint8).share_memory_()
        self.lock = mp.get_context(context).Lock()  # the loader's multiprocessing context (its default)
        self._setup()

    def _setup(self) -> None:
        self.worker: Optional[int] = None
        self._own: list[Optional[torch.UntypedStorage]] = [None] * self.per_worker  # a worker's slots
        self._sent: list[bool] = [False] * self.per_worker  # whether the consumer has the slot's storage
        self._made = 0  # storages this worker made: with its pid, each storage's name
        self._name: list[tuple[int, int]] = [(0, 0)] * self.per_worker
        self._claimed: dict[int, int] = {}  # data_ptr -> slot, claimed in the collate running now
        # consumer: (worker, slot) -> (the storage's name, the storage)
        self._received: dict[tuple[int, int], tuple[tuple[int, int], torch.UntypedStorage]] = {}
        self._received_lock = threading.Lock()  # the pin-memory thread and the main thread may both receive
        _LIVE[self.token] = self

    def __getstate__(self) -> dict[str, Any]:  # to a spawned worker: the shared flags and the lock
        return {k: getattr(self, k) for k in ("token", "workers", "per_worker", "pin", "busy", "lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    # --- in a worker ---
    def start_worker(self, worker_id: int) -> None:
        global _worker_slots
        self.worker = worker_id
        with self.lock:  # a worker started afresh: whatever its predecessor left in flight is not received
            self.busy[worker_id * self.per_worker:(worker_id + 1) * self.per_worker] = 0
        _worker_slots = self

    def claim(self, nbytes: int) -> Optional[torch.UntypedStorage]:
        """A free slot's storage of at least nbytes, marked busy until its consumer copies the
        batch out; None when every slot is busy."""
        base = self.worker * self.per_worker
        with self.lock:
            free = [k for k in range(self.per_worker) if not self.busy[base + k]]
            if not free:
                return None
            # a slot big enough, else one not allocated yet, else the first free (grown)
            fits = [k for k in free if self._own[k] is not None and self._own[k].nbytes() >= nbytes]
            empty = [k for k in free if self._own[k] is None]
            k = (fits or empty or free)[0]
            self.busy[base + k] = 1
        if self._own[k] is None or self._own[k].nbytes() < nbytes:
            self._own[k] = torch.UntypedStorage._new_shared(nbytes)
            self._sent[k], self._made = False, self._made + 1
            self._name[k] = (os.getpid(), self._made)
            memory.populate(torch.empty(0, dtype=torch.uint8).set_(self._own[k]))
        self._claimed[self._own[k].data_ptr()] = k
        return self._own[k]

    def emit(self, result: Any) -> Any:
        """The collate's result as it crosses to the consumer: each tensor in a claimed slot
        replaced by a _SlotBatch, each small tensor by its bytes (_Inline). Only plain tuples,
        lists and dicts are looked into; slots claimed but not emitted exactly once are retired."""
        seen: dict[int, int] = {}

        def count(x: Any) -> None:
            if isinstance(x, torch.Tensor):
                ptr = x.untyped_storage().data_ptr()
                if ptr in self._claimed:
                    seen[ptr] = seen.get(ptr, 0) + 1
            else:
                for v in _children(x):
                    count(v)

        def swap(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                ptr = x.untyped_storage().data_ptr()
                if ptr in self._claimed:
                    if seen[ptr] != 1:
                        return x
                    k = self._claimed[ptr]
                    new = not self._sent[k]
                    self._sent[k] = True
                    return _SlotBatch(self.token, self.worker, k, self._name[k], self._own[k] if new else None,
                                      x.dtype, tuple(x.shape), x.stride(), x.storage_offset())
                return _Inline(x) if _inline(x) else x
            if type(x) is dict:
                return {k: swap(v) for k, v in x.items()}
            if type(x) in (tuple, list):
                return type(x)(swap(v) for v in x)
            return x

        count(result)
        try:
            return swap(result)
        finally:
            for ptr, k in self._claimed.items():
                if seen.get(ptr) != 1:  # kept elsewhere, or twice: torch sends it; never reused
                    self._own[k] = None
                    with self.lock:
                        self.busy[self.worker * self.per_worker + k] = 0
            self._claimed.clear()

    # --- in the consumer (main process, or its pin-memory thread) ---
    def receive(self, worker: int, slot: int, name: tuple[int, int], storage: Optional[torch.UntypedStorage],
                dtype: torch.dtype, shape: tuple, stride: tuple, offset: int) -> torch.Tensor:
        with self._received_lock:
            if storage is not None:
                self._received[(worker, slot)] = (name, storage)
            else:
                known, storage = self._received.get((worker, slot), (None, None))
                if known != name:  # its storage never arrived: never guess which memory to read
                    raise RuntimeError(f"loader worker {worker}'s batch slot {slot} ({name}) was never received "
                                       f"here (have {known}); set VISIONFLOW_LOADER_MEMORY=default to work "
                                       f"around it, and report it")
        view = torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
        out = None
        if self.pin and torch.cuda.is_available():
            try:
                out = torch.empty_like(view, pin_memory=True)
            except RuntimeError:
                out = None
        if out is None:
            out = torch.empty_like(view)
            memory.advise_huge(out)
        out.copy_(view)
        with self.lock:
            self.busy[worker * self.per_worker + slot] = 0
        return out


INLINE_BYTES = 64 << 10  # tensors up to this size cross by value, not each in a segment of its own


def _children(x: Any) -> tuple:
    """What emit looks into: the items of plain tuples, lists and dicts (as swap rebuilds them)."""
    if type(x) is dict:
        return tuple(x.values())
    return tuple(x) if type(x) in (tuple, list) else ()


_BY_VALUE = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
             torch.float32, torch.float64)  # the dtypes numpy holds as they are


def _inline(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dtype in _BY_VALUE and not t.requires_grad and t.layout == torch.strided
            and t.numel() * t.element_size() <= INLINE_BYTES)


class _Inline:
    """A small tensor (a batch's labels, a detector's boxes) crossing by value. torch sends every
    CPU tensor in a shared-memory segment of its own with a file descriptor: for a detector's
    targets that is two segments an image, about 10 ms of the training process's time a batch of
    32 and 18 ms of wall time, against under 1 ms by value."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __reduce__(self):
        t = self.t.contiguous()
        return _rebuild_inline, (t.numpy().tobytes(), t.dtype, tuple(t.shape))


def _rebuild_inline(data: bytes, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


class _SlotBatch:
    """A batch in a worker's slot, as it crosses to the consumer; unpickled there as a copy."""

    __slots__ = ("token", "worker", "slot", "name", "storage", "dtype", "shape", "stride", "offset")

    def __init__(self, token, worker, slot, name, storage, dtype, shape, stride, offset):
        self.token, self.worker, self.slot, self.name, self.storage = token, worker, slot, name, storage
        self.dtype, self.shape, self.stride, self.offset = dtype, shape, stride, offset

    def __reduce__(self):
        return _receive, (self.token, self.worker, self.slot, self.name, self.storage, self.dtype, self.shape,
                          self.stride, self.offset)


def _receive(token, worker, slot, name, storage, dtype, shape, stride, offset) -> torch.Tensor:
    slots = _LIVE.get(token)
    if slots is None:
        raise RuntimeError("a loader batch arrived after its loader was closed")
    return slots.receive(worker, slot, name, storage, dtype, shape, stride, offset)


def shared_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat shared-memory tensor for a worker's batch: a free slot's memory where the loader has
    slots, else a fresh segment (populated in one call), as torch's collate allocates."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    storage = _worker_slots.claim(nbytes) if _worker_slots is not None and get_worker_info() is not None else None
    if storage is None:
        storage = torch.UntypedStorage._new_shared(nbytes)
        out = torch.empty(0, dtype=dtype).set_(storage, 0, (numel,), (1,))
        memory.populate(out)
        return out
    return torch.empty(0, dtype=dtype).set_(storage, 0, (numel,), (1,))


class SlotCollate:
    """A loader's collate_fn whose results leave a worker through its BatchSlots (no change with 0
    workers or without slots). Picklable."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, batch: list) -> Any:
        slots = _worker_slots if get_worker_info() is not None else None
        try:
            result = self.collate(batch)
        except BaseException:
            if slots is not None:
                slots.emit(None)  # what it claimed is retired
            raise
        return slots.emit(result) if slots is not None else result


def slots_for(workers: int, prefetch_factor: int, pin: bool) -> Optional[BatchSlots]:
    """A loader's slots: enough for each worker's batches in flight (prefetch_factor, plus the one
    being stacked) with two stacked tensors each (images and masks); None with 0 workers or with
    memory.py's measures turned off."""
    if not workers or not memory.enabled():
        return None
    return BatchSlots(workers, per_worker=2 * (prefetch_factor + 1), pin=pin)




# --- how much shared memory the workers' batches need ---------------------------------------

SHM = "/dev/shm"  # where torch's shared-memory segments (and so the slots) live on Linux


def shm_space(path: str = SHM) -> Optional[tuple[int, int]]:
    """(free, total) bytes of the shared-memory filesystem, or None where there is none."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def in_flight(workers: int, prefetch_factor: int, batch_bytes: int, processes: int = 1) -> int:
    """Bytes of the workers' batches alive at once: each worker's prefetched batches and the one
    being received, for every training process on the machine (torchrun's local ranks)."""
    return processes * workers * (prefetch_factor + 1) * batch_bytes


def shm_shortfall(need: int, space: Optional[tuple[int, int]]) -> Optional[str]:
    """What to do when the batches in flight need more shared memory than is free; None when they
    fit, or where there is no such filesystem to ask."""
    if space is None or need <= space[0]:
        return None
    free, total = space
    size = f"{max(1, math.ceil(1.5 * need / 2**30))}g"
    return (f"the loader workers' batches in flight need about {in_mib(need)} of shared memory, but {SHM} has "
            f"{in_mib(free)} free of {in_mib(total)}, so the workers would die with a bus error. In Docker, start the "
            f"container with --shm-size={size} (or --ipc=host); or lower num_workers or batch_size")


def in_mib(n: float) -> str:
    """A size in MiB, to a tenth below 10 MiB (also the loader's sizes between 1 MiB and 1 GiB)."""
    return f"{n / 2**20:,.1f} MiB" if n < 10 << 20 else f"{n / 2**20:,.0f} MiB"


def tensor_bytes(x: Any) -> int:
    """Bytes of the tensors in a collated batch (plain tuples, lists and dicts looked into)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(tensor_bytes(v) for v in _children(x))

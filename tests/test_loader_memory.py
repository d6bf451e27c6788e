"""The loader's page-fault relief (visionflow.training.memory) and its batched fetch.

The allocator settings are process-wide and sticky, so their checks run in fresh subprocesses
and read glibc's own account of its heap (mallinfo2): with the tuning, blocks up to 32 MiB come
from the heap and stay there for reuse once freed; without it, the freed pages go back.
"""
from __future__ import annotations

import json
import mmap
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_loader as T  # noqa: E402

from visionflow.tasks import get_task  # noqa: E402
from visionflow.training import memory  # noqa: E402

GLIBC = memory._libc() is not None

_HEAP_PROBE = r"""
import ctypes, json, sys
import numpy as np
from visionflow.training import memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
tuned = memory.tune_allocator()
again = memory.tune_allocator()
mapped_before = libc.mallinfo2().hblks  # what the imports mapped already
# an item's arrays (48 of 1 MiB) and two batches of 24 MiB, all alive at once
blocks = [np.ones(1 << 20, np.uint8) for _ in range(48)] + [np.ones(24 << 20, np.uint8) for _ in range(2)]
mapped = libc.mallinfo2().hblks - mapped_before
del blocks
info = libc.mallinfo2()
print(json.dumps({"tuned": tuned, "again": again, "mapped_while_alive": mapped,
                  "free_in_heap_after": info.fordblks}))
"""


def _probe(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != memory.OPT_OUT}
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, timeout=120,
                         env={**clean, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator settings exist only with glibc on Linux")
def test_tuned_allocator_serves_megabyte_blocks_from_the_heap_and_keeps_them_for_reuse():
    tuned = _probe()
    assert tuned["tuned"] is True and tuned["again"] is True
    assert tuned["mapped_while_alive"] == 0  # no block was a fresh mapping
    assert tuned["free_in_heap_after"] >= 90 << 20  # freed, kept: the next items reuse these pages
    default = _probe(**{memory.OPT_OUT: "default"})
    assert default["tuned"] is False
    # glibc's default gives the freed pages back (or never had them in its heap): the next item
    # faults them in again
    assert default["free_in_heap_after"] < 8 << 20


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator settings exist only with glibc on Linux")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_allocator_left_to_the_user_who_set_it(env):
    assert _probe(**env)["tuned"] is False


def _vm_flags(addr: int) -> list[str]:
    """The kernel's flags of the mapping holding `addr` (/proc/self/smaps VmFlags; "hg": advised
    for huge pages)."""
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(maxsplit=1)[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not GLIBC, reason="madvise through glibc on Linux")
def test_advise_huge_marks_big_batches_only_and_the_opt_out_turns_it_off(monkeypatch):
    small = torch.empty(1 << 20, dtype=torch.uint8)
    assert memory.advise_huge(small) is False  # under 2 huge pages: left alone
    middle = torch.empty(16 << 20, dtype=torch.uint8)
    monkeypatch.setattr(memory, "_tuned", True)  # under the tuned mmap threshold: reused heap pages
    assert memory.advise_huge(middle) is False
    monkeypatch.setattr(memory, "_tuned", False)  # glibc's own threshold: possibly a fresh mapping
    assert memory.advise_huge(middle) is True
    # A fresh mapping of its own, as glibc gives a batch over its mmap threshold when its heap has
    # no free chunk that large. (In a long-running process glibc may serve 48 MiB from freed heap
    # memory instead, which an earlier batch's advice may have flagged already: not a fresh buffer.)
    big, _keep = _fresh_mapping(48 << 20)
    inner = big.data_ptr() + (8 << 20)
    assert "hg" not in _vm_flags(inner)
    assert memory.advise_huge(big) is True
    # the advice is on the mapping (the kernel then gives 2 MiB pages where transparent huge pages
    # are `always` or `madvise` and it finds free ones: best effort, so not asserted)
    assert "hg" in _vm_flags(inner)
    big.fill_(7)
    assert int(big[::4096].sum()) == 7 * big[::4096].numel()  # the bytes are what was written
    monkeypatch.setenv(memory.OPT_OUT, "default")
    plain, _keep_plain = _fresh_mapping(48 << 20)
    assert memory.advise_huge(plain) is False and "hg" not in _vm_flags(plain.data_ptr() + (8 << 20))


def _fresh_mapping(n: int) -> tuple[torch.Tensor, mmap.mmap]:
    """A uint8 tensor over a new anonymous mapping of n bytes (keep the mmap alive with it)."""
    buf = mmap.mmap(-1, n)
    return torch.frombuffer(buf, dtype=torch.uint8), buf


@pytest.mark.skipif(not GLIBC, reason="madvise through glibc on Linux")
def test_populate_prepares_a_shared_batch_without_changing_it():
    first = torch.zeros(640, 640, 3, dtype=torch.uint8)
    storage = first._typed_storage()._new_shared(16 * first.numel(), device="cpu")
    out = first.new(storage).resize_(16, 640, 640, 3)
    major, minor = (int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    assert memory.populate(out) is ((major, minor) >= (5, 14))  # MADV_POPULATE_WRITE came in 5.14
    parts = [torch.full((640, 640, 3), i, dtype=torch.uint8) for i in range(16)]
    torch.stack(parts, 0, out=out)
    assert [int(out[i, 320, 320, 1]) for i in range(16)] == list(range(16))


def test_batched_fetch_gives_the_single_fetch_items_and_leaves_the_generators_alone(tmp_path):
    """DataLoader fetches a batch with __getitems__: the same examples, bit for bit, as fetching
    them one by one, and the main process's generators as they were (saved once per batch)."""
    params = T._params()
    task = get_task("classify", params)
    ds = task.build_dataset(T._same_image_samples(tmp_path, 6), task.build_transforms(params)[0], tmp_path)
    keys = [(i, 1000 + 17 * i) for i in range(6)]
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    batch = ds.__getitems__(keys)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    single = [ds[k] for k in keys]
    for (image, label), (image1, label1) in zip(batch, single, strict=True):
        assert torch.equal(image, image1) and label == label1
    assert len({image.numpy().tobytes() for image, _ in batch}) == 6  # each sample its own draw
    evals = task.build_dataset(T._same_image_samples(tmp_path, 2), task.build_transforms(params)[1], tmp_path)
    unseeded = evals.__getitems__([0, 1])  # validation's keys: no seeding, the items of evals[0], evals[1]
    assert all(torch.equal(image, evals[i][0]) for i, (image, _) in enumerate(unseeded))

"""Fashion-MNIST IDX files -> ImageFolder tree, on synthetic IDX files and on the Debian package."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.datasets.fashion_mnist import CLASSES, SOURCE_DIR, read_idx, write_fashion_mnist
from visionflow.core.errors import DataError
from visionflow.formats.imagefolder import read_imagefolder


def write_idx(path: Path, magic: int, array: np.ndarray, dims: tuple[int, ...] | None = None) -> None:
    dims = array.shape if dims is None else dims
    header = struct.pack(f">I{len(dims)}I", magic, *dims)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def fake_source(folder: Path, train_labels=(0, 9, 0, 3, 0, 9, 7), test_labels=(9, 1, 0)) -> dict:
    """IDX files as the Debian package names them: random 28x28 images, chosen labels."""
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, labels in (("train", train_labels), ("t10k", test_labels)):
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, np.array(labels))
        arrays[prefix] = (images, np.array(labels))
    return arrays


def test_tree_labels_and_pixels_equal_the_idx_bytes(tmp_path):
    arrays = fake_source(tmp_path / "idx")
    out = tmp_path / "fmnist"
    info = write_fashion_mnist(out, tmp_path / "idx")
    assert info["images"] == {"train": 7, "test": 3}
    assert info["per_class"]["train"]["tshirt_top"] == 3 and info["per_class"]["test"]["ankle_boot"] == 1
    assert (out / "classes.txt").read_text().splitlines() == list(CLASSES)
    assert sorted(p.relative_to(out).as_posix() for p in (out / "train").rglob("*.png")) == [
        "train/ankle_boot/00002.png", "train/ankle_boot/00006.png", "train/dress/00004.png",
        "train/sneaker/00007.png", "train/tshirt_top/00001.png", "train/tshirt_top/00003.png",
        "train/tshirt_top/00005.png"]
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[prefix]
        for i, label in enumerate(labels):
            with Image.open(out / split / CLASSES[label] / f"{i + 1:05d}.png") as img:
                assert img.format == "PNG" and img.mode == "L"
                np.testing.assert_array_equal(np.asarray(img), images[i])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    # ImageFolder reads it back: ids are the official labels, splits are attributes.
    res = read_imagefolder(out, out, "fashion")
    assert [c.name for c in res.categories] == list(CLASSES) and res.report.total == 0
    got = sorted((s.attributes["split"], s.path.rsplit("/", 1)[1], s.labels[0]) for s in res.samples)
    want = sorted([("train", f"{i + 1:05d}.png", int(v)) for i, v in enumerate(arrays["train"][1])]
                  + [("test", f"{i + 1:05d}.png", int(v)) for i, v in enumerate(arrays["t10k"][1])])
    assert got == want and {(s.width, s.height) for s in res.samples} == {(28, 28)}


def test_limit_determinism_and_replacement(tmp_path):
    fake_source(tmp_path / "idx")
    out = tmp_path / "fmnist"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    info = write_fashion_mnist(out, tmp_path / "idx", limit_per_class=2)
    assert info["per_class"]["train"]["tshirt_top"] == 2 and info["images"] == {"train": 6, "test": 3}
    assert not (out / "stale.txt").exists() and (out / "train/tshirt_top/00003.png").exists()
    assert not (out / "train/tshirt_top/00005.png").exists()
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_fashion_mnist(tmp_path / "again", tmp_path / "idx", limit_per_class=2)
    again = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again").rglob("*")
             if p.is_file()}
    assert again == first
    with pytest.raises(ValueError, match="limit_per_class must be >= 1"):
        write_fashion_mnist(out, tmp_path / "idx", limit_per_class=0)


def test_bad_idx_files_are_named(tmp_path):
    src = tmp_path / "idx"
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: Fashion-MNIST file not found "
                                        r"\(.*apt-get install dataset-fashion-mnist\)"):
        write_fashion_mnist(tmp_path / "out", src)
    fake_source(src)
    labels = src / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels, 2051, np.array([1, 2, 3]))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: IDX magic number is 2051, expected 2049"):
        write_fashion_mnist(tmp_path / "out", src)
    write_idx(labels, 2049, np.array([1, 2, 3]), dims=(4,))
    with pytest.raises(DataError, match=r"t10k-labels.*header declares 4 = 4 bytes of data, the file has 3"):
        write_fashion_mnist(tmp_path / "out", src)
    write_idx(labels, 2049, np.array([1, 2]))
    with pytest.raises(DataError, match=r"t10k-labels.*: 2 labels for 3 images in t10k-images-idx3-ubyte\.gz"):
        write_fashion_mnist(tmp_path / "out", src)
    write_idx(labels, 2049, np.array([1, 12, 3]))
    with pytest.raises(DataError, match=r"t10k-labels.* \[record 2\]: label 12 is not a Fashion-MNIST class"):
        write_fashion_mnist(tmp_path / "out", src)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"t10k-labels.*: not a readable \.gz file"):
        write_fashion_mnist(tmp_path / "out", src)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_real_package(tmp_path):
    if not (SOURCE_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{SOURCE_DIR} not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "fmnist"
    info = write_fashion_mnist(out, limit_per_class=5)
    assert info["images"] == {"train": 50, "test": 50}
    assert all(n == 5 for split in info["per_class"].values() for n in split.values())
    labels = read_idx(SOURCE_DIR / "train-labels-idx1-ubyte.gz", 2049, ndim=1)
    assert len(labels) == 60000 and CLASSES[labels[0]] == "ankle_boot"  # the first training image
    images = read_idx(SOURCE_DIR / "train-images-idx3-ubyte.gz", 2051, ndim=3)
    with Image.open(out / "train/ankle_boot/00001.png") as img:
        np.testing.assert_array_equal(np.asarray(img), images[0])
    res = read_imagefolder(out, out, "fashion")
    assert len(res.samples) == 100 and res.report.total == 0
    assert [c.name for c in res.categories] == list(CLASSES)

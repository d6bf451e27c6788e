"""Fashion-MNIST (Zalando, 70,000 28x28 greyscale product photos, 10 classes) as an ImageFolder tree.

Real data without downloads: the Debian package `dataset-fashion-mnist` installs the four
original IDX files in /usr/share/datasets/fashion-mnist/:

    train-images-idx3-ubyte.gz  magic 2051, n=60000, 28, 28, then n*28*28 uint8 pixels
    train-labels-idx1-ubyte.gz  magic 2049, n=60000, then n uint8 labels 0..9
    t10k-images-idx3-ubyte.gz   the same for the 10,000 test images
    t10k-labels-idx1-ubyte.gz

(IDX: big-endian uint32 magic, then one big-endian uint32 per dimension, then the data.)

Written under `out` (readable by `visionflow.formats.imagefolder.read_imagefolder`):

    classes.txt                    the 10 folder names below, in label order (ids 0..9)
    train/<class>/00001.png        8-bit greyscale PNG; the number is the record's 1-based
    test/<class>/00001.png         index in its IDX file, so every file traces back to it

Official label -> folder name (lower case, "/" and "-" replaced, spaces to "_"):

    0 T-shirt/top -> tshirt_top   1 Trouser -> trouser   2 Pullover -> pullover
    3 Dress -> dress              4 Coat -> coat         5 Sandal -> sandal
    6 Shirt -> shirt              7 Sneaker -> sneaker   8 Bag -> bag
    9 Ankle boot -> ankle_boot

The tree is built in a temporary sibling folder and renamed into place, so `out` is either the
previous tree or the complete new one. The same inputs give byte-identical files.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.core.files import write_dir

SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install the Debian package: apt-get install dataset-fashion-mnist"
CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle_boot")
# split folder -> IDX file prefix
SPLITS = {"train": "train", "test": "t10k"}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049


def write_fashion_mnist(out: Path, source_dir: Path = SOURCE_DIR,
                        limit_per_class: Optional[int] = None) -> dict:
    """Write the ImageFolder tree to `out` (replacing it); return what was written.

    `limit_per_class` keeps the first N images of each class in each split (file order), for
    quick runs. Returns {"out", "source", "classes", "images": {split: n},
    "per_class": {split: {class: n}}}.
    """
    out, source_dir = Path(out), Path(source_dir)
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class must be >= 1, got {limit_per_class}")
    data = {split: read_idx_pair(source_dir, prefix) for split, prefix in SPLITS.items()}
    per_class: dict[str, dict[str, int]] = {}

    def fill(tmp: Path) -> None:
        (tmp / "classes.txt").write_text("".join(c + "\n" for c in CLASSES), encoding="utf-8")
        for split, (images, labels) in data.items():
            per_class[split] = _write_split(tmp / split, images, labels, limit_per_class)

    write_dir(out, fill)
    return {"out": str(out), "source": str(source_dir), "classes": list(CLASSES),
            "images": {split: sum(counts.values()) for split, counts in per_class.items()},
            "per_class": per_class}


def _write_split(folder: Path, images: np.ndarray, labels: np.ndarray, limit: Optional[int]) -> dict[str, int]:
    counts = dict.fromkeys(CLASSES, 0)
    for name in CLASSES:
        (folder / name).mkdir(parents=True)  # a class without images still has its folder
    digits = max(5, len(str(len(labels))))
    for i, label in enumerate(labels):
        name = CLASSES[label]
        if limit is not None and counts[name] >= limit:
            continue
        # Plain PNG (no optimize, no metadata): same pixels -> same bytes.
        Image.fromarray(images[i]).save(folder / name / f"{i + 1:0{digits}d}.png")  # (H, W) uint8: mode L
        counts[name] += 1
    return counts


def read_idx_pair(source_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,) uint8) of `<prefix>-images/labels-idx?-ubyte.gz`."""
    images_file = source_dir / f"{prefix}-images-idx3-ubyte.gz"
    labels_file = source_dir / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx(images_file, IMAGES_MAGIC, ndim=3)
    labels = read_idx(labels_file, LABELS_MAGIC, ndim=1)
    if len(images) != len(labels):
        raise DataError(labels_file, f"{len(labels)} labels for {len(images)} images in {images_file.name}",
                        hint=f"the files are from different releases; {INSTALL_HINT}")
    bad = np.flatnonzero(labels >= len(CLASSES))
    if bad.size:
        raise DataError(labels_file, f"label {labels[bad[0]]} is not a Fashion-MNIST class (0..9)",
                        record=f"record {bad[0] + 1}", hint=INSTALL_HINT)
    return images, labels


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file (gzipped) as an array of shape (dims...)."""
    if not path.is_file():
        raise DataError(path, "Fashion-MNIST file not found", hint=INSTALL_HINT)
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:  # not gzip, or truncated
        raise DataError(path, f"not a readable .gz file ({exc})", hint=INSTALL_HINT) from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(path, f"too short for an IDX header ({len(raw)} bytes)", hint=INSTALL_HINT)
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise DataError(path, f"IDX magic number is {found}, expected {magic}", hint=INSTALL_HINT)
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(path, f"header declares {' x '.join(map(str, dims))} = {expected} bytes of data, "
                              f"the file has {len(raw) - header}", hint=INSTALL_HINT)
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)

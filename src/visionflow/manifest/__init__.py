"""The canonical dataset: one record per image, whatever format it came from.

Schema (one JSON object per line of `manifest.jsonl`, see docs/manifest.md):

    id          str    stable sample id, "<source>/<path>"
    root        str    image root of the source (as given in params, project-relative or absolute)
    path        str    image path relative to `root`, POSIX separators, never absolute or with ".."
    width       int    pixels, after EXIF orientation
    height      int
    sha256      str    hex digest of the image file bytes
    labels      [int]  image-level category ids (classification); may be empty
    instances   [Instance]
    group       str    grouping key for leakage-free splits (defaults to the id)
    attributes  {}     free-form, format-specific extras kept for round trips

    Instance:
    bbox        [x1, y1, x2, y2]  absolute pixels, float, x right / y down, x2 > x1, y2 > y1
    category_id int               index into the category table (0..K-1, contiguous)
    polygons    [[x, y, x, y, ...]]  absolute pixels, each ring >= 3 points; may be empty
    rle         {"size": [h, w], "counts": str|[int]} | None  COCO RLE (crowd or mask instances)
    iscrowd     bool
    area        float | None
    attributes  {}

Category table (`categories.json`): [{"id": 0, "name": "circle", "supercategory": "shape",
"source_ids": {"shapes": 1}}, ...]; ids are contiguous so they index model outputs directly.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from visionflow.core.files import atomic_path, read_json, write_json

SCHEMA_VERSION = 1


@dataclass
class Instance:
    bbox: list[float]
    category_id: int
    polygons: list[list[float]] = field(default_factory=list)
    rle: Optional[dict[str, Any]] = None
    iscrowd: bool = False
    area: Optional[float] = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    id: str
    root: str
    path: str
    width: int
    height: int
    sha256: str
    labels: list[int] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)
    group: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)

    def image_path(self, project_root: Path = Path(".")) -> Path:
        root = Path(self.root)
        return (root if root.is_absolute() else project_root / root) / self.path

    def to_dict(self) -> dict[str, Any]:
        # Shallow copies, not dataclasses.asdict: asdict deep-copies every list, which was a
        # sixth of ingest's time on 10k images. The result is only serialised, never mutated.
        d = dict(vars(self))
        d["instances"] = [dict(vars(i)) for i in self.instances]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sample":
        d = dict(d)
        d["instances"] = [Instance(**i) for i in d.get("instances", [])]
        return cls(**d)


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str = ""
    source_ids: dict[str, int] = field(default_factory=dict)


def write_manifest(path: str | Path, samples: Iterable[Sample]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps(s.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n")
            n += 1
    return n


def read_manifest(path: str | Path) -> list[Sample]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: manifest not found; run the ingest stage first (visionflow stage ingest)")
    samples = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                samples.append(Sample.from_dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a manifest record ({exc}); re-run ingest") from exc
    return samples


def write_categories(path: str | Path, categories: list[Category]) -> None:
    ids = [c.id for c in categories]
    assert ids == list(range(len(ids))), f"category ids must be contiguous from 0, got {ids}"
    write_json(path, {"schema_version": SCHEMA_VERSION, "categories": [asdict(c) for c in categories]})


def read_categories(path: str | Path) -> list[Category]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: category table not found; run the ingest stage first")
    return [Category(**c) for c in read_json(path)["categories"]]


def image_label(sample: Sample) -> Optional[int]:
    """The class of an image for classification: its first image-level label, else the
    category of its largest non-crowd instance (so any detection dataset can train a classifier)."""
    if sample.labels:
        return sample.labels[0]
    best, best_area = None, -1.0
    for inst in sample.instances:
        if inst.iscrowd:
            continue
        x1, y1, x2, y2 = inst.bbox
        area = (x2 - x1) * (y2 - y1)
        if area > best_area:
            best, best_area = inst.category_id, area
    return best


def objects_per_image(samples: Sequence[Sample]) -> float:
    """The mean number of non-crowd instances an image holds (what a detector trains on: one
    target, and with Mask R-CNN one mask, each); 0 for no samples."""
    return sum(sum(not k.iscrowd for k in s.instances) for s in samples) / max(1, len(samples))


# --- split assignment (data/processed/split.json) ---
# {"schema_version": 1, "seed": 0, "splits": {"train": [ids], "val": [ids], "test": [ids]}}
SPLITS = ("train", "val", "test")
# Folder names that exporters use for a split (Roboflow's "valid", Keras' "validation"), -> SPLITS.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def write_split(path: str | Path, splits: dict[str, list[str]], seed: int) -> None:
    write_json(path, {"schema_version": SCHEMA_VERSION, "seed": seed,
                      "splits": {k: sorted(splits.get(k, [])) for k in SPLITS}})


def read_split(path: str | Path) -> dict[str, list[str]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: split assignment not found; run the split stage first")
    return read_json(path)["splits"]


def samples_in_split(samples: list[Sample], split_file: str | Path, split: str) -> list[Sample]:
    wanted = set(read_split(split_file)[split])
    return [s for s in samples if s.id in wanted]

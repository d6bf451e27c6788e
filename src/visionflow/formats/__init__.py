"""Annotation formats behind one contract: each format is one module with a reader and a writer.

Reader: `read(images_root, annotations, source, root=None) -> FormatResult`
    images_root  Path  where the images are on disk (already resolved against the project root)
    annotations  Path  the annotation file (or folder, for formats that have one file per image)
    source       str   source name; sample ids are "<source>/<path>"
    root         str   what to record in `Sample.root` (the images root as written in params);
                       defaults to `images_root` as a POSIX string

    The result's category ids are the SOURCE's ids (`Category.source_ids == {source: id}`) and
    the samples' `labels` / `Instance.category_id` use them too; the ingest stage merges sources
    by category name and remaps to contiguous ids. Boxes are canonical (absolute xyxy pixels).
    Structural errors (bad JSON, unsafe paths, dangling ids) raise `DataError`; recoverable
    problems are fixed or dropped by the format's stated policy and counted in the report.

Writer: `write(samples, categories, out_dir, project_root=Path("."), copy_images=True,
               report=None) -> Path`
    Writes the format into `out_dir` (ids written as they are in `categories`); with
    `copy_images` the images are copied to `out_dir/<Sample.path>` so `out_dir` is a
    self-contained dataset that the reader can read back. Returns the annotation path.
    Lossless by default: whatever the format cannot hold (RLE in YOLO, attributes, crowd
    regions, ...) is counted in `report` (a ConversionReport with the writer's own loss
    policies, e.g. {"attributes_dropped": "instance attributes are not written"}), never
    dropped silently.

Every reader applies the shared checks below in the same way: `safe_relpath` + `check_inside`
on each image name (paths must stay inside the dataset root), `probe` on each image (size after
EXIF orientation, sha256, integrity), `clip_box` on each box and `clean_polygons` on each
polygon, so a problem has the same name and policy whatever the format (see docs/manifest.md).

Only format modules know format details; everything else sees `Sample`/`Instance`/`Category`.
"""
from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Optional, Protocol

from visionflow.core.errors import DataError
from visionflow.manifest.images import ImageReadError, probe_image, sha256_file
from visionflow.manifest import Category, Sample

MAX_EXAMPLES = 5
_CLIP_TOLERANCE = 1e-6  # pixels
# Exporters round coordinates (YOLO: 6 decimals of the image size; Roboflow's COCO: x + w a few
# tenths past the edge): clipping by less than half a pixel is rounding, not a data problem.
SUBPIXEL_TOLERANCE = 0.5  # pixels
# What mask formats call the unlabelled class at value 0: VOC and CVAT/Datumaro label maps write
# `background`, labelme's VOC export `_background_`, torchvision's models `__background__`.
BACKGROUND_NAMES = frozenset({"background", "_background_", "__background__", "bg"})


def is_background(name: str) -> bool:
    """A class table's name for the unlabelled pixels (value 0), not a category."""
    return name.strip().lower() in BACKGROUND_NAMES


class ConversionReport:
    """Counts of recoverable problems by kind, each with its policy and a few examples.

    A reader creates it with its policy table (`COMMON_POLICIES`, or `{**COMMON_POLICIES,
    **its_own}` for format-specific kinds) and reports with `add(kind, example)`; an example
    names the file and the record id so a person can find it. An undeclared kind is a bug.
    """

    def __init__(self, policies: Optional[dict[str, str]] = None):
        self.policies: dict[str, str] = dict(policies or {})
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, kind: str, example: str) -> None:
        if kind not in self.policies:
            raise KeyError(f"problem kind {kind!r} has no declared policy")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(example)

    def merge(self, other: "ConversionReport") -> None:
        self.policies.update(other.policies)
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
            room = MAX_EXAMPLES - len(self.examples.setdefault(kind, []))
            self.examples[kind].extend(other.examples.get(kind, [])[:max(room, 0)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, dict]:
        return {k: {"count": self.counts[k], "policy": self.policies[k], "examples": self.examples.get(k, [])}
                for k in sorted(self.counts)}

    def lines(self) -> list[str]:
        """One human-readable line per problem kind (for logs and strict-mode errors)."""
        return [f"{k}: {self.counts[k]} ({self.policies[k]}); e.g. {'; '.join(self.examples.get(k, []))}"
                for k in sorted(self.counts)]


@dataclass
class FormatResult:
    categories: list[Category]  # source ids, in the order the source declares them
    samples: list[Sample]  # category ids are source ids
    report: ConversionReport = field(default_factory=ConversionReport)


class Reader(Protocol):
    def __call__(self, images_root: Path, annotations: Path, source: str,
                 root: Optional[str] = None) -> FormatResult: ...


class Writer(Protocol):
    def __call__(self, samples: Iterable[Sample], categories: list[Category], out_dir: Path,
                 project_root: Path = Path("."), copy_images: bool = True,
                 report: Optional[ConversionReport] = None) -> Path: ...


# --- checks every format applies the same way -------------------------------------------
# Recoverable problems shared by all formats: kind -> policy (see docs/manifest.md).
COMMON_POLICIES: dict[str, str] = {
    "image_missing": "image skipped with its annotations",
    "image_unreadable": "image skipped with its annotations (corrupt, truncated or not an image); file left untouched",
    "image_size_mismatch": "declared width/height ignored; the file's size after EXIF orientation is used",
    "box_degenerate": "instance dropped (zero or negative width or height)",
    "box_clipped": "box clipped to the image",
    "box_outside": "instance dropped (box wholly outside the image)",
    "polygon_invalid": "ring dropped (fewer than 3 points or an odd number of coordinates); instance kept",
}


def safe_relpath(name: object) -> str:
    """A file name from an annotation file as a clean relative POSIX path, or ValueError.

    Annotation files are untrusted input: a name must not reach outside the dataset root,
    so absolute paths, drive letters, backslashes and ".." are refused outright (not fixed).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"file name {name!r} is not a non-empty string")
    if "\\" in name:
        raise ValueError(f"file name {name!r} contains a backslash; use '/' separators")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise ValueError(f"file name {name!r} is absolute; it must be relative to the images root")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise ValueError(f"file name {name!r} contains '..'; it must stay inside the images root")
    return PurePosixPath(*parts).as_posix()


@functools.lru_cache(maxsize=64)
def _resolved(root: Path) -> Path:
    return root.resolve()  # once per root, not once per image


def check_inside(images_root: Path, rel: str) -> Path:
    """`images_root / rel`, refusing a path whose symlinks resolve outside the images root."""
    path = images_root / rel
    root = _resolved(images_root)
    if not path.resolve().is_relative_to(root):
        raise ValueError(f"file name {rel!r} resolves outside the images root {images_root} (symlink?)")
    return path


def probe(path: Path, declared: tuple[object, object], report: ConversionReport,
          where: str) -> Optional[tuple[int, int, str]]:
    """(width, height, sha256) of an image file, or None (counted) when it cannot be used."""
    if not path.is_file():
        report.add("image_missing", f"{where}: {path} not found")
        return None
    try:
        width, height, sha = probe_image(path)
    except ImageReadError as exc:
        report.add("image_unreadable", f"{where}: {exc}")
        return None
    if declared != (None, None) and tuple(declared) != (width, height):
        report.add("image_size_mismatch", f"{where}: declared {declared[0]}x{declared[1]}, file is {width}x{height}")
    return width, height, sha


def clip_box(box: list[float], width: int, height: int, report: ConversionReport,
             where: str, tolerance: float = _CLIP_TOLERANCE) -> Optional[list[float]]:
    """Canonical xyxy box clipped to the image, or None (counted) when there is nothing left.

    `tolerance` (pixels): clipping by at most this much is not counted. Formats that store
    rounded normalised values (YOLO's 6 decimals) pass a sub-pixel tolerance."""
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        report.add("box_degenerate", f"{where}: box {_fmt(box)} has no area")
        return None
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        report.add("box_outside", f"{where}: box {_fmt(box)} outside the {width}x{height} image")
        return None
    # Float noise (x + w landing a hair past the edge) is clipped silently, not counted: a
    # clean dataset must pass strict mode.
    if max(abs(a - b) for a, b in zip(clipped, box)) > tolerance:
        report.add("box_clipped", f"{where}: box {_fmt(box)} clipped to {_fmt(clipped)}")
    return clipped


def clean_polygons(rings: list[list[float]], report: ConversionReport, where: str) -> list[list[float]]:
    kept = []
    for ring in rings:
        if len(ring) < 6 or len(ring) % 2:
            report.add("polygon_invalid", f"{where}: ring with {len(ring)} coordinates")
        else:
            kept.append([float(v) for v in ring])
    return kept


def copy_file(src: Path, dst: Path, sha256: str) -> None:
    """Copy an image into an export. A file already there with the same content (or the source
    itself, when exporting next to it) is left alone: writers never rewrite source images."""
    if dst.exists() and (dst.resolve() == src.resolve() or sha256_file(dst) == sha256):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def copy_image(s: Sample, dst: Path, project_root: Path) -> None:
    copy_file(s.image_path(Path(project_root)), dst, s.sha256)


def load_json(path: Path) -> object:
    """Parse an annotation file; errors name the file and the line/column to look at."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, "annotation file not found", hint="check ingest.sources[].annotations") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                        record=f"line {exc.lineno}") from None


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


# Format name -> function. A new format adds one module and one line in each table (and its
# name to `SourceParams.format`). Imported at the bottom: the format modules import the
# contract types above.
from visionflow.formats.coco import read_coco, write_coco  # noqa: E402
from visionflow.formats.cvat import read_cvat, write_cvat  # noqa: E402
from visionflow.formats.imagefolder import read_imagefolder, write_imagefolder  # noqa: E402
from visionflow.formats.labels_csv import read_labels_csv, write_labels_csv  # noqa: E402
from visionflow.formats.labelstudio import read_labelstudio, write_labelstudio  # noqa: E402
from visionflow.formats.masks import read_masks, write_masks  # noqa: E402
from visionflow.formats.voc import read_voc, write_voc  # noqa: E402
from visionflow.formats.yolo import read_yolo, write_yolo  # noqa: E402

READERS: dict[str, Reader] = {
    "coco": read_coco, "yolo": read_yolo, "voc": read_voc, "imagefolder": read_imagefolder, "masks": read_masks,
    "cvat": read_cvat, "labelstudio": read_labelstudio, "csv": read_labels_csv,
}
WRITERS: dict[str, Writer] = {
    "coco": write_coco, "yolo": write_yolo, "voc": write_voc, "imagefolder": write_imagefolder, "masks": write_masks,
    "cvat": write_cvat, "labelstudio": write_labelstudio, "csv": write_labels_csv,
}


def get_reader(fmt: str) -> Reader:
    if fmt not in READERS:
        raise KeyError(f"unknown annotation format {fmt!r}; known formats: {', '.join(sorted(READERS))}")
    return READERS[fmt]


def get_writer(fmt: str) -> Writer:
    if fmt not in WRITERS:
        raise KeyError(f"no writer for format {fmt!r}; writable formats: {', '.join(sorted(WRITERS))}")
    return WRITERS[fmt]


def read_source(fmt: str, images_root: Path, annotations: Path, source: str,
                root: Optional[str] = None, **options) -> FormatResult:
    """`options`: a format's own reading options (voc: coordinates="auto"|"0-based"|"1-based")."""
    return get_reader(fmt)(Path(images_root), Path(annotations), source, root, **options)


def write_format(fmt: str, samples: Iterable[Sample], categories: list[Category], out_dir: Path,
                 project_root: Path = Path("."), copy_images: bool = True,
                 report: Optional[ConversionReport] = None) -> Path:
    return get_writer(fmt)(samples, categories, Path(out_dir), Path(project_root), copy_images, report)

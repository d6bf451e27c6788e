"""YOLO (Ultralytics layout) detection / segmentation labels <-> canonical samples.

Layout (what Ultralytics exports and trains from; one label file per image):

    data.yaml            path: ../datasets/x   (ignored: the exporting machine's folder)
                         train: images/train    (a folder, a .txt list of images, or a list of those)
                         val: images/val        test: images/test (optional)
                         nc: 2                  names: [person, car] or {0: person, 1: car}
    images/train/a.jpg   labels/train/a.txt     (label = image path with the last "/images/"
    images/val/b.jpg     labels/val/b.txt        replaced by "/labels/" and the suffix ".txt";
                                                  no "/images/" in the path: next to the image)

`annotations` is the data.yaml; darknet's `obj.data` (CVAT "YOLO 1.1": `classes = N`,
`names = data/obj.names`, `train = data/train.txt`, `valid = ...`; the "data/" prefix, darknet's
copy of the export, is dropped in it and in the list files' lines); or a class-names file
(`obj.names`, `classes.txt`: one name per line, id = line number - 1) for a folder with an
`images/` tree (split subfolders images/train, images/val, ... are recognised) or with label files
next to the images (darknet, LabelImg). The export FOLDER may be given instead: the first of
data.yaml, data.yml, dataset.yaml, obj.data, obj.names, classes.txt in it is used.
Split entries are relative to the folder of the file naming them (then to `images_root`); a
leading "../" that does not exist is dropped (Roboflow writes `val: ../valid/images`, Ultralytics
retries it the same way); an absolute path from the exporting machine that does not exist here
is read as its longest tail that exists in the dataset (Roboflow writes
`train: /Users/x/ds/train/images`). Whatever an entry names must be inside `images_root`. In a
list file a line "./x.jpg" is relative to the list file's folder, any other line to images_root.

Rows (one instance per line, all coordinates normalised to 0..1 by the image width/height):
    detection     `cls cx cy w h`            -> bbox [cx - w/2, cy - h/2, cx + w/2, cy + h/2] * (W, H)
    segmentation  `cls x1 y1 x2 y2 x3 y3 ...` -> polygons [[x1*W, y1*H, ...]], bbox = polygon bounds
    oriented box  `cls x1 y1 x2 y2 x3 y3 x4 y4` (YOLO-OBB: 4 corners of a rectangle) -> polygons [the 4
                  corners], bbox = their bounds, attributes {"obb": true}; in a source whose other
                  polygon rows have other point counts, an 8-value row is a 4-point polygon (no marker)
    pose          `cls cx cy w h x1 y1 [v1] ... xk yk [vk]` when the dataset declares its keypoints:
                  data.yaml `kpt_shape: [k, 2 or 3]` (Ultralytics), or Label Studio's YOLO export
                  (classes.txt + notes.json whose categories list `keypoints`: k names, 3 values each)
                  -> the box, and attributes "keypoints" [x, y, v, ...] in pixels with COCO visibility
                  (v as written; without v a point at 0 0 is v = 0, Ultralytics' "missing", others 2),
                  "num_keypoints" (v > 0) and, from notes.json, "keypoint_names". Without a
                  declaration a pose row's count is a polygon's or an odd one, so pose datasets need
                  it (Ultralytics needs kpt_shape to train them too)
An image without a label file, or with an empty (zero-byte) one, is a background sample. A read
that finds no image, no label file for any image, or loses every row is refused (DataError
naming what was looked for and where): an empty result is never a success.
The split (the data.yaml key, or the split folder in the names-file layout) goes to
`Sample.attributes["split"]` ("train", "val", "test"; a folder "valid" is "val") so an
existing split can be kept. Category ids are the class ids (0..K-1).

Validation policy (errors stop the read; counted problems are fixed or dropped and reported):

| problem                                             | policy                                        |
|-----------------------------------------------------|-----------------------------------------------|
| invalid YAML, no `names`, `nc` != number of names,  | DataError naming the file                     |
|   duplicate or empty class name, non-int class id,  |                                               |
|   `kpt_shape` not [k >= 1, 2 or 3]; notes.json not  |                                               |
|   JSON or its categories' keypoint lists differ     |                                               |
| obj.data: no `names`, names file missing, `classes` | DataError naming obj.data and the line        |
|   != number of names, a line not `key = value`      |                                               |
| split entry resolving outside the images root       | DataError naming the file and the key         |
|   (an existing path, symlinks resolved)             |   (paths must stay inside the dataset root)   |
| list-file line absolute, with "..", or resolving    | DataError naming the file and the line        |
|   outside the images root                           |                                               |
| split_missing: a split entry names nothing that     | entry skipped, counted ("valid/images does    |
|   exists                                            |   not exist in DIR"); none left: DataError    |
| split entry neither a folder nor a .txt list        | DataError naming the file and the key         |
| no image found, none readable, no label file for    | DataError naming the file, where it looked    |
|   any image (e.g. Images/ + Annotations/), every    |   and the label path it expected              |
|   row dropped                                       |                                               |
| commas in a label row ("0,0.5,0.5,...")             | DataError naming file:line: not fixed, since  |
|                                                     |   decimal commas ("0,5") would be misread     |
| class id not in the names table                     | DataError naming file:line and the class id   |
| row_unparsable: a value not a finite number, or a   | row dropped, counted (example: file:line)     |
|   class id that is not an integer                   |                                               |
| row_columns: not 4 box values nor an even number    | row dropped, counted (e.g. a confidence       |
|   >= 6 of polygon coordinates after the class id    |   column, pose keypoints with visibility)     |
|   (pose datasets: 4 box values, or 4 + k * d)       |                                               |
| keypoint_clipped: keypoint outside the image        | moved onto the image edge, counted            |
| row_not_normalized: a coordinate < -1 or > 2        | row dropped, counted (pixel units, absurd)    |
| box_clipped: box partly outside the image by more   | box clipped to the image, counted (less: the  |
|   than half a pixel                                 |   6-decimal rounding; clipped, not counted)   |
| box_outside: box wholly outside the image           | instance dropped, counted                     |
| box_degenerate: zero or negative width or height    | instance dropped, counted                     |
| polygon_clipped: polygon points outside the image   | points moved onto the image edge, counted     |
| polygon_invalid: ring < 3 points or odd length      | cannot occur after row_columns; shared check  |
| label_orphan: label file without an image           | ignored, counted (folders of folder entries)  |
| image_in_several_splits: one image under two keys   | read once, in the first split, counted; keys  |
|                                                     |   with the identical entry: no split recorded |
| image_missing: listed image not on disk             | skipped, counted                              |
| image_unreadable: corrupt / truncated file          | skipped, counted; the file is untouched       |
| image_size_mismatch                                 | cannot occur: YOLO declares no sizes          |

Writing (`write_yolo`) always produces the Ultralytics layout: data.yaml (no `path` key, so
Ultralytics resolves the folders next to the yaml; `names` as {0..K-1: name} in the order of
`categories`, and `source_category_ids` {yolo id: category id} recording the mapping),
images/<split>/... and labels/<split>/... (no split attributes: images/ and labels/, used for
both train and val). Every image gets a label file (empty for backgrounds). Image paths become
images/<split>/<path below any "images" and split folder>. Losses, counted in `report`:

| loss                                   | policy                                                  |
|----------------------------------------|---------------------------------------------------------|
| crowd_dropped                          | crowd instance not written (as Ultralytics' converter)  |
| rle_to_polygon                         | RLE-only mask written as its largest outer contour      |
| rle_dropped                            | empty RLE mask (box row written), or RLE beside polygons|
| multi_polygon_merged                   | rings joined by zero-width bridges into one ring        |
| box_not_polygon_bounds                 | box not written; read back as the polygon's bounds      |
| instance_attributes_dropped            | not written (the `obb` marker of a 4-corner row is kept: the row is an OBB row) |
| area_dropped                           | not written (read back as None)                         |
| image_labels_dropped                   | image-level labels not written                          |
| group_dropped                          | group not written (read back as the sample id)          |
| sample_attributes_dropped              | attributes other than `split` not written               |
| split_assigned                         | a sample without a split, among split ones: train       |
| pose_outline_dropped                   | in a pose dataset (see below) a polygon or mask is not  |
|                                        | written: pose rows hold a box and keypoints             |

Keypoints: when every instance that has `keypoints` has the same number k of them, the
dataset is written as Ultralytics pose data: data.yaml `kpt_shape: [k, 3]` and every row
`cls cx cy w h x1 y1 v1 ... xk yk vk` (normalised; an instance without keypoints, or a point
with v = 0, gets 0 0 0), which the reader reads back. `keypoint_names` is not written (counted
with the attributes dropped); with keypoint counts that differ, keypoints are dropped (counted).
"""
from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, NamedTuple, Optional

import numpy as np
import yaml

from visionflow.core.errors import DataError
from visionflow.formats import (COMMON_POLICIES, SUBPIXEL_TOLERANCE, copy_image, ConversionReport, FormatResult,
                                check_inside, clean_polygons, clip_box, probe, safe_relpath)
from visionflow.core.files import write_text
from visionflow.manifest import SPLITS, Category, Instance, Sample

YOLO_POLICIES: dict[str, str] = {
    "row_unparsable": "row dropped (a value is not a finite number or the class id is not an integer)",
    "row_columns": "row dropped (neither 4 box values nor an even number >= 6 of polygon coordinates; in a "
                   "pose dataset, neither 4 box values nor 4 + k * d with its kpt_shape [k, d])",
    "keypoint_clipped": "keypoint outside the image moved onto its edge",
    "row_not_normalized": "row dropped (a coordinate outside [-1, 2]: not normalised to the image size)",
    "polygon_clipped": "polygon points outside the image moved onto its edge",
    "label_orphan": "label file without an image ignored",
    "image_in_several_splits": "image read once, in the first split that lists it",
    "split_missing": "split entry skipped: the folder or list file it names does not exist",
}
READ_POLICIES = {**COMMON_POLICIES, **YOLO_POLICIES}

WRITE_POLICIES: dict[str, str] = {
    "crowd_dropped": "crowd instance not written (YOLO has no crowd flag; Ultralytics' COCO converter skips them)",
    "rle_to_polygon": "RLE mask written as the polygon of its largest outer contour (holes, other parts lost)",
    "rle_dropped": "RLE mask not written (empty mask, or the instance also has polygons); box or polygon row kept",
    "multi_polygon_merged": "polygon rings joined into one ring by zero-width bridges (read back as one ring)",
    "box_not_polygon_bounds": "box not written: a segmentation row has none, the reader uses the polygon bounds",
    "instance_attributes_dropped": "instance attributes not written",
    "area_dropped": "instance area not written (read back as None)",
    "image_labels_dropped": "image-level labels not written (label files hold instances only)",
    "group_dropped": "sample group not written (read back as the sample id)",
    "sample_attributes_dropped": "sample attributes other than `split` not written",
    "split_assigned": "sample without a split written to the train split (other samples have splits)",
    "pose_outline_dropped": "polygon or mask not written: in a pose dataset every row is a box with keypoints",
}

OBB = "obb"  # Instance.attributes[OBB] is True: the polygon is an oriented box's 4 corners (docs/manifest.md)
IMAGE_SUFFIXES = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp"}
_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "test": "test"}
_DARKNET_LISTS = {"train.txt", "val.txt", "valid.txt", "test.txt", "images.txt"}  # images.txt: FiftyOne's YOLOv4
_DARKNET_SPLITS = {"train": "train", "valid": "val", "val": "val", "test": "test"}  # obj.data keys
_NORMALIZED_RANGE = (-1.0, 2.0)  # beyond it a coordinate is more than an image size off: not normalised
# Normalised values written with 6 decimals (CVAT, LabelImg, Ultralytics) land up to
# ~1e-6 * size past an edge: clipping by less than half a pixel is rounding, not a problem.
_CLIP_TOLERANCE = SUBPIXEL_TOLERANCE
_RIGHT_ANGLE_TOLERANCE = 0.01  # |cos| of a corner angle below this (0.6 degrees): a rectangle


class Pose(NamedTuple):
    """A pose dataset's keypoints per row: k points of d values (x, y[, visibility])."""
    k: int
    d: int
    names: Optional[list[str]] = None  # Label Studio's keypoint labels, in row order


class _Image(NamedTuple):
    rel: str  # relative to images_root, checked
    split: Optional[str]
    where: str  # what names it in messages: "data.yaml `train`" or "train.txt:3"


class _Entry(NamedTuple):
    split: Optional[str]
    name: str  # a folder or a .txt list of images, relative to images_root
    file: Path  # the file that names it, and the record there (for messages)
    record: str


# --- reading ---------------------------------------------------------------------------------

def read_yolo(images_root: Path, annotations: Path, source: str, root: Optional[str] = None) -> FormatResult:
    images_root, annotations = Path(images_root), Path(annotations)
    if annotations.is_dir():
        annotations = find_annotation_file(annotations)
    base = annotations.parent  # data.yaml / obj.data entries are relative to their own folder
    pose: Optional[Pose] = None
    if annotations.suffix.lower() in (".yaml", ".yml"):
        doc = _load_yaml(annotations)
        names = _names_from_yaml(doc, annotations)
        entries = _yaml_entries(doc, annotations)
        pose = _pose_from_yaml(doc, annotations)
    elif annotations.suffix.lower() == ".data":
        names, entries = _read_darknet_data(annotations)
    else:
        names = _names_from_file(annotations)
        pose = _pose_from_notes(annotations.parent / "notes.json")
        has_tree = (images_root / "images").is_dir()
        entries = [_Entry(None, "images" if has_tree else ".", annotations, "class-names file layout")]
        base = images_root
    categories = [Category(id=i, name=n, source_ids={source: i}) for i, n in names.items()]

    report = ConversionReport(READ_POLICIES)
    resolved = [e._replace(name=rel) for e in entries
                if (rel := _resolve_entry(images_root, base, e, report)) is not None]
    if not resolved:
        raise DataError(annotations, "no image folder or list to read: " + "; ".join(report.examples["split_missing"]),
                        hint="fix the entries (relative to the file's folder) or point images at the dataset root")
    images, label_roots, lists = _list_images(images_root, resolved, report)
    root = images_root.as_posix() if root is None else root
    samples, used_labels, stats = [], set(), _Stats()
    for img in images:
        label_rel = label_relpath(img.rel)
        used_labels.add(label_rel)
        sample = _to_sample(img, label_rel, images_root, root, source, names, report, stats, pose)
        if sample is not None:
            samples.append(sample)
    _count_orphans(images_root, label_roots, used_labels | lists, annotations, report)
    _keep_obb_only_in_obb_datasets(samples)
    _check_not_empty(samples, images, stats, resolved, images_root, annotations, report)
    return FormatResult(categories, samples, report)


# The files that name a YOLO dataset's classes, in the order they are looked for when a folder
# is given as `annotations` (data.yaml: Ultralytics/Roboflow; obj.data/obj.names: darknet and
# CVAT "YOLO 1.1"; classes.txt: LabelImg).
ANNOTATION_FILES = ("data.yaml", "data.yml", "dataset.yaml", "obj.data", "obj.names", "classes.txt")


def find_annotation_file(folder: Path) -> Path:
    """The class table of a YOLO export folder (the first of ANNOTATION_FILES in it)."""
    for name in ANNOTATION_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DataError(folder, f"a folder was given as YOLO annotations but it has none of {', '.join(ANNOTATION_FILES)}",
                    hint="give the data.yaml or class-names file as annotations")


class _Stats:
    """What the label files held, to tell "nothing annotated" from "annotations all lost"."""

    def __init__(self) -> None:
        self.label_files = 0
        self.rows = 0
        self.instances = 0


def _check_not_empty(samples: list[Sample], images: list[_Image], stats: _Stats, entries: list[_Entry],
                     images_root: Path, annotations: Path, report: ConversionReport) -> None:
    """An ingest that ends with no samples, or with every label lost, fails here: exit 0 with
    nothing in it looks like success to a pipeline."""
    looked = ", ".join(f"{e.record}: {images_root / e.name}" for e in entries)
    problems = "; ".join(report.lines()) or "no problems counted"
    if not images:
        raise DataError(annotations, f"no images found (looked in {looked}; image suffixes "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))})", hint="point images at the dataset root")
    if not samples:
        raise DataError(annotations, f"none of the {len(images)} images listed could be read ({problems})")
    if stats.label_files == 0:
        example = label_relpath(images[0].rel)
        others = sorted({p.parent.relative_to(images_root).as_posix() for p in images_root.rglob("*.txt")
                         if p.parent.name.lower() in ("annotations", "labels") and p.is_file()})
        found = f"; .txt files are in {', '.join(others)}" if others else ""
        raise DataError(annotations, f"none of the {len(images)} images has a label file (looked for "
                        f"{images_root / example} for {images[0].rel}{found})",
                        hint="YOLO labels sit in labels/ beside images/ (the last images/ folder becomes labels/, "
                             "lower case) or next to each image")
    if stats.rows and not stats.instances:
        raise DataError(annotations, f"all {stats.rows} label rows were dropped ({problems})",
                        hint="fix the label rows; see the problems above")


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "data.yaml not found", hint="check ingest.sources[].annotations") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(path, f"invalid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise DataError(path, "not a YOLO data.yaml: expected a mapping with `names` and `train`/`val`")
    return doc


def _names_from_yaml(doc: dict, path: Path) -> dict[int, str]:
    names = doc.get("names")
    if isinstance(names, list):
        table = dict(enumerate(names))
    elif isinstance(names, dict):
        table = names
    else:
        raise DataError(path, "`names` must be a list or an {id: name} mapping")
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in table):
        raise DataError(path, f"class ids in `names` must be non-negative integers, got {sorted(map(str, table))}")
    nc = doc.get("nc")
    if nc is not None and nc != len(table):
        raise DataError(path, f"`nc` is {nc} but `names` has {len(table)} classes", hint="make them agree")
    return _check_names(dict(sorted(table.items())), path)


def _pose_from_yaml(doc: dict, path: Path) -> Optional[Pose]:
    """Ultralytics' `kpt_shape: [k, d]` (d = 2: x y; d = 3: x y visibility), or None."""
    shape = doc.get("kpt_shape")
    if shape is None:
        return None
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in shape) and shape[0] >= 1 and shape[1] in (2, 3)):
        raise DataError(path, f"`kpt_shape` is {shape!r}, expected [k, d] with k >= 1 keypoints of d = 2 (x y) or "
                        f"3 (x y visibility) values", record="`kpt_shape`")
    return Pose(shape[0], shape[1])


def _pose_from_notes(path: Path) -> Optional[Pose]:
    """Label Studio's YOLO export writes notes.json beside classes.txt; with keypoints in the
    labelling config every category lists the keypoint labels, and each row carries them as
    x y visibility triples in that order (label-studio-sdk's process_keypoints_for_yolo)."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not JSON ({exc})", hint="re-export from Label Studio, or remove the file") from None
    cats = doc.get("categories") if isinstance(doc, dict) else None
    lists = [tuple(c["keypoints"]) for c in cats or [] if isinstance(c, dict) and c.get("keypoints")]
    if not lists:
        return None
    if len(set(lists)) > 1:
        raise DataError(path, f"categories list different keypoints ({sorted(set(lists))}); a YOLO pose row has one "
                        f"layout for every class", hint="give every category the same keypoints")
    return Pose(len(lists[0]), 3, [str(n) for n in lists[0]])


def _names_from_file(path: Path) -> dict[int, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(path, "class-names file not found", hint="check ingest.sources[].annotations") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc})") from None
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines are common; a blank line inside would shift the ids
    return _check_names({i: line.strip() for i, line in enumerate(lines)}, path)


def _check_names(table: dict[int, Any], path: Path) -> dict[int, str]:
    seen: dict[str, int] = {}
    for cid, name in table.items():
        if not isinstance(name, (str, int)) or not str(name).strip():
            raise DataError(path, "empty class name", record=f"class id {cid}",
                            hint="in a names file the id is the line number - 1")
        name = str(name).strip()
        if name in seen:  # ingest merges sources by name: names must be unique
            raise DataError(path, f"class name {name!r} also used by class id {seen[name]}", record=f"class id {cid}")
        seen[name] = cid
    return {cid: str(n).strip() for cid, n in table.items()}


def _yaml_entries(doc: dict, path: Path) -> list[_Entry]:
    """The split entries; an entry listed under several keys (train: images, val: images)
    means the dataset has no real split, so it is read once with no split recorded."""
    by_entry: dict[str, list[str]] = {}
    for key in SPLITS:
        value = doc.get(key)
        values = [] if value in (None, "") else value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str):
                raise DataError(path, f"`{key}` entry {v!r} is not a path", record=f"`{key}`")
            by_entry.setdefault(v, []).append(key)
    if not by_entry:
        raise DataError(path, "no `train`, `val` or `test` entry", hint="name the image folders or list files")
    return [_Entry(keys[0] if len(keys) == 1 else None, entry, path, f"`{keys[0]}`")
            for entry, keys in by_entry.items()]


def _read_darknet_data(path: Path) -> tuple[dict[int, str], list[_Entry]]:
    """Darknet's obj.data (what CVAT's "YOLO 1.1" export writes): `key = value` lines naming
    `classes` (a count), `names` (the class-names file) and the `train`/`valid`/`test` list
    files. Paths start with "data/", the folder darknet expects the export to be copied into:
    relative to the export that prefix is dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc})") from None
    keys: dict[str, tuple[str, int]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise DataError(path, f"not a `key = value` line: {line[:60]!r}", record=f"line {lineno}",
                            hint="obj.data names classes, names and train/valid lists; give obj.names for the names")
        key, value = (t.strip() for t in line.split("=", 1))
        keys[key.lower()] = (value, lineno)
    if "names" not in keys:
        raise DataError(path, "no `names = ...` line (the class-names file)", hint="add it, or give obj.names")
    value, lineno = keys["names"]
    names_file = next((c for c in _darknet_candidates(path.parent, value) if c.is_file()), None)
    if names_file is None:
        raise DataError(path, f"names file {value!r} not found next to it", record=f"line {lineno}")
    names = _names_from_file(names_file)
    if "classes" in keys:
        count, lineno = keys["classes"]
        if not count.isdigit() or int(count) != len(names):
            raise DataError(path, f"`classes = {count}` but {names_file.name} has {len(names)} names",
                            record=f"line {lineno}", hint="make them agree")
    entries = [_Entry(_DARKNET_SPLITS[k], keys[k][0], path, f"`{k}` (line {keys[k][1]})")
               for k in _DARKNET_SPLITS if k in keys]
    if not entries:
        raise DataError(path, "no `train`, `valid` or `test` list", hint="name the image list files")
    return names, entries


def _darknet_candidates(base: Path, value: str) -> list[Path]:
    rel = value[len("data/"):] if value.startswith("data/") else None
    return [base / value] + ([base / rel] if rel else [])


def _resolve_entry(images_root: Path, base: Path, e: _Entry, report: ConversionReport) -> Optional[str]:
    """A split entry as a path relative to images_root, or None (counted) when it does not exist.

    Relative entries are looked up in the folder of the file that names them, then in
    images_root. A leading "../" that does not exist is dropped (Roboflow's "../valid/images";
    Ultralytics retries it the same way), as is darknet's "data/" prefix. An absolute path from
    the exporting machine that does not exist here ("/Users/x/ds/train/images": Roboflow writes
    them) is read as its longest tail that exists inside the dataset ("train/images"). Whatever
    exists must be inside images_root (symlinks resolved), else it is refused.
    """
    name = e.name
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        parts = PurePosixPath(name.replace("\\", "/")).parts[1:]
        tails = [PurePosixPath(*parts[k:]).as_posix() for k in range(len(parts))]
        candidates = [Path(name)] + [b / t for t in tails for b in (base, images_root)]
        shown = name
    else:
        stripped = name[3:] if name.startswith("../") else name[5:] if name.startswith("data/") else None
        candidates = [base / name, images_root / name]
        if stripped:
            candidates += [base / stripped, images_root / stripped]
        shown = stripped or name
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        report.add("split_missing", f"{e.file} {e.record}: {shown} does not exist in {base}"
                                    + (f" (the file names {name!r})" if shown != name else ""))
        return None
    resolved, top = found.resolve(), images_root.resolve()
    if not resolved.is_relative_to(top):
        raise DataError(e.file, f"{name!r} is {resolved}, outside the images root {images_root}", record=e.record,
                        hint="paths must stay inside the dataset root: move the data inside it or point images at "
                             "a folder that holds it")
    return _checked(images_root, resolved.relative_to(top).as_posix() or ".", e.file, e.record)


def _list_images(images_root: Path, entries: list[_Entry],
                 report: ConversionReport) -> tuple[list[_Image], list[str], set[str]]:
    """The images of every entry, the label folders to check for orphans, the list files."""
    images: list[_Image] = []
    seen: dict[str, str] = {}
    label_roots, lists = [], set()
    for e in entries:
        rel = e.name  # resolved and checked by _resolve_entry
        path = images_root / rel
        if path.is_dir():
            label_roots.append(_label_dir(rel))
            where = f"{e.file} {e.record}"
            found = [_Image(r, e.split or _split_from_path(r, rel), where) for r in _scan_images(images_root, path)]
        elif path.is_file() and path.suffix.lower() == ".txt":
            lists.add(rel)
            found = _read_list(images_root, path, rel, e.split, darknet=e.file.suffix.lower() == ".data")
        else:
            raise DataError(e.file, f"entry {e.name!r} is neither a folder nor a .txt list of images",
                            record=e.record)
        for img in found:
            if img.rel in seen:
                report.add("image_in_several_splits", f"{img.where}: {img.rel} already listed by {seen[img.rel]}")
                continue
            seen[img.rel] = img.where
            images.append(img)
    return images, label_roots, lists


def _checked(images_root: Path, name: str, file: Any, record: Optional[str]) -> str:
    try:
        rel = safe_relpath(name)
        check_inside(images_root, rel)
    except ValueError as exc:
        raise DataError(file, f"unsafe image path: {exc}", record=record,
                        hint="paths must stay inside the dataset root") from None
    return rel


def _scan_images(images_root: Path, folder: Path) -> list[str]:
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [p.relative_to(images_root).as_posix() for p in found]


def _split_from_path(rel: str, entry: str) -> Optional[str]:
    # Only in the names-file layout (entry "images" or "."): the first split-named folder.
    if entry not in ("images", "."):
        return None
    return next((_SPLIT_DIRS[p] for p in PurePosixPath(rel).parts[:-1] if p in _SPLIT_DIRS), None)


def _read_list(images_root: Path, path: Path, rel: str, split: Optional[str], darknet: bool = False) -> list[_Image]:
    base = PurePosixPath(rel).parent
    found = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        # Ultralytics: "./x" is relative to the list file's folder; other lines are used as they are.
        name = (base / name[2:]).as_posix() if name.startswith("./") else name
        if darknet and name.startswith("data/") and not (images_root / name).exists():
            name = name[len("data/"):]  # darknet's copy of the export: data/obj_train_data/x.jpg
        found.append(_Image(_checked(images_root, name, path, f"line {lineno}"), split, f"{path}:{lineno}"))
    return found


def label_relpath(image_rel: str) -> str:
    """Ultralytics' rule: the last "/images/" becomes "/labels/", the suffix ".txt"."""
    s = "/" + image_rel
    if "/images/" in s:
        s = "/labels/".join(s.rsplit("/images/", 1))
    return PurePosixPath(s[1:]).with_suffix(".txt").as_posix()


def _label_dir(image_dir: str) -> str:
    return "." if image_dir == "." else label_relpath(image_dir + "/x")[:-len("/x.txt")]


def _to_sample(img: _Image, label_rel: str, images_root: Path, root: str, source: str, names: dict[int, str],
               report: ConversionReport, stats: _Stats, pose: Optional[Pose] = None) -> Optional[Sample]:
    probed = probe(images_root / img.rel, (None, None), report, f"{img.where} ({img.rel})")
    if probed is None:
        return None
    width, height, sha = probed
    label = _label_file(images_root, label_rel)
    instances = _read_label_file(label, names, width, height, report, stats, pose) if label is not None else []
    sid = f"{source}/{img.rel}"
    return Sample(id=sid, root=root, path=img.rel, width=width, height=height, sha256=sha, instances=instances,
                  group=sid, attributes={"split": img.split} if img.split else {})


def _label_file(images_root: Path, rel: str) -> Optional[Path]:
    """The label file of an image, None when there is none (a background image)."""
    if not (images_root / rel).is_file():
        return None
    try:
        return check_inside(images_root, rel)
    except ValueError as exc:  # a symlinked label pointing elsewhere
        raise DataError(images_root / rel, f"label file: {exc}", hint="labels must stay inside the dataset root")


def _read_label_file(path: Path, names: dict[int, str], width: int, height: int,
                     report: ConversionReport, stats: _Stats, pose: Optional[Pose] = None) -> list[Instance]:
    stats.label_files += 1  # a zero-byte file (CVAT writes them) is an image with no objects
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(path, f"not UTF-8 text ({exc})") from None
    instances = []
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            stats.rows += 1
            inst = _parse_row(line, path, lineno, names, width, height, report, pose)
            if inst is not None:
                instances.append(inst)
    stats.instances += len(instances)
    return instances


def _parse_row(line: str, path: Path, lineno: int, names: dict[int, str], width: int, height: int,
               report: ConversionReport, pose: Optional[Pose] = None) -> Optional[Instance]:
    where = f"{path}:{lineno}"
    if "," in line:
        raise DataError(path, "values are separated by commas", record=f"line {lineno}",
                        hint="YOLO rows are space-separated numbers with '.' decimals; re-export the labels")
    tokens = line.split()
    try:
        cls = _class_id(tokens[0])
        coords = [float(t) for t in tokens[1:]]
        if not all(map(math.isfinite, coords)):
            raise ValueError("not finite")
    except ValueError:
        report.add("row_unparsable", f"{where}: {line.strip()[:80]!r}")
        return None
    if cls not in names:
        raise DataError(path, f"class id {cls} is not in the names table (ids {min(names)}..{max(names)})",
                        record=f"line {lineno}", hint="fix the label row or the class names")
    n = len(coords)
    keypoints = pose is not None and n == 4 + pose.k * pose.d
    if pose is not None and n != 4 and not keypoints:
        report.add("row_columns", f"{where}: {n} values after the class id (kpt_shape [{pose.k}, {pose.d}]: "
                                  f"4 or {4 + pose.k * pose.d})")
        return None
    if n != 4 and (n < 6 or n % 2) and not keypoints:
        report.add("row_columns", f"{where}: {n} values after the class id")
        return None
    if any(v < _NORMALIZED_RANGE[0] or v > _NORMALIZED_RANGE[1] for v in (coords[:4] if keypoints else coords)):
        report.add("row_not_normalized", f"{where}: {line.strip()[:80]!r}")
        return None
    if n == 4 or keypoints:
        cx, cy, w, h = coords[:4]
        box = clip_box([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height],
                       width, height, report, where, tolerance=_CLIP_TOLERANCE)
        if box is None:
            return None
        attributes = _keypoints(coords[4:], pose, width, height, report, where) if keypoints else {}
        if attributes is None:
            return None
        return Instance(bbox=box, category_id=cls, attributes=attributes)
    pixels = [v * (width if i % 2 == 0 else height) for i, v in enumerate(coords)]
    obb = n == 8 and is_rectangle(pixels)  # checked before clipping moves corners onto the edge
    ring = _clip_ring(coords, width, height, report, where)
    xs, ys = ring[0::2], ring[1::2]
    box = clip_box([min(xs), min(ys), max(xs), max(ys)], width, height, report, where, tolerance=_CLIP_TOLERANCE)
    if box is None:
        return None
    return Instance(bbox=box, category_id=cls, polygons=clean_polygons([ring], report, where),
                    attributes={OBB: True} if obb else {})


def _keypoints(values: list[float], pose: Pose, width: int, height: int, report: ConversionReport,
               where: str) -> Optional[dict[str, Any]]:
    """A pose row's keypoint values -> the COCO-style attributes (docs/manifest.md): pixels, and
    visibility as written (d = 3) or, for d = 2, 0 for Ultralytics' missing point (0, 0) and 2
    otherwise. A point with v = 0 is (0, 0), as COCO writes it."""
    out: list[float] = []
    clipped = False
    for j in range(pose.k):
        x, y = values[j * pose.d], values[j * pose.d + 1]
        if pose.d == 3:
            v = values[j * pose.d + 2]
            if v not in (0, 1, 2):
                report.add("row_unparsable", f"{where}: keypoint {j + 1} visibility {v:g} is not 0, 1 or 2")
                return None
        else:
            v = 0 if x == 0 and y == 0 else 2
        if v == 0:
            out += [0.0, 0.0, 0]
            continue
        if not (_NORMALIZED_RANGE[0] <= x <= _NORMALIZED_RANGE[1] and _NORMALIZED_RANGE[0] <= y <= _NORMALIZED_RANGE[1]):
            report.add("row_not_normalized", f"{where}: keypoint {j + 1} at ({x:g}, {y:g})")
            return None
        px, py = x * width, y * height
        cx, cy = min(max(px, 0.0), float(width)), min(max(py, 0.0), float(height))
        clipped |= max(abs(cx - px), abs(cy - py)) > _CLIP_TOLERANCE
        out += [cx, cy, int(v)]
    if clipped:
        report.add("keypoint_clipped", f"{where}: keypoints outside the {width}x{height} image moved onto its edge")
    attributes: dict[str, Any] = {"keypoints": out, "num_keypoints": sum(1 for v in out[2::3] if v > 0)}
    if pose.names:
        attributes["keypoint_names"] = list(pose.names)
    return attributes


def is_rectangle(ring: list[float]) -> bool:
    """Whether 4 corners [x1, y1, ..., x4, y4] (pixels) form a rectangle of non-zero size: an
    oriented box as Ultralytics' OBB rows (`cls x1 y1 x2 y2 x3 y3 x4 y4`) hold them."""
    pts = np.asarray(ring, dtype=float).reshape(4, 2)
    edges = np.roll(pts, -1, axis=0) - pts
    lengths = np.linalg.norm(edges, axis=1)
    if lengths.min() <= 1e-9:
        return False
    cosines = [abs(float(edges[i] @ edges[(i + 1) % 4])) / (lengths[i] * lengths[(i + 1) % 4]) for i in range(4)]
    return max(cosines) < _RIGHT_ANGLE_TOLERANCE


def _keep_obb_only_in_obb_datasets(samples: list[Sample]) -> None:
    """An 8-value row is an oriented box in an OBB dataset, a 4-point polygon in a segmentation
    dataset (both are kept as the 4 corners plus the axis-aligned box; only the marker differs).
    A source whose polygon rows are not all 4-point rectangles is a segmentation dataset."""
    polys = [i for s in samples for i in s.instances if i.polygons]
    if all(i.attributes.get(OBB) for i in polys):
        return
    for inst in polys:
        inst.attributes.pop(OBB, None)


def _class_id(token: str) -> int:
    value = float(token)  # some tools write "0.0"
    if not value.is_integer():
        raise ValueError(f"class id {token!r} is not an integer")
    return int(value)


def _clip_ring(coords: list[float], width: int, height: int, report: ConversionReport, where: str) -> list[float]:
    scale = [width if i % 2 == 0 else height for i in range(len(coords))]
    ring = [v * s for v, s in zip(coords, scale)]
    clipped = [min(max(v, 0.0), s) for v, s in zip(ring, scale)]
    if max(abs(a - b) for a, b in zip(ring, clipped)) > _CLIP_TOLERANCE:
        report.add("polygon_clipped", f"{where}: points outside the {width}x{height} image moved onto its edge")
    return clipped


def _count_orphans(images_root: Path, label_roots: list[str], used: set[str], annotations: Path,
                   report: ConversionReport) -> None:
    skip = {annotations.resolve()}
    for label_root in label_roots:
        folder = images_root / label_root
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*.txt")):
            rel = p.relative_to(images_root).as_posix()
            darknet_list = p.parent == images_root and p.name in _DARKNET_LISTS
            if rel not in used and not darknet_list and p.resolve() not in skip:
                report.add("label_orphan", f"{p}: no image for this label file")


# --- writing ---------------------------------------------------------------------------------

def write_yolo(samples: Iterable[Sample], categories: list[Category], out_dir: Path,
               project_root: Path = Path("."), copy_images: bool = True,
               report: Optional[ConversionReport] = None) -> Path:
    """Write `out_dir/data.yaml`, `out_dir/images/...` and `out_dir/labels/...` (Ultralytics layout).

    Class ids are 0..K-1 in the order of `categories`; data.yaml's `source_category_ids` maps
    them back. What YOLO cannot hold is counted in `report` (WRITE_POLICIES are added to it).
    """
    out_dir, samples = Path(out_dir), list(samples)
    report = report if report is not None else ConversionReport()
    report.policies.update(WRITE_POLICIES)
    class_of = {c.id: k for k, c in enumerate(categories)}
    pose_k = _pose_k(samples)
    any_split = any(s.attributes.get("split") in SPLITS for s in samples)
    placed: dict[str, str] = {}
    splits: set[str] = set()
    for s in samples:
        split = _split_for(s, any_split, report)
        rel = output_relpath(s.path, split)
        if rel in placed:
            raise ValueError(f"samples {placed[rel]} and {s.id} would both be written to {rel!r}")
        placed[rel] = s.id
        splits.add(split or "")
        _count_sample_losses(s, report)
        rows = [r for i, inst in enumerate(s.instances) if (r := _row(inst, i, class_of, s, report, pose_k)) is not None]
        write_text(out_dir / label_relpath(rel), "".join(r + "\n" for r in rows))
        if copy_images:
            copy_image(s, out_dir / rel, Path(project_root))
    doc: dict[str, Any] = {}
    for key in SPLITS:
        if key in splits:
            doc[key] = f"images/{key}"
    if not any_split:  # Ultralytics needs train and val; without a split both are everything
        doc.update(train="images", val="images")
    if pose_k:
        doc["kpt_shape"] = [pose_k, 3]
    doc.update(nc=len(categories), names={k: c.name for k, c in enumerate(categories)},
               source_category_ids={k: c.id for k, c in enumerate(categories)})
    target = out_dir / "data.yaml"
    write_text(target, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return target


def output_relpath(path: str, split: Optional[str]) -> str:
    """Where an image goes: images/<split>/<path below any "images" folder and split folder>."""
    parts = list(PurePosixPath(path).parts)
    if "images" in parts[:-1]:
        parts = parts[len(parts) - 1 - parts[::-1].index("images"):][1:]
    if split and len(parts) > 1 and _SPLIT_DIRS.get(parts[0]) == split:
        parts = parts[1:]
    return PurePosixPath("images", *([split] if split else []), *parts).as_posix()


def _split_for(s: Sample, any_split: bool, report: ConversionReport) -> Optional[str]:
    split = s.attributes.get("split")
    if split in SPLITS:
        return split
    if any_split:
        report.add("split_assigned", f"{s.id}: split {split!r} -> train")
        return "train"
    return None


def _count_sample_losses(s: Sample, report: ConversionReport) -> None:
    if s.labels:
        report.add("image_labels_dropped", f"{s.id}: labels {s.labels}")
    if s.group and s.group != s.id:
        report.add("group_dropped", f"{s.id}: group {s.group!r}")
    extra = sorted(k for k in s.attributes if k != "split")
    if extra:
        report.add("sample_attributes_dropped", f"{s.id}: {', '.join(extra)}")


def _pose_k(samples: list[Sample]) -> Optional[int]:
    """k when every (non-crowd) instance with keypoints has the same k of them, else None."""
    lengths = {len(kps) for s in samples for i in s.instances
               if not i.iscrowd and isinstance(kps := i.attributes.get("keypoints"), list) and kps}
    return lengths.pop() // 3 if len(lengths) == 1 and next(iter(lengths)) % 3 == 0 else None


def _row(inst: Instance, index: int, class_of: dict[int, int], s: Sample,
         report: ConversionReport, pose_k: Optional[int] = None) -> Optional[str]:
    """One label row: `cls cx cy w h` for a box, `cls x1 y1 ...` for a polygon, normalised; in a
    pose dataset (`pose_k`), the box and its keypoints."""
    where = f"{s.id} instance {index}"
    if inst.category_id not in class_of:
        raise ValueError(f"{where}: category id {inst.category_id} is not in the category table")
    if inst.iscrowd:
        report.add("crowd_dropped", where)
        return None
    if pose_k:
        return _pose_row(inst, class_of[inst.category_id], s, report, where, pose_k)
    ring = _ring_to_write(inst, s, report, where)
    # An oriented box is written as its 4 corners, which is how YOLO-OBB holds it: not a loss.
    dropped = sorted(k for k in inst.attributes if not (k == OBB and ring is not None and len(ring) == 8))
    if dropped:
        report.add("instance_attributes_dropped", f"{where}: {', '.join(dropped)}")
    if inst.area is not None:
        report.add("area_dropped", f"{where}: area {inst.area:g}")
    cls = class_of[inst.category_id]
    if ring is None:
        x1, y1, x2, y2 = inst.bbox
        values = [(x1 + x2) / 2 / s.width, (y1 + y2) / 2 / s.height, (x2 - x1) / s.width, (y2 - y1) / s.height]
    else:
        xs, ys = ring[0::2], ring[1::2]
        if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip([min(xs), min(ys), max(xs), max(ys)], inst.bbox)):
            report.add("box_not_polygon_bounds", f"{where}: box {inst.bbox}")
        values = [v / (s.width if i % 2 == 0 else s.height) for i, v in enumerate(ring)]
    return " ".join([str(cls)] + [f"{v:.10g}" for v in values])


def _pose_row(inst: Instance, cls: int, s: Sample, report: ConversionReport, where: str, k: int) -> str:
    if inst.polygons or inst.rle is not None:
        report.add("pose_outline_dropped", where)
    dropped = sorted(set(inst.attributes) - {"keypoints", "num_keypoints"})
    if dropped:
        report.add("instance_attributes_dropped", f"{where}: {', '.join(dropped)}")
    if inst.area is not None:
        report.add("area_dropped", f"{where}: area {inst.area:g}")
    x1, y1, x2, y2 = inst.bbox
    values: list[float] = [(x1 + x2) / 2 / s.width, (y1 + y2) / 2 / s.height, (x2 - x1) / s.width, (y2 - y1) / s.height]
    kps = inst.attributes.get("keypoints") or [0, 0, 0] * k
    for x, y, v in zip(kps[0::3], kps[1::3], kps[2::3]):
        values += [0, 0, 0] if not v else [x / s.width, y / s.height, int(v)]
    return " ".join([str(cls)] + [f"{v:.10g}" for v in values])


def _ring_to_write(inst: Instance, s: Sample, report: ConversionReport, where: str) -> Optional[list[float]]:
    rings = [list(r) for r in inst.polygons]
    if inst.rle is not None:
        if rings:
            report.add("rle_dropped", f"{where}: the instance also has polygons; they are written")
        else:
            ring = rle_to_polygon(inst.rle)
            report.add("rle_to_polygon" if ring else "rle_dropped", where)
            rings = [ring] if ring else []
    if len(rings) > 1:
        report.add("multi_polygon_merged", f"{where}: {len(rings)} rings")
        return merge_rings(rings)
    return rings[0] if rings else None


def merge_rings(rings: list[list[float]]) -> list[float]:
    """One ring tracing every ring from the first ring's first point and back (zero-width
    bridges), so a rasteriser fills each part; order: r0, r0[0], r1, r1[0], r0[0], r2, ..."""
    anchor = rings[0][:2]
    out = list(rings[0]) + anchor
    for ring in rings[1:]:
        out += list(ring) + ring[:2] + anchor
    return out


def rle_to_polygon(rle: dict[str, Any]) -> Optional[list[float]]:
    """The largest outer contour of a COCO RLE mask as [x, y, ...] pixels, or None if empty."""
    import cv2  # opencv-python-headless (installed with albumentations); only needed here
    from pycocotools import mask as mask_utils

    h, w = rle["size"]
    coded = mask_utils.frPyObjects(rle, h, w) if isinstance(rle["counts"], list) else rle
    mask = np.ascontiguousarray(mask_utils.decode(coded).astype(np.uint8))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = [c for c in contours if len(c) >= 3]
    if not contours:
        return None
    return [float(v) for v in max(contours, key=cv2.contourArea).reshape(-1)]


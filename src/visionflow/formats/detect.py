"""Which annotation format and layout a folder or file holds, and why we think so.

`detect_source(path)` looks at names and at the first bytes of candidate files only (never
whole datasets), and returns the format, the `images:` / `annotations:` pair that the format's
reader takes (docs/formats.md) and the evidence. No candidate, or several, is a `UserError` that
says what was looked for and lists the candidates, so the user can name the format instead.
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from visionflow.core.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
SPLIT_DIRS = ("train", "valid", "val", "validation", "test")
_HEAD = 65536  # bytes read from a candidate file to recognise it


@dataclass(frozen=True)
class Detected:
    format: str
    images: Path
    annotations: Path
    why: str

    def describe(self) -> str:
        return f"{self.format} (images {self.images}, annotations {self.annotations}): {self.why}"


def _head(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(_HEAD)
    except OSError:
        return ""


def _json_kind(path: Path) -> Optional[str]:
    """'coco' or 'labelstudio' from the file's top-level structure (whole file parsed only when small)."""
    head = _head(path).lstrip()
    if head.startswith("{"):
        keys = head[:_HEAD]
        if '"images"' in keys:  # COCO's first key; the reader says what else is missing or broken
            return "coco"
    if head.startswith("["):
        if '"data"' in head and ('"annotations"' in head or '"predictions"' in head or '"completions"' in head
                                 or '"label"' in head or '"choice"' in head or '"rectanglelabels"' in head):
            return "labelstudio"
        if '"annotation_id"' in head and '"data"' not in head:  # Label Studio's JSON-MIN: flat records
            return "labelstudio"
    return None


_FILE_NAME = re.compile(r'"file_name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def _coco_images(ann: Path) -> Path:
    """The folder a COCO file's `file_name` values are relative to: of the places exporters put
    images, the one where most of the first 20 names in the file's head exist (the file's own
    folder when none has any: the reader then names the missing images). Places, for a file in
    `annotations/` the export's root and otherwise the file's folder: that folder itself, `images/`
    (CVAT's COCO 1.0), `images/<subset>/` (Datumaro, CVAT 2), `<subset>/` (COCO's own
    `instances_val2017.json` + `val2017/`) and `data/` (FiftyOne), the subset taken from the
    file name after its first underscore. Label Studio's `/data/upload/<n>/<name>` file names
    count as the names the COCO reader reads them as."""
    from visionflow.formats.labelstudio import task_path_candidates

    names: list[list[str]] = []  # per image: the names it may have (Label Studio's URLs: several)
    for raw in _FILE_NAME.findall(_head(ann))[:20]:
        try:
            name = json.loads(f'"{raw}"')
        except ValueError:
            continue
        names.append(task_path_candidates(name) or [name])
    subset = ann.stem.split("_", 1)[1] if "_" in ann.stem else None
    bases = [ann.parent.parent, ann.parent] if ann.parent.name.lower() == "annotations" else [ann.parent]
    places = [p for b in bases for p in (b, b / "images", *((b / "images" / subset, b / subset) if subset else ()),
                                       b / "data")]
    best, hits = bases[0], 0
    for place in dict.fromkeys(places):
        found = sum(1 for cands in names if any(n and (place / n).is_file() for n in cands))
        if found > hits:
            best, hits = place, found
    return best


def _xml_root(path: Path) -> Optional[str]:
    try:
        for _event, elem in ET.iterparse(path, events=("start",)):
            return elem.tag
    except (ET.ParseError, OSError):
        return None
    return None


def _images_in(folder: Path, limit: int = 1) -> int:
    n = 0
    for p in folder.iterdir() if folder.is_dir() else ():
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            n += 1
            if n >= limit:
                break
    return n


def _split_folders(root: Path) -> list[Path]:
    return [root / s for s in SPLIT_DIRS if (root / s).is_dir()]


def _candidates(path: Path) -> Iterator[Detected]:
    if path.is_file():
        yield from _file_candidates(path)
        return
    root = path
    # CVAT writes annotations.xml beside images/; FiftyOne's CVATImageDataset labels.xml beside data/
    for name in ("annotations.xml", "labels.xml"):
        if (root / name).is_file() and _xml_root(root / name) == "annotations":
            images = next((root / n for n in ("images", "data") if (root / n).is_dir()), root)
            yield Detected("cvat", images, root / name, f"{name} with an <annotations> root (CVAT for images 1.1)")
    for name in ("data.yaml", "dataset.yaml"):
        if (root / name).is_file():
            yield Detected("yolo", root, root / name, f"{name} (YOLO / Ultralytics)")
            break
    else:
        if (root / "obj.data").is_file():
            yield Detected("yolo", root, root / "obj.data", "obj.data (darknet / CVAT YOLO 1.1)")
        for name in () if (root / "obj.data").is_file() else ("obj.names", "classes.txt"):
            labels = root / "labels"
            beside = any(p.name != name for p in root.glob("*.txt")) and _images_in(root)  # LabelImg, flat
            # FiftyOne's YOLOv4Dataset: obj.names, images.txt, data/ with each label beside its image
            in_data = (root / "data").is_dir() and any((root / "data").glob("*.txt")) and _images_in(root / "data")
            if (root / name).is_file() and (labels.is_dir() or any(root.glob("obj_*_data")) or beside or in_data):
                yield Detected("yolo", root, root / name, f"{name} with YOLO label files (darknet / YOLO 1.1)")
                break
    splits = _split_folders(root)
    if any((s / "_annotations.coco.json").is_file() for s in splits) or (root / "_annotations.coco.json").is_file():
        yield Detected("coco", root, root, "_annotations.coco.json per split folder (Roboflow COCO export)")
    tables = [t for t in [*(s / "_classes.csv" for s in splits), root / "_classes.csv"] if t.is_file()]
    if tables and _head(tables[0]).lower().replace(" ", "").startswith("pixelvalue,class"):
        yield Detected("masks", root, root, "_classes.csv (Pixel Value, Class) with <image>_mask.png beside the "
                                            "images (Roboflow semantic segmentation masks)")
    elif tables:
        yield Detected("csv", root, root, "_classes.csv per split folder (Roboflow multi-label CSV)")
    coco = [p for p in sorted([*root.glob("*.json"), *root.glob("annotations/*.json")])
            if not p.name.startswith("_") and _json_kind(p) == "coco"]
    for p in coco:
        yield Detected("coco", _coco_images(p), p, f"{p.relative_to(root)} has COCO's images/annotations/categories")
    for p in sorted(root.glob("*.json")):
        if _json_kind(p) == "labelstudio":
            yield Detected("labelstudio", root, p, f"{p.name} is a list of Label Studio tasks")
    # VOC's Annotations/; FiftyOne's VOCDetectionDataset writes labels/*.xml beside data/
    ann = next((root / n for n in ("Annotations", "annotations", "labels") if (root / n).is_dir()
                and any((root / n).glob("*.xml"))), None)
    if ann is not None and _xml_root(next(ann.glob("*.xml"))) == "annotation":
        images = next((root / n for n in ("JPEGImages", "images", "Images", "data") if (root / n).is_dir()), root)
        # the devkit root (its ImageSets/ and Segmentation*/ are read too); FiftyOne's labels/ as such
        yield Detected("voc", images, ann if ann.name == "labels" else root,
                       f"{ann.name}/*.xml with <annotation> roots (Pascal VOC)")
    elif ann is None:
        flat = [d for d in [root, *splits] if any(_xml_root(x) == "annotation" for x in sorted(d.glob("*.xml"))[:3])]
        if flat:
            where = "beside the images" if flat == [root] else f"in {', '.join(d.name for d in flat)}"
            yield Detected("voc", root, root, f"<annotation> XML files {where} (Pascal VOC: LabelImg, Roboflow)")
    masks = next((root / n for n in ("masks", "SegmentationClass", "labels") if (root / n).is_dir()
                  and next((root / n).rglob("*.png"), None) is not None), None)
    # JPEGImages/: CVAT's "Segmentation mask 1.1"; data/ + labels/: FiftyOne's ImageSegmentationDirectory
    images = next((root / n for n in ("images", "JPEGImages", "data") if (root / n).is_dir()), None)
    if masks is not None and images is not None and ann is None:
        yield Detected("masks", images, masks, f"{images.name}/ with PNG masks in {masks.name}/")
    tree = splits or [root]
    class_dirs = [d for t in tree for d in t.iterdir() if d.is_dir() and _images_in(d)]
    if class_dirs and not any(t for t in tree if _images_in(t)) and \
            not {d.name.lower() for d in class_dirs} & {"images", "jpegimages", "masks", "labels", "data"}:
        yield Detected("imagefolder", root, root, f"{len(class_dirs)} class folders of images"
                       + (f" under {', '.join(s.name for s in splits)}" if splits else ""))


def _file_candidates(path: Path) -> Iterator[Detected]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        kind = _json_kind(path)
        if kind:
            yield Detected(kind, _coco_images(path) if kind == "coco" else path.parent, path, f"{path.name} is " +
                           ("COCO JSON (images/annotations/categories)" if kind == "coco" else "a list of Label Studio tasks"))
    elif suffix == ".xml":
        tag = _xml_root(path)
        if tag == "annotations":
            images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
            yield Detected("cvat", images, path, f"{path.name} has an <annotations> root (CVAT for images 1.1)")
    elif suffix in (".yaml", ".yml") and "names" in _head(path):
        yield Detected("yolo", path.parent, path, f"{path.name} names YOLO classes")
    elif suffix == ".csv" and _head(path).lower().startswith("filename"):
        yield Detected("csv", path.parent, path, f"{path.name} is a filename,class,... table (Roboflow multi-label CSV)")


def detect_source(path: str | Path, fmt: Optional[str] = None) -> Detected:
    """The one format and layout that fits `path`; with `fmt`, the one of that format."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    found = list(dict.fromkeys(_candidates(path)))
    if len(found) > 1 and any(d.format != "imagefolder" for d in found):
        # class folders are the fallback: an annotated layout's image folders look like them
        found = [d for d in found if d.format != "imagefolder"]
    if fmt is not None and found:
        named = [d for d in found if d.format == fmt]
        if not named:
            raise UserError(f"{path}: no {fmt} layout found here; it looks like "
                            + "; ".join(d.describe() for d in found)
                            + f". Check the format, or give --images and --annotations for {fmt}")
        found = named
    if not found:
        raise UserError(
            f"{path}: no annotation format recognised. Looked for CVAT annotations.xml, YOLO data.yaml / obj.names, "
            "COCO JSON (also Roboflow's _annotations.coco.json per split), Label Studio JSON, VOC Annotations/*.xml, "
            "images/ + masks/ PNGs, class folders of images and Roboflow _classes.csv. Name the format with "
            "--format (see docs/formats.md)")
    if len(found) > 1:
        raise UserError(f"{path}: more than one annotation format fits; name one with --format (and --images/"
                        "--annotations):\n  " + "\n  ".join(d.describe() for d in found))
    return found[0]

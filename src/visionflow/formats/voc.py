"""Pascal VOC (devkit layout, one XML per image, palette or RGB PNG masks) <-> canonical samples.

Layouts read (`annotations` is the VOC root, its `Annotations/` folder, or a folder of XML files;
images are in `images_root`, usually `<root>/JPEGImages`):

    devkit / CVAT "PASCAL VOC 1.1"   the tree below
    LabelImg, Roboflow (flat)        <dir>/<stem>.xml beside <dir>/<image>
    Roboflow export root             <root>/{train,valid,test}/<stem>.xml beside the images; the
                                     folder is the split (valid -> val) and part of Sample.path

    <root>/Annotations/<stem>.xml             one per image; the samples are these files, sorted
    <root>/JPEGImages/<stem>.jpg              images, flat names
    <root>/ImageSets/Main/<split>.txt         one stem per line -> Sample.attributes["split"]; file
                                              names matched case-insensitively (Train, valid, ...);
                                              others (trainval, default, per-class lists) ignored
    <root>/SegmentationObject/<stem>.png      index k = k-th <object> of the XML, 0 = background,
                                              255 = boundary / ignore; a palette PNG, or an RGB PNG
                                              drawn in the VOC palette's colours (CVAT)
    <root>/SegmentationClass/<stem>.png       index = class, 0 = background, 255 = ignore; palette
                                              PNG, or RGB drawn in the label map's colours (CVAT)
    <root>/labelmap.txt or labels.txt         optional category table (CVAT/Datumaro `name:r,g,b::`
                                              lines or plain names; a first `background` is index 0)

Which mask goes with which object: with a labels file, object index k is paired with the k-th
<object> when the class PNG agrees on its class; otherwise (CVAT writes masks of ellipses and
polygons that have no <object>) it becomes an instance of its own, with the class the class PNG
gives its pixels and the mask's extent as its box. Without a labels file, k pairs with object k.

Box coordinates (`coordinates=`, per source): the devkit's files are 1-based inclusive pixel
indices; CVAT (float, e.g. a CVAT box xtl="45.80" is written <xmin>45.8</xmin>), Roboflow and
LabelImg (which writes its canvas coordinates, raising 0 to 1) write 0-based ones. "auto" (the
default) reads a file as 1-based when its <source> says it is from the devkit (<database>The
VOC2007 Database</database>, <annotation>PASCAL VOC2007</annotation>), else as 0-based;
"1-based" / "0-based" force one reading.

Reading maps:
    <filename>                  -> Sample.path (relative to images_root); id "<source>/<filename>"
    <size><width><height>       -> checked against the file (the file wins); <depth> -> attributes["depth"]
    <segmented>                 -> attributes["segmented"] (int);  <group> (ours) -> Sample.group
    <object><name>              -> category: ids from the labels file (its line index, so they equal
                                   SegmentationClass indices), else sorted unique names, ids 1..K
    <bndbox>                    -> continuous 0-based xyxy: as written (0-based files), or
                                   (xmin - 1, ymin - 1, xmax, ymax) for the devkit's 1-based
                                   inclusive indices (xmin == xmax is 1 px wide); the writer
                                   writes the convention the reader will pick for the sample
    <pose> <truncated> <difficult> <occluded> -> Instance.attributes (flags as ints)
    SegmentationObject index k  -> Instance.rle of object k (COCO RLE, compressed string counts)
    255 in the object (else class) PNG -> Sample.attributes["ignore_rle"]
    any other element (<folder>, <source>, <part>, <actions>, ...) -> attributes as strings/dicts/lists
                                   (a <part>'s box stays as the XML's 1-based strings)
The SegmentationClass PNG is redundant with the object PNG + XML names; only its 255 region is used.

Validation policy (errors stop the read; counted problems are fixed or dropped and reported):

| problem                                              | policy                                        |
|------------------------------------------------------|-----------------------------------------------|
| malformed XML                                        | DataError naming the file, line and column    |
| <filename> absolute, "..", backslash, symlink out    | DataError naming the XML file                 |
| a labelme folder (*.json with shapes and imagePath) | DataError: "looks like labelme JSON, not VOC" |
| no XML file found; no image found for any XML; or   | DataError naming what was looked for and      |
|   every <object> lost                                |   where                                       |
| <filename> without extension or in another case     | the one image file that matches is used       |
|   than the file (Roboflow)                           |   (not a problem: the match is unambiguous)   |
| two XML files naming the same image                  | DataError naming both files                   |
| object without <name> or with a non-numeric bndbox   | DataError naming the file and object #k       |
| <name> not in the labels file                        | DataError naming the file and object #k       |
| labels file with a duplicate name                    | DataError naming the file and line            |
| image_missing: no <filename>, or file not on disk    | image skipped with its annotations, counted   |
| image_unreadable: corrupt / truncated file           | image skipped, counted; the file is untouched |
| image_size_mismatch: <size> != the file's size       | the file's size (after EXIF) is used, counted |
| box_degenerate: zero or negative width/height        | instance dropped, counted                     |
| box_clipped: box partly outside the image            | box clipped to the image, counted             |
| box_outside: box wholly outside the image            | instance dropped, counted                     |
| polygon_invalid: (VOC has no polygons)               | never raised                                  |
| mask_object_unmatched: object PNG index with no      | those pixels ignored (background), counted    |
|   matching <object> and no class to give it          |                                               |
| mask_colour_unknown: RGB mask colour in neither the  | those pixels ignored (background), counted    |
|   label map nor the VOC palette                      |                                               |
| image_unannotated: image file beside the annotated   | not ingested, counted                         |
|   ones with no XML naming it                         |                                               |
| mask_size_mismatch: PNG size != image size           | the PNG is ignored, counted                   |
| mask_class_only: class PNG without object PNG        | no instance masks; only its 255 region kept   |
| split_unmatched: ImageSets stem without an XML       | line ignored, counted                         |

The counted kinds are `COMMON_POLICIES` plus `VOC_POLICIES`; the writer's losses are `VOC_LOSSES`.
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from visionflow.core.errors import DataError
from visionflow.formats import (COMMON_POLICIES, copy_image, ConversionReport, FormatResult, check_inside, clip_box,
                                is_background, probe, safe_relpath)
from visionflow.manifest import SPLIT_FOLDERS, Category, Instance, Sample
from visionflow.manifest.masks import IGNORE, PALETTE, encode_rle, instance_mask

VOC_POLICIES: dict[str, str] = {
    "mask_object_unmatched": "pixels of a SegmentationObject index without a matching <object> ignored (background)",
    "mask_size_mismatch": "segmentation PNG ignored (its size differs from the image)",
    "mask_class_only": "SegmentationClass without SegmentationObject: no instance masks; only its 255 region kept",
    "split_unmatched": "ImageSets/Main line without an annotation file ignored",
    "mask_colour_unknown": "RGB mask pixels of a colour in neither the label map nor the VOC palette ignored",
    "image_unannotated": "image file without an XML annotation naming it: not ingested",
}
VOC_LOSSES: dict[str, str] = {
    "crowd_as_difficult": "crowd instance written as an ordinary object with difficult=1 (VOC has no crowd)",
    "obb_as_axis_aligned": "oriented box written as its axis-aligned <bndbox> (its 4 corners only as a rasterised "
                           "SegmentationObject mask): VOC has no rotation",
    "polygons_rasterised": "polygons rasterised into SegmentationObject; read back as an RLE mask, not polygons",
    "mask_overlap": "pixels claimed by several masks go to the later one (a VOC pixel has one object)",
    "image_labels_dropped": "image-level labels not written (VOC has none)",
    "area_dropped": "instance area not written (VOC has none)",
    "attributes_dropped": "attribute not written (key not an XML name, reserved, or value not text/dict/list)",
    "attribute_type_changed": "attribute written as XML text: numbers/bools read back as strings, [x] as x",
    "split_dropped": "split other than train/val/test not written to ImageSets/Main",
    "path_flattened": "image in a subfolder written as a flat name, '/' -> '__' (VOC names are flat)",
}
SPLITS = ("train", "val", "test")
LABEL_FILES = ("labelmap.txt", "labels.txt")
COORDINATES = ("auto", "0-based", "1-based")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
_DEVKIT = re.compile(r"\bVOC\s?20\d\d\b|PASCAL VOC", re.IGNORECASE)
_FLAGS = ("truncated", "difficult", "occluded")
_OBJECT_KEYS = {"name", "pose", "bndbox", *_FLAGS}
_SAMPLE_KEYS = {"filename", "size", "object", "segmented", "group"}
_SAMPLE_ATTRS = {"split", "ignore_rle", "depth", "segmented"}  # handled explicitly by the writer
_XML_NAME = re.compile(r"^(?!xml)[A-Za-z_][\w.-]*$", re.IGNORECASE)


# --- reading ---------------------------------------------------------------------------------

def read_voc(images_root: Path, annotations: Path, source: str, root: Optional[str] = None, *,
             labels: Optional[Path] = None, coordinates: str = "auto") -> FormatResult:
    """`coordinates`: "auto" (1-based for the devkit's own files, else 0-based), "0-based" or
    "1-based" (see the module docstring for the evidence)."""
    if coordinates not in COORDINATES:
        raise ValueError(f"coordinates={coordinates!r}; expected one of {', '.join(COORDINATES)}")
    images_root = Path(images_root)
    if labels is not None and not Path(labels).is_file():
        raise DataError(labels, "labels file not found")
    voc_root, ann_dir = _locate(Path(annotations))
    found = _xml_files(ann_dir)
    docs = [(p, sub, _parse_xml(p)) for p, sub in found]
    labels = labels or next((d / n for d in (ann_dir, voc_root) for n in LABEL_FILES if (d / n).is_file()), None)
    categories = _read_labels(labels, source) if labels else _categories_from_names(docs, source)
    colours = _read_colours(labels) if labels else {}
    ids = {c.name: c.id for c in categories}
    report = ConversionReport({**COMMON_POLICIES, **VOC_POLICIES})
    splits = _read_splits(voc_root, {p.stem for p, sub, _ in docs if not sub}, report)
    root = images_root.as_posix() if root is None else root
    finder = _ImageFinder(images_root)
    masks = _Masks(voc_root, colours if labels else None, set(ids.values()), report)
    samples, seen = [], {}
    for path, sub, doc in docs:
        one_based = coordinates == "1-based" or (coordinates == "auto" and _is_devkit(doc))
        sample = _to_sample(path, sub, doc, finder, root, source, ids, masks, one_based, report)
        if sample is None:
            continue
        if sample.path in seen:
            raise DataError(path, f"image {sample.path!r} is also annotated by {seen[sample.path]}")
        seen[sample.path] = path
        split = SPLIT_FOLDERS.get(sub.lower()) if sub else splits.get(path.stem)
        if split:
            sample.attributes["split"] = split
        samples.append(sample)
    for image in finder.unused(seen):
        report.add("image_unannotated", f"{images_root / image}: no XML in {ann_dir} names it")
    _check_not_empty(docs, samples, ann_dir, images_root, report)
    return FormatResult(categories, samples, report)


def _xml_files(ann_dir: Path) -> list[tuple[Path, str]]:
    """(XML file, split folder or "") of a flat folder, else of its train/valid/test folders."""
    flat = sorted(ann_dir.glob("*.xml"))
    if flat:
        return [(p, "") for p in flat]
    split_dirs = sorted(d for d in ann_dir.iterdir() if d.is_dir() and d.name.lower() in SPLIT_FOLDERS)
    found = [(p, d.name) for d in split_dirs for p in sorted(d.glob("*.xml"))]
    labelme = None if found else _labelme_file(ann_dir)
    if labelme is not None:
        raise DataError(ann_dir, f"looks like labelme JSON, not Pascal VOC: no *.xml, and {labelme.name} holds "
                        "labelme's `shapes` and `imagePath`",
                        hint="convert it first (labelme's labelme2voc.py or labelme2coco.py examples write VOC or "
                             "COCO), then ingest that output")
    if not found:
        raise DataError(ann_dir, "no VOC XML files: looked for *.xml in it"
                        + (", in Annotations/" if ann_dir.name != "Annotations" else "")
                        + " and in its train/, valid/, val/ and test/ folders",
                        hint="point --annotations at the VOC root, its Annotations/ folder, or a folder of "
                             "<image>.xml files (a labelme or COCO folder is another format)")
    return found


def _labelme_file(folder: Path) -> Optional[Path]:
    """A labelme annotation (one JSON per image with `shapes` and `imagePath`) in the folder, if any."""
    for path in sorted(folder.glob("*.json"))[:5]:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and "shapes" in doc and "imagePath" in doc:
            return path
    return None


def _check_not_empty(docs: list, samples: list[Sample], ann_dir: Path, images_root: Path,
                     report: ConversionReport) -> None:
    """An ingest that keeps nothing is an error, never an empty dataset."""
    if not samples:
        example = next(iter(report.examples.get("image_missing", []) or report.examples.get("image_unreadable", [])),
                       "")
        raise DataError(ann_dir, f"none of the images named by its {len(docs)} XML files was found under "
                        f"{images_root}; e.g. {example}",
                        hint="set --images to the folder holding the <filename> images (devkit: JPEGImages/)")
    written = sum(len(d.findall("object")) for _, _, d in docs)
    if written and not any(s.instances for s in samples):
        raise DataError(ann_dir, f"all {written} <object>s were lost: " + "; ".join(report.lines()),
                        hint="see the counted kinds")


def _is_devkit(doc: ET.Element) -> bool:
    """The devkit's own files say so in <source> ('The VOC2007 Database', 'PASCAL VOC2007')."""
    return any(_DEVKIT.search(doc.findtext(f"source/{t}") or "") for t in ("database", "annotation"))


class _ImageFinder:
    """Resolves a <filename> to an image file under the images root.

    As written first; then, in that folder, the one file whose name matches ignoring case, or
    (a <filename> with no image extension, as Roboflow writes) whose stem matches."""

    def __init__(self, images_root: Path):
        self.root = images_root
        self.listings: dict[str, dict[str, list[str]]] = {}  # folder -> lower name/stem -> names

    def find(self, rel: str, sub: str) -> tuple[Optional[str], list[str]]:
        """(relative path or None, ambiguous candidates)."""
        candidates = [f"{sub}/{rel}", rel] if sub else [rel]
        for cand in candidates:
            if (self.root / cand).is_file():
                return cand, []
        for cand in candidates:
            folder, _, name = cand.rpartition("/")
            listing = self._listing(folder)
            hits = listing.get(name.lower(), [])
            if not hits and Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                hits = listing.get(f"stem:{name.lower()}", [])
            if len(hits) == 1:
                return f"{folder}/{hits[0]}" if folder else hits[0], []
            if hits:
                return None, hits
        return None, []

    def unused(self, used: dict[str, Path]) -> list[str]:
        """Images in the folders that held annotated images, named by no XML."""
        folders = {p.rpartition("/")[0] for p in used}
        return sorted(f"{f}/{n}" if f else n for f in folders for n in self._names(f)
                      if (f"{f}/{n}" if f else n) not in used)

    def _names(self, folder: str) -> list[str]:
        d = self.root / folder
        return sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) \
            if d.is_dir() else []

    def _listing(self, folder: str) -> dict[str, list[str]]:
        if folder not in self.listings:
            listing: dict[str, list[str]] = {}
            for name in self._names(folder):
                listing.setdefault(name.lower(), []).append(name)
                listing.setdefault(f"stem:{Path(name).stem.lower()}", []).append(name)
            self.listings[folder] = listing
        return self.listings[folder]


def _locate(annotations: Path) -> tuple[Path, Path]:
    """(VOC root, Annotations folder) from either of them."""
    if (annotations / "Annotations").is_dir():
        return annotations, annotations / "Annotations"
    if annotations.is_dir():
        return annotations.parent, annotations
    raise DataError(annotations, "not a VOC folder: expected Annotations/ or a VOC root containing it",
                    hint="set ingest.sources[].annotations to the VOC root or its Annotations/ folder")


def _parse_xml(path: Path) -> ET.Element:
    try:
        doc = ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, col = exc.position
        raise DataError(path, f"malformed XML at line {line}, column {col}: {exc}", record=f"line {line}") from None
    if doc.tag != "annotation":
        raise DataError(path, f"root element is <{doc.tag}>, expected <annotation>")
    return doc


def _read_labels(path: Path, source: str) -> list[Category]:
    """Categories in file order; ids are the line index (background, if first, is 0 and no category;
    `is_background` names it)."""
    if not Path(path).is_file():
        raise DataError(path, "labels file not found")
    names: list[str] = []
    for lineno, name, _ in labelmap_rows(Path(path).read_text(encoding="utf-8")):
        if name in names:
            raise DataError(path, f"duplicate label {name!r}", record=f"line {lineno}")
        names.append(name)
    first = 0 if names and is_background(names[0]) else 1
    return [Category(id=i, name=n, source_ids={source: i}) for i, n in enumerate(names, first)
            if not (i == 0 and first == 0)]


def labelmap_rows(text: str) -> list[tuple[int, str, Optional[tuple[int, int, int]]]]:
    """A CVAT/Datumaro label map (`name:r,g,b:parts:actions`, `#` comments) or a plain list of
    names: (line number, name, colour or None) per class line, in file order."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split(":")
        if not fields[0].strip() or line.lstrip().startswith("#"):
            continue
        rgb = fields[1].split(",") if len(fields) > 1 else []
        colour = tuple(int(v) for v in rgb) if len(rgb) == 3 and all(v.strip().isdigit() for v in rgb) else None
        rows.append((lineno, fields[0].strip(), colour))
    return rows  # type: ignore[return-value]


def _read_colours(path: Path) -> dict[tuple[int, int, int], int]:
    """RGB -> class index from a CVAT/Datumaro label map; {} when the file has no colours (plain names)."""
    rows = labelmap_rows(Path(path).read_text(encoding="utf-8"))
    offset = 0 if rows and is_background(rows[0][1]) else 1
    return {colour: i for i, (_, _, colour) in enumerate(rows, offset) if colour is not None}


def _categories_from_names(docs: list[tuple[Path, str, ET.Element]], source: str) -> list[Category]:
    names = sorted({(o.findtext("name") or "").strip() for _, _, d in docs for o in d.findall("object")} - {""})
    return [Category(id=i, name=n, source_ids={source: i}) for i, n in enumerate(names, 1)]


def _read_splits(voc_root: Path, stems: set[str], report: ConversionReport) -> dict[str, str]:
    splits: dict[str, str] = {}
    files: dict[str, str] = {}
    main = voc_root / "ImageSets" / "Main"
    for path in sorted(main.glob("*.txt")) if main.is_dir() else []:
        split = SPLIT_FOLDERS.get(path.stem.lower())  # Train.txt, valid.txt (CVAT keeps subset names)
        if split is None:
            continue  # trainval, default, per-class lists
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            stem = line.split()[0] if line.split() else ""
            if not stem:
                continue
            if stem not in stems:
                report.add("split_unmatched", f"{path} line {lineno}: {stem!r} has no Annotations/{stem}.xml")
            elif stem in splits and splits[stem] != split:
                raise DataError(path, f"{stem!r} is also listed in {files[stem]}", record=f"line {lineno}",
                                hint="train, val and test must not share images")
            else:
                splits[stem], files[stem] = split, path.name
    return splits


def _to_sample(path: Path, sub: str, doc: ET.Element, finder: _ImageFinder, root: str, source: str,
               ids: dict[str, int], masks: "_Masks", one_based: bool, report: ConversionReport) -> Optional[Sample]:
    images_root = finder.root
    filename = (doc.findtext("filename") or "").strip()
    if not filename:
        report.add("image_missing", f"{path}: no <filename>")
        return None
    try:
        rel = safe_relpath(filename)
        found, ambiguous = finder.find(rel, sub)
        rel = found or rel
        check_inside(images_root, rel)
    except ValueError as exc:
        raise DataError(path, f"unsafe <filename>: {exc}", hint="paths must stay inside the dataset root") from None
    if ambiguous:
        report.add("image_missing", f"{path} ({rel}): several files match: {', '.join(ambiguous)}")
        return None
    declared = (_int_or_none(doc.findtext("size/width")), _int_or_none(doc.findtext("size/height")))
    probed = probe(images_root / rel, declared, report, f"{path} ({rel})")
    if probed is None:
        return None
    width, height, sha = probed
    objects = doc.findall("object")
    instances = [_to_instance(o, k, path, width, height, ids, one_based, report)
                 for k, o in enumerate(objects, 1)]  # k = the object's index in SegmentationObject
    attributes = _children(doc, _SAMPLE_KEYS)
    depth = _int_or_none(doc.findtext("size/depth"))
    if depth is not None:
        attributes["depth"] = depth
    if doc.find("segmented") is not None:
        attributes["segmented"] = _int_or_none(doc.findtext("segmented")) or 0
    classes = [ids[(o.findtext("name") or "").strip()] for o in objects]
    extra = masks.attach(path, instances, classes, attributes, width, height)
    sid = f"{source}/{rel}"
    return Sample(id=sid, root=root, path=rel, width=width, height=height, sha256=sha,
                  instances=[i for i in instances if i is not None] + extra,
                  group=(doc.findtext("group") or "").strip() or sid, attributes=attributes)


def _to_instance(obj: ET.Element, k: int, path: Path, width: int, height: int, ids: dict[str, int],
                 one_based: bool, report: ConversionReport) -> Optional[Instance]:
    record = f"object #{k}"
    name = (obj.findtext("name") or "").strip()
    if name not in ids:
        why = "has no <name>" if not name else f"class {name!r} is not in the labels file"
        raise DataError(path, why, record=record, hint="add it to labelmap.txt/labels.txt" if name else None)
    try:
        xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError):
        raise DataError(path, "<bndbox> needs numeric xmin, ymin, xmax, ymax", record=record) from None
    shift = 1 if one_based else 0
    box = clip_box([xmin - shift, ymin - shift, xmax, ymax], width, height, report, f"{path} {record}")
    if box is None:
        return None
    attributes = _children(obj, _OBJECT_KEYS)
    if obj.find("pose") is not None:
        attributes["pose"] = (obj.findtext("pose") or "").strip()
    for flag in _FLAGS:
        if obj.find(flag) is not None:
            attributes[flag] = _int_or_none(obj.findtext(flag)) or 0
    return Instance(bbox=box, category_id=ids[name], attributes=attributes)


class _Masks:
    """SegmentationObject / SegmentationClass PNGs of one VOC root (palette or RGB)."""

    def __init__(self, voc_root: Path, colours: Optional[dict[tuple[int, int, int], int]], class_ids: set[int],
                 report: ConversionReport):
        self.root, self.report, self.class_ids = voc_root, report, class_ids
        self.colours = colours  # None: no labels file, so class indices cannot be trusted
        self.palette = {tuple(PALETTE[3 * i:3 * i + 3]): i for i in range(256)}

    def attach(self, path: Path, instances: list[Optional[Instance]], classes: list[int], attributes: dict,
               width: int, height: int) -> list[Instance]:
        """Per-object RLE and attributes["ignore_rle"] (255); returns mask-only instances."""
        report = self.report
        objects = self._load(self.root / "SegmentationObject" / f"{path.stem}.png", width, height, self.palette)
        class_map = self.colours or self.palette
        class_png = self._load(self.root / "SegmentationClass" / f"{path.stem}.png", width, height, class_map)
        if objects is None and class_png is not None:
            report.add("mask_class_only", f"{path}: SegmentationClass/{path.stem}.png without SegmentationObject")
        index = objects if objects is not None else class_png
        if index is None:
            return []
        if (index == IGNORE).any():
            attributes["ignore_rle"] = encode_rle(index == IGNORE)
        if objects is None:
            return []
        extra = []
        for k in sorted(set(np.unique(objects).tolist()) - {0, IGNORE}):
            pixels = objects == k
            cls = self._class_of(class_png, pixels) if self.colours is not None else None
            if k <= len(classes) and cls in (None, classes[k - 1]):
                if instances[k - 1] is not None:  # None: the object's box was dropped (counted there)
                    instances[k - 1].rle = encode_rle(pixels)
            elif cls in self.class_ids:  # a mask with no <object> of its own (CVAT: ellipses, polygons)
                ys, xs = np.nonzero(pixels)
                extra.append(Instance(bbox=[float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                                      category_id=cls, rle=encode_rle(pixels)))
            else:
                report.add("mask_object_unmatched", f"{path}: SegmentationObject index {k}, "
                                                    f"but the XML has {len(classes)} objects")
        return extra

    @staticmethod
    def _class_of(class_png: Optional[np.ndarray], pixels: np.ndarray) -> Optional[int]:
        if class_png is None:
            return None
        values, counts = np.unique(class_png[pixels], return_counts=True)
        keep = (values != 0) & (values != IGNORE)
        return int(values[keep][counts[keep].argmax()]) if keep.any() else 0

    def _load(self, path: Path, width: int, height: int,
              colours: dict[tuple[int, int, int], int]) -> Optional[np.ndarray]:
        """(H, W) uint8 index image; an RGB PNG is mapped to indices through `colours`."""
        if not path.is_file():
            return None
        with Image.open(path) as img:
            if img.mode in ("P", "L"):
                index = np.asarray(img, dtype=np.uint8)
            elif img.mode in ("RGB", "RGBA"):
                index = self._rgb_to_index(np.asarray(img.convert("RGB")), colours, path)
            else:
                raise DataError(path, f"mask mode {img.mode} is neither an index nor an RGB PNG",
                                hint="VOC masks are palette (P) PNGs, or RGB in the label map's colours")
        if index.shape != (height, width):
            self.report.add("mask_size_mismatch",
                            f"{path}: {index.shape[1]}x{index.shape[0]}, image is {width}x{height}")
            return None
        return index

    def _rgb_to_index(self, rgb: np.ndarray, colours: dict[tuple[int, int, int], int], path: Path) -> np.ndarray:
        keys = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        values, inverse = np.unique(keys, return_inverse=True)
        lut = np.zeros(len(values), np.uint8)
        for n, v in enumerate(values.tolist()):
            rgb_key = (v >> 16, (v >> 8) & 255, v & 255)
            if rgb_key in colours:
                lut[n] = colours[rgb_key]
            else:
                self.report.add("mask_colour_unknown", f"{path}: colour {rgb_key}")
        return lut[inverse].reshape(rgb.shape[:2])


def _element_value(el: ET.Element) -> Any:
    """XML element -> str (leaf) or dict of its children."""
    return (el.text or "").strip() if len(el) == 0 else _children(el)


def _children(el: ET.Element, skip: set[str] | frozenset = frozenset()) -> dict[str, Any]:
    """Child elements by tag; a repeated tag (e.g. a person's <part>s) becomes a list."""
    out: dict[str, Any] = {}
    for child in el:
        if child.tag in skip:
            continue
        value = _element_value(child)
        if child.tag in out:
            out[child.tag] = (out[child.tag] if isinstance(out[child.tag], list) else [out[child.tag]]) + [value]
        else:
            out[child.tag] = value
    return out


def _int_or_none(text: Optional[str]) -> Optional[int]:
    try:
        return int(float(text)) if text is not None and text.strip() else None
    except ValueError:
        return None


# --- writing ---------------------------------------------------------------------------------

def write_voc(samples: Iterable[Sample], categories: list[Category], out_dir: Path,
              project_root: Path = Path("."), copy_images: bool = True,
              report: Optional[ConversionReport] = None) -> Path:
    """Write a VOC root into `out_dir` and return it (read it back with images_root=out_dir/JPEGImages).

    Images go to JPEGImages/ under their own (flattened) names; masks (RLE or rasterised
    polygons, plus attributes["ignore_rle"] as 255) to SegmentationObject/ (index = object
    order) and SegmentationClass/ (index = 1 + position in `categories`, listed in
    labelmap.txt); what VOC cannot hold is counted in `report` under `VOC_LOSSES`.
    """
    out_dir = Path(out_dir)
    report = report if report is not None else ConversionReport()
    report.policies.update(VOC_LOSSES)
    if len(categories) >= IGNORE:
        raise ValueError(f"{len(categories)} categories do not fit a VOC palette PNG (at most 254)")
    class_index = {c.id: i for i, c in enumerate(categories, 1)}
    names = {c.id: c.name for c in categories}
    splits: dict[str, list[str]] = {}
    used: dict[str, str] = {}
    for s in samples:
        flat = s.path.replace("/", "__")
        if "/" in s.path:
            report.add("path_flattened", f"{s.id}: {s.path} -> {flat}")
        stem = Path(flat).stem
        if stem in used:
            raise ValueError(f"samples {used[stem]} and {s.id} both become {stem!r}; VOC names must be unique")
        used[stem] = s.id
        masks = _sample_masks(s, report)
        doc = _sample_xml(s, flat, names, masks is not None, report)
        (out_dir / "Annotations").mkdir(parents=True, exist_ok=True)
        ET.indent(doc)
        ET.ElementTree(doc).write(out_dir / "Annotations" / f"{stem}.xml", encoding="utf-8")
        if masks is not None:
            _write_masks(out_dir, stem, s, masks, class_index, report)
        split = s.attributes.get("split")
        if split in SPLITS:
            splits.setdefault(split, []).append(stem)
        elif split is not None:
            report.add("split_dropped", f"{s.id}: split {split!r}")
        if copy_images:
            copy_image(s, out_dir / "JPEGImages" / flat, Path(project_root))
    _write_splits(out_dir, splits)
    _write_labelmap(out_dir, categories)
    return out_dir


def _sample_xml(s: Sample, flat: str, names: dict[int, str], segmented: bool,
                report: ConversionReport) -> ET.Element:
    doc = ET.Element("annotation")
    if "folder" in s.attributes:
        _put(doc, "folder", s.attributes["folder"], report, s.id)
    ET.SubElement(doc, "filename").text = flat
    for key, value in s.attributes.items():
        if key not in _SAMPLE_ATTRS and key != "folder":
            _put(doc, key, value, report, s.id, reserved=_SAMPLE_KEYS)
    size = ET.SubElement(doc, "size")
    for tag, v in (("width", s.width), ("height", s.height), ("depth", s.attributes.get("depth", 3))):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(doc, "segmented").text = str(1 if segmented else int(s.attributes.get("segmented", 0)))
    if s.group and s.group != s.id:
        ET.SubElement(doc, "group").text = s.group
    if s.labels:
        report.add("image_labels_dropped", f"{s.id}: labels {s.labels}")
    for k, inst in enumerate(s.instances, 1):
        if inst.category_id not in names:
            raise ValueError(f"{s.id} object #{k}: category id {inst.category_id} is not in the category table")
        doc.append(_object_xml(inst, names[inst.category_id], report, f"{s.id} object #{k}", _devkit_sample(s)))
    return doc


def _devkit_sample(s: Sample) -> bool:
    """Written 1-based when the reader will read it so: a sample from the devkit's own files."""
    src = s.attributes.get("source")
    return isinstance(src, dict) and any(isinstance(src.get(t), str) and _DEVKIT.search(src[t])
                                         for t in ("database", "annotation"))


def _object_xml(inst: Instance, name: str, report: ConversionReport, where: str, one_based: bool) -> ET.Element:
    obj = ET.Element("object")
    ET.SubElement(obj, "name").text = name
    ET.SubElement(obj, "pose").text = str(inst.attributes.get("pose", "Unspecified"))
    flags = {"truncated": 0, "difficult": 0, **{f: inst.attributes[f] for f in _FLAGS if f in inst.attributes}}
    if inst.iscrowd:
        flags["difficult"] = 1
        report.add("crowd_as_difficult", where)
    if inst.attributes.get("obb") is True:
        report.add("obb_as_axis_aligned", where)
    for flag, v in flags.items():
        ET.SubElement(obj, flag).text = str(int(v))
    x1, y1, x2, y2 = inst.bbox
    bndbox = ET.SubElement(obj, "bndbox")
    shift = 1 if one_based else 0
    for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), (x1 + shift, y1 + shift, x2, y2)):
        ET.SubElement(bndbox, tag).text = repr(float(v)) if v != int(v) else str(int(v))
    for key, value in inst.attributes.items():
        if key not in _OBJECT_KEYS:
            _put(obj, key, value, report, where, reserved=_OBJECT_KEYS)
    if inst.area is not None:
        report.add("area_dropped", where)
    return obj


def _put(parent: ET.Element, key: str, value: Any, report: ConversionReport, where: str,
         reserved: frozenset | set = frozenset()) -> None:
    """An attribute as XML the reader maps back (see `_element_value`); what it cannot, counted."""
    if not isinstance(key, str) or not _XML_NAME.match(key) or key in reserved:
        report.add("attributes_dropped", f"{where}: key {key!r}")
    elif isinstance(value, dict):
        el = ET.SubElement(parent, key)
        for k, v in value.items():
            _put(el, k, v, report, where)
    elif isinstance(value, list) and value and not any(isinstance(v, list) for v in value):
        if len(value) == 1:
            report.add("attribute_type_changed", f"{where}: {key} is a one-item list")
        for v in value:
            _put(parent, key, v, report, where)
    elif isinstance(value, (str, int, float, bool)):
        if not isinstance(value, str):
            report.add("attribute_type_changed", f"{where}: {key}={value!r} written as text")
        ET.SubElement(parent, key).text = str(value)
    else:
        report.add("attributes_dropped", f"{where}: {key}={value!r}")


def _sample_masks(s: Sample, report: ConversionReport) -> Optional[list[Optional[np.ndarray]]]:
    """One (H, W) bool mask or None per instance; None overall when the sample has no mask at all."""
    masks = []
    for k, inst in enumerate(s.instances, 1):
        if inst.polygons:
            report.add("polygons_rasterised", f"{s.id} object #{k}")
        masks.append(instance_mask(inst, s.height, s.width, f"{s.id} instance #{len(masks)}"))
    if all(m is None for m in masks) and "ignore_rle" not in s.attributes:
        return None
    return masks


def _write_masks(out_dir: Path, stem: str, s: Sample, masks: list[Optional[np.ndarray]],
                 class_index: dict[int, int], report: ConversionReport) -> None:
    objects = np.zeros((s.height, s.width), np.uint8)
    classes = np.zeros_like(objects)
    layers = [(m, k, class_index[inst.category_id]) for k, (m, inst) in enumerate(zip(masks, s.instances), 1)
              if m is not None]
    if "ignore_rle" in s.attributes:  # VOC draws the boundary/ignore band over the objects
        ignore = mask_utils.decode({**s.attributes["ignore_rle"],
                                    "counts": s.attributes["ignore_rle"]["counts"].encode("ascii")})
        layers.append((ignore.astype(bool), IGNORE, IGNORE))
    for mask, obj_value, class_value in layers:
        if objects[mask].any():
            report.add("mask_overlap", f"{s.id}: mask {obj_value} overlaps an earlier one")
        objects[mask], classes[mask] = obj_value, class_value
    for folder, index in (("SegmentationObject", objects), ("SegmentationClass", classes)):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(index, mode="P")
        img.putpalette(PALETTE)
        img.save(out_dir / folder / f"{stem}.png")


def _write_splits(out_dir: Path, splits: dict[str, list[str]]) -> None:
    if not splits:
        return
    main = out_dir / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    splits = dict(splits)
    if "train" in splits or "val" in splits:  # the devkit ships trainval.txt too; the reader ignores it
        splits["trainval"] = sorted(splits.get("train", []) + splits.get("val", []))
    for split, stems in splits.items():
        (main / f"{split}.txt").write_text("".join(f"{s}\n" for s in sorted(stems)), encoding="utf-8")


def _write_labelmap(out_dir: Path, categories: list[Category]) -> None:
    """CVAT/Datumaro `labelmap.txt`: line index = SegmentationClass index, background first."""
    pal = PALETTE
    lines = ["# label:color_rgb:parts:actions"]
    for i, name in enumerate(["background"] + [c.name for c in categories]):
        lines.append(f"{name}:{pal[3 * i]},{pal[3 * i + 1]},{pal[3 * i + 2]}::")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "labelmap.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


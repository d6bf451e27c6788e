"""CVAT for images 1.1 XML (`annotations.xml`) <-> canonical samples.

Layout as CVAT exports it (task export: images under `images/`; project export: one folder
per subset, `images/<Subset>/<name>`, and every <image> carries `subset` and `task_id`):

    <annotations>
      <version>1.1</version>
      <meta><task>|<project>|<job> ... <labels><label><name>car</name>...</label></labels>
            [<subsets>Train\\nValidation</subsets>] ... </meta>
      <image id="0" name="a.jpg" width="64" height="48" [subset="Train" task_id="5"]>
        <box label="car" source="manual" occluded="0" xtl="1.50" ytl="2.25" xbr="30.00" ybr="20.75"
             z_order="0" [rotation="15.0"] [group_id="1"]><attribute name="model">suv</attribute></box>
        <polygon label="road" occluded="0" points="x1,y1;x2,y2;..." z_order="0"/>
        <mask label="road" occluded="0" rle="4, 3, 1, ..." left="5" top="30" width="10" height="8"/>
        <tag label="daytime" source="manual"/>
      </image>
    </annotations>

`annotations` may be the file or the export folder that holds `annotations.xml`; when the
images root is that folder and it has `images/`, the images are read from `images/`.

Reading maps:
    <label> in <meta> (declared order, skeleton sub-labels skipped) -> categories, ids 1..K
    <image name>      -> Sample.path; in a project export `<subset>/<name>` when that file exists
                         (CVAT's layout), else `<name>`
    <image subset>    -> attributes["split"] (a task export's <meta><task><subset> when the image has none) (Train/Training -> train, Validation/Val -> val,
                         Test/Testing -> test); any other subset ("default", custom) ->
                         attributes["subset"] as written; other <image> attributes (task_id, ...)
                         -> attributes as strings; `group` -> Sample.group
    <tag label>       -> Sample.labels (in order, each once)
    <box>             -> bbox [xtl, ytl, xbr, ybr]
    <box rotation=r>  -> an oriented box: polygons = [its 4 corners] (CVAT turns the box clockwise
                         by r degrees about its centre; corners start at the turned top-left),
                         bbox = their extent, attributes["obb"] = True
    <ellipse>         -> polygons = [64 points on the ellipse], bbox = their extent
    <polygon points>  -> one ring, bbox = the extent of its points
    <mask rle ...>    -> COCO RLE (compressed) over the whole image; bbox = [left, top,
                         left + width, top + height]. CVAT's rle is a row-major run-length over
                         the width x height region that starts with a background run.
    occluded (bool), z_order / group_id (int), source (str), <attribute> children (str)
                      -> Instance.attributes (one flat dict)
Images are keyed by (subset, id): a project export numbers each subset's images from 0.
The CVAT image id is not kept: the writer numbers images 0..N-1.

Validation policy (errors stop the read; counted problems are fixed or dropped and reported):

| problem                                             | policy                                        |
|-----------------------------------------------------|-----------------------------------------------|
| malformed XML                                       | DataError naming the file, line and column    |
| root is not <annotations>, or <track> elements      | DataError (export as "CVAT for images 1.1")   |
|   (a "CVAT for video" file)                         |                                               |
| duplicate label name in <meta>                      | DataError naming the label                    |
| image without integer id or name; duplicate         | DataError naming the file and the image id    |
|   (subset, id); two images with the same path       |                                               |
| no <image> read (none in the file, or no image file | DataError naming the file, what was looked    |
|   found), or every shape and tag lost               |   for and where                               |
| image name absolute, with "..", backslash, or       | DataError naming the file and the image id    |
|   resolving outside the images root (symlink)       |   (paths must stay inside the dataset root)   |
| shape with missing or non-numeric coordinates,      | DataError naming the file, image id and shape |
|   occluded, z_order or group_id; reserved           |                                               |
|   <attribute> name (occluded, z_order, ...)         |                                               |
| image_missing / image_unreadable                    | image skipped with its annotations, counted   |
| image_size_mismatch: width/height != the file's     | the file's size (after EXIF) is used, counted |
| box_degenerate / box_outside                        | instance dropped, counted                     |
| box_clipped: box partly outside the image           | box clipped to the image, counted             |
| polygon_invalid: polygon with < 3 points            | ring dropped, instance kept with the box of   |
|                                                     |   its points, counted                         |
| label_undeclared: shape/tag label empty or not      | shape skipped, counted                        |
|   declared in <meta>                                |                                               |
| ellipse_polygonised: <ellipse>                      | kept as a 64-point polygon, counted           |
| mask_invalid: rle runs do not fill width x height   | instance dropped, counted                     |
| shape_unsupported: polyline, points, cuboid,        | shape skipped, counted (whatever its label)   |
|   skeleton, <mask> without rle, unknown elements    |                                               |
| tag_attribute_dropped: <attribute> inside a <tag>   | attribute dropped (tag kept), counted         |

The shared kinds and policies are `visionflow.formats.COMMON_POLICIES`; the others are
`READ_POLICIES`.

Writing (`annotations.xml` + `images/<Sample.path>`; a <project> meta with <subsets> when any
sample has a split or subset, else a <task> meta; labels declared with their instance
attributes as free-text attributes; coordinates written exactly, not to CVAT's 2 decimals).
What CVAT cannot hold is counted in the report (`WRITE_POLICIES`):

| loss                                                | policy                                        |
|-----------------------------------------------------|-----------------------------------------------|
| crowd_dropped: iscrowd                              | written as a plain shape                      |
| area_dropped: Instance.area                         | not written                                   |
| box_not_written: bbox != extent of polygon/mask     | CVAT re-derives the box from the shape        |
| polygons_dropped: instance with RLE and polygons    | the mask is written                           |
| polygon_rings_split: instance with several rings    | one <polygon> per ring (read back as several) |
| (none) attributes["obb"] with a 4-corner polygon    | written as <box rotation=...>: lossless       |
| mask_empty: RLE with no foreground                  | written as a <box> of the bbox                |
| attribute_stringified: non-string attribute value   | written as JSON text (reads back as a string) |
| attribute_dropped: reserved / non-XML name, or      | not written                                   |
|   occluded/z_order/group_id/source of a wrong type  |                                               |
The XML is parsed with the standard library (expat >= 2.4.1 refuses entity-expansion bombs;
external entities are never fetched).
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from pycocotools import mask as mask_utils

from visionflow.core.errors import DataError
from visionflow.formats import (COMMON_POLICIES, copy_image, ConversionReport, FormatResult, check_inside, clean_polygons,
                                clip_box, probe, safe_relpath)
from visionflow.core.files import atomic_path
from visionflow.manifest import Category, Instance, Sample
from visionflow.manifest.masks import decode_rle

ANNOTATION_FILE = "annotations.xml"
IMAGES_DIR = "images"
READ_POLICIES: dict[str, str] = {
    "label_undeclared": "shape or tag skipped: its label is empty or not declared in <meta><labels>",
    "ellipse_polygonised": "ellipse kept as a 64-point polygon (bbox = the polygon's extent)",
    "mask_invalid": "instance dropped (mask rle runs do not add up to width x height)",
    "shape_unsupported": "shape skipped (polyline, points, cuboid, skeleton, mask without rle or unknown element)",
    "tag_attribute_dropped": "attribute of an image tag dropped; the tag is kept as an image label",
}
WRITE_POLICIES: dict[str, str] = {
    "crowd_dropped": "iscrowd not written (CVAT has no crowd flag); the region is written as a plain shape",
    "area_dropped": "area not written (CVAT stores none)",
    "box_not_written": "box differs from the extent of the polygon/mask written; CVAT re-derives it from the shape",
    "polygons_dropped": "instance has an RLE mask and polygons: the mask is written, the polygons are not",
    "polygon_rings_split": "instance with several rings written as one <polygon> per ring (read back as several)",
    "mask_empty": "empty RLE mask written as a <box> of the instance's bbox",
    "attribute_stringified": "non-string attribute value written as JSON text (read back as a string)",
    "attribute_dropped": "attribute not written (name reserved or not an XML name, or value of the wrong type)",
}
_SPLITS = {"train": "train", "training": "train", "validation": "val", "val": "val", "valid": "val",
           "test": "test", "testing": "test"}
_SUBSET_NAMES = {"train": "Train", "val": "Validation", "test": "Test"}  # how CVAT spells them
_FLAGS = ("occluded", "z_order", "group_id", "source")  # shape XML attributes kept in Instance.attributes
_IMAGE_KEYS = {"id", "name", "width", "height", "subset", "group"}
_SHAPES = ("box", "polygon", "mask", "ellipse", "tag")  # what the reader keeps
_ELLIPSE_POINTS = 64
OBB = "obb"  # Instance.attributes key: polygons[0] is an oriented box's 4 corners
_XML_NAME = re.compile(r"^[A-Za-z_][\w.-]*$")


@dataclass
class _Shape:
    """A <box>, <polygon> or <mask rle> parsed and checked, before the image size is known."""
    tag: str
    category_id: int
    geometry: list[float]  # box: xtl, ytl, xbr, ybr, rotation; polygon: x, y, ...; mask: left, top, w, h
    attributes: dict[str, Any]
    rle: str = ""
    record: str = ""


@dataclass
class _Image:
    id: int
    rel: str
    declared: tuple[Optional[int], Optional[int]]
    attributes: dict[str, str]
    group: Optional[str]
    labels: list[int]
    shapes: list[_Shape]
    skipped: list[tuple[str, str]]  # (record, what) of unsupported shapes and tag attributes


# --- reading ---------------------------------------------------------------------------------

def read_cvat(images_root: Path, annotations: Path, source: str, root: Optional[str] = None) -> FormatResult:
    images_root, annotations = Path(images_root), _find_annotations(Path(annotations))
    if images_root.resolve() == annotations.parent.resolve() and (images_root / IMAGES_DIR).is_dir():
        # The export folder given as the images root: CVAT puts the images in images/.
        images_root = images_root / IMAGES_DIR
        root = None if root is None else f"{root.rstrip('/')}/{IMAGES_DIR}"
    doc = _load_xml(annotations)
    categories = _read_labels(doc, annotations, source)
    cat_ids = {c.name: c.id for c in categories}
    images = _read_images(doc, annotations, images_root, cat_ids)

    # Structure is valid; only now touch the image files (the slow part).
    report = ConversionReport({**COMMON_POLICIES, **READ_POLICIES})
    root = images_root.as_posix() if root is None else root
    samples = []
    for img in images:
        sample = _to_sample(img, images_root, root, source, annotations, report)
        if sample is not None:
            samples.append(sample)
    _check_not_empty(images, samples, annotations, images_root, report)
    return FormatResult(categories, samples, report)


def _find_annotations(path: Path) -> Path:
    """The XML file itself, or `annotations.xml` (else the only *.xml) inside an export folder."""
    if not path.is_dir():
        return path
    candidates = [path / ANNOTATION_FILE] if (path / ANNOTATION_FILE).is_file() else sorted(path.glob("*.xml"))
    if len(candidates) != 1:
        found = f"found {', '.join(p.name for p in candidates)}" if candidates else "found no *.xml"
        raise DataError(path, f"is a folder; looked for {ANNOTATION_FILE} in it and {found}",
                        hint="give the annotations.xml of a 'CVAT for images 1.1' export as --annotations")
    return candidates[0]


def _check_not_empty(images: list[_Image], samples: list[Sample], path: Path, images_root: Path,
                     report: ConversionReport) -> None:
    """An ingest that keeps nothing is an error, never an empty dataset."""
    if not images:
        raise DataError(path, "has no <image> elements", hint="export the task as 'CVAT for images 1.1' "
                        "(a job or task with images, not an empty one)")
    if not samples:
        example = next(iter(report.examples.get("image_missing", []) or report.examples.get("image_unreadable", [])),
                       "")
        raise DataError(path, f"none of its {len(images)} images was found under {images_root} "
                        f"(e.g. {images[0].rel!r}); {example}",
                        hint="set --images to the folder that holds the image names written in the XML "
                             "(for a CVAT export: its images/ folder)")
    written = sum(len(i.shapes) + len(i.labels) + len(i.skipped) for i in images)
    kept = sum(len(s.instances) + len(s.labels) for s in samples)
    if written and not kept:
        raise DataError(path, f"all {written} shapes and tags were lost: " + "; ".join(report.lines()),
                        hint="see the counted kinds; CVAT boxes, polygons, ellipses, masks and tags are read")


def _load_xml(path: Path) -> ET.Element:
    try:
        doc = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(path, "annotation file not found", hint="check ingest.sources[].annotations") from None
    except ET.ParseError as exc:
        raise DataError(path, f"malformed XML: {exc}", record=f"line {exc.position[0]}",
                        hint="re-export the task from CVAT") from None
    if doc.tag != "annotations":
        raise DataError(path, f"not a CVAT file: the root element is <{doc.tag}>, expected <annotations>")
    if doc.find("track") is not None:
        raise DataError(path, "this is a 'CVAT for video' file (<track> elements)",
                        hint="export the task as 'CVAT for images 1.1'")
    return doc


def _read_labels(doc: ET.Element, path: Path, source: str) -> list[Category]:
    labels = next((x for x in (doc.find(f"meta/{k}/labels") for k in ("task", "project", "job")) if x is not None),
                  None)
    cats: list[Category] = []
    for label in [] if labels is None else labels.findall("label"):
        name = (label.findtext("name") or "").strip()
        if (label.findtext("parent") or "").strip():
            continue  # a skeleton's point: only used inside <skeleton>, which is unsupported
        if not name or any(c.name == name for c in cats):
            raise DataError(path, "label without a name or declared twice in <meta>", record=f"label {name!r}")
        cats.append(Category(id=len(cats) + 1, name=name, source_ids={source: len(cats) + 1}))
    return cats


def _read_images(doc: ET.Element, path: Path, images_root: Path, cat_ids: dict[str, int]) -> list[_Image]:
    images: list[_Image] = []
    seen_ids: set[tuple[str, int]] = set()
    seen_paths: dict[str, str] = {}
    # A task export: the task's subset (Train, Test, ...) is the split of all its images.
    task_subset = (doc.findtext("meta/task/subset") or "").strip()
    task_subset = task_subset if task_subset.lower() in _SPLITS else ""
    for el in doc.findall("image"):
        iid = _int(el.get("id"))
        subset = (el.get("subset") or "").strip()
        # A project export numbers each subset's images from 0: the key is (subset, id).
        record = f"image id {el.get('id')}" + (f" (subset {subset!r})" if subset else "")
        if iid is None or (subset, iid) in seen_ids:
            raise DataError(path, "missing, malformed or duplicate image id", record=record)
        seen_ids.add((subset, iid))
        rel = _image_path(el, path, images_root, record)
        if rel in seen_paths:
            raise DataError(path, f"image path {rel!r} also used by {seen_paths[rel]}", record=record)
        seen_paths[rel] = record
        declared = (_int(el.get("width")), _int(el.get("height")))
        attrs = {k: v for k, v in el.attrib.items() if k not in _IMAGE_KEYS}
        subset = subset or task_subset
        if subset.lower() in _SPLITS:
            attrs["split"] = _SPLITS[subset.lower()]
        elif subset:  # "default" or a custom subset: not a split the split stage could honour
            attrs["subset"] = subset
        image = _Image(iid, rel, declared if None not in declared else (None, None), attrs, el.get("group"),
                       [], [], [])
        for n, child in enumerate(el):
            _read_child(child, image, cat_ids, path, f"{record} <{child.tag}> #{n}")
        images.append(image)
    return images


def _read_child(el: ET.Element, image: _Image, cat_ids: dict[str, int], path: Path, record: str) -> None:
    label = el.get("label")
    if el.tag not in _SHAPES or (el.tag == "mask" and not el.get("rle")):
        image.skipped.append((f"{record} label {label!r}", "shape_unsupported"))
        return
    if label not in cat_ids:  # counted, not fatal: one stray shape must not stop the whole file
        image.skipped.append((f"{record} label {label!r}", "label_undeclared"))
        return
    if el.tag == "tag":
        if cat_ids[label] not in image.labels:
            image.labels.append(cat_ids[label])
        image.skipped += [(record, "tag_attribute_dropped")] * len(el.findall("attribute"))
    elif el.tag == "box":
        geometry = _floats(el, ("xtl", "ytl", "xbr", "ybr"), path, record) + \
            _floats(el, ("rotation",), path, record, default=0.0)
        image.shapes.append(_Shape("box", cat_ids[label], geometry, _shape_attributes(el, path, record),
                                   record=record))
    elif el.tag == "polygon":
        image.shapes.append(_Shape("polygon", cat_ids[label], _points(el.get("points"), path, record),
                                   _shape_attributes(el, path, record), record=record))
    elif el.tag == "ellipse":
        geometry = _floats(el, ("cx", "cy", "rx", "ry"), path, record) + \
            _floats(el, ("rotation",), path, record, default=0.0)
        image.shapes.append(_Shape("ellipse", cat_ids[label], geometry, _shape_attributes(el, path, record),
                                   record=record))
    else:  # a <mask> with rle
        geometry = _floats(el, ("left", "top", "width", "height"), path, record)
        image.shapes.append(_Shape("mask", cat_ids[label], geometry, _shape_attributes(el, path, record),
                                   rle=el.get("rle", ""), record=record))


def _image_path(el: ET.Element, path: Path, images_root: Path, record: str) -> str:
    try:
        rel = safe_relpath(el.get("name"))
        # Project exports put each subset's images in its own folder; the name omits it. When
        # neither file exists, CVAT's layout is the one reported missing.
        subset = el.get("subset")
        if subset and ((images_root / subset / rel).is_file() or not (images_root / rel).is_file()):
            rel = safe_relpath(f"{subset}/{rel}")
        check_inside(images_root, rel)
    except ValueError as exc:
        raise DataError(path, f"unsafe image name: {exc}", record=record,
                        hint="paths must stay inside the dataset root") from None
    return rel


def _to_sample(img: _Image, images_root: Path, root: str, source: str, path: Path,
               report: ConversionReport) -> Optional[Sample]:
    where = f"{path} image id {img.id} ({img.rel})"
    probed = probe(images_root / img.rel, img.declared, report, where)
    if probed is None:
        return None
    width, height, sha = probed
    for record, kind in img.skipped:
        report.add(kind, f"{path} {record} ({img.rel})")
    instances = []
    for shape in img.shapes:
        inst = _to_instance(shape, width, height, report, f"{path} {shape.record} ({img.rel})")
        if inst is not None:
            instances.append(inst)
    sid = f"{source}/{img.rel}"
    return Sample(id=sid, root=root, path=img.rel, width=width, height=height, sha256=sha, labels=img.labels,
                  instances=instances, group=img.group or sid, attributes=img.attributes)


def _to_instance(shape: _Shape, width: int, height: int, report: ConversionReport,
                 where: str) -> Optional[Instance]:
    polygons: list[list[float]] = []
    rle = None
    g = shape.geometry
    attributes = shape.attributes
    if shape.tag == "box" and g[4]:
        polygons = [rotated_corners(g[:4], g[4])]
        box = _extent(polygons[0])
        attributes = {**attributes, OBB: True}
    elif shape.tag == "box":
        box = g[:4]
    elif shape.tag == "ellipse":
        report.add("ellipse_polygonised", where)
        polygons = [_ellipse_points(*g)]
        box = _extent(polygons[0])
    elif shape.tag == "polygon":
        box = [min(g[0::2]), min(g[1::2]), max(g[0::2]), max(g[1::2])]
        polygons = clean_polygons([g], report, where)
    else:
        left, top, w, h = (int(v) for v in g)
        rle = _decode_cvat_mask(shape.rle, left, top, w, h, width, height)
        if rle is None:
            report.add("mask_invalid", where)
            return None
        box = [float(left), float(top), float(left + w), float(top + h)]
    box = clip_box(box, width, height, report, where)
    if box is None:
        return None
    return Instance(bbox=box, category_id=shape.category_id, polygons=polygons, rle=rle,
                    attributes=attributes)


def _shape_attributes(el: ET.Element, path: Path, record: str) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    occluded = el.get("occluded", "0").strip().lower()
    if occluded not in ("0", "1", "true", "false"):
        raise DataError(path, f"occluded={occluded!r} is not 0 or 1", record=record)
    attrs["occluded"] = occluded in ("1", "true")
    for key in ("z_order", "group_id"):
        if el.get(key) is not None:
            if _int(el.get(key)) is None:
                raise DataError(path, f"{key}={el.get(key)!r} is not an integer", record=record)
            attrs[key] = _int(el.get(key))
    if el.get("source") is not None:
        attrs["source"] = el.get("source")
    for a in el.findall("attribute"):
        name = a.get("name")
        if not name or name in _FLAGS:
            raise DataError(path, f"<attribute name={name!r}> is empty or clashes with a shape field", record=record,
                            hint=f"rename the label attribute; reserved: {', '.join(_FLAGS)}")
        attrs[name] = a.text or ""
    return attrs


def rotated_corners(box: list[float], degrees: float) -> list[float]:
    """[x, y] * 4 of a box turned clockwise on screen (y down) by `degrees` about its centre,
    from the turned top-left corner round: CVAT's `rotation`."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    out: list[float] = []
    for x, y in ((box[0], box[1]), (box[2], box[1]), (box[2], box[3]), (box[0], box[3])):
        dx, dy = x - cx, y - cy
        out += [float(cx + dx * c - dy * s), float(cy + dx * s + dy * c)]
    return out


def _unrotated(corners: list[float]) -> tuple[list[float], float]:
    """Inverse of `rotated_corners`: ([xtl, ytl, xbr, ybr], degrees in [0, 360))."""
    (x0, y0), (x1, y1), (x3, y3) = corners[0:2], corners[2:4], corners[6:8]
    cx, cy = (corners[0] + corners[4]) / 2, (corners[1] + corners[5]) / 2
    w, h = float(np.hypot(x1 - x0, y1 - y0)), float(np.hypot(x3 - x0, y3 - y0))
    degrees = float(np.rad2deg(np.arctan2(y1 - y0, x1 - x0))) % 360.0
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], degrees


def _ellipse_points(cx: float, cy: float, rx: float, ry: float, degrees: float) -> list[float]:
    t = np.linspace(0.0, 2 * np.pi, _ELLIPSE_POINTS, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    return np.stack([cx + x * c - y * s, cy + x * s + y * c], axis=1).ravel().tolist()


def _extent(ring: list[float]) -> list[float]:
    return [min(ring[0::2]), min(ring[1::2]), max(ring[0::2]), max(ring[1::2])]


def _decode_cvat_mask(text: str, left: int, top: int, w: int, h: int, width: int,
                      height: int) -> Optional[dict[str, Any]]:
    """CVAT region rle -> compressed COCO RLE of the whole (height, width) image, or None."""
    try:
        runs = np.array([int(v) for v in text.split(",")], dtype=np.int64)
    except ValueError:
        return None
    # A region far larger than the image is corrupt; refusing it keeps memory bounded.
    if w <= 0 or h <= 0 or w * h > 4 * width * height or (runs < 0).any() or runs.sum() != w * h:
        return None
    region = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8).reshape(h, w)  # (h, w), row-major
    full = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + w, width), min(top + h, height)
    if x1 > x0 and y1 > y0:
        full[y0:y1, x0:x1] = region[y0 - top:y1 - top, x0 - left:x1 - left]
    rle = mask_utils.encode(np.asfortranarray(full))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _floats(el: ET.Element, keys: tuple[str, ...], path: Path, record: str,
            default: Optional[float] = None) -> list[float]:
    out = []
    for k in keys:
        try:
            out.append(float(el.get(k)) if el.get(k) is not None or default is None else default)
        except (TypeError, ValueError):
            raise DataError(path, f"<{el.tag}> {k}={el.get(k)!r} is missing or not a number", record=record) from None
    return out


def _points(text: Optional[str], path: Path, record: str) -> list[float]:
    coords: list[float] = []
    for point in (text or "").split(";"):
        xy = point.split(",")
        try:
            if len(xy) != 2:
                raise ValueError
            coords += [float(xy[0]), float(xy[1])]
        except ValueError:
            raise DataError(path, f"points={text!r} is not 'x1,y1;x2,y2;...'", record=record) from None
    return coords


def _int(v: Optional[str]) -> Optional[int]:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


# --- writing ---------------------------------------------------------------------------------

def write_cvat(samples: Iterable[Sample], categories: list[Category], out_dir: Path,
               project_root: Path = Path("."), copy_images: bool = True,
               report: Optional[ConversionReport] = None) -> Path:
    """Write `out_dir/annotations.xml` (CVAT for images 1.1) and copy images to `out_dir/images/<path>`.

    Read it back with `read_cvat(out_dir / "images", out_dir / "annotations.xml", ...)`. Samples
    with a split (or a CVAT subset) are written as a project export (<project> meta with
    <subsets>, `subset` on each image), others as a task export. What CVAT cannot hold is
    counted in `report` (`WRITE_POLICIES`); images are numbered 0..N-1.
    """
    out_dir, samples = Path(out_dir), list(samples)
    report = report if report is not None else ConversionReport()
    report.policies.update(WRITE_POLICIES)
    names = {c.id: c.name for c in categories}
    doc = ET.Element("annotations")
    ET.SubElement(doc, "version").text = "1.1"
    doc.append(_meta(samples, categories))
    used: dict[str, str] = {}
    for image_id, s in enumerate(samples):
        if s.path in used:
            raise ValueError(f"samples {used[s.path]} and {s.id} share the path {s.path!r}; "
                             "one CVAT file cannot hold both")
        used[s.path] = s.id
        doc.append(_image_element(s, image_id, names, report))
        if copy_images:
            copy_image(s, out_dir / IMAGES_DIR / s.path, Path(project_root))
    ET.indent(doc)
    target = out_dir / ANNOTATION_FILE
    with atomic_path(target) as tmp:
        ET.ElementTree(doc).write(tmp, encoding="utf-8", xml_declaration=True)
    return target


def _meta(samples: list[Sample], categories: list[Category]) -> ET.Element:
    meta = ET.Element("meta")
    subsets = list(dict.fromkeys(_subset(s) for s in samples if _subset(s)))
    head = ET.SubElement(meta, "project" if subsets else "task")
    for key, value in (("name", "visionflow export"), ("size", str(len(samples))), ("mode", "annotation"),
                       ("overlap", "0")):
        ET.SubElement(head, key).text = value
    labels = ET.SubElement(head, "labels")
    for c in categories:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = c.name
        ET.SubElement(label, "type").text = "any"
        _declare_attributes(ET.SubElement(label, "attributes"), c.id, samples)
    if subsets:
        ET.SubElement(head, "subsets").text = "\n".join(subsets)
    return meta


def _declare_attributes(parent: ET.Element, category_id: int, samples: list[Sample]) -> None:
    # Declared as free text so a CVAT task created from this meta accepts the values.
    names = dict.fromkeys(k for s in samples for i in s.instances if i.category_id == category_id
                          for k in i.attributes if k not in _FLAGS and k != OBB)
    for name in names:
        attr = ET.SubElement(parent, "attribute")
        for key, value in (("name", name), ("mutable", "False"), ("input_type", "text"),
                           ("default_value", ""), ("values", "")):
            ET.SubElement(attr, key).text = value


def _subset(s: Sample) -> str:
    split, subset = s.attributes.get("split"), s.attributes.get("subset")
    if isinstance(split, str) and split in _SUBSET_NAMES:
        return _SUBSET_NAMES[split]
    return subset if isinstance(subset, str) else ""


def _image_element(s: Sample, image_id: int, names: dict[int, str], report: ConversionReport) -> ET.Element:
    el = ET.Element("image", {"id": str(image_id), "name": s.path, "width": str(s.width), "height": str(s.height)})
    if _subset(s):
        el.set("subset", _subset(s))
    if s.group and s.group != s.id:
        el.set("group", s.group)
    for key, value in s.attributes.items():
        if (key == "split" and value in _SUBSET_NAMES) or (key == "subset" and value == _subset(s)):
            continue  # written as `subset`
        if key in _IMAGE_KEYS or not _XML_NAME.match(key):
            report.add("attribute_dropped", f"{s.id}: image attribute {key!r}")
        else:
            el.set(key, _text(value, report, f"{s.id}: image attribute {key!r}"))
    for n, inst in enumerate(s.instances):
        for shape in _shapes(inst, names, report, f"{s.id} instance #{n}"):
            el.append(shape)
    for label in s.labels:
        ET.SubElement(el, "tag", {"label": _name(names, label, s.id), "source": "manual"})
    return el


def _shapes(inst: Instance, names: dict[int, str], report: ConversionReport, where: str) -> list[ET.Element]:
    if inst.iscrowd:
        report.add("crowd_dropped", where)
    if inst.area is not None:
        report.add("area_dropped", where)
    head = {"label": _name(names, inst.category_id, where), **_flags(inst.attributes, report, where)}
    if inst.rle is not None:
        if inst.polygons:
            report.add("polygons_dropped", where)
        shapes = _mask_shape(inst, head, report, where)
    elif inst.attributes.get(OBB) is True and len(inst.polygons) == 1 and len(inst.polygons[0]) == 8:
        box, degrees = _unrotated(inst.polygons[0])
        shapes = [_box_shape(box, head)]
        shapes[0].set("rotation", _num(degrees))
        _check_box(inst.bbox, _extent(inst.polygons[0]), report, where)
    elif inst.polygons:
        if len(inst.polygons) > 1:
            report.add("polygon_rings_split", f"{where}: {len(inst.polygons)} rings")
        shapes = [ET.Element("polygon", {**head, "points": ";".join(
            f"{_num(r[i])},{_num(r[i + 1])}" for i in range(0, len(r), 2))}) for r in inst.polygons]
        xs = [v for r in inst.polygons for v in r[0::2]]
        ys = [v for r in inst.polygons for v in r[1::2]]
        _check_box(inst.bbox, [min(xs), min(ys), max(xs), max(ys)], report, where)
    else:
        shapes = [_box_shape(inst.bbox, head)]
    for shape in shapes:
        for key, value in inst.attributes.items():
            if key not in _FLAGS and not (key == OBB and shape.tag == "box"):
                ET.SubElement(shape, "attribute", {"name": key}).text = _text(value, report, f"{where} {key!r}")
    return shapes


def _flags(attrs: dict[str, Any], report: ConversionReport, where: str) -> dict[str, str]:
    occluded = attrs.get("occluded", False)
    head = {"occluded": "1" if occluded is True or occluded == 1 else "0"}  # CVAT's importer requires it
    for key, kind in (("z_order", int), ("group_id", int), ("source", str)):
        value = attrs.get(key)
        if value is None:
            continue
        if isinstance(value, kind) and not isinstance(value, bool):
            head[key] = str(value)
        else:
            report.add("attribute_dropped", f"{where}: {key}={value!r}")
    return head


def _box_shape(box: list[float], head: dict[str, str]) -> ET.Element:
    return ET.Element("box", {**head, **dict(zip(("xtl", "ytl", "xbr", "ybr"), map(_num, box)))})


def _mask_shape(inst: Instance, head: dict[str, str], report: ConversionReport, where: str) -> list[ET.Element]:
    h, w = inst.rle["size"]
    mask = decode_rle(inst.rle, h, w, where).astype(np.uint8)  # (h, w)
    ys, xs = np.nonzero(mask)
    if not len(xs):
        report.add("mask_empty", where)
        return [_box_shape(inst.bbox, head)]
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    _check_box(inst.bbox, [x0, y0, x1, y1], report, where)
    flat = mask[y0:y1, x0:x1].ravel()  # row-major over the region, as CVAT counts
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = ([0] if flat[0] else []) + np.diff(bounds).tolist()  # CVAT starts with a background run
    return [ET.Element("mask", {**head, "rle": ", ".join(map(str, runs)), "left": str(x0), "top": str(y0),
                                "width": str(x1 - x0), "height": str(y1 - y0)})]


def _check_box(box: list[float], extent: list[float], report: ConversionReport, where: str) -> None:
    if max(abs(a - b) for a, b in zip(box, extent)) > 1e-6 * max(1.0, *map(abs, extent)):
        report.add("box_not_written", f"{where}: box {[round(v, 3) for v in box]}, shape extent "
                                      f"{[round(float(v), 3) for v in extent]}")


def _name(names: dict[int, str], category_id: int, where: str) -> str:
    if category_id not in names:
        raise ValueError(f"{where}: category id {category_id} is not in the category table")
    return names[category_id]


def _text(value: Any, report: ConversionReport, where: str) -> str:
    if isinstance(value, str):
        return value
    report.add("attribute_stringified", f"{where}: {value!r}")
    return json.dumps(value, ensure_ascii=False)


def _num(v: float) -> str:
    # repr round-trips a float exactly; CVAT itself writes 2 decimals, which it would lose.
    return repr(float(v))


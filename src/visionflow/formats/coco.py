"""COCO object-detection / instance-segmentation JSON <-> canonical samples.

Reading maps:
    image `file_name`          -> Sample.path (POSIX, relative to the images root); id "<source>/<path>".
                                  Label Studio's COCO export writes the task's image URL when it did
                                  not copy the image (`/data/upload/<n>/<name>`, `/data/local-files/?d=`):
                                  read as the Label Studio reader reads it (labelstudio.resolve_task_path)
    image `labels` [cat ids]   -> Sample.labels (image-level classes; our synth dataset writes them)
    image `group`              -> Sample.group (default: the sample id)
    ann `bbox` [x, y, w, h]    -> Instance.bbox [x1, y1, x2, y2] = [x, y, x + w, y + h], absolute pixels
    ann `segmentation`         -> polygons [[x, y, ...], ...] or RLE {"size": [h, w], "counts": str | [int]}
                                  (compressed and uncompressed RLE are kept as they are, not decoded)
    ann `iscrowd` / `is_crowd` -> Instance.iscrowd (0/1/true/false, also as strings "false"; an RLE with
                                  iscrowd 0 is a mask instance, kept as such);  `area` -> Instance.area
    ann `keypoints`, `num_keypoints` -> Instance.attributes, unchanged (docs/manifest.md)
    ann with a category_id and no bbox, segmentation or keypoints -> Sample.labels (image-level label)
    ann RLE without bbox       -> bbox = the mask's extent
    panoptic (`segments_info`; PNGs in the folder named like the JSON) -> one RLE mask instance per
                                  segment (see panoptic_to_instances)
    any other image/annotation key -> `attributes` (written back unchanged)
A captions file is refused ("captions are not annotations visionflow trains on"). Ids from 0
and ids restarting per file (Roboflow's splits, CVAT's subsets) are valid and not counted.
COCO image and annotation ids are not kept: the writer numbers images and annotations 1..N.
Category ids stay the source's (possibly non-contiguous) ids; ingest remaps them.
File names are kept exactly as written (no Unicode normalisation: on Linux the name's bytes are
the file's name), so "images/café_日本.jpg" in NFC stays NFC in the path and the id.

EXIF orientation, one policy for pixels and annotations: images are used as DISPLAYED (probe
reports the transposed size, load_rgb transposes the pixels) and annotations are taken as drawn
on the displayed image, as CVAT and Label Studio do. A declared width/height equal to the RAW
(stored) size of an image whose EXIF orientation swaps the axes (5-8) is the telltale of a tool
that ignored EXIF: that image's boxes and polygons are mapped from the raw to the displayed
frame (`images.raw_to_displayed`, orientations 2-8). Orientations 2-4 and square images have
the same size in both frames, so nothing tells them apart: their annotations are taken as
displayed.

Validation policy (errors stop the read; counted problems are fixed or dropped and reported):

| problem                                             | policy                                        |
|-----------------------------------------------------|-----------------------------------------------|
| invalid JSON                                        | DataError naming the file, line and column    |
| missing `images` list, malformed record             | DataError naming the file and the record id   |
| file_name absolute, with "..", backslash, or        | DataError naming the file and the image id    |
|   resolving outside the images root (symlink)       |   (paths must stay inside the dataset root)   |
| duplicate image id, annotation id or file_name      | DataError naming the id                       |
| duplicate category id or name                       | DataError naming the category                 |
| annotation -> unknown image id                      | DataError naming the annotation id            |
| category id (annotation or image label) not in the  | DataError naming the annotation / image id    |
|   category table                                    |                                               |
| image_missing: file not on disk                     | image skipped with its annotations, counted   |
| image_unreadable: corrupt / truncated file, or over | image skipped, counted; the file is untouched |
|   Pillow's MAX_IMAGE_PIXELS (decompression bomb)    |                                               |
| image_size_mismatch: width/height != the file's     | the file's size (after EXIF) is used, counted |
| exif_orientation_mismatch: width/height are the     | boxes and polygons mapped from the raw to the |
|   RAW size of an image with EXIF orientation 5-8    |   displayed frame, counted                    |
| exif_mask_dropped: RLE in such an image             | mask dropped (not re-encoded), mapped box     |
|                                                     |   kept, counted                               |
| `iscrowd` / `is_crowd` not 0, 1, true or false      | DataError naming the annotation id            |
| keypoints not a flat list of 3k numbers, or         | DataError naming the annotation id            |
|   keypoints without a bbox                          |                                               |
| captions file                                       | DataError: not annotations we train on        |
| panoptic PNG folder or PNG missing, PNG not RGB,    | DataError naming the file and the annotation  |
|   segment without an integer id / known category    |                                               |
| no image listed, none readable, every annotation    | DataError naming the file, an image path it   |
|   dropped                                           |   looked for and the problems counted         |
| box_absurd: a box or polygon coordinate NaN, inf,   | instance dropped, counted                     |
|   or > 100 image sizes outside the image            |                                               |
| box_degenerate: zero or negative width/height       | instance dropped, counted                     |
| box_clipped: box partly outside the image by more   | box clipped to the image, counted (up to half |
|   than half a pixel                                 |   a pixel: exporters' rounding, not counted)  |
| box_outside: box wholly outside the image           | instance dropped, counted                     |
| polygon_invalid: ring < 3 points or odd length      | ring dropped (instance kept), counted         |

The counted kinds and their policies are `COCO_POLICIES`: `visionflow.formats.COMMON_POLICIES`,
`images.FRAME_POLICIES` and the COCO-specific kinds below.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from visionflow.core.errors import DataError
from visionflow.formats import (COMMON_POLICIES, SUBPIXEL_TOLERANCE, ConversionReport, FormatResult, check_inside,
                                clean_polygons, clip_box, copy_image, load_json, probe, safe_relpath)
from visionflow.formats.labelstudio import resolve_task_path, task_path_candidates
from visionflow.manifest.images import (FRAME_POLICIES, coords_absurd, exif_orientation, raw_to_displayed)
from visionflow.core.files import write_json
from visionflow.manifest import SPLIT_FOLDERS, Category, Instance, Sample

ANNOTATION_FILE = "annotations.json"
_IMAGE_KEYS = {"id", "file_name", "width", "height", "labels", "group"}
COCO_POLICIES: dict[str, str] = {
    **COMMON_POLICIES, **FRAME_POLICIES,
    "exif_mask_dropped": "RLE mask of an instance in an exif_orientation_mismatch image dropped (masks are "
                         "not re-encoded in the displayed frame); its mapped box is kept",
}
_ANN_KEYS = {"id", "image_id", "category_id", "bbox", "segmentation", "area", "iscrowd", "is_crowd"}


# --- reading ---------------------------------------------------------------------------------

ROBOFLOW_FILE = "_annotations.coco.json"


def read_coco(images_root: Path, annotations: Path, source: str, root: Optional[str] = None) -> FormatResult:
    images_root, annotations = Path(images_root), Path(annotations)
    if annotations.is_dir():
        return _read_roboflow(images_root, annotations, source, root)
    return _read_coco_file(images_root, annotations, source, root)


def _read_roboflow(images_root: Path, folder: Path, source: str, root: Optional[str]) -> FormatResult:
    """Roboflow's COCO export: `<split>/_annotations.coco.json` with the images beside it, for
    each of train/valid/test. Sample paths become `<split folder>/<file_name>` and the split
    is kept in `attributes["split"]` (valid -> val)."""
    files = sorted(p for p in folder.glob(f"*/{ROBOFLOW_FILE}") if p.parent.name.lower() in SPLIT_FOLDERS)
    if not files:
        raise DataError(folder, f"a folder was given as COCO annotations but no <split>/{ROBOFLOW_FILE} is in it",
                        hint="point annotations at a COCO JSON file, or at a Roboflow export with train/valid/test")
    root = images_root.as_posix() if root is None else root
    categories: Optional[list[Category]] = None
    samples: list[Sample] = []
    report = ConversionReport(COCO_POLICIES)
    for f in files:
        split_dir = f.parent.name
        if images_root.resolve() != folder.resolve():
            raise DataError(f, "in a Roboflow export the images sit beside each split's annotation file",
                            hint=f"set images to the same folder as annotations ({folder})")
        part = _read_coco_file(images_root / split_dir, f, source, root)
        if categories is None:
            categories = part.categories
        elif [(c.id, c.name) for c in part.categories] != [(c.id, c.name) for c in categories]:
            raise DataError(f, "category table differs from the other splits' (same ids must mean the same names)")
        report.merge(part.report)
        for s in part.samples:
            path = f"{split_dir}/{s.path}"
            samples.append(dataclasses.replace(
                s, id=f"{source}/{path}", path=path, group=f"{source}/{path}" if s.group == s.id else s.group,
                attributes={**s.attributes, "split": SPLIT_FOLDERS[split_dir.lower()]}))
    return FormatResult(categories or [], samples, report)


def _read_coco_file(images_root: Path, annotations: Path, source: str, root: Optional[str] = None) -> FormatResult:
    doc = _load_json(annotations)
    _refuse_captions(doc, annotations)
    categories = _read_categories(doc, annotations, source)
    cat_ids = {c.id for c in categories}
    images = _read_images(doc, annotations, images_root, cat_ids)
    report = ConversionReport(COCO_POLICIES)
    if is_panoptic(doc):
        doc = {**doc, "annotations": panoptic_to_instances(doc, annotations, images, cat_ids)}
    anns_by_image, labels_by_image = _read_annotations(doc, annotations, images, cat_ids, report)

    # Structure is valid; only now touch the image files (the slow part).
    root = images_root.as_posix() if root is None else root
    samples = []
    for image_id, img in images.items():
        sample = _to_sample(img, anns_by_image.get(image_id, []), labels_by_image.get(image_id, []), images_root,
                            root, source, annotations, report)
        if sample is not None:
            samples.append(sample)
    _check_not_empty(samples, images, doc, images_root, annotations, report)
    return FormatResult(categories, samples, report)


def _refuse_captions(doc: dict, path: Path) -> None:
    anns = doc.get("annotations")
    if isinstance(anns, list) and anns and isinstance(anns[0], dict) and "caption" in anns[0] \
            and "category_id" not in anns[0]:
        raise DataError(path, "a COCO captions file: captions are not annotations visionflow trains on",
                        hint="give an instances (boxes, masks), keypoints or panoptic file")


def _check_not_empty(samples: list[Sample], images: dict, doc: dict, images_root: Path, path: Path,
                     report: ConversionReport) -> None:
    """No samples, or every annotation lost, is an error: exit 0 with nothing in it looks like success."""
    problems = "; ".join(report.lines()) or "no problems counted"
    if not images:
        raise DataError(path, "the file lists no images", hint="export the dataset with its images")
    if not samples:
        first = next(iter(images.values()))["file_name"]
        raise DataError(path, f"none of its {len(images)} images could be read; e.g. image "
                        f"{images_root / first} ({problems})",
                        hint="point images at the folder that file_name values are relative to")
    n_anns = len(doc.get("annotations") or [])
    if n_anns and not any(s.instances or s.labels for s in samples):
        raise DataError(path, f"all {n_anns} annotations were dropped ({problems})")


def _load_json(path: Path) -> dict[str, Any]:
    doc = load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(path, "not a COCO file: expected an object with an `images` list")
    return doc


def _read_categories(doc: dict, path: Path, source: str) -> list[Category]:
    cats: list[Category] = []
    ids, names = set(), set()
    for c in _records(doc, "categories", path):
        cid, name = c.get("id"), c.get("name")
        if not _is_int(cid) or not isinstance(name, str) or not name:
            raise DataError(path, "category needs an integer `id` and a non-empty `name`", record=f"category {c!r}")
        if cid in ids or name in names:  # names must be unique too: ingest merges sources by name
            raise DataError(path, "duplicate category id or name", record=f"category id {cid} ({name!r})")
        ids.add(cid)
        names.add(name)
        cats.append(Category(id=cid, name=name, supercategory=str(c.get("supercategory") or ""),
                             source_ids={source: cid}))
    return cats


def _read_images(doc: dict, path: Path, images_root: Path, cat_ids: set[int]) -> dict[Any, dict]:
    """image id -> image record, with `file_name` replaced by the checked relative path."""
    images: dict[Any, dict] = {}
    seen_names: dict[str, Any] = {}
    for img in _records(doc, "images", path):
        iid = img.get("id")
        record = f"image id {iid}"
        if not (_is_int(iid) or isinstance(iid, str)) or iid in images:
            raise DataError(path, "missing, malformed or duplicate image id", record=record)
        try:
            name = img.get("file_name")
            if isinstance(name, str) and task_path_candidates(name):  # Label Studio's COCO export
                rel = resolve_task_path(name, images_root)
            else:
                rel = safe_relpath(name)
                check_inside(images_root, rel)
        except ValueError as exc:
            raise DataError(path, f"unsafe file_name: {exc}", record=record,
                            hint="paths must stay inside the dataset root") from None
        if rel in seen_names:
            raise DataError(path, f"file_name {rel!r} also used by image id {seen_names[rel]}", record=record)
        labels = img.get("labels", [])
        if not isinstance(labels, list) or any(not _is_int(c) or c not in cat_ids for c in labels):
            raise DataError(path, f"image labels {labels!r} are not ids from the category table", record=record)
        seen_names[rel] = iid
        images[iid] = {**img, "file_name": rel}
    return images


def _read_annotations(doc: dict, path: Path, images: dict, cat_ids: set[int], report: ConversionReport
                      ) -> tuple[dict[Any, list[tuple[str, dict]]], dict[Any, list[int]]]:
    """image id -> [(record name for messages, annotation)], and image id -> image-level labels
    (annotations with a category and neither bbox nor segmentation: classification labels)."""
    by_image: dict[Any, list[tuple[str, dict]]] = {}
    labels: dict[Any, list[int]] = {}
    seen: set = set()
    for i, ann in enumerate(_records(doc, "annotations", path)):
        aid = ann.get("id")
        record = f"annotation id {aid}" if aid is not None else f"annotation #{i}"
        if aid is not None and (not (_is_int(aid) or isinstance(aid, str)) or aid in seen):
            raise DataError(path, "malformed or duplicate annotation id", record=record)
        seen.add(aid)
        image_id = ann.get("image_id")
        if not (_is_int(image_id) or isinstance(image_id, str)) or image_id not in images:
            raise DataError(path, f"image_id {image_id!r} is not in `images`", record=record)
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in cat_ids:
            raise DataError(path, f"category_id {ann.get('category_id')!r} is not in the category table",
                            record=record)
        _check_geometry(ann, path, record)
        if _is_image_label(ann):
            if ann["category_id"] not in labels.setdefault(image_id, []):
                labels[image_id].append(ann["category_id"])
            continue
        by_image.setdefault(image_id, []).append((record, ann))
    return by_image, labels


def _is_image_label(ann: dict) -> bool:
    return ann.get("bbox") is None and not ann.get("segmentation") and not ann.get("keypoints")


def _check_geometry(ann: dict, path: Path, record: str) -> None:
    bbox = ann.get("bbox")
    if bbox is not None and (not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_num, bbox))):
        raise DataError(path, f"bbox {bbox!r} is not [x, y, width, height]", record=record)
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(map(_is_int, size))
                and (isinstance(counts, str) or (isinstance(counts, list) and all(map(_is_int, counts))))):
            raise DataError(path, "RLE segmentation needs `size` [h, w] and `counts` (string or list of ints)",
                            record=record)
    elif seg is not None and not (isinstance(seg, list) and _is_polygon_list(seg)):
        raise DataError(path, "segmentation is neither polygons nor RLE", record=record)
    for key in ("iscrowd", "is_crowd"):
        if ann.get(key) is not None and _crowd(ann[key]) is None:
            raise DataError(path, f"`{key}` must be 0, 1, true or false, got {ann[key]!r}", record=record)
    kps = ann.get("keypoints")
    if kps is not None and not (isinstance(kps, list) and len(kps) % 3 == 0 and all(map(_is_num, kps))):
        raise DataError(path, "keypoints must be a flat list [x1, y1, v1, x2, y2, v2, ...]", record=record)
    if kps and bbox is None and not seg:
        raise DataError(path, "keypoints without a bbox", hint="COCO person keypoints carry the person's bbox",
                        record=record)


# Spellings of a crowd flag that mean 0/1 (CVAT and some converters write "false"/"true" strings).
# bool("0") is True, so anything else is an error, never a guess.
_CROWD = {0: False, 1: True, "0": False, "1": True, "false": False, "true": True}


def _crowd(value: Any) -> Optional[bool]:
    key = value.lower() if isinstance(value, str) else value  # True == 1, False == 0
    return _CROWD.get(key) if isinstance(key, (int, str)) else None


def _to_sample(img: dict, anns: list[tuple[str, dict]], ann_labels: list[int], images_root: Path, root: str,
               source: str, path: Path, report: ConversionReport) -> Optional[Sample]:
    rel = img["file_name"]
    where = f"{path} image id {img['id']} ({rel})"
    probed = _probe_frame(images_root / rel, (img.get("width"), img.get("height")), report, where)
    if probed is None:
        return None
    width, height, sha, raw_frame = probed
    instances = []
    for record, ann in anns:
        inst = _to_instance(ann, width, height, report, f"{path} {record} (image id {img['id']}, {rel})",
                            raw_frame)
        if inst is not None:
            instances.append(inst)
    sid = f"{source}/{rel}"
    labels = list(img.get("labels", []))
    labels += [c for c in ann_labels if c not in labels]
    return Sample(id=sid, root=root, path=rel, width=width, height=height, sha256=sha,
                  labels=labels, instances=instances, group=str(img.get("group") or sid),
                  attributes={k: v for k, v in img.items() if k not in _IMAGE_KEYS})


def _probe_frame(image: Path, declared: tuple, report: ConversionReport,
                 where: str) -> Optional[tuple[int, int, str, Optional[tuple[int, int, int]]]]:
    """`probe`, plus the raw frame (orientation, raw w, raw h) when the annotations are in it.

    A size mismatch is probed into a scratch report first: when the declared size is the raw
    size of an EXIF-rotated image, that is the more precise `exif_orientation_mismatch`, not
    an `image_size_mismatch`.
    """
    scratch = ConversionReport(report.policies)
    probed = probe(image, declared, scratch, where)
    raw_frame = None
    if probed is not None and "image_size_mismatch" in scratch.counts:
        orientation, raw_w, raw_h = exif_orientation(image)  # header only; mismatches are rare
        if orientation != 1 and tuple(declared) == (raw_w, raw_h) != probed[:2]:
            raw_frame = (orientation, raw_w, raw_h)
            scratch = ConversionReport(report.policies)
            report.add("exif_orientation_mismatch",
                       f"{where}: declared {raw_w}x{raw_h} is the raw size; EXIF orientation {orientation} shows "
                       f"{probed[0]}x{probed[1]}; boxes and polygons mapped to the displayed frame")
    report.merge(scratch)
    return None if probed is None else (*probed, raw_frame)


def _to_instance(ann: dict, width: int, height: int, report: ConversionReport, where: str,
                 raw_frame: Optional[tuple[int, int, int]] = None) -> Optional[Instance]:
    seg = ann.get("segmentation")
    rle = dict(seg) if isinstance(seg, dict) else None
    rings = _as_rings(seg) if isinstance(seg, list) else []
    if ann.get("bbox") is not None:
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = [x, y, x + w, y + h]
    elif rle is not None:
        x, y, w, h = rle_bbox(rle)
        box = [x, y, x + w, y + h]
    else:  # not an image label (_is_image_label): there is at least one polygon ring
        xs = [v for r in rings for v in r[0::2]]
        ys = [v for r in rings for v in r[1::2]]
        box = [float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))]
    # Checked in the frame the coordinates are in, before any min/max: min() can drop a NaN.
    frame_w, frame_h = (raw_frame[1], raw_frame[2]) if raw_frame is not None else (width, height)
    ring_xs = [v for r in rings for v in r[0::2]]
    ring_ys = [v for r in rings for v in r[1::2]]
    if coords_absurd([box[0], box[2], *ring_xs], [box[1], box[3], *ring_ys], frame_w, frame_h):
        report.add("box_absurd", f"{where}: box {box} or its polygon has NaN, infinite or far out-of-frame "
                                 f"coordinates for the {frame_w}x{frame_h} image")
        return None
    if raw_frame is not None:
        box, rings = _raw_to_displayed(box, rings, raw_frame)
        if rle is not None:
            report.add("exif_mask_dropped", f"{where}: RLE of size {rle.get('size')} is in the raw frame")
            rle = None
    polygons = clean_polygons(rings, report, where)
    box = clip_box(box, width, height, report, where, tolerance=SUBPIXEL_TOLERANCE)
    if box is None:
        return None
    crowd = _crowd(ann.get("iscrowd", ann.get("is_crowd", 0)))
    area = ann.get("area")
    return Instance(bbox=box, category_id=ann["category_id"], polygons=polygons, rle=rle, iscrowd=bool(crowd),
                    area=float(area) if _is_num(area) else None,
                    attributes={k: v for k, v in ann.items() if k not in _ANN_KEYS})


# --- panoptic: segments_info + PNG ids -> instance masks ------------------------------------

def is_panoptic(doc: dict) -> bool:
    anns = doc.get("annotations")
    return isinstance(anns, list) and bool(anns) and isinstance(anns[0], dict) and "segments_info" in anns[0]


def panoptic_to_instances(doc: dict, path: Path, images: dict, cat_ids: set[int]) -> list[dict]:
    """COCO panoptic -> instance annotations with a compressed-RLE mask per segment.

    Each annotation names a PNG (`file_name`, in the folder named like the JSON without
    `.json`: panoptic_val2017.json -> panoptic_val2017/) whose pixel id R + 256 G + 256^2 B is
    a segment id of its `segments_info`; 0 is unlabelled. Every segment, thing or stuff,
    becomes one mask instance with its category, bbox, area and iscrowd; other segment keys
    go to the instance's attributes.
    """
    from pycocotools import mask as mask_utils  # only panoptic and RLE boxes need it

    png_dir = path.with_suffix("")
    if not png_dir.is_dir():
        raise DataError(path, f"panoptic PNG folder {png_dir} not found",
                        hint="the PNGs named by each annotation's file_name sit in the folder named like the JSON")
    out: list[dict] = []
    for i, ann in enumerate(_records(doc, "annotations", path)):
        record = f"annotation #{i} (image id {ann.get('image_id')})"
        if ann.get("image_id") not in images:
            raise DataError(path, f"image_id {ann.get('image_id')!r} is not in `images`", record=record)
        try:
            png = check_inside(png_dir, safe_relpath(ann.get("file_name")))
        except ValueError as exc:
            raise DataError(path, f"unsafe panoptic file_name: {exc}", record=record) from None
        segments = ann.get("segments_info")
        if not isinstance(segments, list) or not all(isinstance(g, dict) for g in segments):
            raise DataError(path, "`segments_info` must be a list of objects", record=record)
        ids = _panoptic_ids(png, path, record)
        for seg in segments:
            sid = seg.get("id")
            if not _is_int(sid) or seg.get("category_id") not in cat_ids:
                raise DataError(path, f"segment {sid!r} needs an integer id and a category_id from the table",
                                record=record)
            mask = np.asfortranarray((ids == sid).astype(np.uint8))
            rle = mask_utils.encode(mask)
            rle["counts"] = rle["counts"].decode("ascii")
            out.append({**{k: v for k, v in seg.items() if k != "id"}, "id": f"{png.name} segment {sid}",
                        "image_id": ann["image_id"], "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]},
                        "bbox": seg.get("bbox") or [float(v) for v in mask_utils.toBbox(rle)],
                        "area": seg.get("area", float(mask.sum()))})
    return out


def _panoptic_ids(png: Path, path: Path, record: str) -> np.ndarray:
    from PIL import Image

    if not png.is_file():
        raise DataError(path, f"panoptic PNG {png} not found", record=record)
    with Image.open(png) as im:
        if im.mode != "RGB":
            raise DataError(png, f"panoptic PNG mode {im.mode}, expected RGB (id = R + 256 G + 256^2 B)")
        rgb = np.asarray(im, dtype=np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def rle_bbox(rle: dict) -> list[float]:
    """[x, y, w, h] of a COCO RLE mask (compressed or uncompressed)."""
    from pycocotools import mask as mask_utils

    h, w = rle["size"]
    coded = mask_utils.frPyObjects(rle, h, w) if isinstance(rle["counts"], list) else rle
    return [float(v) for v in mask_utils.toBbox(coded)]


def _raw_to_displayed(box: list[float], rings: list[list[float]],
                      raw_frame: tuple[int, int, int]) -> tuple[list[float], list[list[float]]]:
    orientation, raw_w, raw_h = raw_frame
    xs, ys = raw_to_displayed(box[0::2], box[1::2], orientation, raw_w, raw_h)
    box = [min(xs), min(ys), max(xs), max(ys)]  # a flip swaps which corner is the top-left
    mapped = []
    for ring in rings:
        if len(ring) % 2:  # left as it is for clean_polygons to count
            mapped.append(ring)
            continue
        rx, ry = raw_to_displayed(ring[0::2], ring[1::2], orientation, raw_w, raw_h)
        mapped.append([v for xy in zip(rx, ry) for v in xy])
    return box, mapped


def _as_rings(seg: list) -> list[list[float]]:
    # Some tools write a single polygon as a flat list instead of a list of rings.
    return [seg] if seg and _is_num(seg[0]) else list(seg)


def _is_polygon_list(seg: list) -> bool:
    if seg and _is_num(seg[0]):
        return all(map(_is_num, seg))
    return all(isinstance(r, list) and all(map(_is_num, r)) for r in seg)


def _records(doc: dict, key: str, path: Path) -> list[dict]:
    items = doc.get(key, [])
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise DataError(path, f"`{key}` must be a list of objects")
    return items


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- writing ---------------------------------------------------------------------------------

def write_coco(samples: Iterable[Sample], categories: list[Category], out_dir: Path,
               project_root: Path = Path("."), copy_images: bool = True,
               report: Optional[ConversionReport] = None) -> Path:
    """Write `out_dir/annotations.json` (ids as in `categories` and the samples, boxes as xywh).

    COCO holds everything the manifest does, so `report` never receives a loss.

    With `copy_images` each image is copied to `out_dir/<Sample.path>` so the folder reads
    back as a dataset on its own. Missing areas are filled with the polygon (else box) area,
    because COCO evaluation tools require one.
    """
    out_dir = Path(out_dir)
    images, annotations, used = [], [], {}
    for image_id, s in enumerate(samples, 1):
        if s.path in used:
            raise ValueError(f"samples {used[s.path]} and {s.id} share the path {s.path!r}; "
                             "one COCO file cannot hold both")
        used[s.path] = s.id
        images.append(_image_record(s, image_id))
        for inst in s.instances:
            annotations.append(_annotation_record(inst, len(annotations) + 1, image_id))
        if copy_images:
            copy_image(s, out_dir / s.path, Path(project_root))
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in categories]}
    target = out_dir / ANNOTATION_FILE
    write_json(target, doc)
    return target


def _image_record(s: Sample, image_id: int) -> dict[str, Any]:
    rec = {k: v for k, v in s.attributes.items() if k not in _IMAGE_KEYS}
    rec.update(id=image_id, file_name=s.path, width=s.width, height=s.height)
    if s.labels:
        rec["labels"] = list(s.labels)
    if s.group and s.group != s.id:
        rec["group"] = s.group
    return rec


def _annotation_record(inst: Instance, ann_id: int, image_id: int) -> dict[str, Any]:
    x1, y1, x2, y2 = inst.bbox
    rec = {k: v for k, v in inst.attributes.items() if k not in _ANN_KEYS}
    seg: Any = dict(inst.rle) if inst.rle is not None else [list(r) for r in inst.polygons]
    rec.update(id=ann_id, image_id=image_id, category_id=inst.category_id, bbox=[x1, y1, x2 - x1, y2 - y1],
               segmentation=seg, area=inst.area if inst.area is not None else _area(inst),
               iscrowd=int(inst.iscrowd))
    return rec


def _area(inst: Instance) -> float:
    if inst.polygons and inst.rle is None:
        return float(sum(_shoelace(r) for r in inst.polygons))
    x1, y1, x2, y2 = inst.bbox
    return float((x2 - x1) * (y2 - y1))


def _shoelace(ring: list[float]) -> float:
    xs, ys = ring[0::2], ring[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2.0


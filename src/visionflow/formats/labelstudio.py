"""Label Studio JSON export <-> canonical samples.

Layout (Label Studio "JSON" export, one file; "JSON-MIN" is read too, CSV is not):

    [{"id": 7, "data": {"image": "/data/upload/1/ab12cd34-img.jpg", ...},
      "annotations": [{"id": 3, "was_cancelled": false, "ground_truth": false, "completed_by": 1,
                       "result": [{"id": "x1", "type": "rectanglelabels", "from_name": "label",
                                   "to_name": "image", "original_width": 640, "original_height": 480,
                                   "image_rotation": 0, "value": {"x": 10.0, "y": 20.0, "width": 5.0,
                                   "height": 7.5, "rotation": 0, "rectanglelabels": ["cat"]}}, ...]}],
      "predictions": [...], "meta": {}, "created_at": "...", "project": 1}, ...]

    `completed_by` is an int (user id) or, in older exports and in some versions, an object
    {"id", "email", ...}: it is not read. Exports before Label Studio 1.0 say "completions" for
    "annotations"; both are read. A single task object (not in a list) is read as one task.

    JSON-MIN (one flat record per annotation, written by the SDK's `convert_to_json_min`):
    [{"image": "/data/upload/1/img.jpg", "id": 7, "label": [{"x": 10.0, ..., "rectanglelabels": ["cat"],
      "original_width": 640, "original_height": 480}], "annotator": 1, "annotation_id": 3,
      "created_at": "...", "updated_at": "...", "lead_time": 8.6}, ...]
    Detected when the records have no `data` but an `annotation_id`. Each control's regions sit under its
    name as a list of `value` objects (the type is the `*labels` key they hold); every other key is a task
    data field. Records sharing an `id` are the annotations of one task. JSON-MIN drops region ids, so
    keypoints there are never linked to a box (see below). A single choice is written as a bare string,
    which JSON-MIN cannot tell from a data field: it is not read (export as JSON to keep choices).

Reading maps (coordinates in Label Studio are PERCENT of the image size; x right, y down):
    data.image `/data/upload/<project>/<name>`  -> Sample.path `<name>` if that file is under the
        images root, else `<name>` without Label Studio's upload prefix (8 hex chars and "-",
        "ab12cd34-img.jpg" -> "img.jpg"), so both the raw upload folder and the original files work
    data.image `/data/local-files/?d=<rel>`     -> `<rel>` (URL-decoded; images root = the document root)
    data.image relative path                    -> as is
    (`resolve_task_path`; the COCO reader maps Label Studio's COCO `file_name`s the same way)
    data.group                                  -> Sample.group (default: the sample id)
    data.split                                  -> Sample.attributes["split"] (train, val/valid/validation,
        test; another value kept as written, which split.keep_existing refuses by name)
    `rectanglelabels` x, y, width, height       -> bbox [x, y, x + w, y + h] * size / 100
    `rectanglelabels` with `rotation` != 0     -> an oriented box (docs/manifest.md `obb`): polygons [its 4
        corners in pixels, from (x, y) round clockwise], bbox = their extent, attributes {"obb": true}.
        Label Studio turns the rectangle clockwise (y down) by `rotation` degrees about its top-left corner,
        in pixels (so width % and height % are of the image width and height, whatever the angle)
    `keypointlabels` x, y with `parentID`      -> the parent region's Instance.attributes: "keypoints"
        [x, y, 2, ...] (pixels, COCO visibility 2: Label Studio has no hidden points), "keypoint_names"
        [label, ...] in the same order (the order of the results), "num_keypoints"
    `keypointlabels` without a (kept) parent   -> Sample.attributes["points"] [{"label", "x", "y"}] (pixels),
        counted as keypoint_unlinked; keypoint labels are part names, never categories
    `polygonlabels` points [[x, y], ...]        -> one polygon ring; bbox = the ring's extent
    `brushlabels` value.rle (Label Studio's bit-packed RLE over RGBA bytes, format "rle")
        -> Instance.rle (compressed COCO RLE of alpha >= 128), bbox = the mask's extent, area = pixels
    `choices`                                   -> Sample.labels (image-level classes)
Categories: every region and choice label name in the annotations used, sorted, ids 1..K.
Percent -> pixels uses the image file's size (after EXIF): percentages are of the image, so they land
on the file we train on even if it was resized after labelling. `original_width`/`original_height`
(the size Label Studio saw) are checked against it; a mismatch is counted (image_size_mismatch) with both
sizes named, so a wrong image (same name, other picture) is found.

Validation policy (errors stop the read; counted problems are fixed or dropped and reported):

| problem                                              | policy                                         |
|------------------------------------------------------|------------------------------------------------|
| invalid JSON                                         | DataError naming the file, line and column     |
| not a list of tasks, task without id/data, malformed | DataError naming the file and the task id      |
|   result (value not an object, non-numeric x, ...)   |   (and the result id)                          |
| duplicate task id, two tasks with the same image     | DataError naming the task id                   |
| image is an http(s)/s3/gs/azure URL                  | DataError naming the task id: download the     |
|                                                      |   images, point `images` at them               |
| image path absolute, with "..", backslash, or        | DataError naming the file and the task id      |
|   resolving outside the images root (symlink)        |                                                |
| no task; no image found for any task; no task with  | DataError naming the file, what was looked    |
|   an annotation; every result lost                   |   for and where                                |
| task_unannotated: task without annotations           | kept as a background image, counted            |
| annotation_cancelled: cancelled (skipped) annotation | ignored; a task with only cancelled ones is    |
|                                                      |   skipped (its image was not labelled)         |
| extra_annotations_ignored: several annotations       | the first non-cancelled one is used            |
| predictions_ignored: model predictions in a task     | ignored (not ground truth)                     |
| keypoint_unlinked: keypoint without a parentID, or   | kept in Sample.attributes["points"], counted   |
|   whose parent region was not kept                   |                                                |
| keypoint_outside: keypoint outside the image         | dropped, counted                               |
| relation_ignored: a `relation` result                | not read, counted                              |
| brush_unsupported: brush not in "rle" format         | region dropped                                 |
| brush_invalid: RLE undecodable or not w*h*4 values   | region dropped                                 |
| result_unsupported: ellipses, text,                  | result dropped                                 |
|   unlabelled tools, per-region choices, ...          |                                                |
| region_unlabelled: region with an empty label list   | region dropped                                 |
| extra_labels_ignored: region with several labels     | the first label is used                        |
| image_rotated: result with image_rotation != 0       | kept; coordinates taken as given (check them)  |
| image_missing: file not on disk                      | task skipped, counted                          |
| image_unreadable: corrupt / truncated file           | task skipped, counted; the file is untouched   |
| image_size_mismatch: original_width/height != file   | the file's size (after EXIF) is used, counted  |
| box_degenerate: zero or negative width/height        | region dropped, counted                        |
| box_clipped: percent outside [0, 100]                | box clipped to the image, counted              |
| box_outside: box wholly outside the image            | region dropped, counted                        |
| polygon_invalid: polygon with < 3 points             | ring dropped, counted                          |

Writing (`write_labelstudio`) gives tasks 1..N in sample order with data.image
`/data/local-files/?d=<path>`, data.split (train/val/test) and data.group when the sample has
them, one annotation each and result ids "<task>-<n>", plus a
`label_config.xml` to paste into the project; losses are counted (WRITE_POLICIES). An oriented box
(attributes {"obb": true}, 4 corners) is written as a rectangle with `rotation`; named keypoints as
`keypointlabels` with the parentID of their instance's region, unlinked points without one: all
three read back equal.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional
from urllib.parse import quote, unquote

import numpy as np
from pycocotools import mask as mask_utils

from visionflow.core.errors import DataError
from visionflow.formats import (COMMON_POLICIES, copy_image, load_json, ConversionReport, FormatResult, check_inside, clean_polygons,
                                clip_box, probe, safe_relpath)
from visionflow.core.files import write_json
from visionflow.manifest import SPLIT_FOLDERS, SPLITS, Category, Instance, Sample
from visionflow.manifest.masks import decode_rle

ANNOTATION_FILE = "tasks.json"
CONFIG_FILE = "label_config.xml"

POLICIES: dict[str, str] = {
    **COMMON_POLICIES,
    "task_unannotated": "task without annotations kept as a background image",
    "annotation_cancelled": "cancelled annotation ignored; a task with only cancelled annotations is skipped",
    "extra_annotations_ignored": "only the first non-cancelled annotation of a task is used",
    "predictions_ignored": "model predictions are not ground truth; ignored",
    "keypoint_unlinked": "keypoint with no parentID (or whose parent region was dropped) kept in the sample's "
                         "attributes['points'], not in an instance",
    "keypoint_outside": "keypoint outside the image dropped",
    "relation_ignored": "relation between regions (Label Studio's arrows) not read; keypoints are linked by parentID",
    "brush_unsupported": "brush region not in 'rle' format; dropped",
    "brush_invalid": "brush RLE undecodable or not width*height*4 values; region dropped",
    "result_unsupported": "result type not supported (ellipses, text, per-region choices, ...); dropped",
    "region_unlabelled": "region without a label dropped",
    "extra_labels_ignored": "region with several labels: the first label is used",
    "image_rotated": "result drawn on a rotated image; coordinates kept as given",
}

WRITE_POLICIES: dict[str, str] = {
    "crowd_dropped": "crowd region written as an ordinary region (Label Studio has no crowd flag)",
    "attributes_dropped": "sample/instance attributes (other than a train/val/test split, an oriented box, "
                          "named keypoints and unlinked points) are not written",
    "area_dropped": "area not written (Label Studio stores none; brush masks are re-measured on reading)",
    "box_not_kept": "polygon/brush regions have no box in Label Studio; the reader derives a different one",
    "polygon_split": "instance with several rings written as one polygon region per ring",
    "polygons_dropped": "instance with a mask and polygons: the mask is written, the polygons dropped",
}

_REGION_TYPES = {"rectanglelabels", "polygonlabels", "brushlabels"}
_KEYPOINT = "keypointlabels"
OBB = "obb"  # Instance.attributes[OBB] is True: polygons[0] is an oriented box's 4 corners (docs/manifest.md)
KEYPOINT_KEYS = ("keypoints", "keypoint_names", "num_keypoints")  # Instance.attributes set from keypointlabels
POINTS = "points"  # Sample.attributes[POINTS]: keypoints linked to no region
# JSON-MIN record keys that are not task data nor regions (Converter.convert_to_json_min).
_MIN_META = {"id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time", "agreement", "history",
             "was_cancelled"}
_REMOTE = re.compile(r"^(https?|s3|gs|azure-blob|gcs)://", re.IGNORECASE)
_UPLOAD = re.compile(r"^/data/upload/[^/]+/(.+)$")
_UPLOAD_PREFIX = re.compile(r"^[0-9a-fA-F]{8}-(.+)$")  # Label Studio prefixes uploads with uuid4().hex[:8] + "-"
_RLE_SIZES = (3, 4, 8, 16)  # run-length field widths in bits, as Label Studio's encoder writes them
_MASK_ALPHA = 128  # brush pixels with alpha >= this are foreground (antialiased edges count half-on)


# --- reading ---------------------------------------------------------------------------------

def read_labelstudio(images_root: Path, annotations: Path, source: str, root: Optional[str] = None) -> FormatResult:
    images_root, annotations = Path(images_root), Path(annotations)
    tasks = load_tasks(annotations)
    report = ConversionReport(POLICIES)
    # Structure first (ids, paths, which annotation), then the image files (the slow part).
    chosen = [(task, _image_path(task, images_root, annotations), _pick_annotation(task, annotations, report))
              for task in tasks]
    _check_unique(chosen, annotations)
    names = sorted({name for _, _, ann in chosen if ann is not None for name in _label_names(ann)})
    categories = [Category(id=i, name=n, source_ids={source: i}) for i, n in enumerate(names, 1)]
    cat_ids = {c.name: c.id for c in categories}
    root = images_root.as_posix() if root is None else root
    samples = []
    for task, rel, ann in chosen:
        if ann is False:  # only cancelled annotations: the image was never labelled
            continue
        sample = _to_sample(task, rel, ann, images_root, root, source, annotations, cat_ids, report)
        if sample is not None:
            samples.append(sample)
    _check_not_empty(chosen, samples, annotations, images_root, report)
    return FormatResult(categories, samples, report)


def _check_not_empty(chosen: list, samples: list[Sample], path: Path, images_root: Path,
                     report: ConversionReport) -> None:
    """An ingest that keeps nothing, or no label at all, is an error, never an empty dataset."""
    if not chosen:
        raise DataError(path, "holds no tasks", hint="export a Label Studio project that has annotated tasks")
    annotated = [ann for _, _, ann in chosen if ann]
    if not annotated:
        cancelled = report.counts.get("annotation_cancelled", 0)
        raise DataError(path, f"none of its {len(chosen)} tasks has an annotation"
                        + (f" ({cancelled} cancelled)" if cancelled else "")
                        + (f"; {report.counts['predictions_ignored']} predictions are not ground truth"
                           if report.counts.get("predictions_ignored") else ""),
                        hint="annotate the tasks in Label Studio (or accept the predictions) and export again")
    if not samples:
        example = next(iter(report.examples.get("image_missing", []) or report.examples.get("image_unreadable", [])),
                       "")
        raise DataError(path, f"none of the images of its {len(chosen)} tasks was found under {images_root}; "
                        f"e.g. {example}", hint="set --images to the folder that holds them (for /data/upload/<n>/ "
                        "paths: Label Studio's media/upload/<n>/ folder, or the original files)")
    written = sum(len(_results(ann)) for ann in annotated)
    kept = sum(len(s.instances) + len(s.labels) + len(s.attributes.get(POINTS, [])) for s in samples)
    if written and not kept:
        raise DataError(path, f"all {written} results were lost: " + "; ".join(report.lines()),
                        hint="see the counted kinds; rectangles, polygons, brushes, keypoints and choices are read")


def load_tasks(path: Path) -> list[dict]:
    doc = load_json(path)
    if isinstance(doc, dict) and "data" in doc:  # one task, as the SDK's converter also accepts
        doc = [doc]
    if not isinstance(doc, list):
        raise DataError(path, "not a Label Studio JSON export: expected a list of tasks",
                        hint="export the project as 'JSON' or 'JSON-MIN' (not CSV)")
    if doc and is_json_min(doc):
        doc = _from_json_min(doc, path)
    for i, task in enumerate(doc):
        if not isinstance(task, dict) or not _is_id(task.get("id")) or not isinstance(task.get("data"), dict):
            raise DataError(path, "task needs an `id` and a `data` object", record=f"task #{i}",
                            hint="export the project as 'JSON' or 'JSON-MIN' (not CSV)")
    return doc


def is_json_min(doc: list) -> bool:
    """JSON-MIN records are flat: task data, regions by control name and the annotation's id."""
    return all(isinstance(r, dict) and "data" not in r and "annotation_id" in r for r in doc)


def _from_json_min(records: list[dict], path: Path) -> list[dict]:
    """JSON-MIN records -> tasks in the JSON export's shape (one annotation per record)."""
    tasks: dict[Any, dict] = {}
    for i, rec in enumerate(records):
        if not _is_id(rec.get("id")):
            raise DataError(path, "JSON-MIN record needs the task `id`", record=f"record #{i}")
        data, results = {}, []
        for key, value in rec.items():
            regions = None if key in _MIN_META else _min_regions(key, value)
            if regions is not None:
                results += regions
            elif key not in _MIN_META:
                data[key] = value
        task = tasks.setdefault(rec["id"], {"id": rec["id"], "data": data, "annotations": []})
        if rec.get("annotation_id") is not None or results:
            task["annotations"].append({"id": rec.get("annotation_id"), "result": results})
    return list(tasks.values())


def _min_regions(key: str, value: Any) -> Optional[list[dict]]:
    """One control's JSON-MIN value -> results, or None when it is a task data field."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, dict) for v in items):
        return None
    kinds = [next((k for k in v if k.endswith("labels") or k in ("choices", "taxonomy", "text")), None)
             for v in items]
    if None in kinds:
        return None
    out = []
    for n, (v, kind) in enumerate(zip(items, kinds), 1):
        v = dict(v)
        r = {"id": v.pop("id", None) or f"{key}-{n}", "type": kind, "from_name": key}
        for k in ("original_width", "original_height", "image_rotation", "parentID"):
            if v.get(k) is not None:
                r[k] = v.pop(k)
        r["value"] = v
        out.append(r)
    return out


def _image_path(task: dict, images_root: Path, path: Path) -> str:
    """The task's image as a checked path relative to the images root."""
    record = f"task id {task['id']}"
    url = _image_url(task, path)
    if _REMOTE.match(url):
        raise DataError(path, f"image {url!r} is a URL; images are never downloaded", record=record,
                        hint="download the images and point `images` at the folder that holds them")
    try:
        return resolve_task_path(url, images_root)
    except ValueError as exc:
        raise DataError(path, f"unsafe image path: {exc}", record=record,
                        hint="paths must stay inside the dataset root") from None


def task_path_candidates(url: str) -> Optional[list[str]]:
    """The names under the images root that Label Studio's own image URLs stand for, or None
    for any other path: `/data/upload/<project>/<name>` -> [<name>, <name> without the upload
    prefix], `/data/local-files/?d=<rel>` -> [<rel>]."""
    upload = _UPLOAD.match(url)
    if upload:
        candidates = [upload.group(1)]
        stripped = _UPLOAD_PREFIX.match(upload.group(1).rsplit("/", 1)[-1])
        if stripped:
            candidates.append(upload.group(1)[: -len(stripped.group(0))] + stripped.group(1))
        return candidates
    if url.startswith("/data/local-files/"):
        return [_local_file(url)]
    return None


def resolve_task_path(url: str, images_root: Path) -> str:
    """A task's image path (Label Studio's URL forms or a relative path) as a checked path
    relative to the images root: the upload name as stored, else the original name; if neither
    exists, the first (which `probe` then reports). ValueError for a path outside the root.
    The COCO reader resolves Label Studio's COCO exports (whose `file_name` is the task's URL
    when the export did not copy the images) with it too."""
    rels = [safe_relpath(c) for c in task_path_candidates(url) or [url]]
    for rel in rels:
        check_inside(images_root, rel)
    return next((rel for rel in rels if (images_root / rel).is_file()), rels[0])


def _local_file(url: str) -> str:
    # Split by hand and `unquote` (not parse_qs): a literal "+" in a file name must stay a "+".
    query = url.split("?", 1)[1] if "?" in url else ""
    return next((unquote(part[2:]) for part in query.split("&") if part.startswith("d=")), "")


def _image_url(task: dict, path: Path) -> str:
    data = task["data"]
    url = data.get("image")
    if url is None:  # a project whose <Image value="$img"> uses another key: accept a single string value
        strings = [v for v in data.values() if isinstance(v, str)]
        url = strings[0] if len(strings) == 1 else None
    if not isinstance(url, str) or not url:
        raise DataError(path, "task has no image in `data` (expected `data.image`)", record=f"task id {task['id']}")
    return url


def _pick_annotation(task: dict, path: Path, report: ConversionReport) -> Any:
    """The annotation to use; None (no annotations: background) or False (all cancelled: skip)."""
    where = f"{path} task id {task['id']}"
    anns = task.get("annotations") or task.get("completions") or []  # "completions": before Label Studio 1.0
    if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
        raise DataError(path, "`annotations` must be a list of objects", record=f"task id {task['id']}")
    for pred in task.get("predictions") or []:
        report.add("predictions_ignored", f"{where}: prediction {pred.get('id') if isinstance(pred, dict) else ''}")
    if not anns:
        report.add("task_unannotated", f"{where}: no annotations; kept as background")
        return None
    used = None
    for ann in anns:
        if ann.get("was_cancelled"):
            report.add("annotation_cancelled", f"{where} annotation id {ann.get('id')}")
        elif used is None:
            used = ann
        else:
            report.add("extra_annotations_ignored", f"{where} annotation id {ann.get('id')} (used {used.get('id')})")
    if used is not None and not isinstance(used.get("result", []), list):
        raise DataError(path, "annotation `result` must be a list", record=f"task id {task['id']}")
    return False if used is None else used


def _check_unique(chosen: list, path: Path) -> None:
    ids: set = set()
    rels: dict[str, Any] = {}
    for task, rel, _ in chosen:
        if task["id"] in ids:
            raise DataError(path, "duplicate task id", record=f"task id {task['id']}")
        if rel in rels:
            raise DataError(path, f"image {rel!r} is also used by task id {rels[rel]}", record=f"task id {task['id']}",
                            hint="one task per image")
        ids.add(task["id"])
        rels[rel] = task["id"]


def _results(ann: Any) -> list[dict]:
    return [r for r in ann.get("result") or [] if isinstance(r, dict)] if ann else []


def _label_names(ann: dict) -> list[str]:
    names = []
    for r in _results(ann):
        value = r.get("value")
        if isinstance(value, dict) and r.get("type") in _REGION_TYPES | {"choices"}:
            labels = value.get(r["type"])
            if isinstance(labels, list):
                names += [n for n in (labels if r["type"] == "choices" else labels[:1]) if isinstance(n, str)]
    return names


def _to_sample(task: dict, rel: str, ann: Any, images_root: Path, root: str, source: str, path: Path,
               cat_ids: dict[str, int], report: ConversionReport) -> Optional[Sample]:
    results = _results(ann)
    sized = [r for r in results if "original_width" in r and "original_height" in r]
    declared = (sized[0]["original_width"], sized[0]["original_height"]) if sized else (None, None)
    where = f"{path} task id {task['id']} ({rel})"
    probed = probe(images_root / rel, declared, report, where)
    if probed is None:
        return None
    width, height, sha = probed
    region_ids = {r.get("id") for r in results if r.get("type") in _REGION_TYPES}
    labels: list[int] = []
    instances = []
    by_id: dict[Any, Instance] = {}  # result id -> instance, for keypoints' parentID
    keypoints = []
    for r in results:
        rwhere = f"{where} result id {r.get('id')}"
        if r.get("image_rotation"):
            report.add("image_rotated", f"{rwhere}: image_rotation {r['image_rotation']}")
        value = r.get("value")
        if r.get("type") == "choices" and r.get("id") not in region_ids:
            if not isinstance(value, dict) or not isinstance(value.get("choices"), list):
                raise DataError(path, "choices result needs a `value` with a `choices` list",
                                record=f"task id {task['id']} result id {r.get('id')}")
            labels += [cat_ids[n] for n in value["choices"] if n in cat_ids and cat_ids[n] not in labels]
        elif r.get("type") in _REGION_TYPES:
            inst = _to_instance(r, width, height, cat_ids, path, f"task id {task['id']}", rwhere, report)
            if inst is not None:
                instances.append(inst)
                by_id.setdefault(r.get("id"), inst)
        elif r.get("type") == _KEYPOINT:
            keypoints.append(r)
        elif r.get("type") == "relation":
            report.add("relation_ignored", f"{where}: {r.get('from_id')} -> {r.get('to_id')}")
        else:
            report.add("result_unsupported", f"{rwhere}: type {r.get('type')!r}")
    sid = f"{source}/{rel}"
    group, split = task["data"].get("group"), task["data"].get("split")
    attributes: dict[str, Any] = {"split": SPLIT_FOLDERS.get(str(split).lower(), str(split))} if split else {}
    for r in keypoints:
        _keypoint(r, width, height, by_id, attributes, path, f"task id {task['id']}", f"{where} result id {r.get('id')}",
                  report)
    return Sample(id=sid, root=root, path=rel, width=width, height=height, sha256=sha, labels=labels,
                  instances=instances, group=str(group) if group else sid, attributes=attributes)


def _to_instance(r: dict, width: int, height: int, cat_ids: dict[str, int], path: Path, task: str, where: str,
                 report: ConversionReport) -> Optional[Instance]:
    kind, value = r["type"], r.get("value")
    record = f"{task} result id {r.get('id')}"
    if not isinstance(value, dict) or not isinstance(value.get(kind), list):
        raise DataError(path, f"{kind} result needs a `value` object with a `{kind}` list", record=record)
    names = value[kind]
    if not names:
        report.add("region_unlabelled", where)
        return None
    if len(names) > 1:
        report.add("extra_labels_ignored", f"{where}: labels {names}, used {names[0]!r}")
    cat = cat_ids[names[0]]
    if kind == "rectanglelabels":
        return _rectangle(value, width, height, cat, path, record, where, report)
    if kind == "polygonlabels":
        return _polygon(value, width, height, cat, path, record, where, report)
    return _brush(value, width, height, cat, where, report)


def _keypoint(r: dict, width: int, height: int, by_id: dict, attributes: dict, path: Path, task: str, where: str,
              report: ConversionReport) -> None:
    """A keypoint joins its parent region's instance (parentID), else the sample's unlinked points."""
    value = r.get("value")
    if not isinstance(value, dict) or not isinstance(value.get(_KEYPOINT), list) \
            or not _is_num(value.get("x")) or not _is_num(value.get("y")):
        raise DataError(path, "keypoint needs a `value` with numeric x, y (percent) and a `keypointlabels` list",
                        record=f"{task} result id {r.get('id')}")
    names = value[_KEYPOINT]
    if not names or not isinstance(names[0], str):
        report.add("region_unlabelled", where)
        return
    if len(names) > 1:
        report.add("extra_labels_ignored", f"{where}: labels {names}, used {names[0]!r}")
    x, y = value["x"] * width / 100, value["y"] * height / 100
    if not (0 <= x <= width and 0 <= y <= height):
        report.add("keypoint_outside", f"{where}: ({x:.1f}, {y:.1f}) outside {width}x{height}")
        return
    parent = by_id.get(r.get("parentID")) if r.get("parentID") is not None else None
    if parent is None:
        why = f"parentID {r['parentID']!r} names no kept region" if r.get("parentID") is not None else "no parentID"
        report.add("keypoint_unlinked", f"{where}: {names[0]!r} ({why})")
        attributes.setdefault(POINTS, []).append({"label": names[0], "x": x, "y": y})
        return
    a = parent.attributes
    a["keypoints"] = a.get("keypoints", []) + [x, y, 2]
    a["keypoint_names"] = a.get("keypoint_names", []) + [names[0]]
    a["num_keypoints"] = len(a["keypoint_names"])


def _rectangle(value: dict, width: int, height: int, cat: int, path: Path, record: str, where: str,
               report: ConversionReport) -> Optional[Instance]:
    nums = [value.get(k, 0 if k == "rotation" else None) for k in ("x", "y", "width", "height", "rotation")]
    if not all(map(_is_num, nums)):
        raise DataError(path, "rectangle needs numeric x, y, width, height (percent)", record=record)
    x, y, w, h = nums[0] * width / 100, nums[1] * height / 100, nums[2] * width / 100, nums[3] * height / 100
    if nums[4] % 360 and w > 0 and h > 0:
        corners = rotated_corners(x, y, w, h, nums[4])
        box = clip_box([min(corners[0::2]), min(corners[1::2]), max(corners[0::2]), max(corners[1::2])],
                       width, height, report, where)
        return None if box is None else Instance(bbox=box, category_id=cat, polygons=[corners],
                                                 attributes={OBB: True})
    box = clip_box([x, y, x + w, y + h], width, height, report, where)
    return None if box is None else Instance(bbox=box, category_id=cat)


def rotated_corners(x: float, y: float, w: float, h: float, degrees: float) -> list[float]:
    """[x, y] * 4 (pixels) of a Label Studio rectangle turned clockwise (y down) by `degrees` about its
    top-left corner (x, y): (x, y), then round through the turned top-right, bottom-right, bottom-left."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [v for dx, dy in ((0, 0), (w, 0), (w, h), (0, h)) for v in (x + dx * c - dy * s, y + dx * s + dy * c)]


def unrotated(corners: list[float]) -> tuple[float, float, float, float, float]:
    """Inverse of `rotated_corners`: (x, y, w, h, degrees in [0, 360)), pixels."""
    (x0, y0), (x1, y1), (x3, y3) = corners[0:2], corners[2:4], corners[6:8]
    degrees = math.degrees(math.atan2(y1 - y0, x1 - x0)) % 360.0
    return x0, y0, math.hypot(x1 - x0, y1 - y0), math.hypot(x3 - x0, y3 - y0), degrees


def _polygon(value: dict, width: int, height: int, cat: int, path: Path, record: str, where: str,
             report: ConversionReport) -> Optional[Instance]:
    points = value.get("points")
    if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 and all(map(_is_num, p))
                                               for p in points):
        raise DataError(path, "polygon needs `points` [[x, y], ...] (percent)", record=record)
    ring = [v for px, py in points for v in (px * width / 100, py * height / 100)]
    rings = clean_polygons([ring], report, where)
    if not rings:
        return None
    box = clip_box([min(ring[0::2]), min(ring[1::2]), max(ring[0::2]), max(ring[1::2])], width, height, report, where)
    return None if box is None else Instance(bbox=box, category_id=cat, polygons=rings)


def _brush(value: dict, width: int, height: int, cat: int, where: str, report: ConversionReport) -> Optional[Instance]:
    if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
        report.add("brush_unsupported", f"{where}: format {value.get('format')!r}")
        return None
    try:
        flat = decode_brush_rle(value["rle"])
    except ValueError as exc:
        report.add("brush_invalid", f"{where}: {exc}")
        return None
    if flat.size != width * height * 4:
        report.add("brush_invalid", f"{where}: {flat.size} values for a {width}x{height} RGBA image")
        return None
    mask = flat.reshape(height, width, 4)[:, :, 3] >= _MASK_ALPHA
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    box = clip_box([x, y, x + w, y + h], width, height, report, where)
    if box is None:
        return None
    return Instance(bbox=box, category_id=cat, rle={"size": [height, width], "counts": rle["counts"].decode("ascii")},
                    area=float(mask.sum()))


def decode_brush_rle(data: list[int]) -> np.ndarray:
    """Label Studio's brush RLE (thi.ng rle-pack over the RGBA canvas bytes) -> flat uint8 values.

    Bits, MSB first: count (32), word size - 1 (5), four run-length field widths - 1 (4 each), then
    blocks: repeat flag (1), width index (2), run length - 1 (that width), then one word (repeat)
    or `run length` words (literal).
    """
    if not all(_is_int(b) and 0 <= b < 256 for b in data):
        raise ValueError("rle is not a list of bytes")
    bits = "".join(f"{b:08b}" for b in data)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        if pos + n > len(bits):
            raise ValueError("rle ends early")
        pos += n
        return int(bits[pos - n:pos], 2)

    num, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, dtype=np.uint8 if word <= 8 else np.uint32)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if j > num:
            raise ValueError(f"run past the end ({j} > {num} values)")
        if repeat:
            out[i:j] = read(word)
        else:
            out[i:j] = [read(word) for _ in range(j - i)]
        i = j
    return out.astype(np.uint8)


def encode_brush_rle(mask: np.ndarray) -> list[int]:
    """A binary (H, W) mask -> Label Studio brush RLE of its RGBA canvas (foreground 255 in all channels)."""
    flat = np.repeat(mask.astype(np.uint8).ravel() * 255, 4)
    bits = [f"{flat.size:032b}", f"{8 - 1:05b}", *(f"{s - 1:04b}" for s in _RLE_SIZES)]
    change = np.flatnonzero(np.diff(flat)) + 1
    starts, ends = np.r_[0, change], np.r_[change, flat.size]
    for start, end in zip(starts.tolist(), ends.tolist()):
        while start < end:  # repeat blocks only; a run longer than the widest field is split
            n = min(end - start, 1 << _RLE_SIZES[-1])
            idx = next(k for k, s in enumerate(_RLE_SIZES) if n - 1 < 1 << s)
            bits.append(f"1{idx:02b}{n - 1:0{_RLE_SIZES[idx]}b}{int(flat[start]):08b}")
            start += n
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return [int(text[k:k + 8], 2) for k in range(0, len(text), 8)]


def _is_id(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, str) and bool(v))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- writing ---------------------------------------------------------------------------------

def write_labelstudio(samples: Iterable[Sample], categories: list[Category], out_dir: Path,
                      project_root: Path = Path("."), copy_images: bool = True,
                      report: Optional[ConversionReport] = None) -> Path:
    """Write `out_dir/tasks.json` (import it with local-files storage rooted at `out_dir`) and
    `out_dir/label_config.xml`; with `copy_images` the images go to `out_dir/<Sample.path>`."""
    out_dir = Path(out_dir)
    report = report if report is not None else ConversionReport()
    for kind, policy in WRITE_POLICIES.items():
        report.policies.setdefault(kind, policy)
    names = {c.id: c.name for c in categories}
    tasks, used = [], {}
    samples = list(samples)
    for task_id, s in enumerate(samples, 1):
        if s.path in used:
            raise ValueError(f"samples {used[s.path]} and {s.id} share the path {s.path!r}; "
                             "one Label Studio export cannot hold both")
        used[s.path] = s.id
        tasks.append(_task(s, task_id, names, report))
        if copy_images:
            copy_image(s, out_dir / s.path, Path(project_root))
    target = out_dir / ANNOTATION_FILE
    write_json(target, tasks)
    (out_dir / CONFIG_FILE).write_text(label_config([c.name for c in categories], _keypoint_names(samples)),
                                       encoding="utf-8")
    return target


def _task(s: Sample, task_id: int, names: dict[int, str], report: ConversionReport) -> dict[str, Any]:
    where = f"sample {s.id}"
    split = s.attributes.get("split")
    points = s.attributes.get(POINTS)
    points_ok = isinstance(points, list) and all(_is_point(pt) for pt in points)
    dropped = sorted(k for k in s.attributes if not (k == "split" and split in SPLITS) and not (k == POINTS and points_ok))
    if dropped:
        report.add("attributes_dropped", f"{where}: {dropped}")
    result = sample_results(s, names, report, prefix=f"{task_id}-", points=points if points_ok else None)
    data: dict[str, Any] = {"image": local_file_url(s.path)}
    if s.group and s.group != s.id:
        data["group"] = s.group
    if split in SPLITS:  # a task's data holds any field: the split travels there (and reads back)
        data["split"] = split
    return {"id": task_id, "data": data, "predictions": [],
            "annotations": [{"id": task_id, "result": result, "was_cancelled": False, "ground_truth": False}]}


def sample_results(s: Sample, names: dict[int, str], report: ConversionReport, prefix: str,
                   points: Optional[list] = None, origin: str = "manual") -> list[dict[str, Any]]:
    """The sample's labels and instances as Label Studio results (an annotation's or a
    prediction's `result`), region ids `<prefix>1`, `<prefix>2`, ... Image-level classes are the
    `choice` control's, boxes `label`'s, polygons `polygon`'s, masks `brush`'s (`label_config`)."""
    where = f"sample {s.id}"
    size = {"original_width": s.width, "original_height": s.height, "image_rotation": 0}
    result = []
    if s.labels:
        result.append({"type": "choices", "from_name": "choice", "value": {"choices": [names[c] for c in s.labels]}})
    for n, inst in enumerate(s.instances):
        parent = f"{prefix}{len(result) + 1}"  # the id its first region gets below
        result += _regions(inst, s, names[inst.category_id], report, f"{where} instance {n}")
        result += _keypoint_regions(inst, s, parent)
    if points:
        result += [_keypoint_region(pt["label"], pt["x"], pt["y"], s) for pt in points]
    for n, r in enumerate(result, 1):
        r.update(id=f"{prefix}{n}", to_name="image", origin=origin, **size)
    return result


def local_file_url(rel: str) -> str:
    """`rel` (relative to the server's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) as the URL Label
    Studio serves it under."""
    return "/data/local-files/?d=" + quote(rel, safe="/")


def _regions(inst: Instance, s: Sample, name: str, report: ConversionReport, where: str) -> list[dict]:
    """The instance as Label Studio regions (percent of the image), counting what cannot be held."""
    if inst.iscrowd:
        report.add("crowd_dropped", where)
    obb = inst.rle is None and inst.attributes.get(OBB) is True and len(inst.polygons) == 1 \
        and len(inst.polygons[0]) == 8
    kept = ({OBB} if obb else set()) | (set(KEYPOINT_KEYS) if _named_keypoints(inst) else set())
    if set(inst.attributes) - kept:
        report.add("attributes_dropped", f"{where}: {sorted(set(inst.attributes) - kept)}")
    px, py = 100.0 / s.width, 100.0 / s.height
    if obb:  # written as Label Studio's rotated rectangle: lossless
        x, y, w, h, degrees = unrotated(inst.polygons[0])
        corners = inst.polygons[0]
        derived = [min(corners[0::2]), min(corners[1::2]), max(corners[0::2]), max(corners[1::2])]
        regions = [{"type": "rectanglelabels", "from_name": "label",
                    "value": {"x": x * px, "y": y * py, "width": w * px, "height": h * py, "rotation": degrees,
                              "rectanglelabels": [name]}}]
        if not np.allclose(derived, inst.bbox, rtol=1e-6, atol=1e-6):
            report.add("box_not_kept", f"{where}: box {inst.bbox} reads back as {derived}")
        if inst.area is not None:
            report.add("area_dropped", where)
        return regions
    if inst.rle is not None:
        mask = decode_rle(inst.rle, s.height, s.width, f"sample {s.id}").astype(np.uint8)  # (H, W)
        if inst.area is not None and inst.area != float(mask.sum()):
            report.add("area_dropped", f"{where}: area {inst.area} reads back as the mask's {int(mask.sum())}")
        if inst.polygons:
            report.add("polygons_dropped", where)
        ys, xs = np.nonzero(mask)
        derived = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if xs.size else None
        regions = [{"type": "brushlabels", "from_name": "brush",
                    "value": {"format": "rle", "rle": encode_brush_rle(mask), "brushlabels": [name]}}]
    elif inst.polygons:
        if len(inst.polygons) > 1:
            report.add("polygon_split", f"{where}: {len(inst.polygons)} rings")
        xs, ys = [v for r in inst.polygons for v in r[0::2]], [v for r in inst.polygons for v in r[1::2]]
        derived = [min(xs), min(ys), max(xs), max(ys)]
        regions = [{"type": "polygonlabels", "from_name": "polygon",
                    "value": {"points": [[x * px, y * py] for x, y in zip(r[0::2], r[1::2])], "closed": True,
                              "polygonlabels": [name]}} for r in inst.polygons]
    else:
        x1, y1, x2, y2 = inst.bbox
        derived = inst.bbox
        regions = [{"type": "rectanglelabels", "from_name": "label",
                    "value": {"x": x1 * px, "y": y1 * py, "width": (x2 - x1) * px, "height": (y2 - y1) * py,
                              "rotation": 0, "rectanglelabels": [name]}}]
    if derived is None or not np.allclose(derived, inst.bbox, rtol=1e-6, atol=1e-6):
        report.add("box_not_kept", f"{where}: box {inst.bbox} reads back as {derived}")
    if inst.area is not None and inst.rle is None:
        report.add("area_dropped", where)
    return regions


def _named_keypoints(inst: Instance) -> bool:
    """Keypoints this writer can hold: one name per [x, y, v] triple (as read from Label Studio)."""
    kps, names = inst.attributes.get("keypoints"), inst.attributes.get("keypoint_names")
    return isinstance(kps, list) and isinstance(names, list) and len(kps) == 3 * len(names) \
        and all(isinstance(n, str) for n in names) and all(map(_is_num, kps))


def _keypoint_regions(inst: Instance, s: Sample, parent: str) -> list[dict]:
    if not _named_keypoints(inst):
        return []
    kps = inst.attributes["keypoints"]
    # v = 0 means "not labelled" (COCO): Label Studio has no such point, so none is written.
    return [{**_keypoint_region(name, kps[3 * k], kps[3 * k + 1], s), "parentID": parent}
            for k, name in enumerate(inst.attributes["keypoint_names"]) if kps[3 * k + 2] > 0]


def _keypoint_region(name: str, x: float, y: float, s: Sample) -> dict:
    return {"type": _KEYPOINT, "from_name": "keypoints",
            "value": {"x": x * 100.0 / s.width, "y": y * 100.0 / s.height, "width": 0.5, _KEYPOINT: [name]}}


def _is_point(pt: Any) -> bool:
    return isinstance(pt, dict) and isinstance(pt.get("label"), str) and _is_num(pt.get("x")) and _is_num(pt.get("y"))


def _keypoint_names(samples: list[Sample]) -> list[str]:
    names = {n for s in samples for i in s.instances if _named_keypoints(i) for n in i.attributes["keypoint_names"]}
    names |= {pt["label"] for s in samples for pt in s.attributes.get(POINTS) or [] if _is_point(pt)}
    return sorted(names)


CONTROLS = ("label", "polygon", "brush", "choice")  # every control `sample_results` writes to


def label_config(names: list[str], keypoints: list[str] = (), controls: tuple[str, ...] = CONTROLS,
                  single_choice: bool = False, header: str = "") -> str:
    """A labeling config with one control per region type, so the export imports as is.
    `controls`: the subset to offer (a relabelling project offers only its task's); the names
    are those `sample_results` writes (a result whose `from_name` names no control is dropped by
    Label Studio's frontend). `header`: text shown above the image (`$field`s are task data)."""
    labels = "".join(f'\n    <Label value="{_xml(n)}"/>' for n in names)
    choices = "".join(f'\n    <Choice value="{_xml(n)}"/>' for n in names)
    blocks = {
        "label": f'  <RectangleLabels name="label" toName="image">{labels}\n  </RectangleLabels>\n',
        "polygon": f'  <PolygonLabels name="polygon" toName="image">{labels}\n  </PolygonLabels>\n',
        "brush": f'  <BrushLabels name="brush" toName="image">{labels}\n  </BrushLabels>\n',
        "choice": f'  <Choices name="choice" toName="image" choice="{"single" if single_choice else "multiple"}"'
                  f' showInline="true">{choices}\n  </Choices>\n',
    }
    return ('<View>\n' + (f'  <Header value="{_xml(header)}"/>\n' if header else "")
            + '  <Image name="image" value="$image"/>\n'
            + "".join(blocks[c] for c in controls)
            + ('  <KeyPointLabels name="keypoints" toName="image">'
               + "".join(f'\n    <Label value="{_xml(n)}"/>' for n in keypoints) + '\n  </KeyPointLabels>\n'
               if keypoints else "")
            + '</View>\n')


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


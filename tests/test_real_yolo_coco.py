"""YOLO and COCO readers on REAL exports written by the tools (tests/data/real/, see its README).

Every expected number below was read from the export's own files, not from our reader: label
rows counted per class id with `awk '{print $1}' *.txt | sort | uniq -c`, COCO annotations per
category_id counted in the JSON, image sizes from the JSON's width/height. Images whose licence
does not allow copying them (COCO's CC BY-NC photos) are not in the repository: the tests render
stand-ins of the declared size in tmp_path, next to the real annotation files.
"""
from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from visionflow.core.errors import DataError
from visionflow.formats import ConversionReport, read_source, write_format
from visionflow.formats.yolo import write_yolo

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

REAL = Path(__file__).parent / "data" / "real"


def per_class(res) -> dict[str, int]:
    names = {c.id: c.name for c in res.categories}
    return dict(collections.Counter(names[i.category_id] for s in res.samples for i in s.instances))


def per_split(res) -> dict[str, int]:
    return dict(collections.Counter(s.attributes.get("split") for s in res.samples))


def content(res) -> dict[tuple[str, str], list]:
    """What must survive a round trip, keyed by (image sha256, split): image labels, then per
    instance its class name, crowd flag, mask, attributes, box and polygons (numbers compared
    by `assert_same` to 1e-3 px: writers print floats with 10 significant digits)."""
    names = {c.id: c.name for c in res.categories}
    out = {}
    for s in res.samples:
        insts = sorted(((names[i.category_id], i.iscrowd, json.dumps(i.rle, sort_keys=True),
                         json.dumps(i.attributes, sort_keys=True)), [list(i.bbox)] + [list(r) for r in i.polygons])
                       for i in s.instances)
        out[(s.sha256, s.attributes.get("split"))] = (sorted(names[c] for c in s.labels), insts)
    return out


def assert_same(a, b) -> None:
    a, b = content(a), content(b)
    assert sorted(a) == sorted(b)
    for key in a:
        (labels_a, insts_a), (labels_b, insts_b) = a[key], b[key]
        assert labels_a == labels_b and [k for k, _ in insts_a] == [k for k, _ in insts_b], key
        for (_, geo_a), (_, geo_b) in zip(insts_a, insts_b):
            assert [len(g) for g in geo_a] == [len(g) for g in geo_b], key
            assert np.allclose(np.concatenate(geo_a), np.concatenate(geo_b), atol=1e-3), key


def copy_with_stand_ins(src: Path, dst: Path, coco_json: str) -> Path:
    """Copy a vendored export and render grey stand-ins for the images it does not hold."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / coco_json).read_text())
    for img in doc["images"]:
        path = dst / img["file_name"]
        if not path.exists():
            Image.new("RGB", (img["width"], img["height"]), (128, 128, 128)).save(path)
    return dst


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionflow.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


# --- CVAT "YOLO 1.1" (darknet layout: obj.data, obj.names, train.txt, obj_train_data/) ---------

def test_cvat_yolo11_obj_data_and_zero_byte_labels():
    # obj.data: classes = 8, names = data/obj.names, train = data/train.txt (4 lines
    # data/obj_train_data/<image>). birds.txt and crack.txt are 0 bytes (CVAT exports only
    # rectangles; those images hold polygons and a polyline); shapes.txt: 1 row of class 0
    # (rectangle); strawberry.txt: 17 rows of class 7 (646 bytes / 38 per row).
    root = REAL / "cvat-yolo1.1"
    for ann in (root / "obj.data", root):  # the file, or the export folder itself
        res = read_source("yolo", root, ann, "cvat")
        assert [c.name for c in res.categories] == ["rectangle", "triangle", "circle", "ellipse", "line", "crack",
                                                    "bird", "strawberry"]
        counts = {Path(s.path).name: len(s.instances) for s in res.samples}
        assert counts == {"birds.jpg": 0, "crack.jpeg": 0, "shapes.jpg": 1, "strawberry.jpg": 17}
        assert per_class(res) == {"rectangle": 1, "strawberry": 17} and per_split(res) == {"train": 4}
        assert res.report.total == 0


def test_cvat_yolo11_boxes_equal_the_same_tasks_coco_export():
    # The same CVAT task exported as COCO 1.0: its 17 strawberry boxes (annotations 7-23) are the
    # YOLO 1.1 rows, up to the 6 decimals of YOLO and the 2 of CVAT's COCO.
    yolo = read_source("yolo", REAL / "cvat-yolo1.1", REAL / "cvat-yolo1.1/obj.data", "y")
    coco = read_source("coco", REAL / "cvat-coco1.0/images", REAL / "cvat-coco1.0/annotations/instances_default.json",
                       "c")
    boxes = {r: sorted([round(v, 1) for v in i.bbox] for s in res.samples if s.path.endswith("strawberry.jpg")
                       for i in s.instances) for r, res in (("yolo", yolo), ("coco", coco))}
    assert len(boxes["yolo"]) == len(boxes["coco"]) == 17
    assert np.allclose(boxes["yolo"], boxes["coco"], atol=0.11)


def test_cvat_yolo11_round_trips_through_yolo_and_coco(tmp_path):
    res = read_source("yolo", REAL / "cvat-yolo1.1", REAL / "cvat-yolo1.1", "cvat")
    for fmt in ("yolo", "coco"):
        target = write_format(fmt, res.samples, res.categories, tmp_path / fmt, project_root=Path("."))
        back = read_source(fmt, tmp_path / fmt, target, "back")
        assert_same(back, res)
        assert back.report.total == 0


def test_cvat_yolo11_through_the_cli(tmp_path):
    make_project(tmp_path)
    out = cli("ingest", "--format", "yolo", "--images", str(REAL / "cvat-yolo1.1"), "--annotations",
              str(REAL / "cvat-yolo1.1"), "--out", "ing", "--strict", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "ing/manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4 and sum(len(json.loads(x)["instances"]) for x in lines) == 18


# --- LabelImg YOLO (classes.txt + a label file next to each image) -----------------------------

def test_labelimg_yolo_flat_folder():
    # classes.txt: bird, crack, rectangle, triangle, circle, ellipse, line, strawberry.
    # Rows: birds.txt 2 x class 0, crack.txt 1 x 1, shapes.txt 2, 3, 4, 5, 6, strawberry.txt 17 x 7.
    root = REAL / "labelimg-yolo"
    for ann in (root / "classes.txt", root):
        res = read_source("yolo", root, ann, "li")
        assert per_class(res) == {"bird": 2, "crack": 1, "rectangle": 1, "triangle": 1, "circle": 1, "ellipse": 1,
                                  "line": 1, "strawberry": 17}
        assert len(res.samples) == 4 and res.report.total == 0  # classes.txt is not an orphan label


def test_labelimg_yolo_images_labels_tree_and_its_misnamed_copy(tmp_path):
    # classes.txt: logo, camera, led; labels/*.txt: class 0 x 2, 1 x 4, 2 x 4 (5 rows per image).
    root = REAL / "labelimg-yolo-tree"
    res = read_source("yolo", root, root, "phones")
    assert per_class(res) == {"logo": 2, "camera": 4, "led": 4} and len(res.samples) == 2
    # The same files as Images/ + Annotations/ (a layout users bring): Ultralytics finds no
    # label, and neither do we, so the read fails and says where it looked instead of
    # giving 2 images and 0 boxes.
    shutil.copytree(root / "images", tmp_path / "Images")
    shutil.copytree(root / "labels", tmp_path / "Annotations")
    shutil.copy(root / "classes.txt", tmp_path)
    with pytest.raises(DataError, match="none of the 2 images has a label file") as err:
        read_source("yolo", tmp_path, tmp_path, "phones")
    assert "Annotations" in str(err.value) and "labels/" in str(err.value)
    make_project(tmp_path / "p")
    out = cli("ingest", "--format", "yolo", "--images", str(tmp_path), "--annotations", str(tmp_path),
              "--out", "ing", cwd=tmp_path / "p")
    assert out.returncode != 0 and "Traceback" not in out.stderr and "none of the 2 images" in out.stderr


# --- Roboflow YOLOv9 (data.yaml with absolute train/val paths and test: ../test/images) --------

def test_roboflow_yolo_data_yaml_with_absolute_and_parent_paths(tmp_path):
    # data.yaml: train: /Users/tony/tmp/sharks-tiny-yolov9/train/images (the exporting machine),
    # val: the same for valid, test: ../test/images; names fish, primary, shark.
    # Rows per class id (awk): train 0: 10, 1: 7, 2: 27; valid 1: 2, 2: 8; test 1: 1, 2: 5.
    root = REAL / "roboflow-sharks-yolov9"
    res = read_source("yolo", root, root / "data.yaml", "sharks")
    assert per_split(res) == {"train": 7, "val": 2, "test": 1}
    assert per_class(res) == {"fish": 10, "primary": 10, "shark": 40} and res.report.total == 0
    polygons = sum(1 for s in res.samples for i in s.instances if i.polygons)
    assert polygons == 17  # rows with more than 4 values: 3 + 3 + 2 (train) + 1 + 2 (valid) + 6 (test)
    # the same counts as the COCO export of the same Roboflow project (per split, per class)
    coco = read_source("coco", REAL / "roboflow-sharks-coco", REAL / "roboflow-sharks-coco", "sharks")
    assert per_class(coco) == per_class(res) and per_split(coco) == per_split(res)

    # A split folder that is not there is named as such, not as an unsafe path.
    ds = tmp_path / "ds"
    shutil.copytree(root, ds)
    shutil.rmtree(ds / "valid")
    part = read_source("yolo", ds, ds / "data.yaml", "sharks")
    assert per_split(part) == {"train": 7, "test": 1}
    assert "valid/images does not exist" in part.report.examples["split_missing"][0]
    # Paths still have to stay inside the dataset root.
    (tmp_path / "elsewhere/images").mkdir(parents=True)
    (ds / "data.yaml").write_text((ds / "data.yaml").read_text().replace("../test/images", "../../elsewhere/images"))
    with pytest.raises(DataError, match="outside the images root"):
        read_source("yolo", ds, ds / "data.yaml", "sharks")


def test_roboflow_yolo_round_trip(tmp_path):
    res = read_source("yolo", REAL / "roboflow-sharks-yolov9", REAL / "roboflow-sharks-yolov9/data.yaml", "s")
    target = write_yolo(res.samples, res.categories, tmp_path / "out")
    back = read_source("yolo", tmp_path / "out", target, "s")
    assert_same(back, res)


# --- COCO exports ----------------------------------------------------------------------------

def test_cvat_coco10_boxes_polygons_and_uncompressed_crowd_rle(tmp_path):
    # instances_default.json: 4 images, 23 annotations: bird 2 polygons, triangle 1 polygon,
    # rectangle 1 box (segmentation []), ellipse 2 uncompressed RLE with iscrowd 1, strawberry 17
    # boxes; crack.jpeg has none. CVAT's attributes {"occluded": false[, "rotation": 0.0]} are kept.
    res = read_source("coco", REAL / "cvat-coco1.0/images", REAL / "cvat-coco1.0/annotations/instances_default.json",
                      "cvat")
    assert per_class(res) == {"bird": 2, "triangle": 1, "rectangle": 1, "ellipse": 2, "strawberry": 17}
    crowd = [i for s in res.samples for i in s.instances if i.iscrowd]
    assert len(crowd) == 2 and all(isinstance(i.rle["counts"], list) for i in crowd)
    assert [i.attributes for s in res.samples for i in s.instances if i.category_id == 1] == \
           [{"attributes": {"occluded": False, "rotation": 0.0}}]
    assert res.report.total == 0
    target = write_format("coco", res.samples, res.categories, tmp_path / "out", project_root=Path("."))
    assert_same(read_source("coco", tmp_path / "out", target, "cvat"), res)


def test_roboflow_coco_per_split_ids_from_zero(tmp_path):
    # Each split's _annotations.coco.json numbers images and annotations from 0. train: 7 images,
    # 44 annotations (category 1 fish 10, 2 primary 7, 3 shark 27); valid: 2 images, 10 (2: 2,
    # 3: 8); test: 1 image, 6 (2: 1, 3: 5). Category 0 "sharks" is Roboflow's unused parent.
    root = REAL / "roboflow-sharks-coco"
    res = read_source("coco", root, root, "sharks")
    assert per_split(res) == {"train": 7, "val": 2, "test": 1}
    assert per_class(res) == {"fish": 10, "primary": 10, "shark": 40}
    assert res.report.total == 0  # id 0 is valid COCO; a 0.29 px overhang is rounding, not clipping
    target = write_format("coco", res.samples, res.categories, tmp_path / "out", project_root=Path("."))
    assert_same(read_source("coco", tmp_path / "out", target, "sharks"), res)

    make_project(tmp_path / "p")
    out = cli("ingest", "--format", "coco", "--images", str(root), "--annotations", str(root), "--out", "ing",
              "--strict", cwd=tmp_path / "p")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "p/ing/validation.json").read_text())["instances"] == 60


def test_panoptic_segments_become_instance_masks(tmp_path):
    # panoptic_examples.json: 2 images; 000000142238.png has 18 segments (1 crowd), 000000439180.png
    # 32 (2 crowd); each segment's `area` is its pixel count in the PNG (id = R + 256 G + 256^2 B).
    root = copy_with_stand_ins(REAL / "panopticapi-sample", tmp_path / "pan", "panoptic_examples.json")
    doc = json.loads((root / "panoptic_examples.json").read_text())
    res = read_source("coco", root, root / "panoptic_examples.json", "pan")
    assert {s.path: len(s.instances) for s in res.samples} == {"000000142238.jpg": 18, "000000439180.jpg": 32}
    assert sum(i.iscrowd for s in res.samples for i in s.instances) == 3
    expected = {(a["image_id"], g["category_id"], g["area"]) for a in doc["annotations"] for g in a["segments_info"]}
    ids = {img["file_name"]: img["id"] for img in doc["images"]}
    got = {(ids[s.path], i.category_id, int(mask_utils.area(i.rle))) for s in res.samples for i in s.instances}
    assert got == expected and res.report.total == 0  # every mask has exactly the declared pixel count
    names = {c.id: c.name for c in res.categories}
    assert collections.Counter(names[i.category_id] for s in res.samples for i in s.instances)["horse"] == 12
    target = write_format("coco", res.samples, res.categories, tmp_path / "out", project_root=Path("."))
    assert_same(read_source("coco", tmp_path / "out", target, "pan"), res)


def test_person_keypoints_are_kept(tmp_path):
    # test_coco.json (mmpose): 4 images, 14 person annotations with 17 keypoints (51 values) each;
    # num_keypoints per annotation as listed in the file. Only 000000000785.jpg (CC BY) is vendored.
    root = copy_with_stand_ins(REAL / "mmpose-coco-keypoints", tmp_path / "kp", "test_coco.json")
    doc = json.loads((root / "test_coco.json").read_text())
    res = read_source("coco", root, root / "test_coco.json", "kp")
    kept = sorted((i.attributes["num_keypoints"], tuple(i.attributes["keypoints"]))
                  for s in res.samples for i in s.instances)
    assert kept == sorted((a["num_keypoints"], tuple(a["keypoints"])) for a in doc["annotations"])
    assert len(kept) == 14 and all(len(k) == 51 for _, k in kept) and res.report.total == 0
    target = write_format("coco", res.samples, res.categories, tmp_path / "out", project_root=Path("."))
    assert_same(read_source("coco", tmp_path / "out", target, "kp"), res)


def test_person_keypoints_go_to_yolo_pose_and_back(tmp_path):
    """COCO person keypoints written as Ultralytics pose data (kpt_shape [17, 3], box + keypoint
    rows) and read back: the same keypoints; the person outlines a pose row cannot hold counted."""
    root = copy_with_stand_ins(REAL / "mmpose-coco-keypoints", tmp_path / "kp", "test_coco.json")
    res = read_source("coco", root, root / "test_coco.json", "kp")
    report = ConversionReport()
    target = write_format("yolo", res.samples, res.categories, tmp_path / "out", project_root=Path("."), report=report)
    assert yaml.safe_load(target.read_text())["kpt_shape"] == [17, 3]
    outlined = sum(1 for s in res.samples for i in s.instances if i.polygons or i.rle is not None)
    assert report.counts["pose_outline_dropped"] == outlined > 0
    back = read_source("yolo", tmp_path / "out", target, "kp")
    by_path = {Path(s.path).name: s for s in back.samples}
    for s in res.samples:
        got = by_path[Path(s.path).name].instances
        assert len(got) == len(s.instances)
        for a, b in zip(s.instances, got):
            assert b.bbox == pytest.approx(a.bbox, abs=1e-6) and b.polygons == []
            assert b.attributes["keypoints"] == pytest.approx(a.attributes["keypoints"], abs=1e-6)
            assert b.attributes["num_keypoints"] == a.attributes["num_keypoints"]


def test_coco_with_no_image_found_fails_naming_where_it_looked(tmp_path):
    # The real keypoints file with the images folder given wrongly: exit 1, not 0 samples.
    make_project(tmp_path)
    ann = REAL / "mmpose-coco-keypoints/test_coco.json"
    out = cli("ingest", "--format", "coco", "--images", str(tmp_path), "--annotations", str(ann), "--out", "ing",
              cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "none of its 4 images could be read" in out.stderr and str(tmp_path / "000000000785.jpg") in out.stderr

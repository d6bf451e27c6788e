"""Label Studio's YOLO and COCO exports, as its converter writes them, read by our YOLO and COCO
readers (tests/data/real/labelstudio-*-yolo/, labelstudio-*-coco/, see its README).

Those folders are what label-studio-sdk 2.1.2's `Converter.convert_to_yolo` / `convert_to_coco`
(the code behind Label Studio's own "YOLO" and "COCO" exports) wrote from the vendored JSON
exports labelstudio-keypoints/, labelstudio-mixed/ and labelstudio-polygon/, with the images not
downloaded (so the COCO `file_name` is the task's `/data/upload/<n>/<name>`, as Label Studio
writes it when it does not copy the image). The tests render grey stand-ins of each
`original_width` x `original_height`.

Every expected number is computed from the Label Studio JSON the exports came from (percent *
original size / 100), not from our readers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.formats import read_source
from visionflow.formats.detect import detect_source

REAL = Path(__file__).parent / "data" / "real"


def stand_in(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (128, 128, 128)).save(path)
    return path


def results(name: str) -> list[dict]:
    """The first task's results in a vendored Label Studio JSON export."""
    return json.loads((REAL / name).read_text())[0]["annotations"][0]["result"]


def pixels(r: dict, key_x: str = "x", key_y: str = "y") -> tuple[float, float]:
    return r["value"][key_x] * r["original_width"] / 100, r["value"][key_y] * r["original_height"] / 100


def rectangle_px(r: dict) -> list[float]:
    v, w, h = r["value"], r["original_width"], r["original_height"]
    return [v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100]


def read_export(tmp_path: Path, folder: str, image: str, size: tuple[int, int]):
    export = tmp_path / folder
    shutil.copytree(REAL / folder, export)
    stand_in(export / image, *size)
    found = detect_source(export)
    return found, read_source(found.format, found.images, found.annotations, "ls")


def test_yolo_pose_rows_of_a_keypoints_project_are_boxes_with_their_named_keypoints(tmp_path):
    """A person box with 3 of COCO's 17 keypoints labelled: Label Studio writes the box, then
    x y visibility for every keypoint label of notes.json (0 0 0 for the 14 not labelled)."""
    res = results("labelstudio-keypoints/data_keypoints.json")
    box = next(r for r in res if r["type"] == "rectanglelabels")
    found, read = read_export(tmp_path, "labelstudio-keypoints-yolo", "images/image1.jpg",
                              (box["original_width"], box["original_height"]))
    assert found.format == "yolo" and read.report.total == 0, read.report.lines()
    assert [c.name for c in read.categories] == ["person"]
    (inst,) = read.samples[0].instances
    assert inst.bbox == pytest.approx(rectangle_px(box), abs=1e-6) and inst.polygons == []
    names = json.loads((REAL / "labelstudio-keypoints-yolo/notes.json").read_text())["categories"][0]["keypoints"]
    assert inst.attributes["keypoint_names"] == names and len(names) == 17
    expected = []
    for name in names:
        point = next((r for r in res if r["type"] == "keypointlabels" and r["value"]["keypointlabels"] == [name]
                      and r.get("parentID") == box["id"]), None)
        expected += [*pixels(point), 2] if point else [0.0, 0.0, 0]
    assert inst.attributes["keypoints"] == pytest.approx(expected, abs=1e-6)
    assert inst.attributes["num_keypoints"] == 3


def test_yolo_pose_row_with_unlinked_keypoints_keeps_its_box(tmp_path):
    """The mixed project's keypoints have no parent region: Label Studio writes the rectangle's
    row with both keypoints 0 0 0. Read as a pose row, not as a 5-point polygon."""
    res = results("labelstudio-mixed/data.json")
    box = next(r for r in res if r["type"] == "rectanglelabels")
    _, read = read_export(tmp_path, "labelstudio-mixed-yolo", "images/235b37ac__test_image1.jpg",
                          (box["original_width"], box["original_height"]))
    (inst,) = read.samples[0].instances
    assert inst.polygons == [] and inst.bbox == pytest.approx(rectangle_px(box), abs=1e-6)
    assert inst.attributes == {"keypoints": [0.0, 0.0, 0, 0.0, 0.0, 0], "num_keypoints": 0,
                               "keypoint_names": ["keypoint_label1", "keypoint_label2"]}
    (tmp_path / "labelstudio-mixed-yolo/notes.json").write_text("{not json")
    with pytest.raises(DataError, match=r"notes\.json: not JSON"):
        read_source("yolo", tmp_path / "labelstudio-mixed-yolo", tmp_path / "labelstudio-mixed-yolo/classes.txt", "ls")


def test_coco_file_names_that_are_label_studio_upload_urls_are_read_as_label_studio_reads_them(tmp_path):
    """`/data/upload/29/example.png`: the image is looked for as `example.png` where the export
    copies images (images/) or in the folder given (Label Studio's media/upload/29/)."""
    (poly,) = results("labelstudio-polygon/data.json")
    size = (poly["original_width"], poly["original_height"])
    found, read = read_export(tmp_path, "labelstudio-polygon-coco", "images/example.png", size)
    assert found.images == tmp_path / "labelstudio-polygon-coco/images"
    (sample,) = read.samples
    assert sample.path == "example.png" and [c.name for c in read.categories] == ["Airplane", "Car"]
    (inst,) = sample.instances
    expected = [v for x, y in poly["value"]["points"] for v in (x * size[0] / 100, y * size[1] / 100)]
    assert inst.polygons[0] == pytest.approx(expected, abs=1e-6)
    upload = stand_in(tmp_path / "media/upload/29/example.png", *size)
    again = read_source("coco", upload.parent, tmp_path / "labelstudio-polygon-coco/result.json", "ls")
    assert [Path(s.root, s.path) for s in again.samples] == [upload]


def test_coco_keypoints_export_keeps_label_studio_s_separate_keypoint_instance(tmp_path):
    """Label Studio's COCO export writes the person's box and, apart, a "default" instance
    holding the keypoints with their own box: read as the file says."""
    res = results("labelstudio-keypoints/data_keypoints.json")
    box = next(r for r in res if r["type"] == "rectanglelabels")
    _, read = read_export(tmp_path, "labelstudio-keypoints-coco", "image1.jpg",
                          (box["original_width"], box["original_height"]))
    names = {c.id: c.name for c in read.categories}
    person, points = read.samples[0].instances
    assert names[person.category_id] == "person" and names[points.category_id] == "default"
    assert person.bbox == pytest.approx(rectangle_px(box), abs=1e-6)
    labelled = [pixels(r) for r in res if r["type"] == "keypointlabels"]
    got = points.attributes["keypoints"]
    # Label Studio's converter rounds the points to whole pixels; the 14 unlabelled are 0 0 0
    assert [(x, y) for x, y, v in zip(got[0::3], got[1::3], got[2::3]) if v] == [(round(x), round(y))
                                                                                 for x, y in labelled]
    assert len(got) == 17 * 3 and points.attributes["num_keypoints"] == 3


def write_pose_dataset(root: Path, shape, rows: list[str]) -> Path:
    stand_in(root / "images/train/a.jpg", 200, 100)
    (root / "labels/train").mkdir(parents=True)
    (root / "labels/train/a.txt").write_text("".join(f"{r}\n" for r in rows))
    (root / "data.yaml").write_text(f"train: images/train\nval: images/train\nnames: [person]\nkpt_shape: {shape}\n")
    return root / "data.yaml"


def test_ultralytics_kpt_shape_reads_pose_rows_with_and_without_visibility(tmp_path):
    data = write_pose_dataset(tmp_path / "d2", [2, 2], ["0 0.5 0.5 0.2 0.4 0.45 0.4 0 0", "0 0.2 0.2 0.1 0.1",
                                                        "0 0.5 0.5 0.2 0.4 0.45 0.4"])
    read = read_source("yolo", data.parent, data, "u")
    first, box_only = read.samples[0].instances
    assert first.bbox == pytest.approx([80, 30, 120, 70]) and first.polygons == []
    assert first.attributes == {"keypoints": pytest.approx([90, 40, 2, 0, 0, 0]), "num_keypoints": 1}
    assert box_only.attributes == {}
    assert read.report.counts == {"row_columns": 1}  # 6 values: neither a box nor 4 + 2 * 2
    assert "kpt_shape [2, 2]: 4 or 8" in read.report.examples["row_columns"][0]

    data = write_pose_dataset(tmp_path / "d3", [2, 3], ["0 0.5 0.5 0.2 0.4 1.1 0.4 1 0.45 0.4 2",
                                                        "0 0.5 0.5 0.2 0.4 0.45 0.4 3 0.45 0.4 2"])
    read = read_source("yolo", data.parent, data, "u")
    (inst,) = read.samples[0].instances
    assert inst.attributes["keypoints"] == pytest.approx([200, 40, 1, 90, 40, 2])  # 1.1 moved onto the edge
    assert read.report.counts == {"keypoint_clipped": 1, "row_unparsable": 1}
    assert "visibility 3 is not 0, 1 or 2" in read.report.examples["row_unparsable"][0]


@pytest.mark.parametrize("shape", ["[2, 4]", "[0, 3]", "17", "[17, 3, 1]"])
def test_a_bad_kpt_shape_is_refused_naming_the_file(tmp_path, shape):
    data = write_pose_dataset(tmp_path, shape, ["0 0.5 0.5 0.2 0.4"])
    with pytest.raises(DataError, match=r"data\.yaml \[`kpt_shape`\]: `kpt_shape` is .* expected \[k, d\]"):
        read_source("yolo", data.parent, data, "u")


def test_yolo_obb_export_rows_are_the_rotated_rectangles_corners(tmp_path):
    """Label Studio's "YOLO OBB" export (`is_obb`) of 25 rotated rectangles: each row is an
    oriented box whose corners are the rectangle's, turned clockwise by `rotation` about its
    top-left corner as Label Studio draws it. The SDK's test images have no extension (`/image1`),
    so the stand-ins are named <label stem>.jpg."""
    import math

    export = tmp_path / "obb"
    shutil.copytree(REAL / "labelstudio-obb-yolo", export)
    tasks = json.loads((REAL / "labelstudio-obb/data_obb.json").read_text())
    expected = {}
    for task in tasks:
        res = task["annotations"][0]["result"]
        size = (res[0]["original_width"], res[0]["original_height"])
        stem = next(p.stem for p in (export / "labels").iterdir() if p.stem.endswith("__" + task["data"]["image"][1:]))
        stand_in(export / "images" / f"{stem}.jpg", *size)
        corners = []
        for r in res:
            v, (w, h) = r["value"], size
            x, y, bw, bh = v["x"] * w / 100, v["y"] * h / 100, v["width"] * w / 100, v["height"] * h / 100
            c, s = math.cos(math.radians(v["rotation"])), math.sin(math.radians(v["rotation"]))
            pts = [(x, y), (x + bw * c, y + bw * s), (x + bw * c - bh * s, y + bw * s + bh * c), (x - bh * s, y + bh * c)]
            corners.append((v["rectanglelabels"][0], [min(max(q, 0.0), lim) for p in pts for q, lim in zip(p, size)]))
        expected[f"images/{stem}.jpg"] = corners
    found = detect_source(export)
    read = read_source(found.format, found.images, found.annotations, "ls")
    names = {c.id: c.name for c in read.categories}
    got = {s.path: [(names[i.category_id], i.polygons[0]) for i in s.instances if i.attributes == {"obb": True}]
           for s in read.samples}
    assert sum(map(len, got.values())) == 25 == sum(len(t["annotations"][0]["result"]) for t in tasks)
    for path, corners in expected.items():
        assert [n for n, _ in got[path]] == [n for n, _ in corners]
        for (_, ring), (_, want) in zip(got[path], corners):
            assert ring == pytest.approx(want, abs=1e-3)

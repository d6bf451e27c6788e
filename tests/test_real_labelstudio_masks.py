"""Label Studio reader on REAL exports (tests/data/real/labelstudio-*/, see its README), and the
masks / VOC readers refusing folders that are not what they were told.

The Label Studio exports come from HumanSignal/label-studio-sdk's converter tests: JSON exports
written by Label Studio (`data*.json`, with their `label_config*.xml`) and, next to each, the
JSON-MIN that the same SDK's `Converter.convert_to_json_min` (label-studio-sdk 2.1.2, the code
Label Studio's own "JSON-MIN" export runs) wrote from it (`*.min.json`). They hold no images:
the tests render grey stand-ins of each result's `original_width` x `original_height`.

Every expected number below was read from the export's own files, not from our reader: results
counted per `type` and per label (`grep -c '"type": "rectanglelabels"'`, the `*labels` lists read
in the file), pixel values computed by hand as percent * original size / 100 from the numbers
printed in the file.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.formats import ConversionReport, read_source, write_format
from visionflow.formats.labelstudio import rotated_corners

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

REAL = Path(__file__).parent / "data" / "real"


def stand_in(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (128, 128, 128)).save(path)
    return path


def content(res) -> list:
    """What a round trip must keep, per image: file, labels, per instance class, box, polygons and
    attributes (numbers rounded to 1e-6 px), and the unlinked points."""
    names = {c.id: c.name for c in res.categories}

    def r(v):
        return [r(x) for x in v] if isinstance(v, list) else round(v, 6) if isinstance(v, float) else v

    return [(s.path, s.sha256, sorted(names[c] for c in s.labels),
             sorted((names[i.category_id], r(i.bbox), r(i.polygons), json.dumps(r_attr(i.attributes, r), sort_keys=True))
                    for i in s.instances),
             [(p["label"], round(p["x"], 6), round(p["y"], 6)) for p in s.attributes.get("points", [])])
            for s in sorted(res.samples, key=lambda s: s.path)]


def r_attr(attributes: dict, r) -> dict:
    return {k: r(v) for k, v in attributes.items()}


def round_trip(res, tmp_path: Path, images: Path) -> None:
    """Label Studio -> Label Studio: nothing counted as lost on writing, equal on reading back."""
    from visionflow.formats import ConversionReport
    report = ConversionReport()
    out = write_format("labelstudio", res.samples, res.categories, tmp_path / "rt", project_root=Path("."),
                       report=report)
    assert report.total == 0, report.lines()
    again = read_source("labelstudio", tmp_path / "rt", out, "ls")
    assert content(again) == content(res)


# --- keypoints linked to their box by parentID (data_keypoints.json, completed_by an object) -------

# The file: 1 task, image /data/upload/18/image1.jpg, 216 x 174; 1 annotation whose completed_by is
# an object {"id": 1, "email": ...}; 9 results: 1 rectanglelabels "person" (id hplPm0Szvc),
# 3 keypointlabels (nose, left_eye, right_eye) with parentID hplPm0Szvc, 5 relations.
PERSON = [38.849487785658, 7.65957446808511, 47.304964539007095, 50.92198581560283]  # x, y, w, h in percent
KEYPOINTS = {"nose": (64.44444444444444, 39.290780141843975), "left_eye": (58.38849487785658, 30.78014184397163),
             "right_eye": (70.50039401103231, 32.19858156028369)}


def px(x: float, y: float) -> list[float]:
    return [x * 216 / 100, y * 174 / 100]


def test_keypoints_linked_by_parent_id_are_kept_on_their_box(tmp_path):
    root = REAL / "labelstudio-keypoints"
    images = tmp_path / "upload"
    stand_in(images / "image1.jpg", 216, 174)  # Label Studio's media/upload/18/ folder
    res = read_source("labelstudio", images, root / "data_keypoints.json", "ls")
    assert [c.name for c in res.categories] == ["person"]  # keypoint labels are part names, not classes
    (s,) = res.samples
    assert s.path == "image1.jpg" and (s.width, s.height) == (216, 174) and s.attributes == {}
    (person,) = s.instances
    x, y, w, h = PERSON
    assert person.bbox == pytest.approx(px(x, y) + px(x + w, y + h))
    expected = [v for name in ("nose", "left_eye", "right_eye") for v in px(*KEYPOINTS[name]) + [2]]
    assert person.attributes["keypoints"] == pytest.approx(expected)
    assert person.attributes["keypoint_names"] == ["nose", "left_eye", "right_eye"]
    assert person.attributes["num_keypoints"] == 3
    assert res.report.counts == {"relation_ignored": 5}  # the file's 5 relation results
    round_trip(res, tmp_path, images)


def test_keypoints_json_min_has_no_parent_ids_so_they_stay_unlinked(tmp_path):
    # The JSON-MIN of the same task: "bbox" [1 region] and "keypoints" [3 regions], no ids.
    images = tmp_path / "upload"
    stand_in(images / "image1.jpg", 216, 174)
    res = read_source("labelstudio", images, REAL / "labelstudio-keypoints/data_keypoints.min.json", "ls")
    (s,) = res.samples
    assert [c.name for c in res.categories] == ["person"] and s.instances[0].attributes == {}
    assert [(p["label"], pytest.approx([p["x"], p["y"]])) for p in s.attributes["points"]] == \
        [(name, px(*KEYPOINTS[name])) for name in ("nose", "left_eye", "right_eye")]
    assert res.report.counts == {"keypoint_unlinked": 3}
    assert "no parentID" in res.report.examples["keypoint_unlinked"][0]
    round_trip(res, tmp_path, images)


def test_original_size_is_checked_against_the_image(tmp_path):
    # A stand-in of twice the declared size: read (percent of the file), counted with both sizes.
    images = tmp_path / "upload"
    stand_in(images / "image1.jpg", 432, 348)
    ann = REAL / "labelstudio-keypoints/data_keypoints.json"
    res = read_source("labelstudio", images, ann, "ls")
    assert res.samples[0].instances[0].bbox[0] == pytest.approx(PERSON[0] * 432 / 100)
    assert res.report.counts["image_size_mismatch"] == 1
    example = res.report.examples["image_size_mismatch"][0]
    assert str(ann) in example and "task id 10764" in example and "declared 216x174, file is 432x348" in example


# --- rotated rectangles (data_obb.json) --------------------------------------------------------

def obb_export(tmp_path: Path, name: str) -> Path:
    """The export as written, but for its data.image: the SDK's test replaced the upload paths by
    "/image1", "/image2", "/image3" (absolute, no extension), which we refuse as unsafe; they are
    renamed to the stand-ins "image1.png", ... and nothing else is changed."""
    doc = json.loads((REAL / "labelstudio-obb" / name).read_text())
    for task in doc:
        data = task["data"] if "data" in task else task  # JSON-MIN records hold the data keys themselves
        data["image"] = data["image"].lstrip("/") + ".png"
    ann = tmp_path / name
    ann.write_text(json.dumps(doc))
    for n, (w, h) in enumerate([(597, 768), (433, 768), (716, 768)], 1):  # original_width/height per task
        stand_in(tmp_path / f"image{n}.png", w, h)
    return ann


@pytest.mark.parametrize("name", ["data_obb.json", "data_obb.min.json"])
def test_rotated_rectangles_are_kept_as_oriented_boxes(tmp_path, name):
    # 3 tasks, 23 + 1 + 1 rectanglelabels, every one with a rotation (20.3 .. 357.9 degrees);
    # labels "Butterfly" 24 times and "butterfly" once (task 10961): two classes, as written.
    res = read_source("labelstudio", tmp_path, obb_export(tmp_path, name), "ls")
    assert [c.name for c in res.categories] == ["Butterfly", "butterfly"]
    assert [(s.path, len(s.instances)) for s in res.samples] == [("image1.png", 23), ("image2.png", 1),
                                                                 ("image3.png", 1)]
    assert all(i.attributes == {"obb": True} and len(i.polygons) == 1 and len(i.polygons[0]) == 8
               for s in res.samples for i in s.instances)
    # Task 10960's one box: x 5.695220963642262, y 43.59434330542485, w 73.84200723054623,
    # h 24.43625178984779 (percent of 433 x 768), rotation 345.1381651311527.
    (inst,) = res.samples[1].instances
    x, y, w, h = 5.695220963642262 * 4.33, 43.59434330542485 * 7.68, 73.84200723054623 * 4.33, 24.43625178984779 * 7.68
    t = np.deg2rad(345.1381651311527)
    top_right = [x + w * np.cos(t), y + w * np.sin(t)]  # turned clockwise (y down) about (x, y)
    assert inst.polygons[0][:4] == pytest.approx([x, y] + top_right)
    assert inst.polygons[0] == pytest.approx(rotated_corners(x, y, w, h, 345.1381651311527))
    assert inst.bbox == pytest.approx([min(inst.polygons[0][0::2]), min(inst.polygons[0][1::2]),
                                       max(inst.polygons[0][0::2]), max(inst.polygons[0][1::2])])
    assert res.report.total == 0
    round_trip(res, tmp_path, tmp_path)


def test_rotation_is_written_back_as_label_studio_rotation(tmp_path):
    res = read_source("labelstudio", tmp_path, obb_export(tmp_path, "data_obb.json"), "ls")
    out = write_format("labelstudio", res.samples, res.categories, tmp_path / "out", project_root=Path("."))
    source = json.loads((REAL / "labelstudio-obb/data_obb.json").read_text())
    written = json.loads(out.read_text())
    for src, dst in zip(source, written):
        a = [r["value"] for r in src["annotations"][0]["result"]]
        b = [r["value"] for r in dst["annotations"][0]["result"]]
        for u, v in zip(a, b):
            assert [v[k] for k in ("x", "y", "width", "height", "rotation")] == \
                pytest.approx([u[k] for k in ("x", "y", "width", "height", "rotation")], abs=1e-6)


def test_oriented_boxes_through_coco_and_cvat_keep_their_corners(tmp_path):
    res = read_source("labelstudio", tmp_path, obb_export(tmp_path, "data_obb.json"), "ls")
    for fmt in ("cvat", "coco"):
        out = write_format(fmt, res.samples, res.categories, tmp_path / fmt, project_root=Path("."))
        again = read_source(fmt, tmp_path / fmt, out, "ls")
        corners = [i.polygons[0] for s in again.samples for i in s.instances]
        assert len(corners) == 25
        assert np.allclose(corners, [i.polygons[0] for s in res.samples for i in s.instances], atol=1e-3), fmt


# --- boxes, polygons and unlinked keypoints in one task (test_export_coco/data.json) -------------

@pytest.mark.parametrize("name", ["data.json", "data.min.json"])
def test_mixed_task_with_unlinked_keypoints(tmp_path, name):
    # 1 task, image test_image1.jpg 500 x 320, an annotation with no completed_by at all;
    # results: 1 rectanglelabels "rectangle_label", 1 polygonlabels "polygon_label" (3 points),
    # 2 keypointlabels (keypoint_label1, keypoint_label2) without parentID.
    stand_in(tmp_path / "test_image1.jpg", 500, 320)
    res = read_source("labelstudio", tmp_path, REAL / "labelstudio-mixed" / name, "ls")
    assert [c.name for c in res.categories] == ["polygon_label", "rectangle_label"]
    (s,) = res.samples
    rect, poly = s.instances
    assert rect.bbox == pytest.approx([31.941923774954628 * 5, 4.113475177304964 * 3.2,
                                       (31.941923774954628 + 6.352087114337568) * 5,
                                       (4.113475177304964 + 9.929078014184398) * 3.2])
    assert poly.polygons == [pytest.approx([41.74228675136116 * 5, 3.546099290780142 * 3.2,
                                            41.560798548094375 * 5, 12.198581560283687 * 3.2,
                                            45.37205081669691 * 5, 12.4822695035461 * 3.2])]
    assert [(p["label"], pytest.approx([p["x"], p["y"]])) for p in s.attributes["points"]] == [
        ("keypoint_label1", [22.595281306715066 * 5, 31.773049645390074 * 3.2]),
        ("keypoint_label2", [17.78584392014519 * 5, 28.510638297872344 * 3.2])]
    assert res.report.counts == {"keypoint_unlinked": 2}
    round_trip(res, tmp_path, tmp_path)


# --- JSON-MIN of a polygon export (test_export_json_min/data.json) ------------------------------

def test_json_min_and_json_of_the_same_task_read_alike(tmp_path):
    # 1 task, /data/upload/29/example.png, 128 x 128, one polygon "Airplane" of 3 points.
    stand_in(tmp_path / "example.png", 128, 128)
    full = read_source("labelstudio", tmp_path, REAL / "labelstudio-polygon/data.json", "ls")
    mini = read_source("labelstudio", tmp_path, REAL / "labelstudio-polygon/data.min.json", "ls")
    assert content(full) == content(mini)
    (inst,) = full.samples[0].instances
    assert inst.polygons == [pytest.approx([v * 1.28 for v in (44.44444444444444, 48.25396825396825,
                                                                 42.53968253968254, 60.317460317460316,
                                                                 56.19047619047619, 50.79365079365079)])]
    assert full.report.total == 0 and mini.report.total == 0


def test_pre_1_0_export_with_completions(tmp_path):
    # Label Studio before 1.0 wrote "completions" where it now writes "annotations" (the SDK's
    # converter still reads both); the real file with that one key renamed.
    stand_in(tmp_path / "example.png", 128, 128)
    doc = json.loads((REAL / "labelstudio-polygon/data.json").read_text())
    doc[0]["completions"] = doc[0].pop("annotations")
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = read_source("labelstudio", tmp_path, tmp_path / "old.json", "ls")
    assert content(old) == content(read_source("labelstudio", tmp_path, REAL / "labelstudio-polygon/data.json", "ls"))


def test_real_export_with_the_wrong_images_folder_fails_in_one_line(tmp_path):
    make_project(tmp_path)
    ann = REAL / "labelstudio-keypoints/data_keypoints.json"
    out = subprocess.run([sys.executable, "-m", "visionflow.cli", "ingest", "--format", "labelstudio", "--images",
                          str(tmp_path), "--annotations", str(ann), "--out", "ing"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"none of the images of its 1 tasks was found under {tmp_path}" in out.stderr
    assert str(tmp_path / "image1.jpg") in out.stderr


# --- masks whose names do not match the images; a labelme folder given as VOC -------------------

def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionflow.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_masks_named_unlike_the_images_fail_naming_both_folders(tmp_path):
    # The real photos of the CVAT VOC export, with masks named "<stem>_mask.png" (a common
    # convention, e.g. Kaggle's Carvana): no mask has an image's name, so nothing would be labelled.
    make_project(tmp_path)
    images = tmp_path / "photos"
    shutil.copytree(REAL / "cvat-voc-1.1-2label/JPEGImages", images)
    masks = tmp_path / "masks"
    masks.mkdir()
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    for image in images.iterdir():
        with Image.open(image) as im:
            Image.new("L", im.size, 1).save(masks / f"{image.stem}_mask.png")
    with pytest.raises(DataError) as err:
        read_source("masks", images, masks, "m")
    text = str(err.value)
    assert text.startswith(str(masks)) and str(images) in text and "'birds.jpg' needs the mask 'birds.png'" in text
    assert "masks are named like 'birds_mask.png'" in text and "name each mask as its image" in text
    out = cli("ingest", "--format", "masks", "--images", str(images), "--annotations", str(masks), "--out", "ing",
              cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr and "needs the mask 'birds.png'" in out.stderr
    # Named right, the same files read: 4 images, one class-1 region each.
    for mask in masks.iterdir():
        mask.rename(masks / mask.name.replace("_mask", ""))
    res = read_source("masks", images, masks, "m")
    assert len(res.samples) == 4 and all(len(s.instances) == 1 for s in res.samples)


@pytest.mark.parametrize("what, message", [("no images", r"no images \(\.bmp"), ("no masks", "no mask PNGs found")])
def test_masks_with_an_empty_folder_fail(tmp_path, what, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.txt").write_text("background\n")
    if what == "no masks":
        stand_in(tmp_path / "images/a.png", 8, 8)
    else:
        Image.new("L", (8, 8), 0).save(tmp_path / "masks/a.png")
    with pytest.raises(DataError, match=message):
        read_source("masks", tmp_path / "images", tmp_path / "masks", "m")


def test_labelme_folder_read_as_voc_says_it_is_labelme(tmp_path):
    # A minimal labelme-style annotation written here by hand (labelme is GPL: nothing copied):
    # one JSON per image with "shapes" and "imagePath", next to the image, no XML.
    make_project(tmp_path)
    folder = tmp_path / "labelme"
    stand_in(folder / "a.jpg", 32, 24)
    (folder / "a.json").write_text(json.dumps({
        "version": "5.0.1", "flags": {}, "imagePath": "a.jpg", "imageData": None, "imageHeight": 24, "imageWidth": 32,
        "shapes": [{"label": "cat", "points": [[2, 2], [20, 15]], "group_id": None, "shape_type": "rectangle",
                    "flags": {}}]}))
    with pytest.raises(DataError, match="looks like labelme JSON, not Pascal VOC") as err:
        read_source("voc", folder, folder, "v")
    assert str(err.value).startswith(str(folder)) and "a.json" in str(err.value)
    out = cli("ingest", "--format", "voc", "--images", str(folder), "--annotations", str(folder), "--out", "ing",
              cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr and "looks like labelme JSON" in out.stderr


def test_a_target_without_rotation_counts_each_oriented_box_it_straightens(tmp_path):
    """VOC holds axis-aligned boxes only: the 25 real rotated rectangles are each counted, with the
    policy saying where the corners went; CVAT and YOLO-OBB, which hold rotation, count none."""
    res = read_source("labelstudio", tmp_path, obb_export(tmp_path, "data_obb.json"), "ls")
    report = ConversionReport()
    write_format("voc", res.samples, res.categories, tmp_path / "voc", project_root=Path("."), report=report)
    assert report.counts["obb_as_axis_aligned"] == 25 and "axis-aligned" in report.policies["obb_as_axis_aligned"]
    for fmt in ("cvat", "yolo"):
        other = ConversionReport()
        write_format(fmt, res.samples, res.categories, tmp_path / fmt, project_root=Path("."), report=other)
        assert "obb_as_axis_aligned" not in other.counts, (fmt, other.counts)

"""Label Studio JSON export reader/writer on tiny datasets generated in tmp_path."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import visionflow.formats.labelstudio as ls_module
from visionflow.core.errors import DataError
from visionflow.formats import ConversionReport
from visionflow.formats.labelstudio import (POLICIES, WRITE_POLICIES, decode_brush_rle, encode_brush_rle,
                                            read_labelstudio, write_labelstudio)
from visionflow.manifest import Instance

W, H = 64, 48  # not square, so a swapped width/height shows


def make_image(path: Path, size=(W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 120, 30)).save(path)
    return path


def brush_mask() -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[5:20, 30:50] = 1
    mask[22:25, 3:7] = 1
    return mask


def result(rtype: str, value: dict, rid: str, size=(W, H)) -> dict:
    """One result item as Label Studio 1.x writes it."""
    return {"original_width": size[0], "original_height": size[1], "image_rotation": 0, "value": value,
            "id": rid, "from_name": "label", "to_name": "image", "type": rtype, "origin": "manual"}


def annotation(aid: int, results: list, cancelled: bool = False) -> dict:
    return {"id": aid, "completed_by": 1, "result": results, "was_cancelled": cancelled, "ground_truth": False,
            "created_at": "2024-05-01T10:00:00.000000Z", "updated_at": "2024-05-01T10:00:00.000000Z",
            "draft_created_at": None, "lead_time": 12.5, "prediction": {}, "result_count": 0,
            "unique_id": "2c9a-e1", "import_id": None, "last_action": None, "task": aid, "project": 1,
            "updated_by": 1, "parent_prediction": None, "parent_annotation": None, "last_created_by": None}


def task(tid: int, image: str, anns: list, predictions: list | None = None) -> dict:
    return {"id": tid, "annotations": anns, "file_upload": image.rsplit("/", 1)[-1], "drafts": [],
            "predictions": predictions or [], "data": {"image": image}, "meta": {},
            "created_at": "2024-05-01T09:00:00.000000Z", "updated_at": "2024-05-01T10:00:00.000000Z",
            "inner_id": tid, "total_annotations": len(anns), "cancelled_annotations": 0,
            "total_predictions": 0, "comment_count": 0, "unresolved_comment_count": 0,
            "last_comment_updated_at": None, "project": 1, "updated_by": 1, "comment_authors": []}


def export() -> list[dict]:
    """A project export: uploads (one stored with Label Studio's hash prefix, one without), a
    local-files image in a subfolder with a space, all region types, an unannotated task,
    a cancelled + a second annotation, a prediction and a keypoint."""
    rect = result("rectanglelabels", {"x": 10.0, "y": 12.5, "width": 25.0, "height": 50.0, "rotation": 0,
                                      "rectanglelabels": ["cat"]}, "r1")
    poly = result("polygonlabels", {"points": [[50.0, 10.0], [90.0, 10.0], [70.0, 80.0]], "closed": True,
                                    "polygonlabels": ["dog"]}, "p1")
    brush = result("brushlabels", {"format": "rle", "rle": encode_brush_rle(brush_mask()),
                                   "brushlabels": ["bird"]}, "b1")
    choice = result("choices", {"choices": ["outdoor"]}, "c1")
    choice["from_name"] = "scene"
    keypoint = result("keypointlabels", {"x": 5.0, "y": 5.0, "width": 0.5, "keypointlabels": ["dog"]}, "k1")
    pred = {"id": 9, "model_version": "v1", "score": 0.5, "result": [dict(rect, id="pr1")]}
    return [
        task(1, "/data/upload/1/ab12cd34-img.jpg", [annotation(11, [rect, poly, choice])], [pred]),
        task(2, "/data/upload/1/0f0f0f0f-raw.png", [annotation(21, [brush, keypoint])]),
        task(3, "/data/local-files/?d=site%20a/c%2B1.png",
             [annotation(31, [], cancelled=True), annotation(32, [dict(rect, id="r3")]),
              annotation(33, [dict(poly, id="p3")])]),
        task(4, "d.png", []),
    ]


def write_export(root: Path, tasks: list[dict] | None = None) -> tuple[Path, Path]:
    """Images the way a user has them: the original upload name for task 1, the upload folder's
    prefixed name for task 2, local files under a subfolder."""
    for name in ["img.jpg", "0f0f0f0f-raw.png", "site a/c+1.png", "d.png"]:
        make_image(root / "images" / name)
    ann = root / "export" / "project-1-at-2024-05-01-10-00-8f1c2a3b.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(export() if tasks is None else tasks, indent=2))
    return root / "images", ann


def by_path(res) -> dict:
    return {s.path: s for s in res.samples}


def decode(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})


# --- reading a real-looking export ---------------------------------------------------------

def test_read_maps_export_to_canonical(tmp_path):
    images, ann = write_export(tmp_path)
    res = read_labelstudio(images, ann, "ls")
    assert [(c.id, c.name, c.source_ids) for c in res.categories] == [
        (1, "bird", {"ls": 1}), (2, "cat", {"ls": 2}), (3, "dog", {"ls": 3}), (4, "outdoor", {"ls": 4})]
    s = by_path(res)
    assert list(s) == ["img.jpg", "0f0f0f0f-raw.png", "site a/c+1.png", "d.png"]  # prefix stripped only when needed
    a = s["img.jpg"]
    assert a.id == "ls/img.jpg" and a.root == images.as_posix() and (a.width, a.height) == (W, H)
    assert a.labels == [4] and a.group == a.id
    rect, poly = a.instances
    assert rect.bbox == pytest.approx([6.4, 6.0, 22.4, 30.0], rel=1e-9) and rect.category_id == 2
    assert poly.polygons == [pytest.approx([32.0, 4.8, 57.6, 4.8, 44.8, 38.4])]
    assert poly.bbox == pytest.approx([32.0, 4.8, 57.6, 38.4]) and poly.category_id == 3
    brush = s["0f0f0f0f-raw.png"].instances[0]
    assert (decode(brush.rle) == brush_mask()).all() and brush.rle["size"] == [H, W]
    assert brush.bbox == [3.0, 5.0, 50.0, 25.0] and brush.area == brush_mask().sum() and brush.category_id == 1
    assert s["site a/c+1.png"].instances[0].bbox == pytest.approx(rect.bbox)  # the 2nd (first uncancelled) annotation
    assert s["d.png"].instances == [] and s["d.png"].labels == []
    # The keypoint has no parentID: kept as an unlinked point of its image, in pixels.
    assert s["0f0f0f0f-raw.png"].attributes == {"points": [{"label": "dog", "x": pytest.approx(3.2),
                                                            "y": pytest.approx(2.4)}]}
    assert res.report.counts == {"predictions_ignored": 1, "keypoint_unlinked": 1, "annotation_cancelled": 1,
                                 "extra_annotations_ignored": 1, "task_unannotated": 1}
    assert "task id 2" in res.report.examples["keypoint_unlinked"][0]
    assert "annotation id 33" in res.report.examples["extra_annotations_ignored"][0]


def test_upload_name_as_stored_is_preferred(tmp_path):
    images, ann = write_export(tmp_path)
    make_image(images / "ab12cd34-img.jpg")  # the raw upload folder has the prefixed name
    assert "ab12cd34-img.jpg" in by_path(read_labelstudio(images, ann, "ls"))


def test_rotated_rectangle_becomes_an_oriented_box(tmp_path):
    make_image(tmp_path / "a.png", (100, 100))
    r = result("rectanglelabels", {"x": 10, "y": 10, "width": 20, "height": 10, "rotation": 90,
                                   "rectanglelabels": ["cat"]}, "r9", (100, 100))
    ann = tmp_path / "export.json"
    ann.write_text(json.dumps([task(5, "a.png", [annotation(1, [r])])]))
    res = read_labelstudio(tmp_path, ann, "ls")
    # Clockwise (y down) about the top-left corner (10, 10): the box swings down-left.
    inst = res.samples[0].instances[0]
    assert inst.bbox == pytest.approx([0, 10, 10, 30], abs=1e-9) and inst.attributes == {"obb": True}
    assert inst.polygons == [pytest.approx([10, 10, 10, 30, 0, 30, 0, 10], abs=1e-9)]
    assert res.report.total == 0
    out = write_labelstudio(res.samples, res.categories, tmp_path / "out", tmp_path, copy_images=False)
    value = json.loads(out.read_text())[0]["annotations"][0]["result"][0]["value"]
    assert value["rectanglelabels"] == ["cat"]  # written back as Label Studio's own rotation:
    assert [value[k] for k in ("x", "y", "width", "height", "rotation")] == pytest.approx([10, 10, 20, 10, 90])
    again = read_labelstudio(tmp_path, out, "ls").samples[0].instances[0]
    assert again.polygons == [pytest.approx(inst.polygons[0])] and again.attributes == {"obb": True}


# --- brush RLE -----------------------------------------------------------------------------

def test_brush_rle_round_trip_and_literal_blocks():
    rng = np.random.default_rng(0)
    for mask in [rng.random((H, W)) > 0.6, np.ones((300, 300), bool), np.zeros((3, 5), bool)]:
        flat = decode_brush_rle(encode_brush_rle(mask))
        assert (flat.reshape(*mask.shape, 4)[:, :, 3] == mask * 255).all()
    # Label Studio's own encoder also writes literal blocks (flag 0): 4 words 1, 2, 3, 4.
    bits = f"{4:032b}{7:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    bits += "0" + "00" + f"{3:03b}" + "".join(f"{v:08b}" for v in (1, 2, 3, 4))
    bits += "0" * (-len(bits) % 8)
    data = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    assert decode_brush_rle(data).tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="ends early"):
        decode_brush_rle(data[:8])


# --- round trip ------------------------------------------------------------------------------

def test_round_trip_read_write_read(tmp_path):
    images, ann = write_export(tmp_path / "in")
    first = read_labelstudio(images, ann, "ls")
    first.samples[3].group = "session-7"  # kept in data.group
    report = ConversionReport()
    out = write_labelstudio(first.samples, first.categories, tmp_path / "out", project_root=tmp_path, report=report)
    assert report.total == 0
    tasks = json.loads(out.read_text())
    assert [t["data"]["image"] for t in tasks] == [
        "/data/local-files/?d=img.jpg", "/data/local-files/?d=0f0f0f0f-raw.png",
        "/data/local-files/?d=site%20a/c%2B1.png", "/data/local-files/?d=d.png"]
    rect = tasks[0]["annotations"][0]["result"][1]
    assert rect["value"]["x"] == pytest.approx(10.0) and rect["value"]["height"] == pytest.approx(50.0)
    assert rect["original_width"] == W and rect["id"] == "1-2" and rect["type"] == "rectanglelabels"
    assert (tmp_path / "out/label_config.xml").read_text().count('<Label value="cat"/>') == 3

    second = read_labelstudio(tmp_path / "out", out, "ls")
    assert second.report.counts == {"keypoint_unlinked": 1}  # the export's one unlinked keypoint, again
    assert [c.name for c in second.categories] == [c.name for c in first.categories]
    assert [s.id for s in second.samples] == [s.id for s in first.samples]
    for a, b in zip(first.samples, second.samples):
        assert (a.path, a.width, a.height, a.sha256, a.labels, a.group, a.attributes) == \
            (b.path, b.width, b.height, b.sha256, b.labels, b.group, b.attributes)
        assert len(a.instances) == len(b.instances)
        for i, j in zip(a.instances, b.instances):
            assert i.bbox == pytest.approx(j.bbox, rel=1e-6)
            assert i.category_id == j.category_id and i.area == j.area
            assert len(i.polygons) == len(j.polygons)
            for p, q in zip(i.polygons, j.polygons):
                assert p == pytest.approx(q, rel=1e-6)
            assert (i.rle is None) == (j.rle is None)
            if i.rle is not None:
                assert (decode(i.rle) == decode(j.rle)).all()
    # Stable output: the same samples give the same bytes.
    again = write_labelstudio(second.samples, second.categories, tmp_path / "out2", copy_images=False,
                              project_root=tmp_path)
    assert json.loads(again.read_text()) == tasks


def test_writer_counts_what_label_studio_cannot_hold(tmp_path):
    images, ann = write_export(tmp_path / "in")
    res = read_labelstudio(images, ann, "ls")
    a = res.samples[0]
    a.attributes = {"license": 2}
    a.instances[0].iscrowd = True
    a.instances[0].attributes = {"score": 0.9}
    a.instances[0].area = 10.0  # a rectangle has no area in Label Studio
    a.instances[1].polygons.append([0, 0, 5, 0, 5, 5])  # second ring: two regions, box grows
    uncompressed = Instance(bbox=[0, 0, 4, 2], category_id=1, rle={"size": [H, W], "counts": [0, 2, 46, 2, 3022]},
                            polygons=[[0, 0, 1, 0, 1, 1]], area=5.0)
    a.instances.append(uncompressed)
    report = ConversionReport()
    out = write_labelstudio(res.samples, res.categories, tmp_path / "out", tmp_path, copy_images=False, report=report)
    assert report.counts == {"attributes_dropped": 2, "crowd_dropped": 1, "area_dropped": 2, "polygon_split": 1,
                             "box_not_kept": 2, "polygons_dropped": 1}
    assert all("sample ls/img.jpg" in e for ex in report.examples.values() for e in ex)
    assert set(report.policies) >= set(WRITE_POLICIES)
    regions = json.loads(out.read_text())[0]["annotations"][0]["result"]
    assert [r["type"] for r in regions] == ["choices", "rectanglelabels", "polygonlabels", "polygonlabels",
                                            "brushlabels"]
    mask = decode_brush_rle(regions[-1]["value"]["rle"]).reshape(H, W, 4)[:, :, 3] > 0
    assert mask.sum() == 4 and mask[:2, :2].all()  # uncompressed COCO counts are column-major
    twin = copy.deepcopy(res.samples[1])
    twin.id = "other/" + twin.path
    with pytest.raises(ValueError, match="share the path"):
        write_labelstudio([res.samples[1], twin], res.categories, tmp_path / "dup", copy_images=False)


def test_policy_tables_document_every_kind():
    for kind in POLICIES:
        assert kind in ls_module.__doc__, kind


# --- structural errors: DataError naming the file and the task ------------------------------

def _write(tmp_path: Path, tasks) -> tuple[Path, Path]:
    return write_export(tmp_path, tasks)


@pytest.mark.parametrize("mutate, record, message", [
    (lambda t: t.append(copy.deepcopy(t[0])), "task id 1", "duplicate task id"),
    (lambda t: t[3]["data"].update(image="https://example.com/d.png"), "task id 4", "download the images"),
    (lambda t: t[3]["data"].update(image="s3://bucket/d.png"), "task id 4", "download the images"),
    (lambda t: t[3]["data"].update(image="/data/local-files/?d=../d.png"), "task id 4", "unsafe image path"),
    (lambda t: t[3]["data"].update(image="/etc/passwd"), "task id 4", "absolute"),
    (lambda t: t[3]["data"].update(image="img.jpg"), "task id 4", "also used by task id 1"),
    (lambda t: t[3].update(data={}), "task id 4", "no image"),
    (lambda t: t[3].pop("id"), "task #3", "needs an `id`"),
    (lambda t: t[0]["annotations"][0]["result"][0]["value"].update(x="10"), "task id 1 result id r1", "numeric"),
    (lambda t: t[0]["annotations"][0]["result"][1]["value"].update(points=[[1, 2, 3]]), "result id p1", "points"),
    (lambda t: t[0]["annotations"][0]["result"][2].update(value={"choices": "x"}), "result id c1", "choices"),
])
def test_structural_errors_name_file_and_task(tmp_path, mutate, record, message):
    tasks = export()
    mutate(tasks)
    images, ann = _write(tmp_path, tasks)
    with pytest.raises(DataError, match=message) as err:
        read_labelstudio(images, ann, "ls")
    assert str(ann) in str(err.value) and record in str(err.value)


def test_invalid_json_names_line_and_column(tmp_path):
    ann = tmp_path / "export.json"
    ann.write_text('[\n  {"id": 1,\n   "data": {"image": "a.png"},, }\n]')
    with pytest.raises(DataError, match=r"line 3, column 31") as err:
        read_labelstudio(tmp_path, ann, "ls")
    assert str(ann) in str(err.value)


def test_json_min_export_is_refused(tmp_path):
    ann = tmp_path / "export.json"
    ann.write_text(json.dumps({"image": "a.png", "label": []}))
    with pytest.raises(DataError, match="expected a list of tasks"):
        read_labelstudio(tmp_path, ann, "ls")


# --- counted problems ------------------------------------------------------------------------

def _single(tmp_path: Path, results: list, anns: list | None = None):
    """One task on a 64x48 image with the given results; returns (result, annotation file)."""
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    # A second, labelled task: a read that loses everything is an error (see test_nothing_kept_is_an_error).
    kept = task(9, "b.png", [annotation(90, [result("choices", {"choices": ["kept"]}, "c9")])])
    ann = tmp_path / "export.json"
    ann.write_text(json.dumps([task(8, "a.png", [annotation(80, results)] if anns is None else anns), kept]))
    return read_labelstudio(tmp_path, ann, "ls"), ann


def _one_problem(res, ann: Path, kind: str, *needles: str) -> None:
    assert res.report.counts == {kind: 1}, res.report.counts
    example = res.report.examples[kind][0]
    for needle in (str(ann), "task id 8", *needles):
        assert needle in example, example


def rect(rid="r1", **value):
    return result("rectanglelabels", {"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 0,
                                      "rectanglelabels": ["cat"], **value}, rid)


def test_percent_outside_the_image_is_clipped(tmp_path):
    res, ann = _single(tmp_path, [rect(x=90, y=-10)])
    assert res.samples[0].instances[0].bbox == pytest.approx([57.6, 0.0, 64.0, 4.8])
    _one_problem(res, ann, "box_clipped", "result id r1")


@pytest.mark.parametrize("value, kind", [({"width": 0}, "box_degenerate"), ({"x": 120}, "box_outside")])
def test_unusable_rectangle_dropped(tmp_path, value, kind):
    res, ann = _single(tmp_path, [rect(**value)])
    assert res.samples[0].instances == []
    _one_problem(res, ann, kind, "result id r1")


def test_unknown_result_type_dropped(tmp_path):
    ellipse = result("ellipselabels", {"x": 5, "y": 5, "radiusX": 2, "radiusY": 3, "ellipselabels": ["cat"]}, "e1")
    res, ann = _single(tmp_path, [ellipse, rect()])
    assert len(res.samples[0].instances) == 1
    _one_problem(res, ann, "result_unsupported", "result id e1", "ellipselabels")


def test_only_cancelled_annotations_skip_the_task(tmp_path):
    res, ann = _single(tmp_path, [], anns=[annotation(80, [rect()], cancelled=True)])
    assert [s.path for s in res.samples] == ["b.png"] and [c.name for c in res.categories] == ["kept"]
    _one_problem(res, ann, "annotation_cancelled", "annotation id 80")


def test_nothing_kept_is_an_error(tmp_path):
    """An export that gives no labelled image fails in one line naming the file and why, never an empty read."""
    make_image(tmp_path / "a.png")
    ann = tmp_path / "export.json"
    cases = [
        ([], "holds no tasks"),
        ([task(8, "a.png", [annotation(80, [rect()], cancelled=True)])], "none of its 1 tasks has an annotation (1 cancelled)"),
        ([task(8, "a.png", [])], "none of its 1 tasks has an annotation"),
        ([task(8, "missing.png", [annotation(80, [rect()])])], f"none of the images of its 1 tasks was found under {tmp_path}"),
        ([task(8, "a.png", [annotation(80, [rect(width=0)])])], "all 1 results were lost: box_degenerate: 1"),
    ]
    for tasks, message in cases:
        ann.write_text(json.dumps(tasks))
        with pytest.raises(DataError) as err:
            read_labelstudio(tmp_path, ann, "ls")
        assert str(err.value).startswith(str(ann)) and message in str(err.value), str(err.value)
        assert "\n" not in str(err.value)


def test_declared_size_disagreeing_with_file_uses_file(tmp_path):
    r = rect()
    r.update(original_width=128, original_height=96)
    res, ann = _single(tmp_path, [r])
    assert res.samples[0].instances[0].bbox == pytest.approx([6.4, 4.8, 19.2, 14.4])  # percent of the real 64x48
    _one_problem(res, ann, "image_size_mismatch", "128x96")


def test_missing_image_skipped(tmp_path):
    images, ann = write_export(tmp_path)
    (images / "d.png").unlink()
    res = read_labelstudio(images, ann, "ls")
    assert "d.png" not in by_path(res)
    assert "task id 4" in res.report.examples["image_missing"][0]


@pytest.mark.parametrize("value, kind", [
    ({"format": "png", "rle": [1]}, "brush_unsupported"),
    ({"format": "rle", "rle": [0, 0, 0]}, "brush_invalid"),
    ({"format": "rle", "rle": encode_brush_rle(np.ones((4, 4), bool))}, "brush_invalid"),  # wrong size
])
def test_bad_brush_dropped(tmp_path, value, kind):
    res, ann = _single(tmp_path, [result("brushlabels", {**value, "brushlabels": ["cat"]}, "b1")])
    assert res.samples[0].instances == []
    _one_problem(res, ann, kind, "result id b1")


def test_region_label_problems(tmp_path):
    res, ann = _single(tmp_path, [rect("r1", rectanglelabels=[])])
    assert res.samples[0].instances == []
    _one_problem(res, ann, "region_unlabelled", "result id r1")
    res, ann = _single(tmp_path, [rect("r2", rectanglelabels=["dog", "cat"])])
    assert [c.name for c in res.categories] == ["dog", "kept"] and res.samples[0].instances[0].category_id == 1
    _one_problem(res, ann, "extra_labels_ignored", "result id r2")


def test_polygon_with_two_points_dropped(tmp_path):
    poly = result("polygonlabels", {"points": [[1, 1], [5, 5]], "polygonlabels": ["cat"]}, "p1")
    res, ann = _single(tmp_path, [poly])
    assert res.samples[0].instances == []
    _one_problem(res, ann, "polygon_invalid", "result id p1")


def test_rotated_image_flagged(tmp_path):
    r = rect()
    r["image_rotation"] = 90
    res, ann = _single(tmp_path, [r])
    assert len(res.samples[0].instances) == 1
    _one_problem(res, ann, "image_rotated", "result id r1")


def test_several_choices_round_trip_as_multi_label(tmp_path):
    """Multi-label images (the multilabel task's labels) go out as one `choices` result with
    several values, as a Choices control with choice="multiple" saves them, and come back."""
    images, ann = write_export(tmp_path / "in")
    res = read_labelstudio(images, ann, "ls")
    ids = [c.id for c in res.categories]
    res.samples[0].labels = ids[:2]
    out = write_labelstudio(res.samples, res.categories, tmp_path / "out", tmp_path, copy_images=False)
    choice = json.loads(out.read_text())[0]["annotations"][0]["result"][0]
    assert choice["type"] == "choices" and len(choice["value"]["choices"]) == 2
    assert 'choice="multiple"' in (out.parent / "label_config.xml").read_text()
    again = read_labelstudio(images, out, "ls")
    assert again.samples[0].labels == ids[:2]

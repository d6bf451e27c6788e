"""YOLO (Ultralytics layout) reader/writer on tiny datasets generated in tmp_path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

import visionflow.formats.yolo as yolo_module
from visionflow.core.errors import DataError
from visionflow.formats import ConversionReport
from visionflow.manifest.images import sha256_file
from visionflow.formats.yolo import READ_POLICIES, label_relpath, merge_rings, output_relpath, read_yolo, write_yolo
from visionflow.manifest import Category, Instance, Sample

W, H = 64, 48


def make_image(path: Path, size=(W, H)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 120, 200)).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def ultralytics_export(root: Path) -> Path:
    """The layout `ultralytics` datasets ship (coco8-seg style): data.yaml with a machine-specific
    `path`, split folders, names as a dict, boxes and polygons, a background image without a
    label file and one with an empty label file."""
    write(root / "data.yaml", "# Ultralytics YOLO, AGPL-3.0 license\n"
                              "path: ../datasets/tiny  # dataset root dir\n"
                              "train: images/train  # train images (relative to 'path')\n"
                              "val: images/val  # val images (relative to 'path')\n"
                              "test:  # test images (optional)\n\n"
                              "# Classes\nnames:\n  0: person\n  1: car\n")
    for name in ["a.jpg", "b.png", "bg.png"]:
        make_image(root / "images/train" / name)
    make_image(root / "images/val/c.jpg")
    make_image(root / "images/val/empty.png")
    write(root / "labels/train/a.txt", "0 0.5 0.5 0.25 0.5\n1 0.1 0.2 0.3 0.2 0.3 0.6\n")
    write(root / "labels/train/b.txt", "1 0.75 0.25 0.5 0.5\n")
    write(root / "labels/val/c.txt", "0 0.0625 0.125 0.125 0.25\n")
    write(root / "labels/val/empty.txt", "")
    return root / "data.yaml"


def by_path(result) -> dict:
    return {s.path: s for s in result.samples}


# --- reading -------------------------------------------------------------------------------

def test_reads_ultralytics_export(tmp_path):
    res = read_yolo(tmp_path, ultralytics_export(tmp_path), "src")
    assert [(c.id, c.name, c.source_ids) for c in res.categories] == [(0, "person", {"src": 0}),
                                                                       (1, "car", {"src": 1})]
    assert res.report.total == 0
    s = by_path(res)
    assert sorted(s) == ["images/train/a.jpg", "images/train/b.png", "images/train/bg.png",
                         "images/val/c.jpg", "images/val/empty.png"]
    a = s["images/train/a.jpg"]
    assert a.id == "src/images/train/a.jpg" and a.group == a.id and a.root == tmp_path.as_posix()
    assert (a.width, a.height, a.sha256) == (W, H, sha256_file(tmp_path / "images/train/a.jpg"))
    assert a.attributes == {"split": "train"} and s["images/val/c.jpg"].attributes == {"split": "val"}
    box, poly = a.instances
    assert box.category_id == 0 and box.bbox == pytest.approx([24.0, 12.0, 40.0, 36.0])  # cxcywh -> xyxy px
    assert box.polygons == [] and box.area is None
    assert poly.category_id == 1 and poly.polygons == [pytest.approx([6.4, 9.6, 19.2, 9.6, 19.2, 28.8])]
    assert poly.bbox == pytest.approx([6.4, 9.6, 19.2, 28.8])  # polygon bounds
    assert s["images/train/bg.png"].instances == [] and s["images/val/empty.png"].instances == []


def test_names_file_layout_with_split_folders(tmp_path):
    names = write(tmp_path / "classes.txt", "person\ncar\n\n")
    make_image(tmp_path / "images/train/a.png")
    make_image(tmp_path / "images/valid/b.png")  # Roboflow spells it "valid"
    make_image(tmp_path / "images/c.png")
    write(tmp_path / "labels/train/a.txt", "1 0.5 0.5 0.5 0.5\n")
    res = read_yolo(tmp_path, names, "n", root="data/n")
    assert [c.name for c in res.categories] == ["person", "car"] and res.report.total == 0
    s = by_path(res)
    assert s["images/train/a.png"].attributes == {"split": "train"}
    assert s["images/valid/b.png"].attributes == {"split": "val"} and s["images/c.png"].attributes == {}
    assert s["images/train/a.png"].instances[0].category_id == 1 and {x.root for x in res.samples} == {"data/n"}


def test_darknet_layout_labels_next_to_images(tmp_path):
    # CVAT "YOLO 1.1": obj.names, train.txt, obj_train_data/<image> + <image>.txt
    names = write(tmp_path / "obj.names", "cat\n")
    make_image(tmp_path / "obj_train_data/x.png")
    write(tmp_path / "obj_train_data/x.txt", "0 0.5 0.5 0.5 0.5\n")
    write(tmp_path / "train.txt", "data/obj_train_data/x.png\n")
    res = read_yolo(tmp_path, names, "d")
    assert res.report.total == 0 and len(res.samples) == 1 and len(res.samples[0].instances) == 1


def test_roboflow_layout_and_list_files(tmp_path):
    make_image(tmp_path / "train/images/a.png")
    make_image(tmp_path / "valid/images/b.png")
    write(tmp_path / "train/labels/a.txt", "0 0.5 0.5 0.5 0.5\n")
    write(tmp_path / "valid/labels/b.txt", "0 0.5 0.5 0.25 0.25\n")
    write(tmp_path / "test.txt", "./valid/images/b.png\n\n")
    ann = write(tmp_path / "data.yaml", "train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['ball']\n"
                                        "roboflow:\n  workspace: w\n")
    res = read_yolo(tmp_path, ann, "r")
    assert {s.path: s.attributes["split"] for s in res.samples} == {"train/images/a.png": "train",
                                                                   "valid/images/b.png": "val"}
    assert by_path(res)["valid/images/b.png"].instances[0].bbox == pytest.approx([24, 18, 40, 30])
    ann.write_text("train: ../train/images\nval: test.txt\nnames: ['ball']\n")
    res = read_yolo(tmp_path, ann, "r")
    assert by_path(res)["valid/images/b.png"].attributes == {"split": "val"} and res.report.total == 0


def test_same_entry_for_train_and_val_means_no_split(tmp_path):
    make_image(tmp_path / "images/a.png")
    write(tmp_path / "labels/a.txt", "0 0.5 0.5 0.5 0.5\n")
    ann = write(tmp_path / "data.yaml", "train: images\nval: images\nnames: [x]\n")
    res = read_yolo(tmp_path, ann, "s")
    assert len(res.samples) == 1 and res.samples[0].attributes == {} and res.report.total == 0


def test_label_and_output_paths():
    assert label_relpath("images/train/a.b.jpg") == "labels/train/a.b.txt"
    assert label_relpath("images/x/images/a.png") == "images/x/labels/a.txt"  # the last "/images/"
    assert label_relpath("obj/a.png") == "obj/a.txt"
    assert output_relpath("images/train/a.png", "train") == "images/train/a.png"
    assert output_relpath("train/images/sub/a.png", "train") == "images/train/sub/a.png"
    assert output_relpath("valid/images/a.png", "val") == "images/val/a.png"
    assert output_relpath("sub/a.png", None) == "images/sub/a.png"


# --- round trip ----------------------------------------------------------------------------

def assert_same(left, right):
    assert [s.id for s in left] == [s.id for s in right]
    for a, b in zip(left, right):
        assert (a.path, a.width, a.height, a.sha256, a.labels, a.group, a.attributes) == \
               (b.path, b.width, b.height, b.sha256, b.labels, b.group, b.attributes)
        assert len(a.instances) == len(b.instances)
        for i, j in zip(a.instances, b.instances):
            assert (i.category_id, i.iscrowd, i.rle, len(i.polygons)) == \
                   (j.category_id, j.iscrowd, j.rle, len(j.polygons))
            assert i.bbox == pytest.approx(j.bbox, rel=1e-6)
            for p, q in zip(i.polygons, j.polygons):
                assert p == pytest.approx(q, rel=1e-6)


def test_round_trip_read_write_read(tmp_path):
    first = read_yolo(tmp_path / "in", ultralytics_export(tmp_path / "in"), "src")
    report = ConversionReport()
    out = write_yolo(first.samples, first.categories, tmp_path / "out", project_root=tmp_path, report=report)
    assert report.total == 0  # nothing YOLO cannot hold
    doc = yaml.safe_load(out.read_text())
    assert doc == {"train": "images/train", "val": "images/val", "nc": 2, "names": {0: "person", 1: "car"},
                   "source_category_ids": {0: 0, 1: 1}}
    assert (tmp_path / "out/labels/train/bg.txt").read_text() == ""  # background: an empty label file
    second = read_yolo(tmp_path / "out", out, "src")
    assert [(c.id, c.name) for c in second.categories] == [(c.id, c.name) for c in first.categories]
    assert second.report.total == 0
    assert_same(first.samples, second.samples)


def test_manifest_samples_round_trip_with_odd_floats(tmp_path):
    make_image(tmp_path / "src/p.png")
    inst = [Instance(bbox=[1.123456789, 2.987654321, 33.3333333, 47.0001], category_id=7),
            Instance(bbox=[0.5, 0.25, 63.75, 47.5], category_id=3,
                     polygons=[[0.5, 0.25, 63.75, 0.25, 63.75, 47.5, 10.1, 40.7]])]
    sample = Sample(id="m/p.png", root="src", path="p.png", width=W, height=H,
                    sha256=sha256_file(tmp_path / "src/p.png"), instances=inst, group="m/p.png")
    cats = [Category(id=3, name="a"), Category(id=7, name="b")]
    out = write_yolo([sample], cats, tmp_path / "out", project_root=tmp_path)
    assert yaml.safe_load(out.read_text())["source_category_ids"] == {0: 3, 1: 7}
    back = read_yolo(tmp_path / "out", out, "m").samples[0]
    assert back.path == "images/p.png" and back.attributes == {}
    assert [i.category_id for i in back.instances] == [1, 0]  # contiguous ids in `categories` order
    for i, j in zip(inst, back.instances):
        assert j.bbox == pytest.approx(i.bbox, rel=1e-6)
        assert j.polygons == ([pytest.approx(i.polygons[0], rel=1e-6)] if i.polygons else [])


# --- writer losses -------------------------------------------------------------------------

def square_rle(h=H, w=W) -> dict:
    m = np.zeros((h, w), dtype=np.uint8, order="F")
    m[10:20, 5:25] = 1
    rle = mask_utils.encode(m)
    return {"size": [h, w], "counts": rle["counts"].decode()}


def test_writer_counts_what_yolo_cannot_hold(tmp_path):
    make_image(tmp_path / "a.png")
    ring1, ring2 = [1, 1, 10, 1, 10, 10], [20, 20, 30, 20, 30, 30]
    inst = [Instance(bbox=[0, 0, 10, 10], category_id=0, iscrowd=True, rle=square_rle()),
            Instance(bbox=[5, 10, 25, 20], category_id=0, rle=square_rle(), area=200.0),
            Instance(bbox=[1, 1, 30, 30], category_id=0, polygons=[ring1, ring2], attributes={"score": 0.5}),
            Instance(bbox=[0, 0, 12, 12], category_id=0, polygons=[ring1])]
    s = Sample(id="s/a.png", root=".", path="a.png", width=W, height=H, sha256=sha256_file(tmp_path / "a.png"),
               labels=[0], instances=inst, group="session-1", attributes={"license": 2})
    report = ConversionReport()
    out = write_yolo([s], [Category(id=0, name="obj")], tmp_path / "out", project_root=tmp_path, report=report)
    assert report.counts == {"crowd_dropped": 1, "rle_to_polygon": 1, "area_dropped": 1, "multi_polygon_merged": 1,
                             "instance_attributes_dropped": 1, "box_not_polygon_bounds": 2,
                             "image_labels_dropped": 1, "group_dropped": 1, "sample_attributes_dropped": 1}
    assert all("s/a.png" in e for ex in report.examples.values() for e in ex)
    rows = (tmp_path / "out/labels/a.txt").read_text().splitlines()
    assert len(rows) == 3  # the crowd region is not written
    back = read_yolo(tmp_path / "out", out, "s").samples[0]
    assert back.instances[0].bbox == pytest.approx([5, 10, 24, 19])  # contour of pixels 5..24 x 10..19
    assert back.instances[1].polygons[0] == pytest.approx(merge_rings([ring1, ring2]))
    assert back.instances[1].bbox == pytest.approx([1, 1, 30, 30])


def test_uncompressed_rle_converted_and_empty_or_redundant_rle_counted(tmp_path):
    make_image(tmp_path / "a.png")
    flat = mask_utils.decode(square_rle()).flatten(order="F")  # COCO counts: column-major runs from 0s
    counts = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()
    assert flat[0] == 0 and sum(counts) == H * W
    empty = {"size": [H, W], "counts": [H * W]}
    inst = [Instance(bbox=[5, 10, 25, 20], category_id=0, rle={"size": [H, W], "counts": counts}),
            Instance(bbox=[1, 1, 9, 9], category_id=0, rle=empty),
            Instance(bbox=[1, 1, 10, 10], category_id=0, rle=empty, polygons=[[1, 1, 10, 1, 10, 10]])]
    s = Sample(id="s/a.png", root=".", path="a.png", width=W, height=H, sha256=sha256_file(tmp_path / "a.png"),
               instances=inst, group="s/a.png")
    report = ConversionReport()
    out = write_yolo([s], [Category(0, "x")], tmp_path / "out", project_root=tmp_path, report=report)
    assert report.counts == {"rle_to_polygon": 1, "rle_dropped": 2, "box_not_polygon_bounds": 1}
    assert "also has polygons" in " ".join(report.examples["rle_dropped"])
    back = read_yolo(tmp_path / "out", out, "s").samples[0]
    assert back.instances[0].bbox == pytest.approx([5, 10, 24, 19])
    assert back.instances[1].bbox == pytest.approx([1, 1, 9, 9]) and back.instances[1].polygons == []
    assert back.instances[2].polygons == [pytest.approx([1, 1, 10, 1, 10, 10])]


def test_merged_rings_fill_each_part():
    from PIL import ImageDraw
    rings = [[2, 2, 10, 2, 10, 10, 2, 10], [20, 20, 30, 20, 30, 30, 20, 30]]
    merged, separate = Image.new("L", (40, 40)), Image.new("L", (40, 40))
    ImageDraw.Draw(merged).polygon(merge_rings(rings), fill=1)
    for r in rings:
        ImageDraw.Draw(separate).polygon(r, fill=1)
    diff = np.asarray(merged, dtype=int) - np.asarray(separate, dtype=int)
    assert (diff >= 0).all() and diff.sum() <= 30  # every part filled; only the 1-px bridge is extra


def test_unsplit_sample_among_split_ones_goes_to_train(tmp_path):
    samples = []
    for name, split in [("a.png", "val"), ("b.png", None)]:
        make_image(tmp_path / name)
        samples.append(Sample(id=f"s/{name}", root=".", path=name, width=W, height=H,
                              sha256=sha256_file(tmp_path / name), group=f"s/{name}",
                              attributes={"split": split} if split else {}))
    report = ConversionReport()
    out = write_yolo(samples, [Category(0, "x")], tmp_path / "out", project_root=tmp_path, report=report)
    assert report.counts == {"split_assigned": 1}
    assert {s.path: s.attributes for s in read_yolo(tmp_path / "out", out, "s").samples} == {
        "images/val/a.png": {"split": "val"}, "images/train/b.png": {"split": "train"}}
    twin = Sample(**{**samples[0].__dict__, "id": "t/a.png", "path": "images/val/a.png"})
    with pytest.raises(ValueError, match="both be written to 'images/val/a.png'"):
        write_yolo([samples[0], twin], [Category(0, "x")], tmp_path / "dup", copy_images=False)


def test_policy_tables_are_documented():
    for kind in list(READ_POLICIES) + list(yolo_module.WRITE_POLICIES):
        assert f"| {kind}" in yolo_module.__doc__, kind


# --- validation ------------------------------------------------------------------------------

def one_label(tmp_path: Path, rows: str) -> tuple[Path, Path]:
    make_image(tmp_path / "images/train/a.png")
    label = write(tmp_path / "labels/train/a.txt", "0 0.5 0.5 0.5 0.5\n" + rows)
    ann = write(tmp_path / "data.yaml", "train: images/train\nval: images/train\nnames: [a, b]\n")
    return ann, label


@pytest.mark.parametrize("row, kind, kept, needle", [
    ("1 0.5 0.5 1.5 0.5", "box_clipped", [0, 12, 64, 36], "clipped"),  # slightly outside: clipped
    ("1 1.7 0.5 0.2 0.2", "box_outside", None, "outside"),
    ("1 320 240 50 80", "row_not_normalized", None, "320"),  # pixel units: absurd, dropped
    ("1 0.5 0.5 0.2 0.2 0.93", "row_columns", None, "5 values"),  # e.g. a confidence column
    ("1 0.5 0.5", "row_columns", None, "2 values"),
    ("1 0.5 0.5 0 0.2", "box_degenerate", None, "no area"),
    ("1 0.5 0.5 -0.2 0.2", "box_degenerate", None, "no area"),
    ("1 0.5 abc 0.2 0.2", "row_unparsable", None, "abc"),
    ("1 nan 0.5 0.2 0.2", "row_unparsable", None, "nan"),
    ("1.5 0.5 0.5 0.2 0.2", "row_unparsable", None, "1.5"),
    ("1 -0.1 0.1 0.5 0.1 0.5 0.5", "polygon_clipped", [0, 4.8, 32, 24], "moved onto its edge"),
])
def test_counted_row_problems(tmp_path, row, kind, kept, needle):
    ann, label = one_label(tmp_path, row + "\n")
    res = read_yolo(tmp_path, ann, "v")
    assert res.report.counts == {kind: 1}, res.report.counts
    example = res.report.examples[kind][0]
    assert f"{label}:2" in example and needle in example, example
    instances = res.samples[0].instances
    assert len(instances) == (2 if kept else 1)
    if kept:
        assert instances[1].bbox == pytest.approx(kept)


def test_class_one_point_zero_is_accepted(tmp_path):
    ann, _ = one_label(tmp_path, "1.0 0.5 0.5 0.2 0.2\n")
    res = read_yolo(tmp_path, ann, "v")
    assert res.report.total == 0 and res.samples[0].instances[1].category_id == 1


@pytest.mark.parametrize("row, message", [
    ("1,0.5,0.5,0.2,0.2", "separated by commas"),
    ("1 0,5 0,5 0,2 0,2", "separated by commas"),  # decimal commas: refused, not misread
    ("2 0.5 0.5 0.2 0.2", "class id 2 is not in the names table"),
    ("-1 0.5 0.5 0.2 0.2", "class id -1 is not in the names table"),
])
def test_row_errors_name_file_and_line(tmp_path, row, message):
    ann, label = one_label(tmp_path, row + "\n")
    with pytest.raises(DataError, match=message) as err:
        read_yolo(tmp_path, ann, "v")
    assert f"{label} [line 2]" in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("train: images/train\nnames: [a, a]\n", "'a' also used by class id 0"),
    ("train: images/train\nnc: 3\nnames: [a, b]\n", "`nc` is 3 but `names` has 2"),
    ("train: images/train\n", "`names` must be"),
    ("names: [a]\n", "no `train`"),
    ("train: [images/train\nnames: [a]\n", "invalid YAML"),
    ("train: a.png.bak\nnames: [a]\n", "neither a folder nor a .txt list"),
    ("train: images/nothing\nnames: [a]\n", "images/nothing does not exist"),
    ("train: ../../elsewhere\nnames: [a]\n", "elsewhere does not exist"),
    ("train: /etc\nnames: [a]\n", "outside the images root"),
    ("train: ../outside\nnames: [a]\n", "outside the images root"),
    ("train: images/train\nnames: {0: a, x: b}\n", "non-negative integers"),
])
def test_data_yaml_errors_name_the_file(tmp_path, text, message):
    make_image(tmp_path / "ds/images/train/a.png")
    write(tmp_path / "ds/a.png.bak", "")
    (tmp_path / "outside").mkdir()  # exists, but beside the dataset root: refused, not read
    ann = write(tmp_path / "ds/data.yaml", text)
    with pytest.raises(DataError, match=message) as err:
        read_yolo(tmp_path / "ds", ann, "v")
    assert str(ann) in str(err.value)


def test_names_file_blank_line_inside_is_an_error(tmp_path):
    names = write(tmp_path / "classes.txt", "a\n\nb\n")
    with pytest.raises(DataError, match="empty class name") as err:
        read_yolo(tmp_path, names, "v")
    assert str(names) in str(err.value) and "class id 1" in str(err.value)


@pytest.mark.parametrize("line", ["../outside.png", "/etc/passwd", "a\\b.png"])
def test_list_file_path_traversal_is_refused(tmp_path, line):
    make_image(tmp_path / "images/a.png")
    lst = write(tmp_path / "train.txt", f"images/a.png\n{line}\n")
    ann = write(tmp_path / "data.yaml", "train: train.txt\nnames: [a]\n")
    with pytest.raises(DataError, match="unsafe image path") as err:
        read_yolo(tmp_path, ann, "v")
    assert f"{lst} [line 2]" in str(err.value)


def test_symlinked_image_folder_outside_root_is_refused(tmp_path):
    make_image(tmp_path / "secret/a.png")
    (tmp_path / "ds/images").mkdir(parents=True)
    (tmp_path / "ds/images/train").symlink_to(tmp_path / "secret")
    ann = write(tmp_path / "ds/data.yaml", "train: images/train\nnames: [a]\n")
    with pytest.raises(DataError, match="outside the images root") as err:
        read_yolo(tmp_path / "ds", ann, "v")
    assert "`train`" in str(err.value)


def test_orphan_label_missing_image_and_duplicate_listing(tmp_path):
    ann, _ = one_label(tmp_path, "")
    write(tmp_path / "labels/train/ghost.txt", "0 0.5 0.5 0.1 0.1\n")
    lst = write(tmp_path / "val.txt", "images/train/a.png\nimages/gone.png\n")
    ann.write_text("train: images/train\nval: val.txt\nnames: [a, b]\n")
    res = read_yolo(tmp_path, ann, "v")
    assert res.report.counts == {"label_orphan": 1, "image_missing": 1, "image_in_several_splits": 1}
    assert "ghost.txt" in res.report.examples["label_orphan"][0]
    assert f"{lst}:2" in res.report.examples["image_missing"][0]
    assert f"{lst}:1" in res.report.examples["image_in_several_splits"][0]
    assert [s.attributes for s in res.samples] == [{"split": "train"}]


def test_corrupt_image_skipped_and_untouched(tmp_path):
    ann, _ = one_label(tmp_path, "")
    bad = write(tmp_path / "images/train/bad.png", "not an image")
    res = read_yolo(tmp_path, ann, "v")
    assert res.report.counts == {"image_unreadable": 1} and len(res.samples) == 1
    assert bad.read_text() == "not an image"


# --- oriented boxes, rounding at the edge, darknet obj.data (issue 11) ----------------------------

def _obb_row(cx, cy, w, h, angle_deg, cls=0) -> str:
    """A YOLO-OBB row: the 4 corners of a rotated rectangle (pixels), normalised by W and H."""
    a = np.deg2rad(angle_deg)
    u, v = np.array([np.cos(a), np.sin(a)]) * w / 2, np.array([-np.sin(a), np.cos(a)]) * h / 2
    corners = [np.array([cx, cy]) + sx * u + sy * v for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    return " ".join([str(cls)] + [f"{x / W:.6f} {y / H:.6f}" for x, y in corners])


def test_obb_rows_are_kept_as_oriented_boxes(tmp_path):
    ann, _ = one_label(tmp_path, "")
    write(tmp_path / "labels/train/a.txt", _obb_row(30, 24, 20, 10, 30) + "\n" + _obb_row(10, 10, 8, 6, 0, 1)
                  + "\n")
    res = read_yolo(tmp_path, ann, "o")
    rotated, upright = res.samples[0].instances
    assert rotated.attributes == {"obb": True} and upright.attributes == {"obb": True}
    assert len(rotated.polygons) == 1 and len(rotated.polygons[0]) == 8
    xs, ys = rotated.polygons[0][0::2], rotated.polygons[0][1::2]
    assert rotated.bbox == pytest.approx([min(xs), min(ys), max(xs), max(ys)])
    assert res.report.total == 0
    # written back as OBB rows: nothing counted as lost, and read back the same
    report = ConversionReport()
    target = write_yolo(res.samples, res.categories, tmp_path / "out", report=report)
    assert report.total == 0
    back = read_yolo(tmp_path / "out", target, "o").samples[0].instances
    assert [i.attributes for i in back] == [{"obb": True}] * 2
    assert back[0].polygons[0] == pytest.approx(rotated.polygons[0], abs=1e-3)

    # An 8-value row among other polygons is a 4-point segmentation polygon: no marker.
    write(tmp_path / "labels/train/a.txt", _obb_row(30, 24, 20, 10, 30) + "\n0 0.1 0.1 0.3 0.1 0.3 0.3 0.2 0.4 0.1 0.3\n")
    res = read_yolo(tmp_path, ann, "o")
    assert [i.attributes for i in res.samples[0].instances] == [{}, {}]


def test_edge_rounding_is_not_a_problem_but_a_real_overhang_is(tmp_path):
    # "0 0.2 0.5 0.400001 1" reaches x = -3.2e-5 px: 6-decimal rounding, clipped silently.
    ann, _ = one_label(tmp_path, "0 0.2 0.5 0.400001 1.000001\n")
    res = read_yolo(tmp_path, ann, "r")
    assert res.report.total == 0 and res.samples[0].instances[1].bbox[0] == 0.0
    ann, _ = one_label(tmp_path, "0 0.2 0.5 0.42 1\n")  # 0.64 px past the left edge
    assert read_yolo(tmp_path, ann, "r").report.counts == {"box_clipped": 1}


@pytest.mark.parametrize("text, message", [
    ("classes = 2\ntrain = data/train.txt\n", "no `names = ...` line"),
    ("classes = 3\nnames = data/obj.names\ntrain = data/train.txt\n", "`classes = 3` but obj.names has 2 names"),
    ("names = data/none.names\ntrain = data/train.txt\n", "names file 'data/none.names' not found"),
    ("names = data/obj.names\nbackup = backup/\n", "no `train`, `valid` or `test` list"),
    ("names data/obj.names\n", "not a `key = value` line"),
    ("names = data/obj.names\ntrain = data/nothing.txt\n", "nothing.txt does not exist"),
])
def test_obj_data_errors_name_the_file(tmp_path, text, message):
    write(tmp_path / "obj.names", "cat\ndog\n")
    make_image(tmp_path / "obj_train_data/x.png")
    write(tmp_path / "train.txt", "data/obj_train_data/x.png\n")
    ann = write(tmp_path / "obj.data", text)
    with pytest.raises(DataError, match=message) as err:
        read_yolo(tmp_path, ann, "d")
    assert str(ann) in str(err.value)


def test_obj_data_valid_list_is_the_val_split(tmp_path):
    write(tmp_path / "obj.names", "cat\n")
    for split, name in (("train", "x"), ("valid", "y")):
        make_image(tmp_path / f"obj_{split}_data/{name}.png")
        write(tmp_path / f"obj_{split}_data/{name}.txt", "0 0.5 0.5 0.5 0.5\n")
        write(tmp_path / f"{split}.txt", f"data/obj_{split}_data/{name}.png\n")
    write(tmp_path / "obj.data", "classes = 1\nnames = data/obj.names\ntrain = data/train.txt\nvalid = data/valid.txt\n")
    res = read_yolo(tmp_path, tmp_path, "d")  # the folder: obj.data is found in it
    assert {s.path: s.attributes["split"] for s in res.samples} == {"obj_train_data/x.png": "train",
                                                                   "obj_valid_data/y.png": "val"}


def test_folder_without_a_class_table_is_a_clear_error(tmp_path):
    make_image(tmp_path / "images/a.png")
    with pytest.raises(DataError, match="none of data.yaml, data.yml, dataset.yaml, obj.data, obj.names, classes.txt"):
        read_yolo(tmp_path, tmp_path, "d")


def test_no_images_or_every_row_dropped_is_an_error(tmp_path):
    names = write(tmp_path / "classes.txt", "a\n")
    with pytest.raises(DataError, match="no images found") as err:
        read_yolo(tmp_path, names, "e")
    assert str(tmp_path) in str(err.value)
    make_image(tmp_path / "x.png")
    write(tmp_path / "x.txt", "0 5 5 0.1 0.1\n")  # pixel units: dropped
    with pytest.raises(DataError, match="all 1 label rows were dropped.*row_not_normalized"):
        read_yolo(tmp_path, names, "e")

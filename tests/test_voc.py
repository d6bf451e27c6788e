"""Pascal VOC reader/writer on tiny devkit-shaped datasets generated in tmp_path."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import visionflow.formats.voc as voc_module
from visionflow.manifest.masks import PALETTE, instance_mask
from visionflow.core.errors import DataError
from visionflow.formats import COMMON_POLICIES, ConversionReport
from visionflow.manifest.images import sha256_file
from visionflow.formats.voc import read_voc, write_voc
from visionflow.manifest import Category, Instance, Sample

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]

# Written the way the devkit's files are: tab-indented, <source> block, 1-based integer boxes.
XML_SEGMENTED = """<annotation>
\t<folder>VOC2012</folder>
\t<filename>2007_000032.jpg</filename>
\t<source>
\t\t<database>The VOC2007 Database</database>
\t\t<annotation>PASCAL VOC2007</annotation>
\t\t<image>flickr</image>
\t</source>
\t<size>
\t\t<width>64</width>
\t\t<height>48</height>
\t\t<depth>3</depth>
\t</size>
\t<segmented>1</segmented>
\t<object>
\t\t<name>aeroplane</name>
\t\t<pose>Frontal</pose>
\t\t<truncated>0</truncated>
\t\t<difficult>0</difficult>
\t\t<bndbox>
\t\t\t<xmin>3</xmin>
\t\t\t<ymin>5</ymin>
\t\t\t<xmax>30</xmax>
\t\t\t<ymax>20</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>person</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>1</truncated>
\t\t<difficult>0</difficult>
\t\t<occluded>1</occluded>
\t\t<bndbox>
\t\t\t<xmin>41</xmin>
\t\t\t<ymin>11</ymin>
\t\t\t<xmax>60</xmax>
\t\t\t<ymax>46</ymax>
\t\t</bndbox>
\t\t<part>
\t\t\t<name>head</name>
\t\t\t<bndbox><xmin>45</xmin><ymin>11</ymin><xmax>52</xmax><ymax>18</ymax></bndbox>
\t\t</part>
\t\t<part>
\t\t\t<name>hand</name>
\t\t\t<bndbox><xmin>41</xmin><ymin>25</ymin><xmax>44</xmax><ymax>28</ymax></bndbox>
\t\t</part>
\t</object>
</annotation>
"""

XML_PLAIN = """<annotation>
\t<folder>VOC2012</folder>
\t<filename>{name}.jpg</filename>
\t<source><database>The VOC2008 Database</database><annotation>PASCAL VOC2008</annotation>
\t<image>flickr</image></source>
\t<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
\t<segmented>0</segmented>
\t<object>
\t\t<name>{cls}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>
\t\t<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox>
\t</object>
</annotation>
"""


def object_png() -> np.ndarray:
    """(48, 64) SegmentationObject indices for XML_SEGMENTED: 1 = plane, 2 = person, 255 = boundary."""
    idx = np.zeros((48, 64), np.uint8)
    idx[6:19, 4:29] = 1
    idx[5, 2:30] = 255  # the devkit's boundary band
    idx[12:45, 42:59] = 2
    idx[12:15, 42:45] = 0  # a hole
    return idx


def save_palette(path: Path, idx: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(idx, mode="P")
    img.putpalette(PALETTE)
    img.save(path)


def make_voc(tmp_path: Path, labelmap: bool = False) -> Path:
    """A VOC2012-shaped root: Annotations, JPEGImages, ImageSets/Main (incl. the per-class lists the
    reader ignores), SegmentationObject and SegmentationClass for the segmented image."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "Annotations" / "2007_000032.xml").write_text(XML_SEGMENTED)
    Image.new("RGB", (64, 48), (90, 120, 200)).save(voc / "JPEGImages" / "2007_000032.jpg")
    for name, cls, box, diff, size in [("2008_000008", "horse", (5, 9, 40, 60), 0, (64, 64)),
                                       ("2008_000015", "aeroplane", (1, 1, 32, 32), 1, (32, 40))]:
        (voc / "Annotations" / f"{name}.xml").write_text(
            XML_PLAIN.format(name=name, cls=cls, box=box, difficult=diff, w=size[0], h=size[1]))
        Image.new("RGB", size, (30, 200, 30)).save(voc / "JPEGImages" / f"{name}.jpg")
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "train.txt").write_text("2007_000032\n2008_000015\n")
    (main / "val.txt").write_text("2008_000008\n")
    (main / "trainval.txt").write_text("2007_000032\n2008_000008\n2008_000015\n")
    (main / "aeroplane_train.txt").write_text("2007_000032  1\n2008_000015  1\n")
    objects = object_png()
    save_palette(voc / "SegmentationObject" / "2007_000032.png", objects)
    classes = np.where(objects == 2, 15, objects)  # VOC class indices: aeroplane 1, person 15
    save_palette(voc / "SegmentationClass" / "2007_000032.png", classes)
    if labelmap:  # the CVAT / Datumaro export's label map: line index = class index
        (voc / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + "".join(
            f"{n}:0,0,0::\n" for n in ["background"] + VOC_CLASSES))
    return voc


def read(voc: Path, **kw):
    return read_voc(voc / "JPEGImages", voc, "voc", **kw)


def by_path(res) -> dict:
    return {s.path: s for s in res.samples}


def decode(rle: dict) -> np.ndarray:
    counts = rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]
    return mask_utils.decode({"size": rle["size"], "counts": counts}).astype(bool)


# --- reading -------------------------------------------------------------------------------

def test_read_maps_voc_to_canonical(tmp_path):
    voc = make_voc(tmp_path)
    res = read(voc)
    assert res.report.total == 0, res.report.lines()
    assert [(c.id, c.name, c.source_ids) for c in res.categories] == [
        (1, "aeroplane", {"voc": 1}), (2, "horse", {"voc": 2}), (3, "person", {"voc": 3})]
    s = by_path(res)
    a = s["2007_000032.jpg"]
    assert a.id == "voc/2007_000032.jpg" and a.root == (voc / "JPEGImages").as_posix() and a.group == a.id
    assert (a.width, a.height, a.sha256) == (64, 48, sha256_file(voc / "JPEGImages/2007_000032.jpg"))
    plane, person = a.instances
    assert plane.bbox == [2.0, 4.0, 30.0, 20.0]  # 1-based inclusive -> 0-based continuous
    assert plane.category_id == 1 and person.category_id == 3
    assert plane.attributes == {"pose": "Frontal", "truncated": 0, "difficult": 0}
    assert person.attributes["occluded"] == 1 and person.attributes["truncated"] == 1
    assert [p["name"] for p in person.attributes["part"]] == ["head", "hand"]  # repeated tag -> list
    assert a.attributes["folder"] == "VOC2012" and a.attributes["source"]["image"] == "flickr"
    assert a.attributes["split"] == "train" and a.attributes["segmented"] == 1 and a.attributes["depth"] == 3
    objects = object_png()
    assert (decode(plane.rle) == (objects == 1)).all() and (decode(person.rle) == (objects == 2)).all()
    assert plane.rle["size"] == [48, 64] and isinstance(plane.rle["counts"], str)
    assert (decode(a.attributes["ignore_rle"]) == (objects == 255)).all()
    h = s["2008_000008.jpg"]
    assert h.attributes["split"] == "val" and h.instances[0].rle is None and "ignore_rle" not in h.attributes
    assert s["2008_000015.jpg"].instances[0].attributes["difficult"] == 1


def test_annotations_folder_or_root_and_labels_file(tmp_path):
    voc = make_voc(tmp_path, labelmap=True)
    via_folder = read_voc(voc / "JPEGImages", voc / "Annotations", "voc", root="data/voc")
    assert {s.root for s in via_folder.samples} == {"data/voc"}
    # The label map's line index is the class id (background = 0), so ids equal SegmentationClass indices.
    assert [(c.id, c.name) for c in via_folder.categories][:2] == [(1, "aeroplane"), (2, "bicycle")]
    assert len(via_folder.categories) == 20
    assert by_path(via_folder)["2007_000032.jpg"].instances[1].category_id == 15
    # labelme's VOC export names line 0 `_background_` (class_names.txt): the same background
    (voc / "labelmap.txt").write_text("".join(f"{n}\n" for n in ["_background_"] + VOC_CLASSES))
    labelme = read_voc(voc / "JPEGImages", voc / "Annotations", "voc")
    assert [(c.id, c.name) for c in labelme.categories] == [(c.id, c.name) for c in via_folder.categories]
    with pytest.raises(DataError, match="not a VOC folder"):
        read_voc(voc / "JPEGImages", voc / "missing", "voc")


def test_policy_table_documents_every_problem_kind():
    for kind in {**COMMON_POLICIES, **voc_module.VOC_POLICIES}:
        assert kind in voc_module.__doc__


# --- round trips ---------------------------------------------------------------------------

def assert_same(left, right):
    assert [s.path for s in left.samples] == [s.path for s in right.samples]
    names_l = {c.id: c.name for c in left.categories}
    names_r = {c.id: c.name for c in right.categories}
    for a, b in zip(left.samples, right.samples):
        assert (a.width, a.height, a.sha256, a.attributes.keys()) == (b.width, b.height, b.sha256, b.attributes.keys())
        assert a.attributes == b.attributes
        assert len(a.instances) == len(b.instances)
        for i, j in zip(a.instances, b.instances):
            assert names_l[i.category_id] == names_r[j.category_id]
            assert i.bbox == pytest.approx(j.bbox, rel=1e-6)
            assert (i.rle, i.polygons, i.iscrowd, i.attributes) == (j.rle, j.polygons, j.iscrowd, j.attributes)


def test_round_trip_voc_manifest_voc(tmp_path):
    src = make_voc(tmp_path / "in", labelmap=True)
    first = read(src)
    report = ConversionReport()
    out = write_voc(first.samples, first.categories, tmp_path / "out", copy_images=True, report=report)
    assert report.total == 0, report.lines()  # VOC -> VOC loses nothing
    second = read(out)
    assert second.report.total == 0
    assert_same(first, second)
    assert [(c.id, c.name) for c in second.categories] == [(c.id, c.name) for c in first.categories]
    for folder in ("SegmentationObject", "SegmentationClass"):  # masks pixel-equal, index for index
        written = np.asarray(Image.open(out / folder / "2007_000032.png"))
        assert Image.open(out / folder / "2007_000032.png").mode == "P"
        assert (written == np.asarray(Image.open(src / folder / "2007_000032.png"))).all(), folder
    assert (out / "ImageSets/Main/train.txt").read_text() == "2007_000032\n2008_000015\n"
    assert (out / "ImageSets/Main/trainval.txt").read_text().split() == ["2007_000032", "2008_000008", "2008_000015"]
    assert (out / "JPEGImages/2008_000008.jpg").read_bytes() == (src / "JPEGImages/2008_000008.jpg").read_bytes()


def test_box_with_fractional_coordinates_round_trips(tmp_path):
    src = make_voc(tmp_path / "in")
    xml = src / "Annotations" / "2008_000008.xml"
    xml.write_text(xml.read_text().replace("<xmin>5</xmin>", "<xmin>5.25</xmin>"))
    first = read(src)
    second = read(write_voc(first.samples, first.categories, tmp_path / "out"))
    assert by_path(second)["2008_000008.jpg"].instances[0].bbox == pytest.approx([4.25, 8.0, 40.0, 60.0], rel=1e-9)


def manifest_samples(tmp_path: Path) -> tuple[list[Sample], list[Category]]:
    """Samples as another format (COCO) would give them: polygons, a crowd RLE, a subfolder,
    image labels, areas, typed attributes, a split VOC does not know and overlapping masks."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "a.png")
    Image.new("RGB", (32, 32), (4, 5, 6)).save(root / "sub" / "b.png")
    crowd = np.zeros((64, 64), np.uint8)
    crowd[40:60, 40:60] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle = {"size": [64, 64], "counts": crowd_rle["counts"].decode()}
    poly = [[2.0, 2.0, 20.0, 2.0, 20.0, 30.0, 2.0, 30.0]]
    a = Sample(id="coco/a.png", root=root.as_posix(), path="a.png", width=64, height=64,
               sha256=sha256_file(root / "a.png"), labels=[0], group="session-1",
               attributes={"split": "train", "license": 2, "my key": 1, "note": "kept"},
               instances=[Instance(bbox=[2, 2, 20, 30], category_id=0, polygons=poly, area=504.0,
                                   attributes={"score": 0.9, "tags": ["x", "y"]}),
                          Instance(bbox=[40, 40, 60, 60], category_id=1, rle=crowd_rle, iscrowd=True)])
    b = Sample(id="coco/sub/b.png", root=root.as_posix(), path="sub/b.png", width=32, height=32,
               sha256=sha256_file(root / "sub" / "b.png"), attributes={"split": "holdout"},
               instances=[Instance(bbox=[0, 0, 10, 10], category_id=0, polygons=[[0, 0, 10, 0, 10, 10, 0, 10]]),
                          Instance(bbox=[5, 5, 15, 15], category_id=1, polygons=[[5, 5, 15, 5, 15, 15, 5, 15]])])
    return [a, b], [Category(0, "cat"), Category(1, "dog")]


def test_writer_counts_what_voc_cannot_hold(tmp_path):
    samples, cats = manifest_samples(tmp_path)
    report = ConversionReport()
    out = write_voc(samples, cats, tmp_path / "out", report=report)
    assert report.counts == {"polygons_rasterised": 3, "area_dropped": 1, "crowd_as_difficult": 1,
                             "image_labels_dropped": 1, "attributes_dropped": 1, "attribute_type_changed": 2,
                             "split_dropped": 1, "path_flattened": 1, "mask_overlap": 1}, report.lines()
    dropped = report.examples["attributes_dropped"][0]
    assert "coco/a.png" in dropped and "my key" in dropped
    assert "coco/sub/b.png" in report.examples["mask_overlap"][0]
    assert set(report.policies) >= set(voc_module.VOC_LOSSES)
    back = read_voc(out / "JPEGImages", out, "voc")
    assert back.report.total == 0
    a, b = back.samples
    assert (a.path, b.path) == ("a.png", "sub__b.png") and a.group == "session-1"
    assert a.attributes["license"] == "2" and a.attributes["note"] == "kept" and a.attributes["split"] == "train"
    assert "split" not in b.attributes and a.labels == []
    polygon, crowd = a.instances
    assert crowd.attributes["difficult"] == 1 and not crowd.iscrowd
    assert (decode(crowd.rle) == decode(samples[0].instances[1].rle)).all()  # crowd mask pixel-equal
    expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(samples[0].instances[0].polygons, 64, 64)))
    assert (decode(polygon.rle) == expected.astype(bool)).all() and polygon.polygons == []
    assert polygon.attributes["score"] == "0.9" and polygon.attributes["tags"] == ["x", "y"]
    assert polygon.bbox == pytest.approx([2, 2, 20, 30])
    # The later (dog) mask wins the overlap; the cat keeps the rest.
    cat_mask, dog_mask = (decode(i.rle) for i in b.instances)
    assert dog_mask[5:15, 5:15].all() and not cat_mask[5:15, 5:15].any() and cat_mask[0:5, 0:10].all()
    labelmap = (out / "labelmap.txt").read_text().splitlines()
    assert labelmap[1:4] == ["background:0,0,0::", "cat:128,0,0::", "dog:0,128,0::"]
    classes = np.asarray(Image.open(out / "SegmentationClass" / "a.png"))
    assert set(np.unique(classes).tolist()) == {0, 1, 2}


def test_writer_refuses_colliding_flat_names(tmp_path):
    samples, cats = manifest_samples(tmp_path)
    twin = copy.deepcopy(samples[1])
    twin.id, twin.path = "coco/sub__b.png", "sub__b.png"
    with pytest.raises(ValueError, match="sub__b"):
        write_voc([samples[1], twin], cats, tmp_path / "out", copy_images=False)


# --- structural errors: DataError naming the file and the record ---------------------------

def test_malformed_xml_names_file_and_line(tmp_path):
    voc = make_voc(tmp_path)
    bad = voc / "Annotations" / "2008_000008.xml"
    bad.write_text("<annotation>\n  <filename>x.jpg</filename>\n  <object><name>horse</object>\n</annotation>")
    with pytest.raises(DataError, match=r"malformed XML at line 3") as err:
        read(voc)
    assert str(bad) in str(err.value)


def test_unknown_class_with_labels_file_names_file_and_object(tmp_path):
    voc = make_voc(tmp_path)
    (voc / "labels.txt").write_text("aeroplane\nhorse\n")  # no person
    with pytest.raises(DataError, match="'person' is not in the labels file") as err:
        read(voc)
    assert str(voc / "Annotations" / "2007_000032.xml") in str(err.value) and "object #2" in str(err.value)


@pytest.mark.parametrize("old, new, message", [
    ("<xmax>30</xmax>", "<xmax>thirty</xmax>", "numeric"),
    ("<name>aeroplane</name>", "<name></name>", "no <name>"),
])
def test_bad_object_names_file_and_object(tmp_path, old, new, message):
    voc = make_voc(tmp_path)
    xml = voc / "Annotations" / "2007_000032.xml"
    xml.write_text(xml.read_text().replace(old, new))
    with pytest.raises(DataError, match=message) as err:
        read(voc)
    assert str(xml) in str(err.value) and "object #1" in str(err.value)


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.jpg", "a\\b.jpg"])
def test_unsafe_filename_rejected(tmp_path, name):
    voc = make_voc(tmp_path)
    xml = voc / "Annotations" / "2008_000008.xml"
    xml.write_text(xml.read_text().replace("2008_000008.jpg", name))
    with pytest.raises(DataError, match="unsafe <filename>") as err:
        read(voc)
    assert str(xml) in str(err.value)


def test_duplicate_label_and_split_overlap_name_file_and_line(tmp_path):
    voc = make_voc(tmp_path)
    (voc / "labels.txt").write_text("aeroplane\nhorse\nperson\nhorse\n")
    with pytest.raises(DataError, match="duplicate label 'horse'") as err:
        read(voc)
    assert "labels.txt [line 4]" in str(err.value)
    (voc / "labels.txt").unlink()
    (voc / "ImageSets/Main/val.txt").write_text("2008_000008\n2007_000032\n")
    with pytest.raises(DataError, match="also listed in train.txt") as err:
        read(voc)
    assert "val.txt [line 2]" in str(err.value)


def test_rgb_masks_read_through_palette_and_label_map(tmp_path):
    """CVAT writes both PNGs as RGB: objects in the VOC palette's colours, classes in labelmap.txt's."""
    voc = make_voc(tmp_path, labelmap=True)
    pal = np.array(PALETTE, np.uint8).reshape(-1, 3)
    objects = object_png()
    Image.fromarray(pal[objects]).save(voc / "SegmentationObject" / "2007_000032.png")
    (voc / "labelmap.txt").write_text("".join(f"{n}:{i},{i},{i}::\n" for i, n in enumerate(["background"] + VOC_CLASSES)))
    classes = np.where(objects == 2, 15, np.where(objects == 1, 1, 0)).astype(np.uint8)
    Image.fromarray(np.stack([classes] * 3, axis=-1)).save(voc / "SegmentationClass" / "2007_000032.png")
    res = read(voc)
    plane, person = by_path(res)["2007_000032.jpg"].instances
    assert (decode(plane.rle) == (objects == 1)).all() and (decode(person.rle) == (objects == 2)).all()
    assert (decode(by_path(res)["2007_000032.jpg"].attributes["ignore_rle"]) == (objects == 255)).all()
    assert res.report.total == 0, res.report.lines()


def test_mask_of_another_mode_rejected(tmp_path):
    voc = make_voc(tmp_path)
    png = voc / "SegmentationObject" / "2007_000032.png"
    Image.new("I;16", (64, 48)).save(png)
    with pytest.raises(DataError, match="neither an index nor an RGB PNG") as err:
        read(voc)
    assert str(png) in str(err.value)


# --- counted problems: outcome, count and an example naming file and record ----------------

def one_problem(res, kind: str, *needles: str) -> None:
    assert res.report.counts == {kind: 1}, res.report.counts
    for needle in needles:
        assert needle in res.report.examples[kind][0], res.report.examples[kind][0]


def edit(voc: Path, stem: str, old: str, new: str) -> Path:
    xml = voc / "Annotations" / f"{stem}.xml"
    xml.write_text(xml.read_text().replace(old, new))
    return xml


def test_missing_filename_and_missing_image_are_skipped(tmp_path):
    voc = make_voc(tmp_path)
    xml = edit(voc, "2008_000008", "<filename>2008_000008.jpg</filename>", "")
    res = read(voc)
    assert "2008_000008.jpg" not in by_path(res) and len(res.samples) == 2
    assert res.report.counts == {"image_missing": 1, "image_unannotated": 1}
    assert str(xml) in res.report.examples["image_missing"][0] and "no <filename>" in res.report.examples["image_missing"][0]
    (voc / "JPEGImages/2008_000015.jpg").unlink()
    res = read(voc)
    # 2008_000008.jpg is on disk but no XML names it any more: counted as well.
    assert res.report.counts == {"image_missing": 2, "image_unannotated": 1} and len(res.samples) == 1
    assert "2008_000015.jpg" in res.report.examples["image_missing"][1]


@pytest.mark.parametrize("box, kind, left", [
    ((6, 9, 4, 60), "box_degenerate", 0),  # xmin == xmax is 1 px wide, valid
    ((5, 9, 90, 60), "box_clipped", 1),
    ((70, 9, 90, 60), "box_outside", 0),
])
def test_bad_boxes_use_the_shared_policy(tmp_path, box, kind, left):
    voc = make_voc(tmp_path)
    xml = edit(voc, "2008_000008", "<xmin>5</xmin><ymin>9</ymin><xmax>40</xmax><ymax>60</ymax>",
               "<xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax>".format(*box))
    res = read(voc)
    instances = by_path(res)["2008_000008.jpg"].instances
    assert len(instances) == left
    if left:
        assert instances[0].bbox == [4.0, 8.0, 64.0, 60.0]
    one_problem(res, kind, str(xml), "object #1")


def test_declared_size_disagreeing_with_file_uses_file(tmp_path):
    voc = make_voc(tmp_path)
    xml = edit(voc, "2008_000008", "<width>64</width><height>64</height>", "<width>128</width><height>32</height>")
    res = read(voc)
    assert (by_path(res)["2008_000008.jpg"].width, by_path(res)["2008_000008.jpg"].height) == (64, 64)
    one_problem(res, "image_size_mismatch", str(xml), "128x32")


def test_mask_index_without_object_is_counted(tmp_path):
    voc = make_voc(tmp_path)
    idx = object_png()
    idx[40:44, 2:6] = 3  # the XML has two objects
    save_palette(voc / "SegmentationObject" / "2007_000032.png", idx)
    res = read(voc)
    plane, person = by_path(res)["2007_000032.jpg"].instances
    assert (decode(plane.rle) == (idx == 1)).all() and not decode(person.rle)[40:44, 2:6].any()
    one_problem(res, "mask_object_unmatched", "2007_000032.xml", "index 3")


def test_mask_problems_are_counted(tmp_path):
    voc = make_voc(tmp_path)
    save_palette(voc / "SegmentationObject" / "2007_000032.png", np.zeros((10, 10), np.uint8))
    res = read(voc)
    assert by_path(res)["2007_000032.jpg"].instances[0].rle is None
    assert res.report.counts == {"mask_size_mismatch": 1, "mask_class_only": 1}
    assert "SegmentationObject/2007_000032.png" in res.report.examples["mask_size_mismatch"][0]
    (voc / "SegmentationObject" / "2007_000032.png").unlink()
    res = read(voc)
    a = by_path(res)["2007_000032.jpg"]
    assert all(i.rle is None for i in a.instances)
    assert (decode(a.attributes["ignore_rle"]) == (object_png() == 255)).all()  # from the class PNG
    one_problem(res, "mask_class_only", "2007_000032.xml")


def test_split_line_without_annotation_is_counted(tmp_path):
    voc = make_voc(tmp_path)
    (voc / "ImageSets/Main/test.txt").write_text("2010_999999\n")
    res = read(voc)
    one_problem(res, "split_unmatched", "test.txt line 1", "2010_999999")


def test_writer_decodes_uncompressed_rle_and_refuses_unknown_category(tmp_path):
    rle = {"size": [48, 64], "counts": [100, 20, 44, 20, 2888]}
    mask = instance_mask(Instance(bbox=[0, 0, 1, 1], category_id=0, rle=rle), 48, 64, "uncompressed")  # what the writer decodes with
    assert (mask == mask_utils.decode(mask_utils.frPyObjects(rle, 48, 64)).astype(bool)).all() and mask.sum() == 40
    samples, cats = manifest_samples(tmp_path)
    with pytest.raises(ValueError, match="coco/a.png object #2: category id 1"):
        write_voc(samples[:1], cats[:1], tmp_path / "out", copy_images=False)
    with pytest.raises(DataError, match="labels file not found"):
        read_voc(tmp_path, tmp_path, "x", labels=tmp_path / "nope.txt")

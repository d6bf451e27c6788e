"""CVAT for images 1.1 reader/writer on tiny exports generated in tmp_path.

The fixtures copy the structure of real CVAT 2.x exports: a task export (`annotations.xml`
next to `images/`) and a project export (images in `images/<Subset>/`, `subset` and
`task_id` on every <image>, a <project> meta with <tasks> and <subsets>).
"""
from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import visionflow.formats.cvat as cvat_module
from visionflow.core.errors import DataError
from visionflow.formats import COMMON_POLICIES, ConversionReport
from visionflow.formats.cvat import READ_POLICIES, WRITE_POLICIES, read_cvat, write_cvat
from visionflow.manifest.images import sha256_file
from visionflow.manifest import Category, Instance, Sample

# A 6x4 mask region placed at left=10, top=20 of image id 1 (row-major, as CVAT counts).
REGION = np.array([[0, 1, 1, 0, 0, 0],
                   [1, 1, 1, 1, 0, 0],
                   [0, 1, 1, 1, 1, 0],
                   [0, 0, 1, 1, 1, 1]], dtype=np.uint8)


def cvat_rle(region: np.ndarray) -> str:
    """Reference encoder, written independently of the module: runs starting with background."""
    runs = [len(list(g)) for _, g in itertools.groupby(region.ravel().tolist())]
    return ", ".join(map(str, ([0] if region.flat[0] else []) + runs))


LABELS = """
      <labels>
        <label>
          <name>car</name>
          <color>#fa3253</color>
          <type>rectangle</type>
          <attributes>
            <attribute>
              <name>model</name>
              <mutable>False</mutable>
              <input_type>select</input_type>
              <default_value>sedan</default_value>
              <values>sedan
suv</values>
            </attribute>
            <attribute>
              <name>parked</name>
              <mutable>True</mutable>
              <input_type>checkbox</input_type>
              <default_value>false</default_value>
              <values>false</values>
            </attribute>
          </attributes>
        </label>
        <label>
          <name>road</name>
          <color>#3d3df5</color>
          <type>any</type>
          <attributes>
          </attributes>
        </label>
        <label>
          <name>daytime</name>
          <color>#b83df5</color>
          <type>tag</type>
          <attributes>
          </attributes>
        </label>
        <label>
          <name>person</name>
          <color>#24b353</color>
          <type>skeleton</type>
          <attributes>
          </attributes>
          <svg>&lt;circle r="0.75" cx="50" cy="20" data-type="element node" data-element-id="1" data-node-id="1" data-label-name="nose"&gt;&lt;/circle&gt;</svg>
        </label>
        <label>
          <name>nose</name>
          <color>#d12345</color>
          <type>points</type>
          <attributes>
          </attributes>
          <parent>person</parent>
        </label>
        <label>
          <name>lane</name>
          <color>#ff6037</color>
          <type>polyline</type>
          <attributes>
          </attributes>
        </label>
      </labels>"""

TASK_META = f"""
    <task>
      <id>42</id>
      <name>street-scenes</name>
      <size>3</size>
      <mode>annotation</mode>
      <overlap>0</overlap>
      <bugtracker></bugtracker>
      <created>2024-03-05 10:21:33.051255+00:00</created>
      <updated>2024-03-06 14:02:17.882011+00:00</updated>
      <subset>default</subset>
      <start_frame>0</start_frame>
      <stop_frame>2</stop_frame>
      <frame_filter></frame_filter>
      <segments>
        <segment>
          <id>57</id>
          <start>0</start>
          <stop>2</stop>
          <url>http://localhost:8080/api/jobs/57</url>
        </segment>
      </segments>
      <owner>
        <username>admin</username>
        <email>admin@example.com</email>
      </owner>
      <assignee></assignee>{LABELS}
    </task>"""

TASK_IMAGES = f"""
  <image id="0" name="frame_000000.jpg" width="64" height="48">
    <box label="car" source="manual" occluded="0" xtl="1.50" ytl="2.25" xbr="30.00" ybr="20.75" z_order="0">
      <attribute name="model">suv</attribute>
      <attribute name="parked">true</attribute>
    </box>
    <polygon label="road" source="manual" occluded="1" points="0.00,30.00;63.00,30.00;63.00,47.00;0.00,47.00" z_order="1">
    </polygon>
    <polyline label="lane" source="manual" occluded="0" points="5.00,40.00;60.00,41.50" z_order="0">
    </polyline>
    <tag label="daytime" source="manual">
    </tag>
  </image>
  <image id="1" name="city/frame_000001.jpg" width="64" height="48">
    <mask label="road" source="semi-auto" occluded="0" rle="{cvat_rle(REGION)}" left="10" top="20" width="6" height="4" z_order="0">
    </mask>
    <box label="car" source="auto" occluded="1" xtl="40.00" ytl="10.00" xbr="60.00" ybr="30.00" z_order="2" group_id="1">
      <attribute name="model">sedan</attribute>
      <attribute name="parked">false</attribute>
    </box>
    <skeleton label="person" source="manual" z_order="0">
      <points label="nose" source="manual" outside="0" occluded="0" points="12.00,8.00">
      </points>
    </skeleton>
  </image>
  <image id="2" name="frame_000002.jpg" width="64" height="48">
  </image>"""


def document(meta: str, images: str) -> str:
    return f"""<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>{meta}
    <dumped>2024-03-06 14:05:00.486283+00:00</dumped>
  </meta>{images}
</annotations>
"""


def make_image(path: Path, size=(64, 48), color=(90, 120, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def task_export(tmp_path: Path, images: str = TASK_IMAGES, meta: str = TASK_META) -> tuple[Path, Path]:
    """The unzipped 'Export task dataset' of CVAT: annotations.xml and images/<name>."""
    folder = tmp_path / "task_street-scenes-2024_03_06_14_05_00-cvat for images 1.1"
    for name in ("frame_000000.jpg", "city/frame_000001.jpg", "frame_000002.jpg"):
        make_image(folder / "images" / name)
    ann = folder / "annotations.xml"
    ann.write_text(document(meta, images), encoding="utf-8")
    return folder / "images", ann


PROJECT_META = f"""
    <project>
      <id>7</id>
      <name>parking-lots</name>
      <created>2024-02-01 09:00:12.000000+00:00</created>
      <updated>2024-03-06 14:02:17.882011+00:00</updated>{LABELS}
      <subsets>Train
Validation
default</subsets>
      <tasks>
        <task>
          <id>5</id>
          <name>lot-a</name>
          <size>2</size>
          <mode>annotation</mode>
          <overlap>0</overlap>
          <bugtracker></bugtracker>
          <created>2024-02-01 09:05:00.000000+00:00</created>
          <updated>2024-03-06 14:02:17.882011+00:00</updated>
          <subset>Train</subset>
          <start_frame>0</start_frame>
          <stop_frame>1</stop_frame>
          <frame_filter></frame_filter>
          <segments>
            <segment>
              <id>11</id>
              <start>0</start>
              <stop>1</stop>
              <url>http://localhost:8080/api/jobs/11</url>
            </segment>
          </segments>
          <owner>
            <username>admin</username>
            <email>admin@example.com</email>
          </owner>
          <assignee></assignee>
        </task>
        <task>
          <id>8</id>
          <name>lot-c</name>
          <size>1</size>
          <mode>annotation</mode>
          <overlap>0</overlap>
          <bugtracker></bugtracker>
          <created>2024-02-01 09:07:00.000000+00:00</created>
          <updated>2024-03-06 14:02:17.882011+00:00</updated>
          <subset></subset>
          <start_frame>0</start_frame>
          <stop_frame>0</stop_frame>
          <frame_filter></frame_filter>
          <segments>
          </segments>
          <owner>
            <username>admin</username>
            <email>admin@example.com</email>
          </owner>
          <assignee></assignee>
        </task>
        <task>
          <id>6</id>
          <name>lot-b</name>
          <size>1</size>
          <mode>annotation</mode>
          <overlap>0</overlap>
          <bugtracker></bugtracker>
          <created>2024-02-01 09:06:00.000000+00:00</created>
          <updated>2024-03-06 14:02:17.882011+00:00</updated>
          <subset>Validation</subset>
          <start_frame>0</start_frame>
          <stop_frame>0</stop_frame>
          <frame_filter></frame_filter>
          <segments>
          </segments>
          <owner>
            <username>admin</username>
            <email>admin@example.com</email>
          </owner>
          <assignee></assignee>
        </task>
      </tasks>
      <owner>
        <username>admin</username>
        <email>admin@example.com</email>
      </owner>
      <assignee></assignee>
    </project>"""

PROJECT_IMAGES = """
  <image id="0" name="cam1_0001.jpg" subset="Train" task_id="5" width="64" height="48">
    <box label="car" source="manual" occluded="0" xtl="4.00" ytl="4.00" xbr="20.00" ybr="16.00" z_order="0">
      <attribute name="model">sedan</attribute>
      <attribute name="parked">true</attribute>
    </box>
  </image>
  <image id="1" name="cam1_0002.jpg" subset="Train" task_id="5" width="64" height="48">
  </image>
  <image id="2" name="cam1_0001.jpg" subset="Validation" task_id="6" width="64" height="48">
    <tag label="daytime" source="manual">
    </tag>
  </image>
  <image id="3" name="cam3_0001.jpg" subset="default" task_id="8" width="64" height="48">
  </image>"""


def project_export(tmp_path: Path) -> tuple[Path, Path]:
    """The unzipped 'Export project dataset': images/<Subset>/<name>, same name in two subsets."""
    folder = tmp_path / "project_parking-lots-2024_03_06_14_05_00-cvat for images 1.1"
    make_image(folder / "images/Train/cam1_0001.jpg", color=(1, 2, 3))
    make_image(folder / "images/Train/cam1_0002.jpg")
    make_image(folder / "images/Validation/cam1_0001.jpg", color=(9, 9, 9))
    make_image(folder / "images/default/cam3_0001.jpg")
    ann = folder / "annotations.xml"
    ann.write_text(document(PROJECT_META, PROJECT_IMAGES), encoding="utf-8")
    return folder / "images", ann


def by_path(result) -> dict[str, Sample]:
    return {s.path: s for s in result.samples}


def full_mask(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})


def expected_mask() -> np.ndarray:
    full = np.zeros((48, 64), dtype=np.uint8)
    full[20:24, 10:16] = REGION
    return full


# --- reading -------------------------------------------------------------------------------

def test_read_task_export(tmp_path):
    images_root, ann = task_export(tmp_path)
    res = read_cvat(images_root, ann, "street")
    # Declared order, ids 1..K; the skeleton's point label "nose" is not a category.
    assert [(c.id, c.name, c.source_ids) for c in res.categories] == [
        (1, "car", {"street": 1}), (2, "road", {"street": 2}), (3, "daytime", {"street": 3}),
        (4, "person", {"street": 4}), (5, "lane", {"street": 5})]
    assert res.report.counts == {"shape_unsupported": 2}  # the polyline and the skeleton
    assert any("image id 1" in e and "skeleton" in e for e in res.report.examples["shape_unsupported"])
    s = by_path(res)
    a, b, c = s["frame_000000.jpg"], s["city/frame_000001.jpg"], s["frame_000002.jpg"]
    assert a.id == "street/frame_000000.jpg" and a.root == images_root.as_posix() and a.group == a.id
    assert (a.width, a.height, a.sha256) == (64, 48, sha256_file(images_root / "frame_000000.jpg"))
    assert a.labels == [3] and a.attributes == {}
    box, poly = a.instances
    assert box.bbox == pytest.approx([1.5, 2.25, 30.0, 20.75]) and box.category_id == 1
    assert box.attributes == {"occluded": False, "z_order": 0, "source": "manual", "model": "suv", "parked": "true"}
    assert poly.polygons == [[0.0, 30.0, 63.0, 30.0, 63.0, 47.0, 0.0, 47.0]] and poly.bbox == [0, 30, 63, 47]
    assert poly.attributes["occluded"] is True and poly.attributes["z_order"] == 1
    mask, car = b.instances
    assert mask.category_id == 2 and mask.bbox == [10, 20, 16, 24] and mask.rle["size"] == [48, 64]
    assert np.array_equal(full_mask(mask.rle), expected_mask())
    assert car.attributes == {"occluded": True, "z_order": 2, "group_id": 1, "source": "auto",
                              "model": "sedan", "parked": "false"}
    assert c.instances == [] and c.labels == []  # unannotated images are kept


def test_read_project_export_with_subsets(tmp_path):
    images_root, ann = project_export(tmp_path)
    res = read_cvat(images_root, ann, "lots", root="data/lots")
    assert res.report.total == 0
    s = by_path(res)
    assert list(s) == ["Train/cam1_0001.jpg", "Train/cam1_0002.jpg", "Validation/cam1_0001.jpg",
                       "default/cam3_0001.jpg"]
    train, val = s["Train/cam1_0001.jpg"], s["Validation/cam1_0001.jpg"]
    assert train.attributes == {"split": "train", "task_id": "5"} and train.root == "data/lots"
    assert val.attributes == {"split": "val", "task_id": "6"} and val.labels == [3]
    assert train.sha256 != val.sha256  # same name, different files: the subset folder decides
    assert train.instances[0].bbox == [4, 4, 20, 16]
    # A task without a subset is not a split the split stage could keep.
    assert s["default/cam3_0001.jpg"].attributes == {"subset": "default", "task_id": "8"}


def test_project_export_numbering_each_subset_from_0(tmp_path):
    # CVAT numbers each subset's images from 0 in a project export: images are keyed by (subset, id).
    images_root, ann = project_export(tmp_path)
    text = ann.read_text()
    for old, new in (('id="2" name="cam1_0001.jpg" subset="Validation"', 'id="0" name="cam1_0001.jpg" subset="Validation"'),
                     ('id="3" name="cam3_0001.jpg" subset="default"', 'id="0" name="cam3_0001.jpg" subset="default"')):
        assert old in text
        text = text.replace(old, new)
    ann.write_text(text)
    res = read_cvat(images_root, ann, "lots")
    assert [(s.path, s.attributes.get("split")) for s in res.samples] == [
        ("Train/cam1_0001.jpg", "train"), ("Train/cam1_0002.jpg", "train"), ("Validation/cam1_0001.jpg", "val"),
        ("default/cam3_0001.jpg", None)]
    ann.write_text(text.replace('id="1" name="cam1_0002.jpg"', 'id="0" name="cam1_0002.jpg"'))
    with pytest.raises(DataError, match="duplicate image id") as err:  # same id twice in one subset
        read_cvat(images_root, ann, "lots")
    assert "image id 0 (subset 'Train')" in str(err.value)


def test_export_folder_as_annotations_and_images(tmp_path):
    # The most natural first command: the unzipped export folder for both.
    images_root, ann = project_export(tmp_path)
    folder = ann.parent
    res = read_cvat(folder, folder, "lots", root="data/lots")
    assert [s.path for s in res.samples][0] == "Train/cam1_0001.jpg"
    assert {s.root for s in res.samples} == {"data/lots/images"} and res.report.total == 0
    ann.rename(folder / "other.xml")  # the only XML in the folder is taken too
    assert len(read_cvat(images_root, folder, "lots").samples) == 4
    (folder / "more.xml").write_text("<annotations/>")
    with pytest.raises(DataError, match="looked for annotations.xml in it and found more.xml, other.xml"):
        read_cvat(images_root, folder, "lots")


def test_nothing_read_is_an_error_naming_what_and_where(tmp_path):
    images_root, ann = project_export(tmp_path)
    with pytest.raises(DataError, match="none of its 4 images was found under") as err:
        read_cvat(tmp_path / "elsewhere", ann, "lots")
    assert str(ann) in str(err.value) and "cam1_0001.jpg" in str(err.value)
    ann.write_text(document(PROJECT_META, ""))
    with pytest.raises(DataError, match="has no <image> elements"):
        read_cvat(images_root, ann, "lots")
    # Every shape lost (here: all undeclared) is an error too, not an unlabelled dataset.
    ann.write_text(document(PROJECT_META, PROJECT_IMAGES.replace('label="car"', 'label=""')
                            .replace('label="daytime"', 'label="night"')))
    with pytest.raises(DataError, match="all 2 shapes and tags were lost: label_undeclared: 2"):
        read_cvat(images_root, ann, "lots")


def test_project_export_with_images_in_one_folder(tmp_path):
    # Users often flatten an export; names are then looked up directly under the images root.
    images_root, ann = project_export(tmp_path)
    for sub in ("Train", "default"):
        for f in sorted((images_root / sub).iterdir()):
            f.rename(images_root / f.name)
    res = read_cvat(images_root, ann, "lots")
    assert [s.path for s in res.samples] == ["cam1_0001.jpg", "cam1_0002.jpg", "Validation/cam1_0001.jpg",
                                             "cam3_0001.jpg"]
    assert res.samples[0].attributes["split"] == "train" and res.report.total == 0


def test_policy_tables_document_every_kind():
    for kind in {**COMMON_POLICIES, **READ_POLICIES, **WRITE_POLICIES}:
        assert kind in cvat_module.__doc__, kind


# --- round trips ---------------------------------------------------------------------------

def assert_samples_equal(left: list[Sample], right: list[Sample]) -> None:
    assert [s.path for s in left] == [s.path for s in right]
    for a, b in zip(left, right):
        assert (a.width, a.height, a.sha256, a.labels, a.attributes) == (b.width, b.height, b.sha256, b.labels,
                                                                         b.attributes)
        assert len(a.instances) == len(b.instances)
        for i, j in zip(a.instances, b.instances):
            assert i.bbox == pytest.approx(j.bbox, rel=1e-6)
            assert (i.category_id, i.polygons, i.iscrowd, i.area, i.attributes) == \
                   (j.category_id, j.polygons, j.iscrowd, j.area, j.attributes)
            assert (i.rle is None) == (j.rle is None)
            if i.rle is not None:
                assert np.array_equal(full_mask(i.rle), full_mask(j.rle))


def test_round_trip_task_export(tmp_path):
    first = read_cvat(*task_export(tmp_path / "in"), "street")
    report = ConversionReport()
    out = write_cvat(first.samples, first.categories, tmp_path / "out", project_root=tmp_path, report=report)
    assert out == tmp_path / "out/annotations.xml" and report.total == 0
    doc = ET.parse(out).getroot()
    assert doc.findtext("version") == "1.1" and doc.find("meta/task") is not None
    assert [e.text for e in doc.findall("meta/task/labels/label/name")] == [c.name for c in first.categories]
    car_attrs = doc.findall("meta/task/labels/label")[0].findall("attributes/attribute/name")
    assert [e.text for e in car_attrs] == ["model", "parked"]
    mask = doc.find("image[@id='1']/mask")
    assert mask.get("rle") == cvat_rle(REGION) and (mask.get("left"), mask.get("top")) == ("10", "20")
    second = read_cvat(tmp_path / "out/images", out, "street")
    assert second.report.total == 0
    assert [(c.id, c.name) for c in second.categories] == [(c.id, c.name) for c in first.categories]
    assert_samples_equal(first.samples, second.samples)
    assert sha256_file(tmp_path / "out/images/city/frame_000001.jpg") == first.samples[1].sha256


def test_round_trip_project_export(tmp_path):
    first = read_cvat(*project_export(tmp_path / "in"), "lots")
    first.samples[1].group = "camera-1"  # a non-default group survives too
    out = write_cvat(first.samples, first.categories, tmp_path / "out", project_root=tmp_path)
    doc = ET.parse(out).getroot()
    assert doc.findtext("meta/project/subsets").split("\n") == ["Train", "Validation", "default"]
    assert [(e.get("subset"), e.get("task_id")) for e in doc.findall("image")] == [
        ("Train", "5"), ("Train", "5"), ("Validation", "6"), ("default", "8")]
    second = read_cvat(tmp_path / "out/images", out, "lots")
    assert second.report.total == 0
    assert_samples_equal(first.samples, second.samples)
    assert second.samples[1].group == "camera-1"


# --- writer losses -------------------------------------------------------------------------

def test_writer_counts_what_cvat_cannot_hold(tmp_path):
    make_image(tmp_path / "x.png", (64, 48))
    poly = [2.0, 2.0, 10.0, 2.0, 10.0, 10.0]
    mask = np.zeros((48, 64), dtype=np.uint8, order="F")
    mask[5:9, 30:40] = 1
    # column-major COCO counts: rows 5..8 of columns 30..39
    uncompressed = {"size": [48, 64], "counts": [30 * 48 + 5, 4] + [44, 4] * 9 + [48 * 64 - (39 * 48 + 9)]}
    insts = [
        Instance(bbox=[30, 5, 40, 9], category_id=7, rle=uncompressed, iscrowd=True, area=40.0),
        Instance(bbox=[2, 2, 21, 20], category_id=7, polygons=[poly, [12.0, 12.0, 20.0, 12.0, 20.0, 20.0]],
                 attributes={"score": 0.9, "occluded": True, "z_order": "high", "meta": {"k": 1}}),
        Instance(bbox=[1, 1, 5, 5], category_id=9, rle={"size": [48, 64], "counts": [48 * 64]}, polygons=[poly]),
    ]
    s = Sample(id="src/x.png", root=tmp_path.as_posix(), path="x.png", width=64, height=48,
               sha256=sha256_file(tmp_path / "x.png"), labels=[9], instances=insts,
               attributes={"license": 2, "bad name": "x", "split": "val"})
    cats = [Category(7, "thing"), Category(9, "other")]
    report = ConversionReport()
    out = write_cvat([s], cats, tmp_path / "out", report=report)
    # score and meta on each of the two rings, plus the image's license; z_order "high" and
    # "bad name" cannot be written; the second instance's box is wider than its rings.
    assert report.counts == {"crowd_dropped": 1, "area_dropped": 1, "attribute_stringified": 5,
                             "attribute_dropped": 2, "polygon_rings_split": 1, "polygons_dropped": 1,
                             "mask_empty": 1, "box_not_written": 1}
    assert set(report.counts) <= set(WRITE_POLICIES)
    assert all(report.examples[k] and "src/x.png" in report.examples[k][0] for k in report.counts)
    back = read_cvat(tmp_path / "out/images", out, "again")
    got = back.samples[0]
    assert got.attributes == {"license": "2", "split": "val"} and got.labels == [2]  # "other" is label 2 of 2
    assert np.array_equal(full_mask(got.instances[0].rle), mask)  # uncompressed RLE decoded, pixel-equal
    assert [i.polygons for i in got.instances[1:3]] == [[poly], [[12.0, 12.0, 20.0, 12.0, 20.0, 20.0]]]
    assert got.instances[1].attributes == {"occluded": True, "score": "0.9", "meta": '{"k": 1}'}
    assert got.instances[3].rle is None and got.instances[3].bbox == [1, 1, 5, 5]  # empty mask -> box


def test_writer_refuses_duplicate_paths_and_unknown_categories(tmp_path):
    first = read_cvat(*task_export(tmp_path / "in"), "street")
    twin = Sample(**{**first.samples[0].to_dict(), "instances": [], "id": "other/frame_000000.jpg"})
    with pytest.raises(ValueError, match="share the path 'frame_000000.jpg'"):
        write_cvat([first.samples[0], twin], first.categories, tmp_path / "dup", copy_images=False)
    with pytest.raises(ValueError, match="category id 1 is not in the category table"):
        write_cvat(first.samples, [], tmp_path / "nocat", copy_images=False)


# --- structural errors: DataError naming the file and the record ---------------------------

def test_malformed_xml_names_file_and_line(tmp_path):
    images_root, ann = task_export(tmp_path)
    text = ann.read_text().replace('<box label="car" source="auto"', '<box label="car" source=auto', 1)
    ann.write_text(text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "source=auto" in t)
    with pytest.raises(DataError, match="malformed XML") as err:
        read_cvat(images_root, ann, "s")
    assert str(ann) in str(err.value) and f"line {line}" in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("<dataset><image id='0' name='a.jpg'/></dataset>", "expected <annotations>"),
    ("<annotations><track id='0' label='car'/></annotations>", "CVAT for video"),
])
def test_not_cvat_for_images(tmp_path, text, message):
    ann = tmp_path / "annotations.xml"
    ann.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        read_cvat(tmp_path, ann, "s")
    assert str(ann) in str(err.value)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.jpg", "city/../../x.jpg", "city\\b.jpg", "C:/x.jpg", ""])
def test_unsafe_image_names_are_rejected(tmp_path, name):
    images_root, ann = task_export(tmp_path, TASK_IMAGES.replace('name="frame_000002.jpg"', f'name="{name}"'))
    with pytest.raises(DataError, match="unsafe image name") as err:
        read_cvat(images_root, ann, "s")
    assert str(ann) in str(err.value) and "image id 2" in str(err.value)


def test_symlink_escaping_the_root_is_rejected(tmp_path):
    outside = make_image(tmp_path / "secret/x.jpg")
    images_root, ann = task_export(tmp_path, TASK_IMAGES.replace('name="frame_000002.jpg"', 'name="link.jpg"'))
    (images_root / "link.jpg").symlink_to(outside)
    with pytest.raises(DataError, match="outside the images root") as err:
        read_cvat(images_root, ann, "s")
    assert str(ann) in str(err.value) and "image id 2" in str(err.value)


@pytest.mark.parametrize("old, new, record, message", [
    ('<image id="2"', '<image id="1"', "image id 1", "duplicate image id"),
    ('<image id="2"', '<image id="x"', "image id x", "malformed"),
    ('name="frame_000002.jpg"', 'name="frame_000000.jpg"', "image id 2", "also used by image id 0"),
    ('xtl="40.00"', 'xtl="forty"', "image id 1 <box> #1", "xtl='forty'"),
    ('points="0.00,30.00;', 'points="0.00;30.00,', "image id 0 <polygon> #1", "points="),
    ('points="0.00,30.00;', 'points="0.00,30.00,1.0;', "image id 0 <polygon> #1", "points="),
    ('left="10"', 'left="x"', "image id 1 <mask> #0", "left='x'"),
    ('occluded="1" xtl', 'occluded="maybe" xtl', "image id 1 <box> #1", "occluded"),
    ('z_order="2"', 'z_order="top"', "image id 1 <box> #1", "z_order"),
    ('<attribute name="model">suv', '<attribute name="occluded">suv', "image id 0 <box> #0", "clashes"),
])
def test_structural_errors_name_file_and_record(tmp_path, old, new, record, message):
    assert old in TASK_IMAGES
    images_root, ann = task_export(tmp_path, TASK_IMAGES.replace(old, new, 1))
    with pytest.raises(DataError, match=message) as err:
        read_cvat(images_root, ann, "s")
    assert str(ann) in str(err.value) and record in str(err.value)


def test_duplicate_label_in_meta(tmp_path):
    meta = TASK_META.replace("<name>lane</name>", "<name>car</name>")
    images_root, ann = task_export(tmp_path, meta=meta)
    with pytest.raises(DataError, match="declared twice") as err:
        read_cvat(images_root, ann, "s")
    assert str(ann) in str(err.value) and "label 'car'" in str(err.value)


# --- counted problems: the policy outcome, the count and an example naming file and id ------

def _counts_and_example(res, counts: dict, kind: str, *needles: str) -> None:
    assert res.report.counts == counts, res.report.counts
    example = res.report.examples[kind][0]
    for needle in needles:
        assert needle in example, example


UNSUPPORTED = {"shape_unsupported": 2}


@pytest.mark.parametrize("old, new, kind, check", [
    ('xbr="30.00"', 'xbr="1.50"', "box_degenerate", lambda s: len(s["frame_000000.jpg"].instances) == 1),
    ('xtl="40.00" ytl="10.00" xbr="60.00"', 'xtl="70.00" ytl="10.00" xbr="80.00"', "box_outside",
     lambda s: len(s["city/frame_000001.jpg"].instances) == 1),
    ('ybr="30.00"', 'ybr="60.00"', "box_clipped", lambda s: s["city/frame_000001.jpg"].instances[1].bbox[3] == 48),
    # One stray shape with an undeclared or empty label is counted, never fatal for the file.
    ('<mask label="road"', '<mask label="sidewalk"', "label_undeclared",
     lambda s: [i.category_id for i in s["city/frame_000001.jpg"].instances] == [1]),
    ('<tag label="daytime"', '<tag label=""', "label_undeclared", lambda s: s["frame_000000.jpg"].labels == []),
    ('points="0.00,30.00;63.00,30.00;63.00,47.00;0.00,47.00"', 'points="0.00,30.00;63.00,47.00"', "polygon_invalid",
     lambda s: s["frame_000000.jpg"].instances[1].polygons == [] and
     s["frame_000000.jpg"].instances[1].bbox == [0, 30, 63, 47]),
    (f'rle="{cvat_rle(REGION)}"', 'rle="3, 4, 5"', "mask_invalid",
     lambda s: [i.category_id for i in s["city/frame_000001.jpg"].instances] == [1]),
    ('<tag label="daytime" source="manual">',
     '<tag label="daytime" source="manual"><attribute name="sun">yes</attribute>', "tag_attribute_dropped", lambda s: s["frame_000000.jpg"].labels == [3]),
])
def test_counted_shape_problems(tmp_path, old, new, kind, check):
    assert old in TASK_IMAGES
    images_root, ann = task_export(tmp_path, TASK_IMAGES.replace(old, new, 1))
    res = read_cvat(images_root, ann, "s")
    assert check(by_path(res))
    _counts_and_example(res, {**UNSUPPORTED, kind: 1}, kind, str(ann), "image id")


def test_box_rotated_kept_as_oriented_box(tmp_path):
    images_root, ann = task_export(tmp_path, TASK_IMAGES.replace('z_order="2"', 'z_order="2" rotation="45"', 1))
    res = read_cvat(images_root, ann, "s")
    inst = by_path(res)["city/frame_000001.jpg"].instances[1]
    half = 10 * np.sqrt(2)  # a 20x20 square turned by 45 degrees (clockwise on screen) about (50, 20)
    assert inst.bbox == pytest.approx([50 - half, 20 - half, min(50 + half, 64), 20 + half])
    # The 4 corners from the turned top-left round: (40, 10) -> straight above the centre.
    assert inst.polygons == [pytest.approx([50, 20 - half, 50 + half, 20, 50, 20 + half, 50 - half, 20])]
    assert inst.attributes["obb"] is True
    assert res.report.counts == {**UNSUPPORTED, "box_clipped": 1}  # kept, not a loss; its box meets the edge
    # Written back as a <box rotation=...>, read again equal.
    back = read_cvat(tmp_path / "out" / "images", write_cvat(res.samples, res.categories, tmp_path / "out"), "s")
    again = by_path(back)["city/frame_000001.jpg"].instances[1]
    assert again.polygons == [pytest.approx(inst.polygons[0])] and again.attributes == inst.attributes
    assert 'rotation="45.0' in (tmp_path / "out" / "annotations.xml").read_text()


def test_mask_partly_outside_is_cropped_and_box_clipped(tmp_path):
    images_root, ann = task_export(tmp_path, TASK_IMAGES.replace('left="10" top="20"', 'left="60" top="46"', 1))
    res = read_cvat(images_root, ann, "s")
    inst = by_path(res)["city/frame_000001.jpg"].instances[0]
    want = np.zeros((48, 64), dtype=np.uint8)
    want[46:48, 60:64] = REGION[:2, :4]
    assert np.array_equal(full_mask(inst.rle), want) and inst.bbox == [60, 46, 64, 48]
    _counts_and_example(res, {**UNSUPPORTED, "box_clipped": 1}, "box_clipped", "image id 1")


def test_missing_image_skipped(tmp_path):
    images_root, ann = task_export(tmp_path)
    (images_root / "city/frame_000001.jpg").unlink()
    res = read_cvat(images_root, ann, "s")
    assert "city/frame_000001.jpg" not in by_path(res) and len(res.samples) == 2
    # The skipped image's skeleton is not counted: nothing of that image was read.
    _counts_and_example(res, {"image_missing": 1, "shape_unsupported": 1}, "image_missing", str(ann), "image id 1",
                        "city/frame_000001.jpg")


def test_declared_size_disagreeing_with_file_uses_file(tmp_path):
    images_root, ann = task_export(tmp_path, TASK_IMAGES.replace('width="64" height="48">\n  </image>',
                                                                 'width="640" height="480">\n  </image>'))
    res = read_cvat(images_root, ann, "s")
    assert (by_path(res)["frame_000002.jpg"].width, by_path(res)["frame_000002.jpg"].height) == (64, 48)
    _counts_and_example(res, {**UNSUPPORTED, "image_size_mismatch": 1}, "image_size_mismatch", "image id 2",
                        "640x480")


def test_unreadable_image_skipped_and_untouched(tmp_path):
    images_root, ann = task_export(tmp_path)
    target = images_root / "frame_000002.jpg"
    target.write_bytes(b"not an image")
    res = read_cvat(images_root, ann, "s")
    assert "frame_000002.jpg" not in by_path(res) and target.read_bytes() == b"not an image"
    _counts_and_example(res, {**UNSUPPORTED, "image_unreadable": 1}, "image_unreadable", str(ann), "image id 2")


def test_structure_is_checked_before_image_files(tmp_path):
    # A bad shape is an error even when its image is missing: nothing is half-read.
    images_root, ann = task_export(tmp_path, TASK_IMAGES.replace('xtl="40.00"', 'xtl=""', 1))
    (images_root / "city/frame_000001.jpg").unlink()
    with pytest.raises(DataError, match="xtl=''") as err:
        read_cvat(images_root, ann, "s")
    assert str(ann) in str(err.value) and "image id 1 <box> #1" in str(err.value)
    with pytest.raises(DataError, match="annotation file not found"):
        read_cvat(images_root, tmp_path / "nope.xml", "s")

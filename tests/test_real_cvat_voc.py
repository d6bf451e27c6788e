"""CVAT and Pascal VOC readers on REAL exports written by the tools (tests/data/real/, see its README).

Every expected number below was read from the export's own files, not from our reader:
shapes counted per element and label in annotations.xml (`grep -o '<box label="[^"]*"' | sort | uniq -c`
and the same for polygon/polyline/ellipse), VOC objects per class with
`cat *.xml | grep -o '<name>[^<]*</name>' | sort | uniq -c`, mask instances as the distinct colours of
the PNG (`np.unique` over its pixels), image sizes from the XML's width/height.
"""
from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from visionflow.core.errors import DataError
from visionflow.formats import read_source, write_format
from visionflow.formats.voc import read_voc

sys.path.insert(0, str(Path(__file__).parent))
from project import make_project  # noqa: E402

REAL = Path(__file__).parent / "data" / "real"
CVAT = REAL / "cvat-1.1-task-2label"
CVAT_VOC = REAL / "cvat-voc-1.1-2label"
LABELIMG = REAL / "labelimg-voc-2label"
CHESS = REAL / "roboflow-voc-chess"
DEVKIT = REAL / "voc-devkit-mmdet"


def per_class(res) -> dict[str, int]:
    names = {c.id: c.name for c in res.categories}
    return dict(collections.Counter(names[i.category_id] for s in res.samples for i in s.instances))


def by_path(res) -> dict:
    return {s.path: s for s in res.samples}


def pixels(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def content(res, ignore_instance: tuple[str, ...] = (), ignore_sample: tuple[str, ...] = ()) -> list:
    """What a round trip must keep: per image its file, size, split, labels and instances by class name."""
    names = {c.id: c.name for c in res.categories}
    out = []
    for s in sorted(res.samples, key=lambda s: s.path):
        out.append((s.path, s.sha256, s.width, s.height,
                    {k: v for k, v in s.attributes.items() if k not in ignore_sample},
                    sorted(names[c] for c in s.labels),
                    [(names[i.category_id], [round(v, 6) for v in i.bbox],
                      [[round(v, 6) for v in r] for r in i.polygons],
                      None if i.rle is None else int(pixels(i.rle).sum()), i.iscrowd,
                      {k: v for k, v in i.attributes.items() if k not in ignore_instance})
                     for i in s.instances]))
    return out


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionflow.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


# --- CVAT for images 1.1, task export (iteam1/2label datasets/cvat1.1) -------------------------

def test_cvat_task_export():
    # annotations.xml: 4 <image>; birds.jpg 2 <polygon label="bird">; crack.jpeg 1 <polyline label="crack">;
    # shapes.jpg <polygon triangle>, <polyline line>, <box rectangle>, 2 <ellipse label="ellipse">;
    # strawberry.jpg 17 <box label="strawberry">. <meta><task><subset>Test</subset>.
    res = read_source("cvat", CVAT, CVAT, "cvat")  # the export folder for both, as a user types it
    assert [c.name for c in res.categories] == ["rectangle", "triangle", "circle", "ellipse", "line", "crack",
                                                "bird", "strawberry"]
    assert per_class(res) == {"bird": 2, "triangle": 1, "rectangle": 1, "ellipse": 2, "strawberry": 17}
    # The 2 polylines are counted, not fatal; the 2 ellipses become polygons (counted).
    assert res.report.counts == {"shape_unsupported": 2, "ellipse_polygonised": 2}
    s = by_path(res)
    assert list(s) == ["birds.jpg", "crack.jpeg", "shapes.jpg", "strawberry.jpg"]
    assert [(x.width, x.height) for x in s.values()] == [(1000, 666), (1280, 720), (588, 643), (800, 800)]
    assert {x.attributes.get("split") for x in s.values()} == {"test"}  # the task's subset
    assert {x.root for x in s.values()} == {(CVAT / "images").as_posix()}
    rect, = [i for i in s["shapes.jpg"].instances if not i.polygons]
    assert rect.bbox == [45.80, 45.80, 230.61, 186.32]  # <box xtl="45.80" ytl="45.80" xbr="230.61" ybr="186.32">
    circle = next(i for i in s["shapes.jpg"].instances if i.polygons and len(i.polygons[0]) == 128)
    # <ellipse cx="447.89" cy="314.61" rx="82.09" ry="82.09">: its extent, and about pi r^2 of pixels.
    assert circle.bbox == pytest.approx([447.89 - 82.09, 314.61 - 82.09, 447.89 + 82.09, 314.61 + 82.09])
    area = mask_utils.area(mask_utils.frPyObjects(circle.polygons, 643, 588))
    assert area.sum() == pytest.approx(np.pi * 82.09 ** 2, rel=0.01)


def test_cvat_task_export_round_trip(tmp_path):
    res = read_source("cvat", CVAT / "images", CVAT / "annotations.xml", "cvat")
    target = write_format("cvat", res.samples, res.categories, tmp_path / "out")
    back = read_source("cvat", tmp_path / "out", target, "back")
    assert content(back) == content(res) and back.report.total == 0


def test_cvat_task_export_through_the_cli(tmp_path):
    make_project(tmp_path)
    out = cli("ingest", "--format", "cvat", "--images", str(CVAT), "--annotations", str(CVAT), "--out", "ing",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in (tmp_path / "ing/manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and sum(len(x["instances"]) for x in lines) == 23
    report = json.loads((tmp_path / "ing/validation.json").read_text())
    assert report["problems"]["shape_unsupported"]["count"] == 2
    # The images folder given as both: nothing is found, and the message says what and where.
    out = cli("ingest", "--format", "cvat", "--images", str(tmp_path / "nowhere"), "--annotations", str(CVAT),
              "--out", "ing2", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "none of its 4 images was found under" in out.stderr and "annotations.xml" in out.stderr


# --- CVAT "PASCAL VOC 1.1" export of the same task (iteam1/2label datasets/voc1.1) --------------

def test_cvat_voc_export_with_rgb_masks():
    # Annotations/: birds.xml and crack.xml 0 <object>, shapes.xml 1 (rectangle), strawberry.xml 17.
    # labelmap.txt: background:0,0,0 then 8 labels; ellipse:0,0,128. SegmentationObject/shapes.png (RGB)
    # has colours (128,0,0) x 21359 px and (0,128,0) x 26287 px (VOC palette 1 and 2, one per ellipse);
    # SegmentationClass/shapes.png has (0,0,128) = ellipse on exactly those pixels. No <object> for them.
    res = read_source("voc", CVAT_VOC / "JPEGImages", CVAT_VOC, "cvoc")
    assert res.report.total == 0, res.report.lines()
    assert [(c.id, c.name) for c in res.categories][:4] == [(1, "rectangle"), (2, "triangle"), (3, "circle"),
                                                            (4, "ellipse")]
    assert per_class(res) == {"rectangle": 1, "ellipse": 2, "strawberry": 17}
    s = by_path(res)
    rect, *ellipses = s["shapes.jpg"].instances
    assert sorted(int(pixels(e.rle).sum()) for e in ellipses) == [21359, 26287] and rect.rle is None
    # 0-based, as written: the same numbers as CVAT's own XML for this task (<box xtl="45.80" ...>).
    assert rect.bbox == [45.8, 45.8, 230.61, 186.32]
    cvat = by_path(read_source("cvat", CVAT / "images", CVAT / "annotations.xml", "cvat"))
    assert [i.bbox for i in s["strawberry.jpg"].instances] == [i.bbox for i in cvat["strawberry.jpg"].instances]
    # ImageSets/Main/default.txt: CVAT's "default" subset is not a split.
    assert all("split" not in x.attributes for x in res.samples)


def test_cvat_voc_export_round_trip(tmp_path):
    res = read_source("voc", CVAT_VOC / "JPEGImages", CVAT_VOC, "cvoc")
    out = write_format("voc", res.samples, res.categories, tmp_path / "out")
    back = read_source("voc", out / "JPEGImages", out, "back")
    # Our writer adds VOC's defaults CVAT left out (<pose>, <truncated>, <difficult>, <depth>3).
    defaults = ("pose", "truncated", "difficult")
    assert content(back, defaults, ("depth",)) == content(res, defaults, ("depth",))
    assert back.report.total == 0


# --- LabelImg (iteam1/2label datasets/labelImg): XML beside each image ------------------------

def test_labelimg_flat_folder():
    # birds.xml 2 bird; crack.xml 1 crack; shapes.xml rectangle, ellipse, line, triangle, circle;
    # strawberry.xml 17 strawberry. shapes.xml's rectangle: <xmin>42</xmin><ymin>43</ymin><xmax>233</xmax><ymax>189</ymax>.
    res = read_source("voc", LABELIMG, LABELIMG, "li")
    assert per_class(res) == {"bird": 2, "crack": 1, "rectangle": 1, "ellipse": 1, "line": 1, "triangle": 1,
                              "circle": 1, "strawberry": 17}
    assert len(res.samples) == 4 and res.report.total == 0
    ids = {c.name: c.id for c in res.categories}
    rect = next(i for i in by_path(res)["shapes.jpg"].instances if i.category_id == ids["rectangle"])
    assert rect.bbox == [42, 43, 233, 189]  # LabelImg writes its canvas coordinates: 0-based


def test_labelimg_round_trip(tmp_path):
    res = read_source("voc", LABELIMG, LABELIMG, "li")
    out = write_format("voc", res.samples, res.categories, tmp_path / "out")
    back = read_source("voc", out / "JPEGImages", out, "back")
    assert content(back) == content(res) and back.report.total == 0


# --- Roboflow VOC (roboflow/roboflow-python tests/datasets/chess) -----------------------------

CHESS_CLASSES = {"black-bishop": 8, "black-king": 10, "black-knight": 11, "black-pawn": 43, "black-queen": 5,
                 "black-rook": 12, "white-bishop": 12, "white-king": 10, "white-knight": 10, "white-pawn": 40,
                 "white-queen": 8, "white-rook": 11}


def test_roboflow_chess_flat_export():
    # 12 .jpg, 11 .xml (no 5c1.xml); 0af.xml says <filename>0af.jpg</filename> for 0AF.jpg; the other
    # ten say <filename>c78</filename> etc., without extension. 180 <object>s, counts in CHESS_CLASSES.
    res = read_source("voc", CHESS, CHESS, "chess")
    assert per_class(res) == CHESS_CLASSES and sum(CHESS_CLASSES.values()) == 180
    s = by_path(res)
    assert len(s) == 11 and "0AF.jpg" in s and "c78.jpg" in s
    assert {(x.width, x.height) for x in s.values()} == {(765, 512)}
    assert res.report.counts == {"image_unannotated": 1} and "5c1.jpg" in res.report.examples["image_unannotated"][0]
    # c78.xml: <xmin>443</xmin><xmax>483</xmax><ymin>93</ymin><ymax>159</ymax>, read as written (0-based).
    assert s["c78.jpg"].instances[0].bbox == [443, 93, 483, 159]


def test_roboflow_split_folders(tmp_path):
    # Roboflow's VOC download puts each split's XMLs beside its images in train/, valid/, test/.
    # Built here from the real chess files (the repository has no split VOC export).
    for split, stems in {"train": ["1be", "55b", "a97"], "valid": ["c78"], "test": ["d9a", "e40"]}.items():
        (tmp_path / split).mkdir()
        for stem in stems:
            shutil.copy(CHESS / f"{stem}.xml", tmp_path / split)
            shutil.copy(CHESS / f"{stem}.jpg", tmp_path / split)
    res = read_source("voc", tmp_path, tmp_path, "rf")
    splits = {s.path: s.attributes["split"] for s in res.samples}
    assert splits == {"test/d9a.jpg": "test", "test/e40.jpg": "test", "train/1be.jpg": "train",
                      "train/55b.jpg": "train", "train/a97.jpg": "train", "valid/c78.jpg": "val"}
    assert sum(len(s.instances) for s in res.samples) == 8 + 12 + 32 + 1 + 10 + 16  # <object>s per XML
    out = write_format("voc", res.samples, res.categories, tmp_path / "out")
    back = read_source("voc", out / "JPEGImages", out, "back")
    # VOC names are flat: the split folder becomes part of the name (counted by the writer).
    assert [(s.path.replace("__", "/"), s.attributes["split"]) for s in back.samples] == sorted(splits.items())


def test_empty_results_are_errors(tmp_path):
    with pytest.raises(DataError, match="no VOC XML files: looked for"):
        read_source("voc", tmp_path, tmp_path, "x")  # e.g. a labelme folder
    with pytest.raises(DataError, match="none of the images named by its 11 XML files was found under"):
        read_source("voc", tmp_path, CHESS, "x")  # wrong images folder


# --- the devkit's own XML (open-mmlab/mmdetection tests/data/VOCdevkit) -------------------------

def test_devkit_xml_is_one_based(tmp_path):
    # 000001.xml: <database>The VOC2007 Database</database>, <filename>000002.jpg</filename>, 335x500,
    # one train: <xmin>139</xmin><ymin>200</ymin><xmax>207</xmax><ymax>301</ymax>. Image not vendored:
    # a stand-in of the declared size.
    shutil.copytree(DEVKIT, tmp_path / "voc")
    (tmp_path / "voc/JPEGImages").mkdir()
    Image.new("RGB", (335, 500)).save(tmp_path / "voc/JPEGImages/000002.jpg")
    res = read_voc(tmp_path / "voc/JPEGImages", tmp_path / "voc", "dk")
    assert res.samples[0].instances[0].bbox == [138, 199, 207, 301]  # 1-based inclusive -> 0-based
    forced = read_voc(tmp_path / "voc/JPEGImages", tmp_path / "voc", "dk", coordinates="0-based")
    assert forced.samples[0].instances[0].bbox == [139, 200, 207, 301]
    out = write_format("voc", res.samples, res.categories, tmp_path / "out")
    assert "<xmin>139</xmin>" in (out / "Annotations/000002.xml").read_text()  # written back 1-based
    back = read_source("voc", out / "JPEGImages", out, "back")
    assert content(back) == content(res)

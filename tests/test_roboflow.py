"""Roboflow's COCO layout: one _annotations.coco.json per split folder, images beside it."""
import json
from pathlib import Path

import pytest
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.formats import read_source


def _split(root: Path, name: str, files: list[str], cats=((0, "shapes", "none"), (1, "circle", "shapes"))):
    d = root / name
    d.mkdir(parents=True)
    images, anns = [], []
    for i, f in enumerate(files, 1):
        Image.new("RGB", (40, 30), (i * 50, 10, 10)).save(d / f)
        images.append({"id": i - 1, "license": 1, "file_name": f, "height": 30, "width": 40,
                       "date_captured": "2024-05-01T10:00:00+00:00"})
        anns.append({"id": i - 1, "image_id": i - 1, "category_id": 1, "bbox": [2, 3, 10, 12], "area": 120,
                     "segmentation": [], "iscrowd": 0})
    doc = {"info": {"year": "2024", "version": "1", "description": "Exported from roboflow.com"},
           "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}],
           "categories": [{"id": i, "name": n, "supercategory": s} for i, n, s in cats],
           "images": images, "annotations": anns}
    (d / "_annotations.coco.json").write_text(json.dumps(doc))


def test_roboflow_export_reads_every_split(tmp_path):
    _split(tmp_path, "train", ["a_jpg.rf.123.jpg", "b_jpg.rf.456.jpg"])
    _split(tmp_path, "valid", ["c_jpg.rf.789.jpg"])
    _split(tmp_path, "test", ["a_jpg.rf.123.jpg"])  # same file name in another split: distinct sample
    res = read_source("coco", tmp_path, tmp_path, "rf", root="data/rf")
    by_id = {s.id: s for s in res.samples}
    assert sorted(by_id) == ["rf/test/a_jpg.rf.123.jpg", "rf/train/a_jpg.rf.123.jpg", "rf/train/b_jpg.rf.456.jpg",
                             "rf/valid/c_jpg.rf.789.jpg"]
    assert by_id["rf/valid/c_jpg.rf.789.jpg"].attributes["split"] == "val"
    assert by_id["rf/test/a_jpg.rf.123.jpg"].path == "test/a_jpg.rf.123.jpg"
    assert by_id["rf/train/b_jpg.rf.456.jpg"].instances[0].bbox == [2, 3, 12, 15]
    assert {s.root for s in res.samples} == {"data/rf"}
    assert [c.name for c in res.categories] == ["shapes", "circle"]


def test_roboflow_splits_must_share_one_category_table(tmp_path):
    _split(tmp_path, "train", ["a.jpg"])
    _split(tmp_path, "valid", ["b.jpg"], cats=((0, "shapes", "none"), (1, "square", "shapes")))
    with pytest.raises(DataError, match="valid/_annotations.coco.json.*category table differs"):
        read_source("coco", tmp_path, tmp_path, "rf")


def test_folder_without_split_files_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no <split>/_annotations.coco.json"):
        read_source("coco", tmp_path, tmp_path, "rf")

"""FiftyOne's own exporters (the FiftyOne installed here, on its real database) write a small
detection dataset as COCO, Pascal VOC, CVAT, YOLOv4 and YOLOv5; `visionflow init` / `ingest
FOLDER` detect each export folder as the format it is and read back every box.

FiftyOne lays its exports out its own way: media in `data/` beside `labels.json`, `labels.xml`
or `labels/` (VOC XMLs), YOLOv4's `obj.names` + `images.txt` with each label beside its image
in `data/`. Those used to be taken for an ImageFolder with a class called "data". FiftyOne's
own formats (FiftyOneImageDetectionDataset, KITTI), which visionflow does not read, are refused
in one line, not read as class folders.

Expected boxes are FiftyOne's relative [x, y, w, h] times each image's size, computed here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.core.errors import DataError, UserError
from visionflow.formats import read_source
from visionflow.formats.detect import detect_source

fo = pytest.importorskip("fiftyone")
fot = pytest.importorskip("fiftyone.types")

# (export folder, FiftyOne dataset type, the format visionflow detects, box tolerance in pixels:
# FiftyOne's VOC writer truncates to whole pixels, its CVAT writer rounds to them)
EXPORTS = [("coco", "COCODetectionDataset", "coco", 1e-3), ("voc", "VOCDetectionDataset", "voc", 1.0),
           ("cvat", "CVATImageDataset", "cvat", 0.5), ("yolov4", "YOLOv4Dataset", "yolo", 1e-3),
           ("yolov5", "YOLOv5Dataset", "yolo", 1e-3)]
BOXES = [[0.113, 0.127, 0.251, 0.303], [0.402, 0.221, 0.187, 0.349], [0.61, 0.55, 0.33, 0.41]]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """6 photos (landscape and portrait) with 1-3 boxes each, exported by FiftyOne."""
    out = tmp_path_factory.mktemp("fiftyone-exports")
    rng = np.random.default_rng(0)
    samples, expected = [], {}
    for i in range(6):
        w, h = (320, 240) if i % 2 else (240, 320)
        path = out / "src" / f"photo_{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        boxes = [(["cat", "dog"][j % 2], BOXES[j]) for j in range(1 + i % 3)]
        dets = [fo.Detection(label=label, bounding_box=box) for label, box in boxes]
        samples.append(fo.Sample(filepath=str(path), ground_truth=fo.Detections(detections=dets),
                                 tags=["train" if i < 4 else "val"]))
        expected[path.name] = [(label, [x * w, y * h, (x + bw) * w, (y + bh) * h]) for label, (x, y, bw, bh) in boxes]
    name = f"visionflow-test-exports-{out.name}"
    dataset = fo.Dataset(name)
    try:
        dataset.add_samples(samples)
        for folder, kind, _, _ in EXPORTS:
            if kind == "YOLOv5Dataset":  # one export folder, a split per call
                for split in ("train", "val"):
                    dataset.match_tags(split).export(export_dir=str(out / folder), dataset_type=fot.YOLOv5Dataset,
                                                     label_field="ground_truth", split=split)
            else:
                dataset.export(export_dir=str(out / folder), dataset_type=getattr(fot, kind),
                               label_field="ground_truth")
        for folder, kind in (("fo-detection", "FiftyOneImageDetectionDataset"), ("kitti", "KITTIDetectionDataset")):
            dataset.export(export_dir=str(out / folder), dataset_type=getattr(fot, kind), label_field="ground_truth")
    finally:
        dataset.delete()
    return out, expected


@pytest.mark.parametrize("folder, fmt, tolerance", [(f, fmt, tol) for f, _, fmt, tol in EXPORTS])
def test_each_fiftyone_export_is_detected_and_every_box_read(exports, folder, fmt, tolerance):
    out, expected = exports
    found = detect_source(out / folder)
    assert found.format == fmt, found.describe()
    result = read_source(found.format, found.images, found.annotations, "fo")
    assert result.report.total == 0, result.report.lines()
    names = {c.id: c.name for c in result.categories}
    got = {Path(s.path).name: [(names[i.category_id], i.bbox) for i in s.instances] for s in result.samples}
    assert set(got) == set(expected)
    for image, boxes in expected.items():
        assert [label for label, _ in got[image]] == [label for label, _ in boxes], image
        for (_, box), (_, want) in zip(got[image], boxes):
            assert box == pytest.approx(want, abs=tolerance), image
    if folder == "yolov5":
        assert {s.attributes.get("split") for s in result.samples} == {"train", "val"}


@pytest.mark.parametrize("folder", ["fo-detection", "kitti"])
def test_fiftyone_formats_visionflow_does_not_read_are_refused_not_taken_for_class_folders(exports, folder):
    out, _ = exports
    with pytest.raises(UserError, match="no annotation format recognised"):
        detect_source(out / folder)


def test_fiftyone_segmentation_export_is_detected_as_masks_and_asks_for_its_class_table(tmp_path):
    """ImageSegmentationDirectory: data/ + labels/<name>.png holding the class values, and no
    class table (FiftyOne keeps the classes in the dataset): read once one is given."""
    mask = np.zeros((40, 60), np.uint8)
    mask[5:20, 10:30] = 1
    mask[25:35, 40:55] = 2
    Image.new("RGB", (60, 40), (90, 90, 90)).save(tmp_path / "photo.jpg")
    dataset = fo.Dataset(f"visionflow-test-seg-{tmp_path.name}")
    try:
        dataset.add_sample(fo.Sample(filepath=str(tmp_path / "photo.jpg"), truth=fo.Segmentation(mask=mask)))
        dataset.export(export_dir=str(tmp_path / "seg"), dataset_type=fot.ImageSegmentationDirectory,
                       label_field="truth")
    finally:
        dataset.delete()
    found = detect_source(tmp_path / "seg")
    assert (found.format, found.images.name, found.annotations.name) == ("masks", "data", "labels")
    with pytest.raises(DataError, match=r"labels: no class table found"):
        read_source(found.format, found.images, found.annotations, "fo")
    (tmp_path / "seg/classes.txt").write_text("background\nroad\ncar\n")
    result = read_source(found.format, found.images, found.annotations, "fo")
    (sample,) = result.samples
    assert [(c.id, c.name) for c in result.categories] == [(1, "road"), (2, "car")]
    assert [(i.category_id, i.bbox, i.area) for i in sample.instances] == [(1, [10.0, 5.0, 30.0, 20.0], 300.0),
                                                                          (2, [40.0, 25.0, 55.0, 35.0], 150.0)]

"""PNG semantic masks reader/writer on tiny VOC/ADE-like datasets generated in tmp_path."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.formats import ConversionReport
from visionflow.manifest.images import sha256_file
from visionflow.formats.masks import PALETTE, decode_rle, encode_rle, read_masks, write_masks
from visionflow.manifest import Category, Instance, Sample

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


def make_image(path: Path, size=(40, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path, format=fmt)
    return path


def save_mask(path: Path, values: np.ndarray, mode: str = "P") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        img = Image.frombytes("P", values.shape[::-1], values.astype(np.uint8).tobytes())
        img.putpalette(PALETTE)
    elif mode == "I;16":
        img = Image.fromarray(values.astype(np.uint16))
    else:
        img = Image.fromarray(values.astype(np.uint8))
    img.save(path)
    return path


def voc_masks() -> dict[str, np.ndarray]:
    """Two 40x30 masks the way VOC draws them: background 0, objects, a 255 'void' outline."""
    a = np.zeros((30, 40), np.uint8)
    a[5:20, 8:30] = 1          # aeroplane
    a[4, 7:31] = 255           # void border above it
    a[22:28, 2:6] = 15         # person
    b = np.zeros((30, 40), np.uint8)
    b[10:25, 10:20] = 15
    b[0, 0] = 255
    return {"2007_000032": a, "2007_000033": b}


def voc_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """VOCdevkit/VOC2012 layout: JPEGImages/*.jpg, SegmentationClass/*.png (palette), one image
    without a mask (as most of VOC's JPEGImages), classes.txt next to SegmentationClass."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for stem, values in voc_masks().items():
        make_image(voc / "JPEGImages" / f"{stem}.jpg")
        save_mask(voc / "SegmentationClass" / f"{stem}.png", values)
    make_image(voc / "JPEGImages" / "2007_000039.jpg")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000033\n")
    (voc / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    return voc / "JPEGImages", voc / "SegmentationClass"


def mask_of(sample: Sample, uncovered: int = 254) -> np.ndarray:
    """Rebuild the class-value mask from a sample's instances and ignore region (pixels no
    instance covers: `uncovered`; 0 for a table whose value 0 is the background)."""
    values = np.full((sample.height, sample.width), uncovered, np.uint8)
    for inst in sample.instances:
        values[decode_rle(inst.rle, sample.height, sample.width, sample.id)] = inst.category_id
    if "ignore_rle" in sample.attributes:
        values[decode_rle(sample.attributes["ignore_rle"], sample.height, sample.width, sample.id)] = 255
    return values


def by_path(result) -> dict[str, Sample]:
    return {s.path: s for s in result.samples}


# --- reading -------------------------------------------------------------------------------

def test_read_voc_export(tmp_path):
    images, masks = voc_dataset(tmp_path)
    res = read_masks(images, masks, "voc")
    # value 0, named background, is the unlabelled region, no category (as the VOC reader has it)
    assert [(c.id, c.name, c.source_ids) for c in res.categories][:2] == [(1, "aeroplane", {"voc": 1}),
                                                                        (2, "bicycle", {"voc": 2})]
    assert [c.name for c in res.categories] == VOC_CLASSES[1:]
    s = by_path(res)
    a = s["2007_000032.jpg"]
    assert a.id == "voc/2007_000032.jpg" and a.root == images.as_posix() and (a.width, a.height) == (40, 30)
    assert a.sha256 == sha256_file(images / "2007_000032.jpg") and a.group == a.id
    assert [i.category_id for i in a.instances] == [1, 15]
    plane = a.instances[0]
    assert plane.bbox == [8.0, 5.0, 30.0, 20.0] and plane.area == 15 * 22  # x2 = last column + 1
    assert plane.iscrowd is False and plane.attributes == {"semantic": True} and plane.polygons == []
    assert isinstance(plane.rle["counts"], str) and plane.rle["size"] == [30, 40]
    assert (mask_of(a, uncovered=0) == voc_masks()["2007_000032"]).all()
    assert (mask_of(a) == 254).sum() == (voc_masks()["2007_000032"] == 0).sum()  # background: in no region
    assert a.instances[1].bbox == [2.0, 22.0, 6.0, 28.0]
    # Image without a mask: kept, no instances, counted with the mask path it looked for.
    c = s["2007_000039.jpg"]
    assert c.instances == [] and c.attributes == {}
    assert res.report.counts == {"mask_missing": 1}
    assert "2007_000039.jpg" in res.report.examples["mask_missing"][0]
    assert "SegmentationClass/2007_000039.png" in res.report.examples["mask_missing"][0]


def test_round_trip_masks_pixel_equal(tmp_path):
    images, masks = voc_dataset(tmp_path / "in")
    first = read_masks(images, masks, "voc")
    report = ConversionReport()
    out = write_masks(first.samples, first.categories, tmp_path / "out", project_root=tmp_path, report=report)
    assert out == tmp_path / "out" / "masks" and report.total == 0  # semantic masks lose nothing
    assert (tmp_path / "out/classes.txt").read_text().splitlines() == VOC_CLASSES
    for stem, values in voc_masks().items():
        with Image.open(out / f"{stem}.png") as img:
            assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]  # VOC colours
            assert (np.asarray(img) == values).all()
    assert not (out / "2007_000039.png").exists()  # no mask -> none written, reads back the same
    second = read_masks(tmp_path / "out/images", out, "voc")
    assert second.report.counts == first.report.counts
    assert [(c.id, c.name) for c in second.categories] == [(c.id, c.name) for c in first.categories]
    assert len(second.samples) == len(first.samples) == 3
    for x, y in zip(first.samples, second.samples):
        assert (x.id, x.path, x.width, x.height, x.sha256, x.attributes) == \
               (y.id, y.path, y.width, y.height, y.sha256, y.attributes)
        assert [(i.category_id, i.rle, i.area, i.attributes) for i in x.instances] == \
               [(i.category_id, i.rle, i.area, i.attributes) for i in y.instances]
        for i, j in zip(x.instances, y.instances):
            assert i.bbox == pytest.approx(j.bbox, rel=1e-6)
        assert (mask_of(x) == mask_of(y)).all()


def test_ade_like_greyscale_masks_json_table_inside_folder(tmp_path):
    """ADEChallengeData2016 layout: images/training/*.jpg, annotations/training/*.png ('L'),
    here with a JSON mapping (non-contiguous values) inside the masks folder."""
    ade = tmp_path / "ADEChallengeData2016"
    make_image(ade / "images/training/ADE_train_00000001.jpg", (16, 12))
    values = np.zeros((12, 16), np.uint8)
    values[2:6, 3:9] = 7
    values[8:, :] = 12
    save_mask(ade / "annotations/training/ADE_train_00000001.png", values, mode="L")
    (ade / "annotations/classes.json").write_text(json.dumps({"0": "other", "7": "bed", "12": "floor"}))
    res = read_masks(ade / "images", ade / "annotations", "ade")
    assert [(c.id, c.name) for c in res.categories] == [(0, "other"), (7, "bed"), (12, "floor")]
    s = res.samples[0]
    assert s.path == "training/ADE_train_00000001.jpg" and [i.category_id for i in s.instances] == [0, 7, 12]
    assert "ignore_rle" not in s.attributes and res.report.total == 0
    # Written VOC-style: 0 background (no pixel here), the categories 1..K in id order; read back,
    # every pixel has its class name again.
    out = write_masks(res.samples, res.categories, tmp_path / "out", project_root=tmp_path)
    assert (tmp_path / "out/classes.txt").read_text().splitlines() == ["background", "other", "bed", "floor"]
    again = read_masks(tmp_path / "out/images", out, "ade")
    assert [(c.id, c.name) for c in again.categories] == [(1, "other"), (2, "bed"), (3, "floor")]
    assert (mask_of(again.samples[0]) == np.array([1, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 3], np.uint8)[values]).all()


def test_yaml_list_table_and_16bit_masks(tmp_path):
    make_image(tmp_path / "img/x.png", (8, 6))
    values = np.zeros((6, 8), np.uint16)
    values[1:3, 1:3] = 2
    save_mask(tmp_path / "masks/x.png", values, mode="I;16")
    (tmp_path / "classes.yaml").write_text("- sky\n- road\n- car\n")
    res = read_masks(tmp_path / "img", tmp_path / "masks", "s")  # 16-bit values taken as they are
    assert [i.category_id for i in res.samples[0].instances] == [0, 2]
    values[0, 0] = 300
    save_mask(tmp_path / "masks/x.png", values, mode="I;16")
    with pytest.raises(DataError, match=r"masks/x\.png.*outside the class table.*: 300 \(1 px\)"):
        read_masks(tmp_path / "img", tmp_path / "masks", "s")


def test_rgb_colour_masks(tmp_path):
    make_image(tmp_path / "img/x.jpg", (6, 4))
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, 3:] = (220, 20, 60)
    rgb[0, 0] = (255, 255, 255)
    (tmp_path / "masks").mkdir()
    Image.fromarray(rgb).save(tmp_path / "masks/x.png")  # colour masks, Cityscapes *_color.png style
    table = {"0": {"name": "road", "color": [0, 0, 0]}, "1": {"name": "person", "color": [220, 20, 60]},
             "255": {"name": "void", "color": [255, 255, 255]}}
    (tmp_path / "classes.json").write_text(json.dumps(table))
    res = read_masks(tmp_path / "img", tmp_path / "masks", "city")
    assert [c.name for c in res.categories] == ["road", "person"]  # 255 only names the ignore colour
    s = res.samples[0]
    assert [(i.category_id, i.bbox) for i in s.instances] == [(0, [0.0, 0.0, 3.0, 4.0]), (1, [3.0, 0.0, 6.0, 4.0])]
    assert decode_rle(s.attributes["ignore_rle"], 4, 6, "x")[0, 0]
    del table["255"]
    (tmp_path / "classes.json").write_text(json.dumps(table))
    with pytest.raises(DataError, match=r"x\.png.*colours not in the class table.*\[255, 255, 255\] \(1 px\)"):
        read_masks(tmp_path / "img", tmp_path / "masks", "city")
    (tmp_path / "classes.json").write_text(json.dumps(["road", "person"]))
    with pytest.raises(DataError, match=r"x\.png.*RGB mask, but the class table .*classes\.json gives no colours"):
        read_masks(tmp_path / "img", tmp_path / "masks", "city")


def test_cvat_labelmap_is_a_class_table_for_palette_and_rgb_masks(tmp_path):
    """CVAT's and Datumaro's labelmap.txt: `name:r,g,b:parts:actions`, comments left out; the
    line index is a palette mask's value, the colour an RGB mask's."""
    make_image(tmp_path / "img/x.jpg", (6, 4))
    make_image(tmp_path / "img/y.jpg", (6, 4))
    (tmp_path / "masks").mkdir()
    palette = np.zeros((4, 6), np.uint8)
    palette[:, 4:] = 2
    save_mask(tmp_path / "masks/x.png", palette)
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[1:, :2] = (250, 50, 83)
    Image.fromarray(rgb).save(tmp_path / "masks/y.png")
    (tmp_path / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\n"
                                           "tool:250,50,83::\nhand:0,128,0:finger:\n")
    res = read_masks(tmp_path / "img", tmp_path / "masks", "cvat")
    assert [(c.id, c.name) for c in res.categories] == [(1, "tool"), (2, "hand")]  # background: no category
    by_path = {s.path: s for s in res.samples}
    assert [(i.category_id, i.bbox) for i in by_path["x.jpg"].instances] == [(2, [4.0, 0.0, 6.0, 4.0])]
    assert [(i.category_id, i.bbox) for i in by_path["y.jpg"].instances] == [(1, [0.0, 1.0, 2.0, 4.0])]


@pytest.mark.parametrize("name", ["background", "_background_", "__background__", "BG", "Background"])
def test_value_0_named_background_is_no_category(tmp_path, name):
    """labelme's VOC export writes `_background_`, torchvision `__background__`: value 0 with a
    background name is the unlabelled region; a value 0 with another name is a class."""
    make_image(tmp_path / "img/x.png", (6, 4))
    values = np.zeros((4, 6), np.uint8)
    values[1:3, 1:4] = 1
    save_mask(tmp_path / "masks/x.png", values)
    (tmp_path / "classes.txt").write_text(f"{name}\nthing\n")
    res = read_masks(tmp_path / "img", tmp_path / "masks", "s")
    assert [(c.id, c.name) for c in res.categories] == [(1, "thing")]
    assert [(i.category_id, i.bbox) for i in res.samples[0].instances] == [(1, [1.0, 1.0, 4.0, 3.0])]
    (tmp_path / "classes.txt").write_text("road\nthing\n")
    res = read_masks(tmp_path / "img", tmp_path / "masks", "s")
    assert [c.name for c in res.categories] == ["road", "thing"]
    assert [i.category_id for i in res.samples[0].instances] == [0, 1]


def test_only_background_is_refused_naming_the_table_or_the_masks(tmp_path):
    make_image(tmp_path / "img/x.png", (6, 4))
    save_mask(tmp_path / "masks/x.png", np.zeros((4, 6), np.uint8))
    (tmp_path / "classes.txt").write_text("background\n")
    with pytest.raises(DataError, match=r"classes\.txt: the class table names only the background \('background' "
                                        r"at value 0\)"):
        read_masks(tmp_path / "img", tmp_path / "masks", "s")
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    with pytest.raises(DataError, match=r"masks: all 1 masks read hold only the background \(value 0, 'background' "
                                        r"in classes\.txt\) or the ignore value 255"):
        read_masks(tmp_path / "img", tmp_path / "masks", "s")
    values = np.zeros((4, 6), np.uint8)
    values[0, 0] = 1
    save_mask(tmp_path / "masks/x.png", values)
    make_image(tmp_path / "img/empty.png", (6, 4))
    save_mask(tmp_path / "masks/empty.png", np.zeros((4, 6), np.uint8))
    res = read_masks(tmp_path / "img", tmp_path / "masks", "s")  # a background-only image is a sample
    assert {s.path: len(s.instances) for s in res.samples} == {"empty.png": 0, "x.png": 1}
    assert res.report.total == 0


# --- validation ----------------------------------------------------------------------------

def small_dataset(tmp_path: Path) -> tuple[Path, Path]:
    make_image(tmp_path / "img/a/x.jpg", (8, 6))
    save_mask(tmp_path / "masks/a/x.png", np.ones((6, 8), np.uint8))
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    return tmp_path / "img", tmp_path / "masks"


def test_values_outside_class_table_named_with_counts(tmp_path):
    images, masks = small_dataset(tmp_path)
    values = np.ones((6, 8), np.uint8)
    values[0, :3] = 9
    values[5, 5] = 254
    values[2, 2] = 255  # ignore is always allowed
    save_mask(masks / "a/x.png", values)
    with pytest.raises(DataError, match=r"masks/a/x\.png: pixel values outside the class table .*classes\.txt: "
                                        r"9 \(3 px\), 254 \(1 px\)"):
        read_masks(images, masks, "s")


def test_orphan_non_png_and_size_mismatch_are_counted(tmp_path):
    images, masks = small_dataset(tmp_path)
    save_mask(masks / "a/ghost.png", np.ones((6, 8), np.uint8))
    make_image(masks / "a/lossy.jpg", (8, 6))
    make_image(images / "b.png", (8, 6))
    save_mask(masks / "b.png", np.ones((7, 8), np.uint8))
    res = read_masks(images, masks, "s")
    assert [s.path for s in res.samples] == ["a/x.jpg"]  # b.png skipped: its mask has the wrong size
    assert res.report.counts == {"mask_orphan": 1, "mask_not_png": 1, "mask_size_mismatch": 1}
    ex = res.report.examples
    assert "masks/a/ghost.png" in ex["mask_orphan"][0] and "masks/a/lossy.jpg" in ex["mask_not_png"][0]
    assert "masks/b.png is 8x7" in ex["mask_size_mismatch"][0] and "img/b.png is 8x6" in ex["mask_size_mismatch"][0]


def test_unreadable_and_non_png_masks(tmp_path):
    images, masks = small_dataset(tmp_path)
    (masks / "a/x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"masks/a/x\.png: not a readable PNG mask"):
        read_masks(images, masks, "s")
    make_image(masks / "a/x.png", (8, 6), fmt="JPEG")  # a JPEG named .png
    with pytest.raises(DataError, match=r"masks/a/x\.png: mask is a JPEG file, not a PNG"):
        read_masks(images, masks, "s")


@pytest.mark.parametrize("name, text, match", [
    ("classes.txt", "background\n\nthing\n", r"classes\.txt \[line 2\]: empty class name"),
    ("classes.json", '{"0": "a", "1": "a"}', r"classes\.json \[class 1\]: duplicate class name 'a'"),
    ("classes.json", '["a", "b",]', r"classes\.json \[line 1, column 11\]: invalid JSON"),
    ("classes.json", '{"300": "a"}', r"classes\.json \[class 300\]: value 300 is not a pixel value"),
    ("classes.yaml", "0: {name: a, color: [1, 2]}\n", r"classes\.yaml \[class 0\]: color \[1, 2\] is not"),
    ("classes.yaml", "x: a\n", r"classes\.yaml \[class 'x'\]: class value 'x' is not an integer"),
])
def test_bad_class_tables(tmp_path, name, text, match):
    images, masks = small_dataset(tmp_path)
    (tmp_path / "classes.txt").unlink()
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=match):
        read_masks(images, masks, "s")


def test_class_table_missing_or_ambiguous_and_unsafe_paths(tmp_path):
    images, masks = small_dataset(tmp_path)
    (masks / "classes.txt").write_text("a\n")
    (masks / "classes.yaml").write_text("- a\n")
    with pytest.raises(DataError, match=r"masks: several class tables \(classes\.txt, classes\.yaml\)"):
        read_masks(images, masks, "s")
    for p in (masks / "classes.txt", masks / "classes.yaml", tmp_path / "classes.txt"):
        p.unlink()
    with pytest.raises(DataError, match=r"masks: no class table found"):
        read_masks(images, masks, "s")
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    make_image(images / "a/x.png", (8, 6))
    with pytest.raises(DataError, match=r"images 'a/x\.jpg' and 'a/x\.png' would share the mask a/x\.png"):
        read_masks(images, masks, "s")
    (images / "a/x.png").unlink()
    outside = make_image(tmp_path / "elsewhere/y.jpg", (8, 6))
    (images / "y.jpg").symlink_to(outside)
    with pytest.raises(DataError, match=r"y\.jpg: unsafe path.*outside the images root"):
        read_masks(images, masks, "s")


# --- writing -------------------------------------------------------------------------------

def coco_like_sample(tmp_path: Path) -> tuple[Sample, list[Category]]:
    """Instance-style sample (as read from COCO): polygons, RLE, a box-only instance, overlaps."""
    img = make_image(tmp_path / "src/p.jpg", (16, 12))
    rle = np.zeros((12, 16), bool)
    rle[6:10, 6:12] = True
    sample = Sample(id="c/p.jpg", root=(tmp_path / "src").as_posix(), path="p.jpg", width=16, height=12,
                    sha256=sha256_file(img), labels=[0], group="g1", attributes={"license": 2},
                    instances=[
                        Instance([2, 2, 10, 8], 0, polygons=[[2, 2, 10, 2, 10, 8, 2, 8]]),
                        Instance([6, 6, 12, 10], 1, rle=encode_rle(rle), iscrowd=True),  # over #0
                        Instance([0, 0, 3, 3], 1, attributes={"score": 0.5}),  # box only
                        Instance([13, 0, 15, 2], 0, polygons=[[13, 0, 15, 0, 15, 2, 13, 2]]),
                    ])
    return sample, [Category(0, "cat"), Category(1, "dog")]


def test_writer_counts_what_masks_cannot_hold(tmp_path):
    sample, cats = coco_like_sample(tmp_path)
    report = ConversionReport()
    out = write_masks([sample], cats, tmp_path / "out", report=report)
    assert report.counts == {"polygon_rasterised": 2, "instance_overlap_flattened": 1, "box_only_dropped": 1,
                             "crowd_flag_dropped": 1, "attributes_dropped": 2, "image_labels_dropped": 1,
                             "group_dropped": 1, "instance_identity_lost": 2}
    assert report.examples["instance_overlap_flattened"] == ["c/p.jpg instance #0 (category 0)"]
    assert "c/p.jpg instance #2" in report.examples["box_only_dropped"][0]
    with Image.open(out / "p.png") as img:
        values = np.asarray(img)
    # VOC-style values: 0 background (what no instance covers), cat 1, dog 2
    assert (tmp_path / "out/classes.txt").read_text().splitlines() == ["background", "cat", "dog"]
    assert (values[2:6, 2:10] == 1).all() and (values[6:10, 6:12] == 2).all()  # later instance on top
    assert (values[6:8, 2:6] == 1).all() and values[0, 0] == 0  # box-only not painted: background
    back = read_masks(tmp_path / "out/images", out, "c")
    assert [(c.id, c.name) for c in back.categories] == [(1, "cat"), (2, "dog")]
    cat = back.samples[0].instances[0]
    assert cat.category_id == 1 and cat.bbox == [2.0, 0.0, 15.0, 8.0]  # polygons rasterised, merged


def test_writer_background_class_and_bad_ids(tmp_path):
    sample, _ = coco_like_sample(tmp_path)
    sample.instances = sample.instances[:1]
    sample.labels, sample.group, sample.attributes = [], sample.id, {}
    report = ConversionReport()
    out = write_masks([sample], [Category(0, "cat"), Category(1, "Background")], tmp_path / "out",
                      report=report)
    with Image.open(out / "p.png") as img:
        values = np.asarray(img)
    # a category named background (any case) is value 0, with the pixels no instance covers
    assert values[0, 0] == 0 and (values[2:8, 2:10] == 1).all()
    assert report.counts == {"polygon_rasterised": 1, "background_category_merged": 1}
    assert report.examples["background_category_merged"] == ["category 1 ('Background')"]
    assert (tmp_path / "out/classes.txt").read_text().splitlines() == ["background", "cat"]
    # Uncompressed (column-major list) RLE is painted too; one of the wrong size is refused.
    sample.instances = [Instance([14, 0, 15, 12], 0, rle={"size": [12, 16], "counts": [12 * 14, 12, 12]})]
    out = write_masks([sample], [Category(0, "cat"), Category(1, "background")], tmp_path / "out2")
    with Image.open(out / "p.png") as img:
        assert np.asarray(img)[:, 14].tolist() == [1] * 12 and np.asarray(img)[:, 13].tolist() == [0] * 12
    sample.instances[0].rle = {"size": [10, 16], "counts": [160]}
    with pytest.raises(ValueError, match=r"c/p\.jpg instance #0: RLE size \[10, 16\] is not the image's"):
        write_masks([sample], [Category(0, "cat")], tmp_path / "out3")
    with pytest.raises(ValueError, match=r"255 categories do not fit a mask: its values are 1\.\.254"):
        write_masks([sample], [Category(i, f"c{i}") for i in range(255)], tmp_path / "bad")
    with pytest.raises(ValueError, match=r"category id 0 \('dog'\) given twice"):
        write_masks([sample], [Category(0, "cat"), Category(0, "dog")], tmp_path / "bad")


# --- Roboflow's "PNG Masks for Semantic Segmentation" export (real, tests/data/real) ---------

ROBOFLOW = Path(__file__).parent / "data/real/roboflow-dhcn-semantic-masks"


def test_roboflow_semantic_masks_export_is_detected_and_read_with_its_classes_and_splits():
    """Each split folder holds <stem>.jpg, <stem>_mask.png ('L', pixel value = class) and a
    `Pixel Value, Class` table; expected values are read from the PNGs and tables with PIL/csv."""
    import csv

    from visionflow.formats import read_source
    from visionflow.formats.detect import detect_source

    found = detect_source(ROBOFLOW)
    assert (found.format, found.images, found.annotations) == ("masks", ROBOFLOW, ROBOFLOW)
    res = read_source(found.format, found.images, found.annotations, "rf")
    with open(ROBOFLOW / "train/_classes.csv") as fh:
        rows = [(int(v), n.strip()) for v, n in list(csv.reader(fh))[1:]]
    assert rows[0] == (0, "background")
    assert [(c.id, c.name) for c in res.categories] == rows[1:]  # background: no category
    masks = sorted(ROBOFLOW.glob("*/*_mask.png"))
    assert len(res.samples) == len(masks) == 6 and res.report.total == 0
    splits = {"train": "train", "valid": "val", "test": "test"}
    for s in res.samples:
        mask = ROBOFLOW / s.path.replace(".jpg", "_mask.png")
        values, counts = np.unique(np.asarray(Image.open(mask)), return_counts=True)
        assert [(i.category_id, i.area) for i in s.instances] == [(int(v), float(n)) for v, n in zip(values, counts) if v]
        assert s.attributes["split"] == splits[s.path.split("/")[0]]


def test_roboflow_masks_need_their_table_and_equal_tables_across_splits(tmp_path):
    from visionflow.formats import read_source

    export = tmp_path / "rf"
    shutil.copytree(ROBOFLOW, export)
    (export / "valid/_classes.csv").write_text("Pixel Value, Class\n0, background\n1, wall\n")
    with pytest.raises(DataError, match=r"valid/_classes\.csv: differs from .*test/_classes\.csv"):
        read_source("masks", export, export, "rf")
    for t in export.glob("*/_classes.csv"):
        t.unlink()
    with pytest.raises(DataError, match=r"rf: masks named <image>_mask\.png beside the images, but no _classes\.csv"):
        read_source("masks", export, export, "rf")
    (export / "_classes.csv").write_text("Value,Name\n0,background\n")
    with pytest.raises(DataError, match=r"_classes\.csv \[line 1\]: header is \['Value', 'Name'\]"):
        read_source("masks", export, export, "rf")

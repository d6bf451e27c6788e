"""COCO reader/writer and image probing on tiny datasets generated in tmp_path."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

import visionflow.formats.coco as coco_module
from visionflow.core.errors import DataError
from visionflow.formats import COMMON_POLICIES, READERS, WRITERS, read_source, write_format
from visionflow.formats.coco import read_coco, write_coco
from visionflow.manifest.images import ImageReadError, load_rgb, probe_image, sha256_file

RLE_COMPRESSED = {"size": [64, 64], "counts": "X`0a0o1000000O1"}
RLE_UNCOMPRESSED = {"size": [48, 64], "counts": [100, 20, 44, 20, 2888]}


def make_image(path: Path, size=(64, 64), color=(200, 30, 30), orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if orientation is None:
        img.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        img.save(path, exif=exif)
    return path


def coco_doc() -> dict:
    """Non-contiguous category ids, a subfolder, an unannotated image, polygons, both RLEs,
    `is_crowd` spelling, image labels and unknown extra keys."""
    return {
        "info": {"description": "tiny"},
        "categories": [{"id": 3, "name": "cat", "supercategory": "animal"},
                       {"id": 7, "name": "dog", "supercategory": "animal"},
                       {"id": 12, "name": "bird"}],
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 64, "labels": [3], "license": 2},
            {"id": 2, "file_name": "sub/dir/b.png", "width": 64, "height": 48, "date_captured": "2024-01-01"},
            {"id": 5, "file_name": "c.png", "width": 64, "height": 64},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [1.5, 2.25, 10.1, 20.3], "area": 150.5,
             "segmentation": [[1.5, 2.25, 11.6, 2.25, 11.6, 22.55, 1.5, 22.55]], "iscrowd": 0, "score": 0.9},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [20, 20, 30, 30], "area": 400.0,
             "segmentation": dict(RLE_COMPRESSED), "iscrowd": 1},
            {"id": 12, "image_id": 2, "category_id": 12, "bbox": [0, 0, 40, 40], "area": 800,
             "segmentation": copy.deepcopy(RLE_UNCOMPRESSED), "is_crowd": 1, "source_tool": {"name": "x"}},
            {"id": 13, "image_id": 2, "category_id": 3, "bbox": [50, 10, 10, 10], "area": 100,
             "segmentation": [], "iscrowd": 0},
        ],
    }


def write_dataset(root: Path, doc: dict | None = None, ann_name: str = "annotations.json") -> tuple[Path, Path]:
    """Images for every image record (at its declared size) and the annotation file."""
    doc = coco_doc() if doc is None else doc
    for img in doc["images"]:
        name = img["file_name"]
        if name and not Path(name).is_absolute() and ".." not in name and "\\" not in name:
            make_image(root / name, (img.get("width", 64), img.get("height", 64)))
    ann = root / ann_name
    ann.write_text(json.dumps(doc))
    return root, ann


def read(root: Path, ann: Path, source: str = "src"):
    return read_coco(root, ann, source)


def by_path(result) -> dict:
    return {s.path: s for s in result.samples}


# --- reading -------------------------------------------------------------------------------

def test_read_maps_coco_to_canonical(tmp_path):
    res = read(*write_dataset(tmp_path))
    assert [(c.id, c.name, c.source_ids) for c in res.categories] == [
        (3, "cat", {"src": 3}), (7, "dog", {"src": 7}), (12, "bird", {"src": 12})]
    assert res.report.total == 0
    s = by_path(res)
    a, b, c = s["a.png"], s["sub/dir/b.png"], s["c.png"]
    assert a.id == "src/a.png" and a.group == a.id and a.root == tmp_path.as_posix()
    assert (a.width, a.height) == (64, 64) and a.sha256 == sha256_file(tmp_path / "a.png")
    assert a.labels == [3] and a.attributes == {"license": 2}
    box = a.instances[0].bbox
    assert box == pytest.approx([1.5, 2.25, 11.6, 22.55])  # xywh -> xyxy
    assert a.instances[0].polygons == [[1.5, 2.25, 11.6, 2.25, 11.6, 22.55, 1.5, 22.55]]
    assert a.instances[0].attributes == {"score": 0.9} and a.instances[0].area == 150.5
    assert a.instances[1].rle == RLE_COMPRESSED and a.instances[1].iscrowd
    assert b.id == "src/sub/dir/b.png" and (b.width, b.height) == (64, 48)
    assert b.instances[0].rle == RLE_UNCOMPRESSED and b.instances[0].iscrowd  # `is_crowd` accepted
    assert b.instances[0].category_id == 12 and b.instances[1].polygons == []
    assert c.instances == [] and c.labels == []  # images without annotations are kept
    assert b.image_path() == tmp_path / "sub/dir/b.png"


def test_registry_and_root_as_given(tmp_path):
    root, ann = write_dataset(tmp_path)
    assert READERS["coco"] is read_coco and WRITERS["coco"] is write_coco
    res = read_source("coco", root, ann, "shapes", root="data/shapes")
    assert {s.root for s in res.samples} == {"data/shapes"}
    with pytest.raises(KeyError, match="unknown annotation format 'tiff'; known formats: coco"):
        read_source("tiff", root, ann, "x")


def assert_samples_equal(left, right):
    assert [s.id for s in left] == [s.id for s in right]
    for a, b in zip(left, right):
        assert (a.path, a.width, a.height, a.sha256, a.labels, a.group, a.attributes) == \
               (b.path, b.width, b.height, b.sha256, b.labels, b.group, b.attributes)
        assert len(a.instances) == len(b.instances)
        for i, j in zip(a.instances, b.instances):
            assert i.bbox == pytest.approx(j.bbox, rel=1e-6)
            assert (i.category_id, i.polygons, i.rle, i.iscrowd, i.area, i.attributes) == \
                   (j.category_id, j.polygons, j.rle, j.iscrowd, j.area, j.attributes)


def test_round_trip_read_write_read(tmp_path):
    first = read(*write_dataset(tmp_path / "in"))
    first.samples[1].group = "session-7"  # a non-default group survives too
    out = write_format("coco", first.samples, first.categories, tmp_path / "out", project_root=tmp_path)
    doc = json.loads(out.read_text())
    assert doc["annotations"][0]["bbox"] == pytest.approx([1.5, 2.25, 10.1, 20.3])  # back to xywh
    assert doc["annotations"][2]["iscrowd"] == 1 and doc["annotations"][2]["source_tool"] == {"name": "x"}
    second = read(tmp_path / "out", out)
    assert [(c.id, c.name, c.supercategory) for c in second.categories] == \
           [(c.id, c.name, c.supercategory) for c in first.categories]
    assert second.report.total == 0
    assert_samples_equal(first.samples, second.samples)
    assert (tmp_path / "out/sub/dir/b.png").read_bytes() == (tmp_path / "in/sub/dir/b.png").read_bytes()


def test_writer_fills_missing_area_and_refuses_duplicate_paths(tmp_path):
    res = read(*write_dataset(tmp_path / "in"))
    inst = res.samples[0].instances[0]
    inst.area = None
    out = write_coco(res.samples, res.categories, tmp_path / "out", tmp_path)
    area = json.loads(out.read_text())["annotations"][0]["area"]
    assert area == pytest.approx(10.1 * 20.3)  # the polygon is the box here
    twin = copy.deepcopy(res.samples[0])
    twin.id = "other/a.png"
    with pytest.raises(ValueError, match="share the path 'a.png'"):
        write_coco([res.samples[0], twin], res.categories, tmp_path / "dup", tmp_path, copy_images=False)


def test_policy_table_documents_every_problem_kind():
    assert set(COMMON_POLICIES) <= set(coco_module.COCO_POLICIES)
    docs = (Path(__file__).resolve().parents[1] / "docs/manifest.md").read_text()
    for kind in coco_module.COCO_POLICIES:
        assert f"`{kind}`" in docs, kind
        assert kind in coco_module.__doc__


# --- structural errors: DataError naming the file and the record ---------------------------

@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.png", "sub/../../x.png", "sub\\b.png", "C:/x.png", ""])
def test_unsafe_file_names_are_rejected(tmp_path, name):
    doc = coco_doc()
    doc["images"][2]["file_name"] = name
    root, ann = write_dataset(tmp_path, doc)
    with pytest.raises(DataError, match="file_name") as err:
        read(root, ann)
    assert str(ann) in str(err.value) and "image id 5" in str(err.value)


def test_symlink_escaping_the_root_is_rejected(tmp_path):
    outside = make_image(tmp_path / "secret" / "x.png")
    root, ann = write_dataset(tmp_path / "ds")
    (root / "link.png").symlink_to(outside)
    doc = coco_doc()
    doc["images"][2]["file_name"] = "link.png"
    ann.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="outside the images root") as err:
        read(root, ann)
    assert str(ann) in str(err.value) and "image id 5" in str(err.value)


def _broken(mutate):
    doc = coco_doc()
    mutate(doc)
    return doc


@pytest.mark.parametrize("mutate, record, message", [
    (lambda d: d["annotations"][1].update(image_id=99), "annotation id 11", "image_id 99"),
    (lambda d: d["annotations"][2].update(category_id=4), "annotation id 12", "category table"),
    (lambda d: d["images"].append(dict(d["images"][0], file_name="z.png")), "image id 1", "duplicate image id"),
    (lambda d: d["annotations"].append(dict(d["annotations"][0])), "annotation id 10", "duplicate annotation id"),
    (lambda d: d["images"][1].update(file_name="a.png"), "image id 2", "also used by image id 1"),
    (lambda d: d["images"][0].update(labels=[5]), "image id 1", "labels"),
    (lambda d: d["categories"].append({"id": 3, "name": "cow"}), "category id 3", "duplicate category"),
    (lambda d: d["categories"].append({"id": 99, "name": "cat"}), "category id 99", "duplicate category"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "annotation id 10", "bbox"),
    (lambda d: d["annotations"][1].update(segmentation={"counts": "abc"}), "annotation id 11", "RLE"),
])
def test_structural_errors_name_file_and_record(tmp_path, mutate, record, message):
    root, ann = write_dataset(tmp_path, _broken(mutate))
    with pytest.raises(DataError, match=message) as err:
        read(root, ann)
    assert str(ann) in str(err.value) and record in str(err.value)


def test_invalid_json_names_line_and_column(tmp_path):
    ann = tmp_path / "annotations.json"
    ann.write_text('{\n  "images": [\n    {"id": 1,, }\n  ]\n}')
    with pytest.raises(DataError, match=r"line 3, column 14") as err:
        read(tmp_path, ann)
    assert str(ann) in str(err.value)


def test_not_a_coco_file(tmp_path):
    ann = tmp_path / "annotations.json"
    ann.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected an object with an `images` list"):
        read(tmp_path, ann)


# --- counted problems: the policy outcome, the count and an example naming file and id ------

def _one_problem(res, kind: str, *needles: str) -> None:
    assert res.report.counts == {kind: 1}, res.report.counts
    example = res.report.examples[kind][0]
    for needle in needles:
        assert needle in example, example


@pytest.mark.parametrize("bbox", [[5, 5, 0, 10], [5, 5, 10, -3]])
def test_degenerate_box_dropped(tmp_path, bbox):
    root, ann = write_dataset(tmp_path, _broken(lambda d: d["annotations"][0].update(bbox=bbox)))
    res = read(root, ann)
    assert len(by_path(res)["a.png"].instances) == 1  # only the crowd instance is left
    _one_problem(res, "box_degenerate", str(ann), "annotation id 10")


def test_box_partly_outside_is_clipped(tmp_path):
    root, ann = write_dataset(tmp_path, _broken(lambda d: d["annotations"][3].update(bbox=[50, -5, 30, 20])))
    res = read(root, ann)
    assert by_path(res)["sub/dir/b.png"].instances[1].bbox == [50.0, 0.0, 64.0, 15.0]
    _one_problem(res, "box_clipped", str(ann), "annotation id 13")


def test_box_wholly_outside_is_dropped(tmp_path):
    root, ann = write_dataset(tmp_path, _broken(lambda d: d["annotations"][3].update(bbox=[70, 10, 5, 5])))
    res = read(root, ann)
    assert len(by_path(res)["sub/dir/b.png"].instances) == 1
    _one_problem(res, "box_outside", str(ann), "annotation id 13")


@pytest.mark.parametrize("ring", [[1, 1, 5, 5], [1, 1, 5, 5, 9, 1, 3]])
def test_invalid_polygon_ring_dropped_instance_kept(tmp_path, ring):
    good = [1.5, 2.25, 11.6, 2.25, 11.6, 22.55]
    root, ann = write_dataset(tmp_path, _broken(lambda d: d["annotations"][0].update(segmentation=[ring, good])))
    res = read(root, ann)
    assert by_path(res)["a.png"].instances[0].polygons == [good]
    _one_problem(res, "polygon_invalid", str(ann), "annotation id 10")


def test_missing_image_file_skipped(tmp_path):
    root, ann = write_dataset(tmp_path)
    (root / "sub/dir/b.png").unlink()
    res = read(root, ann)
    assert "sub/dir/b.png" not in by_path(res) and len(res.samples) == 2
    _one_problem(res, "image_missing", str(ann), "image id 2", "sub/dir/b.png")


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupt_image_skipped_and_left_untouched(tmp_path, damage):
    root, ann = write_dataset(tmp_path)
    target = root / "a.png"
    data = target.read_bytes()
    target.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    before = sha256_file(target)
    res = read(root, ann)
    assert "a.png" not in by_path(res)
    _one_problem(res, "image_unreadable", str(ann), "image id 1", "a.png")
    assert sha256_file(target) == before


def test_declared_size_disagreeing_with_file_uses_file(tmp_path):
    root, ann = write_dataset(tmp_path)
    ann.write_text(json.dumps(_broken(lambda d: d["images"][0].update(width=128, height=32))))
    res = read(root, ann)
    assert (by_path(res)["a.png"].width, by_path(res)["a.png"].height) == (64, 64)
    _one_problem(res, "image_size_mismatch", str(ann), "image id 1", "128x32")


def test_exif_rotated_image_uses_displayed_size(tmp_path):
    # Declared = the raw size: an annotator that ignored EXIF (see tests/test_validation.py).
    doc = coco_doc()
    doc["images"] = [{"id": 1, "file_name": "rot.jpg", "width": 64, "height": 48}]
    doc["annotations"] = []
    make_image(tmp_path / "rot.jpg", (64, 48), orientation=6)  # stored 64x48, shown 48x64
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(doc))
    res = read(tmp_path, ann)
    assert (res.samples[0].width, res.samples[0].height) == (48, 64)
    _one_problem(res, "exif_orientation_mismatch", "image id 1", "64x48 is the raw size")


# --- image helpers ---------------------------------------------------------------------------

def test_probe_image_size_hash_and_orientation(tmp_path):
    plain = make_image(tmp_path / "p.png", (30, 20))
    assert probe_image(plain) == (30, 20, sha256_file(plain))
    for orientation, expected in [(1, (30, 20)), (3, (30, 20)), (5, (20, 30)), (8, (20, 30))]:
        p = make_image(tmp_path / f"o{orientation}.jpg", (30, 20), orientation=orientation)
        assert probe_image(p)[:2] == expected
        assert load_rgb(p).shape[:2] == expected[::-1]


def test_probe_detects_truncated_jpeg(tmp_path):
    p = tmp_path / "x.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p, quality=95)
    p.write_bytes(p.read_bytes()[:-600])
    with pytest.raises(ImageReadError, match="x.jpg"):
        probe_image(p)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "I;16", "P", "1"])
def test_load_rgb_converts_every_mode(tmp_path, mode):
    img = Image.new("RGB", (8, 6), (255, 255, 255))
    if mode == "I;16":
        img = Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16))
    else:
        img = img.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    arr = load_rgb(path)
    assert arr.shape == (6, 8, 3) and arr.dtype == np.uint8
    assert math.isclose(arr.mean(), 255, abs_tol=1)  # white stays white (16-bit is scaled, not clipped)


def test_load_rgb_composites_transparency_over_black(tmp_path):
    img = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    img.putpixel((0, 0), (200, 100, 50, 255))
    img.save(tmp_path / "t.png")
    arr = load_rgb(tmp_path / "t.png")
    assert arr[0, 0].tolist() == [200, 100, 50] and arr[1, 1].tolist() == [0, 0, 0]


def _pillow_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("save", [dict(subsampling=0), dict(subsampling=1), dict(subsampling=2),
                                  dict(progressive=True), dict(quality=60, optimize=True)],
                         ids=["444", "422", "420", "progressive", "q60-optimized"])
def test_load_rgb_jpeg_fast_path_is_pillow_bit_for_bit(tmp_path, orientation, save):
    """RGB JPEGs are decoded by OpenCV (load_rgb's fast path): the pixels, EXIF orientation
    applied, must be exactly Pillow's, for every chroma subsampling and orientation."""
    from visionflow.manifest.images import _decode_rgb_jpeg

    rng = np.random.default_rng(orientation)
    y, x = np.mgrid[0:37, 0:53]
    smooth = np.stack([x * 4, y * 6, (x + y) * 3], -1) % 256
    pixels = (smooth + rng.integers(0, 60, (37, 53, 3))).clip(0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, exif=exif, **save)
    with Image.open(path) as im:
        fast = _decode_rgb_jpeg(np.fromfile(path, np.uint8), orientation, im.size)
    assert fast is not None  # the fast path was taken
    expected = _pillow_rgb(path)
    got = load_rgb(path)
    assert got.shape == expected.shape == ((53, 37, 3) if orientation >= 5 else (37, 53, 3))
    assert got.flags.c_contiguous and np.array_equal(got, expected)


def test_load_rgb_real_jpegs_are_pillow_bit_for_bit():
    """The vendored JPEGs of real tools' exports (cameras, Roboflow, LabelImg, CVAT), each as
    Pillow decodes it."""
    paths = sorted({p.resolve() for p in (Path(__file__).parent / "data/real").rglob("*") if p.suffix.lower()
                    in (".jpg", ".jpeg")})
    assert len(paths) >= 20
    for path in paths:
        assert np.array_equal(load_rgb(path), _pillow_rgb(path)), path


def test_load_rgb_jpeg_with_trailing_bytes_or_truncated(tmp_path):
    """Bytes after the end-of-image marker: Pillow's path, same pixels. Truncated: Pillow's
    error, as before (the callers add the file's name), not a half-grey image from OpenCV."""
    from visionflow.manifest.images import _decode_rgb_jpeg

    p = tmp_path / "x.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(p, quality=90)
    data = p.read_bytes()
    trailing = tmp_path / "trailing.jpg"
    trailing.write_bytes(data + b"junk after EOI")
    assert _decode_rgb_jpeg(np.fromfile(trailing, np.uint8), 1, (30, 40)) is None
    assert np.array_equal(load_rgb(trailing), _pillow_rgb(p))
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        load_rgb(cut)


def test_float_noise_at_the_edge_is_clipped_silently(tmp_path):
    # Float noise a hair past the edge is not a data problem (strict mode must pass).
    noisy = [50.1, 10, 13.900000000001, 38.0]  # x + w = 64.000000000001 on a 64-wide image
    root, ann = write_dataset(tmp_path, _broken(lambda d: d["annotations"][3].update(bbox=noisy)))
    res = read(root, ann)
    assert res.report.total == 0
    assert by_path(res)["sub/dir/b.png"].instances[1].bbox[2:] == pytest.approx([64.0, 48.0])
    assert by_path(res)["sub/dir/b.png"].instances[1].bbox[2] <= 64.0


# --- variants real exporters write (issue 11) --------------------------------------------------

@pytest.mark.parametrize("value, crowd", [("false", False), ("true", True), ("0", False), ("1", True),
                                          ("False", False), (True, True)])
def test_iscrowd_spellings(tmp_path, value, crowd):
    root, ann = write_dataset(tmp_path, _broken(lambda d: d["annotations"][0].update(iscrowd=value)))
    assert by_path(read(root, ann))["a.png"].instances[0].iscrowd is crowd


def test_iscrowd_other_strings_are_an_error(tmp_path):
    root, ann = write_dataset(tmp_path, _broken(lambda d: d["annotations"][0].update(iscrowd="maybe")))
    with pytest.raises(DataError, match="0, 1, true or false") as err:
        read(root, ann)
    assert "annotation id 10" in str(err.value)


def test_annotations_without_geometry_are_image_labels_and_ids_may_start_at_0(tmp_path):
    def mutate(d):
        d["images"][2]["id"] = 0  # ids from 0 (Roboflow, CVAT subsets): valid COCO, not a problem
        d["annotations"] += [{"id": 0, "image_id": 0, "category_id": 7},
                             {"id": 21, "image_id": 0, "category_id": 12, "bbox": None, "segmentation": []},
                             {"id": 22, "image_id": 1, "category_id": 3}]  # already an image label of a.png
    root, ann = write_dataset(tmp_path, _broken(mutate))
    res = read(root, ann)
    s = by_path(res)
    assert s["c.png"].labels == [7, 12] and s["c.png"].instances == []
    assert s["a.png"].labels == [3] and len(s["a.png"].instances) == 2
    assert res.report.total == 0


def test_rle_without_bbox_gets_the_masks_box(tmp_path):
    root, ann = write_dataset(tmp_path, _broken(lambda d: d["annotations"][2].pop("bbox")))
    inst = by_path(read(root, ann))["sub/dir/b.png"].instances[0]
    h, w = RLE_UNCOMPRESSED["size"]
    x, y, bw, bh = mask_utils.toBbox(mask_utils.frPyObjects(RLE_UNCOMPRESSED, h, w))
    assert inst.bbox == pytest.approx([x, y, x + bw, y + bh]) and inst.rle == RLE_UNCOMPRESSED


def test_captions_are_refused(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
           "annotations": [{"id": 1, "image_id": 1, "caption": "A cat on a mat."}]}
    root, ann = write_dataset(tmp_path, doc)
    with pytest.raises(DataError, match="captions are not annotations visionflow trains on") as err:
        read(root, ann)
    assert str(ann) in str(err.value)


def test_malformed_keypoints_are_an_error(tmp_path):
    root, ann = write_dataset(tmp_path, _broken(lambda d: d["annotations"][0].update(keypoints=[1, 2])))
    with pytest.raises(DataError, match="keypoints must be a flat list") as err:
        read(root, ann)
    assert "annotation id 10" in str(err.value)


def test_nothing_read_is_an_error_not_an_empty_dataset(tmp_path):
    root, ann = write_dataset(tmp_path)
    with pytest.raises(DataError, match="none of its 3 images could be read") as err:
        read(tmp_path / "elsewhere", ann)
    assert str(tmp_path / "elsewhere/a.png") in str(err.value)
    def outside(d):
        d["images"][0].pop("labels")
        for a in d["annotations"]:
            a.update(bbox=[500, 500, 5, 5], segmentation=[])
    doc = _broken(outside)
    root, ann = write_dataset(tmp_path / "out", doc)
    with pytest.raises(DataError, match="all 4 annotations were dropped") as err:
        read(root, ann)
    assert "box_outside: 4" in str(err.value)

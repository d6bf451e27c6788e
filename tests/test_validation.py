"""Validation cases of the COCO reader and of image loading, each asserting its stated policy
(see the policy table in visionflow.formats.coco and docs/manifest.md): the outcome, the count,
and a message naming the annotation file and the annotation / image id."""
from __future__ import annotations

import hashlib
import json
import re
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.formats.coco import read_coco, write_coco
from visionflow.manifest.images import ImageReadError, load_rgb, probe_image, raw_to_displayed

SRC = Path(__file__).resolve().parents[1] / "src"
CATS = [{"id": 1, "name": "thing"}]


def dataset(root: Path, images: list[dict], annotations: list[dict], **dump) -> Path:
    """Annotation file over images already on disk (or made here as grey 64x64 PNGs)."""
    for img in images:
        if not (root / img["file_name"]).exists():
            (root / img["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (img.get("width", 64), img.get("height", 64)), (90, 90, 90)).save(root / img["file_name"])
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATS}, **dump),
                   encoding="utf-8")
    return ann


def one_image(root: Path, *annotations: dict) -> Path:
    return dataset(root, [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}], list(annotations))


def box(aid: int, bbox, **extra) -> dict:
    return {"id": aid, "image_id": 1, "category_id": 1, "bbox": bbox, **extra}


def only(report, kind: str, *needles: str) -> str:
    assert report.counts == {kind: 1}, report.counts
    example = report.examples[kind][0]
    for needle in needles:
        assert needle in example, example
    return example


# --- annotation ids and crowd flags ----------------------------------------------------------

def test_annotation_id_zero_is_accepted_and_renumbered(tmp_path):
    # Ids from 0 are valid COCO (Roboflow and CVAT write them): not a problem, so --strict passes.
    ann = one_image(tmp_path, box(0, [1, 1, 10, 10]), box(1, [20, 20, 5, 5]))
    res = read_coco(tmp_path, ann, "s")
    assert len(res.samples[0].instances) == 2 and res.report.total == 0
    out = write_coco(res.samples, res.categories, tmp_path / "out", tmp_path, copy_images=False)
    assert [a["id"] for a in json.loads(out.read_text())["annotations"]] == [1, 2]  # never 0 again


@pytest.mark.parametrize("key", ["iscrowd", "is_crowd"])
def test_crowd_rle_accepted_under_both_spellings(tmp_path, key):
    rle = {"size": [64, 64], "counts": [100, 20, 3976]}
    res = read_coco(tmp_path, one_image(tmp_path, box(5, [0, 0, 40, 40], segmentation=rle, **{key: 1})), "s")
    inst = res.samples[0].instances[0]
    assert inst.iscrowd and inst.rle == rle and res.report.total == 0


def test_rle_with_iscrowd_0_is_a_mask_instance(tmp_path):
    rle = {"size": [64, 64], "counts": "X`0a0o1000000O1"}
    res = read_coco(tmp_path, one_image(tmp_path, box(5, [0, 0, 40, 40], segmentation=rle, iscrowd=0)), "s")
    inst = res.samples[0].instances[0]
    assert not inst.iscrowd and inst.rle == rle and inst.polygons == [] and res.report.total == 0


@pytest.mark.parametrize("value", ["yes", 2, 0.5, [1]])  # "0"/"1"/"false"/"true" are accepted (test_coco.py)
def test_iscrowd_that_is_not_0_or_1_is_an_error(tmp_path, value):
    ann = one_image(tmp_path, box(8, [0, 0, 4, 4], iscrowd=value))
    with pytest.raises(DataError, match="`iscrowd` must be 0, 1, true or false") as err:
        read_coco(tmp_path, ann, "s")
    assert str(ann) in str(err.value) and "annotation id 8" in str(err.value)


# --- absurd coordinates ----------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"bbox": [float("nan"), 5, 10, 10]},
    {"bbox": [5, 5, float("nan"), 10]},  # NaN width: x2 = NaN, every comparison is False
    {"bbox": [5, 5, 10, float("inf")]},
    {"bbox": [float("-inf"), 5, 10, 10]},
    {"bbox": [5, 5, 1e6, 10]},  # 1e6 px wide on a 64 px image
    {"bbox": [-1e9, 5, 10, 10]},
    {"bbox": [1, 1, 5, 5], "segmentation": [[1, 1, 5, float("nan"), 5, 5]]},
    {"segmentation": [[1, 1, 5, 1e7, 5, 5]]},  # no bbox: derived from an absurd polygon
])
def test_absurd_coordinates_drop_the_instance(tmp_path, bad):
    ann = one_image(tmp_path, {"id": 4, "image_id": 1, "category_id": 1, **bad}, box(5, [1, 1, 8, 8]))
    res = read_coco(tmp_path, ann, "s")
    assert [i.bbox for i in res.samples[0].instances] == [[1.0, 1.0, 9.0, 9.0]]  # only the sane one is left
    only(res.report, "box_absurd", str(ann), "annotation id 4", "image id 1")


def test_far_but_plausible_box_is_clipped_not_absurd(tmp_path):
    res = read_coco(tmp_path, one_image(tmp_path, box(4, [-500, 10, 540, 10])), "s")  # < 100 image sizes
    assert res.samples[0].instances[0].bbox == [0.0, 10.0, 40.0, 20.0]
    only(res.report, "box_clipped", "annotation id 4")


# --- EXIF orientation: one policy for pixels and annotations ---------------------------------

RAW_W, RAW_H = 80, 60
SQUARE = (12, 6, 32, 22)  # raw-frame x1, y1, x2, y2 of the blue square


def rotated_jpeg(path: Path, orientation: int = 6) -> Path:
    """An 80x60 JPEG as stored, blue square at SQUARE, EXIF orientation set (shown 60x80 for 6)."""
    img = Image.new("RGB", (RAW_W, RAW_H), (128, 128, 128))
    img.paste((0, 0, 255), SQUARE)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif)
    return path


def blue_mask(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 2] > 200) & (rgb[..., 0] < 60) & (rgb[..., 1] < 60)


def test_raw_frame_annotations_are_mapped_to_the_displayed_pixels(tmp_path):
    # The tool ignored EXIF: width/height declared as stored (80x60), box drawn on the stored pixels.
    rotated_jpeg(tmp_path / "rot.jpg")
    x1, y1, x2, y2 = SQUARE
    poly = [x1, y1, x2, y1, x2, y2, x1, y2]
    anns = [{"id": 3, "image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "segmentation": [poly]},
            box(4, [0, 0, 8, 8], segmentation={"size": [RAW_H, RAW_W], "counts": [0, 8, 4792]}, iscrowd=1)]
    ann = dataset(tmp_path, [{"id": 1, "file_name": "rot.jpg", "width": RAW_W, "height": RAW_H}], anns)
    res = read_coco(tmp_path, ann, "s")
    s = res.samples[0]
    assert (s.width, s.height) == (RAW_H, RAW_W)  # displayed frame
    assert res.report.counts == {"exif_orientation_mismatch": 1, "exif_mask_dropped": 1}
    assert "image id 1" in res.report.examples["exif_orientation_mismatch"][0]
    assert "annotation id 4" in res.report.examples["exif_mask_dropped"][0]
    rgb = load_rgb(tmp_path / "rot.jpg")
    assert rgb.shape == (RAW_W, RAW_H, 3)
    bx1, by1, bx2, by2 = (int(round(v)) for v in s.instances[0].bbox)
    assert (bx1, by1, bx2, by2) == (RAW_H - 22, 12, RAW_H - 6, 32)  # turned 90 degrees clockwise
    # JPEG blurs the square's edges by a pixel or two: the box shrunk by 2 px is all blue, and
    # no blue pixel lies outside the box grown by 2 px.
    assert blue_mask(rgb[by1 + 2:by2 - 2, bx1 + 2:bx2 - 2]).all()
    outside = blue_mask(rgb)
    outside[by1 - 2:by2 + 2, bx1 - 2:bx2 + 2] = False
    assert not outside.any()
    xs, ys = s.instances[0].polygons[0][0::2], s.instances[0].polygons[0][1::2]
    assert [min(xs), min(ys), max(xs), max(ys)] == s.instances[0].bbox  # polygon mapped with the box
    crowd = s.instances[1]
    assert crowd.rle is None and crowd.iscrowd and crowd.bbox == [RAW_H - 8.0, 0.0, RAW_H, 8.0]


def test_nan_in_a_raw_frame_box_is_absurd_not_lost_by_the_mapping(tmp_path):
    rotated_jpeg(tmp_path / "rot.jpg")
    ann = dataset(tmp_path, [{"id": 1, "file_name": "rot.jpg", "width": RAW_W, "height": RAW_H}],
                  [box(3, [5, 5, float("nan"), 10]), box(4, [5, 5, 10, 10])])
    res = read_coco(tmp_path, ann, "s")
    assert len(res.samples[0].instances) == 1
    assert res.report.counts == {"exif_orientation_mismatch": 1, "box_absurd": 1}
    assert "annotation id 3" in res.report.examples["box_absurd"][0]


def test_displayed_frame_annotations_are_kept(tmp_path):
    # Declared size = the displayed size: annotations already match the displayed pixels.
    rotated_jpeg(tmp_path / "rot.jpg")
    ann = dataset(tmp_path, [{"id": 1, "file_name": "rot.jpg", "width": RAW_H, "height": RAW_W}],
                  [box(3, [10, 20, 15, 25])])
    res = read_coco(tmp_path, ann, "s")
    assert res.report.total == 0 and res.samples[0].instances[0].bbox == [10.0, 20.0, 25.0, 45.0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_raw_to_displayed_matches_exif_transpose(tmp_path, orientation):
    # PNG (lossless) with EXIF: the mapped box must be exactly the red pixels load_rgb shows.
    img = Image.new("RGB", (40, 30), (0, 0, 0))
    img.paste((255, 0, 0), (5, 3, 15, 9))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.png", exif=exif)
    rgb = load_rgb(tmp_path / "o.png")
    rows, cols = np.nonzero(rgb[..., 0] > 128)
    xs, ys = raw_to_displayed([5, 15], [3, 9], orientation, 40, 30)
    assert [min(xs), min(ys), max(xs), max(ys)] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    assert probe_image(tmp_path / "o.png")[:2] == (rgb.shape[1], rgb.shape[0])


# --- pixel modes -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, make, suffix, expected", [
    ("L", lambda: Image.new("L", (8, 6), 128), "png", (128, 128, 128)),
    ("LA", lambda: Image.new("LA", (8, 6), (128, 255)), "png", (128, 128, 128)),
    ("RGBA", lambda: Image.new("RGBA", (8, 6), (10, 20, 30, 255)), "png", (10, 20, 30)),
    ("CMYK", lambda: Image.new("CMYK", (8, 6), (255, 0, 0, 0)), "tif", (0, 255, 255)),  # pure cyan
    ("P", lambda: Image.new("RGB", (8, 6), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE), "png",
     (10, 200, 30)),
    ("I;16", lambda: Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16)), "png", (255, 255, 255)),
    ("I;16 half", lambda: Image.fromarray(np.full((6, 8), 32768, dtype=np.uint16)), "png", (128, 128, 128)),
    ("1", lambda: Image.new("1", (8, 6), 1), "png", (255, 255, 255)),
])
def test_load_rgb_converts_each_mode_to_rgb_values(tmp_path, mode, make, suffix, expected):
    img = make()
    assert img.mode == mode.split()[0]
    img.save(tmp_path / f"x.{suffix}")
    arr = load_rgb(tmp_path / f"x.{suffix}")
    assert arr.shape == (6, 8, 3) and arr.dtype == np.uint8
    assert np.abs(arr.astype(int) - expected).max() <= 2, arr[0, 0]


# --- unreadable images: skipped, counted, never rewritten ------------------------------------

def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["truncated_jpeg", "empty", "png_bad_crc", "text"])
def test_corrupt_image_skipped_reported_and_left_untouched(tmp_path, damage):
    path = tmp_path / ("bad.jpg" if damage == "truncated_jpeg" else "bad.png")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes({"truncated_jpeg": data[:-700], "empty": b"", "text": b"hello",
                      "png_bad_crc": data[:200] + bytes([data[200] ^ 0xFF]) + data[201:]}[damage])
    ann = dataset(tmp_path, [{"id": 1, "file_name": "ok.png"}, {"id": 2, "file_name": path.name}],
                  [{"id": 8, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]},
                   {"id": 9, "image_id": 2, "category_id": 1, "bbox": [1, 1, 4, 4]}])
    before = tree_hashes(tmp_path)
    res = read_coco(tmp_path, ann, "s")
    assert [s.path for s in res.samples] == ["ok.png"]
    only(res.report, "image_unreadable", str(ann), "image id 2", path.name)
    assert tree_hashes(tmp_path) == before  # source files never rewritten


# --- file names ------------------------------------------------------------------------------

@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_non_ascii_file_names_kept_exactly(tmp_path, ensure_ascii):
    name = unicodedata.normalize("NFC", "images/café_日本.jpg")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 24), (1, 2, 3)).save(tmp_path / name)
    ann = dataset(tmp_path, [{"id": "café-1", "file_name": name, "width": 32, "height": 24}],
                  [{"id": 1, "image_id": "café-1", "category_id": 1, "bbox": [1, 1, 4, 4]}],
                  ensure_ascii=ensure_ascii)
    res = read_coco(tmp_path, ann, "s")
    s = res.samples[0]
    assert res.report.total == 0 and s.path == name and s.id == f"s/{name}"
    assert unicodedata.is_normalized("NFC", s.path) and s.image_path().read_bytes() == (tmp_path / name).read_bytes()
    out = write_coco(res.samples, res.categories, tmp_path / "out", tmp_path)
    again = read_coco(tmp_path / "out", out, "s").samples[0]
    assert (again.path, again.id, again.sha256) == (s.path, s.id, s.sha256)


# --- decompression bombs ---------------------------------------------------------------------

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares width x height (valid CRCs) over a tiny IDAT: cheap to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_header_is_skipped_and_counted(tmp_path):
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    ann = dataset(tmp_path, [{"id": 7, "file_name": "bomb.png"}], [])
    # the only image is skipped: nothing is left, which is an error naming the skipped image
    with pytest.raises(DataError, match="none of its 1 images could be read") as err:
        read_coco(tmp_path, ann, "s")
    for needle in (str(ann), "image_unreadable: 1", "image id 7", "bomb.png", "exceeds the pixel limit"):
        assert needle in str(err.value)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns, we refuse
def test_pixel_limit_is_enforced_at_1x_not_only_at_2x(tmp_path, monkeypatch):
    # 64x64 = 4096 pixels: between 1x and 2x of 3000, where Pillow itself only warns.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    ann = one_image(tmp_path)
    with pytest.raises(DataError, match="none of its 1 images could be read") as err:
        read_coco(tmp_path, ann, "s")
    for needle in ("image_unreadable: 1", "image id 1", "exceeds the pixel limit", "3000"):
        assert needle in str(err.value)
    with pytest.raises(ImageReadError, match="exceeds the pixel limit"):
        load_rgb(tmp_path / "a.png")


def test_pillow_safety_limits_are_never_lifted_in_src():
    # Lifting MAX_IMAGE_PIXELS (or accepting truncated files) anywhere would let a bomb or a
    # half-written JPEG through every reader; the test suite may change them only via monkeypatch.
    pattern = re.compile(r"^\s*[\w.]*\b(MAX_IMAGE_PIXELS|LOAD_TRUNCATED_IMAGES)\s*(=(?!=)|:)"
                         r"|setattr\([^)]*(MAX_IMAGE_PIXELS|LOAD_TRUNCATED_IMAGES)")
    offenders = [f"{p}:{n}" for p in SRC.rglob("*.py")
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert offenders == []
